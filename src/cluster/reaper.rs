//! A node presumed dead (no renewal for `--lease-ttl`), with MySQL as its journal: its unsold
//! units go back to the pool, so the live nodes sell them.
//!
//! Every live node looks every [`LOOK`]; the settling is done by whichever claims the dead node
//! first, and is idempotent, so a reaper that dies half way is simply followed by the next:
//! 1. **Claim**: `state` from `live` to `dead` and the node's `epoch` moved on, in one guarded
//!    `UPDATE` (only while its last renewal is older than the TTL by the database's clock). From
//!    then its lease transactions, which check the epoch under a shared lock, take and give
//!    nothing.
//! 2. **Fence its journal**: `journal_writer.epoch` of its log moved on from the turn the dead run
//!    registered with (`cluster_nodes.journal_turn`). The update waits for any commit of that
//!    run in flight (they hold the row shared), and every later one finds another epoch and
//!    writes nothing: its log is final, and a paused process that resumes sells nothing more
//!    (its checkouts' commits are refused). Only that turn is fenced: a run of the node started
//!    since took a later turn when it opened its journal (which fenced the dead run already, and
//!    waited for its commits just the same), and the reaper leaves it alone. Before, a reaper
//!    whose fence landed between a restarted run's turn and its registration left that run
//!    registered live with every commit refused (found by attack). The update is conditional,
//!    so a second reaper repeating the step fences nothing more.
//! 3. **Catch its projections up** to its log's end (the one applier, `catch_up_log`), so
//!    `inventory` holds exactly what its durable orders hold and sold.
//! 4. **Settle**, in one transaction that first checks the node is still the dead one claimed
//!    (same epoch, under `FOR UPDATE`: a restart registers with a new epoch, and whichever comes
//!    first wins): its lease of each SKU becomes its held plus sold units, the rest goes to the
//!    pool, and `reaped_at_ms` says it is done.
//!
//! Units held by its open orders stay in its lease (never returned while those orders are open).
//! A node in write-behind is never reaped: its sales may be only on its own disk.

use super::{db, registry::DB_NOW_MS, Cluster, ClusterError};
use crate::journal::mysql::apply_tool::catch_up_log;
use sqlx::Row;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often a node looks for dead nodes.
pub const LOOK: Duration = Duration::from_secs(1);

/// Claims the journal-mode nodes whose last renewal is older than the TTL; gives back the
/// dead nodes (claimed now or earlier) whose lease is not settled yet, with their epochs.
async fn claim(cluster: &Cluster) -> Result<Vec<(String, u64)>, ClusterError> {
    let ttl_ms = cluster.config.lease_ttl.as_millis() as i64;
    let me = cluster.node().to_owned();
    crate::journal::mysql::in_transaction!(&cluster.db, cluster.timeout, |tx| {
        let claimed = sqlx::query(&format!(
            "UPDATE cluster_nodes SET state = 'dead', epoch = epoch + 1, reaped_at_ms = NULL \
             WHERE state = 'live' AND mode = 'mysql' AND node_id <> ? \
             AND renewed_at_ms < {DB_NOW_MS} - ?"
        ))
        .bind(&me)
        .bind(ttl_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed > 0 {
            tracing::warn!(
                claimed,
                "presumed dead: nodes that did not renew within --lease-ttl"
            );
        }
        let rows = sqlx::query(
            "SELECT node_id, epoch FROM cluster_nodes \
             WHERE state = 'dead' AND mode = 'mysql' AND reaped_at_ms IS NULL",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut dead = Vec::with_capacity(rows.len());
        for row in &rows {
            let node: Vec<u8> = row.try_get(0)?;
            let epoch: u64 = row.try_get(1)?;
            dead.push((String::from_utf8_lossy(&node).into_owned(), epoch));
        }
        dead
    })
    .await
    .map_err(db("claiming dead nodes in cluster_nodes"))
}

/// Steps 2–4 for one dead node claimed at `epoch`; gives back the units returned to the pool.
async fn settle(cluster: &Cluster, node: &str, epoch: u64) -> Result<i64, ClusterError> {
    let returned = settle_on(&cluster.db, cluster.timeout, node, epoch).await?;
    if let Some(units) = returned {
        tracing::warn!(
            node,
            units,
            "a dead node's unsold units went back to the pool"
        );
        cluster.reaped.fetch_add(1, Ordering::Relaxed);
    }
    Ok(returned.unwrap_or(0))
}

/// Steps 2–4 on `db_pool` (a reaper, or `turnstile cluster forget`): the units returned to the
/// pool, `None` if the node is no longer the dead one claimed at `epoch`.
pub(crate) async fn settle_on(
    db_pool: &sqlx::MySqlPool,
    timeout: Duration,
    node: &str,
    epoch: u64,
) -> Result<Option<i64>, ClusterError> {
    let owned = node.to_owned();
    let fenced = crate::journal::mysql::in_transaction!(db_pool, timeout, |tx| {
        // The turn of its log the dead run registered with (NULL: a run registered before the
        // turn was recorded), read without a lock: it changes only with a new registration.
        let claimed: Option<Option<u64>> = sqlx::query_scalar(
            "SELECT journal_turn FROM cluster_nodes WHERE node_id = ? AND state = 'dead' AND epoch = ?",
        )
        .bind(&owned)
        .bind(epoch)
        .fetch_optional(&mut *tx)
        .await?;
        match claimed {
            // It came back (registered anew) or another reaper moved on: not ours to settle.
            None => false,
            Some(turn) => {
                sqlx::query(
                    "UPDATE journal_writer SET epoch = epoch + 1 \
                     WHERE node = ? AND (? IS NULL OR epoch = ?)",
                )
                .bind(&owned)
                .bind(turn)
                .bind(turn)
                .execute(&mut *tx)
                .await?;
                true
            }
        }
    })
    .await
    .map_err(db("fencing a dead node's journal"))?;
    if !fenced {
        return Ok(None);
    }
    catch_up_log(db_pool, node, None, timeout).await?;
    let owned = node.to_owned();
    crate::journal::mysql::in_transaction!(db_pool, timeout, |tx| {
        let still: Option<u64> = sqlx::query_scalar(
            "SELECT epoch FROM cluster_nodes WHERE node_id = ? AND state = 'dead' FOR UPDATE",
        )
        .bind(&owned)
        .fetch_optional(&mut *tx)
        .await?;
        if still != Some(epoch) {
            // It came back (registered anew) or another reaper moved on: not ours to settle.
            None
        } else {
            // Locks in the one order of every cluster transaction: pools, then leases.
            sqlx::query(
                "SELECT p.pool FROM stock_pool p JOIN stock_leases l ON l.sku = p.sku \
                 WHERE l.node_id = ? FOR UPDATE",
            )
            .bind(&owned)
            .fetch_all(&mut *tx)
            .await?;
            let rows = sqlx::query(
                "SELECT l.sku, l.units, \
                        CAST(COALESCE(i.reserved, 0) AS SIGNED), CAST(COALESCE(i.sold, 0) AS SIGNED) \
                 FROM stock_leases l LEFT JOIN inventory i ON i.node = l.node_id AND i.sku = l.sku \
                 WHERE l.node_id = ? FOR UPDATE",
            )
            .bind(&owned)
            .fetch_all(&mut *tx)
            .await?;
            let mut returned = 0i64;
            for row in &rows {
                let sku: Vec<u8> = row.try_get(0)?;
                let units: i64 = row.try_get(1)?;
                let reserved: i64 = row.try_get(2)?;
                let sold: i64 = row.try_get(3)?;
                let unsold = units - reserved - sold;
                if unsold < 0 {
                    tracing::error!(
                        node = %owned,
                        sku = %String::from_utf8_lossy(&sku),
                        units, reserved, sold,
                        "a dead node's durable orders hold more than its lease: left as it is for a person to look at"
                    );
                    continue;
                }
                sqlx::query(
                    "UPDATE stock_leases SET units = ?, reserved = ?, sold = ? WHERE node_id = ? AND sku = ?",
                )
                .bind(reserved + sold)
                .bind(reserved)
                .bind(sold)
                .bind(&owned)
                .bind(&sku)
                .execute(&mut *tx)
                .await?;
                if unsold > 0 {
                    sqlx::query("UPDATE stock_pool SET pool = pool + ? WHERE sku = ?")
                        .bind(unsold)
                        .bind(&sku)
                        .execute(&mut *tx)
                        .await?;
                    returned += unsold;
                }
            }
            sqlx::query(&format!(
                "UPDATE cluster_nodes SET reaped_at_ms = {DB_NOW_MS} WHERE node_id = ?"
            ))
            .bind(&owned)
            .execute(&mut *tx)
            .await?;
            Some(returned)
        }
    })
    .await
    .map_err(db("returning a dead node's unsold units to stock_pool"))
}

/// Every [`LOOK`], until `stop`: settles dead nodes (only a node with MySQL as its journal), then
/// adopts the open orders of the nodes that are gone ([`super::adoption`]; every node).
pub async fn reap(
    cluster: Arc<Cluster>,
    app: crate::app::Shared,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    super::periodically("reaping dead nodes", LOOK, None, stop, || async {
        if cluster.journal_is_mysql {
            for (node, epoch) in claim(&cluster).await? {
                settle(&cluster, &node, epoch).await?;
            }
        }
        super::adoption::adopt(&cluster, &app).await
    })
    .await;
}
