//! The load-test harness against real targets: its counts agree with a real `turnstile serve`
//! (over plain HTTP/1.1, h2c, and HTTPS with h2 or HTTP/1.1), it catches a target that oversells,
//! and its open model shows a stalled target in the p99.

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{spawn_app, TestDatabase};
use loadtest::client::Endpoint;
use loadtest::reference::{serve_mysql_for_update, ReferenceConfig};
use loadtest::report::Report;
use loadtest::run::{run, Model, RunConfig};
use loadtest::scenario::{Kind, Scenario};
use loadtest::target::Target;
use loadtest::tls::Trust;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

fn flash_sale(stock: i64) -> Scenario {
    Scenario {
        kind: Kind::FlashSale,
        run_id: format!("t{stock}"),
        stock,
        skus: 1,
        double_percent: 10,
        decline_percent: 10,
        limit: 1,
        customers: 1,
        admission_rate: None,
        admissions: Default::default(),
    }
}

/// A drop of 100 units, limit 2, for 60 customers (10% declined cards), through a waiting room
/// at `admission_rate` if given.
fn limited_drop(run_id: &str, admission_rate: Option<u32>) -> Scenario {
    Scenario {
        kind: Kind::Drop,
        run_id: run_id.into(),
        stock: 100,
        skus: 1,
        double_percent: 0,
        decline_percent: 10,
        limit: 2,
        customers: 60,
        admission_rate,
        admissions: Default::default(),
    }
}

async fn drive(
    addr: SocketAddr,
    scenario: &Scenario,
    model: Model,
    duration: Duration,
    requests_max: u64,
) -> Report {
    let endpoint = Endpoint::plain(addr);
    scenario.setup(&endpoint).await.expect("setup");
    let config = RunConfig {
        endpoint: endpoint.clone(),
        model,
        connections: 32,
        duration,
        requests_max,
        progress: false,
    };
    let requests = scenario.clone();
    let recording = run(&config, move |i| requests.job(i)).await;
    let verification = scenario.verify(&endpoint, &recording).await;
    Report::new(
        "test",
        scenario.kind.name(),
        "test",
        config.connections,
        &recording,
        verification,
    )
}

async fn reference(
    database: &TestDatabase,
    no_stock_check: bool,
    stall_at: Option<u64>,
) -> SocketAddr {
    serve_mysql_for_update(ReferenceConfig {
        mysql_url: database.url.clone(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        pool_size: 32,
        no_stock_check,
        stall_at,
        stall_for: Duration::from_secs(1),
    })
    .await
    .expect("reference server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_counts_agree_with_the_servers_state() {
    let app = spawn_app(&[]);
    let scenario = flash_sale(200);
    let report = drive(
        app.addr,
        &scenario,
        Model::Open { rate: 2_000.0 },
        Duration::from_secs(2),
        4_000,
    )
    .await;
    assert!(report.passed(), "{}", report.text());
    assert_eq!(report.errors, 0);
    assert_eq!(report.sent, 4_000);
    let sold_by_harness = report
        .verification
        .units_sold_by_harness
        .get(&scenario.hot_sku())
        .copied();
    let mut client = app.client();
    let (stock, _, reserved, sold) = client.stock(&scenario.hot_sku()).await;
    assert_eq!((stock, reserved), (200, 0));
    assert_eq!(
        sold_by_harness,
        Some(sold),
        "the harness counted other orders than the server has"
    );
    assert_eq!(sold, 200, "4,000 buyers for 200 units sell them all");
    // The outcome histograms add up to what was sent.
    let counted: u64 = report.by_outcome.iter().map(|o| o.count).sum();
    assert_eq!(counted, report.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_limited_drop_no_customer_gets_more_than_the_limit() {
    let app = spawn_app(&[]);
    let scenario = limited_drop("drop", None);
    let report = drive(
        app.addr,
        &scenario,
        Model::Open { rate: 2_000.0 },
        Duration::from_secs(2),
        3_000,
    )
    .await;
    assert!(report.passed(), "{}", report.text());
    assert!(
        report.verification.customer_limit_refusals > 0,
        "{}",
        report.text()
    );
    let mut client = app.client();
    let (stock, _, reserved, sold) = client.stock(&scenario.hot_sku()).await;
    assert_eq!((stock, reserved), (100, 0));
    // 60 customers × 2 may take 120 units: the 100 sell out.
    assert_eq!(sold, 100, "{}", report.text());
}

/// The flash-sale features together: a drop with a limit per customer, a waiting room and a live
/// stock stream (the harness's `drop --admission-rate`): admissions in ticket order and never past
/// the rate as the buyers saw them, no buyer with an admitted ticket refused it, no customer past
/// the limit, the stream's `sold_out` reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_through_a_waiting_room_keeps_order_rate_and_limit() {
    let app = spawn_app(&[]);
    let scenario = limited_drop("queued", Some(200));
    let watcher = tokio::spawn(loadtest::client::watch_sold_out(
        app.addr,
        scenario.hot_sku(),
        std::time::Instant::now() + Duration::from_secs(60),
    ));
    let report = drive(
        app.addr,
        &scenario,
        Model::Open { rate: 400.0 },
        Duration::from_secs(2),
        800,
    )
    .await;
    assert!(report.passed(), "{}", report.text());
    let text = report.text();
    assert!(text.contains("waiting room at 200/s"), "{text}");
    let admitted = scenario.admissions.admissions.lock().unwrap().len();
    assert!(admitted > 100, "only {admitted} tickets were seen admitted");
    let mut client = app.client();
    let (stock, _, reserved, sold) = client.stock(&scenario.hot_sku()).await;
    assert_eq!((stock, reserved, sold), (100, 0, 100), "{text}");
    assert!(
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the stream's sold_out")
            .expect("watcher")
            .is_some(),
        "the stream ended without sold_out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_its_stock_check_is_caught_as_an_oversell() {
    let database = TestDatabase::create().await;
    let addr = reference(&database, true, None).await;
    let scenario = flash_sale(50);
    let report = drive(addr, &scenario, Model::Closed, Duration::from_secs(20), 600).await;
    assert!(
        !report.passed(),
        "an oversell went unnoticed:\n{}",
        report.text()
    );
    assert!(
        report
            .verification
            .violations
            .iter()
            .any(|v| v.contains("oversold")),
        "{:?}",
        report.verification.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_target_shows_a_p99_of_at_least_the_stall_in_the_open_model() {
    let database = TestDatabase::create().await;
    let addr = reference(&database, false, Some(500)).await;
    let scenario = flash_sale(100);
    let report = drive(
        addr,
        &scenario,
        Model::Open { rate: 1_000.0 },
        Duration::from_secs(3),
        3_000,
    )
    .await;
    assert!(report.passed(), "{}", report.text());
    assert!(
        report.all.p99_ms >= 1_000.0,
        "p99 {} ms hides a 1 s stall:\n{}",
        report.all.p99_ms,
        report.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_lua_reference_sells_exactly_its_stock() {
    let database = TestDatabase::create().await;
    let config = ReferenceConfig {
        mysql_url: database.url.clone(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        pool_size: 16,
        no_stock_check: false,
        stall_at: None,
        stall_for: Duration::from_secs(1),
    };
    let addr = loadtest::redis_lua::serve_redis_lua(config, "redis://127.0.0.1:6379")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let scenario = flash_sale(100);
    let report = drive(addr, &scenario, Model::Closed, Duration::from_secs(20), 800).await;
    assert!(report.passed(), "{}", report.text());
    assert_eq!(
        report
            .verification
            .units_sold_by_harness
            .get(&scenario.hot_sku()),
        Some(&100),
        "800 buyers for 100 units sell them all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_drives_turnstile_over_http2_too() {
    let app = spawn_app(&[]);
    let scenario = flash_sale(30);
    let endpoint = Endpoint::h2c(app.addr);
    scenario.setup(&endpoint).await.expect("setup");
    let config = RunConfig {
        endpoint: endpoint.clone(),
        model: Model::Closed,
        connections: 8,
        duration: Duration::from_secs(20),
        requests_max: 300,
        progress: false,
    };
    let requests = scenario.clone();
    let recording = run(&config, move |i| requests.job(i)).await;
    let verification = scenario.verify(&endpoint, &recording).await;
    let report = Report::new("test", "flash-sale", "h2", 8, &recording, verification);
    assert!(report.passed(), "{}", report.text());
    assert_eq!(report.errors, 0);
    assert_eq!(
        report
            .verification
            .units_sold_by_harness
            .get(&scenario.hot_sku()),
        Some(&30)
    );
}

/// `turnstile serve` over HTTPS with the test certificate of `tests/fixtures/tls/` (a leaf for
/// 127.0.0.1 and localhost signed by the test CA `ca.pem`).
fn spawn_tls_app() -> helpers::TestApp {
    let fixture = |name: &str| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
            .display()
            .to_string()
    };
    let (cert, key) = (fixture("cert.pem"), fixture("key.pem"));
    spawn_app(&["--tls-cert", &cert, "--tls-key", &key])
}

/// A flash sale of `stock` units to `requests_max` buyers through `endpoint` (closed model); the
/// report.
async fn flash_sale_through(endpoint: &Endpoint, stock: i64, requests_max: u64) -> Report {
    let scenario = flash_sale(stock);
    scenario.setup(endpoint).await.expect("setup");
    let config = RunConfig {
        endpoint: endpoint.clone(),
        model: Model::Closed,
        connections: 8,
        duration: Duration::from_secs(20),
        requests_max,
        progress: false,
    };
    let requests = scenario.clone();
    let recording = run(&config, move |i| requests.job(i)).await;
    let verification = scenario.verify(endpoint, &recording).await;
    Report::new(
        "test",
        "flash-sale",
        "tls",
        config.connections,
        &recording,
        verification,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_drives_turnstile_over_https_with_h2_and_http11() {
    let app = spawn_tls_app();
    let ca = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/ca.pem");
    // h2 by ALPN, the certificate checked against the test CA for the name localhost.
    let target: Target = format!("https://localhost:{}/", app.addr.port())
        .parse()
        .expect("target");
    let endpoint =
        Endpoint::for_target(&target, app.addr, true, &Trust::CaFile(ca)).expect("h2 endpoint");
    let report = flash_sale_through(&endpoint, 30, 300).await;
    assert!(report.passed(), "{}", report.text());
    assert_eq!(report.errors, 0, "{}", report.text());
    assert_eq!(report.sent, 300);
    assert_eq!(
        report
            .verification
            .units_sold_by_harness
            .values()
            .sum::<i64>(),
        30
    );
    // HTTP/1.1 by ALPN with --insecure (any certificate), by IP.
    let target: Target = format!("https://127.0.0.1:{}", app.addr.port())
        .parse()
        .expect("target");
    let endpoint = Endpoint::for_target(&target, app.addr, false, &Trust::AnyCertificate)
        .expect("http/1.1 endpoint");
    let report = flash_sale_through(&endpoint, 20, 200).await;
    assert!(report.passed(), "{}", report.text());
    assert_eq!(report.errors, 0, "{}", report.text());
    assert_eq!(
        report
            .verification
            .units_sold_by_harness
            .values()
            .sum::<i64>(),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_refuses_an_https_server_it_cannot_trust() {
    let app = spawn_tls_app();
    let target: Target = format!("https://127.0.0.1:{}", app.addr.port())
        .parse()
        .expect("target");
    // The system roots do not vouch for the test CA: every request fails, none is counted.
    let endpoint =
        Endpoint::for_target(&target, app.addr, true, &Trust::SystemRoots).expect("endpoint");
    let error = flash_sale(5)
        .setup(&endpoint)
        .await
        .expect_err("an untrusted certificate was accepted");
    assert!(
        error.contains("UnknownIssuer") && error.contains("--cacert"),
        "{error}"
    );
}
