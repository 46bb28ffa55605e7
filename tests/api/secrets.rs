//! No secret reaches a log or an error (API.md, "Operations desk"): the database's, Redis's and
//! RabbitMQ's passwords, the webhook secret, the cluster secret and the admin token, through a run
//! of two nodes that uses every one of them and goes through the faults whose errors name the
//! services (MySQL silent, Redis and RabbitMQ killed and started again), the refusals (a wrong
//! token, a forged call between nodes, a wrong password at start), and the desk command.

use crate::helpers::{
    eventually, start_with_env, Client, PrivateRabbitMq, PrivateRedis, StallProxy, TestApp,
    TestBroker, TestDatabase, WEBHOOK_SECRET,
};
use std::process::{Command, Stdio};
use std::time::Duration;

const MYSQL_PASSWORD: &str = "secrets-mysql-password-5b2d";
const REDIS_PASSWORD: &str = "secrets-redis-password-8e41";
const AMQP_PASSWORD: &str = "secrets-amqp-password-c07a";
const CLUSTER_SECRET: &str = "secrets-cluster-secret-19f6";
const ADMIN_TOKEN: &str = "secrets-admin-token-e3a8";

/// Everything one checkout of `sku` says: status and body.
async fn buy(client: &mut Client, key: &str, sku: &str, token: &str) -> (u16, serde_json::Value) {
    match client.checkout(key, sku, 1, token).await {
        Ok(answer) => {
            let status = answer.status;
            let body = serde_json::from_slice(&answer.body).unwrap_or_default();
            (status, body)
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

/// `turnstile <args>` that must not start serving: what it said on both outputs, killed after
/// `limit` if it is still trying.
fn refused_start(args: &[&str], limit: Duration) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let file = std::fs::File::create(&out).expect("output file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::from(file.try_clone().expect("file")))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("run turnstile");
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(&out).expect("its output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_reaches_a_log_or_an_error_of_two_nodes_through_faults_and_refusals() {
    // A MySQL user of the test's own with a password (the machine's server checks it; the test
    // only adds a user, and drops it), reached through a proxy the test can silence.
    let database = TestDatabase::create().await;
    let user = format!("s{}", &database.name[database.name.len() - 10..]);
    let admin = database.pool().await;
    for statement in [
        format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{MYSQL_PASSWORD}'"),
        format!("GRANT ALL ON {}.* TO '{user}'@'%'", database.name),
    ] {
        sqlx::query(&statement)
            .execute(&admin)
            .await
            .expect("a user of the test's own");
    }
    let proxy = StallProxy::start(database.addr.parse().expect("address")).await;
    let mysql_url = format!(
        "mysql://{user}:{MYSQL_PASSWORD}@{}/{}",
        proxy.addr, database.name
    );
    let mut redis = PrivateRedis::start_with_password(Some(REDIS_PASSWORD));
    let mut rabbitmq = PrivateRabbitMq::start_with_user("turnstile", AMQP_PASSWORD);
    let mut broker = TestBroker::create_on(&rabbitmq.url, "secrets").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let start = |name: &str| -> TestApp {
        let log = dir.path().join(format!("{name}.json"));
        let mut args: Vec<String> = [
            "--node-id",
            name,
            "--cluster-secret",
            CLUSTER_SECRET,
            "--admin-token",
            ADMIN_TOKEN,
            "--mysql-url",
            &mysql_url,
            "--redis-url",
            &redis.url(),
            "--workers",
            "1",
            "--sim-pending-delay",
            "200ms",
            "--mysql-timeout",
            "2s",
            "--log-format",
            "json",
            "--log-file",
            &log.display().to_string(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(broker.args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start_with_env(&dir.path().join(name), &args, &[("RUST_LOG", "debug")])
    };
    let mut a = start("node-a");
    let mut b = start("node-b");
    let (mut ca, mut cb) = (a.client(), b.client());
    assert_eq!(ca.put_product("S", 500, 1_000).await.status, 200);
    eventually(
        "node b to know the product",
        Duration::from_secs(10),
        async || cb.get("/v1/products/S").await.status == 200,
    )
    .await;

    // Checkouts on both nodes, paid at once, later by the webhook (signed with the webhook
    // secret), declined.
    let mut placed = Vec::new();
    for (n, token) in ["tok_ok", "tok_pending", "tok_decline", "tok_ok"]
        .iter()
        .enumerate()
    {
        let client = if n % 2 == 0 { &mut ca } else { &mut cb };
        let (status, body) = buy(client, &format!("sec-{n}"), "S", token).await;
        assert!(matches!(status, 201 | 202 | 402), "{status} {body}");
        placed.push(body["order_id"].as_str().unwrap_or_default().to_owned());
    }
    // Node a's order cancelled through node b (a call between nodes, signed with the cluster
    // secret), and a desk release forwarded with the token.
    let cancelled = cb
        .send("POST", &format!("/v1/orders/{}/cancel", placed[0]), &[], "")
        .await;
    assert_eq!(
        cancelled.status,
        200,
        "{}",
        String::from_utf8_lossy(&cancelled.body)
    );
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let released = cb
        .send(
            "POST",
            &format!("/v1/admin/orders/{}/release", placed[2]),
            &[("authorization", &bearer)],
            "",
        )
        .await;
    assert_eq!(
        released.status,
        200,
        "{}",
        String::from_utf8_lossy(&released.body)
    );
    // Refusals: a wrong token, a forged call between nodes.
    for wrong in ["Bearer nope", "Bearer secrets-admin-token-e3a"] {
        let refused = ca
            .send("GET", "/v1/admin/journal", &[("authorization", wrong)], "")
            .await;
        assert_eq!(refused.status, 401);
    }
    let forged = ca
        .send(
            "POST",
            &format!("/v1/orders/{}/cancel", placed[1]),
            &[
                ("turnstile-forwarded-by", "node-b"),
                ("turnstile-cluster-signature", "t=1,v1=00"),
            ],
            "",
        )
        .await;
    assert_eq!(forged.status, 401);

    // Faults whose errors name the services: MySQL silent, then Redis killed and back, then
    // RabbitMQ killed and back; checkouts sent through each (their answers are not the point).
    proxy.stall(true);
    let _ = buy(&mut ca, "sec-stalled", "S", "tok_ok").await;
    proxy.stall(false);
    redis.kill();
    let _ = buy(&mut cb, "sec-no-redis", "S", "tok_ok").await;
    redis.restart();
    rabbitmq.kill_9();
    let _ = buy(&mut ca, "sec-no-rabbitmq", "S", "tok_ok").await;
    rabbitmq.start_again();
    broker.reconnect().await;
    eventually(
        "both nodes ready again",
        Duration::from_secs(90),
        async || ca.get("/readyz").await.status == 200 && cb.get("/readyz").await.status == 200,
    )
    .await;
    let (status, _) = buy(&mut cb, "sec-after", "S", "tok_ok").await;
    assert_eq!(status, 201);

    // The desk command, with the token and with a wrong one.
    let mut said = String::new();
    for (token, command) in [
        (ADMIN_TOKEN, "journal"),
        (ADMIN_TOKEN, "payments"),
        ("secrets-admin-token-e3a", "holds"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(["admin", command, "--url", &format!("http://{}", a.addr)])
            .args(["--token", token])
            .output()
            .expect("run turnstile admin");
        said.push_str(&String::from_utf8_lossy(&output.stdout));
        said.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    assert!(said.contains("mysql"), "the desk's journal: {said}");

    // Starts refused for a wrong password, each naming what is wrong.
    let wrong_mysql = format!(
        "mysql://{user}:{MYSQL_PASSWORD}-wrong@{}/{}",
        database.addr, database.name
    );
    let wrong_redis = format!("redis://:{REDIS_PASSWORD}-wrong@127.0.0.1:{}", redis.port);
    let wrong_amqp = rabbitmq
        .url
        .replace(AMQP_PASSWORD, &format!("{AMQP_PASSWORD}-wrong"));
    for args in [
        vec!["serve", "--mysql-url", &wrong_mysql],
        vec!["serve", "--redis-url", &wrong_redis],
        vec!["serve", "--amqp-url", &wrong_amqp],
        vec!["migrate", "--mysql-url", &wrong_mysql],
    ] {
        let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
        let text = refused_start(&args, Duration::from_secs(10));
        said.push_str(&text);
        said.push('\n');
    }

    assert!(a.terminate().success());
    assert!(b.terminate().success());
    let mut logs = String::new();
    for (name, app) in [("node-a", &a), ("node-b", &b)] {
        let json = std::fs::read_to_string(dir.path().join(format!("{name}.json")))
            .expect("the node's log file");
        logs.push_str(&json);
        logs.push_str(&app.log());
    }
    // The faults were met and logged (so the lines that name the services were written).
    assert!(
        logs.lines()
            .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\""))
            .count()
            >= 3,
        "the faults left no warning in the logs"
    );
    for secret in [
        MYSQL_PASSWORD,
        REDIS_PASSWORD,
        AMQP_PASSWORD,
        CLUSTER_SECRET,
        ADMIN_TOKEN,
        WEBHOOK_SECRET,
    ] {
        for (what, text) in [("the nodes' logs", &logs), ("an error or the desk", &said)] {
            if let Some(line) = text.lines().find(|line| line.contains(secret)) {
                panic!("{what} holds a secret: {line}");
            }
        }
    }
    broker.delete().await;
    drop(proxy);
    sqlx::query(&format!("DROP USER '{user}'@'%'"))
        .execute(&admin)
        .await
        .expect("drop the test's user");
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_a_service_repeats_in_its_error_is_scrubbed_from_answers_and_logs() {
    // Found by attack: a Redis without HELLO refuses `HELLO 3 AUTH default <password>` and says
    // the password back; the error reached /readyz, the 503 bodies and the log as it was.
    let port = crate::helpers::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            REDIS_PASSWORD,
        ])
        .args(["--rename-command", "HELLO", ""])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (install Debian's redis-server package)");
    let addr = format!("127.0.0.1:{port}");
    eventually(
        "the test's redis-server",
        Duration::from_secs(10),
        async || tokio::net::TcpStream::connect(&addr).await.is_ok(),
    )
    .await;
    let url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/?protocol=resp3");
    let app = start_with_env(
        &dir.path().join("data"),
        &["--redis-url", &url, "--redis-prefix", "scrub:"],
        &[("RUST_LOG", "debug")],
    );
    let mut client = app.client();
    let mut said = String::new();
    eventually(
        "Redis's refusal to be seen",
        Duration::from_secs(20),
        async || {
            let ready = client.get("/readyz").await;
            said = String::from_utf8_lossy(&ready.body).into_owned();
            said.contains("HELLO")
        },
    )
    .await;
    let cart = client.send("POST", "/v1/carts", &[], "").await;
    assert_eq!(cart.status, 503);
    said.push_str(&String::from_utf8_lossy(&cart.body));
    let mut app = app;
    assert!(app.terminate().success());
    said.push_str(&app.log());
    assert!(
        said.contains("***"),
        "the refusal is shown, scrubbed: {said}"
    );
    if let Some(line) = said.lines().find(|line| line.contains(REDIS_PASSWORD)) {
        panic!("a secret a service repeated got out: {line}");
    }
    let _ = redis.kill();
    let _ = redis.wait();
}
