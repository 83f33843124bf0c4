//! Deciding when a file in a drop directory is finished, as pure logic: no I/O, no clock
//! (the caller passes `now` and a `stat` function), so every case is a plain `#[test]`.
//!
//! * `finished = "close"` watches: a file is finished when its writer closes it after
//!   writing (inotify's close-write), or when it is renamed into its final name (servers
//!   that write a temporary name first). A file written to is never taken before that,
//!   however long its writer pauses. Files no writer was seen on — found by a scan at
//!   start, created as a hard link, or seen again after the kernel's event queue
//!   overflowed — are finished after the quiet period without change.
//! * `finished = "quiet"` watches (and polled ones): every sign of activity restarts the
//!   quiet period; a file is finished once it passed without a change of size or
//!   modification time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::config::Finished;

/// What a watcher saw happen to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Data was written.
    Written,
    /// A writer closed it after writing.
    Closed,
    /// It was renamed into this name.
    MovedIn,
    /// It was created (empty, or as a link).
    Created,
    /// Metadata changed (permissions, times).
    Touched,
    /// It was deleted or renamed away.
    Removed,
}

/// Size and modification time: what "unchanged" compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) size: u64,
    pub(crate) mtime: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A writer was seen; finished when it closes.
    Writing,
    /// Finished once the quiet period passes without change.
    Quiet,
}

#[derive(Debug)]
struct Entry {
    watch: WatchId,
    state: State,
    changed_at: Instant,
    stamp: Option<Stamp>,
}

/// The files not finished yet, by path.
#[derive(Debug)]
pub(crate) struct Tracker {
    quiet: Duration,
    entries: HashMap<PathBuf, Entry>,
}

/// A watch of `files.watch`, by its place in the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct WatchId(pub usize);

/// A finished file, to pick up: its path and its watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) path: PathBuf,
    pub(crate) watch: WatchId,
}

impl Candidate {
    fn new(path: &Path, watch: WatchId) -> Candidate {
        Candidate {
            path: path.to_owned(),
            watch,
        }
    }
}

impl Tracker {
    pub(crate) fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            entries: HashMap::new(),
        }
    }

    /// Files being watched for their end.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A watcher's event for `path` (of watch `watch`); returns the file if this event
    /// finished it.
    pub(crate) fn event(
        &mut self,
        path: &Path,
        watch: WatchId,
        mode: Finished,
        seen: Seen,
        now: Instant,
    ) -> Option<Candidate> {
        if seen == Seen::Removed {
            self.entries.remove(path);
            return None;
        }
        let quiet = |stamp| Entry {
            watch,
            state: State::Quiet,
            changed_at: now,
            stamp,
        };
        match (mode, seen) {
            (Finished::Close, Seen::Closed | Seen::MovedIn) => {
                self.entries.remove(path);
                Some(Candidate::new(path, watch))
            }
            (Finished::Close, Seen::Written) => {
                self.entries.insert(
                    path.to_owned(),
                    Entry {
                        state: State::Writing,
                        ..quiet(None)
                    },
                );
                None
            }
            (Finished::Close, Seen::Created | Seen::Touched) => {
                match self.entries.get_mut(path) {
                    Some(e) if e.state == State::Writing => {}
                    Some(e) => e.changed_at = now,
                    None if seen == Seen::Created => {
                        self.entries.insert(path.to_owned(), quiet(None));
                    }
                    // A chmod or touch of a file nobody is writing is not an upload.
                    None => {}
                }
                None
            }
            (Finished::Quiet, _) => {
                self.entries.insert(path.to_owned(), quiet(None));
                None
            }
            (_, Seen::Removed) => None,
        }
    }

    /// A scan found `path` as it is now (`stamp`). A file already known keeps its state
    /// (unless `lost_events`: the kernel dropped events, so a writer's close may never
    /// be reported and the quiet period decides). A new one is finished at once if it
    /// has not been modified for the quiet period (`now_wall` is the wall clock), else
    /// after the quiet period without change.
    pub(crate) fn found(
        &mut self,
        path: &Path,
        watch: WatchId,
        stamp: Stamp,
        now: Instant,
        now_wall: SystemTime,
        lost_events: bool,
    ) -> Option<Candidate> {
        if let Some(e) = self.entries.get_mut(path) {
            if lost_events && e.state == State::Writing {
                e.state = State::Quiet;
                e.stamp = Some(stamp);
                e.changed_at = now;
            }
            return None;
        }
        let idle = now_wall
            .duration_since(stamp.mtime)
            .is_ok_and(|age| age >= self.quiet);
        if idle {
            return Some(Candidate::new(path, watch));
        }
        self.entries.insert(
            path.to_owned(),
            Entry {
                watch,
                state: State::Quiet,
                changed_at: now,
                stamp: Some(stamp),
            },
        );
        None
    }

    /// The files whose quiet period is over and that `stat` shows unchanged. `stat`
    /// answers `None` for a file that is gone (it is forgotten).
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        mut stat: impl FnMut(&Path) -> Option<Stamp>,
    ) -> Vec<Candidate> {
        let quiet = self.quiet;
        let due: Vec<PathBuf> = self
            .entries
            .iter()
            .filter(|(_, e)| e.state == State::Quiet && now >= e.changed_at + quiet)
            .map(|(p, _)| p.clone())
            .collect();
        let mut ready = Vec::new();
        for path in due {
            let now_stamp = stat(&path);
            let Some(e) = self.entries.get_mut(&path) else {
                continue;
            };
            match now_stamp {
                None => {
                    self.entries.remove(&path);
                }
                Some(s) if e.stamp.is_some_and(|old| old != s) => {
                    e.stamp = Some(s);
                    e.changed_at = now;
                }
                Some(_) => {
                    let watch = e.watch;
                    self.entries.remove(&path);
                    ready.push(Candidate { path, watch });
                }
            }
        }
        ready
    }

    /// When the next quiet period ends, if any file is waiting for one.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.state == State::Quiet)
            .map(|e| e.changed_at + self.quiet)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(path: PathBuf, watch: usize) -> Candidate {
        Candidate {
            path,
            watch: WatchId(watch),
        }
    }

    const QUIET: Duration = Duration::from_secs(30);

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn stamp(size: u64, mtime_secs: u64) -> Stamp {
        Stamp {
            size,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(mtime_secs),
        }
    }

    #[test]
    fn a_file_being_written_waits_for_its_close_however_long_it_pauses() {
        let mut t = Tracker::new(QUIET);
        let t0 = Instant::now();
        let f = p("/drop/cam1/clip.mp4");
        assert_eq!(
            t.event(&f, WatchId(0), Finished::Close, Seen::Created, t0),
            None
        );
        assert_eq!(
            t.event(&f, WatchId(0), Finished::Close, Seen::Written, t0),
            None
        );
        // A stalled upload: ten quiet periods without a byte.
        let later = t0 + QUIET * 10;
        assert!(t.tick(later, |_| Some(stamp(10, 1))).is_empty());
        assert_eq!(t.next_due(), None);
        assert_eq!(
            t.event(&f, WatchId(0), Finished::Close, Seen::Closed, later),
            Some(ready(f.clone(), 0))
        );
        assert!(t.is_empty());
    }

    #[test]
    fn a_rename_into_the_final_name_finishes_it() {
        let mut t = Tracker::new(QUIET);
        let f = p("/drop/snap.jpg");
        assert_eq!(
            t.event(
                &f,
                WatchId(2),
                Finished::Close,
                Seen::MovedIn,
                Instant::now()
            ),
            Some(ready(f, 2))
        );
    }

    #[test]
    fn a_file_created_without_writes_is_taken_after_the_quiet_period() {
        // e.g. a hard link made into the directory.
        let mut t = Tracker::new(QUIET);
        let t0 = Instant::now();
        let f = p("/drop/linked.jpg");
        t.event(&f, WatchId(0), Finished::Close, Seen::Created, t0);
        assert!(t.tick(t0 + QUIET / 2, |_| Some(stamp(5, 1))).is_empty());
        assert_eq!(t.next_due(), Some(t0 + QUIET));
        assert_eq!(
            t.tick(t0 + QUIET, |_| Some(stamp(5, 1))),
            vec![ready(f.clone(), 0)]
        );
        assert!(t.is_empty());
        // A chmod of a file nobody writes is not an upload.
        t.event(&f, WatchId(0), Finished::Close, Seen::Touched, t0);
        assert!(t.is_empty());
    }

    #[test]
    fn quiet_mode_restarts_the_period_on_every_sign_of_activity() {
        let mut t = Tracker::new(QUIET);
        let t0 = Instant::now();
        let f = p("/nfs/cam/clip.avi");
        t.event(&f, WatchId(1), Finished::Quiet, Seen::Written, t0);
        // Closed and reopened: a close is not the end in this mode.
        assert_eq!(
            t.event(
                &f,
                WatchId(1),
                Finished::Quiet,
                Seen::Closed,
                t0 + QUIET / 2
            ),
            None
        );
        assert!(t.tick(t0 + QUIET, |_| Some(stamp(1, 1))).is_empty());
        assert_eq!(
            t.tick(t0 + QUIET / 2 + QUIET, |_| Some(stamp(1, 1))),
            vec![ready(f, 1)]
        );
    }

    #[test]
    fn scans_take_old_files_at_once_and_wait_for_new_ones_to_settle() {
        let mut t = Tracker::new(QUIET);
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let old = p("/drop/old.jpg");
        let fresh = p("/drop/fresh.jpg");
        assert_eq!(
            t.found(&old, WatchId(0), stamp(9, 900), t0, wall, false),
            Some(ready(old, 0))
        );
        assert_eq!(
            t.found(&fresh, WatchId(0), stamp(9, 995), t0, wall, false),
            None
        );
        // It grew meanwhile (a writer the gateway started too late to see open it).
        assert!(t.tick(t0 + QUIET, |_| Some(stamp(20, 1_010))).is_empty());
        assert_eq!(t.next_due(), Some(t0 + QUIET * 2));
        assert_eq!(
            t.tick(t0 + QUIET * 2, |_| Some(stamp(20, 1_010))),
            vec![ready(fresh, 0)]
        );
    }

    #[test]
    fn a_scan_leaves_a_known_writer_alone_unless_events_were_lost() {
        let mut t = Tracker::new(QUIET);
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let f = p("/drop/clip.mp4");
        t.event(&f, WatchId(0), Finished::Close, Seen::Written, t0);
        t.found(&f, WatchId(0), stamp(1, 999), t0, wall, false);
        assert!(t.tick(t0 + QUIET * 3, |_| Some(stamp(1, 999))).is_empty());
        // The queue overflowed: its close may have been among the lost events.
        t.found(&f, WatchId(0), stamp(1, 999), t0 + QUIET * 3, wall, true);
        assert_eq!(
            t.tick(t0 + QUIET * 4, |_| Some(stamp(1, 999))),
            vec![ready(f, 0)]
        );
    }

    #[test]
    fn deleted_files_are_forgotten() {
        let mut t = Tracker::new(QUIET);
        let t0 = Instant::now();
        let a = p("/drop/a.jpg");
        let b = p("/drop/b.jpg");
        t.event(&a, WatchId(0), Finished::Close, Seen::Written, t0);
        t.event(&a, WatchId(0), Finished::Close, Seen::Removed, t0);
        t.event(&b, WatchId(0), Finished::Quiet, Seen::Written, t0);
        // Gone by the time the quiet period ended.
        assert!(t.tick(t0 + QUIET, |_| None).is_empty());
        assert!(t.is_empty());
    }
}
