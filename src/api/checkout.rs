//! `POST /v1/checkout`: the HTTP door to placing an order (`app::checkout`): the key and the body
//! parsed and checked here, the order placed there, its answer rendered here ([`HttpAnswers`]: the
//! one rendering the key keeps and replays) with `Idempotent-Replayed: true` on a replay.

use super::{check_length, json_response, parse_json, read_body, ApiError, Shared};
use crate::app::checkout::{place, Answer, Answers, CheckoutError, Kept, Request};
use crate::connections::ChangedNothing;
use crate::domain::IdempotencyKey;
use crate::engine::order::{Order, OrderStatus};
use crate::sessions::redis::StoreError;
use crate::time::rfc3339;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Serialize;

#[derive(Serialize)]
struct ItemView<'a> {
    sku: &'a str,
    quantity: i64,
    unit_price_cents: i64,
}

#[derive(Serialize)]
struct OrderView<'a> {
    order_id: &'a str,
    status: &'a str,
    customer_id: &'a str,
    items: Vec<ItemView<'a>>,
    total_cents: i64,
    currency: &'a str,
    created_at: String,
}

/// The order as the API shows it.
pub fn order_body(order: &Order) -> String {
    let view = OrderView {
        order_id: order.order_id.as_str(),
        status: order.status.as_str(),
        customer_id: order.customer_id.as_str(),
        items: order
            .items
            .iter()
            .map(|item| ItemView {
                sku: item.sku.as_str(),
                quantity: item.quantity,
                unit_price_cents: item.unit_price_cents.get(),
            })
            .collect(),
        total_cents: order.total_cents,
        currency: order.currency.as_str(),
        created_at: rfc3339(order.created_at_ms),
    };
    serde_json::to_string(&view).unwrap_or_default()
}

fn answer(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, answer.body);
    if answer.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        // A replay tells of a change made before: refused, it can be asked again.
        response.extensions_mut().insert(ChangedNothing);
    }
    response
}

/// The answers a checkout keeps under its key, in the contract's shapes.
pub struct HttpAnswers;

impl Answers for HttpAnswers {
    fn render(&self, kept: Kept<'_>) -> (u16, String) {
        let error = match kept {
            Kept::Placed(order) if order.status == OrderStatus::PaymentPending => {
                return (202, order_body(order))
            }
            Kept::Placed(order) => return (201, order_body(order)),
            Kept::Declined(order) => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment_declined",
                "the payment was declined; the stock was released",
            )
            .with("order_id", order.order_id.as_str()),
            Kept::GatewayTimedOut(order) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "payment_gateway_timeout",
                "the payment gateway did not answer in time; the order was released",
            )
            .with("order_id", order.order_id.as_str()),
            Kept::Refused(error) => ApiError::from(error.clone()),
            Kept::NoCart => ApiError::not_found("no such cart, or it expired"),
        };
        (error.status.as_u16(), error.body())
    }
}

impl From<CheckoutError> for ApiError {
    fn from(error: CheckoutError) -> Self {
        match error {
            CheckoutError::Invalid(message) => Self::invalid(message),
            CheckoutError::KeyInUse => Self::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still running",
            ),
            CheckoutError::KeyReused => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with another request",
            ),
            CheckoutError::SessionStore(error @ StoreError::Unavailable(_)) => {
                Self::session_store_unavailable(&error)
            }
            CheckoutError::SessionStore(error @ StoreError::Unexpected { .. }) => {
                Self::internal(error.to_string())
            }
            CheckoutError::Engine(error) => error.into(),
            CheckoutError::JournalUnavailable(error) => Self::journal_unavailable(&error),
            CheckoutError::Overloaded(message) => Self::overloaded(message),
            CheckoutError::Commit(error) => error.into(),
            CheckoutError::Internal(message) => Self::internal(message),
            CheckoutError::QueueRequired(message) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_required", message).retry_after(1)
            }
            CheckoutError::InvalidTicket(message) => {
                Self::new(StatusCode::FORBIDDEN, "invalid_ticket", message)
            }
        }
    }
}

pub(super) async fn checkout(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut keys = headers.get_all("idempotency-key").iter();
    let key = keys
        .next()
        .ok_or_else(|| ApiError::invalid("the Idempotency-Key header is required"))?;
    // A second key would be ignored, and a bad one among them must not pass unseen behind a
    // good one.
    if keys.next().is_some() {
        return Err(ApiError::invalid(
            "Idempotency-Key: give exactly one, not several",
        ));
    }
    let key = key
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key: must be visible ASCII characters"))
        .and_then(|raw| IdempotencyKey::parse(raw).map_err(|e| ApiError::invalid(e.to_string())))?;
    // A ticket that is not text cannot be one this shop signed: judged as forged.
    let ticket = headers
        .get("admission-ticket")
        .map(|value| value.to_str().unwrap_or("\u{0}"));
    check_length(&headers)?;
    let request: Request = parse_json(&read_body(&state, body).await?)?;
    static ANSWERS: HttpAnswers = HttpAnswers;
    Ok(answer(place(&state, key, request, ticket, &ANSWERS).await?))
}
