//! `/healthz`, `/readyz`, `/metrics`.

use super::{json, Shared};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

pub(super) async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

pub(super) async fn readyz(State(state): State<Shared>) -> Response {
    match state.journal.ready().await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
        Err(error) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({
                "error": "journal_unavailable",
                "message": error.to_string(),
            }),
        ),
    }
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
