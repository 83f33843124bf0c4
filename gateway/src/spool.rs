//! Taking finished files into the spool, and letting them go once delivered.
//!
//! A file moves from its drop directory into the spool in three steps, so that a power
//! cut at any point loses nothing and sends nothing twice:
//!
//! 1. **claim** — the outbox records where the file is (path, device, inode) and the name
//!    it will have in the spool (`file_claims`), in one transaction for a whole batch;
//! 2. **take** — the file is renamed into the spool (same filesystem: no data is copied,
//!    and the camera can write the same name again at once without touching it) or, on
//!    another filesystem or with `after_upload = "keep"`, copied there; the spool file
//!    and the directories are fsynced — the FTP server never fsyncs what it wrote — and
//!    the file is hashed (SHA-256) and its first bytes sniffed;
//! 3. **commit** — its record (the CloudEvent, with the spool name, size and digest, never
//!    the bytes) is appended to the outbox, and the claim deleted, in one transaction.
//!
//! At start, the files source (`sources::files`) finishes or undoes whatever claims are left. The
//! functions here block (file I/O): call them on `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use pigeon_shared::sys;
use sha2::{Digest, Sha256};

use crate::outbox::{FileClaim, FileRef};

/// The file name's extension, lowercased, if it is a plausible one for an object key:
/// 1 to 16 characters from `a-z 0-9` (so `snap.JPG` → `jpg`, `clip.tar.gz` → `gz`,
/// `weird.ü` → none).
pub(crate) fn extension(name: &str) -> Option<String> {
    let (stem, ext) = name.rsplit_once('.')?;
    if stem.is_empty() {
        return None;
    }
    let ext = ext.to_ascii_lowercase();
    pigeon_shared::wire::valid_extension(&ext).then_some(ext)
}

/// How many first bytes of a file are kept for content sniffing (the drop directories'
/// `sniff`, which names a file's content type from them).
pub(crate) const SNIFF_LEN: usize = 16;

/// Read and copy buffer size.
const CHUNK: usize = 256 * 1024;

/// Suffix of a copy in progress.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// The spool directory.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    dev: u64,
    /// The mount it is on, when the kernel tells (`statx`, Linux 5.8+): a rename cannot
    /// cross mounts even on one filesystem (systemd's `ReadWritePaths=` bind mounts).
    mount: Option<u64>,
}

/// Why a file was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PickupError {
    #[error("it is gone (deleted or renamed before it could be picked up)")]
    Vanished,
    #[error("it is not a regular file ({0})")]
    NotRegular(&'static str),
    #[error(
        "it cannot be read: {0} (the gateway's user needs read access to the files and write access to their directory)"
    )]
    Unreadable(io::Error),
    #[error(
        "it cannot be moved into the spool: {0} (the gateway's user needs write access to the drop directory)"
    )]
    CannotMove(io::Error),
    #[error("the spool is full: {0}; it stays where it is and is tried again")]
    SpoolFull(io::Error),
    #[error("it changed while it was being copied; it is tried again")]
    Changed,
    #[error(
        "it cannot be renamed into the spool, which is on another mount; it is copied from now on"
    )]
    CrossMount,
    #[error("something still has it open for writing")]
    StillOpen,
    #[error(
        "there is no room for it (outbox.max_bytes, or outbox.min_free on the filesystem of the data dir or the spool), and not enough of this watch's priority or lower may be dropped to make some; it waits in the drop directory"
    )]
    OutboxFull,
    #[error("{0}")]
    Io(io::Error),
}

impl PickupError {
    /// A short label for metrics and logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            PickupError::Vanished => "vanished",
            PickupError::NotRegular(_) => "not_regular",
            PickupError::Unreadable(_) => "unreadable",
            PickupError::CannotMove(_) => "cannot_move",
            PickupError::SpoolFull(_) => "spool_full",
            PickupError::Changed => "changed",
            PickupError::CrossMount => "cross_mount",
            PickupError::StillOpen => "still_open",
            PickupError::OutboxFull => "outbox_full",
            PickupError::Io(_) => "io",
        }
    }

    /// Whether trying again later may succeed (without the file changing).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            PickupError::SpoolFull(_)
                | PickupError::OutboxFull
                | PickupError::Changed
                | PickupError::CrossMount
                | PickupError::Io(_)
        )
    }
}

fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Identity and state of a file as stat shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStat {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
}

impl FileStat {
    pub(crate) fn of(m: &fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
        }
    }
}

/// A finished file, opened and checked, about to be claimed.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) claim: FileClaim,
    pub(crate) stat: FileStat,
    /// The original, open: a copy reads from it, so a rename-over by the camera cannot
    /// swap the bytes under the copy.
    file: File,
}

/// A file in the spool, hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) spool: String,
    pub(crate) size: u64,
    pub(crate) sha256: [u8; 32],
    /// The first bytes, for content sniffing.
    pub(crate) head: Vec<u8>,
    /// The modification time the camera left (ns since the epoch).
    pub(crate) mtime_ns: i64,
    /// Copied (the original is still in the drop directory), not moved.
    pub(crate) copied: bool,
}

impl Spool {
    /// Creates the spool directory if needed.
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let dev = fs::metadata(dir)?.dev();
        Ok(Self {
            dir: dir.to_owned(),
            dev,
            mount: sys::mount_id(dir),
        })
    }

    /// The spool at `dir` as it is, without creating it (for the uplink, which only
    /// reads and removes files).
    pub(crate) fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            dev: fs::metadata(dir).map_or(0, |m| m.dev()),
            mount: sys::mount_id(dir),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether files in `dir` can be renamed into the spool (same filesystem, same
    /// mount), so that they move instead of being copied.
    pub(crate) fn same_filesystem(&self, dir: &Path) -> bool {
        fs::metadata(dir).is_ok_and(|m| m.dev() == self.dev) && self.same_mount(sys::mount_id(dir))
    }

    fn same_mount(&self, other: Option<u64>) -> bool {
        match (self.mount, other) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }

    /// Opens and checks a finished file for a claim: it must be a regular file (not a
    /// link, pipe or device) that the gateway can read. `copy`: it is copied into the
    /// spool even if it could be moved (`after_upload = "keep"`: it stays in place; or
    /// a rename across mounts failed before).
    pub(crate) fn prepare(
        &self,
        watch: &str,
        path: &Path,
        rel: &Path,
        copy: bool,
        now_us: i64,
    ) -> Result<Prepared, PickupError> {
        let file = open_for_reading(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PickupError::Vanished,
            _ if e.raw_os_error() == Some(libc::ELOOP) => {
                PickupError::NotRegular("a symbolic link")
            }
            _ => PickupError::Unreadable(e),
        })?;
        let meta = file.metadata().map_err(PickupError::Io)?;
        let ft = meta.file_type();
        if !ft.is_file() {
            use std::os::unix::fs::FileTypeExt;
            return Err(PickupError::NotRegular(if ft.is_dir() {
                "a directory"
            } else if ft.is_fifo() {
                "a named pipe"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "a device"
            }));
        }
        // A file whose end was guessed from a quiet period (found by a scan, in a new
        // directory, after lost events) may still be open: its writer only paused.
        if sys::is_open_for_writing(&file) == Some(true) {
            return Err(PickupError::StillOpen);
        }
        let stat = FileStat::of(&meta);
        // A name that is not UTF-8 may still end in ".jpg".
        let ext = path
            .file_name()
            .and_then(|n| extension(&n.to_string_lossy()));
        let spool = match ext {
            Some(e) => format!("{}.{e}", uuid::Uuid::now_v7()),
            None => uuid::Uuid::now_v7().to_string(),
        };
        let copy = copy || stat.dev != self.dev || !self.same_mount(sys::file_mount_id(&file));
        Ok(Prepared {
            claim: FileClaim {
                spool,
                watch: watch.to_owned(),
                original: path.to_owned(),
                rel: rel.to_owned(),
                dev: stat.dev,
                ino: stat.ino,
                copy,
                size: stat.size,
                mtime_ns: stat.mtime_ns,
                committed: false,
                claimed_us: now_us,
                policy: crate::outbox::Policy::default(),
            },
            stat,
            file,
        })
    }

    /// Moves (or copies) a claimed file into the spool, fsyncs it and hashes it. The
    /// directories it left and entered are not synced here: see [`sync_dirs`], once per
    /// batch. On an error the file is where it was, unless the error says otherwise
    /// ([`PickupError::Io`] after the move: the claim finishes it at the next start).
    pub(crate) fn take(&self, p: Prepared) -> Result<Taken, PickupError> {
        let target = self.path(&p.claim.spool);
        if p.claim.copy {
            return self.copy_in(p, &target);
        }
        match fs::rename(&p.claim.original, &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(PickupError::Vanished),
            // Another mount after all (the kernel did not say which mount it is on): the
            // claim says "moved", so give up here; the next claim says "copied".
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => return Err(PickupError::CrossMount),
            Err(e) => return Err(PickupError::CannotMove(e)),
        }
        // What was renamed may be a newer file the camera put under the same name after
        // it was opened; the spool now holds whatever was renamed, so hash that.
        hash_and_sync(&target, &p.claim.spool)
    }

    fn copy_in(&self, p: Prepared, target: &Path) -> Result<Taken, PickupError> {
        let tmp = self.path(&format!("{}{TMP_SUFFIX}", p.claim.spool));
        let result = (|| {
            let mut out = File::create(&tmp).map_err(|e| {
                if is_full(&e) {
                    PickupError::SpoolFull(e)
                } else {
                    PickupError::Io(e)
                }
            })?;
            let mut src = &p.file;
            let digest = read_hashed(&mut src, PickupError::Unreadable, |chunk| {
                out.write_all(chunk).map_err(|e| {
                    if is_full(&e) {
                        PickupError::SpoolFull(e)
                    } else {
                        PickupError::Io(e)
                    }
                })
            })?;
            let Digested { size, sha256, head } = digest;
            // A writer still at it (or the camera rewriting the file in place) would
            // leave a copy of something that never existed as a whole.
            let after = FileStat::of(&p.file.metadata().map_err(PickupError::Io)?);
            if after.size != size || after.mtime_ns != p.stat.mtime_ns {
                return Err(PickupError::Changed);
            }
            out.sync_all().map_err(|e| {
                if is_full(&e) {
                    PickupError::SpoolFull(e)
                } else {
                    PickupError::Io(e)
                }
            })?;
            fs::rename(&tmp, target).map_err(PickupError::Io)?;
            Ok(Taken {
                spool: p.claim.spool.clone(),
                size,
                sha256,
                head,
                mtime_ns: p.stat.mtime_ns,
                copied: true,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// A spooled file from an earlier run (a claim whose move happened, or a file the
    /// outbox lost track of): fsynced and hashed again.
    pub(crate) fn rehash(&self, name: &str) -> Result<Taken, PickupError> {
        hash_and_sync(&self.path(name), name)
    }

    /// The files in the spool (copies in progress excluded).
    pub(crate) fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            if !e.file_type()?.is_file() {
                continue;
            }
            if let Some(name) = e.file_name().to_str() {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes the original of a file copied into the spool (whose record is committed),
    /// if it is still the file that was copied: same inode, size and modification time.
    /// A camera that wrote the name again meanwhile keeps its new file. Returns whether
    /// it was deleted.
    pub(crate) fn release_original(&self, claim: &FileClaim) -> io::Result<bool> {
        let now = match fs::symlink_metadata(&claim.original) {
            Ok(m) => FileStat::of(&m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let same = now.dev == claim.dev
            && now.ino == claim.ino
            && now.size == claim.size
            && now.mtime_ns == claim.mtime_ns;
        if !same {
            return Ok(false);
        }
        match fs::remove_file(&claim.original) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        if let Some(dir) = claim.original.parent() {
            sync_dir(dir)?;
        }
        Ok(true)
    }

    /// Lets a delivered file go: deleted, or moved to its `move_to` place (created as
    /// needed; a name already taken there gets the spool name's stem added). A file
    /// that is already gone counts as done: this may run twice after a crash.
    pub(crate) fn dispose(&self, file: &FileRef) -> io::Result<Option<PathBuf>> {
        let from = self.path(&file.spool);
        let Some(to) = &file.move_to else {
            return match fs::remove_file(&from) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            };
        };
        if !from.exists() {
            return Ok(None);
        }
        let parent = to.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(parent)?;
        // Never over something already there: the name itself, else with the spool
        // name's stem added.
        let mut target = to.to_owned();
        for attempt in 0..2 {
            match rename_noreplace(&from, &target) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt == 0 => {
                    target = with_stem(to, &file.spool);
                }
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    copy_file_synced(&from, &target)?;
                    fs::remove_file(&from)?;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        sync_dir(parent)?;
        Ok(Some(target))
    }
}

/// Opens a file in a drop directory to read it: never following a link out of the
/// directory, never blocking on a FIFO.
pub(crate) fn open_for_reading(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Renames `from` to `to` unless something is at `to` (`AlreadyExists` then).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match sys::rename_noreplace(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // A filesystem without RENAME_NOREPLACE: look, then rename.
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            fs::rename(from, to)
        }
        r => r,
    }
}

/// `to` with `-<spool stem>` before its extension (`snap.jpg` → `snap-0190c7a4-….jpg`).
fn with_stem(to: &Path, spool: &str) -> PathBuf {
    let stem = spool.split('.').next().unwrap_or(spool);
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let renamed = match name.rsplit_once('.') {
        Some((base, ext)) if !base.is_empty() => format!("{base}-{stem}.{ext}"),
        _ => format!("{name}-{stem}"),
    };
    to.with_file_name(renamed)
}

fn copy_file_synced(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = File::open(from)?;
    let mut out = File::create(to)?;
    io::copy(&mut src, &mut out)?;
    out.sync_all()
}

/// fsyncs a file's data and hashes it.
fn hash_and_sync(path: &Path, spool: &str) -> Result<Taken, PickupError> {
    let mut f = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => PickupError::Vanished,
        _ => PickupError::Io(e),
    })?;
    f.sync_all().map_err(PickupError::Io)?;
    let stat = FileStat::of(&f.metadata().map_err(PickupError::Io)?);
    let d = read_hashed(&mut f, PickupError::Io, |_| Ok(()))?;
    Ok(Taken {
        spool: spool.to_owned(),
        size: d.size,
        sha256: d.sha256,
        head: d.head,
        mtime_ns: stat.mtime_ns,
        copied: false,
    })
}

/// What reading a whole file gave.
struct Digested {
    size: u64,
    sha256: [u8; 32],
    /// The first [`SNIFF_LEN`] bytes.
    head: Vec<u8>,
}

/// Reads `src` to its end in [`CHUNK`]s, hashing it and handing each chunk to `sink`;
/// a read error becomes `on_read`'s.
fn read_hashed(
    src: &mut impl Read,
    on_read: fn(io::Error) -> PickupError,
    mut sink: impl FnMut(&[u8]) -> Result<(), PickupError>,
) -> Result<Digested, PickupError> {
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(SNIFF_LEN);
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(on_read(e)),
        };
        sink(&buf[..n])?;
        hasher.update(&buf[..n]);
        if head.len() < SNIFF_LEN {
            let want = (SNIFF_LEN - head.len()).min(n);
            head.extend_from_slice(&buf[..want]);
        }
        size += n as u64;
    }
    Ok(Digested {
        size,
        sha256: hasher.finalize().into(),
        head,
    })
}

/// fsyncs a directory, so that entries created, renamed or removed in it survive a
/// power cut.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs each directory once.
pub(crate) fn sync_dirs<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> io::Result<()> {
    let mut seen = std::collections::HashSet::new();
    for d in dirs {
        if seen.insert(d) {
            sync_dir(d)?;
        }
    }
    Ok(())
}

/// Re-reads a spooled file and compares it with the digest taken at pickup (the relay
/// said the bytes it got do not match: was it the network, or the SD card?).
pub(crate) fn verify(spool: &Spool, file: &FileRef) -> Result<bool, PickupError> {
    let t = spool.rehash(&file.spool)?;
    Ok(t.sha256 == file.sha256 && t.size == file.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Spool, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let drop = dir.path().join("drop");
        fs::create_dir_all(drop.join("cam1")).unwrap();
        (dir, spool, drop)
    }

    fn sha(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    #[test]
    fn a_move_leaves_the_name_free_for_the_camera_and_hashes_the_bytes() {
        let (_d, spool, drop) = setup();
        let f = drop.join("cam1/snapshot.JPG");
        let data = b"\xFF\xD8\xFF\xE0 a jpeg".repeat(1000);
        fs::write(&f, &data).unwrap();
        let p = spool
            .prepare("cams", &f, Path::new("cam1/snapshot.JPG"), false, 1)
            .unwrap();
        assert!(!p.claim.copy, "same filesystem: moved");
        assert!(p.claim.spool.ends_with(".jpg"));
        let t = spool.take(p).unwrap();
        assert!(!f.exists(), "the drop directory is free at once");
        // The camera writes the same name again: the spooled file is untouched.
        fs::write(&f, b"next").unwrap();
        assert_eq!(fs::read(spool.path(&t.spool)).unwrap(), data);
        assert_eq!(t.sha256, sha(&data));
        assert_eq!(t.size, data.len() as u64);
        assert_eq!(&t.head[..], &data[..SNIFF_LEN]);
        assert_eq!(spool.list().unwrap(), vec![t.spool.clone()]);
        assert_eq!(spool.rehash(&t.spool).unwrap(), t);
    }

    #[test]
    fn keep_copies_and_leaves_the_original() {
        let (_d, spool, drop) = setup();
        let f = drop.join("clip.mp4");
        fs::write(&f, b"clip").unwrap();
        let p = spool
            .prepare("cams", &f, Path::new("clip.mp4"), true, 1)
            .unwrap();
        assert!(p.claim.copy);
        let t = spool.take(p).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"clip");
        assert_eq!(fs::read(spool.path(&t.spool)).unwrap(), b"clip");
        assert_eq!(t.sha256, sha(b"clip"));
        assert!(
            !spool.path(&format!("{}{TMP_SUFFIX}", t.spool)).exists(),
            "no copy in progress is left"
        );
    }

    #[test]
    fn a_copied_original_is_deleted_only_if_the_camera_did_not_write_it_again() {
        let (_d, spool, drop) = setup();
        let f = drop.join("snap.jpg");
        fs::write(&f, b"first").unwrap();
        let mut p = spool
            .prepare("c", &f, Path::new("snap.jpg"), true, 1)
            .unwrap();
        p.claim.copy = true;
        let claim = p.claim.clone();
        let t = spool.take(p).unwrap();
        assert!(t.copied && f.exists());
        assert!(spool.release_original(&claim).unwrap());
        assert!(!f.exists());
        assert!(!spool.release_original(&claim).unwrap(), "twice is fine");

        // The camera wrote the name again after the copy: its new file stays.
        fs::write(&f, b"second").unwrap();
        let p = spool
            .prepare("c", &f, Path::new("snap.jpg"), true, 1)
            .unwrap();
        let claim = p.claim.clone();
        spool.take(p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&f, b"third, longer").unwrap();
        assert!(!spool.release_original(&claim).unwrap());
        assert_eq!(fs::read(&f).unwrap(), b"third, longer");
    }

    #[test]
    fn odd_files_are_refused_with_their_reason() {
        let (_d, spool, drop) = setup();
        let gone = drop.join("gone.jpg");
        assert!(matches!(
            spool.prepare("c", &gone, Path::new("gone.jpg"), false, 1),
            Err(PickupError::Vanished)
        ));
        let link = drop.join("link.jpg");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let e = spool
            .prepare("c", &link, Path::new("link.jpg"), false, 1)
            .unwrap_err();
        assert!(matches!(e, PickupError::NotRegular(_)), "{e}");
        let fifo = drop.join("pipe.jpg");
        sys::make_fifo(&fifo, 0o644).unwrap();
        let e = spool
            .prepare("c", &fifo, Path::new("pipe.jpg"), false, 1)
            .unwrap_err();
        assert!(e.to_string().contains("named pipe"), "{e}");
        let e = spool
            .prepare("c", &drop.join("cam1"), Path::new("cam1"), false, 1)
            .unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn a_file_still_open_for_writing_is_refused_until_closed() {
        let (_d, spool, drop) = setup();
        sys::ignore_lease_breaks();
        let f = drop.join("open.jpg");
        let mut w = File::create(&f).unwrap();
        w.write_all(b"half").unwrap();
        let me = sys::effective_uid();
        let me_owner = me == 0 || fs::metadata(&f).unwrap().uid() == me;
        if me_owner {
            let e = spool
                .prepare("c", &f, Path::new("open.jpg"), false, 1)
                .unwrap_err();
            assert!(matches!(e, PickupError::StillOpen), "{e}");
        }
        std::mem::drop(w);
        let p = spool
            .prepare("c", &f, Path::new("open.jpg"), false, 1)
            .unwrap();
        assert_eq!(sys::is_open_for_writing(&p.file), Some(false));
    }

    #[test]
    fn a_file_deleted_between_claim_and_take_is_reported_gone() {
        let (_d, spool, drop) = setup();
        let f = drop.join("a.jpg");
        fs::write(&f, b"x").unwrap();
        let p = spool
            .prepare("c", &f, Path::new("a.jpg"), false, 1)
            .unwrap();
        fs::remove_file(&f).unwrap();
        assert!(matches!(spool.take(p), Err(PickupError::Vanished)));
    }

    #[test]
    fn dispose_deletes_or_moves_and_never_overwrites() {
        let (d, spool, _drop) = setup();
        let done = d.path().join("done");
        let mk = |name: &str, body: &[u8], move_to: Option<PathBuf>| {
            fs::write(spool.path(name), body).unwrap();
            FileRef {
                spool: name.to_owned(),
                size: body.len() as u64,
                sha256: sha(body),
                move_to,
            }
        };
        let a = mk("0190-a.jpg", b"a", None);
        assert_eq!(spool.dispose(&a).unwrap(), None);
        assert!(!spool.path(&a.spool).exists());
        assert_eq!(spool.dispose(&a).unwrap(), None, "twice is fine");

        let target = done.join("cam1/snap.jpg");
        let b = mk("0190-b.jpg", b"b", Some(target.clone()));
        assert_eq!(spool.dispose(&b).unwrap(), Some(target.clone()));
        assert_eq!(fs::read(&target).unwrap(), b"b");
        let c = mk("0190-c.jpg", b"c", Some(target.clone()));
        let moved = spool.dispose(&c).unwrap().unwrap();
        assert_eq!(moved, done.join("cam1/snap-0190-c.jpg"));
        assert_eq!(fs::read(&target).unwrap(), b"b", "not overwritten");
        assert_eq!(fs::read(&moved).unwrap(), b"c");
        assert!(verify(&spool, &mk("0190-d", b"d", None)).unwrap());
        let mut wrong = mk("0190-e", b"e", None);
        wrong.sha256[0] ^= 1;
        assert!(!verify(&spool, &wrong).unwrap());
    }
}
