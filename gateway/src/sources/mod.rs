//! Inputs that produce outbox records. Each source commits a record before it
//! acknowledges the data to its producer.

pub mod mqtt;
