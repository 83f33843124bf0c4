//! Camera drop directories end to end: a real pure-ftpd receives uploads from curl (the
//! camera), pigeon-gateway watches its directory, and pigeon-relay stores each file as an
//! object and publishes one event for it whose `dataref` names the object.
//!
//! Both ways FTP servers write are covered: in place under the final name (pure-ftpd's
//! default, like vsftpd), and into a `.pureftpd-upload.*` temporary renamed at the end
//! (`pure-ftpd -0`).

use std::time::Duration;

use pigeon_e2e::{
    CameraFile, Gateway, GatewayConfig, PureFtpd, PureFtpdOptions, Relay, TestDir, UploadMode,
    files_section, metric_value, secs, wait_until, wait_until_no_files, watch_table,
};
use sha2::Digest as _;

const GW: &str = "pi-cams";
const TOKEN: &str = "camera-token";

/// What a camera installation sends: snapshots from three cameras (one name reused, odd
/// names), and a video clip.
fn camera_files() -> Vec<CameraFile> {
    vec![
        CameraFile::jpeg("cam-1/snap 01.jpg", 180_000, 1),
        CameraFile::jpeg("cam-1/2026-12-01/motion-120501.jpg", 1_000_000, 2),
        CameraFile::jpeg("cam-2/ünïcode カメラ.JPG", 64_000, 3),
        CameraFile::jpeg("cam-3/snapshot", 85_000, 41),
        CameraFile::mp4("cam-2/clip 12.05.mp4", 12_000_000, 5),
    ]
}

/// Starts a gateway watching the FTP server's root and waits until it watches.
async fn watching_gateway(
    dir: &TestDir,
    relay: &Relay,
    ftp: &PureFtpd,
    extra: &[(&str, toml::Value)],
) -> Gateway {
    let files = files_section(vec![watch_table("cameras", ftp.root(), &[])], extra);
    Gateway::start_watching(
        dir,
        GatewayConfig::for_files(GW, TOKEN, &relay.url(), files),
    )
    .await
}

async fn ftp_to_relay(name: &str, mode: UploadMode) {
    let dir = TestDir::new(name);
    let mut relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let ftp = PureFtpd::start(&dir, PureFtpdOptions { upload_mode: mode }).await;
    let mut gw = watching_gateway(&dir, &relay, &ftp, &[]).await;

    // The relay is away while the camera uploads `snapshot` twice under the same name:
    // the first must be safe in the spool before the second overwrites the name.
    relay.stop().await;
    let first = CameraFile::jpeg("cam-3/snapshot", 90_000, 4);
    let second = CameraFile::jpeg("cam-3/snapshot", 70_000, 40);
    ftp.upload(&first.stage(&dir.join("staging-a")), &first.path)
        .await;
    wait_until_no_files(
        "the first cam-3/snapshot to be picked up",
        &ftp.root().join("cam-3"),
    )
    .await;
    ftp.upload(&second.stage(&dir.join("staging-b")), &second.path)
        .await;
    relay.restart().await;

    let mut sent = camera_files();
    for f in &sent {
        ftp.upload(&f.stage(&dir.join("staging")), &f.path).await;
    }
    sent.extend([first, second]);
    let events = relay.assert_files_exactly_once(&sent, secs(90)).await;

    // The event says what the file is.
    let clip = &events["cam-2/clip 12.05.mp4"];
    assert_eq!(clip.event["type"], "io.pigeon.camera.video");
    assert_eq!(clip.event["subject"], "cam-2");
    assert_eq!(
        clip.event["source"],
        format!("/gateways/{GW}/files/cameras")
    );
    assert_eq!(clip.event["datacontenttype"], "application/json");
    assert_eq!(clip.event["data"]["contenttype"], "video/mp4");
    assert!(
        clip.object.to_string_lossy().ends_with(".mp4"),
        "{}",
        clip.object.display()
    );
    let snap = &events["cam-1/snap 01.jpg"];
    assert_eq!(snap.event["type"], "io.pigeon.camera.image");
    assert_eq!(snap.event["subject"], "cam-1");
    assert_eq!(snap.event["data"]["filename"], "snap 01.jpg");
    let unicode = &events["cam-2/ünïcode カメラ.JPG"];
    assert_eq!(unicode.event["data"]["contenttype"], "image/jpeg");
    assert!(unicode.object.to_string_lossy().ends_with(".jpg"));
    // No extension: the first bytes say it is a JPEG.
    let bare = &events["cam-3/snapshot"];
    assert_eq!(bare.event["data"]["contenttype"], "image/jpeg");
    assert_eq!(bare.event["type"], "io.pigeon.camera.image");
    // The object key: <gateway>/<input>/<date>/<hour>/<id>.<upload id>.<ext>, the upload
    // id being the first 32 hex digits of SHA-256("pigeon-upload\0<gateway>\0<producerid>\0
    // <sequence in decimal>") (docs/data-layout.md#objects).
    let rel = clip.object.strip_prefix(relay.objects_dir()).unwrap();
    let parts: Vec<_> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    assert_eq!(&parts[..3], [GW, "files", "cameras"], "{}", rel.display());
    let sequence: u64 = clip.event["sequence"].as_str().unwrap().parse().unwrap();
    let producer = clip.event["producerid"].as_str().unwrap();
    let identity = format!("pigeon-upload\0{GW}\0{producer}\0{sequence}");
    let upload: String = sha2::Sha256::digest(identity.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        parts[5],
        format!("{}.{upload}.mp4", clip.event["id"].as_str().unwrap())
    );

    // Delivered files are deleted (the default); the spool and the outbox are empty, and
    // pure-ftpd -0's temporaries never became events.
    wait_until_no_files("the drop directory to be empty", ftp.root()).await;
    wait_until_no_files("the spool to be empty", &gw.spool_dir()).await;
    wait_until("the outbox to be empty", secs(20), || {
        let m = gw.metric("pigeon_gateway_outbox_records");
        async move {
            match m.await {
                Ok(Some(0.0)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_uploads_written_in_place_arrive_once_byte_identical() {
    ftp_to_relay("files-in-place", UploadMode::InPlace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_uploads_renamed_from_a_temporary_arrive_once_byte_identical() {
    ftp_to_relay("files-rename", UploadMode::TempThenRename).await;
}

/// A slow upload written in place: the file is visible and growing under its final name
/// the whole time, and must not be picked up before curl is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_still_being_written_is_not_picked_up_early() {
    let dir = TestDir::new("files-slow");
    let relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let ftp = PureFtpd::start(&dir, PureFtpdOptions::default()).await;
    // A short quiet period: were it used for files being written, this would show.
    let mut gw = watching_gateway(&dir, &relay, &ftp, &[("quiet_period", "1s".into())]).await;
    let clip = CameraFile::mp4("cam-1/slow clip.mp4", 1_200_000, 9);
    // 1.2 MB at 150 KB/s: about 8 s, with pauses between curl's bursts far longer than
    // the quiet period.
    let upload = ftp.upload_slowly(&clip.stage(&dir.join("staging")), &clip.path, 150 * 1024);
    let on_disk = ftp.root().join(&clip.path);
    let mut observed = 0;
    while upload.is_running() {
        let len = std::fs::metadata(&on_disk).map(|m| m.len()).unwrap_or(0);
        if len > 0 && len < clip.bytes.len() as u64 {
            observed += 1;
        }
        let picked = gw
            .metric("pigeon_gateway_files_picked_up_total")
            .await
            .ok()
            .flatten()
            .unwrap_or(0.0);
        if upload.is_running() {
            assert_eq!(
                picked,
                0.0,
                "a file was picked up while curl was still sending it ({len} of {} bytes on disk)",
                clip.bytes.len()
            );
            assert!(
                pigeon_e2e::file_events(&relay.read_stream())
                    .unwrap()
                    .is_empty()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    upload.finish(secs(60)).await;
    assert!(
        observed >= 3,
        "the upload was not seen in progress ({observed} looks)"
    );
    relay
        .assert_files_exactly_once(std::slice::from_ref(&clip), secs(60))
        .await;

    // A writer that stalls for several quiet periods in the middle (a camera on a bad
    // Wi-Fi link): still open for writing, so still not finished.
    let stalled = CameraFile::jpeg("cam-2/stalled.jpg", 400_000, 10);
    let path = ftp.root().join(&stalled.path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(&path).unwrap();
    use std::io::Write;
    f.write_all(&stalled.bytes[..100_000]).unwrap();
    f.flush().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let picked = gw
        .metric("pigeon_gateway_files_picked_up_total")
        .await
        .unwrap();
    assert_eq!(
        picked,
        Some(1.0),
        "the stalled file was picked up while still open"
    );
    assert!(path.exists(), "the stalled file was taken while still open");
    f.write_all(&stalled.bytes[100_000..]).unwrap();
    drop(f);
    relay
        .assert_files_exactly_once(&[clip, stalled], secs(60))
        .await;
    let body = gw.get("/metrics").await.unwrap().1;
    assert_eq!(
        metric_value(&body, "pigeon_gateway_files_picked_up_total"),
        Some(2.0)
    );
    gw.stop().await;
}

/// `after_upload = "move"` puts delivered files below `move_to` (keeping their path);
/// `after_upload = "keep"` leaves them where the camera put them and, across a restart,
/// never sends them again — until the camera writes one anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_files_are_moved_or_kept_and_kept_files_are_not_sent_again() {
    let dir = TestDir::new("files-move-keep");
    let relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let (moving, keeping, done) = (dir.join("moving"), dir.join("keeping"), dir.join("done"));
    for d in [&moving, &keeping] {
        std::fs::create_dir_all(d).unwrap();
    }
    let files = files_section(
        vec![
            watch_table(
                "front",
                &moving,
                &[
                    ("after_upload", "move".into()),
                    ("move_to", done.display().to_string().into()),
                ],
            ),
            watch_table("back", &keeping, &[("after_upload", "keep".into())]),
        ],
        &[],
    );
    let mut gw = Gateway::start_watching(
        &dir,
        GatewayConfig::for_files(GW, TOKEN, &relay.url(), files),
    )
    .await;
    let front = vec![
        CameraFile::jpeg("door/a.jpg", 30_000, 1),
        CameraFile::jpeg("door/b.jpg", 30_000, 2),
    ];
    let back = vec![
        CameraFile::jpeg("yard/c.jpg", 30_000, 3),
        CameraFile::jpeg("yard/d.jpg", 30_000, 4),
    ];
    for f in &front {
        f.write_into(&moving);
    }
    for f in &back {
        f.write_into(&keeping);
    }
    let all = [front.clone(), back.clone()].concat();
    relay.assert_files_exactly_once(&all, secs(60)).await;
    for f in &front {
        wait_until_no_files("the moved files to leave", &moving).await;
        assert_eq!(
            std::fs::read(done.join(&f.path)).unwrap(),
            f.bytes,
            "{}",
            f.path
        );
    }
    for f in &back {
        assert_eq!(
            std::fs::read(keeping.join(&f.path)).unwrap(),
            f.bytes,
            "{}",
            f.path
        );
    }

    // A restart scans the directories again: the kept files are not sent again.
    gw.stop().await;
    gw.restart();
    gw.wait_watching(4).await;
    // The camera writes d.jpg again, with new content: that is a new file.
    let d2 = CameraFile::jpeg("yard/d.jpg", 31_000, 44);
    d2.write_into(&keeping);
    let mut all = all;
    all.push(d2);
    relay.assert_files_exactly_once(&all, secs(60)).await;
    gw.stop().await;
}
