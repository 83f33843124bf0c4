//! Benchmark of camera files into S3 (garage on the same machine, through the test
//! harness's proxy), with the real binaries (release builds). Prints figures; asserts
//! nothing about speed. Run with `scripts/bench s3` (it builds the release binaries,
//! and installs the AWS CLI for the comparison if it is missing).
//!
//! * a clip (default 200 MB) through the gateway: drop directory → relay → S3 object +
//!   event, in 8 MiB parts sent as they arrive;
//! * the same file with `curl -T` to the relay's upload endpoint (the relay's side alone);
//! * the same file with `aws s3 cp` to the same bucket (S3's side alone: the AWS CLI's
//!   own multipart upload, 8 MiB parts, 10 at a time);
//! * a burst of 200 snapshots of 200 KB (one `PutObject` each): files/s end to end;
//! * capture catching up a backlog: 200,000 readings already in a stream file (three
//!   hours old, so final), a relay started on it with capture on: events/s into
//!   gzip-compressed capture objects, and the compression;
//! * the same from Kafka: 200,000 readings already in a tansu topic (3 partitions, binary
//!   mode, 50 sensors as keys), a relay with the Kafka stream and capture on: events/s
//!   from the capture consumer group into capture objects.
//!
//! `PIGEON_BENCH_CLIP_MB` scales the clip; `AWS_CLI` names the `aws` binary; `-- capture-kafka`
//! runs the Kafka capture scenario alone.

use std::path::Path;
use std::time::{Duration, Instant};

use pigeon_e2e::{
    ACCESS_KEY, BUCKET, CameraFile, Garage, Gateway, GatewayConfig, REGION, Relay, SECRET_KEY,
    Stream, Tansu, TestDir, capture_table, files_section, kafka_stream_table, rss_kib, watch_table,
};

const GATEWAY: &str = "bench-cams";
const TOKEN: &str = "bench-camera-token-0123456789";

async fn until_lines(stream_dir: &Path, n: usize, since: Instant) -> Duration {
    loop {
        if Stream::count_lines(stream_dir) >= n {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(900),
            "{n} events did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mb: usize = std::env::var("PIGEON_BENCH_CLIP_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let len = mb * 1_000_000;
    println!("# Pigeon camera files into S3 (garage 2.5.0, release binaries, loopback)\n");
    let dir = TestDir::new("bench-s3");
    let garage = Garage::start(&dir).await;
    // `-- capture-kafka`: that scenario alone.
    if std::env::args().any(|a| a == "capture-kafka") {
        capture_kafka_backlog(&garage, &dir, 200_000).await;
        return;
    }
    let mut relay = Relay::start_with(&dir, &[(GATEWAY, TOKEN)], |t| {
        t.insert("objects".into(), garage.objects_table("8MiB").into());
    })
    .await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(drop_dir.join("cam-2")).expect("drop dir");
    let files = files_section(vec![watch_table("cameras", &drop_dir, &[])], &[]);
    let config = GatewayConfig::for_files(GATEWAY, TOKEN, &relay.url(), files);
    let mut gateway = Gateway::start_watching(&dir, config).await;
    let stream = relay.data_dir().join("stream");
    let mbps = |d: Duration| len as f64 / 1e6 / d.as_secs_f64();

    // 1. Through the gateway.
    let clip = CameraFile::mp4("cam-2/clip.mp4", len, 7);
    let staged = dir.join("clip.mp4");
    std::fs::write(&staged, &clip.bytes).expect("stage the clip");
    let relay_pid = relay.proc().pid().expect("relay pid");
    let t0 = Instant::now();
    std::fs::rename(&staged, drop_dir.join(&clip.path)).expect("move the clip in");
    let mut peak_kib = 0;
    while Stream::count_lines(&stream) < 1 {
        peak_kib = peak_kib.max(rss_kib(relay_pid, "VmRSS:"));
        assert!(t0.elapsed() < Duration::from_secs(900), "no clip");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let through = t0.elapsed();
    println!("{mb} MB clip into S3 (8 MiB parts):");
    println!(
        "  gateway, drop directory → relay → S3 object + event: {:>6.2} s  {:>7.1} MB/s   (relay RSS peak {:.1} MB)",
        through.as_secs_f64(),
        mbps(through),
        peak_kib.max(rss_kib(relay_pid, "VmHWM:")) as f64 / 1024.0
    );

    // 2. The relay alone.
    let again = dir.join("clip-again.mp4");
    std::fs::write(&again, &clip.bytes).expect("stage again");
    let curl = relay.curl_upload(TOKEN, GATEWAY, &again, &clip).await;
    println!(
        "  curl -T → relay upload endpoint → S3:               {:>6.2} s  {:>7.1} MB/s",
        curl.as_secs_f64(),
        mbps(curl)
    );

    // 3. S3 alone: the AWS CLI to the same bucket through the same proxy.
    let aws = std::env::var("AWS_CLI").unwrap_or_else(|_| "aws".to_owned());
    let t = Instant::now();
    let out = tokio::process::Command::new(&aws)
        .args([
            "--endpoint-url",
            &garage.endpoint(),
            "s3",
            "cp",
            "--only-show-errors",
            again.to_str().expect("utf-8"),
            &format!("s3://{BUCKET}/bench/clip.mp4"),
        ])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_DEFAULT_REGION", REGION)
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => {
            let d = t.elapsed();
            println!(
                "  aws s3 cp → S3 (the AWS CLI alone):                {:>6.2} s  {:>7.1} MB/s",
                d.as_secs_f64(),
                mbps(d)
            );
        }
        Ok(o) => println!(
            "  aws s3 cp failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => println!("  aws s3 cp: cannot run {aws:?} ({e}); set AWS_CLI"),
    }

    // 4. A burst of snapshots, one PutObject each.
    let n = 200;
    let before = Stream::count_lines(&stream);
    let snaps: Vec<CameraFile> = (0..n)
        .map(|i| CameraFile::jpeg(&format!("cam-2/snap-{i:03}.jpg"), 200_000, i as u64))
        .collect();
    let t0 = Instant::now();
    for f in &snaps {
        std::fs::write(drop_dir.join(&f.path), &f.bytes).expect("write");
    }
    let took = until_lines(&stream, before + n, t0).await;
    println!(
        "\nburst, {n} images of 200 KB at once: {:.2} s, {:.0} files/s, {:.1} MB/s end to end\n",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        n as f64 * 0.2 / took.as_secs_f64()
    );
    gateway.stop().await;
    drop(relay);

    capture_backlog(&garage, &dir, 200_000).await;
    capture_kafka_backlog(&garage, &dir, 200_000).await;
}

/// Produces `n` readings into a topic of a fresh tansu, starts a relay with the Kafka
/// stream and capture on, and times capture until it has every event.
async fn capture_kafka_backlog(garage: &Garage, dir: &TestDir, n: usize) {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    let tansu = Tansu::start(dir).await;
    let topic = "pigeon.default";
    tansu.create_topic(topic, 3).await;
    let bootstrap = tansu.bootstrap();
    let produced = tokio::task::spawn_blocking(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "500000")
            .create()
            .expect("producer");
        let mut bytes = 0usize;
        for i in 0..n {
            let source = format!("/gateways/bench-sensors/mqtt/t{}", i % 50);
            let id = format!("01a2351c-0000-7000-8000-{i:012}");
            let seq = format!("{:020}", i + 1);
            let time = format!("2026-12-01T21:00:00.{:03}Z", i % 1000);
            let subject = format!("sites/s1/sensors/t{}", i % 50);
            let data = format!(
                r#"{{"celsius":{}.{},"humidity":{},"n":{i}}}"#,
                15 + i % 10,
                i % 10,
                40 + i % 30
            );
            let h = [
                ("ce_specversion", "1.0"),
                ("ce_id", id.as_str()),
                ("ce_source", source.as_str()),
                ("ce_type", "com.example.sensor.reading"),
                ("ce_subject", subject.as_str()),
                ("ce_time", time.as_str()),
                ("ce_sequence", seq.as_str()),
                ("ce_producerid", "bench-producer"),
                ("content-type", "application/json"),
            ];
            let mut headers = OwnedHeaders::new_with_capacity(h.len());
            for (k, v) in h {
                bytes += k.len() + v.len();
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            bytes += data.len();
            let mut record = BaseRecord::to(topic)
                .key(source.as_bytes())
                .payload(data.as_bytes())
                .headers(headers);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(120)).expect("flush");
        bytes
    })
    .await
    .expect("producer task");
    let sub = TestDir::new("bench-s3-capture-kafka");
    let t0 = Instant::now();
    let relay = Relay::start_with(&sub, &[("bench-sensors", TOKEN)], |t| {
        t.insert(
            "stream".into(),
            kafka_stream_table(&tansu.bootstrap(), "pigeon.{tenant}").into(),
        );
        t.insert("objects".into(), garage.objects_table("8MiB").into());
        let capture = capture_table(&[("roll_age", "1s"), ("group", "bench-capture")]);
        t.insert("capture".into(), capture.into());
    })
    .await;
    let ready = t0.elapsed();
    let done = wait_captured(&relay, n, t0).await;
    let took = done.at - t0 - ready;
    let steady = done.joined.map_or(took, |j| done.at - j);
    let (compressed, objects) = (done.compressed, done.objects);
    println!(
        "capture from Kafka, a backlog of {n} readings ({:.1} MB of headers and values) in 3 partitions into S3 (16 MiB rolls):",
        produced as f64 / 1e6
    );
    println!(
        "  {:.2} s after the relay was ready, of which {:.2} s once the group gave it the partitions ({:.2} s before: joining the group): {:.0} events/s overall, {:.0} events/s once joined; {objects} objects, {:.1} MB compressed\n",
        took.as_secs_f64(),
        steady.as_secs_f64(),
        (took - steady).as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        n as f64 / steady.as_secs_f64(),
        compressed / 1e6,
    );
}

/// Writes `n` readings into one stream file of a fresh data dir, ages it three hours,
/// starts a relay with capture on it and times capture until it has every event.
async fn capture_backlog(garage: &Garage, dir: &TestDir, n: usize) {
    let data_dir = dir.join("capture-relay");
    let file = data_dir.join("stream/bench-sensors/2026-12-01/21.jsonl");
    std::fs::create_dir_all(file.parent().expect("parent")).expect("stream dir");
    let mut lines = String::with_capacity(n * 420);
    for i in 0..n {
        lines.push_str(&format!(
            concat!(
                r#"{{"specversion":"1.0","id":"01a2351c-0000-7000-8000-{:012}","type":"com.example.sensor.reading","#,
                r#""source":"/gateways/bench-sensors/mqtt","datacontenttype":"application/json","#,
                r#""subject":"sites/s1/sensors/t{}","time":"2026-12-01T21:00:00.{:03}Z","#,
                r#""data":{{"celsius":{}.{},"humidity":{},"n":{}}},"#,
                r#""sequence":"{:020}","producerid":"bench-producer"}}"#,
                "\n"
            ),
            i,
            i % 50,
            i % 1000,
            15 + i % 10,
            i % 10,
            40 + i % 30,
            i,
            i + 1
        ));
    }
    let bytes = lines.len();
    std::fs::write(&file, lines).expect("write the stream file");
    let aged = tokio::process::Command::new("touch")
        .args(["-d", "3 hours ago"])
        .arg(&file)
        .status()
        .await
        .expect("touch");
    assert!(aged.success());
    let sub = TestDir::new("bench-s3-capture");
    let t0 = Instant::now();
    let relay = Relay::start_with(&sub, &[("bench-sensors", TOKEN)], |t| {
        t.insert("data_dir".into(), data_dir.display().to_string().into());
        t.insert("objects".into(), garage.objects_table("8MiB").into());
        t.insert(
            "capture".into(),
            capture_table(&[("roll_age", "1s")]).into(),
        );
    })
    .await;
    let ready = t0.elapsed();
    let done = wait_captured(&relay, n, t0).await;
    let took = done.at - t0 - ready;
    let (compressed, objects) = (done.compressed, done.objects);
    println!(
        "capture, a backlog of {n} readings ({:.1} MB of JSON lines) into S3 (16 MiB rolls):",
        bytes as f64 / 1e6
    );
    println!(
        "  {:.2} s after the relay was ready ({:.2} s to start, reading the file into the index): {:.0} events/s, {:.1} MB/s; {objects} objects, {:.1} MB compressed ({:.1}x)\n",
        took.as_secs_f64(),
        ready.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        bytes as f64 / 1e6 / took.as_secs_f64(),
        compressed / 1e6,
        bytes as f64 / compressed.max(1.0)
    );
}

/// When capture had every event, and what it wrote.
struct Captured {
    at: Instant,
    /// When the relay first held capture partitions (Kafka only).
    joined: Option<Instant>,
    compressed: f64,
    objects: f64,
}

/// Polls the relay's metrics until capture wrote `n` events (at most 10 minutes after `t0`).
async fn wait_captured(relay: &Relay, n: usize, t0: Instant) -> Captured {
    let mut joined = None;
    let at = loop {
        let got = relay
            .metric_or_zero("pigeon_relay_capture_events_total")
            .await;
        if got as usize >= n {
            break Instant::now();
        }
        if joined.is_none()
            && relay
                .metric_or_zero("pigeon_relay_capture_partitions")
                .await
                > 0.0
        {
            joined = Some(Instant::now());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "capture is stuck at {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Captured {
        at,
        joined,
        compressed: relay
            .metric_or_zero("pigeon_relay_capture_bytes_total")
            .await,
        objects: relay
            .metric_or_zero("pigeon_relay_capture_objects_total")
            .await,
    }
}
