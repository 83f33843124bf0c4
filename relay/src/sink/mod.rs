//! The stream sink: every accepted event, durable and deduplicated, in `.jsonl` files
//! under the data dir (the default) or in Kafka.
//!
//! * [`dedup`] — the deduplication index (pure logic);
//! * [`stream`] — where events are stored, one interface with one module per backend:
//!   the stream files (paths, appends, fsyncs) and Kafka (the CloudEvents binding, the
//!   producer, reading the topics back into the index);
//! * [`checkpoint`] — persisting the index and rebuilding it at startup;
//! * [`writer`] — the single writer thread that does group commits.

pub mod checkpoint;
pub mod config;
pub mod dedup;
pub mod stream;
pub mod writer;

pub use checkpoint::RecoveryError;
pub use writer::{Outcome, SettledBelow, SinkError, SinkEvent, SinkHandle, start};

/// Why the sink did not store one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStored {
    /// The event can never be stored as it is (a type that makes no topic name, too
    /// large for the broker): the gateway should not send it again.
    Rejected(String),
    /// The stream did not confirm it (a disk error; Kafka down, slow, not authorized, a
    /// topic missing): the gateway should try again.
    Unavailable(String),
}
