//! Camera files when things break: the connection is cut in the middle of a large file,
//! the relay is killed mid-transfer, the gateway is killed while it picks files up and
//! while it uploads them. Each file lands exactly once, byte-identical, and a resumed
//! upload sends only what the relay did not have.

use std::time::Duration;

use pigeon_e2e::{
    CameraFile, Gateway, GatewayConfig, Proxy, Relay, TestDir, files_section, secs, wait_until,
    wait_until_no_files, watch_table,
};

const GW: &str = "pi-cams";
const TOKEN: &str = "camera-token-0123456789";

/// A 24 MB clip: at the 6 MiB/s upload limit the tests set, about 4 s on the wire.
const CLIP_LEN: usize = 24_000_000;

fn limited(files: toml::Table, relay_url: &str) -> GatewayConfig {
    let mut c = GatewayConfig::for_files(GW, TOKEN, relay_url, files);
    c.relay_options
        .insert("max_upload_rate".into(), "6MiB".into());
    c
}

async fn relay_metric(relay: &Relay, name: &str) -> f64 {
    relay.metric(name).await.ok().flatten().unwrap_or(0.0)
}

/// Waits until the relay has received at least `min` upload bytes.
async fn wait_for_relay_bytes(relay: &Relay, min: f64, what: &str) {
    wait_until(what, secs(60), || async move {
        let got = relay_metric(relay, "pigeon_relay_upload_bytes_received_total").await;
        if got >= min {
            Ok(())
        } else {
            Err(format!("{got} bytes"))
        }
    })
    .await
}

/// The offsets the gateway logged when it resumed uploads.
fn resume_offsets(gw: &Gateway) -> Vec<u64> {
    gw.log_text()
        .lines()
        .filter(|l| l.contains("Resuming a file upload"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("offset="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_file_resumes_with_only_the_remainder() {
    let dir = TestDir::new("files-cut");
    let relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let proxy = Proxy::start(relay.port()).await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let mut gw = Gateway::start_watching(
        &dir,
        limited(files, &format!("http://127.0.0.1:{}", proxy.port())),
    )
    .await;

    // Cut the connection when about half of the clip has gone through the proxy.
    proxy.cut_once_at(CLIP_LEN as u64 / 2);
    let clip = CameraFile::mp4("cam-1/clip.mp4", CLIP_LEN, 77);
    clip.write_into(&drop_dir);
    relay
        .assert_files_exactly_once(std::slice::from_ref(&clip), secs(120))
        .await;

    assert_eq!(proxy.cuts(), 1, "the proxy did not cut the upload");
    let offsets = resume_offsets(&gw);
    assert_eq!(offsets.len(), 1, "one resume expected: {offsets:?}");
    assert!(
        offsets[0] > CLIP_LEN as u64 / 3 && offsets[0] < CLIP_LEN as u64,
        "resumed at {} of {CLIP_LEN}",
        offsets[0]
    );
    // Nothing reached the relay twice: the second attempt sent only the remainder.
    assert_eq!(
        relay_metric(&relay, "pigeon_relay_upload_bytes_received_total").await,
        CLIP_LEN as f64,
        "the relay received bytes twice"
    );
    assert_eq!(
        gw.metric("pigeon_gateway_file_upload_resumes_total")
            .await
            .unwrap(),
        Some(1.0)
    );
    wait_until_no_files("the spool to be empty", &gw.spool_dir()).await;
    gw.stop().await;
}

/// A byte damaged on the way: the relay's SHA-256 check refuses the file (nothing is
/// stored), the gateway checks its spooled copy is still intact and sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_damaged_on_the_way_is_refused_and_sent_again() {
    let dir = TestDir::new("files-corrupt");
    let relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let proxy = Proxy::start(relay.port()).await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let url = format!("http://127.0.0.1:{}", proxy.port());
    let mut gw =
        Gateway::start_watching(&dir, GatewayConfig::for_files(GW, TOKEN, &url, files)).await;
    proxy.corrupt_once_at(2_000_000);
    let clip = CameraFile::mp4("cam-1/clip.mp4", 4_000_000, 79);
    clip.write_into(&drop_dir);
    relay
        .assert_files_exactly_once(std::slice::from_ref(&clip), secs(60))
        .await;
    assert_eq!(proxy.flips(), 1, "the proxy did not damage the upload");
    assert_eq!(
        relay_metric(&relay, "pigeon_relay_upload_digest_mismatches_total").await,
        1.0
    );
    assert!(
        gw.log_text()
            .contains("The relay received bytes that do not match the file's SHA-256"),
        "the gateway did not say why it sent the file again"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_file_is_resumed_from_what_it_stored() {
    let dir = TestDir::new("files-relay-kill");
    let mut relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let mut gw = Gateway::start_watching(&dir, limited(files, &relay.url())).await;

    let clip = CameraFile::mp4("cam-1/clip.mp4", CLIP_LEN, 78);
    clip.write_into(&drop_dir);
    wait_for_relay_bytes(
        &relay,
        CLIP_LEN as f64 / 3.0,
        "a third of the clip at the relay",
    )
    .await;
    relay.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.restart().await;
    relay
        .assert_files_exactly_once(std::slice::from_ref(&clip), secs(120))
        .await;

    let offsets = resume_offsets(&gw);
    assert!(
        offsets.iter().any(|&o| o >= CLIP_LEN as u64 / 4),
        "the upload did not resume from what the killed relay had stored: {offsets:?}"
    );
    // The restarted relay received only the remainder.
    let after = relay_metric(&relay, "pigeon_relay_upload_bytes_received_total").await;
    assert!(
        after <= (CLIP_LEN as u64 - offsets[0]) as f64 && after > 0.0,
        "the restarted relay received {after} bytes; the gateway resumed at {offsets:?}"
    );
    gw.stop().await;
}

/// The gateway is SIGKILLed again and again while a burst of snapshots is being picked up
/// and while a clip uploads; after the last restart, every file arrives exactly once and
/// nothing is left in the drop directory or the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_during_pickup_and_upload_sends_each_file_once() {
    let dir = TestDir::new("files-gateway-kill");
    let relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let mut gw = Gateway::start_watching(&dir, limited(files, &relay.url())).await;

    let mut sent = Vec::new();
    let clip = CameraFile::mp4("cam-9/clip.mp4", CLIP_LEN, 99);
    clip.write_into(&drop_dir);
    sent.push(clip);
    // Bursts of snapshots, the gateway killed in the middle of each.
    for round in 0..6u64 {
        for i in 0..40u64 {
            let f = CameraFile::jpeg(
                &format!("cam-{}/r{round}-{i:02}.jpg", i % 4),
                20_000 + (i as usize) * 997,
                round * 100 + i,
            );
            f.write_into(&drop_dir);
            sent.push(f);
            if i == 20 + round * 3 {
                gw.kill();
            }
        }
        tokio::time::sleep(Duration::from_millis(150 * round)).await;
        gw.restart();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // And once while the clip is on the wire.
    wait_for_relay_bytes(&relay, 1_000_000.0, "the clip to be uploading").await;
    gw.kill();
    gw.restart();

    relay.assert_files_exactly_once(&sent, secs(180)).await;
    wait_until_no_files("the drop directory to be empty", &drop_dir).await;
    wait_until_no_files("the spool to be empty", &gw.spool_dir()).await;
    let log = gw.log_text();
    assert!(
        gw.proc().starts() >= 8,
        "the gateway was started {} times",
        gw.proc().starts()
    );
    assert!(
        !log.contains("panicked"),
        "the gateway panicked: see its log"
    );
    gw.stop().await;
}

/// Readings keep flowing while a large file uploads: the file has a lane of its own, so
/// the outbox is not blocked behind it (both share the upload limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_are_not_held_up_behind_a_large_file() {
    let p = pigeon_e2e::Pipeline::start_in(
        "files-no-head-of-line",
        pigeon_e2e::MosquittoOptions::default(),
        |dir, c| {
            let d = dir.join("drop");
            std::fs::create_dir_all(&d).unwrap();
            c.files = Some(files_section(vec![watch_table("cameras", &d, &[])], &[]));
            c.relay_options
                .insert("max_upload_rate".into(), "4MiB".into());
        },
    )
    .await;
    let drop_dir = p.dir.join("drop");
    // 40 MB at 4 MiB/s: about ten seconds on the wire.
    let clip = CameraFile::mp4("cam-1/long.mp4", 40_000_000, 5);
    clip.write_into(&drop_dir);
    wait_for_relay_bytes(&p.relay, 2_000_000.0, "the clip to be uploading").await;
    let expected = p.publish(0..500).await;
    p.relay.wait_for_readings("n", &expected, secs(60)).await;
    let received = relay_metric(&p.relay, "pigeon_relay_upload_bytes_received_total").await;
    assert!(
        received < clip.bytes.len() as f64,
        "the readings arrived only after the whole clip ({received} bytes of it)"
    );
    p.relay
        .assert_files_exactly_once(std::slice::from_ref(&clip), secs(120))
        .await;
    p.relay
        .assert_delivered_exactly_once(&expected, secs(30))
        .await;
    let _ = std::fs::remove_dir_all(&drop_dir);
}

/// Files waiting in the spool when the outbox is damaged (a power cut on a failing SD
/// card) are not lost with it: the fresh outbox does not know them, so they are sent as
/// recovered files (`/gateways/<id>/files/recovered`), byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_files_survive_a_damaged_outbox_as_recovered_files() {
    let dir = TestDir::new("files-recovered");
    let mut relay = Relay::start(&dir, &[(GW, TOKEN)]).await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let mut gw = Gateway::start_watching(
        &dir,
        GatewayConfig::for_files(GW, TOKEN, &relay.url(), files),
    )
    .await;
    relay.stop().await;
    let sent: Vec<CameraFile> = (0..3)
        .map(|i| CameraFile::jpeg(&format!("cam-1/s{i}.jpg"), 50_000 + i * 1000, i as u64))
        .collect();
    for f in &sent {
        f.write_into(&drop_dir);
    }
    wait_until_no_files("the files to move into the spool", &drop_dir).await;
    gw.stop().await;
    for name in ["outbox.db", "outbox.db-wal"] {
        let path = gw.data_dir().join(name);
        let Ok(mut bytes) = std::fs::read(&path) else {
            continue;
        };
        let n = bytes.len().min(100);
        bytes[..n].fill(0xA5);
        std::fs::write(&path, bytes).expect("damage the outbox");
    }
    relay.restart().await;
    gw.restart();
    // Their names and paths were in the damaged outbox: they arrive under their spool
    // names, from the recovered source.
    let want_n = sent.len();
    let recovered = wait_until("the spooled files to arrive", secs(60), || {
        let evs = pigeon_e2e::file_events(&relay.read_stream()).unwrap_or_default();
        async move {
            if evs.len() >= want_n {
                Ok(evs)
            } else {
                Err(format!("{} of {want_n}", evs.len()))
            }
        }
    })
    .await;
    relay.wait_for_stream_quiet(Duration::from_secs(2)).await;
    assert_eq!(recovered.len(), sent.len());
    let mut stored: Vec<Vec<u8>> = recovered
        .iter()
        .map(|e| {
            assert_eq!(e.event["source"], format!("/gateways/{GW}/files/recovered"));
            assert_eq!(e.event["type"], "io.pigeon.camera.image");
            std::fs::read(&e.object).unwrap()
        })
        .collect();
    let mut want: Vec<Vec<u8>> = sent.iter().map(|f| f.bytes.clone()).collect();
    stored.sort();
    want.sort();
    assert!(
        stored == want,
        "the recovered objects differ from the files"
    );
    assert!(gw.log_text().contains("sending it as a recovered file"));
    wait_until_no_files("the spool to be empty", &gw.spool_dir()).await;
    gw.stop().await;
}
