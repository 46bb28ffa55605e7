//! `GET /v1/orders/{order_id}` and `POST /v1/orders/{order_id}/cancel`.

use super::checkout::order_body;
use super::products::path_error;
use super::{json_response, path_id, ApiError, Shared};
use crate::connections::ChangedNothing;
use crate::domain::OrderId;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

pub(super) async fn get_order(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let order_id = path_id(raw, OrderId::parse)?;
    let order = crate::app::orders::find(&state, &order_id)
        .await
        .map_err(|e| ApiError::journal_unavailable(&e))?;
    match order {
        Some(order) => Ok(json_response(StatusCode::OK, order_body(&order))),
        None => Err(super::owner::not_found(&state, &order_id).await),
    }
}

pub(super) async fn cancel_order(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let order_id = path_id(raw, OrderId::parse)?;
    // Several nodes: another node's order is cancelled by its owner.
    let route = format!("/v1/orders/{order_id}/cancel");
    let forwarded = super::owner::forwarded(&state, &headers, "POST", &route, b"")?;
    let call = super::owner::Call {
        method: "POST",
        path: &route,
        extra: &[],
        body: Vec::new(),
        forwarded,
    };
    if let Some(answer) = super::owner::elsewhere(&state, &order_id, call).await? {
        return Ok(answer);
    }
    let (order, changed) = match crate::app::orders::cancel(&state, &order_id).await {
        Err(crate::app::orders::AppError::Engine(crate::engine::EngineError::UnknownOrder(_))) => {
            return Err(super::owner::not_found(&state, &order_id).await)
        }
        other => other?,
    };
    let mut response = json_response(StatusCode::OK, order_body(&order));
    if !changed {
        response.extensions_mut().insert(ChangedNothing);
    }
    Ok(response)
}
