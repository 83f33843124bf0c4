//! A real mosquitto broker on a free loopback port.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::process::{Proc, free_port, is_root};
use crate::{TestDir, secs, wait_until};

/// How a test's broker is configured.
#[derive(Debug, Clone)]
pub struct MosquittoOptions {
    /// Keep sessions and queued messages in `persistence_location` across a restart.
    pub persistence: bool,
    /// Log every packet (`log_type debug`), so a test can count the PUBACKs a client sent
    /// ([`Mosquitto::pubacks_from`]).
    pub debug_log: bool,
    /// Outgoing QoS 1/2 messages in flight per client. mosquitto's default of 20 would
    /// make a gateway that acks after its group commit commit 20 messages at a time.
    pub max_inflight_messages: u32,
}

impl Default for MosquittoOptions {
    fn default() -> Self {
        MosquittoOptions {
            persistence: false,
            debug_log: false,
            max_inflight_messages: 1000,
        }
    }
}

/// A running mosquitto 2.0 broker, stopped (SIGKILL) when dropped.
pub struct Mosquitto {
    proc: Proc,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    options: MosquittoOptions,
}

/// The mosquitto binary: `$MOSQUITTO_BIN`, or on `PATH`, or Debian's `/usr/sbin/mosquitto`.
fn mosquitto_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOSQUITTO_BIN") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mosquitto not found: run `scripts/install-test-deps` as root \
                 (or `apt install mosquitto`), or set MOSQUITTO_BIN"
            )
        })
}

impl Mosquitto {
    /// Starts a broker with default options.
    pub async fn start(dir: &TestDir) -> Mosquitto {
        Self::start_with(dir, MosquittoOptions::default()).await
    }

    /// Starts a broker on a free port and waits until it listens.
    pub async fn start_with(dir: &TestDir, options: MosquittoOptions) -> Mosquitto {
        let conf = dir.join("mosquitto.conf");
        let log = dir.log_file("mosquitto");
        let stderr = dir.log_file("mosquitto-stderr");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut m = Mosquitto {
                proc: Proc::new("mosquitto", mosquitto_bin(), &stderr)
                    .arg("-c")
                    .arg(&conf),
                port,
                conf: conf.clone(),
                log: log.clone(),
                options: options.clone(),
            };
            m.write_config(dir);
            match m.launch().await {
                Ok(()) => return m,
                Err(e) if e.contains("in use") => last_err = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("mosquitto could not get a free port: {last_err}");
    }

    fn write_config(&self, dir: &TestDir) {
        let o = &self.options;
        let mut c = String::new();
        let _ = writeln!(c, "listener {} 127.0.0.1", self.port);
        c.push_str("allow_anonymous true\n");
        if is_root() {
            // Otherwise mosquitto drops to user `mosquitto`, which cannot write here.
            c.push_str("user root\n");
        }
        let _ = writeln!(c, "log_dest file {}", self.log.display());
        c.push_str("log_timestamp true\n");
        for t in ["error", "warning", "notice", "information", "subscribe"] {
            let _ = writeln!(c, "log_type {t}");
        }
        if o.debug_log {
            c.push_str("log_type debug\n");
        }
        // Never drop a QoS 1 message queued for an offline or slow persistent subscriber:
        // 0 means no limit for both (the defaults are 1000 messages and no byte limit).
        c.push_str("max_queued_messages 0\n");
        c.push_str("max_queued_bytes 0\n");
        let _ = writeln!(c, "max_inflight_messages {}", o.max_inflight_messages);
        // persistent_client_expiration stays unset: persistent sessions never expire.
        if o.persistence {
            let loc = dir.join("mosquitto-data");
            std::fs::create_dir_all(&loc).expect("create mosquitto-data");
            c.push_str("persistence true\n");
            let _ = writeln!(c, "persistence_location {}/", loc.display());
            c.push_str("autosave_interval 1\n");
        } else {
            c.push_str("persistence false\n");
        }
        std::fs::write(&self.conf, c).expect("write mosquitto.conf");
    }

    /// Starts the process and waits for "mosquitto version … running" in its log.
    async fn launch(&mut self) -> Result<(), String> {
        let before = self.log_text().len();
        self.proc.start();
        let start = Instant::now();
        loop {
            let text = self.log_text();
            let new = text.get(before..).unwrap_or("");
            if new.contains(" running") {
                return Ok(());
            }
            if let Some(status) = self.proc.exit_status() {
                let stderr = self.proc.log_text();
                return Err(format!(
                    "mosquitto exited ({status}) on port {}: {}{}",
                    self.port,
                    new.trim(),
                    stderr.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
                ));
            }
            if start.elapsed() > secs(10) {
                panic!("mosquitto did not start within 10 s: {new}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's log (connections, subscriptions, and packets with `debug_log`).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times the broker logged `client_id` subscribing to `filter` (any QoS),
    /// over all its runs.
    pub fn subscriptions(&self, client_id: &str, filter: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| {
                // "<ts>: <client-id> <qos> <filter>"
                l.split_once(": ")
                    .and_then(|(_, rest)| rest.strip_prefix(client_id))
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|rest| rest.split_once(' '))
                    .is_some_and(|(qos, f)| qos.parse::<u8>().is_ok() && f == filter)
            })
            .count()
    }

    /// Waits until `client_id` has subscribed to `filter` (any QoS), as the broker logs it.
    pub async fn wait_for_subscription(&self, client_id: &str, filter: &str, timeout: Duration) {
        self.wait_for_subscriptions(client_id, filter, 1, timeout)
            .await;
    }

    /// Waits until the broker has logged `count` subscriptions of `client_id` to `filter`.
    pub async fn wait_for_subscriptions(
        &self,
        client_id: &str,
        filter: &str,
        count: usize,
        timeout: Duration,
    ) {
        let what =
            format!("MQTT client {client_id:?} to subscribe to {filter:?} ({count} times in all)");
        wait_until(&what, timeout, || async {
            let n = self.subscriptions(client_id, filter);
            if n >= count {
                Ok(())
            } else {
                Err(format!("the broker has logged {n}"))
            }
        })
        .await
    }

    /// How many PUBACKs the broker received from `client_id` (needs `debug_log`).
    pub fn pubacks_from(&self, client_id: &str) -> usize {
        assert!(
            self.options.debug_log,
            "pubacks_from needs MosquittoOptions::debug_log"
        );
        let needle = format!("Received PUBACK from {client_id} (");
        self.log_text()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// SIGKILL: queued messages survive only what `persistence` last saved.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM: a persistent broker saves its database on the way out.
    pub async fn stop(&mut self) {
        self.proc.stop(secs(10)).await;
    }

    /// Starts the broker again on the same port with the same config.
    pub async fn restart(&mut self) {
        if let Err(e) = self.launch().await {
            panic!("mosquitto did not start again: {e}");
        }
    }

    pub fn assert_running(&mut self) {
        self.proc.assert_running();
    }
}
