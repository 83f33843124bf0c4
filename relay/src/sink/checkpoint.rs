//! Making the deduplication index survive restarts and `SIGKILL`.
//!
//! The stream files are the log; `<data_dir>/state/dedup.json` is a checkpoint of the
//! index built from them. The checkpoint holds, per (gateway, producer), the floor and the
//! written ranges above it, and per stream file the length it covers. It is replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory).
//!
//! [`recover`] runs at startup: it loads the checkpoint, then reads every stream file past
//! the length the checkpoint covers (or whole, when the checkpoint does not know it and it
//! was modified after [`UNKNOWN_FILE_MARGIN`] before the checkpoint was written), adding
//! each line's (gateway, producerid, sequence) to the index. A final line without its
//! newline was never acknowledged (the relay answers only after fsync of whole lines), so
//! it is cut off; the gateway will send that event again.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pigeon_shared::ce::{self, GatewayId};
use serde::{Deserialize, Serialize};

use super::dedup::{DedupIndex, ProducerState};
use crate::data_dir::{OBJECTS_DIR, STATE_DIR, STREAM_DIR, ensure_dir, sync_dir, write_atomic};

/// The checkpoint's file name inside `state/`.
pub const CHECKPOINT_FILE: &str = "dedup.json";
const CHECKPOINT_TMP: &str = "dedup.json.tmp";
const CHECKPOINT_VERSION: u32 = 1;

/// A stream file the checkpoint does not list is skipped at recovery only if it was last
/// modified this long before the checkpoint was written. Files are dropped from the
/// checkpoint two hours after their last write, so anything younger is read again.
pub const UNKNOWN_FILE_MARGIN: Duration = Duration::from_secs(3600);

/// The checkpoint file's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub version: u32,
    /// When it was written, in milliseconds since the Unix epoch.
    pub written_at_ms: u64,
    pub producers: Vec<ProducerCheckpoint>,
    /// Stream file (relative to the data dir) → bytes of complete lines it covers.
    pub files: BTreeMap<String, u64>,
    /// With the Kafka stream: topic → partition → the offset below which every record is
    /// in the index (see [`super::stream::kafka`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kafka: super::stream::kafka::Frontiers,
}

/// One (gateway, producer)'s deduplication state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerCheckpoint {
    pub gateway: String,
    pub producer: String,
    pub floor: u64,
    /// Written sequences at or above the floor, as `[first, last]` ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<(u64, u64)>,
}

impl Checkpoint {
    /// Captures the index now; the stream adds its part ([`Stream::save`]).
    ///
    /// [`Stream::save`]: super::stream::Stream::save
    pub fn capture(index: &DedupIndex) -> Self {
        Self {
            version: CHECKPOINT_VERSION,
            written_at_ms: unix_ms(SystemTime::now()),
            producers: index
                .iter()
                .map(|(g, p, s)| ProducerCheckpoint {
                    gateway: g.to_owned(),
                    producer: p.to_owned(),
                    floor: s.floor(),
                    ranges: s.ranges().collect(),
                })
                .collect(),
            files: BTreeMap::new(),
            kafka: BTreeMap::new(),
        }
    }

    /// Writes the checkpoint atomically into `state_dir`.
    pub fn store(&self, state_dir: &Path) -> io::Result<()> {
        let json = serde_json::to_vec(self).map_err(io::Error::other)?;
        write_atomic(state_dir, CHECKPOINT_FILE, &json)
    }

    /// Reads the checkpoint from `state_dir`; `Ok(None)` if there is none.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, RecoveryError> {
        let path = state_dir.join(CHECKPOINT_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecoveryError::Io { path, source }),
        };
        let cp: Checkpoint =
            serde_json::from_slice(&bytes).map_err(|e| RecoveryError::BadCheckpoint {
                path: path.clone(),
                problem: e.to_string(),
            })?;
        if cp.version != CHECKPOINT_VERSION {
            return Err(RecoveryError::BadCheckpoint {
                path,
                problem: format!(
                    "version {} is not the supported version {CHECKPOINT_VERSION}",
                    cp.version
                ),
            });
        }
        Ok(Some(cp))
    }

    /// Rebuilds the index the checkpoint describes.
    pub fn index(&self) -> DedupIndex {
        let mut index = DedupIndex::new();
        for p in &self.producers {
            index.restore(
                &p.gateway,
                &p.producer,
                ProducerState::from_parts(p.floor, p.ranges.iter().copied()),
            );
        }
        index
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Startup could not bring the data dir into a usable state.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the deduplication checkpoint {path} is unusable: {problem}")]
    BadCheckpoint { path: PathBuf, problem: String },
    #[error("cannot use the Kafka stream: {0}")]
    Kafka(super::stream::kafka::KafkaStreamError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RecoveryError + '_ {
    move |source| RecoveryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What [`recover`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub index: DedupIndex,
    /// Stream file (relative) → length of its complete lines.
    pub files: BTreeMap<String, u64>,
    /// Whether a checkpoint was found and used.
    pub from_checkpoint: bool,
    /// When the checkpoint used was written.
    pub checkpoint_at: Option<SystemTime>,
    /// The checkpoint's Kafka frontiers (see [`super::stream::kafka`]).
    pub kafka: super::stream::kafka::Frontiers,
    pub files_scanned: usize,
    pub lines_scanned: u64,
    pub torn_bytes_cut: u64,
}

/// What reading one stream file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Length of the file's complete lines (its length after cutting a torn tail).
    pub len: u64,
    pub lines: u64,
    pub bad_lines: u64,
    pub torn_bytes: u64,
}

/// The two attributes recovery needs from a stored line.
#[derive(Deserialize)]
struct LineKeys {
    producerid: Option<String>,
    sequence: Option<String>,
}

/// Reads a stream file from `offset`, adding each complete line's sequence to the index,
/// and cuts a torn final line. Syncs the file if it read or cut anything, since lines
/// written just before a crash may not have been fsynced yet.
pub fn scan_file(
    path: &Path,
    gateway: &GatewayId,
    offset: u64,
    index: &mut DedupIndex,
) -> io::Result<ScanOutcome> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut reader = BufReader::with_capacity(256 * 1024, &file);
    reader.seek(SeekFrom::Start(offset))?;
    let mut out = ScanOutcome {
        len: offset,
        ..ScanOutcome::default()
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            out.torn_bytes = n as u64;
            break;
        }
        out.len += n as u64;
        out.lines += 1;
        let keys = serde_json::from_slice::<LineKeys>(&line)
            .ok()
            .and_then(|k| {
                let seq = ce::parse_sequence(k.sequence.as_deref()?).ok()?;
                Some((k.producerid?, seq))
            });
        match keys {
            Some((producer, seq)) => {
                index.insert(gateway.as_str(), &producer, seq);
            }
            None => {
                out.bad_lines += 1;
                tracing::warn!(
                    file = %path.display(),
                    offset = out.len - n as u64,
                    "Skipped a stream line without a usable producerid and sequence."
                );
            }
        }
    }
    drop(reader);
    if out.torn_bytes > 0 {
        tracing::warn!(
            file = %path.display(),
            offset = out.len,
            bytes = out.torn_bytes,
            "Cut a torn final line off a stream file; it was never acknowledged, so its gateway will send it again."
        );
        file.set_len(out.len)?;
    }
    if out.lines > 0 || out.torn_bytes > 0 {
        file.sync_all()?;
    }
    Ok(out)
}

/// Prepares the data dir and rebuilds the deduplication index (see the module docs).
pub fn recover(data_dir: &Path) -> Result<Recovered, RecoveryError> {
    if !data_dir.is_dir() {
        fs::create_dir_all(data_dir).map_err(io_at(data_dir))?;
        if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(io_at(parent))?;
        }
    }
    for sub in [STREAM_DIR, OBJECTS_DIR, STATE_DIR] {
        let dir = data_dir.join(sub);
        ensure_dir(&dir).map_err(io_at(&dir))?;
    }
    let state_dir = data_dir.join(STATE_DIR);
    let tmp = state_dir.join(CHECKPOINT_TMP);
    if tmp.exists() {
        fs::remove_file(&tmp).map_err(io_at(&tmp))?;
    }

    let checkpoint = match Checkpoint::load(&state_dir) {
        Ok(cp) => cp,
        Err(e @ RecoveryError::BadCheckpoint { .. }) => {
            tracing::warn!(
                error = %e,
                "Ignoring the deduplication checkpoint and rebuilding the index from every stream file."
            );
            None
        }
        Err(e) => return Err(e),
    };
    let mut rec = Recovered {
        from_checkpoint: checkpoint.is_some(),
        checkpoint_at: checkpoint
            .as_ref()
            .map(|cp| UNIX_EPOCH + Duration::from_millis(cp.written_at_ms)),
        kafka: checkpoint
            .as_ref()
            .map(|cp| cp.kafka.clone())
            .unwrap_or_default(),
        ..Recovered::default()
    };
    let (mut index, recorded, skip_unknown_before) = match &checkpoint {
        Some(cp) => (
            cp.index(),
            cp.files.clone(),
            Some(
                UNIX_EPOCH + Duration::from_millis(cp.written_at_ms)
                    - UNKNOWN_FILE_MARGIN.min(Duration::from_millis(cp.written_at_ms)),
            ),
        ),
        None => (DedupIndex::new(), BTreeMap::new(), None),
    };

    let stream_dir = data_dir.join(STREAM_DIR);
    for (gateway, rel, path) in stream_files(&stream_dir)? {
        let meta = fs::metadata(&path).map_err(io_at(&path))?;
        let actual = meta.len();
        let offset = match recorded.get(&rel) {
            Some(&len) if len == actual => {
                rec.files.insert(rel, len);
                continue;
            }
            Some(&len) if len < actual => len,
            Some(&len) => {
                tracing::warn!(
                    file = %path.display(),
                    recorded = len,
                    actual,
                    "A stream file is shorter than the checkpoint says; reading it whole."
                );
                0
            }
            None => {
                let old = match (skip_unknown_before, meta.modified()) {
                    (Some(before), Ok(mtime)) => mtime < before,
                    _ => false,
                };
                if old {
                    // Covered by an earlier checkpoint and since forgotten.
                    continue;
                }
                0
            }
        };
        let out = scan_file(&path, &gateway, offset, &mut index).map_err(io_at(&path))?;
        rec.files_scanned += 1;
        rec.lines_scanned += out.lines;
        rec.torn_bytes_cut += out.torn_bytes;
        rec.files.insert(rel, out.len);
    }
    index.compact_all();
    rec.index = index;
    Ok(rec)
}

/// Every `stream/<gateway>/<date>/<hour>.jsonl`, with its gateway and relative path.
fn stream_files(stream_dir: &Path) -> Result<Vec<(GatewayId, String, PathBuf)>, RecoveryError> {
    let mut out = Vec::new();
    for gw_entry in read_dir_sorted(stream_dir)? {
        let Some(gateway) = dir_name(&gw_entry).and_then(|n| GatewayId::new(&n).ok()) else {
            tracing::warn!(path = ?gw_entry, "Ignoring an entry of the stream directory that is not a gateway.");
            continue;
        };
        if !gw_entry.is_dir() {
            continue;
        }
        for date_entry in read_dir_sorted(&gw_entry)? {
            if !date_entry.is_dir() {
                continue;
            }
            for file in read_dir_sorted(&date_entry)? {
                if file.extension().is_none_or(|e| e != "jsonl") || !file.is_file() {
                    continue;
                }
                let (Some(date), Some(name)) = (dir_name(&date_entry), dir_name(&file)) else {
                    continue;
                };
                let rel = format!("{STREAM_DIR}/{gateway}/{date}/{name}");
                out.push((gateway.clone(), rel, file));
            }
        }
    }
    Ok(out)
}

fn dir_name(p: &Path) -> Option<String> {
    p.file_name()?.to_str().map(str::to_owned)
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, RecoveryError> {
    let mut entries = fs::read_dir(dir)
        .map_err(io_at(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_at(dir))?;
    entries.sort();
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(producer: &str, seq: u64) -> String {
        format!(
            "{{\"specversion\":\"1.0\",\"id\":\"e{seq}\",\"type\":\"t\",\"source\":\"/gateways/pi-1/x\",\"producerid\":\"{producer}\",\"sequence\":\"{}\"}}\n",
            ce::format_sequence(seq)
        )
    }

    fn write_stream(data: &Path, rel: &str, content: &str) -> PathBuf {
        let p = data.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        p
    }

    const REL: &str = "stream/pi-1/2024-03-05/10.jsonl";

    #[test]
    fn without_a_checkpoint_every_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        write_stream(
            dir.path(),
            REL,
            &(line("p", 0) + &line("p", 1) + &line("q", 7)),
        );
        write_stream(dir.path(), "stream/pi-2/2024-03-05/11.jsonl", &line("p", 0));
        let rec = recover(dir.path()).unwrap();
        assert!(!rec.from_checkpoint);
        assert_eq!(rec.files_scanned, 2);
        assert!(rec.index.contains("pi-1", "p", 1));
        assert!(!rec.index.contains("pi-1", "p", 2));
        assert!(rec.index.contains("pi-1", "q", 7));
        assert!(rec.index.contains("pi-2", "p", 0));
        assert!(!rec.index.contains("pi-2", "q", 7));
        assert_eq!(rec.index.get("pi-1", "p").unwrap().floor(), 2, "compacted");
        for sub in ["objects", "state"] {
            assert!(dir.path().join(sub).is_dir());
        }
    }

    #[test]
    fn a_torn_last_line_is_cut_and_not_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let whole = line("p", 0) + &line("p", 1);
        let torn = &line("p", 2)[..30];
        let path = write_stream(dir.path(), REL, &(whole.clone() + torn));
        let rec = recover(dir.path()).unwrap();
        assert_eq!(rec.torn_bytes_cut, 30);
        assert_eq!(fs::read_to_string(&path).unwrap(), whole);
        assert_eq!(rec.files[REL], whole.len() as u64);
        assert!(rec.index.contains("pi-1", "p", 1));
        assert!(!rec.index.contains("pi-1", "p", 2));
    }

    #[test]
    fn checkpoint_plus_tail_scan() {
        let dir = tempfile::tempdir().unwrap();
        let first = line("p", 0) + &line("p", 1);
        let path = write_stream(dir.path(), REL, &first);
        let rec = recover(dir.path()).unwrap();

        // Checkpoint at this point, with a settled floor that the file does not show.
        let mut index = rec.index.clone();
        index.raise_floor("pi-1", "old-producer", 500);
        let mut cp = Checkpoint::capture(&index);
        cp.files = rec.files.clone();
        cp.store(&dir.path().join(STATE_DIR)).unwrap();
        assert_eq!(
            Checkpoint::load(&dir.path().join(STATE_DIR)).unwrap(),
            Some(cp.clone())
        );

        // More lines after the checkpoint (acknowledged before a SIGKILL), one torn.
        let more = line("p", 2) + &line("p", 5);
        fs::write(&path, first.clone() + &more + "{\"half").unwrap();
        // And a new hour's file the checkpoint never saw.
        write_stream(dir.path(), "stream/pi-1/2024-03-05/11.jsonl", &line("p", 6));

        let rec = recover(dir.path()).unwrap();
        assert!(rec.from_checkpoint);
        assert_eq!(rec.files_scanned, 2);
        assert_eq!(
            rec.lines_scanned, 3,
            "only the tail and the new file are read"
        );
        let p = rec.index.get("pi-1", "p").unwrap();
        assert_eq!(p.floor(), 3);
        assert_eq!(p.ranges().collect::<Vec<_>>(), vec![(5, 6)]);
        assert!(rec.index.contains("pi-1", "old-producer", 499));
        assert_eq!(fs::read_to_string(&path).unwrap(), first + &more);
    }

    #[test]
    fn a_scan_from_the_recorded_offset_does_not_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_stream(dir.path(), REL, &(line("p", 0) + &line("p", 1)));
        let offset = line("p", 0).len() as u64;
        let mut index = DedupIndex::new();
        let out = scan_file(&path, &GatewayId::new("pi-1").unwrap(), offset, &mut index).unwrap();
        assert_eq!(out.lines, 1);
        assert!(!index.contains("pi-1", "p", 0));
        assert!(index.contains("pi-1", "p", 1));
    }

    #[test]
    fn old_unknown_files_are_skipped_recent_ones_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(STATE_DIR)).unwrap();
        write_stream(dir.path(), REL, &line("p", 9));
        // A checkpoint written long after the file's last change, which no longer lists it
        // (forgotten after two idle hours).
        let cp = Checkpoint {
            version: CHECKPOINT_VERSION,
            written_at_ms: unix_ms(SystemTime::now() + Duration::from_secs(3 * 3600)),
            ..Checkpoint::default()
        };
        cp.store(&dir.path().join(STATE_DIR)).unwrap();
        let rec = recover(dir.path()).unwrap();
        assert_eq!(rec.files_scanned, 0);
        assert!(!rec.index.contains("pi-1", "p", 9));

        // Written now, the same checkpoint does not cover it: it is read.
        let cp = Checkpoint {
            written_at_ms: unix_ms(SystemTime::now()),
            ..cp
        };
        cp.store(&dir.path().join(STATE_DIR)).unwrap();
        let rec = recover(dir.path()).unwrap();
        assert_eq!(rec.files_scanned, 1);
        assert!(rec.index.contains("pi-1", "p", 9));
    }

    #[test]
    fn a_corrupt_checkpoint_means_a_full_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        write_stream(dir.path(), REL, &line("p", 3));
        fs::create_dir_all(dir.path().join(STATE_DIR)).unwrap();
        fs::write(dir.path().join(STATE_DIR).join(CHECKPOINT_FILE), b"{\"vers").unwrap();
        let rec = recover(dir.path()).unwrap();
        assert!(!rec.from_checkpoint);
        assert!(rec.index.contains("pi-1", "p", 3));
    }

    #[test]
    fn garbage_lines_are_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_stream(
            dir.path(),
            REL,
            &(line("p", 0) + "not json\n" + &line("p", 1)),
        );
        let mut index = DedupIndex::new();
        let out = scan_file(&path, &GatewayId::new("pi-1").unwrap(), 0, &mut index).unwrap();
        assert_eq!((out.lines, out.bad_lines), (3, 1));
        assert!(index.contains("pi-1", "p", 1));
    }
}
