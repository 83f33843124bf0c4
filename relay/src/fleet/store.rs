//! The fleet across restarts: `state/fleet.json`, written atomically every
//! [`SAVE_INTERVAL`] while something changed, and at shutdown; read at start.
//!
//! What it keeps is a view, not data: a missing, unreadable or foreign file starts the
//! fleet afresh (with a warning) and never stops the relay. A crash loses at most the
//! last [`SAVE_INTERVAL`] of counts. The events themselves are in the stream.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::registry::{Fleet, SAVED_VERSION, Saved};
use crate::data_dir::write_atomic;

/// The file under `state/`.
pub const FLEET_FILE: &str = "fleet.json";

/// How often the fleet is saved while it changes.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// Reads `state_dir/fleet.json`; `None` (and a warning) if it cannot be used.
pub fn load(state_dir: &Path) -> Option<Saved> {
    let path = state_dir.join(FLEET_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "Cannot read the saved fleet view; it starts afresh.");
            return None;
        }
    };
    match serde_json::from_slice::<Saved>(&bytes) {
        Ok(s) if s.version == SAVED_VERSION => Some(s),
        Ok(s) => {
            tracing::warn!(file = %path.display(), version = s.version, "The saved fleet view is of another version; it starts afresh.");
            None
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "The saved fleet view does not read; it starts afresh.");
            None
        }
    }
}

/// Saves the fleet when it changed since the last save.
#[derive(Debug)]
pub struct Saver {
    fleet: Arc<Fleet>,
    state_dir: PathBuf,
    /// What was written last; one save at a time.
    last: Mutex<Vec<u8>>,
    /// Held while writing: a write of a save task aborted mid-way runs on in the blocking
    /// pool, and must not meet the final save's in the same temporary file.
    writing: Arc<std::sync::Mutex<()>>,
    failing: AtomicBool,
}

impl Saver {
    pub fn new(fleet: Arc<Fleet>, state_dir: PathBuf) -> Self {
        Self {
            fleet,
            state_dir,
            last: Mutex::new(Vec::new()),
            writing: Arc::new(std::sync::Mutex::new(())),
            failing: AtomicBool::new(false),
        }
    }

    /// Writes `state/fleet.json` if the fleet changed since the last write. A failure is
    /// logged (once until a write succeeds again) and tried again next time.
    pub async fn save(&self) {
        let mut last = self.last.lock().await;
        // Serde of plain structs into a Vec does not fail.
        let Ok(bytes) = serde_json::to_vec(&self.fleet.saved()) else {
            return;
        };
        if bytes == *last {
            return;
        }
        let dir = self.state_dir.clone();
        let written = bytes.clone();
        let writing = self.writing.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = writing.lock().unwrap_or_else(|e| e.into_inner());
            write_atomic(&dir, FLEET_FILE, &written)
        })
        .await;
        match result {
            Ok(Ok(())) => {
                *last = bytes;
                if self.failing.swap(false, Relaxed) {
                    tracing::info!("The fleet view is saved again.");
                }
            }
            Ok(Err(e)) => {
                if !self.failing.swap(true, Relaxed) {
                    tracing::warn!(dir = %self.state_dir.display(), error = %e, "Cannot save the fleet view; it is tried again every few seconds (a restart now would forget the latest figures).");
                }
            }
            Err(e) => tracing::warn!(error = %e, "Saving the fleet view failed unexpectedly."),
        }
    }

    /// Saves every [`SAVE_INTERVAL`] until aborted.
    pub fn spawn(self: Arc<Self>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAVE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                self.save().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::record::{RequestKind, Tally};
    use pigeon_shared::ce::GatewayId;

    const T0: i64 = 1_772_323_200_000;

    fn settings() -> crate::fleet::config::FleetSettings {
        crate::fleet::config::FleetConfig::default()
            .validate()
            .unwrap()
    }

    #[tokio::test]
    async fn saves_when_changed_and_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewayId::new("pi-1").unwrap();
        let gateways = [(gw.clone(), "acme".to_owned())];
        let fleet = Arc::new(Fleet::new(&gateways, false, settings(), T0, None));
        let saver = Saver::new(fleet.clone(), dir.path().to_owned());
        assert_eq!(load(dir.path()), None);
        saver.save().await;
        assert_eq!(load(dir.path()).unwrap().gateways[0].record.total.events, 0);
        fleet.note(
            &gw,
            T0 + 1,
            RequestKind::Events,
            200,
            Tally {
                events: 7,
                ..Tally::default()
            },
        );
        saver.save().await;
        let saved = load(dir.path()).unwrap();
        assert_eq!(saved.gateways[0].record.total.events, 7);
        // Unchanged: not written again.
        std::fs::write(dir.path().join(FLEET_FILE), b"{}").unwrap();
        saver.save().await;
        assert_eq!(std::fs::read(dir.path().join(FLEET_FILE)).unwrap(), b"{}");

        let again = Fleet::new(&gateways, false, settings(), T0 + 100, Some(saved));
        assert_eq!(again.get(&gw).unwrap().record().total.events, 7);
    }

    #[test]
    fn a_bad_file_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FLEET_FILE), b"{not json").unwrap();
        assert_eq!(load(dir.path()), None);
        std::fs::write(
            dir.path().join(FLEET_FILE),
            br#"{"version":99,"gateways":[]}"#,
        )
        .unwrap();
        assert_eq!(load(dir.path()), None);
    }
}
