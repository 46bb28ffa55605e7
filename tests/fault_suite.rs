//! The fault suite: one fault at a time, each on a fresh node with its own services (a MariaDB,
//! a Redis and a gateway of its own, an exchange on a RabbitMQ of the suite's own: the installed
//! binaries on free ports, data in temp dirs, stopped at the end, also when it fails), under
//! steady checkouts with payments (some decided by the gateway's webhook) and events flowing;
//! after each, the promises are checked and counted into one table (README shows the last one).
//!
//! A test target of its own with its own `main` (`harness = false` in Cargo.toml), so that it takes
//! options:
//!
//! ```text
//! cargo test --test fault_suite                          # the short version (2 s per fault; in the test command)
//! cargo test --release --test fault_suite -- --soak 2m   # each fault for minutes
//! cargo test --test fault_suite -- --faults redis,disk   # only the faults whose name holds a word
//! ```
//!
//! It also accepts what `cargo test` passes every test binary (a name filter, `--skip`, `--exact`,
//! `--list`, `--nocapture`, `--test-threads N`, ...), so `cargo test <filter>` still works.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{eventually, JsonBody, PrivateMariaDb, PrivateRabbitMq, TestBroker, TestDatabase};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The suite's one test, by the name `cargo test` filters on.
const NAME: &str = "the_fault_suite_loses_nothing_under_any_fault";

const USAGE: &str = "\
usage: cargo test --test fault_suite -- [--soak DURATION] [--faults WORDS] [FILTER]

  --soak DURATION   how long each fault lasts (default 2s; e.g. 2m for the long version: 11 runs,
                    about 11 times DURATION plus 2 minutes in all); env TURNSTILE_FAULT_SOAK, the
                    flag wins
  --faults WORDS    only the faults whose name holds one of the words (comma or space separated,
                    e.g. `redis,disk`); env TURNSTILE_FAULTS
  FILTER            as cargo test's: the suite runs if its name holds it
                    (the_fault_suite_loses_nothing_under_any_fault)
";

/// What the suite was asked.
#[derive(Debug, Default)]
struct Options {
    soak: Option<Duration>,
    faults: Option<String>,
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
    /// `--ignored`: only ignored tests, and this one is not.
    ignored_only: bool,
    help: bool,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut options = Self::default();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match flag.as_str() {
                "--soak" => {
                    let raw = value("--soak")?;
                    options.soak = Some(
                        turnstile::config::parse_duration(&raw)
                            .map_err(|e| format!("--soak {raw:?}: {e}"))?,
                    );
                }
                "--faults" => options.faults = Some(value("--faults")?),
                "--skip" => options.skips.push(value("--skip")?),
                "--exact" => options.exact = true,
                "--list" => options.list = true,
                "--ignored" => options.ignored_only = true,
                "-h" | "--help" => options.help = true,
                // What libtest takes and this runner has no use for.
                "--test-threads" | "--color" | "--format" | "--logfile" | "-Z"
                | "--shuffle-seed" => {
                    value(&flag)?;
                }
                "--nocapture"
                | "--no-capture"
                | "--show-output"
                | "-q"
                | "--quiet"
                | "--include-ignored"
                | "--report-time"
                | "--ensure-time"
                | "--shuffle"
                | "--test"
                | "--force-run-in-process" => {}
                other if other.starts_with('-') => return Err(format!("unknown option {other}")),
                _ => options.filters.push(arg),
            }
        }
        Ok(options)
    }

    /// Whether the suite is selected by the filters.
    fn selected(&self) -> bool {
        let matches = |pattern: &String| {
            if self.exact {
                pattern == NAME
            } else {
                NAME.contains(pattern.as_str())
            }
        };
        !self.ignored_only
            && (self.filters.is_empty() || self.filters.iter().any(matches))
            && !self.skips.iter().any(matches)
    }
}

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("fault suite: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if options.help {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if options.list {
        println!("{NAME}: test");
        return ExitCode::SUCCESS;
    }
    if !options.selected() {
        println!("\nrunning 0 tests (the fault suite was filtered out)\n");
        return ExitCode::SUCCESS;
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let lasts = match options.soak {
        Some(lasts) => lasts,
        None => match env("TURNSTILE_FAULT_SOAK") {
            Some(raw) => match turnstile::config::parse_duration(&raw) {
                Ok(lasts) => lasts,
                Err(e) => {
                    eprintln!("fault suite: TURNSTILE_FAULT_SOAK {raw:?}: {e}");
                    return ExitCode::from(2);
                }
            },
            None => Duration::from_secs(2),
        },
    };
    let only = options.faults.or_else(|| env("TURNSTILE_FAULTS"));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fault suite: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("\nrunning 1 test");
    // A broken promise panics (an assert in the suite, with its table); the panic's message is
    // printed by the hook, and the exit status says the test failed.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(the_fault_suite(lasts, only.as_deref()))
    }));
    drop(runtime);
    match result {
        Ok(()) => {
            println!("test {NAME} ... ok\n\ntest result: ok. 1 passed; 0 failed\n");
            ExitCode::SUCCESS
        }
        Err(_) => {
            println!("test {NAME} ... FAILED\n\ntest result: FAILED. 0 passed; 1 failed\n");
            ExitCode::FAILURE
        }
    }
}

/// One fault of the suite.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// `kill -9` of the server, started again on its data dir (again and again, for as long as
    /// the fault lasts).
    ServerKilled,
    /// MariaDB killed (`kill -9`) and started again.
    MariaDbKilled,
    /// Redis killed and started again empty (no persistence).
    RedisKilled,
    /// RabbitMQ killed (`kill -9` of its VM) and started again.
    RabbitMqKilled,
    /// The gateway failing throughout: timeouts, 5xx and answers dropped after authorising.
    GatewayFailing,
    /// The data dir's disk full, then space freed.
    DiskFull,
    /// The journal's `fdatasync` failing (a fault point of the test build), then working again.
    FsyncFailing,
    /// The network to MySQL silent (a proxy that stops forwarding), then flowing again.
    MySqlStalled,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::ServerKilled => "server `kill -9`, restarted",
            Fault::MariaDbKilled => "MariaDB `kill -9`, restarted",
            Fault::RedisKilled => "Redis killed, restarted empty",
            Fault::RabbitMqKilled => "RabbitMQ `kill -9`, restarted",
            Fault::GatewayFailing => "gateway: timeouts, 5xx, dropped answers",
            Fault::DiskFull => "data dir's disk full, then freed",
            Fault::FsyncFailing => "journal `fdatasync` failing",
            Fault::MySqlStalled => "network to MySQL silent",
        }
    }
}

/// What the suite runs: each fault with the journals it applies to (`true`: write-behind).
const SUITE: &[(Fault, &[bool])] = &[
    (Fault::ServerKilled, &[false, true]),
    (Fault::MariaDbKilled, &[false, true]),
    (Fault::RedisKilled, &[false]),
    (Fault::RabbitMqKilled, &[false]),
    (Fault::GatewayFailing, &[true]),
    (Fault::DiskFull, &[true]),
    (Fault::FsyncFailing, &[true]),
    (Fault::MySqlStalled, &[false, true]),
];

/// The units on sale in each run: enough that the load does not sell out before the fault ends
/// in the short version, few enough that an oversold unit would show.
const STOCK: i64 = 100_000;

/// A checkout's last answer, as its buyer saw it (`0`: none came within the buyers' patience).
#[derive(Debug, Clone)]
struct Final {
    key: String,
    status: u16,
    order_id: Option<String>,
}

/// Steady buyers: each sends one checkout at a time under a new key, 4 in 5 approved at once
/// (`tok_ok`) and 1 in 5 decided later by the gateway's webhook (`tok_pending`). A checkout whose
/// answer did not come (the server killed, a connection cut) or that was told to come back
/// (`503`, `409 idempotency_key_in_use`) is sent again under its key until its answer is final,
/// as a careful client does, pacing its retries. Stops when told, finishing the checkout it has
/// in hand (for at most a minute).
struct Buyers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    acknowledged: Arc<std::sync::atomic::AtomicUsize>,
    /// Answers that told a buyer to come back (`503`, a key in use) or did not come at all.
    retried: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Final>>>,
}

impl Buyers {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Self {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let retried = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|client| {
                let (stop, acknowledged, retried) = (
                    Arc::clone(&stop),
                    Arc::clone(&acknowledged),
                    Arc::clone(&retried),
                );
                tokio::spawn(async move {
                    let mut connection = helpers::Client::new(addr);
                    let mut finals = Vec::new();
                    for n in 0..1_000_000usize {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let key = format!("fault-{client}-{n}");
                        let token = if n % 5 == 4 { "tok_pending" } else { "tok_ok" };
                        let body = serde_json::json!({
                            "items": [{"sku": "F", "quantity": 1}],
                            "customer_id": format!("buyer-{client}"),
                            "payment_token": token,
                        })
                        .to_string();
                        let mut last = Final {
                            key: key.clone(),
                            status: 0,
                            order_id: None,
                        };
                        let mut patience: Option<Instant> = None;
                        loop {
                            if stop.load(Ordering::Acquire) {
                                let since = *patience.get_or_insert_with(Instant::now);
                                if since.elapsed() > Duration::from_secs(60) {
                                    break;
                                }
                            }
                            let answer = connection
                                .try_send(
                                    "POST",
                                    "/v1/checkout",
                                    &[("idempotency-key", &key)],
                                    &body,
                                )
                                .await;
                            match answer {
                                Ok(answer)
                                    if !matches!(answer.status, 503 | 409)
                                        || (answer.status == 409
                                            && answer.json()["error"] == "out_of_stock") =>
                                {
                                    last.status = answer.status;
                                    last.order_id =
                                        answer.json()["order_id"].as_str().map(str::to_owned);
                                    if matches!(answer.status, 201 | 202) {
                                        acknowledged.fetch_add(1, Ordering::AcqRel);
                                    }
                                    break;
                                }
                                _ => {
                                    retried.fetch_add(1, Ordering::AcqRel);
                                    tokio::time::sleep(Duration::from_millis(25)).await
                                }
                            }
                        }
                        finals.push(last);
                    }
                    finals
                })
            })
            .collect();
        Buyers {
            stop,
            acknowledged,
            retried,
            tasks,
        }
    }

    fn acknowledged(&self) -> usize {
        self.acknowledged.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn stop(self) -> Vec<Final> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let mut finals = Vec::new();
        for task in self.tasks {
            finals.extend(task.await.expect("a buyer"));
        }
        finals
    }
}

/// One row of the table.
struct Outcome {
    fault: Fault,
    write_behind: bool,
    acknowledged: usize,
    retried: usize,
    unanswered: usize,
    lost: usize,
    oversold: i64,
    double_captures: usize,
    orphan_authorisations: usize,
    events_missing: usize,
    ready_by_itself: Option<bool>,
}

impl Outcome {
    fn clean(&self) -> bool {
        self.unanswered == 0
            && self.lost == 0
            && self.oversold == 0
            && self.double_captures == 0
            && self.orphan_authorisations == 0
            && self.events_missing == 0
            && self.ready_by_itself != Some(false)
    }
}

/// A fresh node for one fault, on services of its own (MariaDB behind a proxy the test
/// controls, Redis, a gateway-sim) and an exchange of its own on the suite's RabbitMQ.
struct Rig {
    fault: Fault,
    mariadb: PrivateMariaDb,
    proxy: helpers::StallProxy,
    database: TestDatabase,
    redis: helpers::PrivateRedis,
    broker: TestBroker,
    sim: helpers::Sim,
    disk: Option<helpers::SmallDisk>,
    node: NodeSpec,
    _dir: tempfile::TempDir,
    app: helpers::TestApp,
}

/// How the rig's node is started (again, after a `kill -9`): its port, data dir and options.
struct NodeSpec {
    port: u16,
    data_dir: std::path::PathBuf,
    sync_flag: std::path::PathBuf,
    args: Vec<String>,
}

impl NodeSpec {
    fn start(&self) -> helpers::TestApp {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_turnstile"));
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .env("TURNSTILE_TEST_FAIL_SYNC", &self.sync_flag);
        helpers::start_command(command, &self.data_dir)
    }
}

impl Rig {
    async fn start(fault: Fault, write_behind: bool, rabbitmq: &PrivateRabbitMq) -> Self {
        let mariadb = PrivateMariaDb::start();
        let database = TestDatabase::create_on(&mariadb.addr).await;
        let proxy =
            helpers::StallProxy::start(mariadb.addr.parse().expect("MariaDB's address")).await;
        let redis = helpers::PrivateRedis::start();
        let broker = TestBroker::create_on(&rabbitmq.url, "faults").await;
        let port = helpers::free_port();
        let mut sim_args = vec![
            "--webhook-url".to_owned(),
            format!("http://127.0.0.1:{port}/v1/webhooks/payment"),
            "--webhook-secret".to_owned(),
            helpers::WEBHOOK_SECRET.to_owned(),
            "--pending-delay".to_owned(),
            "300ms".to_owned(),
        ];
        if fault == Fault::GatewayFailing {
            for flag in ["--fail-timeout", "--fail-5xx", "--fail-drop"] {
                sim_args.extend([flag.to_owned(), "0.1".to_owned()]);
            }
        }
        let sim = helpers::Sim::start(
            &format!("127.0.0.1:{}", helpers::free_port()),
            &sim_args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = (fault == Fault::DiskFull).then(|| helpers::SmallDisk::mount(64));
        let data_dir = match &disk {
            Some(disk) => disk.mount.join("data"),
            None => dir.path().join("data"),
        };
        let mut args: Vec<String> = [
            "--webhook-secret",
            helpers::WEBHOOK_SECRET,
            "--mysql-url",
            &format!("mysql://root@{}/{}", proxy.addr, database.name),
            "--redis-url",
            &redis.url(),
            // A key whose checkout ran when the node was killed waits for its lock to expire
            // (a retry meanwhile is told to come back): 5 s here rather than a minute.
            "--redis-lock-ttl",
            "5s",
            "--workers",
            "1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(broker.args());
        args.extend(helpers::server_args(&sim.url()));
        if write_behind {
            args.push("--mysql-write-behind".into());
        }
        let node = NodeSpec {
            port,
            data_dir,
            sync_flag: dir.path().join("fail-sync"),
            args,
        };
        let app = node.start();
        let mut client = app.client();
        assert_eq!(client.put_product("F", 500, STOCK).await.status, 200);
        Rig {
            fault,
            mariadb,
            proxy,
            database,
            redis,
            broker,
            sim,
            disk,
            node,
            _dir: dir,
            app,
        }
    }

    /// The fault, held for `lasts`, then healed.
    async fn inject(&mut self, lasts: Duration) {
        match self.fault {
            Fault::ServerKilled => {
                // Killed, started again, and killed again after a while (0.5 to 2.5 s of
                // selling) for as long as the fault lasts: once in the short version.
                let until = Instant::now() + lasts;
                loop {
                    self.app.kill_9();
                    self.app = self.node.start();
                    if Instant::now() >= until {
                        break;
                    }
                    let pause =
                        500 + u64::from(turnstile::random::random_bytes(1).map_or(0, |b| b[0])) * 8;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
            Fault::MariaDbKilled => {
                self.mariadb.kill_9();
                tokio::time::sleep(lasts).await;
                self.mariadb.start_again();
            }
            Fault::RedisKilled => {
                self.redis.kill();
                tokio::time::sleep(lasts).await;
                self.redis.restart();
            }
            Fault::RabbitMqKilled => unreachable!("run against the suite's broker"),
            Fault::GatewayFailing => tokio::time::sleep(lasts).await,
            Fault::DiskFull => {
                let disk = self.disk.as_ref().expect("the rig's small disk");
                let filler = disk.fill(8 * 1024);
                tokio::time::sleep(lasts).await;
                std::fs::remove_file(filler).expect("free the disk");
            }
            Fault::FsyncFailing => {
                std::fs::write(&self.node.sync_flag, b"").expect("the fault point's flag");
                tokio::time::sleep(lasts).await;
                std::fs::remove_file(&self.node.sync_flag).expect("the fault point's flag");
            }
            Fault::MySqlStalled => {
                self.proxy.stall(true);
                tokio::time::sleep(lasts).await;
                self.proxy.stall(false);
            }
        }
    }
}

/// Runs one fault: load, fault, heal, load again, then every promise checked and counted.
async fn run_fault(
    fault: Fault,
    write_behind: bool,
    rabbitmq: &mut PrivateRabbitMq,
    lasts: Duration,
) -> Outcome {
    let mut rig = Rig::start(fault, write_behind, rabbitmq).await;
    let buyers = Buyers::start(rig.app.addr, 8);
    let until = |count: usize, what: &'static str| {
        let acknowledged = Arc::clone(&buyers.acknowledged);
        async move {
            eventually(what, Duration::from_secs(120), async || {
                acknowledged.load(std::sync::atomic::Ordering::Acquire) >= count
            })
            .await;
        }
    };
    let phase = std::cell::Cell::new(Instant::now());
    let lap = |what: &str| {
        let took = phase.get().elapsed();
        if took > Duration::from_secs(10) {
            eprintln!("{}: {what} took {took:.1?}", fault.name());
        }
        phase.set(Instant::now());
    };
    until(200, "checkouts before the fault").await;
    lap("the load before the fault");
    if fault == Fault::RabbitMqKilled {
        rabbitmq.kill_9();
        tokio::time::sleep(lasts).await;
        rabbitmq.start_again();
    } else {
        rig.inject(lasts).await;
    }
    let healed = buyers.acknowledged();
    until(healed + 200, "checkouts after the fault").await;
    lap("the fault and the load after it");
    let retried = buyers.retried.load(std::sync::atomic::Ordering::Acquire);
    let finals = buyers.stop().await;
    lap("the buyers' last checkouts");

    let mut client = rig.app.client();
    // Ready again without a restart where the fault was not the node.
    let ready_by_itself = if fault == Fault::ServerKilled {
        None
    } else {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ready = false;
        while !ready && Instant::now() < deadline {
            ready = client.get("/readyz").await.status == 200;
            if !ready {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Some(ready)
    };
    lap("readiness");
    // Money settles: nothing owed, no authorisation hanging, no order pending (the reconciler
    // acts after --reconcile-after).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let owed = helpers::metric(&mut client, "turnstile_payments_owed").await;
        let hanging = rig
            .sim
            .ledger()
            .await
            .iter()
            .filter(|p| p["status"] == "authorized" || p["status"] == "pending")
            .count();
        let held = client.get("/v1/products/F").await.json()["reserved"].as_i64();
        if (owed == 0.0 && hanging == 0 && held == Some(0)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    lap("the money settling");
    let acknowledged: Vec<&Final> = finals
        .iter()
        .filter(|f| matches!(f.status, 201 | 202))
        .collect();
    let unanswered = finals.iter().filter(|f| f.status == 0).count();
    if unanswered > 0 {
        let keys: Vec<&str> = finals
            .iter()
            .filter(|f| f.status == 0)
            .map(|f| f.key.as_str())
            .collect();
        eprintln!("{}: no final answer for {keys:?}", fault.name());
    }
    // Lost: an acknowledged order the node or MySQL does not have.
    // MySQL holds everything: in write-behind once the lag drained, then its projections.
    let deadline = Instant::now() + Duration::from_secs(90);
    while helpers::metric(&mut client, "turnstile_mysql_lag_records").await > 0.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = rig.database.pool().await;
    helpers::wait_projected(&pool).await;
    let in_mysql: HashMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT CAST(order_id AS CHAR), status FROM orders")
            .fetch_all(&pool)
            .await
            .expect("MySQL's orders")
            .into_iter()
            .collect();
    pool.close().await;
    let mut lost = 0;
    let mut node_status: HashMap<String, String> = HashMap::new();
    for order in &acknowledged {
        let id = order.order_id.clone().expect("an acknowledged order's id");
        let read = client.get(&format!("/v1/orders/{id}")).await;
        if read.status != 200 || !in_mysql.contains_key(&id) {
            lost += 1;
            continue;
        }
        node_status.insert(id, read.json()["status"].as_str().unwrap_or("").to_owned());
    }
    // Oversold: more sold than the stock, or the identity broken.
    let product = client.get("/v1/products/F").await.json();
    let field = |name: &str| product[name].as_i64().expect("a counter");
    let (stock, available, reserved, sold) = (
        field("stock"),
        field("available"),
        field("reserved"),
        field("sold"),
    );
    let oversold = (sold - stock).max(0) + (available + reserved + sold - stock).abs();
    // The money against the orders: one capture per paid order, none for another.
    let ledger = rig.sim.ledger().await;
    let mut captures: HashMap<String, usize> = HashMap::new();
    for payment in &ledger {
        if payment["status"] == "captured" {
            *captures
                .entry(payment["order_id"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
    }
    let mut double_captures = captures.values().filter(|&&n| n > 1).count();
    for order in captures.keys() {
        let status = match node_status.get(order) {
            Some(status) => status.clone(),
            None => client.get(&format!("/v1/orders/{order}")).await.json()["status"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        };
        // Captured money belongs to a paid order (a refunded one shows `refunded` in the ledger).
        if status != "paid" {
            double_captures += 1;
        }
    }
    let paid = node_status.values().filter(|s| *s == "paid").count();
    if sold as usize != captures.len() || paid > captures.len() {
        // Every unit sold is one captured payment, and every paid order was captured.
        double_captures += (sold as usize).abs_diff(captures.len());
    }
    let orphan_authorisations = ledger
        .iter()
        .filter(|p| p["status"] == "authorized")
        .count();
    // Events: every acknowledged order has its events, and every event reached RabbitMQ.
    if fault == Fault::RabbitMqKilled {
        rig.broker.reconnect().await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while helpers::metric(&mut client, "turnstile_amqp_lag_events").await > 0.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lap("RabbitMQ's lag");
    let events = client.all_events().await;
    let placed: std::collections::HashSet<&str> = events
        .iter()
        .filter_map(|e| e["order_id"].as_str())
        .collect();
    let received = rig
        .broker
        .receive_until(events.len() as u64, Duration::from_secs(60))
        .await;
    let seen: std::collections::HashSet<u64> = received.iter().map(|r| r.seq).collect();
    let events_missing = events
        .iter()
        .filter(|e| !seen.contains(&e["seq"].as_u64().unwrap_or(0)))
        .count()
        + acknowledged
            .iter()
            .filter(|o| !placed.contains(o.order_id.as_deref().unwrap_or("")))
            .count();
    let outcome = Outcome {
        fault,
        write_behind,
        acknowledged: acknowledged.len(),
        retried,
        unanswered,
        lost,
        oversold,
        double_captures,
        orphan_authorisations,
        events_missing,
        ready_by_itself,
    };
    if outcome.clean() {
        rig.broker.delete().await;
    } else {
        // The node's data dir and log kept for a look; its processes stop with the rig.
        let Rig { app, _dir, .. } = rig;
        drop(app);
        eprintln!(
            "{} ({}): not clean; the node's data dir and log are kept in {}\n{}",
            fault.name(),
            if write_behind {
                "write-behind"
            } else {
                "MySQL journal"
            },
            _dir.keep().display(),
            table(std::slice::from_ref(&outcome), lasts)
        );
    }
    outcome
}

/// The table of faults × outcomes, as README shows it.
fn table(outcomes: &[Outcome], lasts: Duration) -> String {
    let mut out = format!(
        "| fault ({} each) | journal | acknowledged | told to retry | unanswered | lost | oversold | double or stray captures | orphan authorisations | events missing | ready again by itself |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        humantime::format_duration(lasts)
    );
    for o in outcomes {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            o.fault.name(),
            if o.write_behind {
                "write-behind"
            } else {
                "MySQL"
            },
            o.acknowledged,
            o.retried,
            o.unanswered,
            o.lost,
            o.oversold,
            o.double_captures,
            o.orphan_authorisations,
            o.events_missing,
            match o.ready_by_itself {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "(restarted)",
            }
        ));
    }
    out
}

/// Runs every fault of [`SUITE`] (or those `only` names) for `lasts` each; panics with the table if
/// any promise broke.
async fn the_fault_suite(lasts: Duration, only: Option<&str>) {
    let words: Vec<String> = only
        .unwrap_or_default()
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect();
    let chosen: Vec<(Fault, &[bool])> = SUITE
        .iter()
        .copied()
        .filter(|(fault, _)| {
            words.is_empty()
                || words
                    .iter()
                    .any(|word| fault.name().to_lowercase().contains(word.as_str()))
        })
        .collect();
    assert!(
        !chosen.is_empty(),
        "no fault's name holds any of {words:?}; the faults: {:?}",
        SUITE.iter().map(|(f, _)| f.name()).collect::<Vec<_>>()
    );
    let runs: usize = chosen.iter().map(|(_, journals)| journals.len()).sum();
    eprintln!(
        "fault suite: {runs} runs, each fault lasting {}",
        humantime::format_duration(lasts)
    );
    let mut rabbitmq = PrivateRabbitMq::start();
    let mut outcomes = Vec::new();
    for (fault, journals) in chosen {
        for &write_behind in journals {
            let started = Instant::now();
            let outcome = run_fault(fault, write_behind, &mut rabbitmq, lasts).await;
            eprintln!(
                "fault suite: {} ({}) in {:.1?}: {}",
                fault.name(),
                if write_behind {
                    "write-behind"
                } else {
                    "MySQL journal"
                },
                started.elapsed(),
                if outcome.clean() {
                    "clean"
                } else {
                    "NOT CLEAN"
                }
            );
            outcomes.push(outcome);
        }
    }
    let table = table(&outcomes, lasts);
    eprintln!("{table}");
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-table.md"),
        &table,
    );
    assert!(
        outcomes.iter().all(Outcome::clean),
        "a promise broke under a fault:\n{table}"
    );
}
