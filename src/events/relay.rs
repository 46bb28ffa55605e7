//! The outbox relay: every event of the journal, in `seq` order, to a RabbitMQ topic exchange,
//! with publisher confirms (API.md's message shape).
//!
//! **Mechanism: an ordered reader with a durable cursor, go-back-N** (the one pattern downstream
//! of the journal, [`crate::journal::downstream`]). The relay reads events after its cursor from
//! the journal (the embedded segments or MySQL's `outbox`, through [`Journal::events`]) with a
//! [`Reader`], publishes them on a channel
//! in confirm mode (`confirm.select`, `mandatory`), at most [`RelayConfig::window`] unconfirmed at
//! once, and waits for their confirms in order. Only an `Ack` without a returned message moves the
//! cursor. A `Nack`, a returned (unroutable) message, a channel without confirms
//! (`NotRequested`, which lapin answers at once when `confirm.select` was never sent) or a lost
//! connection ends the session: the relay reconnects with backoff, declares the topology again and
//! republishes from the first unconfirmed event. So messages leave in `seq` order, none is lost,
//! and a message is at most repeated (at-least-once; consumers drop duplicates by `message_id`).
//!
//! The cursor is saved durably every [`SAVE_EVERY`] and at stop (a file in the data dir, or an
//! `outbox_cursor` row in MySQL), so a `kill -9` repeats at most the events confirmed since the
//! last save. The embedded journal keeps every segment holding an event after the saved cursor,
//! whatever `--event-retention` says ([`FileJournalConfig::hold_events_after_seq`]).
//!
//! The broker is not on the checkout path: while it is down, events wait in the journal and
//! `/readyz` stays ready with `checks.amqp` saying why. Only past `--amqp-unconfirmed-max` events
//! not confirmed (the disk budget) does the node stop taking checkouts (`503 overloaded`, and
//! `/readyz` 503): it never drops an event.
//!
//! [`FileJournalConfig::hold_events_after_seq`]: crate::journal::file::FileJournalConfig

use super::EventView;
use crate::engine::records::Event;
use crate::journal::downstream::{Cursor, Filled, Reader};
use crate::journal::{Journal, JournalError};
use crate::metrics::{encode_counter, encode_gauge};
use crate::sync::lock;
use crate::BoxFuture;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How often the confirmed cursor is saved while events flow.
pub const SAVE_EVERY: Duration = Duration::from_millis(100);
/// How often an idle relay looks for new events (an atomic load, no I/O).
const IDLE_POLL: Duration = Duration::from_millis(2);
/// How often to read again when the journal says there are more events but a read found none
/// (MySQL: the seqs of a record the database refused are never used), so such a gap at the end
/// of the log does not become a busy loop of queries.
const GAP_POLL: Duration = Duration::from_millis(100);
/// The first and the longest wait between reconnects.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long connecting, declaring, publishing or a confirm may take before the session counts as
/// failed (the events not confirmed are republished on a new connection).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The relay thread's nice value: below the request handlers, above the snapshot thread.
const RELAY_NICE: i32 = 10;
/// The most messages the default queue keeps (API.md): older ones are dropped from its head.
pub const ALL_QUEUE_LENGTH_MAX: i64 = 1_000_000;

/// Settings of the relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// `amqp://user:pass@host:5672/%2f`.
    pub url: String,
    /// The durable topic exchange events go to (`--amqp-exchange`).
    pub exchange: String,
    /// The most messages published and not yet confirmed.
    pub window: usize,
    /// The most events durable and not yet confirmed before checkouts stop
    /// (`--amqp-unconfirmed-max`).
    pub unconfirmed_max: u64,
    /// Several nodes (`--node-id`): the node whose events these are; their `message_id` is then
    /// `<node>:<seq>` (each node's seqs are its own), and their body carries `"node"`.
    pub node: Option<String>,
}

impl RelayConfig {
    /// The defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange: "turnstile.orders".into(),
            window: 1_024,
            unconfirmed_max: 50_000_000,
            node: None,
        }
    }
}

/// The cursor as a file in the data dir (embedded journal and write-behind): replaced atomically
/// (write, `fsync`, rename, `fsync` of the directory).
pub struct FileCursor {
    path: PathBuf,
}

/// The cursor file's name in the data dir.
pub const CURSOR_FILE: &str = "amqp.cursor";

impl FileCursor {
    /// The cursor of the data dir `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(CURSOR_FILE),
        }
    }

    /// Reads the cursor now (before the journal opens: its retention hold starts there).
    pub fn load_now(&self) -> Result<u64, String> {
        match std::fs::read_to_string(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(format!("reading {}: {e}", self.path.display())),
            Ok(text) => text.trim().parse::<u64>().map_err(|_| {
                format!(
                    "{} does not hold a seq ({:?}): fix it or remove it (the relay then sends every event the journal keeps)",
                    self.path.display(),
                    text.chars().take(40).collect::<String>()
                )
            }),
        }
    }

    fn save_now(path: &Path, seq: u64) -> std::io::Result<()> {
        crate::data_dir::write_atomic(path, format!("{seq}\n").as_bytes())
    }
}

impl Cursor for FileCursor {
    fn load(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move { self.load_now() })
    }

    fn save(&self, seq: u64) -> BoxFuture<'_, Result<(), String>> {
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::save_now(&path, seq))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("saving the relay's cursor: {e}"))
        })
    }
}

/// The cursor as a row of MySQL's `outbox_cursor` (MySQL as the journal): the node's row with
/// `relay = 'amqp'`, `published_seq` the last confirmed seq of its events. It only moves forward.
pub struct MySqlCursor {
    pool: sqlx::MySqlPool,
    /// The node whose outbox the relay publishes (each node's events have seqs of their own).
    node: String,
}

impl MySqlCursor {
    /// `node`'s cursor in the database behind `pool`.
    pub fn new(pool: sqlx::MySqlPool, node: String) -> Self {
        Self { pool, node }
    }
}

impl Cursor for MySqlCursor {
    fn load(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let seq: Option<i64> = sqlx::query_scalar(
                "SELECT published_seq FROM outbox_cursor WHERE node = ? AND relay = 'amqp'",
            )
            .bind(self.node.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| format!("reading the relay's cursor: {e}"))?;
            Ok(seq.unwrap_or(0).max(0) as u64)
        })
    }

    fn save(&self, seq: u64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO outbox_cursor (node, relay, published_seq) VALUES (?, 'amqp', ?) \
                 ON DUPLICATE KEY UPDATE published_seq = GREATEST(published_seq, VALUES(published_seq))",
            )
            .bind(self.node.as_str())
            .bind(seq as i64)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| format!("saving the relay's cursor: {e}"))
        })
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    published: AtomicU64,
    confirmed: AtomicU64,
    nacks: AtomicU64,
    returns: AtomicU64,
    reconnects: AtomicU64,
}

/// The relay: started once, runs until [`Relay::stop`].
pub struct Relay {
    config: RelayConfig,
    journal: Arc<dyn Journal>,
    cursor: Box<dyn Cursor>,
    /// The embedded journal's retention hold (moved with the saved cursor), if it has one.
    hold: Option<Arc<AtomicU64>>,
    /// The last seq the broker confirmed.
    confirmed: AtomicU64,
    /// The last seq saved durably.
    saved: AtomicU64,
    /// When the oldest event not confirmed happened (Unix ms; 0: not known or none).
    oldest_at_ms: AtomicI64,
    connected: AtomicBool,
    problem: Mutex<Option<String>>,
    stats: Stats,
    stopping: AtomicBool,
    stop: Notify,
}

/// Why a session with the broker ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ refused event {seq} (nack); republishing from it")]
    Nack { seq: u64 },
    #[error("event {seq} was returned unroutable ({reason}); declaring the topology again and republishing from it")]
    Returned { seq: u64, reason: String },
    #[error("the channel is not in confirm mode (event {seq} unconfirmed); reconnecting")]
    NotConfirmed { seq: u64 },
    #[error("reading events: {0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Cursor(String),
}

async fn bounded<T>(
    what: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, SessionError> {
    tokio::time::timeout(CONNECT_TIMEOUT, what)
        .await
        .map_err(|_| SessionError::Timeout(CONNECT_TIMEOUT))?
        .map_err(SessionError::from)
}

/// Declares the exchange, the capped default queue bound to `#` (so no message is unroutable),
/// and the dead-letter exchange and queue consumers send poison messages to. Idempotent.
pub async fn declare_topology(
    channel: &lapin::Channel,
    exchange: &str,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            dead_letter_exchange(exchange).into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    let queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut capped = FieldTable::default();
    capped.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(ALL_QUEUE_LENGTH_MAX),
    );
    let all = format!("{exchange}.all");
    channel
        .queue_declare(all.as_str().into(), queue, capped)
        .await?;
    channel
        .queue_bind(
            all.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let dead = format!("{exchange}.dead");
    channel
        .queue_declare(dead.as_str().into(), queue, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            dead.as_str().into(),
            dead_letter_exchange(exchange).into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The dead-letter exchange of `exchange`.
pub fn dead_letter_exchange(exchange: &str) -> String {
    format!("{exchange}.dlx")
}

/// The message of `event` (API.md): its body, and its properties (persistent, JSON, `message_id` =
/// the seq, or `<node>:<seq>` with several nodes, header `order_id`).
pub fn message(event: &Event, node: Option<&str>) -> (Vec<u8>, BasicProperties) {
    let mut headers = FieldTable::default();
    headers.insert(
        "order_id".into(),
        AMQPValue::LongString(LongString::from(event.order_id.as_str())),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(match node {
            Some(node) => format!("{node}:{}", event.seq),
            None => event.seq.to_string(),
        }))
        .with_headers(headers);
    (EventView::of(event).on(node).to_bytes(), properties)
}

/// What the broker's answer for event `seq` means: delivered only on an `Ack` with no returned
/// message. A `Nack`, a return, or `NotRequested` (what lapin answers at once on a channel without
/// `confirm.select`, the pitfall that would count a message as sent) is an error, and the relay
/// republishes from `seq`.
fn settle(seq: u64, confirmation: Confirmation, stats: &Stats) -> Result<(), SessionError> {
    match confirmation {
        Confirmation::Ack(None) => {
            stats.confirmed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Confirmation::Ack(Some(returned)) => {
            stats.returns.fetch_add(1, Ordering::Relaxed);
            Err(SessionError::Returned {
                seq,
                reason: returned.reply_text.to_string(),
            })
        }
        Confirmation::Nack(_) => {
            stats.nacks.fetch_add(1, Ordering::Relaxed);
            Err(SessionError::Nack { seq })
        }
        Confirmation::NotRequested => Err(SessionError::NotConfirmed { seq }),
    }
}

impl Relay {
    /// A relay of `journal`'s events, its cursor in `cursor` (already loaded as `confirmed`), and
    /// the embedded journal's retention hold if it has one.
    pub fn new(
        config: RelayConfig,
        journal: Arc<dyn Journal>,
        cursor: Box<dyn Cursor>,
        confirmed: u64,
        hold: Option<Arc<AtomicU64>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            journal,
            cursor,
            hold,
            confirmed: AtomicU64::new(confirmed),
            saved: AtomicU64::new(confirmed),
            oldest_at_ms: AtomicI64::new(0),
            connected: AtomicBool::new(false),
            problem: Mutex::new(Some("connecting".into())),
            stats: Stats::default(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        })
    }

    /// Runs the relay until [`Relay::stop`] on a thread of its own at a lower CPU priority, with
    /// its own runtime: on a busy box it takes what the request handlers leave (the broker is
    /// not on the checkout path), and the lag absorbs the difference. The receiver resolves once
    /// it has stopped.
    pub fn start(self: &Arc<Self>) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        let relay = Arc::clone(self);
        let (done, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("amqp-relay".into())
            .spawn(move || {
                crate::sync::lower_this_threads_priority(RELAY_NICE);
                runtime.block_on(relay.run());
                let _ = done.send(());
            })?;
        Ok(stopped)
    }

    /// Asks the relay to stop: it waits (bounded) for the confirms in flight, saves its cursor and
    /// ends. Events not confirmed are sent after the next start.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        // A permit, not only a wake-up: a stop that lands while the relay is not waiting (it is
        // connecting, say) is seen at its next wait instead of after a whole backoff.
        self.stop.notify_one();
    }

    /// The last seq the broker confirmed.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }

    /// Durable events the broker has not confirmed.
    pub fn lag_events(&self) -> u64 {
        self.journal
            .last_event_seq()
            .saturating_sub(self.confirmed())
    }

    /// Age of the oldest event the broker has not confirmed, in seconds (0 when none).
    pub fn lag_seconds(&self) -> f64 {
        let oldest = self.oldest_at_ms.load(Ordering::Acquire);
        if self.lag_events() == 0 || oldest == 0 {
            return 0.0;
        }
        ((crate::time::now_ms() - oldest).max(0) as f64) / 1_000.0
    }

    /// `checks.amqp` of `/readyz`: `Ok` while connected, else why (with the events waiting).
    pub fn check(&self) -> Result<(), String> {
        let waiting = self.lag_events();
        match lock(&self.problem).clone() {
            None => Ok(()),
            Some(problem) => Err(format!("{problem}; {waiting} event(s) wait in the journal")),
        }
    }

    /// `Err` once the events waiting for the broker reach the budget: checkouts stop (`503
    /// overloaded`) rather than an event ever being dropped.
    pub fn admit(&self) -> Result<(), String> {
        let waiting = self.lag_events();
        if waiting >= self.config.unconfirmed_max {
            return Err(format!(
                "{waiting} events wait for RabbitMQ's confirm, the budget of --amqp-unconfirmed-max: checkouts resume once the broker takes them"
            ));
        }
        Ok(())
    }

    /// Writes the relay's metrics.
    pub fn encode_metrics(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        encode_gauge(
            encoder,
            "turnstile_amqp_lag_events",
            "Durable events RabbitMQ has not confirmed yet.",
            self.lag_events(),
        )?;
        encoder
            .encode_descriptor(
                "turnstile_amqp_lag_seconds",
                "Age of the oldest durable event RabbitMQ has not confirmed yet.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?
            .encode_gauge(&self.lag_seconds())?;
        encode_gauge(
            encoder,
            "turnstile_amqp_confirmed_seq",
            "The last event seq RabbitMQ confirmed.",
            self.confirmed(),
        )?;
        encode_gauge(
            encoder,
            "turnstile_amqp_connected",
            "1 while the relay has a channel in confirm mode.",
            u64::from(self.connected.load(Ordering::Relaxed)),
        )?;
        let stats = &self.stats;
        for (name, help, value) in [
            (
                "turnstile_amqp_published",
                "Messages published (republished ones count again).",
                &stats.published,
            ),
            (
                "turnstile_amqp_confirmed",
                "Messages the broker acknowledged.",
                &stats.confirmed,
            ),
            (
                "turnstile_amqp_nacks",
                "Messages the broker refused (nack): republished.",
                &stats.nacks,
            ),
            (
                "turnstile_amqp_returns",
                "Messages returned unroutable: republished.",
                &stats.returns,
            ),
            (
                "turnstile_amqp_reconnects",
                "Sessions with the broker that ended (each followed by a reconnect).",
                &stats.reconnects,
            ),
        ] {
            encode_counter(encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    async fn run(&self) {
        let mut backoff = crate::backoff::Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        while !self.stopping() {
            let before = self.confirmed();
            let ended = self.session().await;
            self.connected.store(false, Ordering::Release);
            let Err(error) = ended else { break };
            if self.confirmed() > before {
                backoff.reset();
            }
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let wait = backoff.next_wait();
            tracing::warn!(%error, waiting = self.lag_events(), retry_in = ?wait, "RabbitMQ relay: session ended; events wait in the journal");
            *lock(&self.problem) = Some(error.to_string());
            self.note_oldest().await;
            let _ = self.save().await;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.stop.notified() => {}
            }
        }
        if let Err(error) = self.save().await {
            tracing::warn!(%error, "RabbitMQ relay: could not save its cursor at stop; the events since the last save will be sent again");
        }
    }

    /// Notes when the oldest unconfirmed event happened (for the lag in seconds while the broker
    /// is away).
    async fn note_oldest(&self) {
        if self.lag_events() == 0 {
            self.oldest_at_ms.store(0, Ordering::Release);
            return;
        }
        if let Ok(events) = self.journal.events(self.confirmed(), 1).await {
            if let Some(event) = events.first() {
                self.oldest_at_ms.store(event.at_ms, Ordering::Release);
            }
        }
    }

    /// Saves the confirmed cursor if it moved, then lets the embedded journal drop what it covers.
    async fn save(&self) -> Result<(), SessionError> {
        let confirmed = self.confirmed();
        if confirmed <= self.saved.load(Ordering::Acquire) {
            return Ok(());
        }
        self.cursor
            .save(confirmed)
            .await
            .map_err(SessionError::Cursor)?;
        self.saved.store(confirmed, Ordering::Release);
        if let Some(hold) = &self.hold {
            hold.fetch_max(confirmed, Ordering::AcqRel);
        }
        Ok(())
    }

    async fn session(&self) -> Result<(), SessionError> {
        let connection = bounded(Connection::connect(
            &self.config.url,
            ConnectionProperties::default().with_connection_name("turnstile relay".into()),
        ))
        .await?;
        let result = async {
            let channel = bounded(connection.create_channel()).await?;
            bounded(channel.confirm_select(ConfirmSelectOptions::default())).await?;
            bounded(declare_topology(&channel, &self.config.exchange)).await?;
            self.connected.store(true, Ordering::Release);
            *lock(&self.problem) = None;
            tracing::info!(exchange = %self.config.exchange, from_seq = self.confirmed() + 1, "RabbitMQ relay: publishing");
            self.pump(&channel).await
        }
        .await;
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            connection.close(200, "turnstile relay closing".into()),
        )
        .await;
        result
    }

    /// Publishes from the first unconfirmed event on, until stopped or something fails.
    async fn pump(&self, channel: &lapin::Channel) -> Result<(), SessionError> {
        let window_max = self.config.window.max(1);
        let mut window: VecDeque<(u64, i64, lapin::PublisherConfirm)> = VecDeque::new();
        let mut events: Reader<Event, dyn Journal> = Reader::new(
            Arc::clone(&self.journal),
            self.confirmed(),
            window_max.max(256),
        );
        let mut last_save = Instant::now();
        let mut starved = false;
        let publish = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        loop {
            // Fill the window.
            while !self.stopping() && window.len() < window_max {
                if events.is_empty() {
                    match events.fill(self.journal.last_event_seq(), u64::MAX).await? {
                        Filled::Items => starved = false,
                        Filled::CaughtUp => break,
                        Filled::Gap => {
                            starved = true;
                            break;
                        }
                        Filled::Pruned { first } => {
                            tracing::error!(
                                first_seq = first,
                                "RabbitMQ relay: events before {first} left the journal before they were sent (the relay was not configured when they were written); sending from {first}"
                            );
                            continue;
                        }
                    }
                }
                let Some(event) = events.pop() else {
                    break;
                };
                let (body, properties) = message(&event, self.config.node.as_deref());
                // Bounded, like every wait on the broker: a connection that hangs (no answer, no
                // close) ends the session instead of stalling the relay until the heartbeat.
                let confirm = bounded(channel.basic_publish(
                    self.config.exchange.as_str().into(),
                    event.status.event_type().into(),
                    publish,
                    &body,
                    properties,
                ))
                .await?;
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                if window.is_empty() {
                    self.oldest_at_ms.store(event.at_ms, Ordering::Release);
                }
                window.push_back((event.seq, event.at_ms, confirm));
            }
            let Some((seq, _, confirm)) = window.pop_front() else {
                self.save().await?;
                if self.stopping() {
                    return Ok(());
                }
                let pause = if starved { GAP_POLL } else { IDLE_POLL };
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = self.stop.notified() => {}
                }
                continue;
            };
            settle(seq, bounded(confirm).await?, &self.stats)?;
            self.confirmed.store(seq, Ordering::Release);
            let next_at = window.front().map(|(_, at, _)| *at);
            self.oldest_at_ms
                .store(next_at.unwrap_or(0), Ordering::Release);
            if last_save.elapsed() >= SAVE_EVERY {
                self.save().await?;
                last_save = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ack_without_a_returned_message_counts_as_delivered() {
        // Proves: NotRequested (no confirm.select) and Nack never move the cursor.
        let stats = Stats::default();
        assert!(settle(1, Confirmation::Ack(None), &stats).is_ok());
        assert!(matches!(
            settle(2, Confirmation::NotRequested, &stats),
            Err(SessionError::NotConfirmed { seq: 2 })
        ));
        assert!(matches!(
            settle(3, Confirmation::Nack(None), &stats),
            Err(SessionError::Nack { seq: 3 })
        ));
        assert_eq!(stats.confirmed.load(Ordering::Relaxed), 1);
        assert_eq!(stats.nacks.load(Ordering::Relaxed), 1);
    }
}
