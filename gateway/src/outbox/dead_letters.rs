//! The dead-letter table from outside the writer: what `pigeon-gateway dead-letter list |
//! retry | purge` does, on a connection of its own.
//!
//! These run in another process than the gateway, possibly while it runs. Each is one
//! short `IMMEDIATE` transaction (the write lock taken up front, so a concurrent commit of
//! the gateway's writer waits on the busy timeout instead of failing halfway), and the
//! writer re-reads the next sequence inside each of its own transactions, so the two never
//! hand out the same sequence.
//!
//! **Retry assigns new sequences.** The gateway promises the relay (`pigeon-settled-below`)
//! never to send a sequence below the first one of its current batch again; a dead-lettered
//! sequence is soon below that floor, and the relay answers `duplicate` for anything below
//! it — it would be dropped without being written. So a retried event gets the next free
//! sequence and keeps its CloudEvent `id`, `source`, `type`, `subject`, `time` and data.
//! See docs/protocol.md, "Re-sending a dead letter".

use std::path::Path;

use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use serde::Serialize;

use super::{OutboxError, db};

/// One dead letter, as `dead-letter list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct DeadLetter {
    /// The sequence it had when the relay rejected it (its key in the table).
    pub(crate) seq: u64,
    /// The CloudEvent `id`.
    #[serde(serialize_with = "as_string")]
    pub(crate) id: uuid::Uuid,
    pub(crate) source: String,
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    pub(crate) subject: Option<String>,
    /// Receive time, µs since the epoch.
    pub(crate) time_us: i64,
    /// When the relay rejected it, µs since the epoch.
    pub(crate) failed_at_us: i64,
    /// The relay's reason.
    pub(crate) reason: String,
    pub(crate) content_type: Option<String>,
    /// The data's size; for a file, the file's.
    pub(crate) size_bytes: u64,
    /// The start of the data when it is UTF-8 text (control characters escaped); for a
    /// file, its description.
    pub(crate) preview: Option<String>,
    /// For a file: its name in the spool directory, where it waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) file: Option<String>,
}

fn as_string<S: serde::Serializer>(id: &uuid::Uuid, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Which dead letters a command is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selection {
    All,
    Seqs(Vec<u64>),
}

/// A dead letter moved back into the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retried {
    pub(crate) old_seq: u64,
    pub(crate) new_seq: u64,
    pub(crate) id: uuid::Uuid,
}

/// What a command asked for that is not there.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeadLetterError {
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    #[error("no dead letter with sequence {}; nothing was changed", list(.0))]
    Unknown(Vec<u64>),
}

fn list(seqs: &[u64]) -> String {
    seqs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many characters of text data a preview shows.
const PREVIEW_CHARS: usize = 60;

const LIST: &str = "SELECT seq, id, source, type, subject, time_us, failed_at_us, reason,
    content_type, coalesce(file_size, length(data)), substr(data, 1, 256), file
    FROM dead_letters ORDER BY seq LIMIT ?1";
const COUNT: &str = "SELECT count(*) FROM dead_letters";
const SEQS: &str = "SELECT seq FROM dead_letters ORDER BY seq";
const EXISTS: &str = "SELECT 1 FROM dead_letters WHERE seq = ?1";
const FAILED_AT: &str = "SELECT failed_at_us FROM dead_letters WHERE seq = ?1";
const RESTORE: &str = "INSERT INTO records
    (seq, id, source, type, subject, time_us, content_type, data,
     file, file_size, file_sha256, file_move_to, priority, evictable)
    SELECT ?2, id, source, type, subject, time_us, content_type, data,
     file, file_size, file_sha256, file_move_to, priority, evictable
    FROM dead_letters WHERE seq = ?1";
const FILE_OF: &str = "SELECT file FROM dead_letters WHERE seq = ?1";
const DELETE: &str = "DELETE FROM dead_letters WHERE seq = ?1";
const SET_NEXT_SEQ: &str = "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)";

/// Opens an outbox that must already exist and be migrated by this version; never creates
/// one (a wrong `data_dir` must not leave an empty database behind).
pub(crate) fn open_existing(path: &Path, writable: bool) -> Result<Connection, OutboxError> {
    if !path.exists() {
        return Err(OutboxError::Missing {
            path: path.display().to_string(),
        });
    }
    let flags = if writable {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    // The gateway's writer holds the write lock for one group commit at a time.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if writable {
        // What the gateway's own writes use at the safe setting: a retry or purge that
        // was reported done survives a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    db::check_schema(&conn)?;
    Ok(conn)
}

/// How many dead letters there are, and the first `limit` of them by sequence.
pub(crate) fn list_first(
    conn: &Connection,
    limit: u64,
) -> Result<(u64, Vec<DeadLetter>), OutboxError> {
    let total: i64 = conn.query_row(COUNT, [], |r| r.get(0))?;
    let mut stmt = conn.prepare(LIST)?;
    let rows = stmt.query_map([limit.min(i64::MAX as u64) as i64], |r| {
        let id: Vec<u8> = r.get(1)?;
        let head: Vec<u8> = r.get(10)?;
        Ok(DeadLetter {
            seq: r.get::<_, i64>(0)? as u64,
            id: uuid::Uuid::from_slice(&id).unwrap_or_default(),
            source: r.get(2)?,
            event_type: r.get(3)?,
            subject: r.get(4)?,
            time_us: r.get(5)?,
            failed_at_us: r.get(6)?,
            reason: r.get(7)?,
            content_type: r.get(8)?,
            size_bytes: r.get::<_, i64>(9)? as u64,
            preview: preview(&head),
            file: r.get(11)?,
        })
    })?;
    let letters = rows.collect::<Result<Vec<_>, _>>()?;
    Ok((total as u64, letters))
}

/// The first [`PREVIEW_CHARS`] characters of `head` if it is text; `None` for binary data.
/// A multi-byte character cut at the end of `head` does not make it binary.
pub(crate) fn preview(head: &[u8]) -> Option<String> {
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok()?,
        Err(_) => return None,
    };
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == PREVIEW_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The selected sequences that are in the table, or an error naming those that are not.
fn resolve(tx: &Connection, selection: &Selection) -> Result<Vec<u64>, DeadLetterError> {
    match selection {
        Selection::All => {
            let mut stmt = tx.prepare(SEQS).map_err(OutboxError::from)?;
            let seqs = stmt
                .query_map([], |r| r.get::<_, i64>(0).map(|s| s as u64))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(OutboxError::from)?;
            Ok(seqs)
        }
        Selection::Seqs(seqs) => {
            let mut seqs = seqs.clone();
            seqs.sort_unstable();
            seqs.dedup();
            let mut stmt = tx.prepare(EXISTS).map_err(OutboxError::from)?;
            let mut unknown = Vec::new();
            for &s in &seqs {
                if !stmt.exists([s as i64]).map_err(OutboxError::from)? {
                    unknown.push(s);
                }
            }
            if unknown.is_empty() {
                Ok(seqs)
            } else {
                Err(DeadLetterError::Unknown(unknown))
            }
        }
    }
}

/// Moves the selected dead letters back into `records` under new sequences (in their old
/// order), in one transaction. A running gateway's uplink finds them within its idle
/// re-check (`uplink::IDLE_RECHECK`).
pub(crate) fn retry(
    conn: &mut Connection,
    selection: &Selection,
) -> Result<Vec<Retried>, DeadLetterError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(OutboxError::from)?;
    let seqs = resolve(&tx, selection)?;
    let mut next = db::next_seq(&tx)?;
    let mut done = Vec::with_capacity(seqs.len());
    {
        let mut restore = tx.prepare(RESTORE).map_err(OutboxError::from)?;
        let mut delete = tx.prepare(DELETE).map_err(OutboxError::from)?;
        let mut id_of = tx
            .prepare("SELECT id FROM dead_letters WHERE seq = ?1")
            .map_err(OutboxError::from)?;
        for old in seqs {
            let id: Vec<u8> = id_of
                .query_row([old as i64], |r| r.get(0))
                .map_err(OutboxError::from)?;
            restore
                .execute(params![old as i64, next as i64])
                .map_err(OutboxError::from)?;
            delete.execute([old as i64]).map_err(OutboxError::from)?;
            done.push(Retried {
                old_seq: old,
                new_seq: next,
                id: uuid::Uuid::from_slice(&id).unwrap_or_default(),
            });
            next += 1;
        }
    }
    if !done.is_empty() {
        tx.execute(SET_NEXT_SEQ, params![db::META_NEXT_SEQ, next as i64])
            .map_err(OutboxError::from)?;
    }
    tx.commit().map_err(OutboxError::from)?;
    Ok(done)
}

/// Deletes the selected dead letters — of those, only the ones that failed before
/// `failed_before_us` when given — in one transaction, and the spooled files of those
/// that are files (from `spool_dir`, before the rows go: a row without its file is
/// harmless, a file without its row would be kept forever). Returns the sequences
/// deleted.
pub(crate) fn purge(
    conn: &mut Connection,
    selection: &Selection,
    failed_before_us: Option<i64>,
    spool_dir: &Path,
) -> Result<Vec<u64>, DeadLetterError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(OutboxError::from)?;
    let seqs = resolve(&tx, selection)?;
    let mut deleted = Vec::new();
    {
        let mut failed_at = tx.prepare(FAILED_AT).map_err(OutboxError::from)?;
        let mut file_of = tx.prepare(FILE_OF).map_err(OutboxError::from)?;
        let mut delete = tx.prepare(DELETE).map_err(OutboxError::from)?;
        for seq in seqs {
            if let Some(before) = failed_before_us {
                let at: i64 = failed_at
                    .query_row([seq as i64], |r| r.get(0))
                    .map_err(OutboxError::from)?;
                if at >= before {
                    continue;
                }
            }
            let file: Option<String> = file_of
                .query_row([seq as i64], |r| r.get(0))
                .map_err(OutboxError::from)?;
            if let Some(name) = file {
                match std::fs::remove_file(spool_dir.join(&name)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(DeadLetterError::Outbox(OutboxError::DataDir {
                            path: spool_dir.join(&name).display().to_string(),
                            message: format!("cannot delete the spooled file: {e}"),
                        }));
                    }
                }
            }
            delete.execute([seq as i64]).map_err(OutboxError::from)?;
            deleted.push(seq);
        }
    }
    tx.commit().map_err(OutboxError::from)?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::db::Synchronous;
    use crate::outbox::{NewRecord, OutboxWriter};

    fn record(n: u32, data: &[u8]) -> NewRecord {
        NewRecord {
            expires_us: None,
            source: "/gateways/t/mqtt".into(),
            event_type: "com.example.reading".into(),
            subject: Some(format!("room/{n}")),
            time_us: 1_700_000_000_000_000 + n as i64,
            content_type: None,
            data: bytes::Bytes::copy_from_slice(data),
            delivery: None,
            file: None,
            policy: crate::outbox::Policy::default(),
        }
    }

    /// An outbox with records 1..=4 appended through the real writer, 2 and 4 rejected.
    async fn outbox_with_dead_letters(
        dir: &Path,
    ) -> (OutboxWriter, std::thread::JoinHandle<()>, Connection) {
        let path = db::path_in(dir);
        let mut conn = db::open(&path, Synchronous::Normal).unwrap();
        db::migrate(&mut conn).unwrap();
        let (w, h) = OutboxWriter::start(conn, 100).unwrap();
        w.append_and_wait(record(1, b"{\"n\":1}")).await.unwrap();
        w.append_and_wait(record(2, b"{\"n\":2}")).await.unwrap();
        w.append_and_wait(record(3, b"{\"n\":3}")).await.unwrap();
        w.append_and_wait(record(4, &[0xff, 0x00, 0x80]))
            .await
            .unwrap();
        w.settle(vec![1, 3], vec![(2, "too big".into()), (4, "bad".into())])
            .await
            .unwrap();
        (w, h, open_existing(&path, true).unwrap())
    }

    #[tokio::test]
    async fn list_shows_dead_letters_with_reason_size_and_a_text_preview() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, conn) = outbox_with_dead_letters(dir.path()).await;
        let (total, letters) = list_first(&conn, 10).unwrap();
        assert_eq!(total, 2);
        assert_eq!(letters.len(), 2);
        assert_eq!(letters[0].seq, 2);
        assert_eq!(letters[0].reason, "too big");
        assert_eq!(letters[0].subject.as_deref(), Some("room/2"));
        assert_eq!(letters[0].size_bytes, 7);
        assert_eq!(letters[0].preview.as_deref(), Some("{\"n\":2}"));
        assert_eq!(letters[1].preview, None, "binary data has no preview");
        let (total, letters) = list_first(&conn, 1).unwrap();
        assert_eq!((total, letters.len()), (2, 1));
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn retry_gives_new_sequences_keeps_the_id_and_the_writer_never_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, mut conn) = outbox_with_dead_letters(dir.path()).await;
        let (_, before) = list_first(&conn, 10).unwrap();
        let e = retry(&mut conn, &Selection::Seqs(vec![2, 7])).unwrap_err();
        assert!(
            matches!(&e, DeadLetterError::Unknown(s) if s == &[7]),
            "{e}"
        );
        assert_eq!(list_first(&conn, 10).unwrap().0, 2, "nothing changed");

        let done = retry(&mut conn, &Selection::All).unwrap();
        assert_eq!(
            done.iter()
                .map(|r| (r.old_seq, r.new_seq))
                .collect::<Vec<_>>(),
            vec![(2, 5), (4, 6)]
        );
        assert_eq!(done[0].id, before[0].id);
        assert_eq!(list_first(&conn, 10).unwrap().0, 0);
        // The running writer, which thinks 5 is next, must not collide with them.
        assert_eq!(
            w.append_and_wait(record(9, b"x")).await.unwrap(),
            crate::outbox::Appended::Stored { seq: 7 }
        );
        let reader = crate::outbox::OutboxReader::open(&db::path_in(dir.path())).unwrap();
        let waiting = reader.read_after(0, 10, 1 << 20).unwrap();
        assert_eq!(
            waiting.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
        assert_eq!(waiting[0].id, before[0].id);
        assert_eq!(waiting[0].data, b"{\"n\":2}");
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn purge_deletes_the_selected_and_honours_older_than() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, mut conn) = outbox_with_dead_letters(dir.path()).await;
        let long_ago = 1_000_000;
        assert_eq!(
            purge(&mut conn, &Selection::All, Some(long_ago), dir.path()).unwrap(),
            Vec::<u64>::new()
        );
        assert_eq!(
            purge(&mut conn, &Selection::Seqs(vec![4]), None, dir.path()).unwrap(),
            vec![4]
        );
        let later = chrono::Utc::now().timestamp_micros() + 1;
        assert_eq!(
            purge(&mut conn, &Selection::All, Some(later), dir.path()).unwrap(),
            vec![2]
        );
        assert_eq!(list_first(&conn, 10).unwrap().0, 0);
        drop(w);
        h.join().unwrap();
    }

    #[test]
    fn a_missing_outbox_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = db::path_in(dir.path());
        let e = open_existing(&path, true).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(!path.exists());
    }

    #[test]
    fn previews_escape_control_characters_and_cut_long_text() {
        assert_eq!(preview(b"a\nb").as_deref(), Some("a\\nb"));
        let long = "é".repeat(200);
        let p = preview(&long.as_bytes()[..255]).unwrap();
        assert_eq!(p.chars().count(), PREVIEW_CHARS + 1);
        assert!(p.ends_with('…'));
        assert_eq!(preview(&[0xff, 0xfe]), None);
    }
}
