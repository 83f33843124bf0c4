//! The HTTP server: the ingest endpoint, the upload endpoint, the fleet view, `/live`,
//! `/ready` and `/metrics`.
//!
//! The ingest handler is glue: it checks the token, the client's share and the relay's
//! request permit (in that order, see [`crate::request`]), reads the
//! body within its limit, hands the bytes to [`crate::ingest`] (pure parsing and checks),
//! gives the surviving events to the [sink writer](crate::sink::writer) and answers with
//! the per-event results once they are durable, and tells the [fleet view](crate::fleet)
//! what it saw. The upload handlers are in [`crate::upload::routes`], the fleet view's in
//! [`crate::fleet::routes`]; what they share (state, admission, reading bodies, the
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
use crate::fleet::heartbeat::Heartbeat;
use crate::fleet::registry::now_ms;
use crate::fleet::routes as fleet_routes;
use crate::fleet::{Seen, Tally};
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
        .route(fleet_routes::GATEWAYS_PATH, get(fleet_routes::list))
        .route("/v1/gateways/", get(fleet_routes::one))
        .route("/v1/gateways/{*rest}", get(fleet_routes::one))
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
    let mut text = st.metrics.render();
    crate::fleet::view::render_metrics(&st.fleet, &st.fleet.clock(now_ms()), &mut text);
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
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
    let mut seen = Seen::default();
    let response = handle_ingest(&st, &peer, &headers, body, &mut seen).await;
    let status = response.status().as_u16();
    st.metrics.count_request(status);
    st.metrics.request_seconds.observe(started.elapsed());
    seen.note(&st.fleet, status, None);
    response
}

/// What the headers alone decided about an admitted request.
struct Admitted {
    /// Held until the answer: counts against `max_concurrent_requests`.
    _permit: OwnedSemaphorePermit,
    /// Held until the answer: the client's request slot and the body bytes reserved.
    ticket: Ticket,
    principal: Principal,
    /// The token's gateway's tally in the request's [`Seen`].
    own: Option<usize>,
    settled: Option<ingest::SettledBelowHeader>,
    encoding: ingest::Encoding,
    mode: ingest::Mode,
}

/// The checks that need only the headers: concurrency, token, Pigeon headers, content
/// type and encoding, declared length. A gateway that authenticated is in `seen` from
/// then on, whatever the answer.
fn admit(
    st: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    seen: &mut Seen,
) -> Result<Admitted, Failure> {
    let principal = st
        .auth
        .authenticate(headers, peer.client.as_deref())
        .map_err(|e| Failure::unauthorized(&e))?;
    let own = match &principal {
        Principal::Gateway(gw) => Some(seen.index(gw)),
        Principal::Anonymous => None,
    };
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
        own,
        settled,
        encoding,
        mode,
    })
}

/// Answers an ingest request, and fills `seen` with what the fleet view learns from it.
async fn handle_ingest(
    st: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    body: Body,
    seen: &mut Seen,
) -> Response {
    let Admitted {
        _permit,
        mut ticket,
        principal,
        own,
        settled,
        encoding,
        mode,
    } = match admit(st, peer, headers, seen) {
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
    let (mut results, events, slots) = sort_checked(checked, seen, own);
    if !events.is_empty() || settled_below.is_some() {
        match st.sink.write(events, settled_below).await {
            Ok(outcomes) => apply_outcomes(&mut results, slots, outcomes, seen),
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

/// Where an event for the sink goes once the sink has answered: its result's place, and
/// what the fleet view counts of it.
struct Slot {
    result: usize,
    /// Its gateway's tally in the request's [`Seen`].
    tally: usize,
    bytes: u64,
    heartbeat: Option<Box<Heartbeat>>,
}

/// One result per event, in order (accepted until the sink says otherwise, or rejected
/// by the checks); the events for the sink; and for each of those, its [`Slot`]. A
/// rejection is counted for `own`, the gateway of the token, if there is one.
fn sort_checked(
    checked: Vec<Result<CheckedEvent, Rejection>>,
    seen: &mut Seen,
    own: Option<usize>,
) -> (Vec<EventResult>, Vec<SinkEvent>, Vec<Slot>) {
    let mut results: Vec<EventResult> = Vec::with_capacity(checked.len());
    let mut events: Vec<SinkEvent> = Vec::with_capacity(checked.len());
    let mut slots: Vec<Slot> = Vec::with_capacity(checked.len());
    for c in checked {
        match c {
            Ok(ev) => {
                slots.push(Slot {
                    result: results.len(),
                    tally: seen.index(&ev.gateway),
                    bytes: ev.line.len() as u64,
                    heartbeat: ev.heartbeat,
                });
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
                if let Some(t) = own {
                    let t = seen.at(t);
                    t.rejected += 1;
                    t.others += 1;
                }
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

/// Puts the sink's outcome of each event into its result, and counts it in `seen`.
fn apply_outcomes(
    results: &mut [EventResult],
    slots: Vec<Slot>,
    outcomes: Vec<Outcome>,
    seen: &mut Seen,
) {
    for (slot, outcome) in slots.into_iter().zip(outcomes) {
        let (i, t) = (slot.result, seen.at(slot.tally));
        match outcome {
            Outcome::Accepted => {
                t.events += 1;
                t.bytes += slot.bytes;
                count_kind(t, slot.heartbeat);
            }
            Outcome::Duplicate => {
                results[i].status = EventStatus::Duplicate;
                t.duplicates += 1;
                // A heartbeat sent again still has its figures (the newest one wins).
                count_kind(t, slot.heartbeat);
            }
            Outcome::Rejected(reason) => {
                tracing::debug!(id = ?results[i].id, reason = ?reason, "The stream refused an event.");
                results[i].status = EventStatus::Rejected;
                results[i].reason = Some(reason);
                t.rejected += 1;
                t.others += 1;
            }
        }
    }
}

/// A heartbeat for the fleet view, or one more event that is not one.
fn count_kind(t: &mut Tally, heartbeat: Option<Box<Heartbeat>>) {
    match heartbeat {
        Some(hb) => t.heartbeat(*hb),
        None => t.others += 1,
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
