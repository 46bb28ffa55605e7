//! `POST /v1/webhooks/payment`: the gateway's final word on a pending payment, signed with
//! `Turnstile-Signature`. Deliveries are idempotent: a second one, or one for an order already
//! finished, changes nothing (an approval for a released order leaves it owing a void).

use super::{check_length, json, parse_json, read_body, ApiError, Shared};
use crate::domain::OrderId;
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

/// Parses a webhook body as the handler does (for the fuzz targets, [`crate::fuzzing`]).
pub(crate) fn parse_body(bytes: &[u8]) -> bool {
    parse_json::<WebhookBody>(bytes).is_ok()
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
    // Several nodes: another node's order hears its gateway through its owner.
    let route = "/v1/webhooks/payment";
    let forwarded = super::owner::forwarded(&state, &headers, "POST", route, &raw)?;
    let forwarded_signature = [("turnstile-signature", signature.unwrap_or_default())];
    let call = super::owner::Call {
        method: "POST",
        path: route,
        extra: &forwarded_signature,
        body: raw.to_vec(),
        forwarded,
    };
    if let Some(answer) = super::owner::elsewhere(&state, &body.order_id, call).await? {
        return Ok(answer);
    }
    let approved = matches!(body.status, Decision::Approved);
    crate::app::orders::payment_decided(&state, &body.order_id, &body.payment_id, approved).await?;
    Ok(received())
}

fn received() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "received": true }))
}
