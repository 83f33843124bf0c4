//! Capture from the stream files: a line is captured only once the deduplication
//! checkpoint (`state/dedup.json`) says it is durable, so capture holds exactly the
//! stream — each event once. Progress is `state/capture.json`: per stream file the bytes
//! captured, and the roll in progress. A roll is a byte range of one stream file; it is
//! recorded *before* its objects are written and, after a crash, written again with
//! exactly the same range, so the same keys get the same bytes (gzip without a timestamp
//! is deterministic). Object keys carry the range's start offset and the data dir's
//! instance id, so rolls never overwrite each other.
//!
//! `date=`/`hour=` are the stream file's: the UTC hour the relay received the event (as
//! Event Hubs Capture partitions by enqueue time), not the event's own `time`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pigeon_shared::ce::GatewayId;
use serde::{Deserialize, Serialize};

use super::config::CaptureSettings;
use super::keys::{StreamFileRef, roll_objects};
use crate::config::DEFAULT_TENANT;
use crate::data_dir::{STATE_DIR, STREAM_DIR, write_atomic};
use crate::metrics::Metrics;
use crate::s3::{Bucket, S3Error};
use crate::sink::checkpoint::Checkpoint;
use crate::sink::stream::files::complete_prefix_len;

const STATE_FILE: &str = "capture.json";
const INSTANCE_FILE: &str = "instance-id";
const STATE_VERSION: u32 = 1;
/// How often capture looks for new lines.
const TICK: Duration = Duration::from_secs(1);
/// A stream file not in the checkpoint and last written this long ago is whole: the
/// checkpoint drops files two hours after their last write.
const UNLISTED_FINAL_AFTER: Duration = Duration::from_secs(2 * 3600);
/// A stream file whose hour ended this long ago is final, and once captured whole moves
/// below its gateway's `through` mark.
const FINAL_AFTER_HOURS: i64 = 3;

/// `state/capture.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureState {
    pub version: u32,
    /// Stream file (relative to the data dir) → bytes captured.
    pub files: BTreeMap<String, u64>,
    /// Gateway → the last hour (`YYYY-MM-DD/HH`) up to which all its stream files are
    /// captured whole; their entries are dropped from `files`, so the state stays small.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub through: BTreeMap<String, String>,
    /// The roll being written, if any: redone exactly after a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roll: Option<Roll>,
}

/// A byte range of one stream file, whole lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roll {
    pub file: String,
    pub from: u64,
    pub to: u64,
}

/// The parts of a stream file's path: `stream/<gateway>/<date>/<HH>.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StreamFile {
    rel: String,
    gateway: String,
    date: String,
    hour: String,
}

impl StreamFile {
    /// `YYYY-MM-DD/HH`, which sorts as the hours do.
    fn hour_key(&self) -> String {
        format!("{}/{}", self.date, self.hour)
    }

    fn parse(rel: &str) -> Option<Self> {
        let mut it = rel.split('/');
        let (Some(STREAM_DIR), Some(gateway), Some(date), Some(name), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return None;
        };
        let hour = name.strip_suffix(".jsonl")?;
        let ok = GatewayId::new(gateway).is_ok()
            && date.len() == 10
            && date.bytes().all(|b| b.is_ascii_digit() || b == b'-')
            && hour.len() == 2
            && hour.bytes().all(|b| b.is_ascii_digit());
        ok.then(|| Self {
            rel: rel.to_owned(),
            gateway: gateway.to_owned(),
            date: date.to_owned(),
            hour: hour.to_owned(),
        })
    }
}

/// Why a pass of the files capture stopped; it tries again a second later.
#[derive(Debug, thiserror::Error)]
pub enum RollError {
    /// A blocking task failed (it panicked).
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot read the stream files: {0}")]
    List(io::Error),
    #[error("cannot read {file}: {source}")]
    Read { file: String, source: io::Error },
    /// The bucket refused an object or did not answer.
    #[error("{0}")]
    Bucket(#[from] S3Error),
    #[error("{0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot write state/capture.json: {0}")]
    Save(io::Error),
}

/// The capture task's state and what it needs.
pub struct FilesCapture {
    data_dir: PathBuf,
    bucket: Arc<Bucket>,
    settings: CaptureSettings,
    tenants: std::collections::HashMap<GatewayId, String>,
    metrics: Arc<Metrics>,
    instance: String,
    state: CaptureState,
    /// When capture first saw uncaptured durable bytes in each file.
    waiting_since: BTreeMap<String, Instant>,
    failing: bool,
}

impl FilesCapture {
    /// Loads `state/capture.json` and the data dir's instance id (made once).
    pub fn open(
        data_dir: &Path,
        bucket: Arc<Bucket>,
        settings: CaptureSettings,
        tenants: std::collections::HashMap<GatewayId, String>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Self> {
        let state_dir = data_dir.join(STATE_DIR);
        let instance = match fs::read_to_string(state_dir.join(INSTANCE_FILE)) {
            Ok(s) if is_instance_id(s.trim()) => s.trim().to_owned(),
            Ok(_) | Err(_) => {
                let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
                write_atomic(&state_dir, INSTANCE_FILE, id.as_bytes())?;
                id
            }
        };
        let state = match fs::read(state_dir.join(STATE_FILE)) {
            Ok(bytes) => {
                let s: CaptureState = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", state_dir.join(STATE_FILE).display()),
                    )
                })?;
                if s.version != STATE_VERSION {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("capture state version {} is not {STATE_VERSION}", s.version),
                    ));
                }
                s
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => CaptureState {
                version: STATE_VERSION,
                ..Default::default()
            },
            Err(e) => return Err(e),
        };
        Ok(Self {
            data_dir: data_dir.to_owned(),
            bucket,
            settings,
            tenants,
            metrics,
            instance,
            state,
            waiting_since: BTreeMap::new(),
            failing: false,
        })
    }

    /// Runs until aborted: a pending roll first, then every second whatever is due.
    pub fn spawn(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match self.step().await {
                    Ok(()) if self.failing => {
                        self.failing = false;
                        tracing::info!("Capture writes to the bucket again.");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        self.metrics.capture_errors.fetch_add(1, Relaxed);
                        if !self.failing {
                            tracing::warn!(error = %e, "Capture could not write a roll; it tries again every second (nothing is skipped).");
                        }
                        self.failing = true;
                    }
                }
            }
        })
    }

    /// One pass: the pending roll, then every file with something due, in order.
    async fn step(&mut self) -> Result<(), RollError> {
        if let Some(roll) = self.state.roll.clone() {
            if !self.failing {
                tracing::info!(file = %roll.file, from = roll.from, to = roll.to, "Writing the capture roll a stop interrupted again, with the same range and keys.");
            }
            self.write_roll(&roll).await?;
        }
        let dir = self.data_dir.clone();
        let durable = tokio::task::spawn_blocking(move || durable_lengths(&dir))
            .await?
            .map_err(RollError::List)?;
        let now = Instant::now();
        let durable: Vec<(String, u64)> = durable
            .into_iter()
            .filter(|(rel, _)| !self.below_mark(rel))
            .collect();
        for (rel, len) in &durable {
            let (rel, len) = (rel.clone(), *len);
            let done = self.state.files.get(&rel).copied().unwrap_or(0);
            if len <= done {
                self.waiting_since.remove(&rel);
                continue;
            }
            let since = *self.waiting_since.entry(rel.clone()).or_insert(now);
            let due = len - done >= self.settings.roll_bytes
                || now.duration_since(since) >= self.settings.roll_age;
            if !due {
                continue;
            }
            let mut from = done;
            while from < len {
                let to = self.roll_end(&rel, from, len).await?;
                let roll = Roll {
                    file: rel.clone(),
                    from,
                    to,
                };
                self.state.roll = Some(roll.clone());
                self.save().await?;
                self.write_roll(&roll).await?;
                from = to;
            }
            self.waiting_since.remove(&rel);
        }
        if self.raise_marks(&durable) {
            self.save().await?;
        }
        Ok(())
    }

    /// Whether the stream file is at or below its gateway's `through` mark.
    fn below_mark(&self, rel: &str) -> bool {
        StreamFile::parse(rel).is_some_and(|f| {
            self.state
                .through
                .get(&f.gateway)
                .is_some_and(|m| f.hour_key() <= *m)
        })
    }

    /// Moves each gateway's mark over its leading files that are final and captured
    /// whole, dropping their entries. Whether anything changed.
    fn raise_marks(&mut self, durable: &[(String, u64)]) -> bool {
        let final_before = (chrono::Utc::now() - chrono::Duration::hours(FINAL_AFTER_HOURS))
            .format("%Y-%m-%d/%H")
            .to_string();
        let mut changed = false;
        let mut blocked: std::collections::HashSet<String> = Default::default();
        // Sorted by path: per gateway, oldest hour first.
        for (rel, len) in durable {
            let Some(f) = StreamFile::parse(rel) else {
                continue;
            };
            if blocked.contains(&f.gateway) {
                continue;
            }
            let whole = self.state.files.get(rel).copied().unwrap_or(0) >= *len;
            if f.hour_key() < final_before && whole {
                self.state.files.remove(rel);
                self.state.through.insert(f.gateway.clone(), f.hour_key());
                changed = true;
            } else {
                blocked.insert(f.gateway);
            }
        }
        changed
    }

    /// Where a roll from `from` ends: at most `roll_bytes` later, at a line's end, at
    /// most `len` (a line longer than `roll_bytes` makes a roll of its own).
    async fn roll_end(&self, rel: &str, from: u64, len: u64) -> Result<u64, RollError> {
        let cap = from.saturating_add(self.settings.roll_bytes);
        if cap >= len {
            return Ok(len);
        }
        let path = self.data_dir.join(rel);
        let r = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let mut f = File::open(&path)?;
            let end = complete_prefix_len(&mut f, cap)?;
            if end > from {
                return Ok(end);
            }
            // One line longer than a roll: up to its end.
            f.seek(SeekFrom::Start(cap))?;
            let mut buf = [0u8; 64 * 1024];
            let mut at = cap;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Ok(len);
                }
                if let Some(p) = buf[..n].iter().position(|&b| b == b'\n') {
                    return Ok((at + p as u64 + 1).min(len));
                }
                at += n as u64;
            }
        })
        .await?;
        r.map_err(|source| RollError::Read {
            file: rel.to_owned(),
            source,
        })
    }

    /// Writes the objects of `roll`, then records it done.
    async fn write_roll(&mut self, roll: &Roll) -> Result<(), RollError> {
        let Some(f) = StreamFile::parse(&roll.file) else {
            // Not a stream file (a damaged state): drop the roll.
            tracing::warn!(file = %roll.file, "The capture roll in progress names no stream file; it was dropped.");
            self.state.roll = None;
            return self.save().await;
        };
        let path = self.data_dir.join(&roll.file);
        let (from, to) = (roll.from, roll.to);
        let lines = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let mut file = File::open(&path)?;
            file.seek(SeekFrom::Start(from))?;
            let mut buf = vec![0u8; (to - from) as usize];
            file.read_exact(&mut buf)?;
            Ok(buf)
        })
        .await?
        .map_err(|source| RollError::Read {
            file: roll.file.clone(),
            source,
        })?;
        let tenant = GatewayId::new(&f.gateway)
            .ok()
            .and_then(|g| self.tenants.get(&g).cloned())
            .unwrap_or_else(|| DEFAULT_TENANT.to_owned());
        let events = lines.iter().filter(|&&b| b == b'\n').count() as u64;
        let objects = roll_objects(
            &StreamFileRef {
                tenant: &tenant,
                gateway: &f.gateway,
                date: &f.date,
                hour: &f.hour,
            },
            &self.instance,
            from,
            &lines,
        );
        for (key, body) in &objects {
            let started = Instant::now();
            let r = self
                .bucket
                .put_bytes(key, body.clone(), "application/gzip")
                .await;
            self.metrics.object_store_seconds.observe(started.elapsed());
            r?;
            self.metrics
                .capture_bytes
                .fetch_add(body.len() as u64, Relaxed);
        }
        self.metrics
            .capture_objects
            .fetch_add(objects.len() as u64, Relaxed);
        self.metrics.capture_events.fetch_add(events, Relaxed);
        self.state.files.insert(roll.file.clone(), to);
        self.state.roll = None;
        self.save().await?;
        tracing::debug!(file = %roll.file, from, to, events, objects = objects.len(), "Captured a roll.");
        Ok(())
    }

    async fn save(&self) -> Result<(), RollError> {
        let state_dir = self.data_dir.join(STATE_DIR);
        let json = serde_json::to_vec(&self.state)?;
        tokio::task::spawn_blocking(move || write_atomic(&state_dir, STATE_FILE, &json))
            .await?
            .map_err(RollError::Save)
    }
}

fn is_instance_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Every stream file with the bytes of it that are durable: what the checkpoint covers,
/// or — for a file it no longer lists, last written over two hours ago — all its whole
/// lines. A recent file it does not list yet is not durable yet (0).
fn durable_lengths(data_dir: &Path) -> io::Result<Vec<(String, u64)>> {
    let checkpoint = Checkpoint::load(&data_dir.join(STATE_DIR))
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut out = Vec::new();
    let stream = data_dir.join(STREAM_DIR);
    let Ok(gateways) = fs::read_dir(&stream) else {
        return Ok(out);
    };
    for g in gateways.flatten() {
        let Ok(days) = fs::read_dir(g.path()) else {
            continue;
        };
        for d in days.flatten() {
            let Ok(hours) = fs::read_dir(d.path()) else {
                continue;
            };
            for h in hours.flatten() {
                let rel = format!(
                    "{STREAM_DIR}/{}/{}/{}",
                    g.file_name().to_string_lossy(),
                    d.file_name().to_string_lossy(),
                    h.file_name().to_string_lossy()
                );
                if StreamFile::parse(&rel).is_none() {
                    continue;
                }
                let len = match checkpoint.files.get(&rel) {
                    Some(&n) => n,
                    None => {
                        let meta = h.metadata()?;
                        let old = meta
                            .modified()
                            .ok()
                            .and_then(|m| m.elapsed().ok())
                            .is_some_and(|age| age >= UNLISTED_FINAL_AFTER);
                        if !old {
                            continue;
                        }
                        complete_prefix_len(&mut File::open(h.path())?, meta.len())?
                    }
                };
                out.push((rel, len));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_file_paths_parse() {
        let f = StreamFile::parse("stream/pi-1/2026-12-02/05.jsonl").unwrap();
        assert_eq!(
            (f.gateway.as_str(), f.date.as_str(), f.hour.as_str()),
            ("pi-1", "2026-12-02", "05")
        );
        for bad in [
            "stream/pi-1/2026-12-02/5.jsonl",
            "stream/pi-1/2026-12-02/05.json",
            "stream/.x/2026-12-02/05.jsonl",
            "stream/pi-1/2026-12-02/05.jsonl/x",
            "objects/pi-1/2026-12-02/05.jsonl",
        ] {
            assert!(StreamFile::parse(bad).is_none(), "{bad}");
        }
    }
}
