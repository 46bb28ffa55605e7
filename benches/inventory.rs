//! The hot path of the inventory: reservations and rejections, per operation.
//!
//! `cargo bench --bench inventory`. Throughput is in operations per second (a reserve+release
//! pair counts as one operation); the two-thread case counts both threads' operations.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mimalloc::MiMalloc;
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};
use turnstile::domain::{Quantity, Sku};
use turnstile::engine::inventory::{Inventory, SkuIndex};
use turnstile::engine::records::Product;
use turnstile::engine::{Engine, EngineConfig};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn sku(name: &str) -> Sku {
    Sku::parse(name).expect("bench sku")
}

/// Runs `op` `iters` times on each of `threads` threads started together; returns the wall time.
fn on_threads(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                barrier.wait();
                for _ in 0..iters {
                    op();
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

fn hot_sku(c: &mut Criterion) {
    let mut group = c.benchmark_group("inventory");
    let inventory = Inventory::new(2);
    let hot = inventory.add(&sku("hot"), 1 << 30, 0, 0);
    for threads in [1usize, 2] {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(format!("reserve_release_hot_sku/{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, &|| {
                    let hold = inventory.reserve_one(black_box(hot), 1);
                    if let Ok(hold) = hold {
                        inventory.release(hold);
                    }
                })
            })
        });
    }

    group.throughput(Throughput::Elements(1));
    let sold_out = inventory.add(&sku("gone"), 0, 0, 0);
    group.bench_function("reject_sold_out/1_thread", |b| {
        b.iter(|| black_box(inventory.reserve_one(black_box(sold_out), 1).is_err()))
    });
    group.throughput(Throughput::Elements(2));
    group.bench_function("reject_sold_out/2_threads", |b| {
        b.iter_custom(|iters| {
            on_threads(2, iters, &|| {
                black_box(inventory.reserve_one(black_box(sold_out), 1).is_err());
            })
        })
    });

    group.throughput(Throughput::Elements(1));
    let uniform = Inventory::new(2);
    let indices: Vec<SkuIndex> = (0..10_000)
        .map(|i| uniform.add(&sku(&format!("sku-{i}")), 1 << 20, 0, 0))
        .collect();
    let mut next = 0usize;
    group.bench_function("reserve_release_uniform_10000_skus/1_thread", |b| {
        b.iter(|| {
            // A multiplicative step visits the SKUs in a cache-unfriendly order, as real traffic does.
            next = (next + 7_919) % indices.len();
            if let Ok(hold) = uniform.reserve_one(indices[next], 1) {
                uniform.release(hold);
            }
        })
    });
    group.finish();
}

fn engine_paths(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    let engine = Engine::new(EngineConfig {
        shard_count: 2,
        ..EngineConfig::default()
    });
    let product = |name: &str, stock: i64| Product {
        sku: sku(name),
        name: name.to_owned(),
        price_cents: turnstile::domain::Cents::parse(999).expect("price"),
        currency: turnstile::domain::Currency::parse("EUR").expect("currency"),
        stock: turnstile::domain::Stock::parse(stock).expect("stock"),
        max_per_customer: None,
        admission_rate: None,
    };
    let customer = turnstile::domain::CustomerId::parse("bench").expect("customer");
    // The records are not journaled: the benchmark isolates the engine's own cost.
    for (name, stock) in [("gone", 0), ("hot", 1 << 30)] {
        let change = engine
            .prepare_product(product(name, stock))
            .expect("product");
        engine.apply(change);
    }
    let gone = [(sku("gone"), Quantity::parse(1).expect("quantity"))];
    group.bench_function("reject_sold_out_by_sku", |b| {
        b.iter(|| black_box(engine.reserve(black_box(&gone), &customer).is_err()))
    });
    let hot = [(sku("hot"), Quantity::parse(1).expect("quantity"))];
    group.bench_function("reserve_priced_release_by_sku", |b| {
        b.iter_batched(
            || (),
            |()| {
                if let Ok(reservation) = engine.reserve(black_box(&hot), &customer) {
                    engine.release_reservation(reservation);
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, hot_sku, engine_paths);
criterion_main!(benches);
