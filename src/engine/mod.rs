//! The pure core: stock, holds, orders and idempotency. Synchronous, no I/O, time passed in.
//!
//! Every durable change is handed to a [`RecordSink`] (the journal) *inside* the critical section
//! that makes it, so the journal sees the changes of one product or one order in the order memory
//! saw them. The sink only enqueues; the caller awaits the ticket it returns before answering.

pub mod idempotency;
pub mod inventory;
pub mod order;
pub mod records;

use crate::domain::{Currency, CustomerId, IdempotencyKey, OrderId, Quantity, Sku};
use crate::sync::lock;
use idempotency::{IdempotencyStore, RejectionLimits};
use inventory::{Hold, Inventory, ReserveError, SetStockError, SkuIndex, StockView};
use order::{IllegalTransition, Order, OrderItem, OrderStatus};
use records::{Product, Record, State, StoredAnswer};
use rustc_hash::FxHashMap;
use std::collections::BTreeSet;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Where the engine sends its durable changes. `submit` must not block for long: it enqueues.
pub trait RecordSink {
    /// What the caller awaits before it tells anyone about the change.
    type Ticket;
    /// Enqueues one record.
    fn submit(&self, record: Record) -> Self::Ticket;
}

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Shards per SKU: the number of cores that serve requests.
    pub shard_count: usize,
    /// How long an unfinished order may hold stock.
    pub hold_ttl_ms: i64,
    /// Bounds of the map of answers that placed nothing.
    pub rejections: RejectionLimits,
    /// Starts every order id this process makes; must differ between runs (the caller derives it
    /// from the start time), so ids stay unique across restarts.
    pub order_id_prefix: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            shard_count: std::thread::available_parallelism().map_or(1, |n| n.get()),
            hold_ttl_ms: 15 * 60 * 1000,
            rejections: RejectionLimits::default(),
            order_id_prefix: "ord_".into(),
        }
    }
}

/// Why the engine refused a request. Callers branch on every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No product with this SKU.
    #[error("unknown sku {0}")]
    UnknownSku(Sku),
    /// No order with this id.
    #[error("unknown order {0}")]
    UnknownOrder(OrderId),
    /// Not enough units of this SKU (the first short one).
    #[error("sku {sku} is out of stock")]
    OutOfStock {
        /// The first short SKU, in request order.
        sku: Sku,
    },
    /// The products of one checkout have different currencies.
    #[error("the products of one checkout must share one currency")]
    MixedCurrency,
    /// A product's stock cannot go below its held and sold units.
    #[error("stock {requested} is below the {committed} units reserved or sold")]
    StockBelowCommitted {
        /// The stock asked for.
        requested: i64,
        /// Units reserved plus sold.
        committed: i64,
    },
    /// An order was asked to make a move its state machine forbids.
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    /// The journal's records contradict each other (only at start-up).
    #[error("the journal is inconsistent: {0}")]
    Inconsistent(String),
}

/// Independently locked parts of the product and order maps: contention stays low, and none of
/// these locks is taken to reserve or reject.
const MAP_SHARDS: usize = 64;

fn shard_index<K: Hash>(key: &K) -> usize {
    crate::sync::shard_of(key, MAP_SHARDS)
}

struct ProductEntry {
    product: Product,
    index: SkuIndex,
}

struct OrderEntry {
    order: Order,
    /// The inventory lines of the order, to release, commit or refund its units.
    lines: Vec<(SkuIndex, i64)>,
}

/// Units held for a checkout that has not been placed as an order yet (the payment is being
/// authorised). Turn it into an order with [`Engine::place_order`] or give it back with
/// [`Engine::release_reservation`].
#[derive(Debug)]
#[must_use = "a reservation holds stock until placed or released"]
pub struct Reservation {
    hold: Hold,
    items: Vec<OrderItem>,
    total_cents: i64,
    currency: Currency,
}

impl Reservation {
    /// The order's lines, one per SKU, with the unit prices of this moment.
    pub fn items(&self) -> &[OrderItem] {
        &self.items
    }

    /// The amount to authorise.
    pub fn total_cents(&self) -> i64 {
        self.total_cents
    }

    /// The currency of every line.
    pub fn currency(&self) -> Currency {
        self.currency
    }
}

/// How the payment of a new order ended, as far as the checkout knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// Authorised and captured: the order is paid.
    Paid {
        /// The gateway's payment id.
        payment_id: String,
    },
    /// The gateway will decide later (webhook).
    Pending {
        /// The gateway's payment id.
        payment_id: String,
    },
    /// Declined, or the gateway did not answer in time: the order is released.
    Failed {
        /// The gateway's payment id, if it gave one.
        payment_id: Option<String>,
    },
}

/// An order about to be placed: its id (taken before the payment), its held units, its buyer and
/// how its payment ended.
#[derive(Debug)]
pub struct NewOrder {
    /// From [`Engine::new_order_id`].
    pub order_id: OrderId,
    /// The held units and prices.
    pub reservation: Reservation,
    /// The buyer.
    pub customer_id: CustomerId,
    /// How the payment ended.
    pub outcome: PaymentOutcome,
}

/// The answer to keep under the checkout's idempotency key, rendered from the new order.
pub struct AnswerSpec<'a> {
    /// The checkout's key.
    pub key: &'a IdempotencyKey,
    /// The digest of the parsed request.
    pub fingerprint: &'a str,
    /// Builds the status and body the client gets, from the order as placed.
    pub render: &'a dyn Fn(&Order) -> (u16, String),
}

/// The engine of one process.
pub struct Engine {
    config: EngineConfig,
    inventory: Inventory,
    products: Box<[Mutex<FxHashMap<Sku, ProductEntry>>]>,
    orders: Box<[Mutex<FxHashMap<OrderId, OrderEntry>>]>,
    /// Orders that hold stock, by deadline, so the sweeper never scans the others.
    holds_by_deadline: Mutex<BTreeSet<(i64, OrderId)>>,
    idempotency: IdempotencyStore,
    next_order_number: AtomicU64,
}

impl Engine {
    /// An empty engine.
    pub fn new(config: EngineConfig) -> Self {
        Self {
            inventory: Inventory::new(config.shard_count),
            products: (0..MAP_SHARDS).map(|_| Mutex::default()).collect(),
            orders: (0..MAP_SHARDS).map(|_| Mutex::default()).collect(),
            holds_by_deadline: Mutex::default(),
            idempotency: IdempotencyStore::new(config.rejections),
            next_order_number: AtomicU64::new(1),
            config,
        }
    }

    /// Rebuilds the engine from the durable state: products, orders and their stock, and the kept
    /// answers. Stock counters are derived from the orders' statuses.
    pub fn from_state(config: EngineConfig, state: &State) -> Result<Self, EngineError> {
        let engine = Self::new(config);
        let mut committed: FxHashMap<&Sku, (i64, i64)> = FxHashMap::default();
        for order in state.orders.values() {
            for item in &order.items {
                let entry = committed.entry(&item.sku).or_default();
                match order.status {
                    s if s.holds_stock() => entry.0 += item.quantity,
                    OrderStatus::Paid => entry.1 += item.quantity,
                    _ => {}
                }
            }
        }
        for (sku, product) in &state.products {
            let (reserved, sold) = committed.get(sku).copied().unwrap_or_default();
            let stock = product.stock.get();
            if reserved + sold > stock {
                return Err(EngineError::Inconsistent(format!(
                    "sku {sku} has stock {stock} but {reserved} reserved and {sold} sold"
                )));
            }
            let index = engine.inventory.add(sku, stock, reserved, sold);
            lock(&engine.products[shard_index(sku)]).insert(
                sku.clone(),
                ProductEntry {
                    product: product.clone(),
                    index,
                },
            );
        }
        for order in state.orders.values() {
            let mut lines = Vec::with_capacity(order.items.len());
            for item in &order.items {
                let index = engine.inventory.lookup(&item.sku).ok_or_else(|| {
                    EngineError::Inconsistent(format!(
                        "order {} names unknown sku {}",
                        order.order_id, item.sku
                    ))
                })?;
                lines.push((index, item.quantity));
            }
            if order.status.holds_stock() {
                lock(&engine.holds_by_deadline)
                    .insert((order.hold_deadline_ms, order.order_id.clone()));
            }
            lock(&engine.orders[shard_index(&order.order_id)]).insert(
                order.order_id.clone(),
                OrderEntry {
                    order: order.clone(),
                    lines,
                },
            );
        }
        for (key, answer) in &state.answers {
            engine.idempotency.restore(key.clone(), answer.clone());
        }
        Ok(engine)
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The stock counters.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// The idempotency keys.
    pub fn idempotency(&self) -> &IdempotencyStore {
        &self.idempotency
    }

    /// Creates or changes a product. A new product is journaled before it becomes visible, so no
    /// order can be journaled ahead of its product.
    pub fn upsert_product<S: RecordSink + ?Sized>(
        &self,
        product: Product,
        sink: &S,
    ) -> Result<(StockView, S::Ticket), EngineError> {
        let mut products = lock(&self.products[shard_index(&product.sku)]);
        if let Some(entry) = products.get_mut(&product.sku) {
            let view = self
                .inventory
                .set_stock(entry.index, product.stock.get())
                .map_err(
                    |SetStockError::BelowCommitted {
                         requested,
                         committed,
                     }| {
                        EngineError::StockBelowCommitted {
                            requested,
                            committed,
                        }
                    },
                )?;
            entry.product = product.clone();
            let ticket = sink.submit(Record::Product { product });
            return Ok((view, ticket));
        }
        let ticket = sink.submit(Record::Product {
            product: product.clone(),
        });
        let index = self.inventory.add(&product.sku, product.stock.get(), 0, 0);
        products.insert(product.sku.clone(), ProductEntry { product, index });
        Ok((self.inventory.view(index), ticket))
    }

    /// A product and a consistent reading of its stock.
    pub fn product(&self, sku: &Sku) -> Option<(Product, StockView)> {
        let products = lock(&self.products[shard_index(sku)]);
        let entry = products.get(sku)?;
        Some((entry.product.clone(), self.inventory.view(entry.index)))
    }

    /// Holds every line or none. Unknown SKUs are refused first, then short ones (without taking a
    /// lock: a sold-out SKU costs one load), then mixed currencies.
    pub fn reserve(&self, lines: &[(Sku, Quantity)]) -> Result<Reservation, EngineError> {
        let mut indexed = Vec::with_capacity(lines.len());
        for (sku, quantity) in lines {
            let index = self
                .inventory
                .lookup(sku)
                .ok_or_else(|| EngineError::UnknownSku(sku.clone()))?;
            indexed.push((index, quantity.get()));
        }
        let hold = self.inventory.reserve(&indexed).map_err(|e| match e {
            ReserveError::OutOfStock { index } => {
                let position = indexed.iter().position(|(i, _)| *i == index).unwrap_or(0);
                EngineError::OutOfStock {
                    sku: lines[position].0.clone(),
                }
            }
        })?;
        // The hold merged lines naming one SKU; price them in its order.
        let mut items = Vec::with_capacity(hold.lines().len());
        let mut currency = None;
        let mut total_cents: i64 = 0;
        for &(index, units) in hold.lines() {
            let position = indexed.iter().position(|(i, _)| *i == index).unwrap_or(0);
            let sku = &lines[position].0;
            let products = lock(&self.products[shard_index(sku)]);
            let Some(entry) = products.get(sku) else {
                drop(products);
                self.inventory.release(hold);
                return Err(EngineError::UnknownSku(sku.clone()));
            };
            let price = entry.product.price_cents;
            if *currency.get_or_insert(entry.product.currency) != entry.product.currency {
                drop(products);
                self.inventory.release(hold);
                return Err(EngineError::MixedCurrency);
            }
            total_cents += price.get() * units;
            items.push(OrderItem {
                sku: sku.clone(),
                quantity: units,
                unit_price_cents: price,
            });
        }
        let currency = currency
            .ok_or_else(|| EngineError::Inconsistent("a reservation without lines".to_owned()))?;
        Ok(Reservation {
            hold,
            items,
            total_cents,
            currency,
        })
    }

    /// Gives a reservation's units back (the checkout ended before an order was placed).
    pub fn release_reservation(&self, reservation: Reservation) {
        self.inventory.release(reservation.hold);
    }

    /// A fresh order id, unique across restarts. The checkout takes it before authorising the
    /// payment, so the gateway can name the order in its webhook.
    pub fn new_order_id(&self) -> OrderId {
        let number = self.next_order_number.fetch_add(1, Ordering::Relaxed);
        let raw = format!("{}{number}", self.config.order_id_prefix);
        // The prefix is validated by the caller's config; a bad one is a programming error that
        // `parse` reports loudly in tests.
        OrderId::parse(raw).unwrap_or_else(|e| panic!("bad order id prefix: {e}"))
    }

    /// Turns a reservation into an order whose payment ended as `outcome`, journals it with its
    /// events (and the answer under the checkout's key), and moves its units accordingly.
    pub fn place_order<S: RecordSink + ?Sized>(
        &self,
        new_order: NewOrder,
        answer: Option<AnswerSpec<'_>>,
        now_ms: i64,
        sink: &S,
    ) -> (Order, Option<StoredAnswer>, S::Ticket) {
        let NewOrder {
            order_id,
            reservation,
            customer_id,
            outcome,
        } = new_order;
        let (status, payment_id) = match outcome {
            PaymentOutcome::Paid { payment_id } => (OrderStatus::Paid, Some(payment_id)),
            PaymentOutcome::Pending { payment_id } => {
                (OrderStatus::PaymentPending, Some(payment_id))
            }
            PaymentOutcome::Failed { payment_id } => (OrderStatus::Released, payment_id),
        };
        let order = Order {
            order_id,
            status,
            customer_id,
            items: reservation.items,
            total_cents: reservation.total_cents,
            currency: reservation.currency,
            created_at_ms: now_ms,
            hold_deadline_ms: now_ms + self.config.hold_ttl_ms,
            payment_id,
        };
        let entered = if status == OrderStatus::Reserved {
            vec![OrderStatus::Reserved]
        } else {
            vec![OrderStatus::Reserved, status]
        };
        let stored = answer.map(|spec| {
            let (code, body) = (spec.render)(&order);
            (
                spec.key.clone(),
                StoredAnswer {
                    fingerprint: spec.fingerprint.to_owned(),
                    status: code,
                    body,
                    at_ms: now_ms,
                },
            )
        });
        let lines = reservation.hold.lines().to_vec();
        match status {
            OrderStatus::Paid => self.inventory.commit(reservation.hold),
            OrderStatus::Released => self.inventory.release(reservation.hold),
            _ => {
                // The units stay held; the order's lines know them from now on.
                let _still_held = reservation.hold;
                lock(&self.holds_by_deadline)
                    .insert((order.hold_deadline_ms, order.order_id.clone()));
            }
        }
        let mut orders = lock(&self.orders[shard_index(&order.order_id)]);
        let ticket = sink.submit(Record::Order {
            order: order.clone(),
            previous: None,
            entered,
            at_ms: now_ms,
            answer: stored.clone(),
        });
        orders.insert(
            order.order_id.clone(),
            OrderEntry {
                order: order.clone(),
                lines,
            },
        );
        (order, stored.map(|(_, a)| a), ticket)
    }

    /// An order as it stands.
    pub fn order(&self, order_id: &OrderId) -> Option<Order> {
        lock(&self.orders[shard_index(order_id)])
            .get(order_id)
            .map(|e| e.order.clone())
    }

    /// Moves an order to `next`, moving its units and journaling the change. Returns the order as
    /// it stands afterwards, and `None` for the ticket when nothing changed because the order was
    /// already in `next`.
    pub fn transition<S: RecordSink + ?Sized>(
        &self,
        order_id: &OrderId,
        next: OrderStatus,
        now_ms: i64,
        sink: &S,
    ) -> Result<(Order, Option<S::Ticket>), EngineError> {
        let mut orders = lock(&self.orders[shard_index(order_id)]);
        let entry = orders
            .get_mut(order_id)
            .ok_or_else(|| EngineError::UnknownOrder(order_id.clone()))?;
        if entry.order.status == next {
            return Ok((entry.order.clone(), None));
        }
        let before = entry.order.status;
        entry.order.transition(next)?;
        let hold = self.inventory.hold_of(entry.lines.clone());
        match (before.holds_stock(), next) {
            (true, OrderStatus::Paid) => self.inventory.commit(hold),
            (true, OrderStatus::Released) => self.inventory.release(hold),
            (false, OrderStatus::Refunded) => self.inventory.refund(&entry.lines),
            _ => {
                // reserved → payment_pending: the units stay held.
                let _still_held = hold;
            }
        }
        if before.holds_stock() && !next.holds_stock() {
            lock(&self.holds_by_deadline).remove(&(entry.order.hold_deadline_ms, order_id.clone()));
        }
        let ticket = sink.submit(Record::Order {
            order: entry.order.clone(),
            previous: Some(before),
            entered: vec![next],
            at_ms: now_ms,
            answer: None,
        });
        Ok((entry.order.clone(), Some(ticket)))
    }

    /// Cancels an order: a held one is released, a paid one refunded; a finished one is returned
    /// unchanged (cancelling twice is harmless).
    pub fn cancel<S: RecordSink + ?Sized>(
        &self,
        order_id: &OrderId,
        now_ms: i64,
        sink: &S,
    ) -> Result<(Order, Option<S::Ticket>), EngineError> {
        let current = self
            .order(order_id)
            .ok_or_else(|| EngineError::UnknownOrder(order_id.clone()))?;
        let next = match current.status {
            s if s.holds_stock() => OrderStatus::Released,
            OrderStatus::Paid => OrderStatus::Refunded,
            _ => return Ok((current, None)),
        };
        match self.transition(order_id, next, now_ms, sink) {
            // Another request finished the order between the read and the move: it stands final.
            Err(EngineError::IllegalTransition(_)) => self
                .order(order_id)
                .map(|o| (o, None))
                .ok_or_else(|| EngineError::UnknownOrder(order_id.clone())),
            other => other,
        }
    }

    /// Releases every order whose hold deadline has passed at `now_ms`, at most `limit` of them
    /// (bounded work per sweep). Returns the released orders with their tickets.
    pub fn expire_holds<S: RecordSink + ?Sized>(
        &self,
        now_ms: i64,
        limit: usize,
        sink: &S,
    ) -> Vec<(Order, S::Ticket)> {
        let due: Vec<OrderId> = lock(&self.holds_by_deadline)
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_ms)
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect();
        let mut released = Vec::with_capacity(due.len());
        for order_id in due {
            if let Ok((order, Some(ticket))) =
                self.transition(&order_id, OrderStatus::Released, now_ms, sink)
            {
                released.push((order, ticket));
            }
        }
        released
    }

    /// How many orders hold stock now.
    pub fn holds_len(&self) -> usize {
        lock(&self.holds_by_deadline).len()
    }
}
