//! Capture: every accepted event also lands in the bucket as gzip-compressed
//! newline-delimited structured CloudEvents under Hive-style keys, the "bronze" landing
//! zone Glue, Athena or Spark crawl (`docs/data-layout.md#capture`):
//!
//! ```text
//! <prefix>capture/tenant=<tenant>/type=<type>/date=<YYYY-MM-DD>/hour=<HH>/<name>.jsonl.gz
//! ```
//!
//! Capture reads the stream, never the requests, so it holds exactly the stream — each
//! event once. [`Capture`] is the one type the relay starts and stops; which source it
//! reads follows the stream:
//!
//! * [`files`] — from the stream files, as far as the deduplication checkpoint says
//!   they are durable (a task);
//! * [`kafka`] — from the relay's topics, as a consumer group shared by every relay (a
//!   thread);
//! * [`keys`] — the object keys and deterministic gzip both share.

pub mod config;
pub mod files;
pub mod kafka;
pub mod keys;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use pigeon_shared::ce::GatewayId;

use config::CaptureSettings;

use crate::config::DEFAULT_TENANT;
use crate::metrics::Metrics;
use crate::s3::Bucket;
use crate::sink::stream::config::StreamSettings;

/// Why capture could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The Kafka consumer could not be configured.
    #[error("{0}")]
    Kafka(kafka::KafkaCaptureError),
    #[error("cannot start the capture thread: {0}")]
    Thread(std::io::Error),
    #[error("startup task failed: {0}")]
    Task(tokio::task::JoinError),
    #[error("cannot open the capture state: {0}")]
    State(std::io::Error),
}

/// Capture while it runs: over the stream files or over Kafka, whichever the stream is.
pub enum Capture {
    /// A task over the stream files.
    Files(tokio::task::JoinHandle<()>),
    /// A thread in the capture consumer group.
    Kafka(kafka::CaptureThread),
}

impl Capture {
    /// Starts capture from the configured stream into `bucket`.
    pub async fn start(
        settings: &CaptureSettings,
        stream: &StreamSettings,
        bucket: Arc<Bucket>,
        data_dir: &Path,
        tenants: &HashMap<GatewayId, String>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CaptureError> {
        match stream {
            StreamSettings::Kafka(kafka) => {
                let mut names: HashSet<String> = tenants.values().cloned().collect();
                names.insert(DEFAULT_TENANT.to_owned());
                let c = kafka::KafkaCapture::start(
                    kafka.clone(),
                    settings.clone(),
                    bucket,
                    names,
                    metrics,
                )
                .map_err(CaptureError::Kafka)?;
                let stop = Arc::new(AtomicBool::new(false));
                let thread = c
                    .spawn(tokio::runtime::Handle::current(), stop.clone())
                    .map_err(CaptureError::Thread)?;
                Ok(Self::Kafka(kafka::CaptureThread::new(stop, thread)))
            }
            StreamSettings::Files => {
                let (data_dir, settings, tenants) =
                    (data_dir.to_owned(), settings.clone(), tenants.clone());
                let c = tokio::task::spawn_blocking(move || {
                    files::FilesCapture::open(&data_dir, bucket, settings, tenants, metrics)
                })
                .await
                .map_err(CaptureError::Task)?
                .map_err(CaptureError::State)?;
                Ok(Self::Files(c.spawn()))
            }
        }
    }

    /// Stops capture: the files task at once (a roll it was writing is redone at the next
    /// start), the Kafka thread after its current step, leaving the group.
    pub async fn stop(self) -> Result<(), tokio::task::JoinError> {
        match self {
            Self::Files(task) => {
                task.abort();
                Ok(())
            }
            Self::Kafka(thread) => tokio::task::spawn_blocking(move || thread.stop()).await,
        }
    }
}
