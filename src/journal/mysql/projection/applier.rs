//! The applier: one downstream reader of the journal ([`crate::journal::downstream`]) whose far
//! side is the projections (and, in write-behind, the log rows). It applies runs of records in lsn
//! order, each in one transaction that reads the durable cursor (`projection_cursor.applied_lsn`)
//! `FOR UPDATE`, drops the records at or below it, writes the rest and moves the cursor: so a record
//! is applied exactly once whoever replays it. It takes the batches its source's writer hands it
//! ([`sink`]) and reads the rest (after a restart, or when it fell behind) through a
//! [`Reader`] of the source's backlog ([`MySqlBacklog`], or the embedded journal's segments),
//! bounded by what the source made durable. A passing fault is retried with the one backoff; a
//! record the database refuses for good stops it there until an operator skips it.

use super::lag::Lag;
use super::{project, write_log, View};
use crate::backoff::Backoff;
use crate::engine::records::Record;
use crate::journal::downstream::{Filled, Reader, Source};
use crate::journal::mysql::writer_lock::{is_fenced, Fence};
use crate::journal::mysql::{fetch_all_bounded, in_transaction, is_transient, retry_reason};
use crate::journal::pipeline::Committed;
use crate::journal::JournalError;
use crate::sync::lock;
use crate::BoxFuture;
use sqlx::mysql::MySqlPool;
use sqlx::Row;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// One node's log in the MySQL `journal` table as the applier's source (the embedded journal's
/// segments are the other).
pub(crate) struct MySqlBacklog {
    pool: MySqlPool,
    /// The node whose log it reads.
    node: String,
}

impl MySqlBacklog {
    /// `node`'s log in the database behind `pool`.
    pub fn new(pool: MySqlPool, node: String) -> Self {
        Self { pool, node }
    }
}

impl Source<Committed> for MySqlBacklog {
    fn read(
        &self,
        after_lsn: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Committed>, JournalError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT lsn, first_event_seq, record FROM journal \
                 WHERE node = ? AND lsn > ? AND refused IS NULL ORDER BY lsn LIMIT ?",
            )
            .bind(self.node.as_str())
            .bind(after_lsn as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| JournalError::Unavailable(e.to_string()))?;
            rows.iter().map(committed_from_row).collect()
        })
    }
}

/// A `journal` row as a record.
pub(crate) fn committed_from_row(row: &sqlx::mysql::MySqlRow) -> Result<Committed, JournalError> {
    let read = |e: sqlx::Error| JournalError::Unavailable(e.to_string());
    let lsn = row.try_get::<i64, _>(0).map_err(read)? as u64;
    let first_event_seq = row.try_get::<i64, _>(1).map_err(read)? as u64;
    let payload: Vec<u8> = row.try_get(2).map_err(read)?;
    let record: Record =
        crate::engine::codec::decode(&payload).map_err(|e| JournalError::Corrupt {
            file: "MySQL table journal".into(),
            offset: lsn,
            reason: format!("record {lsn} does not decode: {e}"),
        })?;
    let events = record.events(first_event_seq);
    Ok(Committed {
        lsn,
        first_event_seq,
        record,
        payload,
        events,
    })
}

/// The sink a journal's writer hands committed batches to: stamps the lag, queues for the applier.
pub(crate) fn sink(
    lag: Arc<Lag>,
    queue: mpsc::UnboundedSender<Vec<Committed>>,
) -> crate::journal::pipeline::Sink {
    Box::new(move |batch: Vec<Committed>| {
        if let Some(last) = batch.last() {
            lag.hand(last.lsn);
        }
        // The applier gone means the journal is shutting down; nothing to do.
        let _ = queue.send(batch);
    })
}

/// `journal.refused` of a record an operator skipped.
const SKIPPED: &str = "skipped by an operator (turnstile mysql-apply --skip)";

/// Records per applier transaction at most.
pub const APPLY_RECORDS_MAX: usize = 4_096;

/// How long the applier lets a short run wait for more records.
pub const APPLY_LINGER: Duration = Duration::from_millis(25);

/// Keeps the projections (and, in write-behind, the log) following one node's journal.
pub(crate) struct Applier {
    pub pool: MySqlPool,
    /// The node whose log it applies (its cursor, its skips, its rows of the projections).
    pub node: String,
    pub lag: Arc<Lag>,
    pub backlog: Arc<dyn Source<Committed>>,
    /// Write the log rows too (write-behind); otherwise only the projections.
    pub ship: Option<Arc<Fence>>,
    /// Set at shutdown: apply what is handed, then stop.
    pub closing: Arc<AtomicBool>,
    pub wake: Arc<Notify>,
    /// How long one transaction may take (`--mysql-timeout`).
    pub timeout: Duration,
}

/// How one transaction of the applier ended.
enum Outcome {
    Applied,
    /// The database refused something in it (not a passing fault).
    Refused(sqlx::Error),
}

impl Applier {
    /// Reads the durable cursor (retrying while the database is unreachable, unless closing).
    async fn read_cursor(&self) -> Option<(u64, u64)> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let query = sqlx::query(
                "SELECT applied_lsn, applied_seq FROM projection_cursor WHERE node = ?",
            )
            .bind(self.node.as_str());
            let read = fetch_all_bounded(&self.pool, self.timeout, query)
                .await
                .and_then(|rows| rows.into_iter().next().ok_or(sqlx::Error::RowNotFound));
            match read {
                Ok(row) => {
                    let lsn: i64 = row.try_get(0).unwrap_or(0);
                    let seq: i64 = row.try_get(1).unwrap_or(0);
                    self.lag.set_problem(None);
                    return Some((lsn as u64, seq as u64));
                }
                Err(error) => {
                    self.lag
                        .set_problem(Some(format!("reading the cursor: {error}")));
                    if self.closing.load(Ordering::Acquire) {
                        return None;
                    }
                    tokio::time::sleep(backoff.next_wait()).await;
                }
            }
        }
    }

    /// Applies everything the backlog holds after the cursor, then returns (start-up).
    pub async fn catch_up(&self) -> Result<(), JournalError> {
        self.catch_up_from(None).await
    }

    /// Feeds the backlog's records after `from` (default: the cursor) through the applier until
    /// the backlog is exhausted; records at or below the cursor are dropped in each transaction.
    pub async fn catch_up_from(&self, from: Option<u64>) -> Result<(), JournalError> {
        let (lsn, seq) = self
            .read_cursor()
            .await
            .ok_or_else(|| JournalError::Unavailable("closing".into()))?;
        self.lag.set_applied(lsn, seq);
        // At start-up everything the backlog holds is durable: no bound.
        let mut backlog = Reader::new(
            Arc::clone(&self.backlog),
            from.unwrap_or(lsn),
            APPLY_RECORDS_MAX,
        );
        loop {
            match backlog.fill(u64::MAX, u64::MAX).await? {
                Filled::Items => {}
                Filled::CaughtUp | Filled::Gap => return Ok(()),
                Filled::Pruned { first } => return Err(JournalError::Pruned { first_seq: first }),
            }
            let batch = backlog.take_all();
            let last = backlog.after();
            self.lag.committed_lsn.fetch_max(last, Ordering::AcqRel);
            if !self.apply_run(&batch, false).await {
                let stopped = self.lag.stopped_at.load(Ordering::Acquire);
                let problem = lock(&self.lag.problem).clone().unwrap_or_default();
                return Err(if stopped > 0 {
                    JournalError::Rejected(format!(
                        "MySQL refuses journal record {stopped}: {problem} (resolve it, or run `turnstile mysql-apply --skip {stopped}`)"
                    ))
                } else {
                    JournalError::Unavailable(format!(
                        "the MySQL applier could not go on: {problem}"
                    ))
                });
            }
            tracing::info!(applied_lsn = last, "MySQL projections catching up");
        }
    }

    /// Follows the journal: applies what is handed, reads the backlog for what was not, until
    /// closing and drained.
    pub async fn run(self, mut handed: mpsc::UnboundedReceiver<Vec<Committed>>) {
        let Some((lsn, seq)) = self.read_cursor().await else {
            return;
        };
        self.lag.set_applied(lsn, seq);
        let mut next = lsn + 1;
        let mut pending: VecDeque<Committed> = VecDeque::new();
        let mut backlog = Reader::new(Arc::clone(&self.backlog), lsn, APPLY_RECORDS_MAX);
        let mut unreadable = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut last_run = Instant::now();
        loop {
            while let Ok(batch) = handed.try_recv() {
                pending.extend(batch);
            }
            // Linger: a few records wait up to APPLY_LINGER for more, so that under load the
            // applier writes fewer, larger transactions (cheaper per row for the database the
            // log shares) at the cost of that much lag.
            let lingering = APPLY_LINGER.saturating_sub(last_run.elapsed());
            if pending.len() < APPLY_RECORDS_MAX / 4
                && !lingering.is_zero()
                && !self.closing.load(Ordering::Acquire)
            {
                tokio::time::sleep(lingering).await;
                continue;
            }
            while pending.front().is_some_and(|c| c.lsn < next) {
                pending.pop_front();
            }
            let source_ahead = self.lag.committed_lsn.load(Ordering::Acquire) >= next;
            let run: Vec<Committed> = match pending.front().map(|c| c.lsn) {
                Some(front) if front == next => {
                    let n = pending.len().min(APPLY_RECORDS_MAX);
                    pending.drain(..n).collect()
                }
                front if front.is_some() || source_ahead => {
                    // Records before the first handed one (durable before the applier started,
                    // or never handed): from the backlog, bounded by what the source had made
                    // durable before the read (the reader's doc says why).
                    let durable = self.lag.committed_lsn.load(Ordering::Acquire);
                    backlog.seek(next - 1);
                    let filled = backlog
                        .fill(durable, front.unwrap_or(u64::MAX))
                        .await
                        .and_then(|filled| match filled {
                            Filled::Pruned { first } => {
                                Err(JournalError::Pruned { first_seq: first })
                            }
                            filled => Ok(filled),
                        });
                    match (filled, front) {
                        (Ok(Filled::Items), _) => {
                            unreadable.reset();
                            backlog.take_all()
                        }
                        // A gap the source never made durable (records it refused).
                        (Ok(_), Some(front)) => {
                            next = front;
                            continue;
                        }
                        // Nothing readable yet beyond the cursor: wait to be handed more.
                        (Ok(_), None) => {
                            if !self.wait_for_more(&mut handed, &mut pending).await {
                                return;
                            }
                            continue;
                        }
                        (Err(error), _) => {
                            self.lag.set_problem(Some(error.to_string()));
                            if self.closing.load(Ordering::Acquire) {
                                return;
                            }
                            tokio::time::sleep(unreadable.next_wait()).await;
                            continue;
                        }
                    }
                }
                _ => {
                    if !self.wait_for_more(&mut handed, &mut pending).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(last) = run.last().map(|c| c.lsn) else {
                continue;
            };
            if !self.apply_run(&run, true).await {
                return;
            }
            last_run = Instant::now();
            next = last + 1;
        }
    }

    /// Waits for a handed batch; false when closing with nothing left (the applier stops).
    async fn wait_for_more(
        &self,
        handed: &mut mpsc::UnboundedReceiver<Vec<Committed>>,
        pending: &mut VecDeque<Committed>,
    ) -> bool {
        if self.closing.load(Ordering::Acquire) {
            return false;
        }
        let woken = self.wake.notified();
        tokio::select! {
            batch = handed.recv() => match batch {
                Some(batch) => {
                    pending.extend(batch);
                    true
                }
                None => false,
            },
            _ = woken => true,
        }
    }

    /// Applies one run (retrying passing faults; isolating and stopping at a refused record:
    /// with `wait`, until an operator skips it, else it returns at once). False if the applier
    /// must stop (closing while the database is unreachable, or a refused record without `wait`).
    async fn apply_run(&self, run: &[Committed], wait: bool) -> bool {
        match self.apply_with_retries(run, &[]).await {
            Some(Outcome::Applied) => return true,
            None => return false,
            Some(Outcome::Refused(error)) if run.len() == 1 => {
                return self.stop_at(&run[0], error, wait).await;
            }
            Some(Outcome::Refused(error)) => {
                tracing::warn!(%error, records = run.len(), "MySQL refused a run of records; applying them one by one");
            }
        }
        for (i, committed) in run.iter().enumerate() {
            match self
                .apply_with_retries(std::slice::from_ref(committed), &[])
                .await
            {
                Some(Outcome::Applied) => {}
                None => return false,
                Some(Outcome::Refused(error)) => {
                    if !self.stop_at(committed, error, wait).await {
                        return false;
                    }
                    // The rest of the run, after the skipped record.
                    return Box::pin(self.apply_run(&run[i + 1..], wait)).await;
                }
            }
        }
        true
    }

    /// Stopped at a record the database refuses: waits for an operator's skip (a row in
    /// `journal_skips`), then applies it as skipped. False if closing meanwhile.
    async fn stop_at(&self, committed: &Committed, error: sqlx::Error, wait: bool) -> bool {
        let lsn = committed.lsn;
        tracing::error!(lsn, %error, "MySQL refuses a journal record; the applier stops at it until `turnstile mysql-apply --skip {lsn}`");
        self.lag.stopped_at.store(lsn, Ordering::Release);
        self.lag.set_problem(Some(error.to_string()));
        loop {
            if self.closing.load(Ordering::Acquire) {
                return false;
            }
            let skipped = sqlx::query("SELECT 1 FROM journal_skips WHERE node = ? AND lsn = ?")
                .bind(self.node.as_str())
                .bind(lsn as i64)
                .fetch_optional(&self.pool)
                .await;
            if let Ok(Some(_)) = skipped {
                match self
                    .apply_with_retries(std::slice::from_ref(committed), &[lsn])
                    .await
                {
                    Some(Outcome::Applied) => {
                        tracing::warn!(
                            lsn,
                            "journal record skipped by an operator: its projection is not written"
                        );
                        self.lag.stopped_at.store(0, Ordering::Release);
                        self.lag.set_problem(None);
                        return true;
                    }
                    None => return false,
                    Some(Outcome::Refused(error)) => {
                        self.lag.set_problem(Some(error.to_string()));
                    }
                }
            }
            if !wait {
                return false;
            }
            let woken = self.wake.notified();
            let _ = tokio::time::timeout(Duration::from_secs(1), woken).await;
        }
    }

    /// One transaction, retried while the fault passes. `None`: given up (closing).
    async fn apply_with_retries(&self, run: &[Committed], skipped: &[u64]) -> Option<Outcome> {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let started = Instant::now();
        loop {
            let error = match self.apply_once(run, skipped).await {
                Ok(()) => {
                    self.lag.set_problem(None);
                    return Some(Outcome::Applied);
                }
                Err(error) => error,
            };
            // Another node took over the database (write-behind): this node ships nothing more.
            if is_fenced(&error) {
                self.lag.set_problem(Some(error.to_string()));
                return None;
            }
            if !is_transient(&error) {
                return Some(Outcome::Refused(error));
            }
            let reason = retry_reason(&error);
            self.lag.retries[reason].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%error, "retrying a MySQL apply");
            self.lag.set_problem(Some(error.to_string()));
            if self.closing.load(Ordering::Acquire) && started.elapsed() > Duration::from_secs(10) {
                tracing::warn!(%error, "MySQL still unreachable at shutdown; the applier stops (it resumes from its cursor at the next start)");
                return None;
            }
            tokio::time::sleep(backoff.next_wait()).await;
        }
    }

    /// One transaction: cursor read under lock, the records after it, the cursor moved; bounded
    /// by `--mysql-timeout` (a silent network ends in a transient error, retried, not a hang).
    async fn apply_once(&self, run: &[Committed], skipped: &[u64]) -> Result<(), sqlx::Error> {
        let ship = self.ship.as_deref();
        let node = self.node.as_str();
        let moved = in_transaction!(&self.pool, self.timeout, |tx| {
            let row = sqlx::query(
                "SELECT applied_lsn, applied_seq FROM projection_cursor WHERE node = ? FOR UPDATE",
            )
            .bind(node)
            .fetch_one(&mut *tx)
            .await?;
            let applied: i64 = row.try_get(0)?;
            let applied_seq: i64 = row.try_get(1)?;
            // Write-behind ships no events to `outbox`: its events are read from the embedded
            // journal (the relay, the desk), and a record handed live has given its events to the
            // file's event log already, while one read back from the segments (after a restart,
            // or behind) has them again: written for some records and not others, the outbox
            // would hold a gappy half of the seqs.
            let views: Vec<View<'_>> = run
                .iter()
                .filter(|c| c.lsn as i64 > applied)
                .map(|c| {
                    let mut view = View::of(c, skipped.contains(&c.lsn).then_some(SKIPPED));
                    if ship.is_some() {
                        view.events = &[];
                    }
                    view
                })
                .collect();
            // Applied already (a replay): nothing to write; the commit ends the empty
            // transaction.
            match views.last().map(|v| v.lsn) {
                None => (applied as u64, applied_seq as u64, 0),
                Some(last) => {
                    let last_seq = views
                        .iter()
                        .flat_map(|v| v.events.iter().map(|e| e.seq))
                        .max()
                        .unwrap_or(0)
                        .max(applied_seq as u64);
                    if let Some(fence) = ship {
                        write_log(&mut tx, &views, fence).await?;
                    }
                    project(&mut tx, node, &views).await?;
                    sqlx::query(
                        "UPDATE projection_cursor SET applied_lsn = ?, applied_seq = ? WHERE node = ?",
                    )
                    .bind(last as i64)
                    .bind(last_seq as i64)
                    .bind(node)
                    .execute(&mut *tx)
                    .await?;
                    (last, last_seq, views.len())
                }
            }
        })
        .await?;
        let (last, last_seq, records) = moved;
        if records == 0 {
            self.lag.set_applied(last, last_seq);
            return Ok(());
        }
        let oldest = self.lag.seconds();
        self.lag.batches.fetch_add(1, Ordering::Relaxed);
        self.lag
            .records
            .fetch_add(records as u64, Ordering::Relaxed);
        self.lag.lag_at_apply.record(oldest);
        self.lag.set_applied(last, last_seq);
        Ok(())
    }
}

/// A running applier and what its owner needs of it.
pub(crate) struct Follower {
    pub lag: Arc<Lag>,
    closing: Arc<AtomicBool>,
    wake: Arc<Notify>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Follower {
    /// An applier of `node`'s log for a source whose last durable lsn is `committed_lsn`, not yet
    /// running.
    pub fn new(
        pool: MySqlPool,
        node: String,
        backlog: Arc<dyn Source<Committed>>,
        ship: Option<Arc<Fence>>,
        committed_lsn: u64,
        applied_lsn: Arc<AtomicU64>,
        timeout: Duration,
    ) -> (Self, Applier) {
        let lag = Arc::new(Lag::new(committed_lsn, applied_lsn));
        // Records durable before anything is handed (start-up) are at least this old.
        lag.hand(committed_lsn);
        let closing = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let applier = Applier {
            pool,
            node,
            lag: Arc::clone(&lag),
            backlog,
            ship,
            closing: Arc::clone(&closing),
            wake: Arc::clone(&wake),
            timeout,
        };
        (
            Self {
                lag,
                closing,
                wake,
                task: Mutex::new(None),
            },
            applier,
        )
    }

    /// Starts the applier; returns the sink its source's writer hands batches to.
    pub fn start(&self, applier: Applier) -> crate::journal::pipeline::Sink {
        let (queue, handed) = mpsc::unbounded_channel();
        *lock(&self.task) = Some(tokio::spawn(applier.run(handed)));
        sink(Arc::clone(&self.lag), queue)
    }

    /// Applies what the source made durable (up to `grace` while the database is unreachable),
    /// then stops the applier. Call after the source's writer has stopped. `false` if MySQL did
    /// not take everything.
    pub async fn stop(&self, grace: Duration) -> bool {
        let drained = self.lag.wait_drained(grace).await;
        if !drained {
            tracing::warn!(
                records = self.lag.records(),
                "MySQL did not take everything before shutdown; the rest is applied at the next start"
            );
        }
        self.closing.store(true, Ordering::Release);
        self.wake.notify_waiters();
        self.wake.notify_one();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        drained
    }
}
