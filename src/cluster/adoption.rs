//! Every open order has one live owner: the open orders (held, payment pending, owing the
//! gateway) of a node that left (SIGTERM, after it shipped its journal to MySQL) or was presumed
//! dead and settled ([`super::reaper`]) are adopted by a live node, which finishes them as their
//! owner: hold expiry, the gateway's webhook (forwarded to it, [`super::forward`]), captures,
//! voids and refunds, the reconciler.
//!
//! **The mechanism.** One MySQL transaction per batch: the leaving node's row is locked (a
//! restart of it, which registers anew, waits or comes first and stops the adoption), its open
//! orders are read and locked (`FOR UPDATE`: a second adopter waits, then finds them owned by the
//! first), `orders.node` becomes the adopter, and the units those orders hold or sold move with
//! them from the old node's lease and stock counters (`stock_leases`, `inventory`) to the
//! adopter's, so `pool + Σ leases == stock` stays true and no unit held by an open order is ever
//! returned to the pool. Once it committed, the adopter's engine takes the orders and their units
//! ([`crate::engine::Engine::adopt`]). MySQL is the record of the adoption: a node whose journal
//! is MySQL loads its orders from the projections at start (`orders.node`), so a crash between
//! the two steps loses nothing; and a node started again after its orders were adopted does not
//! load them. Only nodes with MySQL as their journal adopt (a write-behind node's start-up reads
//! its own disk, which would not know an adoption).

use super::registry::DB_NOW_MS;
use super::{db, Cluster, ClusterError};
use crate::engine::order::{Order, OrderStatus};
use sqlx::Row;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Orders adopted in one transaction at most.
const BATCH: usize = 100;

/// The nodes whose open orders wait for an adopter: gone (left), or dead and settled.
async fn orphaned(cluster: &Cluster) -> Result<Vec<String>, ClusterError> {
    let rows = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(
            "SELECT n.node_id FROM cluster_nodes n \
             WHERE (n.state = 'left' OR (n.state = 'dead' AND n.reaped_at_ms IS NOT NULL)) \
             AND n.node_id <> ? \
             AND EXISTS (SELECT 1 FROM orders o WHERE o.node = n.node_id \
                 AND (o.status IN ('reserved', 'payment_pending') OR o.payment_due IS NOT NULL))",
        )
        .bind(cluster.node().to_owned()),
    )
    .await
    .map_err(db("finding orders without a live owner"))?;
    rows.iter()
        .map(|row| {
            row.try_get::<Vec<u8>, _>(0)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(db("finding orders without a live owner"))
        })
        .collect()
}

/// How long after a node is gone its authorisations are still scanned for orphans: longer than a
/// gateway keeps an authorisation open.
const GONE_SCAN_WINDOW_MS: i64 = 8 * 24 * 3_600_000;

/// The gone nodes on a MySQL journal (left, or dead and settled, within [`GONE_SCAN_WINDOW_MS`];
/// a write-behind node's disk may hold orders MySQL lacks, until `cluster forget`) whose orphan
/// authorisations this node scans ([`crate::app::money::void_orphans_of`]): all of them when this
/// node is the live node whose id sorts first, else none, so one node makes the gateway calls.
/// A gone node's checkout whose order never became durable authorised a payment that no live
/// node's own scan would list (gateway keys carry the node). Empty when MySQL cannot say.
pub async fn gone_to_scan(cluster: &Cluster) -> Vec<String> {
    let found = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(&format!(
            "SELECT n.node_id FROM cluster_nodes n \
             WHERE (n.state = 'left' OR (n.state = 'dead' AND n.reaped_at_ms IS NOT NULL)) \
             AND n.mode = 'mysql' \
             AND n.node_id <> ? AND n.renewed_at_ms > {DB_NOW_MS} - ? \
             AND ? = (SELECT MIN(l.node_id) FROM cluster_nodes l WHERE l.state = 'live')"
        ))
        .bind(cluster.node().to_owned())
        .bind(GONE_SCAN_WINDOW_MS)
        .bind(cluster.node().to_owned()),
    )
    .await;
    match found {
        Ok(rows) => rows
            .iter()
            .filter_map(|row| row.try_get::<Vec<u8>, _>(0).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect(),
        Err(error) => {
            tracing::debug!(%error, "could not list the gone nodes whose orphan authorisations to scan");
            Vec::new()
        }
    }
}

/// Units per SKU an order holds (`reserved`) or sold.
fn units_of(orders: &[Order]) -> BTreeMap<String, (i64, i64)> {
    let mut units: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for order in orders {
        for item in &order.items {
            let entry = units.entry(item.sku.as_str().to_owned()).or_default();
            match order.status {
                s if s.holds_stock() => entry.0 += item.quantity,
                OrderStatus::Paid => entry.1 += item.quantity,
                _ => {}
            }
        }
    }
    units
}

/// One batch of `from`'s open orders, moved to this node in MySQL; gives them back (empty: none
/// left, or `from` came back).
async fn take_batch(
    cluster: &Cluster,
    from: &str,
    only: Option<&crate::domain::OrderId>,
) -> Result<Vec<Order>, ClusterError> {
    let (me, from) = (cluster.node().to_owned(), from.to_owned());
    let only = only.cloned();
    crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        let gone: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM cluster_nodes WHERE node_id = ? \
             AND (state = 'left' OR (state = 'dead' AND reaped_at_ms IS NOT NULL)) FOR UPDATE",
        )
        .bind(&from)
        .fetch_optional(&mut *tx)
        .await?;
        if gone.is_none() {
            Vec::new()
        } else {
            let orders =
                crate::journal::mysql::lock_open_orders(&mut tx, &from, only.as_ref(), BATCH)
                    .await?;
            for order in &orders {
                sqlx::query("UPDATE orders SET node = ? WHERE order_id = ? AND node = ?")
                    .bind(&me)
                    .bind(order.order_id.as_str())
                    .bind(&from)
                    .execute(&mut *tx)
                    .await?;
            }
            for (sku, (reserved, sold)) in units_of(&orders) {
                let units = reserved + sold;
                if units == 0 {
                    continue;
                }
                sqlx::query(
                    "UPDATE stock_leases SET units = units - ?, reserved = GREATEST(reserved - ?, 0), \
                     sold = GREATEST(sold - ?, 0) WHERE node_id = ? AND sku = ?",
                )
                .bind(units)
                .bind(reserved)
                .bind(sold)
                .bind(&from)
                .bind(&sku)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO stock_leases (node_id, sku, units, reserved, sold) VALUES (?, ?, ?, ?, ?) \
                     ON DUPLICATE KEY UPDATE units = units + VALUES(units), \
                     reserved = reserved + VALUES(reserved), sold = sold + VALUES(sold)",
                )
                .bind(&me)
                .bind(&sku)
                .bind(units)
                .bind(reserved)
                .bind(sold)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE inventory SET reserved = reserved - ?, sold = sold - ? WHERE node = ? AND sku = ?",
                )
                .bind(reserved)
                .bind(sold)
                .bind(&from)
                .bind(&sku)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO inventory (node, sku, reserved, sold) VALUES (?, ?, ?, ?) \
                     ON DUPLICATE KEY UPDATE reserved = reserved + VALUES(reserved), sold = sold + VALUES(sold)",
                )
                .bind(&me)
                .bind(&sku)
                .bind(reserved)
                .bind(sold)
                .execute(&mut *tx)
                .await?;
            }
            orders
        }
    })
    .await
    .map_err(db("adopting another node's open orders"))
}

/// At start, before the engine is rebuilt: the open orders this node's journal knows that
/// another node adopted since (it left, or was presumed dead) are no longer this node's: they
/// leave the state, their units having left this node's lease with them.
pub async fn drop_adopted_away(
    cluster: &Cluster,
    state: &mut crate::engine::records::State,
) -> Result<usize, ClusterError> {
    let open: Vec<String> = state
        .orders
        .values()
        .filter(|o| o.status.holds_stock() || o.payment_due.is_some())
        .map(|o| o.order_id.as_str().to_owned())
        .collect();
    let mut gone = Vec::new();
    for chunk in open.chunks(500) {
        let mut query =
            sqlx::QueryBuilder::<sqlx::MySql>::new("SELECT order_id FROM orders WHERE node <> ");
        query.push_bind(cluster.node().to_owned());
        query.push(" AND order_id IN (");
        let mut ids = query.separated(", ");
        for id in chunk {
            ids.push_bind(id.clone());
        }
        query.push(")");
        let rows =
            crate::journal::mysql::fetch_all_bounded(&cluster.db, cluster.timeout, query.build())
                .await
                .map_err(db("finding this node's orders adopted by another"))?;
        for row in &rows {
            let id: Vec<u8> = row.try_get(0).map_err(db("finding adopted orders"))?;
            gone.push(String::from_utf8_lossy(&id).into_owned());
        }
    }
    let gone_set: std::collections::HashSet<&str> = gone.iter().map(String::as_str).collect();
    state.orders.retain(|id, _| !gone_set.contains(id.as_str()));
    if !gone.is_empty() {
        tracing::info!(
            count = gone.len(),
            "orders of this node adopted by another while it was away"
        );
    }
    Ok(gone.len())
}

/// Adopts one order of a node that is gone (left, or dead and settled), whatever its status: a
/// call that changes it (cancel, a webhook) arrived, and a finished order (paid, nothing owed)
/// is adopted by no sweep. `true` once this node owns it.
pub async fn adopt_one(
    cluster: &Cluster,
    app: &crate::app::AppState,
    from: &str,
    order_id: &crate::domain::OrderId,
) -> Result<bool, ClusterError> {
    if !cluster.journal_is_mysql {
        return Ok(false);
    }
    let orders = super::retrying(|| take_batch(cluster, from, Some(order_id))).await?;
    let adopted = !orders.is_empty();
    for order in orders {
        if let Err(error) = app.engine.adopt(order) {
            tracing::error!(%order_id, %error, "an adopted order could not be taken into memory; it is loaded at this node's next start");
        }
        cluster.adopted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(from = %from, %order_id, "adopted an order of a node that is gone, for a call that changes it");
    }
    Ok(adopted)
}

/// Adopts the open orders of every node that left or died, batch by batch, into `app`'s engine.
pub async fn adopt(cluster: &Cluster, app: &crate::app::AppState) -> Result<(), ClusterError> {
    for from in orphaned(cluster).await? {
        loop {
            let orders = super::retrying(|| take_batch(cluster, &from, None)).await?;
            if orders.is_empty() {
                break;
            }
            let count = orders.len();
            for order in orders {
                let order_id = order.order_id.clone();
                if let Err(error) = app.engine.adopt(order) {
                    tracing::error!(%order_id, %error, "an adopted order could not be taken into memory; it is loaded at this node's next start");
                }
            }
            cluster.adopted.fetch_add(count as u64, Ordering::Relaxed);
            tracing::info!(from = %from, count, "adopted open orders of a node that is gone");
            app.settled.notify_waiters();
        }
    }
    Ok(())
}
