//! The journal: the durable truth. Callers append records and await a [`Ticket`], which resolves
//! only once the record is on stable storage. One writer commits everything pending as one batch
//! (group commit). The journal also holds the event log: each record's events get their `seq` in
//! commit order and become readable once durable.
//!
//! Implementations: [`file::FileJournal`] (the embedded default) and [`mysql::MySqlJournal`].
//!
//! A ticket resolves only once the outcome is known: `Ok` when the record is durable, an error
//! that [`JournalError::nothing_changed`] when it is known not to be (and never to become)
//! durable, and [`JournalError::Unknown`] when the journal cannot tell.

pub mod downstream;
pub mod event_log;
pub mod file;
pub mod mysql;
pub(crate) mod pipeline;
pub mod write_behind;

use crate::engine::records::{Event, Record};
use crate::metrics::{Histogram, BATCH_BOUNDS_RECORDS, LATENCY_BOUNDS_SECONDS};
use crate::BoxFuture;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// Why the journal could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// Writing or syncing failed; the record is not durable and never will be (the journal cut
    /// what it had written of it). The journal refuses appends until it has recovered.
    #[error("journal I/O failed ({context}): {message}")]
    Io {
        /// What the journal was doing.
        context: String,
        /// The operating system's message.
        message: String,
    },
    /// The journal's files hold a bad record that is not a torn tail; nothing was changed.
    #[error("journal corrupt at {file} offset {offset}: {reason} (restore the file from a backup or move it away; the journal refuses to start)")]
    Corrupt {
        /// The file.
        file: String,
        /// Where in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The journal's store is unreachable for now (the database is down); the journal keeps
    /// retrying and recovers by itself.
    #[error("the journal's database is unreachable ({0}); retrying")]
    Unavailable(String),
    /// The journal was closed.
    #[error("the journal is closed")]
    Closed,
    /// The journal's queue is full: the record was not queued (nothing changed).
    #[error("the journal's queue is full ({0} records waiting)")]
    Overloaded(usize),
    /// The store refused this one record (a constraint, say); the record is not durable, the
    /// journal goes on with the others.
    #[error("the journal refused the record: {0}")]
    Rejected(String),
    /// The events asked for are past `--event-retention`: the oldest kept has `first_seq`.
    #[error("events before seq {first_seq} are past retention")]
    Pruned {
        /// The oldest event still kept.
        first_seq: u64,
    },
    /// The journal stopped without saying whether the record is durable: only a restart (and its
    /// recovery) can tell.
    #[error("the journal stopped without an answer ({0}); the outcome is unknown")]
    Unknown(String),
}

impl JournalError {
    /// True if the record is known not to be durable (nothing changed); false if it may be.
    pub fn nothing_changed(&self) -> bool {
        !matches!(self, JournalError::Unknown(_))
    }

    pub(crate) fn io(context: impl Into<String>, error: &std::io::Error) -> Self {
        JournalError::Io {
            context: context.into(),
            message: error.to_string(),
        }
    }
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The record's sequence number.
    pub lsn: u64,
    /// The seq of its first event (if it has any).
    pub first_event_seq: u64,
}

/// Resolves once the appended record is durable (or the append failed). Await it from async code or
/// call [`Ticket::wait`] from a plain thread.
#[must_use = "an append is durable only once its ticket resolves"]
pub struct Ticket(TicketInner);

enum TicketInner {
    Waiting(oneshot::Receiver<Result<Appended, JournalError>>),
    Failed(Option<JournalError>),
}

/// The writer dropped a waiter without answering (it died): the outcome is unknown.
fn lost() -> JournalError {
    JournalError::Unknown("the journal writer went away".into())
}

impl Ticket {
    pub(crate) fn waiting(receiver: oneshot::Receiver<Result<Appended, JournalError>>) -> Self {
        Ticket(TicketInner::Waiting(receiver))
    }

    pub(crate) fn failed(error: JournalError) -> Self {
        Ticket(TicketInner::Failed(Some(error)))
    }

    /// Blocks the calling thread until the record is durable. Not for async code.
    pub fn wait(self) -> Result<Appended, JournalError> {
        match self.0 {
            TicketInner::Waiting(receiver) => {
                receiver.blocking_recv().unwrap_or_else(|_| Err(lost()))
            }
            TicketInner::Failed(error) => Err(error.unwrap_or(JournalError::Closed)),
        }
    }
}

impl Future for Ticket {
    type Output = Result<Appended, JournalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            TicketInner::Waiting(receiver) => Pin::new(receiver)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(lost()))),
            TicketInner::Failed(error) => {
                Poll::Ready(Err(error.take().unwrap_or(JournalError::Closed)))
            }
        }
    }
}

/// Counters for `/metrics` and benchmarks.
#[derive(Debug)]
pub struct JournalStats {
    /// Batches committed.
    pub batches: AtomicU64,
    /// Records committed.
    pub records: AtomicU64,
    /// Bytes committed.
    pub bytes: AtomicU64,
    /// Total time spent in sync calls (nanoseconds).
    pub sync_nanos: AtomicU64,
    /// The largest batch so far (records).
    pub batch_records_max: AtomicU64,
    /// Records per batch.
    pub batch_records: Histogram,
    /// Time of one sync (`fdatasync` or COMMIT), in seconds.
    pub commit_seconds: Histogram,
    /// Batches retried after a passing database fault, by reason ([`RETRY_REASONS`]).
    pub retries: [AtomicU64; 3],
}

/// Why a batch was retried: a deadlock (MySQL 1213), a lock wait timeout (1205), or the
/// connection or server (lost, gone away, shutting down, read-only after a failover).
pub const RETRY_REASONS: [&str; 3] = ["deadlock", "lock_wait_timeout", "connection"];

/// Writes retry counters by reason ([`RETRY_REASONS`]) as one counter family.
pub(crate) fn encode_retries(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    retries: &[AtomicU64; 3],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (reason, count) in RETRY_REASONS.iter().zip(retries) {
        family
            .encode_family(&[("reason", *reason)])?
            .encode_counter::<prometheus_client::encoding::NoLabelSet, u64, u64>(
                &count.load(Ordering::Relaxed),
                None,
            )?;
    }
    Ok(())
}

impl Default for JournalStats {
    fn default() -> Self {
        Self {
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            sync_nanos: AtomicU64::new(0),
            batch_records_max: AtomicU64::new(0),
            batch_records: Histogram::new(BATCH_BOUNDS_RECORDS),
            retries: Default::default(),
            commit_seconds: Histogram::new(LATENCY_BOUNDS_SECONDS),
        }
    }
}

impl JournalStats {
    pub(crate) fn record_batch(&self, records: u64, bytes: u64, sync_nanos: u64) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.sync_nanos.fetch_add(sync_nanos, Ordering::Relaxed);
        self.batch_records_max.fetch_max(records, Ordering::Relaxed);
        self.batch_records.record(records as f64);
        self.commit_seconds.record(sync_nanos as f64 / 1e9);
    }

    /// Writes the journal's metrics.
    pub fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::encode_counter;
        for (name, help, value) in [
            ("turnstile_journal_batches", "Group commits.", &self.batches),
            (
                "turnstile_journal_records",
                "Records committed.",
                &self.records,
            ),
            ("turnstile_journal_bytes", "Bytes committed.", &self.bytes),
        ] {
            encode_counter(encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        encode_retries(
            encoder,
            "turnstile_journal_retries",
            "Batches retried after a passing database fault, by reason.",
            &self.retries,
        )?;
        self.batch_records.encode(
            encoder,
            "turnstile_journal_batch_records",
            "Records per group commit.",
        )?;
        self.commit_seconds.encode(
            encoder,
            "turnstile_journal_commit_seconds",
            "Time of one fdatasync or COMMIT.",
        )
    }
}

/// Where a journal stands, for the operations desk (`GET /v1/admin/journal`, API.md): which
/// journal, its last durable record, and by kind the segment files on disk or this node's log in
/// MySQL.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Position {
    /// `embedded`, `mysql` (MySQL is the journal) or `write-behind`.
    pub kind: &'static str,
    /// The lsn of the last durable record of this node's log (0: none yet).
    pub last_lsn: u64,
    /// The embedded journal's segment files (write-behind's too), oldest first; `None` for MySQL.
    pub segments: Option<Vec<SegmentPosition>>,
    /// This node's log in MySQL; `None` for the embedded journal.
    pub mysql: Option<MySqlPosition>,
}

/// One segment file of the embedded journal.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentPosition {
    /// Its name in the data dir.
    pub file: String,
    /// The lsn of its first record.
    pub first_lsn: u64,
    /// The seq of its first event (or, with none, of the next one).
    pub first_event_seq: u64,
}

/// This node's log in MySQL.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MySqlPosition {
    /// The log's node (`""`: the unnamed log of a single node).
    pub log: String,
    /// The turn this process holds as the log's one writer (`journal_writer.epoch`).
    pub writer_turn: u64,
    /// The last lsn MySQL holds in the projections (write-behind: the last record shipped).
    pub applied_lsn: u64,
    /// The last event seq the projections hold (readable from `outbox`); `None` in write-behind,
    /// whose events live in the data dir only (MySQL gets the orders, not the outbox).
    pub applied_event_seq: Option<u64>,
    /// Records durable and not yet applied, and how old the oldest of them is.
    pub lag_records: u64,
    /// Seconds.
    pub lag_seconds: f64,
    /// The error the applier is retrying, if any.
    pub problem: Option<String>,
}

/// A durable, ordered store of records with group commit.
pub trait Journal: Send + Sync {
    /// Enqueues a record; the ticket resolves once it is durable.
    fn append(&self, record: Record) -> Ticket;
    /// Up to `limit` durable events with `seq > after_seq`, in order.
    fn events(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Event>, JournalError>>;
    /// An order the store keeps that memory no longer does (past `--order-retention`). The
    /// embedded journal keeps none beyond memory's.
    fn order(
        &self,
        _order_id: &crate::domain::OrderId,
    ) -> BoxFuture<'_, Result<Option<crate::engine::order::Order>, JournalError>> {
        Box::pin(async { Ok(None) })
    }
    /// The answer a record of any node's log placed an order with under `key`, when the store is
    /// shared by several nodes and guards keys for all of them (MySQL as the journal: the claims
    /// are global). A checkout whose record the store refused because another node's order holds
    /// the key replays this answer. The embedded journal is one node's: `None`.
    fn claimed_answer(
        &self,
        _key: &crate::domain::IdempotencyKey,
    ) -> BoxFuture<'_, Result<Option<crate::engine::records::StoredAnswer>, JournalError>> {
        Box::pin(async { Ok(None) })
    }
    /// Removes what the store keeps of answers older than `cutoff_ms` (the idempotency retention),
    /// so a key past retention starts afresh; returns how many went. The embedded journal keeps
    /// nothing beyond its records (snapshots drop expired answers), so by default nothing to do.
    fn purge_answers(&self, _cutoff_ms: i64) -> BoxFuture<'_, Result<u64, JournalError>> {
        Box::pin(async { Ok(0) })
    }
    /// The seq of the last durable event (0: none yet); cheap (an atomic load), so a follower of
    /// the event log can poll it.
    fn last_event_seq(&self) -> u64;
    /// Counters.
    fn stats(&self) -> &JournalStats;
    /// The turn this process holds as its log's one writer in MySQL (`journal_writer.epoch`, see
    /// [`mysql::writer_lock`]); `None` for a journal with no log in MySQL.
    fn writer_turn(&self) -> Option<u64> {
        None
    }
    /// How many events are held in memory (0 for a journal that reads them from its store).
    fn events_in_memory(&self) -> usize {
        0
    }
    /// `Ok` while appends can succeed, as far as the journal knows without asking its store (cheap:
    /// checked on every checkout); the error that stops them otherwise.
    fn health(&self) -> Result<(), JournalError>;
    /// `Ok` if the journal's store answers now (for `/readyz`).
    fn ready(&self) -> BoxFuture<'_, Result<(), JournalError>> {
        let health = self.health();
        Box::pin(async move { health })
    }
    /// The parts `/readyz` reports, each `Ok` or why not (API.md); the node is ready when all are.
    fn checks(&self) -> BoxFuture<'_, Vec<(&'static str, Result<(), String>)>> {
        Box::pin(async move { vec![("journal", self.ready().await.map_err(|e| e.to_string()))] })
    }
    /// Where the journal stands (the operations desk's `GET /v1/admin/journal`).
    fn position(&self) -> Position;
    /// Writes the journal's metrics.
    fn encode_metrics(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        self.stats().encode(encoder)
    }
    /// Waits for everything appended so far to be durable, then stops the writer. Later appends
    /// fail with [`JournalError::Closed`]. `true` unless a database behind the journal (MySQL's
    /// projections, or the write-behind copy) was left without part of it: then the node's
    /// next start (or, on a MySQL journal, a reaper) applies the rest.
    fn shutdown(&self) -> BoxFuture<'_, bool>;
}
