//! The MySQL journal against the machine's real MariaDB, each test in a database of its own: the
//! database itself refuses a second order for one key or one payment, and a kill -9 leaves every
//! acknowledged order in MySQL with nothing half-written.

use crate::crash::kill_9_mid_load;
use crate::helpers::{spawn_app, JsonBody, TestDatabase};
use sqlx::Row;

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
    let payment_id: String = sqlx::query("SELECT payment_id FROM orders WHERE order_id = ?")
        .bind(order_id)
        .fetch_one(&pool)
        .await
        .map(|row| String::from_utf8(row.get::<Vec<u8>, _>(0)).expect("utf-8"))
        .expect("the order is in MySQL");
    let insert = "INSERT INTO orders (order_id, status, customer_id, total_cents, currency, \
                  created_at_ms, hold_deadline_ms, payment_id, idempotency_key, updated_lsn) \
                  VALUES (?, 'paid', 'c', 100, 'EUR', 0, 0, ?, ?, 0)";
    for (what, payment, key) in [
        ("same idempotency key", "pay_other", "unique-1"),
        ("same payment id", payment_id.as_str(), "unique-2"),
    ] {
        let error = sqlx::query(insert)
            .bind("ord_intruder")
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
    assert_eq!(count("SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM outbox e WHERE e.order_id = o.order_id AND e.type = 'order.reserved')").await, 0);
    assert_eq!(count("SELECT COUNT(*) FROM idempotency_keys k WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = k.order_id)").await, 0);
    assert_eq!(
        count("SELECT COUNT(*) FROM inventory i WHERE i.sold <> (SELECT CAST(COALESCE(SUM(oi.quantity), 0) AS SIGNED) FROM order_items oi JOIN orders o ON o.order_id = oi.order_id WHERE oi.sku = i.sku AND o.status = 'paid') OR i.reserved <> (SELECT CAST(COALESCE(SUM(oi.quantity), 0) AS SIGNED) FROM order_items oi JOIN orders o ON o.order_id = oi.order_id WHERE oi.sku = i.sku AND o.status IN ('reserved', 'payment_pending'))").await,
        0,
        "the inventory table disagrees with the orders"
    );
    // The state change, its event and its journal record were written together: every order's
    // current status has its event, and its last change its journal row. (Sequence numbers may
    // skip where a kill cut a batch whose parts commit side by side; readers never see a gap
    // fill in later, since the missing records never commit.)
    assert_eq!(count("SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM outbox e WHERE e.order_id = o.order_id AND e.type = CONCAT('order.', o.status))").await, 0);
    assert_eq!(count("SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM journal j WHERE j.lsn = o.updated_lsn)").await, 0);
}
