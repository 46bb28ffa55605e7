//! One process per node's log: a database holds the logs of several nodes (each node's rows carry
//! its name, `node`), and the node whose log it writes (MySQL as the journal, or write-behind)
//! holds the database server's own named lock for that log (`GET_LOCK`, one per database and node)
//! on a connection of its own for as long as it runs. A second process started as the same node is
//! refused at start (exit 2, naming the holder's connection) instead of loading a state the first
//! keeps changing, answering from it, and failing its commits on the log's keys. Nodes of other
//! names run beside it, each on its own log.
//!
//! A node without `--node-id` is the database's one node, as before several nodes: it also holds
//! the database's own lock (the one name every such node takes, whatever its node's name), so a
//! second such node on the database is refused too, whichever name it runs under: nodes that do
//! not share their stock (no leases) must not sell from one database's products side by side.
//!
//! The lock is the server's, so it ends with its session: at once when the holding process dies
//! (its socket closes), and within [`SESSION_IDLE_MAX`] when its host or network does (the
//! session's `wait_timeout`; the keeper asks every [`PING`] so a live holder never idles that
//! long). A node starting waits [`START_WAIT`] for it, past that. While running, a node that finds
//! the lock held by another (its session ended, and another node took it) refuses changes
//! ([`WriterLock::check`], in the journal's health and at every append: `503`, nothing changed,
//! `/readyz` fails) until it gets the lock back. The database unreachable is not such a finding:
//! the keeper reconnects and takes the lock again when it answers.
//!
//! **The fence.** A lock is a finding, not a guard: a node whose network was cut may have a
//! transaction open on the server when its lock session ends, and its own keeper may not know for
//! a while. So the database itself refuses a node that lost its turn: a node that takes the lock
//! adds one to its log's `journal_writer.epoch` before it reads anything ([`Fence`]), and every
//! transaction that writes its log's rows first reads that epoch under a shared lock and writes
//! nothing unless it is its own ([`check_fence`]). The new node's increment waits for the old node's open transactions
//! to end (a COMMIT in flight lands before the new node reads the journal, or never), and every
//! later one of the old node finds another epoch: it is fenced for good (its memory no longer
//! knows the journal), refuses every change, and says to restart it. A keeper that takes the lock
//! again finds the epoch its node set, or knows its node was fenced.

use super::{db_error, SchemaError};
use crate::journal::JournalError;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::{ConnectOptions, Connection};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How long the lock's session may stay idle before the server ends it (and the lock with it).
pub const SESSION_IDLE_MAX: Duration = Duration::from_secs(10);

/// How often the keeper asks whether it still holds the lock.
const PING: Duration = Duration::from_secs(2);

/// How long a starting node waits for the lock: a holder that died without closing its socket
/// loses it within [`SESSION_IDLE_MAX`].
pub const START_WAIT: Duration = Duration::from_secs(12);

/// How long a starting node waits for the open transactions of the node before it to end: past
/// the server's end of that node's sessions, should it have vanished.
const TURN_WAIT: Duration = Duration::from_secs(super::POOL_SESSION_IDLE_MAX.as_secs() + 5);

/// The names of the locks a node takes, as the server computes them (lock names are server-wide,
/// at most 64 characters: the database's and the node's names are hashed, so two long names never
/// share a lock): its log's (per database and node), then the database's own.
const NAMES: &str = "SELECT CONCAT('turnstile.journal.', SHA1(CONCAT(DATABASE(), '/', ?))), \
                     CONCAT('turnstile.journal.', SHA1(DATABASE()))";

/// Which locks a node holds: its log's always; the database's too when it is the database's one
/// node (no `--node-id`).
#[derive(Debug, Clone)]
struct LockNames {
    /// The lock of the node's log.
    log: String,
    /// The database's own lock, for a node without `--node-id`.
    database: Option<String>,
}

impl LockNames {
    /// The names, the database's first (a second node without `--node-id` is refused on it,
    /// whichever name it runs under).
    fn in_order(&self) -> impl Iterator<Item = &str> {
        self.database
            .as_deref()
            .into_iter()
            .chain(std::iter::once(self.log.as_str()))
    }
}

/// The lock held for this node, and its keeper.
pub struct WriterLock {
    held: Arc<AtomicBool>,
    fence: Arc<Fence>,
    keeper: Mutex<Option<(JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>>,
}

/// This node's turn as its log's writer: the epoch it set in its `journal_writer` row when it
/// took the lock, and whether another process has taken over since.
#[derive(Debug)]
pub struct Fence {
    /// The node whose log this is (its `journal_writer` row).
    node: String,
    epoch: u64,
    lost: AtomicBool,
}

/// The error a fenced transaction ends with (inside `sqlx::Error::Configuration`, which no
/// retry takes for a passing fault).
#[derive(Debug, thiserror::Error)]
#[error("another node took over this journal database (journal_writer.epoch {found}, this node's {mine}): this node writes nothing more; restart it")]
pub struct Fenced {
    mine: u64,
    found: u64,
}

impl Fence {
    /// The node whose log the fence guards.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The turn this process took (`journal_writer.epoch` when it took the lock).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether another node has taken over.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Another node wrote the log at `lsn` where this node's batch was to be: it took over.
    pub fn overwritten(&self, lsn: u64) {
        self.lose(&format!(
            "it wrote journal record {lsn} where this node's batch was to be"
        ));
    }

    /// Fenced for good, said once: `how` another node took over.
    fn lose(&self, how: &str) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(
                mine = self.epoch,
                "another node took over this journal database ({how}): this node refuses every change from now on; restart it (it then waits for the database's journal lock)"
            );
        }
    }
}

/// Whether `error` is a transaction refused by the fence.
pub fn is_fenced(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Configuration(inner) if inner.is::<Fenced>())
}

/// First in every transaction that writes log rows: reads the epoch under a shared lock (a node
/// taking over waits for this transaction to end) and refuses to go on unless it is `fence`'s.
pub async fn check_fence(tx: &mut MySqlConnection, fence: &Fence) -> Result<(), sqlx::Error> {
    let found: u64 =
        sqlx::query_scalar("SELECT epoch FROM journal_writer WHERE node = ? LOCK IN SHARE MODE")
            .bind(fence.node.as_str())
            .fetch_one(&mut *tx)
            .await?;
    if found == fence.epoch && !fence.is_lost() {
        return Ok(());
    }
    fence.lose(&format!("journal_writer.epoch is {found}"));
    Err(sqlx::Error::Configuration(Box::new(Fenced {
        mine: fence.epoch,
        found,
    })))
}

impl WriterLock {
    /// Takes the lock of `node`'s log (and, for the database's one node, `alone`, the database's
    /// own), waiting at most [`START_WAIT`]; refused with [`SchemaError::JournalHeld`] if another
    /// process keeps one of them. Then takes the log's turn ([`Fence`]).
    pub async fn take(
        url: &str,
        node: &str,
        alone: bool,
        timeout: Duration,
    ) -> Result<Self, SchemaError> {
        let options = MySqlConnectOptions::from_str(url)
            .map_err(|e| JournalError::Io {
                context: "reading --mysql-url".into(),
                message: e.to_string(),
            })?
            // A wait for the lock is no slow statement.
            .disable_statement_logging();
        let names = lock_names(&options, node, alone, timeout).await?;
        let mut connection = match connect_and_take(&options, &names, START_WAIT, timeout).await? {
            Taken::Yes(connection) => connection,
            Taken::No { holder, database } => {
                return Err(SchemaError::JournalHeld {
                    holder,
                    held: if database {
                        "the database's one node".to_owned()
                    } else {
                        format!("the log of node {node}")
                    },
                })
            }
        };
        let epoch = take_turn(&mut connection, node, timeout).await?;
        let fence = Arc::new(Fence {
            node: node.to_owned(),
            epoch,
            lost: AtomicBool::new(false),
        });
        let held = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let keeper = tokio::spawn(keep(
            connection,
            options,
            names,
            Arc::clone(&held),
            Arc::clone(&fence),
            timeout,
            stopped,
        ));
        Ok(Self {
            held,
            fence,
            keeper: Mutex::new(Some((keeper, stop))),
        })
    }

    /// This node's turn, for the transactions that write log rows ([`check_fence`]).
    pub fn fence(&self) -> Arc<Fence> {
        Arc::clone(&self.fence)
    }

    /// `Err` while another node holds the lock, and for good once another node took over: this
    /// node must not change the journal.
    pub fn check(&self) -> Result<(), JournalError> {
        if self.fence.is_lost() {
            Err(JournalError::Unavailable(
                "another node took over this journal database: this node refuses changes; restart it"
                    .into(),
            ))
        } else if self.held.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(JournalError::Unavailable(
                "another process holds this node's journal lock on the database (one process per node's log)"
                    .into(),
            ))
        }
    }

    /// Gives the lock back (at shutdown, once the writer has flushed).
    pub async fn release(&self) {
        let keeper = crate::sync::lock(&self.keeper).take();
        if let Some((task, stop)) = keeper {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

enum Taken {
    Yes(MySqlConnection),
    No {
        /// The connection holding the lock not taken, if the server said.
        holder: Option<u64>,
        /// Whether that lock is the database's own (else the node's log's).
        database: bool,
    },
}

/// The server's names of the locks `node` takes (see [`NAMES`]), asked once on a connection of
/// their own.
async fn lock_names(
    options: &MySqlConnectOptions,
    node: &str,
    alone: bool,
    timeout: Duration,
) -> Result<LockNames, JournalError> {
    let ask = async {
        let mut connection = MySqlConnection::connect_with(options).await?;
        let names = sqlx::query_as::<_, (String, String)>(NAMES)
            .bind(node)
            .fetch_one(&mut connection)
            .await;
        let _ = connection.close().await;
        names
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok((log, database))) => Ok(LockNames {
            log,
            database: alone.then_some(database),
        }),
        Ok(Err(error)) => Err(db_error("naming the journal's lock", &error)),
        Err(_) => Err(JournalError::Unavailable(format!(
            "naming the journal's lock: no answer within {timeout:?}"
        ))),
    }
}

/// Takes `node`'s turn on the lock's session: one more than its log's last epoch, once every open
/// transaction of the process before (which holds the epoch's row shared) has ended, waiting at
/// most [`TURN_WAIT`] (a vanished process's sessions end within `POOL_SESSION_IDLE_MAX`). A node
/// writing its log for the first time gets its row here.
async fn take_turn(
    connection: &mut MySqlConnection,
    node: &str,
    timeout: Duration,
) -> Result<u64, SchemaError> {
    let turn = async {
        sqlx::query(&format!(
            "SET SESSION innodb_lock_wait_timeout = {}",
            TURN_WAIT.as_secs()
        ))
        .execute(&mut *connection)
        .await?;
        sqlx::query("INSERT IGNORE INTO journal_writer (node, epoch) VALUES (?, 0)")
            .bind(node)
            .execute(&mut *connection)
            .await?;
        // The turn is this update's own value (the session's LAST_INSERT_ID), never one read
        // after it: a reaper's fence may land between the two.
        sqlx::query("UPDATE journal_writer SET epoch = LAST_INSERT_ID(epoch + 1) WHERE node = ?")
            .bind(node)
            .execute(&mut *connection)
            .await?;
        sqlx::query_scalar::<_, u64>("SELECT LAST_INSERT_ID()")
            .fetch_one(&mut *connection)
            .await
    };
    match tokio::time::timeout(timeout + TURN_WAIT, turn).await {
        Ok(Ok(epoch)) => Ok(epoch),
        Ok(Err(error)) if lock_wait_timed_out(&error) => Err(SchemaError::JournalBusy),
        Ok(Err(error)) => {
            Err(db_error("taking the journal's turn (journal_writer)", &error).into())
        }
        Err(_) => Err(JournalError::Unavailable(format!(
            "taking the journal's turn: no answer within {:?}",
            timeout + TURN_WAIT
        ))
        .into()),
    }
}

/// The MySQL connection holding the lock of `node`'s log, if a process holds it (it runs, or is
/// paused within [`SESSION_IDLE_MAX`] of its last word).
pub async fn holder(pool: &sqlx::MySqlPool, node: &str) -> Result<Option<u64>, sqlx::Error> {
    let (log, _): (String, String) = sqlx::query_as(NAMES).bind(node).fetch_one(pool).await?;
    let holder: Option<i64> = sqlx::query_scalar("SELECT IS_USED_LOCK(?)")
        .bind(log)
        .fetch_one(pool)
        .await?;
    Ok(holder.and_then(|h| u64::try_from(h).ok()))
}

/// MySQL's 1205: a lock wait timed out.
fn lock_wait_timed_out(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|m| m.number()) == Some(1205))
}

/// A new connection whose sessions ends after [`SESSION_IDLE_MAX`] idle, holding every lock of
/// `names` if each is free within `wait`.
async fn connect_and_take(
    options: &MySqlConnectOptions,
    names: &LockNames,
    wait: Duration,
    timeout: Duration,
) -> Result<Taken, JournalError> {
    let failed = |e: sqlx::Error| db_error("taking the journal's lock", &e);
    let attempt = async {
        let mut connection = MySqlConnection::connect_with(options).await?;
        sqlx::query(&format!(
            "SET SESSION wait_timeout = {}",
            SESSION_IDLE_MAX.as_secs()
        ))
        .execute(&mut connection)
        .await?;
        for name in names.in_order() {
            let taken: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
                .bind(name)
                .bind(wait.as_secs())
                .fetch_one(&mut connection)
                .await?;
            if taken == Some(1) {
                continue;
            }
            let holder: Option<i64> = sqlx::query_scalar("SELECT IS_USED_LOCK(?)")
                .bind(name)
                .fetch_one(&mut connection)
                .await?;
            // Closing the session gives back the locks it took before this one.
            let _ = connection.close().await;
            return Ok(Taken::No {
                holder: holder.and_then(|h| u64::try_from(h).ok()),
                database: names.database.as_deref() == Some(name),
            });
        }
        Ok(Taken::Yes(connection))
    };
    match tokio::time::timeout(timeout + wait, attempt).await {
        Ok(result) => result.map_err(failed),
        Err(_) => Err(JournalError::Unavailable(format!(
            "taking the journal's lock: no answer within {:?}",
            timeout + wait
        ))),
    }
}

/// Asks every [`PING`] whether the lock is still this session's; takes it again on a new
/// connection when the session ended; says when another node holds it.
async fn keep(
    connection: MySqlConnection,
    options: MySqlConnectOptions,
    names: LockNames,
    held: Arc<AtomicBool>,
    fence: Arc<Fence>,
    timeout: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut connection = Some(connection);
    let still_mine = format!(
        "SELECT {}",
        names
            .in_order()
            .map(|_| "IS_USED_LOCK(?) = CONNECTION_ID()")
            .collect::<Vec<_>>()
            .join(" AND ")
    );
    let mut ticker = tokio::time::interval(PING);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {}
        }
        if let Some(current) = connection.as_mut() {
            let mut mine = sqlx::query_scalar::<_, Option<i64>>(&still_mine);
            for name in names.in_order() {
                mine = mine.bind(name);
            }
            let mine = mine.fetch_one(current);
            if let Ok(Ok(Some(1))) = tokio::time::timeout(timeout, mine).await {
                continue;
            }
            // The session ended (or cannot say): a new one takes the lock again if it is free.
            connection = None;
        }
        match connect_and_take(&options, &names, Duration::ZERO, timeout).await {
            Ok(Taken::Yes(mut taken)) => {
                // Taken again: this node's turn still, unless another process had it meanwhile.
                let epoch =
                    sqlx::query_scalar::<_, u64>("SELECT epoch FROM journal_writer WHERE node = ?")
                        .bind(fence.node.as_str())
                        .fetch_one(&mut taken);
                match tokio::time::timeout(timeout, epoch).await {
                    Ok(Ok(epoch)) if epoch != fence.epoch => {
                        fence.lose(&format!("journal_writer.epoch is {epoch}"))
                    }
                    Ok(Ok(_)) => {}
                    // Not known: asked again at the next tick, on a new session.
                    _ => {
                        let _ = taken.close().await;
                        continue;
                    }
                }
                connection = Some(taken);
                if !held.swap(true, Ordering::AcqRel) && !fence.is_lost() {
                    tracing::warn!(
                        "this node holds its journal database's lock again; changes resume"
                    );
                }
            }
            Ok(Taken::No { holder, .. }) => {
                if held.swap(false, Ordering::AcqRel) {
                    tracing::error!(
                        holder,
                        "another process took this node's journal lock (this node's session with MySQL ended): this node refuses changes until it gets it back; one process per node's log"
                    );
                }
            }
            // The database does not answer: its writes fail anyway; asked again at the next tick.
            Err(error) => tracing::debug!(%error, "the journal's lock could not be asked for"),
        }
    }
    if let Some(connection) = connection {
        let _ = connection.close().await;
    }
}
