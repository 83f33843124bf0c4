//! Names derived from an upload's event, as pure functions: the upload id and the
//! object key (see `docs/data-layout.md#objects`).
//!
//! Both are deterministic, so a re-sent file finds its upload again and lands on the same
//! key with the same bytes. The key holds the upload id, so two uploads (two events by
//! the dedup identity) never share a key, even when their `id`, `time` and `source` are
//! the same: a `dataref` once published keeps naming the bytes it was published with.

use chrono::{DateTime, Utc};
use pigeon_shared::ce::{GatewayId, SOURCE_PREFIX};
use pigeon_shared::wire::sha256_hex;
use sha2::{Digest, Sha256};

/// Hex digits in an upload id.
pub const UPLOAD_ID_LEN: usize = 32;
/// Longest segment of the input path kept as it is in an object key.
const MAX_SEGMENT_LEN: usize = 64;
/// Most segments of the input path in an object key; a deeper source keeps its first
/// ones and ends in one `_`, so keys stay far below `PATH_MAX`.
const MAX_SEGMENTS: usize = 8;
/// Longest event id used as it is in an object key (the rest get their SHA-256).
const MAX_ID_LEN: usize = 128;
/// What stands in for a segment (or an input) that cannot be used as a directory name.
const PLACEHOLDER: &str = "_";

/// The id of the upload of the event (gateway, `producerid`, `sequence`): the first 32
/// hex digits of SHA-256(`pigeon-upload\0<gateway>\0<producer>\0<sequence in decimal>`).
pub fn upload_id(gateway: &GatewayId, producer: &str, sequence: u64) -> String {
    let mut h = Sha256::new();
    h.update(b"pigeon-upload\0");
    h.update(gateway.as_str().as_bytes());
    h.update(b"\0");
    h.update(producer.as_bytes());
    h.update(b"\0");
    h.update(sequence.to_string().as_bytes());
    let mut id = sha256_hex(&h.finalize().into());
    id.truncate(UPLOAD_ID_LEN);
    id
}

/// Whether `s` can be an upload id (32 lowercase hex digits). Anything else in a request
/// path names no upload, and never reaches the file system.
pub fn is_upload_id(s: &str) -> bool {
    s.len() == UPLOAD_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The object key of a file, relative to `<data_dir>/objects/` (and to `objects.base_url`):
/// `<gateway>/<input>/<YYYY-MM-DD>/<HH>/<id>.<upload>[.<extension>]`, the date and hour
/// being the event's `time` in UTC and `upload` the event's [`upload_id`] (32 hex digits,
/// so a name reads from the right: the extension, if any, then the upload id).
/// `extension` must have passed `wire::valid_extension`.
///
/// The upload id makes the key unique per (gateway, `producerid`, `sequence`) without
/// any state: whoever computes it (this relay, another one on the same bucket) gets the
/// same key for the same upload and another key for any other, so no check-then-write is
/// needed for a key never to be given other bytes (issue 24).
pub fn object_key(
    gateway: &GatewayId,
    source: &str,
    time: DateTime<Utc>,
    event_id: &str,
    upload: &str,
    extension: Option<&str>,
) -> String {
    debug_assert!(is_upload_id(upload), "{upload:?} is not an upload id");
    let name = format!("{}.{upload}", object_name(event_id));
    key_of(gateway, source, time, name, extension)
}

/// The key a file had before keys held the upload id (issue 24):
/// `<gateway>/<input>/<YYYY-MM-DD>/<HH>/<id>[.<extension>]`. Never written to any more;
/// only looked at, for the `dataref` of an event published then and sent again.
pub fn legacy_object_key(
    gateway: &GatewayId,
    source: &str,
    time: DateTime<Utc>,
    event_id: &str,
    extension: Option<&str>,
) -> String {
    key_of(gateway, source, time, object_name(event_id), extension)
}

fn key_of(
    gateway: &GatewayId,
    source: &str,
    time: DateTime<Utc>,
    name: String,
    extension: Option<&str>,
) -> String {
    let mut key = format!(
        "{gateway}/{}/{}/{name}",
        input_path(gateway, source),
        time.format("%Y-%m-%d/%H"),
    );
    if let Some(ext) = extension {
        key.push('.');
        key.push_str(ext);
    }
    key
}

/// The part of `source` after `/gateways/<gateway>/`, each segment kept only if it is a
/// safe directory name; `_` when there is none.
fn input_path(gateway: &GatewayId, source: &str) -> String {
    let prefix = format!("{SOURCE_PREFIX}{gateway}/");
    let Some(rest) = source.strip_prefix(&prefix).filter(|r| !r.is_empty()) else {
        return PLACEHOLDER.to_owned();
    };
    let all: Vec<&str> = rest.split('/').collect();
    let mut kept: Vec<&str> = all
        .iter()
        .take(MAX_SEGMENTS)
        .map(|s| if safe_segment(s) { s } else { PLACEHOLDER })
        .collect();
    if all.len() > MAX_SEGMENTS
        && let Some(last) = kept.last_mut()
    {
        *last = PLACEHOLDER;
    }
    kept.join("/")
}

/// 1 to 64 characters from `A-Z a-z 0-9 . _ -`, not starting with `.` (so never `..`).
fn safe_segment(s: &str) -> bool {
    (1..=MAX_SEGMENT_LEN).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The event id when it is a safe file name (`[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}`), else
/// the 64 hex digits of its SHA-256.
fn object_name(id: &str) -> String {
    let safe = (1..=MAX_ID_LEN).contains(&id.len())
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if safe {
        id.to_owned()
    } else {
        sha256_hex(&Sha256::digest(id.as_bytes()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pi1() -> GatewayId {
        GatewayId::new("pi-1").unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    /// `upload_id(pi-1, "p-1", 42)`.
    const U: &str = "61f0d86010b3c57032efd3e36fd7e0b0";

    fn key(source: &str, id: &str, ext: Option<&str>) -> String {
        object_key(&pi1(), source, t("2026-12-01T21:04:05.123Z"), id, U, ext)
    }

    #[test]
    fn upload_ids_are_the_documented_digest() {
        // python3: hashlib.sha256(b'pigeon-upload\0pi-1\0p-1\x0042').hexdigest()[:32]
        let id = upload_id(&pi1(), "p-1", 42);
        assert_eq!(id, U);
        assert!(is_upload_id(&id));
        assert_ne!(upload_id(&pi1(), "p-1", 43), id);
        assert_ne!(upload_id(&pi1(), "p-2", 42), id);
        assert_ne!(upload_id(&GatewayId::new("pi-2").unwrap(), "p-1", 42), id);
        for bad in [
            "",
            "../../etc/passwd",
            &id.to_uppercase(),
            &id[1..],
            "g".repeat(32).as_str(),
        ] {
            assert!(!is_upload_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_protocol_example() {
        // The example event of docs/data-layout.md (producerid 5f0c1e9a-…, sequence 42).
        let upload = upload_id(&pi1(), "5f0c1e9a-3c1d-4f7e-9b1a-2d6e8f0a7c55", 42);
        assert_eq!(
            object_key(
                &pi1(),
                "/gateways/pi-1/files/cameras",
                t("2026-12-01T21:04:05.123Z"),
                "0190c7a4-5b2e-7c3d-9a41-6f0e2d1c3b4a",
                &upload,
                Some("jpg")
            ),
            "pi-1/files/cameras/2026-12-01/21/0190c7a4-5b2e-7c3d-9a41-6f0e2d1c3b4a.d9e002ab3fc4077528b3546bcc3a2e2e.jpg"
        );
        assert_eq!(
            key("/gateways/pi-1/ftp", "e1", None),
            format!("pi-1/ftp/2026-12-01/21/e1.{U}")
        );
    }

    #[test]
    fn the_hour_is_the_events_time_in_utc() {
        let k = object_key(
            &pi1(),
            "/gateways/pi-1/ftp",
            t("2026-12-02T00:30:00+01:00"),
            "e",
            U,
            None,
        );
        assert_eq!(k, format!("pi-1/ftp/2026-12-01/23/e.{U}"));
    }

    #[test]
    fn unsafe_input_segments_become_placeholders() {
        for (source, input) in [
            ("/gateways/pi-1", "_"),
            ("/gateways/pi-1/", "_"),
            ("/gateways/pi-1/a//b", "a/_/b"),
            ("/gateways/pi-1/a/../b", "a/_/b"),
            ("/gateways/pi-1/.hidden/x", "_/x"),
            ("/gateways/pi-1/caméra", "_"),
            ("/gateways/pi-1/a b/c", "_/c"),
            ("/gateways/pi-1/files/", "files/_"),
            ("/gateways/pi-1/v1.2_x-y", "v1.2_x-y"),
            // Not this gateway's source at all (the event is rejected before, anyway).
            ("/gateways/pi-2/files", "_"),
            ("/gateways/pi-10/files", "_"),
            ("urn:x", "_"),
        ] {
            assert_eq!(
                key(source, "e", None),
                format!("pi-1/{input}/2026-12-01/21/e.{U}"),
                "{source}"
            );
        }
        let long = "x".repeat(65);
        assert_eq!(
            key(
                &format!("/gateways/pi-1/{long}/{}", "y".repeat(64)),
                "e",
                None
            ),
            format!("pi-1/_/{}/2026-12-01/21/e.{U}", "y".repeat(64))
        );
    }

    #[test]
    fn deep_sources_are_cut_to_eight_segments() {
        let source = format!(
            "/gateways/pi-1/{}",
            (0..20).map(|i| i.to_string()).collect::<Vec<_>>().join("/")
        );
        assert_eq!(
            key(&source, "e", None),
            format!("pi-1/0/1/2/3/4/5/6/_/2026-12-01/21/e.{U}")
        );
        let exactly_eight = "/gateways/pi-1/0/1/2/3/4/5/6/7";
        assert_eq!(
            key(exactly_eight, "e", None),
            format!("pi-1/0/1/2/3/4/5/6/7/2026-12-01/21/e.{U}")
        );
    }

    #[test]
    fn unsafe_ids_are_replaced_by_their_digest() {
        // sha256("a/b")
        let digest = "c14cddc033f64b9dea80ea675cf280a015e672516090a5626781153dc68fea11";
        assert_eq!(
            key("/gateways/pi-1/f", "a/b", Some("mp4")),
            format!("pi-1/f/2026-12-01/21/{digest}.{U}.mp4")
        );
        for bad in ["", ".x", "..", "a b", "é", &"x".repeat(129)] {
            let k = key("/gateways/pi-1/f", bad, None);
            let name = k.rsplit('/').next().unwrap();
            let (digest, upload) = name.split_once('.').unwrap();
            assert_eq!((digest.len(), upload), (64, U), "{bad:?} → {k}");
            assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()), "{k}");
        }
        let ok = format!("_{}", "x".repeat(127));
        assert!(key("/gateways/pi-1/f", &ok, None).ends_with(&format!("/{ok}.{U}")));
        assert!(key("/gateways/pi-1/f", "a.b", Some("jpg")).ends_with(&format!("/a.b.{U}.jpg")));
    }

    /// Issue 24: two uploads whose events share `id`, `time` and `source` but not their
    /// identity got one key, and the second replaced the bytes the first's `dataref`
    /// named. Their keys differ now; the same upload still gets the same key.
    #[test]
    fn issue_24_keys_are_unique_per_upload_and_deterministic() {
        let at = t("2026-12-01T21:04:05.123Z");
        let source = "/gateways/pi-1/files/cameras";
        let key_of = |gateway: &GatewayId, producer: &str, sequence: u64| {
            let upload = upload_id(gateway, producer, sequence);
            object_key(gateway, source, at, "img", &upload, Some("jpg"))
        };
        let first = key_of(&pi1(), "p-1", 42);
        assert_eq!(
            first,
            format!("pi-1/files/cameras/2026-12-01/21/img.{U}.jpg")
        );
        assert_eq!(key_of(&pi1(), "p-1", 42), first, "deterministic");
        assert_ne!(key_of(&pi1(), "p-1", 43), first, "another sequence");
        assert_ne!(key_of(&pi1(), "p-2", 42), first, "another producer");
        // Another gateway's key differs by its first segment already, but its name too.
        let pi2 = GatewayId::new("pi-2").unwrap();
        let other = key_of(&pi2, "p-1", 42);
        assert_ne!(other.rsplit('/').next(), first.rsplit('/').next());

        // The key from before, still known for the duplicate answer, is the same without
        // the upload id.
        assert_eq!(
            legacy_object_key(&pi1(), source, at, "img", Some("jpg")),
            "pi-1/files/cameras/2026-12-01/21/img.jpg"
        );
        assert_eq!(
            legacy_object_key(&pi1(), "/gateways/pi-1/ftp", at, "a/b", None),
            "pi-1/ftp/2026-12-01/21/c14cddc033f64b9dea80ea675cf280a015e672516090a5626781153dc68fea11"
        );
    }

    #[test]
    fn names_stay_below_name_max() {
        let longest = key(
            "/gateways/pi-1/f",
            &"x".repeat(MAX_ID_LEN),
            Some(&"z".repeat(16)),
        );
        let name = longest.rsplit('/').next().unwrap();
        assert_eq!(name.len(), MAX_ID_LEN + 1 + UPLOAD_ID_LEN + 1 + 16);
        assert!(name.len() <= 255, "{}", name.len());
    }
}
