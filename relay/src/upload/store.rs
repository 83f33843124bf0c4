//! Uploads on disk, with blocking I/O (the service calls it through `spawn_blocking`).
//!
//! ```text
//! <data_dir>/uploads/<gateway>/<id>.json      the manifest: the event, length, sha256, key
//! <data_dir>/uploads/<gateway>/<id>.part      the bytes received so far, appended to
//! <data_dir>/objects/<key>                    a finished file, renamed here from .part
//! ```
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
use sha2::{Digest, Sha256};

use crate::sink::RecoveryError;
use crate::sink::stream::{OBJECTS_DIR, ensure_dir, sync_dir};

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
    pub event: serde_json::Value,
}

impl Manifest {
    /// The format version this relay writes and reads.
    pub const VERSION: u32 = 1;
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

impl std::fmt::Debug for Hashed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hashed")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// The hash state of the first `len` bytes of `path`: `cached` when it covers exactly
/// that many (the usual case: the same process received them), else read from disk
/// (after a restart, or a write that failed half-way). The flag says whether it re-read.
pub fn resume_hasher(cached: Option<Hashed>, path: &Path, len: u64) -> io::Result<(Hashed, bool)> {
    if let Some(h) = cached.filter(|h| h.offset == len) {
        return Ok((h, false));
    }
    Ok((hash_prefix(path, len)?, true))
}

/// SHA-256 of the first `len` bytes of `path`; an error if it is shorter.
pub fn hash_prefix(path: &Path, len: u64) -> io::Result<Hashed> {
    let mut hasher = Sha256::new();
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
        offset: len,
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
        self.gateway_dir(gateway).join(format!("{id}{PART_SUFFIX}"))
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
        Ok(Some(m))
    }

    /// Writes the manifest of a new upload atomically, creating the gateway's directory
    /// if needed, and deletes bytes a previous upload of the id may have left without a
    /// manifest, so that the new upload is at offset 0.
    pub fn save(&self, id: &str, m: &Manifest) -> io::Result<()> {
        let dir = self.gateway_dir(&m.gateway);
        ensure_dir(&dir)?;
        remove_if_there(&self.part_path(&m.gateway, id))?;
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
        Ok(not_found_is_none(fs::metadata(self.part_path(gateway, id)))?.map_or(0, |m| m.len()))
    }

    /// Opens the `.part` for appending, creating it if needed.
    pub fn open_part(&self, gateway: &GatewayId, id: &str) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.part_path(gateway, id))
    }

    /// Deletes the upload's bytes (not its manifest).
    pub fn remove_part(&self, gateway: &GatewayId, id: &str) -> io::Result<()> {
        remove_if_there(&self.part_path(gateway, id)).map(drop)
    }

    /// Deletes the upload: bytes and manifest. Whether there was anything.
    pub fn remove(&self, gateway: &GatewayId, id: &str) -> io::Result<bool> {
        // The bytes first: a manifest without bytes is an upload at offset 0, while
        // bytes without a manifest would be an orphan.
        let part = remove_if_there(&self.part_path(gateway, id))?;
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
        let a = mtime(self.manifest_path(gateway, id))?;
        let b = mtime(self.part_path(gateway, id))?;
        Ok(a.max(b))
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
                    .or_else(|| name.strip_suffix(PART_SUFFIX));
                if let Some(id) = id.filter(|id| super::key::is_upload_id(id))
                    && !ids.iter().any(|i| i == id)
                {
                    ids.push(id.to_owned());
                }
            }
            for id in ids {
                if let Some(touched) = self.touched(&gateway, &id)? {
                    let part_len = self.part_len(&gateway, &id)?;
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
            event: serde_json::json!({"id": "e1", "data": {"filename": "a b.jpg"}}),
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
    fn the_hasher_resumes_from_the_cache_or_from_disk() {
        let (_dir, store) = store();
        store.save(ID, &manifest()).unwrap();
        let part = store.part_path(&pi1(), ID);
        fs::write(&part, b"hello world").unwrap();
        let whole: [u8; 32] = Sha256::digest(b"hello world").into();

        // Nothing cached (a restart): read from disk.
        let (h, reread) = resume_hasher(None, &part, 6).unwrap();
        assert!(reread);
        assert_eq!(h.offset, 6);
        let mut h2 = h.clone();
        h2.hasher.update(b"world");
        assert_eq!(<[u8; 32]>::from(h2.hasher.finalize()), whole);

        // A cache that covers exactly the bytes held is used as it is.
        let mut cached = Hashed {
            offset: 6,
            hasher: Sha256::new(),
        };
        cached.hasher.update(b"hello ");
        let (h, reread) = resume_hasher(Some(cached.clone()), &part, 6).unwrap();
        assert!(!reread);
        let mut h3 = h;
        h3.hasher.update(b"world");
        assert_eq!(<[u8; 32]>::from(h3.hasher.finalize()), whole);

        // A cache at another offset (a write failed half-way) is thrown away.
        let (h, reread) = resume_hasher(Some(cached), &part, 11).unwrap();
        assert!(reread);
        assert_eq!(<[u8; 32]>::from(h.hasher.finalize()), whole);

        // Asking for more than the file has is an error, not a wrong digest.
        assert!(resume_hasher(None, &part, 12).is_err());
        // Zero bytes need no file.
        let (h, _) = resume_hasher(None, &store.part_path(&pi1(), "none"), 0).unwrap();
        assert_eq!(
            <[u8; 32]>::from(h.hasher.finalize()),
            <[u8; 32]>::from(Sha256::digest(b""))
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
