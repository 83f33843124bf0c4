//! Camera files into S3: pigeon-gateway uploads files to pigeon-relay, which stores them
//! in a real S3-compatible server (garage) — in parts as they arrive, for files larger
//! than a part — and publishes one event per file whose `dataref` names the object.
//!
//! Each test checks what a cloud operator would: every file is in the bucket exactly
//! once under `objects/tenant=<tenant>/…`, byte for byte, with its SHA-256 in its
//! metadata; its event is in the stream once; nothing else is in the bucket and no
//! multipart upload is left behind.

use std::collections::BTreeMap;
use std::time::Duration;

use pigeon_e2e::{
    BUCKET, CameraFile, Garage, Gateway, GatewayConfig, Relay, TestDir, files_section, secs,
    set_gateway_tenant, wait_until, watch_table,
};

const GW: &str = "pi-cams";
const TOKEN: &str = "camera-token-s3-0123456789";
/// The smallest part S3 allows: a 13 MB clip is three parts.
const PART: &str = "5MiB";

fn s3_objects(t: &mut toml::Table, garage: &Garage) {
    t.insert("objects".into(), garage.objects_table(PART).into());
}

async fn relay_metric(relay: &Relay, name: &str) -> f64 {
    relay.metric_or_zero(name).await
}

/// Waits until the relay's metric `name` is at least `min`.
async fn wait_for_metric(relay: &Relay, name: &str, min: f64, what: &str) {
    wait_until(what, secs(60), || async move {
        let got = relay_metric(relay, name).await;
        if got >= min {
            Ok(())
        } else {
            Err(format!("{name} = {got}"))
        }
    })
    .await;
}

fn limited(files: toml::Table, relay_url: &str, rate: &str) -> GatewayConfig {
    let mut c = GatewayConfig::for_files(GW, TOKEN, relay_url, files);
    c.relay_options
        .insert("max_upload_rate".into(), rate.into());
    c
}

/// Waits until every file of `expected` has its event in the relay's stream and the
/// stream is quiet, then checks each arrived once: its `dataref` is
/// `s3://<bucket>/objects/tenant=<tenant>/<gateway>/…`, the object there has exactly the
/// file's bytes and `x-amz-meta-sha256`, and the bucket's `objects/` holds nothing else.
/// `expected` is by gateway: (gateway id, tenant, files).
async fn assert_files_in_bucket(
    relay: &Relay,
    garage: &Garage,
    expected: &[(&str, &str, &[CameraFile])],
    timeout: Duration,
) {
    let want: usize = expected.iter().map(|(_, _, f)| f.len()).sum();
    wait_until(
        &format!("{want} file events in the stream"),
        timeout,
        || {
            let have = file_events_s3(relay).len();
            async move {
                if have >= want {
                    Ok(())
                } else {
                    Err(format!("{have} of {want}"))
                }
            }
        },
    )
    .await;
    relay.wait_for_stream_quiet(Duration::from_secs(2)).await;
    let events = file_events_s3(relay);
    assert_eq!(events.len(), want, "file events: {events:#?}");
    let mut expected_keys = BTreeMap::new();
    for (gateway, tenant, files) in expected {
        for f in *files {
            let sha = f.sha256_hex();
            let matching: Vec<_> = events
                .iter()
                .filter(|(e, _)| {
                    e["data"]["path"] == f.path.as_str()
                        && e["data"]["sha256"] == sha.as_str()
                        && e["source"]
                            .as_str()
                            .is_some_and(|s| s.starts_with(&format!("/gateways/{gateway}/")))
                })
                .collect();
            assert_eq!(matching.len(), 1, "{gateway} {}: {matching:#?}", f.path);
            let key = &matching[0].1;
            let prefix = format!("objects/tenant={tenant}/{gateway}/");
            assert!(
                key.starts_with(&prefix),
                "{}: key {key} is not under {prefix}",
                f.path
            );
            let (bytes, meta) = garage.get(key).await;
            assert!(
                bytes == f.bytes,
                "{}: the object {key} differs from the file ({} bytes stored, {} sent)",
                f.path,
                bytes.len(),
                f.bytes.len()
            );
            assert_eq!(meta.get("sha256"), Some(&sha), "{key}: metadata {meta:?}");
            expected_keys.insert(key.clone(), f.bytes.len() as u64);
        }
    }
    let stored: BTreeMap<String, u64> = garage
        .list("objects/")
        .await
        .into_values()
        .map(|o| (o.key, o.size))
        .collect();
    assert_eq!(stored, expected_keys, "the bucket holds other objects");
    garage.wait_for_no_unfinished_uploads().await;
}

/// The file events of the relay's stream, with the key their `dataref` names.
fn file_events_s3(relay: &Relay) -> Vec<(serde_json::Value, String)> {
    let stream = relay.read_stream();
    stream
        .events()
        .iter()
        .filter_map(|e| {
            let d = e.get("dataref")?.as_str()?;
            let key = d.strip_prefix(&format!("s3://{BUCKET}/"))?;
            Some((e.clone(), key.to_owned()))
        })
        .collect()
}

/// Snapshots, a clip of three parts, a file of exactly one part and an empty file go
/// from two gateways of two tenants into the bucket, each once, under its tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_files_land_in_the_bucket_once_per_tenant() {
    let dir = TestDir::new("s3-e2e");
    let garage = Garage::start(&dir).await;
    let relay = Relay::start_with(
        &dir,
        &[(GW, TOKEN), ("pi-b", "token-b-0123456789abcd")],
        |t| {
            s3_objects(t, &garage);
            set_gateway_tenant(t, 1, "acme");
        },
    )
    .await;
    let drop_a = dir.join("drop-a");
    let drop_b = dir.join("drop-b");
    std::fs::create_dir_all(&drop_a).unwrap();
    std::fs::create_dir_all(&drop_b).unwrap();
    let mut gw_a = Gateway::start_watching(
        &dir,
        GatewayConfig::for_files(
            GW,
            TOKEN,
            &relay.url(),
            files_section(vec![watch_table("cameras", &drop_a, &[])], &[]),
        ),
    )
    .await;
    let dir_b = TestDir::new("s3-e2e-b");
    let mut gw_b = Gateway::start_watching(
        &dir_b,
        GatewayConfig::for_files(
            "pi-b",
            "token-b-0123456789abcd",
            &relay.url(),
            files_section(vec![watch_table("cameras", &drop_b, &[])], &[]),
        ),
    )
    .await;

    let files_a = vec![
        CameraFile::jpeg("cam-1/snap 01.jpg", 180_000, 1),
        CameraFile::jpeg("cam-2/ünïcode カメラ.JPG", 64_000, 3),
        CameraFile::mp4("cam-2/clip 12.05.mp4", 13_000_000, 5),
        CameraFile::raw("cam-3/one-part.bin", pigeon_e2e::random_bytes(5 << 20, 6)),
        CameraFile::raw("cam-3/empty.jpg", Vec::new()),
    ];
    let files_b = vec![
        CameraFile::jpeg("cam-1/snap 01.jpg", 120_000, 11),
        CameraFile::mp4("cam-9/clip.mp4", 7_000_000, 12),
    ];
    for f in &files_a {
        f.write_into(&drop_a);
    }
    for f in &files_b {
        f.write_into(&drop_b);
    }
    assert_files_in_bucket(
        &relay,
        &garage,
        &[(GW, "default", &files_a), ("pi-b", "acme", &files_b)],
        secs(120),
    )
    .await;
    // Three parts for the 13 MB clip, two for the 7 MB one; the others in one request.
    assert_eq!(
        relay_metric(&relay, "pigeon_relay_object_parts_sent_total").await,
        5.0
    );
    let (_, ready) = relay.get("/ready").await.unwrap();
    assert_eq!(ready, "ready\n");
    gw_a.stop().await;
    gw_b.stop().await;
}

/// S3 goes away while files are uploading: the relay answers 503 (the gateway keeps its
/// files), `/ready` says why; when S3 is back every file lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_is_answered_503_and_nothing_is_lost() {
    let dir = TestDir::new("s3-outage");
    let garage = Garage::start(&dir).await;
    let relay = Relay::start_with(&dir, &[(GW, TOKEN)], |t| s3_objects(t, &garage)).await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let mut gw = Gateway::start_watching(&dir, limited(files, &relay.url(), "4MiB")).await;

    let mut sent = vec![CameraFile::mp4("cam-1/clip.mp4", 16_000_000, 21)];
    sent[0].write_into(&drop_dir);
    wait_for_metric(
        &relay,
        "pigeon_relay_upload_bytes_received_total",
        6_000_000.0,
        "the clip to be uploading",
    )
    .await;
    garage.set_down(true);
    for i in 0..10u64 {
        let f = CameraFile::jpeg(
            &format!("cam-2/during-{i}.jpg"),
            40_000 + i as usize,
            30 + i,
        );
        f.write_into(&drop_dir);
        sent.push(f);
    }
    wait_until("/ready to say S3 is failing", secs(30), || async {
        match relay.get("/ready").await {
            Ok((503, body)) if body.contains("object store") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait_until("the relay to answer 503 to uploads", secs(30), || async {
        let errors = relay_metric(&relay, "pigeon_relay_object_store_errors_total").await;
        let log = gw.log_text();
        if errors > 0.0 && log.contains("503") {
            Ok(())
        } else {
            Err(format!("{errors} S3 errors"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    garage.set_down(false);
    assert_files_in_bucket(&relay, &garage, &[(GW, "default", &sent)], secs(180)).await;
    gw.stop().await;
}

/// The relay is SIGKILLed in the middle of a clip of several parts: the restarted relay
/// resumes the same multipart upload (the parts already in S3 are not sent again), and
/// the object appears once, complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_multipart_resumes_the_same_upload() {
    const CLIP: usize = 26_000_000;
    let dir = TestDir::new("s3-relay-kill");
    let garage = Garage::start(&dir).await;
    let mut relay = Relay::start_with(&dir, &[(GW, TOKEN)], |t| s3_objects(t, &garage)).await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let mut gw = Gateway::start_watching(&dir, limited(files, &relay.url(), "6MiB")).await;

    let clip = CameraFile::mp4("cam-1/clip.mp4", CLIP, 41);
    clip.write_into(&drop_dir);
    wait_for_metric(
        &relay,
        "pigeon_relay_object_parts_sent_total",
        2.0,
        "two parts of the clip in S3",
    )
    .await;
    relay.kill();
    // The multipart upload is there, unfinished, and no object is visible yet.
    assert_eq!(garage.unfinished_uploads().await.len(), 1);
    assert!(garage.list("objects/").await.is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.restart().await;
    assert_files_in_bucket(
        &relay,
        &garage,
        &[(GW, "default", std::slice::from_ref(&clip))],
        secs(120),
    )
    .await;
    // The restarted relay received only what was not in S3 (or in its part file).
    let after = relay_metric(&relay, "pigeon_relay_upload_bytes_received_total").await;
    assert!(
        after <= (CLIP - 2 * (5 << 20)) as f64,
        "the restarted relay received {after} bytes of a {CLIP}-byte clip"
    );
    let log = relay.proc().log_text();
    assert!(!log.contains("panicked"), "the relay panicked");
    gw.stop().await;
}

/// A file whose bytes are not the announced SHA-256, larger than a part: the relay sends
/// its parts as they arrive, finds the mismatch at the end, answers 422 and aborts the
/// multipart upload — no object, nothing unfinished left in the bucket, no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_aborts_the_multipart_upload() {
    let dir = TestDir::new("s3-digest");
    let garage = Garage::start(&dir).await;
    let relay = Relay::start_with(&dir, &[(GW, TOKEN)], |t| s3_objects(t, &garage)).await;
    let sent = CameraFile::mp4("cam-1/clip.mp4", 12_000_000, 51);
    let announced = CameraFile::mp4("cam-1/clip.mp4", 12_000_000, 52).sha256_hex();
    let path = dir.join("clip.mp4");
    std::fs::write(&path, &sent.bytes).unwrap();
    let location = relay
        .curl_create(TOKEN, GW, 7, sent.bytes.len(), &announced)
        .await;
    let (status, body) = relay.curl_patch(TOKEN, &location, &path).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("SHA-256"), "{body}");
    assert_eq!(
        relay_metric(&relay, "pigeon_relay_object_parts_sent_total").await,
        2.0,
        "two full parts went out before the mismatch showed"
    );
    assert!(garage.unfinished_uploads().await.is_empty(), "not aborted");
    assert!(garage.list("").await.is_empty(), "an object was stored");
    assert!(file_events_s3(&relay).is_empty());
    // The same bytes announced with their own digest go in (under another event).
    let location = relay
        .curl_create(TOKEN, GW, 8, sent.bytes.len(), &sent.sha256_hex())
        .await;
    let (status, body) = relay.curl_patch(TOKEN, &location, &path).await;
    assert_eq!(status, 200, "{body}");
    let stored = garage.list("objects/").await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (bytes, meta) = garage.get(stored.keys().next().unwrap()).await;
    assert!(bytes == sent.bytes);
    assert_eq!(meta.get("sha256"), Some(&sent.sha256_hex()));
    garage.wait_for_no_unfinished_uploads().await;
}
