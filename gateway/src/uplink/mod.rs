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

mod backoff;
mod body;
pub(crate) mod encode;
mod files;
mod limit;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pigeon_shared::shutdown::Shutdown;
use pigeon_shared::wire::{self, EventStatus, IngestResponse};
use reqwest::header;
use tracing::{debug, error, info, warn};

pub use backoff::Backoff;
pub use encode::{encode_batch, to_event};
pub use files::run_files;

use crate::config::{Compression, RelayConfig};
use crate::outbox::reader::{Cursors, PRIORITIES};
use crate::outbox::{DEFAULT_PRIORITY, OutboxReader, OutboxWriter, Record};
use crate::stats::Stats;

/// How often an idle uplink looks at the outbox again although the writer said nothing:
/// records written by another process (`pigeon-gateway dead-letter retry`) do not wake
/// it, so they are sent within this long.
pub const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// One batch in this many is filled lowest priority first (see [`Uplink::run`]).
pub const STARVATION_GUARD: u64 = 8;

/// How the relay answered one request.
#[derive(Debug)]
enum Answer {
    Results(Vec<wire::EventResult>),
    TooLarge(String),
    Unreadable(String),
    Retry {
        after: Option<Duration>,
        reason: String,
        kind: Failure,
    },
}

/// What kind of failure a retried attempt was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The relay could not be reached, or the connection broke.
    Network,
    /// The relay answered, with an error (5xx, 429) or an answer that makes no sense.
    /// Counted against `relay.max_attempts`.
    Relay,
    /// The relay refuses the gateway (401, 403, 415): a person has to fix the config.
    Operator,
}

pub struct Uplink {
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
    pub fn new(
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
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        // Per priority, the highest sequence sent: higher priorities drain first, each
        // in sequence order.
        let mut cursors: Cursors = [0; PRIORITIES as usize];
        // Batches sent; every STARVATION_GUARD-th is filled lowest priority first, so a
        // steady stream of alarms cannot hold routine readings back for ever.
        let mut batches = 0u64;
        let max_events = self.config.batch_max_events;
        let mut limit = max_events;
        let mut backoff = Backoff::new(
            self.config.backoff_initial.get(),
            self.config.backoff_max.get(),
        );
        let mut failing_since: Option<Instant> = None;
        let mut failures = 0u64;
        // The batch (by its first sequence) the relay keeps failing, and how often it did.
        let mut failing_batch: Option<u64> = None;
        let mut answered_failures = 0u32;
        // Whether the next request re-sends events whose last attempt failed.
        let mut retrying = false;
        // Since when the batch lane has held back a small batch of routine events.
        let mut lingering_since: Option<Instant> = None;
        // The previous batch's settle commits while the next batch is on the wire.
        let mut settling: Option<tokio::task::JoinHandle<()>> = None;
        while !shutdown.is_stopping() {
            let t_read = Instant::now();
            let lowest_first = batches % STARVATION_GUARD == STARVATION_GUARD - 1;
            let (batch, min_seq) = match self.read(cursors, lowest_first, limit).await {
                Ok(b) => b,
                Err(e) => {
                    error!(error = %e, "Cannot read the outbox; retrying.");
                    if shutdown.stopped_within(backoff.next_delay()).await {
                        break;
                    }
                    continue;
                }
            };
            let Some(first) = batch.first() else {
                tokio::select! {
                    () = shutdown.stopped() => {}
                    _ = self.writer.committed() => {}
                    _ = tokio::time::sleep(IDLE_RECHECK) => {}
                }
                continue;
            };
            // Routine events wait a moment for company (relay.batch_linger).
            match self.linger(&batch, limit, retrying, lingering_since) {
                Some(wait) => {
                    lingering_since.get_or_insert_with(Instant::now);
                    // An alarm committed meanwhile ends the wait: it goes now, and the
                    // routine events with it.
                    tokio::select! {
                        () = shutdown.stopped() => {}
                        _ = self.writer.urgent_committed() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                None => lingering_since = None,
            }
            // Every sequence below the lowest still in the outbox has had its result from
            // the relay (a file uploading in the other lane, or a waiting record of a
            // lower priority, keeps it down).
            let settled_below = min_seq.unwrap_or(first.seq);
            // Where each priority of this batch got to.
            let mut sent = cursors;
            for r in &batch {
                let c = &mut sent[r.priority.min(PRIORITIES - 1) as usize];
                *c = (*c).max(r.seq);
            }
            let t_send = Instant::now();
            if std::mem::take(&mut retrying) {
                self.stats.upload_retries.fetch_add(1, Ordering::Relaxed);
            }
            let answer = self.send(&batch, settled_below).await;
            self.stats
                .relay_last_attempt_unix
                .store(chrono::Utc::now().timestamp() as u64, Ordering::Relaxed);
            match answer {
                Answer::Results(results) => {
                    let t_settle = Instant::now();
                    self.stats.upload_successes.fetch_add(1, Ordering::Relaxed);
                    if let Some(since) = failing_since.take() {
                        info!(after = ?since.elapsed(), failed_attempts = failures, "The relay is reachable again; delivering the backlog.");
                    }
                    failures = 0;
                    answered_failures = 0;
                    failing_batch = None;
                    backoff.reset();
                    self.stats.relay_reachable.store(true, Ordering::Relaxed);
                    if let Some(prev) = settling.take() {
                        let _ = prev.await;
                    }
                    settling = Some(self.settle(&batch, &results));
                    debug!(
                        events = batch.len(),
                        read_ms = (t_send - t_read).as_secs_f64() * 1e3,
                        send_ms = (t_settle - t_send).as_secs_f64() * 1e3,
                        settle_ms = t_settle.elapsed().as_secs_f64() * 1e3,
                        "Delivered a batch."
                    );
                    cursors = sent;
                    batches += 1;
                    limit = (limit * 2).min(max_events);
                }
                Answer::TooLarge(msg) if batch.len() == 1 => {
                    self.dead_letter(
                        first,
                        format!("the relay refused the event as too large: {msg}"),
                    )
                    .await;
                    cursors = sent;
                }
                Answer::TooLarge(_) => {
                    limit = (batch.len() / 2).max(1);
                    debug!(
                        limit,
                        "The relay said the request was too large; sending smaller batches."
                    );
                }
                Answer::Unreadable(msg) if batch.len() == 1 => {
                    self.dead_letter(first, format!("the relay could not read the event: {msg}"))
                        .await;
                    cursors = sent;
                }
                Answer::Unreadable(msg) => {
                    warn!(events = batch.len(), reason = %msg, "The relay could not read a batch; re-sending its events one by one to find the bad one.");
                    limit = 1;
                }
                Answer::Retry {
                    after,
                    reason,
                    kind,
                } => {
                    self.stats.relay_reachable.store(false, Ordering::Relaxed);
                    self.stats.upload_failures.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    retrying = true;
                    // A relay that answers, but fails the same events again and again:
                    // with relay.max_attempts, find the event it fails on and set it
                    // aside instead of retrying for ever.
                    if kind == Failure::Relay
                        && let Some(max) = self.config.max_attempts
                    {
                        if failing_batch != Some(first.seq) {
                            failing_batch = Some(first.seq);
                            answered_failures = 0;
                        }
                        answered_failures += 1;
                        if answered_failures >= max {
                            answered_failures = 0;
                            if batch.len() > 1 {
                                warn!(events = batch.len(), attempts = max, reason = %reason, "The relay failed the same batch too often (relay.max_attempts); sending its events one by one to find the one it fails on.");
                                limit = 1;
                            } else {
                                self.dead_letter(
                                    first,
                                    format!("the relay failed it {max} times (relay.max_attempts); the last time: {reason}"),
                                )
                                .await;
                                cursors = sent;
                                continue;
                            }
                        }
                    }
                    let operator_must_act = kind == Failure::Operator;
                    // The relay's Retry-After wins (bounded, in case it is absurd).
                    let delay = match after {
                        Some(a) => a.min(Duration::from_secs(300)),
                        None => backoff.next_delay(),
                    };
                    let first_failure = failing_since.is_none();
                    failing_since.get_or_insert_with(Instant::now);
                    if operator_must_act && (first_failure || failures.is_multiple_of(20)) {
                        error!(relay = %self.url, reason = %reason, "The relay refuses this gateway; events stay in the outbox until this is fixed.");
                    } else if first_failure || failures.is_multiple_of(20) {
                        warn!(relay = %self.url, reason = %reason, retry_in = ?delay, "Cannot deliver to the relay; events stay in the outbox and will be retried.");
                    } else {
                        debug!(relay = %self.url, reason = %reason, retry_in = ?delay, "Delivery attempt failed.");
                    }
                    if shutdown.stopped_within(delay).await {
                        break;
                    }
                }
            }
        }
        if let Some(prev) = settling.take() {
            let _ = prev.await;
        }
        debug!("The uplink stopped.");
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
            return Answer::Retry {
                after: Some(Duration::ZERO),
                reason: "a record could not be encoded".into(),
                kind: Failure::Network,
            };
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
            Err(e) => {
                return Answer::Retry {
                    after: None,
                    reason: error_chain(&e),
                    kind: Failure::Network,
                };
            }
        };
        self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        let message = || error_message(&text);
        match status.as_u16() {
            200..=299 => match serde_json::from_str::<IngestResponse>(&text) {
                Ok(r) if r.results.len() == batch.len() => Answer::Results(r.results),
                Ok(r) => Answer::Retry {
                    after: None,
                    reason: format!(
                        "the relay answered {} results for {} events",
                        r.results.len(),
                        batch.len()
                    ),
                    kind: Failure::Relay,
                },
                Err(e) => Answer::Retry {
                    after: None,
                    reason: format!("the relay's answer is not an ingest result: {e}"),
                    kind: Failure::Relay,
                },
            },
            413 => Answer::TooLarge(message()),
            400 => Answer::Unreadable(message()),
            401 | 403 => Answer::Retry {
                after: None,
                reason: format!("HTTP {status}: {} (check relay.token)", message()),
                kind: Failure::Operator,
            },
            415 => Answer::Retry {
                after: None,
                reason: format!("HTTP {status}: {}", message()),
                kind: Failure::Operator,
            },
            _ => Answer::Retry {
                after: retry_after,
                reason: format!("HTTP {status}: {}", message()),
                kind: Failure::Relay,
            },
        }
    }

    /// Records the relay's results and starts the outbox commit that deletes delivered
    /// records and dead-letters rejected ones; returns the commit's task.
    ///
    /// Not waiting for that commit before the next request is safe: if the gateway dies
    /// before it lands, the records are re-sent after the restart and the relay answers
    /// `duplicate` (they are below the settled-below mark it was given, or in its index).
    fn settle(
        &self,
        batch: &[Record],
        results: &[wire::EventResult],
    ) -> tokio::task::JoinHandle<()> {
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

/// The relay's `Retry-After` (whole seconds), if it sent one.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The sentence of an error answer (`wire::ErrorBody`), or the start of whatever it was.
fn error_message(text: &str) -> String {
    serde_json::from_str::<wire::ErrorBody>(text)
        .map(|b| b.error)
        .unwrap_or_else(|_| text.chars().take(300).collect())
}

/// The error and its causes in one line ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    if let Some(hint) = tls_hint(&s) {
        s.push_str(" (");
        s.push_str(hint);
        s.push(')');
    }
    s
}

/// What to do about a relay certificate the gateway refused, from rustls's words.
fn tls_hint(error: &str) -> Option<&'static str> {
    if !error.contains("invalid peer certificate") {
        return None;
    }
    Some(if error.contains("UnknownIssuer") {
        "the relay's certificate is not signed by a CA this gateway trusts: set relay.ca_file to the CA that signed it"
    } else if error.contains("Expired") {
        "the relay's certificate has expired: its operator must renew it"
    } else if error.contains("NotValidForName") {
        "the relay's certificate is not for the host in relay.url"
    } else {
        "the gateway does not accept the relay's certificate"
    })
}

#[cfg(test)]
mod tests {
    use super::tls_hint;

    #[test]
    fn refused_relay_certificates_say_what_to_do() {
        let e = |kind: &str| format!("client error (Connect): invalid peer certificate: {kind}");
        assert!(
            tls_hint(&e("UnknownIssuer"))
                .unwrap()
                .contains("relay.ca_file")
        );
        assert!(tls_hint(&e("Expired")).unwrap().contains("renew"));
        assert!(
            tls_hint(&e("NotValidForName"))
                .unwrap()
                .contains("relay.url")
        );
        assert!(tls_hint(&e("BadSignature")).is_some());
        assert_eq!(tls_hint("connection refused"), None);
    }
}
