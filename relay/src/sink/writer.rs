//! The sink writer: one thread that owns the stream files and the deduplication index.
//!
//! HTTP handlers send it [`WriteRequest`]s over a bounded channel and wait for the reply.
//! The thread takes everything waiting (a *group*), and for the whole group at once:
//!
//! 1. applies settled-below promises and checks each event against the index (and so
//!    against the rest of the group), marking duplicates;
//! 2. stores the new events in the [stream](super::stream) (the files: one buffer per
//!    file, each touched file fsynced once; Kafka: produced, the broker's acknowledgements
//!    awaited);
//! 3. keeps the index entries of what reached the disk and forgets the rest;
//! 4. replies to every request of the group.
//!
//! Because the check, the write and the index update happen on this one thread, two
//! requests carrying the same event can never both write it. Group commit is what makes
//! the throughput: one fsync covers every request that arrived while the last one ran.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pigeon_shared::ce::GatewayId;
use tokio::sync::{mpsc, oneshot};

use super::NotStored;
use super::checkpoint::{Checkpoint, RecoveryError, recover};
use super::config::SinkSettings;
use super::dedup::DedupIndex;
use super::stream::config::StreamSettings;
use super::stream::{self, Outgoing, Stream};
use crate::data_dir::STATE_DIR;
use crate::metrics::Metrics;

/// Most requests in one group commit.
const MAX_GROUP_REQUESTS: usize = 4096;
/// Most bytes of lines in one group commit.
const MAX_GROUP_BYTES: usize = 64 << 20;

/// One event to store.
#[derive(Debug, Clone)]
pub struct SinkEvent {
    pub gateway: GatewayId,
    pub producer: String,
    pub sequence: u64,
    /// The structured JSON of the event, without a newline.
    pub line: Vec<u8>,
}

/// A gateway's promise never to send sequences below `below` under `producer` again.
#[derive(Debug, Clone)]
pub struct SettledBelow {
    pub gateway: GatewayId,
    pub producer: String,
    pub below: u64,
}

/// What the sink did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written and fsynced (or acknowledged by Kafka) by this request.
    Accepted,
    /// Written durably before; not written again.
    Duplicate,
    /// The stream cannot take this event, ever (see [`NotStored::Rejected`]).
    Rejected(String),
}

/// Why the sink did not store a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    #[error("the stream sink cannot write: {0}")]
    Unavailable(String),
    #[error("the relay is shutting down")]
    ShuttingDown,
}

struct WriteRequest {
    events: Vec<SinkEvent>,
    settled_below: Option<SettledBelow>,
    reply: oneshot::Sender<Result<Vec<Outcome>, SinkError>>,
}

/// Whether an identity is durable already (the index has it).
struct ContainsQuery {
    gateway: GatewayId,
    producer: String,
    sequence: u64,
    reply: oneshot::Sender<bool>,
}

enum Command {
    Write(WriteRequest),
    /// Answered from the index as the writer takes it. Writes still queued or in the
    /// group being collected are not in the index yet, so `false` can be stale — never
    /// `true`: the index holds only what a commit made durable.
    Contains(ContainsQuery),
    /// Wakes the writer to write a due checkpoint.
    Tick,
    /// Answered as the writer takes it: it is alive and not stuck (the watchdog asks).
    Ping(oneshot::Sender<()>),
    /// Finish what is queued before this, write the checkpoint, stop.
    Shutdown(oneshot::Sender<()>),
}

/// The async side's handle on the sink writer.
#[derive(Clone)]
pub struct SinkHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
}

impl SinkHandle {
    /// Stores events (and applies a settled-below promise) durably; one outcome per event.
    /// Waits for room in the queue when the writer is behind.
    pub async fn write(
        &self,
        events: Vec<SinkEvent>,
        settled_below: Option<SettledBelow>,
    ) -> Result<Vec<Outcome>, SinkError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Write(WriteRequest {
                events,
                settled_below,
                reply,
            }))
            .await
            .map_err(|_| SinkError::ShuttingDown)?;
        answer.await.map_err(|_| SinkError::ShuttingDown)?
    }

    /// Whether (gateway, producer, sequence) is already durable in the stream (or below
    /// a settled floor): an event with that identity would be a duplicate.
    pub async fn contains(
        &self,
        gateway: &GatewayId,
        producer: &str,
        sequence: u64,
    ) -> Result<bool, SinkError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Contains(ContainsQuery {
                gateway: gateway.clone(),
                producer: producer.to_owned(),
                sequence,
                reply,
            }))
            .await
            .map_err(|_| SinkError::ShuttingDown)?;
        answer.await.map_err(|_| SinkError::ShuttingDown)
    }

    /// Whether the writer is running and its last write succeeded.
    pub fn healthy(&self) -> bool {
        !self.tx.is_closed() && self.metrics.sink_healthy.load(Relaxed)
    }

    /// Resolves once the writer thread took a ping from its queue (so it is alive and got
    /// through what was queued before); an error if it has stopped.
    pub async fn ping(&self) -> Result<(), SinkError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Ping(reply))
            .await
            .map_err(|_| SinkError::ShuttingDown)?;
        answer.await.map_err(|_| SinkError::ShuttingDown)
    }

    /// Asks the writer to finish the queued requests, write its checkpoint and stop.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Sends a tick every `every` so a due checkpoint is written while idle.
    pub fn spawn_ticker(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                match tx.try_send(Command::Tick) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        })
    }
}

/// Recovers the data dir (and, with Kafka, reads the topics back), writes a first
/// checkpoint (proving the state dir is writable) and starts the writer thread.
pub fn start(
    data_dir: &Path,
    settings: SinkSettings,
    stream: StreamSettings,
    tenants: HashMap<GatewayId, String>,
    metrics: Arc<Metrics>,
) -> Result<(SinkHandle, std::thread::JoinHandle<()>), RecoveryError> {
    let started = Instant::now();
    let mut rec = recover(data_dir)?;
    tracing::info!(
        data_dir = %data_dir.display(),
        from_checkpoint = rec.from_checkpoint,
        files_scanned = rec.files_scanned,
        lines_scanned = rec.lines_scanned,
        torn_bytes_cut = rec.torn_bytes_cut,
        producers = rec.index.producer_count(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Recovered the deduplication index."
    );
    let (stream, healthy) =
        stream::open(data_dir, stream, settings.retry_after, tenants, &mut rec)?;
    if let Some(healthy) = healthy {
        metrics.sink_healthy.store(healthy, Relaxed);
    }
    let mut writer = Writer {
        state_dir: data_dir.join(STATE_DIR),
        stream,
        index: rec.index,
        metrics: metrics.clone(),
        dirty: false,
        last_housekeeping: Instant::now(),
        checkpoint_interval: settings.checkpoint_interval,
    };
    writer.checkpoint().map_err(|source| RecoveryError::Io {
        path: writer.state_dir.clone(),
        source,
    })?;
    let (tx, rx) = mpsc::channel(settings.queue_depth);
    let thread = std::thread::Builder::new()
        .name("pigeon-sink".to_owned())
        .spawn(move || writer.run(rx))
        .map_err(|source| RecoveryError::Io {
            path: PathBuf::from("(sink writer thread)"),
            source,
        })?;
    Ok((SinkHandle { tx, metrics }, thread))
}

struct Writer {
    state_dir: PathBuf,
    stream: Box<dyn Stream>,
    index: DedupIndex,
    metrics: Arc<Metrics>,
    /// Whether the index or the stream's state changed since the last checkpoint written.
    dirty: bool,
    /// When idle files were last forgotten and a due checkpoint written.
    last_housekeeping: Instant,
    checkpoint_interval: Duration,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut stop: Option<Option<oneshot::Sender<()>>> = None;
        let mut group = Vec::new();
        while stop.is_none() {
            let Some(mut next) = rx.blocking_recv() else {
                stop = Some(None);
                break;
            };
            let mut bytes = 0;
            loop {
                match next {
                    Command::Write(w) => {
                        bytes += w.events.iter().map(|e| e.line.len() + 1).sum::<usize>();
                        group.push(w);
                    }
                    Command::Tick => {}
                    Command::Contains(q) => {
                        let known =
                            self.index
                                .contains(q.gateway.as_str(), &q.producer, q.sequence);
                        let _ = q.reply.send(known);
                    }
                    Command::Ping(reply) => {
                        let _ = reply.send(());
                    }
                    Command::Shutdown(done) => {
                        stop = Some(Some(done));
                        break;
                    }
                }
                if group.len() >= MAX_GROUP_REQUESTS || bytes >= MAX_GROUP_BYTES {
                    break;
                }
                match rx.try_recv() {
                    Ok(c) => next = c,
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.commit(std::mem::take(&mut group));
            }
            let upkeep = self.stream.idle(&mut self.index);
            if upkeep.index_changed {
                self.dirty = true;
            }
            if let Some(healthy) = upkeep.healthy {
                self.metrics.sink_healthy.store(healthy, Relaxed);
            }
            if self.last_housekeeping.elapsed() >= self.checkpoint_interval {
                self.last_housekeeping = Instant::now();
                if self.stream.forget_idle() {
                    self.dirty = true;
                }
                if self.dirty {
                    self.checkpoint_logged();
                }
            }
        }
        // Queued requests behind the shutdown get an error when `rx` is dropped.
        drop(rx);
        if self.dirty {
            self.checkpoint_logged();
        }
        tracing::info!("The sink writer stopped.");
        if let Some(Some(done)) = stop {
            let _ = done.send(());
        }
    }

    fn checkpoint(&mut self) -> std::io::Result<()> {
        let mut cp = Checkpoint::capture(&self.index);
        self.stream.save(&mut cp);
        cp.store(&self.state_dir)?;
        self.dirty = false;
        self.metrics.checkpoints_written.fetch_add(1, Relaxed);
        self.metrics
            .dedup_producers
            .store(self.index.producer_count() as u64, Relaxed);
        Ok(())
    }

    fn checkpoint_logged(&mut self) {
        if let Err(e) = self.checkpoint() {
            self.metrics.checkpoint_errors.fetch_add(1, Relaxed);
            tracing::error!(
                dir = %self.state_dir.display(),
                error = %e,
                "Could not write the deduplication checkpoint; a restart will re-read more of the stream."
            );
        }
    }

    /// Makes sure the index holds everything the stream has (see [`Stream::ready`]).
    fn stream_ready(&mut self) -> Result<(), String> {
        match self.stream.ready(&mut self.index) {
            Ok(read) => {
                if read {
                    self.dirty = true;
                    self.metrics.sink_healthy.store(true, Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.sink_healthy.store(false, Relaxed);
                Err(e.to_string())
            }
        }
    }

    fn commit(&mut self, group: Vec<WriteRequest>) {
        let started = Instant::now();
        if let Err(e) = self.stream_ready() {
            self.metrics.sink_errors.fetch_add(1, Relaxed);
            for req in group {
                let _ = req.reply.send(Err(SinkError::Unavailable(e.clone())));
            }
            return;
        }
        // 1. Dedup against the index (which includes this group's earlier events).
        let (inserted, mut outcomes) = self.check(&group);
        // 2. Store: append and fsync, or produce and wait for Kafka.
        let results = self.store(&group, &inserted);
        // 3. Keep what is durable, forget the rest.
        let stored = self.keep_durable(&group, &inserted, &results, &mut outcomes);
        self.compact(&group);
        if !inserted.is_empty() {
            self.dirty = true;
        }
        self.account(&stored, started);
        // 4. Reply.
        reply(group, outcomes, &stored.failed);
    }

    /// Applies each request's settled-below promise and checks every event against the
    /// index, inserting the new ones. Returns where the new events are (request, event)
    /// and one outcome per event: accepted if new, else duplicate.
    fn check(&mut self, group: &[WriteRequest]) -> (Vec<(usize, usize)>, Vec<Vec<Outcome>>) {
        let mut inserted: Vec<(usize, usize)> = Vec::new();
        let mut outcomes: Vec<Vec<Outcome>> = Vec::with_capacity(group.len());
        for (ri, req) in group.iter().enumerate() {
            if let Some(s) = &req.settled_below
                && self
                    .index
                    .raise_floor(s.gateway.as_str(), &s.producer, s.below)
            {
                self.dirty = true;
            }
            let mut out = Vec::with_capacity(req.events.len());
            for (ei, ev) in req.events.iter().enumerate() {
                if self
                    .index
                    .insert(ev.gateway.as_str(), &ev.producer, ev.sequence)
                {
                    inserted.push((ri, ei));
                    out.push(Outcome::Accepted);
                } else {
                    out.push(Outcome::Duplicate);
                }
            }
            outcomes.push(out);
        }
        (inserted, outcomes)
    }

    /// Stores the inserted events in the stream; one result per inserted event.
    fn store(
        &mut self,
        group: &[WriteRequest],
        inserted: &[(usize, usize)],
    ) -> Vec<Result<(), NotStored>> {
        let events: Vec<Outgoing<'_>> = inserted
            .iter()
            .map(|&(ri, ei)| {
                let ev = &group[ri].events[ei];
                Outgoing {
                    gateway: &ev.gateway,
                    line: &ev.line,
                }
            })
            .collect();
        self.stream.store(&events)
    }

    /// Takes the events the stream did not store out of the index, and turns the
    /// outcomes of those it refused for good into rejections.
    fn keep_durable(
        &mut self,
        group: &[WriteRequest],
        inserted: &[(usize, usize)],
        results: &[Result<(), NotStored>],
        outcomes: &mut [Vec<Outcome>],
    ) -> Stored {
        let mut stored = Stored::default();
        let mut rejected: HashMap<(&GatewayId, &str, u64), &String> = HashMap::new();
        for (&(ri, ei), r) in inserted.iter().zip(results) {
            let ev = &group[ri].events[ei];
            let Err(f) = r else {
                stored.written += ev.line.len() as u64 + 1;
                stored.events += 1;
                continue;
            };
            self.index
                .remove(ev.gateway.as_str(), &ev.producer, ev.sequence);
            match f {
                NotStored::Rejected(reason) => {
                    outcomes[ri][ei] = Outcome::Rejected(reason.clone());
                    rejected.insert((&ev.gateway, ev.producer.as_str(), ev.sequence), reason);
                }
                NotStored::Unavailable(msg) => {
                    stored.failures += 1;
                    if !stored.failed.contains_key(&ev.gateway) {
                        stored.failed.insert(ev.gateway.clone(), msg.clone());
                    }
                }
            }
        }
        // A second copy of a rejected event in this group was taken for a duplicate of
        // the first: it was not stored either, and is rejected for the same reason.
        if !rejected.is_empty() {
            for (req, out) in group.iter().zip(outcomes.iter_mut()) {
                for (ev, o) in req.events.iter().zip(out.iter_mut()) {
                    if *o == Outcome::Duplicate
                        && let Some(reason) =
                            rejected.get(&(&ev.gateway, ev.producer.as_str(), ev.sequence))
                    {
                        *o = Outcome::Rejected((*reason).clone());
                    }
                }
            }
        }
        stored
    }

    /// Folds in-order sequences of every producer in the group into its floor.
    fn compact(&mut self, group: &[WriteRequest]) {
        let mut compacted: HashSet<(&GatewayId, &str)> = HashSet::new();
        for req in group {
            for ev in &req.events {
                if compacted.insert((&ev.gateway, &ev.producer)) {
                    self.index.compact(ev.gateway.as_str(), &ev.producer);
                }
            }
        }
    }

    /// Counts the commit and says whether the stream is healthy.
    fn account(&self, stored: &Stored, started: Instant) {
        let m = &self.metrics;
        m.stream_bytes_written.fetch_add(stored.written, Relaxed);
        m.sink_commits.fetch_add(1, Relaxed);
        m.sink_commit_seconds.observe(started.elapsed());
        if stored.failed.is_empty() {
            if stored.events > 0 {
                m.sink_healthy.store(true, Relaxed);
            }
            return;
        }
        m.sink_errors.fetch_add(stored.failures as u64, Relaxed);
        m.sink_healthy.store(false, Relaxed);
        let first = stored.failed.values().next().map_or("", String::as_str);
        tracing::error!(
            failed_events = stored.failures,
            gateways = stored.failed.len(),
            first_error = %first,
            "Could not write to the stream; the affected requests are answered 503 and their gateways keep the events."
        );
    }
}

/// What storing a group's new events came to.
#[derive(Default)]
struct Stored {
    /// Bytes of the lines stored, newlines included.
    written: u64,
    /// Events stored.
    events: usize,
    /// Events the stream could not take now.
    failures: usize,
    /// Each gateway with such an event, and the first error.
    failed: HashMap<GatewayId, String>,
}

/// Answers every request of the group. A request fails if any of its events, accepted or
/// duplicate, is of a gateway whose write failed: a duplicate may be of an event written
/// earlier in this same group, which is durable only if that write was.
fn reply(
    group: Vec<WriteRequest>,
    outcomes: Vec<Vec<Outcome>>,
    failed: &HashMap<GatewayId, String>,
) {
    for (req, out) in group.into_iter().zip(outcomes) {
        let answer = match req.events.iter().find_map(|ev| failed.get(&ev.gateway)) {
            None => Ok(out),
            Some(e) => Err(SinkError::Unavailable(e.clone())),
        };
        let _ = req.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pigeon_shared::ce::format_sequence;

    fn settings() -> SinkSettings {
        SinkSettings {
            checkpoint_interval: Duration::from_millis(10),
            queue_depth: 64,
            retry_after: Duration::from_secs(1),
        }
    }

    fn start_files(
        dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<(SinkHandle, std::thread::JoinHandle<()>), RecoveryError> {
        start(
            dir,
            settings(),
            StreamSettings::Files,
            HashMap::new(),
            metrics,
        )
    }

    fn ev(gw: &str, producer: &str, seq: u64) -> SinkEvent {
        SinkEvent {
            gateway: GatewayId::new(gw).unwrap(),
            producer: producer.to_owned(),
            sequence: seq,
            line: format!(
                "{{\"id\":\"{seq}\",\"producerid\":\"{producer}\",\"sequence\":\"{}\"}}",
                format_sequence(seq)
            )
            .into_bytes(),
        }
    }

    fn stream_lines(dir: &Path) -> Vec<String> {
        let mut lines = Vec::new();
        let mut stack = vec![dir.join("stream")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let text = std::fs::read_to_string(&p).unwrap();
                    lines.extend(text.lines().map(str::to_owned));
                }
            }
        }
        lines.sort();
        lines
    }

    #[tokio::test]
    async fn duplicates_within_a_request_and_across_requests() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, thread) = start_files(dir.path(), Arc::new(Metrics::new())).unwrap();
        let out = sink
            .write(
                vec![ev("pi-1", "p", 1), ev("pi-1", "p", 2), ev("pi-1", "p", 1)],
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            out,
            [Outcome::Accepted, Outcome::Accepted, Outcome::Duplicate]
        );
        let out = sink
            .write(vec![ev("pi-1", "p", 2), ev("pi-1", "p", 3)], None)
            .await
            .unwrap();
        assert_eq!(out, [Outcome::Duplicate, Outcome::Accepted]);
        assert_eq!(stream_lines(dir.path()).len(), 3);
        sink.shutdown().await;
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn contains_answers_from_the_durable_index() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, thread) = start_files(dir.path(), Arc::new(Metrics::new())).unwrap();
        let pi1 = GatewayId::new("pi-1").unwrap();
        assert!(!sink.contains(&pi1, "p", 1).await.unwrap());
        sink.write(vec![ev("pi-1", "p", 1)], None).await.unwrap();
        assert!(sink.contains(&pi1, "p", 1).await.unwrap());
        assert!(!sink.contains(&pi1, "p", 2).await.unwrap());
        assert!(!sink.contains(&pi1, "q", 1).await.unwrap());
        let pi2 = GatewayId::new("pi-2").unwrap();
        assert!(!sink.contains(&pi2, "p", 1).await.unwrap());
        sink.shutdown().await;
        thread.join().unwrap();
        assert!(sink.contains(&pi1, "p", 1).await.is_err(), "stopped");
    }

    #[tokio::test]
    async fn concurrent_requests_with_the_same_events_write_them_once() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, thread) = start_files(dir.path(), Arc::new(Metrics::new())).unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let sink = sink.clone();
                tokio::spawn(async move {
                    sink.write((0..50).map(|s| ev("pi-1", "p", s)).collect(), None)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut accepted = 0;
        for t in tasks {
            accepted += t
                .await
                .unwrap()
                .iter()
                .filter(|o| **o == Outcome::Accepted)
                .count();
        }
        assert_eq!(accepted, 50);
        assert_eq!(stream_lines(dir.path()).len(), 50);
        sink.shutdown().await;
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn settled_below_makes_old_sequences_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, thread) = start_files(dir.path(), Arc::new(Metrics::new())).unwrap();
        let settled_below = SettledBelow {
            gateway: GatewayId::new("pi-1").unwrap(),
            producer: "p".to_owned(),
            below: 100,
        };
        let out = sink
            .write(
                vec![ev("pi-1", "p", 99), ev("pi-1", "p", 100)],
                Some(settled_below),
            )
            .await
            .unwrap();
        assert_eq!(out, [Outcome::Duplicate, Outcome::Accepted]);
        // Another gateway's producer with the same id is not affected.
        let out = sink.write(vec![ev("pi-2", "p", 99)], None).await.unwrap();
        assert_eq!(out, [Outcome::Accepted]);
        sink.shutdown().await;
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn the_index_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, thread) = start_files(dir.path(), Arc::new(Metrics::new())).unwrap();
        sink.write((0..10).map(|s| ev("pi-1", "p", s)).collect(), None)
            .await
            .unwrap();
        sink.shutdown().await;
        thread.join().unwrap();

        let (sink, thread) = start_files(dir.path(), Arc::new(Metrics::new())).unwrap();
        let out = sink
            .write(vec![ev("pi-1", "p", 9), ev("pi-1", "p", 10)], None)
            .await
            .unwrap();
        assert_eq!(out, [Outcome::Duplicate, Outcome::Accepted]);
        sink.shutdown().await;
        thread.join().unwrap();
        assert_eq!(stream_lines(dir.path()).len(), 11);
    }

    #[tokio::test]
    async fn the_checkpoint_is_written_soon_after_a_write_while_idle() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, thread) = start_files(dir.path(), Arc::new(Metrics::new())).unwrap();
        let ticker = sink.spawn_ticker(Duration::from_millis(10));
        sink.write(vec![ev("pi-1", "p", 0), ev("pi-1", "p", 1)], None)
            .await
            .unwrap();
        let state = dir.path().join(STATE_DIR);
        let mut floor = None;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let cp = Checkpoint::load(&state).unwrap().unwrap();
            floor = cp.producers.first().map(|p| p.floor);
            if floor.is_some() {
                break;
            }
        }
        assert_eq!(floor, Some(2), "no checkpoint with the write within 2 s");
        ticker.abort();
        sink.shutdown().await;
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn a_failing_file_fails_its_requests_and_forgets_their_events() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (sink, thread) = start_files(dir.path(), metrics.clone()).unwrap();
        // pi-2's directory cannot be created: a plain file is in the way.
        std::fs::write(dir.path().join("stream").join("pi-2"), b"").unwrap();
        let err = sink
            .write(vec![ev("pi-2", "p", 1)], None)
            .await
            .unwrap_err();
        assert!(matches!(err, SinkError::Unavailable(_)), "{err:?}");
        assert!(!sink.healthy());
        // pi-1 still works, and the sink is healthy again after a good write.
        let out = sink.write(vec![ev("pi-1", "p", 1)], None).await.unwrap();
        assert_eq!(out, [Outcome::Accepted]);
        assert!(sink.healthy());
        // Once the obstacle is gone, pi-2's event is accepted, not a duplicate.
        std::fs::remove_file(dir.path().join("stream").join("pi-2")).unwrap();
        let out = sink.write(vec![ev("pi-2", "p", 1)], None).await.unwrap();
        assert_eq!(out, [Outcome::Accepted]);
        sink.shutdown().await;
        thread.join().unwrap();
    }
}
