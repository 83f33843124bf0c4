//! Child processes with logs, SIGKILL/SIGTERM and restart; locating the binaries under test.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `pigeon-gateway` binary: `$PIGEON_GATEWAY_BIN`, or next to the test executable.
pub fn gateway_bin() -> PathBuf {
    locate("pigeon-gateway", "PIGEON_GATEWAY_BIN")
}

/// The `pigeon-relay` binary: `$PIGEON_RELAY_BIN`, or next to the test executable.
pub fn relay_bin() -> PathBuf {
    locate("pigeon-relay", "PIGEON_RELAY_BIN")
}

fn locate(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} is not a file", p.display());
        return p;
    }
    // target/debug/deps/<test>-<hash> → target/debug/<name>
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe.parent().expect("the test executable's directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: build it first (`cargo build -p {name}`; `cargo test --workspace` \
         builds it too) or point {env} at it",
        path.display()
    );
    path
}

/// A child process whose stdout and stderr are appended to one log file. It can be
/// started again after it exited or was killed; it is SIGKILLed when dropped.
pub struct Proc {
    label: String,
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Proc {
    pub fn new(label: &str, program: impl AsRef<Path>, log: impl AsRef<Path>) -> Self {
        Proc {
            label: label.to_string(),
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            envs: Vec::new(),
            log: log.as_ref().to_path_buf(),
            child: None,
            starts: 0,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote so far (all its runs).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process. Panics if it is already running.
    pub fn start(&mut self) {
        assert!(
            !self.is_running(),
            "{} is already running (pid {:?})",
            self.label,
            self.pid()
        );
        self.starts += 1;
        self.mark(&format!(
            "start #{}: {} {}",
            self.starts,
            self.program.display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("clone log file handle");
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({}): {e}",
                    self.label,
                    self.program.display()
                )
            });
        self.child = Some(child);
    }

    /// The exit status if it has exited (reaping it), `None` while it runs or was never started.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                self.mark(&format!("exited: {status}"));
                Some(status)
            }
            Ok(None) => None,
            Err(e) => panic!("cannot wait for {}: {e}", self.label),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exit_status().is_none()
    }

    /// Panics, naming the exit status, if the process is not running.
    pub fn assert_running(&mut self) {
        if self.child.is_none() {
            panic!("{} is not running", self.label);
        }
        if let Some(status) = self.exit_status() {
            panic!(
                "{} exited by itself ({status}); see {}",
                self.label,
                self.log.display()
            );
        }
    }

    /// SIGKILL, and reap. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
                self.mark("SIGKILL");
            } else {
                let _ = child.wait();
            }
        }
    }

    /// SIGTERM, then waits up to `grace` for it to exit and returns its status. Panics
    /// (after a SIGKILL) if it did not exit in time.
    pub async fn terminate(&mut self, grace: Duration) -> ExitStatus {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.label));
        self.mark("SIGTERM");
        // Our own child, not reaped yet.
        let _ = pigeon_shared::sys::send_signal(pid, libc::SIGTERM);
        match self.wait_exit(grace).await {
            Some(status) => status,
            None => {
                self.kill();
                panic!(
                    "{} did not exit within {:.1} s of SIGTERM",
                    self.label,
                    grace.as_secs_f64()
                );
            }
        }
    }

    /// SIGTERM, and panics unless it exits with status 0 within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        let status = self.terminate(grace).await;
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM",
            self.label
        );
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if self.child.is_none() {
                panic!("{} is not running", self.label);
            }
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Appends a marker line to the log, so restarts and kills are visible in it.
    fn mark(&self, what: &str) {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&self.log) {
            let _ = writeln!(f, "=== pigeon-e2e: {} {what} ===", self.label);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command to completion with a timeout and returns its output.
pub async fn run_command(program: &Path, args: &[&str], timeout: Duration) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot wait for {}: {e}", program.display()),
        Err(_) => panic!(
            "{} {} did not finish within {:.1} s",
            program.display(),
            args.join(" "),
            timeout.as_secs_f64()
        ),
    }
}

/// An output for a failure message: exit status, stdout and stderr.
/// A test server's binary: `$<env>` if set, else `name` on `PATH`; a panic naming the
/// install script if there is none.
pub fn server_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found: run `scripts/install-test-deps` as root, or set {env}")
        })
}

pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether this process runs as root (mosquitto then needs `user root` to keep its rights).
pub fn is_root() -> bool {
    pigeon_shared::sys::effective_uid() == 0
}

/// A port on 127.0.0.1 that was free a moment ago, chosen at random below Linux's
/// ephemeral range (32768–60999) so that outgoing connections never take it while a
/// server using it is restarted.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    let random = RandomState::new();
    for i in 0u64..10_000 {
        let port = 20_000 + (random.hash_one(i) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in 20000..32000");
}
