//! Retention: finished orders and kept answers leave memory once past their retention, the stock
//! they sold stays counted (also across a restart), a key past retention starts afresh, and with
//! MySQL an order that left memory is still answered from the database.

use crate::helpers::{eventually, spawn_app, start, Client, JsonBody, TestDatabase};
use std::time::Duration;

/// A gauge of `/metrics`.
async fn gauge(client: &mut Client, name: &str) -> i64 {
    let text = client.get("/metrics").await.body;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no gauge {name} in /metrics"))
}

async fn retention_round(mysql_url: Option<&str>) {
    // Retentions must outlive a checkout's longest run (--gateway-timeout plus
    // --journal-timeout): short timeouts let them be short.
    let mut args = vec![
        "--order-retention",
        "2s",
        "--idempotency-retention",
        "2s",
        "--gateway-timeout",
        "500ms",
        "--journal-timeout",
        "1s",
    ];
    if let Some(url) = mysql_url {
        args.extend(["--mysql-url", url]);
    }
    let app = spawn_app(&args);
    let mut client = app.client();
    client.put_product("K", 100, 10).await;
    let first = client
        .checkout("kept", "K", 2, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(first.status, 201);
    let order_id = first.json()["order_id"].as_str().expect("id").to_owned();
    assert_eq!(gauge(&mut client, "turnstile_orders_in_memory").await, 1);

    eventually(
        "the order to leave memory",
        Duration::from_secs(15),
        async || {
            gauge(&mut client, "turnstile_orders_in_memory").await == 0
                && gauge(&mut client, "turnstile_idempotency_keys_in_memory").await == 0
        },
    )
    .await;
    // Its units stay sold.
    assert_eq!(client.stock("K").await.3, 2);
    let path = format!("/v1/orders/{order_id}");
    let read = client.get(&path).await;
    match mysql_url {
        // MySQL keeps it: the order is answered from the database, as it was placed.
        Some(_) => {
            assert_eq!(read.status, 200);
            assert_eq!(read.json(), first.json());
        }
        // The embedded journal keeps only what memory keeps.
        None => assert_eq!(read.status, 404),
    }
    // The key starts afresh: a new order.
    let again = client
        .checkout("kept", "K", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(
        again.status,
        201,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert!(!again.replayed);
    assert_ne!(again.json()["order_id"], first.json()["order_id"]);
    assert_eq!(client.stock("K").await.3, 3);

    // A restart loads only what is live, and counts every unit sold.
    let data_dir = app.data_dir.clone();
    let (_, dir) = app.into_parts();
    let restarted = start(&data_dir, &args);
    let mut client = restarted.client();
    assert_eq!(client.stock("K").await.3, 3);
    let read = client.get(&path).await;
    assert_eq!(read.status, if mysql_url.is_some() { 200 } else { 404 });
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_orders_and_keys_leave_memory_and_their_units_stay_sold() {
    retention_round(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mysql_an_order_past_retention_is_answered_from_the_database() {
    let database = TestDatabase::create().await;
    retention_round(Some(&database.url)).await;
}

#[tokio::test]
async fn carts_are_capped_and_expired_ones_make_room() {
    // Proves: past --carts-max, POST /v1/carts answers 503 overloaded with Retry-After (anyone may
    // create carts at any rate, so memory needs the bound); once carts expire there is room again.
    let app = spawn_app(&["--carts-max", "2", "--cart-ttl", "1s"]);
    let mut client = app.client();
    for _ in 0..2 {
        assert_eq!(client.send("POST", "/v1/carts", &[], "").await.status, 201);
    }
    let full = client.send("POST", "/v1/carts", &[], "").await;
    assert_eq!(full.status, 503);
    assert_eq!(full.json()["error"], "overloaded");
    assert!(full.retry_after.is_some());
    assert_eq!(gauge(&mut client, "turnstile_carts_in_memory").await, 2);
    eventually(
        "expired carts to make room",
        Duration::from_secs(15),
        async || client.send("POST", "/v1/carts", &[], "").await.status == 201,
    )
    .await;
}
