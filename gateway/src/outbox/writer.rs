//! The outbox's one writer.
//!
//! A dedicated OS thread (rusqlite never runs on the async reactor) owns the write
//! connection. Sources and the uplink send it commands over a bounded channel; when the
//! channel is full, senders wait — that is the backpressure that slows MQTT acks down
//! instead of letting memory grow. Each round drains whatever is queued (up to
//! `commit_max_records`) into ONE transaction, then answers every waiter: group commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{FileClaim, NewRecord, OutboxError, db, path_bytes};
use crate::stats::Stats;

/// How many commands may wait for the writer before senders are made to wait.
const CHANNEL_CAPACITY: usize = 1024;

/// What became of an appended record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Committed with this sequence.
    Stored { seq: u64 },
    /// A broker's re-delivery of a record committed earlier; nothing new was stored.
    Redelivery,
}

/// Packet-id marks by (MQTT session, packet id): the digest of the last committed PUBLISH.
type DeliveryKey = (Arc<str>, u16);
type Deliveries = HashMap<DeliveryKey, [u8; 16]>;

type Reply<T> = oneshot::Sender<Result<T, OutboxError>>;

enum Command {
    Append(NewRecord, Reply<Appended>),
    /// The relay answered for these records: delete the delivered ones, move the
    /// rejected ones (with the relay's reason) to the dead-letter table.
    Settle {
        delivered: Vec<u64>,
        rejected: Vec<(u64, String)>,
        reply: Reply<()>,
    },
    /// Answered as soon as the writer takes it: proves the thread is alive and not stuck
    /// in a commit (the watchdog asks).
    Ping(oneshot::Sender<()>),
    /// Deletes the records whose expiry time is before `now_us`; answers how many, by type.
    Expire {
        now_us: i64,
        reply: Reply<Vec<(String, u64)>>,
    },
    /// Records files about to move into the spool, and forgets claims that were given up
    /// (a committed file record forgets its own claim).
    Claims {
        add: Vec<FileClaim>,
        remove: Vec<String>,
        reply: Reply<()>,
    },
    /// Forgets the marks of kept files (`after_upload = "keep"`) that are gone or changed.
    ForgetKept {
        paths: Vec<std::path::PathBuf>,
        reply: Reply<()>,
    },
}

impl Command {
    fn weight(&self) -> usize {
        match self {
            Command::Append(..) => 1,
            Command::Ping(_) => 0,
            Command::Expire { .. } => 1,
            Command::Claims { add, remove, .. } => add.len() + remove.len(),
            Command::ForgetKept { paths, .. } => paths.len(),
            Command::Settle {
                delivered,
                rejected,
                ..
            } => delivered.len() + rejected.len(),
        }
    }
}

/// A cheap, cloneable handle to the writer thread.
#[derive(Clone)]
pub struct OutboxWriter {
    tx: mpsc::Sender<Command>,
    /// Signalled after every commit that stored new records that are not files.
    committed: Arc<Notify>,
    /// Signalled after every commit that stored file records.
    files_committed: Arc<Notify>,
}

impl OutboxWriter {
    /// Starts the writer thread on an opened and migrated connection.
    pub fn start(
        conn: Connection,
        commit_max_records: usize,
    ) -> Result<(Self, std::thread::JoinHandle<()>), OutboxError> {
        Self::start_with_stats(conn, commit_max_records, Arc::new(Stats::default()))
    }

    /// [`OutboxWriter::start`], counting commits and committed records in `stats`.
    pub fn start_with_stats(
        conn: Connection,
        commit_max_records: usize,
        stats: Arc<Stats>,
    ) -> Result<(Self, std::thread::JoinHandle<()>), OutboxError> {
        let next_seq = db::next_seq(&conn)?;
        let deliveries = load_deliveries(&conn)?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let committed = Arc::new(Notify::new());
        let files_committed = Arc::new(Notify::new());
        let mut state = WriterState {
            conn,
            next_seq,
            deliveries,
            max_records: commit_max_records.max(1),
            committed: committed.clone(),
            files_committed: files_committed.clone(),
            stats,
        };
        let handle = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || state.run(rx))
            .map_err(|e| OutboxError::DataDir {
                path: "outbox writer thread".into(),
                message: e.to_string(),
            })?;
        Ok((
            Self {
                tx,
                committed,
                files_committed,
            },
            handle,
        ))
    }

    /// Queues a record for commit. Waits while the writer is saturated. The returned
    /// receiver resolves once the record's transaction committed (or failed).
    pub async fn append(
        &self,
        record: NewRecord,
    ) -> Result<oneshot::Receiver<Result<Appended, OutboxError>>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append(record, reply))
            .await
            .map_err(|_| OutboxError::Closed)?;
        Ok(rx)
    }

    /// Appends and waits for the commit.
    pub async fn append_and_wait(&self, record: NewRecord) -> Result<Appended, OutboxError> {
        self.append(record)
            .await?
            .await
            .map_err(|_| OutboxError::Closed)?
    }

    /// Deletes delivered records and dead-letters rejected ones, in one transaction.
    pub async fn settle(
        &self,
        delivered: Vec<u64>,
        rejected: Vec<(u64, String)>,
    ) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Settle {
                delivered,
                rejected,
                reply,
            })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Drops the records whose TTL ran out before `now_us`; returns how many, by type.
    pub async fn expire(&self, now_us: i64) -> Result<Vec<(String, u64)>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Expire { now_us, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Records `add` (files about to move into the spool) and forgets the claims named in
    /// `remove`, in one transaction.
    pub async fn claims(
        &self,
        add: Vec<FileClaim>,
        remove: Vec<String>,
    ) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Claims { add, remove, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Forgets the kept-file marks of `paths`.
    pub async fn forget_kept(&self, paths: Vec<std::path::PathBuf>) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::ForgetKept { paths, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Resolves once the writer thread took a ping from its queue: it is alive and got
    /// through what was queued before. An error if it has stopped.
    pub async fn ping(&self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ping(reply))
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    /// Resolves after the next commit that stored records other than files (or at once
    /// if one happened since the last call).
    pub async fn committed(&self) {
        self.committed.notified().await
    }

    /// Resolves after the next commit that stored file records (or at once if one
    /// happened since the last call).
    pub async fn files_committed(&self) {
        self.files_committed.notified().await
    }
}

fn load_deliveries(conn: &Connection) -> Result<Deliveries, OutboxError> {
    let mut stmt = conn.prepare("SELECT session, pkid, digest FROM mqtt_deliveries")?;
    let rows = stmt.query_map([], |r| {
        let session: String = r.get(0)?;
        let pkid: i64 = r.get(1)?;
        let digest: Vec<u8> = r.get(2)?;
        Ok((session, pkid, digest))
    })?;
    let mut map = HashMap::new();
    for row in rows {
        let (session, pkid, digest) = row?;
        if let (Ok(pkid), Ok(digest)) = (u16::try_from(pkid), <[u8; 16]>::try_from(digest)) {
            map.insert((Arc::from(session), pkid), digest);
        }
    }
    Ok(map)
}

struct WriterState {
    conn: Connection,
    next_seq: u64,
    /// Mirror of `mqtt_deliveries`, so a re-delivery check costs no query.
    deliveries: Deliveries,
    max_records: usize,
    committed: Arc<Notify>,
    files_committed: Arc<Notify>,
    stats: Arc<Stats>,
}

const INSERT_RECORD: &str = "INSERT INTO records
    (seq, id, source, type, subject, time_us, content_type, data, expires_us,
     file, file_size, file_sha256, file_move_to)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)";
const INSERT_CLAIM: &str = "INSERT OR REPLACE INTO file_claims
    (spool, watch, original, rel, dev, ino, copy, size, mtime_ns, committed, claimed_us)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
const DELETE_CLAIM: &str = "DELETE FROM file_claims WHERE spool = ?1";
const COMMIT_CLAIM: &str = "UPDATE file_claims SET committed = 1 WHERE spool = ?1";
const INSERT_KEPT: &str = "INSERT OR REPLACE INTO kept_files (path, dev, ino, size, mtime_ns)
    VALUES (?1, ?2, ?3, ?4, ?5)";
const DELETE_KEPT: &str = "DELETE FROM kept_files WHERE path = ?1";
const EXPIRED_BY_TYPE: &str = "SELECT type, count(*) FROM records
    WHERE expires_us IS NOT NULL AND expires_us < ?1 GROUP BY type ORDER BY type";
const DELETE_EXPIRED: &str = "DELETE FROM records WHERE expires_us IS NOT NULL AND expires_us < ?1";
const UPSERT_DELIVERY: &str =
    "INSERT OR REPLACE INTO mqtt_deliveries (session, pkid, digest) VALUES (?1, ?2, ?3)";
const SET_NEXT_SEQ: &str = "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)";
const DELETE_RECORD: &str = "DELETE FROM records WHERE seq = ?1";
const DEAD_LETTER: &str = "INSERT OR REPLACE INTO dead_letters
    (seq, id, source, type, subject, time_us, content_type, data, reason, failed_at_us,
     file, file_size, file_sha256, file_move_to)
    SELECT seq, id, source, type, subject, time_us, content_type, data, ?2, ?3,
     file, file_size, file_sha256, file_move_to
    FROM records WHERE seq = ?1";

impl WriterState {
    fn run(&mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut weight = 0;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    // A ping needs no transaction: answer it as it is taken.
                    Command::Ping(reply) => {
                        let _ = reply.send(());
                    }
                    cmd => {
                        weight += cmd.weight();
                        batch.push(cmd);
                    }
                }
                if weight < self.max_records {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.commit_round(&mut batch);
            }
        }
        tracing::debug!("The outbox writer stopped: every sender is gone.");
    }

    fn commit_round(&mut self, batch: &mut Vec<Command>) {
        let mut next_seq = self.next_seq;
        let mut new_deliveries = Vec::new();
        let mut appended = Vec::with_capacity(batch.len());
        let mut expired = Vec::new();
        let appends = batch.iter().any(|c| matches!(c, Command::Append(..)));
        let result = (|| -> Result<bool, OutboxError> {
            // IMMEDIATE: take the write lock first, so the sequence read below cannot be
            // overtaken by another connection (`pigeon-gateway dead-letter retry` assigns
            // sequences from another process while the gateway runs).
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            if appends {
                next_seq = next_seq.max(db::next_seq(&tx)?);
            }
            for cmd in batch.iter() {
                match cmd {
                    Command::Append(rec, _) => appended.push(append_one(
                        &tx,
                        rec,
                        &mut next_seq,
                        &self.deliveries,
                        &mut new_deliveries,
                    )?),
                    Command::Settle {
                        delivered,
                        rejected,
                        ..
                    } => settle(&tx, delivered, rejected)?,
                    Command::Ping(_) => {}
                    Command::Expire { now_us, .. } => expired.push(expire(&tx, *now_us)?),
                    Command::Claims { add, remove, .. } => claims(&tx, add, remove)?,
                    Command::ForgetKept { paths, .. } => {
                        let mut del = tx.prepare_cached(DELETE_KEPT)?;
                        for p in paths {
                            del.execute([path_bytes(p)])?;
                        }
                    }
                }
            }
            let stored_any = appended
                .iter()
                .any(|a| matches!(a, Appended::Stored { .. }));
            if stored_any {
                tx.prepare_cached(SET_NEXT_SEQ)?
                    .execute(params![db::META_NEXT_SEQ, next_seq as i64])?;
            }
            tx.commit()?;
            Ok(stored_any)
        })();
        let (files, others) = batch.iter().fold((false, false), |(f, o), c| match c {
            Command::Append(rec, _) if rec.file.is_some() => (true, o),
            Command::Append(..) => (f, true),
            _ => (f, o),
        });
        match result {
            Ok(stored_any) => {
                self.next_seq = next_seq;
                self.deliveries.extend(new_deliveries);
                self.stats.outbox_commits.fetch_add(1, Relaxed);
                self.stats.outbox_failing.store(false, Relaxed);
                let mut appended = appended.into_iter();
                let mut expired = expired.into_iter();
                for cmd in batch.drain(..) {
                    match cmd {
                        Command::Append(rec, reply) => {
                            if let Some(a) = appended.next() {
                                if let Appended::Stored { .. } = a {
                                    self.stats.count_stored(&rec);
                                }
                                let _ = reply.send(Ok(a));
                            }
                        }
                        Command::Settle { reply, .. }
                        | Command::Claims { reply, .. }
                        | Command::ForgetKept { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                        Command::Ping(reply) => {
                            let _ = reply.send(());
                        }
                        Command::Expire { reply, .. } => {
                            let counts: Vec<(String, u64)> = expired.next().unwrap_or_default();
                            let n: u64 = counts.iter().map(|(_, c)| c).sum();
                            self.stats.outbox_expired.fetch_add(n, Relaxed);
                            let _ = reply.send(Ok(counts));
                        }
                    }
                }
                if stored_any && others {
                    self.committed.notify_one();
                }
                if stored_any && files {
                    self.files_committed.notify_one();
                }
            }
            Err(e) => {
                // The transaction rolled back and the in-memory state was not touched, so
                // the next round starts clean. Nothing in this round is acknowledged.
                let err = e;
                self.stats.outbox_commit_failures.fetch_add(1, Relaxed);
                self.stats.outbox_failing.store(true, Relaxed);
                tracing::error!(error = %err, records = batch.len(), "An outbox commit failed; its data was not acknowledged.");
                for cmd in batch.drain(..) {
                    match cmd {
                        Command::Append(_, reply) => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Command::Settle { reply, .. }
                        | Command::Claims { reply, .. }
                        | Command::ForgetKept { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Command::Ping(reply) => {
                            let _ = reply.send(());
                        }
                        Command::Expire { reply, .. } => {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
            }
        }
    }
}

fn claims(
    tx: &Transaction<'_>,
    add: &[FileClaim],
    remove: &[String],
) -> Result<(), rusqlite::Error> {
    let mut insert = tx.prepare_cached(INSERT_CLAIM)?;
    for c in add {
        insert.execute(params![
            c.spool,
            c.watch,
            path_bytes(&c.original),
            path_bytes(&c.rel),
            c.dev as i64,
            c.ino as i64,
            c.copy,
            c.size as i64,
            c.mtime_ns,
            c.committed,
            c.claimed_us,
        ])?;
    }
    let mut delete = tx.prepare_cached(DELETE_CLAIM)?;
    for spool in remove {
        delete.execute([spool])?;
    }
    Ok(())
}

/// Deletes what expired before `now_us`; how many, by event type.
fn expire(tx: &Transaction<'_>, now_us: i64) -> Result<Vec<(String, u64)>, rusqlite::Error> {
    let counts = tx
        .prepare_cached(EXPIRED_BY_TYPE)?
        .query_map([now_us], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    if !counts.is_empty() {
        tx.prepare_cached(DELETE_EXPIRED)?.execute([now_us])?;
    }
    Ok(counts)
}

fn append_one(
    tx: &Transaction<'_>,
    rec: &NewRecord,
    next_seq: &mut u64,
    committed: &Deliveries,
    pending: &mut Vec<(DeliveryKey, [u8; 16])>,
) -> Result<Appended, rusqlite::Error> {
    if let Some(mark) = &rec.delivery {
        let key = (mark.session.clone(), mark.pkid);
        if mark.dup {
            // The newest mark for this packet id, including ones from this same round.
            let last = pending
                .iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, d)| d)
                .or_else(|| committed.get(&key));
            if last == Some(&mark.digest) {
                return Ok(Appended::Redelivery);
            }
        }
        tx.prepare_cached(UPSERT_DELIVERY)?.execute(params![
            &*mark.session,
            mark.pkid as i64,
            &mark.digest[..]
        ])?;
        pending.push((key, mark.digest));
    }
    let seq = *next_seq;
    let id = uuid::Uuid::now_v7();
    let file = rec.file.as_ref().map(|f| &f.file);
    tx.prepare_cached(INSERT_RECORD)?.execute(params![
        seq as i64,
        &id.as_bytes()[..],
        rec.source,
        rec.event_type,
        rec.subject,
        rec.time_us,
        rec.content_type,
        &rec.data[..],
        rec.expires_us,
        file.map(|f| &f.spool),
        file.map(|f| f.size as i64),
        file.map(|f| &f.sha256[..]),
        file.and_then(|f| f.move_to.as_deref()).map(path_bytes),
    ])?;
    if let Some(f) = &rec.file {
        // The file is in the spool and described by this record: its claim is done, or
        // (a copy whose original is still to be deleted) nearly.
        let claim = if f.release_original {
            COMMIT_CLAIM
        } else {
            DELETE_CLAIM
        };
        tx.prepare_cached(claim)?.execute([&f.file.spool])?;
        if let Some(k) = &f.kept {
            tx.prepare_cached(INSERT_KEPT)?.execute(params![
                path_bytes(&k.path),
                k.dev as i64,
                k.ino as i64,
                k.size as i64,
                k.mtime_ns,
            ])?;
        }
    }
    *next_seq += 1;
    Ok(Appended::Stored { seq })
}

fn settle(
    tx: &Transaction<'_>,
    delivered: &[u64],
    rejected: &[(u64, String)],
) -> Result<(), rusqlite::Error> {
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut dead = tx.prepare_cached(DEAD_LETTER)?;
    let mut delete = tx.prepare_cached(DELETE_RECORD)?;
    for (seq, reason) in rejected {
        dead.execute(params![*seq as i64, reason, now_us])?;
        delete.execute([*seq as i64])?;
    }
    for seq in delivered {
        delete.execute([*seq as i64])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::outbox::{DeliveryMark, OutboxReader};
    use bytes::Bytes;

    fn record(n: u32, delivery: Option<DeliveryMark>) -> NewRecord {
        NewRecord {
            expires_us: None,
            source: "/gateways/t/mqtt".into(),
            event_type: "t".into(),
            subject: Some(format!("room/{n}")),
            time_us: 1_700_000_000_000_000 + n as i64,
            content_type: Some("application/json".into()),
            data: Bytes::from(format!("{{\"n\":{n}}}")),
            delivery,
            file: None,
        }
    }

    fn mark(pkid: u16, dup: bool, digest: u8) -> Option<DeliveryMark> {
        Some(DeliveryMark {
            session: Arc::from("s"),
            pkid,
            dup,
            digest: [digest; 16],
        })
    }

    fn open(dir: &std::path::Path) -> (OutboxWriter, std::thread::JoinHandle<()>, OutboxReader) {
        let path = db::path_in(dir);
        let mut conn = db::open(&path, Synchronous::Normal).unwrap();
        db::migrate(&mut conn).unwrap();
        let (w, h) = OutboxWriter::start(conn, 100).unwrap();
        let r = OutboxReader::open(&path).unwrap();
        (w, h, r)
    }

    #[tokio::test]
    async fn sequences_are_assigned_once_and_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, r) = open(dir.path());
        let mut rxs = Vec::new();
        for n in 0..250 {
            rxs.push(w.append(record(n, None)).await.unwrap());
        }
        let mut seqs = Vec::new();
        for rx in rxs {
            match rx.await.unwrap().unwrap() {
                Appended::Stored { seq } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs, (1..=250).collect::<Vec<_>>());
        let batch = r.read_after(0, 1000, 1 << 20).unwrap();
        assert_eq!(batch.len(), 250);
        assert_eq!(batch[3].subject.as_deref(), Some("room/3"));
        assert!(
            batch.windows(2).all(|p| p[0].id < p[1].id),
            "ids are time-ordered"
        );

        // Deliver everything; the next sequence must not be reused after a restart.
        w.settle(seqs.clone(), vec![]).await.unwrap();
        drop(w);
        h.join().unwrap();
        drop(r);
        let (w, h, r) = open(dir.path());
        assert_eq!(
            w.append_and_wait(record(9, None)).await.unwrap(),
            Appended::Stored { seq: 251 }
        );
        assert_eq!(r.pending().unwrap().count, 1);
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn expired_records_are_dropped_and_counted_by_type_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, r) = open(dir.path());
        let with = |n: u32, ty: &str, expires_us: Option<i64>| NewRecord {
            event_type: ty.into(),
            expires_us,
            ..record(n, None)
        };
        for rec in [
            with(1, "occupancy", Some(100)),
            with(2, "occupancy", Some(150)),
            with(3, "climate", Some(199)),
            with(4, "climate", Some(200)),
            with(5, "alarm", None),
        ] {
            w.append_and_wait(rec).await.unwrap();
        }
        assert_eq!(w.expire(99).await.unwrap(), vec![]);
        assert_eq!(
            w.expire(200).await.unwrap(),
            vec![("climate".to_owned(), 1), ("occupancy".to_owned(), 2)]
        );
        let left: Vec<u64> = r
            .read_after(0, 100, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(left, vec![4, 5], "not yet expired, and no TTL, stay");
        assert_eq!(
            w.expire(i64::MAX).await.unwrap(),
            vec![("climate".to_owned(), 1)]
        );
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn broker_redelivery_is_recognised_but_a_new_message_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, r) = open(dir.path());
        let a = w
            .append_and_wait(record(1, mark(7, false, 0xA)))
            .await
            .unwrap();
        assert_eq!(a, Appended::Stored { seq: 1 });
        // Same packet id, DUP set, same content: the broker re-sent what we committed.
        let b = w
            .append_and_wait(record(1, mark(7, true, 0xA)))
            .await
            .unwrap();
        assert_eq!(b, Appended::Redelivery);
        // Same packet id reused later for different content, even with DUP set: new data.
        let c = w
            .append_and_wait(record(2, mark(7, true, 0xB)))
            .await
            .unwrap();
        assert_eq!(c, Appended::Stored { seq: 2 });
        // Same content but without DUP: the broker sent it anew (a second, equal reading).
        let d = w
            .append_and_wait(record(2, mark(7, false, 0xB)))
            .await
            .unwrap();
        assert_eq!(d, Appended::Stored { seq: 3 });
        drop(w);
        h.join().unwrap();
        // The marks survive a restart.
        let (w, h, _r2) = open(dir.path());
        let e = w
            .append_and_wait(record(2, mark(7, true, 0xB)))
            .await
            .unwrap();
        assert_eq!(e, Appended::Redelivery);
        assert_eq!(r.pending().unwrap().count, 3);
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn rejected_records_move_to_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, r) = open(dir.path());
        for n in 0..3 {
            w.append_and_wait(record(n, None)).await.unwrap();
        }
        w.settle(vec![1, 3], vec![(2, "bad type".into())])
            .await
            .unwrap();
        assert_eq!(r.pending().unwrap().count, 0);
        let conn = rusqlite::Connection::open(db::path_in(dir.path())).unwrap();
        let (seq, reason): (i64, String) = conn
            .query_row("SELECT seq, reason FROM dead_letters", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((seq, reason.as_str()), (2, "bad type"));
        drop(w);
        h.join().unwrap();
    }
}
