//! Inputs that produce outbox records. Each source commits a record before it
//! acknowledges the data to its producer.
//!
//! * [`mqtt`] — readings from an MQTT broker;
//! * [`files`] — camera drop directories;
//! * [`health`] — heartbeat events about the Pi and the gateway itself.
//!
//! [`event_size`] tells how long a record's event will be at the relay, so a source can
//! refuse what the relay never takes before acknowledging it.

pub(crate) mod event_size;
pub(crate) mod files;
pub(crate) mod health;
pub(crate) mod mqtt;
