//! Redis killed under load, on a `redis-server` of the test's own (the machine's Redis is never
//! touched): with `--redis-url` a node cannot know that no other node holds a key, so while Redis
//! is down its carts and checkouts answer `503 session_store_unavailable` with `Retry-After` at
//! once (nothing hangs, nothing is sold without the lock, the node stays ready and says why); a
//! node started with `--redis-optional` (one node using Redis for carts only) goes on selling
//! checkouts that name their items under its own key table. Once Redis is back both use it again
//! without a restart, and every acknowledged order is there, once.

use crate::helpers::{eventually, metric, spawn_app, JsonBody, Load, PrivateRedis};
use std::collections::HashSet;
use std::time::Duration;

fn args(redis: &PrivateRedis, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--redis-url".to_owned(),
        redis.url(),
        "--redis-timeout".into(),
        "300ms".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_killed_under_load_checkouts_are_503_unless_optional_and_no_order_is_lost() {
    let mut redis = PrivateRedis::start();
    let shared = args(&redis, &[]);
    let optional = args(&redis, &["--redis-optional"]);
    let app = spawn_app(&shared.iter().map(String::as_str).collect::<Vec<_>>());
    let lone = spawn_app(&optional.iter().map(String::as_str).collect::<Vec<_>>());
    let (mut client, mut on_lone) = (app.client(), lone.client());
    for client in [&mut client, &mut on_lone] {
        assert_eq!(client.put_product("A", 500, 10_000_000).await.status, 200);
    }
    assert_eq!(client.send("POST", "/v1/carts", &[], "").await.status, 201);
    let load = Load::start(&app, 8, "load", &["A".to_owned()]);
    eventually(
        "checkouts before the outage",
        Duration::from_secs(30),
        async || load.answered(Some(201)) > 300,
    )
    .await;

    redis.kill();
    eventually("the node to notice", Duration::from_secs(10), async || {
        client.get("/readyz").await.json()["checks"]["redis"] != "ok"
    })
    .await;
    // During the outage: every request is answered, and no checkout goes on without the lock.
    for n in 0..50 {
        let answer = client
            .checkout(&format!("outage-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answered while Redis is down");
        assert_eq!(
            answer.status,
            503,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["error"], "session_store_unavailable");
        assert!(answer.retry_after.is_some(), "503 with Retry-After");
    }
    let cart = client.send("POST", "/v1/carts", &[], "").await;
    assert_eq!(
        (cart.status, cart.json()["error"].clone()),
        (503, "session_store_unavailable".into())
    );
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200, "Redis down leaves the node ready");
    assert_eq!(
        metric(&mut client, "turnstile_redis_lock_fallbacks_total").await,
        0.0,
        "nothing went on without the lock"
    );
    // The node that uses Redis for carts only sells on.
    for n in 0..20 {
        let answer = on_lone
            .checkout(&format!("lone-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(
            answer.status,
            201,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert_eq!(
        metric(&mut on_lone, "turnstile_redis_lock_fallbacks_total").await,
        20.0
    );

    redis.restart();
    // Back without a restart of the node: carts work again, and so do checkouts.
    eventually("carts to work again", Duration::from_secs(30), async || {
        client.send("POST", "/v1/carts", &[], "").await.status == 201
    })
    .await;
    assert_eq!(client.get("/readyz").await.json()["checks"]["redis"], "ok");
    let after = load.answered(Some(201));
    eventually(
        "the load to go on after the outage",
        Duration::from_secs(30),
        async || load.answered(Some(201)) > after + 200,
    )
    .await;
    let sent = load.stop().await;

    // Every request was answered 201 or 503, and every acknowledged order is there, once.
    let odd: Vec<_> = sent
        .iter()
        .filter(|s| s.status != 201 && s.status != 503)
        .collect();
    assert!(
        odd.is_empty(),
        "{} checkouts answered {}",
        odd.len(),
        odd[0].status
    );
    let placed: Vec<_> = sent.iter().filter(|s| s.status == 201).collect();
    let mut ids = HashSet::new();
    for s in &placed {
        assert!(ids.insert(s.order_id.clone()), "order {} twice", s.order_id);
        let order = client.get(&format!("/v1/orders/{}", s.order_id)).await;
        assert_eq!(order.status, 200, "acknowledged order {} lost", s.order_id);
        assert_eq!(order.json()["status"], "paid");
    }
    assert_eq!(
        client.stock("A").await.3 as usize,
        placed.len(),
        "one unit per acknowledged checkout, none for a 503"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sold_during_an_outage_by_an_optional_node_is_replayed_once_redis_is_back() {
    // A key bought on a `--redis-optional` node while Redis was down: once Redis is back its
    // answer reaches Redis, and the other node (idle through the outage, so its connection is the
    // broken one from before) replays it instead of buying the key a second time.
    let mut redis = PrivateRedis::start();
    let optional = args(&redis, &["--redis-optional"]);
    let shared = args(&redis, &[]);
    let a = spawn_app(&optional.iter().map(String::as_str).collect::<Vec<_>>());
    let b = spawn_app(&shared.iter().map(String::as_str).collect::<Vec<_>>());
    let (mut on_a, mut on_b) = (a.client(), b.client());
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.put_product("A", 500, 10).await.status, 200);
    }
    redis.kill();
    let first = on_a.checkout("outage-key", "A", 1, "tok_ok").await.unwrap();
    assert_eq!(first.status, 201);
    redis.restart();
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
}

/// Found by attack: Redis refusing writes for a moment while a checkout waits on the gateway
/// (`READONLY` during a failover, `OOM` under `maxmemory`, `LOADING` after a restart; here
/// `NOREPLICAS`) made the checkout's end read as a twin: its answer was never sent again, its lock
/// expired, and a retry on another node placed the key a second time. The end goes to the
/// finisher instead, reaches Redis once it takes writes again, and the other node replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_redis_refused_for_a_moment_reaches_it_and_the_other_node_replays_it() {
    let redis = PrivateRedis::start();
    let sim = crate::gateway::Sim::start("127.0.0.1:0", &[]);
    let url = sim.url();
    let mut shared = args(
        &redis,
        &["--redis-lock-ttl", "4s", "--journal-timeout", "1s"],
    );
    shared.extend(
        ["--gateway-url", &url, "--gateway-timeout", "2s"]
            .iter()
            .map(|s| s.to_string()),
    );
    let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
    let (a, b) = (spawn_app(&shared), spawn_app(&shared));
    for app in [&a, &b] {
        assert_eq!(app.client().put_product("A", 500, 100).await.status, 200);
    }
    // The gateway holds the checkout's payment until Redis refuses writes.
    sim.signal("-STOP");
    let addr = a.addr;
    let placing = tokio::spawn(async move {
        crate::helpers::Client::new(addr)
            .checkout("refused-end", "A", 1, "tok_ok")
            .await
            .expect("answered")
    });
    let mut connection = redis.connection().await;
    eventually("the checkout's lock", Duration::from_secs(10), async || {
        redis::cmd("GET")
            .arg("turnstile:key:refused-end")
            .query_async::<Option<String>>(&mut connection)
            .await
            .ok()
            .flatten()
            .is_some_and(|v| v.starts_with('~'))
    })
    .await;
    let refuse = |replicas: u32| {
        let mut command = redis::cmd("CONFIG");
        command
            .arg("SET")
            .arg("min-replicas-to-write")
            .arg(replicas);
        command
    };
    let _: () = refuse(1)
        .query_async(&mut connection)
        .await
        .expect("refuse writes");
    sim.signal("-CONT");
    let first = placing.await.expect("checkout task");
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    // The end met the refusal; Redis takes writes again well inside the lock's 4 s.
    let _: () = refuse(0)
        .query_async(&mut connection)
        .await
        .expect("take writes");
    redis
        .wait_answer("refused-end", Duration::from_secs(10))
        .await;
    let again = b
        .client()
        .checkout("refused-end", "A", 1, "tok_ok")
        .await
        .expect("answered");
    assert_eq!((again.status, again.replayed), (201, true));
    assert_eq!(again.body, first.body, "the other node replays the answer");
    let mut on_a = a.client();
    assert_eq!(
        metric(&mut on_a, "turnstile_redis_locks_lost_total").await,
        0.0,
        "a refusal is not a twin"
    );
}
