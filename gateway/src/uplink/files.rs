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

use super::answer::{Failure, FailureKind, Reply, error_chain};
use super::body::stream_file;
use super::retry::{RetryPolicy, Verdict};
use super::{Backoff, IDLE_RECHECK, Uplink, encode};
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
    Retry(Failure),
}

/// A failure of the connection: tried again without counting.
fn retry(reason: String) -> Attempt {
    Attempt::Retry(Failure::network(reason))
}

/// A failure the relay answered: counted against `relay.max_attempts`.
fn relay_failed(reason: String) -> Attempt {
    Attempt::Retry(Failure::relay(reason))
}

/// Runs the file lane until `shutdown` stops it; files in flight are abandoned where
/// they are (the relay keeps what it got; the next start continues).
pub(crate) async fn run_files(uplink: Arc<Uplink>, spool: Arc<Spool>, mut shutdown: Shutdown) {
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
    let started = Instant::now();
    let Some(outcome) = up.upload(&spool, &rec, &file, &mut shutdown).await else {
        return;
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
            up.let_go(&spool, &rec, &file, duplicate, &mut shutdown)
                .await;
        }
        Attempt::Refused(reason) => {
            up.stats.relay_reachable.store(true, Relaxed);
            up.dead_letter(&rec, reason).await;
            up.abandon_upload(&rec).await;
        }
        Attempt::Again | Attempt::Retry(_) => {}
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
    /// Attempts `file` until the relay has it ([`Attempt::Done`]) or refuses it
    /// ([`Attempt::Refused`]); `None` if the gateway stops first.
    async fn upload(
        self: &Arc<Self>,
        spool: &Spool,
        rec: &Record,
        file: &FileRef,
        shutdown: &mut Shutdown,
    ) -> Option<Attempt> {
        let mut retry_policy = RetryPolicy::new(&self.config);
        let mut agains = 0;
        loop {
            if shutdown.is_stopping() || self.yield_to_events(rec.priority, shutdown).await {
                return None;
            }
            let attempt = self.attempt(spool, rec, file).await;
            self.stats
                .relay_last_attempt_unix
                .store(chrono::Utc::now().timestamp() as u64, Relaxed);
            let failure = match attempt {
                // The relay said where to go on; a relay that says so again and again is
                // not making progress, though.
                Attempt::Again if agains < 5 => {
                    agains += 1;
                    continue;
                }
                Attempt::Again => {
                    Failure::network("the relay keeps asking to start the upload over".into())
                }
                Attempt::Retry(failure) => failure,
                done_or_refused => return Some(done_or_refused),
            };
            agains = 0;
            self.stats.relay_reachable.store(false, Relaxed);
            self.stats.upload_failures.fetch_add(1, Relaxed);
            if let Verdict::GiveUp { attempts } = retry_policy.failed(rec.seq, failure.kind) {
                return Some(Attempt::Refused(format!(
                    "the relay failed it {attempts} times (relay.max_attempts); the last time: {}",
                    failure.reason
                )));
            }
            let wait = retry_policy.wait(failure.retry_after);
            let (reason, delay) = (&failure.reason, wait.delay);
            if failure.kind == FailureKind::Operator && wait.loud {
                error!(relay = %self.base, file = %file.spool, reason = %reason, "The relay refuses this gateway's file upload; the file stays in the spool until this is fixed.");
            } else if wait.loud {
                warn!(relay = %self.base, file = %file.spool, reason = %reason, retry_in = ?delay, "Cannot upload a file; it stays in the spool and is sent again (from where the relay left off).");
            } else {
                debug!(file = %file.spool, reason = %reason, retry_in = ?delay, "File upload attempt failed.");
            }
            if shutdown.stopped_within(delay).await {
                return None;
            }
        }
    }

    /// Lets a delivered file go: out of the spool first, then its record. A record
    /// without its file is recognised as delivered on the next try (the relay says
    /// duplicate), a file without its record would be sent again as a recovered file.
    /// Each step is retried until it works or the gateway stops.
    async fn let_go(
        &self,
        spool: &Arc<Spool>,
        rec: &Record,
        file: &FileRef,
        duplicate: bool,
        shutdown: &mut Shutdown,
    ) {
        let disposed = self
            .keep_trying(shutdown, || {
                let (s, f) = (spool.clone(), file.clone());
                async move {
                    match tokio::task::spawn_blocking(move || s.dispose(&f)).await {
                        Ok(Ok(moved)) => {
                            if let Some(to) = moved {
                                debug!(file = %file.spool, to = ?to, "Moved a delivered file.");
                            }
                            true
                        }
                        Ok(Err(e)) => {
                            let where_to = file.move_to.as_ref().map(|p| p.display().to_string());
                            error!(file = %file.spool, move_to = where_to.as_deref().unwrap_or(""), error = %e, "Cannot remove or move a delivered file out of the spool; retrying.");
                            false
                        }
                        Err(_) => false,
                    }
                }
            })
            .await;
        if !disposed {
            return;
        }
        self.stats.files_delivered.fetch_add(1, Relaxed);
        self.stats.events_delivered.fetch_add(1, Relaxed);
        if duplicate {
            self.stats.events_duplicate.fetch_add(1, Relaxed);
        }
        self.stats
            .last_upload_unix
            .store(chrono::Utc::now().timestamp() as u64, Relaxed);
        // Until its record is gone the file would be sent again after a restart (the
        // relay would say duplicate): keep trying, it is cheap.
        self.keep_trying(shutdown, || async {
            match self.writer.settle(vec![rec.seq], vec![]).await {
                Ok(()) => true,
                Err(e) => {
                    error!(error = %e, "Could not remove a delivered file's record from the outbox; retrying.");
                    false
                }
            }
        })
        .await;
    }

    /// Runs `step` until it says it is done, with backoff between tries; false if the
    /// gateway stops first.
    async fn keep_trying<F: Future<Output = bool>>(
        &self,
        shutdown: &mut Shutdown,
        mut step: impl FnMut() -> F,
    ) -> bool {
        let mut backoff = Backoff::new(
            self.config.backoff_initial.get(),
            self.config.backoff_max.get(),
        );
        loop {
            if step().await {
                return true;
            }
            if shutdown.stopped_within(backoff.next_delay()).await {
                return false;
            }
        }
    }

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
        let reply = self.read_reply(resp).await;
        match reply.status.as_u16() {
            200 | 201 => serde_json::from_str::<UploadState>(&reply.text).map_err(|e| {
                relay_failed(format!("the relay's answer is not an upload state: {e}"))
            }),
            400 | 413 => Err(Attempt::Refused(format!(
                "the relay refused the file: HTTP {}: {}",
                reply.status,
                reply.message()
            ))),
            _ => Err(Attempt::Retry(reply.failure())),
        }
    }

    /// Reads an answer of the upload endpoint, counting a success.
    async fn read_reply(&self, resp: reqwest::Response) -> Reply {
        if resp.status().is_success() {
            self.stats.upload_successes.fetch_add(1, Relaxed);
        }
        Reply::read(resp).await
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
        let reply = self.read_reply(resp).await;
        match reply.status {
            StatusCode::OK => match serde_json::from_str::<UploadState>(&reply.text) {
                Ok(state) => finished(&state).unwrap_or(Attempt::Again),
                Err(e) => relay_failed(format!("the relay's answer is not an upload state: {e}")),
            },
            // Partial, moved on, or forgotten: creating again says where to continue.
            StatusCode::NO_CONTENT | StatusCode::CONFLICT | StatusCode::NOT_FOUND => Attempt::Again,
            StatusCode::UNPROCESSABLE_ENTITY => {
                warn!(file = %file.spool, reason = %reply.message(), "The relay received bytes that do not match the file's SHA-256; checking the spooled file.");
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
            _ => Attempt::Retry(reply.failure()),
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
