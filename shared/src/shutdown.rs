//! One stop signal for all of a binary's tasks: the orchestrator holds the [`Trigger`],
//! every task a clone of the [`Shutdown`] it hands out.
//!
//! Dropping every `Trigger` counts as a stop: a task never outlives the orchestrator
//! that could have stopped it. Tests that want a task that never stops use
//! [`Shutdown::never`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Asks every [`Shutdown`] subscribed to it to stop.
#[derive(Debug, Clone)]
pub struct Trigger {
    tx: Arc<watch::Sender<bool>>,
}

/// A task's view of the stop signal: asked whether it is stopping, or awaited.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    /// [`Shutdown::never`]'s own trigger, kept so it is never dropped.
    _never: Option<Trigger>,
}

impl Trigger {
    /// A trigger and the first [`Shutdown`] it stops.
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger { tx: Arc::new(tx) }, Shutdown { rx, _never: None })
    }

    /// Asks every subscribed [`Shutdown`] to stop. Asking again changes nothing.
    pub fn stop(&self) {
        self.tx.send_replace(true);
    }

    /// Another [`Shutdown`] this trigger stops (one already stopped if it was pulled).
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
            _never: None,
        }
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_pulled(&self) -> bool {
        *self.tx.borrow()
    }
}

impl Shutdown {
    /// A signal that never says stop.
    pub fn never() -> Shutdown {
        let (trigger, shutdown) = Trigger::new();
        Shutdown {
            _never: Some(trigger),
            ..shutdown
        }
    }

    /// Whether a stop was asked for (or every trigger is gone).
    pub fn is_stopping(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Resolves once a stop was asked for (at once if it was already).
    pub async fn stopped(&mut self) {
        // An error means every trigger is gone: that is a stop too.
        let _ = self.rx.wait_for(|&stop| stop).await;
    }

    /// Sleeps for `d`, or less if a stop is asked for meanwhile; returns whether the
    /// task is stopping. `if shutdown.stopped_within(backoff).await { break }`.
    pub async fn stopped_within(&mut self, d: Duration) -> bool {
        tokio::select! {
            () = self.stopped() => true,
            () = tokio::time::sleep(d) => self.is_stopping(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stop_reaches_every_subscriber_and_cuts_sleeps_short() {
        let (trigger, mut first) = Trigger::new();
        let mut second = trigger.subscribe();
        assert!(!first.is_stopping() && !trigger.is_pulled());
        assert!(!first.stopped_within(Duration::from_secs(5)).await);
        let sleeper = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let stopping = second.stopped_within(Duration::from_secs(3600)).await;
            (stopping, started.elapsed())
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        trigger.stop();
        let (stopping, slept) = sleeper.await.unwrap();
        assert!(stopping);
        assert!(slept < Duration::from_secs(3), "slept {slept:?}");
        first.stopped().await;
        assert!(first.is_stopping() && trigger.is_pulled());
        assert!(
            trigger.subscribe().is_stopping(),
            "a late subscriber sees the stop"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_every_trigger_is_a_stop_but_never_never_stops() {
        let (trigger, mut shutdown) = Trigger::new();
        let copy = trigger.clone();
        drop(trigger);
        assert!(!shutdown.is_stopping(), "a clone still holds it");
        drop(copy);
        assert!(shutdown.is_stopping());
        shutdown.stopped().await;

        let mut never = Shutdown::never();
        assert!(!never.stopped_within(Duration::from_secs(86_400)).await);
        assert!(!never.clone().is_stopping());
    }
}
