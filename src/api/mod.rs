//! The HTTP API of `docs/API.md`: routes, body parsing with exact validation, and the one
//! mapping from errors to the JSON error shape.

mod admin;
mod carts;
mod checkout;
mod events;
mod ops;
mod orders;
mod owner;
mod products;
mod queue;
pub(crate) mod webhooks;

use crate::app::orders::AppError;
use crate::app::CommitError;
pub use crate::app::{AppState, Shared};
use crate::engine::EngineError;
use crate::journal::JournalError;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest request body accepted (API.md).
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// Every route, for the metrics' labels.
pub const ROUTES: &[&str] = &[
    "/v1/products/{sku}",
    "/v1/products/{sku}/stream",
    "/v1/products/{sku}/queue",
    "/v1/queue/{ticket}",
    "/v1/carts",
    "/v1/carts/{cart_id}",
    "/v1/carts/{cart_id}/items/{sku}",
    "/v1/checkout",
    "/v1/orders/{order_id}",
    "/v1/orders/{order_id}/cancel",
    "/v1/webhooks/payment",
    "/v1/events",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/v1/admin/payments",
    "/v1/admin/holds",
    "/v1/admin/orders/{order_id}/release",
    "/v1/admin/journal",
    "/v1/cluster",
];

/// The router with every route of API.md.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/v1/products/{sku}",
            put(products::put_product).get(products::get_product),
        )
        .route("/v1/products/{sku}/stream", get(products::stream_product))
        .route("/v1/products/{sku}/queue", post(queue::take_ticket))
        .route("/v1/queue/{ticket}", get(queue::ticket_status))
        .route("/v1/carts", post(carts::create_cart))
        .route("/v1/carts/{cart_id}", get(carts::get_cart))
        .route("/v1/carts/{cart_id}/items/{sku}", put(carts::put_item))
        .route("/v1/checkout", post(checkout::checkout))
        .route("/v1/orders/{order_id}", get(orders::get_order))
        .route("/v1/orders/{order_id}/cancel", post(orders::cancel_order))
        .route("/v1/webhooks/payment", post(webhooks::payment_webhook))
        .route("/v1/events", get(events::list_events))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/v1/cluster", get(ops::cluster))
        .route("/v1/admin/payments", get(admin::payments))
        .route("/v1/admin/holds", get(admin::holds))
        .route("/v1/admin/orders/{order_id}/release", post(admin::release))
        .route("/v1/admin/journal", get(admin::journal))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            record_metrics,
        ))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            admin_gate,
        ))
        .with_state(state)
}

/// `/v1/admin` and everything under it, whatever the method: without `--admin-token` nothing
/// there exists (`404`); with it, a call without the token is `401` before routing answers (a
/// wrong method's `405` or an unknown path's `404` would tell an outsider what exists).
///
/// Every authorised desk call is logged at `info` when answered (method, path, status; never the
/// token or the query); a refused one is not, so a flood of wrong tokens cannot flood the log (the
/// `401`s are counted in `/metrics`).
async fn admin_gate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path != "/v1/admin" && !path.starts_with("/v1/admin/") {
        return next.run(request).await;
    }
    if let Err(refused) = admin::authorise(&state, request.headers()) {
        return refused.into_response();
    }
    let (method, path) = (request.method().clone(), path.to_owned());
    let response = next.run(request).await;
    tracing::info!(%method, %path, status = response.status().as_u16(), "admin: desk call answered");
    response
}

async fn record_metrics(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(crate::metrics::UNMATCHED_ROUTE, MatchedPath::as_str);
    let metrics = state.metrics.route(route);
    let response = next.run(request).await;
    metrics.record(response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

async fn unknown_route(State(state): State<Shared>) -> ApiError {
    state
        .metrics
        .route(crate::metrics::UNMATCHED_ROUTE)
        .record(404, 0.0);
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// Whether `headers` carry `Authorization: Bearer <token>`, compared in time that does not depend
/// on where the first difference is.
pub fn bears_token(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// The longest error message sent (bytes).
pub const MESSAGE_CHARS_MAX: usize = 512;

/// An error answer: `{"error": code, "message": text, ...extra}` with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The machine-readable code (API.md).
    pub code: &'static str,
    /// What happened, for people.
    pub message: String,
    /// One extra field (`sku`, `order_id`, `outcome`), if the code has one.
    pub extra: Option<(&'static str, String)>,
    /// Seconds for a `Retry-After` header, if the client should come back.
    pub retry_after_seconds: Option<u32>,
    /// The oldest event still kept (with `410 events_pruned`).
    pub first_seq: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sku: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_seq: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and message. A message longer than [`MESSAGE_CHARS_MAX`]
    /// is cut there: a message may quote the request (an unknown field's name), and an answer
    /// must not grow with what the client sent.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let mut message = message.into();
        // A service's own words may repeat a secret (`crate::secrets`).
        if let std::borrow::Cow::Owned(clean) = crate::secrets::scrub(&message) {
            message = clean;
        }
        if message.len() > MESSAGE_CHARS_MAX {
            let mut end = MESSAGE_CHARS_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Self {
            status,
            code,
            message,
            extra: None,
            retry_after_seconds: None,
            first_seq: None,
        }
    }

    /// Adds a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_seconds = Some(seconds);
        self
    }

    /// Adds the one extra field.
    pub fn with(mut self, field: &'static str, value: impl Into<String>) -> Self {
        self.extra = Some((field, value.into()));
        self
    }

    /// `400 invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// `404 not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// `503 session_store_unavailable` with `Retry-After`: Redis failed; nothing was changed.
    pub fn session_store_unavailable(error: &crate::sessions::redis::StoreError) -> Self {
        tracing::debug!(%error, "session store unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "session_store_unavailable",
            format!("the session store (Redis: carts and checkouts' idempotency keys) cannot serve this request now ({error}); retry later"),
        )
        .retry_after(1)
    }

    /// `500 internal`: a bug or a broken invariant, never the client's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(%message, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// `503 overloaded` with `Retry-After`: nothing was changed.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message).retry_after(1)
    }

    /// `503 overloaded` for want of room in `--response-bytes-max`: a read's answer replaced, or a
    /// write refused before it ran.
    pub fn answers_unread() -> Self {
        Self::overloaded(
            "the server holds as many answers not yet read by their clients as it may (--response-bytes-max); nothing was changed, retry later",
        )
    }

    /// The answer to a change the journal did not take. Only an error that knows the record is not
    /// durable says that nothing changed; otherwise the outcome is unknown and the client retries
    /// with the same key.
    pub fn journal_unavailable(error: &JournalError) -> Self {
        tracing::warn!(%error, "journal unavailable");
        match error {
            JournalError::Pruned { first_seq } => {
                let mut gone = Self::new(
                    StatusCode::GONE,
                    "events_pruned",
                    format!("events before seq {first_seq} are past --event-retention; resume from after={}", first_seq - 1),
                );
                gone.first_seq = Some(*first_seq);
                gone
            }
            JournalError::Overloaded(_) => {
                Self::overloaded(format!("{error}; nothing was changed, retry later"))
            }
            JournalError::Rejected(_) => {
                Self::internal(format!("{error}; nothing was changed"))
            }
            // Bad bytes in the journal's files (found by a read): an operator's matter.
            JournalError::Corrupt { .. } => Self::internal(error.to_string()),
            error if error.nothing_changed() => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "journal_unavailable",
                format!("the journal cannot record changes now ({error}); nothing was changed, retry later"),
            )
            .retry_after(1),
            error => Self::outcome_unknown(&error.to_string()),
        }
    }

    /// `503 journal_unavailable` with `"outcome": "unknown"`: the change may still become durable.
    pub fn outcome_unknown(reason: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal_unavailable",
            format!(
                "the change was not confirmed in time ({reason}); it may still take effect: read \
                 the resource, or send the same request again (a checkout with the same \
                 Idempotency-Key), to learn the outcome"
            ),
        )
        .with("outcome", "unknown")
        .retry_after(1)
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        let extra = |field: &str| {
            self.extra
                .as_ref()
                .filter(|(f, _)| *f == field)
                .map(|(_, v)| v.as_str())
        };
        serde_json::to_string(&ErrorBody {
            error: self.code,
            message: &self.message,
            sku: extra("sku"),
            order_id: extra("order_id"),
            outcome: extra("outcome"),
            first_seq: self.first_seq,
        })
        .unwrap_or_else(|_| format!("{{\"error\":\"{}\"}}", self.code))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, self.body());
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // A 408 means the server gave up on this connection (RFC 9110 §15.5.9): the rest of
            // the request may still be on its way, so the connection cannot carry another one.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A commit not confirmed: the journal's answer, or none in time (the outcome unknown).
impl From<CommitError> for ApiError {
    fn from(error: CommitError) -> Self {
        match error {
            CommitError::Journal(error) => Self::journal_unavailable(&error),
            CommitError::TimedOut(_) => Self::outcome_unknown(&error.to_string()),
        }
    }
}

/// A use case that did not happen, or may not have.
impl From<AppError> for ApiError {
    fn from(error: AppError) -> Self {
        match error {
            AppError::Engine(error) => error.into(),
            AppError::Commit(error) => error.into(),
            error @ AppError::ForeignPayment { .. } => Self::invalid(error.to_string()),
            AppError::Cluster(error) => error.into(),
        }
    }
}

/// Several nodes' bookkeeping in MySQL, as HTTP.
impl From<crate::cluster::ClusterError> for ApiError {
    fn from(error: crate::cluster::ClusterError) -> Self {
        use crate::cluster::ClusterError;
        match error {
            ClusterError::BelowCommitted {
                requested,
                committed,
            } => EngineError::StockBelowCommitted {
                requested,
                committed,
            }
            .into(),
            error @ (ClusterError::Database { .. } | ClusterError::Journal(_)) => {
                tracing::warn!(%error, "the cluster's tables in MySQL are unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "journal_unavailable",
                    format!("MySQL cannot record the change now ({error}); retry later"),
                )
                .retry_after(1)
            }
            error @ ClusterError::NotReturned { .. } => Self::overloaded(error.to_string()),
            error @ (ClusterError::Fenced(_) | ClusterError::Start(_)) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "journal_unavailable",
                format!("{error}; nothing was changed, retry on another node"),
            )
            .retry_after(1),
            error @ (ClusterError::Unreadable { .. } | ClusterError::Client(_)) => {
                Self::internal(error.to_string())
            }
        }
    }
}

/// The one mapping of the engine's refusals to HTTP.
impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::UnknownSku(sku) => Self::not_found(format!("no product {sku}")),
            EngineError::UnknownOrder(id) => Self::not_found(format!("no order {id}")),
            EngineError::OutOfStock { sku } => Self::new(
                StatusCode::CONFLICT,
                "out_of_stock",
                format!("not enough units of {sku}"),
            )
            .with("sku", sku.as_str()),
            EngineError::CustomerLimit { sku } => Self::new(
                StatusCode::CONFLICT,
                "customer_limit_reached",
                format!(
                    "this checkout would take the customer past the limit of units of {sku} per customer"
                ),
            )
            .with("sku", sku.as_str()),
            EngineError::MixedCurrency => Self::new(
                StatusCode::BAD_REQUEST,
                "mixed_currency",
                "the products of one checkout must share one currency",
            ),
            EngineError::StockBelowCommitted {
                requested,
                committed,
            } => Self::new(
                StatusCode::CONFLICT,
                "stock_below_committed",
                format!(
                    "stock {requested} is below the {committed} units already reserved or sold"
                ),
            ),
            EngineError::Busy(what) => Self::overloaded(format!(
                "{what} for too long; nothing was changed, retry later"
            )),
            error @ (EngineError::IllegalTransition(_) | EngineError::Inconsistent(_)) => {
                Self::internal(error.to_string())
            }
        }
    }
}

/// A JSON answer with a body already rendered.
pub fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Serialises `value` as the JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => json_response(status, body),
        Err(error) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("could not render the answer: {error}"),
        )
        .into_response(),
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request bodies are limited to {BODY_BYTES_MAX} bytes"),
    )
}

/// Reads the whole body of a write, at most [`BODY_BYTES_MAX`] bytes (`413` beyond), within the
/// slow-client timeout (`408 request_timeout` after it, and the connection is closed). Then asks
/// the byte budget once more whether the write may run (it was asked when the request began, but
/// a body may take its time: writes let in together while their bodies trickle must not answer
/// together past the bound): `503 overloaded`, nothing changed, if not.
pub async fn read_body(state: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let timeout = state.slow_client_timeout;
    let bytes = read_whole(timeout, body).await?;
    if !state.response_budget.admits_write() {
        return Err(ApiError::answers_unread());
    }
    Ok(bytes)
}

async fn read_whole(timeout: Duration, body: Body) -> Result<axum::body::Bytes, ApiError> {
    tokio::time::timeout(timeout, axum::body::to_bytes(body, BODY_BYTES_MAX))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {timeout:?}; the connection is closed"
                ),
            )
        })?
        .map_err(|error| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
            while let Some(current) = source {
                if current.is::<http_body_util::LengthLimitError>() {
                    return too_large();
                }
                source = current.source();
            }
            ApiError::invalid(format!("could not read the request body: {error}"))
        })
}

/// Parses a JSON body exactly: unknown fields, wrong types and out-of-range values are `400`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// Checks the `Content-Length` header before reading, so an oversized body is refused at once.
pub fn check_length(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > BODY_BYTES_MAX as u64 => Err(too_large()),
        _ => Ok(()),
    }
}

/// Parses a path segment into a domain id (`400` if it breaks the id rule).
pub fn path_id<T>(
    raw: String,
    parse: fn(String) -> Result<T, crate::domain::InvalidValue>,
) -> Result<T, ApiError> {
    parse(raw).map_err(|e| ApiError::invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderId, Sku};
    use crate::engine::order::{IllegalTransition, OrderStatus};

    #[test]
    fn internal_engine_errors_are_500_and_the_clients_own_are_4xx() {
        // Proves: an engine error the client could not cause is `500 internal`, never a `400`.
        let illegal = EngineError::IllegalTransition(IllegalTransition {
            from: OrderStatus::Released,
            to: OrderStatus::Paid,
        });
        for internal in [illegal, EngineError::Inconsistent("x".into())] {
            let error = ApiError::from(internal);
            assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(error.code, "internal");
        }
        let sku = Sku::parse("a").unwrap();
        let order = OrderId::parse("o").unwrap();
        for (error, status) in [
            (EngineError::UnknownSku(sku.clone()), StatusCode::NOT_FOUND),
            (EngineError::UnknownOrder(order), StatusCode::NOT_FOUND),
            (EngineError::OutOfStock { sku }, StatusCode::CONFLICT),
            (EngineError::MixedCurrency, StatusCode::BAD_REQUEST),
            (
                EngineError::Busy("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ] {
            assert_eq!(ApiError::from(error).status, status);
        }
    }

    #[test]
    fn a_message_quoting_the_request_is_cut_to_its_limit() {
        // Proves: an error quoting a 60 KB field name answers at most the limit (plus the cut
        // mark), so a refusal never grows with what the client sent.
        let quoted = format!("unknown field `{}`", "é".repeat(30_000));
        let error = ApiError::invalid(quoted);
        assert!(error.message.len() <= MESSAGE_CHARS_MAX + '…'.len_utf8());
        assert!(error.message.ends_with('…'));
        assert!(error.body().len() < 1_024);
    }

    #[test]
    fn only_a_known_outcome_says_nothing_changed() {
        // Proves: an unknown outcome is reported as such, with Retry-After; a known failure is not.
        let unknown = ApiError::journal_unavailable(&JournalError::Unknown("x".into()));
        assert_eq!(unknown.extra, Some(("outcome", "unknown".to_owned())));
        assert!(unknown.retry_after_seconds.is_some());
        let known = ApiError::journal_unavailable(&JournalError::Closed);
        assert_eq!(known.extra, None);
        assert!(known.message.contains("nothing was changed"));
        let pruned = ApiError::journal_unavailable(&JournalError::Pruned { first_seq: 9 });
        assert_eq!(pruned.status, StatusCode::GONE);
        assert!(pruned.body().contains("\"first_seq\":9"));
    }
}
