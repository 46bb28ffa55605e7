//! `/healthz`, `/readyz`, `/metrics`.

use super::{json, Shared};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

pub(super) async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// Ready when the journal can take checkouts now; the body says why not (API.md).
pub(super) async fn readyz(State(state): State<Shared>) -> Response {
    let journal = state.journal.ready().await;
    let ready = journal.is_ok();
    let check = journal.map_or_else(|error| error.to_string(), |()| "ok".to_owned());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({ "ready": ready, "checks": { "journal": check } }),
    )
}

pub(super) async fn metrics(State(state): State<Shared>) -> Response {
    let mut out = String::with_capacity(16 * 1024);
    state.metrics.render(&mut out);
    state.journal.stats().render(&mut out);
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
