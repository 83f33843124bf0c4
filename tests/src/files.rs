//! Camera files through the whole chain: what a test drops into a drop directory, the
//! `[files]` configuration that watches it, and what the relay made of each file — its
//! event in the stream and the object its `dataref` names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{Relay, Stream, run_command, secs, wait_until};

/// A file as a camera would upload it: where it goes below the drop directory, and its
/// bytes.
#[derive(Debug, Clone)]
pub struct CameraFile {
    /// Relative to the watched directory, `/`-separated, e.g. `cam-1/snap 01.jpg`.
    pub path: String,
    pub bytes: Vec<u8>,
}

impl CameraFile {
    /// A JPEG-looking file (SOI marker first, EOI last) of `len` bytes, random inside.
    pub fn jpeg(path: &str, len: usize, seed: u64) -> Self {
        let mut bytes = random_bytes(len.max(4), seed);
        bytes[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]);
        let n = bytes.len();
        bytes[n - 2..].copy_from_slice(&[0xFF, 0xD9]);
        Self {
            path: path.into(),
            bytes,
        }
    }

    /// An MP4-looking file (an `ftyp` box first) of `len` bytes, random inside.
    pub fn mp4(path: &str, len: usize, seed: u64) -> Self {
        let mut bytes = random_bytes(len.max(12), seed);
        bytes[..12].copy_from_slice(b"\0\0\0\x18ftypisom");
        Self {
            path: path.into(),
            bytes,
        }
    }

    /// Any bytes.
    pub fn raw(path: &str, bytes: Vec<u8>) -> Self {
        Self {
            path: path.into(),
            bytes,
        }
    }

    /// The file name (last path component).
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// Writes it below `root` (creating directories) the way a local camera would:
    /// written, then closed.
    pub fn write_into(&self, root: &Path) -> PathBuf {
        let p = root.join(&self.path);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("create the file's directory");
        }
        std::fs::write(&p, &self.bytes).expect("write the camera file");
        p
    }

    /// Writes it to `dir/<name>` (outside any drop directory), for an FTP client to send.
    pub fn stage(&self, dir: &Path) -> PathBuf {
        let p = dir
            .join(format!(
                "staged-{:x}",
                Sha256::digest(self.path.as_bytes())[0]
            ))
            .join(self.name());
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("create staging dir");
        std::fs::write(&p, &self.bytes).expect("stage the camera file");
        p
    }

    pub fn sha256_hex(&self) -> String {
        hex(&Sha256::digest(&self.bytes))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `len` pseudo-random bytes from `seed` (xorshift64*), so that "byte-identical" means
/// something and a test can make the same file twice.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A `[[files.watch]]` table named `name` watching `path`, with more keys from `extra`
/// (e.g. `("after_upload", "move")`).
pub fn watch_table(name: &str, path: &Path, extra: &[(&str, toml::Value)]) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert("path".into(), path.display().to_string().into());
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// A `[files]` table with `watches` and more keys from `extra` (e.g. `quiet_period`).
pub fn files_section(watches: Vec<toml::Table>, extra: &[(&str, toml::Value)]) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert(
        "watch".into(),
        watches
            .into_iter()
            .map(toml::Value::Table)
            .collect::<Vec<_>>()
            .into(),
    );
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// One file event in the relay's stream: the event, and the object its `dataref` names.
#[derive(Debug, Clone)]
pub struct FileEvent {
    pub event: Value,
    pub object: PathBuf,
}

impl FileEvent {
    /// `data.path`: where the file was below its drop directory.
    pub fn path(&self) -> &str {
        self.event["data"]["path"].as_str().unwrap_or("")
    }
}

/// The events of `stream` that carry a `dataref`, with their objects' paths (`file://`
/// URIs; other schemes are an error).
pub fn file_events(stream: &Stream) -> Result<Vec<FileEvent>, String> {
    stream
        .events()
        .iter()
        .filter_map(|e| e.get("dataref").map(|d| (e, d)))
        .map(|(e, d)| {
            let uri = d.as_str().ok_or("dataref is not a string")?;
            let path = uri
                .strip_prefix("file://")
                .ok_or_else(|| format!("dataref {uri:?} is not a file:// URI"))?;
            Ok(FileEvent {
                event: e.clone(),
                object: PathBuf::from(percent_decode(path)?),
            })
        })
        .collect()
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(h);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl Relay {
    /// Sends `path` to the relay's upload endpoint with curl, as `f` under a fixed event:
    /// a create, then `curl -T` as a PATCH from offset 0. The time of the PATCH (the
    /// bytes, the digest check, the commit); panics unless it was accepted.
    pub async fn curl_upload(
        &self,
        token: &str,
        gateway: &str,
        path: &Path,
        f: &CameraFile,
    ) -> Duration {
        let location = self
            .curl_create(token, gateway, 1, f.bytes.len(), &f.sha256_hex())
            .await;
        let t = Instant::now();
        let (status, answer) = self.curl_patch(token, &location, path).await;
        let d = t.elapsed();
        assert!(
            status == 200 && answer.contains("accepted"),
            "curl's upload was not accepted: {status} {answer}"
        );
        d
    }

    /// Creates the upload of a video file event (`bench-curl` producer, `sequence`) with
    /// curl; its location.
    pub async fn curl_create(
        &self,
        token: &str,
        gateway: &str,
        sequence: u64,
        length: usize,
        sha256: &str,
    ) -> String {
        let event = serde_json::json!({
            "specversion": "1.0",
            "id": format!("curl-clip-{sequence}"),
            "source": format!("/gateways/{gateway}/bench/curl"),
            "type": "io.pigeon.camera.video",
            "time": "2026-12-01T00:00:00Z",
            "datacontenttype": "application/json",
            "data": {"filename": "clip.mp4", "contenttype": "video/mp4"},
            "sequence": format!("{sequence:020}"),
            "producerid": "bench-curl",
        });
        let create = serde_json::json!({
            "event": event,
            "length": length,
            "sha256": sha256,
            "extension": "mp4",
        })
        .to_string();
        let url = format!("{}/v1/uploads", self.url());
        let auth = format!("Authorization: Bearer {token}");
        let out = run_command(
            Path::new("curl"),
            &[
                "-sS",
                "-X",
                "POST",
                "-H",
                &auth,
                "-H",
                "Content-Type: application/json",
                "--data",
                &create,
                &url,
            ],
            Duration::from_secs(30),
        )
        .await;
        let state: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("an upload state from the relay");
        state["location"].as_str().expect("a location").to_owned()
    }

    /// `PATCH`es all of `path` to the upload at `location` from offset 0 with curl:
    /// the status and the body of the answer.
    pub async fn curl_patch(&self, token: &str, location: &str, path: &Path) -> (u16, String) {
        let auth = format!("Authorization: Bearer {token}");
        let patch_url = format!("{}{location}", self.url());
        let out = run_command(
            Path::new("curl"),
            &[
                "-sS",
                "-w",
                "\n%{http_code}",
                "-X",
                "PATCH",
                "-H",
                &auth,
                "-H",
                "Upload-Offset: 0",
                "-H",
                "Content-Type: application/offset+octet-stream",
                "-T",
                path.to_str().expect("utf-8 path"),
                &patch_url,
            ],
            Duration::from_secs(600),
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// `<data_dir>/objects`, the embedded object store.
    pub fn objects_dir(&self) -> PathBuf {
        self.data_dir().join("objects")
    }

    /// Waits until every file of `expected` has its event in the stream, then until the
    /// stream is quiet (so a late duplicate would show), and checks each arrived exactly
    /// once: one event per (path, SHA-256) — a camera may reuse a name — whose `data` has
    /// the right size and file name and whose `dataref` names an object under `objects/`
    /// with exactly the file's bytes. No other file events may be there. Returns the
    /// events by path (the last one for a reused path).
    pub async fn assert_files_exactly_once(
        &self,
        expected: &[CameraFile],
        timeout: Duration,
    ) -> BTreeMap<String, FileEvent> {
        let key = |path: &str, sha: &str| (path.to_owned(), sha.to_owned());
        let want: BTreeMap<(String, String), &CameraFile> = expected
            .iter()
            .map(|f| (key(&f.path, &f.sha256_hex()), f))
            .collect();
        let event_key =
            |e: &FileEvent| key(e.path(), e.event["data"]["sha256"].as_str().unwrap_or(""));
        wait_until(
            &format!("{} files to arrive at the relay", want.len()),
            timeout,
            || {
                let r = file_events(&self.read_stream()).map(|evs| {
                    let have: std::collections::BTreeSet<_> = evs.iter().map(event_key).collect();
                    want.keys()
                        .filter(|k| !have.contains(*k))
                        .map(|k| k.0.clone())
                        .collect::<Vec<_>>()
                });
                async move {
                    match r {
                        Ok(missing) if missing.is_empty() => Ok(()),
                        Ok(missing) => Err(format!("missing {}: {:?}", missing.len(), missing)),
                        Err(e) => Err(e),
                    }
                }
            },
        )
        .await;
        self.wait_for_stream_quiet(Duration::from_secs(2)).await;
        let events = file_events(&self.read_stream()).unwrap_or_else(|e| panic!("{e}"));
        let mut by_key: BTreeMap<(String, String), Vec<FileEvent>> = BTreeMap::new();
        for e in events {
            by_key.entry(event_key(&e)).or_default().push(e);
        }
        let objects = self.objects_dir();
        let mut out = BTreeMap::new();
        for (k, evs) in by_key {
            let path = &k.0;
            let Some(f) = want.get(&k) else {
                panic!("a file event nobody expected: {:?}", evs[0].event);
            };
            assert_eq!(
                evs.len(),
                1,
                "{path:?} arrived {} times: {:?}",
                evs.len(),
                evs.iter().map(|e| &e.event["id"]).collect::<Vec<_>>()
            );
            let e = evs.into_iter().next().expect("one event");
            let data = &e.event["data"];
            assert_eq!(
                data["size"].as_u64(),
                Some(f.bytes.len() as u64),
                "{path}: size"
            );
            assert_eq!(
                data["filename"].as_str(),
                Some(f.name()),
                "{path}: filename"
            );
            assert!(
                e.object.starts_with(&objects),
                "{path}: dataref {} is not under {}",
                e.object.display(),
                objects.display()
            );
            let stored = std::fs::read(&e.object)
                .unwrap_or_else(|err| panic!("{path}: object {}: {err}", e.object.display()));
            assert!(
                stored == f.bytes,
                "{path}: the object {} differs from the file ({} bytes stored, {} sent)",
                e.object.display(),
                stored.len(),
                f.bytes.len()
            );
            out.insert(path.clone(), e);
        }
        out
    }
}

/// Waits until `dir` holds no regular files (below it, recursively), e.g. a drop
/// directory emptied by pickups or a spool emptied by deliveries.
pub async fn wait_until_no_files(what: &str, dir: &Path) {
    wait_until(what, secs(60), || {
        let left = regular_files(dir);
        async move {
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} left: {:?}",
                    left.len(),
                    &left[..left.len().min(5)]
                ))
            }
        }
    })
    .await
}

/// The regular files below `dir`, recursively (none if it does not exist).
pub fn regular_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}
