//! Crashes lose no acknowledged append: a child process appending from many tasks is killed with
//! SIGKILL at random moments, and a simulated disk drops every unsynced byte at a "power cut"
//! (the page cache survives a SIGKILL, so only the second proves the fsync discipline).

use crate::common::{product, seed, sku, Rng};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use turnstile::engine::records::{Record, State};
use turnstile::journal::file::storage::SimulatedDisk;
use turnstile::journal::file::{FileJournal, FileJournalConfig};
use turnstile::journal::Journal;

fn record(id: &str, i: i64) -> Record {
    Record::Product {
        product: product(id, 1, i),
    }
}

/// Every product in `state` must be one an appender could have sent in rounds `0..=round`.
fn assert_nothing_invented(state: &State, round: u64) {
    for sku in state.products.keys() {
        let name = sku.as_str();
        let parts: Vec<&str> = name.split('-').collect();
        let valid = parts.len() == 3
            && parts[0]
                .strip_prefix('r')
                .and_then(|r| r.parse::<u64>().ok())
                .is_some_and(|r| r <= round)
            && parts[1]
                .strip_prefix('t')
                .is_some_and(|t| t.parse::<u64>().is_ok())
            && parts[2].parse::<u64>().is_ok();
        assert!(valid, "recovered a record nobody appended: {name}");
    }
}

#[test]
fn a_power_cut_loses_no_acknowledged_append() {
    let seed = seed("a_power_cut_loses_no_acknowledged_append");
    let mut rng = Rng::new(seed);
    let disk = SimulatedDisk::new();
    // Small segments, so cuts also land around segment rolls and background snapshots.
    let config = FileJournalConfig {
        segment_bytes_max: 16 << 10,
        checkpoint_segments: 3,
        ..FileJournalConfig::default()
    };
    let mut acked: HashSet<String> = HashSet::new();
    for round in 0..8u64 {
        let (journal, state) = FileJournal::open(Arc::new(disk.machine()), config.clone())
            .unwrap_or_else(|e| panic!("round {round}: reopening after the power cut failed: {e}"));
        for id in &acked {
            assert!(
                state.products.contains_key(&sku(id)),
                "round {round}: acknowledged {id} was lost"
            );
        }
        assert_nothing_invented(&state, round);
        let journal = Arc::new(journal);
        let (sender, receiver) = mpsc::channel::<String>();
        let appenders: Vec<_> = (0..8)
            .map(|t| {
                let (journal, sender) = (Arc::clone(&journal), sender.clone());
                std::thread::spawn(move || {
                    for i in 0..200_000 {
                        let id = format!("r{round}-t{t}-{i}");
                        if journal.append(record(&id, i)).wait().is_err()
                            || sender.send(id).is_err()
                        {
                            return;
                        }
                    }
                })
            })
            .collect();
        drop(sender);
        let target = 20 + rng.below(1_500);
        let mut seen = 0;
        while seen < target {
            match receiver.recv() {
                Ok(id) => {
                    acked.insert(id);
                    seen += 1;
                }
                Err(_) => break,
            }
        }
        let torn = if rng.below(2) == 0 {
            0
        } else {
            rng.below(4_000) as usize
        };
        disk.power_cut(torn);
        for appender in appenders {
            appender.join().expect("appender panicked");
        }
        // Acks that arrived after the cut were synced before it.
        acked.extend(receiver.try_iter());
        drop(journal);
    }
    let (_journal, state) =
        FileJournal::open(Arc::new(disk.machine()), config).expect("final reopen");
    for id in &acked {
        assert!(
            state.products.contains_key(&sku(id)),
            "acknowledged {id} was lost"
        );
    }
    assert_nothing_invented(&state, 8);
    eprintln!("{} acknowledged appends survived 8 power cuts", acked.len());
}

const CHILD_DIR: &str = "TURNSTILE_CRASH_CHILD_DIR";
const CHILD_ROUND: &str = "TURNSTILE_CRASH_CHILD_ROUND";

/// Not a check of its own: the body of the child process that
/// `kill_9_mid_load_loses_no_acknowledged_append` starts and kills. Without its environment
/// variable it returns at once.
#[test]
fn crash_child_entry() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let round: u64 = std::env::var(CHILD_ROUND)
        .ok()
        .and_then(|r| r.parse().ok())
        .expect("round");
    let (journal, _) =
        FileJournal::open_dir(std::path::Path::new(&dir), FileJournalConfig::default())
            .expect("child: open journal");
    let journal = Arc::new(journal);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let journal = Arc::clone(&journal);
                tokio::spawn(async move {
                    for i in 0..20_000 {
                        let id = format!("r{round}-t{t}-{i}");
                        journal.append(record(&id, i)).await.expect("child: append");
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ACK {id}")
                            .and_then(|()| out.flush())
                            .expect("child: stdout");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("child: task");
        }
    });
}

#[test]
fn kill_9_mid_load_loses_no_acknowledged_append() {
    let seed = seed("kill_9_mid_load_loses_no_acknowledged_append");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked: Vec<String> = Vec::new();
    let rounds = 5;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "journal_crash::crash_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        let target = 50 + rng.below(4_000) as usize;
        let mut this_round = 0;
        for line in lines.by_ref() {
            let line = line.expect("read child");
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.push(id.to_owned());
                this_round += 1;
                if this_round >= target {
                    break;
                }
            }
        }
        assert!(
            this_round >= target,
            "round {round}: the child stopped after {this_round} acks"
        );
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        // Lines still in the pipe were printed after their append resolved: they count too.
        for line in lines {
            if let Some(id) = line.expect("read child").strip_prefix("ACK ") {
                acked.push(id.to_owned());
            }
        }
        let (journal, state) = FileJournal::open_dir(dir.path(), FileJournalConfig::default())
            .unwrap_or_else(|e| panic!("round {round}: recovery after kill -9 failed: {e}"));
        for id in &acked {
            assert!(
                state.products.contains_key(&sku(id)),
                "round {round}: acknowledged {id} was lost"
            );
        }
        assert_nothing_invented(&state, round);
        eprintln!(
            "round {round}: {} acknowledged appends present of {} recovered (torn bytes cut: {})",
            acked.len(),
            state.products.len(),
            journal.recovery().torn_bytes_cut
        );
    }
}
