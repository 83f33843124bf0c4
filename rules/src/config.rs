//! `[[rules]]` as written in the gateway's config, and its check into a [`Rule`].
//!
//! ```toml
//! [[rules]]
//! name = "hvac-drift"
//! filter = "subject LIKE 'org/contoso/site/berlin/%/hvac/%'"
//! value = "/temp"
//! window = { size = "5m" }             # tumbling; add hop = "1m" for hopping
//! when = "abs(avg - 21.0) > 2"
//! type = "io.pigeon.rule.hvac-drift"
//! priority = 8
//! ```
//!
//! Exactly one of `threshold`, `window`, `exception` and `absence` says the kind.

use pigeon_cesql::Expression;
use pigeon_shared::units::Duration;
use serde::Deserialize;

use crate::condition::Condition;
use crate::exception::Exception;
use crate::threshold::{Direction, Threshold};
use crate::window::{FIGURES, Windowing};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// CESQL over the reading's attributes; every reading when absent.
    #[serde(default)]
    pub filter: Option<String>,
    /// A JSON pointer to the number in the reading's data (`/temp`).
    #[serde(default)]
    pub value: Option<String>,
    /// What one state is kept per: `"subject"` (default), `"source"`, `"type"`,
    /// `"attribute:<name>"` or `"segment:<n>"` (the n-th `/`-separated segment of the
    /// subject, from 1).
    #[serde(default)]
    pub group_by: Option<String>,
    /// `"arrival"` (default) or a JSON pointer to an RFC 3339 time or epoch
    /// milliseconds in the data.
    #[serde(default)]
    pub time: Option<String>,
    /// How long after a window's end readings of it are still counted.
    #[serde(default)]
    pub allowed_lateness: Option<Duration>,
    #[serde(default)]
    pub threshold: Option<ThresholdConfig>,
    #[serde(default)]
    pub window: Option<WindowConfig>,
    #[serde(default)]
    pub when: Option<String>,
    #[serde(default)]
    pub exception: Option<ExceptionConfig>,
    #[serde(default)]
    pub absence: Option<AbsenceConfig>,
    /// The derived events' CloudEvents type (default `io.pigeon.rule.<name>`).
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    /// The derived events' priority, 0–9 (default 9: alarms go first).
    #[serde(default)]
    pub priority: Option<u8>,
    /// Whether the readings the rule consumes are kept from the relay (default false).
    #[serde(default)]
    pub suppress: bool,
    /// At most this many groups; past it the least recently updated is dropped.
    #[serde(default)]
    pub max_groups: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdConfig {
    #[serde(default)]
    pub above: Option<f64>,
    #[serde(default)]
    pub clear_below: Option<f64>,
    #[serde(default)]
    pub below: Option<f64>,
    #[serde(default)]
    pub clear_above: Option<f64>,
    #[serde(default, rename = "for")]
    pub for_: Option<Duration>,
    #[serde(default)]
    pub count: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub size: Duration,
    #[serde(default)]
    pub hop: Option<Duration>,
    #[serde(default)]
    pub sliding: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExceptionConfig {
    pub deadband: f64,
    #[serde(default)]
    pub max_interval: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbsenceConfig {
    pub after: Duration,
}

/// What a rule keeps one state per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Subject,
    Source,
    Type,
    Attribute(String),
    /// The n-th segment of the subject (0-based here).
    Segment(usize),
}

/// Where a reading's time comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeSource {
    Arrival,
    Data(String),
}

/// What a rule does.
#[derive(Debug, Clone)]
pub enum Kind {
    Threshold(Threshold),
    Window {
        windowing: Windowing,
        when: Option<Condition>,
    },
    Exception(Exception),
    Absence {
        after_ms: i64,
    },
}

/// A checked rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub filter: Option<Expression>,
    pub value: Option<String>,
    pub group_by: GroupBy,
    pub time: TimeSource,
    pub allowed_lateness_ms: i64,
    pub kind: Kind,
    pub event_type: String,
    pub priority: u8,
    pub suppress: bool,
    pub max_groups: usize,
    /// A digest of what the groups' states depend on (value, grouping, time, kind and
    /// its settings, condition): saved states of a rule whose fingerprint changed are
    /// not restored. The filter, type, priority and suppression are left out: changing
    /// them keeps the states.
    pub fingerprint: String,
}

impl Rule {
    /// Whether the rule acts on the clock alone (windows that close, groups that go
    /// silent), so that [`crate::Engine::tick`] has something to do for it.
    pub fn ticks(&self) -> bool {
        matches!(self.kind, Kind::Window { .. } | Kind::Absence { .. })
    }
}

/// The default cap on a rule's groups.
pub const DEFAULT_MAX_GROUPS: usize = 10_000;

/// A rule that cannot run, and why: the message names the rule and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule:?}: {message}")]
pub struct RuleError {
    pub rule: String,
    pub message: String,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.get().as_millis()).unwrap_or(i64::MAX)
}

impl RuleConfig {
    /// Checks the rule: every key that is wrong is named, with the CESQL or condition
    /// error's position where there is one.
    pub fn check(&self) -> Result<Rule, RuleError> {
        let fail = |message: String| RuleError {
            rule: self.name.clone(),
            message,
        };
        self.check_names().map_err(fail)?;
        let filter = self.filter().map_err(fail)?;
        let kinds = [
            self.threshold.is_some(),
            self.window.is_some(),
            self.exception.is_some(),
            self.absence.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(fail(
                "give exactly one of threshold, window, exception and absence".into(),
            ));
        }
        let needs_value = self.absence.is_none();
        if needs_value && self.value.is_none() {
            return Err(fail(
                "value: a JSON pointer to the number in the data (e.g. \"/temp\") is needed".into(),
            ));
        }
        if let Some(p) = &self.value
            && !(p.is_empty() || p.starts_with('/'))
        {
            return Err(fail(format!(
                "value: {p:?} is not a JSON pointer (it starts with '/', e.g. \"/temp\")"
            )));
        }
        if self.exception.is_some() && self.suppress {
            return Err(fail(
                "suppress: an exception rule always keeps back the readings it does not \
                 forward; leave suppress out"
                    .into(),
            ));
        }
        if self.absence.is_some() && (self.value.is_some() || self.time.is_some()) {
            return Err(fail(
                "value, time: an absence rule looks only at when readings arrive; leave \
                 them out"
                    .into(),
            ));
        }
        if self.when.is_some() && self.window.is_none() {
            return Err(fail("when: only a window rule has a condition".into()));
        }
        let kind = self.kind().map_err(fail)?;
        let priority = self.priority.unwrap_or(9);
        if priority > 9 {
            return Err(fail(format!("priority: {priority} is not 0 to 9")));
        }
        Ok(Rule {
            name: self.name.clone(),
            filter,
            value: self.value.clone(),
            group_by: self.group_by().map_err(fail)?,
            time: match self.time.as_deref() {
                None | Some("arrival") => TimeSource::Arrival,
                Some(p) if p.starts_with('/') => TimeSource::Data(p.to_owned()),
                Some(p) => {
                    return Err(fail(format!(
                        "time: {p:?} is neither \"arrival\" nor a JSON pointer such as \"/ts\""
                    )));
                }
            },
            allowed_lateness_ms: self.allowed_lateness.map_or(0, ms),
            kind,
            event_type: self
                .event_type
                .clone()
                .unwrap_or_else(|| format!("io.pigeon.rule.{}", self.name)),
            priority,
            suppress: self.suppress,
            max_groups: self.max_groups.unwrap_or(DEFAULT_MAX_GROUPS),
            fingerprint: self.fingerprint(),
        })
    }

    /// The rule's name (a segment of its derived events' source, `/gateways/<id>/rules/
    /// <name>`: never `.` or `..`), its events' type and its cap.
    fn check_names(&self) -> Result<(), String> {
        // It is a segment of the derived events' source (`/gateways/<id>/rules/<name>`):
        // starting with a letter or digit, it is never `.` or `..`.
        if !self.name.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(
                "name: letters, digits, '-', '_' and '.' only, starting with a letter or digit"
                    .into(),
            );
        }
        if let Some(t) = &self.event_type
            && (t.is_empty() || t.chars().any(char::is_control))
        {
            return Err(format!(
                "type: {t:?} is not a CloudEvents type (not empty, no control characters)"
            ));
        }
        if self.max_groups == Some(0) {
            return Err("max_groups: at least 1".into());
        }
        Ok(())
    }

    /// The CESQL filter, parsed, with every function it calls known.
    fn filter(&self) -> Result<Option<Expression>, String> {
        self.filter
            .as_deref()
            .map(|f| {
                let e = Expression::parse(f).map_err(|e| format!("filter: {e}"))?;
                match e.unknown_functions().first() {
                    Some(u) => Err(format!("filter: there is no CESQL function {u}")),
                    None => Ok(e),
                }
            })
            .transpose()
    }

    fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let what = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            self.value,
            self.group_by,
            self.time,
            self.allowed_lateness,
            self.threshold,
            self.window,
            self.when,
            self.exception,
            self.absence,
        );
        Sha256::digest(what.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn group_by(&self) -> Result<GroupBy, String> {
        Ok(match self.group_by.as_deref() {
            None | Some("subject") => GroupBy::Subject,
            Some("source") => GroupBy::Source,
            Some("type") => GroupBy::Type,
            Some(g) => {
                if let Some(name) = g.strip_prefix("attribute:")
                    && !name.is_empty()
                {
                    GroupBy::Attribute(name.to_owned())
                } else if let Some(n) = g.strip_prefix("segment:")
                    && let Ok(n @ 1..) = n.parse::<usize>()
                {
                    GroupBy::Segment(n - 1)
                } else {
                    return Err(format!(
                        "group_by: {g:?} is not \"subject\", \"source\", \"type\", \
                         \"attribute:<name>\" or \"segment:<n>\" (n from 1)"
                    ));
                }
            }
        })
    }

    fn kind(&self) -> Result<Kind, String> {
        if let Some(t) = &self.threshold {
            let direction = match (t.above, t.below) {
                (Some(level), None) => Direction::Above {
                    level,
                    clear: t.clear_below.unwrap_or(level),
                },
                (None, Some(level)) => Direction::Below {
                    level,
                    clear: t.clear_above.unwrap_or(level),
                },
                _ => return Err("threshold: give one of above and below".into()),
            };
            if (t.above.is_some() && t.clear_above.is_some())
                || (t.below.is_some() && t.clear_below.is_some())
            {
                return Err(
                    "threshold: clear_below goes with above, clear_above with below".into(),
                );
            }
            let threshold = Threshold {
                direction,
                for_ms: t.for_.map_or(0, ms),
                count: t.count.unwrap_or(1),
            };
            threshold.check().map_err(|e| format!("threshold: {e}"))?;
            return Ok(Kind::Threshold(threshold));
        }
        if let Some(w) = &self.window {
            let size_ms = ms(w.size);
            if size_ms <= 0 {
                return Err("window: size must be more than 0".into());
            }
            let windowing = match (w.sliding, w.hop) {
                (true, Some(_)) => return Err("window: a sliding window has no hop".into()),
                (true, None) => Windowing::Sliding { size_ms },
                (false, None) => Windowing::Tumbling { size_ms },
                (false, Some(hop)) if ms(hop) > 0 => Windowing::Hopping {
                    size_ms,
                    hop_ms: ms(hop),
                },
                (false, Some(_)) => return Err("window: hop must be more than 0".into()),
            };
            let when = self
                .when
                .as_deref()
                .map(|w| Condition::parse(w, &FIGURES).map_err(|e| format!("when: {e}")))
                .transpose()?;
            return Ok(Kind::Window { windowing, when });
        }
        if let Some(e) = &self.exception {
            if e.deadband.is_nan() || e.deadband < 0.0 {
                return Err("exception: deadband must be 0 or more".into());
            }
            return Ok(Kind::Exception(Exception {
                deadband: e.deadband,
                max_interval_ms: e.max_interval.map(ms),
            }));
        }
        let a = self.absence.as_ref().expect("one kind is given");
        Ok(Kind::Absence {
            after_ms: ms(a.after).max(1),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The `[[rules]]` of a TOML text (the engine's tests use it too).
    pub(crate) fn parse_rules(toml_text: &str) -> Vec<RuleConfig> {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<RuleConfig>,
        }
        let f: File = toml::from_str(toml_text).expect("TOML");
        f.rules
    }

    fn check(toml_text: &str) -> Result<Rule, RuleError> {
        parse_rules(toml_text)[0].check()
    }

    #[test]
    fn the_seed_rules_check() {
        let r = check(
            r#"
[[rules]]
name = "hvac-drift"
filter = "subject LIKE 'org/contoso/site/berlin/%/hvac/%'"
value = "/temp"
window = { size = "5m" }
when = "abs(avg - 21.0) > 2"
time = "/ts"
allowed_lateness = "30s"
priority = 8
"#,
        )
        .unwrap();
        assert!(matches!(
            r.kind,
            Kind::Window {
                windowing: Windowing::Tumbling { size_ms: 300_000 },
                when: Some(_)
            }
        ));
        assert_eq!((r.allowed_lateness_ms, r.priority), (30_000, 8));
        assert_eq!(r.event_type, "io.pigeon.rule.hvac-drift");
        assert_eq!(r.time, TimeSource::Data("/ts".into()));
        let r = check(
            r#"
[[rules]]
name = "fire"
value = "/smoke"
threshold = { above = 0.3, clear_below = 0.2, count = 2, for = "5s" }
group_by = "segment:6"
"#,
        )
        .unwrap();
        assert_eq!(r.group_by, GroupBy::Segment(5));
        assert!(matches!(r.kind, Kind::Threshold(t) if t.count == 2 && t.for_ms == 5_000));
        assert!(check("[[rules]]\nname = \"silent\"\nabsence = { after = \"10m\" }").is_ok());
    }

    #[test]
    fn a_bad_rule_is_named_with_what_is_wrong() {
        let bad = |body: &str, want: &str| {
            let e = check(&format!("[[rules]]\nname = \"r1\"\n{body}")).unwrap_err();
            assert_eq!(e.rule, "r1");
            assert!(e.to_string().contains(want), "{body}: {e}");
        };
        bad(
            "value = \"/t\"\nfilter = \"subject LIKE\"\nwindow = { size = \"1m\" }",
            "filter: parse error: expected a string literal",
        );
        bad(
            "value = \"/t\"\nfilter = \"NOPE(subject)\"\nwindow = { size = \"1m\" }",
            "no CESQL function NOPE/1",
        );
        bad(
            "value = \"/t\"\nfilter = \"subject = 'a' ANDD type = 'b'\"\nwindow = { size = \"1m\" }",
            "filter: parse error: expected the end of the expression at column 15",
        );
        bad(
            "value = \"/t\"\nexception = { deadband = 1.0 }\nsuppress = true",
            "suppress: an exception rule always keeps back",
        );
        for name in ["..", ".", "-x", ""] {
            let e = check(&format!(
                "[[rules]]\nname = {name:?}\nvalue = \"/t\"\nthreshold = {{ above = 1.0 }}"
            ))
            .unwrap_err();
            assert!(e.message.starts_with("name: "), "{name:?}: {e}");
        }
        bad(
            "value = \"/t\"\nthreshold = { above = 1.0 }\ntype = \"\"",
            "type: \"\" is not a CloudEvents type",
        );
        bad(
            "value = \"/t\"\nthreshold = { above = 1.0 }\nmax_groups = 0",
            "max_groups: at least 1",
        );
        bad(
            "value = \"/t\"\nabsence = { after = \"1m\" }",
            "value, time: an absence rule looks only at when readings arrive",
        );
        bad("value = \"/t\"", "exactly one of threshold");
        bad("window = { size = \"1m\" }", "value: a JSON pointer");
        bad(
            "value = \"temp\"\nwindow = { size = \"1m\" }",
            "not a JSON pointer",
        );
        bad(
            "value = \"/t\"\nwindow = { size = \"1m\" }\nwhen = \"abs(avgg) > 1\"",
            "when: column 5: unknown name \"avgg\"",
        );
        bad(
            "value = \"/t\"\nthreshold = { above = 1.0, clear_below = 2.0 }",
            "clear_below <= above",
        );
        bad(
            "value = \"/t\"\nthreshold = { above = 1.0, clear_above = 2.0 }",
            "clear_below goes with above",
        );
        bad(
            "value = \"/t\"\nexception = { deadband = 1.0 }\ngroup_by = \"segment:0\"",
            "group_by: \"segment:0\"",
        );
        bad(
            "value = \"/t\"\nexception = { deadband = 1.0 }\ntime = \"ts\"",
            "time: \"ts\" is neither",
        );
        bad(
            "value = \"/t\"\nexception = { deadband = 1.0 }\npriority = 12",
            "priority: 12",
        );
        let e = check("[[rules]]\nname = \"a b\"\nabsence = { after = \"1m\" }").unwrap_err();
        assert!(e.to_string().contains("name: letters"), "{e}");
    }
}
