//! Starts the real `turnstile` binary on a free port with its own data directory, and talks to it
//! over real HTTP with keep-alive connections.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The webhook secret every test server is started with, so tests can sign webhooks.
pub const WEBHOOK_SECRET: &str = "test-webhook-secret";

/// A running server process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    child: Child,
    /// Keeps the data directory alive for the test's whole life.
    _dir: Option<tempfile::TempDir>,
}

/// Starts a server on a fresh data directory with extra `args`.
pub fn spawn_app(args: &[&str]) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut app = start(&data_dir, args);
    app._dir = Some(dir);
    app
}

/// Starts a server on `data_dir` (kept as it is) with extra `args`.
/// Runs `turnstile serve` on `data_dir` with `args`, expecting it to refuse to start: its exit
/// code and standard error. One that starts (prints its ready line) is killed and the test fails,
/// instead of hanging.
pub fn serve_refused(data_dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut server = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start turnstile");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read stdout");
    if !line.is_empty() {
        let _ = server.kill();
        let _ = server.wait();
        panic!("turnstile started: {line:?}");
    }
    let mut stderr = String::new();
    server
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    let status = server.wait().expect("wait for turnstile");
    (status.code(), stderr)
}

pub fn start(data_dir: &Path, args: &[&str]) -> TestApp {
    start_with_env(data_dir, args, &[])
}

/// Starts a server on `data_dir` with extra `args` and environment variables.
pub fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> TestApp {
    let mut command = Command::new(env!("CARGO_BIN_EXE_turnstile"));
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(["--webhook-secret", WEBHOOK_SECRET])
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    start_command(command, data_dir)
}

/// Runs `command` (a `turnstile serve` as the caller put it together) on `data_dir`, its log
/// beside it, and waits for its ready line.
pub fn start_command(mut command: Command, data_dir: &Path) -> TestApp {
    let log = std::fs::File::create(data_dir.with_extension("log"))
        .or_else(|_| std::fs::File::create("/dev/null"))
        .expect("log file");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start turnstile");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the ready line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            // The log's tail in the message: the data dir (and the log beside it) may be in a
            // temp dir the failing test deletes.
            let log = std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "turnstile did not start: {line:?} ({}); its log ends:\n{}",
                data_dir.with_extension("log").display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .parse()
        .expect("address");
    TestApp {
        addr,
        data_dir: data_dir.to_path_buf(),
        child,
        _dir: None,
    }
}

impl TestApp {
    /// SIGKILL: the process dies at once, mid-whatever.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.wait()
    }

    /// SIGTERM, without waiting.
    pub fn send_sigterm(&self) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("send SIGTERM");
    }

    /// Waits for the process to end; its exit status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for the server")
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("check the server")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the server `signal` (as `kill` names it: `-STOP`, `-CONT`, `-TERM`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("send a signal");
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    /// What the server logged so far (its stderr, next to its data dir).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// A new client of this server.
    pub fn client(&self) -> Client {
        Client::new(self.addr)
    }

    /// Takes the data directory away from this app (so a restart can use it after a kill).
    pub fn into_parts(mut self) -> (PathBuf, Option<tempfile::TempDir>) {
        self.kill_9();
        (self.data_dir.clone(), self._dir.take())
    }
}

/// The payment id the in-process simulator of `app` gave the checkout under `key` (made now, with
/// the default 24 h retention): the simulator derives it from the gateway key, which carries the
/// node's name (kept in the data dir).
pub fn simulator_payment_id(app: &TestApp, key: &str) -> String {
    let node = turnstile::data_dir::node_name(&app.data_dir).expect("the node's name");
    let period = turnstile::payment::checkout_period(turnstile::time::now_ms(), 24 * 3_600 * 1_000);
    let key = turnstile::domain::IdempotencyKey::parse(key).expect("key");
    turnstile::payment::simulator::payment_id_for(&turnstile::payment::gateway_key(
        &node, &key, period,
    ))
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer.
pub use loadtest::client::Answer;

/// Parses an answer's body as JSON.
pub trait JsonBody {
    fn json(&self) -> Value;
}

impl JsonBody for Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One keep-alive HTTP/1.1 connection (the harness's), reopened when it breaks.
pub struct Client {
    connection: loadtest::client::Connection,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            connection: loadtest::client::Connection::new(addr),
        }
    }

    /// Sends a request; `Err` if the server did not answer (connection refused or broken).
    pub async fn try_send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Answer, String> {
        self.connection.send_with(method, path, headers, body).await
    }

    /// Sends a request that must be answered.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        self.try_send(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.send("GET", path, &[], "").await
    }

    pub async fn put_product(&mut self, sku: &str, price_cents: i64, stock: i64) -> Answer {
        let body = serde_json::json!({
            "name": format!("product {sku}"),
            "price_cents": price_cents,
            "currency": "EUR",
            "stock": stock,
        })
        .to_string();
        self.send("PUT", &format!("/v1/products/{sku}"), &[], &body)
            .await
    }

    pub async fn checkout(
        &mut self,
        key: &str,
        sku: &str,
        quantity: i64,
        token: &str,
    ) -> Result<Answer, String> {
        let body = serde_json::json!({
            "items": [{"sku": sku, "quantity": quantity}],
            "customer_id": "customer-1",
            "payment_token": token,
        })
        .to_string();
        self.try_send("POST", "/v1/checkout", &[("idempotency-key", key)], &body)
            .await
    }

    /// The product's counters; asserts the identity on every read.
    pub async fn stock(&mut self, sku: &str) -> (i64, i64, i64, i64) {
        let product = self.get(&format!("/v1/products/{sku}")).await.json();
        let field = |name: &str| {
            product[name]
                .as_i64()
                .unwrap_or_else(|| panic!("{name} in {product}"))
        };
        let (stock, available, reserved, sold) = (
            field("stock"),
            field("available"),
            field("reserved"),
            field("sold"),
        );
        assert_eq!(
            available + reserved + sold,
            stock,
            "identity broken: {product}"
        );
        (stock, available, reserved, sold)
    }

    /// Every event of the log, following `next` page by page.
    pub async fn all_events(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .get(&format!("/v1/events?after={after}&limit=1000"))
                .await
                .json();
            let batch = page["events"].as_array().cloned().unwrap_or_default();
            if batch.is_empty() {
                return events;
            }
            after = page["next"].as_u64().expect("next");
            events.extend(batch);
        }
    }
}

/// Waits until `condition` holds, checking every 20 ms, for at most `limit`; panics naming `what`.
/// Used only where the server acts on a clock (hold expiry, the simulator's webhook delay): the
/// test waits for the observable result, not for a fixed time.
pub async fn eventually(what: &str, limit: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signs a webhook body with the test secret.
pub fn signed(body: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    turnstile::payment::webhook::sign(WEBHOOK_SECRET.as_bytes(), now, body.as_bytes())
}

/// The MariaDB of the machine (started before tests; CI starts it if it is not answering).
pub const MARIADB_ADDR: &str = "127.0.0.1:3306";

/// A database of its own for one test, migrated with `turnstile migrate`; dropped afterwards.
pub struct TestDatabase {
    pub url: String,
    pub name: String,
    /// The server's `host:port`.
    pub addr: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let database = Self::create_empty().await;
        database.migrate();
        database
    }

    /// A migrated database of its own on the server at `addr` (a [`PrivateMariaDb`]).
    #[allow(dead_code)] // used by tests/faults.rs and tests/fault_suite.rs, not by every test binary
    pub async fn create_on(addr: &str) -> Self {
        let database = Self::create_named_on(
            addr,
            &format!(
                "turnstile_test_{}",
                turnstile::random::hex(&turnstile::random::random_bytes(6).expect("random"))
            ),
        )
        .await;
        database.migrate();
        database
    }

    /// A database of its own without any table yet.
    pub async fn create_empty() -> Self {
        Self::create_named(&format!(
            "turnstile_test_{}",
            turnstile::random::hex(&turnstile::random::random_bytes(6).expect("random"))
        ))
        .await
    }

    /// A database named `name` (unique to the test), without any table yet.
    pub async fn create_named(name: &str) -> Self {
        Self::create_named_on(MARIADB_ADDR, name).await
    }

    /// A database named `name`, without any table yet, on the server at `addr`.
    pub async fn create_named_on(addr: &str, name: &str) -> Self {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            panic!(
                "MariaDB is not answering on {addr}: start it with \
                 `start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd`"
            );
        }
        let name = name.to_owned();
        // The machine's server has a `test` database; a private one only `mysql`.
        let admin = sqlx::MySqlPool::connect(&format!("mysql://root@{addr}/mysql"))
            .await
            .expect("connect to MariaDB as root");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let url = format!("mysql://root@{addr}/{name}");
        Self {
            url,
            name,
            addr: addr.to_owned(),
        }
    }

    /// `turnstile migrate`: every migration this binary has.
    pub fn migrate(&self) {
        let migrated = Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(["migrate", "--mysql-url", &self.url])
            .output()
            .expect("run turnstile migrate");
        assert!(
            migrated.status.success(),
            "turnstile migrate failed: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
    }

    pub async fn pool(&self) -> sqlx::MySqlPool {
        sqlx::MySqlPool::connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

/// Waits until MySQL's projections hold every record of the `journal` table's logs (each node's
/// applier's durable cursor has reached its log's end): only then do `orders` & co. hold every
/// acknowledged order. Rows of a log no node applies (planted by a test) are not waited for.
pub async fn wait_projected(pool: &sqlx::MySqlPool) {
    use sqlx::Row;
    eventually(
        "MySQL's projections to catch up with its journal",
        Duration::from_secs(60),
        async || {
            let row = sqlx::query(
                "SELECT COUNT(*) FROM projection_cursor c WHERE c.applied_lsn < \
                 (SELECT COALESCE(MAX(j.lsn), 0) FROM journal j WHERE j.node = c.node)",
            )
            .fetch_one(pool)
            .await
            .expect("read the cursors");
            row.get::<i64, _>(0) == 0
        },
    )
    .await;
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Best effort: a failed test leaves its database for a look; a passing one cleans up.
        if !std::thread::panicking() {
            let (host, port) = self.addr.rsplit_once(':').unwrap_or((&self.addr, "3306"));
            let _ = Command::new("mariadb")
                .args([
                    "-uroot",
                    &format!("-h{host}"),
                    &format!("-P{port}"),
                    "-e",
                    &format!("DROP DATABASE IF EXISTS {}", self.name),
                ])
                .output();
        }
    }
}

/// How many numbers are missing between the lowest and the highest of `column` in `table`, each
/// node's rows apart (each node's log numbers its own).
async fn gaps(pool: &sqlx::MySqlPool, table: &str, column: &str) -> i64 {
    let sql = format!(
        "SELECT CAST(COALESCE(SUM(missing), 0) AS SIGNED) FROM \
         (SELECT MAX({column}) - MIN({column}) + 1 - COUNT(*) AS missing FROM {table} GROUP BY node) per_node"
    );
    sqlx::query_scalar(&sql)
        .fetch_one(pool)
        .await
        .expect("count the gaps")
}

/// Each node's journal lsns in MySQL run without a gap.
pub async fn assert_no_lsn_gap(pool: &sqlx::MySqlPool, when: &str) {
    assert_eq!(
        gaps(pool, "journal", "lsn").await,
        0,
        "{when}: a gap in journal.lsn"
    );
}

/// Each node's journal lsns and outbox seqs in MySQL run without a gap.
pub async fn assert_no_gaps(pool: &sqlx::MySqlPool, when: &str) {
    assert_no_lsn_gap(pool, when).await;
    assert_eq!(
        gaps(pool, "outbox", "seq").await,
        0,
        "{when}: a gap in the event seqs"
    );
}

/// One checkout a [`Load`] sent, and how it was answered.
pub struct Sent {
    pub key: String,
    /// The request body (a retry sends it again).
    #[allow(dead_code)] // read by the MariaDB-restart tests, not by every test binary
    pub body: String,
    pub status: u16,
    /// The order the answer named ("" if none).
    pub order_id: String,
}

/// Checkouts from `clients` concurrent clients, each with a new key, one unit of `skus` in turn,
/// until [`Load::stop`] (or the server stops answering: a client whose request fails stops).
pub struct Load {
    counts: Arc<Mutex<std::collections::HashMap<u16, usize>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sent>>>,
}

impl Load {
    pub fn start(app: &TestApp, clients: usize, key_prefix: &str, skus: &[String]) -> Self {
        let counts = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|t| {
                let (counts, stop, mut client) =
                    (Arc::clone(&counts), Arc::clone(&stop), app.client());
                let (prefix, skus) = (key_prefix.to_owned(), skus.to_vec());
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    for n in 0..1_000_000usize {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("{prefix}-{t}-{n}");
                        let body = serde_json::json!({
                            "items": [{"sku": skus[(t + n) % skus.len()], "quantity": 1}],
                            "customer_id": "load",
                            "payment_token": "tok_ok",
                        })
                        .to_string();
                        let Ok(answer) = client
                            .try_send("POST", "/v1/checkout", &[("idempotency-key", &key)], &body)
                            .await
                        else {
                            break;
                        };
                        *lock(&counts).entry(answer.status).or_default() += 1;
                        // A polite client: told to come back (Redis or the database down), it
                        // waits a little instead of spinning.
                        if answer.status == 503 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let order_id = answer.json()["order_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        sent.push(Sent {
                            key,
                            body,
                            status: answer.status,
                            order_id,
                        });
                    }
                    sent
                })
            })
            .collect();
        Self {
            counts,
            stop,
            tasks,
        }
    }

    /// Answers so far with this status (`None`: all answers).
    pub fn answered(&self, status: Option<u16>) -> usize {
        let counts = lock(&self.counts);
        match status {
            Some(status) => counts.get(&status).copied().unwrap_or(0),
            None => counts.values().sum(),
        }
    }

    /// Stops the clients and returns every checkout they sent.
    pub async fn stop(self) -> Vec<Sent> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut sent = Vec::new();
        for task in self.tasks {
            sent.extend(task.await.expect("load task"));
        }
        sent
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The machine's RabbitMQ, as every RabbitMQ test reaches it.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One message a test queue received.
#[derive(Debug, Clone)]
pub struct Received {
    /// `message_id`, as a seq.
    pub seq: u64,
    pub routing_key: String,
    pub body: Value,
    pub content_type: String,
    pub persistent: bool,
    /// The `order_id` header.
    pub order_id_header: String,
}

/// A test's own exchange (and its default and dead-letter queues, as the server declares them)
/// plus a test queue bound to `#`, on the machine's RabbitMQ; [`TestBroker::delete`] removes them.
pub struct TestBroker {
    /// The broker's URL: the machine's, or a [`PrivateRabbitMq`]'s.
    pub url: String,
    pub exchange: String,
    pub queue: String,
    connection: lapin::Connection,
    channel: lapin::Channel,
    consumer: Option<lapin::Consumer>,
}

impl TestBroker {
    pub async fn create(name: &str) -> Self {
        Self::create_on(AMQP_URL, name).await
    }

    /// An exchange and a queue of the test's own on the broker at `url`. A broker still booting
    /// (it takes TCP connections and closes them until it is up: a private one just started) is
    /// asked again, for 60 s.
    pub async fn create_on(url: &str, name: &str) -> Self {
        let started = Instant::now();
        let connection = loop {
            match lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await {
                Ok(connection) => break connection,
                Err(e) if started.elapsed() > Duration::from_secs(60) => {
                    panic!("RabbitMQ at {url} is not reachable ({e}): start it with `rabbitmq-server -detached`")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let channel = connection.create_channel().await.expect("channel");
        let unique = format!(
            "test.{name}.{}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        turnstile::events::relay::declare_topology(&channel, &unique)
            .await
            .expect("declare the topology");
        let queue = format!("{unique}.test");
        channel
            .queue_declare(
                queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("declare the test queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                unique.as_str().into(),
                "#".into(),
                Default::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("bind the test queue");
        Self {
            url: url.to_owned(),
            exchange: unique,
            queue,
            connection,
            channel,
            consumer: None,
        }
    }

    /// A new connection (after the broker was restarted): the exchange and queues are durable.
    #[allow(dead_code)] // used by the RabbitMQ-restart test, not by every test binary
    pub async fn reconnect(&mut self) {
        self.connection =
            lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
                .await
                .expect("reconnect to RabbitMQ");
        self.channel = self.connection.create_channel().await.expect("channel");
        self.consumer = None;
    }

    /// The server options that publish to this exchange.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--amqp-url".into(),
            self.url.clone(),
            "--amqp-exchange".into(),
            self.exchange.clone(),
        ]
    }

    /// Receives (and acks) messages from the test queue until every seq in `1..=last_seq` has
    /// arrived at least once, for at most `limit`; returns them in arrival order.
    pub async fn receive_through(&mut self, last_seq: u64, limit: Duration) -> Vec<Received> {
        let received = self.receive_until(last_seq, limit).await;
        let seen: std::collections::HashSet<u64> = received
            .iter()
            .map(|r| r.seq)
            .filter(|&seq| seq <= last_seq)
            .collect();
        assert!(
            seen.len() as u64 >= last_seq,
            "timed out after {limit:?}: {} of the {last_seq} events reached the queue",
            seen.len()
        );
        received
    }

    /// As [`Self::receive_through`], but gives back what arrived when `limit` runs out instead
    /// of failing.
    pub async fn receive_until(&mut self, last_seq: u64, limit: Duration) -> Vec<Received> {
        use futures_util::StreamExt;
        if self.consumer.is_none() {
            self.consumer = Some(
                self.channel
                    .basic_consume(
                        self.queue.as_str().into(),
                        "test".into(),
                        lapin::options::BasicConsumeOptions {
                            no_ack: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await
                    .expect("consume the test queue"),
            );
        }
        let consumer = self.consumer.as_mut().expect("consumer");
        let mut received = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + limit;
        while (seen.len() as u64) < last_seq {
            let next = tokio::time::timeout_at(deadline, consumer.next()).await;
            let Ok(Some(delivery)) = next else {
                break;
            };
            let delivery = delivery.expect("delivery");
            let properties = &delivery.properties;
            let seq: u64 = properties
                .message_id()
                .as_ref()
                .expect("message_id")
                .as_str()
                .parse()
                .expect("numeric message_id");
            let order_id_header = properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("order_id").cloned())
                .map(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            if seq <= last_seq {
                seen.insert(seq);
            }
            received.push(Received {
                seq,
                routing_key: delivery.routing_key.to_string(),
                body: serde_json::from_slice(&delivery.data).expect("JSON body"),
                content_type: properties
                    .content_type()
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                persistent: *properties.delivery_mode() == Some(2),
                order_id_header,
            });
        }
        received
    }

    /// Receives (and acks) `count` messages from the test queue, for at most `limit`: each one's
    /// `message_id` as it is (several nodes': `<node>:<seq>`) and its JSON body.
    pub async fn receive_raw(&mut self, count: usize, limit: Duration) -> Vec<(String, Value)> {
        use futures_util::StreamExt;
        let mut consumer = self
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                "test-raw".into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("consume the test queue");
        let deadline = tokio::time::Instant::now() + limit;
        let mut received = Vec::new();
        while received.len() < count {
            let Ok(Some(delivery)) = tokio::time::timeout_at(deadline, consumer.next()).await
            else {
                panic!(
                    "timed out after {limit:?}: {} of {count} messages reached the queue",
                    received.len()
                );
            };
            let delivery = delivery.expect("delivery");
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default();
            received.push((
                id,
                serde_json::from_slice(&delivery.data).expect("JSON body"),
            ));
        }
        received
    }

    /// Removes the exchange and its queues.
    pub async fn delete(self) {
        let ch = &self.channel;
        for queue in [
            self.queue.clone(),
            format!("{}.all", self.exchange),
            format!("{}.dead", self.exchange),
            format!("{}.notify", self.exchange),
        ] {
            let _ = ch
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        for exchange in [self.exchange.clone(), format!("{}.dlx", self.exchange)] {
            let _ = ch
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// A gauge or counter's value in `/metrics`.
pub async fn metric(client: &mut Client, name: &str) -> f64 {
    let text = client.get("/metrics").await.body;
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Waits until the relay has every durable event confirmed.
pub async fn wait_confirmed(client: &mut Client) {
    eventually(
        "the relay to have every event confirmed",
        Duration::from_secs(60),
        async || metric(client, "turnstile_amqp_lag_events").await == 0.0,
    )
    .await;
}

/// Waits until the relay has every event confirmed, receives them all from the test queue and
/// checks them against the event log ([`check_messages`]).
pub async fn all_delivered(client: &mut Client, broker: &mut TestBroker) -> Vec<Received> {
    wait_confirmed(client).await;
    let events = client.all_events().await;
    let received = broker
        .receive_through(events.len() as u64, Duration::from_secs(60))
        .await;
    check_messages(&events, &received);
    received
}

/// Checks what the queue received against the event log: every event arrived (duplicates
/// allowed), each message as API.md fixes it, and in `seq` order once duplicates are dropped.
pub fn check_messages(events: &[Value], received: &[Received]) {
    let by_seq: std::collections::HashMap<u64, &Value> = events
        .iter()
        .map(|e| (e["seq"].as_u64().expect("seq"), e))
        .collect();
    let mut first_seen: Vec<u64> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for message in received {
        let event = by_seq
            .get(&message.seq)
            .unwrap_or_else(|| panic!("message {} is no event of the log", message.seq));
        assert_eq!(
            &message.body, *event,
            "the body is the event as GET /v1/events shows it"
        );
        assert_eq!(message.routing_key, event["type"].as_str().expect("type"));
        assert_eq!(message.content_type, "application/json");
        assert!(message.persistent, "persistent (delivery mode 2)");
        assert_eq!(
            message.order_id_header,
            event["order_id"].as_str().expect("order_id")
        );
        if seen.insert(message.seq) {
            first_seen.push(message.seq);
        }
    }
    let expected: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(
        first_seen, expected,
        "every event arrived, first in seq order"
    );
}

/// The machine's Redis, as every Redis test reaches it.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A test's own key prefix on the machine's Redis (or on a [`RedisCluster`] of the test's own);
/// its keys are deleted when it is dropped.
pub struct TestRedis {
    pub prefix: String,
    client: redis::Client,
    /// The cluster the keys live on, if any (stopped with this).
    cluster: Option<RedisCluster>,
}

impl TestRedis {
    pub async fn create(name: &str) -> Self {
        let client = redis::Client::open(REDIS_URL).expect("redis url");
        let test = Self {
            prefix: Self::prefix(name),
            client,
            cluster: None,
        };
        test.connection().await;
        test
    }

    /// A prefix on a Redis Cluster of 3 masters started for this test.
    pub async fn on_cluster(name: &str) -> Self {
        let cluster = RedisCluster::start();
        Self {
            prefix: Self::prefix(name),
            client: redis::Client::open(cluster.urls()[0].as_str()).expect("redis url"),
            cluster: Some(cluster),
        }
    }

    fn prefix(name: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("test:{name}:{}:{nanos}:", std::process::id())
    }

    /// A new connection (one made before a Redis restart would be broken); on a cluster, to its
    /// first node.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!("Redis at {REDIS_URL} is not reachable ({e}): start it with `redis-server --daemonize yes --port 6379 --save ''`")
            })
    }

    /// Where the keys live: the machine's Redis, or each node of the cluster.
    fn urls(&self) -> Vec<String> {
        match &self.cluster {
            Some(cluster) => cluster.urls(),
            None => vec![REDIS_URL.to_owned()],
        }
    }

    /// The server options that put its carts and locks under this prefix.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--redis-url".into(),
            self.urls().join(","),
            "--redis-prefix".into(),
            self.prefix.clone(),
        ]
    }

    /// Every key under the prefix, with its TTL in milliseconds (-1: none).
    pub async fn keys(&mut self) -> Vec<(String, i64)> {
        self.keys_per_server().await.into_iter().flatten().collect()
    }

    /// On a cluster: every master holds some key under the prefix (the keys spread over the
    /// slots); one server holds them all anyway.
    pub async fn assert_spread(&self) {
        for (url, keys) in self.urls().iter().zip(self.keys_per_server().await) {
            assert!(!keys.is_empty(), "no key under {} on {url}", self.prefix);
        }
    }

    /// The idempotency keys' Redis keys that hold a submission lock (`~...`), not an answer, on
    /// any server.
    pub async fn locks_left(&self) -> Vec<String> {
        let mut locks = Vec::new();
        for url in self.urls() {
            let client = redis::Client::open(url.as_str()).expect("redis url");
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("Redis at {url} is not reachable ({e})"));
            for (key, _) in self.keys_on(connection.clone()).await {
                if !key.contains(":key:") {
                    continue;
                }
                let value: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await
                    .unwrap_or(None);
                if value.is_some_and(|v| v.starts_with('~')) {
                    locks.push(key);
                }
            }
        }
        locks
    }

    /// The keys under the prefix on each server (each node of a cluster), in [`Self::urls`] order.
    async fn keys_per_server(&self) -> Vec<Vec<(String, i64)>> {
        let mut per_server = Vec::new();
        for url in self.urls() {
            let client = redis::Client::open(url.as_str()).expect("redis url");
            let connection = client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("Redis at {url} is not reachable ({e})"));
            per_server.push(self.keys_on(connection).await);
        }
        per_server
    }

    async fn keys_on(
        &self,
        mut connection: redis::aio::MultiplexedConnection,
    ) -> Vec<(String, i64)> {
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .expect("SCAN");
            for key in batch {
                let ttl: i64 = redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await
                    .expect("PTTL");
                keys.push((key, ttl));
            }
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }

    /// Waits until Redis holds the answer under idempotency key `key` (the finisher sends it
    /// after the commit, without making the client wait).
    pub async fn wait_answer(&self, key: &str, limit: Duration) {
        let answer_key = format!("{}key:{key}", self.prefix);
        wait_for_key(self.connection().await, &answer_key, limit).await;
    }

    /// Every key under the prefix has a TTL.
    pub async fn assert_every_key_expires(&mut self) {
        let keys = self.keys().await;
        assert!(!keys.is_empty(), "no key under {}", self.prefix);
        for (key, ttl) in keys {
            assert!(ttl > 0, "{key} has no TTL ({ttl})");
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        // Best effort, as the test databases: a failed test leaves its keys for a look (they
        // expire), a passing one deletes them. A test's own cluster goes with it.
        if self.cluster.is_some() || std::thread::panicking() {
            return;
        }
        let _ = Command::new("sh")
            .args([
                "-c",
                "redis-cli -u \"$1\" --scan --pattern \"$2*\" | xargs -r -n 500 redis-cli -u \"$1\" del",
                "delete-test-keys",
                REDIS_URL,
                &self.prefix,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Connections open to 127.0.0.1:`port` (their client ends: requests waiting on the gateway).
pub fn connections_to(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            "dst",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A free port on 127.0.0.1 (bound, then released for the process that takes it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A `redis-server` of the test's own (the installed binary, on a free port, nothing kept on
/// disk), so a test may kill and restart it without touching the machine's Redis. Killed when
/// dropped.
pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `requirepass`, when it has one.
    password: Option<String>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        Self::start_with_password(None)
    }

    /// One that asks every client for `password` (`requirepass`), when given.
    pub fn start_with_password(password: Option<&str>) -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            password: password.map(str::to_owned),
        };
        redis.restart();
        redis
    }

    /// Starts the server again on the same port (after [`Self::kill`]), and waits until it answers.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(
                self.password
                    .iter()
                    .flat_map(|password| ["--requirepass", password.as_str()]),
            )
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): install Redis (Debian's redis-server package)"
                )
            });
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        for _ in 0..500 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the test's redis-server did not answer on {addr}");
    }

    /// SIGKILL: Redis is gone at once, and with it everything it held.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// A connection to it.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("the test's redis-server")
    }

    /// Waits until it holds the answer under idempotency key `key` (default prefix).
    pub async fn wait_answer(&self, key: &str, limit: Duration) {
        let answer_key = format!("turnstile:key:{key}");
        wait_for_key(self.connection().await, &answer_key, limit).await;
    }
}

/// Waits until Redis (on `connection`) holds `key`.
async fn wait_for_key(
    mut connection: redis::aio::MultiplexedConnection,
    key: &str,
    limit: Duration,
) {
    // A key holds its checkout's lock (`~...`) until the answer replaces it.
    eventually("the answer in Redis", limit, async || {
        redis::cmd("GET")
            .arg(key)
            .query_async::<Option<String>>(&mut connection)
            .await
            .ok()
            .flatten()
            .is_some_and(|value| !value.starts_with('~'))
    })
    .await;
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of 3 masters the test starts from the installed `redis-server` (cluster mode,
/// its own ports and temp dir, nothing kept on disk) and joins with `redis-cli --cluster create`;
/// killed when dropped.
pub struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts and joins the cluster; a try that fails (a port picked free and taken before its
    /// node bound it, a node that exited) is killed and made again on fresh ports, three times.
    pub fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "the test's Redis Cluster did not start in 3 tries:\n{}",
            failures.join("\n")
        );
    }

    fn try_start() -> Result<Self, String> {
        // Killed on drop from the first node on, even if a later one fails to start.
        let mut cluster = Self {
            ports: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for _ in 0..3 {
            let (port, bus) = (free_port(), free_port());
            let own = cluster.dir.path().join(port.to_string());
            std::fs::create_dir_all(&own).expect("node dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-port", &bus.to_string()])
                .args(["--cluster-node-timeout", "5000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&own)
                .arg("--logfile")
                .arg(own.join("redis.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run redis-server ({e}): install Redis (Debian's redis-server package)")
                });
            cluster.ports.push(port);
            cluster.children.push(child);
        }
        // Each node answers PING as a cluster node of its own (not some other process that took
        // the port), and is still running.
        for (port, child) in cluster.ports.iter().zip(&mut cluster.children) {
            let started = Instant::now();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(cluster.failure(*port, &format!("exited ({status})")));
                }
                let info = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "CLUSTER", "MYID"])
                    .output()
                    .unwrap_or_else(|e| {
                        panic!("cannot run redis-cli ({e}): install Redis's tools")
                    });
                let id = String::from_utf8_lossy(&info.stdout);
                if info.status.success() && id.trim().len() == 40 {
                    break;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    return Err(cluster.failure(*port, "did not answer CLUSTER MYID in 10 s"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install Redis's tools"));
        if !created.status.success() {
            return Err(format!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            ));
        }
        // Every node sees every slot served before the test uses it.
        for node in &nodes {
            let started = Instant::now();
            loop {
                let info = Command::new("redis-cli")
                    .args(["-u", &format!("redis://{node}"), "CLUSTER", "INFO"])
                    .output()
                    .expect("redis-cli");
                let info = String::from_utf8_lossy(&info.stdout);
                if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                    break;
                }
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(format!(
                        "the test's Redis Cluster is not ok on {node}: {info}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// Why node `port` failed, with the end of its log.
    fn failure(&self, port: u16, what: &str) -> String {
        let log = std::fs::read_to_string(self.dir.path().join(port.to_string()).join("redis.log"))
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        format!(
            "cluster node 127.0.0.1:{port} {what}; its log ends: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }

    /// Its nodes, as `--redis-url` lists them.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP proxy the test controls, in front of a real server (MariaDB, say): while stalled it
/// keeps every connection open and forwards nothing either way, and takes new connections without
/// connecting them onward, as a network that went silent does (no reset, no error); resumed, it
/// forwards again what waited. [`StallProxy::abandon_open_connections`] leaves the connections
/// open now silent for ever (a peer that vanished without a reset), while new ones flow.
pub struct StallProxy {
    pub addr: SocketAddr,
    state: tokio::sync::watch::Sender<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy, Default)]
struct ProxyState {
    stalled: bool,
    /// Stall as soon as a client sends a `COMMIT` (before it is forwarded).
    stall_at_commit: bool,
    /// Hold the next `COMMIT` a client sends, and what follows it on that connection only.
    hold_next_commit: bool,
    /// Hold the next `COMMIT` of a transaction that sent these bytes (a table's name, say), as
    /// `hold_next_commit` does.
    hold_commit_after: Option<&'static [u8]>,
    /// The connection whose `COMMIT` is held, until released.
    holding: Option<u64>,
    /// Connections numbered below this are never forwarded again.
    dead_below: u64,
    /// The next connection's number.
    next: u64,
}

impl StallProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (state, watch) = tokio::sync::watch::channel(ProxyState::default());
        let numbers = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut number = 0;
                numbers.send_modify(|state| {
                    number = state.next;
                    state.next += 1;
                });
                let flowing = move |state: &ProxyState| {
                    !state.stalled && number >= state.dead_below && state.holding != Some(number)
                };
                let mut watch = watch.clone();
                let numbers = numbers.clone();
                tokio::spawn(async move {
                    if watch.wait_for(flowing).await.is_err() {
                        return;
                    }
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let dead = move |state: &ProxyState| number < state.dead_below;
                    let mut abandoned = watch.clone();
                    tokio::select! {
                        _ = async {
                            tokio::join!(
                                pump(&mut from_client, &mut to_server, watch.clone(), flowing, Some((number, &numbers))),
                                pump(&mut from_server, &mut to_client, watch.clone(), flowing, None),
                            )
                        } => return,
                        _ = abandoned.wait_for(dead) => {}
                    }
                    // Abandoned: the server sees its client gone (it rolls back what was not
                    // committed); the client's side stays open and silent until the proxy goes.
                    drop((from_server, to_server));
                    let _ = abandoned.wait_for(|_| false).await;
                    drop((from_client, to_client));
                });
            }
        });
        Self { addr, state, task }
    }

    /// Stops (`true`) or resumes (`false`) forwarding.
    pub fn stall(&self, stalled: bool) {
        self.state.send_modify(|state| state.stalled = stalled);
    }

    /// Holds the next `COMMIT` a client sends, and all that client sends after it on that
    /// connection, until [`Self::release_held`]; every other connection flows: a TCP flow whose
    /// segments wait out a retransmission while new flows get through. Released, the COMMIT
    /// reaches the server late (even if the client closed the connection meanwhile).
    pub fn hold_next_commit(&self) {
        self.state
            .send_modify(|state| state.hold_next_commit = true);
    }

    /// Holds the next `COMMIT` of a transaction that sent `bytes` (in a statement's text: the
    /// first use of a statement on its connection), as [`Self::hold_next_commit`] does.
    pub fn hold_commit_after(&self, bytes: &'static [u8]) {
        self.state
            .send_modify(|state| state.hold_commit_after = Some(bytes));
    }

    /// Whether a `COMMIT` is held now.
    pub fn holding(&self) -> bool {
        self.state.borrow().holding.is_some()
    }

    /// Lets the held `COMMIT` (and what followed it) through.
    pub fn release_held(&self) {
        self.state.send_modify(|state| state.holding = None);
    }

    /// From the next `COMMIT` a client sends on, the proxy is stalled (that `COMMIT` is not
    /// forwarded until it is resumed): a network that goes silent exactly while a commit is on
    /// its way.
    pub fn stall_at_commit(&self) {
        self.state.send_modify(|state| state.stall_at_commit = true);
    }

    /// The connections open now are cut from the server (which sees its client gone) and left open
    /// and silent for ever towards their client, as a peer that vanished without a reset; new
    /// ones are forwarded (once the proxy is not stalled).
    pub fn abandon_open_connections(&self) {
        self.state
            .send_modify(|state| state.dead_below = state.next);
    }
}

/// Copies `from` to `to`, reading only while `flowing` says so; from a client (`control` given), a
/// `COMMIT` may stall the proxy first.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut state: tokio::sync::watch::Receiver<ProxyState>,
    flowing: impl Fn(&ProxyState) -> bool + Copy,
    control: Option<(u64, &tokio::sync::watch::Sender<ProxyState>)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    // Whether the transaction on this connection sent the bytes `hold_commit_after` names.
    let mut sent_marked = false;
    loop {
        if state.wait_for(flowing).await.is_err() {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            // Stopped while waiting to read: stop reading until it flows again.
            _ = state.wait_for(|s| !flowing(s)) => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if let Some((number, control)) = control {
            let read = &buffer[..n];
            if let Some(marked) = control.borrow().hold_commit_after {
                sent_marked |= read.windows(marked.len()).any(|w| w == marked);
            }
            let commit = read.windows(6).any(|w| w.eq_ignore_ascii_case(b"COMMIT"));
            if commit {
                control.send_modify(|state| {
                    if state.stall_at_commit {
                        state.stalled = true;
                        state.stall_at_commit = false;
                    }
                    if state.hold_next_commit {
                        state.holding = Some(number);
                        state.hold_next_commit = false;
                    }
                    if sent_marked && state.hold_commit_after.is_some() {
                        state.holding = Some(number);
                        state.hold_commit_after = None;
                    }
                });
                sent_marked = false;
            }
        }
        // What was read before a stop is held until it flows again.
        if state.wait_for(flowing).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running `turnstile gateway-sim`.
pub struct Sim {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Sim {
    pub fn start(listen: &str, args: &[&str]) -> Sim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(["gateway-sim", "--listen", listen])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gateway-sim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("gateway-sim did not start: {line:?}"))
            .parse()
            .expect("address");
        Sim { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn signal(&self, signal: &str) {
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
    }

    pub async fn ledger(&self) -> Vec<Value> {
        let mut client = Client::new(self.addr);
        let ledger = client.get("/v1/ledger").await.json();
        ledger["payments"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts connections on `addr` (a server of the test's own starting), for
/// at most `limit`; panics naming `what` and the tail of `log`.
#[allow(dead_code)] // used by tests/faults.rs and tests/fault_suite.rs, not by every test binary
fn wait_answering(addr: &str, limit: Duration, what: &str, log: &Path) {
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if started.elapsed() > limit {
            let said = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = said.lines().rev().take(20).collect();
            panic!(
                "{what} did not answer on {addr} within {limit:?}; {} ends:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A MariaDB server of the test's own: the installed `mariadbd`, its data dir made by
/// `mariadb-install-db` in a temp dir, on a free port of 127.0.0.1, without grant checks (it
/// lives as long as the test and listens on loopback only). A test may stop, kill and start it
/// again without touching the machine's MariaDB; killed when dropped, also when the test fails.
#[allow(dead_code)] // used by tests/faults.rs and tests/fault_suite.rs, not by every test binary
pub struct PrivateMariaDb {
    pub addr: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

#[allow(dead_code)]
impl PrivateMariaDb {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Its own temporary dir: the bootstrap's temporary tables in the shared /tmp once went
        // missing under a concurrent run ("Could not remove temporary table", CI).
        std::fs::create_dir(dir.path().join("tmp")).expect("the server's tmpdir");
        let installed = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg(format!("--tmpdir={}", dir.path().join("tmp").display()))
            .args(["--user=root", "--skip-test-db", "--auth-root-authentication-method=normal"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run mariadb-install-db ({e}): install MariaDB (Debian's mariadb-server package)")
            });
        assert!(
            installed.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&installed.stderr)
        );
        let mut mariadb = Self {
            addr: format!("127.0.0.1:{}", free_port()),
            dir,
            child: None,
        };
        mariadb.start_again();
        mariadb
    }

    /// Starts the server (again) on its data dir and port, and waits until it answers.
    pub fn start_again(&mut self) {
        let dir = self.dir.path();
        let port = self.addr.rsplit(':').next().expect("port");
        let child = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--socket={}", dir.join("mariadb.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .args([&format!("--port={port}"), "--bind-address=127.0.0.1"])
            .args(["--user=root", "--skip-grant-tables", "--skip-name-resolve"])
            .args(["--innodb-buffer-pool-size=128M", "--max-connections=500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run /usr/sbin/mariadbd ({e}): install MariaDB"));
        self.child = Some(child);
        wait_answering(
            &self.addr,
            Duration::from_secs(60),
            "the test's mariadbd",
            &dir.join("error.log"),
        );
    }

    /// A clean shutdown (SIGTERM, as `mariadb-admin shutdown` would), waiting until it exited.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// SIGKILL: the server is gone at once, mid-transaction.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True while it accepts connections.
    pub async fn answers(&self) -> bool {
        tokio::net::TcpStream::connect(&self.addr).await.is_ok()
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// A RabbitMQ node of the test's own: the installed `rabbitmq-server` under a node name, ports and
/// directories of the test's (its own config file, so the machine's listener setting is not
/// read), so a test may stop, kill and start it without touching the machine's broker. Stopped
/// when dropped, also when the test fails.
#[allow(dead_code)] // used by tests/faults.rs and tests/fault_suite.rs, not by every test binary
pub struct PrivateRabbitMq {
    pub url: String,
    node: String,
    port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

#[allow(dead_code)]
impl PrivateRabbitMq {
    pub fn start() -> Self {
        Self::start_with_user("guest", "guest")
    }

    /// One whose user (made at its first start, with every permission on `/`) is `user` with
    /// `password`.
    pub fn start_with_user(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        for sub in ["log", "mnesia"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("broker dir");
        }
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.local = 127.0.0.1:{port}\ndefault_user = {user}\ndefault_pass = {password}\n"
            ),
        )
        .expect("broker config");
        std::fs::write(dir.path().join("enabled_plugins"), "").expect("plugins file");
        // The server script runs the broker as the `rabbitmq` user when started by root.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir.path())
            .output();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut broker = Self {
            url: format!("amqp://{user}:{password}@127.0.0.1:{port}/%2f"),
            node: format!("turnstile-test-{}-{nanos}@localhost", std::process::id()),
            port,
            dist_port: free_port(),
            dir,
            child: None,
        };
        broker.start_again();
        broker
    }

    /// Starts the broker (again) on its node name, ports and directories (its durable queues
    /// and persistent messages kept), and waits until it takes connections.
    pub fn start_again(&mut self) {
        let dir = self.dir.path();
        let child = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run rabbitmq-server ({e}): install RabbitMQ (Debian's rabbitmq-server package)")
            });
        self.child = Some(child);
        let log = dir.join("log").join(format!("{}.log", self.node));
        wait_answering(
            &format!("127.0.0.1:{}", self.port),
            Duration::from_secs(120),
            "the test's rabbitmq-server",
            &log,
        );
    }

    /// SIGKILL of the broker's Erlang VM: gone at once, its connections cut; waits until its
    /// port is closed.
    pub fn kill_9(&mut self) {
        let pid = std::fs::read_to_string(self.dir.path().join("rabbitmq.pid"))
            .expect("the broker's pid file");
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let addr = format!("127.0.0.1:{}", self.port);
        let started = Instant::now();
        while std::net::TcpStream::connect(&addr).is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the killed broker still answers"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `rabbitmqctl stop_app` / `start_app` on this node: the broker stops (or starts) serving,
    /// its Erlang node stays up. True when rabbitmqctl succeeded.
    pub fn ctl(&self, action: &str) -> bool {
        Command::new("rabbitmqctl")
            .args(["-n", &self.node, action])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for PrivateRabbitMq {
    fn drop(&mut self) {
        if self.child.is_some() && !self.ctl("stop") {
            if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("rabbitmq.pid")) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A tmpfs of its own, unmounted when dropped (the test runs as root, as CI does).
pub struct SmallDisk {
    pub mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(megabytes: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&mount)
            .status()
            .expect("run mount");
        assert!(
            mounted.success(),
            "this test mounts a small tmpfs to fill it up: run it as root (as CI does)"
        );
        Self { mount, _dir: dir }
    }

    /// Fills the disk up to about `leave` free bytes with a file of its own (or up to full,
    /// when a server writing beside it took some of that room meanwhile).
    pub fn fill(&self, leave: u64) -> PathBuf {
        use std::io::Write;
        let filler = self.mount.join("filler");
        let free = free_bytes(&self.mount);
        let mut left = free.saturating_sub(leave);
        let mut file = std::fs::File::create(&filler).expect("the filler file");
        let chunk = vec![0xAAu8; 1 << 20];
        while left > 0 {
            let part = &chunk[..chunk.len().min(left as usize)];
            match file.write(part) {
                Ok(0) => break,
                Ok(written) => left -= written as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("fill the disk: {e}"),
            }
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

pub fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

/// The options that put a server on the gateway at `gateway_url`, with short timeouts and a
/// reconciler that acts after 3 s.
pub fn server_args(gateway_url: &str) -> Vec<String> {
    [
        "--gateway-url",
        gateway_url,
        "--gateway-timeout",
        "1s",
        "--journal-timeout",
        "1s",
        "--reconcile-after",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
