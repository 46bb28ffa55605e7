//! The command line as clap sees it: every command, its options, their environment variables,
//! defaults and `--help` text.

use super::*;

/// `turnstile`: a checkout engine for flash sales.
#[derive(Debug, Parser)]
#[command(
    name = "turnstile",
    version,
    about = "A checkout engine for flash sales: lock-free stock, idempotent checkouts, a durable group-commit journal.",
    after_help = "`turnstile` alone, or with serve's options, runs `serve`.\nExit codes: 0 normal stop, 1 runtime failure, 2 bad usage or configuration.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// What to run (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve`'s options when no command is named.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the checkout server (the default command); prints `listening on <addr>` once ready.
    Serve(Box<ServeArgs>),
    /// Apply the MySQL/MariaDB migrations embedded in this binary; safe to run again.
    Migrate(MigrateArgs),
    /// The stand-alone payment gateway simulator over HTTP (tokens, idempotency, faults, webhooks, /v1/ledger).
    GatewaySim(GatewaySimArgs),
    /// Inspect and steer the MySQL applier: where its cursor stands, skip a record MySQL refuses for good, or replay the log into the projections
    #[command(long_about = "\
Inspect and steer the MySQL applier, which keeps the projections (orders, order_items,
idempotency_keys, inventory, products, outbox; payments is a view) behind the journal table,
and in --mysql-write-behind also ships the journal itself.

With no action it prints where the applier stands: the last record the projections hold, the
journal's end, the records behind, and the skipped records.

--skip LSN: the applier stopped at a record MySQL refuses for good (/readyz, the log at ERROR and
turnstile_mysql_apply_stopped say which). This records the skip in journal_skips; the running
applier picks it up within a second and goes on. The skipped record's journal row stays (in
write-behind it is written without its claims); its projection is not written. The record stays
in the server's own journal (the data dir in write-behind) and in the MySQL journal table.

--replay-from LSN: applies the journal table's records after LSN to the projections now (with the
server running or not). Records the projections already hold are left alone (the applier's
cursor is read under a lock in each transaction), so a replay never changes what is applied.

Each node keeps its own log in the database (lsns, skips and the applier's cursor are per node):
--node NAME names it; without it, the database's only log is meant, and a database holding the
logs of several nodes is refused (exit 2, naming them).")]
    MysqlApply(MysqlApplyArgs),
    /// Several nodes: operations on the cluster (`cluster forget NODE`)
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Consume order.paid events from RabbitMQ and write one JSON line per paid order (the "confirmation e-mail"), exactly once per order
    #[command(long_about = "\
Consume order.paid events from RabbitMQ and write one JSON line per paid order (the
\"confirmation e-mail\" it would send): {\"order_id\", \"customer_id\", \"total_cents\", \"currency\",
\"items\", \"paid_at\"}.

The queue (--queue) is a durable quorum queue bound to order.paid on --amqp-exchange. Messages are
acked only once their line and their dedup entry (--state) are on disk, and duplicates (the same
message_id) are dropped, so with --out FILE every paid order has exactly one line, across kills
and restarts. A message that cannot be turned into a line goes to the dead-letter queue
<exchange>.dead after --max-attempts deliveries. Stops on SIGTERM or Ctrl-C.")]
    Notify(NotifyArgs),
    /// The operations desk of a running server: stuck holds and their release, payments owed, the journal's state
    #[command(long_about = "\
The operations desk of a running server, over its HTTP API (/v1/admin/..., which exists only with
the server's --admin-token; the same token goes here).

  holds [--older-than D]   orders still holding stock (reserved or payment pending): the stuck
                           inventory locks, oldest first
  release ORDER_ID         release a held order through the engine: its stock back, its
                           authorisation voided, journaled like any change (a paid order is
                           refused: refund it with POST /v1/orders/{id}/cancel)
  payments                 captures, voids and refunds the node still owes the gateway, with their
                           last error, and checkouts waiting on the gateway
  journal                  the journal's state: its checks, lags behind MySQL and RabbitMQ, counters

Prints a table; --json prints the server's answer as it is. Exit 0 on success, 1 when the server
cannot be reached or refuses (its error printed), 2 for bad usage.")]
    Admin(AdminArgs),
}

/// `admin`'s options.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub action: AdminAction,
    /// The server's base URL
    #[arg(
        long,
        env = "TURNSTILE_ADMIN_URL",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL",
        global = true
    )]
    pub url: String,
    /// The server's --admin-token
    #[arg(
        long,
        env = "TURNSTILE_ADMIN_TOKEN",
        value_name = "T",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// Print the server's JSON answer instead of a table
    #[arg(long, global = true)]
    pub json: bool,
}

/// What `admin` does.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminAction {
    /// Orders still holding stock (the stuck inventory locks), oldest first
    Holds {
        /// Only holds at least this old (500ms, 90s, 15m...)
        #[arg(long, value_name = "DURATION", value_parser = duration)]
        older_than: Option<Duration>,
    },
    /// Release a held order through the engine (stock back, authorisation voided)
    Release {
        /// The order to release
        order_id: String,
    },
    /// Payments owed to the gateway, and checkouts waiting on it
    Payments,
    /// The journal's state and lags
    Journal,
}

/// `notify`'s options.
#[derive(Debug, Clone, Args)]
pub struct NotifyArgs {
    /// The RabbitMQ broker (amqp://user:pass@host:5672/%2f)
    #[arg(
        long,
        env = "TURNSTILE_AMQP_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// The exchange the server publishes to
    #[arg(long, env = "TURNSTILE_AMQP_EXCHANGE", default_value = "turnstile.orders", value_name = "NAME", value_parser = amqp_name)]
    pub amqp_exchange: String,
    /// The queue to consume (declared durable, bound to order.paid)
    #[arg(long, default_value = "turnstile.notify", value_name = "Q", value_parser = amqp_name)]
    pub queue: String,
    /// Where the lines go (default: stdout)
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// The durable dedup state (message ids already written)
    #[arg(long, default_value = "./notify-state", value_name = "FILE")]
    pub state: PathBuf,
    /// Deliveries of one message before it goes to the dead-letter queue
    #[arg(long, default_value = "5", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,
    /// Messages delivered and not yet acked at most
    #[arg(long, default_value = "64", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
}

/// `mysql-apply`'s options.
#[derive(Debug, Clone, Args)]
pub struct MysqlApplyArgs {
    /// The MySQL/MariaDB database (mysql://user:pass@host:3306/db)
    #[arg(
        long,
        env = "TURNSTILE_MYSQL_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub mysql_url: String,
    /// Let the applier go past this record, which MySQL refuses for good
    #[arg(long, value_name = "LSN", conflicts_with = "replay_from", value_parser = clap::value_parser!(u64).range(1..))]
    pub skip: Option<u64>,
    /// Why (kept in journal_skips)
    #[arg(
        long,
        value_name = "TEXT",
        requires = "skip",
        default_value = "skipped by an operator"
    )]
    pub reason: String,
    /// Apply the journal table's records after this lsn to the projections (already applied ones are left alone)
    #[arg(long, value_name = "LSN")]
    pub replay_from: Option<u64>,
    /// The node whose log to work on (default: the database's only one)
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

/// Lowest TLS version accepted.
/// How requests are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    /// One single-threaded runtime per worker, pinned to its core, each with its own
    /// `SO_REUSEPORT` listener: a connection's requests never leave its core.
    PerCore,
    /// One work-stealing runtime for every connection (tokio's multi-threaded scheduler).
    Shared,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per line (timestamp, level, target, message and fields).
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsMin {
    /// TLS 1.2 and 1.3.
    #[value(name = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    V1_3,
}

/// `serve`'s options. Field names are the option names (`hold_ttl` is `--hold-ttl`, env
/// `TURNSTILE_HOLD_TTL`, config-file key `"hold-ttl"` or `"hold_ttl"`).
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Flags win over environment variables, which win over the config file, which wins over the defaults.\nDurations are written like 500ms, 90s, 15m, 1h, 7d."
)]
pub struct ServeArgs {
    /// HTTP listen address (port 0 picks a free port)
    #[arg(
        long,
        env = "TURNSTILE_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// Embedded journal (write-ahead log) location; one server per dir
    #[arg(
        long,
        env = "TURNSTILE_DATA_DIR",
        default_value = "./data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// How long an unfinished order may hold stock before it is released
    #[arg(long, env = "TURNSTILE_HOLD_TTL", default_value = "15m", value_name = "DURATION", value_parser = positive_duration)]
    pub hold_ttl: Duration,
    /// HMAC key of Turnstile-Signature (default: random at start; the in-process simulator uses the same)
    #[arg(long, env = "TURNSTILE_WEBHOOK_SECRET", value_name = "S", value_parser = non_empty, hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// How long an authorisation may take before 504
    #[arg(long, env = "TURNSTILE_GATEWAY_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = positive_duration)]
    pub gateway_timeout: Duration,
    /// In-process simulator: how long tok_pending stays undecided before its webhook
    #[arg(long, env = "TURNSTILE_SIM_PENDING_DELAY", default_value = "500ms", value_name = "DURATION", value_parser = duration)]
    pub sim_pending_delay: Duration,
    /// MySQL/MariaDB as the journal instead of the embedded one (mysql://user:pass@host:3306/db; run `turnstile migrate` first)
    #[arg(
        long,
        env = "TURNSTILE_MYSQL_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub mysql_url: Option<String>,
    /// With --mysql-url: the embedded journal in --data-dir acknowledges, and MySQL is written behind it in order (bounded lag)
    #[arg(long, env = "TURNSTILE_MYSQL_WRITE_BEHIND")]
    pub mysql_write_behind: bool,
    /// How far MySQL may fall behind (age of the oldest record it does not hold yet): past it /readyz answers 503 and, in write-behind, checkouts wait
    #[arg(long, env = "TURNSTILE_MYSQL_LAG_MAX", default_value = "5s", value_name = "DURATION", value_parser = positive_duration)]
    pub mysql_lag_max: Duration,
    /// MySQL connections (the journal's writer uses one; reads share the rest)
    #[arg(long, env = "TURNSTILE_MYSQL_POOL_SIZE", default_value = "8", value_name = "N", value_parser = clap::value_parser!(u32).range(2..=256))]
    pub mysql_pool_size: u32,
    /// Most records in one MySQL transaction (group commit)
    #[arg(long, env = "TURNSTILE_JOURNAL_BATCH_MAX", default_value = "2000", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub journal_batch_max: u64,
    /// How long a request waits for its commit before answering 503 journal_unavailable
    #[arg(long, env = "TURNSTILE_JOURNAL_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = positive_duration)]
    pub journal_timeout: Duration,
    /// How long one MySQL statement or COMMIT may take; past it the connection is dropped and the outcome settled on a new one
    #[arg(long, env = "TURNSTILE_MYSQL_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = positive_duration)]
    pub mysql_timeout: Duration,
    /// How long the answer of a checkout that created an order is kept under its key; past it the key starts afresh
    #[arg(long, env = "TURNSTILE_IDEMPOTENCY_RETENTION", default_value = "24h", value_name = "DURATION", value_parser = positive_duration)]
    pub idempotency_retention: Duration,
    /// Finished orders older than this leave memory (GET /v1/orders/{id} then answers from MySQL when configured, else 404)
    #[arg(long, env = "TURNSTILE_ORDER_RETENTION", default_value = "7d", value_name = "DURATION", value_parser = positive_duration)]
    pub order_retention: Duration,
    /// Events are kept on disk at least this long; only a recent window stays in memory
    #[arg(long, env = "TURNSTILE_EVENT_RETENTION", default_value = "7d", value_name = "DURATION", value_parser = positive_duration)]
    pub event_retention: Duration,
    /// A client that has not sent its whole request headers (and body), or finished its TLS handshake, within this is disconnected
    #[arg(long, env = "TURNSTILE_SLOW_CLIENT_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = positive_duration)]
    pub slow_client_timeout: Duration,
    /// Idle expiry of a cart
    #[arg(long, env = "TURNSTILE_CART_TTL", default_value = "1h", value_name = "DURATION", value_parser = positive_duration)]
    pub cart_ttl: Duration,
    /// Live carts at most; past it POST /v1/carts answers 503 overloaded
    #[arg(long, env = "TURNSTILE_CARTS_MAX", default_value = "1000000", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub carts_max: u64,
    /// How requests are served: per-core (one pinned single-threaded runtime per worker, each with its own SO_REUSEPORT listener) or shared (one work-stealing runtime)
    #[arg(
        long,
        env = "TURNSTILE_RUNTIME",
        value_enum,
        default_value = "per-core",
        value_name = "KIND"
    )]
    pub runtime: RuntimeKind,
    /// Worker threads serving requests (default: one per physical core this process may use)
    #[arg(long, env = "TURNSTILE_WORKERS", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: Option<u64>,
    /// Pin each per-core worker to its core (the default; where the OS refuses, it is logged and the worker runs unpinned)
    #[arg(long, overrides_with = "no_pin")]
    pub pin: bool,
    /// Do not pin the per-core workers
    #[arg(long, env = "TURNSTILE_NO_PIN", overrides_with = "pin")]
    pub no_pin: bool,
    /// Open client connections at most; past it new connections wait in the kernel's backlog until one closes
    #[arg(long, env = "TURNSTILE_CONNECTIONS_MAX", default_value = "10000", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub connections_max: u64,
    /// Bytes of answers not yet sent to their clients at most, across all connections (in the handlers' bodies and in HTTP/2's send buffers); past it a large read's answer is 503 overloaded, and past it plus a quarter a write is refused before it runs
    #[arg(long, env = "TURNSTILE_RESPONSE_BYTES_MAX", default_value = "134217728", value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1_048_576..=1 << 40))]
    pub response_bytes_max: u64,
    /// Live stock streams (GET /v1/products/{sku}/stream) open at most; past it 503 overloaded. They do not count against --connections-max
    #[arg(long, env = "TURNSTILE_STREAMS_MAX", default_value = "100000", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub streams_max: u64,
    /// How long an admitted waiting-room ticket stays valid for its checkout
    #[arg(long, env = "TURNSTILE_TICKET_TTL", default_value = "5m", value_name = "DURATION", value_parser = positive_duration)]
    pub ticket_ttl: Duration,
    /// Signs waiting-room tickets, so any node can check them (default: --cluster-secret with several nodes, else random at start: a restart then refuses earlier tickets)
    #[arg(long, env = "TURNSTILE_TICKET_SECRET", value_name = "SECRET", value_parser = non_empty, hide_env_values = true)]
    pub ticket_secret: Option<String>,
    /// Checkouts past their hold (authorising, committing) at most at once; past it 503 overloaded with Retry-After
    #[arg(long, env = "TURNSTILE_CHECKOUTS_IN_FLIGHT_MAX", default_value = "10000", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub checkouts_in_flight_max: u64,
    /// Listen backlog: connections the kernel queues before they are accepted (capped by net.core.somaxconn)
    #[arg(long, env = "TURNSTILE_LISTEN_BACKLOG", default_value = "4096", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub listen_backlog: u32,
    /// TCP_NODELAY on client connections: small answers leave at once instead of waiting for Nagle's algorithm
    #[arg(long, env = "TURNSTILE_TCP_NODELAY", default_value = "true", value_name = "BOOL", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub tcp_nodelay: bool,
    /// SO_RCVBUF of client connections in bytes (default: the kernel's, which autotunes; setting it turns autotuning off)
    #[arg(long, env = "TURNSTILE_SOCKET_RECV_BUFFER", value_name = "BYTES", value_parser = clap::value_parser!(u32).range(4_096..=64 * 1024 * 1024))]
    pub socket_recv_buffer: Option<u32>,
    /// SO_SNDBUF of client connections in bytes (default: the kernel's, which autotunes; setting it turns autotuning off)
    #[arg(long, env = "TURNSTILE_SOCKET_SEND_BUFFER", value_name = "BYTES", value_parser = clap::value_parser!(u32).range(4_096..=64 * 1024 * 1024))]
    pub socket_send_buffer: Option<u32>,
    /// Serve HTTPS with this PEM certificate chain (TLS 1.3, HTTP/2 and HTTP/1.1 by ALPN); needs --tls-key
    #[arg(long, env = "TURNSTILE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1)
    #[arg(long, env = "TURNSTILE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Lowest TLS version accepted with --tls-cert
    #[arg(
        long,
        env = "TURNSTILE_TLS_MIN",
        default_value = "1.3",
        value_name = "VERSION"
    )]
    pub tls_min: TlsMin,
    /// Carts, submission locks and finished answers in Redis, shared by every node (redis://host:6379[/db]; a Redis Cluster: its nodes, comma-separated); without it carts live in this process
    #[arg(
        long,
        env = "TURNSTILE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (give each deployment or test its own)
    #[arg(long, env = "TURNSTILE_REDIS_PREFIX", default_value = "turnstile:", value_name = "P", value_parser = redis_prefix)]
    pub redis_prefix: String,
    /// How long one Redis call may take before it fails (carts and checkouts then answer 503 session_store_unavailable)
    #[arg(long, env = "TURNSTILE_REDIS_TIMEOUT", default_value = "1s", value_name = "DURATION", value_parser = positive_duration)]
    pub redis_timeout: Duration,
    /// One node only: with Redis unreachable, checkouts that name their items go on under this node's own key table (carts still answer 503). Without it such checkouts answer 503, since another node may hold the key
    #[arg(long, env = "TURNSTILE_REDIS_OPTIONAL")]
    pub redis_optional: bool,
    /// How long a checkout's submission lock lives in Redis unless renewed; the node renews it while the checkout's outcome is unknown (must exceed --redis-timeout plus --gateway-timeout plus --journal-timeout)
    #[arg(long, env = "TURNSTILE_REDIS_LOCK_TTL", default_value = "60s", value_name = "DURATION", value_parser = positive_duration)]
    pub redis_lock_ttl: Duration,
    /// Also publish every order event to RabbitMQ, with publisher confirms (amqp://user:pass@host:5672/%2f); the event log stays readable
    #[arg(
        long,
        env = "TURNSTILE_AMQP_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub amqp_url: Option<String>,
    /// The durable topic exchange order events are published to (routing key = event type)
    #[arg(long, env = "TURNSTILE_AMQP_EXCHANGE", default_value = "turnstile.orders", value_name = "NAME", value_parser = amqp_name)]
    pub amqp_exchange: String,
    /// Events RabbitMQ has not confirmed at most (they wait on disk): past it checkouts get 503 overloaded until the broker takes them
    #[arg(long, env = "TURNSTILE_AMQP_UNCONFIRMED_MAX", default_value = "50000000", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub amqp_unconfirmed_max: u64,
    /// Messages published to RabbitMQ and not yet confirmed at most (the relay's window)
    #[arg(long, env = "TURNSTILE_AMQP_WINDOW", default_value = "1024", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65_535))]
    pub amqp_window: u64,
    /// Payment gateway over HTTP instead of the in-process simulator (http://host:port or https://…; `turnstile gateway-sim` speaks its protocol)
    #[arg(
        long,
        env = "TURNSTILE_GATEWAY_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub gateway_url: Option<String>,
    /// The reconciler finishes payments left pending, owed or orphaned for longer than this (must exceed --gateway-timeout plus --journal-timeout)
    #[arg(long, env = "TURNSTILE_RECONCILE_AFTER", default_value = "60s", value_name = "DURATION", value_parser = positive_duration)]
    pub reconcile_after: Duration,
    /// Log lines as text, or one JSON object per line (filtered by RUST_LOG, default info)
    #[arg(
        long,
        env = "TURNSTILE_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
    /// Append the log to this file instead of standard error
    #[arg(long, env = "TURNSTILE_LOG_FILE", value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// On SIGTERM/SIGINT, answer /readyz 503 at once and serve on for this long before stopping accepting, so load balancers that probe /readyz (or an ingress still routing here) take this node out first (a Kubernetes preStop sleep does the same before the signal); 0s stops accepting at once
    #[arg(long, env = "TURNSTILE_SHUTDOWN_DELAY", default_value = "0s", value_name = "DURATION", value_parser = duration)]
    pub shutdown_delay: Duration,
    /// Bearer token of the operations desk (/v1/admin/...; without it those paths answer 404); set, only /metrics, /readyz and /healthz asked with it may use the reserve past --response-bytes-max
    #[arg(long, env = "TURNSTILE_ADMIN_TOKEN", value_name = "T", value_parser = non_empty, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Several nodes selling one stock: this node's name, 1-63 characters [a-z0-9-] (a DNS label, like a pod name); needs --mysql-url, --redis-url and --cluster-secret
    #[arg(long, env = "TURNSTILE_NODE_ID", value_name = "NAME", value_parser = node_id)]
    pub node_id: Option<String>,
    /// With --node-id: where the other nodes reach this one (default http://<--listen>; never an unspecified address such as 0.0.0.0)
    #[arg(long, env = "TURNSTILE_ADVERTISE_URL", value_name = "URL")]
    pub advertise_url: Option<String>,
    /// With --node-id: the key that signs every call between nodes (the same on every node; it never travels)
    #[arg(long, env = "TURNSTILE_CLUSTER_SECRET", value_name = "S", value_parser = non_empty, hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// With --node-id: a node that has not renewed its leases for this long is presumed dead
    #[arg(long, env = "TURNSTILE_LEASE_TTL", default_value = "10s", value_name = "DURATION", value_parser = positive_duration)]
    pub lease_ttl: Duration,
    /// JSON config file (keys = option names, e.g. "data-dir"); refused unless only its owner may read it (chmod 600)
    #[arg(long, env = "TURNSTILE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `turnstile cluster ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCommand {
    /// Declare a dead node's disk lost: its lease goes back to the pool and its open orders to a live node
    #[command(long_about = "\
Declare a dead node's disk lost. With --mysql-write-behind a node's acknowledged orders may be
on its own disk only, so nothing of a dead write-behind node is ever given away: its lease and
its open orders wait for it to start again on its data dir. When that disk is gone for good, this
command says so: the node is marked dead, and its lease and open orders are handled as those of a
node with MySQL as its journal (its journal in MySQL fenced, its unsold units back in the pool,
its open orders adopted by a live node).

It prints how many events (order changes) the node had acknowledged that MySQL never received:
those orders are lost with the disk. Refused (exit 2) while the node is alive (renewed within
--lease-ttl), or for a node the database does not know.")]
    Forget(ForgetArgs),
}

/// `cluster forget`'s options.
#[derive(Debug, Clone, Args)]
pub struct ForgetArgs {
    /// The node (its --node-id)
    #[arg(value_name = "NODE", value_parser = node_id)]
    pub node: String,
    /// The database the nodes share (mysql://user:pass@host:3306/db)
    #[arg(
        long,
        env = "TURNSTILE_MYSQL_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub mysql_url: String,
    /// The nodes' --lease-ttl: a node renewed within it is alive and is not forgotten
    #[arg(long, env = "TURNSTILE_LEASE_TTL", default_value = "10s", value_name = "DURATION", value_parser = positive_duration)]
    pub lease_ttl: Duration,
}

/// `migrate`'s options.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The MySQL/MariaDB database to migrate (mysql://user:pass@host:3306/db)
    #[arg(
        long,
        env = "TURNSTILE_MYSQL_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub mysql_url: String,
}

/// `gateway-sim`'s options (the contract in API.md; the simulator itself arrives with the payment
/// gateway issue).
#[derive(Debug, Clone, Args)]
pub struct GatewaySimArgs {
    /// Listen address
    #[arg(long, default_value = "127.0.0.1:8090", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Where to send signed webhooks
    #[arg(long, value_name = "URL")]
    pub webhook_url: Option<String>,
    /// HMAC key of the webhooks
    #[arg(long, value_name = "S", value_parser = non_empty)]
    pub webhook_secret: Option<String>,
    /// Mean added latency per call
    #[arg(long, default_value = "0s", value_name = "DURATION", value_parser = duration)]
    pub latency: Duration,
    /// Fraction (0–1) of calls that never answer
    #[arg(long, default_value = "0", value_name = "RATE", value_parser = fraction)]
    pub fail_timeout: f64,
    /// Fraction (0–1) of calls answered 5xx
    #[arg(long = "fail-5xx", default_value = "0", value_name = "RATE", value_parser = fraction)]
    pub fail_5xx: f64,
    /// Fraction (0–1) of authorisations done, then the connection dropped before the answer
    #[arg(long, default_value = "0", value_name = "RATE", value_parser = fraction)]
    pub fail_drop: f64,
    /// When tok_pending is decided and its webhook sent
    #[arg(long, default_value = "500ms", value_name = "DURATION", value_parser = duration)]
    pub pending_delay: Duration,
}
