//! The S3 bucket (AWS or an S3-compatible server) through aws-sdk-s3: the few calls the
//! relay makes, each with its errors sorted into "try again later" and "this upload is
//! gone".
//!
//! Keys passed in are relative to `objects.s3.prefix`; this module prepends it.

use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls;

use crate::upload::objects::config::S3Settings;

/// The user metadata key (`x-amz-meta-sha256`) that holds an object's SHA-256, set
/// when it is created; the relay trusts it when it finds the object after a crash.
pub const SHA256_METADATA: &str = "sha256";

/// Why an S3 call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3Error {
    /// The multipart upload is not there (completed, aborted, or expired by a lifecycle
    /// rule): start again.
    #[error("{0}")]
    NoSuchUpload(String),
    /// Anything else: the server is unreachable, slow, refuses the credentials, the
    /// bucket is missing. The caller answers 503 and the gateway retries.
    #[error("{0}")]
    Unavailable(String),
}

/// What `HEAD` says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub length: u64,
    /// Its `x-amz-meta-sha256`, if it has one.
    pub sha256: Option<String>,
}

/// An unfinished multipart upload, from `ListMultipartUploads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    /// Relative to the prefix.
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<SystemTime>,
}

/// The bucket.
pub struct Bucket {
    client: Client,
    bucket: String,
    prefix: String,
    /// For log messages: where the bucket is.
    pub describe: String,
}

/// One line naming the call and what went wrong, without the raw response.
fn error_text<E>(what: &str, e: &SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            format!(
                "S3 {what} failed: HTTP {} {}: {}",
                se.raw().status().as_u16(),
                err.code().unwrap_or("(no code)"),
                err.message().unwrap_or("(no message)")
            )
        }
        SdkError::TimeoutError(_) => {
            format!("S3 {what} failed: no answer within objects.s3.timeout")
        }
        _ => format!("S3 {what} failed: {}", DisplayErrorContext(e)),
    }
}

fn unavailable<E>(what: &str, e: &SdkError<E, HttpResponse>) -> S3Error
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let code = e.as_service_error().and_then(|s| s.code());
    if code == Some("NoSuchUpload") {
        return S3Error::NoSuchUpload(error_text(what, e));
    }
    S3Error::Unavailable(error_text(what, e))
}

impl Bucket {
    /// Builds the client. Loading the SDK's default chains (region, credentials) reads
    /// the environment and profile files; nothing is sent to S3 yet.
    pub async fn connect(s: &S3Settings) -> Self {
        // rustls with ring, as everywhere else in Pigeon (no aws-lc to build for the Pi).
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        if let Some(r) = &s.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(e) = &s.endpoint {
            loader = loader.endpoint_url(e.clone());
        }
        if let Some((id, secret)) = &s.static_keys {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "objects.s3 in the relay's config",
            ));
        }
        let shared = loader.load().await;
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(s.timeout)
            .build();
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s.path_style)
            .timeout_config(timeouts)
            // A part read from local disk never stalls; a slow server is the timeout's job.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            // No CRC32 trailers (aws-chunked bodies), which S3-compatible servers such as
            // garage refuse: the SigV4 signature covers each body's SHA-256, and the relay
            // checks the whole file's SHA-256 before it completes an object.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if shared.region().is_none() {
            // Path-style S3-compatible servers mostly ignore it; AWS needs one.
            conf = conf.region(Region::new("us-east-1"));
        }
        let describe = format!(
            "s3://{}/{} ({})",
            s.bucket,
            s.prefix,
            s.endpoint.as_deref().unwrap_or("AWS")
        );
        Self {
            client: Client::from_conf(conf.build()),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            describe,
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Whether the bucket answers (`HeadBucket`).
    pub async fn probe(&self) -> Result<(), S3Error> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(drop)
            .map_err(|e| unavailable("HeadBucket", &e))
    }

    /// The object at `key`, if there is one.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, S3Error> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(o) => Ok(Some(ObjectInfo {
                length: o.content_length().unwrap_or(0).max(0) as u64,
                sha256: o
                    .metadata()
                    .and_then(|m| m.get(SHA256_METADATA))
                    .map(|s| s.to_ascii_lowercase()),
            })),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(unavailable("HeadObject", &e)),
        }
    }

    /// The bytes of a small object at `key`, if there is one.
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Ok(None);
            }
            Err(e) => return Err(unavailable("GetObject", &e)),
        };
        let body = out.body.collect().await.map_err(|e| {
            S3Error::Unavailable(format!("GetObject {key}: the body broke off: {e}"))
        })?;
        Ok(Some(body.to_vec()))
    }

    async fn body(path: &Path, offset: u64, length: u64) -> Result<ByteStream, S3Error> {
        ByteStream::read_from()
            .path(path)
            .offset(offset)
            .length(Length::Exact(length))
            .build()
            .await
            .map_err(|e| {
                S3Error::Unavailable(format!(
                    "the relay cannot read {} to send it to S3: {e}",
                    path.display()
                ))
            })
    }

    /// Stores the first `length` bytes of `path` as the object at `key` in one request.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        length: u64,
        sha256: &str,
        content_type: Option<&str>,
    ) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .body(Self::body(path, 0, length).await?)
            .content_length(length as i64)
            .metadata(SHA256_METADATA, sha256)
            .set_content_type(content_type.map(str::to_owned))
            .send()
            .await
            .map(drop)
            .map_err(|e| unavailable("PutObject", &e))
    }

    /// Stores `body` as the object at `key` in one request (replacing what is there).
    pub async fn put_bytes(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .content_length(body.len() as i64)
            .body(ByteStream::from(body))
            .content_type(content_type)
            .send()
            .await
            .map(drop)
            .map_err(|e| unavailable("PutObject", &e))
    }

    /// Starts a multipart upload for `key`; its upload id.
    pub async fn create_multipart(
        &self,
        key: &str,
        sha256: &str,
        content_type: Option<&str>,
    ) -> Result<String, S3Error> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.key(key))
            .metadata(SHA256_METADATA, sha256)
            .set_content_type(content_type.map(str::to_owned))
            .send()
            .await
            .map_err(|e| unavailable("CreateMultipartUpload", &e))?;
        out.upload_id().map(str::to_owned).ok_or_else(|| {
            S3Error::Unavailable("S3 CreateMultipartUpload answered without an upload id".into())
        })
    }

    /// Stores the first `length` bytes of `path` as part `number`; its ETag.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        path: &Path,
        length: u64,
    ) -> Result<String, S3Error> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(self.key(key))
            .upload_id(upload_id)
            .part_number(number as i32)
            .body(Self::body(path, 0, length).await?)
            .content_length(length as i64)
            .send()
            .await
            .map_err(|e| unavailable("UploadPart", &e))?;
        out.e_tag().map(str::to_owned).ok_or_else(|| {
            S3Error::Unavailable("S3 UploadPart answered without an ETag".to_owned())
        })
    }

    /// Completes the upload from its parts (number, ETag), in order: the object appears.
    pub async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<(), S3Error> {
        let parts = parts
            .iter()
            .map(|(n, etag)| {
                CompletedPart::builder()
                    .part_number(*n as i32)
                    .e_tag(etag)
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(self.key(key))
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(drop)
            .map_err(|e| unavailable("CompleteMultipartUpload", &e))
    }

    /// Deletes the object at `key`; one that is not there is fine (S3 answers the same).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| unavailable("DeleteObject", &e))
    }

    /// Aborts the upload and frees its parts; one that is not there is fine.
    pub async fn abort(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.key(key))
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match unavailable("AbortMultipartUpload", &e) {
                S3Error::NoSuchUpload(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Every unfinished multipart upload under `key_prefix` (relative to the prefix).
    pub async fn unfinished(&self, key_prefix: &str) -> Result<Vec<Unfinished>, S3Error> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(self.key(key_prefix))
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| unavailable("ListMultipartUploads", &e))?;
            for u in page.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                let Some(key) = key.strip_prefix(&self.prefix) else {
                    continue;
                };
                out.push(Unfinished {
                    key: key.to_owned(),
                    upload_id: id.to_owned(),
                    initiated: u.initiated().and_then(|t| SystemTime::try_from(*t).ok()),
                });
            }
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(out);
            }
        }
    }
}

/// How often the bucket is asked whether it answers.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Asks the bucket every [`PROBE_INTERVAL`] whether it answers (`HeadBucket`), so that
/// `/ready` follows S3 going away and coming back without waiting for an upload. The
/// first answer is logged; then each change (WARN when it fails, INFO when it is back).
pub fn spawn_prober(
    bucket: std::sync::Arc<Bucket>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        let mut was: Option<bool> = None;
        let mut interval = tokio::time::interval(PROBE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let started = std::time::Instant::now();
            let result = bucket.probe().await;
            metrics.object_store_seconds.observe(started.elapsed());
            let ok = result.is_ok();
            metrics.object_store_healthy.store(ok, Relaxed);
            match (&result, was) {
                (Ok(()), Some(true)) | (Err(_), Some(false)) => {}
                (Ok(()), None) => {
                    tracing::info!(bucket = %bucket.describe, "Object storage answers.");
                }
                (Ok(()), Some(false)) => {
                    tracing::info!(bucket = %bucket.describe, "Object storage answers again.");
                }
                (Err(e), _) => {
                    metrics.object_store_errors.fetch_add(1, Relaxed);
                    tracing::warn!(bucket = %bucket.describe, error = %e, "Object storage does not answer; uploads are answered 503 (gateways keep their files) until it does.");
                }
            }
            was = Some(ok);
        }
    })
}
