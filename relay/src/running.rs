//! The relay's lifetime in three steps, as mini-redis keeps its listener apart from the
//! shutdown: [`Running::start`] wires the parts together and serves; the trigger is
//! pulled (by [`Running::stop_on`]'s signal or by [`Running::shutdown`]); then
//! [`Running::wait`] lets the requests in flight finish within a deadline and stops the
//! rest in order.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use pigeon_sdnotify::{Notifier, State};
use pigeon_shared::shutdown::{Shutdown, Trigger};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::capture::Capture;
use crate::config::Config;
use crate::data_dir::STATE_DIR;
use crate::fleet::Fleet;
use crate::fleet::store::Saver;
use crate::metrics::Metrics;
use crate::sink::SinkHandle;
use crate::upload::{DirObjects, ObjectStore, S3Objects, UploadStore, Uploads};
use crate::{
    RelayError, admission, auth, fleet, request, s3, serve, server, sink, systemd, tls, upload,
};

/// The HTTP server while it runs (until the trigger is pulled and its connections are done).
type Serving = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A relay that serves. Ends with [`Running::wait`] (or [`Running::shutdown`]).
pub struct Running {
    trigger: Trigger,
    shutdown: Shutdown,
    notifier: Arc<Notifier>,
    serving: Serving,
    background: Background,
    capture: Option<Capture>,
    sink: SinkHandle,
    writer: std::thread::JoinHandle<()>,
    /// Saves the fleet view a last time once the requests are done.
    fleet_saver: Arc<Saver>,
    /// `shutdown_timeout`: how long the requests in flight get once it stops.
    shutdown_timeout: Duration,
}

/// The tasks beside the server, aborted once it is done.
struct Background {
    watchdog: Option<JoinHandle<()>>,
    sweeper: JoinHandle<()>,
    reloader: JoinHandle<()>,
    prober: Option<JoinHandle<()>>,
    fleet_saver: JoinHandle<()>,
    /// Aborted last: after the sink writer's final checkpoint.
    ticker: JoinHandle<()>,
}

/// Where finished files go, and the bucket if there is one (capture writes into it).
struct Objects {
    store: Box<dyn ObjectStore>,
    bucket: Option<Arc<s3::Bucket>>,
    prober: Option<JoinHandle<()>>,
}

impl Running {
    /// Recovers the deduplication index from the data dir, opens the object store and
    /// capture, and serves on `listener`. Under systemd it says `READY=1` once it serves
    /// and pings the watchdog while the sink writer answers.
    pub async fn start(config: Config, listener: TcpListener) -> Result<Self, RelayError> {
        let notifier = Arc::new(Notifier::from_env());
        let metrics = Arc::new(Metrics::new());
        serve::raise_descriptor_limit(config.limits.max_connections);
        // First: a certificate problem is the operator's to fix, before anything is opened.
        let tls = match &config.tls {
            Some(settings) => Some(tls::Tls::open(settings.clone(), metrics.clone())?),
            None => None,
        };
        let (sink, writer) = start_sink(&config, &metrics).await?;
        let ticker = sink.spawn_ticker(config.sink.checkpoint_interval);
        let data_dir = config.data_dir.clone();
        let store = Arc::new(blocking(move || UploadStore::open(&data_dir)).await??);
        let objects = open_objects(&config, store.clone(), &metrics).await;
        let capture = start_capture(&config, objects.bucket, &metrics).await?;
        let (trigger, shutdown) = Trigger::new();
        let uploads = Arc::new(Uploads::new(
            store,
            objects.store,
            sink.clone(),
            metrics.clone(),
            upload_settings(&config),
            shutdown.clone(),
        ));
        let sweeper = uploads.spawn_sweeper();
        warn_about_access(&config);
        let fleet = start_fleet(&config).await?;
        let fleet_saver = Arc::new(Saver::new(fleet.clone(), config.data_dir.join(STATE_DIR)));
        let saving = fleet_saver.clone().spawn();
        let app = server::router(app_state(&config, &sink, &metrics, uploads, fleet));

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
        let limits = serve::ConnectionLimits {
            header_timeout: config.limits.header_timeout,
            max_connections: config.limits.max_connections,
        };
        let serving = Box::pin(serve_until(
            listener,
            tls,
            app,
            limits,
            metrics,
            shutdown.clone(),
        ));
        Ok(Self {
            trigger,
            shutdown,
            notifier,
            serving,
            background: Background {
                watchdog,
                sweeper,
                reloader,
                prober: objects.prober,
                fleet_saver: saving,
                ticker,
            },
            capture,
            sink,
            writer,
            fleet_saver,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// Pulls the trigger once `signal` completes (SIGTERM, SIGINT, a test's stop).
    pub fn stop_on(&self, signal: impl Future<Output = ()> + Send + 'static) {
        let (trigger, notifier) = (self.trigger.clone(), self.notifier.clone());
        tokio::spawn(async move {
            signal.await;
            stop(&trigger, &notifier);
        });
    }

    /// Serves until the trigger is pulled, then shuts down within `shutdown_timeout`.
    pub async fn wait(self) -> Result<(), RelayError> {
        let deadline = self.shutdown_timeout;
        self.finish_within(deadline).await
    }

    /// Pulls the trigger now and shuts down within `deadline`.
    pub async fn shutdown(self, deadline: Duration) -> Result<(), RelayError> {
        stop(&self.trigger, &self.notifier);
        self.finish_within(deadline).await
    }

    /// Once the trigger is pulled: no new connections, the requests in flight finish
    /// (for at most `deadline`), the background tasks and capture stop, and the sink
    /// writer finishes what is queued, writes its checkpoint and ends.
    async fn finish_within(self, deadline: Duration) -> Result<(), RelayError> {
        let Self {
            mut shutdown,
            serving,
            background,
            capture,
            sink,
            writer,
            fleet_saver,
            ..
        } = self;
        let waited = async {
            shutdown.stopped().await;
            tracing::info!(
                timeout_secs = deadline.as_secs_f64(),
                "Shutting down: no new connections; waiting for in-flight requests."
            );
            tokio::time::sleep(deadline).await;
        };
        tokio::select! {
            r = serving => r.map_err(RelayError::Serve)?,
            () = waited => tracing::warn!(
                "In-flight requests did not finish within the shutdown timeout; stopping anyway."
            ),
        }
        let ticker = background.abort();
        fleet_saver.save().await;
        if let Some(c) = capture {
            c.stop()
                .await
                .map_err(|e| RelayError::Internal(format!("stopping capture failed: {e}")))?;
        }
        sink.shutdown().await;
        ticker.abort();
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|e| RelayError::Internal(format!("joining the sink writer failed: {e}")))?
            .map_err(|_| RelayError::Internal("the sink writer thread panicked".to_owned()))?;
        tracing::info!("The relay stopped.");
        Ok(())
    }
}

impl Background {
    /// Aborts every task but the checkpoint ticker, which it returns.
    fn abort(self) -> JoinHandle<()> {
        if let Some(w) = self.watchdog {
            w.abort();
        }
        self.sweeper.abort();
        self.reloader.abort();
        if let Some(p) = self.prober {
            p.abort();
        }
        self.fleet_saver.abort();
        self.ticker
    }
}

/// Tells systemd the relay is stopping, and every part of it to stop.
fn stop(trigger: &Trigger, notifier: &Notifier) {
    systemd::notify(
        notifier,
        &[
            State::Stopping,
            State::Status("Stopping: finishing the requests in flight."),
        ],
    );
    trigger.stop();
}

/// Runs startup work on the blocking pool; a panic there is an internal error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RelayError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RelayError::Internal(format!("startup task failed: {e}")))
}

/// Recovers the data dir and starts the sink writer thread.
async fn start_sink(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(SinkHandle, std::thread::JoinHandle<()>), RelayError> {
    let data_dir = config.data_dir.clone();
    let settings = config.sink;
    let stream = config.stream.clone();
    let tenants = config.tenants.clone();
    let metrics = metrics.clone();
    Ok(blocking(move || sink::start(&data_dir, settings, stream, tenants, metrics)).await??)
}

/// The fleet view of the configured gateways, with what `state/fleet.json` kept.
async fn start_fleet(config: &Config) -> Result<Arc<Fleet>, RelayError> {
    let state_dir = config.data_dir.join(STATE_DIR);
    let saved = blocking(move || fleet::store::load(&state_dir)).await?;
    let gateways: Vec<_> = config
        .gateways
        .iter()
        .map(|c| {
            let tenant = config.tenants.get(&c.gateway).cloned().unwrap_or_default();
            (c.gateway.clone(), tenant)
        })
        .collect();
    Ok(Arc::new(Fleet::new(
        &gateways,
        config.allow_unauthenticated,
        config.fleet,
        fleet::registry::now_ms(),
        saved,
    )))
}

/// The configured object store: the data dir's `objects/`, or the bucket (and its prober).
async fn open_objects(config: &Config, store: Arc<UploadStore>, metrics: &Arc<Metrics>) -> Objects {
    match &config.objects.s3 {
        None => Objects {
            store: Box::new(DirObjects::new(store)),
            bucket: None,
            prober: None,
        },
        Some(s) => {
            let bucket = Arc::new(s3::Bucket::connect(s).await);
            let prober = s3::spawn_prober(bucket.clone(), metrics.clone());
            Objects {
                store: Box::new(S3Objects::new(
                    bucket.clone(),
                    s.part_size,
                    store,
                    metrics.clone(),
                )),
                bucket: Some(bucket),
                prober: Some(prober),
            }
        }
    }
}

/// Capture into the bucket, if configured (and there is a bucket).
async fn start_capture(
    config: &Config,
    bucket: Option<Arc<s3::Bucket>>,
    metrics: &Arc<Metrics>,
) -> Result<Option<Capture>, RelayError> {
    let (Some(settings), Some(bucket)) = (&config.capture, bucket) else {
        return Ok(None);
    };
    let capture = Capture::start(
        settings,
        &config.stream,
        bucket,
        &config.data_dir,
        &config.tenants,
        metrics.clone(),
    )
    .await
    .map_err(|e| RelayError::Internal(e.to_string()))?;
    Ok(Some(capture))
}

fn upload_settings(config: &Config) -> upload::Settings {
    upload::Settings {
        base_url: config.objects.base_url.clone(),
        max_object_bytes: config.limits.max_object_bytes,
        max_event_bytes: config.limits.max_event_bytes,
        abandon_after: config.uploads.abandon_after,
        tenants: config.tenants.clone(),
    }
}

/// Warns when the configuration lets anyone in, or nobody.
fn warn_about_access(config: &Config) {
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
}

/// What the handlers share.
fn app_state(
    config: &Config,
    sink: &SinkHandle,
    metrics: &Arc<Metrics>,
    uploads: Arc<Uploads>,
    fleet: Arc<Fleet>,
) -> Arc<request::AppState> {
    Arc::new(request::AppState {
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
        fleet,
        operators: fleet::Operators::new(config.operators.clone()),
    })
}

/// Serves `app` on `listener` (behind TLS if configured) until `shutdown`, then lets the
/// connections finish their requests.
async fn serve_until(
    listener: TcpListener,
    tls: Option<Arc<tls::Tls>>,
    app: axum::Router,
    limits: serve::ConnectionLimits,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) -> io::Result<()> {
    let stop = async move { shutdown.stopped().await };
    match tls {
        Some(t) => {
            let listener = tls::TlsListener::new(listener, t)?;
            serve::serve(listener, app, limits, metrics, stop).await
        }
        None => {
            let listener = tls::PlainListener(listener);
            serve::serve(listener, app, limits, metrics, stop).await
        }
    }
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
