//! The operations desk (`/v1/admin/...`, with `--admin-token`): what an operator needs to see that
//! metrics cannot list. Every call needs `Authorization: Bearer <token>` (`401 unauthorized`
//! otherwise); without `--admin-token` the paths do not exist (`404`).
//!
//! - `GET /v1/admin/payments`: what the settler still owes the gateway (`owed`: each order's
//!   action, how many calls failed since when, the gateway's last words, and whether a capture
//!   was refused for good, which is not retried) and the checkouts waiting on the gateway
//!   (`pending`).

use super::{json, ApiError, Shared};
use crate::time::{now_ms, rfc3339};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

/// The most orders one listing shows (the oldest debts first are not guaranteed: a listing is a
/// view for a person, bounded so it cannot grow without limit).
const LISTED_MAX: usize = 10_000;

/// Checks the bearer token: `404` without `--admin-token`, `401` for a wrong or missing one.
fn authorise(state: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
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

pub(super) async fn payments(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorise(&state, &headers)?;
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
                "last_error": failed.map(|f| f.last_error.clone()),
                "refused": failed.is_some_and(|f| f.refused),
            }))
        })
        .collect();
    let pending: Vec<serde_json::Value> = state
        .engine
        .pending_orders_created_before(now, LISTED_MAX)
        .into_iter()
        .map(|order| {
            serde_json::json!({
                "order_id": order.order_id.as_str(),
                "age_s": (now - order.created_at_ms).max(0) / 1_000,
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "owed": owed, "pending": pending }),
    ))
}
