//! `max_per_customer` with several nodes: one count of each customer's units per limited product
//! for the whole shop, in Redis.
//!
//! **Why Redis.** Every checkout of several nodes already makes its Redis round trip (the key's
//! lock), Redis answers in well under a millisecond, and one Lua script checks and takes every
//! limited line of a checkout atomically (a customer's hashes share a Redis Cluster slot). MySQL
//! would make each limited checkout a row-locking transaction on the database every node shares;
//! leases of allowance (each node given part of each customer's limit) would refuse a customer on
//! one node while another node holds their unused share.
//!
//! **The mechanism.** A checkout naming a product with a limit, once it holds its key's lock and
//! before this node's key table or any unit, takes its units in the product's hash for its
//! customer (`<prefix>limit:<customer>/<sku>`, a field per order, `sessions::redis::allowances`):
//! refused there, it is `409 customer_limit_reached`, nothing held. A checkout that ends without a
//! durable order gives them back (compare-and-delete on the attempt's nonce: a late give-back never
//! removes a retry's units); a durable order keeps them while it counts, and the engine tells this
//! module when it stops counting (released, refunded, past `--order-retention`: the field goes).
//! Each node also counts in its engine, as one node does (`engine::customers`), which never
//! refuses what the shared count allows.
//!
//! **When Redis is down** a checkout naming a limited product is `503 session_store_unavailable`
//! (even on a MySQL journal, where other checkouts go on without Redis): no node could know what
//! the others sold. **When Redis comes back empty** (restarted without persistence), each node
//! adds the orders it knows that count, at every reconnection and at start; until every node has
//! (milliseconds after it reconnects), a customer could buy past the limit. A limit set on a
//! product that already sold is counted the same way, each node adding its orders within a second.

use crate::app::Shared;
use crate::domain::{CustomerId, OrderId, Sku};
use crate::engine::Engine;
use crate::sessions::redis::{AllowanceTaken, RedisStore, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a node looks whether a product's limit changed (and then adds its orders).
const LIMITS_LOOK: Duration = Duration::from_secs(1);

/// An order that counts no more: its customer, its id, its limited SKUs.
type Gone = (CustomerId, OrderId, Vec<Sku>);

/// The shop's count of customers' units, as this node uses it.
pub struct SharedLimits {
    store: Arc<RedisStore>,
    ttl_ms: i64,
    gone_to_send: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Gone>>>,
    run: u64,
    attempts: AtomicU64,
}

impl SharedLimits {
    /// The count in `store`, its hashes kept `ttl` after their last change (`--order-retention`);
    /// `engine` tells it of orders that count no more.
    pub fn new(
        store: Arc<RedisStore>,
        ttl: Duration,
        engine: &Engine,
    ) -> Result<Arc<Self>, crate::random::RandomError> {
        let (gone, gone_to_send) = tokio::sync::mpsc::unbounded_channel();
        let mut run = [0u8; 8];
        run.copy_from_slice(&crate::random::random_bytes(8)?);
        let limits = Arc::new(Self {
            store,
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4),
            gone_to_send: std::sync::Mutex::new(Some(gone_to_send)),
            run: u64::from_be_bytes(run),
            attempts: AtomicU64::new(0),
        });
        engine.on_units_given_back(Box::new(move |customer, order, skus| {
            let _ = gone.send((customer.clone(), order.clone(), skus));
        }));
        Ok(limits)
    }

    /// Takes `units` (SKU, units, limit) of `customer` for `order`: the claim, given back when
    /// dropped unless kept, or the SKU that would go past its limit.
    pub async fn take(
        self: &Arc<Self>,
        customer: &CustomerId,
        order: &OrderId,
        units: &[(Sku, i64, u32)],
    ) -> Result<Result<Allowance, Sku>, StoreError> {
        let nonce = format!(
            "{:x}.{:x}",
            self.run,
            self.attempts.fetch_add(1, Ordering::Relaxed)
        );
        let taken = self
            .store
            .take_allowance(customer, order, &nonce, units, self.ttl_ms)
            .await?;
        Ok(match taken {
            AllowanceTaken::Over(sku) => Err(sku),
            // Taken now: given back unless kept. Present: an earlier try of this checkout (its
            // key, so its order id) took them, and gives them back or keeps them itself.
            taken => Ok(Allowance {
                limits: Arc::clone(self),
                customer: customer.clone(),
                order: order.clone(),
                nonce,
                skus: units.iter().map(|(sku, ..)| sku.clone()).collect(),
                kept: taken == AllowanceTaken::Present,
            }),
        })
    }

    /// Gives back what orders that count no more took, as the engine tells of them (retried
    /// until Redis takes them); and adds the orders this node knows count, at start, at every
    /// reconnection to Redis, and when a product's limit changes. Runs until the node stops.
    pub async fn run(
        self: Arc<Self>,
        app: Shared,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(mut gone) = crate::sync::lock(&self.gone_to_send).take() else {
            return;
        };
        let mut limits_seen = Vec::new();
        let mut must_add = true;
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut waiting: Vec<Gone> = Vec::new();
        loop {
            let reconnected = self.store.reconnection();
            tokio::pin!(reconnected);
            reconnected.as_mut().enable();
            let limits_now = app.engine.limits_per_customer();
            if limits_now != limits_seen {
                limits_seen = limits_now;
                must_add = true;
            }
            let mut failed = false;
            if must_add {
                let orders = app.engine.orders_counting_for_limits();
                match self.store.add_allowances(&orders, self.ttl_ms).await {
                    Ok(()) => must_add = false,
                    Err(error) => {
                        tracing::warn!(%error, "could not add this node's orders to the shared count of customers' units; retrying");
                        failed = true;
                    }
                }
            }
            while let Ok(one) = gone.try_recv() {
                waiting.push(one);
            }
            if !waiting.is_empty() {
                match self.store.forget_allowances(&waiting).await {
                    Ok(()) => waiting.clear(),
                    Err(error) => {
                        tracing::warn!(%error, orders = waiting.len(), "could not give back released orders' units in the shared count of customers' units; retrying");
                        failed = true;
                    }
                }
            }
            let wait = match failed {
                true => backoff.next_wait(),
                false => {
                    backoff.reset();
                    LIMITS_LOOK
                }
            };
            tokio::select! {
                () = &mut reconnected => must_add = true,
                one = gone.recv(), if !failed => match one {
                    Some(one) => waiting.push(one),
                    None => return,
                },
                () = tokio::time::sleep(wait) => {}
                _ = stopped.changed() => {
                    while let Ok(one) = gone.try_recv() {
                        waiting.push(one);
                    }
                    if !waiting.is_empty() {
                        if let Err(error) = self.store.forget_allowances(&waiting).await {
                            tracing::warn!(%error, orders = waiting.len(), "stopping: released orders' units stay in the shared count of customers' units until they expire (--order-retention)");
                        }
                    }
                    return;
                }
            }
        }
    }
}

/// Units a checkout took in the shared count: given back when dropped unless kept (its order is
/// durable, or its outcome unknown).
pub struct Allowance {
    limits: Arc<SharedLimits>,
    customer: CustomerId,
    order: OrderId,
    nonce: String,
    skus: Vec<Sku>,
    kept: bool,
}

impl Allowance {
    /// The units stay taken: the order counts (the engine tells when it stops).
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Allowance {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (limits, customer, order, nonce, skus) = (
            Arc::clone(&self.limits),
            self.customer.clone(),
            self.order.clone(),
            std::mem::take(&mut self.nonce),
            std::mem::take(&mut self.skus),
        );
        runtime.spawn(async move {
            let mut backoff =
                crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
            for _ in 0..10 {
                match limits
                    .store
                    .release_allowance(&customer, &order, &nonce, &skus)
                    .await
                {
                    Ok(()) => return,
                    Err(_) => tokio::time::sleep(backoff.next_wait()).await,
                }
            }
            tracing::warn!(%order, "could not give back a refused checkout's units in the shared count of customers' units; they count until it expires (--order-retention)");
        });
    }
}
