//! The operations desk (`--admin-token`, `/v1/admin/...`, `turnstile admin ...`) and the log an
//! operator reads (`--log-format json`, `--log-file`): a stuck hold listed and released through
//! the engine, a paid order refused, the desk absent without a token and closed to a wrong one,
//! and no secret in any log line.

use crate::helpers::{spawn_app, start_with_env, Client, JsonBody, TestApp, TestDatabase};
use serde_json::Value;
use std::process::Command;

const TOKEN: &str = "desk-test-admin-token";

/// `turnstile admin <args>` against `app`: exit code, standard output, standard error.
fn desk(app: &TestApp, args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .arg("admin")
        .args(args)
        .args(["--url", &format!("http://{}", app.addr), "--token", TOKEN])
        .output()
        .expect("run turnstile admin");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn admin(client: &mut Client, method: &str, path: &str, token: Option<&str>) -> u16 {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    client.send(method, path, &headers, "").await.status
}

async fn checkout(client: &mut Client, key: &str, token: &str) -> Value {
    let body = serde_json::json!({
        "items": [{"sku": "A", "quantity": 2}],
        "customer_id": "desk",
        "payment_token": token,
    })
    .to_string();
    client
        .send("POST", "/v1/checkout", &[("idempotency-key", key)], &body)
        .await
        .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_the_desk_does_not_exist_and_a_wrong_token_is_401() {
    const PATHS: [(&str, &str); 4] = [
        ("GET", "/v1/admin/holds"),
        ("GET", "/v1/admin/payments"),
        ("GET", "/v1/admin/journal"),
        ("POST", "/v1/admin/orders/ord_x/release"),
    ];
    // Odd methods and paths too: a 405 or a 404 of the router would say what exists.
    const ODD: [(&str, &str); 6] = [
        ("DELETE", "/v1/admin/holds"),
        ("POST", "/v1/admin/journal"),
        ("GET", "/v1/admin/orders/ord_x/release"),
        ("GET", "/v1/admin/holds/"),
        ("GET", "/v1/admin"),
        ("GET", "/v1/admin/nonexistent"),
    ];
    let closed = spawn_app(&[]);
    let mut client = closed.client();
    for (method, path) in PATHS.iter().chain(&ODD) {
        assert_eq!(
            admin(&mut client, method, path, Some(TOKEN)).await,
            404,
            "{method} {path}"
        );
    }
    let open = spawn_app(&["--admin-token", TOKEN]);
    let mut client = open.client();
    for (method, path) in PATHS.iter().chain(&ODD) {
        assert_eq!(
            admin(&mut client, method, path, None).await,
            401,
            "{method} {path}"
        );
        assert_eq!(
            admin(&mut client, method, path, Some("not-the-admin-token")).await,
            401,
            "{method} {path}"
        );
    }
    // The desk command refuses an answer that is not the desk's (here the server's /healthz,
    // the admin path cut off as a fragment), rather than saying nothing is stuck.
    let output = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["admin", "holds", "--token", TOKEN, "--url"])
        .arg(format!("http://{}/healthz#", open.addr))
        .output()
        .expect("run turnstile admin");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not an answer of the operations desk")
    );
    let (code, _, said) = desk(&closed, &["holds"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("404"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_hold_is_listed_and_released_through_the_engine_and_a_paid_order_is_not_held() {
    let app = spawn_app(&[
        "--admin-token",
        TOKEN,
        "--sim-pending-delay",
        "1h",
        "--gateway-timeout",
        "60s",
        "--reconcile-after",
        "5m",
    ]);
    let mut client = app.client();
    assert_eq!(client.put_product("A", 300, 10).await.status, 200);
    let pending = checkout(&mut client, "desk-pending", "tok_pending").await;
    let pending_id = pending["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(pending["status"], "payment_pending");
    let paid = checkout(&mut client, "desk-paid", "tok_ok").await;
    let paid_id = paid["order_id"].as_str().expect("order_id").to_owned();

    // Listed: through the API, and as a table and as JSON by the desk command.
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let holds = client
        .send("GET", "/v1/admin/holds", &auth, "")
        .await
        .json();
    let listed: Vec<&str> = holds["holds"]
        .as_array()
        .expect("holds")
        .iter()
        .filter_map(|h| h["order_id"].as_str())
        .collect();
    assert_eq!(listed, [pending_id.as_str()], "{holds}");
    assert_eq!(holds["holds"][0]["items"][0]["quantity"], 2, "{holds}");
    let older = client
        .send("GET", "/v1/admin/holds?older_than=1h", &auth, "")
        .await
        .json();
    assert_eq!(older["holds"].as_array().map(Vec::len), Some(0), "{older}");
    assert_eq!(
        client
            .send("GET", "/v1/admin/holds?older_than=soon", &auth, "")
            .await
            .status,
        400
    );
    let (code, table, said) = desk(&app, &["holds"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        table.contains(&pending_id) && table.contains("payment_pending"),
        "{table}"
    );
    let (code, json, said) = desk(&app, &["payments", "--json"]);
    assert_eq!(code, Some(0), "{said}");
    let payments: Value = serde_json::from_str(&json).expect("--json prints JSON");
    assert_eq!(
        payments["pending"][0]["order_id"],
        pending_id.as_str(),
        "{payments}"
    );
    assert_eq!(payments["pending"][0]["waiting_for"], "webhook");

    // Released through the engine: the stock back, journaled (an event), twice harmless.
    let (code, said, err) = desk(&app, &["release", &pending_id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(said.contains("released"), "{said}");
    let (_, available, reserved, sold) = client.stock("A").await;
    assert_eq!((available, reserved, sold), (8, 0, 2));
    let events = client.all_events().await;
    assert!(
        events
            .iter()
            .any(|e| e["order_id"] == pending_id.as_str() && e["type"] == "order.released"),
        "no order.released event"
    );
    let again = client
        .send(
            "POST",
            &format!("/v1/admin/orders/{pending_id}/release"),
            &auth,
            "",
        )
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "released");
    // A paid order holds nothing: refused (a refund is a cancel); an unknown one is 404.
    let refused = client
        .send(
            "POST",
            &format!("/v1/admin/orders/{paid_id}/release"),
            &auth,
            "",
        )
        .await;
    assert_eq!(refused.status, 409);
    assert_eq!(refused.json()["error"], "not_held");
    let (code, _, said) = desk(&app, &["release", "ord_unknown"]);
    assert_eq!(code, Some(1));
    assert!(said.contains("404"), "{said}");
    // The journal's state.
    let journal = client
        .send("GET", "/v1/admin/journal", &auth, "")
        .await
        .json();
    assert!(journal["last_event_seq"].as_u64() >= Some(4), "{journal}");
    assert_eq!(journal["checks"]["journal"], "ok", "{journal}");
    let position = &journal["journal"];
    assert_eq!(position["kind"], "embedded", "{journal}");
    assert!(position["last_lsn"].as_u64() >= Some(4), "{journal}");
    assert!(position["mysql"].is_null(), "{journal}");
    let segments = position["segments"].as_array().expect("segments");
    assert!(
        !segments.is_empty()
            && segments
                .iter()
                .all(|s| s["file"].as_str().is_some_and(|f| f.ends_with(".wal"))),
        "{journal}"
    );
    let (code, table, said) = desk(&app, &["journal"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        table.contains("embedded") && table.contains(".wal"),
        "{table}"
    );

    // A checkout still at the gateway (which never answers it here) holds units and is no order
    // yet: the desk lists it as pending, waiting on its checkout, and not among the holds.
    let mut buyer = app.client();
    let at_gateway =
        tokio::spawn(async move { checkout(&mut buyer, "desk-at-gateway", "tok_timeout").await });
    let mut running = Value::Null;
    crate::helpers::eventually(
        "the checkout at the gateway listed",
        std::time::Duration::from_secs(30),
        async || {
            running = client
                .send("GET", "/v1/admin/payments", &auth, "")
                .await
                .json();
            running["pending"]
                .as_array()
                .is_some_and(|p| p.iter().any(|e| e["waiting_for"] == "checkout"))
        },
    )
    .await;
    let holds = client
        .send("GET", "/v1/admin/holds", &auth, "")
        .await
        .json();
    assert_eq!(holds["holds"].as_array().map(Vec::len), Some(0), "{holds}");
    let (code, table, said) = desk(&app, &["payments"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(table.contains("its checkout"), "{running}\n{table}");
    at_gateway.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_log_names_each_order_not_paid_at_once_and_holds_no_secret() {
    // A MySQL user with a password of its own, so the password could show if it ever leaked.
    let database = TestDatabase::create().await;
    let password = "desk-mysql-password-9f3e";
    let user = format!("u{}", &database.name[database.name.len() - 10..]);
    let pool = database.pool().await;
    for statement in [
        format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"),
        format!("GRANT ALL ON {}.* TO '{user}'@'%'", database.name),
    ] {
        sqlx::query(&statement)
            .execute(&pool)
            .await
            .expect("a user of the test's own");
    }
    pool.close().await;
    let url = format!(
        "mysql://{user}:{password}@{}/{}",
        database.addr, database.name
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("turnstile.json");
    let log_arg = log.display().to_string();
    let app = start_with_env(
        &dir.path().join("data"),
        &[
            "--admin-token",
            TOKEN,
            "--mysql-url",
            &url,
            "--sim-pending-delay",
            "1h",
            "--log-format",
            "json",
            "--log-file",
            &log_arg,
        ],
        &[("RUST_LOG", "info")],
    );
    let mut client = app.client();
    assert_eq!(client.put_product("A", 300, 10).await.status, 200);
    let pending = checkout(&mut client, "log-pending", "tok_pending").await;
    let pending_id = pending["order_id"].as_str().expect("order_id").to_owned();
    let declined = checkout(&mut client, "log-declined", "tok_decline").await;
    let declined_id = declined["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(
        client
            .send(
                "POST",
                &format!("/v1/admin/orders/{pending_id}/release"),
                &[("authorization", &format!("Bearer {TOKEN}"))],
                "",
            )
            .await
            .status,
        200
    );
    // A wrong token and a bad URL say so without the secrets either.
    let _ = client
        .send(
            "GET",
            "/v1/admin/holds",
            &[("authorization", "Bearer nope")],
            "",
        )
        .await;
    let mut app = app;
    assert!(app.terminate().success());
    let text = std::fs::read_to_string(&log).expect("the log file");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let says = |order: &str, key: &str, status: &str| {
        lines.iter().any(|l| {
            l["fields"]["order_id"] == order
                && l["fields"]["idempotency_key"] == key
                && l["fields"]["status"] == status
        })
    };
    assert!(
        says(&pending_id, "log-pending", "payment_pending"),
        "{text}"
    );
    assert!(says(&declined_id, "log-declined", "released"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["order_id"] == pending_id.as_str()
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("admin:"))),
        "no line for the admin's release: {text}"
    );
    for secret in [password, TOKEN, crate::helpers::WEBHOOK_SECRET] {
        assert!(!text.contains(secret), "the log holds a secret: {text}");
        assert!(!app.log().contains(secret));
    }
    let pool = database.pool().await;
    sqlx::query(&format!("DROP USER '{user}'@'%'"))
        .execute(&pool)
        .await
        .expect("drop the test's user");
    pool.close().await;
}

#[test]
fn a_config_file_error_never_shows_the_value_of_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, secret) in [
        ("webhook-secret", "desk-secret-in-an-array"),
        ("mysql-url", "desk-password-in-an-object"),
        ("admin-token", "desk-token-in-an-array"),
    ] {
        let config = dir.path().join("config.json");
        let value = if key == "mysql-url" {
            serde_json::json!({ key: { "url": format!("mysql://u:{secret}@h/db") } })
        } else {
            serde_json::json!({ key: [secret] })
        };
        std::fs::write(&config, value.to_string()).expect("config");
        let chmod = Command::new("chmod")
            .arg("600")
            .arg(&config)
            .status()
            .expect("chmod");
        assert!(chmod.success());
        let (code, said) = crate::helpers::serve_refused(
            &dir.path().join("data"),
            &["--config", &config.display().to_string()],
        );
        assert_eq!(code, Some(2), "{said}");
        assert!(said.contains(key), "{said}");
        assert!(!said.contains(secret), "the error shows the secret: {said}");
    }
}

/// A server that answers every request with `status` and `body`, for the desk command to read.
async fn answering(status: u16, body: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head).await;
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_desk_command_shows_no_control_character_a_server_sent_and_refuses_a_wrong_shape() {
    // Found by attack: an error's code and message, the journal's check names and ages were
    // printed as the server sent them (escape sequences, a bidi override, a line break).
    let hostile = answering(
        500,
        r#"{"error":"boom\u001b[31mRED\u001b]0;pwned\u0007","message":"\r\nFAKE LINE \u202eevil"}"#,
    )
    .await;
    let wrong_shape = answering(200, r#"{"holds": null}"#).await;
    for (addr, command) in [
        (hostile, "holds"),
        (wrong_shape, "holds"),
        (hostile, "journal"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(["admin", command, "--token", TOKEN, "--url"])
            .arg(format!("http://{addr}"))
            .output()
            .expect("run turnstile admin");
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let said = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(
            !said.contains('\u{1b}') && !said.contains('\u{7}') && !said.contains('\u{202e}'),
            "{said:?}"
        );
        assert_eq!(said.trim_end().lines().count(), 1, "one line: {said:?}");
    }
}
