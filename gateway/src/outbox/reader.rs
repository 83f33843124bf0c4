//! Reading the outbox for the uplink, on a connection of its own.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags};

use super::pack::{Unpacker, derived_id};
use super::{
    DEFAULT_PRIORITY, FileClaim, FileRef, KeptFile, OutboxError, Record, db, path_bytes,
    path_from_bytes,
};

/// The uplink's read connection. Calls block: run them on `spawn_blocking`.
pub(crate) struct OutboxReader {
    conn: Mutex<Connection>,
    learnt: Mutex<Learnt>,
    /// Dictionaries of packed events (taken while `conn` is held).
    unpacker: Mutex<Unpacker>,
    /// The producer id, once read (packed events' ids derive from it).
    producer: std::sync::OnceLock<String>,
}

/// What the reader has learnt about where the default priority's events are not.
///
/// Records of [`DEFAULT_PRIORITY`] — what every route has unless it says otherwise — are
/// kept out of the priority index, so that the common case writes no index at all; they
/// are found by scanning sequences instead. A scan that found none of them in a range of
/// sequences stays true: sequences are only ever assigned above every existing one, and
/// rows are only ever deleted. So scans start where the last one found nothing.
#[derive(Debug, Default)]
struct Learnt {
    /// No default-priority events with `lo < seq <= hi`.
    lane_gap: (u64, u64),
    /// No default-priority events with `seq <= oldest_floor`.
    oldest_floor: u64,
}

/// Priorities, 0 to 9.
pub(crate) const PRIORITIES: u8 = 10;

/// Per priority, the highest sequence of that priority the batch lane has sent.
pub(crate) type Cursors = [u64; PRIORITIES as usize];

/// How much is waiting in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    /// Records, files included.
    pub(crate) count: u64,
    /// Bytes to upload: record data, and for files the file's size.
    pub(crate) bytes: u64,
    /// Of `count`, files (their bytes wait in the spool).
    pub(crate) files: u64,
    /// Of `bytes`, those of files.
    pub(crate) file_bytes: u64,
    /// The lowest sequence still waiting, if any.
    pub(crate) min_seq: Option<u64>,
    /// Receive time of the oldest waiting record (µs since the epoch).
    pub(crate) oldest_time_us: Option<i64>,
}

/// Events for the batch lane — everything but files, which have a lane of their own — in
/// sequence order, whatever their priority (tests read the outbox with it).
#[cfg(test)]
const READ_AFTER: &str = "SELECT seq, id, source, type, subject, time_us, content_type, data,
    file, file_size, file_sha256, file_move_to, priority, packed
    FROM records WHERE seq > ?1 AND file IS NULL ORDER BY seq LIMIT ?2";
/// The batch lane's events of one priority after its cursor, by the priority index (the
/// literal `priority <> 5` lets SQLite use it: the index leaves out the default priority).
pub(crate) const READ_LANE: &str =
    "SELECT seq, id, source, type, subject, time_us, content_type, data,
    file, file_size, file_sha256, file_move_to, priority, packed
    FROM records WHERE priority = ?3 AND priority <> 5 AND file IS NULL AND seq > ?1
    ORDER BY seq LIMIT ?2";
/// The batch lane's events of the default priority, from its cursor up to a sequence.
pub(crate) const READ_LANE_DEFAULT: &str = "SELECT seq, id, source, type, subject, time_us,
    content_type, data, file, file_size, file_sha256, file_move_to, priority, packed
    FROM records WHERE seq > ?1 AND seq <= ?3 AND file IS NULL AND priority = 5
    ORDER BY seq LIMIT ?2";
// The queries above spell the default priority out, for SQLite to match the index's
// condition.
const _: () = assert!(DEFAULT_PRIORITY == 5);
const MAX_SEQ: &str = "SELECT coalesce(max(seq), 0) FROM records";
/// Files, most important first, then oldest first.
const READ_FILES: &str = "SELECT seq, id, source, type, subject, time_us, content_type,
    data, file, file_size, file_sha256, file_move_to, priority, packed
    FROM records WHERE file IS NOT NULL ORDER BY priority DESC, seq LIMIT ?2 OFFSET ?1";
const MIN_SEQ: &str = "SELECT min(seq) FROM records";
pub(crate) const OLDEST_OF: &str = "SELECT time_us FROM records
    WHERE priority = ?1 AND priority <> 5 AND file IS NULL ORDER BY seq LIMIT 1";
/// The oldest default-priority event, searched for above a sequence and up to one.
pub(crate) const OLDEST_DEFAULT: &str = "SELECT seq, time_us FROM records
    WHERE seq > ?1 AND seq <= ?2 AND file IS NULL AND priority = 5 ORDER BY seq LIMIT 1";
const DEAD_LETTERS: &str = "SELECT count(*) FROM dead_letters";
const PENDING: &str = "SELECT count(*), coalesce(sum(coalesce(file_size, length(data))), 0),
    min(seq), (SELECT time_us FROM records ORDER BY seq LIMIT 1),
    count(file), coalesce(sum(file_size), 0) FROM records";
const CLAIMS: &str = "SELECT spool, watch, original, rel, dev, ino, copy, size, mtime_ns,
    committed, claimed_us, priority FROM file_claims ORDER BY spool";
const KEPT: &str = "SELECT dev, ino, size, mtime_ns FROM kept_files WHERE path = ?1";
const ALL_KEPT: &str = "SELECT path FROM kept_files";
const SPOOL_NAMES: &str = "SELECT file FROM records WHERE file IS NOT NULL
    UNION ALL SELECT file FROM dead_letters WHERE file IS NOT NULL
    UNION ALL SELECT spool FROM file_claims";

impl OutboxReader {
    /// Opens a read connection to a database the writer has already migrated.
    pub(crate) fn open(path: &Path) -> Result<Self, OutboxError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "cache_size", -1024)?;
        Ok(Self {
            conn: Mutex::new(conn),
            learnt: Mutex::new(Learnt::default()),
            unpacker: Mutex::new(Unpacker::default()),
            producer: std::sync::OnceLock::new(),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection inconsistent
        // (each call is one statement), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn learnt(&self) -> std::sync::MutexGuard<'_, Learnt> {
        // Plain numbers, each consistent on its own.
        self.learnt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The highest sequence in the outbox now (0 when it is empty).
    fn max_seq(conn: &Connection) -> Result<u64, OutboxError> {
        let mut stmt = conn.prepare_cached(MAX_SEQ)?;
        Ok(stmt.query_row([], |r| r.get::<_, i64>(0))?.max(0) as u64)
    }

    /// The batch lane's default-priority events after `cursor`, skipping what an earlier
    /// scan found empty; learns where the scan found nothing.
    fn read_lane_default(
        &self,
        cursor: u64,
        max_events: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, OutboxError> {
        let (lo, hi) = self.learnt().lane_gap;
        let from = if lo <= cursor && cursor < hi {
            hi
        } else {
            cursor
        };
        let top = Self::max_seq(&self.conn())?;
        if from >= top {
            return Ok(Vec::new());
        }
        let (rows, complete) =
            self.read(READ_LANE_DEFAULT, from, max_events, max_bytes, Some(top))?;
        if complete {
            // Nothing of the default priority above the last one found, up to `top`.
            let after = rows.last().map_or(from, |r| r.seq);
            let mut learnt = self.learnt();
            let (lo, hi) = learnt.lane_gap;
            learnt.lane_gap = if lo <= after && after <= hi {
                (lo, top.max(hi))
            } else {
                (after, top)
            };
        }
        Ok(rows)
    }

    /// Up to `max_events` records (not files) with a sequence above `after`, in sequence
    /// order whatever their priority, stopping before `max_bytes` of data is exceeded (but
    /// always at least one record).
    #[cfg(test)]
    pub(crate) fn read_after(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, OutboxError> {
        Ok(self.read(READ_AFTER, after, max_events, max_bytes, None)?.0)
    }

    /// The batch lane's next batch: up to `max_events` records (not files) and about
    /// `max_bytes` of data (always at least one record), taken priority by priority —
    /// highest first, or lowest first when `lowest_first` — each in sequence order after
    /// its cursor (the highest sequence of that priority sent so far).
    pub(crate) fn read_batch(
        &self,
        cursors: &Cursors,
        lowest_first: bool,
        max_events: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, OutboxError> {
        let mut out: Vec<Record> = Vec::new();
        let mut bytes = 0u64;
        let order: Vec<u8> = if lowest_first {
            (0..PRIORITIES).collect()
        } else {
            (0..PRIORITIES).rev().collect()
        };
        for p in order {
            if out.len() >= max_events || (!out.is_empty() && bytes >= max_bytes) {
                break;
            }
            let left = max_events - out.len();
            let cursor = cursors[p as usize];
            let more = if p == DEFAULT_PRIORITY {
                self.read_lane_default(cursor, left, max_bytes)?
            } else {
                self.read(READ_LANE, cursor, left, max_bytes, Some(p.into()))?
                    .0
            };
            for r in more {
                // At least one record, then only what keeps the batch under max_bytes.
                if !out.is_empty() && bytes + r.data.len() as u64 > max_bytes {
                    return Ok(out);
                }
                bytes += r.data.len() as u64;
                out.push(r);
            }
        }
        Ok(out)
    }

    /// File records, most important first and oldest first within a priority, from the
    /// `skip`-th on: up to `max_files`.
    pub(crate) fn read_files(
        &self,
        skip: usize,
        max_files: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        Ok(self
            .read(READ_FILES, skip as u64, max_files, u64::MAX, None)?
            .0)
    }

    /// Whether events (not files) of a priority above `priority` have waited since before
    /// `before_us` (receive time, µs): the batch lane is behind with more important data.
    pub(crate) fn behind_above(&self, priority: u8, before_us: i64) -> Result<bool, OutboxError> {
        use rusqlite::OptionalExtension;
        let conn = self.conn();
        for p in (priority.saturating_add(1)..PRIORITIES).rev() {
            let oldest: Option<i64> = if p == DEFAULT_PRIORITY {
                let floor = self.learnt().oldest_floor;
                let top = Self::max_seq(&conn)?;
                let mut stmt = conn.prepare_cached(OLDEST_DEFAULT)?;
                let found: Option<(i64, i64)> = stmt
                    .query_row([floor as i64, top as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                // None at or below the one found (or `top`): the next search starts there.
                let below = found.map_or(top, |(seq, _)| (seq as u64).saturating_sub(1));
                let mut learnt = self.learnt();
                learnt.oldest_floor = learnt.oldest_floor.max(below);
                found.map(|(_, t)| t)
            } else {
                let mut stmt = conn.prepare_cached(OLDEST_OF)?;
                stmt.query_row([p], |r| r.get(0)).optional()?
            };
            if oldest.is_some_and(|t| t < before_us) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The lowest sequence still in the outbox (of any lane): every sequence below it has
    /// had its answer from the relay, or expired.
    pub(crate) fn min_seq(&self) -> Result<Option<u64>, OutboxError> {
        let conn = self.conn();
        Ok(conn
            .query_row(MIN_SEQ, [], |r| r.get::<_, Option<i64>>(0))?
            .map(|s| s as u64))
    }

    /// Runs one of the record queries: `?1` is `after`, `?2` the row limit, and `?3`, when
    /// the query has one, `third`. Stops before `max_bytes` of data is exceeded (but takes
    /// at least one record). Also says whether the query ran out of rows before any limit
    /// stopped it (so nothing more matches).
    fn read(
        &self,
        sql: &str,
        after: u64,
        max_events: usize,
        max_bytes: u64,
        third: Option<u64>,
    ) -> Result<(Vec<Record>, bool), OutboxError> {
        let conn = self.conn();
        let producer = match self.producer.get() {
            Some(p) => p.clone(),
            None => {
                let p = db::producer_id(&conn)?;
                self.producer.get_or_init(|| p).clone()
            }
        };
        let mut unpacker = self.unpacker.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare_cached(sql)?;
        let limit = max_events.min(i64::MAX as usize) as i64;
        let mut rows = match third {
            Some(t) => stmt.query((after as i64, limit, t.min(i64::MAX as u64) as i64))?,
            None => stmt.query((after as i64, limit))?,
        };
        let mut out = Vec::new();
        let mut bytes = 0u64;
        while let Some(row) = rows.next()? {
            let mut rec = record_from_row(row)?;
            let data: Vec<u8> = row.get(7)?;
            match row.get::<_, Option<i64>>(13)? {
                None => rec.data = data,
                Some(dictionary) => {
                    let ev = unpacker.unpack(&conn, rec.seq, dictionary, &data)?;
                    rec.id = derived_id(&producer, rec.seq, rec.time_us);
                    rec.source = ev.kind.source;
                    rec.event_type = ev.kind.event_type;
                    rec.content_type = ev.kind.content_type;
                    rec.subject = ev.subject;
                    rec.data = ev.data;
                }
            }
            bytes += rec.data.len() as u64;
            if !out.is_empty() && bytes > max_bytes {
                return Ok((out, false));
            }
            out.push(rec);
        }
        let complete = out.len() < max_events;
        Ok((out, complete))
    }

    /// Files that were on their way into the spool when the gateway last stopped.
    pub(crate) fn claims(&self) -> Result<Vec<FileClaim>, OutboxError> {
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
                policy: crate::outbox::Policy {
                    priority: r.get(11)?,
                    when_full: crate::outbox::WhenFull::default(),
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The mark of a kept file at `path`, if it was sent.
    pub(crate) fn kept(&self, path: &Path) -> Result<Option<KeptFile>, OutboxError> {
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
    pub(crate) fn kept_paths(&self) -> Result<Vec<std::path::PathBuf>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(ALL_KEPT)?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0).map(path_from_bytes))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every spool file name the outbox refers to: records, dead letters and claims.
    pub(crate) fn spool_names(&self) -> Result<std::collections::HashSet<String>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(SPOOL_NAMES)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many records the relay rejected (kept in the dead-letter table).
    pub(crate) fn dead_letters(&self) -> Result<u64, OutboxError> {
        let conn = self.conn();
        Ok(conn.query_row(DEAD_LETTERS, [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// What is waiting to be uploaded.
    pub(crate) fn pending(&self) -> Result<Pending, OutboxError> {
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

/// A record from a row of [`READ_LANE`]'s columns (its `data` left empty: the caller
/// takes it).
fn record_from_row(row: &rusqlite::Row<'_>) -> Result<Record, rusqlite::Error> {
    let id: Vec<u8> = row.get(1)?;
    // A packed record's is empty: the caller derives it.
    let id = match id.is_empty() {
        true => uuid::Uuid::nil(),
        false => uuid::Uuid::from_slice(&id).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(16, rusqlite::types::Type::Blob, Box::new(e))
        })?,
    };
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
        priority: row.get(12)?,
    })
}
