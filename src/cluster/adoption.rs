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
//! load them. Every adoption is also a row of `order_adoptions` (written in the same
//! transaction), which is how a node whose journal is its own disk learns, when it starts again,
//! which of its orders left it ([`drop_adopted_away`]).
//!
//! **Write-behind adopters.** A write-behind node rebuilds its state from its own disk, which
//! knows nothing of MySQL's transaction: restarted, it would forget the orders it adopted while
//! their units stay in its lease, free to be sold twice. So its adoption has two more steps, in
//! this order, under [`super::Cluster::adopting`]: the orders go to its own log as one
//! [`Record::Adopted`] (durable; the applier ships it to MySQL as a log row and changes nothing
//! else, the transaction having moved everything), then their `order_adoptions` rows say
//! `journaled`, then they go into memory. An order is thus in memory only once its disk holds it
//! and MySQL says so; while a row is not `journaled` no change of the order can have been
//! journaled, so MySQL's copy is its last version, and [`journal_unjournaled`] writes that copy
//! (at start, before the engine is built, and at every look of the adopting loop: a crash or a
//! journal that failed between the steps costs a delay, never an order or a unit).

use super::registry::DB_NOW_MS;
use super::{db, Cluster, ClusterError};
use crate::engine::order::{Order, OrderStatus};
use crate::engine::records::Record;
use crate::journal::Journal;
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

/// The gone nodes (left, or dead and settled, within [`GONE_SCAN_WINDOW_MS`]: a write-behind node
/// leaves only once MySQL holds all of its log, and is settled only by `cluster forget`, which
/// declares the rest lost) whose orphan authorisations this node scans ([`crate::app::money::void_orphans_of`]): all of them when this
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
    let journaled = cluster.journal_is_mysql;
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
                sqlx::query(&format!(
                    "INSERT INTO order_adoptions (order_id, from_node, to_node, at_ms, journaled) \
                     VALUES (?, ?, ?, {DB_NOW_MS}, ?)"
                ))
                .bind(order.order_id.as_str())
                .bind(&from)
                .bind(&me)
                .bind(journaled)
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

/// At start, before the engine is rebuilt: the orders this node's journal knows that another
/// node adopted since (it left, or was presumed dead) and still owns are no longer this node's:
/// they leave the state, their units having left this node's lease with them. A write-behind
/// node journals that first ([`Record::AdoptedAway`]), so its log's fold (its snapshots, the
/// orders retention moves into its sold counts) agrees with its memory.
pub async fn drop_adopted_away(
    cluster: &Cluster,
    journal: &dyn Journal,
    state: &mut crate::engine::records::State,
) -> Result<usize, ClusterError> {
    let rows = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(
            "SELECT DISTINCT a.order_id FROM order_adoptions a \
             JOIN orders o ON o.order_id = a.order_id \
             WHERE a.from_node = ? AND o.node <> ?",
        )
        .bind(cluster.node().to_owned())
        .bind(cluster.node().to_owned()),
    )
    .await
    .map_err(db("finding this node's orders adopted by another"))?;
    let mut gone = Vec::new();
    for row in &rows {
        let id: Vec<u8> = row.try_get(0).map_err(db("finding adopted orders"))?;
        if let Ok(id) = crate::domain::OrderId::parse(String::from_utf8_lossy(&id).into_owned()) {
            if state.orders.contains_key(&id) {
                gone.push(id);
            }
        }
    }
    if gone.is_empty() {
        return Ok(0);
    }
    if !cluster.journal_is_mysql {
        journal
            .append(Record::AdoptedAway {
                orders: gone.clone(),
                at_ms: crate::time::now_ms(),
            })
            .await
            .map_err(ClusterError::Journal)?;
    }
    for id in &gone {
        state.orders.remove(id);
    }
    tracing::info!(
        count = gone.len(),
        "orders of this node adopted by another while it was away"
    );
    Ok(gone.len())
}

/// Write-behind: the orders adopted by this node whose `order_adoptions` row is not `journaled`,
/// as MySQL has them (their last version: see the module's doc), `(from, order)`.
async fn unjournaled(cluster: &Cluster) -> Result<Vec<(String, Order)>, ClusterError> {
    let me = cluster.node().to_owned();
    crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        let rows = sqlx::query(
            "SELECT order_id, from_node FROM order_adoptions \
             WHERE to_node = ? AND journaled = FALSE ORDER BY id",
        )
        .bind(&me)
        .fetch_all(&mut *tx)
        .await?;
        // By order, the node of its last adoption.
        let mut last: BTreeMap<String, String> = BTreeMap::new();
        for row in &rows {
            let id = String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>(0)?).into_owned();
            let from = String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>(1)?).into_owned();
            last.insert(id, from);
        }
        let mut found = Vec::with_capacity(last.len());
        for (id, from) in last {
            let Ok(order_id) = crate::domain::OrderId::parse(id) else {
                continue;
            };
            // Owned by this node still (another may have adopted it since: then it is not ours).
            let mut order =
                crate::journal::mysql::lock_open_orders(&mut tx, &me, Some(&order_id), 1).await?;
            if let Some(order) = order.pop() {
                found.push((from, order));
            }
        }
        found
    })
    .await
    .map_err(db("reading the adopted orders this node's journal lacks"))
}

/// Write-behind: says in MySQL that this node's journal holds the adoptions of `orders`.
async fn mark_journaled(cluster: &Cluster, orders: &[Order]) -> Result<(), ClusterError> {
    if orders.is_empty() {
        return Ok(());
    }
    let me = cluster.node().to_owned();
    crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        for chunk in orders.chunks(BATCH) {
            let mut query = sqlx::QueryBuilder::<sqlx::MySql>::new(
                "UPDATE order_adoptions SET journaled = TRUE WHERE journaled = FALSE AND to_node = ",
            );
            query.push_bind(&me);
            query.push(" AND order_id IN (");
            let mut ids = query.separated(", ");
            for order in chunk {
                ids.push_bind(order.order_id.as_str());
            }
            query.push(")");
            query.build().execute(&mut *tx).await?;
        }
    })
    .await
    .map_err(db("marking adopted orders as journaled"))
}

/// Journals `orders`, adopted from `from`, in this node's own log: `Ok` once durable.
async fn journal_adopted(
    journal: &dyn Journal,
    from: &str,
    orders: &[Order],
) -> Result<(), ClusterError> {
    journal
        .append(Record::Adopted {
            from: from.to_owned(),
            orders: orders.to_vec(),
            at_ms: crate::time::now_ms(),
        })
        .await
        .map(|_| ())
        .map_err(ClusterError::Journal)
}

/// Write-behind, at start (before the engine is built from `state`): the adopted orders this
/// node's disk lacks (it stopped between MySQL's adoption and its own journal) are journaled now
/// from MySQL's copy and join `state`.
pub async fn journal_unjournaled_at_start(
    cluster: &Cluster,
    journal: &dyn Journal,
    state: &mut crate::engine::records::State,
) -> Result<usize, ClusterError> {
    if cluster.journal_is_mysql {
        return Ok(0);
    }
    let found = unjournaled(cluster).await?;
    for (from, orders) in by_origin(found.clone()) {
        journal_adopted(journal, &from, &orders).await?;
    }
    let orders: Vec<Order> = found.into_iter().map(|(_, order)| order).collect();
    mark_journaled(cluster, &orders).await?;
    for order in &orders {
        state.orders.insert(order.order_id.clone(), order.clone());
    }
    if !orders.is_empty() {
        tracing::info!(
            count = orders.len(),
            "adopted orders this node's disk lacked journaled from MySQL's copy"
        );
    }
    Ok(orders.len())
}

/// `(from, order)` pairs grouped by the node they came from.
fn by_origin(found: Vec<(String, Order)>) -> BTreeMap<String, Vec<Order>> {
    let mut grouped: BTreeMap<String, Vec<Order>> = BTreeMap::new();
    for (from, order) in found {
        grouped.entry(from).or_default().push(order);
    }
    grouped
}

/// Write-behind, while serving: journals the adopted orders whose journal step failed or was
/// cut short (and that are not in memory), then takes them into memory. Returns how many.
async fn journal_unjournaled(
    cluster: &Cluster,
    app: &crate::app::AppState,
) -> Result<usize, ClusterError> {
    if cluster.journal_is_mysql {
        return Ok(0);
    }
    let _adopting = cluster.adopting.lock().await;
    let found = unjournaled(cluster).await?;
    let (known, missing): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|(_, order)| app.engine.order(&order.order_id).is_some());
    // In memory already: journaled and marked once; only the mark was lost.
    let known: Vec<Order> = known.into_iter().map(|(_, order)| order).collect();
    mark_journaled(cluster, &known).await?;
    let mut count = 0;
    for (from, orders) in by_origin(missing) {
        count += into_log_and_memory(cluster, app, &from, orders).await?;
    }
    Ok(count)
}

/// Write-behind, with [`super::Cluster::adopting`] held: `orders` (adopted in MySQL) to this
/// node's log, then marked `journaled`, then into memory. Returns how many went into memory.
async fn into_log_and_memory(
    cluster: &Cluster,
    app: &crate::app::AppState,
    from: &str,
    orders: Vec<Order>,
) -> Result<usize, ClusterError> {
    let journaled = tokio::time::timeout(
        app.journal_timeout,
        journal_adopted(&*app.journal, from, &orders),
    )
    .await
    .unwrap_or_else(|_| {
        Err(ClusterError::Journal(
            crate::journal::JournalError::Unknown("journaling adopted orders timed out".into()),
        ))
    });
    journaled?;
    super::retrying(|| mark_journaled(cluster, &orders)).await?;
    Ok(into_memory(app, orders))
}

/// Adopted orders into the engine. Returns how many.
fn into_memory(app: &crate::app::AppState, orders: Vec<Order>) -> usize {
    let count = orders.len();
    for order in orders {
        let order_id = order.order_id.clone();
        if let Err(error) = app.engine.adopt(order) {
            tracing::error!(%order_id, %error, "an adopted order could not be taken into memory; it is loaded at this node's next start");
        }
    }
    count
}

/// This node's part of an adoption MySQL committed: the orders into its memory (write-behind:
/// through its own log first, see the module's doc). Returns how many went into memory; an
/// error leaves the rest to [`journal_unjournaled`].
async fn take_in(
    cluster: &Cluster,
    app: &crate::app::AppState,
    from: &str,
    orders: Vec<Order>,
) -> Result<usize, ClusterError> {
    let _adopting = cluster.adopting.lock().await;
    if cluster.journal_is_mysql {
        return Ok(into_memory(app, orders));
    }
    // Taken in meanwhile by the catch-up (its row unjournaled, not yet in memory, when this call
    // waited for the lock): journaled and in memory already, and maybe changed since, so this
    // call's copy, read before, must not go to the log.
    let orders: Vec<Order> = orders
        .into_iter()
        .filter(|order| app.engine.order(&order.order_id).is_none())
        .collect();
    if orders.is_empty() {
        return Ok(0);
    }
    into_log_and_memory(cluster, app, from, orders).await
}

/// How long after an adoption this node, owning an order in MySQL that its memory lacks, takes it
/// for an adoption still on its way into memory (answered `503`, retry) rather than for an order
/// of its own that memory no longer holds (past retention).
const TAKING_IN_MS: i64 = 60_000;

/// For a call about `order_id`, which MySQL says this node owns and its memory lacks: `true` once
/// it is in memory, or when it is no recent adoption (an own order past retention: the call runs
/// as on one node); `false` while an adoption of it is on its way into memory (a call that
/// adopted it is journaling it, or its journal step failed and waits for the next look): the
/// caller answers `503`, retry, never `404` for an order that exists.
pub async fn taken_in(
    cluster: &Cluster,
    app: &crate::app::AppState,
    order_id: &crate::domain::OrderId,
) -> Result<bool, ClusterError> {
    // Waits for a take-in in flight; in write-behind, journals what waits for it.
    journal_unjournaled(cluster, app).await?;
    drop(cluster.adopting.lock().await);
    if app.engine.order(order_id).is_some() {
        return Ok(true);
    }
    let recent = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(&format!(
            "SELECT 1 FROM order_adoptions WHERE order_id = ? AND to_node = ? \
             AND at_ms > {DB_NOW_MS} - ? LIMIT 1"
        ))
        .bind(order_id.as_str())
        .bind(cluster.node().to_owned())
        .bind(TAKING_IN_MS),
    )
    .await
    .map_err(db("finding an adoption on its way"))?;
    Ok(recent.is_empty())
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
    let orders = super::retrying(|| take_batch(cluster, from, Some(order_id))).await?;
    if !orders.is_empty() {
        cluster.adopted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(from = %from, %order_id, "adopted an order of a node that is gone, for a call that changes it");
        take_in(cluster, app, from, orders).await?;
    }
    Ok(app.engine.order(order_id).is_some())
}

/// Adopts the open orders of every node that left or died, batch by batch, into `app`'s engine.
/// (Write-behind: first the adopted orders its journal still lacks.)
pub async fn adopt(cluster: &Cluster, app: &crate::app::AppState) -> Result<(), ClusterError> {
    journal_unjournaled(cluster, app).await?;
    for from in orphaned(cluster).await? {
        loop {
            let orders = super::retrying(|| take_batch(cluster, &from, None)).await?;
            if orders.is_empty() {
                break;
            }
            let count = orders.len();
            cluster.adopted.fetch_add(count as u64, Ordering::Relaxed);
            let ids: Vec<String> = orders.iter().map(|o| o.order_id.to_string()).collect();
            take_in(cluster, app, &from, orders).await?;
            for order_id in ids {
                tracing::info!(from = %from, %order_id, "adopted an order of a node that is gone");
            }
            tracing::info!(from = %from, count, "adopted open orders of a node that is gone");
            app.settled.notify_waiters();
        }
    }
    Ok(())
}
