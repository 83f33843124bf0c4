//! The stream: where the sink writer stores accepted events, behind one interface.
//!
//! * [`files`] — `.jsonl` files under the data dir, fsynced (the default);
//! * [`kafka`] — Kafka records in the CloudEvents binary mode, acknowledged by the broker.
//!
//! The [writer](super::writer) does deduplication and group commit the same way for
//! every stream; it only calls [`Stream`]. A new stream is a new module here, one arm in
//! [`open`], and a variant of [`StreamSettings`].

pub mod config;
pub mod files;
pub mod kafka;

use std::collections::HashMap;
use std::path::Path;

use pigeon_shared::ce::GatewayId;

use super::NotStored;
use super::checkpoint::{Checkpoint, Recovered, RecoveryError};
use super::dedup::DedupIndex;
use crate::config::DEFAULT_TENANT;
use config::StreamSettings;

/// One event to store: its gateway (which names its file, or its tenant's topic) and its
/// structured JSON, without a newline.
pub struct Outgoing<'a> {
    pub gateway: &'a GatewayId,
    pub line: &'a [u8],
}

/// Why a stream cannot take writes now; its message goes into the 503 answer. Each
/// stream has its own error type behind it.
pub type StreamError = Box<dyn std::error::Error + Send + Sync>;

/// What a stream did while the writer was idle.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Upkeep {
    /// It added to the index (records another writer stored, or a read-back).
    pub index_changed: bool,
    /// It learned whether it can take writes (`None`: nothing new).
    pub healthy: Option<bool>,
}

/// A place the sink writer stores events durably. Every call happens on the writer
/// thread, one at a time.
pub trait Stream: Send {
    /// Called before a group is checked against the index: makes sure the index holds
    /// everything the stream already has (with Kafka, a read-back after a failed delivery
    /// or an unreachable broker at startup). `Ok(true)` if it read into the index, and
    /// the stream then counts as healthy; an error (logged here) fails the whole group.
    fn ready(&mut self, index: &mut DedupIndex) -> Result<bool, StreamError>;

    /// Stores the events durably, one result per event in order; `Ok` only once the
    /// event is on disk (or acknowledged by the broker).
    fn store(&mut self, events: &[Outgoing<'_>]) -> Vec<Result<(), NotStored>>;

    /// Upkeep while no group is waiting: retries, probes, catching up with other writers.
    fn idle(&mut self, index: &mut DedupIndex) -> Upkeep;

    /// Drops bookkeeping every checkpoint since has covered; whether it dropped any.
    fn forget_idle(&mut self) -> bool;

    /// Puts what the stream must find again after a restart into the checkpoint (file
    /// lengths, Kafka frontiers).
    fn save(&self, checkpoint: &mut Checkpoint);
}

/// Opens the configured stream with what recovery found (taking its stream state), and
/// reads the stream back into `recovered.index` where that is the stream's log. Returns
/// the stream and, if it knows already, whether it can take writes.
pub fn open(
    data_dir: &Path,
    settings: StreamSettings,
    retry_after: std::time::Duration,
    tenants: HashMap<GatewayId, String>,
    recovered: &mut Recovered,
) -> Result<(Box<dyn Stream>, Option<bool>), RecoveryError> {
    let files = std::mem::take(&mut recovered.files);
    Ok(match settings {
        StreamSettings::Files => (
            Box::new(files::StreamFiles::new(data_dir.to_owned(), files)),
            None,
        ),
        StreamSettings::Kafka(k) => {
            let (kafka, healthy) = kafka::Kafka::start(
                k,
                tenants,
                DEFAULT_TENANT.to_owned(),
                retry_after,
                files,
                recovered,
            )
            .map_err(RecoveryError::Kafka)?;
            (Box::new(kafka), Some(healthy))
        }
    })
}
