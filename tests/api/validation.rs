//! Bad input gets a clear JSON error (400 or 413) and changes nothing.

use crate::helpers::{spawn_app, JsonBody};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let app = spawn_app(&[]);
    let mut client = app.client();
    client.put_product("V", 1_000, 10).await;
    let product_before = client.get("/v1/products/V").await.body;
    let long_id = "x".repeat(129);
    let checkout = |items: &str| {
        format!(r#"{{"items": {items}, "customer_id": "c", "payment_token": "tok_ok"}}"#)
    };
    let many_items = format!(
        "[{}]",
        (0..101)
            .map(|i| format!(r#"{{"sku":"V{i}","quantity":1}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let key: &[(&str, &str)] = &[("idempotency-key", "bad-input")];
    let long_key = "k".repeat(256);
    /// What is wrong, the path, the headers, the body, the status expected.
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, String, u16);
    let cases: Vec<Case> = vec![
        ("malformed JSON", "/v1/checkout".into(), key.to_vec(), r#"{"items": ["#.into(), 400),
        ("not an object", "/v1/checkout".into(), key.to_vec(), "[]".into(), 400),
        ("quantity as a string", "/v1/checkout".into(), key.to_vec(), checkout(r#"[{"sku":"V","quantity":"1"}]"#), 400),
        ("zero quantity", "/v1/checkout".into(), key.to_vec(), checkout(r#"[{"sku":"V","quantity":0}]"#), 400),
        ("negative quantity", "/v1/checkout".into(), key.to_vec(), checkout(r#"[{"sku":"V","quantity":-1}]"#), 400),
        ("quantity over the maximum", "/v1/checkout".into(), key.to_vec(), checkout(r#"[{"sku":"V","quantity":1000001}]"#), 400),
        ("quantity beyond i64", "/v1/checkout".into(), key.to_vec(), checkout(r#"[{"sku":"V","quantity":1e30}]"#), 400),
        ("fractional quantity", "/v1/checkout".into(), key.to_vec(), checkout(r#"[{"sku":"V","quantity":1.5}]"#), 400),
        ("unknown field", "/v1/checkout".into(), key.to_vec(), r#"{"items":[{"sku":"V","quantity":1}],"customer_id":"c","payment_token":"tok_ok","coupon":"x"}"#.into(), 400),
        ("unknown line field", "/v1/checkout".into(), key.to_vec(), checkout(r#"[{"sku":"V","quantity":1,"gift":true}]"#), 400),
        ("over-long sku", "/v1/checkout".into(), key.to_vec(), checkout(&format!(r#"[{{"sku":"{long_id}","quantity":1}}]"#)), 400),
        ("over-long customer", "/v1/checkout".into(), key.to_vec(), format!(r#"{{"items":[{{"sku":"V","quantity":1}}],"customer_id":"{long_id}","payment_token":"tok_ok"}}"#), 400),
        ("empty sku", "/v1/checkout".into(), key.to_vec(), checkout(r#"[{"sku":"","quantity":1}]"#), 400),
        ("empty items", "/v1/checkout".into(), key.to_vec(), checkout("[]"), 400),
        ("101 items", "/v1/checkout".into(), key.to_vec(), checkout(&many_items), 400),
        ("cart and items", "/v1/checkout".into(), key.to_vec(), r#"{"cart_id":"c1","items":[{"sku":"V","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}"#.into(), 400),
        ("missing key", "/v1/checkout".into(), vec![], checkout(r#"[{"sku":"V","quantity":1}]"#), 400),
        ("over-long key", "/v1/checkout".into(), vec![("idempotency-key", long_key.as_str())], checkout(r#"[{"sku":"V","quantity":1}]"#), 400),
        ("body over 64 KiB", "/v1/checkout".into(), key.to_vec(), format!(r#"{{"pad":"{}"}}"#, "x".repeat(70_000)), 413),
        ("negative price", "/v1/products/V".into(), vec![], r#"{"name":"n","price_cents":-1,"currency":"EUR","stock":1}"#.into(), 400),
        ("lower-case currency", "/v1/products/V".into(), vec![], r#"{"name":"n","price_cents":1,"currency":"eur","stock":1}"#.into(), 400),
        ("negative stock", "/v1/products/V".into(), vec![], r#"{"name":"n","price_cents":1,"currency":"EUR","stock":-5}"#.into(), 400),
        ("missing field", "/v1/products/V".into(), vec![], r#"{"name":"n","price_cents":1,"currency":"EUR"}"#.into(), 400),
        ("empty name", "/v1/products/V".into(), vec![], r#"{"name":"","price_cents":1,"currency":"EUR","stock":1}"#.into(), 400),
        ("over-long sku in the path", format!("/v1/products/{long_id}"), vec![], r#"{"name":"n","price_cents":1,"currency":"EUR","stock":1}"#.into(), 400),
        ("product body over 64 KiB", "/v1/products/V".into(), vec![], format!(r#"{{"name":"{}","price_cents":1,"currency":"EUR","stock":1}}"#, "n".repeat(70_000)), 413),
    ];
    for (what, path, headers, body, status) in &cases {
        let method = if path.starts_with("/v1/products") {
            "PUT"
        } else {
            "POST"
        };
        // A fresh connection each: the server closes one whose oversized body it did not read.
        let answer = app.client().send(method, path, headers, body).await;
        assert_eq!(
            answer.status,
            *status,
            "{what}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let json = answer.json();
        assert!(
            json["error"].is_string() && json["message"].is_string(),
            "{what}: {json}"
        );
    }
    let query = client.get("/v1/events?limit=-1").await;
    assert_eq!(query.status, 400);
    let cart = client.send("POST", "/v1/carts", &[], "").await.json();
    let cart_id = cart["cart_id"].as_str().expect("cart_id");
    let negative = client
        .send(
            "PUT",
            &format!("/v1/carts/{cart_id}/items/V"),
            &[],
            r#"{"quantity":-1}"#,
        )
        .await;
    assert_eq!(negative.status, 400);

    // Nothing changed: the product, the orders (none), the event log (empty).
    assert_eq!(client.get("/v1/products/V").await.body, product_before);
    assert!(client.all_events().await.is_empty());
    // The key of a refused request was not kept: it still works.
    let ok = client
        .checkout("bad-input", "V", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(ok.status, 201);
}
