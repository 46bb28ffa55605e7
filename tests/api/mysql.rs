//! The MySQL journal against the machine's real MariaDB, each test in a database of its own: the
//! database itself refuses a second order for one key or one payment, a kill -9 leaves every
//! acknowledged order in MySQL with nothing half-written, a key past retention starts afresh, a
//! record the database refuses fails alone, and a slow commit answers "outcome unknown".

use crate::crash::kill_9_mid_load;
use crate::helpers::{
    assert_no_gaps, assert_no_lsn_gap, eventually, spawn_app, wait_projected, JsonBody,
    TestDatabase,
};
use sqlx::Row;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_order_for_one_key_or_payment_is_refused_by_the_database() {
    let database = TestDatabase::create().await;
    let app = spawn_app(&["--mysql-url", &database.url]);
    let mut client = app.client();
    client.put_product("U", 100, 10).await;
    let order = client
        .checkout("unique-1", "U", 1, "tok_ok")
        .await
        .expect("answer")
        .json();
    let order_id = order["order_id"].as_str().expect("order_id");
    let pool = database.pool().await;
    wait_projected(&pool).await;
    let payment_id: String = sqlx::query("SELECT payment_id FROM orders WHERE order_id = ?")
        .bind(order_id)
        .fetch_one(&pool)
        .await
        .map(|row| String::from_utf8(row.get::<Vec<u8>, _>(0)).expect("utf-8"))
        .expect("the order is in MySQL");
    // The claims are columns of the log record's row, written in its transaction: a second row
    // claiming any of them is refused by its UNIQUE key (a row of its own lsn, so the primary key
    // is not what refuses it).
    // Planted in another node's log: the claims hold across nodes.
    let insert = "INSERT INTO journal (node, lsn, first_event_seq, record, order_id, payment_id, idempotency_key) \
                  VALUES ('node_planted', ?, 0, 'planted', ?, ?, ?)";
    for (lsn, what, id, payment, key, index) in [
        (
            -1,
            "same idempotency key",
            "ord_intruder",
            "pay_other",
            "unique-1",
            "journal_idempotency_key",
        ),
        (
            -2,
            "same payment id",
            "ord_intruder",
            payment_id.as_str(),
            "unique-2",
            "journal_payment_id",
        ),
        (
            -3,
            "same order id",
            order_id,
            "pay_other",
            "unique-3",
            "journal_order_id",
        ),
    ] {
        let error = sqlx::query(insert)
            .bind(lsn)
            .bind(id)
            .bind(payment)
            .bind(key)
            .execute(&pool)
            .await
            .expect_err(what);
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("23000"), "{what}: {error}");
        assert!(error.to_string().contains(index), "{what}: {error}");
    }
    let answer = sqlx::query("INSERT INTO idempotency_keys (idempotency_key, order_id, fingerprint, status, body, at_ms) VALUES ('unique-1', 'ord_x', 'f', 201, '{}', 0)")
        .execute(&pool)
        .await;
    assert!(
        answer.is_err(),
        "a second answer for one key must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_mysql_loses_no_acknowledged_order_and_nothing_is_half_written() {
    let database = TestDatabase::create().await;
    let named = kill_9_mid_load(&["--mysql-url", &database.url]).await;
    let pool = database.pool().await;
    wait_projected(&pool).await;
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(sql)
                .fetch_one(&pool)
                .await
                .map(|row| row.get::<i64, _>(0))
                .expect(sql)
        }
    };
    // Every order the answers named is in MySQL (the HTTP checks already read them back).
    let orders = count("SELECT COUNT(*) FROM orders").await;
    assert_eq!(orders as usize, named.len());
    // Nothing half-written: every order has its items, its first event and a journal record;
    // every kept answer names an existing order; inventory equals what the orders say.
    assert_eq!(count("SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM order_items i WHERE i.order_id = o.order_id)").await, 0);
    assert_eq!(count("SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM outbox e WHERE e.node = o.node AND e.order_id = o.order_id AND e.type = 'order.reserved')").await, 0);
    assert_eq!(count("SELECT COUNT(*) FROM idempotency_keys k WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = k.order_id)").await, 0);
    assert_eq!(
        count("SELECT COUNT(*) FROM inventory i WHERE i.sold <> (SELECT CAST(COALESCE(SUM(oi.quantity), 0) AS SIGNED) FROM order_items oi JOIN orders o ON o.order_id = oi.order_id WHERE oi.sku = i.sku AND o.node = i.node AND o.status = 'paid') OR i.reserved <> (SELECT CAST(COALESCE(SUM(oi.quantity), 0) AS SIGNED) FROM order_items oi JOIN orders o ON o.order_id = oi.order_id WHERE oi.sku = i.sku AND o.node = i.node AND o.status IN ('reserved', 'payment_pending'))").await,
        0,
        "the inventory table disagrees with the orders"
    );
    // One batch is one transaction: after the kill the durable records are a prefix of the log,
    // so neither the journal's lsns nor the events' seqs have a gap.
    assert_no_gaps(&pool, "after the kill").await;
    // The state change, its event and its journal record were written together: every order's
    // current status has its event, and its last change its journal row.
    assert_eq!(count("SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM outbox e WHERE e.order_id = o.order_id AND e.type = CONCAT('order.', o.status))").await, 0);
    assert_eq!(count("SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM journal j WHERE j.node = o.node AND j.lsn = o.updated_lsn)").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_mysql_with_per_core_workers_keeps_every_201_and_leaves_no_gap() {
    // Proves: with the MySQL journal's writer task fed by per-core queues (four workers, so
    // workers share queues on this machine), every order a 201 named is in MySQL after a kill -9
    // mid-load, and the journal's lsns and the events' seqs run without a gap.
    let database = TestDatabase::create().await;
    let named = kill_9_mid_load(&[
        "--mysql-url",
        &database.url,
        "--runtime",
        "per-core",
        "--workers",
        "4",
    ])
    .await;
    let pool = database.pool().await;
    wait_projected(&pool).await;
    let orders: i64 = sqlx::query("SELECT COUNT(*) FROM orders")
        .fetch_one(&pool)
        .await
        .map(|row| row.get(0))
        .expect("orders");
    assert_eq!(orders as usize, named.len());
    assert_no_gaps(&pool, "after the kill").await;
}

/// The order ids of the kept answers under `key` in MySQL (at most one row, by the primary key).
async fn answer_order(pool: &sqlx::MySqlPool, key: &str) -> Option<String> {
    sqlx::query("SELECT order_id FROM idempotency_keys WHERE idempotency_key = ?")
        .bind(key)
        .fetch_optional(pool)
        .await
        .expect("read idempotency_keys")
        .map(|row| String::from_utf8(row.get::<Vec<u8>, _>(0)).expect("utf-8"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_retention_starts_afresh_and_the_journal_goes_on() {
    // Proves: after --idempotency-retention the same key places a new order (in MySQL the old
    // key's rows go, so UNIQUE holds within retention), and the journal keeps taking orders.
    let database = TestDatabase::create().await;
    let app = spawn_app(&[
        "--mysql-url",
        &database.url,
        "--idempotency-retention",
        "2s",
        "--gateway-timeout",
        "500ms",
        "--journal-timeout",
        "1s",
    ]);
    let mut client = app.client();
    client.put_product("R", 100, 100).await;
    let first = client
        .checkout("reused", "R", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(first.status, 201);
    let first_id = first.json()["order_id"].as_str().expect("id").to_owned();
    let replay = client
        .checkout("reused", "R", 1, "tok_ok")
        .await
        .expect("answer");
    assert!(replay.replayed, "within retention the answer is replayed");
    let mut second_id = String::new();
    eventually(
        "the key to pass its retention",
        Duration::from_secs(15),
        async || {
            let answer = client
                .checkout("reused", "R", 1, "tok_ok")
                .await
                .expect("answer");
            assert_eq!(
                answer.status,
                201,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
            second_id = answer.json()["order_id"].as_str().expect("id").to_owned();
            !answer.replayed
        },
    )
    .await;
    assert_ne!(second_id, first_id, "a new order");
    let pool = database.pool().await;
    wait_projected(&pool).await;
    assert_eq!(answer_order(&pool, "reused").await, Some(second_id.clone()));
    // The journal goes on.
    let later = client
        .checkout("later", "R", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(later.status, 201);
    assert_eq!(client.get("/readyz").await.status, 200);
    assert_eq!(client.stock("R").await.3, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_database_refuses_fails_alone() {
    // Proves: a record MySQL refuses (here: its key is already claimed, planted behind the
    // server's back) fails with a clear error of its own, while the others of its batch commit
    // and the journal goes on.
    let database = TestDatabase::create().await;
    let app = spawn_app(&["--mysql-url", &database.url]);
    let mut client = app.client();
    client.put_product("V", 100, 1_000).await;
    let pool = database.pool().await;
    sqlx::query("INSERT INTO journal (node, lsn, first_event_seq, record, order_id, idempotency_key) VALUES ('node_planted', 0, 0, 'planted', 'ord_planted', 'victim')")
        .execute(&pool)
        .await
        .expect("plant a row");
    let addr = app.addr;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            tokio::spawn(async move {
                let key = if i == 7 {
                    "victim".to_owned()
                } else {
                    format!("ok-{i}")
                };
                let mut client = crate::helpers::Client::new(addr);
                let answer = client
                    .checkout(&key, "V", 1, "tok_ok")
                    .await
                    .expect("answer");
                (key, answer)
            })
        })
        .collect();
    for task in tasks {
        let (key, answer) = task.await.expect("task");
        if key == "victim" {
            assert_eq!(
                answer.status,
                500,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
            assert_eq!(answer.json()["error"], "internal");
        } else {
            assert_eq!(
                answer.status,
                201,
                "{key}: {}",
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
    // Nothing of the refused order shows; the journal goes on.
    assert_eq!(client.stock("V").await.3, 15);
    let later = client
        .checkout("after", "V", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(later.status, 201);
    assert_eq!(client.get("/readyz").await.status, 200);
    wait_projected(&pool).await;
    let claim: String =
        sqlx::query("SELECT order_id FROM journal WHERE idempotency_key = 'victim'")
            .fetch_one(&pool)
            .await
            .map(|row| String::from_utf8(row.get::<Vec<u8>, _>(0)).expect("utf-8"))
            .expect("the planted claim");
    assert_eq!(claim, "ord_planted");
    assert_eq!(
        answer_order(&pool, "victim").await,
        None,
        "no answer kept for the refused order"
    );
    // Its lsn is taken by a row saying why, so the log has no gap.
    let refused: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM journal WHERE refused IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(refused, 1, "one journal row marks the refused record");
    // (Its event seqs stay unused: only the lsns are checked.)
    assert_no_lsn_gap(&pool, "after a refused record").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_slower_than_the_timeout_answers_outcome_unknown_then_replays() {
    // Proves: a checkout whose commit outlives --journal-timeout answers 503 with
    // "outcome": "unknown" and Retry-After; the retry gets 409 while the commit runs, then the
    // replay of the one order that was placed.
    let database = TestDatabase::create().await;
    let app = spawn_app(&["--mysql-url", &database.url, "--journal-timeout", "1s"]);
    let mut client = app.client();
    client.put_product("S", 100, 10).await;
    let pool = database.pool().await;
    let mut blocker = pool.acquire().await.expect("connection");
    sqlx::query("LOCK TABLES journal WRITE")
        .execute(&mut *blocker)
        .await
        .expect("lock the journal table");
    let slow = client
        .checkout("slow", "S", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(slow.status, 503);
    let body = slow.json();
    assert_eq!(body["error"], "journal_unavailable");
    assert_eq!(body["outcome"], "unknown", "{body}");
    assert!(slow.retry_after.is_some(), "Retry-After");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Idempotency-Key"),
        "the message says to retry with the same key: {body}"
    );
    let retry = client
        .checkout("slow", "S", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(retry.status, 409);
    assert_eq!(retry.json()["error"], "idempotency_key_in_use");
    sqlx::query("UNLOCK TABLES")
        .execute(&mut *blocker)
        .await
        .expect("unlock");
    drop(blocker);
    let mut replayed = None;
    eventually(
        "the late commit to land",
        Duration::from_secs(15),
        async || {
            let answer = client
                .checkout("slow", "S", 1, "tok_ok")
                .await
                .expect("answer");
            let done = answer.status == 201;
            if done {
                replayed = Some(answer);
            }
            done
        },
    )
    .await;
    let replayed = replayed.expect("replay");
    assert!(replayed.replayed, "the first order's answer, replayed");
    // `orders` is a projection behind the log: read it once the applier has caught up.
    wait_projected(&pool).await;
    let orders: i64 = sqlx::query("SELECT COUNT(*) FROM orders")
        .fetch_one(&pool)
        .await
        .map(|row| row.get(0))
        .expect("count");
    assert_eq!(orders, 1, "one order for the key");
    assert_eq!(client.stock("S").await.3, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorisation_whose_commit_is_slower_than_the_grace_period_is_captured_not_voided() {
    // Proves: the reconciler's orphan scan leaves alone the authorisation of a checkout whose
    // commit is still running past --reconcile-after (a commit may land after --journal-timeout):
    // the paid order it becomes is captured, never a paid order whose payment was voided.
    let database = TestDatabase::create().await;
    let app = spawn_app(&[
        "--mysql-url",
        &database.url,
        "--journal-timeout",
        "1s",
        "--gateway-timeout",
        "1s",
        "--reconcile-after",
        "3s",
    ]);
    let mut client = app.client();
    client.put_product("G", 100, 10).await;
    let pool = database.pool().await;
    let mut blocker = pool.acquire().await.expect("connection");
    sqlx::query("LOCK TABLES journal WRITE")
        .execute(&mut *blocker)
        .await
        .expect("lock the journal table");
    let slow = client
        .checkout("grace", "G", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(slow.status, 503);
    // Past the grace period: three more orphan scans (one every 1.5 s at 3 s), so at least one
    // ran when the authorisation was older than --reconcile-after.
    let scans = |text: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix("turnstile_reconciler_scans_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let before = scans(&String::from_utf8_lossy(&client.get("/metrics").await.body));
    eventually(
        "three orphan scans past the grace period",
        Duration::from_secs(20),
        async || {
            scans(&String::from_utf8_lossy(&client.get("/metrics").await.body)) >= before + 3.0
        },
    )
    .await;
    sqlx::query("UNLOCK TABLES")
        .execute(&mut *blocker)
        .await
        .expect("unlock");
    drop(blocker);
    let mut placed = None;
    eventually(
        "the late commit to land",
        Duration::from_secs(15),
        async || {
            let answer = client
                .checkout("grace", "G", 1, "tok_ok")
                .await
                .expect("answer");
            let done = answer.status == 201;
            if done {
                placed = Some(answer);
            }
            done
        },
    )
    .await;
    assert_eq!(placed.expect("replay").json()["status"], "paid");
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    eventually("the capture", Duration::from_secs(10), async || {
        let text = String::from_utf8_lossy(&client.get("/metrics").await.body).into_owned();
        metric(&text, "turnstile_payments_captured_total") == 1.0
            && metric(&text, "turnstile_payments_owed") == 0.0
    })
    .await;
    let text = String::from_utf8_lossy(&client.get("/metrics").await.body).into_owned();
    assert_eq!(
        metric(&text, "turnstile_payments_voided_total"),
        0.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "turnstile_payments_capture_refused_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_loop_on_mysql_leaves_no_gap_in_lsns_or_event_seqs() {
    kill_9_in_a_loop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_loop_in_write_behind_leaves_no_gap_and_every_order_reaches_mysql() {
    kill_9_in_a_loop(true).await;
}

/// Proves: one batch is one transaction, and the applier's cursor moves with what it covers.
/// Twenty times: load, kill -9 mid-load, restart; after each kill the journal's lsns and the
/// events' seqs in MySQL run without a gap (a prefix of the log). At the end, once MySQL has
/// caught up, every order an answer named (201) is in MySQL's tables, and SQL and HTTP agree on it.
async fn kill_9_in_a_loop(write_behind: bool) {
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut args = vec!["--mysql-url", database.url.as_str()];
    if write_behind {
        args.push("--mysql-write-behind");
    }
    let pool = database.pool().await;
    let mut acknowledged: Vec<crate::helpers::Sent> = Vec::new();
    for round in 0..20usize {
        let mut app = crate::helpers::start(&data_dir, &args);
        if round == 0 {
            let mut admin = app.client();
            for s in 0..4 {
                admin.put_product(&format!("L{s}"), 100, 1_000_000).await;
            }
        }
        let skus: Vec<String> = (0..4).map(|s| format!("L{s}")).collect();
        let load = crate::helpers::Load::start(&app, 16, &format!("loop-{round}"), &skus);
        let kill_after = 50 + (round % 7) * 61;
        eventually(
            "answers before the kill",
            Duration::from_secs(60),
            async || load.answered(Some(201)) >= kill_after,
        )
        .await;
        app.kill_9();
        acknowledged.extend(
            load.stop()
                .await
                .into_iter()
                .filter(|sent| sent.status == 201),
        );
        assert_no_gaps(&pool, &format!("round {round}")).await;
    }
    // Restarted once more: MySQL catches up (start-up in journal mode, the applier behind the
    // embedded journal in write-behind).
    let app = crate::helpers::start(&data_dir, &args);
    let mut client = app.client();
    if write_behind {
        eventually(
            "write-behind to drain its lag",
            Duration::from_secs(60),
            async || {
                let metrics = client.get("/metrics").await;
                String::from_utf8_lossy(&metrics.body).contains("turnstile_mysql_lag_records 0\n")
            },
        )
        .await;
    }
    wait_projected(&pool).await;
    assert_no_gaps(&pool, "after the last restart").await;
    let in_mysql: std::collections::HashSet<String> = sqlx::query("SELECT order_id FROM orders")
        .fetch_all(&pool)
        .await
        .expect("orders")
        .iter()
        .map(|row| String::from_utf8(row.get::<Vec<u8>, _>(0)).expect("utf-8"))
        .collect();
    for crate::helpers::Sent { key, order_id, .. } in &acknowledged {
        assert!(
            in_mysql.contains(order_id),
            "acknowledged order {order_id} (key {key}) is not in MySQL"
        );
    }
    // SQL and HTTP agree: every order in MySQL reads back with the same status over HTTP.
    let rows = sqlx::query("SELECT order_id, status FROM orders ORDER BY order_id LIMIT 300")
        .fetch_all(&pool)
        .await
        .expect("orders");
    for row in rows {
        let id = String::from_utf8(row.get::<Vec<u8>, _>(0)).expect("utf-8");
        let status = String::from_utf8(row.get::<Vec<u8>, _>(1)).expect("utf-8");
        let answer = client.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(answer.status, 200, "{id}");
        assert_eq!(answer.json()["status"], status.as_str(), "{id}");
    }
    // Nothing counted twice: the inventory equals what the orders say.
    let disagreeing: i64 = sqlx::query("SELECT COUNT(*) FROM inventory i WHERE i.sold <> (SELECT CAST(COALESCE(SUM(oi.quantity), 0) AS SIGNED) FROM order_items oi JOIN orders o ON o.order_id = oi.order_id WHERE oi.sku = i.sku AND o.node = i.node AND o.status = 'paid') OR i.reserved <> (SELECT CAST(COALESCE(SUM(oi.quantity), 0) AS SIGNED) FROM order_items oi JOIN orders o ON o.order_id = oi.order_id WHERE oi.sku = i.sku AND o.node = i.node AND o.status IN ('reserved', 'payment_pending'))")
        .fetch_one(&pool)
        .await
        .map(|row| row.get(0))
        .expect("inventory");
    assert_eq!(
        disagreeing, 0,
        "the inventory table disagrees with the orders"
    );
}

/// `turnstile mysql-apply` with these arguments; its stdout, asserting it succeeded.
fn mysql_apply(url: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["mysql-apply", "--mysql-url", url])
        .args(args)
        .output()
        .expect("run turnstile mysql-apply");
    assert!(
        output.status.success(),
        "mysql-apply {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// Checksums of every table the journal writes (the log, the claims, the projections).
async fn checksums(pool: &sqlx::MySqlPool) -> Vec<(String, Option<i64>)> {
    let mut sums = Vec::new();
    for table in [
        "journal",
        "orders",
        "order_items",
        "idempotency_keys",
        "inventory",
        "products",
        "outbox",
        "projection_cursor",
    ] {
        let row = sqlx::query(&format!("CHECKSUM TABLE {table}"))
            .fetch_one(pool)
            .await
            .expect("checksum");
        sums.push((table.to_owned(), row.try_get::<i64, _>(1).ok()));
    }
    sums
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_records_replayed_into_mysql_twice_leave_the_tables_unchanged() {
    // Proves: the applier's cursor is read under a lock in the transaction that moves it, so
    // records handed to it again (a crash right after COMMIT, before the cursor moved in memory;
    // an operator's replay) change nothing, in either mode: both feed the same applier.
    for write_behind in [false, true] {
        let database = TestDatabase::create().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = vec!["--mysql-url", database.url.as_str()];
        if write_behind {
            args.push("--mysql-write-behind");
        }
        let mut app = crate::helpers::start(&dir.path().join("data"), &args);
        let mut client = app.client();
        client.put_product("P", 100, 1_000).await;
        for n in 0..40 {
            let answer = client
                .checkout(&format!("replay-{n}"), "P", 1, "tok_ok")
                .await
                .expect("answer");
            assert_eq!(answer.status, 201);
        }
        let cancelled = client
            .checkout("replay-cancel", "P", 2, "tok_ok")
            .await
            .expect("answer")
            .json();
        let id = cancelled["order_id"].as_str().expect("id").to_owned();
        let refund = client
            .send("POST", &format!("/v1/orders/{id}/cancel"), &[], "")
            .await;
        assert!(refund.status < 300, "cancel: {}", refund.status);
        // Captures and the refund settle after their answers: once none is owed, a restart has
        // nothing left to journal (seen in CI: a capture still owed at the stop was settled by
        // the restarted node, a record the replays had not seen).
        crate::helpers::eventually(
            "nothing owed to the gateway",
            std::time::Duration::from_secs(30),
            async || crate::helpers::metric(&mut client, "turnstile_payments_owed").await == 0.0,
        )
        .await;
        assert!(app.terminate().success(), "clean stop");
        let pool = database.pool().await;
        wait_projected(&pool).await;
        let before = checksums(&pool).await;
        assert!(before.iter().all(|(_, sum)| sum.is_some()), "{before:?}");
        let status = mysql_apply(&database.url, &[]);
        assert!(status.contains(" behind=0 "), "{status}");
        for _ in 0..2 {
            let replayed = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
                .args([
                    "mysql-apply",
                    "--mysql-url",
                    &database.url,
                    "--replay-from",
                    "0",
                ])
                .output()
                .expect("replay");
            assert!(replayed.status.success());
            let said = String::from_utf8_lossy(&replayed.stderr);
            assert!(said.contains("0 record(s) newly applied"), "{said}");
            assert_eq!(
                checksums(&pool).await,
                before,
                "write-behind {write_behind}: a replay changed the tables"
            );
        }
        // And a restart replays nothing either.
        let app = crate::helpers::start(&dir.path().join("data"), &args);
        let mut client = app.client();
        assert_eq!(client.get("/readyz").await.status, 200);
        drop(app);
        assert_eq!(checksums(&pool).await, before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_stops_at_a_record_mysql_refuses_until_an_operator_skips_it() {
    // Proves: in write-behind the embedded journal has answered already, so a record MySQL
    // refuses for good is never skipped silently: the applier stops at it (readyz 503 naming
    // it, the stopped metric), checkouts go on locally, and `turnstile mysql-apply --skip LSN`
    // lets it go on; everything after the skipped record reaches MySQL.
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let app = crate::helpers::start(
        &dir.path().join("data"),
        &["--mysql-url", &database.url, "--mysql-write-behind"],
    );
    let mut client = app.client();
    client.put_product("S", 100, 1_000).await;
    let pool = database.pool().await;
    sqlx::query("INSERT INTO journal (node, lsn, first_event_seq, record, order_id, idempotency_key) VALUES ('node_planted', 0, 0, 'planted', 'ord_planted', 'clash')")
        .execute(&pool)
        .await
        .expect("plant a claim");
    let refused = client
        .checkout("clash", "S", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(refused.status, 201, "the embedded journal acknowledges");
    let mut reason = String::new();
    eventually(
        "the applier to stop at the refused record",
        Duration::from_secs(30),
        async || {
            let ready = client.get("/readyz").await;
            reason = ready.json()["checks"]["mysql"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            ready.status == 503 && reason.contains("stopped at lsn")
        },
    )
    .await;
    let lsn = reason
        .split("stopped at lsn ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .expect("the lsn in the reason")
        .to_owned();
    let metrics = String::from_utf8_lossy(&client.get("/metrics").await.body).into_owned();
    assert!(
        metrics.contains("turnstile_mysql_apply_stopped 1\n"),
        "{metrics}"
    );
    let later = client
        .checkout("after-clash", "S", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(later.status, 201, "checkouts go on locally");
    let later_id = later.json()["order_id"].as_str().expect("id").to_owned();
    mysql_apply(
        &database.url,
        &["--skip", &lsn, "--reason", "test: planted clash"],
    );
    eventually(
        "the applier to go on",
        Duration::from_secs(30),
        async || client.get("/readyz").await.status == 200,
    )
    .await;
    eventually(
        "the later order to reach MySQL",
        Duration::from_secs(30),
        async || {
            sqlx::query("SELECT 1 FROM orders WHERE order_id = ?")
                .bind(&later_id)
                .fetch_optional(&pool)
                .await
                .expect("query")
                .is_some()
        },
    )
    .await;
    let refused_id = refused.json()["order_id"].as_str().expect("id").to_owned();
    let in_orders: Option<sqlx::mysql::MySqlRow> =
        sqlx::query("SELECT 1 FROM orders WHERE order_id = ?")
            .bind(&refused_id)
            .fetch_optional(&pool)
            .await
            .expect("query");
    assert!(
        in_orders.is_none(),
        "the skipped record's projection is not written"
    );
    let logged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM journal WHERE lsn = ?")
        .bind(lsn.parse::<i64>().expect("lsn"))
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(
        logged, 1,
        "the skipped record's log row stays: no gap in journal.lsn"
    );
    assert!(mysql_apply(&database.url, &[]).contains(&format!("skipped=[{lsn}]")));
}

/// A `journal` row's lsn and its claims (order id, idempotency key, payment id).
type ClaimRow = (i64, Option<String>, Option<String>, Option<String>);

/// The records and claims a database of the previous version holds (JSON records, claims in
/// `order_claims`): what `upgrading_a_database_of_the_previous_version…` starts from.
async fn write_previous_version_rows(pool: &sqlx::MySqlPool) {
    use turnstile::domain::{Cents, Currency, CustomerId, IdempotencyKey, OrderId, Sku, Stock};
    use turnstile::engine::order::{Order, OrderItem, OrderStatus, PaymentDue};
    use turnstile::engine::records::{Product, Record, StoredAnswer};
    let now = turnstile::time::now_ms();
    let eur = Currency::parse("EUR").expect("currency");
    let order = |id: &str, status, payment: &str| Order {
        order_id: OrderId::parse(id).expect("id"),
        status,
        customer_id: CustomerId::parse("customer-1").expect("customer"),
        items: vec![OrderItem {
            sku: Sku::parse("A").expect("sku"),
            quantity: 1,
            unit_price_cents: Cents::parse(100).expect("price"),
        }],
        total_cents: 100,
        currency: eur,
        created_at_ms: now,
        hold_deadline_ms: now + 900_000,
        payment_id: Some(payment.to_owned()),
        payment_due: None,
    };
    let placed = |id: &str, key: &str, payment: &str| Record::Order {
        order: Order {
            payment_due: Some(PaymentDue::Capture),
            ..order(id, OrderStatus::Paid, payment)
        },
        previous: None,
        entered: vec![OrderStatus::Reserved, OrderStatus::Paid],
        at_ms: now,
        answer: Some((
            IdempotencyKey::parse(key).expect("key"),
            StoredAnswer {
                fingerprint: format!("fingerprint of {key}"),
                status: 201,
                body: format!("{{\"order_id\":\"{id}\"}}"),
                at_ms: now,
            },
        )),
        replaces_expired_key: false,
    };
    let records: [(i64, i64, Record, Option<&str>); 5] = [
        (
            1,
            1,
            Record::Product {
                product: Product {
                    sku: Sku::parse("A").expect("sku"),
                    name: "product A".into(),
                    price_cents: Cents::parse(100).expect("price"),
                    currency: eur,
                    stock: Stock::parse(10).expect("stock"),
                    max_per_customer: None,
                    admission_rate: None,
                },
            },
            None,
        ),
        (2, 1, placed("ord_1", "k1", "pay_1"), None),
        (
            3,
            3,
            Record::Order {
                order: order("ord_1", OrderStatus::Refunded, "pay_1"),
                previous: Some(OrderStatus::Paid),
                entered: vec![OrderStatus::Refunded],
                at_ms: now,
                answer: None,
                replaces_expired_key: false,
            },
            None,
        ),
        (
            4,
            4,
            placed("ord_x", "kx", "pay_x"),
            Some("refused: a test"),
        ),
        (5, 6, placed("ord_2", "k2", "pay_2"), None),
    ];
    for (lsn, seq, record, refused) in records {
        sqlx::query(
            "INSERT INTO journal (lsn, first_event_seq, record, refused) VALUES (?, ?, ?, ?)",
        )
        .bind(lsn)
        .bind(seq)
        .bind(serde_json::to_vec(&record).expect("JSON"))
        .bind(refused)
        .execute(pool)
        .await
        .expect("a record of the previous version");
    }
    sqlx::query(
        "INSERT INTO order_claims (order_id, idempotency_key, payment_id, lsn) VALUES \
         ('ord_1', 'k1', 'pay_1', 2), ('ord_2', 'k2', 'pay_2', 5), ('ord_ghost', 'kg', NULL, 0)",
    )
    .execute(pool)
    .await
    .expect("claims of the previous version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_a_database_of_the_previous_version_moves_every_claim_onto_its_placing_record() {
    // Proves: migration 20261127000005 puts each claim on the log row of the record that placed
    // its order (not on a later change of it, not on a refused record), keeps a claim with no
    // such record aside under another name, and the UNIQUE keys then hold; the server reads the
    // JSON records, and writes new ones in the binary form with their claims.
    let database = TestDatabase::create_empty().await;
    let pool = database.pool().await;
    let previous = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            turnstile::journal::mysql::MIGRATOR
                .iter()
                .filter(|m| m.version < 20261127000005)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    previous
        .run(&pool)
        .await
        .expect("the previous version's schema");
    write_previous_version_rows(&pool).await;
    database.migrate();

    let claims: Vec<ClaimRow> =
        sqlx::query("SELECT lsn, order_id, idempotency_key, payment_id FROM journal ORDER BY lsn")
            .fetch_all(&pool)
            .await
            .expect("claims")
            .iter()
            .map(|row| {
                let text = |i: usize| {
                    row.get::<Option<Vec<u8>>, _>(i)
                        .map(|b| String::from_utf8(b).expect("utf-8"))
                };
                (row.get(0), text(1), text(2), text(3))
            })
            .collect();
    let claim = |lsn: i64, id: &str, key: &str, pay: &str| {
        (
            lsn,
            Some(id.to_owned()),
            Some(key.to_owned()),
            Some(pay.to_owned()),
        )
    };
    assert_eq!(
        claims,
        vec![
            (1, None, None, None),
            claim(2, "ord_1", "k1", "pay_1"),
            (3, None, None, None),
            (4, None, None, None),
            claim(5, "ord_2", "k2", "pay_2"),
        ]
    );
    let unattached: Vec<String> =
        sqlx::query_scalar("SELECT CONVERT(order_id USING utf8mb4) FROM order_claims_unattached")
            .fetch_all(&pool)
            .await
            .expect("the claims kept aside");
    assert_eq!(unattached, ["ord_ghost"]);
    let second = sqlx::query(
        "INSERT INTO journal (node, lsn, first_event_seq, record, idempotency_key) VALUES ('node_planted', -1, 0, 'x', 'k1')",
    )
    .execute(&pool)
    .await;
    assert!(second.is_err(), "a second claim of k1 must be refused");

    let app = spawn_app(&["--mysql-url", &database.url]);
    let mut client = app.client();
    let log = std::fs::read_to_string(app.data_dir.with_extension("log")).unwrap_or_default();
    assert!(
        log.contains("order_claims_unattached") && log.contains("count=1"),
        "the start names the claims kept aside: {log}"
    );
    let order = client.get("/v1/orders/ord_1").await;
    assert_eq!(order.status, 200);
    assert_eq!(order.json()["status"], "refunded");
    assert_eq!(
        client.stock("A").await.3,
        1,
        "ord_2 is sold, ord_1 refunded"
    );
    let reused = client
        .checkout("k2", "A", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(reused.status, 422, "k2 is known after the upgrade");
    let fresh = client
        .checkout("k3", "A", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(fresh.status, 201);
    let fresh_id = fresh.json()["order_id"].as_str().expect("id").to_owned();
    let row = sqlx::query(
        "SELECT record, CONVERT(idempotency_key USING utf8mb4) FROM journal WHERE order_id = ?",
    )
    .bind(&fresh_id)
    .fetch_one(&pool)
    .await
    .expect("the new order's log row carries its claims");
    assert_eq!(
        row.get::<Vec<u8>, _>(0)[0],
        1,
        "a new record is in the binary form"
    );
    assert_eq!(row.get::<String, _>(1), "k3");
    assert_no_lsn_gap(&pool, "after the upgrade").await;
}

/// Found by attack: a second node started on a database another node uses as its journal was
/// not refused: it loaded a state the first kept changing, answered stock from it, and its
/// checkouts failed on the log's keys with `500`. The database's own named lock, held by the
/// journal's node on a connection of its own, refuses it now (exit 2), and is free again once
/// that node is gone (its socket closed by `kill -9`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_one_journal_database_is_refused_until_the_first_is_gone() {
    let database = TestDatabase::create().await;
    let first = spawn_app(&["--mysql-url", &database.url]);
    first.client().put_product("W", 100, 4).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let second_dir = dir.path().join("second");
    for extra in [&[][..], &["--mysql-write-behind"][..]] {
        let mut args = vec!["--mysql-url", database.url.as_str()];
        args.extend_from_slice(extra);
        let (code, stderr) = crate::helpers::serve_refused(&second_dir, &args);
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("another node holds the journal of this database"),
            "{extra:?}: {stderr}"
        );
    }
    let mut client = first.client();
    assert_eq!(
        client
            .checkout("w-1", "W", 1, "tok_ok")
            .await
            .expect("answer")
            .status,
        201,
        "the first node goes on"
    );
    drop(first);
    let second = crate::helpers::start(&second_dir, &["--mysql-url", &database.url]);
    assert_eq!(second.client().stock("W").await, (4, 3, 0, 1));
}

/// Found by attack: the journal lock was named after the first 46 characters of the database's
/// name, so a node on a second database whose name began like the first's was refused while a
/// node ran on the first. The lock is named after a hash of the whole name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_whose_long_names_begin_alike_each_take_a_node() {
    let stem = format!(
        "turnstile_test_{}_{}",
        turnstile::random::hex(&turnstile::random::random_bytes(6).expect("random")),
        "x".repeat(30)
    );
    let mut nodes = Vec::new();
    for end in ["a", "b"] {
        let database = TestDatabase::create_named(&format!("{stem}_{end}")).await;
        database.migrate();
        let node = spawn_app(&["--mysql-url", &database.url]);
        assert_eq!(node.client().put_product("L", 100, 1).await.status, 200);
        nodes.push(node);
    }
}

/// Found by attack: `mysql-apply --skip` took an lsn past the journal's end (stored, exit 0), and
/// an unknown database was exit 1. Both are the operator's to change: exit 2, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_apply_refuses_a_skip_it_cannot_stop_at_and_an_unknown_database_with_exit_2() {
    let database = TestDatabase::create().await;
    let run = |url: &str, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(["mysql-apply", "--mysql-url", url])
            .args(args)
            .output()
            .expect("run turnstile mysql-apply")
    };
    let past_the_end = run(&database.url, &["--skip", "999999999"]);
    assert_eq!(
        past_the_end.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&past_the_end.stderr)
    );
    assert!(String::from_utf8_lossy(&past_the_end.stderr).contains("cannot be skipped"));
    let status = mysql_apply(&database.url, &[]);
    assert!(status.contains("skipped=[]"), "{status}");
    let unknown = database
        .url
        .replace(&database.name, "turnstile_no_such_database");
    let missing = run(&unknown, &[]);
    assert_eq!(
        missing.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

/// The projections hold a prefix of the log, never more: a database whose cursor is past the
/// log's end (tables holding records no journal has, as a node that had lost the database could
/// once write) is refused at start with exit 2, instead of skipping the log's next records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_ahead_of_the_journal_are_refused_at_start_with_exit_2() {
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let pool = database.pool().await;
    {
        let app = crate::helpers::start(&data_dir, &["--mysql-url", &database.url]);
        assert_eq!(app.client().put_product("A", 100, 1).await.status, 200);
        wait_projected(&pool).await;
    }
    // The database's one node's cursor.
    sqlx::query("UPDATE projection_cursor SET applied_lsn = applied_lsn + 5")
        .execute(&pool)
        .await
        .expect("move the cursor");
    let (code, stderr) = crate::helpers::serve_refused(&data_dir, &["--mysql-url", &database.url]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("ahead of the journal"), "{stderr}");
}
