//! The per-core runtime under attack: stock, idempotency and the connection bound across workers,
//! SIGTERM and kill -9, more workers than cores, unpinned, and one CPU for the whole process.

use crate::helpers::{eventually, metric, start_with_env, Client, JsonBody};
use std::net::SocketAddr;
use std::time::Duration;

/// A bound on waits that would otherwise hang a failing test; never reached by a passing one.
const HANG: Duration = Duration::from_secs(30);

/// `buyers` connections at once, each one checkout of `quantity(i)` units of `sku`: the ids and
/// quantities of the 201s; every other answer must be a 409 out_of_stock.
async fn rush(
    addr: SocketAddr,
    sku: &str,
    buyers: usize,
    quantity: fn(usize) -> i64,
) -> Vec<(String, i64)> {
    let tasks: Vec<_> = (0..buyers)
        .map(|i| {
            let sku = sku.to_owned();
            tokio::spawn(async move {
                let mut client = Client::new(addr);
                let q = quantity(i);
                let answer = client
                    .checkout(&format!("rush-{sku}-{i}"), &sku, q, "tok_ok")
                    .await
                    .expect("an answer");
                match answer.status {
                    201 => Some((
                        answer.json()["order_id"]
                            .as_str()
                            .expect("order_id")
                            .to_owned(),
                        q,
                    )),
                    409 => {
                        assert_eq!(answer.json()["error"], "out_of_stock", "{}", answer.json());
                        None
                    }
                    other => panic!("{other}: {}", String::from_utf8_lossy(&answer.body)),
                }
            })
        })
        .collect();
    let mut placed = Vec::new();
    for task in tasks {
        placed.extend(task.await.expect("task"));
    }
    placed
}

async fn assert_orders_exist(client: &mut Client, placed: &[(String, i64)]) {
    for (id, _) in placed {
        let order = client.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(order.status, 200, "{id}");
    }
}

async fn stock_is_conserved(args: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = start_with_env(&dir.path().join("data"), args, &[]);
    let mut client = app.client();
    // One unit each: every unit must go, since nobody asks for more than what is left.
    assert_eq!(client.put_product("ONE", 100, 37).await.status, 200);
    let placed = rush(app.addr, "ONE", 300, |_| 1).await;
    assert_eq!(placed.len(), 37, "{args:?}: exactly the stock is sold");
    assert_eq!(client.stock("ONE").await, (37, 0, 0, 37), "{args:?}");
    assert_orders_exist(&mut client, &placed).await;
    // One to three units each: never more than the stock, sold is the sum of the 201s.
    assert_eq!(client.put_product("MIX", 100, 37).await.status, 200);
    let placed = rush(app.addr, "MIX", 300, |i| (i % 3) as i64 + 1).await;
    let units: i64 = placed.iter().map(|(_, q)| q).sum();
    let (stock, available, reserved, sold) = client.stock("MIX").await;
    assert_eq!((stock, reserved, sold), (37, 0, units), "{args:?}");
    assert!(available < 3 && units <= 37, "{args:?}: {available} left");
    // A 1-unit buyer after the rush takes the rest, one by one, then is refused.
    for n in 0..available {
        let answer = client
            .checkout(&format!("tail-{n}"), "MIX", 1, "tok_ok")
            .await;
        assert_eq!(answer.expect("answer").status, 201, "{args:?}");
    }
    let refused = client.checkout("tail-last", "MIX", 1, "tok_ok").await;
    assert_eq!(refused.expect("answer").status, 409);
    assert_eq!(client.stock("MIX").await, (37, 0, 0, 37), "{args:?}");
    assert_orders_exist(&mut client, &placed).await;
    let log = app.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_stock_is_conserved_across_two_workers() {
    stock_is_conserved(&["--runtime", "per-core", "--workers", "2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_stock_is_conserved_with_more_workers_than_cores_unpinned() {
    stock_is_conserved(&["--runtime", "per-core", "--workers", "5"]).await;
    stock_is_conserved(&["--runtime", "per-core", "--workers", "5", "--no-pin"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_sku_drained_through_one_worker_steals_the_other_workers_units() {
    // Proves: one connection (one worker) sells every unit of a SKU whose stock is split over
    // the workers' shards, and a quantity larger than its own shard holds is collected from the
    // others'.
    let dir = tempfile::tempdir().expect("tempdir");
    let app = start_with_env(
        &dir.path().join("data"),
        &["--runtime", "per-core", "--workers", "5"],
        &[],
    );
    let mut client = app.client();
    assert_eq!(client.put_product("HOT", 100, 11).await.status, 200);
    // 11 over 5 shards: 3,2,2,2,2. Nine units at once span at least four of them.
    let big = client
        .checkout("big", "HOT", 9, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(big.status, 201, "{}", String::from_utf8_lossy(&big.body));
    for n in 0..2 {
        let answer = client
            .checkout(&format!("one-{n}"), "HOT", 1, "tok_ok")
            .await;
        assert_eq!(answer.expect("answer").status, 201);
    }
    let refused = client
        .checkout("none", "HOT", 1, "tok_ok")
        .await
        .expect("answer");
    assert_eq!(refused.status, 409);
    assert_eq!(client.stock("HOT").await, (11, 0, 0, 11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_on_many_connections_is_one_order() {
    // Proves: the same key sent at once on 64 connections (spread over the workers) makes one
    // order; every answer that names an order names that one, and replays are identical.
    let dir = tempfile::tempdir().expect("tempdir");
    let app = start_with_env(
        &dir.path().join("data"),
        &["--runtime", "per-core", "--workers", "2"],
        &[],
    );
    let mut client = app.client();
    assert_eq!(client.put_product("IDEM", 100, 1_000).await.status, 200);
    let addr = app.addr;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::new(addr);
                client
                    .checkout("the-one-key", "IDEM", 2, "tok_ok")
                    .await
                    .expect("an answer")
            })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for task in tasks {
        let answer = task.await.expect("task");
        match answer.status {
            201 => {
                ids.insert(answer.json()["order_id"].as_str().expect("id").to_owned());
            }
            // A duplicate still being worked on may be told so; never a second order.
            409 | 429 => {}
            other => panic!("{other}: {}", String::from_utf8_lossy(&answer.body)),
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let (_, _, reserved, sold) = client.stock("IDEM").await;
    assert_eq!(reserved + sold, 2);
    let first = client
        .checkout("the-one-key", "IDEM", 2, "tok_ok")
        .await
        .expect("replay");
    let second = Client::new(addr)
        .checkout("the-one-key", "IDEM", 2, "tok_ok")
        .await
        .expect("replay");
    assert_eq!(first.status, 201);
    assert_eq!(first.body, second.body);
    assert_eq!(
        first.json()["order_id"].as_str(),
        ids.iter().next().map(String::as_str)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_on_per_core_keeps_every_201() {
    // Proves: SIGKILL in the middle of a checkout load on the per-core runtime (two workers,
    // whatever TURNSTILE_RUNTIME says) loses no order that was answered, with the checks of
    // `crash::kill_9_mid_load`: every 201/202 there after the restart, replays identical, and no
    // stock held by an order no answer named.
    crate::crash::kill_9_mid_load(&["--runtime", "per-core", "--workers", "2"]).await;
}

/// An h2c connection that has been answered once; kept open (idle) while held.
async fn h2c_open(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get("http://127.0.0.1/healthz")
        .body(http_body_util::Empty::new())
        .expect("request");
    let answer = tokio::time::timeout(HANG, sender.send_request(request))
        .await
        .expect("h2c answered in time")
        .expect("h2c answer");
    assert_eq!(answer.status(), 200);
    let _ = answer.into_body().collect().await;
    (sender, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_bound_is_shared_by_the_workers_and_every_waiter_is_served() {
    // Proves: with --connections-max N (1, 2, 3) over 2 workers, connections past the bound wait
    // and each is served once a held one (HTTP/1 keep-alive or h2c, idle) closes; none waits
    // forever while there is room. The slow-client timeout is long, so only the closes free places.
    for max in [1usize, 2, 3] {
        let dir = tempfile::tempdir().expect("tempdir");
        let max_arg = max.to_string();
        let app = start_with_env(
            &dir.path().join("data"),
            &[
                "--runtime",
                "per-core",
                "--workers",
                "2",
                "--connections-max",
                &max_arg,
                "--slow-client-timeout",
                "120s",
            ],
            &[],
        );
        let addr = app.addr;
        // The holders: alternately HTTP/1 and h2c, all idle after one answer.
        let mut h1_holders = Vec::new();
        let mut h2_holders = Vec::new();
        for n in 0..max {
            if n % 2 == 0 {
                let mut client = Client::new(addr);
                let answer = tokio::time::timeout(HANG, client.get("/healthz"))
                    .await
                    .expect("a holder is served");
                assert_eq!(answer.status, 200);
                h1_holders.push(client);
            } else {
                h2_holders.push(h2c_open(addr).await);
            }
        }
        // Waiters: more than the workers, so some sit accepted in a worker, some in the backlog.
        let waiters: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn(async move {
                    let mut client = Client::new(addr);
                    client.get("/healthz").await.status
                })
            })
            .collect();
        // Free the places one by one; every waiter is served, one after the other.
        drop(h1_holders);
        for (sender, task) in h2_holders {
            drop(sender);
            let _ = tokio::time::timeout(HANG, task).await;
        }
        for waiter in waiters {
            let status = tokio::time::timeout(HANG, waiter)
                .await
                .unwrap_or_else(|_| panic!("max {max}: a waiter was never served"))
                .expect("task");
            assert_eq!(status, 200);
        }
    }
}

async fn sigterm_with_everything_open(tls: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let fixture = |name: &str| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
            .display()
            .to_string()
    };
    let mut args: Vec<String> = [
        "--runtime",
        "per-core",
        "--workers",
        "2",
        "--connections-max",
        "3",
        "--slow-client-timeout",
        "120s",
    ]
    .map(String::from)
    .to_vec();
    if tls {
        args.extend([
            "--tls-cert".into(),
            fixture("cert.pem"),
            "--tls-key".into(),
            fixture("key.pem"),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut app = start_with_env(&data, &args, &[]);
    let addr = app.addr;
    // Orders first, over a plain client (cleartext only).
    let mut ids = Vec::new();
    let mut held_h1 = None;
    let mut held_h2 = None;
    if !tls {
        let mut client = app.client();
        assert_eq!(client.put_product("T", 100, 100).await.status, 200);
        for n in 0..10 {
            let answer = client
                .checkout(&format!("t{n}"), "T", 1, "tok_ok")
                .await
                .expect("answer");
            assert_eq!(answer.status, 201);
            ids.push(answer.json()["order_id"].as_str().expect("id").to_owned());
        }
        // Held: this idle keep-alive connection, and an idle h2c one.
        held_h1 = Some(client);
        held_h2 = Some(h2c_open(addr).await);
    }
    // A TCP connection that never sends a byte (no request head, no TLS handshake).
    let silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // Past the bound: connections accepted and waiting for a place, or in the backlog.
    let waiting: Vec<_> =
        futures_util::future::join_all((0..4).map(|_| tokio::net::TcpStream::connect(addr))).await;
    app.send_sigterm();
    let mut status = None;
    eventually("the server to exit", HANG, async || {
        status = app.try_wait();
        status.is_some()
    })
    .await;
    let status = status.expect("exited");
    assert!(
        status.success(),
        "tls {tls}: exit {status:?}: {}",
        app.log()
    );
    drop((silent, waiting, held_h1, held_h2));
    let restarted = start_with_env(&data, &args, &[]);
    if !tls {
        let mut client = restarted.client();
        assert_eq!(client.stock("T").await.3, 10);
        for id in &ids {
            assert_eq!(client.get(&format!("/v1/orders/{id}")).await.status, 200);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_sigterm_with_idle_h1_h2c_silent_and_waiting_connections_exits_0() {
    sigterm_with_everything_open(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_sigterm_with_tls_and_the_bound_reached_exits_0() {
    sigterm_with_everything_open(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_on_one_cpu_with_taskset_serves() {
    // Proves: started under `taskset -c 0` (an affinity mask of one CPU), with 2 workers, the
    // per-core server serves and conserves stock.
    assert!(
        std::process::Command::new("taskset")
            .arg("-V")
            .output()
            .is_ok(),
        "taskset is missing: install util-linux"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let log = std::fs::File::create(data.with_extension("log")).expect("log");
    let mut child = std::process::Command::new("taskset")
        .args([
            "-c",
            "0",
            env!("CARGO_BIN_EXE_turnstile"),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .args(["--runtime", "per-core", "--workers", "2", "--pin"])
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("taskset");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("ready line");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .parse()
        .expect("addr");
    let mut client = Client::new(addr);
    assert_eq!(client.put_product("ONE", 100, 37).await.status, 200);
    let placed = rush(addr, "ONE", 200, |_| 1).await;
    assert_eq!(placed.len(), 37);
    assert_eq!(client.stock("ONE").await, (37, 0, 0, 37));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_metrics_count_every_checkout_once_and_sold_out_answers_replay() {
    // Proves: with checkouts spread over five workers (one metrics copy and one journal queue
    // each), `/metrics` sums every worker's counts exactly: reservations, out-of-stock refusals
    // (most of them answered by the sold-out flag before anything is reserved), replays and the
    // checkout route's statuses; a retry of a refused checkout replays its 409, the same key
    // with another body gets 422, and the stock identity holds.
    let dir = tempfile::tempdir().expect("tempdir");
    let app = start_with_env(
        &dir.path().join("data"),
        &["--runtime", "per-core", "--workers", "5"],
        &[],
    );
    let mut client = app.client();
    assert_eq!(client.put_product("FLAG", 100, 13).await.status, 200);
    let buyers = 240;
    let placed = rush(app.addr, "FLAG", buyers, |_| 1).await;
    assert_eq!(placed.len(), 13);
    assert_eq!(client.stock("FLAG").await, (13, 0, 0, 13));
    // Every key again, same body: the first answer back; then the same keys with another body.
    let retries: Vec<_> = (0..buyers)
        .map(|i| {
            let addr = app.addr;
            tokio::spawn(async move {
                let mut client = Client::new(addr);
                let key = format!("rush-FLAG-{i}");
                let again = client
                    .checkout(&key, "FLAG", 1, "tok_ok")
                    .await
                    .expect("an answer");
                assert!(again.replayed, "{key}: {}", again.status);
                let other = client
                    .checkout(&key, "FLAG", 2, "tok_ok")
                    .await
                    .expect("an answer");
                assert_eq!(other.status, 422, "{key}");
                again.status
            })
        })
        .collect();
    let mut replayed_201 = 0;
    for retry in retries {
        match tokio::time::timeout(HANG, retry)
            .await
            .expect("hang")
            .expect("task")
        {
            201 => replayed_201 += 1,
            409 => {}
            other => panic!("replayed {other}"),
        }
    }
    assert_eq!(replayed_201, 13);
    assert_eq!(client.stock("FLAG").await, (13, 0, 0, 13));
    let refused = (buyers - 13) as f64;
    assert_eq!(
        metric(&mut client, "turnstile_reservations_total").await,
        13.0
    );
    assert_eq!(
        metric(&mut client, "turnstile_rejections_out_of_stock_total").await,
        refused
    );
    assert_eq!(
        metric(&mut client, "turnstile_idempotent_replays_total").await,
        buyers as f64
    );
    let text = String::from_utf8_lossy(&client.get("/metrics").await.body).into_owned();
    let requests = |status: u16| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("turnstile_http_requests_total{"))
            .filter(|l| l.contains("route=\"/v1/checkout\""))
            .filter(|l| l.contains(&format!("status=\"{status}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(requests(201), 26.0, "{text}");
    assert_eq!(requests(409), 2.0 * refused, "{text}");
    assert_eq!(requests(422), buyers as f64, "{text}");
    let log = app.log();
    assert!(!log.contains("panicked"), "{log}");
}
