//! Write-behind (`--mysql-write-behind`): the embedded journal in `--data-dir` acknowledges
//! (fdatasync group commit), and MySQL follows it.
//!
//! Mechanism: the embedded journal's writer hands every committed batch to the MySQL applier
//! ([`crate::journal::mysql::projection`]), the same one that keeps the projections behind the
//! MySQL journal; here it also writes the log rows (`journal`, with their claims), in the same
//! transaction as the projections and the durable cursor (`projection_cursor`), so a record
//! reaches MySQL exactly once, in lsn order, however often it is replayed. Records it was not
//! handed (after a restart, or durable before it started) it reads from the segments on disk;
//! the embedded journal keeps every segment holding a record past MySQL's cursor, whatever
//! `--event-retention` says. MySQL's `outbox` stays empty in this mode: the events live in the
//! embedded journal, where the relay and `GET /v1/events` read them.
//!
//! The trade: an acknowledged order is on this node's disk before it is in MySQL. The lag is
//! bounded: past `--mysql-lag-max` (the age of the oldest record MySQL does not hold yet)
//! checkouts wait before they are journaled (backpressure; past `QUEUE_RECORDS_MAX` waiting, new
//! ones are refused as overloaded) and `/readyz` answers 503 naming the lag, so a load balancer
//! sends buyers elsewhere. The wait itself is bounded too: a record still waiting when its
//! deadline comes (a little before `--journal-timeout`, so its request learns the outcome) is
//! not journaled at all, and its request answers `503 journal_unavailable` with nothing changed.
//! An unbounded wait would let a checkout commit long after its client was told "outcome
//! unknown" and after its Redis lock expired, so another node could take the same key meanwhile
//! (one key, two orders).
//!
//! The log MySQL holds is the node's own ([`MySqlConfig::node`]: the data dir's name, or the
//! `--node-id`), beside other nodes' logs. Start-up refuses a data dir that is not the one MySQL
//! follows: the last record of the node's log in MySQL must be in the data dir, byte for byte. A
//! node with no log in MySQL yet adopts the database's unnamed log (a single node's, migrated
//! from before several nodes) only if its data dir holds that log's last record.

use super::file::{FileJournal, FileJournalConfig};
use super::mysql::projection::{Follower, Lag};
use super::mysql::writer_lock::WriterLock;
use super::mysql::{
    adopt_unnamed_log, check_schema, connect, log_end, log_node, open_cursor, purge_answers,
    read_order, unnamed_log_end, MySqlConfig, SchemaError,
};
use super::pipeline::QUEUE_RECORDS_MAX;
use super::{Journal, JournalError, JournalStats, Ticket};
use crate::domain::OrderId;
use crate::engine::order::Order;
use crate::engine::records::{Event, Record, State};
use crate::BoxFuture;
use sqlx::mysql::MySqlPool;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The embedded journal with MySQL written behind it.
pub struct WriteBehindJournal {
    file: Arc<FileJournal>,
    pool: MySqlPool,
    /// The node whose log MySQL holds (the data dir's name, or the `--node-id`).
    node: String,
    /// This node's hold on the database it ships its log to (one node per journal database).
    writer_lock: WriterLock,
    follower: Follower,
    lag_max: Duration,
    shutdown_grace: Duration,
    /// Appends waiting for MySQL to catch up (backpressure).
    waiting: Arc<AtomicUsize>,
    /// How long an append may wait for MySQL to catch up before it is given up, not journaled.
    wait_max: Duration,
    /// `--mysql-timeout`, for reads of MySQL.
    statement_timeout: Duration,
}

/// Whether the data dir `dir` (its journal ending at `local_last`, its records in `backlog`) is
/// the one MySQL follows for `node`: MySQL's last record of the node's log (or of the unnamed log,
/// when the node has none yet) is in the data dir, byte for byte. Gives back the node's log end
/// in MySQL and the unnamed log's (0 when the node has a log of its own).
async fn fits(
    pool: &MySqlPool,
    node: &str,
    backlog: &Arc<dyn crate::journal::downstream::Source<crate::journal::pipeline::Committed>>,
    local_last: u64,
    dir: &std::path::Path,
) -> Result<(u64, u64), SchemaError> {
    let (mysql_last_lsn, _) = log_end(pool, node).await?;
    // No log of its own yet: the unnamed log is this node's if its data dir holds it.
    let unnamed_last_lsn = match mysql_last_lsn {
        0 => unnamed_log_end(pool).await?,
        _ => 0,
    };
    let (log, followed_lsn) = match unnamed_last_lsn {
        0 => (node, mysql_last_lsn),
        unnamed => ("", unnamed),
    };
    if followed_lsn > local_last {
        return Err(unfit(format!(
            "MySQL holds records up to lsn {followed_lsn} in the log of {}, but the data dir {} ends at {}: this is not the data dir MySQL follows (or MySQL was written in --mysql-url journal mode)",
            log_name(log),
            dir.display(),
            local_last
        )));
    }
    if followed_lsn > 0 {
        let mine = backlog.read(followed_lsn - 1, 1).await?;
        let theirs = sqlx::query("SELECT record FROM journal WHERE node = ? AND lsn = ?")
            .bind(log)
            .bind(followed_lsn as i64)
            .fetch_one(pool)
            .await
            .map_err(|e| JournalError::Unavailable(e.to_string()))?;
        let theirs: Vec<u8> =
            sqlx::Row::try_get(&theirs, 0).map_err(|e| JournalError::Unavailable(e.to_string()))?;
        if mine.first().map(|c| c.payload.as_slice()) != Some(theirs.as_slice()) {
            return Err(unfit(format!(
                "record {followed_lsn} of the log of {} in MySQL differs from the one in the data dir {}: this is not the data dir MySQL follows",
                log_name(log),
                dir.display()
            )));
        }
    }
    Ok((mysql_last_lsn, unnamed_last_lsn))
}

fn unfit(reason: String) -> SchemaError {
    SchemaError::Journal(JournalError::Corrupt {
        file: "MySQL table journal".into(),
        offset: 0,
        reason,
    })
}

impl WriteBehindJournal {
    /// Opens the embedded journal in `dir`, checks that MySQL follows it, and starts the applier
    /// (which brings MySQL up to date in the background).
    /// `journal_timeout` is how long a request waits for its commit: an append held by
    /// backpressure is given up a little before it, so the request hears that nothing changed.
    pub async fn open(
        dir: &std::path::Path,
        mut file_config: FileJournalConfig,
        mysql: MySqlConfig,
        journal_timeout: Duration,
    ) -> Result<(Self, State), SchemaError> {
        let node = log_node(&mysql)?;
        let pool = connect(&mysql)?;
        check_schema(&pool).await?;
        let applied_lsn = Arc::new(AtomicU64::new(0));
        file_config.hold_after_lsn = Some(Arc::clone(&applied_lsn));
        let (file, state) = FileJournal::open_dir(dir, file_config)?;
        let file = Arc::new(file);
        let backlog = file.backlog();
        // Whether this data dir is the one MySQL follows, checked before the writer lock is
        // taken (taking it moves the node's fence on, which would stop a paused node of the same
        // name for nothing if this start then failed), and again once it is held.
        let fit = || fits(&pool, &node, &backlog, state.last_lsn, dir);
        fit().await?;
        let writer_lock = WriterLock::take(
            &mysql.url,
            &node,
            mysql.node_id.is_none(),
            mysql.statement_timeout,
        )
        .await?;
        let (mut mysql_last_lsn, unnamed_last_lsn) = fit().await?;
        if unnamed_last_lsn > 0 {
            if !adopt_unnamed_log(&pool, &node).await? {
                return Err(unfit(format!(
                    "another node adopted the unnamed log while this one started (its data dir {} holds that log): start this node again",
                    dir.display()
                )));
            }
            mysql_last_lsn = log_end(&pool, &node).await?.0;
        }
        open_cursor(&pool, &node).await?;
        let (follower, applier) = Follower::new(
            pool.clone(),
            node.clone(),
            backlog,
            Some(writer_lock.fence()),
            state.last_lsn,
            applied_lsn,
            mysql.statement_timeout,
        );
        file.follow(follower.start(applier));
        tracing::info!(
            node = %node,
            local_lsn = state.last_lsn,
            mysql_lsn = mysql_last_lsn,
            "write-behind: the embedded journal acknowledges, MySQL follows"
        );
        Ok((
            Self {
                file,
                pool,
                node,
                writer_lock,
                follower,
                lag_max: mysql.lag_max,
                shutdown_grace: mysql.shutdown_grace,
                waiting: Arc::new(AtomicUsize::new(0)),
                wait_max: backpressure_wait_max(journal_timeout),
                statement_timeout: mysql.statement_timeout,
            },
            state,
        ))
    }

    /// How far MySQL is behind the embedded journal.
    pub fn lag(&self) -> &Lag {
        &self.follower.lag
    }
}

/// How a log is named in a message: the node's, or the unnamed one.
fn log_name(node: &str) -> String {
    match node {
        "" => "the unnamed log (a single node's, from before several nodes)".to_owned(),
        node => format!("node {node}"),
    }
}

/// How long an append may wait for MySQL: nine tenths of the request's wait for its commit (at
/// most a second less), so a record given up here is answered "nothing changed" before the
/// request's own timeout would have to say "outcome unknown".
fn backpressure_wait_max(journal_timeout: Duration) -> Duration {
    journal_timeout.saturating_sub((journal_timeout / 10).min(Duration::from_secs(1)))
}

impl Journal for WriteBehindJournal {
    fn append(&self, record: Record) -> Ticket {
        // None while another node holds the database's journal, or once it took over: the
        // embedded journal would take it, but MySQL never would.
        if let Err(error) = self.writer_lock.check() {
            return Ticket::failed(error);
        }
        let lag = Arc::clone(&self.follower.lag);
        if lag.seconds() <= self.lag_max.as_secs_f64() {
            return self.file.append(record);
        }
        // Backpressure: MySQL is too far behind; the record is journaled once it has caught up
        // enough (never dropped). Without a runtime to wait on, it goes ahead.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.file.append(record);
        };
        // Bounded like the pipeline's queue: while MySQL is down for long, every checkout would
        // otherwise leave a task (and its record, and its held stock) waiting for ever.
        let waiting = Arc::clone(&self.waiting);
        if waiting.fetch_add(1, Ordering::AcqRel) >= QUEUE_RECORDS_MAX {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return Ticket::failed(JournalError::Overloaded(QUEUE_RECORDS_MAX));
        }
        let (answer, receiver) = tokio::sync::oneshot::channel();
        let (file, lag_max, wait_max) = (Arc::clone(&self.file), self.lag_max, self.wait_max);
        runtime.spawn(async move {
            let caught_up = tokio::time::timeout(wait_max, lag.wait_within(lag_max)).await;
            waiting.fetch_sub(1, Ordering::AcqRel);
            let outcome = match caught_up {
                Ok(()) => file.append(record).await,
                // Not journaled, and never will be: the request hears nothing changed.
                Err(_) => Err(JournalError::Unavailable(format!(
                    "MySQL is {:.1} s behind (past --mysql-lag-max) and did not catch up within {}; the change was not journaled",
                    lag.seconds(),
                    humantime::format_duration(wait_max)
                ))),
            };
            let _ = answer.send(outcome);
        });
        Ticket::waiting(receiver)
    }

    fn events(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Event>, JournalError>> {
        self.file.events(after_seq, limit)
    }

    fn order(&self, order_id: &OrderId) -> BoxFuture<'_, Result<Option<Order>, JournalError>> {
        let order_id = order_id.clone();
        Box::pin(async move {
            read_order(
                &self.pool,
                self.statement_timeout,
                self.lag(),
                &self.node,
                &order_id,
            )
            .await
        })
    }

    fn purge_answers(&self, cutoff_ms: i64) -> BoxFuture<'_, Result<u64, JournalError>> {
        Box::pin(purge_answers(&self.pool, self.statement_timeout, cutoff_ms))
    }

    fn stats(&self) -> &JournalStats {
        self.file.stats()
    }

    fn writer_turn(&self) -> Option<u64> {
        Some(self.writer_lock.fence().epoch())
    }

    fn last_event_seq(&self) -> u64 {
        self.file.last_event_seq()
    }

    fn position(&self) -> super::Position {
        let local = self.file.position();
        let mut mysql = self
            .follower
            .lag
            .position(&self.node, self.writer_lock.fence().epoch());
        mysql.applied_event_seq = None;
        super::Position {
            kind: "write-behind",
            mysql: Some(mysql),
            ..local
        }
    }

    fn events_in_memory(&self) -> usize {
        self.file.events_in_memory()
    }

    fn health(&self) -> Result<(), JournalError> {
        self.file.health()?;
        self.writer_lock.check()
    }

    fn checks(&self) -> BoxFuture<'_, Vec<(&'static str, Result<(), String>)>> {
        Box::pin(async move {
            vec![
                ("journal", self.file.health().map_err(|e| e.to_string())),
                ("mysql", self.lag().check(self.lag_max)),
            ]
        })
    }

    fn encode_metrics(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.file.stats().encode(encoder)?;
        self.lag().encode(encoder)
    }

    fn shutdown(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.file.shutdown().await;
            let drained = self.follower.stop(self.shutdown_grace).await;
            self.writer_lock.release().await;
            super::mysql::close_pool(&self.pool).await;
            drained
        })
    }
}
