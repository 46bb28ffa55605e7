//! Small helpers for the few locks outside the hot path.

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
