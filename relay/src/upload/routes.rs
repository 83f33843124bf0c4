//! The upload endpoint's HTTP handlers: headers, limits and the token in, status codes
//! and tus headers out; [`Uploads`](super::Uploads) does the work.
//!
//! `POST`, `HEAD` and `DELETE` count against `limits.max_concurrent_requests` like ingest
//! requests; `PATCH`es, which can take long, have their own `limits.max_concurrent_uploads`.
//! When either is full the answer is `503` with `Retry-After: 1`, at once.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pigeon_shared::ce::GatewayId;
use pigeon_shared::wire::{self, CreateUpload, EventStatus, UploadState};
use tokio::sync::OwnedSemaphorePermit;

use super::CREATE_OVERHEAD;
use super::error::UploadError;
use super::key::is_upload_id;
use super::service::{Created, PatchRequest, Patched, not_found};
use crate::admission::Ticket;
use crate::auth::{AuthError, Principal};
use crate::fleet::{RequestKind, Seen, Tally};
use crate::ingest::media_type;
use crate::request::{AppState, Failure, admit_client, client_ticket, drain, read_body};
use crate::tls::Peer;

/// How much of a refused `PATCH`'s body is read away before the answer, so a client
/// still sending reads it instead of a connection reset. A longer body may see the
/// reset; its gateway creates the upload again and learns the offset.
const PATCH_DRAIN_CAP: u64 = 8 << 20;

const UPLOAD_OFFSET: HeaderName = HeaderName::from_static(wire::HEADER_UPLOAD_OFFSET);
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static(wire::HEADER_UPLOAD_LENGTH);

/// Uploads always need a token, even with `allow_unauthenticated`. The gateway is also
/// put in `who`, for the fleet view.
fn gateway(
    st: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    who: &mut Option<GatewayId>,
) -> Result<GatewayId, Failure> {
    match st.auth.authenticate(headers, peer.client.as_deref()) {
        Ok(Principal::Gateway(g)) => {
            *who = Some(g.clone());
            Ok(g)
        }
        Ok(Principal::Anonymous) => Err(Failure::unauthorized(&AuthError::Missing)),
        Err(e) => Err(Failure::unauthorized(&e)),
    }
}

/// Tells the fleet view of an upload request of `who` answered with `response`; `file`
/// is what it counts of the file the request finished, if it did.
fn noted(st: &AppState, who: Option<GatewayId>, response: Response, file: Tally) -> Response {
    if let Some(gw) = who {
        let mut seen = Seen::default();
        let i = seen.index(&gw);
        *seen.at(i) = file;
        seen.note(
            &st.fleet,
            response.status().as_u16(),
            Some(RequestKind::Files),
        );
    }
    response
}

/// What the fleet view counts of a finished upload.
fn finished(s: &UploadState) -> Tally {
    match s.result.as_ref().map(|r| r.status) {
        Some(EventStatus::Accepted) => Tally {
            files: 1,
            file_bytes: s.length,
            ..Tally::default()
        },
        Some(EventStatus::Duplicate) => Tally {
            duplicates: 1,
            ..Tally::default()
        },
        Some(EventStatus::Rejected) => Tally {
            rejected: 1,
            ..Tally::default()
        },
        None => Tally::default(),
    }
}

/// The gateway, its request slot and one of `limits.max_concurrent_requests`.
fn admit_gateway(
    st: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    who: &mut Option<GatewayId>,
) -> Result<(GatewayId, Ticket, OwnedSemaphorePermit), Failure> {
    let gw = gateway(st, peer, headers, who)?;
    let (ticket, permit) = admit_client(st, peer, &Principal::Gateway(gw.clone()))?;
    Ok((gw, ticket, permit))
}

fn failure(st: &AppState, e: UploadError) -> Failure {
    let message = e.to_string();
    let offset = |f: Failure, n: u64| f.header(UPLOAD_OFFSET, HeaderValue::from(n));
    match e {
        UploadError::BadRequest(_) => Failure::new(StatusCode::BAD_REQUEST, message),
        UploadError::NotFound(_) => Failure::new(StatusCode::NOT_FOUND, message),
        UploadError::Idle { offset: n, .. } => {
            offset(Failure::new(StatusCode::REQUEST_TIMEOUT, message), n)
        }
        UploadError::Conflict { offset: n, .. } => {
            offset(Failure::new(StatusCode::CONFLICT, message), n)
        }
        UploadError::TooLarge { offset: n, .. } => {
            let f = Failure::new(StatusCode::PAYLOAD_TOO_LARGE, message);
            match n {
                Some(n) => offset(f, n),
                None => f,
            }
        }
        UploadError::DigestMismatch { .. } => {
            offset(Failure::new(StatusCode::UNPROCESSABLE_ENTITY, message), 0)
        }
        UploadError::Unavailable(_) => Failure::new(StatusCode::SERVICE_UNAVAILABLE, message)
            .retry_after(st.retry_after.as_secs().max(1)),
        UploadError::Internal(_) => {
            tracing::error!(error = %message, "An upload request failed unexpectedly.");
            Failure::new(StatusCode::INTERNAL_SERVER_ERROR, message)
        }
    }
}

/// Adds `Upload-Offset`, `Upload-Length` and `Cache-Control: no-store` (offsets change).
fn with_offsets(mut r: Response, offset: u64, length: u64) -> Response {
    let h = r.headers_mut();
    h.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    h.insert(UPLOAD_LENGTH, HeaderValue::from(length));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An [`UploadState`] body; the tus headers when it has a `location` (and `Location`
/// itself on `201`).
fn state_response(status: StatusCode, state: UploadState) -> Response {
    let location = state.location.clone();
    let (offset, length) = (state.offset, state.length);
    let mut r = (status, Json(state)).into_response();
    if let Some(loc) = location {
        if status == StatusCode::CREATED
            && let Ok(v) = HeaderValue::from_str(&loc)
        {
            r.headers_mut().insert(LOCATION, v);
        }
        r = with_offsets(r, offset, length);
    }
    r
}

fn check_upload_id(gateway: &GatewayId, id: &str) -> Result<(), Failure> {
    if is_upload_id(id) {
        Ok(())
    } else {
        Err(Failure::new(
            StatusCode::NOT_FOUND,
            not_found(gateway, id).to_string(),
        ))
    }
}

/// The `Upload-Offset` header: decimal digits only (no sign, no spaces), fitting a `u64`.
pub(crate) fn upload_offset(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(&UPLOAD_OFFSET)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
}

/// `POST /v1/uploads`.
pub async fn create(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let stream = body.into_data_stream();
    let limit = st.limits.max_event_bytes.saturating_add(CREATE_OVERHEAD);
    let too_large = || create_too_large(limit);
    let mut who = None;
    let mut admitted = || {
        let (gw, mut ticket, permit) = admit_gateway(&st, &peer, &headers, &mut who)?;
        let ct = headers
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().map(media_type).unwrap_or_default());
        if ct.is_some_and(|t| t != "application/json") {
            return Err(Failure::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json (a CreateUpload)",
            ));
        }
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = declared {
            if n > limit {
                return Err(too_large());
            }
            ticket.reserve(n)?;
        }
        Ok((permit, ticket, gw))
    };
    let admitted = admitted();
    let (permit, ticket, gw) = match admitted {
        Ok(a) => a,
        Err(f) => {
            drain(&headers, stream, limit).await;
            return noted(&st, who, f.into_response(), Tally::default());
        }
    };
    let (response, file) =
        create_admitted(&st, &headers, stream, (permit, ticket), &gw, limit).await;
    noted(&st, who, response, file)
}

/// The 413 of a create whose body is over `limit`.
fn create_too_large(limit: u64) -> Failure {
    Failure::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the body is larger than {limit} bytes: an upload's event may be at most limits.max_event_bytes"
        ),
    )
}

/// The rest of a create, once admitted (holding its permit and ticket): the answer,
/// and the file if it finished one.
async fn create_admitted(
    st: &AppState,
    headers: &HeaderMap,
    stream: axum::body::BodyDataStream,
    (permit, mut ticket): (OwnedSemaphorePermit, Ticket),
    gw: &GatewayId,
    limit: u64,
) -> (Response, Tally) {
    let too_large = || create_too_large(limit);
    let raw = match read_body(st, stream, limit, &mut ticket).await {
        Ok(b) => b,
        Err(e) => {
            // Nothing is held while the rest of the body is drained.
            drop((ticket, permit));
            return (e.answer(st, headers, too_large).await, Tally::default());
        }
    };
    let req: CreateUpload = match serde_json::from_slice(&raw) {
        Ok(r) => r,
        Err(e) => {
            let f = Failure::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not a CreateUpload ({{\"event\", \"length\", \"sha256\", \"extension\"}}): {e}"
                ),
            );
            return (f.into_response(), Tally::default());
        }
    };
    let created = st.uploads.create(gw, req).await;
    drop((ticket, permit));
    match created {
        Ok(Created::New(s)) => (state_response(StatusCode::CREATED, s), Tally::default()),
        Ok(Created::Existing(s) | Created::Done(s)) => {
            let file = finished(&s);
            (state_response(StatusCode::OK, s), file)
        }
        Err(e) => (failure(st, e).into_response(), Tally::default()),
    }
}

/// The checks of a `PATCH` that need only its headers.
fn admit_patch(
    st: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    id: &str,
    who: &mut Option<GatewayId>,
) -> Result<(OwnedSemaphorePermit, Ticket, PatchRequest), Failure> {
    let gateway = gateway(st, peer, headers, who)?;
    let ticket = client_ticket(st, peer, &Principal::Gateway(gateway.clone()))?;
    let permit = st.upload_permits.clone().try_acquire_owned().map_err(|_| {
        st.metrics.count_admission_refused("uploads");
        Failure::overloaded(format!(
            "the relay is receiving its maximum of {} uploads at once (limits.max_concurrent_uploads); retry later",
            st.limits.max_concurrent_uploads
        ))
    })?;
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media_type);
    if ct.as_deref() != Some(wire::CONTENT_TYPE_UPLOAD_CHUNK) {
        return Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type must be {} (the file's bytes)",
                wire::CONTENT_TYPE_UPLOAD_CHUNK
            ),
        ));
    }
    let offset = upload_offset(headers).ok_or_else(|| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                "header Upload-Offset must be the decimal number of bytes the relay holds (from the create's answer)",
            )
        })?;
    check_upload_id(&gateway, id)?;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    Ok((
        permit,
        ticket,
        PatchRequest {
            gateway,
            id: id.to_owned(),
            offset,
            declared,
        },
    ))
}

/// `PATCH /v1/uploads/<id>`.
pub async fn patch(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let stream = body.into_data_stream();
    let mut who = None;
    let (permit, ticket, req) = match admit_patch(&st, &peer, &headers, &id, &mut who) {
        Ok(a) => a,
        Err(f) => {
            drain(&headers, stream, PATCH_DRAIN_CAP).await;
            return noted(&st, who, f.into_response(), Tally::default());
        }
    };
    // A task of its own: if the client goes away, hyper drops this handler, but the
    // bytes received so far are still written (and their hash kept) before the upload
    // is let go. The task holds the gateway's request slot until then.
    let uploads = st.uploads.clone();
    let task = tokio::spawn(async move {
        let _ticket = ticket;
        uploads.patch(req, stream, permit).await
    });
    let answer = match task.await {
        Ok(a) => a,
        Err(e) => {
            let f = failure(&st, UploadError::Internal(format!("the PATCH failed: {e}")));
            return noted(&st, who, f.into_response(), Tally::default());
        }
    };
    if let Some(rest) = answer.unread {
        drain(&headers, rest, PATCH_DRAIN_CAP).await;
    }
    let (response, file) = match answer.result {
        Ok(Patched::Partial { offset, length }) => (
            with_offsets(StatusCode::NO_CONTENT.into_response(), offset, length),
            Tally::default(),
        ),
        Ok(Patched::Done(s)) => {
            let (offset, length, file) = (s.offset, s.length, finished(&s));
            (
                with_offsets(state_response(StatusCode::OK, s), offset, length),
                file,
            )
        }
        Err(e) => (failure(&st, e).into_response(), Tally::default()),
    };
    noted(&st, who, response, file)
}

/// The checks of a `HEAD` or `DELETE`: a request slot, the token, an id that can exist.
fn admit_short(
    st: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    id: &str,
    who: &mut Option<GatewayId>,
) -> Result<(OwnedSemaphorePermit, Ticket, GatewayId), Failure> {
    let (gw, ticket, permit) = admit_gateway(st, peer, headers, who)?;
    check_upload_id(&gw, id)?;
    Ok((permit, ticket, gw))
}

/// `HEAD /v1/uploads/<id>`.
pub async fn head(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut who = None;
    let answer = async {
        let (_permit, _ticket, gw) = admit_short(&st, &peer, &headers, &id, &mut who)?;
        st.uploads.head(&gw, &id).await.map_err(|e| failure(&st, e))
    };
    let response = match answer.await {
        Ok((offset, length)) => with_offsets(StatusCode::OK.into_response(), offset, length),
        Err(f) => f.into_response(),
    };
    noted(&st, who, response, Tally::default())
}

/// `DELETE /v1/uploads/<id>`.
pub async fn delete(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut who = None;
    let answer = async {
        let (_permit, _ticket, gw) = admit_short(&st, &peer, &headers, &id, &mut who)?;
        st.uploads
            .delete(&gw, &id)
            .await
            .map_err(|e| failure(&st, e))
    };
    let response = match answer.await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(f) => f.into_response(),
    };
    noted(&st, who, response, Tally::default())
}
