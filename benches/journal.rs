//! Durable appends per second into the file journal on the real disk, with 1, 64 and 1,024
//! concurrent appenders (tokio tasks, each awaiting its append before the next), and at 1,024 by
//! batch cap (the most records one group commit takes: `journal_batch_cap`).
//!
//! `cargo bench --bench journal`. The journal lives under `target/bench-journal` (the repository's
//! disk, never tmpfs). Each record is a typical paid order with its two events and stored answer.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mimalloc::MiMalloc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use turnstile::journal::file::{FileJournal, FileJournalConfig};
use turnstile::journal::mysql::{MySqlConfig, MySqlJournal};
use turnstile::journal::Journal;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

mod common;
use common::order_record;

/// Times `iters` appends spread over `appenders` concurrent tasks, each awaiting its append.
fn run_appends(
    runtime: &tokio::runtime::Runtime,
    journal: &Arc<dyn Journal>,
    appenders: u64,
    iters: u64,
    counter: &mut u64,
) -> Duration {
    let per_task = iters.div_ceil(appenders);
    let first = *counter;
    *counter += per_task * appenders;
    let started = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..appenders)
            .map(|task| {
                let journal = Arc::clone(journal);
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let n = first + task * per_task + i;
                        journal.append(order_record(n)).await.expect("append");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    });
    // Scale to the iterations asked for (the tasks may have done a few more).
    started
        .elapsed()
        .mul_f64(iters as f64 / (per_task * appenders) as f64)
}

fn report(name: &str, appenders: u64, journal: &Arc<dyn Journal>) {
    let stats = journal.stats();
    let batches = stats
        .batches
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(1);
    let records = stats.records.load(std::sync::atomic::Ordering::Relaxed);
    let sync_nanos = stats.sync_nanos.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{name} {appenders} appenders: {records} records in {batches} batches ({:.1} records/batch), mean commit {:.3} ms",
        records as f64 / batches as f64,
        sync_nanos as f64 / batches as f64 / 1e6
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn durable_appends(c: &mut Criterion) {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-journal");
    std::fs::create_dir_all(&base).expect("bench dir");
    let runtime = runtime();
    let mut group = c.benchmark_group("journal");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    for appenders in [1u64, 64, 1_024] {
        let dir = tempfile::tempdir_in(&base).expect("tempdir");
        let (journal, _) =
            FileJournal::open_dir(dir.path(), FileJournalConfig::default()).expect("journal");
        let journal: Arc<dyn Journal> = Arc::new(journal);
        let mut counter = 0u64;
        group.bench_function(format!("durable_appends/{appenders}_appenders"), |b| {
            b.iter_custom(|iters| run_appends(&runtime, &journal, appenders, iters, &mut counter))
        });
        report("file journal", appenders, &journal);
        runtime.block_on(journal.shutdown());
    }
    group.finish();
}

/// The batch cap (`FileJournalConfig::batch_records_max`: the most records one group commit
/// takes) as a parameter, at 1,024 concurrent appenders: what a smaller cap costs in throughput
/// (more `fdatasync`s) for the shorter wait it gives the next batch.
fn durable_appends_by_batch_cap(c: &mut Criterion) {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-journal");
    std::fs::create_dir_all(&base).expect("bench dir");
    let runtime = runtime();
    let mut group = c.benchmark_group("journal_batch_cap");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    let appenders = 1_024u64;
    for cap in [16usize, 128, 1_024, 8_192] {
        let dir = tempfile::tempdir_in(&base).expect("tempdir");
        let config = FileJournalConfig {
            batch_records_max: cap,
            ..FileJournalConfig::default()
        };
        let (journal, _) = FileJournal::open_dir(dir.path(), config).expect("journal");
        let journal: Arc<dyn Journal> = Arc::new(journal);
        let mut counter = 0u64;
        group.bench_function(format!("durable_appends/cap_{cap}"), |b| {
            b.iter_custom(|iters| run_appends(&runtime, &journal, appenders, iters, &mut counter))
        });
        report(
            &format!("file journal, batch cap {cap}"),
            appenders,
            &journal,
        );
        runtime.block_on(journal.shutdown());
    }
    group.finish();
}

/// The same appends into the machine's MariaDB (`TURNSTILE_BENCH_MYSQL_URL`, default the root
/// account on 127.0.0.1:3306), in a database `turnstile_bench` created afresh.
fn mysql_durable_appends(c: &mut Criterion) {
    let server = std::env::var("TURNSTILE_BENCH_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_owned());
    let runtime = runtime();
    let url = format!("{server}/turnstile_bench");
    let prepared = runtime.block_on(async {
        let admin = sqlx::MySqlPool::connect(&format!("{server}/test")).await?;
        sqlx::query("DROP DATABASE IF EXISTS turnstile_bench")
            .execute(&admin)
            .await?;
        sqlx::query("CREATE DATABASE turnstile_bench")
            .execute(&admin)
            .await?;
        admin.close().await;
        Ok::<(), sqlx::Error>(())
    });
    if let Err(error) = prepared {
        eprintln!("skipping the MySQL journal benchmark: MariaDB at {server} is not usable ({error}); start it to measure");
        return;
    }
    let mut config = MySqlConfig::new(url);
    // The bench's own node: its log in the bench database.
    config.node = "node_bench".to_owned();
    runtime
        .block_on(turnstile::journal::mysql::migrate(&config))
        .expect("migrate the bench database");
    let mut group = c.benchmark_group("mysql_journal");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(1));
    let (mysql, _) = runtime
        .block_on(MySqlJournal::open(config))
        .expect("open the MySQL journal");
    let mysql = Arc::new(mysql);
    let journal: Arc<dyn Journal> = Arc::clone(&mysql) as Arc<dyn Journal>;
    let mut counter = 0u64;
    let started = Instant::now();
    for appenders in [1u64, 64, 1_024] {
        group.bench_function(format!("durable_appends/{appenders}_appenders"), |b| {
            b.iter_custom(|iters| run_appends(&runtime, &journal, appenders, iters, &mut counter))
        });
        report("MySQL journal (cumulative)", appenders, &journal);
    }
    // The projections run behind the log, beside the appends: their sustained rate is what they
    // applied from the first append until the lag drained.
    let appended = Instant::now();
    let lag_at_end = mysql.lag().records();
    let drained = runtime.block_on(mysql.lag().wait_drained(Duration::from_secs(600)));
    let applied = mysql.lag().applied_lsn();
    eprintln!(
        "MySQL projections: {applied} records applied in {:.1} s ({:.0} records/s, each a new paid order), {lag_at_end} records behind when the appends ended, drained {} {:.1} s later",
        started.elapsed().as_secs_f64(),
        applied as f64 / started.elapsed().as_secs_f64(),
        if drained { "" } else { "NOT" },
        appended.elapsed().as_secs_f64()
    );
    runtime.block_on(journal.shutdown());
    group.finish();
}

criterion_group!(
    benches,
    durable_appends,
    durable_appends_by_batch_cap,
    mysql_durable_appends
);
criterion_main!(benches);
