//! Black-box tests of the resumable upload endpoint: the real binary, a temp data dir,
//! loopback, requests written by hand (including bodies that break off).

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::{Value, json};

const OCTETS: (&str, &str) = ("content-type", "application/offset+octet-stream");
const JSON: (&str, &str) = ("content-type", "application/json");
const IN_PROGRESS: &str = "pigeon_relay_uploads_in_progress";
const RECEIVED: &str = "pigeon_relay_upload_bytes_received_total";
const ACCEPTED: &str = "pigeon_relay_uploads_completed_total{result=\"accepted\"}";

fn auth1() -> String {
    format!("Bearer {TOKEN_1}")
}

fn auth2() -> String {
    format!("Bearer {TOKEN_2}")
}

/// Bytes that are not all alike (xorshift), so an offset error shows in the digest.
fn file_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A camera image event of pi-1, as pigeon-gateway sends it.
fn file_event(seq: u64, size: usize) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("img-{seq}"),
        "type": "io.pigeon.camera.image",
        "source": "/gateways/pi-1/files/cameras",
        "subject": "cam-3",
        "time": "2026-12-01T21:04:05.123Z",
        "datacontenttype": "application/json",
        "data": {"filename": "snap 01.jpg", "path": "cam-3/snap 01.jpg", "size": size,
                 "contenttype": "image/jpeg", "modified": "2026-12-01T21:04:04Z"},
        "sequence": pigeon_shared::ce::format_sequence(seq),
        "producerid": "p-1",
    })
}

/// The upload id of pi-1's (`producer`, `seq`), as `docs/data-layout.md` defines it.
fn upload_id(producer: &str, seq: u64) -> String {
    let mut id = sha256_of(format!("pigeon-upload\0pi-1\0{producer}\0{seq}").as_bytes());
    id.truncate(32);
    id
}

/// The object key of `file_event(seq, _)` with extension jpg.
fn key(seq: u64) -> String {
    let upload = upload_id("p-1", seq);
    format!("pi-1/files/cameras/2026-12-01/21/img-{seq}.{upload}.jpg")
}

fn create_body(event: &Value, bytes: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "event": event,
        "length": bytes.len(),
        "sha256": sha256_of(bytes),
        "extension": "jpg",
    }))
    .unwrap()
}

fn create_with(relay: &Relay, auth: &str, body: &[u8]) -> Response {
    request(
        relay.port,
        "POST",
        "/v1/uploads",
        &[JSON, ("authorization", auth)],
        body,
    )
}

fn create(relay: &Relay, seq: u64, bytes: &[u8]) -> Response {
    create_with(
        relay,
        &auth1(),
        &create_body(&file_event(seq, bytes.len()), bytes),
    )
}

/// Creates and returns the location, checking the answer is a fresh upload.
fn created(relay: &Relay, seq: u64, bytes: &[u8]) -> String {
    let r = create(relay, seq, bytes);
    assert_eq!(r.status, 201, "{}", body_text(&r));
    let v = r.json();
    assert_eq!(v["offset"], 0);
    assert_eq!(v["length"], bytes.len());
    let location = v["location"].as_str().unwrap().to_owned();
    assert_eq!(r.header("location"), Some(location.as_str()));
    assert_eq!(r.header("upload-offset"), Some("0"));
    assert_eq!(
        r.header("upload-length"),
        Some(bytes.len().to_string().as_str())
    );
    location
}

fn patch_with(relay: &Relay, auth: &str, location: &str, offset: u64, body: &[u8]) -> Response {
    let offset = offset.to_string();
    request(
        relay.port,
        "PATCH",
        location,
        &[
            OCTETS,
            ("authorization", auth),
            ("upload-offset", offset.as_str()),
        ],
        body,
    )
}

fn patch(relay: &Relay, location: &str, offset: u64, body: &[u8]) -> Response {
    patch_with(relay, &auth1(), location, offset, body)
}

fn head(relay: &Relay, auth: &str, location: &str) -> Response {
    request(
        relay.port,
        "HEAD",
        location,
        &[("authorization", auth)],
        b"",
    )
}

/// Starts a PATCH by hand announcing `total` bytes, and sends `first` of them.
fn start_patch(relay: &Relay, location: &str, offset: u64, total: usize, first: &[u8]) -> RawConn {
    let mut conn = RawConn::connect(relay.port);
    let (auth, offset, total) = (auth1(), offset.to_string(), total.to_string());
    conn.send_request_head(
        relay.port,
        "PATCH",
        location,
        &[
            OCTETS,
            ("authorization", auth.as_str()),
            ("upload-offset", offset.as_str()),
            ("content-length", total.as_str()),
        ],
    );
    conn.send(first);
    conn
}

fn body_text(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn error_of(r: &Response) -> String {
    r.json()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error sentence in {}", body_text(r)))
        .to_owned()
}

fn assert_done(r: &Response, status: &str) -> Value {
    assert_eq!(r.status, 200, "{}", body_text(r));
    let v = r.json();
    assert_eq!(v["result"]["status"], status, "{v}");
    assert!(v.get("location").is_none(), "{v}");
    v
}

fn object_path(relay: &Relay, key: &str) -> PathBuf {
    relay.data_dir().join("objects").join(key)
}

/// Every file left under `uploads/` (manifests and parts).
fn upload_files(relay: &Relay) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for gw in std::fs::read_dir(relay.data_dir().join("uploads")).unwrap() {
        let gw = gw.unwrap().path();
        if gw.is_dir() {
            out.extend(std::fs::read_dir(gw).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

/// The path a `file://` URL names.
fn file_url_path(url: &str) -> PathBuf {
    let raw = url
        .strip_prefix("file://")
        .expect("a file:// URL")
        .as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = std::str::from_utf8(&raw[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8(out).unwrap())
}

#[test]
fn a_file_is_stored_at_its_key_and_its_event_published_with_a_dataref() {
    let relay = Relay::start();
    let bytes = file_bytes(300_000, 1);
    let location = created(&relay, 42, &bytes);
    assert!(location.starts_with("/v1/uploads/"), "{location}");
    let h = head(&relay, &auth1(), &location);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("upload-offset"), Some("0"));
    assert_eq!(h.header("upload-length"), Some("300000"));

    let r = patch(&relay, &location, 0, &bytes);
    let v = assert_done(&r, "accepted");
    assert_eq!(v["result"]["id"], "img-42");
    assert_eq!(v["offset"], 300_000);

    // The object, byte for byte, at the documented key.
    let object = object_path(&relay, &key(42));
    assert_eq!(std::fs::read(&object).unwrap(), bytes);
    let dataref = v["dataref"].as_str().unwrap();
    assert_eq!(file_url_path(dataref), object);

    // One stream line: the event unchanged but for its dataref.
    let stored = relay.stream_events();
    assert_eq!(stored.len(), 1, "{stored:?}");
    let line = &stored[0];
    assert_eq!(line["dataref"], dataref);
    assert_eq!(line["id"], "img-42");
    assert_eq!(line["source"], "/gateways/pi-1/files/cameras");
    assert_eq!(line["data"], file_event(42, bytes.len())["data"]);
    assert_eq!(line["sequence"], "00000000000000000042");
    assert!(
        upload_files(&relay).is_empty(),
        "{:?}",
        upload_files(&relay)
    );

    // Creating again: duplicate, without a byte sent.
    let r = create(&relay, 42, &bytes);
    let v = assert_done(&r, "duplicate");
    assert_eq!(v["dataref"], dataref);
    assert_eq!(relay.stream_events().len(), 1);
    // The finished upload is gone.
    assert_eq!(head(&relay, &auth1(), &location).status, 404);
    let r = patch(&relay, &location, 0, &bytes);
    assert_eq!(r.status, 404);
    assert!(error_of(&r).contains("no upload"), "{}", error_of(&r));

    for (sample, value) in [
        ("pigeon_relay_uploads_created_total", 1),
        (ACCEPTED, 1),
        (
            "pigeon_relay_uploads_completed_total{result=\"duplicate\"}",
            1,
        ),
        (RECEIVED, 300_000),
        ("pigeon_relay_object_bytes_written_total", 300_000),
        ("pigeon_relay_upload_digest_mismatches_total", 0),
        (IN_PROGRESS, 0),
    ] {
        assert_eq!(relay.metric(sample), value, "{sample}");
    }
}

/// Issue 24 (2a): uploads whose events share `id`, `time` and `source` but not
/// (`producerid`, `sequence`) — a dead letter sent again under a new sequence, a
/// producer reusing ids — got one object key, and the later one replaced the bytes the
/// earlier one's `dataref` already named. Each keeps its own object now.
#[test]
fn issue_24_uploads_sharing_an_event_id_and_time_keep_their_own_bytes() {
    let relay = Relay::start();
    let event = |producer: &str, seq: u64, size: usize| {
        let mut e = file_event(seq, size);
        e["id"] = json!("img-shared");
        e["producerid"] = json!(producer);
        e
    };
    let uploads = [
        ("p-1", 1, file_bytes(20_000, 241)),
        ("p-1", 2, file_bytes(30_000, 242)),
        ("p-2", 1, file_bytes(25_000, 243)),
    ];
    let mut datarefs: Vec<String> = Vec::new();
    for (producer, seq, bytes) in &uploads {
        let body = create_body(&event(producer, *seq, bytes.len()), bytes);
        let r = create_with(&relay, &auth1(), &body);
        assert_eq!(r.status, 201, "{}", body_text(&r));
        let location = r.json()["location"].as_str().unwrap().to_owned();
        let v = assert_done(&patch(&relay, &location, 0, bytes), "accepted");
        let dataref = v["dataref"].as_str().unwrap().to_owned();
        // What was published before is unchanged.
        for (earlier, (_, _, bytes)) in datarefs.iter().zip(&uploads) {
            let stored = std::fs::read(file_url_path(earlier)).unwrap();
            assert!(&stored == bytes, "{earlier} no longer holds its bytes");
            assert_ne!(&dataref, earlier);
        }
        datarefs.push(dataref);
    }
    for (dataref, (producer, seq, bytes)) in datarefs.iter().zip(&uploads) {
        assert!(&std::fs::read(file_url_path(dataref)).unwrap() == bytes);
        // The documented key: the event id, then the upload id.
        let upload = upload_id(producer, *seq);
        let key = format!("pi-1/files/cameras/2026-12-01/21/img-shared.{upload}.jpg");
        assert_eq!(file_url_path(dataref), object_path(&relay, &key));
    }
    let published: Vec<_> = relay
        .stream_events()
        .iter()
        .map(|e| e["dataref"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(published, datarefs);

    // The first sent again: duplicate, naming its own object.
    let (producer, seq, bytes) = &uploads[0];
    let body = create_body(&event(producer, *seq, bytes.len()), bytes);
    let v = assert_done(&create_with(&relay, &auth1(), &body), "duplicate");
    assert_eq!(v["dataref"], datarefs[0]);
}

/// Issue 24.2b for uploads: the create's event was parsed into a tree and written again,
/// so its data lost what a tree cannot hold. Now it is kept as the gateway's text, as an
/// ingested event's is.
#[test]
fn issue_24_an_uploads_event_data_is_stored_as_sent() {
    let relay = Relay::start();
    let bytes = file_bytes(1000, 7);
    let event = serde_json::to_string(&file_event(1, bytes.len())).unwrap();
    let data = r#"{"filename":"snap 01.jpg","size":1000,"exposure":0.12345678901234567890,"id":12345678901234567890123,"tag":"a","tag":"b"}"#;
    let event = event.replace(
        &serde_json::to_string(&file_event(1, bytes.len())["data"]).unwrap(),
        data,
    );
    assert!(event.contains(data));
    let body = format!(
        r#"{{"event":{event},"length":{},"sha256":"{}","extension":"jpg"}}"#,
        bytes.len(),
        sha256_of(&bytes)
    );
    let r = create_with(&relay, &auth1(), body.as_bytes());
    assert_eq!(r.status, 201, "{}", body_text(&r));
    let location = r.json()["location"].as_str().unwrap().to_owned();
    assert_done(&patch(&relay, &location, 0, &bytes), "accepted");
    let lines: Vec<String> = stream_files(&relay.data_dir())
        .iter()
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            text.lines().map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].ends_with(&format!(",\"data\":{data}}}")),
        "{}",
        lines[0]
    );
}

#[test]
fn a_body_that_breaks_off_is_resumed_without_sending_a_byte_twice() {
    let relay = Relay::start();
    let bytes = file_bytes(1 << 20, 2);
    let half = bytes.len() / 2;
    let location = created(&relay, 1, &bytes);

    // The connection dies half-way: announced the whole file, sent half.
    let conn = start_patch(&relay, &location, 0, bytes.len(), &bytes[..half]);
    relay.wait_metric(IN_PROGRESS, |n| n == 1);
    drop(conn);
    relay.wait_metric(IN_PROGRESS, |n| n == 0);

    // Creating again says how far the relay got: every byte that arrived.
    let r = create(&relay, 1, &bytes);
    assert_eq!(r.status, 200, "{}", body_text(&r));
    let v = r.json();
    assert_eq!(v["offset"], half);
    assert_eq!(v["location"], location);
    assert_eq!(r.header("upload-offset"), Some(half.to_string().as_str()));
    assert_eq!(
        head(&relay, &auth1(), &location).header("upload-offset"),
        Some(half.to_string().as_str())
    );

    let r = patch(&relay, &location, half as u64, &bytes[half..]);
    assert_done(&r, "accepted");
    assert_eq!(std::fs::read(object_path(&relay, &key(1))).unwrap(), bytes);
    assert_eq!(
        relay.metric(RECEIVED),
        bytes.len() as u64,
        "nothing re-sent"
    );
    assert_eq!(relay.metric("pigeon_relay_uploads_resumed_total"), 1);
    // The same process kept the hash of the first half: nothing was read back from disk.
    assert!(
        !relay.log().contains("Re-hashed"),
        "the bytes were hashed twice:\n{}",
        relay.log()
    );
    assert_eq!(relay.stream_events().len(), 1);
}

#[test]
fn a_partial_body_is_204_and_a_wrong_offset_409_with_the_relays_offset() {
    let relay = Relay::start();
    let bytes = file_bytes(1000, 3);
    let location = created(&relay, 1, &bytes);

    let r = patch(&relay, &location, 5, &bytes[5..]);
    assert_eq!(r.status, 409, "{}", body_text(&r));
    assert_eq!(r.header("upload-offset"), Some("0"));
    assert!(
        error_of(&r).contains("Upload-Offset is 5"),
        "{}",
        error_of(&r)
    );

    let r = patch(&relay, &location, 0, &bytes[..100]);
    assert_eq!(r.status, 204, "{}", body_text(&r));
    assert_eq!(r.header("upload-offset"), Some("100"));
    assert_eq!(r.header("upload-length"), Some("1000"));

    let r = patch(&relay, &location, 0, &bytes);
    assert_eq!(r.status, 409);
    assert_eq!(r.header("upload-offset"), Some("100"));

    // Bad headers.
    let auth = auth1();
    let r = request(
        relay.port,
        "PATCH",
        &location,
        &[OCTETS, ("authorization", &auth)],
        &bytes[100..],
    );
    assert_eq!(r.status, 400);
    assert!(error_of(&r).contains("Upload-Offset"), "{}", error_of(&r));
    let r = request(
        relay.port,
        "PATCH",
        &location,
        &[
            ("content-type", "application/octet-stream"),
            ("authorization", &auth),
            ("upload-offset", "100"),
        ],
        &bytes[100..],
    );
    assert_eq!(r.status, 415);
    assert!(
        error_of(&r).contains("application/offset+octet-stream"),
        "{}",
        error_of(&r)
    );

    // Past the end: 413, the bytes before are kept.
    let mut too_long = bytes[100..].to_vec();
    too_long.push(0);
    let r = patch(&relay, &location, 100, &too_long);
    assert_eq!(r.status, 413, "{}", body_text(&r));
    assert_eq!(r.header("upload-offset"), Some("100"));

    assert_done(&patch(&relay, &location, 100, &bytes[100..]), "accepted");
    assert_eq!(std::fs::read(object_path(&relay, &key(1))).unwrap(), bytes);
}

#[test]
fn bytes_with_the_wrong_digest_are_422_and_stored_nowhere_then_the_right_ones_work() {
    let relay = Relay::start();
    let bytes = file_bytes(200_000, 4);
    let location = created(&relay, 1, &bytes);
    let mut damaged = bytes.clone();
    damaged[123_456] ^= 0x40;

    let r = patch(&relay, &location, 0, &damaged);
    assert_eq!(r.status, 422, "{}", body_text(&r));
    let err = error_of(&r);
    assert!(
        err.contains(&sha256_of(&bytes)),
        "names the expected digest: {err}"
    );
    assert!(
        err.contains(&sha256_of(&damaged)),
        "names the actual digest: {err}"
    );
    assert_eq!(r.header("upload-offset"), Some("0"));
    assert!(!object_path(&relay, &key(1)).exists());
    assert!(relay.stream_events().is_empty());
    assert_eq!(
        head(&relay, &auth1(), &location).header("upload-offset"),
        Some("0")
    );
    assert_eq!(
        relay.metric("pigeon_relay_upload_digest_mismatches_total"),
        1
    );
    assert!(relay.log().contains("SHA-256 is not the one announced"));

    assert_done(&patch(&relay, &location, 0, &bytes), "accepted");
    assert_eq!(std::fs::read(object_path(&relay, &key(1))).unwrap(), bytes);
    assert_eq!(relay.stream_events().len(), 1);
}

#[test]
fn an_upload_survives_a_sigkill_of_the_relay_and_is_rehashed_from_disk() {
    let mut relay = Relay::start();
    let bytes = file_bytes(4 << 20, 5);
    let location = created(&relay, 1, &bytes);

    let conn = start_patch(&relay, &location, 0, bytes.len(), &bytes[..2 << 20]);
    // At least 1 MiB is written to the .part (page cache survives SIGKILL).
    relay.wait_metric(RECEIVED, |n| n >= 1 << 20);
    relay.kill();
    drop(conn);
    relay.spawn();

    let r = create(&relay, 1, &bytes);
    assert_eq!(r.status, 200, "{}", body_text(&r));
    let held = r.json()["offset"].as_u64().unwrap();
    assert!((1 << 20..=2 << 20).contains(&held), "held {held}");

    let r = patch(&relay, &location, held, &bytes[held as usize..]);
    assert_done(&r, "accepted");
    assert_eq!(std::fs::read(object_path(&relay, &key(1))).unwrap(), bytes);
    assert!(
        relay
            .log()
            .contains("Re-hashed the bytes held for an upload from disk"),
        "the digest of the bytes from before the restart was not re-read:\n{}",
        relay.log()
    );
    assert_eq!(relay.stream_events().len(), 1);
}

#[test]
fn a_newer_request_takes_over_from_a_half_open_patch() {
    let relay = Relay::start();
    let bytes = file_bytes(2 << 20, 6);
    let location = created(&relay, 1, &bytes);

    // A PATCH whose client went quiet (the relay cannot tell it from a slow one).
    let stale = start_patch(&relay, &location, 0, bytes.len(), &bytes[..600_000]);
    // It is streaming: at least one write (of 256 KiB or more) reached the .part.
    relay.wait_metric(RECEIVED, |n| n >= 256 * 1024);
    // A newer PATCH stops it, waits for it, and then finds the offset moved on.
    let r = patch(&relay, &location, 0, &bytes);
    assert_eq!(r.status, 409, "{}", body_text(&r));
    let held: u64 = r.header("upload-offset").unwrap().parse().unwrap();
    assert!((256 * 1024..=600_000).contains(&held), "held {held}");
    if let Ok(old) = stale.try_response() {
        assert_eq!(old.status, 409, "{}", body_text(&old));
        assert!(error_of(&old).contains("took over"), "{}", error_of(&old));
    }
    assert_eq!(relay.metric(IN_PROGRESS), 0);

    // The same with a create as the newer request.
    let held = held as usize;
    let stale = start_patch(
        &relay,
        &location,
        held as u64,
        bytes.len() - held,
        &bytes[held..held + 600_000],
    );
    relay.wait_metric(RECEIVED, |n| n >= (held + 256 * 1024) as u64);
    let r = create(&relay, 1, &bytes);
    assert_eq!(r.status, 200, "{}", body_text(&r));
    let now = r.json()["offset"].as_u64().unwrap() as usize;
    assert!((held + 256 * 1024..=held + 600_000).contains(&now), "{now}");
    drop(stale);

    assert_done(
        &patch(&relay, &location, now as u64, &bytes[now..]),
        "accepted",
    );
    assert_eq!(std::fs::read(object_path(&relay, &key(1))).unwrap(), bytes);
    assert_eq!(relay.metric(RECEIVED), bytes.len() as u64);
}

#[test]
fn another_gateways_token_can_neither_see_nor_touch_an_upload() {
    let relay = Relay::start();
    let bytes = file_bytes(1000, 7);
    let location = created(&relay, 1, &bytes);
    let other = auth2();
    assert_eq!(head(&relay, &other, &location).status, 404);
    let r = patch_with(&relay, &other, &location, 0, &bytes);
    assert_eq!(r.status, 404, "{}", body_text(&r));
    let r = request(
        relay.port,
        "DELETE",
        &location,
        &[("authorization", &other)],
        b"",
    );
    assert_eq!(r.status, 404);
    // pi-1's upload is untouched.
    assert_eq!(head(&relay, &auth1(), &location).status, 200);
    // A path that is no upload id at all is a 404 too.
    assert_eq!(
        head(&relay, &auth1(), "/v1/uploads/..%2F..%2Fstate").status,
        404
    );
    assert_done(&patch(&relay, &location, 0, &bytes), "accepted");
}

#[test]
fn uploads_need_a_token_even_when_unauthenticated_ingest_is_allowed() {
    let relay = Relay::start_with("allow_unauthenticated = true", "");
    let bytes = file_bytes(10, 8);
    let body = create_body(&file_event(1, bytes.len()), &bytes);
    let r = request(relay.port, "POST", "/v1/uploads", &[JSON], &body);
    assert_eq!(r.status, 401, "{}", body_text(&r));
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    assert!(error_of(&r).contains("missing bearer token"));
    let r = create_with(&relay, "Bearer wrong", &body);
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );

    let location = created(&relay, 1, &bytes);
    let r = request(
        relay.port,
        "PATCH",
        &location,
        &[OCTETS, ("upload-offset", "0")],
        &bytes,
    );
    assert_eq!(r.status, 401);
    assert_eq!(request(relay.port, "HEAD", &location, &[], b"").status, 401);
    assert_eq!(
        request(relay.port, "DELETE", &location, &[], b"").status,
        401
    );
}

#[test]
fn bad_create_requests_are_400_413_or_415_naming_the_problem() {
    let relay = Relay::start_with("", "[limits]\nmax_object_bytes = \"1KiB\"\n");
    let auth = auth1();
    let event = file_event(1, 10);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = json!({"event": event, "length": 10, "sha256": sha256_of(b"0123456789"), "extension": "jpg"});
        f(&mut v);
        create_with(&relay, &auth, &serde_json::to_vec(&v).unwrap())
    };
    for (change, status, needle) in [
        (
            &(|v: &mut Value| v["length"] = json!(1025)) as &dyn Fn(&mut Value),
            413,
            "max_object_bytes",
        ),
        (&|v: &mut Value| v["sha256"] = json!("xyz"), 400, "sha256"),
        (
            &|v: &mut Value| v["sha256"] = json!("g".repeat(64)),
            400,
            "sha256",
        ),
        (
            &|v: &mut Value| v["extension"] = json!("JPG"),
            400,
            "extension",
        ),
        (
            &|v: &mut Value| v["extension"] = json!("tar.gz"),
            400,
            "extension",
        ),
        (
            &|v: &mut Value| {
                v.as_object_mut().unwrap().remove("length");
            },
            400,
            "CreateUpload",
        ),
    ] {
        let r = with(change);
        assert_eq!(r.status, status, "{}", body_text(&r));
        assert!(error_of(&r).contains(needle), "{needle}: {}", error_of(&r));
    }
    let r = create_with(&relay, &auth, b"{not json");
    assert_eq!(r.status, 400);
    let r = request(
        relay.port,
        "POST",
        "/v1/uploads",
        &[("content-type", "text/plain"), ("authorization", &auth)],
        b"{}",
    );
    assert_eq!(r.status, 415);

    // An existing upload of the same event with another length or digest.
    assert_eq!(with(&|_| {}).status, 201);
    let r = with(&|v| v["length"] = json!(11));
    assert_eq!(r.status, 400);
    assert!(
        error_of(&r).contains("length 10 (this request says 11)"),
        "{}",
        error_of(&r)
    );
    let r = with(&|v| v["sha256"] = json!(sha256_of(b"other")));
    assert_eq!(r.status, 400);
    assert!(error_of(&r).contains("sha256"), "{}", error_of(&r));
    assert_eq!(with(&|_| {}).status, 200, "the upload itself is fine");
}

#[test]
fn an_event_that_breaks_a_rule_is_rejected_with_200() {
    let relay = Relay::start();
    let bytes = file_bytes(10, 9);
    let mut spoofed = file_event(1, 10);
    spoofed["source"] = json!("/gateways/pi-2/files/cameras");
    let r = create_with(&relay, &auth1(), &create_body(&spoofed, &bytes));
    let v = assert_done(&r, "rejected");
    assert_eq!(v["result"]["id"], "img-1");
    assert_eq!(
        v["result"]["reason"],
        "source /gateways/pi-2/files/cameras does not belong to gateway pi-1"
    );

    let mut timeless = file_event(2, 10);
    timeless.as_object_mut().unwrap().remove("time");
    let r = create_with(&relay, &auth1(), &create_body(&timeless, &bytes));
    let v = assert_done(&r, "rejected");
    assert!(
        v["result"]["reason"].as_str().unwrap().contains("'time'"),
        "{v}"
    );

    let mut unsequenced = file_event(3, 10);
    unsequenced.as_object_mut().unwrap().remove("sequence");
    let r = create_with(&relay, &auth1(), &create_body(&unsequenced, &bytes));
    assert_done(&r, "rejected");

    assert!(upload_files(&relay).is_empty());
    assert!(relay.stream_events().is_empty());
}

#[test]
fn a_file_of_several_megabytes_arrives_in_many_small_chunks() {
    let relay = Relay::start();
    let bytes = file_bytes(3 << 20, 10);
    let location = created(&relay, 1, &bytes);
    // Chunked transfer encoding, 1000 bytes a chunk: no Content-Length to go by.
    let mut conn = RawConn::connect(relay.port);
    let auth = auth1();
    conn.send_request_head(
        relay.port,
        "PATCH",
        &location,
        &[
            OCTETS,
            ("authorization", &auth),
            ("upload-offset", "0"),
            ("transfer-encoding", "chunked"),
        ],
    );
    for chunk in bytes.chunks(1000) {
        conn.send(format!("{:x}\r\n", chunk.len()).as_bytes());
        conn.send(chunk);
        conn.send(b"\r\n");
    }
    conn.send(b"0\r\n\r\n");
    let r = conn.response();
    assert_done(&r, "accepted");
    assert_eq!(std::fs::read(object_path(&relay, &key(1))).unwrap(), bytes);
    assert_eq!(relay.metric(RECEIVED), bytes.len() as u64);
}

#[test]
fn a_zero_length_file_completes_on_an_empty_patch() {
    let relay = Relay::start();
    let location = created(&relay, 1, b"");
    let r = patch(&relay, &location, 0, b"");
    let v = assert_done(&r, "accepted");
    assert_eq!(
        (v["offset"].as_u64(), v["length"].as_u64()),
        (Some(0), Some(0))
    );
    let object = object_path(&relay, &key(1));
    assert_eq!(std::fs::metadata(&object).unwrap().len(), 0);
    assert_eq!(relay.stream_events().len(), 1);
}

#[test]
fn delete_discards_an_unfinished_upload() {
    let relay = Relay::start();
    let bytes = file_bytes(1000, 11);
    let location = created(&relay, 1, &bytes);
    assert_eq!(patch(&relay, &location, 0, &bytes[..500]).status, 204);
    let auth = auth1();
    let delete = || {
        request(
            relay.port,
            "DELETE",
            &location,
            &[("authorization", &auth)],
            b"",
        )
    };
    assert_eq!(delete().status, 204);
    assert!(
        upload_files(&relay).is_empty(),
        "{:?}",
        upload_files(&relay)
    );
    assert_eq!(head(&relay, &auth1(), &location).status, 404);
    assert_eq!(delete().status, 404);
    assert_eq!(patch(&relay, &location, 500, &bytes[500..]).status, 404);
    // A new create starts from 0.
    assert_eq!(created(&relay, 1, &bytes), location);
}

#[test]
fn a_sink_failure_is_503_and_the_next_create_publishes_the_stored_object() {
    let relay = Relay::start();
    let bytes = file_bytes(5000, 12);
    let location = created(&relay, 1, &bytes);
    // A plain file where pi-1's stream directory must go.
    let obstacle = relay.data_dir().join("stream").join("pi-1");
    std::fs::write(&obstacle, b"").unwrap();
    let r = patch(&relay, &location, 0, &bytes);
    assert_eq!(r.status, 503, "{}", body_text(&r));
    assert_eq!(r.header("retry-after"), Some("5"));
    // The object is in place (complete), its event not written.
    assert_eq!(std::fs::read(object_path(&relay, &key(1))).unwrap(), bytes);

    std::fs::remove_file(&obstacle).unwrap();
    let r = create(&relay, 1, &bytes);
    let v = assert_done(&r, "accepted");
    assert!(v["dataref"].as_str().unwrap().ends_with(&key(1)));
    assert_eq!(relay.stream_events().len(), 1);
    assert!(upload_files(&relay).is_empty());
    assert_eq!(relay.metric(RECEIVED), bytes.len() as u64);
}

#[test]
fn objects_base_url_prefixes_the_dataref() {
    let relay = Relay::start_with("", "[objects]\nbase_url = \"s3://landing/pigeon/\"\n");
    let bytes = file_bytes(10, 13);
    let location = created(&relay, 1, &bytes);
    let v = assert_done(&patch(&relay, &location, 0, &bytes), "accepted");
    let want = format!("s3://landing/pigeon/{}", key(1));
    assert_eq!(v["dataref"], want);
    assert_eq!(relay.stream_events()[0]["dataref"], want);
}

#[test]
fn sigterm_stops_a_running_patch_at_once_and_keeps_its_bytes() {
    let mut relay = Relay::start();
    let bytes = file_bytes(1 << 20, 14);
    let location = created(&relay, 1, &bytes);
    let conn = start_patch(&relay, &location, 0, bytes.len(), &bytes[..400_000]);
    relay.wait_metric(RECEIVED, |n| n >= 256 * 1024);
    let status = relay.terminate();
    assert_eq!(status.code(), Some(0), "{}", relay.log());
    assert!(
        !relay
            .log()
            .contains("did not finish within the shutdown timeout"),
        "the PATCH held up the shutdown:\n{}",
        relay.log()
    );
    if let Ok(r) = conn.try_response() {
        assert_eq!(r.status, 503, "{}", body_text(&r));
        assert!(error_of(&r).contains("shutting down"), "{}", error_of(&r));
    }

    relay.spawn();
    let r = create(&relay, 1, &bytes);
    let held = r.json()["offset"].as_u64().unwrap();
    assert!((256 * 1024..=400_000).contains(&held), "held {held}");
    assert_done(
        &patch(&relay, &location, held, &bytes[held as usize..]),
        "accepted",
    );
    assert_eq!(std::fs::read(object_path(&relay, &key(1))).unwrap(), bytes);
}
