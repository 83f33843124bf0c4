//! The running MQTT source.
//!
//! One task polls rumqttc's event loop and hands each PUBLISH to the outbox writer;
//! another (the acker) waits for each commit, in arrival order, and only then sends the
//! PUBACK (QoS 1) or PUBREC (QoS 2). A crash between commit and acknowledgement makes the
//! broker re-send the message with the DUP flag and the same packet id; the writer
//! recognises it by its delivery mark and does not store it twice.
//!
//! Subscriptions live in the broker's persistent session. The filters this session was
//! last subscribed to are remembered, so a reconnect to an existing session subscribes
//! only to filters that were added to the configuration (re-subscribing would make the
//! broker re-send every retained message) and unsubscribes from removed ones.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pigeon_shared::ce::GatewayId;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::MqttConfig;
use crate::outbox::{Appended, DeliveryMark, NewRecord, OutboxError, OutboxWriter};
use crate::stats::Stats;

/// Event type for messages on topics no configured filter matches (the broker may still
/// deliver them for a subscription the persistent session kept).
pub const UNMATCHED_TYPE: &str = "io.pigeon.mqtt.message";

type PendingAck = (oneshot::Receiver<Result<Appended, OutboxError>>, Publish);

pub struct MqttSource {
    config: MqttConfig,
    client_id: String,
    source: String,
    session: Arc<str>,
    writer: OutboxWriter,
    stats: Arc<Stats>,
    state_file: std::path::PathBuf,
}

impl MqttSource {
    pub fn new(
        config: MqttConfig,
        gateway: &GatewayId,
        writer: OutboxWriter,
        stats: Arc<Stats>,
        data_dir: &std::path::Path,
    ) -> Self {
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("pigeon-{gateway}"));
        let session: Arc<str> = format!("{}:{}/{}", config.host, config.port, client_id).into();
        Self {
            source: gateway.source("mqtt"),
            state_file: data_dir.join("mqtt-subscriptions.json"),
            config,
            client_id,
            session,
            writer,
            stats,
        }
    }

    /// Runs until `shutdown` turns true, then stops reading, acknowledges what was
    /// committed, and disconnects.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let c = &self.config;
        let mut opts = MqttOptions::new(self.client_id.clone(), c.host.clone(), c.port);
        opts.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(c.keep_alive.get())
            .set_max_packet_size(c.max_packet_size.get() as usize, 64 * 1024);
        if let Some(user) = &c.username {
            opts.set_credentials(user.clone(), c.password.clone().unwrap_or_default());
        }
        // Acks travel through this channel; it is larger than the number of messages
        // that can be waiting for a commit, so the acker never waits on it for long.
        let (client, mut eventloop) = AsyncClient::new(opts, c.max_pending * 2 + 64);
        let (ack_tx, ack_rx) = mpsc::channel::<PendingAck>(c.max_pending);
        let reconnect = Arc::new(Notify::new());
        let acker = tokio::spawn(acker(client.clone(), ack_rx, reconnect.clone()));

        let mut delay = c.reconnect_delay.get();
        let mut connected = false;
        let mut failures = 0u32;
        // The subscription set to remember once the broker confirms it.
        let mut awaiting_suback: Option<Vec<u8>> = None;
        loop {
            let event = tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = reconnect.notified() => {
                    // An outbox commit failed: drop the connection so the broker re-sends
                    // every unacknowledged message once we are back.
                    eventloop.clean();
                    connected = false;
                    if sleep_or_shutdown(&mut shutdown, delay).await { break; }
                    continue;
                }
                ev = eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if !self.ingest(p, &ack_tx).await {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected = true;
                    failures = 0;
                    delay = c.reconnect_delay.get();
                    self.stats
                        .mqtt_connected
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    info!(broker = %self.session, session_present = ack.session_present, "Connected to the MQTT broker.");
                    awaiting_suback = self.sync_subscriptions(&client, ack.session_present);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        error!(broker = %self.session, "The MQTT broker refused a subscription; check the filters and the broker's ACLs. Retrying at the next reconnect.");
                        let _ = std::fs::remove_file(&self.state_file);
                    } else if let Some(json) = awaiting_suback.take() {
                        self.remember_subscriptions(&json);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.stats
                        .mqtt_connected
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    failures += 1;
                    if connected || failures == 1 {
                        warn!(broker = %self.session, error = %e, retry_in = ?delay, "Lost the MQTT broker; reconnecting. Unacknowledged messages stay with the broker.");
                    } else {
                        debug!(broker = %self.session, error = %e, "MQTT reconnect failed.");
                    }
                    connected = false;
                    if sleep_or_shutdown(&mut shutdown, delay).await {
                        break;
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
        self.stats
            .mqtt_connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // Stop: no new messages are taken. Let the acker acknowledge what was already
        // handed to the outbox, keep the event loop turning so the acks go out, then
        // disconnect. Anything not acknowledged is re-sent by the broker next time.
        drop(ack_tx);
        let flush = async {
            let mut acker = acker;
            loop {
                tokio::select! {
                    _ = &mut acker => break,
                    ev = eventloop.poll() => if ev.is_err() { return; },
                }
            }
            let _ = client.disconnect().await;
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(3), flush)
            .await
            .is_err()
        {
            debug!(
                "Gave up flushing MQTT acknowledgements; the broker will re-send those messages."
            );
        }
        info!(broker = %self.session, "The MQTT source stopped.");
    }

    /// Hands one message to the outbox and queues its acknowledgement. Returns false
    /// when the gateway is shutting down.
    async fn ingest(&self, p: Publish, ack_tx: &mpsc::Sender<PendingAck>) -> bool {
        let event_type = match self.config.subscription_for(&p.topic) {
            Some(s) => s.event_type.as_str(),
            None => UNMATCHED_TYPE,
        };
        let now_us = chrono::Utc::now().timestamp_micros();
        let record = record_from_publish(&p, event_type, &self.source, &self.session, now_us);
        self.stats
            .mqtt_received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let done = match self.writer.append(record).await {
            Ok(rx) => rx,
            Err(_) => return false,
        };
        if p.qos == QoS::AtMostOnce {
            return true;
        }
        ack_tx.send((done, p)).await.is_ok()
    }

    /// Subscribes to what the configuration lists and the session lacks. Returns the
    /// subscription set to remember once the broker's SUBACK confirms it.
    fn sync_subscriptions(&self, client: &AsyncClient, session_present: bool) -> Option<Vec<u8>> {
        let wanted: BTreeSet<(String, u8)> = self
            .config
            .subscriptions
            .iter()
            .map(|s| (s.filter.clone(), s.qos))
            .collect();
        let had: BTreeSet<(String, u8)> = if session_present {
            std::fs::read(&self.state_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        let add: Vec<SubscribeFilter> = wanted
            .difference(&had)
            .map(|(f, q)| SubscribeFilter::new(f.clone(), qos(*q)))
            .collect();
        let wanted_filters: BTreeSet<&String> = wanted.iter().map(|(f, _)| f).collect();
        let remove: BTreeSet<&String> = had
            .iter()
            .map(|(f, _)| f)
            .filter(|f| !wanted_filters.contains(f))
            .collect();
        for f in remove {
            if let Err(e) = client.try_unsubscribe(f.clone()) {
                warn!(filter = %f, error = %e, "Could not unsubscribe from a filter removed from the configuration.");
            }
        }
        let json = serde_json::to_vec(&wanted).unwrap_or_default();
        if add.is_empty() {
            self.remember_subscriptions(&json);
            return None;
        }
        let filters: Vec<&str> = add.iter().map(|f| f.path.as_str()).collect();
        info!(?filters, "Subscribing.");
        if let Err(e) = client.try_subscribe_many(add) {
            error!(error = %e, "Could not queue the MQTT subscription; retrying at the next reconnect.");
            return None;
        }
        Some(json)
    }

    fn remember_subscriptions(&self, json: &[u8]) {
        if let Err(e) = write_atomically(&self.state_file, json) {
            warn!(path = %self.state_file.display(), error = %e, "Could not remember the MQTT subscriptions; the next reconnect subscribes again.");
        }
    }
}

fn qos(q: u8) -> QoS {
    match q {
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Sleeps for `d`; returns true if shutdown was requested meanwhile.
async fn sleep_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
    }
}

/// Acknowledges each message after its commit, in the order the messages arrived.
async fn acker(client: AsyncClient, mut rx: mpsc::Receiver<PendingAck>, reconnect: Arc<Notify>) {
    while let Some((done, publish)) = rx.recv().await {
        match done.await {
            Ok(Ok(_)) => {
                if client.ack(&publish).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => {
                error!(topic = %publish.topic, error = %e, "Could not commit an MQTT message; not acknowledging it, so the broker keeps it and re-sends it after a reconnect.");
                reconnect.notify_one();
            }
            Err(_) => return,
        }
    }
}

/// Builds the outbox record for one PUBLISH.
///
/// JSON payloads are stored as JSON (`application/json`) and travel as the event's
/// `data`; anything else (including text that is not JSON and non-UTF-8 bytes) is
/// binary data and travels base64-encoded in `data_base64`, byte for byte.
pub fn record_from_publish(
    p: &Publish,
    event_type: &str,
    source: &str,
    session: &Arc<str>,
    now_us: i64,
) -> NewRecord {
    let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&p.payload).is_ok();
    let content_type = if is_json {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let mut h = Sha256::new();
    h.update((p.topic.len() as u64).to_be_bytes());
    h.update(p.topic.as_bytes());
    h.update(&p.payload);
    let full = h.finalize();
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&full[..16]);
    NewRecord {
        source: source.to_owned(),
        event_type: event_type.to_owned(),
        subject: Some(p.topic.clone()),
        time_us: now_us,
        content_type: Some(content_type.to_owned()),
        data: Bytes::clone(&p.payload),
        delivery: (p.qos != QoS::AtMostOnce).then(|| DeliveryMark {
            session: session.clone(),
            pkid: p.pkid,
            dup: p.dup,
            digest,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, payload: &[u8], pkid: u16, dup: bool) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        p.dup = dup;
        p
    }

    #[test]
    fn json_and_binary_payloads() {
        let s: Arc<str> = Arc::from("b/c");
        let topic = "org/contoso/site/berlin/building/41/floor/3/room/4/sensors/climate";
        let r = record_from_publish(
            &publish(topic, br#"{"t": 21.5}"#, 1, false),
            "reading",
            "/gateways/g/mqtt",
            &s,
            5,
        );
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.subject.as_deref(), Some(topic));
        assert_eq!((r.time_us, r.event_type.as_str()), (5, "reading"));
        for not_json in [&b"on"[..], b"\xff\xfe\x00raw", b"", b"{\"t\":"] {
            let r = record_from_publish(&publish("t", not_json, 1, false), "x", "/s", &s, 0);
            assert_eq!(r.content_type.as_deref(), Some("application/octet-stream"));
            assert_eq!(&r.data[..], not_json);
        }
    }

    #[test]
    fn delivery_marks_tell_redeliveries_from_new_messages() {
        let s: Arc<str> = Arc::from("b/c");
        let mark = |p: &Publish| record_from_publish(p, "x", "/s", &s, 0).delivery.unwrap();
        let a = mark(&publish("t/1", b"1", 9, false));
        let b = mark(&publish("t/1", b"1", 9, true));
        let c = mark(&publish("t/1", b"2", 9, true));
        let d = mark(&publish("t/11", b"", 9, true));
        let e = mark(&publish("t/1", b"1", 9, true));
        assert_eq!(a.digest, b.digest);
        assert!(b.dup && !a.dup);
        assert_ne!(a.digest, c.digest);
        assert_ne!(d.digest, mark(&publish("t/1", b"1", 9, true)).digest);
        assert_eq!(e.pkid, 9);
    }
}
