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
//! * [`server`] — the axum routes: the ingest endpoint, the upload endpoint, the fleet
//!   view, `/live`, `/ready`, `/metrics`;
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
//! * [`fleet`] — every known gateway's record (last request, last heartbeat and its
//!   figures, counts today and in total, silence), for operators at `/v1/gateways` and as
//!   per-gateway series on `/metrics`;
//! * [`metrics`] — counters and histograms in the Prometheus text format;
//! * [`systemd`] — what systemd is told: ready, watchdog pings, status, stopping.
//!
//! [`Running`] ties them together: [`Running::start`] wires and serves, the trigger is
//! pulled, [`Running::wait`] shuts down within a deadline; [`run`] does the three. The
//! protocol is documented in `docs/protocol.md`, the files in `docs/data-layout.md`, the
//! configuration in `docs/configuration-relay.md`.

pub mod admission;
pub mod auth;
pub mod capture;
pub mod config;
pub mod data_dir;
pub mod fleet;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod metrics;
pub mod request;
mod running;
pub mod s3;
pub mod serve;
pub mod server;
pub mod sink;
pub mod spec;
pub mod systemd;
pub mod tls;
pub mod upload;

use std::future::Future;

use tokio::net::TcpListener;

pub use config::{Config, ConfigError, RelayConfig};
pub use running::Running;

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
    let relay = Running::start(config, listener).await?;
    relay.stop_on(shutdown);
    relay.wait().await
}
