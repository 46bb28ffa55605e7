//! Hot stock counters: per SKU, the units split across per-core shards, moved with atomics only.
//!
//! Every shard is one cache line holding three counters (`available`, `reserved`, `sold`). A
//! reservation takes units from the caller's own shard with one compare-and-swap and counts them as
//! reserved in the same shard, so threads on different cores never write the same line. A shard that
//! runs dry steals units from the others. When a read-only scan finds no unit anywhere the SKU is
//! flagged sold out, and from then on a rejection is one relaxed load of a line nobody writes.
//!
//! A steal takes half of a victim's units and puts the surplus into its own shard a moment later;
//! meanwhile those units are in no shard. They are counted in the SKU's `in_hand` counter before
//! they leave a shard and until they land, and a reservation that finds too few units in the shards
//! waits while `in_hand` covers the rest (a holder never waits, so this cannot deadlock). So a
//! buyer is never told "sold out", nor the flag set, while units exist.
//!
//! Per shard the counters may go negative (a unit reserved on one shard can be released on another);
//! only the sums are meaningful, and [`Inventory::view`] returns sums that satisfy
//! `available + reserved + sold == stock` with none negative, retrying until its scan is consistent.
//!
//! No Mutex or RwLock is taken on the reserve, release or commit paths. The SKU index is split
//! into parts, each an [`ArcSwap`] of an immutable map that is copied and replaced (under a
//! writer-only mutex) when a product is added: lookups are lock-free, and adding a SKU copies only
//! its part (1/64 of the index), so creating 10,000 products stays cheap.

use crate::domain::Sku;
use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The most shards one SKU is split into: more cores than this share shards.
pub const SHARDS_MAX: usize = 64;

/// How many times a reservation retries its collection of units from all shards when racing
/// threads keep moving them, before it answers "short". Each failed round means another thread made
/// progress, so this bound is reached only under pathological contention.
const COLLECT_ROUNDS_MAX: usize = 64;

/// One core's part of a SKU's stock, alone on its cache line (128 bytes: adjacent-line prefetch on
/// x86 pulls pairs of 64-byte lines).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    /// Units that can be reserved from this shard.
    available: AtomicI64,
    /// Units reserved through this shard, minus units released or committed through it.
    reserved: AtomicI64,
    /// Units committed (sold) through this shard, minus units refunded through it.
    sold: AtomicI64,
}

/// A flag alone on its cache line, so the sold-out check never shares a line with a counter.
#[repr(align(128))]
#[derive(Default)]
struct PaddedFlag(AtomicBool);

/// A counter alone on its cache line (written only on the slow path).
#[repr(align(128))]
#[derive(Default)]
struct PaddedCounter(AtomicI64);

/// The stock of one SKU.
pub struct SkuStock {
    /// Read by every request for this SKU, written only when it sells out or units come back.
    sold_out: PaddedFlag,
    /// Units the shop owns: changed only by [`Inventory::set_stock`] and [`Inventory::retire`], which
    /// callers serialise per SKU.
    stock: AtomicI64,
    /// The per-core counters.
    shards: Box<[Shard]>,
    /// Units a collection has taken (or is about to take) out of shards and not yet put back into
    /// one or handed to its reservation: a steal's surplus on its way to the thief's home shard,
    /// or a failed collection's units on their way back. A reservation that finds too few units in
    /// the shards counts these too, and waits for them instead of answering "sold out" while they
    /// are in flight.
    in_hand: PaddedCounter,
    /// The answer a refusal of this SKU gets, rendered once by the caller on first use
    /// ([`Inventory::refusal`]).
    refusal: OnceLock<&'static [u8]>,
    /// The product's `max_per_customer` (0: none), read by every reservation of the SKU
    /// (`engine::customers`).
    max_per_customer: AtomicU32,
    /// The product's `admission_rate` (0: no waiting room), read by every checkout naming the SKU
    /// (`app::waiting_room`).
    admission_rate: AtomicU32,
}

/// A product's limits, as the checkout path reads them per line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// The most units one customer may hold or have bought.
    pub max_per_customer: Option<u32>,
    /// Buyers per second let through its waiting room.
    pub admission_rate: Option<u32>,
}

/// A consistent reading of one SKU's counters: `available + reserved + sold == stock`, none negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockView {
    /// Units the shop owns.
    pub stock: i64,
    /// Units that can still be reserved.
    pub available: i64,
    /// Units held by unfinished orders.
    pub reserved: i64,
    /// Units paid for.
    pub sold: i64,
}

/// A position in the inventory's append-only SKU table; valid for the inventory that issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SkuIndex(u32);

impl SkuIndex {
    /// An index made up by a unit test.
    #[cfg(test)]
    pub(crate) fn for_tests(index: u32) -> Self {
        Self(index)
    }
}

/// Units held by one reservation, per SKU. Give it back with [`Inventory::release`], turn it into
/// sold units with [`Inventory::commit`]. Dropping it without either leaks the units (on purpose a
/// plain value: holds live inside orders, which carry their own state).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a hold keeps units reserved until it is released or committed"]
pub struct Hold {
    lines: Vec<(SkuIndex, i64)>,
}

impl Hold {
    /// The SKUs and units held, one line per SKU, in the order the request first named them.
    pub fn lines(&self) -> &[(SkuIndex, i64)] {
        &self.lines
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// This SKU (the first short one in request order) has fewer units available than asked.
    #[error("out of stock")]
    OutOfStock {
        /// The SKU that was short.
        index: SkuIndex,
    },
}

/// Why a stock change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SetStockError {
    /// The new stock would be below the units already held or sold.
    #[error("stock {requested} is below the {committed} units reserved or sold")]
    BelowCommitted {
        /// The stock asked for.
        requested: i64,
        /// Units reserved plus sold when the change was refused.
        committed: i64,
    },
}

/// Gives the calling thread home shard `index` (modulo the shard count): a per-core worker takes
/// its own number, so each worker reserves from a shard no other worker's home. (The thread's slot
/// number, `sync::set_thread_slot`: the same number picks its copy of the metrics.)
pub fn set_home_shard(index: usize) {
    crate::sync::set_thread_slot(index);
}

/// The calling thread's home shard: its slot number (given out round robin to threads that were
/// given none), modulo the shard count.
#[inline]
fn home_shard(shard_count: usize) -> usize {
    crate::sync::thread_slot() % shard_count
}

impl SkuStock {
    /// Sets the limits; whether `max_per_customer` changed.
    fn set_limits(&self, limits: Limits) -> bool {
        self.admission_rate
            .store(limits.admission_rate.unwrap_or(0), Ordering::Release);
        let limit = limits.max_per_customer.unwrap_or(0);
        self.max_per_customer.swap(limit, Ordering::AcqRel) != limit
    }

    fn new(shard_count: usize, stock: i64) -> Self {
        let shards: Box<[Shard]> = (0..shard_count).map(|_| Shard::default()).collect();
        // Spread the initial units evenly so every core starts with a local supply.
        let per_shard = stock / shard_count as i64;
        let remainder = stock % shard_count as i64;
        for (i, shard) in shards.iter().enumerate() {
            let extra = i64::from((i as i64) < remainder);
            shard.available.store(per_shard + extra, Ordering::Relaxed);
        }
        let sku = Self {
            sold_out: PaddedFlag::default(),
            stock: AtomicI64::new(stock),
            shards,
            in_hand: PaddedCounter::default(),
            refusal: OnceLock::new(),
            max_per_customer: AtomicU32::new(0),
            admission_rate: AtomicU32::new(0),
        };
        sku.sold_out.0.store(stock == 0, Ordering::SeqCst);
        sku
    }

    /// Takes up to `want` units from one shard; returns how many it took.
    fn take_from(shard: &Shard, want: i64) -> i64 {
        let mut current = shard.available.load(Ordering::Acquire);
        loop {
            let take = current.min(want);
            if take <= 0 {
                return 0;
            }
            match shard.available.compare_exchange_weak(
                current,
                current - take,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return take,
                Err(actual) => current = actual,
            }
        }
    }

    /// Adds units back to a shard's available count and clears the sold-out flag. The order (add
    /// first, then clear) pairs with [`Self::mark_sold_out`]'s re-check so the flag never stays set
    /// while units are available.
    fn give_back(&self, shard: usize, units: i64) {
        if units == 0 {
            return;
        }
        self.shards[shard]
            .available
            .fetch_add(units, Ordering::AcqRel);
        if self.sold_out.0.load(Ordering::SeqCst) {
            self.sold_out.0.store(false, Ordering::SeqCst);
        }
    }

    fn available_sum(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.available.load(Ordering::Acquire))
            .sum()
    }

    /// Units in the shards plus units in a collection's hand: never fewer than the units that are
    /// really there (a unit leaves a shard only after it is counted in hand, and leaves the hand
    /// only after it is back in a shard or reserved).
    fn units_anywhere(&self) -> (i64, i64) {
        let in_shards = self.available_sum();
        (in_shards, self.in_hand.0.load(Ordering::SeqCst))
    }

    /// Sets the sold-out flag after a scan found nothing, then scans again: a unit given back
    /// between the first scan and the flag would otherwise be hidden behind the flag.
    fn mark_sold_out(&self) {
        self.sold_out.0.store(true, Ordering::SeqCst);
        let (in_shards, in_hand) = self.units_anywhere();
        if in_shards + in_hand > 0 {
            self.sold_out.0.store(false, Ordering::SeqCst);
        }
    }

    /// Takes up to `want` units from `shard` into the hand: counted in hand first, so a scan never
    /// misses them. Returns how many it took.
    fn take_into_hand(&self, shard: &Shard, want: i64) -> i64 {
        self.in_hand.0.fetch_add(want, Ordering::SeqCst);
        let got = Self::take_from(shard, want);
        if got < want {
            self.in_hand.0.fetch_sub(want - got, Ordering::SeqCst);
        }
        got
    }

    /// Takes `units` from the shards into the caller's hand, home shard first. Returns false (and
    /// puts everything it took back) if they cannot be collected: when the shards and every other
    /// collection's hand hold fewer than `units`, or (only under pathological contention) after
    /// [`COLLECT_ROUNDS_MAX`] rounds of racing threads moving units.
    fn collect(&self, home: usize, units: i64) -> bool {
        let shard_count = self.shards.len();
        let mut rounds = 0;
        let mut waits: u32 = 0;
        while rounds < COLLECT_ROUNDS_MAX {
            let (in_shards, in_hand) = self.units_anywhere();
            if in_shards < units {
                if in_shards + in_hand < units {
                    if in_shards + in_hand <= 0 {
                        self.mark_sold_out();
                    }
                    return false;
                }
                // Enough units exist, but some are in another collection's hand for a moment (it
                // holds them for a few instructions and never waits while holding): wait for them
                // to land rather than answer "sold out" while they do.
                waits = waits.saturating_add(1);
                if waits < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            rounds += 1;
            let mut taken = self.take_into_hand(&self.shards[home], units);
            let mut offset = 1;
            while taken < units && offset < shard_count {
                let victim = &self.shards[(home + offset) % shard_count];
                // Steal half of what the victim has (at least what is missing), so the home shard
                // gets a local supply for the next reservations instead of stealing every time.
                let victim_available = victim.available.load(Ordering::Acquire);
                let want = (units - taken).max(victim_available / 2);
                taken += self.take_into_hand(victim, want);
                offset += 1;
            }
            if taken >= units {
                // The surplus goes home before it leaves the hand; the rest is the reservation's.
                self.give_back(home, taken - units);
                self.in_hand.0.fetch_sub(taken, Ordering::SeqCst);
                return true;
            }
            // Racing threads moved units while this one scanned: put back and look again.
            self.give_back(home, taken);
            self.in_hand.0.fetch_sub(taken, Ordering::SeqCst);
        }
        false
    }

    /// Reserves `units` (> 0) on the caller's shard.
    fn reserve(&self, home: usize, units: i64) -> bool {
        if self.sold_out.0.load(Ordering::Relaxed) {
            return false;
        }
        let shard = &self.shards[home];
        let mut current = shard.available.load(Ordering::Acquire);
        // Fast path: the home shard has enough. Retry while it still has (threads sharing a shard
        // race here); go to the slow path only when it runs short.
        let mut taken = false;
        while current >= units {
            match shard.available.compare_exchange_weak(
                current,
                current - units,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    taken = true;
                    break;
                }
                Err(actual) => current = actual,
            }
        }
        if !taken && !self.collect(home, units) {
            return false;
        }
        shard.reserved.fetch_add(units, Ordering::AcqRel);
        true
    }

    fn release(&self, home: usize, units: i64) {
        self.shards[home]
            .reserved
            .fetch_sub(units, Ordering::AcqRel);
        self.give_back(home, units);
    }

    fn commit(&self, home: usize, units: i64) {
        let shard = &self.shards[home];
        shard.reserved.fetch_sub(units, Ordering::AcqRel);
        shard.sold.fetch_add(units, Ordering::AcqRel);
    }

    fn refund(&self, home: usize, units: i64) {
        self.shards[home].sold.fetch_sub(units, Ordering::AcqRel);
        self.give_back(home, units);
    }

    /// One scan of all counters; `None` if it was torn by concurrent writers.
    fn try_view(&self) -> Option<StockView> {
        let stock_before = self.stock.load(Ordering::Acquire);
        let (mut available, mut reserved, mut sold) = (0i64, 0i64, 0i64);
        for shard in self.shards.iter() {
            reserved += shard.reserved.load(Ordering::Acquire);
            sold += shard.sold.load(Ordering::Acquire);
            available += shard.available.load(Ordering::Acquire);
        }
        let stock = self.stock.load(Ordering::Acquire);
        let consistent = stock == stock_before
            && available >= 0
            && reserved >= 0
            && sold >= 0
            && available + reserved + sold == stock;
        consistent.then_some(StockView {
            stock,
            available,
            reserved,
            sold,
        })
    }

    fn view(&self) -> StockView {
        let mut attempt: u32 = 0;
        loop {
            if let Some(view) = self.try_view() {
                return view;
            }
            attempt = attempt.saturating_add(1);
            if attempt < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Lock-free reads, append-only: a table of SKU stocks in segments that never move once allocated.
/// Segment `k` holds `SEGMENT_BASE << k` entries, so 26 segments hold over 2^32 entries.
struct StockTable {
    segments: [AtomicPtr<SkuStock>; TABLE_SEGMENTS],
    /// Entries published so far; an index below it points at an initialised entry.
    len: AtomicUsize,
}

const SEGMENT_BASE: usize = 64;
const TABLE_SEGMENTS: usize = 26;

fn segment_of(index: usize) -> (usize, usize, usize) {
    // Entries 0..64 are segment 0, 64..192 segment 1, 192..448 segment 2, ...
    let scaled = index / SEGMENT_BASE + 1;
    let segment = (usize::BITS - 1 - scaled.leading_zeros()) as usize;
    let segment_start = SEGMENT_BASE * ((1 << segment) - 1);
    (segment, index - segment_start, SEGMENT_BASE << segment)
}

impl StockTable {
    fn new() -> Self {
        Self {
            segments: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            len: AtomicUsize::new(0),
        }
    }

    fn get(&self, index: SkuIndex) -> &SkuStock {
        let index = index.0 as usize;
        assert!(
            index < self.len.load(Ordering::Acquire),
            "SKU index from another inventory"
        );
        let (segment, offset, _) = segment_of(index);
        let base = self.segments[segment].load(Ordering::Acquire);
        // SAFETY: `index < len`, and `push` allocated this segment and wrote this entry before it
        // published `len` with Release; entries are never moved or freed before `self` is dropped.
        unsafe { &*base.add(offset) }
    }

    /// Appends an entry. Callers serialise pushes (the inventory's writer mutex).
    fn push(&self, stock: SkuStock) -> SkuIndex {
        let index = self.len.load(Ordering::Acquire);
        assert!(index < u32::MAX as usize, "too many SKUs");
        let (segment, offset, size) = segment_of(index);
        let mut base = self.segments[segment].load(Ordering::Acquire);
        if base.is_null() {
            let mut storage: Vec<std::mem::MaybeUninit<SkuStock>> = Vec::with_capacity(size);
            // SAFETY: MaybeUninit needs no initialisation.
            unsafe { storage.set_len(size) };
            base = Box::into_raw(storage.into_boxed_slice()) as *mut SkuStock;
            self.segments[segment].store(base, Ordering::Release);
        }
        // SAFETY: the segment has `size > offset` slots, this slot is not yet published, and pushes
        // are serialised, so nobody else reads or writes it.
        unsafe { base.add(offset).write(stock) };
        self.len.store(index + 1, Ordering::Release);
        SkuIndex(index as u32)
    }
}

impl Drop for StockTable {
    fn drop(&mut self) {
        let len = *self.len.get_mut();
        for index in 0..len {
            let (segment, offset, _) = segment_of(index);
            let base = *self.segments[segment].get_mut();
            // SAFETY: every index below len was written once and is dropped once here.
            unsafe { std::ptr::drop_in_place(base.add(offset)) };
        }
        for (segment, pointer) in self.segments.iter_mut().enumerate() {
            let base = *pointer.get_mut();
            if !base.is_null() {
                let size = SEGMENT_BASE << segment;
                // SAFETY: allocated in `push` as a boxed slice of `size` MaybeUninit<SkuStock>.
                drop(unsafe {
                    Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                        base as *mut std::mem::MaybeUninit<SkuStock>,
                        size,
                    ))
                });
            }
        }
    }
}

// SAFETY: the table hands out shared references to `SkuStock`, which is Sync (atomics only); the raw
// pointers are only dereferenced as described in `get` and `push`.
unsafe impl Send for StockTable {}
unsafe impl Sync for StockTable {}

/// Parts of the SKU index, each replaced as a whole when a SKU is added to it.
const INDEX_PARTS: usize = 64;

/// All SKUs' stock. Cheap to share behind an `Arc`.
pub struct Inventory {
    shard_count: usize,
    table: StockTable,
    index: Box<[ArcSwap<FxHashMap<Sku, SkuIndex>>]>,
    /// Serialises additions of SKUs (never taken on the reserve path).
    add_lock: Mutex<()>,
    /// Moves on at every change of a SKU's `max_per_customer` (several nodes then count the
    /// orders they know again: `cluster::limits`).
    limits_version: std::sync::atomic::AtomicU64,
}

impl Inventory {
    /// An empty inventory whose SKUs are split into `shard_count` shards (clamped to 1..=64; use the
    /// number of cores that serve requests).
    pub fn new(shard_count: usize) -> Self {
        Self {
            shard_count: shard_count.clamp(1, SHARDS_MAX),
            table: StockTable::new(),
            index: (0..INDEX_PARTS)
                .map(|_| ArcSwap::from_pointee(FxHashMap::default()))
                .collect(),
            add_lock: Mutex::new(()),
            limits_version: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The number of shards per SKU.
    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    fn index_part(&self, sku: &Sku) -> &ArcSwap<FxHashMap<Sku, SkuIndex>> {
        &self.index[crate::sync::shard_of(sku, INDEX_PARTS)]
    }

    /// Finds a SKU. Lock-free.
    #[inline]
    pub fn lookup(&self, sku: &Sku) -> Option<SkuIndex> {
        self.index_part(sku).load().get(sku).copied()
    }

    /// Adds a SKU with `stock` units, all available (or with `reserved`/`sold` units already taken,
    /// when rebuilding from the journal). Returns the existing index if the SKU is already known,
    /// unchanged.
    pub fn add(&self, sku: &Sku, stock: i64, reserved: i64, sold: i64) -> SkuIndex {
        self.add_limited(sku, stock, reserved, sold, Limits::default())
    }

    /// [`Self::add`], with the SKU's limits set before any reservation can see it.
    pub fn add_limited(
        &self,
        sku: &Sku,
        stock: i64,
        reserved: i64,
        sold: i64,
        limits: Limits,
    ) -> SkuIndex {
        let _writer = crate::sync::lock(&self.add_lock);
        if let Some(existing) = self.lookup(sku) {
            return existing;
        }
        assert!(
            reserved >= 0 && sold >= 0 && reserved + sold <= stock,
            "rebuilt stock of {sku} breaks the identity: stock {stock}, reserved {reserved}, sold {sold}"
        );
        let entry = SkuStock::new(self.shard_count, stock - reserved - sold);
        if entry.set_limits(limits) {
            self.limits_version.fetch_add(1, Ordering::AcqRel);
        }
        entry.stock.store(stock, Ordering::Release);
        entry.shards[0].reserved.store(reserved, Ordering::Release);
        entry.shards[0].sold.store(sold, Ordering::Release);
        let index = self.table.push(entry);
        let part = self.index_part(sku);
        let mut map = FxHashMap::clone(&part.load());
        map.insert(sku.clone(), index);
        part.store(Arc::new(map));
        index
    }

    /// How many SKUs are known.
    pub fn len(&self) -> usize {
        self.table.len.load(Ordering::Acquire)
    }

    /// True before the first SKU is added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the SKU's limits.
    pub fn set_limits(&self, index: SkuIndex, limits: Limits) {
        if self.table.get(index).set_limits(limits) {
            self.limits_version.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Moves on at every change of a SKU's `max_per_customer`.
    pub fn limits_version(&self) -> u64 {
        self.limits_version.load(Ordering::Acquire)
    }

    /// The SKU's waiting room's rate, buyers per second (`None`: no waiting room).
    #[inline]
    pub fn admission_rate(&self, index: SkuIndex) -> Option<u32> {
        match self.table.get(index).admission_rate.load(Ordering::Acquire) {
            0 => None,
            rate => Some(rate),
        }
    }

    /// The SKU's limit of units per customer (`None`: no limit).
    #[inline]
    pub fn max_per_customer(&self, index: SkuIndex) -> Option<u32> {
        match self
            .table
            .get(index)
            .max_per_customer
            .load(Ordering::Acquire)
        {
            0 => None,
            limit => Some(limit),
        }
    }

    /// True if the SKU was flagged sold out (a cache: it clears when units come back).
    #[inline]
    pub fn is_sold_out(&self, index: SkuIndex) -> bool {
        self.table.get(index).sold_out.0.load(Ordering::Relaxed)
    }

    /// The answer a refusal of this SKU gets: `render`ed on first use, then the same bytes for
    /// every refusal (a flood of them copies and allocates nothing). Kept for the life of the
    /// process, one per SKU the table ever held, as the table's own slots are.
    pub fn refusal(&self, index: SkuIndex, render: impl FnOnce() -> String) -> &'static [u8] {
        self.table
            .get(index)
            .refusal
            .get_or_init(|| Box::leak(render().into_bytes().into_boxed_slice()))
    }

    /// Reserves units of one SKU; the rejection of a sold-out SKU touches no shared line.
    #[inline]
    pub fn reserve_one(&self, index: SkuIndex, units: i64) -> Result<Hold, ReserveError> {
        debug_assert!(units > 0);
        let home = home_shard(self.shard_count);
        if self.table.get(index).reserve(home, units) {
            Ok(Hold {
                lines: vec![(index, units)],
            })
        } else {
            Err(ReserveError::OutOfStock { index })
        }
    }

    /// Reserves every line or none. Lines naming one SKU count together; the error names the first
    /// short SKU in the order the lines first name them.
    pub fn reserve(&self, lines: &[(SkuIndex, i64)]) -> Result<Hold, ReserveError> {
        let mut merged: Vec<(SkuIndex, i64)> = Vec::with_capacity(lines.len());
        for &(index, units) in lines {
            debug_assert!(units > 0);
            match merged.iter_mut().find(|(seen, _)| *seen == index) {
                Some((_, total)) => *total += units,
                None => merged.push((index, units)),
            }
        }
        let home = home_shard(self.shard_count);
        for (taken, &(index, units)) in merged.iter().enumerate() {
            if !self.table.get(index).reserve(home, units) {
                for &(done_index, done_units) in &merged[..taken] {
                    self.table.get(done_index).release(home, done_units);
                }
                return Err(ReserveError::OutOfStock { index });
            }
        }
        Ok(Hold { lines: merged })
    }

    /// Gives the held units back: they become available again.
    pub fn release(&self, hold: Hold) {
        let home = home_shard(self.shard_count);
        for (index, units) in hold.lines {
            self.table.get(index).release(home, units);
        }
    }

    /// Turns the held units into sold units.
    pub fn commit(&self, hold: Hold) {
        let home = home_shard(self.shard_count);
        for (index, units) in hold.lines {
            self.table.get(index).commit(home, units);
        }
    }

    /// Takes held units out of the stock for good (a lowered stock whose change is durable: the
    /// units it held are no longer the shop's).
    pub fn retire(&self, hold: Hold) {
        let home = home_shard(self.shard_count);
        for (index, units) in hold.lines {
            let entry = self.table.get(index);
            // Readers retry a view whose stock changed while they summed, so the two steps look
            // like one.
            entry.stock.fetch_sub(units, Ordering::AcqRel);
            entry.shards[home]
                .reserved
                .fetch_sub(units, Ordering::AcqRel);
        }
    }

    /// Moves sold units back to available (a refund).
    pub fn refund(&self, lines: &[(SkuIndex, i64)]) {
        let home = home_shard(self.shard_count);
        for &(index, units) in lines {
            self.table.get(index).refund(home, units);
        }
    }

    /// Rebuilds a hold for units that are already counted as reserved (an order read back from the
    /// journal, or one whose lines the caller kept).
    pub fn hold_of(&self, lines: Vec<(SkuIndex, i64)>) -> Hold {
        Hold { lines }
    }

    /// Changes the units the shop owns. Callers serialise changes per SKU. Raising adds available
    /// units; lowering takes available units away and is refused if fewer are available than the
    /// decrease (the held and sold units are not the shop's to take back).
    pub fn set_stock(&self, index: SkuIndex, stock: i64) -> Result<StockView, SetStockError> {
        let entry = self.table.get(index);
        let home = home_shard(self.shard_count);
        let current = entry.stock.load(Ordering::Acquire);
        if stock > current {
            entry.stock.fetch_add(stock - current, Ordering::AcqRel);
            entry.give_back(home, stock - current);
        } else if stock < current {
            let decrease = current - stock;
            if !entry.collect(home, decrease) {
                let view = entry.view();
                return Err(SetStockError::BelowCommitted {
                    requested: stock,
                    committed: view.reserved + view.sold,
                });
            }
            entry.stock.fetch_sub(decrease, Ordering::AcqRel);
        }
        Ok(entry.view())
    }

    /// Adds `units` to a SKU's stock, available at once (a stock lease's block, taken from the
    /// pool several nodes share). Callers serialise changes per SKU.
    pub fn grow(&self, index: SkuIndex, units: i64) {
        if units <= 0 {
            return;
        }
        let entry = self.table.get(index);
        entry.stock.fetch_add(units, Ordering::AcqRel);
        entry.give_back(home_shard(self.shard_count), units);
    }

    /// Adds units already held (`reserved`) and sold to a SKU's stock: an adopted order's, with
    /// the lease units that come with it (several nodes). Nothing becomes available. Callers
    /// serialise changes per SKU.
    pub fn adopt_units(&self, index: SkuIndex, reserved: i64, sold: i64) {
        let entry = self.table.get(index);
        let home = home_shard(self.shard_count);
        // Readers retry a view whose stock changed while they summed.
        entry.shards[home]
            .reserved
            .fetch_add(reserved, Ordering::AcqRel);
        entry.shards[home].sold.fetch_add(sold, Ordering::AcqRel);
        entry.stock.fetch_add(reserved + sold, Ordering::AcqRel);
    }

    /// A consistent reading of one SKU's counters.
    pub fn view(&self, index: SkuIndex) -> StockView {
        self.table.get(index).view()
    }

    /// One scan that may be torn by concurrent writers (`None` then); tests use it to show that a
    /// reader retrying it never returns a broken view.
    pub fn try_view(&self, index: SkuIndex) -> Option<StockView> {
        self.table.get(index).try_view()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku(name: &str) -> Sku {
        Sku::parse(name).unwrap()
    }

    #[test]
    fn units_in_a_collections_hand_are_not_sold_out() {
        // A steal's surplus is out of every shard for a moment: a reservation that looks then
        // must neither mark the SKU sold out nor give up, but take the units once they land.
        let stock = SkuStock::new(2, 4);
        let mut held = 0;
        for shard in stock.shards.iter() {
            held += stock.take_into_hand(shard, 2);
        }
        assert_eq!((held, stock.available_sum()), (4, 0));
        stock.mark_sold_out();
        assert!(
            !stock.sold_out.0.load(Ordering::SeqCst),
            "units in hand are not sold out"
        );
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| stock.collect(0, 3));
            // The collection lands: 3 units go home to shard 1, 1 is kept (reserved elsewhere).
            stock.give_back(1, 3);
            stock.in_hand.0.fetch_sub(held, Ordering::SeqCst);
            assert!(
                waiting.join().expect("collect"),
                "the waiting reservation got its units"
            );
        });
        assert_eq!(stock.available_sum(), 0);
        assert_eq!(stock.in_hand.0.load(Ordering::SeqCst), 0);
        // With nothing anywhere, the same reservation is refused and the SKU is sold out.
        assert!(!stock.collect(0, 1));
        assert!(stock.sold_out.0.load(Ordering::SeqCst));
    }

    #[test]
    fn segments_cover_indices_without_gaps() {
        let mut expected_start = 0;
        for segment in 0..6 {
            let size = SEGMENT_BASE << segment;
            assert_eq!(segment_of(expected_start), (segment, 0, size));
            assert_eq!(
                segment_of(expected_start + size - 1),
                (segment, size - 1, size)
            );
            expected_start += size;
        }
    }

    #[test]
    fn reserve_release_commit_keep_the_identity() {
        let inventory = Inventory::new(4);
        let a = inventory.add(&sku("a"), 10, 0, 0);
        let hold = inventory.reserve(&[(a, 3), (a, 2)]).unwrap();
        assert_eq!(hold.lines(), &[(a, 5)]);
        assert_eq!(
            inventory.view(a),
            StockView {
                stock: 10,
                available: 5,
                reserved: 5,
                sold: 0
            }
        );
        inventory.commit(hold);
        assert_eq!(inventory.view(a).sold, 5);
        let rest = inventory.reserve_one(a, 5).unwrap();
        assert!(inventory.reserve_one(a, 1).is_err());
        assert!(inventory.is_sold_out(a));
        inventory.release(rest);
        assert!(!inventory.is_sold_out(a));
        assert_eq!(inventory.view(a).available, 5);
    }

    #[test]
    fn multi_item_reservation_is_all_or_nothing() {
        let inventory = Inventory::new(2);
        let a = inventory.add(&sku("a"), 5, 0, 0);
        let b = inventory.add(&sku("b"), 1, 0, 0);
        let err = inventory.reserve(&[(a, 3), (b, 2)]).unwrap_err();
        assert_eq!(err, ReserveError::OutOfStock { index: b });
        assert_eq!(inventory.view(a).available, 5);
        assert_eq!(inventory.view(b).available, 1);
    }

    #[test]
    fn stock_cannot_drop_below_committed_units() {
        let inventory = Inventory::new(3);
        let a = inventory.add(&sku("a"), 10, 0, 0);
        let hold = inventory.reserve_one(a, 6).unwrap();
        assert_eq!(
            inventory.set_stock(a, 5),
            Err(SetStockError::BelowCommitted {
                requested: 5,
                committed: 6
            })
        );
        assert_eq!(inventory.set_stock(a, 6).unwrap().available, 0);
        assert!(inventory.reserve_one(a, 1).is_err());
        assert_eq!(inventory.set_stock(a, 8).unwrap().available, 2);
        inventory.commit(hold);
        assert_eq!(
            inventory.view(a),
            StockView {
                stock: 8,
                available: 2,
                reserved: 0,
                sold: 6
            }
        );
    }

    #[test]
    fn many_skus_are_found_again() {
        let inventory = Inventory::new(2);
        let indices: Vec<SkuIndex> = (0..5_000)
            .map(|i| inventory.add(&sku(&format!("s{i}")), i, 0, 0))
            .collect();
        for (i, index) in indices.iter().enumerate() {
            assert_eq!(inventory.lookup(&sku(&format!("s{i}"))), Some(*index));
            assert_eq!(inventory.view(*index).stock, i as i64);
        }
        assert_eq!(inventory.lookup(&sku("missing")), None);
        assert_eq!(inventory.len(), 5_000);
    }

    #[test]
    fn stealing_finds_units_on_other_shards() {
        let inventory = Inventory::new(8);
        let a = inventory.add(&sku("a"), 8, 0, 0);
        // One shard holds one unit; a single thread must still reserve all eight.
        let hold = inventory.reserve_one(a, 8).unwrap();
        assert_eq!(inventory.view(a).reserved, 8);
        inventory.release(hold);
        assert_eq!(inventory.view(a).available, 8);
    }
}
