//! JSON kept as its sender wrote it.
//!
//! An event's `data` is the sender's document: parsing it into a tree and writing it out
//! again would round numbers that do not fit an `f64` (`12345678901234567890123` becomes
//! `1.2345678901234568e22`) and collapse duplicate keys. Both sides therefore carry `data`
//! as text: they check that it is JSON, and splice it into the event's JSON unchanged but
//! for the whitespace between tokens ([`compact`]), which a line of JSON cannot hold.

use std::borrow::Cow;

use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// What kind of JSON value `v` is, for messages ("a string", "an object", "null").
pub fn kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `text` without the whitespace between JSON tokens; everything else (numbers, string
/// escapes, key order, duplicate keys) byte for byte. `text` must be valid JSON.
///
/// ```
/// use pigeon_shared::json::compact;
/// assert_eq!(compact("{ \"a\" : [1.50, \"x y\"] }\n"), "{\"a\":[1.50,\"x y\"]}");
/// ```
pub fn compact(text: &str) -> Cow<'_, str> {
    let is_ws = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    if !text.bytes().any(is_ws) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !(c.is_ascii() && is_ws(c as u8)) {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The members of the JSON object `text`, in order, each value as its text. Duplicate
/// names are all kept (a caller decides whether that is an error).
///
/// Errors if `text` is not one JSON object (with nothing after it but whitespace).
pub fn members(text: &str) -> Result<Vec<(Cow<'_, str>, &RawValue)>, serde_json::Error> {
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(map.size_hint().unwrap_or(12));
            while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                out.push((name, map.next_value::<&'de RawValue>()?));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let out = (&mut de).deserialize_map(Members)?;
    de.end()?;
    Ok(out)
}

/// Adds `"name":value` as the last member of `object`, the text of a JSON object (as
/// `serde_json` writes one: ending in `}`); `value` is JSON text, written as it is.
///
/// ```
/// let mut o = b"{\"id\":\"1\"}".to_vec();
/// pigeon_shared::json::push_member(&mut o, "data", "[1,2]");
/// assert_eq!(o, b"{\"id\":\"1\",\"data\":[1,2]}");
/// ```
pub fn push_member(object: &mut Vec<u8>, name: &str, value: &str) {
    let close = object.pop();
    debug_assert_eq!(close, Some(b'}'), "not a JSON object");
    if object.len() > 1 {
        object.push(b',');
    }
    object.push(b'"');
    object.extend_from_slice(name.as_bytes());
    object.extend_from_slice(b"\":");
    object.extend_from_slice(value.as_bytes());
    object.push(b'}');
}

/// A JSON value kept as its text, for a document that is read where it is used and never
/// parsed into a tree and written again (an upload's event). Compared by its text.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Text(Box<RawValue>);

impl Text {
    /// The JSON text, as received.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    pub fn raw(&self) -> &RawValue {
        &self.0
    }

    /// Checks that `text` is JSON and keeps it as it is.
    pub fn from_string(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(Self)
    }

    /// `value` written as JSON text.
    pub fn from_value(value: &serde_json::Value) -> Self {
        Self(serde_json::value::to_raw_value(value).expect("a Value always serializes"))
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Text {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_everything_but_whitespace_between_tokens() {
        let text = "{\n  \"big\": 12345678901234567890123,\n  \"dec\": 0.12345678901234567890,\n  \"k\": 1,\n  \"k\": 2,\n  \"s\": \"a \\\" b\\\\\",\n  \"t\": \"tab\\t and  é\"\n}\n";
        let c = compact(text);
        assert_eq!(
            c,
            "{\"big\":12345678901234567890123,\"dec\":0.12345678901234567890,\"k\":1,\"k\":2,\"s\":\"a \\\" b\\\\\",\"t\":\"tab\\t and  é\"}"
        );
        // Still the same document.
        let a: serde_json::Value = serde_json::from_str(text).unwrap();
        let b: serde_json::Value = serde_json::from_str(&c).unwrap();
        assert_eq!(a, b);
        assert!(matches!(compact("[1,2]"), Cow::Borrowed(_)));
    }

    #[test]
    fn members_keep_order_duplicates_and_raw_values() {
        let m = members(" {\"b\": 1.10, \"a\": {\"x\" : 1}, \"b\": null} ").unwrap();
        let got: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_ref(), v.get())).collect();
        assert_eq!(got, [("b", "1.10"), ("a", "{\"x\" : 1}"), ("b", "null")]);
        // Escaped names are unescaped.
        let m = members(r#"{"d\u0061ta": 1}"#).unwrap();
        assert_eq!(m[0].0, "data");
        for bad in ["[1]", "1", "{\"a\":1} x", "{\"a\":", ""] {
            assert!(members(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn push_member_into_empty_and_full_objects() {
        let mut o = b"{}".to_vec();
        push_member(&mut o, "data", "1");
        assert_eq!(o, b"{\"data\":1}");
        push_member(&mut o, "x", "\"y\"");
        assert_eq!(o, b"{\"data\":1,\"x\":\"y\"}");
    }
}
