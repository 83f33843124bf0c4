//! The data dir's layout and the few durable file operations every part of it uses:
//! `stream/` (the stream files, [`crate::sink::stream::files`]), `objects/` (uploaded
//! files, [`crate::upload`]), `state/` (the deduplication checkpoint and capture state).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// The directory under the data dir that holds the stream.
pub const STREAM_DIR: &str = "stream";
/// The directory under the data dir that holds uploaded files (see [`crate::upload`]).
pub const OBJECTS_DIR: &str = "objects";
/// The directory under the data dir that holds the deduplication checkpoint.
pub const STATE_DIR: &str = "state";

/// Replaces `dir/name` with `bytes` atomically: a temporary file written and fsynced,
/// renamed over it, the directory fsynced.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Makes `dir` (whose parent exists) if missing; a new directory's entry is made durable
/// by syncing the parent. Returns whether it was created.
pub fn ensure_dir(dir: &Path) -> io::Result<bool> {
    match fs::create_dir(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(e),
    }
}

/// fsyncs a directory, so entries created or renamed in it survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
