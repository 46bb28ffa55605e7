//! Placing an order: claim the idempotency key, hold every item (lock-free; a sold-out SKU is
//! refused here without a disk write), authorise the payment, journal the order with its events
//! and its answer in one record, and only then answer.
//!
//! The answer is kept under the key and replayed byte for byte, so it is rendered here, once, by
//! the door the request came in by ([`Answers`]: the HTTP layer's shapes). A refusal (`404`, `409
//! out_of_stock`) is kept in the key table's bounded rejection map; the `409`'s body is the SKU's
//! refusal rendered once (`Engine::refusal`), so the flash sale's flood shares one body instead of
//! rendering one each.
//!
//! With Redis (`--redis-url`) one round trip comes first: the answer any node gave under the key
//! (replayed), else the submission lock ([`CheckoutError::KeyInUse`] while another node runs the
//! key), and the cart. From the node's own key table to the hold everything is synchronous but the
//! refill from the shared pool (several nodes), which frees the key if dropped, so a caller that
//! goes away cannot leave a key in flight (a lock taken is released by its guard); the
//! rest runs in its own task, so it finishes even if the caller goes away. Past the hold the lock
//! is renewed (`Submission::keep_alive`) until the outcome is known: released, with the answer
//! stored, once the record is durable; released without one once it is known not to be; renewed
//! for the life of the process if the journal cannot tell (`sessions::redis`). With Redis
//! unreachable a checkout is refused ([`CheckoutError::SessionStore`]): no node can know that
//! another does not run the key (`--redis-optional`, for one node, lets checkouts naming their
//! items go on).

use super::{commit_guarded, CommitError, Settlement, Shared};
use crate::app::waiting_room::{Claimed, Ticket, TicketError};
use crate::cluster::limits::Allowance;
use crate::domain::{CartId, CustomerId, IdempotencyKey, OrderId, Quantity, Sku};
use crate::engine::idempotency::{digest_text, Begin, Fingerprint, Fingerprinted, KeyError};
use crate::engine::order::{Order, OrderStatus};
use crate::engine::{AnswerSpec, Applied, EngineError, NewOrder, PaymentOutcome, Reservation};
use crate::journal::JournalError;
use crate::payment::{Authorization, AuthorizeRequest, PaymentError};
use crate::sessions::redis::{Begin as RemoteBegin, StoreError, Submission};
use crate::sessions::Carts;
use crate::time::now_ms;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The most lines one checkout may have (API.md).
pub const LINES_MAX: usize = 100;

/// The longest payment token accepted.
const TOKEN_CHARS_MAX: usize = 255;

/// One line of a checkout naming its items.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// The product.
    pub sku: Sku,
    /// How many.
    pub quantity: Quantity,
}

/// A checkout as asked: a cart or the items, the customer, the payment token. Its fingerprint is
/// taken of it re-serialised (field order and white space in a body do not make two requests
/// different), so its fields and their order are part of the durable format: the fingerprint is
/// pinned by a test below.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The cart to buy.
    #[serde(default)]
    pub cart_id: Option<CartId>,
    /// Or the items to buy.
    #[serde(default)]
    pub items: Option<Vec<Line>>,
    /// Who buys.
    pub customer_id: CustomerId,
    /// The gateway's token for the payment.
    pub payment_token: String,
}

/// An answer kept under a key, to be given now and replayed as it is.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status (`201`, `202`, `402`, `404`, `409`, `504`).
    pub status: u16,
    /// The body as rendered by [`Answers`].
    pub body: Bytes,
    /// Whether this is a replay of an earlier answer under the key.
    pub replayed: bool,
}

impl Answer {
    fn new(status: u16, body: impl Into<Bytes>, replayed: bool) -> Self {
        Self {
            status,
            body: body.into(),
            replayed,
        }
    }
}

/// An outcome whose answer is kept under the key.
pub enum Kept<'a> {
    /// The order placed (paid, or its payment pending).
    Placed(&'a Order),
    /// The order released: the payment was declined.
    Declined(&'a Order),
    /// The order released: the gateway did not answer in time.
    GatewayTimedOut(&'a Order),
    /// Nothing placed: an unknown SKU or one out of stock.
    Refused(&'a EngineError),
    /// Nothing placed: no such cart, or it expired.
    NoCart,
}

/// How the door a checkout came in by renders the answers kept under its key.
pub trait Answers: Send + Sync {
    /// The status and body of `kept`.
    fn render(&self, kept: Kept<'_>) -> (u16, String);
}

/// Why a checkout was refused before it placed anything, or may not have been answered.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The request cannot be a checkout: nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// A request with this key is still running (here, or on another node).
    #[error("a request with this Idempotency-Key is still running")]
    KeyInUse,
    /// The key was used with another request.
    #[error("this Idempotency-Key was used with another request")]
    KeyReused,
    /// The session store (Redis) failed: nothing changed.
    #[error(transparent)]
    SessionStore(StoreError),
    /// The engine refused: nothing changed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The journal cannot take an order now: nothing changed (the hold is given back).
    #[error(transparent)]
    JournalUnavailable(JournalError),
    /// Too many checkouts in flight, or the event relay too far behind: nothing changed.
    #[error("{0}")]
    Overloaded(String),
    /// The order's commit was not confirmed: nothing changed, or the outcome is unknown.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A broken invariant.
    #[error("{0}")]
    Internal(String),
    /// A product of the checkout sells through its waiting room and no ticket came: nothing
    /// changed.
    #[error("{0}")]
    QueueRequired(String),
    /// The checkout's ticket is forged, expired, not admitted yet, another product's or used:
    /// nothing changed.
    #[error("{0}")]
    InvalidTicket(String),
}

impl From<TicketError> for CheckoutError {
    fn from(error: TicketError) -> Self {
        match error {
            TicketError::Required(why) => Self::QueueRequired(why),
            TicketError::Invalid(why) => Self::InvalidTicket(why),
            TicketError::Store(error) => Self::SessionStore(error),
        }
    }
}

/// The waiting room's judgement of a checkout naming `skus`, from its `Admission-Ticket` alone:
/// the ticket to claim when one of them sells through a waiting room (one such product per
/// checkout), `None` when none does. One lookup and one atomic load per line.
fn admission<'a>(
    app: &crate::app::AppState,
    skus: impl Iterator<Item = &'a Sku>,
    ticket: Option<&str>,
) -> Result<Option<Ticket>, CheckoutError> {
    let inventory = app.engine.inventory();
    let mut queued: Option<&Sku> = None;
    for sku in skus {
        let Some(index) = inventory.lookup(sku) else {
            continue;
        };
        if inventory.admission_rate(index).is_some() {
            match queued {
                Some(other) if other != sku => {
                    return Err(CheckoutError::Invalid(format!(
                        "{other} and {sku} each sell through a waiting room: check them out one at a time, each with its own Admission-Ticket"
                    )))
                }
                _ => queued = Some(sku),
            }
        }
    }
    let Some(sku) = queued else {
        return Ok(None);
    };
    Ok(Some(app.waiting_room.judge(
        sku,
        ticket,
        now_ms().saturating_mul(1000),
    )?))
}

/// The retention period a checkout under `key` runs in, and the id of the order it places.
fn order_naming(app: &crate::app::AppState, key: &IdempotencyKey) -> (i64, OrderId) {
    let period = crate::payment::checkout_period(now_ms(), app.engine.config().answer_retention_ms);
    let order_id =
        crate::payment::order_id_for(key, period).unwrap_or_else(|| app.engine.new_order_id());
    (period, order_id)
}

/// The units per product with `max_per_customer` that `lines` (SKU, units) take, merged per SKU,
/// with each limit.
fn limited_units<'a>(
    app: &crate::app::AppState,
    lines: impl Iterator<Item = (&'a Sku, i64)>,
) -> Vec<(Sku, i64, u32)> {
    let inventory = app.engine.inventory();
    let mut units: Vec<(Sku, i64, u32)> = Vec::new();
    for (sku, count) in lines {
        let Some(limit) = inventory
            .lookup(sku)
            .and_then(|index| inventory.max_per_customer(index))
        else {
            continue;
        };
        match units.iter_mut().find(|(s, ..)| s == sku) {
            Some((_, total, _)) => *total += count,
            None => units.push((sku.clone(), count, limit)),
        }
    }
    units
}

/// Whether `request` is one line of a SKU sold out as far as this node knows: its shards empty,
/// and with several nodes the pool empty and no live node holding units for sale.
fn sold_out_everywhere(app: &crate::app::AppState, request: &Request) -> bool {
    let Some([line]) = request.items.as_deref() else {
        return false;
    };
    let inventory = app.engine.inventory();
    inventory
        .lookup(&line.sku)
        .is_some_and(|index| inventory.is_sold_out(index))
        && app
            .cluster
            .as_ref()
            .is_none_or(|cluster| cluster.sold_out_everywhere(&line.sku))
}

/// A key this node's table holds in flight while a checkout waits (the refill from the shared
/// pool): abandoned if the wait is dropped, as a caller gone away drops it.
struct KeyInFlight<'a> {
    app: &'a Shared,
    key: &'a IdempotencyKey,
    armed: bool,
}

impl KeyInFlight<'_> {
    /// The wait is over: the checkout goes on with its key.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for KeyInFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.app.engine.idempotency().abandon(self.key);
        }
    }
}

/// Places the order `request` asks for under `key`, or replays the answer the key has: an
/// [`Answer`] is kept under the key (placed, declined, timed out, refused); an error kept nothing
/// (retry with the same key). `answers` renders the kept answers; it outlives the checkout, which
/// runs on in a task of its own past the hold.
pub async fn place(
    app: &Shared,
    key: IdempotencyKey,
    mut request: Request,
    ticket: Option<&str>,
    answers: &'static dyn Answers,
) -> Result<Answer, CheckoutError> {
    let lines_given = match (&request.cart_id, &request.items) {
        (Some(_), Some(_)) => {
            return Err(CheckoutError::Invalid(
                "give either cart_id or items, not both".into(),
            ))
        }
        (None, None) => return Err(CheckoutError::Invalid("give cart_id or items".into())),
        (None, Some(items)) if items.is_empty() || items.len() > LINES_MAX => {
            return Err(CheckoutError::Invalid(format!(
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
        return Err(CheckoutError::Invalid(format!(
            "payment_token: must be 1 to {TOKEN_CHARS_MAX} visible ASCII characters"
        )));
    }
    let fingerprint = Fingerprint::of(&request);
    // The waiting room judges the ticket of a checkout naming its items from the header alone. A
    // refusal is not kept and comes after the key's kept answer (a replay first), found as a
    // sold-out refusal finds it: no lock, no write.
    let (mut admitted, mut ticket_refused) = (None, None);
    if let Some(items) = &request.items {
        match admission(app, items.iter().map(|line| &line.sku), ticket) {
            Ok(judged) => admitted = judged,
            Err(refusal) => ticket_refused = Some(refusal),
        }
    }
    // A ticket claimed for this key, given back unless the checkout places an order.
    let mut claimed: Option<Claimed> = None;

    // With Redis, one round trip first: the answer any node gave under this key, else the
    // submission lock, and the cart. Before the node's own key table, so a caller gone while it
    // runs leaves no key in flight here (the lock's guard releases it).
    let mut submission = None;
    // Whether `submission` holds the lock (not so for a checkout that went on without Redis).
    let mut lock_held = false;
    let mut redis_cart = None;
    // A sold-out refusal that took no lock: should units come back meanwhile, the checkout
    // stops (`503`, retry) instead of going on unguarded.
    let mut unguarded = false;
    if let Some(store) = app.carts.store() {
        // An order this node placed under the key is its answer, whatever Redis holds: a node
        // cut off from Redis past its lock's life may find another node's answer there.
        match app
            .engine
            .idempotency()
            .placed_answer(&key, &fingerprint, now_ms())
        {
            Some(Ok(stored)) => {
                app.metrics.replays.add(1);
                return Ok(Answer::new(stored.status, stored.body, true));
            }
            Some(Err(_)) => return Err(CheckoutError::KeyReused),
            None => {}
        }
        // The flash sale's late flood: one line of a SKU sold out here (and with several nodes
        // everywhere: the pool empty, no live node holding units) is refused without a Redis
        // write: one look at the key's answer and lock (a retry of a key placed on any node still
        // replays it, one running elsewhere is 409), no lock taken, the refusal kept by this node
        // alone (a refusal is replayed by the node that gave it).
        if lines_given && (ticket_refused.is_some() || sold_out_everywhere(app, &request)) {
            match store.peek(&key).await {
                Ok(RemoteBegin::Answer(stored)) => {
                    return if fingerprint.matches(&stored.fingerprint) {
                        app.metrics.replays.add(1);
                        Ok(Answer::new(stored.status, stored.body, true))
                    } else {
                        Err(CheckoutError::KeyReused)
                    };
                }
                Ok(RemoteBegin::Held) => return Err(CheckoutError::KeyInUse),
                Ok(RemoteBegin::Locked(_)) => unguarded = true,
                Err(error @ StoreError::Unavailable(_)) if app.redis_optional => {
                    tracing::debug!(%error, "sold-out refusal without Redis");
                    unguarded = true;
                }
                Err(error) => return Err(CheckoutError::SessionStore(error)),
            }
        }
        let cart = request
            .cart_id
            .as_ref()
            .map(|id| (id, now_ms(), app.carts.idle_ms()));
        let lock = store.submission(&key);
        let begun = if unguarded {
            Ok(RemoteBegin::Locked(None))
        } else {
            store.begin(&lock, cart).await
        };
        match begun {
            Ok(RemoteBegin::Answer(stored)) => {
                lock.keep();
                return if fingerprint.matches(&stored.fingerprint) {
                    app.metrics.replays.add(1);
                    Ok(Answer::new(stored.status, stored.body, true))
                } else {
                    Err(CheckoutError::KeyReused)
                };
            }
            Ok(RemoteBegin::Held) => {
                lock.keep();
                return Err(CheckoutError::KeyInUse);
            }
            Ok(RemoteBegin::Locked(_)) if unguarded => lock.keep(),
            Ok(RemoteBegin::Locked(lines)) => {
                // A cart's lines are known now: its ticket is judged (a refusal releases the lock).
                if let Some(cart) = &lines {
                    admitted = admission(app, cart.iter().map(|(sku, _)| sku), ticket)?;
                }
                // The key's lock is this checkout's: its ticket is claimed for the key (in Redis:
                // an await, before this node's key table, which a caller gone would leave in
                // flight).
                // The guard first: a caller gone during the call (or a call whose answer was
                // lost) gives back what the key may have claimed (only a claim of this key).
                if let Some(ticket) = admitted.take() {
                    let mut guard =
                        Claimed::new(Arc::clone(&app.waiting_room), ticket, key.clone());
                    guard.claim(now_ms().saturating_mul(1000)).await?;
                    claimed = Some(guard);
                }
                submission = Some(lock);
                lock_held = true;
                redis_cart = lines;
            }
            // With `--redis-optional` (one node) a checkout naming its items goes on without
            // Redis: this node's key table and journal keep the key unique here. The lock is kept
            // all the same: a call that timed out may have taken it after all, and the answer
            // must reach Redis (the lock released) once it is back.
            Err(error @ StoreError::Unavailable(_)) if lines_given && app.redis_optional => {
                tracing::debug!(%error, "checkout without a submission lock");
                store.count_fallback();
                submission = Some(lock);
            }
            // Otherwise nothing goes on without the lock: another node may be running this key,
            // and no node can know it did not (the lock, if the call took it after all, is
            // released). A cart lives only in Redis anyway.
            Err(error) => return Err(CheckoutError::SessionStore(error)),
        }
    }

    // A ticket judged but not claimed in Redis (Redis failed and --redis-optional let the
    // checkout go on): its claim cannot be made where the other nodes would see it.
    // Several nodes: the units of products with a limit are taken in the shop's count (Redis)
    // before this node's key table or any unit (an await); refused there, nothing is held.
    // The retention period and order id the checkout's gateway key and order derive from: taken
    // here when the shared count needs the order id (the sold-out flood never computes them).
    let mut named: Option<(i64, OrderId)> = None;
    let mut allowance = None;
    if let Some(limits) = app.shared_limits.as_ref().filter(|_| !unguarded) {
        let units = match (&request.items, &redis_cart) {
            (Some(items), _) => limited_units(
                app,
                items.iter().map(|line| (&line.sku, line.quantity.get())),
            ),
            (None, Some(cart)) => limited_units(app, cart.iter().map(|(sku, n)| (sku, *n))),
            (None, None) => Vec::new(),
        };
        if !units.is_empty() && ticket_refused.is_none() {
            let (_, order_id) = named.insert(order_naming(app, &key));
            match limits.take(&request.customer_id, order_id, &units).await {
                Ok(Ok(taken)) => allowance = Some(taken),
                Ok(Err(sku)) => {
                    app.metrics.rejections_customer_limit.add(1);
                    return Err(EngineError::CustomerLimit { sku }.into());
                }
                Err(error) => return Err(CheckoutError::SessionStore(error)),
            }
        }
    }
    if admitted.is_some() && app.waiting_room.claims_in_redis() {
        if !unguarded {
            return Err(CheckoutError::SessionStore(StoreError::Unavailable(
                "the waiting room's tickets are claimed in Redis".into(),
            )));
        }
        // A sold-out refusal without a lock: refused (or told to retry) without a claim.
        admitted = None;
    }
    match app.engine.idempotency().begin(&key, &fingerprint, now_ms()) {
        Ok(Begin::Started) => {}
        Ok(Begin::Replay(stored)) => {
            app.metrics.replays.add(1);
            return Ok(Answer::new(stored.status, stored.body, true));
        }
        Err(KeyError::InUse) => return Err(CheckoutError::KeyInUse),
        Err(KeyError::Reused) => return Err(CheckoutError::KeyReused),
    }
    if let Some(refusal) = ticket_refused {
        app.engine.idempotency().abandon(&key);
        return Err(refusal);
    }
    let fingerprint = fingerprint.digest();
    let refused = Refused {
        app,
        key: &key,
        fingerprint,
        answers,
    };

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
        let cart = match (app.carts.store(), &request.cart_id) {
            (Some(_), _) => redis_cart,
            (None, Some(id)) => match &app.carts {
                Carts::Memory(carts) => carts.get(id, now_ms()).ok().map(|cart| cart.items),
                Carts::Redis { .. } => None,
            },
            (None, None) => None,
        };
        match cart {
            None => return Ok(refused.rendered(submission, Kept::NoCart)),
            Some(items) if items.is_empty() => {
                app.engine.idempotency().abandon(&key);
                return Err(CheckoutError::Invalid("the cart is empty".into()));
            }
            Some(items) => {
                let mut lines = Vec::with_capacity(items.len());
                for (sku, quantity) in items {
                    match Quantity::parse(quantity) {
                        Ok(quantity) => lines.push((sku, quantity)),
                        Err(e) => {
                            app.engine.idempotency().abandon(&key);
                            return Err(CheckoutError::Invalid(e.to_string()));
                        }
                    }
                }
                lines
            }
        }
    };
    // Without Redis a cart's ticket is judged now that its lines are known, and a ticket is
    // claimed in this process, under the key this node's table holds (no await in between).
    if !lines_given && app.carts.store().is_none() {
        match admission(app, lines.iter().map(|(sku, _)| sku), ticket) {
            Ok(judged) => admitted = judged,
            Err(refusal) => {
                app.engine.idempotency().abandon(&key);
                return Err(refusal);
            }
        }
    }
    if let Some(ticket) = admitted.take() {
        if let Err(refusal) =
            app.waiting_room
                .claim_in_process(&ticket, &key, now_ms().saturating_mul(1000))
        {
            app.engine.idempotency().abandon(&key);
            return Err(refusal.into());
        }
        claimed = Some(Claimed::new(
            Arc::clone(&app.waiting_room),
            ticket,
            key.clone(),
        ));
    }

    let mut reserved = app.engine.reserve(&lines, &request.customer_id);
    // Several nodes: a lease run dry while the pool has units is refilled, and tried again
    // (within REFILL_WAIT). A pool known empty costs one atomic load here: the sold-out flood
    // stays in memory.
    if let Some(cluster) = &app.cluster {
        let deadline = tokio::time::Instant::now() + crate::cluster::REFILL_WAIT;
        // The one wait between the key table and the hold: a caller gone during it frees the key
        // (nothing is held while it waits; a claimed ticket's guard gives the ticket back).
        let in_flight = KeyInFlight {
            app,
            key: &key,
            armed: true,
        };
        while let Err(EngineError::OutOfStock { sku }) = &reserved {
            let units = lines
                .iter()
                .filter(|(line, _)| line == sku)
                .map(|(_, quantity)| quantity.get())
                .sum();
            if !cluster.refill(sku, units, deadline).await {
                break;
            }
            reserved = app.engine.reserve(&lines, &request.customer_id);
        }
        in_flight.disarm();
        if let Err(EngineError::OutOfStock { sku }) = &reserved {
            let units = lines
                .iter()
                .filter(|(line, _)| line == sku)
                .map(|(_, quantity)| quantity.get())
                .sum();
            let inventory = app.engine.inventory();
            let here = inventory
                .lookup(sku)
                .map_or(0, |index| inventory.view(index).available);
            if cluster.may_serve(sku, units, here) {
                // Not sold out: the refill was slow (MySQL busy), or the units are on other nodes
                // that did not give some back in time. Nothing kept under the key.
                app.engine.idempotency().abandon(&key);
                return Err(CheckoutError::Overloaded(format!(
                    "this node's units of {sku} ran out and no refill (from the shared pool, or given back by another node) came in time; nothing was changed, retry"
                )));
            }
        }
    }
    let reservation = match reserved {
        Ok(reservation) if unguarded => {
            // Units came back between the look and the hold (a restock, a release): this
            // checkout took no lock, so it does not go on.
            app.engine.release_reservation(reservation);
            app.engine.idempotency().abandon(&key);
            return Err(CheckoutError::Overloaded(
                "units of this product came back just now; nothing was changed, retry".into(),
            ));
        }
        Ok(reservation) => reservation,
        Err(EngineError::OutOfStock { sku }) => {
            let error = || EngineError::OutOfStock { sku: sku.clone() };
            // The SKU's refusal, rendered once (the flood's answers share its body).
            return Ok(
                match app
                    .engine
                    .refusal(&sku, || answers.render(Kept::Refused(&error())).1)
                {
                    Some(body) => refused.keep(submission, 409, Bytes::from_static(body)),
                    None => refused.rendered(submission, Kept::Refused(&error())),
                },
            );
        }
        Err(error @ EngineError::UnknownSku(_)) => {
            return Ok(refused.rendered(submission, Kept::Refused(&error)))
        }
        Err(other) => {
            if matches!(other, EngineError::CustomerLimit { .. }) {
                app.metrics.rejections_customer_limit.add(1);
            }
            // Not kept under the key (API.md): a retry is judged afresh.
            app.engine.idempotency().abandon(&key);
            return Err(other.into());
        }
    };
    // No payment for an order that cannot be recorded now: with the journal down or full, give
    // the units back and say so (a rejection above needed no journal, so the flood stays cheap).
    let ready = app
        .journal
        .health()
        .and_then(|()| match &app.cluster {
            Some(cluster) => cluster.may_sell().map_err(JournalError::Unavailable),
            None => Ok(()),
        })
        .map_err(CheckoutError::JournalUnavailable)
        .and_then(|()| match &app.relay {
            Some(relay) => relay.admit().map_err(CheckoutError::Overloaded),
            None => Ok(()),
        });
    let permit = ready.and_then(|()| {
        Arc::clone(&app.checkouts_in_flight)
            .try_acquire_owned()
            .map_err(|_| {
                CheckoutError::Overloaded("too many checkouts in flight; retry later".into())
            })
    });
    let permit = match permit {
        Ok(permit) => permit,
        Err(error) => {
            app.engine.release_reservation(reservation);
            app.engine.idempotency().abandon(&key);
            return Err(error);
        }
    };
    app.metrics.reservations.add(1);
    // From here the checkout authorises and commits, which may take long (a commit whose outcome
    // is unknown lands when the database is back): its lock is renewed until the outcome is known.
    if let Some(submission) = submission.as_mut().filter(|_| lock_held) {
        submission.keep_alive();
    }

    let finishing = Finishing {
        app: Arc::clone(app),
        key,
        fingerprint: digest_text(fingerprint),
        reservation,
        token: request.payment_token,
        cart_id: request.cart_id,
        submission,
        lock_held,
        claimed,
        allowance,
        named,
        answers,
        _permit: permit,
    };
    tokio::spawn(finishing.run()).await.map_err(|error| {
        CheckoutError::Internal(format!(
            "the checkout failed unexpectedly ({error}); retry with the same Idempotency-Key"
        ))
    })?
}

/// Keeps an answer that placed nothing.
struct Refused<'a> {
    app: &'a Shared,
    key: &'a IdempotencyKey,
    fingerprint: u128,
    answers: &'static dyn Answers,
}

impl Refused<'_> {
    /// Keeps the answer (this node's bounded map), counts it by its status (`404` not
    /// found, `409` out of stock), and gives it. `body` is rendered once per SKU for a refusal of
    /// stock (`Engine::refusal`).
    fn keep(&self, submission: Option<Submission>, status: u16, body: Bytes) -> Answer {
        let app = self.app;
        let counter = match status {
            409 => &app.metrics.rejections_out_of_stock,
            _ => &app.metrics.rejections_not_found,
        };
        counter.add(1);
        let at_ms = now_ms();
        // A refusal is replayed only by the node that gave it (API.md: another node with stock
        // may place the key): the lock is released with nothing stored in Redis, and this node's
        // bounded map keeps the answer.
        drop(submission);
        app.engine.idempotency().finish_rejected(
            self.key,
            self.fingerprint,
            status,
            body.clone(),
            at_ms,
        );
        Answer::new(status, body, false)
    }

    /// [`Self::keep`] with the answer [`Answers`] renders for `kept`.
    fn rendered(&self, submission: Option<Submission>, kept: Kept<'_>) -> Answer {
        let (status, body) = self.answers.render(kept);
        self.keep(submission, status, Bytes::from(body))
    }
}

/// The part of a checkout after the hold: payment, journal, answer.
struct Finishing {
    app: Shared,
    key: IdempotencyKey,
    fingerprint: String,
    reservation: Reservation,
    token: String,
    cart_id: Option<CartId>,
    /// The Redis submission lock, when taken.
    submission: Option<Submission>,
    /// Whether `submission` holds its lock (not so for a checkout that went on without Redis).
    lock_held: bool,
    /// Its waiting-room ticket, claimed for its key: kept once an order is placed (or its outcome
    /// is unknown), else given back.
    claimed: Option<Claimed>,
    /// Several nodes: its units of products with a limit, taken in the shop's count: kept once
    /// its order is durable (or its outcome unknown), else given back.
    allowance: Option<Allowance>,
    /// The retention period its gateway key and its order's id derive from, if taken already
    /// (derived from the key: the same checkout always names the same order).
    named: Option<(i64, OrderId)>,
    answers: &'static dyn Answers,
    /// Held until the checkout is answered.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// How the payment went.
enum Paid {
    Approved(String),
    Pending(String),
    Declined(String),
    TimedOut,
}

impl Finishing {
    async fn run(self) -> Result<Answer, CheckoutError> {
        let app = &self.app;
        let (period, order_id) = match self.named {
            Some(named) => named,
            None => order_naming(app, &self.key),
        };
        let gateway_key = crate::payment::gateway_key(&app.node, &self.key, period);
        let request = AuthorizeRequest {
            idempotency_key: gateway_key,
            order_id: order_id.as_str().to_owned(),
            token: self.token.clone(),
            amount_cents: self.reservation.total_cents(),
            currency: self.reservation.currency().as_str().to_owned(),
        };
        // Until its commit settles, the orphan scan leaves this checkout's authorisation alone.
        app.settler.checkout_started(&order_id, now_ms());
        let settled_id: OrderId = order_id.clone();
        let started = std::time::Instant::now();
        let authorised =
            tokio::time::timeout(app.gateway_timeout, app.gateway.authorize(request)).await;
        crate::fault::pause_at("after_authorize").await;
        let metrics = &app.metrics;
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
        let answers = self.answers;
        let render = |order: &Order| -> (u16, String) {
            answers.render(match &paid {
                Paid::Declined(_) => Kept::Declined(order),
                Paid::TimedOut => Kept::GatewayTimedOut(order),
                Paid::Approved(_) | Paid::Pending(_) => Kept::Placed(order),
            })
        };
        let (change, stored) = app.engine.place_order(
            NewOrder {
                order_id,
                reservation: self.reservation,
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
            app.settler.checkout_settled(&settled_id);
            return Err(CheckoutError::Internal(
                "the answer was not rendered".into(),
            ));
        };
        let cart_id = self.cart_id;
        // The record carries the order, its events and this answer: once it is durable the engine
        // shows the order and replays the answer under the key, and the capture it owes follows
        // (`money`); if the journal did not take it, the engine frees the units and the key, and
        // the authorisation waits for the client's retry (or the reconciler's orphan scan).
        let claimed = self.claimed;
        let allowance = self.allowance;
        let follow = move |app: &Shared, outcome: &Settlement| match outcome {
            Ok(Applied::Order { order, .. }) => {
                // The order is durable: its units count (the engine tells when they stop).
                if let Some(allowance) = allowance {
                    allowance.keep();
                }
                if matches!(
                    order.status,
                    OrderStatus::Paid | OrderStatus::PaymentPending
                ) {
                    if let Some(cart_id) = &cart_id {
                        app.carts.clear(cart_id, now_ms());
                    }
                    // The ticket is used: by this order, under this key.
                    if let Some(claimed) = claimed {
                        claimed.used();
                    }
                }
                // Declined, or the gateway timed out: the order was released, and the ticket
                // is given back (dropped).
            }
            Ok(Applied::Product(..) | Applied::Payments(_)) => {}
            // Not voided here: the client was told "nothing changed, retry", and its retry (same
            // key, same gateway key) finds this authorisation and makes it the order's; one never
            // retried is voided by the reconciler's orphan scan after `--reconcile-after`.
            // Nothing recorded: the ticket is given back (dropped); an outcome unknown keeps it
            // for the key's retry. So does a record the database refused because another
            // node's order holds the key (its answer is replayed below): that order is this
            // key's, with this ticket and these units.
            Err(error) => {
                if !error.nothing_changed() || matches!(error, JournalError::Rejected(_)) {
                    if let Some(claimed) = claimed {
                        claimed.keep();
                    }
                    if let Some(allowance) = allowance {
                        allowance.keep();
                    }
                }
            }
        };
        let submission = self.submission;
        // The key's Redis lock must still be this checkout's when its record goes: a process
        // paused (or cut off from Redis) past --redis-lock-ttl may have lost it to another node
        // placing the same key, and this node's own journal would not refuse a second order
        // (write-behind, or nodes without `--node-id`). A lock last confirmed (taken or renewed)
        // more than two thirds of its TTL ago records nothing: `503`, the client's retry finds
        // the key's answer or takes the lock again.
        let lock_clock = submission
            .as_ref()
            .filter(|_| self.lock_held)
            .map(Submission::lock_clock);
        let shared = stored.clone();
        let key = self.key.clone();
        let guard = move || lock_clock.map_or(Ok(()), |clock| clock.check());
        let committed = commit_guarded(app, change, guard, move |app, outcome| {
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
            Ok(_) => Ok(Answer::new(stored.status, stored.body, false)),
            // Several nodes on one MySQL journal: the database refused the record because
            // another node's order holds the key (its answer was lost from Redis, say). That
            // order is the key's: its answer is replayed, and kept here for the next retry.
            Err(CommitError::Journal(error @ JournalError::Rejected(_))) => {
                match app.journal.claimed_answer(&key).await {
                    Ok(Some(kept)) if kept.fingerprint == stored.fingerprint => {
                        app.metrics.replays.add(1);
                        app.engine.idempotency().restore(key, kept.clone());
                        Ok(Answer::new(kept.status, kept.body, true))
                    }
                    Ok(Some(_)) => Err(CheckoutError::KeyReused),
                    _ => Err(CommitError::Journal(error).into()),
                }
            }
            Err(error) => Err(error.into()),
        }
    }
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;

    /// The fingerprint of a parsed checkout is the one pinned in `engine::idempotency` (kept
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
            let mut body: Request = serde_json::from_str(raw).unwrap();
            let fingerprint = Fingerprint::of(&body);
            assert_eq!(fingerprint.text(), PINNED, "{raw}");
            assert!(fingerprint.matches(PINNED));
            let digest = fingerprint.digest();
            assert_eq!(digest_text(digest), PINNED);
            let _ = body.items.take();
            assert_ne!(Fingerprint::of(&body).text(), PINNED);
        }
        // Another request is another fingerprint.
        let other: Request = serde_json::from_str(
            r#"{"items":[{"sku":"sku-1","quantity":2}],"customer_id":"c","payment_token":"tok_ok"}"#,
        )
        .unwrap();
        assert!(!Fingerprint::of(&other).matches(PINNED));
    }
}
