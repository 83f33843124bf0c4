//! Black-box tests of the ingest endpoint: the real binary, a temp data dir, loopback.

mod common;

use chrono::Utc;
use common::*;
use serde_json::{Value, json};

const BATCH: (&str, &str) = ("content-type", "application/cloudevents-batch+json");
const STRUCTURED: (&str, &str) = ("content-type", "application/cloudevents+json");

fn auth1() -> String {
    format!("Bearer {TOKEN_1}")
}

#[test]
fn a_batch_is_stored_one_line_per_event_in_the_hour_file() {
    let relay = Relay::start();
    let before = Utc::now();
    let events: Vec<Value> = (1..=3).map(|s| event("p-1", s)).collect();
    let r = relay.post_batch(&events);
    let after = Utc::now();
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!(body["accepted"], 3);
    assert_eq!(
        body["results"][0],
        json!({"id": "p-1-1", "status": "accepted"})
    );

    let files = stream_files(&relay.data_dir());
    assert_eq!(files.len(), 1, "{files:?}");
    let rel = files[0]
        .strip_prefix(relay.data_dir())
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let expected: Vec<String> = [before, after]
        .iter()
        .map(|t| format!("stream/pi-1/{}.jsonl", t.format("%Y-%m-%d/%H")))
        .collect();
    assert!(expected.contains(&rel), "{rel} not in {expected:?}");

    let stored = relay.stream_events();
    assert_eq!(stored.len(), 3);
    // The stored line is the structured event, with its data and extensions.
    assert_eq!(stored[0]["data"], json!({"n": 1, "celsius": 21.5}));
    assert_eq!(stored[0]["sequence"], "00000000000000000001");
    assert_eq!(stored[0]["producerid"], "p-1");
    assert_eq!(stored[0]["source"], "/gateways/pi-1/mqtt");
    assert!(relay.data_dir().join("objects").is_dir());
}

#[test]
fn a_structured_event_is_stored() {
    let relay = Relay::start();
    let body = serde_json::to_vec(&event("p-1", 7)).unwrap();
    let auth = auth1();
    let r = relay.post(&[STRUCTURED, ("authorization", &auth)], &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.statuses(), ["accepted"]);
    assert_eq!(relay.stream_ids(), ["p-1-7"]);
}

#[test]
fn a_binary_event_with_a_non_utf8_body_is_stored_as_data_base64() {
    let relay = Relay::start();
    let auth = auth1();
    let body = [0xff_u8, 0xd8, 0xff, 0xe0, 0x00, 0x10];
    let r = relay.post(
        &[
            ("authorization", &auth),
            ("content-type", "image/jpeg"),
            ("ce-specversion", "1.0"),
            ("ce-id", "snap-1"),
            ("ce-type", "pigeon.file.snapshot"),
            ("ce-source", "/gateways/pi-1/ftp"),
            ("ce-sequence", "00000000000000000001"),
            ("ce-producerid", "p-1"),
        ],
        &body,
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.statuses(), ["accepted"]);
    let stored = relay.stream_events();
    assert_eq!(stored[0]["id"], "snap-1");
    assert_eq!(stored[0]["datacontenttype"], "image/jpeg");
    assert_eq!(stored[0]["data_base64"], "/9j/4AAQ");
    assert!(stored[0].get("data").is_none());
}

#[test]
fn malformed_json_is_a_400_with_an_error_body() {
    let relay = Relay::start();
    let auth = auth1();
    let r = relay.post(&[BATCH, ("authorization", &auth)], b"[{\"id\": ");
    assert_eq!(r.status, 400);
    let err = r.json()["error"].as_str().unwrap().to_owned();
    assert!(err.contains("not valid JSON"), "{err}");
    let r = relay.post(&[BATCH, ("authorization", &auth)], b"{\"id\": 1}");
    assert_eq!(r.status, 400);
    assert!(relay.stream_events().is_empty());
}

#[test]
fn one_bad_event_does_not_sink_its_batch() {
    let relay = Relay::start();
    let mut bad = event("p-1", 2);
    bad.as_object_mut().unwrap().remove("source");
    let r = relay.post_batch(&[event("p-1", 1), bad, event("p-1", 3)]);
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(r.statuses(), ["accepted", "rejected", "accepted"]);
    assert_eq!(body["results"][1]["id"], "p-1-2");
    let reason = body["results"][1]["reason"].as_str().unwrap();
    assert!(reason.contains("source"), "{reason}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(relay.stream_ids(), ["p-1-1", "p-1-3"]);
}

#[test]
fn an_oversized_body_is_413() {
    let relay = Relay::start_with("", "[limits]\nmax_request_bytes = \"64KiB\"\n");
    let events: Vec<Value> = (0..2000).map(|s| event("p-1", s)).collect();
    let body = serde_json::to_vec(&events).unwrap();
    assert!(body.len() > 64 * 1024);
    let auth = auth1();
    let r = relay.post(&[BATCH, ("authorization", &auth)], &body);
    assert_eq!(r.status, 413);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("max_request_bytes")
    );
    assert!(relay.stream_events().is_empty());
}

#[test]
fn a_gzip_bomb_is_413() {
    let relay = Relay::start_with("", "[limits]\nmax_decompressed_bytes = \"4MiB\"\n");
    // 64 MiB of spaces: valid JSON whitespace, and under 100 KiB compressed.
    let mut plain = vec![b' '; 64 << 20];
    plain[0] = b'[';
    *plain.last_mut().unwrap() = b']';
    let bomb = gzip(&plain);
    assert!(bomb.len() < 1 << 20);
    let auth = auth1();
    let r = relay.post(
        &[
            BATCH,
            ("content-encoding", "gzip"),
            ("authorization", &auth),
        ],
        &bomb,
    );
    assert_eq!(r.status, 413);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("max_decompressed_bytes")
    );
}

#[test]
fn an_unsupported_encoding_or_content_type_is_415() {
    let relay = Relay::start();
    let auth = auth1();
    let r = relay.post(
        &[BATCH, ("content-encoding", "br"), ("authorization", &auth)],
        b"[]",
    );
    assert_eq!(r.status, 415);
    let r = relay.post(
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        b"[]",
    );
    assert_eq!(r.status, 415);
}

#[test]
fn a_missing_or_wrong_token_is_401_and_nothing_is_written() {
    let relay = Relay::start();
    let body = serde_json::to_vec(&[event("p-1", 1)]).unwrap();
    let r = relay.post(&[BATCH], &body);
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    assert!(r.json()["error"].as_str().unwrap().contains("missing"));

    let r = relay.post(&[BATCH, ("authorization", "Bearer not-the-token")], &body);
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );

    // pi-2's token (configured as token_sha256) is pi-2's, not pi-1's: its events are
    // authenticated but spoofed.
    let auth2 = format!("Bearer {TOKEN_2}");
    let r = relay.post(&[BATCH, ("authorization", &auth2)], &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.statuses(), ["rejected"]);
    assert!(relay.stream_events().is_empty());
}

#[test]
fn an_event_from_another_gateways_source_is_rejected() {
    let relay = Relay::start();
    let mut spoofed = event("p-1", 2);
    spoofed["source"] = json!("/gateways/pi-2/mqtt");
    let r = relay.post_batch(&[event("p-1", 1), spoofed]);
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(r.statuses(), ["accepted", "rejected"]);
    assert_eq!(
        body["results"][1]["reason"],
        "source /gateways/pi-2/mqtt does not belong to gateway pi-1"
    );
    assert_eq!(relay.stream_ids(), ["p-1-1"]);
}

#[test]
fn events_without_sequence_or_producerid_are_rejected() {
    let relay = Relay::start();
    let mut no_seq = event("p-1", 1);
    no_seq.as_object_mut().unwrap().remove("sequence");
    let mut no_producer = event("p-1", 2);
    no_producer.as_object_mut().unwrap().remove("producerid");
    let mut bad_seq = event("p-1", 3);
    bad_seq["sequence"] = json!("three");
    let r = relay.post_batch(&[no_seq, no_producer, bad_seq, event("p-1", 4)]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.statuses(),
        ["rejected", "rejected", "rejected", "accepted"]
    );
    let body = r.json();
    let reasons: Vec<&str> = (0..3)
        .map(|i| body["results"][i]["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[0].contains("'sequence'"), "{}", reasons[0]);
    assert!(reasons[1].contains("'producerid'"), "{}", reasons[1]);
    assert!(reasons[2].contains("'sequence'"), "{}", reasons[2]);
    assert_eq!(relay.stream_ids(), ["p-1-4"]);
}

#[test]
fn a_resent_batch_is_all_duplicate_also_after_sigkill_and_restart_with_a_torn_line() {
    // The checkpoint is written only at startup here, so after SIGKILL everything must
    // come back from the tail scan of the stream files.
    let mut relay = Relay::start_with("", "[sink]\ncheckpoint_interval = \"1h\"\n");
    let batch: Vec<Value> = (1..=10).map(|s| event("p-1", s)).collect();
    assert_eq!(relay.post_batch(&batch).statuses(), ["accepted"; 10]);
    assert_eq!(relay.post_batch(&batch).statuses(), ["duplicate"; 10]);

    let more: Vec<Value> = (11..=20).map(|s| event("p-1", s)).collect();
    assert_eq!(relay.post_batch(&more).statuses(), ["accepted"; 10]);
    relay.kill();
    // As if the relay had died in the middle of writing event 21 (never acknowledged).
    let file = stream_files(&relay.data_dir()).pop().unwrap();
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(
        &mut torn,
        b"{\"specversion\":\"1.0\",\"id\":\"p-1-21\",\"ty",
    )
    .unwrap();
    drop(torn);
    relay.spawn();

    assert_eq!(relay.post_batch(&batch).statuses(), ["duplicate"; 10]);
    assert_eq!(relay.post_batch(&more).statuses(), ["duplicate"; 10]);
    let mixed = vec![event("p-1", 20), event("p-1", 21)];
    assert_eq!(
        relay.post_batch(&mixed).statuses(),
        ["duplicate", "accepted"]
    );

    assert!(
        relay.log().contains("lines_scanned=20"),
        "the restart did not recover by reading the stream:\n{}",
        relay.log()
    );
    let ids = relay.stream_ids();
    assert_eq!(ids.len(), 21, "each event exactly once: {ids:?}");
    let expected: Vec<String> = (1..=21).map(|s| format!("p-1-{s}")).collect();
    assert_eq!(ids, expected);
}

#[test]
fn duplicates_within_one_batch_are_written_once() {
    let relay = Relay::start();
    let r = relay.post_batch(&[event("p-1", 1), event("p-1", 2), event("p-1", 1)]);
    assert_eq!(r.statuses(), ["accepted", "accepted", "duplicate"]);
    assert_eq!(relay.stream_ids(), ["p-1-1", "p-1-2"]);
}

#[test]
fn concurrent_requests_with_the_same_events_write_each_once() {
    let relay = Relay::start();
    let batch: Vec<Value> = (1..=10).map(|s| event("p-1", s)).collect();
    let accepted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let r = relay.post_batch(&batch);
                    assert_eq!(r.status, 200);
                    r.statuses().iter().filter(|s| *s == "accepted").count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(accepted, 10);
    assert_eq!(relay.stream_ids().len(), 10);
}

#[test]
fn settled_below_makes_older_sequences_duplicates() {
    let relay = Relay::start();
    // Sequence 5 was never delivered (say, dead-lettered at the gateway), but the
    // gateway settles everything below 10.
    let r = relay.post_batch_with(
        &[event("p-1", 10)],
        &[
            ("pigeon-settled-below", "10"),
            ("pigeon-producer-id", "p-1"),
        ],
    );
    assert_eq!(r.statuses(), ["accepted"]);
    let r = relay.post_batch(&[event("p-1", 5), event("p-1", 11)]);
    assert_eq!(r.statuses(), ["duplicate", "accepted"]);
    // Another producer is unaffected.
    let r = relay.post_batch(&[event("p-2", 5)]);
    assert_eq!(r.statuses(), ["accepted"]);
    assert_eq!(relay.stream_ids(), ["p-1-10", "p-1-11", "p-2-5"]);
    // A malformed promise is a 400.
    let r = relay.post_batch_with(
        &[event("p-1", 12)],
        &[
            ("pigeon-settled-below", "ten"),
            ("pigeon-producer-id", "p-1"),
        ],
    );
    assert_eq!(r.status, 400);
}

#[test]
fn an_event_over_max_event_bytes_is_rejected() {
    let relay = Relay::start_with("", "[limits]\nmax_event_bytes = \"1KiB\"\n");
    let mut big = event("p-1", 1);
    big["data"] = json!("x".repeat(2000));
    let r = relay.post_batch(&[big, event("p-1", 2)]);
    assert_eq!(r.statuses(), ["rejected", "accepted"]);
    assert!(
        r.json()["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_event_bytes")
    );
}

#[test]
fn unauthenticated_ingest_when_allowed_takes_the_gateway_from_the_source() {
    let relay = Relay::start_with("allow_unauthenticated = true", "");
    let mut other = event("p-9", 1);
    other["source"] = json!("/gateways/site-9/mqtt");
    let mut nowhere = event("p-9", 2);
    nowhere["source"] = json!("urn:x");
    let body = serde_json::to_vec(&[other, nowhere]).unwrap();
    let r = relay.post(&[BATCH], &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.statuses(), ["accepted", "rejected"]);
    let files = stream_files(&relay.data_dir());
    assert!(
        files[0].to_string_lossy().contains("/stream/site-9/"),
        "{files:?}"
    );
    // A wrong token is still refused.
    let r = relay.post(&[BATCH, ("authorization", "Bearer wrong")], &body);
    assert_eq!(r.status, 401);
}

#[test]
fn health_and_metrics_endpoints() {
    let relay = Relay::start();
    assert_eq!(request(relay.port, "GET", "/live", &[], b"").status, 200);
    assert_eq!(request(relay.port, "GET", "/ready", &[], b"").status, 200);
    relay.post_batch(&[event("p-1", 1), event("p-1", 1)]);
    relay.post(&[BATCH], b"[]");
    let r = request(relay.port, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    for line in [
        "pigeon_relay_ingest_requests_total{code=\"200\"} 1",
        "pigeon_relay_ingest_requests_total{code=\"401\"} 1",
        "pigeon_relay_ingest_events_total{result=\"accepted\"} 1",
        "pigeon_relay_ingest_events_total{result=\"duplicate\"} 1",
        "pigeon_relay_sink_write_seconds_count 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains("pigeon_relay_stream_bytes_written_total 0\n"));
}

#[test]
fn sigterm_exits_0_after_writing_the_checkpoint() {
    let mut relay = Relay::start();
    relay.post_batch(&[event("p-1", 1)]);
    let status = relay.terminate();
    assert_eq!(status.code(), Some(0), "{}", relay.log());
    let cp: Value =
        serde_json::from_slice(&std::fs::read(relay.data_dir().join("state/dedup.json")).unwrap())
            .unwrap();
    assert_eq!(cp["producers"][0]["gateway"], "pi-1");
    assert_eq!(cp["producers"][0]["floor"], 0);
    assert_eq!(cp["producers"][0]["ranges"], json!([[1, 1]]));
}

#[test]
fn over_max_concurrent_requests_is_503_with_retry_after_at_once() {
    let relay = Relay::start_with("", "[limits]\nmax_concurrent_requests = 1\n");
    let body = serde_json::to_vec(&[event("p-1", 1)]).unwrap();
    let auth = auth1();
    let headers = [BATCH, ("authorization", auth.as_str())];
    // The first request holds the only slot while its body has not arrived.
    let mut slow = RawConn::connect(relay.port);
    slow.send_head(relay.port, &headers, body.len());
    slow.send(&body[..5]);
    relay.wait_in_flight(1);

    let r = relay.post(&headers, &body);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json()["error"].as_str().unwrap().contains("concurrent"));

    slow.send(&body[5..]);
    let r = slow.response();
    assert_eq!(r.status, 200);
    assert_eq!(r.statuses(), ["accepted"]);
    // The slot is free again.
    assert_eq!(relay.post_batch(&[event("p-1", 2)]).status, 200);
}

#[test]
fn a_sink_that_cannot_write_is_503_and_not_ready_until_it_recovers() {
    let relay = Relay::start();
    // A plain file where pi-1's stream directory must go.
    let obstacle = relay.data_dir().join("stream").join("pi-1");
    std::fs::write(&obstacle, b"").unwrap();
    let r = relay.post_batch(&[event("p-1", 1)]);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    assert!(r.json()["error"].as_str().unwrap().contains("cannot write"));
    assert_eq!(request(relay.port, "GET", "/ready", &[], b"").status, 503);
    assert_eq!(request(relay.port, "GET", "/live", &[], b"").status, 200);

    std::fs::remove_file(&obstacle).unwrap();
    // Not a duplicate: the failed write was forgotten.
    assert_eq!(
        relay.post_batch(&[event("p-1", 1)]).statuses(),
        ["accepted"]
    );
    assert_eq!(request(relay.port, "GET", "/ready", &[], b"").status, 200);
    assert_eq!(relay.stream_ids(), ["p-1-1"]);
}

#[test]
fn sigterm_lets_an_in_flight_request_finish() {
    let mut relay = Relay::start();
    let body = serde_json::to_vec(&[event("p-1", 1)]).unwrap();
    let auth = auth1();
    let mut conn = RawConn::connect(relay.port);
    conn.send_head(relay.port, &[BATCH, ("authorization", &auth)], body.len());
    conn.send(&body[..10]);
    relay.wait_in_flight(1);

    let port = relay.port;
    let waiter = std::thread::spawn(move || {
        // Once shutting down, the relay stops accepting connections...
        let start = std::time::Instant::now();
        let mut refused = false;
        while !refused && start.elapsed() < std::time::Duration::from_secs(10) {
            refused = try_request(port, "GET", "/live", &[], b"").is_err();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // ...but still finishes the request it is reading.
        conn.send(&body[10..]);
        (refused, conn.response())
    });
    let status = relay.terminate();
    let (refused, r) = waiter.join().unwrap();
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.statuses(), ["accepted"]);
    assert!(
        refused,
        "the relay still accepted connections 10 s after SIGTERM"
    );
    assert_eq!(status.code(), Some(0), "{}", relay.log());
    assert_eq!(relay.stream_ids(), ["p-1-1"]);
}

/// Issue 24.4: a request with both Content-Length and chunked encoding is framed by the
/// chunks alone (what hyper's parser does: it drops Content-Length), and its connection is
/// closed after the answer, as RFC 9112 (section 6.3) requires, so nothing a proxy in
/// front framed differently can be read as a second request on it.
#[test]
fn issue_24_content_length_with_chunked_encoding_closes_the_connection() {
    let relay = Relay::start();
    let body = serde_json::to_vec(&[event("p-1", 1)]).unwrap();
    let mut c = RawConn::connect(relay.port);
    // Keep-alive (no `Connection: close`): only the framing conflict may close it.
    c.send(
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {}\r\nAuthorization: {}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            BATCH.1,
            auth1(),
            body.len()
        )
        .as_bytes(),
    );
    c.send(&body);
    c.send(b"\r\n0\r\n\r\n");
    // Reads until the relay closes the connection; a kept-alive one would time out.
    let r = c.response();
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.statuses(), ["accepted"]);
    assert_eq!(relay.stream_events().len(), 1);
}

/// Issue 24.4: a request that is not HTTP/1.1 at all is answered by hyper itself (400, no
/// body, connection closed) before the relay sees it; the relay counts it and its
/// debug log names the peer and the fault. The other gateways are served as before.
#[test]
fn issue_24_requests_that_are_not_http_are_counted_and_logged() {
    let relay = Relay::start();
    let cases: [(&[u8], u16); 3] = [
        (b"GET / HTTP/1.1\r\nA header without a colon\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            400,
        ),
    ];
    for (request, status) in cases {
        let mut c = RawConn::connect(relay.port);
        c.send(request);
        let r = c.response();
        assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(request));
    }
    relay.wait_metric("pigeon_relay_malformed_requests_total", |n| n == 3);
    let log = relay.log();
    assert!(
        log.contains("Refused a request that is not valid HTTP/1.1."),
        "{log}"
    );
    assert_eq!(relay.post_batch(&[event("p-1", 1)]).status, 200);
}

/// Issue 24.4: two Authorization headers are refused by name, even when one is valid.
#[test]
fn issue_24_two_authorization_headers_are_refused() {
    let relay = Relay::start();
    let body = serde_json::to_vec(&[event("p-1", 1)]).unwrap();
    let auth = auth1();
    let r = relay.post(
        &[
            BATCH,
            ("authorization", "Bearer not-a-token"),
            ("authorization", auth.as_str()),
        ],
        &body,
    );
    assert_eq!(r.status, 401);
    let e = r.json()["error"].as_str().unwrap().to_owned();
    assert!(e.contains("more than one Authorization header"), "{e}");
    assert!(relay.stream_events().is_empty());
}

/// Issue 24.3: events against the CloudEvents specification are rejected one by one, each
/// with a reason that names the attribute; the good event beside them is stored.
#[test]
fn issue_24_events_against_the_spec_are_rejected_naming_the_attribute() {
    let relay = Relay::start();
    let with = |k: &str, v: Value| {
        let mut e = event("p-1", 1);
        e[k] = v;
        e
    };
    let bad = [
        (with("MyExt", "x".into()), "attribute name \"MyExt\""),
        (with("id", "".into()), "attribute \"id\" must not be empty"),
        (
            with("type", "".into()),
            "attribute \"type\" must not be empty",
        ),
        (
            with("id", "a\u{7}b".into()),
            "attribute \"id\" has the control character",
        ),
        (
            with("source", "/gateways/pi-1/my input\n".into()),
            "attribute \"source\"",
        ),
        (
            with("datacontenttype", "not a media type".into()),
            "attribute \"datacontenttype\"",
        ),
        (
            with("source", "/gateways/pi-1/../pi-2/mqtt".into()),
            "a '..' segment",
        ),
        (with("ext", 1.5.into()), "extension attribute \"ext\""),
    ];
    let mut events: Vec<Value> = bad.iter().map(|(e, _)| e.clone()).collect();
    events.push(event("p-1", 2));
    let r = relay.post_batch(&events);
    assert_eq!(r.status, 200);
    let results = r.json()["results"].as_array().unwrap().clone();
    for ((_, reason), result) in bad.iter().zip(&results) {
        assert_eq!(result["status"], "rejected", "{result}");
        let got = result["reason"].as_str().unwrap();
        assert!(got.contains(reason), "{got:?} should name {reason:?}");
    }
    assert_eq!(results.last().unwrap()["status"], "accepted");
    assert_eq!(relay.stream_ids(), ["p-1-2"]);

    // Binary mode: a `ce-:` header would be an attribute with an empty name.
    let auth = auth1();
    let r = relay.post(
        &[
            ("authorization", auth.as_str()),
            ("ce-specversion", "1.0"),
            ("ce-id", "b-1"),
            ("ce-type", "t"),
            ("ce-source", "/gateways/pi-1/mqtt"),
            ("ce-sequence", "3"),
            ("ce-producerid", "p-1"),
            ("ce-", "x"),
            ("content-type", "text/plain"),
        ],
        b"hello",
    );
    assert_eq!(r.statuses(), ["rejected"]);
    assert!(
        r.json()["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("empty name"),
        "{}",
        r.json()
    );
}
