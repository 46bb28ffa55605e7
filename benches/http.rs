//! The server's own request path, in process: the axum router of `turnstile serve` called as a
//! `tower::Service` (no socket, no HTTP parsing), over the real engine and the embedded journal in
//! a temporary directory. What it measures is what a request costs the server past the connection:
//! `GET /healthz` (the stack's empty endpoint) and a checkout of a sold-out SKU with a new
//! `Idempotency-Key` each (validation, fingerprint, key table, the stock check, the kept `409`).
//! `cargo bench --bench http`.

use axum::body::Body;
use axum::http::Request;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_service::Service;
use turnstile::api::{self, AppState};
use turnstile::engine::idempotency::RejectionLimits;
use turnstile::engine::{Engine, EngineConfig};
use turnstile::http_client::{ClientOptions, HttpClient};
use turnstile::journal::file::{FileJournal, FileJournalConfig};
use turnstile::journal::Journal;
use turnstile::metrics::Metrics;
use turnstile::payment::simulator::{Simulator, SimulatorConfig};
use turnstile::sessions::{CartStore, Carts};

fn app(dir: &std::path::Path) -> axum::Router {
    let (journal, state) =
        FileJournal::open_dir(dir, FileJournalConfig::default()).expect("journal");
    let journal: Arc<dyn Journal> = Arc::new(journal);
    let engine = Engine::from_state(
        EngineConfig {
            rejections: RejectionLimits::default(),
            ..EngineConfig::default()
        },
        &state,
    )
    .expect("engine");
    let secret = b"bench-secret".to_vec();
    let simulator = Simulator::new(
        SimulatorConfig {
            webhook_secret: secret.clone(),
            pending_delay: Duration::from_millis(500),
            webhook_attempts_max: 1,
        },
        HttpClient::new(ClientOptions::signed_webhooks()).expect("client"),
    );
    let state = Arc::new(AppState {
        engine,
        journal,
        carts: Carts::Memory(CartStore::new(3_600_000, 1_000_000).expect("carts")),
        gateway: Arc::new(simulator),
        webhook_secret: secret,
        gateway_timeout: Duration::from_secs(5),
        journal_timeout: Duration::from_secs(5),
        slow_client_timeout: Duration::from_secs(10),
        metrics: Metrics::new(api::ROUTES),
        settled: tokio::sync::Notify::new(),
        checkouts_in_flight: Arc::new(tokio::sync::Semaphore::new(10_000)),
        settler: api::money::Settler::default(),
        relay: None,
    });
    api::router(state)
}

/// Sends `request(i)` for i in 0..n one after another; the time for all.
fn drive(
    runtime: &tokio::runtime::Runtime,
    router: &axum::Router,
    n: u64,
    first: u64,
    request: impl Fn(u64) -> Request<Body>,
    expect: u16,
) -> Duration {
    runtime.block_on(async {
        let mut router = router.clone();
        let started = Instant::now();
        for i in first..first + n {
            let response = router.call(request(i)).await.expect("infallible");
            assert_eq!(response.status().as_u16(), expect);
        }
        started.elapsed()
    })
}

fn server_paths(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let router = runtime.block_on(async { app(dir.path()) });
    let put = |_| {
        Request::put("/v1/products/SOLDOUT")
            .body(Body::from(
                r#"{"name":"sold out","price_cents":100,"currency":"EUR","stock":0}"#,
            ))
            .expect("request")
    };
    drive(&runtime, &router, 1, 0, put, 200);

    let mut group = c.benchmark_group("http_in_process");
    group.throughput(Throughput::Elements(1));
    group.bench_function("get_healthz", |b| {
        b.iter_custom(|n| {
            drive(
                &runtime,
                &router,
                n,
                0,
                |_| {
                    Request::get("/healthz")
                        .body(Body::empty())
                        .expect("request")
                },
                200,
            )
        })
    });
    let mut next = 0u64;
    group.bench_function("checkout_sold_out", |b| {
        b.iter_custom(|n| {
            let first = next;
            next += n;
            drive(
                &runtime,
                &router,
                n,
                first,
                |i| {
                    Request::post("/v1/checkout")
                        .header("idempotency-key", format!("bench-{i}"))
                        .body(Body::from(
                            r#"{"items":[{"sku":"SOLDOUT","quantity":1}],"customer_id":"c","payment_token":"tok_ok"}"#,
                        ))
                        .expect("request")
                },
                409,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, server_paths);
criterion_main!(benches);
