//! The gateway↔relay protocol (documented for humans in `docs/protocol.md`).
//!
//! A gateway `POST`s events to [`INGEST_PATH`] in any CloudEvents HTTP binding mode
//! (batch, structured or binary), authenticated with `Authorization: Bearer <token>`.
//! Bodies may be `Content-Encoding: gzip`. The relay answers with an [`IngestResponse`]
//! once every accepted event is durable in its sinks:
//!
//! | HTTP status | meaning | what the gateway does |
//! |---|---|---|
//! | 200 | every event has a result in `results` | delete accepted and duplicate events, dead-letter rejected ones |
//! | 400 | the body is not a CloudEvent or batch at all | retry events one by one to isolate the bad one |
//! | 401 / 403 | missing or wrong token | keep everything, retry with backoff, log an error |
//! | 413 | the request is too large | split the batch |
//! | 415 | unsupported content type or encoding | keep everything, retry with backoff |
//! | 429 / 5xx | overloaded or a sink is down (`Retry-After` says when to retry) | keep everything, retry with backoff |

use serde::{Deserialize, Serialize};

/// The one ingest endpoint, for all three binding modes.
pub const INGEST_PATH: &str = "/v1/events";

/// Request header: the gateway will never send any sequence below this value again
/// under the given producer id (everything below it was delivered or dead-lettered).
/// It lets the relay forget old deduplication state.
pub const HEADER_SETTLED_BELOW: &str = "pigeon-settled-below";
/// Request header: the producer id the `pigeon-settled-below` value refers to.
pub const HEADER_PRODUCER_ID: &str = "pigeon-producer-id";

/// What happened to one event of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Written durably to every sink by this request.
    Accepted,
    /// Already written earlier (a re-send); not written again. Durable all the same.
    Duplicate,
    /// Refused for good (see `reason`); re-sending it unchanged will be refused again.
    Rejected,
}

impl EventStatus {
    /// Whether the event is durable at the relay, so the gateway may forget it.
    pub fn is_durable(self) -> bool {
        matches!(self, Self::Accepted | Self::Duplicate)
    }
}

/// The result for one event, in the order the events were sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventResult {
    /// The event's `id`, or `null` when the event was too broken to have one.
    pub id: Option<String>,
    pub status: EventStatus,
    /// Why the event was rejected; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The body of a 200 answer to an ingest request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestResponse {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// One result per event sent, in the same order.
    pub results: Vec<EventResult>,
}

impl IngestResponse {
    /// Builds the response from per-event results, counting them.
    pub fn from_results(results: Vec<EventResult>) -> Self {
        let mut r = Self {
            results,
            ..Self::default()
        };
        for res in &r.results {
            match res.status {
                EventStatus::Accepted => r.accepted += 1,
                EventStatus::Duplicate => r.duplicates += 1,
                EventStatus::Rejected => r.rejected += 1,
            }
        }
        r
    }
}

/// The body of every non-200 answer: one sentence saying what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_counts_and_json_shape() {
        let r = IngestResponse::from_results(vec![
            EventResult {
                id: Some("a".into()),
                status: EventStatus::Accepted,
                reason: None,
            },
            EventResult {
                id: Some("b".into()),
                status: EventStatus::Duplicate,
                reason: None,
            },
            EventResult {
                id: None,
                status: EventStatus::Rejected,
                reason: Some("missing attribute 'id'".into()),
            },
        ]);
        assert_eq!((r.accepted, r.duplicates, r.rejected), (1, 1, 1));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["results"][0],
            serde_json::json!({"id": "a", "status": "accepted"})
        );
        assert_eq!(json["results"][2]["status"], "rejected");
        let back: IngestResponse = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn durable_statuses() {
        assert!(EventStatus::Accepted.is_durable());
        assert!(EventStatus::Duplicate.is_durable());
        assert!(!EventStatus::Rejected.is_durable());
    }
}
