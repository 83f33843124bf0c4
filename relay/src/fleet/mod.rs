//! The fleet view: what the relay knows of each gateway — its tenant, its last request,
//! its last heartbeat and that heartbeat's figures, what it sent today and in total —
//! and whether it has gone silent; served as JSON to operators and as per-gateway
//! series on `/metrics`.
//!
//! * [`config`] — `[fleet]` and `[[operators]]`;
//! * [`heartbeat`] — pigeon-gateway's heartbeat events, read into [`heartbeat::Figures`];
//! * [`record`] — one gateway's record and its rules (counts per UTC day, the newest
//!   heartbeat, the heartbeat interval, silence), pure functions of the time given;
//! * [`registry`] — [`Fleet`]: every record, updated on the ingest path without a
//!   shared lock;
//! * [`view`] — the JSON and the `/metrics` series, drawn from the records;
//! * [`operators`] — the operators' bearer tokens;
//! * [`routes`] — `GET /v1/gateways` and `GET /v1/gateways/<id>`;
//! * [`store`] — `state/fleet.json`, so the view survives a restart.
//!
//! `docs/fleet.md` describes it for operators.

pub mod config;
pub mod heartbeat;
pub mod operators;
pub mod record;
pub mod registry;
pub mod routes;
pub mod store;
pub mod view;

pub use operators::Operators;
pub use record::{RequestKind, Tally};
pub use registry::{Fleet, Seen};
