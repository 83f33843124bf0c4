//! A long outage, time compressed: the relay is away while alarms, climate readings and
//! camera files keep coming, until the outbox's disk budget (`outbox.max_bytes`) is
//! reached. The budget holds (never more than one batch over), the full outbox drops the
//! oldest data of the lowest priority (files, then climate readings) and never an alarm,
//! every drop is counted and logged, and when the relay is back the alarms arrive first
//! and everything not dropped arrives exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pigeon_e2e::{
    CameraFile, Pipeline, Publisher, PublisherOptions, Reading, Subscription, climate_readings,
    file_events, files_section, secs, wait_until, watch_table,
};

const BUDGET: u64 = 16 << 20;
const ALARM_TYPE: &str = "io.example.alarm";
const CLIMATE_TYPE: &str = "io.example.climate";
/// Alarm readings are numbered from here (climate ones from 0).
const ALARM_BASE: u64 = 10_000_000;

fn alarms(range: std::ops::Range<u64>) -> Vec<Reading> {
    range
        .map(|i| {
            let n = ALARM_BASE + i;
            Reading {
                n,
                topic: format!("org/contoso/site/berlin/alarms/smoke/{}", i % 7),
                payload: serde_json::to_vec(&serde_json::json!({"n": n, "smoke": true}))
                    .expect("json"),
            }
        })
        .collect()
}

/// The gateway's `pigeon_gateway_outbox_used_bytes`.
async fn used(g: &pigeon_e2e::Gateway) -> f64 {
    g.metric("pigeon_gateway_outbox_used_bytes")
        .await
        .ok()
        .flatten()
        .unwrap_or(0.0)
}

fn table(kv: &[(&str, toml::Value)]) -> toml::Table {
    kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// The gateway's WARN lines about drops, summed by type.
fn logged_drops(log: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for l in log.lines().filter(|l| l.contains("The outbox is full")) {
        let field = |k: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(|v| v.trim_matches('"').to_owned())
        };
        if let (Some(ty), Some(n)) = (field("type="), field("dropped=")) {
            *out.entry(ty).or_insert(0) += n.parse::<u64>().unwrap_or(0);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_stays_in_budget_drops_by_priority_and_delivers_the_rest_once() {
    let mut p = Pipeline::start_in(
        "outage-quota",
        pigeon_e2e::MosquittoOptions::default(),
        |dir, c| {
            let d = dir.join("drop");
            std::fs::create_dir_all(&d).unwrap();
            c.files = Some(files_section(vec![watch_table("cameras", &d, &[])], &[]));
            c.subscriptions = vec![
                Subscription {
                    filter: "org/+/site/+/alarms/#".into(),
                    qos: 1,
                    event_type: ALARM_TYPE.into(),
                    ttl: None,
                },
                Subscription {
                    filter: "org/#".into(),
                    qos: 1,
                    event_type: CLIMATE_TYPE.into(),
                    ttl: None,
                },
            ];
            c.subscription_options = vec![
                table(&[("priority", 9.into()), ("when_full", "refuse".into())]),
                table(&[("priority", 5.into())]),
            ];
            c.mqtt_options.insert("max_pending".into(), 500.into());
        },
    )
    .await;
    // The outbox's budget, written into the config before the outage.
    p.gateway.stop().await;
    let mut config = p.gateway.config().clone();
    let mut outbox = toml::Table::new();
    outbox.insert("max_bytes".into(), "16MiB".into());
    config.extra.insert("outbox".into(), outbox.into());
    p.relay.stop().await;
    p.gateway.restart_with(config);
    p.gateway.wait_subscribed(&p.mosquitto).await;
    let drop_dir = p.dir.join("drop");

    // The outage: climate readings and files far beyond the budget, alarms among them.
    const CLIMATE: u64 = 40_000;
    const ALARMS: u64 = 300;
    let mut readings = climate_readings(0..CLIMATE);
    let alarm_readings = alarms(0..ALARMS);
    // Alarms spread through the outage.
    for (i, a) in alarm_readings.into_iter().enumerate() {
        readings.insert((i * 130).min(readings.len()), a);
    }
    let publisher = Publisher::spawn(
        p.mosquitto.port(),
        readings,
        PublisherOptions {
            rate_per_sec: Some(4_000),
            ..p.publisher()
        },
    );
    let mut files = Vec::new();
    let mut peak = 0.0f64;
    for i in 0..60u64 {
        let f = CameraFile::jpeg(&format!("cam-{}/f{i:03}.jpg", i % 3), 300_000, i);
        f.write_into(&drop_dir);
        files.push(f);
        peak = peak.max(used(&p.gateway).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let report = publisher.finish(secs(120)).await;
    report.assert_all_acked((CLIMATE + ALARMS) as usize);
    // Until everything is in the outbox (or dropped): the broker has nothing left.
    wait_until("the gateway to take every message", secs(60), || {
        let g = &p.gateway;
        async move {
            let received = g
                .metric("pigeon_gateway_mqtt_messages_received_total")
                .await?
                .unwrap_or(0.0);
            if received >= (CLIMATE + ALARMS) as f64 {
                Ok(())
            } else {
                Err(format!("{received} received"))
            }
        }
    })
    .await;
    for _ in 0..10 {
        peak = peak.max(used(&p.gateway).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The budget held, give or take one group commit (at most 4,096 rows of a reading).
    let slack = 4_096.0 * 700.0;
    assert!(
        peak <= BUDGET as f64 + slack,
        "the outbox used {peak} bytes, over its budget of {BUDGET} by more than one batch"
    );
    assert!(
        peak > BUDGET as f64 * 0.8,
        "the outage did not fill the budget ({peak})"
    );
    let dropped_metric = p
        .gateway
        .metric("pigeon_gateway_outbox_dropped_total")
        .await
        .unwrap()
        .unwrap_or(0.0) as u64;
    assert!(dropped_metric > 0, "nothing was dropped");

    // The relay comes back.
    p.relay.restart().await;
    let alarm_ns: BTreeSet<u64> = (0..ALARMS).map(|i| ALARM_BASE + i).collect();
    p.relay.wait_for_readings("n", &alarm_ns, secs(120)).await;
    wait_until("the backlog to drain", secs(180), || {
        let g = &p.gateway;
        async move {
            match g.metric("pigeon_gateway_outbox_records").await? {
                Some(0.0) => Ok(()),
                other => Err(format!("{other:?} waiting")),
            }
        }
    })
    .await;
    // Files the full outbox refused waited in the drop directory; they go now.
    pigeon_e2e::wait_until_no_files("the drop directory to be empty", &drop_dir).await;
    wait_until("the last files to be delivered", secs(60), || {
        let g = &p.gateway;
        async move {
            match g.metric("pigeon_gateway_outbox_records").await? {
                Some(0.0) => Ok(()),
                other => Err(format!("{other:?} waiting")),
            }
        }
    })
    .await;
    p.relay.wait_for_stream_quiet(Duration::from_secs(2)).await;
    let stream = p.relay.read_stream();
    let dropped_metric = p
        .gateway
        .metric("pigeon_gateway_outbox_dropped_total")
        .await
        .unwrap()
        .unwrap_or(0.0) as u64;

    // Alarms first: every alarm is in the stream before the first climate reading and
    // the first file event (files yield to a backlog of more important events).
    let first = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        stream.events().iter().position(pred).unwrap_or(usize::MAX)
    };
    let last_alarm = stream
        .events()
        .iter()
        .rposition(|e| e["type"] == ALARM_TYPE)
        .expect("alarms arrived");
    assert!(
        last_alarm < first(&|e| e["type"] == CLIMATE_TYPE),
        "a climate reading came before an alarm"
    );
    assert!(
        last_alarm < first(&|e| e.get("dataref").is_some()),
        "a file came before an alarm"
    );

    // Exactly once, and drops by the policy: no alarm dropped; what was dropped of
    // climate readings and files is their oldest.
    let by_n = stream.by_data_field("n");
    assert!(
        by_n.values().all(|v| v.len() == 1),
        "a reading arrived twice"
    );
    for n in &alarm_ns {
        assert!(by_n.contains_key(n), "alarm {n} was dropped");
    }
    let climate: Vec<u64> = by_n.keys().copied().filter(|n| *n < ALARM_BASE).collect();
    let dropped_climate = CLIMATE - climate.len() as u64;
    if let Some(&lowest) = climate.first() {
        assert_eq!(
            climate.len() as u64,
            CLIMATE - lowest,
            "the climate readings kept are not the newest ones"
        );
    }
    let got_files = file_events(&stream).unwrap();
    let mut seen = BTreeSet::new();
    for e in &got_files {
        assert!(
            seen.insert(e.path().to_owned()),
            "{} arrived twice",
            e.path()
        );
        let f = files
            .iter()
            .find(|f| f.path == e.path())
            .expect("a file we sent");
        assert_eq!(std::fs::read(&e.object).unwrap(), f.bytes, "{}", f.path);
    }
    let dropped_files = files.len() as u64 - got_files.len() as u64;
    assert!(
        dropped_files > 0,
        "files are the lowest priority: some must have gone"
    );
    // The files dropped were the oldest.
    let kept_idx: Vec<usize> = files
        .iter()
        .enumerate()
        .filter(|(_, f)| seen.contains(&f.path))
        .map(|(i, _)| i)
        .collect();
    if let Some(&lowest) = kept_idx.first() {
        assert_eq!(
            kept_idx.len(),
            files.len() - lowest,
            "the files kept are not the newest"
        );
    }
    eprintln!(
        "outage: peak {:.1} MiB of a {} MiB budget; dropped {dropped_climate} of {CLIMATE} climate readings and {dropped_files} of {} files; all {ALARMS} alarms kept",
        peak / 1048576.0,
        BUDGET >> 20,
        files.len()
    );
    // The metric and the log say the same as the relay.
    assert_eq!(dropped_metric, dropped_climate + dropped_files);
    // Drops are logged at most every 10 s; the last ones when the writer stops.
    p.gateway.stop().await;
    let logged = logged_drops(&p.gateway.log_text());
    assert_eq!(logged.get(ALARM_TYPE), None);
    assert_eq!(
        logged.get(CLIMATE_TYPE).copied().unwrap_or(0),
        dropped_climate,
        "logged drops: {logged:?}"
    );
    assert_eq!(
        logged.get("io.pigeon.camera.image").copied().unwrap_or(0),
        dropped_files,
        "logged drops: {logged:?}"
    );
}
