//! A real S3-compatible server (garage, single node) on loopback behind a fault-injecting
//! [`Proxy`], and a real S3 client (aws-sdk-s3) that reads back what the relay stored.
//!
//! Garage keeps its data on disk in the test's directory; [`Garage::set_down`] makes it
//! unreachable through the proxy without losing anything.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

use crate::process::{Proc, free_port, server_bin};
use crate::proxy::Proxy;
use crate::{TestDir, secs, wait_until};

/// The bucket every test uses (garage creates it at start).
pub const BUCKET: &str = "pigeon-test";
/// The key garage creates for [`BUCKET`] (for other S3 clients, e.g. a benchmark's).
pub const ACCESS_KEY: &str = "GK0123456789abcdef01234567";
pub const SECRET_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// The region garage is configured with (what S3 clients assume by default).
pub const REGION: &str = "us-east-1";

/// The garage binary: `$GARAGE_BIN`, or `garage` on `PATH` (scripts/install-test-deps).
pub fn garage_bin() -> PathBuf {
    server_bin("garage", "GARAGE_BIN")
}

/// An object in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub key: String,
    pub size: u64,
}

/// A running garage (SIGKILLed when dropped) and the proxy in front of its S3 API.
pub struct Garage {
    proc: Proc,
    proxy: Proxy,
    client: Client,
}

impl Garage {
    /// Starts garage with [`BUCKET`] and a key for it, and waits until the bucket answers.
    pub async fn start(dir: &TestDir) -> Garage {
        let log = dir.log_file("garage");
        let root = dir.join("garage");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let (s3_port, rpc_port) = (free_port(), free_port());
            let config = root.join("garage.toml");
            std::fs::create_dir_all(&root).expect("garage dir");
            std::fs::write(
                &config,
                format!(
                    r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
                    meta = root.join("meta").display(),
                    data = root.join("data").display(),
                    secret = "ab".repeat(32),
                ),
            )
            .expect("write garage.toml");
            let proxy = Proxy::start(s3_port).await;
            let mut proc = Proc::new("garage", garage_bin(), &log)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .arg("--single-node")
                .arg("--default-bucket")
                .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY)
                .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_KEY)
                .env("GARAGE_DEFAULT_BUCKET", BUCKET)
                .env("RUST_LOG", "garage=warn");
            proc.start();
            let client = client(&format!("http://127.0.0.1:{}", proxy.port()));
            let mut g = Garage {
                proc,
                proxy,
                client,
            };
            let up = g.wait_for_bucket(secs(30)).await;
            if up.is_ok() && g.proc.is_running() {
                return g;
            }
            last_err = format!("{up:?}: {}", g.proc.log_text());
            g.proc.kill();
            if !last_err.contains("in use") {
                panic!("garage did not start: {last_err}");
            }
        }
        panic!("garage could not get free ports: {last_err}");
    }

    async fn wait_for_bucket(&self, timeout: Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.client.head_bucket().bucket(BUCKET).send().await {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The S3 endpoint (the proxy) for `objects.s3.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy.port())
    }

    /// The relay's `[objects]` table for this server: kind s3, path-style, static keys,
    /// parts of `part_size`.
    pub fn objects_table(&self, part_size: &str) -> toml::Table {
        let mut s3 = toml::Table::new();
        s3.insert("bucket".into(), BUCKET.into());
        s3.insert("endpoint".into(), self.endpoint().into());
        s3.insert("region".into(), REGION.into());
        s3.insert("path_style".into(), true.into());
        s3.insert("access_key_id".into(), ACCESS_KEY.into());
        s3.insert("secret_access_key".into(), SECRET_KEY.into());
        s3.insert("part_size".into(), part_size.into());
        s3.insert("timeout".into(), "10s".into());
        let mut objects = toml::Table::new();
        objects.insert("kind".into(), "s3".into());
        objects.insert("s3".into(), s3.into());
        objects
    }

    /// While `on`, S3 is unreachable (the proxy refuses and cuts connections).
    pub fn set_down(&self, on: bool) {
        self.proxy.set_down(on);
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Every object whose key starts with `prefix`, by key.
    pub async fn list(&self, prefix: &str) -> BTreeMap<String, StoredObject> {
        let mut out = BTreeMap::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(BUCKET)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .unwrap_or_else(|e| panic!("ListObjectsV2: {}", show(&e)));
            for o in page.contents() {
                let key = o.key().unwrap_or_default().to_owned();
                out.insert(
                    key.clone(),
                    StoredObject {
                        key,
                        size: o.size().unwrap_or(0) as u64,
                    },
                );
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return out,
            }
        }
    }

    /// An object's bytes and its user metadata.
    pub async fn get(&self, key: &str) -> (Vec<u8>, BTreeMap<String, String>) {
        let out = self
            .client
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GetObject {key}: {}", show(&e)));
        let meta = out
            .metadata()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let bytes = out
            .body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("GetObject {key} body: {e}"))
            .into_bytes()
            .to_vec();
        (bytes, meta)
    }

    /// Deletes the object at `key` (to stand for one a crash never wrote).
    pub async fn delete(&self, key: &str) {
        self.client
            .delete_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DeleteObject {key}: {}", show(&e)));
    }

    /// Every capture object under `prefix` (e.g. `capture/`), gunzipped: key → its lines
    /// parsed as JSON. A line that does not parse is a panic.
    pub async fn capture(&self, prefix: &str) -> BTreeMap<String, Vec<serde_json::Value>> {
        use std::io::Read as _;
        let mut out = BTreeMap::new();
        for key in self.list(prefix).await.into_keys() {
            let (gz, _) = self.get(&key).await;
            let mut text = String::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_string(&mut text)
                .unwrap_or_else(|e| panic!("{key} is not gzip: {e}"));
            let events = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{key}: {e}: {l:?}")))
                .collect();
            out.insert(key, events);
        }
        out
    }

    /// Waits until the capture objects under `capture/` hold at least `n` events, then
    /// three seconds more (a duplicate written late would show by then); key → events.
    pub async fn wait_for_capture(&self, n: usize) -> BTreeMap<String, Vec<serde_json::Value>> {
        crate::wait_until(
            &format!("{n} events in capture"),
            crate::secs(120),
            || async {
                let have: usize = self.capture("capture/").await.values().map(Vec::len).sum();
                if have >= n {
                    Ok(())
                } else {
                    Err(format!("{have} of {n}"))
                }
            },
        )
        .await;
        tokio::time::sleep(crate::secs(3)).await;
        self.capture("capture/").await
    }

    /// The keys of the multipart uploads not completed (nor aborted) yet.
    pub async fn unfinished_uploads(&self) -> Vec<String> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(BUCKET)
            .send()
            .await
            .unwrap_or_else(|e| panic!("ListMultipartUploads: {}", show(&e)));
        out.uploads()
            .iter()
            .map(|u| u.key().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until no multipart upload is left unfinished.
    pub async fn wait_for_no_unfinished_uploads(&self) {
        wait_until("no unfinished multipart uploads", secs(30), || async {
            let left = self.unfinished_uploads().await;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        })
        .await;
    }
}

fn show<E: std::error::Error + 'static, R: std::fmt::Debug>(
    e: &aws_sdk_s3::error::SdkError<E, R>,
) -> String {
    aws_sdk_s3::error::DisplayErrorContext(e).to_string()
}

fn client(endpoint: &str) -> Client {
    let http = aws_smithy_http_client::Builder::new().build_http();
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(endpoint)
        .region(Region::new(REGION))
        .force_path_style(true)
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
        .build();
    Client::from_conf(conf)
}
