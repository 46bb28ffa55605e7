//! `/healthz`, `/readyz`, `/metrics`, `/openapi.json`.

use super::{json, Shared};
use crate::metrics::{encode_gauge, render, CONTENT_TYPE};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

/// The contract as an OpenAPI 3.1 document (`docs/openapi.json`, built into the binary;
/// `tests/contract.rs` validates it and runs schemathesis against a server that serves it).
const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// `GET /openapi.json`.
pub(super) async fn openapi() -> Response {
    let mut response = (StatusCode::OK, OPENAPI).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(super) async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// Ready when the journal can take checkouts now; the body says why not (API.md).
pub(super) async fn readyz(State(state): State<Shared>) -> Response {
    let mut checks = state.journal.checks().await;
    let mut ready = checks.iter().all(|(_, check)| check.is_ok());
    // RabbitMQ is not on the checkout path: down, it shows here and leaves the node ready; only
    // the budget of unconfirmed events reached stops checkouts.
    if let Some(relay) = &state.relay {
        let admitted = relay.admit();
        ready &= admitted.is_ok();
        checks.push(("amqp", admitted.and_then(|()| relay.check())));
    }
    // Redis down leaves the node ready too (carts and checkouts answer 503 until it is back; the
    // rest of the node, reads and webhooks, serves on).
    if let Some(store) = state.carts.store() {
        checks.push(("redis", store.check()));
    }
    // Several nodes: a fenced node, or one that cannot renew its leases, takes no checkouts.
    if let Some(cluster) = &state.cluster {
        let unready = cluster.unready();
        ready &= unready.is_none();
        checks.push(("cluster", unready.map_or(Ok(()), Err)));
    }
    // Stopping (SIGTERM): not ready at once, whatever else holds, so traffic goes elsewhere
    // while the node serves on for --shutdown-delay and drains.
    if state.stopping.load(std::sync::atomic::Ordering::Acquire) {
        ready = false;
        checks.push((
            "stopping",
            Err("the node is stopping (SIGTERM): it finishes what it has and exits".to_owned()),
        ));
    }
    // The gateway too: payments owed are retried when it is back.
    if let Some(check) = state.gateway.check() {
        checks.push(("gateway", check));
    }
    let checks: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|(name, check)| {
            let value = check.map_or_else(
                |reason| crate::secrets::scrub(&reason).into_owned(),
                |()| "ok".to_owned(),
            );
            (name.to_owned(), serde_json::Value::String(value))
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({ "ready": ready, "checks": checks }),
    )
}

/// `GET /v1/cluster`: the nodes, their leases and the pool (several nodes; `404` on a node that
/// runs alone).
pub(super) async fn cluster(State(state): State<Shared>) -> Result<Response, super::ApiError> {
    let Some(cluster) = &state.cluster else {
        return Err(super::ApiError::not_found(
            "this node runs alone (no --node-id): there is no cluster to show",
        ));
    };
    let view = crate::cluster::registry::view(cluster).await?;
    Ok(json(StatusCode::OK, &view))
}

/// The server's metrics, read at scrape time from the atomics the request path updates.
struct ServerMetrics(Shared);

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerMetrics")
    }
}

impl Collector for ServerMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        state.metrics.encode(&mut encoder)?;
        state.journal.encode_metrics(&mut encoder)?;
        if let Some(relay) = &state.relay {
            relay.encode_metrics(&mut encoder)?;
        }
        if let Some(store) = state.carts.store() {
            store.encode_metrics(&mut encoder)?;
        }
        if let Some(cluster) = &state.cluster {
            cluster.encode_metrics(&state.engine, &mut encoder)?;
        }
        crate::metrics::encode_counter(
            &mut encoder,
            "turnstile_responses_refused",
            "Answers replaced by 503 overloaded because the answers not yet read by their clients filled --response-bytes-max.",
            state.response_budget.refused(),
        )?;
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
                "Carts held in this process (0 with Redis).",
                state.carts.in_memory(),
            ),
            (
                "turnstile_payments_owed",
                "Orders whose capture, void or refund is not confirmed yet (money owed).",
                engine.payments_due_len(),
            ),
            (
                "turnstile_response_bytes_unsent",
                "Bytes of answers not yet written to their clients' connections, across all connections (at most --response-bytes-max, plus the 503 answers past it).",
                state.response_budget.unsent(),
            ),
            (
                "turnstile_payments_capture_refused_orders",
                "Paid orders whose capture the gateway refused for good, not retried in this run (listed at GET /v1/admin/payments): paid without their money until a person acts.",
                state.settler.captures_refused(),
            ),
        ] {
            encode_gauge(&mut encoder, name, help, value as u64)?;
        }
        Ok(())
    }
}

pub(super) async fn metrics(State(state): State<Shared>) -> Response {
    let mut response = render(ServerMetrics(state)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}
