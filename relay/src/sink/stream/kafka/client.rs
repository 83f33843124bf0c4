//! The Kafka client side of the stream: the producer, the read-back of the relay's
//! topics into the index, and the frontiers (see the [module docs](super)).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pigeon_shared::ce::{self, GatewayId};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::binding;
use super::config::KafkaSettings;
use crate::sink::NotStored;
use crate::sink::dedup::DedupIndex;
use crate::sink::stream::Outgoing;

/// Why Kafka could not be used: a configuration librdkafka refuses, or an answer that
/// did not come.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KafkaStreamError {
    #[error("cannot configure the Kafka {client}: {source}")]
    Configure {
        client: &'static str,
        source: KafkaError,
    },
    #[error("no metadata from {brokers}: {source}")]
    NoMetadata { brokers: String, source: KafkaError },
    #[error("cannot read the topics of {brokers}: {source}")]
    Topics { brokers: String, source: KafkaError },
    #[error("cannot read the offsets of {topic}/{partition}: {source}")]
    Offsets {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    /// A partition list librdkafka would not build.
    #[error("{0}")]
    PartitionList(KafkaError),
    #[error("cannot read the topics: {0}")]
    Assign(KafkaError),
    #[error("reading the relay's topics: {0}")]
    Read(KafkaError),
    #[error(
        "reading the relay's topics back did not finish within {timeout:?} ({left} partitions left)"
    )]
    TimedOut { timeout: Duration, left: usize },
}

/// Topic → partition → frontier offset, as the checkpoint stores it.
pub type Frontiers = BTreeMap<String, BTreeMap<i32, i64>>;

/// A partition the checkpoint does not know is read from this long before the
/// checkpoint was written (a topic may have appeared just before a crash).
const UNKNOWN_PARTITION_MARGIN: Duration = Duration::from_secs(3600);
/// Reading back ends once nothing more arrived for this long past the watermarks.
const READ_BACK_QUIET: Duration = Duration::from_millis(500);
/// How long metadata and offset requests may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a record was stored: topic, partition, offset.
type Stored = (String, i32, i64);

struct DeliveryContext {
    /// (the record's number, result) as delivery reports arrive. Records are numbered
    /// across groups, so a late report of an earlier group is told apart.
    reports: Mutex<Vec<(u64, Result<Stored, KafkaError>)>>,
    /// Notified with every report (the producer's polling thread delivers them).
    arrived: Condvar,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, n: Box<u64>) {
        let r = match result {
            Ok(m) => Ok((m.topic().to_owned(), m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((*n, r));
        self.arrived.notify_all();
    }
}

/// The producer, the reader that rebuilds the index, and the frontiers.
pub struct KafkaStream {
    settings: KafkaSettings,
    tenants: HashMap<GatewayId, String>,
    default_tenant: String,
    producer: ThreadedProducer<DeliveryContext>,
    frontiers: Frontiers,
    /// When the frontiers were last made whole (startup or a rescan): partitions without
    /// one are read from a margin before it.
    known_since: SystemTime,
    /// A delivery failed since the last scan: read the partitions again before writing.
    rescan: bool,
    /// A delivery landed past a partition's frontier (another relay writes there too):
    /// a read-back catches the frontier up, and teaches the index what the others wrote.
    lagging: bool,
    /// The number the next record produced gets (see [`DeliveryContext`]).
    next_record: u64,
}

/// What the startup read found.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanReport {
    pub partitions: usize,
    pub records: u64,
    pub identities: u64,
}

impl KafkaStream {
    /// Configures the clients and reads the relay's topics from `frontiers` (a
    /// checkpoint's, written at `checkpoint_at`) into `index`. An error is a configuration
    /// librdkafka refuses (named); unreachable brokers are not an error: the read is
    /// retried, and writes wait for it (answered 503 meanwhile).
    pub fn start(
        settings: KafkaSettings,
        tenants: HashMap<GatewayId, String>,
        default_tenant: String,
        frontiers: Frontiers,
        checkpoint_at: Option<SystemTime>,
        index: &mut DedupIndex,
    ) -> Result<(Self, Option<ScanReport>), KafkaStreamError> {
        let producer = producer(&settings)?;
        let known_since = checkpoint_at
            .map(|t| {
                t.checked_sub(UNKNOWN_PARTITION_MARGIN)
                    .unwrap_or(UNIX_EPOCH)
            })
            .unwrap_or_else(|| {
                SystemTime::now()
                    .checked_sub(settings.recovery_window)
                    .unwrap_or(UNIX_EPOCH)
            });
        let mut stream = Self {
            settings,
            tenants,
            default_tenant,
            producer,
            frontiers,
            known_since,
            rescan: false,
            lagging: false,
            next_record: 0,
        };
        let report = match stream.scan(index) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(
                    brokers = %stream.settings.brokers,
                    error = %e,
                    "Cannot read the relay's Kafka topics back; ingest answers 503 until Kafka can be read."
                );
                stream.rescan = true;
                None
            }
        };
        Ok((stream, report))
    }

    /// Whether the index still waits for a read of the topics (Kafka was unreachable).
    pub fn scan_pending(&self) -> bool {
        self.rescan
    }

    /// Whether the brokers answer a metadata request (within 2 s).
    /// Asks about one topic the relay knows, not the whole cluster's: on a large cluster
    /// the full metadata every few seconds would be wasted work.
    pub fn probe(&self) -> Result<(), KafkaStreamError> {
        let topic = self.frontiers.keys().next().map(String::as_str);
        self.producer
            .client()
            .fetch_metadata(topic, Duration::from_secs(2))
            .map(|_| ())
            .map_err(|source| KafkaStreamError::NoMetadata {
                brokers: self.settings.brokers.clone(),
                source,
            })
    }

    /// Whether some partition's frontier stays behind what this relay wrote there.
    pub fn lagging(&self) -> bool {
        self.lagging
    }

    /// Reads the partitions from their frontiers to their ends (see [`Self::lagging`]).
    pub fn catch_up(&mut self, index: &mut DedupIndex) -> Result<ScanReport, KafkaStreamError> {
        self.scan(index)
    }

    /// Reads the topics back now if a read is pending; whether the index is whole.
    pub fn retry_scan(
        &mut self,
        index: &mut DedupIndex,
    ) -> Result<Option<ScanReport>, KafkaStreamError> {
        if !self.rescan {
            return Ok(None);
        }
        self.scan(index).map(Some)
    }

    pub fn frontiers(&self) -> &Frontiers {
        &self.frontiers
    }

    pub fn brokers(&self) -> &str {
        &self.settings.brokers
    }

    /// Produces the events and waits for the broker's answer to each (at most the
    /// delivery timeout). One result per event, in order.
    ///
    /// Call [`Self::retry_scan`] first: while a read is pending, the index may lack
    /// events a failed delivery stored.
    pub fn produce(&mut self, events: &[Outgoing<'_>]) -> Vec<Result<(), NotStored>> {
        let mut results: Vec<Option<Result<(), NotStored>>> = vec![None; events.len()];
        let deadline = Instant::now() + self.settings.delivery_timeout + Duration::from_secs(5);
        let base = self.next_record;
        self.next_record += events.len() as u64;
        let mut pending = 0usize;
        for (i, ev) in events.iter().enumerate() {
            match self.send(ev, base + i as u64, deadline) {
                Ok(()) => pending += 1,
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (i, r) in self.delivery_reports(base, pending, deadline) {
            results[i] = Some(r.map(|stored| self.advance_frontier(stored)));
        }
        let out: Vec<Result<(), NotStored>> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(NotStored::Unavailable(format!(
                        "no answer from Kafka ({}) within the delivery timeout",
                        self.settings.brokers
                    )))
                })
            })
            .collect();
        if out
            .iter()
            .any(|r| matches!(r, Err(NotStored::Unavailable(_))))
        {
            self.start_afresh();
        }
        out
    }

    /// Hands one event to the producer as record number `n`, waiting (until `deadline`)
    /// while its queue is full.
    fn send(&self, ev: &Outgoing<'_>, n: u64, deadline: Instant) -> Result<(), NotStored> {
        let rec = binding::record(ev.line).map_err(|e| {
            NotStored::Rejected(format!("cannot be put in the Kafka binary mode: {e}"))
        })?;
        let tenant = self
            .tenants
            .get(ev.gateway)
            .map_or(self.default_tenant.as_str(), String::as_str);
        let topic = self
            .settings
            .topic
            .render(tenant, &rec.event_type)
            .map_err(NotStored::Rejected)?;
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = BaseRecord::with_opaque_to(&topic, Box::new(n))
            .key(&rec.key[..])
            .headers(headers);
        if let Some(v) = &rec.value {
            record = record.payload(&v[..]);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        }
    }

    /// Waits (until `deadline`) for the delivery reports of the `pending` records numbered
    /// from `base`; each with its event's place in the group.
    fn delivery_reports(
        &self,
        base: u64,
        mut pending: usize,
        deadline: Instant,
    ) -> Vec<(usize, Result<Stored, NotStored>)> {
        let mut reports = Vec::new();
        let ctx = self.producer.context();
        let mut got = ctx.reports.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            for (n, report) in got.drain(..) {
                // A late report of an earlier group, whose requests were answered 503 and
                // which a read-back covers: not this group's.
                if n < base {
                    continue;
                }
                pending -= 1;
                reports.push(((n - base) as usize, report));
            }
            let now = Instant::now();
            if pending == 0 || now >= deadline {
                break;
            }
            got = ctx
                .arrived
                .wait_timeout(got, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(got);
        reports
            .into_iter()
            .map(|(i, r)| (i, r.map_err(|e| classify(&e))))
            .collect()
    }

    /// A record stored at (topic, partition, offset): contiguous with what is known, the
    /// frontier moves past it. A gap (another writer, or a failed delivery that was
    /// stored) leaves the frontier where it is, so a later read covers the gap.
    fn advance_frontier(&mut self, (topic, partition, offset): Stored) {
        let f = self.frontiers.entry(topic).or_default();
        match f.get_mut(&partition) {
            Some(front) if *front == offset => *front = offset + 1,
            Some(front) if *front > offset => {}
            _ => self.lagging = true,
        }
    }

    /// After failed deliveries: read the partitions again before the next write, and
    /// start a new producer.
    fn start_afresh(&mut self) {
        self.rescan = true;
        // An idempotent producer whose records timed out or were refused can be left
        // in a state it does not leave (an epoch the broker fences, a fatal error):
        // start afresh. What the old one still had in flight is purged; what of it
        // reached the broker, the read-back before the next write finds.
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::warn!(code = ?code, reason = %reason, "The Kafka producer hit a fatal error.");
        }
        match producer(&self.settings) {
            Ok(p) => {
                self.producer = p;
                tracing::info!("Started a new Kafka producer after failed deliveries.");
            }
            Err(e) => tracing::error!(error = %e, "Could not start a new Kafka producer."),
        }
    }

    /// Reads every partition of the relay's topics from its frontier to its end,
    /// adding what it finds to the index; the frontiers then stand at the ends.
    fn scan(&mut self, index: &mut DedupIndex) -> Result<ScanReport, KafkaStreamError> {
        let consumer = consumer(&self.settings)?;
        let mut report = ScanReport::default();
        let starts = self.starts(&consumer, &mut report)?;
        let ends = read_partitions(
            &consumer,
            starts,
            index,
            &mut report,
            self.settings.recovery_timeout,
        )?;
        for ((topic, partition), end) in ends {
            self.frontiers
                .entry(topic)
                .or_default()
                .insert(partition, end);
        }
        self.known_since = SystemTime::now();
        self.rescan = false;
        self.lagging = false;
        Ok(report)
    }

    /// Where to start reading each partition of the relay's topics: its frontier, or,
    /// for a partition the frontiers do not know, the first offset since `known_since`.
    fn starts(
        &self,
        consumer: &BaseConsumer,
        report: &mut ScanReport,
    ) -> Result<Vec<PartitionStart>, KafkaStreamError> {
        let metadata = consumer
            .fetch_metadata(None, ADMIN_TIMEOUT)
            .map_err(|source| KafkaStreamError::Topics {
                brokers: self.settings.brokers.clone(),
                source,
            })?;
        let since_ms = self
            .known_since
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut starts: Vec<PartitionStart> = Vec::new();
        let mut unknown = TopicPartitionList::new();
        for t in metadata.topics() {
            if !self.settings.topic.matches(t.name()) && !self.frontiers.contains_key(t.name()) {
                continue;
            }
            for p in t.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(t.name(), p.id(), ADMIN_TIMEOUT)
                    .map_err(|source| KafkaStreamError::Offsets {
                        topic: t.name().to_owned(),
                        partition: p.id(),
                        source,
                    })?;
                report.partitions += 1;
                let start = match self.frontiers.get(t.name()).and_then(|f| f.get(&p.id())) {
                    Some(&front) => front.max(low),
                    None => {
                        unknown
                            .add_partition_offset(t.name(), p.id(), Offset::Offset(since_ms))
                            .map_err(KafkaStreamError::PartitionList)?;
                        -1
                    }
                };
                starts.push(PartitionStart {
                    topic: t.name().to_owned(),
                    partition: p.id(),
                    start,
                    high,
                });
            }
        }
        if unknown.count() > 0 {
            // A broker that cannot answer by time gets the partitions read whole.
            let by_time = consumer.offsets_for_times(unknown, ADMIN_TIMEOUT).ok();
            for s in starts.iter_mut().filter(|s| s.start < 0) {
                s.start = match by_time
                    .as_ref()
                    .and_then(|l| l.find_partition(&s.topic, s.partition))
                    .map(|x| x.offset())
                {
                    Some(Offset::Offset(o)) => o,
                    Some(Offset::End) => s.high,
                    _ => 0,
                };
            }
        }
        Ok(starts)
    }
}

/// Where reading one partition back starts, and its high watermark then.
struct PartitionStart {
    topic: String,
    partition: i32,
    /// -1 until known.
    start: i64,
    high: i64,
}

/// Reads every partition from its start to its end (past the watermarks, until nothing
/// more comes for [`READ_BACK_QUIET`]), adding each record's identity to `index`.
/// Returns where each partition ends: the new frontiers.
fn read_partitions(
    consumer: &BaseConsumer,
    starts: Vec<PartitionStart>,
    index: &mut DedupIndex,
    report: &mut ScanReport,
    timeout: Duration,
) -> Result<HashMap<(String, i32), i64>, KafkaStreamError> {
    // Every partition is assigned, even one whose watermark says there is nothing
    // past the start: some brokers (tansu 0.6) report a high watermark short of the
    // last batch's records, so reading goes on past the watermarks until nothing has
    // come for a while.
    let mut assignment = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for PartitionStart {
        topic,
        partition,
        start,
        high,
    } in starts
    {
        assignment
            .add_partition_offset(&topic, partition, Offset::Offset(start))
            .map_err(KafkaStreamError::PartitionList)?;
        ends.insert((topic.clone(), partition), start.max(high));
        if start < high {
            remaining.insert((topic, partition), high);
        }
    }
    if assignment.count() > 0 {
        consumer
            .assign(&assignment)
            .map_err(KafkaStreamError::Assign)?;
        let deadline = Instant::now() + timeout;
        let mut quiet_since: Option<Instant> = None;
        loop {
            if Instant::now() >= deadline {
                return Err(KafkaStreamError::TimedOut {
                    timeout,
                    left: remaining.len(),
                });
            }
            let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                if remaining.is_empty() {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= READ_BACK_QUIET {
                        break;
                    }
                    continue;
                }
                // Compaction or transaction markers can leave offsets without records:
                // the position says where a partition really is.
                if let Ok(pos) = consumer.position() {
                    for e in pos.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            let k = (e.topic().to_owned(), e.partition());
                            if remaining.get(&k).is_some_and(|&end| o >= end) {
                                remaining.remove(&k);
                            }
                        }
                    }
                }
                continue;
            };
            quiet_since = None;
            let msg = msg.map_err(KafkaStreamError::Read)?;
            report.records += 1;
            if let Some(h) = msg.headers()
                && let Some((source, producer, seq)) =
                    binding::identity(h.iter().map(|h| (h.key, h.value)))
                && let Some(gw) = ce::source_gateway(source)
                && let Ok(seq) = ce::parse_sequence(seq)
            {
                index.insert(gw, producer, seq);
                index.compact(gw, producer);
                report.identities += 1;
            }
            let k = (msg.topic().to_owned(), msg.partition());
            if let Some(end) = ends.get_mut(&k) {
                *end = (*end).max(msg.offset() + 1);
            }
            if remaining
                .get(&k)
                .is_some_and(|&end| msg.offset() + 1 >= end)
            {
                remaining.remove(&k);
            }
        }
    }
    Ok(ends)
}

/// Whether the event can never be stored, or a retry may succeed.
fn classify(e: &KafkaError) -> NotStored {
    use RDKafkaErrorCode as C;
    let code = e.rdkafka_error_code();
    match code {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidMessage) => {
            NotStored::Rejected(format!("Kafka refused the record: {e}"))
        }
        Some(C::UnknownTopic | C::UnknownTopicOrPartition) => NotStored::Unavailable(format!(
            "{e}: the topic does not exist; create it (the relay does not create topics)"
        )),
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed) => {
            NotStored::Unavailable(format!("{e}: the relay's Kafka user may not write there"))
        }
        _ => NotStored::Unavailable(e.to_string()),
    }
}

fn base_config(settings: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers);
    for (k, v) in &settings.client_properties {
        c.set(k, v);
    }
    c
}

fn producer(
    settings: &KafkaSettings,
) -> Result<ThreadedProducer<DeliveryContext>, KafkaStreamError> {
    let mut c = base_config(settings);
    c.set("acks", "all")
        .set(
            "enable.idempotence",
            if settings.idempotence {
                "true"
            } else {
                "false"
            },
        )
        .set(
            "message.timeout.ms",
            settings.delivery_timeout.as_millis().to_string(),
        )
        .set("message.max.bytes", settings.max_message_bytes.to_string())
        .set("linger.ms", "2");
    c.create_with_context(DeliveryContext {
        reports: Mutex::new(Vec::new()),
        arrived: Condvar::new(),
    })
    .map_err(|source| KafkaStreamError::Configure {
        client: "producer",
        source,
    })
}

fn consumer(
    settings: &KafkaSettings,
) -> Result<BaseConsumer<DefaultConsumerContext>, KafkaStreamError> {
    let mut c = base_config(settings);
    c.set("group.id", "pigeon-relay-readback")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50");
    c.create().map_err(|source| KafkaStreamError::Configure {
        client: "consumer",
        source,
    })
}
