//! `POST /v1/webhooks/payment`: the gateway's final word on a pending payment, signed with
//! `Turnstile-Signature`. Deliveries are idempotent: a second one, or one for an order already
//! finished, changes nothing (an approval for a released order leaves it owing a void).

use super::{check_length, json, parse_json, read_body, ApiError, Shared};
use crate::app::{commit, prepare_when_free};
use crate::domain::OrderId;
use crate::engine::order::{OrderStatus, PaymentDue};
use crate::engine::{EngineError, Prepared};
use crate::payment::webhook::verify;
use crate::time::now_ms;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Decision {
    Approved,
    Declined,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    payment_id: String,
    order_id: OrderId,
    status: Decision,
}

pub(super) async fn payment_webhook(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_length(&headers)?;
    let raw = read_body(&state, body).await?;
    let signature = headers
        .get("turnstile-signature")
        .and_then(|v| v.to_str().ok());
    verify(&state.webhook_secret, signature, &raw, now_ms() / 1000).map_err(|error| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            error.to_string(),
        )
    })?;
    let body: WebhookBody = parse_json(&raw)?;
    let order = state
        .engine
        .order(&body.order_id)
        .ok_or_else(|| ApiError::not_found(format!("no order {}", body.order_id)))?;
    if order.payment_id.as_deref() != Some(body.payment_id.as_str()) {
        return Err(ApiError::invalid(format!(
            "payment {} does not belong to order {}",
            body.payment_id, body.order_id
        )));
    }
    let target = match body.status {
        Decision::Approved => OrderStatus::Paid,
        Decision::Declined => OrderStatus::Released,
    };
    let prepared = prepare_when_free(&state, || {
        match state
            .engine
            .prepare_transition(&body.order_id, target, now_ms())
        {
            // Finished meanwhile (expired or cancelled): a late delivery, handled below.
            Err(EngineError::IllegalTransition(_)) => Ok(None),
            other => other.map(Some),
        }
    })
    .await?;
    match prepared {
        Some(Prepared::Change(change)) => {
            commit(&state, change, |_, _| {}).await?;
        }
        Some(Prepared::Unchanged(_)) => {}
        None => {
            // Finished meanwhile: an approval for an order that no longer holds its stock. The
            // authorisation must not stay: the order owes a void (if it does not owe one already,
            // or has done it; voiding again is harmless).
            let released = state
                .engine
                .order(&body.order_id)
                .is_some_and(|o| o.status == OrderStatus::Released);
            if target == OrderStatus::Paid && released {
                crate::app::money::set_due(&state, &body.order_id, None, Some(PaymentDue::Void))
                    .await
                    .map_err(ApiError::internal)?;
            }
        }
    }
    Ok(received())
}

fn received() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "received": true }))
}
