//! Stock leases: how a node takes units from the pool, sells them in memory, and gives back what
//! it does not sell.
//!
//! **The mechanism.** `stock_leases.units` (per node and SKU) is the truth of what a node was
//! given: sold, held and for sale together. The engine's stock of a SKU on this node is that
//! lease, never more: at start it is rebuilt with exactly `units` ([`super::catalogue::at_start`]);
//! a **grant** is one MySQL transaction first (the pool's row taken under a guarded `UPDATE ...
//! WHERE pool >= n`, so no grant takes more than the pool holds, and `units += n`; the grants of
//! one tick share a transaction, up to [`GRANTS_PER_TRANSACTION`] SKUs, their pool rows locked in
//! SKU order), and only once it committed are the units added to the engine's shards; a **return** takes the units out of
//! the shards first (held, so no checkout can sell them meanwhile), then gives them to the pool in
//! one transaction (`units -= n`, `pool += n`), and only once it committed are they retired from
//! the engine (on failure they are put back for sale). So at every moment the engine's stock is
//! at most the lease MySQL holds, and the units MySQL counts as this node's are a superset of what
//! it may sell: a crash between the two steps strands nothing (the restart rebuilds the engine
//! from MySQL's `units`) and sells nothing twice. Every lease transaction first checks this
//! node's epoch under a shared lock (`fenced`): a node taken over (its epoch moved) takes and
//! gives nothing more.
//!
//! **Sizes.** The keeper looks at every SKU every [`TICK`]. It measures the rate at which this
//! node's units are taken (an exponentially weighted average of held plus sold units per second)
//! and aims to hold about one [`HORIZON`] of sales for sale: it refills once it holds less than
//! half of that (so one MySQL round trip serves many sales, and a flood finds units already in
//! memory), at least [`BLOCK_MIN`] units — or a [`POOL_SHARE`]th of the pool, up to
//! [`BLOCK_FLOOR_MAX`], so a deep stock is taken in blocks that serve many sales — never more than
//! an even share of a small pool (so the end of a sale is not stranded on one node). A checkout
//! that finds the lease dry while the pool has units asks for a refill at once and waits for it
//! briefly ([`super::Cluster::refill`]). A SKU that sold nothing (and had no buyer waiting for a grant the pool can give) for [`IDLE`] gives back everything
//! it holds for sale (for [`IDLE_LONG`] while the pool is [`PLENTY`] times that: then its units
//! strand nothing, and a shop of many slow SKUs does not take and give a block per sale); a lease far above its
//! aim gives back the excess; a lowered stock's recall and another node's hunger (dry, with an
//! empty pool, buyers waiting) take units back too. On SIGTERM everything unsold goes back
//! ([`give_back_all`]).

use super::{db, registry::DB_NOW_MS, Cluster, ClusterError, PoolSignal};
use crate::domain::Sku;
use crate::engine::inventory::SkuIndex;
use crate::engine::Engine;
use futures_util::StreamExt as _;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the keeper looks at every SKU (memory only, unless a lease must move).
pub const TICK: Duration = Duration::from_millis(50);

/// How much selling time a lease aims to hold.
pub const HORIZON: Duration = Duration::from_secs(1);

/// The smallest block taken.
pub const BLOCK_MIN: i64 = 4;

/// The largest block taken.
pub const BLOCK_MAX: i64 = 1_000_000;

/// A SKU that sold nothing for this long gives back every unit it holds for sale, while those
/// units are a fair share of what the pool still has (see [`PLENTY`]).
pub const IDLE: Duration = Duration::from_secs(3);

/// A SKU that sold nothing for this long gives back every unit it holds for sale, however
/// plentiful the pool.
pub const IDLE_LONG: Duration = Duration::from_secs(60);

/// A pool at least this many times what a node holds for sale is plentiful: the node's idle
/// units strand nothing (any node's grant still finds units), so they stay until [`IDLE_LONG`],
/// and blocks grow to a share of the pool ([`POOL_SHARE`]). A shop of many SKUs with deep stock
/// then costs a grant per block, not per sale.
pub const PLENTY: i64 = 64;

/// The smallest block a node takes is this fraction of the pool (at most [`BLOCK_FLOOR_MAX`]).
pub const POOL_SHARE: i64 = 64;

/// The largest floor a pool's size puts under a block.
pub const BLOCK_FLOOR_MAX: i64 = 1_000;

/// A node's hunger is heeded this long after it was said.
const HUNGER_HEARD_MS: i64 = 1_000;

/// How often, at most, a node says it is hungry for one SKU.
const HUNGER_EVERY: Duration = Duration::from_millis(300);

/// Lease moves run at once at most (each a transaction on the shared MySQL pool).
const MOVES_AT_ONCE: usize = 4;

/// The SKUs a tick's grants take blocks of in one transaction at most (one commit for them all:
/// a shop of many SKUs is leased at its first sales many SKUs per commit; few enough that the
/// pool rows they lock are not held long).
const GRANTS_PER_TRANSACTION: usize = 64;

/// One lease move of a tick.
type Move<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ClusterError>> + Send + 'a>>;

/// What the keeper remembers of one SKU between ticks.
struct Kept {
    /// Held plus sold units at the last tick.
    taken: i64,
    /// Units taken per second (weighted average).
    rate: f64,
    /// When units were last taken.
    last_sale: Instant,
    /// When this node last said it was hungry.
    hungry_said: Option<Instant>,
    /// When this node last gave units back for another's hunger.
    hunger_heeded: Option<Instant>,
}

/// Checks, inside a lease transaction, that this node still has the epoch it registered with
/// (a shared lock on its row: a takeover's update waits for this transaction, and this one sees
/// its result).
async fn fenced(
    tx: &mut sqlx::MySqlConnection,
    node: &str,
    epoch: u64,
) -> Result<bool, sqlx::Error> {
    let current: Option<u64> = sqlx::query_scalar(
        "SELECT epoch FROM cluster_nodes WHERE node_id = ? AND state IN ('live', 'left') LOCK IN SHARE MODE",
    )
    .bind(node)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(current != Some(epoch))
}

/// Takes up to `want` units of each SKU of `wants` from its pool into this node's lease (in MySQL
/// only), all in one transaction (one commit for a tick's grants: a shop of many SKUs is leased
/// many SKUs per round of commits, not one); gives back, in the same order, how many it took of
/// each (0: its pool is empty) and the pool left. `wants` is sorted by SKU, so every grant locks
/// pool rows in one order.
async fn grant_many(
    cluster: &Cluster,
    wants: &[(String, i64)],
) -> Result<Vec<(i64, i64)>, ClusterError> {
    let (node, epoch) = (
        cluster.node().to_owned(),
        cluster.epoch.load(Ordering::Acquire),
    );
    let outcome = crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        if fenced(&mut tx, &node, epoch).await? {
            None
        } else {
            let mut granted = Vec::with_capacity(wants.len());
            for (sku_text, want) in wants {
                let (pool, recall): (i64, i64) = sqlx::query_as(&format!(
                    "SELECT pool, IF(recall_at_ms > {DB_NOW_MS} - {}, recall, 0) \
                         FROM stock_pool WHERE sku = ? FOR UPDATE",
                    super::catalogue::RECALL_LIVE_MS
                ))
                .bind(sku_text)
                .fetch_optional(&mut *tx)
                .await?
                .unwrap_or((0, 0));
                // Units a lowered stock waits for are not granted again.
                let take = (*want).min(pool - recall).max(0);
                let mut taken = 0;
                if take > 0 {
                    // Guarded: never more than the pool holds, whatever was read above.
                    let updated = sqlx::query(
                        "UPDATE stock_pool SET pool = pool - ? WHERE sku = ? AND pool >= ?",
                    )
                    .bind(take)
                    .bind(sku_text)
                    .bind(take)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if updated == 1 {
                        sqlx::query(
                            "INSERT INTO stock_leases (node_id, sku, units) VALUES (?, ?, ?) \
                             ON DUPLICATE KEY UPDATE units = units + VALUES(units)",
                        )
                        .bind(&node)
                        .bind(sku_text)
                        .bind(take)
                        .execute(&mut *tx)
                        .await?;
                        taken = take;
                    }
                }
                granted.push((taken, pool - taken));
            }
            Some(granted)
        }
    })
    .await
    .map_err(db("taking lease blocks from stock_pool"))?;
    outcome.ok_or_else(|| {
        cluster.fenced.store(true, Ordering::Release);
        ClusterError::Fenced(cluster.node().to_owned())
    })
}

/// Gives `units` of this node's lease of `sku` back to the pool (in MySQL only), paying a recall
/// first. The caller has taken them out of the engine's shards.
async fn give(cluster: &Cluster, sku: &Sku, units: i64) -> Result<(), ClusterError> {
    let (node, epoch) = (
        cluster.node().to_owned(),
        cluster.epoch.load(Ordering::Acquire),
    );
    let sku_text = sku.as_str().to_owned();
    let done = crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        if fenced(&mut tx, &node, epoch).await? {
            false
        } else {
            // Locks in the one order of every cluster transaction: the pool's row, then leases.
            sqlx::query("SELECT pool FROM stock_pool WHERE sku = ? FOR UPDATE")
                .bind(&sku_text)
                .fetch_optional(&mut *tx)
                .await?;
            let moved = sqlx::query(
                "UPDATE stock_leases SET units = units - ? WHERE node_id = ? AND sku = ? AND units >= ?",
            )
            .bind(units)
            .bind(&node)
            .bind(&sku_text)
            .bind(units)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 1 {
                sqlx::query(
                    "UPDATE stock_pool SET pool = pool + ?, recall = GREATEST(recall - ?, 0) WHERE sku = ?",
                )
                .bind(units)
                .bind(units)
                .bind(&sku_text)
                .execute(&mut *tx)
                .await?;
            }
            moved == 1
        }
    })
    .await
    .map_err(db("giving lease units back to stock_pool"))?;
    if done {
        Ok(())
    } else {
        cluster.fenced.store(true, Ordering::Release);
        Err(ClusterError::Fenced(cluster.node().to_owned()))
    }
}

/// One block a tick asks for: its SKU, where the engine keeps it, its pool's signal, and how
/// many units.
struct Want<'a> {
    sku: &'a Sku,
    index: SkuIndex,
    signal: &'a PoolSignal,
    units: i64,
}

/// Takes blocks into this node: MySQL first (one transaction for all of them), then the engine's
/// shards.
async fn take_blocks(
    cluster: &Cluster,
    engine: &Engine,
    mut wants: Vec<Want<'_>>,
) -> Result<(), ClusterError> {
    wants.sort_by(|a, b| a.sku.as_str().cmp(b.sku.as_str()));
    let asked: Vec<(String, i64)> = wants
        .iter()
        .map(|want| (want.sku.as_str().to_owned(), want.units))
        .collect();
    let granted = super::retrying(|| grant_many(cluster, &asked)).await?;
    for (want, (taken, pool_left)) in wants.iter().zip(granted) {
        let (sku, signal) = (want.sku, want.signal);
        signal.units.store(pool_left, Ordering::Release);
        if taken > 0 && pool_left <= 0 {
            // This grant emptied the pool. Whether other live nodes still hold unsold units is
            // the catalogue's to say, and its last read is older than this grant: until it is
            // read again (at once), a buyer this node cannot serve waits for a refill instead of
            // being told "sold out" while units are for sale elsewhere (seen in CI: a node
            // refused `409` with units unsold on the other).
            signal.elsewhere.store(true, Ordering::Release);
            cluster.catalogue_wake.notify_one();
        }
        if taken > 0 {
            engine.inventory().grow(want.index, taken);
            cluster.grants.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%sku, taken, pool_left, "lease block taken");
        }
        signal.refilled.notify_waiters();
    }
    Ok(())
}

/// Gives up to `units` unsold units of `sku` back: out of the shards, then MySQL, then retired
/// (or put back for sale if MySQL did not take them). Gives back how many went.
async fn give_block(
    cluster: &Cluster,
    engine: &Engine,
    sku: &Sku,
    index: SkuIndex,
    units: i64,
) -> Result<i64, ClusterError> {
    let inventory = engine.inventory();
    let signal = cluster.signal(sku);
    let mut units = units;
    let hold = loop {
        units = units.min(inventory.view(index).available);
        if units <= 0 {
            return Ok(0);
        }
        match inventory.reserve_one(index, units) {
            Ok(hold) => break hold,
            // Sold meanwhile: try fewer.
            Err(_) => units -= 1,
        }
    };
    signal.returning.fetch_add(units, Ordering::AcqRel);
    let given = super::retrying(|| give(cluster, sku, units)).await;
    // Retired (or put back), then no longer counted as returning: a report in between counts
    // them as neither held nor returning for a moment (clamped), never as an order's.
    let outcome = match given {
        Ok(()) => {
            inventory.retire(hold);
            cluster.returns.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%sku, units, "lease units given back");
            Ok(units)
        }
        Err(error) => {
            inventory.release(hold);
            Err(error)
        }
    };
    signal.returning.fetch_sub(units, Ordering::AcqRel);
    outcome
}

/// Says in MySQL that this node's lease of `sku` is dry, the pool empty, and buyers waiting: the
/// nodes holding unsold units give some back at their next look.
async fn say_hungry(cluster: &Cluster, sku: &Sku) -> Result<(), ClusterError> {
    let sku_text = sku.as_str().to_owned();
    crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        sqlx::query(&format!(
            "UPDATE stock_pool SET hungry_at_ms = {DB_NOW_MS} WHERE sku = ?"
        ))
        .bind(&sku_text)
        .execute(&mut *tx)
        .await?;
    })
    .await
    .map_err(db("saying a lease is dry in stock_pool"))
}

/// The keeper: every [`TICK`], or at once when a checkout finds a lease dry, looks at every SKU
/// and moves leases as the module doc says, until `stop`.
pub async fn keep(
    cluster: Arc<Cluster>,
    app: crate::app::Shared,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let kept = tokio::sync::Mutex::new((HashMap::<Sku, Kept>::new(), Instant::now()));
    super::periodically(
        "moving stock leases",
        TICK,
        Some(&cluster.wake),
        stop,
        || async {
            let mut kept = kept.lock().await;
            let (kept, last) = &mut *kept;
            let now = Instant::now();
            let elapsed = now.duration_since(*last).as_secs_f64().max(0.001);
            *last = now;
            tick(&cluster, &app.engine, kept, elapsed, now).await
        },
    )
    .await;
}

async fn tick(
    cluster: &Cluster,
    engine: &Engine,
    kept: &mut HashMap<Sku, Kept>,
    elapsed: f64,
    now: Instant,
) -> Result<(), ClusterError> {
    let signals = cluster.signals.load_full();
    let shop = cluster.shop.load_full();
    let mut moves: Vec<Move<'_>> = Vec::new();
    let mut takes: Vec<Want<'_>> = Vec::new();
    for (sku, signal) in signals.iter() {
        let Some(index) = engine.inventory().lookup(sku) else {
            continue;
        };
        let view = engine.inventory().view(index);
        let taken = view.reserved + view.sold;
        let entry = kept.entry(sku.clone()).or_insert(Kept {
            taken,
            rate: 0.0,
            // Idle until a buyer comes: a SKU nobody buys here is not leased here.
            last_sale: now.checked_sub(IDLE_LONG).unwrap_or(now),
            hungry_said: None,
            hunger_heeded: None,
        });
        let consumed = (taken - entry.taken).max(0);
        entry.taken = taken;
        let wanted = signal.wanted.swap(false, Ordering::AcqRel);
        let pool = signal.units.load(Ordering::Acquire);
        // A buyer waiting for a grant the pool can give counts as a sale: a checkout of several
        // SKUs holds none of them until every one has units, so the first one's grant must not go
        // back as idle while the next one's comes (they went back and forth until the checkout
        // gave up). With the pool empty it does not: units too few here for the buyers who wait
        // go back once idle, so another node's grant can gather them.
        if consumed > 0 || (wanted && pool > 0) {
            entry.last_sale = now;
        }
        entry.rate = 0.7 * entry.rate + 0.3 * (consumed as f64 / elapsed);
        let floor = (pool / POOL_SHARE).clamp(BLOCK_MIN, BLOCK_FLOOR_MAX);
        let aim = ((entry.rate * HORIZON.as_secs_f64()).ceil() as i64).clamp(floor, BLOCK_MAX);
        let plentiful = pool >= PLENTY * view.available.max(BLOCK_MIN);
        let idle_after = if plentiful { IDLE_LONG } else { IDLE };
        let idle = now.duration_since(entry.last_sale) >= idle_after;
        let counts = shop.get(sku);
        let recall = counts.map_or(0, |c| c.recall);
        let hunger_heard = counts.is_some_and(|c| c.hungry_ms_ago < HUNGER_HEARD_MS)
            && entry
                .hungry_said
                .is_none_or(|at| now.duration_since(at).as_millis() as i64 > HUNGER_HEARD_MS)
            && entry
                .hunger_heeded
                .is_none_or(|at| now.duration_since(at).as_millis() as i64 > HUNGER_HEARD_MS);
        let give = |units: i64| -> Move<'_> {
            Box::pin(async move {
                give_block(cluster, engine, sku, index, units)
                    .await
                    .map(drop)
            })
        };
        let want = |units: i64| Want {
            sku,
            index,
            signal,
            units,
        };
        if recall > 0 && view.available > 0 {
            moves.push(give(recall));
        } else if pool > 0 && (wanted || (!idle && view.available * 2 < aim)) {
            let waiting = signal.waiting.load(Ordering::Acquire);
            let mut want_units = (aim - view.available).max(waiting).max(BLOCK_MIN);
            if pool < 3 * aim {
                // An even share of a small pool, so the end of a sale is spread, not stranded.
                want_units = want_units.min((pool + 2) / 3);
            }
            takes.push(want(want_units.max(1)));
        } else if view.available == 0 && signal.waiting.load(Ordering::Acquire) > 0 {
            // Dry, the pool empty as last seen, buyers waiting, units left on other nodes: say
            // so (at most every HUNGER_EVERY), so they give some back, and look at the pool
            // meanwhile (a grant of what came back).
            let said_lately = entry
                .hungry_said
                .is_some_and(|at| now.duration_since(at) < HUNGER_EVERY);
            if !said_lately {
                entry.hungry_said = Some(now);
            }
            let hungry = want(signal.waiting.load(Ordering::Acquire).max(BLOCK_MIN));
            moves.push(Box::pin(async move {
                if !said_lately {
                    say_hungry(cluster, sku).await?;
                }
                take_blocks(cluster, engine, vec![hungry]).await
            }));
        } else if view.available > 0 && idle {
            moves.push(give(view.available));
        } else if view.available > 3 * aim + BLOCK_MIN {
            moves.push(give(view.available - aim));
        } else if hunger_heard && view.available > 0 {
            // Another node is dry and the pool empty: half of what this node holds goes back.
            entry.hunger_heeded = Some(now);
            moves.push(give((view.available + 1) / 2));
        } else if wanted {
            signal.refilled.notify_waiters();
        }
    }
    // The grants go [`GRANTS_PER_TRANSACTION`] SKUs to a transaction, and the moves of different
    // SKUs touch different rows: a few run at once, so a shop of many SKUs is not refilled one
    // round trip at a time.
    while !takes.is_empty() {
        let rest = takes.split_off(takes.len().min(GRANTS_PER_TRANSACTION));
        let batch = std::mem::replace(&mut takes, rest);
        moves.push(Box::pin(take_blocks(cluster, engine, batch)));
    }
    let mut running = futures_util::stream::iter(moves).buffer_unordered(MOVES_AT_ONCE);
    let mut failed = None;
    while let Some(moved) = futures_util::StreamExt::next(&mut running).await {
        if let Err(error) = moved {
            failed.get_or_insert(error);
        }
    }
    failed.map_or(Ok(()), Err)
}

/// SIGTERM: every unsold unit of every lease goes back to the pool. Units held by orders still
/// open stay in this node's lease.
pub async fn give_back_all(cluster: &Cluster, engine: &Engine) -> Result<i64, ClusterError> {
    let mut given = 0;
    let signals = cluster.signals.load_full();
    for sku in signals.keys() {
        let Some(index) = engine.inventory().lookup(sku) else {
            continue;
        };
        let available = engine.inventory().view(index).available;
        if available > 0 {
            given += give_block(cluster, engine, sku, index, available).await?;
        }
    }
    Ok(given)
}
