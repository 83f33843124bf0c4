//! The capture objects: Hive-style keys and deterministic gzip, the same for every
//! capture source.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Deserialize;

/// Where capture objects go, after `objects.s3.prefix`.
pub const CAPTURE_PREFIX: &str = "capture";
/// A Hive partition value: `A-Z a-z 0-9 . _ -` as they are, every other byte `%XX`.
pub fn partition_value(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// The objects of one roll: key (relative to the prefix) → gzip-compressed lines, one
/// per event type, in stream order. Lines without a readable `type` go to `type=%00`.
pub fn roll_objects(
    f: &StreamFileRef<'_>,
    instance: &str,
    from: u64,
    lines: &[u8],
) -> BTreeMap<String, Vec<u8>> {
    let mut by_type: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for line in lines.split_inclusive(|&b| b == b'\n') {
        by_type
            .entry(line_type(line))
            .or_default()
            .extend_from_slice(line);
    }
    by_type
        .into_iter()
        .map(|(ty, body)| {
            let name = format!("{}.{instance}.{from:016}", f.gateway);
            (
                object_key(f.tenant, &ty, f.date, f.hour, &name),
                gzip(&body),
            )
        })
        .collect()
}

/// `capture/tenant=<tenant>/type=<type>/date=<date>/hour=<hour>/<name>.jsonl.gz`.
pub fn object_key(tenant: &str, ty: &str, date: &str, hour: &str, name: &str) -> String {
    format!(
        "{CAPTURE_PREFIX}/tenant={tenant}/type={}/date={date}/hour={hour}/{name}.jsonl.gz",
        partition_value(ty)
    )
}

/// The event's `type` in a structured JSON line, or "" (kept under `type=%00`).
pub fn line_type(line: &[u8]) -> String {
    #[derive(Deserialize)]
    struct TypeOnly<'a> {
        #[serde(borrow, rename = "type")]
        ty: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<TypeOnly>(line)
        .map(|t| t.ty.into_owned())
        .unwrap_or_default()
}

/// What [`roll_objects`] needs to know of the stream file.
pub struct StreamFileRef<'a> {
    pub tenant: &'a str,
    pub gateway: &'a str,
    pub date: &'a str,
    pub hour: &'a str,
}

/// gzip with no name and no timestamp in the header, so equal input gives equal bytes.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new().mtime(0).write(
        Vec::with_capacity(data.len() / 4),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(b: &[u8]) -> String {
        let mut s = String::new();
        flate2::read::GzDecoder::new(b)
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    #[test]
    fn partition_values_are_safe() {
        assert_eq!(
            partition_value("io.pigeon.camera.image"),
            "io.pigeon.camera.image"
        );
        assert_eq!(partition_value("a/b c=d"), "a%2Fb%20c%3Dd");
        assert_eq!(partition_value(""), "%00");
    }

    #[test]
    fn a_roll_is_one_object_per_type_and_the_same_bytes_every_time() {
        let lines = concat!(
            "{\"id\":\"1\",\"type\":\"t.a\",\"source\":\"/gateways/pi-1/x\"}\n",
            "{\"id\":\"2\",\"type\":\"t/b\",\"source\":\"/gateways/pi-1/x\"}\n",
            "{\"id\":\"3\",\"type\":\"t.a\",\"source\":\"/gateways/pi-1/x\"}\n",
            "not json\n",
        );
        let f = StreamFileRef {
            tenant: "acme",
            gateway: "pi-1",
            date: "2026-12-02",
            hour: "05",
        };
        let objects = roll_objects(&f, "0123456789ab", 42, lines.as_bytes());
        let keys: Vec<&str> = objects.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "capture/tenant=acme/type=%00/date=2026-12-02/hour=05/pi-1.0123456789ab.0000000000000042.jsonl.gz",
                "capture/tenant=acme/type=t%2Fb/date=2026-12-02/hour=05/pi-1.0123456789ab.0000000000000042.jsonl.gz",
                "capture/tenant=acme/type=t.a/date=2026-12-02/hour=05/pi-1.0123456789ab.0000000000000042.jsonl.gz",
            ]
        );
        assert_eq!(
            gunzip(&objects[keys[2]]),
            concat!(
                "{\"id\":\"1\",\"type\":\"t.a\",\"source\":\"/gateways/pi-1/x\"}\n",
                "{\"id\":\"3\",\"type\":\"t.a\",\"source\":\"/gateways/pi-1/x\"}\n",
            )
        );
        assert_eq!(gunzip(&objects[keys[0]]), "not json\n");
        // A roll written again after a crash gives byte-identical objects.
        assert_eq!(
            objects,
            roll_objects(&f, "0123456789ab", 42, lines.as_bytes())
        );
    }
}
