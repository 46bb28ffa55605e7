//! Carts (sessions) with idle expiry, and the submission locks of checkouts across nodes.
//!
//! [`Carts`] is what the API calls: the in-process [`CartStore`] (the embedded default; its carts
//! are lost on restart, DESIGN.md) or Redis ([`redis::RedisStore`], `--redis-url`: any node serves
//! any cart, and checkouts take a submission lock and leave their answers there for every node).
//! Both keep the same rules: idle expiry refreshed on use, at most [`CART_ITEMS_MAX`] lines per
//! cart, at most `--carts-max` live carts.

pub mod redis;

use crate::domain::{CartId, Sku};
use crate::random::{RandomError, TokenGenerator};
use crate::sync::{lock, shard_of};
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The most distinct SKUs one cart may hold: a checkout takes at most 100 lines (API.md).
pub const CART_ITEMS_MAX: usize = 100;

const SHARDS: usize = 64;

/// A cart as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartView {
    /// The cart's id.
    pub cart_id: CartId,
    /// Lines in the order they were first added.
    pub items: Vec<(Sku, i64)>,
    /// When the cart expires unless used again (Unix milliseconds).
    pub expires_at_ms: i64,
}

/// Why a cart operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CartError {
    /// No such cart, or it expired.
    #[error("no such cart")]
    NotFound,
    /// The cart already holds the most SKUs allowed.
    #[error("a cart holds at most {CART_ITEMS_MAX} different SKUs")]
    TooManyItems,
    /// The store holds the most live carts allowed (`--carts-max`).
    #[error("too many live carts ({0} at most); retry later")]
    Full(usize),
    /// The session store (Redis) failed.
    #[error(transparent)]
    Store(#[from] redis::StoreError),
}

/// The carts, wherever they live.
pub enum Carts {
    /// In this process.
    Memory(CartStore),
    /// In Redis, shared by every node.
    Redis {
        /// The connection and scripts.
        store: Arc<redis::RedisStore>,
        /// Makes cart ids (unguessable, distinct across nodes).
        ids: TokenGenerator,
        /// `--cart-ttl`.
        idle_ms: i64,
        /// `--carts-max`.
        carts_max: usize,
    },
}

impl Carts {
    /// Carts in Redis.
    pub fn redis(
        store: Arc<redis::RedisStore>,
        idle_ms: i64,
        carts_max: usize,
    ) -> Result<Self, RandomError> {
        Ok(Self::Redis {
            store,
            ids: TokenGenerator::new()?,
            idle_ms,
            carts_max,
        })
    }

    /// The Redis store, when carts live there.
    pub fn store(&self) -> Option<&Arc<redis::RedisStore>> {
        match self {
            Self::Memory(_) => None,
            Self::Redis { store, .. } => Some(store),
        }
    }

    /// How long a cart lives without use.
    pub fn idle_ms(&self) -> i64 {
        match self {
            Self::Memory(carts) => carts.idle_ms(),
            Self::Redis { idle_ms, .. } => *idle_ms,
        }
    }

    /// Carts held in this process's memory (none with Redis).
    pub fn in_memory(&self) -> usize {
        match self {
            Self::Memory(carts) => carts.len(),
            Self::Redis { .. } => 0,
        }
    }

    /// Creates an empty cart, unless `--carts-max` live carts exist.
    pub async fn create(&self, now_ms: i64) -> Result<CartView, CartError> {
        match self {
            Self::Memory(carts) => carts.create(now_ms),
            Self::Redis {
                store,
                ids,
                idle_ms,
                carts_max,
            } => {
                let cart_id = CartId::parse(ids.next("cart_"))
                    .unwrap_or_else(|e| unreachable!("token shape: {e}"));
                store
                    .create_cart(&cart_id, now_ms, *idle_ms, *carts_max)
                    .await?;
                Ok(CartView {
                    cart_id,
                    items: Vec::new(),
                    expires_at_ms: now_ms + idle_ms,
                })
            }
        }
    }

    /// A live cart (using it refreshes its expiry).
    pub async fn get(&self, id: &CartId, now_ms: i64) -> Result<CartView, CartError> {
        match self {
            Self::Memory(carts) => carts.get(id, now_ms),
            Self::Redis { store, idle_ms, .. } => store.cart(id, None, now_ms, *idle_ms).await,
        }
    }

    /// Sets the quantity of a SKU in a live cart (0 removes it).
    pub async fn set_item(
        &self,
        id: &CartId,
        sku: &Sku,
        quantity: i64,
        now_ms: i64,
    ) -> Result<CartView, CartError> {
        match self {
            Self::Memory(carts) => carts.set_item(id, sku, quantity, now_ms),
            Self::Redis { store, idle_ms, .. } => {
                store
                    .cart(id, Some((sku, quantity)), now_ms, *idle_ms)
                    .await
            }
        }
    }

    /// Empties a cart after its checkout; with Redis in the background (the answer does not wait).
    pub fn clear(&self, id: &CartId, now_ms: i64) {
        match self {
            Self::Memory(carts) => carts.clear(id, now_ms),
            Self::Redis { store, .. } => {
                let store = Arc::clone(store);
                let id = id.clone();
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        if let Err(error) = store.clear_cart(&id).await {
                            tracing::warn!(%error, cart_id = %id.as_str(), "could not empty a checked-out cart in Redis");
                        }
                    });
                }
            }
        }
    }

    /// Removes expired carts from memory (Redis expires its own); returns how many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        match self {
            Self::Memory(carts) => carts.sweep(now_ms),
            Self::Redis { .. } => 0,
        }
    }
}

struct Cart {
    items: Vec<(Sku, i64)>,
    expires_at_ms: i64,
}

/// Carts in this process's memory.
pub struct CartStore {
    shards: Box<[Mutex<FxHashMap<CartId, Cart>>]>,
    idle_ms: i64,
    /// Live carts at most: anyone may create carts at any rate, so memory needs a bound.
    carts_max: usize,
    /// Carts held now (expired ones count until swept or touched).
    count: AtomicUsize,
    ids: TokenGenerator,
}

impl CartStore {
    /// An empty store whose carts expire after `idle_ms` without use, holding `carts_max` at most.
    /// Fails only if the kernel's random source does (cart ids must be unguessable).
    pub fn new(idle_ms: i64, carts_max: usize) -> Result<Self, RandomError> {
        Ok(Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            idle_ms,
            carts_max,
            count: AtomicUsize::new(0),
            ids: TokenGenerator::new()?,
        })
    }

    /// How long a cart lives without use.
    pub fn idle_ms(&self) -> i64 {
        self.idle_ms
    }

    /// How many carts are held now.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// True if no cart is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, id: &CartId) -> &Mutex<FxHashMap<CartId, Cart>> {
        &self.shards[shard_of(id, SHARDS)]
    }

    /// Creates an empty cart, unless the store is full.
    pub fn create(&self, now_ms: i64) -> Result<CartView, CartError> {
        // Taken before the insert, so racing creators never pass the bound together.
        if self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.carts_max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(CartError::Full(self.carts_max));
        }
        let raw = self.ids.next("cart_");
        let cart_id = CartId::parse(raw).unwrap_or_else(|e| unreachable!("token shape: {e}"));
        let expires_at_ms = now_ms + self.idle_ms;
        lock(self.shard(&cart_id)).insert(
            cart_id.clone(),
            Cart {
                items: Vec::new(),
                expires_at_ms,
            },
        );
        Ok(CartView {
            cart_id,
            items: Vec::new(),
            expires_at_ms,
        })
    }

    /// Runs `change` on a live cart, refreshing its expiry; an expired cart is removed.
    fn with_cart<T>(
        &self,
        id: &CartId,
        now_ms: i64,
        change: impl FnOnce(&mut Cart) -> Result<T, CartError>,
    ) -> Result<(T, CartView), CartError> {
        let mut carts = lock(self.shard(id));
        let Some(cart) = carts.get_mut(id) else {
            return Err(CartError::NotFound);
        };
        if cart.expires_at_ms <= now_ms {
            carts.remove(id);
            self.count.fetch_sub(1, Ordering::AcqRel);
            return Err(CartError::NotFound);
        }
        let value = change(cart)?;
        cart.expires_at_ms = now_ms + self.idle_ms;
        let view = CartView {
            cart_id: id.clone(),
            items: cart.items.clone(),
            expires_at_ms: cart.expires_at_ms,
        };
        Ok((value, view))
    }

    /// Sets the quantity of a SKU (0 removes it).
    pub fn set_item(
        &self,
        id: &CartId,
        sku: &Sku,
        quantity: i64,
        now_ms: i64,
    ) -> Result<CartView, CartError> {
        self.with_cart(id, now_ms, |cart| {
            let position = cart.items.iter().position(|(s, _)| s == sku);
            match (position, quantity) {
                (Some(i), 0) => {
                    cart.items.remove(i);
                }
                (Some(i), q) => cart.items[i].1 = q,
                (None, 0) => {}
                (None, _) if cart.items.len() >= CART_ITEMS_MAX => {
                    return Err(CartError::TooManyItems)
                }
                (None, q) => cart.items.push((sku.clone(), q)),
            }
            Ok(())
        })
        .map(|((), view)| view)
    }

    /// A live cart (using it refreshes its expiry).
    pub fn get(&self, id: &CartId, now_ms: i64) -> Result<CartView, CartError> {
        self.with_cart(id, now_ms, |_| Ok(()))
            .map(|((), view)| view)
    }

    /// Empties a cart (after it was checked out).
    pub fn clear(&self, id: &CartId, now_ms: i64) {
        let _ = self.with_cart(id, now_ms, |cart| {
            cart.items.clear();
            Ok(())
        });
    }

    /// Removes expired carts; returns how many.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut carts = lock(shard);
            let before = carts.len();
            carts.retain(|_, cart| cart.expires_at_ms > now_ms);
            let gone = before - carts.len();
            self.count.fetch_sub(gone, Ordering::AcqRel);
            removed += gone;
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carts_expire_when_idle_and_use_refreshes_them() {
        let store = CartStore::new(1_000, 10).unwrap();
        let cart = store.create(0).unwrap();
        let sku = Sku::parse("a").unwrap();
        let view = store.set_item(&cart.cart_id, &sku, 2, 500).unwrap();
        assert_eq!(view.items, vec![(sku.clone(), 2)]);
        assert_eq!(view.expires_at_ms, 1_500);
        assert!(store.get(&cart.cart_id, 1_400).is_ok());
        assert_eq!(store.get(&cart.cart_id, 2_400), Err(CartError::NotFound));
        let other = store.create(0).unwrap();
        assert_eq!(store.sweep(5_000), 1);
        assert_eq!(store.get(&other.cart_id, 5_000), Err(CartError::NotFound));
    }

    #[test]
    fn live_carts_are_capped_and_expired_ones_make_room() {
        let store = CartStore::new(1_000, 3).unwrap();
        for _ in 0..3 {
            store.create(0).unwrap();
        }
        assert_eq!(store.create(0), Err(CartError::Full(3)));
        assert_eq!(store.sweep(1_000), 3);
        assert_eq!(store.len(), 0);
        assert!(store.create(1_000).is_ok());
    }

    #[test]
    fn zero_removes_and_the_size_is_bounded() {
        let store = CartStore::new(60_000, 10).unwrap();
        let cart = store.create(0).unwrap();
        let sku = Sku::parse("a").unwrap();
        store.set_item(&cart.cart_id, &sku, 2, 0).unwrap();
        let view = store.set_item(&cart.cart_id, &sku, 0, 0).unwrap();
        assert!(view.items.is_empty());
        for i in 0..CART_ITEMS_MAX {
            let sku = Sku::parse(format!("s{i}")).unwrap();
            store.set_item(&cart.cart_id, &sku, 1, 0).unwrap();
        }
        let extra = Sku::parse("extra").unwrap();
        assert_eq!(
            store.set_item(&cart.cart_id, &extra, 1, 0),
            Err(CartError::TooManyItems)
        );
    }
}
