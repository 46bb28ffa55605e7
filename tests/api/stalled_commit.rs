//! A commit never outlives its key's lock: with MySQL behind a network that goes silent (a TCP
//! proxy the test controls stops forwarding, connections stay open), a checkout whose outcome is
//! unknown keeps its key locked in Redis for as long as it stays unknown, so another node sharing
//! Redis answers `409 idempotency_key_in_use` instead of placing the same key again; once the
//! database answers again (on new connections: the old ones stay silent for ever, so a wait on
//! them without a bound would never end), both nodes replay the one order. In write-behind the
//! wait for MySQL to catch up is bounded: the checkout is not journaled and says so, and the key
//! is free at once. A node cut off while another takes its journal database over writes nothing
//! more when its network comes back (the database's fence).

use crate::helpers::{
    eventually, metric, spawn_app, Client, StallProxy, TestApp, TestDatabase, TestRedis,
    MARIADB_ADDR,
};
use serde_json::json;
use std::time::Duration;

/// The lock's TTL in these tests.
const LOCK_TTL: Duration = Duration::from_secs(3);

/// Timeouts short enough for a lock of 3 s: a Redis call, an authorisation and a commit together
/// stay under it.
const SHORT: [&str; 10] = [
    "--redis-timeout",
    "300ms",
    "--gateway-timeout",
    "500ms",
    "--journal-timeout",
    "1s",
    "--redis-lock-ttl",
    "3s",
    "--mysql-timeout",
    "1s",
];

fn start(redis: &TestRedis, extra: &[String]) -> TestApp {
    let mut args = redis.args();
    args.extend(SHORT.iter().map(|s| s.to_string()));
    args.extend(extra.iter().cloned());
    spawn_app(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// One unit of `S` under `key`: the status, the body as JSON, whether it was a replay.
async fn checkout(client: &mut Client, key: &str) -> (u16, serde_json::Value, bool) {
    let body = json!({"items": [{"sku": "S", "quantity": 1}], "customer_id": "c", "payment_token": "tok_ok"});
    let (status, text, replayed) = crate::sessions::checkout(client, key, &body).await;
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, body, replayed)
}

/// `database`'s URL with MariaDB's address replaced by the proxy's.
fn through(proxy: &StallProxy, database: &TestDatabase) -> String {
    database.url.replace(MARIADB_ADDR, &proxy.addr.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_stalled_on_mysql_keeps_its_key_locked_until_its_outcome_is_known() {
    let database = TestDatabase::create().await;
    let proxy = StallProxy::start(MARIADB_ADDR.parse().expect("address")).await;
    let redis = TestRedis::create("stalled-commit").await;
    let a = start(&redis, &["--mysql-url".into(), through(&proxy, &database)]);
    let b = start(&redis, &[]);
    let (mut on_a, mut on_b) = (a.client(), b.client());
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.put_product("S", 100, 10).await.status, 200);
    }

    // The network goes silent while the checkout's COMMIT is on its way (the projections have
    // caught up first, so that COMMIT is the checkout's).
    eventually(
        "the projections to catch up",
        Duration::from_secs(10),
        async || metric(&mut on_a, "turnstile_mysql_lag_records").await == 0.0,
    )
    .await;
    proxy.stall_at_commit();
    let (status, body, _) = checkout(&mut on_a, "stalled").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["outcome"], "unknown", "{body}");
    // For twice the lock's TTL (the time itself is what is tested), the other node is told the
    // key is in use, every time it asks: A renews its lock while its outcome is unknown.
    let stalled_at = std::time::Instant::now();
    eventually(
        "twice the lock's TTL to pass with the key held",
        Duration::from_secs(30),
        async || {
            let (status, body, _) = checkout(&mut on_b, "stalled").await;
            assert_eq!(
                (status, body["error"].as_str()),
                (409, Some("idempotency_key_in_use")),
                "another node placed a key whose commit may still land: {body}"
            );
            stalled_at.elapsed() >= 2 * LOCK_TTL
        },
    )
    .await;
    assert!(metric(&mut on_a, "turnstile_redis_lock_renewals_total").await >= 2.0);

    // The connections A used stay silent for ever (their peer vanished without a reset); only new
    // ones reach MariaDB. A gives up on them (--mysql-timeout) and settles its commit on a new one.
    proxy.abandon_open_connections();
    proxy.stall(false);
    let mut first = serde_json::Value::Null;
    eventually(
        "node A to learn the outcome and replay it",
        Duration::from_secs(30),
        async || {
            let (status, body, replayed) = checkout(&mut on_a, "stalled").await;
            assert!(status != 201 || replayed, "a second order on A: {body}");
            first = body;
            status == 201
        },
    )
    .await;
    redis.wait_answer("stalled", Duration::from_secs(10)).await;
    let (status, again, replayed) = checkout(&mut on_b, "stalled").await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(again, first, "B replays A's answer: one order");
    assert_eq!(on_a.stock("S").await.3 + on_b.stock("S").await.3, 1);
    assert_eq!(
        metric(&mut on_a, "turnstile_redis_locks_lost_total").await,
        0.0
    );
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_write_behind_a_checkout_waiting_for_a_stalled_mysql_gives_up_and_frees_its_key() {
    let database = TestDatabase::create().await;
    let proxy = StallProxy::start(MARIADB_ADDR.parse().expect("address")).await;
    let redis = TestRedis::create("stalled-behind").await;
    let extra = [
        "--mysql-url".to_owned(),
        through(&proxy, &database),
        "--mysql-write-behind".into(),
        "--mysql-lag-max".into(),
        "1s".into(),
    ];
    let a = start(&redis, &extra);
    let b = start(&redis, &[]);
    let (mut on_a, mut on_b) = (a.client(), b.client());
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.put_product("S", 100, 10).await.status, 200);
    }

    proxy.stall(true);
    // The embedded journal acknowledges; MySQL falls behind past --mysql-lag-max.
    let (status, body, _) = checkout(&mut on_a, "before").await;
    assert_eq!(status, 201, "{body}");
    eventually(
        "MySQL to fall past --mysql-lag-max",
        Duration::from_secs(30),
        async || on_a.get("/readyz").await.status == 503,
    )
    .await;
    let (status, body, _) = checkout(&mut on_a, "waiting").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("journal_unavailable")),
        "{body}"
    );
    assert!(
        body.get("outcome").is_none(),
        "the wait is given up before the request's timeout: nothing changed, and it says so: {body}"
    );
    // The key is free: the other node places it (A's lock release reaches Redis right after its
    // answer, not before it: `409 idempotency_key_in_use` until then).
    let mut placed = serde_json::Value::Null;
    eventually(
        "A's lock to be released and B to place the key",
        Duration::from_secs(10),
        async || {
            let (status, body, replayed) = checkout(&mut on_b, "waiting").await;
            if status == 409 && body["error"] == "idempotency_key_in_use" {
                return false;
            }
            assert_eq!((status, replayed), (201, false), "{body}");
            placed = body;
            true
        },
    )
    .await;

    proxy.stall(false);
    redis.wait_answer("waiting", Duration::from_secs(10)).await;
    let (status, again, replayed) = checkout(&mut on_a, "waiting").await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(again, placed, "A replays B's order: one order for the key");
    assert_eq!(on_a.stock("S").await.3, 1, "A sold only the first order");
    assert_eq!(on_b.stock("S").await.3, 1);
    eventually(
        "MySQL to catch up once the network is back",
        Duration::from_secs(30),
        async || on_a.get("/readyz").await.status == 200,
    )
    .await;
    drop(redis);
}

/// A COMMIT that reaches MariaDB late (its flow held, as segments waiting out a retransmission,
/// while new connections get through): the writer gives up on it at `--mysql-timeout` and must
/// not take what follows for anything but its own batch. Found by attack: the retry's INSERT
/// waited on the late transaction's row locks, failed with a duplicate lsn when the COMMIT
/// landed, and the record was taken as refused by the database: its key freed (the other node
/// placed it again) and its unit released (sold again on the same node), although the order was
/// in `journal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_lands_late_is_never_taken_for_a_refused_record() {
    let database = TestDatabase::create().await;
    let proxy = StallProxy::start(MARIADB_ADDR.parse().expect("address")).await;
    let redis = TestRedis::create("late-commit").await;
    let a = start(&redis, &["--mysql-url".into(), through(&proxy, &database)]);
    let b = start(&redis, &[]);
    let (mut on_a, mut on_b) = (a.client(), b.client());
    // One unit each: a unit released by mistake would be sold again.
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.put_product("S", 100, 1).await.status, 200);
    }
    eventually(
        "the projections to catch up",
        Duration::from_secs(10),
        async || metric(&mut on_a, "turnstile_mysql_lag_records").await == 0.0,
    )
    .await;

    proxy.hold_next_commit();
    let (status, body, _) = checkout(&mut on_a, "late").await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (503, Some("unknown")),
        "{body}"
    );
    assert!(proxy.holding(), "the checkout's COMMIT is held");
    // The writer gives up on the held connection (--mysql-timeout), ends its session on the
    // server and looks, on a new connection, whether the batch is there before it retries.
    // Until the outcome is known, or a retry of the batch waits on the held transaction's row
    // locks (the moment a late COMMIT was taken for a refusal).
    let pool = database.pool().await;
    eventually(
        "node A to know its outcome, or to retry into the held transaction",
        Duration::from_secs(30),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                 WHERE DB = ? AND COMMAND <> 'Sleep' AND ID <> CONNECTION_ID() \
                 AND INFO LIKE 'INSERT INTO journal%'",
            )
            .bind(&database.name)
            .fetch_one(&pool)
            .await
            .expect("PROCESSLIST");
            waiting > 0 || checkout(&mut on_a, "late").await.0 == 201
        },
    )
    .await;
    // The late COMMIT now reaches the server: on a session already ended (it is dropped), or, had
    // it not been ended, before the look could say anything. Either way: one order, known.
    proxy.release_held();
    let mut first = serde_json::Value::Null;
    eventually(
        "node A to know its outcome",
        Duration::from_secs(30),
        async || {
            let (status, body, replayed) = checkout(&mut on_a, "late").await;
            assert!(status != 201 || replayed, "a second order on A: {body}");
            assert!(status != 500, "the record was taken as refused: {body}");
            first = body;
            status == 201
        },
    )
    .await;
    redis.wait_answer("late", Duration::from_secs(10)).await;
    let (status, again, replayed) = checkout(&mut on_b, "late").await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(again, first, "one order for the key");
    // A's one unit is sold, and stays so: another key finds it sold out.
    let (status, body, _) = checkout(&mut on_a, "other").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("out_of_stock")),
        "{body}"
    );
    assert_eq!(on_a.stock("S").await, (1, 0, 0, 1));
    assert_eq!(on_b.stock("S").await, (1, 1, 0, 0));
    let rows: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM journal WHERE idempotency_key IS NOT NULL AND refused IS NULL",
    )
    .fetch_one(&database.pool().await)
    .await
    .expect("count");
    assert_eq!(rows, 1, "one order in A's journal");
    drop(redis);
}

/// A node on `database` through `proxy` with `stock` units of `S`, whose network goes silent while
/// the COMMIT of a checkout under `key` is on its way (answered `503`, outcome unknown).
async fn cut_mid_commit(
    proxy: &StallProxy,
    database: &TestDatabase,
    stock: i64,
    key: &str,
) -> (TestApp, Client) {
    let url = through(proxy, database);
    let node = spawn_app(&[
        "--mysql-url",
        &url,
        "--journal-timeout",
        "1s",
        "--mysql-timeout",
        "1s",
    ]);
    let mut client = node.client();
    assert_eq!(client.put_product("S", 100, stock).await.status, 200);
    eventually(
        "the projections to catch up",
        Duration::from_secs(10),
        async || metric(&mut client, "turnstile_mysql_lag_records").await == 0.0,
    )
    .await;
    proxy.stall_at_commit();
    let (status, body, _) = checkout(&mut client, key).await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (503, Some("unknown")),
        "{body}"
    );
    (node, client)
}

/// A node whose network to MySQL went silent while a commit was on its way, and whose lock
/// session ended meanwhile (the server saw its connections go), loses the journal to the node
/// that takes it over: once its network is back it writes nothing more (the database's fence
/// refuses its transactions), refuses every change, and the new node's journal stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_journal_database_to_another_writes_nothing_more() {
    let database = TestDatabase::create().await;
    let proxy = StallProxy::start(MARIADB_ADDR.parse().expect("address")).await;
    let (first, mut on_first) = cut_mid_commit(&proxy, &database, 1, "cut").await;
    // The server sees the first node's connections go (its lock session ends, its open
    // transaction is rolled back); the node itself hears nothing yet.
    proxy.abandon_open_connections();

    let dir = tempfile::tempdir().expect("tempdir");
    let second = crate::helpers::start(&dir.path().join("second"), &["--mysql-url", &database.url]);
    let mut on_second = second.client();
    assert_eq!(
        on_second.stock("S").await,
        (1, 1, 0, 0),
        "the second node loads the journal as it is"
    );
    let (status, body, _) = checkout(&mut on_second, "taken-over").await;
    assert_eq!(status, 201, "{body}");

    // The first node's network comes back: whatever it still holds or is asked, it writes nothing.
    proxy.stall(false);
    eventually(
        "the first node to refuse changes",
        Duration::from_secs(30),
        async || {
            let answer = on_first.put_product("S", 100, 5).await;
            assert!(
                answer.status >= 500,
                "the node that lost the journal changed it: {} {:?}",
                answer.status,
                answer.body
            );
            answer.status == 503
        },
    )
    .await;
    // Its checkout whose commit was cut is not taken for placed: the record at its lsn is the
    // second node's (found by attack: the look after a commit in doubt asked only whether a row
    // was there, and the first node answered 201 and captured for an order no journal holds).
    eventually(
        "the first node's commit in doubt to be settled",
        Duration::from_secs(30),
        async || {
            let (status, body, _) = checkout(&mut on_first, "cut").await;
            assert_ne!(status, 201, "an order no journal holds: {body}");
            // 409 while its outcome is still being looked for.
            status == 503
        },
    )
    .await;
    // Another checkout there is refused too.
    let (status, body, _) = checkout(&mut on_first, "after").await;
    assert!(matches!(status, 409 | 503), "{status} {body}");
    assert_eq!(on_first.get("/readyz").await.status, 503);

    // The journal is the second node's alone: a node started on it finds one unit sold, once.
    drop(first);
    drop(second);
    let third = crate::helpers::start(&dir.path().join("third"), &["--mysql-url", &database.url]);
    assert_eq!(third.client().stock("S").await, (1, 0, 0, 1));
    let pool = database.pool().await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM journal WHERE refused IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(
        rows, 0,
        "no record of the first node was written after the takeover"
    );
}

/// Found by attack: a node killed while its network to MySQL was silent left its sessions open
/// on the server, one of them inside a transaction holding rows a new node needs, for the
/// server's default `wait_timeout` (hours): a node started on the database waited for them all
/// that time. Its sessions now end within `POOL_SESSION_IDLE_MAX`, and a new node waits that long
/// for them, then starts on the journal as it is. (The time is what is tested: the start is
/// bounded by the helper's own limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_commit_behind_a_silent_network_does_not_stop_the_next_one() {
    let database = TestDatabase::create().await;
    let proxy = StallProxy::start(MARIADB_ADDR.parse().expect("address")).await;
    // Then the node dies. Its sessions stay open on the server (the proxy keeps them, silent),
    // one inside its transaction.
    let (mut first, _) = cut_mid_commit(&proxy, &database, 3, "orphan").await;
    first.kill_9();

    let dir = tempfile::tempdir().expect("tempdir");
    let (second_dir, direct) = (dir.path().join("second"), database.url.clone());
    let started = std::time::Instant::now();
    let second = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            crate::helpers::start(&second_dir, &["--mysql-url", &direct])
        }),
    )
    .await
    .expect("the next node started within two minutes")
    .expect("start");
    eprintln!("the next node started after {:?}", started.elapsed());
    let mut on_second = second.client();
    let (stock, available, reserved, sold) = on_second.stock("S").await;
    assert_eq!((stock, reserved), (3, 0));
    assert_eq!(available + sold, 3);
    drop(proxy);
}

/// A checkout whose node's lease is dry waits for a refill from the pool (several nodes); a
/// caller gone during that wait (MySQL silent, so the refill cannot come) leaves its key free:
/// the same key sent again is answered (503 while the pool cannot be reached, then one order),
/// never `409 idempotency_key_in_use` for a checkout nobody runs any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_gone_while_waiting_for_a_refill_leaves_its_key_free() {
    let database = TestDatabase::create().await;
    let proxy = StallProxy::start(MARIADB_ADDR.parse().expect("address")).await;
    let redis = TestRedis::create("gone-in-refill").await;
    let node = start(
        &redis,
        &[
            "--mysql-url".into(),
            through(&proxy, &database),
            "--node-id".into(),
            "refill-a".into(),
            "--cluster-secret".into(),
            "stalled-commit-secret".into(),
        ],
    );
    let mut client = node.client();
    assert_eq!(client.put_product("S", 100, 10).await.status, 200);
    // The node holds no unit of S (nothing sold: any block it took went back, idle) and knows
    // the pool has all ten.
    eventually(
        "the node to hold no unit and see the pool's ten",
        Duration::from_secs(30),
        async || {
            metric(&mut client, "turnstile_cluster_leased_units").await == 0.0
                && metric(&mut client, "turnstile_cluster_pool_units").await == 10.0
        },
    )
    .await;

    proxy.stall(true);
    let mut gone = node.client();
    let waited = tokio::time::timeout(Duration::from_secs(1), checkout(&mut gone, "gone")).await;
    assert!(
        waited.is_err(),
        "the checkout was to wait for its refill: {waited:?}"
    );
    drop(gone);
    // Sent again while MySQL is still silent: told to retry (the refill cannot come), once the
    // first try's Redis lock is released; never the first try's key still in flight.
    let mut retry = node.client();
    eventually(
        "the key to be free again",
        Duration::from_secs(15),
        async || {
            let (status, body, _) = checkout(&mut retry, "gone").await;
            assert_ne!(status, 201, "an order while MySQL is silent: {body}");
            status != 409
        },
    )
    .await;

    proxy.stall(false);
    let mut first = serde_json::Value::Null;
    eventually("the key's one order", Duration::from_secs(30), async || {
        let (status, body, replayed) = checkout(&mut retry, "gone").await;
        assert!(
            status == 201
                || status == 503
                || (status, body["error"].as_str()) == (409, Some("idempotency_key_in_use")),
            "{status}: {body}"
        );
        assert!(!replayed || status == 201, "{body}");
        first = body;
        status == 201
    })
    .await;
    let (status, again, replayed) = checkout(&mut retry, "gone").await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(again, first, "one order under the key");
    assert_eq!(client.stock("S").await.3, 1, "one unit sold");
    drop(redis);
}
