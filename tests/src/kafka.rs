//! A real Kafka-protocol broker (tansu, `memory://` storage) on loopback behind a
//! fault-injecting [`Proxy`], and a real Kafka consumer (librdkafka) that reads back what
//! the relay wrote.
//!
//! The broker listens on one port and advertises the proxy's, so every client (the relay
//! and the test's consumer) goes through the proxy: [`Tansu::set_down`] makes Kafka
//! unreachable without losing what it stores (a restart of a `memory://` broker would).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value};

use crate::process::{Proc, describe, free_port, run_command, server_bin};
use crate::proxy::Proxy;
use crate::stream::Stream;
use crate::{TestDir, secs, wait_until};

/// The tansu binary: `$TANSU_BIN`, or `tansu` on `PATH` (scripts/install-test-deps).
pub fn tansu_bin() -> PathBuf {
    server_bin("tansu", "TANSU_BIN")
}

/// The relay's `[stream]` table for the Kafka stream at `bootstrap` with topic template
/// `topic` (deliveries time out after 3 s, so outages show quickly).
pub fn kafka_stream_table(bootstrap: &str, topic: &str) -> toml::Table {
    let mut kafka = toml::Table::new();
    kafka.insert("brokers".into(), bootstrap.into());
    kafka.insert("topic".into(), topic.into());
    kafka.insert("delivery_timeout".into(), "3s".into());
    let mut stream = toml::Table::new();
    stream.insert("kind".into(), "kafka".into());
    stream.insert("kafka".into(), kafka.into());
    stream
}

/// A running tansu broker (SIGKILLed when dropped) and the proxy in front of it.
pub struct Tansu {
    proc: Proc,
    port: u16,
    proxy: Proxy,
}

/// One record read back, with what the CloudEvents binding put in it.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Option<Vec<u8>>,
}

impl KafkaRecord {
    /// A header's value as text (the last one of that name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The structured form of the event the record carries (binary mode undone): `ce_`
    /// headers become attributes, `content-type` `datacontenttype`, the value `data` (JSON
    /// parsed when the content type is JSON).
    pub fn to_event(&self) -> Value {
        let mut obj = Map::new();
        for (k, v) in &self.headers {
            let text = String::from_utf8_lossy(v).into_owned();
            if let Some(attr) = k.strip_prefix("ce_") {
                obj.insert(attr.to_owned(), Value::String(text));
            } else if k == "content-type" {
                obj.insert("datacontenttype".to_owned(), Value::String(text));
            }
        }
        if let Some(v) = &self.value {
            let json = obj
                .get("datacontenttype")
                .and_then(Value::as_str)
                .is_none_or(|ct| ct.contains("json"));
            let data = if json {
                serde_json::from_slice(v)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(v).into_owned()))
            } else {
                Value::String(String::from_utf8_lossy(v).into_owned())
            };
            obj.insert("data".to_owned(), data);
        }
        Value::Object(obj)
    }
}

impl Tansu {
    /// Starts a broker on a free port behind a proxy and waits until it answers.
    pub async fn start(dir: &TestDir) -> Tansu {
        let log = dir.log_file("tansu");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let proxy = Proxy::start(port).await;
            let mut proc = Proc::new("tansu", tansu_bin(), &log)
                .arg("broker")
                .arg("--listener-url")
                .arg(format!("tcp://127.0.0.1:{port}"))
                .arg("--advertised-listener-url")
                .arg(format!("tcp://127.0.0.1:{}", proxy.port()))
                .arg("--storage-engine")
                .arg("memory://tansu/")
                .env("RUST_LOG", "warn");
            proc.start();
            let mut t = Tansu { proc, port, proxy };
            let up = wait_for_port(port, secs(20)).await;
            if up.is_ok() && t.proc.is_running() {
                return t;
            }
            last_err = format!("{up:?}: {}", t.proc.log_text());
            t.proc.kill();
            if !last_err.contains("in use") {
                panic!("tansu did not start: {last_err}");
            }
        }
        panic!("tansu could not get a free port: {last_err}");
    }

    /// `host:port` for `stream.kafka.brokers` (the proxy).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.proxy.port())
    }

    /// Creates a topic (tansu does not create them on first use).
    pub async fn create_topic(&self, name: &str, partitions: u32) {
        let out = run_command(
            &tansu_bin(),
            &[
                "topic",
                "create",
                name,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                &partitions.to_string(),
            ],
            secs(30),
        )
        .await;
        assert!(
            out.status.success(),
            "tansu topic create {name}: {}",
            describe(&out)
        );
    }

    /// While `on`, Kafka is unreachable (the proxy refuses and cuts connections).
    pub fn set_down(&self, on: bool) {
        self.proxy.set_down(on);
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Every record of `topic` now, partition by partition in offset order.
    pub async fn records(&self, topic: &str) -> Vec<KafkaRecord> {
        let bootstrap = self.bootstrap();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || read_topic(&bootstrap, &topic))
            .await
            .expect("read task")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The events of `topic` as a [`Stream`], to check them like the stream files.
    pub async fn stream(&self, topic: &str) -> Stream {
        Stream::from_events(
            self.records(topic)
                .await
                .iter()
                .map(KafkaRecord::to_event)
                .collect(),
        )
    }
    /// Sets consumer group `group`'s committed offset of `topic`/`partition`, as a member
    /// of the group that stopped there would: joins it, waits for the partition, commits,
    /// and leaves.
    pub async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<(), String> {
        use rdkafka::consumer::CommitMode;
        let (bootstrap, group, topic) = (self.bootstrap(), group.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .set("session.timeout.ms", "10000")
                .create()
                .map_err(|e| format!("cannot create a Kafka consumer: {e}"))?;
            consumer
                .subscribe(&[&topic])
                .map_err(|e| format!("subscribe {topic}: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let _ = consumer.poll(Duration::from_millis(100));
                let mine = consumer
                    .assignment()
                    .is_ok_and(|a| a.find_partition(&topic, partition).is_some());
                if mine {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{group} never gave this consumer {topic}/{partition}"
                    ));
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))
                .map_err(|e| e.to_string())?;
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| format!("commit {group} {topic}/{partition} @ {offset}: {e}"))?;
            consumer.unsubscribe();
            Ok(())
        })
        .await
        .expect("commit task")
    }
}

async fn wait_for_port(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn read_topic(bootstrap: &str, topic: &str) -> Result<Vec<KafkaRecord>, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "pigeon-e2e-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| format!("cannot create a Kafka consumer: {e}"))?;
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))?;
        // Assigned even when the watermarks say empty (see below).
        if high > low {
            ends.insert(p, high);
        }
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .map_err(|e| e.to_string())?;
    }
    let mut out = Vec::new();
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    // Past the watermarks, read on until nothing comes for a while: tansu 0.6 reports a
    // high watermark short of its last batch's records.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since: Option<Instant> = None;
    loop {
        if Instant::now() >= deadline {
            return Err(format!("reading {topic} did not finish: {ends:?} left"));
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            if ends.is_empty() {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(500) {
                    break;
                }
            }
            continue;
        };
        quiet_since = None;
        let m = m.map_err(|e| format!("reading {topic}: {e}"))?;
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(KafkaRecord {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            headers,
            value: m.payload().map(<[u8]>::to_vec),
        });
        if ends
            .get(&m.partition())
            .is_some_and(|&end| m.offset() + 1 >= end)
        {
            ends.remove(&m.partition());
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// Waits until `topic` holds at least `count` records.
pub async fn wait_for_records(tansu: &Tansu, topic: &str, count: usize, timeout: Duration) {
    wait_until(&format!("{count} records in {topic}"), timeout, || async {
        let n = tansu.records(topic).await.len();
        if n >= count {
            Ok(())
        } else {
            Err(format!("{n} so far"))
        }
    })
    .await;
}
