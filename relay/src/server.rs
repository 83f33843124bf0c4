//! The HTTP server: the ingest endpoint, the upload endpoint, `/live`, `/ready` and
//! `/metrics`.
//!
//! The ingest handler is glue: it checks the concurrency limit and the token, reads the
//! body within its limit, hands the bytes to [`crate::ingest`] (pure parsing and checks),
//! gives the surviving events to the [sink writer](crate::sink::writer) and answers with
//! the per-event results once they are durable. The upload handlers are in
//! [`crate::upload::routes`].

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, RETRY_AFTER, WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, head, post};
use futures_util::StreamExt;
use pigeon_shared::ce::GatewayId;
use pigeon_shared::wire::{self, ErrorBody, EventResult, EventStatus, IngestResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admission::{Admission, Client, Refused, Ticket};
use crate::auth::{AuthError, Authenticator, Principal};
use crate::config::Limits;
use crate::ingest::{self, CheckedEvent, Rejection, RequestError};
use crate::metrics::{GaugeGuard, Metrics};
use crate::sink::{Outcome, Settle, SinkEvent, SinkHandle};
use crate::tls::Peer;
use crate::upload::{Uploads, routes as upload_routes};

/// Bodies larger than this (as received) are parsed on a blocking thread, so a 16 MiB
/// batch does not stall the other connections on this worker.
const PARSE_INLINE_MAX: usize = 256 * 1024;

/// How long the relay keeps reading (and discarding) the body of a request it refuses,
/// so that the client, still sending, gets to read the answer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Retry-After when a concurrency limit is reached.
pub(crate) const OVERLOAD_RETRY_AFTER_SECS: u64 = 1;

/// What every handler shares.
pub struct AppState {
    pub auth: Authenticator,
    pub sink: SinkHandle,
    pub limits: Limits,
    pub retry_after: Duration,
    pub metrics: Arc<Metrics>,
    /// `limits.max_concurrent_requests`: ingest requests, and upload requests other than
    /// `PATCH`.
    pub permits: Arc<Semaphore>,
    /// Each gateway's share of the requests and of the body bytes held.
    pub admission: Arc<Admission>,
    pub uploads: Arc<Uploads>,
    /// `limits.max_concurrent_uploads`: upload `PATCH`es.
    pub upload_permits: Arc<Semaphore>,
}

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

/// A whole-request failure, answered with an [`ErrorBody`].
pub(crate) struct Failure {
    status: StatusCode,
    message: String,
    headers: Vec<(axum::http::HeaderName, HeaderValue)>,
}

impl Failure {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub(crate) fn retry_after(self, secs: u64) -> Self {
        self.header(RETRY_AFTER, HeaderValue::from(secs))
    }

    pub(crate) fn header(mut self, name: axum::http::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 401 with the `WWW-Authenticate` challenge for `e`, or 403 for a client
    /// certificate that is no gateway's.
    pub(crate) fn unauthorized(e: &AuthError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
        let f = Failure::new(status, e.to_string());
        match e.challenge() {
            Some(c) => f.header(WWW_AUTHENTICATE, HeaderValue::from_static(c)),
            None => f,
        }
    }

    /// 503 with `Retry-After: 1`: a concurrency limit is reached.
    pub(crate) fn overloaded(what: String) -> Self {
        Failure::new(StatusCode::SERVICE_UNAVAILABLE, what).retry_after(OVERLOAD_RETRY_AFTER_SECS)
    }
}

impl From<Refused> for Failure {
    /// 429 when the client is over its own share, 503 when the relay is full; both with
    /// `Retry-After: 1`.
    fn from(r: Refused) -> Self {
        let status = if r.is_clients_own() {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Failure::new(status, r.to_string()).retry_after(OVERLOAD_RETRY_AFTER_SECS)
    }
}

impl From<RequestError> for Failure {
    fn from(e: RequestError) -> Self {
        Failure::new(e.status(), e.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        tracing::debug!(status = self.status.as_u16(), error = ?self.message, "Refused a request.");
        let mut r = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        for (k, v) in self.headers {
            r.headers_mut().insert(k, v);
        }
        r
    }
}

/// One of `limits.max_concurrent_requests`, or a 503 at once.
pub(crate) fn request_permit(st: &AppState) -> Result<OwnedSemaphorePermit, Failure> {
    st.permits.clone().try_acquire_owned().map_err(|_| {
        st.metrics.count_admission_refused("requests");
        Failure::overloaded(format!(
            "the relay is handling its maximum of {} concurrent requests (limits.max_concurrent_requests); retry later",
            st.limits.max_concurrent_requests
        ))
    })
}

/// The authenticated client's request slot (its share, see [`crate::admission`]), then
/// one of the relay's `limits.max_concurrent_requests`. The client's share is taken
/// first, so a client over it never holds one of the relay's permits.
pub(crate) fn admit_client(
    st: &AppState,
    peer: &Peer,
    principal: &Principal,
) -> Result<(Ticket, OwnedSemaphorePermit), Failure> {
    let ticket = client_ticket(st, peer, principal)?;
    Ok((ticket, request_permit(st)?))
}

/// The authenticated client's request slot alone (an upload `PATCH` takes one of
/// `limits.max_concurrent_uploads` instead of a request permit).
pub(crate) fn client_ticket(
    st: &AppState,
    peer: &Peer,
    principal: &Principal,
) -> Result<Ticket, Failure> {
    let client = match principal {
        Principal::Gateway(g) => Client::Gateway(g.clone()),
        Principal::Anonymous => Client::Address(peer.addr.ip()),
    };
    Ok(st.admission.enter(client)?)
}

/// What the headers alone decided about an admitted request.
struct Admitted {
    /// Held until the answer: counts against `max_concurrent_requests`.
    _permit: OwnedSemaphorePermit,
    /// Held until the answer: the client's request slot and the body bytes reserved.
    ticket: Ticket,
    principal: Principal,
    settled: Option<ingest::SettledBelow>,
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

    // Decode, parse and check: CPU work, off the reactor when large.
    let limits = st.limits;
    let prepared = if raw.len() <= PARSE_INLINE_MAX {
        prepare(mode, encoding, headers, &raw, &principal, &limits)
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
                return Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error while parsing the request",
                )
                .into_response();
            }
        }
    };
    let checked = match prepared {
        Ok(c) => c,
        Err(e) => return Failure::from(e).into_response(),
    };

    let settle = settled.and_then(|s| {
        let gateway = match &principal {
            Principal::Gateway(gw) => gw.clone(),
            Principal::Anonymous => single_gateway(&checked)?,
        };
        Some(Settle {
            gateway,
            producer: s.producer,
            below: s.below,
        })
    });

    // Hand the good events to the sink, remembering where each result goes.
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
    if !events.is_empty() || settle.is_some() {
        match st.sink.write(events, settle).await {
            Ok(outcomes) => {
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

/// Why a request body could not be read whole.
pub(crate) enum ReadError {
    /// Over the limit; the rest of the body is still to be drained.
    TooLarge(BodyDataStream),
    /// Over the client's share of memory (or the relay's); the rest is to be drained.
    Refused(Refused, BodyDataStream),
    /// No byte for `limits.body_idle_timeout` ("idle"), or not whole after
    /// `limits.body_timeout` ("total").
    TimedOut(&'static str),
    Failed(String),
}

impl ReadError {
    /// The answer, after draining what is left of the body where that helps the client
    /// read it. `too_large` is the request kind's 413.
    pub(crate) async fn answer(
        self,
        st: &AppState,
        headers: &HeaderMap,
        too_large: impl FnOnce() -> Failure,
    ) -> Response {
        let cap = drain_cap(&st.limits);
        match self {
            ReadError::TooLarge(rest) => {
                drain(headers, rest, cap).await;
                too_large().into_response()
            }
            ReadError::Refused(r, rest) => {
                drain(headers, rest, cap).await;
                Failure::from(r).into_response()
            }
            ReadError::TimedOut(deadline) => {
                st.metrics.count_body_timeout(deadline);
                let message = if deadline == "idle" {
                    format!(
                        "no byte of the request body arrived for {} s (limits.body_idle_timeout)",
                        st.limits.body_idle_timeout.as_secs()
                    )
                } else {
                    format!(
                        "the request body did not arrive whole within {} s (limits.body_timeout)",
                        st.limits.body_timeout.as_secs()
                    )
                };
                // The connection is stuck mid-body: it cannot carry another request.
                Failure::new(StatusCode::REQUEST_TIMEOUT, message)
                    .header(CONNECTION, HeaderValue::from_static("close"))
                    .into_response()
            }
            ReadError::Failed(e) => Failure::new(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {e}"),
            )
            .into_response(),
        }
    }
}

/// Reads the body, stopping once it exceeds `limit` bytes, when no byte came for
/// `limits.body_idle_timeout`, or when it is not whole after `limits.body_timeout`.
/// Every byte held is first reserved in `ticket` (the client's share of memory).
pub(crate) async fn read_body(
    st: &AppState,
    mut stream: BodyDataStream,
    limit: u64,
    ticket: &mut Ticket,
) -> Result<Bytes, ReadError> {
    let started = tokio::time::Instant::now();
    let whole_by = started + st.limits.body_timeout;
    let mut first: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    loop {
        let idle_by = tokio::time::Instant::now() + st.limits.body_idle_timeout;
        let (by, deadline) = if idle_by < whole_by {
            (idle_by, "idle")
        } else {
            (whole_by, "total")
        };
        let Ok(next) = tokio::time::timeout_at(by, stream.next()).await else {
            return Err(ReadError::TimedOut(deadline));
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ReadError::Failed(e.to_string()))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(ReadError::TooLarge(stream));
        }
        if let Err(r) = ticket.reserve(total) {
            return Err(ReadError::Refused(r, stream));
        }
        // The common case is a single chunk: keep it without copying.
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            None => buf.extend_from_slice(&chunk),
            Some(f) => {
                buf.reserve(f.len() + chunk.len());
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(buf)))
}

/// How much of a refused ingest request's body is read away: four times the limit.
fn drain_cap(limits: &Limits) -> u64 {
    limits.max_request_bytes.saturating_mul(4)
}

/// Reads and discards what is left of a refused request's body (up to `cap` bytes, for
/// at most [`DRAIN_TIMEOUT`]), so the client reads the answer instead of a connection
/// reset. Not when the client waits for `100 Continue`: it has not sent the body, and
/// reading would ask it to.
pub(crate) async fn drain(headers: &HeaderMap, mut stream: BodyDataStream, cap: u64) {
    let expects_continue = headers
        .get(EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut n: u64 = 0;
        while let Some(Ok(chunk)) = stream.next().await {
            n += chunk.len() as u64;
            if n > cap {
                break;
            }
        }
    })
    .await;
}
