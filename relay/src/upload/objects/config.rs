//! `[objects]` and `[objects.s3]`: where uploaded files go and how events point at
//! them, checked into [`ObjectSettings`].

use std::path::Path;

use pigeon_shared::units::{ByteSize, Duration};
use serde::Deserialize;

use crate::config::error::{ConfigError, invalid};

/// `[objects]`: where uploaded files are stored, and how events point at them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectsConfig {
    pub kind: ObjectsKind,
    /// The prefix of every `dataref`; absent: `file://` and the absolute path of
    /// `<data_dir>/objects/`, or `s3://<bucket>/<prefix>objects/`.
    pub base_url: Option<String>,
    pub s3: S3Config,
}

/// `objects.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectsKind {
    /// Files under `<data_dir>/objects/`.
    #[default]
    Files,
    /// An S3 bucket (AWS or S3-compatible).
    S3,
}

/// `[objects.s3]`: the bucket uploaded files go to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    /// Absent: the SDK's chain (`AWS_REGION`, the profile, instance metadata).
    pub region: Option<String>,
    /// Absent: AWS's own endpoint for the region.
    pub endpoint: Option<String>,
    pub path_style: bool,
    /// Prepended to every key, e.g. `"pigeon/"`.
    pub prefix: String,
    /// Both or neither; absent: the SDK's credential chain.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub part_size: ByteSize,
    pub timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            region: None,
            endpoint: None,
            path_style: false,
            prefix: String::new(),
            access_key_id: None,
            secret_access_key: None,
            part_size: ByteSize::mib(8),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Checked `[objects]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSettings {
    /// Ends with `/`; the object key follows it.
    pub base_url: String,
    /// `None`: files under `<data_dir>/objects/`.
    pub s3: Option<S3Settings>,
}

/// Checked `[objects.s3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub path_style: bool,
    /// Empty or ending in `/`.
    pub prefix: String,
    /// (access key id, secret access key).
    pub static_keys: Option<(String, String)>,
    /// A multiple of 1 MiB, 5 MiB to 5 GiB.
    pub part_size: u64,
    pub timeout: std::time::Duration,
}

/// S3's smallest part (but the last) and largest part.
pub const MIN_PART_SIZE: u64 = 5 << 20;
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// S3's most parts in one upload.
pub const MAX_PARTS: u64 = 10_000;

/// A `file://` URL for an absolute path: bytes other than `A-Z a-z 0-9 - . _ ~ /` are
/// percent-encoded, so a data dir with spaces still gives a valid URL.
pub fn file_url(path: &Path) -> String {
    use std::fmt::Write as _;
    use std::os::unix::ffi::OsStrExt;
    let mut url = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            url.push(b as char);
        } else {
            let _ = write!(url, "%{b:02X}");
        }
    }
    url
}

/// Where uploaded files go in the bucket, after `objects.s3.prefix`.
pub const OBJECTS_PREFIX: &str = "objects";

impl ObjectsConfig {
    pub fn validate_s3(&self, max_object_bytes: u64) -> Result<Option<S3Settings>, ConfigError> {
        if self.kind == ObjectsKind::Files {
            return Ok(None);
        }
        let c = &self.s3;
        // Bucket names: 3-63 of a-z 0-9 . - (AWS's rules; S3-compatible servers agree).
        let b = &c.bucket;
        if b.is_empty() {
            return Err(invalid(
                "objects.s3.bucket",
                "must be set when objects.kind = \"s3\"",
            ));
        }
        if b.len() < 3
            || b.len() > 63
            || !b
                .bytes()
                .all(|x| matches!(x, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'))
        {
            return Err(invalid(
                "objects.s3.bucket",
                format!("({b:?}) must be 3 to 63 characters from a-z 0-9 . -"),
            ));
        }
        if let Some(e) = &c.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(invalid(
                "objects.s3.endpoint",
                format!("({e:?}) must be a URL starting with http:// or https://"),
            ));
        }
        let p = &c.prefix;
        if !p.is_empty()
            && (!p.ends_with('/')
                || p.starts_with('/')
                || p.contains("//")
                || p.chars().any(|ch| ch.is_control()))
        {
            return Err(invalid(
                "objects.s3.prefix",
                format!(
                    "({p:?}) must end with \"/\", not start with one, and hold no empty segment or control character"
                ),
            ));
        }
        let static_keys = match (&c.access_key_id, &c.secret_access_key) {
            (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => Some((k.clone(), s.clone())),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "objects.s3.access_key_id",
                    "and secret_access_key go together: set both (non-empty) or neither",
                ));
            }
        };
        let part = c.part_size.get();
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part) || !part.is_multiple_of(1 << 20) {
            return Err(invalid(
                "objects.s3.part_size",
                format!("({part} bytes) must be a whole number of MiB from 5MiB to 5GiB"),
            ));
        }
        if max_object_bytes.div_ceil(part) > MAX_PARTS {
            return Err(invalid(
                "objects.s3.part_size",
                format!(
                    "({part} bytes) is too small for limits.max_object_bytes ({max_object_bytes}): S3 takes at most {MAX_PARTS} parts"
                ),
            ));
        }
        if c.timeout.get() < std::time::Duration::from_secs(1) {
            return Err(invalid("objects.s3.timeout", "must be at least 1s"));
        }
        Ok(Some(S3Settings {
            bucket: b.clone(),
            region: c.region.clone().filter(|r| !r.is_empty()),
            endpoint: c.endpoint.clone(),
            path_style: c.path_style,
            prefix: p.clone(),
            static_keys,
            part_size: part,
            timeout: c.timeout.get(),
        }))
    }
}

impl ObjectsConfig {
    /// Checks `[objects]`: the bucket, if any, and the base URL of `dataref`s (by
    /// default the objects under the absolute `data_dir`).
    pub fn validate(
        &self,
        data_dir: &Path,
        max_object_bytes: u64,
    ) -> Result<ObjectSettings, ConfigError> {
        let s3 = self.validate_s3(max_object_bytes)?;
        let base_url = match &self.base_url {
            None => match &s3 {
                None => format!(
                    "{}/",
                    file_url(&data_dir.join(crate::data_dir::OBJECTS_DIR))
                ),
                Some(s) => format!("s3://{}/{}{}/", s.bucket, s.prefix, OBJECTS_PREFIX),
            },
            Some(url) => {
                if !url.ends_with('/') {
                    return Err(invalid(
                        "objects.base_url",
                        format!("({url:?}) must end with \"/\": the object key is appended to it"),
                    ));
                }
                if !url.contains(':') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(invalid(
                        "objects.base_url",
                        format!(
                            "({url:?}) must be a URL such as \"s3://bucket/prefix/\", without spaces"
                        ),
                    ));
                }
                url.clone()
            }
        };

        Ok(ObjectSettings { base_url, s3 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `limits.max_object_bytes` by default.
    const MAX_OBJECT_BYTES: u64 = 4 << 30;

    fn check(toml: &str, max_object_bytes: u64) -> Result<ObjectSettings, String> {
        let c: ObjectsConfig = toml::from_str(toml).map_err(|e| e.to_string())?;
        c.validate(Path::new("/srv/relay"), max_object_bytes)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn objects_in_s3() {
        let c = check(
            r#"
            kind = "s3"
            [s3]
            bucket = "pigeon-files"
            endpoint = "http://127.0.0.1:3900"
            path_style = true
            prefix = "site-1/"
            access_key_id = "GK1"
            secret_access_key = "secret"
            part_size = "16MiB"
            "#,
            MAX_OBJECT_BYTES,
        )
        .unwrap();
        let s = c.s3.clone().unwrap();
        assert_eq!(s.bucket, "pigeon-files");
        assert_eq!(s.part_size, 16 << 20);
        assert_eq!(s.static_keys, Some(("GK1".into(), "secret".into())));
        assert_eq!(s.region, None);
        // The default base URL names the bucket's objects/.
        assert_eq!(c.base_url, "s3://pigeon-files/site-1/objects/");
        // Files by default, whatever [objects.s3] says.
        let files = check("[s3]\nbucket = \"b\"\n", MAX_OBJECT_BYTES).unwrap();
        assert_eq!(files.s3, None);
        assert_eq!(files.base_url, "file:///srv/relay/objects/");

        let s3 = |rest: &str| format!("kind = \"s3\"\n[s3]\n{rest}\n");
        for (toml, key) in [
            (s3(""), "objects.s3.bucket"),
            (s3("bucket = \"Upper_Case\""), "objects.s3.bucket"),
            (s3("bucket = \"ab\""), "objects.s3.bucket"),
            (
                s3("bucket = \"b-1\"\nendpoint = \"127.0.0.1:3900\""),
                "objects.s3.endpoint",
            ),
            (
                s3("bucket = \"b-1\"\nprefix = \"no-slash\""),
                "objects.s3.prefix",
            ),
            (
                s3("bucket = \"b-1\"\nprefix = \"/abs/\""),
                "objects.s3.prefix",
            ),
            (
                s3("bucket = \"b-1\"\nprefix = \"a//b/\""),
                "objects.s3.prefix",
            ),
            (
                s3("bucket = \"b-1\"\naccess_key_id = \"k\""),
                "objects.s3.access_key_id",
            ),
            (
                s3("bucket = \"b-1\"\npart_size = \"4MiB\""),
                "objects.s3.part_size",
            ),
            (
                s3("bucket = \"b-1\"\npart_size = \"5000000\""),
                "objects.s3.part_size",
            ),
            (
                s3("bucket = \"b-1\"\ntimeout = \"0s\""),
                "objects.s3.timeout",
            ),
            (s3("bucket = \"b-1\"\nregion = 3"), "region = 3"),
            (s3("bucket = \"b-1\"\nbukket = \"x\""), "bukket"),
        ] {
            let e = check(&toml, MAX_OBJECT_BYTES).map(drop).unwrap_err();
            assert!(e.contains(key), "{toml:?} -> {e}");
        }
        // 4 GiB in 5 MiB parts needs 820 parts: fine; S3 takes 10,000 parts at most.
        let five = s3("bucket = \"b-1\"\npart_size = \"5MiB\"");
        assert!(check(&five, MAX_OBJECT_BYTES).is_ok());
        let e = check(&five, 100 << 30).map(drop).unwrap_err();
        assert!(e.contains("10000 parts"), "{e}");
    }

    #[test]
    fn file_urls_encode_what_is_not_plain() {
        assert_eq!(
            file_url(Path::new("/var/lib/pigeon-relay/objects")),
            "file:///var/lib/pigeon-relay/objects"
        );
        assert_eq!(file_url(Path::new("/a b/ü%")), "file:///a%20b/%C3%BC%25");
    }
}
