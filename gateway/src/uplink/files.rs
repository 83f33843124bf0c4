//! The file lane: spooled files go to the relay's resumable upload endpoint
//! (`docs/protocol.md`, "Files"), up to `relay.max_file_uploads` at a time, each over its
//! own connection, beside the event batches — so readings never wait behind a video.
//!
//! For each file: create the upload (the relay says how many bytes it already holds),
//! stream the rest from the spool, and on the relay's `accepted` or `duplicate` let the
//! spooled file go (delete or move it) and only then delete its record. A dropped
//! connection, a relay restart or a gateway restart continue from what the relay has.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use pigeon_shared::json;
use pigeon_shared::shutdown::Shutdown;
use pigeon_shared::wire::{self, CreateUpload, EventStatus, UploadState};
use reqwest::{StatusCode, header};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use super::body::stream_file;
use super::{
    Backoff, Failure, IDLE_RECHECK, Uplink, encode, error_chain, error_message, retry_after,
};
use crate::outbox::{FileRef, Record};
use crate::spool::{Spool, verify};

/// How one attempt at a file ended.
#[derive(Debug)]
enum Attempt {
    /// The relay has it (object and event durable).
    Done {
        duplicate: bool,
        dataref: Option<String>,
    },
    /// The relay refuses it for good.
    Refused(String),
    /// Go again at once (the relay said where to continue).
    Again,
    /// Try again later.
    Retry {
        after: Option<Duration>,
        reason: String,
        kind: Failure,
    },
}

/// A failure of the connection: tried again without counting.
fn retry(reason: String) -> Attempt {
    Attempt::Retry {
        after: None,
        reason,
        kind: Failure::Network,
    }
}

/// A failure the relay answered: counted against `relay.max_attempts`.
fn relay_failed(reason: String) -> Attempt {
    Attempt::Retry {
        after: None,
        reason,
        kind: Failure::Relay,
    }
}

/// Runs the file lane until `shutdown` stops it; files in flight are abandoned where
/// they are (the relay keeps what it got; the next start continues).
pub async fn run_files(uplink: Arc<Uplink>, spool: Arc<Spool>, mut shutdown: Shutdown) {
    let slots = uplink.config.max_file_uploads.max(1);
    // The files being sent, by sequence: each worker has its file's record until the
    // relay has it (then the record is gone) or the gateway stops.
    let mut busy: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut active: JoinSet<u64> = JoinSet::new();
    while !shutdown.is_stopping() {
        if active.len() < slots {
            let reader = uplink.reader.clone();
            let want = slots + busy.len();
            // Most important first, then oldest: a snapshot of a higher priority takes the
            // next free slot ahead of older clips.
            match tokio::task::spawn_blocking(move || reader.read_files(0, want)).await {
                Ok(Ok(recs)) => {
                    for rec in recs {
                        if active.len() >= slots {
                            break;
                        }
                        if !busy.insert(rec.seq) {
                            continue;
                        }
                        let seq = rec.seq;
                        let work = deliver(uplink.clone(), spool.clone(), rec, shutdown.clone());
                        active.spawn(async move {
                            work.await;
                            seq
                        });
                    }
                }
                Ok(Err(e)) => error!(error = %e, "Cannot read the outbox for files; retrying."),
                Err(_) => {}
            }
        }
        let room = active.len() < slots;
        tokio::select! {
            () = shutdown.stopped() => {}
            done = active.join_next(), if !active.is_empty() => {
                if let Some(Ok(seq)) = done {
                    busy.remove(&seq);
                }
            }
            _ = uplink.writer.files_committed(), if room => {}
            _ = tokio::time::sleep(IDLE_RECHECK), if room => {}
        }
    }
    active.shutdown().await;
    debug!("The file lane stopped.");
}

/// Sends one file until the relay has it (or refuses it), then lets it go.
async fn deliver(up: Arc<Uplink>, spool: Arc<Spool>, rec: Record, mut shutdown: Shutdown) {
    let Some(file) = rec.file.clone() else {
        return;
    };
    up.stats.file_uploads_active.fetch_add(1, Relaxed);
    let _active = Gauge(&up.stats.file_uploads_active);
    let mut backoff = Backoff::new(up.config.backoff_initial.get(), up.config.backoff_max.get());
    let mut failures = 0u64;
    let started = Instant::now();
    let mut agains = 0;
    let mut answered_failures = 0u32;
    let outcome = loop {
        if shutdown.is_stopping() {
            return;
        }
        if up.yield_to_events(rec.priority, &mut shutdown).await {
            return;
        }
        let attempt = up.attempt(&spool, &rec, &file).await;
        up.stats
            .relay_last_attempt_unix
            .store(chrono::Utc::now().timestamp() as u64, Relaxed);
        let attempt = match attempt {
            // The relay said where to go on; a relay that says so again and again is
            // not making progress, though.
            Attempt::Again if agains < 5 => {
                agains += 1;
                continue;
            }
            Attempt::Again => retry("the relay keeps asking to start the upload over".into()),
            other => other,
        };
        agains = 0;
        match attempt {
            Attempt::Again => continue,
            Attempt::Retry {
                after,
                reason,
                kind,
            } => {
                up.stats.relay_reachable.store(false, Relaxed);
                up.stats.upload_failures.fetch_add(1, Relaxed);
                failures += 1;
                if kind == Failure::Relay {
                    answered_failures += 1;
                    if up
                        .config
                        .max_attempts
                        .is_some_and(|max| answered_failures >= max)
                    {
                        break Attempt::Refused(format!(
                            "the relay failed it {answered_failures} times (relay.max_attempts); the last time: {reason}"
                        ));
                    }
                }
                let operator_must_act = kind == Failure::Operator;
                let delay =
                    after.map_or_else(|| backoff.next_delay(), |a| a.min(Duration::from_secs(300)));
                if operator_must_act && (failures == 1 || failures.is_multiple_of(20)) {
                    error!(relay = %up.base, file = %file.spool, reason = %reason, "The relay refuses this gateway's file upload; the file stays in the spool until this is fixed.");
                } else if failures == 1 || failures.is_multiple_of(20) {
                    warn!(relay = %up.base, file = %file.spool, reason = %reason, retry_in = ?delay, "Cannot upload a file; it stays in the spool and is sent again (from where the relay left off).");
                } else {
                    debug!(file = %file.spool, reason = %reason, retry_in = ?delay, "File upload attempt failed.");
                }
                if shutdown.stopped_within(delay).await {
                    return;
                }
            }
            other => break other,
        }
    };
    match outcome {
        Attempt::Done { duplicate, dataref } => {
            up.stats.relay_reachable.store(true, Relaxed);
            info!(
                file = %file.spool,
                bytes = file.size,
                subject = rec.subject.as_deref().unwrap_or(""),
                duplicate,
                dataref = dataref.as_deref().unwrap_or(""),
                took_ms = started.elapsed().as_millis() as u64,
                "Delivered a file."
            );
            // The spooled file goes first: a record without its file is recognised as
            // delivered on the next try (the relay says duplicate), a file without its
            // record would be sent again as a recovered file.
            let mut backoff =
                Backoff::new(up.config.backoff_initial.get(), up.config.backoff_max.get());
            loop {
                let s = spool.clone();
                let f = file.clone();
                match tokio::task::spawn_blocking(move || s.dispose(&f)).await {
                    Ok(Ok(moved)) => {
                        if let Some(to) = moved {
                            debug!(file = %file.spool, to = ?to, "Moved a delivered file.");
                        }
                        break;
                    }
                    Ok(Err(e)) => {
                        let where_to = file.move_to.as_ref().map(|p| p.display().to_string());
                        error!(file = %file.spool, move_to = where_to.as_deref().unwrap_or(""), error = %e, "Cannot remove or move a delivered file out of the spool; retrying.");
                    }
                    Err(_) => {}
                }
                if shutdown.stopped_within(backoff.next_delay()).await {
                    return;
                }
            }
            up.stats.files_delivered.fetch_add(1, Relaxed);
            up.stats.events_delivered.fetch_add(1, Relaxed);
            if duplicate {
                up.stats.events_duplicate.fetch_add(1, Relaxed);
            }
            up.stats
                .last_upload_unix
                .store(chrono::Utc::now().timestamp() as u64, Relaxed);
            // Until its record is gone the file would be sent again after a restart (the
            // relay would say duplicate): keep trying, it is cheap.
            let mut backoff =
                Backoff::new(up.config.backoff_initial.get(), up.config.backoff_max.get());
            while let Err(e) = up.writer.settle(vec![rec.seq], vec![]).await {
                error!(error = %e, "Could not remove a delivered file's record from the outbox; retrying.");
                if shutdown.stopped_within(backoff.next_delay()).await {
                    return;
                }
            }
        }
        Attempt::Refused(reason) => {
            up.stats.relay_reachable.store(true, Relaxed);
            up.dead_letter(&rec, reason).await;
            up.abandon_upload(&rec).await;
        }
        Attempt::Again | Attempt::Retry { .. } => {}
    }
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// How long a file waits at most, per attempt, for more important events to go first.
const YIELD_AT_MOST: Duration = Duration::from_secs(30);
/// More important events that have waited this long mean the batch lane is behind.
const BEHIND_AFTER: Duration = Duration::from_secs(2);

impl Uplink {
    /// Waits while the batch lane is behind with events of a higher priority than
    /// `priority` (a backlog of alarms goes before video on a slow uplink), for at most
    /// [`YIELD_AT_MOST`] so that files are never held back for ever. True if the gateway
    /// is stopping.
    async fn yield_to_events(&self, priority: u8, shutdown: &mut Shutdown) -> bool {
        let start = Instant::now();
        while start.elapsed() < YIELD_AT_MOST {
            let reader = self.reader.clone();
            let before = chrono::Utc::now().timestamp_micros() - BEHIND_AFTER.as_micros() as i64;
            let behind = tokio::task::spawn_blocking(move || reader.behind_above(priority, before))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false);
            if !behind {
                return false;
            }
            if shutdown.stopped_within(Duration::from_millis(100)).await {
                return true;
            }
        }
        false
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// One try: create (or find) the upload, then send what the relay is missing.
    async fn attempt(self: &Arc<Self>, spool: &Spool, rec: &Record, file: &FileRef) -> Attempt {
        let state = match self.create_upload(rec, file).await {
            Ok(s) => s,
            Err(a) => return a,
        };
        if let Some(a) = finished(&state) {
            return a;
        }
        let Some(location) = state.location.as_deref() else {
            return retry("the relay's answer has neither a result nor a location".into());
        };
        let Ok(url) = self.base.join(location) else {
            return retry(format!(
                "the relay gave an unusable upload location {location:?}"
            ));
        };
        let path = spool.path(&file.spool);
        if !path.exists() {
            return Attempt::Refused(format!(
                "the spooled file {} is missing, and the relay does not have it",
                path.display()
            ));
        }
        if state.offset > 0 {
            self.stats.file_upload_resumes.fetch_add(1, Relaxed);
            info!(file = %file.spool, offset = state.offset, size = file.size, "Resuming a file upload where the relay left off.");
        }
        self.patch(url, path, state.offset, spool, file).await
    }

    async fn create_upload(&self, rec: &Record, file: &FileRef) -> Result<UploadState, Attempt> {
        // The event's JSON as a batch carries it (data as its text).
        let event = encode::event_json(rec, &self.producer_id)
            .and_then(|json| String::from_utf8(json).map_err(|e| e.to_string()))
            .and_then(|json| json::Text::from_string(json).map_err(|e| e.to_string()))
            .map_err(|e| Attempt::Refused(format!("cannot encode the file's event: {e}")))?;
        let extension = file
            .spool
            .split_once('.')
            .map(|(_, e)| e.to_owned())
            .filter(|e| wire::valid_extension(e));
        let body = CreateUpload {
            event,
            length: file.size,
            sha256: wire::sha256_hex(&file.sha256),
            extension,
        };
        let url = self
            .base
            .join(wire::UPLOADS_PATH)
            .map_err(|e| retry(e.to_string()))?;
        self.stats.upload_requests.fetch_add(1, Relaxed);
        let json = serde_json::to_vec(&body)
            .map_err(|e| Attempt::Refused(format!("cannot encode the upload request: {e}")))?;
        let resp = self
            .authorized(
                self.client
                    .post(url)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(json),
            )
            .send()
            .await
            .map_err(|e| retry(error_chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            self.stats.upload_successes.fetch_add(1, Relaxed);
        }
        let after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        match status.as_u16() {
            200 | 201 => serde_json::from_str::<UploadState>(&text).map_err(|e| {
                relay_failed(format!("the relay's answer is not an upload state: {e}"))
            }),
            400 | 413 => Err(Attempt::Refused(format!(
                "the relay refused the file: HTTP {status}: {}",
                error_message(&text)
            ))),
            401 | 403 | 415 => Err(Attempt::Retry {
                after: None,
                reason: format!(
                    "HTTP {status}: {} (check relay.token)",
                    error_message(&text)
                ),
                kind: Failure::Operator,
            }),
            _ => Err(Attempt::Retry {
                after,
                reason: format!("HTTP {status}: {}", error_message(&text)),
                kind: Failure::Relay,
            }),
        }
    }

    /// Streams the file from `offset`, watching that the connection keeps moving.
    async fn patch(
        self: &Arc<Self>,
        url: reqwest::Url,
        path: PathBuf,
        offset: u64,
        spool: &Spool,
        file: &FileRef,
    ) -> Attempt {
        let len = file.size.saturating_sub(offset);
        let sent = Arc::new(AtomicU64::new(0));
        let up = self.clone();
        let pace = move |n: u64| {
            let wait = up.upload_wait(n);
            async move {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let body = stream_file(path, offset, len, sent.clone(), pace);
        let req = self
            .authorized(self.client.patch(url))
            // Large files take long: no deadline for the whole request; a connection
            // that stops moving for request_timeout is given up instead (below).
            .timeout(Duration::from_secs(7 * 24 * 3600))
            .header(header::CONTENT_TYPE, wire::CONTENT_TYPE_UPLOAD_CHUNK)
            .header(header::CONTENT_LENGTH, len)
            .header(wire::HEADER_UPLOAD_OFFSET, offset)
            .body(reqwest::Body::wrap(body));
        self.stats.upload_requests.fetch_add(1, Relaxed);
        let stall = self.config.request_timeout.get();
        let send = req.send();
        tokio::pin!(send);
        let mut last = (0u64, Instant::now());
        let mut counted = 0u64;
        let resp = loop {
            tokio::select! {
                r = &mut send => break r,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    let now = sent.load(Relaxed);
                    self.stats.file_bytes_sent.fetch_add(now - counted, Relaxed);
                    self.stats.bytes_sent.fetch_add(now - counted, Relaxed);
                    counted = now;
                    if now != last.0 {
                        last = (now, Instant::now());
                    } else if last.1.elapsed() >= stall {
                        return retry(format!(
                            "the upload made no progress for {stall:?} (relay.request_timeout) at byte {}",
                            offset + now
                        ));
                    }
                }
            }
        };
        let now = sent.load(Relaxed);
        self.stats.file_bytes_sent.fetch_add(now - counted, Relaxed);
        self.stats.bytes_sent.fetch_add(now - counted, Relaxed);
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return retry(error_chain(&e)),
        };
        let status = resp.status();
        if status.is_success() {
            self.stats.upload_successes.fetch_add(1, Relaxed);
        }
        let after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        match status {
            StatusCode::OK => match serde_json::from_str::<UploadState>(&text) {
                Ok(state) => finished(&state).unwrap_or(Attempt::Again),
                Err(e) => relay_failed(format!("the relay's answer is not an upload state: {e}")),
            },
            // Partial, moved on, or forgotten: creating again says where to continue.
            StatusCode::NO_CONTENT | StatusCode::CONFLICT | StatusCode::NOT_FOUND => Attempt::Again,
            StatusCode::UNPROCESSABLE_ENTITY => {
                warn!(file = %file.spool, reason = %error_message(&text), "The relay received bytes that do not match the file's SHA-256; checking the spooled file.");
                let s = Spool::at(spool.dir());
                let f = file.clone();
                match tokio::task::spawn_blocking(move || verify(&s, &f)).await {
                    Ok(Ok(true)) => retry("the bytes were damaged on the way; sending the file again".into()),
                    Ok(Ok(false)) => Attempt::Refused(
                        "the spooled file no longer matches the SHA-256 taken when it was picked up (is the SD card failing?)".into(),
                    ),
                    Ok(Err(e)) => Attempt::Refused(format!("the spooled file cannot be read: {e}")),
                    Err(_) => retry("checking the spooled file failed".into()),
                }
            }
            s if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN => Attempt::Retry {
                after: None,
                reason: format!(
                    "HTTP {status}: {} (check relay.token)",
                    error_message(&text)
                ),
                kind: Failure::Operator,
            },
            _ => Attempt::Retry {
                after,
                reason: format!("HTTP {status}: {}", error_message(&text)),
                kind: Failure::Relay,
            },
        }
    }

    /// Tells the relay to discard what it holds of a file the gateway gave up on.
    async fn abandon_upload(&self, rec: &Record) {
        let Some(file) = &rec.file else { return };
        let Ok(state) = self.create_upload(rec, file).await else {
            return;
        };
        let Some(url) = state.location.and_then(|l| self.base.join(&l).ok()) else {
            return;
        };
        if let Err(e) = self.authorized(self.client.delete(url)).send().await {
            debug!(error = %error_chain(&e), "Could not discard an abandoned upload at the relay.");
        }
    }
}

/// The attempt's end if the relay's state has a result.
fn finished(state: &UploadState) -> Option<Attempt> {
    let r = state.result.as_ref()?;
    Some(match r.status {
        EventStatus::Accepted => Attempt::Done {
            duplicate: false,
            dataref: state.dataref.clone(),
        },
        EventStatus::Duplicate => Attempt::Done {
            duplicate: true,
            dataref: state.dataref.clone(),
        },
        EventStatus::Rejected => Attempt::Refused(
            r.reason
                .clone()
                .unwrap_or_else(|| "rejected by the relay".into()),
        ),
    })
}
