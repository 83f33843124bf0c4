//! Helpers for the black-box tests: the real `pigeon-relay` binary on a free loopback
//! port with a temporary data dir, and a tiny blocking HTTP/1.1 client that can send
//! anything (including bodies that are not what they claim to be).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

pub const TOKEN_1: &str = "token-of-pi-1-0123456789";
pub const TOKEN_2: &str = "token-of-pi-2-0123456789";

pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pigeon-relay")
}

/// A port nobody listens on right now (bind :0, read it, close).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A running relay process.
pub struct Relay {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config_path: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Relay {
    /// The config every test starts from: pi-1 and pi-2 with tokens, plus `extra`
    /// (top-level keys first, then tables).
    pub fn config_text(port: u16, data_dir: &Path, top: &str, tables: &str) -> String {
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = {data_dir:?}\n{top}\n{tables}\n\
             [[gateways]]\nid = \"pi-1\"\ntoken = \"{TOKEN_1}\"\n\n\
             [[gateways]]\nid = \"pi-2\"\ntoken_sha256 = \"{}\"\n",
            sha256_hex(TOKEN_2),
        )
    }

    /// Starts a relay with the default test config.
    pub fn start() -> Relay {
        Relay::start_with("", "")
    }

    /// Starts a relay with extra top-level keys and tables, and waits until it is ready.
    pub fn start_with(top: &str, tables: &str) -> Relay {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config_path = dir.path().join("relay.toml");
        let text = Relay::config_text(port, &dir.path().join("data"), top, tables);
        std::fs::write(&config_path, text).expect("write config");
        let log_path = dir.path().join("relay.log");
        let mut relay = Relay {
            dir,
            port,
            config_path,
            child: None,
            log_path,
        };
        relay.spawn();
        relay
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the process (again) and waits for `/ready`.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        let child = Command::new(relay_bin())
            .arg("--config")
            .arg(&self.config_path)
            .env("PIGEON_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pigeon-relay");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the relay exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = try_request(self.port, "GET", "/ready", &[], b"")
                && r.status == 200
            {
                return;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!("the relay was not ready within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (at most 20 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("relay is running");
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .expect("run kill");
        assert!(ok.success());
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                panic!(
                    "the relay did not exit within 20 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 20 s) until `/metrics` shows `n` ingest requests in flight.
    pub fn wait_in_flight(&self, n: u64) {
        let want = format!("pigeon_relay_ingest_requests_in_flight {n}\n");
        let start = Instant::now();
        loop {
            let r = request(self.port, "GET", "/metrics", &[], b"");
            if String::from_utf8_lossy(&r.body).contains(&want) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "never saw {n} requests in flight"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The value of one sample of `/metrics`, by its name with labels
    /// (`pigeon_relay_uploads_completed_total{result="accepted"}`); 0 if absent.
    pub fn metric(&self, sample: &str) -> u64 {
        let r = request(self.port, "GET", "/metrics", &[], b"");
        String::from_utf8_lossy(&r.body)
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(name, _)| *name == sample)
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Waits (at most 20 s) until the sample's value satisfies `ok`; returns it.
    pub fn wait_metric(&self, sample: &str, ok: impl Fn(u64) -> bool) -> u64 {
        let start = Instant::now();
        loop {
            let v = self.metric(sample);
            if ok(v) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{sample} stayed at {v}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// POSTs to the ingest endpoint.
    pub fn post(&self, headers: &[(&str, &str)], body: &[u8]) -> Response {
        request(self.port, "POST", "/v1/events", headers, body)
    }

    /// POSTs a batch (gzip'd) as pi-1.
    pub fn post_batch(&self, events: &[Value]) -> Response {
        self.post_batch_with(events, &[])
    }

    pub fn post_batch_with(&self, events: &[Value], extra: &[(&str, &str)]) -> Response {
        let body = gzip(&serde_json::to_vec(events).expect("json"));
        let auth = format!("Bearer {TOKEN_1}");
        let mut headers = vec![
            ("content-type", "application/cloudevents-batch+json"),
            ("content-encoding", "gzip"),
            ("authorization", auth.as_str()),
        ];
        headers.extend_from_slice(extra);
        self.post(&headers, &body)
    }

    /// Every line of every stream file, as JSON, in path order.
    pub fn stream_events(&self) -> Vec<Value> {
        stream_files(&self.data_dir())
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .expect("read stream file")
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).expect("stream line is JSON"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The `id`s in the stream, in order.
    pub fn stream_ids(&self) -> Vec<String> {
        self.stream_events()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every `.jsonl` file under `<data>/stream`, sorted.
pub fn stream_files(data: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(d) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "jsonl") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data.join("stream"), &mut out);
    out.sort();
    out
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `status` of each per-event result.
    pub fn statuses(&self) -> Vec<String> {
        let v = self.json();
        v["results"]
            .as_array()
            .unwrap_or_else(|| panic!("no results in {v}"))
            .iter()
            .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(port, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} failed: {e}"))
}

/// One request on a fresh connection (`Connection: close`). The body is written from
/// another thread while this one reads, so a server that answers early is seen.
pub fn try_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut writer = stream.try_clone()?;
    let mut payload = head.into_bytes();
    payload.extend_from_slice(body);
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&payload);
    });
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let _ = sender.join();
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::other(format!("bad HTTP response: {what}"));
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

pub fn sha256_hex(s: &str) -> String {
    sha256_of(s.as_bytes())
}

pub fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A valid event from pi-1's MQTT input.
pub fn event(producer: &str, seq: u64) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("{producer}-{seq}"),
        "type": "pigeon.mqtt.message",
        "source": "/gateways/pi-1/mqtt",
        "subject": "sensors/t1",
        "time": "2024-05-01T12:00:00Z",
        "datacontenttype": "application/json",
        "data": {"n": seq, "celsius": 21.5},
        "sequence": pigeon_shared::ce::format_sequence(seq),
        "producerid": producer,
    })
}

/// Runs the binary with arguments; returns (exit code, stdout, stderr).
pub fn run_bin(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(relay_bin())
        .args(args)
        .env("PIGEON_LOG", "warn")
        .output()
        .expect("run pigeon-relay");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A connection driven by hand: send part of a request, do something else, send the rest.
pub struct RawConn {
    stream: TcpStream,
}

impl RawConn {
    pub fn connect(port: u16) -> RawConn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        RawConn { stream }
    }

    /// Sends the head of a POST to the ingest endpoint announcing `len` body bytes.
    pub fn send_head(&mut self, port: u16, headers: &[(&str, &str)], len: usize) {
        let len = len.to_string();
        let mut all = vec![("content-length", len.as_str())];
        all.extend_from_slice(headers);
        self.send_request_head(port, "POST", "/v1/events", &all);
    }

    /// Sends the head of any request (`Connection: close`); `headers` say how the body
    /// is framed (`content-length` or `transfer-encoding`).
    pub fn send_request_head(
        &mut self,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.send(head.as_bytes());
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Like [`RawConn::send`], but a closed connection is an error, not a panic.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads until the server closes the connection.
    pub fn response(self) -> Response {
        self.try_response().expect("read response")
    }

    /// Like [`RawConn::response`], but a connection reset is an error, not a panic.
    pub fn try_response(mut self) -> std::io::Result<Response> {
        let mut raw = Vec::new();
        self.stream.read_to_end(&mut raw)?;
        parse_response(&raw)
    }
}
