//! The pure core: stock, holds, orders and idempotency. Synchronous, no I/O, time passed in.
//!
//! # Memory never runs ahead of the journal
//! The mechanism (one, for every change): **decide now, apply after the commit**. Every durable
//! change goes through two steps:
//! 1. `prepare_*` / [`Engine::place_order`] checks the change against the durable state and returns
//!    a [`Change`]: the journal [`Record`] to append, and what to do to memory once it is durable.
//!    Nothing a reader can see changes here. The one provisional state is a *hold*: units the
//!    change needs are reserved at once (a checkout's items, or the units a lowered stock takes
//!    away), so no other request can take them; a reader may see them as `reserved` while in flight.
//! 2. The caller appends the record and awaits its commit, then hands the change back:
//!    [`Engine::apply`] once it is durable (the order, product, stock counters and the answer under
//!    the idempotency key become visible), or [`Engine::abort`] when the append failed (the holds
//!    are released, the key is freed; memory is exactly as before, so a failed append leaves no
//!    trace).
//!
//! One change at a time per order and per product: while a change of an order (or product) is in
//! flight, the next one is refused with [`EngineError::Busy`] and the caller waits for the first
//! to settle, then decides again against the new durable state. So the journal holds the changes
//! of one order in the order memory applies them, and two racing requests (a cancel and a webhook
//! approval, say) end exactly as some serial order of the two would. A new order cannot race
//! anything: nobody can name it before it is durable.
//!
//! Why this mechanism rather than "apply at once, rebuild from disk when an append fails": with
//! it a reader never sees a change that may still fail (not even during the commit), and a failed
//! append needs no rebuild of the engine, only the release of what the change held.

pub mod codec;
pub mod customers;
pub mod idempotency;
pub mod inventory;
pub mod order;
pub mod records;

use crate::domain::{Currency, CustomerId, IdempotencyKey, OrderId, Quantity, Sku};
use crate::sync::lock;
use idempotency::{IdempotencyStore, RejectionLimits};
use inventory::{Hold, Inventory, ReserveError, SkuIndex, StockView};
use order::{IllegalTransition, Order, OrderItem, OrderStatus, PaymentDue};
use records::{Product, Record, SettledPayment, State, StoredAnswer};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BTreeSet;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Shards per SKU: the number of cores that serve requests.
    pub shard_count: usize,
    /// How long an unfinished order may hold stock.
    pub hold_ttl_ms: i64,
    /// Bounds of the map of answers that placed nothing.
    pub rejections: RejectionLimits,
    /// How long the answer of a checkout that placed an order is kept under its key; past it the
    /// key starts afresh.
    pub answer_retention_ms: i64,
    /// How long a finished order (one that holds no stock) stays in memory, counted from its
    /// creation.
    pub order_retention_ms: i64,
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
            answer_retention_ms: 24 * 3_600 * 1_000,
            order_retention_ms: 7 * 24 * 3_600 * 1_000,
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
    /// The checkout would take the customer's units of this SKU past its `max_per_customer`.
    #[error("the customer's units of sku {sku} would pass its limit per customer")]
    CustomerLimit {
        /// The first SKU whose limit would be passed, in request order.
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
    /// A change of this order or product is being committed: wait for it to settle, then ask
    /// again (the answer may differ).
    #[error("a change of {0} is in flight")]
    Busy(String),
    /// The journal's records contradict each other (only at start-up).
    #[error("the journal is inconsistent: {0}")]
    Inconsistent(String),
}

/// Independently locked parts of the product and order maps: contention stays low. A rejection
/// takes none of these locks (the stock check and the sold-out flag are atomics); a reservation
/// that holds its units takes its products' shard locks, briefly, to price its lines.
const MAP_SHARDS: usize = 64;

fn shard_index<K: Hash>(key: &K) -> usize {
    crate::sync::shard_of(key, MAP_SHARDS)
}

struct ProductEntry {
    /// The product as durably defined, and its stock counters; `None` while its creation is in
    /// flight (readers and checkouts do not see it yet).
    durable: Option<(Product, SkuIndex)>,
    /// A change of this product is in flight.
    busy: bool,
}

struct OrderEntry {
    /// The order as durably recorded (only durable orders are in the map).
    order: Order,
    /// The inventory lines of the order, to release, commit or refund its units.
    lines: Vec<(SkuIndex, i64)>,
    /// A change of this order is in flight.
    busy: bool,
}

/// Units held for a checkout that has not been placed as an order yet (the payment is being
/// authorised). Turn it into an order with [`Engine::place_order`] or give it back with
/// [`Engine::release_reservation`].
#[derive(Debug)]
#[must_use = "a reservation holds stock until placed or released"]
pub struct Reservation {
    hold: Hold,
    /// The buyer, whose units of each SKU count the hold's ([`customers`]).
    customer: CustomerId,
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
    /// Authorised: the order is paid, and its capture is due once it is durable.
    Authorized {
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

/// An order about to be placed: its id (taken before the payment), its held units and buyer,
/// and how its payment ended.
#[derive(Debug)]
pub struct NewOrder {
    /// From [`Engine::new_order_id`].
    pub order_id: OrderId,
    /// The held units and prices, and the buyer.
    pub reservation: Reservation,
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

/// A change decided against the durable state, not yet applied to memory. Append
/// [`Change::record`] to the journal, then hand the change to [`Engine::apply`] once the record is
/// durable or to [`Engine::abort`] if the append failed. Dropping it instead leaks its holds and
/// leaves its order or product busy for good.
#[derive(Debug)]
#[must_use = "a change must be applied or aborted"]
pub struct Change {
    record: Record,
    effect: Effect,
}

#[derive(Debug)]
enum Effect {
    /// A product created or changed; a lowered stock holds the units it takes away.
    Product {
        product: Product,
        decrease: Option<Hold>,
    },
    /// A new order, with the units it holds until durable and the answer under its key.
    NewOrder {
        lines: Vec<(SkuIndex, i64)>,
        hold: Hold,
        answer: Option<(IdempotencyKey, StoredAnswer)>,
    },
    /// A durable order moves to another status.
    Transition { previous: OrderStatus },
    /// What durable orders owe the gateway changes (the record says what).
    Payments,
}

impl Change {
    /// The record to append.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The order this change makes (`None` for a product change).
    pub fn order(&self) -> Option<&Order> {
        match &self.record {
            Record::Order { order, .. } => Some(order),
            Record::Product { .. }
            | Record::Payments { .. }
            | Record::Adopted { .. }
            | Record::AdoptedAway { .. } => None,
        }
    }
}

/// What a change did, once applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A product as it now stands, with a reading of its stock.
    Product(Product, StockView),
    /// What the orders of a [`Record::Payments`] now owe the gateway, as they now stand.
    Payments(Vec<Order>),
    /// An order as it now stands, and the status it had before (`None`: it is new).
    Order {
        /// The order after the change.
        order: Order,
        /// Its status before.
        previous: Option<OrderStatus>,
    },
}

/// What a request to change an order found.
#[derive(Debug)]
// Made and taken apart once per request: boxing the change would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Prepared {
    /// A change to commit.
    Change(Change),
    /// Nothing to change: the order already stands where asked (or, for a cancel, is final).
    Unchanged(Order),
}

/// The engine of one process.
pub struct Engine {
    config: EngineConfig,
    inventory: Inventory,
    products: Box<[Mutex<FxHashMap<Sku, ProductEntry>>]>,
    orders: Box<[Mutex<FxHashMap<OrderId, OrderEntry>>]>,
    /// Orders that hold stock, by deadline, so the sweeper never scans the others.
    holds_by_deadline: Mutex<BTreeSet<(i64, OrderId)>>,
    /// Finished orders in the order they finished, with their creation time: the retention purge
    /// takes from the front. Appending costs O(1) under a lock held for nanoseconds (every placed
    /// order passes here); an order that finished late sits behind newer ones and leaves a little
    /// after its retention, never before.
    finished_by_time: Mutex<std::collections::VecDeque<(i64, OrderId)>>,
    /// Orders that owe the gateway a call (capture, void, refund), so the settler never scans the
    /// others.
    payments_due: Mutex<FxHashSet<OrderId>>,
    /// Units per customer and SKU, for `max_per_customer`.
    customers: customers::CustomerUnits,
    /// Told of every durable order that starts counting for its customer naming a SKU with a
    /// limit, and of every one that stops (released, refunded, past retention): several nodes
    /// keep the count they share by it ([`Self::on_count_changes`]).
    count_changes: std::sync::OnceLock<CountHook>,
    idempotency: IdempotencyStore,
    next_order_number: AtomicU64,
}

/// An order that counts for its customer: the customer, the order, its units per limited SKU.
pub type CountingOrder = (CustomerId, OrderId, Vec<(Sku, i64)>);

/// A change of what counts for customers' limits ([`Engine::on_count_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountChange {
    /// A durable order counts: its units of SKUs with a limit now.
    Counts(CountingOrder),
    /// A durable order counts no more: its customer, its id and every SKU it names (with a limit
    /// or not: one cleared since may be set again).
    Stops(CustomerId, OrderId, Vec<Sku>),
}

/// The hook [`Engine::on_count_changes`] sets.
pub type CountHook = Box<dyn Fn(CountChange) + Send + Sync>;

impl Engine {
    /// Sets the hook told of every durable order that starts counting for its customer naming a
    /// SKU with `max_per_customer`, and of every one that stops counting (once).
    pub fn on_count_changes(&self, hook: CountHook) {
        let _ = self.count_changes.set(hook);
    }

    /// A durable order's units count for its customer no more.
    fn order_stops_counting(&self, order: &Order, lines: &[(SkuIndex, i64)]) {
        self.customers.give(&order.customer_id, lines);
        if let Some(hook) = self.count_changes.get() {
            let mut skus: Vec<Sku> = order.items.iter().map(|item| item.sku.clone()).collect();
            skus.sort();
            skus.dedup();
            hook(CountChange::Stops(
                order.customer_id.clone(),
                order.order_id.clone(),
                skus,
            ));
        }
    }

    /// A durable order counts for its customer from now (placed, or adopted).
    fn order_counts(&self, order: &Order) {
        if let Some(hook) = self.count_changes.get() {
            let units = self.limited_units_of(order);
            if !units.is_empty() {
                hook(CountChange::Counts((
                    order.customer_id.clone(),
                    order.order_id.clone(),
                    units,
                )));
            }
        }
    }

    /// An order's units per SKU that has `max_per_customer` now.
    fn limited_units_of(&self, order: &Order) -> Vec<(Sku, i64)> {
        let mut units: Vec<(Sku, i64)> = Vec::new();
        for item in &order.items {
            let limited = self
                .inventory
                .lookup(&item.sku)
                .is_some_and(|index| self.inventory.max_per_customer(index).is_some());
            if !limited {
                continue;
            }
            match units.iter_mut().find(|(sku, _)| *sku == item.sku) {
                Some((_, total)) => *total += item.quantity,
                None => units.push((item.sku.clone(), item.quantity)),
            }
        }
        units
    }

    /// Every order that counts for its customer now (held, pending or paid, within retention)
    /// naming a SKU with `max_per_customer`: its customer, its id and its units of those SKUs.
    pub fn orders_counting_for_limits(&self) -> Vec<CountingOrder> {
        let mut out = Vec::new();
        for shard in self.orders.iter() {
            for entry in lock(shard).values() {
                if !entry.order.status.counts_for_customer() {
                    continue;
                }
                let units = self.limited_units_of(&entry.order);
                if !units.is_empty() {
                    out.push((
                        entry.order.customer_id.clone(),
                        entry.order.order_id.clone(),
                        units,
                    ));
                }
            }
        }
        out
    }

    /// An empty engine.
    pub fn new(config: EngineConfig) -> Self {
        Self {
            inventory: Inventory::new(config.shard_count),
            products: (0..MAP_SHARDS).map(|_| Mutex::default()).collect(),
            orders: (0..MAP_SHARDS).map(|_| Mutex::default()).collect(),
            holds_by_deadline: Mutex::default(),
            finished_by_time: Mutex::default(),
            payments_due: Mutex::default(),
            customers: customers::CustomerUnits::default(),
            count_changes: std::sync::OnceLock::new(),
            idempotency: IdempotencyStore::new(config.rejections, config.answer_retention_ms),
            next_order_number: AtomicU64::new(1),
            config,
        }
    }

    /// Rebuilds the engine from the durable state: products, orders and their stock, and the kept
    /// answers. Stock counters are derived from the orders' statuses, plus the units sold by
    /// orders that already left the state (retention).
    pub fn from_state(config: EngineConfig, state: &State) -> Result<Self, EngineError> {
        let engine = Self::new(config);
        let mut committed: FxHashMap<&Sku, (i64, i64)> = FxHashMap::default();
        for (sku, sold) in &state.sold_pruned {
            committed.entry(sku).or_default().1 += sold;
        }
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
            if reserved < 0 || sold < 0 || reserved + sold > stock {
                return Err(EngineError::Inconsistent(format!(
                    "sku {sku} has stock {stock} but {reserved} reserved and {sold} sold"
                )));
            }
            let index = engine
                .inventory
                .add_limited(sku, stock, reserved, sold, product.limits());
            lock(&engine.products[shard_index(sku)]).insert(
                sku.clone(),
                ProductEntry {
                    durable: Some((product.clone(), index)),
                    busy: false,
                },
            );
        }
        // In creation order, so the retention purge finds the oldest finished orders first.
        let mut by_time: Vec<&Order> = state.orders.values().collect();
        by_time.sort_by_key(|o| o.created_at_ms);
        for order in by_time {
            let lines = engine.lines_of(order)?;
            if order.status.counts_for_customer() {
                engine.customers.add(&order.customer_id, &lines);
            }
            engine.index_order(order, None);
            lock(&engine.orders[shard_index(&order.order_id)]).insert(
                order.order_id.clone(),
                OrderEntry {
                    order: order.clone(),
                    lines,
                    busy: false,
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

    /// Decides a product's creation or change. A new product becomes visible (and sellable) only
    /// once applied, so no order can be journaled ahead of its product. A lowered stock takes the
    /// units it removes at once (as a hold), so no checkout can sell them while the change commits;
    /// a raised stock adds its units only once applied.
    pub fn prepare_product(&self, product: Product) -> Result<Change, EngineError> {
        self.prepare_product_with(product, false)
    }

    /// [`Self::prepare_product`] of a product that keeps the limit per customer it has (a `PUT`
    /// without `max_per_customer`): read under the product's lock, after any change in flight
    /// settled, so a limit set by a change just before is kept, not overwritten.
    pub fn prepare_product_keeping_limit(&self, product: Product) -> Result<Change, EngineError> {
        self.prepare_product_with(product, true)
    }

    fn prepare_product_with(
        &self,
        mut product: Product,
        keep_limit: bool,
    ) -> Result<Change, EngineError> {
        let mut products = lock(&self.products[shard_index(&product.sku)]);
        let entry = products.entry(product.sku.clone()).or_insert(ProductEntry {
            durable: None,
            busy: false,
        });
        if entry.busy {
            return Err(EngineError::Busy(format!("product {}", product.sku)));
        }
        if keep_limit {
            product.max_per_customer = entry
                .durable
                .as_ref()
                .and_then(|(kept, _)| kept.max_per_customer);
        }
        let mut decrease = None;
        if let Some((_, index)) = &entry.durable {
            let view = self.inventory.view(*index);
            let requested = product.stock.get();
            if requested < view.stock {
                let units = view.stock - requested;
                let hold = self.inventory.reserve_one(*index, units).map_err(
                    |ReserveError::OutOfStock { .. }| {
                        let view = self.inventory.view(*index);
                        EngineError::StockBelowCommitted {
                            requested,
                            committed: view.reserved + view.sold,
                        }
                    },
                )?;
                decrease = Some(hold);
            }
        }
        entry.busy = true;
        Ok(Change {
            record: Record::Product {
                product: product.clone(),
            },
            effect: Effect::Product { product, decrease },
        })
    }

    /// Several nodes: a product as the shared catalogue defines it now. Its definition (name,
    /// price, the shop's stock) replaces the one kept; this node's units for sale are its lease
    /// ([`crate::cluster::leases`]), untouched here: a SKU new to this node starts with none.
    pub fn catalogue_product(&self, product: Product) {
        let mut products = lock(&self.products[shard_index(&product.sku)]);
        match products.get_mut(&product.sku) {
            Some(ProductEntry {
                durable: Some((kept, index)),
                ..
            }) => {
                if *kept != product {
                    self.inventory.set_limits(*index, product.limits());
                    *kept = product;
                }
            }
            _ => {
                let index = self
                    .inventory
                    .add_limited(&product.sku, 0, 0, 0, product.limits());
                products.insert(
                    product.sku.clone(),
                    ProductEntry {
                        durable: Some((product, index)),
                        busy: false,
                    },
                );
            }
        }
    }

    /// A product and a consistent reading of its stock (durable products only).
    pub fn product(&self, sku: &Sku) -> Option<(Product, StockView)> {
        let products = lock(&self.products[shard_index(sku)]);
        let (product, index) = products.get(sku)?.durable.as_ref()?;
        Some((product.clone(), self.inventory.view(*index)))
    }

    /// Holds every line or none, for `customer`. Unknown SKUs are refused first, then short ones
    /// (without taking a lock: a sold-out SKU costs one load), then lines past the customer's
    /// limit (`max_per_customer`: checked and counted before any unit is held), then mixed
    /// currencies. Once held, each line is priced under its product's shard lock.
    pub fn reserve(
        &self,
        lines: &[(Sku, Quantity)],
        customer: &CustomerId,
    ) -> Result<Reservation, EngineError> {
        // The flash sale's flood: one line of a SKU flagged sold out is refused with one lookup
        // and one load, before anything is allocated (the answer the full path below would give).
        if let [(sku, _)] = lines {
            if let Some(index) = self.inventory.lookup(sku) {
                if self.inventory.is_sold_out(index) {
                    return Err(EngineError::OutOfStock { sku: sku.clone() });
                }
            }
        }
        let mut indexed = Vec::with_capacity(lines.len());
        for (sku, quantity) in lines {
            let index = self
                .inventory
                .lookup(sku)
                .ok_or_else(|| EngineError::UnknownSku(sku.clone()))?;
            indexed.push((index, quantity.get()));
        }
        let sku_of = |index: SkuIndex| {
            let position = indexed.iter().position(|(i, _)| *i == index).unwrap_or(0);
            lines[position].0.clone()
        };
        // The customer's units first (one line per SKU, as the hold will have them): a customer
        // at a limit is refused before holding a unit another buyer could have had.
        let mut per_sku: Vec<(SkuIndex, i64)> = Vec::with_capacity(indexed.len());
        for &(index, units) in &indexed {
            match per_sku.iter_mut().find(|(i, _)| *i == index) {
                Some((_, total)) => *total += units,
                None => per_sku.push((index, units)),
            }
        }
        if let Err(over) = self.customers.take(customer, &per_sku, |index| {
            self.inventory.max_per_customer(index)
        }) {
            // A SKU without the units says so first, to this customer as to everyone (as the
            // sold-out flag above does).
            let short = per_sku
                .iter()
                .find(|&&(index, units)| self.inventory.view(index).available < units);
            return Err(match short {
                Some(&(index, _)) => EngineError::OutOfStock { sku: sku_of(index) },
                None => EngineError::CustomerLimit { sku: sku_of(over) },
            });
        }
        let hold = match self.inventory.reserve(&indexed) {
            Ok(hold) => hold,
            Err(ReserveError::OutOfStock { index }) => {
                self.customers.give(customer, &per_sku);
                return Err(EngineError::OutOfStock { sku: sku_of(index) });
            }
        };
        // The hold merged lines naming one SKU; price them in its order.
        let mut items = Vec::with_capacity(hold.lines().len());
        let mut currency = None;
        let mut total_cents: i64 = 0;
        for &(index, units) in hold.lines() {
            let position = indexed.iter().position(|(i, _)| *i == index).unwrap_or(0);
            let sku = &lines[position].0;
            let products = lock(&self.products[shard_index(sku)]);
            let Some((product, _)) = products.get(sku).and_then(|e| e.durable.as_ref()) else {
                drop(products);
                self.customers.give(customer, hold.lines());
                self.inventory.release(hold);
                return Err(EngineError::UnknownSku(sku.clone()));
            };
            let price = product.price_cents;
            if *currency.get_or_insert(product.currency) != product.currency {
                drop(products);
                self.customers.give(customer, hold.lines());
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
            customer: customer.clone(),
            items,
            total_cents,
            currency,
        })
    }

    /// The answer a refusal of `sku` gets, rendered by `render` the first time (see
    /// [`Inventory::refusal`]); `None` for a SKU the inventory never held.
    pub fn refusal(&self, sku: &Sku, render: impl FnOnce() -> String) -> Option<&'static [u8]> {
        let index = self.inventory.lookup(sku)?;
        Some(self.inventory.refusal(index, render))
    }

    /// Gives a reservation's units back (the checkout ended before an order was placed).
    pub fn release_reservation(&self, reservation: Reservation) {
        self.customers
            .give(&reservation.customer, reservation.hold.lines());
        self.inventory.release(reservation.hold);
    }

    /// The units `customer` holds or bought of `sku` (as `max_per_customer` counts them).
    pub fn customer_units(&self, sku: &Sku, customer: &CustomerId) -> i64 {
        self.inventory
            .lookup(sku)
            .map_or(0, |index| self.customers.units(index, customer))
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

    /// Decides a new order whose payment ended as `outcome`, with its events and the answer under
    /// the checkout's key. Its units stay held until the change is applied (then they are sold,
    /// released or kept held, as the outcome says) or aborted (then they are released).
    pub fn place_order(
        &self,
        new_order: NewOrder,
        answer: Option<AnswerSpec<'_>>,
        now_ms: i64,
    ) -> (Change, Option<StoredAnswer>) {
        let NewOrder {
            order_id,
            reservation,
            outcome,
        } = new_order;
        let (status, payment_id) = match outcome {
            PaymentOutcome::Authorized { payment_id } => (OrderStatus::Paid, Some(payment_id)),
            PaymentOutcome::Pending { payment_id } => {
                (OrderStatus::PaymentPending, Some(payment_id))
            }
            PaymentOutcome::Failed { payment_id } => (OrderStatus::Released, payment_id),
        };
        let order = Order {
            order_id,
            status,
            customer_id: reservation.customer,
            items: reservation.items,
            total_cents: reservation.total_cents,
            currency: reservation.currency,
            created_at_ms: now_ms,
            hold_deadline_ms: now_ms + self.config.hold_ttl_ms,
            payment_due: (status == OrderStatus::Paid).then_some(PaymentDue::Capture),
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
        let answer = stored.as_ref().map(|(_, a)| a.clone());
        let replaces_expired_key = stored
            .as_ref()
            .is_some_and(|(key, _)| self.idempotency.supersedes_expired(key));
        let change = Change {
            effect: Effect::NewOrder {
                lines: reservation.hold.lines().to_vec(),
                hold: reservation.hold,
                answer: stored.clone(),
            },
            record: Record::Order {
                order,
                previous: None,
                entered,
                at_ms: now_ms,
                answer: stored,
                replaces_expired_key,
            },
        };
        (change, answer)
    }

    /// An order as durably recorded.
    pub fn order(&self, order_id: &OrderId) -> Option<Order> {
        lock(&self.orders[shard_index(order_id)])
            .get(order_id)
            .map(|e| e.order.clone())
    }

    /// Decides the move of an order to `next`: `Unchanged` if it is there already, an error if its
    /// state machine forbids the move or another change of it is in flight.
    pub fn prepare_transition(
        &self,
        order_id: &OrderId,
        next: OrderStatus,
        now_ms: i64,
    ) -> Result<Prepared, EngineError> {
        self.prepare_move(order_id, now_ms, |status| (status != next).then_some(next))
    }

    /// Decides a cancel: a held order is released, a paid one refunded; a final one stays as it is
    /// (cancelling twice is harmless).
    pub fn prepare_cancel(&self, order_id: &OrderId, now_ms: i64) -> Result<Prepared, EngineError> {
        self.prepare_move(order_id, now_ms, |status| match status {
            s if s.holds_stock() => Some(OrderStatus::Released),
            OrderStatus::Paid => Some(OrderStatus::Refunded),
            _ => None,
        })
    }

    /// Decides the release of a held order (the operations desk's release of a stuck hold): a
    /// paid, refunded or released order stays as it is (`Unchanged`; the caller says which).
    pub fn prepare_release(
        &self,
        order_id: &OrderId,
        now_ms: i64,
    ) -> Result<Prepared, EngineError> {
        self.prepare_move(order_id, now_ms, |status| {
            status.holds_stock().then_some(OrderStatus::Released)
        })
    }

    /// Decides, for many orders at once, that each owes `next` instead of `expected` (calls to
    /// the gateway done, in one record). Orders that no longer owe `expected`, are gone, or have a
    /// change in flight are left out (`None` if none is left); the caller finds them owing still.
    pub fn prepare_payments(
        &self,
        updates: &[(OrderId, Option<PaymentDue>, Option<PaymentDue>)],
        now_ms: i64,
    ) -> Option<Change> {
        let mut settled = Vec::with_capacity(updates.len());
        for (order_id, expected, next) in updates {
            let mut orders = lock(&self.orders[shard_index(order_id)]);
            let Some(entry) = orders.get_mut(order_id) else {
                continue;
            };
            if entry.busy || entry.order.payment_due != *expected {
                continue;
            }
            entry.busy = true;
            settled.push(SettledPayment {
                order_id: order_id.clone(),
                status: entry.order.status,
                payment_id: entry.order.payment_id.clone(),
                payment_due: *next,
            });
        }
        if settled.is_empty() {
            return None;
        }
        Some(Change {
            record: Record::Payments {
                settled,
                at_ms: now_ms,
            },
            effect: Effect::Payments,
        })
    }

    /// Orders that owe the gateway a call, at most `limit` (in no particular order).
    pub fn payments_due(&self, limit: usize) -> Vec<Order> {
        let ids: Vec<OrderId> = lock(&self.payments_due)
            .iter()
            .take(limit)
            .cloned()
            .collect();
        ids.iter().filter_map(|id| self.order(id)).collect()
    }

    /// Orders waiting for the gateway's word (`payment_pending`) created before `cutoff_ms`, at
    /// most `limit`.
    pub fn pending_orders_created_before(&self, cutoff_ms: i64, limit: usize) -> Vec<Order> {
        self.held_orders(cutoff_ms, limit, |status| {
            status == OrderStatus::PaymentPending
        })
    }

    /// Orders holding stock (reserved or payment pending) created before `cutoff_ms`, at most
    /// `limit`, oldest first: the operations desk's stuck holds.
    pub fn held_orders_created_before(&self, cutoff_ms: i64, limit: usize) -> Vec<Order> {
        self.held_orders(cutoff_ms, limit, OrderStatus::holds_stock)
    }

    fn held_orders(
        &self,
        cutoff_ms: i64,
        limit: usize,
        wanted: impl Fn(OrderStatus) -> bool,
    ) -> Vec<Order> {
        let ids: Vec<OrderId> = lock(&self.holds_by_deadline)
            .iter()
            .map(|(_, id)| id.clone())
            .collect();
        let mut held: Vec<Order> = ids
            .iter()
            .filter_map(|id| self.order(id))
            .filter(|o| o.status.holds_stock() && wanted(o.status) && o.created_at_ms < cutoff_ms)
            .collect();
        // Oldest first, before the limit: hold deadlines follow --hold-ttl, which may have
        // changed between runs.
        held.sort_by_key(|o| o.created_at_ms);
        held.truncate(limit);
        held
    }

    /// How many orders owe the gateway a call.
    pub fn payments_due_len(&self) -> usize {
        lock(&self.payments_due).len()
    }

    /// Decides a move with `decide` (the next status, or `None` to leave the order as it is),
    /// against the durable order, under its lock: nothing can move it between the look and the
    /// decision.
    fn prepare_move(
        &self,
        order_id: &OrderId,
        now_ms: i64,
        decide: impl FnOnce(OrderStatus) -> Option<OrderStatus>,
    ) -> Result<Prepared, EngineError> {
        let mut orders = lock(&self.orders[shard_index(order_id)]);
        let entry = orders
            .get_mut(order_id)
            .ok_or_else(|| EngineError::UnknownOrder(order_id.clone()))?;
        if entry.busy {
            return Err(EngineError::Busy(format!("order {order_id}")));
        }
        let previous = entry.order.status;
        let Some(next) = decide(previous) else {
            return Ok(Prepared::Unchanged(entry.order.clone()));
        };
        let mut order = entry.order.clone();
        order.transition(next)?;
        entry.busy = true;
        Ok(Prepared::Change(Change {
            record: Record::Order {
                order,
                previous: Some(previous),
                entered: vec![next],
                at_ms: now_ms,
                answer: None,
                replaces_expired_key: false,
            },
            effect: Effect::Transition { previous },
        }))
    }

    /// Decides the release of every order whose hold deadline has passed at `now_ms`, at most
    /// `limit` of them (bounded work per sweep). Orders with a change in flight are left for the
    /// next sweep.
    pub fn expire_holds(&self, now_ms: i64, limit: usize) -> Vec<Change> {
        let due: Vec<OrderId> = lock(&self.holds_by_deadline)
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_ms)
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect();
        due.into_iter()
            .filter_map(|order_id| {
                match self.prepare_transition(&order_id, OrderStatus::Released, now_ms) {
                    Ok(Prepared::Change(change)) => Some(change),
                    _ => None,
                }
            })
            .collect()
    }

    /// Applies a change whose record is durable: from now on readers see it.
    pub fn apply(&self, change: Change) -> Applied {
        let Change { record, effect } = change;
        match (record, effect) {
            (Record::Product { .. }, Effect::Product { product, decrease }) => {
                let mut products = lock(&self.products[shard_index(&product.sku)]);
                let entry = products.entry(product.sku.clone()).or_insert(ProductEntry {
                    durable: None,
                    busy: true,
                });
                entry.busy = false;
                let index = match &entry.durable {
                    Some((_, index)) => {
                        let index = *index;
                        match decrease {
                            Some(hold) => self.inventory.retire(hold),
                            None => {
                                // Raised (or unchanged): nothing else changes stock meanwhile, as
                                // product changes are one at a time.
                                let _ = self.inventory.set_stock(index, product.stock.get());
                            }
                        }
                        index
                    }
                    None => self.inventory.add_limited(
                        &product.sku,
                        product.stock.get(),
                        0,
                        0,
                        product.limits(),
                    ),
                };
                self.inventory.set_limits(index, product.limits());
                let view = self.inventory.view(index);
                entry.durable = Some((product.clone(), index));
                Applied::Product(product, view)
            }
            (
                Record::Order { order, .. },
                Effect::NewOrder {
                    lines,
                    hold,
                    answer,
                    ..
                },
            ) => {
                match order.status {
                    OrderStatus::Paid => self.inventory.commit(hold),
                    OrderStatus::Released => {
                        self.order_stops_counting(&order, hold.lines());
                        self.inventory.release(hold);
                    }
                    // Held: the order's lines know the units from now on.
                    _ => drop(hold),
                }
                if order.status.counts_for_customer() {
                    self.order_counts(&order);
                }
                self.index_order(&order, None);
                lock(&self.orders[shard_index(&order.order_id)]).insert(
                    order.order_id.clone(),
                    OrderEntry {
                        order: order.clone(),
                        lines,
                        busy: false,
                    },
                );
                if let Some((key, answer)) = answer {
                    self.idempotency.finish(&key, answer);
                }
                Applied::Order {
                    order,
                    previous: None,
                }
            }
            (Record::Order { order, .. }, Effect::Transition { previous }) => {
                let mut orders = lock(&self.orders[shard_index(&order.order_id)]);
                let lines = match orders.get_mut(&order.order_id) {
                    Some(entry) => {
                        entry.busy = false;
                        entry.order = order.clone();
                        entry.lines.clone()
                    }
                    None => Vec::new(),
                };
                drop(orders);
                let hold = self.inventory.hold_of(lines.clone());
                if previous.counts_for_customer() && !order.status.counts_for_customer() {
                    self.order_stops_counting(&order, &lines);
                }
                match (previous.holds_stock(), order.status) {
                    (true, OrderStatus::Paid) => self.inventory.commit(hold),
                    (true, OrderStatus::Released) => self.inventory.release(hold),
                    (false, OrderStatus::Refunded) => self.inventory.refund(&lines),
                    // reserved → payment_pending: the units stay held.
                    _ => drop(hold),
                }
                self.index_order(&order, Some(previous));
                Applied::Order {
                    order,
                    previous: Some(previous),
                }
            }
            (Record::Payments { settled, .. }, Effect::Payments) => {
                let mut orders_now = Vec::with_capacity(settled.len());
                for entry in settled {
                    let mut orders = lock(&self.orders[shard_index(&entry.order_id)]);
                    let Some(held) = orders.get_mut(&entry.order_id) else {
                        continue;
                    };
                    held.busy = false;
                    held.order.payment_due = entry.payment_due;
                    let order = held.order.clone();
                    drop(orders);
                    self.index_order(&order, Some(order.status));
                    orders_now.push(order);
                }
                Applied::Payments(orders_now)
            }
            (record, effect) => unreachable!("a change pairs {record:?} with {effect:?}"),
        }
    }

    /// Gives up a change whose record did not become durable: memory is left as it was before
    /// the change was decided (its holds released, its key freed for a retry).
    pub fn abort(&self, change: Change) {
        let Change { record, effect } = change;
        match effect {
            Effect::Product { product, decrease } => {
                if let Some(hold) = decrease {
                    self.inventory.release(hold);
                }
                let mut products = lock(&self.products[shard_index(&product.sku)]);
                if let Some(entry) = products.get_mut(&product.sku) {
                    entry.busy = false;
                    if entry.durable.is_none() {
                        products.remove(&product.sku);
                    }
                }
            }
            Effect::NewOrder { hold, answer, .. } => {
                if let Record::Order { order, .. } = &record {
                    self.customers.give(&order.customer_id, hold.lines());
                }
                self.inventory.release(hold);
                if let Some((key, _)) = answer {
                    self.idempotency.abandon(&key);
                }
            }
            Effect::Payments => {
                if let Record::Payments { settled, .. } = record {
                    for entry in settled {
                        if let Some(held) = lock(&self.orders[shard_index(&entry.order_id)])
                            .get_mut(&entry.order_id)
                        {
                            held.busy = false;
                        }
                    }
                }
            }
            Effect::Transition { .. } => {
                if let Record::Order { order, .. } = record {
                    if let Some(entry) =
                        lock(&self.orders[shard_index(&order.order_id)]).get_mut(&order.order_id)
                    {
                        entry.busy = false;
                    }
                }
            }
        }
    }

    /// Keeps the by-deadline and by-time indexes in step with an order's durable status.
    fn index_order(&self, order: &Order, previous: Option<OrderStatus>) {
        {
            let mut due = lock(&self.payments_due);
            if order.payment_due.is_some() {
                due.insert(order.order_id.clone());
            } else if !due.is_empty() {
                due.remove(&order.order_id);
            }
        }
        let key = (order.hold_deadline_ms, order.order_id.clone());
        if previous.is_some_and(|p| p.holds_stock()) && !order.status.holds_stock() {
            lock(&self.holds_by_deadline).remove(&key);
        }
        if order.status.holds_stock() {
            if previous.is_none() {
                lock(&self.holds_by_deadline).insert(key);
            }
        } else if previous.is_none_or(|p| p.holds_stock()) {
            lock(&self.finished_by_time).push_back((order.created_at_ms, order.order_id.clone()));
        }
    }

    /// An order's inventory lines; every SKU it names must be known.
    fn lines_of(&self, order: &Order) -> Result<Vec<(SkuIndex, i64)>, EngineError> {
        order
            .items
            .iter()
            .map(|item| {
                let index = self.inventory.lookup(&item.sku).ok_or_else(|| {
                    EngineError::Inconsistent(format!(
                        "order {} names unknown sku {}",
                        order.order_id, item.sku
                    ))
                })?;
                Ok((index, item.quantity))
            })
            .collect()
    }

    /// Several nodes: takes over an order another node placed (it left or died), with the units
    /// it holds or sold, which came with it into this node's lease. From now on this node
    /// finishes it as its own (hold expiry, webhook, payments owed). An order already known is
    /// left alone (`false`).
    pub fn adopt(&self, order: Order) -> Result<bool, EngineError> {
        let mut orders = lock(&self.orders[shard_index(&order.order_id)]);
        if orders.contains_key(&order.order_id) {
            return Ok(false);
        }
        let lines = self.lines_of(&order)?;
        if order.status.counts_for_customer() {
            self.customers.add(&order.customer_id, &lines);
            self.order_counts(&order);
        }
        for &(index, units) in &lines {
            match order.status {
                s if s.holds_stock() => self.inventory.adopt_units(index, units, 0),
                OrderStatus::Paid => self.inventory.adopt_units(index, 0, units),
                _ => {}
            }
        }
        orders.insert(
            order.order_id.clone(),
            OrderEntry {
                order: order.clone(),
                lines,
                busy: false,
            },
        );
        drop(orders);
        self.index_order(&order, None);
        Ok(true)
    }

    /// Drops finished orders created before `now_ms - order_retention` from memory (at most
    /// `limit`); returns how many left. Their sold units stay counted.
    pub fn purge_orders(&self, now_ms: i64, limit: usize) -> usize {
        let cutoff = now_ms - self.config.order_retention_ms;
        let mut dropped = 0;
        // Orders passed over (still owing the gateway) go to the back: one pass at most.
        let queued = lock(&self.finished_by_time).len();
        let mut passed = 0;
        while dropped < limit {
            let due = {
                let mut finished = lock(&self.finished_by_time);
                match finished.front() {
                    Some((created, _)) if *created < cutoff => finished.pop_front(),
                    _ => None,
                }
            };
            let Some((created, order_id)) = due else {
                break;
            };
            let mut orders = lock(&self.orders[shard_index(&order_id)]);
            // An order with a change in flight stays until the change settles (the next purge
            // finds it at the front again).
            if orders.get(&order_id).is_some_and(|e| e.busy) {
                drop(orders);
                lock(&self.finished_by_time).push_front((created, order_id));
                break;
            }
            // One that still owes the gateway a call stays until the call is journaled; it goes
            // to the back and leaves on a later pass.
            if orders
                .get(&order_id)
                .is_some_and(|e| e.order.payment_due.is_some())
            {
                drop(orders);
                lock(&self.finished_by_time).push_back((created, order_id));
                passed += 1;
                if passed >= queued {
                    break;
                }
                continue;
            }
            if let Some(entry) = orders.remove(&order_id) {
                // Past retention an order counts for its customer no more (API.md).
                if entry.order.status.counts_for_customer() {
                    self.order_stops_counting(&entry.order, &entry.lines);
                }
            }
            dropped += 1;
        }
        dropped
    }

    /// How many orders hold stock now.
    pub fn holds_len(&self) -> usize {
        lock(&self.holds_by_deadline).len()
    }

    /// How many orders are in memory.
    pub fn orders_len(&self) -> usize {
        self.orders.iter().map(|shard| lock(shard).len()).sum()
    }
}
