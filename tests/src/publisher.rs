//! An MQTT load generator that records which messages the broker acknowledged.
//!
//! `mosquitto_pub -l` is far too slow for tens of thousands of messages; rumqttc with a
//! large in-flight window is not. The broker's PUBACK is the moment a reading becomes
//! Pigeon's responsibility: every PUBACKed reading must reach the relay's stream.
//!
//! Matching PUBACKs to readings: rumqttc emits `Outgoing::Publish(pkid)` for new requests
//! in the order they were submitted (it stops taking requests while a packet id collides),
//! so the n-th such event belongs to the n-th reading submitted. The reading's number is
//! queued *before* its publish request, so it is always there when the event comes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One message to publish, identified by `n`.
#[derive(Debug, Clone)]
pub struct Reading {
    pub n: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    pub client_id: String,
    /// QoS 1 messages in flight (unacknowledged) at once.
    pub inflight: u16,
    /// Messages per second; `None` publishes as fast as the broker takes them.
    pub rate_per_sec: Option<u32>,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            client_id: "pigeon-e2e-publisher".to_string(),
            inflight: 1000,
            rate_per_sec: None,
        }
    }
}

/// What the broker acknowledged.
#[derive(Debug, Clone, Default)]
pub struct PublishReport {
    /// Readings handed to the client.
    pub submitted: usize,
    /// Readings the broker PUBACKed, by `n`.
    pub acked: BTreeSet<u64>,
    /// Why publishing stopped early, if it did.
    pub error: Option<String>,
}

impl PublishReport {
    /// Panics unless every reading was acknowledged.
    pub fn assert_all_acked(&self, expected: usize) {
        assert!(
            self.error.is_none() && self.acked.len() == expected,
            "the broker acknowledged {} of {} readings ({} submitted); error: {:?}",
            crate::fmt_count(self.acked.len()),
            crate::fmt_count(expected),
            crate::fmt_count(self.submitted),
            self.error
        );
    }
}

/// A publisher running in the background.
pub struct Publisher {
    task: JoinHandle<PublishReport>,
    acked: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    total: usize,
}

impl Publisher {
    /// Connects to the broker on 127.0.0.1:`port` and publishes `readings` at QoS 1.
    pub fn spawn(port: u16, readings: Vec<Reading>, options: PublisherOptions) -> Publisher {
        let acked = Arc::new(AtomicUsize::new(0));
        let (stop_tx, stop_rx) = oneshot::channel();
        let total = readings.len();
        let task = tokio::spawn(run(port, readings, options, acked.clone(), stop_rx));
        Publisher {
            task,
            acked,
            stop: Some(stop_tx),
            total,
        }
    }

    /// Publishes everything and waits for the broker's acknowledgements (at most `timeout`).
    pub async fn publish_all(
        port: u16,
        readings: Vec<Reading>,
        options: PublisherOptions,
        timeout: Duration,
    ) -> PublishReport {
        Publisher::spawn(port, readings, options)
            .finish(timeout)
            .await
    }

    /// How many readings the broker has acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Waits until every reading was acknowledged or publishing failed, at most `timeout`;
    /// then stops and reports.
    pub async fn finish(mut self, timeout: Duration) -> PublishReport {
        let deadline = Instant::now() + timeout;
        let mut task = self.task;
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(r) => r.expect("publisher task panicked"),
            Err(_) => {
                if let Some(stop) = self.stop.take() {
                    let _ = stop.send(());
                }
                let mut report = task.await.expect("publisher task panicked");
                report.error.get_or_insert_with(|| {
                    format!("not all acknowledged within {:.0} s", timeout.as_secs_f64())
                });
                report
            }
        }
    }
}

async fn run(
    port: u16,
    readings: Vec<Reading>,
    options: PublisherOptions,
    acked_count: Arc<AtomicUsize>,
    mut stop: oneshot::Receiver<()>,
) -> PublishReport {
    let mut mo = MqttOptions::new(&options.client_id, "127.0.0.1", port);
    mo.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(options.inflight)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(mo, usize::from(options.inflight).max(10));
    let (order_tx, mut order_rx) = mpsc::unbounded_channel::<u64>();
    let total = readings.len();

    // Submits the readings, paced if asked.
    let rate = options.rate_per_sec;
    let submitted = Arc::new(AtomicUsize::new(0));
    let submitted2 = submitted.clone();
    let producer = tokio::spawn(async move {
        let start = Instant::now();
        for (i, r) in readings.into_iter().enumerate() {
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate.max(1)));
                if due > Instant::now() + Duration::from_millis(2) {
                    tokio::time::sleep_until(due).await;
                }
            }
            if order_tx.send(r.n).is_err() {
                break;
            }
            if client
                .publish(r.topic, QoS::AtLeastOnce, false, r.payload)
                .await
                .is_err()
            {
                break;
            }
            submitted2.fetch_add(1, Ordering::Relaxed);
        }
    });

    let mut by_pkid: HashMap<u16, u64> = HashMap::new();
    let mut acked = BTreeSet::new();
    let mut error = None;
    while acked.len() < total {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = &mut stop => break,
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => match order_rx.try_recv() {
                Ok(n) => {
                    by_pkid.insert(pkid, n);
                }
                Err(_) => {
                    error = Some(format!(
                        "a publish (pkid {pkid}) that no reading was queued for"
                    ));
                    break;
                }
            },
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(n) = by_pkid.remove(&ack.pkid)
                    && acked.insert(n)
                {
                    acked_count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(e) => {
                // A reconnect would re-send in-flight publishes and break the pkid→reading
                // bookkeeping; the broker is not expected to go away under a publisher.
                error = Some(format!("MQTT connection failed: {e}"));
                break;
            }
        }
    }
    producer.abort();
    if let Err(e) = producer.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
    PublishReport {
        submitted: submitted.load(Ordering::Relaxed),
        acked,
        error,
    }
}
