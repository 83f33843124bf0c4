//! Edge rules in the outbox writer: the engine, the groups' states it saves in the
//! transaction of the readings that changed them, and the derived events it stores.
//!
//! Table `rule_states` holds one row per (rule, group), written only in the writer's
//! round transactions; `rule_defs` holds each rule's fingerprint (what its states depend
//! on), so that a rule whose definition changed starts afresh instead of misreading
//! states saved for another definition.

use std::sync::Arc;

use pigeon_rules::{Derived, Engine, Reading, Rule, StateChange};
use pigeon_shared::ce::GatewayId;
use rusqlite::{Connection, Transaction, params};

use super::pack::derived_id;
use super::{NewRecord, OutboxError};
use crate::rules::{Attributes, DerivedRecord};
use crate::stats::Stats;

const SELECT_DEFS: &str = "SELECT rule, fingerprint FROM rule_defs";
const UPSERT_DEF: &str = "INSERT OR REPLACE INTO rule_defs (rule, fingerprint) VALUES (?1, ?2)";
const DELETE_DEF: &str = "DELETE FROM rule_defs WHERE rule = ?1";
const DELETE_RULE_STATES: &str = "DELETE FROM rule_states WHERE rule = ?1";
const SELECT_STATES: &str = "SELECT rule, grp, state FROM rule_states";
const UPSERT_STATE: &str = "INSERT INTO rule_states (rule, grp, state) VALUES (?1, ?2, ?3)
    ON CONFLICT (rule, grp) DO UPDATE SET state = excluded.state";
const DELETE_STATE: &str = "DELETE FROM rule_states WHERE rule = ?1 AND grp = ?2";
const INSERT_DERIVED: &str = "INSERT INTO records
    (seq, id, source, type, subject, time_us, content_type, data, priority, evictable)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'application/json', ?7, ?8, 0)";

/// What the writer needs to run the rules.
pub(crate) struct RulesSetup {
    pub(crate) rules: Vec<Rule>,
    /// Derived events' sources are `/gateways/<id>/rules/<rule>`.
    pub(crate) gateway: GatewayId,
}

/// The rules at work in the writer thread.
pub(crate) struct RulesRun {
    engine: Engine,
    rules: Vec<Rule>,
    gateway: GatewayId,
    /// Where the figures are published (`Stats::rules`).
    stats: Arc<Stats>,
    /// When they were last published.
    published: Option<std::time::Instant>,
    /// Per rule, the groups dropped at `max_groups` that were logged, and when the last
    /// such line was.
    evictions_logged: Vec<u64>,
    evictions_logged_at: Option<std::time::Instant>,
}

/// A rule dropping groups at its cap says so at most this often.
const EVICTIONS_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// How often the figures are published (counting the active groups walks them).
const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl RulesRun {
    /// Starts the engine on the states saved by the last commit: those of rules no
    /// longer configured, or whose definition changed, are deleted (and said so).
    pub(crate) fn start(
        setup: RulesSetup,
        conn: &mut Connection,
        stats: Arc<Stats>,
    ) -> Result<RulesRun, OutboxError> {
        let tx = conn.transaction()?;
        let saved: Vec<(String, String)> = tx
            .prepare(SELECT_DEFS)?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (name, fingerprint) in &saved {
            let reason = match setup.rules.iter().find(|r| &r.name == name) {
                None => "it is no longer configured",
                Some(r) if &r.fingerprint != fingerprint => {
                    "its definition changed (value, group_by, time, allowed_lateness, its kind's settings or when)"
                }
                Some(_) => continue,
            };
            let n = tx.prepare(DELETE_RULE_STATES)?.execute([name])?;
            tx.prepare(DELETE_DEF)?.execute([name])?;
            if n > 0 {
                tracing::warn!(rule = %name, groups = n, "Discarded the saved states of rule {name:?}: {reason}; its groups start afresh.");
            }
        }
        for r in &setup.rules {
            tx.prepare(UPSERT_DEF)?
                .execute(params![r.name, r.fingerprint])?;
        }
        tx.commit()?;
        let mut run = RulesRun {
            engine: Engine::new(setup.rules.clone()),
            rules: setup.rules,
            gateway: setup.gateway,
            stats,
            published: None,
            evictions_logged: Vec::new(),
            evictions_logged_at: None,
        };
        let restored = run.restore(conn)?;
        if restored > 0 {
            tracing::info!(groups = restored, "Restored the rules' saved states.");
        }
        run.publish();
        Ok(run)
    }

    /// Puts back every saved state; a state that cannot be read is deleted (its group
    /// starts afresh) and said so. Returns how many were restored.
    fn restore(&mut self, conn: &Connection) -> Result<usize, OutboxError> {
        let rows: Vec<(String, String, String)> = conn
            .prepare(SELECT_STATES)?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut restored = 0;
        for (rule, group, state) in rows {
            match self.engine.restore(&rule, &group, &state) {
                Ok(true) => restored += 1,
                // Past the rule's max_groups (it was lowered).
                Ok(false) => {
                    conn.execute(DELETE_STATE, params![rule, group])?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "A rule's saved state is unreadable; that group starts afresh.");
                    conn.execute(DELETE_STATE, params![rule, group])?;
                }
            }
        }
        Ok(restored)
    }

    /// After a failed commit: back to the states of the last one.
    pub(crate) fn rolled_back(&mut self, conn: &Connection) {
        self.engine.forget_groups();
        if let Err(e) = self.restore(conn) {
            tracing::error!(error = %e, "Could not read the rules' saved states back after a failed commit; the rules start afresh.");
            self.engine = Engine::new(self.rules.clone());
        }
    }

    /// Runs a record about to be stored with `seq` through the rules: whether it is
    /// kept from the relay, and the events it derived.
    pub(crate) fn on_record(
        &mut self,
        rec: &NewRecord,
        producer: &str,
        seq: u64,
    ) -> (bool, Vec<Derived>) {
        if rec.file.is_some() {
            return (false, Vec::new());
        }
        let id = derived_id(producer, seq, rec.time_us).to_string();
        let attributes = Attributes {
            id: &id,
            source: &rec.source,
            event_type: &rec.event_type,
            subject: rec.subject.as_deref(),
            time_us: rec.time_us,
            content_type: rec.content_type.as_deref(),
        };
        let data = (rec.content_type.as_deref() == Some("application/json"))
            .then(|| std::str::from_utf8(&rec.data).ok())
            .flatten();
        let outcome = self.engine.on_reading(
            &Reading {
                id: &id,
                attributes: &attributes,
                data,
            },
            rec.time_us.div_euclid(1000),
        );
        (outcome.suppress, outcome.derived)
    }

    /// Closes the windows due at `now_ms` and finds silent groups.
    pub(crate) fn tick(&mut self, now_ms: i64) -> Vec<Derived> {
        self.engine.tick(now_ms)
    }

    /// Whether states changed since they were last saved.
    pub(crate) fn has_changes(&self) -> bool {
        self.engine.has_changes()
    }

    /// Stores derived events from `*next_seq` on; returns the highest priority stored.
    pub(crate) fn store(
        &self,
        tx: &Transaction<'_>,
        derived: &[Derived],
        next_seq: &mut u64,
    ) -> Result<Option<u8>, OutboxError> {
        let mut insert = tx.prepare_cached(INSERT_DERIVED)?;
        let mut top = None;
        for d in derived {
            let r = DerivedRecord::new(&self.gateway, d);
            insert.execute(params![
                *next_seq as i64,
                &r.id.as_bytes()[..],
                r.source,
                r.event_type,
                r.subject,
                r.time_us,
                r.data,
                r.priority,
            ])?;
            *next_seq += 1;
            top = top.max(Some(r.priority));
        }
        Ok(top)
    }

    /// Saves the states changed since the last save, in the round's transaction.
    pub(crate) fn save(&mut self, tx: &Transaction<'_>) -> Result<(), OutboxError> {
        let changes = self.engine.take_changes();
        if changes.is_empty() {
            return Ok(());
        }
        let mut upsert = tx.prepare_cached(UPSERT_STATE)?;
        let mut delete = tx.prepare_cached(DELETE_STATE)?;
        for StateChange { rule, group, state } in changes {
            match state {
                Some(s) => upsert.execute(params![rule, group, s])?,
                None => delete.execute(params![rule, group])?,
            };
        }
        Ok(())
    }

    /// Publishes the figures for status and /metrics, at most every half second.
    pub(crate) fn publish(&mut self) {
        if self.published.is_some_and(|t| t.elapsed() < PUBLISH_EVERY) {
            return;
        }
        self.published = Some(std::time::Instant::now());
        self.stats.rules.set(self.engine.stats());
        self.log_evictions();
    }

    /// Says which rules dropped groups at their cap since the last time it said so.
    fn log_evictions(&mut self) {
        if self
            .evictions_logged_at
            .is_some_and(|t| t.elapsed() < EVICTIONS_LOG_EVERY)
        {
            return;
        }
        let figures = self.stats.rules.get();
        self.evictions_logged.resize(figures.len(), 0);
        for (f, logged) in figures.iter().zip(self.evictions_logged.iter_mut()) {
            if f.stats.evicted > *logged {
                let max_groups = self
                    .rules
                    .iter()
                    .find(|r| r.name == f.name)
                    .map_or(0, |r| r.max_groups);
                tracing::warn!(
                    rule = %f.name,
                    dropped = f.stats.evicted - *logged,
                    max_groups,
                    "Rule {:?} has more groups than its max_groups: it dropped the least recently updated ones (their windows, alarms and silence clocks start afresh if they come back). Raise max_groups, or group by something with fewer values.",
                    f.name
                );
                *logged = f.stats.evicted;
                self.evictions_logged_at = Some(std::time::Instant::now());
            }
        }
    }
}

/// The rules' clock: a tick to the writer just after every second (windows end on
/// whole seconds). Runs until aborted.
pub(crate) async fn clock_loop(writer: super::OutboxWriter) {
    loop {
        let now = chrono::Utc::now();
        let into_second = u64::from(now.timestamp_subsec_millis());
        tokio::time::sleep(std::time::Duration::from_millis(
            1_001 - into_second.min(1_000),
        ))
        .await;
        writer.tick(chrono::Utc::now().timestamp_millis());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::db::{self, Synchronous};
    use crate::outbox::{Appended, OutboxReader, OutboxWriter, Policy};
    use bytes::Bytes;

    const RULES: &str = r#"
[[rules]]
name = "fire"
filter = "subject LIKE '%/smoke'"
value = "/smoke"
threshold = { above = 0.3, clear_below = 0.2, count = 2 }

[[rules]]
name = "hvac"
filter = "subject LIKE '%/hvac'"
value = "/temp"
time = "/ts"
window = { size = "1m" }
allowed_lateness = "5s"
priority = 7

[[rules]]
name = "rbe"
filter = "subject LIKE '%/hvac'"
value = "/temp"
exception = { deadband = 0.5 }
"#;

    const T0: i64 = 1_800_000_000_000; // ms, on a minute

    fn rules(text: &str) -> Vec<Rule> {
        #[derive(serde::Deserialize)]
        struct File {
            rules: Vec<pigeon_rules::RuleConfig>,
        }
        let f: File = toml::from_str(text).unwrap();
        f.rules.iter().map(|r| r.check().unwrap()).collect()
    }

    fn open(
        dir: &std::path::Path,
        text: &str,
    ) -> (
        OutboxWriter,
        std::thread::JoinHandle<()>,
        OutboxReader,
        Arc<Stats>,
    ) {
        let path = db::path_in(dir);
        let mut conn = db::open(&path, Synchronous::Normal).unwrap();
        db::migrate(&mut conn).unwrap();
        let stats = Arc::new(Stats::default());
        let setup = RulesSetup {
            rules: rules(text),
            gateway: GatewayId::new("pi-1").unwrap(),
        };
        let (w, h) = OutboxWriter::start_with(conn, 100, stats.clone(), None, Some(setup)).unwrap();
        (w, h, OutboxReader::open(&path).unwrap(), stats)
    }

    fn reading(subject: &str, ms: i64, data: String) -> NewRecord {
        NewRecord {
            source: "/gateways/pi-1/mqtt".into(),
            event_type: "io.pigeon.mqtt.reading".into(),
            subject: Some(subject.into()),
            time_us: ms * 1000,
            content_type: Some("application/json".into()),
            data: Bytes::from(data),
            expires_us: None,
            delivery: None,
            file: None,
            policy: Policy::default(),
        }
    }

    fn smoke(ms: i64, level: f64) -> NewRecord {
        reading("home/kitchen/smoke", ms, format!(r#"{{"smoke":{level}}}"#))
    }

    fn temp(ms: i64, t: f64) -> NewRecord {
        reading("b41/room4/hvac", ms, format!(r#"{{"temp":{t},"ts":{ms}}}"#))
    }

    /// Waits until what was queued before is committed: a record no rule matches, in
    /// the same round as a tick queued before it or a later one. (A ping is answered as
    /// it is taken, before its round commits.)
    async fn flush(w: &OutboxWriter) {
        w.append_and_wait(reading("flush", T0, "{}".into()))
            .await
            .unwrap();
    }

    fn stored(r: &OutboxReader) -> Vec<crate::outbox::Record> {
        r.read_after(0, 10_000, u64::MAX).unwrap()
    }

    /// The alarm is committed with the reading that raised it, unpacked, with its own
    /// id, its rule's source and priority; it wakes the urgent lane.
    #[tokio::test]
    async fn an_alarm_is_committed_with_the_reading_that_raised_it() {
        let dir = tempfile::tempdir().unwrap();
        let (w, _h, r, stats) = open(dir.path(), RULES);
        for (i, level) in [0.1, 0.5, 0.6].into_iter().enumerate() {
            let a = w.append_and_wait(smoke(T0 + i as i64 * 1000, level)).await;
            assert!(matches!(a, Ok(Appended::Stored { .. })), "{a:?}");
        }
        tokio::time::timeout(std::time::Duration::from_secs(1), w.urgent_committed())
            .await
            .expect("a priority-9 event wakes the urgent lane");
        let recs = stored(&r);
        let alarms: Vec<_> = recs
            .iter()
            .filter(|x| x.source == "/gateways/pi-1/rules/fire")
            .collect();
        assert_eq!(alarms.len(), 1, "{recs:#?}");
        let alarm = alarms[0];
        assert_eq!(alarm.priority, 9);
        assert_eq!(alarm.event_type, "io.pigeon.rule.fire");
        assert_eq!(alarm.subject.as_deref(), Some("home/kitchen/smoke"));
        assert_eq!(alarm.seq, 4, "right after the reading that raised it");
        let data: serde_json::Value = serde_json::from_slice(&alarm.data).unwrap();
        assert_eq!(data["state"], "raised");
        // It names the two readings of the run by their CloudEvent ids.
        let ids: Vec<String> = recs[1..3].iter().map(|x| x.id.to_string()).collect();
        assert_eq!(data["readings"], serde_json::json!(ids));
        assert_eq!(alarm.id.get_version_num(), 8);
        // Published at most every half second: the next tick after that does.
        tokio::time::sleep(PUBLISH_EVERY).await;
        w.tick(T0 + 10_000);
        flush(&w).await;
        let figures = stats.rules.get();
        assert_eq!(figures[0].name, "fire");
        let fire = figures[0].stats;
        assert_eq!(
            (fire.matched, fire.emitted, fire.active, fire.groups),
            (3, 1, 1, 1)
        );
    }

    /// Report by exception with `suppress`: unchanged readings are acknowledged but not
    /// stored, their sequences used up for good (a restart does not hand them out again);
    /// a window of the same readings still counts them all, across a restart.
    #[tokio::test]
    async fn suppressed_readings_are_not_stored_and_windows_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let temps = [21.0, 21.1, 21.2, 22.0, 22.1];
        {
            let (w, h, r, stats) = open(dir.path(), RULES);
            let mut verdicts = Vec::new();
            for (i, t) in temps.into_iter().enumerate() {
                verdicts.push(
                    w.append_and_wait(temp(T0 + i as i64 * 1000, t))
                        .await
                        .unwrap(),
                );
            }
            assert_eq!(
                verdicts,
                [
                    Appended::Stored { seq: 1 },
                    Appended::Suppressed { seq: 2 },
                    Appended::Suppressed { seq: 3 },
                    Appended::Stored { seq: 4 },
                    Appended::Suppressed { seq: 5 },
                ]
            );
            assert_eq!(
                stats
                    .rules_suppressed
                    .load(std::sync::atomic::Ordering::Relaxed),
                3
            );
            assert_eq!(stored(&r).len(), 2);
            drop(w);
            h.join().unwrap();
        }
        // A restart in the middle of the window.
        let (w, _h, r, _) = open(dir.path(), RULES);
        let a = w.append_and_wait(temp(T0 + 30_000, 25.0)).await.unwrap();
        assert_eq!(a, Appended::Stored { seq: 6 }, "sequence 5 is not reused");
        w.tick(T0 + 66_000);
        flush(&w).await;
        let windows: Vec<_> = stored(&r)
            .into_iter()
            .filter(|x| x.source == "/gateways/pi-1/rules/hvac")
            .collect();
        assert_eq!(windows.len(), 1);
        let data: serde_json::Value = serde_json::from_slice(&windows[0].data).unwrap();
        assert_eq!(data["count"], 6);
        assert_eq!(data["max"], 25.0);
        assert_eq!(windows[0].priority, 7);
    }

    /// Ticks with nothing due write nothing; a rule whose definition changed starts
    /// afresh, one whose filter changed keeps its states, a removed one's are deleted.
    #[tokio::test]
    async fn idle_ticks_write_nothing_and_changed_rules_start_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let count_states = |dir: &std::path::Path, rule: &str| -> i64 {
            let conn = rusqlite::Connection::open(db::path_in(dir)).unwrap();
            conn.query_row(
                "SELECT count(*) FROM rule_states WHERE rule = ?1",
                [rule],
                |r| r.get(0),
            )
            .unwrap()
        };
        {
            let (w, h, _r, stats) = open(dir.path(), RULES);
            w.append_and_wait(temp(T0, 21.0)).await.unwrap();
            w.append_and_wait(smoke(T0, 0.5)).await.unwrap();
            let commits = stats
                .outbox_commits
                .load(std::sync::atomic::Ordering::Relaxed);
            for s in 1..20 {
                w.tick(T0 + s * 1000);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            flush(&w).await;
            assert_eq!(
                stats
                    .outbox_commits
                    .load(std::sync::atomic::Ordering::Relaxed),
                commits + 1,
                "no window was due: no transaction but the flush's"
            );
            drop(w);
            h.join().unwrap();
        }
        for rule in ["fire", "hvac", "rbe"] {
            assert_eq!(count_states(dir.path(), rule), 1, "{rule}");
        }
        let changed = RULES
            .replace("size = \"1m\"", "size = \"2m\"")
            .replace("'%/smoke'", "'%smoke'");
        let removed = &changed[..changed.find("[[rules]]\nname = \"rbe\"").unwrap()];
        let (w, h, _r, _) = open(dir.path(), removed);
        drop(w);
        h.join().unwrap();
        assert_eq!(
            count_states(dir.path(), "fire"),
            1,
            "the filter changed: kept"
        );
        assert_eq!(
            count_states(dir.path(), "hvac"),
            0,
            "the window changed: afresh"
        );
        assert_eq!(count_states(dir.path(), "rbe"), 0, "removed");
    }

    /// A rule at its `max_groups` drops the least recently updated group (its saved
    /// state too) and counts it; the process and the other groups go on.
    #[tokio::test]
    async fn a_rule_past_max_groups_drops_the_stalest_group() {
        let dir = tempfile::tempdir().unwrap();
        let capped = "[[rules]]\nname = \"w\"\nvalue = \"/temp\"\nwindow = { size = \"1m\" }\nmax_groups = 2\n";
        let (w, _h, _r, stats) = open(dir.path(), capped);
        for (i, room) in ["a", "b", "c"].into_iter().enumerate() {
            let rec = reading(room, T0 + i as i64, r#"{"temp":20}"#.into());
            w.append_and_wait(rec).await.unwrap();
        }
        tokio::time::sleep(PUBLISH_EVERY).await;
        w.tick(T0 + 10);
        flush(&w).await;
        let f = stats.rules.get()[0].stats;
        assert_eq!((f.groups, f.evicted), (2, 1));
        let conn = rusqlite::Connection::open(db::path_in(dir.path())).unwrap();
        let groups: Vec<String> = conn
            .prepare("SELECT grp FROM rule_states ORDER BY grp")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(groups, ["b", "c"]);
    }
}
