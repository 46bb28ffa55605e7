//! The file journal reads back exactly what it acknowledged: start-up rebuilds the engine, its
//! orders and its idempotency keys; snapshots keep replay short; bad bytes are refused or cut,
//! never read as records and never a panic.

use crate::common::{durably, product, sku};
use proptest::prelude::*;
use std::sync::Arc;
use turnstile::domain::{CustomerId, IdempotencyKey, Quantity};
use turnstile::engine::idempotency::Begin;
use turnstile::engine::order::OrderStatus;
use turnstile::engine::records::{Record, State};
use turnstile::engine::{AnswerSpec, Engine, EngineConfig, NewOrder, PaymentOutcome, Prepared};
use turnstile::journal::file::format::{self, HEADER_LEN};
use turnstile::journal::file::storage::{SimulatedDisk, Storage};
use turnstile::journal::file::{FileJournal, FileJournalConfig};
use turnstile::journal::{Journal, JournalError};

fn config() -> EngineConfig {
    EngineConfig {
        shard_count: 2,
        hold_ttl_ms: 60_000,
        order_id_prefix: "ord_r".into(),
        ..EngineConfig::default()
    }
}

fn render(order: &turnstile::engine::order::Order) -> (u16, String) {
    let status = if order.status == OrderStatus::Released {
        402
    } else {
        201
    };
    (status, format!("{{\"order_id\":\"{}\"}}", order.order_id))
}

#[test]
fn restart_rebuilds_engine_orders_keys_and_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, state) =
        FileJournal::open_dir(dir.path(), FileJournalConfig::default()).expect("open");
    let engine = Engine::from_state(config(), &state).expect("engine");
    for (name, stock) in [("a", 10), ("b", 5)] {
        let change = engine
            .prepare_product(product(name, 250, stock))
            .expect("upsert");
        durably(&engine, &journal, change).expect("durable");
    }
    let mut placed = Vec::new();
    for (i, outcome) in [
        PaymentOutcome::Authorized {
            payment_id: "p1".into(),
        },
        PaymentOutcome::Pending {
            payment_id: "p2".into(),
        },
        PaymentOutcome::Failed { payment_id: None },
        PaymentOutcome::Authorized {
            payment_id: "p4".into(),
        },
    ]
    .into_iter()
    .enumerate()
    {
        let key = IdempotencyKey::parse(format!("key-{i}")).expect("key");
        assert_eq!(
            engine.idempotency().begin(&key, "fp", 0),
            Ok(Begin::Started)
        );
        let reservation = engine
            .reserve(
                &[
                    (sku("a"), Quantity::parse(2).expect("q")),
                    (sku("b"), Quantity::parse(1).expect("q")),
                ],
                &CustomerId::parse("c1").expect("customer"),
            )
            .expect("reserve");
        let (change, answer) = engine.place_order(
            NewOrder {
                order_id: engine.new_order_id(),
                reservation,
                outcome,
            },
            Some(AnswerSpec {
                key: &key,
                fingerprint: "fp",
                render: &render,
            }),
            turnstile::time::now_ms() + i as i64,
        );
        let order = change.order().expect("an order").clone();
        durably(&engine, &journal, change).expect("durable");
        placed.push((key, order, answer.expect("answer")));
    }
    // Refund the last paid order: its units go back to available.
    let Ok(Prepared::Change(refund)) =
        engine.prepare_cancel(&placed[3].1.order_id, turnstile::time::now_ms())
    else {
        panic!("a paid order can be cancelled");
    };
    durably(&engine, &journal, refund).expect("durable");
    let before: Vec<_> = ["a", "b"].iter().map(|s| engine.product(&sku(s))).collect();
    let events_before = journal.events_after(0, 1_000).expect("events");
    journal.close();
    drop(journal);

    let (journal, state) =
        FileJournal::open_dir(dir.path(), FileJournalConfig::default()).expect("reopen");
    let rebuilt = Engine::from_state(config(), &state).expect("rebuild");
    let after: Vec<_> = ["a", "b"]
        .iter()
        .map(|s| rebuilt.product(&sku(s)))
        .collect();
    assert_eq!(before, after);
    let view_a = after[0].as_ref().expect("a").1;
    // paid 2 units, pending holds 2, released 0, refunded 0 → sold 2, reserved 2.
    assert_eq!(
        (view_a.stock, view_a.available, view_a.reserved, view_a.sold),
        (10, 6, 2, 2)
    );
    for (key, order, answer) in &placed {
        let status = if order.order_id == placed[3].1.order_id {
            OrderStatus::Refunded
        } else {
            order.status
        };
        assert_eq!(
            rebuilt.order(&order.order_id).map(|o| o.status),
            Some(status)
        );
        match rebuilt.idempotency().begin(key, "fp", 3_000) {
            Ok(Begin::Replay(replayed)) => assert_eq!(
                (replayed.status, &replayed.body[..]),
                (answer.status, answer.body.as_bytes())
            ),
            other => panic!("key {key:?} not restored: {other:?}"),
        }
    }
    assert_eq!(
        journal.events_after(0, 1_000).expect("events"),
        events_before
    );
    let types: Vec<_> = events_before
        .iter()
        .map(|e| e.status.event_type())
        .collect();
    assert_eq!(
        types,
        [
            "order.reserved",
            "order.paid",
            "order.reserved",
            "order.payment_pending",
            "order.reserved",
            "order.released",
            "order.reserved",
            "order.paid",
            "order.refunded"
        ]
    );
    // Pages: `after` and `limit` behave as the event API needs.
    let page = journal.events_after(3, 2).expect("events");
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
    // The pending order's hold is known again, so the sweeper can release it.
    assert_eq!(rebuilt.holds_len(), 1);
}

#[test]
fn snapshots_keep_start_up_replay_short() {
    let disk = SimulatedDisk::new();
    let small = FileJournalConfig {
        segment_bytes_max: 4 << 10,
        checkpoint_segments: 2,
        ..FileJournalConfig::default()
    };
    let (journal, _) = FileJournal::open(Arc::new(disk.machine()), small.clone()).expect("open");
    let total = 2_000u64;
    for i in 0..total {
        let record = Record::Product {
            product: product(&format!("p{i}"), 1, i as i64),
        };
        journal.append(record).wait().expect("durable");
    }
    // Background checkpoints may still be running: take one more in the foreground, which waits
    // for them and covers every closed segment.
    let covered = journal.checkpoint_now().expect("checkpoint");
    journal.close();
    drop(journal);
    let names = disk.list().expect("list");
    let segments = names.iter().filter(|n| n.ends_with(".wal")).count();
    let snapshots = names.iter().filter(|n| n.starts_with("snapshot-")).count();
    assert_eq!(snapshots, 1, "{names:?}");
    assert!(segments <= 2, "old segments were not removed: {names:?}");

    let (journal, state) = FileJournal::open(Arc::new(disk.machine()), small).expect("reopen");
    let report = journal.recovery();
    assert_eq!(report.snapshot_lsn, covered);
    assert_eq!(report.snapshot_lsn + report.records_replayed, total);
    assert!(report.records_replayed < 100, "{report:?}");
    assert_eq!(state.products.len() as u64, total);
    assert_eq!(state.last_lsn, total);
}

#[test]
fn a_flipped_byte_mid_segment_is_refused_as_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) =
        FileJournal::open_dir(dir.path(), FileJournalConfig::default()).expect("open");
    for i in 0..50 {
        let record = Record::Product {
            product: product(&format!("p{i}"), 1, i),
        };
        journal.append(record).wait().expect("durable");
    }
    journal.close();
    drop(journal);
    let segment = dir.path().join(format!("{:020}.wal", 1));
    let mut bytes = std::fs::read(&segment).expect("segment");
    let scan = format::scan_segment(&bytes, 1);
    assert_eq!(scan.frames.len(), 50);
    let victim = scan.frames[25].offset;
    bytes[victim + HEADER_LEN + 3] ^= 0x04;
    std::fs::write(&segment, &bytes).expect("write");

    let error = FileJournal::open_dir(dir.path(), FileJournalConfig::default())
        .err()
        .expect("a corrupt journal must not open");
    match &error {
        JournalError::Corrupt { file, offset, .. } => {
            assert!(file.ends_with("00000000000000000001.wal"), "{file}");
            assert_eq!(*offset, victim as u64);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(".wal") && message.contains(&victim.to_string()),
        "{message}"
    );
    // Nothing was changed: the file still holds every byte.
    assert_eq!(std::fs::read(&segment).expect("segment").len(), bytes.len());
}

/// A valid segment of `count` records, batches of up to three.
pub fn valid_segment(count: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut batch_first = 1;
    for lsn in 1..=count {
        if (lsn - 1) % 3 == 0 {
            batch_first = lsn;
        }
        let record = Record::Product {
            product: product(&format!("p{lsn}"), 1, lsn as i64),
        };
        let payload = serde_json::to_vec(&record).expect("encode");
        format::encode_frame(&mut bytes, lsn, 1, batch_first, &payload);
    }
    bytes
}

fn open_with_segment(bytes: &[u8]) -> Result<State, JournalError> {
    let disk = SimulatedDisk::new();
    let mut file = disk.create(&format!("{:020}.wal", 1)).expect("create");
    file.append(bytes).expect("append");
    file.sync_data().expect("sync");
    disk.sync_dir().expect("sync dir");
    FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default())
        .map(|(_, state)| state)
}

#[test]
fn a_truncated_segment_recovers_exactly_its_whole_records() {
    let bytes = valid_segment(9);
    let ends: Vec<usize> = format::scan_segment(&bytes, 1)
        .frames
        .iter()
        .map(|f| f.end())
        .collect();
    for cut in 0..=bytes.len() {
        let state =
            open_with_segment(&bytes[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let whole = ends.iter().filter(|&&end| end <= cut).count() as u64;
        assert_eq!(state.last_lsn, whole, "cut at {cut}");
        assert_eq!(state.products.len() as u64, whole);
    }
}

/// A data dir written by an earlier version holds JSON records; this one writes the binary form
/// (`engine::codec`). Both read back, and the journal goes on after them.
#[test]
fn a_segment_of_json_records_from_an_earlier_version_recovers_and_the_journal_goes_on() {
    let disk = SimulatedDisk::new();
    let mut file = disk.create(&format!("{:020}.wal", 1)).expect("create");
    file.append(&valid_segment(5)).expect("append");
    file.sync_data().expect("sync");
    disk.sync_dir().expect("sync dir");
    let (journal, state) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("open");
    assert_eq!((state.last_lsn, state.products.len()), (5, 5));
    for i in 6..=8 {
        let record = Record::Product {
            product: product(&format!("p{i}"), 2, i),
        };
        journal.append(record).wait().expect("durable");
    }
    journal.close();
    drop(journal);
    let (_, state) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("reopen");
    assert_eq!((state.last_lsn, state.products.len()), (8, 8));
    assert_eq!(state.products[&sku("p3")].stock.get(), 3);
    assert_eq!(state.products[&sku("p7")].price_cents.get(), 2);
    let mut segments: Vec<String> = disk
        .list()
        .expect("list")
        .into_iter()
        .filter(|n| n.ends_with(".wal"))
        .collect();
    segments.sort();
    let mut forms = Vec::new();
    for segment in &segments {
        let first_lsn: u64 = segment.trim_end_matches(".wal").parse().expect("name");
        let bytes = disk.read(segment).expect("read");
        let scan = format::scan_segment(&bytes, first_lsn);
        forms.extend(scan.frames.iter().map(|f| f.payload[0]));
    }
    assert_eq!(
        forms,
        [b'{', b'{', b'{', b'{', b'{', 1, 1, 1],
        "JSON then binary"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes as a segment: an error or a cut tail, never a panic or an invented record.
    #[test]
    fn random_bytes_never_panic_the_reader(bytes in prop::collection::vec(any::<u8>(), 0..2_000)) {
        let _ = format::scan_segment(&bytes, 1);
        if let Ok(state) = open_with_segment(&bytes) {
            prop_assert_eq!(state.last_lsn, 0);
        }
    }

    /// A valid segment with random damage: a prefix of its records, or a corruption error.
    #[test]
    fn damaged_segments_yield_a_prefix_or_an_error(
        at in 0usize..4_000,
        value in any::<u8>(),
        cut in 0usize..4_000,
    ) {
        let mut bytes = valid_segment(12);
        let at = at % bytes.len();
        bytes[at] = value;
        let cut = cut.min(bytes.len());
        match open_with_segment(&bytes[..cut]) {
            Ok(state) => {
                for (i, sku) in state.products.keys().enumerate() {
                    prop_assert!(sku.as_str().starts_with('p'), "{i}: {sku}");
                }
                prop_assert!(state.last_lsn <= 12);
                for lsn in 1..=state.last_lsn {
                    let name = format!("p{}", lsn);
                    prop_assert!(state.products.contains_key(&sku(&name)));
                }
            }
            Err(JournalError::Corrupt { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}

#[test]
fn what_orders_owe_the_gateway_survives_a_restart_record_by_record() {
    // Proves: a paid order owes its capture from the moment it is journaled, and a Payments
    // record (many orders' calls done at once) clears exactly the debts it names, across a
    // restart of the file journal; stock is untouched by it.
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, state) =
        FileJournal::open_dir(dir.path(), FileJournalConfig::default()).expect("open");
    let engine = Engine::from_state(config(), &state).expect("engine");
    let change = engine
        .prepare_product(product("m", 100, 10))
        .expect("product");
    durably(&engine, &journal, change).expect("durable");
    let mut ids = Vec::new();
    for n in 0..3 {
        let change = crate::common::new_order(
            &engine,
            "m",
            1,
            PaymentOutcome::Authorized {
                payment_id: format!("pay-m{n}"),
            },
            None,
            turnstile::time::now_ms(),
        );
        let turnstile::engine::Applied::Order { order, .. } =
            durably(&engine, &journal, change).expect("durable")
        else {
            panic!("an order");
        };
        assert_eq!(
            order.payment_due,
            Some(turnstile::engine::order::PaymentDue::Capture)
        );
        ids.push(order.order_id);
    }
    assert_eq!(engine.payments_due_len(), 3);
    use turnstile::engine::order::PaymentDue;
    let updates: Vec<_> = ids[..2]
        .iter()
        .map(|id| (id.clone(), Some(PaymentDue::Capture), None))
        .collect();
    let change = engine
        .prepare_payments(&updates, turnstile::time::now_ms())
        .expect("a change");
    durably(&engine, &journal, change).expect("durable");
    assert_eq!(engine.payments_due_len(), 1);
    let before = engine.product(&sku("m")).expect("product").1;
    drop(engine);
    drop(journal);

    let (_journal, state) =
        FileJournal::open_dir(dir.path(), FileJournalConfig::default()).expect("reopen");
    let engine = Engine::from_state(config(), &state).expect("engine");
    assert_eq!(engine.payments_due_len(), 1, "one capture still owed");
    assert_eq!(engine.order(&ids[0]).expect("order").payment_due, None);
    assert_eq!(engine.order(&ids[1]).expect("order").payment_due, None);
    assert_eq!(
        engine.order(&ids[2]).expect("order").payment_due,
        Some(PaymentDue::Capture)
    );
    let after = engine.product(&sku("m")).expect("product").1;
    assert_eq!(before, after, "a Payments record moves no stock");
}
