//! MQTT delivery marks: the digest of the last PUBLISH committed per (session, packet id),
//! to recognise a broker's re-delivery of a message whose PUBACK was lost (the gateway
//! stopped between the commit and the PUBACK).
//!
//! A mark is written with every QoS 1/2 reading, so its size is part of every reading's
//! cost to the SD card. Sessions (`broker:port/client id`, tens of bytes) are numbered once
//! in `mqtt_sessions`; a mark is one row of `mqtt_marks` keyed by an integer
//! (`session × 65536 + packet id`) holding an 8-byte digest — about 16 bytes on its page
//! where the first layout (`mqtt_deliveries`, schema 1–5) took about 70.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{Connection, Transaction, params};

use super::{DeliveryMark, OutboxError};

const SESSIONS: &str = "SELECT id, name FROM mqtt_sessions";
const MARKS: &str = "SELECT key, digest FROM mqtt_marks";
const INSERT_SESSION: &str = "INSERT INTO mqtt_sessions (name) VALUES (?1) RETURNING id";
const UPSERT_MARK: &str = "INSERT OR REPLACE INTO mqtt_marks (key, digest) VALUES (?1, ?2)";

/// The marks, mirrored in memory so that a re-delivery check costs no query.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    sessions: HashMap<Arc<str>, i64>,
    committed: HashMap<i64, [u8; 8]>,
    /// Written in the open transaction: kept on commit, forgotten on rollback.
    pending_sessions: Vec<(Arc<str>, i64)>,
    pending: Vec<(i64, [u8; 8])>,
}

impl Marks {
    pub(crate) fn load(conn: &Connection) -> Result<Self, OutboxError> {
        let mut marks = Self::default();
        let mut stmt = conn.prepare(SESSIONS)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, name) = row?;
            marks.sessions.insert(Arc::from(name), id);
        }
        let mut stmt = conn.prepare(MARKS)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        for row in rows {
            let (key, digest) = row?;
            // A row of another shape cannot match a digest; it is overwritten when its
            // packet id comes round again.
            if let Ok(digest) = <[u8; 8]>::try_from(digest) {
                marks.committed.insert(key, digest);
            }
        }
        Ok(marks)
    }

    /// Whether `mark` is a re-delivery of the last message committed with its packet id
    /// (including ones earlier in this transaction); if it is not, records it in `tx`.
    pub(crate) fn check_and_record(
        &mut self,
        tx: &Transaction<'_>,
        mark: &DeliveryMark,
    ) -> Result<bool, OutboxError> {
        let session = match self.session_id(&mark.session) {
            Some(id) => id,
            None => {
                let id: i64 = tx
                    .prepare_cached(INSERT_SESSION)?
                    .query_row([&*mark.session], |r| r.get(0))?;
                self.pending_sessions.push((mark.session.clone(), id));
                id
            }
        };
        let key = session * 65536 + i64::from(mark.pkid);
        if mark.dup {
            let last = self
                .pending
                .iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, d)| d)
                .or_else(|| self.committed.get(&key));
            if last == Some(&mark.digest) {
                return Ok(true);
            }
        }
        tx.prepare_cached(UPSERT_MARK)?
            .execute(params![key, &mark.digest[..]])?;
        self.pending.push((key, mark.digest));
        Ok(false)
    }

    fn session_id(&self, name: &str) -> Option<i64> {
        self.sessions.get(name).copied().or_else(|| {
            self.pending_sessions
                .iter()
                .find(|(n, _)| &**n == name)
                .map(|(_, id)| *id)
        })
    }

    /// The transaction committed: what it wrote is now the committed state.
    pub(crate) fn committed(&mut self) {
        self.sessions.extend(self.pending_sessions.drain(..));
        self.committed.extend(self.pending.drain(..));
    }

    /// The transaction rolled back: forget what it wrote.
    pub(crate) fn rolled_back(&mut self) {
        self.pending_sessions.clear();
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::db;
    use crate::outbox::db::Synchronous;

    fn mark(session: &str, pkid: u16, dup: bool, digest: u8) -> DeliveryMark {
        DeliveryMark {
            session: Arc::from(session),
            pkid,
            dup,
            digest: [digest; 8],
        }
    }

    fn conn(dir: &std::path::Path) -> Connection {
        let mut conn = db::open(&db::path_in(dir), Synchronous::Normal).unwrap();
        db::migrate(&mut conn).unwrap();
        conn
    }

    #[test]
    fn sessions_keep_their_own_packet_ids_and_a_rollback_forgets_its_marks() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = conn(dir.path());
        let mut marks = Marks::load(&conn).unwrap();
        let tx = conn.transaction().unwrap();
        assert!(
            !marks
                .check_and_record(&tx, &mark("a", 1, false, 1))
                .unwrap()
        );
        assert!(
            !marks
                .check_and_record(&tx, &mark("b", 1, false, 2))
                .unwrap()
        );
        // Within the same transaction, a re-delivery is recognised per session.
        assert!(marks.check_and_record(&tx, &mark("a", 1, true, 1)).unwrap());
        assert!(!marks.check_and_record(&tx, &mark("b", 1, true, 1)).unwrap());
        tx.commit().unwrap();
        marks.committed();

        let tx = conn.transaction().unwrap();
        assert!(
            !marks
                .check_and_record(&tx, &mark("c", 9, false, 3))
                .unwrap()
        );
        assert!(
            !marks
                .check_and_record(&tx, &mark("a", 1, false, 4))
                .unwrap()
        );
        drop(tx);
        marks.rolled_back();
        // The rolled-back mark of `a` is gone: the committed one (digest 1) is the last.
        let tx = conn.transaction().unwrap();
        assert!(marks.check_and_record(&tx, &mark("a", 1, true, 1)).unwrap());
        assert!(!marks.check_and_record(&tx, &mark("c", 9, true, 3)).unwrap());
        tx.commit().unwrap();
        marks.committed();

        // What is on disk is what was committed: `b` ends with digest 1, `c` got a number.
        let marks = Marks::load(&conn).unwrap();
        assert_eq!(marks.sessions.len(), 3);
        let b = marks.sessions["b"];
        assert_eq!(marks.committed[&(b * 65536 + 1)], [1; 8]);
    }
}
