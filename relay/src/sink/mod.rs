//! The embedded stream sink: durable, deduplicated `.jsonl` files under the data dir.
//!
//! * [`dedup`] — the deduplication index (pure logic);
//! * [`stream`] — the stream files: paths, appends, fsyncs;
//! * [`checkpoint`] — persisting the index and rebuilding it at startup;
//! * [`writer`] — the single writer thread that does group commits.

pub mod checkpoint;
pub mod dedup;
pub mod stream;
pub mod writer;

pub use checkpoint::RecoveryError;
pub use writer::{Outcome, Settle, SinkError, SinkEvent, SinkHandle, start};
