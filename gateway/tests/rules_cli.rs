//! `pigeon-gateway rules test` as a user runs it: the real binary, a real config with a
//! fire alarm and a one-minute window, sample readings on stdin or from a file (issue 18).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pigeon-gateway")
}

/// The smoke alarm: raised by two readings above 0.3 in a row, cleared by two below 0.2.
/// The kitchen's one-minute average temperature, reported when above 25 °C; the
/// temperature readings themselves stay at the Pi.
const RULES: &str = r#"
[[rules]]
name = "fire"
filter = "subject LIKE 'home/%/smoke'"
value = "/smoke"
threshold = { above = 0.3, clear_below = 0.2, count = 2 }
type = "io.pigeon.alarm.fire"

[[rules]]
name = "kitchen-warm"
filter = "subject = 'home/kitchen/temp' AND type = 'io.pigeon.reading'"
value = "/c"
window = { size = "1m" }
when = "avg > 25"
suppress = true
priority = 6
"#;

/// A config file in a temporary directory: gateway `pi-kitchen`, MQTT subscriptions
/// that give the readings their type, and `rules`.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(rules: &str) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("gateway.toml");
        // The data directory need not exist: `rules test` writes nothing.
        let text = format!(
            r#"
[gateway]
id = "pi-kitchen"
data_dir = {data:?}

[relay]
url = "http://127.0.0.1:9"
token = "token-of-pi-kitchen-0123"

[mqtt]
[[mqtt.subscriptions]]
filter = "home/#"
type = "io.pigeon.reading"
{rules}"#,
            data = dir.path().join("no-such-dir"),
        );
        std::fs::write(&config, text).expect("write config");
        Setup { dir, config }
    }

    /// Runs `pigeon-gateway --config <config> <args>` with `stdin` as its input.
    fn run(&self, args: &[&str], stdin: &str) -> Output {
        run_with(&self.config, args, stdin)
    }
}

fn run_with(config: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(gateway_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pigeon-gateway");
    // A command that fails before reading its input closes the pipe: that is no error here.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    child.wait_with_output().expect("wait for pigeon-gateway")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The derived events on stdout, one JSON object a line.
fn events(out: &Output) -> Vec<Value> {
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A minute of the kitchen: the smoke detector rises through the alarm level and back,
/// the temperature averages 26 °C from 08:00 to 08:01 and 24 °C after.
const READINGS: &str = r#"# 08:00: smoke clear, temperature up
{"topic": "home/kitchen/smoke", "data": {"smoke": 0.05}, "time": "2026-03-01T08:00:00Z"}
{"topic": "home/kitchen/temp", "data": {"c": 25.0}}
{"topic": "home/kitchen/smoke", "data": {"smoke": 0.35}, "time": "2026-03-01T08:00:20Z"}
{"topic": "home/kitchen/smoke", "data": {"smoke": 0.42}}
{"topic": "home/kitchen/temp", "payload": "{\"c\": 27.0}", "time": "2026-03-01T08:00:40Z"}

# 08:01: the window of 08:00 closes; the smoke clears
{"topic": "home/kitchen/temp", "data": {"c": 24.0}, "time": "2026-03-01T08:01:05Z"}
{"topic": "home/kitchen/smoke", "data": {"smoke": 0.1}, "time": "2026-03-01T08:01:30Z"}
{"topic": "home/kitchen/smoke", "data": {"smoke": 0.1}}
{"topic": "home/kitchen/temp", "payload": "not a number"}
"#;

#[test]
fn rules_test_prints_the_derived_events_and_counts_what_is_suppressed() {
    let s = Setup::new(RULES);
    let out = s.run(&["rules", "test"], READINGS);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    let ev = events(&out);
    let summary: Vec<(&str, &str, &str)> = ev
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap(),
                e["time"].as_str().unwrap(),
                e["data"]["state"].as_str().unwrap_or("window"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "/gateways/pi-kitchen/rules/fire",
                "2026-03-01T08:00:21Z",
                "raised"
            ),
            (
                "/gateways/pi-kitchen/rules/kitchen-warm",
                "2026-03-01T08:01:00Z",
                "window"
            ),
            (
                "/gateways/pi-kitchen/rules/fire",
                "2026-03-01T08:01:31Z",
                "cleared"
            ),
        ],
        "{ev:#?}"
    );
    // Each a CloudEvent as the relay gets it.
    let fire = &ev[0];
    assert_eq!(fire["specversion"], "1.0");
    assert_eq!(fire["type"], "io.pigeon.alarm.fire");
    assert_eq!(fire["subject"], "home/kitchen/smoke");
    assert_eq!(fire["datacontenttype"], "application/json");
    assert_eq!(fire["data"]["value"], 0.42);
    // The readings behind it are named by their input lines.
    assert_eq!(
        fire["data"]["readings"],
        serde_json::json!(["line-4", "line-5"])
    );
    // The window of 08:00: 25.0 and 27.0 (the second a raw JSON payload); 24.0 came at
    // 08:01:05, in the next window, whose average is not above 25.
    let w = &ev[1]["data"];
    assert_eq!(ev[1]["type"], "io.pigeon.rule.kitchen-warm");
    assert_eq!(ev[1]["subject"], "home/kitchen/temp");
    assert_eq!(w["window"]["start"], "2026-03-01T08:00:00.000Z");
    assert_eq!(w["window"]["end"], "2026-03-01T08:01:00.000Z");
    assert_eq!(
        (&w["count"], &w["avg"], &w["min"], &w["max"], &w["sum"]),
        (
            &Value::from(2),
            &Value::from(26.0),
            &Value::from(25.0),
            &Value::from(27.0),
            &Value::from(52.0)
        )
    );
    assert_eq!(
        (&w["first_reading"], &w["last_reading"]),
        (&"line-3".into(), &"line-6".into())
    );
    for e in &ev {
        let id = e["id"].as_str().unwrap();
        assert!(uuid::Uuid::try_parse(id).is_ok(), "{id}");
    }
    // Three temperature readings the window rule consumed stay at the Pi; the one it
    // could not read (not JSON) goes on, like the smoke readings.
    assert!(
        stderr.contains(
            "9 readings: 6 forwarded to the relay, 3 suppressed by the rules; 3 derived events."
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("RULE          EVALUATED  MATCHED  EMITTED  UNREADABLE  LATE\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fire                  9        5        2           0     0\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kitchen-warm          9        4        1           1     0\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("note: kitchen-warm: 1 matching reading was unreadable"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the clock ran on to 2026-03-01T08:02:32Z"),
        "{stderr}"
    );

    // The same readings derive the same events with the same ids, also from a file.
    let input = s.dir.path().join("readings.jsonl");
    std::fs::write(&input, READINGS).unwrap();
    let again = s.run(&["rules", "test", "--input", input.to_str().unwrap()], "");
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), text(&out.stdout));
}

#[test]
fn show_readings_gives_each_readings_verdict_and_no_flush_keeps_windows_open() {
    let s = Setup::new(RULES);
    let out = s.run(
        &["rules", "test", "--show-readings", "--no-flush"],
        READINGS,
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 3:  suppressed  2026-03-01T08:00:01Z  home/kitchen/temp\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "line 5:  forwarded   2026-03-01T08:00:21Z  home/kitchen/smoke  (derived: fire)\n"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 12: forwarded   2026-03-01T08:01:32Z  home/kitchen/temp\n"),
        "{stderr}"
    );
    // The 08:01 window is not closed (and would not be reported anyway); the 08:00 one
    // closed when the reading of 08:01:05 arrived.
    assert_eq!(events(&out).len(), 3);
    assert!(
        stderr.contains("The clock stopped at the last reading (--no-flush)"),
        "{stderr}"
    );
}

#[test]
fn a_bad_line_is_named_and_nothing_runs() {
    let s = Setup::new(RULES);
    let input = "{\"topic\": \"home/kitchen/smoke\", \"data\": {\"smoke\": 0.5}}\n\
                 # a comment\n\
                 {\"topic\": \"home/kitchen/smoke\", \"smoke\": 0.5}\n\
                 {\"topic\": \"home/kitchen/smoke\", \"data\": 1, \"time\": \"at noon\"}\n";
    let out = s.run(&["rules", "test"], input);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(out.stdout.is_empty(), "no events from a bad input");
    assert!(
        stderr.contains("pigeon-gateway: stdin: line 3: unknown field `smoke`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pigeon-gateway: stdin: line 4: time: \"at noon\" is not an RFC 3339 time"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_bad_rule_says_what_check_config_says() {
    let s = Setup::new(&RULES.replace("when = \"avg > 25\"", "when = \"avg >> 25\""));
    let out = s.run(&["rules", "test"], READINGS);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("rules: rule \"kitchen-warm\": when: column "),
        "{stderr}"
    );
    let check = s.run(&["check-config"], "");
    assert_eq!(check.status.code(), Some(64));
    assert_eq!(text(&check.stderr), stderr);
}

#[test]
fn a_config_without_rules_says_so() {
    let s = Setup::new("");
    let out = s.run(&["rules", "test"], READINGS);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("rules: there are no [[rules]] to test"),
        "{stderr}"
    );
}
