//! Checking a configured data directory before a service starts on it, the same way in
//! both binaries: a directory the service cannot use is a configuration problem (exit
//! 64, no restart loop), told apart from failures at run time.
//!
//! The check tries what the service will do instead of asking about permissions:
//! access(2) says yes to root everywhere, yet root cannot write below a read-only
//! filesystem, `/proc` or `/sys`, on a full disk, or in an immutable (`chattr +i`)
//! directory (issue 24).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes the probe file writes and syncs: one block, so a full disk says so.
const PROBE_BYTES: usize = 4096;

/// Checks that the service can use `dir`: the directory exists and a file can be written
/// and synced in it, or it is missing and a directory can be made (and a file written
/// and synced in that) in its nearest existing ancestor. `key` names the setting in the
/// message, which also gives the OS error.
///
/// Leaves nothing behind: the probe file (and directory) it makes are removed again.
pub fn check_writable_dir(key: &str, dir: &Path) -> Result<(), String> {
    let mut probe = dir;
    loop {
        match fs::metadata(probe) {
            Ok(m) if !m.is_dir() => {
                return Err(format!("{key}: {} is not a directory", probe.display()));
            }
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match probe.parent() {
                Some(p) if p.as_os_str().is_empty() => probe = Path::new("."),
                Some(p) => probe = p,
                None => break,
            },
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(format!(
                    "{key}: {} is not a directory: a file is in its path",
                    dir.display()
                ));
            }
            Err(e) => return Err(format!("{key}: {}: {e}", probe.display())),
        }
    }
    if probe == dir {
        try_write_in(dir).map_err(|e| {
            format!(
                "{key}: {} is not writable: {e} (tried as {})",
                dir.display(),
                user()
            )
        })
    } else {
        try_create_in(probe).map_err(|e| {
            format!(
                "{key}: {} cannot be created: making a directory in {} failed: {e} (tried as {})",
                dir.display(),
                probe.display(),
                user()
            )
        })
    }
}

/// A name no other check (in this process or another) uses at the same time.
fn probe_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        ".pigeon-check-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Makes a directory in `parent`, writes and syncs a file in it, and removes both.
fn try_create_in(parent: &Path) -> io::Result<()> {
    let sub = parent.join(probe_name());
    fs::create_dir(&sub)?;
    let written = try_write_in(&sub);
    let removed = fs::remove_dir(&sub);
    written.and(removed)
}

/// Writes a file in `dir`, syncs it, and removes it.
fn try_write_in(dir: &Path) -> io::Result<()> {
    let path: PathBuf = dir.join(probe_name());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let written = f.write_all(&[0; PROBE_BYTES]).and_then(|()| f.sync_all());
    drop(f);
    let removed = fs::remove_file(&path);
    written.and(removed)
}

fn user() -> String {
    std::env::var("USER").unwrap_or_else(|_| format!("uid {}", crate::sys::effective_uid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let t = std::env::temp_dir().join(format!("pigeon-dirs-{name}-{}", std::process::id()));
        fs::create_dir_all(&t).unwrap();
        t
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn existing_missing_and_file() {
        let t = temp("basic");
        assert!(check_writable_dir("k", &t).is_ok());
        assert!(
            check_writable_dir("k", &t.join("a/b/c")).is_ok(),
            "creatable"
        );
        assert!(check_writable_dir("k", Path::new("relative-not-there")).is_ok());
        assert!(entries(&t).is_empty(), "the check left {:?}", entries(&t));
        let f = t.join("file");
        fs::write(&f, "x").unwrap();
        for d in [f.clone(), f.join("below")] {
            let e = check_writable_dir("gateway.data_dir", &d).unwrap_err();
            assert!(
                e.starts_with("gateway.data_dir: ") && e.contains("is not a directory"),
                "{e}"
            );
        }
        fs::remove_dir_all(&t).unwrap();
    }

    /// A data dir below a regular file cannot be made, by root neither (ENOTDIR).
    #[test]
    fn issue_24_a_dir_under_a_regular_file_is_refused() {
        let t = temp("under-file");
        let f = t.join("file");
        fs::write(&f, "x").unwrap();
        let d = f.join("data/deeper");
        let e = check_writable_dir("data_dir", &d).unwrap_err();
        assert!(e.starts_with("data_dir: "), "{e}");
        assert!(e.contains(&d.display().to_string()), "{e}");
        assert!(e.contains("is not a directory"), "{e}");
        fs::remove_dir_all(&t).unwrap();
    }

    /// Nothing can be made in `/proc` or in `/sys`, by root neither, although access(2)
    /// says root may write there: the check must try, and say what the OS said.
    #[test]
    fn issue_24_a_dir_under_proc_or_sys_is_refused_for_root_too() {
        for d in ["/proc/pigeon-issue-24/data", "/proc/self/pigeon-data"] {
            let d = Path::new(d);
            let e = check_writable_dir("data_dir", d).unwrap_err();
            assert!(e.starts_with("data_dir: /proc/"), "{e}");
            assert!(e.contains("cannot be created"), "{e}");
            assert!(e.contains("os error"), "the OS error is missing: {e}");
        }
        if Path::new("/sys/kernel").is_dir() {
            let e = check_writable_dir("data_dir", Path::new("/sys/kernel/pigeon")).unwrap_err();
            assert!(e.contains("cannot be created"), "{e}");
            // An existing directory of /sys: nothing can be written in it.
            let e = check_writable_dir("data_dir", Path::new("/sys/kernel")).unwrap_err();
            assert!(
                e.contains("is not writable") && e.contains("os error"),
                "{e}"
            );
        }
    }
}
