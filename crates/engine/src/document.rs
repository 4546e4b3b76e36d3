//! The environment in Flagsmith's environment-document format: what Flagsmith's server-side SDKs
//! download to evaluate flags locally. Ids are Roster's: a feature's id is also its state's
//! `django_id`, which SDKs use as the multivariate hashing key, so local and remote evaluation
//! put every identity in the same bucket.

use std::collections::HashMap;

use roster_core::flags::{FeatureDefinition, FlagConfig, SegmentRule};
use serde_json::{Value, json};

/// Identity overrides are listed by user id (Flagsmith's identifier); overrides of profiles
/// without one cannot be matched by an SDK and are left out.
pub(crate) fn environment_document(
    config: &FlagConfig,
    environment_id: i64,
    environment_slug: &str,
    user_ids: &HashMap<String, Option<String>>,
) -> Value {
    let feature_states: Vec<Value> =
        config.features.iter().map(|feature| default_state(feature.id, &feature.definition)).collect();
    let segments: Vec<Value> = config
        .segments
        .iter()
        .map(|segment| {
            let overrides: Vec<Value> = config
                .features
                .iter()
                .filter_map(|feature| {
                    let found = feature.definition.segment_overrides.iter().find(|o| o.segment_id == segment.id)?;
                    let django_id = segment.id * 1_000_000 + feature.id;
                    Some(json!({
                        "django_id": django_id,
                        "featurestate_uuid": uuid_of("segment-override", django_id),
                        "feature": feature_model(feature.id, &feature.definition),
                        "enabled": found.enabled,
                        "feature_state_value": found.value,
                        "feature_segment": { "priority": found.priority },
                        "multivariate_feature_state_values": [],
                    }))
                })
                .collect();
            json!({
                "id": segment.id,
                "name": segment.definition.name,
                "rules": segment.definition.rules.iter().map(rule_model).collect::<Vec<_>>(),
                "feature_states": overrides,
            })
        })
        .collect();
    let mut by_user: std::collections::BTreeMap<&str, Vec<Value>> = std::collections::BTreeMap::new();
    for identity_override in &config.identity_overrides {
        let Some(Some(user_id)) = user_ids.get(&identity_override.profile_id) else { continue };
        let Some(feature) = config.features.iter().find(|feature| feature.id == identity_override.feature_id) else {
            continue;
        };
        by_user.entry(user_id.as_str()).or_default().push(json!({
            "featurestate_uuid": uuid_of("identity-override", feature.id),
            "feature": feature_model(feature.id, &feature.definition),
            "enabled": identity_override.state.enabled,
            "feature_state_value": identity_override.state.value,
            "multivariate_feature_state_values": [],
        }));
    }
    let identity_overrides: Vec<Value> = by_user
        .into_iter()
        .map(|(identifier, features)| {
            json!({ "identifier": identifier, "environment_api_key": config.environment_key, "identity_features": features })
        })
        .collect();
    json!({
        "id": environment_id,
        "api_key": config.environment_key,
        "name": config.environment_name,
        "project": {
            "id": environment_id,
            "name": environment_slug,
            "hide_disabled_flags": false,
            "organisation": { "id": 1, "name": "roster", "feature_analytics": false, "stop_serving_flags": false, "persist_trait_data": true },
            "segments": segments,
        },
        "feature_states": feature_states,
        "identity_overrides": identity_overrides,
        "updated_at": "1970-01-01T00:00:00+00:00",
    })
}

fn feature_model(feature_id: i64, definition: &FeatureDefinition) -> Value {
    let kind = if definition.variants.is_empty() { "STANDARD" } else { "MULTIVARIATE" };
    json!({ "id": feature_id, "name": definition.name, "type": kind })
}

fn default_state(feature_id: i64, definition: &FeatureDefinition) -> Value {
    let variants: Vec<Value> = definition
        .variants
        .iter()
        .enumerate()
        .map(|(index, variant)| {
            // The id orders the options for bucketing; 0 would read as "no id" to the SDKs.
            let id = index as i64 + 1;
            json!({
                "id": id,
                "mv_fs_value_uuid": uuid_of("variant", feature_id * 1000 + id),
                "percentage_allocation": variant.weight,
                "multivariate_feature_option": { "id": id, "key": variant.key, "value": variant.value },
            })
        })
        .collect();
    json!({
        "django_id": feature_id,
        "featurestate_uuid": uuid_of("feature", feature_id),
        "feature": feature_model(feature_id, definition),
        "enabled": definition.enabled,
        "feature_state_value": definition.value,
        "feature_segment": null,
        "multivariate_feature_state_values": variants,
    })
}

fn rule_model(rule: &SegmentRule) -> Value {
    json!({
        "type": rule.rule_type,
        "conditions": rule.conditions.iter().map(|condition| json!({
            "operator": condition.operator,
            "property_": condition.property,
            "value": condition.value,
        })).collect::<Vec<_>>(),
        "rules": rule.rules.iter().map(rule_model).collect::<Vec<_>>(),
    })
}

/// A stable UUID-shaped id for a document object (SDKs read it, Roster needs no stored one).
fn uuid_of(kind: &str, id: i64) -> String {
    let kind_code: u32 = kind.bytes().fold(0u32, |hash, byte| hash.wrapping_mul(31).wrapping_add(u32::from(byte)));
    format!("{kind_code:08x}-0000-4000-8000-{:012x}", id as u64 & 0xffff_ffff_ffff)
}
