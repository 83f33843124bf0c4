//! Reading the outbox for the uplink, on a connection of its own.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags};

use super::{OutboxError, Record, db};

/// The uplink's read connection. Calls block: run them on `spawn_blocking`.
pub struct OutboxReader {
    conn: Mutex<Connection>,
}

/// How much is waiting in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    pub count: u64,
    pub bytes: u64,
    /// The lowest sequence still waiting, if any.
    pub min_seq: Option<u64>,
    /// Receive time of the oldest waiting record (µs since the epoch).
    pub oldest_time_us: Option<i64>,
}

const READ_AFTER: &str = "SELECT seq, id, source, type, subject, time_us, content_type, data
    FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2";
const DEAD_LETTERS: &str = "SELECT count(*) FROM dead_letters";
const PENDING: &str = "SELECT count(*), coalesce(sum(length(data)), 0), min(seq),
    (SELECT time_us FROM records ORDER BY seq LIMIT 1) FROM records";

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

    /// Up to `max_events` records with a sequence above `after`, in sequence order,
    /// stopping before `max_bytes` of data is exceeded (but always at least one record).
    pub fn read_after(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: u64,
    ) -> Result<Vec<Record>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(READ_AFTER)?;
        let mut rows = stmt.query((after as i64, max_events as i64))?;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        while let Some(row) = rows.next()? {
            let data: Vec<u8> = row.get(7)?;
            bytes += data.len() as u64;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            let id: Vec<u8> = row.get(1)?;
            let id = uuid::Uuid::from_slice(&id).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    16,
                    rusqlite::types::Type::Blob,
                    Box::new(e),
                )
            })?;
            out.push(Record {
                seq: row.get::<_, i64>(0)? as u64,
                id,
                source: row.get(2)?,
                event_type: row.get(3)?,
                subject: row.get(4)?,
                time_us: row.get(5)?,
                content_type: row.get(6)?,
                data,
            });
        }
        Ok(out)
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
            })
        })?)
    }
}
