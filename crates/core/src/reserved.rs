//! Reserved traits (the CDP identify spec): typed, and partly derived. A reserved trait with the
//! wrong type is refused with its path; `name` is filled from `first_name`/`last_name`; `email`
//! also becomes an identifier, normalised here.

use serde_json::{Map, Value};

use crate::error::{ErrorCode, FieldError, join_path};

/// The expected shape of one reserved trait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    String,
    Number,
    /// `YYYY-MM-DD` or an RFC 3339 timestamp.
    Date,
    Object(&'static [(&'static str, Expected)]),
    StringOrNumber,
}

const ADDRESS: &[(&str, Expected)] = &[
    ("city", Expected::String),
    ("country", Expected::String),
    ("postal_code", Expected::String),
    ("state", Expected::String),
    ("street", Expected::String),
];

const COMPANY: &[(&str, Expected)] = &[
    ("name", Expected::String),
    ("id", Expected::StringOrNumber),
    ("industry", Expected::String),
    ("employee_count", Expected::Number),
    ("plan", Expected::String),
];

const RESERVED: &[(&str, Expected)] = &[
    ("address", Expected::Object(ADDRESS)),
    ("age", Expected::Number),
    ("avatar", Expected::String),
    ("birthday", Expected::Date),
    ("company", Expected::Object(COMPANY)),
    ("description", Expected::String),
    ("email", Expected::String),
    ("first_name", Expected::String),
    ("gender", Expected::String),
    ("last_name", Expected::String),
    ("name", Expected::String),
    ("phone", Expected::String),
    ("title", Expected::String),
    ("username", Expected::String),
    ("website", Expected::String),
];

/// Checks the reserved traits of a patch. `null` (delete) is always allowed; other keys of
/// `address`/`company` objects are free.
pub fn validate_reserved_traits(patch: &Map<String, Value>, path: &str) -> Result<(), FieldError> {
    for (key, expected) in RESERVED {
        if let Some(value) = patch.get(*key) {
            check(value, *expected, &join_path(path, key))?;
        }
    }
    Ok(())
}

fn check(value: &Value, expected: Expected, path: &str) -> Result<(), FieldError> {
    let fits = match (expected, value) {
        (_, Value::Null) => true,
        (Expected::String, Value::String(_)) | (Expected::Number, Value::Number(_)) => true,
        (Expected::StringOrNumber, Value::String(_) | Value::Number(_)) => true,
        (Expected::Date, Value::String(text)) => is_date(text),
        (Expected::Object(fields), Value::Object(object)) => {
            for (field, field_expected) in fields {
                if let Some(field_value) = object.get(*field) {
                    check(field_value, *field_expected, &join_path(path, field))?;
                }
            }
            true
        }
        _ => false,
    };
    if fits {
        return Ok(());
    }
    let wanted = match expected {
        Expected::String => "a string",
        Expected::Number => "a number",
        Expected::Date => "a date (YYYY-MM-DD or an RFC 3339 timestamp)",
        Expected::Object(_) => "an object",
        Expected::StringOrNumber => "a string or a number",
    };
    Err(FieldError::new(ErrorCode::InvalidReservedTrait, path, format!("is a reserved trait and must be {wanted}")))
}

fn is_date(text: &str) -> bool {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, &format).is_ok()
        || time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).is_ok()
}

/// The full name from first and last name, when at least one is a non-empty string.
pub fn full_name(first_name: Option<&Value>, last_name: Option<&Value>) -> Option<String> {
    match (name_part(first_name), name_part(last_name)) {
        (Some(first), Some(last)) => Some(format!("{first} {last}")),
        (Some(only), None) | (None, Some(only)) => Some(only.to_owned()),
        (None, None) => None,
    }
}

fn name_part(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).map(str::trim).filter(|part| !part.is_empty())
}

/// The identifier form of an email: trimmed, domain lower-cased (the local part is kept: some
/// providers treat it as case-sensitive). `None` when it is not an address.
pub fn normalize_email(email: &str) -> Option<String> {
    let email = email.trim();
    let (local, domain) = email.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains(char::is_whitespace) {
        return None;
    }
    Some(format!("{local}@{}", domain.to_lowercase()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn patch(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn reserved_traits_must_have_their_type() {
        let ok = json!({ "age": 41, "birthday": "1985-04-12", "address": { "city": "Paris", "floor": 3 },
                         "company": { "id": 7, "name": "Acme", "employee_count": 12 }, "name": null, "custom": [1] });
        assert!(validate_reserved_traits(&patch(ok), "traits").is_ok());
        for (bad, path) in [
            (json!({ "age": "41" }), "traits.age"),
            (json!({ "birthday": "12/04/1985" }), "traits.birthday"),
            (json!({ "address": "1 rue de Rivoli" }), "traits.address"),
            (json!({ "company": { "employee_count": "many" } }), "traits.company.employee_count"),
            (json!({ "email": 5 }), "traits.email"),
        ] {
            let error = validate_reserved_traits(&patch(bad), "traits").unwrap_err();
            assert_eq!((error.code, error.path.as_str()), (ErrorCode::InvalidReservedTrait, path));
        }
        assert!(validate_reserved_traits(&patch(json!({ "birthday": "1985-04-12T00:00:00Z" })), "traits").is_ok());
    }

    #[test]
    fn full_name_joins_the_parts_present() {
        assert_eq!(full_name(Some(&json!("Ada")), Some(&json!("Lovelace"))).as_deref(), Some("Ada Lovelace"));
        assert_eq!(full_name(Some(&json!("Ada")), None).as_deref(), Some("Ada"));
        assert_eq!(full_name(Some(&json!(" ")), Some(&json!(3))), None);
    }

    #[test]
    fn emails_are_trimmed_with_lower_case_domains() {
        assert_eq!(normalize_email("  Ada.L@Example.COM ").as_deref(), Some("Ada.L@example.com"));
        assert_eq!(normalize_email("not-an-email"), None);
        assert_eq!(normalize_email("@example.com"), None);
    }
}
