//! Capture from Kafka: with `stream.kind = "kafka"`, a consumer group (`capture.group`)
//! reads the relay's topics and writes the same Hive-partitioned objects as the files
//! capture (`docs/data-layout.md#capture`):
//!
//! ```text
//! <prefix>capture/tenant=<tenant>/type=<type>/date=<YYYY-MM-DD>/hour=<HH>/<topic>.<partition>.<from>.jsonl.gz
//! ```
//!
//! Every relay joins the group, so the partitions are shared out among the relays and a
//! relay that stops hands its partitions to the others. A roll is an offset range
//! `[from, to)` of one partition. Before its objects are written the range is stored in
//! the bucket, `<prefix>capture-state/<group>/<topic>.<partition>.json`; after them the
//! group's offset moves to `to`. Whoever is given the partition next — this relay after a
//! restart, or another — reads that file: unless the group's offset already stands at its
//! `to`, the roll is written again from the same records, which gives the same keys and
//! the same bytes (gzip without a timestamp; the hour from the record's timestamp). So a
//! relay killed between or during rolls loses nothing and duplicates nothing. Offsets
//! are committed for the usual lag tools; the range file alone is enough to resume.
//!
//! `date=`/`hour=` are the record's Kafka timestamp (when the relay produced it, close to
//! when it received the event), as with the files capture and Event Hubs Capture.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::config::CaptureSettings;
use super::keys::{gzip, line_type, object_key};
use crate::metrics::Metrics;
use crate::s3::{Bucket, S3Error};
use crate::sink::stream::kafka::binding;
use crate::sink::stream::kafka::config::KafkaSettings;

/// Where the roll ranges go, after `objects.s3.prefix`.
pub const STATE_PREFIX: &str = "capture-state";
/// How long Kafka requests (offsets, seeks, commits) may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one poll waits for a record.
const POLL: Duration = Duration::from_millis(100);
/// After a failed write or lookup, the next attempt.
const RETRY: Duration = Duration::from_secs(1);

/// `capture-state/<group>/<topic>.<partition>.json`: the last roll begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollRange {
    pub from: i64,
    pub to: i64,
}

type Tp = (String, i32);

/// Why the Kafka capture could not start, or a step of it stopped (it tries again).
#[derive(Debug, thiserror::Error)]
pub enum KafkaCaptureError {
    #[error("cannot configure the Kafka capture consumer: {0}")]
    Configure(KafkaError),
    #[error("cannot subscribe to {pattern:?}: {source}")]
    Subscribe { pattern: String, source: KafkaError },
    #[error("cannot read the capture group's offset of {topic}/{partition}: {source}")]
    Committed {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("cannot move to {offset:?} in {topic}/{partition}: {source}")]
    Seek {
        offset: Offset,
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("cannot resume {topic}/{partition}: {source}")]
    Resume {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("cannot commit the capture offset {offset} of {topic}/{partition}: {source}")]
    Commit {
        offset: i64,
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("cannot read {key}: {source}")]
    ReadRange { key: String, source: S3Error },
    #[error("cannot write {key}: {source}")]
    Write { key: String, source: S3Error },
    #[error("{0}")]
    Encode(#[from] serde_json::Error),
}

/// One roll of a partition in memory.
#[derive(Debug)]
struct Roll {
    from: i64,
    /// The offset after the last record taken.
    next: i64,
    /// Sealed: the roll ends here (and takes no more records).
    to: Option<i64>,
    /// Its range is in the bucket (a sealed roll found there, or written by us).
    range_stored: bool,
    objects_written: bool,
    started: Instant,
    bytes: u64,
    events: u64,
    /// (type, date, hour) → lines.
    lines: BTreeMap<(String, String, String), Vec<u8>>,
}

impl Roll {
    fn new(from: i64, to: Option<i64>) -> Self {
        Self {
            from,
            next: from,
            to,
            range_stored: to.is_some(),
            objects_written: false,
            started: Instant::now(),
            bytes: 0,
            events: 0,
            lines: BTreeMap::new(),
        }
    }
}

/// A partition this relay was given.
#[derive(Debug, Default)]
struct Part {
    /// Where to read from is known and the consumer was moved there.
    resolved: bool,
    rolls: VecDeque<Roll>,
}

/// Assignments and revocations, noted by the rebalance callbacks (inside `poll`) and
/// handled by the capture loop right after.
#[derive(Default)]
struct Changes {
    assigned: Vec<Tp>,
    revoked: Vec<Tp>,
}

struct CaptureContext {
    changes: Mutex<Changes>,
}

impl ClientContext for CaptureContext {}

impl ConsumerContext for CaptureContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut c = self.changes.lock().unwrap_or_else(|p| p.into_inner());
            c.revoked.extend(tps(tpl));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Nothing is read from a new partition until the loop knows where to start.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "Capture could not pause newly assigned partitions.");
            }
            let mut c = self.changes.lock().unwrap_or_else(|p| p.into_inner());
            c.assigned.extend(tps(tpl));
        }
    }
}

fn tps(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

fn one(tp: &Tp, offset: Option<Offset>) -> TopicPartitionList {
    let mut l = TopicPartitionList::new();
    match offset {
        Some(o) => {
            // Only fails for an offset librdkafka cannot represent; ours are all plain.
            let _ = l.add_partition_offset(&tp.0, tp.1, o);
        }
        None => {
            l.add_partition(&tp.0, tp.1);
        }
    }
    l
}

/// The capture consumer and its rolls; runs on its own thread (see [`KafkaCapture::spawn`]).
pub struct KafkaCapture {
    /// Shared so that a polled record (which borrows the consumer) can be handled by
    /// `&mut self` methods.
    consumer: Arc<BaseConsumer<CaptureContext>>,
    bucket: Arc<Bucket>,
    settings: CaptureSettings,
    kafka: KafkaSettings,
    /// The configured tenants, to tell which tenant a topic is when its name could be
    /// more than one.
    tenants: HashSet<String>,
    metrics: Arc<Metrics>,
    parts: HashMap<Tp, Part>,
    /// Which tenant each topic is (found once per topic).
    topic_tenants: HashMap<String, String>,
    /// A write failed: every partition is paused until the pending rolls are written.
    failing: bool,
    next_attempt: Instant,
    buffered: u64,
}

impl KafkaCapture {
    /// Configures the consumer and subscribes to the relay's topics. An error is a
    /// configuration librdkafka refuses (named); unreachable brokers are not an error.
    pub fn start(
        kafka: KafkaSettings,
        settings: CaptureSettings,
        bucket: Arc<Bucket>,
        tenants: HashSet<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaCaptureError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &kafka.brokers)
            // A relay that stops without leaving the group (killed, crashed) holds its
            // partitions this long; `stream.kafka.properties` may say otherwise.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000");
        for (k, v) in &kafka.client_properties {
            c.set(k, v);
        }
        c.set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            // New topics (a new tenant, a new event type) are found within 10 s.
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set("fetch.wait.max.ms", "100");
        let consumer: BaseConsumer<CaptureContext> = c
            .create_with_context(CaptureContext {
                changes: Mutex::new(Changes::default()),
            })
            .map_err(KafkaCaptureError::Configure)?;
        let pattern = kafka.topic.subscription();
        consumer
            .subscribe(&[&pattern])
            .map_err(|source| KafkaCaptureError::Subscribe {
                pattern: pattern.clone(),
                source,
            })?;
        Ok(Self {
            consumer: Arc::new(consumer),
            bucket,
            settings,
            kafka,
            tenants,
            metrics,
            parts: HashMap::new(),
            topic_tenants: HashMap::new(),
            failing: false,
            next_attempt: Instant::now(),
            buffered: 0,
        })
    }

    /// Runs on a thread of its own until `stop` is set (S3 requests go through `rt`).
    /// Rolls not written by then are read again by whoever gets the partitions.
    pub fn spawn(
        mut self,
        rt: tokio::runtime::Handle,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("capture".to_owned())
            .spawn(move || {
                tracing::info!(group = %self.settings.group, topics = %self.kafka.topic.subscription(), "Capture reads the relay's Kafka topics into the bucket.");
                while !stop.load(Relaxed) {
                    self.step(&rt);
                }
                self.metrics.capture_partitions.store(0, Relaxed);
                self.metrics.capture_buffered_bytes.store(0, Relaxed);
            })
    }

    fn step(&mut self, rt: &tokio::runtime::Handle) {
        let consumer = self.consumer.clone();
        let msg = consumer.poll(POLL);
        self.apply_changes();
        match msg {
            Some(Ok(m)) => {
                let taken = self.take(&m);
                drop(m);
                if let Some(tp) = taken {
                    self.seal_if_full(&tp);
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "Capture: Kafka reported an error."),
            None => {}
        }
        if Instant::now() >= self.next_attempt {
            if let Err(e) = self.work(rt) {
                self.metrics.capture_errors.fetch_add(1, Relaxed);
                if !self.failing {
                    tracing::warn!(error = %e, "Capture could not write a roll; it tries again every second (nothing is skipped).");
                    self.pause_all(true);
                }
                self.failing = true;
                self.next_attempt = Instant::now() + RETRY;
            } else if self.failing {
                self.failing = false;
                self.pause_all(false);
                tracing::info!("Capture writes to the bucket again.");
            }
        }
        self.metrics
            .capture_partitions
            .store(self.parts.len() as u64, Relaxed);
        self.metrics
            .capture_buffered_bytes
            .store(self.buffered, Relaxed);
    }

    /// Revoked partitions are forgotten (their rolls are read again by the next owner);
    /// assigned ones wait, paused, for [`Self::resolve`].
    fn apply_changes(&mut self) {
        let changes = std::mem::take(
            &mut *self
                .consumer
                .context()
                .changes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let list = |tps: &[Tp]| {
            tps.iter()
                .map(|(t, p)| format!("{t}/{p}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !changes.revoked.is_empty() {
            tracing::info!(partitions = %list(&changes.revoked), "Capture gives up partitions (another relay of the group takes them).");
        }
        for tp in changes.revoked {
            if let Some(p) = self.parts.remove(&tp) {
                let dropped: u64 = p.rolls.iter().map(|r| r.bytes).sum();
                self.buffered -= dropped;
            }
        }
        if !changes.assigned.is_empty() {
            tracing::info!(partitions = %list(&changes.assigned), "Capture was given partitions.");
        }
        for tp in changes.assigned {
            self.parts.insert(tp, Part::default());
        }
    }

    /// Pauses (or resumes) every partition whose start is resolved.
    fn pause_all(&self, pause: bool) {
        let mut l = TopicPartitionList::new();
        for (tp, p) in &self.parts {
            if p.resolved {
                l.add_partition(&tp.0, tp.1);
            }
        }
        if l.count() == 0 {
            return;
        }
        let r = if pause {
            self.consumer.pause(&l)
        } else {
            self.consumer.resume(&l)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, pause, "Capture could not pause or resume its partitions.");
        }
    }

    /// Adds a record to its partition's open roll; the partition, if it took it.
    fn take(&mut self, m: &BorrowedMessage<'_>) -> Option<Tp> {
        let tp = (m.topic().to_owned(), m.partition());
        let part = self.parts.get_mut(&tp)?;
        if !part.resolved {
            // Fetched before the pause took hold; read again once resolved.
            return None;
        }
        let offset = m.offset();
        match part.rolls.back() {
            // Already taken (a seek back).
            Some(r) if offset < r.next => return None,
            Some(r) if r.to.is_none_or(|to| offset < to) => {}
            _ => part.rolls.push_back(Roll::new(offset, None)),
        }
        let roll = part.rolls.back_mut()?;
        let mut line = match m.headers() {
            Some(h) => binding::structured(h.iter().map(|h| (h.key, h.value)), m.payload()),
            None => binding::structured([], m.payload()),
        };
        line.push(b'\n');
        let at = m
            .timestamp()
            .to_millis()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .unwrap_or_else(chrono::Utc::now);
        let key = (
            line_type(&line),
            at.format("%Y-%m-%d").to_string(),
            at.format("%H").to_string(),
        );
        roll.bytes += line.len() as u64;
        roll.events += 1;
        roll.next = offset + 1;
        self.buffered += line.len() as u64;
        roll.lines.entry(key).or_default().extend_from_slice(&line);
        Some(tp)
    }

    /// Seals the partition's open roll once it holds `roll_bytes`.
    fn seal_if_full(&mut self, tp: &Tp) {
        if let Some(r) = self.parts.get_mut(tp).and_then(|p| p.rolls.back_mut())
            && r.to.is_none()
            && r.bytes >= self.settings.roll_bytes
        {
            r.to = Some(r.next);
        }
    }

    /// Resolves new partitions, seals rolls that are old enough, and writes every sealed
    /// roll that holds all its records. Stops at the first error.
    fn work(&mut self, rt: &tokio::runtime::Handle) -> Result<(), KafkaCaptureError> {
        let unresolved: Vec<Tp> = self
            .parts
            .iter()
            .filter(|(_, p)| !p.resolved)
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in unresolved {
            self.resolve(rt, &tp)?;
        }
        // Rolls of many partitions together hold at most twice `roll_bytes`: past that,
        // the largest open one is sealed early.
        if self.buffered >= self.settings.roll_bytes.saturating_mul(2)
            && let Some(r) = self
                .parts
                .values_mut()
                .filter_map(|p| p.rolls.back_mut())
                .filter(|r| r.to.is_none() && r.events > 0)
                .max_by_key(|r| r.bytes)
        {
            r.to = Some(r.next);
        }
        let roll_age = self.settings.roll_age;
        let mut due: Vec<Tp> = Vec::new();
        for (tp, p) in &mut self.parts {
            if let Some(r) = p.rolls.back_mut()
                && r.to.is_none()
                && r.events > 0
                && r.started.elapsed() >= roll_age
            {
                r.to = Some(r.next);
            }
            if p.rolls.front().is_some_and(|r| r.to.is_some()) {
                due.push(tp.clone());
            }
        }
        due.sort();
        for tp in due {
            self.write_ready(rt, &tp)?;
        }
        Ok(())
    }

    /// Finds where to read the partition from (see the module docs), moves the consumer
    /// there and resumes it.
    fn resolve(&mut self, rt: &tokio::runtime::Handle, tp: &Tp) -> Result<(), KafkaCaptureError> {
        let committed = self
            .consumer
            .committed_offsets(one(tp, None), KAFKA_TIMEOUT)
            .map_err(|source| KafkaCaptureError::Committed {
                topic: tp.0.clone(),
                partition: tp.1,
                source,
            })?;
        let committed = match committed.find_partition(&tp.0, tp.1).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        let key = self.range_key(tp);
        let range = rt.block_on(self.bucket.get_bytes(&key)).map_err(|source| {
            KafkaCaptureError::ReadRange {
                key: key.clone(),
                source,
            }
        })?;
        let range = match range {
            None => None,
            Some(bytes) => match serde_json::from_slice::<RollRange>(&bytes) {
                Ok(r) if r.from < r.to => Some(r),
                _ => {
                    tracing::warn!(%key, "The capture range file is not a range; the partition is read from the group's offset.");
                    None
                }
            },
        };
        let (start, redo) = match (range, committed) {
            (Some(r), Some(c)) if c == r.to => (Offset::Offset(c), None),
            (Some(r), _) => (Offset::Offset(r.from), Some(r)),
            (None, Some(c)) => (Offset::Offset(c), None),
            (None, None) => (Offset::Beginning, None),
        };
        self.consumer
            .seek(&tp.0, tp.1, start, KAFKA_TIMEOUT)
            .map_err(|source| KafkaCaptureError::Seek {
                offset: start,
                topic: tp.0.clone(),
                partition: tp.1,
                source,
            })?;
        tracing::info!(topic = %tp.0, partition = tp.1, start = ?start, committed = ?committed, range = ?range, "Capture resumes a partition.");
        let Some(part) = self.parts.get_mut(tp) else {
            return Ok(());
        };
        if let Some(r) = redo {
            tracing::info!(topic = %tp.0, partition = tp.1, from = r.from, to = r.to, "Writing the capture roll a stop interrupted again, with the same range and keys.");
            part.rolls.push_back(Roll::new(r.from, Some(r.to)));
        }
        part.resolved = true;
        if !self.failing {
            self.consumer
                .resume(&one(tp, None))
                .map_err(|source| KafkaCaptureError::Resume {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    source,
                })?;
        }
        Ok(())
    }

    fn range_key(&self, tp: &Tp) -> String {
        format!(
            "{STATE_PREFIX}/{}/{}.{}.json",
            self.settings.group, tp.0, tp.1
        )
    }

    /// Which tenant a topic is: of the names the template allows, a configured tenant
    /// (else the first; `%00` if none, which the relay's own topics never are).
    fn tenant_of(&mut self, topic: &str) -> String {
        if let Some(t) = self.topic_tenants.get(topic) {
            return t.clone();
        }
        let candidates = self.kafka.topic.tenants_of(topic);
        let t = candidates
            .iter()
            .find(|t| self.tenants.contains(**t))
            .or(candidates.first())
            .map_or_else(|| "%00".to_owned(), |t| (*t).to_owned());
        self.topic_tenants.insert(topic.to_owned(), t.clone());
        t
    }

    /// Writes the partition's sealed rolls that hold all their records, in order.
    fn write_ready(
        &mut self,
        rt: &tokio::runtime::Handle,
        tp: &Tp,
    ) -> Result<(), KafkaCaptureError> {
        loop {
            let position = self.position(tp);
            let tenant = self.tenant_of(&tp.0);
            let range_key = self.range_key(tp);
            let Some(part) = self.parts.get_mut(tp) else {
                return Ok(());
            };
            let Some(roll) = part.rolls.front_mut() else {
                return Ok(());
            };
            let Some(to) = roll.to else {
                return Ok(());
            };
            // A roll redone after a stop waits for its records (offsets without records —
            // compaction, transaction markers — show in the position).
            if roll.next < to && position.is_none_or(|p| p < to) {
                return Ok(());
            }
            if !roll.range_stored {
                let body = serde_json::to_vec(&RollRange {
                    from: roll.from,
                    to,
                })?;
                rt.block_on(self.bucket.put_bytes(&range_key, body, "application/json"))
                    .map_err(|source| KafkaCaptureError::Write {
                        key: range_key.clone(),
                        source,
                    })?;
                roll.range_stored = true;
            }
            if !roll.objects_written {
                let name = format!("{}.{}.{:020}", tp.0, tp.1, roll.from);
                for ((ty, date, hour), lines) in &roll.lines {
                    let key = object_key(&tenant, ty, date, hour, &name);
                    let body = gzip(lines);
                    let len = body.len() as u64;
                    let started = Instant::now();
                    let r = rt.block_on(self.bucket.put_bytes(&key, body, "application/gzip"));
                    self.metrics.object_store_seconds.observe(started.elapsed());
                    r.map_err(|source| KafkaCaptureError::Write {
                        key: key.clone(),
                        source,
                    })?;
                    self.metrics.capture_bytes.fetch_add(len, Relaxed);
                }
                roll.objects_written = true;
                self.metrics
                    .capture_objects
                    .fetch_add(roll.lines.len() as u64, Relaxed);
                self.metrics.capture_events.fetch_add(roll.events, Relaxed);
                tracing::debug!(topic = %tp.0, partition = tp.1, from = roll.from, to, events = roll.events, objects = roll.lines.len(), "Captured a roll.");
            }
            let commit = self
                .consumer
                .commit(&one(tp, Some(Offset::Offset(to))), CommitMode::Sync);
            if let Err(e) = commit {
                // Written, not committed: the range file says so, and the roll is written
                // again (the same bytes) by whoever reads the partition next. Only a
                // commit that may succeed later is worth keeping the roll for.
                let still_ours = self
                    .consumer
                    .assignment()
                    .is_ok_and(|a| a.find_partition(&tp.0, tp.1).is_some());
                if still_ours {
                    return Err(KafkaCaptureError::Commit {
                        offset: to,
                        topic: tp.0.clone(),
                        partition: tp.1,
                        source: e,
                    });
                }
            }
            let done = part.rolls.pop_front().map_or(0, |r| r.bytes);
            self.buffered -= done;
        }
    }

    /// The consumer's position in a partition, if it has one.
    fn position(&self, tp: &Tp) -> Option<i64> {
        let pos = self.consumer.position().ok()?;
        match pos.find_partition(&tp.0, tp.1)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }
}

/// Shared between the relay's tasks and the capture thread: stops it and waits.
pub struct CaptureThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CaptureThread {
    pub fn new(stop: Arc<AtomicBool>, thread: std::thread::JoinHandle<()>) -> Self {
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread after its current step and waits for it (leaving the group).
    pub fn stop(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
