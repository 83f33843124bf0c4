//! Checking a configured data directory before a service starts on it, the same way in
//! both binaries: a directory the service cannot use is a configuration problem (exit
//! 64, no restart loop), told apart from failures at run time.

use std::path::Path;

/// Checks that `dir` is a directory the current user can write, or can create because
/// its nearest existing ancestor is writable. `key` names the setting in the message.
/// Creates nothing.
pub fn check_writable_dir(key: &str, dir: &Path) -> Result<(), String> {
    let mut probe = dir;
    loop {
        match std::fs::metadata(probe) {
            Ok(m) if !m.is_dir() => {
                return Err(format!("{key}: {} is not a directory", probe.display()));
            }
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match probe.parent() {
                Some(p) if p.as_os_str().is_empty() => probe = Path::new("."),
                Some(p) => probe = p,
                None => break,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                return Err(format!(
                    "{key}: {} is not a directory: a file is in its path",
                    dir.display()
                ));
            }
            Err(e) => return Err(format!("{key}: {}: {e}", probe.display())),
        }
    }
    if writable(probe) {
        return Ok(());
    }
    let what = if probe == dir {
        "is not writable"
    } else {
        "cannot be created: its parent is not writable"
    };
    Err(format!(
        "{key}: {} {what} (checked {} as {})",
        dir.display(),
        probe.display(),
        user()
    ))
}

fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) only reads the NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

fn user() -> String {
    std::env::var("USER").unwrap_or_else(|_| {
        // SAFETY: geteuid(2) cannot fail and has no preconditions.
        format!("uid {}", unsafe { libc::geteuid() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_missing_and_file() {
        let t = std::env::temp_dir().join(format!("pigeon-dirs-{}", std::process::id()));
        std::fs::create_dir_all(&t).unwrap();
        assert!(check_writable_dir("k", &t).is_ok());
        assert!(
            check_writable_dir("k", &t.join("a/b/c")).is_ok(),
            "creatable"
        );
        assert!(check_writable_dir("k", Path::new("relative-not-there")).is_ok());
        let f = t.join("file");
        std::fs::write(&f, "x").unwrap();
        for d in [f.clone(), f.join("below")] {
            let e = check_writable_dir("gateway.data_dir", &d).unwrap_err();
            assert!(
                e.starts_with("gateway.data_dir: ") && e.contains("is not a directory"),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&t).unwrap();
    }
}
