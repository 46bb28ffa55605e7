//! `max_per_customer` (API.md, "Per-customer limit"): 50 checkouts of one customer at once under
//! 50 keys buy exactly the limit; a cancelled order gives its units back (one more, and only one);
//! a declined payment never counted; a refused key is judged afresh when sent again; the limit
//! holds after `kill -9` and a restart, on the embedded journal and on MySQL; `PUT` keeps, changes
//! and clears it; two nodes share one count.

use crate::helpers::{start, Client, JsonBody, TestDatabase};
use serde_json::{json, Value};

const CUSTOMER: &str = "greedy";

async fn put(client: &mut Client, body: Value) -> (u16, Value) {
    let answer = client
        .send("PUT", "/v1/products/LTD", &[], &body.to_string())
        .await;
    let status = answer.status;
    (status, answer.json())
}

fn product(limit: Option<Value>) -> Value {
    let mut body =
        json!({"name": "limited drop", "price_cents": 2_500, "currency": "EUR", "stock": 100});
    if let Some(limit) = limit {
        body["max_per_customer"] = limit;
    }
    body
}

/// One unit of `LTD` for `customer` under `key`: status and body.
async fn buy(client: &mut Client, key: &str, customer: &str, token: &str) -> (u16, Value) {
    let body = json!({
        "items": [{"sku": "LTD", "quantity": 1}],
        "customer_id": customer,
        "payment_token": token,
    })
    .to_string();
    let answer = client
        .send("POST", "/v1/checkout", &[("idempotency-key", key)], &body)
        .await;
    let status = answer.status;
    (
        status,
        serde_json::from_slice(&answer.body).unwrap_or_default(),
    )
}

/// 50 checkouts of the customer at once, each under its own key and connection: the keys that
/// bought, with their orders.
async fn fifty_at_once(apps: &[&crate::helpers::TestApp], round: &str) -> Vec<(String, String)> {
    let tasks: Vec<_> = (0..50)
        .map(|n| {
            let mut client = apps[n % apps.len()].client();
            let key = format!("{round}-{n}");
            tokio::spawn(async move {
                let (status, body) = buy(&mut client, &key, CUSTOMER, "tok_ok").await;
                (key, status, body)
            })
        })
        .collect();
    let mut bought = Vec::new();
    for task in tasks {
        let (key, status, body) = task.await.expect("buyer");
        match status {
            201 => {
                let order_id = body["order_id"].as_str().expect("order_id").to_owned();
                bought.push((key, order_id));
            }
            409 => {
                assert_eq!(body["error"], "customer_limit_reached", "{body}");
                assert_eq!(body["sku"], "LTD", "{body}");
            }
            other => panic!("{key}: {other} {body}"),
        }
    }
    bought
}

async fn the_limit_holds(journal: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut app = start(&data_dir, journal);
    let mut client = app.client();
    let (status, body) = put(&mut client, product(Some(json!(2)))).await;
    assert_eq!(
        (status, &body["max_per_customer"]),
        (200, &json!(2)),
        "{body}"
    );

    // Exactly the limit, whatever the concurrency.
    let bought = fifty_at_once(&[&app], "first").await;
    assert_eq!(bought.len(), 2, "{bought:?}");
    assert_eq!(
        crate::helpers::metric(&mut client, "turnstile_rejections_customer_limit_total").await,
        48.0
    );
    let (_, available, reserved, sold) = client.stock("LTD").await;
    assert_eq!((available, reserved, sold), (98, 0, 2));
    // Another customer has a limit of its own; a declined payment never counts.
    assert_eq!(
        buy(&mut client, "other-1", "someone-else", "tok_ok")
            .await
            .0,
        201
    );
    assert_eq!(
        buy(&mut client, "declined", "careful", "tok_decline")
            .await
            .0,
        402
    );
    assert_eq!(
        buy(&mut client, "careful-1", "careful", "tok_ok").await.0,
        201
    );
    assert_eq!(
        buy(&mut client, "careful-2", "careful", "tok_ok").await.0,
        201
    );

    // A cancelled order gives its unit back: one more, and only one. A key refused for the
    // limit is judged afresh when sent again (the refusal is not kept under it).
    let refused_key = (0..50)
        .map(|n| format!("first-{n}"))
        .find(|key| bought.iter().all(|(k, _)| k != key))
        .expect("a refused key");
    let order_id = &bought[0].1;
    let cancelled = client
        .send("POST", &format!("/v1/orders/{order_id}/cancel"), &[], "")
        .await;
    assert_eq!(cancelled.status, 200);
    assert_eq!(
        buy(&mut client, &refused_key, CUSTOMER, "tok_ok").await.0,
        201
    );
    assert_eq!(
        buy(&mut client, "after-cancel", CUSTOMER, "tok_ok").await.0,
        409
    );

    // kill -9 and a restart: the count is rebuilt from the journal.
    app.kill_9();
    let app = start(&data_dir, journal);
    let mut client = app.client();
    assert_eq!(fifty_at_once(&[&app], "after-restart").await.len(), 0);
    let (status, body) = put(&mut client, product(None)).await;
    assert_eq!(
        (status, &body["max_per_customer"]),
        (200, &json!(2)),
        "omitted keeps it: {body}"
    );
    assert_eq!(fifty_at_once(&[&app], "still").await.len(), 0);
    // Raised to 3: one more; cleared: no limit.
    assert_eq!(put(&mut client, product(Some(json!(3)))).await.0, 200);
    assert_eq!(fifty_at_once(&[&app], "raised").await.len(), 1);
    let (status, body) = put(&mut client, product(Some(Value::Null))).await;
    assert_eq!(
        (status, &body["max_per_customer"]),
        (200, &Value::Null),
        "{body}"
    );
    assert_eq!(
        buy(&mut client, "unlimited", CUSTOMER, "tok_ok").await.0,
        201
    );
    for bad in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("2"),
        json!(4_294_967_296u64),
    ] {
        assert_eq!(
            put(&mut client, product(Some(bad.clone()))).await.0,
            400,
            "{bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_checkouts_of_one_customer_buy_exactly_the_limit_through_cancels_and_kill_9() {
    the_limit_holds(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_mysql_journal_the_limit_holds_through_cancels_and_kill_9() {
    let database = TestDatabase::create().await;
    the_limit_holds(&["--mysql-url", &database.url]).await;
}

/// Several nodes share one count per customer (Redis, `cluster::limits`): 50 checkouts of one
/// customer at once, alternating between two nodes, buy exactly the limit; a cancel gives one
/// back to both nodes (one more, and only one); after a `kill -9` and restart of a node the limit
/// still holds; another customer has a limit of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_two_nodes_the_limit_holds_through_a_cancel_and_kill_9() {
    let database = TestDatabase::create().await;
    let redis = crate::helpers::TestRedis::create("limits").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |node: &str| {
        let mut args = vec![
            "--mysql-url".to_owned(),
            database.url.clone(),
            "--node-id".to_owned(),
            node.to_owned(),
            "--cluster-secret".to_owned(),
            "limits-cluster-secret".to_owned(),
        ];
        args.extend(redis.args());
        args
    };
    let start_node = |node: &str| {
        let args = args(node);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start(&dir.path().join(node), &args)
    };
    let mut a = start_node("node-a");
    let b = start_node("node-b");
    let mut client = a.client();
    let (status, body) = put(&mut client, product(Some(json!(2)))).await;
    assert_eq!(
        (status, &body["max_per_customer"]),
        (200, &json!(2)),
        "{body}"
    );
    let mut on_b = b.client();
    crate::helpers::eventually(
        "node b to know the limit",
        std::time::Duration::from_secs(5),
        async || on_b.get("/v1/products/LTD").await.json()["max_per_customer"] == 2,
    )
    .await;

    let bought = fifty_at_once(&[&a, &b], "first").await;
    assert_eq!(bought.len(), 2, "{bought:?}");
    assert_eq!(
        buy(&mut on_b, "other-1", "someone-else", "tok_ok").await.0,
        201
    );
    let order_id = &bought[0].1;
    let cancelled = client
        .send("POST", &format!("/v1/orders/{order_id}/cancel"), &[], "")
        .await;
    assert_eq!(
        cancelled.status,
        200,
        "{}",
        String::from_utf8_lossy(&cancelled.body)
    );
    // The give-back reaches Redis right after the refund is durable (in the background).
    crate::helpers::eventually(
        "the cancel's unit back in the shared count",
        std::time::Duration::from_secs(10),
        async || buy(&mut on_b, "after-cancel", CUSTOMER, "tok_ok").await.0 == 201,
    )
    .await;
    assert_eq!(
        fifty_at_once(&[&a, &b], "second").await.len(),
        0,
        "one more, and only one"
    );

    a.kill_9();
    let a = start_node("node-a");
    assert_eq!(fifty_at_once(&[&a, &b], "after-restart").await.len(), 0);

    // Found by attack: a limit set on a product that already sold counts those orders (each node
    // adds its own within a second), and an order refunded while the limit was cleared counts no
    // more once it is set again.
    let mut on_a = a.client();
    let limit_everywhere = async |limit: Value| {
        for app in [&a, &b] {
            let mut client = app.client();
            crate::helpers::eventually(
                "every node to know the limit",
                std::time::Duration::from_secs(5),
                async || client.get("/v1/products/LTD").await.json()["max_per_customer"] == limit,
            )
            .await;
        }
    };
    assert_eq!(put(&mut on_a, product(Some(Value::Null))).await.0, 200);
    limit_everywhere(Value::Null).await;
    for n in 0..3 {
        let mut client = [&a, &b][n % 2].client();
        assert_eq!(
            buy(&mut client, &format!("early-{n}"), "early", "tok_ok")
                .await
                .0,
            201
        );
    }
    let (status, flipped) = buy(&mut on_b, "flip-1", "flip", "tok_ok").await;
    assert_eq!(status, 201, "{flipped}");
    let flipped = flipped["order_id"].as_str().expect("order_id").to_owned();
    // Bought with the limit set, then refunded while it is cleared.
    assert_eq!(put(&mut on_a, product(Some(json!(2)))).await.0, 200);
    limit_everywhere(json!(2)).await;
    assert_eq!(buy(&mut on_a, "flip-0", "flip", "tok_ok").await.0, 201);
    assert_eq!(put(&mut on_a, product(Some(Value::Null))).await.0, 200);
    limit_everywhere(Value::Null).await;
    let cancelled = on_a
        .send("POST", &format!("/v1/orders/{flipped}/cancel"), &[], "")
        .await;
    assert_eq!(cancelled.status, 200);
    assert_eq!(put(&mut on_a, product(Some(json!(2)))).await.0, 200);
    limit_everywhere(json!(2)).await;
    let mut shared = redis.connection().await;
    let early_orders = format!("{}limit:early/LTD", redis.prefix);
    crate::helpers::eventually(
        "both nodes to add the orders bought before the limit",
        std::time::Duration::from_secs(5),
        async || {
            redis::cmd("HLEN")
                .arg(&early_orders)
                .query_async::<i64>(&mut shared)
                .await
                .unwrap_or(0)
                == 3
        },
    )
    .await;
    for (n, client) in [&mut on_a, &mut on_b].into_iter().enumerate() {
        let (status, body) = buy(client, &format!("early-more-{n}"), "early", "tok_ok").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("customer_limit_reached")),
            "3 bought before the limit of 2: {body}"
        );
    }
    let (status, body) = buy(&mut on_b, "flip-2", "flip", "tok_ok").await;
    assert_eq!(status, 201, "the refunded order counts no more: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_put_without_the_limit_racing_one_that_sets_it_keeps_it() {
    // Found by attack: the handler read the limit to keep before its change waited for the one
    // in flight, so a restock racing the PUT that set the limit cleared it.
    let app = crate::helpers::spawn_app(&[]);
    let mut client = app.client();
    for round in 0..30 {
        assert_eq!(put(&mut client, product(Some(Value::Null))).await.0, 200);
        let (mut a, mut b) = (app.client(), app.client());
        let stock = 1_000 + round;
        let sets = tokio::spawn(async move {
            let mut body = product(Some(json!(2)));
            body["stock"] = json!(stock);
            put(&mut a, body).await.0
        });
        let keeps = tokio::spawn(async move {
            let mut body = product(None);
            body["stock"] = json!(stock + 1);
            put(&mut b, body).await.0
        });
        assert_eq!(sets.await.expect("put"), 200);
        assert_eq!(keeps.await.expect("put"), 200);
        let now = client.get("/v1/products/LTD").await.json();
        assert_eq!(now["max_per_customer"], 2, "round {round}: {now}");
    }
}
