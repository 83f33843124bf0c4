//! The uplink: drains the outbox to the relay.
//!
//! One batch at a time (highest priority first, in sequence order within a priority, and
//! every eighth batch lowest priority first so none starves), over one kept-alive HTTP
//! connection:
//! read up to `batch_max_events` records, encode them as a gzip'd CloudEvents batch, POST,
//! and settle by the relay's per-event results (delete the durable ones, dead-letter the
//! rejected ones). Nothing leaves the outbox without a result from the relay.
//!
//! * 429, 5xx, 401/403, 415 and network errors: keep the batch, back off (exponential with
//!   jitter, honouring `Retry-After`), try again.
//! * 413: halve the batch; a single event that is still too large is dead-lettered.
//! * 400 for the whole request: re-send the events one at a time, so the one the relay
//!   cannot read is found and dead-lettered and the others flow on.

mod answer;
mod backoff;
mod body;
pub(crate) mod encode;
mod files;
mod limit;
mod retry;
pub(crate) mod tls;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pigeon_shared::shutdown::Shutdown;
use pigeon_shared::wire::{self, EventStatus, IngestResponse};
use reqwest::header;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

pub(crate) use backoff::Backoff;
pub(crate) use encode::encode_batch;
pub(crate) use files::run_files;

use answer::{Failure, FailureKind, Reply, error_chain};
use retry::{RetryPolicy, Verdict};

use crate::config::{Compression, RelayConfig};
use crate::outbox::reader::{Cursors, PRIORITIES};
use crate::outbox::{DEFAULT_PRIORITY, OutboxReader, OutboxWriter, Record};
use crate::stats::Stats;

/// How often an idle uplink looks at the outbox again although the writer said nothing:
/// records written by another process (`pigeon-gateway dead-letter retry`) do not wake
/// it, so they are sent within this long.
pub(crate) const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// One batch in this many is filled lowest priority first (see [`Uplink::run`]).
pub(crate) const STARVATION_GUARD: u64 = 8;

/// How the relay answered one batch.
#[derive(Debug)]
enum Answer {
    Results(Vec<wire::EventResult>),
    TooLarge(String),
    Unreadable(String),
    Retry(Failure),
}

/// The batch lane's state between requests.
struct BatchLane {
    /// Per priority, the highest sequence sent: higher priorities drain first, each in
    /// sequence order.
    cursors: Cursors,
    /// Batches sent; every STARVATION_GUARD-th is filled lowest priority first, so a
    /// steady stream of alarms cannot hold routine readings back for ever.
    batches: u64,
    /// The most events the next batch may have (less than `batch_max_events` while
    /// the relay says the requests are too large, or one is being looked for).
    limit: usize,
    retry: RetryPolicy,
    /// Whether the next request re-sends events whose last attempt failed.
    retrying: bool,
    /// Since when the lane has held back a small batch of routine events.
    lingering_since: Option<Instant>,
    /// The previous batch's settle commits while the next batch is on the wire.
    settling: Option<JoinHandle<()>>,
}

/// A batch read from the outbox, about to be sent.
struct Batch {
    /// Never empty.
    records: Vec<Record>,
    /// Every sequence below this has had its result from the relay.
    settled_below: u64,
    /// Where each priority's cursor moves once the batch is done with.
    sent: Cursors,
    read_at: Instant,
}

impl BatchLane {
    fn new(config: &RelayConfig) -> BatchLane {
        BatchLane {
            cursors: [0; PRIORITIES as usize],
            batches: 0,
            limit: config.batch_max_events,
            retry: RetryPolicy::new(config),
            retrying: false,
            lingering_since: None,
            settling: None,
        }
    }

    /// Waits for the previous batch's settle commit, if one is still running.
    async fn settled(&mut self) {
        if let Some(prev) = self.settling.take() {
            let _ = prev.await;
        }
    }
}

impl Batch {
    /// `records` (not empty) read after `cursors`; `min_seq` is the lowest sequence in
    /// the outbox.
    fn new(
        records: Vec<Record>,
        min_seq: Option<u64>,
        cursors: Cursors,
        read_at: Instant,
    ) -> Batch {
        // Every sequence below the lowest still in the outbox has had its result from
        // the relay (a file uploading in the other lane, or a waiting record of a lower
        // priority, keeps it down).
        let settled_below = min_seq.unwrap_or(records[0].seq);
        let mut sent = cursors;
        for r in &records {
            let c = &mut sent[r.priority.min(PRIORITIES - 1) as usize];
            *c = (*c).max(r.seq);
        }
        Batch {
            records,
            settled_below,
            sent,
            read_at,
        }
    }

    fn first(&self) -> &Record {
        &self.records[0]
    }

    fn len(&self) -> usize {
        self.records.len()
    }
}

pub(crate) struct Uplink {
    config: RelayConfig,
    /// The relay's base URL.
    base: reqwest::Url,
    /// The ingest endpoint.
    url: reqwest::Url,
    token: Option<String>,
    client: reqwest::Client,
    reader: Arc<OutboxReader>,
    writer: OutboxWriter,
    stats: Arc<Stats>,
    producer_id: String,
    /// The bucket of the upload limit in force (`relay.max_upload_rate`, or the schedule
    /// window's); none while there is no limit.
    limit: std::sync::Mutex<Option<limit::RateLimit>>,
}

impl Uplink {
    pub(crate) fn new(
        config: RelayConfig,
        token: Option<String>,
        reader: Arc<OutboxReader>,
        writer: OutboxWriter,
        stats: Arc<Stats>,
        producer_id: String,
    ) -> anyhow::Result<Self> {
        let base = reqwest::Url::parse(&config.url)?;
        let url = base.join(wire::INGEST_PATH)?;
        let mut builder = reqwest::Client::builder()
            .timeout(config.request_timeout.get())
            .connect_timeout(config.request_timeout.get().min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(60))
            .user_agent(concat!("pigeon-gateway/", env!("CARGO_PKG_VERSION")));
        let https = url.scheme() == "https";
        if !https {
            // Plain HTTP needs no trust store: do not fail on a system that has none.
            builder = builder.tls_certs_only(std::iter::empty());
        } else if let Some(tls) = tls::client_config(&config).map_err(anyhow::Error::msg)? {
            // relay.ca_file and/or relay.client_cert.
            builder = builder.tls_backend_preconfigured(tls);
        }
        let client = builder.build().map_err(|e| {
            // reqwest says "builder error"; the reason is further down the chain.
            let why = error_chain(&e);
            if https {
                anyhow::anyhow!(
                    "cannot set up TLS for relay.url {url}: {why}. The system's CA certificates are needed (Debian, Raspberry Pi OS: apt install ca-certificates)"
                )
            } else {
                anyhow::anyhow!("cannot set up the HTTP client for relay.url {url}: {why}")
            }
        })?;
        Ok(Self {
            config,
            base,
            url,
            token,
            client,
            reader,
            writer,
            stats,
            producer_id,
            limit: std::sync::Mutex::new(None),
        })
    }

    /// Runs the batch lane until `shutdown` stops it. A request already sent is
    /// finished first (the caller bounds that with the shutdown deadline). Files have a
    /// lane of their own ([`run_files`]).
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut lane = BatchLane::new(&self.config);
        while !shutdown.is_stopping() {
            let Some(batch) = self.next_batch(&mut lane, &mut shutdown).await else {
                continue;
            };
            let sent_at = Instant::now();
            match self.send_batch(&mut lane, &batch).await {
                Answer::Results(results) => {
                    self.delivered(&mut lane, batch, &results, sent_at).await
                }
                Answer::TooLarge(msg) => self.too_large(&mut lane, &batch, msg).await,
                Answer::Unreadable(msg) => self.unreadable(&mut lane, &batch, msg).await,
                Answer::Retry(failure) => {
                    self.failed(&mut lane, &batch, failure, &mut shutdown).await;
                }
            }
        }
        lane.settled().await;
        debug!("The uplink stopped.");
    }

    /// The next batch to send, or `None` after waiting: for the outbox to be readable,
    /// for events to arrive, or for routine events to gather (`relay.batch_linger`).
    async fn next_batch(&self, lane: &mut BatchLane, shutdown: &mut Shutdown) -> Option<Batch> {
        let read_at = Instant::now();
        let lowest_first = lane.batches % STARVATION_GUARD == STARVATION_GUARD - 1;
        let (records, min_seq) = match self.read(lane.cursors, lowest_first, lane.limit).await {
            Ok(b) => b,
            Err(e) => {
                error!(error = %e, "Cannot read the outbox; retrying.");
                shutdown.stopped_within(lane.retry.backoff()).await;
                return None;
            }
        };
        if records.is_empty() {
            tokio::select! {
                () = shutdown.stopped() => {}
                _ = self.writer.committed() => {}
                _ = tokio::time::sleep(IDLE_RECHECK) => {}
            }
            return None;
        }
        // Routine events wait a moment for company (relay.batch_linger).
        if let Some(wait) = self.linger(&records, lane.limit, lane.retrying, lane.lingering_since) {
            lane.lingering_since.get_or_insert_with(Instant::now);
            // An alarm committed meanwhile ends the wait: it goes now, and the routine
            // events with it.
            tokio::select! {
                () = shutdown.stopped() => {}
                _ = self.writer.urgent_committed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            return None;
        }
        lane.lingering_since = None;
        Some(Batch::new(records, min_seq, lane.cursors, read_at))
    }

    /// Sends `batch` (counting a re-sent one) and notes when the relay was last tried.
    async fn send_batch(&self, lane: &mut BatchLane, batch: &Batch) -> Answer {
        if std::mem::take(&mut lane.retrying) {
            self.stats.upload_retries.fetch_add(1, Ordering::Relaxed);
        }
        let answer = self.send(&batch.records, batch.settled_below).await;
        self.stats
            .relay_last_attempt_unix
            .store(chrono::Utc::now().timestamp() as u64, Ordering::Relaxed);
        answer
    }

    /// The relay has `batch`'s results: settle them, move on, and grow the batches
    /// back to `batch_max_events`.
    async fn delivered(
        &self,
        lane: &mut BatchLane,
        batch: Batch,
        results: &[wire::EventResult],
        sent_at: Instant,
    ) {
        let settle_at = Instant::now();
        self.stats.upload_successes.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = lane.retry.succeeded() {
            info!(after = ?r.after, failed_attempts = r.failed_attempts, "The relay is reachable again; delivering the backlog.");
        }
        self.stats.relay_reachable.store(true, Ordering::Relaxed);
        lane.settled().await;
        lane.settling = Some(self.settle(&batch.records, results));
        debug!(
            events = batch.len(),
            read_ms = (sent_at - batch.read_at).as_secs_f64() * 1e3,
            send_ms = (settle_at - sent_at).as_secs_f64() * 1e3,
            settle_ms = settle_at.elapsed().as_secs_f64() * 1e3,
            "Delivered a batch."
        );
        lane.cursors = batch.sent;
        lane.batches += 1;
        lane.limit = (lane.limit * 2).min(self.config.batch_max_events);
    }

    /// The relay said the request was too large (413): halve the batches; a single
    /// event still too large is dead-lettered.
    async fn too_large(&self, lane: &mut BatchLane, batch: &Batch, msg: String) {
        if batch.len() == 1 {
            let reason = format!("the relay refused the event as too large: {msg}");
            return self.set_aside(lane, batch, reason).await;
        }
        lane.limit = (batch.len() / 2).max(1);
        debug!(
            limit = lane.limit,
            "The relay said the request was too large; sending smaller batches."
        );
    }

    /// The relay could not read the request (400): send its events one by one; a single
    /// one it cannot read is dead-lettered.
    async fn unreadable(&self, lane: &mut BatchLane, batch: &Batch, msg: String) {
        if batch.len() == 1 {
            let reason = format!("the relay could not read the event: {msg}");
            return self.set_aside(lane, batch, reason).await;
        }
        warn!(events = batch.len(), reason = %msg, "The relay could not read a batch; re-sending its events one by one to find the bad one.");
        lane.limit = 1;
    }

    /// Dead-letters the single event of `batch` and moves past it.
    async fn set_aside(&self, lane: &mut BatchLane, batch: &Batch, reason: String) {
        self.dead_letter(batch.first(), reason).await;
        lane.cursors = batch.sent;
    }

    /// The attempt failed: keep the batch and wait before trying again. A relay that
    /// answers, but fails the same events again and again: with relay.max_attempts, find
    /// the event it fails on and set it aside instead of retrying for ever.
    async fn failed(
        &self,
        lane: &mut BatchLane,
        batch: &Batch,
        failure: Failure,
        shutdown: &mut Shutdown,
    ) {
        self.stats.relay_reachable.store(false, Ordering::Relaxed);
        self.stats.upload_failures.fetch_add(1, Ordering::Relaxed);
        lane.retrying = true;
        let Failure {
            kind,
            reason,
            retry_after,
        } = failure;
        if let Verdict::GiveUp { attempts } = lane.retry.failed(batch.first().seq, kind) {
            if batch.len() == 1 {
                let why = format!(
                    "the relay failed it {attempts} times (relay.max_attempts); the last time: {reason}"
                );
                return self.set_aside(lane, batch, why).await;
            }
            warn!(events = batch.len(), attempts, reason = %reason, "The relay failed the same batch too often (relay.max_attempts); sending its events one by one to find the one it fails on.");
            lane.limit = 1;
        }
        let wait = lane.retry.wait(retry_after);
        let delay = wait.delay;
        if kind == FailureKind::Operator && wait.loud {
            error!(relay = %self.url, reason = %reason, "The relay refuses this gateway; events stay in the outbox until this is fixed.");
        } else if wait.loud {
            warn!(relay = %self.url, reason = %reason, retry_in = ?delay, "Cannot deliver to the relay; events stay in the outbox and will be retried.");
        } else {
            debug!(relay = %self.url, reason = %reason, retry_in = ?delay, "Delivery attempt failed.");
        }
        shutdown.stopped_within(delay).await;
    }

    /// How much longer to hold `batch` back for more events to share its request with
    /// (`relay.batch_linger`), or `None` to send it now. Each request ends in a commit of
    /// its results on the SD card, so at a few readings a second sending them one by one
    /// writes several times more. A batch goes at once when it is full (by events or by
    /// half its bytes), when it re-sends a failed attempt, and when anything in it is of a
    /// priority above the default: alarms never wait.
    fn linger(
        &self,
        batch: &[Record],
        limit: usize,
        retrying: bool,
        since: Option<Instant>,
    ) -> Option<Duration> {
        let linger = self.config.batch_linger.get();
        let bytes: u64 = batch.iter().map(|r| r.data.len() as u64).sum();
        if linger.is_zero()
            || retrying
            || batch.len() >= limit
            || bytes.saturating_mul(2) >= self.config.batch_max_bytes.get()
            || batch.iter().any(|r| r.priority > DEFAULT_PRIORITY)
        {
            return None;
        }
        // The oldest event's age by its receive time; and, in case the clock was set
        // back, never longer than `linger` from when this lane started waiting.
        let now_us = chrono::Utc::now().timestamp_micros();
        let oldest_us = batch.iter().map(|r| r.time_us).min()?;
        let age = Duration::from_micros(now_us.saturating_sub(oldest_us).max(0) as u64);
        let waited = since.map_or(Duration::ZERO, |t| t.elapsed());
        let left = linger.saturating_sub(age.max(waited));
        (!left.is_zero()).then_some(left)
    }

    /// The next batch after `cursors`, and the lowest sequence in the outbox.
    async fn read(
        &self,
        cursors: Cursors,
        lowest_first: bool,
        limit: usize,
    ) -> Result<(Vec<Record>, Option<u64>), crate::outbox::OutboxError> {
        let reader = self.reader.clone();
        let max_bytes = self.config.batch_max_bytes.get();
        tokio::task::spawn_blocking(move || {
            let batch = reader.read_batch(&cursors, lowest_first, limit, max_bytes)?;
            let min = if batch.is_empty() {
                None
            } else {
                reader.min_seq()?
            };
            Ok((batch, min))
        })
        .await
        .unwrap_or_else(|_| Err(crate::outbox::OutboxError::Closed))
    }

    /// How long to hold a request of `bytes` for the upload limit in force now (the
    /// schedule is read in the Pi's local time).
    fn upload_wait(&self, bytes: u64) -> Duration {
        use chrono::Timelike;
        if self.config.max_upload_rate.is_none() && self.config.upload_schedule.is_empty() {
            return Duration::ZERO;
        }
        let local = chrono::Local::now();
        let rate = self
            .config
            .upload_rate_at(local.hour() * 60 + local.minute());
        let Ok(mut limit) = self.limit.lock() else {
            return Duration::ZERO;
        };
        let now = tokio::time::Instant::now();
        match (rate, limit.as_mut()) {
            (None, _) => {
                *limit = None;
                Duration::ZERO
            }
            (Some(r), Some(l)) if l.rate() == r => l.reserve(bytes, now),
            (Some(r), _) => {
                // A new limit (start, or a schedule window began or ended): a new bucket.
                let mut l = limit::RateLimit::new(r, now);
                let wait = l.reserve(bytes, now);
                *limit = Some(l);
                wait
            }
        }
    }

    async fn send(&self, batch: &[Record], settled_below: u64) -> Answer {
        let (body, bad) = encode_batch(batch, &self.producer_id, self.config.compression);
        if let Some((seq, reason)) = bad {
            // A record that cannot become a CloudEvent will never be accepted; set it
            // aside so it does not block the ones behind it.
            if let Some(rec) = batch.iter().find(|r| r.seq == seq) {
                self.dead_letter(rec, reason).await;
            }
            return Answer::Retry(Failure {
                retry_after: Some(Duration::ZERO),
                ..Failure::network("a record could not be encoded".into())
            });
        }
        let mut req = self
            .client
            .post(self.url.clone())
            .header(header::CONTENT_TYPE, pigeon_shared::ce::CONTENT_TYPE_BATCH)
            .header(wire::HEADER_SETTLED_BELOW, settled_below)
            .header(wire::HEADER_PRODUCER_ID, &self.producer_id);
        if self.config.compression == Compression::Gzip {
            req = req.header(header::CONTENT_ENCODING, "gzip");
        }
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let len = body.len() as u64;
        let wait = self.upload_wait(len);
        if !wait.is_zero() {
            debug!(
                ?wait,
                bytes = len,
                "Holding the upload to stay within the upload limit (relay.max_upload_rate, relay.upload_schedule)."
            );
            tokio::time::sleep(wait).await;
        }
        self.stats.upload_requests.fetch_add(1, Ordering::Relaxed);
        let resp = match req.body(body).send().await {
            Ok(r) => r,
            Err(e) => return Answer::Retry(Failure::network(error_chain(&e))),
        };
        self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
        let reply = Reply::read(resp).await;
        match reply.status.as_u16() {
            200..=299 => match serde_json::from_str::<IngestResponse>(&reply.text) {
                Ok(r) if r.results.len() == batch.len() => Answer::Results(r.results),
                Ok(r) => Answer::Retry(Failure::relay(format!(
                    "the relay answered {} results for {} events",
                    r.results.len(),
                    batch.len()
                ))),
                Err(e) => Answer::Retry(Failure::relay(format!(
                    "the relay's answer is not an ingest result: {e}"
                ))),
            },
            413 => Answer::TooLarge(reply.message()),
            400 => Answer::Unreadable(reply.message()),
            _ => Answer::Retry(reply.failure()),
        }
    }

    /// Records the relay's results and starts the outbox commit that deletes delivered
    /// records and dead-letters rejected ones; returns the commit's task.
    ///
    /// Not waiting for that commit before the next request is safe: if the gateway dies
    /// before it lands, the records are re-sent after the restart and the relay answers
    /// `duplicate` (they are below the settled-below mark it was given, or in its index).
    fn settle(&self, batch: &[Record], results: &[wire::EventResult]) -> JoinHandle<()> {
        let mut delivered = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (rec, res) in batch.iter().zip(results) {
            match res.status {
                EventStatus::Accepted => delivered.push(rec.seq),
                EventStatus::Duplicate => {
                    self.stats.events_duplicate.fetch_add(1, Ordering::Relaxed);
                    delivered.push(rec.seq);
                }
                EventStatus::Rejected => {
                    let reason = res
                        .reason
                        .clone()
                        .unwrap_or_else(|| "rejected by the relay".into());
                    warn!(id = %rec.id, seq = rec.seq, subject = rec.subject.as_deref().unwrap_or(""), reason = %reason, "The relay rejected an event; it is kept in the dead-letter table.");
                    rejected.push((rec.seq, reason));
                }
            }
        }
        self.stats
            .events_delivered
            .fetch_add(delivered.len() as u64, Ordering::Relaxed);
        self.stats
            .events_dead_lettered
            .fetch_add(rejected.len() as u64, Ordering::Relaxed);
        self.stats
            .last_upload_unix
            .store(chrono::Utc::now().timestamp() as u64, Ordering::Relaxed);
        let writer = self.writer.clone();
        tokio::spawn(async move {
            if let Err(e) = writer.settle(delivered, rejected).await {
                // The relay has them; if they stay in the outbox they are re-sent after a
                // restart and the relay recognises them as duplicates.
                error!(error = %e, "Could not remove delivered events from the outbox.");
            }
        })
    }

    async fn dead_letter(&self, rec: &Record, reason: String) {
        warn!(id = %rec.id, seq = rec.seq, reason = %reason, "Moving an event to the dead-letter table.");
        self.stats
            .events_dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.writer.settle(vec![], vec![(rec.seq, reason)]).await {
            error!(error = %e, "Could not move an event to the dead-letter table.");
        }
    }
}
