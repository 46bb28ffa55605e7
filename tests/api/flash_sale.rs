//! A flash sale over HTTP: stock 100, 2,000 checkouts from 64 concurrent clients, a tenth sent twice
//! with the same key and a tenth paying with a declined card. Exactly 100 orders are paid, replays
//! are identical, declined orders gave their stock back, and the identity holds.

use crate::helpers::{spawn_app, JsonBody, TestApp, TestDatabase};
use sqlx::Row;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_sells_exactly_the_stock() {
    flash_sale(&spawn_app(&[])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_on_mysql_sells_exactly_the_stock_and_sql_agrees() {
    let database = TestDatabase::create().await;
    let app = spawn_app(&["--mysql-url", &database.url]);
    flash_sale(&app).await;
    let (stock, available, reserved, sold) = app.client().stock("FLASH").await;
    let pool = database.pool().await;
    crate::helpers::wait_projected(&pool).await;
    let row = sqlx::query(
        "SELECT p.stock, i.reserved, i.sold, \
           (SELECT CAST(COALESCE(SUM(oi.quantity), 0) AS SIGNED) FROM order_items oi JOIN orders o ON o.order_id = oi.order_id \
             WHERE oi.sku = p.sku AND o.status = 'paid') AS paid_units \
         FROM products p JOIN inventory i ON i.sku = p.sku WHERE p.sku = 'FLASH'",
    )
    .fetch_one(&pool)
    .await
    .expect("query");
    let (sql_stock, sql_reserved, sql_sold): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let paid_units: i64 = row.get(3);
    assert_eq!((sql_stock, sql_reserved, sql_sold), (stock, reserved, sold));
    assert_eq!(paid_units, sold, "paid orders per SKU = sold");
    assert_eq!(sql_stock - sql_reserved - sql_sold, available);
}

async fn flash_sale(app: &TestApp) {
    let mut admin = app.client();
    assert_eq!(admin.put_product("FLASH", 4_999, 100).await.status, 200);
    let next = Arc::new(AtomicUsize::new(0));
    let total = 2_000;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (next, mut client) = (Arc::clone(&next), app.client());
            tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return results;
                    }
                    let key = format!("flash-{i}");
                    let token = if i % 10 == 5 { "tok_decline" } else { "tok_ok" };
                    let first = client
                        .checkout(&key, "FLASH", 1, token)
                        .await
                        .expect("answer");
                    let second = if i % 10 == 3 {
                        Some(
                            client
                                .checkout(&key, "FLASH", 1, token)
                                .await
                                .expect("answer"),
                        )
                    } else {
                        None
                    };
                    results.push((i, first, second));
                }
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await.expect("client task"));
    }
    assert_eq!(results.len(), total);

    let mut paid = HashSet::new();
    let mut declined = Vec::new();
    for (i, first, second) in &results {
        assert!(
            !first.replayed,
            "request {i}: a first answer is never a replay"
        );
        let body = first.json();
        match first.status {
            201 => {
                assert_eq!(body["status"], "paid", "{body}");
                assert!(paid.insert(body["order_id"].as_str().expect("order_id").to_owned()));
            }
            402 => {
                assert_eq!(body["error"], "payment_declined");
                declined.push(body["order_id"].as_str().expect("order_id").to_owned());
            }
            409 => {
                assert_eq!(body["error"], "out_of_stock");
                assert_eq!(body["sku"], "FLASH");
            }
            other => panic!("request {i}: unexpected {other}: {body}"),
        }
        if let Some(second) = second {
            assert!(
                second.replayed,
                "request {i}: the double submit was not replayed"
            );
            assert_eq!(second.status, first.status, "request {i}");
            assert_eq!(second.body, first.body, "request {i}: the replay differs");
        }
    }
    assert_eq!(paid.len(), 100, "exactly the stock is sold");
    assert_eq!(admin.stock("FLASH").await, (100, 0, 0, 100));
    for order_id in declined.iter().take(20) {
        let order = admin.get(&format!("/v1/orders/{order_id}")).await.json();
        assert_eq!(order["status"], "released", "{order}");
    }
    let events = admin.all_events().await;
    let paid_events = events.iter().filter(|e| e["type"] == "order.paid").count();
    assert_eq!(paid_events, 100);
    let released_events = events
        .iter()
        .filter(|e| e["type"] == "order.released")
        .count();
    assert_eq!(released_events, declined.len());
    for (i, event) in events.iter().enumerate() {
        assert_eq!(
            event["seq"].as_u64(),
            Some(i as u64 + 1),
            "the event log has no gaps"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_another_body_is_refused_and_concurrent_uses_wait() {
    let app = spawn_app(&["--gateway-timeout", "400ms"]);
    let mut admin = app.client();
    admin.put_product("K", 100, 10).await;
    let first = admin
        .checkout("same", "K", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(first.status, 201);
    let other = admin
        .checkout("same", "K", 2, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(other.status, 422);
    assert_eq!(other.json()["error"], "idempotency_key_reused");
    // Field order and white space do not make another request.
    let reordered = r#"{ "payment_token": "tok_ok", "customer_id": "customer-1",
        "items": [ { "quantity": 1, "sku": "K" } ] }"#;
    let replay = admin
        .send(
            "POST",
            "/v1/checkout",
            &[("idempotency-key", "same")],
            reordered,
        )
        .await;
    assert!(replay.replayed);
    assert_eq!(replay.body, first.body);

    // 16 clients at once with one key; the gateway takes 400 ms (tok_timeout), so most arrive while
    // the first is running.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut client = app.client();
            tokio::spawn(async move {
                client
                    .checkout("contended", "K", 1, "tok_timeout")
                    .await
                    .expect("answer")
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    let originals: Vec<_> = answers
        .iter()
        .filter(|a| !a.replayed && a.status != 409)
        .collect();
    assert_eq!(originals.len(), 1, "exactly one request ran: {answers:?}");
    let original = originals[0];
    assert_eq!(original.status, 504);
    for answer in &answers {
        match (answer.status, answer.replayed) {
            (409, false) => assert_eq!(answer.json()["error"], "idempotency_key_in_use"),
            (_, true) => assert_eq!(answer.body, original.body),
            _ => assert!(std::ptr::eq(answer, original)),
        }
    }
    // One order for the key, released (the gateway never answered), its unit back.
    assert_eq!(admin.stock("K").await, (10, 9, 0, 1));
    let events = admin.all_events().await;
    let order_id = original.json()["order_id"]
        .as_str()
        .expect("order_id")
        .to_owned();
    let for_order: Vec<_> = events
        .iter()
        .filter(|e| e["order_id"] == order_id.as_str())
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(for_order, vec!["order.reserved", "order.released"]);
}
