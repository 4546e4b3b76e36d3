//! Segments and features as users write them (the management API's bodies, also how they are
//! stored), and the checks that refuse a bad rule when it is saved rather than when it is
//! evaluated. Every error names the path of the offending field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::python::python_float;
use crate::error::{ErrorCode, FieldError};

/// How a rule combines its conditions and sub-rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RuleType {
    All,
    Any,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Operator {
    Equal,
    NotEqual,
    GreaterThan,
    GreaterThanInclusive,
    LessThan,
    LessThanInclusive,
    Contains,
    NotContains,
    Regex,
    In,
    Modulo,
    IsSet,
    IsNotSet,
    PercentageSplit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentRule {
    #[serde(rename = "type")]
    pub rule_type: RuleType,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<SegmentCondition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<SegmentRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentCondition {
    /// A trait key, or a path into the evaluation context (`$.identity.identifier`, ...). Empty
    /// only for `PERCENTAGE_SPLIT`, which then splits on the identity key.
    #[serde(default)]
    pub property: String,
    pub operator: Operator,
    /// A string; for `IN` also a list. Absent for `IS_SET`/`IS_NOT_SET`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub rules: Vec<SegmentRule>,
}

/// One multivariate option: served to `weight` percent of identities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub key: String,
    pub value: Value,
    pub weight: f64,
}

/// A feature's state for the members of one segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentOverride {
    pub segment_id: i64,
    /// Lower wins when an identity is in several overriding segments.
    #[serde(default)]
    pub priority: i64,
    pub enabled: bool,
    #[serde(default)]
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The environment default.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub value: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<Variant>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segment_overrides: Vec<SegmentOverride>,
}

/// A feature's state for one identity, above every segment override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityOverride {
    pub enabled: bool,
    #[serde(default)]
    pub value: Value,
}

/// Context paths a condition may read besides traits.
pub const CONTEXT_PATHS: [&str; 4] =
    ["$.identity.identifier", "$.identity.key", "$.environment.name", "$.environment.key"];
/// Prefix of a path naming a trait (`$.identity.traits.plan`).
pub const TRAIT_PATH_PREFIX: &str = "$.identity.traits.";

/// Bounds that keep one segment cheap to evaluate.
const MAX_NAME_CHARS: usize = 256;
const MAX_RULE_DEPTH: usize = 8;
const MAX_CONDITIONS: usize = 1_000;
const MAX_VALUE_BYTES: usize = 10_000;
/// Compiled size limit of one regex (the regex crate's default is 10 MiB; a condition needs less).
pub const MAX_REGEX_BYTES: usize = 1 << 20;

/// The suffix that makes a comparison semantic-version aware.
pub const SEMVER_SUFFIX: &str = ":semver";

fn invalid(path: &str, message: impl Into<String>) -> FieldError {
    FieldError::new(ErrorCode::InvalidSegmentRule, path, message)
}

fn check_name(name: &str, path: &str, code: ErrorCode) -> Result<(), FieldError> {
    if name.trim().is_empty() {
        return Err(FieldError::new(code, path, "must not be empty"));
    }
    crate::limits::reject_nul(name, path)?;
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(FieldError::new(code, path, format!("is longer than {MAX_NAME_CHARS} characters")));
    }
    Ok(())
}

/// Refuses a segment whose rules the evaluator could not apply as the reference engine does.
pub fn validate_segment(segment: &SegmentDefinition) -> Result<(), FieldError> {
    check_name(&segment.name, "name", ErrorCode::InvalidSegmentRule)?;
    if segment.rules.is_empty() {
        return Err(invalid("rules", "a segment needs at least one rule (one with none matches nobody)"));
    }
    let mut conditions = 0;
    for (index, rule) in segment.rules.iter().enumerate() {
        validate_rule(rule, &format!("rules[{index}]"), 1, &mut conditions)?;
    }
    Ok(())
}

fn validate_rule(rule: &SegmentRule, path: &str, depth: usize, conditions: &mut usize) -> Result<(), FieldError> {
    if depth > MAX_RULE_DEPTH {
        return Err(invalid(path, format!("rules nest deeper than {MAX_RULE_DEPTH} levels")));
    }
    for (index, condition) in rule.conditions.iter().enumerate() {
        *conditions += 1;
        if *conditions > MAX_CONDITIONS {
            return Err(invalid(path, format!("a segment holds at most {MAX_CONDITIONS} conditions")));
        }
        validate_condition(condition, &format!("{path}.conditions[{index}]"))?;
    }
    for (index, sub_rule) in rule.rules.iter().enumerate() {
        validate_rule(sub_rule, &format!("{path}.rules[{index}]"), depth + 1, conditions)?;
    }
    Ok(())
}

fn validate_condition(condition: &SegmentCondition, path: &str) -> Result<(), FieldError> {
    validate_property(condition, &format!("{path}.property"))?;
    let value_path = format!("{path}.value");
    if let Some(text) = condition.value.as_str()
        && text.len() > MAX_VALUE_BYTES
    {
        return Err(invalid(&value_path, format!("is longer than {MAX_VALUE_BYTES} bytes")));
    }
    match condition.operator {
        Operator::IsSet | Operator::IsNotSet => Ok(()),
        Operator::In => validate_in_value(&condition.value, &value_path),
        operator => {
            let Some(text) = condition.value.as_str() else {
                return Err(invalid(&value_path, format!("{operator:?} needs a string value")));
            };
            validate_text_value(operator, text, &value_path)
        }
    }
}

fn validate_property(condition: &SegmentCondition, path: &str) -> Result<(), FieldError> {
    let property = condition.property.as_str();
    if property.is_empty() {
        if condition.operator == Operator::PercentageSplit {
            return Ok(());
        }
        return Err(invalid(path, "must name a trait or a context path (only PERCENTAGE_SPLIT may leave it empty)"));
    }
    if property.len() > crate::limits::Limits::default().max_key_bytes {
        return Err(invalid(path, "is longer than a trait key may be"));
    }
    if !property.starts_with("$.") || CONTEXT_PATHS.contains(&property) {
        return Ok(());
    }
    match property.strip_prefix(TRAIT_PATH_PREFIX) {
        Some(name) if is_simple_name(name) => Ok(()),
        _ => Err(invalid(
            path,
            format!(
                "`{property}` is not a supported context path; use a trait key, `{TRAIT_PATH_PREFIX}<name>`, or one of {}",
                CONTEXT_PATHS.join(", ")
            ),
        )),
    }
}

/// A JSONPath member name usable after a dot.
pub fn is_simple_name(name: &str) -> bool {
    let mut characters = name.chars();
    characters.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && characters.all(|character| character.is_ascii_alphanumeric() || character == '_')
}

fn validate_in_value(value: &Value, path: &str) -> Result<(), FieldError> {
    let items = match value {
        Value::Array(items) => items,
        Value::String(text) if text.starts_with('[') => {
            // The reference reads a bracketed string as JSON; refusing what serde cannot read
            // keeps both from splitting it differently.
            match serde_json::from_str::<Value>(text) {
                Ok(Value::Array(items)) => return check_in_items(&items, path),
                _ => return Err(invalid(path, "starts with `[` but is not a JSON array")),
            }
        }
        Value::String(_) => return Ok(()),
        _ => return Err(invalid(path, "IN needs a list or a comma-separated string")),
    };
    check_in_items(items, path)
}

fn check_in_items(items: &[Value], path: &str) -> Result<(), FieldError> {
    for (index, item) in items.iter().enumerate() {
        if !(item.is_string() || item.is_number() || item.is_boolean()) {
            return Err(invalid(&format!("{path}[{index}]"), "IN list items are strings, numbers or booleans"));
        }
    }
    Ok(())
}

fn validate_text_value(operator: Operator, text: &str, path: &str) -> Result<(), FieldError> {
    match operator {
        Operator::Regex => compile_regex(text).map(|_| ()).map_err(|error| invalid(path, error)),
        Operator::Modulo => parse_modulo(text).map(|_| ()).map_err(|error| invalid(path, error)),
        Operator::PercentageSplit => match python_float(text) {
            Some(percentage) if percentage.is_finite() => Ok(()),
            _ => Err(invalid(path, "PERCENTAGE_SPLIT needs a number (the percentage of identities in the segment)")),
        },
        Operator::Equal
        | Operator::NotEqual
        | Operator::GreaterThan
        | Operator::GreaterThanInclusive
        | Operator::LessThan
        | Operator::LessThanInclusive
        | Operator::Contains => match text.strip_suffix(SEMVER_SUFFIX) {
            Some(_) if operator == Operator::Contains => {
                Err(invalid(path, "CONTAINS does not compare versions; drop the `:semver` suffix"))
            }
            Some(version) => parse_semver(version).map(|_| ()).map_err(|error| invalid(path, error)),
            None => Ok(()),
        },
        Operator::NotContains | Operator::In | Operator::IsSet | Operator::IsNotSet => Ok(()),
    }
}

/// A `REGEX` condition's pattern, anchored at the start as Python's `re.match` is.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})"))
        .size_limit(MAX_REGEX_BYTES)
        .build()
        .map_err(|error| format!("is not a valid regular expression: {}", error.to_string().replace('\n', " ")))
}

/// `"divisor|remainder"` of a `MODULO` condition.
pub fn parse_modulo(text: &str) -> Result<(f64, f64), String> {
    let parts: Vec<&str> = text.split('|').collect();
    let [divisor, remainder] = parts.as_slice() else {
        return Err("MODULO needs `divisor|remainder`, e.g. `2|0`".into());
    };
    let (Some(divisor), Some(remainder)) = (python_float(divisor), python_float(remainder)) else {
        return Err("MODULO's divisor and remainder must be numbers".into());
    };
    if !(divisor.is_finite() && remainder.is_finite()) {
        return Err("MODULO's divisor and remainder must be finite".into());
    }
    if divisor == 0.0 {
        return Err("MODULO's divisor must not be 0".into());
    }
    Ok((divisor, remainder))
}

/// A version as `:semver` comparisons read it: strict semantic versioning (`1.2.3-beta.1+build`).
pub fn parse_semver(text: &str) -> Result<semver::Version, String> {
    semver::Version::parse(text).map_err(|error| format!("`{text}` is not a semantic version ({error})"))
}

fn invalid_feature(path: &str, message: impl Into<String>) -> FieldError {
    FieldError::new(ErrorCode::InvalidFeature, path, message)
}

fn check_flag_value(value: &Value, path: &str) -> Result<(), FieldError> {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
        Value::String(text) if text.len() <= MAX_VALUE_BYTES => Ok(()),
        Value::String(_) => Err(invalid_feature(path, format!("is longer than {MAX_VALUE_BYTES} bytes"))),
        _ => Err(invalid_feature(path, "a flag value is a string, number, boolean or null")),
    }
}

/// Refuses a feature whose variants or values cannot be served. Whether each overridden segment
/// exists is checked by the caller, which knows the environment's segments.
pub fn validate_feature(feature: &FeatureDefinition) -> Result<(), FieldError> {
    check_name(&feature.name, "name", ErrorCode::InvalidFeature)?;
    check_flag_value(&feature.value, "value")?;
    let mut total = 0.0;
    for (index, variant) in feature.variants.iter().enumerate() {
        let path = format!("variants[{index}]");
        if variant.key.trim().is_empty() {
            return Err(invalid_feature(&format!("{path}.key"), "must not be empty"));
        }
        if feature.variants[..index].iter().any(|earlier| earlier.key == variant.key) {
            return Err(invalid_feature(&format!("{path}.key"), format!("`{}` is used twice", variant.key)));
        }
        check_flag_value(&variant.value, &format!("{path}.value"))?;
        if !(variant.weight.is_finite() && (0.0..=100.0).contains(&variant.weight)) {
            return Err(invalid_feature(&format!("{path}.weight"), "is a percentage from 0 to 100"));
        }
        total += variant.weight;
    }
    if total > 100.0 {
        return Err(invalid_feature(
            "variants",
            format!("weights add up to {total}; at most 100 (the rest gets the default value)"),
        ));
    }
    for (index, segment_override) in feature.segment_overrides.iter().enumerate() {
        let path = format!("segment_overrides[{index}]");
        check_flag_value(&segment_override.value, &format!("{path}.value"))?;
        if feature.segment_overrides[..index].iter().any(|earlier| earlier.segment_id == segment_override.segment_id) {
            return Err(invalid_feature(&format!("{path}.segment_id"), "overrides the same segment twice"));
        }
    }
    Ok(())
}

/// Refuses an identity override whose value cannot be served.
pub fn validate_identity_override(identity_override: &IdentityOverride) -> Result<(), FieldError> {
    check_flag_value(&identity_override.value, "value")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn segment(rules: Value) -> SegmentDefinition {
        serde_json::from_value(json!({ "name": "s", "rules": rules })).unwrap()
    }

    fn refused_path(rules: Value) -> String {
        validate_segment(&segment(rules)).unwrap_err().path
    }

    #[test]
    fn bad_rules_are_refused_with_their_path() {
        let condition = |operator: &str, value: Value| {
            json!([{ "type": "ALL", "rules": [{ "type": "ANY", "conditions": [
                { "property": "age", "operator": "EQUAL", "value": "1" },
                { "property": "x", "operator": operator, "value": value }] }] }])
        };
        for (operator, value) in [
            ("REGEX", json!("(unclosed")),
            ("REGEX", json!("(?<=look)behind")),
            ("MODULO", json!("0|1")),
            ("MODULO", json!("2")),
            ("MODULO", json!("a|b")),
            ("EQUAL", json!("1.2:semver")),
            ("GREATER_THAN", json!("01.2.3:semver")),
            ("CONTAINS", json!("1.2.3:semver")),
            ("PERCENTAGE_SPLIT", json!("half")),
            ("IN", json!("[1, {\"a\": 1}]")),
            ("IN", json!("[NaN]")),
            ("EQUAL", json!(5)),
        ] {
            let path = refused_path(condition(operator, value.clone()));
            assert!(path.starts_with("rules[0].rules[0].conditions[1].value"), "{operator} {value}: {path}");
        }
        assert!(validate_segment(&segment(json!([]))).is_err());
        assert_eq!(
            refused_path(
                json!([{ "type": "ALL", "conditions": [{ "property": "$.identity.nope", "operator": "IS_SET" }] }])
            ),
            "rules[0].conditions[0].property"
        );
        assert_eq!(
            refused_path(json!([{ "type": "ALL", "conditions": [{ "operator": "EQUAL", "value": "a" }] }])),
            "rules[0].conditions[0].property"
        );
    }

    #[test]
    fn good_rules_pass() {
        let rules = json!([{ "type": "ALL", "conditions": [
            { "property": "app_version", "operator": "GREATER_THAN_INCLUSIVE", "value": "1.2.3-beta.1:semver" },
            { "property": "n", "operator": "MODULO", "value": "2|0" },
            { "property": "email", "operator": "REGEX", "value": ".*@example\\.com" },
            { "property": "plan", "operator": "IN", "value": ["pro", 3, true] },
            { "property": "plan", "operator": "IN", "value": "pro,team" },
            { "operator": "PERCENTAGE_SPLIT", "value": "25.5" },
            { "property": "$.identity.traits.plan", "operator": "IS_SET" },
            { "property": "$.environment.name", "operator": "EQUAL", "value": "production" }] }]);
        validate_segment(&segment(rules)).unwrap();
    }

    #[test]
    fn features_check_weights_and_values() {
        let feature = |body: Value| serde_json::from_value::<FeatureDefinition>(body).unwrap();
        let over = feature(json!({ "name": "f", "variants": [
            { "key": "a", "value": "x", "weight": 60 }, { "key": "b", "value": "y", "weight": 50 }] }));
        assert_eq!(validate_feature(&over).unwrap_err().path, "variants");
        let nested = feature(json!({ "name": "f", "value": { "a": 1 } }));
        assert_eq!(validate_feature(&nested).unwrap_err().path, "value");
        let twice = feature(json!({ "name": "f", "variants": [
            { "key": "a", "value": 1, "weight": 10 }, { "key": "a", "value": 2, "weight": 10 }] }));
        assert_eq!(validate_feature(&twice).unwrap_err().path, "variants[1].key");
        validate_feature(&feature(json!({ "name": "f", "enabled": true, "value": 3,
            "variants": [{ "key": "a", "value": 1, "weight": 100 }] })))
        .unwrap();
    }
}
