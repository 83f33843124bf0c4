//! The harness's own claims about the FTP server, checked against the real pure-ftpd with
//! curl as the camera: where an upload is while it is being received (in place under its
//! final name, or `-0` in a `.pureftpd-upload.*` temporary), that it lands byte-identical,
//! that paths with spaces and non-ASCII names work, and that an interrupted upload is
//! indistinguishable from a complete one on the server — in both modes.
//!
//! No timing assertions: only what is seen on disk, and in which order relative to curl.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use pigeon_e2e::{
    PUREFTPD_UPLOAD_PREFIX, PureFtpd, PureFtpdOptions, SlowUpload, TestDir, UploadMode,
    is_pureftpd_temp, random_bytes, secs, wait_until,
};

/// Slow uploads: 1 MB at 200 KB/s takes about 5 s, long enough to look at it mid-way.
const SLOW_LEN: usize = 1_000_000;
const SLOW_RATE: u64 = 200 * 1024;

/// Writes a random file of `len` bytes into the test directory (outside the FTP root).
fn local_file(dir: &TestDir, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    // Seeded differently each run, so a byte-identical comparison means something.
    let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), len);
    let bytes = random_bytes(len, seed);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("write the local file");
    (path, bytes)
}

async fn start(dir: &TestDir, upload_mode: UploadMode) -> PureFtpd {
    PureFtpd::start(dir, PureFtpdOptions { upload_mode }).await
}

/// The names of pure-ftpd's upload temporaries in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PUREFTPD_UPLOAD_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_same_bytes(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        got == want,
        "{} has {} bytes that differ from the {} uploaded",
        path.display(),
        got.len(),
        want.len()
    );
}

/// Panics if curl has already finished: what `check` just saw was seen while it ran.
fn still_running(upload: &SlowUpload, what: &str) {
    assert!(
        upload.is_running(),
        "curl finished before {what} was seen: the upload was not slow enough to watch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_upload_lands_byte_identical_under_its_final_name() {
    let dir = TestDir::new("ftp-in-place");
    let ftp = start(&dir, UploadMode::InPlace).await;
    assert!(
        ftp.root().is_dir(),
        "the root exists before the first login"
    );
    let (local, bytes) = local_file(&dir, "clip.mp4", 3 * 1024 * 1024);

    ftp.upload(&local, "clip.mp4").await;

    let landed = ftp.root().join("clip.mp4");
    assert_same_bytes(&landed, &bytes);
    assert_eq!(temporaries(ftp.root()), Vec::<String>::new());
    let meta = std::fs::metadata(&landed).unwrap();
    assert_eq!(
        meta.mode() & 0o777,
        0o644,
        "pure-ftpd's default umask (133) gives 0644"
    );
    let log = ftp.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("/clip.mp4\" 200 ") && l.ends_with(&format!(" {}", bytes.len()))),
        "no transfer log line for clip.mp4 with its size:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_upload_is_visible_and_growing_under_its_final_name_while_curl_runs() {
    let dir = TestDir::new("ftp-in-place-slow");
    let ftp = start(&dir, UploadMode::InPlace).await;
    let (local, bytes) = local_file(&dir, "snap.jpg", SLOW_LEN);
    let landed = ftp.root().join("cam1").join("snap.jpg");
    let full = bytes.len() as u64;

    let upload = ftp.upload_slowly(&local, "cam1/snap.jpg", SLOW_RATE);
    // The final name exists, part-written, while curl still sends ...
    let (first, inode) = wait_until(
        "the final name to hold part of the upload",
        secs(30),
        || async {
            let meta = std::fs::metadata(&landed).map_err(|e| format!("{e}"))?;
            still_running(&upload, "a part-written final name");
            match meta.len() {
                n if n > 0 && n < full => Ok((n, meta.ino())),
                n => Err(format!("{n} of {full} bytes")),
            }
        },
    )
    .await;
    // ... and grows, in the same file (no rename in this mode).
    let second = wait_until("the part-written final name to grow", secs(30), || async {
        let meta = std::fs::metadata(&landed).map_err(|e| format!("{e}"))?;
        still_running(&upload, "the final name grow");
        assert_eq!(meta.ino(), inode, "the file was replaced mid-upload");
        match meta.len() {
            n if n > first && n < full => Ok(n),
            n => Err(format!("{n} of {full} bytes (first seen {first})")),
        }
    })
    .await;
    assert!(first < second && second < full);
    assert_eq!(temporaries(landed.parent().unwrap()), Vec::<String>::new());

    upload.finish(secs(60)).await;
    assert_same_bytes(&landed, &bytes);
    assert_eq!(std::fs::metadata(&landed).unwrap().ino(), inode);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_then_rename_hides_the_upload_until_it_is_complete() {
    let dir = TestDir::new("ftp-temp-then-rename");
    let ftp = start(&dir, UploadMode::TempThenRename).await;
    let (local, bytes) = local_file(&dir, "snap.jpg", SLOW_LEN);
    let cam = ftp.root().join("cam1");
    let landed = cam.join("snap.jpg");
    let full = bytes.len() as u64;

    let upload = ftp.upload_slowly(&local, "cam1/snap.jpg", SLOW_RATE);
    let temp = wait_until(
        "a part-written temporary beside a missing final name",
        secs(30),
        || async {
            let temps = temporaries(&cam);
            let final_exists = landed.exists();
            still_running(&upload, "a part-written temporary");
            assert!(
                !final_exists,
                "the final name exists while curl still sends"
            );
            let [name] = &temps[..] else {
                return Err(format!("temporaries in {}: {temps:?}", cam.display()));
            };
            let len = std::fs::metadata(cam.join(name)).map_or(0, |m| m.len());
            if len > 0 && len < full {
                Ok(name.clone())
            } else {
                Err(format!("{name} has {len} of {full} bytes"))
            }
        },
    )
    .await;
    // .pureftpd-upload.<start>.<server port>.<pid>.<random>, all hex.
    assert!(
        is_pureftpd_temp(&temp),
        "unexpected temporary name {temp:?}"
    );
    let port_field = temp.split('.').nth(3);
    assert_eq!(
        port_field,
        Some(format!("{:x}", ftp.port()).as_str()),
        "{temp}: the second number is the server's port"
    );

    upload.finish(secs(60)).await;
    assert_same_bytes(&landed, &bytes);
    assert_eq!(temporaries(&cam), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_paths_with_spaces_and_unicode_work_in_both_modes() {
    for mode in [UploadMode::InPlace, UploadMode::TempThenRename] {
        let dir = TestDir::new("ftp-unicode");
        let ftp = start(&dir, mode).await;
        let (local, bytes) = local_file(&dir, "local snap.jpg", 50_000);

        ftp.upload(&local, "cam 1/ünïcode snap.jpg").await;
        // Percent-encoding reached the server as the UTF-8 bytes of the name.
        ftp.upload(&local, "cam 1/100%#?;type=a.jpg").await;

        let cam = ftp.root().join("cam 1");
        assert!(
            cam.is_dir(),
            "{mode:?}: curl --ftp-create-dirs made {}",
            cam.display()
        );
        assert_same_bytes(&cam.join("ünïcode snap.jpg"), &bytes);
        assert_same_bytes(&cam.join("100%#?;type=a.jpg"), &bytes);
        assert_eq!(temporaries(&cam), Vec::<String>::new(), "{mode:?}");
    }
}

/// FTP (stream mode) ends a file with the end of the data connection, so a camera that
/// dies mid-upload looks to pure-ftpd like one that finished: in both modes the truncated
/// file ends up under its final name (`-0` renames it too) and the transfer is logged like
/// any other. Only the content can tell (for a JPEG, a missing end-of-image marker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_lands_truncated_under_its_final_name_in_both_modes() {
    for mode in [UploadMode::InPlace, UploadMode::TempThenRename] {
        let dir = TestDir::new("ftp-interrupted");
        let ftp = start(&dir, mode).await;
        let (local, bytes) = local_file(&dir, "snap.jpg", SLOW_LEN);
        let cam = ftp.root().join("cam1");
        let full = bytes.len() as u64;

        let upload = ftp.upload_slowly(&local, "cam1/snap.jpg", SLOW_RATE);
        wait_until("part of the upload on the server", secs(30), || async {
            let received: u64 = std::fs::read_dir(&cam)
                .map(|es| {
                    es.filter_map(|e| e.ok()?.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            still_running(&upload, "part of the upload");
            if received > 0 {
                Ok(())
            } else {
                Err("nothing yet".to_string())
            }
        })
        .await;
        upload.kill().await;

        let landed = cam.join("snap.jpg");
        let line = wait_until("pure-ftpd to end the transfer", secs(30), || async {
            let line = ftp
                .log_text()
                .lines()
                .find(|l| l.contains("/cam1/snap.jpg\""))
                .map(str::to_string)
                .ok_or_else(|| "no transfer log line yet".to_string())?;
            let temps = temporaries(&cam);
            if temps.is_empty() && landed.exists() {
                Ok(line)
            } else {
                Err(format!(
                    "logged, but temporaries {temps:?}, final name {}",
                    landed.exists()
                ))
            }
        })
        .await;
        assert!(line.contains("\" 200 "), "{mode:?}: {line}");
        let len = std::fs::metadata(&landed)
            .unwrap_or_else(|e| panic!("{mode:?}: no {}: {e}", landed.display()))
            .len();
        assert!(len > 0 && len < full, "{mode:?}: {len} of {full} bytes");
        assert_same_bytes(&landed, &bytes[..len as usize]);
        assert!(
            line.ends_with(&format!(" {len}")),
            "{mode:?}: the log gives the truncated size {len}: {line}"
        );
        assert_eq!(temporaries(&cam), Vec::<String>::new(), "{mode:?}");
    }
}
