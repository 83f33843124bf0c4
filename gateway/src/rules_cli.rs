//! `pigeon-gateway rules test`: the config's `[[rules]]` over sample readings, before
//! deploying them (issue 18), as eKuiper's rule test or `vector test` do.
//!
//! Each input line is one JSON object, a reading as it would arrive over MQTT:
//!
//! ```json
//! {"topic": "home/kitchen/smoke", "data": {"smoke": 0.41}, "time": "2026-01-01T08:00:05Z"}
//! ```
//!
//! It becomes the record the MQTT source would make of it ([`Sample`]: source
//! `/gateways/<id>/mqtt`, the type of the first `[[mqtt.subscriptions]]` filter matching
//! the topic, subject = topic, `application/json` when the payload is JSON, time = the
//! arrival time), and goes through the rules as the gateway runs them, the clock
//! ticking between readings ([`Timers`]). The derived events go to stdout as CloudEvents,
//! one JSON object a line; a summary per rule goes to stderr.
//!
//! Nothing is written anywhere: no outbox, no saved states. Exit codes: 0 done, 64 a
//! configuration that cannot be used (the same message as `check-config`), a config
//! without rules, or a bad input line (each one named by its line number), 1 the input
//! or the output failed.

use std::collections::{BTreeSet, HashSet};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use pigeon_rules::config::{GroupBy, Kind, TimeSource};
use pigeon_rules::window::Windowing;
use pigeon_rules::{Derived, Engine, Reading, Rule, RuleStats};
use pigeon_shared::ce::GatewayId;
use pigeon_shared::escape::controls;
use pigeon_shared::units;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::Config;
use crate::exit;
use crate::report::{count, counted};
use crate::rules::{Attributes, DerivedRecord};
use crate::sources::mqtt::{MqttConfig, UNMATCHED_TYPE};

/// The arrival time of the first reading that gives none: fixed, so that two runs over
/// the same input derive the same events with the same ids.
const DEFAULT_START: &str = "2026-01-01T00:00:00Z";

/// At most this many bad lines are listed; the rest are counted.
const MAX_LISTED_ERRORS: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub(crate) enum RulesCommand {
    /// Run the config's [[rules]] over sample readings and print the events they derive.
    ///
    /// Nothing is written: no outbox, no saved states, nothing goes to the relay.
    ///
    /// Input (stdin, or --input): JSON Lines, one reading a line, as it would arrive over MQTT:
    ///
    ///   {"topic": "home/kitchen/smoke", "data": {"smoke": 0.4}, "time": "2026-01-01T08:00:05Z"}
    ///
    ///   topic    the MQTT topic, which becomes the subject ("subject" works too)
    ///   data     the payload as any JSON value, or else
    ///   payload  the raw payload as a string (JSON if it parses as JSON, as over MQTT)
    ///   time     when it arrives: RFC 3339 or epoch milliseconds; by default --every
    ///            after the reading before it, the first at --start (a fixed time, so
    ///            that two runs derive the same events with the same ids)
    ///   type     by default the type of the first [[mqtt.subscriptions]] filter that
    ///            matches the topic
    ///   source   by default /gateways/<gateway.id>/mqtt
    ///   id       by default line-<N>, so derived events name the lines behind them
    ///
    /// Blank lines and lines starting with # are skipped.
    ///
    /// Output: each derived event as a CloudEvent, one JSON object a line, on stdout, in
    /// the order the gateway would derive them. On stderr, per rule, the readings
    /// evaluated, matched (by its filter), unreadable (no number or time where the rule
    /// looks) and late (after their window closed), and the events emitted; and how many
    /// readings the relay would get and how many the rules suppress.
    ///
    /// The clock ticks between readings as it does live: a window closes when its end
    /// plus allowed_lateness has passed, a silent sensor is reported when its absence is
    /// due. At the end of the input the clock runs on past the last reading, by the
    /// longest window plus its allowed_lateness or the longest absence, so the last
    /// windows close and sensors that stopped are reported silent (--no-flush: it stops
    /// at the last reading).
    ///
    /// Exit code 0: the rules ran, whatever they derived; 64: the configuration cannot be
    /// used (as check-config says) or has no rules, or an input line is bad (each named by
    /// its number); 1: the input cannot be read.
    #[command(verbatim_doc_comment)]
    Test(TestArgs),
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub(crate) struct TestArgs {
    /// Read the readings from this file instead of stdin ("-": stdin).
    #[arg(long, short, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Print the derived events indented, for reading.
    #[arg(long)]
    pretty: bool,
    /// Also say on stderr, for each reading, whether the rules forward it to the relay
    /// or suppress it, and which rules derived an event from it.
    #[arg(long)]
    show_readings: bool,
    /// Stop the clock at the last reading: windows still open stay open and no sensor is
    /// reported silent after it.
    #[arg(long)]
    no_flush: bool,
    /// The arrival time of the first reading without a "time" (RFC 3339 or epoch
    /// milliseconds).
    #[arg(long, value_name = "TIME", default_value = DEFAULT_START, value_parser = parse_start)]
    start: i64,
    /// The time between readings without a "time" (e.g. 500ms, 10s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    every: units::Duration,
}

/// Runs a `rules` command with the config at `config_path`.
pub(crate) fn run(config_path: &Path, command: RulesCommand) -> ExitCode {
    let RulesCommand::Test(args) = command;
    // Only the configuration: rules are tried on a laptop as well as on the Pi, where
    // the token file and the data directory need not exist.
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pigeon-gateway: {e}");
            return ExitCode::from(exit::BAD_CONFIG);
        }
    };
    let rules = match config.checked_rules() {
        Ok(r) if r.is_empty() => {
            eprintln!(
                "pigeon-gateway: {}: rules: there are no [[rules]] to test; add one and run this again",
                config_path.display()
            );
            return ExitCode::from(exit::BAD_CONFIG);
        }
        Ok(r) => r,
        // `Config::load` checked them already; this is for the day it does not.
        Err(e) => {
            eprintln!("pigeon-gateway: {}: rules: {e}", config_path.display());
            return ExitCode::from(exit::BAD_CONFIG);
        }
    };
    let (name, input) = match read_input(args.input.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("pigeon-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let routes = Routes {
        gateway: &config.gateway.id,
        mqtt: config.mqtt.as_ref(),
    };
    let timing = Timing {
        start_ms: args.start,
        every_ms: i64::try_from(args.every.get().as_millis()).unwrap_or(i64::MAX),
    };
    let parsed = match parse_input(&input, &routes, timing) {
        Ok(p) => p,
        Err(errors) => {
            for e in errors.iter().take(MAX_LISTED_ERRORS) {
                eprintln!("pigeon-gateway: {name}: {e}");
            }
            if errors.len() > MAX_LISTED_ERRORS {
                eprintln!(
                    "pigeon-gateway: {name}: and {} more",
                    counted(
                        (errors.len() - MAX_LISTED_ERRORS) as u64,
                        "bad line",
                        "bad lines"
                    )
                );
            }
            return ExitCode::from(exit::BAD_CONFIG);
        }
    };
    for w in &parsed.warnings {
        eprintln!("warning: {name}: {w}");
    }
    let outcome = simulate(rules, &parsed.samples, !args.no_flush);
    if let Err(e) = print_steps(&outcome, &parsed.samples, &config.gateway.id, &args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // `| head`: whoever reads has seen enough.
            return ExitCode::SUCCESS;
        }
        eprintln!("pigeon-gateway: cannot write the derived events: {e}");
        return ExitCode::FAILURE;
    }
    eprint!("{}", render_summary(&outcome, &parsed.samples));
    ExitCode::SUCCESS
}

/// The input's name for messages and its text.
fn read_input(path: Option<&Path>) -> Result<(String, Vec<u8>), String> {
    let mut bytes = Vec::new();
    match path {
        None => read_stdin(&mut bytes).map(|()| ("stdin".to_owned(), bytes)),
        Some(p) if p == Path::new("-") => {
            read_stdin(&mut bytes).map(|()| ("stdin".to_owned(), bytes))
        }
        // A file name with a newline stays on its line in the messages (issue 24).
        Some(p) => std::fs::read(p)
            .map(|b| (controls(&p.display().to_string()).into_owned(), b))
            .map_err(|e| format!("cannot read {}: {e}", p.display())),
    }
}

fn read_stdin(bytes: &mut Vec<u8>) -> Result<(), String> {
    if std::io::stdin().is_terminal() {
        eprintln!("Reading JSON Lines from the terminal, one reading a line; end with Ctrl-D.");
    }
    std::io::stdin()
        .lock()
        .read_to_end(bytes)
        .map(drop)
        .map_err(|e| format!("cannot read stdin: {e}"))
}

/// How a sample reading gets the attributes the MQTT source would give it.
struct Routes<'a> {
    gateway: &'a GatewayId,
    /// `[mqtt]`, whose subscriptions give the types.
    mqtt: Option<&'a MqttConfig>,
}

impl Routes<'_> {
    /// The event type of a message on `topic`, and whether a subscription gave it.
    fn event_type(&self, topic: &str) -> (String, bool) {
        match self.mqtt.and_then(|m| m.subscription_for(topic)) {
            Some(s) => (s.event_type.clone(), true),
            None => (UNMATCHED_TYPE.to_owned(), false),
        }
    }
}

/// The arrival times of readings that give none.
#[derive(Debug, Clone, Copy)]
struct Timing {
    start_ms: i64,
    every_ms: i64,
}

/// One input line as it is written. Unknown keys are errors: `"valeu"` is a typo, not a
/// key to ignore.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    topic: Option<String>,
    subject: Option<String>,
    /// Present (also as `null`, a JSON payload) or absent.
    #[serde(default, deserialize_with = "present")]
    data: Option<Value>,
    payload: Option<String>,
    #[serde(default, deserialize_with = "present")]
    time: Option<Value>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    source: Option<String>,
    id: Option<String>,
}

/// `Some` for a key that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A reading as the MQTT source would have made it into a record.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    /// Its line in the input, from 1.
    line: usize,
    id: String,
    source: String,
    event_type: String,
    subject: String,
    /// The arrival time, ms since the epoch.
    time_ms: i64,
    /// The payload's bytes (as text: the input is JSON).
    payload: String,
    /// Whether the payload is JSON, as the MQTT source tells it.
    json: bool,
}

impl Sample {
    fn content_type(&self) -> &'static str {
        if self.json {
            "application/json"
        } else {
            "application/octet-stream"
        }
    }
}

/// The readings of the input, and what is odd about them but not wrong.
#[derive(Debug, Default)]
struct Parsed {
    samples: Vec<Sample>,
    warnings: Vec<String>,
}

/// The readings of a JSON Lines input, or every bad line's number and fault.
fn parse_input(input: &[u8], routes: &Routes<'_>, timing: Timing) -> Result<Parsed, Vec<String>> {
    let mut parsed = Parsed::default();
    let mut errors = Vec::new();
    let mut unrouted = HashSet::new();
    let mut previous: Option<(usize, i64)> = None;
    for (i, raw) in input.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t.trim(),
            Err(e) => {
                errors.push(format!("line {n}: not UTF-8 text: {e}"));
                continue;
            }
        };
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match parse_line(n, text, routes, timing, previous) {
            Ok((sample, routed)) => {
                if !routed && routes.mqtt.is_some() && unrouted.insert(sample.subject.clone()) {
                    parsed.warnings.push(format!(
                        "line {n}: no [[mqtt.subscriptions]] filter matches topic {:?}, so the \
                         gateway would not subscribe to it; it is given type {UNMATCHED_TYPE:?}",
                        sample.subject
                    ));
                }
                previous = Some((n, sample.time_ms));
                parsed.samples.push(sample);
            }
            Err(e) => errors.push(format!("line {n}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

/// One line's reading, and whether a subscription gave its type. `previous` is the line
/// and arrival time of the reading before it.
fn parse_line(
    n: usize,
    text: &str,
    routes: &Routes<'_>,
    timing: Timing,
    previous: Option<(usize, i64)>,
) -> Result<(Sample, bool), String> {
    let line = line_of(text)?;
    let subject = match (line.topic, line.subject) {
        (Some(_), Some(_)) => return Err("give \"topic\" or \"subject\", not both".into()),
        (None, None) => {
            return Err(
                "no \"topic\": give the MQTT topic the reading arrives on (or \"subject\")".into(),
            );
        }
        (Some(t), None) | (None, Some(t)) => t,
    };
    if subject.is_empty() {
        return Err("the topic is empty".into());
    }
    if subject.contains(['+', '#']) {
        return Err(format!(
            "topic {subject:?}: a message's topic has no wildcards (+, #); those are for subscriptions"
        ));
    }
    let (payload, json) = match (line.data, line.payload) {
        (Some(_), Some(_)) => return Err("give \"data\" or \"payload\", not both".into()),
        (None, None) => {
            return Err("no payload: give \"data\" (the payload as JSON) or \"payload\" (the raw payload as a string)".into());
        }
        (Some(data), None) => (data.to_string(), true),
        (None, Some(p)) => {
            // As the MQTT source decides: the payload is JSON if it parses as JSON.
            let json = serde_json::from_str::<serde::de::IgnoredAny>(&p).is_ok();
            (p, json)
        }
    };
    let time_ms = match line.time {
        Some(t) => {
            let t = parse_time(&t).map_err(|e| format!("time: {e}"))?;
            if let Some((line, p)) = previous
                && t < p
            {
                return Err(format!(
                    "time: {} is before the arrival of line {line}'s reading ({}): arrival \
                     times only go forward; for readings that arrive out of order, put their \
                     own time in the data and point the rule's `time` at it",
                    rfc3339(t),
                    rfc3339(p)
                ));
            }
            t
        }
        None => previous.map_or(timing.start_ms, |(_, p)| p.saturating_add(timing.every_ms)),
    };
    if chrono::DateTime::from_timestamp_millis(time_ms).is_none() {
        return Err(format!("time: {time_ms} ms is out of range"));
    }
    let (event_type, routed) = match line.event_type {
        Some(t) if t.trim().is_empty() => return Err("type: empty".into()),
        Some(t) => (t, true),
        None => routes.event_type(&subject),
    };
    let source = match line.source {
        Some(s) if s.is_empty() => return Err("source: empty".into()),
        Some(s) => s,
        None => routes.gateway.source("mqtt"),
    };
    let id = match line.id {
        Some(id) if id.is_empty() => return Err("id: empty".into()),
        Some(id) => id,
        None => format!("line-{n}"),
    };
    Ok((
        Sample {
            line: n,
            id,
            source,
            event_type,
            subject,
            time_ms,
            payload,
            json,
        },
        routed,
    ))
}

/// One line's JSON object, with the key at fault named when one has the wrong type
/// (serde's message does not).
fn line_of(text: &str) -> Result<Line, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        let what = e.to_string();
        let what = what
            .rsplit_once(" at line ")
            .map_or(what.as_str(), |(w, _)| w);
        format!("not JSON: {what} (column {})", e.column())
    })?;
    if !value.is_object() {
        return Err(format!(
            "not a JSON object but {}: a reading is {{\"topic\": …, \"data\": …}}",
            pigeon_shared::json::kind(&value)
        ));
    }
    for key in ["topic", "subject", "payload", "type", "source", "id"] {
        if let Some(v) = value.get(key)
            && !v.is_string()
        {
            return Err(format!(
                "{key}: {} is not a string",
                pigeon_shared::json::kind(v)
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// A time as RFC 3339 text or a whole number of milliseconds since the epoch.
fn parse_time(v: &Value) -> Result<i64, String> {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s.trim())
            .map(|t| t.timestamp_millis())
            .map_err(|e| {
                format!("{s:?} is not an RFC 3339 time such as \"2026-01-01T08:00:05Z\": {e}")
            }),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| format!("{n} is not a whole number of milliseconds since the epoch")),
        other => Err(format!(
            "{} is neither an RFC 3339 time nor milliseconds since the epoch",
            pigeon_shared::json::kind(other)
        )),
    }
}

/// The `--start` argument.
fn parse_start(s: &str) -> Result<i64, String> {
    let v = match s.trim().parse::<i64>() {
        Ok(ms) => Value::from(ms),
        Err(_) => Value::from(s),
    };
    parse_time(&v)
}

/// `2026-01-01T08:00:05Z`, with milliseconds when there are any.
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || format!("{ms} ms"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    )
}

/// When the clock alone makes the rules act: windows that close (on each tumbling or
/// hopping rule's grid of closing times) and sensors that fall silent. Ticking the
/// engine exactly then, rather than every second as the gateway does, derives the events
/// the gateway would, in its order, however far apart the readings are (and with no
/// ticks in between that find nothing); a silent sensor's event carries the time its
/// absence fell due (live: the time of the next second's tick).
struct Timers {
    /// Per tumbling or hopping window rule: its index, and the step and offset of the
    /// times its windows close (end plus allowed lateness).
    grids: Vec<(usize, i64, i64)>,
    /// Per absence rule, how long a group may be silent.
    absences: Vec<i64>,
    /// When absences may fall due: each reading's arrival plus each absence rule's
    /// `after` (more than are real; a tick that finds nothing derives nothing).
    deadlines: BTreeSet<i64>,
}

impl Timers {
    fn new(rules: &[Rule]) -> Timers {
        let mut grids = Vec::new();
        let mut absences = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            match &rule.kind {
                Kind::Window { windowing, .. } => {
                    let lateness = rule.allowed_lateness_ms;
                    match *windowing {
                        // Windows start on multiples of the size and end on them too.
                        Windowing::Tumbling { size_ms } => {
                            grids.push((i, size_ms, lateness.rem_euclid(size_ms)));
                        }
                        // They start on multiples of the hop and end `size` later.
                        Windowing::Hopping { size_ms, hop_ms } => grids.push((
                            i,
                            hop_ms,
                            size_ms.saturating_add(lateness).rem_euclid(hop_ms),
                        )),
                        // A sliding window derives on readings only.
                        Windowing::Sliding { .. } => {}
                    }
                }
                Kind::Absence { after_ms } => absences.push(*after_ms),
                Kind::Threshold(_) | Kind::Exception(_) => {}
            }
        }
        Timers {
            grids,
            absences,
            deadlines: BTreeSet::new(),
        }
    }

    fn saw_reading(&mut self, arrival: i64) {
        for after in &self.absences {
            self.deadlines.insert(arrival.saturating_add(*after));
        }
    }

    /// The first time after `after` at which a tick may derive something; `open` says
    /// per rule whether it has groups (a window rule without any has nothing to close).
    fn next_due(&mut self, after: i64, open: &[bool]) -> Option<i64> {
        while self.deadlines.first().is_some_and(|d| *d <= after) {
            self.deadlines.pop_first();
        }
        let grid = self
            .grids
            .iter()
            .filter(|(i, _, _)| open.get(*i).copied().unwrap_or(false))
            .map(|(_, step, offset)| next_on_grid(after, *step, *offset));
        self.deadlines
            .first()
            .copied()
            .into_iter()
            .chain(grid)
            .min()
    }
}

/// The first time after `after` that is `offset` past a multiple of `step`.
fn next_on_grid(after: i64, step: i64, offset: i64) -> i64 {
    let base = i128::from(after) + 1;
    let step = i128::from(step.max(1));
    let g = base + (i128::from(offset) - base).rem_euclid(step);
    i64::try_from(g).unwrap_or(i64::MAX)
}

/// How far past the last reading the clock runs at the end of the input: long enough for
/// every window that reading opened to close, and for every absence to fall due.
fn flush_span(rules: &[Rule]) -> i64 {
    rules
        .iter()
        .map(|r| match &r.kind {
            Kind::Window {
                windowing: Windowing::Sliding { .. },
                ..
            } => 0,
            Kind::Window { windowing, .. } => {
                windowing.size_ms().saturating_add(r.allowed_lateness_ms)
            }
            Kind::Absence { after_ms } => *after_ms,
            Kind::Threshold(_) | Kind::Exception(_) => 0,
        })
        .max()
        .unwrap_or(0)
}

/// What happened, in order.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Derived(Derived),
    /// A reading went through the rules.
    Reading {
        /// Index into the samples.
        sample: usize,
        suppressed: bool,
        /// The rules that derived an event from it.
        derived_by: Vec<String>,
    },
}

/// A run of the rules over the samples.
#[derive(Debug)]
struct Outcome {
    steps: Vec<Step>,
    /// Per rule, in config order, with the settings the summary's hints name.
    stats: Vec<(Rule, RuleStats)>,
    /// Where the clock stopped after the last reading, if the input was flushed.
    flushed_to: Option<i64>,
}

impl Outcome {
    fn derived(&self) -> impl Iterator<Item = &Derived> {
        self.steps.iter().filter_map(|s| match s {
            Step::Derived(d) => Some(d),
            Step::Reading { .. } => None,
        })
    }
}

/// The engine and its clock.
struct Clock {
    engine: Engine,
    timers: Timers,
    /// The last tick.
    now: Option<i64>,
}

impl Clock {
    /// Ticks at every time before `until` when something may fall due, then at `until`.
    fn advance_to(&mut self, until: i64, steps: &mut Vec<Step>) {
        while let Some(now) = self.now {
            // `stats` walks the groups: only window rules need to know.
            let open: Vec<bool> = if self.timers.grids.is_empty() {
                Vec::new()
            } else {
                self.engine.stats().map(|(_, s)| s.groups > 0).collect()
            };
            match self.timers.next_due(now, &open) {
                Some(due) if due < until => self.tick(due, steps),
                _ => break,
            }
        }
        self.tick(until, steps);
    }

    fn tick(&mut self, now: i64, steps: &mut Vec<Step>) {
        steps.extend(self.engine.tick(now).into_iter().map(Step::Derived));
        self.now = Some(now);
    }
}

/// Runs the rules over the samples as the gateway would: the clock ticks up to each
/// reading's arrival before the reading goes in; with `flush`, it runs on after the last.
fn simulate(rules: Vec<Rule>, samples: &[Sample], flush: bool) -> Outcome {
    let span = flush_span(&rules);
    let mut clock = Clock {
        timers: Timers::new(&rules),
        engine: Engine::new(rules),
        now: None,
    };
    let ticks = clock.engine.ticks();
    let mut steps = Vec::new();
    for (k, s) in samples.iter().enumerate() {
        if ticks {
            clock.advance_to(s.time_ms, &mut steps);
        }
        let attributes = Attributes {
            id: &s.id,
            source: &s.source,
            event_type: &s.event_type,
            subject: Some(&s.subject),
            time_us: s.time_ms.saturating_mul(1000),
            content_type: Some(s.content_type()),
        };
        let reading = Reading {
            id: &s.id,
            attributes: &attributes,
            data: s.json.then_some(s.payload.as_str()),
        };
        let out = clock.engine.on_reading(&reading, s.time_ms);
        clock.timers.saw_reading(s.time_ms);
        let mut derived_by: Vec<String> = out.derived.iter().map(|d| d.rule.clone()).collect();
        derived_by.dedup();
        steps.extend(out.derived.into_iter().map(Step::Derived));
        steps.push(Step::Reading {
            sample: k,
            suppressed: out.suppress,
            derived_by,
        });
    }
    let mut flushed_to = None;
    if flush
        && ticks
        && let Some(last) = samples.last()
    {
        let end = last.time_ms.saturating_add(span);
        clock.advance_to(end, &mut steps);
        // Windows of readings whose own time (`time = "/ts"`) is far ahead of their
        // arrival are still open: they close when that time comes.
        if clock.engine.stats().any(|(_, s)| s.groups > 0) {
            clock.tick(i64::MAX, &mut steps);
        }
        flushed_to = Some(end);
    }
    let stats = clock
        .engine
        .rules()
        .cloned()
        .zip(clock.engine.stats().map(|(_, s)| s))
        .collect();
    Outcome {
        steps,
        stats,
        flushed_to,
    }
}

/// A derived event as the CloudEvent the relay gets (without the `sequence` and
/// `producerid` extensions, which the uplink adds when it sends it).
fn cloud_event(gateway: &GatewayId, d: &Derived) -> Value {
    let r = DerivedRecord::new(gateway, d);
    json!({
        "specversion": "1.0",
        "id": r.id.to_string(),
        "source": r.source,
        "type": r.event_type,
        "subject": r.subject,
        "time": chrono::DateTime::from_timestamp_micros(r.time_us)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        "datacontenttype": "application/json",
        "data": serde_json::from_slice::<Value>(&r.data).unwrap_or(Value::Null),
    })
}

/// The derived events on stdout and, with `--show-readings`, the readings' verdicts on
/// stderr, in the order they happened.
fn print_steps(
    outcome: &Outcome,
    samples: &[Sample],
    gateway: &GatewayId,
    args: &TestArgs,
) -> std::io::Result<()> {
    // Not buffered beyond the line: the verdicts on stderr stay between the events.
    let mut out = std::io::stdout().lock();
    let width = samples.last().map_or(0, |s| s.line.to_string().len());
    for step in &outcome.steps {
        match step {
            Step::Derived(d) => {
                let event = cloud_event(gateway, d);
                let text = if args.pretty {
                    serde_json::to_string_pretty(&event)
                } else {
                    serde_json::to_string(&event)
                }
                .map_err(std::io::Error::other)?;
                writeln!(out, "{text}")?;
            }
            Step::Reading {
                sample,
                suppressed,
                derived_by,
            } if args.show_readings => {
                out.flush()?;
                eprintln!(
                    "{}",
                    verdict_line(&samples[*sample], *suppressed, derived_by, width)
                );
            }
            Step::Reading { .. } => {}
        }
    }
    out.flush()
}

/// `line 4: suppressed  2026-01-01T00:00:03Z  home/kitchen/smoke  (derived: fire)`, the
/// line number padded to `width` digits.
fn verdict_line(sample: &Sample, suppressed: bool, derived_by: &[String], width: usize) -> String {
    let verdict = if suppressed {
        "suppressed"
    } else {
        "forwarded"
    };
    let label = format!("{}:", sample.line);
    let time = rfc3339(sample.time_ms);
    // The topic came from the input: no control character reaches the terminal.
    let subject = controls(&sample.subject);
    let mut line = format!(
        "line {label:<w$} {verdict:<10}  {time}  {subject}",
        w = width + 1
    );
    if !derived_by.is_empty() {
        line.push_str(&format!("  (derived: {})", derived_by.join(", ")));
    }
    line
}

/// The summary on stderr: the readings, the events, and per rule what it did, with a
/// hint where a figure suggests a mistake.
fn render_summary(outcome: &Outcome, samples: &[Sample]) -> String {
    let suppressed = outcome
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s,
                Step::Reading {
                    suppressed: true,
                    ..
                }
            )
        })
        .count() as u64;
    let readings = samples.len() as u64;
    let mut out = format!(
        "\n{}: {} forwarded to the relay, {} suppressed by the rules; {}.\n",
        counted(readings, "reading", "readings"),
        count(readings - suppressed),
        count(suppressed),
        counted(
            outcome.derived().count() as u64,
            "derived event",
            "derived events"
        ),
    );
    if readings == 0 {
        out.push_str("There are no readings in the input.\n");
    }
    let ticks = outcome.stats.iter().any(|(r, _)| {
        matches!(
            r.kind,
            Kind::Absence { .. }
                | Kind::Window {
                    windowing: Windowing::Tumbling { .. } | Windowing::Hopping { .. },
                    ..
                }
        )
    });
    match outcome.flushed_to {
        Some(t) => out.push_str(&format!(
            "After the last reading the clock ran on to {}, closing the open windows and\n\
             finding silent sensors (--no-flush: stop at the last reading).\n",
            rfc3339(t)
        )),
        None if ticks && readings > 0 => out.push_str(
            "The clock stopped at the last reading (--no-flush): windows still open and\n\
             sensors silent since are not reported.\n",
        ),
        None => {}
    }
    out.push('\n');
    out.push_str(&rules_table(outcome));
    let hints: Vec<String> = outcome
        .stats
        .iter()
        .flat_map(|(r, s)| hints(r, s))
        .collect();
    if !hints.is_empty() {
        out.push('\n');
        for h in hints {
            out.push_str(&format!("note: {h}\n"));
        }
    }
    out
}

/// The per-rule table of the summary.
fn rules_table(outcome: &Outcome) -> String {
    let header = [
        "RULE",
        "EVALUATED",
        "MATCHED",
        "EMITTED",
        "UNREADABLE",
        "LATE",
    ];
    let rows: Vec<[String; 6]> = outcome
        .stats
        .iter()
        .map(|(r, s)| {
            [
                r.name.clone(),
                count(s.evaluated),
                count(s.matched),
                count(s.emitted),
                count(s.unreadable),
                count(s.late),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = format!("{:<w$}", cells[0], w = widths[0]);
        for (cell, w) in cells.iter().zip(widths).skip(1) {
            l.push_str(&format!("  {cell:>w$}"));
        }
        l.push('\n');
        l
    };
    let mut out = line(&header);
    for row in &rows {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    out
}

/// What a rule's figures suggest is wrong with the rule or the readings.
fn hints(rule: &Rule, s: &RuleStats) -> Vec<String> {
    let name = &rule.name;
    let mut out = Vec::new();
    if s.evaluated > 0 && s.matched == 0 {
        out.push(format!(
            "{name}: no reading matched its filter; it sees each reading's subject (the \
             topic), type and source"
        ));
    }
    if s.unreadable > 0 {
        let mut missing = Vec::new();
        if let Some(v) = &rule.value {
            missing.push(format!("no number at {v:?}"));
        }
        if let TimeSource::Data(p) = &rule.time {
            missing.push(format!("no time at {p:?}"));
        }
        let mut what = if missing.is_empty() {
            String::new()
        } else {
            format!(
                "{} in the data (is the payload JSON?)",
                missing.join(" or ")
            )
        };
        if matches!(rule.group_by, GroupBy::Attribute(_) | GroupBy::Segment(_)) {
            if !what.is_empty() {
                what.push_str(", or ");
            }
            what.push_str("nothing to group by (group_by)");
        }
        out.push(format!(
            "{name}: {} unreadable: {what}",
            counted(
                s.unreadable,
                "matching reading was",
                "matching readings were"
            )
        ));
    }
    if s.late > 0 {
        let mut h = format!(
            "{name}: {} late: {} after the window closed (its end plus allowed_lateness) \
             and not counted",
            counted(s.late, "reading was", "readings were"),
            if s.late == 1 {
                "it arrived"
            } else {
                "they arrived"
            }
        );
        if let TimeSource::Data(p) = &rule.time {
            h.push_str(&format!(
                "; the readings' own time (at {p:?}) is that far behind their arrival: give \
                 the lines a \"time\" close to it"
            ));
        }
        out.push(h);
    }
    if s.evicted > 0 {
        out.push(format!(
            "{name}: {} dropped at max_groups",
            counted(s.evicted, "group was", "groups were")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: RulesCommand,
    }

    fn parse_args(args: &[&str]) -> Result<TestArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("rules").chain(args.iter().copied())).map(|c| {
            match c.command {
                RulesCommand::Test(a) => a,
            }
        })
    }

    /// 2026-01-01T00:00:00Z.
    const T0: i64 = 1_767_225_600_000;

    fn rules(toml_text: &str) -> Vec<Rule> {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<pigeon_rules::RuleConfig>,
        }
        let f: File = toml::from_str(toml_text).expect("TOML");
        f.rules.iter().map(|r| r.check().unwrap()).collect()
    }

    fn mqtt() -> MqttConfig {
        toml::from_str(
            r#"
            [[subscriptions]]
            filter = "home/+/smoke"
            type = "io.pigeon.smoke"
            [[subscriptions]]
            filter = "home/#"
            type = "io.pigeon.reading"
            "#,
        )
        .unwrap()
    }

    fn gw() -> GatewayId {
        GatewayId::new("pi-1").unwrap()
    }

    const EVERY_SECOND: Timing = Timing {
        start_ms: T0,
        every_ms: 1_000,
    };

    fn parse(input: &str) -> Result<Parsed, Vec<String>> {
        let (gateway, mqtt) = (gw(), mqtt());
        let routes = Routes {
            gateway: &gateway,
            mqtt: Some(&mqtt),
        };
        parse_input(input.as_bytes(), &routes, EVERY_SECOND)
    }

    fn error_of(line: &str) -> String {
        let errors = parse(line).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].clone()
    }

    #[test]
    fn arguments_and_their_defaults() {
        let a = parse_args(&["test"]).unwrap();
        assert_eq!(
            a,
            TestArgs {
                input: None,
                pretty: false,
                show_readings: false,
                no_flush: false,
                start: T0,
                every: units::Duration::from_secs(1),
            }
        );
        let a = parse_args(&[
            "test",
            "-i",
            "r.jsonl",
            "--start",
            "1767225600000",
            "--every",
            "10s",
            "--no-flush",
            "--pretty",
            "--show-readings",
        ])
        .unwrap();
        assert_eq!(a.input.as_deref(), Some(Path::new("r.jsonl")));
        assert_eq!((a.start, a.every.get().as_secs()), (T0, 10));
        assert!(a.no_flush && a.pretty && a.show_readings);
        assert_eq!(
            parse_args(&["test", "--start", "2026-01-01T01:00:00+01:00"])
                .unwrap()
                .start,
            T0
        );
        let e = parse_args(&["test", "--start", "tomorrow"]).unwrap_err();
        assert!(e.to_string().contains("RFC 3339"), "{e}");
        assert!(parse_args(&["test", "--every", "often"]).is_err());
        assert!(parse_args(&[]).is_err(), "a subcommand is needed");
    }

    /// A sample reading gets what the MQTT source would give the real message.
    #[test]
    fn a_reading_looks_like_the_mqtt_sources_record() {
        let p = parse(
            r#"{"topic": "home/kitchen/smoke", "data": {"smoke": 0.4}}
{"topic": "home/kitchen/temp", "payload": "{\"c\": 21.5}"}
{"topic": "home/kitchen/door", "payload": "open"}
{"subject": "home/kitchen/light", "data": "on", "type": "x.light", "source": "/gateways/pi-1/zigbee", "id": "r-9"}
"#,
        )
        .unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let s = &p.samples;
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[0],
            Sample {
                line: 1,
                id: "line-1".into(),
                source: "/gateways/pi-1/mqtt".into(),
                event_type: "io.pigeon.smoke".into(),
                subject: "home/kitchen/smoke".into(),
                time_ms: T0,
                payload: r#"{"smoke":0.4}"#.into(),
                json: true,
            }
        );
        assert_eq!(s[0].content_type(), "application/json");
        // The second filter gives the type; a payload that parses is JSON, as over MQTT.
        assert_eq!(s[1].event_type, "io.pigeon.reading");
        assert_eq!((s[1].payload.as_str(), s[1].json), (r#"{"c": 21.5}"#, true));
        assert_eq!(s[1].time_ms, T0 + 1_000);
        assert_eq!((s[2].payload.as_str(), s[2].json), ("open", false));
        assert_eq!(s[2].content_type(), "application/octet-stream");
        // `data` is JSON whatever it is: a string travels as a JSON string.
        assert_eq!((s[3].payload.as_str(), s[3].json), (r#""on""#, true));
        assert_eq!(
            (
                s[3].id.as_str(),
                s[3].event_type.as_str(),
                s[3].source.as_str()
            ),
            ("r-9", "x.light", "/gateways/pi-1/zigbee")
        );
        assert_eq!(s[3].subject, "home/kitchen/light");
    }

    #[test]
    fn arrival_times_given_or_counted_on_from_the_last() {
        let p = parse(
            r#"# the first at --start
{"topic": "home/a", "data": 1}

{"topic": "home/a", "data": 2, "time": "2026-01-01T08:00:00.250Z"}
{"topic": "home/a", "data": 3}
{"topic": "home/a", "data": 4, "time": 1767254401250}
{"topic": "home/a", "data": 5, "time": "2026-01-01T10:00:01.250+02:00"}
{"topic": "home/a", "data": 6}
"#,
        )
        .unwrap();
        let times: Vec<(usize, i64)> = p.samples.iter().map(|s| (s.line, s.time_ms)).collect();
        let eight = T0 + 8 * 3_600_000;
        // The same time twice is fine: two messages in one millisecond.
        assert_eq!(
            times,
            [
                (2, T0),
                (4, eight + 250),
                (5, eight + 1_250),
                (6, eight + 1_250),
                (7, eight + 1_250),
                (8, eight + 2_250),
            ]
        );
    }

    #[test]
    fn each_bad_line_is_named_with_what_is_wrong() {
        let cases = [
            (r#"{"topic": "a", "valeu": 3}"#, "unknown field `valeu`"),
            ("not json", "not JSON: expected ident (column 2)"),
            ("[1, 2]", "not a JSON object but an array"),
            (r#"{"topic": "a/#", "data": 1}"#, "has no wildcards"),
            (r#"{"data": 1}"#, "no \"topic\""),
            (r#"{"topic": "a", "subject": "a", "data": 1}"#, "not both"),
            (r#"{"topic": "", "data": 1}"#, "the topic is empty"),
            (r#"{"topic": "a"}"#, "no payload"),
            (r#"{"topic": "a", "data": 1, "payload": "1"}"#, "not both"),
            (
                r#"{"topic": 5, "data": 1}"#,
                "topic: a number is not a string",
            ),
            (r#"{"topic": "a", "data": 1, "id": ""}"#, "id: empty"),
            (
                r#"{"topic": "a", "data": 1, "time": "noon"}"#,
                "time: \"noon\" is not an RFC 3339 time",
            ),
            (
                r#"{"topic": "a", "data": 1, "time": 1.5}"#,
                "not a whole number of milliseconds",
            ),
            (
                r#"{"topic": "a", "data": 1, "time": null}"#,
                "time: null is neither",
            ),
            (
                r#"{"topic": "a", "data": 1, "time": 9999999999999999}"#,
                "out of range",
            ),
        ];
        for (line, expected) in cases {
            let e = error_of(line);
            assert!(e.starts_with("line 1: "), "{line}: {e}");
            assert!(e.contains(expected), "{line}: {e}");
        }
        let (gateway, mqtt) = (gw(), mqtt());
        let routes = Routes {
            gateway: &gateway,
            mqtt: Some(&mqtt),
        };
        let e = parse_input(b"\n\n\xff\n", &routes, EVERY_SECOND).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("line 3: not UTF-8"), "{e:?}");
    }

    #[test]
    fn every_bad_line_is_listed_and_line_numbers_count_skipped_lines() {
        let errors = parse(
            r#"# readings
{"topic": "home/a", "data": 1, "time": "2026-01-01T08:00:00Z"}
{"topic": "home/a"}

{"topic": "home/a", "data": 1, "time": "2026-01-01T07:59:00Z"}
"#,
        )
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("line 3: no payload"), "{errors:?}");
        assert!(
            errors[1].starts_with(
                "line 5: time: 2026-01-01T07:59:00Z is before the arrival of line 2's reading \
                 (2026-01-01T08:00:00Z)"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn a_topic_no_subscription_takes_is_a_warning_once() {
        let p = parse(
            r#"{"topic": "garage/door", "data": 1}
{"topic": "garage/door", "data": 2}
{"topic": "garage/light", "data": 2, "type": "x"}
"#,
        )
        .unwrap();
        assert_eq!(p.samples[0].event_type, UNMATCHED_TYPE);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(
            p.warnings[0].starts_with(
                "line 1: no [[mqtt.subscriptions]] filter matches topic \"garage/door\""
            )
        );
        // Without [mqtt] there is nothing to warn about.
        let gateway = gw();
        let routes = Routes {
            gateway: &gateway,
            mqtt: None,
        };
        let p = parse_input(
            br#"{"topic": "garage/door", "data": 1}"#,
            &routes,
            EVERY_SECOND,
        )
        .unwrap();
        assert!(p.warnings.is_empty());
        assert_eq!(p.samples[0].event_type, UNMATCHED_TYPE);
    }

    #[test]
    fn window_closing_times_lie_on_each_rules_grid() {
        assert_eq!(next_on_grid(0, 60_000, 0), 60_000);
        assert_eq!(next_on_grid(59_999, 60_000, 0), 60_000);
        assert_eq!(next_on_grid(60_000, 60_000, 0), 120_000);
        assert_eq!(next_on_grid(60_000, 60_000, 10_000), 70_000);
        assert_eq!(next_on_grid(-1, 60_000, 0), 0);
        assert_eq!(next_on_grid(i64::MAX - 1, 60_000, 0), i64::MAX);
        let t = Timers::new(&rules(
            r#"
[[rules]]
name = "tumbling"
value = "/v"
window = { size = "1m" }
allowed_lateness = "70s"
[[rules]]
name = "hopping"
value = "/v"
window = { size = "5m", hop = "2m" }
[[rules]]
name = "sliding"
value = "/v"
window = { size = "5m", sliding = true }
[[rules]]
name = "quiet"
absence = { after = "10m" }
"#,
        ));
        // Ends on whole minutes, plus 70 s; ends at 5 min past every even minute.
        assert_eq!(t.grids, [(0, 60_000, 10_000), (1, 120_000, 60_000)]);
        assert_eq!(t.absences, [600_000]);
    }

    fn sample(line: usize, subject: &str, time_ms: i64, data: &str) -> Sample {
        Sample {
            line,
            id: format!("line-{line}"),
            source: "/gateways/pi-1/mqtt".into(),
            event_type: "io.pigeon.reading".into(),
            subject: subject.into(),
            time_ms,
            payload: data.into(),
            json: true,
        }
    }

    const TWO_RULES: &str = r#"
[[rules]]
name = "fire"
filter = "subject LIKE '%/smoke'"
value = "/smoke"
threshold = { above = 0.3 }
[[rules]]
name = "warm"
filter = "subject LIKE '%/temp'"
value = "/c"
window = { size = "1m" }
when = "avg > 25"
suppress = true
[[rules]]
name = "quiet"
filter = "subject LIKE '%/smoke'"
absence = { after = "5m" }
"#;

    fn derived(o: &Outcome) -> Vec<(String, i64)> {
        o.derived().map(|d| (d.rule.clone(), d.time_ms)).collect()
    }

    /// Events come in the order of their time as the gateway derives them, however far
    /// apart the readings are: a window that closed long before the next reading comes
    /// before that reading's alarm, a silent sensor is reported when its absence is due.
    #[test]
    fn the_clock_ticks_when_something_falls_due() {
        let samples = [
            sample(1, "h/temp", T0 + 10_000, r#"{"c": 26}"#),
            sample(2, "h/smoke", T0 + 20_000, r#"{"smoke": 0.1}"#),
            // 20 minutes later.
            sample(3, "h/smoke", T0 + 1_220_000, r#"{"smoke": 0.5}"#),
            sample(4, "h/temp", T0 + 1_230_000, r#"{"c": 20}"#),
        ];
        let o = simulate(rules(TWO_RULES), &samples, true);
        assert_eq!(
            derived(&o),
            [
                ("warm".into(), T0 + 60_000),
                // Five minutes after its last reading, not when the next one came.
                ("quiet".into(), T0 + 320_000),
                // The reading that ends the silence raises the alarm too (rules in
                // config order).
                ("fire".into(), T0 + 1_220_000),
                ("quiet".into(), T0 + 1_220_000),
                // The flush: the warm window of reading 4 is not warm; the smoke sensor
                // falls silent again five minutes after its last reading.
                ("quiet".into(), T0 + 1_520_000),
            ]
        );
        let back = o.derived().nth(3).unwrap();
        assert_eq!(back.data["state"], "back");
        assert_eq!(o.flushed_to, Some(T0 + 1_230_000 + 300_000));
        // The temperature readings are suppressed by the warm rule, the others forwarded.
        let verdicts: Vec<bool> = o
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Reading { suppressed, .. } => Some(*suppressed),
                Step::Derived(_) => None,
            })
            .collect();
        assert_eq!(verdicts, [true, false, false, true]);
        let stats: Vec<(&str, u64, u64)> = o
            .stats
            .iter()
            .map(|(r, s)| (r.name.as_str(), s.matched, s.emitted))
            .collect();
        assert_eq!(stats, [("fire", 2, 1), ("warm", 2, 1), ("quiet", 2, 3)]);
        // The same input derives the same events, ids and all.
        assert_eq!(
            simulate(rules(TWO_RULES), &samples, true).steps,
            o.steps,
            "deterministic"
        );
    }

    #[test]
    fn without_flush_the_clock_stops_at_the_last_reading() {
        let samples = [sample(1, "h/temp", T0 + 10_000, r#"{"c": 26}"#)];
        let o = simulate(rules(TWO_RULES), &samples, false);
        assert!(derived(&o).is_empty());
        assert_eq!(o.flushed_to, None);
        let text = render_summary(&o, &samples);
        assert!(
            text.contains("The clock stopped at the last reading (--no-flush)"),
            "{text}"
        );
        let o = simulate(rules(TWO_RULES), &samples, true);
        assert_eq!(derived(&o), [("warm".into(), T0 + 60_000)]);
    }

    /// A window rule whose readings carry their own time far ahead of their arrival: the
    /// flush closes their windows too.
    #[test]
    fn the_flush_closes_windows_of_readings_from_the_future() {
        let r = rules(
            r#"
[[rules]]
name = "w"
value = "/v"
time = "/ts"
window = { size = "1m" }
"#,
        );
        let samples = [sample(
            1,
            "a",
            T0,
            r#"{"v": 1, "ts": "2030-01-01T00:00:30Z"}"#,
        )];
        let o = simulate(r, &samples, true);
        let d: Vec<_> = o.derived().collect();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].data["window"]["start"], "2030-01-01T00:00:00.000Z");
    }

    #[test]
    fn a_derived_event_is_printed_as_the_relay_gets_it() {
        let samples = [sample(1, "home/k/smoke", T0 + 1_500, r#"{"smoke": 0.5}"#)];
        let o = simulate(rules(TWO_RULES), &samples, false);
        let d = o.derived().next().unwrap();
        let e = cloud_event(&gw(), d);
        let keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "specversion",
                "id",
                "source",
                "type",
                "subject",
                "time",
                "datacontenttype",
                "data"
            ]
        );
        assert_eq!(e["id"], d.id);
        assert_eq!(e["source"], "/gateways/pi-1/rules/fire");
        assert_eq!(e["type"], "io.pigeon.rule.fire");
        assert_eq!(e["subject"], "home/k/smoke");
        assert_eq!(e["time"], "2026-01-01T00:00:01.500Z");
        assert_eq!(e["data"]["readings"], json!(["line-1"]));
    }

    #[test]
    fn the_summary_counts_and_hints_at_mistakes() {
        let r = rules(
            r#"
[[rules]]
name = "never"
filter = "subject = 'nothing'"
value = "/v"
threshold = { above = 1 }
[[rules]]
name = "w"
value = "/v"
time = "/ts"
window = { size = "1m" }
"#,
        );
        let samples = [
            sample(1, "a", T0 + 120_000, r#"{"v": 1, "ts": 1767225610000}"#),
            sample(2, "a", T0 + 121_000, r#"{"x": 1}"#),
        ];
        let text = render_summary(&simulate(r, &samples, true), &samples);
        assert!(
            text.starts_with("\n2 readings: 2 forwarded to the relay, 0 suppressed by the rules; 0 derived events.\n"),
            "{text}"
        );
        assert!(
            text.contains("RULE   EVALUATED  MATCHED  EMITTED  UNREADABLE  LATE\n"),
            "{text}"
        );
        assert!(
            text.contains("never          2        0        0           0     0\n"),
            "{text}"
        );
        assert!(
            text.contains("w              2        2        0           1     1\n"),
            "{text}"
        );
        assert!(
            text.contains("note: never: no reading matched its filter"),
            "{text}"
        );
        assert!(
            text.contains(
                "note: w: 1 matching reading was unreadable: no number at \"/v\" or no time at \"/ts\" in the data"
            ),
            "{text}"
        );
        assert!(
            text.contains("note: w: 1 reading was late: it arrived after"),
            "{text}"
        );
    }

    /// A topic with a newline or an escape sequence stays on its line (issue 24).
    #[test]
    fn issue_24_the_verdicts_escape_control_characters() {
        let s = sample(12, "home/a\nline 13: forged\x1b[2J", T0, "1");
        let line = verdict_line(&s, true, &["fire".into()], 3);
        assert_eq!(
            line,
            "line 12:  suppressed  2026-01-01T00:00:00Z  home/a\\nline 13: forged\\u{1b}[2J  (derived: fire)"
        );
    }
}
