//! The SQLite outbox: every record is committed here before its producer is
//! acknowledged, and leaves only after the relay said it is durable.
//!
//! * [`db`] opens the database (WAL, synchronous level, limits) and runs migrations.
//! * [`writer`] is the one writer: a dedicated thread fed by a bounded channel that
//!   commits many records per transaction (group commit), assigns each its CloudEvent id
//!   and `sequence` once, and settles records the relay answered for.
//! * [`reader`] reads batches for the uplink on its own connection (WAL lets it read
//!   while the writer writes).
//! * [`dead_letters`] lists, re-queues and deletes dead letters from another process
//!   (`pigeon-gateway dead-letter …`), safely while the gateway runs.
//! * [`pack`] stores events compactly: compressed against a dictionary of recent events
//!   of the same kind, so that a stream of readings does not wear out an SD card.
//! * [`marks`] remembers the last committed PUBLISH per MQTT session and packet id, to
//!   recognise a broker's re-delivery after a lost PUBACK.
//! * [`depth`] caches how much is waiting, for metrics, status and heartbeats.
//! * [`rule_state`] runs the edge rules in the writer: the groups' states saved with
//!   the readings that changed them, the derived events stored with them.
//! * [`quota`] keeps the outbox and the spool within their disk budget, dropping the
//!   oldest data of the lowest priority where its route allows.

/// SQL for a record's event type, packed or not (a packed record's is its dictionary's).
macro_rules! record_type {
    () => {
        "CASE WHEN packed IS NULL THEN type ELSE (SELECT type FROM dictionaries WHERE id = packed) END"
    };
}

pub(crate) mod db;
pub(crate) mod dead_letters;
pub(crate) mod depth;
pub(crate) mod marks;
pub(crate) mod pack;
pub(crate) mod quota;
pub(crate) mod reader;
pub(crate) mod rule_state;
pub(crate) mod writer;

use std::sync::Arc;

use bytes::Bytes;

pub(crate) use depth::{Depth, DepthCache};
pub(crate) use reader::{OutboxReader, Pending};
pub(crate) use writer::{Appended, OutboxWriter};

/// A path as the bytes SQLite keeps it as (file names need not be UTF-8).
pub(crate) fn path_bytes(p: &std::path::Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes()
}

/// The inverse of [`path_bytes`].
pub(crate) fn path_from_bytes(b: Vec<u8>) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStringExt;
    std::path::PathBuf::from(std::ffi::OsString::from_vec(b))
}

/// A record a source wants committed.
#[derive(Debug, Clone)]
pub(crate) struct NewRecord {
    /// CloudEvent `source`, e.g. `/gateways/pi-1/mqtt`.
    pub(crate) source: String,
    pub(crate) event_type: String,
    pub(crate) subject: Option<String>,
    /// Receive time, microseconds since the Unix epoch.
    pub(crate) time_us: i64,
    /// `application/json` when `data` is a JSON document; otherwise binary data.
    pub(crate) content_type: Option<String>,
    pub(crate) data: Bytes,
    /// When the record stops being worth sending (µs since the epoch): the route's TTL
    /// after receipt. Expired records are dropped before upload, and counted.
    pub(crate) expires_us: Option<i64>,
    /// Set for MQTT messages, to recognise a broker's re-delivery of a message that was
    /// committed but whose acknowledgement was lost (a crash between commit and PUBACK).
    pub(crate) delivery: Option<DeliveryMark>,
    /// Set for files: the record's `data` describes the file, which waits in the spool.
    pub(crate) file: Option<Box<NewFile>>,
    /// Its route's priority and what a full outbox does with it.
    pub(crate) policy: Policy,
}

/// How a route's records are treated when there is more to send than time or room:
/// `priority` orders the upload (higher first) and the drops (lower first);
/// `when_full` says whether a full outbox may drop them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// 0 (least) to 9 (most important).
    pub(crate) priority: u8,
    pub(crate) when_full: WhenFull,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            priority: DEFAULT_PRIORITY,
            when_full: WhenFull::DropOldest,
        }
    }
}

/// The priority of routes that do not say.
pub(crate) const DEFAULT_PRIORITY: u8 = 5;

/// What a full outbox (`outbox.max_bytes`, `outbox.min_free`) does with a route's records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WhenFull {
    /// Make room by dropping the oldest records of the lowest priority (this route's
    /// own included; never a higher priority's); a new record that still does not fit is
    /// dropped itself. Every drop is logged and counted.
    #[default]
    DropOldest,
    /// Never drop this route's records: while there is no room its new data is not
    /// taken (MQTT messages are not acknowledged, so the broker keeps them; files stay
    /// in their drop directory).
    Refuse,
}

/// A file in the spool that a record describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileRef {
    /// Its name in the spool directory.
    pub(crate) spool: String,
    pub(crate) size: u64,
    pub(crate) sha256: [u8; 32],
    /// Where it goes once the relay has it; `None`: it is deleted.
    pub(crate) move_to: Option<std::path::PathBuf>,
}

/// A file record about to be committed.
#[derive(Debug, Clone)]
pub(crate) struct NewFile {
    pub(crate) file: FileRef,
    /// For files left in place (`after_upload = "keep"`): remember them as sent.
    pub(crate) kept: Option<KeptFile>,
    /// The file was copied into the spool and its original is to be deleted from the
    /// drop directory once this record is committed: its claim stays (marked committed)
    /// until that is done, so that a crash in between neither loses nor resends it.
    pub(crate) release_original: bool,
}

/// A file left in its drop directory that was sent: a scan that finds it unchanged
/// (same inode, size and modification time) does not send it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeptFile {
    pub(crate) path: std::path::PathBuf,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
}

/// A file on its way from a drop directory into the spool, recorded before it moves so
/// that a crash in between is finished (or undone) at the next start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileClaim {
    /// The name it gets in the spool directory.
    pub(crate) spool: String,
    pub(crate) watch: String,
    /// Absolute path in the drop directory.
    pub(crate) original: std::path::PathBuf,
    /// `original` relative to the watched directory.
    pub(crate) rel: std::path::PathBuf,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    /// Copied (the original stays) rather than moved.
    pub(crate) copy: bool,
    /// The original's size and modification time when it was claimed.
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
    /// Its record is committed; only the original is left to delete.
    pub(crate) committed: bool,
    pub(crate) claimed_us: i64,
    /// The watch's policy (its priority decides what a full outbox may drop for it).
    pub(crate) policy: Policy,
}

/// What identifies one MQTT delivery: the broker re-sends an unacknowledged message with
/// the same packet id and the DUP flag set.
#[derive(Debug, Clone)]
pub(crate) struct DeliveryMark {
    /// The MQTT session (client id) the packet id belongs to.
    pub(crate) session: Arc<str>,
    pub(crate) pkid: u16,
    pub(crate) dup: bool,
    /// SHA-256 of topic and payload, its first 8 bytes: a message is taken for a
    /// re-delivery only with the DUP flag, the same packet id and the same 8 bytes.
    pub(crate) digest: [u8; 8],
}

/// A committed record, as the uplink reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) seq: u64,
    pub(crate) id: uuid::Uuid,
    pub(crate) source: String,
    pub(crate) event_type: String,
    pub(crate) subject: Option<String>,
    pub(crate) time_us: i64,
    pub(crate) content_type: Option<String>,
    pub(crate) data: Vec<u8>,
    /// For a file record: the spooled file.
    pub(crate) file: Option<FileRef>,
    /// Its route's priority (0–9).
    pub(crate) priority: u8,
}

/// An outbox operation that failed. Cloned to every waiter of a failed group commit.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum OutboxError {
    #[error("outbox database error: {0}")]
    Db(#[from] Arc<rusqlite::Error>),
    #[error("cannot create the data directory {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("there is no outbox at {path} (has the gateway ever run with this data_dir?)")]
    Missing { path: String },
    #[error(
        "the outbox has no schema yet (the gateway has not finished its first start); try again once it runs"
    )]
    NotMigrated,
    #[error("the outbox writer has stopped")]
    Closed,
    #[error(
        "the outbox was written by a newer pigeon-gateway (schema {found}, this one knows {known}); upgrade, or move the database aside"
    )]
    TooNew { found: i64, known: i64 },
    #[error("the outbox database is damaged: {0}")]
    Corrupt(String),
    #[error(
        "the outbox is full (outbox.max_bytes or outbox.min_free) and its route does not let older data be dropped (when_full = \"refuse\")"
    )]
    Full,
}

impl OutboxError {
    /// Whether the database file itself is damaged (as opposed to locked, full, missing).
    pub(crate) fn is_corruption(&self) -> bool {
        match self {
            OutboxError::Corrupt(_) => true,
            OutboxError::Db(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            ),
            _ => false,
        }
    }
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(Arc::new(e))
    }
}

/// Every `every`, drops the records whose TTL ran out (unsent), logging what and how
/// many. Runs until aborted.
pub(crate) async fn expire_loop(writer: OutboxWriter, every: std::time::Duration) {
    loop {
        tokio::time::sleep(every).await;
        match writer.expire(chrono::Utc::now().timestamp_micros()).await {
            Ok(counts) => {
                for (event_type, n) in counts {
                    tracing::warn!(
                        events = n,
                        r#type = %event_type,
                        "Dropped events unsent: they waited longer than their time to live (mqtt.subscriptions.ttl)."
                    );
                }
            }
            Err(OutboxError::Closed) => return,
            Err(e) => tracing::error!(error = %e, "Could not drop expired events; retrying."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch lane's and a full outbox's queries of a non-default priority use the
    /// priority index; those of the default priority (left out of it) walk sequences.
    #[test]
    fn priority_queries_use_the_index_and_the_default_priority_walks_sequences() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        db::migrate(&mut conn).unwrap();
        let plan = |sql: &str| -> String {
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let n = st.parameter_count();
            let args: Vec<i64> = vec![1; n];
            st.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("; ")
        };
        for sql in [reader::READ_LANE, reader::OLDEST_OF, quota::EVICTABLE] {
            let p = plan(sql);
            assert!(p.contains("USING INDEX records_priority"), "{p}: {sql}");
            assert!(!p.contains("TEMP B-TREE"), "{p}: {sql}");
        }
        for sql in [
            reader::READ_LANE_DEFAULT,
            reader::OLDEST_DEFAULT,
            quota::EVICTABLE_DEFAULT,
        ] {
            let p = plan(sql);
            assert!(p.contains("USING INTEGER PRIMARY KEY"), "{p}: {sql}");
        }
    }
}
