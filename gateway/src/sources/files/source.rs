//! The running files source.
//!
//! One task owns the [`Tracker`]. Watchers (inotify through `notify`, or polling for
//! network filesystems) feed it events over a bounded channel; when the channel is full
//! the watcher's thread waits, the kernel queues, and if the kernel's queue overflows the
//! next event says so and every watch is scanned again. Finished files are picked up in
//! batches: claimed, taken into the spool and committed (see [`super::spool`]).
//!
//! At start, before anything is watched: claims left by the last run are finished or
//! undone, spool files the outbox does not know are sent as recovered files, and every
//! watch is scanned — files that arrived while the gateway was stopped are taken, and a
//! file taken before is never taken again (it is no longer in the drop directory, or, for
//! `after_upload = "keep"`, its mark says it was sent).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use pigeon_shared::ce::GatewayId;
use pigeon_shared::shutdown::Shutdown;
use pigeon_shared::wire::sha256_hex;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::config::{AfterUpload, FilesConfig, Finished, RECOVERED_WATCH, WatchConfig};
use super::patterns::lossy;
use super::rules::Rules;
use super::tracker::{Candidate, Seen, Stamp, Tracker, WatchId};
use crate::outbox::{
    Appended, FileClaim, FileRef, KeptFile, NewFile, NewRecord, OutboxError, OutboxReader,
    OutboxWriter,
};
use crate::spool::{PickupError, Prepared, Spool, Taken, sync_dirs};
use crate::stats::Stats;

/// Most files picked up in one batch (one claim and one commit transaction).
const BATCH: usize = 64;
/// Events the watcher threads may queue before they wait.
const EVENT_QUEUE: usize = 4096;
/// How soon a file whose pickup failed for a passing reason (outbox or spool full) is
/// tried again, and a watch that could not be set up.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How soon a file the gateway may not read or move is tried again (someone may fix
/// the permissions).
const RETRY_DENIED_AFTER: Duration = Duration::from_secs(60);
/// A file that keeps failing is logged again every this many attempts (about hourly
/// for one retried every minute).
const REMIND_EVERY: u32 = 60;

/// A watch, compiled.
struct WatchRt {
    cfg: WatchConfig,
    rules: Rules,
    /// The CloudEvent source of its files.
    source: String,
    mode: Finished,
    /// Copy its files into the spool: a rename across mounts failed (the kernel could
    /// not say beforehand that the spool is on another mount).
    copy: bool,
    /// Its watcher, once set up (dropping it stops the watch). In a mutex only to make
    /// the source `Sync`; nothing contends for it.
    watcher: std::sync::Mutex<Option<Box<dyn Watcher + Send>>>,
}

impl WatchRt {
    fn is_watching(&self) -> bool {
        self.watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

pub(crate) struct FilesSource {
    config: FilesConfig,
    watches: Vec<WatchRt>,
    /// Rules for spool files the outbox did not know.
    recovered_rules: Rules,
    recovered_source: String,
    spool: Arc<Spool>,
    writer: OutboxWriter,
    reader: Arc<OutboxReader>,
    stats: Arc<Stats>,
    /// Directories whose events are the gateway's own doing (spool, `move_to`).
    excluded: Vec<PathBuf>,
    tracker: Tracker,
    /// Files to try again at the given time (a passing failure).
    deferred: Vec<Scheduled>,
    /// Directories that appeared a moment ago, to scan once more at the given time: a
    /// file written into a new directory before its watch was in place sends no events
    /// (and may still have been open when the directory was first scanned).
    new_dirs: Vec<Scheduled>,
    /// A pickup failed after the file was in the spool: finish its claim soon.
    claims_pending: bool,
    /// Files whose pickup failed, and how many times: counted and logged once each.
    failing: std::collections::HashMap<PathBuf, u32>,
}

/// How long after a new directory appears it is scanned a second time (its watch is in
/// place by then).
const NEW_DIR_RESCAN: Duration = Duration::from_secs(1);

/// A file moved or copied into the spool (or not: `taken` says why).
struct TakenFile {
    watch: WatchId,
    claim: FileClaim,
    taken: Result<Taken, PickupError>,
}

/// A taken file whose record the outbox writer is committing.
struct Committing {
    watch: WatchId,
    claim: FileClaim,
    taken: Taken,
    committed: oneshot::Receiver<Result<Appended, OutboxError>>,
}

/// A path of a watch to look at again at a given time.
#[derive(Debug)]
struct Scheduled {
    at: Instant,
    path: PathBuf,
    watch: WatchId,
}

impl std::ops::Index<WatchId> for Vec<WatchRt> {
    type Output = WatchRt;

    fn index(&self, w: WatchId) -> &WatchRt {
        &self[w.0]
    }
}

impl std::ops::IndexMut<WatchId> for Vec<WatchRt> {
    fn index_mut(&mut self, w: WatchId) -> &mut WatchRt {
        &mut self[w.0]
    }
}

impl FilesSource {
    /// Compiles the watches (validated config) and opens the spool.
    pub(crate) fn new(
        config: FilesConfig,
        gateway: &GatewayId,
        data_dir: &Path,
        writer: OutboxWriter,
        reader: Arc<OutboxReader>,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Self> {
        let spool_dir = config.spool_dir(data_dir);
        let spool = Spool::open(&spool_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the spool directory {} (files.spool_dir): {e}",
                spool_dir.display()
            )
        })?;
        let mut excluded = vec![spool_dir.clone()];
        let mut watches = Vec::new();
        for w in &config.watch {
            let rules = Rules::new(w, &config.ignore).map_err(anyhow::Error::msg)?;
            if let Some(to) = &w.move_to {
                excluded.push(to.clone());
            }
            if w.after_upload != AfterUpload::Keep && !spool.same_filesystem(&w.path) {
                warn!(
                    watch = %w.name,
                    path = %w.path.display(),
                    spool = %spool_dir.display(),
                    "The drop directory is on another filesystem than the spool: every file is copied into the spool instead of moved (twice the disk writes). Put files.spool_dir on the drop directory's filesystem to avoid it."
                );
            }
            watches.push(WatchRt {
                source: gateway.source(&format!("files/{}", w.name)),
                mode: if w.poll { Finished::Quiet } else { w.finished },
                rules,
                copy: false,
                cfg: w.clone(),
                watcher: std::sync::Mutex::new(None),
            });
        }
        let recovered: WatchConfig = WatchConfig {
            name: RECOVERED_WATCH.into(),
            path: spool_dir.clone(),
            recursive: false,
            finished: Finished::Close,
            poll: false,
            poll_interval: pigeon_shared::units::Duration::from_secs(5),
            subject: "{watch}".into(),
            event_type: "io.pigeon.file".into(),
            after_upload: AfterUpload::Delete,
            move_to: None,
            ignore: Vec::new(),
            rules: Vec::new(),
            priority: 2,
            when_full: crate::outbox::WhenFull::DropOldest,
        };
        Ok(Self {
            tracker: Tracker::new(config.quiet_period.get()),
            recovered_rules: Rules::new(&recovered, &[]).map_err(anyhow::Error::msg)?,
            recovered_source: gateway.source(&format!("files/{RECOVERED_WATCH}")),
            config,
            watches,
            spool: Arc::new(spool),
            writer,
            reader,
            stats,
            excluded,
            deferred: Vec::new(),
            new_dirs: Vec::new(),
            claims_pending: false,
            failing: std::collections::HashMap::new(),
        })
    }

    /// The CloudEvent sources of the watches' files, `(name, source)`, for the stats.
    pub(crate) fn sources(config: &FilesConfig, gateway: &GatewayId) -> Vec<(String, String)> {
        config
            .watch
            .iter()
            .map(|w| {
                let input = format!("files/{}", w.name);
                (input.clone(), gateway.source(&input))
            })
            .chain(std::iter::once((
                format!("files/{RECOVERED_WATCH}"),
                gateway.source(&format!("files/{RECOVERED_WATCH}")),
            )))
            .collect()
    }

    /// Runs until `shutdown` stops it. A batch being picked up is finished first.
    pub(crate) async fn run(mut self, mut shutdown: Shutdown) {
        pigeon_shared::sys::ignore_lease_breaks();
        if let Err(e) = self.recover().await {
            error!(error = %e, "Could not finish the pickups the last run left; they are tried again at the next start.");
        }
        let (tx, mut rx) = mpsc::channel::<notify::Result<Event>>(EVENT_QUEUE);
        self.start_watchers(&tx);
        let mut ready = self.scan_all(false).await;
        let mut next_rescan = tokio::time::Instant::now() + self.config.rescan_interval.get();
        let mut next_retry = tokio::time::Instant::now() + RETRY_AFTER;
        loop {
            while !ready.is_empty() && !shutdown.is_stopping() {
                let batch: Vec<_> = ready.drain(..ready.len().min(BATCH)).collect();
                self.pickup(batch).await;
            }
            self.stats
                .files_being_written
                .store(self.tracker.len() as u64, Relaxed);
            let due = self
                .tracker
                .next_due()
                .map(|i| tokio::time::Instant::from_std(i) + Duration::from_millis(5))
                .unwrap_or(next_rescan)
                .min(next_rescan)
                .min(next_retry);
            let due = self
                .new_dirs
                .iter()
                .map(|s| tokio::time::Instant::from_std(s.at))
                .fold(due, std::cmp::min);
            tokio::select! {
                () = shutdown.stopped() => break,
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    ready.extend(self.on_event(ev).await);
                    // Take whatever else is queued before picking up.
                    while ready.len() < BATCH {
                        match rx.try_recv() {
                            Ok(ev) => ready.extend(self.on_event(ev).await),
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(due) => {}
            }
            if shutdown.is_stopping() {
                break;
            }
            let now = tokio::time::Instant::now();
            ready.extend(self.tracker.tick(Instant::now(), stamp_of));
            ready.extend(self.rescan_new_dirs(Instant::now()).await);
            if now >= next_retry {
                next_retry = now + RETRY_AFTER;
                ready.extend(self.take_deferred(Instant::now()));
                if self.watches.iter().any(|w| !w.is_watching()) {
                    self.start_watchers(&tx);
                }
                if std::mem::take(&mut self.claims_pending)
                    && let Err(e) = self.recover().await
                {
                    error!(error = %e, "Could not finish a pickup; retrying.");
                    self.claims_pending = true;
                }
            }
            if now >= next_rescan {
                next_rescan = now + self.config.rescan_interval.get();
                ready.extend(self.scan_all(false).await);
            }
        }
        debug!("The files source stopped.");
    }

    /// Sets up the watchers not set up yet; a failure is logged and retried later.
    fn start_watchers(&mut self, tx: &mpsc::Sender<notify::Result<Event>>) {
        for w in self.watches.iter().filter(|w| !w.is_watching()) {
            let tx = tx.clone();
            let handler = move |ev: notify::Result<Event>| {
                // The watcher's own thread: waiting here is the backpressure.
                let _ = tx.blocking_send(ev);
            };
            let made: notify::Result<Box<dyn Watcher + Send>> = if w.cfg.poll {
                let config =
                    notify::Config::default().with_poll_interval(w.cfg.poll_interval.get());
                notify::PollWatcher::new(handler, config).map(|p| Box::new(p) as _)
            } else {
                notify::RecommendedWatcher::new(handler, notify::Config::default())
                    .map(|p| Box::new(p) as _)
            };
            let mode = if w.cfg.recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match made.and_then(|mut watcher| watcher.watch(&w.cfg.path, mode).map(|()| watcher)) {
                Ok(watcher) => {
                    info!(watch = %w.cfg.name, path = %w.cfg.path.display(), poll = w.cfg.poll, "Watching a drop directory.");
                    *w.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
                }
                Err(e) => {
                    let hint = match &e.kind {
                        notify::ErrorKind::MaxFilesWatch => {
                            " (the kernel's limit of inotify watches is reached: raise fs.inotify.max_user_watches with sysctl)"
                        }
                        notify::ErrorKind::PathNotFound => " (the directory does not exist)",
                        _ => "",
                    };
                    error!(watch = %w.cfg.name, path = %w.cfg.path.display(), error = %e, "Cannot watch a drop directory{hint}; files there are not picked up until it works. Retrying.", hint = hint);
                }
            }
        }
    }

    /// Which watch `path` belongs to, and the path relative to it; `None` for paths of
    /// no watch, in excluded or ignored places.
    fn locate(&self, path: &Path) -> Option<(WatchId, PathBuf)> {
        if self.excluded.iter().any(|x| path.starts_with(x)) {
            return None;
        }
        let (i, w) = self
            .watches
            .iter()
            .enumerate()
            .find(|(_, w)| path.starts_with(&w.cfg.path))?;
        let rel = path.strip_prefix(&w.cfg.path).ok()?.to_owned();
        if rel.as_os_str().is_empty() {
            return None;
        }
        if !w.cfg.recursive && rel.components().count() > 1 {
            return None;
        }
        let ignored = rel
            .components()
            .any(|c| w.rules.ignored(&c.as_os_str().to_string_lossy()));
        (!ignored).then_some((WatchId(i), rel))
    }

    async fn on_event(&mut self, ev: notify::Result<Event>) -> Vec<Candidate> {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                warn!(error = %e, "A watcher reported an error; scanning every drop directory again.");
                return self.scan_all(true).await;
            }
        };
        if ev.need_rescan() {
            warn!(
                "The kernel dropped file events (too many at once); scanning every drop directory again."
            );
            return self.scan_all(true).await;
        }
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut scan_dirs = Vec::new();
        let seen: &[(usize, Seen)] = match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => &[(0, Seen::Closed)],
            EventKind::Access(_) => &[],
            EventKind::Create(CreateKind::Folder) => {
                scan_dirs.extend(ev.paths.iter().cloned());
                &[]
            }
            EventKind::Create(_) => &[(0, Seen::Created)],
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) => &[(0, Seen::Removed)],
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => &[(0, Seen::MovedIn)],
            // notify reports the two halves (From, To) too.
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => &[],
            EventKind::Modify(ModifyKind::Name(_)) => {
                // Which side is unknown: look at what is there now.
                scan_dirs.extend(ev.paths.iter().cloned());
                &[]
            }
            EventKind::Modify(ModifyKind::Metadata(_)) => &[(0, Seen::Touched)],
            EventKind::Modify(_) => &[(0, Seen::Written)],
            EventKind::Remove(_) => &[(0, Seen::Removed)],
            EventKind::Any | EventKind::Other => &[],
        };
        for &(i, s) in seen {
            let Some(path) = ev.paths.get(i) else {
                continue;
            };
            let Some((w, rel)) = self.locate(path) else {
                continue;
            };
            if s == Seen::MovedIn && path.is_dir() {
                // A directory renamed into the watch: what is in it arrived with it.
                scan_dirs.push(path.clone());
                continue;
            }
            if s == Seen::Removed {
                self.tracker.event(path, w, self.watches[w].mode, s, now);
                continue;
            }
            debug!(watch = %self.watches[w].cfg.name, file = ?lossy(&rel), event = ?s, "File event.");
            if let Some(r) = self.tracker.event(path, w, self.watches[w].mode, s, now) {
                ready.push(r);
            }
        }
        for dir in scan_dirs {
            if let Some((w, _)) = self.locate(&dir) {
                ready.extend(self.scan(w, &dir, false).await);
                if !self.new_dirs.iter().any(|s| s.path == dir) {
                    self.new_dirs.push(Scheduled {
                        at: now + NEW_DIR_RESCAN,
                        path: dir,
                        watch: w,
                    });
                }
            }
        }
        ready
    }

    /// Scans again the new directories whose [`NEW_DIR_RESCAN`] is over.
    async fn rescan_new_dirs(&mut self, now: Instant) -> Vec<Candidate> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.new_dirs)
            .into_iter()
            .partition(|s| s.at <= now);
        self.new_dirs = later;
        let mut ready = Vec::new();
        for s in due {
            ready.extend(self.scan(s.watch, &s.path, false).await);
        }
        ready
    }

    /// Scans every watch (at start, periodically, and after lost events).
    async fn scan_all(&mut self, lost_events: bool) -> Vec<Candidate> {
        let mut ready = Vec::new();
        for w in (0..self.watches.len()).map(WatchId) {
            let root = self.watches[w].cfg.path.clone();
            ready.extend(self.scan(w, &root, lost_events).await);
        }
        ready
    }

    /// Scans `dir` (of watch `w`) for files, recursively when the watch is.
    ///
    /// In a `finished = "close"` watch a file nobody has open for writing is finished
    /// now (its writer closed it before anyone was watching: a file in a directory made
    /// a moment ago, or one that arrived while the gateway was stopped); one still open
    /// waits for its close. When the kernel cannot tell (see
    /// [`is_open_for_writing`](pigeon_shared::sys::is_open_for_writing)), the quiet period
    /// decides.
    async fn scan(&mut self, w: WatchId, dir: &Path, lost_events: bool) -> Vec<Candidate> {
        let recursive = self.watches[w].cfg.recursive;
        let mode = self.watches[w].mode;
        let probe = mode == Finished::Close;
        let root = dir.to_owned();
        let found = tokio::task::spawn_blocking(move || list_files(&root, recursive, probe))
            .await
            .unwrap_or_default();
        let now = Instant::now();
        let wall = SystemTime::now();
        let keep = self.watches[w].cfg.after_upload == AfterUpload::Keep;
        let mut ready = Vec::new();
        let mut seen_paths = Vec::new();
        for (path, stamp, writing) in found {
            if self.locate(&path).is_none_or(|(i, _)| i != w) {
                continue;
            }
            if keep {
                seen_paths.push(path.clone());
            }
            match writing {
                Some(false) => {
                    self.tracker.event(&path, w, mode, Seen::Removed, now);
                    ready.push(Candidate { path, watch: w });
                }
                Some(true) => {
                    self.tracker.event(&path, w, mode, Seen::Written, now);
                }
                None => {
                    if let Some(r) = self.tracker.found(&path, w, stamp, now, wall, lost_events) {
                        ready.push(r);
                    }
                }
            }
        }
        if keep && dir == self.watches[w].cfg.path {
            self.forget_kept_gone(w, &seen_paths).await;
        }
        ready
    }

    /// Whether `path` is a kept file that was sent and has not changed since.
    async fn is_kept(&self, path: &Path) -> bool {
        let reader = self.reader.clone();
        let p = path.to_owned();
        let mark = tokio::task::spawn_blocking(move || {
            let mark = reader.kept(&p).ok().flatten()?;
            let now = crate::spool::FileStat::of(&std::fs::symlink_metadata(&p).ok()?);
            Some(
                mark.dev == now.dev
                    && mark.ino == now.ino
                    && mark.size == now.size
                    && mark.mtime_ns == now.mtime_ns,
            )
        })
        .await
        .ok()
        .flatten();
        mark == Some(true)
    }

    /// Forgets the kept marks of watch `w`'s files that a full scan did not find.
    async fn forget_kept_gone(&self, w: WatchId, present: &[PathBuf]) {
        let reader = self.reader.clone();
        let root = self.watches[w].cfg.path.clone();
        let present: HashSet<PathBuf> = present.iter().cloned().collect();
        let gone = tokio::task::spawn_blocking(move || {
            reader.kept_paths().map(|all| {
                all.into_iter()
                    .filter(|p| p.starts_with(&root) && !present.contains(p))
                    .collect::<Vec<_>>()
            })
        })
        .await;
        if let Ok(Ok(gone)) = gone
            && !gone.is_empty()
            && let Err(e) = self.writer.forget_kept(gone).await
        {
            warn!(error = %e, "Could not forget the marks of kept files that are gone.");
        }
    }

    fn take_deferred(&mut self, now: Instant) -> Vec<Candidate> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|d| d.at <= now);
        self.deferred = later;
        due.into_iter()
            .map(|d| Candidate {
                path: d.path,
                watch: d.watch,
            })
            .collect()
    }

    fn defer(&mut self, path: PathBuf, w: WatchId, after: Duration) {
        if !self.deferred.iter().any(|d| d.path == path) {
            self.deferred.push(Scheduled {
                at: Instant::now() + after,
                path,
                watch: w,
            });
        }
    }

    /// Claims, takes and commits a batch of finished files.
    async fn pickup(&mut self, batch: Vec<Candidate>) {
        let batch = self.not_kept(batch).await;
        let prepared = self.prepare(batch).await;
        if prepared.is_empty() {
            return;
        }
        let claimed = self.claim(prepared).await;
        if claimed.is_empty() {
            return;
        }
        let Some(taken) = self.take_into_spool(claimed).await else {
            return;
        };
        self.commit(taken).await;
    }

    /// `batch` without duplicates, and without kept files (after_upload = "keep") that
    /// were sent and have not changed since.
    async fn not_kept(&self, mut batch: Vec<Candidate>) -> Vec<Candidate> {
        let mut unique = HashSet::new();
        batch.retain(|c| unique.insert(c.path.clone()));
        let mut fresh = Vec::with_capacity(batch.len());
        for c in batch {
            if self.watches[c.watch].cfg.after_upload == AfterUpload::Keep
                && self.is_kept(&c.path).await
            {
                continue;
            }
            fresh.push(c);
        }
        fresh
    }

    /// Step 1: opens and checks each file, and gives it its spool name. Files that
    /// cannot be taken are logged and counted ([`Self::failed`]).
    async fn prepare(&mut self, batch: Vec<Candidate>) -> Vec<(WatchId, Prepared)> {
        let now_us = chrono::Utc::now().timestamp_micros();
        let spool = self.spool.clone();
        let jobs: Vec<_> = batch
            .into_iter()
            .filter_map(|Candidate { path, watch: w }| {
                let rel = path
                    .strip_prefix(&self.watches[w].cfg.path)
                    .ok()?
                    .to_owned();
                let wr = &self.watches[w];
                let copy = wr.copy || wr.cfg.after_upload == AfterUpload::Keep;
                Some((path, rel, w, wr.cfg.name.clone(), copy))
            })
            .collect();
        let prepared = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(path, rel, w, name, copy)| {
                    let r = spool.prepare(&name, &path, &rel, copy, now_us);
                    (path, w, r)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut ok: Vec<(WatchId, Prepared)> = Vec::new();
        for (path, w, r) in prepared {
            match r {
                Ok(mut p) => {
                    p.claim.policy = self.watches[w].cfg.policy();
                    ok.push((w, p));
                }
                Err(e) => self.failed(w, &path, e),
            }
        }
        ok
    }

    /// Step 2: claims them all in one transaction; returns the claimed ones (a full
    /// outbox refuses what does not fit).
    async fn claim(&mut self, ok: Vec<(WatchId, Prepared)>) -> Vec<(WatchId, Prepared)> {
        let claims: Vec<FileClaim> = ok.iter().map(|(_, p)| p.claim.clone()).collect();
        let taken = match self.writer.claims(claims, Vec::new()).await {
            Ok(t) => t,
            Err(e) => {
                let files = ok.into_iter().map(|(w, p)| Candidate {
                    path: p.claim.original,
                    watch: w,
                });
                self.outbox_failed(&e, files);
                return Vec::new();
            }
        };
        let (ok, refused): (Vec<_>, Vec<_>) =
            ok.into_iter().zip(taken).partition(|(_, taken)| *taken);
        for ((w, p), _) in refused {
            self.failed(w, &p.claim.original, PickupError::OutboxFull);
        }
        ok.into_iter().map(|(x, _)| x).collect()
    }

    /// Step 3: moves or copies them into the spool, syncs, hashes. `None` if the files'
    /// place in the spool is not durable yet (their claims finish them later).
    async fn take_into_spool(&mut self, ok: Vec<(WatchId, Prepared)>) -> Option<Vec<TakenFile>> {
        let spool = self.spool.clone();
        let taken = tokio::task::spawn_blocking(move || {
            let mut dirs: Vec<PathBuf> = vec![spool.dir().to_owned()];
            let out: Vec<_> = ok
                .into_iter()
                .map(|(watch, p)| {
                    let claim = p.claim.clone();
                    if !claim.copy
                        && let Some(d) = claim.original.parent()
                    {
                        dirs.push(d.to_owned());
                    }
                    let taken = spool.take(p);
                    TakenFile {
                        watch,
                        claim,
                        taken,
                    }
                })
                .collect();
            let synced = sync_dirs(dirs.iter().map(PathBuf::as_path));
            (out, synced)
        })
        .await;
        let Ok((taken, synced)) = taken else {
            error!(
                "A file pickup task failed unexpectedly; its files are finished at the next start."
            );
            self.claims_pending = true;
            return None;
        };
        if let Err(e) = synced {
            // The files are in the spool but their directory entries may not survive a
            // power cut yet: keep the claims (the recovery syncs again), commit nothing.
            error!(error = %e, "Could not sync the spool directory; the files are committed once it works.");
            self.claims_pending = true;
            return None;
        }
        Some(taken)
    }

    /// Step 4: commits a record for each taken file, forgets the claims of the others,
    /// and lets the originals of copied files go.
    async fn commit(&mut self, taken: Vec<TakenFile>) {
        let Some((waits, unclaim)) = self.append_records(taken).await else {
            return;
        };
        let release = self.await_commits(waits).await;
        if !unclaim.is_empty()
            && let Err(e) = self.writer.claims(Vec::new(), unclaim).await
        {
            warn!(error = %e, "Could not forget abandoned claims; they are cleaned up at the next start.");
        }
        self.release_originals(release).await;
    }

    /// Hands a record of each taken file to the outbox writer; returns the commits to
    /// wait for and the claims of the files not taken. `None` if the writer stopped.
    async fn append_records(
        &mut self,
        taken: Vec<TakenFile>,
    ) -> Option<(Vec<Committing>, Vec<String>)> {
        let mut unclaim = Vec::new();
        let mut waits = Vec::new();
        for TakenFile {
            watch: w,
            claim,
            taken: r,
        } in taken
        {
            match r {
                Ok(t) => {
                    let rec = self.record(Some(w), &claim, &t);
                    match self.writer.append(rec).await {
                        Ok(rx) => waits.push(Committing {
                            watch: w,
                            claim,
                            taken: t,
                            committed: rx,
                        }),
                        Err(e) => {
                            error!(error = %e, "The outbox writer stopped; the file is committed at the next start.");
                            return None;
                        }
                    }
                }
                Err(e) => {
                    if self.spool.path(&claim.spool).exists() {
                        // In the spool already; its claim finishes it later.
                        error!(file = ?claim.original, error = %e, "A file was moved into the spool but could not be read there; it is tried again.");
                        self.claims_pending = true;
                    } else {
                        unclaim.push(claim.spool.clone());
                        self.failed(w, &claim.original, e);
                    }
                }
            }
        }
        Some((waits, unclaim))
    }

    /// Waits for each record's commit and logs the picked-up file; returns the claims of
    /// copied files whose originals may go now.
    async fn await_commits(&mut self, waits: Vec<Committing>) -> Vec<FileClaim> {
        let mut release = Vec::new();
        for Committing {
            watch: w,
            claim,
            taken: t,
            committed: rx,
        } in waits
        {
            let copied_away =
                (t.copied || claim.copy) && self.watches[w].cfg.after_upload != AfterUpload::Keep;
            match rx.await {
                Ok(Ok(_)) => {
                    if copied_away {
                        release.push(claim.clone());
                    }
                    if let Some(n) = self.failing.remove(&claim.original) {
                        info!(watch = %self.watches[w].cfg.name, file = ?lossy(&claim.rel), failed_attempts = n, "A file that could not be picked up before was picked up.");
                        self.stats
                            .file_pickups_failing
                            .store(self.failing.len() as u64, Relaxed);
                    }
                    self.stats.files_picked_up.fetch_add(1, Relaxed);
                    self.stats.file_bytes_picked_up.fetch_add(t.size, Relaxed);
                    if t.size == 0 {
                        warn!(watch = %self.watches[w].cfg.name, file = ?lossy(&claim.rel), "An empty file was finished (a camera's failed upload?); it is sent as an empty object.");
                    } else {
                        info!(watch = %self.watches[w].cfg.name, file = ?lossy(&claim.rel), bytes = t.size, spool = %t.spool, "Picked up a file.");
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    // The writer logged why; the claim stays and is finished later.
                    self.claims_pending = true;
                }
            }
        }
        release
    }

    /// Deletes the originals of files copied into the spool whose records are committed,
    /// then their claims. What fails stays claimed and is tried again.
    async fn release_originals(&mut self, claims: Vec<FileClaim>) {
        if claims.is_empty() {
            return;
        }
        let spool = self.spool.clone();
        let results = tokio::task::spawn_blocking(move || {
            claims
                .into_iter()
                .map(|c| {
                    let r = spool.release_original(&c);
                    (c, r)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut done = Vec::new();
        for (c, r) in results {
            match r {
                Ok(_) => done.push(c.spool),
                Err(e) => {
                    error!(file = ?c.original, error = %e, "Cannot delete a file from the drop directory after copying it into the spool; it is tried again (it will not be sent twice).");
                    self.claims_pending = true;
                }
            }
        }
        if let Err(e) = self.writer.claims(Vec::new(), done).await {
            warn!(error = %e, "Could not forget finished claims; they are finished at the next start.");
            self.claims_pending = true;
        }
    }

    /// Logs a file that was not taken, counts it, and defers it if that may help.
    fn failed(&mut self, w: WatchId, path: &Path, e: PickupError) {
        if let PickupError::StillOpen = e {
            // Its end was guessed from a pause; now its close decides.
            debug!(watch = %self.watches[w].cfg.name, file = ?path, "A file is still open for writing; waiting for its writer to close it.");
            self.tracker
                .event(path, w, self.watches[w].mode, Seen::Written, Instant::now());
            return;
        }
        if let PickupError::CrossMount = e
            && !self.watches[w].copy
        {
            warn!(watch = %self.watches[w].cfg.name, spool = %self.spool.dir().display(), "A file cannot be renamed into the spool (another mount, e.g. systemd's ReadWritePaths): files of this watch are copied from now on (twice the disk writes). Put files.spool_dir on the drop directory's mount to avoid it.");
            self.watches[w].copy = true;
            self.defer(path.to_owned(), w, Duration::ZERO);
            return;
        }
        let watch = self.watches[w].cfg.name.clone();
        let file = path
            .strip_prefix(&self.watches[w].cfg.path)
            .map(lossy)
            .unwrap_or_else(|_| lossy(path));
        if let PickupError::Vanished = e {
            self.failing.remove(path);
            info!(watch = %watch, file = ?file, "A finished file was gone before it could be picked up (deleted or renamed by someone else).");
            return;
        }
        // Counted and logged once per file; a file that keeps failing is mentioned again
        // about every REMIND_EVERY attempts.
        let attempts = self.failing.entry(path.to_owned()).or_insert(0);
        *attempts += 1;
        let attempts = *attempts;
        if attempts == 1 {
            self.stats.file_pickup_errors.fetch_add(1, Relaxed);
        }
        let say = attempts == 1 || attempts.is_multiple_of(REMIND_EVERY);
        self.stats
            .file_pickups_failing
            .store(self.failing.len() as u64, Relaxed);
        match &e {
            _ if e.is_transient() => {
                if say {
                    warn!(watch = %watch, file = ?file, reason = e.kind(), error = %e, attempts, "Could not pick up a file; trying again shortly.");
                }
                self.defer(path.to_owned(), w, RETRY_AFTER);
            }
            PickupError::Unreadable(_) | PickupError::CannotMove(_) => {
                if say {
                    error!(watch = %watch, file = ?file, reason = e.kind(), error = %e, attempts, "Cannot pick up a file; it is left where it is and tried again every minute.");
                }
                self.defer(path.to_owned(), w, RETRY_DENIED_AFTER);
            }
            _ => {
                if say {
                    error!(watch = %watch, file = ?file, reason = e.kind(), error = %e, attempts, "Cannot pick up a file; it is left where it is (it is looked at again at the next scan).");
                }
            }
        }
        if !say {
            debug!(watch = %watch, file = ?file, reason = e.kind(), attempts, "Still cannot pick up a file.");
        }
    }

    fn outbox_failed(&mut self, e: &OutboxError, files: impl Iterator<Item = Candidate>) {
        error!(error = %e, "Cannot record files in the outbox (is the disk full?); they stay in the drop directory and are tried again shortly.");
        for c in files {
            self.defer(c.path, c.watch, RETRY_AFTER);
        }
    }

    /// The outbox record of a file taken into the spool; `w` is `None` for a file of no
    /// watch (recovered from the spool).
    fn record(&self, w: Option<WatchId>, claim: &FileClaim, t: &Taken) -> NewRecord {
        let watch = w.and_then(|w| self.watches.get(w.0));
        let (rules, source, watch_name, after, move_to, policy) = match watch {
            Some(wr) => (
                &wr.rules,
                wr.source.as_str(),
                wr.cfg.name.as_str(),
                wr.cfg.after_upload,
                wr.cfg.move_to.as_deref(),
                wr.cfg.policy(),
            ),
            None => (
                &self.recovered_rules,
                self.recovered_source.as_str(),
                RECOVERED_WATCH,
                AfterUpload::Delete,
                None,
                claim.policy,
            ),
        };
        let d = rules.describe(watch_name, &claim.rel, &t.head);
        let name = claim
            .rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| t.spool.clone());
        let modified = chrono::DateTime::from_timestamp_nanos(t.mtime_ns)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let data = serde_json::json!({
            "filename": name,
            "path": lossy(&claim.rel),
            "size": t.size,
            "sha256": sha256_hex(&t.sha256),
            "contenttype": d.content_type,
            "modified": modified,
        });
        let release_original = (t.copied || claim.copy) && after != AfterUpload::Keep;
        let kept = (after == AfterUpload::Keep).then(|| KeptFile {
            path: claim.original.clone(),
            dev: claim.dev,
            ino: claim.ino,
            size: claim.size,
            mtime_ns: claim.mtime_ns,
        });
        NewRecord {
            source: source.to_owned(),
            event_type: d.event_type,
            subject: Some(d.subject),
            // When the gateway took the file (a pickup finished after a restart keeps it).
            time_us: if claim.claimed_us > 0 {
                claim.claimed_us
            } else {
                chrono::Utc::now().timestamp_micros()
            },
            content_type: Some("application/json".into()),
            data: bytes::Bytes::from(serde_json::to_vec(&data).unwrap_or_default()),
            expires_us: None,
            delivery: None,
            file: Some(Box::new(NewFile {
                file: FileRef {
                    spool: t.spool.clone(),
                    size: t.size,
                    sha256: t.sha256,
                    move_to: match after {
                        AfterUpload::Move => move_to.map(|m| m.join(&claim.rel)),
                        _ => None,
                    },
                },
                kept,
                release_original,
            })),
            policy,
        }
    }

    /// Finishes or undoes the claims the last run left, and sends spool files the outbox
    /// does not know as recovered files.
    async fn recover(&mut self) -> Result<(), OutboxError> {
        let reader = self.reader.clone();
        let spool = self.spool.clone();
        let (claims, known, listed) = tokio::task::spawn_blocking(move || {
            let claims = reader.claims()?;
            let known = reader.spool_names()?;
            Ok::<_, OutboxError>((claims, known, spool.list().unwrap_or_default()))
        })
        .await
        .map_err(|_| OutboxError::Closed)??;
        let sorted = self.sort_claims(claims);
        if !sorted.drop.is_empty() {
            self.writer.claims(Vec::new(), sorted.drop).await?;
        }
        self.release_originals(sorted.release).await;
        self.finish_spooled(sorted.finish).await?;
        self.send_orphans(listed, &known).await?;
        self.remove_stray_copies(&known);
        if !sorted.redo.is_empty() {
            self.pickup(sorted.redo).await;
        }
        Ok(())
    }

    /// What each claim left by the last run needs: its original deleted (committed), its
    /// spooled file hashed and committed (in the spool), its pickup done again (not in
    /// the spool, original unchanged) or nothing but the claim dropped.
    fn sort_claims(&self, claims: Vec<FileClaim>) -> SortedClaims {
        let mut sorted = SortedClaims::default();
        for c in claims {
            if c.committed {
                // Sent to the outbox; only the copied original is left to delete.
                sorted.release.push(c);
                continue;
            }
            let w = self
                .watches
                .iter()
                .position(|w| w.cfg.name == c.watch)
                .map(WatchId);
            if self.spool.path(&c.spool).exists() {
                sorted.finish.push((w, c));
                continue;
            }
            let original = std::fs::symlink_metadata(&c.original)
                .ok()
                .map(|m| crate::spool::FileStat::of(&m));
            let same_original = original.is_some_and(|s| s.dev == c.dev && s.ino == c.ino);
            let _ = std::fs::remove_file(self.spool.path(&format!(
                "{}{}",
                c.spool,
                crate::spool::TMP_SUFFIX
            )));
            if same_original && let Some(w) = w {
                info!(file = ?c.original, "A file was being picked up when the gateway stopped; picking it up again.");
                sorted.redo.push(Candidate {
                    path: c.original.clone(),
                    watch: w,
                });
            } else if !same_original {
                warn!(file = ?c.original, "A file was being picked up when the gateway stopped and is gone since; nothing to send.");
            }
            sorted.drop.push(c.spool);
        }
        sorted
    }

    /// Claims whose file reached the spool: sync, hash, commit, then delete the copied
    /// originals.
    async fn finish_spooled(
        &mut self,
        finish: Vec<(Option<WatchId>, FileClaim)>,
    ) -> Result<(), OutboxError> {
        let spool = self.spool.clone();
        let names: Vec<String> = finish.iter().map(|(_, c)| c.spool.clone()).collect();
        let hashed = tokio::task::spawn_blocking(move || {
            let _ = crate::spool::sync_dir(spool.dir());
            names.iter().map(|n| spool.rehash(n)).collect::<Vec<_>>()
        })
        .await
        .map_err(|_| OutboxError::Closed)?;
        let mut copied = Vec::new();
        for ((w, c), t) in finish.into_iter().zip(hashed) {
            match t {
                Ok(t) => {
                    let rec = self.record(w, &c, &t);
                    let release = rec.file.as_ref().is_some_and(|f| f.release_original);
                    self.writer.append_and_wait(rec).await?;
                    info!(file = ?c.original, spool = %c.spool, "Finished a pickup the gateway was doing when it stopped.");
                    if release {
                        copied.push(c);
                    }
                }
                Err(e) => {
                    error!(file = ?c.original, spool = %c.spool, error = %e, "Cannot read a spooled file; it is tried again.");
                    self.claims_pending = true;
                }
            }
        }
        self.release_originals(copied).await;
        Ok(())
    }

    /// Spool files nothing refers to: the outbox lost them (it was damaged and
    /// replaced). Each is sent as a recovered file.
    async fn send_orphans(
        &mut self,
        listed: Vec<String>,
        known: &HashSet<String>,
    ) -> Result<(), OutboxError> {
        let orphans = listed
            .into_iter()
            .filter(|n| !known.contains(n))
            .filter(|n| !n.ends_with(crate::spool::TMP_SUFFIX));
        for name in orphans {
            warn!(spool = ?name, "A spooled file is not in the outbox (was the outbox replaced after damage?); sending it as a recovered file.");
            let spool = self.spool.clone();
            let n = name.clone();
            let Ok(Ok(t)) = tokio::task::spawn_blocking(move || spool.rehash(&n)).await else {
                continue;
            };
            let claim = FileClaim {
                spool: name.clone(),
                watch: RECOVERED_WATCH.into(),
                original: self.spool.path(&name),
                rel: PathBuf::from(&name),
                dev: 0,
                ino: 0,
                copy: false,
                size: t.size,
                mtime_ns: t.mtime_ns,
                committed: false,
                claimed_us: 0,
                policy: crate::outbox::Policy::default(),
            };
            let rec = self.record(None, &claim, &t);
            self.writer.append_and_wait(rec).await?;
        }
        Ok(())
    }

    /// Copies in progress (`.tmp`) that no claim refers to.
    fn remove_stray_copies(&self, known: &HashSet<String>) {
        for name in self.spool.list().unwrap_or_default() {
            if name.ends_with(crate::spool::TMP_SUFFIX)
                && !known.contains(name.trim_end_matches(crate::spool::TMP_SUFFIX))
            {
                let _ = std::fs::remove_file(self.spool.path(&name));
            }
        }
    }
}

/// The claims of the last run, by what they need ([`FilesSource::recover`]).
#[derive(Default)]
struct SortedClaims {
    finish: Vec<(Option<WatchId>, FileClaim)>,
    redo: Vec<Candidate>,
    drop: Vec<String>,
    release: Vec<FileClaim>,
}

/// Size and modification time of `path`, `None` if it is gone.
fn stamp_of(path: &Path) -> Option<Stamp> {
    let m = std::fs::symlink_metadata(path).ok()?;
    Some(Stamp {
        size: m.len(),
        mtime: m.modified().ok()?,
    })
}

/// The files under `dir` (recursively if asked), with their stamps and, when `probe`,
/// whether something has them open for writing (`None`: the kernel cannot tell).
/// Unreadable directories are logged and skipped. Symbolic links are not followed
/// (non-regular files are listed: they are refused, with the reason, at pickup).
fn list_files(dir: &Path, recursive: bool, probe: bool) -> Vec<(PathBuf, Stamp, Option<bool>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(dir = ?d, error = %e, "Cannot list a drop directory.");
                }
                continue;
            }
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            if ft.is_dir() {
                if recursive {
                    stack.push(path);
                }
                continue;
            }
            let Some(s) = stamp_of(&path) else { continue };
            let writing = if probe && ft.is_file() {
                crate::spool::open_for_reading(&path)
                    .ok()
                    .and_then(|f| pigeon_shared::sys::is_open_for_writing(&f))
            } else {
                None
            };
            out.push((path, s, writing));
        }
    }
    out
}
