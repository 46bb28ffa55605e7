//! `PUT/GET /v1/products/{sku}`.
//!
//! `max_per_customer` (API.md, "Per-customer limit"): omitted in a `PUT`, the product keeps the
//! limit it has; `null` clears it; an integer from 1 sets it. One node counts in its engine
//! (`engine::customers`); several nodes share one count in Redis (`cluster::limits`).
//! `admission_rate` (API.md, "Waiting room"): omitted or `null`, no waiting room
//! (`app::waiting_room`).

use super::{check_length, json, parse_json, path_id, read_body, ApiError, Shared};
use crate::domain::{Cents, Currency, Sku, Stock};
use crate::engine::inventory::StockView;
use crate::engine::records::Product;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};

/// The longest product name accepted.
const NAME_CHARS_MAX: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductBody {
    name: String,
    price_cents: Cents,
    currency: Currency,
    stock: Stock,
    /// Omitted: `None` (keep the current limit); `null`: `Some(None)` (no limit).
    #[serde(default, deserialize_with = "present")]
    max_per_customer: Option<Option<u32>>,
    /// Omitted or `null`: no waiting room.
    #[serde(default)]
    admission_rate: Option<u32>,
}

/// A field that is present, `null` or not.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<u32>>, D::Error> {
    Option::<u32>::deserialize(deserializer).map(Some)
}

#[derive(Serialize)]
struct ProductView<'a> {
    sku: &'a str,
    name: &'a str,
    price_cents: i64,
    currency: &'a str,
    stock: i64,
    available: i64,
    reserved: i64,
    sold: i64,
    max_per_customer: Option<u32>,
    admission_rate: Option<u32>,
}

fn render(product: &Product, view: StockView) -> Response {
    json(
        StatusCode::OK,
        &ProductView {
            sku: product.sku.as_str(),
            name: &product.name,
            price_cents: product.price_cents.get(),
            currency: product.currency.as_str(),
            stock: view.stock,
            available: view.available,
            reserved: view.reserved,
            sold: view.sold,
            max_per_customer: product.max_per_customer,
            admission_rate: product.admission_rate,
        },
    )
}

/// Maps a path rejection to the JSON error shape.
pub(super) fn path_error(rejection: PathRejection) -> ApiError {
    ApiError::invalid(format!("invalid path: {rejection}"))
}

pub(super) async fn put_product(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let sku = path_id(raw, Sku::parse)?;
    check_length(&headers)?;
    let body: ProductBody = parse_json(&read_body(&state, body).await?)?;
    if body.name.is_empty() || body.name.chars().count() > NAME_CHARS_MAX {
        return Err(ApiError::invalid(format!(
            "name: must be 1 to {NAME_CHARS_MAX} characters"
        )));
    }
    if body.max_per_customer == Some(Some(0)) {
        return Err(ApiError::invalid(
            "max_per_customer: must be at least 1 (null: no limit)",
        ));
    }
    if body.admission_rate == Some(0) {
        return Err(ApiError::invalid(
            "admission_rate: must be at least 1 buyer per second (null: no waiting room)",
        ));
    }
    // Omitted: the engine keeps the limit the product has when it decides the change.
    let keep_limit = body.max_per_customer.is_none();
    let max_per_customer = body.max_per_customer.flatten();
    let product = Product {
        sku,
        name: body.name,
        price_cents: body.price_cents,
        currency: body.currency,
        stock: body.stock,
        max_per_customer,
        admission_rate: body.admission_rate,
    };
    let (product, view) = crate::app::orders::put_product(&state, product, keep_limit).await?;
    Ok(render(&product, view))
}

/// `GET /v1/products/{sku}/stream`: the product's counters as Server-Sent Events
/// ([`crate::app::streams`]). The stream counts against `--streams-max`; its connection is told a
/// stream runs on it (`ConnectionSlot::stream_started`: an HTTP/1 one leaves `--connections-max`).
pub(super) async fn stream_product(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    version: axum::http::Version,
    extensions: axum::http::Extensions,
) -> Result<Response, ApiError> {
    use crate::app::streams::{self, StreamError};
    let Path(raw) = path.map_err(path_error)?;
    let sku = path_id(raw, Sku::parse)?;
    let now = streams::counters(&state, &sku)
        .ok_or_else(|| ApiError::not_found(format!("no product {sku}")))?;
    let subscription = state.streams.subscribe(&sku, now).map_err(|e| match e {
        StreamError::Full(_) => ApiError::overloaded(e.to_string()),
        StreamError::Stopping => {
            ApiError::overloaded("the server is stopping; open the stream on another node")
        }
    })?;
    let on_connection = extensions
        .get::<crate::connections::ConnectionSlot>()
        .map(|slot| slot.stream_started(version < axum::http::Version::HTTP_2));
    Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "text/event-stream")
        .header(axum::http::header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(streams::body(
            subscription,
            on_connection,
        )))
        .map_err(|e| ApiError::internal(e.to_string()))
}

pub(super) async fn get_product(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let sku = path_id(raw, Sku::parse)?;
    let found = match &state.cluster {
        // Several nodes: the whole shop's counters.
        Some(cluster) => crate::cluster::catalogue::shop_view(cluster, &state.engine, &sku),
        None => state.engine.product(&sku),
    };
    let (product, view) = found.ok_or_else(|| ApiError::not_found(format!("no product {sku}")))?;
    Ok(render(&product, view))
}
