//! The outbox's one writer.
//!
//! A dedicated OS thread (rusqlite never runs on the async reactor) owns the write
//! connection. Sources and the uplink send it commands over a bounded channel; when the
//! channel is full, senders wait — that is the backpressure that slows MQTT acks down
//! instead of letting memory grow. Each round drains whatever is queued (up to
//! `commit_max_records`) into ONE transaction, then answers every waiter: group commit.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::marks::Marks;
use super::pack::{Kind, Packer};
use super::quota::{Drops, Incoming, Quota, QuotaSettings, ROW_OVERHEAD};
use super::rule_state::{RulesRun, RulesSetup};
use super::{FileClaim, NewRecord, OutboxError, WhenFull, db, path_bytes};
use crate::stats::Stats;

/// How many commands may wait for the writer before senders are made to wait.
const CHANNEL_CAPACITY: usize = 1024;

/// What became of an appended record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Appended {
    /// Committed with this sequence.
    Stored { seq: u64 },
    /// A broker's re-delivery of a record committed earlier; nothing new was stored.
    Redelivery,
    /// The outbox is full and nothing of its priority or lower was left to drop: this
    /// record (of a `when_full = "drop_oldest"` route) was dropped itself, and counted.
    Dropped,
    /// An edge rule kept it from the relay (`suppress = true`, or report by exception
    /// did not forward it): it is not stored, but what the rules made of it is
    /// committed, so it is acknowledged like a stored record. It used up sequence `seq`.
    Suppressed { seq: u64 },
}

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
    /// (a committed file record forgets its own claim). Answers, per claim added, whether
    /// it was taken: a full outbox refuses what it cannot make room for.
    Claims {
        add: Vec<FileClaim>,
        remove: Vec<String>,
        reply: Reply<Vec<bool>>,
    },
    /// Forgets the marks of kept files (`after_upload = "keep"`) that are gone or changed.
    ForgetKept {
        paths: Vec<std::path::PathBuf>,
        reply: Reply<()>,
    },
    /// The clock for the edge rules (ms since the epoch): closes the windows that are
    /// due and finds silent sensors. Nothing waits for it.
    Tick {
        now_ms: i64,
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
            Command::Tick { .. } => 0,
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
pub(crate) struct OutboxWriter {
    tx: mpsc::Sender<Command>,
    /// Signalled after every commit that stored new records that are not files.
    committed: Arc<Notify>,
    /// Signalled after every commit that stored file records.
    files_committed: Arc<Notify>,
    /// Signalled after every commit that stored events above the default priority.
    urgent: Arc<Notify>,
}

impl OutboxWriter {
    /// Starts the writer thread on an opened and migrated connection, without a disk
    /// budget (tests).
    #[cfg(test)]
    pub(crate) fn start(
        conn: Connection,
        commit_max_records: usize,
    ) -> Result<(Self, std::thread::JoinHandle<()>), OutboxError> {
        Self::start_with(
            conn,
            commit_max_records,
            Arc::new(Stats::default()),
            None,
            None,
        )
    }

    /// [`OutboxWriter::start`], counting commits and committed records in `stats`,
    /// keeping the outbox and the spool within `quota` when given, and running the edge
    /// `rules` when given.
    pub(crate) fn start_with(
        mut conn: Connection,
        commit_max_records: usize,
        stats: Arc<Stats>,
        quota: Option<QuotaSettings>,
        rules: Option<RulesSetup>,
    ) -> Result<(Self, std::thread::JoinHandle<()>), OutboxError> {
        let rules = rules
            .filter(|r| !r.rules.is_empty())
            .map(|r| RulesRun::start(r, &mut conn, stats.clone()))
            .transpose()?;
        let next_seq = db::next_seq(&conn)?;
        let marks = Marks::load(&conn)?;
        let packer = Packer::load(&conn)?;
        let producer = db::producer_id(&conn)?;
        let quota = quota.map(|q| Quota::new(q, &conn)).transpose()?;
        if let Some(q) = &quota {
            stats.outbox_used_bytes.store(q.used(&conn), Relaxed);
        }
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let committed = Arc::new(Notify::new());
        let files_committed = Arc::new(Notify::new());
        let urgent = Arc::new(Notify::new());
        let mut state = WriterState {
            conn,
            next_seq,
            marks,
            max_records: commit_max_records.max(1),
            committed: committed.clone(),
            files_committed: files_committed.clone(),
            urgent: urgent.clone(),
            stats,
            quota,
            drops: DropLog::default(),
            used_at: std::time::Instant::now(),
            packer,
            producer,
            rules,
            // The first look a minute after the start.
            gc_at: std::time::Instant::now() - GC_EVERY + std::time::Duration::from_secs(60),
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
                urgent,
            },
            handle,
        ))
    }

    /// Queues a record for commit. Waits while the writer is saturated. The returned
    /// receiver resolves once the record's transaction committed (or failed).
    pub(crate) async fn append(
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
    pub(crate) async fn append_and_wait(&self, record: NewRecord) -> Result<Appended, OutboxError> {
        self.append(record)
            .await?
            .await
            .map_err(|_| OutboxError::Closed)?
    }

    /// Deletes delivered records and dead-letters rejected ones, in one transaction.
    pub(crate) async fn settle(
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
    pub(crate) async fn expire(&self, now_us: i64) -> Result<Vec<(String, u64)>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Expire { now_us, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Records `add` (files about to move into the spool) and forgets the claims named in
    /// `remove`, in one transaction. Says, per claim added, whether it was taken (a full
    /// outbox refuses a file it cannot make room for).
    pub(crate) async fn claims(
        &self,
        add: Vec<FileClaim>,
        remove: Vec<String>,
    ) -> Result<Vec<bool>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Claims { add, remove, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Forgets the kept-file marks of `paths`.
    pub(crate) async fn forget_kept(
        &self,
        paths: Vec<std::path::PathBuf>,
    ) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::ForgetKept { paths, reply })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Tells the edge rules the time, if the writer is not busy (a busy writer gets the
    /// next one): they close the windows that are due and find silent sensors.
    pub(crate) fn tick(&self, now_ms: i64) {
        let _ = self.tx.try_send(Command::Tick { now_ms });
    }

    /// Resolves once the writer thread took a ping from its queue: it is alive and got
    /// through what was queued before. An error if it has stopped.
    pub(crate) async fn ping(&self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ping(reply))
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    /// Resolves after the next commit that stored records other than files (or at once
    /// if one happened since the last call).
    pub(crate) async fn committed(&self) {
        self.committed.notified().await
    }

    /// Resolves after the next commit that stored file records (or at once if one
    /// happened since the last call).
    pub(crate) async fn files_committed(&self) {
        self.files_committed.notified().await
    }

    /// Resolves after the next commit that stored events (not files) of a priority above
    /// the default (or at once if one happened since the last call).
    pub(crate) async fn urgent_committed(&self) {
        self.urgent.notified().await
    }
}

struct WriterState {
    conn: Connection,
    next_seq: u64,
    /// The MQTT delivery marks.
    marks: Marks,
    max_records: usize,
    committed: Arc<Notify>,
    files_committed: Arc<Notify>,
    urgent: Arc<Notify>,
    stats: Arc<Stats>,
    /// The disk budget, when one is configured.
    quota: Option<Quota>,
    drops: DropLog,
    /// When `outbox_used_bytes` was last measured (at most every second, and after drops).
    used_at: std::time::Instant,
    /// Packs events, and unpacks them for dead letters.
    packer: Packer,
    /// The producer id (packed events' ids derive from it).
    producer: String,
    /// The edge rules, when any are configured.
    rules: Option<RulesRun>,
    /// When replaced dictionaries were last looked for.
    gc_at: std::time::Instant,
}

/// What a full outbox dropped since it last said so: logged at most every
/// [`DROP_LOG_EVERY`], with the counts by event type (the metrics count at once).
#[derive(Debug, Default)]
struct DropLog {
    pending: Drops,
    last: Option<std::time::Instant>,
}

const DROP_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl DropLog {
    fn add(&mut self, dropped: Drops) {
        self.pending.merge(dropped);
    }

    /// Logs what is pending, if it is time (or `force`).
    fn flush(&mut self, force: bool) {
        if self.pending.is_empty()
            || !(force || self.last.is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let now_us = chrono::Utc::now().timestamp_micros();
        for d in self.pending.drain() {
            tracing::warn!(
                r#type = %d.event_type,
                dropped = d.records,
                bytes = d.bytes,
                oldest_age_s = (now_us - d.oldest_us).max(0) / 1_000_000,
                "The outbox is full (outbox.max_bytes, outbox.min_free): dropped the oldest data of the lowest priority to make room (when_full = \"drop_oldest\")."
            );
        }
    }
}

/// What a round's transaction did, for the answers once it committed.
struct Round {
    next_seq: u64,
    /// One per append, in order.
    appended: Vec<Result<Appended, OutboxError>>,
    /// Per expiry, the records deleted, by type.
    expired: Vec<Vec<(String, u64)>>,
    /// Per claims command, which claims were taken.
    claimed: Vec<Vec<bool>>,
    /// What a full outbox dropped to make room.
    dropped: Drops,
    /// Bytes the spool grew (negative: shrank) by.
    spool_delta: i64,
    /// The highest priority of the events the rules derived, if they derived any.
    derived: Option<u8>,
    /// Readings the rules kept from the relay (their sequences are used up).
    suppressed: bool,
    /// What a round of ticks alone derived (computed before deciding it needs a
    /// transaction at all).
    ticked: Option<Vec<pigeon_rules::Derived>>,
}

impl Round {
    fn new(next_seq: u64, commands: usize) -> Round {
        Round {
            next_seq,
            appended: Vec::with_capacity(commands),
            expired: Vec::new(),
            claimed: Vec::new(),
            dropped: Drops::default(),
            spool_delta: 0,
            derived: None,
            suppressed: false,
            ticked: None,
        }
    }
}

/// Which waiters a round that stored records wakes: the batch lane (events), the file
/// lane (files), and the batch lane's linger (events above the default priority).
struct Wakes {
    others: bool,
    files: bool,
    urgent: bool,
}

impl Wakes {
    fn of(batch: &[Command], derived: Option<u8>) -> Wakes {
        let (files, others) = batch.iter().fold((false, false), |(f, o), c| match c {
            Command::Append(rec, _) if rec.file.is_some() => (true, o),
            Command::Append(..) => (f, true),
            _ => (f, o),
        });
        let urgent = batch.iter().any(|c| {
            matches!(c, Command::Append(rec, _)
                if rec.file.is_none() && rec.policy.priority > super::DEFAULT_PRIORITY)
        });
        Wakes {
            others: others || derived.is_some(),
            files,
            urgent: urgent || derived.is_some_and(|p| p > super::DEFAULT_PRIORITY),
        }
    }
}

/// Deletes the dictionaries no record uses any more, when the outbox spans few enough
/// sequences for that to be cheap to find out.
fn delete_unused_dictionaries(
    tx: &Transaction<'_>,
    packer: &mut Packer,
) -> Result<(), OutboxError> {
    let span: i64 = tx.prepare_cached(SEQ_SPAN)?.query_row([], |r| r.get(0))?;
    if span <= GC_SPAN {
        let n = packer.delete_unused(tx)?;
        if n > 0 {
            tracing::debug!(dictionaries = n, "Deleted replaced dictionaries.");
        }
    }
    Ok(())
}

const INSERT_RECORD: &str = "INSERT INTO records
    (seq, id, source, type, subject, time_us, content_type, data, expires_us,
     file, file_size, file_sha256, file_move_to, priority, evictable, packed)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";
const INSERT_CLAIM: &str = "INSERT OR REPLACE INTO file_claims
    (spool, watch, original, rel, dev, ino, copy, size, mtime_ns, committed, claimed_us,
     priority)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";
const DELETE_CLAIM: &str = "DELETE FROM file_claims WHERE spool = ?1";
/// A claim given up: its file is not coming into the spool (unless it is committed).
const DROP_CLAIM: &str =
    "DELETE FROM file_claims WHERE spool = ?1 RETURNING size * (1 - committed)";
const COMMIT_CLAIM: &str = "UPDATE file_claims SET committed = 1 WHERE spool = ?1";
const INSERT_KEPT: &str = "INSERT OR REPLACE INTO kept_files (path, dev, ino, size, mtime_ns)
    VALUES (?1, ?2, ?3, ?4, ?5)";
const DELETE_KEPT: &str = "DELETE FROM kept_files WHERE path = ?1";
const EXPIRED_BY_TYPE: &str = concat!(
    "SELECT ",
    record_type!(),
    " AS t, count(*) FROM records
    WHERE expires_us IS NOT NULL AND expires_us < ?1 GROUP BY t ORDER BY t"
);
const DELETE_EXPIRED: &str = "DELETE FROM records WHERE expires_us IS NOT NULL AND expires_us < ?1";
const SET_NEXT_SEQ: &str = "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)";
const DELETE_RECORD: &str = "DELETE FROM records WHERE seq = ?1 RETURNING coalesce(file_size, 0)";
/// Deletes a record that is not a file (cheaper than a `RETURNING` delete).
const DELETE_EVENT: &str = "DELETE FROM records WHERE seq = ?1 AND file IS NULL";
const DEAD_LETTER: &str = "INSERT OR REPLACE INTO dead_letters
    (seq, id, source, type, subject, time_us, content_type, data, reason, failed_at_us,
     file, file_size, file_sha256, file_move_to, priority, evictable)
    SELECT seq, id, source, type, subject, time_us, content_type, data, ?2, ?3,
     file, file_size, file_sha256, file_move_to, priority, evictable
    FROM records WHERE seq = ?1 AND packed IS NULL";
/// A packed record, to be unpacked into the dead-letter table.
const PACKED_RECORD: &str = "SELECT time_us, data, packed, priority, evictable
    FROM records WHERE seq = ?1 AND packed IS NOT NULL";
const INSERT_DEAD_LETTER: &str = "INSERT OR REPLACE INTO dead_letters
    (seq, id, source, type, subject, time_us, content_type, data, reason, failed_at_us,
     priority, evictable)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";
/// The span of sequences in the outbox: replaced dictionaries are looked for in scans of
/// the records, which wait for an outbox of at most [`GC_SPAN`] sequences.
const SEQ_SPAN: &str = "SELECT coalesce(max(seq) - min(seq), 0) FROM records";
const GC_SPAN: i64 = 100_000;
/// How often the writer looks for replaced dictionaries to delete.
const GC_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

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
        self.drops.flush(true);
        tracing::debug!("The outbox writer stopped: every sender is gone.");
    }

    fn commit_round(&mut self, batch: &mut Vec<Command>) {
        let mut round = Round::new(self.next_seq, batch.len());
        let ticks = tick_time(batch);
        if batch.iter().all(|c| matches!(c, Command::Tick { .. })) {
            // A round of ticks alone needs no transaction unless it derived or changed
            // something: most seconds, nothing is written.
            let Some(rules) = self.rules.as_mut() else {
                batch.clear();
                return;
            };
            let ticked = ticks.map(|now| rules.tick(now)).unwrap_or_default();
            if ticked.is_empty() && !rules.has_changes() {
                rules.publish();
                batch.clear();
                return;
            }
            round.ticked = Some(ticked);
        }
        let result = self.transact(batch, &mut round, ticks);
        let wakes = Wakes::of(batch, round.derived);
        self.account_space(round.spool_delta, result.is_ok(), !round.dropped.is_empty());
        if result.is_ok() && !round.dropped.is_empty() {
            self.count_drops(std::mem::take(&mut round.dropped));
        }
        self.drops.flush(false);
        match &result {
            Ok(_) => {
                self.packer.committed();
                self.marks.committed();
            }
            Err(_) => {
                self.packer.rolled_back();
                self.marks.rolled_back();
                if let Some(rules) = self.rules.as_mut() {
                    rules.rolled_back(&self.conn);
                }
            }
        }
        if let Some(rules) = self.rules.as_mut() {
            rules.publish();
        }
        match result {
            Ok(stored_any) => {
                self.next_seq = round.next_seq;
                self.stats.outbox_commits.fetch_add(1, Relaxed);
                self.stats.outbox_failing.store(false, Relaxed);
                self.answer_committed(batch, round);
                if stored_any {
                    self.wake(wakes);
                }
            }
            Err(e) => self.answer_failed(batch, e),
        }
    }

    /// The round's one transaction: every command in `batch`, in order. Returns whether
    /// any record was stored.
    fn transact(
        &mut self,
        batch: &[Command],
        round: &mut Round,
        ticks: Option<i64>,
    ) -> Result<bool, OutboxError> {
        let appends = batch.iter().any(|c| matches!(c, Command::Append(..)))
            || round.ticked.is_some()
            || (ticks.is_some() && self.rules.is_some());
        // IMMEDIATE: take the write lock first, so the sequence read below cannot be
        // overtaken by another connection (`pigeon-gateway dead-letter retry` assigns
        // sequences from another process while the gateway runs).
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if appends {
            round.next_seq = round.next_seq.max(db::next_seq(&tx)?);
        }
        // Room for this round's new records, made by dropping what may be dropped.
        let verdicts = match self.quota.as_mut() {
            Some(q) if appends => admit(q, &tx, batch, &mut round.dropped)?,
            _ => vec![None; batch.len()],
        };
        for (cmd, verdict) in batch.iter().zip(verdicts) {
            match cmd {
                Command::Append(rec, _) => {
                    let appended = match verdict {
                        Some(v) => v,
                        None => Ok(append_ruled(
                            &tx,
                            rec,
                            round,
                            &mut self.marks,
                            &mut self.packer,
                            &self.producer,
                            self.rules.as_mut(),
                        )?),
                    };
                    round.appended.push(appended);
                }
                Command::Settle {
                    delivered,
                    rejected,
                    ..
                } => {
                    round.spool_delta -=
                        settle(&tx, delivered, rejected, &mut self.packer, &self.producer)? as i64
                }
                Command::Ping(_) | Command::Tick { .. } => {}
                Command::Expire { now_us, .. } => round.expired.push(expire(&tx, *now_us)?),
                Command::Claims { add, remove, .. } => {
                    let (taken, delta) = claims(
                        &tx,
                        self.quota.as_mut(),
                        add,
                        remove,
                        round.spool_delta,
                        &mut round.dropped,
                    )?;
                    round.spool_delta += delta;
                    round.claimed.push(taken);
                }
                Command::ForgetKept { paths, .. } => {
                    let mut del = tx.prepare_cached(DELETE_KEPT)?;
                    for p in paths {
                        del.execute([path_bytes(p)])?;
                    }
                }
            }
        }
        if let Some(rules) = self.rules.as_mut() {
            rules_after_round(rules, &tx, round, ticks)?;
        }
        let stored_any = round.derived.is_some()
            || round
                .appended
                .iter()
                .any(|a| matches!(a, Ok(Appended::Stored { .. })));
        // The next sequence is kept in `meta` only by rounds that delete records: until
        // then the highest record holds it (see `db::next_seq`). A round of appends
        // alone thus writes one page less — most rounds, at a few readings a second. (A
        // suppressed reading uses up a sequence no record holds, so it is kept too.)
        let deletes = !round.dropped.is_empty()
            || round.suppressed
            || batch
                .iter()
                .any(|c| matches!(c, Command::Settle { .. } | Command::Expire { .. }));
        if deletes {
            tx.prepare_cached(SET_NEXT_SEQ)?
                .execute(params![db::META_NEXT_SEQ, round.next_seq as i64])?;
            if self.gc_at.elapsed() >= GC_EVERY {
                self.gc_at = std::time::Instant::now();
                delete_unused_dictionaries(&tx, &mut self.packer)?;
            }
        }
        tx.commit()?;
        Ok(stored_any)
    }

    /// Keeps the quota's count of the spool and the used-bytes gauge up to date.
    fn account_space(&mut self, spool_delta: i64, committed: bool, dropped_any: bool) {
        let Some(q) = self.quota.as_mut() else {
            return;
        };
        // Files evictions removed from the spool are gone whether the transaction
        // committed or not; the rest counts only if it did. The resync every minute
        // mends what this misses.
        if committed {
            q.add_spool(spool_delta);
        } else {
            q.round_failed();
        }
        q.maybe_resync(&self.conn);
        if self.used_at.elapsed() >= std::time::Duration::from_secs(1) || dropped_any {
            self.used_at = std::time::Instant::now();
            self.stats
                .outbox_used_bytes
                .store(q.used(&self.conn), Relaxed);
        }
    }

    /// Counts what a full outbox dropped in a committed round, and queues it for the log.
    fn count_drops(&mut self, dropped: Drops) {
        let (n, bytes) = dropped.totals();
        self.stats.outbox_dropped.fetch_add(n, Relaxed);
        self.stats.outbox_dropped_bytes.fetch_add(bytes, Relaxed);
        self.drops.add(dropped);
    }

    /// Answers every command of a committed round, counting what the stats count.
    fn answer_committed(&mut self, batch: &mut Vec<Command>, round: Round) {
        let mut appended = round.appended.into_iter();
        let mut expired = round.expired.into_iter();
        let mut claimed = round.claimed.into_iter();
        for cmd in batch.drain(..) {
            match cmd {
                Command::Append(rec, reply) => {
                    if let Some(a) = appended.next() {
                        match &a {
                            Ok(Appended::Stored { .. }) => self.stats.count_stored(&rec),
                            Ok(Appended::Suppressed { .. }) => {
                                self.stats.rules_suppressed.fetch_add(1, Relaxed);
                            }
                            Err(OutboxError::Full) => {
                                self.stats.outbox_refused.fetch_add(1, Relaxed);
                            }
                            _ => {}
                        }
                        let _ = reply.send(a);
                    }
                }
                Command::Claims { reply, .. } => {
                    let taken = claimed.next().unwrap_or_default();
                    let refused = taken.iter().filter(|t| !**t).count() as u64;
                    self.stats.outbox_refused.fetch_add(refused, Relaxed);
                    let _ = reply.send(Ok(taken));
                }
                Command::Settle { reply, .. } | Command::ForgetKept { reply, .. } => {
                    let _ = reply.send(Ok(()));
                }
                Command::Ping(reply) => {
                    let _ = reply.send(());
                }
                Command::Tick { .. } => {}
                Command::Expire { reply, .. } => {
                    let counts: Vec<(String, u64)> = expired.next().unwrap_or_default();
                    let n: u64 = counts.iter().map(|(_, c)| c).sum();
                    self.stats.outbox_expired.fetch_add(n, Relaxed);
                    let _ = reply.send(Ok(counts));
                }
            }
        }
    }

    /// Answers every command of a round whose transaction failed and rolled back. The
    /// in-memory state was not touched, so the next round starts clean. Nothing in this
    /// round is acknowledged.
    fn answer_failed(&mut self, batch: &mut Vec<Command>, err: OutboxError) {
        self.stats.outbox_commit_failures.fetch_add(1, Relaxed);
        self.stats.outbox_failing.store(true, Relaxed);
        tracing::error!(error = %err, records = batch.len(), "An outbox commit failed; its data was not acknowledged.");
        for cmd in batch.drain(..) {
            match cmd {
                Command::Append(_, reply) => {
                    let _ = reply.send(Err(err.clone()));
                }
                Command::Claims { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                Command::Settle { reply, .. } | Command::ForgetKept { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                Command::Ping(reply) => {
                    let _ = reply.send(());
                }
                Command::Tick { .. } => {}
                Command::Expire { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// Wakes whoever waits for records of the kinds a round stored.
    fn wake(&self, wakes: Wakes) {
        if wakes.others {
            self.committed.notify_one();
        }
        if wakes.files {
            self.files_committed.notify_one();
        }
        if wakes.urgent {
            self.urgent.notify_one();
        }
    }
}

/// What a record costs the budget as it is written (a file's bytes were counted when it
/// was claimed).
fn record_bytes(rec: &NewRecord) -> u64 {
    rec.data.len() as u64 + ROW_OVERHEAD
}

/// What [`admit`] decided for one command: `None`, it goes in (or is not an append).
type Verdict = Option<Result<Appended, OutboxError>>;

/// Decides, for each command of a round, whether its new record fits: `None` — it goes
/// in; `Some(Ok(Dropped))` — dropped itself (its route lets a full outbox drop);
/// `Some(Err(Full))` — refused (its route does not). Makes room first by dropping, for
/// each priority present (highest first), stored records of that priority or lower —
/// never of a higher one.
fn admit(
    q: &mut Quota,
    tx: &Transaction<'_>,
    batch: &[Command],
    dropped: &mut Drops,
) -> Result<Vec<Verdict>, rusqlite::Error> {
    let mut verdicts = vec![None; batch.len()];
    let appends: Vec<(usize, &NewRecord)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            Command::Append(r, _) => Some((i, r)),
            _ => None,
        })
        .collect();
    let rows = |bytes| Incoming {
        rows: bytes,
        files: 0,
    };
    let total: u64 = appends.iter().map(|(_, r)| record_bytes(r)).sum();
    if q.rows_fit(tx, total) {
        return Ok(verdicts);
    }
    let mut priorities: Vec<u8> = appends.iter().map(|(_, r)| r.policy.priority).collect();
    priorities.sort_unstable_by(|a, b| b.cmp(a));
    priorities.dedup();
    let mut admitted = 0u64;
    for p in priorities {
        let group: Vec<&(usize, &NewRecord)> = appends
            .iter()
            .filter(|(_, r)| r.policy.priority == p)
            .collect();
        // As much of this priority as room can be made for, newest last.
        let mut take = group.len();
        let bytes_of = |n: usize| -> u64 { group[..n].iter().map(|(_, r)| record_bytes(r)).sum() };
        while take > 0 && !q.make_room(tx, p, rows(admitted + bytes_of(take)), dropped)? {
            // Halve what is asked for until it fits (or nothing of it does).
            take /= 2;
        }
        admitted += bytes_of(take);
        for (i, r) in &group[take..] {
            verdicts[*i] = Some(match r.policy.when_full {
                WhenFull::DropOldest => {
                    dropped.count(&r.event_type, record_bytes(r), r.time_us);
                    Ok(Appended::Dropped)
                }
                WhenFull::Refuse => Err(OutboxError::Full),
            });
        }
    }
    Ok(verdicts)
}
/// Records claims — each only if the budget has room for its file, made by dropping what
/// may be dropped at its priority or lower — and forgets given-up ones. `pending` is the
/// change in the spool's bytes earlier in this round. Returns, per claim added, whether
/// it was taken, and the change in the spool's bytes.
fn claims(
    tx: &Transaction<'_>,
    mut quota: Option<&mut Quota>,
    add: &[FileClaim],
    remove: &[String],
    pending: i64,
    dropped: &mut Drops,
) -> Result<(Vec<bool>, i64), rusqlite::Error> {
    let mut taken = Vec::with_capacity(add.len());
    let mut delta = 0i64;
    let mut insert = tx.prepare_cached(INSERT_CLAIM)?;
    for c in add {
        if let Some(q) = quota.as_deref_mut() {
            q.forget_headroom();
            // A file counts from its claim on: it is in the spool a moment later.
            let coming = Incoming {
                rows: ROW_OVERHEAD,
                files: c.size + (pending + delta).max(0) as u64,
            };
            if !q.make_room(tx, c.policy.priority, coming, dropped)? {
                taken.push(false);
                continue;
            }
        }
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
            c.policy.priority,
        ])?;
        delta += c.size as i64;
        taken.push(true);
    }
    let mut delete = tx.prepare_cached(DROP_CLAIM)?;
    for spool in remove {
        let size: Option<i64> = delete.query_row([spool], |r| r.get(0)).optional()?;
        delta -= size.unwrap_or(0);
    }
    Ok((taken, delta))
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

/// The columns of a record's row that name it: empty for a packed event (its names are
/// in its dictionary, its subject in the packed bytes, its id derived).
#[derive(Default)]
struct RowNames<'a> {
    id: &'a [u8],
    source: &'a str,
    event_type: &'a str,
    subject: Option<&'a str>,
    content_type: Option<&'a str>,
}

/// The rules' part of a round, after its readings: the clock (a reading taken with the
/// tick is in its window before the tick closes it), the events it derived, and every
/// state the round changed.
fn rules_after_round(
    rules: &mut RulesRun,
    tx: &Transaction<'_>,
    round: &mut Round,
    ticks: Option<i64>,
) -> Result<(), OutboxError> {
    let ticked = match (round.ticked.take(), ticks) {
        (Some(ticked), _) => ticked,
        (None, Some(now)) => rules.tick(now),
        (None, None) => Vec::new(),
    };
    let top = rules.store(tx, &ticked, &mut round.next_seq)?;
    round.derived = round.derived.max(top);
    rules.save(tx)
}

/// The latest time of the round's ticks, if it has any.
fn tick_time(batch: &[Command]) -> Option<i64> {
    batch
        .iter()
        .filter_map(|c| match c {
            Command::Tick { now_ms } => Some(*now_ms),
            _ => None,
        })
        .max()
}

/// [`append_one`] through the edge rules: a reading they suppress is not stored (its
/// sequence is used up, so that the id the derived events name it by stays its own);
/// the events they derived are stored after it.
#[allow(clippy::too_many_arguments)]
fn append_ruled(
    tx: &Transaction<'_>,
    rec: &NewRecord,
    round: &mut Round,
    marks: &mut Marks,
    packer: &mut Packer,
    producer: &str,
    rules: Option<&mut RulesRun>,
) -> Result<Appended, OutboxError> {
    let Some(rules) = rules else {
        return append_one(tx, rec, &mut round.next_seq, marks, packer, producer);
    };
    if let Some(mark) = &rec.delivery
        && marks.check_and_record(tx, mark)?
    {
        return Ok(Appended::Redelivery);
    }
    let seq = round.next_seq;
    let (suppress, derived) = rules.on_record(rec, producer, seq);
    let appended = if suppress {
        round.next_seq += 1;
        round.suppressed = true;
        Appended::Suppressed { seq }
    } else {
        store_one(tx, rec, &mut round.next_seq, packer, producer)?
    };
    let top = rules.store(tx, &derived, &mut round.next_seq)?;
    round.derived = round.derived.max(top);
    Ok(appended)
}

fn append_one(
    tx: &Transaction<'_>,
    rec: &NewRecord,
    next_seq: &mut u64,
    marks: &mut Marks,
    packer: &mut Packer,
    producer: &str,
) -> Result<Appended, OutboxError> {
    if let Some(mark) = &rec.delivery
        && marks.check_and_record(tx, mark)?
    {
        return Ok(Appended::Redelivery);
    }
    store_one(tx, rec, next_seq, packer, producer)
}

/// Stores a record (whose delivery mark, if any, was checked) with sequence `*next_seq`.
fn store_one(
    tx: &Transaction<'_>,
    rec: &NewRecord,
    next_seq: &mut u64,
    packer: &mut Packer,
    producer: &str,
) -> Result<Appended, OutboxError> {
    let seq = *next_seq;
    let file = rec.file.as_ref().map(|f| &f.file);
    let packed = match file {
        Some(_) => None,
        None => {
            let kind = Kind {
                source: rec.source.clone(),
                event_type: rec.event_type.clone(),
                content_type: rec.content_type.clone(),
            };
            packer.pack(tx, kind, rec.subject.as_deref(), &rec.data)?
        }
    };
    // Derived, as a packed record's is when it is read: every id sorts by receive time.
    let id = super::pack::derived_id(producer, seq, rec.time_us);
    let insert = &mut tx.prepare_cached(INSERT_RECORD)?;
    let names = match &packed {
        // Its names are in the dictionary, its subject in the packed bytes, its id derived.
        Some(_) => RowNames::default(),
        None => RowNames {
            id: &id.as_bytes()[..],
            source: rec.source.as_str(),
            event_type: rec.event_type.as_str(),
            subject: rec.subject.as_deref(),
            content_type: rec.content_type.as_deref(),
        },
    };
    let (dictionary, data) = match &packed {
        Some((dictionary, bytes)) => (Some(*dictionary), &bytes[..]),
        None => (None, &rec.data[..]),
    };
    insert.execute(params![
        seq as i64,
        names.id,
        names.source,
        names.event_type,
        names.subject,
        rec.time_us,
        names.content_type,
        data,
        rec.expires_us,
        file.map(|f| &f.spool),
        file.map(|f| f.size as i64),
        file.map(|f| &f.sha256[..]),
        file.and_then(|f| f.move_to.as_deref()).map(path_bytes),
        rec.policy.priority,
        rec.policy.when_full == WhenFull::DropOldest,
        dictionary,
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

/// Deletes delivered records and dead-letters rejected ones; returns the bytes of the
/// delivered files (the uplink deleted or moved their spool files before).
fn settle(
    tx: &Transaction<'_>,
    delivered: &[u64],
    rejected: &[(u64, String)],
    packer: &mut Packer,
    producer: &str,
) -> Result<u64, OutboxError> {
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut dead = tx.prepare_cached(DEAD_LETTER)?;
    let mut delete = tx.prepare_cached(DELETE_EVENT)?;
    let mut delete_file = tx.prepare_cached(DELETE_RECORD)?;
    // Most are events: a plain delete. What it did not find is a file (whose bytes leave
    // the spool) or already gone.
    let mut gone = |seq: u64| -> Result<u64, rusqlite::Error> {
        if delete.execute([seq as i64])? > 0 {
            return Ok(0);
        }
        let size: Option<i64> = delete_file
            .query_row([seq as i64], |r| r.get(0))
            .optional()?;
        Ok(size.unwrap_or(0).max(0) as u64)
    };
    for (seq, reason) in rejected {
        if dead.execute(params![*seq as i64, reason, now_us])? == 0 {
            dead_letter_packed(tx, *seq, reason, now_us, packer, producer)?;
        }
        gone(*seq)?;
    }
    let mut file_bytes = 0u64;
    for seq in delivered {
        file_bytes += gone(*seq)?;
    }
    Ok(file_bytes)
}

/// Moves a packed record to the dead-letter table unpacked (dead letters are read by
/// `pigeon-gateway dead-letter` as they are, and re-queued as they are).
fn dead_letter_packed(
    tx: &Transaction<'_>,
    seq: u64,
    reason: &str,
    now_us: i64,
    packer: &mut Packer,
    producer: &str,
) -> Result<(), OutboxError> {
    let row = tx
        .prepare_cached(PACKED_RECORD)?
        .query_row([seq as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .optional()?;
    let Some((time_us, data, dictionary, priority, evictable)) = row else {
        return Ok(());
    };
    let ev = packer.unpacker.unpack(tx, seq, dictionary, &data)?;
    let id = super::pack::derived_id(producer, seq, time_us);
    tx.prepare_cached(INSERT_DEAD_LETTER)?.execute(params![
        seq as i64,
        &id.as_bytes()[..],
        ev.kind.source,
        ev.kind.event_type,
        ev.subject,
        time_us,
        ev.kind.content_type,
        ev.data,
        reason,
        now_us,
        priority,
        evictable,
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::db::Synchronous;
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
            policy: crate::outbox::Policy::default(),
        }
    }

    fn mark(pkid: u16, dup: bool, digest: u8) -> Option<DeliveryMark> {
        Some(DeliveryMark {
            session: Arc::from("s"),
            pkid,
            dup,
            digest: [digest; 8],
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

    /// A writer with a disk budget of `room` bytes above what the empty outbox uses now,
    /// and a spool directory.
    fn open_with_budget(
        dir: &std::path::Path,
        room: u64,
    ) -> (
        OutboxWriter,
        std::thread::JoinHandle<()>,
        OutboxReader,
        Arc<Stats>,
    ) {
        let path = db::path_in(dir);
        let mut conn = db::open(&path, Synchronous::Normal).unwrap();
        db::migrate(&mut conn).unwrap();
        let spool = dir.join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let settings = |max| QuotaSettings {
            max_bytes: Some(max),
            min_free: Some(0),
            data_dir: dir.to_owned(),
            spool_dir: spool.clone(),
        };
        let used = Quota::new(settings(0), &conn).unwrap().used(&conn);
        let stats = Arc::new(Stats::default());
        let (w, h) =
            OutboxWriter::start_with(conn, 100, stats.clone(), Some(settings(used + room)), None)
                .unwrap();
        (w, h, OutboxReader::open(&path).unwrap(), stats)
    }

    fn routed(n: u32, ty: &str, priority: u8, when_full: WhenFull, len: usize) -> NewRecord {
        NewRecord {
            event_type: ty.into(),
            data: Bytes::from(crate::outbox::pack::tests::noise(
                u64::from(n) << 8 | u64::from(priority),
                len,
            )),
            policy: crate::outbox::Policy {
                priority,
                when_full,
            },
            ..record(n, None)
        }
    }

    fn left_by_type(r: &OutboxReader) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for rec in r.read_after(0, 100_000, u64::MAX).unwrap() {
            *m.entry(rec.event_type).or_insert(0) += 1;
        }
        m
    }

    #[tokio::test]
    async fn a_full_outbox_drops_the_oldest_of_the_lowest_priority_and_never_a_higher_one() {
        let dir = tempfile::tempdir().unwrap();
        // Room for about 60 records of 4 KiB (each fills a page of its own).
        let (w, h, r, stats) = open_with_budget(dir.path(), 60 * 4096);
        for n in 0..30 {
            let rec = routed(n, "climate", 5, WhenFull::DropOldest, 4000);
            assert!(matches!(
                w.append_and_wait(rec).await.unwrap(),
                Appended::Stored { .. }
            ));
        }
        for n in 0..20 {
            let rec = routed(n, "alarm", 9, WhenFull::Refuse, 4000);
            w.append_and_wait(rec).await.unwrap();
        }
        // Video (priority 2) keeps coming: it can only drop older video.
        for n in 0..40 {
            let rec = routed(n, "video", 2, WhenFull::DropOldest, 4000);
            assert!(matches!(
                w.append_and_wait(rec).await.unwrap(),
                Appended::Stored { .. }
            ));
        }
        let left = left_by_type(&r);
        assert_eq!(left["alarm"], 20, "{left:?}");
        assert_eq!(left["climate"], 30, "climate is above video: {left:?}");
        let video: Vec<String> = r
            .read_after(0, 100_000, u64::MAX)
            .unwrap()
            .into_iter()
            .filter(|rec| rec.event_type == "video")
            .filter_map(|rec| rec.subject)
            .collect();
        assert!(
            !video.is_empty()
                && video.len() < 40
                && video.last().map(String::as_str) == Some("room/39"),
            "the newest video stays, the oldest went: {video:?}"
        );
        // Climate (5) drops video first, then its own oldest; never an alarm.
        for n in 100..160 {
            let rec = routed(n, "climate", 5, WhenFull::DropOldest, 4000);
            w.append_and_wait(rec).await.unwrap();
        }
        let left = left_by_type(&r);
        assert_eq!(left.get("video"), None, "{left:?}");
        assert_eq!(left["alarm"], 20, "{left:?}");
        let climate: Vec<u32> = r
            .read_after(0, 100_000, u64::MAX)
            .unwrap()
            .iter()
            .filter(|rec| rec.event_type == "climate")
            .map(|rec| {
                rec.subject
                    .as_deref()
                    .unwrap()
                    .trim_start_matches("room/")
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(climate.last(), Some(&159), "the newest stay");
        assert!(
            climate[0] > 0,
            "the oldest climate readings went first: {climate:?}"
        );
        assert!(stats.outbox_dropped.load(Relaxed) > 0);
        // Alarms (refuse) that do not fit are refused, not dropped, and nothing older is
        // dropped for them beyond what is below their priority.
        let mut refused = 0;
        for n in 200..400 {
            match w
                .append_and_wait(routed(n, "alarm", 9, WhenFull::Refuse, 4000))
                .await
            {
                Err(OutboxError::Full) => refused += 1,
                Ok(Appended::Stored { .. }) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(refused > 0);
        let left = left_by_type(&r);
        assert!(
            !left.contains_key("climate"),
            "alarms take the room of readings: {left:?}"
        );
        assert_eq!(stats.outbox_refused.load(Relaxed), refused);
        // Nothing of its priority or lower is left: a reading is dropped itself.
        let late = routed(999, "climate", 5, WhenFull::DropOldest, 4000);
        assert_eq!(w.append_and_wait(late).await.unwrap(), Appended::Dropped);
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn a_claim_that_does_not_fit_is_refused_and_evicted_files_leave_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, r, _stats) = open_with_budget(dir.path(), 3_000_000);
        let claim = |name: &str, size: u64, priority: u8| FileClaim {
            spool: name.into(),
            watch: "cams".into(),
            original: dir.path().join("drop").join(name),
            rel: name.into(),
            dev: 1,
            ino: 1,
            copy: false,
            size,
            mtime_ns: 0,
            committed: false,
            claimed_us: 0,
            policy: crate::outbox::Policy {
                priority,
                when_full: WhenFull::DropOldest,
            },
        };
        let commit = |name: &str, size: u64, priority: u8| {
            std::fs::write(
                dir.path().join("spool").join(name),
                vec![0u8; size as usize],
            )
            .unwrap();
            NewRecord {
                file: Some(Box::new(crate::outbox::NewFile {
                    file: crate::outbox::FileRef {
                        spool: name.into(),
                        size,
                        sha256: [0; 32],
                        move_to: None,
                    },
                    kept: None,
                    release_original: false,
                })),
                policy: crate::outbox::Policy {
                    priority,
                    when_full: WhenFull::DropOldest,
                },
                ..record(1, None)
            }
        };
        // Two clips of 1 MB fill most of it.
        for name in ["clip-a", "clip-b"] {
            assert_eq!(
                w.claims(vec![claim(name, 1_000_000, 2)], vec![])
                    .await
                    .unwrap(),
                [true]
            );
            w.append_and_wait(commit(name, 1_000_000, 2)).await.unwrap();
        }
        // A snapshot of a higher priority: the oldest clip is dropped, file and all.
        assert_eq!(
            w.claims(vec![claim("snap", 1_500_000, 5)], vec![])
                .await
                .unwrap(),
            [true]
        );
        assert!(
            !dir.path().join("spool/clip-a").exists(),
            "the evicted clip's file is gone"
        );
        assert!(dir.path().join("spool/clip-b").exists());
        // A clip of the lowest priority cannot drop the snapshot: refused.
        assert_eq!(
            w.claims(vec![claim("clip-c", 1_000_000, 1)], vec![])
                .await
                .unwrap(),
            [false]
        );
        // One too large for the budget even with everything below it gone: refused, and
        // nothing is dropped for it.
        assert_eq!(
            w.claims(vec![claim("huge", 10_000_000, 9)], vec![])
                .await
                .unwrap(),
            [false]
        );
        assert!(
            dir.path().join("spool/clip-b").exists(),
            "dropped for nothing"
        );
        let names: Vec<String> = r.claims().unwrap().into_iter().map(|c| c.spool).collect();
        assert_eq!(names, ["snap"]);
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn batches_take_higher_priorities_first_each_in_sequence_order() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, r) = open(dir.path());
        // seq 1..=6: priorities 5, 9, 2, 9, 5, 2.
        for (n, p) in [5u8, 9, 2, 9, 5, 2].into_iter().enumerate() {
            w.append_and_wait(routed(n as u32, "t", p, WhenFull::DropOldest, 10))
                .await
                .unwrap();
        }
        let seqs = |b: Vec<crate::outbox::Record>| b.iter().map(|r| r.seq).collect::<Vec<_>>();
        let mut cursors = [0u64; 10];
        assert_eq!(
            seqs(r.read_batch(&cursors, false, 3, u64::MAX).unwrap()),
            [2, 4, 1]
        );
        assert_eq!(
            seqs(r.read_batch(&cursors, true, 3, u64::MAX).unwrap()),
            [3, 6, 1]
        );
        // After the alarms (9) and the first reading (5) were sent:
        cursors[9] = 4;
        cursors[5] = 1;
        assert_eq!(
            seqs(r.read_batch(&cursors, false, 10, u64::MAX).unwrap()),
            [5, 3, 6]
        );
        // The byte limit: at least one record, then only what fits.
        assert_eq!(seqs(r.read_batch(&[0; 10], false, 10, 25).unwrap()), [2, 4]);
        assert_eq!(r.read_batch(&[0; 10], false, 10, 1).unwrap().len(), 1);
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn default_priority_events_are_found_after_a_search_that_found_none() {
        // The default priority is not indexed: the reader skips ranges it found empty.
        // Rows that come later, or a cursor sent back, must still find everything.
        let dir = tempfile::tempdir().unwrap();
        let (w, h, r) = open(dir.path());
        let put = |n: u32, p: u8| routed(n, "t", p, WhenFull::DropOldest, 10);
        for (n, p) in [(1, 5), (2, 2), (3, 2)] {
            w.append_and_wait(put(n, p)).await.unwrap();
        }
        let seqs = |b: Vec<crate::outbox::Record>| b.iter().map(|r| r.seq).collect::<Vec<_>>();
        let mut cursors = [0u64; 10];
        cursors[5] = 1;
        cursors[2] = 3;
        assert!(
            r.read_batch(&cursors, false, 10, u64::MAX)
                .unwrap()
                .is_empty()
        );
        for (n, p) in [(4, 5), (5, 2), (6, 9)] {
            w.append_and_wait(put(n, p)).await.unwrap();
        }
        assert_eq!(
            seqs(r.read_batch(&cursors, false, 10, u64::MAX).unwrap()),
            [6, 4, 5]
        );
        cursors[5] = 4;
        assert_eq!(
            seqs(r.read_batch(&cursors, false, 10, u64::MAX).unwrap()),
            [6, 5]
        );
        // Sent again from the start (a cursor set back): all of them.
        assert_eq!(
            seqs(r.read_batch(&[0; 10], false, 10, u64::MAX).unwrap()),
            [6, 1, 4, 2, 3, 5]
        );
        // The oldest waiting default-priority event, as the file lane asks.
        let t = |n: u32| 1_700_000_000_000_000 + n as i64;
        assert!(r.behind_above(2, t(1) + 1).unwrap());
        w.settle(vec![1, 4, 6], vec![]).await.unwrap();
        assert!(!r.behind_above(2, i64::MAX).unwrap(), "none above 2 left");
        w.append_and_wait(put(7, 5)).await.unwrap();
        assert!(r.behind_above(2, t(7) + 1).unwrap(), "a new one is seen");
        assert!(!r.behind_above(2, t(7)).unwrap(), "and its time is its own");
        drop(w);
        h.join().unwrap();
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
        // Rounds of appends alone leave the next sequence to the highest record; a round
        // that deletes writes it down. Either way, none is used twice.
        drop(w);
        h.join().unwrap();
        let (w, h, _r) = open(dir.path());
        assert_eq!(
            w.append_and_wait(record(10, None)).await.unwrap(),
            Appended::Stored { seq: 252 }
        );
        w.settle(vec![251, 252], vec![]).await.unwrap();
        drop(w);
        h.join().unwrap();
        let (w, h, _r) = open(dir.path());
        assert_eq!(
            w.append_and_wait(record(11, None)).await.unwrap(),
            Appended::Stored { seq: 253 }
        );
        let mut expiring = record(12, None);
        expiring.expires_us = Some(1);
        assert_eq!(
            w.append_and_wait(expiring).await.unwrap(),
            Appended::Stored { seq: 254 }
        );
        w.expire(2).await.unwrap();
        w.settle(vec![253], vec![]).await.unwrap();
        drop(w);
        h.join().unwrap();
        let (w, h, r) = open(dir.path());
        assert_eq!(r.pending().unwrap().count, 0);
        assert_eq!(
            w.append_and_wait(record(13, None)).await.unwrap(),
            Appended::Stored { seq: 255 }
        );
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

    /// Readings as the outbox packs them (see outbox::pack) come back as they went in —
    /// with the same ids at every read and after a restart — and leave it unpacked: as
    /// dead letters, and counted by type when they expire.
    #[tokio::test]
    async fn packed_events_read_back_as_committed_and_leave_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, r) = open(dir.path());
        let recs: Vec<NewRecord> = (0..300)
            .map(|n| NewRecord {
                data: Bytes::from(format!(
                    r#"{{"n":{n},"temperature_c":{}.5,"humidity_pct":40,"sensor":"S{n:06}"}}"#,
                    n % 30
                )),
                subject: (n % 10 != 0).then(|| format!("site/room/{}/climate", n % 25)),
                expires_us: (n >= 280).then_some(1_000),
                ..record(n, None)
            })
            .collect();
        for rec in &recs {
            w.append_and_wait(rec.clone()).await.unwrap();
        }
        let conn = rusqlite::Connection::open(db::path_in(dir.path())).unwrap();
        let packed: i64 = conn
            .query_row(
                "SELECT count(*) FROM records WHERE packed IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(packed > 250, "{packed} of 300 packed");
        let stored: i64 = conn
            .query_row(
                "SELECT sum(length(data)) FROM records WHERE packed IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let raw: usize = recs[300 - packed as usize..]
            .iter()
            .map(|r| r.data.len())
            .sum();
        assert!(
            stored as usize * 2 < raw,
            "{stored} B stored for {raw} B of data"
        );
        let batch = r.read_after(0, 1000, u64::MAX).unwrap();
        assert_eq!(batch.len(), 300);
        for (rec, got) in recs.iter().zip(&batch) {
            assert_eq!(
                (
                    &got.source,
                    &got.event_type,
                    &got.subject,
                    &got.content_type,
                    got.time_us
                ),
                (
                    &rec.source,
                    &rec.event_type,
                    &rec.subject,
                    &rec.content_type,
                    rec.time_us
                )
            );
            assert_eq!(got.data, rec.data);
        }
        let ids: Vec<uuid::Uuid> = batch.iter().map(|r| r.id).collect();
        assert!(ids.windows(2).all(|p| p[0] < p[1]), "ids sort as sequences");
        // Within the bytes limit as unpacked, not as stored.
        let some = r
            .read_after(0, 1000, batch[0].data.len() as u64 * 10)
            .unwrap();
        assert_eq!(some.len(), 10);

        // The relay rejects a packed one: its dead letter is plain, id and all.
        w.settle(vec![], vec![(251, "bad schema".into())])
            .await
            .unwrap();
        let (id, data, reason): (Vec<u8>, Vec<u8>, String) = conn
            .query_row("SELECT id, data, reason FROM dead_letters", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        let (source, ty, subject, ct): (String, String, Option<String>, Option<String>) = conn
            .query_row(
                "SELECT source, type, subject, content_type FROM dead_letters",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        let was = &batch[250];
        assert_eq!(was.seq, 251);
        assert_eq!(uuid::Uuid::from_slice(&id).unwrap(), was.id);
        assert_eq!(
            (source, ty, subject, ct),
            (
                was.source.clone(),
                was.event_type.clone(),
                was.subject.clone(),
                was.content_type.clone()
            )
        );
        assert_eq!((data, reason.as_str()), (was.data.clone(), "bad schema"));

        // Expired packed ones are counted by their type.
        assert_eq!(w.expire(2_000).await.unwrap(), vec![("t".to_string(), 20)]);
        drop(w);
        h.join().unwrap();

        // After a restart: the same ids, and new events packed with the same dictionary.
        let (w, h, r) = open(dir.path());
        let again = r.read_after(0, 1000, u64::MAX).unwrap();
        assert_eq!(again.len(), 279);
        assert!(again.iter().all(|g| {
            batch
                .iter()
                .any(|b| b.seq == g.seq && b.id == g.id && b.data == g.data)
        }));
        let Appended::Stored { seq } = w.append_and_wait(recs[5].clone()).await.unwrap() else {
            panic!("not stored")
        };
        let dictionaries: i64 = conn
            .query_row("SELECT count(DISTINCT packed) FROM records", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(dictionaries, 1);
        assert_eq!(
            r.read_after(seq - 1, 1, u64::MAX).unwrap()[0].data,
            recs[5].data
        );
        drop(w);
        h.join().unwrap();
    }
}
