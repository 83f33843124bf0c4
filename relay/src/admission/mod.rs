//! Fair admission: how many requests, and how many bytes of request bodies, each client
//! may hold in the relay at once.
//!
//! The global limits (`limits.max_concurrent_requests`, `limits.max_concurrent_uploads`)
//! protect the relay; the shares here protect the gateways from each other. A gateway that
//! opens hundreds of requests and sends their bodies one byte at a time gets
//! `limits.max_requests_per_gateway` of them and `429 Too Many Requests` for the rest, so
//! the global permits stay free for everyone else. Bodies are held in memory until their
//! events are durable: a client may hold `limits.max_buffered_bytes_per_gateway` of them,
//! and all clients together `limits.max_buffered_bytes`.
//!
//! A client is its gateway identity (token or client certificate); without one
//! (`allow_unauthenticated`) it is its IP address. Shares are taken at once or refused at
//! once, never waited for: a waiting request would hold a connection and its memory.
//!
//! Pure bookkeeping under one mutex, without I/O, so it is tested with plain `#[test]`s.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};

use pigeon_shared::ce::GatewayId;

use crate::metrics::Metrics;

pub mod config;

/// Who a share belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    Gateway(GatewayId),
    /// An unauthenticated request (`allow_unauthenticated`), by its peer's address.
    Address(IpAddr),
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Gateway(g) => write!(f, "gateway {g}"),
            Client::Address(a) => write!(f, "unauthenticated client {a}"),
        }
    }
}

/// The shares, from `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    /// Requests of one client in progress at once, of every kind.
    pub requests_per_client: usize,
    /// Body bytes one client's requests may hold at once.
    pub bytes_per_client: u64,
    /// Body bytes all requests together may hold at once.
    pub bytes_total: u64,
}

/// Which limit refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "{client} has {limit} requests in progress already (limits.max_requests_per_gateway); wait for their answers before sending more"
    )]
    ClientRequests { client: Client, limit: usize },
    #[error(
        "{client} has {held} bytes of request bodies in the relay already and this one needs {wanted} more, over its share of {limit} (limits.max_buffered_bytes_per_gateway); wait for the answers of its other requests"
    )]
    ClientBytes {
        client: Client,
        held: u64,
        wanted: u64,
        limit: u64,
    },
    #[error(
        "the relay holds its maximum of {limit} bytes of request bodies (limits.max_buffered_bytes); retry later"
    )]
    TotalBytes { limit: u64 },
}

impl Refused {
    /// The label of `pigeon_relay_admission_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::ClientRequests { .. } => "requests_per_gateway",
            Refused::ClientBytes { .. } => "buffered_bytes_per_gateway",
            Refused::TotalBytes { .. } => "buffered_bytes",
        }
    }

    /// Whether the client itself is over its share (429), rather than the relay full (503).
    pub fn is_clients_own(&self) -> bool {
        !matches!(self, Refused::TotalBytes { .. })
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    requests: usize,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Books {
    clients: HashMap<Client, Usage>,
    bytes: u64,
}

/// The bookkeeping of every client's share.
#[derive(Debug)]
pub struct Admission {
    shares: Shares,
    books: Mutex<Books>,
    metrics: Arc<Metrics>,
}

impl Admission {
    pub fn new(shares: Shares, metrics: Arc<Metrics>) -> Self {
        Self {
            shares,
            books: Mutex::new(Books::default()),
            metrics,
        }
    }

    pub fn shares(&self) -> Shares {
        self.shares
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        // Nothing panics while holding it; a poisoned lock still holds consistent books.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refused(&self, r: Refused) -> Refused {
        self.metrics.count_admission_refused(r.label());
        r
    }

    /// One request slot of `client`, held until the [`Ticket`] is dropped.
    pub fn enter(self: &Arc<Self>, client: Client) -> Result<Ticket, Refused> {
        let mut books = self.books();
        let usage = books.clients.entry(client.clone()).or_default();
        if usage.requests >= self.shares.requests_per_client {
            let limit = self.shares.requests_per_client;
            drop(books);
            return Err(self.refused(Refused::ClientRequests { client, limit }));
        }
        usage.requests += 1;
        Ok(Ticket {
            admission: self.clone(),
            client,
            bytes: 0,
        })
    }

    /// Body bytes held by all clients now.
    pub fn buffered_bytes(&self) -> u64 {
        self.books().bytes
    }

    /// `(requests, bytes)` that `client` holds now.
    #[cfg(test)]
    fn usage(&self, client: &Client) -> Option<(usize, u64)> {
        self.books()
            .clients
            .get(client)
            .map(|u| (u.requests, u.bytes))
    }
}

/// A client's admitted request: its slot, and the body bytes it reserved. Dropping it
/// gives both back.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    client: Client,
    bytes: u64,
}

impl Ticket {
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Makes sure this request holds at least `total` body bytes: reserves the difference
    /// from the client's share and the relay's, or refuses and reserves nothing.
    pub fn reserve(&mut self, total: u64) -> Result<(), Refused> {
        let Some(more) = total.checked_sub(self.bytes).filter(|&m| m > 0) else {
            return Ok(());
        };
        let shares = self.admission.shares;
        let mut books = self.admission.books();
        if books.bytes.saturating_add(more) > shares.bytes_total {
            drop(books);
            return Err(self.admission.refused(Refused::TotalBytes {
                limit: shares.bytes_total,
            }));
        }
        let Some(usage) = books.clients.get_mut(&self.client) else {
            // The ticket's own slot keeps the entry; this cannot happen.
            return Ok(());
        };
        if usage.bytes.saturating_add(more) > shares.bytes_per_client {
            let held = usage.bytes;
            drop(books);
            return Err(self.admission.refused(Refused::ClientBytes {
                client: self.client.clone(),
                held,
                wanted: more,
                limit: shares.bytes_per_client,
            }));
        }
        usage.bytes += more;
        books.bytes += more;
        self.bytes = total;
        self.admission
            .metrics
            .buffered_body_bytes
            .store(books.bytes, Relaxed);
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut books = self.admission.books();
        books.bytes = books.bytes.saturating_sub(self.bytes);
        let total = books.bytes;
        if let Entry::Occupied(mut e) = books.clients.entry(self.client.clone()) {
            let u = e.get_mut();
            u.requests = u.requests.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(self.bytes);
            if u.requests == 0 {
                e.remove();
            }
        }
        self.admission
            .metrics
            .buffered_body_bytes
            .store(total, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(requests: usize, per_client: u64, total: u64) -> Arc<Admission> {
        Arc::new(Admission::new(
            Shares {
                requests_per_client: requests,
                bytes_per_client: per_client,
                bytes_total: total,
            },
            Arc::new(Metrics::new()),
        ))
    }

    fn gw(name: &str) -> Client {
        Client::Gateway(GatewayId::new(name).unwrap())
    }

    #[test]
    fn a_client_gets_its_share_of_requests_and_others_keep_theirs() {
        let a = admission(2, 100, 1000);
        let t1 = a.enter(gw("pi-a")).unwrap();
        let _t2 = a.enter(gw("pi-a")).unwrap();
        let e = a.enter(gw("pi-a")).unwrap_err();
        assert!(matches!(e, Refused::ClientRequests { limit: 2, .. }), "{e}");
        assert!(e.is_clients_own());
        assert!(e.to_string().contains("gateway pi-a has 2 requests"), "{e}");
        assert!(
            e.to_string().contains("limits.max_requests_per_gateway"),
            "{e}"
        );
        // Another gateway is not affected.
        let _b = a.enter(gw("pi-b")).unwrap();
        // A slot given back can be taken again.
        drop(t1);
        let _t3 = a.enter(gw("pi-a")).unwrap();
        assert_eq!(a.metrics.admission_refused("requests_per_gateway"), 1);
    }

    #[test]
    fn body_bytes_are_shared_per_client_and_in_total() {
        let a = admission(10, 100, 150);
        let mut t1 = a.enter(gw("pi-a")).unwrap();
        t1.reserve(60).unwrap();
        t1.reserve(40).unwrap(); // holds 60 already: nothing more
        let mut t2 = a.enter(gw("pi-a")).unwrap();
        let e = t2.reserve(41).unwrap_err();
        assert_eq!(
            e,
            Refused::ClientBytes {
                client: gw("pi-a"),
                held: 60,
                wanted: 41,
                limit: 100
            }
        );
        t2.reserve(40).unwrap();
        assert_eq!(a.usage(&gw("pi-a")), Some((2, 100)));
        // pi-b is refused by the total, not by its own share.
        let mut b = a.enter(gw("pi-b")).unwrap();
        b.reserve(50).unwrap();
        let e = b.reserve(51).unwrap_err();
        assert_eq!(e, Refused::TotalBytes { limit: 150 });
        assert!(!e.is_clients_own());
        assert_eq!(a.buffered_bytes(), 150);
        assert_eq!(a.metrics.buffered_body_bytes.load(Relaxed), 150);
        // A refused reservation reserved nothing; dropping gives everything back.
        drop(t1);
        assert_eq!(a.usage(&gw("pi-a")), Some((1, 40)));
        assert_eq!(a.buffered_bytes(), 90);
        drop(t2);
        drop(b);
        assert_eq!(a.usage(&gw("pi-a")), None);
        assert_eq!(a.buffered_bytes(), 0);
        assert_eq!(a.metrics.buffered_body_bytes.load(Relaxed), 0);
        assert_eq!(a.metrics.admission_refused("buffered_bytes_per_gateway"), 1);
        assert_eq!(a.metrics.admission_refused("buffered_bytes"), 1);
    }

    #[test]
    fn unauthenticated_clients_are_told_apart_by_address() {
        let a = admission(1, 10, 100);
        let one = Client::Address("127.0.0.1".parse().unwrap());
        let two = Client::Address("127.0.0.2".parse().unwrap());
        let _t = a.enter(one.clone()).unwrap();
        let e = a.enter(one).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("unauthenticated client 127.0.0.1 has 1 requests"),
            "{e}"
        );
        let _u = a.enter(two).unwrap();
    }

    #[test]
    fn books_forget_clients_that_hold_nothing() {
        let a = admission(4, 10, 100);
        for i in 0..1000 {
            let client =
                Client::Address(std::net::IpAddr::from([127, 1, (i / 256) as u8, i as u8]));
            let mut t = a.enter(client).unwrap();
            t.reserve(5).unwrap();
        }
        assert!(a.books().clients.is_empty());
        assert_eq!(a.buffered_bytes(), 0);
    }
}
