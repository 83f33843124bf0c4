//! The real `pigeon-relay` binary with a generated config.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::http::{http_get, metric_value};
use crate::process::{Proc, free_port, relay_bin};
use crate::stream::{Stream, summarize_numbers};
use crate::{TestDir, fmt_count, secs, wait_until};

/// Puts the `index`th `[[gateways]]` table of a relay config in `tenant`.
pub fn set_gateway_tenant(t: &mut toml::Table, index: usize, tenant: &str) {
    if let Some(toml::Value::Array(gws)) = t.get_mut("gateways")
        && let Some(toml::Value::Table(g)) = gws.get_mut(index)
    {
        g.insert("tenant".into(), tenant.into());
    }
}

/// A relay's `[capture]` table: enabled, with `keys` (e.g. `("roll_age", "1s")`).
pub fn capture_table(keys: &[(&str, &str)]) -> toml::Table {
    let mut c = toml::Table::new();
    c.insert("enabled".into(), true.into());
    for (k, v) in keys {
        c.insert((*k).into(), (*v).into());
    }
    c
}

/// A `pigeon-relay` process: its config, port and data directory survive restarts.
pub struct Relay {
    proc: Proc,
    port: u16,
    /// `[tls]` is configured: the harness asks over HTTPS (without checking the
    /// certificate: the tests that are about TLS check it themselves).
    https: bool,
    config_path: PathBuf,
    data_dir: PathBuf,
}

impl Relay {
    /// Writes a config that accepts `gateways` (`(id, token)` pairs), starts the relay on a
    /// free port and waits until `GET /ready` answers 200.
    pub async fn start(dir: &TestDir, gateways: &[(&str, &str)]) -> Relay {
        Self::start_with(dir, gateways, |_| {}).await
    }

    /// Like [`Relay::start`], with a chance to change the config table (e.g. add
    /// `[limits]`) before it is written.
    pub async fn start_with(
        dir: &TestDir,
        gateways: &[(&str, &str)],
        edit: impl Fn(&mut toml::Table),
    ) -> Relay {
        Self::start_with_env(dir, gateways, edit, &[]).await
    }

    /// Like [`Relay::start_with`], with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub async fn start_with_env(
        dir: &TestDir,
        gateways: &[(&str, &str)],
        edit: impl Fn(&mut toml::Table),
        env: &[(&str, &str)],
    ) -> Relay {
        let config_path = dir.join("relay.toml");
        let data_dir = dir.join("relay");
        let log = dir.log_file("relay");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut table = Relay::config(port, &data_dir, gateways);
            edit(&mut table);
            std::fs::write(&config_path, table.to_string()).expect("write relay.toml");

            let mut proc = Proc::new("relay", relay_bin(), &log)
                .arg("--config")
                .arg(&config_path);
            if std::env::var_os("PIGEON_LOG").is_none() {
                proc = proc.env("PIGEON_LOG", "info");
            }
            for (k, v) in env {
                proc = proc.env(k, v);
            }
            let mut relay = Relay {
                proc,
                port,
                https: table.contains_key("tls"),
                config_path: config_path.clone(),
                data_dir: data_dir.clone(),
            };
            relay.proc.start();
            match relay.try_wait_ready(secs(30)).await {
                Ok(()) => return relay,
                Err(e) if relay.proc.log_text().contains("in use") => last_err = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the relay could not get a free port: {last_err}");
    }

    /// The relay config the harness writes: listen on 127.0.0.1:`port`, keep data in
    /// `data_dir`, accept `gateways` (`(id, token)` pairs).
    pub fn config(port: u16, data_dir: &std::path::Path, gateways: &[(&str, &str)]) -> toml::Table {
        let mut table = toml::Table::new();
        table.insert("listen".into(), format!("127.0.0.1:{port}").into());
        table.insert("data_dir".into(), data_dir.display().to_string().into());
        let gws = gateways
            .iter()
            .map(|(id, token)| {
                let mut g = toml::Table::new();
                g.insert("id".into(), (*id).into());
                g.insert("token".into(), (*token).into());
                toml::Value::Table(g)
            })
            .collect::<Vec<_>>();
        table.insert("gateways".into(), gws.into());
        table
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>` (`https://` with `[tls]`), for the gateway's `relay.url`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// `<data_dir>/stream`, where the relay writes `<gateway>/<date>/<hour>.jsonl`.
    pub fn stream_dir(&self) -> PathBuf {
        self.data_dir.join("stream")
    }

    /// Reads every complete line of the stream files now; panics on a corrupt line.
    pub fn read_stream(&self) -> Stream {
        Stream::read(&self.stream_dir()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM, and a clean exit (status 0) expected.
    pub async fn stop(&mut self) {
        self.proc.stop(secs(20)).await;
    }

    /// Starts the relay again (same port, config and data) and waits until it is ready.
    pub async fn restart(&mut self) {
        self.proc.start();
        if let Err(e) = self.try_wait_ready(secs(30)).await {
            panic!("{e}");
        }
    }

    /// Waits until `GET /ready` answers 200; an error if the process exits or time runs out.
    async fn try_wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.proc.exit_status() {
                return Err(format!(
                    "the relay exited ({status}) before it was ready; its log: {}",
                    self.proc.log_path().display()
                ));
            }
            let last = match self.get("/ready").await {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("GET /ready answered {code}: {body}"),
                Err(e) => format!("GET /ready failed: {e}"),
            };
            if start.elapsed() >= timeout {
                return Err(format!(
                    "the relay was not ready within {:.0} s: {last}",
                    timeout.as_secs_f64()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path` on the relay: status code and body.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        if self.https {
            crate::http::curl_get(&["--insecure"], &format!("{}{path}", self.url())).await
        } else {
            http_get(self.port, path).await
        }
    }

    /// The value of one sample on `GET /metrics` (Prometheus text), e.g.
    /// `pigeon_relay_ingest_requests_total{code="401"}`; `None` if it is not there.
    pub async fn metric(&self, sample: &str) -> Result<Option<f64>, String> {
        let (code, body) = self.get("/metrics").await?;
        if code != 200 {
            return Err(format!("GET /metrics answered {code}"));
        }
        Ok(metric_value(&body, sample))
    }

    /// [`Relay::metric`], 0 when it cannot be read or is not there (a counter not yet
    /// counted, or a relay restarting).
    pub async fn metric_or_zero(&self, sample: &str) -> f64 {
        self.metric(sample).await.ok().flatten().unwrap_or(0.0)
    }

    /// Polls the stream until every number in `expected` is there under `data.<field>`;
    /// panics after `timeout`, naming what is still missing. Returns the stream as read.
    pub async fn wait_for_readings(
        &self,
        field: &str,
        expected: &BTreeSet<u64>,
        timeout: Duration,
    ) -> Stream {
        let start = std::time::Instant::now();
        loop {
            let stream = self.read_stream();
            let missing = stream.missing(field, expected);
            if missing.is_empty() {
                return stream;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "after {:.0} s only {} of {} readings had arrived at the relay ({} events in its stream); missing {}: n={}",
                    start.elapsed().as_secs_f64(),
                    fmt_count(expected.len() - missing.len()),
                    fmt_count(expected.len()),
                    fmt_count(stream.len()),
                    fmt_count(missing.len()),
                    summarize_numbers(&missing)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The end of most tests: waits (at most `timeout`) until every reading in `expected`
    /// has arrived, then until the stream stops growing (so late duplicates would show),
    /// and checks that each arrived exactly once and that sequences are in order.
    pub async fn assert_delivered_exactly_once(
        &self,
        expected: &BTreeSet<u64>,
        timeout: Duration,
    ) -> Stream {
        self.wait_for_readings("n", expected, timeout).await;
        self.wait_for_stream_quiet(Duration::from_secs(2)).await;
        let stream = self.read_stream();
        if let Err(e) = stream.check_exactly_once("n", expected) {
            panic!("{e}");
        }
        if let Err(e) = stream.check_sequences() {
            panic!("{e}");
        }
        stream
    }

    /// Waits until the stream files stop growing for `quiet` (so late duplicates would be
    /// seen); panics if they are still growing after 60 s.
    pub async fn wait_for_stream_quiet(&self, quiet: Duration) {
        let dir = self.stream_dir();
        let mut last = (Stream::count_lines(&dir), std::time::Instant::now());
        wait_until("the relay's stream to stop growing", secs(60), || {
            let now = Stream::count_lines(&dir);
            let result = if now != last.0 {
                last = (now, std::time::Instant::now());
                Err(format!("still growing: {now} lines"))
            } else if last.1.elapsed() < quiet {
                Err(format!(
                    "{now} lines, quiet for {:.1} s",
                    last.1.elapsed().as_secs_f64()
                ))
            } else {
                Ok(())
            };
            async move { result }
        })
        .await
    }
}
