//! The relay on its cloud sinks at once: Kafka (tansu) for the stream, S3 (garage) for
//! the camera files and for capture, which a consumer group reads from the topics.
//! Readings and files from a gateway land as records (binary mode), as objects and as
//! capture lines, each exactly once — also when the relay is SIGKILLed again and again
//! while it writes capture rolls, and while S3 is away.

use std::collections::{BTreeMap, BTreeSet};

use pigeon_e2e::{
    CameraFile, Garage, Gateway, GatewayConfig, KafkaRecord, Mosquitto, Publisher,
    PublisherOptions, READING_TYPE, Relay, Tansu, TestDir, capture_table, climate_readings,
    files_section, kafka_stream_table, secs, set_gateway_tenant, wait_for_records, wait_until,
    watch_table,
};
use serde_json::Value;

const GW: &str = "pi-1";
const TOKEN: &str = "capture-kafka-token-0123";
const TENANT: &str = "acme";
const TOPIC: &str = "pigeon.acme";
const PARTITIONS: u32 = 3;
const GROUP: &str = "pigeon-relay-capture";

/// One test of this file at a time: each starts a whole cloud (garage, tansu, one or two
/// relays with rdkafka, mosquitto, a gateway), and three at once on 2 cores starved the
/// relay kills test on a slow day (2026-12-03: no capture roll attempted in the 60 s it
/// waits after S3 went away; the same test alone passed).
static ONE_CLOUD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Kafka stream (a topic per tenant), objects and capture in garage, small rolls.
fn cloud_config(t: &mut toml::Table, garage: &Garage, bootstrap: &str) {
    t.insert(
        "stream".into(),
        kafka_stream_table(bootstrap, "pigeon.{tenant}").into(),
    );
    t.insert("objects".into(), garage.objects_table("5MiB").into());
    let capture = capture_table(&[("roll_bytes", "64KiB"), ("roll_age", "1s")]);
    t.insert("capture".into(), capture.into());
    set_gateway_tenant(t, 0, TENANT);
}

struct Cloud {
    garage: Garage,
    tansu: Tansu,
    mosquitto: Mosquitto,
    relay: Relay,
    dir: TestDir,
}

impl Cloud {
    async fn start(name: &str) -> Cloud {
        let dir = TestDir::new(name);
        let garage = Garage::start(&dir).await;
        let tansu = Tansu::start(&dir).await;
        tansu.create_topic(TOPIC, PARTITIONS).await;
        let mosquitto = Mosquitto::start(&dir).await;
        let bootstrap = tansu.bootstrap();
        let relay = Relay::start_with(&dir, &[(GW, TOKEN)], |t| {
            cloud_config(t, &garage, &bootstrap)
        })
        .await;
        Cloud {
            garage,
            tansu,
            mosquitto,
            relay,
            dir,
        }
    }
}

fn id_of(e: &Value) -> String {
    e["id"].as_str().unwrap_or_default().to_owned()
}

/// Waits until capture holds `n` events, then (after a pause in which a late duplicate
/// would show) checks every key and returns key → events.
async fn captured(garage: &Garage, n: usize) -> BTreeMap<String, Vec<Value>> {
    let objects = garage.wait_for_capture(n).await;
    for (key, events) in &objects {
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts.len(), 6, "{key}");
        assert_eq!(parts[1], format!("tenant={TENANT}"), "{key}");
        let ty = parts[2].strip_prefix("type=").expect(key);
        assert!(
            parts[3].starts_with("date=20") && parts[3].len() == 15,
            "{key}"
        );
        assert!(
            parts[4].starts_with("hour=") && parts[4].len() == 7,
            "{key}"
        );
        // <topic>.<partition>.<first offset, 20 digits>.jsonl.gz
        let name = parts[5].strip_suffix(".jsonl.gz").expect(key);
        let (rest, from) = name.rsplit_once('.').expect(key);
        let (topic, partition) = rest.rsplit_once('.').expect(key);
        assert_eq!(topic, TOPIC, "{key}");
        assert!(
            partition.parse::<u32>().is_ok_and(|p| p < PARTITIONS),
            "{key}"
        );
        assert!(
            from.len() == 20 && from.bytes().all(|b| b.is_ascii_digit()),
            "{key}"
        );
        for e in events {
            assert_eq!(e["type"], ty, "{key}");
            assert_eq!(e["specversion"], "1.0", "{key}");
        }
    }
    objects
}

/// Capture holds exactly the topic's events: the same ids, each once, and each event the
/// structured form of its record.
fn assert_capture_is_the_topic(capture: &BTreeMap<String, Vec<Value>>, records: &[KafkaRecord]) {
    let mut by_id: BTreeMap<String, &Value> = BTreeMap::new();
    let mut dups = Vec::new();
    for e in capture.values().flatten() {
        if by_id.insert(id_of(e), e).is_some() {
            dups.push(id_of(e));
        }
    }
    assert!(dups.is_empty(), "captured more than once: {dups:?}");
    let topic: BTreeMap<String, Value> = records
        .iter()
        .map(|r| {
            let e = r.to_event();
            (id_of(&e), e)
        })
        .collect();
    assert_eq!(topic.len(), records.len(), "the topic holds an event twice");
    let missing: Vec<&String> = topic.keys().filter(|id| !by_id.contains_key(*id)).collect();
    let extra: Vec<&String> = by_id.keys().filter(|id| !topic.contains_key(*id)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "capture and topic differ: {} missing from capture (e.g. {:?}), {} not in the topic (e.g. {:?})",
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    );
    for (id, e) in &topic {
        assert_eq!(by_id[id], e, "event {id}: capture and record differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_files_land_as_records_objects_and_capture_once() {
    let _one = ONE_CLOUD.lock().await;
    let Cloud {
        garage,
        tansu,
        mosquitto,
        relay,
        dir,
    } = Cloud::start("capture-kafka-e2e").await;
    let drop_dir = dir.join("drop");
    std::fs::create_dir_all(&drop_dir).unwrap();
    let mut config = GatewayConfig::new(GW, TOKEN, &relay.url(), mosquitto.port());
    config.files = Some(files_section(
        vec![watch_table("cameras", &drop_dir, &[])],
        &[],
    ));
    let mut gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    gateway.wait_watching(1).await;

    let files = vec![
        CameraFile::jpeg("cam-1/snap 01.jpg", 150_000, 1),
        CameraFile::mp4("cam-2/clip 12.05.mp4", 11_000_000, 2),
        CameraFile::raw("cam-3/empty.jpg", Vec::new()),
    ];
    for f in &files {
        f.write_into(&drop_dir);
    }
    let readings = 3_000usize;
    let report = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..readings as u64),
        PublisherOptions::default(),
        secs(60),
    )
    .await;
    report.assert_all_acked(readings);
    let total = readings + files.len();
    wait_for_records(&tansu, TOPIC, total, secs(120)).await;
    let records = tansu.records(TOPIC).await;
    assert_eq!(records.len(), total, "the topic holds more than was sent");

    // The records: readings once each, in the binary mode, keyed by source.
    let topic_events: Vec<Value> = records.iter().map(KafkaRecord::to_event).collect();
    let reading_stream = pigeon_e2e::Stream::from_events(
        topic_events
            .iter()
            .filter(|e| e["type"] == READING_TYPE)
            .cloned()
            .collect(),
    );
    if let Err(e) = reading_stream.check_exactly_once("n", &report.acked) {
        panic!("the topic does not hold every reading once: {e}");
    }
    for r in &records {
        assert_eq!(r.header("ce_specversion"), Some("1.0"));
        let source = r.header("ce_source").expect("ce_source");
        assert!(source.starts_with(&format!("/gateways/{GW}/")), "{source}");
        assert_eq!(r.key.as_deref(), Some(source.as_bytes()));
        assert!(r.header("ce_id").is_some() && r.header("ce_type").is_some());
        assert_eq!(r.header("content-type"), Some("application/json"));
    }

    // The files: one event each, whose dataref names the object holding its bytes.
    let file_events: Vec<&Value> = topic_events
        .iter()
        .filter(|e| e["type"] != READING_TYPE)
        .collect();
    assert_eq!(file_events.len(), files.len(), "{file_events:#?}");
    let mut object_keys = BTreeSet::new();
    for f in &files {
        let e = file_events
            .iter()
            .find(|e| e["data"]["path"] == f.path.as_str())
            .unwrap_or_else(|| panic!("no event for {}", f.path));
        assert_eq!(e["data"]["sha256"], f.sha256_hex().as_str(), "{e}");
        let dataref = e["dataref"].as_str().expect("dataref");
        let key = dataref
            .split_once(&format!("/objects/tenant={TENANT}/"))
            .map(|(_, rest)| format!("objects/tenant={TENANT}/{rest}"))
            .unwrap_or_else(|| panic!("dataref {dataref} is not under objects/tenant={TENANT}/"));
        let (bytes, _) = garage.get(&key).await;
        assert!(bytes == f.bytes, "{key} differs from {}", f.path);
        object_keys.insert(key);
    }
    let stored: BTreeSet<String> = garage.list("objects/").await.into_keys().collect();
    assert_eq!(stored, object_keys, "the bucket holds other objects");

    // Capture: every event once, each the structured form of its record.
    let capture = captured(&garage, total).await;
    assert_capture_is_the_topic(&capture, &records);
    let types: BTreeSet<&str> = capture
        .keys()
        .map(|k| k.split('/').nth(2).unwrap_or_default())
        .collect();
    assert!(
        types.contains(format!("type={READING_TYPE}").as_str()) && types.len() >= 2,
        "{types:?}"
    );
    // The group's progress is in the bucket, one range file per partition captured.
    let ranges: Vec<String> = garage
        .list(&format!("capture-state/{GROUP}/"))
        .await
        .into_keys()
        .collect();
    assert!(!ranges.is_empty(), "no capture range files");
    for k in &ranges {
        let (body, _) = garage.get(k).await;
        let r: Value = serde_json::from_slice(&body).unwrap();
        assert!(r["from"].as_i64() < r["to"].as_i64(), "{k}: {r}");
    }
    assert_eq!(
        relay
            .metric_or_zero("pigeon_relay_capture_partitions")
            .await,
        f64::from(PARTITIONS)
    );
    assert_eq!(
        relay
            .metric_or_zero("pigeon_relay_capture_events_total")
            .await,
        total as f64
    );
    // Nothing went to the stream files.
    assert_eq!(pigeon_e2e::Stream::count_lines(&relay.stream_dir()), 0);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_from_kafka_survives_relay_kills_and_an_s3_outage() {
    let _one = ONE_CLOUD.lock().await;
    let Cloud {
        garage,
        tansu,
        mosquitto,
        mut relay,
        dir,
    } = Cloud::start("capture-kafka-kills").await;
    let config = GatewayConfig::new(GW, TOKEN, &relay.url(), mosquitto.port());
    let _gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;

    // A minute of readings; a restarted relay gets its partitions back once the killed
    // one's group session (10 s) ran out.
    let total = 9_000u64;
    let options = PublisherOptions {
        rate_per_sec: Some(150),
        ..PublisherOptions::default()
    };
    let publisher = Publisher::spawn(mosquitto.port(), climate_readings(0..total), options);
    // SIGKILL the relay three times while rolls are being written (every second, 64 KiB).
    for k in 1..=3u64 {
        let want = (total * k / 6) as usize;
        wait_until("capture to make progress", secs(90), || async {
            let n = relay
                .metric_or_zero("pigeon_relay_capture_events_total")
                .await;
            let published = tansu.records(TOPIC).await.len();
            if n > 0.0 && published >= want {
                Ok(())
            } else {
                Err(format!(
                    "{n} captured since the last start, {published} records in the topic"
                ))
            }
        })
        .await;
        relay.kill();
        relay.restart().await;
    }
    // S3 goes away: rolls fail (counted) and are kept; the relay is killed like that, and
    // the restarted one writes them once S3 is back.
    garage.set_down(true);
    wait_until("a capture write to fail", secs(60), || async {
        let errors = relay
            .metric_or_zero("pigeon_relay_capture_errors_total")
            .await;
        if errors > 0.0 {
            Ok(())
        } else {
            Err("no capture error yet".to_owned())
        }
    })
    .await;
    relay.kill();
    garage.set_down(false);
    relay.restart().await;
    let report = publisher.finish(secs(120)).await;
    report.assert_all_acked(total as usize);
    wait_for_records(&tansu, TOPIC, total as usize, secs(120)).await;
    let records = tansu.records(TOPIC).await;
    assert_eq!(
        records.len(),
        total as usize,
        "the topic holds an event twice"
    );
    let capture = captured(&garage, total as usize).await;
    assert_capture_is_the_topic(&capture, &records);

    // A relay killed after a roll's range file and some of its objects, before the
    // group's offset moved: its last roll's objects are deleted and the offset set back
    // to the roll's start. The next relay writes that roll again — the same keys, the
    // same events — and capture still holds every event once.
    relay.kill();
    let (partition, range_key) = {
        let ranges = garage.list(&format!("capture-state/{GROUP}/")).await;
        ranges
            .into_keys()
            .find_map(|k| {
                let p = k
                    .strip_suffix(".json")?
                    .rsplit_once('.')?
                    .1
                    .parse::<i32>()
                    .ok()?;
                Some((p, k))
            })
            .expect("a capture range file")
    };
    let (body, _) = garage.get(&range_key).await;
    let range: Value = serde_json::from_slice(&body).unwrap();
    let from = range["from"].as_i64().unwrap();
    let roll_objects: Vec<String> = capture
        .keys()
        .filter(|k| k.ends_with(&format!("{TOPIC}.{partition}.{from:020}.jsonl.gz")))
        .cloned()
        .collect();
    assert!(
        !roll_objects.is_empty(),
        "no objects of the roll in {range_key}"
    );
    for k in &roll_objects {
        garage.delete(k).await;
    }
    if let Err(e) = tansu.commit_offset(GROUP, TOPIC, partition, from).await {
        panic!("{e}");
    }
    relay.restart().await;
    let again = captured(&garage, total as usize).await;
    assert_capture_is_the_topic(&again, &records);
    for k in &roll_objects {
        assert!(again.contains_key(k), "{k} was not written again");
    }
    assert!(
        relay
            .proc()
            .log_text()
            .contains("Writing the capture roll a stop interrupted again"),
        "the restarted relay did not write the interrupted roll again"
    );
}

/// Two relays in one capture group: the one that holds the partition captures; when it is
/// killed the other takes the partition over from where the first left it (its range
/// file and the group's offset), and capture still holds every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_takes_capture_over_from_a_killed_one() {
    let _one = ONE_CLOUD.lock().await;
    let dir = TestDir::new("capture-kafka-handover");
    let dir_b = TestDir::new("capture-kafka-handover-b");
    let garage = Garage::start(&dir).await;
    let tansu = Tansu::start(&dir).await;
    tansu.create_topic(TOPIC, 1).await;
    let mosquitto = Mosquitto::start(&dir).await;
    let bootstrap = tansu.bootstrap();
    let edit = |t: &mut toml::Table| cloud_config(t, &garage, &bootstrap);
    let mut a = Relay::start_with(&dir, &[(GW, TOKEN)], edit).await;
    let config = GatewayConfig::new(GW, TOKEN, &a.url(), mosquitto.port());
    let _gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;
    let total = 6_000u64;
    let options = PublisherOptions {
        rate_per_sec: Some(200),
        ..PublisherOptions::default()
    };
    let publisher = Publisher::spawn(mosquitto.port(), climate_readings(0..total), options);
    wait_until("relay A to capture", secs(60), || async {
        match a.metric_or_zero("pigeon_relay_capture_events_total").await {
            n if n > 0.0 => Ok(()),
            _ => Err("nothing captured yet".to_owned()),
        }
    })
    .await;
    let mut b = Relay::start_with(&dir_b, &[(GW, TOKEN)], edit).await;
    // The group has two members and one partition: one of them holds it.
    wait_until("the group to settle with B in it", secs(60), || async {
        let pa = a.metric_or_zero("pigeon_relay_capture_partitions").await;
        let pb = b.metric_or_zero("pigeon_relay_capture_partitions").await;
        // After B joined, A's partition was revoked and given again (or B was given it).
        let given = |d: &TestDir| {
            std::fs::read_to_string(d.join("logs").join("relay.log"))
                .unwrap_or_default()
                .matches("Capture was given partitions")
                .count()
        };
        let joined = given(&dir) + given(&dir_b) >= 2;
        if joined && pa + pb == 1.0 {
            Ok(())
        } else {
            Err(format!("A holds {pa}, B {pb}"))
        }
    })
    .await;
    // Kill whichever holds it while rolls are written; the other takes over from where
    // the killed one left the partition.
    let (holder, other) = if a.metric_or_zero("pigeon_relay_capture_partitions").await == 1.0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    holder.kill();
    wait_until(
        "the other relay to take the partition over",
        secs(60),
        || async {
            match other
                .metric_or_zero("pigeon_relay_capture_partitions")
                .await
            {
                1.0 => Ok(()),
                n => Err(format!("it holds {n}")),
            }
        },
    )
    .await;
    holder.restart().await;
    let log = other.proc().log_text();
    let resumed = log
        .lines()
        .rfind(|l| l.contains("Capture resumes a partition."))
        .unwrap_or_default()
        .to_owned();
    assert!(
        resumed.contains("range=Some("),
        "the relay that took over did not start from the other's progress: {resumed}"
    );
    let report = publisher.finish(secs(120)).await;
    report.assert_all_acked(total as usize);
    wait_for_records(&tansu, TOPIC, total as usize, secs(120)).await;
    let records = tansu.records(TOPIC).await;
    assert_eq!(
        records.len(),
        total as usize,
        "the topic holds an event twice"
    );
    let capture = captured(&garage, total as usize).await;
    assert_capture_is_the_topic(&capture, &records);
}
