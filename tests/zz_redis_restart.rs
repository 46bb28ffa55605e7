//! Stopping Redis under load: checkouts naming their items go on (the node's own key table and
//! journal keep them unique), carts answer `503 session_store_unavailable` at once, the node stays
//! ready and says why, nothing hangs; once Redis is back the node uses it again without a restart,
//! and no acknowledged order is lost.
//!
//! This test stops the machine's Redis (`SHUTDOWN NOSAVE`, and starts it again after, also when it
//! fails, with the command `.ci/run` uses), so it lives in a test binary of its own whose name sorts
//! last: `cargo test` runs test binaries one after another, so no other test runs beside it.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{eventually, metric, spawn_app, JsonBody, Load, TestRedis};
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

fn redis_answers() -> bool {
    std::net::TcpStream::connect("127.0.0.1:6379").is_ok()
}

/// Starts the machine's Redis as `.ci/run` does (nothing kept on disk), and waits for it.
fn start_redis() {
    if redis_answers() {
        return;
    }
    let _ = Command::new("redis-server")
        .args([
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
        ])
        .args(["--logfile", "/var/log/redis/ci.log"])
        .status();
    for _ in 0..500 {
        if redis_answers() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("Redis did not come back on 127.0.0.1:6379: start it with `redis-server --daemonize yes --port 6379 --save ''`");
}

/// The tests here stop the machine's Redis: one at a time.
static REDIS_STOPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Stops the machine's Redis (nothing kept) and waits until it no longer answers; the guard
/// starts it again when dropped.
async fn stop_redis() -> StartOnDrop {
    let restart = StartOnDrop;
    let stopped = Command::new("redis-cli")
        .args(["-p", "6379", "shutdown", "nosave"])
        .status();
    assert!(stopped.is_ok(), "redis-cli shutdown failed to run");
    eventually("Redis to stop", Duration::from_secs(10), async || {
        !redis_answers()
    })
    .await;
    restart
}

/// Starts Redis again if the test ends early, so a failure here does not take it away from
/// whatever runs next.
struct StartOnDrop;

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        start_redis();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_redis_under_load_loses_no_order_and_the_node_recovers_by_itself() {
    let _serial = REDIS_STOPS.lock().await;
    let redis = TestRedis::create("restart").await;
    let mut args = redis.args();
    args.extend(["--redis-timeout".to_owned(), "500ms".to_owned()]);
    let app = spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = app.client();
    client.put_product("A", 500, 10_000_000).await;
    assert_eq!(client.send("POST", "/v1/carts", &[], "").await.status, 201);
    let load = Load::start(&app, 8, "load", &["A".to_owned()]);
    eventually(
        "checkouts before the outage",
        Duration::from_secs(30),
        async || load.answered(Some(201)) > 300,
    )
    .await;

    let _restart = stop_redis().await;
    eventually("the node to notice", Duration::from_secs(10), async || {
        client.get("/readyz").await.json()["checks"]["redis"] != "ok"
    })
    .await;
    // During the outage: every request is answered; item checkouts succeed, carts say why not.
    let before = load.answered(Some(201));
    for n in 0..200 {
        let answer = client
            .checkout(&format!("outage-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answered while Redis is down");
        assert_eq!(
            answer.status,
            201,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let cart = client.send("POST", "/v1/carts", &[], "").await;
    assert_eq!(
        (cart.status, cart.json()["error"].clone()),
        (503, "session_store_unavailable".into())
    );
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200, "Redis down leaves the node ready");
    eventually(
        "the load to go on during the outage",
        Duration::from_secs(30),
        async || load.answered(Some(201)) > before + 200,
    )
    .await;

    start_redis();
    // Back without a restart of the node: carts work again, and so do the locks.
    eventually("carts to work again", Duration::from_secs(30), async || {
        client.send("POST", "/v1/carts", &[], "").await.status == 201
    })
    .await;
    assert_eq!(client.get("/readyz").await.json()["checks"]["redis"], "ok");
    assert_eq!(metric(&mut client, "turnstile_redis_connected").await, 1.0);
    let after = load.answered(Some(201));
    eventually(
        "the load to go on after the outage",
        Duration::from_secs(30),
        async || load.answered(Some(201)) > after + 200,
    )
    .await;
    let sent = load.stop().await;

    // No request failed, and every acknowledged order is there, once.
    let failed: Vec<_> = sent.iter().filter(|s| s.status != 201).collect();
    assert!(
        failed.is_empty(),
        "{} checkouts failed, e.g. {}",
        failed.len(),
        failed[0].status
    );
    let mut ids = HashSet::new();
    for s in &sent {
        assert!(ids.insert(s.order_id.clone()), "order {} twice", s.order_id);
        let order = client.get(&format!("/v1/orders/{}", s.order_id)).await;
        assert_eq!(order.status, 200, "acknowledged order {} lost", s.order_id);
        assert_eq!(order.json()["status"], "paid");
    }
    let sold = client.stock("A").await.3;
    assert_eq!(
        sold as usize,
        sent.len() + 200,
        "one unit per acknowledged checkout"
    );
    assert!(metric(&mut client, "turnstile_redis_lock_fallbacks_total").await >= 200.0);
    redis.delete().await;
}

/// A key bought on one node while Redis was down: once Redis is back its answer reaches Redis,
/// and the other node (idle through the outage, so its connection is the broken one from before)
/// replays it instead of buying the key a second time on its first call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_bought_during_an_outage_is_replayed_by_the_other_node_once_redis_is_back() {
    let _serial = REDIS_STOPS.lock().await;
    let redis = TestRedis::create("outage-replay").await;
    let mut args = redis.args();
    args.extend(["--redis-timeout".to_owned(), "500ms".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (a, b) = (spawn_app(&args), spawn_app(&args));
    let (mut on_a, mut on_b) = (a.client(), b.client());
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.put_product("A", 500, 10).await.status, 200);
    }
    let _restart = stop_redis().await;
    let first = on_a.checkout("outage-key", "A", 1, "tok_ok").await.unwrap();
    assert_eq!(first.status, 201);
    start_redis();
    redis
        .wait_answer("outage-key", Duration::from_secs(15))
        .await;
    let again = on_b.checkout("outage-key", "A", 1, "tok_ok").await.unwrap();
    assert_eq!(
        (again.status, again.replayed, &again.body),
        (201, true, &first.body),
        "the other node's first call after the outage: {}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(on_a.stock("A").await.3 + on_b.stock("A").await.3, 1);
    redis.delete().await;
}
