//! A fault-injecting HTTP proxy in front of the real relay: requests whose body contains a
//! marker are answered `500` by the proxy (the relay never sees them), everything else is
//! forwarded, one request per upstream connection. HTTP/1.1 with `Content-Length` bodies
//! only — what pigeon-gateway sends with `relay.compression = "none"` and what the relay
//! answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running proxy from a free loopback port to 127.0.0.1:`target`; stops when dropped.
pub struct FailingProxy {
    port: u16,
    failed: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl FailingProxy {
    /// Answers `500` to every request whose body contains `marker`.
    pub async fn start(target: u16, marker: &str) -> FailingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let failed: Arc<AtomicU64> = Arc::default();
        let marker = Arc::new(marker.as_bytes().to_vec());
        let accept = {
            let failed = failed.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(serve(client, target, marker.clone(), failed.clone()));
                }
            })
        };
        FailingProxy {
            port,
            failed,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Requests answered `500`.
    pub fn failed(&self) -> u64 {
        self.failed.load(Relaxed)
    }
}

impl Drop for FailingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One HTTP message: its head (through the blank line) and its body.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Vec<u8>, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = buf[..head_end].to_vec();
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 64 * 1024];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((head, body))
}

async fn serve(mut client: TcpStream, target: u16, marker: Arc<Vec<u8>>, failed: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    while let Some((head, body)) = read_message(&mut client, &mut buf).await {
        let answer = if body.windows(marker.len()).any(|w| w == marker.as_slice()) {
            failed.fetch_add(1, Relaxed);
            let msg = br#"{"error":"injected failure"}"#;
            let mut a = format!(
                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                msg.len()
            )
            .into_bytes();
            a.extend_from_slice(msg);
            a
        } else {
            let Ok(mut up) = TcpStream::connect(("127.0.0.1", target)).await else {
                return;
            };
            if up.write_all(&head).await.is_err() || up.write_all(&body).await.is_err() {
                return;
            }
            let mut ubuf = Vec::new();
            let Some((h, b)) = read_message(&mut up, &mut ubuf).await else {
                return;
            };
            [h, b].concat()
        };
        if client.write_all(&answer).await.is_err() {
            return;
        }
    }
}
