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
//! **Nodes.** A database holds the logs of several nodes: every row of a log (`journal`,
//! `outbox`, `journal_skips`, `projection_cursor`, `outbox_cursor`, `journal_writer`) carries the
//! node's name (`node`), and each node's lsns and event seqs run from 1 without a gap in its own
//! log. The projections are shared: `products`, `order_items` and `idempotency_keys` as they are,
//! `orders` with the node that owns the order, `inventory` by node and SKU (each node's own
//! units held, sold and leased). The claims stay `UNIQUE` across every node's log: one key, one
//! order, whichever node places it.
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
//!
//! Here: the log rows and the projections' SQL ([`write_log`], [`project`]). Beside it:
//! [`applier`], the reader that feeds them (one [`crate::journal::downstream`] reader, its cursor
//! moved in its own transactions), and [`lag`], how far they are behind their source.

pub mod applier;
pub mod lag;

pub(crate) use applier::{committed_from_row, Follower, MySqlBacklog};
pub use applier::{APPLY_LINGER, APPLY_RECORDS_MAX};
pub use lag::Lag;

use super::writer_lock::{check_fence, Fence};
use super::StableChunks;
use crate::domain::{IdempotencyKey, OrderId, Sku};
use crate::engine::order::{Order, OrderStatus, PaymentDue};
use crate::engine::records::{Event, Product, Record, SettledPayment, StoredAnswer};
use crate::journal::pipeline::Committed;
use sqlx::mysql::MySqlConnection;
use sqlx::{MySql, QueryBuilder};
use std::collections::BTreeMap;

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

/// Writes the log rows of `views` in the log of `fence`'s node: one `journal` row each, carrying
/// the claims of the order it places (see [`claims`]), after releasing the claims of keys reused
/// past their retention (whichever node's they were: keys are global). Returns the payload bytes.
/// Nothing is written unless the transaction's node still holds its log's turn (`fence`:
/// [`super::writer_lock::check_fence`], first in the transaction).
pub(crate) async fn write_log(
    tx: &mut MySqlConnection,
    views: &[View<'_>],
    fence: &Fence,
) -> Result<u64, sqlx::Error> {
    check_fence(tx, fence).await?;
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
            "INSERT INTO journal (node, lsn, first_event_seq, record, refused, order_id, idempotency_key, payment_id) ",
        );
        q.push_values(chunk, |mut row, view| {
            let (order_id, key, payment_id) = claims(view);
            row.push_bind(fence.node())
                .push_bind(view.lsn as i64)
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

/// Writes the projections of `views`, records of `node`'s log, in one transaction with the
/// caller's other statements: the orders it places are `node`'s, its events go to `node`'s outbox,
/// its units to `node`'s stock counters.
pub(crate) async fn project(
    tx: &mut MySqlConnection,
    node: &str,
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
            // The adoption's transaction moved the orders and their units already.
            Record::Adopted { .. } | Record::AdoptedAway { .. } => {}
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
            "INSERT INTO products (sku, name, price_cents, currency, stock, max_per_customer, \
             admission_rate, updated_lsn) ",
        );
        q.push_values(chunk, |mut row, (product, lsn)| {
            row.push_bind(product.sku.as_str())
                .push_bind(product.name.as_str())
                .push_bind(product.price_cents.get())
                .push_bind(product.currency.as_str())
                .push_bind(product.stock.get())
                .push_bind(product.max_per_customer)
                .push_bind(product.admission_rate)
                .push_bind(*lsn);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE name = VALUES(name), price_cents = VALUES(price_cents), \
             currency = VALUES(currency), stock = VALUES(stock), \
             max_per_customer = VALUES(max_per_customer), admission_rate = VALUES(admission_rate), \
             updated_lsn = VALUES(updated_lsn)",
        );
        q.build().execute(&mut *tx).await?;
        let mut q = QueryBuilder::<MySql>::new("INSERT IGNORE INTO inventory (node, sku) ");
        q.push_values(chunk, |mut row, (product, _)| {
            row.push_bind(node).push_bind(product.sku.as_str());
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
            "INSERT INTO orders (node, order_id, status, customer_id, total_cents, currency, \
             created_at_ms, hold_deadline_ms, payment_id, payment_due, idempotency_key, updated_lsn) ",
        );
        // The owner is the node that placed the order; a later change keeps it.
        q.push_values(chunk, |mut row, (order, key, due, lsn)| {
            row.push_bind(node)
                .push_bind(order.order_id.as_str())
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
        q.push(" END WHERE node = ")
            .push_bind(node)
            .push(" AND order_id IN (");
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
            "INSERT INTO outbox (node, seq, type, order_id, at_ms, total_cents, currency) ",
        );
        q.push_values(chunk, |mut row, event| {
            row.push_bind(node)
                .push_bind(event.seq as i64)
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
        let mut q =
            QueryBuilder::<MySql>::new("INSERT INTO inventory (node, sku, reserved, sold) ");
        q.push_values(chunk, |mut row, (sku, (reserved, sold))| {
            row.push_bind(node)
                .push_bind(sku.as_str())
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
