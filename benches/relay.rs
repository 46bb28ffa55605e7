//! The RabbitMQ relay's confirmed events per second against RabbitMQ's own ceiling on this box,
//! side by side in one run: a bare lapin publisher with confirms (the same message size, the same
//! window of unconfirmed messages, confirms awaited in order), then the relay draining the same
//! number of events from an embedded journal. Rounds alternate A, B.
//!
//! `cargo bench --bench relay` (RABBITMQ_URL, default amqp://guest:guest@127.0.0.1:5672/%2f;
//! RELAY_EVENTS, default 100000; RELAY_ROUNDS, default 3). Each run has its own exchange, whose
//! queues are deleted afterwards.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use mimalloc::MiMalloc;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use turnstile::events::relay::{declare_topology, message, FileCursor, Relay, RelayConfig};
use turnstile::journal::file::{FileJournal, FileJournalConfig};
use turnstile::journal::Journal;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

mod common;
use common::order_record;

const WINDOW: usize = 1_024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn channel(url: &str, exchange: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    declare_topology(&channel, exchange)
        .await
        .expect("topology");
    (connection, channel)
}

async fn cleanup(url: &str, exchange: &str) {
    let (connection, channel) = channel(url, exchange).await;
    for queue in [format!("{exchange}.all"), format!("{exchange}.dead")] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for name in [exchange.to_owned(), format!("{exchange}.dlx")] {
        let _ = channel
            .exchange_delete(name.as_str().into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "bench done".into()).await;
}

/// A bare publisher: `events` messages shaped as the relay's, `WINDOW` unconfirmed at most.
async fn bare(url: &str, exchange: &str, events: &[turnstile::engine::records::Event]) -> f64 {
    let (connection, channel) = channel(url, exchange).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let publish = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let started = Instant::now();
    let mut window = VecDeque::new();
    for event in events {
        if window.len() == WINDOW {
            let confirm: lapin::PublisherConfirm = window.pop_front().expect("front");
            assert!(confirm.await.expect("confirm").is_ack());
        }
        let (body, properties) = message(event, None);
        window.push_back(
            channel
                .basic_publish(
                    exchange.into(),
                    event.status.event_type().into(),
                    publish,
                    &body,
                    properties,
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in window {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "bench done".into()).await;
    rate
}

/// The relay draining `journal` from seq 0 until every event is confirmed.
async fn relay(
    url: &str,
    exchange: &str,
    journal: &Arc<dyn Journal>,
    dir: &std::path::Path,
) -> f64 {
    let _ = std::fs::remove_file(dir.join(turnstile::events::relay::CURSOR_FILE));
    let last = journal.last_event_seq();
    let mut config = RelayConfig::new(url);
    config.exchange = exchange.to_owned();
    config.window = WINDOW;
    let relay = Relay::new(
        config,
        Arc::clone(journal),
        Box::new(FileCursor::new(dir)),
        0,
        None,
    );
    let started = Instant::now();
    let task = relay.start().expect("start the relay");
    while relay.confirmed() < last {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = last as f64 / started.elapsed().as_secs_f64();
    relay.stop();
    let _ = task.await;
    rate
}

fn main() {
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let orders = env_or("RELAY_EVENTS", 100_000) / 2;
    let rounds = env_or("RELAY_ROUNDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .is_err()
        {
            eprintln!("skipping the relay benchmark: RabbitMQ at {url} is not reachable; start it with `rabbitmq-server -detached`");
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-relay");
        let _ = std::fs::remove_dir_all(&dir);
        let (file, _) =
            FileJournal::open_dir(&dir, FileJournalConfig::default()).expect("journal");
        let journal: Arc<dyn Journal> = Arc::new(file);
        let tickets: Vec<_> = (0..orders).map(|n| journal.append(order_record(n))).collect();
        for ticket in tickets {
            ticket.await.expect("append");
        }
        let events = journal
            .events(0, usize::MAX)
            .await
            .expect("the events");
        assert_eq!(events.len() as u64, journal.last_event_seq(), "every event read");
        let size = message(&events[0], None).0.len();
        println!(
            "{} events of {size} bytes, window {WINDOW}, {} cores",
            events.len(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        for round in 1..=rounds {
            let unique = format!("bench.relay.{}.{round}", std::process::id());
            let a = bare(&url, &format!("{unique}.bare"), &events).await;
            cleanup(&url, &format!("{unique}.bare")).await;
            let b = relay(&url, &format!("{unique}.relay"), &journal, &dir).await;
            cleanup(&url, &format!("{unique}.relay")).await;
            println!(
                "round {round}: bare lapin publisher {a:.0} msgs/s, relay {b:.0} events/s, relay/bare {:.2}",
                b / a
            );
        }
        journal.shutdown().await;
    });
}
