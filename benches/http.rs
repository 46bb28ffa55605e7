//! The server's own request path, in process: the axum router of `turnstile serve` called as a
//! `tower::Service` (no socket, no HTTP parsing), over the real engine and the embedded journal in
//! a temporary directory. What it measures is what a request costs the server past the connection:
//! `GET /healthz` (the stack's empty endpoint) and a checkout of a sold-out SKU with a new
//! `Idempotency-Key` each (validation, fingerprint, key table, the stock check, the kept `409`).
//! And successful durable checkouts end to end by worker count (`checkout_end_to_end`).
//! `cargo bench --bench http`.

use axum::body::Body;
use axum::http::Request;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mimalloc::MiMalloc;
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

/// The server's allocator (`src/main.rs`): the figures are the server's.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

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
        cluster: None,
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
        settler: turnstile::app::money::Settler::default(),
        relay: None,
        redis_optional: false,
        node: "node_bench".into(),
        admin_token: None,
        response_budget: turnstile::connections::ResponseBudget::leak(128 << 20, None),
        stopping: std::sync::atomic::AtomicBool::new(false),
        streams: turnstile::app::streams::StockStreams::new(1_000),
        shared_limits: None,
        waiting_room: Arc::new(
            turnstile::app::waiting_room::WaitingRoom::new(
                b"bench-tickets".to_vec(),
                Duration::from_secs(300),
                None,
            )
            .expect("waiting room"),
        ),
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

/// Successful durable checkouts end to end in process (the router over the engine, the in-process
/// gateway and the embedded journal with its `fdatasync` group commit; no socket), by worker count:
/// each worker is a thread with a single-threaded runtime and its own stock shard, as the per-core
/// runtime runs them, driving `TASKS_PER_WORKER` checkouts at a time (one item of 10,000 SKUs each).
fn checkouts_by_workers(c: &mut Criterion) {
    const SKUS: u64 = 10_000;
    const TASKS_PER_WORKER: u64 = 64;
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-journal");
    std::fs::create_dir_all(&base).expect("bench dir");
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    let setup = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let router = setup.block_on(async { app(dir.path()) });
    let put = |i| {
        Request::put(format!("/v1/products/S{i}"))
            .body(Body::from(
                r#"{"name":"s","price_cents":100,"currency":"EUR","stock":1000000}"#,
            ))
            .expect("request")
    };
    drive(&setup, &router, SKUS, 0, put, 200);
    let mut group = c.benchmark_group("checkout_end_to_end");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(1));
    let mut next = 0u64;
    for workers in [1u64, 2] {
        group.bench_function(format!("workers_{workers}"), |b| {
            b.iter_custom(|n| {
                let per_task = n.div_ceil(workers * TASKS_PER_WORKER).max(1);
                let first = next;
                next += per_task * workers * TASKS_PER_WORKER;
                let started = Instant::now();
                std::thread::scope(|scope| {
                    for worker in 0..workers {
                        let router = router.clone();
                        let handle = setup.handle().clone();
                        scope.spawn(move || {
                            turnstile::engine::inventory::set_home_shard(worker as usize);
                            let runtime = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .expect("worker runtime");
                            // The journal and the gateway's timers live on the setup runtime.
                            let _background = handle.enter();
                            runtime.block_on(async {
                                let tasks = (0..TASKS_PER_WORKER).map(|task| {
                                    let mut router = router.clone();
                                    async move {
                                        for k in 0..per_task {
                                            let i = first
                                                + ((worker * TASKS_PER_WORKER + task) * per_task)
                                                + k;
                                            let request = Request::post("/v1/checkout")
                                                .header("idempotency-key", format!("e2e-{i}"))
                                                .body(Body::from(format!(
                                                    r#"{{"items":[{{"sku":"S{}","quantity":1}}],"customer_id":"c","payment_token":"tok_ok"}}"#,
                                                    i % SKUS
                                                )))
                                                .expect("request");
                                            let response =
                                                router.call(request).await.expect("infallible");
                                            assert_eq!(response.status().as_u16(), 201);
                                        }
                                    }
                                });
                                futures_util::future::join_all(tasks).await;
                            });
                        });
                    }
                });
                started
                    .elapsed()
                    .mul_f64(n as f64 / (per_task * workers * TASKS_PER_WORKER) as f64)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, server_paths, checkouts_by_workers);
criterion_main!(benches);
