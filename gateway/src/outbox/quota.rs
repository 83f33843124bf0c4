//! The outbox's disk budget (`outbox.max_bytes`, `outbox.min_free`): how much room there
//! is, and making room by dropping the oldest records of the lowest priority, as their
//! routes allow. Runs on the writer thread, inside the writer's transactions.
//!
//! What counts as used: the database's pages in use (page count less free pages, so
//! deleted rows give their room back) and the bytes of the files in the spool (kept as a
//! running sum, set from the tables at start and every minute, since `pigeon-gateway
//! dead-letter purge` deletes from another process). The write-ahead log comes on top:
//! checkpoints keep it to about 4 MiB, `journal_size_limit` truncates it to 16 MiB.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, params};

/// How often the spool's byte count is set again from the tables.
const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// Records looked at per eviction query.
const EVICT_CHUNK: i64 = 256;

/// The configured budget.
#[derive(Debug, Clone)]
pub struct QuotaSettings {
    /// Most bytes the outbox and the spool may use; `None`: no cap.
    pub max_bytes: Option<u64>,
    /// Bytes to keep free on the filesystems of the data dir and the spool; `None`: 100
    /// MiB, or 5% of a smaller filesystem.
    pub min_free: Option<u64>,
    pub data_dir: PathBuf,
    pub spool_dir: PathBuf,
}

/// The `min_free` of a filesystem of `total` bytes when none is configured.
fn default_min_free(total: u64) -> u64 {
    (100u64 << 20).min(total / 20)
}

/// What is about to come: rows into the database (their data and [`ROW_OVERHEAD`]) and
/// file bytes into the spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Incoming {
    pub rows: u64,
    pub files: u64,
}

/// What was dropped to make room, by event type: (count, bytes, oldest receive time).
pub type Dropped = Vec<(String, u64, u64, i64)>;

/// The budget and the writer's running count of spool bytes.
#[derive(Debug)]
pub struct Quota {
    settings: QuotaSettings,
    /// Whether the spool is on the data dir's filesystem.
    same_fs: bool,
    spool_bytes: u64,
    synced_at: Instant,
}

/// The database's pages: in use, and free (reused before the file grows), in bytes.
struct Pages {
    used: u64,
    free: u64,
}

const SPOOL_BYTES: &str = "SELECT
    (SELECT coalesce(sum(file_size), 0) FROM records WHERE file IS NOT NULL)
  + (SELECT coalesce(sum(file_size), 0) FROM dead_letters WHERE file IS NOT NULL)
  + (SELECT coalesce(sum(size), 0) FROM file_claims WHERE committed = 0)";
const EVICTABLE: &str = "SELECT seq, type, length(data), file, coalesce(file_size, 0), time_us
    FROM records WHERE evictable = 1 AND priority <= ?1 ORDER BY priority, seq LIMIT ?2";
const DELETE: &str = "DELETE FROM records WHERE seq = ?1";

impl Quota {
    pub fn new(settings: QuotaSettings, conn: &Connection) -> rusqlite::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &PathBuf| std::fs::metadata(p).map(|m| m.dev()).ok();
        let same_fs = match (dev(&settings.data_dir), dev(&settings.spool_dir)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        Ok(Self {
            spool_bytes: spool_bytes(conn)?,
            same_fs,
            settings,
            synced_at: Instant::now(),
        })
    }

    /// Counts `n` more (positive) or fewer bytes in the spool.
    pub fn add_spool(&mut self, n: i64) {
        self.spool_bytes = self.spool_bytes.saturating_add_signed(n);
    }

    /// Sets the spool count from the tables if it has not been for a while.
    pub fn maybe_resync(&mut self, conn: &Connection) {
        if self.synced_at.elapsed() >= RESYNC_EVERY
            && let Ok(n) = spool_bytes(conn)
        {
            self.spool_bytes = n;
            self.synced_at = Instant::now();
        }
    }

    fn pages(tx: &Connection) -> Pages {
        let get = |pragma: &str| -> u64 {
            tx.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get::<_, i64>(0))
                .map_or(0, |v| v.max(0) as u64)
        };
        let (count, free, size) = (get("page_count"), get("freelist_count"), get("page_size"));
        Pages {
            used: count.saturating_sub(free) * size,
            free: free * size,
        }
    }

    /// The outbox's and the spool's bytes now (inside `tx`, so rows deleted in it count
    /// as gone).
    pub fn used(&self, tx: &Connection) -> u64 {
        Self::pages(tx).used + self.spool_bytes
    }

    /// Bytes that must be freed before `inc` fits: over `max_bytes`, or under `min_free`
    /// on either filesystem. `freeing`: spool bytes about to be deleted. 0: it fits.
    fn shortfall_with(&self, tx: &Connection, inc: Incoming, freeing: u64) -> u64 {
        let pages = Self::pages(tx);
        let mut need = 0;
        if let Some(max) = self.settings.max_bytes {
            let used = (pages.used + self.spool_bytes).saturating_sub(freeing);
            need = (used + inc.rows + inc.files).saturating_sub(max);
        }
        // New rows take free pages before the database file grows.
        let growth = inc.rows.saturating_sub(pages.free);
        let short = |dir: &PathBuf, takes: u64, gives: u64| {
            crate::host::disk_space(dir).map_or(0, |d| {
                let keep = self
                    .settings
                    .min_free
                    .unwrap_or_else(|| default_min_free(d.total_bytes));
                (keep + takes).saturating_sub(d.free_bytes + gives)
            })
        };
        if self.same_fs {
            need = need.max(short(&self.settings.data_dir, growth + inc.files, freeing));
        } else {
            need = need
                .max(short(&self.settings.data_dir, growth, 0))
                .max(short(&self.settings.spool_dir, inc.files, freeing));
        }
        need
    }

    /// Bytes that must be freed before `inc` fits (0: it fits).
    pub fn shortfall(&self, tx: &Connection, inc: Incoming) -> u64 {
        self.shortfall_with(tx, inc, 0)
    }

    /// Makes room for `inc` by dropping records a full outbox may drop, of priority
    /// `priority` or lower, lowest priority and oldest first — or drops nothing, if even
    /// all of them would not make enough room. Files' spool files are deleted before the
    /// transaction commits (a record without its file is recognised at upload; a file
    /// without its record would be sent again as a recovered file). Adds what it dropped
    /// to `dropped`; returns whether `inc` fits now.
    pub fn make_room(
        &mut self,
        tx: &Transaction<'_>,
        priority: u8,
        inc: Incoming,
        dropped: &mut Dropped,
    ) -> rusqlite::Result<bool> {
        if self.shortfall(tx, inc) == 0 {
            return Ok(true);
        }
        tx.execute_batch("SAVEPOINT make_room")?;
        let mut files: Vec<(String, u64)> = Vec::new();
        let mut these: Dropped = Vec::new();
        let mut freeing = 0u64;
        let fits = loop {
            if self.shortfall_with(tx, inc, freeing) == 0 {
                break true;
            }
            let rows: Vec<(i64, String, i64, Option<String>, i64, i64)> = tx
                .prepare_cached(EVICTABLE)?
                .query_map(params![priority, EVICT_CHUNK], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            if rows.is_empty() {
                break false;
            }
            let mut delete = tx.prepare_cached(DELETE)?;
            let mut look = false;
            for (i, (seq, ty, data_len, file, file_size, time_us)) in rows.into_iter().enumerate() {
                // Look again after a file, and every few rows, so that little more is
                // dropped than needed.
                if (look || (i > 0 && i % 16 == 0)) && self.shortfall_with(tx, inc, freeing) == 0 {
                    break;
                }
                delete.execute([seq])?;
                look = file.is_some();
                if let Some(name) = file {
                    files.push((name, file_size as u64));
                    freeing += file_size as u64;
                }
                let bytes = data_len as u64 + file_size as u64 + ROW_OVERHEAD;
                match these.iter_mut().find(|d| d.0 == ty) {
                    Some(d) => {
                        d.1 += 1;
                        d.2 += bytes;
                        d.3 = d.3.min(time_us);
                    }
                    None => these.push((ty, 1, bytes, time_us)),
                }
            }
        };
        if !fits {
            // Dropping everything allowed would not be enough: drop nothing.
            tx.execute_batch("ROLLBACK TO make_room; RELEASE make_room")?;
            return Ok(false);
        }
        tx.execute_batch("RELEASE make_room")?;
        for (name, size) in files {
            let _ = std::fs::remove_file(self.settings.spool_dir.join(name));
            self.add_spool(-(size as i64));
        }
        for d in these {
            match dropped.iter_mut().find(|x| x.0 == d.0) {
                Some(x) => {
                    x.1 += d.1;
                    x.2 += d.2;
                    x.3 = x.3.min(d.3);
                }
                None => dropped.push(d),
            }
        }
        Ok(true)
    }
}

/// What a row takes beside its data, as counted for a record about to be written.
pub const ROW_OVERHEAD: u64 = 160;

fn spool_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(SPOOL_BYTES, [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
}
