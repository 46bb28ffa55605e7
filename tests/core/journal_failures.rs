//! What a failing disk does to the journal and the engine: a full disk or a failed sync leaves no
//! trace in memory, the journal recovers by itself once the disk takes writes again (without
//! syncing the failed file again), and after a clean shutdown any bad byte is corruption while
//! after a crash only the last batch may be cut.

use crate::common::{durably, new_order, product, sku};
use crate::journal_recovery::valid_segment;
use std::sync::Arc;
use std::time::{Duration, Instant};
use turnstile::domain::IdempotencyKey;
use turnstile::engine::idempotency::Begin;
use turnstile::engine::order::Order;
use turnstile::engine::records::Record;
use turnstile::engine::{Engine, EngineConfig, PaymentOutcome};
use turnstile::journal::file::storage::{SimulatedDisk, Storage};
use turnstile::journal::file::{FileJournal, FileJournalConfig};
use turnstile::journal::{Journal, JournalError};

fn config() -> EngineConfig {
    EngineConfig {
        shard_count: 2,
        hold_ttl_ms: 60_000,
        order_id_prefix: "ord_f".into(),
        ..EngineConfig::default()
    }
}

/// Appends a product record and waits for its outcome.
fn append_product(journal: &FileJournal, name: &str) -> Result<(), JournalError> {
    journal
        .append(Record::Product {
            product: product(name, 1, 1),
        })
        .wait()
        .map(|_| ())
}

/// Waits until the journal takes appends again: it retries on a backoff clock of its own.
fn wait_until_healthy(journal: &FileJournal) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while journal.health().is_err() {
        assert!(
            Instant::now() < deadline,
            "the journal did not recover: {:?}",
            journal.health()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A paid checkout of one unit of `name` under `key`, committed as the server does.
fn checkout(
    engine: &Engine,
    journal: &FileJournal,
    key: &str,
    name: &str,
) -> Result<Order, JournalError> {
    let key = IdempotencyKey::parse(key).expect("key");
    assert_eq!(
        engine
            .idempotency()
            .begin(&key, "fp", turnstile::time::now_ms()),
        Ok(Begin::Started)
    );
    let outcome = PaymentOutcome::Authorized {
        payment_id: format!("pay-{}", key.as_str()),
    };
    let change = new_order(
        engine,
        name,
        1,
        outcome,
        Some(&key),
        turnstile::time::now_ms(),
    );
    let order = change.order().expect("an order").clone();
    durably(engine, journal, change).map(|_| order)
}

fn stock(engine: &Engine, name: &str) -> (i64, i64, i64, i64) {
    let view = engine.product(&sku(name)).expect("product").1;
    (view.stock, view.available, view.reserved, view.sold)
}

#[test]
fn a_full_disk_leaves_no_trace_in_memory_and_the_journal_recovers_by_itself() {
    let disk = SimulatedDisk::new();
    let (journal, state) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("open");
    let engine = Engine::from_state(config(), &state).expect("engine");
    let change = engine
        .prepare_product(product("tee", 100, 10))
        .expect("product");
    durably(&engine, &journal, change).expect("durable");
    let first = checkout(&engine, &journal, "k1", "tee").expect("durable");
    assert_eq!(stock(&engine, "tee"), (10, 9, 0, 1));

    // The disk fills up: not even one more record fits.
    disk.set_capacity(Some(disk.used() + 16));
    let failed = checkout(&engine, &journal, "k2", "tee");
    assert!(matches!(failed, Err(JournalError::Io { .. })), "{failed:?}");
    let events_before = journal.events_after(0, 100).expect("events").len();
    // Nothing of the failed order is visible: not the order, not its units, not its key.
    assert_eq!(stock(&engine, "tee"), (10, 9, 0, 1));
    assert_eq!(engine.orders_len(), 1);
    let k2 = IdempotencyKey::parse("k2").expect("key");
    assert_eq!(
        engine
            .idempotency()
            .begin(&k2, "fp", turnstile::time::now_ms()),
        Ok(Begin::Started)
    );
    engine.idempotency().abandon(&k2);
    // A raised and a lowered stock that the journal refused are not served either.
    for new_stock in [20, 5] {
        let change = engine
            .prepare_product(product("tee", 100, new_stock))
            .expect("decided");
        assert!(durably(&engine, &journal, change).is_err());
        assert_eq!(stock(&engine, "tee"), (10, 9, 0, 1), "stock {new_stock}");
    }
    assert!(journal.health().is_err(), "a failed journal says so");

    // Room again: the journal recovers by itself and takes appends.
    disk.set_capacity(None);
    wait_until_healthy(&journal);
    let later = checkout(&engine, &journal, "k2", "tee").expect("durable after recovery");
    assert_eq!(stock(&engine, "tee"), (10, 8, 0, 2));
    let events = journal.events_after(0, 100).expect("events");
    assert_eq!(
        events.len(),
        events_before + 2,
        "the failed order left no event"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap");

    // What a restart reads from the disk is exactly what was acknowledged.
    disk.power_cut(0);
    let (_journal, state) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("reopen");
    let rebuilt = Engine::from_state(config(), &state).expect("rebuild");
    assert_eq!(stock(&rebuilt, "tee"), (10, 8, 0, 2));
    let mut ids: Vec<_> = state.orders.keys().cloned().collect();
    ids.sort();
    let mut expected = vec![first.order_id, later.order_id];
    expected.sort();
    assert_eq!(ids, expected);
}

#[test]
fn a_failed_sync_is_never_retried_on_that_file_and_the_journal_recovers() {
    let disk = SimulatedDisk::new();
    let (journal, _) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("open");
    let append = |name: &str| append_product(&journal, name);
    append("ok").expect("durable");
    let segments_before = disk
        .list()
        .expect("list")
        .iter()
        .filter(|n| n.ends_with(".wal"))
        .count();
    disk.fail_next_syncs(1);
    let failed = append("lost");
    assert!(matches!(failed, Err(JournalError::Io { .. })), "{failed:?}");
    wait_until_healthy(&journal);
    append("later").expect("durable after recovery");
    // The journal went on in a new segment instead of syncing the failed one again.
    let segments_after = disk
        .list()
        .expect("list")
        .iter()
        .filter(|n| n.ends_with(".wal"))
        .count();
    assert_eq!(segments_after, segments_before + 1);
    journal.close();
    drop(journal);
    let (_journal, state) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("reopen");
    let names: Vec<&str> = state.products.keys().map(|s| s.as_str()).collect();
    assert_eq!(names, vec!["later", "ok"]);
}

/// A disk holding one segment of `valid_segment(9)` (batches of three), optionally with a clean
/// shutdown marker naming its last record.
fn disk_with_segment(bytes: &[u8], clean: bool) -> SimulatedDisk {
    let disk = SimulatedDisk::new();
    let mut file = disk.create(&format!("{:020}.wal", 1)).expect("create");
    file.append(bytes).expect("append");
    file.sync_data().expect("sync");
    disk.sync_dir().expect("sync dir");
    if clean {
        disk.write_atomic("clean-shutdown", b"last_lsn 9\n")
            .expect("marker");
    }
    disk
}

#[test]
fn after_a_clean_shutdown_a_bad_byte_in_the_last_batch_is_corruption() {
    let mut bytes = valid_segment(9);
    let frames = turnstile::journal::file::format::scan_segment(&bytes, 1)
        .frames
        .iter()
        .map(|f| f.offset)
        .collect::<Vec<_>>();
    // Record 8 sits inside the last batch (7, 8, 9), with record 9 intact after it.
    let victim = frames[7];
    bytes[victim + 40] ^= 0x01;

    // After a crash the last batch may be cut (it may never have been acknowledged).
    let crashed = disk_with_segment(&bytes, false);
    let (_journal, state) =
        FileJournal::open(Arc::new(crashed.machine()), FileJournalConfig::default())
            .expect("a crash cuts the torn batch");
    assert_eq!(state.last_lsn, 7);

    // After a clean shutdown nothing can be torn: refuse to start, naming the file and offset.
    let clean = disk_with_segment(&bytes, true);
    let error = FileJournal::open(Arc::new(clean.machine()), FileJournalConfig::default())
        .err()
        .expect("a bad byte after a clean shutdown must not open");
    match &error {
        JournalError::Corrupt { file, offset, .. } => {
            assert!(file.ends_with("00000000000000000001.wal"), "{file}");
            assert_eq!(*offset, victim as u64);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    // A whole segment and a marker that agree open fine, and the marker is gone afterwards (a
    // crash from here on is a crash).
    let fine = disk_with_segment(&valid_segment(9), true);
    let (journal, state) =
        FileJournal::open(Arc::new(fine.machine()), FileJournalConfig::default()).expect("open");
    assert_eq!(state.last_lsn, 9);
    assert!(!fine
        .list()
        .expect("list")
        .contains(&"clean-shutdown".to_owned()));
    // A marker that names another record than the journal's last is corruption too.
    journal.close();
    assert!(fine
        .list()
        .expect("list")
        .contains(&"clean-shutdown".to_owned()));
    fine.write_atomic("clean-shutdown", b"last_lsn 12\n")
        .expect("marker");
    assert!(matches!(
        FileJournal::open(Arc::new(fine.machine()), FileJournalConfig::default()),
        Err(JournalError::Corrupt { .. })
    ));
}

#[test]
fn a_failed_batch_never_comes_back_even_if_its_bytes_reach_the_disk() {
    // The failed batch's bytes stay in the old segment (it is never synced again), yet the new
    // segment's name supersedes them: a power cut that keeps every written byte still restores
    // exactly what was acknowledged.
    let disk = SimulatedDisk::new();
    let (journal, _) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("open");
    let append = |name: &str| append_product(&journal, name);
    append("ok").expect("durable");
    disk.fail_next_syncs(1);
    assert!(matches!(append("lost"), Err(JournalError::Io { .. })));
    wait_until_healthy(&journal);
    append("later").expect("durable after recovery");
    disk.power_cut(usize::MAX);
    let (_journal, state) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("reopen");
    let names: Vec<&str> = state.products.keys().map(|s| s.as_str()).collect();
    assert_eq!(names, vec!["later", "ok"]);
}

#[test]
fn a_bad_byte_in_a_segment_kept_for_its_events_is_reported_not_skipped() {
    // Events older than the memory window are read from the segments a snapshot keeps; a bad byte
    // there is an error naming the file, never a silent gap in the pages.
    let disk = SimulatedDisk::new();
    let config = FileJournalConfig {
        segment_bytes_max: 4 << 10,
        checkpoint_segments: 1,
        events_in_memory_max: 4,
        ..FileJournalConfig::default()
    };
    let (journal, state) =
        FileJournal::open(Arc::new(disk.machine()), config.clone()).expect("open");
    let engine = Engine::from_state(EngineConfig::default(), &state).expect("engine");
    let change = engine
        .prepare_product(product("e", 1, 1_000))
        .expect("product");
    durably(&engine, &journal, change).expect("durable");
    for n in 0..100 {
        let outcome = PaymentOutcome::Authorized {
            payment_id: format!("pay-{n}"),
        };
        let change = new_order(&engine, "e", 1, outcome, None, turnstile::time::now_ms());
        durably(&engine, &journal, change).expect("durable");
    }
    journal.checkpoint_now().expect("checkpoint");
    let all = |journal: &FileJournal| -> Result<Vec<u64>, JournalError> {
        let mut seqs = Vec::new();
        loop {
            let page = journal.events_after(seqs.last().copied().unwrap_or(0), 7)?;
            if page.is_empty() {
                return Ok(seqs);
            }
            seqs.extend(page.iter().map(|e| e.seq));
        }
    };
    assert_eq!(
        all(&journal).expect("events"),
        (1..=200).collect::<Vec<_>>()
    );
    journal.close();
    drop(journal);
    // Damage the middle of the first segment, which only the snapshot's list keeps.
    let first = format!("{:020}.wal", 1);
    let length = disk.read(&first).expect("segment").len();
    disk.flip_bit(&first, length / 2);
    let (journal, _) = FileJournal::open(Arc::new(disk.machine()), config).expect("reopen");
    match all(&journal) {
        Err(JournalError::Corrupt { file, .. }) => assert!(file.ends_with(&first), "{file}"),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn leftovers_of_an_interrupted_write_are_removed_at_start() {
    // A half-written snapshot (a crash during a checkpoint) only holds space: start-up removes it.
    let disk = SimulatedDisk::new();
    disk.write_atomic("snapshot-00000000000000000009.json.tmp", &[0u8; 4096])
        .expect("leftover");
    let (_journal, _) =
        FileJournal::open(Arc::new(disk.machine()), FileJournalConfig::default()).expect("open");
    assert!(!disk
        .list()
        .expect("list")
        .iter()
        .any(|name| name.ends_with(".tmp")));
}

#[test]
fn appends_from_many_threads_racing_failed_syncs_and_a_close_in_backoff_all_resolve_and_restart_intact(
) {
    // Proves, through the file journal: appends from threads spread over fewer queues than
    // threads, racing batches whose sync fails (the writer refuses, renumbers from the durable
    // end, recovers) and then a close while the writer waits in its backoff, all get an answer;
    // `close` returns; and a restart reads every acknowledged record, under the lsn its ticket
    // named, with lsns 1..=N and nothing that was refused as "nothing changed".
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let disk = SimulatedDisk::new();
    let journal_config = || FileJournalConfig {
        batch_records_max: 8,
        ..FileJournalConfig::default()
    };
    let (journal, _) = FileJournal::open(Arc::new(disk.machine()), journal_config()).expect("open");
    let (threads, per_thread) = (6usize, 800usize);
    let submitted = AtomicUsize::new(0);
    let answers: Vec<(String, Result<u64, JournalError>)> = std::thread::scope(|scope| {
        let appenders: Vec<_> = (0..threads)
            .map(|thread| {
                let (journal, submitted) = (&journal, &submitted);
                scope.spawn(move || {
                    // Pairs of threads share a queue; the last pair takes slots round robin.
                    if thread < 4 {
                        turnstile::engine::inventory::set_home_shard(thread / 2);
                    }
                    let mut answers = Vec::with_capacity(per_thread);
                    let mut tickets = Vec::new();
                    for n in 0..per_thread {
                        let name = format!("t{thread}-{n}");
                        let ticket = journal.append(Record::Product {
                            product: product(&name, 1, 1),
                        });
                        submitted.fetch_add(1, Ordering::Relaxed);
                        if n % 5 == 0 {
                            answers.push((name, ticket.wait().map(|a| a.lsn)));
                        } else {
                            tickets.push((name, ticket));
                        }
                    }
                    answers.extend(
                        tickets
                            .into_iter()
                            .map(|(name, ticket)| (name, ticket.wait().map(|a| a.lsn))),
                    );
                    answers
                })
            })
            .collect();
        let total = threads * per_thread;
        // A few single failed syncs while the appenders run: each fails one batch.
        for step in 1..=4 {
            while submitted.load(Ordering::Relaxed) < total * step / 8 {
                std::thread::yield_now();
            }
            disk.fail_next_syncs(1);
        }
        // Then every sync fails: the writer fails a batch and stays in its backoff (its probe
        // cannot sync), where the close finds it while appends still come.
        while submitted.load(Ordering::Relaxed) < total * 5 / 8 {
            std::thread::yield_now();
        }
        disk.fail_syncs_after(Some(0));
        journal.close();
        appenders
            .into_iter()
            .flat_map(|a| a.join().expect("appender"))
            .collect()
    });
    drop(journal);
    disk.fail_syncs_after(None);
    let (_journal, state) =
        FileJournal::open(Arc::new(disk.machine()), journal_config()).expect("reopen");
    let durable: HashSet<&str> = state.products.keys().map(|s| s.as_str()).collect();
    let mut lsns: HashMap<u64, &str> = HashMap::new();
    let mut unknown = HashSet::new();
    for (name, answer) in &answers {
        match answer {
            Ok(lsn) => {
                assert!(durable.contains(name.as_str()), "{name} acknowledged, lost");
                assert!(lsns.insert(*lsn, name).is_none(), "lsn {lsn} given twice");
            }
            Err(error) if error.nothing_changed() => {
                assert!(
                    !durable.contains(name.as_str()),
                    "{name} refused ({error}), durable"
                )
            }
            Err(_) => {
                unknown.insert(name.as_str());
            }
        }
    }
    assert!(
        answers.iter().any(|(_, a)| a.is_err()),
        "no failure raced the appends"
    );
    // Every durable record is an acknowledged one or one whose outcome was unknown; one record
    // per lsn, 1..=N.
    assert!(durable
        .iter()
        .all(|name| lsns.values().any(|n| n == name) || unknown.contains(name)));
    assert_eq!(state.last_lsn, durable.len() as u64);
    // The log as a restart reads it (a segment's records end where its successor starts): lsns
    // 1..=N, and each acknowledged record under the lsn its ticket named.
    let log = durable_log(&disk);
    assert_eq!(
        log.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(),
        (1..=state.last_lsn).collect::<Vec<_>>()
    );
    for (lsn, name) in &lsns {
        assert_eq!(log[(*lsn - 1) as usize].1, *name, "lsn {lsn}");
    }
}

/// Every record a restart reads from `disk`, in order, as (lsn, product name).
fn durable_log(disk: &SimulatedDisk) -> Vec<(u64, String)> {
    let mut segments: Vec<(u64, String)> = disk
        .list()
        .expect("list")
        .into_iter()
        .filter(|name| name.ends_with(".wal"))
        .map(|name| {
            (
                name.trim_end_matches(".wal").parse().expect("segment name"),
                name,
            )
        })
        .collect();
    segments.sort();
    let mut log = Vec::new();
    for (i, (first_lsn, name)) in segments.iter().enumerate() {
        let end = segments.get(i + 1).map_or(u64::MAX, |(next, _)| *next);
        let bytes = disk.read(name).expect("read");
        let scan = turnstile::journal::file::format::scan_segment(&bytes, *first_lsn);
        for frame in scan.frames.iter().take_while(|f| f.lsn < end) {
            let record = turnstile::engine::codec::decode(frame.payload).expect("decode");
            let Record::Product { product } = record else {
                panic!("lsn {} is not a product", frame.lsn)
            };
            log.push((frame.lsn, product.sku.as_str().to_owned()));
        }
    }
    log
}
