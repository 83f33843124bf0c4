//! Issue 24.1, "one gateway can lock all others out": black-box tests of fair admission
//! and body deadlines against the real binary. A gateway with a valid token that opens
//! hundreds of requests and never finishes their bodies gets its share
//! (`limits.max_requests_per_gateway`, `limits.max_buffered_bytes_per_gateway`) and 429
//! beyond it; every other gateway keeps being served; stalled bodies are cut off by
//! `limits.body_idle_timeout` and `limits.body_timeout`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BATCH: (&str, &str) = ("content-type", "application/cloudevents-batch+json");

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A valid event of pi-2's.
fn event_of_pi2(seq: u64) -> Value {
    let mut e = event("p-2", seq);
    e["source"] = "/gateways/pi-2/mqtt".into();
    e
}

fn post_as_pi2(relay: &Relay, seq: u64) -> Response {
    let body = serde_json::to_vec(&[event_of_pi2(seq)]).unwrap();
    let auth = bearer(TOKEN_2);
    relay.post(&[BATCH, ("authorization", auth.as_str())], &body)
}

/// Opens a request of pi-1 that announces `len` body bytes and sends one.
fn stalled_ingest(relay: &Relay, len: usize) -> RawConn {
    let auth = bearer(TOKEN_1);
    let mut c = RawConn::connect(relay.port);
    c.send_head(relay.port, &[BATCH, ("authorization", auth.as_str())], len);
    c.send(b"[");
    c
}

/// Opens a chunked request of pi-1 and sends `chunk` as one chunk; `last` ends the body.
fn chunked_ingest(relay: &Relay, chunk: &[u8], last: bool) -> RawConn {
    let auth = bearer(TOKEN_1);
    let mut c = RawConn::connect(relay.port);
    c.send_request_head(
        relay.port,
        "POST",
        "/v1/events",
        &[
            BATCH,
            ("authorization", auth.as_str()),
            ("transfer-encoding", "chunked"),
        ],
    );
    c.send(format!("{:x}\r\n", chunk.len()).as_bytes());
    c.send(chunk);
    c.send(if last { &b"\r\n0\r\n\r\n"[..] } else { b"\r\n" });
    c
}

fn refused(limit: &str) -> String {
    format!("pigeon_relay_admission_refused_total{{limit=\"{limit}\"}}")
}

#[test]
fn issue_24_a_gateway_holding_hundreds_of_stalled_requests_does_not_lock_out_another() {
    // The default limits (256 requests at once, 8 per gateway), but a short idle timeout
    // so that the test ends sooner.
    let relay = Relay::start_with("", "[limits]\nbody_idle_timeout = \"4s\"\n");
    let stalled: Vec<RawConn> = (0..300).map(|_| stalled_ingest(&relay, 4096)).collect();
    // pi-1 gets its 8; the other 292 are refused at once.
    relay.wait_metric(&refused("requests_per_gateway"), |n| n == 292);
    // Meanwhile pi-2 delivers normally, and never sees a 503 (nor a 429).
    for seq in 1..=50 {
        let r = post_as_pi2(&relay, seq);
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.statuses(), ["accepted"]);
    }
    // The refused ones are answered once what they send is drained (5 s at most); the 8
    // held ones when their bodies stall out.
    let answers: Vec<Response> = std::thread::scope(|s| {
        let readers: Vec<_> = stalled
            .into_iter()
            .map(|c| s.spawn(move || c.response()))
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let count = |status| answers.iter().filter(|r| r.status == status).count();
    assert_eq!((count(429), count(408)), (292, 8));
    for r in answers.iter().filter(|r| r.status == 429) {
        assert_eq!(r.header("retry-after"), Some("1"));
        let e = r.json()["error"].as_str().unwrap().to_owned();
        assert!(
            e.contains("gateway pi-1 has 8 requests in progress")
                && e.contains("limits.max_requests_per_gateway"),
            "{e}"
        );
    }
    assert_eq!(relay.metric(&refused("requests")), 0);
    assert_eq!(
        relay.metric("pigeon_relay_ingest_requests_total{code=\"503\"}"),
        0
    );
    assert_eq!(
        relay.metric("pigeon_relay_ingest_requests_total{code=\"429\"}"),
        292
    );
    assert_eq!(relay.metric("pigeon_relay_buffered_body_bytes"), 0);
}

#[test]
fn issue_24_one_gateway_cannot_hold_more_than_its_share_of_body_memory() {
    let relay = Relay::start();
    // 15 MiB bodies: two fit in pi-1's 32 MiB share, the third does not.
    let len = 15 << 20;
    let _a = stalled_ingest(&relay, len);
    let _b = stalled_ingest(&relay, len);
    relay.wait_in_flight(2);
    assert_eq!(
        relay.metric("pigeon_relay_buffered_body_bytes"),
        2 * len as u64
    );
    let third = stalled_ingest(&relay, len);
    let r = third.response();
    assert_eq!(r.status, 429);
    let e = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        e.contains("limits.max_buffered_bytes_per_gateway") && e.contains("gateway pi-1"),
        "{e}"
    );
    assert_eq!(relay.metric(&refused("buffered_bytes_per_gateway")), 1);
    // pi-2's share is its own.
    let auth = bearer(TOKEN_2);
    let mut big = vec![event_of_pi2(1)];
    big[0]["data"] = serde_json::json!({"pad": "x".repeat(900_000)});
    let body = serde_json::to_vec(&big).unwrap();
    let r = relay.post(&[BATCH, ("authorization", auth.as_str())], &body);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.statuses(), ["accepted"]);
}

#[test]
fn issue_24_a_chunked_body_is_counted_as_it_arrives() {
    let relay = Relay::start_with(
        "",
        "[limits]\nmax_request_bytes = \"1MiB\"\nmax_event_bytes = \"512KiB\"\nmax_buffered_bytes_per_gateway = \"2MiB\"\n",
    );
    // Two chunked bodies of 900 KiB each fit; the third crosses pi-1's 2 MiB as it arrives.
    let chunk = vec![b' '; 900 << 10];
    let open: Vec<RawConn> = (0..2)
        .map(|_| chunked_ingest(&relay, &chunk, false))
        .collect();
    relay.wait_metric("pigeon_relay_buffered_body_bytes", |n| {
        n == 2 * chunk.len() as u64
    });
    let r = chunked_ingest(&relay, &chunk, true).response();
    assert_eq!(r.status, 429, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("limits.max_buffered_bytes_per_gateway")
    );
    // What the refused request had reserved is given back at once.
    assert_eq!(
        relay.metric("pigeon_relay_buffered_body_bytes"),
        2 * chunk.len() as u64
    );
    drop(open);
    relay.wait_metric("pigeon_relay_buffered_body_bytes", |n| n == 0);
}

#[test]
fn issue_24_a_stalled_body_is_408_after_the_idle_timeout_and_frees_its_slot() {
    let relay = Relay::start_with(
        "",
        "[limits]\nmax_requests_per_gateway = 1\nbody_idle_timeout = \"1s\"\n",
    );
    let started = Instant::now();
    let c = stalled_ingest(&relay, 4096);
    relay.wait_in_flight(1);
    // pi-1's one slot is taken.
    let r = relay.post_batch(&[event("p-1", 1)]);
    assert_eq!(r.status, 429);
    let r = c.response();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(r.status, 408);
    assert_eq!(r.header("connection"), Some("close"));
    let e = r.json()["error"].as_str().unwrap().to_owned();
    assert!(e.contains("limits.body_idle_timeout"), "{e}");
    assert_eq!(
        relay.metric("pigeon_relay_request_body_timeouts_total{deadline=\"idle\"}"),
        1
    );
    assert_eq!(
        relay.metric("pigeon_relay_ingest_requests_total{code=\"408\"}"),
        1
    );
    // The slot is free again.
    let r = relay.post_batch(&[event("p-1", 1)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.statuses(), ["accepted"]);
}

#[test]
fn issue_24_a_trickling_body_is_408_after_the_total_timeout() {
    let relay = Relay::start_with(
        "",
        "[limits]\nbody_idle_timeout = \"1s\"\nbody_timeout = \"2s\"\n",
    );
    let mut c = stalled_ingest(&relay, 4096);
    // One byte every 300 ms: never idle for 1 s, never done.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2600) {
        std::thread::sleep(Duration::from_millis(300));
        if c.try_send(b" ").is_err() {
            break;
        }
    }
    let r = c.response();
    assert_eq!(r.status, 408);
    let e = r.json()["error"].as_str().unwrap().to_owned();
    assert!(e.contains("limits.body_timeout"), "{e}");
    assert_eq!(
        relay.metric("pigeon_relay_request_body_timeouts_total{deadline=\"total\"}"),
        1
    );
}

#[test]
fn issue_24_stalled_upload_creates_count_against_the_same_share() {
    let relay = Relay::start_with("", "[limits]\nmax_requests_per_gateway = 2\n");
    let auth = bearer(TOKEN_1);
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = RawConn::connect(relay.port);
        c.send_request_head(
            relay.port,
            "POST",
            "/v1/uploads",
            &[
                ("content-type", "application/json"),
                ("authorization", auth.as_str()),
                ("content-length", "1000"),
            ],
        );
        c.send(b"{");
        open.push(c);
    }
    relay.wait_metric("pigeon_relay_buffered_body_bytes", |n| n == 2000);
    // pi-1's share is taken by its stalled creates: its batch is refused...
    let r = relay.post_batch(&[event("p-1", 1)]);
    assert_eq!(r.status, 429);
    // ...pi-2's is not.
    assert_eq!(post_as_pi2(&relay, 1).status, 200);
    assert_eq!(relay.metric(&refused("requests_per_gateway")), 1);
}

/// Issue 24, found after the list: request headers sent a byte at a time held a
/// connection for ever (axum::serve gives hyper no timer). Now the connection is closed
/// `limits.header_timeout` after the relay began waiting for the headers, however
/// steadily they trickle.
#[test]
fn issue_24_request_headers_that_trickle_are_cut_off() {
    use std::io::{Read, Write};
    let relay = Relay::start_with("", "[limits]\nheader_timeout = \"2s\"\n");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        let head = b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
        if writer.write_all(head).is_err() {
            return;
        }
        // One byte every 200 ms, for at most 15 s.
        while started.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(200));
            if writer.write_all(b"a").is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let read = conn.read_to_end(&mut answer);
    let took = started.elapsed();
    assert!(
        read.is_ok() || took < Duration::from_secs(10),
        "the relay did not close the connection: {read:?} after {took:?}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "closed after {took:?}, expected about 2 s"
    );
    trickle.join().unwrap();
    // Requests that send their headers at once are served as before.
    assert_eq!(relay.post_batch(&[event("p-1", 1)]).status, 200);
}

/// Issue 24, found after the list: connections had no cap, so a flood of them (each held
/// up to `limits.header_timeout`) ran the relay into its open-files limit, where every
/// accept fails, a gateway's included. With `limits.max_connections` taken, new
/// connections wait in the listen queue until one closes, and are then served.
#[test]
fn issue_24_connections_beyond_max_connections_wait_for_a_slot() {
    let relay = Relay::start_with(
        "",
        "[limits]\nmax_concurrent_requests = 4\nmax_requests_per_gateway = 4\nmax_connections = 4\nheader_timeout = \"120s\"\n",
    );
    // Three idle connections; the metrics request is the fourth.
    let mut idle: Vec<RawConn> = (0..3).map(|_| RawConn::connect(relay.port)).collect();
    relay.wait_metric("pigeon_relay_open_connections", |n| n == 4);
    idle.push(RawConn::connect(relay.port));
    // Every slot is taken: a gateway's request waits in the listen queue...
    let port = relay.port;
    let waiting = std::thread::spawn(move || {
        let body = serde_json::to_vec(&[event("p-1", 1)]).unwrap();
        let auth = bearer(TOKEN_1);
        request(
            port,
            "POST",
            "/v1/events",
            &[BATCH, ("authorization", auth.as_str())],
            &body,
        )
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(!waiting.is_finished(), "a fifth connection was served");
    // ...and is served as soon as one closes.
    drop(idle.pop());
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.statuses(), ["accepted"]);
    drop(idle);
    assert!(relay.metric("pigeon_relay_connection_limit_reached_total") >= 1);
}
