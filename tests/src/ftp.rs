//! A real pure-ftpd on a free loopback port with one virtual user, and curl as the IP
//! camera that uploads snapshots and clips to it.
//!
//! The server is started as
//!
//! ```text
//! pure-ftpd -S 127.0.0.1,PORT -l puredb:PDB -E -A -H -4 -g PIDFILE -O clf:LOG [-0]
//! ```
//!
//! * `-S 127.0.0.1,PORT` — standalone, on loopback only, on a free port;
//! * `-l puredb:PDB` — only the virtual users of this test's PureDB (no PAM, no
//!   `/etc/passwd`);
//! * `-E` — no anonymous logins; `-A` — every user is chrooted into its home (which is
//!   [`PureFtpd::root`]), so `/` in an FTP path is that directory;
//! * `-H` — no reverse DNS lookups; `-4` — IPv4 only;
//! * `-g PIDFILE` — its pid in this test's directory (the default, `/var/run/pure-ftpd.pid`,
//!   would be shared by every server started in parallel);
//! * `-O clf:LOG` — one line per transfer ([`PureFtpd::log_text`]); everything else
//!   pure-ftpd says goes to syslog only;
//! * `-0` ([`UploadMode::TempThenRename`]) — uploads go to a temporary file
//!   ([`PUREFTPD_UPLOAD_PREFIX`]) that is renamed onto the final name when the transfer
//!   ends.
//!
//! No `-p` passive port range: without one, pure-ftpd lets the kernel pick a free port for
//! each PASV/EPSV data connection, which never collides with other tests (a range would
//! also cap concurrent clients at half its size). No `-j` (create home directories): the
//! home exists before the server starts, so a gateway can watch it before the first login.
//!
//! pure-ftpd must run as root (it chroots and switches to the user's uid; as another user
//! it refuses every login with "421 Sorry, but I can't trust you"), and it refuses virtual
//! users with uid or gid 0, so the virtual user is `nobody:nogroup` (65534) and uploads
//! are owned by it, mode 0644 (pure-ftpd's default umask 133; directories 0755).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::process::{Proc, describe, free_port, is_root, run_command};
use crate::{TestDir, secs};

/// How [`TempThenRename`](UploadMode::TempThenRename) names a file while it is being
/// received: `.pureftpd-upload.<session start, Unix seconds>.<server port>.<session
/// pid>.<random>`, each number in lowercase hex without padding (e.g.
/// `.pureftpd-upload.6b0f3bed.521f.33c3.2182ac62`), in the same directory as the final
/// name. pure-ftpd 1.0.50 `fill_atomic_prefix()`; [`is_pureftpd_temp`] tells them apart.
pub const PUREFTPD_UPLOAD_PREFIX: &str = ".pureftpd-upload.";

/// Whether `name` (a file name, not a path) is one of pure-ftpd's `-0` upload temporaries.
pub fn is_pureftpd_temp(name: &str) -> bool {
    name.strip_prefix(PUREFTPD_UPLOAD_PREFIX)
        .is_some_and(|rest| {
            let fields: Vec<&str> = rest.split('.').collect();
            fields.len() == 4
                && fields
                    .iter()
                    .all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_hexdigit()))
        })
}

/// Where pure-ftpd writes an upload while it is being received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UploadMode {
    /// pure-ftpd's default, like vsftpd's and most camera targets': the file is created
    /// (or truncated) under its final name when the transfer starts and grows as data
    /// arrives, so a half-received file is visible under its real name. A reader must
    /// wait for the writer to close it (inotify `IN_CLOSE_WRITE`).
    #[default]
    InPlace,
    /// `-0`: the data goes to a [`PUREFTPD_UPLOAD_PREFIX`] file in the same directory,
    /// renamed onto the final name (replacing an older file atomically) when the transfer
    /// ends; the final name appears complete (inotify `IN_MOVED_TO`).
    TempThenRename,
}

/// How a test's FTP server is configured.
#[derive(Debug, Clone, Default)]
pub struct PureFtpdOptions {
    pub upload_mode: UploadMode,
}

/// The virtual user's login and password.
const USER: &str = "camera";
const PASSWORD: &str = "camera-secret";
/// SHA-512 crypt of [`PASSWORD`]: `openssl passwd -6 -salt pigeone2e camera-secret`.
/// `pure-pw useradd` would store an argon2id hash calibrated to take about 2 s of CPU, and
/// pure-ftpd checks it at every login: 2–5 s per upload on 2 cores, more with tests in
/// parallel. This one takes crypt(3) about a millisecond.
const PASSWORD_HASH: &str = "$6$pigeone2e$fO6PwqLnxjLNM6ZlooWQ9UpDzxNtg1Be0dWmUIKZCiIh4MsF52yA1efjXJ2So1i/nNqQTwK.GdCOFERpY8YlQ0";
/// `nobody:nogroup`: pure-ftpd refuses virtual users with uid or gid 0.
const OWNER_UID: u32 = 65534;
const OWNER_GID: u32 = 65534;

/// A running pure-ftpd 1.0.50, one per [`TestDir`], stopped (SIGKILL) when dropped. Each
/// login is a separate process that ends when its client disconnects.
pub struct PureFtpd {
    proc: Proc,
    port: u16,
    root: PathBuf,
    transfer_log: PathBuf,
    options: PureFtpdOptions,
}

/// The program named by the environment variable `env` (e.g. `PURE_FTPD_BIN`), or `name`
/// on `PATH`, in `/usr/sbin` or in `/usr/bin`.
fn tool(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: run `scripts/install-test-deps` as root \
                 (or `apt install pure-ftpd curl`), or set {env}"
            )
        })
}

impl PureFtpd {
    /// Creates the virtual user and its home, starts the server on a free port and waits
    /// until it answers with its banner.
    pub async fn start(dir: &TestDir, options: PureFtpdOptions) -> PureFtpd {
        assert!(
            is_root(),
            "pure-ftpd needs root: it chroots into the virtual user's home and switches to \
             its uid (as another user it refuses every login: \"421 Sorry, but I can't \
             trust you\"); run the end-to-end tests as root"
        );
        let conf = dir.join("pure-ftpd");
        let root = dir.join("ftp-root");
        for d in [&conf, &root] {
            std::fs::create_dir_all(d)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        std::os::unix::fs::chown(&root, Some(OWNER_UID), Some(OWNER_GID))
            .unwrap_or_else(|e| panic!("cannot chown {}: {e}", root.display()));

        // The same line `pure-pw useradd camera -u 65534 -g 65534 -d ROOT` writes, with a
        // cheaper hash; `pure-pw mkdb` turns it into the PureDB pure-ftpd reads.
        let home = root.to_str().expect("the test directory's path is UTF-8");
        assert!(
            !home.contains([':', '\n']),
            "{home}: a passwd field cannot hold ':'"
        );
        let passwd = conf.join("pureftpd.passwd");
        let pdb = conf.join("pureftpd.pdb");
        // login:hash:uid:gid:gecos:home (/./ = chroot there):12 empty limits (bandwidth,
        // quotas, ratios, IP and time restrictions, sessions).
        let line =
            format!("{USER}:{PASSWORD_HASH}:{OWNER_UID}:{OWNER_GID}::{home}/./::::::::::::\n");
        std::fs::write(&passwd, line).expect("write pureftpd.passwd");
        let (passwd_s, pdb_s) = (passwd.to_str().unwrap(), pdb.to_str().unwrap());
        let out = run_command(
            &tool("pure-pw", "PURE_PW_BIN"),
            &["mkdb", pdb_s, "-f", passwd_s],
            secs(30),
        )
        .await;
        assert!(
            out.status.success(),
            "pure-pw mkdb failed: {}",
            describe(&out)
        );

        let log = dir.log_file("pure-ftpd");
        let transfer_log = dir.log_file("pure-ftpd-transfers");
        assert!(
            transfer_log.is_absolute(),
            "pure-ftpd -O needs an absolute path, not {}",
            transfer_log.display()
        );
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut proc = Proc::new("pure-ftpd", tool("pure-ftpd", "PURE_FTPD_BIN"), &log)
                .arg("-S")
                .arg(format!("127.0.0.1,{port}"))
                .arg("-l")
                .arg(format!("puredb:{pdb_s}"))
                .arg("-E")
                .arg("-A")
                .arg("-H")
                .arg("-4")
                .arg("-g")
                .arg(conf.join("pure-ftpd.pid"))
                .arg("-O")
                .arg(format!("clf:{}", transfer_log.display()));
            if options.upload_mode == UploadMode::TempThenRename {
                proc = proc.arg("-0");
            }
            let mut server = PureFtpd {
                proc,
                port,
                root: root.clone(),
                transfer_log: transfer_log.clone(),
                options: options.clone(),
            };
            match server.launch().await {
                Ok(()) => return server,
                Err(e) if e.contains("in use") => last_err = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("pure-ftpd could not get a free port: {last_err}");
    }

    /// Starts the process and waits for its "220 … Pure-FTPd" banner on the port.
    async fn launch(&mut self) -> Result<(), String> {
        let before = self.proc.log_text().len();
        self.proc.start();
        let deadline = tokio::time::Instant::now() + secs(10);
        loop {
            if let Some(status) = self.proc.exit_status() {
                // A taken port: "Unable to start a standalone server: Address already in
                // use", and exit status 0.
                let text = self.proc.log_text();
                return Err(format!(
                    "pure-ftpd exited ({status}) on port {}: {}",
                    self.port,
                    text.get(before..).unwrap_or("").trim()
                ));
            }
            let last = match banner(self.port).await {
                Ok(b) if b.contains("Pure-FTPd") => return Ok(()),
                Ok(b) => format!("another server answers on port {}: {b}", self.port),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                panic!("pure-ftpd did not answer within 10 s: {last}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        USER
    }

    pub fn password(&self) -> &str {
        PASSWORD
    }

    pub fn upload_mode(&self) -> UploadMode {
        self.options.upload_mode
    }

    /// The virtual user's home and chroot: `ftp://…/a/b.jpg` lands in `root()/a/b.jpg`.
    /// It exists (owned by the virtual user) before the first login.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ftp://127.0.0.1:PORT/<remote>` with `remote` percent-encoded (no credentials:
    /// they are [`user`](Self::user) and [`password`](Self::password)).
    pub fn url(&self, remote: &str) -> String {
        format!("ftp://127.0.0.1:{}/{}", self.port, encode_path(remote))
    }

    /// The transfer log (`-O clf:`): one line per upload, e.g.
    /// `127.0.0.1 - camera [01/Dec/2026:21:28:22 -0000] "PUT /<root>/cam%201/a.jpg" 200 262144`
    /// (the real path, percent-encoded; an interrupted upload is logged like a complete one).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.transfer_log).unwrap_or_default()
    }

    /// `curl -T local` to `remote` (relative to [`root`](Self::root); missing directories
    /// are created), as a camera uploads; panics unless curl succeeds within 60 s.
    pub async fn upload(&self, local: &Path, remote: &str) -> Output {
        let what = format!("curl -T {} {}", local.display(), self.url(remote));
        let child = self
            .curl(local, remote, None)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run curl: {e}"));
        let timeout = secs(60);
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("cannot wait for {what}: {e}"),
            Err(_) => panic!(
                "{what} did not finish within {:.1} s",
                timeout.as_secs_f64()
            ),
        };
        assert!(out.status.success(), "{what} failed: {}", describe(&out));
        out
    }

    /// Starts `curl -T local --limit-rate bytes_per_sec` to `remote` and returns at once,
    /// so a test can look at the server's files while the upload is in progress.
    pub fn upload_slowly(&self, local: &Path, remote: &str, bytes_per_sec: u64) -> SlowUpload {
        let what = format!(
            "curl --limit-rate {bytes_per_sec} -T {} {}",
            local.display(),
            self.url(remote)
        );
        let child = self
            .curl(local, remote, Some(bytes_per_sec))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run curl: {e}"));
        SlowUpload {
            child: Mutex::new(child),
            what,
        }
    }

    fn curl(&self, local: &Path, remote: &str, rate: Option<u64>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(tool("curl", "CURL_BIN"));
        // -q first: no ~/.curlrc.
        cmd.args(["-q", "-sS", "--ftp-create-dirs", "--connect-timeout", "10"])
            .arg("--user")
            .arg(format!("{USER}:{PASSWORD}"));
        if let Some(rate) = rate {
            cmd.arg("--limit-rate").arg(rate.to_string());
        }
        cmd.arg("-T")
            .arg(local)
            .arg(self.url(remote))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

impl Drop for PureFtpd {
    /// Gives sessions that are ending (curl said QUIT) up to a second to exit before `Proc`
    /// SIGKILLs the server: the server reaps them and deletes their scoreboard files in
    /// `/run/pure-ftpd/`, which would be left behind otherwise.
    fn drop(&mut self) {
        let Some(pid) = self.proc.pid() else {
            return;
        };
        let children = format!("/proc/{pid}/task/{pid}/children");
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            match std::fs::read_to_string(&children) {
                Ok(list) if !list.trim().is_empty() => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break,
            }
        }
    }
}

/// A `curl -T` still running (killed if dropped).
pub struct SlowUpload {
    child: Mutex<tokio::process::Child>,
    what: String,
}

impl SlowUpload {
    /// Whether curl is still sending.
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(_)) => false,
            Err(e) => panic!("cannot wait for {}: {e}", self.what),
        }
    }

    /// Waits up to `timeout` for curl to finish; panics unless it succeeded.
    pub async fn finish(self, timeout: Duration) -> Output {
        let child = self.child.into_inner().unwrap_or_else(|e| e.into_inner());
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("cannot wait for {}: {e}", self.what),
            Err(_) => panic!(
                "{} did not finish within {:.1} s",
                self.what,
                timeout.as_secs_f64()
            ),
        };
        assert!(
            out.status.success(),
            "{} failed: {}",
            self.what,
            describe(&out)
        );
        out
    }

    /// SIGKILLs curl mid-upload, like a camera losing power, and reaps it.
    pub async fn kill(self) -> ExitStatus {
        let mut child = self.child.into_inner().unwrap_or_else(|e| e.into_inner());
        child
            .kill()
            .await
            .unwrap_or_else(|e| panic!("cannot kill {}: {e}", self.what));
        child
            .wait()
            .await
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.what))
    }
}

/// Connects, reads the greeting up to its last line ("220 …"), and hangs up.
async fn banner(port: u16) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
    let mut text = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
            // A multi-line reply ends with a line "220 …" ("220-…" continues).
            if text.ends_with(b"\n") && text.split(|&b| b == b'\n').any(|l| l.starts_with(b"220 "))
            {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(())) => Ok(String::from_utf8_lossy(&text).into_owned()),
        Ok(Err(e)) => Err(format!("reading the banner on port {port}: {e}")),
        Err(_) => Err(format!(
            "no complete banner on port {port} within 2 s: {:?}",
            String::from_utf8_lossy(&text)
        )),
    }
}

/// Percent-encodes each segment of a relative path for an `ftp://` URL: everything but
/// RFC 3986's unreserved characters, so spaces, `%`, `#`, `?`, `;` and non-ASCII (as
/// UTF-8) reach the server as the bytes of the name. Panics on paths a camera would not
/// send: absolute, empty segments, `.`/`..`, control characters.
fn encode_path(rel: &str) -> String {
    assert!(
        !rel.is_empty() && !rel.starts_with('/'),
        "remote path {rel:?} must be relative to the FTP root"
    );
    assert!(
        !rel.chars().any(char::is_control),
        "remote path {rel:?} has a control character"
    );
    let mut out = String::with_capacity(rel.len() * 3);
    for (i, segment) in rel.split('/').enumerate() {
        assert!(
            !segment.is_empty() && segment != "." && segment != "..",
            "remote path {rel:?} has an empty, `.` or `..` segment"
        );
        if i > 0 {
            out.push('/');
        }
        for &b in segment.as_bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_percent_encoded_per_segment() {
        assert_eq!(encode_path("snap.jpg"), "snap.jpg");
        assert_eq!(
            encode_path("cam 1/ünïcode snap.jpg"),
            "cam%201/%C3%BCn%C3%AFcode%20snap.jpg"
        );
        assert_eq!(encode_path("a%b#c?d;type=a"), "a%25b%23c%3Fd%3Btype%3Da");
        assert_eq!(encode_path("x~y_z-1.mp4"), "x~y_z-1.mp4");
    }

    #[test]
    #[should_panic(expected = "must be relative")]
    fn absolute_paths_are_refused() {
        encode_path("/etc/passwd");
    }

    #[test]
    #[should_panic(expected = "segment")]
    fn dot_dot_is_refused() {
        encode_path("cam/../../x");
    }

    #[test]
    fn temporaries_are_recognised() {
        assert!(is_pureftpd_temp(
            ".pureftpd-upload.6b0f3bed.521f.33c3.2182ac62"
        ));
        assert!(!is_pureftpd_temp(".pureftpd-upload.6b0f3bed.521f.33c3"));
        assert!(!is_pureftpd_temp(".pureftpd-upload.6b0f3bed.521f.33c3.xyz"));
        assert!(!is_pureftpd_temp("snap.jpg"));
        assert!(!is_pureftpd_temp(
            ".pureftpd-rename.6b0f3bed.521f.33c3.2182ac62"
        ));
    }
}
