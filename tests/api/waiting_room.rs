//! The waiting room (API.md, "Waiting room"): 2,000 tickets taken in a burst at `admission_rate`
//! 100/s are admitted in ticket order and never faster than the rate, checked from what the
//! tickets say over time (a check slowness cannot fail); a checkout without a ticket is `429`, a
//! forged, early, other product's or reused one `403`; a ticket is bound to the key that used it
//! (its retry is a replay, even without the ticket); a declined checkout leaves it unused; at the
//! sell-out every ticket says `sold_out`. Several nodes: `cluster.rs`.

use crate::helpers::{eventually, spawn_app, Client, JsonBody, TestApp};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TICKETS: usize = 2_000;
const RATE: u64 = 100;

pub(crate) async fn put_queued(client: &mut Client, sku: &str, stock: i64, rate: u64) {
    let body = json!({"name": "drop", "price_cents": 1_000, "currency": "EUR", "stock": stock,
                      "admission_rate": rate});
    let answer = client
        .send(
            "PUT",
            &format!("/v1/products/{sku}"),
            &[],
            &body.to_string(),
        )
        .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["admission_rate"], rate);
}

/// A ticket for `sku`: its text and position.
pub(crate) async fn take(client: &mut Client, sku: &str) -> (String, u64) {
    let answer = client
        .send("POST", &format!("/v1/products/{sku}/queue"), &[], "")
        .await;
    assert_eq!(
        answer.status,
        201,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer.json();
    assert!(
        body["estimated_wait_s"].as_i64().is_some_and(|s| s >= 0),
        "{body}"
    );
    (
        body["ticket"].as_str().expect("ticket").to_owned(),
        body["position"].as_u64().expect("position"),
    )
}

pub(crate) async fn status(client: &mut Client, ticket: &str) -> Value {
    let answer = client.get(&format!("/v1/queue/{ticket}")).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()
}

/// One unit of `sku` under `key`, with `ticket` if given: status, body, replayed.
pub(crate) async fn buy(
    client: &mut Client,
    sku: &str,
    key: &str,
    ticket: Option<&str>,
    token: &str,
) -> (u16, Value, bool) {
    let body =
        json!({"items": [{"sku": sku, "quantity": 1}], "customer_id": key, "payment_token": token});
    let mut headers = vec![("idempotency-key", key)];
    if let Some(ticket) = ticket {
        headers.push(("admission-ticket", ticket));
    }
    let answer = client
        .send("POST", "/v1/checkout", &headers, &body.to_string())
        .await;
    let status = answer.status;
    if status == 429 {
        assert!(answer.retry_after.is_some(), "429 without Retry-After");
    }
    (status, answer.json(), answer.replayed)
}

async fn admitted(client: &mut Client, ticket: &str) {
    eventually(
        "the ticket to be admitted",
        Duration::from_secs(10),
        async || status(client, ticket).await["admitted"] == true,
    )
    .await;
}

/// The burst: `TICKETS` tickets from 20 clients at once, by position.
async fn burst(app: &TestApp, sku: &str) -> Vec<String> {
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut client = app.client();
            let sku = sku.to_owned();
            tokio::spawn(async move {
                let mut taken = Vec::new();
                for _ in 0..TICKETS / 20 {
                    taken.push(take(&mut client, &sku).await);
                }
                taken
            })
        })
        .collect();
    let mut by_position = HashMap::new();
    for task in tasks {
        for (ticket, position) in task.await.expect("taker") {
            assert!(
                by_position.insert(position, ticket).is_none(),
                "position {position} twice"
            );
        }
    }
    (1..=TICKETS as u64)
        .map(|p| {
            by_position
                .remove(&p)
                .unwrap_or_else(|| panic!("no ticket at {p}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_tickets_are_admitted_in_order_at_the_rate_used_once_and_learn_of_the_sell_out(
) {
    let app = spawn_app(&[]);
    let mut client = app.client();
    put_queued(&mut client, "DROP", 5, RATE).await;
    put_queued(&mut client, "OTHER", 5, RATE).await;
    let started = Instant::now();
    let tickets = burst(&app, "DROP").await;
    let (other, _) = take(&mut client, "OTHER").await;

    // Refusals, none kept under the key, nothing held.
    let (code, body, _) = buy(&mut client, "DROP", "k-none", None, "tok_ok").await;
    assert_eq!(
        (code, body["error"].as_str()),
        (429, Some("queue_required")),
        "{body}"
    );
    let mut forged = tickets[0].clone().into_bytes();
    forged[10] = if forged[10] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let last = &tickets[TICKETS - 1];
    for (ticket, why) in [
        (forged.as_str(), "forged"),
        (other.as_str(), "another product's"),
        (last.as_str(), "not admitted yet"),
        ("", "empty"),
    ] {
        let (code, body, _) = buy(&mut client, "DROP", "k-bad", Some(ticket), "tok_ok").await;
        assert_eq!(
            (code, body["error"].as_str()),
            (403, Some("invalid_ticket")),
            "{why}: {body}"
        );
    }
    assert_eq!(status(&mut client, last).await["admitted"], false);
    assert_eq!(client.get(&format!("/v1/queue/{forged}")).await.status, 404);
    assert_eq!(
        client.stock("DROP").await,
        (5, 5, 0, 0),
        "nothing held by refusals"
    );

    // Used once, bound to its key; a declined checkout leaves it unused.
    let (code, placed, _) = buy(&mut client, "DROP", "k1", Some(&tickets[0]), "tok_ok").await;
    assert_eq!(code, 201, "{placed}");
    let (code, body, _) = buy(&mut client, "DROP", "k1-again", Some(&tickets[0]), "tok_ok").await;
    assert_eq!(
        (code, body["error"].as_str()),
        (403, Some("invalid_ticket")),
        "reused: {body}"
    );
    for ticket in [Some(tickets[0].as_str()), None] {
        let (code, again, replayed) = buy(&mut client, "DROP", "k1", ticket, "tok_ok").await;
        assert_eq!(
            (code, replayed),
            (201, true),
            "the key's retry is a replay: {again}"
        );
        assert_eq!(again, placed);
    }
    admitted(&mut client, &tickets[1]).await;
    let (code, body, _) = buy(&mut client, "DROP", "k2", Some(&tickets[1]), "tok_decline").await;
    assert_eq!(code, 402, "{body}");
    let (code, body, _) = buy(&mut client, "DROP", "k2-ok", Some(&tickets[1]), "tok_ok").await;
    assert_eq!(
        code, 201,
        "a declined checkout left the ticket unused: {body}"
    );

    // The sell-out: every ticket says so.
    for (n, ticket) in tickets.iter().enumerate().skip(2).take(3) {
        admitted(&mut client, ticket).await;
        let (code, body, _) = buy(
            &mut client,
            "DROP",
            &format!("sell-{n}"),
            Some(ticket),
            "tok_ok",
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }
    assert_eq!(client.stock("DROP").await, (5, 0, 0, 5));
    for ticket in &tickets {
        assert_eq!(status(&mut client, ticket).await["sold_out"], true);
    }

    // Admissions, watched around the first ticket not yet seen admitted: each round asks the
    // next ten from the highest down, so a ticket admitted before one ahead of it would show.
    // Per position: when it was last seen waiting (before the asking) and first seen admitted
    // (after the answer). A ticket seen admitted at t was admitted by t, and `RATE` positions
    // further on one seen waiting at t' was still waiting at t': so (1) position p admitted at t
    // needs p - 1 <= RATE * (t - started), and (2) p seen waiting at t' and p + RATE admitted at t
    // needs t - t' >= 1 s. Slowness here only widens both margins.
    let mut waiting_at: HashMap<usize, Instant> = HashMap::new();
    let mut admitted_at: HashMap<usize, Instant> = HashMap::new();
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while next < TICKETS {
        assert!(
            Instant::now() < deadline,
            "admissions stalled at position {}",
            next + 1
        );
        let mut seen_admitted = false;
        for at in (next..(next + 10).min(TICKETS)).rev() {
            let asked = Instant::now();
            let view = status(&mut client, &tickets[at]).await;
            let answered = Instant::now();
            let position = at + 1;
            assert_eq!(view["position"], position as u64);
            if view["admitted"] == true {
                seen_admitted = true;
                admitted_at.entry(at).or_insert(answered);
                assert_eq!(view["ahead"], 0);
                let allowed = 1.0 + RATE as f64 * answered.duration_since(started).as_secs_f64();
                assert!(
                    position as f64 <= allowed + 1.0,
                    "position {position} admitted {:?} after the burst began: faster than {RATE}/s",
                    answered.duration_since(started)
                );
            } else {
                assert!(
                    !seen_admitted,
                    "position {position} waits while a later one was seen admitted"
                );
                waiting_at.insert(at, asked);
            }
        }
        while admitted_at.contains_key(&next) {
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut windows = 0;
    for (at, waiting) in &waiting_at {
        if let Some(admitted) = admitted_at.get(&(at + RATE as usize)) {
            windows += 1;
            assert!(
                admitted.duration_since(*waiting) >= Duration::from_millis(999),
                "positions {} to {} admitted within {:?}: more than {RATE} in a second",
                at + 1,
                at + 1 + RATE as usize,
                admitted.duration_since(*waiting)
            );
        }
    }
    assert!(
        windows >= 100,
        "only {windows} one-second windows were observed"
    );
    println!(
        "{TICKETS} tickets at {RATE}/s: admitted in order within {:?}, {windows} windows checked",
        started.elapsed()
    );
}

/// Found by attack: a ticket's use outlives its key's kept answer. With `--idempotency-retention`
/// shorter than a ticket's life, the same key sent again once its answer is no longer kept was a
/// second use of the ticket (a second order); it is `403` now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_ticket_stays_used_after_its_keys_answer_expires() {
    let app = spawn_app(&[
        "--idempotency-retention",
        "3s",
        "--gateway-timeout",
        "1s",
        "--journal-timeout",
        "1s",
    ]);
    let mut client = app.client();
    put_queued(&mut client, "RET", 5, 1_000).await;
    let (ticket, _) = take(&mut client, "RET").await;
    admitted(&mut client, &ticket).await;
    let (code, body, _) = buy(&mut client, "RET", "ret-1", Some(&ticket), "tok_ok").await;
    assert_eq!(code, 201, "{body}");
    eventually(
        "the key's answer to be kept no more",
        Duration::from_secs(15),
        async || {
            let (code, body, replayed) =
                buy(&mut client, "RET", "ret-1", Some(&ticket), "tok_ok").await;
            assert!(
                replayed || (code, body["error"].as_str()) == (403, Some("invalid_ticket")),
                "the ticket bought twice: {code} {body}"
            );
            !replayed
        },
    )
    .await;
    assert_eq!(client.stock("RET").await.3, 1, "one order");
}

/// With Redis, a try that takes over an earlier try's claim under its key never gives it back:
/// that try may have placed the key's order on a node that died before marking the ticket used
/// (here its claim is planted in Redis). The taking try's declined payment leaves the ticket the
/// key's, so another key cannot buy with it (found by attack: the give-back freed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_claim_taken_over_from_an_earlier_try_is_never_given_back() {
    let redis = crate::helpers::TestRedis::create("ticket-retaken").await;
    let app = spawn_app(&redis.args().iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = app.client();
    put_queued(&mut client, "HELD", 10, 1_000).await;
    let (ticket, position) = take(&mut client, "HELD").await;
    admitted(&mut client, &ticket).await;
    let mut connection = redis.connection().await;
    let queue = format!("{}queue:HELD", redis.prefix);
    let epoch: String = redis::cmd("HGET")
        .arg(&queue)
        .arg("epoch")
        .query_async(&mut connection)
        .await
        .expect("the queue's epoch");
    let claim = format!("{queue}/{epoch}/{position}");
    let () = redis::cmd("SET")
        .arg(&claim)
        .arg("c k1 an-earlier-try")
        .arg("PX")
        .arg(600_000)
        .query_async(&mut connection)
        .await
        .expect("plant the earlier try's claim");

    let (code, body, _) = buy(&mut client, "HELD", "k1", Some(&ticket), "tok_decline").await;
    assert_eq!(code, 402, "{body}");
    let (code, body, _) = buy(&mut client, "HELD", "k2", Some(&ticket), "tok_ok").await;
    assert_eq!(
        (code, body["error"].as_str()),
        (403, Some("invalid_ticket")),
        "another key bought with a ticket its key may have used: {body}"
    );
    let held: Option<String> = redis::cmd("GET")
        .arg(&claim)
        .query_async(&mut connection)
        .await
        .expect("the claim");
    let held = held.expect("the key's claim is kept");
    assert!(
        held.starts_with("c k1 ") && held != "c k1 an-earlier-try",
        "{held}"
    );
    assert_eq!(client.stock("HELD").await.3, 0, "nothing sold");
}
