//! Reading the outbox for the uplink, on a connection of its own.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags};

use super::{FileClaim, FileRef, KeptFile, OutboxError, Record, db, path_bytes, path_from_bytes};

/// The uplink's read connection. Calls block: run them on `spawn_blocking`.
pub struct OutboxReader {
    conn: Mutex<Connection>,
}

/// How much is waiting in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Records, files included.
    pub count: u64,
    /// Bytes to upload: record data, and for files the file's size.
    pub bytes: u64,
    /// Of `count`, files (their bytes wait in the spool).
    pub files: u64,
    /// Of `bytes`, those of files.
    pub file_bytes: u64,
    /// The lowest sequence still waiting, if any.
    pub min_seq: Option<u64>,
    /// Receive time of the oldest waiting record (µs since the epoch).
    pub oldest_time_us: Option<i64>,
}

/// Events for the batch lane: everything but files, which have a lane of their own.
const READ_AFTER: &str = "SELECT seq, id, source, type, subject, time_us, content_type, data,
    file, file_size, file_sha256, file_move_to
    FROM records WHERE seq > ?1 AND file IS NULL ORDER BY seq LIMIT ?2";
const READ_FILES_AFTER: &str = "SELECT seq, id, source, type, subject, time_us, content_type,
    data, file, file_size, file_sha256, file_move_to
    FROM records WHERE seq > ?1 AND file IS NOT NULL ORDER BY seq LIMIT ?2";
const MIN_SEQ: &str = "SELECT min(seq) FROM records";
const DEAD_LETTERS: &str = "SELECT count(*) FROM dead_letters";
const PENDING: &str = "SELECT count(*), coalesce(sum(coalesce(file_size, length(data))), 0),
    min(seq), (SELECT time_us FROM records ORDER BY seq LIMIT 1),
    count(file), coalesce(sum(file_size), 0) FROM records";
const CLAIMS: &str = "SELECT spool, watch, original, rel, dev, ino, copy, size, mtime_ns,
    committed, claimed_us FROM file_claims ORDER BY spool";
const KEPT: &str = "SELECT dev, ino, size, mtime_ns FROM kept_files WHERE path = ?1";
const ALL_KEPT: &str = "SELECT path FROM kept_files";
const SPOOL_NAMES: &str = "SELECT file FROM records WHERE file IS NOT NULL
    UNION ALL SELECT file FROM dead_letters WHERE file IS NOT NULL
    UNION ALL SELECT spool FROM file_claims";

impl OutboxReader {
    /// Opens a read connection to a database the writer has already migrated.
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "cache_size", -1024)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection inconsistent
        // (each call is one statement), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The producer id sequences are assigned under.
    pub fn producer_id(&self) -> Result<String, OutboxError> {
        db::producer_id(&self.conn())
    }

    /// Up to `max_events` records (not files) with a sequence above `after`, in sequence
    /// order, stopping before `max_bytes` of data is exceeded (but always at least one
    /// record).
    pub fn read_after(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, OutboxError> {
        self.read(READ_AFTER, after, max_events, max_bytes)
    }

    /// Up to `max_files` file records with a sequence above `after`, in sequence order.
    pub fn read_files_after(
        &self,
        after: u64,
        max_files: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        self.read(READ_FILES_AFTER, after, max_files, u64::MAX)
    }

    /// The lowest sequence still in the outbox (of any lane): every sequence below it has
    /// had its answer from the relay, or expired.
    pub fn min_seq(&self) -> Result<Option<u64>, OutboxError> {
        let conn = self.conn();
        Ok(conn
            .query_row(MIN_SEQ, [], |r| r.get::<_, Option<i64>>(0))?
            .map(|s| s as u64))
    }

    fn read(
        &self,
        sql: &str,
        after: u64,
        max_events: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query((after as i64, max_events as i64))?;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        while let Some(row) = rows.next()? {
            let data: Vec<u8> = row.get(7)?;
            bytes += data.len() as u64;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            let mut rec = record_from_row(row)?;
            rec.data = data;
            out.push(rec);
        }
        Ok(out)
    }

    /// Files that were on their way into the spool when the gateway last stopped.
    pub fn claims(&self) -> Result<Vec<FileClaim>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(CLAIMS)?;
        let rows = stmt.query_map([], |r| {
            Ok(FileClaim {
                spool: r.get(0)?,
                watch: r.get(1)?,
                original: path_from_bytes(r.get(2)?),
                rel: path_from_bytes(r.get(3)?),
                dev: r.get::<_, i64>(4)? as u64,
                ino: r.get::<_, i64>(5)? as u64,
                copy: r.get(6)?,
                size: r.get::<_, i64>(7)? as u64,
                mtime_ns: r.get(8)?,
                committed: r.get(9)?,
                claimed_us: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The mark of a kept file at `path`, if it was sent.
    pub fn kept(&self, path: &Path) -> Result<Option<KeptFile>, OutboxError> {
        use rusqlite::OptionalExtension;
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(KEPT)?;
        Ok(stmt
            .query_row([path_bytes(path)], |r| {
                Ok(KeptFile {
                    path: path.to_owned(),
                    dev: r.get::<_, i64>(0)? as u64,
                    ino: r.get::<_, i64>(1)? as u64,
                    size: r.get::<_, i64>(2)? as u64,
                    mtime_ns: r.get(3)?,
                })
            })
            .optional()?)
    }

    /// Every path with a kept-file mark.
    pub fn kept_paths(&self) -> Result<Vec<std::path::PathBuf>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(ALL_KEPT)?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0).map(path_from_bytes))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every spool file name the outbox refers to: records, dead letters and claims.
    pub fn spool_names(&self) -> Result<std::collections::HashSet<String>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(SPOOL_NAMES)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many records the relay rejected (kept in the dead-letter table).
    pub fn dead_letters(&self) -> Result<u64, OutboxError> {
        let conn = self.conn();
        Ok(conn.query_row(DEAD_LETTERS, [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// What is waiting to be uploaded.
    pub fn pending(&self) -> Result<Pending, OutboxError> {
        let conn = self.conn();
        Ok(conn.query_row(PENDING, [], |r| {
            Ok(Pending {
                count: r.get::<_, i64>(0)? as u64,
                bytes: r.get::<_, i64>(1)? as u64,
                min_seq: r.get::<_, Option<i64>>(2)?.map(|s| s as u64),
                oldest_time_us: r.get(3)?,
                files: r.get::<_, i64>(4)? as u64,
                file_bytes: r.get::<_, i64>(5)? as u64,
            })
        })?)
    }
}

/// A record from a row of [`READ_AFTER`]'s columns (its `data` left empty: the caller
/// takes it).
fn record_from_row(row: &rusqlite::Row<'_>) -> Result<Record, rusqlite::Error> {
    let id: Vec<u8> = row.get(1)?;
    let id = uuid::Uuid::from_slice(&id).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(16, rusqlite::types::Type::Blob, Box::new(e))
    })?;
    let file = match row.get::<_, Option<String>>(8)? {
        None => None,
        Some(spool) => {
            let sha: Vec<u8> = row.get(10)?;
            let sha256 = <[u8; 32]>::try_from(sha).map_err(|_| {
                rusqlite::Error::FromSqlConversionFailure(
                    10,
                    rusqlite::types::Type::Blob,
                    "a file digest is not 32 bytes".into(),
                )
            })?;
            Some(FileRef {
                spool,
                size: row.get::<_, i64>(9)? as u64,
                sha256,
                move_to: row.get::<_, Option<Vec<u8>>>(11)?.map(path_from_bytes),
            })
        }
    };
    Ok(Record {
        seq: row.get::<_, i64>(0)? as u64,
        id,
        source: row.get(2)?,
        event_type: row.get(3)?,
        subject: row.get(4)?,
        time_us: row.get(5)?,
        content_type: row.get(6)?,
        data: Vec::new(),
        file,
    })
}
