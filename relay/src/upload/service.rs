//! What the upload endpoint does, without HTTP: create or find an upload, append bytes
//! while hashing them, and at the end check the digest, move the file to its object key
//! and publish the event through the sink (so deduplication and group commit apply).
//!
//! Order of a completion, and what a crash at each point leaves:
//!
//! 1. all bytes are in `<id>.part` and the digest matches — a crash here leaves a full
//!    `.part`: the next create finds every byte held and finishes the job;
//! 2. the `.part` is fsynced and renamed to `objects/<key>`, the directories fsynced —
//!    a crash here leaves the object in place but no event: the next create or `PATCH`
//!    finds the object complete (length and SHA-256 re-checked from disk) and publishes;
//! 3. the event (with `dataref`) is written to the stream and fsynced, answered `accepted`
//!    (or `duplicate`) — a crash before the manifest is deleted leaves a manifest for a
//!    durable event: the next create answers `duplicate` and deletes it;
//! 4. the manifest is deleted.
//!
//! Into S3 (`objects.kind = "s3"`) the bytes are sent in parts as they arrive: each full
//! part of the manifest's `part_size` goes to the object's multipart upload and is then
//! deleted here, so the relay holds at most one part per upload. Step 2 is then: the
//! last part is sent and the multipart upload completed (or, for a file of one part,
//! the object is put in one request) — a crash before the completion leaves the last
//! part here and the next request completes it; a crash after it leaves the object in
//! the bucket, found by `HEAD` (length and `x-amz-meta-sha256`) and published.
//!
//! Disk I/O runs on the blocking pool; the `PATCH` loop keeps at most [`WRITE_BUFFER`]
//! bytes in memory, whatever the file's size.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use axum::body::BodyDataStream;
use cloudevents::AttributesReader;
use futures_util::StreamExt;
use pigeon_shared::ce::{self, GatewayId};
use pigeon_shared::shutdown::Shutdown;
use pigeon_shared::wire::{self, CreateUpload, EventResult, EventStatus, UploadState};
use tokio::sync::OwnedSemaphorePermit;

use super::error::{UploadError, blocking};
use super::key;
use super::objects::{ObjectError, ObjectStore};
use super::registry::{Lease, Registry};
use super::sha::Sha256;
use super::store::{
    Hashed, Manifest, Multipart, ShippedPart, UploadStore, now_ms, resume_hasher_from,
};
use crate::auth::Principal;
use crate::config::DEFAULT_TENANT;
use crate::ingest::{self, Rejection};
use crate::metrics::{GaugeGuard, Metrics};
use crate::sink::{Outcome, SinkEvent, SinkHandle};

/// Bytes of a `PATCH` body collected before they are written (and hashed) in one go.
pub const WRITE_BUFFER: usize = 256 * 1024;
/// A `PATCH` body that sends nothing for this long is stopped (its bytes are kept), so a
/// dead connection does not hold one of `limits.max_concurrent_uploads` for ever.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The abandoned-upload sweep runs every tenth of `uploads.abandon_after`, at most this
/// far apart.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(600);

/// The checked settings the upload endpoint needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `objects.base_url`, ending in `/`.
    pub base_url: String,
    pub max_object_bytes: u64,
    pub max_event_bytes: u64,
    pub abandon_after: Duration,
    /// Each gateway's tenant (object keys in S3 start with `tenant=<tenant>/`).
    pub tenants: HashMap<GatewayId, String>,
}

/// The answer to a create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// 201: a new upload, at offset 0.
    New(UploadState),
    /// 200: the upload exists; `offset` bytes are held.
    Existing(UploadState),
    /// 200 with a result: rejected, already durable, or finished by this request.
    Done(UploadState),
}

/// The answer to a `PATCH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Patched {
    /// 204: the body ended before the file did.
    Partial { offset: u64, length: u64 },
    /// 200: the file is stored and its event durable.
    Done(UploadState),
}

/// A `PATCH`'s answer, and the rest of its body when it was not read to the end (so the
/// HTTP layer can read it away before answering).
pub struct PatchAnswer {
    pub result: Result<Patched, UploadError>,
    pub unread: Option<BodyDataStream>,
}

/// What the headers of a `PATCH` said.
#[derive(Debug, Clone)]
pub struct PatchRequest {
    pub gateway: GatewayId,
    pub id: String,
    /// `Upload-Offset`.
    pub offset: u64,
    /// `Content-Length`, when sent.
    pub declared: Option<u64>,
}

/// What a create derives from its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub event_id: String,
    pub producer: String,
    pub sequence: u64,
    /// [`key::upload_id`] of (gateway, `producer`, `sequence`).
    pub upload: String,
    /// The object key, relative to `objects/`.
    pub key: String,
    pub dataref: String,
    /// The key the object had before keys held the upload id (only looked at).
    pub legacy_key: String,
}

/// Checks a create's event as ingest would (plus `time`), with the `dataref` it will be
/// published with, so `max_event_bytes` applies to the line actually stored.
pub fn prepare(
    gateway: &GatewayId,
    req: &CreateUpload,
    base_url: &str,
    key_prefix: &str,
    max_event_bytes: u64,
) -> Result<Prepared, Rejection> {
    let mut parsed = ingest::event_from_text(req.event.raw())?;
    let Some(time) = parsed.event.time().copied() else {
        return Err(Rejection {
            id: Some(parsed.event.id().to_owned()),
            reason: "missing attribute 'time' (required for uploads: the object key is partitioned by it)"
                .to_owned(),
        });
    };
    let principal = Principal::Gateway(gateway.clone());
    // The key holds the upload id, so the identity is needed before the dataref; the
    // size limit is checked below, on the line with its dataref.
    let identity = ingest::check_event(&parsed, &principal, u64::MAX)?;
    let upload = key::upload_id(gateway, &identity.producer, identity.sequence);
    let event = &mut parsed.event;
    let (source, ext) = (event.source().as_str(), req.extension.as_deref());
    let key = format!(
        "{key_prefix}{}",
        key::object_key(gateway, source, time, event.id(), &upload, ext)
    );
    let legacy_key = format!(
        "{key_prefix}{}",
        key::legacy_object_key(gateway, source, time, event.id(), ext)
    );
    let dataref = format!("{base_url}{key}");
    event.set_extension(ce::EXT_DATAREF, dataref.clone());
    let checked = ingest::check_event(&parsed, &principal, max_event_bytes)?;
    Ok(Prepared {
        event_id: checked.id,
        producer: checked.producer,
        sequence: checked.sequence,
        upload,
        key,
        dataref,
        legacy_key,
    })
}

/// The first 80 characters of something a client sent, for an error message.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The checks of a create that do not need the event: digest, extension, length.
/// Returns the digest in lowercase hex.
pub(crate) fn check_request(
    req: &CreateUpload,
    max_object_bytes: u64,
) -> Result<String, UploadError> {
    let digest = wire::parse_sha256_hex(&req.sha256).ok_or_else(|| {
        UploadError::BadRequest(format!(
            "sha256 must be 64 hexadecimal digits (the file's SHA-256), not {:?}",
            clip(&req.sha256)
        ))
    })?;
    if let Some(ext) = &req.extension
        && !wire::valid_extension(ext)
    {
        return Err(UploadError::BadRequest(format!(
            "extension {:?} must be 1 to 16 characters from a-z 0-9, without the dot",
            clip(ext)
        )));
    }
    if req.length > max_object_bytes {
        return Err(UploadError::TooLarge {
            message: format!(
                "the file is {} bytes, over the limit of {max_object_bytes} (limits.max_object_bytes)",
                req.length
            ),
            offset: None,
        });
    }
    Ok(wire::sha256_hex(&digest))
}

/// How an existing upload differs from a create for the same event, if it does.
fn differences(m: &Manifest, req: &CreateUpload, sha256: &str) -> Option<String> {
    let mut diffs = Vec::new();
    if m.length != req.length {
        diffs.push(format!(
            "length {} (this request says {})",
            m.length, req.length
        ));
    }
    if m.sha256 != sha256 {
        diffs.push(format!("sha256 {} (this request says {sha256})", m.sha256));
    }
    if m.extension != req.extension {
        let show =
            |e: &Option<String>| e.as_deref().map_or("none".to_owned(), |e| format!("{e:?}"));
        diffs.push(format!(
            "extension {} (this request says {})",
            show(&m.extension),
            show(&req.extension)
        ));
    }
    (!diffs.is_empty()).then(|| diffs.join(" and "))
}

/// Where to `PATCH` an upload.
pub fn location(id: &str) -> String {
    format!("{}/{id}", wire::UPLOADS_PATH)
}

fn offer(id: &str, offset: u64, length: u64) -> UploadState {
    UploadState {
        location: Some(location(id)),
        offset,
        length,
        result: None,
        dataref: None,
    }
}

pub fn not_found(gateway: &GatewayId, id: &str) -> UploadError {
    UploadError::NotFound(format!(
        "gateway {gateway} has no upload {id} (never created, abandoned, or finished)"
    ))
}

/// The `.part` being appended to, with the hash of everything written and the bytes
/// not written yet.
struct PartWriter {
    file: Option<std::fs::File>,
    /// `None` once a write failed: what reached the disk is then unknown.
    hashed: Option<Hashed>,
    buf: Vec<u8>,
}

impl PartWriter {
    fn offset(&self) -> u64 {
        self.hashed.as_ref().map_or(0, |h| h.offset) + self.buf.len() as u64
    }

    /// Appends and hashes the buffered bytes, off the reactor.
    async fn flush(&mut self, metrics: &Metrics) -> Result<(), UploadError> {
        self.flush_to(u64::MAX, metrics).await
    }

    /// As [`PartWriter::flush`], but only the buffered bytes before offset `end`; the
    /// rest stay buffered.
    async fn flush_to(&mut self, end: u64, metrics: &Metrics) -> Result<(), UploadError> {
        let written = self.hashed.as_ref().map_or(0, |h| h.offset);
        let n = (end.saturating_sub(written)).min(self.buf.len() as u64) as usize;
        if n == 0 {
            return Ok(());
        }
        let (Some(mut file), Some(mut hashed)) = (self.file.take(), self.hashed.take()) else {
            return Err(UploadError::Internal(
                "the upload's file is not open".to_owned(),
            ));
        };
        let buf = std::mem::take(&mut self.buf);
        let written = blocking("append to the upload's file", move || {
            file.write_all(&buf[..n])?;
            hashed.hasher.update(&buf[..n]);
            hashed.offset += n as u64;
            Ok((file, hashed, buf))
        })
        .await;
        let (file, hashed, mut buf) = written?;
        metrics.upload_bytes_received.fetch_add(n as u64, Relaxed);
        buf.drain(..n);
        self.file = Some(file);
        self.hashed = Some(hashed);
        self.buf = buf;
        Ok(())
    }
}

/// How receiving a body ended.
enum Received {
    /// The body is complete.
    Ended,
    Superseded,
    ShuttingDown,
    Idle,
    /// The body goes past the file's length; the rest is unread.
    TooLong(BodyDataStream),
    /// The connection broke (or the body was malformed).
    Broken(String),
    Failed(UploadError),
}

/// What an existing upload turned out to be.
enum Found {
    /// Not finished: this many bytes are held.
    Held(u64),
    /// Finished (by this request).
    Done(UploadState),
}

/// What a `PATCH` does after its checks.
enum Step {
    Done(UploadState),
    Receive { m: Box<Manifest>, hashed: Hashed },
}

/// The upload endpoint's state: the files, who works on which upload, the sink.
pub struct Uploads {
    store: Arc<UploadStore>,
    objects: Box<dyn ObjectStore>,
    registry: Registry,
    sink: SinkHandle,
    metrics: Arc<Metrics>,
    settings: Settings,
    shutdown: Shutdown,
}

impl Uploads {
    /// A stop of `shutdown` stops the `PATCH`es in progress (their bytes are kept).
    pub fn new(
        store: Arc<UploadStore>,
        objects: Box<dyn ObjectStore>,
        sink: SinkHandle,
        metrics: Arc<Metrics>,
        settings: Settings,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            store,
            objects,
            registry: Registry::new(),
            sink,
            metrics,
            settings,
            shutdown,
        }
    }

    fn slot(gateway: &GatewayId, id: &str) -> String {
        format!("{gateway}/{id}")
    }

    /// What object keys of `gateway` start with: its tenant in S3, nothing in files.
    fn key_prefix(&self, gateway: &GatewayId) -> String {
        self.objects.key_prefix(
            self.settings
                .tenants
                .get(gateway)
                .map_or(DEFAULT_TENANT, String::as_str),
        )
    }

    /// The `dataref` of a durable event's object, if it is still there: at its key, or
    /// at the key without the upload id, which an event published before keys held it
    /// (issue 24) names — so a gateway sending such a file again after the upgrade still
    /// learns where it is.
    async fn dataref_in_place(&self, p: &Prepared) -> Result<Option<String>, UploadError> {
        if self.objects.exists(&p.key).await? {
            return Ok(Some(p.dataref.clone()));
        }
        if self.objects.exists(&p.legacy_key).await? {
            return Ok(Some(format!("{}{}", self.settings.base_url, p.legacy_key)));
        }
        Ok(None)
    }

    /// Bytes held for the upload: in S3 parts and in the part file here.
    async fn held(&self, gateway: &GatewayId, id: &str, m: &Manifest) -> Result<u64, UploadError> {
        let store = self.store.clone();
        let (g, i, n) = (gateway.clone(), id.to_owned(), m.next_part());
        let here = blocking("look at the upload's bytes", move || {
            store.part_len_at(&g, &i, n)
        })
        .await?;
        Ok(m.shipped() + here)
    }

    /// `POST /v1/uploads`.
    pub async fn create(
        &self,
        gateway: &GatewayId,
        req: CreateUpload,
    ) -> Result<Created, UploadError> {
        let started = Instant::now();
        let sha256 = check_request(&req, self.settings.max_object_bytes)?;
        let p = match prepare(
            gateway,
            &req,
            &self.settings.base_url,
            &self.key_prefix(gateway),
            self.settings.max_event_bytes,
        ) {
            Ok(p) => p,
            Err(r) => {
                tracing::debug!(gateway = %gateway, id = ?r.id, reason = %r.reason, "Rejected an upload's event.");
                return Ok(Created::Done(UploadState {
                    location: None,
                    offset: 0,
                    length: req.length,
                    result: Some(EventResult {
                        id: r.id,
                        status: EventStatus::Rejected,
                        reason: Some(r.reason),
                    }),
                    dataref: None,
                }));
            }
        };
        let id = p.upload.clone();
        let mut lease = self.registry.take_over(&Self::slot(gateway, &id)).await;

        let durable = self
            .sink
            .contains(gateway, &p.producer, p.sequence)
            .await
            .map_err(|e| UploadError::Unavailable(e.to_string()))?;
        if durable {
            // Left over if the relay stopped between publishing and deleting them.
            self.abandon(gateway, &id).await;
            lease.held().forget();
            let dataref = self.dataref_in_place(&p).await?;
            self.metrics.uploads_duplicate.fetch_add(1, Relaxed);
            tracing::debug!(gateway = %gateway, upload = %id, "An upload's event is durable already; nothing to send.");
            return Ok(Created::Done(UploadState {
                location: None,
                offset: req.length,
                length: req.length,
                result: Some(EventResult {
                    id: Some(p.event_id),
                    status: EventStatus::Duplicate,
                    reason: None,
                }),
                dataref,
            }));
        }

        match self.load(gateway, &id).await? {
            None => {
                let m = Manifest {
                    version: Manifest::VERSION,
                    gateway: gateway.clone(),
                    producer: p.producer,
                    sequence: p.sequence,
                    length: req.length,
                    sha256,
                    extension: req.extension,
                    key: p.key,
                    created_at_ms: now_ms(),
                    event: req.event,
                    part_size: self.objects.part_size(),
                    multipart: None,
                };
                let store = self.store.clone();
                let mid = id.clone();
                blocking("store the upload's manifest", move || store.save(&mid, &m)).await?;
                self.metrics.uploads_created.fetch_add(1, Relaxed);
                tracing::debug!(gateway = %gateway, upload = %id, length = req.length, "Created an upload.");
                Ok(Created::New(offer(&id, 0, req.length)))
            }
            Some(m) => {
                if let Some(diff) = differences(&m, &req, &sha256) {
                    return Err(UploadError::BadRequest(format!(
                        "upload {id} of this event (producerid {:?}, sequence {}) exists with {diff}; a file cannot change under the same event",
                        m.producer, m.sequence
                    )));
                }
                self.touch(gateway, &id).await;
                match self
                    .inspect(&mut lease, gateway, &id, &m, true, started)
                    .await?
                {
                    Found::Held(offset) => Ok(Created::Existing(offer(&id, offset, m.length))),
                    Found::Done(state) => Ok(Created::Done(state)),
                }
            }
        }
    }

    /// `HEAD /v1/uploads/<id>`: (bytes held, length).
    pub async fn head(&self, gateway: &GatewayId, id: &str) -> Result<(u64, u64), UploadError> {
        let Some(m) = self.load(gateway, id).await? else {
            return Err(not_found(gateway, id));
        };
        let held = self.held(gateway, id, &m).await?;
        Ok((held.min(m.length), m.length))
    }

    /// `DELETE /v1/uploads/<id>`: stops a `PATCH` in progress and deletes everything.
    pub async fn delete(&self, gateway: &GatewayId, id: &str) -> Result<(), UploadError> {
        let mut lease = self.registry.take_over(&Self::slot(gateway, id)).await;
        if let Ok(Some(m)) = self.load(gateway, id).await {
            self.abort_multipart(gateway, id, &m).await;
        }
        let store = self.store.clone();
        let (g, i) = (gateway.clone(), id.to_owned());
        let existed = blocking("delete the upload", move || store.remove(&g, &i)).await?;
        lease.held().forget();
        if !existed {
            return Err(not_found(gateway, id));
        }
        tracing::info!(gateway = %gateway, upload = %id, "Deleted an upload at its gateway's request.");
        Ok(())
    }

    /// `PATCH /v1/uploads/<id>`. Meant to run in a task of its own (see
    /// `routes::patch`), so that it finishes its writes even when the client goes away;
    /// `permit` is held until it ends.
    pub async fn patch(
        self: Arc<Self>,
        req: PatchRequest,
        body: BodyDataStream,
        permit: OwnedSemaphorePermit,
    ) -> PatchAnswer {
        let _permit = permit;
        let _in_progress = GaugeGuard::new(&self.metrics.uploads_in_progress);
        let started = Instant::now();
        let PatchRequest {
            gateway,
            id,
            offset,
            declared,
        } = req;
        let mut lease = self.registry.take_over(&Self::slot(&gateway, &id)).await;
        let (mut m, hashed) = match self
            .before_receiving(&mut lease, &gateway, &id, offset, declared, started)
            .await
        {
            Ok(Step::Receive { m, hashed }) => (m, hashed),
            Ok(Step::Done(state)) => {
                return PatchAnswer {
                    result: Ok(Patched::Done(state)),
                    unread: Some(body),
                };
            }
            Err(e) => {
                return PatchAnswer {
                    result: Err(e),
                    unread: Some(body),
                };
            }
        };

        let (end, hashed) = self
            .receive(&mut lease, &gateway, &id, &mut m, hashed, body)
            .await;
        let now_held = hashed.as_ref().map(|h| h.offset);
        tracing::debug!(
            gateway = %gateway,
            upload = %id,
            from = offset,
            to = ?now_held,
            length = m.length,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Received a PATCH of upload bytes."
        );
        let mut unread = None;
        let result = match (end, hashed) {
            (Received::Ended, Some(h)) if h.offset == m.length => self
                .complete(&mut lease, &gateway, &id, &m, h, started)
                .await
                .map(Patched::Done),
            (end, hashed) => {
                let held = hashed.as_ref().map_or(offset, |h| h.offset);
                lease.held().hashed = hashed;
                match end {
                    Received::Ended => Ok(Patched::Partial {
                        offset: held,
                        length: m.length,
                    }),
                    Received::Superseded => Err(UploadError::Conflict {
                        message: format!(
                            "a newer request for upload {id} took over; the relay holds {held} bytes"
                        ),
                        offset: held,
                    }),
                    Received::ShuttingDown => Err(UploadError::Unavailable(format!(
                        "the relay is shutting down; it keeps the {held} bytes of upload {id} it has"
                    ))),
                    Received::Idle => Err(UploadError::Idle {
                        message: format!(
                            "no bytes arrived for {} s; the relay keeps the {held} bytes of upload {id} it has",
                            BODY_IDLE_TIMEOUT.as_secs()
                        ),
                        offset: held,
                    }),
                    Received::TooLong(rest) => {
                        unread = Some(rest);
                        Err(UploadError::TooLarge {
                            message: format!(
                                "the body goes past the upload's length of {} bytes; the relay keeps the {held} bytes before that",
                                m.length
                            ),
                            offset: Some(held),
                        })
                    }
                    Received::Broken(e) => Err(UploadError::BadRequest(format!(
                        "the body broke off ({e}); the relay keeps the {held} bytes of upload {id} it has"
                    ))),
                    Received::Failed(e) => Err(e),
                }
            }
        };
        PatchAnswer { result, unread }
    }

    /// A `PATCH`'s checks before its body is read: the upload exists, is not finished
    /// already, the offset is right and the declared length fits.
    async fn before_receiving(
        &self,
        lease: &mut Lease,
        gateway: &GatewayId,
        id: &str,
        offset: u64,
        declared: Option<u64>,
        started: Instant,
    ) -> Result<Step, UploadError> {
        let Some(m) = self.load(gateway, id).await? else {
            lease.held().forget();
            return Err(not_found(gateway, id));
        };
        self.touch(gateway, id).await;
        let held = match self.inspect(lease, gateway, id, &m, false, started).await? {
            Found::Done(state) => return Ok(Step::Done(state)),
            Found::Held(n) => n,
        };
        if lease.superseded() {
            return Err(UploadError::Conflict {
                message: format!(
                    "a newer request for upload {id} took over; the relay holds {held} bytes"
                ),
                offset: held,
            });
        }
        if offset != held {
            return Err(UploadError::Conflict {
                message: format!(
                    "Upload-Offset is {offset}, but the relay holds {held} bytes of upload {id}: send the bytes from {held} on"
                ),
                offset: held,
            });
        }
        let room = m.length - held;
        if let Some(n) = declared
            && n > room
        {
            return Err(UploadError::TooLarge {
                message: format!(
                    "the body has {n} bytes, but upload {id} is {} bytes long and the relay holds {held}: only {room} more fit",
                    m.length
                ),
                offset: Some(held),
            });
        }
        let hashed = self.hasher_at(lease, gateway, id, &m, held).await?;
        if held > 0 {
            self.metrics.uploads_resumed.fetch_add(1, Relaxed);
        }
        Ok(Step::Receive {
            m: Box::new(m),
            hashed,
        })
    }

    /// Appends the body to the part file until it ends, passes the file's length, stops
    /// arriving, or a newer request or the shutdown interrupts; into S3, each part is
    /// sent as soon as it is full. Returns how it ended and the hash of what is held
    /// (`None` if a write failed).
    async fn receive(
        &self,
        lease: &mut Lease,
        gateway: &GatewayId,
        id: &str,
        m: &mut Manifest,
        hashed: Hashed,
        mut body: BodyDataStream,
    ) -> (Received, Option<Hashed>) {
        let store = self.store.clone();
        let (g, i, n) = (gateway.clone(), id.to_owned(), m.next_part());
        let file = match blocking("open the upload's file", move || {
            store.open_part_at(&g, &i, n)
        })
        .await
        {
            Ok(f) => f,
            Err(e) => return (Received::Failed(e), Some(hashed)),
        };
        let mut w = PartWriter {
            file: Some(file),
            hashed: Some(hashed),
            buf: Vec::with_capacity(WRITE_BUFFER),
        };
        // A full part left by an earlier request (S3 failed then) goes first.
        if let Err(e) = self.ship_full_parts(gateway, id, m, &mut w).await {
            return (Received::Failed(e), w.hashed);
        }
        let mut shutdown = self.shutdown.clone();
        let end = loop {
            let next = tokio::select! {
                biased;
                () = lease.superseded_wait() => break Received::Superseded,
                () = shutdown.stopped() => break Received::ShuttingDown,
                next = tokio::time::timeout(BODY_IDLE_TIMEOUT, body.next()) => next,
            };
            let chunk = match next {
                Err(_) => break Received::Idle,
                Ok(None) => break Received::Ended,
                Ok(Some(Err(e))) => break Received::Broken(e.to_string()),
                Ok(Some(Ok(chunk))) => chunk,
            };
            if w.offset() + chunk.len() as u64 > m.length {
                break Received::TooLong(body);
            }
            w.buf.extend_from_slice(&chunk);
            if let Err(e) = self.ship_full_parts(gateway, id, m, &mut w).await {
                break Received::Failed(e);
            }
            if w.buf.len() >= WRITE_BUFFER
                && let Err(e) = w.flush(&self.metrics).await
            {
                break Received::Failed(e);
            }
        };
        // Keep whatever arrived, however the body ended — but never past the end of the
        // part being filled (if sending it failed, the bytes after it are not held).
        let end = match (end, w.flush_to(self.part_end(m), &self.metrics).await) {
            (Received::Failed(e), _) | (_, Err(e)) => Received::Failed(e),
            (end, Ok(())) => end,
        };
        (end, w.hashed)
    }

    /// Where the part being filled ends: the next part boundary into S3, else nowhere.
    fn part_end(&self, m: &Manifest) -> u64 {
        m.part_size.map_or(u64::MAX, |size| m.shipped() + size)
    }

    /// Into S3: sends every full part the writer holds that is not the file's last
    /// (that one goes with the completion).
    async fn ship_full_parts(
        &self,
        gateway: &GatewayId,
        id: &str,
        m: &mut Manifest,
        w: &mut PartWriter,
    ) -> Result<(), UploadError> {
        loop {
            let end = self.part_end(m);
            if end >= m.length || w.offset() < end {
                return Ok(());
            }
            w.flush_to(end, &self.metrics).await?;
            self.ship(gateway, id, m, w).await?;
        }
    }

    /// Sends the full part file `m.next_part()` to the multipart upload (started first if
    /// need be), records it with the hash state at its end, deletes it and opens the next.
    async fn ship(
        &self,
        gateway: &GatewayId,
        id: &str,
        m: &mut Manifest,
        w: &mut PartWriter,
    ) -> Result<(), UploadError> {
        let (Some(size), Some(midstate)) = (
            m.part_size,
            w.hashed.as_ref().and_then(|h| h.hasher.midstate()),
        ) else {
            return Err(UploadError::Internal(format!(
                "upload {id}: the hash is not at a part boundary"
            )));
        };
        if m.multipart.is_none() {
            let upload_id = self.objects.begin_parts(m).await?;
            m.multipart = Some(Multipart {
                upload_id,
                parts: Vec::new(),
                midstate: Sha256::new()
                    .midstate()
                    .ok_or_else(|| UploadError::Internal("no empty hash state".into()))?,
            });
            // Recorded before any part is sent, so the upload can always be aborted.
            self.save_manifest(id, m).await?;
        }
        let n = m.next_part();
        let path = self.store.part_path_at(gateway, id, n);
        let Some(parts_id) = m.multipart.as_ref().map(|mp| mp.upload_id.clone()) else {
            return Err(UploadError::Internal("no multipart upload".into()));
        };
        let etag = match self.objects.send_part(m, &parts_id, n, &path, size).await {
            Ok(etag) => etag,
            Err(ObjectError::PartsGone(e)) => {
                w.hashed = None;
                w.buf.clear();
                return Err(self.parts_gone(gateway, id, m, &e).await);
            }
            Err(ObjectError::Failed(e)) => return Err(e),
        };
        let Some(mp) = m.multipart.as_mut() else {
            return Err(UploadError::Internal("no multipart upload".into()));
        };
        mp.parts.push(ShippedPart { number: n, etag });
        mp.midstate = midstate;
        self.save_manifest(id, m).await?;
        self.metrics.object_parts_sent.fetch_add(1, Relaxed);
        let store = self.store.clone();
        let (g, i) = (gateway.clone(), id.to_owned());
        let next = blocking("start the upload's next part", move || {
            let file = store.open_part_at(&g, &i, n + 1)?;
            // Best effort: a part file left behind is removed by its number later.
            let _ = store.remove_parts_before(&g, &i, n + 1);
            Ok(file)
        })
        .await?;
        w.file = Some(next);
        tracing::debug!(gateway = %gateway, upload = %id, part = n, bytes = size, "Sent a part of an upload to S3.");
        Ok(())
    }

    /// The multipart upload is gone from S3 (a lifecycle rule, or someone aborted it):
    /// the upload starts again from 0. The answer to give the gateway.
    async fn parts_gone(
        &self,
        gateway: &GatewayId,
        id: &str,
        m: &mut Manifest,
        error: &str,
    ) -> UploadError {
        tracing::warn!(gateway = %gateway, upload = %id, key = ?m.key, error, "An upload's parts are gone from S3; it starts again from offset 0.");
        if let Err(e) = self.reset(gateway, id, m).await {
            return e;
        }
        UploadError::Conflict {
            message: format!(
                "the parts of upload {id} stored in S3 are gone (aborted or expired there); send the file again from offset 0"
            ),
            offset: 0,
        }
    }

    /// Back to offset 0: the multipart upload aborted, the bytes here deleted, the
    /// manifest without parts.
    async fn reset(
        &self,
        gateway: &GatewayId,
        id: &str,
        m: &mut Manifest,
    ) -> Result<(), UploadError> {
        self.abort_multipart(gateway, id, m).await;
        self.remove_part(gateway, id).await?;
        if m.multipart.take().is_some() {
            self.save_manifest(id, m).await?;
        }
        Ok(())
    }

    async fn save_manifest(&self, id: &str, m: &Manifest) -> Result<(), UploadError> {
        let store = self.store.clone();
        let (i, m) = (id.to_owned(), m.clone());
        blocking("store the upload's manifest", move || store.update(&i, &m)).await
    }

    /// Aborts the upload's multipart upload in S3, if it has one; a failure is logged
    /// (the orphan sweep, or the bucket's lifecycle rule, gets it later).
    async fn abort_multipart(&self, gateway: &GatewayId, id: &str, m: &Manifest) {
        self.objects.abort(gateway, id, m).await;
    }

    /// Looks at an existing upload's bytes: a `.part` longer than the file is discarded;
    /// an object already complete at the key is published; with `finish_held`, a `.part`
    /// that holds every byte is finished (a digest mismatch then starts it again at 0).
    async fn inspect(
        &self,
        lease: &mut Lease,
        gateway: &GatewayId,
        id: &str,
        m: &Manifest,
        finish_held: bool,
        started: Instant,
    ) -> Result<Found, UploadError> {
        if m.multipart.is_some() {
            // Files of parts already in S3, left by a crash just after sending them.
            let store = self.store.clone();
            let (g, i, n) = (gateway.clone(), id.to_owned(), m.next_part());
            blocking("delete the upload's sent parts", move || {
                store.remove_parts_before(&g, &i, n)
            })
            .await?;
        }
        let mut held = self.held(gateway, id, m).await?;
        if held > m.length {
            tracing::warn!(gateway = %gateway, upload = %id, held, length = m.length, "An upload held more bytes than its length; they were discarded.");
            let store = self.store.clone();
            let (g, i, n) = (gateway.clone(), id.to_owned(), m.next_part());
            blocking("delete the upload's bytes", move || {
                std::fs::remove_file(store.part_path_at(&g, &i, n))
            })
            .await?;
            lease.held().hashed = None;
            held = m.shipped();
        }
        if held < m.length {
            return match self
                .publish_finished_object(lease, gateway, id, m, started)
                .await?
            {
                Some(state) => Ok(Found::Done(state)),
                None => Ok(Found::Held(held)),
            };
        }
        if !finish_held {
            return Ok(Found::Held(held));
        }
        let hashed = self.hasher_at(lease, gateway, id, m, held).await?;
        match self.complete(lease, gateway, id, m, hashed, started).await {
            Ok(state) => {
                self.metrics.uploads_resumed.fetch_add(1, Relaxed);
                Ok(Found::Done(state))
            }
            Err(UploadError::DigestMismatch { .. }) => Ok(Found::Held(0)),
            Err(UploadError::Conflict { offset: 0, .. }) => Ok(Found::Held(0)),
            Err(e) => Err(e),
        }
    }

    /// The crash window between renaming the object into place and writing its event:
    /// the `.part` is gone (or short), but the object is at its key. If it has the
    /// upload's length and SHA-256 (read back from disk), its event is published now.
    async fn publish_finished_object(
        &self,
        lease: &mut Lease,
        gateway: &GatewayId,
        id: &str,
        m: &Manifest,
        started: Instant,
    ) -> Result<Option<UploadState>, UploadError> {
        let Some(actual) = self.objects.stored_digest(m).await? else {
            return Ok(None);
        };
        if actual != m.sha256 {
            tracing::warn!(gateway = %gateway, upload = %id, key = ?m.key, expected = %m.sha256, actual = %actual, "Another file is at the upload's object key; the upload goes on and will replace it.");
            return Ok(None);
        }
        tracing::info!(gateway = %gateway, upload = %id, key = ?m.key, "Found an upload's object complete but its event unpublished (the relay stopped, or the sink failed, in between); publishing it now.");
        self.metrics.uploads_resumed.fetch_add(1, Relaxed);
        self.publish(lease, gateway, id, m, started).await.map(Some)
    }

    /// The hash of the first `len` bytes held: cached, or resumed from the state after
    /// the parts in S3 and the bytes here re-read from disk.
    async fn hasher_at(
        &self,
        lease: &mut Lease,
        gateway: &GatewayId,
        id: &str,
        m: &Manifest,
        len: u64,
    ) -> Result<Hashed, UploadError> {
        let cached = lease.held().hashed.take();
        let base = Hashed::after_shipped(m).ok_or_else(|| {
            UploadError::Internal(format!("upload {id}: its hash state is damaged"))
        })?;
        let part = self.store.part_path_at(gateway, id, m.next_part());
        if len == base.offset || cached.as_ref().is_some_and(|h| h.offset == len) {
            // No I/O on this path.
            return resume_hasher_from(cached, base, &part, len)
                .map(|(h, _)| h)
                .map_err(|e| UploadError::Internal(e.to_string()));
        }
        let (hashed, _) = blocking("re-read the upload's bytes", move || {
            resume_hasher_from(None, base, &part, len)
        })
        .await?;
        if len > 0 {
            tracing::debug!(gateway = %gateway, upload = %id, bytes = len, "Re-hashed the bytes held for an upload from disk.");
        }
        Ok(hashed)
    }

    /// All bytes are held: check the digest, move the file to its key, publish.
    async fn complete(
        &self,
        lease: &mut Lease,
        gateway: &GatewayId,
        id: &str,
        m: &Manifest,
        hashed: Hashed,
        started: Instant,
    ) -> Result<UploadState, UploadError> {
        let actual = hashed.hex();
        if actual != m.sha256 {
            lease.held().hashed = None;
            self.reset(gateway, id, &mut m.clone()).await?;
            self.metrics.upload_digest_mismatches.fetch_add(1, Relaxed);
            tracing::warn!(
                gateway = %gateway,
                upload = %id,
                bytes = m.length,
                expected = %m.sha256,
                actual = %actual,
                "An uploaded file's SHA-256 is not the one announced; its bytes were discarded and the gateway has to send it again."
            );
            return Err(UploadError::DigestMismatch {
                expected: m.sha256.clone(),
                actual,
            });
        }
        let stored = match self.objects.commit(gateway, id, m).await {
            Ok(()) => Ok(()),
            Err(ObjectError::Failed(e)) => Err(e),
            Err(ObjectError::PartsGone(e)) => {
                Err(self.parts_gone(gateway, id, &mut m.clone(), &e).await)
            }
        };
        if let Err(e) = stored {
            if !matches!(e, UploadError::Conflict { offset: 0, .. }) {
                lease.held().hashed = Some(hashed);
            }
            return Err(e);
        }
        self.metrics
            .object_bytes_written
            .fetch_add(m.length, Relaxed);
        self.publish(lease, gateway, id, m, started).await
    }

    /// The object is in place: write the event with its `dataref` to the stream, then
    /// forget the upload.
    async fn publish(
        &self,
        lease: &mut Lease,
        gateway: &GatewayId,
        id: &str,
        m: &Manifest,
        started: Instant,
    ) -> Result<UploadState, UploadError> {
        let dataref = format!("{}{}", self.settings.base_url, m.key);
        let mut parsed = ingest::event_from_text(m.event.raw()).map_err(|r| {
            UploadError::Internal(format!(
                "the manifest of upload {id} holds an unusable event: {}",
                r.reason
            ))
        })?;
        parsed.event.set_extension(ce::EXT_DATAREF, dataref.clone());
        let line = parsed
            .line()
            .map_err(|e| UploadError::Internal(format!("the event cannot be serialized: {e}")))?;
        let outcomes = self
            .sink
            .write(
                vec![SinkEvent {
                    gateway: gateway.clone(),
                    producer: m.producer.clone(),
                    sequence: m.sequence,
                    line,
                }],
                None,
            )
            .await
            .map_err(|e| UploadError::Unavailable(e.to_string()))?;
        let status = match outcomes.into_iter().next() {
            Some(Outcome::Duplicate) => EventStatus::Duplicate,
            Some(Outcome::Rejected(reason)) => {
                // Never storable as it is (a Kafka topic whose max.message.bytes is below
                // the event, say): answered as a rejected result, as a create's checks
                // are, so the gateway dead-letters the file instead of sending it again
                // and again. No bytes are kept.
                tracing::warn!(gateway = %gateway, upload = %id, reason = %reason, "The stream refused an uploaded file's event; the file is not kept.");
                self.remove_object(&m.key).await;
                self.discard(gateway, id).await;
                lease.held().forget();
                return Ok(UploadState {
                    location: None,
                    offset: m.length,
                    length: m.length,
                    result: Some(EventResult {
                        id: Some(parsed.event.id().to_owned()),
                        status: EventStatus::Rejected,
                        reason: Some(format!(
                            "the file arrived, but the stream refused its event: {reason}"
                        )),
                    }),
                    dataref: None,
                });
            }
            _ => EventStatus::Accepted,
        };
        self.discard(gateway, id).await;
        lease.held().forget();
        let (counter, result) = match status {
            EventStatus::Duplicate => (&self.metrics.uploads_duplicate, "duplicate"),
            _ => (&self.metrics.uploads_accepted, "accepted"),
        };
        counter.fetch_add(1, Relaxed);
        tracing::info!(
            gateway = %gateway,
            upload = %id,
            key = ?m.key,
            bytes = m.length,
            result,
            duration_ms = started.elapsed().as_millis() as u64,
            age_s = now_ms().saturating_sub(m.created_at_ms) / 1000,
            "Stored an uploaded file and published its event."
        );
        Ok(UploadState {
            location: None,
            offset: m.length,
            length: m.length,
            result: Some(EventResult {
                id: Some(parsed.event.id().to_owned()),
                status,
                reason: None,
            }),
            dataref: Some(dataref),
        })
    }

    /// Removes the object of an event the stream refused for good: no event names it (its
    /// key holds the upload id, so no other upload's event can). Best effort: a failure is
    /// logged, and leaves an object no event refers to.
    async fn remove_object(&self, key: &str) {
        let removed = self.objects.remove(key).await;
        if let Err(e) = removed {
            tracing::warn!(key = ?key, error = %e, "Could not remove the object of a refused event; no event refers to it.");
        }
    }

    /// The manifest; an unreadable one is discarded with the upload's bytes (it could
    /// only come from damage to the data dir), as if there were none.
    async fn load(&self, gateway: &GatewayId, id: &str) -> Result<Option<Manifest>, UploadError> {
        let store = self.store.clone();
        let (g, i) = (gateway.clone(), id.to_owned());
        match tokio::task::spawn_blocking(move || store.load(&g, &i)).await {
            Ok(Ok(Some(m))) if m.part_size.is_some() != self.objects.part_size().is_some() => {
                tracing::warn!(gateway = %gateway, upload = %id, "An upload was started with another objects.kind; it was discarded and starts again.");
                self.abort_multipart(gateway, id, &m).await;
                self.discard(gateway, id).await;
                Ok(None)
            }
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!(gateway = %gateway, upload = %id, error = %e, "An upload's manifest is unreadable; the upload was discarded and starts again.");
                self.discard(gateway, id).await;
                Ok(None)
            }
            Ok(Err(e)) => {
                tracing::error!(gateway = %gateway, upload = %id, error = %e, "Could not read an upload's manifest.");
                Err(UploadError::Unavailable(format!(
                    "the relay cannot read upload {id}: {e}"
                )))
            }
            Err(e) => Err(UploadError::Internal(format!(
                "reading upload {id} failed: {e}"
            ))),
        }
    }

    async fn remove_part(&self, gateway: &GatewayId, id: &str) -> Result<(), UploadError> {
        let store = self.store.clone();
        let (g, i) = (gateway.clone(), id.to_owned());
        blocking("delete the upload's bytes", move || {
            store.remove_part(&g, &i)
        })
        .await
    }

    /// Marks the upload touched; a failure only makes it look older to the sweep.
    async fn touch(&self, gateway: &GatewayId, id: &str) {
        let store = self.store.clone();
        let (g, i) = (gateway.clone(), id.to_owned());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.touch(&g, &i)).await {
            tracing::warn!(gateway = %gateway, upload = %id, error = %e, "Could not mark an upload as touched.");
        }
    }

    /// Deletes an unfinished upload, best effort: its multipart upload in S3 (if any) is
    /// aborted and its files here deleted.
    async fn abandon(&self, gateway: &GatewayId, id: &str) {
        let store = self.store.clone();
        let (g, i) = (gateway.clone(), id.to_owned());
        if let Ok(Ok(Some(m))) = tokio::task::spawn_blocking(move || store.load(&g, &i)).await {
            self.abort_multipart(gateway, id, &m).await;
        }
        self.discard(gateway, id).await;
    }

    /// Deletes a finished upload's files, best effort: what is left is cleaned up by the
    /// next create of the same event (answered `duplicate`) or the abandoned-upload sweep.
    async fn discard(&self, gateway: &GatewayId, id: &str) {
        let store = self.store.clone();
        let (g, i) = (gateway.clone(), id.to_owned());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.remove(&g, &i)).await {
            tracing::warn!(gateway = %gateway, upload = %id, error = %e, "Could not delete a finished upload's files; they are deleted later.");
        }
    }

    /// Deletes every upload not touched for `uploads.abandon_after` before `now` and not
    /// being worked on. Blocking; returns how many it deleted.
    pub fn sweep(&self, now: SystemTime) -> usize {
        self.sweep_files(now).len()
    }

    /// [`Uploads::sweep`], returning the manifests of the uploads it deleted (those with
    /// S3 parts are aborted by the caller).
    fn sweep_files(&self, now: SystemTime) -> Vec<Manifest> {
        let limit = self.settings.abandon_after;
        let idle = |t: SystemTime| now.duration_since(t).unwrap_or_default();
        let stored = match self.store.scan() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Could not look for abandoned uploads; trying again later.");
                return Vec::new();
            }
        };
        let mut deleted = Vec::new();
        for u in stored.into_iter().filter(|u| idle(u.touched) >= limit) {
            // Held by a request: in use, so not abandoned.
            let Some(mut lease) = self.registry.try_lease(&Self::slot(&u.gateway, &u.id)) else {
                continue;
            };
            match self.store.touched(&u.gateway, &u.id) {
                Ok(Some(t)) if idle(t) >= limit => {}
                _ => continue,
            }
            let manifest = self.store.load(&u.gateway, &u.id).ok().flatten();
            match self.store.remove(&u.gateway, &u.id) {
                Ok(_) => {
                    lease.held().forget();
                    deleted.extend(manifest);
                    self.metrics.uploads_abandoned.fetch_add(1, Relaxed);
                    tracing::info!(
                        gateway = %u.gateway,
                        upload = %u.id,
                        bytes = u.part_len,
                        idle_s = idle(u.touched).as_secs(),
                        "Deleted an abandoned upload: nobody touched it for uploads.abandon_after."
                    );
                }
                Err(e) => {
                    tracing::warn!(gateway = %u.gateway, upload = %u.id, error = %e, "Could not delete an abandoned upload; trying again later.");
                }
            }
        }
        deleted
    }

    /// Into S3: aborts multipart uploads under `objects/` that no upload here knows and
    /// that were started more than `uploads.abandon_after` ago (see
    /// [`ObjectStore::sweep_orphans`]). Returns how many.
    pub async fn sweep_orphans(&self, now: SystemTime) -> usize {
        self.objects
            .sweep_orphans(now, self.settings.abandon_after)
            .await
    }

    /// Runs [`Uploads::sweep`] at start and then every tenth of `abandon_after` (at most
    /// every 10 minutes), until aborted.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let every = (self.settings.abandon_after / 10).min(MAX_SWEEP_INTERVAL);
        let this = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let t = this.clone();
                match tokio::task::spawn_blocking(move || t.sweep_files(SystemTime::now())).await {
                    Ok(deleted) => {
                        for m in deleted {
                            this.abort_multipart(&m.gateway, "(abandoned)", &m).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "The abandoned-upload sweep failed."),
                }
                this.sweep_orphans(SystemTime::now()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::config::SinkSettings;
    use axum::body::Body;
    use pigeon_shared::json::Text;
    use pigeon_shared::shutdown::Trigger;
    use serde_json::json;
    use sha2::Digest as _;
    use tokio::sync::Semaphore;

    fn pi1() -> GatewayId {
        GatewayId::new("pi-1").unwrap()
    }

    fn file_event(seq: u64) -> serde_json::Value {
        json!({
            "specversion": "1.0",
            "id": format!("img-{seq}"),
            "type": "io.pigeon.camera.image",
            "source": "/gateways/pi-1/files/cameras",
            "subject": "cam-3",
            "time": "2026-12-01T21:04:05.123Z",
            "datacontenttype": "application/json",
            "data": {"filename": "snap.jpg"},
            "sequence": ce::format_sequence(seq),
            "producerid": "p-1",
        })
    }

    fn create_req(seq: u64, bytes: &[u8]) -> CreateUpload {
        CreateUpload {
            event: Text::from_value(&file_event(seq)),
            length: bytes.len() as u64,
            sha256: wire::sha256_hex(&sha2::Sha256::digest(bytes).into()),
            extension: Some("jpg".into()),
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        uploads: Arc<Uploads>,
        sink: SinkHandle,
        writer: Option<std::thread::JoinHandle<()>>,
        _stop: Trigger,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let metrics = Arc::new(Metrics::new());
            let (sink, writer) = crate::sink::start(
                dir.path(),
                SinkSettings {
                    checkpoint_interval: Duration::from_secs(60),
                    queue_depth: 16,
                    retry_after: Duration::from_secs(1),
                },
                crate::sink::stream::config::StreamSettings::Files,
                Default::default(),
                metrics.clone(),
            )
            .unwrap();
            let store = Arc::new(UploadStore::open(dir.path()).unwrap());
            let (stop, shutdown) = Trigger::new();
            let uploads = Arc::new(Uploads::new(
                store.clone(),
                Box::new(super::super::objects::DirObjects::new(store)),
                sink.clone(),
                metrics,
                Settings {
                    base_url: "s3://bucket/".into(),
                    max_object_bytes: 1 << 20,
                    max_event_bytes: 1 << 20,
                    abandon_after: Duration::from_secs(3600),
                    tenants: HashMap::new(),
                },
                shutdown,
            ));
            Self {
                dir,
                uploads,
                sink,
                writer: Some(writer),
                _stop: stop,
            }
        }

        async fn create(&self, seq: u64, bytes: &[u8]) -> Created {
            self.uploads
                .create(&pi1(), create_req(seq, bytes))
                .await
                .unwrap()
        }

        /// Creates the upload and returns its id.
        async fn id(&self, seq: u64, bytes: &[u8]) -> String {
            id_of(&self.create(seq, bytes).await)
        }

        async fn patch(&self, id: &str, offset: u64, bytes: &[u8]) -> Result<Patched, UploadError> {
            let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
            let req = PatchRequest {
                gateway: pi1(),
                id: id.to_owned(),
                offset,
                declared: Some(bytes.len() as u64),
            };
            let body = Body::from(bytes.to_vec()).into_data_stream();
            self.uploads.clone().patch(req, body, permit).await.result
        }

        async fn stop(mut self) {
            self.sink.shutdown().await;
            if let Some(w) = self.writer.take() {
                w.join().unwrap();
            }
        }
    }

    /// The object key of `file_event(seq)` with extension jpg.
    fn object_key(seq: u64) -> String {
        let upload = key::upload_id(&pi1(), "p-1", seq);
        format!("pi-1/files/cameras/2026-12-01/21/img-{seq}.{upload}.jpg")
    }

    fn id_of(created: &Created) -> String {
        let (Created::New(s) | Created::Existing(s) | Created::Done(s)) = created;
        s.location
            .as_deref()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn prepare_checks_the_event_and_adds_the_dataref() {
        let p = prepare(&pi1(), &create_req(42, b"x"), "s3://b/", "", 1 << 20).unwrap();
        // The upload id of (pi-1, p-1, 42) between the event id and the extension.
        let name = "img-42.61f0d86010b3c57032efd3e36fd7e0b0.jpg";
        assert_eq!(p.upload, key::upload_id(&pi1(), "p-1", 42));
        assert_eq!(p.key, format!("pi-1/files/cameras/2026-12-01/21/{name}"));
        assert_eq!(
            p.dataref,
            format!("s3://b/pi-1/files/cameras/2026-12-01/21/{name}")
        );
        assert_eq!(p.legacy_key, "pi-1/files/cameras/2026-12-01/21/img-42.jpg");
        assert_eq!((p.producer.as_str(), p.sequence), ("p-1", 42));
        let with_prefix = prepare(
            &pi1(),
            &create_req(42, b"x"),
            "s3://b/",
            "tenant=t/",
            1 << 20,
        );
        assert_eq!(
            with_prefix.unwrap().key,
            format!("tenant=t/pi-1/files/cameras/2026-12-01/21/{name}")
        );

        let mut req = create_req(1, b"x");
        let mut event = file_event(1);
        event.as_object_mut().unwrap().remove("time");
        req.event = Text::from_value(&event);
        let r = prepare(&pi1(), &req, "s3://b/", "", 1 << 20).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("img-1"));
        assert!(r.reason.contains("'time'"), "{}", r.reason);

        let mut req = create_req(1, b"x");
        let mut event = file_event(1);
        event["source"] = json!("/gateways/pi-2/files");
        req.event = Text::from_value(&event);
        let r = prepare(&pi1(), &req, "s3://b/", "", 1 << 20).unwrap_err();
        assert!(
            r.reason.contains("does not belong to gateway pi-1"),
            "{}",
            r.reason
        );

        // The limit applies to the line with its dataref.
        let req = create_req(1, b"x");
        let without = req.event.get().len() as u64;
        let r = prepare(&pi1(), &req, "s3://b/", "", without + 5).unwrap_err();
        assert!(r.reason.contains("max_event_bytes"), "{}", r.reason);
    }

    #[test]
    fn request_checks() {
        let ok = create_req(1, b"abc");
        assert_eq!(check_request(&ok, 3), Ok(ok.sha256.clone()));
        let mut upper = ok.clone();
        upper.sha256 = upper.sha256.to_uppercase();
        assert_eq!(
            check_request(&upper, 3),
            Ok(ok.sha256.clone()),
            "normalized"
        );
        assert!(matches!(
            check_request(&ok, 2),
            Err(UploadError::TooLarge { .. })
        ));
        let mut bad = ok.clone();
        bad.sha256 = "abc".into();
        assert!(
            matches!(check_request(&bad, 3), Err(UploadError::BadRequest(m)) if m.contains("sha256"))
        );
        let mut bad = ok;
        bad.extension = Some("JPG".into());
        assert!(
            matches!(check_request(&bad, 3), Err(UploadError::BadRequest(m)) if m.contains("extension"))
        );
    }

    #[tokio::test]
    async fn create_patch_complete_and_create_again() {
        let f = Fixture::new();
        let bytes = b"0123456789".repeat(1000);
        let created = f.create(7, &bytes).await;
        let id = id_of(&created);
        assert!(matches!(&created, Created::New(s) if s.offset == 0));
        // Again: the same upload, nothing held yet.
        let again = f.create(7, &bytes).await;
        assert!(matches!(&again, Created::Existing(s) if s.offset == 0 && id_of(&again) == id));

        assert_eq!(
            f.patch(&id, 0, &bytes[..4000]).await,
            Ok(Patched::Partial {
                offset: 4000,
                length: 10_000
            })
        );
        assert_eq!(f.uploads.head(&pi1(), &id).await, Ok((4000, 10_000)));
        let wrong = f.patch(&id, 3000, &bytes[3000..]).await.unwrap_err();
        assert!(
            matches!(wrong, UploadError::Conflict { offset: 4000, .. }),
            "{wrong:?}"
        );
        let too_long = f
            .patch(&id, 4000, &[&bytes[4000..], b"x"].concat())
            .await
            .unwrap_err();
        assert!(
            matches!(
                too_long,
                UploadError::TooLarge {
                    offset: Some(4000),
                    ..
                }
            ),
            "{too_long:?}"
        );

        let Ok(Patched::Done(state)) = f.patch(&id, 4000, &bytes[4000..]).await else {
            panic!("not done")
        };
        assert_eq!(state.result.as_ref().unwrap().status, EventStatus::Accepted);
        assert_eq!(
            state.dataref.as_deref(),
            Some(format!("s3://bucket/{}", object_key(7)).as_str())
        );
        let object = f.dir.path().join("objects").join(object_key(7));
        assert_eq!(std::fs::read(object).unwrap(), bytes);
        assert!(
            f.uploads.registry.is_empty(),
            "finished uploads are forgotten"
        );
        assert!(matches!(
            f.uploads.head(&pi1(), &id).await,
            Err(UploadError::NotFound(_))
        ));

        let again = f.create(7, &bytes).await;
        let Created::Done(s) = again else {
            panic!("{again:?}")
        };
        assert_eq!(s.result.unwrap().status, EventStatus::Duplicate);
        assert_eq!(s.dataref, state.dataref);
        f.stop().await;
    }

    /// After the upgrade that put the upload id in object keys (issue 24), an upload
    /// begun before it keeps the key in its manifest: it completes there, and its event
    /// names that key.
    #[tokio::test]
    async fn issue_24_an_upload_begun_before_the_upgrade_keeps_its_key() {
        let f = Fixture::new();
        let id = f.id(5, b"abc").await;
        let mut m = f.uploads.store.load(&pi1(), &id).unwrap().unwrap();
        assert_eq!(m.key, object_key(5));
        let old = "pi-1/files/cameras/2026-12-01/21/img-5.jpg";
        m.key = old.into();
        f.uploads.store.update(&id, &m).unwrap();

        let Ok(Patched::Done(s)) = f.patch(&id, 0, b"abc").await else {
            panic!("not done")
        };
        assert_eq!(s.dataref, Some(format!("s3://bucket/{old}")));
        let objects = f.dir.path().join("objects");
        assert_eq!(std::fs::read(objects.join(old)).unwrap(), b"abc");
        assert!(!objects.join(object_key(5)).exists());
        f.stop().await;
    }

    /// A file whose event was published under the key without the upload id, sent again
    /// after the upgrade (issue 24): `duplicate`, with the `dataref` its event has.
    #[tokio::test]
    async fn issue_24_a_duplicate_from_before_the_upgrade_finds_its_old_key() {
        let f = Fixture::new();
        let publish = |seq: u64| SinkEvent {
            gateway: pi1(),
            producer: "p-1".into(),
            sequence: seq,
            line: serde_json::to_vec(&file_event(seq)).unwrap(),
        };
        f.sink
            .write(vec![publish(8), publish(9)], None)
            .await
            .unwrap();
        let old = f
            .dir
            .path()
            .join("objects/pi-1/files/cameras/2026-12-01/21/img-8.jpg");
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        std::fs::write(&old, b"abc").unwrap();

        let Created::Done(s) = f.create(8, b"abc").await else {
            panic!("not done")
        };
        assert_eq!(s.result.unwrap().status, EventStatus::Duplicate);
        assert_eq!(
            s.dataref.as_deref(),
            Some("s3://bucket/pi-1/files/cameras/2026-12-01/21/img-8.jpg")
        );
        // Its object gone (moved by an operator): still duplicate, without a dataref.
        let Created::Done(s) = f.create(9, b"abc").await else {
            panic!("not done")
        };
        assert_eq!(s.result.unwrap().status, EventStatus::Duplicate);
        assert_eq!(s.dataref, None);
        assert!(f.uploads.store.scan().unwrap().is_empty(), "nothing stored");
        f.stop().await;
    }

    #[tokio::test]
    async fn a_wrong_digest_discards_the_bytes() {
        let f = Fixture::new();
        let mut req = create_req(1, b"hello");
        req.sha256 = wire::sha256_hex(&sha2::Sha256::digest(b"HELLO").into());
        let id = id_of(&f.uploads.create(&pi1(), req.clone()).await.unwrap());
        let e = f.patch(&id, 0, b"hello").await.unwrap_err();
        assert!(matches!(e, UploadError::DigestMismatch { .. }), "{e:?}");
        assert_eq!(f.uploads.head(&pi1(), &id).await, Ok((0, 5)));
        assert!(
            !f.dir.path().join("objects/pi-1").exists(),
            "nothing stored"
        );
        assert_eq!(f.uploads.metrics.upload_digest_mismatches.load(Relaxed), 1);
        let Ok(Patched::Done(_)) = f.patch(&id, 0, b"HELLO").await else {
            panic!("the right bytes are accepted")
        };
        f.stop().await;
    }

    #[tokio::test]
    async fn a_full_part_and_an_object_in_place_are_finished_by_create() {
        let f = Fixture::new();
        // All bytes held, not committed (a crash after the last write).
        let id = f.id(1, b"abc").await;
        std::fs::write(f.uploads.store.part_path(&pi1(), &id), b"abc").unwrap();
        let done = f.create(1, b"abc").await;
        assert!(
            matches!(&done, Created::Done(s) if s.result.as_ref().unwrap().status == EventStatus::Accepted),
            "{done:?}"
        );

        // The object renamed into place, the event never written (a crash in between).
        let req = create_req(2, b"xyz");
        let id = id_of(&f.uploads.create(&pi1(), req.clone()).await.unwrap());
        let p = prepare(&pi1(), &req, "s3://bucket/", "", 1 << 20).unwrap();
        std::fs::write(f.uploads.store.part_path(&pi1(), &id), b"xyz").unwrap();
        f.uploads.store.commit(&pi1(), &id, &p.key).unwrap();
        let done = f.patch(&id, 0, b"xyz").await.unwrap();
        assert!(
            matches!(&done, Patched::Done(s) if s.result.as_ref().unwrap().status == EventStatus::Accepted),
            "{done:?}"
        );
        assert_eq!(f.uploads.metrics.uploads_resumed.load(Relaxed), 2);
        f.stop().await;
    }

    #[tokio::test]
    async fn zero_length_files_complete_on_an_empty_patch() {
        let f = Fixture::new();
        let created = f.create(3, b"").await;
        assert!(matches!(&created, Created::New(s) if s.length == 0));
        let Ok(Patched::Done(s)) = f.patch(&id_of(&created), 0, b"").await else {
            panic!("not done")
        };
        assert_eq!(s.result.unwrap().status, EventStatus::Accepted);

        // Created twice without a PATCH: the second create has "all bytes" and finishes.
        assert!(matches!(f.create(4, b"").await, Created::New(_)));
        let done = f.create(4, b"").await;
        assert!(
            matches!(&done, Created::Done(s) if s.result.as_ref().unwrap().status == EventStatus::Accepted),
            "{done:?}"
        );
        let object = f.dir.path().join("objects").join(object_key(4));
        assert_eq!(std::fs::metadata(object).unwrap().len(), 0);
        f.stop().await;
    }

    #[tokio::test]
    async fn the_sweep_deletes_only_untouched_unused_uploads() {
        let f = Fixture::new();
        let a = f.id(1, b"abc").await;
        let b = f.id(2, b"abc").await;
        f.patch(&b, 0, b"ab").await.unwrap();
        let now = SystemTime::now();
        assert_eq!(f.uploads.sweep(now), 0, "all fresh");

        // b is being worked on: skipped even when old.
        let lease = f
            .uploads
            .registry
            .take_over(&Uploads::slot(&pi1(), &b))
            .await;
        let later = now + Duration::from_secs(3601);
        let uploads = f.uploads.clone();
        let n = tokio::task::spawn_blocking(move || uploads.sweep(later))
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert!(matches!(
            f.uploads.head(&pi1(), &a).await,
            Err(UploadError::NotFound(_))
        ));
        drop(lease);
        assert_eq!(f.uploads.head(&pi1(), &b).await, Ok((2, 3)));
        let uploads = f.uploads.clone();
        let n = tokio::task::spawn_blocking(move || uploads.sweep(later))
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(f.uploads.metrics.uploads_abandoned.load(Relaxed), 2);
        assert!(f.uploads.store.scan().unwrap().is_empty());
        f.stop().await;
    }

    #[tokio::test]
    async fn delete_removes_and_another_gateway_cannot_see() {
        let f = Fixture::new();
        let id = f.id(1, b"abc").await;
        let pi2 = GatewayId::new("pi-2").unwrap();
        assert!(matches!(
            f.uploads.head(&pi2, &id).await,
            Err(UploadError::NotFound(_))
        ));
        assert!(matches!(
            f.uploads.delete(&pi2, &id).await,
            Err(UploadError::NotFound(_))
        ));
        assert_eq!(f.uploads.delete(&pi1(), &id).await, Ok(()));
        assert!(matches!(
            f.uploads.delete(&pi1(), &id).await,
            Err(UploadError::NotFound(_))
        ));
        f.stop().await;
    }
}
