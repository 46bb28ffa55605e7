//! The application layer: what a checkout engine does, whatever door a request came in by (an
//! HTTP route, a sweep, the reconciler; later an admin command or a call forwarded from another
//! node). It calls the pure engine and the journal, and speaks in domain types and typed errors;
//! the HTTP layer (`crate::api`) parses, calls it, and renders. No arrow points back at `api`.
//!
//! - [`checkout`]: placing an order (the key, the submission lock, the hold, authorise, journal
//!   the order with its answer, then settle), with its typed error [`checkout::CheckoutError`];
//! - [`commit`]: the one way a decided change becomes durable and visible (append, wait at most
//!   `--journal-timeout`, apply or abort, then what follows it: money, carts, Redis), and
//!   [`prepare_when_free`], which decides a change of an order or product another change holds;
//! - [`orders`]: cancel, restock (a product's stock, name, price) and the gateway's final word on
//!   a pending payment, with their one typed error [`orders::AppError`];
//! - [`money`]: the settler and the reconciler (capture, void, refund after the journal);
//! - [`sweep`]: holds past their deadline released, and what is past its retention dropped.
//!
//! The answers a checkout keeps under its key are rendered by its door ([`checkout::Answers`]),
//! so a replay gives the very bytes the first answer gave.

pub mod checkout;
pub mod money;
pub mod orders;
pub mod streams;
pub mod sweep;
pub mod waiting_room;

use crate::engine::{Applied, Change, Engine, EngineError};
use crate::journal::{Journal, JournalError, Ticket};
use crate::metrics::Metrics;
use crate::payment::PaymentGateway;
use crate::sessions::Carts;
use std::sync::Arc;
use std::time::Duration;

/// Why [`commit`] could not say the change is durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The journal answered: the change is not durable ([`JournalError::nothing_changed`]), or
    /// its outcome is unknown ([`JournalError::Unknown`]).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// No answer within `--journal-timeout`: the change may still become durable (it settles in
    /// the background).
    #[error("no commit within {0:?}")]
    TimedOut(Duration),
}

/// Everything the handlers share.
pub struct AppState {
    /// Stock, orders, idempotency keys.
    pub engine: Engine,
    /// The durable truth and the event log.
    pub journal: Arc<dyn Journal>,
    /// Carts (and, with Redis, the submission locks and answers shared by every node).
    pub carts: Carts,
    /// Payments.
    pub gateway: Arc<dyn PaymentGateway>,
    /// Verifies webhook signatures.
    pub webhook_secret: Vec<u8>,
    /// How long an authorisation may take before `504`.
    pub gateway_timeout: Duration,
    /// How long a request waits for its commit before `503`.
    pub journal_timeout: Duration,
    /// How long reading a request body may take before `408`, so a client trickling its body
    /// cannot hold a connection and a handler forever.
    pub slow_client_timeout: Duration,
    /// Counters and histograms for `/metrics`.
    pub metrics: Metrics,
    /// Woken whenever a change settles (applied or aborted): requests waiting for a busy order or
    /// product decide again.
    pub settled: tokio::sync::Notify,
    /// Checkouts past their hold (authorising, committing) at most at once; past it `503
    /// overloaded`. Bounds the tasks and gateway calls a flood can start.
    pub checkouts_in_flight: Arc<tokio::sync::Semaphore>,
    /// The gateway calls orders owe, in flight and to retry.
    pub settler: money::Settler,
    /// The RabbitMQ relay, when configured.
    pub relay: Option<Arc<crate::events::relay::Relay>>,
    /// With Redis unreachable, checkouts naming their items go on under this node's own key
    /// table: `--redis-optional` (one node), or several nodes on a MySQL journal, whose claims
    /// guard a key across every node.
    pub redis_optional: bool,
    /// This node's name ([`crate::data_dir::node_name`]): in its gateway idempotency keys, so its
    /// orphan scan judges only the authorisations it made.
    pub node: String,
    /// The operations desk's bearer token; `None`: `/v1/admin/...` answers 404.
    pub admin_token: Option<String>,
    /// Several nodes (`--node-id`): this node's part; `None`: one node.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The bytes of answers not sent yet, across all connections (`--response-bytes-max`): the
    /// connections count them, `/metrics` shows them.
    pub response_budget: &'static crate::connections::ResponseBudget,
    /// Set at the stop signal: `/readyz` answers 503 from then on, while the node serves on for
    /// `--shutdown-delay` and then drains.
    pub stopping: std::sync::atomic::AtomicBool,
    /// The live stock streams (`--streams-max`).
    pub streams: streams::StockStreams,
    /// The products' waiting rooms (`admission_rate`).
    pub waiting_room: Arc<waiting_room::WaitingRoom>,
    /// Several nodes: the shop's count of customers' units of products with `max_per_customer`
    /// (in Redis).
    pub shared_limits: Option<Arc<crate::cluster::limits::SharedLimits>>,
}

/// The state as handlers receive it.
pub type Shared = Arc<AppState>;

/// Decides a change with `prepare`; while another change of the same order or product is in
/// flight (`Busy`), waits for changes to settle and decides again, for at most the journal
/// timeout.
pub async fn prepare_when_free<T>(
    state: &AppState,
    mut prepare: impl FnMut() -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    let deadline = tokio::time::Instant::now() + state.journal_timeout;
    loop {
        // Registered before the attempt, so a change settling in between is not missed.
        let settled = state.settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        match prepare() {
            Err(EngineError::Busy(what)) => {
                if tokio::time::timeout_at(deadline, settled).await.is_err() {
                    return Err(EngineError::Busy(what));
                }
            }
            other => return other,
        }
    }
}

/// How a committed change ended, for what follows it (money, carts).
pub type Settlement = Result<Applied, JournalError>;

/// Appends a change's record and applies the change to memory once it is durable, or aborts it
/// when the journal did not take it; then runs `then` with the outcome. The request waits at most
/// `--journal-timeout` (past it the answer is `503` with the outcome unknown); if it stops waiting
/// (the timeout, or the client went away), the rest runs in a task of its own, so the change
/// settles exactly once either way. A change whose outcome the journal could not tell (it stopped)
/// stays unsettled: its holds and key stay taken until a restart's recovery says what is durable.
pub async fn commit<F>(state: &Shared, change: Change, then: F) -> Result<Applied, CommitError>
where
    F: FnOnce(&Shared, &Settlement) + Send + 'static,
{
    commit_guarded(state, change, || Ok(()), then).await
}

/// [`commit`], with `guard` asked right before the record would go (with the node's own
/// checks): its `Err` records nothing, and the change fails as "nothing changed" with that reason.
pub async fn commit_guarded<F>(
    state: &Shared,
    change: Change,
    guard: impl FnOnce() -> Result<(), String>,
    then: F,
) -> Result<Applied, CommitError>
where
    F: FnOnce(&Shared, &Settlement) + Send + 'static,
{
    // Several nodes: a node that may have lost its lease (fenced, or its last renewal older than
    // --lease-ttl: paused, or cut off) records nothing, right before the record would go, not
    // only when the use case began: a checkout that waited on the gateway through a pause would
    // otherwise commit on a write-behind node's own disk after its lease was given away.
    let allowed = match state.cluster.as_ref().map(|cluster| cluster.may_sell()) {
        Some(Err(why)) => Err(why),
        _ => guard(),
    };
    let ticket = match allowed {
        Err(why) => Ticket::failed(JournalError::Unavailable(why)),
        Ok(()) => state.journal.append(change.record().clone()),
    };
    let mut settle = Settle {
        app: Arc::clone(state),
        ticket,
        rest: Some((change, then)),
    };
    match tokio::time::timeout(state.journal_timeout, settle.wait()).await {
        Ok(Ok(applied)) => Ok(applied),
        Ok(Err(error)) => Err(CommitError::Journal(error)),
        Err(_) => Err(CommitError::TimedOut(state.journal_timeout)),
    }
}

/// A change whose record is appended, and what follows its commit.
struct Settle<F: FnOnce(&Shared, &Settlement) + Send + 'static> {
    app: Shared,
    ticket: Ticket,
    /// Taken when the change settles; still here if the waiter stopped waiting first.
    rest: Option<(Change, F)>,
}

impl<F: FnOnce(&Shared, &Settlement) + Send + 'static> Settle<F> {
    /// Waits for the commit and settles the change. Nothing is awaited after the ticket resolves,
    /// so a waiter dropped at any point leaves the change unsettled, never half-settled.
    async fn wait(&mut self) -> Settlement {
        let committed = (&mut self.ticket).await;
        match self.rest.take() {
            Some((change, then)) => settle(&self.app, change, then, committed),
            None => Err(JournalError::Unknown("settled twice".into())),
        }
    }
}

impl<F: FnOnce(&Shared, &Settlement) + Send + 'static> Drop for Settle<F> {
    fn drop(&mut self) {
        let Some((change, then)) = self.rest.take() else {
            return;
        };
        let ticket = std::mem::replace(&mut self.ticket, Ticket::failed(JournalError::Closed));
        let app = Arc::clone(&self.app);
        // Without a runtime the process is ending: the journal's recovery decides at the restart.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let committed = ticket.await;
                let _ = settle(&app, change, then, committed);
            });
        }
    }
}

/// The order moves the log shows at `info` (API.md, Operations desk): an order not paid at once
/// (`payment_pending`, and `released` when declined or timed out at the gateway), released or
/// refunded; with the idempotency key when the record carries it. Paid orders are not logged one
/// by one (a sale's thousands a second).
fn logged_move(change: &Change) -> Option<(String, &'static str, Option<String>)> {
    let crate::engine::records::Record::Order {
        order,
        previous,
        answer,
        ..
    } = change.record()
    else {
        return None;
    };
    let logged = matches!(
        order.status,
        crate::engine::order::OrderStatus::PaymentPending
            | crate::engine::order::OrderStatus::Released
            | crate::engine::order::OrderStatus::Refunded
    );
    (logged && *previous != Some(order.status)).then(|| {
        (
            order.order_id.to_string(),
            order.status.as_str(),
            answer.as_ref().map(|(key, _)| key.as_str().to_owned()),
        )
    })
}

/// Applies or aborts a change by its commit's outcome, wakes requests waiting for it, and runs
/// what follows.
fn settle<F: FnOnce(&Shared, &Settlement)>(
    app: &Shared,
    change: Change,
    then: F,
    committed: Result<crate::journal::Appended, JournalError>,
) -> Settlement {
    let outcome = match committed {
        Ok(_) => {
            let logged = logged_move(&change);
            let applied = app.engine.apply(change);
            if let Some((order_id, status, key)) = logged {
                tracing::info!(%order_id, status, idempotency_key = key.as_deref().unwrap_or(""), "order {status}");
            }
            // Money follows the durable order: whatever it now owes the gateway is called for.
            match &applied {
                Applied::Order { order, .. } if order.payment_due.is_some() => {
                    money::settle_soon(app, order.order_id.clone());
                }
                Applied::Payments(orders) => {
                    for order in orders.iter().filter(|o| o.payment_due.is_some()) {
                        money::settle_soon(app, order.order_id.clone());
                    }
                }
                _ => {}
            }
            Ok(applied)
        }
        Err(error) if error.nothing_changed() => {
            app.engine.abort(change);
            Err(error)
        }
        Err(error) => {
            tracing::error!(%error, "a change's outcome is unknown; it stays pending until a restart");
            // Not aborted: its holds and its key stay taken (the record may be durable).
            drop(change);
            Err(error)
        }
    };
    app.settled.notify_waiters();
    then(app, &outcome);
    outcome
}
