//! The fleet view against the real binary: what `GET /v1/gateways` says of each gateway
//! after it sent, the operator's credential, bad paths and queries, the per-gateway
//! series on `/metrics`, the cap, silence, and the view after a restart.

mod common;

use common::{Relay, TOKEN_1, request, sha256_hex, stream_files};
use serde_json::{Value, json};

const OPERATOR: &str = "operator-token-0123456789";
const ACME_OPERATOR: &str = "acme-operator-token-0123";

fn operators() -> String {
    format!(
        "[[operators]]\nname = \"noc\"\ntoken = \"{OPERATOR}\"\n\n\
         [[operators]]\nname = \"acme\"\ntoken_sha256 = \"{}\"\ntenants = [\"acme\"]\n",
        sha256_hex(ACME_OPERATOR)
    )
}

fn get(relay: &Relay, path: &str, token: Option<&str>) -> common::Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    request(relay.port, "GET", path, &headers, b"")
}

fn heartbeat(seq: u64, time: &str, uptime: u64, depth: u64) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("hb-{seq}"),
        "type": "io.pigeon.gateway.heartbeat",
        "source": "/gateways/pi-1/health",
        "time": time,
        "datacontenttype": "application/json",
        "data": {"version": "0.1.0", "process_uptime_seconds": uptime, "outbox_depth": depth,
                 "outbox_bytes": 2048, "outbox_oldest_age_seconds": 1.5, "outbox_dead_letters": 2,
                 "disk_free_bytes": 1000000, "disk_total_bytes": 4000000, "temperature_c": 48.5,
                 "mqtt_connected": true, "relay_reachable": true},
        "sequence": pigeon_shared::ce::format_sequence(seq),
        "producerid": "p-fleet",
    })
}

fn reading(seq: u64) -> Value {
    let mut e = common::event("p-fleet", seq);
    e["id"] = json!(format!("r-{seq}"));
    e
}

/// The bytes of pi-1's stream lines (what the fleet counts as accepted bytes).
fn stream_bytes(relay: &Relay) -> u64 {
    stream_files(&relay.data_dir())
        .iter()
        .filter(|p| p.to_string_lossy().contains("/pi-1/"))
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| l.len() as u64)
                .collect::<Vec<_>>()
        })
        .sum()
}

fn gateway<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["gateways"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["id"] == id))
        .unwrap_or_else(|| panic!("no {id} in {list}"))
}

#[test]
fn the_fleet_view_counts_what_each_gateway_sent() {
    let mut relay = Relay::start_with("", &operators());
    // Two readings and two heartbeats 30 s apart (one process), then all again
    // (duplicates), then an event of another gateway's source (rejected).
    let batch = [
        reading(1),
        heartbeat(2, "2026-03-01T08:00:00Z", 100, 7),
        reading(3),
        heartbeat(4, "2026-03-01T08:00:30Z", 130, 9),
    ];
    assert_eq!(relay.post_batch(&batch).statuses(), ["accepted"; 4]);
    assert_eq!(relay.post_batch(&batch).statuses(), ["duplicate"; 4]);
    let mut foreign = reading(5);
    foreign["source"] = json!("/gateways/pi-2/mqtt");
    assert_eq!(relay.post_batch(&[foreign]).statuses(), ["rejected"]);

    let r = get(&relay, "/v1/gateways", Some(OPERATOR));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let list = r.json();
    assert_eq!(list["count"], 2, "{list}");
    let pi1 = gateway(&list, "pi-1");
    assert_eq!(pi1["tenant"], "default");
    assert_eq!(pi1["configured"], true);
    assert_eq!(pi1["silent"], false);
    assert_eq!(pi1["silent_reason"], Value::Null);
    for counts in [&pi1["today"], &pi1["total"]] {
        assert_eq!(counts["requests"], 3, "{counts}");
        assert_eq!(counts["events"], 4, "{counts}");
        assert_eq!(counts["bytes"], stream_bytes(&relay), "{counts}");
        assert_eq!(counts["duplicates"], 4, "{counts}");
        assert_eq!(counts["rejected"], 1, "{counts}");
    }
    assert_eq!(pi1["last_request"]["kind"], "events");
    assert_eq!(pi1["last_request"]["status"], 200);
    let hb = &pi1["last_heartbeat"];
    assert_eq!(hb["time"], "2026-03-01T08:00:30.000Z", "{hb}");
    assert_eq!(hb["outbox_depth"], 9);
    assert_eq!(hb["version"], "0.1.0");
    assert_eq!(hb["temperature_c"], 48.5);
    assert_eq!(hb["cpu_percent"], Value::Null);
    assert_eq!(pi1["dead_letters"], 2);
    assert_eq!(pi1["silence"]["heartbeat_interval_seconds"], 30.0);
    assert_eq!(pi1["silence"]["heartbeat_interval_from"], "heartbeats");
    assert_eq!(pi1["silence"]["silent_after_seconds"], 90.0);
    let pi2 = gateway(&list, "pi-2");
    assert_eq!(pi2["last_request"], Value::Null);
    assert_eq!(pi2["silence"]["heartbeat_interval_from"], "default");
    assert_eq!(pi2["today"]["events"], 0);

    // One gateway alone is the list's element.
    let one = get(&relay, "/v1/gateways/pi-1", Some(OPERATOR)).json();
    assert_eq!(one["total"], pi1["total"]);
    assert_eq!(one["last_heartbeat"]["outbox_depth"], 9);

    // A heartbeats-only request is one.
    relay.post_batch(&[heartbeat(6, "2026-03-01T08:01:00Z", 160, 3)]);
    let one = get(&relay, "/v1/gateways/pi-1", Some(OPERATOR)).json();
    assert_eq!(one["last_request"]["kind"], "heartbeat");
    assert_eq!(one["last_heartbeat"]["outbox_depth"], 3);

    // The per-gateway series.
    assert_eq!(
        relay.metric(
            "pigeon_relay_gateway_events_accepted_total{gateway=\"pi-1\",tenant=\"default\"}"
        ),
        5
    );
    assert_eq!(
        relay.metric(
            "pigeon_relay_gateway_bytes_accepted_total{gateway=\"pi-1\",tenant=\"default\"}"
        ),
        stream_bytes(&relay)
    );
    assert!(
        relay.metric(
            "pigeon_relay_gateway_last_seen_timestamp_seconds{gateway=\"pi-1\",tenant=\"default\"}"
        ) > 1_700_000_000
    );
    assert_eq!(
        relay.metric(
            "pigeon_relay_gateway_last_seen_timestamp_seconds{gateway=\"pi-2\",tenant=\"default\"}"
        ),
        0
    );
    assert_eq!(relay.metric("pigeon_relay_fleet_gateways"), 2);
    assert_eq!(
        relay.metric("pigeon_relay_fleet_requests_total{code=\"200\"}"),
        3
    );

    // The view survives a restart (state/fleet.json, written at shutdown).
    assert!(relay.terminate().success());
    relay.spawn();
    let after = get(&relay, "/v1/gateways/pi-1", Some(OPERATOR)).json();
    assert_eq!(after["total"]["events"], 5, "{after}");
    assert_eq!(after["last_heartbeat"]["outbox_depth"], 3);
    assert_eq!(after["silence"]["heartbeat_interval_seconds"], 30.0);
    assert!(relay.data_dir().join("state/fleet.json").is_file());
}

#[test]
fn only_an_operator_token_opens_the_fleet_view() {
    let relay = Relay::start_with("", &operators());
    for (token, why) in [
        (None, "missing bearer token"),
        (Some("not-a-token-of-anyone"), "not an operator token"),
        // A gateway's own token is never an operator's.
        (Some(TOKEN_1), "not an operator token"),
    ] {
        for path in ["/v1/gateways", "/v1/gateways/pi-1", "/v1/gateways/../x"] {
            let r = get(&relay, path, token);
            assert_eq!(r.status, 401, "{path} with {token:?}");
            assert!(
                r.json()["error"].as_str().unwrap().contains(why),
                "{path}: {}",
                r.json()
            );
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|c| c.starts_with("Bearer"))
            );
        }
    }
    let r = request(
        relay.port,
        "GET",
        "/v1/gateways",
        &[("authorization", &format!("Basic {OPERATOR}"))],
        b"",
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        relay.metric("pigeon_relay_fleet_requests_total{code=\"401\"}"),
        10
    );

    // An operator limited to tenant acme sees neither gateway (both are "default").
    let r = get(&relay, "/v1/gateways", Some(ACME_OPERATOR)).json();
    assert_eq!(
        (r["count"].as_u64(), r["gateways"].as_array().map(Vec::len)),
        (Some(0), Some(0))
    );
    assert_eq!(
        get(&relay, "/v1/gateways/pi-1", Some(ACME_OPERATOR)).status,
        404
    );
    assert_eq!(get(&relay, "/v1/gateways/pi-1", Some(OPERATOR)).status, 200);
}

#[test]
fn bad_paths_and_queries_are_refused_clearly() {
    let relay = Relay::start_with("", &operators());
    let huge = format!("/v1/gateways?tenant={}", "a".repeat(60_000));
    for (path, status, says) in [
        ("/v1/gateways/nope", 404, "no gateway nope is known"),
        (
            "/v1/gateways/../x",
            404,
            "there is nothing at \"/v1/gateways/../x\"",
        ),
        ("/v1/gateways/pi-1/extra", 404, "there is nothing at"),
        ("/v1/gateways/", 404, "there is nothing at"),
        ("/v1/gateways/..", 400, "\"..\" is not a gateway id"),
        ("/v1/gateways/%2e%2e%2fx", 400, "is not a gateway id"),
        ("/v1/gateways?x=1", 400, "unknown query parameter \"x\""),
        (
            "/v1/gateways?silent=maybe",
            400,
            "silent=\"maybe\" must be true or false",
        ),
        ("/v1/gateways?tenant=Acme", 400, "is not a tenant"),
        ("/v1/gateways/pi-1?x=1", 400, "takes no query string"),
        (
            huge.as_str(),
            414,
            "the query string is 60007 bytes, over 1024",
        ),
    ] {
        let r = get(&relay, path, Some(OPERATOR));
        let body = r.json();
        let error = body["error"].as_str().unwrap_or_default();
        assert_eq!(r.status, status, "{}: {body}", &path[..path.len().min(60)]);
        assert!(
            error.contains(says),
            "{}: {error}",
            &path[..path.len().min(60)]
        );
    }
    // Past 64 KiB the HTTP layer refuses the request line itself (a bare 414), and
    // counts it as malformed.
    let hugest = format!("/v1/gateways?tenant={}", "a".repeat(100_000));
    assert_eq!(get(&relay, &hugest, Some(OPERATOR)).status, 414);
    // (Counted once the connection's task has ended, just after the answer.)
    relay.wait_metric("pigeon_relay_malformed_requests_total", |v| v == 1);
    // Filters that are well-formed.
    let r = get(
        &relay,
        "/v1/gateways?tenant=default&silent=false",
        Some(OPERATOR),
    )
    .json();
    assert_eq!(r["count"], 2);
    let r = get(&relay, "/v1/gateways?silent=true", Some(OPERATOR)).json();
    assert_eq!(r["count"], 0);
    // A GET with a body.
    let auth = format!("Bearer {OPERATOR}");
    let r = request(
        relay.port,
        "GET",
        "/v1/gateways",
        &[("authorization", &auth)],
        b"{}",
    );
    assert_eq!(r.status, 413);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("takes no request body")
    );
    // Other methods.
    assert_eq!(
        request(
            relay.port,
            "POST",
            "/v1/gateways",
            &[("authorization", &auth)],
            b""
        )
        .status,
        405
    );
}

#[test]
fn silence_and_the_series_cap() {
    let relay = Relay::start_with(
        "",
        &format!(
            "[fleet]\nheartbeat_interval = \"1s\"\nmax_gateway_series = 1\n\n{}",
            operators()
        ),
    );
    // pi-2 never sends; pi-1 keeps sending.
    let start = std::time::Instant::now();
    let mut seq = 0;
    let list = loop {
        seq += 1;
        relay.post_batch(&[reading(seq)]);
        let list = get(&relay, "/v1/gateways", Some(OPERATOR)).json();
        if gateway(&list, "pi-2")["silent"] == true {
            break list;
        }
        assert!(
            start.elapsed().as_secs() < 20,
            "pi-2 never went silent: {list}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let pi2 = gateway(&list, "pi-2");
    // Not before three intervals since the relay began listening.
    let quiet = pi2["silence"]["quiet_seconds"].as_f64().unwrap();
    assert!(quiet > 3.0, "silent after {quiet} s: {pi2}");
    let reason = pi2["silent_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("nothing received from it since the relay started listening"),
        "{reason}"
    );
    assert!(
        reason.contains("3 × 1.00 s, fleet.heartbeat_interval"),
        "{reason}"
    );
    assert_eq!(gateway(&list, "pi-1")["silent"], false);
    assert_eq!(list["silent"], 1);

    // max_gateway_series = 1: pi-1 has its series, pi-2 is summed under _other.
    let m = request(relay.port, "GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("pigeon_relay_gateway_silent{gateway=\"pi-1\",tenant=\"default\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("pigeon_relay_gateway_silent{gateway=\"_other\",tenant=\"default\"} 1"),
        "{text}"
    );
    assert!(!text.contains("gateway=\"pi-2\""), "{text}");
    assert_eq!(relay.metric("pigeon_relay_fleet_gateways_folded"), 1);
    assert_eq!(relay.metric("pigeon_relay_fleet_gateways_silent"), 1);
}

#[test]
fn without_operators_the_fleet_view_is_off() {
    let relay = Relay::start();
    let r = get(&relay, "/v1/gateways", Some(OPERATOR));
    assert_eq!(r.status, 401);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("no [[operators]] are configured")
    );
    // The series are there all the same.
    assert_eq!(relay.metric("pigeon_relay_fleet_gateways"), 2);
}

#[test]
fn files_count_as_files() {
    let relay = Relay::start_with("", &operators());
    let bytes = vec![7u8; 100_000];
    let event = json!({
        "specversion": "1.0",
        "id": "img-1",
        "type": "io.pigeon.camera.image",
        "source": "/gateways/pi-1/files/cameras",
        "time": "2026-12-01T21:04:05.123Z",
        "datacontenttype": "application/json",
        "data": {"filename": "a.jpg", "size": bytes.len()},
        "sequence": pigeon_shared::ce::format_sequence(1),
        "producerid": "p-files",
    });
    let create = serde_json::to_vec(&json!({
        "event": event,
        "length": bytes.len(),
        "sha256": common::sha256_of(&bytes),
        "extension": "jpg",
    }))
    .unwrap();
    let auth = format!("Bearer {TOKEN_1}");
    let json_ct = ("content-type", "application/json");
    let r = request(
        relay.port,
        "POST",
        "/v1/uploads",
        &[json_ct, ("authorization", &auth)],
        &create,
    );
    assert_eq!(r.status, 201);
    let location = r.json()["location"].as_str().unwrap().to_owned();
    let r = request(
        relay.port,
        "PATCH",
        &location,
        &[
            ("content-type", "application/offset+octet-stream"),
            ("authorization", &auth),
            ("upload-offset", "0"),
        ],
        &bytes,
    );
    assert_eq!(r.status, 200);
    // Sent again: the relay has it (a duplicate, no bytes).
    let r = request(
        relay.port,
        "POST",
        "/v1/uploads",
        &[json_ct, ("authorization", &auth)],
        &create,
    );
    assert_eq!(r.json()["result"]["status"], "duplicate");

    let pi1 = get(&relay, "/v1/gateways/pi-1", Some(OPERATOR)).json();
    let total = &pi1["total"];
    assert_eq!(total["files"], 1, "{pi1}");
    assert_eq!(total["file_bytes"], 100_000);
    assert_eq!(total["duplicates"], 1);
    assert_eq!(total["requests"], 3);
    // A file's event is a file, not one of the events.
    assert_eq!(total["events"], 0);
    assert_eq!(pi1["last_request"]["kind"], "files");
    assert_eq!(pi1["last_request"]["status"], 200);
}

#[test]
fn a_refused_request_still_shows_its_gateway_alive() {
    let relay = Relay::start_with("", &operators());
    let auth = format!("Bearer {TOKEN_1}");
    let r = relay.post(
        &[("content-type", "text/plain"), ("authorization", &auth)],
        b"hello",
    );
    assert_eq!(r.status, 415);
    let pi1 = get(&relay, "/v1/gateways/pi-1", Some(OPERATOR)).json();
    assert_eq!(pi1["last_request"]["status"], 415, "{pi1}");
    assert_eq!(pi1["last_request"]["kind"], "events");
    assert_eq!(pi1["total"]["requests"], 1);
    assert_eq!(pi1["total"]["events"], 0);
    // A wrong token names no gateway: nothing is counted for anyone.
    let r = relay.post(&[("authorization", "Bearer wrong-token-0123456789")], b"[]");
    assert_eq!(r.status, 401);
    let list = get(&relay, "/v1/gateways", Some(OPERATOR)).json();
    let requests: u64 = list["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["total"]["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 1, "{list}");
}
