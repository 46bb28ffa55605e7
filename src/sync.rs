//! Small helpers for the locks and threads: `lock` (std's `Mutex`, poison ignored), `shard_of`, and
//! `lower_this_threads_priority` for background threads.
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
//! journal's queue lock also numbers records in commit order (LSNs, event seqs), which a lock-free
//! queue alone cannot do, and the stock counters are plain atomics (`engine::inventory`).

use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard};

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
