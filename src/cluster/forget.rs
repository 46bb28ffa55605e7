//! `turnstile cluster forget NODE`: a dead node's disk is declared lost.
//!
//! A write-behind node's acknowledged orders may be on its own disk only, so nothing of a dead
//! write-behind node is given away ([`super::reaper`] settles only nodes with MySQL as their
//! journal). When its disk is gone for good, an operator says so with this command: the node is
//! marked dead as if MySQL were its journal (its epoch moved on), and settled at once as a reaper
//! would (its log in MySQL fenced and applied, its unsold units back in the pool); its open orders
//! are then adopted by a live node. What MySQL never received of it
//! (events past those of its log and outbox in MySQL, by the seq the node last reported) is lost
//! with the disk, and the command says how much.
//!
//! Refused while the node renewed within `--lease-ttl`, and while a process still holds the
//! node's journal lock in MySQL (it runs, or was paused less than the lock session's idle limit
//! ago): such a process could resume and sell from the lease given away. One that resumes later
//! still sells nothing: a node whose last renewal is older than `--lease-ttl` records nothing
//! until a renewal succeeds, and that renewal finds it fenced ([`super::Cluster::may_sell`]).
//! Started again on the forgotten disk, a node whose disk holds orders MySQL lacked refuses to
//! start (its lease was settled without them).

use super::registry::DB_NOW_MS;
use super::{db, ClusterError};
use crate::journal::mysql::{check_schema, connect, MySqlConfig, SchemaError};
use sqlx::Row;
use std::time::Duration;

/// What forgetting a node did.
#[derive(Debug)]
pub struct Forgotten {
    /// Units of its lease returned to the pool.
    pub returned: i64,
    /// Events (order changes) it acknowledged that MySQL never received: `(first seq, last seq)`.
    pub lost_events: Option<(u64, u64)>,
    /// Its open orders, now waiting for a live node to adopt them.
    pub open_orders: i64,
}

/// Why a node was not forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// Something the operator must change (exit 2).
    #[error("{0}")]
    Refused(String),
    /// The database's schema does not fit (exit 2 for an unmigrated or newer one).
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// MySQL failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// The refusal for a node that renewed within `ttl` (`None`: it may be forgotten).
fn alive(node: &str, state: &str, age_ms: i64, ttl: Duration) -> Option<ForgetError> {
    (state == "live" && age_ms < ttl.as_millis() as i64).then(|| {
        ForgetError::Refused(format!(
            "node {node} renewed {age_ms} ms ago: it is alive (stop it first, or wait --lease-ttl {})",
            humantime::format_duration(ttl)
        ))
    })
}

/// Forgets `node` in the database `mysql` names, unless it renewed within `ttl`.
pub async fn forget(
    mysql: &MySqlConfig,
    node: &str,
    ttl: Duration,
) -> Result<Forgotten, ForgetError> {
    let pool = connect(mysql).map_err(ClusterError::from)?;
    check_schema(&pool).await?;
    let timeout = mysql.statement_timeout;
    let row = sqlx::query(&format!(
        "SELECT state, {DB_NOW_MS} - renewed_at_ms, event_seq, \
         (SELECT CAST(COALESCE(MAX(seq), 0) AS SIGNED) FROM outbox WHERE node = ?) \
         FROM cluster_nodes WHERE node_id = ?"
    ))
    .bind(node)
    .bind(node)
    .fetch_optional(&pool)
    .await
    .map_err(db("reading the node in cluster_nodes"))?
    .ok_or_else(|| ForgetError::Refused(format!("no node {node} in cluster_nodes")))?;
    let state: String = row.try_get(0).map_err(db("reading cluster_nodes"))?;
    let age_ms: i64 = row.try_get(1).map_err(db("reading cluster_nodes"))?;
    let reported: i64 = row.try_get(2).map_err(db("reading cluster_nodes"))?;
    // What MySQL holds of its events: its outbox (a MySQL journal's, or one relayed from it), or
    // the events of the last record of its log MySQL has (write-behind ships its log there).
    let in_outbox: i64 = row.try_get(3).map_err(db("reading the outbox"))?;
    let (_, next_seq) = crate::journal::mysql::log_end(&pool, node)
        .await
        .map_err(ClusterError::from)?;
    let shipped = in_outbox.max(i64::try_from(next_seq).unwrap_or(i64::MAX) - 1);
    if let Some(refused) = alive(node, &state, age_ms, ttl) {
        return Err(refused);
    }
    // A process that holds the node's journal lock runs (or was paused less than the lock
    // session's idle limit ago): forgetting it would give away a lease it may still sell from.
    let holder = crate::journal::mysql::writer_lock::holder(&pool, node)
        .await
        .map_err(db("asking who holds the node's journal lock"))?;
    if let Some(connection) = holder {
        return Err(ForgetError::Refused(format!(
            "node {node}'s process still holds its journal lock in MySQL (connection {connection}): it runs, or is paused; stop it first (a paused process's hold ends within {}s of its last word, or end it with KILL {connection} on the server)",
            crate::journal::mysql::writer_lock::SESSION_IDLE_MAX.as_secs()
        )));
    }
    // Judged again in the transaction that marks it dead, on its row locked: a node that started
    // since (it registers on that row) is alive, and is not forgotten.
    let owned = node.to_owned();
    let marked: Result<u64, ForgetError> =
        crate::journal::mysql::in_transaction!(&pool, timeout, |tx| {
            let row = sqlx::query(&format!(
                "SELECT state, {DB_NOW_MS} - renewed_at_ms FROM cluster_nodes \
                 WHERE node_id = ? FOR UPDATE"
            ))
            .bind(&owned)
            .fetch_one(&mut *tx)
            .await?;
            let (state, age_ms): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
            if let Some(refused) = alive(&owned, &state, age_ms, ttl) {
                Err(refused)
            } else {
                sqlx::query(
                    "UPDATE cluster_nodes SET state = 'dead', mode = 'mysql', epoch = epoch + 1, \
                     reaped_at_ms = NULL WHERE node_id = ?",
                )
                .bind(&owned)
                .execute(&mut *tx)
                .await?;
                Ok(sqlx::query_scalar::<_, u64>(
                    "SELECT epoch FROM cluster_nodes WHERE node_id = ?",
                )
                .bind(&owned)
                .fetch_one(&mut *tx)
                .await?)
            }
        })
        .await
        .map_err(db("marking the node dead in cluster_nodes"))?;
    let epoch = marked?;
    let returned = super::reaper::settle_on(&pool, timeout, node, epoch)
        .await?
        .unwrap_or(0);
    let open_orders: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM orders WHERE node = ? \
         AND (status IN ('reserved', 'payment_pending') OR payment_due IS NOT NULL)",
    )
    .bind(node)
    .fetch_one(&pool)
    .await
    .map_err(db("counting the node's open orders"))?;
    pool.close().await;
    Ok(Forgotten {
        returned,
        lost_events: (reported > shipped).then_some((shipped as u64 + 1, reported as u64)),
        open_orders,
    })
}
