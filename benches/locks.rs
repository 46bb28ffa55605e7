//! Which lock for the engine's key tables: std's `Mutex`, `parking_lot`'s, or `dashmap`.
//!
//! `cargo bench --bench locks`. The pattern is the one every checkout makes on the idempotency
//! table and the order table: a new key is looked up (a miss), inserted, read back and removed,
//! under the lock of its shard (64 shards of an `FxHashMap`, as in `src/engine/idempotency.rs`),
//! against `dashmap` (its own sharding, same hasher). One operation is the four steps; the
//! two-thread case counts both threads' operations.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mimalloc::MiMalloc;
use rustc_hash::{FxBuildHasher, FxHashMap};
use std::hash::BuildHasher;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const SHARDS: usize = 64;

/// Runs `op` `iters` times on each of `threads` threads started together; returns the wall time.
fn on_threads(threads: usize, iters: u64, op: &(dyn Fn(u64) + Sync)) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let barrier = &barrier;
            scope.spawn(move || {
                barrier.wait();
                for i in 0..iters {
                    op(i * threads as u64 + t as u64);
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let started = Instant::now();
        barrier.wait();
        started.elapsed()
    })
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn shard(key: &str) -> usize {
    (FxBuildHasher.hash_one(key) as usize) % SHARDS
}

/// A key like a client's `Idempotency-Key` (about 30 bytes).
fn key(n: u64) -> String {
    format!("checkout-2026-11-26-{n:012}")
}

fn key_tables(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_table");
    let run = AtomicU64::new(0);
    for threads in [1usize, 2] {
        group.throughput(Throughput::Elements(threads as u64));

        let std_shards: Vec<std::sync::Mutex<FxHashMap<String, u64>>> =
            (0..SHARDS).map(|_| Default::default()).collect();
        group.bench_function(format!("std_mutex/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let base = run.fetch_add(1 << 40, Ordering::Relaxed);
                on_threads(threads, iters, &|i| {
                    let key = key(base + i);
                    let shard = &std_shards[shard(&key)];
                    black_box(lock(shard).get(&key).is_none());
                    lock(shard).insert(key.clone(), i);
                    black_box(lock(shard).get(&key).copied());
                    black_box(lock(shard).remove(&key));
                })
            })
        });

        let pl_shards: Vec<parking_lot::Mutex<FxHashMap<String, u64>>> =
            (0..SHARDS).map(|_| Default::default()).collect();
        group.bench_function(format!("parking_lot_mutex/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let base = run.fetch_add(1 << 40, Ordering::Relaxed);
                on_threads(threads, iters, &|i| {
                    let key = key(base + i);
                    let shard = &pl_shards[shard(&key)];
                    black_box(shard.lock().get(&key).is_none());
                    shard.lock().insert(key.clone(), i);
                    black_box(shard.lock().get(&key).copied());
                    black_box(shard.lock().remove(&key));
                })
            })
        });

        let dash: dashmap::DashMap<String, u64, FxBuildHasher> =
            dashmap::DashMap::with_hasher_and_shard_amount(FxBuildHasher, SHARDS);
        group.bench_function(format!("dashmap/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                let base = run.fetch_add(1 << 40, Ordering::Relaxed);
                on_threads(threads, iters, &|i| {
                    let key = key(base + i);
                    black_box(dash.get(&key).is_none());
                    dash.insert(key.clone(), i);
                    black_box(dash.get(&key).map(|v| *v));
                    black_box(dash.remove(&key));
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = key_tables
}
criterion_main!(benches);
