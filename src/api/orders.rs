//! `GET /v1/orders/{order_id}` and `POST /v1/orders/{order_id}/cancel`.

use super::checkout::order_body;
use super::products::path_error;
use super::{json_response, path_id, ApiError, Shared};
use crate::app::{commit, prepare_when_free};
use crate::domain::OrderId;
use crate::engine::{Applied, Prepared};
use crate::time::now_ms;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

pub(super) async fn get_order(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let order_id = path_id(raw, OrderId::parse)?;
    // Memory holds the live orders; one past --order-retention is asked of the store (MySQL).
    let order = match state.engine.order(&order_id) {
        Some(order) => Some(order),
        None => state
            .journal
            .order(&order_id)
            .await
            .map_err(|e| ApiError::journal_unavailable(&e))?,
    };
    let order = order.ok_or_else(|| ApiError::not_found(format!("no order {order_id}")))?;
    Ok(json_response(StatusCode::OK, order_body(&order)))
}

pub(super) async fn cancel_order(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let order_id = path_id(raw, OrderId::parse)?;
    let change =
        match prepare_when_free(&state, || state.engine.prepare_cancel(&order_id, now_ms())).await?
        {
            Prepared::Unchanged(order) => {
                return Ok(json_response(StatusCode::OK, order_body(&order)))
            }
            Prepared::Change(change) => change,
        };
    // Money moves only once the change is durable: the cancelled order owes a refund (or a void
    // if never captured), made by the settler after the commit (`money`).
    let applied = commit(&state, change, |_, _| {}).await?;
    match applied {
        Applied::Order { order, .. } => Ok(json_response(StatusCode::OK, order_body(&order))),
        Applied::Product(..) | Applied::Payments(_) => {
            Err(ApiError::internal("a cancel applied another change"))
        }
    }
}
