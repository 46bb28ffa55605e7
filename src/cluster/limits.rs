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
//! customer (`<prefix>limit:<customer>/<sku>`, a field per order, `sessions::redis::allowances`),
//! provisionally: refused there, it is `409 customer_limit_reached`, nothing held. The engine
//! tells this module of every durable order that starts counting (placed, adopted) and every one
//! that stops (released, refunded, past `--order-retention`): the first confirms the field (added
//! if absent: a limit set, or Redis emptied, while the checkout ran), the second removes it. A
//! checkout that ends without a durable order gives its units back (compare-and-delete on the
//! attempt's nonce: a late give-back never removes a retry's units); one that dies on the way
//! (`kill -9`) leaves a provisional field, which counts no more past the checkout's longest life
//! (a refill, the gateway and journal timeouts, plus a margin; by Redis's clock). Each node also counts in its engine, as one node
//! does (`engine::customers`), which never refuses what the shared count allows.
//!
//! **When Redis is down** a checkout naming a limited product is `503 session_store_unavailable`
//! (even on a MySQL journal, where other checkouts go on without Redis): no node could know what
//! the others sold. **When Redis comes back empty** (restarted without persistence), each node
//! finds its mark (`<prefix>limit-node:<node>`) gone within a second, busy or idle, and adds the
//! orders it knows count; until every node has, a customer could buy past the limit. A limit set
//! on a product that already sold is counted the same way, each node adding its orders within a
//! second. **Not covered:** the paid orders of a node gone for good (their units come back to the
//! count only while a node that knows them runs); a give-back queued while Redis is unreachable
//! when its node dies before Redis returns (the units count until `--order-retention`); a commit
//! whose outcome stays unknown past its take's provisional window (a journal stalled that long:
//! another checkout of the customer may pass meanwhile; its units count again when it lands).

use crate::app::Shared;
use crate::domain::{CustomerId, OrderId, Sku};
use crate::engine::{CountChange, Engine};
use crate::sessions::redis::{AllowanceTaken, RedisStore, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a node looks whether a product's limit changed, or its mark in Redis is gone (and
/// then adds its orders).
const LIMITS_LOOK: Duration = Duration::from_secs(1);

/// The shop's count of customers' units, as this node uses it.
pub struct SharedLimits {
    store: Arc<RedisStore>,
    ttl_ms: i64,
    /// How long a take stays provisional: a checkout's longest life.
    provisional_ms: i64,
    changes_to_send: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<CountChange>>>,
    run: u64,
    attempts: AtomicU64,
}

impl SharedLimits {
    /// The count in `store`, its hashes kept `ttl` after their last change (`--order-retention`),
    /// a take provisional for `checkout_life`; `engine` tells it of orders that start or stop
    /// counting.
    pub fn new(
        store: Arc<RedisStore>,
        ttl: Duration,
        checkout_life: Duration,
        engine: &Engine,
    ) -> Result<Arc<Self>, crate::random::RandomError> {
        let (changes, changes_to_send) = tokio::sync::mpsc::unbounded_channel();
        let mut run = [0u8; 8];
        run.copy_from_slice(&crate::random::random_bytes(8)?);
        let limits = Arc::new(Self {
            store,
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4),
            provisional_ms: i64::try_from(checkout_life.as_millis()).unwrap_or(i64::MAX / 4),
            changes_to_send: std::sync::Mutex::new(Some(changes_to_send)),
            run: u64::from_be_bytes(run),
            attempts: AtomicU64::new(0),
        });
        engine.on_count_changes(Box::new(move |change| {
            let _ = changes.send(change);
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
        // The guard first: a caller gone during the call, or a call whose answer was lost, gives
        // back what this try may have taken (compare-and-delete on its nonce).
        let mut allowance = Allowance {
            limits: Arc::clone(self),
            customer: customer.clone(),
            order: order.clone(),
            nonce,
            skus: units.iter().map(|(sku, ..)| sku.clone()).collect(),
            kept: false,
        };
        let taken = self
            .store
            .take_allowance(
                customer,
                order,
                &allowance.nonce,
                units,
                self.ttl_ms,
                self.provisional_ms,
            )
            .await?;
        Ok(match taken {
            AllowanceTaken::Over(sku) => {
                allowance.kept = true;
                Err(sku)
            }
            // Present: the order is durable and counted; nothing of this try's to give back.
            AllowanceTaken::Present => {
                allowance.kept = true;
                Ok(allowance)
            }
            AllowanceTaken::Taken => Ok(allowance),
        })
    }

    /// Sends the engine's changes to Redis in order (retried until Redis takes them), and adds
    /// the orders this node knows count at start, when its mark in Redis is gone (Redis emptied)
    /// and when a product's limit changes. Runs until the node stops.
    pub async fn run(
        self: Arc<Self>,
        app: Shared,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(mut changes) = crate::sync::lock(&self.changes_to_send).take() else {
            return;
        };
        // Every change of a limit (cleared and set again between two looks included).
        let mut limits_seen = None;
        let mut must_add = true;
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut waiting: std::collections::VecDeque<CountChange> = Default::default();
        let mut next_look = tokio::time::Instant::now();
        loop {
            let mut failed = false;
            if tokio::time::Instant::now() >= next_look {
                next_look = tokio::time::Instant::now() + LIMITS_LOOK;
                let limits_now = Some(app.engine.inventory().limits_version());
                if limits_now != limits_seen {
                    limits_seen = limits_now;
                    must_add = true;
                }
                match self.store.allowances_mark_was_gone(self.ttl_ms).await {
                    Ok(true) => must_add = true,
                    Ok(false) => {}
                    Err(_) => failed = true,
                }
            }
            if must_add && !failed {
                let orders = app.engine.orders_counting_for_limits();
                match self.store.add_allowances(&orders, self.ttl_ms).await {
                    Ok(()) => must_add = false,
                    Err(error) => {
                        tracing::warn!(%error, "could not add this node's orders to the shared count of customers' units; retrying");
                        failed = true;
                    }
                }
            }
            while let Ok(change) = changes.try_recv() {
                waiting.push_back(change);
            }
            if !failed {
                if let Err(error) = self.send(&mut waiting).await {
                    tracing::warn!(%error, changes = waiting.len(), "could not bring the shared count of customers' units up to date; retrying");
                    failed = true;
                }
            }
            let wait = match failed {
                true => backoff.next_wait(),
                false => {
                    backoff.reset();
                    next_look.saturating_duration_since(tokio::time::Instant::now())
                }
            };
            tokio::select! {
                change = changes.recv(), if !failed => match change {
                    Some(change) => waiting.push_back(change),
                    None => return,
                },
                () = tokio::time::sleep(wait) => {}
                _ = stopped.changed() => {
                    while let Ok(change) = changes.try_recv() {
                        waiting.push_back(change);
                    }
                    if let Err(error) = self.send(&mut waiting).await {
                        tracing::warn!(%error, changes = waiting.len(), "stopping: the shared count of customers' units misses changes (released orders' units count until --order-retention)");
                    }
                    return;
                }
            }
        }
    }

    /// Sends `waiting` in order, runs of one kind at a time; what was sent leaves it.
    async fn send(
        &self,
        waiting: &mut std::collections::VecDeque<CountChange>,
    ) -> Result<(), StoreError> {
        while let Some(first) = waiting.front() {
            let counts = matches!(first, CountChange::Counts(_));
            let run = waiting
                .iter()
                .take_while(|change| matches!(change, CountChange::Counts(_)) == counts)
                .count();
            let batch: Vec<CountChange> = waiting.iter().take(run).cloned().collect();
            if counts {
                let orders: Vec<_> = batch
                    .into_iter()
                    .filter_map(|change| match change {
                        CountChange::Counts(order) => Some(order),
                        CountChange::Stops(..) => None,
                    })
                    .collect();
                self.store.add_allowances(&orders, self.ttl_ms).await?;
            } else {
                let gone: Vec<_> = batch
                    .into_iter()
                    .filter_map(|change| match change {
                        CountChange::Stops(customer, order, skus) => Some((customer, order, skus)),
                        CountChange::Counts(_) => None,
                    })
                    .collect();
                self.store.forget_allowances(&gone).await?;
            }
            waiting.drain(..run);
        }
        Ok(())
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
