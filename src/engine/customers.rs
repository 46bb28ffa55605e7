//! Units per customer and SKU, for `max_per_customer` (API.md, "Per-customer limit").
//!
//! For every (SKU, customer) the engine counts the units of the customer's checkouts that hold or
//! bought that SKU: a reservation in flight, an order `reserved`, `payment_pending` or `paid`. A
//! release (a checkout that ended before its order, a declined or timed-out payment, a cancel, an
//! expired hold, an aborted append) or a refund gives the units back, and an order that leaves
//! memory (past `--order-retention`) stops counting, so a customer's count is exactly the units of
//! the orders this node still knows, plus its reservations in flight.
//!
//! Every SKU is counted, limited or not, so setting or changing a limit needs no recount and is
//! exact from its first checkout. A reservation checks and counts its units in one step under the
//! (SKU, customer) pair's shard lock, **before** it takes any stock: a customer at the limit is
//! refused without ever holding a unit another buyer could have had. The count lives beside the
//! stock shards in the engine and follows the same two-step rule as everything else (decide now,
//! apply after the commit): it is counted at the reservation (the one provisional state, like the
//! hold) and given back by `abort` as the hold is. At start it is rebuilt from the journal's
//! orders, as the stock counters are.
//!
//! Cost: one lock of one of 64 shards and one hash-map update per line of a checkout that holds
//! units; a refusal of a sold-out SKU never gets here (its one atomic load comes first).

use super::inventory::SkuIndex;
use crate::domain::CustomerId;
use crate::sync::lock;
use rustc_hash::FxHashMap;
use std::sync::Mutex;

/// Shards of the map: contention stays low when many customers buy at once.
const SHARDS: usize = 64;

type Shard = FxHashMap<(SkuIndex, CustomerId), i64>;

/// The units each customer holds or bought, per SKU.
pub struct CustomerUnits {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for CustomerUnits {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl CustomerUnits {
    fn shard(&self, index: SkuIndex, customer: &CustomerId) -> &Mutex<Shard> {
        &self.shards[crate::sync::shard_of(&(index, customer), SHARDS)]
    }

    /// Counts `lines` (one per SKU) for `customer` if none takes a SKU past its limit
    /// (`limit_of`); otherwise counts nothing and names the first SKU that would pass it.
    pub fn take(
        &self,
        customer: &CustomerId,
        lines: &[(SkuIndex, i64)],
        limit_of: impl Fn(SkuIndex) -> Option<u32>,
    ) -> Result<(), SkuIndex> {
        for (taken, &(index, units)) in lines.iter().enumerate() {
            let limit = limit_of(index);
            let mut shard = lock(self.shard(index, customer));
            let key = (index, customer.clone());
            let held = shard.get(&key).copied().unwrap_or(0);
            if limit.is_some_and(|limit| held + units > i64::from(limit)) {
                drop(shard);
                self.give(customer, &lines[..taken]);
                return Err(index);
            }
            *shard.entry(key).or_insert(0) += units;
        }
        Ok(())
    }

    /// Counts `lines` for `customer` whatever the limits (an order rebuilt or adopted: it was
    /// placed when it was allowed).
    pub fn add(&self, customer: &CustomerId, lines: &[(SkuIndex, i64)]) {
        for &(index, units) in lines {
            *lock(self.shard(index, customer))
                .entry((index, customer.clone()))
                .or_insert(0) += units;
        }
    }

    /// Gives `lines` back: the customer holds or bought them no more.
    pub fn give(&self, customer: &CustomerId, lines: &[(SkuIndex, i64)]) {
        for &(index, units) in lines {
            let mut shard = lock(self.shard(index, customer));
            let key = (index, customer.clone());
            if let Some(held) = shard.get_mut(&key) {
                *held -= units;
                if *held <= 0 {
                    shard.remove(&key);
                }
            }
        }
    }

    /// The units `customer` holds or bought of SKU `index`.
    pub fn units(&self, index: SkuIndex, customer: &CustomerId) -> i64 {
        lock(self.shard(index, customer))
            .get(&(index, customer.clone()))
            .copied()
            .unwrap_or(0)
    }

    /// How many (SKU, customer) pairs are counted.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    /// True when nothing is counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(name: &str) -> CustomerId {
        CustomerId::parse(name).expect("customer")
    }

    #[test]
    fn a_limit_refuses_the_unit_past_it_and_counts_nothing_of_a_refused_checkout() {
        let units = CustomerUnits::default();
        let (a, b) = (SkuIndex::for_tests(0), SkuIndex::for_tests(1));
        let limits = |index: SkuIndex| (index == a).then_some(2);
        let alice = customer("alice");
        assert_eq!(units.take(&alice, &[(b, 5), (a, 2)], limits), Ok(()));
        assert_eq!(units.take(&alice, &[(b, 1), (a, 1)], limits), Err(a));
        assert_eq!((units.units(a, &alice), units.units(b, &alice)), (2, 5));
        // Another customer has a count of its own.
        assert_eq!(units.take(&customer("bob"), &[(a, 2)], limits), Ok(()));
        units.give(&alice, &[(a, 1)]);
        assert_eq!(units.take(&alice, &[(a, 1)], limits), Ok(()));
        assert_eq!(units.take(&alice, &[(a, 1)], limits), Err(a));
        units.give(&alice, &[(a, 2), (b, 5)]);
        units.give(&customer("bob"), &[(a, 2)]);
        assert!(units.is_empty(), "a pair at 0 leaves the map");
    }

    #[test]
    fn fifty_threads_of_one_customer_take_exactly_the_limit() {
        let units = std::sync::Arc::new(CustomerUnits::default());
        let sku = SkuIndex::for_tests(3);
        let taken = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..50 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if units.take(&customer("c"), &[(sku, 1)], |_| Some(7)).is_ok() {
                            taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.into_inner(), 7);
        assert_eq!(units.units(sku, &customer("c")), 7);
    }
}
