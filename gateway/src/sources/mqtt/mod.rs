//! MQTT source: subscribes with a persistent session and acknowledges each PUBLISH only
//! after its record is committed to the outbox.

mod config;
pub(crate) mod conn;
mod source;

pub use config::{MqttConfig, Subscription};
pub use source::{MqttSource, record_from_publish};
