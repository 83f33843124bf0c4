//! How much is waiting in the outbox, for `/metrics`, `/status`, heartbeats and the
//! systemd status line — read at most about once a second however often it is asked,
//! and never on the async reactor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::reader::Pending;
use super::{OutboxError, OutboxReader};

/// How long a reading of the outbox is reused.
const MAX_AGE: Duration = Duration::from_secs(1);

/// The outbox's backlog at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Depth {
    pub(crate) pending: Pending,
    /// Records in the dead-letter table.
    pub(crate) dead_letters: u64,
}

/// A cached [`Depth`], refreshed on demand.
pub(crate) struct DepthCache {
    reader: Arc<OutboxReader>,
    /// Held across a refresh, so concurrent askers share one query.
    cached: Mutex<Option<(Instant, Depth)>>,
}

impl DepthCache {
    pub(crate) fn new(reader: Arc<OutboxReader>) -> Self {
        Self {
            reader,
            cached: Mutex::new(None),
        }
    }

    /// The depth, from a query at most [`MAX_AGE`] old.
    pub(crate) async fn get(&self) -> Result<Depth, OutboxError> {
        let mut cached = self.cached.lock().await;
        if let Some((at, depth)) = *cached
            && at.elapsed() < MAX_AGE
        {
            return Ok(depth);
        }
        let reader = self.reader.clone();
        let depth = tokio::task::spawn_blocking(move || {
            Ok::<_, OutboxError>(Depth {
                pending: reader.pending()?,
                dead_letters: reader.dead_letters()?,
            })
        })
        .await
        .map_err(|_| OutboxError::Closed)??;
        *cached = Some((Instant::now(), depth));
        Ok(depth)
    }
}
