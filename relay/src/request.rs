//! What every request handler shares, the ingest endpoint's ([`crate::server`]) and the
//! upload endpoint's ([`crate::upload::routes`]): the application state, admission (the
//! relay's request permits and each client's share), reading a body within its limits
//! and deadlines, draining a refused one, and the [`Failure`] answer.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{BodyDataStream, Bytes};
use axum::http::header::{CONNECTION, EXPECT, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use pigeon_shared::wire::ErrorBody;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admission::config::Limits;
use crate::admission::{Admission, Client, Refused, Ticket};
use crate::auth::{AuthError, Authenticator, Principal};
use crate::fleet::{Fleet, Operators};
use crate::ingest::RequestError;
use crate::metrics::Metrics;
use crate::sink::SinkHandle;
use crate::tls::Peer;
use crate::upload::Uploads;

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
    /// Every known gateway's record.
    pub fleet: Arc<Fleet>,
    /// Who may read the fleet view.
    pub operators: Operators,
}

/// A whole-request failure, answered with an [`ErrorBody`].
#[derive(Debug)]
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
pub(crate) fn drain_cap(limits: &Limits) -> u64 {
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
