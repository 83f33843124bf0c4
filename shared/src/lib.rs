//! What `pigeon-gateway` and `pigeon-relay` agree on, and nothing else.
//!
//! * [`ce`] — the CloudEvents conventions Pigeon uses: how `source` names a gateway and
//!   its input, the `sequence` and `producerid` extensions that make re-sends detectable,
//!   and the content types of the HTTP binding.
//! * [`wire`] — the gateway↔relay protocol: the ingest path, headers, and the per-event
//!   result document the relay answers with (see `docs/protocol.md`).
//! * [`units`] — small config value types (`"30s"`, `"64MiB"`) both binaries parse the same way.
//! * [`json`] — an event's `data` carried as the sender's JSON text (numbers and
//!   duplicate keys unchanged), and splicing it into an event's JSON.
//! * [`dirs`] — the check of a configured data directory both binaries make before starting.
//! * [`escape`] — control characters escaped, for names from outside in logs and `status`,
//!   and the log field format both binaries use.
//! * [`shutdown`] — the one stop signal a binary's tasks share.
//! * [`sys`] — every libc call of the workspace behind a safe function (the one module
//!   allowed `unsafe`).
//! * [`x509`] — a certificate's common name and expiry, for client-certificate identities
//!   and expiry warnings.
//!
//! This crate has no binary-only dependencies (no clap, rusqlite, HTTP stacks or cloud SDKs;
//! tokio only for its sync primitives and timer).

pub mod ce;
pub mod dirs;
pub mod escape;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod json;
pub mod shutdown;
pub mod sys;
pub mod units;
pub mod wire;
pub mod x509;

pub use cloudevents;
