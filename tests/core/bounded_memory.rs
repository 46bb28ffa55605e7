//! Memory stays bounded however many orders pass: with short retentions, the engine's maps (orders,
//! kept answers), the events held in memory and the snapshot stop growing after ~50,000 orders,
//! while every event within `--event-retention` stays readable from disk and older ones answer
//! `Pruned`.

use crate::common::{durably, new_order, product, sku};
use std::sync::atomic::{AtomicI64, Ordering};
use turnstile::domain::IdempotencyKey;
use turnstile::engine::idempotency::Begin;
use turnstile::engine::order::PaymentDue;
use turnstile::engine::{Applied, Engine, EngineConfig, PaymentOutcome};
use turnstile::journal::file::{FileJournal, FileJournalConfig};
use turnstile::journal::JournalError;

/// The test's clock: the engine and the journal measure retention by it, and it moves only when
/// the test says so.
static CLOCK_MS: AtomicI64 = AtomicI64::new(1_800_000_000_000);

fn clock() -> i64 {
    CLOCK_MS.load(Ordering::SeqCst)
}

const ROUNDS: usize = 10;
const ORDERS_PER_ROUND: usize = 5_000;
const THREADS: usize = 8;
/// One round is one second of the test's clock; retentions are counted in rounds.
const ROUND_MS: i64 = 1_000;
const EVENTS_IN_MEMORY_MAX: usize = 4_096;

fn place(engine: &Engine, journal: &FileJournal, n: u64) {
    let key = IdempotencyKey::parse(format!("key-{n}")).expect("key");
    assert_eq!(
        engine.idempotency().begin(&key, "fp", clock()),
        Ok(Begin::Started)
    );
    let outcome = PaymentOutcome::Authorized {
        payment_id: format!("pay-{n}"),
    };
    let change = new_order(engine, "p", 1, outcome, Some(&key), clock());
    let Applied::Order { order, .. } = durably(engine, journal, change).expect("durable") else {
        panic!("not an order");
    };
    // The capture it owes, done and journaled (as the server's settler does): an order that
    // still owes the gateway stays in memory whatever its age.
    let Some(captured) = engine.prepare_payments(
        &[(order.order_id.clone(), Some(PaymentDue::Capture), None)],
        clock(),
    ) else {
        panic!("a paid order owes its capture");
    };
    durably(engine, journal, captured).expect("durable");
}

fn snapshot_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("data dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

#[test]
fn memory_and_snapshots_stop_growing_and_old_events_are_read_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal_config = FileJournalConfig {
        segment_bytes_max: 512 << 10,
        // Only the test's own checkpoint at the end of each round (after the purges): a
        // background one in the middle of a round would hold a round more of orders, and the
        // sizes compared would depend on when it ran.
        checkpoint_segments: usize::MAX,
        events_in_memory_max: EVENTS_IN_MEMORY_MAX,
        event_retention_ms: 4 * ROUND_MS,
        order_retention_ms: 2 * ROUND_MS,
        answer_retention_ms: 2 * ROUND_MS,
        clock,
        ..FileJournalConfig::default()
    };
    let (journal, state) = FileJournal::open_dir(dir.path(), journal_config.clone()).expect("open");
    let engine = Engine::from_state(
        EngineConfig {
            shard_count: 2,
            order_retention_ms: 2 * ROUND_MS,
            answer_retention_ms: 2 * ROUND_MS,
            order_id_prefix: "ord_b".into(),
            ..EngineConfig::default()
        },
        &state,
    )
    .expect("engine");
    let change = engine
        .prepare_product(product("p", 100, 1_000_000_000))
        .expect("product");
    durably(&engine, &journal, change).expect("durable");

    let mut sizes = Vec::new();
    let per_thread = ORDERS_PER_ROUND / THREADS;
    for round in 0..ROUNDS {
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (engine, journal) = (&engine, &journal);
                scope.spawn(move || {
                    for i in 0..per_thread {
                        let n = round * ORDERS_PER_ROUND + thread * per_thread + i;
                        place(engine, journal, n as u64);
                    }
                });
            }
        });
        CLOCK_MS.fetch_add(ROUND_MS, Ordering::SeqCst);
        let now = clock();
        engine.purge_orders(now, usize::MAX);
        engine.idempotency().purge_expired(now);
        journal.checkpoint_now().expect("checkpoint");
        sizes.push((
            engine.orders_len(),
            engine.idempotency().len(),
            journal.events_in_memory(),
            snapshot_bytes(dir.path()),
        ));
    }
    eprintln!("per round (orders, keys, events in memory, snapshot bytes): {sizes:?}");
    let placed = ROUNDS * ORDERS_PER_ROUND;
    assert_eq!(
        engine.product(&sku("p")).expect("product").1.sold,
        placed as i64,
        "pruned orders stay sold"
    );
    // From the third round on, retention holds the maps at about two rounds of orders.
    let steady = &sizes[3..];
    for &(orders, keys, events, _) in steady {
        assert!(orders <= 2 * ORDERS_PER_ROUND, "orders in memory: {orders}");
        assert!(keys <= 2 * ORDERS_PER_ROUND, "kept keys: {keys}");
        assert!(
            events <= 2 * EVENTS_IN_MEMORY_MAX,
            "events in memory: {events}"
        );
    }
    let snapshot_then = sizes[3].3;
    let snapshot_last = sizes[ROUNDS - 1].3;
    assert!(
        snapshot_last <= snapshot_then * 3 / 2 + 4096,
        "the snapshot grew from {snapshot_then} to {snapshot_last} bytes"
    );

    // The events within retention are read back from disk, in order, without a gap; older ones
    // are pruned.
    let first_seq = match journal.events_after(0, 10) {
        Err(JournalError::Pruned { first_seq }) => first_seq,
        other => panic!("the oldest events should be past retention: {other:?}"),
    };
    assert!(first_seq > 1);
    let mut after = first_seq - 1;
    let mut read = 0u64;
    loop {
        let page = journal.events_after(after, 1_000).expect("a page");
        let Some(last) = page.last() else { break };
        for (i, event) in page.iter().enumerate() {
            assert_eq!(event.seq, after + 1 + i as u64, "no gap");
        }
        read += page.len() as u64;
        after = last.seq;
    }
    // Two events per paid order.
    assert_eq!(after, 2 * placed as u64, "read up to the last event");
    assert_eq!(read, after - first_seq + 1);
    assert!(
        read > 2 * EVENTS_IN_MEMORY_MAX as u64,
        "most of them came from disk"
    );

    // A restart reads the same bounded state back.
    journal.close();
    drop(journal);
    let (_journal, state) = FileJournal::open_dir(dir.path(), journal_config).expect("reopen");
    assert!(state.orders.len() <= 2 * ORDERS_PER_ROUND);
    let rebuilt = Engine::from_state(EngineConfig::default(), &state).expect("rebuild");
    assert_eq!(
        rebuilt.product(&sku("p")).expect("product").1.sold,
        placed as i64
    );
}
