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
pub(crate) struct QuotaSettings {
    /// Most bytes the outbox and the spool may use; `None`: no cap.
    pub(crate) max_bytes: Option<u64>,
    /// Bytes to keep free on the filesystems of the data dir and the spool; `None`: 100
    /// MiB, or 5% of a smaller filesystem.
    pub(crate) min_free: Option<u64>,
    pub(crate) data_dir: PathBuf,
    pub(crate) spool_dir: PathBuf,
}

/// The `min_free` of a filesystem of `total` bytes when none is configured.
fn default_min_free(total: u64) -> u64 {
    (100u64 << 20).min(total / 20)
}

/// What is about to come: rows into the database (their data and [`ROW_OVERHEAD`]) and
/// file bytes into the spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Incoming {
    pub(crate) rows: u64,
    pub(crate) files: u64,
}

/// What was dropped to make room, by event type.
#[derive(Debug, Default)]
pub(crate) struct Drops {
    types: Vec<TypeDrops>,
}

/// What was dropped of one event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TypeDrops {
    pub(crate) event_type: String,
    pub(crate) records: u64,
    pub(crate) bytes: u64,
    /// The oldest dropped record's receive time (µs since the epoch).
    pub(crate) oldest_us: i64,
}

impl Drops {
    /// Adds one dropped record (with its file, if any) of `bytes` received at `time_us`.
    pub(crate) fn count(&mut self, event_type: &str, bytes: u64, time_us: i64) {
        self.add(TypeDrops {
            event_type: event_type.to_owned(),
            records: 1,
            bytes,
            oldest_us: time_us,
        });
    }

    /// Adds everything in `other`.
    pub(crate) fn merge(&mut self, other: Drops) {
        for d in other.types {
            self.add(d);
        }
    }

    fn add(&mut self, d: TypeDrops) {
        match self.types.iter_mut().find(|x| x.event_type == d.event_type) {
            Some(x) => {
                x.records += d.records;
                x.bytes += d.bytes;
                x.oldest_us = x.oldest_us.min(d.oldest_us);
            }
            None => self.types.push(d),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// Records and bytes dropped, of every type.
    pub(crate) fn totals(&self) -> (u64, u64) {
        self.types
            .iter()
            .fold((0, 0), |(n, b), d| (n + d.records, b + d.bytes))
    }

    /// Empties it, by event type in the order they were first dropped.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = TypeDrops> + '_ {
        self.types.drain(..)
    }
}

/// The budget and the writer's running count of spool bytes.
#[derive(Debug)]
pub(crate) struct Quota {
    settings: QuotaSettings,
    /// Whether the spool is on the data dir's filesystem.
    same_fs: bool,
    spool_bytes: u64,
    synced_at: Instant,
    /// Room for rows known at the last measurement, and when: rounds that fit in it are
    /// let in without measuring again (pragmas, `statvfs`), for up to [`HEADROOM_FOR`].
    headroom: Option<(u64, Instant)>,
    /// No droppable records of the default priority at or below this sequence: they are
    /// not in the priority index and are searched for by sequence, from here (see
    /// `reader::Learnt` for why what a search found stays true). Set back to 0 when a
    /// round's transaction fails, since it may have been learnt inside it.
    default_floor: u64,
}

/// How long a measured headroom is trusted.
const HEADROOM_FOR: Duration = Duration::from_secs(1);
/// Bytes of headroom at which a round measures anyway: near the limits, every round does.
const HEADROOM_MIN: u64 = 8 << 20;

/// The database's pages: in use, and free (reused before the file grows), in bytes.
struct Pages {
    used: u64,
    free: u64,
}

const SPOOL_BYTES: &str = "SELECT
    (SELECT coalesce(sum(file_size), 0) FROM records WHERE file IS NOT NULL)
  + (SELECT coalesce(sum(file_size), 0) FROM dead_letters WHERE file IS NOT NULL)
  + (SELECT coalesce(sum(size), 0) FROM file_claims WHERE committed = 0)";
/// Droppable records of one priority after a sequence, by the priority index (which leaves
/// out the default priority; the literal `priority <> 5` lets SQLite use it).
pub(crate) const EVICTABLE: &str = concat!(
    "SELECT seq, ",
    record_type!(),
    ", length(data), file, coalesce(file_size, 0), time_us
    FROM records WHERE priority = ?1 AND priority <> 5 AND evictable = 1 AND seq > ?2
    ORDER BY seq LIMIT ?3"
);
/// Droppable records of the default priority after a sequence and up to one (`?1`).
pub(crate) const EVICTABLE_DEFAULT: &str = concat!(
    "SELECT seq, ",
    record_type!(),
    ", length(data), file, coalesce(file_size, 0),
    time_us FROM records WHERE seq > ?2 AND seq <= ?1 AND priority = 5 AND evictable = 1
    ORDER BY seq LIMIT ?3"
);
const _: () = assert!(super::DEFAULT_PRIORITY == 5);
const MAX_SEQ: &str = "SELECT coalesce(max(seq), 0) FROM records";
const DELETE: &str = "DELETE FROM records WHERE seq = ?1";

impl Quota {
    pub(crate) fn new(settings: QuotaSettings, conn: &Connection) -> rusqlite::Result<Self> {
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
            headroom: None,
            default_floor: 0,
        })
    }

    /// Counts `n` more (positive) or fewer bytes in the spool.
    pub(crate) fn add_spool(&mut self, n: i64) {
        self.spool_bytes = self.spool_bytes.saturating_add_signed(n);
    }

    /// Sets the spool count from the tables if it has not been for a while.
    pub(crate) fn maybe_resync(&mut self, conn: &Connection) {
        if self.synced_at.elapsed() >= RESYNC_EVERY
            && let Ok(n) = spool_bytes(conn)
        {
            self.spool_bytes = n;
            self.synced_at = Instant::now();
        }
    }

    fn pages(tx: &Connection) -> Pages {
        let get = |sql: &str| -> u64 {
            tx.prepare_cached(sql)
                .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
                .map_or(0, |v| v.max(0) as u64)
        };
        let (count, free, size) = (
            get("PRAGMA page_count"),
            get("PRAGMA freelist_count"),
            get("PRAGMA page_size"),
        );
        Pages {
            used: count.saturating_sub(free) * size,
            free: free * size,
        }
    }

    /// The outbox's and the spool's bytes now (inside `tx`, so rows deleted in it count
    /// as gone).
    pub(crate) fn used(&self, tx: &Connection) -> u64 {
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
    pub(crate) fn shortfall(&self, tx: &Connection, inc: Incoming) -> u64 {
        self.shortfall_with(tx, inc, 0)
    }

    /// Whether `rows` bytes of new rows fit, cheaply: from the headroom measured less
    /// than [`HEADROOM_FOR`] ago when there is plenty, else by measuring (and keeping the
    /// headroom found for the next rounds).
    pub(crate) fn rows_fit(&mut self, tx: &Connection, rows: u64) -> bool {
        if let Some((room, at)) = self.headroom
            && at.elapsed() < HEADROOM_FOR
            && room >= rows + HEADROOM_MIN
        {
            self.headroom = Some((room - rows, at));
            return true;
        }
        // How much more would fit: measured as the shortfall of a large probe.
        let probe = 1u64 << 40;
        let inc = Incoming {
            rows: probe,
            files: 0,
        };
        let room = probe.saturating_sub(self.shortfall_with(tx, inc, 0));
        let fits = room >= rows;
        self.headroom = fits.then(|| (room - rows, Instant::now()));
        fits
    }

    /// Forgets the measured headroom (after something took room other than rows).
    pub(crate) fn forget_headroom(&mut self) {
        self.headroom = None;
    }

    /// Forgets what was learnt during a transaction that did not commit.
    pub(crate) fn round_failed(&mut self) {
        self.headroom = None;
        self.default_floor = 0;
    }

    /// Up to [`EVICT_CHUNK`] droppable records of `priority` after sequence `after`, in
    /// sequence order.
    fn evictable(
        &mut self,
        tx: &Transaction<'_>,
        priority: u8,
        after: u64,
        first: bool,
    ) -> rusqlite::Result<Vec<Evictable>> {
        let row = |r: &rusqlite::Row<'_>| {
            Ok(Evictable {
                seq: r.get(0)?,
                ty: r.get(1)?,
                data_len: r.get::<_, i64>(2)?.max(0) as u64,
                file: r.get(3)?,
                file_size: r.get::<_, i64>(4)?.max(0) as u64,
                time_us: r.get(5)?,
            })
        };
        if priority != super::DEFAULT_PRIORITY {
            return tx
                .prepare_cached(EVICTABLE)?
                .query_map(params![priority, after as i64, EVICT_CHUNK], row)?
                .collect();
        }
        if !first {
            return tx
                .prepare_cached(EVICTABLE_DEFAULT)?
                .query_map(params![i64::MAX, after as i64, EVICT_CHUNK], row)?
                .collect();
        }
        // The first search of a call sees the outbox as it is before this call dropped
        // anything of the default priority: what it finds empty, stays empty.
        let top: i64 = tx.prepare_cached(MAX_SEQ)?.query_row([], |r| r.get(0))?;
        let rows: Vec<Evictable> = tx
            .prepare_cached(EVICTABLE_DEFAULT)?
            .query_map(params![top, after as i64, EVICT_CHUNK], row)?
            .collect::<rusqlite::Result<_>>()?;
        let below = rows
            .first()
            .map_or(top.max(0) as u64, |r| (r.seq as u64).saturating_sub(1));
        self.default_floor = self.default_floor.max(below);
        Ok(rows)
    }

    /// Makes room for `inc` by dropping records a full outbox may drop, of priority
    /// `priority` or lower, lowest priority and oldest first — or drops nothing, if even
    /// all of them would not make enough room. Files' spool files are deleted before the
    /// transaction commits (a record without its file is recognised at upload; a file
    /// without its record would be sent again as a recovered file). Adds what it dropped
    /// to `dropped`; returns whether `inc` fits now.
    pub(crate) fn make_room(
        &mut self,
        tx: &Transaction<'_>,
        priority: u8,
        inc: Incoming,
        dropped: &mut Drops,
    ) -> rusqlite::Result<bool> {
        if self.shortfall(tx, inc) == 0 {
            return Ok(true);
        }
        tx.execute_batch("SAVEPOINT make_room")?;
        let mut files: Vec<(String, u64)> = Vec::new();
        let mut these = Drops::default();
        let mut freeing = 0u64;
        // Lowest priority first, oldest first within one.
        let mut p = 0u8;
        let mut after = 0u64;
        let mut first = true;
        let fits = loop {
            if self.shortfall_with(tx, inc, freeing) == 0 {
                break true;
            }
            if first && p == super::DEFAULT_PRIORITY {
                after = self.default_floor;
            }
            let rows = self.evictable(tx, p, after, first)?;
            first = false;
            if rows.is_empty() {
                if p >= priority {
                    break false;
                }
                (p, after, first) = (p + 1, 0, true);
                continue;
            }
            let mut delete = tx.prepare_cached(DELETE)?;
            let mut look = false;
            for (i, r) in rows.into_iter().enumerate() {
                // Look again after a file, and every few rows, so that little more is
                // dropped than needed.
                if (look || (i > 0 && i % 16 == 0)) && self.shortfall_with(tx, inc, freeing) == 0 {
                    break;
                }
                delete.execute([r.seq])?;
                after = r.seq as u64;
                look = r.file.is_some();
                if let Some(name) = r.file {
                    files.push((name, r.file_size));
                    freeing += r.file_size;
                }
                let bytes = r.data_len + r.file_size + ROW_OVERHEAD;
                these.count(&r.ty, bytes, r.time_us);
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
        dropped.merge(these);
        Ok(true)
    }
}

/// A record a full outbox may drop.
struct Evictable {
    seq: i64,
    ty: String,
    data_len: u64,
    file: Option<String>,
    file_size: u64,
    time_us: i64,
}

/// What a row takes beside its data, as counted for a record about to be written.
pub(crate) const ROW_OVERHEAD: u64 = 160;

fn spool_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(SPOOL_BYTES, [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
}
