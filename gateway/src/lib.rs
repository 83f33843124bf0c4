//! pigeon-gateway: the edge half of Pigeon.
//!
//! Sources ([`sources`]) turn what arrives at the Pi into records; every record is
//! committed to the SQLite [`outbox`] before it is acknowledged to its producer; the
//! [`uplink`] drains the outbox to pigeon-relay as CloudEvents batches and deletes a
//! record only after the relay said it is durable. Camera files wait in the [`spool`]:
//! the files source puts them there, the uplink's file lane lets them go. [`run`] starts
//! them ([`running`]: start → running handle → shutdown with a deadline); the binary
//! (`main.rs` → [`cli`]) parses arguments, loads the [`config`] and calls it.
//!
//! What it says about itself: [`stats`] counts (atomics), [`report`] turns the counts,
//! the outbox depth and the [`host`]'s disk into one snapshot, which [`http`] serves as
//! `/status` and (via [`metrics`]) `/metrics`, `pigeon-gateway status` prints, and
//! [`systemd`] sends to systemd as the status line with the watchdog pings.
//! [`dead_letter_cli`] is `pigeon-gateway dead-letter list | retry | purge`; [`exit`] holds
//! the exit codes the commands share.

pub mod cli;
pub(crate) mod config;
pub(crate) mod dead_letter_cli;
pub(crate) mod exit;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod host;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod outbox;
pub(crate) mod report;
pub(crate) mod rules;
pub(crate) mod rules_cli;
mod running;
pub(crate) mod sources;
pub(crate) mod spool;
pub(crate) mod stats;
pub(crate) mod systemd;
pub(crate) mod uplink;

use std::future::Future;
use std::sync::Arc;

use crate::config::Config;
use crate::running::Running;
use crate::stats::LastErrorSlot;

/// Runs the gateway until `shutdown` resolves, then stops taking new data, lets the
/// in-flight upload finish within `gateway.shutdown_timeout`, and leaves the outbox
/// consistent. `token` is the relay token already read from the configuration;
/// `last_error` is where the log keeps the last warning (see [`stats::LastErrorLayer`]).
///
/// Under systemd (`NOTIFY_SOCKET`) it reports `READY=1` once everything is started,
/// pings the watchdog while healthy, and says `STOPPING=1` when `shutdown` resolves.
/// However stuck a part is, it returns within `shutdown_timeout` plus a few seconds.
pub(crate) async fn run(
    config: Config,
    token: Option<String>,
    last_error: Arc<LastErrorSlot>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let timeout = config.gateway.shutdown_timeout.get();
    let running = Running::start(config, token, last_error).await?;
    shutdown.await;
    running.shutdown(timeout).await;
    Ok(())
}
