//! Control characters escaped, so that text that came from outside (a camera's file name,
//! an MQTT topic, a header value, an error message holding one of them) cannot forge a
//! log line or a line of `status` with a newline, nor steer a terminal with an escape
//! sequence (issue 24).
//!
//! Only control characters (C0, DEL, C1) and the Unicode line and paragraph separators
//! change, into the escapes Rust's `{:?}` uses (`\n`, `\r`, `\t`, `\u{1b}`); everything
//! else, backslashes and quotes included, stays as it is. So `{:?}` output, already
//! escaped, passes through unchanged, and a plain sentence reads as before.

use std::borrow::Cow;
use std::fmt::{self, Write};

/// Whether `c` is escaped.
fn escaped(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `s` with its control characters escaped (borrowed when there is none).
pub fn controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(escaped) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    let _ = Escaping(&mut out).write_str(s);
    Cow::Owned(out)
}

/// A [`fmt::Write`] that passes text on to the inner one with its control characters
/// escaped: `write!(Escaping(w), "{}", anything)` escapes without an extra `String`.
pub struct Escaping<W>(pub W);

impl<W: Write> Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(escaped) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            for e in c.escape_debug() {
                self.0.write_char(e)?;
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Writes one field of a log line the way `tracing-subscriber`'s default formatter does
/// — the message as it is, any other field as `name=value` (`r#type` as `type=`), the
/// value as its `Debug` (a `%` field's `Debug` is its `Display`) — with control
/// characters escaped. Both binaries format their log fields with it, so that a name
/// logged with `%`, or an error message holding one, stays on its line.
pub fn log_field(w: &mut impl Write, name: &str, value: &dyn fmt::Debug) -> fmt::Result {
    if name != "message" {
        w.write_str(name.strip_prefix("r#").unwrap_or(name))?;
        w.write_char('=')?;
    }
    write!(Escaping(w), "{value:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_24_controls_are_escaped_and_nothing_else() {
        assert!(matches!(
            controls("cam 1/ü \\n \"x\".jpg"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            controls("a\nINFO forged\r\x1b[31m\t\0\u{7f}\u{85}\u{2028}.jpg"),
            "a\\nINFO forged\\r\\u{1b}[31m\\t\\0\\u{7f}\\u{85}\\u{2028}.jpg"
        );
        // Debug output, already escaped, is left alone.
        let debug = format!("{:?}", "a\nb\\c\"");
        assert_eq!(controls(&debug), debug);
    }

    #[test]
    fn issue_24_log_fields_stay_on_one_line() {
        let field = |name: &str, value: &dyn fmt::Debug| {
            let mut s = String::new();
            log_field(&mut s, name, value).unwrap();
            s
        };
        let name = "a\nINFO forged line.jpg";
        // `%name`: Display, unquoted, escaped.
        let display = tracing_display(name);
        assert_eq!(field("file", &display), "file=a\\nINFO forged line.jpg");
        // `?name`: Debug, as before.
        assert_eq!(field("file", &name), "file=\"a\\nINFO forged line.jpg\"");
        assert_eq!(
            field("message", &format_args!("Picked up {name}.")),
            "Picked up a\\nINFO forged line.jpg."
        );
        assert_eq!(field("r#type", &display), "type=a\\nINFO forged line.jpg");
    }

    /// What `tracing`'s `%value` hands a formatter: a `Debug` that writes the `Display`.
    fn tracing_display(s: &str) -> impl fmt::Debug + '_ {
        struct D<'a>(&'a str);
        impl fmt::Debug for D<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        D(s)
    }
}
