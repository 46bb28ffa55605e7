//! `turnstile mysql-apply`: what an operator does with the applier (see [`super::projection`]),
//! on one node's log: the one [`MySqlConfig::node`] names, else the database's only one.

use super::projection::{Follower, MySqlBacklog};
use super::{check_schema, connect, log_end, MySqlConfig, SchemaError};
use crate::journal::JournalError;
use sqlx::Row;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

fn unavailable(error: sqlx::Error) -> SchemaError {
    SchemaError::Journal(JournalError::Unavailable(error.to_string()))
}

/// The node whose log the tool works on: the one `config` names, else the only node with a log
/// in the database (`None`: none has one yet); refused when there are several
/// ([`SchemaError::WhichNode`]).
async fn tool_node(
    pool: &sqlx::MySqlPool,
    config: &MySqlConfig,
) -> Result<Option<String>, SchemaError> {
    if !config.node.is_empty() {
        return Ok(Some(config.node.clone()));
    }
    let rows = sqlx::query("SELECT node FROM projection_cursor ORDER BY node LIMIT 10")
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
    let mut nodes = Vec::with_capacity(rows.len());
    for row in &rows {
        nodes.push(super::text(row, 0).map_err(unavailable)?);
    }
    match nodes.len() {
        0 => Ok(None),
        1 => Ok(nodes.pop()),
        _ => Err(SchemaError::WhichNode { nodes }),
    }
}

/// Records that the applier may go past `lsn` (a row in `journal_skips`): a record the applier has
/// not applied yet, in the node's log or the next one it would ship there (write-behind);
/// anything else is refused ([`SchemaError::NotSkippable`]), nothing stored.
pub async fn skip(config: &MySqlConfig, lsn: u64, reason: &str) -> Result<(), SchemaError> {
    let pool = connect(config)?;
    check_schema(&pool).await?;
    let node = tool_node(&pool, config).await?;
    let node_name = node.as_deref().unwrap_or_default();
    let (applied, _) = cursor(&pool, node_name).await?;
    let (last, _) = log_end(&pool, node_name).await?;
    if lsn <= applied || lsn > last + 1 {
        pool.close().await;
        return Err(SchemaError::NotSkippable { lsn, applied, last });
    }
    let Some(node) = node else {
        pool.close().await;
        return Err(SchemaError::WhichNode { nodes: Vec::new() });
    };
    sqlx::query(
        "INSERT INTO journal_skips (node, lsn, reason, at_ms) VALUES (?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE reason = VALUES(reason), at_ms = VALUES(at_ms)",
    )
    .bind(node.as_str())
    .bind(lsn as i64)
    .bind(reason)
    .bind(crate::time::now_ms())
    .execute(&pool)
    .await
    .map_err(unavailable)?;
    pool.close().await;
    Ok(())
}

/// Applies the node's log's records after `after_lsn` to the projections; returns how many were
/// newly applied (those the cursor already covered are left alone).
pub async fn replay(config: &MySqlConfig, after_lsn: u64) -> Result<u64, SchemaError> {
    let pool = connect(config)?;
    check_schema(&pool).await?;
    let Some(node) = tool_node(&pool, config).await? else {
        pool.close().await;
        return Ok(0);
    };
    let before = cursor(&pool, &node).await?;
    catch_up_log(&pool, &node, Some(after_lsn), config.statement_timeout).await?;
    let after = cursor(&pool, &node).await?;
    pool.close().await;
    Ok(after.0.saturating_sub(before.0))
}

/// Applies `node`'s log after `from` (default: the projections' cursor) to the projections, on
/// `pool`, through the one applier (`turnstile mysql-apply --replay-from`; several nodes' reaper,
/// which brings a dead node's projections up to its log's end before it counts what its durable
/// orders hold). Records the projections already hold are left alone, so it may run beside the
/// node's own applier.
pub(crate) async fn catch_up_log(
    pool: &sqlx::MySqlPool,
    node: &str,
    from: Option<u64>,
    timeout: std::time::Duration,
) -> Result<(), JournalError> {
    let (last_lsn, _) = log_end(pool, node).await?;
    let (follower, applier) = Follower::new(
        pool.clone(),
        node.to_owned(),
        Arc::new(MySqlBacklog::new(pool.clone(), node.to_owned())),
        None,
        last_lsn,
        Arc::new(AtomicU64::new(0)),
        timeout,
    );
    applier.catch_up_from(from).await?;
    drop(follower);
    Ok(())
}

/// `node`'s projections' cursor: the last lsn and event seq they hold (0, 0 for a node without a
/// log yet).
pub(super) async fn cursor(pool: &sqlx::MySqlPool, node: &str) -> Result<(u64, u64), SchemaError> {
    let row = sqlx::query("SELECT applied_lsn, applied_seq FROM projection_cursor WHERE node = ?")
        .bind(node)
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?;
    let Some(row) = row else {
        return Ok((0, 0));
    };
    let lsn: i64 = row.try_get(0).map_err(unavailable)?;
    let seq: i64 = row.try_get(1).map_err(unavailable)?;
    Ok((lsn as u64, seq as u64))
}

/// One line: where the node's applier stands.
pub async fn status(config: &MySqlConfig) -> Result<String, SchemaError> {
    let pool = connect(config)?;
    check_schema(&pool).await?;
    let node = tool_node(&pool, config).await?.unwrap_or_default();
    let (applied_lsn, applied_seq) = cursor(&pool, &node).await?;
    let (last_lsn, next_seq) = log_end(&pool, &node).await?;
    let skipped: Vec<String> =
        sqlx::query("SELECT lsn FROM journal_skips WHERE node = ? ORDER BY lsn")
            .bind(node.as_str())
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?
            .iter()
            .filter_map(|row| row.try_get::<i64, _>(0).ok())
            .map(|lsn| lsn.to_string())
            .collect();
    pool.close().await;
    Ok(format!(
        "node={node} applied_lsn={applied_lsn} applied_seq={applied_seq} journal_last_lsn={last_lsn} journal_last_seq={} behind={} skipped=[{}]",
        next_seq - 1,
        last_lsn.saturating_sub(applied_lsn),
        skipped.join(",")
    ))
}
