//! `turnstile mysql-apply`: what an operator does with the applier (see [`super::projection`]).

use super::projection::{Follower, MySqlBacklog};
use super::{check_schema, connect, log_end, MySqlConfig, SchemaError};
use crate::journal::JournalError;
use sqlx::Row;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

fn unavailable(error: sqlx::Error) -> SchemaError {
    SchemaError::Journal(JournalError::Unavailable(error.to_string()))
}

/// Records that the applier may go past `lsn` (a row in `journal_skips`): a record the applier has
/// not applied yet, in the journal table or the next one it would ship there (write-behind);
/// anything else is refused ([`SchemaError::NotSkippable`]), nothing stored.
pub async fn skip(config: &MySqlConfig, lsn: u64, reason: &str) -> Result<(), SchemaError> {
    let pool = connect(config)?;
    check_schema(&pool).await?;
    let (applied, _) = cursor(&pool).await?;
    let (last, _) = log_end(&pool).await?;
    if lsn <= applied || lsn > last + 1 {
        pool.close().await;
        return Err(SchemaError::NotSkippable { lsn, applied, last });
    }
    sqlx::query(
        "INSERT INTO journal_skips (lsn, reason, at_ms) VALUES (?, ?, ?) \
         ON DUPLICATE KEY UPDATE reason = VALUES(reason), at_ms = VALUES(at_ms)",
    )
    .bind(lsn as i64)
    .bind(reason)
    .bind(crate::time::now_ms())
    .execute(&pool)
    .await
    .map_err(unavailable)?;
    pool.close().await;
    Ok(())
}

/// Applies the journal table's records after `after_lsn` to the projections; returns how many
/// were newly applied (those the cursor already covered are left alone).
pub async fn replay(config: &MySqlConfig, after_lsn: u64) -> Result<u64, SchemaError> {
    let pool = connect(config)?;
    check_schema(&pool).await?;
    let (last_lsn, _) = log_end(&pool).await?;
    let (follower, applier) = Follower::new(
        pool.clone(),
        Arc::new(MySqlBacklog(pool.clone())),
        None,
        last_lsn,
        Arc::new(AtomicU64::new(0)),
        config.statement_timeout,
    );
    let before = cursor(&pool).await?;
    applier.catch_up_from(Some(after_lsn)).await?;
    drop(follower);
    let after = cursor(&pool).await?;
    pool.close().await;
    Ok(after.0.saturating_sub(before.0))
}

pub(super) async fn cursor(pool: &sqlx::MySqlPool) -> Result<(u64, u64), SchemaError> {
    let row =
        sqlx::query("SELECT applied_lsn, applied_seq FROM projection_cursor WHERE name = 'tables'")
            .fetch_one(pool)
            .await
            .map_err(unavailable)?;
    let lsn: i64 = row.try_get(0).map_err(unavailable)?;
    let seq: i64 = row.try_get(1).map_err(unavailable)?;
    Ok((lsn as u64, seq as u64))
}

/// One line: where the applier stands.
pub async fn status(config: &MySqlConfig) -> Result<String, SchemaError> {
    let pool = connect(config)?;
    check_schema(&pool).await?;
    let (applied_lsn, applied_seq) = cursor(&pool).await?;
    let (last_lsn, next_seq) = log_end(&pool).await?;
    let skipped: Vec<String> = sqlx::query("SELECT lsn FROM journal_skips ORDER BY lsn")
        .fetch_all(&pool)
        .await
        .map_err(unavailable)?
        .iter()
        .filter_map(|row| row.try_get::<i64, _>(0).ok())
        .map(|lsn| lsn.to_string())
        .collect();
    pool.close().await;
    Ok(format!(
        "applied_lsn={applied_lsn} applied_seq={applied_seq} journal_last_lsn={last_lsn} journal_last_seq={} behind={} skipped=[{}]",
        next_seq - 1,
        last_lsn.saturating_sub(applied_lsn),
        skipped.join(",")
    ))
}
