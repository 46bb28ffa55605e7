//! Restarting MariaDB under load. With MySQL as the journal: while it is down the server answers
//! 503 (never hangs), it recovers by itself once MariaDB is back, no acknowledged order is lost,
//! and the identity holds. In write-behind: checkouts go on without an error, the lag grows, then
//! drains to 0, and every acknowledged order is in MySQL exactly once.
//!
//! This test stops the machine's MariaDB, so it lives in a test binary of its own whose name sorts
//! last: `cargo test` runs test binaries one after another, so no other test runs beside it.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{eventually, spawn_app, Load, Sent, TestDatabase, MARIADB_ADDR};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

const START_MARIADB: &[&str] = &[
    "--start",
    "--oknodo",
    "--background",
    "--exec",
    "/usr/sbin/mariadbd",
];

/// The tests here stop the one MariaDB: one at a time (the test harness runs a binary's tests on
/// several threads).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts MariaDB again if the test ends early, so a failure here does not take the database away
/// from whatever runs next.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("start-stop-daemon")
            .args(START_MARIADB)
            .status();
    }
}

/// True while a mariadbd process exists (it closes its port before it has exited).
fn mariadb_process_exists() -> bool {
    Command::new("start-stop-daemon")
        .args(["--status", "--exec", "/usr/sbin/mariadbd"])
        .status()
        .is_ok_and(|s| s.success())
}

async fn mariadb_answers() -> bool {
    tokio::net::TcpStream::connect(MARIADB_ADDR).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_mariadb_mid_load_answers_503_then_recovers_and_loses_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let database = TestDatabase::create().await;
    let app = spawn_app(&["--mysql-url", &database.url, "--journal-timeout", "1s"]);
    let mut client = app.client();
    for s in 0..4 {
        assert_eq!(
            client
                .put_product(&format!("R{s}"), 300, 1_000_000)
                .await
                .status,
            200
        );
    }
    let skus: Vec<String> = (0..4).map(|s| format!("R{s}")).collect();
    let load = Load::start(&app, 16, "restart", &skus);
    eventually(
        "load before the restart",
        Duration::from_secs(30),
        async || load.answered(None) >= 300,
    )
    .await;

    let _restart_guard = RestartOnDrop;
    let stopped = Command::new("mariadb-admin")
        .args(["-uroot", "-h127.0.0.1", "shutdown"])
        .status()
        .expect("run mariadb-admin");
    assert!(stopped.success(), "mariadb-admin shutdown failed");
    eventually("MariaDB to stop", Duration::from_secs(60), async || {
        !mariadb_answers().await && !mariadb_process_exists()
    })
    .await;
    eventually(
        "503 answers while MariaDB is down",
        Duration::from_secs(30),
        async || load.answered(Some(503)) >= 5,
    )
    .await;
    assert_eq!(
        client.get("/readyz").await.status,
        503,
        "readyz while the database is down"
    );

    let started = Command::new("start-stop-daemon")
        .args(START_MARIADB)
        .status()
        .expect("start MariaDB");
    assert!(started.success());
    eventually(
        "MariaDB to answer again",
        Duration::from_secs(120),
        async || mariadb_answers().await,
    )
    .await;
    eventually(
        "the server to recover by itself",
        Duration::from_secs(60),
        async || client.get("/readyz").await.status == 200,
    )
    .await;
    let paid_before = load.answered(Some(201));
    eventually(
        "checkouts to succeed again",
        Duration::from_secs(30),
        async || load.answered(Some(201)) >= paid_before + 100,
    )
    .await;
    // The batches the outage interrupted were retried, and /metrics says why.
    let metrics = String::from_utf8_lossy(&client.get("/metrics").await.body).into_owned();
    let retries = metrics
        .lines()
        .find_map(|l| l.strip_prefix("turnstile_journal_retries_total{reason=\"connection\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no connection retries counted in /metrics:\n{metrics}"));
    assert!(retries >= 1.0, "no connection retries counted: {retries}");
    let results = load.stop().await;
    let statuses = results
        .iter()
        .fold(HashMap::new(), |mut m: HashMap<u16, usize>, r| {
            *m.entry(r.status).or_default() += 1;
            m
        });
    eprintln!("answers by status: {statuses:?}");
    assert!(
        results.iter().all(|r| matches!(r.status, 201 | 503 | 409)),
        "unexpected statuses: {statuses:?}"
    );

    let pool = database.pool().await;
    helpers::wait_projected(&pool).await;
    for Sent {
        key,
        body: request,
        status,
        order_id,
    } in &results
    {
        match status {
            201 => {
                let found: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM orders WHERE order_id = ? AND status = 'paid'",
                )
                .bind(order_id)
                .fetch_one(&pool)
                .await
                .expect("query");
                assert_eq!(
                    found, 1,
                    "acknowledged order {order_id} of {key} is not in MySQL"
                );
            }
            _ => {
                // Not acknowledged: retried, it yields the one order it made (or a new one), never two.
                let retry = client
                    .send("POST", "/v1/checkout", &[("idempotency-key", key)], request)
                    .await;
                assert!(
                    matches!(retry.status, 201 | 409),
                    "{key}: retry answered {}",
                    retry.status
                );
            }
        }
    }
    let per_key: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT idempotency_key FROM orders WHERE idempotency_key IS NOT NULL GROUP BY idempotency_key HAVING COUNT(*) > 1) t",
    )
    .fetch_one(&pool)
    .await
    .expect("query");
    assert_eq!(per_key, 0, "a key made two orders");
    for s in 0..4 {
        // `stock` asserts the identity.
        let (_, _, reserved, _) = client.stock(&format!("R{s}")).await;
        assert_eq!(reserved, 0);
    }
}

/// The value of a sample in `/metrics` (the first line starting with `name`).
fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_mariadb_in_write_behind_loses_nothing_and_checkouts_go_on() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let app = helpers::start(
        &data_dir,
        &[
            "--mysql-url",
            &database.url,
            "--mysql-write-behind",
            // Longer than the outage: checkouts never have to wait for MySQL here.
            "--mysql-lag-max",
            "5m",
        ],
    );
    let mut client = app.client();
    for s in 0..4 {
        assert_eq!(
            client
                .put_product(&format!("W{s}"), 300, 1_000_000)
                .await
                .status,
            200
        );
    }
    let skus: Vec<String> = (0..4).map(|s| format!("W{s}")).collect();
    let load = Load::start(&app, 16, "wb", &skus);
    eventually(
        "load before the restart",
        Duration::from_secs(30),
        async || load.answered(None) >= 300,
    )
    .await;

    let _restart_guard = RestartOnDrop;
    let stopped = Command::new("mariadb-admin")
        .args(["-uroot", "-h127.0.0.1", "shutdown"])
        .status()
        .expect("run mariadb-admin");
    assert!(stopped.success(), "mariadb-admin shutdown failed");
    eventually("MariaDB to stop", Duration::from_secs(60), async || {
        !mariadb_answers().await && !mariadb_process_exists()
    })
    .await;
    let answered_at_stop = load.answered(None);
    let mut lag_seen = 0.0;
    eventually(
        "checkouts to go on and the lag to grow while MariaDB is down",
        Duration::from_secs(30),
        async || {
            let metrics = String::from_utf8_lossy(&client.get("/metrics").await.body).into_owned();
            lag_seen = metric(&metrics, "turnstile_mysql_lag_records ").unwrap_or(0.0);
            load.answered(None) >= answered_at_stop + 500 && lag_seen >= 500.0
        },
    )
    .await;
    let ready = client.get("/readyz").await;
    assert_eq!(
        ready.status, 200,
        "within --mysql-lag-max the node stays ready"
    );
    eprintln!("lag while MariaDB was down: {lag_seen} records");

    let started = Command::new("start-stop-daemon")
        .args(START_MARIADB)
        .status()
        .expect("start MariaDB");
    assert!(started.success());
    eventually(
        "MariaDB to answer again",
        Duration::from_secs(120),
        async || mariadb_answers().await,
    )
    .await;
    let results = load.stop().await;
    eventually(
        "the lag to drain to 0",
        Duration::from_secs(120),
        async || {
            let metrics = String::from_utf8_lossy(&client.get("/metrics").await.body).into_owned();
            metric(&metrics, "turnstile_mysql_lag_records ") == Some(0.0)
        },
    )
    .await;
    let statuses = results
        .iter()
        .fold(HashMap::new(), |mut m: HashMap<u16, usize>, r| {
            *m.entry(r.status).or_default() += 1;
            m
        });
    eprintln!("answers by status: {statuses:?}");
    assert!(
        results.iter().all(|r| r.status == 201),
        "write-behind answers every checkout while MySQL is down: {statuses:?}"
    );
    let pool = database.pool().await;
    helpers::wait_projected(&pool).await;
    let in_mysql: HashMap<String, i64> = sqlx::query_as::<_, (Vec<u8>, i64)>(
        "SELECT order_id, COUNT(*) FROM orders GROUP BY order_id",
    )
    .fetch_all(&pool)
    .await
    .expect("orders")
    .into_iter()
    .map(|(id, n)| (String::from_utf8(id).expect("utf-8"), n))
    .collect();
    for Sent { order_id, .. } in &results {
        assert_eq!(
            in_mysql.get(order_id),
            Some(&1),
            "acknowledged order {order_id} is not in MySQL exactly once"
        );
    }
    let sold: i64 = sqlx::query_scalar("SELECT CAST(SUM(sold) AS SIGNED) FROM inventory")
        .fetch_one(&pool)
        .await
        .expect("inventory");
    assert_eq!(sold as usize, results.len(), "nothing doubled in inventory");
    helpers::assert_no_gaps(&pool, "after the restart").await;
    for s in 0..4 {
        let (_, _, reserved, _) = client.stock(&format!("W{s}")).await;
        assert_eq!(reserved, 0);
    }
}
