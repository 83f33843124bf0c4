//! Benchmarks of the edge rules (issue 18, docs/rules.md) with the real binaries (release
//! builds), a real mosquitto and the relay on loopback. Prints figures; asserts nothing
//! about speed. Run with `scripts/bench rules` (it builds the release binaries first).
//!
//! * ingest — the spine's "gateway ingest": the broker queues N readings of 1,000 sensors
//!   while the gateway's persistent session is away, then the gateway comes back (relay
//!   down) and is timed from the first reading it received until every reading is
//!   committed (stored, or kept back by a rule). Three configurations side by side, in
//!   turn, round after round: no rules; 20 realistic rules of which each reading matches
//!   2–4; the same 20 rules made to match every reading. Each rules run is divided by
//!   the no-rules run of its round.
//! * end to end — the same three, relay up: from the gateway's start until every reading
//!   the rules let through is a line in the relay's stream files.
//! * memory — the gateway's RSS once 10,000 groups hold a state (one window rule and one
//!   threshold rule, both grouped by topic, 3 readings on each of 10,000 topics),
//!   beside the same traffic without rules, alternating.
//! * latency — smoke readings that each raise or clear the fire alarm (`count = 1`), 50 ms
//!   apart, while 500 other readings a second flow: from the publish call to the derived
//!   event's line in the relay's stream files; beside it, alternating, the same without
//!   rules: to the smoke reading's own line (priority 9 in both, so it is sent at once).
//! * engine — the rules engine alone, in this process: CPU per reading for the ingest
//!   runs' readings, and its memory for the memory scenario's (in a child process), to
//!   tell the rules' share from the outbox's.
//!
//! `cargo bench -p pigeon-e2e --bench rules -- ingest` (or `e2e`, `memory`, `latency`,
//! `engine`) runs one of them. `PIGEON_BENCH_N` sets the readings per ingest run (default
//! 100000), `PIGEON_BENCH_ROUNDS` the rounds of alternating runs (default 4 for ingest, 3
//! for the others). docs/benchmarks.md, "Edge rules (issue 18)", records the figures.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pigeon_e2e::{
    Gateway, GatewayConfig, Mosquitto, MosquittoOptions, Publisher, PublisherOptions, Reading,
    Relay, Subscription, TestDir, fmt_count, free_port, metric_value, rss_kib,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

const GATEWAY: &str = "bench-gw";
const TOKEN: &str = "bench-token";

/// 200 rooms in two buildings, one sensor of each kind per room.
const SENSORS: u64 = 1_000;
const KINDS: [&str; 5] = ["hvac", "smoke", "power", "co2", "light"];

/// 20 rules as a building's operator might write them. A reading matches 2–4: hvac 4
/// (2 server-room sensors 5), smoke 4, power 4, co2 3, light 2, each counting the
/// absence rule that watches every sensor. The last six are for equipment and a site
/// this traffic has none of: their filters run on every reading and match none.
const RULES: &str = r#"
[[rules]]
name = "hvac-too-warm"
filter = "subject LIKE 'org/contoso/site/berlin/%/hvac'"
value = "/value"
threshold = { above = 28.0, clear_below = 26.0, count = 3 }

[[rules]]
name = "hvac-room-drift"
filter = "subject LIKE 'org/contoso/site/berlin/%/hvac'"
value = "/value"
group_by = "segment:10"
window = { size = "5m" }
when = "abs(avg - 21.0) > 2"
priority = 7

[[rules]]
name = "hvac-floor-swing"
filter = "subject LIKE 'org/contoso/site/berlin/%/hvac'"
value = "/value"
group_by = "segment:8"
window = { size = "15m", hop = "5m" }
when = "max - min > 3"
priority = 7

[[rules]]
name = "server-room-hot"
filter = "subject LIKE 'org/contoso/site/berlin/building/%/room/%-1-01/hvac'"
value = "/value"
threshold = { above = 27.0, clear_below = 25.0, for = "2m" }

[[rules]]
name = "fire"
filter = "subject LIKE 'org/contoso/site/%/smoke'"
value = "/value"
time = "/ts"
threshold = { above = 0.3, clear_below = 0.2, count = 1 }
type = "io.pigeon.alarm.fire"
priority = 9

[[rules]]
name = "smoke-building-max"
filter = "subject LIKE 'org/contoso/site/berlin/%/smoke'"
value = "/value"
group_by = "segment:6"
window = { size = "1m" }
when = "max > 0.1"

[[rules]]
name = "smoke-battery-low"
filter = "subject LIKE '%/smoke'"
value = "/battery"
threshold = { below = 15.0, clear_above = 20.0 }
priority = 6

[[rules]]
name = "power-report"
filter = "subject LIKE 'org/contoso/site/berlin/%/power'"
value = "/value"
exception = { deadband = 0.5, max_interval = "15m" }

[[rules]]
name = "power-building-15m"
filter = "subject LIKE 'org/contoso/site/berlin/%/power'"
value = "/value"
group_by = "segment:6"
window = { size = "15m" }
priority = 6

[[rules]]
name = "power-overload"
filter = "subject LIKE 'org/contoso/site/berlin/%/power'"
value = "/value"
threshold = { above = 9.0, clear_below = 7.0, count = 3 }

[[rules]]
name = "co2-high"
filter = "subject LIKE 'org/contoso/site/berlin/%/co2'"
value = "/value"
threshold = { above = 1400.0, clear_below = 1000.0, for = "5m" }

[[rules]]
name = "co2-room-avg"
filter = "subject LIKE 'org/contoso/site/berlin/%/co2'"
value = "/value"
group_by = "segment:10"
window = { size = "5m" }
when = "avg > 1000"
priority = 7

[[rules]]
name = "light-floor-avg"
filter = "subject LIKE 'org/contoso/site/berlin/%/light'"
value = "/value"
group_by = "segment:8"
window = { size = "15m" }
priority = 6

[[rules]]
name = "silent-sensor"
# The type the harness's `org/#` subscription gives (pigeon_e2e::READING_TYPE).
filter = "type = 'com.example.sensor.reading'"
absence = { after = "10m" }
priority = 7

[[rules]]
name = "freezer-warm"
filter = "subject LIKE '%/freezer'"
value = "/value"
threshold = { above = -12.0, for = "10m" }

[[rules]]
name = "water-leak"
filter = "subject LIKE '%/leak'"
value = "/value"
threshold = { above = 0.5, count = 1 }

[[rules]]
name = "door-held-open"
filter = "subject LIKE '%/door'"
value = "/value"
threshold = { above = 0.5, for = "5m" }

[[rules]]
name = "paris-hvac-drift"
filter = "subject LIKE 'org/contoso/site/paris/%/hvac'"
value = "/value"
window = { size = "5m" }
when = "abs(avg - 21.0) > 2"

[[rules]]
name = "paris-power-15m"
filter = "subject LIKE 'org/contoso/site/paris/%/power'"
value = "/value"
group_by = "segment:6"
window = { size = "15m" }
priority = 6

[[rules]]
name = "humidity-high"
filter = "subject LIKE 'org/contoso/site/berlin/%/humidity'"
value = "/value"
threshold = { above = 70.0, clear_below = 60.0 }
"#;

/// The memory scenario's rules: a window and an alarm per topic.
const MEMORY_RULES: &str = r#"
[[rules]]
name = "desk-avg"
filter = "subject LIKE 'org/contoso/site/berlin/%/hvac'"
value = "/value"
window = { size = "1h" }
priority = 6

[[rules]]
name = "desk-too-warm"
filter = "subject LIKE 'org/contoso/site/berlin/%/hvac'"
value = "/value"
threshold = { above = 28.0, clear_below = 26.0, count = 3 }
"#;

const MEMORY_TOPICS: u64 = 10_000;
const MEMORY_READINGS_PER_TOPIC: u64 = 3;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if only.first().is_some_and(|a| a == "engine-memory-child") {
        engine_memory_child(only.get(1).map_or("both", String::as_str));
        return;
    }
    let runs = |what: &str| only.is_empty() || only.iter().any(|a| a == what);
    println!("# Pigeon edge rules benchmark (release binaries, mosquitto and relay on loopback)");
    if runs("ingest") {
        let n = env_usize("PIGEON_BENCH_N", 100_000);
        ingest(n, env_usize("PIGEON_BENCH_ROUNDS", 4), false).await;
    }
    if runs("e2e") {
        let n = env_usize("PIGEON_BENCH_N", 100_000);
        ingest(n, env_usize("PIGEON_BENCH_ROUNDS", 3), true).await;
    }
    if runs("memory") {
        memory(env_usize("PIGEON_BENCH_ROUNDS", 3)).await;
    }
    if runs("latency") {
        latency(env_usize("PIGEON_BENCH_ROUNDS", 3)).await;
    }
    if runs("engine") {
        engine_alone(env_usize("PIGEON_BENCH_ROUNDS", 3));
        engine_memory().await;
    }
}

// ---------------------------------------------------------------------------------------
// Traffic

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A number in [0, 1) from `n` (splitmix64): readings vary without a random crate.
fn unit(n: u64) -> f64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn kind_of(sensor: u64) -> &'static str {
    KINDS[(sensor % KINDS.len() as u64) as usize]
}

/// Sensor `s` of the 1,000: `org/contoso/site/berlin/building/41/floor/41-3/room/41-3-07/co2`.
/// Segment 6 is the building, 8 the floor, 10 the room (unique across buildings).
fn sensor_topic(s: u64) -> String {
    let room = s / KINDS.len() as u64;
    let building = 41 + room / 100;
    let floor = 1 + (room % 100) / 20;
    let r = 1 + room % 20;
    format!(
        "org/contoso/site/berlin/building/{building}/floor/{building}-{floor}/room/{building}-{floor}-{r:02}/{}",
        kind_of(s)
    )
}

/// An ordinary value of each kind: no alarm, no window out of its bounds.
fn ordinary_value(kind: &str, n: u64) -> f64 {
    let u = unit(n);
    let v = match kind {
        "hvac" => 19.5 + 3.0 * u,
        "smoke" => 0.01 + 0.02 * u,
        "power" => 2.0 + 3.0 * u,
        "co2" => 600.0 + 300.0 * u,
        _ => 200.0 + 300.0 * u,
    };
    (v * 1000.0).round() / 1000.0
}

fn payload(n: u64, ts: i64, value: f64) -> Vec<u8> {
    serde_json::to_vec(&json!({"n": n, "ts": ts, "value": value, "battery": 60 + n % 40}))
        .expect("serialize a reading")
}

/// Readings `range` of the 1,000 sensors, in turn (reading n from sensor n % 1,000),
/// stamped 1 ms apart from `base_ms`.
fn building_readings(range: std::ops::Range<u64>, base_ms: i64) -> Vec<Reading> {
    range
        .map(|n| {
            let s = n % SENSORS;
            Reading {
                n,
                topic: sensor_topic(s),
                payload: payload(n, base_ms + n as i64, ordinary_value(kind_of(s), n)),
            }
        })
        .collect()
}

/// Which rules a run has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    None,
    /// [`RULES`]: each reading matches 2–4.
    Realistic,
    /// [`RULES`] with every filter widened to every reading's topic and `value` to
    /// `/value` (the report-by-exception rule's deadband 0, so that it keeps nothing back
    /// and every run stores the same readings).
    AllMatch,
}

impl Mix {
    const ALL: [Mix; 3] = [Mix::None, Mix::Realistic, Mix::AllMatch];

    fn label(self) -> &'static str {
        match self {
            Mix::None => "no rules",
            Mix::Realistic => "20 rules, 2-4 match",
            Mix::AllMatch => "20 rules, all match",
        }
    }

    fn rules(self) -> toml::Table {
        let mut table: toml::Table = match self {
            Mix::None => return toml::Table::new(),
            Mix::Realistic | Mix::AllMatch => toml::from_str(RULES).expect("the rules parse"),
        };
        if self == Mix::AllMatch
            && let Some(toml::Value::Array(rules)) = table.get_mut("rules")
        {
            for rule in rules.iter_mut().filter_map(toml::Value::as_table_mut) {
                rule.insert(
                    "filter".into(),
                    "subject LIKE 'org/contoso/site/berlin/%'".into(),
                );
                if rule.contains_key("value") {
                    rule.insert("value".into(), "/value".into());
                }
                if let Some(toml::Value::Table(e)) = rule.get_mut("exception") {
                    e.insert("deadband".into(), 0.0.into());
                }
            }
        }
        table
    }

    fn rule_names(self) -> Vec<String> {
        match self.rules().get("rules") {
            Some(toml::Value::Array(rules)) => rules
                .iter()
                .filter_map(|r| r.get("name").and_then(|n| n.as_str()).map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// What the gateway says

async fn metrics(gw: &Gateway) -> String {
    match gw.get("/metrics").await {
        Ok((200, body)) => body,
        _ => String::new(),
    }
}

fn sample(body: &str, name: &str) -> f64 {
    metric_value(body, name).unwrap_or(0.0)
}

/// The sum of a family's samples (over its labels).
fn family_sum(body: &str, family: &str) -> f64 {
    let prefix = format!("{family}{{");
    body.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Readings the gateway committed: stored, or kept back by a rule (acknowledged, not
/// stored). Derived events and heartbeats are not counted.
fn committed(body: &str) -> u64 {
    (sample(body, "pigeon_gateway_source_records_total{source=\"mqtt\"}")
        + sample(body, "pigeon_gateway_rules_suppressed_readings_total")) as u64
}

/// CPU time (user + system, all threads) the process used so far.
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // After the command name's closing parenthesis: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    match (ticks(14), ticks(15)) {
        // /proc counts in USER_HZ, 100 a second on Linux.
        (Some(u), Some(s)) => Duration::from_millis((u + s) * 10),
        _ => Duration::ZERO,
    }
}

async fn preload(port: u16, readings: Vec<Reading>, tag: &str) {
    let n = readings.len();
    let report = Publisher::publish_all(
        port,
        readings,
        PublisherOptions {
            client_id: format!("bench-pub-{tag}"),
            ..PublisherOptions::default()
        },
        Duration::from_secs(600),
    )
    .await;
    report.assert_all_acked(n);
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------
// The relay's stream files, read as they grow

/// Reads the complete lines appended to the stream files under a directory since the
/// last call (new files included).
struct Tail {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (std::fs::File, Vec<u8>)>,
}

impl Tail {
    fn new(dir: PathBuf) -> Tail {
        Tail {
            dir,
            files: BTreeMap::new(),
        }
    }

    fn poll(&mut self, mut on_line: impl FnMut(&[u8])) {
        let mut paths = Vec::new();
        collect_jsonl(&self.dir, &mut paths);
        for path in paths {
            if !self.files.contains_key(&path) {
                let Ok(f) = std::fs::File::open(&path) else {
                    continue;
                };
                self.files.insert(path.clone(), (f, Vec::new()));
            }
            let Some((file, pending)) = self.files.get_mut(&path) else {
                continue;
            };
            if file.read_to_end(pending).is_err() {
                continue;
            }
            let Some(end) = pending.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            for line in pending[..end].split(|&b| b == b'\n') {
                on_line(line);
            }
            pending.drain(..=end);
        }
    }
}

fn collect_jsonl(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => collect_jsonl(&path, out),
            Ok(t) if t.is_file() && path.extension().is_some_and(|x| x == "jsonl") => {
                out.push(path)
            }
            _ => {}
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// 1. Ingest and end to end, with and without rules

struct IngestRun {
    /// Readings per second.
    rate: f64,
    secs: f64,
    /// Gateway CPU (all threads, from its start) per reading.
    cpu_us: f64,
    suppressed: u64,
    derived: u64,
    /// The rules' own time as the gateway measures it (one reading in eight, scaled).
    eval_secs: f64,
    /// The same by rule, the largest first.
    eval_by_rule: Vec<(String, f64)>,
}

async fn ingest(n: usize, rounds: usize, e2e: bool) {
    if e2e {
        println!(
            "\n## End to end: mosquitto → gateway → relay stream files, {} readings of {} sensors queued at the broker; from the gateway's start until every reading the rules let through is a line in the stream",
            fmt_count(n),
            fmt_count(SENSORS as usize)
        );
    } else {
        println!(
            "\n## Ingest: mosquitto → gateway outbox, relay down, {} readings of {} sensors queued at the broker; from the first reading received until every reading is committed (stored, or kept back by a rule)",
            fmt_count(n),
            fmt_count(SENSORS as usize)
        );
    }
    let mut ratios: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut cpu_ratios: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 1..=rounds {
        let mut base: Option<IngestRun> = None;
        for mix in Mix::ALL {
            let r = ingest_run(mix, n, e2e).await;
            let mut line = format!(
                "round {round}  {:<20} {:>8.0} readings/s  {:>5.2} s  gateway CPU {:>5.1} µs/reading",
                mix.label(),
                r.rate,
                r.secs,
                r.cpu_us
            );
            if let Some(b) = &base {
                let ratio = r.rate / b.rate;
                let cpu_ratio = r.cpu_us / b.cpu_us;
                ratios.entry(mix.label()).or_default().push(ratio);
                cpu_ratios.entry(mix.label()).or_default().push(cpu_ratio);
                line += &format!(
                    "  ratio {ratio:.3} (CPU ×{cpu_ratio:.2}); kept back {}, derived {}, rules' own time {:.2} s",
                    fmt_count(r.suppressed as usize),
                    fmt_count(r.derived as usize),
                    r.eval_secs
                );
            }
            println!("{line}");
            if round == 1 && mix != Mix::None {
                let top: Vec<String> = r
                    .eval_by_rule
                    .iter()
                    .take(5)
                    .map(|(rule, s)| format!("{rule} {s:.3} s"))
                    .collect();
                println!("         rules' own time, the largest: {}", top.join(", "));
            }
            if mix == Mix::None {
                base = Some(r);
            }
        }
    }
    for (label, v) in &ratios {
        let list: Vec<String> = v.iter().map(|r| format!("{r:.3}")).collect();
        println!(
            "median ratio, {label} / no rules: {:.3}  (rounds: {}; gateway CPU per reading ×{:.2})",
            median(v),
            list.join(", "),
            median(&cpu_ratios[label])
        );
    }
}

async fn ingest_run(mix: Mix, n: usize, e2e: bool) -> IngestRun {
    let dir = TestDir::new("bench-rules-ingest");
    let mosquitto = Mosquitto::start_with(&dir, MosquittoOptions::default()).await;
    let relay = if e2e {
        Some(Relay::start(&dir, &[(GATEWAY, TOKEN)]).await)
    } else {
        None
    };
    // Without a relay nothing listens there: the uplink retries, the outbox keeps all.
    let relay_url = relay
        .as_ref()
        .map(Relay::url)
        .unwrap_or_else(|| format!("http://127.0.0.1:{}", free_port()));
    let config = GatewayConfig {
        extra: mix.rules(),
        ..GatewayConfig::new(GATEWAY, TOKEN, &relay_url, mosquitto.port())
    };
    let mut gw = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    gw.stop().await;
    preload(
        mosquitto.port(),
        building_readings(0..n as u64, now_ms()),
        "ingest",
    )
    .await;

    let started = Instant::now();
    gw.restart();
    let pid = gw.proc().pid().expect("pid");
    let deadline = started + Duration::from_secs(600);
    let mut body;
    loop {
        body = metrics(&gw).await;
        if committed(&body) >= n as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "ingest did not finish in 600 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_committed_ms = now_ms() as f64;
    let suppressed = sample(&body, "pigeon_gateway_rules_suppressed_readings_total") as u64;
    let secs = if let Some(relay) = &relay {
        // Every reading not kept back, once, as a line of the gateway's MQTT source.
        let want = n - suppressed as usize;
        let needle = format!("\"source\":\"/gateways/{GATEWAY}/mqtt\"");
        let mut tail = Tail::new(relay.stream_dir());
        let mut seen = 0usize;
        loop {
            tail.poll(|line| {
                if contains(line, needle.as_bytes()) {
                    seen += 1;
                }
            });
            if seen >= want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "end to end did not finish in 600 s: {seen} of {want} lines"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed().as_secs_f64()
    } else {
        let first_us = first_reading_us(gw.data_dir());
        (all_committed_ms - first_us as f64 / 1000.0) / 1000.0
    };
    let cpu = cpu_time(pid);
    // The rules' figures are published every 500 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let body = metrics(&gw).await;
    let mut eval_by_rule: Vec<(String, f64)> = mix
        .rule_names()
        .into_iter()
        .map(|r| {
            let name = format!("pigeon_gateway_rule_evaluation_seconds_total{{rule=\"{r}\"}}");
            (r, sample(&body, &name))
        })
        .collect();
    eval_by_rule.sort_by(|a, b| b.1.total_cmp(&a.1));
    let eval_secs = eval_by_rule.iter().map(|(_, s)| s).sum();
    let derived = family_sum(&body, "pigeon_gateway_rule_events_total") as u64;
    gw.stop().await;
    IngestRun {
        rate: n as f64 / secs,
        secs,
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
        suppressed,
        derived,
        eval_secs,
        eval_by_rule,
    }
}

/// The receive time of the first reading in the outbox (derived events have priorities
/// above 5, readings the default 5), µs since the epoch.
fn first_reading_us(data_dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("outbox.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the outbox");
    conn.query_row(
        "SELECT min(time_us) FROM records WHERE priority = 5",
        [],
        |r| r.get(0),
    )
    .expect("the first reading's time")
}

// ---------------------------------------------------------------------------------------
// 2. Memory for 10,000 groups

struct MemoryRun {
    rss_kib: f64,
    anon_kib: f64,
    hwm_kib: u64,
    groups: f64,
    samples: Vec<u64>,
}

/// Desk sensor `t` of 10,000, each its own topic (and so its own group).
fn desk_topic(t: u64) -> String {
    let building = 41 + t / 2_000;
    let floor = 1 + (t / 200) % 10;
    format!("org/contoso/site/berlin/building/{building}/floor/{building}-{floor}/desk/{t:05}/hvac")
}

async fn memory(rounds: usize) {
    println!(
        "\n## Memory: gateway RSS with {} groups in each of two rules (a 1-hour tumbling window and a threshold alarm per topic; {} readings on each of {} topics, relay up) beside the same traffic without rules; median of 5 samples 1 s apart, from 5 s after every reading was delivered",
        fmt_count(MEMORY_TOPICS as usize),
        MEMORY_READINGS_PER_TOPIC,
        fmt_count(MEMORY_TOPICS as usize)
    );
    let mut diffs = Vec::new();
    let mut anon_diffs = Vec::new();
    for round in 1..=rounds {
        let without = memory_run(false).await;
        let with = memory_run(true).await;
        for (label, r) in [("no rules", &without), ("2 rules", &with)] {
            let samples: Vec<String> = r
                .samples
                .iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect();
            println!(
                "round {round}  {label:<9} RSS {:>5.1} MB (samples {}), RssAnon {:>5.1} MB, peak {:>5.1} MB, group states {}",
                r.rss_kib / 1024.0,
                samples.join(" "),
                r.anon_kib / 1024.0,
                r.hwm_kib as f64 / 1024.0,
                fmt_count(r.groups as usize)
            );
        }
        let diff = with.rss_kib - without.rss_kib;
        let anon = with.anon_kib - without.anon_kib;
        println!(
            "round {round}  difference: RSS {:+.2} MB ({:+.0} B per topic), RssAnon {:+.2} MB ({:+.0} B per topic)",
            diff / 1024.0,
            diff * 1024.0 / MEMORY_TOPICS as f64,
            anon / 1024.0,
            anon * 1024.0 / MEMORY_TOPICS as f64
        );
        diffs.push(diff);
        anon_diffs.push(anon);
    }
    println!(
        "median difference: RSS {:+.2} MB ({:+.0} B per topic), RssAnon {:+.2} MB ({:+.0} B per topic)",
        median(&diffs) / 1024.0,
        median(&diffs) * 1024.0 / MEMORY_TOPICS as f64,
        median(&anon_diffs) / 1024.0,
        median(&anon_diffs) * 1024.0 / MEMORY_TOPICS as f64
    );
}

async fn memory_run(with_rules: bool) -> MemoryRun {
    let dir = TestDir::new("bench-rules-memory");
    let mosquitto = Mosquitto::start_with(&dir, MosquittoOptions::default()).await;
    let relay = Relay::start(&dir, &[(GATEWAY, TOKEN)]).await;
    let config = GatewayConfig {
        extra: if with_rules {
            toml::from_str(MEMORY_RULES).expect("the rules parse")
        } else {
            toml::Table::new()
        },
        ..GatewayConfig::new(GATEWAY, TOKEN, &relay.url(), mosquitto.port())
    };
    let mut gw = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    gw.stop().await;
    let base = now_ms();
    let total = MEMORY_TOPICS * MEMORY_READINGS_PER_TOPIC;
    let readings = (0..total)
        .map(|n| {
            let t = n % MEMORY_TOPICS;
            Reading {
                n,
                topic: desk_topic(t),
                payload: payload(n, base + n as i64, ordinary_value("hvac", n)),
            }
        })
        .collect();
    preload(mosquitto.port(), readings, "memory").await;
    gw.restart();
    let pid = gw.proc().pid().expect("pid");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let body = metrics(&gw).await;
        if committed(&body) >= total && sample(&body, "pigeon_gateway_outbox_records") == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the memory run did not deliver everything in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut rss = Vec::new();
    let mut anon = Vec::new();
    for _ in 0..5 {
        rss.push(rss_kib(pid, "VmRSS:"));
        anon.push(rss_kib(pid, "RssAnon:"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let body = metrics(&gw).await;
    let groups = family_sum(&body, "pigeon_gateway_rule_groups");
    let hwm = rss_kib(pid, "VmHWM:");
    gw.stop().await;
    let as_f64 = |v: &[u64]| v.iter().map(|k| *k as f64).collect::<Vec<_>>();
    MemoryRun {
        rss_kib: median(&as_f64(&rss)),
        anon_kib: median(&as_f64(&anon)),
        hwm_kib: hwm,
        groups,
        samples: rss,
    }
}

// ---------------------------------------------------------------------------------------
// 3. Alarm latency

const ALARMS: usize = 300;
const ALARM_SPACING: Duration = Duration::from_millis(50);
const BACKGROUND_RATE: u32 = 500;
const DETECTORS: u64 = 10;

/// What one latency run saw, in ms from each publish call.
struct LatencyRun {
    /// To the fire event's line (rules runs).
    derived: Vec<f64>,
    /// To the smoke reading's own line.
    reading: Vec<f64>,
    /// To mosquitto's PUBACK.
    to_ack: Vec<f64>,
    background_acked: usize,
}

fn figures(sorted: &[f64]) -> String {
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {ALARMS})",
        percentile(sorted, 50.0),
        percentile(sorted, 90.0),
        percentile(sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN),
        sorted.len()
    )
}

async fn latency(rounds: usize) {
    println!(
        "\n## Alarm latency: {ALARMS} smoke readings {} ms apart on {DETECTORS} detectors, alternately 0.5 and 0.05, so that each raises or clears the fire alarm (count = 1, priority 9) of the 20 rules of the ingest run; {BACKGROUND_RATE} other readings/s flowing; relay up. From the publish call to the line in the relay's stream files (read every 1 ms). Beside it, the same without rules: the smoke reading's own line (the smoke subscription has priority 9 in both, so it is sent at once)",
        ALARM_SPACING.as_millis()
    );
    let mut pooled_derived = Vec::new();
    let mut pooled_plain = Vec::new();
    for round in 1..=rounds {
        for with_rules in [false, true] {
            let mut r = latency_run(with_rules).await;
            r.derived.sort_by(f64::total_cmp);
            r.reading.sort_by(f64::total_cmp);
            r.to_ack.sort_by(f64::total_cmp);
            if with_rules {
                println!(
                    "round {round}  20 rules: fire event's line: {}",
                    figures(&r.derived)
                );
                println!(
                    "                 the smoke reading's own line: p50 {:.1} ms; PUBACK p50 {:.2} ms, p99 {:.2} ms; background acknowledged {}",
                    percentile(&r.reading, 50.0),
                    percentile(&r.to_ack, 50.0),
                    percentile(&r.to_ack, 99.0),
                    fmt_count(r.background_acked)
                );
                pooled_derived.extend(r.derived);
            } else {
                println!(
                    "round {round}  no rules: smoke reading's line: {}",
                    figures(&r.reading)
                );
                pooled_plain.extend(r.reading);
            }
        }
    }
    pooled_derived.sort_by(f64::total_cmp);
    pooled_plain.sort_by(f64::total_cmp);
    println!(
        "all rounds, 20 rules, fire event: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} events)",
        percentile(&pooled_derived, 50.0),
        percentile(&pooled_derived, 90.0),
        percentile(&pooled_derived, 99.0),
        pooled_derived.last().copied().unwrap_or(f64::NAN),
        pooled_derived.len()
    );
    println!(
        "all rounds, no rules, smoke reading: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} readings)",
        percentile(&pooled_plain, 50.0),
        percentile(&pooled_plain, 90.0),
        percentile(&pooled_plain, 99.0),
        pooled_plain.last().copied().unwrap_or(f64::NAN),
        pooled_plain.len()
    );
}

/// One subscription per kind instead of `org/#`, the smoke detectors' at priority 9.
fn per_kind_subscriptions(config: &mut GatewayConfig) {
    config.subscriptions = KINDS
        .iter()
        .map(|kind| Subscription {
            filter: format!("org/contoso/site/berlin/building/+/floor/+/room/+/{kind}"),
            qos: 1,
            event_type: pigeon_e2e::READING_TYPE.to_string(),
            ttl: None,
        })
        .collect();
    config.subscription_options = KINDS
        .iter()
        .map(|kind| {
            let mut t = toml::Table::new();
            if *kind == "smoke" {
                t.insert("priority".into(), 9.into());
            }
            t
        })
        .collect();
}

/// When lines appeared in the stream: the fire events by the reading time in their
/// data, the smoke readings by their `ts`.
#[derive(Default)]
struct Seen {
    derived: HashMap<i64, Instant>,
    reading: HashMap<i64, Instant>,
}

fn note_line(line: &[u8], seen: &Mutex<Seen>) {
    let fire = contains(
        line,
        format!("\"/gateways/{GATEWAY}/rules/fire\"").as_bytes(),
    );
    let smoke = !fire
        && contains(line, format!("\"/gateways/{GATEWAY}/mqtt\"").as_bytes())
        && contains(line, b"/smoke\"");
    if !fire && !smoke {
        return;
    }
    let at = Instant::now();
    let Ok(event) = serde_json::from_slice::<Value>(line) else {
        return;
    };
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    if fire {
        let time = event["data"]["time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        if let Some(t) = time {
            seen.derived.entry(t.timestamp_millis()).or_insert(at);
        }
    } else if let Some(ts) = event["data"]["ts"].as_i64() {
        seen.reading.entry(ts).or_insert(at);
    }
}

async fn latency_run(with_rules: bool) -> LatencyRun {
    let dir = TestDir::new("bench-rules-latency");
    let mosquitto = Mosquitto::start_with(&dir, MosquittoOptions::default()).await;
    let relay = Relay::start(&dir, &[(GATEWAY, TOKEN)]).await;
    let mut config = GatewayConfig {
        extra: if with_rules {
            Mix::Realistic.rules()
        } else {
            toml::Table::new()
        },
        ..GatewayConfig::new(GATEWAY, TOKEN, &relay.url(), mosquitto.port())
    };
    per_kind_subscriptions(&mut config);
    let mut gw = Gateway::start_subscribed(&dir, config, &mosquitto).await;

    // The stream, read every millisecond on a thread of its own.
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tail_thread = {
        let seen = seen.clone();
        let stop = stop.clone();
        let mut tail = Tail::new(relay.stream_dir());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                tail.poll(|line| note_line(line, &seen));
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    // Background: the 800 sensors that are not smoke detectors, 500 readings a second,
    // for the warm-up, the alarms and a tail.
    let warmup = Duration::from_secs(3);
    let span = warmup + ALARM_SPACING * ALARMS as u32 + Duration::from_secs(2);
    let count = (span.as_secs_f64() * f64::from(BACKGROUND_RATE)) as usize;
    let base = now_ms();
    let background: Vec<Reading> = (0..)
        .filter(|n| kind_of(n % SENSORS) != "smoke")
        .take(count)
        .map(|n| {
            let s = n % SENSORS;
            Reading {
                n,
                topic: sensor_topic(s),
                payload: payload(n, base + n as i64, ordinary_value(kind_of(s), n)),
            }
        })
        .collect();
    let background = Publisher::spawn(
        mosquitto.port(),
        background,
        PublisherOptions {
            client_id: "bench-background".into(),
            rate_per_sec: Some(BACKGROUND_RATE),
            ..PublisherOptions::default()
        },
    );

    // The smoke detectors' own client: when the broker acknowledged each alarm reading
    // (one in flight at a time, so they come in order).
    let mut options = MqttOptions::new("bench-smoke", "127.0.0.1", mosquitto.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let acks_task = {
        let acks = acks.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Instant::now()),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        })
    };
    tokio::time::sleep(warmup).await;

    // Detector k % 10 gets reading k: 0.5, then 0.05, then 0.5… each raises or clears.
    let detectors: Vec<String> = (0..SENSORS)
        .filter(|s| kind_of(*s) == "smoke")
        .take(DETECTORS as usize)
        .map(sensor_topic)
        .collect();
    let mut sent: Vec<(i64, Instant)> = Vec::with_capacity(ALARMS);
    let start = tokio::time::Instant::now();
    let mut last_ts = 0;
    for k in 0..ALARMS {
        tokio::time::sleep_until(start + ALARM_SPACING * k as u32).await;
        let value = if (k as u64 / DETECTORS).is_multiple_of(2) {
            0.5
        } else {
            0.05
        };
        // The reading's time, unique: the fire event carries it back in its data.
        let ts = now_ms().max(last_ts + 1);
        last_ts = ts;
        let topic = detectors[k % DETECTORS as usize].clone();
        let at = Instant::now();
        client
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                payload(1_000_000 + k as u64, ts, value),
            )
            .await
            .expect("publish a smoke reading");
        sent.push((ts, at));
    }
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let done = {
            let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.reading.len() >= ALARMS && (!with_rules || seen.derived.len() >= ALARMS)
        };
        if done || Instant::now() > give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    tail_thread.join().expect("the stream reader");
    let report = background.finish(Duration::from_secs(60)).await;
    client.disconnect().await.ok();
    acks_task.abort();
    gw.stop().await;

    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    let acks = acks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let since = |map: &HashMap<i64, Instant>| -> Vec<f64> {
        sent.iter()
            .filter_map(|(ts, at)| {
                map.get(ts)
                    .map(|s| s.duration_since(*at).as_secs_f64() * 1e3)
            })
            .collect()
    };
    LatencyRun {
        derived: since(&seen.derived),
        reading: since(&seen.reading),
        to_ack: sent
            .iter()
            .zip(&acks)
            .map(|((_, at), ack)| ack.duration_since(*at).as_secs_f64() * 1e3)
            .collect(),
        background_acked: report.acked.len(),
    }
}

// ---------------------------------------------------------------------------------------
// 4. The rules engine alone, to tell its share from the outbox's

const ENGINE_READINGS: u64 = 100_000;

/// A reading's attributes as the gateway gives them to filters: a fresh string for each
/// one asked for.
struct Attrs<'a> {
    id: &'a str,
    subject: &'a str,
}

impl pigeon_cesql::Event for Attrs<'_> {
    fn attribute(&self, name: &str) -> Option<pigeon_cesql::Value> {
        let text = |s: &str| Some(pigeon_cesql::Value::String(s.to_owned()));
        match name {
            "id" => text(self.id),
            "source" => text("/gateways/bench-gw/mqtt"),
            "type" => text(pigeon_e2e::READING_TYPE),
            "subject" => text(self.subject),
            "specversion" => text("1.0"),
            "datacontenttype" => text("application/json"),
            _ => None,
        }
    }
}

fn engine_of(rules: &toml::Table) -> pigeon_rules::Engine {
    let rules = match rules.get("rules") {
        Some(toml::Value::Array(rules)) => rules
            .iter()
            .map(|r| {
                let config: pigeon_rules::RuleConfig = r.clone().try_into().expect("a rule");
                config.check().expect("a valid rule")
            })
            .collect(),
        _ => Vec::new(),
    };
    pigeon_rules::Engine::new(rules)
}

/// Runs `readings` (id, topic, data) through `engine` as the outbox writer does, taking
/// the changed states every `commit_every` readings. Returns the time on readings and
/// the time taking (serializing) the states.
fn feed(
    engine: &mut pigeon_rules::Engine,
    readings: &[(String, String, String)],
    start_ms: i64,
    commit_every: usize,
) -> (Duration, Duration) {
    let mut on_readings = Duration::ZERO;
    let mut on_states = Duration::ZERO;
    let mut t = Instant::now();
    for (i, (id, topic, data)) in readings.iter().enumerate() {
        let attributes = Attrs { id, subject: topic };
        let reading = pigeon_rules::Reading {
            id,
            attributes: &attributes,
            data: Some(data),
        };
        // 10,000 readings a second of arrival time.
        std::hint::black_box(engine.on_reading(&reading, start_ms + i as i64 / 10));
        if (i + 1) % commit_every == 0 || i + 1 == readings.len() {
            on_readings += t.elapsed();
            t = Instant::now();
            std::hint::black_box(engine.take_changes());
            on_states += t.elapsed();
            t = Instant::now();
        }
    }
    (on_readings, on_states)
}

fn as_engine_input(readings: Vec<Reading>) -> Vec<(String, String, String)> {
    readings
        .into_iter()
        .map(|r| {
            (
                format!("0190c0de-0000-7000-8000-{:012x}", r.n),
                r.topic,
                String::from_utf8(r.payload).expect("JSON is UTF-8"),
            )
        })
        .collect()
}

fn engine_alone(rounds: usize) {
    println!(
        "\n## The rules engine alone (pigeon-rules in this process, no outbox, no I/O): the ingest runs' {} readings, the changed states taken every 4,096 (a group commit); CPU µs per reading, median of {rounds}",
        fmt_count(ENGINE_READINGS as usize)
    );
    let readings = as_engine_input(building_readings(0..ENGINE_READINGS, now_ms()));
    let n = readings.len() as f64;
    for mix in [Mix::Realistic, Mix::AllMatch] {
        let mut on_readings = Vec::new();
        let mut on_states = Vec::new();
        for _ in 0..rounds {
            let mut engine = engine_of(&mix.rules());
            let (r, s) = feed(&mut engine, &readings, now_ms(), 4096);
            on_readings.push(r.as_secs_f64() * 1e6 / n);
            on_states.push(s.as_secs_f64() * 1e6 / n);
        }
        println!(
            "{:<20} {:>5.2} µs/reading through the rules, {:>5.2} µs/reading serializing the changed states",
            mix.label(),
            median(&on_readings),
            median(&on_states)
        );
    }
    let filter = pigeon_cesql::Expression::parse("subject LIKE 'org/contoso/site/berlin/%/hvac'")
        .expect("a filter");
    let mut per_filter = Vec::new();
    let mut per_parse = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        for (id, topic, _) in &readings {
            std::hint::black_box(filter.matches(&Attrs { id, subject: topic }));
        }
        per_filter.push(t.elapsed().as_secs_f64() * 1e6 / n);
        let t = Instant::now();
        for (_, _, data) in &readings {
            std::hint::black_box(serde_json::from_str::<Value>(data).ok());
        }
        per_parse.push(t.elapsed().as_secs_f64() * 1e6 / n);
    }
    println!(
        "of which one filter `subject LIKE 'org/contoso/site/berlin/%/hvac'`: {:.2} µs/reading (20 are tried on every reading); parsing the reading's JSON once: {:.2} µs",
        median(&per_filter),
        median(&per_parse)
    );
}

/// The engine's memory for the memory scenario's traffic, measured in a child process
/// (this bench binary run again with `engine-memory-child <rules>`): its anonymous RSS
/// before and after, so that nothing else of this process is counted.
async fn engine_memory() {
    println!(
        "\n## The rules engine's memory alone (a child process: RssAnon after the memory scenario's {} readings minus before; no outbox, no SQLite)",
        fmt_count((MEMORY_TOPICS * MEMORY_READINGS_PER_TOPIC) as usize)
    );
    let exe = std::env::current_exe().expect("this bench's path");
    for which in ["both", "window", "threshold"] {
        let out = tokio::process::Command::new(&exe)
            .args(["engine-memory-child", which])
            .output()
            .await
            .expect("run the child");
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

fn engine_memory_child(which: &str) {
    let mut rules: toml::Table = toml::from_str(MEMORY_RULES).expect("the rules parse");
    if let Some(toml::Value::Array(list)) = rules.get_mut("rules") {
        match which {
            "window" => list.truncate(1),
            "threshold" => {
                list.remove(0);
            }
            _ => {}
        }
    }
    let pid = std::process::id();
    let before = rss_kib(pid, "RssAnon:");
    let mut engine = engine_of(&rules);
    let start = now_ms();
    let total = MEMORY_TOPICS * MEMORY_READINGS_PER_TOPIC;
    for chunk in (0..total).collect::<Vec<_>>().chunks(4096) {
        let readings: Vec<(String, String, String)> = chunk
            .iter()
            .map(|&n| {
                (
                    format!("0190c0de-0000-7000-8000-{n:012x}"),
                    desk_topic(n % MEMORY_TOPICS),
                    String::from_utf8(payload(n, start + n as i64, ordinary_value("hvac", n)))
                        .expect("JSON is UTF-8"),
                )
            })
            .collect();
        feed(&mut engine, &readings, start, 4096);
    }
    let after = rss_kib(pid, "RssAnon:");
    let groups: u64 = engine.stats().map(|(_, s)| s.groups).sum();
    let grown = after.saturating_sub(before) as f64;
    println!(
        "{which:<9} rules: {:>5.2} MB for {} group states, {:.0} B per topic",
        grown / 1024.0,
        fmt_count(groups as usize),
        grown * 1024.0 / MEMORY_TOPICS as f64
    );
    std::hint::black_box(&engine);
}
