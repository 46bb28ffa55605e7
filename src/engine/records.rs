//! What the journal stores, and the durable state that is the fold of those records.
//!
//! A record carries the whole new copy of what it changed (a product, or an order with the answer
//! given under its idempotency key), so replay keeps the last copy of each and never re-runs logic.
//! Stock counters are not journaled: they are derived from the products' stock and the orders'
//! statuses when the engine is rebuilt, so replay cannot drift from what the orders say.

use super::order::{Order, OrderItem, OrderStatus, PaymentDue};
use crate::domain::{Cents, Currency, CustomerId, IdempotencyKey, OrderId, Sku, Stock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A product as the shop defined it last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// The product's id.
    pub sku: Sku,
    /// Shown to buyers.
    pub name: String,
    /// Price of one unit now; orders keep the price of their own moment.
    pub price_cents: Cents,
    /// The currency of the price.
    pub currency: Currency,
    /// Units the shop owns: available, held and sold together.
    pub stock: Stock,
    /// The most units of it one customer may hold or have bought (`None`: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_customer: Option<u32>,
    /// Buyers per second let through the product's waiting room to checkout (`None`: no queue;
    /// `app::waiting_room`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission_rate: Option<u32>,
}

impl Product {
    /// Its limits, as the stock counters keep them for the checkout path.
    pub fn limits(&self) -> crate::engine::inventory::Limits {
        crate::engine::inventory::Limits {
            max_per_customer: self.max_per_customer,
            admission_rate: self.admission_rate,
        }
    }
}

/// The answer given to a request under an idempotency key, kept so a replay returns it unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAnswer {
    /// A digest of the parsed request: the same key with another request is refused.
    pub fingerprint: String,
    /// The HTTP status of the first answer.
    pub status: u16,
    /// The body of the first answer, byte for byte.
    pub body: String,
    /// When the answer was given (Unix milliseconds): retention counts from here.
    pub at_ms: i64,
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A product was created or changed.
    Product {
        /// The product's new definition.
        product: Product,
    },
    /// An order was placed or changed.
    Order {
        /// The whole order after the change.
        order: Order,
        /// The status the order had before this change (`None`: a new order). Lets a store that
        /// keeps materialised stock counters apply the change as a delta.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous: Option<OrderStatus>,
        /// The statuses the order entered with this change, in order: one event each.
        entered: Vec<OrderStatus>,
        /// When the change happened (Unix milliseconds).
        at_ms: i64,
        /// The answer that placed the order, kept under its idempotency key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answer: Option<(IdempotencyKey, StoredAnswer)>,
        /// The key had an answer before, past its retention: this one replaces it (a store that
        /// keeps answers under a unique key drops the old one first).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        replaces_expired_key: bool,
    },
    /// Gateway calls done (captures, voids, refunds) for many orders at once: what each now owes.
    /// Status, items and everything else of the orders stay as they are.
    Payments {
        /// One entry per order.
        settled: Vec<SettledPayment>,
        /// When the calls were journaled (Unix milliseconds).
        at_ms: i64,
    },
    /// Several nodes, write-behind: orders of a node that left (or whose disk was forgotten),
    /// adopted by this node in MySQL (`orders.node`, their units moved into this node's lease,
    /// [`crate::cluster::adoption`]), whole as they stood then. Journaled in the adopter's own log,
    /// so its disk knows them at its next start; MySQL's projections already hold the move (the
    /// applier writes the record to the log and changes nothing else). An order the state already
    /// holds keeps its copy (a second adoption record of it is never newer).
    Adopted {
        /// The node they came from.
        from: String,
        /// The orders, whole.
        orders: Vec<Order>,
        /// When they were adopted (Unix milliseconds).
        at_ms: i64,
    },
    /// Several nodes, write-behind: orders of this node that another node adopted while this one
    /// was away (it left), learnt from MySQL at start ([`crate::cluster::adoption`]): they leave
    /// the state, their units having left this node's lease with them. Changes nothing in MySQL.
    AdoptedAway {
        /// The orders.
        orders: Vec<OrderId>,
        /// When this node learnt it (Unix milliseconds).
        at_ms: i64,
    },
}

/// What one order owes the gateway after a settled call (one entry of [`Record::Payments`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettledPayment {
    /// The order.
    pub order_id: OrderId,
    /// Its status (unchanged by the record; kept so a store can derive its payment's state).
    pub status: OrderStatus,
    /// Its payment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// What it owes now (`None`: nothing, the call is done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_due: Option<PaymentDue>,
}

impl Record {
    /// How many events this record carries (one per status entered).
    pub fn event_count(&self) -> u32 {
        match self {
            Record::Product { .. }
            | Record::Payments { .. }
            | Record::Adopted { .. }
            | Record::AdoptedAway { .. } => 0,
            Record::Order { entered, .. } => entered.len() as u32,
        }
    }

    /// When the record's change happened, if it carries a time (orders do; products do not).
    pub fn at_ms(&self) -> Option<i64> {
        match self {
            Record::Product { .. } => None,
            Record::Order { at_ms, .. }
            | Record::Payments { at_ms, .. }
            | Record::Adopted { at_ms, .. }
            | Record::AdoptedAway { at_ms, .. } => Some(*at_ms),
        }
    }

    /// The events this record carries, numbered from `first_seq`.
    pub fn events(&self, first_seq: u64) -> Vec<Event> {
        match self {
            Record::Product { .. }
            | Record::Payments { .. }
            | Record::Adopted { .. }
            | Record::AdoptedAway { .. } => Vec::new(),
            Record::Order {
                order,
                entered,
                at_ms,
                ..
            } => entered
                .iter()
                .enumerate()
                .map(|(i, &status)| Event {
                    seq: first_seq + i as u64,
                    status,
                    order_id: order.order_id.clone(),
                    at_ms: *at_ms,
                    total_cents: order.total_cents,
                    currency: order.currency,
                    customer_id: order.customer_id.clone(),
                    items: order.items.clone(),
                })
                .collect(),
        }
    }
}

/// What is read of an event in a snapshot of an older version: its seq (other fields ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
struct LegacyEvent {
    seq: u64,
}

/// One order event: an order entered a status. `seq` is assigned in commit order by the journal's
/// single writer, so readers never see a gap fill in later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the event log, from 1, without gaps.
    pub seq: u64,
    /// The status entered (the event type is `order.<status>`).
    pub status: OrderStatus,
    /// The order that changed.
    pub order_id: OrderId,
    /// When (Unix milliseconds).
    pub at_ms: i64,
    /// The order's total, for consumers that do not want to fetch the order.
    pub total_cents: i64,
    /// The order's currency.
    pub currency: Currency,
    /// The buyer, for consumers that do not want to fetch the order (a confirmation e-mail).
    pub customer_id: CustomerId,
    /// The order's lines.
    pub items: Vec<OrderItem>,
}

/// A journal segment kept on disk after a snapshot covered it, for its events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// The lsn of its first record (its name).
    pub first_lsn: u64,
    /// The seq of its first event (or, with no event, of the next one).
    pub first_event_seq: u64,
    /// The time of its last record (Unix milliseconds): it may go once this is past retention.
    pub last_at_ms: i64,
}

/// The durable state: what the journal's records add up to. Built at start-up from the last
/// snapshot plus the records after it; snapshots are this struct written out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Every product, by SKU.
    pub products: BTreeMap<Sku, Product>,
    /// Every retained order, by id.
    #[serde(with = "as_pairs")]
    pub orders: HashMap<OrderId, Order>,
    /// Answers that placed an order, by idempotency key.
    #[serde(with = "as_pairs")]
    pub answers: HashMap<IdempotencyKey, StoredAnswer>,
    /// The events of the records folded in since the snapshot, in commit order. Not written to
    /// snapshots: events live in the journal's segments (and the most recent in memory).
    #[serde(skip)]
    pub events: Vec<Event>,
    /// Events of a snapshot written before events left snapshots: read only to learn the next
    /// seq.
    #[serde(default, rename = "events", skip_serializing)]
    legacy_events: Vec<LegacyEvent>,
    /// The seq the next event gets (0 in a snapshot of an older version: derived then).
    #[serde(default)]
    pub next_event_seq: u64,
    /// Segments this snapshot covers that stay on disk for their events (`--event-retention`),
    /// oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retained_segments: Vec<SegmentInfo>,
    /// Units sold by paid orders that already left the state (retention), by SKU: the stock
    /// counters stay exact without keeping every order forever.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sold_pruned: BTreeMap<Sku, i64>,
    /// The sequence number of the last record folded in (0: none).
    pub last_lsn: u64,
}

impl State {
    /// Folds one record in. `lsn` must grow by one per call; `first_event_seq` is the seq the journal
    /// gave the record's first event.
    pub fn apply(&mut self, lsn: u64, first_event_seq: u64, record: Record) {
        let count = u64::from(record.event_count());
        if count > 0 {
            self.events.extend(record.events(first_event_seq));
            self.next_event_seq = first_event_seq + count;
        }
        match record {
            Record::Product { product } => {
                self.products.insert(product.sku.clone(), product);
            }
            Record::Order {
                order,
                answer,
                previous,
                ..
            } => {
                if let Some((key, answer)) = answer {
                    self.answers.insert(key, answer);
                }
                // A change of an order that already left the state: its sold units were counted
                // in `sold_pruned` and move from there.
                if previous == Some(OrderStatus::Paid)
                    && order.status != OrderStatus::Paid
                    && !self.orders.contains_key(&order.order_id)
                {
                    for item in &order.items {
                        if let Some(sold) = self.sold_pruned.get_mut(&item.sku) {
                            *sold -= item.quantity;
                        }
                    }
                }
                self.orders.insert(order.order_id.clone(), order);
            }
            Record::Payments { settled, .. } => {
                for entry in settled {
                    if let Some(order) = self.orders.get_mut(&entry.order_id) {
                        order.payment_due = entry.payment_due;
                    }
                }
            }
            // What the log already holds of an order is as new as an adoption's copy or newer (the
            // node that adopts it dropped it first, `AdoptedAway`, if it was ever its own).
            Record::Adopted { orders, .. } => {
                for order in orders {
                    self.orders.entry(order.order_id.clone()).or_insert(order);
                }
            }
            Record::AdoptedAway { orders, .. } => {
                for order_id in &orders {
                    self.orders.remove(order_id);
                }
            }
        }
        self.last_lsn = lsn;
    }

    /// Drops what is past retention at `now_ms`: finished orders created more than
    /// `order_retention_ms` ago (the units of paid ones stay counted in `sold_pruned`) and answers
    /// older than `answer_retention_ms`.
    pub fn prune(&mut self, now_ms: i64, order_retention_ms: i64, answer_retention_ms: i64) {
        let order_cutoff = now_ms - order_retention_ms;
        let sold_pruned = &mut self.sold_pruned;
        self.orders.retain(|_, order| {
            // An order that still owes the gateway a call stays until the call is journaled.
            if order.status.holds_stock()
                || order.created_at_ms >= order_cutoff
                || order.payment_due.is_some()
            {
                return true;
            }
            if order.status == OrderStatus::Paid {
                for item in &order.items {
                    *sold_pruned.entry(item.sku.clone()).or_default() += item.quantity;
                }
            }
            false
        });
        let answer_cutoff = now_ms - answer_retention_ms;
        self.answers
            .retain(|_, answer| answer.at_ms >= answer_cutoff);
    }

    /// The seq the next event will get.
    pub fn next_event_seq(&self) -> u64 {
        let legacy = self.legacy_events.last().map_or(1, |e| e.seq + 1);
        self.next_event_seq.max(legacy).max(1)
    }
}

/// Maps with non-string keys are written as lists of pairs, so JSON can carry them.
mod as_pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::HashMap;
    use std::hash::Hash;

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &HashMap<K, V>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(deserializer: D) -> Result<HashMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        let pairs: Vec<(K, V)> = Vec::deserialize(deserializer)?;
        Ok(pairs.into_iter().collect())
    }
}
