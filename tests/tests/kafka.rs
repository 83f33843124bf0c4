//! The relay's Kafka stream against a real Kafka-protocol broker (tansu): readings from a
//! gateway land as records in the CloudEvents binary mode, each exactly once, through a
//! Kafka outage and through relay crashes; tenants get their own topics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use pigeon_e2e::{
    Gateway, GatewayConfig, KafkaRecord, Mosquitto, Publisher, PublisherOptions, READING_TYPE,
    Relay, Tansu, TestDir, climate_readings, kafka_stream_table, run_command, secs,
    wait_for_records, wait_until,
};

const TOPIC: &str = "pigeon.default";

/// `[stream]` for the Kafka stream at `bootstrap`.
fn kafka_stream(t: &mut toml::Table, bootstrap: &str, topic: &str) {
    t.insert("stream".into(), kafka_stream_table(bootstrap, topic).into());
}

/// Every record's (producerid, sequence) in a partition comes in increasing order per key,
/// and `n` of each reading once; the error names what is wrong.
fn check_records(records: &[KafkaRecord], expected: &BTreeSet<u64>) {
    let stream =
        pigeon_e2e::Stream::from_events(records.iter().map(KafkaRecord::to_event).collect());
    if let Err(e) = stream.check_exactly_once("n", expected) {
        panic!("the topic does not hold every reading once: {e}");
    }
    let mut last: BTreeMap<(i32, Vec<u8>), String> = BTreeMap::new();
    for r in records {
        let seq = r.header("ce_sequence").expect("ce_sequence").to_owned();
        let key = (r.partition, r.key.clone().unwrap_or_default());
        if let Some(prev) = last.get(&key) {
            assert!(
                *prev < seq,
                "partition {} key {:?}: sequence {seq} after {prev} (offset {})",
                r.partition,
                String::from_utf8_lossy(&key.1),
                r.offset
            );
        }
        last.insert(key, seq);
    }
}

fn stream_files(dir: &Path) -> usize {
    pigeon_e2e::Stream::count_lines(dir)
}

/// Broker (with [`TOPIC`] in `partitions` partitions), mosquitto, a relay writing to
/// Kafka and a subscribed gateway `pi-1`.
struct KafkaPipeline {
    gateway: Gateway,
    relay: Relay,
    mosquitto: Mosquitto,
    tansu: Tansu,
    _dir: TestDir,
}

impl KafkaPipeline {
    async fn start(name: &str, partitions: u32) -> KafkaPipeline {
        let dir = TestDir::new(name);
        let tansu = Tansu::start(&dir).await;
        tansu.create_topic(TOPIC, partitions).await;
        let mosquitto = Mosquitto::start(&dir).await;
        let bootstrap = tansu.bootstrap();
        let token = format!("tok-{name}");
        let relay = Relay::start_with(&dir, &[("pi-1", &token)], |t| {
            kafka_stream(t, &bootstrap, "pigeon.{tenant}")
        })
        .await;
        let config = GatewayConfig::new("pi-1", &token, &relay.url(), mosquitto.port());
        let gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;
        KafkaPipeline {
            gateway,
            relay,
            mosquitto,
            tansu,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_land_in_kafka_once_in_the_binary_mode() {
    let KafkaPipeline {
        relay,
        mosquitto,
        tansu,
        gateway: _gateway,
        _dir,
    } = KafkaPipeline::start("kafka-e2e", 3).await;

    let report = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..2_000),
        PublisherOptions::default(),
        secs(60),
    )
    .await;
    report.assert_all_acked(2_000);
    wait_for_records(&tansu, TOPIC, 2_000, secs(60)).await;
    let records = tansu.records(TOPIC).await;
    check_records(&records, &report.acked);
    assert_eq!(records.len(), 2_000);

    // The binding: ce_ headers, content-type, the data as the value, keyed by source.
    let partitions: BTreeSet<i32> = records.iter().map(|r| r.partition).collect();
    for r in &records {
        assert_eq!(r.header("ce_specversion"), Some("1.0"));
        assert_eq!(r.header("ce_type"), Some(READING_TYPE));
        let source = r.header("ce_source").expect("ce_source");
        assert!(source.starts_with("/gateways/pi-1/"), "{source}");
        assert_eq!(r.key.as_deref(), Some(source.as_bytes()));
        assert!(r.header("ce_id").is_some_and(|id| id.len() == 36));
        assert!(r.header("ce_time").is_some());
        assert!(
            r.header("ce_subject")
                .is_some_and(|s| s.starts_with("org/contoso/"))
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        let data: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        assert!(data["n"].is_u64(), "{data}");
    }
    assert!(!partitions.is_empty());
    // Nothing went to the stream files.
    assert_eq!(stream_files(&relay.stream_dir()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_outage_answers_503_then_drains_without_loss_or_duplicates() {
    let KafkaPipeline {
        gateway,
        relay,
        mosquitto,
        tansu,
        _dir,
    } = KafkaPipeline::start("kafka-outage", 2).await;

    let options = PublisherOptions {
        rate_per_sec: Some(500),
        ..PublisherOptions::default()
    };
    let publisher = Publisher::spawn(mosquitto.port(), climate_readings(0..6_000), options);
    wait_for_records(&tansu, TOPIC, 500, secs(60)).await;

    // Down while readings keep coming: the relay answers 503 and is not ready; the
    // gateway keeps them in its outbox.
    tansu.set_down(true);
    wait_ready(&relay, 503, "the relay to say it is not ready").await;
    wait_until("the gateway to see 503s", secs(30), || async {
        let log = gateway.log_text();
        if log.contains("503") {
            Ok(())
        } else {
            Err("no 503 in the gateway's log yet".to_owned())
        }
    })
    .await;
    tokio::time::sleep(secs(4)).await;
    let errors = relay
        .metric("pigeon_relay_sink_errors_total")
        .await
        .unwrap()
        .unwrap_or(0.0);
    assert!(errors > 0.0, "no sink errors counted during the outage");
    tansu.set_down(false);

    let report = publisher.finish(secs(60)).await;
    report.assert_all_acked(6_000);
    wait_for_records(&tansu, TOPIC, 6_000, secs(120)).await;
    let records = tansu.records(TOPIC).await;
    check_records(&records, &report.acked);
    wait_ready(&relay, 200, "the relay to be ready again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_reads_kafka_back_and_writes_nothing_twice() {
    let KafkaPipeline {
        mut relay,
        mosquitto,
        tansu,
        gateway: _gateway,
        _dir,
    } = KafkaPipeline::start("kafka-crash", 3).await;

    let total = 12_000u64;
    let options = PublisherOptions {
        rate_per_sec: Some(1_500),
        ..PublisherOptions::default()
    };
    let publisher = Publisher::spawn(mosquitto.port(), climate_readings(0..total), options);
    // SIGKILL the relay five times while batches are in flight (the gateway re-sends
    // what was not answered, some of it already in Kafka); the third time its checkpoint
    // goes too, so only the topic can tell what was written.
    for k in 1..=5u64 {
        wait_for_records(&tansu, TOPIC, (total * k / 7) as usize, secs(90)).await;
        relay.kill();
        if k == 3 {
            std::fs::remove_file(relay.data_dir().join("state").join("dedup.json"))
                .expect("remove the checkpoint");
        }
        relay.restart().await;
    }
    let report = publisher.finish(secs(60)).await;
    report.assert_all_acked(total as usize);
    wait_for_records(&tansu, TOPIC, total as usize, secs(120)).await;
    tokio::time::sleep(secs(2)).await;
    let records = tansu.records(TOPIC).await;
    check_records(&records, &report.acked);
    let log = relay.proc().log_text();
    assert!(
        log.contains("Read the relay's Kafka topics back"),
        "the relay never said it read the topics back"
    );
}

/// A batch of one event as JSON, for a direct POST.
fn event_json(id: &str, source: &str, ty: &str, seq: u64) -> String {
    format!(
        r#"[{{"specversion":"1.0","id":"{id}","source":"{source}","type":"{ty}","producerid":"p-{id}","sequence":"{}","datacontenttype":"application/json","data":{{"n":{seq}}}}}]"#,
        pigeon_shared::ce::format_sequence(seq)
    )
}

async fn post(relay: &Relay, token: &str, body: &str) -> (u16, serde_json::Value) {
    let out = run_command(
        Path::new("curl"),
        &[
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Content-Type: application/cloudevents-batch+json",
            "--data-binary",
            body,
            &format!("{}/v1/events", relay.url()),
        ],
        secs(60),
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (
        code.trim().parse().expect("status"),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// POSTs one event and asserts the relay accepted it.
async fn post_accepted(relay: &Relay, token: &str, id: &str, source: &str, ty: &str, seq: u64) {
    let (code, body) = post(relay, token, &event_json(id, source, ty, seq)).await;
    assert_eq!((code, body["accepted"].as_u64()), (200, Some(1)), "{body}");
}

/// curl with a bearer token: the status and the body as JSON (`Null` if it is not).
async fn curl(token: &str, args: &[&str]) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {token}");
    let mut all = vec!["-sS", "-w", "\n%{http_code}", "-H", auth.as_str()];
    all.extend_from_slice(args);
    let out = run_command(Path::new("curl"), &all, secs(60)).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (
        code.trim().parse().expect("status"),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// Issue 24, found while writing docs/architecture.md: when the stream refused an uploaded
/// file's event at publish (here a type that cannot be part of the topic's name; the
/// create's checks do not know the topic), the relay answered the completing PATCH `400`,
/// which the gateway retries: the whole file was sent again and again. Now the answer is
/// the upload's `rejected` result, as for a create that breaks a rule, which the gateway
/// dead-letters; no bytes are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_files_event_the_stream_refuses_is_a_rejected_result() {
    let dir = TestDir::new("kafka-upload-refused");
    let tansu = Tansu::start(&dir).await;
    let bootstrap = tansu.bootstrap();
    let relay = Relay::start_with(&dir, &[("pi-1", "tok-1")], |t| {
        kafka_stream(t, &bootstrap, "pigeon.{tenant}.{type}");
    })
    .await;
    let bytes = "a camera's image, in a few bytes";
    let digest = {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(bytes.as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let create = serde_json::json!({
        "event": {
            "specversion": "1.0", "id": "img-1", "source": "/gateways/pi-1/files/cam",
            "type": "camera/image", "time": "2026-12-07T10:00:00Z",
            "producerid": "p-1", "sequence": pigeon_shared::ce::format_sequence(1),
        },
        "length": bytes.len(),
        "sha256": digest,
        "extension": "jpg",
    })
    .to_string();
    let uploads = format!("{}/v1/uploads", relay.url());
    let (code, state) = curl(
        "tok-1",
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &create,
            &uploads,
        ],
    )
    .await;
    assert_eq!(code, 201, "{state}");
    let location = format!("{}{}", relay.url(), state["location"].as_str().unwrap());
    let (code, state) = curl(
        "tok-1",
        &[
            "-X",
            "PATCH",
            "-H",
            "Upload-Offset: 0",
            "-H",
            "Content-Type: application/offset+octet-stream",
            "--data-binary",
            bytes,
            &location,
        ],
    )
    .await;
    assert_eq!(code, 200, "{state}");
    assert_eq!(state["result"]["status"], "rejected", "{state}");
    let reason = state["result"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("camera/image") && reason.contains("topic"),
        "{state}"
    );
    assert!(state["dataref"].is_null(), "{state}");
    // Nothing of it is kept: the upload is gone and no object is left.
    let (code, _) = curl("tok-1", &["-I", &location]).await;
    assert_eq!(code, 404);
    fn files(dir: &Path) -> Vec<std::path::PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .flat_map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => files(&e.path()),
                _ => vec![e.path()],
            })
            .collect()
    }
    let objects = files(&relay.data_dir().join("objects"));
    assert!(objects.is_empty(), "objects left: {objects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_get_their_own_topics_and_cannot_write_into_each_other() {
    let dir = TestDir::new("kafka-tenants");
    let tansu = Tansu::start(&dir).await;
    for t in ["pigeon.acme.sensor", "pigeon.globex.sensor"] {
        tansu.create_topic(t, 1).await;
    }
    let bootstrap = tansu.bootstrap();
    let relay = Relay::start_with(
        &dir,
        &[("acme-1", "tok-acme-1"), ("globex-1", "tok-globex-1")],
        |t| {
            kafka_stream(t, &bootstrap, "pigeon.{tenant}.{type}");
            let gws = t["gateways"].as_array_mut().unwrap();
            for g in gws {
                let g = g.as_table_mut().unwrap();
                let tenant = g["id"]
                    .as_str()
                    .unwrap()
                    .split('-')
                    .next()
                    .unwrap()
                    .to_owned();
                g.insert("tenant".into(), tenant.into());
            }
        },
    )
    .await;

    post_accepted(
        &relay,
        "tok-acme-1",
        "a1",
        "/gateways/acme-1/mqtt",
        "sensor",
        1,
    )
    .await;
    post_accepted(
        &relay,
        "tok-globex-1",
        "g1",
        "/gateways/globex-1/mqtt",
        "sensor",
        1,
    )
    .await;
    // acme's token cannot write as globex's gateway, so never into globex's topic.
    let (code, body) = post(
        &relay,
        "tok-acme-1",
        &event_json("x1", "/gateways/globex-1/mqtt", "sensor", 2),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["rejected"].as_u64(), Some(1), "{body}");
    // A type that cannot be part of a topic name is refused for good, with the reason.
    let (code, body) = post(
        &relay,
        "tok-acme-1",
        &event_json("a2", "/gateways/acme-1/mqtt", "sensor/alarm", 2),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let reason = body["results"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("sensor/alarm") && reason.contains("topic"),
        "{body}"
    );
    // Twice in one batch: the second copy is not taken for a stored duplicate of the first.
    let one = event_json("a4", "/gateways/acme-1/mqtt", "sensor/alarm", 4);
    let twice = format!("[{0},{0}]", &one[1..one.len() - 1]);
    let (code, body) = post(&relay, "tok-acme-1", &twice).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (body["rejected"].as_u64(), body["duplicates"].as_u64()),
        (Some(2), Some(0)),
        "{body}"
    );

    let acme = tansu.records("pigeon.acme.sensor").await;
    let globex = tansu.records("pigeon.globex.sensor").await;
    assert_eq!(acme.len(), 1);
    assert_eq!(globex.len(), 1);
    assert_eq!(acme[0].header("ce_id"), Some("a1"));
    assert_eq!(globex[0].header("ce_id"), Some("g1"));
}

/// The partition frontiers in a relay's checkpoint.
fn frontiers(relay: &Relay) -> serde_json::Value {
    let text = std::fs::read_to_string(relay.data_dir().join("state").join("dedup.json"))
        .unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default()["kafka"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_topic_keep_their_frontiers_up() {
    let dir_a = TestDir::new("kafka-two-a");
    let dir_b = TestDir::new("kafka-two-b");
    let tansu = Tansu::start(&dir_a).await;
    tansu.create_topic(TOPIC, 1).await;
    let bootstrap = tansu.bootstrap();
    let edit = |t: &mut toml::Table| kafka_stream(t, &bootstrap, "pigeon.{tenant}");
    let a = Relay::start_with(&dir_a, &[("pi-a", "tok-two-relays-a")], edit).await;
    let b = Relay::start_with(&dir_b, &[("pi-b", "tok-two-relays-b")], edit).await;
    // Interleaved writes: neither relay's records are contiguous in the partition.
    for seq in 1..=20u64 {
        let (code, body) = post(
            &a,
            "tok-two-relays-a",
            &event_json(&format!("a{seq}"), "/gateways/pi-a/mqtt", "t", seq),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let (code, body) = post(
            &b,
            "tok-two-relays-b",
            &event_json(&format!("b{seq}"), "/gateways/pi-b/mqtt", "t", seq),
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(tansu.records(TOPIC).await.len(), 40);
    // Each relay catches its frontier up to the end of the partition (so a restart reads
    // only what came after), rather than leaving it where the other relay's first record
    // broke the run of its own.
    for relay in [&a, &b] {
        wait_until(
            "the checkpoint's frontier at the partition's end",
            secs(30),
            || async {
                let f = frontiers(relay);
                match f[TOPIC]["0"].as_i64() {
                    Some(40) => Ok(()),
                    other => Err(format!("frontier {other:?} ({f})")),
                }
            },
        )
        .await;
    }
}

async fn wait_ready(relay: &Relay, want: u16, what: &str) {
    wait_until(what, secs(30), || async {
        match relay.get("/ready").await {
            Ok((code, _)) if code == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_says_when_kafka_is_gone_and_back() {
    let dir = TestDir::new("kafka-idle");
    let tansu = Tansu::start(&dir).await;
    tansu.create_topic(TOPIC, 1).await;
    let bootstrap = tansu.bootstrap();
    let mut relay = Relay::start_with(&dir, &[("pi-1", "tok-kafka-idle-1")], |t| {
        kafka_stream(t, &bootstrap, "pigeon.{tenant}")
    })
    .await;
    wait_ready(&relay, 200, "the relay to be ready").await;
    // No request at all: the relay's own probe notices.
    tansu.set_down(true);
    wait_ready(&relay, 503, "the idle relay to say it is not ready").await;
    tansu.set_down(false);
    wait_ready(&relay, 200, "the relay to be ready again").await;
    let log = relay.proc().log_text();
    assert!(
        log.contains("Kafka does not answer"),
        "no warning in the log"
    );
    assert!(
        log.contains("Kafka answers again"),
        "no recovery line in the log"
    );
    // And it still writes.
    post_accepted(
        &relay,
        "tok-kafka-idle-1",
        "i1",
        "/gateways/pi-1/mqtt",
        "t",
        1,
    )
    .await;
}
