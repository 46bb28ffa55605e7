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
    // What memory holds: each bounded by retention or a limit, so a soak can watch them level off.
    let engine = &state.engine;
    for (name, help, value) in [
        (
            "turnstile_orders_in_memory",
            "Orders held in memory.",
            engine.orders_len(),
        ),
        (
            "turnstile_holds_in_memory",
            "Orders holding stock.",
            engine.holds_len(),
        ),
        (
            "turnstile_idempotency_keys_in_memory",
            "Idempotency keys held (in flight or with a kept answer).",
            engine.idempotency().len(),
        ),
        (
            "turnstile_rejections_in_memory",
            "Answers that placed nothing, kept for replay.",
            engine.idempotency().rejections_len(),
        ),
        (
            "turnstile_events_in_memory",
            "Recent events held in memory.",
            state.journal.events_in_memory(),
        ),
        (
            "turnstile_carts_in_memory",
            "Carts held.",
            state.carts.len(),
        ),
    ] {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
