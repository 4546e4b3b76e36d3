//! An environment as the evaluation context of Flagsmith's reference engine
//! (`flagsmith-flag-engine`), built the way Flagsmith's SDKs build it from an environment
//! document: features keyed by their id, segments by theirs, identity overrides as segments
//! matching identifiers with the highest priority. Used to compare Roster's evaluator with the
//! reference (tests, benchmarks); identity overrides are keyed by the profile id given here, so
//! callers pass the identifier as profile id.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::evaluator::FlagConfig;

/// The reference engine's context. JSON has no infinities: an identity override's priority is
/// `null`, which a driver must read as `-inf`.
pub fn reference_context(config: &FlagConfig, identity: Option<(&str, &Map<String, Value>)>) -> Value {
    let mut features = Map::new();
    for feature in &config.features {
        let definition = &feature.definition;
        let mut context = json!({ "key": feature.id.to_string(), "name": definition.name,
            "enabled": definition.enabled, "value": definition.value });
        if !definition.variants.is_empty() {
            context["variants"] = definition
                .variants
                .iter()
                .enumerate()
                .map(|(priority, variant)| {
                    json!({ "key": variant.key, "value": variant.value, "weight": variant.weight, "priority": priority })
                })
                .collect();
        }
        features.insert(definition.name.clone(), context);
    }
    let mut segments = Map::new();
    for segment in &config.segments {
        let overrides: Vec<Value> = config
            .features
            .iter()
            .filter_map(|feature| {
                let found = feature.definition.segment_overrides.iter().find(|o| o.segment_id == segment.id)?;
                Some(json!({ "key": format!("override-{}-{}", feature.id, segment.id), "name": feature.definition.name,
                    "enabled": found.enabled, "value": found.value, "priority": found.priority }))
            })
            .collect();
        segments.insert(
            segment.id.to_string(),
            json!({ "key": segment.id.to_string(), "name": segment.definition.name,
                "rules": serde_json::to_value(&segment.definition.rules).unwrap_or_default(), "overrides": overrides,
                "metadata": { "source": "api" } }),
        );
    }
    let mut by_identifier: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for identity_override in &config.identity_overrides {
        let Some(feature) = config.features.iter().find(|feature| feature.id == identity_override.feature_id) else {
            continue;
        };
        by_identifier.entry(&identity_override.profile_id).or_default().push(json!({
            "key": "", "name": feature.definition.name, "enabled": identity_override.state.enabled,
            "value": identity_override.state.value, "priority": null }));
    }
    for (index, (identifier, overrides)) in by_identifier.into_iter().enumerate() {
        segments.insert(
            format!("identity-overrides-{index}"),
            json!({ "key": format!("identity-overrides-{index}"), "name": "identity_overrides",
                "rules": [{ "type": "ALL", "conditions": [{ "property": "$.identity.identifier", "operator": "IN", "value": [identifier] }] }],
                "overrides": overrides, "metadata": { "source": "identity_overrides" } }),
        );
    }
    let mut context = json!({ "environment": { "key": config.environment_key, "name": config.environment_name },
        "features": features, "segments": segments });
    if let Some((identifier, traits)) = identity {
        context["identity"] = json!({ "identifier": identifier, "traits": traits });
    }
    context
}
