//! Objects in a bucket: `<prefix>objects/<key>`. Each full part of the manifest's
//! `part_size` goes to the object's multipart upload as it arrives; the completion sends
//! the last part and completes it (a file of one part is put in one request). A
//! completed object carries its SHA-256 in `x-amz-meta-sha256`, so `HEAD` can tell it is
//! the upload's.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use pigeon_shared::ce::GatewayId;

use super::config::OBJECTS_PREFIX;
use super::{ObjectError, ObjectStore};
use crate::metrics::Metrics;
use crate::s3::{Bucket, S3Error};
use crate::upload::error::{UploadError, blocking};
use crate::upload::store::{Manifest, UploadStore};

/// The key of a file in the bucket, relative to `objects.s3.prefix`.
fn s3_key(key: &str) -> String {
    format!("{OBJECTS_PREFIX}/{key}")
}

/// The file's media type as the gateway described it (`data.contenttype`), if it looks
/// like one; stored as the object's `Content-Type`.
fn content_type(m: &Manifest) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Event {
        data: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        contenttype: Option<String>,
    }
    let event: Event = serde_json::from_str(m.event.get()).ok()?;
    let ct = event.data?.contenttype?;
    let ct = ct.as_str();
    let ok = ct.len() <= 127
        && ct.contains('/')
        && ct.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    ok.then(|| ct.to_owned())
}

/// The bucket, sent parts of `part_size`.
pub struct S3Objects {
    bucket: Arc<Bucket>,
    part_size: u64,
    /// The uploads here: their part files, and the parts ids they know.
    store: Arc<UploadStore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for S3Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3")
            .field("bucket", &self.bucket.describe)
            .field("part_size", &self.part_size)
            .finish()
    }
}

impl S3Objects {
    pub fn new(
        bucket: Arc<Bucket>,
        part_size: u64,
        store: Arc<UploadStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            bucket,
            part_size,
            store,
            metrics,
        }
    }

    /// An S3 failure as the answer to the gateway (503), counted and logged.
    fn failed(&self, e: S3Error) -> UploadError {
        self.metrics.object_store_errors.fetch_add(1, Relaxed);
        self.metrics.object_store_healthy.store(false, Relaxed);
        tracing::warn!(error = %e, "Object storage failed; the upload is answered 503 and its gateway retries.");
        UploadError::Unavailable(e.to_string())
    }

    /// Times an S3 call and notes that the bucket answers when it succeeds.
    async fn timed<T>(&self, call: impl Future<Output = Result<T, S3Error>>) -> Result<T, S3Error> {
        let started = Instant::now();
        let r = call.await;
        self.metrics.object_store_seconds.observe(started.elapsed());
        if r.is_ok() || matches!(r, Err(S3Error::NoSuchUpload(_))) {
            self.metrics.object_store_healthy.store(true, Relaxed);
        }
        r
    }

    /// A file of one part: one `PutObject`.
    async fn put_whole(
        &self,
        gateway: &GatewayId,
        id: &str,
        m: &Manifest,
    ) -> Result<(), UploadError> {
        let path = self.store.part_path_at(gateway, id, m.next_part());
        if m.length == 0 {
            // There may be no file at all for an empty upload.
            let store = self.store.clone();
            let (g, i) = (gateway.clone(), id.to_owned());
            blocking("create the upload's file", move || {
                store.open_part_at(&g, &i, 1).map(drop)
            })
            .await?;
        }
        let ct = content_type(m);
        self.timed(
            self.bucket
                .put_file(&s3_key(&m.key), &path, m.length, &m.sha256, ct.as_deref()),
        )
        .await
        .map_err(|e| self.failed(e))
    }

    /// The last part sent and the multipart upload completed. A completion whose upload
    /// is gone is fine if the object is there with the file's digest (completed by an
    /// earlier attempt whose answer was lost).
    async fn complete_parts(
        &self,
        gateway: &GatewayId,
        id: &str,
        m: &Manifest,
        parts_id: &str,
        sent: &[(u32, String)],
    ) -> Result<(), ObjectError> {
        let key = s3_key(&m.key);
        let n = m.next_part();
        let rest = m.length - m.shipped();
        let mut parts = sent.to_vec();
        let mut gone = None;
        if rest > 0 {
            let path = self.store.part_path_at(gateway, id, n);
            match self
                .timed(self.bucket.upload_part(&key, parts_id, n, &path, rest))
                .await
            {
                Ok(etag) => {
                    self.metrics.object_parts_sent.fetch_add(1, Relaxed);
                    parts.push((n, etag));
                }
                Err(S3Error::NoSuchUpload(e)) => gone = Some(e),
                Err(e) => return Err(self.failed(e).into()),
            }
        }
        if gone.is_none() {
            match self
                .timed(self.bucket.complete(&key, parts_id, &parts))
                .await
            {
                Ok(()) => return Ok(()),
                Err(S3Error::NoSuchUpload(e)) => gone = Some(e),
                Err(e) => return Err(self.failed(e).into()),
            }
        }
        let error = gone.unwrap_or_default();
        match self.timed(self.bucket.head(&key)).await {
            Ok(Some(o)) if o.length == m.length && o.sha256.as_deref() == Some(&m.sha256) => {
                tracing::info!(gateway = %gateway, upload = %id, key = ?m.key, "An upload's multipart upload was completed before (its answer was lost); the object is in place.");
                Ok(())
            }
            Ok(_) => Err(ObjectError::PartsGone(error)),
            Err(e) => Err(self.failed(e).into()),
        }
    }

    /// The parts ids of every upload here.
    async fn known_parts(&self) -> Option<HashSet<String>> {
        let store = self.store.clone();
        let known = tokio::task::spawn_blocking(move || -> io::Result<HashSet<String>> {
            let mut ids = HashSet::new();
            for u in store.scan()? {
                if let Ok(Some(m)) = store.load(&u.gateway, &u.id) {
                    ids.extend(m.multipart.map(|mp| mp.upload_id));
                }
            }
            Ok(ids)
        })
        .await;
        match known {
            Ok(Ok(known)) => Some(known),
            _ => None,
        }
    }
}

impl ObjectStore for S3Objects {
    fn key_prefix(&self, tenant: &str) -> String {
        format!("tenant={tenant}/")
    }

    fn part_size(&self) -> Option<u64> {
        Some(self.part_size)
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, UploadError>> {
        Box::pin(async move {
            match self.timed(self.bucket.head(&s3_key(key))).await {
                Ok(found) => Ok(found.is_some()),
                Err(e) => {
                    tracing::debug!(error = %e, "Could not look for an object in S3.");
                    Ok(false)
                }
            }
        })
    }

    /// Objects are only ever completed after their digest was checked, with the digest
    /// in their metadata.
    fn stored_digest<'a>(
        &'a self,
        m: &'a Manifest,
    ) -> BoxFuture<'a, Result<Option<String>, UploadError>> {
        Box::pin(async move {
            match self
                .timed(self.bucket.head(&s3_key(&m.key)))
                .await
                .map_err(|e| self.failed(e))?
            {
                Some(o) if o.length == m.length => Ok(Some(o.sha256.unwrap_or_default())),
                _ => Ok(None),
            }
        })
    }

    fn begin_parts<'a>(&'a self, m: &'a Manifest) -> BoxFuture<'a, Result<String, UploadError>> {
        Box::pin(async move {
            let ct = content_type(m);
            self.timed(
                self.bucket
                    .create_multipart(&s3_key(&m.key), &m.sha256, ct.as_deref()),
            )
            .await
            .map_err(|e| self.failed(e))
        })
    }

    fn send_part<'a>(
        &'a self,
        m: &'a Manifest,
        parts_id: &'a str,
        number: u32,
        path: &'a Path,
        length: u64,
    ) -> BoxFuture<'a, Result<String, ObjectError>> {
        Box::pin(async move {
            match self
                .timed(
                    self.bucket
                        .upload_part(&s3_key(&m.key), parts_id, number, path, length),
                )
                .await
            {
                Ok(etag) => Ok(etag),
                Err(S3Error::NoSuchUpload(e)) => Err(ObjectError::PartsGone(e)),
                Err(e) => Err(self.failed(e).into()),
            }
        })
    }

    fn commit<'a>(
        &'a self,
        gateway: &'a GatewayId,
        id: &'a str,
        m: &'a Manifest,
    ) -> BoxFuture<'a, Result<(), ObjectError>> {
        Box::pin(async move {
            let Some(mp) = &m.multipart else {
                return Ok(self.put_whole(gateway, id, m).await?);
            };
            let sent: Vec<(u32, String)> = mp
                .parts
                .iter()
                .map(|p| (p.number, p.etag.clone()))
                .collect();
            self.complete_parts(gateway, id, m, &mp.upload_id, &sent)
                .await
        })
    }

    fn abort<'a>(
        &'a self,
        gateway: &'a GatewayId,
        id: &'a str,
        m: &'a Manifest,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(mp) = &m.multipart else { return };
            match self
                .timed(self.bucket.abort(&s3_key(&m.key), &mp.upload_id))
                .await
            {
                Ok(()) => {
                    tracing::debug!(gateway = %gateway, upload = %id, "Aborted an upload's S3 multipart upload.");
                }
                Err(e) => {
                    self.metrics.object_store_errors.fetch_add(1, Relaxed);
                    tracing::warn!(gateway = %gateway, upload = %id, error = %e, "Could not abort an upload's S3 multipart upload; the orphan sweep tries again later.");
                }
            }
        })
    }

    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), UploadError>> {
        Box::pin(async move {
            self.bucket
                .delete(&s3_key(key))
                .await
                .map_err(|e| UploadError::Unavailable(e.to_string()))
        })
    }

    /// Aborts multipart uploads under `objects/` that no upload here knows and that were
    /// started more than `abandon_after` ago — left by a relay that crashed between
    /// starting one and recording it, or lost its data dir. (Another relay's upload that
    /// old would have been abandoned by it too.)
    fn sweep_orphans(&self, now: SystemTime, abandon_after: Duration) -> BoxFuture<'_, usize> {
        Box::pin(async move {
            let unfinished = match self
                .timed(self.bucket.unfinished(&format!("{OBJECTS_PREFIX}/")))
                .await
            {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(error = %e, "Could not list unfinished S3 uploads; trying again later.");
                    return 0;
                }
            };
            if unfinished.is_empty() {
                return 0;
            }
            let Some(known) = self.known_parts().await else {
                tracing::warn!(
                    "Could not read the uploads here; the orphan sweep tries again later."
                );
                return 0;
            };
            let mut aborted = 0;
            for u in unfinished {
                let old = u
                    .initiated
                    .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= abandon_after);
                if !old || known.contains(&u.upload_id) {
                    continue;
                }
                match self.timed(self.bucket.abort(&u.key, &u.upload_id)).await {
                    Ok(()) => {
                        aborted += 1;
                        self.metrics.uploads_abandoned.fetch_add(1, Relaxed);
                        tracing::info!(key = ?u.key, upload_id = ?u.upload_id, "Aborted an S3 multipart upload no upload here knows, started over uploads.abandon_after ago.");
                    }
                    Err(e) => {
                        tracing::warn!(key = ?u.key, error = %e, "Could not abort an orphaned S3 multipart upload; trying again later.");
                    }
                }
            }
            aborted
        })
    }
}
