//! The use cases on one order or product, whatever door they came in by: find, cancel, restock,
//! and the gateway's final word on a pending payment. Each decides with the engine (waiting while
//! another change of the same order or product is in flight), commits, and answers in domain
//! types; money follows the commit (`super::money`), never the request.

use super::{commit, prepare_when_free, CommitError, Shared};
use crate::domain::OrderId;
use crate::engine::inventory::StockView;
use crate::engine::order::{Order, OrderStatus, PaymentDue};
use crate::engine::records::Product;
use crate::engine::{Applied, EngineError, Prepared};
use crate::journal::JournalError;
use crate::time::now_ms;

/// Why a use case did not happen (or may not have).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The engine refused: nothing changed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The commit was not confirmed: nothing changed, or the outcome is unknown.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A payment named for an order that does not carry it: nothing changed.
    #[error("payment {payment_id} does not belong to order {order_id}")]
    ForeignPayment {
        /// The payment named.
        payment_id: String,
        /// The order named.
        order_id: OrderId,
    },
    /// Several nodes: the shared catalogue in MySQL refused or did not answer.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// An order: from memory while it is live, else from the store past `--order-retention` (MySQL;
/// the embedded journal keeps none beyond memory). `None`: no such order.
///
/// Several nodes: a node that learnt it was fenced (presumed dead and settled while it was
/// paused or cut off) may have lost its open orders to an adopter, which changes them in MySQL:
/// its memory is stale, so it answers MySQL's order, and its own only where MySQL has none (`503
/// journal_unavailable` when MySQL does not answer). A node whose renewals merely fail answers
/// from memory: while no node can reach MySQL, none can have adopted its orders, and a node cut
/// off alone answers `/readyz` 503 and learns it was fenced at its first renewal that reaches
/// MySQL.
pub async fn find(app: &Shared, order_id: &OrderId) -> Result<Option<Order>, JournalError> {
    let fenced = app
        .cluster
        .as_ref()
        .is_some_and(|cluster| cluster.is_fenced());
    match app.engine.order(order_id) {
        Some(order) if !fenced => Ok(Some(order)),
        Some(order) => Ok(app.journal.order(order_id).await?.or(Some(order))),
        None => app.journal.order(order_id).await,
    }
}

/// Cancels an order (a hold or a paid order); an order already finished is answered as it is
/// (`false`: nothing changed). A cancelled order owes a void or a refund, which the settler makes
/// after the commit.
pub async fn cancel(app: &Shared, order_id: &OrderId) -> Result<(Order, bool), AppError> {
    move_order(app, "a cancel", || {
        app.engine.prepare_cancel(order_id, now_ms())
    })
    .await
}

/// Decides an order's move with `prepare` (waiting while another change of it is in flight) and
/// commits it; an order `prepare` leaves as it is is answered as it is (`false`).
async fn move_order(
    app: &Shared,
    what: &str,
    prepare: impl FnMut() -> Result<Prepared, EngineError>,
) -> Result<(Order, bool), AppError> {
    let change = match prepare_when_free(app, prepare).await? {
        Prepared::Unchanged(order) => return Ok((order, false)),
        Prepared::Change(change) => change,
    };
    match commit(app, change, |_, _| {}).await? {
        Applied::Order { order, .. } => Ok((order, true)),
        Applied::Product(..) | Applied::Payments(_) => Err(AppError::Engine(
            EngineError::Inconsistent(format!("{what} applied another change")),
        )),
    }
}

/// Releases a held order through the engine (stock back; its authorisation voided by the settler
/// after the commit): the operations desk's way to clear a stuck hold. An order that is not held
/// is answered as it is (`false`: nothing changed); the caller tells a paid one from a released
/// one.
pub async fn release_held(app: &Shared, order_id: &OrderId) -> Result<(Order, bool), AppError> {
    move_order(app, "a release", || {
        app.engine.prepare_release(order_id, now_ms())
    })
    .await
}

/// Creates a product or changes its name, price or stock (never below what is reserved or sold).
pub async fn put_product(
    app: &Shared,
    product: Product,
    keep_limit: bool,
) -> Result<(Product, StockView), AppError> {
    // Several nodes: the catalogue is MySQL's, and this node's stock is its lease.
    if let Some(cluster) = &app.cluster {
        return Ok(
            crate::cluster::catalogue::put(cluster, &app.engine, product, keep_limit).await?,
        );
    }
    let change = prepare_when_free(app, || {
        if keep_limit {
            app.engine.prepare_product_keeping_limit(product.clone())
        } else {
            app.engine.prepare_product(product.clone())
        }
    })
    .await?;
    match commit(app, change, |_, _| {}).await? {
        Applied::Product(product, view) => Ok((product, view)),
        Applied::Order { .. } | Applied::Payments(_) => Err(AppError::Engine(
            EngineError::Inconsistent("a product change applied an order".into()),
        )),
    }
}

/// The gateway's final word on a pending payment: approved pays the order, declined releases it.
/// Idempotent: a second word, or one for an order finished meanwhile, changes nothing, except
/// that an approval for a released order leaves it owing a void (its authorisation must not stay).
pub async fn payment_decided(
    app: &Shared,
    order_id: &OrderId,
    payment_id: &str,
    approved: bool,
) -> Result<(), AppError> {
    let order = app
        .engine
        .order(order_id)
        .ok_or_else(|| EngineError::UnknownOrder(order_id.clone()))?;
    if order.payment_id.as_deref() != Some(payment_id) {
        return Err(AppError::ForeignPayment {
            payment_id: payment_id.to_owned(),
            order_id: order_id.clone(),
        });
    }
    let target = if approved {
        OrderStatus::Paid
    } else {
        OrderStatus::Released
    };
    let prepared = prepare_when_free(app, || {
        match app.engine.prepare_transition(order_id, target, now_ms()) {
            // Finished meanwhile (expired or cancelled): a late word, handled below.
            Err(EngineError::IllegalTransition(_)) => Ok(None),
            other => other.map(Some),
        }
    })
    .await?;
    match prepared {
        Some(Prepared::Change(change)) => {
            commit(app, change, |_, _| {}).await?;
        }
        Some(Prepared::Unchanged(_)) => {}
        None => {
            // Finished meanwhile: an approval for an order that no longer holds its stock owes a
            // void (if it does not owe one already, or has made it; voiding again is harmless).
            let released = app
                .engine
                .order(order_id)
                .is_some_and(|o| o.status == OrderStatus::Released);
            if approved && released {
                super::money::set_due(app, order_id, None, Some(PaymentDue::Void)).await?;
            }
        }
    }
    Ok(())
}
