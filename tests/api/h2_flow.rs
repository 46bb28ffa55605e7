//! HTTP/2 clients that never let an answer leave: each opens no flow-control window
//! (`SETTINGS_INITIAL_WINDOW_SIZE` 0), keeps answering pings, and asks many times for the largest
//! answer there is (`GET /v1/events?limit=1000`). The server bounds what it holds for them: at
//! most 100 streams per connection, the bytes of unsent answers within `--response-bytes-max`
//! (past it, `503 overloaded`), connections whose answers make no progress closed after the
//! slow-client timeout, and a stop that does not wait for streams that can never drain.

use crate::helpers::{eventually, spawn_app, JsonBody, TestApp};
use std::time::Duration;

/// A metric of `app`, read on a new connection; `None` if the server could not say (busy with
/// the flood: the scrape itself may be refused past the byte budget, or wait its turn on a core
/// rendering the large answers).
async fn reading(app: &TestApp, name: &str) -> Option<f64> {
    let answer = app
        .client()
        .try_send("GET", "/metrics", &[], "")
        .await
        .ok()
        .filter(|answer| answer.status == 200)?;
    String::from_utf8_lossy(&answer.body)
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// The resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// An HTTP/2 connection (prior knowledge, cleartext) whose window never opens; its connection
/// task answers pings until the server closes it.
async fn stingy_connection(
    app: &TestApp,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, task)
}

/// Asks `count` times for a page of 1,000 events on `send`; the statuses of the answers' heads
/// (their bodies never flow).
async fn ask_for_events(send: h2::client::SendRequest<bytes::Bytes>, count: usize) -> Vec<u16> {
    let mut pending = Vec::new();
    for _ in 0..count {
        let Ok(mut ready) = send.clone().ready().await else {
            break;
        };
        let request = axum::http::Request::get("http://turnstile/v1/events?after=0&limit=1000")
            .body(())
            .expect("request");
        match ready.send_request(request, true) {
            Ok((response, _)) => pending.push(response),
            Err(_) => break,
        }
    }
    let mut statuses = Vec::new();
    for response in pending {
        if let Ok(response) = response.await {
            statuses.push(response.status().as_u16());
        }
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_nobody_reads_stay_within_the_byte_budget_and_their_connections_are_closed() {
    const BUDGET: u64 = 4 * 1024 * 1024;
    let mut app = spawn_app(&[
        "--slow-client-timeout",
        "2s",
        "--response-bytes-max",
        &BUDGET.to_string(),
    ]);
    let mut client = app.client();
    client.put_product("E", 100, 10_000).await;
    for n in 0..600 {
        let placed = client
            .checkout(&format!("e-{n}"), "E", 1, "tok_ok")
            .await
            .expect("answer");
        assert_eq!(placed.status, 201);
    }
    let page = client.get("/v1/events?after=0&limit=1000").await;
    let page_bytes = page.body.len() as u64;
    assert!(page_bytes > 100_000, "a large answer: {page_bytes} bytes");
    let rss_before = rss_bytes(app.pid());

    let mut connections = Vec::new();
    let mut askers = Vec::new();
    for _ in 0..6 {
        let (send, task) = stingy_connection(&app).await;
        connections.push(task);
        askers.push(tokio::spawn(ask_for_events(send, 100)));
    }
    // While the answers wait: never more unsent than the budget (plus the small 503s), and the
    // memory to match.
    let mut most_unsent = 0.0f64;
    let mut most_rss = 0u64;
    let mut statuses = Vec::new();
    for asker in askers {
        while !asker.is_finished() {
            let unsent = reading(&app, "turnstile_response_bytes_unsent").await;
            most_unsent = most_unsent.max(unsent.unwrap_or(0.0));
            most_rss = most_rss.max(rss_bytes(app.pid()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        statuses.extend(asker.await.expect("asker"));
    }
    most_rss = most_rss.max(rss_bytes(app.pid()));
    let refused_total = reading(&app, "turnstile_responses_refused_total").await;
    assert!(refused_total.unwrap_or(0.0) > 0.0, "{refused_total:?}");
    let refused = statuses.iter().filter(|s| **s == 503).count();
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        refused > 0 && served > 0,
        "{served} served, {refused} refused"
    );
    // The 503 answers are counted past the bound; each is far below 1 KB.
    let bound = BUDGET as f64 + statuses.len() as f64 * 1_024.0;
    assert!(
        most_unsent <= bound,
        "{most_unsent} bytes unsent, above the bound {bound}"
    );
    // Unbounded, the 600 answers asked for would hold ~180 MB.
    assert!(
        most_rss < rss_before + 32 * 1024 * 1024,
        "resident memory grew from {rss_before} to {most_rss} bytes"
    );

    // The answers make no progress: each connection is closed after the slow-client timeout,
    // and every byte goes back to the budget.
    for connection in connections {
        tokio::time::timeout(Duration::from_secs(30), connection)
            .await
            .expect("the server closes a connection whose answers never leave")
            .expect("connection task");
    }
    eventually(
        "the budget to be empty again",
        Duration::from_secs(10),
        async || reading(&app, "turnstile_response_bytes_unsent").await == Some(0.0),
    )
    .await;
    assert_eq!(app.client().get("/healthz").await.status, 200);

    // A stop does not wait for streams that can never drain.
    let (send, connection) = stingy_connection(&app).await;
    let asker = tokio::spawn(ask_for_events(send, 4));
    eventually(
        "answers to wait unsent",
        Duration::from_secs(10),
        async || reading(&app, "turnstile_response_bytes_unsent").await > Some(0.0),
    )
    .await;
    app.send_sigterm();
    eventually("the server to stop", Duration::from_secs(30), async || {
        app.try_wait().is_some()
    })
    .await;
    assert!(app.wait().success(), "a clean stop");
    let _ = asker.await;
    let _ = connection.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_may_open_at_most_100_streams() {
    let app = spawn_app(&[]);
    let (send, connection) = stingy_connection(&app).await;
    // The server's SETTINGS arrive with the handshake's first exchange.
    let send = send.ready().await.expect("ready");
    eventually(
        "the server's SETTINGS",
        Duration::from_secs(5),
        async || send.current_max_send_streams() != usize::MAX,
    )
    .await;
    assert_eq!(send.current_max_send_streams(), 100);
    drop(send);
    connection.abort();
    let _ = app.client().get("/healthz").await.json();
}
