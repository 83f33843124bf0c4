//! The relay's fleet view with the real binaries: two gateways sending readings and
//! heartbeats (every second), one of them stopped. `GET /v1/gateways` lists both, marks
//! the stopped one silent once three of its heartbeat intervals passed without a request
//! (and not before), and its figures are what it sent: the events and bytes in the
//! relay's stream, the newest heartbeat's figures. Only an operator's token opens it;
//! `/metrics` carries the per-gateway series.

use pigeon_e2e::fleet::{
    add_operators, gateway_stream_lines, get_with_token, promtool_check_metrics,
};
use pigeon_e2e::{
    Gateway, GatewayConfig, Mosquitto, Publisher, PublisherOptions, Relay, TestDir,
    climate_readings, secs, set_gateway_tenant, wait_until,
};
use serde_json::Value;

const TOKEN_A: &str = "e2e-fleet-token-a-5d1c";
const TOKEN_B: &str = "e2e-fleet-token-b-91fe";
const OPERATOR: &str = "e2e-fleet-operator-77a0b3";
const READINGS: u64 = 50;

fn find<'a>(list: &'a Value, id: &str) -> Result<&'a Value, String> {
    list["gateways"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["id"] == id))
        .ok_or_else(|| format!("no {id} in {list}"))
}

async fn fleet(relay: &Relay, path: &str) -> Result<Value, String> {
    let a = get_with_token(relay.port(), path, Some(OPERATOR)).await?;
    if a.status != 200 {
        return Err(format!("GET {path} answered {}: {}", a.status, a.body));
    }
    Ok(a.json())
}

/// The heartbeat events of `lines`, newest (by `time`) last.
fn heartbeats(lines: &[String]) -> Vec<Value> {
    let mut hbs: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "io.pigeon.gateway.heartbeat")
        .collect();
    hbs.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
    hbs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_shows_both_gateways_and_the_stopped_one_silent() {
    let dir = TestDir::new("fleet");
    let mosquitto = Mosquitto::start(&dir).await;
    let relay = Relay::start_with(&dir, &[("pi-a", TOKEN_A), ("pi-b", TOKEN_B)], |t| {
        add_operators(t, &[("noc", OPERATOR)]);
        set_gateway_tenant(t, 1, "globex");
    })
    .await;
    let mut gateways = Vec::new();
    for (id, token) in [("pi-a", TOKEN_A), ("pi-b", TOKEN_B)] {
        let mut c = GatewayConfig::new(id, token, &relay.url(), mosquitto.port());
        c.health_interval = Some("1s".into());
        gateways.push(Gateway::start_subscribed(&dir, c, &mosquitto).await);
    }
    let (a, mut b) = (gateways.remove(0), gateways.remove(0));

    // Both take every reading (both subscribe to org/#).
    let report = Publisher::publish_all(
        mosquitto.port(),
        climate_readings(0..READINGS),
        PublisherOptions {
            client_id: format!("e2e-fleet-{}", mosquitto.port()),
            ..PublisherOptions::default()
        },
        secs(60),
    )
    .await;
    report.assert_all_acked(READINGS as usize);

    // Both listed, each with its interval learnt from its heartbeats, the readings in,
    // neither silent.
    wait_until(
        "both gateways in the fleet view with their heartbeat interval",
        secs(60),
        || async {
            let list = fleet(&relay, "/v1/gateways").await?;
            for id in ["pi-a", "pi-b"] {
                let g = find(&list, id)?;
                if g["silence"]["heartbeat_interval_from"] != "heartbeats"
                    || g["total"]["events"].as_u64().unwrap_or(0) < READINGS + 2
                    || g["silent"] != false
                {
                    return Err(format!("not yet: {g}"));
                }
            }
            Ok(())
        },
    )
    .await;

    b.stop().await;
    let stopped_ms = chrono::Utc::now().timestamp_millis();
    let list = wait_until("pi-b silent while pi-a is not", secs(60), || async {
        let list = fleet(&relay, "/v1/gateways").await?;
        let (ga, gb) = (find(&list, "pi-a")?, find(&list, "pi-b")?);
        if gb["silent"] == true && ga["silent"] == false {
            Ok(list)
        } else {
            Err(format!(
                "pi-a silent={} pi-b silent={}",
                ga["silent"], gb["silent"]
            ))
        }
    })
    .await;
    assert_eq!(list["count"], 2, "{list}");
    assert_eq!(list["silent"], 1, "{list}");
    let gb = find(&list, "pi-b").unwrap();
    assert_eq!(gb["tenant"], "globex");
    // Silent from its last request, which came before it stopped, and not before three
    // of its intervals had passed.
    let last_ms = chrono::DateTime::parse_from_rfc3339(gb["last_request"]["at"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    assert!(last_ms <= stopped_ms, "{gb}");
    assert!(
        gb["silence"]["quiet_seconds"].as_f64().unwrap()
            > 3.0
                * gb["silence"]["heartbeat_interval_seconds"]
                    .as_f64()
                    .unwrap(),
        "{gb}"
    );
    let reason = gb["silent_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("nothing received for ")
            && reason.contains("the interval of its heartbeats"),
        "{reason}"
    );
    let interval = gb["silence"]["heartbeat_interval_seconds"]
        .as_f64()
        .unwrap();
    assert!((0.9..=1.5).contains(&interval), "{gb}");
    assert_eq!(find(&list, "pi-a").unwrap()["tenant"], "default");

    // pi-b's figures are what it sent: its stream lines, its newest heartbeat.
    let lines = gateway_stream_lines(&relay.stream_dir(), "pi-b");
    let one = fleet(&relay, "/v1/gateways/pi-b").await.unwrap();
    assert_eq!(one["total"]["events"], lines.len() as u64, "{one}");
    assert_eq!(
        one["total"]["bytes"],
        lines.iter().map(|l| l.len() as u64).sum::<u64>(),
        "{one}"
    );
    assert_eq!(one["today"]["events"], one["total"]["events"]);
    assert_eq!(one["total"]["rejected"], 0);
    let hbs = heartbeats(&lines);
    assert!(hbs.len() >= 2, "{} heartbeats", hbs.len());
    assert!(lines.len() as u64 >= READINGS + hbs.len() as u64);
    let newest = hbs.last().unwrap();
    let hb = &one["last_heartbeat"];
    for field in [
        "version",
        "outbox_depth",
        "outbox_bytes",
        "outbox_dead_letters",
        "disk_free_bytes",
        "disk_total_bytes",
        "temperature_c",
        "process_uptime_seconds",
        "mqtt_connected",
    ] {
        assert_eq!(
            hb[field], newest["data"][field],
            "{field}: {hb} vs {newest}"
        );
    }
    // The relay keeps the heartbeat's time to the millisecond.
    let ms = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    assert_eq!(ms(&hb["time"]), ms(&newest["time"]), "{hb} vs {newest}");
    assert_eq!(one["dead_letters"], newest["data"]["outbox_dead_letters"]);
    assert!(
        matches!(
            one["last_request"]["kind"].as_str(),
            Some("events" | "heartbeat")
        ),
        "{one}"
    );

    // Only an operator's token: none, a wrong one, a gateway's → 401.
    for token in [
        None,
        Some("not-the-operator-token"),
        Some(TOKEN_A),
        Some(TOKEN_B),
    ] {
        for path in ["/v1/gateways", "/v1/gateways/pi-a"] {
            let r = get_with_token(relay.port(), path, token).await.unwrap();
            assert_eq!(r.status, 401, "{path} with {token:?}: {}", r.body);
            let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
            assert!(
                error.contains("operator token"),
                "{path} with {token:?}: {error}"
            );
            assert!(r.header("www-authenticate").is_some());
        }
    }

    // Bad input, each refused with a sentence.
    let huge = format!("/v1/gateways?tenant={}", "x".repeat(20_000));
    for (path, status, says) in [
        (huge.as_str(), 414, "over 1024"),
        ("/v1/gateways/pi-z", 404, "no gateway pi-z is known"),
        ("/v1/gateways/../x", 404, "there is nothing at"),
        ("/v1/gateways/..", 400, "is not a gateway id"),
        (
            "/v1/gateways/pi-a/../../metrics",
            404,
            "there is nothing at",
        ),
        ("/v1/gateways?limit=5", 400, "unknown query parameter"),
    ] {
        let r = get_with_token(relay.port(), path, Some(OPERATOR))
            .await
            .unwrap();
        let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert_eq!(r.status, status, "{}: {error}", &path[..path.len().min(40)]);
        assert!(
            error.contains(says),
            "{}: {error}",
            &path[..path.len().min(40)]
        );
    }

    // The per-gateway series.
    let (code, metrics) = relay.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    let sample = |name: &str, gw: &str, tenant: &str| {
        pigeon_e2e::metric_value(
            &metrics,
            &format!("{name}{{gateway=\"{gw}\",tenant=\"{tenant}\"}}"),
        )
        .unwrap_or_else(|| panic!("no {name} of {gw} in\n{metrics}"))
    };
    assert_eq!(
        sample(
            "pigeon_relay_gateway_events_accepted_total",
            "pi-b",
            "globex"
        ),
        lines.len() as f64
    );
    assert_eq!(
        sample(
            "pigeon_relay_gateway_bytes_accepted_total",
            "pi-b",
            "globex"
        ),
        lines.iter().map(|l| l.len()).sum::<usize>() as f64
    );
    assert_eq!(sample("pigeon_relay_gateway_silent", "pi-b", "globex"), 1.0);
    assert!(
        sample(
            "pigeon_relay_gateway_events_accepted_total",
            "pi-a",
            "default"
        ) >= (READINGS + 2) as f64
    );
    let last_seen_b = sample(
        "pigeon_relay_gateway_last_seen_timestamp_seconds",
        "pi-b",
        "globex",
    );
    let at_b =
        chrono::DateTime::parse_from_rfc3339(one["last_request"]["at"].as_str().unwrap()).unwrap();
    assert!((last_seen_b - at_b.timestamp_millis() as f64 / 1000.0).abs() < 0.002);
    assert_eq!(
        pigeon_e2e::metric_value(&metrics, "pigeon_relay_fleet_gateways"),
        Some(2.0)
    );
    assert_eq!(
        pigeon_e2e::metric_value(&metrics, "pigeon_relay_fleet_gateways_folded"),
        Some(0.0)
    );
    match promtool_check_metrics(&metrics).await {
        Some(verdict) => verdict.unwrap_or_else(|e| panic!("promtool check metrics: {e}")),
        None => eprintln!("promtool is not installed; the exposition was not checked by it"),
    }

    drop(a);
}
