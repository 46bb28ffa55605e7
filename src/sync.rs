//! Small helpers for the locks and threads: `lock` (std's `Mutex`, poison ignored), `shard_of`,
//! `lower_this_threads_priority` for background threads, and the per-core slots: each thread has a
//! slot number ([`thread_slot`]; a per-core worker is given its own with [`set_thread_slot`],
//! other threads take the next one round robin), which picks its home stock shard
//! (`engine::inventory`) and the copy of every metric it writes ([`PerCore`]), so that a request
//! writes no cache line another core writes.
//!
//! Which lock, measured (`cargo bench --bench locks`, the pattern of the key tables: a new key
//! looked up, inserted, read back and removed under its shard's lock, 64 shards of an `FxHashMap`;
//! 2-core VM, 2026-11-26): std's futex-based `Mutex` 97.8 ns per operation on one thread and
//! 13.4 M ops/s on two; `parking_lot::Mutex` 93.7 ns and 13.8 M ops/s (4% and 3% faster);
//! `dashmap` 115.9 ns and 12.5 M ops/s (slower: it hashes the key once for the shard and again in
//! it). A checkout takes a handful of these locks against ~15–30 µs of server CPU per request, so
//! `parking_lot`'s 1 ns per lock is below what any HTTP figure can show, and std's `Mutex` stays:
//! one dependency fewer, and the sharded `FxHashMap`s are the better map (they already are what
//! `dashmap` is, with one hash per operation). `crossbeam`'s queues are not used either: the
//! journal's append queues are one `Mutex<Vec>` per core, which only the core's own appenders and
//! the writer's take touch, and the writer numbers records (LSNs, event seqs) as it takes them
//! (`journal::pipeline`); the stock counters are plain atomics (`engine::inventory`).

use std::cell::Cell;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

thread_local! {
    /// This thread's slot number (`usize::MAX`: not given yet).
    static THREAD_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

static NEXT_THREAD_SLOT: AtomicUsize = AtomicUsize::new(0);

/// Gives the calling thread slot `index`: a per-core worker takes its own number, so no two
/// workers share a stock shard or a metrics slot.
pub fn set_thread_slot(index: usize) {
    THREAD_SLOT.with(|slot| slot.set(index));
}

/// The calling thread's slot number, given out round robin on first use so that threads spread
/// evenly (callers take it modulo their number of slots).
#[inline]
pub fn thread_slot() -> usize {
    THREAD_SLOT.with(|slot| {
        let mut value = slot.get();
        if value == usize::MAX {
            value = NEXT_THREAD_SLOT.fetch_add(1, Ordering::Relaxed);
            slot.set(value);
        }
        value
    })
}

/// How many slots a [`PerCore`] value has: the CPUs this process may use (at least 1, at most
/// 64), fixed at first use.
fn slot_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 64)
    })
}

/// A value aligned to its own cache lines (128 bytes: two lines, as the adjacent-line prefetcher
/// pulls pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// One copy of `T` per slot, each on cache lines of its own: a thread writes the copy of its slot
/// ([`PerCore::local`]), a reader sums them all ([`PerCore::iter`]).
#[derive(Debug)]
pub struct PerCore<T> {
    slots: Box<[Padded<T>]>,
}

impl<T> PerCore<T> {
    /// One copy per slot, each made by `make`.
    pub fn new_with(make: impl Fn() -> T) -> Self {
        Self {
            slots: (0..slot_count()).map(|_| Padded(make())).collect(),
        }
    }

    /// The calling thread's copy.
    #[inline]
    pub fn local(&self) -> &T {
        &self.slots[self.local_index()].0
    }

    /// The index of the calling thread's copy (its place in [`Self::iter`]).
    #[inline]
    pub fn local_index(&self) -> usize {
        thread_slot() % self.slots.len()
    }

    /// Every copy.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|slot| &slot.0)
    }
}

impl<T: Default> Default for PerCore<T> {
    fn default() -> Self {
        Self::new_with(T::default)
    }
}

/// Locks a mutex, ignoring poison. Every update made under this crate's locks is a single insert,
/// remove or field change, so a panic elsewhere cannot leave the value half-changed and the poison
/// flag carries no information.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which of `shards` independently locked parts `key` belongs to.
pub(crate) fn shard_of<K: Hash + ?Sized>(key: &K, shards: usize) -> usize {
    (rustc_hash::FxBuildHasher.hash_one(key) as usize) % shards
}

/// Lowers the calling thread's CPU priority to `nice` (0 normal, 19 lowest): for background work
/// (snapshots, the RabbitMQ relay) that should take only what the request handlers leave, instead
/// of stretching their latency tail.
pub(crate) fn lower_this_threads_priority(nice: i32) {
    // SAFETY: setpriority has no memory-safety preconditions; on Linux, `who == 0` with
    // PRIO_PROCESS names the calling thread only. Failure just leaves the priority as it was.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if result != 0 {
        tracing::debug!(nice, "could not lower this thread's priority");
    }
}
