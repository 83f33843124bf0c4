//! The fleet view's cost: what the ingest path pays per request to count it
//! (`Fleet::note`), alone and from several threads at once, and what a scrape of
//! `/metrics` and a `GET /v1/gateways` cost with many gateways.
//!
//! ```text
//! cargo bench -p pigeon-relay --bench fleet
//! ```
//!
//! `note` is timed on 1 and on N threads (N = the machine's cores), each thread counting
//! requests of its own gateway (the common case: gateways do not share a lock) and all
//! threads counting requests of one gateway (the worst case: they share its mutex).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pigeon_relay::fleet::config::FleetSettings;
use pigeon_relay::fleet::heartbeat::{Figures, Heartbeat};
use pigeon_relay::fleet::registry::now_ms;
use pigeon_relay::fleet::view::{gateway_view, render_metrics};
use pigeon_relay::fleet::{Fleet, RequestKind, Tally};
use pigeon_shared::ce::GatewayId;

const NOTES: u64 = 2_000_000;

fn fleet(gateways: usize) -> Arc<Fleet> {
    let gws: Vec<_> = (0..gateways)
        .map(|i| {
            (
                GatewayId::new(&format!("gw-{i}")).unwrap(),
                format!("t{}", i % 10),
            )
        })
        .collect();
    let settings = FleetSettings {
        heartbeat_interval: Duration::from_secs(60),
        max_gateway_series: 1000,
    };
    Arc::new(Fleet::new(&gws, false, settings, now_ms(), None))
}

/// A request of 10 readings, as the ingest benchmark sends.
fn tally() -> Tally {
    Tally {
        events: 10,
        bytes: 3_500,
        others: 10,
        ..Tally::default()
    }
}

/// ns per `note`, `threads` threads each noting `NOTES / threads` requests, thread `t`
/// for gateway `gateway_of(t)`.
fn time_notes(f: &Arc<Fleet>, threads: usize, gateway_of: fn(usize) -> usize) -> f64 {
    let per = NOTES / threads as u64;
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let gw = GatewayId::new(&format!("gw-{}", gateway_of(t))).unwrap();
                for _ in 0..per {
                    // The handler's own steps: the clock, then the note.
                    f.note(&gw, now_ms(), RequestKind::Events, 200, tally());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed().as_nanos() as f64 / (per * threads as u64) as f64 * threads as f64
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("pigeon-relay fleet benchmark ({cores} cores)");
    for round in 1..=3 {
        let f = fleet(64);
        let one = time_notes(&f, 1, |_| 0);
        let own = time_notes(&f, cores, |t| t);
        let shared = time_notes(&f, cores, |_| 0);
        println!(
            "  round {round}: note, ns per request per thread: 1 thread {one:.0}; \
             {cores} threads, own gateways {own:.0}; {cores} threads, one gateway {shared:.0}"
        );
    }
    for gateways in [1_000, 10_000] {
        let f = fleet(gateways);
        let mut hb = tally();
        hb.heartbeat(Heartbeat {
            time_ms: Some(now_ms()),
            figures: Figures {
                version: Some("0.1.0".into()),
                outbox_depth: Some(12),
                ..Figures::default()
            },
        });
        for i in 0..gateways {
            let gw = GatewayId::new(&format!("gw-{i}")).unwrap();
            f.note(&gw, now_ms(), RequestKind::Events, 200, hb.clone());
        }
        let clock = f.clock(now_ms());
        let start = Instant::now();
        let mut out = String::new();
        render_metrics(&f, &clock, &mut out);
        let metrics = start.elapsed();
        let start = Instant::now();
        let views: Vec<_> = f
            .entries()
            .iter()
            .map(|e| e.with_record(|r| gateway_view(e, r, &clock)))
            .collect();
        let json = serde_json::to_vec(&views).unwrap();
        let list = start.elapsed();
        println!(
            "  {gateways} gateways: /metrics section {:.1} ms ({} KB); GET /v1/gateways {:.1} ms ({} KB)",
            metrics.as_secs_f64() * 1e3,
            out.len() / 1024,
            list.as_secs_f64() * 1e3,
            json.len() / 1024
        );
    }
}
