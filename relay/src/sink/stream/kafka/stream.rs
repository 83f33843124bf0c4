//! The Kafka stream as the writer sees it: the [`KafkaStream`] client, and when to read
//! the topics back, probe the brokers and catch up with other writers.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use pigeon_shared::ce::GatewayId;

use super::client::{KafkaStream, KafkaStreamError};
use super::config::KafkaSettings;
use crate::sink::NotStored;
use crate::sink::checkpoint::{Checkpoint, Recovered};
use crate::sink::dedup::DedupIndex;
use crate::sink::stream::files::FORGET_FILES_AFTER;
use crate::sink::stream::{Outgoing, Stream, StreamError, Upkeep};

/// With no traffic, how often the writer asks Kafka whether it is there (so `/ready`
/// tells the truth before the next request fails).
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How often the frontiers are caught up when other writers share the partitions.
const CATCH_UP_EVERY: Duration = Duration::from_secs(10);

/// The Kafka stream behind the writer's [`Stream`] interface.
pub struct Kafka {
    client: KafkaStream,
    /// How long after a failed read-back an idle writer tries again (`sink.retry_after`).
    retry_after: Duration,
    /// When the topics were last read back (after a failure, or to catch up).
    last_scan_attempt: Instant,
    /// When Kafka last answered (a group, a read-back or a probe).
    last_contact: Instant,
    /// The last idle probe found Kafka unreachable (logged once, until it answers).
    probe_failed: bool,
    /// Stream files recovery found (left from running with the files stream): kept in
    /// the checkpoint as they are until they count as idle, as the files stream would.
    files: BTreeMap<String, u64>,
    started: Instant,
}

impl Kafka {
    /// Starts the client and reads the topics from the checkpoint's frontiers into the
    /// recovered index. Returns the stream and whether Kafka could be read; an error is a
    /// configuration librdkafka refuses.
    pub fn start(
        settings: KafkaSettings,
        tenants: HashMap<GatewayId, String>,
        default_tenant: String,
        retry_after: Duration,
        files: BTreeMap<String, u64>,
        recovered: &mut Recovered,
    ) -> Result<(Self, bool), KafkaStreamError> {
        let started = Instant::now();
        let (client, report) = KafkaStream::start(
            settings,
            tenants,
            default_tenant,
            std::mem::take(&mut recovered.kafka),
            recovered.checkpoint_at,
            &mut recovered.index,
        )?;
        if let Some(r) = report {
            tracing::info!(
                brokers = client.brokers(),
                partitions = r.partitions,
                records_read = r.records,
                identities = r.identities,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Read the relay's Kafka topics back into the deduplication index."
            );
        }
        let kafka = Self {
            client,
            retry_after,
            last_scan_attempt: Instant::now(),
            last_contact: Instant::now(),
            probe_failed: false,
            files,
            started: Instant::now(),
        };
        Ok((kafka, report.is_some()))
    }

    /// Reads the topics back if a read is pending (a failed delivery, or Kafka down at
    /// startup); `Ok(true)` if it read them.
    fn read_back(&mut self, index: &mut DedupIndex) -> Result<bool, KafkaStreamError> {
        if !self.client.scan_pending() {
            return Ok(false);
        }
        self.last_scan_attempt = Instant::now();
        let started = Instant::now();
        let report = self.client.retry_scan(index)?;
        if let Some(r) = report {
            tracing::info!(
                partitions = r.partitions,
                records_read = r.records,
                identities = r.identities,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Kafka can be read again; the deduplication index is whole."
            );
        }
        Ok(true)
    }

    /// Asks Kafka for its metadata; whether it can take writes, if that changed or it
    /// does not answer.
    fn probe(&mut self) -> Option<bool> {
        self.last_contact = Instant::now();
        match self.client.probe() {
            Ok(()) => {
                if self.probe_failed {
                    tracing::info!(brokers = self.client.brokers(), "Kafka answers again.");
                    self.probe_failed = false;
                    return Some(true);
                }
                None
            }
            Err(e) => {
                if !self.probe_failed {
                    tracing::warn!(
                        brokers = self.client.brokers(),
                        error = %e,
                        "Kafka does not answer; the relay is not ready until it does (nothing is lost: gateways keep their events)."
                    );
                    self.probe_failed = true;
                }
                Some(false)
            }
        }
    }

    /// Reads what other writers stored past the frontiers; whether the index changed.
    fn catch_up(&mut self, index: &mut DedupIndex) -> bool {
        self.last_scan_attempt = Instant::now();
        match self.client.catch_up(index) {
            Ok(r) => {
                tracing::debug!(
                    records_read = r.records,
                    "Caught the Kafka frontiers up with other writers' records."
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "Could not read the Kafka topics to catch up; trying again later."
                );
                false
            }
        }
    }
}

impl Stream for Kafka {
    fn ready(&mut self, index: &mut DedupIndex) -> Result<bool, StreamError> {
        self.last_contact = Instant::now();
        self.read_back(index)
            .inspect_err(|e| {
                tracing::error!(
                    error = %e,
                    "Cannot read the Kafka topics back; the requests are answered 503 and their gateways keep the events."
                );
            })
            .map_err(StreamError::from)
    }

    /// Produces the events and waits for the broker's answer to each.
    fn store(&mut self, events: &[Outgoing<'_>]) -> Vec<Result<(), NotStored>> {
        self.client.produce(events)
    }

    fn idle(&mut self, index: &mut DedupIndex) -> Upkeep {
        let mut upkeep = Upkeep::default();
        if self.client.scan_pending() && self.last_scan_attempt.elapsed() >= self.retry_after {
            // So /ready turns true when Kafka is back, before traffic arrives.
            match self.read_back(index) {
                Ok(read) => {
                    if read {
                        upkeep.index_changed = true;
                        upkeep.healthy = Some(true);
                    }
                }
                Err(_) => upkeep.healthy = Some(false),
            }
        }
        if !self.client.scan_pending()
            && self.last_contact.elapsed() >= PROBE_EVERY
            && let Some(healthy) = self.probe()
        {
            upkeep.healthy = Some(healthy);
        }
        if self.client.lagging()
            && self.last_scan_attempt.elapsed() >= CATCH_UP_EVERY
            && self.catch_up(index)
        {
            upkeep.index_changed = true;
        }
        upkeep
    }

    fn forget_idle(&mut self) -> bool {
        if self.files.is_empty() || self.started.elapsed() < FORGET_FILES_AFTER {
            return false;
        }
        self.files.clear();
        true
    }

    fn save(&self, checkpoint: &mut Checkpoint) {
        checkpoint.files = self.files.clone();
        checkpoint.kafka = self.client.frontiers().clone();
    }
}
