//! [`Fleet`]: every known gateway's [`Record`], found without a shared lock.
//!
//! The configured gateways' entries are made at start in a map that never changes, so
//! the ingest path finds one with a hash lookup and no lock, and then takes only that
//! gateway's own mutex (a few additions under it). Requests of different gateways never
//! wait for each other; requests of one gateway are at most
//! `limits.max_requests_per_gateway` at a time (pigeon-gateway has two in flight).
//!
//! Gateways that are not configured (events without a token, `allow_unauthenticated`)
//! are added to a second map behind a read-write lock as they appear, at most
//! [`MAX_UNCONFIGURED`] of them; beyond that they are counted, not tracked.
//!
//! Each entry has an ordinal (configured gateways in the config's order, then the others
//! as they appeared): the first `fleet.max_gateway_series` have series of their own on
//! `/metrics`, the rest are summed under `gateway="_other"`. A gateway keeps its place
//! for the relay's lifetime, so a series never changes from one to the other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use pigeon_shared::ce::GatewayId;
use serde::{Deserialize, Serialize};

use super::config::FleetSettings;
use super::record::{Record, RequestKind, Tally};
use crate::config::DEFAULT_TENANT;

/// Gateways that are not configured tracked at most (about 1 KB each).
pub const MAX_UNCONFIGURED: usize = 10_000;

/// The `gateway` label of the series that sum the gateways over the cap. A gateway
/// really called `_other` is always folded into it, so the two never mix.
pub const OTHER: &str = "_other";

/// One known gateway.
#[derive(Debug)]
pub struct Entry {
    pub id: GatewayId,
    pub tenant: String,
    /// In `[[gateways]]` (else it sent without a token).
    pub configured: bool,
    /// Has series of its own on `/metrics`.
    pub own_series: bool,
    record: Mutex<Record>,
}

impl Entry {
    /// A copy of the record as it is now.
    pub fn record(&self) -> Record {
        self.lock().clone()
    }

    /// `f` of the record, under its lock (keep `f` short).
    pub fn with_record<T>(&self, f: impl FnOnce(&Record) -> T) -> T {
        f(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        // A panic under the lock leaves a record that is still whole (additions).
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The gateways that are not configured, as they appeared.
#[derive(Debug, Default)]
struct Unconfigured {
    map: HashMap<GatewayId, Arc<Entry>>,
    order: Vec<Arc<Entry>>,
}

/// Every known gateway's record.
#[derive(Debug)]
pub struct Fleet {
    configured: HashMap<GatewayId, Arc<Entry>>,
    /// The configured entries in the config's order.
    configured_order: Vec<Arc<Entry>>,
    unconfigured: RwLock<Unconfigured>,
    /// Whether gateways that are not configured are tracked (`allow_unauthenticated`).
    track_unconfigured: bool,
    max_series: usize,
    /// `fleet.heartbeat_interval`, in ms.
    default_interval_ms: u64,
    /// When this relay process began listening (Unix ms).
    listening_since_ms: i64,
    /// Unconfigured gateways not tracked because [`MAX_UNCONFIGURED`] were.
    untracked: AtomicU64,
}

/// The fleet as saved in `state/fleet.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub gateways: Vec<SavedGateway>,
}

/// One gateway in `state/fleet.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedGateway {
    pub id: GatewayId,
    pub tenant: String,
    pub configured: bool,
    pub record: Record,
}

/// What one request told of the gateways it came from: one with a token, or those its
/// events name without one.
#[derive(Debug, Default)]
pub struct Seen {
    per: Vec<(GatewayId, Tally)>,
}

impl Seen {
    /// The place of `gateway`'s tally, made if new.
    pub fn index(&mut self, gateway: &GatewayId) -> usize {
        match self.per.iter().position(|(g, _)| g == gateway) {
            Some(i) => i,
            None => {
                self.per.push((gateway.clone(), Tally::default()));
                self.per.len() - 1
            }
        }
    }

    /// The tally at `index` (from [`Seen::index`]).
    pub fn at(&mut self, index: usize) -> &mut Tally {
        &mut self.per[index].1
    }

    /// Gives every tally to the fleet, for a request answered with `status`: of `kind`,
    /// or an ingest request's kind by what it carried.
    pub fn note(self, fleet: &Fleet, status: u16, kind: Option<RequestKind>) {
        if self.per.is_empty() {
            return;
        }
        let now = now_ms();
        for (gateway, tally) in self.per {
            let kind = kind.unwrap_or_else(|| tally.kind());
            fleet.note(&gateway, now, kind, status, tally);
        }
    }
}

/// What the views need besides the records.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now_ms: i64,
    /// When this relay process started listening.
    pub listening_since_ms: i64,
    /// `fleet.heartbeat_interval`.
    pub default_interval_ms: u64,
}

/// The time now, Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The version of `state/fleet.json` this relay writes and reads.
pub const SAVED_VERSION: u32 = 1;

impl Fleet {
    /// The fleet of the configured `gateways` (id and tenant, in the config's order),
    /// with what `saved` knew of them (and, with `track_unconfigured`, of others), for a
    /// relay that begins listening at `now_ms`.
    pub fn new(
        gateways: &[(GatewayId, String)],
        track_unconfigured: bool,
        settings: FleetSettings,
        now_ms: i64,
        saved: Option<Saved>,
    ) -> Self {
        let mut restored: HashMap<GatewayId, SavedGateway> = saved
            .map(|s| s.gateways.into_iter().map(|g| (g.id.clone(), g)).collect())
            .unwrap_or_default();
        let mut fleet = Self {
            configured: HashMap::with_capacity(gateways.len()),
            configured_order: Vec::with_capacity(gateways.len()),
            unconfigured: RwLock::new(Unconfigured::default()),
            track_unconfigured,
            max_series: settings.max_gateway_series,
            default_interval_ms: u64::try_from(settings.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
            listening_since_ms: now_ms,
            untracked: AtomicU64::new(0),
        };
        for (id, tenant) in gateways {
            let record = restored
                .remove(id)
                .map_or_else(|| Record::new(now_ms), |g| g.record);
            let entry = fleet.entry(
                id.clone(),
                tenant.clone(),
                true,
                fleet.configured_order.len(),
                record,
            );
            fleet.configured.insert(id.clone(), entry.clone());
            fleet.configured_order.push(entry);
        }
        if track_unconfigured {
            // A gateway taken out of `[[gateways]]` is gone, not unconfigured.
            let mut rest: Vec<SavedGateway> =
                restored.into_values().filter(|g| !g.configured).collect();
            rest.sort_by(|a, b| a.id.cmp(&b.id));
            let mut u = Unconfigured::default();
            for g in rest.into_iter().take(MAX_UNCONFIGURED) {
                let ordinal = fleet.configured_order.len() + u.order.len();
                let entry = fleet.entry(
                    g.id.clone(),
                    DEFAULT_TENANT.to_owned(),
                    false,
                    ordinal,
                    g.record,
                );
                u.map.insert(g.id, entry.clone());
                u.order.push(entry);
            }
            fleet.unconfigured = RwLock::new(u);
        }
        fleet
    }

    fn entry(
        &self,
        id: GatewayId,
        tenant: String,
        configured: bool,
        ordinal: usize,
        record: Record,
    ) -> Arc<Entry> {
        Arc::new(Entry {
            own_series: ordinal < self.max_series && id.as_str() != OTHER,
            id,
            tenant,
            configured,
            record: Mutex::new(record),
        })
    }

    /// What the silence rule needs, at `now_ms`.
    pub fn clock(&self, now_ms: i64) -> Clock {
        Clock {
            now_ms,
            listening_since_ms: self.listening_since_ms,
            default_interval_ms: self.default_interval_ms,
        }
    }

    /// Counts a request of `gateway` answered with `status`.
    pub fn note(
        &self,
        gateway: &GatewayId,
        now_ms: i64,
        kind: RequestKind,
        status: u16,
        tally: Tally,
    ) {
        if let Some(e) = self.find(gateway, now_ms) {
            e.lock().note(now_ms, kind, status, tally);
        }
    }

    /// The gateway's entry; an unconfigured one is added (while there is room).
    fn find(&self, gateway: &GatewayId, now_ms: i64) -> Option<Arc<Entry>> {
        if let Some(e) = self.configured.get(gateway) {
            return Some(e.clone());
        }
        if !self.track_unconfigured {
            return None;
        }
        if let Some(e) = self.read_unconfigured().map.get(gateway) {
            return Some(e.clone());
        }
        let mut u = self.unconfigured.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = u.map.get(gateway) {
            return Some(e.clone());
        }
        if u.order.len() >= MAX_UNCONFIGURED {
            self.untracked.fetch_add(1, Relaxed);
            return None;
        }
        let ordinal = self.configured_order.len() + u.order.len();
        let entry = self.entry(
            gateway.clone(),
            DEFAULT_TENANT.to_owned(),
            false,
            ordinal,
            Record::new(now_ms),
        );
        u.map.insert(gateway.clone(), entry.clone());
        u.order.push(entry.clone());
        Some(entry)
    }

    fn read_unconfigured(&self) -> std::sync::RwLockReadGuard<'_, Unconfigured> {
        self.unconfigured.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Every entry in ordinal order.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        let mut all = self.configured_order.clone();
        all.extend(self.read_unconfigured().order.iter().cloned());
        all
    }

    /// One gateway's entry, if known.
    pub fn get(&self, gateway: &GatewayId) -> Option<Arc<Entry>> {
        self.configured
            .get(gateway)
            .cloned()
            .or_else(|| self.read_unconfigured().map.get(gateway).cloned())
    }

    /// Requests of unconfigured gateways not tracked (over [`MAX_UNCONFIGURED`]).
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Relaxed)
    }

    /// What `state/fleet.json` keeps.
    pub fn saved(&self) -> Saved {
        Saved {
            version: SAVED_VERSION,
            gateways: self
                .entries()
                .into_iter()
                .map(|e| SavedGateway {
                    id: e.id.clone(),
                    tenant: e.tenant.clone(),
                    configured: e.configured,
                    record: e.record(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_772_323_200_000;

    fn id(s: &str) -> GatewayId {
        GatewayId::new(s).unwrap()
    }

    fn configured(n: usize) -> Vec<(GatewayId, String)> {
        (0..n)
            .map(|i| (id(&format!("pi-{i}")), "acme".to_owned()))
            .collect()
    }

    fn cap(max_gateway_series: usize) -> FleetSettings {
        FleetSettings {
            heartbeat_interval: std::time::Duration::from_secs(60),
            max_gateway_series,
        }
    }

    fn events(n: u64) -> Tally {
        Tally {
            events: n,
            bytes: 10 * n,
            others: n,
            ..Tally::default()
        }
    }

    #[test]
    fn configured_gateways_are_known_before_they_send() {
        let f = Fleet::new(&configured(2), false, cap(1000), T0, None);
        let all = f.entries();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].id.as_str(), "pi-1");
        assert_eq!(all[1].tenant, "acme");
        assert_eq!(all[1].record().last_request, None);
        f.note(&id("pi-1"), T0 + 5, RequestKind::Events, 200, events(3));
        assert_eq!(f.get(&id("pi-1")).unwrap().record().total.events, 3);
        // Without allow_unauthenticated nobody else can send; nothing is added.
        f.note(&id("stranger"), T0 + 5, RequestKind::Events, 200, events(3));
        assert!(f.get(&id("stranger")).is_none());
        assert_eq!(f.entries().len(), 2);
    }

    #[test]
    fn the_series_cap_folds_the_gateways_past_it() {
        let f = Fleet::new(&configured(3), true, cap(4), T0, None);
        for g in ["anon-a", "anon-b", "_other"] {
            f.note(&id(g), T0, RequestKind::Events, 200, events(1));
        }
        let own: Vec<(String, bool)> = f
            .entries()
            .iter()
            .map(|e| (e.id.to_string(), e.own_series))
            .collect();
        assert_eq!(
            own,
            [
                ("pi-0".to_owned(), true),
                ("pi-1".to_owned(), true),
                ("pi-2".to_owned(), true),
                ("anon-a".to_owned(), true),
                ("anon-b".to_owned(), false),
                // Never a series of its own: it would be taken for the sum.
                ("_other".to_owned(), false),
            ]
        );
        assert!(f.get(&id("anon-b")).unwrap().tenant == DEFAULT_TENANT);
        // A cap of 0 folds everyone.
        let f = Fleet::new(&configured(2), false, cap(0), T0, None);
        assert!(f.entries().iter().all(|e| !e.own_series));
    }

    #[test]
    fn unconfigured_gateways_are_tracked_up_to_a_limit() {
        let f = Fleet::new(&[], true, cap(10), T0, None);
        for i in 0..MAX_UNCONFIGURED + 5 {
            f.note(
                &id(&format!("g{i}")),
                T0,
                RequestKind::Events,
                200,
                events(1),
            );
        }
        assert_eq!(f.entries().len(), MAX_UNCONFIGURED);
        assert_eq!(f.untracked(), 5);
        // A tracked one is still counted.
        f.note(&id("g0"), T0, RequestKind::Events, 200, events(1));
        assert_eq!(f.get(&id("g0")).unwrap().record().total.events, 2);
    }

    #[test]
    fn a_saved_fleet_comes_back_for_the_gateways_still_there() {
        let f = Fleet::new(&configured(2), true, cap(1000), T0, None);
        f.note(&id("pi-0"), T0 + 1, RequestKind::Events, 200, events(4));
        f.note(&id("anon"), T0 + 2, RequestKind::Events, 200, events(2));
        let saved: Saved =
            serde_json::from_slice(&serde_json::to_vec(&f.saved()).unwrap()).unwrap();
        assert_eq!(saved.gateways.len(), 3);

        // pi-1 left the config and pi-9 came in; pi-0's tenant changed.
        let mut now = configured(1);
        now[0].1 = "globex".to_owned();
        now.push((id("pi-9"), "acme".to_owned()));
        let g = Fleet::new(&now, true, cap(1000), T0 + 10, Some(saved.clone()));
        let ids: Vec<String> = g.entries().iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, ["pi-0", "pi-9", "anon"]);
        let pi0 = g.get(&id("pi-0")).unwrap();
        assert_eq!(
            (pi0.tenant.as_str(), pi0.record().total.events),
            ("globex", 4)
        );
        assert_eq!(g.get(&id("pi-9")).unwrap().record().total_since_ms, T0 + 10);
        // Without allow_unauthenticated the unconfigured ones are not kept.
        let h = Fleet::new(&now, false, cap(1000), T0 + 10, Some(saved));
        assert_eq!(h.entries().len(), 2);
    }
}
