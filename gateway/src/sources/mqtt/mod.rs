//! MQTT source: subscribes with a persistent session and acknowledges each PUBLISH only
//! after its record is committed to the outbox.

mod config;
pub(crate) mod conn;
mod source;

pub(crate) use config::MqttConfig;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use source::record_from_publish;
pub(crate) use source::{MqttSource, UNMATCHED_TYPE};
