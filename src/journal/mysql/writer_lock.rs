//! One node per journal database: the node whose journal a database is (MySQL as the journal, or
//! write-behind) holds the database server's own named lock (`GET_LOCK`, one per database) on a
//! connection of its own for as long as it runs. A second node started on the same database is
//! refused at start (exit 2, naming the holder's connection) instead of loading a state the first
//! keeps changing, answering from it, and failing its commits on the log's keys.
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
//! adds one to `journal_writer.epoch` before it reads anything ([`Fence`]), and every transaction
//! that writes log rows first reads the epoch under a shared lock and writes nothing unless it is
//! its own ([`check_fence`]). The new node's increment waits for the old node's open transactions
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

/// The lock's name on the server: one per database (names are server-wide, at most 64
/// characters: the database's name is hashed, so two long names never share a lock).
const NAME: &str = "CONCAT('turnstile.journal.', SHA1(DATABASE()))";

/// The lock held for this node, and its keeper.
pub struct WriterLock {
    held: Arc<AtomicBool>,
    fence: Arc<Fence>,
    keeper: Mutex<Option<(JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>>,
}

/// This node's turn as the journal's writer: the epoch it set in `journal_writer` when it took
/// the lock, and whether another node has taken over since.
#[derive(Debug)]
pub struct Fence {
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
        sqlx::query_scalar("SELECT epoch FROM journal_writer WHERE id = 1 LOCK IN SHARE MODE")
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
    /// Takes the database's lock, waiting at most [`START_WAIT`]; refused with
    /// [`SchemaError::JournalHeld`] if another node keeps it.
    pub async fn take(url: &str, timeout: Duration) -> Result<Self, SchemaError> {
        let options = MySqlConnectOptions::from_str(url)
            .map_err(|e| JournalError::Io {
                context: "reading --mysql-url".into(),
                message: e.to_string(),
            })?
            // A wait for the lock is no slow statement.
            .disable_statement_logging();
        let mut connection = match connect_and_take(&options, START_WAIT, timeout).await? {
            Taken::Yes(connection) => connection,
            Taken::No { holder } => return Err(SchemaError::JournalHeld { holder }),
        };
        let epoch = take_turn(&mut connection, timeout).await?;
        let fence = Arc::new(Fence {
            epoch,
            lost: AtomicBool::new(false),
        });
        let held = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let keeper = tokio::spawn(keep(
            connection,
            options,
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
                "another node holds this database's journal lock (one node per journal database)"
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
    No { holder: Option<u64> },
}

/// Takes this node's turn on the lock's session: one more than the last epoch, once every open
/// transaction of the node before (which holds the epoch's row shared) has ended, waiting at
/// most [`TURN_WAIT`] (a vanished node's sessions end within `POOL_SESSION_IDLE_MAX`).
async fn take_turn(
    connection: &mut MySqlConnection,
    timeout: Duration,
) -> Result<u64, SchemaError> {
    let turn = async {
        sqlx::query(&format!(
            "SET SESSION innodb_lock_wait_timeout = {}",
            TURN_WAIT.as_secs()
        ))
        .execute(&mut *connection)
        .await?;
        sqlx::query("UPDATE journal_writer SET epoch = epoch + 1 WHERE id = 1")
            .execute(&mut *connection)
            .await?;
        sqlx::query_scalar::<_, u64>("SELECT epoch FROM journal_writer WHERE id = 1")
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

/// MySQL's 1205: a lock wait timed out.
fn lock_wait_timed_out(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|m| m.number()) == Some(1205))
}

/// A new connection whose sessions ends after [`SESSION_IDLE_MAX`] idle, holding the lock if it
/// is free within `wait`.
async fn connect_and_take(
    options: &MySqlConnectOptions,
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
        let taken: Option<i64> = sqlx::query_scalar(&format!("SELECT GET_LOCK({NAME}, ?)"))
            .bind(wait.as_secs())
            .fetch_one(&mut connection)
            .await?;
        if taken == Some(1) {
            return Ok(Taken::Yes(connection));
        }
        let holder: Option<i64> = sqlx::query_scalar(&format!("SELECT IS_USED_LOCK({NAME})"))
            .fetch_one(&mut connection)
            .await?;
        let _ = connection.close().await;
        Ok(Taken::No {
            holder: holder.and_then(|h| u64::try_from(h).ok()),
        })
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
    held: Arc<AtomicBool>,
    fence: Arc<Fence>,
    timeout: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut connection = Some(connection);
    let still_mine = format!("SELECT IS_USED_LOCK({NAME}) = CONNECTION_ID()");
    let mut ticker = tokio::time::interval(PING);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {}
        }
        if let Some(current) = connection.as_mut() {
            let mine = sqlx::query_scalar::<_, Option<i64>>(&still_mine).fetch_one(current);
            if let Ok(Ok(Some(1))) = tokio::time::timeout(timeout, mine).await {
                continue;
            }
            // The session ended (or cannot say): a new one takes the lock again if it is free.
            connection = None;
        }
        match connect_and_take(&options, Duration::ZERO, timeout).await {
            Ok(Taken::Yes(mut taken)) => {
                // Taken again: this node's turn still, unless another node had it meanwhile.
                let epoch =
                    sqlx::query_scalar::<_, u64>("SELECT epoch FROM journal_writer WHERE id = 1")
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
            Ok(Taken::No { holder }) => {
                if held.swap(false, Ordering::AcqRel) {
                    tracing::error!(
                        holder,
                        "another node took this database's journal lock (this node's session with MySQL ended): this node refuses changes until it gets it back; one node per journal database"
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
