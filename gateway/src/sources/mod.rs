//! Inputs that produce outbox records. Each source commits a record before it
//! acknowledges the data to its producer.
//!
//! * [`mqtt`] — readings from an MQTT broker;
//! * [`files`] — camera drop directories;
//! * [`health`] — heartbeat events about the Pi and the gateway itself.

pub mod files;
pub mod health;
pub mod mqtt;
