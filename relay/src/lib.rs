//! `pigeon-relay`: receives CloudEvents from pigeon gateways over HTTP, and answers
//! "durable" only once they are fsynced to the stream, each exactly once.
//!
//! How the modules fit:
//!
//! * [`config`] — the TOML configuration and its validation into a checked [`Config`];
//! * [`auth`] — bearer tokens → gateway ids;
//! * [`admission`] — each gateway's share of the relay: requests in progress and request
//!   body bytes held, so one gateway cannot lock the others out;
//! * [`spec`] — the CloudEvents rules for attributes the SDK does not check;
//! * [`ingest`] — the CloudEvents HTTP binding (batch, structured, binary; gzip) and
//!   Pigeon's per-event rules, as pure functions;
//! * [`tls`] — HTTPS on the relay's own port, client certificates as identities, the
//!   certificate reloaded without a restart;
//! * [`serve`] — the connection loop: hyper with a deadline for request headers and a cap
//!   on open connections;
//! * [`server`] — the axum routes: the ingest endpoint, the upload endpoint, `/live`,
//!   `/ready`, `/metrics`;
//! * [`request`] — what the handlers share: state, admission, reading and draining
//!   bodies, the failure answer;
//! * [`data_dir`] — the data dir's layout and its durable file operations;
//! * [`sink`] — the embedded stream sink: the deduplication index, the stream (`.jsonl`
//!   files or Kafka, behind one interface), the checkpoint that makes the index survive
//!   restarts, and the single writer thread that does group commits;
//! * [`upload`] — resumable file uploads: bytes into `objects/` (or the bucket), then the
//!   file's event (with `dataref`) through the sink;
//! * [`s3`] — the bucket, through aws-sdk-s3: the few calls the relay makes, their errors
//!   sorted into "try again later" and "gone";
//! * [`capture`] — every accepted event also into the bucket as gzip'd JSON lines under
//!   Hive-style keys, from the stream files or from Kafka;
//! * [`metrics`] — counters and histograms in the Prometheus text format;
//! * [`systemd`] — what systemd is told: ready, watchdog pings, status, stopping.
//!
//! [`run`] ties them together. The protocol is documented in `docs/protocol.md`, the
//! files in `docs/data-layout.md`, the configuration in `docs/configuration-relay.md`.

pub mod admission;
pub mod auth;
pub mod capture;
pub mod config;
pub mod data_dir;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod metrics;
pub mod request;
pub mod s3;
pub mod serve;
pub mod server;
pub mod sink;
pub mod spec;
pub mod systemd;
pub mod tls;
pub mod upload;

use std::future::Future;
use std::sync::Arc;

use pigeon_sdnotify::{Notifier, State};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

pub use config::{Config, ConfigError, RelayConfig};

/// Why the relay could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot start the stream sink: {0}")]
    DataDir(#[from] sink::RecoveryError),
    #[error("cannot serve HTTPS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Runs the relay on `listener` until `shutdown` completes, then stops accepting
/// connections, lets in-flight requests finish (for at most `shutdown_timeout`), writes
/// the deduplication checkpoint and returns.
///
/// Startup recovers the deduplication index from the data dir before serving; failing
/// that (for example an unwritable data dir) is an error. Under systemd
/// (`NOTIFY_SOCKET`) it says `READY=1` once it serves, pings the watchdog while the sink
/// writer answers, and says `STOPPING=1` when `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RelayError> {
    let notifier = Arc::new(Notifier::from_env());
    let metrics = Arc::new(metrics::Metrics::new());
    serve::raise_descriptor_limit(config.limits.max_connections);
    // First: a certificate problem is the operator's to fix, before anything is opened.
    let tls = match &config.tls {
        Some(settings) => Some(tls::Tls::open(settings.clone(), metrics.clone())?),
        None => None,
    };
    let data_dir = config.data_dir.clone();
    let sink_settings = config.sink;
    let sink_metrics = metrics.clone();
    let stream = config.stream.clone();
    let tenants = config.tenants.clone();
    let (sink, writer_thread) = tokio::task::spawn_blocking(move || {
        sink::start(&data_dir, sink_settings, stream, tenants, sink_metrics)
    })
    .await
    .map_err(|e| RelayError::Internal(format!("startup task failed: {e}")))??;
    let ticker = sink.spawn_ticker(config.sink.checkpoint_interval);
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || upload::UploadStore::open(&data_dir))
        .await
        .map_err(|e| RelayError::Internal(format!("startup task failed: {e}")))??;
    let store = Arc::new(store);
    let (objects, bucket, prober): (Box<dyn upload::ObjectStore>, _, _) = match &config.objects.s3 {
        None => (Box::new(upload::DirObjects::new(store.clone())), None, None),
        Some(s) => {
            let bucket = Arc::new(s3::Bucket::connect(s).await);
            let prober = s3::spawn_prober(bucket.clone(), metrics.clone());
            let objects =
                upload::S3Objects::new(bucket.clone(), s.part_size, store.clone(), metrics.clone());
            (Box::new(objects), Some(bucket), Some(prober))
        }
    };
    let capture = match (&config.capture, bucket) {
        (Some(settings), Some(bucket)) => Some(
            capture::Capture::start(
                settings,
                &config.stream,
                bucket,
                &config.data_dir,
                &config.tenants,
                metrics.clone(),
            )
            .await
            .map_err(|e| RelayError::Internal(e.to_string()))?,
        ),
        _ => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let uploads = Arc::new(upload::Uploads::new(
        store,
        objects,
        sink.clone(),
        metrics.clone(),
        upload::Settings {
            base_url: config.objects.base_url.clone(),
            max_object_bytes: config.limits.max_object_bytes,
            max_event_bytes: config.limits.max_event_bytes,
            abandon_after: config.uploads.abandon_after,
            tenants: config.tenants.clone(),
        },
        stop_rx.clone(),
    ));
    let sweeper = uploads.spawn_sweeper();

    if config.gateways.is_empty() {
        if config.allow_unauthenticated {
            tracing::warn!(
                "No gateways are configured and unauthenticated ingest is allowed: anyone who can reach the relay can send events."
            );
        } else {
            tracing::warn!(
                "No gateways are configured, so every ingest request will be refused with 401; add [[gateways]] to the config."
            );
        }
    } else if config.allow_unauthenticated {
        tracing::warn!("Unauthenticated ingest is allowed: requests without a token are accepted.");
    }

    let state = Arc::new(request::AppState {
        auth: auth::Authenticator::new(config.gateways.clone(), config.allow_unauthenticated),
        sink: sink.clone(),
        limits: config.limits,
        retry_after: config.sink.retry_after,
        metrics: metrics.clone(),
        permits: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
        admission: Arc::new(admission::Admission::new(
            admission::Shares {
                requests_per_client: config.limits.max_requests_per_gateway,
                bytes_per_client: config.limits.max_buffered_bytes_per_gateway,
                bytes_total: config.limits.max_buffered_bytes,
            },
            metrics.clone(),
        )),
        uploads,
        upload_permits: Arc::new(Semaphore::new(config.limits.max_concurrent_uploads)),
    });
    let app = server::router(state);

    let stopping = notifier.clone();
    tokio::spawn(async move {
        shutdown.await;
        systemd::notify(
            &stopping,
            &[
                State::Stopping,
                State::Status("Stopping: finishing the requests in flight."),
            ],
        );
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone, which only happens after it sent.
        let _ = rx.wait_for(|&s| s).await;
    };

    let addr = listener.local_addr().map_err(RelayError::Serve)?;
    let reloader = match &tls {
        Some(t) => t.clone().spawn_reloader(),
        None => tokio::spawn(ignore_sighup()),
    };
    tracing::info!(
        %addr,
        https = tls.is_some(),
        data_dir = %config.data_dir.display(),
        objects = %config.objects.base_url,
        "The relay is listening."
    );
    let line = systemd::status_line(&addr.to_string(), &metrics);
    systemd::notify(&notifier, &[State::Ready, State::Status(&line)]);
    let watchdog = notifier.is_enabled().then(|| {
        tokio::spawn(systemd::run(
            notifier.clone(),
            pigeon_sdnotify::watchdog_interval(),
            sink.clone(),
            metrics.clone(),
            addr.to_string(),
        ))
    });

    let serve_stop = stop_rx.clone();
    let serve_metrics = metrics.clone();
    let serve = async move {
        let limits = serve::ConnectionLimits {
            header_timeout: config.limits.header_timeout,
            max_connections: config.limits.max_connections,
        };
        let stop = stopped(serve_stop);
        match tls {
            Some(t) => {
                let listener = tls::TlsListener::new(listener, t)?;
                serve::serve(listener, app, limits, serve_metrics, stop).await
            }
            None => {
                let listener = tls::PlainListener(listener);
                serve::serve(listener, app, limits, serve_metrics, stop).await
            }
        }
    };
    let deadline = async {
        stopped(stop_rx).await;
        tracing::info!(
            timeout_secs = config.shutdown_timeout.as_secs_f64(),
            "Shutting down: no new connections; waiting for in-flight requests."
        );
        tokio::time::sleep(config.shutdown_timeout).await;
    };
    tokio::select! {
        r = serve => r.map_err(RelayError::Serve)?,
        () = deadline => tracing::warn!(
            "In-flight requests did not finish within the shutdown timeout; stopping anyway."
        ),
    }

    if let Some(w) = watchdog {
        w.abort();
    }
    sweeper.abort();
    reloader.abort();
    if let Some(p) = prober {
        p.abort();
    }
    if let Some(c) = capture {
        c.stop()
            .await
            .map_err(|e| RelayError::Internal(format!("stopping capture failed: {e}")))?;
    }
    sink.shutdown().await;
    ticker.abort();
    tokio::task::spawn_blocking(move || writer_thread.join())
        .await
        .map_err(|e| RelayError::Internal(format!("joining the sink writer failed: {e}")))?
        .map_err(|_| RelayError::Internal("the sink writer thread panicked".to_owned()))?;
    tracing::info!("The relay stopped.");
    Ok(())
}

/// Without `[tls]` there is nothing to reload: SIGHUP (`systemctl reload`) is logged, not
/// the default action, which would end the process.
async fn ignore_sighup() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(
            "SIGHUP: nothing to reload (no [tls]); other settings take effect at a restart."
        );
    }
}
