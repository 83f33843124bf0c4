//! The Kafka stream: accepted events go to Kafka (or anything that speaks its protocol:
//! Redpanda, MSK, Azure Event Hubs) as records in the CloudEvents binary mode, and the
//! relay answers "durable" only once the broker acknowledged them (`acks=all`, idempotent
//! producer).
//!
//! Deduplication works as with the files: the stream is the log, the checkpoint holds the
//! index and, per topic partition, the *frontier* — the offset below which every record
//! is known to the index. At startup [`KafkaStream::start`] reads each partition of the
//! relay's topics from its frontier (or, for a partition the checkpoint does not know,
//! from a time before the checkpoint, or `recovery_window` ago without one) to its end,
//! adding each record's (gateway, producerid, sequence) to the index.
//!
//! A delivery that failed may still have been stored (the broker wrote it, the answer
//! was lost). The relay answers 503 for it and, before the next write, reads every
//! partition again from its frontier, so a gateway's re-send of that event is answered
//! `duplicate` instead of being written twice.

pub mod binding;
mod client;
pub mod config;
mod stream;

pub use client::{Frontiers, KafkaStream, KafkaStreamError, ScanReport};
pub use stream::Kafka;
