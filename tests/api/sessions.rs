//! Carts, submission locks and answers in Redis, shared by two real server processes (each with its
//! own embedded journal) through the machine's Redis, each test under its own key prefix.

use super::helpers::{eventually, spawn_app, Client, JsonBody, TestApp, TestRedis};
use serde_json::{json, Value};
use std::time::Duration;

/// Two nodes on one Redis prefix, the same products PUT on both (stock is per node).
async fn two_nodes(
    redis: &TestRedis,
    extra: &[&str],
    products: &[(&str, i64)],
) -> (TestApp, TestApp) {
    let mut args: Vec<String> = redis.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (a, b) = (spawn_app(&args), spawn_app(&args));
    for app in [&a, &b] {
        let mut client = app.client();
        for (sku, stock) in products {
            assert_eq!(client.put_product(sku, 250, *stock).await.status, 200);
        }
    }
    (a, b)
}

async fn create_cart(client: &mut Client) -> String {
    let created = client.send("POST", "/v1/carts", &[], "").await;
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    created.json()["cart_id"]
        .as_str()
        .expect("cart_id")
        .to_owned()
}

async fn set_item(client: &mut Client, cart: &str, sku: &str, quantity: i64) -> (u16, Value) {
    let answer = client
        .send(
            "PUT",
            &format!("/v1/carts/{cart}/items/{sku}"),
            &[],
            &json!({ "quantity": quantity }).to_string(),
        )
        .await;
    (answer.status, answer.json())
}

fn lines(cart: &Value) -> Vec<(String, i64)> {
    cart["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|l| {
            (
                l["sku"].as_str().unwrap().to_owned(),
                l["quantity"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// A checkout under `key` with `body`: its status, its body as text, whether it was a replay.
pub(crate) async fn checkout(client: &mut Client, key: &str, body: &Value) -> (u16, String, bool) {
    let answer = client
        .send(
            "POST",
            "/v1/checkout",
            &[("idempotency-key", key)],
            &body.to_string(),
        )
        .await;
    (
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
        answer.replayed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_made_on_one_node_is_changed_and_checked_out_on_the_other() {
    cart_on_two_nodes(TestRedis::create("carts").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_cart_made_on_one_node_is_changed_and_checked_out_on_the_other() {
    let redis = TestRedis::on_cluster("carts").await;
    // One node of the cluster given as the only URL: not ready, saying what to give instead.
    let mut args = redis.args();
    args[1] = args[1].split(',').next().expect("a node").to_owned();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let alone = spawn_app(&args);
    let mut client = alone.client();
    eventually(
        "the node to say its Redis is a cluster's",
        Duration::from_secs(10),
        async || {
            let ready = client.get("/readyz").await;
            ready.json()["checks"]["redis"]
                .as_str()
                .is_some_and(|r| r.contains("comma-separated"))
        },
    )
    .await;
    let cart = client.send("POST", "/v1/carts", &[], "").await;
    assert_eq!(cart.status, 503, "nothing stored on a cluster's node alone");
    cart_on_two_nodes(redis).await;
}

async fn cart_on_two_nodes(mut redis: TestRedis) {
    let (a, b) = two_nodes(&redis, &[], &[("A", 10), ("B", 10), ("Z", 0)]).await;
    let (mut on_a, mut on_b) = (a.client(), b.client());

    let cart = create_cart(&mut on_a).await;
    assert_eq!(set_item(&mut on_a, &cart, "B", 1).await.0, 200);
    // Read and changed on the other node, seen on the first.
    let read = on_b.get(&format!("/v1/carts/{cart}")).await;
    assert_eq!(read.status, 200);
    assert_eq!(lines(&read.json()), vec![("B".to_owned(), 1)]);
    let (status, changed) = set_item(&mut on_b, &cart, "A", 2).await;
    assert_eq!(status, 200);
    assert_eq!(
        lines(&changed),
        vec![("B".into(), 1), ("A".into(), 2)],
        "lines keep the order they were added"
    );
    assert_eq!(set_item(&mut on_b, &cart, "B", 3).await.0, 200);
    let (status, _) = set_item(&mut on_b, &cart, "nope", 1).await;
    assert_eq!(status, 404, "unknown sku");
    let (status, body) = set_item(&mut on_b, "cart_nope", "A", 1).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let seen = on_a.get(&format!("/v1/carts/{cart}")).await.json();
    assert_eq!(lines(&seen), vec![("B".into(), 3), ("A".into(), 2)]);

    // Checked out on the other node: one order there, the cart emptied for both.
    let body = json!({"cart_id": cart, "customer_id": "c1", "payment_token": "tok_ok"});
    let (status, first, replayed) = checkout(&mut on_b, "cart-key", &body).await;
    assert_eq!((status, replayed), (201, false), "{first}");
    assert_eq!(on_b.stock("A").await, (10, 8, 0, 2));
    assert_eq!(on_b.stock("B").await, (10, 7, 0, 3));
    assert_eq!(on_a.stock("A").await, (10, 10, 0, 0), "stock is per node");
    // A replay on the other node is identical, byte for byte, and changes nothing.
    // `409 idempotency_key_in_use` until the first node has stored its answer (it does so right
    // after its commit, without making its client wait), then the replay.
    let (status, again, replayed) = settled(&mut on_a, "cart-key", &body).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, first);
    assert_eq!(on_a.stock("A").await, (10, 10, 0, 0));
    let other = json!({"cart_id": cart, "customer_id": "someone-else", "payment_token": "tok_ok"});
    let (status, text, _) = checkout(&mut on_a, "cart-key", &other).await;
    assert_eq!(
        status, 422,
        "same key, other body, on the other node: {text}"
    );
    eventually(
        "the cart emptied after its checkout",
        Duration::from_secs(5),
        async || lines(&on_a.get(&format!("/v1/carts/{cart}")).await.json()).is_empty(),
    )
    .await;

    // A sold-out refusal placed nothing and costs Redis no write: it is replayed by the node that
    // gave it (API.md), and another node with stock places the key.
    let items = json!({"items": [{"sku": "Z", "quantity": 1}], "customer_id": "c2", "payment_token": "tok_ok"});
    let (status, rejected, _) = checkout(&mut on_a, "sold-out-key", &items).await;
    assert_eq!(status, 409, "{rejected}");
    let (status, again, replayed) = checkout(&mut on_a, "sold-out-key", &items).await;
    assert_eq!((status, replayed), (409, true));
    assert_eq!(again, rejected);
    assert_eq!(on_b.put_product("Z", 250, 5).await.status, 200);
    let (status, placed, replayed) = settled(&mut on_b, "sold-out-key", &items).await;
    assert_eq!((status, replayed), (201, false), "{placed}");
    assert_eq!(on_b.stock("Z").await, (5, 4, 0, 1));
    // Once placed, the key's answer is the order's on every node that has not refused it.
    let (status, _, replayed) = settled(&mut on_b, "sold-out-key", &items).await;
    assert_eq!((status, replayed), (201, true));

    redis.assert_every_key_expires().await;
    let keys = redis.keys().await;
    for kind in ["cart:", "carts", "key:"] {
        assert!(
            keys.iter()
                .any(|(k, _)| k.starts_with(&format!("{}{kind}", redis.prefix))),
            "a {kind} key under the prefix: {keys:?}"
        );
    }
    let locks = redis.locks_left().await;
    assert!(
        locks.is_empty(),
        "every submission lock released: {locks:?}"
    );
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_fired_at_both_nodes_at_once_makes_one_order() {
    one_key_at_both_nodes(TestRedis::create("race").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster_one_key_fired_at_both_nodes_at_once_makes_one_order() {
    one_key_at_both_nodes(TestRedis::on_cluster("race").await).await;
}

async fn one_key_at_both_nodes(redis: TestRedis) {
    const KEYS: usize = 60;
    const PER_NODE: usize = 3;
    let (a, b) = two_nodes(&redis, &[], &[("A", 1_000)]).await;
    let mut tasks = Vec::new();
    for n in 0..KEYS {
        let key = format!("race-{n}");
        for app in [&a, &b] {
            for _ in 0..PER_NODE {
                let (key, mut client) = (key.clone(), app.client());
                tasks.push(tokio::spawn(async move {
                    let body = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
                    let answer = checkout(&mut client, &key, &body).await;
                    (key, answer)
                }));
            }
        }
    }
    let mut by_key: std::collections::HashMap<String, Vec<(u16, String, bool)>> =
        std::collections::HashMap::new();
    for task in tasks {
        let (key, answer) = task.await.expect("request task");
        by_key.entry(key).or_default().push(answer);
    }
    for (key, answers) in &by_key {
        let firsts: Vec<_> = answers.iter().filter(|(s, _, r)| *s == 201 && !r).collect();
        assert_eq!(firsts.len(), 1, "{key}: exactly one order: {answers:?}");
        for (status, body, replayed) in answers {
            match status {
                201 => assert!(*replayed || body == &firsts[0].1, "{key}"),
                409 => assert!(body.contains("idempotency_key_in_use"), "{key}: {body}"),
                other => panic!("{key}: unexpected {other}: {body}"),
            }
            if *status == 201 {
                assert_eq!(body, &firsts[0].1, "{key}: every replay is identical");
            }
        }
    }
    let count = |want: u16, replayed: bool| {
        by_key
            .values()
            .flatten()
            .filter(|(s, _, r)| *s == want && *r == replayed)
            .count()
    };
    eprintln!(
        "{KEYS} keys × {} requests: {} orders, {} in use, {} replays",
        2 * PER_NODE,
        count(201, false),
        count(409, false),
        count(201, true)
    );
    let sold: i64 = {
        let (mut on_a, mut on_b) = (a.client(), b.client());
        on_a.stock("A").await.3 + on_b.stock("A").await.3
    };
    assert_eq!(sold, KEYS as i64, "one unit sold per key across both nodes");
    redis.assert_spread().await;
    drop(redis);
}

/// A checkout's answer once no other checkout holds the key (a lock's release or an answer
/// reaches Redis right after the answer that ends it, without making its client wait).
async fn settled(client: &mut Client, key: &str, body: &Value) -> (u16, String, bool) {
    for _ in 0..10_000 {
        let answer = checkout(client, key, body).await;
        if !answer.1.contains("idempotency_key_in_use") {
            return answer;
        }
    }
    panic!("{key}: still in use after 10,000 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_replayed_only_by_the_node_that_gave_it() {
    let redis = TestRedis::create("refusals").await;
    // S has 1 unit on a and 5 on b (stock is per node without --node-id); ONLY-B is b's alone.
    let (a, b) = two_nodes(&redis, &[], &[("S", 1)]).await;
    let (mut on_a, mut on_b) = (a.client(), b.client());
    assert_eq!(on_b.put_product("S", 250, 5).await.status, 200);
    assert_eq!(on_b.put_product("ONLY-B", 250, 5).await.status, 200);
    let three = json!({"items": [{"sku": "S", "quantity": 3}], "customer_id": "c", "payment_token": "tok_ok"});
    let unknown = json!({"items": [{"sku": "ONLY-B", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    for (key, body, refused) in [("too-many", &three, 409), ("unknown-here", &unknown, 404)] {
        // Refused on a (the SKU had units, so the checkout took the lock), replayed there ...
        let (status, first, replayed) = checkout(&mut on_a, key, body).await;
        assert_eq!((status, replayed), (refused, false), "{key}: {first}");
        // (`409 idempotency_key_in_use` for the moment its lock's release takes to reach Redis.)
        let (status, again, replayed) = settled(&mut on_a, key, body).await;
        assert_eq!((status, replayed, &again), (refused, true, &first), "{key}");
        // ... and placed by b, which has the units: nothing of a's refusal in Redis.
        let (status, placed, replayed) = settled(&mut on_b, key, body).await;
        assert_eq!((status, replayed), (201, false), "{key}: {placed}");
    }
    assert_eq!(on_b.stock("S").await, (5, 2, 0, 3));
    assert_eq!(on_a.stock("S").await, (1, 1, 0, 0));
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_expires_after_its_ttl_and_is_then_404() {
    let mut redis = TestRedis::create("ttl").await;
    let (a, b) = two_nodes(&redis, &["--cart-ttl", "1s"], &[("A", 10)]).await;
    let (mut on_a, mut on_b) = (a.client(), b.client());
    let cart = create_cart(&mut on_a).await;
    assert_eq!(set_item(&mut on_a, &cart, "A", 1).await.0, 200);
    for (key, ttl) in redis.keys().await {
        assert!(
            ttl > 0 && ttl <= 1_000,
            "{key}: TTL {ttl} ms, at most the cart TTL"
        );
    }
    // Redis expires the cart by itself (watched in Redis: a GET would refresh it); both nodes
    // then say 404, and a checkout of it is 404.
    let cart_key = format!("{}cart:{cart}", redis.prefix);
    eventually(
        "the cart to expire in Redis",
        Duration::from_secs(10),
        async || !redis.keys().await.iter().any(|(key, _)| *key == cart_key),
    )
    .await;
    assert_eq!(on_b.get(&format!("/v1/carts/{cart}")).await.status, 404);
    assert_eq!(on_a.get(&format!("/v1/carts/{cart}")).await.status, 404);
    assert_eq!(set_item(&mut on_a, &cart, "A", 1).await.0, 404);
    let body = json!({"cart_id": cart, "customer_id": "c", "payment_token": "tok_ok"});
    let (status, text, _) = checkout(&mut on_b, "expired-cart", &body).await;
    assert_eq!(status, 404, "{text}");
    assert_eq!(on_b.stock("A").await, (10, 10, 0, 0));
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_carts_and_cart_lines_are_capped_across_nodes() {
    carts_capped_across_nodes(TestRedis::create("caps").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_live_carts_and_cart_lines_are_capped_across_nodes() {
    carts_capped_across_nodes(TestRedis::on_cluster("caps").await).await;
}

async fn carts_capped_across_nodes(redis: TestRedis) {
    let skus: Vec<(String, i64)> = (0..101).map(|i| (format!("s{i}"), 5)).collect();
    let products: Vec<(&str, i64)> = skus.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let (a, b) = two_nodes(&redis, &["--carts-max", "3"], &products).await;
    let (mut on_a, mut on_b) = (a.client(), b.client());
    let cart = create_cart(&mut on_a).await;
    create_cart(&mut on_b).await;
    create_cart(&mut on_a).await;
    for client in [&mut on_a, &mut on_b] {
        let full = client.send("POST", "/v1/carts", &[], "").await;
        assert_eq!(full.status, 503, "--carts-max holds across nodes");
        assert_eq!(full.json()["error"], "overloaded");
    }
    for (i, (sku, _)) in skus.iter().take(100).enumerate() {
        let client = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        assert_eq!(set_item(client, &cart, sku, 1).await.0, 200);
    }
    let (status, body) = set_item(&mut on_b, &cart, "s100", 1).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    // Changing or removing a line already there is still fine.
    assert_eq!(set_item(&mut on_b, &cart, "s0", 4).await.0, 200);
    let (status, body) = set_item(&mut on_a, &cart, "s1", 0).await;
    assert_eq!(status, 200);
    assert_eq!(lines(&body).len(), 99);
    assert_eq!(set_item(&mut on_a, &cart, "s100", 1).await.0, 200);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_unreachable_carts_and_checkouts_are_503_unless_redis_is_optional() {
    // A port nothing listens on: Redis "down" without touching the machine's Redis. A node cannot
    // know that no other node runs a key, so nothing is sold without the lock.
    let app = spawn_app(&[
        "--redis-url",
        "redis://127.0.0.1:1",
        "--redis-timeout",
        "300ms",
    ]);
    let mut client = app.client();
    assert_eq!(client.put_product("A", 100, 5).await.status, 200);
    let items = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let (status, text, _) = checkout(&mut client, "items-down", &items).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("session_store_unavailable"), "{text}");
    assert_eq!(
        client.stock("A").await,
        (5, 5, 0, 0),
        "nothing held or sold"
    );
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200, "Redis down leaves the node ready");
    drop(app);

    // One node using Redis for carts only: checkouts naming their items go on.
    let app = spawn_app(&[
        "--redis-url",
        "redis://127.0.0.1:1",
        "--redis-timeout",
        "300ms",
        "--redis-optional",
    ]);
    let mut client = app.client();
    assert_eq!(client.put_product("A", 100, 5).await.status, 200);
    let created = client.send("POST", "/v1/carts", &[], "").await;
    assert_eq!(created.status, 503);
    assert_eq!(created.json()["error"], "session_store_unavailable");
    assert!(created.retry_after.is_some());
    let got = client.get("/v1/carts/cart_x").await;
    assert_eq!(
        (got.status, got.json()["error"].clone()),
        (503, json!("session_store_unavailable"))
    );
    let body = json!({"cart_id": "cart_x", "customer_id": "c", "payment_token": "tok_ok"});
    let (status, text, _) = checkout(&mut client, "cart-down", &body).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("session_store_unavailable"));

    let items = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let (status, first, _) = checkout(&mut client, "items-down", &items).await;
    assert_eq!(status, 201, "{first}");
    let (status, again, replayed) = checkout(&mut client, "items-down", &items).await;
    assert_eq!(
        (status, replayed),
        (201, true),
        "the node's own key table replays"
    );
    assert_eq!(again, first);
    assert_eq!(client.stock("A").await, (5, 4, 0, 1));

    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200, "Redis down leaves the node ready");
    let reason = ready.json()["checks"]["redis"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.starts_with("unreachable"), "{reason}");
}

/// Bytes someone else left under an answer key (another type, or not UTF-8) are "Redis holds
/// something unexpected", never "Redis is down": the checkout must not fall back to going on
/// without the lock, or the other node buys the key a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_under_an_answer_key_never_buys_the_key_again_on_the_other_node() {
    let redis = TestRedis::create("junk-answer").await;
    let (a, b) = two_nodes(&redis, &[], &[("A", 10)]).await;
    let (mut on_a, mut on_b) = (a.client(), b.client());
    let body = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let mut connection = redis.connection().await;
    for (key, junk) in [("junk-hash", 0), ("junk-bytes", 1)] {
        let (status, first, _) = checkout(&mut on_a, key, &body).await;
        assert_eq!(status, 201, "{first}");
        let answer_key = format!("{}key:{key}", redis.prefix);
        redis.wait_answer(key, Duration::from_secs(5)).await;
        let _: () = redis::cmd("DEL")
            .arg(&answer_key)
            .query_async(&mut connection)
            .await
            .unwrap();
        if junk == 0 {
            let _: () = redis::cmd("HSET")
                .arg(&answer_key)
                .arg("x")
                .arg("y")
                .query_async(&mut connection)
                .await
                .unwrap();
        } else {
            let _: () = redis::cmd("SET")
                .arg(&answer_key)
                .arg(&b"201 1 abc\n\xff\xfe"[..])
                .query_async(&mut connection)
                .await
                .unwrap();
        }
        let _: () = redis::cmd("PEXPIRE")
            .arg(&answer_key)
            .arg(600_000)
            .query_async(&mut connection)
            .await
            .unwrap();
        let (status, again, replayed) = checkout(&mut on_b, key, &body).await;
        assert!(
            status != 201 || replayed,
            "{key}: a second order on the other node: {again}"
        );
        assert!(status >= 500, "{key}: a clear error, got {status} {again}");
    }
    let sold = on_a.stock("A").await.3 + on_b.stock("A").await.3;
    assert_eq!(sold, 2, "one unit per key across both nodes");
    drop(redis);
}

/// A key of another type (or a string without expiry) planted under a lock's key would make that
/// key answer `409 idempotency_key_in_use` for ever: it is "Redis holds something unexpected", a
/// `500` naming the key, as junk under an answer key is, and nothing is sold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_under_a_lock_key_is_a_500_naming_it_not_a_lock_held_for_ever() {
    let redis = TestRedis::create("junk-lock").await;
    let (a, _b) = two_nodes(&redis, &[], &[("A", 10)]).await;
    let mut on_a = a.client();
    let body = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let mut connection = redis.connection().await;
    let hash_key = format!("{}key:junk-hash", redis.prefix);
    let _: () = redis::cmd("HSET")
        .arg(&hash_key)
        .arg("x")
        .arg("1")
        .query_async(&mut connection)
        .await
        .unwrap();
    let forever_key = format!("{}key:junk-forever", redis.prefix);
    let _: () = redis::cmd("SET")
        .arg(&forever_key)
        .arg("~node_other/1/1/")
        .query_async(&mut connection)
        .await
        .unwrap();
    for (key, planted) in [("junk-hash", &hash_key), ("junk-forever", &forever_key)] {
        let (status, text, _) = checkout(&mut on_a, key, &body).await;
        assert_eq!(status, 500, "{key}: {text}");
        assert!(
            text.contains(planted.as_str()),
            "{key}: the key is named: {text}"
        );
    }
    // A real lock (with its TTL) is still a lock.
    let held_key = format!("{}key:held", redis.prefix);
    let _: () = redis::cmd("SET")
        .arg(&held_key)
        .arg("~node_other/1/1/")
        .arg("EX")
        .arg(60)
        .query_async(&mut connection)
        .await
        .unwrap();
    let (status, text, _) = checkout(&mut on_a, "held", &body).await;
    assert_eq!(status, 409, "{text}");
    assert_eq!(
        on_a.stock("A").await,
        (10, 10, 0, 0),
        "nothing held or sold"
    );
    drop(redis);
}

/// Redis stalls (`CLIENT PAUSE` here) past `--redis-timeout` while a checkout asks for its lock: the
/// node goes on without it and creates the order, but the lock call still runs once Redis wakes,
/// leaving that node's lock with no answer. The answer must still reach Redis (and the lock be
/// released), so the other node replays instead of answering 409 for 60 s and then buying the key
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_call_that_timed_out_still_leads_to_a_replay_on_the_other_node() {
    // A Redis of the test's own: CLIENT PAUSE stops every client of the server it is sent to.
    let redis = super::helpers::PrivateRedis::start();
    let mut args = vec![
        "--redis-url".to_owned(),
        redis.url(),
        "--redis-timeout".into(),
        "300ms".into(),
    ];
    let b = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Node A is one that goes on without Redis (`--redis-optional`).
    args.push("--redis-optional".into());
    let a = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (mut on_a, mut on_b) = (a.client(), b.client());
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.put_product("A", 250, 10).await.status, 200);
    }
    let body = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    // Every client's commands wait for 2 s from here (the pause is in place once it answers).
    let mut pauser = redis.connection().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2_000)
        .arg("ALL")
        .query_async(&mut pauser)
        .await
        .expect("CLIENT PAUSE");
    let (status, first, replayed) = checkout(&mut on_a, "stalled", &body).await;
    assert_eq!((status, replayed), (201, false), "{first}");
    // The answer reaches Redis once the pause is over. A request to the other node before that
    // would go on without the lock too (during the pause) or take the key (between the pause's end
    // and the answer): the documented cost of the fallback.
    redis.wait_answer("stalled", Duration::from_secs(15)).await;
    eventually(
        "the other node to replay the first answer",
        Duration::from_secs(15),
        async || {
            let (status, again, replayed) = checkout(&mut on_b, "stalled", &body).await;
            assert!(
                status != 201 || replayed,
                "a second order on the other node: {again}"
            );
            status == 201 && replayed && again == first
        },
    )
    .await;
    let (status, again, replayed) = checkout(&mut on_a, "stalled", &body).await;
    assert_eq!((status, replayed, &again), (201, true, &first));
    let sold = on_a.stock("A").await.3 + on_b.stock("A").await.3;
    assert_eq!(sold, 1);
}

/// A node killed after answering, before its answer reached Redis: its lock is left (held by its
/// earlier run) and no answer is there, so the other node says 409. Restarted on its data dir, the
/// node sends its recent answers again and frees its old locks: the other node then replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_a_kill_sends_its_recent_answers_again() {
    let redis = TestRedis::create("recover").await;
    let (a, b) = two_nodes(&redis, &[], &[("A", 10)]).await;
    let (mut on_a, mut on_b) = (a.client(), b.client());
    let body = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let (status, first, _) = checkout(&mut on_a, "killed", &body).await;
    assert_eq!(status, 201, "{first}");
    // The state a kill between the answer and the finisher leaves: the lock of A's run, no answer.
    let mut connection = redis.connection().await;
    let lock_key = format!("{}key:killed", redis.prefix);
    redis.wait_answer("killed", Duration::from_secs(5)).await;
    let node = turnstile::data_dir::node_name(&a.data_dir).expect("node name");
    let _: () = redis::cmd("SET")
        .arg(&lock_key)
        .arg(format!("~{node}/1/7/"))
        .arg("EX")
        .arg(60)
        .query_async(&mut connection)
        .await
        .unwrap();
    let (status, text, _) = checkout(&mut on_b, "killed", &body).await;
    assert_eq!(status, 409, "{text}");

    let args = redis.args();
    let (data_dir, _dir) = a.into_parts();
    let a = super::helpers::start(
        &data_dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    eventually(
        "the other node to replay",
        Duration::from_secs(15),
        async || {
            let (status, again, replayed) = checkout(&mut on_b, "killed", &body).await;
            assert!(status != 201 || replayed, "a second order: {again}");
            status == 201 && replayed && again == first
        },
    )
    .await;
    let left: Option<String> = redis::cmd("GET")
        .arg(&lock_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        left.is_some_and(|value| !value.starts_with('~')),
        "the old run's lock replaced by the answer"
    );
    let sold = a.client().stock("A").await.3 + on_b.stock("A").await.3;
    assert_eq!(sold, 1);
    drop(redis);
}

/// Something of another type written over a running checkout's lock (by hand, or another
/// program under the prefix): the checkout's end cannot leave its answer there, so another node
/// may start the key again once that value is gone. The node says so (a twin: ERROR and
/// `turnstile_redis_locks_lost_total`) instead of dropping its answer silently (found by attack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_written_over_a_running_checkouts_lock_is_reported_not_dropped() {
    use crate::gateway::{free_port, Sim};
    let redis = TestRedis::create("junk-over-lock").await;
    let port = free_port();
    let sim = Sim::start(&format!("127.0.0.1:{port}"), &[]);
    let url = sim.url();
    let (a, _b) = two_nodes(
        &redis,
        &["--gateway-url", &url, "--gateway-timeout", "20s"],
        &[("A", 10)],
    )
    .await;
    sim.signal("-STOP");
    let mut on_a = a.client();
    let body = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let running = tokio::spawn(async move { checkout(&mut on_a, "overwritten", &body).await });
    // Its lock is taken before it asks the gateway, which does not answer: it holds it there.
    let key = format!("{}key:overwritten", redis.prefix);
    let mut connection = redis.connection().await;
    eventually(
        "the checkout to hold its lock",
        Duration::from_secs(10),
        async || {
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<String>>(&mut connection)
                .await
                .ok()
                .flatten()
                .is_some_and(|value| value.starts_with('~'))
        },
    )
    .await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("x")
        .arg("y")
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(600_000)
        .query_async(&mut connection)
        .await
        .unwrap();
    sim.signal("-CONT");
    let (status, text, _) = running.await.expect("the checkout");
    assert_eq!(status, 201, "{text}");
    let mut on_a = a.client();
    eventually(
        "node a to report the key",
        Duration::from_secs(10),
        async || super::helpers::metric(&mut on_a, "turnstile_redis_locks_lost_total").await >= 1.0,
    )
    .await;
    drop(redis);
}

/// A data dir cloned with its `redis-node-id` (a copied volume or image): two nodes then share a
/// name. Started in the same millisecond, their lock values were identical (`<node>/<ms>/<n>/`)
/// and BEGIN, which takes a lock it already holds again, let both run the same key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sharing_a_copied_node_name_never_share_a_submission_lock() {
    use turnstile::domain::IdempotencyKey;
    use turnstile::sessions::redis::{Begin, RedisConfig, RedisStore};
    let redis = TestRedis::create("attack2_clone").await;
    let config = RedisConfig {
        url: super::helpers::REDIS_URL.into(),
        prefix: redis.prefix.clone(),
        timeout: Duration::from_secs(1),
        lock_ttl: Duration::from_secs(60),
    };
    // One name (the copied file), one start millisecond: the nodes' first checkouts.
    let node = "node_cloned0000000000".to_owned();
    let a = std::sync::Arc::new(RedisStore::new(&config, node.clone(), 1_795_000_000_000).unwrap());
    let b = std::sync::Arc::new(RedisStore::new(&config, node, 1_795_000_000_000).unwrap());
    let (tasks_a, tasks_b) = (a.start().await, b.start().await);
    let key = IdempotencyKey::parse("same-key").unwrap();
    let (lock_a, lock_b) = (a.submission(&key), b.submission(&key));
    let on_a = a.begin(&lock_a, None).await.unwrap();
    let on_b = b.begin(&lock_b, None).await.unwrap();
    assert!(matches!(on_a, Begin::Locked(_)), "{on_a:?}");
    assert!(
        matches!(on_b, Begin::Held),
        "the other node ran the key at the same time: {on_b:?}"
    );
    lock_a.keep();
    lock_b.keep();
    for store in [&a, &b] {
        store.stop();
    }
    for task in tasks_a.into_iter().chain(tasks_b) {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    drop(redis);
}

/// A TCP proxy to the machine's Redis that can be cut (connections dropped, new ones closed at
/// once) and restored, so one node sees Redis down while the other does not.
struct RedisCut {
    addr: std::net::SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RedisCut {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, watch) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*watch.borrow() {
                    continue; // dropped: closed at once
                }
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:6379").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up, task }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn set(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

impl Drop for RedisCut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// README: a checkout that went on without the lock (Redis unreachable, `--redis-optional`) has
/// its answer sent to Redis "as soon as it is back". The finisher dropped it once the lock it never
/// held would have expired: after an outage longer than the lock's TTL, a retry on the other node
/// bought again. (The lock lives 3 s here instead of its default minute, so the outage is short.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_without_the_lock_reaches_redis_after_an_outage_longer_than_the_lock() {
    let redis = TestRedis::create("attack2_outage").await;
    let cut = RedisCut::start().await;
    let extra = [
        "--redis-timeout",
        "300ms",
        "--redis-lock-ttl",
        "3s",
        "--gateway-timeout",
        "1s",
        "--journal-timeout",
        "1s",
    ];
    let mut args_a = vec![
        "--redis-url".to_owned(),
        cut.url(),
        "--redis-prefix".into(),
        redis.prefix.clone(),
    ];
    args_a.extend(extra.iter().map(|s| s.to_string()));
    args_a.push("--redis-optional".into());
    let mut args_b = redis.args();
    args_b.extend(extra.iter().map(|s| s.to_string()));
    let a = spawn_app(&args_a.iter().map(String::as_str).collect::<Vec<_>>());
    let b = spawn_app(&args_b.iter().map(String::as_str).collect::<Vec<_>>());
    let (mut on_a, mut on_b) = (a.client(), b.client());
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.put_product("A", 250, 10).await.status, 200);
    }
    cut.set(false);
    // Node A sees Redis down once a call fails (a cart call needs Redis).
    eventually(
        "node A to see Redis down",
        Duration::from_secs(10),
        async || on_a.send("POST", "/v1/carts", &[], "").await.status == 503,
    )
    .await;
    let body = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let (status, first, _) = checkout(&mut on_a, "outage", &body).await;
    assert_eq!(status, 201, "{first}");
    let fallbacks = super::helpers::metric(&mut on_a, "turnstile_redis_lock_fallbacks_total").await;
    assert_eq!(fallbacks, 1.0, "node A went on without the lock");
    // An outage a bit longer than the lock's TTL: the time itself is what is tested.
    tokio::time::sleep(Duration::from_secs(5)).await;
    cut.set(true);
    eventually("node A to reconnect", Duration::from_secs(10), async || {
        super::helpers::metric(&mut on_a, "turnstile_redis_connected").await == 1.0
    })
    .await;
    redis.wait_answer("outage", Duration::from_secs(15)).await;
    let (status, again, replayed) = checkout(&mut on_b, "outage", &body).await;
    let sold = on_a.stock("A").await.3 + on_b.stock("A").await.3;
    drop(redis);
    assert_eq!(
        (status, replayed, sold),
        (201, true, 1),
        "the retry on node B after the outage: {again} (node A answered {first})"
    );
    assert_eq!(again, first);
}

/// Found by attack: a live node cut off from Redis for longer than the lock's life, between its
/// commit and its answer reaching Redis, lets another node place the same key: two orders. No
/// guard shared by the nodes can stop that while their journals are apart (README says so); what
/// the node must do is say so when its answer finally reaches Redis and finds another there, and
/// keep replaying its own answer, byte for byte, to its clients. Here the other node's answer is
/// planted, and the node's answer reaches Redis again through its start-up recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_answer_finds_another_in_redis_reports_it_and_replays_its_own() {
    let redis = TestRedis::create("twins").await;
    let (a, _b) = two_nodes(&redis, &[], &[("A", 10)]).await;
    let mut on_a = a.client();
    let body = json!({"items": [{"sku": "A", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let (status, first, _) = checkout(&mut on_a, "twin", &body).await;
    assert_eq!(status, 201, "{first}");
    redis.wait_answer("twin", Duration::from_secs(5)).await;
    let (status, running, _) = checkout(&mut on_a, "twin-running", &body).await;
    assert_eq!(status, 201, "{running}");
    redis
        .wait_answer("twin-running", Duration::from_secs(5))
        .await;
    // Another node's answer under the key, as a partition longer than the lock would leave it.
    let answer_key = format!("{}key:twin", redis.prefix);
    let mut connection = redis.connection().await;
    let stored: String = redis::cmd("GET")
        .arg(&answer_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    let other = stored.replacen("201 ", "201 1", 1).replace("paid", "paid ");
    let _: () = redis::cmd("SET")
        .arg(&answer_key)
        .arg(&other)
        .arg("EX")
        .arg(600)
        .query_async(&mut connection)
        .await
        .unwrap();
    // And another node running a key whose answer this node could not send yet.
    let _: () = redis::cmd("SET")
        .arg(format!("{}key:twin-running", redis.prefix))
        .arg("~node_other/1/1/")
        .arg("EX")
        .arg(600)
        .query_async(&mut connection)
        .await
        .unwrap();
    let args = redis.args();
    let (data_dir, _dir) = a.into_parts();
    let a = super::helpers::start(
        &data_dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut on_a = a.client();
    eventually(
        "the restarted node to report both keys",
        Duration::from_secs(15),
        async || super::helpers::metric(&mut on_a, "turnstile_redis_locks_lost_total").await == 2.0,
    )
    .await;
    assert!(
        a.log().contains("another node answered this key"),
        "{}",
        a.log()
    );
    let (status, again, replayed) = checkout(&mut on_a, "twin", &body).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, first, "the node replays its own answer");
    let kept: String = redis::cmd("GET")
        .arg(&answer_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(kept, other, "an answer in Redis is never replaced");
    drop(redis);
}

/// Clients placing checkouts of one unit of `A` on a node, each under keys of its own
/// (`<tag>-<client>-<n>`), `per_client` at most; a client stops at its first failure (with
/// `until_failure`) or goes on to the end. Each client gives the keys answered `201`.
struct Buyers {
    placed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

const ONE_A: &str =
    r#"{"items":[{"sku":"A","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}"#;

impl Buyers {
    fn start(
        app: &TestApp,
        tag: &str,
        clients: usize,
        per_client: usize,
        until_failure: bool,
    ) -> Self {
        use std::sync::atomic::Ordering;
        let placed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let clients = (0..clients)
            .map(|c| {
                let (mut client, placed) = (app.client(), std::sync::Arc::clone(&placed));
                let tag = format!("{tag}-{c}");
                tokio::spawn(async move {
                    let mut keys = Vec::new();
                    for i in 0..per_client {
                        let key = format!("{tag}-{i}");
                        let headers = [
                            ("idempotency-key", key.as_str()),
                            ("content-type", "application/json"),
                        ];
                        match client
                            .try_send("POST", "/v1/checkout", &headers, ONE_A)
                            .await
                        {
                            Ok(answer) if answer.status == 201 => {
                                keys.push(key);
                                placed.fetch_add(1, Ordering::Relaxed);
                            }
                            // Refused (503) or cut off by the stop.
                            _ if until_failure => break,
                            _ => {}
                        }
                    }
                    keys
                })
            })
            .collect();
        Self { placed, clients }
    }

    /// Once `count` checkouts are placed.
    async fn placed(&self, count: usize) {
        eventually(
            "checkouts to be placed",
            Duration::from_secs(60),
            async || self.placed.load(std::sync::atomic::Ordering::Relaxed) >= count,
        )
        .await;
    }

    /// Every client's keys answered `201`, once all have ended.
    async fn keys(self) -> Vec<String> {
        let mut keys = Vec::new();
        for client in self.clients {
            keys.extend(client.await.expect("client task"));
        }
        keys
    }
}

/// Every key holds its answer in Redis (under `prefix`) and no lock; `other`, a node that did
/// not place them, replays the last and sold nothing.
async fn assert_answers_left(
    mut connection: redis::aio::MultiplexedConnection,
    prefix: &str,
    keys: &[String],
    other: &TestApp,
) {
    for key in keys {
        let value: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}key:{key}"))
            .query_async(&mut connection)
            .await
            .expect("Redis answers");
        assert!(
            value.is_some(),
            "no answer in Redis for {key}, placed by the stopped node"
        );
        assert!(
            !value.is_some_and(|v| v.starts_with('~')),
            "the lock of {key} left behind, not its answer"
        );
    }
    let mut on_other = other.client();
    let last = keys.last().expect("keys placed");
    let body: Value = serde_json::from_str(ONE_A).expect("JSON");
    let (status, _, replayed) = checkout(&mut on_other, last, &body).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(
        on_other.stock("A").await.3,
        0,
        "the other node sold nothing"
    );
}

/// A node stopped (SIGTERM) under a steady stream of checkouts: their ends (answer stored, lock
/// released) ride the cores' queues with later starts, and the stop hands what those queues hold
/// to the finisher before its last batch. Every key the node answered `201` must then hold its
/// answer in Redis and no lock, or the other node would say 409 for a minute and then sell the
/// key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_under_load_leaves_the_answer_of_every_checkout_it_placed_in_redis() {
    let redis = TestRedis::create("stop_ends").await;
    let (mut a, b) = two_nodes(&redis, &[], &[("A", 10_000)]).await;
    let buyers = Buyers::start(&a, "stop", 16, 400, true);
    // SIGTERM once enough are placed, with the clients still sending.
    buyers.placed(1_000).await;
    a.send_sigterm();
    let keys = buyers.keys().await;
    assert!(
        tokio::task::block_in_place(|| a.wait()).success(),
        "node a exits 0"
    );
    assert_answers_left(redis.connection().await, &redis.prefix, &keys, &b).await;
    drop(redis);
}

/// A node stopped (SIGTERM) while it cannot reach Redis (a network gone silent: its open
/// connections lost, new ones hanging), with answers of checkouts it placed not yet in Redis: it
/// waits for Redis (up to its locks' life) instead of leaving them behind, since once their locks
/// expire another node would place those keys again. The network comes back once the clients
/// have gone: every key the node answered `201` then holds its answer and no lock, and the other
/// node replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_while_cut_off_from_redis_waits_to_leave_its_answers_there() {
    let redis = super::helpers::PrivateRedis::start();
    let proxy = super::helpers::StallProxy::start(
        format!("127.0.0.1:{}", redis.port)
            .parse()
            .expect("address"),
    )
    .await;
    let (direct, through) = (redis.url(), format!("redis://{}", proxy.addr));
    let a = ["--redis-url", through.as_str(), "--redis-timeout", "300ms"];
    let (mut a, b) = (spawn_app(&a), spawn_app(&["--redis-url", direct.as_str()]));
    for app in [&a, &b] {
        assert_eq!(app.client().put_product("A", 250, 10_000).await.status, 200);
    }
    let buyers = Buyers::start(&a, "cut", 16, 500, false);
    buyers.placed(1_000).await;
    proxy.stall(true);
    proxy.abandon_open_connections();
    a.send_sigterm();
    // Every client has been answered or cut off: node a is stopping, Redis still out of reach.
    let keys = buyers.keys().await;
    proxy.stall(false);
    assert!(
        tokio::task::block_in_place(|| a.wait()).success(),
        "node a exits 0"
    );
    assert_answers_left(redis.connection().await, "turnstile:", &keys, &b).await;
}

/// Found by attack: a node paused (`SIGSTOP`) with a checkout in flight for longer than the key's
/// lock lives: meanwhile the lock expired and another node placed the same key. Resumed, the first
/// node recorded an order of its own under the key (its own journal refuses nothing), so the key
/// had two orders and two answers. Now a checkout whose lock was last renewed more than two thirds
/// of its TTL ago records nothing (`503`): the key keeps one order, and the retry on the paused
/// node replays the other node's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_lock_records_nothing_under_a_key_placed_meanwhile() {
    use crate::gateway::{free_port, server_args, Sim};
    let redis = TestRedis::create("paused-past-lock").await;
    let sim = Sim::start(&format!("127.0.0.1:{}", free_port()), &[]);
    let mut args = redis.args();
    args.extend(server_args(&sim.url()));
    args.extend(["--redis-timeout", "300ms", "--redis-lock-ttl", "3s"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (a, b) = (spawn_app(&args), spawn_app(&args));
    let (mut on_a, mut on_b) = (a.client(), b.client());
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.put_product("P", 250, 10).await.status, 200);
    }
    let body = json!({"items": [{"sku": "P", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    // Node a's checkout takes the key's lock and waits on the gateway (stopped), and then node a
    // itself stops: its lock is renewed no more.
    sim.signal("-STOP");
    let mut first_client = a.client();
    let first_body = body.clone();
    let first =
        tokio::spawn(async move { checkout(&mut first_client, "paused", &first_body).await });
    eventually(
        "node a's checkout to take the key's lock",
        Duration::from_secs(10),
        async || redis.locks_left().await.len() == 1,
    )
    .await;
    a.signal("-STOP");
    sim.signal("-CONT");
    eventually(
        "the paused node's lock to expire",
        Duration::from_secs(10),
        async || redis.locks_left().await.is_empty(),
    )
    .await;
    let (status, placed, _) = checkout(&mut on_b, "paused", &body).await;
    assert_eq!(status, 201, "{placed}");
    a.signal("-CONT");
    let (status, answer, _) = first.await.expect("node a's checkout");
    assert_eq!(
        status, 503,
        "node a recorded a second order under the key: {answer}"
    );
    assert!(
        answer.contains("journal_unavailable") && answer.contains("lock"),
        "{answer}"
    );
    let mut on_a = a.client();
    // `409 idempotency_key_in_use` until node b's answer has replaced its lock in Redis (stored
    // right after its commit, without making its client wait), then the replay.
    let (status, again, replayed) = settled(&mut on_a, "paused", &body).await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(again, placed, "the retry on node a replays node b's answer");
    let sold = on_a.stock("P").await.3 + on_b.stock("P").await.3;
    let held = on_a.stock("P").await.2 + on_b.stock("P").await.2;
    assert_eq!(
        (sold, held),
        (1, 0),
        "one unit sold under the key, none held"
    );
}
