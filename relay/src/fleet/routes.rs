//! `GET /v1/gateways` and `GET /v1/gateways/<id>`: the fleet view, for operators.
//!
//! Each request is checked in this order: an operator's bearer token (`401` without one,
//! with a wrong one, with a gateway's); one of `limits.max_concurrent_requests` (`503`);
//! no body (`413`); then the path (`400` for what cannot be a gateway id, `404` for a
//! gateway the relay does not know or the operator may not see — the two look the same
//! — and for any other path below `/v1/gateways/`) and the query (`414` past
//! [`MAX_QUERY_BYTES`], `400` for a parameter it does not take). Every refusal is a JSON
//! `{"error": "…"}` that says what to send instead.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_LENGTH, TRANSFER_ENCODING, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use pigeon_shared::ce::GatewayId;

use super::record::SILENT_AFTER_INTERVALS;
use super::registry::now_ms;
use super::view::{FleetView, GatewayView, gateway_view, rfc3339};
use crate::config::tenant::check_tenant;
use crate::request::{AppState, Failure, request_permit};

/// The list.
pub const GATEWAYS_PATH: &str = "/v1/gateways";

/// The longest query string taken: the list's parameters are short.
pub const MAX_QUERY_BYTES: usize = 1024;

/// `GET /v1/gateways[?tenant=<tenant>][&silent=true|false]`. On the blocking pool: with
/// thousands of gateways the list takes milliseconds to build (35 ms for 10,000, see
/// `benches/fleet.rs`), which a reactor thread should not spend.
pub async fn list(State(st): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    let state = st.clone();
    let built = tokio::task::spawn_blocking(move || respond(&state, &headers, &uri, false)).await;
    let answer = built.unwrap_or_else(|e| {
        tracing::error!(error = %e, "Building the fleet view failed unexpectedly.");
        Err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error while building the fleet view",
        ))
    });
    counted(&st, answer)
}

/// `GET /v1/gateways/<id>`, and every other path below `/v1/gateways/`.
pub async fn one(State(st): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    counted(&st, respond(&st, &headers, &uri, true))
}

fn counted(st: &AppState, r: Result<Response, Failure>) -> Response {
    let response = r.unwrap_or_else(IntoResponse::into_response);
    st.metrics.count_fleet_request(response.status().as_u16());
    response
}

fn respond(st: &AppState, headers: &HeaderMap, uri: &Uri, one: bool) -> Result<Response, Failure> {
    let operator = st.operators.authenticate(headers).map_err(|e| {
        Failure::new(StatusCode::UNAUTHORIZED, e.to_string())
            .header(WWW_AUTHENTICATE, HeaderValue::from_static(e.challenge()))
    })?;
    let _permit = request_permit(st)?;
    refuse_body(headers)?;
    let clock = st.fleet.clock(now_ms());
    if one {
        let id = gateway_in_path(uri.path())?;
        if uri.query().is_some() {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "GET /v1/gateways/<id> takes no query string",
            ));
        }
        let entry = st
            .fleet
            .get(&id)
            .filter(|e| operator.sees(&e.tenant))
            .ok_or_else(|| {
                Failure::new(
                    StatusCode::NOT_FOUND,
                    format!("no gateway {id} is known to this relay (GET /v1/gateways lists those it knows)"),
                )
            })?;
        let view = entry.with_record(|r| gateway_view(&entry, r, &clock));
        tracing::debug!(operator = operator.name, gateway = %id, "Answered a fleet view request.");
        return Ok(json(view));
    }
    let q = Query::parse(uri.query())?;
    let mut gateways: Vec<GatewayView> = st
        .fleet
        .entries()
        .iter()
        .filter(|e| operator.sees(&e.tenant) && q.tenant.as_ref().is_none_or(|t| *t == e.tenant))
        .map(|e| e.with_record(|r| gateway_view(e, r, &clock)))
        .filter(|g| q.silent.is_none_or(|s| s == g.silent))
        .collect();
    gateways.sort_by(|a, b| (&a.tenant, &a.id).cmp(&(&b.tenant, &b.id)));
    tracing::debug!(
        operator = operator.name,
        gateways = gateways.len(),
        "Answered a fleet view request."
    );
    Ok(json(FleetView {
        generated_at: rfc3339(clock.now_ms),
        relay_started_at: rfc3339(clock.listening_since_ms),
        default_heartbeat_interval_seconds: clock.default_interval_ms as f64 / 1000.0,
        silent_after_intervals: SILENT_AFTER_INTERVALS,
        count: gateways.len(),
        silent: gateways.iter().filter(|g| g.silent).count(),
        untracked: st.fleet.untracked(),
        gateways,
    }))
}

fn json(body: impl serde::Serialize) -> Response {
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A `GET` here carries no body.
fn refuse_body(headers: &HeaderMap) -> Result<(), Failure> {
    let length = headers
        .get(CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0");
    if length || headers.contains_key(TRANSFER_ENCODING) {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "GET /v1/gateways takes no request body",
        ));
    }
    Ok(())
}

/// `what` as a log or an answer may show it: escaped, at most 100 characters.
fn shown(what: &str) -> String {
    let cut: String = what.chars().take(100).collect();
    if cut.len() < what.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The gateway id of `/v1/gateways/<id>`, taken as it is (ids need no percent-encoding,
/// so none is undone: `%2e%2e` is no id either).
fn gateway_in_path(path: &str) -> Result<GatewayId, Failure> {
    let rest = path
        .strip_prefix(GATEWAYS_PATH)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or_default();
    if rest.is_empty() || rest.contains('/') {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            format!(
                "there is nothing at {}: the fleet view is GET /v1/gateways and GET /v1/gateways/<id>",
                shown(path)
            ),
        ));
    }
    GatewayId::new(rest).map_err(|_| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{} is not a gateway id: ids are 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . or -",
                shown(rest)
            ),
        )
    })
}

/// The list's query: `tenant=<tenant>`, `silent=true|false`, each at most once.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
    tenant: Option<String>,
    silent: Option<bool>,
}

impl Query {
    fn parse(query: Option<&str>) -> Result<Self, Failure> {
        let mut q = Query::default();
        let Some(query) = query else {
            return Ok(q);
        };
        if query.len() > MAX_QUERY_BYTES {
            return Err(Failure::new(
                StatusCode::URI_TOO_LONG,
                format!(
                    "the query string is {} bytes, over {MAX_QUERY_BYTES}: GET /v1/gateways takes only tenant=<tenant> and silent=true|false",
                    query.len()
                ),
            ));
        }
        let bad = |m: String| Failure::new(StatusCode::BAD_REQUEST, m);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "tenant" => {
                    check_tenant(value).map_err(|_| {
                        bad(format!(
                            "tenant={} is not a tenant: 1 to 64 of a-z 0-9 - _, starting with a letter or digit",
                            shown(value)
                        ))
                    })?;
                    if q.tenant.replace(value.to_owned()).is_some() {
                        return Err(bad("tenant is given more than once".to_owned()));
                    }
                }
                "silent" => {
                    let v = match value {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(bad(format!(
                                "silent={} must be true or false",
                                shown(value)
                            )));
                        }
                    };
                    if q.silent.replace(v).is_some() {
                        return Err(bad("silent is given more than once".to_owned()));
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown query parameter {}: GET /v1/gateways takes tenant=<tenant> and silent=true|false",
                        shown(key)
                    )));
                }
            }
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status<T: std::fmt::Debug>(r: Result<T, Failure>) -> u16 {
        r.unwrap_err().into_response().status().as_u16()
    }

    #[test]
    fn the_query_takes_two_parameters() {
        assert_eq!(Query::parse(None).unwrap(), Query::default());
        assert_eq!(
            Query::parse(Some("tenant=acme&silent=true")).unwrap(),
            Query {
                tenant: Some("acme".into()),
                silent: Some(true)
            }
        );
        assert_eq!(
            Query::parse(Some("&silent=false&")).unwrap().silent,
            Some(false)
        );
        for bad in [
            "tenant=Acme",
            "tenant=",
            "silent=yes",
            "x=1",
            "tenant=a&tenant=b",
            "silent",
        ] {
            assert_eq!(status(Query::parse(Some(bad))), 400, "{bad}");
        }
        let huge = format!("tenant={}", "a".repeat(MAX_QUERY_BYTES));
        assert_eq!(status(Query::parse(Some(&huge))), 414);
    }

    #[test]
    fn paths_name_one_gateway_or_nothing() {
        assert_eq!(
            gateway_in_path("/v1/gateways/pi-1").unwrap().as_str(),
            "pi-1"
        );
        for (path, code) in [
            ("/v1/gateways/..", 400),
            ("/v1/gateways/%2e%2e", 400),
            ("/v1/gateways/pi%2F1", 400),
            ("/v1/gateways/../x", 404),
            ("/v1/gateways/pi-1/", 404),
            ("/v1/gateways/", 404),
        ] {
            assert_eq!(status(gateway_in_path(path)), code, "{path}");
        }
    }

    #[test]
    fn answers_show_outside_text_escaped_and_short() {
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        assert!(shown(&"x".repeat(500)).len() < 110);
    }
}
