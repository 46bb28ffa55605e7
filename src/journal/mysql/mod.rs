//! The MySQL/MariaDB journal: the database is the source of truth.
//!
//! WAL-style (see [`projection`] for the tables): group commit as in `journal::pipeline`; the
//! writer is a task that turns one batch into one transaction holding only the log: multi-row
//! INSERTs into the append-only `journal` table (one row per record; the row of a new order
//! carries its claims, the `UNIQUE` order id, idempotency key and payment id), then one COMMIT. Every
//! waiter is answered only after COMMIT returns. One batch is one transaction, never split: after
//! any crash the durable records are a prefix of the log (no lsn or event seq of a batch can be
//! durable while an earlier one is not). The materialised tables are projections the
//! `projection::Applier` keeps behind the log, with a durable cursor; start-up first applies
//! whatever the log holds past the cursor, then loads memory from the projections.
//!
//! Nodes: one database holds the logs of several nodes side by side, each node's rows carrying its
//! name ([`MySqlConfig::node`], decided before the journal opens); a journal is one node's log, its
//! lsns and event seqs its own, its writer lock and fence its own ([`writer_lock`]), and start-up
//! loads that node's orders and stock counters. The projections and the claims are shared (see
//! [`projection`]).
//!
//! Failures: a transient error (connection lost, server gone, deadlock 1213, lock wait timeout
//! 1205) retries the same batch with bounded backoff, for as long as it takes; the journal reports
//! itself unavailable meanwhile (`/readyz` 503, checkouts 503) and recovers by itself. Before a
//! retry it asks whether the batch's first lsn is already in `journal`, since a connection lost
//! during COMMIT leaves that unknown: a batch is never applied twice. Any other error (a claim
//! refusing a duplicate order, say) is the database refusing something in the batch: its records
//! are committed one by one, and only those refused fail (their requests get an error), so no
//! single record can stop the journal.
//!
//! Idempotency keys: an answer is kept under its key for `--idempotency-retention`; past it the
//! key starts afresh. The retention purge ([`Journal::purge_answers`]) releases expired keys'
//! claims and answers; a record whose key had an expired answer the purge has not reached yet
//! (`replaces_expired_key`) releases the old claim in its own transaction, so the `UNIQUE`
//! constraints hold within retention and never refuse a legitimate reuse.
//!
//! No wait is unbounded: every transaction and statement runs on a connection taken through
//! `bounded`, which gives up after `--mysql-timeout` (acquiring the connection included) and
//! then closes that connection instead of giving it back to the pool. On a network that went
//! silent (a stalled proxy, a dead host without a reset) a COMMIT would otherwise wait for ever,
//! and with it every checkout of its batch. A COMMIT given up this way has an unknown outcome,
//! which is settled as for a lost connection: the writer asks (on a new connection) whether the
//! batch's first lsn is in `journal` before it retries.
//!
//! Only parameterised queries (`QueryBuilder::push_bind`); nothing is checked against a live
//! database at build time.

pub mod apply_tool;
pub mod projection;
pub mod writer_lock;

use super::pipeline::{Entry, Pipeline};
use super::{Journal, JournalError, JournalStats, Ticket};
use crate::backoff::Backoff;
use crate::domain::{Cents, Currency, CustomerId, IdempotencyKey, OrderId, Sku, Stock};
use crate::engine::order::{Order, OrderItem, OrderStatus, PaymentDue};
use crate::engine::records::{Event, Product, Record, State, StoredAnswer};
use crate::sync::lock;
use crate::BoxFuture;
use projection::{write_log, Lag, MySqlBacklog, View};
use sqlx::migrate::Migrator;
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use writer_lock::Fence;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Rows per multi-row statement, largest first. A batch is cut into chunks of these sizes only, so
/// each table sees a handful of statement shapes that stay in the connection's prepared-statement
/// cache, instead of a new PREPARE for every batch size. The largest keeps the widest table far
/// below MySQL's 65,535 placeholders.
const CHUNK_ROWS: [usize; 10] = [512, 256, 128, 64, 32, 16, 8, 4, 2, 1];

/// Cuts a slice into chunks whose sizes are all in [`CHUNK_ROWS`].
trait StableChunks<T> {
    fn stable_chunks(&self) -> Vec<&[T]>;
}

impl<T> StableChunks<T> for [T] {
    fn stable_chunks(&self) -> Vec<&[T]> {
        let mut chunks = Vec::new();
        let mut rest = self;
        for size in CHUNK_ROWS {
            while rest.len() >= size {
                let (chunk, tail) = rest.split_at(size);
                chunks.push(chunk);
                rest = tail;
            }
        }
        chunks
    }
}

/// Settings of the MySQL journal.
#[derive(Debug, Clone)]
pub struct MySqlConfig {
    /// `mysql://user:password@host:port/database`.
    pub url: String,
    /// Connections in the pool: the writer uses one at a time; reads (events, readiness) share
    /// the rest.
    pub pool_size: u32,
    /// The most records one transaction takes: bounds statement sizes and lock hold times.
    pub batch_records_max: usize,
    /// How long to wait for a connection before counting the database as unreachable.
    pub connect_timeout: Duration,
    /// At shutdown, how long the writer keeps retrying a batch the database refuses.
    pub shutdown_grace: Duration,
    /// What start-up loads into memory (the rest stays in the database).
    pub retention: Retention,
    /// How far MySQL may fall behind (the projections; in write-behind, the whole log) before the
    /// node reports not ready and, in write-behind, checkouts wait.
    pub lag_max: Duration,
    /// How long one transaction or statement may take (`--mysql-timeout`), the connection's
    /// acquisition included; past it the connection is closed (`bounded`).
    pub statement_timeout: Duration,
    /// `--node-id`: this process is one node of several, each with its own log in the database.
    /// `None`: the database's one node, as before several nodes (it also holds the database's
    /// own lock, so no second node sells from the same products beside it: see
    /// [`writer_lock`]).
    pub node_id: Option<String>,
    /// The node whose log this journal is: every row of the log, the outbox, the cursors, the
    /// skips and the fence carries it, and start-up loads this node's orders and stock counters
    /// only. Decided before the journal opens: the `--node-id`; without one, the name kept in
    /// `node_name` with MySQL as the journal ([`journal_node`]), or the data dir's name in
    /// write-behind. Empty: not decided yet (opening the journal refuses it).
    pub node: String,
}

/// How long finished orders and kept answers stay in memory.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Finished orders created longer ago than this are not loaded.
    pub order_ms: i64,
    /// Answers older than this are not loaded.
    pub answer_ms: i64,
}

impl MySqlConfig {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 8,
            batch_records_max: 2_000,
            connect_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            lag_max: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
            node_id: None,
            node: String::new(),
            retention: Retention {
                order_ms: 7 * 24 * 3_600 * 1_000,
                answer_ms: 24 * 3_600 * 1_000,
            },
        }
    }
}

fn db_error(context: &str, error: &sqlx::Error) -> JournalError {
    JournalError::Io {
        context: context.to_owned(),
        message: error.to_string(),
    }
}

fn corrupt(table: &str, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        file: format!("MySQL table {table}"),
        offset: 0,
        reason: reason.into(),
    }
}

/// A pooled connection lent to one bounded piece of work (`bounded`): dropped before the work
/// ended (the work was given up mid-statement), it is taken out of the pool and its socket closed,
/// since its protocol state is unknown and a graceful close could wait on the same silent network.
pub(crate) struct Bounded(Option<PoolConnection<MySql>>);

impl std::ops::Deref for Bounded {
    type Target = MySqlConnection;

    fn deref(&self) -> &MySqlConnection {
        match &self.0 {
            Some(connection) => connection,
            None => unreachable!("a bounded connection is only emptied when it ends"),
        }
    }
}

impl std::ops::DerefMut for Bounded {
    fn deref_mut(&mut self) -> &mut MySqlConnection {
        match &mut self.0 {
            Some(connection) => connection,
            None => unreachable!("a bounded connection is only emptied when it ends"),
        }
    }
}

impl Bounded {
    /// The work ended: the connection goes back to the pool.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            // Out of the pool (which may open another) and dropped: the socket closes at once.
            drop(connection.detach());
        }
    }
}

/// Whether `outcome` is a piece of work given up at its timeout (see [`timed_out`]).
pub(crate) fn given_up<T>(outcome: &Result<T, sqlx::Error>) -> bool {
    matches!(outcome, Err(sqlx::Error::Io(error)) if error.kind() == std::io::ErrorKind::TimedOut)
}

/// The error of a piece of work given up after `timeout`: I/O, so transient (retried, and a lost
/// COMMIT's outcome looked up first).
fn timed_out(timeout: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "MySQL did not answer within {} (--mysql-timeout); the connection was closed",
            humantime::format_duration(timeout)
        ),
    ))
}

/// Runs `work` on a connection of `pool`, all of it (taking the connection included) within
/// `timeout`. `work` gets the connection and gives it back with its result; if the time runs out
/// first, the work is dropped where it stands and its connection closed (see [`Bounded`]), and
/// the answer is an I/O timeout.
pub(crate) async fn bounded<T, F, Fut>(
    pool: &MySqlPool,
    timeout: Duration,
    work: F,
) -> Result<T, sqlx::Error>
where
    F: FnOnce(Bounded) -> Fut,
    Fut: std::future::Future<Output = (Bounded, Result<T, sqlx::Error>)>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let connection = match tokio::time::timeout_at(deadline, pool.acquire()).await {
        Ok(connection) => connection?,
        Err(_) => return Err(timed_out(timeout)),
    };
    match tokio::time::timeout_at(deadline, work(Bounded(Some(connection)))).await {
        Ok((connection, result)) => {
            connection.release();
            result
        }
        Err(_) => Err(timed_out(timeout)),
    }
}

/// Runs `$body` in one transaction on a `bounded` connection of `$pool`, within `$timeout`:
/// `$tx` is the transaction (`&mut *$tx` for queries), `?` works inside the body, and the
/// transaction commits after it. The transaction first asks for its session's id (one round
/// trip): given up at the timeout, the transaction is never committed by this side (its
/// connection is closed) and its session is ended on the server (`KILL`), so its locks go now,
/// not whenever the server notices its client gone, and a COMMIT of it still on its way finds
/// no session. Whether it had committed first, the caller learns as after a lost connection.
macro_rules! in_transaction {
    ($pool:expr, $timeout:expr, |$tx:ident| $body:block) => {
        async {
            let (pool, timeout) = ($pool, $timeout);
            let session = std::sync::atomic::AtomicU64::new(0);
            let session_id = &session;
            let outcome =
                $crate::journal::mysql::bounded(pool, timeout, |mut connection| async move {
                    let result = async {
                        let mut $tx = sqlx::Connection::begin(&mut *connection).await?;
                        let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                            .fetch_one(&mut *$tx)
                            .await?;
                        session_id.store(id, std::sync::atomic::Ordering::Release);
                        let value = $body;
                        $tx.commit().await?;
                        Ok::<_, sqlx::Error>(value)
                    }
                    .await;
                    (connection, result)
                })
                .await;
            let id = session.load(std::sync::atomic::Ordering::Acquire);
            if id > 0 && $crate::journal::mysql::given_up(&outcome) {
                $crate::journal::mysql::kill_session(pool, timeout, id).await;
            }
            outcome
        }
    };
}
pub(crate) use in_transaction;

/// One query's rows on a bounded connection.
pub(crate) async fn fetch_all_bounded(
    pool: &MySqlPool,
    timeout: Duration,
    query: sqlx::query::Query<'_, MySql, sqlx::mysql::MySqlArguments>,
) -> Result<Vec<sqlx::mysql::MySqlRow>, sqlx::Error> {
    bounded(pool, timeout, |mut connection| async move {
        let rows = query.fetch_all(&mut *connection).await;
        (connection, rows)
    })
    .await
}

/// How long the server keeps a pool session that says nothing (its `wait_timeout`): a node that
/// vanished without closing its sockets (a host gone, a network cut) leaves its sessions, and
/// with them any transaction still open and the rows it locks, for at most this long, not the
/// server's default of hours (a node taking the database over would wait on those rows).
pub const POOL_SESSION_IDLE_MAX: Duration = Duration::from_secs(30);

/// How long the server keeps a pool session's transaction open while the session says nothing
/// (MariaDB's `idle_transaction_timeout`): every transaction sends its statements back to back,
/// so only a process that stopped mid-transaction meets it.
pub const POOL_TRANSACTION_IDLE_MAX: Duration = Duration::from_secs(5);

/// Connects a pool (no query is sent yet). The pool closes its idle connections before the server
/// would ([`POOL_SESSION_IDLE_MAX`]).
pub fn connect(config: &MySqlConfig) -> Result<MySqlPool, JournalError> {
    let options = MySqlConnectOptions::from_str(&config.url).map_err(|e| JournalError::Io {
        context: "reading --mysql-url".into(),
        message: e.to_string(),
    })?;
    Ok(MySqlPoolOptions::new()
        .max_connections(config.pool_size.max(2))
        .acquire_timeout(config.connect_timeout)
        .idle_timeout(POOL_SESSION_IDLE_MAX / 2)
        .after_connect(|connection, _| {
            Box::pin(async move {
                sqlx::query(&format!(
                    "SET SESSION wait_timeout = {}",
                    POOL_SESSION_IDLE_MAX.as_secs()
                ))
                .execute(&mut *connection)
                .await?;
                // MariaDB: a transaction left open by a process that stopped (paused, host
                // gone) ends after this, not after `wait_timeout`, so the rows it locks (a
                // projection cursor a reaper needs) are free soon. MySQL has no such variable
                // (error 1193): its sessions end with `wait_timeout`.
                match sqlx::query(&format!(
                    "SET SESSION idle_transaction_timeout = {}",
                    POOL_TRANSACTION_IDLE_MAX.as_secs()
                ))
                .execute(&mut *connection)
                .await
                {
                    Err(sqlx::Error::Database(e))
                        if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                            .is_some_and(|m| m.number() == 1193) =>
                    {
                        Ok(())
                    }
                    other => other.map(|_| ()),
                }
            })
        })
        .connect_lazy_with(options))
}

/// Applies the embedded migrations.
pub async fn migrate(config: &MySqlConfig) -> Result<usize, SchemaError> {
    let pool = connect(config)?;
    let before = match applied_versions(&pool).await {
        Ok(applied) => applied.len(),
        Err(error) => match login_refused(&error) {
            Some(refused) => return Err(SchemaError::Refused(refused)),
            // No migrations table yet (a fresh database): the migrator makes it.
            None => 0,
        },
    };
    MIGRATOR.run(&pool).await.map_err(|e| JournalError::Io {
        context: "applying migrations".into(),
        message: e.to_string(),
    })?;
    let after = applied_versions(&pool).await.unwrap_or_default().len();
    pool.close().await;
    Ok(after.saturating_sub(before))
}

async fn applied_versions(pool: &MySqlPool) -> Result<Vec<i64>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT version FROM _sqlx_migrations WHERE success = TRUE ORDER BY version")
            .fetch_all(pool)
            .await?;
    rows.iter().map(|r| r.try_get::<i64, _>(0)).collect()
}

/// Why the schema does not fit this binary.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Migrations are missing: run `turnstile migrate`.
    #[error("the database is not migrated ({missing} migration(s) missing): run `turnstile migrate --mysql-url URL` first")]
    Unmigrated {
        /// How many of the embedded migrations are not applied.
        missing: usize,
    },
    /// The database has migrations this binary does not know: it is newer.
    #[error("the database schema is newer than this binary (unknown migration {version}): upgrade turnstile")]
    Newer {
        /// The first unknown version.
        version: i64,
    },
    /// The database refused the login or the database of `--mysql-url` (wrong user, password or
    /// database name): the operator must change the URL.
    #[error("MySQL refused --mysql-url: {0} (check the user, password and database name in the URL; the URL is not shown)")]
    Refused(String),
    /// Another process holds a journal lock this node needs ([`writer_lock`]): its log's, or the
    /// database's own (a node without `--node-id` is the database's one node).
    #[error("another node holds the journal of this database ({held}, MySQL connection {}): one process per node's log, and one node per database without --node-id; if that node is gone its hold ends within {}s of its last word, or end it with KILL on the server", holder.map_or("unknown".into(), |h| h.to_string()), writer_lock::SESSION_IDLE_MAX.as_secs())]
    JournalHeld {
        /// The holder's connection id, if the server said.
        holder: Option<u64>,
        /// What it holds: the log of a node, or the database.
        held: String,
    },
    /// The projections' cursor is past the log's end: the tables hold records no journal has.
    #[error("the projections are ahead of the journal (projection_cursor.applied_lsn {applied}, the journal table ends at {last}): the tables hold records no journal has, written by a node that had lost this database; look at the orders, inventory and outbox rows past lsn {last}, remove them, and set the cursor back to {last} before starting a node")]
    ProjectionsAhead {
        /// The projections' cursor.
        applied: u64,
        /// The journal table's last lsn.
        last: u64,
    },
    /// `mysql-apply --skip` of a record the applier cannot be stopped at.
    #[error("record {lsn} cannot be skipped: the applier has applied up to {applied} and the journal table ends at {last} (skip a record after {applied}, at most {})", last + 1)]
    NotSkippable {
        /// The lsn asked for.
        lsn: u64,
        /// The projections' cursor.
        applied: u64,
        /// The journal table's last lsn.
        last: u64,
    },
    /// The node that held this database's journal before still has a transaction open on it.
    #[error("a transaction of the node that held this journal before is still open on the database (its COMMIT may be in flight; it ends when the server ends that session, or with KILL: see information_schema.innodb_trx): start again once it is gone")]
    JournalBusy,
    /// The journal was to be opened without knowing whose log it is ([`MySqlConfig::node`]).
    #[error("no node is named for the MySQL journal ({0:?}): a node's log needs its name")]
    NoNode(String),
    /// A tool was not told which node's log to work on, and the database holds several or none.
    #[error("which node's log? this database holds {}: pass --node NAME", if nodes.is_empty() { "no node's log yet".to_owned() } else { format!("the logs of {}", nodes.join(", ")) })]
    WhichNode {
        /// The nodes whose logs the database holds.
        nodes: Vec<String>,
    },
    /// The `node_name` table holds something else than a node name (edited by hand).
    #[error("the node_name table holds {0:?}, not a node name (node_ and then letters, digits or _, at most 64 bytes): put back the name this journal's node had, or, if it never made a payment, delete the row for a new one")]
    NodeName(String),
    /// The database could not be asked.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// The server's words when `error` is MySQL refusing the login or the database itself (1044
/// database access denied, 1045 access denied, 1049 unknown database, 1698 access denied for
/// the authentication plugin): a configuration to change, not an outage to wait out.
fn login_refused(error: &sqlx::Error) -> Option<String> {
    let sqlx::Error::Database(database) = error else {
        return None;
    };
    let code = database
        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|m| m.number())?;
    matches!(code, 1044 | 1045 | 1049 | 1698).then(|| database.message().to_owned())
}

/// Checks that exactly the embedded migrations are applied.
pub async fn check_schema(pool: &MySqlPool) -> Result<(), SchemaError> {
    let applied = match applied_versions(pool).await {
        Ok(applied) => applied,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42S02") => Vec::new(),
        Err(e) => {
            return Err(match login_refused(&e) {
                Some(refused) => SchemaError::Refused(refused),
                None => db_error("reading the applied migrations", &e).into(),
            })
        }
    };
    let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    if let Some(&version) = applied.iter().find(|v| !known.contains(v)) {
        return Err(SchemaError::Newer { version });
    }
    let missing = known.iter().filter(|v| !applied.contains(v)).count();
    if missing > 0 {
        return Err(SchemaError::Unmigrated { missing });
    }
    Ok(())
}

/// The journal on MySQL/MariaDB: one node's log in it.
pub struct MySqlJournal {
    pool: MySqlPool,
    /// The node whose log this is ([`MySqlConfig::node`]).
    node: String,
    /// This node's hold on the database as its journal's one writer.
    writer_lock: writer_lock::WriterLock,
    pipeline: Arc<Pipeline>,
    /// How many parts of the current batch the database did not take and the writer retries.
    degraded: Arc<AtomicUsize>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The applier keeping the projections behind the log.
    follower: projection::Follower,
    shutdown_grace: Duration,
    /// Past this lag the projections count as not ready.
    lag_max: Duration,
    /// `--mysql-timeout`: reads are bounded by it too.
    statement_timeout: Duration,
}

impl MySqlJournal {
    /// Connects, checks the schema, takes the node's log (its lock and turn; the unnamed log too
    /// if the node has none yet: [`adopt_unnamed_log`]), applies what the log holds past the
    /// projections' cursor, reads the node's durable state and starts the writer and the applier.
    pub async fn open(config: MySqlConfig) -> Result<(Self, State), SchemaError> {
        let node = log_node(&config)?;
        let pool = connect(&config)?;
        check_schema(&pool).await?;
        // Before anything is read: what is read is then what this node alone changes.
        let writer_lock = writer_lock::WriterLock::take(
            &config.url,
            &node,
            config.node_id.is_none(),
            config.statement_timeout,
        )
        .await?;
        adopt_unnamed_log(&pool, &node).await?;
        open_cursor(&pool, &node).await?;
        let (last_lsn, next_event_seq) = log_end(&pool, &node).await?;
        // The projections hold a prefix of the log, never more: a cursor past its end means the
        // tables hold records no journal has (written by a node that had lost this database).
        let (applied, _) = apply_tool::cursor(&pool, &node).await?;
        if applied > last_lsn {
            return Err(SchemaError::ProjectionsAhead {
                applied,
                last: last_lsn,
            });
        }
        warn_of_unattached_claims(&pool).await;
        let (follower, applier) = projection::Follower::new(
            pool.clone(),
            node.clone(),
            Arc::new(MySqlBacklog::new(pool.clone(), node.clone())),
            None,
            last_lsn,
            Arc::new(std::sync::atomic::AtomicU64::new(0)),
            config.statement_timeout,
        );
        applier.catch_up().await?;
        // Keys past retention go before the load, so that every key the database still holds is
        // one memory knows: a fresh use of it then replaces its rows instead of clashing with them.
        // One `now` for both, so no key falls between the purge's cutoff and the load's.
        let now = crate::time::now_ms();
        purge_answers(
            &pool,
            config.statement_timeout,
            now - config.retention.answer_ms,
        )
        .await?;
        let mut state = load(&pool, &node, config.retention, now).await?;
        state.last_lsn = last_lsn;
        let pipeline = Arc::new(Pipeline::new(last_lsn + 1, next_event_seq));
        pipeline.follow(follower.start(applier));
        let degraded = Arc::new(AtomicUsize::new(0));
        let (shutdown_grace, lag_max, statement_timeout) = (
            config.shutdown_grace,
            config.lag_max,
            config.statement_timeout,
        );
        let writer = tokio::spawn(run_writer(
            pool.clone(),
            Arc::clone(&pipeline),
            Arc::clone(&degraded),
            config,
            writer_lock.fence(),
        ));
        tracing::info!(
            node = %node,
            records = state.last_lsn,
            products = state.products.len(),
            orders = state.orders.len(),
            "MySQL journal recovered"
        );
        Ok((
            Self {
                pool,
                node,
                writer_lock,
                pipeline,
                degraded,
                writer: Mutex::new(Some(writer)),
                follower,
                shutdown_grace,
                lag_max,
                statement_timeout,
            },
            state,
        ))
    }

    /// How far the projections are behind the log.
    pub fn lag(&self) -> &Lag {
        &self.follower.lag
    }

    /// The pool, for tests and tools that read the tables.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }
}

/// The node whose log a journal opened with `config` is: decided before (see
/// [`MySqlConfig::node`]), never empty ('' names the unnamed log a migrated database may hold,
/// which no node runs as: [`adopt_unnamed_log`]).
pub(crate) fn log_node(config: &MySqlConfig) -> Result<String, SchemaError> {
    let node = match (&config.node_id, config.node.as_str()) {
        (Some(id), "") => id.as_str(),
        (Some(id), node) if id != node => {
            return Err(SchemaError::NoNode(format!(
                "--node-id {id}, but the journal named {node}"
            )))
        }
        (_, node) => node,
    };
    if node.is_empty() || node.len() > 64 {
        return Err(SchemaError::NoNode(node.to_owned()));
    }
    Ok(node.to_owned())
}

/// The name of the node whose log the MySQL journal of `config` is, decided before the journal
/// opens: its `--node-id`; without one, the name kept in `node_name` ([`journal_node_name`],
/// `proposed` if the database keeps none yet).
pub async fn journal_node(config: &MySqlConfig, proposed: &str) -> Result<String, SchemaError> {
    if let Some(id) = &config.node_id {
        return Ok(id.clone());
    }
    let pool = connect(config)?;
    check_schema(&pool).await?;
    let name = journal_node_name(&pool, config.statement_timeout, proposed).await;
    close_pool(&pool).await;
    name
}

/// Gives `node`'s log its projections' cursor (at the log's start) if it has none yet: a node
/// writing its log for the first time.
pub(crate) async fn open_cursor(pool: &MySqlPool, node: &str) -> Result<(), JournalError> {
    sqlx::query(
        "INSERT IGNORE INTO projection_cursor (node, applied_lsn, applied_seq) VALUES (?, 0, 0)",
    )
    .bind(node)
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(|e| db_error("giving the node's log its cursor", &e))
}

/// How long adopting the unnamed log may take: it moves every row of that log (and of its
/// projections) to the adopting node, once, in one transaction.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The tables whose rows belong to a node's log or name the node (`orders`: the order's owner;
/// `inventory`: the node's counters), each moved whole when a node adopts the unnamed log.
const NODE_TABLES: [&str; 7] = [
    "journal",
    "outbox",
    "journal_skips",
    "projection_cursor",
    "outbox_cursor",
    "orders",
    "inventory",
];

/// The end of the unnamed log (node ''): the rows of a single-node database migrated by
/// `20261206000008` while its `node_name` was empty (written by write-behind, whose name is in its
/// data dir). 0 when there is none.
pub(crate) async fn unnamed_log_end(pool: &MySqlPool) -> Result<u64, JournalError> {
    Ok(log_end(pool, "").await?.0)
}

/// Makes the unnamed log (see [`unnamed_log_end`]) `node`'s own, if `node` has no log yet: the
/// single node of the database before several nodes goes on with its log under its name.
/// Every row of it moves in one transaction, which first locks the unnamed log's cursor (two
/// nodes adopting at once: the second finds nothing left). A node with a log of its own leaves it
/// (said in the log). Returns whether it adopted. Call with `node`'s journal lock held.
pub(crate) async fn adopt_unnamed_log(pool: &MySqlPool, node: &str) -> Result<bool, JournalError> {
    let adopted = in_transaction!(pool, ADOPT_TIMEOUT, |tx| {
        let unnamed =
            sqlx::query("SELECT applied_lsn FROM projection_cursor WHERE node = '' FOR UPDATE")
                .fetch_optional(&mut *tx)
                .await?;
        let own = sqlx::query("SELECT 1 FROM journal WHERE node = ? LIMIT 1")
            .bind(node)
            .fetch_optional(&mut *tx)
            .await?;
        match (unnamed, own) {
            (None, _) => None,
            (Some(_), Some(_)) => Some(false),
            (Some(_), None) => {
                // What the node may hold without a record of its own (a cursor at 0, a relay
                // cursor at 0, a skip asked for ahead) gives way to the log it takes.
                for table in [
                    "projection_cursor",
                    "outbox_cursor",
                    "journal_skips",
                    "inventory",
                ] {
                    sqlx::query(&format!("DELETE FROM {table} WHERE node = ?"))
                        .bind(node)
                        .execute(&mut *tx)
                        .await?;
                }
                for table in NODE_TABLES {
                    sqlx::query(&format!("UPDATE {table} SET node = ? WHERE node = ''"))
                        .bind(node)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("DELETE FROM journal_writer WHERE node = ''")
                    .execute(&mut *tx)
                    .await?;
                Some(true)
            }
        }
    })
    .await
    .map_err(|e| db_error("adopting the unnamed log", &e))?;
    match adopted {
        Some(true) => {
            tracing::warn!(
                node,
                "this node adopted the database's unnamed log (a single node's, from before several nodes): its records, events, orders and stock counters are this node's now"
            );
            Ok(true)
        }
        Some(false) => {
            tracing::warn!(
                node,
                "the database holds an unnamed log (a single node's, from before several nodes) and this node a log of its own: the unnamed one is left to a node without a log yet"
            );
            Ok(false)
        }
        None => Ok(false),
    }
}

/// A text column. Columns with a binary collation (ids compare byte for byte) arrive as bytes.
fn text(row: &sqlx::mysql::MySqlRow, index: usize) -> Result<String, sqlx::Error> {
    let bytes: Vec<u8> = row.try_get(index)?;
    String::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// A nullable text column.
fn optional_text(row: &sqlx::mysql::MySqlRow, index: usize) -> Result<Option<String>, sqlx::Error> {
    let bytes: Option<Vec<u8>> = row.try_get(index)?;
    bytes
        .map(|b| String::from_utf8(b).map_err(|e| sqlx::Error::Decode(Box::new(e))))
        .transpose()
}

/// The columns of an order, in the order [`order_from_row`] reads them.
const ORDER_COLUMNS: &str =
    "SELECT o.order_id, o.status, o.customer_id, o.total_cents, o.currency, \
     o.created_at_ms, o.hold_deadline_ms, o.payment_id, o.payment_due FROM orders o";

fn read_error(e: sqlx::Error) -> JournalError {
    db_error("reading the durable state", &e)
}

/// One line of an order, with its order id.
fn item_from_row(row: &sqlx::mysql::MySqlRow) -> Result<(String, OrderItem), JournalError> {
    let order_id = text(row, 0).map_err(read_error)?;
    let sku = text(row, 1).map_err(read_error)?;
    Ok((
        order_id,
        OrderItem {
            sku: Sku::parse(sku).map_err(|e| corrupt("order_items", e.to_string()))?,
            quantity: row.try_get(2).map_err(read_error)?,
            unit_price_cents: Cents::parse(row.try_get(3).map_err(read_error)?)
                .map_err(|e| corrupt("order_items", e.to_string()))?,
        },
    ))
}

/// Several nodes: the open orders of `node` (held, payment pending, or owing the gateway), at
/// most `limit`, their rows locked (`FOR UPDATE`) in the caller's transaction, so one adopter
/// alone takes each ([`crate::cluster::adoption`]).
pub(crate) async fn lock_open_orders(
    tx: &mut MySqlConnection,
    node: &str,
    only: Option<&OrderId>,
    limit: usize,
) -> Result<Vec<Order>, sqlx::Error> {
    // `only`: that one order of the node, whatever its status (a call for it arrived).
    let rows = match only {
        None => {
            sqlx::query(&format!(
                "{ORDER_COLUMNS} WHERE o.node = ? AND (o.status IN ('reserved', 'payment_pending') \
                 OR o.payment_due IS NOT NULL) ORDER BY o.order_id LIMIT ? FOR UPDATE"
            ))
            .bind(node)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?
        }
        Some(order_id) => {
            sqlx::query(&format!(
                "{ORDER_COLUMNS} WHERE o.node = ? AND o.order_id = ? FOR UPDATE"
            ))
            .bind(node)
            .bind(order_id.as_str())
            .fetch_all(&mut *tx)
            .await?
        }
    };
    let mut orders = Vec::with_capacity(rows.len());
    let bad = |e: JournalError| sqlx::Error::Protocol(e.to_string());
    for row in &rows {
        let id = text(row, 0)?;
        let mut items = Vec::new();
        for line in sqlx::query(
            "SELECT order_id, sku, quantity, unit_price_cents FROM order_items \
             WHERE order_id = ? ORDER BY line",
        )
        .bind(&id)
        .fetch_all(&mut *tx)
        .await?
        {
            items.push(item_from_row(&line).map_err(bad)?.1);
        }
        orders.push(order_from_row(row, items).map_err(bad)?);
    }
    Ok(orders)
}

/// An order from a row of [`ORDER_COLUMNS`] and its lines.
fn order_from_row(
    row: &sqlx::mysql::MySqlRow,
    items: Vec<OrderItem>,
) -> Result<Order, JournalError> {
    let read = read_error;
    let status = text(row, 1).map_err(read)?;
    Ok(Order {
        items,
        order_id: OrderId::parse(text(row, 0).map_err(read)?)
            .map_err(|e| corrupt("orders", e.to_string()))?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| corrupt("orders", format!("unknown status {status:?}")))?,
        customer_id: CustomerId::parse(text(row, 2).map_err(read)?)
            .map_err(|e| corrupt("orders", e.to_string()))?,
        total_cents: row.try_get(3).map_err(read)?,
        currency: Currency::parse(&text(row, 4).map_err(read)?)
            .map_err(|e| corrupt("orders", e.to_string()))?,
        created_at_ms: row.try_get(5).map_err(read)?,
        hold_deadline_ms: row.try_get(6).map_err(read)?,
        payment_id: optional_text(row, 7).map_err(read)?,
        payment_due: match optional_text(row, 8).map_err(read)? {
            None => None,
            Some(raw) => Some(
                PaymentDue::parse(&raw)
                    .ok_or_else(|| corrupt("orders", format!("unknown payment_due {raw:?}")))?,
            ),
        },
    })
}

/// Reads `node`'s durable state from the projections (caught up with its log): every product,
/// and the node's own orders, stock counters and answers.
async fn load(
    pool: &MySqlPool,
    node: &str,
    retention: Retention,
    now: i64,
) -> Result<State, JournalError> {
    let read = |e: sqlx::Error| db_error("reading the durable state", &e);
    let mut state = State::default();
    for row in sqlx::query(
        "SELECT sku, name, price_cents, currency, stock, max_per_customer, admission_rate \
         FROM products",
    )
    .fetch_all(pool)
    .await
    .map_err(read)?
    {
        let sku = text(&row, 0).map_err(read)?;
        let product = Product {
            sku: Sku::parse(sku).map_err(|e| corrupt("products", e.to_string()))?,
            name: row.try_get(1).map_err(read)?,
            price_cents: Cents::parse(row.try_get(2).map_err(read)?)
                .map_err(|e| corrupt("products", e.to_string()))?,
            currency: Currency::parse(&text(&row, 3).map_err(read)?)
                .map_err(|e| corrupt("products", e.to_string()))?,
            stock: Stock::parse(row.try_get(4).map_err(read)?)
                .map_err(|e| corrupt("products", e.to_string()))?,
            max_per_customer: row.try_get(5).map_err(read)?,
            admission_rate: row.try_get(6).map_err(read)?,
        };
        state.products.insert(product.sku.clone(), product);
    }
    // Only what memory keeps: orders that hold stock or are within retention, answers within
    // retention (at `now`). The units of the older paid orders are counted from `inventory`.
    let order_cutoff = now - retention.order_ms;
    let live = "o.node = ? AND (o.status IN ('reserved', 'payment_pending') \
                OR o.payment_due IS NOT NULL OR o.created_at_ms >= ?)";
    let mut items: HashMap<String, Vec<OrderItem>> = HashMap::new();
    for row in sqlx::query(&format!(
        "SELECT i.order_id, i.sku, i.quantity, i.unit_price_cents FROM order_items i \
         JOIN orders o ON o.order_id = i.order_id WHERE {live} ORDER BY i.order_id, i.line"
    ))
    .bind(node)
    .bind(order_cutoff)
    .fetch_all(pool)
    .await
    .map_err(read)?
    {
        let (order_id, item) = item_from_row(&row)?;
        items.entry(order_id).or_default().push(item);
    }
    for row in sqlx::query(&format!("{ORDER_COLUMNS} WHERE {live}"))
        .bind(node)
        .bind(order_cutoff)
        .fetch_all(pool)
        .await
        .map_err(read)?
    {
        let order_id = text(&row, 0).map_err(read)?;
        let order_items = items.remove(&order_id).unwrap_or_default();
        let order = order_from_row(&row, order_items)?;
        state.orders.insert(order.order_id.clone(), order);
    }
    let mut sold_loaded: HashMap<&Sku, i64> = HashMap::new();
    for order in state.orders.values() {
        if order.status == OrderStatus::Paid {
            for item in &order.items {
                *sold_loaded.entry(&item.sku).or_default() += item.quantity;
            }
        }
    }
    let mut sold_pruned = BTreeMap::new();
    for row in sqlx::query("SELECT sku, sold FROM inventory WHERE node = ?")
        .bind(node)
        .fetch_all(pool)
        .await
        .map_err(read)?
    {
        let sku = Sku::parse(text(&row, 0).map_err(read)?)
            .map_err(|e| corrupt("inventory", e.to_string()))?;
        let sold: i64 = row.try_get(1).map_err(read)?;
        let pruned = sold - sold_loaded.get(&sku).copied().unwrap_or(0);
        if pruned != 0 {
            sold_pruned.insert(sku, pruned);
        }
    }
    state.sold_pruned = sold_pruned;
    // The answers of this node's orders (keys are global; each node replays its own).
    for row in sqlx::query(
        "SELECT k.idempotency_key, k.fingerprint, k.status, k.body, k.at_ms FROM idempotency_keys k \
         JOIN orders o ON o.order_id = k.order_id WHERE o.node = ? AND k.at_ms >= ?",
    )
    .bind(node)
    .bind(now - retention.answer_ms)
    .fetch_all(pool)
    .await
    .map_err(read)?
    {
        let key = text(&row, 0).map_err(read)?;
        let status: i16 = row.try_get(2).map_err(read)?;
        state.answers.insert(
            IdempotencyKey::parse(key).map_err(|e| corrupt("idempotency_keys", e.to_string()))?,
            StoredAnswer {
                fingerprint: text(&row, 1).map_err(read)?,
                status: u16::try_from(status)
                    .map_err(|_| corrupt("idempotency_keys", format!("status {status}")))?,
                body: text(&row, 3).map_err(read)?,
                at_ms: row.try_get(4).map_err(read)?,
            },
        );
    }
    Ok(state)
}

/// The node's name kept with the journal (`node_name`, one row): the one there, or `proposed` if
/// there is none yet. MySQL is the truth about whose journal this is: a node started again on a
/// new data dir keeps the name its authorisations carry. A row that does not hold a node name
/// (edited by hand) is refused, naming the table: nothing is written back from it.
pub async fn journal_node_name(
    pool: &MySqlPool,
    timeout: Duration,
    proposed: &str,
) -> Result<String, SchemaError> {
    let kept = |e: sqlx::Error| db_error("reading the node's name", &e);
    let name = in_transaction!(pool, timeout, |tx| {
        sqlx::query("INSERT IGNORE INTO node_name (id, name) VALUES (1, ?)")
            .bind(proposed)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT name FROM node_name WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        text(&row, 0)?
    })
    .await
    .map_err(kept)?;
    if crate::data_dir::is_node_name(&name) {
        Ok(name)
    } else {
        Err(SchemaError::NodeName(name))
    }
}

/// Claims migration `20261127000005` found no placing record for are kept aside, no longer
/// enforced by a `UNIQUE` key: said at every start, so an operator sees it (none in a database
/// this project's earlier versions wrote, which never deleted log rows).
async fn warn_of_unattached_claims(pool: &MySqlPool) {
    match sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM order_claims_unattached")
        .fetch_one(pool)
        .await
    {
        Ok(0) => {}
        Ok(count) => tracing::warn!(
            count,
            "order_claims_unattached holds claims of orders whose placing record is not in the journal table: their keys and payment ids are not guarded by the database's UNIQUE keys; look at them, then drop the table"
        ),
        Err(error) => tracing::debug!(%error, "order_claims_unattached not read"),
    }
}

/// `node`'s log's last lsn and the seq its next event gets, from its last row.
pub(crate) async fn log_end(pool: &MySqlPool, node: &str) -> Result<(u64, u64), JournalError> {
    let row = sqlx::query(
        "SELECT lsn, first_event_seq, record FROM journal WHERE node = ? ORDER BY lsn DESC LIMIT 1",
    )
    .bind(node)
    .fetch_optional(pool)
    .await
    .map_err(read_error)?;
    match row {
        None => Ok((0, 1)),
        Some(row) => {
            let last = projection::committed_from_row(&row)?;
            Ok((
                last.lsn,
                last.first_event_seq + u64::from(last.record.event_count()),
            ))
        }
    }
}

/// Which of [`super::RETRY_REASONS`] a transient error is.
fn retry_reason(error: &sqlx::Error) -> usize {
    let code = match error {
        sqlx::Error::Database(e) => e
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|m| m.number()),
        _ => None,
    };
    match code {
        Some(1213) => 0,
        Some(1205) => 1,
        _ => 2,
    }
}

/// True for a lock conflict another try of the same transaction may not meet: a deadlock (1213)
/// or a lock wait timeout (1205).
pub(crate) fn is_lock_conflict(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|m| matches!(m.number(), 1205 | 1213)))
}

/// True for errors that go away by themselves: the connection, the server's availability, lock
/// conflicts.
fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(e) => {
            let code = e
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|m| m.number());
            // 1205 lock wait timeout, 1213 deadlock, 1040 too many connections, 1053 server
            // shutdown, 1927 connection killed, 2006 gone away, 2013 lost connection,
            // 1290 read-only (failover), 1836 read-only mode.
            matches!(
                code,
                Some(1205 | 1213 | 1040 | 1053 | 1927 | 2006 | 2013 | 1290 | 1836)
            )
        }
        _ => false,
    }
}

async fn run_writer(
    pool: MySqlPool,
    pipeline: Arc<Pipeline>,
    degraded: Arc<AtomicUsize>,
    config: MySqlConfig,
    fence: Arc<Fence>,
) {
    let mut batch: Vec<Entry> = Vec::with_capacity(config.batch_records_max);
    while pipeline.take(config.batch_records_max, &mut batch).await {
        let started = Instant::now();
        let whole: Vec<&Entry> = batch.iter().collect();
        let outcome = commit_part(
            &pool, &pipeline, &degraded, &whole, started, &config, &fence,
        )
        .await;
        drop(whole);
        match outcome {
            Ok(part) => {
                // Answers the waiters, then hands the batch to the applier.
                pipeline.committed(
                    &mut batch,
                    part.bytes,
                    started.elapsed().as_nanos() as u64,
                    &part.rejected,
                );
            }
            Err(error) => pipeline.fail(&mut batch, error),
        }
    }
}

/// What one batch's commit came to.
#[derive(Default)]
struct PartOutcome {
    /// Bytes of records written.
    bytes: u64,
    /// Records the database refused alone (by lsn, with its reason).
    rejected: Vec<(u64, String)>,
}

/// Commits one batch. When the database refuses it for a reason of its own (a constraint, a value
/// it will not take: not a passing fault), its records are committed one at a time, in order, so
/// that only the records it refuses fail and the journal goes on with every other. Returns the
/// error that ends the journal only when it gave up at shutdown.
async fn commit_part(
    pool: &MySqlPool,
    pipeline: &Pipeline,
    degraded: &AtomicUsize,
    part: &[&Entry],
    started: Instant,
    config: &MySqlConfig,
    fence: &Fence,
) -> Result<PartOutcome, JournalError> {
    let refused =
        match commit_with_retries(pool, pipeline, degraded, part, started, config, fence).await? {
            Ok(bytes) => {
                return Ok(PartOutcome {
                    bytes,
                    rejected: Vec::new(),
                })
            }
            Err(refused) => refused,
        };
    let mut outcome = PartOutcome::default();
    if part.len() == 1 {
        refuse(
            pool,
            config.statement_timeout,
            part[0],
            &refused,
            &mut outcome,
            fence,
        )
        .await;
        return Ok(outcome);
    }
    tracing::warn!(error = %refused, records = part.len(), "the database refused a batch; committing its records one by one");
    for &entry in part {
        match commit_with_retries(pool, pipeline, degraded, &[entry], started, config, fence)
            .await?
        {
            Ok(bytes) => outcome.bytes += bytes,
            Err(refused) => {
                refuse(
                    pool,
                    config.statement_timeout,
                    entry,
                    &refused,
                    &mut outcome,
                    fence,
                )
                .await
            }
        }
    }
    Ok(outcome)
}

/// A record the database refused fails alone; its lsn is taken by a row saying why
/// (`journal.refused`, no claims, no projection), written before any later record commits, so
/// `journal.lsn` stays without a gap. (Its event seqs stay unused: `/v1/events` skips them.)
async fn refuse(
    pool: &MySqlPool,
    timeout: Duration,
    entry: &Entry,
    error: &sqlx::Error,
    outcome: &mut PartOutcome,
    fence: &Fence,
) {
    tracing::error!(lsn = entry.lsn, %error, "the database refused a record; it fails alone");
    let reason: String = format!("refused: {error}").chars().take(1_000).collect();
    outcome.rejected.push((entry.lsn, error.to_string()));
    let view = View {
        lsn: entry.lsn,
        first_event_seq: entry.first_event_seq,
        record: &entry.record,
        payload: &entry.payload,
        events: &entry.events,
        refused: Some(&reason),
    };
    let view = &view;
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    for _ in 0..20 {
        let written = in_transaction!(pool, timeout, |tx| {
            write_log(&mut tx, std::slice::from_ref(view), fence).await?;
        })
        .await;
        match written {
            Ok(()) => return,
            Err(e) if is_transient(&e) => tokio::time::sleep(backoff.next_wait()).await,
            Err(e) => {
                tracing::error!(lsn = entry.lsn, error = %e, "could not mark the refused record in the journal table: its lsn stays a gap");
                return;
            }
        }
    }
    tracing::error!(lsn = entry.lsn, "could not mark the refused record in the journal table (the database stayed unreachable): its lsn stays a gap");
}

/// Commits records as one transaction, retrying transient errors (checking first whether a lost
/// connection hid a successful COMMIT). Returns the bytes written, or the database's refusal (an
/// error that is not transient; the transaction was rolled back), or the error that ends the
/// journal (it gave up at shutdown: the outcome is unknown).
async fn commit_with_retries(
    pool: &MySqlPool,
    pipeline: &Pipeline,
    degraded: &AtomicUsize,
    part: &[&Entry],
    started: Instant,
    config: &MySqlConfig,
    fence: &Fence,
) -> Result<Result<u64, sqlx::Error>, JournalError> {
    let mut retrying = false;
    let attempts = async {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        // Set once an attempt failed in transit: a COMMIT of this batch may have landed, or may
        // still land (sent on a connection given up on), until the look below says otherwise.
        let mut in_doubt = false;
        loop {
            let error = match commit_batch(pool, config.statement_timeout, part, fence).await {
                Ok(bytes) => return Ok(Ok(bytes)),
                // Another node took over: nothing of this batch was written, nor ever will be.
                Err(error) if writer_lock::is_fenced(&error) => {
                    return Err(JournalError::Unavailable(error.to_string()))
                }
                Err(error) => error,
            };
            if !is_transient(&error) {
                // A refusal after an attempt in doubt may be this batch's own rows, committed
                // late by that attempt (a duplicate lsn): believed only once the log says the
                // batch is not there.
                if in_doubt && look_until_known(pool, config, part, fence, &mut backoff).await? {
                    return Ok(Ok(0));
                }
                return Ok(Err(error));
            }
            // A given-up attempt's session was ended on the server (`in_transaction`), so the
            // look below can tell whether its COMMIT landed first.
            in_doubt = true;
            let reason = retry_reason(&error);
            pipeline.stats.retries[reason].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%error, reason = super::RETRY_REASONS[reason], "retrying a batch");
            if !retrying {
                retrying = true;
                if degraded.fetch_add(1, Ordering::AcqRel) == 0 {
                    tracing::warn!(%error, "the database did not take a batch; retrying");
                }
            }
            tokio::time::sleep(backoff.next_wait()).await;
            // A connection lost during COMMIT leaves the outcome unknown: know it before
            // retrying. A blind retry of a committed batch runs into its own rows (duplicate lsn)
            // and fails records that are in the journal.
            if look_until_known(pool, config, part, fence, &mut backoff).await? {
                return Ok(Ok(0));
            }
        }
    };
    // A statement can wait for ever on a network that went silent (no error ever comes): at
    // shutdown the wait is bounded too, not only the retries.
    let given_up = async {
        while !(pipeline.is_closing() && started.elapsed() > config.shutdown_grace) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let outcome = tokio::select! {
        outcome = attempts => outcome,
        () = given_up => Err(JournalError::Unknown(
            "gave up at shutdown: the database did not answer".into(),
        )),
    };
    if retrying && degraded.fetch_sub(1, Ordering::AcqRel) == 1 && outcome.is_ok() {
        tracing::info!("the database takes writes again");
    }
    outcome
}

/// Closes the pool, waiting at most a few seconds: a connection on a network that went silent
/// would keep `close` waiting for ever.
pub(crate) async fn close_pool(pool: &MySqlPool) {
    if tokio::time::timeout(Duration::from_secs(2), pool.close())
        .await
        .is_err()
    {
        tracing::warn!("MySQL connections did not close within 2 s; leaving them");
    }
}

/// Whether `batch` is committed, asked until the database answers: a look that fails is looked
/// again, never skipped. A batch commits whole, so it landed only if every one of its lsns holds
/// its own record, byte for byte; none there: it did not land. Anything else (another record at
/// one of its lsns, even if another of them matches: a product change carries no time, so a node
/// taking over may write the same bytes at the same lsn) means another node wrote the log there
/// after taking this database over: this batch never landed and never will, and this node is
/// fenced (an error: nothing of it changed).
async fn look_until_known(
    pool: &MySqlPool,
    config: &MySqlConfig,
    batch: &[&Entry],
    fence: &Fence,
    backoff: &mut Backoff,
) -> Result<bool, JournalError> {
    let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
        return Ok(false);
    };
    loop {
        match batch_is_committed(
            pool,
            config.statement_timeout,
            fence.node(),
            first.lsn,
            last.lsn,
        )
        .await
        {
            Ok(rows) if rows.is_empty() => return Ok(false),
            Ok(rows)
                if rows.len() == batch.len()
                    && rows.iter().zip(batch).all(|((lsn, record), entry)| {
                        *lsn == entry.lsn && *record == entry.payload
                    }) =>
            {
                return Ok(true)
            }
            Ok(_) => {
                fence.overwritten(first.lsn);
                return Err(JournalError::Unavailable(format!(
                    "another node wrote journal records {}..={} after taking this database over: this node's batch was not written, and this node writes nothing more; restart it",
                    first.lsn, last.lsn
                )));
            }
            Err(error) => {
                tracing::debug!(%error, "looking whether a batch was committed");
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

/// Ends the server's session `id` (a connection given up on mid-transaction), so that its
/// transaction is rolled back now instead of whenever the server notices the client is gone; a
/// COMMIT of it arriving late then finds no session. Best effort: the session may be gone already
/// (1094), and the locking look that follows waits for it either way.
pub(crate) async fn kill_session(pool: &MySqlPool, timeout: Duration, id: u64) {
    let killed = bounded(pool, timeout, |mut connection| async move {
        let done = sqlx::query(&format!("KILL {id}"))
            .execute(&mut *connection)
            .await
            .map(|_| ());
        (connection, done)
    })
    .await;
    match killed {
        Ok(()) => tracing::debug!(session = id, "ended the session of a commit given up on"),
        Err(error) => {
            tracing::debug!(session = id, %error, "could not end the session of a commit given up on")
        }
    }
}

/// The records of `node`'s log from `first` to `last`, in order, with their lsns (their bytes:
/// the caller tells its own from another process's). A locking read: while a transaction that
/// wrote them is still open (its COMMIT late, or its rollback not done), the look waits for it to
/// end, so "not there" is never said of a batch that is about to be.
async fn batch_is_committed(
    pool: &MySqlPool,
    timeout: Duration,
    node: &str,
    first: u64,
    last: u64,
) -> Result<Vec<(u64, Vec<u8>)>, sqlx::Error> {
    let query = sqlx::query(
        "SELECT lsn, record FROM journal WHERE node = ? AND lsn BETWEEN ? AND ? \
         ORDER BY lsn LOCK IN SHARE MODE",
    )
    .bind(node)
    .bind(first as i64)
    .bind(last as i64);
    let rows = fetch_all_bounded(pool, timeout, query).await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get::<i64, _>(0)? as u64,
                row.try_get::<Vec<u8>, _>(1)?,
            ))
        })
        .collect()
}

/// One batch, one transaction: its log rows (see [`projection`]). Returns the bytes of records
/// written. Given up at `--mysql-timeout`, its session is ended on the server (`in_transaction`).
async fn commit_batch(
    pool: &MySqlPool,
    timeout: Duration,
    batch: &[&Entry],
    fence: &Fence,
) -> Result<u64, sqlx::Error> {
    let views: Vec<View<'_>> = batch
        .iter()
        .map(|entry| View {
            lsn: entry.lsn,
            first_event_seq: entry.first_event_seq,
            record: &entry.record,
            payload: &entry.payload,
            events: &entry.events,
            refused: None,
        })
        .collect();
    in_transaction!(pool, timeout, |tx| {
        write_log(&mut tx, &views, fence).await?
    })
    .await
}

/// Removes the answers older than `cutoff_ms` and releases their keys' claims (only the claim of
/// the order the answer belongs to: a newer order may hold the key again).
pub(crate) async fn purge_answers(
    pool: &MySqlPool,
    timeout: Duration,
    cutoff_ms: i64,
) -> Result<u64, JournalError> {
    let purge = |e: sqlx::Error| db_error("purging expired idempotency keys", &e);
    let mut purged = 0;
    loop {
        // The keys to purge first, read without a lock; then only their own rows are locked,
        // through the unique keys (a join over `journal` could lock the whole table, and with it
        // every insert of the writer).
        let expired = sqlx::query(
            "SELECT idempotency_key, order_id FROM idempotency_keys WHERE at_ms < ? LIMIT ?",
        )
        .bind(cutoff_ms)
        .bind(PURGE_KEYS_MAX as i64);
        let rows = fetch_all_bounded(pool, timeout, expired)
            .await
            .map_err(purge)?;
        if rows.is_empty() {
            return Ok(purged);
        }
        let mut pairs = Vec::with_capacity(rows.len());
        for row in &rows {
            pairs.push((text(row, 0).map_err(purge)?, text(row, 1).map_err(purge)?));
        }
        let pairs = &pairs;
        // Bounded like every transaction: a stalled COMMIT of it would keep these rows from the
        // writer.
        let deleted = in_transaction!(pool, timeout, |tx| {
            // A row holds a key and an order each under a UNIQUE key, so "its key among the
            // keys and its order among the orders" is the pairs themselves.
            let mut release = sqlx::QueryBuilder::<MySql>::new(
                "UPDATE journal SET idempotency_key = NULL WHERE idempotency_key IN (",
            );
            let mut keys = release.separated(", ");
            for (key, _) in pairs {
                keys.push_bind(key.as_str());
            }
            release.push(") AND order_id IN (");
            let mut orders = release.separated(", ");
            for (_, order) in pairs {
                orders.push_bind(order.as_str());
            }
            release.push(")");
            release.build().execute(&mut *tx).await?;
            let mut delete =
                sqlx::QueryBuilder::<MySql>::new("DELETE FROM idempotency_keys WHERE at_ms < ");
            delete
                .push_bind(cutoff_ms)
                .push(" AND idempotency_key IN (");
            let mut keys = delete.separated(", ");
            for (key, _) in pairs {
                keys.push_bind(key.as_str());
            }
            delete.push(")");
            delete.build().execute(&mut *tx).await?.rows_affected()
        })
        .await
        .map_err(purge)?;
        purged += deleted;
        if rows.len() < PURGE_KEYS_MAX {
            return Ok(purged);
        }
    }
}

/// Expired keys purged in one transaction at most.
const PURGE_KEYS_MAX: usize = 1_000;

/// An order from the projections (placed on any node). Not there while a claim says a log holds
/// it past what its node's projections applied: unavailable (lag), never "no such order".
pub(crate) async fn read_order(
    pool: &MySqlPool,
    timeout: Duration,
    lag: &Lag,
    node: &str,
    order_id: &OrderId,
) -> Result<Option<Order>, JournalError> {
    let unavailable = |e: sqlx::Error| JournalError::Unavailable(e.to_string());
    // What this node's projections held before the order was looked for: an applier run
    // committing between the two reads below must not turn "not applied yet" into "no such
    // order".
    let applied = lag.applied_lsn();
    let (row, claimed, lines) = bounded(pool, timeout, |mut connection| async move {
        let read = async {
            let order = format!("{ORDER_COLUMNS} WHERE o.order_id = ?");
            let mut row = sqlx::query(&order)
                .bind(order_id.as_str())
                .fetch_optional(&mut *connection)
                .await?;
            let mut claimed = None;
            if row.is_none() {
                // The claim, with the cursor of the node whose log holds it.
                let claim = sqlx::query(
                    "SELECT j.node, j.lsn, c.applied_lsn FROM journal j \
                     LEFT JOIN projection_cursor c ON c.node = j.node WHERE j.order_id = ?",
                )
                .bind(order_id.as_str())
                .fetch_optional(&mut *connection)
                .await?;
                if let Some(claim) = claim {
                    let (owner, lsn, owner_applied) = (
                        text(&claim, 0)?,
                        claim.try_get::<i64, _>(1)?,
                        claim.try_get::<Option<i64>, _>(2)?.unwrap_or(0),
                    );
                    // Another node's order its projections held when its cursor was read: read
                    // again (the cursor moves in the transaction that writes what it covers).
                    if owner != node && owner_applied >= lsn {
                        row = sqlx::query(&order)
                            .bind(order_id.as_str())
                            .fetch_optional(&mut *connection)
                            .await?;
                    }
                    claimed = Some((owner, lsn, owner_applied));
                }
            }
            if row.is_none() {
                return Ok((None, claimed, Vec::new()));
            }
            let lines = sqlx::query(
                "SELECT order_id, sku, quantity, unit_price_cents FROM order_items \
                 WHERE order_id = ? ORDER BY line",
            )
            .bind(order_id.as_str())
            .fetch_all(&mut *connection)
            .await?;
            Ok((row, claimed, lines))
        }
        .await;
        (connection, read)
    })
    .await
    .map_err(unavailable)?;
    let Some(row) = row else {
        if let Some((owner, lsn, owner_applied)) = claimed {
            let applied = if owner == node {
                applied
            } else {
                owner_applied.max(0) as u64
            };
            if lsn as u64 > applied {
                return Err(JournalError::Unavailable(format!(
                    "order {} is in the MySQL journal (node {owner}, lsn {lsn}) but not yet in its projections",
                    order_id.as_str()
                )));
            }
        }
        return Ok(None);
    };
    let mut items = Vec::new();
    for line in lines {
        items.push(item_from_row(&line)?.1);
    }
    order_from_row(&row, items).map(Some)
}

impl Journal for MySqlJournal {
    fn append(&self, record: Record) -> Ticket {
        // Whatever the change (a checkout, a cancel, a product, a sweep): none while another node
        // holds this database's journal, or once it took over (the database refuses it then too).
        if let Err(error) = self.writer_lock.check() {
            return Ticket::failed(error);
        }
        self.pipeline.submit(record)
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

    fn claimed_answer(
        &self,
        key: &IdempotencyKey,
    ) -> BoxFuture<'_, Result<Option<StoredAnswer>, JournalError>> {
        let key = key.clone();
        Box::pin(async move {
            let rows = fetch_all_bounded(
                &self.pool,
                self.statement_timeout,
                sqlx::query(
                    "SELECT lsn, first_event_seq, record FROM journal WHERE idempotency_key = ?",
                )
                .bind(key.as_str()),
            )
            .await
            .map_err(read_error)?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            Ok(match projection::committed_from_row(row)?.record {
                Record::Order {
                    answer: Some((claimed, stored)),
                    ..
                } if claimed == key => Some(stored),
                _ => None,
            })
        })
    }

    fn events(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Event>, JournalError>> {
        Box::pin(async move {
            // Read your writes: an event acknowledged before this call is applied to the outbox
            // (normally within milliseconds) before the outbox is read.
            let lag = self.lag();
            if !lag
                .wait_applied(lag.committed_lsn(), Duration::from_secs(2))
                .await
            {
                tracing::debug!(
                    behind = lag.records(),
                    "events read while the outbox is behind the journal"
                );
            }
            let read = |e: sqlx::Error| db_error("reading the outbox", &e);
            // The buyer and the lines come from the order (they never change after it is
            // placed), so the outbox row stays small.
            let query = sqlx::query(
                "SELECT x.seq, x.type, x.order_id, x.at_ms, x.total_cents, x.currency, o.customer_id \
                 FROM outbox x LEFT JOIN orders o ON o.order_id = x.order_id \
                 WHERE x.node = ? AND x.seq > ? AND x.seq <= ? ORDER BY x.seq LIMIT ?",
            )
            .bind(self.node.as_str())
            .bind(after_seq as i64)
            .bind(self.follower.lag.applied_seq() as i64)
            .bind(limit as i64);
            let rows = fetch_all_bounded(&self.pool, self.statement_timeout, query)
                .await
                .map_err(|e| JournalError::Unavailable(e.to_string()))?;
            let mut items: HashMap<String, Vec<OrderItem>> = HashMap::new();
            if !rows.is_empty() {
                let mut q = sqlx::QueryBuilder::<sqlx::MySql>::new(
                    "SELECT order_id, sku, quantity, unit_price_cents FROM order_items WHERE order_id IN (",
                );
                let mut ids = q.separated(", ");
                for row in &rows {
                    ids.push_bind(text(row, 2).map_err(read)?);
                }
                q.push(") ORDER BY order_id, line");
                let lines = fetch_all_bounded(&self.pool, self.statement_timeout, q.build())
                    .await
                    .map_err(read)?;
                for line in lines {
                    let (order_id, item) = item_from_row(&line)?;
                    items.entry(order_id).or_default().push(item);
                }
            }
            rows.iter()
                .map(|row| {
                    let kind = text(row, 1).map_err(read)?;
                    let status = kind
                        .strip_prefix("order.")
                        .and_then(OrderStatus::parse)
                        .ok_or_else(|| corrupt("outbox", format!("unknown type {kind:?}")))?;
                    let order_id = text(row, 2).map_err(read)?;
                    let customer = optional_text(row, 6).map_err(read)?.unwrap_or_default();
                    Ok(Event {
                        seq: row.try_get::<i64, _>(0).map_err(read)? as u64,
                        status,
                        items: items.get(&order_id).cloned().unwrap_or_default(),
                        order_id: OrderId::parse(order_id)
                            .map_err(|e| corrupt("outbox", e.to_string()))?,
                        at_ms: row.try_get(3).map_err(read)?,
                        total_cents: row.try_get(4).map_err(read)?,
                        currency: Currency::parse(&text(row, 5).map_err(read)?)
                            .map_err(|e| corrupt("outbox", e.to_string()))?,
                        customer_id: CustomerId::parse(customer)
                            .map_err(|e| corrupt("orders", e.to_string()))?,
                    })
                })
                .collect()
        })
    }

    fn stats(&self) -> &JournalStats {
        &self.pipeline.stats
    }

    fn writer_turn(&self) -> Option<u64> {
        Some(self.writer_lock.fence().epoch())
    }

    fn last_event_seq(&self) -> u64 {
        self.pipeline.durable_event_seq()
    }

    fn position(&self) -> crate::journal::Position {
        crate::journal::Position {
            kind: "mysql",
            last_lsn: self.pipeline.durable_lsn(),
            segments: None,
            mysql: Some(
                self.follower
                    .lag
                    .position(&self.node, self.writer_lock.fence().epoch()),
            ),
        }
    }

    fn health(&self) -> Result<(), JournalError> {
        self.pipeline.health()?;
        self.writer_lock.check()?;
        if self.degraded.load(Ordering::Acquire) > 0 {
            return Err(JournalError::Unavailable(
                "the last batch was not taken".into(),
            ));
        }
        Ok(())
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), JournalError>> {
        Box::pin(async move {
            self.health()?;
            // No write may be under way to notice an outage: ask the database itself.
            let ping = sqlx::query("SELECT 1");
            let timeout = self.statement_timeout.min(Duration::from_secs(1));
            match fetch_all_bounded(&self.pool, timeout, ping).await {
                Ok(_) => Ok(()),
                Err(error) => Err(JournalError::Unavailable(error.to_string())),
            }
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.pipeline.close();
            let writer = lock(&self.writer).take();
            if let Some(writer) = writer {
                if let Err(error) = writer.await {
                    tracing::error!(%error, "the MySQL journal writer failed");
                }
            }
            let drained = self.follower.stop(self.shutdown_grace).await;
            self.writer_lock.release().await;
            close_pool(&self.pool).await;
            drained
        })
    }

    fn checks(&self) -> BoxFuture<'_, Vec<(&'static str, Result<(), String>)>> {
        Box::pin(async move {
            vec![
                ("journal", self.ready().await.map_err(|e| e.to_string())),
                ("mysql", self.lag().check(self.lag_max)),
            ]
        })
    }

    fn encode_metrics(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.stats().encode(encoder)?;
        self.lag().encode(encoder)
    }
}
