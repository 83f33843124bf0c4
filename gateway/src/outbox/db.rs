//! Opening the outbox database and migrating its schema.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use serde::Deserialize;

use super::OutboxError;

/// SQLite's `synchronous` for the outbox (`outbox.synchronous`): `full` syncs the WAL at
/// every commit, `normal` only at checkpoints (a power cut can lose the last commits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Synchronous {
    #[default]
    Full,
    Normal,
}

/// File name of the outbox inside the data directory.
pub(crate) const FILE_NAME: &str = "outbox.db";

/// Numbered migrations; migration `i` brings `user_version` from `i` to `i + 1`.
/// Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: records, dead letters, MQTT delivery marks, metadata.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
    CREATE TABLE records (
        seq          INTEGER PRIMARY KEY,  -- the CloudEvent `sequence`
        id           BLOB NOT NULL,        -- the CloudEvent `id` (UUIDv7, 16 bytes)
        source       TEXT NOT NULL,
        type         TEXT NOT NULL,
        subject      TEXT,
        time_us      INTEGER NOT NULL,     -- receive time, µs since the epoch
        content_type TEXT,
        data         BLOB NOT NULL
    );
    CREATE TABLE dead_letters (
        seq          INTEGER PRIMARY KEY,
        id           BLOB NOT NULL,
        source       TEXT NOT NULL,
        type         TEXT NOT NULL,
        subject      TEXT,
        time_us      INTEGER NOT NULL,
        content_type TEXT,
        data         BLOB NOT NULL,
        reason       TEXT NOT NULL,
        failed_at_us INTEGER NOT NULL
    );
    -- The last committed PUBLISH per MQTT session and packet id, to recognise re-deliveries.
    CREATE TABLE mqtt_deliveries (
        session TEXT NOT NULL,
        pkid    INTEGER NOT NULL,
        digest  BLOB NOT NULL,
        PRIMARY KEY (session, pkid)
    ) WITHOUT ROWID;
    "#,
    // 2: an expiry time per record (the route's TTL), indexed only where set.
    r#"
    ALTER TABLE records ADD COLUMN expires_us INTEGER;
    CREATE INDEX records_expiry ON records (expires_us) WHERE expires_us IS NOT NULL;
    "#,
    // 3: files. A file record holds a path into the spool, never the bytes; a claim is a
    // file on its way from a drop directory into the spool (see crate::spool).
    r#"
    ALTER TABLE records ADD COLUMN file TEXT;          -- name in the spool directory
    ALTER TABLE records ADD COLUMN file_size INTEGER;
    ALTER TABLE records ADD COLUMN file_sha256 BLOB;
    ALTER TABLE records ADD COLUMN file_move_to BLOB;  -- after delivery: NULL = delete
    CREATE INDEX records_files ON records (seq) WHERE file IS NOT NULL;
    ALTER TABLE dead_letters ADD COLUMN file TEXT;
    ALTER TABLE dead_letters ADD COLUMN file_size INTEGER;
    ALTER TABLE dead_letters ADD COLUMN file_sha256 BLOB;
    ALTER TABLE dead_letters ADD COLUMN file_move_to BLOB;
    CREATE TABLE file_claims (
        spool        TEXT PRIMARY KEY,  -- the name it gets in the spool directory
        watch        TEXT NOT NULL,
        original     BLOB NOT NULL,     -- absolute path in the drop directory
        rel          BLOB NOT NULL,     -- the same, relative to the watched directory
        dev          INTEGER NOT NULL,
        ino          INTEGER NOT NULL,
        copy         INTEGER NOT NULL,  -- 1: copied (the original stays), 0: moved
        size         INTEGER NOT NULL,  -- the original's size and modification time
        mtime_ns     INTEGER NOT NULL,
        -- 1: the file's record is committed, but the original (copied, not kept) is
        -- still to be deleted from the drop directory.
        committed    INTEGER NOT NULL DEFAULT 0,
        claimed_us   INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- Files left in place (after_upload = "keep") that were sent, so a scan skips them.
    CREATE TABLE kept_files (
        path     BLOB PRIMARY KEY,
        dev      INTEGER NOT NULL,
        ino      INTEGER NOT NULL,
        size     INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 4: priorities (higher drains first, is dropped last) and whether a full outbox may
    // drop a record to make room (its route's when_full = "drop_oldest").
    r#"
    ALTER TABLE records ADD COLUMN priority INTEGER NOT NULL DEFAULT 5;
    ALTER TABLE records ADD COLUMN evictable INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE dead_letters ADD COLUMN priority INTEGER NOT NULL DEFAULT 5;
    ALTER TABLE dead_letters ADD COLUMN evictable INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE file_claims ADD COLUMN priority INTEGER NOT NULL DEFAULT 5;
    -- One index for both the batch lane's reads by priority and a full outbox's search
    -- for the oldest of the lowest priority. The default priority (5) is left out: it is
    -- what most records have, and they cost no index writes; their queries walk sequences.
    CREATE INDEX records_priority ON records (priority, seq) WHERE priority <> 5;
    "#,
    // 5: packed events (see outbox::pack). A packed record's `data` is its subject and
    // data deflated against dictionary `packed`, which also names its source, type and
    // content type; its `id` is empty (derived from the producer id and the sequence),
    // `source` and `type` are empty, `subject` and `content_type` NULL. Dead letters are
    // never packed. AUTOINCREMENT: an id is never reused, so a cached dictionary is
    // never the wrong one.
    r#"
    CREATE TABLE dictionaries (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        source       TEXT NOT NULL,
        type         TEXT NOT NULL,
        content_type TEXT,
        bytes        BLOB NOT NULL
    );
    ALTER TABLE records ADD COLUMN packed INTEGER;
    "#,
    // 6: smaller MQTT delivery marks (see outbox::marks): sessions numbered once, a mark
    // keyed by session × 65536 + packet id with the first 8 bytes of its digest (the
    // gateway computes the same 8 bytes, so marks taken before the upgrade still match).
    r#"
    CREATE TABLE mqtt_sessions (
        id   INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE  -- broker:port/client id
    );
    CREATE TABLE mqtt_marks (
        key    INTEGER PRIMARY KEY,  -- session id × 65536 + packet id
        digest BLOB NOT NULL         -- SHA-256 of topic and payload, first 8 bytes
    );
    INSERT INTO mqtt_sessions (name) SELECT DISTINCT session FROM mqtt_deliveries ORDER BY session;
    INSERT INTO mqtt_marks (key, digest)
        SELECT s.id * 65536 + d.pkid, substr(d.digest, 1, 8)
        FROM mqtt_deliveries d JOIN mqtt_sessions s ON s.name = d.session
        WHERE d.pkid BETWEEN 0 AND 65535;
    DROP TABLE mqtt_deliveries;
    "#,
    // 7: edge rules (see outbox::rule_state): each rule's groups' states (JSON), saved
    // in the transaction of the readings that changed them, and what each rule's states
    // depend on. A rowid table: a sliding window's state can be large.
    r#"
    CREATE TABLE rule_states (
        rule  TEXT NOT NULL,
        grp   TEXT NOT NULL,
        state TEXT NOT NULL,
        UNIQUE (rule, grp)
    );
    CREATE TABLE rule_defs (
        rule        TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
];

pub(crate) const META_PRODUCER_ID: &str = "producer_id";
pub(crate) const META_NEXT_SEQ: &str = "next_seq";

/// The path of the outbox database under `data_dir`.
pub(crate) fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Opens (creating if needed) the outbox at `path` with the settings every connection
/// needs. Run [`migrate`] once on the writer's connection before anything else.
pub(crate) fn open(path: &Path, synchronous: Synchronous) -> Result<Connection, OutboxError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| OutboxError::DataDir {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // WAL: readers (the uplink) never block the writer, and a commit appends to one file
    // instead of rewriting pages in place — fewer writes on an SD card.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            "The outbox could not switch to WAL mode; it will be slower."
        );
    }
    // FULL fsyncs the WAL at every commit, so an acknowledged record survives a power cut.
    // NORMAL only survives a crash of the process. Group commit amortises the fsync.
    let sync = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // The uplink's reads and the writer's checkpoints may briefly contend.
    conn.busy_timeout(Duration::from_secs(5))?;
    // After a checkpoint, truncate the WAL back to this size so a burst does not leave a
    // huge file behind on a small disk.
    conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    // A small page cache keeps the gateway's memory flat on a 1 GB Pi (negative = KiB).
    conn.pragma_update(None, "cache_size", -1024)?;
    Ok(conn)
}

/// Brings the schema up to date, each migration in its own transaction, and makes sure
/// the producer id exists. Refuses a database from a newer version.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), OutboxError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(OutboxError::TooNew { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "Migrated the outbox schema.");
    }
    let producer = uuid::Uuid::new_v4().to_string();
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
        (META_PRODUCER_ID, &producer),
    )?;
    Ok(())
}

/// Refuses a database whose schema this version does not know, or that was never migrated
/// (for connections other than the writer's, which must not migrate).
pub(crate) fn check_schema(conn: &Connection) -> Result<(), OutboxError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    match found {
        0 => Err(OutboxError::NotMigrated),
        f if f > known => Err(OutboxError::TooNew { found, known }),
        _ => Ok(()),
    }
}

/// Opens, migrates and checks (`PRAGMA quick_check`) the outbox for the writer. A damaged
/// database never keeps the gateway from starting: it is moved aside with its WAL as
/// `outbox.db.corrupt-<unix time>` (kept for a person to look at) and a fresh one is
/// created; the second value says where it went. A fresh outbox has a new producer id,
/// so its sequences cannot be mistaken at the relay for the old one's.
pub(crate) fn open_or_recover(
    path: &Path,
    synchronous: Synchronous,
) -> Result<(Connection, Option<(PathBuf, OutboxError)>), OutboxError> {
    match open_checked(path, synchronous) {
        Ok(conn) => Ok((conn, None)),
        Err(e) if e.is_corruption() => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = path.with_file_name(format!("{FILE_NAME}.corrupt-{stamp}"));
            for suffix in ["", "-wal", "-shm"] {
                let from = PathBuf::from(format!("{}{suffix}", path.display()));
                let to = PathBuf::from(format!("{}{suffix}", aside.display()));
                match std::fs::rename(&from, &to) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        return Err(OutboxError::DataDir {
                            path: from.display().to_string(),
                            message: format!(
                                "the outbox is damaged ({e}) and cannot be moved aside: {err}"
                            ),
                        });
                    }
                }
            }
            let conn = open_checked(path, synchronous)?;
            Ok((conn, Some((aside, e))))
        }
        Err(e) => Err(e),
    }
}

fn open_checked(path: &Path, synchronous: Synchronous) -> Result<Connection, OutboxError> {
    let mut conn = open(path, synchronous)?;
    migrate(&mut conn)?;
    let verdict: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(OutboxError::Corrupt(verdict));
    }
    Ok(conn)
}

/// The producer id this outbox assigns sequences under.
pub(crate) fn producer_id(conn: &Connection) -> Result<String, OutboxError> {
    Ok(conn.query_row(
        "SELECT value FROM meta WHERE key = ?1",
        [META_PRODUCER_ID],
        |r| r.get(0),
    )?)
}

/// The next sequence to assign: one past the highest ever assigned.
pub(crate) fn next_seq(conn: &Connection) -> Result<u64, OutboxError> {
    let stored: Option<i64> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [META_NEXT_SEQ],
            |r| r.get(0),
        )
        .optional()?;
    // `meta` is written by every transaction that deletes records (the writer's settles,
    // expiries and drops), so it can only lag behind sequences that are still in a table.
    let max: i64 = conn.query_row(
        "SELECT max(coalesce((SELECT max(seq) FROM records), 0),
                    coalesce((SELECT max(seq) FROM dead_letters), 0))",
        [],
        |r| r.get(0),
    )?;
    Ok(stored.unwrap_or(1).max(max + 1).max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_keeps_the_producer_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(&dir.path().join("nested"));
        let mut conn = open(&path, Synchronous::Full).unwrap();
        migrate(&mut conn).unwrap();
        let producer = producer_id(&conn).unwrap();
        assert_eq!(next_seq(&conn).unwrap(), 1);
        drop(conn);
        let mut conn = open(&path, Synchronous::Full).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(producer_id(&conn).unwrap(), producer);
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn schema_6_keeps_the_delivery_marks_taken_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        let mut conn = open(&path, Synchronous::Normal).unwrap();
        for sql in &MIGRATIONS[..5] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        let digest: Vec<u8> = (1..=16).collect();
        for (session, pkid) in [("b:1883/gw", 7), ("a:1883/gw", 7), ("a:1883/gw", 65535)] {
            conn.execute(
                "INSERT INTO mqtt_deliveries (session, pkid, digest) VALUES (?1, ?2, ?3)",
                rusqlite::params![session, pkid, &digest],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        let marks: Vec<(String, i64, Vec<u8>)> = conn
            .prepare(
                "SELECT s.name, m.key % 65536, m.digest FROM mqtt_marks m
                 JOIN mqtt_sessions s ON s.id = m.key / 65536 ORDER BY s.name, m.key",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let first8 = digest[..8].to_vec();
        assert_eq!(
            marks,
            [
                ("a:1883/gw".to_owned(), 7, first8.clone()),
                ("a:1883/gw".to_owned(), 65535, first8.clone()),
                ("b:1883/gw".to_owned(), 7, first8),
            ]
        );
        let old: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'mqtt_deliveries'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        let mut conn = open(&path, Synchronous::Normal).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        let e = migrate(&mut conn).unwrap_err();
        assert!(matches!(e, OutboxError::TooNew { found: 99, .. }), "{e}");
    }
}
