//! Stopping RabbitMQ under load: checkouts go on with no added errors (the broker is not on the
//! checkout path), the node stays ready and says why, and once the broker is back every event
//! arrives, none lost. The checkout p99 during the outage is printed, not asserted.
//!
//! This test stops the machine's RabbitMQ (`rabbitmqctl stop_app`, and `start_app` after, also
//! when it fails), so it lives in a test binary of its own whose name sorts last: `cargo test`
//! runs test binaries one after another, so no other test runs beside it.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use helpers::{all_delivered, eventually, metric, spawn_app, JsonBody, Load, TestBroker};
use std::process::Command;
use std::time::{Duration, Instant};

fn rabbitmqctl(action: &str) -> bool {
    Command::new("rabbitmqctl")
        .arg(action)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Starts RabbitMQ's application again if the test ends early, so a failure here does not take
/// the broker away from whatever runs next.
struct StartOnDrop;

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        if !rabbitmqctl("start_app") {
            let _ = Command::new("rabbitmq-server").arg("-detached").status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_rabbitmq_under_load_loses_no_event_and_no_checkout() {
    let mut broker = TestBroker::create("restart").await;
    let app = spawn_app(&broker.args().iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = app.client();
    client.put_product("A", 500, 10_000_000).await;
    let load = Load::start(&app, 8, "load", &["A".to_owned()]);
    eventually(
        "events confirmed before the outage",
        Duration::from_secs(30),
        async || metric(&mut client, "turnstile_amqp_confirmed_seq").await > 200.0,
    )
    .await;

    let _restart = StartOnDrop;
    assert!(rabbitmqctl("stop_app"), "rabbitmqctl stop_app failed");
    eventually("the relay to notice", Duration::from_secs(30), async || {
        metric(&mut client, "turnstile_amqp_connected").await == 0.0
    })
    .await;
    // During the outage: checkouts still succeed, timed one by one beside the load.
    let mut latencies = Vec::new();
    for n in 0..300 {
        let started = Instant::now();
        let answer = client
            .checkout(&format!("outage-{n}"), "A", 1, "tok_ok")
            .await
            .expect("answer");
        latencies.push(started.elapsed());
        assert_eq!(
            answer.status,
            201,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let ready = client.get("/readyz").await;
    assert_eq!(ready.status, 200, "the broker is not on the checkout path");
    assert_ne!(ready.json()["checks"]["amqp"], "ok");
    let waiting = metric(&mut client, "turnstile_amqp_lag_events").await;
    assert!(waiting >= 600.0, "events wait in the journal: {waiting}");
    latencies.sort();
    eprintln!(
        "checkout latency during the RabbitMQ outage (300 sequential, 8 clients of load beside): p50 {:?}, p99 {:?}; {waiting} events waiting",
        latencies[149], latencies[296]
    );

    assert!(rabbitmqctl("start_app"), "rabbitmqctl start_app failed");
    let sent = load.stop().await;
    let errors = sent.iter().filter(|s| s.status != 201).count();
    assert_eq!(errors, 0, "no checkout failed during the outage");
    broker.reconnect().await;
    // Reconnected: every event, none lost (duplicates allowed), in seq order.
    all_delivered(&mut client, &mut broker).await;
    assert!(metric(&mut client, "turnstile_amqp_reconnects_total").await >= 1.0);
    broker.delete().await;
}
