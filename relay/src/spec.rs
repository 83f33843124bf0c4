//! The CloudEvents 1.0 (and 0.3) rules for context attributes, checked before the SDK
//! reads an event, so that an event the specification does not allow is rejected, and
//! every rejection names the attribute and what is wrong with it (the SDK's own errors say
//! "premature end of input" or "did not match any variant of untagged enum").
//!
//! Pure functions over the attributes as JSON values; `data` and `data_base64` are not
//! attributes and are not passed in.

use serde_json::{Map, Value};

/// Checks every attribute of an event. The first problem found is the answer.
pub fn check_attributes(attributes: &Map<String, Value>) -> Result<(), String> {
    for (name, value) in attributes {
        check_name(name)?;
        check_value(name, value)?;
    }
    for required in ["specversion", "id", "source", "type"] {
        if !attributes.contains_key(required) {
            return Err(format!("missing attribute {required:?}"));
        }
    }
    Ok(())
}

/// An attribute name: lower-case ASCII letters and digits, at least one.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(
            "an attribute has an empty name; names are lower-case letters and digits".to_owned(),
        );
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
    {
        None => Ok(()),
        Some(c) => Err(format!(
            "attribute name {name:?} has {}; names are lower-case letters (a-z) and digits (0-9)",
            describe(c)
        )),
    }
}

fn check_value(name: &str, value: &Value) -> Result<(), String> {
    let string = || {
        value.as_str().ok_or_else(|| {
            format!(
                "attribute {name:?} must be a string, not {}",
                pigeon_shared::json::kind(value)
            )
        })
    };
    match name {
        "specversion" => {
            let v = string()?;
            if v != "1.0" && v != "0.3" {
                return Err(format!(
                    "attribute \"specversion\" is {v:?}; this relay reads 1.0 and 0.3"
                ));
            }
        }
        // They identify the event: control characters in them are refused. (The spec's
        // String excludes them everywhere, but in `subject` and extension values they are
        // kept, escaped in the JSON: the CloudEvents conformance events have a line
        // break in an extension value.)
        "id" | "type" => {
            let v = string()?;
            if v.is_empty() {
                return Err(format!("attribute {name:?} must not be empty"));
            }
            if let Some(c) = v.chars().find(|c| c.is_control()) {
                return Err(format!(
                    "attribute {name:?} has {}; it must be text without control characters",
                    describe(c)
                ));
            }
        }
        "source" => {
            let v = string()?;
            if v.is_empty() {
                return Err("attribute \"source\" must not be empty".to_owned());
            }
            check_uri_reference(v).map_err(|e| {
                format!("attribute \"source\" {v:?} is not a URI-reference (RFC 3986): {e}")
            })?;
        }
        "dataschema" | "schemaurl" => {
            let v = string()?;
            check_uri_reference(v)
                .and_then(|()| check_absolute(v))
                .map_err(|e| format!("attribute {name:?} {v:?} is not a URI (RFC 3986): {e}"))?;
        }
        "datacontenttype" => {
            let v = string()?;
            check_media_type(v).map_err(|e| {
                format!("attribute \"datacontenttype\" {v:?} is not a media type (RFC 2046): {e}")
            })?;
        }
        "subject" => {
            if string()?.is_empty() {
                return Err("attribute \"subject\" must not be empty".to_owned());
            }
        }
        "time" => {
            let v = string()?;
            chrono::DateTime::parse_from_rfc3339(v).map_err(|e| {
                format!("attribute \"time\" {v:?} is not an RFC 3339 timestamp: {e}")
            })?;
        }
        "datacontentencoding" => {
            if string()? != "base64" {
                return Err("attribute \"datacontentencoding\" (0.3) must be \"base64\"".to_owned());
            }
        }
        _ => check_extension_value(name, value)?,
    }
    Ok(())
}

/// Extension values: a string, a boolean, or an integer of the spec's 32-bit range.
fn check_extension_value(name: &str, value: &Value) -> Result<(), String> {
    match value {
        Value::String(_) | Value::Bool(_) => Ok(()),
        Value::Number(n) => match n.as_i64() {
            Some(i) if i32::try_from(i).is_ok() => Ok(()),
            _ => Err(format!(
                "extension attribute {name:?} is the number {n}; numbers must be integers from -2147483648 to 2147483647 (send others as strings)"
            )),
        },
        other => Err(format!(
            "extension attribute {name:?} must be a string, a boolean or an integer, not {}",
            pigeon_shared::json::kind(other)
        )),
    }
}

fn describe(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        '\n' | '\r' => "a line break".to_owned(),
        c if c.is_control() => format!("the control character {c:?}"),
        c => format!("the character {c:?}"),
    }
}

/// RFC 3986 `URI-reference`: only the characters it allows, and `%` followed by two hex
/// digits.
pub fn check_uri_reference(s: &str) -> Result<(), String> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
            if hex.len() != 2 || !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(format!(
                    "'%' at character {} is not followed by two hex digits",
                    i + 1
                ));
            }
            i += 3;
            continue;
        }
        let allowed = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?#[]".contains(&b);
        if !allowed {
            let c = s[i..].chars().next().unwrap_or('?');
            return Err(format!("{} at character {}", describe(c), i + 1));
        }
        i += 1;
    }
    if s.bytes().filter(|&b| b == b'#').count() > 1 {
        return Err("it has more than one '#'".to_owned());
    }
    Ok(())
}

/// A URI (not a relative reference): a scheme, then `:`.
fn check_absolute(s: &str) -> Result<(), String> {
    let scheme = s.split(':').next().unwrap_or("");
    let ok = s.contains(':')
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err("it has no scheme (such as https:)".to_owned())
    }
}

/// RFC 2046 / RFC 9110 media type: `type/subtype` of tokens, then `; name=value`
/// parameters whose value is a token or a quoted string.
pub fn check_media_type(s: &str) -> Result<(), String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let token = |t: &str| !t.is_empty() && t.chars().all(tchar);
    let mut parts = s.splitn(2, ';');
    let essence = parts.next().unwrap_or("").trim();
    let Some((ty, sub)) = essence.split_once('/') else {
        return Err("it has no '/' between type and subtype".to_owned());
    };
    if !token(ty) || !token(sub) {
        return Err(
            "type and subtype must be tokens (letters, digits, !#$%&'*+-.^_`|~)".to_owned(),
        );
    }
    let mut rest = parts.next().unwrap_or("");
    while !rest.trim().is_empty() {
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("parameter {:?} has no '='", rest.trim()))?;
        let name = name.trim_start();
        if !token(name) {
            return Err(format!("parameter name {name:?} is not a token"));
        }
        let next = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted
                .char_indices()
                .scan(false, |escaped, (i, c)| {
                    let end = !*escaped && c == '"';
                    *escaped = !*escaped && c == '\\';
                    Some((i, end))
                })
                .find(|&(_, end)| end)
                .map(|(i, _)| i)
                .ok_or_else(|| format!("parameter {name:?} has an unterminated quoted value"))?;
            &quoted[end + 1..]
        } else {
            let end = after.find(';').unwrap_or(after.len());
            let value = after[..end].trim_end();
            if !token(value) {
                return Err(format!(
                    "parameter {name:?} has the value {value:?}, not a token"
                ));
            }
            &after[end..]
        };
        let next = next.trim_start();
        rest = match next.strip_prefix(';') {
            Some(r) => r,
            None if next.is_empty() => "",
            None => return Err(format!("unexpected {next:?} after parameter {name:?}")),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(extra: Value) -> Map<String, Value> {
        let mut m = json!({
            "specversion": "1.0", "id": "e-1", "source": "/gateways/pi-1/mqtt", "type": "t"
        })
        .as_object()
        .unwrap()
        .clone();
        for (k, v) in extra.as_object().unwrap() {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    #[test]
    fn valid_events_pass() {
        check_attributes(&attrs(json!({
            "subject": "org/a", "time": "2026-12-07T10:00:00.5+01:00",
            "datacontenttype": "application/ld+json; charset=\"utf-8\"; q=1",
            "dataschema": "https://example.com/s.json#v1",
            "ext1": "x", "flag": true, "n": -2147483648_i64, "comexampleextension2": "{\"othervalue\": 5}\n",
        })))
        .unwrap();
        check_attributes(&attrs(json!({"source": "//github.com/cloudevents/conformance/yaml/v3.yaml", "specversion": "0.3", "datacontentencoding": "base64"})))
            .unwrap();
    }

    /// Issue 24.3: each of these was stored before; each is now rejected with a reason
    /// that names the attribute and what is wrong.
    #[test]
    fn issue_24_attributes_against_the_spec_are_rejected_by_name() {
        for (extra, reason) in [
            (
                json!({"Ext": "x"}),
                "attribute name \"Ext\" has the character 'E'",
            ),
            (
                json!({"my-ext": "x"}),
                "attribute name \"my-ext\" has the character '-'",
            ),
            (json!({"": "x"}), "an attribute has an empty name"),
            (json!({"id": ""}), "attribute \"id\" must not be empty"),
            (json!({"type": ""}), "attribute \"type\" must not be empty"),
            (json!({"id": "a\nb"}), "attribute \"id\" has a line break"),
            (
                json!({"id": "a\u{1b}b"}),
                "attribute \"id\" has the control character '\\u{1b}'",
            ),
            (
                json!({"id": 7}),
                "attribute \"id\" must be a string, not a number",
            ),
            (
                json!({"source": "/gateways/pi-1/my mqtt"}),
                "is not a URI-reference (RFC 3986): a space at character 18",
            ),
            (
                json!({"source": "/gateways/pi-1\n/mqtt"}),
                "a line break at character 15",
            ),
            (
                json!({"source": "/g/%zz"}),
                "'%' at character 4 is not followed by two hex digits",
            ),
            (
                json!({"datacontenttype": "json"}),
                "is not a media type (RFC 2046): it has no '/'",
            ),
            (
                json!({"datacontenttype": "text/plain; charset"}),
                "parameter \"charset\" has no '='",
            ),
            (json!({"datacontenttype": "text/pl ain"}), "must be tokens"),
            (
                json!({"dataschema": "s.json"}),
                "attribute \"dataschema\" \"s.json\" is not a URI (RFC 3986): it has no scheme",
            ),
            (
                json!({"time": "yesterday"}),
                "attribute \"time\" \"yesterday\" is not an RFC 3339 timestamp",
            ),
            (
                json!({"ext": 1.5}),
                "extension attribute \"ext\" is the number 1.5",
            ),
            (
                json!({"ext": 4294967296_i64}),
                "numbers must be integers from -2147483648",
            ),
            (
                json!({"ext": {"a": 1}}),
                "extension attribute \"ext\" must be a string, a boolean or an integer, not an object",
            ),
            (json!({"ext": null}), "not null"),
            (
                json!({"subject": ""}),
                "attribute \"subject\" must not be empty",
            ),
            (
                json!({"specversion": "2.0"}),
                "attribute \"specversion\" is \"2.0\"",
            ),
        ] {
            let e = check_attributes(&attrs(extra.clone())).unwrap_err();
            assert!(e.contains(reason), "{extra}: {e}");
        }
        let mut m = attrs(json!({}));
        m.remove("type");
        assert_eq!(
            check_attributes(&m).unwrap_err(),
            "missing attribute \"type\""
        );
    }
}
