//! The rules at work: each reading through every rule, windows closed by the clock, the
//! derived events, and the groups' states the caller persists.
//!
//! The engine is deterministic: the same readings at the same times, from the same saved
//! states, give the same derived events with the same ids. The gateway relies on that:
//! it commits the readings, the derived events and the changed states in one
//! transaction, so a crash before the commit replays the readings (the broker sends
//! them again) against the states of the last commit.

use std::collections::{HashMap, VecDeque};

use pigeon_cesql::{Event, Value as CeValue};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::config::{GroupBy, Kind, Rule, TimeSource};
use crate::exception::LastForwarded;
use crate::threshold::{AlarmState, Transition};
use crate::window::{Accumulator, Bounds, FIGURES, Windowing};

/// A reading as the rules see it.
pub struct Reading<'a> {
    /// The reading's CloudEvent id (derived events name the readings behind them).
    pub id: &'a str,
    /// Its attributes (`subject`, `source`, `type`, extensions) for filters and grouping.
    pub attributes: &'a dyn Event,
    /// Its data as JSON text, if it is JSON.
    pub data: Option<&'a str>,
}

/// A derived event: the gateway wraps it as a CloudEvent with source
/// `/gateways/<id>/rules/<rule>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub rule: String,
    /// Deterministic from the rule, the group and the window or crossing.
    pub id: String,
    pub event_type: String,
    /// The group key.
    pub subject: String,
    pub priority: u8,
    /// Milliseconds since the epoch: the window's end, or the reading's time.
    pub time_ms: i64,
    pub data: Value,
}

/// What the rules decided about one reading.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub derived: Vec<Derived>,
    /// Whether the reading is kept from the relay (a rule with `suppress = true` consumed
    /// it, or report by exception did not forward it).
    pub suppress: bool,
}

/// A group's state that changed: the caller saves it (`state: None` deletes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub rule: String,
    pub group: String,
    pub state: Option<String>,
}

/// Per-rule counters for status and /metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RuleStats {
    /// Readings the filter was evaluated on.
    pub evaluated: u64,
    /// Readings that passed the filter.
    pub matched: u64,
    /// Derived events emitted.
    pub emitted: u64,
    /// Matching readings without a usable value or time.
    pub unreadable: u64,
    /// Readings too late for their window.
    pub late: u64,
    /// Groups dropped because the rule had `max_groups` of them.
    pub evicted: u64,
    pub groups: u64,
    /// Groups whose alarm is raised (threshold rules) or that are silent (absence rules)
    /// now.
    pub active: u64,
    /// Time spent on the rule's readings, in nanoseconds (measured on one reading in
    /// eight and scaled up).
    pub eval_ns: u64,
}

/// One group's state, by rule kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GroupState {
    Alarm {
        alarm: AlarmState,
        /// The ids of the current run's readings (the last ten).
        run: Vec<String>,
    },
    Windows {
        /// Open windows, by start.
        open: Vec<WindowState>,
    },
    Sliding {
        /// The readings inside the window, oldest first: time, value, id.
        readings: VecDeque<(i64, f64, String)>,
    },
    Exception {
        last: LastForwarded,
    },
    Absence {
        last_seen: i64,
        silent: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    pub start: i64,
    pub end: i64,
    pub acc: Accumulator,
    pub first_id: String,
    pub last_id: String,
}

/// At most this many readings are kept in a sliding window; older ones go first.
pub const MAX_SLIDING_READINGS: usize = 1_000;
const MAX_RUN_IDS: usize = 10;

struct Group {
    state: GroupState,
    /// When it last changed (the engine's own counter), for dropping the stalest.
    touched: u64,
}

struct RuleRun {
    rule: Rule,
    groups: HashMap<String, Group>,
    stats: RuleStats,
    /// Its bit in [`FilterCache`]'s answers, if its filter reads only attributes that
    /// are the same for every reading of a topic and subscription.
    cached_bit: Option<u32>,
}

/// The attributes a filter may read for its answer to be cached per reading kind: the
/// same for every reading on one topic from one input.
const STABLE_ATTRIBUTES: [&str; 4] = ["subject", "type", "source", "specversion"];

/// At most this many kinds of reading (topic, type, source) have their filters'
/// answers remembered; past it the cache starts afresh.
const FILTER_CACHE_ENTRIES: usize = 16_384;

/// The filters' answers per kind of reading: 20 LIKE filters cost ~13 µs a reading on
/// this machine's cores, a lookup well under one. Keyed by a 128-bit hash of
/// (type, source, subject) from two independently keyed hashers (a collision between
/// two kinds among 16,384 has a probability near 2^-100).
struct FilterCache {
    answers: HashMap<u128, u64>,
    keys: (std::hash::RandomState, std::hash::RandomState),
}

impl FilterCache {
    fn new() -> FilterCache {
        FilterCache {
            answers: HashMap::new(),
            keys: (std::hash::RandomState::new(), std::hash::RandomState::new()),
        }
    }

    fn key(&self, attributes: &dyn Event) -> u128 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let (mut a, mut b) = (self.keys.0.build_hasher(), self.keys.1.build_hasher());
        for name in ["type", "source", "subject"] {
            let v = attributes.attribute(name).map(|v| match v {
                CeValue::String(s) => s,
                CeValue::Integer(i) => i.to_string(),
                CeValue::Bool(b) => b.to_string(),
            });
            v.hash(&mut a);
            v.hash(&mut b);
        }
        u128::from(a.finish()) << 64 | u128::from(b.finish())
    }
}

/// Every configured rule, with its groups.
pub struct Engine {
    rules: Vec<RuleRun>,
    clock: u64,
    dirty: Vec<(usize, String)>,
    /// The time of the last tick: a window it closed stays closed for a reading that
    /// arrived a moment before the tick but reaches the engine after it. It follows the
    /// clock back when the clock jumps back.
    last_tick: i64,
    /// Counts evaluations, to time one in [`TIME_ONE_IN`].
    evaluations: u64,
    /// The cacheable filters' answers per kind of reading.
    filters: FilterCache,
}

/// Evaluation time is measured on one reading in this many, and scaled up.
const TIME_ONE_IN: u64 = 8;

impl Engine {
    pub fn new(rules: Vec<Rule>) -> Engine {
        let mut bits = 0u32;
        Engine {
            rules: rules
                .into_iter()
                .map(|rule| {
                    let stable = rule.filter.as_ref().is_some_and(|f| {
                        f.attributes()
                            .iter()
                            .all(|a| STABLE_ATTRIBUTES.contains(&a.as_str()))
                    });
                    let cached_bit = (stable && bits < 64).then(|| {
                        bits += 1;
                        bits - 1
                    });
                    RuleRun {
                        rule,
                        groups: HashMap::new(),
                        stats: RuleStats::default(),
                        cached_bit,
                    }
                })
                .collect(),
            clock: 0,
            dirty: Vec::new(),
            last_tick: i64::MIN,
            evaluations: 0,
            filters: FilterCache::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The configured rules, in order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|r| &r.rule)
    }

    /// Forgets every group (their states and the unsaved changes), keeping the counters:
    /// the caller restores the states of its last commit after a commit failed.
    pub fn forget_groups(&mut self) {
        for run in &mut self.rules {
            run.groups.clear();
            run.stats.groups = 0;
        }
        self.dirty.clear();
    }

    /// Whether any rule acts on the clock alone (windows that close, sensors that go
    /// silent): only then does [`Engine::tick`] have anything to do.
    pub fn ticks(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.rule.kind, Kind::Window { .. } | Kind::Absence { .. }))
    }

    /// Puts back a group's saved state. `Ok(false)` if no configured rule has that name,
    /// or the rule has `max_groups` groups already (the caller deletes it); an error if the state cannot be read or is of another
    /// kind than the rule (the rule changed: it starts afresh for that group).
    pub fn restore(&mut self, rule: &str, group: &str, state: &str) -> Result<bool, String> {
        let Some(run) = self.rules.iter_mut().find(|r| r.rule.name == rule) else {
            return Ok(false);
        };
        let state: GroupState = serde_json::from_str(state).map_err(|e| {
            format!("rule {rule:?}, group {group:?}: a saved state unreadable: {e}")
        })?;
        if !kind_fits(&run.rule.kind, &state) {
            return Err(format!(
                "rule {rule:?}, group {group:?}: the saved state is of another kind of rule"
            ));
        }
        if run.groups.len() >= run.rule.max_groups {
            // max_groups was lowered: the groups past it are not restored (the caller
            // deletes their states).
            run.stats.evicted += 1;
            return Ok(false);
        }
        self.clock += 1;
        run.groups.insert(
            group.to_owned(),
            Group {
                state,
                touched: self.clock,
            },
        );
        run.stats.groups = run.groups.len() as u64;
        Ok(true)
    }

    /// Whether a state changed since [`Engine::take_changes`] was last called.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The changed states since the last call, for the caller to save with the
    /// readings and derived events of the same commit.
    pub fn take_changes(&mut self) -> Vec<StateChange> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort();
        dirty.dedup();
        dirty
            .into_iter()
            .map(|(i, group)| {
                let run = &self.rules[i];
                StateChange {
                    rule: run.rule.name.clone(),
                    state: run
                        .groups
                        .get(&group)
                        .map(|g| serde_json::to_string(&g.state).expect("states serialize")),
                    group,
                }
            })
            .collect()
    }

    /// Each rule's counters. Counting the active groups walks a threshold or absence
    /// rule's groups: call it about once a second, not per reading.
    pub fn stats(&self) -> impl Iterator<Item = (&str, RuleStats)> {
        self.rules.iter().map(|r| {
            let active = r
                .groups
                .values()
                .filter(|g| match &g.state {
                    GroupState::Alarm { alarm, .. } => alarm.active,
                    GroupState::Absence { silent, .. } => *silent,
                    _ => false,
                })
                .count() as u64;
            (r.rule.name.as_str(), RuleStats { active, ..r.stats })
        })
    }

    /// Runs a reading that arrived at `now` (ms since the epoch) through every rule.
    pub fn on_reading(&mut self, reading: &Reading<'_>, now: i64) -> Outcome {
        let mut outcome = Outcome::default();
        let mut data: Option<Option<Value>> = None;
        self.evaluations += 1;
        let timed = self.evaluations.is_multiple_of(TIME_ONE_IN);
        let passes = self.cached_filters(reading.attributes);
        for i in 0..self.rules.len() {
            let started = timed.then(std::time::Instant::now);
            let passes = self.rules[i].cached_bit.map(|bit| passes >> bit & 1 == 1);
            self.on_reading_in(i, reading, now, passes, &mut data, &mut outcome);
            if let Some(started) = started {
                let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let stats = &mut self.rules[i].stats;
                stats.eval_ns = stats.eval_ns.saturating_add(ns.saturating_mul(TIME_ONE_IN));
            }
        }
        outcome
    }

    /// The answers of the cacheable filters for this kind of reading (bit `cached_bit`
    /// of each such rule), from the cache or evaluated once and remembered.
    fn cached_filters(&mut self, attributes: &dyn Event) -> u64 {
        if self.rules.iter().all(|r| r.cached_bit.is_none()) {
            return 0;
        }
        let key = self.filters.key(attributes);
        if let Some(answers) = self.filters.answers.get(&key) {
            return *answers;
        }
        let mut answers = 0u64;
        for run in &self.rules {
            if let (Some(bit), Some(f)) = (run.cached_bit, &run.rule.filter)
                && f.matches(attributes)
            {
                answers |= 1 << bit;
            }
        }
        if self.filters.answers.len() >= FILTER_CACHE_ENTRIES {
            self.filters.answers.clear();
        }
        self.filters.answers.insert(key, answers);
        answers
    }

    /// One reading through rule `i`: `passes` is its filter's cached answer, if it has
    /// one; `data` is the reading's data parsed once, by the first rule that needs it.
    fn on_reading_in(
        &mut self,
        i: usize,
        reading: &Reading<'_>,
        now: i64,
        passes: Option<bool>,
        data: &mut Option<Option<Value>>,
        outcome: &mut Outcome,
    ) {
        let run = &mut self.rules[i];
        run.stats.evaluated += 1;
        let passes = passes.unwrap_or_else(|| {
            run.rule
                .filter
                .as_ref()
                .is_none_or(|f| f.matches(reading.attributes))
        });
        if !passes {
            return;
        }
        run.stats.matched += 1;
        let Some(group) = group_key(&run.rule.group_by, reading.attributes) else {
            run.stats.unreadable += 1;
            return;
        };
        let parsed = data.get_or_insert_with(|| {
            reading
                .data
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
        });
        let value = match &run.rule.value {
            None => None,
            Some(pointer) => match parsed.as_ref().and_then(|v| number_at(v, pointer)) {
                Some(v) => Some(v),
                None => {
                    run.stats.unreadable += 1;
                    return;
                }
            },
        };
        let t = match &run.rule.time {
            TimeSource::Arrival => now,
            TimeSource::Data(pointer) => match parsed.as_ref().and_then(|v| time_at(v, pointer)) {
                Some(t) => t,
                None => {
                    run.stats.unreadable += 1;
                    return;
                }
            },
        };
        self.clock += 1;
        let (derived, suppress) = self.apply(i, group, t, value, reading.id, now);
        outcome.suppress |= suppress;
        outcome.derived.extend(derived);
    }

    /// Closes the windows whose end plus allowed lateness is past, and finds the groups
    /// silent for longer than their absence rule allows. Call it every second or so.
    pub fn tick(&mut self, now: i64) -> Vec<Derived> {
        self.last_tick = now;
        let mut out = Vec::new();
        for i in 0..self.rules.len() {
            let run = &mut self.rules[i];
            if !run.rule.ticks() {
                continue;
            }
            let first_of_rule = out.len();
            let lateness = run.rule.allowed_lateness_ms;
            let mut changed = Vec::new();
            for (group, g) in &mut run.groups {
                match (&run.rule.kind, &mut g.state) {
                    (Kind::Window { when, .. }, GroupState::Windows { open }) => {
                        let before = open.len();
                        open.retain(|w| {
                            let closing = w.end.saturating_add(lateness) <= now;
                            if closing && when.as_ref().is_none_or(|c| c.holds(&w.acc.figures())) {
                                out.push(window_event(&run.rule, group, w));
                            }
                            !closing
                        });
                        if open.len() != before {
                            changed.push(group.clone());
                        }
                    }
                    (Kind::Absence { after_ms }, GroupState::Absence { last_seen, silent })
                        if !*silent && now.saturating_sub(*last_seen) >= *after_ms =>
                    {
                        *silent = true;
                        out.push(absence_event(&run.rule, group, *last_seen, now, true));
                        changed.push(group.clone());
                    }
                    _ => {}
                }
            }
            // The groups are a HashMap: order what one tick derives so that it is the same
            // in every process (window end, then group).
            out[first_of_rule..]
                .sort_by(|a, b| (a.time_ms, &a.subject).cmp(&(b.time_ms, &b.subject)));
            for group in changed {
                if matches!(
                    run.groups.get(&group).map(|g| &g.state),
                    Some(GroupState::Windows { open }) if open.is_empty()
                ) {
                    run.groups.remove(&group);
                }
                self.dirty.push((i, group));
            }
            let run = &mut self.rules[i];
            run.stats.groups = run.groups.len() as u64;
        }
        self.count_emitted(&out);
        out
    }

    fn count_emitted(&mut self, derived: &[Derived]) {
        for d in derived {
            if let Some(run) = self.rules.iter_mut().find(|r| r.rule.name == d.rule) {
                run.stats.emitted += 1;
            }
        }
    }

    /// Makes room for a group the rule has not seen (dropping the stalest at
    /// `max_groups`) and gives it a fresh state.
    fn admit_group(&mut self, i: usize, group: &str, now: i64) {
        let run = &mut self.rules[i];
        if run.groups.contains_key(group) {
            return;
        }
        if run.groups.len() >= run.rule.max_groups
            && let Some(stalest) = run
                .groups
                .iter()
                .min_by_key(|(_, g)| g.touched)
                .map(|(k, _)| k.clone())
        {
            run.groups.remove(&stalest);
            run.stats.evicted += 1;
            self.dirty.push((i, stalest));
        }
        let run = &mut self.rules[i];
        let state = fresh_state(&run.rule.kind, now);
        run.groups.insert(
            group.to_owned(),
            Group {
                state,
                touched: self.clock,
            },
        );
    }

    /// One reading in one rule's group: the derived events and whether it is suppressed.
    fn apply(
        &mut self,
        i: usize,
        group: String,
        t: i64,
        value: Option<f64>,
        id: &str,
        now: i64,
    ) -> (Vec<Derived>, bool) {
        self.admit_group(i, &group, now);
        let clock = self.clock;
        let run = &mut self.rules[i];
        let g = run.groups.get_mut(&group).expect("admitted above");
        g.touched = clock;
        let rule = &run.rule;
        let step = match (&rule.kind, &mut g.state) {
            (Kind::Threshold(th), GroupState::Alarm { alarm, run: ids }) => {
                threshold_step(rule, th, alarm, ids, &group, t, value, id)
            }
            (Kind::Window { windowing, .. }, GroupState::Windows { open }) => window_step(
                rule,
                *windowing,
                open,
                t,
                value,
                id,
                now.max(self.last_tick),
            ),
            (Kind::Window { windowing, when }, GroupState::Sliding { readings }) => sliding_step(
                rule,
                windowing.size_ms(),
                when.as_ref(),
                readings,
                &group,
                t,
                value,
                id,
            ),
            (Kind::Exception(ex), GroupState::Exception { last }) => Step {
                suppress: Some(!ex.observe(last, t, value.expect("exception rules have a value"))),
                ..Step::default()
            },
            (Kind::Absence { .. }, GroupState::Absence { last_seen, silent }) => {
                let mut step = Step::default();
                if *silent {
                    step.derived
                        .push(absence_event(rule, &group, *last_seen, now, false));
                    *silent = false;
                }
                *last_seen = (*last_seen).max(now);
                step
            }
            _ => unreachable!("a group's state is made for its rule's kind"),
        };
        let Step {
            derived,
            suppress,
            late,
        } = step;
        let suppress = suppress.unwrap_or(rule.suppress);
        if late {
            run.stats.late += 1;
        }
        if matches!(&g.state, GroupState::Windows { open } if open.is_empty()) {
            // Only late readings: nothing open to keep.
            run.groups.remove(&group);
        }
        run.stats.groups = run.groups.len() as u64;
        self.dirty.push((i, group));
        self.count_emitted(&derived);
        (derived, suppress)
    }
}

/// What one reading did in one rule: the events it derived, whether it is suppressed
/// (`None`: as the rule's `suppress` says) and whether it came too late.
#[derive(Default)]
struct Step {
    derived: Vec<Derived>,
    suppress: Option<bool>,
    late: bool,
}

/// A threshold rule: the alarm's state, and the ids of the run towards the other state.
#[allow(clippy::too_many_arguments)]
fn threshold_step(
    rule: &Rule,
    th: &crate::threshold::Threshold,
    alarm: &mut AlarmState,
    ids: &mut Vec<String>,
    group: &str,
    t: i64,
    value: Option<f64>,
    id: &str,
) -> Step {
    let v = value.expect("threshold rules have a value");
    let mut step = Step::default();
    let transition = th.observe(alarm, t, v);
    if alarm.run.is_some() {
        ids.push(id.to_owned());
        if ids.len() > MAX_RUN_IDS {
            ids.remove(0);
        }
    }
    if let Some(tr) = transition {
        ids.push(id.to_owned());
        step.derived.push(alarm_event(rule, group, tr, t, v, ids));
    }
    if alarm.run.is_none() {
        ids.clear();
    }
    step
}

/// A tumbling or hopping window rule: the reading into each of its open windows, or
/// counted late for a window already closed.
fn window_step(
    rule: &Rule,
    windowing: Windowing,
    open: &mut Vec<WindowState>,
    t: i64,
    value: Option<f64>,
    id: &str,
    now: i64,
) -> Step {
    let v = value.expect("window rules have a value");
    let mut step = Step::default();
    for Bounds { start, end } in windowing.windows_of(t) {
        if end.saturating_add(rule.allowed_lateness_ms) <= now {
            step.late = true;
            continue;
        }
        let at = open.partition_point(|w| w.start < start);
        if open.get(at).is_none_or(|w| w.start != start) {
            if open.capacity() == 0 {
                // As many as a reading falls into (1 for tumbling windows), not Vec's
                // first guess of 4: a group's state is most of a rule's memory.
                open.reserve_exact(windowing.windows_per_reading());
            }
            open.insert(
                at,
                WindowState {
                    start,
                    end,
                    acc: Accumulator::default(),
                    first_id: id.to_owned(),
                    last_id: id.to_owned(),
                },
            );
        }
        let w = &mut open[at];
        if t < w.acc.first.0 || w.acc.count == 0 {
            w.first_id = id.to_owned();
        }
        if t >= w.acc.last.0 || w.acc.count == 0 {
            w.last_id = id.to_owned();
        }
        w.acc.add(t, v);
    }
    step
}

/// A sliding window rule: the reading into the window of the `size` before the newest
/// reading, and an event if the condition holds over it.
#[allow(clippy::too_many_arguments)]
fn sliding_step(
    rule: &Rule,
    size: i64,
    when: Option<&crate::condition::Condition>,
    readings: &mut VecDeque<(i64, f64, String)>,
    group: &str,
    t: i64,
    value: Option<f64>,
    id: &str,
) -> Step {
    let v = value.expect("window rules have a value");
    let mut step = Step::default();
    let newest = readings.back().map_or(i64::MIN, |r| r.0);
    if t < newest.saturating_sub(rule.allowed_lateness_ms) {
        step.late = true;
        return step;
    }
    let at = readings.partition_point(|r| r.0 <= t);
    readings.insert(at, (t, v, id.to_owned()));
    let newest = readings.back().map_or(t, |r| r.0);
    while readings.front().is_some_and(|r| r.0 <= newest - size)
        || readings.len() > MAX_SLIDING_READINGS
    {
        readings.pop_front();
    }
    let mut acc = Accumulator::default();
    readings.iter().for_each(|r| acc.add(r.0, r.1));
    if when.is_none_or(|c| c.holds(&acc.figures())) {
        step.derived
            .push(sliding_event(rule, group, t, id, &acc, readings));
    }
    step
}

fn fresh_state(kind: &Kind, now: i64) -> GroupState {
    match kind {
        Kind::Threshold(_) => GroupState::Alarm {
            alarm: AlarmState::default(),
            run: Vec::new(),
        },
        Kind::Window {
            windowing: Windowing::Sliding { .. },
            ..
        } => GroupState::Sliding {
            readings: VecDeque::new(),
        },
        Kind::Window { .. } => GroupState::Windows { open: Vec::new() },
        Kind::Exception(_) => GroupState::Exception { last: None },
        Kind::Absence { .. } => GroupState::Absence {
            last_seen: now,
            silent: false,
        },
    }
}

fn kind_fits(kind: &Kind, state: &GroupState) -> bool {
    std::mem::discriminant(&fresh_state(kind, 0)) == std::mem::discriminant(state)
}

/// The group a reading belongs to, `None` if the attribute it is grouped by is missing.
fn group_key(by: &GroupBy, attributes: &dyn Event) -> Option<String> {
    let text = |name: &str| {
        attributes.attribute(name).map(|v| match v {
            CeValue::String(s) => s,
            CeValue::Integer(i) => i.to_string(),
            CeValue::Bool(b) => b.to_string(),
        })
    };
    match by {
        GroupBy::Subject => text("subject"),
        GroupBy::Source => text("source"),
        GroupBy::Type => text("type"),
        GroupBy::Attribute(name) => text(name),
        GroupBy::Segment(n) => text("subject")?.split('/').nth(*n).map(str::to_owned),
    }
}

/// The number at `pointer` in the data: a JSON number, a string holding one, or a
/// boolean (1 or 0, for detectors that say `true`). Only finite numbers.
fn number_at(data: &Value, pointer: &str) -> Option<f64> {
    let v = match data.pointer(pointer)? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        Value::Bool(b) => f64::from(u8::from(*b)),
        _ => return None,
    };
    v.is_finite().then_some(v)
}

/// The time at `pointer`: an RFC 3339 string, or a number of milliseconds since the
/// epoch (seconds if it is below 10^11, i.e. before 1973 in milliseconds).
fn time_at(data: &Value, pointer: &str) -> Option<i64> {
    match data.pointer(pointer)? {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        Value::Number(n) => {
            let x = n.as_f64()?;
            if !x.is_finite() || x.abs() > 1e16 {
                return None;
            }
            Some(if x.abs() < 1e11 {
                (x * 1000.0) as i64
            } else {
                x as i64
            })
        }
        _ => None,
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

/// A derived event's id: a UUID (version 8, RFC 9562) from a digest of the rule, the
/// group and what happened, so it is the same whenever the same thing happens to the
/// same group, in this gateway or any other with the same rule.
fn derived_id(rule: &str, group: &str, what: &str) -> String {
    let mut h = Sha256::new();
    for part in [rule, group, what] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn event(rule: &Rule, group: &str, what: &str, time_ms: i64, data: Value) -> Derived {
    Derived {
        rule: rule.name.clone(),
        id: derived_id(&rule.name, group, what),
        event_type: rule.event_type.clone(),
        subject: group.to_owned(),
        priority: rule.priority,
        time_ms,
        data,
    }
}

fn alarm_event(
    rule: &Rule,
    group: &str,
    tr: Transition,
    t: i64,
    v: f64,
    readings: &[String],
) -> Derived {
    let state = match tr {
        Transition::Raised => "raised",
        Transition::Cleared => "cleared",
    };
    event(
        rule,
        group,
        &format!("{state}/{t}"),
        t,
        json!({
            "rule": rule.name,
            "state": state,
            "value": v,
            "time": rfc3339(t),
            "readings": readings,
        }),
    )
}

fn window_event(rule: &Rule, group: &str, w: &WindowState) -> Derived {
    let start = w.start;
    let figures = w.acc.figures();
    let mut data = json!({
        "rule": rule.name,
        "window": { "start": rfc3339(start), "end": rfc3339(w.end) },
        "first_reading": w.first_id,
        "last_reading": w.last_id,
    });
    for (name, value) in FIGURES.iter().zip(figures) {
        data[*name] = if *name == "count" {
            json!(w.acc.count)
        } else {
            json!(value)
        };
    }
    event(rule, group, &format!("window/{start}"), w.end, data)
}

fn sliding_event(
    rule: &Rule,
    group: &str,
    t: i64,
    id: &str,
    acc: &Accumulator,
    readings: &VecDeque<(i64, f64, String)>,
) -> Derived {
    let mut data = json!({
        "rule": rule.name,
        "window": {
            "start": rfc3339(readings.front().map_or(t, |r| r.0)),
            "end": rfc3339(t),
        },
        "first_reading": readings.front().map(|r| r.2.as_str()),
        "last_reading": id,
    });
    for (name, value) in FIGURES.iter().zip(acc.figures()) {
        data[*name] = if *name == "count" {
            json!(acc.count)
        } else {
            json!(value)
        };
    }
    event(rule, group, &format!("sliding/{t}/{}", acc.last.1), t, data)
}

fn absence_event(rule: &Rule, group: &str, last_seen: i64, now: i64, silent: bool) -> Derived {
    let state = if silent { "silent" } else { "back" };
    event(
        rule,
        group,
        &format!("{state}/{last_seen}"),
        now,
        json!({
            "rule": rule.name,
            "state": state,
            "last_seen": rfc3339(last_seen),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse_rules;

    struct Attrs {
        subject: String,
    }

    impl Event for Attrs {
        fn attribute(&self, name: &str) -> Option<CeValue> {
            match name {
                "subject" => Some(CeValue::String(self.subject.clone())),
                "type" => Some(CeValue::String("io.pigeon.mqtt.reading".into())),
                _ => None,
            }
        }
    }

    fn rules(toml_text: &str) -> Vec<Rule> {
        parse_rules(toml_text)
            .iter()
            .map(|r| r.check().unwrap())
            .collect()
    }

    /// A reading: (arrival ms, subject, data JSON, id).
    type Input = (i64, &'static str, String, String);

    fn feed(engine: &mut Engine, input: &Input) -> Outcome {
        let (now, subject, data, id) = input;
        let attrs = Attrs {
            subject: (*subject).into(),
        };
        engine.on_reading(
            &Reading {
                id,
                attributes: &attrs,
                data: Some(data),
            },
            *now,
        )
    }

    const SEED: &str = r#"
[[rules]]
name = "fire"
filter = "subject LIKE '%/smoke/%'"
value = "/smoke"
threshold = { above = 0.3, clear_below = 0.2, count = 2 }
type = "io.pigeon.alarm.fire"

[[rules]]
name = "hvac"
filter = "subject LIKE '%/hvac/%'"
value = "/temp"
time = "/ts"
window = { size = "5m" }
when = "abs(avg - 21.0) > 2"
allowed_lateness = "30s"
priority = 7

[[rules]]
name = "rbe"
filter = "subject LIKE '%/hvac/%'"
value = "/temp"
exception = { deadband = 0.5, max_interval = "15m" }

[[rules]]
name = "silent"
absence = { after = "10m" }
"#;

    /// An hour of readings: two smoke detectors (one rising through the alarm level and
    /// back), two HVAC sensors (one drifting warm), every 20 s, some out of order.
    fn hour() -> Vec<Input> {
        let mut out = Vec::new();
        let t0 = 1_800_000_000_000_i64; // 2027-01-15T08:00:00Z
        for k in 0..180_i64 {
            let now = t0 + k * 20_000;
            let smoke = if (60..90).contains(&k) { 0.5 } else { 0.1 };
            out.push((
                now,
                "site/b1/smoke/s1",
                format!(r#"{{"smoke": {smoke}}}"#),
                format!("s1-{k}"),
            ));
            if k < 120 {
                // s2 falls silent after 40 minutes.
                out.push((
                    now,
                    "site/b1/smoke/s2",
                    r#"{"smoke": 0.05}"#.into(),
                    format!("s2-{k}"),
                ));
            }
            let warm = 21.0 + (k as f64) / 30.0;
            // Sensor time lags arrival by up to 15 s, so some readings come out of order.
            let ts = now - (k % 4) * 5_000;
            out.push((
                now,
                "site/b1/hvac/h1",
                format!(r#"{{"temp": {warm:.2}, "ts": {ts}}}"#),
                format!("h1-{k}"),
            ));
            out.push((
                now,
                "site/b1/hvac/h2",
                format!(r#"{{"temp": 21.1, "ts": {ts}}}"#),
                format!("h2-{k}"),
            ));
        }
        out
    }

    /// Every derived event of a run, ticking once a second of arrival time; with
    /// `crash_at`, the engine is thrown away after that many readings and rebuilt from
    /// the states saved after the last input before it, as the gateway does after a
    /// crash (what was not committed is fed again).
    fn run(inputs: &[Input], crash_at: Option<usize>) -> (Vec<Derived>, Vec<bool>) {
        let mut engine = Engine::new(rules(SEED));
        let mut saved: HashMap<(String, String), String> = HashMap::new();
        let mut derived = Vec::new();
        let mut suppressed = Vec::new();
        let mut last_tick = inputs[0].0;
        let mut k = 0;
        let mut crashed = false;
        let commit = |engine: &mut Engine, saved: &mut HashMap<(String, String), String>| {
            for c in engine.take_changes() {
                match c.state {
                    Some(s) => saved.insert((c.rule, c.group), s),
                    None => saved.remove(&(c.rule, c.group)),
                };
            }
        };
        while k < inputs.len() {
            let input = &inputs[k];
            // Each tick's events and states are one commit, as in the gateway.
            while last_tick + 1_000 <= input.0 {
                last_tick += 1_000;
                derived.extend(engine.tick(last_tick));
                commit(&mut engine, &mut saved);
            }
            let out = feed(&mut engine, input);
            if Some(k) == crash_at && !crashed {
                // Crash before this commit: the reading's outcome and the changes since
                // the last commit are lost; the ticks before it were committed.
                crashed = true;
                engine = Engine::new(rules(SEED));
                for ((rule, group), state) in &saved {
                    assert!(engine.restore(rule, group, state).unwrap());
                }
                continue;
            }
            derived.extend(out.derived);
            suppressed.push(out.suppress);
            commit(&mut engine, &mut saved);
            k += 1;
        }
        for _ in 0..1_200 {
            last_tick += 1_000;
            derived.extend(engine.tick(last_tick));
        }
        (derived, suppressed)
    }

    #[test]
    fn the_seed_rules_derive_what_they_should() {
        let (derived, suppressed) = run(&hour(), None);
        let of = |rule: &str| {
            derived
                .iter()
                .filter(|d| d.rule == rule)
                .collect::<Vec<_>>()
        };
        let fire = of("fire");
        assert_eq!(fire.len(), 2, "{fire:#?}");
        assert_eq!(fire[0].data["state"], "raised");
        assert_eq!(fire[0].subject, "site/b1/smoke/s1");
        assert_eq!(fire[0].data["readings"], json!(["s1-60", "s1-61"]));
        assert_eq!(fire[1].data["state"], "cleared");
        assert_eq!(fire[0].priority, 9);
        assert_eq!(fire[0].event_type, "io.pigeon.alarm.fire");
        // h1 drifts 0.033 °C a reading: more than 2 °C from 21 on average after ~67
        // readings; h2 never. Twelve 5-minute windows in the hour.
        let hvac = of("hvac");
        assert!(
            hvac.iter().all(|d| d.subject == "site/b1/hvac/h1"),
            "{hvac:#?}"
        );
        assert!(hvac.len() >= 5 && hvac.len() <= 8, "{}", hvac.len());
        let w = &hvac[0].data;
        assert!((w["avg"].as_f64().unwrap() - 21.0).abs() > 2.0);
        // Its count is h1's readings whose own time falls in the window.
        let start = chrono::DateTime::parse_from_rfc3339(w["window"]["start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        let in_window = hour()
            .iter()
            .filter(|(_, s, d, _)| {
                let ts = serde_json::from_str::<Value>(d).unwrap()["ts"]
                    .as_i64()
                    .unwrap_or(-1);
                *s == "site/b1/hvac/h1" && (start..start + 300_000).contains(&ts)
            })
            .count();
        assert_eq!(w["count"], in_window);
        assert!(w["window"]["start"].as_str().unwrap().ends_with(":00.000Z"));
        // s2 went silent at 40 min, reported 10 min later; nothing else did.
        let silent = of("silent");
        assert_eq!(
            silent.len(),
            4,
            "s2 10 min after its last reading; the others after the hour"
        );
        assert_eq!(silent[0].subject, "site/b1/smoke/s2");
        // Report by exception: h2's flat 21.1 goes on once, then every 15 minutes.
        assert!(suppressed.iter().filter(|s| **s).count() > 300);
        // Ids are unique and deterministic.
        let mut ids: Vec<&str> = derived.iter().map(|d| d.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), derived.len());
        assert_eq!(run(&hour(), None).0, derived);
    }

    #[test]
    fn a_crash_anywhere_derives_the_same_events_once() {
        let inputs = hour();
        let (undisturbed, _) = run(&inputs, None);
        // Four readings every 20 s: 240 is s1-60, which starts the alarm's run; 244 is
        // s1-61, which raises it; 248 (08:20:40) comes right after the tick that closed
        // the 08:15 window (08:20:30, with 30 s of lateness).
        for crash_at in [1, 60, 97, 240, 244, 248, 300, 333, 500, 599, 601, 719] {
            let (after_crash, _) = run(&inputs, Some(crash_at));
            assert_eq!(after_crash, undisturbed, "crash before reading {crash_at}");
        }
    }

    /// Arrival-time windows against the gateway's clock: a reading stamped a moment
    /// before the tick that closed its window but reaching the engine after it, a jump
    /// forward, a jump back, and a restart from saved states in the middle of a window.
    #[test]
    fn ticks_clock_jumps_and_restarts() {
        const ONE: &str = r#"
[[rules]]
name = "w"
value = "/v"
window = { size = "1m" }
allowed_lateness = "5s"
"#;
        let reading = |engine: &mut Engine, v: i64, now: i64| {
            let data = format!(r#"{{"v": {v}}}"#);
            let a = Attrs {
                subject: "s".into(),
            };
            engine.on_reading(
                &Reading {
                    id: "x",
                    attributes: &a,
                    data: Some(&data),
                },
                now,
            )
        };
        let count = |d: &Derived| d.data["count"].as_u64().unwrap();
        let t0 = 1_800_000_000_000_i64; // on a minute
        // Event time: a reading of [t0, t0 + 60 s) stamped at +64.9 s (inside the
        // lateness) but taken after the +65 s tick that closed the window is late, not a
        // second event for the same window.
        let mut timed = Engine::new(rules(&ONE.replace("allowed", "time = \"/ts\"\nallowed")));
        let at = |engine: &mut Engine, ts: i64, now: i64| {
            let data = format!(r#"{{"v": 1, "ts": {ts}}}"#);
            let a = Attrs {
                subject: "s".into(),
            };
            let r = Reading {
                id: "x",
                attributes: &a,
                data: Some(&data),
            };
            engine.on_reading(&r, now)
        };
        at(&mut timed, t0 + 1_000, t0 + 1_000);
        assert_eq!(
            timed
                .tick(t0 + 65_000)
                .iter()
                .map(count)
                .collect::<Vec<_>>(),
            [1]
        );
        at(&mut timed, t0 + 59_000, t0 + 64_900);
        assert_eq!(timed.stats().next().unwrap().1.late, 1);
        assert!(timed.tick(t0 + 200_000).is_empty());

        let mut engine = Engine::new(rules(ONE));
        // A jump forward closes the open window at the next tick, with what it holds.
        reading(&mut engine, 3, t0 + 250_000);
        let jumped = engine.tick(t0 + 3_600_000);
        assert_eq!(jumped.len(), 1);
        assert_eq!(jumped[0].data["window"]["start"], rfc3339(t0 + 240_000));
        // A jump back: the clock's new minutes are windows again (the tick follows it).
        assert!(engine.tick(t0 + 120_000).is_empty());
        reading(&mut engine, 4, t0 + 121_000);
        let again = engine.tick(t0 + 186_000);
        assert_eq!(again.iter().map(count).collect::<Vec<_>>(), [1]);

        // A restart in the middle of a window: the saved state goes on where it stopped,
        // and the window is emitted once, as without the restart.
        let run = |restart: bool| {
            let mut engine = Engine::new(rules(ONE));
            reading(&mut engine, 10, t0 + 1_000);
            reading(&mut engine, 20, t0 + 2_000);
            if restart {
                let saved = engine.take_changes();
                engine = Engine::new(rules(ONE));
                for c in saved {
                    assert!(
                        engine
                            .restore(&c.rule, &c.group, &c.state.unwrap())
                            .unwrap()
                    );
                }
            }
            reading(&mut engine, 30, t0 + 50_000);
            engine.tick(t0 + 65_000)
        };
        let (undisturbed, restarted) = (run(false), run(true));
        assert_eq!(undisturbed.len(), 1);
        assert_eq!(undisturbed, restarted);
        assert_eq!(restarted[0].data["avg"], 20.0);
    }

    #[test]
    fn late_readings_are_counted_not_added_and_groups_are_capped() {
        let mut engine = Engine::new(rules(
            r#"
[[rules]]
name = "w"
value = "/v"
time = "/ts"
window = { size = "1m" }
max_groups = 2
"#,
        ));
        let attrs = |s: &str| Attrs { subject: s.into() };
        let reading = |engine: &mut Engine, s: &str, ts: i64, now: i64| {
            let data = format!(r#"{{"v": 1, "ts": {ts}}}"#);
            let a = attrs(s);
            engine.on_reading(
                &Reading {
                    id: "x",
                    attributes: &a,
                    data: Some(&data),
                },
                now,
            )
        };
        let t0 = 1_800_000_000_000_i64; // on a minute
        reading(&mut engine, "a", t0 + 10_000, t0 + 10_000);
        assert_eq!(engine.tick(t0 + 59_999).len(), 0);
        assert_eq!(engine.tick(t0 + 60_000).len(), 1);
        // A reading of the closed window [t0, t0 + 60 s): late, and no group kept for it.
        reading(&mut engine, "a", t0 + 59_000, t0 + 61_000);
        let stats = engine.stats().next().unwrap().1;
        assert_eq!((stats.late, stats.groups), (1, 0));
        for g in ["a", "b", "c"] {
            reading(&mut engine, g, t0 + 70_000, t0 + 70_000);
        }
        let stats = engine.stats().next().unwrap().1;
        assert_eq!((stats.groups, stats.evicted), (2, 1));
        let changes = engine.take_changes();
        assert!(
            changes.iter().any(|c| c.group == "a" && c.state.is_none()),
            "{changes:?}"
        );
        // A reading without the value is unreadable, not a panic.
        let a = attrs("d");
        engine.on_reading(
            &Reading {
                id: "y",
                attributes: &a,
                data: Some("{}"),
            },
            1,
        );
        engine.on_reading(
            &Reading {
                id: "z",
                attributes: &a,
                data: Some("not json"),
            },
            1,
        );
        assert_eq!(engine.stats().next().unwrap().1.unreadable, 2);
    }

    /// Filters that read only a reading's kind (subject, type, source) are answered from
    /// the cache, the others evaluated every time; both give what evaluating gives.
    #[test]
    fn cached_filter_answers_are_the_evaluated_ones() {
        struct Kind {
            subject: String,
            id: String,
        }
        impl Event for Kind {
            fn attribute(&self, name: &str) -> Option<CeValue> {
                match name {
                    "subject" => Some(CeValue::String(self.subject.clone())),
                    "id" => Some(CeValue::String(self.id.clone())),
                    _ => None,
                }
            }
        }
        let mut engine = Engine::new(rules(
            r#"
[[rules]]
name = "by-topic"
filter = "subject LIKE 'a/%' AND NOT EXISTS type"
threshold = { above = 1.0 }
value = "/v"
[[rules]]
name = "by-id"
filter = "id LIKE '%7'"
threshold = { above = 1.0 }
value = "/v"
"#,
        ));
        assert_eq!(
            engine
                .rules
                .iter()
                .map(|r| r.cached_bit)
                .collect::<Vec<_>>(),
            [Some(0), None]
        );
        let (mut topic, mut id) = (0, 0);
        // More kinds than the cache holds: it starts afresh and stays right.
        for n in 0..FILTER_CACHE_ENTRIES + 100 {
            let k = Kind {
                subject: format!("{}/{}", if n % 3 == 0 { "a" } else { "b" }, n % 20_000),
                id: n.to_string(),
            };
            topic += usize::from(k.subject.starts_with("a/"));
            id += usize::from(k.id.ends_with('7'));
            engine.on_reading(
                &Reading {
                    id: &k.id,
                    attributes: &k,
                    data: Some(r#"{"v": 0}"#),
                },
                0,
            );
        }
        let matched: Vec<u64> = engine.stats().map(|(_, s)| s.matched).collect();
        assert_eq!(matched, [topic as u64, id as u64]);
        assert!(engine.filters.answers.len() < FILTER_CACHE_ENTRIES);
    }

    #[test]
    fn saved_states_of_unknown_or_changed_rules() {
        let mut engine = Engine::new(rules(SEED));
        assert_eq!(engine.restore("gone", "g", "{}"), Ok(false));
        let alarm = r#"{"kind":"alarm","alarm":{"active":true,"run":null},"run":[]}"#;
        assert_eq!(engine.restore("fire", "g", alarm), Ok(true));
        assert!(
            engine
                .restore("hvac", "g", alarm)
                .unwrap_err()
                .contains("another kind")
        );
        assert!(
            engine
                .restore("fire", "g", "{")
                .unwrap_err()
                .contains("unreadable")
        );
        // max_groups lowered since the states were saved: the ones past it stay out.
        let mut capped = Engine::new(rules(&SEED.replacen(
            "type = \"io.pigeon.alarm.fire\"",
            "type = \"io.pigeon.alarm.fire\"\nmax_groups = 2",
            1,
        )));
        let restored: Vec<bool> = ["a", "b", "c"]
            .iter()
            .map(|g| capped.restore("fire", g, alarm).unwrap())
            .collect();
        assert_eq!(restored, [true, true, false]);
        let fire = capped.stats().next().unwrap().1;
        assert_eq!((fire.groups, fire.evicted, fire.active), (2, 1, 2));
    }
}
