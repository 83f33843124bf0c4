//! The local HTTP endpoint (`[http]`): `/live`, `/ready`, `/metrics`, `/status`.
//!
//! * `/live` — 200 while the process serves HTTP at all.
//! * `/ready` — 200 while the gateway takes data (see [`Live::readiness`]), else 503 with
//!   the reason. A relay that is down does not make it unready: buffering is the job.
//! * `/metrics` — Prometheus text ([`crate::metrics`]).
//! * `/status` — the [`StatusReport`](crate::report::StatusReport) as JSON; what
//!   `pigeon-gateway status` asks.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::report::Live;

/// The routes.
pub(crate) fn router(live: Arc<Live>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(live)
}

/// Serves on `listener` until the task is dropped or aborted.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    live: Arc<Live>,
) -> std::io::Result<()> {
    axum::serve(listener, router(live)).await
}

async fn ready(State(live): State<Arc<Live>>) -> Response {
    match live.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(live): State<Arc<Live>>) -> Response {
    let report = live.report().await;
    (
        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&report),
    )
        .into_response()
}

async fn status(State(live): State<Arc<Live>>) -> Response {
    Json(live.report().await).into_response()
}
