//! The real `pigeon-gateway` binary with a generated config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::http::{http_get, metric_value};
use crate::process::{Proc, free_port, gateway_bin, run_command};
use crate::readings::READING_TYPE;
use crate::{Mosquitto, TestDir, secs, wait_until};

/// How the gateway authenticates to the relay.
#[derive(Debug, Clone)]
pub enum Token {
    /// `relay.token = "…"`
    Inline(String),
    /// `relay.token_file = "…"`: the harness writes the token to this file.
    File(PathBuf, String),
    /// No token (a gateway identified by its client certificate).
    None,
}

/// One `[[mqtt.subscriptions]]` entry.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub filter: String,
    pub qos: u8,
    pub event_type: String,
    /// `ttl`, e.g. `"2s"`; `None` leaves it out.
    pub ttl: Option<String>,
}

/// What the harness writes into the gateway's TOML config.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub id: String,
    pub relay_url: String,
    pub token: Token,
    pub mqtt_port: u16,
    /// `mqtt.client_id`; `None` leaves the gateway's default (`pigeon-<id>`).
    pub client_id: Option<String>,
    pub subscriptions: Vec<Subscription>,
    /// More `[mqtt]` keys, e.g. `max_pending` or `max_packet_size`.
    pub mqtt_options: toml::Table,
    /// More `[relay]` keys, e.g. `max_upload_rate`.
    pub relay_options: toml::Table,
    /// `http.listen = "127.0.0.1:<port>"`; `None` writes `http.enabled = false`.
    pub http_port: Option<u16>,
    /// `health.interval`; `None` (the default here, so that tests can count the events
    /// they publish) writes `health.enabled = false`.
    pub health_interval: Option<String>,
    /// `gateway.shutdown_timeout`; `None` leaves the gateway's default.
    pub shutdown_timeout: Option<String>,
    /// Whether to write the `[mqtt]` section (true by default); file tests may not need a
    /// broker.
    pub mqtt_enabled: bool,
    /// The `[files]` section (see [`crate::files_section`]); `None` leaves it out.
    pub files: Option<toml::Table>,
    /// Run the gateway as `nobody` (through `setpriv`), so that file permissions mean
    /// something when the tests run as root. The harness makes its directories usable.
    pub run_as_nobody: bool,
    /// More keys for each `[[mqtt.subscriptions]]` block, by index (e.g. `priority`).
    pub subscription_options: Vec<toml::Table>,
    /// More top-level sections or keys (e.g. `[outbox]`), merged into the config.
    pub extra: toml::Table,
}

impl GatewayConfig {
    /// Gateway `id` with `token`, pointed at the relay at `relay_url` and the broker on
    /// 127.0.0.1:`mqtt_port`, subscribed to `org/#` at QoS 1 with type [`READING_TYPE`],
    /// its HTTP endpoint on a free port, no heartbeats.
    pub fn new(id: &str, token: &str, relay_url: &str, mqtt_port: u16) -> Self {
        GatewayConfig {
            id: id.to_string(),
            relay_url: relay_url.to_string(),
            token: Token::Inline(token.to_string()),
            mqtt_port,
            client_id: None,
            subscriptions: vec![Subscription {
                filter: "org/#".to_string(),
                qos: 1,
                event_type: READING_TYPE.to_string(),
                ttl: None,
            }],
            mqtt_options: toml::Table::new(),
            relay_options: toml::Table::new(),
            http_port: Some(free_port()),
            health_interval: None,
            shutdown_timeout: None,
            mqtt_enabled: true,
            files: None,
            run_as_nobody: false,
            subscription_options: Vec::new(),
            extra: toml::Table::new(),
        }
    }

    /// A gateway without MQTT that watches the drop directories in `files` (a `[files]`
    /// table, see [`crate::files_section`]).
    pub fn for_files(id: &str, token: &str, relay_url: &str, files: toml::Table) -> Self {
        GatewayConfig {
            mqtt_enabled: false,
            files: Some(files),
            ..GatewayConfig::new(id, token, relay_url, 0)
        }
    }

    /// The MQTT client id the gateway connects with.
    pub fn effective_client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("pigeon-{}", self.id))
    }

    /// The config as a TOML table, with the outbox in `data_dir`. Tests may edit it
    /// (e.g. add an unknown key) before writing it.
    pub fn to_toml(&self, data_dir: &Path) -> toml::Table {
        let mut gateway = toml::Table::new();
        gateway.insert("id".into(), self.id.clone().into());
        gateway.insert("data_dir".into(), data_dir.display().to_string().into());
        if let Some(t) = &self.shutdown_timeout {
            gateway.insert("shutdown_timeout".into(), t.clone().into());
        }

        let mut relay = toml::Table::new();
        relay.insert("url".into(), self.relay_url.clone().into());
        match &self.token {
            Token::Inline(t) => {
                relay.insert("token".into(), t.clone().into());
            }
            Token::File(path, _) => {
                relay.insert("token_file".into(), path.display().to_string().into());
            }
            Token::None => {}
        }

        relay.extend(self.relay_options.clone());

        let mut mqtt = toml::Table::new();
        mqtt.insert("host".into(), "127.0.0.1".into());
        mqtt.insert("port".into(), i64::from(self.mqtt_port).into());
        if let Some(c) = &self.client_id {
            mqtt.insert("client_id".into(), c.clone().into());
        }
        let subs = self
            .subscriptions
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut t = self
                    .subscription_options
                    .get(i)
                    .cloned()
                    .unwrap_or_default();
                t.insert("filter".into(), s.filter.clone().into());
                t.insert("qos".into(), i64::from(s.qos).into());
                t.insert("type".into(), s.event_type.clone().into());
                if let Some(ttl) = &s.ttl {
                    t.insert("ttl".into(), ttl.clone().into());
                }
                toml::Value::Table(t)
            })
            .collect::<Vec<_>>();
        mqtt.insert("subscriptions".into(), subs.into());
        mqtt.extend(self.mqtt_options.clone());

        let mut health = toml::Table::new();
        health.insert("enabled".into(), self.health_interval.is_some().into());
        if let Some(i) = &self.health_interval {
            health.insert("interval".into(), i.clone().into());
        }

        let mut http = toml::Table::new();
        http.insert("enabled".into(), self.http_port.is_some().into());
        if let Some(port) = self.http_port {
            http.insert("listen".into(), format!("127.0.0.1:{port}").into());
        }

        let mut root = toml::Table::new();
        root.insert("gateway".into(), gateway.into());
        root.insert("relay".into(), relay.into());
        if self.mqtt_enabled {
            root.insert("mqtt".into(), mqtt.into());
        }
        if let Some(files) = &self.files {
            root.insert("files".into(), files.clone().into());
        }
        root.extend(self.extra.clone());
        root.insert("health".into(), health.into());
        root.insert("http".into(), http.into());
        root
    }

    /// Writes the config (and the token file, if any) to `path`.
    pub fn write(&self, path: &Path, data_dir: &Path) {
        if let Token::File(token_path, token) = &self.token {
            std::fs::write(token_path, format!("{token}\n")).expect("write token file");
        }
        std::fs::write(path, self.to_toml(data_dir).to_string()).expect("write gateway config");
    }
}

/// A `pigeon-gateway` process: its config and outbox directory survive restarts.
pub struct Gateway {
    proc: Proc,
    config: GatewayConfig,
    config_path: PathBuf,
    data_dir: PathBuf,
}

impl Gateway {
    /// Writes the config and starts the gateway, without waiting for anything.
    pub fn start(dir: &TestDir, config: GatewayConfig) -> Gateway {
        Self::start_with_env(dir, config, &[])
    }

    /// Like [`Gateway::start`], with extra environment variables (e.g. `NOTIFY_SOCKET`),
    /// kept for restarts.
    pub fn start_with_env(dir: &TestDir, config: GatewayConfig, env: &[(&str, &str)]) -> Gateway {
        let label = format!("gateway-{}", config.id);
        let config_path = dir.join(format!("{label}.toml"));
        let data_dir = dir.join(&label);
        config.write(&config_path, &data_dir);
        let mut proc = if config.run_as_nobody {
            make_usable_by_nobody(dir.path(), &data_dir);
            // setpriv executes the gateway in its own place (no fork), so signals reach it.
            Proc::new(&label, "setpriv", dir.log_file(&label))
                .arg("--reuid=65534")
                .arg("--regid=65534")
                .arg("--clear-groups")
                .arg("--")
                .arg(gateway_bin())
        } else {
            Proc::new(&label, gateway_bin(), dir.log_file(&label))
        }
        .arg("--config")
        .arg(&config_path);
        if std::env::var_os("PIGEON_LOG").is_none() {
            proc = proc.env("PIGEON_LOG", "info");
        }
        for (k, v) in env {
            proc = proc.env(k, v);
        }
        let mut gw = Gateway {
            proc,
            config,
            config_path,
            data_dir,
        };
        gw.proc.start();
        gw
    }

    /// The spool directory (`files.spool_dir`, by default `<data dir>/spool`).
    pub fn spool_dir(&self) -> PathBuf {
        self.config
            .files
            .as_ref()
            .and_then(|f| f.get("spool_dir"))
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| self.data_dir.join("spool"))
    }

    /// Starts a gateway with a `[files]` section and waits until it watches every one of
    /// its drop directories.
    pub async fn start_watching(dir: &TestDir, config: GatewayConfig) -> Gateway {
        let watches = config
            .files
            .as_ref()
            .and_then(|f| f.get("watch"))
            .and_then(|w| w.as_array())
            .map_or(0, Vec::len);
        let gw = Gateway::start(dir, config);
        gw.wait_watching(watches).await;
        gw
    }

    /// Waits until the gateway has logged that it watches `n` drop directories (over all
    /// its starts), so that files written afterwards are seen as they are written.
    pub async fn wait_watching(&self, n: usize) {
        wait_until(
            "the gateway to watch its drop directories",
            secs(20),
            || {
                let seen = self
                    .log_text()
                    .matches("Watching a drop directory.")
                    .count();
                async move {
                    if seen >= n {
                        Ok(())
                    } else {
                        Err(format!("{seen} of {n} watches set up"))
                    }
                }
            },
        )
        .await
    }

    /// Starts the gateway and waits until the broker has logged its subscriptions, so that
    /// nothing published afterwards can miss its (persistent) session.
    pub async fn start_subscribed(
        dir: &TestDir,
        config: GatewayConfig,
        mosquitto: &Mosquitto,
    ) -> Gateway {
        let mut gw = Gateway::start(dir, config);
        gw.wait_subscribed(mosquitto).await;
        gw
    }

    /// Waits until the broker has logged every configured subscription of this gateway.
    pub async fn wait_subscribed(&mut self, mosquitto: &Mosquitto) {
        if !self.config.mqtt_enabled {
            return;
        }
        let client_id = self.config.effective_client_id();
        for s in &self.config.subscriptions {
            mosquitto
                .wait_for_subscription(&client_id, &s.filter, secs(30))
                .await;
        }
        self.proc.assert_running();
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The directory that holds the outbox database.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Total size of the files in the data directory (outbox database, WAL, spool).
    pub fn data_dir_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(p) else {
                return 0;
            };
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.data_dir)
    }

    /// Everything the gateway logged, over all its starts.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// SIGKILL: like a power cut, as far as the process is concerned.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM, and a clean exit (status 0) expected.
    pub async fn stop(&mut self) {
        self.proc.stop(secs(30)).await;
    }

    /// Starts the gateway again with the same config and outbox.
    pub fn restart(&mut self) {
        self.proc.start();
    }

    /// Rewrites the config (the gateway must not be running) and starts it with it.
    pub fn restart_with(&mut self, config: GatewayConfig) {
        assert!(
            !self.proc.is_running(),
            "stop the gateway before changing its config"
        );
        config.write(&self.config_path, &self.data_dir);
        self.config = config;
        self.proc.start();
    }

    /// `GET path` on the gateway's HTTP endpoint: status code and body.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let port = self
            .config
            .http_port
            .ok_or("the gateway's HTTP endpoint is disabled")?;
        http_get(port, path).await
    }

    /// The value of one sample on the gateway's `GET /metrics`, e.g.
    /// `pigeon_gateway_outbox_records`; `None` if it is not there.
    pub async fn metric(&self, sample: &str) -> Result<Option<f64>, String> {
        let (code, body) = self.get("/metrics").await?;
        if code != 200 {
            return Err(format!("GET /metrics answered {code}"));
        }
        Ok(metric_value(&body, sample))
    }

    /// Runs `pigeon-gateway --config <its config> status [args]` and returns its output.
    pub async fn status_command(&self, args: &[&str]) -> std::process::Output {
        self.command(&[&["status"], args].concat()).await
    }

    /// Runs `pigeon-gateway --config <its config> <args>` (e.g. `dead-letter list`) and
    /// returns its output.
    pub async fn command(&self, args: &[&str]) -> std::process::Output {
        let config = self.config_path.to_str().expect("UTF-8 temp path");
        let mut all = vec!["--config", config];
        all.extend_from_slice(args);
        run_command(&gateway_bin(), &all, secs(20)).await
    }

    /// Waits up to `timeout` for the gateway to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.wait_exit(timeout).await
    }
}

/// Lets `nobody` reach the test directory and own the gateway's data directory (the test
/// directory is private to root otherwise).
fn make_usable_by_nobody(test_dir: &Path, data_dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(test_dir, std::fs::Permissions::from_mode(0o755))
        .expect("open up the test directory");
    std::fs::create_dir_all(data_dir).expect("create the gateway's data dir");
    std::os::unix::fs::chown(data_dir, Some(65534), Some(65534))
        .expect("give the data dir to nobody");
}
