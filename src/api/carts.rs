//! `POST /v1/carts`, `GET /v1/carts/{cart_id}`, `PUT /v1/carts/{cart_id}/items/{sku}`.

use super::products::path_error;
use super::{check_length, json, parse_json, path_id, read_body, ApiError, Shared};
use crate::domain::{CartId, Sku, QUANTITY_MAX};
use crate::sessions::{CartError, CartView};
use crate::time::{now_ms, rfc3339};
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct ItemView<'a> {
    sku: &'a str,
    quantity: i64,
}

#[derive(Serialize)]
struct CartBody<'a> {
    cart_id: &'a str,
    items: Vec<ItemView<'a>>,
    expires_at: String,
}

fn render(status: StatusCode, cart: &CartView) -> Response {
    json(
        status,
        &CartBody {
            cart_id: cart.cart_id.as_str(),
            items: cart
                .items
                .iter()
                .map(|(sku, quantity)| ItemView {
                    sku: sku.as_str(),
                    quantity: *quantity,
                })
                .collect(),
            expires_at: rfc3339(cart.expires_at_ms),
        },
    )
}

pub(super) fn cart_error(error: CartError) -> ApiError {
    match error {
        CartError::NotFound => ApiError::not_found("no such cart, or it expired"),
        CartError::TooManyItems => ApiError::invalid(error.to_string()),
        CartError::Full(_) => ApiError::overloaded(error.to_string()),
        CartError::Store(error) => ApiError::session_store_unavailable(&error),
    }
}

pub(super) async fn create_cart(State(state): State<Shared>) -> Result<Response, ApiError> {
    let cart = state.carts.create(now_ms()).await.map_err(cart_error)?;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({
            "cart_id": cart.cart_id.as_str(),
            "expires_at": rfc3339(cart.expires_at_ms),
        }),
    ))
}

pub(super) async fn get_cart(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let cart_id = path_id(raw, CartId::parse)?;
    let cart = state
        .carts
        .get(&cart_id, now_ms())
        .await
        .map_err(cart_error)?;
    Ok(render(StatusCode::OK, &cart))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    quantity: i64,
}

pub(super) async fn put_item(
    State(state): State<Shared>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((raw_cart, raw_sku)) = path.map_err(path_error)?;
    let cart_id = path_id(raw_cart, CartId::parse)?;
    let sku = path_id(raw_sku, Sku::parse)?;
    check_length(&headers)?;
    let body: ItemBody = parse_json(&read_body(&state, body).await?)?;
    if !(0..=QUANTITY_MAX).contains(&body.quantity) {
        return Err(ApiError::invalid(format!(
            "quantity: must be between 0 and {QUANTITY_MAX}"
        )));
    }
    let now = now_ms();
    // An unknown cart is reported before an unknown SKU: the cart is the resource addressed. A
    // known SKU needs one call (the change says whether the cart exists).
    if state.engine.inventory().lookup(&sku).is_none() {
        state.carts.get(&cart_id, now).await.map_err(cart_error)?;
        return Err(ApiError::not_found(format!("no product {sku}")));
    }
    let cart = state
        .carts
        .set_item(&cart_id, &sku, body.quantity, now)
        .await
        .map_err(cart_error)?;
    Ok(render(StatusCode::OK, &cart))
}
