//! Group commit, shared by every journal: appenders encode their record on their own thread and
//! queue it; one writer (a thread for the file journal, a task for MySQL) takes everything queued
//! as one batch, commits it, and answers every waiter of the batch. While it commits, the next batch
//! accumulates, so batches grow with load by themselves and a lone appender waits for exactly one
//! commit.
//!
//! **Per-core batching.** Each core slot (`sync::PerCore`: a per-core worker's own) has a queue of
//! its own, so appenders on different cores never take the same lock or write the same cache line.
//! The writer takes the queues in turn (starting one further each time, so that no core waits
//! behind the others) and numbers what it takes: lsns and event seqs are given in the order of the
//! batch, which is the order of the log. Records queued at the same time are independent of one
//! another (an order or a product has one change in flight at most, and every change is decided
//! against durable state: the engine's `busy` flag), so the order in which the writer merges
//! them is free; one core's records keep the order they were queued in. Appends stop (a failure,
//! `close`) by clearing `open` and then draining every queue under its lock; an appender checks
//! `open` under its queue's lock, so no record is queued behind a drain. The writer sleeps until
//! an appender finds its queue empty and wakes it (`unpark` for a thread, `Notify` for a task: a
//! wake-up given before the writer sleeps is kept).

use super::{Appended, JournalError, JournalStats, Ticket};
use crate::engine::records::{Event, Record};
use crate::sync::{lock, PerCore};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// The record's bytes as the journal stores them (the binary codec, `engine::codec`).
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
    /// The record's bytes, as the journal stored them (the binary codec, `engine::codec`).
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

/// What only the writer and the rare control calls (failure, recovery, close) touch.
struct Control {
    next_lsn: u64,
    next_event_seq: u64,
    phase: Phase,
    /// Set by `close`: no new appends; the writer drains what is queued and stops.
    closing: bool,
    /// Which core's queue the next take starts with.
    next_core: usize,
}

/// The most records waiting for the writer (over all cores); past it appends are refused as
/// overloaded (backpressure: a record that is not queued has changed nothing). Each core's queue
/// takes its share.
pub const QUEUE_RECORDS_MAX: usize = 65_536;

/// One core's queue: records not numbered yet (their lsn and seqs are given when taken).
type CoreQueue = Mutex<Vec<Entry>>;

/// The queues between appenders and the one writer.
pub(crate) struct Pipeline {
    control: Mutex<Control>,
    /// One queue per core slot.
    cores: PerCore<CoreQueue>,
    /// The most records one core's queue holds.
    core_records_max: usize,
    /// False once the pipeline failed or closed: appenders read it under their queue's lock.
    open: AtomicBool,
    /// The writer thread, once it first waited (woken with `unpark`).
    writer_thread: OnceLock<std::thread::Thread>,
    /// Wakes a writer task.
    wake_task: Notify,
    /// Wakes whoever waits for `close` ([`Self::wait_closing`]).
    closed: Condvar,
    /// Counters for `/metrics`.
    pub stats: JournalStats,
    /// Where committed batches go next, if anything follows this journal.
    sink: OnceLock<Sink>,
    /// The seq of the last durable event (0: none yet): read lock-free by whoever follows the
    /// event log (the RabbitMQ relay).
    durable_event_seq: AtomicU64,
    /// The lsn of the last durable record (0: none yet), for the operations desk.
    durable_lsn: AtomicU64,
}

impl Pipeline {
    /// An empty pipeline whose next record gets `next_lsn` and whose next event gets
    /// `next_event_seq`.
    pub fn new(next_lsn: u64, next_event_seq: u64) -> Self {
        let cores: PerCore<CoreQueue> = PerCore::new_with(|| Mutex::new(Vec::with_capacity(256)));
        let core_records_max = (QUEUE_RECORDS_MAX / cores.iter().count()).max(1);
        Self {
            control: Mutex::new(Control {
                next_lsn,
                next_event_seq,
                phase: Phase::Open,
                closing: false,
                next_core: 0,
            }),
            cores,
            core_records_max,
            open: AtomicBool::new(true),
            writer_thread: OnceLock::new(),
            wake_task: Notify::new(),
            closed: Condvar::new(),
            stats: JournalStats::default(),
            sink: OnceLock::new(),
            durable_event_seq: AtomicU64::new(next_event_seq.saturating_sub(1)),
            durable_lsn: AtomicU64::new(next_lsn.saturating_sub(1)),
        }
    }

    /// The seq of the last durable event (0: none yet).
    pub fn durable_event_seq(&self) -> u64 {
        self.durable_event_seq.load(Ordering::Acquire)
    }

    /// The lsn of the last durable record (0: none yet).
    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn.load(Ordering::Acquire)
    }

    /// Hands every batch committed from now on to `sink`, in lsn order. Set once, before the
    /// first append.
    pub fn follow(&self, sink: Sink) {
        if self.sink.set(sink).is_err() {
            tracing::error!("a journal can have one follower only");
        }
    }

    /// Why appends are refused now, or `None` if the pipeline opened again since `open` was read
    /// (a `reopen` in between: the append is tried again).
    fn refusal(&self) -> Option<JournalError> {
        let control = lock(&self.control);
        match &control.phase {
            Phase::Failed(error) => Some(error.clone()),
            Phase::Open if control.closing => Some(JournalError::Closed),
            Phase::Open => None,
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
        // The events are built here (allocations, id clones), seqs counted from 0; the writer
        // adds the record's first seq when it numbers the batch.
        let events = record.events(0);
        let (waiter, receiver) = oneshot::channel();
        let mut queue = lock(self.cores.local());
        while !self.open.load(Ordering::Acquire) {
            drop(queue);
            if let Some(error) = self.refusal() {
                return Ticket::failed(error);
            }
            queue = lock(self.cores.local());
        }
        if queue.len() >= self.core_records_max {
            return Ticket::failed(JournalError::Overloaded(queue.len()));
        }
        queue.push(Entry {
            lsn: 0,
            first_event_seq: 0,
            record,
            payload,
            events,
            waiter,
        });
        let writer_may_sleep = queue.len() == 1;
        drop(queue);
        if writer_may_sleep {
            self.wake_writer();
        }
        Ticket::waiting(receiver)
    }

    fn wake_writer(&self) {
        if let Some(thread) = self.writer_thread.get() {
            thread.unpark();
        }
        self.wake_task.notify_one();
    }

    /// Moves up to `max` queued records into `batch`, numbering them; true if it took any.
    fn take_from_cores(&self, max: usize, batch: &mut Vec<Entry>) -> bool {
        let mut control = lock(&self.control);
        let cores: Vec<&CoreQueue> = self.cores.iter().collect();
        let start = control.next_core % cores.len();
        control.next_core = start + 1;
        for offset in 0..cores.len() {
            let room = max.saturating_sub(batch.len());
            if room == 0 {
                break;
            }
            let mut queue = lock(cores[(start + offset) % cores.len()]);
            let taken = queue.len().min(room);
            for mut entry in queue.drain(..taken) {
                entry.lsn = control.next_lsn;
                entry.first_event_seq = control.next_event_seq;
                control.next_lsn += 1;
                control.next_event_seq += u64::from(entry.record.event_count());
                for event in &mut entry.events {
                    event.seq += entry.first_event_seq;
                }
                batch.push(entry);
            }
        }
        !batch.is_empty()
    }

    /// Blocks until records are queued, then moves up to `max` of them into `batch` (which must be
    /// empty), numbered. Returns false once the pipeline is closed and nothing is left. Always
    /// called from the same writer thread.
    pub fn take_blocking(&self, max: usize, batch: &mut Vec<Entry>) -> bool {
        self.writer_thread.get_or_init(std::thread::current);
        loop {
            // Read before the queues: a record queued before `close` is found by this take.
            let closing = lock(&self.control).closing;
            if self.take_from_cores(max, batch) {
                return true;
            }
            if closing {
                return false;
            }
            std::thread::park();
        }
    }

    /// As [`Self::take_blocking`], for a writer task.
    pub async fn take(&self, max: usize, batch: &mut Vec<Entry>) -> bool {
        loop {
            let notified = self.wake_task.notified();
            let closing = lock(&self.control).closing;
            if self.take_from_cores(max, batch) {
                return true;
            }
            if closing {
                return false;
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
            if durable {
                self.durable_lsn.fetch_max(entry.lsn, Ordering::Release);
            }
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
        lock(&self.control).phase = Phase::Failed(error.clone());
        self.open.store(false, Ordering::Release);
        // After `open` is cleared: an appender that saw it set has queued under its queue's lock,
        // which this drain waits for.
        for queue in self.cores.iter() {
            let mut queued = std::mem::take(&mut *lock(queue));
            Self::answer_failed(&mut queued, &error);
        }
    }

    /// Answers every waiter of `batch` with `error` (and empties it).
    pub fn answer_failed(batch: &mut Vec<Entry>, error: &JournalError) {
        for entry in batch.drain(..) {
            let _ = entry.waiter.send(Err(error.clone()));
        }
    }

    /// Takes appends again after a failure, numbering from the durable end the writer found.
    pub fn reopen(&self, next_lsn: u64, next_event_seq: u64) {
        let mut control = lock(&self.control);
        control.next_lsn = next_lsn;
        control.next_event_seq = next_event_seq;
        self.durable_event_seq
            .fetch_max(next_event_seq.saturating_sub(1), Ordering::Release);
        self.durable_lsn
            .fetch_max(next_lsn.saturating_sub(1), Ordering::Release);
        control.phase = Phase::Open;
        if !control.closing {
            self.open.store(true, Ordering::Release);
        }
        tracing::info!(next_lsn, "journal recovered; taking appends again");
    }

    /// Refuses new appends; the writer drains what is queued and stops.
    pub fn close(&self) {
        {
            let mut control = lock(&self.control);
            control.closing = true;
            self.open.store(false, Ordering::Release);
        }
        self.closed.notify_all();
        self.wake_writer();
    }

    /// True once [`Self::close`] was called.
    pub fn is_closing(&self) -> bool {
        lock(&self.control).closing
    }

    /// Waits up to `timeout` for [`Self::close`]; true if it was called.
    pub fn wait_closing(&self, timeout: std::time::Duration) -> bool {
        let control = lock(&self.control);
        let (control, _) = self
            .closed
            .wait_timeout_while(control, timeout, |c| !c.closing)
            .unwrap_or_else(|e| e.into_inner());
        control.closing
    }

    /// `Ok` while appends are accepted; the reason they are not otherwise.
    pub fn health(&self) -> Result<(), JournalError> {
        if self.open.load(Ordering::Acquire) {
            // The caller's own core's queue: that is where its append would go.
            let queued = lock(self.cores.local()).len();
            if queued >= self.core_records_max {
                return Err(JournalError::Overloaded(queued));
            }
            return Ok(());
        }
        let control = lock(&self.control);
        match &control.phase {
            Phase::Failed(error) => Err(error.clone()),
            Phase::Open if control.closing => Err(JournalError::Closed),
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
                max_per_customer: None,
                admission_rate: None,
            },
        }
    }

    /// A writer thread that commits every batch at once, until the pipeline closes; returns the
    /// lsns in the order it committed them, with the product each record names.
    fn run_writer(pipeline: &Pipeline) -> Vec<(u64, String)> {
        let mut log = Vec::new();
        let mut batch = Vec::new();
        while pipeline.take_blocking(64, &mut batch) {
            for entry in &batch {
                if let Record::Product { product } = &entry.record {
                    log.push((entry.lsn, product.sku.as_str().to_owned()));
                }
            }
            pipeline.committed(&mut batch, 0, 0, &[]);
        }
        log
    }

    #[test]
    fn appends_from_many_cores_get_every_lsn_once_in_each_cores_order() {
        // Proves: with one queue per core, the writer's numbering gives lsns 1..=N with no gap and
        // no repeat, each append's ticket names the lsn its record was committed under, and one
        // core's records keep the order they were appended in.
        let pipeline = Pipeline::new(1, 1);
        let (threads, per_thread) = (6usize, 3_000usize);
        let (log, tickets) = std::thread::scope(|scope| {
            let writer = scope.spawn(|| run_writer(&pipeline));
            let appenders: Vec<_> = (0..threads)
                .map(|thread| {
                    let pipeline = &pipeline;
                    scope.spawn(move || {
                        crate::sync::set_thread_slot(thread);
                        (0..per_thread)
                            .map(|n| {
                                let sku = format!("t{thread}-{n}");
                                let ticket = pipeline.submit(Record::Product {
                                    product: Product {
                                        sku: Sku::parse(sku.clone()).unwrap(),
                                        name: "p".into(),
                                        price_cents: Cents::parse(1).unwrap(),
                                        currency: Currency::parse("EUR").unwrap(),
                                        stock: Stock::parse(1).unwrap(),
                                        max_per_customer: None,
                                        admission_rate: None,
                                    },
                                });
                                (sku, ticket)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let tickets: Vec<(String, Ticket)> = appenders
                .into_iter()
                .flat_map(|a| a.join().unwrap())
                .collect();
            let tickets: Vec<(String, u64)> = tickets
                .into_iter()
                .map(|(sku, ticket)| (sku, ticket.wait().expect("committed").lsn))
                .collect();
            pipeline.close();
            (writer.join().unwrap(), tickets)
        });
        let total = threads * per_thread;
        let lsns: Vec<u64> = log.iter().map(|(lsn, _)| *lsn).collect();
        assert_eq!(lsns, (1..=total as u64).collect::<Vec<_>>());
        let by_sku: std::collections::HashMap<&str, u64> =
            log.iter().map(|(lsn, sku)| (sku.as_str(), *lsn)).collect();
        for (sku, lsn) in &tickets {
            assert_eq!(by_sku.get(sku.as_str()), Some(lsn), "{sku}");
        }
        for thread in 0..threads {
            let own: Vec<u64> = (0..per_thread)
                .map(|n| by_sku[format!("t{thread}-{n}").as_str()])
                .collect();
            assert!(
                own.windows(2).all(|w| w[0] < w[1]),
                "thread {thread} out of order"
            );
        }
    }

    #[test]
    fn appends_racing_a_failure_or_a_close_all_get_an_answer() {
        // Proves: an append racing `mark_failed` or `close` is either committed (under an lsn of
        // the gapless log) or refused; none is left queued with no answer.
        for close in [false, true] {
            let pipeline = Pipeline::new(1, 1);
            let submitted = std::sync::atomic::AtomicUsize::new(0);
            let (log, answers) = std::thread::scope(|scope| {
                let writer = scope.spawn(|| run_writer(&pipeline));
                let appenders: Vec<_> = (0..4usize)
                    .map(|thread| {
                        let (pipeline, submitted) = (&pipeline, &submitted);
                        scope.spawn(move || {
                            crate::sync::set_thread_slot(thread);
                            (0..2_000)
                                .map(|n| {
                                    submitted.fetch_add(1, Ordering::Relaxed);
                                    pipeline.submit(record(thread * 10_000 + n))
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                // Stop while the appenders run (they submit 8,000 in all).
                while submitted.load(Ordering::Relaxed) < 1_000 {
                    std::thread::yield_now();
                }
                if close {
                    pipeline.close();
                } else {
                    pipeline.mark_failed(JournalError::Unknown("stop".into()));
                    pipeline.close();
                }
                let answers: Vec<_> = appenders
                    .into_iter()
                    .flat_map(|a| a.join().unwrap())
                    .map(Ticket::wait)
                    .collect();
                (writer.join().unwrap(), answers)
            });
            let committed: Vec<u64> = answers
                .iter()
                .filter_map(|a| a.as_ref().ok())
                .map(|a| a.lsn)
                .collect();
            assert_eq!(committed.len(), log.len(), "close {close}");
            let lsns: Vec<u64> = log.iter().map(|(lsn, _)| *lsn).collect();
            assert_eq!(lsns, (1..=log.len() as u64).collect::<Vec<_>>());
            assert!(answers
                .iter()
                .filter(|a| a.is_err())
                .all(|a| matches!(a, Err(JournalError::Closed | JournalError::Unknown(_)))));
        }
    }

    #[test]
    fn a_full_queue_refuses_appends_as_overloaded_and_changes_nothing() {
        // Proves: past its core's share of QUEUE_RECORDS_MAX records waiting for the writer, an append is refused at
        // once (nothing queued, so nothing changed) and health says why; room comes back when
        // the writer takes a batch.
        let pipeline = Pipeline::new(1, 1);
        let max = pipeline.core_records_max;
        let mut tickets = Vec::with_capacity(max);
        for n in 0..max {
            tickets.push(pipeline.submit(record(n)));
        }
        assert!(matches!(
            pipeline.health(),
            Err(JournalError::Overloaded(n)) if n == max
        ));
        let refused = pipeline.submit(record(max)).wait();
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

    /// A new order `o{n}` released at once: two events (reserved, released), no stock held; a
    /// record that carries events, for journal unit tests.
    pub(crate) fn released_order(n: usize) -> Record {
        use crate::domain::{CustomerId, OrderId};
        use crate::engine::order::{Order, OrderItem, OrderStatus};
        Record::Order {
            order: Order {
                order_id: OrderId::parse(format!("o{n}")).unwrap(),
                status: OrderStatus::Released,
                customer_id: CustomerId::parse("c").unwrap(),
                items: vec![OrderItem {
                    sku: Sku::parse("s1").unwrap(),
                    quantity: 1,
                    unit_price_cents: Cents::parse(1).unwrap(),
                }],
                total_cents: 1,
                currency: Currency::parse("EUR").unwrap(),
                created_at_ms: 0,
                hold_deadline_ms: 0,
                payment_id: None,
                payment_due: None,
            },
            previous: None,
            entered: vec![OrderStatus::Reserved, OrderStatus::Released],
            at_ms: 0,
            answer: None,
            replaces_expired_key: false,
        }
    }

    /// The name a test record carries (its product's SKU or its order's id).
    fn name_of(record: &Record) -> String {
        match record {
            Record::Product { product } => product.sku.as_str().to_owned(),
            Record::Order { order, .. } => order.order_id.as_str().to_owned(),
            Record::Payments { .. } | Record::Adopted { .. } | Record::AdoptedAway { .. } => {
                String::new()
            }
        }
    }

    /// One durable record as a test writer saw it: lsn, first event seq, its events' seqs, name.
    type Logged = (u64, u64, Vec<u64>, String);

    #[test]
    fn failures_and_reopens_racing_appends_keep_lsns_and_event_seqs_gapless() {
        // Proves: with appends from threads spread over fewer queues than threads, a writer that
        // fails a batch now and then (as the file journal's recovery does: refuse, fail what is
        // queued and the batch, renumber from the durable end) leaves a log whose lsns are
        // 1..=N and whose event seqs are 1..=M in lsn order, every ticket resolves, a committed
        // ticket names the lsn and first seq its record was logged under, and no failed record
        // is in the log.
        let pipeline = Pipeline::new(1, 1);
        let (threads, per_thread) = (6usize, 1_500usize);
        let (log, answers) = std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                let mut log: Vec<Logged> = Vec::new();
                let mut batch = Vec::new();
                let (mut durable_lsn, mut durable_seq) = (0u64, 1u64);
                let mut batches = 0u64;
                while pipeline.take_blocking(16, &mut batch) {
                    batches += 1;
                    if batches % 5 == 3 {
                        let error = JournalError::Unknown("simulated failure".into());
                        pipeline.mark_failed(error.clone());
                        Pipeline::answer_failed(&mut batch, &error);
                        pipeline.reopen(durable_lsn + 1, durable_seq);
                        continue;
                    }
                    for entry in &batch {
                        log.push((
                            entry.lsn,
                            entry.first_event_seq,
                            entry.events.iter().map(|e| e.seq).collect(),
                            name_of(&entry.record),
                        ));
                    }
                    let last = batch.last().expect("a batch is never empty");
                    durable_lsn = last.lsn;
                    durable_seq = last.first_event_seq + u64::from(last.record.event_count());
                    pipeline.committed(&mut batch, 0, 0, &[]);
                }
                log
            });
            let appenders: Vec<_> = (0..threads)
                .map(|thread| {
                    let pipeline = &pipeline;
                    scope.spawn(move || {
                        // Pairs of threads share a queue; the last pair takes slots round robin.
                        if thread < 4 {
                            crate::sync::set_thread_slot(thread / 2);
                        }
                        let mut tickets = Vec::with_capacity(per_thread);
                        let mut answers = Vec::with_capacity(per_thread);
                        for n in 0..per_thread {
                            let id = thread * 100_000 + n;
                            let record = if n % 2 == 0 {
                                record(id)
                            } else {
                                released_order(id)
                            };
                            let name = name_of(&record);
                            let ticket = pipeline.submit(record);
                            // Every few appends, wait: the writer goes to sleep and wakes often.
                            if n % 7 == 0 {
                                answers.push((name, ticket.wait()));
                            } else {
                                tickets.push((name, ticket));
                            }
                        }
                        answers.extend(
                            tickets
                                .into_iter()
                                .map(|(name, ticket)| (name, ticket.wait())),
                        );
                        answers
                    })
                })
                .collect();
            let answers: Vec<(String, Result<Appended, JournalError>)> = appenders
                .into_iter()
                .flat_map(|a| a.join().unwrap())
                .collect();
            pipeline.close();
            (writer.join().unwrap(), answers)
        });
        assert_eq!(
            log.iter().map(|l| l.0).collect::<Vec<_>>(),
            (1..=log.len() as u64).collect::<Vec<_>>(),
            "lsns"
        );
        let seqs: Vec<u64> = log.iter().flat_map(|l| l.2.iter().copied()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seqs");
        for (_, first, events, name) in &log {
            if let Some(seq) = events.first() {
                assert_eq!(seq, first, "{name}");
            }
        }
        let by_name: std::collections::HashMap<&str, &Logged> =
            log.iter().map(|l| (l.3.as_str(), l)).collect();
        assert_eq!(by_name.len(), log.len(), "a record logged twice");
        let mut committed = 0;
        for (name, answer) in &answers {
            match answer {
                Ok(appended) => {
                    committed += 1;
                    let logged = by_name
                        .get(name.as_str())
                        .expect("committed but not logged");
                    assert_eq!(
                        (appended.lsn, appended.first_event_seq),
                        (logged.0, logged.1),
                        "{name}"
                    );
                }
                Err(error) => {
                    assert!(
                        !by_name.contains_key(name.as_str()),
                        "{name} failed: {error}"
                    );
                    assert!(
                        matches!(error, JournalError::Unknown(_) | JournalError::Closed),
                        "{error:?}"
                    );
                }
            }
        }
        assert_eq!(committed, log.len());
        assert!(answers.iter().any(|(_, a)| a.is_err()), "no failure raced");
    }

    #[test]
    fn lone_appends_from_threads_sharing_queues_never_miss_a_wakeup() {
        // Proves: appenders that each wait for their record before the next (so the writer
        // empties every queue and goes to sleep between most records), some of them sharing a
        // queue, always wake the writer, whether it is a thread (`park`) or a task (`Notify`);
        // and `close` then stops either writer. A lost wake-up hangs this test.
        for task in [false, true] {
            let pipeline = Pipeline::new(1, 1);
            let (threads, per_thread) = (5usize, 1_000usize);
            let log = std::thread::scope(|scope| {
                let writer = scope.spawn(|| {
                    if !task {
                        return run_writer(&pipeline);
                    }
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("runtime");
                    runtime.block_on(async {
                        let mut log = Vec::new();
                        let mut batch = Vec::new();
                        while pipeline.take(64, &mut batch).await {
                            log.extend(batch.iter().map(|e| (e.lsn, name_of(&e.record))));
                            pipeline.committed(&mut batch, 0, 0, &[]);
                        }
                        log
                    })
                });
                let appenders: Vec<_> = (0..threads)
                    .map(|thread| {
                        let pipeline = &pipeline;
                        scope.spawn(move || {
                            if thread < 4 {
                                crate::sync::set_thread_slot(thread % 2);
                            }
                            for n in 0..per_thread {
                                let appended = pipeline
                                    .submit(record(thread * 100_000 + n))
                                    .wait()
                                    .expect("committed");
                                assert!(appended.lsn >= 1);
                            }
                        })
                    })
                    .collect();
                for appender in appenders {
                    appender.join().unwrap();
                }
                pipeline.close();
                writer.join().unwrap()
            });
            assert_eq!(
                log.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(),
                (1..=(threads * per_thread) as u64).collect::<Vec<_>>(),
                "task {task}"
            );
        }
    }
}
