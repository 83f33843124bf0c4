//! A per-test temporary directory that knows the logs written into it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How many lines of each log a failing test prints.
const TAIL_LINES: usize = 60;

/// A temporary directory for one test: configs, data directories and logs of the servers
/// the test starts. Cheap to clone (all clones share one directory).
///
/// When the test fails (the last clone is dropped while panicking), the last lines of every
/// registered log are printed and the directory is kept, its path printed. Set
/// `PIGEON_E2E_KEEP=1` to keep it after a passing test too.
#[derive(Clone)]
pub struct TestDir(Arc<Inner>);

struct Inner {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    logs: Mutex<Vec<(String, PathBuf)>>,
}

impl TestDir {
    /// Creates `$TMPDIR/pigeon-e2e-<name>-XXXXXX`.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pigeon-e2e-{name}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let path = dir.path().to_path_buf();
        std::fs::create_dir_all(path.join("logs")).expect("create logs dir");
        TestDir(Arc::new(Inner {
            dir: Some(dir),
            path,
            logs: Mutex::new(Vec::new()),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// A path inside the directory.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.path.join(rel)
    }

    /// Registers and returns `logs/<label>.log`, printed if the test fails.
    pub fn log_file(&self, label: &str) -> PathBuf {
        let path = self.join("logs").join(format!("{label}.log"));
        let mut logs = self.0.logs.lock().unwrap_or_else(|e| e.into_inner());
        if !logs.iter().any(|(l, _)| l == label) {
            logs.push((label.to_string(), path.clone()));
        }
        path
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let keep = failed || std::env::var_os("PIGEON_E2E_KEEP").is_some_and(|v| v != "0");
        if failed {
            let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
            for (label, path) in logs.iter() {
                print_tail(label, path);
            }
        }
        if keep && let Some(dir) = self.dir.take() {
            eprintln!("pigeon-e2e: test files kept in {}", dir.keep().display());
        }
    }
}

fn print_tail(label: &str, path: &Path) {
    let lines: Vec<String> = match std::fs::File::open(path) {
        Ok(f) => BufReader::new(f)
            .lines()
            .map(|l| l.unwrap_or_else(|e| format!("<unreadable line: {e}>")))
            .collect(),
        Err(e) => {
            eprintln!("----- {label}: cannot read {}: {e}", path.display());
            return;
        }
    };
    let skip = lines.len().saturating_sub(TAIL_LINES);
    eprintln!(
        "----- {label}: last {} of {} lines of {} -----",
        lines.len() - skip,
        lines.len(),
        path.display()
    );
    for line in &lines[skip..] {
        eprintln!("{line}");
    }
}
