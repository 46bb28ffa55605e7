//! Faults in the services under load, each on an instance of the test's own
//! ([`helpers::PrivateMariaDb`], [`helpers::PrivateRabbitMq`]: the installed binaries on free
//! ports, data in temp dirs, stopped when the test ends, also when it fails), so no test here
//! touches the machine's services, and they run beside the others.
//!
//! - MariaDB stopped and started again under load. With MySQL as the journal: while it is down
//!   the server answers 503 (never hangs), it recovers by itself once MariaDB is back, no
//!   acknowledged order is lost, and the identity holds. In write-behind: checkouts go on without
//!   an error, the lag grows, then drains to 0, and every acknowledged order is in MySQL exactly
//!   once.
//! - RabbitMQ's application stopped under load: checkouts go on with no added errors (the broker
//!   is not on the checkout path), the node stays ready and says why, and once the broker is back
//!   every event arrives, none lost. The checkout p99 during the outage is printed, not asserted.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{
    all_delivered, eventually, spawn_app, JsonBody, Load, PrivateMariaDb, PrivateRabbitMq, Sent,
    TestBroker, TestDatabase,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_mariadb_mid_load_answers_503_then_recovers_and_loses_nothing() {
    let mut mariadb = PrivateMariaDb::start();
    let database = TestDatabase::create_on(&mariadb.addr).await;
    let app = spawn_app(&["--mysql-url", &database.url, "--journal-timeout", "1s"]);
    let mut client = app.client();
    let load = under_load(&mut client, &app, "R", "restart").await;

    mariadb.stop();
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

    mariadb.start_again();
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
    let mut mariadb = PrivateMariaDb::start();
    let database = TestDatabase::create_on(&mariadb.addr).await;
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
    let load = under_load(&mut client, &app, "W", "wb").await;

    mariadb.stop();
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

    mariadb.start_again();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_rabbitmq_under_load_loses_no_event_and_no_checkout() {
    let rabbitmq = PrivateRabbitMq::start();
    let mut broker = TestBroker::create_on(&rabbitmq.url, "restart").await;
    let app = spawn_app(&broker.args().iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = app.client();
    client.put_product("A", 500, 10_000_000).await;
    let load = Load::start(&app, 8, "load", &["A".to_owned()]);
    eventually(
        "events confirmed before the outage",
        Duration::from_secs(30),
        async || helpers::metric(&mut client, "turnstile_amqp_confirmed_seq").await > 200.0,
    )
    .await;

    assert!(rabbitmq.ctl("stop_app"), "rabbitmqctl stop_app failed");
    eventually("the relay to notice", Duration::from_secs(30), async || {
        helpers::metric(&mut client, "turnstile_amqp_connected").await == 0.0
    })
    .await;
    // During the outage: checkouts still succeed, timed one by one beside the load.
    let mut latencies = Vec::new();
    for n in 0..300 {
        let started = Instant::now();
        let answer = client
            .checkout(&format!("outage-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        latencies.push(started.elapsed());
        assert_eq!(
            answer.status,
            201,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200, "the broker is not on the checkout path");
    assert_ne!(ready.json()["checks"]["amqp"], "ok");
    let waiting = helpers::metric(&mut client, "turnstile_amqp_lag_events").await;
    assert!(waiting >= 600.0, "events wait in the journal: {waiting}");
    latencies.sort();
    eprintln!(
        "checkout latency during the RabbitMQ outage (300 sequential, 8 clients of load beside): p50 {:?}, p99 {:?}; {waiting} events waiting",
        latencies[149], latencies[296]
    );

    assert!(rabbitmq.ctl("start_app"), "rabbitmqctl start_app failed");
    let sent = load.stop().await;
    let errors = sent.iter().filter(|s| s.status != 201).count();
    assert_eq!(errors, 0, "no checkout failed during the outage");
    broker.reconnect().await;
    // Reconnected: every event, none lost (duplicates allowed), in seq order.
    all_delivered(&mut client, &mut broker).await;
    assert!(helpers::metric(&mut client, "turnstile_amqp_reconnects_total").await >= 1.0);
    broker.delete().await;
}

/// Four products of `prefix` with deep stock, and 16 clients buying them (keys of `key`), until
/// 300 checkouts have been answered.
async fn under_load(
    client: &mut helpers::Client,
    app: &helpers::TestApp,
    prefix: &str,
    key: &str,
) -> Load {
    let skus: Vec<String> = (0..4).map(|s| format!("{prefix}{s}")).collect();
    for sku in &skus {
        assert_eq!(client.put_product(sku, 300, 1_000_000).await.status, 200);
    }
    let load = Load::start(app, 16, key, &skus);
    eventually(
        "load before the restart",
        Duration::from_secs(30),
        async || load.answered(None) >= 300,
    )
    .await;
    load
}
