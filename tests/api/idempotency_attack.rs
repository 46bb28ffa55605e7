//! Attacks on the kept answers of checkouts that placed nothing (`409 out_of_stock`, `404`): the
//! refusal body rendered once per SKU, replays byte for byte, one key raced over many connections,
//! and floods of distinct keys that must never share an answer.

use crate::helpers::{spawn_app, Answer, Client, JsonBody, TestApp};
use std::sync::Arc;
use tokio::sync::Barrier;

/// Percent-encodes everything but letters and digits, for a SKU in a path.
fn encoded(sku: &str) -> String {
    sku.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn put_product(client: &mut Client, sku: &str, stock: i64) {
    let body = serde_json::json!({
        "name": format!("product {sku}"),
        "price_cents": 100,
        "currency": "EUR",
        "stock": stock,
    })
    .to_string();
    let answer = client
        .send("PUT", &format!("/v1/products/{}", encoded(sku)), &[], &body)
        .await;
    assert_eq!(
        answer.status,
        200,
        "{sku}: {:?}",
        String::from_utf8_lossy(&answer.body)
    );
}

fn items_body(lines: &[(&str, i64)], customer: &str) -> String {
    let items: Vec<_> = lines
        .iter()
        .map(|(sku, quantity)| serde_json::json!({"sku": sku, "quantity": quantity}))
        .collect();
    serde_json::json!({"items": items, "customer_id": customer, "payment_token": "tok_ok"})
        .to_string()
}

async fn post(client: &mut Client, key: &str, body: &str) -> Answer {
    client
        .send("POST", "/v1/checkout", &[("idempotency-key", key)], body)
        .await
}

/// The body the full path renders for a refusal of `sku` (the one mapping of the engine's error).
fn full_path_refusal(sku: &str) -> Vec<u8> {
    let sku = turnstile::domain::Sku::parse(sku).expect("sku");
    turnstile::api::ApiError::from(turnstile::engine::EngineError::OutOfStock { sku })
        .body()
        .into_bytes()
}

/// A refusal, its replay, and a different body under its key.
async fn assert_refusal(client: &mut Client, key: &str, lines: &[(&str, i64)], short: &str) {
    let body = items_body(lines, "c-refused");
    let first = post(client, key, &body).await;
    assert_eq!(first.status, 409, "{key}");
    assert!(!first.replayed);
    assert_eq!(
        String::from_utf8_lossy(&first.body),
        String::from_utf8_lossy(&full_path_refusal(short)),
        "{key}: the refusal of {short:?} differs from the full path's"
    );
    let json = first.json();
    assert_eq!(json["error"], "out_of_stock");
    assert_eq!(json["sku"], short);
    let again = post(client, key, &body).await;
    assert!(again.replayed, "{key}: not replayed");
    assert_eq!((again.status, &again.body), (409, &first.body), "{key}");
    let other = post(client, key, &items_body(lines, "c-other")).await;
    assert_eq!(other.status, 422, "{key}");
    assert_eq!(other.json()["error"], "idempotency_key_reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_stock_is_the_full_paths_answer_for_every_sku() {
    let app = spawn_app(&[]);
    let mut client = app.client();
    let long = "L".repeat(128);
    let skus = [
        "PLAIN",
        "q\"uote",
        "back\\slash",
        "<html>&'amp",
        "\\u0041",
        "tab%09no",
        "a?b#c",
        long.as_str(),
    ];
    put_product(&mut client, "IN-STOCK", 1_000).await;
    for (round, sku) in skus.iter().enumerate() {
        // Created after refusals of other SKUs were rendered.
        put_product(&mut client, sku, 2).await;
        // Short without being flagged sold out: the full path.
        assert_refusal(&mut client, &format!("short-{round}"), &[(sku, 3)], sku).await;
        // Sell it out, then the flagged refusal, alone and behind an item in stock.
        let bought = post(
            &mut client,
            &format!("buy-{round}"),
            &items_body(&[(sku, 2)], "b"),
        )
        .await;
        assert_eq!(bought.status, 201, "{sku}");
        assert_refusal(&mut client, &format!("flag-{round}"), &[(sku, 1)], sku).await;
        assert_refusal(
            &mut client,
            &format!("second-line-{round}"),
            &[("IN-STOCK", 1), (sku, 1)],
            sku,
        )
        .await;
        // Restocked, sold out again: the same bytes.
        put_product(&mut client, sku, 3).await;
        let bought = post(
            &mut client,
            &format!("rebuy-{round}"),
            &items_body(&[(sku, 1)], "b"),
        )
        .await;
        assert_eq!(bought.status, 201, "{sku}");
        assert_refusal(&mut client, &format!("again-{round}"), &[(sku, 1)], sku).await;
    }
    // Nothing of IN-STOCK stayed held by the refused two-line checkouts.
    let (stock, available, reserved, _) = client.stock("IN-STOCK").await;
    assert_eq!((stock, available, reserved), (1_000, 1_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_201_replays_it_after_the_sku_sold_out() {
    let app = spawn_app(&[]);
    let mut client = app.client();
    put_product(&mut client, "LAST", 1).await;
    let body = items_body(&[("LAST", 1)], "winner");
    let first = post(&mut client, "won", &body).await;
    assert_eq!(first.status, 201);
    let refused = post(&mut client, "lost", &items_body(&[("LAST", 1)], "loser")).await;
    assert_eq!(refused.status, 409);
    for _ in 0..3 {
        let again = post(&mut client, "won", &body).await;
        assert!(again.replayed);
        assert_eq!((again.status, &again.body), (201, &first.body));
    }
    assert_eq!(client.stock("LAST").await, (1, 0, 0, 1));
}

/// `clients` connections send `body_of(i)` under one key at once; returns the answers.
async fn race(app: &TestApp, key: &str, bodies: Vec<String>) -> Vec<(usize, Answer)> {
    let barrier = Arc::new(Barrier::new(bodies.len()));
    let tasks: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let (barrier, mut client, key) = (Arc::clone(&barrier), app.client(), key.to_owned());
            tokio::spawn(async move {
                // A first request opens the connection before the race.
                client.get("/healthz").await;
                barrier.wait().await;
                (i, post(&mut client, &key, &body).await)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("client task"));
    }
    answers
}

/// Exactly one request of the race ran; the others were told the key is in use, or got its
/// answer replayed byte for byte, or (under another body) were refused with 422.
fn check_race(answers: &[(usize, Answer)], body_group: impl Fn(usize) -> usize) -> (usize, Answer) {
    let ran: Vec<_> = answers
        .iter()
        .filter(|(_, a)| !a.replayed && !is_key_error(a))
        .collect();
    assert_eq!(ran.len(), 1, "exactly one runs: {:?}", summary(answers));
    let (winner, first) = ran[0].clone();
    for (i, answer) in answers {
        if *i == winner {
            continue;
        }
        if answer.replayed {
            assert_eq!(
                body_group(*i),
                body_group(winner),
                "request {i} got another body's answer"
            );
            assert_eq!((answer.status, &answer.body), (first.status, &first.body));
        } else {
            let code = answer.json()["error"].as_str().unwrap_or("").to_owned();
            if body_group(*i) == body_group(winner) {
                assert_eq!(
                    (answer.status, code.as_str()),
                    (409, "idempotency_key_in_use")
                );
            } else {
                assert!(
                    matches!(
                        (answer.status, code.as_str()),
                        (409, "idempotency_key_in_use") | (422, "idempotency_key_reused")
                    ),
                    "request {i}: {} {code}",
                    answer.status
                );
            }
        }
    }
    (winner, first)
}

fn is_key_error(answer: &Answer) -> bool {
    matches!(answer.status, 409 | 422)
        && matches!(
            answer.json()["error"].as_str(),
            Some("idempotency_key_in_use" | "idempotency_key_reused")
        )
}

fn summary(answers: &[(usize, Answer)]) -> Vec<(usize, u16, bool, String)> {
    answers
        .iter()
        .map(|(i, a)| {
            (
                *i,
                a.status,
                a.replayed,
                String::from_utf8_lossy(&a.body).into_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_raced_over_many_connections_runs_once() {
    let app = spawn_app(&[]);
    let mut client = app.client();
    put_product(&mut client, "PLENTY", 100_000).await;
    put_product(&mut client, "NONE", 0).await;
    let clients = 24;
    for round in 0..10 {
        // Sold out (a kept refusal), in stock (an order), or unknown (a kept 404); half the
        // rounds with two bodies racing.
        let sku = ["NONE", "PLENTY", "MISSING"][round % 3];
        let two_bodies = round % 2 == 1;
        let group = move |i: usize| if two_bodies { i % 2 } else { 0 };
        let bodies = (0..clients)
            .map(|i| items_body(&[(sku, 1)], &format!("c{}", group(i))))
            .collect();
        let key = format!("race-{round}");
        let answers = race(&app, &key, bodies).await;
        let (winner, first) = check_race(&answers, group);
        let expected = match sku {
            "NONE" => 409,
            "PLENTY" => 201,
            _ => 404,
        };
        assert_eq!(first.status, expected, "{:?}", summary(&answers));
        // Settled: the winner's body replays, the other is refused, nothing is in flight.
        let again = post(
            &mut client,
            &key,
            &items_body(&[(sku, 1)], &format!("c{}", group(winner))),
        )
        .await;
        assert!(again.replayed);
        assert_eq!((again.status, &again.body), (first.status, &first.body));
        let other = post(&mut client, &key, &items_body(&[(sku, 1)], "c-else")).await;
        assert_eq!(other.status, 422);
    }
    // One unit sold per round on PLENTY.
    let (_, _, reserved, sold) = client.stock("PLENTY").await;
    assert_eq!((reserved, sold), (0, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_keys_never_shares_an_answer() {
    let app = spawn_app(&[]);
    let mut admin = app.client();
    put_product(&mut admin, "GONE", 0).await;
    let total = 3_000;
    let workers = 32;
    let run = |pass: usize| {
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let mut client = app.client();
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    for i in (w..total).step_by(workers) {
                        // Every request its own SKU name (a 404 names it) or its own customer.
                        let body = if i % 2 == 0 {
                            items_body(&[(&format!("nope-{i}"), 1)], &format!("c{i}"))
                        } else {
                            items_body(&[("GONE", 1)], &format!("c{i}"))
                        };
                        answers.push((i, post(&mut client, &format!("flood-{i}"), &body).await));
                    }
                    (pass, answers)
                })
            })
            .collect::<Vec<_>>();
        tasks
    };
    let mut first = vec![None; total];
    for task in run(0) {
        for (i, answer) in task.await.expect("task").1 {
            assert!(!answer.replayed, "{i}");
            let json = answer.json();
            if i % 2 == 0 {
                assert_eq!(answer.status, 404, "{i}: {json}");
                assert!(
                    json["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains(&format!("nope-{i}")),
                    "{i}: {json}"
                );
            } else {
                assert_eq!(
                    (answer.status, &json["sku"]),
                    (409, &serde_json::json!("GONE"))
                );
            }
            first[i] = Some(answer);
        }
    }
    for task in run(1) {
        for (i, answer) in task.await.expect("task").1 {
            let first = first[i].as_ref().expect("first answer");
            assert!(answer.replayed, "{i}: not replayed");
            assert_eq!(
                (answer.status, &answer.body),
                (first.status, &first.body),
                "{i}"
            );
        }
    }
}

/// The server's shard of a key in its key table (`sync::shard_of`: unseeded FxHash, 64 shards),
/// which any client can compute.
fn shard_of(key: &str) -> u64 {
    use std::hash::BuildHasher;
    let key = turnstile::domain::IdempotencyKey::parse(key).expect("key");
    rustc_hash::FxBuildHasher.hash_one(&key) % 64
}

/// Contract: a kept 409 replays for as long as the rejection age (10 min) while the map is under
/// its size (917,504 answers, counted in 64 parts of 14,336). A flood of 14,336 keys aimed at the
/// victim's shard of the key table (the one a client can compute) must not evict it: the
/// rejection map's part comes from the key's seeded digest, so the aimed keys spread over all
/// parts. Were it evicted, the retry after a restock would buy (409 then 201 under one key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_refusal_survives_a_flood_far_below_the_maps_limit() {
    let app = spawn_app(&[]);
    let mut client = app.client();
    put_product(&mut client, "DROP", 1).await;
    let sold = post(&mut client, "first-buyer", &items_body(&[("DROP", 1)], "b")).await;
    assert_eq!(sold.status, 201);
    let victim = "victim-key";
    let body = items_body(&[("DROP", 1)], "victim");
    let refused = post(&mut client, victim, &body).await;
    assert_eq!(refused.status, 409);

    let shard = shard_of(victim);
    let aimed: Vec<String> = (0..)
        .map(|i| format!("aimed-{i}"))
        .filter(|k| shard_of(k) == shard)
        .take(14_336)
        .collect();
    let aimed = Arc::new(aimed);
    let workers = 16;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (aimed, mut client) = (Arc::clone(&aimed), app.client());
            tokio::spawn(async move {
                for key in aimed.iter().skip(w).step_by(workers) {
                    let answer = post(&mut client, key, &items_body(&[("DROP", 1)], key)).await;
                    assert_eq!(answer.status, 409);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("flood task");
    }
    // Units come back (a restock); the victim retries with its key and its body.
    put_product(&mut client, "DROP", 2).await;
    let retry = post(&mut client, victim, &body).await;
    assert!(
        retry.replayed && (retry.status, &retry.body) == (409, &refused.body),
        "14,337 kept answers of 917,504 and the victim's is gone: the retry got {} {}",
        retry.status,
        String::from_utf8_lossy(&retry.body)
    );
}
