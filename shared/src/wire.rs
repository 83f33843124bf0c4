//! The gateway↔relay protocol (documented for humans in `docs/protocol.md`).
//!
//! A gateway `POST`s events to [`INGEST_PATH`] in any CloudEvents HTTP binding mode
//! (batch, structured or binary), authenticated with `Authorization: Bearer <token>`.
//! Bodies may be `Content-Encoding: gzip`. The relay answers with an [`IngestResponse`]
//! once every accepted event is durable in its sinks:
//!
//! | HTTP status | meaning | what the gateway does |
//! |---|---|---|
//! | 200 | every event has a result in `results` | delete accepted and duplicate events, dead-letter rejected ones |
//! | 400 | the body is not a CloudEvent or batch at all | retry events one by one to isolate the bad one |
//! | 401 / 403 | missing or wrong token | keep everything, retry with backoff, log an error |
//! | 413 | the request is too large | split the batch |
//! | 415 | unsupported content type or encoding | keep everything, retry with backoff |
//! | 429 / 5xx | overloaded or a sink is down (`Retry-After` says when to retry) | keep everything, retry with backoff |
//!
//! Files (camera snapshots, clips) travel through the resumable upload endpoint
//! [`UPLOADS_PATH`] instead: `POST` a [`CreateUpload`] (the file's event, length and
//! SHA-256), `PATCH` the bytes from the offset the relay reports, and the answer to the
//! request that completes the file carries the event's result. See [`UploadState`].

use serde::{Deserialize, Serialize};

/// The one ingest endpoint, for all three binding modes.
pub const INGEST_PATH: &str = "/v1/events";

/// Request header: the gateway will never send any sequence below this value again
/// under the given producer id (everything below it was delivered or dead-lettered).
/// It lets the relay forget old deduplication state.
pub const HEADER_SETTLED_BELOW: &str = "pigeon-settled-below";
/// Request header: the producer id the `pigeon-settled-below` value refers to.
pub const HEADER_PRODUCER_ID: &str = "pigeon-producer-id";

/// The resumable upload endpoint: `POST` creates (or finds) an upload, `PATCH`,
/// `HEAD` and `DELETE` act on `<UPLOADS_PATH>/<upload-id>`.
pub const UPLOADS_PATH: &str = "/v1/uploads";
/// Request and response header (tus): the byte offset a `PATCH` body starts at, and the
/// number of bytes the relay holds in a `HEAD`, `PATCH` or `409` answer.
pub const HEADER_UPLOAD_OFFSET: &str = "upload-offset";
/// Response header (tus): the file's full length, as created.
pub const HEADER_UPLOAD_LENGTH: &str = "upload-length";
/// Content type of a `PATCH` body: raw file bytes from `Upload-Offset` on.
pub const CONTENT_TYPE_UPLOAD_CHUNK: &str = "application/offset+octet-stream";

/// The body of `POST /v1/uploads`: a file about to be sent.
///
/// Creating is idempotent: the relay names the upload after the event's identity
/// (gateway, `producerid`, `sequence`), so creating it again — after a dropped
/// connection, a gateway restart or a relay restart — finds the same upload and says how
/// many bytes it already holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateUpload {
    /// The file's CloudEvent in structured JSON form, as it is to be published once the
    /// file is stored (the relay adds the `dataref` extension), kept as the gateway wrote
    /// it (its `data` is stored as that text, like an ingested event's). It must carry `time`:
    /// the object key is partitioned by it, so that a re-sent file lands on the same key.
    pub event: crate::json::Text,
    /// The file's size in bytes.
    pub length: u64,
    /// SHA-256 of the whole file, 64 lowercase hex digits. The relay checks it before
    /// storing the object; on a mismatch it stores nothing (`422`).
    pub sha256: String,
    /// The object key's extension (`jpg`, `mp4`), without the dot: 1 to 16 characters
    /// from `a-z 0-9`. Absent: no extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
}

/// The relay's answer about an upload (to `POST`, and to the `PATCH` that completes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    /// Where to `PATCH` the bytes, e.g. `/v1/uploads/3f2a…`; absent once `result` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Bytes the relay holds; the next `PATCH` starts here.
    pub offset: u64,
    pub length: u64,
    /// Set when the file is done with: `accepted` (object and event durable now),
    /// `duplicate` (they were before) or `rejected` (refused for good, with `reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<EventResult>,
    /// The published event's `dataref`: where the object is. Set with an `accepted` or
    /// `duplicate` result when the relay knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataref: Option<String>,
}

/// Checks that a bearer token can travel in an `Authorization` header and be read back
/// the same: 1 to 4096 printable ASCII characters, no spaces (RFC 6750's `b64token` and
/// more). The reason names the first character that cannot, by position.
///
/// ```
/// use pigeon_shared::wire::check_bearer_token;
/// assert!(check_bearer_token("s3cret-Token_+/=").is_ok());
/// assert_eq!(
///     check_bearer_token("abc\ndef").unwrap_err(),
///     "has a line break at character 4; a token is printable ASCII without spaces"
/// );
/// ```
pub fn check_bearer_token(token: &str) -> Result<(), String> {
    const RULE: &str = "a token is printable ASCII without spaces";
    if token.is_empty() {
        return Err("is empty".to_owned());
    }
    if token.len() > 4096 {
        return Err(format!("is {} bytes long; at most 4096", token.len()));
    }
    match token
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii_graphic())
    {
        None => Ok(()),
        Some((i, c)) => {
            let what = match c {
                '\n' | '\r' => "a line break".to_owned(),
                ' ' | '\t' => "white space".to_owned(),
                c if c.is_control() => format!("the control character {c:?}"),
                c => format!("the non-ASCII character {c:?}"),
            };
            Err(format!("has {what} at character {}; {RULE}", i + 1))
        }
    }
}

/// Parses 64 hex digits (either case) into a SHA-256 digest.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Renders a digest as 64 lowercase hex digits.
pub fn sha256_hex(digest: &[u8; 32]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Whether `ext` may end an object key: 1 to 16 characters from `a-z 0-9`.
pub fn valid_extension(ext: &str) -> bool {
    (1..=16).contains(&ext.len())
        && ext
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// What happened to one event of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Written durably to every sink by this request.
    Accepted,
    /// Already written earlier (a re-send); not written again. Durable all the same.
    Duplicate,
    /// Refused for good (see `reason`); re-sending it unchanged will be refused again.
    Rejected,
}

impl EventStatus {
    /// Whether the event is durable at the relay, so the gateway may forget it.
    pub fn is_durable(self) -> bool {
        matches!(self, Self::Accepted | Self::Duplicate)
    }
}

/// The result for one event, in the order the events were sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventResult {
    /// The event's `id`, or `null` when the event was too broken to have one.
    pub id: Option<String>,
    pub status: EventStatus,
    /// Why the event was rejected; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The body of a 200 answer to an ingest request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestResponse {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// One result per event sent, in the same order.
    pub results: Vec<EventResult>,
}

impl IngestResponse {
    /// Builds the response from per-event results, counting them.
    pub fn from_results(results: Vec<EventResult>) -> Self {
        let mut r = Self {
            results,
            ..Self::default()
        };
        for res in &r.results {
            match res.status {
                EventStatus::Accepted => r.accepted += 1,
                EventStatus::Duplicate => r.duplicates += 1,
                EventStatus::Rejected => r.rejected += 1,
            }
        }
        r
    }
}

/// The body of every non-200 answer: one sentence saying what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_counts_and_json_shape() {
        let r = IngestResponse::from_results(vec![
            EventResult {
                id: Some("a".into()),
                status: EventStatus::Accepted,
                reason: None,
            },
            EventResult {
                id: Some("b".into()),
                status: EventStatus::Duplicate,
                reason: None,
            },
            EventResult {
                id: None,
                status: EventStatus::Rejected,
                reason: Some("missing attribute 'id'".into()),
            },
        ]);
        assert_eq!((r.accepted, r.duplicates, r.rejected), (1, 1, 1));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["results"][0],
            serde_json::json!({"id": "a", "status": "accepted"})
        );
        assert_eq!(json["results"][2]["status"], "rejected");
        let back: IngestResponse = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn sha256_hex_round_trips_and_bad_digests_are_refused() {
        let d: [u8; 32] = std::array::from_fn(|i| (i * 9) as u8);
        let hex = sha256_hex(&d);
        assert_eq!(hex.len(), 64);
        assert_eq!(&hex[..6], "000912");
        assert_eq!(parse_sha256_hex(&hex), Some(d));
        assert_eq!(parse_sha256_hex(&hex.to_uppercase()), Some(d));
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(63), &"0".repeat(65)] {
            assert_eq!(parse_sha256_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn extensions() {
        for ok in ["jpg", "mp4", "h264", "a", &"x".repeat(16)] {
            assert!(valid_extension(ok), "{ok:?}");
        }
        for bad in ["", "JPG", ".jpg", "tar.gz", "jpé", &"x".repeat(17)] {
            assert!(!valid_extension(bad), "{bad:?}");
        }
    }

    #[test]
    fn upload_documents_shape() {
        let create = CreateUpload {
            event: crate::json::Text::from_value(&serde_json::json!({"id": "e1"})),
            length: 10,
            sha256: "ab".repeat(32),
            extension: None,
        };
        let v = serde_json::to_value(&create).unwrap();
        assert!(v.get("extension").is_none());
        let text = serde_json::to_string(&create).unwrap();
        assert_eq!(serde_json::from_str::<CreateUpload>(&text).unwrap(), create);
        // The event is kept as its text: numbers beyond f64, duplicate keys, spacing.
        let sent =
            r#"{"event":{"id":"e1","n":12345678901234567890123,"n":1 },"length":1,"sha256":"x"}"#;
        let c: CreateUpload = serde_json::from_str(sent).unwrap();
        assert_eq!(
            c.event.get(),
            r#"{"id":"e1","n":12345678901234567890123,"n":1 }"#
        );
        let state: UploadState =
            serde_json::from_str(r#"{"location":"/v1/uploads/x","offset":4,"length":10}"#).unwrap();
        assert_eq!(state.offset, 4);
        assert!(state.result.is_none() && state.dataref.is_none());
    }

    #[test]
    fn durable_statuses() {
        assert!(EventStatus::Accepted.is_durable());
        assert!(EventStatus::Duplicate.is_durable());
        assert!(!EventStatus::Rejected.is_durable());
    }
}
