//! Group commit, shared by every journal: appenders encode their record on their own thread, take
//! the next lsn and event seq under one short lock and queue the record; one writer (a thread for
//! the file journal, a task for MySQL) takes everything queued as one batch, commits it, and answers
//! every waiter of the batch. While it commits, the next batch accumulates, so batches grow with
//! load by themselves and a lone appender waits for exactly one commit.

use super::{Appended, JournalError, JournalStats, Ticket};
use crate::engine::records::{Event, Record};
use crate::sync::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use tokio::sync::{oneshot, Notify};

/// The largest encoded record accepted (16 MiB): bounds what one append can make the writer hold.
pub const PAYLOAD_LEN_MAX: usize = 16 << 20;

/// One queued record.
pub(crate) struct Entry {
    /// Its sequence number: +1 per record, in commit order.
    pub lsn: u64,
    /// The seq of its first event.
    pub first_event_seq: u64,
    /// The record.
    pub record: Record,
    /// The record as JSON.
    pub payload: Vec<u8>,
    /// The record's events, numbered, computed by the appender.
    pub events: Vec<Event>,
    waiter: oneshot::Sender<Result<Appended, JournalError>>,
}

/// A durable record as the writer hands it on to a follower (the MySQL applier, write-behind),
/// moved out of its [`Entry`] once its waiter is answered: nothing is copied.
#[derive(Debug)]
pub(crate) struct Committed {
    /// Its sequence number.
    pub lsn: u64,
    /// The seq of its first event.
    pub first_event_seq: u64,
    /// The record.
    pub record: Record,
    /// The record as JSON, as the journal stored it.
    pub payload: Vec<u8>,
    /// Its numbered events.
    pub events: Vec<Event>,
}

/// Where the writer hands committed batches, in lsn order (a record the store refused is not
/// among them).
pub(crate) type Sink = Box<dyn Fn(Vec<Committed>) + Send + Sync>;

enum Phase {
    Open,
    Failed(JournalError),
}

struct Queue {
    entries: Vec<Entry>,
    next_lsn: u64,
    next_event_seq: u64,
    phase: Phase,
    /// Set by `close`: no new appends; the writer drains what is queued and stops.
    closing: bool,
}

/// The most records waiting for the writer; past it appends are refused as overloaded
/// (backpressure: a record that is not queued has changed nothing).
pub const QUEUE_RECORDS_MAX: usize = 65_536;

/// The queue between appenders and the one writer.
pub(crate) struct Pipeline {
    queue: Mutex<Queue>,
    /// False once the pipeline failed or closed: lets `health` answer without the queue's lock.
    open: AtomicBool,
    /// How many records wait for the writer (kept beside the queue for `health`, lock-free).
    queued: AtomicUsize,
    /// Wakes a writer thread.
    wake_thread: Condvar,
    /// Wakes a writer task.
    wake_task: Notify,
    /// Counters for `/metrics`.
    pub stats: JournalStats,
    /// Where committed batches go next, if anything follows this journal.
    sink: OnceLock<Sink>,
    /// The seq of the last durable event (0: none yet): read lock-free by whoever follows the
    /// event log (the RabbitMQ relay).
    durable_event_seq: AtomicU64,
}

impl Pipeline {
    /// An empty pipeline whose next record gets `next_lsn` and whose next event gets
    /// `next_event_seq`.
    pub fn new(next_lsn: u64, next_event_seq: u64) -> Self {
        Self {
            queue: Mutex::new(Queue {
                entries: Vec::with_capacity(1024),
                next_lsn,
                next_event_seq,
                phase: Phase::Open,
                closing: false,
            }),
            open: AtomicBool::new(true),
            queued: AtomicUsize::new(0),
            wake_thread: Condvar::new(),
            wake_task: Notify::new(),
            stats: JournalStats::default(),
            sink: OnceLock::new(),
            durable_event_seq: AtomicU64::new(next_event_seq.saturating_sub(1)),
        }
    }

    /// The seq of the last durable event (0: none yet).
    pub fn durable_event_seq(&self) -> u64 {
        self.durable_event_seq.load(Ordering::Acquire)
    }

    /// Hands every batch committed from now on to `sink`, in lsn order. Set once, before the
    /// first append.
    pub fn follow(&self, sink: Sink) {
        if self.sink.set(sink).is_err() {
            tracing::error!("a journal can have one follower only");
        }
    }

    /// Queues a record; the ticket resolves when the writer has committed it.
    pub fn submit(&self, record: Record) -> Ticket {
        let payload = crate::engine::codec::encode(&record);
        if payload.len() > PAYLOAD_LEN_MAX {
            return Ticket::failed(JournalError::Io {
                context: "encoding a record".into(),
                message: format!(
                    "record of {} bytes exceeds {PAYLOAD_LEN_MAX}",
                    payload.len()
                ),
            });
        }
        // The events are built before the lock (allocations, id clones) and numbered under it.
        let mut events = record.events(0);
        let (waiter, receiver) = oneshot::channel();
        let mut queue = lock(&self.queue);
        if queue.closing {
            return Ticket::failed(JournalError::Closed);
        }
        if let Phase::Failed(error) = &queue.phase {
            return Ticket::failed(error.clone());
        }
        if queue.entries.len() >= QUEUE_RECORDS_MAX {
            return Ticket::failed(JournalError::Overloaded(queue.entries.len()));
        }
        let lsn = queue.next_lsn;
        let first_event_seq = queue.next_event_seq;
        queue.next_lsn += 1;
        queue.next_event_seq += u64::from(record.event_count());
        for event in &mut events {
            event.seq += first_event_seq;
        }
        queue.entries.push(Entry {
            lsn,
            first_event_seq,
            record,
            payload,
            events,
            waiter,
        });
        let writer_may_sleep = queue.entries.len() == 1;
        self.queued.store(queue.entries.len(), Ordering::Relaxed);
        drop(queue);
        if writer_may_sleep {
            self.wake_thread.notify_one();
            self.wake_task.notify_one();
        }
        Ticket::waiting(receiver)
    }

    fn take_from(&self, queue: &mut Queue, max: usize, spare: &mut Vec<Entry>) {
        if queue.entries.len() <= max {
            std::mem::swap(&mut queue.entries, spare);
        } else {
            spare.extend(queue.entries.drain(..max));
        }
        self.queued.store(queue.entries.len(), Ordering::Relaxed);
    }

    /// Blocks until records are queued, then moves up to `max` of them into `batch` (which must be
    /// empty). Returns false once the pipeline is closed or failed and nothing is left.
    pub fn take_blocking(&self, max: usize, batch: &mut Vec<Entry>) -> bool {
        let mut queue = lock(&self.queue);
        while queue.entries.is_empty() && !queue.closing {
            queue = self
                .wake_thread
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
        if queue.entries.is_empty() {
            return false;
        }
        self.take_from(&mut queue, max, batch);
        true
    }

    /// As [`Self::take_blocking`], for a writer task.
    pub async fn take(&self, max: usize, batch: &mut Vec<Entry>) -> bool {
        loop {
            let notified = self.wake_task.notified();
            {
                let mut queue = lock(&self.queue);
                if !queue.entries.is_empty() {
                    self.take_from(&mut queue, max, batch);
                    return true;
                }
                if queue.closing {
                    return false;
                }
            }
            notified.await;
        }
    }

    /// Answers every waiter of a committed batch (and empties it for reuse). The records in
    /// `rejected` (by lsn, with the store's reason) were refused alone: their waiters hear so.
    pub fn committed(
        &self,
        batch: &mut Vec<Entry>,
        bytes: u64,
        commit_nanos: u64,
        rejected: &[(u64, String)],
    ) {
        self.stats
            .record_batch(batch.len() as u64, bytes, commit_nanos);
        let sink = self.sink.get();
        let mut handed = Vec::with_capacity(if sink.is_some() { batch.len() } else { 0 });
        for entry in batch.drain(..) {
            let answer = match rejected.iter().find(|(lsn, _)| *lsn == entry.lsn) {
                Some((_, reason)) => Err(JournalError::Rejected(reason.clone())),
                None => Ok(Appended {
                    lsn: entry.lsn,
                    first_event_seq: entry.first_event_seq,
                }),
            };
            let durable = answer.is_ok();
            // From the record: a writer may have moved the events out already.
            let count = u64::from(entry.record.event_count());
            if durable && count > 0 {
                let last = entry.first_event_seq + count - 1;
                self.durable_event_seq.fetch_max(last, Ordering::Release);
            }
            // A waiter that gave up (its request was dropped) needs no answer.
            let _ = entry.waiter.send(answer);
            if sink.is_some() && durable {
                handed.push(Committed {
                    lsn: entry.lsn,
                    first_event_seq: entry.first_event_seq,
                    record: entry.record,
                    payload: entry.payload,
                    events: entry.events,
                });
            }
        }
        if let Some(sink) = sink {
            if !handed.is_empty() {
                sink(handed);
            }
        }
    }

    /// The writer cannot go on: fails the batch, everything queued and every later append (until
    /// [`Self::reopen`]).
    pub fn fail(&self, batch: &mut Vec<Entry>, error: JournalError) {
        self.mark_failed(error.clone());
        Self::answer_failed(batch, &error);
    }

    /// Refuses every later append with `error` and fails what is queued (none of it was written),
    /// leaving the batch being written to the writer: its waiters are answered once the writer
    /// knows what became of it.
    pub fn mark_failed(&self, error: JournalError) {
        tracing::error!(%error, "journal write failed; refusing appends until it recovers");
        let queued = {
            let mut queue = lock(&self.queue);
            queue.phase = Phase::Failed(error.clone());
            self.open.store(false, Ordering::Release);
            self.queued.store(0, Ordering::Relaxed);
            std::mem::take(&mut queue.entries)
        };
        let mut queued = queued;
        Self::answer_failed(&mut queued, &error);
    }

    /// Answers every waiter of `batch` with `error` (and empties it).
    pub fn answer_failed(batch: &mut Vec<Entry>, error: &JournalError) {
        for entry in batch.drain(..) {
            let _ = entry.waiter.send(Err(error.clone()));
        }
    }

    /// Takes appends again after a failure, numbering from the durable end the writer found.
    pub fn reopen(&self, next_lsn: u64, next_event_seq: u64) {
        let mut queue = lock(&self.queue);
        queue.next_lsn = next_lsn;
        queue.next_event_seq = next_event_seq;
        self.durable_event_seq
            .fetch_max(next_event_seq.saturating_sub(1), Ordering::Release);
        queue.phase = Phase::Open;
        if !queue.closing {
            self.open.store(true, Ordering::Release);
        }
        tracing::info!(next_lsn, "journal recovered; taking appends again");
    }

    /// Refuses new appends; the writer drains what is queued and stops.
    pub fn close(&self) {
        {
            let mut queue = lock(&self.queue);
            queue.closing = true;
            self.open.store(false, Ordering::Release);
        }
        self.wake_thread.notify_all();
        self.wake_task.notify_one();
    }

    /// True once [`Self::close`] was called.
    pub fn is_closing(&self) -> bool {
        lock(&self.queue).closing
    }

    /// Waits up to `timeout` for [`Self::close`]; true if it was called.
    pub fn wait_closing(&self, timeout: std::time::Duration) -> bool {
        let queue = lock(&self.queue);
        let (queue, _) = self
            .wake_thread
            .wait_timeout_while(queue, timeout, |q| !q.closing)
            .unwrap_or_else(|e| e.into_inner());
        queue.closing
    }

    /// `Ok` while appends are accepted; the reason they are not otherwise.
    pub fn health(&self) -> Result<(), JournalError> {
        if self.open.load(Ordering::Acquire) {
            let queued = self.queued.load(Ordering::Relaxed);
            if queued >= QUEUE_RECORDS_MAX {
                return Err(JournalError::Overloaded(queued));
            }
            return Ok(());
        }
        let queue = lock(&self.queue);
        match &queue.phase {
            Phase::Failed(error) => Err(error.clone()),
            Phase::Open if queue.closing => Err(JournalError::Closed),
            Phase::Open => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::{Cents, Currency, Sku, Stock};
    use crate::engine::records::Product;

    /// A small record (a product `s{n}`), for journal unit tests.
    pub(crate) fn record(n: usize) -> Record {
        Record::Product {
            product: Product {
                sku: Sku::parse(format!("s{n}")).unwrap(),
                name: "p".into(),
                price_cents: Cents::parse(1).unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                stock: Stock::parse(1).unwrap(),
            },
        }
    }

    #[test]
    fn a_full_queue_refuses_appends_as_overloaded_and_changes_nothing() {
        // Proves: past QUEUE_RECORDS_MAX records waiting for the writer, an append is refused at
        // once (nothing queued, so nothing changed) and health says why; room comes back when
        // the writer takes a batch.
        let pipeline = Pipeline::new(1, 1);
        let mut tickets = Vec::with_capacity(QUEUE_RECORDS_MAX);
        for n in 0..QUEUE_RECORDS_MAX {
            tickets.push(pipeline.submit(record(n)));
        }
        assert!(matches!(
            pipeline.health(),
            Err(JournalError::Overloaded(QUEUE_RECORDS_MAX))
        ));
        let refused = pipeline.submit(record(QUEUE_RECORDS_MAX)).wait();
        assert!(
            matches!(refused, Err(JournalError::Overloaded(_))),
            "{refused:?}"
        );
        assert!(refused.is_err_and(|e| e.nothing_changed()));
        let mut batch = Vec::new();
        assert!(pipeline.take_blocking(1_000, &mut batch));
        assert_eq!(pipeline.health(), Ok(()));
        pipeline.committed(&mut batch, 0, 0, &[]);
        assert_eq!(tickets.remove(0).wait().map(|a| a.lsn), Ok(1));
    }
}
