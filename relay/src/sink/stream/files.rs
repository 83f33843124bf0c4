//! The stream files: `<data_dir>/stream/<gateway-id>/<YYYY-MM-DD>/<HH>.jsonl`, one
//! structured CloudEvent per line, partitioned by the UTC hour in which the relay wrote it.
//!
//! [`StreamFiles`] owns the open file handles and the committed length of every file it
//! knows. Files are append-only logs: only the current hour is written, so a finished hour
//! is never reopened. Nothing here decides what to write; the
//! [writer](crate::sink::writer) does.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pigeon_shared::ce::GatewayId;

use super::{Outgoing, Stream, StreamError, Upkeep};
use crate::data_dir::{STREAM_DIR, ensure_dir, sync_dir};
use crate::sink::NotStored;
use crate::sink::checkpoint::Checkpoint;
use crate::sink::dedup::DedupIndex;

/// After this long without a write, a file's entry is dropped from the table (and so from
/// the checkpoint): every checkpoint since has covered its final length.
pub const FORGET_FILES_AFTER: Duration = Duration::from_secs(2 * 3600);

/// Hours since the Unix epoch, the partition a line goes to.
pub type HourIndex = i64;

pub fn hour_index(t: DateTime<Utc>) -> HourIndex {
    t.timestamp().div_euclid(3600)
}

/// The path of a stream file relative to the data dir, with `/` separators (also the key
/// the checkpoint uses).
pub fn relative_path(gateway: &GatewayId, hour: HourIndex) -> String {
    let start = DateTime::<Utc>::from_timestamp(hour * 3600, 0).unwrap_or_default();
    format!(
        "{STREAM_DIR}/{gateway}/{}/{}.jsonl",
        start.format("%Y-%m-%d"),
        start.format("%H")
    )
}

/// The offset just after the last newline in the first `len` bytes of `file` (0 if none):
/// where a torn final line starts.
pub fn complete_prefix_len(file: &mut File, len: u64) -> io::Result<u64> {
    const BLOCK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(pos) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// One stream file the relay knows.
#[derive(Debug)]
struct FileEntry {
    /// Open while the file belongs to the current hour.
    handle: Option<Arc<File>>,
    /// Bytes known to be complete lines and durable.
    len: u64,
    last_write: Instant,
}

/// The result of appending to one file.
pub type AppendResult = io::Result<()>;

/// Open stream files and the committed length of each.
#[derive(Debug)]
pub struct StreamFiles {
    data_dir: PathBuf,
    files: HashMap<String, FileEntry>,
    /// The hour being written; never goes backwards, even if the clock does.
    hour: HourIndex,
    sync_pool: SyncPool,
}

impl StreamFiles {
    /// Starts with the file lengths recovery found.
    pub fn new(data_dir: PathBuf, known: impl IntoIterator<Item = (String, u64)>) -> Self {
        let now = Instant::now();
        Self {
            data_dir,
            files: known
                .into_iter()
                .map(|(rel, len)| {
                    (
                        rel,
                        FileEntry {
                            handle: None,
                            len,
                            last_write: now,
                        },
                    )
                })
                .collect(),
            hour: HourIndex::MIN,
            sync_pool: SyncPool::new(SYNC_THREADS),
        }
    }

    /// Moves to the hour of `now` (if later) and closes the files of earlier hours.
    /// Returns the hour to write to.
    pub fn advance_hour(&mut self, now: DateTime<Utc>) -> HourIndex {
        let h = hour_index(now);
        if h > self.hour {
            self.hour = h;
            for entry in self.files.values_mut() {
                entry.handle = None;
            }
        }
        self.hour
    }

    /// Every known file and its committed length, for the checkpoint.
    pub fn lengths(&self) -> impl Iterator<Item = (&str, u64)> {
        self.files.iter().map(|(k, e)| (k.as_str(), e.len))
    }

    /// Forgets closed files not written for [`FORGET_FILES_AFTER`]. Returns how many.
    pub fn forget_idle(&mut self) -> usize {
        let before = self.files.len();
        self.files
            .retain(|_, e| e.handle.is_some() || e.last_write.elapsed() < FORGET_FILES_AFTER);
        before - self.files.len()
    }

    /// Opens `rel` for appending, creating directories and the file as needed (syncing
    /// each new entry's parent), and cutting anything beyond the committed length.
    fn open(&mut self, gateway: &GatewayId, rel: &str) -> io::Result<()> {
        if self.files.get(rel).is_some_and(|e| e.handle.is_some()) {
            return Ok(());
        }
        let path = self.data_dir.join(rel);
        let date_dir = path
            .parent()
            .ok_or_else(|| io::Error::other("bad stream path"))?;
        ensure_dir(&self.data_dir.join(STREAM_DIR).join(gateway.as_str()))?;
        ensure_dir(date_dir)?;

        let (file, len) = match OpenOptions::new()
            .append(true)
            .read(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                sync_dir(date_dir)?;
                (f, 0)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let mut f = OpenOptions::new().append(true).read(true).open(&path)?;
                let actual = f.metadata()?.len();
                // Known: anything past the committed length is a failed, unacknowledged
                // write. Unknown (an old hour, recovered and forgotten): its lines are in
                // the index already; only a torn tail needs cutting.
                let keep = match self.files.get(rel) {
                    Some(e) => e.len.min(actual),
                    None => complete_prefix_len(&mut f, actual)?,
                };
                if keep < actual {
                    tracing::warn!(
                        file = %path.display(),
                        from = actual,
                        to = keep,
                        "Cut unacknowledged bytes off the end of a stream file."
                    );
                    f.set_len(keep)?;
                    f.sync_all()?;
                }
                (f, keep)
            }
            Err(e) => return Err(e),
        };
        let entry = self.files.entry(rel.to_owned()).or_insert(FileEntry {
            handle: None,
            len,
            last_write: Instant::now(),
        });
        entry.handle = Some(Arc::new(file));
        entry.len = len;
        Ok(())
    }

    /// Appends each buffer (complete lines) to its file and fsyncs every touched file.
    ///
    /// Returns one result per buffer. A file whose write or fsync failed is cut back to
    /// its committed length and closed, so the next attempt starts clean.
    pub fn append(&mut self, buffers: &[FileAppend]) -> Vec<AppendResult> {
        let mut results: Vec<AppendResult> = Vec::with_capacity(buffers.len());
        // Phase 1: open and write (into the page cache; fast).
        for FileAppend {
            gateway,
            path: rel,
            lines: buf,
        } in buffers
        {
            let r = self.open(gateway, rel).and_then(|()| {
                let entry = self
                    .files
                    .get_mut(rel)
                    .ok_or_else(|| io::Error::other("stream file vanished from the table"))?;
                let mut file: &File = entry
                    .handle
                    .as_deref()
                    .ok_or_else(|| io::Error::other("stream file is not open"))?;
                file.write_all(buf)
            });
            results.push(r);
        }
        // Phase 2: one fsync per file, in parallel when there are several.
        let to_sync: Vec<(usize, Arc<File>)> = buffers
            .iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_ok())
            .filter_map(|(i, b)| {
                self.files
                    .get(&b.path)
                    .and_then(|e| e.handle.clone())
                    .map(|f| (i, f))
            })
            .collect();
        for (i, r) in self.sync_pool.sync(to_sync) {
            results[i] = r;
        }
        // Phase 3: commit lengths, or roll back.
        let now = Instant::now();
        for (b, r) in buffers.iter().zip(results.iter()) {
            let Some(entry) = self.files.get_mut(&b.path) else {
                continue;
            };
            match r {
                Ok(()) => {
                    entry.len += b.lines.len() as u64;
                    entry.last_write = now;
                }
                Err(_) => {
                    if let Some(f) = entry.handle.take() {
                        let cut = f.set_len(entry.len).and_then(|()| f.sync_all());
                        if let Err(e) = cut {
                            tracing::error!(
                                file = %b.path,
                                error = %e,
                                "Could not cut a failed write off a stream file; it will be cut when the file is next opened."
                            );
                        }
                    }
                }
            }
        }
        results
    }
}

impl Stream for StreamFiles {
    fn ready(&mut self, _index: &mut DedupIndex) -> Result<bool, StreamError> {
        // Recovery read every file into the index before the writer started.
        Ok(false)
    }

    /// Appends the events' lines, one buffer per gateway's current stream file, and
    /// fsyncs each touched file once.
    fn store(&mut self, events: &[Outgoing<'_>]) -> Vec<Result<(), NotStored>> {
        if events.is_empty() {
            return Vec::new();
        }
        let hour = self.advance_hour(Utc::now());
        let mut buffers: Vec<FileAppend> = Vec::new();
        let mut buffer_of: HashMap<&GatewayId, usize> = HashMap::new();
        let mut slot = Vec::with_capacity(events.len());
        for ev in events {
            let bi = *buffer_of.entry(ev.gateway).or_insert_with(|| {
                buffers.push(FileAppend {
                    gateway: ev.gateway.clone(),
                    path: relative_path(ev.gateway, hour),
                    lines: Vec::new(),
                });
                buffers.len() - 1
            });
            let lines = &mut buffers[bi].lines;
            lines.extend_from_slice(ev.line);
            lines.push(b'\n');
            slot.push(bi);
        }
        let results = self.append(&buffers);
        slot.into_iter()
            .map(|bi| {
                results[bi]
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| NotStored::Unavailable(format!("{}: {e}", buffers[bi].path)))
            })
            .collect()
    }

    fn idle(&mut self, _index: &mut DedupIndex) -> Upkeep {
        Upkeep::default()
    }

    fn forget_idle(&mut self) -> bool {
        StreamFiles::forget_idle(self) > 0
    }

    fn save(&self, checkpoint: &mut Checkpoint) {
        checkpoint.files = self
            .lengths()
            .map(|(rel, len)| (rel.to_owned(), len))
            .collect();
    }
}

/// One stream file's share of a group commit: the lines to append to it.
#[derive(Debug)]
pub struct FileAppend {
    pub gateway: GatewayId,
    /// The file, relative to the data dir.
    pub path: String,
    /// Whole lines, each ending in a newline.
    pub lines: Vec<u8>,
}

/// Threads that fsync the files of one group commit at the same time: each fsync waits
/// on the device, not the CPU, so with several files the waits overlap. Kept running so
/// a commit does not pay for starting threads.
#[derive(Debug)]
struct SyncPool {
    jobs: Option<mpsc::Sender<SyncJob>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct SyncJob {
    index: usize,
    file: Arc<File>,
    done: mpsc::Sender<(usize, io::Result<()>)>,
}

/// Parallel fsyncs. Each file of a group costs one fsync; with many gateways in a group,
/// more of them in flight at once helps (measured with the ingest bench, 64 gateways on a
/// virtio disk: 8 threads 44k events/s, 32 threads 57k, 64 threads 63k). Idle threads
/// cost only their stacks' address space.
const SYNC_THREADS: usize = 64;

impl SyncPool {
    fn new(size: usize) -> Self {
        let (tx, rx) = mpsc::channel::<SyncJob>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(size);
        for i in 0..size {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pigeon-fsync-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let _ = job.done.send((job.index, job.file.sync_data()));
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!(error = %e, "Could not start an fsync thread; stream files will be synced one after another.");
                    break;
                }
            }
        }
        Self {
            jobs: (!threads.is_empty()).then_some(tx),
            threads,
        }
    }

    /// fsyncs (`sync_data`) every file; one result per file, in no particular order.
    fn sync(&self, files: Vec<(usize, Arc<File>)>) -> Vec<(usize, io::Result<()>)> {
        let Some(jobs) = self.jobs.as_ref().filter(|_| files.len() > 1) else {
            return files.into_iter().map(|(i, f)| (i, f.sync_data())).collect();
        };
        let expected: Vec<usize> = files.iter().map(|(i, _)| *i).collect();
        let (done, results) = mpsc::channel();
        for (index, file) in files {
            let job = SyncJob {
                index,
                file,
                done: done.clone(),
            };
            if let Err(mpsc::SendError(job)) = jobs.send(job) {
                let _ = done.send((job.index, job.file.sync_data()));
            }
        }
        drop(done);
        let mut out: Vec<(usize, io::Result<()>)> = results.iter().collect();
        // A job lost to a panicking thread counts as a failed fsync.
        for i in expected {
            if !out.iter().any(|(j, _)| *j == i) {
                out.push((i, Err(io::Error::other("the fsync thread failed"))));
            }
        }
        out
    }
}

impl Drop for SyncPool {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn file_append(gateway: GatewayId, path: String, lines: Vec<u8>) -> FileAppend {
        FileAppend {
            gateway,
            path,
            lines,
        }
    }

    fn gw(s: &str) -> GatewayId {
        GatewayId::new(s).unwrap()
    }

    #[test]
    fn paths_use_the_utc_hour() {
        let t = DateTime::parse_from_rfc3339("2024-03-05T07:59:59.9+01:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            relative_path(&gw("pi-1"), hour_index(t)),
            "stream/pi-1/2024-03-05/06.jsonl"
        );
    }

    #[test]
    fn the_hour_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = StreamFiles::new(dir.path().to_owned(), []);
        let t1 = DateTime::parse_from_rfc3339("2024-03-05T10:00:00Z")
            .unwrap()
            .to_utc();
        let t0 = DateTime::parse_from_rfc3339("2024-03-05T08:30:00Z")
            .unwrap()
            .to_utc();
        let h = files.advance_hour(t1);
        assert_eq!(files.advance_hour(t0), h);
    }

    #[test]
    fn appends_create_directories_and_count_lengths() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(STREAM_DIR)).unwrap();
        let mut files = StreamFiles::new(dir.path().to_owned(), []);
        let rel = relative_path(&gw("pi-1"), 475_000);
        let rel2 = relative_path(&gw("pi-2"), 475_000);
        let r = files.append(&[
            file_append(gw("pi-1"), rel.clone(), b"{\"a\":1}\n".to_vec()),
            file_append(gw("pi-2"), rel2.clone(), b"{\"b\":2}\n".to_vec()),
        ]);
        assert!(r.iter().all(Result::is_ok), "{r:?}");
        let r = files.append(&[file_append(
            gw("pi-1"),
            rel.clone(),
            b"{\"a\":3}\n".to_vec(),
        )]);
        assert!(r[0].is_ok());
        assert_eq!(
            fs::read_to_string(dir.path().join(&rel)).unwrap(),
            "{\"a\":1}\n{\"a\":3}\n"
        );
        let lengths: HashMap<_, _> = files.lengths().collect();
        assert_eq!(lengths[rel.as_str()], 16);
        assert_eq!(lengths[rel2.as_str()], 8);
    }

    #[test]
    fn reopening_cuts_bytes_past_the_committed_length() {
        let dir = tempfile::tempdir().unwrap();
        let rel = relative_path(&gw("pi-1"), 475_000);
        let path = dir.path().join(&rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{\"a\":1}\n{\"a\":2}\n{\"tor").unwrap();

        // Known at 8 bytes: everything after is cut, complete or not.
        let mut files = StreamFiles::new(dir.path().to_owned(), [(rel.clone(), 8)]);
        files.append(&[file_append(
            gw("pi-1"),
            rel.clone(),
            b"{\"a\":9}\n".to_vec(),
        )]);
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"a\":9}\n");

        // Unknown: only the torn tail is cut.
        fs::write(&path, b"{\"a\":1}\n{\"a\":2}\n{\"tor").unwrap();
        let mut files = StreamFiles::new(dir.path().to_owned(), []);
        files.append(&[file_append(
            gw("pi-1"),
            rel.clone(),
            b"{\"a\":9}\n".to_vec(),
        )]);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":9}\n"
        );
    }

    #[test]
    fn complete_prefix_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut content = vec![b'x'; 70_000];
        content[10] = b'\n';
        content.extend_from_slice(b"tail");
        fs::write(&path, &content).unwrap();
        let mut f = File::open(&path).unwrap();
        assert_eq!(
            complete_prefix_len(&mut f, content.len() as u64).unwrap(),
            11
        );
        fs::write(&path, b"no newline").unwrap();
        let mut f = File::open(&path).unwrap();
        assert_eq!(complete_prefix_len(&mut f, 10).unwrap(), 0);
    }

    #[test]
    fn many_files_in_one_append_are_all_synced_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(STREAM_DIR)).unwrap();
        let mut files = StreamFiles::new(dir.path().to_owned(), []);
        let buffers: Vec<_> = (0..150)
            .map(|i| {
                let g = gw(&format!("gw-{i}"));
                let rel = relative_path(&g, 475_000);
                file_append(g, rel, format!("{{\"n\":{i}}}\n").into_bytes())
            })
            .collect();
        let r = files.append(&buffers);
        assert_eq!(r.len(), 150);
        assert!(r.iter().all(Result::is_ok), "{r:?}");
        let lengths: HashMap<_, _> = files.lengths().collect();
        for b in &buffers {
            assert_eq!(lengths[b.path.as_str()], b.lines.len() as u64);
            assert_eq!(fs::read(dir.path().join(&b.path)).unwrap(), b.lines);
        }
    }

    #[test]
    fn a_failed_write_is_reported_per_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(STREAM_DIR)).unwrap();
        // A plain file where pi-2's directory should be.
        fs::write(dir.path().join(STREAM_DIR).join("pi-2"), b"").unwrap();
        let mut files = StreamFiles::new(dir.path().to_owned(), []);
        let r = files.append(&[
            file_append(gw("pi-1"), relative_path(&gw("pi-1"), 1), b"1\n".to_vec()),
            file_append(gw("pi-2"), relative_path(&gw("pi-2"), 1), b"2\n".to_vec()),
        ]);
        assert!(r[0].is_ok());
        assert!(r[1].is_err());
    }
}
