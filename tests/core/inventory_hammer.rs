//! Many threads on the lock-free inventory at once: afterwards every counter equals what the threads
//! tallied themselves, `available + reserved + sold == stock` holds per SKU, and a reader running
//! beside them never got a view that broke it.

use crate::common::{seed, sku, Rng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use turnstile::engine::inventory::{Hold, Inventory, SkuIndex, StockView};

const THREADS: usize = 8;

/// Reads views of `skus` until `stop`, asserting each one; returns how many it read.
fn watch(
    inventory: &Inventory,
    skus: &[SkuIndex],
    stock: &[i64],
    stop: &AtomicBool,
    rng_seed: u64,
) -> u64 {
    let mut rng = Rng::new(rng_seed);
    let mut last_sold = vec![0i64; skus.len()];
    let mut views = 0u64;
    while !stop.load(Ordering::Acquire) {
        let i = rng.below(skus.len() as u64) as usize;
        let view = inventory.view(skus[i]);
        assert_eq!(view.stock, stock[i], "stock changed under the reader");
        assert!(
            view.available >= 0 && view.reserved >= 0 && view.sold >= 0,
            "negative counter seen: {view:?}"
        );
        assert_eq!(
            view.available + view.reserved + view.sold,
            view.stock,
            "{view:?}"
        );
        // Nothing is refunded in these tests, so sold units only grow.
        assert!(view.sold >= last_sold[i], "sold went back: {view:?}");
        last_sold[i] = view.sold;
        views += 1;
    }
    views
}

#[test]
fn hot_sku_counters_equal_the_threads_tallies() {
    let seed = seed("hot_sku_counters_equal_the_threads_tallies");
    let inventory = Arc::new(Inventory::new(4));
    let stock = 300_000;
    let a = inventory.add(&sku("hot"), stock, 0, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let reader = {
        let (inventory, stop) = (Arc::clone(&inventory), Arc::clone(&stop));
        std::thread::spawn(move || watch(&inventory, &[a], &[stock], &stop, seed))
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (inventory, barrier) = (Arc::clone(&inventory), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9ABC));
                let mut holds: Vec<Hold> = Vec::new();
                let (mut sold, mut rejected) = (0i64, 0u64);
                barrier.wait();
                for _ in 0..150_000 {
                    match rng.below(4) {
                        0 | 1 if holds.len() < 16 => {
                            let units = 1 + rng.below(3) as i64;
                            match inventory.reserve_one(a, units) {
                                Ok(hold) => holds.push(hold),
                                Err(_) => rejected += 1,
                            }
                        }
                        2 if !holds.is_empty() => {
                            let i = rng.below(holds.len() as u64) as usize;
                            inventory.release(holds.swap_remove(i));
                        }
                        _ if !holds.is_empty() => {
                            let i = rng.below(holds.len() as u64) as usize;
                            let hold = holds.swap_remove(i);
                            sold += hold.lines()[0].1;
                            inventory.commit(hold);
                        }
                        _ => {}
                    }
                }
                (holds, sold, rejected)
            })
        })
        .collect();
    barrier.wait();
    let mut outstanding = Vec::new();
    let (mut sold, mut rejected) = (0i64, 0u64);
    for worker in workers {
        let (holds, s, r) = worker.join().expect("worker panicked");
        outstanding.extend(holds);
        sold += s;
        rejected += r;
    }
    stop.store(true, Ordering::Release);
    let views = reader.join().expect("reader panicked");
    let reserved: i64 = outstanding.iter().map(|h| h.lines()[0].1).sum();
    assert_eq!(
        inventory.view(a),
        StockView {
            stock,
            available: stock - reserved - sold,
            reserved,
            sold
        }
    );
    eprintln!("sold {sold}, still held {reserved}, rejected {rejected}, reader saw {views} views");
    assert!(
        rejected > 0,
        "the test should have sold the SKU out at some point"
    );
    for hold in outstanding {
        inventory.release(hold);
    }
    assert_eq!(
        inventory.view(a),
        StockView {
            stock,
            available: stock - sold,
            reserved: 0,
            sold
        }
    );
}

#[test]
fn exactly_as_many_buyers_as_units_are_admitted() {
    let inventory = Arc::new(Inventory::new(4));
    let units = 1_000;
    let a = inventory.add(&sku("flash"), units, 0, 0);
    let barrier = Arc::new(Barrier::new(THREADS));
    let admitted = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (inventory, barrier, admitted) = (
                Arc::clone(&inventory),
                Arc::clone(&barrier),
                Arc::clone(&admitted),
            );
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..2_000 {
                    if let Ok(hold) = inventory.reserve_one(a, 1) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        inventory.commit(hold);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker panicked");
    }
    assert_eq!(admitted.load(Ordering::Relaxed), units as u64);
    assert!(inventory.is_sold_out(a));
    assert_eq!(
        inventory.view(a),
        StockView {
            stock: units,
            available: 0,
            reserved: 0,
            sold: units
        }
    );
}

#[test]
fn many_skus_and_baskets_counters_equal_the_tallies() {
    let seed = seed("many_skus_and_baskets_counters_equal_the_tallies");
    const SKUS: usize = 1_000;
    let inventory = Arc::new(Inventory::new(4));
    let mut rng = Rng::new(seed);
    let stock: Vec<i64> = (0..SKUS).map(|_| rng.below(60) as i64).collect();
    let indices: Vec<SkuIndex> = (0..SKUS)
        .map(|i| inventory.add(&sku(&format!("sku-{i}")), stock[i], 0, 0))
        .collect();
    let index_of = |index: SkuIndex| indices.iter().position(|&i| i == index).expect("known");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (inventory, stop, indices, stock) = (
            Arc::clone(&inventory),
            Arc::clone(&stop),
            indices.clone(),
            stock.clone(),
        );
        std::thread::spawn(move || watch(&inventory, &indices, &stock, &stop, seed ^ 7))
    };
    let barrier = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (inventory, barrier, indices) = (
                Arc::clone(&inventory),
                Arc::clone(&barrier),
                indices.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (t as u64 + 11).wrapping_mul(0x9E37_79B9));
                let mut holds: Vec<Hold> = Vec::new();
                let mut sold: Vec<(SkuIndex, i64)> = Vec::new();
                let mut all_or_nothing_failures = 0u64;
                barrier.wait();
                for _ in 0..40_000 {
                    match rng.below(4) {
                        0 | 1 if holds.len() < 8 => {
                            let lines: Vec<(SkuIndex, i64)> = (0..1 + rng.below(5))
                                .map(|_| {
                                    // A narrow range of SKUs makes baskets collide, and repeats
                                    // within a basket happen.
                                    let i = rng.below(50) as usize * 20 % indices.len();
                                    (indices[i], 1 + rng.below(3) as i64)
                                })
                                .collect();
                            match inventory.reserve(&lines) {
                                Ok(hold) => {
                                    let asked: i64 = lines.iter().map(|l| l.1).sum();
                                    let held: i64 = hold.lines().iter().map(|l| l.1).sum();
                                    assert_eq!(asked, held, "a basket was held in part");
                                    holds.push(hold);
                                }
                                Err(_) => all_or_nothing_failures += 1,
                            }
                        }
                        2 if !holds.is_empty() => {
                            let i = rng.below(holds.len() as u64) as usize;
                            inventory.release(holds.swap_remove(i));
                        }
                        _ if !holds.is_empty() => {
                            let i = rng.below(holds.len() as u64) as usize;
                            let hold = holds.swap_remove(i);
                            sold.extend_from_slice(hold.lines());
                            inventory.commit(hold);
                        }
                        _ => {}
                    }
                }
                (holds, sold, all_or_nothing_failures)
            })
        })
        .collect();
    let mut reserved = vec![0i64; SKUS];
    let mut sold = vec![0i64; SKUS];
    let mut failures = 0;
    for worker in workers {
        let (holds, s, f) = worker.join().expect("worker panicked");
        for hold in &holds {
            for &(index, units) in hold.lines() {
                reserved[index_of(index)] += units;
            }
        }
        for (index, units) in s {
            sold[index_of(index)] += units;
        }
        failures += f;
        // The holds stay in place: the final check counts them as reserved.
        drop(holds);
    }
    stop.store(true, Ordering::Release);
    let views = reader.join().expect("reader panicked");
    for i in 0..SKUS {
        assert_eq!(
            inventory.view(indices[i]),
            StockView {
                stock: stock[i],
                available: stock[i] - reserved[i] - sold[i],
                reserved: reserved[i],
                sold: sold[i]
            },
            "sku-{i}"
        );
    }
    eprintln!("refused baskets {failures}, reader saw {views} views");
}

#[test]
fn as_many_units_asked_as_there_are_are_all_admitted() {
    // Proves: a reservation is never refused while units remain for it. Attempts for exactly
    // the units there are (one and two units at a time), over threads whose home shards drain at different rates (so
    // they steal, taking a victim's surplus into their hand for a moment): every attempt must be
    // admitted, since at every moment the units left are at least the attempts left. A refusal
    // here is a buyer told "sold out" while a unit was in another thread's hand.
    for round in 0..50 {
        let inventory = Arc::new(Inventory::new(4));
        let per_thread = 250u64;
        let units = (THREADS as u64 * per_thread) as i64;
        let a = inventory.add(&sku("fair"), units, 0, 0);
        let barrier = Arc::new(Barrier::new(THREADS));
        let refused = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (inventory, barrier, refused) = (
                    Arc::clone(&inventory),
                    Arc::clone(&barrier),
                    Arc::clone(&refused),
                );
                std::thread::spawn(move || {
                    // Every buyer at home on shard 0 or 1: shards 2 and 3 are only ever stolen
                    // from.
                    turnstile::engine::inventory::set_home_shard(thread % 2);
                    // Even threads buy two units at a time, odd ones one: the same units each.
                    let quantity = 2 - (thread % 2) as i64;
                    barrier.wait();
                    for _ in 0..per_thread / quantity as u64 {
                        match inventory.reserve_one(a, quantity) {
                            Ok(hold) => inventory.commit(hold),
                            Err(_) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker panicked");
        }
        assert_eq!(
            refused.load(Ordering::Relaxed),
            0,
            "round {round}: buyers refused while units remained: {:?}",
            inventory.view(a)
        );
        assert_eq!(inventory.view(a).sold, units);
    }
}
