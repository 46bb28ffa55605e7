//! Money after truth, against the real `turnstile gateway-sim` process over HTTP: checkouts through
//! a faulty gateway, the gateway down, and `kill -9` at each step of the money flow. After each,
//! the simulator's ledger is read against the orders: every captured payment belongs to exactly
//! one paid order, no paid order is left uncaptured, no authorisation is left hanging, no order
//! stays `payment_pending`.

use crate::helpers::{
    eventually, metric, spawn_app, start, start_with_env, Client, JsonBody, TestApp,
};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

pub(crate) use crate::helpers::{free_port, server_args, Sim};

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn checkout_body(sku: &str, token: &str) -> String {
    format!(
        r#"{{"items":[{{"sku":"{sku}","quantity":1}}],"customer_id":"c-1","payment_token":"{token}"}}"#
    )
}

/// Checks out with `key` until the answer is final (`201`, `202`, `402`, `504`), retrying the same
/// key while the outcome is unknown or in flight (`503`, `409 idempotency_key_in_use`).
async fn checkout_until_final(client: &mut Client, key: &str, sku: &str, token: &str) -> Value {
    let body = checkout_body(sku, token);
    for _ in 0..200 {
        let answer = client
            .send("POST", "/v1/checkout", &[("idempotency-key", key)], &body)
            .await;
        match answer.status {
            201 | 202 | 402 | 504 => {
                let mut json = answer.json();
                json["http_status"] = answer.status.into();
                return json;
            }
            503 | 409 => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("checkout {key}: unexpected {other}: {:?}", answer.json()),
        }
    }
    panic!("checkout {key} never got a final answer");
}

/// The invariants between the orders and the gateway's ledger, once the reconciler is done.
async fn money_matches_orders(app: &TestApp, sim: &Sim, sku: &str) {
    let mut client = app.client();
    eventually(
        "no money owed, no authorisation hanging, no order pending",
        Duration::from_secs(60),
        async || {
            let owed = metric(&mut client, "turnstile_payments_owed").await;
            let hanging = sim
                .ledger()
                .await
                .iter()
                .filter(|p| p["status"] == "authorized" || p["status"] == "pending")
                .count();
            owed == 0.0 && hanging == 0
        },
    )
    .await;
    let ledger = sim.ledger().await;
    let mut captured_by_order: HashMap<String, usize> = HashMap::new();
    for payment in &ledger {
        if payment["status"] == "captured" {
            *captured_by_order
                .entry(payment["order_id"].as_str().expect("order_id").to_owned())
                .or_default() += 1;
        }
    }
    let mut paid_orders = 0;
    for (order_id, captures) in &captured_by_order {
        assert_eq!(
            *captures, 1,
            "order {order_id} was captured {captures} times"
        );
        let order = client.get(&format!("/v1/orders/{order_id}")).await.json();
        assert_eq!(
            order["status"], "paid",
            "captured money for a non-paid order: {order}"
        );
        paid_orders += 1;
    }
    let product = client.get(&format!("/v1/products/{sku}")).await.json();
    assert_eq!(product["reserved"], 0, "{product}");
    assert_eq!(
        product["sold"].as_i64(),
        Some(paid_orders),
        "every sold unit is one captured payment: {product}"
    );
    let (stock, available, reserved, sold) = client.stock(sku).await;
    assert_eq!(available + reserved + sold, stock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_checkouts_through_a_faulty_gateway_leave_money_matching_the_orders() {
    // The server first (the simulator's webhooks need its address), pointed at the port the
    // simulator will take.
    let sim_port = free_port();
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    let app = spawn_app(&as_strs(&server_args(&sim_url)));
    let webhook = format!("http://{}/v1/webhooks/payment", app.addr);
    let sim = Sim::start(
        &format!("127.0.0.1:{sim_port}"),
        &[
            "--fail-timeout",
            "0.1",
            "--fail-5xx",
            "0.05",
            "--fail-drop",
            "0.05",
            "--pending-delay",
            "200ms",
            "--webhook-url",
            &webhook,
            "--webhook-secret",
            crate::helpers::WEBHOOK_SECRET,
        ],
    );
    let mut client = app.client();
    client.put_product("G", 100, 100_000).await;

    const CHECKOUTS: usize = 1_000;
    const WORKERS: usize = 32;
    let workers = (0..WORKERS).map(|w| {
        let addr = app.addr;
        tokio::spawn(async move {
            let mut client = Client::new(addr);
            let mut answers = Vec::new();
            for i in (w..CHECKOUTS).step_by(WORKERS) {
                let token = match i % 10 {
                    0 => "tok_decline",
                    1 => "tok_pending",
                    _ => "tok_ok",
                };
                answers
                    .push(checkout_until_final(&mut client, &format!("g-{i}"), "G", token).await);
            }
            answers
        })
    });
    let mut by_status: HashMap<u64, usize> = HashMap::new();
    for worker in futures_util::future::join_all(workers).await {
        for answer in worker.expect("worker") {
            *by_status
                .entry(answer["http_status"].as_u64().unwrap_or(0))
                .or_default() += 1;
        }
    }
    assert_eq!(
        by_status.values().sum::<usize>(),
        CHECKOUTS,
        "{by_status:?}"
    );
    assert!(
        by_status.get(&504).copied().unwrap_or(0) > 0,
        "the injected timeouts showed: {by_status:?}"
    );
    assert!(
        by_status.get(&201).copied().unwrap_or(0) > 500,
        "{by_status:?}"
    );
    money_matches_orders(&app, &sim, "G").await;
    // The drops and 5xx were retried under the same key: never a second payment for one key.
    let ledger = sim.ledger().await;
    let mut keys = std::collections::HashSet::new();
    for payment in &ledger {
        assert!(
            keys.insert(payment["idempotency_key"].to_string()),
            "two payments for one key: {payment}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_gateway_down_checkouts_fail_fast_and_the_reconciler_clears_what_is_owed() {
    let sim = Sim::start("127.0.0.1:0", &[]);
    let app = spawn_app(&as_strs(&server_args(&sim.url())));
    let mut client = app.client();
    client.put_product("D", 100, 10).await;
    let paid = checkout_until_final(&mut client, "d-1", "D", "tok_ok").await;
    assert_eq!(paid["http_status"], 201, "{paid}");
    let paid_id = paid["order_id"].as_str().expect("order_id").to_owned();
    let ready = client.get("/readyz").await;
    assert_eq!(
        ready.json()["checks"]["gateway"],
        "ok",
        "{:?}",
        ready.json()
    );

    // The gateway stops answering (its process paused, connections open): wait until the kernel
    // shows it stopped, since a signal takes effect when the process is next scheduled.
    sim.signal("-STOP");
    let stat = format!("/proc/{}/stat", sim.child.id());
    eventually(
        "the gateway process to be stopped",
        Duration::from_secs(10),
        async || {
            std::fs::read_to_string(&stat)
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('T'))
                })
                .unwrap_or(false)
        },
    )
    .await;
    let started = std::time::Instant::now();
    let down = checkout_until_final(&mut client, "d-2", "D", "tok_ok").await;
    assert_eq!(down["http_status"], 504, "{down}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within --gateway-timeout (plus the journal)"
    );
    // /readyz says so, and the node stays ready: payments owed catch up.
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200);
    let reason = ready.json()["checks"]["gateway"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.starts_with("the last call got no answer"),
        "{reason}"
    );
    let cancelled = client
        .send("POST", &format!("/v1/orders/{paid_id}/cancel"), &[], "")
        .await
        .json();
    assert_eq!(cancelled["status"], "refunded", "{cancelled}");
    // Nothing stays held; the refund (or void, if the capture had not happened yet) is owed.
    assert_eq!(client.stock("D").await, (10, 10, 0, 0));
    assert_eq!(metric(&mut client, "turnstile_payments_owed").await, 1.0);

    // The gateway comes back. If the timed-out authorisation queued in its socket is still
    // served, no durable order holds it and the reconciler voids it (the orphan scan has its own
    // test below).
    sim.signal("-CONT");
    money_matches_orders(&app, &sim, "D").await;
    let ledger = sim.ledger().await;
    let statuses: Vec<&str> = ledger.iter().filter_map(|p| p["status"].as_str()).collect();
    assert!(
        statuses.iter().all(|s| *s == "refunded" || *s == "voided"),
        "the cancelled order's money went back, the orphan was voided: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_each_step_of_the_money_flow_leaves_one_order_and_at_most_one_capture() {
    for point in ["after_authorize", "before_capture", "after_capture"] {
        let sim = Sim::start("127.0.0.1:0", &[]);
        let args = server_args(&sim.url());
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        {
            let app = start(&data_dir, &as_strs(&args));
            app.client().put_product("K", 100, 5).await;
        }
        let mut app = start_with_env(
            &data_dir,
            &as_strs(&args),
            &[("TURNSTILE_TEST_PAUSE", point)],
        );
        let addr = app.addr;
        let checkout = tokio::spawn(async move {
            let mut client = Client::new(addr);
            client
                .try_send(
                    "POST",
                    "/v1/checkout",
                    &[("idempotency-key", "k-1")],
                    &checkout_body("K", "tok_ok"),
                )
                .await
        });
        // Wait for the server to reach the point, as the gateway's ledger shows it.
        let reached = match point {
            "after_authorize" | "before_capture" => "authorized",
            _ => "captured",
        };
        eventually(
            &format!("the money flow reaches {point}"),
            Duration::from_secs(20),
            async || sim.ledger().await.iter().any(|p| p["status"] == reached),
        )
        .await;
        if point == "before_capture" {
            // The order is durable (the answer went out) before the capture is attempted.
            let answered = checkout.await.expect("task").expect("answer");
            assert_eq!(answered.status, 201, "{point}");
        }
        app.kill_9();

        // Restart without the pause and retry with the same key.
        let app = start(&data_dir, &as_strs(&args));
        let mut client = app.client();
        let retried = checkout_until_final(&mut client, "k-1", "K", "tok_ok").await;
        assert_eq!(retried["http_status"], 201, "{point}: {retried}");
        money_matches_orders(&app, &sim, "K").await;
        let ledger = sim.ledger().await;
        assert_eq!(
            ledger.len(),
            1,
            "{point}: one authorisation for one key: {ledger:?}"
        );
        assert_eq!(ledger[0]["status"], "captured", "{point}: {ledger:?}");
        assert_eq!(
            ledger[0]["order_id"], retried["order_id"],
            "{point}: the payment is the order's"
        );
        let product = client.get("/v1/products/K").await.json();
        assert_eq!(product["sold"], 1, "{point}: one order: {product}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorisation_no_durable_order_holds_is_voided_by_the_reconciler() {
    // Every authorisation is made, then its connection dropped before the answer: the checkout
    // (after its retries) answers 504 and journals nothing that holds the payment. The
    // reconciler's orphan scan finds the authorisation past --reconcile-after and voids it.
    let sim = Sim::start("127.0.0.1:0", &["--fail-drop", "1"]);
    let app = spawn_app(&as_strs(&server_args(&sim.url())));
    let mut client = app.client();
    client.put_product("O", 100, 3).await;
    let dropped = checkout_until_final(&mut client, "o-1", "O", "tok_ok").await;
    assert_eq!(dropped["http_status"], 504, "{dropped}");
    assert_eq!(sim.ledger().await[0]["status"], "authorized");
    money_matches_orders(&app, &sim, "O").await;
    let ledger = sim.ledger().await;
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0]["status"], "voided", "{ledger:?}");
    assert!(metric(&mut client, "turnstile_reconciler_actions_total").await >= 1.0);
    assert_eq!(client.stock("O").await, (3, 3, 0, 0));
}

/// What the operations desk of `app` says the settler owes the gateway.
async fn owed_payments(app: &TestApp, bearer: &str) -> Vec<Value> {
    let answer = app
        .client()
        .send(
            "GET",
            "/v1/admin/payments",
            &[("authorization", bearer)],
            "",
        )
        .await;
    assert_eq!(answer.status, 200);
    answer.json()["owed"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A server on `data_dir` with product `sku`, whose money flow stops before every capture (so a
/// test can kill it between an order's answer and its capture).
async fn pausing_before_capture(
    data_dir: &std::path::Path,
    args: &[String],
    sku: &str,
    stock: i64,
) -> TestApp {
    {
        let app = start(data_dir, &as_strs(args));
        app.client().put_product(sku, 100, stock).await;
    }
    start_with_env(
        data_dir,
        &as_strs(args),
        &[("TURNSTILE_TEST_PAUSE", "before_capture")],
    )
}

/// Nodes that share one payment gateway (one shop's account), each with its own journal, with a
/// short `--reconcile-after`: a node's orphan scan lists only the authorisations it made, so it
/// never voids another node's live payment, neither one still pending nor the one of a paid order
/// whose node was killed before its capture. Back up, that node captures its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sharing_one_gateway_never_void_each_others_payments() {
    let sim = Sim::start("127.0.0.1:0", &["--pending-delay", "1h"]);
    let args = server_args(&sim.url());
    let a = spawn_app(&as_strs(&args));
    let mut on_a = a.client();
    on_a.put_product("K", 100, 10).await;
    assert_eq!(
        on_a.get("/v1/admin/payments").await.status,
        404,
        "no operations desk without --admin-token"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let data_b = dir.path().join("b");
    let mut b = pausing_before_capture(&data_b, &args, "K", 10).await;
    let mut on_b = b.client();
    let pending = checkout_until_final(&mut on_b, "pend", "K", "tok_pending").await;
    assert_eq!(pending["http_status"], 202, "{pending}");
    let paid = checkout_until_final(&mut on_b, "paid", "K", "tok_ok").await;
    assert_eq!(paid["http_status"], 201, "{paid}");
    b.kill_9();

    // While B is down, A's reconciler scans again and again, B's payments older than
    // --reconcile-after (3 s; a scan every 1.5 s).
    let scans = metric(&mut on_a, "turnstile_reconciler_scans_total").await;
    eventually(
        "node A to scan four times",
        Duration::from_secs(30),
        async || metric(&mut on_a, "turnstile_reconciler_scans_total").await >= scans + 4.0,
    )
    .await;
    let status_of = |ledger: &[Value], order: &Value| -> String {
        ledger
            .iter()
            .find(|p| p["order_id"] == order["order_id"])
            .map(|p| p["status"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    let ledger = sim.ledger().await;
    assert_eq!(status_of(&ledger, &pending), "pending", "{ledger:?}");
    assert_eq!(status_of(&ledger, &paid), "authorized", "{ledger:?}");
    assert_eq!(
        metric(&mut on_a, "turnstile_payments_voided_total").await,
        0.0
    );

    // B back: it captures its paid order; its pending payment waits for the gateway's word.
    let b = start(&data_b, &as_strs(&args));
    let mut on_b = b.client();
    eventually(
        "node B to capture its order",
        Duration::from_secs(30),
        async || status_of(&sim.ledger().await, &paid) == "captured",
    )
    .await;
    let order = on_b
        .get(&format!(
            "/v1/orders/{}",
            paid["order_id"].as_str().unwrap_or("-")
        ))
        .await;
    assert_eq!(order.json()["status"], "paid");
    let order = on_b
        .get(&format!(
            "/v1/orders/{}",
            pending["order_id"].as_str().unwrap_or("-")
        ))
        .await;
    assert_eq!(order.json()["status"], "payment_pending");
    assert_eq!(status_of(&sim.ledger().await, &pending), "pending");
    // Each node's keys carry its own name: one payment per checkout, none shared.
    let ledger = sim.ledger().await;
    assert_eq!(ledger.len(), 2, "{ledger:?}");
}

/// A paid order whose authorisation the gateway no longer holds (voided there while the node was
/// down): its capture is refused for good. That is a visible, counted state, listed for the
/// operator with the gateway's words, and not a retry loop; cancelling the order ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_whose_capture_is_refused_is_listed_counted_and_not_retried() {
    const TOKEN: &str = "operator-token-0123456789";
    let sim = Sim::start("127.0.0.1:0", &[]);
    let mut args = server_args(&sim.url());
    args.extend(["--admin-token".to_owned(), TOKEN.to_owned()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut app = pausing_before_capture(&data_dir, &args, "R", 5).await;
    let paid = checkout_until_final(&mut app.client(), "refused", "R", "tok_ok").await;
    assert_eq!(paid["http_status"], 201, "{paid}");
    app.kill_9();
    let payment_id = sim.ledger().await[0]["payment_id"]
        .as_str()
        .expect("payment id")
        .to_owned();
    let voided = Client::new(sim.addr)
        .send("POST", &format!("/v1/payments/{payment_id}/void"), &[], "")
        .await;
    assert_eq!(voided.status, 200);

    let app = start(&data_dir, &as_strs(&args));
    let mut client = app.client();
    eventually(
        "the refused capture to show",
        Duration::from_secs(30),
        async || metric(&mut client, "turnstile_payments_capture_refused_orders").await == 1.0,
    )
    .await;
    let bearer = format!("Bearer {TOKEN}");
    let owed = owed_payments(&app, &bearer).await;
    assert_eq!(owed.len(), 1, "{owed:?}");
    assert_eq!(owed[0]["order_id"], paid["order_id"]);
    assert_eq!(owed[0]["action"], "capture");
    assert_eq!(owed[0]["refused"], true);
    assert_eq!(owed[0]["attempts"], 1);
    assert!(
        owed[0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("Voided"),
        "{owed:?}"
    );
    for wrong in ["", "Bearer nope", "operator-token-0123456789"] {
        let refused = client
            .send("GET", "/v1/admin/payments", &[("authorization", wrong)], "")
            .await;
        assert_eq!(refused.status, 401, "{wrong:?}");
        assert_eq!(refused.json()["error"], "unauthorized");
    }
    // Not retried: the reconciler runs on, the attempts stay one.
    let scans = metric(&mut client, "turnstile_reconciler_scans_total").await;
    eventually("three more scans", Duration::from_secs(30), async || {
        metric(&mut client, "turnstile_reconciler_scans_total").await >= scans + 3.0
    })
    .await;
    let owed = owed_payments(&app, &bearer).await;
    assert_eq!(owed[0]["attempts"], 1, "{owed:?}");
    assert_eq!(
        metric(&mut client, "turnstile_payments_capture_refused_total").await,
        1.0
    );
    let order_path = format!("/v1/orders/{}", paid["order_id"].as_str().unwrap_or("-"));
    assert_eq!(client.get(&order_path).await.json()["status"], "paid");

    // The operator cancels it: refunded (nothing to give back at the gateway), no longer owed.
    let cancelled = client
        .send("POST", &format!("{order_path}/cancel"), &[], "")
        .await;
    assert_eq!(cancelled.json()["status"], "refunded");
    eventually(
        "nothing owed any more",
        Duration::from_secs(30),
        async || {
            metric(&mut client, "turnstile_payments_capture_refused_orders").await == 0.0
                && metric(&mut client, "turnstile_payments_owed").await == 0.0
        },
    )
    .await;
    assert_eq!(client.stock("R").await, (5, 5, 0, 0));
}

/// Found by attack: with MySQL as the journal the data dir held only the node's name, so a node
/// started again on a new data dir (a container without a volume) took a new name, and the
/// authorisation its earlier run left without an order was never voided (the orphan scan lists
/// only its own name's). The name is kept with the journal now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mysql_a_node_started_on_a_new_data_dir_still_voids_its_orphans() {
    let database = crate::helpers::TestDatabase::create().await;
    let sim = Sim::start("127.0.0.1:0", &[]);
    let mut args = server_args(&sim.url());
    args.extend(["--mysql-url".to_owned(), database.url.clone()]);
    let first_dir = tempfile::tempdir().expect("tempdir");
    let first_data = first_dir.path().join("data");
    {
        let app = start(&first_data, &as_strs(&args));
        app.client().put_product("O", 100, 3).await;
    }
    // Killed between the authorisation and the commit: an authorisation no order holds.
    let mut app = start_with_env(
        &first_data,
        &as_strs(&args),
        &[("TURNSTILE_TEST_PAUSE", "after_authorize")],
    );
    let addr = app.addr;
    let checkout = tokio::spawn(async move {
        Client::new(addr)
            .try_send(
                "POST",
                "/v1/checkout",
                &[("idempotency-key", "o-1")],
                &checkout_body("O", "tok_ok"),
            )
            .await
    });
    eventually("the authorisation", Duration::from_secs(20), async || {
        sim.ledger()
            .await
            .iter()
            .any(|p| p["status"] == "authorized")
    })
    .await;
    app.kill_9();
    let _ = checkout.await;
    drop(first_dir);

    // Started again on a data dir of its own: the journal says whose it is.
    let app = spawn_app(&as_strs(&args));
    eventually(
        "the orphan to be voided",
        Duration::from_secs(30),
        async || sim.ledger().await.iter().all(|p| p["status"] == "voided"),
    )
    .await;
    assert_eq!(app.client().stock("O").await, (3, 3, 0, 0));
}

/// Found by attack: a data dir moved to a new database (a node pointed at a new `--mysql-url`)
/// gave that database its own name, and a node started on the old database with a new data dir
/// (a container without a volume) took the same name from the old database's `node_name` row.
/// Two live nodes with separate journals then shared one name at the gateway, and each one's
/// orphan scan voided the other's live payments: a `202` still pending was voided and its order
/// released. A new database now gets a new name, never the data dir's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_moved_to_another_database_never_gives_two_live_nodes_one_name() {
    let first_db = crate::helpers::TestDatabase::create().await;
    let second_db = crate::helpers::TestDatabase::create().await;
    let sim = Sim::start("127.0.0.1:0", &["--pending-delay", "1h"]);
    let with_db = |url: &str| {
        let mut args = server_args(&sim.url());
        args.extend(["--mysql-url".to_owned(), url.to_owned()]);
        args
    };
    let (first_args, second_args) = (with_db(&first_db.url), with_db(&second_db.url));
    let dir = tempfile::tempdir().expect("tempdir");
    let moved = dir.path().join("moved");
    {
        // The node's first life, on the first database.
        let app = start(&moved, &as_strs(&first_args));
        app.client().put_product("M", 100, 5).await;
    }
    // Its data dir now serves the second database; the first gets a node on a new data dir.
    let a = start(&moved, &as_strs(&second_args));
    let c = spawn_app(&as_strs(&first_args));
    let (a_name, c_name) = (
        journal_node_name(&second_db).await,
        journal_node_name(&first_db).await,
    );
    assert_ne!(a_name, c_name, "two live nodes share one name");
    let mut on_a = a.client();
    on_a.put_product("M", 100, 5).await;
    let pending = on_a
        .send(
            "POST",
            "/v1/checkout",
            &[("idempotency-key", "moved-1")],
            &checkout_body("M", "tok_pending"),
        )
        .await;
    assert_eq!(pending.status, 202, "{:?}", pending.json());
    let order_id = pending.json()["order_id"]
        .as_str()
        .expect("order_id")
        .to_owned();

    // Node C's reconciler scans past --reconcile-after (3 s) several times.
    let mut on_c = c.client();
    let scans = metric(&mut on_c, "turnstile_reconciler_scans_total").await;
    eventually(
        "node C to scan four times",
        Duration::from_secs(30),
        async || metric(&mut on_c, "turnstile_reconciler_scans_total").await >= scans + 4.0,
    )
    .await;
    let ledger = sim.ledger().await;
    let status = ledger
        .iter()
        .find(|p| p["order_id"] == order_id.as_str())
        .map(|p| p["status"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        status.as_deref(),
        Some("pending"),
        "node C voided node A's live payment: {ledger:?}"
    );
    let order = on_a.get(&format!("/v1/orders/{order_id}")).await.json();
    assert_eq!(order["status"], "payment_pending", "{order}");
}

/// Found by attack: a `node_name` row edited by hand (`shop-1`, or empty) was taken as it was,
/// written into the data dir, and the next start failed with exit 1 telling the operator to
/// remove the data dir's file, which the start after wrote back. It is refused now: exit 2 naming
/// the table, the data dir's name untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mysql_a_node_name_row_edited_by_hand_is_refused_with_exit_2() {
    let database = crate::helpers::TestDatabase::create().await;
    let sim = Sim::start("127.0.0.1:0", &[]);
    let mut args = server_args(&sim.url());
    args.extend(["--mysql-url".to_owned(), database.url.clone()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let name = {
        let app = start(&data, &as_strs(&args));
        turnstile::data_dir::node_name(&app.data_dir).expect("name")
    };
    let pool = database.pool().await;
    for edited in ["shop-1", ""] {
        sqlx::query("UPDATE node_name SET name = ?")
            .bind(edited)
            .execute(&pool)
            .await
            .expect("edit the row");
        let (code, stderr) = crate::helpers::serve_refused(&data, &as_strs(&args));
        assert_eq!(code, Some(2), "{edited:?}: {stderr}");
        assert!(stderr.contains("node_name"), "{edited:?}: {stderr}");
        assert_eq!(
            turnstile::data_dir::node_name(&data).expect("the data dir's name"),
            name,
            "the data dir took {edited:?}"
        );
    }
}

/// The name a MySQL journal keeps for its node.
async fn journal_node_name(database: &crate::helpers::TestDatabase) -> String {
    sqlx::query_scalar("SELECT CAST(name AS CHAR) FROM node_name WHERE id = 1")
        .fetch_one(&database.pool().await)
        .await
        .expect("the node_name row")
}

/// Found by attack: a data dir used once with MySQL as the journal took that database's name into
/// its `node-id`, so its own node, started on it again with the embedded journal, shared one name
/// with the database's node (which then voided its live payment as an orphan). The data dir keeps
/// its own name; the database's is the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_used_once_with_mysql_keeps_its_own_name() {
    let database = crate::helpers::TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let own_dir = dir.path().join("own");
    let read_name = || {
        std::fs::read_to_string(own_dir.join(turnstile::data_dir::NODE_NAME_FILE)).expect("node-id")
    };
    {
        let app = start(&own_dir, &[]);
        assert_eq!(app.client().put_product("N", 100, 1).await.status, 200);
    }
    let own = read_name();
    {
        let app = start(&own_dir, &["--mysql-url", &database.url]);
        assert_eq!(app.client().put_product("N", 100, 1).await.status, 200);
    }
    let theirs = journal_node_name(&database).await;
    assert_ne!(
        own.trim_end(),
        theirs,
        "the database took the data dir's name"
    );
    assert_eq!(read_name(), own, "the data dir took the database's name");
    let again = start(&own_dir, &[]);
    assert_eq!(again.client().stock("N").await.0, 1, "its own journal");
    assert_eq!(read_name(), own);
}
