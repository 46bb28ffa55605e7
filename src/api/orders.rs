//! `GET /v1/orders/{order_id}` and `POST /v1/orders/{order_id}/cancel`.

use super::checkout::order_body;
use super::products::path_error;
use super::{durable, json_response, path_id, ApiError, Shared};
use crate::domain::OrderId;
use crate::engine::order::OrderStatus;
use crate::engine::EngineError;
use crate::time::now_ms;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use std::sync::Arc;

pub(super) async fn get_order(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let order_id = path_id(raw, OrderId::parse)?;
    let order = state
        .engine
        .order(&order_id)
        .ok_or_else(|| ApiError::not_found(format!("no order {order_id}")))?;
    Ok(json_response(StatusCode::OK, order_body(&order)))
}

pub(super) async fn cancel_order(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let order_id = path_id(raw, OrderId::parse)?;
    let before = state.engine.order(&order_id).map(|o| o.status);
    let (order, ticket) = state
        .engine
        .cancel(&order_id, now_ms(), &*state.journal)
        .map_err(|error| match error {
            EngineError::UnknownOrder(id) => ApiError::not_found(format!("no order {id}")),
            other => ApiError::invalid(other.to_string()),
        })?;
    if let Some(ticket) = ticket {
        durable(&state, ticket).await?;
        // Money moves only once the change is durable.
        if let Some(payment_id) = order.payment_id.clone() {
            let gateway = Arc::clone(&state.gateway);
            let refund = order.status == OrderStatus::Refunded;
            let was_pending = before == Some(OrderStatus::PaymentPending);
            tokio::spawn(async move {
                let result = if refund {
                    gateway.refund(payment_id.clone()).await
                } else if was_pending {
                    gateway.void(payment_id.clone()).await
                } else {
                    Ok(())
                };
                if let Err(error) = result {
                    tracing::error!(%payment_id, %error, "gateway call after a cancel failed");
                }
            });
        }
    }
    Ok(json_response(StatusCode::OK, order_body(&order)))
}
