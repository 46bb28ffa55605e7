//! The operations desk (`/v1/admin/...`, with `--admin-token`): what an operator needs to see that
//! metrics cannot list. Every call needs `Authorization: Bearer <token>` (`401 unauthorized`
//! otherwise); without `--admin-token` the paths do not exist (`404`). [`authorise`] is asked
//! once, by the router's gate in front of every `/v1/admin` path (`super::admin_gate`), so the
//! handlers here run only for an authorised call.
//!
//! - `GET /v1/admin/payments`: what the settler still owes the gateway (`owed`: each order's
//!   action, how many calls failed since when, the gateway's last words, and whether a capture
//!   was refused for good, which is not retried) and the checkouts waiting on the gateway
//!   (`pending`): orders `payment_pending` until the gateway's webhook (`"waiting_for":
//!   "webhook"`), and checkouts still running, at the gateway or committing its answer, which are
//!   no order yet (`"checkout"`: their units are held, they are not in `holds`).
//! - `GET /v1/admin/holds[?older_than=<duration>]`: the orders still holding stock (the stuck
//!   inventory locks), oldest first.
//! - `POST /v1/admin/orders/{order_id}/release`: a held order released through the engine, as a
//!   cancel of a hold is (journaled, stock back, its authorisation voided after the commit): the
//!   safe replacement for killing a database session that holds a lock. A paid order is `409
//!   not_held` (a refund is a cancel); twice is harmless. With several nodes the order's owner
//!   releases it (the call is forwarded, the token with it).
//! - `GET /v1/admin/journal`: the journal's state: its last durable record and, by kind, its
//!   segment files on disk or this node's log in MySQL (`Journal::position`), the applier's and
//!   RabbitMQ's lags, the journal's own checks (its part of `/readyz`: the journal and MySQL; Redis,
//!   RabbitMQ and the cluster are in `/readyz`), and the counters `/metrics` shows.
//!
//! Every action is logged at `info` with its `order_id`.

use super::checkout::order_body;
use super::products::path_error;
use super::{json, json_response, path_id, ApiError, Shared};
use crate::domain::OrderId;
use crate::engine::order::OrderStatus;
use crate::time::{now_ms, rfc3339};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::State;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

/// The most orders one listing shows (the oldest debts first are not guaranteed: a listing is a
/// view for a person, bounded so it cannot grow without limit).
const LISTED_MAX: usize = 10_000;

/// Checks the bearer token: `404` without `--admin-token`, `401` for a wrong or missing one.
pub(super) fn authorise(state: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = state.admin_token.as_deref() else {
        return Err(ApiError::not_found("no such endpoint"));
    };
    if super::bears_token(headers, token) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the operations desk needs Authorization: Bearer <--admin-token>",
        ))
    }
}

/// A node another node took over (fenced) lists nothing: its memory still holds orders that were
/// adopted, and maybe finished, elsewhere (found by attack: a fenced node's desk listed an order
/// its adopter had released). Its orders are read through `GET /v1/orders/{id}` (MySQL's copy)
/// and listed by the live nodes' desks.
fn not_fenced(state: &Shared) -> Result<(), ApiError> {
    match &state.cluster {
        Some(cluster) if cluster.is_fenced() => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "fenced",
            format!(
                "node {} was taken over by another node: its orders are the live nodes' now (ask their desks); restart it",
                cluster.node()
            ),
        )),
        _ => Ok(()),
    }
}

pub(super) async fn payments(State(state): State<Shared>) -> Result<Response, ApiError> {
    not_fenced(&state)?;
    let now = now_ms();
    let failing = state.settler.failing();
    let owed: Vec<serde_json::Value> = state
        .engine
        .payments_due(LISTED_MAX)
        .into_iter()
        .filter_map(|order| {
            let action = order.payment_due?.as_str();
            let failed = failing.get(&order.order_id);
            Some(serde_json::json!({
                "order_id": order.order_id.as_str(),
                "status": order.status.as_str(),
                "payment_id": order.payment_id,
                "action": action,
                "since": failed.map(|f| rfc3339(f.since_ms)),
                "attempts": failed.map_or(0, |f| f.attempts),
                "last_error": failed.map(|f| crate::secrets::scrub(&f.last_error).into_owned()),
                "refused": failed.is_some_and(|f| f.refused),
            }))
        })
        .collect();
    // Durable orders waiting for the gateway's webhook, then checkouts still running (at the
    // gateway, or committing what it answered): neither kind is in `owed` yet.
    let durable = state.engine.pending_orders_created_before(now, LISTED_MAX);
    let running: Vec<(OrderId, i64)> = state
        .settler
        .checkouts_in_flight(LISTED_MAX)
        .into_iter()
        .filter(|(id, _)| state.engine.order(id).is_none())
        .collect();
    let pending: Vec<serde_json::Value> = durable
        .iter()
        .map(|order| (order.order_id.as_str(), order.created_at_ms, "webhook"))
        .chain(
            running
                .iter()
                .map(|(id, at)| (id.as_str(), *at, "checkout")),
        )
        .take(LISTED_MAX)
        .map(|(order_id, since_ms, waiting_for)| {
            serde_json::json!({
                "order_id": order_id,
                "age_s": (now - since_ms).max(0) / 1_000,
                "waiting_for": waiting_for,
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "owed": owed, "pending": pending }),
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HoldsQuery {
    older_than: Option<String>,
}

/// `GET /v1/admin/holds[?older_than=<duration>]`.
pub(super) async fn holds(
    State(state): State<Shared>,
    query: Result<Query<HoldsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    not_fenced(&state)?;
    let Query(query) = query.map_err(|e| ApiError::invalid(format!("older_than: {e}")))?;
    let older_than = match query.older_than.as_deref() {
        None => std::time::Duration::ZERO,
        Some(raw) => crate::config::parse_duration(raw)
            .map_err(|e| ApiError::invalid(format!("older_than: {e}")))?,
    };
    let now = now_ms();
    let cutoff = now.saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
    let holds: Vec<serde_json::Value> = state
        .engine
        .held_orders_created_before(cutoff.saturating_add(1), LISTED_MAX)
        .into_iter()
        .map(|order| {
            serde_json::json!({
                "order_id": order.order_id.as_str(),
                "status": order.status.as_str(),
                "customer_id": order.customer_id.as_str(),
                "items": order.items.iter().map(|item| serde_json::json!({
                    "sku": item.sku.as_str(),
                    "quantity": item.quantity,
                    "unit_price_cents": item.unit_price_cents,
                })).collect::<Vec<_>>(),
                "created_at": rfc3339(order.created_at_ms),
                "age_s": (now - order.created_at_ms).max(0) / 1_000,
            })
        })
        .collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "holds": holds })))
}

/// `POST /v1/admin/orders/{order_id}/release`.
pub(super) async fn release(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let order_id = path_id(raw, OrderId::parse)?;
    // Several nodes: another node's order is released by its owner.
    let route = format!("/v1/admin/orders/{order_id}/release");
    let forwarded = super::owner::forwarded(&state, &headers, "POST", &route, b"")?;
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let extra = [("authorization", bearer.as_str())];
    let call = super::owner::Call {
        method: "POST",
        path: &route,
        extra: &extra,
        body: Vec::new(),
        forwarded,
    };
    if let Some(answer) = super::owner::elsewhere(&state, &order_id, call).await? {
        return Ok(answer);
    }
    let (order, changed) = match crate::app::orders::release_held(&state, &order_id).await {
        Err(crate::app::orders::AppError::Engine(crate::engine::EngineError::UnknownOrder(_))) => {
            return Err(super::owner::not_found(&state, &order_id).await)
        }
        other => other?,
    };
    if matches!(order.status, OrderStatus::Paid | OrderStatus::Refunded) {
        tracing::info!(%order_id, status = order.status.as_str(), "admin: release refused, the order holds no stock");
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_held",
            format!(
                "order {order_id} is {}: it holds no stock to release (a paid order is refunded by POST /v1/orders/{order_id}/cancel)",
                order.status.as_str()
            ),
        ));
    }
    tracing::info!(%order_id, changed, status = order.status.as_str(), "admin: released a held order");
    Ok(json_response(StatusCode::OK, order_body(&order)))
}

/// The journal's and the relay's counters, as `/metrics` shows them.
struct JournalMetrics(Shared);

impl std::fmt::Debug for JournalMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JournalMetrics")
    }
}

impl prometheus_client::collector::Collector for JournalMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.0.journal.encode_metrics(&mut encoder)?;
        if let Some(relay) = &self.0.relay {
            relay.encode_metrics(&mut encoder)?;
        }
        Ok(())
    }
}

/// `GET /v1/admin/journal`.
pub(super) async fn journal(State(state): State<Shared>) -> Result<Response, ApiError> {
    let checks: serde_json::Map<String, serde_json::Value> = state
        .journal
        .checks()
        .await
        .into_iter()
        .map(|(name, check)| {
            let value = check.map_or_else(
                |reason| crate::secrets::scrub(&reason).into_owned(),
                |()| "ok".to_owned(),
            );
            (name.to_owned(), serde_json::Value::String(value))
        })
        .collect();
    // Every sample of the journal's and the relay's counters, by its name as /metrics writes it
    // (labels included): one source for both views.
    let text = crate::metrics::render(JournalMetrics(std::sync::Arc::clone(&state)));
    let counters: serde_json::Map<String, serde_json::Value> = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            Some((name.to_owned(), serde_json::json!(value)))
        })
        .filter(|(name, _)| !name.contains("_bucket{"))
        .collect();
    let amqp = state.relay.as_ref().map(|relay| {
        serde_json::json!({
            "lag_events": relay.lag_events(),
            "lag_seconds": relay.lag_seconds(),
            "confirmed_seq": relay.confirmed(),
            "oldest_unconfirmed_seq": (relay.lag_events() > 0).then(|| relay.confirmed() + 1),
        })
    });
    let mut position = state.journal.position();
    if let Some(mysql) = position.mysql.as_mut() {
        mysql.problem = mysql
            .problem
            .take()
            .map(|p| crate::secrets::scrub(&p).into_owned());
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "last_event_seq": state.journal.last_event_seq(),
            "journal": position,
            "checks": checks,
            "amqp": amqp,
            "counters": counters,
        }),
    ))
}
