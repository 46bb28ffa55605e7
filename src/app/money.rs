//! Money after truth: the settler and the reconciler.
//!
//! The mechanism: a journaled order says what it still owes the gateway
//! ([`crate::engine::order::PaymentDue`]: capture, void or refund), and nothing else moves money
//! after an authorisation. Every change that leaves an order owing something is followed, once
//! durable, by [`settle_soon`] (called from [`super::commit`]'s settlement, for every kind of change:
//! checkout, webhook, cancel, hold expiry, reconciler). It makes the gateway call (idempotent per
//! payment) and hands the outcome to one task that journals the outcomes of many orders in one
//! `Record::Payments` (what each owes now), gathered while the previous record commits, as a group
//! commit gathers records: never on a checkout's path, and one record for many captures. An order
//! stays "in flight" until its outcome is journaled, so nothing calls the gateway again for it
//! meanwhile. A call that fails in transit leaves
//! the order owing; the reconciler retries it with backoff. A crash at any point leaves either an
//! order that still owes (retried after the restart) or an authorisation with no durable order
//! (voided by the orphan scan below): never forgotten.
//!
//! The reconciler (a task, first run at start-up):
//! - retries what orders owe, each with exponential backoff (0.5 s to 60 s);
//! - looks up orders still `payment_pending` past `--reconcile-after` and finishes them: paid if
//!   the gateway authorised them, released (authorisation voided) if not;
//! - lists the authorisations this node made (their gateway idempotency keys start with the
//!   node's name, `payment::node_key_prefix`) older than `--reconcile-after`, and voids those whose
//!   order the journal does not know (the checkout crashed or failed between authorisation and
//!   journal, and the client did not retry), or knows as released or cancelled; one it knows as
//!   paid is owed a capture. Checkouts whose commit has not settled yet (it may land after
//!   `--journal-timeout`) are skipped: the settler keeps their order ids from the authorisation
//!   until the commit is known to have landed or not (an unknown outcome keeps them until a
//!   restart). Only its own: nodes sharing one gateway (one shop's account) each have their own
//!   journal, so a node must never judge another node's payment against its journal, or it would
//!   void a live payment it cannot see.
//!
//! A capture the gateway refuses for good (the payment voided or expired there, say) leaves a
//! paid order without its money: that is a person's matter, not a retry loop. The order is marked
//! in the settler (an ERROR log once, `turnstile_payments_capture_refused_total` once,
//! the gauge `turnstile_payments_capture_refused_orders`, listed at `GET /v1/admin/payments` with
//! the gateway's words) and not called for again in this run; it still owes its capture in the
//! journal, so a restart tries once more, and a cancel (refund, which finds nothing to give back)
//! ends it.
//!
//! `--reconcile-after` must exceed how long a checkout can take between its authorisation and its
//! commit (`--gateway-timeout` plus `--journal-timeout`), or an authorisation whose order is about
//! to become durable could be voided; the defaults (60 s against 5 s + 5 s) leave a wide margin.

use super::{commit, prepare_when_free, Shared};
use crate::backoff::Backoff;
use crate::domain::OrderId;
use crate::engine::order::{Order, OrderStatus, PaymentDue};
use crate::engine::Prepared;
use crate::journal::JournalError;
use crate::payment::{PaymentError, PaymentStatus};
use crate::sync::lock;
use crate::time::now_ms;
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Gateway calls the settler makes at most at once (the HTTP gateway client keeps as many idle
/// connections): with many payments owed (the gateway was down under load) the retries queue here
/// instead of opening a connection each at the same moment.
const SETTLER_CALLS_MAX: usize = 256;

/// An order whose last gateway call failed.
#[derive(Debug, Clone)]
pub struct Failing {
    /// When it may be tried again (Unix ms); never, once refused for good.
    pub next_at_ms: i64,
    /// Calls that failed so far.
    pub attempts: u32,
    /// When the first of them failed (Unix ms).
    pub since_ms: i64,
    /// What the gateway (or the network) said last.
    pub last_error: String,
    /// A capture the gateway refuses for good: not tried again in this run.
    pub refused: bool,
}

/// Orders the settler is calling the gateway for, and when each failed one may be tried again.
#[derive(Debug)]
pub struct Settler {
    in_flight: Mutex<FxHashSet<OrderId>>,
    /// Orders whose last call failed: when to try again, and what went wrong.
    retry: Mutex<FxHashMap<OrderId, Failing>>,
    /// Orders of checkouts between their authorisation and the settlement of their commit: the
    /// orphan scan must not void their authorisations, however long the commit takes (a commit
    /// may land after `--journal-timeout`, so the grace period alone does not cover it). With
    /// when each started (Unix milliseconds), for the operations desk's `pending`.
    checkouts: Mutex<FxHashMap<OrderId, i64>>,
    /// Bounds the gateway calls in flight ([`SETTLER_CALLS_MAX`]).
    calls: tokio::sync::Semaphore,
    /// Calls done, waiting to be journaled: (order, what it owed, what it owes now).
    done: tokio::sync::mpsc::UnboundedSender<Outcome>,
    /// Taken by the task that journals them ([`reconcile`]).
    done_queue: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Outcome>>>,
}

/// A gateway call done for an order: what it owed, what it owes now.
type Outcome = (OrderId, Option<PaymentDue>, Option<PaymentDue>);

impl Default for Settler {
    fn default() -> Self {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        Self {
            in_flight: Mutex::default(),
            retry: Mutex::default(),
            checkouts: Mutex::default(),
            calls: tokio::sync::Semaphore::new(SETTLER_CALLS_MAX),
            done: sender,
            done_queue: Mutex::new(Some(receiver)),
        }
    }
}

/// The wait before the next try after `failures` failed calls: doubling from 1 s to 60 s, each
/// spread ±50% so that calls which failed together (the gateway down) do not all come back in the
/// same instant.
fn backoff_ms(failures: u32) -> i64 {
    const SCHEDULE: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    i64::try_from(SCHEDULE.after_failures(failures).as_millis()).unwrap_or(i64::MAX)
}

impl Settler {
    /// A checkout is about to authorise the payment of `order_id`.
    pub fn checkout_started(&self, order_id: &OrderId, at_ms: i64) {
        lock(&self.checkouts).insert(order_id.clone(), at_ms);
    }

    /// The checkout of `order_id` settled: its order is durable and known, or known not to be.
    pub fn checkout_settled(&self, order_id: &OrderId) {
        lock(&self.checkouts).remove(order_id);
    }

    fn checkout_in_flight(&self, order_id: &OrderId) -> bool {
        lock(&self.checkouts).contains_key(order_id)
    }

    /// The checkouts at the gateway or committing their order (not yet known to the engine as
    /// orders, or only just), with when each started, oldest first, at most `limit`.
    pub fn checkouts_in_flight(&self, limit: usize) -> Vec<(OrderId, i64)> {
        let mut started: Vec<(OrderId, i64)> = lock(&self.checkouts)
            .iter()
            .map(|(id, at)| (id.clone(), *at))
            .collect();
        started.sort_by_key(|(_, at)| *at);
        started.truncate(limit);
        started
    }

    /// The orders whose last call failed, with why (for the operations desk).
    pub fn failing(&self) -> FxHashMap<OrderId, Failing> {
        lock(&self.retry).clone()
    }

    /// Paid orders whose capture the gateway refused for good.
    pub fn captures_refused(&self) -> usize {
        lock(&self.retry).values().filter(|f| f.refused).count()
    }
}

/// Why a gateway call did not settle what an order owes.
enum CallFailed {
    /// In transit, or the gateway's own trouble: tried again with backoff.
    Transient(String),
    /// A capture the gateway refuses for good.
    Refused(String),
}

/// Makes the gateway call an order owes, in a task of its own, unless one is already running for
/// it.
pub fn settle_soon(app: &Shared, order_id: OrderId) {
    if !lock(&app.settler.in_flight).insert(order_id.clone()) {
        return;
    }
    let app = Arc::clone(app);
    tokio::spawn(async move {
        let settled = settle_one(&app, &order_id).await;
        // A call done stays in flight until `record_outcomes` has journaled it, so the
        // reconciler does not call the gateway again for it meanwhile.
        if !matches!(settled, Ok(true)) {
            lock(&app.settler.in_flight).remove(&order_id);
        }
        let mut retry = lock(&app.settler.retry);
        let now = now_ms();
        match settled {
            Ok(_) => {
                retry.remove(&order_id);
            }
            Err(failure) => {
                let failing = retry.entry(order_id.clone()).or_insert_with(|| Failing {
                    next_at_ms: now,
                    attempts: 0,
                    since_ms: now,
                    last_error: String::new(),
                    refused: false,
                });
                failing.attempts += 1;
                failing.last_error = match failure {
                    CallFailed::Transient(reason) => {
                        failing.next_at_ms = now + backoff_ms(failing.attempts);
                        failing.refused = false;
                        tracing::warn!(%order_id, failures = failing.attempts, %reason, "a payment call failed; retrying later");
                        reason
                    }
                    CallFailed::Refused(reason) => {
                        failing.next_at_ms = i64::MAX;
                        if !failing.refused {
                            failing.refused = true;
                            app.metrics.payments_capture_refused.add(1);
                            tracing::error!(%order_id, %reason, "a paid order's capture was refused by the gateway: not retried; the order is paid without its money (GET /v1/admin/payments lists it; cancel it to end it, or restart to try once more)");
                        }
                        reason
                    }
                };
            }
        }
    });
}

/// Makes the call `order_id` owes and hands its outcome to `record_outcomes`; `Ok(true)` when
/// it did (`Ok(false)`: nothing was owed).
async fn settle_one(app: &Shared, order_id: &OrderId) -> Result<bool, CallFailed> {
    let Some(order) = app.engine.order(order_id) else {
        return Ok(false);
    };
    let (Some(due), Some(payment_id)) = (order.payment_due, order.payment_id.clone()) else {
        return Ok(false);
    };
    if due == PaymentDue::Capture {
        crate::fault::pause_at("before_capture").await;
    }
    let permit = app
        .settler
        .calls
        .acquire()
        .await
        .map_err(|_| CallFailed::Transient("the settler is closed".to_owned()))?;
    let gateway = &app.gateway;
    let call = match due {
        PaymentDue::Capture => gateway.capture(payment_id.clone()),
        PaymentDue::Void => gateway.void(payment_id.clone()),
        PaymentDue::Refund => gateway.refund(payment_id.clone()),
    };
    let result = tokio::time::timeout(app.gateway_timeout, call)
        .await
        .unwrap_or(Err(PaymentError::Timeout));
    // Held for the gateway call only; the journal commit that follows is batched anyway.
    drop(permit);
    if due == PaymentDue::Capture && result.is_ok() {
        crate::fault::pause_at("after_capture").await;
    }
    let metrics = &app.metrics;
    let next = match (due, result) {
        (_, Ok(())) => {
            let counter = match due {
                PaymentDue::Capture => &metrics.payments_captured,
                PaymentDue::Void => &metrics.payments_voided,
                PaymentDue::Refund => &metrics.payments_refunded,
            };
            counter.add(1);
            None
        }
        // Captured after all (a late capture, or a void that lost a race): give it back.
        (
            PaymentDue::Void,
            Err(PaymentError::Conflict {
                status: PaymentStatus::Captured,
            }),
        ) => Some(PaymentDue::Refund),
        // Never captured: release the funds instead.
        (
            PaymentDue::Refund,
            Err(PaymentError::Conflict {
                status: PaymentStatus::Authorized | PaymentStatus::Pending,
            }),
        ) => Some(PaymentDue::Void),
        // Nothing left to undo.
        (
            PaymentDue::Void | PaymentDue::Refund,
            Err(
                PaymentError::Conflict {
                    status:
                        PaymentStatus::Voided | PaymentStatus::Refunded | PaymentStatus::Declined,
                }
                | PaymentError::Unknown(_),
            ),
        ) => None,
        // A paid order whose authorisation cannot be captured: a person must look.
        (PaymentDue::Capture, Err(error)) if !error.is_transient() => {
            return Err(CallFailed::Refused(format!(
                "capture of payment {payment_id} refused: {error}"
            )));
        }
        (_, Err(error)) => return Err(CallFailed::Transient(error.to_string())),
    };
    // Journaled with the other calls done meanwhile, in one record (see `record_outcomes`).
    app.settler
        .done
        .send((order_id.clone(), Some(due), next))
        .map(|()| true)
        .map_err(|_| CallFailed::Transient("the settler is closed".to_owned()))
}

/// Journals the calls the settler did, many orders per record: while one record commits, the
/// next calls gather, as a group commit does. An order that changed meanwhile is left out (its new
/// debt has its own call); one left out because another change of it was in flight still owes,
/// and the reconciler calls again (the gateway's idempotency makes the repeat harmless).
async fn record_outcomes(app: Shared, mut queue: tokio::sync::mpsc::UnboundedReceiver<Outcome>) {
    let mut batch: Vec<Outcome> = Vec::with_capacity(2_048);
    while queue.recv_many(&mut batch, 2_048).await > 0 {
        let mut owing = Vec::new();
        if let Some(change) = app.engine.prepare_payments(&batch, now_ms()) {
            match commit(&app, change, |_, _| {}).await {
                Ok(crate::engine::Applied::Payments(orders)) => owing.extend(
                    orders
                        .into_iter()
                        .filter(|o| o.payment_due.is_some())
                        .map(|o| o.order_id),
                ),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, calls = batch.len(), "could not journal payment calls; the reconciler calls again");
                }
            }
        }
        {
            let mut in_flight = lock(&app.settler.in_flight);
            for (order_id, _, _) in batch.drain(..) {
                in_flight.remove(&order_id);
            }
        }
        // Orders that now owe another call (a void that found the payment captured owes a
        // refund, say): their settlement ran while they were still in flight here.
        for order_id in owing {
            settle_soon(&app, order_id);
        }
    }
}

/// Journals that `order_id` owes `next` instead of `expected`, through the same `Payments`
/// record the settler's calls use. Nothing changes if it no longer owes `expected`, or another
/// change of it is in flight (the reconciler's next scan looks again).
pub async fn set_due(
    app: &Shared,
    order_id: &OrderId,
    expected: Option<PaymentDue>,
    next: Option<PaymentDue>,
) -> Result<(), super::CommitError> {
    let update = [(order_id.clone(), expected, next)];
    if let Some(change) = app.engine.prepare_payments(&update, now_ms()) {
        commit(app, change, |_, _| {}).await?;
    }
    Ok(())
}

/// Runs the reconciler, and the journaling of the settler's calls, until the task is dropped:
/// at once, then every tick.
pub async fn reconcile(app: Shared, reconcile_after: Duration) {
    let queue = lock(&app.settler.done_queue).take();
    let recorder = async {
        if let Some(queue) = queue {
            record_outcomes(Arc::clone(&app), queue).await;
        }
    };
    tokio::join!(recorder, reconcile_loop(Arc::clone(&app), reconcile_after));
}

async fn reconcile_loop(app: Shared, reconcile_after: Duration) {
    let tick = (reconcile_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let scan_every_ms = (reconcile_after.as_millis() as i64 / 2).clamp(1_000, 60_000);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_scan = i64::MIN;
    loop {
        ticker.tick().await;
        let now = now_ms();
        retry_owed(&app, now);
        if now.saturating_sub(last_scan) >= scan_every_ms {
            last_scan = now;
            finish_pending(&app, now, reconcile_after).await;
            if void_orphans(&app, reconcile_after).await {
                app.metrics.reconciler_scans.add(1);
            }
            if let Some(cluster) = &app.cluster {
                for node in crate::cluster::adoption::gone_to_scan(cluster).await {
                    void_orphans_of(&app, &node, reconcile_after).await;
                }
            }
        }
    }
}

/// Starts the calls owed whose retry time has come (or that were never tried: after a restart).
fn retry_owed(app: &Shared, now: i64) {
    for order in app.engine.payments_due(10_000) {
        let due = lock(&app.settler.retry)
            .get(&order.order_id)
            .is_none_or(|failing| failing.next_at_ms <= now);
        if due {
            settle_soon(app, order.order_id);
        }
    }
}

/// Orders still waiting for the gateway's word past the grace period: asks the gateway.
async fn finish_pending(app: &Shared, now: i64, reconcile_after: Duration) {
    let cutoff = now - reconcile_after.as_millis() as i64;
    for order in app.engine.pending_orders_created_before(cutoff, 1_000) {
        let Some(payment_id) = order.payment_id.clone() else {
            continue;
        };
        let looked_up = tokio::time::timeout(app.gateway_timeout, app.gateway.lookup(payment_id))
            .await
            .unwrap_or(Err(PaymentError::Timeout));
        let next = match looked_up {
            Ok(p)
                if matches!(
                    p.status,
                    PaymentStatus::Authorized | PaymentStatus::Captured
                ) =>
            {
                OrderStatus::Paid
            }
            Ok(p) if p.status == PaymentStatus::Pending => continue,
            Ok(_) | Err(PaymentError::Unknown(_)) => OrderStatus::Released,
            Err(error) => {
                tracing::warn!(order_id = %order.order_id, %error, "could not look up a pending payment");
                continue;
            }
        };
        let prepared = prepare_when_free(app, || {
            app.engine
                .prepare_transition(&order.order_id, next, now_ms())
        })
        .await;
        if let Ok(Prepared::Change(change)) = prepared {
            if commit(app, change, |_, _| {}).await.is_ok() {
                app.metrics.reconciler_actions.add(1);
                tracing::info!(order_id = %order.order_id, status = next.as_str(), "reconciler finished a pending payment");
            }
        }
    }
}

/// Authorisations this node made, older than the grace period, that no durable order will
/// capture: voided. Returns whether the scan ran (the gateway answered the listing).
async fn void_orphans(app: &Shared, reconcile_after: Duration) -> bool {
    void_orphans_of(app, &app.node, reconcile_after).await
}

/// [`void_orphans`] for the authorisations `node` made: this node's own, or those of a node that
/// is gone (left, or dead and settled: its log is all in MySQL and its epoch refuses any late
/// commit), which no live node would judge otherwise ([`crate::cluster::adoption::gone_to_scan`]).
/// Of a gone node's payments only those no durable order holds are touched (voided): one its
/// order holds is its adopter's to finish. An order that cannot be read now leaves its payment
/// for the next scan.
pub(crate) async fn void_orphans_of(app: &Shared, node: &str, reconcile_after: Duration) -> bool {
    let own = node == app.node;
    let ours = crate::payment::node_key_prefix(node);
    let listed = tokio::time::timeout(
        app.gateway_timeout,
        app.gateway
            .authorizations_older_than(reconcile_after, &ours),
    )
    .await
    .unwrap_or(Err(PaymentError::Timeout));
    let payments = match listed {
        Ok(payments) => payments,
        Err(error) => {
            tracing::warn!(%error, "could not list old authorisations; retrying later");
            return false;
        }
    };
    for payment in payments {
        // A gateway that ignores the filter must not make this node judge another's payment.
        if !payment.idempotency_key.starts_with(&ours) {
            continue;
        }
        let order = match OrderId::parse(payment.order_id.clone()) {
            // Its checkout is still committing the order: not an orphan (yet).
            Ok(order_id) if own && app.settler.checkout_in_flight(&order_id) => continue,
            Ok(order_id) => match read_order(app, &order_id).await {
                Ok(order) => order,
                Err(error) => {
                    tracing::debug!(%order_id, %error, "could not read the order of an old authorisation; judged at the next scan");
                    continue;
                }
            },
            Err(_) => None,
        };
        let ours = order
            .as_ref()
            .filter(|o| o.payment_id.as_deref() == Some(payment.payment_id.as_str()));
        match ours {
            // Another node's order: its adopter finishes it.
            Some(_) if !own => {}
            // Finished by `finish_pending` (a pending payment with no order is voided below).
            Some(order) if order.status == OrderStatus::PaymentPending => {}
            // The journal knows it and owes something already: the settler is on it.
            Some(order) if order.payment_due.is_some() => {}
            Some(order) => {
                // Known, owing nothing, yet the gateway still holds the authorisation: a paid
                // order is owed its capture, a released or cancelled one a void.
                let owed = if order.status == OrderStatus::Paid {
                    PaymentDue::Capture
                } else {
                    PaymentDue::Void
                };
                if set_due(app, &order.order_id, None, Some(owed))
                    .await
                    .is_ok()
                {
                    app.metrics.reconciler_actions.add(1);
                }
            }
            None => {
                // No durable order holds this authorisation: the checkout never journaled it.
                let voided = tokio::time::timeout(
                    app.gateway_timeout,
                    app.gateway.void(payment.payment_id.clone()),
                )
                .await
                .unwrap_or(Err(PaymentError::Timeout));
                match voided {
                    Ok(()) => {
                        app.metrics.reconciler_actions.add(1);
                        app.metrics.payments_voided.add(1);
                        tracing::info!(payment_id = %payment.payment_id, order_id = %payment.order_id, "voided an authorisation no durable order holds");
                    }
                    Err(error) => {
                        tracing::warn!(payment_id = %payment.payment_id, %error, "could not void an orphan authorisation; retrying later");
                    }
                }
            }
        }
    }
    true
}

/// The order as memory holds it, or as the journal's store keeps it (MySQL: past retention, or
/// another node's); `Err` when the store cannot say now.
async fn read_order(app: &Shared, order_id: &OrderId) -> Result<Option<Order>, JournalError> {
    if let Some(order) = app.engine.order(order_id) {
        return Ok(Some(order));
    }
    app.journal.order(order_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_a_minute_and_is_spread() {
        // Proves: retries of payments that failed together are spread, and never wait past 90 s.
        for failures in 1..20 {
            let base = (500i64 << failures.min(7)).min(60_000);
            let waits: FxHashSet<i64> = (0..64).map(|_| backoff_ms(failures)).collect();
            assert!(waits.iter().all(|w| (base / 2..=base * 3 / 2).contains(w)));
            assert!(waits.len() > 1, "spread: {waits:?}");
        }
    }
}
