//! pigeon-gateway: the edge half of Pigeon.
//!
//! Sources ([`sources`]) turn what arrives at the Pi into records; every record is
//! committed to the SQLite [`outbox`] before it is acknowledged to its producer; the
//! [`uplink`] drains the outbox to pigeon-relay as CloudEvents batches and deletes a
//! record only after the relay said it is durable. [`run`] wires them together; the
//! binary (`main.rs` → [`cli`]) parses arguments, loads the [`config`] and calls it.

pub mod cli;
pub mod config;
pub mod outbox;
pub mod sources;
pub mod stats;
pub mod uplink;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::outbox::{OutboxReader, OutboxWriter, db};
use crate::stats::Stats;

/// Runs the gateway until `shutdown` resolves, then stops taking new data, lets the
/// in-flight upload finish within `gateway.shutdown_timeout`, and leaves the outbox
/// consistent. `token` is the relay token already read from the configuration.
pub async fn run(
    config: Config,
    token: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // One TLS crypto provider for the whole process (ring: small, builds for the Pi).
    let _ = rustls::crypto::ring::default_provider().install_default();

    let data_dir = config.gateway.data_dir.clone();
    let path = db::path_in(&data_dir);
    let sync = config.outbox.synchronous;
    let (conn, producer_id) = tokio::task::spawn_blocking(move || {
        let mut conn = db::open(&path, sync)?;
        db::migrate(&mut conn)?;
        let producer = db::producer_id(&conn)?;
        Ok::<_, outbox::OutboxError>((conn, producer))
    })
    .await?
    .with_context(|| format!("cannot open the outbox in {}", data_dir.display()))?;
    let (writer, writer_thread) = OutboxWriter::start(conn, config.outbox.commit_max_records)?;
    let reader = Arc::new(OutboxReader::open(&db::path_in(&data_dir))?);
    let pending = {
        let r = reader.clone();
        tokio::task::spawn_blocking(move || r.pending()).await??
    };
    let stats = Arc::new(Stats::default());
    info!(
        gateway = %config.gateway.id,
        outbox = %db::path_in(&data_dir).display(),
        pending = pending.count,
        producer_id = %producer_id,
        "pigeon-gateway started."
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let uplink = uplink::Uplink::new(
        config.relay.clone(),
        token,
        reader.clone(),
        writer.clone(),
        stats.clone(),
        producer_id,
    )?;
    let uplink_task = tokio::spawn(uplink.run(stop_rx.clone()));
    let mqtt_task = config.mqtt.clone().map(|m| {
        let source = sources::mqtt::MqttSource::new(
            m,
            &config.gateway.id,
            writer.clone(),
            stats.clone(),
            &data_dir,
        );
        tokio::spawn(source.run(stop_rx.clone()))
    });
    drop(writer);

    shutdown.await;
    info!("Stopping: no new data is taken; finishing the upload in flight.");
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + config.gateway.shutdown_timeout.get();
    if let Some(t) = mqtt_task {
        let _ = tokio::time::timeout_at(deadline, t).await;
    }
    let mut uplink_task = uplink_task;
    if tokio::time::timeout_at(deadline, &mut uplink_task)
        .await
        .is_err()
    {
        warn!(
            "The relay did not answer before the shutdown deadline; the events in flight stay in the outbox and are sent after the next start."
        );
        uplink_task.abort();
        let _ = uplink_task.await;
    }
    // Every writer handle is gone now: the writer thread commits what is queued and ends.
    tokio::task::spawn_blocking(move || writer_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the outbox writer thread panicked"))?;
    let pending = tokio::task::spawn_blocking(move || reader.pending()).await??;
    info!(pending = pending.count, "pigeon-gateway stopped.");
    Ok(())
}
