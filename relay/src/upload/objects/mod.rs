//! Where finished files go, behind one interface: the [upload service](super::service)
//! receives, hashes and publishes the same way whatever the store, and only calls
//! [`ObjectStore`].
//!
//! * [`dir`] — `<data_dir>/objects/<key>`: the `.part` is renamed into place;
//! * [`s3`] — `<prefix>objects/<key>` in a bucket: full parts are sent as they arrive,
//!   the last one with the completion.
//!
//! A new store is a new module here implementing [`ObjectStore`], and the config variant
//! that picks it (`lib.rs` builds the store from the checked settings).

pub mod config;
pub mod dir;
pub mod s3;

use std::path::Path;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use pigeon_shared::ce::GatewayId;

use super::error::UploadError;
use super::store::Manifest;

pub use dir::DirObjects;
pub use s3::S3Objects;

/// Why a store did not take a file, beyond the answer an ordinary failure gives.
#[derive(Debug)]
pub enum ObjectError {
    /// The answer to give the gateway (the store counted and logged what it needed to).
    Failed(UploadError),
    /// The file's parts sent earlier are gone from the store (aborted or expired
    /// there), with the store's message: the upload starts again from offset 0.
    PartsGone(String),
}

impl From<UploadError> for ObjectError {
    fn from(e: UploadError) -> Self {
        Self::Failed(e)
    }
}

/// A store of finished files. Every call may run concurrently with others, for other
/// uploads.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// What the keys of a tenant's objects start with (empty, or `tenant=<tenant>/`).
    fn key_prefix(&self, tenant: &str) -> String;

    /// The size of the parts a file is sent in as it arrives, for a store that takes
    /// parts; `None` if the file is stored whole at the end.
    fn part_size(&self) -> Option<u64>;

    /// Whether an object is at `key` (for the `dataref` of a duplicate); a store that
    /// cannot tell says no.
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, UploadError>>;

    /// The SHA-256 of the object at the upload's key if it is there with the upload's
    /// length (the crash window between storing an object and publishing its event).
    fn stored_digest<'a>(
        &'a self,
        m: &'a Manifest,
    ) -> BoxFuture<'a, Result<Option<String>, UploadError>>;

    /// Starts taking the upload's file in parts; the id the store gave the parts.
    fn begin_parts<'a>(&'a self, m: &'a Manifest) -> BoxFuture<'a, Result<String, UploadError>>;

    /// Sends part `number` (`length` bytes, in the file at `path`); its tag for the
    /// completion.
    fn send_part<'a>(
        &'a self,
        m: &'a Manifest,
        parts_id: &'a str,
        number: u32,
        path: &'a Path,
        length: u64,
    ) -> BoxFuture<'a, Result<String, ObjectError>>;

    /// Makes the upload's object appear at its key, whole: every byte is held (the
    /// last ones in part `m.next_part()` here) and the digest checked.
    fn commit<'a>(
        &'a self,
        gateway: &'a GatewayId,
        id: &'a str,
        m: &'a Manifest,
    ) -> BoxFuture<'a, Result<(), ObjectError>>;

    /// Drops the parts the upload sent, if any; best effort, a failure logged.
    fn abort<'a>(
        &'a self,
        gateway: &'a GatewayId,
        id: &'a str,
        m: &'a Manifest,
    ) -> BoxFuture<'a, ()>;

    /// Removes the object at `key`, if it is there.
    fn remove<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), UploadError>>;

    /// Drops parts no upload here knows, started over `abandon_after` before `now`.
    /// Returns how many.
    fn sweep_orphans(&self, now: SystemTime, abandon_after: Duration) -> BoxFuture<'_, usize>;
}
