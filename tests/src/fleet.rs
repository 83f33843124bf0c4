//! The relay's fleet view from outside: `[[operators]]` in a relay config, requests with
//! any path and headers (the bare [`crate::http_get`] sends neither), the stream lines of
//! one gateway as stored (their bytes are what the fleet counts), and `promtool` when
//! it is installed.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Adds one `[[operators]]` table per `(name, token)` to a relay config.
pub fn add_operators(t: &mut toml::Table, operators: &[(&str, &str)]) {
    let tables = operators
        .iter()
        .map(|(name, token)| {
            let mut o = toml::Table::new();
            o.insert("name".into(), (*name).into());
            o.insert("token".into(), (*token).into());
            toml::Value::Table(o)
        })
        .collect::<Vec<_>>();
    t.insert("operators".into(), tables.into());
}

/// An answer: status code, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; `Null` if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

/// `GET path` on 127.0.0.1:`port` as written (no normalisation: `..` stays), with a bearer
/// `token` if given, over a fresh connection (5 s timeout).
pub async fn get_with_token(port: u16, path: &str, token: Option<&str>) -> Result<Answer, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        parse(&String::from_utf8_lossy(&buf))
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(r) => r,
        Err(_) => Err("no answer within 5 s".to_string()),
    }
}

fn parse(text: &str) -> Result<Answer, String> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP response: {:?}",
                head.chars().take(80).collect::<String>()
            )
        })?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// Every complete line of `gateway`'s stream files under `stream_dir` (as stored, without
/// the line break), in file order.
pub fn gateway_stream_lines(stream_dir: &Path, gateway: &str) -> Vec<String> {
    fn walk(d: &Path, out: &mut Vec<std::path::PathBuf>) {
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
    let mut files = Vec::new();
    walk(&stream_dir.join(gateway), &mut files);
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            // A last line without its line break is still being written.
            let complete = text.rfind('\n').map_or("", |i| &text[..i]);
            complete
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `promtool check metrics` on `exposition`: `None` when promtool is not installed (Debian
/// package `prometheus`), else its verdict (lint warnings included in the error).
pub async fn promtool_check_metrics(exposition: &str) -> Option<Result<(), String>> {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let text = exposition.to_owned();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(text.as_bytes()).await;
    });
    let out = child.wait_with_output().await.ok()?;
    let _ = writer.await;
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}
