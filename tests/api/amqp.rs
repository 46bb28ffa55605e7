//! RabbitMQ: every event of the journal reaches the broker, in `seq` order, with publisher
//! confirms; a `kill -9` loses none; `turnstile notify` writes exactly one line per paid order
//! across a kill. Against the machine's RabbitMQ, each test with its own exchange and queues.

use crate::helpers::{
    all_delivered, eventually, metric, spawn_app, start, wait_confirmed, JsonBody, Load, TestApp,
    TestBroker, AMQP_URL,
};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_checkouts_give_one_order_paid_per_paid_order_in_journal_order() {
    // Proves: the relay publishes every event, in seq order, with the contract's properties; after
    // dropping duplicates by message_id, each paid order has exactly one order.paid.
    let mut broker = TestBroker::create("two_thousand").await;
    let app = spawn_app(&strs(&broker.args()));
    let mut client = app.client();
    client.put_product("A", 500, 100_000).await;
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let mut client = app.client();
            tokio::spawn(async move {
                let mut paid = Vec::new();
                for n in 0..125 {
                    // One in ten declined: released orders emit events too.
                    let token = if n % 10 == 0 { "tok_decline" } else { "tok_ok" };
                    let answer = client
                        .checkout(&format!("k-{t}-{n}"), "A", 1, token)
                        .await
                        .expect("answer");
                    if answer.status == 201 {
                        paid.push(answer.json()["order_id"].as_str().expect("id").to_owned());
                    } else {
                        assert_eq!(
                            answer.status,
                            402,
                            "{}",
                            String::from_utf8_lossy(&answer.body)
                        );
                    }
                }
                paid
            })
        })
        .collect();
    let mut paid = HashSet::new();
    for task in tasks {
        paid.extend(task.await.expect("task"));
    }
    assert_eq!(
        paid.len(),
        16 * 112,
        "13 of each client's 125 were declined"
    );
    let received = all_delivered(&mut client, &mut broker).await;
    let mut paid_messages: HashMap<String, usize> = HashMap::new();
    let mut seen = HashSet::new();
    for message in received.iter().filter(|m| seen.insert(m.seq)) {
        if message.routing_key == "order.paid" {
            *paid_messages
                .entry(message.order_id_header.clone())
                .or_default() += 1;
        }
    }
    assert_eq!(paid_messages.len(), paid.len());
    assert!(paid_messages
        .iter()
        .all(|(id, n)| *n == 1 && paid.contains(id)));
    // The default queue got them too (no message is unroutable).
    assert_eq!(
        metric(&mut client, "turnstile_amqp_returns_total").await,
        0.0
    );
    assert_eq!(metric(&mut client, "turnstile_amqp_nacks_total").await, 0.0);
    assert_eq!(client.get("/readyz").await.json()["checks"]["amqp"], "ok");
    broker.delete().await;
}

/// Events the broker has not confirmed wait in the journal (`journal` args: the embedded
/// default, or MySQL) across a kill -9: first with the broker unreachable (nothing sent), then
/// mid-stream under load; after the restart every event arrives (duplicates allowed, losses not).
async fn events_unsent_at_a_kill_9_are_sent_after_the_restart(name: &str, journal: &[String]) {
    let mut broker = TestBroker::create(name).await;
    let mut unreachable: Vec<String> = [
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--amqp-exchange",
        &broker.exchange,
    ]
    .map(str::to_owned)
    .to_vec();
    unreachable.extend_from_slice(journal);
    let mut app = spawn_app(&strs(&unreachable));
    let mut client = app.client();
    client.put_product("A", 500, 1_000_000).await;
    for n in 0..200 {
        let answer = client
            .checkout(&format!("k-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201);
    }
    // The broker is away: the node stays ready and says why.
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert!(ready.json()["checks"]["amqp"]
        .as_str()
        .expect("amqp")
        .contains("wait"));
    assert!(metric(&mut client, "turnstile_amqp_lag_events").await >= 400.0);
    app.kill_9();
    let (data_dir, dir) = app.into_parts();
    // Back with the broker, under load, and killed again mid-stream.
    let mut args = broker.args();
    args.extend_from_slice(journal);
    let mut app = start(&data_dir, &strs(&args));
    let load = Load::start(&app, 8, "load", &["A".to_owned()]);
    let mut client = app.client();
    eventually(
        "some events confirmed",
        Duration::from_secs(30),
        async || metric(&mut client, "turnstile_amqp_confirmed_seq").await > 400.0,
    )
    .await;
    // The load goes on: events are in flight, confirmed and not, when the kill lands.
    app.kill_9();
    let _ = load.stop().await;
    let app = start(&data_dir, &strs(&args));
    let mut client = app.client();
    all_delivered(&mut client, &mut broker).await;
    drop(app);
    drop(dir);
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_with_events_unsent_sends_them_after_the_restart() {
    events_unsent_at_a_kill_9_are_sent_after_the_restart("kill_9", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_mysql_as_the_journal_a_kill_9_with_events_unsent_loses_none() {
    let database = crate::helpers::TestDatabase::create().await;
    let journal = ["--mysql-url".to_owned(), database.url.clone()];
    events_unsent_at_a_kill_9_are_sent_after_the_restart("mysql_kill", &journal).await;
}

/// A `turnstile notify` process writing to `out` with its state in `state`.
fn notify(
    broker: &TestBroker,
    queue: &str,
    out: &std::path::Path,
    state: &std::path::Path,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args([
            "notify",
            "--amqp-url",
            AMQP_URL,
            "--amqp-exchange",
            &broker.exchange,
            "--queue",
            queue,
        ])
        .arg("--out")
        .arg(out)
        .arg("--state")
        .arg(state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start turnstile notify")
}

/// The messages ready in `queue`, or `None` if it does not exist (a passive declare).
async fn queue_messages(queue: &str) -> Option<u32> {
    let connection = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let count = channel
        .queue_declare(queue.into(), passive, Default::default())
        .await
        .ok()
        .map(|q| q.message_count());
    let _ = connection.close(200, "".into()).await;
    count
}

/// Declares notify's queue and its binding as notify does (idempotent, the same arguments), so it
/// exists and is bound before the first event is published, whenever notify gets to it.
async fn declare_notify_queue(broker: &TestBroker, queue: &str, max_attempts: u32) {
    let connection = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    turnstile::events::notify::declare_queue(&channel, &broker.exchange, queue, max_attempts)
        .await
        .expect("declare notify's queue");
    let _ = connection.close(200, "".into()).await;
}

/// The complete lines of notify's output (a line being appended right now, its newline not yet
/// written, is not one yet).
fn lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Runs `turnstile notify` beside a load of paid checkouts, kills it with -9 `kills` times (each
/// time once its output has grown by another 20 lines, so the kills land at varied steps:
/// writing, fsyncing, acking), then lets a last run finish, and checks exactly one line per paid
/// order, with the contract's fields, and a state that matches the output.
async fn exactly_one_line_per_paid_order_across_kills(name: &str, kills: usize) {
    let broker = TestBroker::create(name).await;
    let queue = format!("{}.notify", broker.exchange);
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, state) = (dir.path().join("out.jsonl"), dir.path().join("state"));
    // The queue exists and is bound before the first event is published.
    declare_notify_queue(&broker, &queue, 5).await;
    let mut consumer = notify(&broker, &queue, &out, &state);
    let app: TestApp = spawn_app(&strs(&broker.args()));
    let mut client = app.client();
    client.put_product("A", 700, 1_000_000).await;
    let load = Load::start(&app, 8, "n", &["A".to_owned()]);
    for round in 1..=kills {
        eventually("more lines written", Duration::from_secs(30), async || {
            lines(&out).len() >= 20 * round
        })
        .await;
        let _ = consumer.kill();
        let _ = consumer.wait();
        consumer = notify(&broker, &queue, &out, &state);
    }
    let sent = load.stop().await;
    let paid: HashSet<&str> = sent
        .iter()
        .filter(|s| s.status == 201)
        .map(|s| s.order_id.as_str())
        .collect();
    wait_confirmed(&mut client).await;
    eventually(
        "a line for every paid order",
        Duration::from_secs(60),
        async || lines(&out).len() >= paid.len(),
    )
    .await;
    // Everything delivered has been taken: a duplicate would have been written by now.
    eventually(
        "notify's queue drained",
        Duration::from_secs(30),
        async || queue_messages(&queue).await == Some(0),
    )
    .await;
    let _ = Command::new("kill").arg(consumer.id().to_string()).status();
    let _ = consumer.wait();
    let written = lines(&out);
    let mut per_order: HashMap<&str, usize> = HashMap::new();
    for line in &written {
        *per_order
            .entry(line["order_id"].as_str().expect("order_id"))
            .or_default() += 1;
        for field in ["customer_id", "total_cents", "currency", "items", "paid_at"] {
            assert!(!line[field].is_null(), "{field} in {line}");
        }
        assert_eq!(line["total_cents"], 700);
        assert_eq!(line["items"][0]["sku"], "A");
    }
    let repeated: Vec<_> = per_order.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "repeated: {repeated:?}");
    assert_eq!(per_order.len(), paid.len(), "one line per paid order");
    assert!(
        per_order.keys().all(|id| paid.contains(id)),
        "only paid orders"
    );
    let state_text = std::fs::read_to_string(&state).expect("state");
    let last_len: u64 = state_text
        .lines()
        .last()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|n| n.parse().ok())
        .expect("a state line");
    assert_eq!(last_len, std::fs::metadata(&out).expect("out").len());
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_killed_mid_stream_writes_exactly_one_line_per_paid_order() {
    // Proves: with at-least-once delivery, a kill -9 of the consumer mid-stream and a restart,
    // every paid order has exactly one line, with the contract's fields.
    exactly_one_line_per_paid_order_across_kills("notify", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nacked_message_is_republished_and_never_counted_as_delivered() {
    // Proves: the cursor moves only on the broker's Ack. A queue that rejects every publish
    // (x-max-length 0, reject-publish) makes RabbitMQ nack: nothing counts as delivered, the
    // node stays ready and says why; once the queue goes, every event arrives.
    let mut broker = TestBroker::create("nack").await;
    let full = format!("{}.full", broker.exchange);
    let connection = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut rejecting = lapin::types::FieldTable::default();
    rejecting.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(0),
    );
    rejecting.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(full.as_str().into(), Default::default(), rejecting)
        .await
        .expect("declare the rejecting queue");
    channel
        .queue_bind(
            full.as_str().into(),
            broker.exchange.as_str().into(),
            "#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("bind it");
    let app = spawn_app(&strs(&broker.args()));
    let mut client = app.client();
    client.put_product("A", 500, 100).await;
    for n in 0..5 {
        let answer = client
            .checkout(&format!("k-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201);
    }
    eventually("the broker to nack", Duration::from_secs(30), async || {
        metric(&mut client, "turnstile_amqp_nacks_total").await > 0.0
    })
    .await;
    assert_eq!(
        metric(&mut client, "turnstile_amqp_confirmed_seq").await,
        0.0
    );
    assert_eq!(metric(&mut client, "turnstile_amqp_lag_events").await, 10.0);
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200, "the broker is not on the checkout path");
    channel
        .queue_delete(full.as_str().into(), Default::default())
        .await
        .expect("delete the rejecting queue");
    let _ = connection.close(200, "".into()).await;
    all_delivered(&mut client, &mut broker).await;
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_budget_of_unconfirmed_events_checkouts_stop_and_nothing_is_dropped() {
    // Proves: with the broker away, events wait; at --amqp-unconfirmed-max the node refuses new
    // checkouts (503 overloaded, /readyz 503 saying why) instead of dropping an event, and the
    // refused checkout changes nothing.
    let app = spawn_app(&[
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--amqp-unconfirmed-max",
        "10",
    ]);
    let mut client = app.client();
    client.put_product("A", 500, 100).await;
    for n in 0..5 {
        let answer = client
            .checkout(&format!("k-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201);
    }
    let refused = client
        .checkout("k-over", "A", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "overloaded");
    assert_eq!(client.stock("A").await, (100, 95, 0, 5));
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.json()["checks"]["amqp"]
            .as_str()
            .expect("amqp")
            .contains("--amqp-unconfirmed-max"),
        "{}",
        ready.json()
    );
    assert_eq!(client.all_events().await.len(), 10, "every event kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_mysql_as_the_journal_the_outbox_reaches_rabbitmq() {
    // Proves: the relay reads MySQL's outbox (its cursor in outbox_cursor) and delivers every
    // event, in seq order.
    let database = crate::helpers::TestDatabase::create().await;
    let mut broker = TestBroker::create("mysql").await;
    let mut args = broker.args();
    args.extend(["--mysql-url".to_owned(), database.url.clone()]);
    let app = spawn_app(&strs(&args));
    let mut client = app.client();
    client.put_product("A", 500, 1_000).await;
    for n in 0..100 {
        let token = if n % 5 == 0 { "tok_decline" } else { "tok_ok" };
        client
            .checkout(&format!("k-{n}"), "A", 1, token)
            .await
            .expect("answer");
    }
    all_delivered(&mut client, &mut broker).await;
    let pool = database.pool().await;
    let cursor: i64 =
        sqlx::query_scalar("SELECT published_seq FROM outbox_cursor WHERE relay = 'amqp'")
            .fetch_one(&pool)
            .await
            .expect("the relay's cursor");
    assert!(cursor > 0);
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_sends_poison_to_the_dead_letter_queue_after_max_attempts_and_goes_on() {
    poison_after(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_max_attempts_1_poison_goes_to_the_dead_letter_queue_at_once() {
    poison_after(1).await;
}

async fn poison_after(attempts: u32) {
    // Proves: a message without message_id, one with a non-JSON body and one with a non-numeric
    // message_id each reach <exchange>.dead after --max-attempts deliveries, get no line, and do
    // not stop the valid message behind them.
    let broker = TestBroker::create("poison").await;
    let queue = format!("{}.notify", broker.exchange);
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, state) = (dir.path().join("out.jsonl"), dir.path().join("state"));
    declare_notify_queue(&broker, &queue, attempts).await;
    let mut consumer = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args([
            "notify",
            "--amqp-url",
            AMQP_URL,
            "--amqp-exchange",
            &broker.exchange,
            "--queue",
            &queue,
            "--max-attempts",
            &attempts.to_string(),
        ])
        .arg("--out")
        .arg(&out)
        .arg("--state")
        .arg(&state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start turnstile notify");
    let connection = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let valid = br#"{"seq":7,"type":"order.paid","order_id":"ord_1","at":"2026-01-01T00:00:00.000Z","data":{"status":"paid","total_cents":5,"currency":"EUR","customer_id":"c1","items":[{"sku":"A","qty":1}]}}"#;
    let props = lapin::BasicProperties::default;
    for (body, properties) in [
        (&valid[..], props()),
        (&b"not json"[..], props().with_message_id("5".into())),
        (&valid[..], props().with_message_id("seven".into())),
        (&valid[..], props().with_message_id("7".into())),
    ] {
        channel
            .basic_publish(
                broker.exchange.as_str().into(),
                "order.paid".into(),
                Default::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let dead = format!("{}.dead", broker.exchange);
    eventually("3 dead letters", Duration::from_secs(30), async || {
        let probe = connection.create_channel().await.expect("channel");
        probe
            .queue_declare(dead.as_str().into(), passive, Default::default())
            .await
            .map(|q| q.message_count())
            .unwrap_or(0)
            >= 3
    })
    .await;
    eventually("the valid line", Duration::from_secs(20), async || {
        lines(&out).len() == 1
    })
    .await;
    // The poison is in the dead-letter queue by now: nothing more can be written.
    let written = lines(&out);
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0]["order_id"], "ord_1");
    let _ = Command::new("kill").arg(consumer.id().to_string()).status();
    let _ = consumer.wait();
    let _ = connection.close(200, "".into()).await;
    broker.delete().await;
}

/// A TCP proxy to RabbitMQ whose connections can be made to hang (bytes stop flowing both ways,
/// the sockets stay open): a broker that hangs. Connections made after [`HangingProxy::hang`]
/// flow again.
struct HangingProxy {
    port: u16,
    /// Connections numbered below this one hang.
    hang_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HangingProxy {
    async fn start() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hang_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (hang, counter) = (Arc::clone(&hang_below), Arc::clone(&next));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = counter.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                for (mut from, mut to) in [(cr, uw), (ur, cw)].map(|(r, w)| {
                    (
                        Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        w,
                    )
                }) {
                    let hang = Arc::clone(&hang);
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let Ok(n) = from.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            while number < hang.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self {
            port,
            hang_below,
            next,
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Every connection made so far hangs from now on.
    fn hang(&self) {
        use std::sync::atomic::Ordering;
        self.hang_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_that_hangs_neither_stalls_the_relay_for_long_nor_the_shutdown() {
    // Proves: when the broker's connection hangs (no answer, no close), the relay gives up on
    // the unanswered confirms, says so in /readyz and reconnects, so the events written meanwhile
    // arrive soon after a new connection works; checkouts go on; SIGTERM stays bounded.
    let mut broker = TestBroker::create("hang").await;
    let proxy = HangingProxy::start().await;
    let url = proxy.url();
    let mut app = spawn_app(&["--amqp-url", &url, "--amqp-exchange", &broker.exchange]);
    let mut client = app.client();
    client.put_product("A", 500, 1_000).await;
    for n in 0..5 {
        let answer = client
            .checkout(&format!("a-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201);
    }
    wait_confirmed(&mut client).await;
    proxy.hang();
    for n in 0..5 {
        let answer = client
            .checkout(&format!("b-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201, "the broker is not on the checkout path");
    }
    // The proxy passes new connections: a relay that notices the hang delivers within seconds
    // (not after the 60 s heartbeat, or never).
    eventually(
        "the events written during the hang to be confirmed",
        Duration::from_secs(30),
        async || metric(&mut client, "turnstile_amqp_lag_events").await == 0.0,
    )
    .await;
    all_delivered(&mut client, &mut broker).await;
    // Hang again, with events in flight, then SIGTERM: the node stops within its bounds.
    proxy.hang();
    for n in 0..5 {
        let answer = client
            .checkout(&format!("c-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201);
    }
    let started = std::time::Instant::now();
    app.send_sigterm();
    let pid = app.pid();
    let (done, stopped) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = app.wait();
        let _ = done.send(status);
    });
    let status = stopped.recv_timeout(Duration::from_secs(20));
    if status.is_err() {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let _ = waiter.join();
    assert!(
        status.is_ok(),
        "SIGTERM with a hanging broker did not stop the node within 20 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_killed_ten_times_under_load_writes_exactly_one_line_per_paid_order() {
    // Proves: kill -9 of notify at varied steps (writing, fsyncing, acking), ten times under
    // load, then a clean run: exactly one line per paid order, and the state matches the output.
    exactly_one_line_per_paid_order_across_kills("notify_kills", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_cursor_ahead_of_the_journal_is_refused_not_a_silent_loss() {
    // Proves: an amqp.cursor past the journal's last event (a data dir restored from a backup
    // older than the cursor, a cursor copied from another node) would make the relay skip every
    // new event up to it; the server refuses to start and says why.
    let broker = TestBroker::create("cursor_ahead").await;
    let mut app = spawn_app(&strs(&broker.args()));
    let mut client = app.client();
    client.put_product("A", 500, 100).await;
    for n in 0..3 {
        let answer = client
            .checkout(&format!("k-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201);
    }
    wait_confirmed(&mut client).await;
    assert!(app.terminate().success());
    let (data_dir, dir) = app.into_parts();
    std::fs::write(data_dir.join("amqp.cursor"), "1000\n").expect("cursor");
    let output = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .args(strs(&broker.args()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let pid = output.id();
    let (done, finished) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = done.send(output.wait_with_output());
    });
    let result = finished.recv_timeout(Duration::from_secs(15));
    if result.is_err() {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let _ = waiter.join();
    let output = result
        .expect("the server started with a cursor past its journal")
        .expect("output");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("amqp.cursor"), "{stderr}");
    drop(dir);
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unroutable_messages_are_returned_republished_and_never_counted_as_delivered() {
    // Proves: with every queue of the exchange deleted, a published event is returned; the relay
    // does not count it, declares its topology again and republishes, so the default queue gets
    // every event.
    let broker = TestBroker::create("returned").await;
    let app = spawn_app(&strs(&broker.args()));
    let mut client = app.client();
    client.put_product("A", 500, 100).await;
    wait_confirmed(&mut client).await;
    let connection = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let all = format!("{}.all", broker.exchange);
    for queue in [all.clone(), broker.queue.clone()] {
        channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .expect("delete");
    }
    for n in 0..3 {
        let answer = client
            .checkout(&format!("k-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201);
    }
    wait_confirmed(&mut client).await;
    let returns = metric(&mut client, "turnstile_amqp_returns_total").await;
    let reconnects = metric(&mut client, "turnstile_amqp_reconnects_total").await;
    let events = client.all_events().await.len() as u32;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let count = channel
        .queue_declare(all.as_str().into(), passive, Default::default())
        .await
        .expect("the default queue, declared again")
        .message_count();
    assert!(
        count >= events,
        "{count} messages for {events} events (returns {returns}, reconnects {reconnects})"
    );
    // (returns is not asserted: RabbitMQ sometimes still routes the first publish right after the
    // delete; what matters is that nothing unroutable counts as delivered.)
    let _ = connection.close(200, "".into()).await;
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_on_a_queue_declared_with_other_settings_stops_with_a_clear_error() {
    // Proves: another --max-attempts than the queue was declared with cannot work (RabbitMQ
    // refuses the new x-delivery-limit); notify says so and exits 1 instead of retrying forever.
    let broker = TestBroker::create("notify_settings").await;
    let queue = format!("{}.notify", broker.exchange);
    let connection = lapin::Connection::connect(AMQP_URL, Default::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    turnstile::events::notify::declare_queue(&channel, &broker.exchange, &queue, 5)
        .await
        .expect("declare the queue with --max-attempts 5");
    let _ = connection.close(200, "".into()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnstile"))
        .args([
            "notify",
            "--amqp-url",
            AMQP_URL,
            "--amqp-exchange",
            &broker.exchange,
        ])
        .args(["--queue", &queue, "--max-attempts", "3"])
        .arg("--state")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start turnstile notify");
    eventually("notify to exit", Duration::from_secs(30), async || {
        matches!(child.try_wait(), Ok(Some(_)))
    })
    .await;
    let output = child.wait_with_output().expect("output");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&queue) && stderr.contains("other settings"),
        "{stderr}"
    );
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_write_behind_the_relay_follows_the_embedded_journal() {
    // Proves: with --mysql-write-behind the relay reads the embedded journal (its cursor in the
    // data dir) and delivers every event, across a kill -9 and a restart.
    let database = crate::helpers::TestDatabase::create().await;
    let mut broker = TestBroker::create("write_behind").await;
    let mut args = broker.args();
    args.extend([
        "--mysql-url".to_owned(),
        database.url.clone(),
        "--mysql-write-behind".to_owned(),
    ]);
    let mut app = spawn_app(&strs(&args));
    let mut client = app.client();
    client.put_product("A", 500, 1_000).await;
    for n in 0..100 {
        let answer = client
            .checkout(&format!("k-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(answer.status, 201);
    }
    app.kill_9();
    let (data_dir, dir) = app.into_parts();
    let app = start(&data_dir, &strs(&args));
    let mut client = app.client();
    all_delivered(&mut client, &mut broker).await;
    assert!(data_dir
        .join(turnstile::events::relay::CURSOR_FILE)
        .exists());
    drop(app);
    drop(dir);
    broker.delete().await;
}
