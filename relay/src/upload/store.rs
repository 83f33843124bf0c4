//! Uploads on disk, with blocking I/O (the service calls it through `spawn_blocking`).
//!
//! ```text
//! <data_dir>/uploads/<gateway>/<id>.json      the manifest: the event, length, sha256, key
//! <data_dir>/uploads/<gateway>/<id>.part      the bytes received so far, appended to
//! <data_dir>/uploads/<gateway>/<id>.<n>.part  into S3: the bytes from part n on
//! <data_dir>/objects/<key>                    a finished file, renamed here from .part
//! ```
//!
//! Into S3 (`objects.kind = "s3"`) the bytes go in parts of the manifest's `part_size`:
//! a full part is sent to the multipart upload, recorded in the manifest (with the hash
//! state at its end), and only then deleted; the next bytes go to the next part's file.
//! A crash between recording and deleting leaves a file of a part already sent, which is
//! recognised by its number and removed.
//!
//! The manifest is written once, atomically (temporary file, fsync, rename, fsync of the
//! directory); its modification time is the upload's "last touched" time, with the
//! `.part`'s. A finished file is fsynced, then renamed to its key and the directories
//! fsynced, so an object is never visible half-written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use pigeon_shared::ce::GatewayId;
use serde::{Deserialize, Serialize};

use super::sha::{Midstate, Sha256};

use crate::data_dir::{OBJECTS_DIR, ensure_dir, sync_dir};
use crate::sink::RecoveryError;

/// The directory under the data dir that holds unfinished uploads.
pub const UPLOADS_DIR: &str = "uploads";
const MANIFEST_SUFFIX: &str = ".json";
const PART_SUFFIX: &str = ".part";
const TMP_SUFFIX: &str = ".tmp";
/// Read size when hashing a file from disk.
const HASH_BLOCK: usize = 256 * 1024;

/// What the relay keeps about an unfinished upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub gateway: GatewayId,
    pub producer: String,
    pub sequence: u64,
    /// The file's length in bytes.
    pub length: u64,
    /// The file's SHA-256, 64 lowercase hex digits.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    /// Where the object goes, relative to `objects/`.
    pub key: String,
    pub created_at_ms: u64,
    /// The event as the gateway sent it (without `dataref`, which is added when it is
    /// published, from the `objects.base_url` of that moment).
    pub event: pigeon_shared::json::Text,
    /// Set for an upload into S3: the size of its parts (fixed when it was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_size: Option<u64>,
    /// The S3 multipart upload, once its first part was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipart: Option<Multipart>,
}

/// An upload's S3 multipart upload and the parts stored in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Multipart {
    pub upload_id: String,
    /// Parts 1, 2, … in order, each `part_size` bytes.
    pub parts: Vec<ShippedPart>,
    /// The hash state after the last part (`bytes` = the bytes in S3).
    pub midstate: Midstate,
}

/// A part stored in S3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShippedPart {
    pub number: u32,
    pub etag: String,
}

impl Manifest {
    /// The format version this relay writes and reads.
    pub const VERSION: u32 = 1;

    /// Bytes already stored in S3 parts (0 for a file upload).
    pub fn shipped(&self) -> u64 {
        self.multipart.as_ref().map_or(0, |mp| mp.midstate.bytes)
    }

    /// The number of the part the next bytes belong to (1 for a file upload).
    pub fn next_part(&self) -> u32 {
        self.multipart
            .as_ref()
            .map_or(1, |mp| mp.parts.len() as u32 + 1)
    }

    /// Whether the manifest is consistent: parts numbered 1.. with the hash state at
    /// their end, and no more bytes than the file has.
    pub fn check(&self) -> Result<(), String> {
        let Some(mp) = &self.multipart else {
            return Ok(());
        };
        let Some(size) = self.part_size.filter(|&s| s > 0) else {
            return Err("it has S3 parts but no part_size".into());
        };
        if mp
            .parts
            .iter()
            .enumerate()
            .any(|(i, p)| p.number as usize != i + 1)
        {
            return Err("its parts are not numbered 1, 2, ...".into());
        }
        if mp.midstate.bytes != size * mp.parts.len() as u64 || mp.midstate.bytes > self.length {
            return Err(format!(
                "its hash state covers {} bytes, not {} parts of {size}",
                mp.midstate.bytes,
                mp.parts.len()
            ));
        }
        if Sha256::resume(&mp.midstate).is_none() {
            return Err("its hash state is damaged".into());
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch, for `created_at_ms`.
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A SHA-256 state over the first `offset` bytes of an upload.
#[derive(Clone)]
pub struct Hashed {
    pub offset: u64,
    pub hasher: Sha256,
}

impl Hashed {
    /// Nothing hashed.
    pub fn empty() -> Self {
        Self {
            offset: 0,
            hasher: Sha256::new(),
        }
    }

    /// The state after the bytes already in S3 (nothing, for a file upload); `None` if
    /// the manifest's state is damaged.
    pub fn after_shipped(m: &Manifest) -> Option<Self> {
        match &m.multipart {
            None => Some(Self::empty()),
            Some(mp) => Sha256::resume(&mp.midstate).map(|hasher| Self {
                offset: mp.midstate.bytes,
                hasher,
            }),
        }
    }

    /// The digest, as 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        pigeon_shared::wire::sha256_hex(&self.hasher.clone().finalize())
    }
}

impl std::fmt::Debug for Hashed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hashed")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// The hash state of the first `len` bytes of an upload: `cached` when it covers exactly
/// that many (the usual case: the same process received them), else `base` (the bytes
/// sent to S3 before, or nothing) extended by the start of `path`, which holds the bytes
/// after them (after a restart, or a write that failed half-way). The flag says whether
/// it re-read.
pub fn resume_hasher_from(
    cached: Option<Hashed>,
    base: Hashed,
    path: &Path,
    len: u64,
) -> io::Result<(Hashed, bool)> {
    if let Some(h) = cached.filter(|h| h.offset == len) {
        return Ok((h, false));
    }
    let more = len.checked_sub(base.offset).ok_or_else(|| {
        io::Error::other(format!(
            "{len} bytes are fewer than the {} already sent",
            base.offset
        ))
    })?;
    Ok((hash_more(base, path, more)?, true))
}

/// SHA-256 of the first `len` bytes of `path`; an error if it is shorter.
pub fn hash_prefix(path: &Path, len: u64) -> io::Result<Hashed> {
    hash_more(Hashed::empty(), path, len)
}

/// `start` extended by the first `len` bytes of `path`; an error if it is shorter.
fn hash_more(start: Hashed, path: &Path, len: u64) -> io::Result<Hashed> {
    let Hashed { offset, mut hasher } = start;
    let mut done = 0u64;
    if len > 0 {
        let mut file = File::open(path)?.take(len);
        let mut buf = vec![0u8; HASH_BLOCK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            done += n as u64;
        }
    }
    if done < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} has {done} bytes, fewer than {len}", path.display()),
        ));
    }
    Ok(Hashed {
        offset: offset + len,
        hasher,
    })
}

/// One upload found on disk (for the abandoned-upload sweep).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub gateway: GatewayId,
    pub id: String,
    /// The later of the manifest's and the part's modification times.
    pub touched: SystemTime,
    pub part_len: u64,
}

/// The uploads and objects directories.
#[derive(Debug, Clone)]
pub struct UploadStore {
    uploads: PathBuf,
    objects: PathBuf,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RecoveryError + '_ {
    move |source| RecoveryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `Ok(None)` for a file that is not there.
fn not_found_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a file; whether it was there.
fn remove_if_there(path: &Path) -> io::Result<bool> {
    Ok(not_found_is_none(fs::remove_file(path))?.is_some())
}

/// The part a file named `name` starts at, if it is one of upload `id`'s part files.
fn part_number(name: &str, id: &str) -> Option<u32> {
    let rest = name.strip_prefix(id)?.strip_suffix(PART_SUFFIX)?;
    if rest.is_empty() {
        return Some(1);
    }
    let digits = rest.strip_prefix('.')?;
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n >= 2)
}

impl UploadStore {
    /// Creates `uploads/` and `objects/` under `data_dir` (which must exist) if missing,
    /// and removes manifests a crash left half-written (`*.json.tmp`).
    pub fn open(data_dir: &Path) -> Result<Self, RecoveryError> {
        let store = Self {
            uploads: data_dir.join(UPLOADS_DIR),
            objects: data_dir.join(OBJECTS_DIR),
        };
        for dir in [&store.uploads, &store.objects] {
            ensure_dir(dir).map_err(io_at(dir))?;
        }
        for entry in fs::read_dir(&store.uploads).map_err(io_at(&store.uploads))? {
            let dir = entry.map_err(io_at(&store.uploads))?.path();
            if !dir.is_dir() {
                continue;
            }
            let mut removed = 0;
            for file in fs::read_dir(&dir).map_err(io_at(&dir))? {
                let path = file.map_err(io_at(&dir))?.path();
                if path.to_string_lossy().ends_with(TMP_SUFFIX) {
                    fs::remove_file(&path).map_err(io_at(&path))?;
                    tracing::info!(file = %path.display(), "Removed a half-written upload manifest left by a crash.");
                    removed += 1;
                }
            }
            if removed > 0 {
                sync_dir(&dir).map_err(io_at(&dir))?;
            }
        }
        Ok(store)
    }

    fn gateway_dir(&self, gateway: &GatewayId) -> PathBuf {
        self.uploads.join(gateway.as_str())
    }

    fn manifest_path(&self, gateway: &GatewayId, id: &str) -> PathBuf {
        self.gateway_dir(gateway)
            .join(format!("{id}{MANIFEST_SUFFIX}"))
    }

    /// The file the upload's bytes are appended to.
    pub fn part_path(&self, gateway: &GatewayId, id: &str) -> PathBuf {
        self.part_path_at(gateway, id, 1)
    }

    /// The file that holds the bytes from part `n` on: `<id>.part` for part 1 (and
    /// every file upload), `<id>.<n>.part` after that.
    pub fn part_path_at(&self, gateway: &GatewayId, id: &str, n: u32) -> PathBuf {
        let name = if n <= 1 {
            format!("{id}{PART_SUFFIX}")
        } else {
            format!("{id}.{n}{PART_SUFFIX}")
        };
        self.gateway_dir(gateway).join(name)
    }

    /// Every part file of the upload, with the number of the part it starts at.
    fn part_files(&self, gateway: &GatewayId, id: &str) -> io::Result<Vec<(u32, PathBuf)>> {
        let dir = self.gateway_dir(gateway);
        let Some(entries) = not_found_is_none(fs::read_dir(&dir))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            if let Some(n) = name.to_str().and_then(|n| part_number(n, id)) {
                out.push((n, dir.join(name)));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes the part files of parts before `n` (already in S3); whether there were any.
    pub fn remove_parts_before(&self, gateway: &GatewayId, id: &str, n: u32) -> io::Result<bool> {
        let mut removed = false;
        for (_, path) in self
            .part_files(gateway, id)?
            .into_iter()
            .filter(|&(k, _)| k < n)
        {
            removed |= remove_if_there(&path)?;
        }
        if removed {
            sync_dir(&self.gateway_dir(gateway))?;
        }
        Ok(removed)
    }

    /// Writes a changed manifest of an existing upload atomically (its bytes stay).
    pub fn update(&self, id: &str, m: &Manifest) -> io::Result<()> {
        self.write_manifest(id, m)
    }

    /// Where the object with `key` is.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.objects.join(key)
    }

    /// The upload's manifest, `None` if there is none. A manifest that does not parse,
    /// or names another upload, is an `InvalidData` error.
    pub fn load(&self, gateway: &GatewayId, id: &str) -> io::Result<Option<Manifest>> {
        let path = self.manifest_path(gateway, id);
        let Some(bytes) = not_found_is_none(fs::read(&path))? else {
            return Ok(None);
        };
        let bad = |problem: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {problem}", path.display()),
            )
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if m.version != Manifest::VERSION {
            return Err(bad(format!("unsupported version {}", m.version)));
        }
        if &m.gateway != gateway {
            return Err(bad(format!("it belongs to gateway {}", m.gateway)));
        }
        m.check().map_err(bad)?;
        Ok(Some(m))
    }

    /// Writes the manifest of a new upload atomically, creating the gateway's directory
    /// if needed, and deletes bytes a previous upload of the id may have left without a
    /// manifest, so that the new upload is at offset 0.
    pub fn save(&self, id: &str, m: &Manifest) -> io::Result<()> {
        ensure_dir(&self.gateway_dir(&m.gateway))?;
        for (_, path) in self.part_files(&m.gateway, id)? {
            remove_if_there(&path)?;
        }
        self.write_manifest(id, m)
    }

    fn write_manifest(&self, id: &str, m: &Manifest) -> io::Result<()> {
        let dir = self.gateway_dir(&m.gateway);
        let path = self.manifest_path(&m.gateway, id);
        let tmp = dir.join(format!("{id}{MANIFEST_SUFFIX}{TMP_SUFFIX}"));
        let json = serde_json::to_vec(m).map_err(io::Error::other)?;
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        sync_dir(&dir)
    }

    /// Marks the upload as touched now (the abandoned-upload sweep goes by this).
    pub fn touch(&self, gateway: &GatewayId, id: &str) -> io::Result<()> {
        File::open(self.manifest_path(gateway, id))?.set_modified(SystemTime::now())
    }

    /// Bytes held: the length of the `.part` (0 if there is none).
    pub fn part_len(&self, gateway: &GatewayId, id: &str) -> io::Result<u64> {
        self.part_len_at(gateway, id, 1)
    }

    /// The length of the part file starting at part `n` (0 if there is none).
    pub fn part_len_at(&self, gateway: &GatewayId, id: &str, n: u32) -> io::Result<u64> {
        Ok(
            not_found_is_none(fs::metadata(self.part_path_at(gateway, id, n)))?
                .map_or(0, |m| m.len()),
        )
    }

    /// Opens the `.part` for appending, creating it if needed.
    pub fn open_part(&self, gateway: &GatewayId, id: &str) -> io::Result<File> {
        self.open_part_at(gateway, id, 1)
    }

    /// Opens the part file starting at part `n` for appending, creating it if needed.
    pub fn open_part_at(&self, gateway: &GatewayId, id: &str, n: u32) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.part_path_at(gateway, id, n))
    }

    /// Deletes the upload's bytes held here (not its manifest).
    pub fn remove_part(&self, gateway: &GatewayId, id: &str) -> io::Result<()> {
        for (_, path) in self.part_files(gateway, id)? {
            remove_if_there(&path)?;
        }
        Ok(())
    }

    /// Deletes the upload: bytes and manifest. Whether there was anything.
    pub fn remove(&self, gateway: &GatewayId, id: &str) -> io::Result<bool> {
        // The bytes first: a manifest without bytes is an upload at offset 0, while
        // bytes without a manifest would be an orphan.
        let mut part = false;
        for (_, path) in self.part_files(gateway, id)? {
            part |= remove_if_there(&path)?;
        }
        let manifest = remove_if_there(&self.manifest_path(gateway, id))?;
        if part || manifest {
            sync_dir(&self.gateway_dir(gateway))?;
        }
        Ok(part || manifest)
    }

    /// The length of the object at `key`, if there is one.
    pub fn object_len(&self, key: &str) -> io::Result<Option<u64>> {
        Ok(not_found_is_none(fs::metadata(self.object_path(key)))?
            .filter(|m| m.is_file())
            .map(|m| m.len()))
    }

    /// Makes the finished `.part` the object at `key`: fsync the bytes, create the key's
    /// directories (each new one made durable in its parent), rename, fsync both
    /// directories. An object already at the key is replaced (atomically).
    pub fn commit(&self, gateway: &GatewayId, id: &str, key: &str) -> io::Result<()> {
        let part = self.part_path(gateway, id);
        // Created if missing: a zero-length file may never have had a byte appended.
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(&part)?
            .sync_all()?;
        let target = self.object_path(key);
        let rel_dir = Path::new(key)
            .parent()
            .ok_or_else(|| io::Error::other(format!("object key {key:?} has no directory")))?;
        let mut dir = self.objects.clone();
        for c in rel_dir.components() {
            dir.push(c);
            ensure_dir(&dir)?;
        }
        fs::rename(&part, &target)?;
        sync_dir(&dir)?;
        sync_dir(&self.gateway_dir(gateway))
    }

    /// When the upload was last touched (manifest or bytes), if it exists at all.
    pub fn touched(&self, gateway: &GatewayId, id: &str) -> io::Result<Option<SystemTime>> {
        let mtime = |p: PathBuf| -> io::Result<Option<SystemTime>> {
            not_found_is_none(fs::metadata(p))?
                .map(|m| m.modified())
                .transpose()
        };
        let mut newest = mtime(self.manifest_path(gateway, id))?;
        for (_, path) in self.part_files(gateway, id)? {
            newest = newest.max(mtime(path)?);
        }
        Ok(newest)
    }

    /// Every upload on disk (a manifest, a part, or both).
    pub fn scan(&self) -> io::Result<Vec<Stored>> {
        let mut out: Vec<Stored> = Vec::new();
        for entry in fs::read_dir(&self.uploads)? {
            let entry = entry?;
            let Some(gateway) = entry
                .file_name()
                .to_str()
                .and_then(|n| GatewayId::new(n).ok())
            else {
                continue;
            };
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let mut ids: Vec<String> = Vec::new();
            for file in fs::read_dir(entry.path())? {
                let name = file?.file_name();
                let Some(name) = name.to_str() else { continue };
                let id = name
                    .strip_suffix(MANIFEST_SUFFIX)
                    .or_else(|| name.strip_suffix(PART_SUFFIX))
                    .map(|stem| stem.split_once('.').map_or(stem, |(id, _)| id));
                if let Some(id) = id.filter(|id| super::key::is_upload_id(id))
                    && !ids.iter().any(|i| i == id)
                {
                    ids.push(id.to_owned());
                }
            }
            for id in ids {
                if let Some(touched) = self.touched(&gateway, &id)? {
                    let mut part_len = 0;
                    for (_, path) in self.part_files(&gateway, &id)? {
                        part_len += not_found_is_none(fs::metadata(path))?.map_or(0, |m| m.len());
                    }
                    out.push(Stored {
                        gateway: gateway.clone(),
                        id,
                        touched,
                        part_len,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;
    use std::time::Duration;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn pi1() -> GatewayId {
        GatewayId::new("pi-1").unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            version: Manifest::VERSION,
            gateway: pi1(),
            producer: "p-1".into(),
            sequence: 42,
            length: 5,
            sha256: "ab".repeat(32),
            extension: Some("jpg".into()),
            key: "pi-1/ftp/2026-12-01/21/e1.jpg".into(),
            created_at_ms: now_ms(),
            event: pigeon_shared::json::Text::from_value(
                &serde_json::json!({"id": "e1", "data": {"filename": "a b.jpg"}}),
            ),
            part_size: None,
            multipart: None,
        }
    }

    fn store() -> (tempfile::TempDir, UploadStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = UploadStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn manifests_round_trip_and_are_per_gateway() {
        let (dir, store) = store();
        assert_eq!(store.load(&pi1(), ID).unwrap(), None);
        let m = manifest();
        store.save(ID, &m).unwrap();
        assert_eq!(store.load(&pi1(), ID).unwrap(), Some(m.clone()));
        assert!(
            dir.path()
                .join("uploads/pi-1")
                .join(format!("{ID}.json"))
                .is_file()
        );
        // Another gateway does not see it.
        let pi2 = GatewayId::new("pi-2").unwrap();
        assert_eq!(store.load(&pi2, ID).unwrap(), None);
        // A manifest copied into another gateway's directory is refused.
        fs::create_dir(dir.path().join("uploads/pi-2")).unwrap();
        fs::copy(
            dir.path().join("uploads/pi-1").join(format!("{ID}.json")),
            dir.path().join("uploads/pi-2").join(format!("{ID}.json")),
        )
        .unwrap();
        let e = store.load(&pi2, ID).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Garbage is refused, not a panic.
        fs::write(
            dir.path().join("uploads/pi-1").join(format!("{ID}.json")),
            b"{",
        )
        .unwrap();
        assert_eq!(
            store.load(&pi1(), ID).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn opening_removes_half_written_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let store = UploadStore::open(dir.path()).unwrap();
        store.save(ID, &manifest()).unwrap();
        let tmp = dir
            .path()
            .join("uploads/pi-1")
            .join(format!("{ID}.json.tmp"));
        fs::write(&tmp, b"{\"vers").unwrap();
        UploadStore::open(dir.path()).unwrap();
        assert!(!tmp.exists());
        assert!(store.load(&pi1(), ID).unwrap().is_some());
    }

    #[test]
    fn parts_grow_and_commit_into_the_object_key() {
        let (dir, store) = store();
        let m = manifest();
        store.save(ID, &m).unwrap();
        assert_eq!(store.part_len(&pi1(), ID).unwrap(), 0);
        store
            .open_part(&pi1(), ID)
            .unwrap()
            .write_all(b"hel")
            .unwrap();
        store
            .open_part(&pi1(), ID)
            .unwrap()
            .write_all(b"lo")
            .unwrap();
        assert_eq!(store.part_len(&pi1(), ID).unwrap(), 5);
        assert_eq!(store.object_len(&m.key).unwrap(), None);
        store.commit(&pi1(), ID, &m.key).unwrap();
        assert_eq!(
            fs::read(dir.path().join("objects").join(&m.key)).unwrap(),
            b"hello"
        );
        assert_eq!(store.object_len(&m.key).unwrap(), Some(5));
        assert_eq!(store.part_len(&pi1(), ID).unwrap(), 0);
        assert!(
            store.remove(&pi1(), ID).unwrap(),
            "the manifest was still there"
        );
        assert!(!store.remove(&pi1(), ID).unwrap());
        assert_eq!(store.touched(&pi1(), ID).unwrap(), None);

        // A zero-length file never had a .part: committing makes an empty object.
        let mut empty = manifest();
        empty.length = 0;
        empty.key = "pi-1/ftp/2026-12-01/21/empty".into();
        store.save(ID, &empty).unwrap();
        store.commit(&pi1(), ID, &empty.key).unwrap();
        assert_eq!(store.object_len(&empty.key).unwrap(), Some(0));
    }

    #[test]
    fn a_new_manifest_starts_without_stray_bytes() {
        let (_dir, store) = store();
        fs::create_dir_all(store.gateway_dir(&pi1())).unwrap();
        fs::write(store.part_path(&pi1(), ID), b"stray").unwrap();
        store.save(ID, &manifest()).unwrap();
        assert_eq!(store.part_len(&pi1(), ID).unwrap(), 0);
    }

    #[test]
    fn s3_part_files_are_numbered_and_sent_ones_are_recognised() {
        let (dir, store) = store();
        let mut m = manifest();
        m.length = 3 * 64 + 5;
        m.part_size = Some(64);
        store.save(ID, &m).unwrap();
        assert_eq!(m.next_part(), 1);
        assert_eq!(m.shipped(), 0);
        let gw = dir.path().join("uploads/pi-1");
        assert_eq!(
            store.part_path_at(&pi1(), ID, 1),
            gw.join(format!("{ID}.part"))
        );
        assert_eq!(
            store.part_path_at(&pi1(), ID, 3),
            gw.join(format!("{ID}.3.part"))
        );

        // Part 1 sent: recorded with the hash state at its end.
        let bytes: Vec<u8> = (0..64u8).collect();
        store
            .open_part_at(&pi1(), ID, 1)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let mut h = Sha256::new();
        h.update(&bytes);
        m.multipart = Some(Multipart {
            upload_id: "u-1".into(),
            parts: vec![ShippedPart {
                number: 1,
                etag: "\"e1\"".into(),
            }],
            midstate: h.midstate().unwrap(),
        });
        store.update(ID, &m).unwrap();
        assert_eq!(store.load(&pi1(), ID).unwrap(), Some(m.clone()));
        assert_eq!((m.next_part(), m.shipped()), (2, 64));
        store
            .open_part_at(&pi1(), ID, 2)
            .unwrap()
            .write_all(b"abc")
            .unwrap();
        assert_eq!(store.part_len_at(&pi1(), ID, 2).unwrap(), 3);
        // The file of part 1 is left as by a crash before its deletion: recognised.
        assert!(store.remove_parts_before(&pi1(), ID, 2).unwrap());
        assert!(!store.part_path_at(&pi1(), ID, 1).exists());
        assert!(store.part_path_at(&pi1(), ID, 2).exists());
        assert!(!store.remove_parts_before(&pi1(), ID, 2).unwrap());
        // The hash resumes from the state after part 1 and reads only part 2's file.
        let base = Hashed::after_shipped(&m).unwrap();
        let (h2, _) =
            resume_hasher_from(None, base, &store.part_path_at(&pi1(), ID, 2), 67).unwrap();
        let mut all = bytes.clone();
        all.extend_from_slice(b"abc");
        assert_eq!(h2.offset, 67);
        assert_eq!(
            h2.hasher.finalize(),
            <[u8; 32]>::from(sha2::Sha256::digest(&all))
        );
        // scan sees one upload with the bytes held here; remove takes every part file.
        let found = store.scan().unwrap();
        assert_eq!((found.len(), found[0].part_len), (1, 3));
        assert!(store.remove(&pi1(), ID).unwrap());
        assert!(fs::read_dir(&gw).unwrap().next().is_none());
        // Names that only look like part files are not taken for them.
        for name in [
            format!("{ID}.x.part"),
            format!("{ID}..part"),
            format!("{ID}.0.part"),
        ] {
            assert_eq!(part_number(&name, ID), None, "{name}");
        }
    }

    #[test]
    fn inconsistent_s3_manifests_are_refused() {
        let (dir, store) = store();
        let good = {
            let mut m = manifest();
            m.length = 200;
            m.part_size = Some(64);
            let mut h = Sha256::new();
            h.update(&[7u8; 64]);
            m.multipart = Some(Multipart {
                upload_id: "u".into(),
                parts: vec![ShippedPart {
                    number: 1,
                    etag: "e".into(),
                }],
                midstate: h.midstate().unwrap(),
            });
            m
        };
        assert_eq!(good.check(), Ok(()));
        store.save(ID, &good).unwrap();
        assert!(store.load(&pi1(), ID).unwrap().is_some());
        let mut no_size = good.clone();
        no_size.part_size = None;
        let mut misnumbered = good.clone();
        misnumbered.multipart.as_mut().unwrap().parts[0].number = 2;
        let mut wrong_bytes = good.clone();
        wrong_bytes.multipart.as_mut().unwrap().midstate.bytes = 128;
        let mut damaged = good.clone();
        damaged.multipart.as_mut().unwrap().midstate.state = "zz".into();
        for bad in [no_size, misnumbered, wrong_bytes, damaged] {
            assert!(bad.check().is_err(), "{bad:?}");
            store.update(ID, &bad).unwrap();
            let e = store.load(&pi1(), ID).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
        drop(dir);
    }

    #[test]
    fn the_hasher_resumes_from_the_cache_or_from_disk() {
        let (_dir, store) = store();
        store.save(ID, &manifest()).unwrap();
        let part = store.part_path(&pi1(), ID);
        fs::write(&part, b"hello world").unwrap();
        let whole: [u8; 32] = sha2::Sha256::digest(b"hello world").into();

        // Nothing cached (a restart): read from disk.
        let (h, reread) = resume_hasher_from(None, Hashed::empty(), &part, 6).unwrap();
        assert!(reread);
        assert_eq!(h.offset, 6);
        let mut h2 = h.clone();
        h2.hasher.update(b"world");
        assert_eq!(h2.hasher.finalize(), whole);

        // A cache that covers exactly the bytes held is used as it is.
        let mut cached = Hashed {
            offset: 6,
            hasher: Sha256::new(),
        };
        cached.hasher.update(b"hello ");
        let (h, reread) =
            resume_hasher_from(Some(cached.clone()), Hashed::empty(), &part, 6).unwrap();
        assert!(!reread);
        let mut h3 = h;
        h3.hasher.update(b"world");
        assert_eq!(h3.hasher.finalize(), whole);

        // A cache at another offset (a write failed half-way) is thrown away.
        let (h, reread) = resume_hasher_from(Some(cached), Hashed::empty(), &part, 11).unwrap();
        assert!(reread);
        assert_eq!(h.hasher.finalize(), whole);

        // Asking for more than the file has is an error, not a wrong digest.
        assert!(resume_hasher_from(None, Hashed::empty(), &part, 12).is_err());
        // Zero bytes need no file.
        let (h, _) =
            resume_hasher_from(None, Hashed::empty(), &store.part_path(&pi1(), "none"), 0).unwrap();
        assert_eq!(
            h.hasher.finalize(),
            <[u8; 32]>::from(sha2::Sha256::digest(b""))
        );
    }

    #[test]
    fn scan_lists_uploads_with_their_last_touch() {
        let (dir, store) = store();
        assert!(store.scan().unwrap().is_empty());
        store.save(ID, &manifest()).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::open(store.manifest_path(&pi1(), ID))
            .unwrap()
            .set_modified(old)
            .unwrap();
        // Stray files are not uploads.
        fs::write(dir.path().join("uploads/pi-1/notes.txt"), b"").unwrap();
        fs::write(dir.path().join("uploads/README"), b"").unwrap();
        let found = store.scan().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].id.as_str(), found[0].part_len), (ID, 0));
        assert_eq!(found[0].touched, old);
        // Bytes written later count as a touch.
        store
            .open_part(&pi1(), ID)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let found = store.scan().unwrap();
        assert!(found[0].touched > old);
        assert_eq!(found[0].part_len, 1);
        store.touch(&pi1(), ID).unwrap();
    }
}
