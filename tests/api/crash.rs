//! Kill -9 in the middle of a load, restart on the same data directory: every 201/202 answered
//! before the kill is there; replays return the first answers; every key sent but never answered,
//! retried, yields at most one order in all; and once the hold expiry passes no stock is held by an
//! order that no answer named.

use crate::helpers::{eventually, start, Answer, JsonBody};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SKUS: usize = 5;
const ARGS: &[&str] = &["--hold-ttl", "1s", "--sim-pending-delay", "50ms"];

fn body(sku: &str, token: &str) -> String {
    serde_json::json!({
        "items": [{"sku": sku, "quantity": 1}],
        "customer_id": "crash-test",
        "payment_token": token,
    })
    .to_string()
}

fn order_id(answer: &Answer) -> Option<String> {
    answer.json()["order_id"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_loses_no_acknowledged_order() {
    kill_9_mid_load(&[]).await;
}

/// Runs the load, kills the server, restarts it and checks what the module doc says; `extra`
/// selects the journal. Returns the ids of the orders the answers named.
pub async fn kill_9_mid_load(extra: &[&str]) -> HashSet<String> {
    let args: Vec<&str> = ARGS.iter().chain(extra).copied().collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut app = start(&data_dir, &args);
    let mut admin = app.client();
    for s in 0..SKUS {
        assert_eq!(
            admin
                .put_product(&format!("S{s}"), 500, 100_000)
                .await
                .status,
            200
        );
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as usize);
    let kill_after = 200 + seed % 1_500;
    eprintln!("kill_9_mid_load: killing after {kill_after} answers (seed {seed})");

    let answered_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..48)
        .map(|t| {
            let (answered_count, stop, mut client) =
                (Arc::clone(&answered_count), Arc::clone(&stop), app.client());
            tokio::spawn(async move {
                let mut answered: Vec<(String, String, Answer)> = Vec::new();
                let mut unanswered: Vec<(String, String)> = Vec::new();
                for n in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("crash-{t}-{n}");
                    let token = if n % 5 == 0 { "tok_pending" } else { "tok_ok" };
                    let request = body(&format!("S{}", (t + n) % SKUS), token);
                    match client
                        .try_send(
                            "POST",
                            "/v1/checkout",
                            &[("idempotency-key", &key)],
                            &request,
                        )
                        .await
                    {
                        Ok(answer) => {
                            answered.push((key, request, answer));
                            answered_count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            unanswered.push((key, request));
                            break;
                        }
                    }
                }
                (answered, unanswered)
            })
        })
        .collect();
    eventually(
        "enough answers before the kill",
        Duration::from_secs(60),
        async || answered_count.load(Ordering::Relaxed) >= kill_after,
    )
    .await;
    app.kill_9();
    stop.store(true, Ordering::Relaxed);
    let mut answered = Vec::new();
    let mut unanswered = Vec::new();
    for task in tasks {
        let (a, u) = task.await.expect("client task");
        answered.extend(a);
        unanswered.extend(u);
    }
    drop(app);
    eprintln!(
        "{} answered before the kill, {} in flight",
        answered.len(),
        unanswered.len()
    );

    let app = start(&data_dir, &args);
    let mut client = app.client();
    let mut order_of_key: HashMap<String, String> = HashMap::new();
    for (key, request, first) in &answered {
        assert!(
            matches!(first.status, 201 | 202),
            "{key}: {} {:?}",
            first.status,
            first.body
        );
        let id = order_id(first).expect("order_id");
        let order = client.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(
            order.status, 200,
            "acknowledged order {id} of {key} was lost"
        );
        let status = order.json()["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if first.status == 201 {
            assert_eq!(status, "paid", "{id}");
        } else {
            assert!(
                ["payment_pending", "paid", "released"].contains(&status.as_str()),
                "{id}: {status}"
            );
        }
        let replay = client
            .send("POST", "/v1/checkout", &[("idempotency-key", key)], request)
            .await;
        assert!(replay.replayed, "{key}: not replayed after the restart");
        assert_eq!(
            (replay.status, &replay.body),
            (first.status, &first.body),
            "{key}"
        );
        order_of_key.insert(key.clone(), id);
    }
    for (key, request) in &unanswered {
        let retry = client
            .send("POST", "/v1/checkout", &[("idempotency-key", key)], request)
            .await;
        assert!(
            matches!(retry.status, 201 | 202),
            "{key}: retry answered {}",
            retry.status
        );
        order_of_key.insert(key.clone(), order_id(&retry).expect("order_id"));
    }
    // Every order in the log was named by exactly one key's answer: no key made two orders, and
    // no order exists that no answer named.
    let events = client.all_events().await;
    let logged: HashSet<String> = events
        .iter()
        .filter(|e| e["type"] == "order.reserved")
        .map(|e| e["order_id"].as_str().expect("order_id").to_owned())
        .collect();
    let named: HashSet<String> = order_of_key.values().cloned().collect();
    assert_eq!(named.len(), order_of_key.len(), "two keys named one order");
    assert_eq!(
        logged, named,
        "orders in the log that no answer named, or answers naming no logged order"
    );

    // Pending orders from before the kill lost their webhook with the process: the hold expiry
    // releases them, and then nothing is held any more.
    for s in 0..SKUS {
        let sku = format!("S{s}");
        eventually(
            &format!("holds on {sku} to expire"),
            Duration::from_secs(30),
            async || client.stock(&sku).await.2 == 0,
        )
        .await;
    }
    let mut sold_by_sku: HashMap<String, i64> = HashMap::new();
    for id in &named {
        let order = client.get(&format!("/v1/orders/{id}")).await.json();
        if order["status"] == "paid" {
            let sku = order["items"][0]["sku"].as_str().expect("sku").to_owned();
            *sold_by_sku.entry(sku).or_default() += 1;
        }
    }
    for s in 0..SKUS {
        let sku = format!("S{s}");
        let (_, _, reserved, sold) = client.stock(&sku).await;
        assert_eq!(reserved, 0);
        assert_eq!(
            sold,
            sold_by_sku.get(&sku).copied().unwrap_or(0),
            "{sku}: sold differs from the paid orders"
        );
    }
    named
}
