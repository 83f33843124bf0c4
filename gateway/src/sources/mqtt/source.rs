//! The running MQTT source.
//!
//! One loop owns the broker connection ([`Conn`]). Each PUBLISH goes to the outbox
//! writer; the acker task waits for each commit, in arrival order, and hands the
//! acknowledgement back to the loop, which sends the PUBACK (QoS 1) or PUBREC (QoS 2).
//! While `max_pending` messages wait for their commit the loop stops reading from the
//! socket — the broker holds the rest — but keeps writing acknowledgements, so the
//! backlog always drains. A crash between commit and acknowledgement makes the broker
//! re-send the message with the DUP flag and the same packet id; the writer recognises
//! it by its delivery mark and does not store it twice.
//!
//! Subscriptions live in the broker's persistent session. The filters this session was
//! last subscribed to are remembered, so a reconnect to an existing session subscribes
//! only to filters that were added to the configuration (re-subscribing would make the
//! broker re-send every retained message) and unsubscribes from removed ones.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use pigeon_shared::ce::GatewayId;
use pigeon_shared::shutdown::Shutdown;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Connect, Login, Packet, PubAck, PubComp, PubRec, Publish, Subscribe, SubscribeFilter,
    SubscribeReasonCode, Unsubscribe,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::MqttConfig;
use super::conn::{Conn, ConnError, Incoming};
use crate::outbox::{Appended, DeliveryMark, NewRecord, OutboxError, OutboxWriter};
use crate::sources::event_size;
use crate::stats::Stats;

/// Event type for messages on topics no configured filter matches (the broker may still
/// deliver them for a subscription the persistent session kept).
pub(crate) const UNMATCHED_TYPE: &str = "io.pigeon.mqtt.message";

/// How long a stopping source waits for the commits of messages already handed over.
const STOP_FLUSH: Duration = Duration::from_secs(3);

/// A message handed to the outbox, waiting for its commit. `conn` numbers the broker
/// connection it arrived on: an acknowledgement is only sent on that connection (after
/// a reconnect the broker re-sends the message and the writer recognises it).
struct PendingAck {
    conn: u64,
    done: oneshot::Receiver<Result<Appended, OutboxError>>,
    pkid: u16,
    qos: QoS,
    topic: String,
    /// Kept, for routes with `when_full = "refuse"`, to append it again when a full
    /// outbox refused it.
    record: Option<NewRecord>,
}

/// How often a message a full outbox refused is offered again.
const FULL_RETRY: Duration = Duration::from_secs(1);

/// A commit's outcome, back to the connection loop.
struct Committed {
    conn: u64,
    pkid: u16,
    qos: QoS,
    ok: bool,
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    Lost(String),
}

pub(crate) struct MqttSource {
    config: MqttConfig,
    client_id: String,
    source: String,
    session: Arc<str>,
    writer: OutboxWriter,
    stats: Arc<Stats>,
    state_file: std::path::PathBuf,
    /// The relay's limit (`relay.max_event_bytes`) and the producer id the events are
    /// sent under: a message whose event would be longer is refused.
    max_event_bytes: u64,
    producer_id: String,
}

impl MqttSource {
    /// `max_event_bytes` is `relay.max_event_bytes`; `producer_id` the outbox's.
    pub(crate) fn new(
        config: MqttConfig,
        gateway: &GatewayId,
        writer: OutboxWriter,
        stats: Arc<Stats>,
        data_dir: &std::path::Path,
        max_event_bytes: u64,
        producer_id: String,
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
            max_event_bytes,
            producer_id,
        }
    }

    fn connect_packet(&self) -> Connect {
        let mut c = Connect::new(self.client_id.clone());
        c.clean_session = false;
        c.keep_alive = self.config.keep_alive.get().as_secs().clamp(1, 65535) as u16;
        if let Some(user) = &self.config.username {
            c.login = Some(Login::new(
                user.clone(),
                self.config.password.clone().unwrap_or_default(),
            ));
        }
        c
    }

    /// Runs until `shutdown` stops it, then stops reading, acknowledges what was
    /// committed, and disconnects.
    pub(crate) async fn run(self, mut shutdown: Shutdown) {
        // Both channels hold at most `max_pending` messages per connection (reading
        // pauses at that many), so they need no bound of their own — and must have none:
        // a full channel here would stop the acknowledgements that empty it.
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<PendingAck>();
        let (committed_tx, mut committed_rx) = mpsc::unbounded_channel::<Committed>();
        // The connection being served (0: none), so that the acker stops re-offering a
        // refused message whose connection is gone (the broker re-sends it anyway).
        let live_conn = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let acker = tokio::spawn(acker(
            ack_rx,
            committed_tx,
            self.writer.clone(),
            live_conn.clone(),
        ));
        let mut delay = self.config.reconnect_delay.get();
        let mut failures = 0u32;
        let mut conn_no = 0u64;
        let io_timeout = self.config.keep_alive.get().max(Duration::from_secs(5));
        loop {
            if shutdown.is_stopping() {
                break;
            }
            let connected = tokio::select! {
                () = shutdown.stopped() => break,
                r = Conn::connect(
                    (self.config.host.as_str(), self.config.port),
                    self.connect_packet(),
                    self.config.max_packet_size.get() as usize,
                    io_timeout,
                ) => r,
            };
            let reason = match connected {
                Ok((conn, session_present)) => {
                    conn_no += 1;
                    failures = 0;
                    delay = self.config.reconnect_delay.get();
                    self.stats.mqtt_connected.store(true, Ordering::Relaxed);
                    info!(broker = %self.session, session_present, "Connected to the MQTT broker.");
                    live_conn.store(conn_no, Ordering::Relaxed);
                    let ended = self
                        .serve(
                            conn,
                            conn_no,
                            session_present,
                            &ack_tx,
                            &mut committed_rx,
                            &mut shutdown,
                        )
                        .await;
                    self.stats.mqtt_connected.store(false, Ordering::Relaxed);
                    live_conn.store(0, Ordering::Relaxed);
                    match ended {
                        Ended::Shutdown => break,
                        Ended::Lost(reason) => {
                            warn!(broker = %self.session, reason = %reason, retry_in = ?delay, "Lost the MQTT broker; reconnecting. Unacknowledged messages stay with the broker.");
                            None
                        }
                    }
                }
                Err(e) => Some(e),
            };
            if let Some(e) = reason {
                failures += 1;
                if failures == 1 {
                    warn!(broker = %self.session, error = %e, retry_in = ?delay, "Cannot connect to the MQTT broker; retrying.");
                } else {
                    debug!(broker = %self.session, error = %e, "MQTT reconnect failed.");
                }
            }
            if shutdown.stopped_within(delay).await {
                break;
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        drop(ack_tx);
        let _ = acker.await;
        info!(broker = %self.session, "The MQTT source stopped.");
    }

    /// Serves one connection until it is lost or the gateway stops.
    async fn serve(
        &self,
        mut conn: Conn,
        conn_no: u64,
        session_present: bool,
        ack_tx: &mpsc::UnboundedSender<PendingAck>,
        committed_rx: &mut mpsc::UnboundedReceiver<Committed>,
        shutdown: &mut Shutdown,
    ) -> Ended {
        let max_pending = self.config.max_pending;
        let mut pending = 0usize;
        let mut next_pkid = 0u16;
        let mut awaiting_suback =
            match self.sync_subscriptions(&mut conn, session_present, &mut next_pkid) {
                Ok(s) => s,
                Err(e) => return Ended::Lost(e.to_string()),
            };
        let keep_alive = self.config.keep_alive.get();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        let mut awaiting_pong = false;
        loop {
            if let Err(e) = conn.flush().await {
                return Ended::Lost(e.to_string());
            }
            tokio::select! {
                biased;
                () = shutdown.stopped() => break,
                Some(first) = committed_rx.recv() => {
                    // Every commit reported so far, acknowledged in one write.
                    let mut next = Some(first);
                    while let Some(c) = next {
                        if c.conn == conn_no {
                            pending -= 1;
                            if !c.ok {
                                // The commit failed: drop the connection so that the
                                // broker re-sends every unacknowledged message.
                                return Ended::Lost("an outbox commit failed".into());
                            }
                            if let Err(e) = conn.send(ack_packet(c.qos, c.pkid)) {
                                return Ended::Lost(e.to_string());
                            }
                        }
                        next = committed_rx.try_recv().ok();
                    }
                }
                r = conn.fill(), if pending < max_pending => {
                    if let Err(e) = r {
                        return Ended::Lost(e.to_string());
                    }
                    loop {
                        let incoming = match conn.next_incoming() {
                            Ok(Some(i)) => i,
                            Ok(None) => break,
                            Err(e) => return Ended::Lost(e.to_string()),
                        };
                        match self.handle(incoming, &mut conn, conn_no, ack_tx, &mut awaiting_suback).await {
                            Ok(Handled::Pending) => pending += 1,
                            Ok(Handled::Done) => {}
                            Ok(Handled::Pong) => awaiting_pong = false,
                            Err(e) => return Ended::Lost(e),
                        }
                    }
                }
                _ = ping.tick() => {
                    if awaiting_pong {
                        return Ended::Lost(format!("no answer to a ping within {keep_alive:?}"));
                    }
                    if let Err(e) = conn.send(Packet::PingReq) {
                        return Ended::Lost(e.to_string());
                    }
                    awaiting_pong = true;
                }
            }
        }
        // Stopping: read nothing more; acknowledge what is committed meanwhile, then say
        // goodbye. Anything not acknowledged is re-sent by the broker next time.
        let flush = async {
            while pending > 0 {
                let Some(c) = committed_rx.recv().await else {
                    break;
                };
                if c.conn != conn_no {
                    continue;
                }
                pending -= 1;
                if !c.ok || conn.send(ack_packet(c.qos, c.pkid)).is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(STOP_FLUSH, flush).await.is_err() {
            debug!(
                pending,
                "Gave up waiting for commits; the broker will re-send those messages."
            );
        }
        conn.disconnect().await;
        Ended::Shutdown
    }

    /// Acts on one packet from the broker.
    async fn handle(
        &self,
        incoming: Incoming,
        conn: &mut Conn,
        conn_no: u64,
        ack_tx: &mpsc::UnboundedSender<PendingAck>,
        awaiting_suback: &mut Option<(u16, Vec<u8>)>,
    ) -> Result<Handled, String> {
        let packet = match incoming {
            Incoming::Packet(p) => p,
            Incoming::Oversized {
                topic,
                qos,
                pkid,
                len,
            } => {
                self.stats.mqtt_oversized.fetch_add(1, Ordering::Relaxed);
                error!(topic = ?topic, bytes = len, limit = self.config.max_packet_size.get(), "Dropped an MQTT message larger than mqtt.max_packet_size; raise that limit to accept such messages. It is acknowledged so that the messages behind it keep flowing.");
                if qos != QoS::AtMostOnce {
                    conn.send(ack_packet(qos, pkid))
                        .map_err(|e| e.to_string())?;
                }
                return Ok(Handled::Done);
            }
        };
        match packet {
            Packet::Publish(p) => {
                let qos = p.qos;
                let (pkid, topic) = (p.pkid, p.topic.clone());
                let record = self.record(&p);
                if let Some(bytes) =
                    event_size::over_limit(&record, &self.producer_id, self.max_event_bytes)
                {
                    // The relay would refuse it after the broker had been told it is
                    // safe: drop it now, loudly, like a message over max_packet_size.
                    self.stats.mqtt_oversized.fetch_add(1, Ordering::Relaxed);
                    error!(topic = ?topic, event_bytes = bytes, limit = self.max_event_bytes, "Dropped an MQTT message whose event would be larger than relay.max_event_bytes, so the relay would refuse it; raise that limit together with the relay's limits.max_event_bytes to accept such messages. It is acknowledged so that the messages behind it keep flowing.");
                    if qos != QoS::AtMostOnce {
                        conn.send(ack_packet(qos, pkid))
                            .map_err(|e| e.to_string())?;
                    }
                    return Ok(Handled::Done);
                }
                let (done, record) = self
                    .ingest(record)
                    .await
                    .ok_or("the outbox writer stopped")?;
                if qos == QoS::AtMostOnce {
                    return Ok(Handled::Done);
                }
                ack_tx
                    .send(PendingAck {
                        conn: conn_no,
                        done,
                        pkid,
                        qos,
                        topic,
                        record,
                    })
                    .map_err(|_| "the acker stopped")?;
                Ok(Handled::Pending)
            }
            Packet::PubRel(rel) => {
                conn.send(Packet::PubComp(PubComp::new(rel.pkid)))
                    .map_err(|e| e.to_string())?;
                Ok(Handled::Done)
            }
            Packet::PingResp => Ok(Handled::Pong),
            Packet::SubAck(ack) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure));
                if refused {
                    error!(broker = %self.session, "The MQTT broker refused a subscription; check the filters and the broker's ACLs. Retrying at the next reconnect.");
                    let _ = std::fs::remove_file(&self.state_file);
                    *awaiting_suback = None;
                } else if let Some((pkid, json)) = awaiting_suback.take() {
                    if pkid == ack.pkid {
                        self.remember_subscriptions(&json);
                    } else {
                        *awaiting_suback = Some((pkid, json));
                    }
                }
                Ok(Handled::Done)
            }
            Packet::UnsubAck(_) | Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {
                Ok(Handled::Done)
            }
            other => Err(format!("unexpected packet from the broker: {other:?}")),
        }
    }

    /// The outbox record of one message, as its route (the first matching subscription)
    /// says.
    fn record(&self, p: &Publish) -> NewRecord {
        let sub = self.config.subscription_for(&p.topic);
        let event_type = sub.map_or(UNMATCHED_TYPE, |s| s.event_type.as_str());
        let now_us = chrono::Utc::now().timestamp_micros();
        let mut record = record_from_publish(p, event_type, &self.source, &self.session, now_us);
        record.expires_us = sub
            .and_then(|s| s.ttl)
            .map(|ttl| now_us.saturating_add(ttl.get().as_micros().min(i64::MAX as u128) as i64));
        record.policy = sub.map(|s| s.policy()).unwrap_or_default();
        record
    }

    /// Hands one message's record to the outbox; the commit's receiver and the record (to
    /// offer it again if a full outbox refuses it). `None` when the writer has stopped.
    #[allow(clippy::type_complexity)]
    async fn ingest(
        &self,
        record: NewRecord,
    ) -> Option<(
        oneshot::Receiver<Result<Appended, OutboxError>>,
        Option<NewRecord>,
    )> {
        self.stats.mqtt_received.fetch_add(1, Ordering::Relaxed);
        // Only a route that may be refused needs its record again.
        let again =
            (record.policy.when_full == crate::outbox::WhenFull::Refuse).then(|| record.clone());
        let rx = self.writer.append(record).await.ok()?;
        Some((rx, again))
    }

    /// Subscribes to what the configuration lists and the session lacks. Returns the
    /// SUBSCRIBE's packet id and the subscription set to remember once the broker's
    /// SUBACK confirms it.
    fn sync_subscriptions(
        &self,
        conn: &mut Conn,
        session_present: bool,
        next_pkid: &mut u16,
    ) -> Result<Option<(u16, Vec<u8>)>, ConnError> {
        let mut pkid = || {
            *next_pkid = next_pkid.wrapping_add(1).max(1);
            *next_pkid
        };
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
        for f in had.iter().map(|(f, _)| f) {
            if !wanted_filters.contains(f) {
                info!(filter = %f, "Unsubscribing from a filter removed from the configuration.");
                let mut u = Unsubscribe::new(f.clone());
                u.pkid = pkid();
                conn.send(Packet::Unsubscribe(u))?;
            }
        }
        let json = serde_json::to_vec(&wanted).unwrap_or_default();
        if add.is_empty() {
            self.remember_subscriptions(&json);
            return Ok(None);
        }
        let filters: Vec<&str> = add.iter().map(|f| f.path.as_str()).collect();
        info!(?filters, "Subscribing.");
        let mut s = Subscribe::new_many(add);
        s.pkid = pkid();
        let id = s.pkid;
        conn.send(Packet::Subscribe(s))?;
        Ok(Some((id, json)))
    }

    fn remember_subscriptions(&self, json: &[u8]) {
        if let Err(e) = write_atomically(&self.state_file, json) {
            warn!(path = %self.state_file.display(), error = %e, "Could not remember the MQTT subscriptions; the next reconnect subscribes again.");
        }
    }
}

enum Handled {
    /// A message now waits for its commit.
    Pending,
    Done,
    Pong,
}

fn ack_packet(qos: QoS, pkid: u16) -> Packet {
    match qos {
        QoS::ExactlyOnce => Packet::PubRec(PubRec::new(pkid)),
        _ => Packet::PubAck(PubAck::new(pkid)),
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

/// Waits for each commit in arrival order and reports it to the connection loop (never
/// blocking on the connection). A
/// message a full outbox refused (its route's `when_full = "refuse"`) is offered again
/// every [`FULL_RETRY`] and not acknowledged meanwhile — so the broker keeps it, and once
/// `mqtt.max_pending` messages wait, the gateway stops reading — until there is room or
/// its connection is gone.
async fn acker(
    mut rx: mpsc::UnboundedReceiver<PendingAck>,
    tx: mpsc::UnboundedSender<Committed>,
    writer: OutboxWriter,
    live_conn: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut full_since: Option<tokio::time::Instant> = None;
    while let Some(mut p) = rx.recv().await {
        let ok = loop {
            match (&mut p.done).await {
                Ok(Ok(_)) => break true,
                Ok(Err(OutboxError::Full)) => {
                    if full_since.is_none() {
                        warn!(topic = ?p.topic, "The outbox is full and this route may not drop older data (when_full = \"refuse\"): its MQTT messages are not acknowledged, so the broker keeps them, until there is room.");
                        full_since = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(FULL_RETRY).await;
                    let Some(record) = p.record.clone() else {
                        break false;
                    };
                    if live_conn.load(Ordering::Relaxed) != p.conn {
                        break false;
                    }
                    match writer.append(record).await {
                        Ok(done) => p.done = done,
                        Err(_) => break false,
                    }
                }
                Ok(Err(e)) => {
                    error!(topic = ?p.topic, error = %e, "Could not commit an MQTT message; not acknowledging it, so the broker keeps it and re-sends it after a reconnect.");
                    break false;
                }
                Err(_) => break false,
            }
        };
        if ok && let Some(since) = full_since.take() {
            info!(waited = ?since.elapsed(), "There is room in the outbox again; MQTT messages are acknowledged again.");
        }
        let _ = tx.send(Committed {
            conn: p.conn,
            pkid: p.pkid,
            qos: p.qos,
            ok,
        });
    }
}

/// Builds the outbox record for one PUBLISH.
///
/// JSON payloads are stored as JSON (`application/json`) and travel as the event's
/// `data`; anything else (including text that is not JSON and non-UTF-8 bytes) is
/// binary data and travels base64-encoded in `data_base64`, byte for byte.
pub(crate) fn record_from_publish(
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
    let mut digest = [0u8; 8];
    digest.copy_from_slice(&full[..8]);
    NewRecord {
        source: source.to_owned(),
        event_type: event_type.to_owned(),
        subject: Some(p.topic.clone()),
        time_us: now_us,
        content_type: Some(content_type.to_owned()),
        data: Bytes::clone(&p.payload),
        expires_us: None,
        delivery: (p.qos != QoS::AtMostOnce).then(|| DeliveryMark {
            session: session.clone(),
            pkid: p.pkid,
            dup: p.dup,
            digest,
        }),
        file: None,
        policy: crate::outbox::Policy::default(),
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
