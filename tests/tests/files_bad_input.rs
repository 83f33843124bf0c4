//! Camera files that are odd or broken: names with spaces, non-ASCII and non-UTF-8 bytes,
//! `..`, names and paths as long as the filesystem allows, empty files, files deleted
//! before they are picked up, files the gateway may not read, pipes and links, and a
//! spool with no room. Each is handled with a clear log line and none keeps the good
//! files around it from arriving.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pigeon_e2e::{
    CameraFile, Gateway, GatewayConfig, Relay, TestDir, files_section, is_root, regular_files,
    run_command, secs, wait_until, watch_table,
};

const GW: &str = "pi-odd";
/// Names the default `files.ignore` leaves alone.
const TEMPORARIES: [&str; 3] = [
    ".pureftpd-upload.5f3c.1b2a.3c4d.9e",
    "clip.mp4.part",
    "x.tmp",
];
const TOKEN: &str = "odd-files-token-0123456789";

/// A drop directory the gateway's user owns (nobody when the tests run as root).
fn drop_dir(dir: &TestDir) -> PathBuf {
    let d = dir.join("drop");
    std::fs::create_dir_all(&d).unwrap();
    if is_root() {
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
    }
    d
}

/// Waits until the gateway's log has a line containing every one of `parts`.
async fn wait_for_log(gw: &Gateway, what: &str, parts: &[&str]) -> String {
    wait_until(what, secs(30), || {
        let line = gw
            .log_text()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned);
        async move { line.ok_or_else(|| "not logged yet".to_string()) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_files_are_each_handled_and_do_not_stop_the_others() {
    let dir = TestDir::new("files-odd");
    let relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let inbox = drop_dir(&dir);
    let files = files_section(vec![watch_table("cameras", &inbox, &[])], &[]);
    let mut config = GatewayConfig::for_files(GW, TOKEN, &relay.url(), files);
    // As root, permissions would mean nothing: run the gateway as nobody.
    config.run_as_nobody = is_root();
    let mut gw = Gateway::start_watching(&dir, config).await;

    let long_name = format!("{}.jpg", "x".repeat(251)); // 255 bytes, the limit
    let deep: String = (0..30).map(|i| format!("level-{i:02}/")).collect();
    let good = vec![
        CameraFile::jpeg("cam 1/snap 01.jpg", 50_000, 1),
        CameraFile::jpeg("cam-2/ünïcode 日本語 ✓.jpg", 40_000, 2),
        CameraFile::jpeg("cam-2/a..b.jpg", 30_000, 3),
        CameraFile::jpeg("cam-2/tail..", 30_000, 4),
        CameraFile::jpeg(&format!("cam-3/{long_name}"), 20_000, 5),
        CameraFile::jpeg(&format!("cam-3/{deep}deep.jpg"), 10_000, 6),
        CameraFile::raw("cam-4/empty.jpg", Vec::new()),
    ];
    // The tree is made beside the drop directory, handed to the gateway's user and
    // moved in: the way files appear is the camera's business, what they are is the test.
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for f in &good {
        f.write_into(&staging);
    }
    // A name that is not UTF-8 (Latin-1 "café.jpg", as an old camera might write it).
    let latin1_bytes = CameraFile::jpeg("x", 12_345, 7).bytes;
    std::fs::write(
        staging
            .join("cam-4")
            .join(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg")),
        &latin1_bytes,
    )
    .unwrap();
    let cam5 = staging.join("cam-5");
    std::fs::create_dir_all(&cam5).unwrap();
    // Ignored: temporary upload names.
    for tmp in TEMPORARIES {
        std::fs::write(cam5.join(tmp), b"partial").unwrap();
    }
    if is_root() {
        let out = run_command(
            Path::new("chown"),
            &["-R", "65534:65534", staging.to_str().unwrap()],
            secs(10),
        )
        .await;
        assert!(
            out.status.success(),
            "chown: {}",
            pigeon_e2e::describe(&out)
        );
    }
    // Files the gateway must refuse, each with its reason in the log.
    let locked = cam5.join("locked.jpg");
    std::fs::write(&locked, b"secret").unwrap();
    // As root: owned by root, 0600, so nobody cannot read it (but could rename it: the
    // directory is nobody's). Otherwise: 0000.
    let mode = if is_root() { 0o600 } else { 0o000 };
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(mode)).unwrap();
    let out = run_command(
        Path::new("mkfifo"),
        &[cam5.join("pipe.jpg").to_str().unwrap()],
        secs(5),
    )
    .await;
    assert!(out.status.success(), "mkfifo failed");
    std::os::unix::fs::symlink("/etc/passwd", cam5.join("link.jpg")).unwrap();
    for name in ["cam 1", "cam-2", "cam-3", "cam-4", "cam-5"] {
        std::fs::rename(staging.join(name), inbox.join(name)).unwrap();
    }
    // Deleted before it could be picked up: written, unlinked while still open, closed.
    {
        use std::io::Write;
        let ghost = inbox.join("cam-5/ghost.jpg");
        let mut f = std::fs::File::create(&ghost).unwrap();
        f.write_all(b"\xFF\xD8\xFF gone").unwrap();
        std::fs::remove_file(&ghost).unwrap();
    }
    let unreadable = inbox.join("cam-5/locked.jpg");
    let fifo = inbox.join("cam-5/pipe.jpg");
    let link = inbox.join("cam-5/link.jpg");

    // Everything good arrives, exactly once.
    let events = relay
        .assert_files_exactly_once(&good_with_latin1(&good, &latin1_bytes), secs(90))
        .await;
    let latin = &events["cam-4/caf\u{FFFD}.jpg"];
    assert_eq!(latin.event["data"]["filename"], "caf\u{FFFD}.jpg");
    assert!(latin.object.to_string_lossy().ends_with(".jpg"));
    let long = &events[&format!("cam-3/{long_name}")];
    assert_eq!(long.event["subject"], "cam-3");
    assert_eq!(events["cam-4/empty.jpg"].event["data"]["size"], 0);

    // The refused files are named in the log with their reason, and left where they were.
    wait_for_log(
        &gw,
        "the unreadable file's error",
        &["locked.jpg", "cannot be read"],
    )
    .await;
    wait_for_log(&gw, "the pipe's error", &["pipe.jpg", "named pipe"]).await;
    wait_for_log(&gw, "the link's error", &["link.jpg", "symbolic link"]).await;
    wait_for_log(
        &gw,
        "the empty file's warning",
        &["empty.jpg", "empty file"],
    )
    .await;
    assert!(unreadable.exists() && fifo.exists() && link.exists());
    for tmp in [
        ".pureftpd-upload.5f3c.1b2a.3c4d.9e",
        "clip.mp4.part",
        "x.tmp",
    ] {
        assert!(inbox.join("cam-5").join(tmp).exists(), "{tmp} was touched");
    }
    let left: Vec<PathBuf> = regular_files(&inbox);
    assert_eq!(
        left.len(),
        4,
        "only the refused and ignored files stay: {left:?}"
    );
    let log = gw.log_text();
    assert!(!log.contains("panicked"), "the gateway panicked");
    assert!(
        !log.contains("ghost.jpg") || log.contains("gone"),
        "ghost.jpg: {log}"
    );
    assert!(
        gw.metric("pigeon_gateway_file_pickup_errors_total")
            .await
            .unwrap()
            .unwrap_or(0.0)
            >= 3.0
    );
    gw.stop().await;
}

fn good_with_latin1(good: &[CameraFile], latin1: &[u8]) -> Vec<CameraFile> {
    let mut all = good.to_vec();
    all.push(CameraFile::raw("cam-4/caf\u{FFFD}.jpg", latin1.to_vec()));
    all
}

/// A tmpfs of `size`, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    async fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let opts = format!("size={size},mode=0755");
        let out = run_command(
            Path::new("mount"),
            &[
                "-t",
                "tmpfs",
                "-o",
                &opts,
                "pigeon-test",
                at.to_str().unwrap(),
            ],
            secs(10),
        )
        .await;
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            pigeon_e2e::describe(&out)
        );
        SmallDisk(at.to_owned())
    }

    async fn resize(&self, size: &str) {
        let opts = format!("remount,size={size}");
        let out = run_command(
            Path::new("mount"),
            &["-o", &opts, self.0.to_str().unwrap()],
            secs(10),
        )
        .await;
        assert!(
            out.status.success(),
            "remount: {}",
            pigeon_e2e::describe(&out)
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The spool on a 2 MiB filesystem of its own (so files are copied into it): a 3 MB clip
/// does not fit (`outbox.min_free` of that filesystem is checked before copying) and stays
/// in the drop directory with a warning saying so, while the snapshots around it go
/// through — nothing is dropped for a file that would not fit anyway; once there is
/// room, the clip goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_holds_back_only_what_does_not_fit() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small filesystem for the spool needs root");
        return;
    }
    let dir = TestDir::new("files-full-spool");
    let mut relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let inbox = dir.join("drop");
    std::fs::create_dir_all(&inbox).unwrap();
    let spool = dir.join("small-spool");
    let disk = SmallDisk::mount(&spool, "2m").await;
    let files = files_section(
        vec![watch_table("cameras", &inbox, &[])],
        &[("spool_dir", spool.display().to_string().into())],
    );
    let mut gw = Gateway::start_watching(
        &dir,
        GatewayConfig::for_files(GW, TOKEN, &relay.url(), files),
    )
    .await;
    assert!(
        gw.log_text().contains("another filesystem"),
        "the gateway should warn that files are copied"
    );
    // The relay is away, so the snapshots stay in the spool and fill it.
    relay.stop().await;
    let snaps: Vec<CameraFile> = (0..3)
        .map(|i| CameraFile::jpeg(&format!("cam-1/s{i}.jpg"), 400_000, i))
        .collect();
    for s in &snaps {
        s.write_into(&inbox);
    }
    let clip = CameraFile::mp4("cam-2/clip.mp4", 3_000_000, 50);
    clip.write_into(&inbox);
    wait_for_log(
        &gw,
        "the full spool's warning",
        &["clip.mp4", "there is no room for it"],
    )
    .await;
    assert!(
        inbox.join("cam-2/clip.mp4").exists(),
        "the clip left the drop directory"
    );
    wait_until("the snapshots in the spool", secs(30), || {
        let (left, spooled) = (regular_files(&inbox), regular_files(&spool));
        async move {
            if left.len() == 1 && spooled.len() == 3 {
                Ok(())
            } else {
                Err(format!("drop: {left:?}, spool: {spooled:?}"))
            }
        }
    })
    .await;

    relay.restart().await;
    relay.assert_files_exactly_once(&snaps, secs(60)).await;
    // Room again (the snapshots left); still not for 3 MB in 2 MiB, until it grows.
    disk.resize("16m").await;
    let mut all = snaps.clone();
    all.push(clip);
    relay.assert_files_exactly_once(&all, secs(60)).await;
    assert!(regular_files(&inbox).is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.stop().await;
    drop(disk);
}

/// A camera's file name is text from outside: a newline in it must not start a log line
/// the gateway did not write, nor a carriage return or an escape sequence reach a
/// terminal (issue 24). Names are logged escaped, in the log and in `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_24_file_names_cannot_forge_log_lines() {
    let dir = TestDir::new("files-forged-names");
    let mut relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    // The drop directory's own name too, although it comes from the configuration: it is
    // logged with `%` ("Watching a drop directory."), and still cannot forge a line.
    let inbox = dir.join("drop\nINFO forged dir");
    std::fs::create_dir_all(&inbox).unwrap();
    // A pipe is never closed after writing: it is taken up when quiet for this long.
    let files = files_section(
        vec![watch_table("cameras", &inbox, &[])],
        &[("quiet_period", "500ms".into())],
    );
    let mut gw = Gateway::start_watching(
        &dir,
        GatewayConfig::for_files(GW, TOKEN, &relay.url(), files),
    )
    .await;
    let good = vec![
        CameraFile::jpeg("cam-1/a\nINFO forged line.jpg", 20_000, 1),
        CameraFile::jpeg("cam-1/b\r2026-01-01T00:00:00Z  WARN forged.jpg", 20_000, 2),
        CameraFile::jpeg("cam-1/c\x1b[2J\x1b[31mforged.jpg", 20_000, 3),
    ];
    for f in &good {
        f.write_into(&inbox);
    }
    relay.assert_files_exactly_once(&good, secs(60)).await;
    // One that cannot be picked up: an ERROR naming it, the gateway's last error.
    let out = run_command(
        Path::new("mkfifo"),
        &[inbox.join("cam-1/pipe\nERROR forged.jpg").to_str().unwrap()],
        secs(5),
    )
    .await;
    assert!(out.status.success(), "mkfifo failed");
    wait_for_log(
        &gw,
        "the pipe's error",
        &["pipe\\nERROR forged.jpg", "named pipe"],
    )
    .await;

    let log = gw.log_text();
    assert!(
        log.contains(r"Watching a drop directory. watch=cameras path=")
            && log.contains(r"/drop\nINFO forged dir poll="),
        "the drop directory is not logged escaped: {log}"
    );
    for name in [
        r"a\nINFO forged line.jpg",
        r"b\r2026-01-01T00:00:00Z  WARN forged.jpg",
        r"c\u{1b}[2J\u{1b}[31mforged.jpg",
    ] {
        assert!(
            log.contains(&format!("file=\"cam-1/{name}\"")),
            "{name} is not logged escaped: {log}"
        );
    }
    let relay_log = relay.proc().log_text();
    for (who, text) in [("gateway", &log), ("relay", &relay_log)] {
        assert_no_forgery(who, text);
    }

    // `status`: the last error names the file escaped, on one line.
    let out = gw.status_command(&[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_no_forgery("status", &text);
    let last = text
        .lines()
        .find(|l| l.starts_with("  Last error"))
        .unwrap_or_else(|| panic!("no last error: {text}"));
    assert!(last.contains(r"pipe\nERROR forged.jpg"), "{text}");
    let out = gw.status_command(&["--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = json["live"]["last_error"]["message"].as_str().unwrap();
    assert!(message.contains(r"pipe\nERROR forged.jpg"), "{message}");
    assert!(!message.contains('\n'), "{message:?}");
    gw.stop().await;
}

/// No line of `text` starts with forged text, and no carriage return or escape sequence
/// is in it.
fn assert_no_forgery(who: &str, text: &str) {
    for line in text.lines() {
        assert!(
            !(line.starts_with("INFO forged")
                || line.starts_with("ERROR forged")
                || line.contains('\r')
                || line.contains('\x1b')),
            "{who}: a file name forged a line: {line:?}"
        );
    }
}
