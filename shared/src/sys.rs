//! Every call into the C library the workspace makes, each behind a safe function.
//!
//! This is the one module allowed `unsafe` (the workspace denies `unsafe_code`
//! elsewhere): each block below says why the call is sound, and its callers see
//! `io::Result`s and plain values.

#![allow(
    unsafe_code,
    reason = "the workspace's libc calls, each with its SAFETY note"
)]

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

/// The process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// The id of the mount `path` is on (`statx` `STATX_MNT_ID`), if the kernel tells.
pub fn mount_id(path: &Path) -> Option<u64> {
    let c = c_path(path).ok()?;
    statx_mount(libc::AT_FDCWD, &c, 0)
}

/// The id of the mount an open file is on, if the kernel tells.
pub fn file_mount_id(file: &File) -> Option<u64> {
    statx_mount(file.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
}

fn statx_mount(dirfd: libc::c_int, path: &CStr, flags: libc::c_int) -> Option<u64> {
    // SAFETY: an all-zero statx is a valid value of the plain-data struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx fills the struct it is given; `path` is NUL-terminated and outlives
    // the call; `dirfd` is AT_FDCWD or a descriptor the caller's File owns.
    let r = unsafe {
        libc::statx(
            dirfd,
            path.as_ptr(),
            flags | libc::AT_STATX_SYNC_AS_STAT,
            libc::STATX_MNT_ID,
            &mut st,
        )
    };
    (r == 0 && st.stx_mask & libc::STATX_MNT_ID != 0).then_some(st.stx_mnt_id)
}

/// Whether any process has `file` open for writing: `Some(true)` or `Some(false)` when the
/// kernel can tell, `None` when it cannot (not the file's owner and no `CAP_LEASE`, or a
/// filesystem without leases, e.g. NFS).
///
/// A read lease can only be taken on a file nobody has open for writing (`EAGAIN`
/// otherwise). It is given back at once; a writer opening the file meanwhile waits those
/// microseconds for it, and the lease-break signal must be ignored (see
/// [`ignore_lease_breaks`]).
pub fn is_open_for_writing(file: &File) -> Option<bool> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor the caller's File owns; F_SETLEASE takes an int.
    let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        // SAFETY: as above; gives the lease back.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// Makes the lease-break signal (SIGIO) harmless: [`is_open_for_writing`] holds a lease
/// for microseconds, and a writer opening the file right then would otherwise send
/// SIGIO, whose default is to end the process.
pub fn ignore_lease_breaks() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions; nothing
    // in the workspace uses SIGIO.
    unsafe {
        libc::signal(libc::SIGIO, libc::SIG_IGN);
    }
}

/// `renameat2(RENAME_NOREPLACE)`: renames `from` to `to` unless something is at `to`
/// (`AlreadyExists` then). A filesystem without the flag answers `EINVAL`
/// (`InvalidInput`), and the caller decides what to do instead.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Total and available bytes of the filesystem `path` is on (`statvfs`; available is
/// what an unprivileged process may still write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// [`FsSpace`] of the filesystem `path` is on.
#[allow(
    clippy::useless_conversion,
    reason = "statvfs fields are u64 here but u32 on armv7"
)]
pub fn fs_space(path: &Path) -> io::Result<FsSpace> {
    let c = c_path(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and `st` points to writable memory of the right
    // type; statvfs fills it on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the struct (it was zeroed before too).
    let st = unsafe { st.assume_init() };
    let unit = if st.f_frsize > 0 {
        u64::from(st.f_frsize)
    } else {
        u64::from(st.f_bsize)
    };
    Ok(FsSpace {
        total_bytes: u64::from(st.f_blocks).saturating_mul(unit),
        available_bytes: u64::from(st.f_bavail).saturating_mul(unit),
    })
}

/// glibc's malloc tuning for a small long-running daemon: at most `arenas` arenas (glibc
/// gives every thread that allocates its own, and rarely returns their freed memory),
/// buffers of `mmap_threshold` bytes and more straight from and back to the kernel, and
/// the heap's free top returned beyond `trim_threshold`. Call it before other threads
/// exist. Elsewhere than glibc it does nothing.
pub fn tune_malloc(arenas: i32, mmap_threshold: i32, trim_threshold: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts the allocator's tuning parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (arenas, mmap_threshold, trim_threshold);
}

/// Raises the soft limit on open files to the hard limit, and returns the soft limit in
/// force afterwards (`None` if it cannot be read).
// rlim_t is u32 on 32-bit ARM, u64 elsewhere.
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct passed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Some(limit.rlim_cur as u64)
}

/// Sends `signal` (e.g. `libc::SIGTERM`) to process `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes a FIFO at `path` (tests of what a drop directory's odd files do).
pub fn make_fifo(path: &Path, mode: u32) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_of_a_real_directory_and_an_error_for_a_missing_one() {
        let dir = std::env::temp_dir();
        let s = fs_space(&dir).unwrap();
        assert!(s.total_bytes > 0 && s.available_bytes <= s.total_bytes);
        let e = fs_space(&dir.join("pigeon-sys-missing-dir/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = fs_space(Path::new("a\0b")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn rename_noreplace_keeps_what_is_there() {
        let d = std::env::temp_dir().join(format!("pigeon-sys-rename-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        match rename_noreplace(&a, &b) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            // A filesystem without the flag: the caller falls back.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            other => panic!("renamed over an existing file: {other:?}"),
        }
        assert_eq!(std::fs::read(&b).unwrap(), b"b");
        std::fs::remove_file(&b).unwrap();
        if rename_noreplace(&a, &b).is_ok() {
            assert_eq!(std::fs::read(&b).unwrap(), b"a");
            assert!(!a.exists());
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn signals_to_a_pid_out_of_range_are_refused() {
        assert!(send_signal(u32::MAX, 0).is_err());
        assert!(send_signal(std::process::id(), 0).is_ok());
    }
}
