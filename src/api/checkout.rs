//! `POST /v1/checkout`: validate, claim the idempotency key, hold every item (lock-free; a sold-out
//! SKU is refused here without a disk write), authorise the payment, journal the order with its
//! events and its answer in one record, and only then answer.
//!
//! A refusal (`404`, `409 out_of_stock`) is kept in the key table's bounded rejection map, to be
//! replayed under its key; the `409`'s body is the SKU's refusal rendered once
//! (`Engine::refusal`), so the flash sale's flood shares one body instead of rendering one each.
//!
//! With Redis (`--redis-url`) one round trip comes first: the answer any node gave under the key
//! (replayed here), else the submission lock (`409` while another node runs the key), and the
//! cart. From the node's own key table to the hold everything is synchronous, so a client that
//! disconnects cannot leave a key in flight (a lock taken is released by its guard); the rest runs
//! in its own task, so it finishes even if the client goes away. Past the hold the lock is renewed
//! (`Submission::keep_alive`) until the outcome is known: released, with the answer stored, once
//! the record is durable; released without one once it is known not to be; renewed for the life
//! of the process if the journal cannot tell (`sessions::redis`). With Redis unreachable a
//! checkout answers `503 session_store_unavailable`: no node can know that another does not run
//! the key (`--redis-optional`, for one node, lets checkouts naming their items go on).

use super::{check_length, json_response, parse_json, read_body, ApiError, Shared};
use crate::app::{commit, Settlement};
use crate::domain::{CartId, CustomerId, IdempotencyKey, Quantity, Sku};
use crate::engine::idempotency::{digest_text, Begin, Fingerprint, Fingerprinted, KeyError};
use crate::engine::order::{Order, OrderStatus};
use crate::engine::records::StoredAnswer;
use crate::engine::{AnswerSpec, Applied, EngineError, NewOrder, PaymentOutcome, Reservation};
use crate::payment::{Authorization, AuthorizeRequest, PaymentError};
use crate::sessions::redis::{Begin as RemoteBegin, StoreError, Submission};
use crate::sessions::Carts;
use crate::time::{now_ms, rfc3339};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The most lines one checkout may have (API.md).
pub const LINES_MAX: usize = 100;

/// How long an answer that placed nothing (`404`, `409 out_of_stock`) is kept in Redis.
const REJECTION_IN_REDIS_MS: i64 = 60_000;

/// The longest payment token accepted.
const TOKEN_CHARS_MAX: usize = 255;

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    sku: Sku,
    quantity: Quantity,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    #[serde(default)]
    cart_id: Option<CartId>,
    #[serde(default)]
    items: Option<Vec<LineBody>>,
    customer_id: CustomerId,
    payment_token: String,
}

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

fn answer(status: u16, body: impl Into<Body>, replayed: bool) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, body);
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

fn key_in_use() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_in_use",
        "a request with this Idempotency-Key is still running",
    )
}

fn key_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this Idempotency-Key was used with another request",
    )
}

/// Keeps an answer that placed nothing (bounded map, and Redis for as long), counts it by its
/// status (`404` not found, `409` out of stock), and sends it. `body`
/// is the error's body, rendered once per SKU for a refusal of stock (`Engine::refusal`).
fn reject(
    state: &Shared,
    key: &IdempotencyKey,
    fingerprint: u128,
    submission: Option<Submission>,
    status: StatusCode,
    body: Bytes,
) -> Response {
    let status = status.as_u16();
    let counter = match status {
        409 => &state.metrics.rejections_out_of_stock,
        _ => &state.metrics.rejections_not_found,
    };
    counter.add(1);
    let at_ms = now_ms();
    if let Some(submission) = submission {
        let stored = StoredAnswer {
            fingerprint: digest_text(fingerprint),
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            at_ms,
        };
        // Kept in Redis for a minute at most: a sold-out flood writes one per request, and Redis
        // must not fill with them (this node's bounded map keeps them longer).
        let ttl_ms = state
            .engine
            .config()
            .rejections
            .age_ms_max
            .min(REJECTION_IN_REDIS_MS);
        submission.finish(stored, ttl_ms);
    }
    state
        .engine
        .idempotency()
        .finish_rejected(key, fingerprint, status, body.clone(), at_ms);
    answer(status, body, false)
}

/// [`reject`] with the body `error` renders.
fn reject_with(
    state: &Shared,
    key: &IdempotencyKey,
    fingerprint: u128,
    submission: Option<Submission>,
    error: ApiError,
) -> Response {
    let body = Bytes::from(error.body());
    reject(state, key, fingerprint, submission, error.status, body)
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
    check_length(&headers)?;
    let mut request: CheckoutBody = parse_json(&read_body(&state, body).await?)?;
    let lines_given = match (&request.cart_id, &request.items) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("give either cart_id or items, not both"))
        }
        (None, None) => return Err(ApiError::invalid("give cart_id or items")),
        (None, Some(items)) if items.is_empty() || items.len() > LINES_MAX => {
            return Err(ApiError::invalid(format!(
                "items: must hold 1 to {LINES_MAX} lines"
            )))
        }
        (_, items) => items.is_some(),
    };
    let token = &request.payment_token;
    if token.is_empty()
        || token.len() > TOKEN_CHARS_MAX
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::invalid(format!(
            "payment_token: must be 1 to {TOKEN_CHARS_MAX} visible ASCII characters"
        )));
    }
    // The fingerprint is taken of the parsed request re-serialised, so field order and white
    // space do not make two requests different.
    let fingerprint = Fingerprint::of(&request);

    // With Redis, one round trip first: the answer any node gave under this key, else the
    // submission lock, and the cart. Before the node's own key table, so a client gone while it
    // runs leaves no key in flight here (the lock's guard releases it).
    let mut submission = None;
    // Whether `submission` holds the lock (not so for a checkout that went on without Redis).
    let mut lock_held = false;
    let mut redis_cart = None;
    if let Some(store) = state.carts.store() {
        // An order this node placed under the key is its answer, whatever Redis holds: a node
        // cut off from Redis past its lock's life may find another node's answer there.
        match state
            .engine
            .idempotency()
            .placed_answer(&key, &fingerprint, now_ms())
        {
            Some(Ok(stored)) => {
                state.metrics.replays.add(1);
                return Ok(answer(stored.status, stored.body, true));
            }
            Some(Err(_)) => return Err(key_reused()),
            None => {}
        }
        let cart = request
            .cart_id
            .as_ref()
            .map(|id| (id, now_ms(), state.carts.idle_ms()));
        let lock = store.submission(&key);
        match store.begin(&lock, cart).await {
            Ok(RemoteBegin::Answer(stored)) => {
                lock.keep();
                return if fingerprint.matches(&stored.fingerprint) {
                    state.metrics.replays.add(1);
                    Ok(answer(stored.status, stored.body, true))
                } else {
                    Err(key_reused())
                };
            }
            Ok(RemoteBegin::Held) => {
                lock.keep();
                return Err(key_in_use());
            }
            Ok(RemoteBegin::Locked(lines)) => {
                submission = Some(lock);
                lock_held = true;
                redis_cart = lines;
            }
            // With `--redis-optional` (one node) a checkout naming its items goes on without
            // Redis: this node's key table and journal keep the key unique here. The lock is kept
            // all the same: a call that timed out may have taken it after all, and the answer
            // must reach Redis (the lock released) once it is back.
            Err(error @ StoreError::Unavailable(_)) if lines_given && state.redis_optional => {
                tracing::debug!(%error, "checkout without a submission lock");
                store.count_fallback();
                submission = Some(lock);
            }
            // Otherwise nothing goes on without the lock: another node may be running this key,
            // and no node can know it did not (the lock, if the call took it after all, is
            // released). A cart lives only in Redis anyway.
            Err(error @ StoreError::Unavailable(_)) => {
                return Err(ApiError::session_store_unavailable(&error))
            }
            Err(error @ StoreError::Unexpected { .. }) => {
                return Err(ApiError::internal(error.to_string()))
            }
        }
    }

    match state
        .engine
        .idempotency()
        .begin(&key, &fingerprint, now_ms())
    {
        Ok(Begin::Started) => {}
        Ok(Begin::Replay(stored)) => {
            state.metrics.replays.add(1);
            return Ok(answer(stored.status, stored.body, true));
        }
        Err(KeyError::InUse) => return Err(key_in_use()),
        Err(KeyError::Reused) => return Err(key_reused()),
    }
    let fingerprint = fingerprint.digest();

    let lines: Vec<(Sku, Quantity)> = if lines_given {
        // Moved, not copied: the lines' allocation becomes the reservation's request.
        request
            .items
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(|line| (line.sku, line.quantity))
            .collect()
    } else {
        let cart = match (state.carts.store(), &request.cart_id) {
            (Some(_), _) => redis_cart,
            (None, Some(id)) => match &state.carts {
                Carts::Memory(carts) => carts.get(id, now_ms()).ok().map(|cart| cart.items),
                Carts::Redis { .. } => None,
            },
            (None, None) => None,
        };
        match cart {
            None => {
                return Ok(reject_with(
                    &state,
                    &key,
                    fingerprint,
                    submission,
                    ApiError::not_found("no such cart, or it expired"),
                ));
            }
            Some(items) if items.is_empty() => {
                state.engine.idempotency().abandon(&key);
                return Err(ApiError::invalid("the cart is empty"));
            }
            Some(items) => {
                let mut lines = Vec::with_capacity(items.len());
                for (sku, quantity) in items {
                    match Quantity::parse(quantity) {
                        Ok(quantity) => lines.push((sku, quantity)),
                        Err(e) => {
                            state.engine.idempotency().abandon(&key);
                            return Err(ApiError::invalid(e.to_string()));
                        }
                    }
                }
                lines
            }
        }
    };

    let reservation = match state.engine.reserve(&lines) {
        Ok(reservation) => reservation,
        Err(EngineError::OutOfStock { sku }) => {
            let error = || ApiError::from(EngineError::OutOfStock { sku: sku.clone() });
            // The SKU's refusal, rendered once (the flood's answers share its body).
            return Ok(match state.engine.refusal(&sku, || error().body()) {
                Some(body) => reject(
                    &state,
                    &key,
                    fingerprint,
                    submission,
                    StatusCode::CONFLICT,
                    Bytes::from_static(body),
                ),
                None => reject_with(&state, &key, fingerprint, submission, error()),
            });
        }
        Err(error @ EngineError::UnknownSku(_)) => {
            return Ok(reject_with(
                &state,
                &key,
                fingerprint,
                submission,
                error.into(),
            ));
        }
        Err(other) => {
            state.engine.idempotency().abandon(&key);
            return Err(other.into());
        }
    };
    // No payment for an order that cannot be recorded now: with the journal down or full, give
    // the units back and say so (a rejection above needed no journal, so the flood stays cheap).
    let ready = state
        .journal
        .health()
        .map_err(|e| ApiError::journal_unavailable(&e))
        .and_then(|()| match &state.relay {
            Some(relay) => relay.admit().map_err(ApiError::overloaded),
            None => Ok(()),
        });
    let permit = ready.and_then(|()| {
        Arc::clone(&state.checkouts_in_flight)
            .try_acquire_owned()
            .map_err(|_| ApiError::overloaded("too many checkouts in flight; retry later"))
    });
    let permit = match permit {
        Ok(permit) => permit,
        Err(error) => {
            state.engine.release_reservation(reservation);
            state.engine.idempotency().abandon(&key);
            return Err(error);
        }
    };
    state.metrics.reservations.add(1);
    // From here the checkout authorises and commits, which may take long (a commit whose outcome
    // is unknown lands when the database is back): its lock is renewed until the outcome is known.
    if let Some(submission) = submission.as_mut().filter(|_| lock_held) {
        submission.keep_alive();
    }

    let finishing = Finishing {
        state: Arc::clone(&state),
        key,
        fingerprint: digest_text(fingerprint),
        reservation,
        customer_id: request.customer_id,
        token: request.payment_token,
        cart_id: request.cart_id,
        submission,
        _permit: permit,
    };
    tokio::spawn(finishing.run()).await.map_err(|error| {
        ApiError::internal(format!(
            "the checkout failed unexpectedly ({error}); retry with the same Idempotency-Key"
        ))
    })
}

/// The part of a checkout after the hold: payment, journal, answer.
struct Finishing {
    state: Shared,
    key: IdempotencyKey,
    fingerprint: String,
    reservation: Reservation,
    customer_id: CustomerId,
    token: String,
    cart_id: Option<CartId>,
    /// The Redis submission lock, when taken.
    submission: Option<Submission>,
    /// Held until the checkout is answered.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// How the payment went, and the answer that goes with it.
enum Paid {
    Approved(String),
    Pending(String),
    Declined(String),
    TimedOut,
}

impl Finishing {
    async fn run(self) -> Response {
        let state = &self.state;
        let period =
            crate::payment::checkout_period(now_ms(), state.engine.config().answer_retention_ms);
        let gateway_key = crate::payment::gateway_key(&state.node, &self.key, period);
        let order_id = crate::payment::order_id_for(&self.key, period)
            .unwrap_or_else(|| state.engine.new_order_id());
        let request = AuthorizeRequest {
            idempotency_key: gateway_key,
            order_id: order_id.as_str().to_owned(),
            token: self.token.clone(),
            amount_cents: self.reservation.total_cents(),
            currency: self.reservation.currency().as_str().to_owned(),
        };
        // Until its commit settles, the orphan scan leaves this checkout's authorisation alone.
        state.settler.checkout_started(&order_id);
        let settled_id = order_id.clone();
        let started = std::time::Instant::now();
        let authorised =
            tokio::time::timeout(state.gateway_timeout, state.gateway.authorize(request)).await;
        crate::fault::pause_at("after_authorize").await;
        let metrics = &state.metrics;
        metrics
            .gateway_authorize_seconds
            .record(started.elapsed().as_secs_f64());
        let paid = match authorised {
            Ok(Ok(Authorization::Approved { payment_id })) => Paid::Approved(payment_id),
            Ok(Ok(Authorization::Pending { payment_id })) => Paid::Pending(payment_id),
            Ok(Ok(Authorization::Declined { payment_id })) => Paid::Declined(payment_id),
            Ok(Err(PaymentError::Timeout)) | Err(_) => Paid::TimedOut,
            // Whatever the gateway may have done is for the reconciler to find and void.
            Ok(Err(error)) => {
                tracing::warn!(%error, "payment gateway failed");
                Paid::TimedOut
            }
        };
        let outcome_index = match &paid {
            Paid::Approved(_) => 0,
            Paid::Pending(_) => 1,
            Paid::Declined(_) => 2,
            Paid::TimedOut => 3,
        };
        metrics.gateway_outcomes[outcome_index].add(1);
        let outcome = match &paid {
            Paid::Approved(id) => PaymentOutcome::Authorized {
                payment_id: id.clone(),
            },
            Paid::Pending(id) => PaymentOutcome::Pending {
                payment_id: id.clone(),
            },
            Paid::Declined(id) => PaymentOutcome::Failed {
                payment_id: Some(id.clone()),
            },
            Paid::TimedOut => PaymentOutcome::Failed { payment_id: None },
        };
        let render = |order: &Order| -> (u16, String) {
            match (&paid, order.status) {
                (Paid::Declined(_), _) => {
                    let error = ApiError::new(
                        StatusCode::PAYMENT_REQUIRED,
                        "payment_declined",
                        "the payment was declined; the stock was released",
                    )
                    .with("order_id", order.order_id.as_str());
                    (402, error.body())
                }
                (Paid::TimedOut, _) => {
                    let error = ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "payment_gateway_timeout",
                        "the payment gateway did not answer in time; the order was released",
                    )
                    .with("order_id", order.order_id.as_str());
                    (504, error.body())
                }
                (_, OrderStatus::PaymentPending) => (202, order_body(order)),
                _ => (201, order_body(order)),
            }
        };
        let (change, stored) = state.engine.place_order(
            NewOrder {
                order_id,
                reservation: self.reservation,
                customer_id: self.customer_id,
                outcome,
            },
            Some(AnswerSpec {
                key: &self.key,
                fingerprint: &self.fingerprint,
                render: &render,
            }),
            now_ms(),
        );
        let Some(stored) = stored else {
            state.settler.checkout_settled(&settled_id);
            return ApiError::internal("the answer was not rendered").into_response();
        };
        let cart_id = self.cart_id;
        // The record carries the order, its events and this answer: once it is durable the engine
        // shows the order and replays the answer under the key, and the capture it owes follows
        // (`money`); if the journal did not take it, the engine frees the units and the key, and
        // the authorisation waits for the client's retry (or the reconciler's orphan scan).
        let follow = move |app: &Shared, outcome: &Settlement| match outcome {
            Ok(Applied::Order { order, .. }) => {
                if matches!(
                    order.status,
                    OrderStatus::Paid | OrderStatus::PaymentPending
                ) {
                    if let Some(cart_id) = &cart_id {
                        app.carts.clear(cart_id, now_ms());
                    }
                }
            }
            Ok(Applied::Product(..) | Applied::Payments(_)) => {}
            // Not voided here: the client was told "nothing changed, retry", and its retry (same
            // key, same gateway key) finds this authorisation and makes it the order's; one never
            // retried is voided by the reconciler's orphan scan after `--reconcile-after`.
            Err(_) => {}
        };
        let submission = self.submission;
        let shared = stored.clone();
        let committed = commit(state, change, move |app, outcome| {
            // Durable and known, or known not to be; an unknown outcome (the record may be
            // durable) keeps the authorisation out of the orphan scan until a restart.
            let known = outcome
                .as_ref()
                .map_or_else(|e| e.nothing_changed(), |_| true);
            if known {
                app.settler.checkout_settled(&settled_id);
            }
            // Redis gets the answer once it is durable, for any node to replay; a change known
            // not to be durable frees the lock (the guard's drop); one whose outcome stays
            // unknown keeps it renewed while this process lives, so no other node starts the
            // checkout again meanwhile.
            if let Some(submission) = submission {
                match outcome {
                    Ok(_) => {
                        let retention = app.engine.config().answer_retention_ms;
                        let ttl_ms = shared.at_ms + retention - now_ms();
                        submission.finish(shared, ttl_ms);
                    }
                    Err(_) if known => drop(submission),
                    Err(_) => submission.hold_until_restart(),
                }
            }
            follow(app, outcome);
        })
        .await;
        match committed {
            Ok(_) => answer(stored.status, stored.body, false),
            Err(error) => ApiError::from(error).into_response(),
        }
    }
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;

    /// The fingerprint of a parsed checkout body is the one pinned in `engine::idempotency` (kept
    /// durably with orders): field order, white space and an explicit `null` make no difference,
    /// and moving the items out afterwards does not change what was taken.
    #[test]
    fn a_checkout_bodys_fingerprint_is_the_pinned_one() {
        const PINNED: &str = "072a091d8e5a078426313cbbc8f9181b";
        for raw in [
            r#"{"items":[{"sku":"sku-1","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}"#,
            r#"{ "payment_token" : "tok_ok", "customer_id":"c", "cart_id": null,
                 "items":[{"quantity":1,"sku":"sku-1"}] }"#,
            r#"{"items":[{"sku":"sku\u002d1","quantity":1}],"customer_id":"\u0063","payment_token":"tok_ok"}"#,
        ] {
            let mut body: CheckoutBody = serde_json::from_str(raw).unwrap();
            let fingerprint = Fingerprint::of(&body);
            assert_eq!(fingerprint.text(), PINNED, "{raw}");
            assert!(fingerprint.matches(PINNED));
            let digest = fingerprint.digest();
            assert_eq!(digest_text(digest), PINNED);
            let _ = body.items.take();
            assert_ne!(Fingerprint::of(&body).text(), PINNED);
        }
        // Another request is another fingerprint.
        let other: CheckoutBody = serde_json::from_str(
            r#"{"items":[{"sku":"sku-1","quantity":2}],"customer_id":"c","payment_token":"tok_ok"}"#,
        )
        .unwrap();
        assert!(!Fingerprint::of(&other).matches(PINNED));
    }
}
