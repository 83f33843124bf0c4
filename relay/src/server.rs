//! The HTTP server: the ingest endpoint, the upload endpoint, `/live`, `/ready` and
//! `/metrics`.
//!
//! The ingest handler is glue: it checks the token, the client's share and the relay's
//! request permit (in that order, see [`crate::request`]), reads the
//! body within its limit, hands the bytes to [`crate::ingest`] (pure parsing and checks),
//! gives the surviving events to the [sink writer](crate::sink::writer) and answers with
//! the per-event results once they are durable. The upload handlers are in
//! [`crate::upload::routes`]; what both share (state, admission, reading bodies, the
//! failure answer) is in [`crate::request`].

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, head, post};
use pigeon_shared::ce::GatewayId;
use pigeon_shared::wire::{self, EventResult, EventStatus, IngestResponse};
use tokio::sync::OwnedSemaphorePermit;

use crate::admission::Ticket;
use crate::admission::config::Limits;
use crate::auth::Principal;
use crate::ingest::{self, CheckedEvent, Rejection, RequestError};
use crate::metrics::GaugeGuard;
use crate::request::{AppState, Failure, admit_client, drain, drain_cap, read_body};
use crate::sink::{Outcome, SettledBelow, SinkEvent};
use crate::tls::Peer;
use crate::upload::routes as upload_routes;

/// Bodies larger than this (as received) are parsed on a blocking thread, so a 16 MiB
/// batch does not stall the other connections on this worker.
const PARSE_INLINE_MAX: usize = 256 * 1024;

/// The relay's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let upload_path = format!("{}/{{id}}", wire::UPLOADS_PATH);
    Router::new()
        .route(wire::INGEST_PATH, post(ingest))
        .route(wire::UPLOADS_PATH, post(upload_routes::create))
        .route(
            &upload_path,
            head(upload_routes::head)
                .patch(upload_routes::patch)
                .delete(upload_routes::delete),
        )
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn live() -> &'static str {
    "live\n"
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    if !st.sink.healthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the stream sink is failing\n",
        )
            .into_response();
    }
    if !st.metrics.object_store_healthy.load(Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the object store (S3) is failing\n",
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn ingest(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let _in_flight = GaugeGuard::new(&st.metrics.requests_in_flight);
    let response = handle_ingest(&st, &peer, &headers, body).await;
    st.metrics.count_request(response.status().as_u16());
    st.metrics.request_seconds.observe(started.elapsed());
    response
}

/// What the headers alone decided about an admitted request.
struct Admitted {
    /// Held until the answer: counts against `max_concurrent_requests`.
    _permit: OwnedSemaphorePermit,
    /// Held until the answer: the client's request slot and the body bytes reserved.
    ticket: Ticket,
    principal: Principal,
    settled: Option<ingest::SettledBelowHeader>,
    encoding: ingest::Encoding,
    mode: ingest::Mode,
}

/// The checks that need only the headers: concurrency, token, Pigeon headers, content
/// type and encoding, declared length.
fn admit(st: &AppState, peer: &Peer, headers: &HeaderMap) -> Result<Admitted, Failure> {
    let principal = st
        .auth
        .authenticate(headers, peer.client.as_deref())
        .map_err(|e| Failure::unauthorized(&e))?;
    let (mut ticket, permit) = admit_client(st, peer, &principal)?;
    let settled = ingest::settled_below(headers)?;
    let encoding = ingest::content_encoding(headers)?;
    let mode = ingest::detect_mode(headers)?;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        if n > st.limits.max_request_bytes {
            return Err(too_large(st.limits.max_request_bytes));
        }
        ticket.reserve(n)?;
    }
    Ok(Admitted {
        _permit: permit,
        ticket,
        principal,
        settled,
        encoding,
        mode,
    })
}

async fn handle_ingest(st: &AppState, peer: &Peer, headers: &HeaderMap, body: Body) -> Response {
    let Admitted {
        _permit,
        mut ticket,
        principal,
        settled,
        encoding,
        mode,
    } = match admit(st, peer, headers) {
        Ok(a) => a,
        Err(f) => {
            drain(headers, body.into_data_stream(), drain_cap(&st.limits)).await;
            return f.into_response();
        }
    };

    let max = st.limits.max_request_bytes;
    let read = read_body(st, body.into_data_stream(), max, &mut ticket).await;
    let raw = match read {
        Ok(b) => b,
        Err(e) => {
            // Nothing is held while the rest of the body is drained.
            drop((ticket, _permit));
            return e.answer(st, headers, || too_large(max)).await;
        }
    };

    let checked =
        match prepare_off_reactor(mode, encoding, headers, raw, &principal, st.limits).await {
            Ok(c) => c,
            Err(answer) => return answer,
        };
    let settled_below = settled_below_for(settled, &principal, &checked);
    let (mut results, events, slots) = sort_checked(checked);
    if !events.is_empty() || settled_below.is_some() {
        match st.sink.write(events, settled_below).await {
            Ok(outcomes) => apply_outcomes(&mut results, slots, outcomes),
            Err(e) => {
                return Failure::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                    .retry_after(st.retry_after.as_secs().max(1))
                    .into_response();
            }
        }
    }

    let response = IngestResponse::from_results(results);
    let m = &st.metrics;
    m.events_accepted.fetch_add(response.accepted, Relaxed);
    m.events_duplicate.fetch_add(response.duplicates, Relaxed);
    m.events_rejected.fetch_add(response.rejected, Relaxed);
    (StatusCode::OK, Json(response)).into_response()
}

fn too_large(limit: u64) -> Failure {
    Failure::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body is larger than {limit} bytes (max_request_bytes); send smaller batches"
        ),
    )
}

/// The checked events of a request: [`prepare`]d on the reactor, or on the blocking pool
/// when the body is large (CPU work). A failure is the answer to give.
async fn prepare_off_reactor(
    mode: ingest::Mode,
    encoding: ingest::Encoding,
    headers: &HeaderMap,
    raw: Bytes,
    principal: &Principal,
    limits: Limits,
) -> Result<Vec<Result<CheckedEvent, Rejection>>, Response> {
    let prepared = if raw.len() <= PARSE_INLINE_MAX {
        prepare(mode, encoding, headers, &raw, principal, &limits)
    } else {
        let headers = headers.clone();
        let principal = principal.clone();
        match tokio::task::spawn_blocking(move || {
            prepare(mode, encoding, &headers, &raw, &principal, &limits)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Parsing a request failed unexpectedly.");
                return Err(Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error while parsing the request",
                )
                .into_response());
            }
        }
    };
    prepared.map_err(|e| Failure::from(e).into_response())
}

/// The settled-below promise of the request, for its gateway: the authenticated one, or
/// without authentication the one gateway all its events name.
fn settled_below_for(
    settled: Option<ingest::SettledBelowHeader>,
    principal: &Principal,
    checked: &[Result<CheckedEvent, Rejection>],
) -> Option<SettledBelow> {
    let s = settled?;
    let gateway = match principal {
        Principal::Gateway(gw) => gw.clone(),
        Principal::Anonymous => single_gateway(checked)?,
    };
    Some(SettledBelow {
        gateway,
        producer: s.producer,
        below: s.below,
    })
}

/// One result per event, in order (accepted until the sink says otherwise, or rejected
/// by the checks); the events for the sink; and for each of those, its result's place.
fn sort_checked(
    checked: Vec<Result<CheckedEvent, Rejection>>,
) -> (Vec<EventResult>, Vec<SinkEvent>, Vec<usize>) {
    let mut results: Vec<EventResult> = Vec::with_capacity(checked.len());
    let mut events: Vec<SinkEvent> = Vec::with_capacity(checked.len());
    let mut slots: Vec<usize> = Vec::with_capacity(checked.len());
    for c in checked {
        match c {
            Ok(ev) => {
                slots.push(results.len());
                results.push(EventResult {
                    id: Some(ev.id),
                    status: EventStatus::Accepted,
                    reason: None,
                });
                events.push(SinkEvent {
                    gateway: ev.gateway,
                    producer: ev.producer,
                    sequence: ev.sequence,
                    line: ev.line,
                });
            }
            Err(Rejection { id, reason }) => {
                tracing::debug!(id = ?id, reason = ?reason, "Rejected an event.");
                results.push(EventResult {
                    id,
                    status: EventStatus::Rejected,
                    reason: Some(reason),
                });
            }
        }
    }
    (results, events, slots)
}

/// Puts the sink's outcome of each event into its result.
fn apply_outcomes(results: &mut [EventResult], slots: Vec<usize>, outcomes: Vec<Outcome>) {
    for (slot, outcome) in slots.into_iter().zip(outcomes) {
        match outcome {
            Outcome::Accepted => {}
            Outcome::Duplicate => results[slot].status = EventStatus::Duplicate,
            Outcome::Rejected(reason) => {
                tracing::debug!(id = ?results[slot].id, reason = ?reason, "The stream refused an event.");
                results[slot].status = EventStatus::Rejected;
                results[slot].reason = Some(reason);
            }
        }
    }
}

/// Decodes, parses and checks a body: one result per event.
fn prepare(
    mode: ingest::Mode,
    encoding: ingest::Encoding,
    headers: &HeaderMap,
    raw: &[u8],
    principal: &Principal,
    limits: &Limits,
) -> Result<Vec<Result<CheckedEvent, Rejection>>, RequestError> {
    let body = ingest::decode_body(encoding, raw, limits.max_decompressed_bytes)?;
    let events = ingest::parse_events(mode, headers, &body, limits.max_events_per_request)?;
    Ok(events
        .into_iter()
        .map(|e| e.and_then(|p| ingest::check_event(&p, principal, limits.max_event_bytes)))
        .collect())
}

/// The one gateway all accepted events of an anonymous request name, if there is one.
fn single_gateway(checked: &[Result<CheckedEvent, Rejection>]) -> Option<GatewayId> {
    let mut gws = checked
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .map(|c| &c.gateway);
    let first = gws.next()?;
    gws.all(|g| g == first).then(|| first.clone())
}
