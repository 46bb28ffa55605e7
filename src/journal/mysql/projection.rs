//! The MySQL log and its projections.
//!
//! **The log.** The `journal` table is the write-ahead log: one row per record, in lsn order, and
//! nothing else is written with a record. The row of a record that places an order carries its
//! claims (`journal.order_id`, `journal.idempotency_key`, `journal.payment_id`, each `UNIQUE`,
//! NULL on every other row), so the database itself refuses a second order for one key or one
//! payment. That is `write_log`: one row per record. (Until migration `20261127000005` the
//! claims were a row of their own in `order_claims`: two rows per new order.)
//!
//! **The projections.** `orders`, `order_items`, `idempotency_keys`, `inventory`, `products` and
//! `outbox` are maintained from the log by the `Applier`, *behind* the log's
//! COMMIT, in transactions of their own: each applies a run of records in lsn order and moves the
//! durable cursor (`projection_cursor.applied_lsn`) in the same transaction, after reading it
//! `FOR UPDATE` and dropping records at or below it. So a record is applied exactly once, whoever
//! replays it and however often (a crash right after COMMIT, a lost connection that hid one). An
//! order's changes within one run are folded into its last state before they are written (a new
//! paid order and its capture become one `orders` row, not an insert and an update). `payments` is
//! a view of `orders` (a payment's state follows from its order's status and what it owes).
//!
//! One applier feeds both modes (DESIGN.md): with `--mysql-url` the applier follows the MySQL
//! log (its writer hands every committed batch over; after a restart it reads the `journal`
//! table from the cursor); with `--mysql-write-behind` it follows the embedded journal and writes
//! the log rows too, in the same transaction as the projections and the cursor.
//!
//! What a reader of the tables sees: `journal` (with its claims) holds every acknowledged record
//! at acknowledgement time; the projections hold a prefix of the log (every record up to
//! `projection_cursor.applied_lsn`, nothing after it), normally milliseconds behind; the lag is in
//! `/metrics` (`turnstile_mysql_lag_records`, `turnstile_mysql_lag_seconds`) and `/readyz`.
//!
//! A record the database refuses for good (not a passing fault): the applier stops at it, applies
//! nothing after it, and says why in `/readyz`, in `/metrics` (`turnstile_mysql_apply_stopped`) and
//! in the log at ERROR. `turnstile mysql-apply --skip LSN` (a row in `journal_skips`) lets it go on:
//! the skipped record's log row is kept (write-behind writes it without its claims), its
//! projection is not written.

use super::{fetch_all_bounded, in_transaction, is_transient, retry_reason, StableChunks};
use crate::backoff::Backoff;
use crate::domain::{IdempotencyKey, OrderId, Sku};
use crate::engine::order::{Order, OrderStatus, PaymentDue};
use crate::engine::records::{Event, Product, Record, SettledPayment, StoredAnswer};
use crate::journal::pipeline::Committed;
use crate::journal::JournalError;
use crate::metrics::{encode_counter, encode_gauge, Histogram, LATENCY_BOUNDS_SECONDS};
use crate::sync::lock;
use crate::BoxFuture;
use sqlx::mysql::{MySqlConnection, MySqlPool};
use sqlx::{MySql, QueryBuilder, Row};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// One record as the log and the projections see it.
pub(crate) struct View<'a> {
    pub lsn: u64,
    pub first_event_seq: u64,
    pub record: &'a Record,
    pub payload: &'a [u8],
    pub events: &'a [Event],
    /// Why the record is left out: refused by the database for good (MySQL as the journal) or
    /// skipped by an operator (`journal_skips`). Its log row is written (so `journal.lsn` has no
    /// gap) with this reason in `journal.refused`, without claims; its projection not at all.
    pub refused: Option<&'a str>,
}

impl<'a> View<'a> {
    pub fn of(committed: &'a Committed, refused: Option<&'a str>) -> Self {
        Self {
            lsn: committed.lsn,
            first_event_seq: committed.first_event_seq,
            record: &committed.record,
            payload: &committed.payload,
            events: &committed.events,
            refused,
        }
    }
}

/// The claims a record makes: the order id, idempotency key and payment id of the order it
/// places (none for any other record, or one left out).
fn claims<'a>(view: &View<'a>) -> (Option<&'a str>, Option<&'a str>, Option<&'a str>) {
    match view.record {
        Record::Order {
            order,
            previous: None,
            answer,
            ..
        } if view.refused.is_none() => (
            Some(order.order_id.as_str()),
            answer.as_ref().map(|(key, _)| key.as_str()),
            order.payment_id.as_deref(),
        ),
        _ => (None, None, None),
    }
}

/// Writes the log rows of `views`: one `journal` row each, carrying the claims of the order it
/// places (see [`claims`]), after releasing the claims of keys reused past their retention.
/// Returns the payload bytes.
pub(crate) async fn write_log(
    tx: &mut MySqlConnection,
    views: &[View<'_>],
) -> Result<u64, sqlx::Error> {
    let mut expired_keys: Vec<&str> = Vec::new();
    let mut bytes = 0u64;
    for view in views {
        bytes += view.payload.len() as u64;
        // A key the record claims afresh after its old answer expired: the old claim goes first.
        if let (
            Some(key),
            Record::Order {
                replaces_expired_key: true,
                ..
            },
        ) = (claims(view).1, view.record)
        {
            expired_keys.push(key);
        }
    }
    if !expired_keys.is_empty() {
        let mut q = QueryBuilder::<MySql>::new(
            "UPDATE journal SET idempotency_key = NULL WHERE idempotency_key IN (",
        );
        let mut keys = q.separated(", ");
        for key in &expired_keys {
            keys.push_bind(*key);
        }
        q.push(")");
        q.build().execute(&mut *tx).await?;
    }
    // The record's bytes as they are (a LONGBLOB: no character set work for MariaDB).
    for chunk in views.stable_chunks() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO journal (lsn, first_event_seq, record, refused, order_id, idempotency_key, payment_id) ",
        );
        q.push_values(chunk, |mut row, view| {
            let (order_id, key, payment_id) = claims(view);
            row.push_bind(view.lsn as i64)
                .push_bind(view.first_event_seq as i64)
                .push_bind(view.payload)
                .push_bind(view.refused)
                .push_bind(order_id)
                .push_bind(key)
                .push_bind(payment_id);
        });
        q.build().execute(&mut *tx).await?;
    }
    Ok(bytes)
}

/// Units an order in `status` counts as (reserved, sold).
fn counts_as(status: Option<OrderStatus>, quantity: i64) -> (i64, i64) {
    match status {
        Some(s) if s.holds_stock() => (quantity, 0),
        Some(OrderStatus::Paid) => (0, quantity),
        _ => (0, 0),
    }
}

/// An order's last state within one run of records.
enum Folded<'a> {
    /// The whole order (an order record), with what it owes now and the lsn of its last change.
    Whole {
        order: &'a Order,
        key: Option<&'a IdempotencyKey>,
        due: Option<PaymentDue>,
        lsn: i64,
    },
    /// Only what it owes (a settled payment of an order this run does not otherwise change).
    Settled(&'a SettledPayment, i64),
}

/// Writes the projections of `views`, in one transaction with the caller's other statements.
pub(crate) async fn project(
    tx: &mut MySqlConnection,
    views: &[View<'_>],
) -> Result<(), sqlx::Error> {
    let mut products: BTreeMap<&Sku, (&Product, i64)> = BTreeMap::new();
    // By order id: a deterministic lock order, so two appliers (or an applier and a purge) wait
    // instead of deadlocking.
    let mut orders: BTreeMap<&str, Folded<'_>> = BTreeMap::new();
    let mut new_items: Vec<(&OrderId, i16, &crate::engine::order::OrderItem)> = Vec::new();
    let mut answers: BTreeMap<&str, (&OrderId, &StoredAnswer)> = BTreeMap::new();
    let mut deltas: BTreeMap<&Sku, (i64, i64)> = BTreeMap::new();
    let mut events: Vec<&Event> = Vec::new();
    for view in views.iter().filter(|v| v.refused.is_none()) {
        let lsn = view.lsn as i64;
        events.extend(view.events.iter());
        match view.record {
            Record::Product { product } => {
                products.insert(&product.sku, (product, lsn));
            }
            Record::Payments { settled, .. } => {
                for entry in settled {
                    match orders.get_mut(entry.order_id.as_str()) {
                        Some(Folded::Whole { due, lsn: at, .. }) => {
                            *due = entry.payment_due;
                            *at = lsn;
                        }
                        _ => {
                            orders.insert(entry.order_id.as_str(), Folded::Settled(entry, lsn));
                        }
                    }
                }
            }
            Record::Order {
                order,
                previous,
                answer,
                ..
            } => {
                let mut key = answer.as_ref().map(|(k, _)| k);
                if let Some(Folded::Whole { key: earlier, .. }) =
                    orders.get(order.order_id.as_str())
                {
                    key = key.or(*earlier);
                }
                orders.insert(
                    order.order_id.as_str(),
                    Folded::Whole {
                        order,
                        key,
                        due: order.payment_due,
                        lsn,
                    },
                );
                if previous.is_none() {
                    for (line, item) in order.items.iter().enumerate() {
                        new_items.push((&order.order_id, line as i16, item));
                    }
                }
                for item in &order.items {
                    let before = counts_as(*previous, item.quantity);
                    let after = counts_as(Some(order.status), item.quantity);
                    let delta = deltas.entry(&item.sku).or_default();
                    delta.0 += after.0 - before.0;
                    delta.1 += after.1 - before.1;
                }
                if let Some((key, stored)) = answer {
                    answers.insert(key.as_str(), (&order.order_id, stored));
                }
            }
        }
    }
    deltas.retain(|_, d| *d != (0, 0));

    let products: Vec<_> = products.into_values().collect();
    for chunk in products.stable_chunks() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO products (sku, name, price_cents, currency, stock, updated_lsn) ",
        );
        q.push_values(chunk, |mut row, (product, lsn)| {
            row.push_bind(product.sku.as_str())
                .push_bind(product.name.as_str())
                .push_bind(product.price_cents.get())
                .push_bind(product.currency.as_str())
                .push_bind(product.stock.get())
                .push_bind(*lsn);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE name = VALUES(name), price_cents = VALUES(price_cents), \
             currency = VALUES(currency), stock = VALUES(stock), updated_lsn = VALUES(updated_lsn)",
        );
        q.build().execute(&mut *tx).await?;
        let mut q = QueryBuilder::<MySql>::new("INSERT IGNORE INTO inventory (sku) ");
        q.push_values(chunk, |mut row, (product, _)| {
            row.push_bind(product.sku.as_str());
        });
        q.build().execute(&mut *tx).await?;
    }

    let mut whole = Vec::new();
    let mut settled = Vec::new();
    for folded in orders.values() {
        match folded {
            Folded::Whole {
                order,
                key,
                due,
                lsn,
            } => whole.push((*order, *key, *due, *lsn)),
            Folded::Settled(entry, lsn) => settled.push((*entry, *lsn)),
        }
    }
    for chunk in whole.stable_chunks() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO orders (order_id, status, customer_id, total_cents, currency, created_at_ms, \
             hold_deadline_ms, payment_id, payment_due, idempotency_key, updated_lsn) ",
        );
        q.push_values(chunk, |mut row, (order, key, due, lsn)| {
            row.push_bind(order.order_id.as_str())
                .push_bind(order.status.as_str())
                .push_bind(order.customer_id.as_str())
                .push_bind(order.total_cents)
                .push_bind(order.currency.as_str())
                .push_bind(order.created_at_ms)
                .push_bind(order.hold_deadline_ms)
                .push_bind(order.payment_id.as_deref())
                .push_bind(due.map(PaymentDue::as_str))
                .push_bind(key.map(|k| k.as_str()))
                .push_bind(*lsn);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE status = VALUES(status), payment_id = VALUES(payment_id), \
             payment_due = VALUES(payment_due), hold_deadline_ms = VALUES(hold_deadline_ms), \
             updated_lsn = VALUES(updated_lsn)",
        );
        q.build().execute(&mut *tx).await?;
    }
    // Settled payments of orders this run does not otherwise change: what each owes now.
    for chunk in settled.stable_chunks() {
        let mut q = QueryBuilder::<MySql>::new("UPDATE orders SET payment_due = CASE order_id");
        for (entry, _) in chunk {
            q.push(" WHEN ")
                .push_bind(entry.order_id.as_str())
                .push(" THEN ")
                .push_bind(entry.payment_due.map(PaymentDue::as_str));
        }
        q.push(" END, updated_lsn = CASE order_id");
        for (entry, lsn) in chunk {
            q.push(" WHEN ")
                .push_bind(entry.order_id.as_str())
                .push(" THEN ")
                .push_bind(*lsn);
        }
        q.push(" END WHERE order_id IN (");
        let mut ids = q.separated(", ");
        for (entry, _) in chunk {
            ids.push_bind(entry.order_id.as_str());
        }
        q.push(")");
        q.build().execute(&mut *tx).await?;
    }
    for chunk in new_items.stable_chunks() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO order_items (order_id, line, sku, quantity, unit_price_cents) ",
        );
        q.push_values(chunk, |mut row, (order_id, line, item)| {
            row.push_bind(order_id.as_str())
                .push_bind(*line)
                .push_bind(item.sku.as_str())
                .push_bind(item.quantity)
                .push_bind(item.unit_price_cents.get());
        });
        q.build().execute(&mut *tx).await?;
    }
    // A key reused past its retention replaces its old answer.
    let answers: Vec<_> = answers.into_iter().collect();
    for chunk in answers.stable_chunks() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO idempotency_keys (idempotency_key, order_id, fingerprint, status, body, at_ms) ",
        );
        q.push_values(chunk, |mut row, (key, (order_id, answer))| {
            row.push_bind(*key)
                .push_bind(order_id.as_str())
                .push_bind(answer.fingerprint.as_str())
                .push_bind(answer.status as i16)
                .push_bind(answer.body.as_str())
                .push_bind(answer.at_ms);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE order_id = VALUES(order_id), fingerprint = VALUES(fingerprint), \
             status = VALUES(status), body = VALUES(body), at_ms = VALUES(at_ms)",
        );
        q.build().execute(&mut *tx).await?;
    }
    for chunk in events.stable_chunks() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO outbox (seq, type, order_id, at_ms, total_cents, currency) ",
        );
        q.push_values(chunk, |mut row, event| {
            row.push_bind(event.seq as i64)
                .push_bind(event.status.event_type())
                .push_bind(event.order_id.as_str())
                .push_bind(event.at_ms)
                .push_bind(event.total_cents)
                .push_bind(event.currency.as_str());
        });
        q.build().execute(&mut *tx).await?;
    }
    let deltas: Vec<_> = deltas.into_iter().collect();
    for chunk in deltas.stable_chunks() {
        let mut q = QueryBuilder::<MySql>::new("INSERT INTO inventory (sku, reserved, sold) ");
        q.push_values(chunk, |mut row, (sku, (reserved, sold))| {
            row.push_bind(sku.as_str())
                .push_bind(*reserved)
                .push_bind(*sold);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE reserved = reserved + VALUES(reserved), sold = sold + VALUES(sold)",
        );
        q.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// Where the applier reads records it was not handed (after a restart, or when it fell behind):
/// the MySQL `journal` table, or the embedded journal's segments.
pub(crate) trait Backlog: Send + Sync {
    /// Up to `limit` durable records with `lsn > after_lsn`, in order.
    fn read(
        &self,
        after_lsn: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Committed>, JournalError>>;
}

/// The MySQL `journal` table as a backlog.
pub(crate) struct MySqlBacklog(pub MySqlPool);

impl Backlog for MySqlBacklog {
    fn read(
        &self,
        after_lsn: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Committed>, JournalError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT lsn, first_event_seq, record FROM journal \
                 WHERE lsn > ? AND refused IS NULL ORDER BY lsn LIMIT ?",
            )
            .bind(after_lsn as i64)
            .bind(limit as i64)
            .fetch_all(&self.0)
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

/// How far the projections are behind their source, shared by the applier (which moves it), the
/// source's writer (which hands batches), `/readyz`, `/metrics` and write-behind's backpressure.
#[derive(Debug)]
pub struct Lag {
    /// The last lsn the source has made durable.
    committed_lsn: AtomicU64,
    /// The last lsn applied (the durable cursor as last read or written).
    applied_lsn: Arc<AtomicU64>,
    /// The last event seq applied: events up to it are readable from `outbox`.
    applied_seq: AtomicU64,
    /// When each handed batch became durable (its last lsn), oldest first; applied ones leave.
    handed: Mutex<VecDeque<(u64, Instant)>>,
    /// When the oldest batch not yet applied was handed, in nanoseconds after `epoch` plus one
    /// (0: none): read on every write-behind append without a lock.
    oldest: AtomicU64,
    epoch: Instant,
    /// The error the applier is retrying, if any.
    problem: Mutex<Option<String>>,
    /// Set while the applier is stopped at a record the database refuses (its lsn).
    stopped_at: AtomicU64,
    /// Woken at each applied run.
    applied: Notify,
    batches: AtomicU64,
    records: AtomicU64,
    retries: [AtomicU64; 3],
    /// The lag of each run when it was applied (age of its oldest record), in seconds.
    lag_at_apply: Histogram,
}

impl Lag {
    /// `applied_lsn` is shared with whoever must keep what is not applied yet (write-behind's
    /// embedded journal keeps every segment holding a record after it).
    pub(crate) fn new(committed_lsn: u64, applied_lsn: Arc<AtomicU64>) -> Self {
        Self {
            committed_lsn: AtomicU64::new(committed_lsn),
            applied_lsn,
            applied_seq: AtomicU64::new(0),
            handed: Mutex::new(VecDeque::new()),
            oldest: AtomicU64::new(0),
            epoch: Instant::now(),
            problem: Mutex::new(None),
            stopped_at: AtomicU64::new(0),
            applied: Notify::new(),
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
            retries: Default::default(),
            lag_at_apply: Histogram::new(LATENCY_BOUNDS_SECONDS),
        }
    }

    /// The last event seq the projections hold.
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq.load(Ordering::Acquire)
    }

    /// The last lsn the projections hold.
    pub fn applied_lsn(&self) -> u64 {
        self.applied_lsn.load(Ordering::Acquire)
    }

    /// Records durable at the source and not yet applied.
    pub fn records(&self) -> u64 {
        self.committed_lsn
            .load(Ordering::Acquire)
            .saturating_sub(self.applied_lsn())
    }

    /// Age of the oldest durable record not yet applied (0 when none).
    pub fn seconds(&self) -> f64 {
        match self.oldest.load(Ordering::Acquire) {
            0 => 0.0,
            since => {
                let now = self.epoch.elapsed().as_nanos() as u64 + 1;
                now.saturating_sub(since) as f64 / 1e9
            }
        }
    }

    /// Nanoseconds after `epoch`, plus one, of `at`.
    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// A batch ending at `last_lsn` became durable at the source now.
    pub(crate) fn hand(&self, last_lsn: u64) {
        let now = Instant::now();
        let mut handed = lock(&self.handed);
        if handed.is_empty() {
            self.oldest.store(self.stamp(now), Ordering::Release);
        }
        handed.push_back((last_lsn, now));
        self.committed_lsn.fetch_max(last_lsn, Ordering::AcqRel);
    }

    fn set_applied(&self, lsn: u64, seq: u64) {
        self.applied_lsn.fetch_max(lsn, Ordering::AcqRel);
        self.applied_seq.fetch_max(seq, Ordering::AcqRel);
        let mut handed = lock(&self.handed);
        while handed.front().is_some_and(|(last, _)| *last <= lsn) {
            handed.pop_front();
        }
        let oldest = handed.front().map_or(0, |(_, at)| self.stamp(*at));
        self.oldest.store(oldest, Ordering::Release);
        drop(handed);
        self.applied.notify_waiters();
    }

    fn set_problem(&self, problem: Option<String>) {
        *lock(&self.problem) = problem;
    }

    /// `Ok` while the applier runs and is no more than `max` behind; why not otherwise.
    pub fn check(&self, max: Duration) -> Result<(), String> {
        let stopped = self.stopped_at.load(Ordering::Acquire);
        let problem = lock(&self.problem).clone();
        if stopped > 0 {
            return Err(format!(
                "the MySQL applier is stopped at lsn {stopped}: {} (resolve it, or run `turnstile mysql-apply --skip {stopped}`)",
                problem.unwrap_or_default()
            ));
        }
        let seconds = self.seconds();
        if seconds > max.as_secs_f64() {
            return Err(format!(
                "MySQL is {seconds:.1}s ({} records) behind, past --mysql-lag-max {}{}",
                self.records(),
                humantime::format_duration(max),
                problem.map(|p| format!(": {p}")).unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Waits until the lag is at most `max` (write-behind's backpressure).
    pub(crate) async fn wait_within(&self, max: Duration) {
        loop {
            let applied = self.applied.notified();
            if self.seconds() <= max.as_secs_f64() {
                return;
            }
            // The lag also shrinks by time alone never, so an applied run is what to wait for;
            // the timeout only bounds a missed wake-up.
            let _ = tokio::time::timeout(Duration::from_millis(100), applied).await;
        }
    }

    /// The last lsn durable at the source.
    pub fn committed_lsn(&self) -> u64 {
        self.committed_lsn.load(Ordering::Acquire)
    }

    /// Waits until the projections hold record `lsn`, up to `timeout`; true if so.
    pub async fn wait_applied(&self, lsn: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let applied = self.applied.notified();
            if self.applied_lsn() >= lsn {
                return true;
            }
            if tokio::time::timeout_at(deadline, applied).await.is_err() {
                return self.applied_lsn() >= lsn;
            }
        }
    }

    /// Waits until everything durable at the source is applied, up to `timeout`; true if so.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let applied = self.applied.notified();
            if self.records() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, applied).await.is_err() {
                return self.records() == 0;
            }
        }
    }

    /// Writes the applier's metrics.
    pub fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        encode_gauge(
            encoder,
            "turnstile_mysql_applied_lsn",
            "The last journal record the MySQL projections hold.",
            self.applied_lsn(),
        )?;
        encode_gauge(
            encoder,
            "turnstile_mysql_lag_records",
            "Durable records MySQL's projections do not hold yet.",
            self.records(),
        )?;
        encoder
            .encode_descriptor(
                "turnstile_mysql_lag_seconds",
                "Age of the oldest durable record MySQL's projections do not hold yet.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?
            .encode_gauge(&self.seconds())?;
        encode_gauge(
            encoder,
            "turnstile_mysql_apply_stopped",
            "1 while the applier is stopped at a record the database refuses.",
            u64::from(self.stopped_at.load(Ordering::Acquire) > 0),
        )?;
        encode_counter(
            encoder,
            "turnstile_mysql_apply_batches",
            "Runs of records applied to MySQL, one transaction each.",
            self.batches.load(Ordering::Relaxed),
        )?;
        encode_counter(
            encoder,
            "turnstile_mysql_apply_records",
            "Records applied to MySQL.",
            self.records.load(Ordering::Relaxed),
        )?;
        crate::journal::encode_retries(
            encoder,
            "turnstile_mysql_apply_retries",
            "Applier transactions retried after a passing database fault, by reason.",
            &self.retries,
        )?;
        self.lag_at_apply.encode(
            encoder,
            "turnstile_mysql_lag_at_apply_seconds",
            "How old the oldest record of each applied run was when it was applied.",
        )
    }
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

/// Keeps the projections (and, in write-behind, the log) following a journal.
pub(crate) struct Applier {
    pub pool: MySqlPool,
    pub lag: Arc<Lag>,
    pub backlog: Arc<dyn Backlog>,
    /// Write the log rows too (write-behind); otherwise only the projections.
    pub ship: bool,
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
                "SELECT applied_lsn, applied_seq FROM projection_cursor WHERE name = 'tables'",
            );
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
        let mut next = from.unwrap_or(lsn) + 1;
        loop {
            let batch = self.backlog.read(next - 1, APPLY_RECORDS_MAX).await?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            let last = last.lsn;
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
            next = last + 1;
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
                    // or never handed): from the backlog. Only what the source had made durable
                    // before the read: past it a file segment may hold a batch being synced, or
                    // the bytes of a failed batch that a new segment supersedes (same lsns, other
                    // records) once the source recovers; a bound taken after the read would
                    // take those stale bytes as the new, durable records.
                    let durable = self.lag.committed_lsn.load(Ordering::Acquire);
                    let mut read = match self.backlog.read(next - 1, APPLY_RECORDS_MAX).await {
                        Ok(read) => read,
                        Err(error) => {
                            self.lag.set_problem(Some(error.to_string()));
                            if self.closing.load(Ordering::Acquire) {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    };
                    read.retain(|c| c.lsn <= durable);
                    if let Some(front) = front {
                        read.retain(|c| c.lsn < front);
                        if read.is_empty() {
                            // A gap the source never made durable (records it refused).
                            next = front;
                            continue;
                        }
                    } else if read.is_empty() {
                        // Nothing readable yet beyond the cursor: wait to be handed more.
                        if !self.wait_for_more(&mut handed, &mut pending).await {
                            return;
                        }
                        continue;
                    }
                    read
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
            let skipped = sqlx::query("SELECT 1 FROM journal_skips WHERE lsn = ?")
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
        let ship = self.ship;
        let moved = in_transaction!(&self.pool, self.timeout, |tx| {
            let row = sqlx::query(
                "SELECT applied_lsn, applied_seq FROM projection_cursor WHERE name = 'tables' FOR UPDATE",
            )
            .fetch_one(&mut *tx)
            .await?;
            let applied: i64 = row.try_get(0)?;
            let applied_seq: i64 = row.try_get(1)?;
            let views: Vec<View<'_>> = run
                .iter()
                .filter(|c| c.lsn as i64 > applied)
                .map(|c| View::of(c, skipped.contains(&c.lsn).then_some(SKIPPED)))
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
                    if ship {
                        write_log(&mut tx, &views).await?;
                    }
                    project(&mut tx, &views).await?;
                    sqlx::query(
                        "UPDATE projection_cursor SET applied_lsn = ?, applied_seq = ? WHERE name = 'tables'",
                    )
                    .bind(last as i64)
                    .bind(last_seq as i64)
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
    /// An applier for a source whose last durable lsn is `committed_lsn`, not yet running.
    pub fn new(
        pool: MySqlPool,
        backlog: Arc<dyn Backlog>,
        ship: bool,
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
    /// then stops the applier. Call after the source's writer has stopped.
    pub async fn stop(&self, grace: Duration) {
        if !self.lag.wait_drained(grace).await {
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
    }
}
