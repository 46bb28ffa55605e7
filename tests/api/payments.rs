//! Payments over HTTP: `tok_pending` answers 202 and is paid once the webhook arrives; webhooks
//! with a bad or stale signature are refused and change nothing; deliveries are idempotent; a
//! gateway timeout answers 504 and releases the stock; cancels release or refund; carts check out.

use crate::helpers::{eventually, signed, spawn_app, JsonBody};
use std::time::Duration;

async fn order_status(client: &mut crate::helpers::Client, order_id: &str) -> String {
    client.get(&format!("/v1/orders/{order_id}")).await.json()["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_payment_is_paid_by_the_simulators_webhook() {
    let app = spawn_app(&["--sim-pending-delay", "100ms"]);
    let mut client = app.client();
    client.put_product("P", 700, 5).await;
    let answer = client
        .checkout("pending-1", "P", 2, "tok_pending")
        .await
        .expect("answer");
    assert_eq!(answer.status, 202);
    let body = answer.json();
    assert_eq!(body["status"], "payment_pending");
    let order_id = body["order_id"].as_str().expect("order_id").to_owned();
    eventually(
        "the webhook to pay the order",
        Duration::from_secs(20),
        async || order_status(&mut client, &order_id).await == "paid",
    )
    .await;
    assert_eq!(client.stock("P").await, (5, 3, 0, 2));
    // The replay is still the first answer (202), not the order's new state.
    let replay = client
        .checkout("pending-1", "P", 2, "tok_pending")
        .await
        .expect("answer");
    assert!(replay.replayed);
    assert_eq!(replay.body, answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_need_a_valid_signature_and_count_once() {
    // The simulator's own webhook would come only after an hour: the test sends its own.
    let app = spawn_app(&["--sim-pending-delay", "1h"]);
    let mut client = app.client();
    client.put_product("W", 700, 5).await;
    let body = client
        .checkout("pending-2", "W", 1, "tok_pending")
        .await
        .expect("answer")
        .json();
    let order_id = body["order_id"].as_str().expect("order_id").to_owned();
    // The simulator derives the payment id from the gateway key the checkout sent.
    let payment_id = crate::helpers::simulator_payment_id(&app, "pending-2");
    let webhook =
        serde_json::json!({"payment_id": payment_id, "order_id": order_id, "status": "approved"})
            .to_string();
    let events_before = client.all_events().await.len();

    let forged = turnstile::payment::webhook::sign(b"wrong-secret", 1, webhook.as_bytes());
    let stale = turnstile::payment::webhook::sign(
        crate::helpers::WEBHOOK_SECRET.as_bytes(),
        1_000,
        webhook.as_bytes(),
    );
    for (what, header) in [
        ("forged", Some(forged)),
        ("stale", Some(stale)),
        ("missing", None),
    ] {
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|h| ("turnstile-signature", h.as_str()))
            .collect();
        let answer = client
            .send("POST", "/v1/webhooks/payment", &headers, &webhook)
            .await;
        assert_eq!(answer.status, 401, "{what}");
        assert_eq!(answer.json()["error"], "invalid_signature");
    }
    // A valid signature over another body is refused too.
    let tampered = webhook.replace("approved", "declined");
    let answer = client
        .send(
            "POST",
            "/v1/webhooks/payment",
            &[("turnstile-signature", &signed(&webhook))],
            &tampered,
        )
        .await;
    assert_eq!(answer.status, 401);
    assert_eq!(
        order_status(&mut client, &order_id).await,
        "payment_pending"
    );
    assert_eq!(client.all_events().await.len(), events_before);

    for _ in 0..2 {
        let answer = client
            .send(
                "POST",
                "/v1/webhooks/payment",
                &[("turnstile-signature", &signed(&webhook))],
                &webhook,
            )
            .await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json()["received"], true);
    }
    assert_eq!(order_status(&mut client, &order_id).await, "paid");
    let events = client.all_events().await;
    assert_eq!(
        events.len(),
        events_before + 1,
        "a second delivery changed nothing"
    );
    assert_eq!(client.stock("W").await, (5, 4, 0, 1));

    let unknown =
        serde_json::json!({"payment_id": "pay_x", "order_id": "ord_unknown", "status": "approved"})
            .to_string();
    let answer = client
        .send(
            "POST",
            "/v1/webhooks/payment",
            &[("turnstile-signature", &signed(&unknown))],
            &unknown,
        )
        .await;
    assert_eq!(answer.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_cancels_and_carts() {
    let app = spawn_app(&["--gateway-timeout", "200ms", "--sim-pending-delay", "1h"]);
    let mut client = app.client();
    client.put_product("T", 1_000, 10).await;

    let timeout = client
        .checkout("t-1", "T", 1, "tok_timeout")
        .await
        .expect("answer");
    assert_eq!(timeout.status, 504);
    let body = timeout.json();
    assert_eq!(body["error"], "payment_gateway_timeout");
    let order_id = body["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(order_status(&mut client, &order_id).await, "released");
    assert_eq!(client.stock("T").await, (10, 10, 0, 0));

    // Cancel a paid order: refunded, its unit back; cancelling twice is harmless.
    let paid = client
        .checkout("t-2", "T", 2, "tok_ok")
        .await
        .expect("answer")
        .json();
    let paid_id = paid["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(client.stock("T").await, (10, 8, 0, 2));
    for _ in 0..2 {
        let cancelled = client
            .send("POST", &format!("/v1/orders/{paid_id}/cancel"), &[], "")
            .await;
        assert_eq!(cancelled.status, 200);
        assert_eq!(cancelled.json()["status"], "refunded");
    }
    assert_eq!(client.stock("T").await, (10, 10, 0, 0));

    // Cancel a pending order: released.
    let pending = client
        .checkout("t-3", "T", 3, "tok_pending")
        .await
        .expect("answer")
        .json();
    let pending_id = pending["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(client.stock("T").await, (10, 7, 3, 0));
    let cancelled = client
        .send("POST", &format!("/v1/orders/{pending_id}/cancel"), &[], "")
        .await;
    assert_eq!(cancelled.json()["status"], "released");
    assert_eq!(client.stock("T").await, (10, 10, 0, 0));
    assert_eq!(
        client
            .send("POST", "/v1/orders/ord_none/cancel", &[], "")
            .await
            .status,
        404
    );

    // Stock cannot drop below what is held or sold.
    client
        .checkout("t-4", "T", 4, "tok_ok")
        .await
        .expect("answer");
    let lowered = client
        .send(
            "PUT",
            "/v1/products/T",
            &[],
            r#"{"name":"n","price_cents":1,"currency":"EUR","stock":3}"#,
        )
        .await;
    assert_eq!(lowered.status, 409);
    assert_eq!(lowered.json()["error"], "stock_below_committed");
    assert_eq!(client.stock("T").await, (10, 6, 0, 4));

    // A cart checks out by id and is emptied.
    let cart = client.send("POST", "/v1/carts", &[], "").await;
    assert_eq!(cart.status, 201);
    let cart_id = cart.json()["cart_id"].as_str().expect("cart_id").to_owned();
    let item = client
        .send(
            "PUT",
            &format!("/v1/carts/{cart_id}/items/T"),
            &[],
            r#"{"quantity":2}"#,
        )
        .await;
    assert_eq!(item.status, 200);
    assert_eq!(item.json()["items"][0]["quantity"], 2);
    let unknown_sku = client
        .send(
            "PUT",
            &format!("/v1/carts/{cart_id}/items/NOPE"),
            &[],
            r#"{"quantity":1}"#,
        )
        .await;
    assert_eq!(unknown_sku.status, 404);
    let body =
        serde_json::json!({"cart_id": cart_id, "customer_id": "c", "payment_token": "tok_ok"})
            .to_string();
    let order = client
        .send(
            "POST",
            "/v1/checkout",
            &[("idempotency-key", "cart-1")],
            &body,
        )
        .await;
    assert_eq!(order.status, 201);
    assert_eq!(order.json()["items"][0]["quantity"], 2);
    let emptied = client.get(&format!("/v1/carts/{cart_id}")).await.json();
    assert_eq!(emptied["items"].as_array().map(Vec::len), Some(0));
    let missing = serde_json::json!({"cart_id": "cart_missing", "customer_id": "c", "payment_token": "tok_ok"}).to_string();
    let answer = client
        .send(
            "POST",
            "/v1/checkout",
            &[("idempotency-key", "cart-2")],
            &missing,
        )
        .await;
    assert_eq!(answer.status, 404);
    assert_eq!(client.get("/v1/carts/cart_missing").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_currencies_are_refused() {
    let app = spawn_app(&[]);
    let mut client = app.client();
    client.put_product("EU", 100, 5).await;
    client
        .send(
            "PUT",
            "/v1/products/US",
            &[],
            r#"{"name":"n","price_cents":100,"currency":"USD","stock":5}"#,
        )
        .await;
    let body = r#"{"items":[{"sku":"EU","quantity":1},{"sku":"US","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}"#;
    let answer = client
        .send(
            "POST",
            "/v1/checkout",
            &[("idempotency-key", "mixed")],
            body,
        )
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json()["error"], "mixed_currency");
    assert_eq!(client.stock("EU").await, (5, 5, 0, 0));
    assert_eq!(client.stock("US").await, (5, 5, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_an_approval_ends_as_one_of_the_two_serial_orders() {
    // Proves: over real HTTP, a cancel and the gateway's approval sent at once end either as
    // "paid, then refunded" or as "released" (the late approval refunded), never as a cancel
    // swallowed; every unit comes back; the events follow the state machine.
    let app = spawn_app(&["--sim-pending-delay", "1h"]);
    let mut client = app.client();
    let rounds = 30;
    client.put_product("RACE", 100, rounds).await;
    let mut endings = std::collections::HashMap::new();
    for round in 0..rounds {
        let key = format!("race-{round}");
        let body = client
            .checkout(&key, "RACE", 1, "tok_pending")
            .await
            .expect("answer")
            .json();
        let order_id = body["order_id"].as_str().expect("order_id").to_owned();
        let payment_id = crate::helpers::simulator_payment_id(&app, &key);
        let webhook = serde_json::json!({"payment_id": payment_id, "order_id": order_id, "status": "approved"})
            .to_string();
        let addr = app.addr;
        let cancel_path = format!("/v1/orders/{order_id}/cancel");
        let cancel = tokio::spawn(async move {
            crate::helpers::Client::new(addr)
                .send("POST", &cancel_path, &[], "")
                .await
        });
        let approve = tokio::spawn(async move {
            crate::helpers::Client::new(addr)
                .send(
                    "POST",
                    "/v1/webhooks/payment",
                    &[("turnstile-signature", &signed(&webhook))],
                    &webhook,
                )
                .await
        });
        let (cancelled, approved) = (
            cancel.await.expect("cancel"),
            approve.await.expect("approve"),
        );
        assert_eq!(cancelled.status, 200);
        assert_eq!(approved.status, 200);
        let status = order_status(&mut client, &order_id).await;
        let said = cancelled.json()["status"]
            .as_str()
            .expect("status")
            .to_owned();
        assert_eq!(said, status, "the cancel answered the final status");
        assert!(
            status == "refunded" || status == "released",
            "round {round}: {status}"
        );
        *endings.entry(status).or_insert(0) += 1;
    }
    eprintln!("endings: {endings:?}");
    assert_eq!(client.stock("RACE").await, (rounds, rounds, 0, 0));
    // Each order's events follow the state machine.
    let mut last: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for event in client.all_events().await {
        let order = event["order_id"].as_str().expect("order").to_owned();
        let status = event["data"]["status"].as_str().expect("status").to_owned();
        let legal = matches!(
            (last.get(&order).map(String::as_str), status.as_str()),
            (None, "reserved")
                | (Some("reserved"), "payment_pending")
                | (Some("payment_pending"), "paid" | "released")
                | (Some("paid"), "refunded")
        );
        assert!(legal, "{order}: {:?} -> {status}", last.get(&order));
        last.insert(order, status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_past_the_in_flight_limit_are_refused_and_change_nothing() {
    // Proves: with --checkouts-in-flight-max checkouts waiting on the gateway, the next checkout
    // answers 503 overloaded with Retry-After at once, holds nothing and keeps no answer under its
    // key; once the others end, the same key places its order.
    let app = spawn_app(&["--checkouts-in-flight-max", "2", "--gateway-timeout", "3s"]);
    let mut client = app.client();
    client.put_product("F", 100, 10).await;
    let addr = app.addr;
    let slow: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(async move {
                crate::helpers::Client::new(addr)
                    .checkout(&format!("slow-{i}"), "F", 1, "tok_timeout")
                    .await
                    .expect("answer")
            })
        })
        .collect();
    eventually(
        "both slow checkouts to hold their units",
        Duration::from_secs(10),
        async || client.stock("F").await.2 == 2,
    )
    .await;
    let refused = client
        .checkout("next", "F", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "overloaded");
    assert!(refused.retry_after.is_some());
    assert_eq!(client.stock("F").await, (10, 8, 2, 0), "nothing more held");
    for task in slow {
        assert_eq!(task.await.expect("task").status, 504);
    }
    let placed = client
        .checkout("next", "F", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(placed.status, 201, "the refused key was kept by nothing");
    assert_eq!(client.stock("F").await, (10, 9, 0, 1));
}
