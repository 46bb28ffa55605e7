//! Wiring and lifecycle: take the data dir, open the journal, rebuild the engine, serve HTTP
//! ([`crate::connections`]), sweep expired holds, and on SIGTERM/SIGINT stop accepting, finish
//! in-flight requests, flush the journal, return.
//!
//! `serve` reads as the order of things: one builder function per part (`open_journal`,
//! `build_engine`, `build_payments`, `start_relay`, `start_sessions`, `build_app`,
//! `bind_listeners`), then `run_listeners` until the stop signal, then the one `shutdown`, whose
//! doc says the order parts stop in and why.
//!
//! Two runtimes (`--runtime`). **Per-core** (the default): one thread per worker, pinned to a
//! physical core ([`crate::topology`]), each running a single-threaded tokio runtime with its own
//! `SO_REUSEPORT` listener and its own stock shard, so a connection's requests are accepted,
//! decided and answered on one core; the rest (journal writer, MySQL, Redis, RabbitMQ, sweeper)
//! runs on a small work-stealing runtime kept off the workers' cores when cores are left over. A
//! worker keeps its runtime until the journal is flushed, so tasks its requests started (a checkout
//! finishing after its client left, a settlement) end as they would on one runtime. **Shared**: one
//! work-stealing runtime runs everything.

use crate::api;
use crate::app::{self, AppState};
use crate::cluster::{self, Cluster};
use crate::config::{RuntimeKind, ServeConfig};
use crate::connections::{self, ConnectionLimits};
use crate::data_dir::{self, DataDirError};
use crate::engine::idempotency::RejectionLimits;
use crate::engine::records::State;
use crate::engine::{Engine, EngineConfig};
use crate::events::relay::{FileCursor, MySqlCursor, Relay};
use crate::http_client::{ClientOptions, HttpClient, Trust};
use crate::journal::downstream::Cursor;
use crate::journal::file::{FileJournal, FileJournalConfig};
use crate::journal::mysql::{MySqlJournal, SchemaError};
use crate::journal::write_behind::WriteBehindJournal;
use crate::journal::{Journal, JournalError};
use crate::metrics::Metrics;
use crate::payment::http::HttpGateway;
use crate::payment::simulator::{Simulator, SimulatorConfig};
use crate::payment::PaymentGateway;
use crate::sessions::redis::RedisStore;
use crate::sessions::{CartStore, Carts};
use crate::time::now_ms;
use crate::topology::{self, Topology};
use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the RabbitMQ relay may take to stop (confirms in flight, its cursor saved).
const RELAY_STOP_WAIT: Duration = Duration::from_secs(3);

/// The most answers sent again to Redis at start (the newest).
const RECOVERED_ANSWERS_MAX: usize = 1_000_000;

/// How long the Redis finisher may take at shutdown to send the answers and lock releases queued
/// before the node says it waits for Redis (then up to `--redis-lock-ttl` more).
const REDIS_STOP_WAIT: Duration = Duration::from_secs(2);

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The journal could not be opened or recovered.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The journal's content contradicts itself.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The database's schema does not fit this binary (run `turnstile migrate`).
    #[error(transparent)]
    Schema(crate::journal::mysql::SchemaError),
    /// The data dir is held by another process, or cannot be created or locked.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::connections::tls::TlsError),
    /// The outbound HTTP client could not be built.
    #[error("the outbound HTTP client: {0}")]
    HttpClient(#[from] crate::http_client::ClientError),
    /// The kernel's random source failed: no secret or cart id could be made (no fallback).
    #[error(transparent)]
    Random(#[from] crate::random::RandomError),
    /// The listen address cannot be bound (in use, not this host's, not allowed): a configuration
    /// error.
    #[error("cannot listen on {addr}: {source} (choose another --listen)")]
    Listen {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Several nodes: the cluster's tables in MySQL could not be read or written at start.
    #[error("several nodes: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A socket, the runtime or a signal handler failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// A prefix for this run's order ids: the start time in microseconds, so ids differ across runs.
pub fn order_id_prefix() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("ord_{micros:x}_")
}

/// Runs the server until a stop signal.
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    // Checked before anything else is touched: a bad certificate is a configuration error.
    let tls = config
        .tls
        .as_ref()
        .map(crate::connections::tls::server_config)
        .transpose()?;
    // Taken before anything reads the journal, and held until the journal has been flushed and
    // `run` returns. MySQL as the journal uses no data dir, so it takes no lock.
    let _data_dir_lock = match (&config.mysql, config.mysql_write_behind) {
        (Some(_), false) => None,
        _ => Some(data_dir::lock(&config.data_dir)?),
    };
    let topology = Topology::detect();
    let workers = config.workers.unwrap_or(topology.cores.len()).max(1);
    let (background_threads, placement) = match config.runtime {
        RuntimeKind::Shared => {
            tracing::info!(
                workers,
                "shared runtime: one work-stealing runtime of {workers} threads serves every connection"
            );
            (workers, None)
        }
        RuntimeKind::PerCore => {
            let spare = topology.spare_cpus(workers);
            tracing::info!(
                workers,
                cores = topology.cores.len(),
                nodes = topology.nodes(),
                topology = %topology.source,
                "per-core runtime: one single-threaded runtime and SO_REUSEPORT listener per worker"
            );
            // Background threads (journal, snapshots, MySQL, Redis, RabbitMQ, timers) are started
            // from here on and inherit this thread's mask: off the workers' cores when some are
            // left over.
            if config.pin && !spare.is_empty() {
                match topology::pin_current_thread(&spare) {
                    Ok(()) => tracing::info!(
                        cpus = ?spare,
                        "background threads kept off the workers' cores"
                    ),
                    Err(error) => tracing::warn!(
                        %error,
                        "could not keep background threads off the workers' cores; they run anywhere"
                    ),
                }
            } else {
                tracing::info!(
                    "background threads share the workers' cores (no core is left over for them)"
                );
            }
            (
                spare.len().max(2),
                Some(Placement {
                    topology,
                    pin: config.pin,
                }),
            )
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(background_threads)
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            context: "starting the async runtime".into(),
            source,
        })?;
    runtime.block_on(serve(config, workers, placement, tls))
}

/// Where the per-core workers go.
struct Placement {
    topology: Topology,
    pin: bool,
}

/// Builds the parts in order (the node's name, then the journal, which holds that node's log:
/// everything else is rebuilt from it), serves until the stop signal, then stops the parts in
/// the one order [`shutdown`] writes down.
async fn serve(
    config: ServeConfig,
    workers: usize,
    placement: Option<Placement>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(), ServeError> {
    // Installed first: a stop signal during start-up (a pod deleted while its journal is being
    // recovered) ends it, instead of killing the process unflushed or, as a container's PID 1,
    // being ignored until the kubelet's SIGKILL. Start-up writes nothing a crash could not leave
    // (the journal's recovery and MySQL's transactions are crash-safe), so it is given up where it
    // stands; a node already registered in the cluster is then presumed dead past --lease-ttl,
    // as after a crash.
    let mut signal = Box::pin(stop_signal());
    let started = async {
        let node = node_name(&config).await?;
        let cluster = match (&config.cluster, &config.mysql) {
            (Some(cluster), Some(mysql)) => Some(Arc::new(Cluster::new(
                cluster.clone(),
                mysql,
                !config.mysql_write_behind,
            )?)),
            _ => None,
        };
        let Opened {
            journal,
            mut state,
            mysql_pool,
            file_cursor,
        } = open_journal(&config, &node).await?;
        if let Some(cluster) = &cluster {
            // Several nodes: registered first (see `registry::register`), then the catalogue is
            // MySQL's, and this node's stock of each SKU its lease.
            cluster::registry::register(cluster, cluster_mode(&config), journal.writer_turn())
                .await?;
            cluster::adoption::drop_adopted_away(cluster, &*journal, &mut state).await?;
            cluster::adoption::journal_unjournaled_at_start(cluster, &*journal, &mut state).await?;
            state.products = cluster::catalogue::at_start(cluster)
                .await?
                .into_iter()
                .map(|product| (product.sku.clone(), product))
                .collect();
        }
        let engine = build_engine(&config, workers, &state).map_err(|error| match (&cluster, error) {
        // Its disk holds sales its lease in MySQL does not: that lease was settled without them.
        (Some(cluster), ServeError::Engine(crate::engine::EngineError::Inconsistent(what))) => {
            ServeError::Cluster(cluster::ClusterError::Start(format!(
                "node {}'s data dir holds orders beyond its lease in MySQL ({what}): the lease was settled without them (`turnstile cluster forget` declared this disk lost, or the node was presumed dead while its log in MySQL lacked them); this data dir cannot rejoin as this node, nor can a new data dir under the same name (MySQL holds this node's log): start a node with a new --node-id on a new data dir (its units and orders are the cluster's now), and keep this data dir to look at",
                cluster.node()
            )))
        }
        (_, error) => error,
    })?;
        drop(state);
        let payments = build_payments(&config)?;
        let relay = start_relay(&config, &journal, file_cursor, mysql_pool, &node).await?;
        let (carts, redis) = start_sessions(&config, &engine, &node).await?;
        let simulator = Arc::clone(&payments.simulator);
        let waiting_room = build_waiting_room(&config, &carts)?;
        let shared_limits = match (&cluster, carts.store()) {
            (Some(_), Some(store)) => Some(cluster::limits::SharedLimits::new(
                Arc::clone(store),
                config.order_retention,
                // A checkout's longest life: a refill, the gateway's answer, then its commit.
                cluster::REFILL_WAIT
                    + config.gateway_timeout
                    + config.journal_timeout
                    + Duration::from_secs(10),
                &engine,
            )?),
            _ => None,
        };
        let app = build_app(
            &config,
            AppParts {
                engine,
                journal: Arc::clone(&journal),
                carts,
                payments,
                waiting_room,
                shared_limits,
                relay: relay.as_ref().map(|(relay, _)| Arc::clone(relay)),
                node,
                cluster: cluster.clone(),
            },
        );
        let listeners = bind_listeners(&config, workers, placement)?;
        let local = listeners.local_addr().map_err(|source| ServeError::Io {
            context: "reading the listen address".into(),
            source,
        })?;
        simulator.set_webhook_target(local, tls.is_some());
        let cluster = match cluster {
            Some(cluster) => Some(join_cluster(&app, cluster, local, tls.is_some()).await?),
            None => None,
        };
        announce(&config, &app, local, tls.is_some());
        Ok::<_, ServeError>((app, relay, redis, journal, cluster, listeners, local))
    };
    let (app, relay, redis, journal, cluster, listeners, local) = tokio::select! {
        started = started => started?,
        () = &mut signal => {
            tracing::warn!("stop signal during start-up: stopping before serving anything");
            return Ok(());
        }
    };
    // From the ready line on, SIGTERM is the clean stop `shutdown` writes down.
    let stop = {
        let (app, delay) = (Arc::clone(&app), config.shutdown_delay);
        async move {
            stopping(Arc::clone(&app), signal, delay).await;
            // Accepting stops now: the live stock streams end, so the drain waits for none.
            app.streams.close();
        }
    };
    // The contract's ready line (API.md), on standard output for scripts to wait on.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "listening on {local}").and_then(|()| stdout.flush());
    drop(stdout);

    let background = vec![
        tokio::spawn(app::streams::feed(Arc::clone(&app))),
        tokio::spawn(app::sweep::sweep(Arc::clone(&app), config.hold_ttl)),
        tokio::spawn(app::money::reconcile(
            Arc::clone(&app),
            config.reconcile_after,
        )),
    ];
    let limits = ConnectionLimits {
        slow_client_timeout: config.slow_client_timeout,
        connections_max: config.connections_max,
        nodelay: config.socket.nodelay,
        response_budget: app.response_budget,
    };
    // Per-core workers keep their runtimes (and the tasks requests started on them) until the
    // journal is flushed: the guard releases them when `serve` returns.
    let _workers =
        run_listeners(listeners, api::router(Arc::clone(&app)), limits, tls, stop).await?;
    shutdown(Stopping {
        app,
        background,
        relay,
        redis,
        journal,
        cluster,
        checkouts_bound: config.gateway_timeout + config.journal_timeout,
        checkouts_max: config.checkouts_in_flight_max,
    })
    .await;
    Ok(())
}

/// What the handlers share, built from the configuration.
struct AppParts {
    engine: Engine,
    journal: Arc<dyn Journal>,
    carts: Carts,
    payments: Payments,
    waiting_room: Arc<app::waiting_room::WaitingRoom>,
    shared_limits: Option<Arc<cluster::limits::SharedLimits>>,
    relay: Option<Arc<Relay>>,
    node: String,
    cluster: Option<Arc<Cluster>>,
}

fn build_app(config: &ServeConfig, parts: AppParts) -> Arc<AppState> {
    Arc::new(AppState {
        engine: parts.engine,
        journal: parts.journal,
        carts: parts.carts,
        gateway: parts.payments.gateway,
        webhook_secret: parts.payments.webhook_secret,
        gateway_timeout: config.gateway_timeout,
        journal_timeout: config.journal_timeout,
        slow_client_timeout: config.slow_client_timeout,
        metrics: Metrics::new(api::ROUTES),
        settled: tokio::sync::Notify::new(),
        checkouts_in_flight: Arc::new(tokio::sync::Semaphore::new(config.checkouts_in_flight_max)),
        settler: app::money::Settler::default(),
        relay: parts.relay,
        // Several nodes on a MySQL journal: the database's claims guard a key across every
        // node, so checkouts naming their items go on while Redis is down (write-behind nodes,
        // whose journal acknowledges before MySQL sees the claim, answer 503 instead).
        redis_optional: config.redis_optional
            || (config.cluster.is_some() && config.mysql.is_some() && !config.mysql_write_behind),
        response_budget: connections::ResponseBudget::leak(
            config.response_bytes_max,
            config.admin_token.as_deref(),
        ),
        node: parts.node,
        admin_token: config.admin_token.clone(),
        cluster: parts.cluster,
        stopping: std::sync::atomic::AtomicBool::new(false),
        streams: app::streams::StockStreams::new(config.streams_max),
        waiting_room: parts.waiting_room,
        shared_limits: parts.shared_limits,
    })
}

/// The waiting rooms: tickets signed with `--ticket-secret` (else the cluster's secret, else a
/// random one), their queues and claims in Redis when it is configured.
fn build_waiting_room(
    config: &ServeConfig,
    carts: &Carts,
) -> Result<Arc<app::waiting_room::WaitingRoom>, ServeError> {
    let secret = match (&config.ticket_secret, &config.cluster) {
        (Some(secret), _) => secret.as_bytes().to_vec(),
        (None, Some(cluster)) => {
            [b"turnstile-tickets:".as_slice(), cluster.secret.as_bytes()].concat()
        }
        (None, None) => crate::random::random_bytes(32)?,
    };
    Ok(Arc::new(app::waiting_room::WaitingRoom::new(
        secret,
        config.ticket_ttl,
        carts.store().cloned(),
    )?))
}

/// The RabbitMQ relay's cursor when it lives in the data dir: the cursor, the seq it confirmed,
/// and the shared value the embedded journal's retention holds events after.
type FileCursorAt = (FileCursor, u64, Arc<AtomicU64>);

/// The journal as start-up opened it, with the durable state it recovered.
struct Opened {
    journal: Arc<dyn Journal>,
    state: State,
    /// MySQL as the journal: its pool (the relay keeps its cursor there).
    mysql_pool: Option<sqlx::MySqlPool>,
    /// The relay's cursor in the data dir, read before the journal opened.
    file_cursor: Option<FileCursorAt>,
}

/// A schema error as the server reports it: an outage is the journal's, the rest the operator's.
fn schema_error(error: SchemaError) -> ServeError {
    match error {
        SchemaError::Journal(error) => ServeError::Journal(error),
        other => ServeError::Schema(other),
    }
}

/// Opens the journal the configuration names (embedded, MySQL, or embedded with MySQL behind),
/// after the relay's cursor in the data dir, whose retention keeps every event after it. With
/// MySQL, the journal is `node`'s log in the database.
async fn open_journal(config: &ServeConfig, node: &str) -> Result<Opened, ServeError> {
    let mysql_journal = config.mysql.is_some() && !config.mysql_write_behind;
    let file_cursor = match (&config.amqp, mysql_journal) {
        (Some(_), false) => {
            let cursor = FileCursor::new(&config.data_dir);
            let confirmed = cursor.load_now().map_err(|message| JournalError::Io {
                context: "reading the RabbitMQ relay's cursor".into(),
                message,
            })?;
            Some((cursor, confirmed, Arc::new(AtomicU64::new(confirmed))))
        }
        _ => None,
    };
    let file_config = FileJournalConfig {
        event_retention_ms: config.event_retention.as_millis() as i64,
        order_retention_ms: config.order_retention.as_millis() as i64,
        answer_retention_ms: config.idempotency_retention.as_millis() as i64,
        hold_events_after_seq: file_cursor.as_ref().map(|(_, _, hold)| Arc::clone(hold)),
        ..FileJournalConfig::default()
    };
    let Some(mysql) = &config.mysql else {
        let (journal, state) = FileJournal::open_dir(&config.data_dir, file_config)?;
        return Ok(Opened {
            journal: Arc::new(journal),
            state,
            mysql_pool: None,
            file_cursor,
        });
    };
    let mut mysql = mysql.clone();
    node.clone_into(&mut mysql.node);
    mysql.retention = crate::journal::mysql::Retention {
        order_ms: config.order_retention.as_millis() as i64,
        answer_ms: config.idempotency_retention.as_millis() as i64,
    };
    if config.mysql_write_behind {
        let (journal, state) =
            WriteBehindJournal::open(&config.data_dir, file_config, mysql, config.journal_timeout)
                .await
                .map_err(schema_error)?;
        return Ok(Opened {
            journal: Arc::new(journal),
            state,
            mysql_pool: None,
            file_cursor,
        });
    }
    let (journal, state) = MySqlJournal::open(mysql).await.map_err(schema_error)?;
    Ok(Opened {
        mysql_pool: Some(journal.pool().clone()),
        journal: Arc::new(journal),
        state,
        file_cursor,
    })
}

/// This node's name: in its Redis lock values and in the idempotency keys of its authorisations,
/// so nodes sharing a gateway each reconcile only their own. The name belongs to the journal that
/// holds the orders those authorisations are judged against: kept in the data dir with the file
/// journal; with MySQL as the journal, kept in it alone (the data dir may be new while the journal
/// is not), a new database getting a new name (never the data dir's, which belongs to the journal
/// it was made with, and is left as it is: a data dir used once with MySQL and then again with its
/// own journal is still its own node, not the database's). Write-behind's journal is the data
/// dir's, so its node is the data dir's too. Decided before the journal opens: with MySQL, the
/// journal is this node's log in the database (several nodes keep theirs in one database).
async fn node_name(config: &ServeConfig) -> Result<String, ServeError> {
    let io = |source| ServeError::Io {
        context: format!(
            "keeping the node's name ({} in the data dir)",
            data_dir::NODE_NAME_FILE
        ),
        source,
    };
    // Several nodes: the node's name is its --node-id, in MySQL as on its disk.
    if let Some(cluster) = &config.cluster {
        return Ok(cluster.node_id.clone());
    }
    let mysql = match &config.mysql {
        Some(mysql) if !config.mysql_write_behind => mysql,
        _ => return data_dir::node_name(&config.data_dir).map_err(io),
    };
    let proposed = data_dir::name_for_new_journal(&config.data_dir).map_err(io)?;
    crate::journal::mysql::journal_node(mysql, &proposed)
        .await
        .map_err(schema_error)
}

/// The engine, rebuilt from the durable state.
fn build_engine(config: &ServeConfig, workers: usize, state: &State) -> Result<Engine, ServeError> {
    Ok(Engine::from_state(
        EngineConfig {
            shard_count: workers,
            hold_ttl_ms: config.hold_ttl.as_millis() as i64,
            rejections: RejectionLimits::default(),
            answer_retention_ms: config.idempotency_retention.as_millis() as i64,
            order_retention_ms: config.order_retention.as_millis() as i64,
            order_id_prefix: order_id_prefix(),
        },
        state,
    )?)
}

/// The payment side: the gateway checkouts call, the in-process simulator (whose webhooks need
/// the listen address, known later), and the webhook secret.
struct Payments {
    gateway: Arc<dyn PaymentGateway>,
    simulator: Arc<Simulator>,
    webhook_secret: Vec<u8>,
}

fn build_payments(config: &ServeConfig) -> Result<Payments, ServeError> {
    let webhook_secret = match &config.webhook_secret {
        Some(secret) => secret.as_bytes().to_vec(),
        None => crate::random::random_bytes(32)?,
    };
    // The in-process simulator's webhooks go to this server's own listener; their body is
    // authenticated by its signature.
    let client = HttpClient::new(ClientOptions::signed_webhooks())?;
    let simulator = Simulator::new(
        SimulatorConfig {
            webhook_secret: webhook_secret.clone(),
            pending_delay: config.sim_pending_delay,
            webhook_attempts_max: 20,
        },
        client,
    );
    // The gateway over HTTP, when configured: one pooled client, each call bounded by the gateway
    // timeout, certificates checked against the platform's roots.
    let gateway: Arc<dyn PaymentGateway> = match &config.gateway_url {
        Some(url) => {
            let client = HttpClient::new(ClientOptions {
                timeout: config.gateway_timeout,
                connect_timeout: config.gateway_timeout.min(Duration::from_secs(2)),
                idle_timeout: Duration::from_secs(60),
                idle_per_host: 256,
                trust: Trust::Roots(Arc::new(platform_roots())),
                // A gateway's answer is a small JSON object.
                body_max: 1 << 20,
            })?;
            Arc::new(HttpGateway::new(url, client))
        }
        None => Arc::new(Arc::clone(&simulator)),
    };
    Ok(Payments {
        gateway,
        simulator,
        webhook_secret,
    })
}

/// A running RabbitMQ relay, and what says its thread ended.
type RunningRelay = (Arc<Relay>, tokio::sync::oneshot::Receiver<()>);

/// Starts the outbox relay when `--amqp-url` is given, from its durable cursor (the data dir's,
/// or MySQL's `outbox_cursor` when MySQL is the journal).
async fn start_relay(
    config: &ServeConfig,
    journal: &Arc<dyn Journal>,
    file_cursor: Option<FileCursorAt>,
    mysql_pool: Option<sqlx::MySqlPool>,
    node: &str,
) -> Result<Option<RunningRelay>, ServeError> {
    let relay = match (&config.amqp, file_cursor, mysql_pool) {
        (Some(amqp), Some((cursor, confirmed, hold)), _) => Relay::new(
            amqp.clone(),
            Arc::clone(journal),
            Box::new(cursor),
            confirmed,
            Some(hold),
        ),
        (Some(amqp), None, Some(pool)) => {
            let cursor = MySqlCursor::new(pool, node.to_owned());
            let confirmed = cursor.load().await.map_err(JournalError::Unavailable)?;
            Relay::new(
                amqp.clone(),
                Arc::clone(journal),
                Box::new(cursor),
                confirmed,
                None,
            )
        }
        _ => return Ok(None),
    };
    // A cursor past the journal's last event (a data dir restored from an older backup, a cursor
    // from another node) would skip every new event up to it: refuse to start rather than lose.
    let last = journal.last_event_seq();
    if relay.confirmed() > last {
        return Err(JournalError::Io {
            context: "checking the RabbitMQ relay's cursor".into(),
            message: format!(
                "the relay's cursor ({} in the data dir, or outbox_cursor in MySQL) says event {} was delivered but the journal ends at event {last}: the events from {} on would never be sent; remove the cursor (every event the journal keeps is sent again) or restore the matching journal",
                crate::events::relay::CURSOR_FILE,
                relay.confirmed(),
                last + 1
            ),
        }
        .into());
    }
    let task = Relay::start(&relay).map_err(|source| ServeError::Io {
        context: "starting the RabbitMQ relay's thread".into(),
        source,
    })?;
    Ok(Some((relay, task)))
}

/// A running Redis store and its tasks (the connection supervisor, the finisher, the renewer).
type RunningRedis = (Arc<RedisStore>, Vec<tokio::task::JoinHandle<()>>);

/// The carts: in process, or in Redis with the submission locks and answers every node shares
/// (connected, and this node's recent answers sent again, see [`RedisStore::recover`]).
async fn start_sessions(
    config: &ServeConfig,
    engine: &Engine,
    node: &str,
) -> Result<(Carts, Option<RunningRedis>), ServeError> {
    let cart_ttl_ms = config.cart_ttl.as_millis() as i64;
    let Some(redis) = &config.redis else {
        return Ok((
            Carts::Memory(CartStore::new(cart_ttl_ms, config.carts_max)?),
            None,
        ));
    };
    let store = Arc::new(
        RedisStore::new(redis, node.to_owned(), now_ms()).map_err(|error| ServeError::Io {
            context: "setting up Redis".into(),
            source: std::io::Error::other(error.to_string()),
        })?,
    );
    let tasks = store.start().await;
    // Answers of the last two lock lifetimes, which a kill may have kept from Redis.
    let now = now_ms();
    let retention = engine.config().answer_retention_ms;
    let recent = engine
        .idempotency()
        .recent_answers(
            now - 2 * store.lock_ttl().as_millis() as i64,
            RECOVERED_ANSWERS_MAX,
        )
        .into_iter()
        .map(|(key, answer)| {
            let ttl_ms = answer.at_ms + retention - now;
            (key, (*answer).clone(), ttl_ms)
        })
        // A key past its retention may start afresh here: its old answer is not sent, nor its
        // lock (maybe this run's own by then) freed.
        .filter(|(_, _, ttl_ms)| *ttl_ms > 0)
        .collect();
    store.recover(recent);
    Ok((
        Carts::redis(Arc::clone(&store), cart_ttl_ms, config.carts_max)?,
        Some((store, tasks)),
    ))
}

/// The listening sockets: one, or one per per-core worker (`SO_REUSEPORT`).
fn bind_listeners(
    config: &ServeConfig,
    workers: usize,
    placement: Option<Placement>,
) -> Result<Listeners, ServeError> {
    let listen_error = |source| ServeError::Listen {
        addr: config.listen,
        source,
    };
    connections::check_kernel_limits(config.socket.backlog, config.connections_max);
    Ok(match placement {
        None => Listeners::Shared(
            connections::bind(config.listen, &config.socket).map_err(listen_error)?,
        ),
        Some(placement) => Listeners::PerCore(
            connections::bind_per_core(config.listen, &config.socket, workers)
                .map_err(listen_error)?,
            placement,
        ),
    })
}

/// The start-up line: what this node serves with.
fn announce(config: &ServeConfig, app: &AppState, local: std::net::SocketAddr, tls: bool) {
    tracing::info!(
        %local,
        tls,
        journal = match (&config.mysql, config.mysql_write_behind) {
            (Some(_), true) => "embedded, MySQL written behind",
            (Some(_), false) => "mysql",
            (None, _) => "embedded",
        },
        data_dir = %config.data_dir.display(),
        node = %app.node,
        skus = app.engine.inventory().len(),
        holds = app.engine.holds_len(),
        gateway = config.gateway_url.as_deref().unwrap_or("in-process simulator"),
        carts = match &config.redis {
            Some(redis) => format!("Redis, keys under {}", redis.prefix),
            None => "in process".into(),
        },
        "serving"
    );
}

/// Serves on the listeners until the stop signal and every connection has ended; with per-core
/// workers, returns the guard that keeps their runtimes until the journal is flushed.
async fn run_listeners(
    listeners: Listeners,
    router: axum::Router,
    limits: ConnectionLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Option<Workers>, ServeError> {
    match listeners {
        Listeners::PerCore(listeners, placement) => Ok(Some(
            serve_per_core(listeners, placement, router, limits, tls, stop)
                .await
                .map_err(|source| ServeError::Io {
                    context: "starting the per-core workers".into(),
                    source,
                })?,
        )),
        Listeners::Shared(listener) => {
            connections::serve(listener, router, limits, tls, stop).await;
            Ok(None)
        }
    }
}

/// Several nodes: this node's part and its tasks (renewal, catalogue, leases), stopped together.
struct RunningCluster {
    cluster: Arc<Cluster>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How this node's sales reach MySQL, as `cluster_nodes.mode` says (a reaper settles only the
/// leases of `mysql` nodes).
fn cluster_mode(config: &ServeConfig) -> &'static str {
    if config.mysql_write_behind {
        "write-behind"
    } else {
        "mysql"
    }
}

/// Joins the cluster once the listener is bound (where the others reach this node is known):
/// registers, then starts the renewal, the catalogue's follower and the lease keeper.
async fn join_cluster(
    app: &Arc<AppState>,
    cluster: Arc<Cluster>,
    local: std::net::SocketAddr,
    tls: bool,
) -> Result<RunningCluster, ServeError> {
    cluster.bound(local, tls);
    cluster::registry::advertise(&cluster).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = vec![
        tokio::spawn(cluster::reaper::reap(
            Arc::clone(&cluster),
            Arc::clone(app),
            stopped.clone(),
        )),
        tokio::spawn(cluster::registry::renew(
            Arc::clone(&cluster),
            Arc::clone(app),
            stopped.clone(),
        )),
        tokio::spawn(cluster::catalogue::follow(
            Arc::clone(&cluster),
            Arc::clone(app),
            stopped.clone(),
        )),
        tokio::spawn(cluster::leases::keep(
            Arc::clone(&cluster),
            Arc::clone(app),
            stopped.clone(),
        )),
    ];
    if let Some(limits) = &app.shared_limits {
        tasks.push(tokio::spawn(
            Arc::clone(limits).run(Arc::clone(app), stopped),
        ));
    }
    Ok(RunningCluster {
        cluster,
        stop,
        tasks,
    })
}

/// What is still running once the listeners have stopped.
struct Stopping {
    app: Arc<AppState>,
    /// The hold sweeper and the reconciler.
    background: Vec<tokio::task::JoinHandle<()>>,
    relay: Option<RunningRelay>,
    redis: Option<RunningRedis>,
    journal: Arc<dyn Journal>,
    cluster: Option<RunningCluster>,
    /// How long a checkout still running may take to finish.
    checkouts_bound: Duration,
    /// `--checkouts-in-flight-max`: the permits every running checkout holds one of.
    checkouts_max: usize,
}

/// How long the shutdown waits for the live stock streams' connections to finish.
const STREAMS_STOP_WAIT: Duration = Duration::from_secs(5);

/// The one shutdown. From the stop signal the node answers `/readyz` 503 and serves on for
/// `--shutdown-delay` ([`stopping`]); then the listeners stop accepting, and once every
/// connection has ended (its in-flight requests answered), in this order:
/// 1. the background tasks that start new work (the hold sweeper, the reconciler) stop;
/// 2. the RabbitMQ relay stops, its cursor saved: its last save may need the journal's database
///    (MySQL), so before the journal; events not confirmed are sent after the next start;
/// 3. checkouts whose clients went away finish (each in its own task: journal, answer, lock)
///    within their own timeouts, so nothing of theirs is cut half way;
/// 4. Redis gets the answers and lock releases still queued: with Redis unreachable the node
///    waits for it until those locks expire (up to `--redis-lock-ttl`), since past that another
///    node may place the same keys again;
/// 5. the journal is flushed and stopped (with MySQL behind it, the applier ships what it can);
/// 6. the per-core workers' runtimes end when `serve` returns.
async fn shutdown(parts: Stopping) {
    for task in &parts.background {
        task.abort();
    }
    // The live stock streams ended when accepting stopped; their connections write their last
    // bytes (a reader that stopped reading is cut by the slow-client rule meanwhile).
    if !parts.app.streams.wait_closed(STREAMS_STOP_WAIT).await {
        tracing::info!(
            open = parts.app.streams.open(),
            "live stock streams still writing their last bytes at shutdown; they are cut"
        );
    }
    if let Some((relay, task)) = parts.relay {
        relay.stop();
        if tokio::time::timeout(RELAY_STOP_WAIT, task).await.is_err() {
            tracing::warn!(
                waiting = relay.lag_events(),
                "RabbitMQ relay did not stop in time; its unconfirmed events are sent after the next start"
            );
        }
    }
    let app = &parts.app;
    let all = u32::try_from(parts.checkouts_max).unwrap_or(u32::MAX);
    let finishing = app.checkouts_in_flight.acquire_many(all);
    if tokio::time::timeout(parts.checkouts_bound, finishing)
        .await
        .is_err()
    {
        tracing::warn!(
            running = parts.checkouts_max - app.checkouts_in_flight.available_permits(),
            "checkouts still running at shutdown; the journal's recovery settles them at the next start"
        );
    }
    let cluster = match parts.cluster {
        Some(running) => Some(give_back_leases(&parts.app, running).await),
        None => None,
    };
    if let Some((store, tasks)) = parts.redis {
        store.stop();
        // The finisher waits for Redis while it holds answers Redis has not taken, until their
        // locks expire: leaving earlier would let another node sell those keys again.
        let limit = tokio::time::Instant::now() + store.lock_ttl() + REDIS_STOP_WAIT;
        let mut tasks = futures_util::future::join_all(tasks);
        if tokio::time::timeout(REDIS_STOP_WAIT, &mut tasks)
            .await
            .is_err()
        {
            tracing::warn!(
                answers = store.ends_waiting(),
                lock_ttl = %humantime::format_duration(store.lock_ttl()),
                "stopping: Redis has not taken the answers of recent checkouts yet; waiting for it until their submission locks expire, so no other node places their keys again"
            );
            if tokio::time::timeout_at(limit, tasks).await.is_err() {
                tracing::warn!("Redis tasks did not stop in time; unreleased submission locks expire by themselves");
            }
        }
    }
    tracing::info!("stopped accepting; in-flight requests finished; flushing the journal");
    let complete = parts.journal.shutdown().await;
    // Only once MySQL holds everything this node journaled: its row says it left, a live node
    // adopts its open orders and judges its old authorisations. Else the row stays live and the
    // node is presumed dead past --lease-ttl: on a MySQL journal a reaper applies the rest of
    // its log first; in write-behind the rest is on its disk, and its lease and orders wait for
    // it to start again.
    if let Some(cluster) = cluster {
        if !complete {
            tracing::warn!("MySQL does not hold everything this node journaled: not marked as left; it is presumed dead past --lease-ttl (on a MySQL journal a reaper applies the rest; in write-behind its lease and open orders wait for it to start again)");
        } else if let Err(error) = cluster::registry::leave(&cluster, app).await {
            tracing::warn!(%error, "could not mark this node as left in cluster_nodes; its open orders wait for it, or for it to be presumed dead");
        }
    }
}

/// Several nodes, at SIGTERM once the checkouts have finished: the cluster's tasks stop and every
/// unsold unit goes back to the pool. (The node's row says it left once its journal is flushed.)
async fn give_back_leases(app: &AppState, running: RunningCluster) -> Arc<Cluster> {
    let _ = running.stop.send(true);
    for task in running.tasks {
        let _ = task.await;
    }
    let cluster = &running.cluster;
    match cluster::leases::give_back_all(cluster, &app.engine).await {
        Ok(units) => tracing::info!(units, "gave this node's unsold units back to the pool"),
        Err(error) => {
            tracing::warn!(%error, "could not give every unsold unit back to the pool; they stay in this node's lease until it starts again")
        }
    }
    Arc::clone(cluster)
}

/// The listening sockets: one for the shared runtime, one per worker for the per-core one.
enum Listeners {
    Shared(tokio::net::TcpListener),
    PerCore(Vec<std::net::TcpListener>, Placement),
}

impl Listeners {
    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Listeners::Shared(listener) => listener.local_addr(),
            Listeners::PerCore(listeners, _) => listeners
                .first()
                .ok_or_else(|| std::io::Error::other("no listener"))?
                .local_addr(),
        }
    }
}

/// Keeps the per-core workers' runtimes alive; dropped, it lets them end.
struct Workers {
    release: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.release.send(true);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a per-core worker panicked");
            }
        }
    }
}

/// Serves on one thread per listener, each with a single-threaded runtime of its own, pinned to
/// its core when asked: a connection is accepted, parsed and answered on one core. Returns once
/// the stop signal came and every connection of every worker has ended.
async fn serve_per_core(
    listeners: Vec<std::net::TcpListener>,
    placement: Placement,
    router: axum::Router,
    limits: ConnectionLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop_signal: impl std::future::Future<Output = ()>,
) -> std::io::Result<Workers> {
    let (stop, stop_seen) = tokio::sync::watch::channel(false);
    let (release, release_seen) = tokio::sync::watch::channel(false);
    let open_connections = Arc::new(tokio::sync::Semaphore::new(limits.connections_max));
    let mut workers = Workers {
        release,
        threads: Vec::new(),
    };
    let mut ended = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let (done, done_seen) = tokio::sync::oneshot::channel::<()>();
        ended.push(done_seen);
        let worker = Worker {
            index,
            core: placement.topology.core_for(index).clone(),
            cpu: placement.topology.cpu_for(index),
            every_cpu: placement.topology.cpus(),
            pin: placement.pin,
            listener,
            router: router.clone(),
            limits,
            open_connections: Arc::clone(&open_connections),
            tls: tls.clone(),
            stop_seen: stop_seen.clone(),
            release_seen: release_seen.clone(),
            done,
        };
        let thread = std::thread::Builder::new()
            .name(format!("turnstile-worker-{index}"))
            .spawn(move || worker.run());
        match thread {
            Ok(thread) => workers.threads.push(thread),
            Err(error) => {
                // The workers already started end with the others' guard.
                let _ = stop.send(true);
                return Err(error);
            }
        }
    }
    stop_signal.await;
    let _ = stop.send(true);
    for done in ended {
        let _ = done.await;
    }
    Ok(workers)
}

/// One per-core worker: a thread pinned to its core (when asked) running a single-threaded
/// runtime that serves its own listener.
struct Worker {
    index: usize,
    core: topology::Core,
    /// The logical CPU it is pinned to (one of `core`'s).
    cpu: usize,
    /// Every CPU this process may use: where an unpinnable worker runs.
    every_cpu: Vec<usize>,
    pin: bool,
    listener: std::net::TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    /// The bound on open connections, shared by every worker.
    open_connections: Arc<tokio::sync::Semaphore>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Becomes true when the server stops accepting.
    stop_seen: tokio::sync::watch::Receiver<bool>,
    /// Becomes true once the journal is flushed: the runtime may end.
    release_seen: tokio::sync::watch::Receiver<bool>,
    /// Sent once every connection of this worker has ended.
    done: tokio::sync::oneshot::Sender<()>,
}

impl Worker {
    /// The worker thread's body.
    fn run(self) {
        let index = self.index;
        if self.pin {
            self.pin_to_core();
        }
        crate::engine::inventory::set_home_shard(index);
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(worker = index, %error, "could not start a worker's runtime; its share of connections waits in the backlog");
                return;
            }
        };
        let Worker {
            listener,
            router,
            limits,
            open_connections,
            tls,
            mut stop_seen,
            mut release_seen,
            done,
            ..
        } = self;
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let stopped = async move {
                        let _ = stop_seen.wait_for(|stop| *stop).await;
                    };
                    connections::serve_sharing(
                        listener,
                        router,
                        limits,
                        open_connections,
                        tls,
                        stopped,
                    )
                    .await;
                }
                Err(error) => {
                    tracing::error!(worker = index, %error, "a worker could not take its listener")
                }
            }
            let _ = done.send(());
            // Tasks requests started here (a checkout finishing, a settlement) go on until the
            // server has flushed its journal.
            let _ = release_seen.wait_for(|release| *release).await;
        });
    }

    fn pin_to_core(&self) {
        let (index, core) = (self.index, &self.core);
        match topology::pin_current_thread(&[self.cpu]) {
            Ok(()) => tracing::info!(
                worker = index,
                cpu = self.cpu,
                node = core.node,
                "worker pinned"
            ),
            Err(error) => {
                tracing::warn!(
                    worker = index,
                    cpu = self.cpu,
                    %error,
                    "pinning not permitted; the worker runs unpinned"
                );
                // Not on the background threads' CPUs it inherited from the main thread:
                // anywhere this process may run.
                if let Err(error) = topology::pin_current_thread(&self.every_cpu) {
                    tracing::debug!(worker = index, %error, "could not widen the worker's CPUs");
                }
            }
        }
    }
}

/// The certificates an `https://` gateway may chain to: the system's store (`/etc/ssl/certs`), read
/// with rustls's PEM parser. Empty if there is none: then only `http://` gateways work, and an
/// `https://` one fails its calls with a certificate error in the log.
pub fn platform_roots() -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for path in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ] {
        if let Ok(certs) = rustls::pki_types::CertificateDer::pem_file_iter(path) {
            let (added, _) = roots.add_parsable_certificates(certs.flatten());
            tracing::debug!(path, added, "trusted roots for the gateway");
            break;
        }
    }
    roots
}

/// Resolves `shutdown_delay` after `signal`: from the signal on, `/readyz` answers 503 (load
/// balancers and probes take the node out) while it serves on; then the listeners stop accepting
/// and the drain begins. A Kubernetes pod's `preStop` sleep plays the same part before the
/// signal; the delay covers whoever learns of a stopping node from `/readyz` alone.
async fn stopping(
    app: Arc<AppState>,
    signal: impl std::future::Future<Output = ()>,
    shutdown_delay: Duration,
) {
    signal.await;
    app.stopping
        .store(true, std::sync::atomic::Ordering::Release);
    if !shutdown_delay.is_zero() {
        tracing::info!(
            delay = %humantime::format_duration(shutdown_delay),
            "stopping: /readyz answers 503; serving on for --shutdown-delay before accepting stops"
        );
        tokio::time::sleep(shutdown_delay).await;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    // The handlers are installed here, at the call, not at the first poll: a SIGTERM that arrives
    // between the ready line and the first poll would otherwise end the process unflushed.
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (Err(error), Ok(mut interrupt)) => {
                tracing::warn!(%error, "no SIGTERM handler; stopping on Ctrl-C only");
                let _ = interrupt.recv().await;
            }
            (Ok(mut terminate), Err(error)) => {
                tracing::warn!(%error, "no SIGINT handler; stopping on SIGTERM only");
                let _ = terminate.recv().await;
            }
            (Err(error), Err(_)) => {
                tracing::error!(%error, "no SIGTERM or SIGINT handler; the server stops only when killed");
                std::future::pending::<()>().await;
            }
        }
        tracing::info!("stop signal received");
    }
}
