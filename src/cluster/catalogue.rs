//! The shared catalogue: products and their stock live in MySQL (`products`, `stock_pool`), and
//! every node follows them.
//!
//! `PUT /v1/products/{sku}` on any node is one transaction on MySQL ([`put`]): the product's row,
//! and the pool moved by the change of stock (a raise adds to the pool; a new product's whole
//! stock is its pool). A lowered stock takes its units from the pool; when the pool holds fewer,
//! the transaction asks the nodes for the rest (`stock_pool.recall`), and the nodes give back
//! unsold units of their leases at their next look ([`super::leases`]); the change is refused
//! (`409 stock_below_committed`) when they could not within [`RECALL_WAIT`], or at once when the
//! stock asked for is below what the nodes reported held and sold. Nodes do not journal products:
//! MySQL is the catalogue's one truth.
//!
//! Every node reads the catalogue every [`POLL`] ([`follow`]): products new or changed reach its
//! engine (a new SKU starts with no units here: this node sells only what it leases), and it
//! learns each pool's size (the checkout path reads it, so a node whose lease is dry waits for a
//! refill only while the pool has units, and a sold-out SKU is refused in memory) and the other
//! nodes' held and sold units, which `GET /v1/products/{sku}` adds to its own.

use super::{db, registry::DB_NOW_MS, Cluster, ClusterError};
use crate::domain::{Cents, Currency, Sku, Stock};
use crate::engine::inventory::StockView;
use crate::engine::records::Product;
use crate::engine::Engine;
use rustc_hash::FxHashMap;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often a node reads the catalogue: every change reaches it well within 1 s.
pub const POLL: Duration = Duration::from_millis(200);

/// How long a lowered stock waits for the nodes to give back the units it asks back.
pub const RECALL_WAIT: Duration = Duration::from_secs(3);

/// A recall older than this (ms) is its asker's no more (it stopped without clearing it): it
/// holds no unit back from grants and asks no node for any.
pub(crate) const RECALL_LIVE_MS: u64 = 5_000;

/// One SKU of the whole shop, as the last poll saw it.
#[derive(Debug, Clone)]
pub struct ShopCounts {
    /// The product as the catalogue defines it (its `stock` the shop's).
    pub product: Product,
    /// Units the other nodes hold for orders, as they last reported.
    pub others_reserved: i64,
    /// Units the other nodes sold, as they last reported.
    pub others_sold: i64,
    /// Units leased to no node.
    pub pool: i64,
    /// Units a lowered stock asks the nodes to give back.
    pub recall: i64,
    /// How long ago (ms, by the database's clock) a node last found its lease dry and the pool
    /// empty while buyers were waiting: nodes holding unsold units then give some back.
    pub hungry_ms_ago: i64,
    /// Units the other live nodes hold for sale (as they last reported).
    pub live_unsold_elsewhere: i64,
    /// This node's units held for orders, as MySQL has them: what a fenced node shows instead of
    /// its memory (its orders may have been adopted, its lease settled, meanwhile).
    pub own_reserved: i64,
    /// This node's units sold, as MySQL has them (shown once it is fenced, as `own_reserved`).
    pub own_sold: i64,
}

fn text(row: &sqlx::mysql::MySqlRow, i: usize) -> Result<String, sqlx::Error> {
    let bytes: Vec<u8> = row.try_get(i)?;
    String::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn product_from(row: &sqlx::mysql::MySqlRow) -> Result<Product, ClusterError> {
    let read = db("reading products");
    let sku = text(row, 0).map_err(read)?;
    let unreadable = |reason: String| ClusterError::Unreadable {
        sku: sku.clone(),
        reason,
    };
    Ok(Product {
        sku: Sku::parse(sku.clone()).map_err(|e| unreadable(e.to_string()))?,
        name: row.try_get(1).map_err(db("reading products"))?,
        price_cents: Cents::parse(row.try_get(2).map_err(db("reading products"))?)
            .map_err(|e| unreadable(e.to_string()))?,
        currency: Currency::parse(&text(row, 3).map_err(db("reading products"))?)
            .map_err(|e| unreadable(e.to_string()))?,
        stock: Stock::parse(row.try_get(4).map_err(db("reading products"))?)
            .map_err(|e| unreadable(e.to_string()))?,
        max_per_customer: row.try_get(13).map_err(db("reading products"))?,
        admission_rate: row.try_get(14).map_err(db("reading products"))?,
    })
}

/// The whole catalogue with the pools and the other nodes' counters.
async fn read(cluster: &Cluster) -> Result<FxHashMap<Sku, ShopCounts>, ClusterError> {
    let rows = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(&format!(
            "SELECT p.sku, p.name, p.price_cents, p.currency, p.stock, \
                    COALESCE(sp.pool, 0), \
                    IF(sp.recall_at_ms > {DB_NOW_MS} - {RECALL_LIVE_MS}, sp.recall, 0), \
                    CAST(COALESCE(o.reserved, 0) AS SIGNED), CAST(COALESCE(o.sold, 0) AS SIGNED), \
                    CAST({DB_NOW_MS} - COALESCE(sp.hungry_at_ms, 0) AS SIGNED), \
                    CAST(COALESCE(u.unsold, 0) AS SIGNED), \
                    CAST(COALESCE(me.reserved, 0) AS SIGNED), CAST(COALESCE(me.sold, 0) AS SIGNED), \
                    p.max_per_customer, p.admission_rate \
             FROM products p \
             LEFT JOIN stock_pool sp ON sp.sku = p.sku \
             LEFT JOIN (SELECT sku, SUM(reserved) AS reserved, SUM(sold) AS sold \
                        FROM stock_leases WHERE node_id <> ? GROUP BY sku) o ON o.sku = p.sku \
             LEFT JOIN (SELECT l.sku, SUM(l.units - l.reserved - l.sold) AS unsold \
                        FROM stock_leases l JOIN cluster_nodes n ON n.node_id = l.node_id \
                        WHERE l.node_id <> ? AND n.state = 'live' AND n.renewed_at_ms > {DB_NOW_MS} - ? \
                        GROUP BY l.sku) u ON u.sku = p.sku \
             LEFT JOIN stock_leases me ON me.sku = p.sku AND me.node_id = ?"
        ))
        .bind(cluster.node().to_owned())
        .bind(cluster.node().to_owned())
        .bind(cluster.config.lease_ttl.as_millis() as i64)
        .bind(cluster.node().to_owned()),
    )
    .await
    .map_err(db("reading the catalogue"))?;
    let mut shop = FxHashMap::default();
    for row in &rows {
        let product = product_from(row)?;
        let number = |i: usize| {
            row.try_get::<i64, _>(i)
                .map_err(db("reading the catalogue"))
        };
        shop.insert(
            product.sku.clone(),
            ShopCounts {
                pool: number(5)?,
                recall: number(6)?,
                others_reserved: number(7)?,
                others_sold: number(8)?,
                hungry_ms_ago: number(9)?,
                live_unsold_elsewhere: number(10)?,
                own_reserved: number(11)?,
                own_sold: number(12)?,
                product,
            },
        );
    }
    Ok(shop)
}

/// This node's lease of every SKU (`stock_leases.units`): what its engine may hold and sell.
pub async fn leases_of(cluster: &Cluster) -> Result<HashMap<Sku, i64>, ClusterError> {
    let rows = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query("SELECT sku, units FROM stock_leases WHERE node_id = ?")
            .bind(cluster.node().to_owned()),
    )
    .await
    .map_err(db("reading this node's leases"))?;
    let mut leases = HashMap::new();
    for row in &rows {
        let sku = text(row, 0).map_err(db("reading this node's leases"))?;
        let units: i64 = row.try_get(1).map_err(db("reading this node's leases"))?;
        let sku = Sku::parse(sku.clone()).map_err(|e| ClusterError::Unreadable {
            sku,
            reason: e.to_string(),
        })?;
        leases.insert(sku, units);
    }
    Ok(leases)
}

/// The products this node starts with: the catalogue's, each with this node's lease as its
/// stock (what the engine is rebuilt with: the units this node may hold and sell). Also fills the
/// node's view of the shop.
pub async fn at_start(cluster: &Cluster) -> Result<Vec<Product>, ClusterError> {
    let shop = read(cluster).await?;
    let leases = leases_of(cluster).await?;
    let mut products = Vec::with_capacity(shop.len());
    for (sku, counts) in shop.iter() {
        let signal = cluster.signal(sku);
        signal.units.store(counts.pool, Ordering::Release);
        let mut product = counts.product.clone();
        product.stock = Stock::parse(leases.get(sku).copied().unwrap_or(0)).map_err(|e| {
            ClusterError::Unreadable {
                sku: sku.to_string(),
                reason: format!("this node's lease: {e}"),
            }
        })?;
        products.push(product);
    }
    cluster.shop.store(Arc::new(shop));
    Ok(products)
}

/// Applies a read of the catalogue to this node: products to the engine, pools to the signals.
fn take_in(cluster: &Cluster, engine: &Engine, shop: FxHashMap<Sku, ShopCounts>) {
    for (sku, counts) in shop.iter() {
        // The signal first, with this read's counts: a checkout of a product the engine knows
        // finds its pool's signal as this read saw it.
        let signal = cluster.signal(sku);
        // Only live nodes' units: a dead node's (write-behind, or not settled yet) come back
        // by other means, and the sold-out flood must not wait for them.
        signal.elsewhere.store(
            counts.pool <= 0 && counts.live_unsold_elsewhere > 0,
            Ordering::Release,
        );
        let before = signal.units.swap(counts.pool, Ordering::AcqRel);
        engine.catalogue_product(counts.product.clone());
        if before <= 0 && counts.pool > 0 {
            // Units came back to the pool (a restock, a node's return): a node whose lease ran
            // dry takes some at once.
            cluster.wake.notify_one();
        }
        if counts.recall > 0 {
            cluster.wake.notify_one();
        }
    }
    cluster.shop.store(Arc::new(shop));
}

/// Reads the catalogue every [`POLL`] until `stop`.
pub async fn follow(
    cluster: Arc<Cluster>,
    app: crate::app::Shared,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    super::periodically(
        "reading the catalogue",
        POLL,
        Some(&cluster.catalogue_wake),
        stop,
        || async {
            let shop = read(&cluster).await?;
            take_in(&cluster, &app.engine, shop);
            Ok(())
        },
    )
    .await;
}

/// A product of the whole shop: its definition, and counters that add this node's own (live;
/// once it learnt it was fenced, as MySQL has them) to the other nodes' (as they last reported),
/// so `available + reserved + sold == stock`.
pub fn shop_view(cluster: &Cluster, engine: &Engine, sku: &Sku) -> Option<(Product, StockView)> {
    let shop = cluster.shop.load();
    let counts = shop.get(sku)?;
    let (reserved, sold) = if cluster.is_fenced() {
        (counts.own_reserved, counts.own_sold)
    } else {
        engine.product(sku).map_or((0, 0), |(_, view)| {
            ((view.reserved - cluster.returning(sku)).max(0), view.sold)
        })
    };
    let stock = counts.product.stock.get();
    // Reports of different moments may count a unit twice for a moment (held on a node that has
    // given it back since, and sold by another): the counters are clamped so they still add up.
    let sold = (sold + counts.others_sold).min(stock);
    let reserved = (reserved + counts.others_reserved).min(stock - sold);
    Some((
        counts.product.clone(),
        StockView {
            stock,
            available: stock - reserved - sold,
            reserved,
            sold,
        },
    ))
}

/// What a product's change did in MySQL.
enum Put {
    /// Written, with this limit per customer.
    Done(Option<u32>),
    /// The pool held fewer units than the stock's decrease: the rest was asked back.
    Short,
}

/// `PUT /v1/products/{sku}` with several nodes: the product and its pool in one transaction. A
/// lowered stock takes units from the pool, asking the nodes for the rest and waiting for them
/// at most [`RECALL_WAIT`].
pub async fn put(
    cluster: &Cluster,
    engine: &Engine,
    mut product: Product,
    keep_limit: bool,
) -> Result<(Product, StockView), ClusterError> {
    let deadline = tokio::time::Instant::now() + RECALL_WAIT;
    loop {
        match super::retrying(|| put_once(cluster, &product, keep_limit)).await? {
            Put::Done(limit) => {
                product.max_per_customer = limit;
                break;
            }
            Put::Short if tokio::time::Instant::now() >= deadline => {
                clear_recall(cluster, &product.sku).await?;
                let shop = read(cluster).await?;
                let committed = shop
                    .get(&product.sku)
                    .map_or(0, |c| c.others_reserved + c.others_sold)
                    + engine
                        .product(&product.sku)
                        .map_or(0, |(_, v)| v.reserved + v.sold);
                let requested = product.stock.get();
                return Err(if requested < committed {
                    ClusterError::BelowCommitted {
                        requested,
                        committed,
                    }
                } else {
                    // Not below what is held and sold: units leased to nodes that did not give
                    // them back in time (busy, paused, or down in write-behind).
                    ClusterError::NotReturned {
                        requested,
                        waited: RECALL_WAIT,
                    }
                });
            }
            Put::Short => {
                cluster.wake.notify_one();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let shop = read(cluster).await?;
    take_in(cluster, engine, shop);
    let (_, view) =
        shop_view(cluster, engine, &product.sku).ok_or_else(|| ClusterError::Unreadable {
            sku: product.sku.to_string(),
            reason: "not in the catalogue right after it was written".into(),
        })?;
    // The answer is this change's product and stock (another change may have followed it
    // already: the next read shows that one), with the counters as they are.
    let stock = product.stock.get();
    let sold = view.sold.min(stock);
    let reserved = view.reserved.min(stock - sold);
    Ok((
        product,
        StockView {
            stock,
            available: stock - reserved - sold,
            reserved,
            sold,
        },
    ))
}

async fn put_once(
    cluster: &Cluster,
    product: &Product,
    keep_limit: bool,
) -> Result<Put, ClusterError> {
    let sku = product.sku.as_str().to_owned();
    let requested = product.stock.get();
    let outcome = crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        let row: Option<(i64, Option<u32>)> = sqlx::query_as(
            "SELECT stock, max_per_customer FROM products WHERE sku = ? FOR UPDATE",
        )
        .bind(&sku)
        .fetch_optional(&mut *tx)
        .await?;
        let old = row.map(|(stock, _)| stock);
        // A PUT without `max_per_customer` keeps the limit the product has, read under its lock.
        let limit = match keep_limit {
            true => row.and_then(|(_, limit)| limit),
            false => product.max_per_customer,
        };
        sqlx::query("INSERT IGNORE INTO stock_pool (sku, pool, recall) VALUES (?, 0, 0)")
            .bind(&sku)
            .execute(&mut *tx)
            .await?;
        let pool: i64 = sqlx::query_scalar("SELECT pool FROM stock_pool WHERE sku = ? FOR UPDATE")
            .bind(&sku)
            .fetch_one(&mut *tx)
            .await?;
        let change = requested - old.unwrap_or(0);
        let committed: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(reserved + sold), 0) AS SIGNED) FROM stock_leases WHERE sku = ?",
        )
        .bind(&sku)
        .fetch_one(&mut *tx)
        .await?;
        if change < 0 && requested < committed {
            Err((requested, committed))
        } else if change < 0 && pool < -change {
            let short = -change - pool;
            sqlx::query(&format!(
                "UPDATE stock_pool SET recall = ?, recall_at_ms = {DB_NOW_MS} WHERE sku = ?"
            ))
                .bind(short)
                .bind(&sku)
                .execute(&mut *tx)
                .await?;
            Ok(Put::Short)
        } else {
            sqlx::query(
                "INSERT INTO products (sku, name, price_cents, currency, stock, max_per_customer, \
                 admission_rate, updated_lsn) VALUES (?, ?, ?, ?, ?, ?, ?, 0) ON DUPLICATE KEY UPDATE \
                 name = VALUES(name), price_cents = VALUES(price_cents), currency = VALUES(currency), \
                 stock = VALUES(stock), max_per_customer = VALUES(max_per_customer), \
                 admission_rate = VALUES(admission_rate)",
            )
            .bind(&sku)
            .bind(&product.name)
            .bind(product.price_cents.get())
            .bind(product.currency.as_str())
            .bind(requested)
            .bind(limit)
            .bind(product.admission_rate)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE stock_pool SET pool = pool + ?, recall = 0 WHERE sku = ?")
            .bind(change)
            .bind(&sku)
            .execute(&mut *tx)
            .await?;
            Ok(Put::Done(limit))
        }
    })
    .await
    .map_err(db("writing the product to MySQL"))?;
    outcome.map_err(|(requested, committed)| ClusterError::BelowCommitted {
        requested,
        committed,
    })
}

async fn clear_recall(cluster: &Cluster, sku: &Sku) -> Result<(), ClusterError> {
    let sku = sku.as_str().to_owned();
    crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        sqlx::query("UPDATE stock_pool SET recall = 0 WHERE sku = ?")
            .bind(&sku)
            .execute(&mut *tx)
            .await?;
    })
    .await
    .map_err(db("clearing a recall in stock_pool"))
}
