//! The few pieces of Python's number and string conversion the reference flag engine's results
//! depend on: which trait strings count as numbers, how `int()` and `float()` read a condition
//! value, and how `str()` prints a value before it is hashed, matched by a regex or looked up in
//! an `IN` list. Written out so Roster's evaluator gives the reference's answers exactly.

/// A value as the reference engine sees it after its type mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextValue<'a> {
    Text(std::borrow::Cow<'a, str>),
    /// Saturated to `i128`: integers beyond ±1.7e38 compare as the nearest bound.
    Integer(i128),
    Float(f64),
    Boolean(bool),
}

impl<'a> ContextValue<'a> {
    /// The mapping of a JSON trait value: numeric strings become numbers (`"42"` → 42,
    /// `"1.5"` → 1.5, by the reference's two patterns), nested values their JSON text,
    /// `null` nothing.
    pub fn from_json(value: &'a serde_json::Value) -> Option<ContextValue<'a>> {
        match value {
            serde_json::Value::Null => None,
            serde_json::Value::Bool(flag) => Some(ContextValue::Boolean(*flag)),
            serde_json::Value::Number(number) => Some(match (number.as_i64(), number.as_u64()) {
                (Some(integer), _) => ContextValue::Integer(i128::from(integer)),
                (None, Some(integer)) => ContextValue::Integer(i128::from(integer)),
                (None, None) => ContextValue::Float(number.as_f64().unwrap_or(f64::NAN)),
            }),
            serde_json::Value::String(text) => Some(ContextValue::from_text(text)),
            nested => Some(ContextValue::Text(std::borrow::Cow::Owned(nested.to_string()))),
        }
    }

    /// A string through the reference's mapping: `-?[0-9]+` is an integer, `-?[0-9]+\.[0-9]+`
    /// a float, anything else stays text.
    pub fn from_text(text: &'a str) -> ContextValue<'a> {
        let digits = text.strip_prefix('-').unwrap_or(text);
        // Both number patterns start with a digit: most text is rejected at its first byte.
        if !digits.bytes().next().is_some_and(|byte| byte.is_ascii_digit()) {
            return ContextValue::Text(std::borrow::Cow::Borrowed(text));
        }
        let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
        if all_digits(digits) {
            return ContextValue::Integer(parse_saturating(text));
        }
        if let Some((whole, fraction)) = digits.split_once('.')
            && all_digits(whole)
            && all_digits(fraction)
            && let Ok(float) = text.parse::<f64>()
        {
            return ContextValue::Float(float);
        }
        ContextValue::Text(std::borrow::Cow::Borrowed(text))
    }

    /// Python's `str()` of the value.
    pub fn python_str(&self) -> std::borrow::Cow<'_, str> {
        match self {
            ContextValue::Text(text) => std::borrow::Cow::Borrowed(text.as_ref()),
            ContextValue::Integer(integer) => std::borrow::Cow::Owned(integer.to_string()),
            ContextValue::Float(float) => std::borrow::Cow::Owned(float_repr(*float)),
            ContextValue::Boolean(true) => std::borrow::Cow::Borrowed("True"),
            ContextValue::Boolean(false) => std::borrow::Cow::Borrowed("False"),
        }
    }
}

/// `-?[0-9]+` as an integer, saturating at the bounds of `i128`.
fn parse_saturating(text: &str) -> i128 {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let mut value: i128 = 0;
    for digit in digits.bytes().filter(u8::is_ascii_digit) {
        let digit = i128::from(digit - b'0');
        value = match value
            .checked_mul(10)
            .and_then(|shifted| if negative { shifted.checked_sub(digit) } else { shifted.checked_add(digit) })
        {
            Some(next) => next,
            None => return if negative { i128::MIN } else { i128::MAX },
        };
    }
    value
}

/// Python's `str.strip()` white space (what `int()` and `float()` ignore around a number).
fn strip_python_whitespace(text: &str) -> &str {
    text.trim_matches(|character: char| character.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&character))
}

/// Removes the underscores Python allows between digits; `None` when one is misplaced.
fn without_digit_underscores(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !text.contains('_') {
        return Some(std::borrow::Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    for (index, byte) in bytes.iter().enumerate() {
        if *byte == b'_' {
            let before = index.checked_sub(1).and_then(|previous| bytes.get(previous));
            let after = bytes.get(index + 1);
            if !(before.is_some_and(u8::is_ascii_digit) && after.is_some_and(u8::is_ascii_digit)) {
                return None;
            }
        }
    }
    Some(std::borrow::Cow::Owned(text.replace('_', "")))
}

/// Python's `int(text)` for a string (base 10), saturating at the bounds of `i128`.
pub fn python_int(text: &str) -> Option<i128> {
    let stripped = strip_python_whitespace(text);
    let cleaned = without_digit_underscores(stripped)?;
    let digits = cleaned.strip_prefix(['-', '+']).unwrap_or(&cleaned);
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(parse_saturating(&cleaned))
}

/// Python's `float(text)` for a string.
pub fn python_float(text: &str) -> Option<f64> {
    let stripped = strip_python_whitespace(text);
    let cleaned = without_digit_underscores(stripped)?;
    let unsigned = cleaned.strip_prefix(['-', '+']).unwrap_or(&cleaned);
    let special = ["inf", "infinity", "nan"].iter().any(|name| unsigned.eq_ignore_ascii_case(name));
    // Rust also reads forms Python refuses (none known) and refuses none Python reads, once
    // underscores and white space are handled; the specials are case-insensitive in both.
    if !special
        && !unsigned.bytes().all(|byte| byte.is_ascii_digit() || matches!(byte, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return None;
    }
    cleaned.parse::<f64>().ok()
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation for decimal
/// exponents from -4 to 15 and scientific notation (`1e+16`, `1.5e-05`) outside.
pub fn float_repr(value: f64) -> String {
    if value.is_nan() {
        return "nan".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let sign = if value.is_sign_negative() { "-" } else { "" };
    if value == 0.0 {
        return format!("{sign}0.0");
    }
    let scientific = format!("{:e}", value.abs());
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1;
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (whole, fraction) = digits.split_at(point as usize);
            format!("{whole}.{fraction}")
        };
        return format!("{sign}{text}");
    }
    let (first, rest) = digits.split_at(1);
    let mantissa = if rest.is_empty() { first.to_owned() } else { format!("{first}.{rest}") };
    let exponent_sign = if exponent < 0 { '-' } else { '+' };
    format!("{sign}{mantissa}e{exponent_sign}{:02}", exponent.unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (value, expected) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (123456.0, "123456.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.234e-7, "1.234e-07"),
            (-0.0, "-0.0"),
            (f64::INFINITY, "inf"),
            (1e300, "1e+300"),
            (33.333333333333336, "33.333333333333336"),
        ] {
            assert_eq!(float_repr(value), expected, "{value}");
        }
    }

    #[test]
    fn int_and_float_parse_like_python() {
        assert_eq!(python_int(" 42 "), Some(42));
        assert_eq!(python_int("-1_000"), Some(-1000));
        assert_eq!(python_int("+7"), Some(7));
        assert_eq!(python_int("1__0"), None);
        assert_eq!(python_int("1.5"), None);
        assert_eq!(python_int(""), None);
        assert_eq!(python_int("99999999999999999999999999999999999999999"), Some(i128::MAX));
        assert_eq!(python_float("1e3"), Some(1000.0));
        assert_eq!(python_float(" .5"), Some(0.5));
        assert_eq!(python_float("1_0.5"), Some(10.5));
        assert!(python_float("-Infinity").is_some_and(f64::is_infinite));
        assert_eq!(python_float("0x10"), None);
        assert_eq!(python_float("abc"), None);
    }

    #[test]
    fn strings_map_to_numbers_by_the_reference_patterns() {
        assert_eq!(ContextValue::from_text("42"), ContextValue::Integer(42));
        assert_eq!(ContextValue::from_text("-7"), ContextValue::Integer(-7));
        assert_eq!(ContextValue::from_text("1.50"), ContextValue::Float(1.5));
        assert!(matches!(ContextValue::from_text("1."), ContextValue::Text(_)));
        assert!(matches!(ContextValue::from_text("+1"), ContextValue::Text(_)));
        assert!(matches!(ContextValue::from_text("1e5"), ContextValue::Text(_)));
        assert!(matches!(ContextValue::from_text("1.2.3"), ContextValue::Text(_)));
        assert_eq!(ContextValue::from_text("1.50").python_str(), "1.5");
    }
}
