//! Fuzz targets' harnesses for what a remote party or a file on disk can make the relay
//! parse: ingest requests in the three binding modes (gzip included), upload creates and
//! their headers, and the config file. See [`pigeon_shared::fuzzing`] for how they are
//! run and replayed.

use std::io::Write as _;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use cloudevents::AttributesReader as _;
use pigeon_shared::ce::{self, GatewayId};
use pigeon_shared::wire::CreateUpload;

use crate::auth::Principal;
use crate::config::RelayConfig;
use crate::ingest::{self, Mode};
use crate::upload::{key, routes, service};

/// Splits `data` into headers (`name: value` lines up to an empty line) and a body.
/// Lines that are not a valid header are skipped.
fn request(data: &[u8]) -> (HeaderMap, &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..]
            .strip_prefix(b" ")
            .unwrap_or(&line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    (headers, body)
}

/// Fuzz target `ingest`: a `POST /v1/events` request as the relay reads it.
///
/// Input: one flag byte (bit 0: gzip the body and say so in `Content-Encoding`), then
/// headers, an empty line and the body. Properties: no panic; every rejection has a
/// reason; an accepted event's stored line is one line of JSON, names its gateway in a
/// source without empty or dot segments, and reads back as the same event: the line
/// ingested again is stored unchanged (nothing is altered on a second pass either).
pub fn ingest(data: &[u8]) {
    let [flags, rest @ ..] = data else {
        return;
    };
    let (mut headers, body) = request(rest);
    let gzipped;
    let body = if flags & 1 == 1 {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(body).expect("gzip to memory");
        gzipped = gz.finish().expect("gzip to memory");
        headers.insert("content-encoding", HeaderValue::from_static("gzip"));
        &gzipped[..]
    } else {
        body
    };
    let (Ok(encoding), Ok(mode)) = (
        ingest::content_encoding(&headers),
        ingest::detect_mode(&headers),
    ) else {
        return;
    };
    let Ok(body) = ingest::decode_body(encoding, body, 1 << 20) else {
        return;
    };
    let Ok(events) = ingest::parse_events(mode, &headers, &body, 64) else {
        return;
    };
    for parsed in events {
        let parsed = match parsed {
            Ok(p) => p,
            Err(r) => {
                assert!(!r.reason.is_empty(), "a rejection without a reason");
                continue;
            }
        };
        let checked = match ingest::check_event(&parsed, &Principal::Anonymous, u64::MAX) {
            Ok(c) => c,
            Err(r) => {
                assert!(!r.reason.is_empty(), "a rejection without a reason");
                continue;
            }
        };
        assert!(
            !checked.line.contains(&b'\n'),
            "a stored line with a line break"
        );
        let again = ingest::parse_events(Mode::Structured, &HeaderMap::new(), &checked.line, 1)
            .expect("a stored line is a JSON object")
            .pop()
            .expect("one event")
            .unwrap_or_else(|r| panic!("a stored line is refused: {}", r.reason));
        let again = ingest::check_event(&again, &Principal::Anonymous, u64::MAX)
            .unwrap_or_else(|r| panic!("a stored line is refused: {}", r.reason));
        assert_eq!(
            String::from_utf8_lossy(&again.line),
            String::from_utf8_lossy(&checked.line),
            "the stored line changes when it is ingested again"
        );
        assert_eq!(again.gateway, checked.gateway);
        assert!(ce::check_source_segments(parsed.event.source().as_str()).is_ok());
    }
}

/// Fuzz target `upload_create`: an upload's headers and its create body.
///
/// Input: a line with the upload id of the request path, headers, an empty line, the
/// `CreateUpload` body. Properties: no panic; an upload id is 32 lowercase hex digits or
/// names nothing; an accepted create's object key is under the key prefix, made of
/// non-empty segments other than `.` and `..` without control characters or
/// backslashes, and its `dataref` is the base URL and that key; the same create is
/// prepared the same way twice.
pub fn upload_create(data: &[u8]) {
    let (id, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(id) = std::str::from_utf8(id)
        && key::is_upload_id(id)
    {
        assert!(id.len() == 32 && !id.contains(['/', '.']));
    }
    let (headers, body) = request(rest);
    if let Some(offset) = routes::upload_offset(&headers) {
        let text = headers["upload-offset"].to_str().unwrap();
        assert_eq!(
            text.trim_start_matches('0').parse::<u64>().unwrap_or(0),
            offset
        );
    }
    let Ok(req) = serde_json::from_slice::<CreateUpload>(body) else {
        return;
    };
    if service::check_request(&req, 1 << 40).is_err() {
        return;
    }
    let gateway = GatewayId::new("pi-a").expect("a valid gateway id");
    let (base, prefix) = ("https://files.example/", "pigeon/");
    let Ok(prepared) = service::prepare(&gateway, &req, base, prefix, 2 << 20) else {
        return;
    };
    let again = service::prepare(&gateway, &req, base, prefix, 2 << 20);
    assert_eq!(
        again.as_ref(),
        Ok(&prepared),
        "prepare is not deterministic"
    );
    assert!(key::is_upload_id(&prepared.upload));
    assert_eq!(prepared.dataref, format!("{base}{}", prepared.key));
    for key in [&prepared.key, &prepared.legacy_key] {
        let rest = key
            .strip_prefix(prefix)
            .expect("the key is under the prefix");
        assert!(
            rest.starts_with("pi-a/"),
            "{key:?} is not under its gateway"
        );
        for segment in rest.split('/') {
            assert!(
                !matches!(segment, "" | "." | "..")
                    && !segment.chars().any(|c| c.is_control() || c == '\\'),
                "object key {key:?} has the segment {segment:?}"
            );
        }
    }
}

/// Fuzz target `relay_config`: any text as the relay's config file. Properties: no panic,
/// and an invalid value's error names its key.
pub fn relay_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = RelayConfig::parse(text)
        && let Err(e) = config.validate()
    {
        assert!(!e.to_string().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use pigeon_shared::fuzzing::replay;

    #[test]
    fn ingest_corpus() {
        replay("ingest", super::ingest);
    }

    #[test]
    fn upload_create_corpus() {
        replay("upload_create", super::upload_create);
    }

    #[test]
    fn relay_config_corpus() {
        replay("relay_config", super::relay_config);
    }
}
