//! `pigeon-gateway dead-letter list | retry | purge` against a running gateway (issue 6):
//! a relay that rejects oversized events, the dead letters listed with the relay's
//! reasons, one purged, the cause fixed (the relay restarted with a larger limit), the
//! rest retried — and they arrive exactly once, with their CloudEvent ids, while the
//! gateway keeps running the whole time.

use std::collections::BTreeSet;

use pigeon_e2e::{
    Gateway, GatewayConfig, Mosquitto, Publisher, Reading, Relay, TestDir, climate_readings,
    describe, gateway_bin, run_command, secs, wait_until,
};
use serde_json::Value;

const OVERSIZED: [u64; 3] = [20, 50, 80];

/// `limits.max_event_bytes` for the relay config table.
fn max_event_bytes(table: &mut toml::Table, limit: &str) {
    let mut limits = toml::Table::new();
    limits.insert("max_event_bytes".into(), limit.into());
    table.insert("limits".into(), limits.into());
}

/// Runs a gateway command that must succeed; returns its stdout.
async fn ok(gateway: &Gateway, args: &[&str]) -> String {
    let out = gateway.command(args).await;
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", describe(&out));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `dead-letter list --json`, parsed.
async fn list_json(gateway: &Gateway) -> Value {
    let text = ok(gateway, &["dead-letter", "list", "--json"]).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_purged_and_retried_once_the_cause_is_fixed_while_the_gateway_runs()
{
    let dir = TestDir::new("dead-letters");
    let mosquitto = Mosquitto::start(&dir).await;
    let mut relay =
        Relay::start_with(&dir, &[("pi-1", "tok")], |t| max_event_bytes(t, "4KiB")).await;
    let config = GatewayConfig::new("pi-1", "tok", &relay.url(), mosquitto.port());
    let mut gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;

    // 100 readings, three of them (n = 20, 50, 80) over the relay's 4 KiB event limit.
    let mut readings = climate_readings(0..100);
    for n in OVERSIZED {
        let i = n as usize;
        readings[i] = Reading {
            n,
            topic: readings[i].topic.clone(),
            payload: format!("{{\"n\":{n},\"blob\":\"{}\"}}", "x".repeat(8 * 1024)).into_bytes(),
        };
    }
    let report =
        Publisher::publish_all(mosquitto.port(), readings, Default::default(), secs(60)).await;
    report.assert_all_acked(100);
    let ordinary: BTreeSet<u64> = (0..100).filter(|n| !OVERSIZED.contains(n)).collect();
    relay
        .assert_delivered_exactly_once(&ordinary, secs(60))
        .await;

    // `list --json`: the three, oldest first, with the relay's reason and a preview.
    let listed = wait_until("three dead letters in list --json", secs(30), || async {
        let v = list_json(&gateway).await;
        match v["total"].as_u64() {
            Some(3) => Ok(v),
            other => Err(format!("total {other:?}: {v}")),
        }
    })
    .await;
    let letters = listed["dead_letters"]
        .as_array()
        .expect("dead_letters array");
    assert_eq!(letters.len(), 3, "{listed}");
    for (d, n) in letters.iter().zip(OVERSIZED) {
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("max_event_bytes") || reason.contains("large"),
            "{d}"
        );
        assert_eq!(d["subject"], pigeon_e2e::climate_topic(n).as_str(), "{d}");
        assert_eq!(d["type"], pigeon_e2e::READING_TYPE, "{d}");
        let preview = d["preview"].as_str().unwrap_or_default();
        assert!(preview.starts_with(&format!("{{\"n\":{n},")), "{d}");
        assert!(d["size_bytes"].as_u64().unwrap_or(0) > 8 * 1024, "{d}");
        assert!(d["failed_at_us"].as_i64() >= d["time_us"].as_i64(), "{d}");
    }
    let seq = |i: usize| letters[i]["seq"].as_u64().expect("seq").to_string();
    let id = |i: usize| letters[i]["id"].as_str().expect("id").to_string();

    // The table for a person, and `status` (asked over HTTP from the running gateway).
    let table = ok(&gateway, &["dead-letter", "list"]).await;
    assert!(table.starts_with("3 dead letters in "), "{table}");
    assert!(table.contains(&id(1)), "{table}");
    let limited = ok(&gateway, &["dead-letter", "list", "--limit", "1"]).await;
    assert!(limited.contains("the first 1 by sequence"), "{limited}");
    assert!(!limited.contains(&id(1)), "{limited}");
    let status = ok(&gateway, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["outbox"]["dead_letters"], 3, "{status}");

    // A sequence that is not a dead letter changes nothing and says so.
    let out = gateway
        .command(&["dead-letter", "retry", "999999", &seq(0)])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("999999"),
        "{}",
        describe(&out)
    );

    // Purge: nothing is a day old; then the last one by sequence.
    let text = ok(&gateway, &["dead-letter", "purge", "--older-than", "1d"]).await;
    assert_eq!(
        text,
        "Deleted 0 dead letters (rejected more than 1d ago).\n"
    );
    let text = ok(&gateway, &["dead-letter", "purge", &seq(2)]).await;
    assert_eq!(text, "Deleted 1 dead letter.\n");

    // Fix the cause: the relay, restarted with a larger limit, accepts them now.
    relay.stop().await;
    let cfg = std::fs::read_to_string(relay.config_path()).expect("relay.toml");
    let mut table: toml::Table = cfg.parse().expect("relay.toml is TOML");
    max_event_bytes(&mut table, "64KiB");
    std::fs::write(relay.config_path(), table.to_string()).expect("write relay.toml");
    relay.restart().await;

    let text = ok(&gateway, &["dead-letter", "retry", "--all"]).await;
    assert!(
        text.starts_with("Moved 2 dead letters back into the outbox"),
        "{text}"
    );
    assert!(text.contains(&format!("seq {} -> ", seq(0))), "{text}");

    // The running gateway sends them (no restart), each exactly once, with its old id.
    let mut expected = ordinary.clone();
    expected.extend(&OVERSIZED[..2]);
    let stream = relay
        .assert_delivered_exactly_once(&expected, secs(60))
        .await;
    let by_n = stream.by_data_field("n");
    for (i, n) in OVERSIZED[..2].iter().enumerate() {
        assert_eq!(by_n[n][0]["id"], id(i).as_str(), "n={n}");
    }
    assert!(!by_n.contains_key(&OVERSIZED[2]), "the purged one arrived");
    assert!(gateway.proc().is_running(), "the gateway stopped");

    let empty = list_json(&gateway).await;
    assert_eq!(empty["total"], 0, "{empty}");
    assert_eq!(
        ok(&gateway, &["dead-letter", "list"]).await,
        format!(
            "no dead letters (in {})\n",
            gateway.data_dir().join("outbox.db").display()
        )
    );
    wait_until("status to show no dead letters", secs(10), || async {
        let s = gateway.status_command(&["--json"]).await;
        let v: Value = serde_json::from_slice(&s.stdout).map_err(|e| e.to_string())?;
        match (&v["outbox"]["dead_letters"], &v["outbox"]["waiting"]) {
            (d, w) if d == 0 && w == 0 => Ok(()),
            (d, w) => Err(format!("dead_letters {d}, waiting {w}")),
        }
    })
    .await;
}

#[tokio::test]
async fn bad_arguments_exit_64_and_a_missing_outbox_exits_1_naming_it() {
    let dir = TestDir::new("dead-letters-args");
    let config_path = dir.join("gateway.toml");
    let data_dir = dir.join("never-ran");
    GatewayConfig::new("pi-1", "tok", "http://127.0.0.1:9", 9).write(&config_path, &data_dir);
    let config = config_path.to_str().expect("UTF-8 temp path");
    let run = |args: &'static [&'static str]| async move {
        let all = [&["--config", config, "dead-letter"][..], args].concat();
        run_command(&gateway_bin(), &all, secs(20)).await
    };

    for args in [
        &["retry"][..],
        &["retry", "3", "--all"],
        &["purge"],
        &["purge", "--older-than", "7 weeks"],
        &["list", "--limit", "ten"],
        &["frobnicate"],
    ] {
        let out = run(args).await;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", describe(&out));
    }

    let out = run(&["list"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let db = data_dir.join("outbox.db");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&db.display().to_string()),
        "{}",
        describe(&out)
    );
    assert!(!db.exists(), "list created an outbox");

    let out = run_command(
        &gateway_bin(),
        &[
            "--config",
            "/nonexistent/gateway.toml",
            "dead-letter",
            "list",
        ],
        secs(20),
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
}
