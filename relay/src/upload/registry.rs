//! Who is working on which upload right now: one lock per upload, newest request wins.
//!
//! Every request that changes an upload (create, `PATCH`, `DELETE`, the abandoned-upload
//! sweep) holds its [`Lease`] while it works. [`Registry::take_over`] first tells the
//! current holder to stop — a `PATCH` whose client went away without the relay noticing
//! (a half-open connection) would otherwise hold the upload until TCP gives up — and
//! then waits for it to let go. A holder sees that with [`Lease::superseded`] and
//! [`Lease::superseded_wait`].
//!
//! The lease also carries the upload's cached [`Hashed`] state, so bytes received by this
//! process are hashed once, however often the upload is resumed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedMutexGuard, watch};

use super::store::Hashed;

/// What is kept per upload between requests.
#[derive(Debug, Default)]
pub struct Held {
    /// The hash of the bytes held, when this process knows it.
    pub hashed: Option<Hashed>,
    /// Set once the upload's files are gone (finished, deleted, abandoned, or never
    /// there): the slot is then forgotten when its lease ends, unless someone waits.
    pub gone: bool,
}

impl Held {
    /// Marks the upload finished with: nothing more to remember.
    pub fn forget(&mut self) {
        self.hashed = None;
        self.gone = true;
    }
}

struct Slot {
    held: Arc<tokio::sync::Mutex<Held>>,
    /// Counts take-overs; a lease is superseded once this is past its own number.
    takeovers: watch::Sender<u64>,
}

type Slots = Arc<Mutex<HashMap<String, Arc<Slot>>>>;

/// The uploads being worked on, by `<gateway>/<id>`.
#[derive(Clone, Default)]
pub struct Registry {
    slots: Slots,
}

/// The right to work on one upload, until dropped.
pub struct Lease {
    slots: Slots,
    key: String,
    slot: Arc<Slot>,
    guard: OwnedMutexGuard<Held>,
    generation: u64,
    takeovers: watch::Receiver<u64>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self, key: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    held: Arc::new(tokio::sync::Mutex::new(Held::default())),
                    takeovers: watch::Sender::new(0),
                })
            })
            .clone()
    }

    /// Stops whoever holds the upload `key` and waits for its lease.
    pub async fn take_over(&self, key: &str) -> Lease {
        let slot = self.slot(key);
        let mut generation = 0;
        slot.takeovers.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        let guard = slot.held.clone().lock_owned().await;
        self.lease(key, slot, guard, generation)
    }

    /// The lease of `key` if nobody holds it now; stops nobody.
    pub fn try_lease(&self, key: &str) -> Option<Lease> {
        let slot = self.slot(key);
        let guard = slot.held.clone().try_lock_owned().ok()?;
        let generation = *slot.takeovers.borrow();
        Some(self.lease(key, slot, guard, generation))
    }

    fn lease(
        &self,
        key: &str,
        slot: Arc<Slot>,
        mut guard: OwnedMutexGuard<Held>,
        generation: u64,
    ) -> Lease {
        // Whether the upload is gone is for this holder to find out again.
        guard.gone = false;
        let takeovers = slot.takeovers.subscribe();
        Lease {
            slots: self.slots.clone(),
            key: key.to_owned(),
            slot,
            guard,
            generation,
            takeovers,
        }
    }

    /// How many uploads are remembered (being worked on, or with a cached hash).
    pub fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Lease {
    /// Whether a newer request has asked for this upload.
    pub fn superseded(&self) -> bool {
        *self.takeovers.borrow() != self.generation
    }

    /// Resolves once a newer request asks for this upload.
    pub async fn superseded_wait(&mut self) {
        while !self.superseded() {
            if self.takeovers.changed().await.is_err() {
                // The slot (and so the sender) lives as long as this lease.
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn held(&mut self) -> &mut Held {
        &mut self.guard
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.guard.gone {
            return;
        }
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's reference and this lease's: nobody else is waiting for it.
        if Arc::strong_count(&self.slot) == 2
            && slots
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            slots.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_newer_request_stops_the_holder_and_waits_for_it() {
        let reg = Registry::new();
        let mut first = reg.take_over("pi-1/a").await;
        assert!(!first.superseded());
        first.held().hashed = Some(Hashed {
            offset: 3,
            hasher: crate::upload::sha::Sha256::new(),
        });

        let reg2 = reg.clone();
        let second = tokio::spawn(async move { reg2.take_over("pi-1/a").await });
        // The holder is told...
        tokio::time::timeout(Duration::from_secs(10), first.superseded_wait())
            .await
            .expect("the holder was never told to stop");
        assert!(first.superseded());
        // ...and the newcomer gets the lease (and the cached hash) once it lets go.
        assert!(!second.is_finished());
        drop(first);
        let mut second = second.await.unwrap();
        assert!(!second.superseded());
        assert_eq!(second.held().hashed.as_ref().map(|h| h.offset), Some(3));
    }

    #[tokio::test]
    async fn of_two_waiting_requests_the_newer_wins() {
        let reg = Registry::new();
        let first = reg.take_over("pi-1/a").await;
        let r = reg.clone();
        let second = tokio::spawn(async move { r.take_over("pi-1/a").await });
        // Let the second queue on the lock before the third bumps the generation.
        while *reg.slot("pi-1/a").takeovers.borrow() < 2 {
            tokio::task::yield_now().await;
        }
        let r = reg.clone();
        let third = tokio::spawn(async move { r.take_over("pi-1/a").await });
        while *reg.slot("pi-1/a").takeovers.borrow() < 3 {
            tokio::task::yield_now().await;
        }
        drop(first);
        let second = second.await.unwrap();
        assert!(second.superseded(), "the third came after it");
        drop(second);
        let third = third.await.unwrap();
        assert!(!third.superseded());
    }

    #[tokio::test]
    async fn other_uploads_are_independent() {
        let reg = Registry::new();
        let a = reg.take_over("pi-1/a").await;
        let b = reg.take_over("pi-2/a").await;
        assert!(!a.superseded() && !b.superseded());
        assert!(reg.try_lease("pi-1/a").is_none(), "held");
        assert!(reg.try_lease("pi-1/b").is_some());
        drop(a);
        let c = reg.try_lease("pi-1/a").expect("free again");
        assert!(!c.superseded(), "try_lease stops nobody");
        assert!(!b.superseded());
    }

    #[tokio::test]
    async fn a_gone_upload_is_forgotten_unless_someone_waits() {
        let reg = Registry::new();
        let mut a = reg.take_over("pi-1/a").await;
        a.held().forget();
        drop(a);
        assert!(reg.is_empty());

        // Kept while another request waits for it.
        let mut a = reg.take_over("pi-1/a").await;
        let r = reg.clone();
        let waiting = tokio::spawn(async move { r.take_over("pi-1/a").await });
        a.superseded_wait().await;
        a.held().forget();
        drop(a);
        let mut w = waiting.await.unwrap();
        assert_eq!(reg.len(), 1);
        assert!(w.held().hashed.is_none() && !w.held().gone);
        w.held().forget();
        drop(w);
        assert!(reg.is_empty());

        // Not gone: remembered (with its cached hash).
        drop(reg.take_over("pi-1/b").await);
        assert_eq!(reg.len(), 1);
    }
}
