//! The command line, on `clap` (derive): `serve` (also `turnstile` alone, or `turnstile --listen …`),
//! `migrate`, `gateway-sim`, `mysql-apply` and `notify`, each with a generated `--help`; an unknown
//! option or a bad value exits 2 with clap's message, and a value checked after parsing (a URL that
//! may hold a password, a floor between options) exits 2 with a message naming the option.
//!
//! A `serve` option comes from, in this order: its flag, its environment variable (clap's `env`),
//! the JSON config file (`--config FILE`, keys = option names), its default. clap knows the first two
//! and the default; the file sits between environment and default, so it is read after a first parse
//! and its values are given to a second parse as flags, only for options whose first value was the
//! default (clap's [`ValueSource`]). The config file is refused when its mode lets group or others in
//! (it may hold secrets).
//!
//! Durations are parsed by `humantime` (`500ms`, `90s`, `15m`, `1h`, `7d`), the same parser as the
//! load-test harness's.

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A configuration the server cannot start with; the message says what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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
cursor is read under a lock in each transaction), so a replay never changes what is applied.")]
    MysqlApply(MysqlApplyArgs),
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
    /// Carts, submission locks and finished answers in Redis, shared by every node (redis://host:6379[/db]); without it carts live in this process
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
    /// Bearer token of the operations desk (/v1/admin/...; without it those paths answer 404); set, only /metrics, /readyz and /healthz asked with it may use the reserve past --response-bytes-max
    #[arg(long, env = "TURNSTILE_ADMIN_TOKEN", value_name = "T", value_parser = non_empty, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// JSON config file (keys = option names, e.g. "data-dir"); refused unless only its owner may read it (chmod 600)
    #[arg(long, env = "TURNSTILE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
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

/// The longest duration accepted: 100 years. Durations become signed milliseconds added to the
/// current time, so a longer one (humantime takes up to 2^64 seconds) would overflow them: expire
/// holds at once, purge idempotency keys at once, or panic.
pub const DURATION_MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a duration: `500ms`, `90s`, `15m`, `1h`, `7d` (humantime's syntax, also `1h 30m`), at
/// most [`DURATION_MAX`].
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let parsed = humantime::parse_duration(raw.trim())
        .map_err(|e| format!("{raw:?} is not a duration like 500ms, 90s, 15m, 1h or 7d ({e})"))?;
    if parsed > DURATION_MAX {
        return Err(format!("{raw:?} is longer than 100 years (36500d)"));
    }
    Ok(parsed)
}

fn duration(raw: &str) -> Result<Duration, String> {
    parse_duration(raw)
}

/// A duration longer than 0: a zero retention, expiry or timeout would expire things as soon as
/// they exist, or cut every client off at once.
fn positive_duration(raw: &str) -> Result<Duration, String> {
    let parsed = parse_duration(raw)?;
    if parsed.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(parsed)
}

fn non_empty(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(raw.to_owned())
}

/// Checks a MySQL URL after parsing, so that a refusal never echoes it (clap's messages show the
/// value given, and this one may hold a password).
pub fn check_mysql_url(raw: &str) -> Result<(), ConfigError> {
    if !raw.starts_with("mysql://") && !raw.starts_with("mariadb://") {
        return Err(ConfigError(
            "--mysql-url must look like mysql://user:password@host:3306/database (the value given is not shown: it may hold a password)".into(),
        ));
    }
    // What the driver would refuse at the first connection (a port out of range, say): a
    // configuration error now, not a runtime failure later.
    let options = match <sqlx::mysql::MySqlConnectOptions as std::str::FromStr>::from_str(raw) {
        Ok(options) => options,
        Err(error) => {
            let reason = match &error {
                sqlx::Error::Configuration(inner) => inner.to_string(),
                _ => "it cannot be parsed".to_owned(),
            };
            return Err(ConfigError(format!(
                "--mysql-url cannot be used: {reason} (the value given is not shown: it may hold a password)"
            )));
        }
    };
    if options.get_database().is_none_or(str::is_empty) {
        return Err(ConfigError(
            "--mysql-url names no database: give mysql://user:password@host:3306/database (the value given is not shown: it may hold a password)".into(),
        ));
    }
    Ok(())
}

/// Checks an AMQP URL after parsing, without echoing it (it may hold a password).
pub fn check_amqp_url(raw: &str) -> Result<(), ConfigError> {
    if raw.starts_with("amqps://") {
        return Err(ConfigError(
            "--amqp-url: amqps:// (TLS to RabbitMQ) is not supported by this build; use amqp:// on a trusted network (the value given is not shown: it may hold a password)".into(),
        ));
    }
    let valid = raw
        .strip_prefix("amqp://")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && lapin::uri::AMQPUri::from_str(raw).is_ok();
    if !valid {
        return Err(ConfigError(
            "--amqp-url must look like amqp://user:password@host:5672/%2f (the value given is not shown: it may hold a password)".into(),
        ));
    }
    Ok(())
}

/// Refuses a Redis URL this build cannot use, without echoing it (it may hold a password).
pub fn check_redis_url(raw: &str) -> Result<(), ConfigError> {
    if raw.starts_with("rediss://") {
        return Err(ConfigError(
            "--redis-url: rediss:// (TLS to Redis) is not supported by this build; use redis:// on a trusted network (the value given is not shown: it may hold a password)".into(),
        ));
    }
    let scheme_ok = ["redis://", "redis+unix://", "unix://"]
        .iter()
        .any(|scheme| {
            raw.strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty())
        });
    if !scheme_ok || redis::Client::open(raw).is_err() {
        return Err(ConfigError(
            "--redis-url must look like redis://[:password@]host:6379[/db] or redis+unix:///path/to/socket (the value given is not shown: it may hold a password)".into(),
        ));
    }
    Ok(())
}

/// A Redis key prefix: 1–64 visible ASCII characters, no braces (hash tags would pin every key to
/// one cluster slot).
fn redis_prefix(raw: &str) -> Result<String, String> {
    if raw.is_empty()
        || raw.len() > 64
        || !raw
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        return Err("must be 1 to 64 visible ASCII characters without { or }".into());
    }
    Ok(raw.to_owned())
}

/// An exchange or queue name: 1–200 visible ASCII characters.
fn amqp_name(raw: &str) -> Result<String, String> {
    if raw.is_empty() || raw.len() > 200 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be 1 to 200 visible ASCII characters".into());
    }
    Ok(raw.to_owned())
}

/// Checks `--gateway-url` after parsing, without echoing it: an `http://` or `https://` URL that
/// parses, with a host, a port in 1–65535 if one is given, and nothing but a base: no credentials
/// (`user:password@`: this client would not send them, and they would be written wherever the URL
/// is: the start-up line, errors, `/readyz`), no query or fragment (a token there would be too,
/// and the calls' paths are appended to it). Returns the URL without a trailing `/`.
pub fn check_gateway_url(raw: &str) -> Result<String, ConfigError> {
    let refuse = |why: &str| {
        ConfigError(format!(
            "--gateway-url {why} (the value given is not shown); give http://host:port or https://host"
        ))
    };
    if !raw.starts_with("http://") && !raw.starts_with("https://") {
        return Err(refuse("must be an http:// or https:// URL"));
    }
    if raw.contains('?') || raw.contains('#') {
        return Err(refuse("must not carry a query or a fragment"));
    }
    let uri: hyper::Uri = raw.parse().map_err(|_| refuse("is not a URL"))?;
    let authority = uri.authority().ok_or_else(|| refuse("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(refuse(
            "must not carry credentials (user:password@ would never be sent)",
        ));
    }
    if authority.host().is_empty() {
        return Err(refuse("has no host"));
    }
    // After the last ':' that is not inside an IPv6 address's brackets.
    let port = authority
        .as_str()
        .rsplit_once(':')
        .filter(|(_, port)| !port.contains(']'))
        .map(|(_, port)| port);
    if port.is_some_and(|port| !matches!(port.parse::<u32>(), Ok(1..=65_535))) {
        return Err(refuse("has a port outside 1-65535"));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

fn fraction(raw: &str) -> Result<f64, String> {
    raw.parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| "must be a fraction from 0 to 1".into())
}

/// What the command line asks for, ready to run.
#[derive(Debug)]
pub enum Invocation {
    /// Run the server.
    Serve(Box<ServeConfig>),
    /// Apply the migrations.
    Migrate(MigrateArgs),
    /// Run the payment gateway simulator.
    GatewaySim(GatewaySimArgs),
    /// Inspect or steer the MySQL applier.
    MysqlApply(MysqlApplyArgs),
    /// Consume order.paid events.
    Notify(NotifyArgs),
}

/// Why the command line could not be used.
#[derive(Debug)]
pub enum CliError {
    /// clap's own: `--help`, `--version` (exit 0) or a usage error (exit 2), already rendered by clap.
    Clap(clap::Error),
    /// A value clap accepted that the configuration refuses (exit 2).
    Config(ConfigError),
}

/// Parses the whole command line (`args[0]` is the program name). `turnstile` alone, or with only
/// options, is `serve`.
pub fn parse(args: &[String]) -> Result<Invocation, CliError> {
    let matches = Cli::command()
        .try_get_matches_from(args)
        .map_err(CliError::Clap)?;
    let cli = Cli::from_arg_matches(&matches).map_err(CliError::Clap)?;
    let (first, serve_matches) = match cli.command {
        Some(Command::Migrate(args)) => return Ok(Invocation::Migrate(args)),
        Some(Command::GatewaySim(args)) => return Ok(Invocation::GatewaySim(args)),
        Some(Command::MysqlApply(args)) => return Ok(Invocation::MysqlApply(args)),
        Some(Command::Notify(args)) => {
            check_amqp_url(&args.amqp_url).map_err(CliError::Config)?;
            return Ok(Invocation::Notify(args));
        }
        Some(Command::Serve(args)) => (
            *args,
            matches.subcommand_matches("serve").unwrap_or(&matches),
        ),
        None => (cli.serve, &matches),
    };
    let Some(path) = first.config.clone() else {
        return serve_config(first).map(|c| Invocation::Serve(Box::new(c)));
    };
    // The file's values fill the options that only had their default.
    let file = read_config_file(&path).map_err(CliError::Config)?;
    let options = ServeArgs::augment_args(clap::Command::new("serve"));
    // A switch (`--mysql-write-behind`, `--no-pin`) takes no value: `true` names it, `false`
    // leaves it off.
    let is_switch = |id: &str| {
        options.get_arguments().any(|a| {
            a.get_id().as_str() == id && matches!(a.get_action(), clap::ArgAction::SetTrue)
        })
    };
    let mut injected: Vec<String> = Vec::new();
    for (id, value) in &file {
        if serve_matches.value_source(id) == Some(ValueSource::DefaultValue)
            || serve_matches.value_source(id).is_none()
        {
            let flag = format!("--{}", id.replace('_', "-"));
            if !is_switch(id) {
                injected.push(format!("{flag}={value}"));
            } else if value == "true" {
                injected.push(flag);
            } else if value != "false" {
                return Err(CliError::Config(ConfigError(format!(
                    "config file {}: {id} is a switch: true or false, not {value:?}",
                    path.display()
                ))));
            }
        }
    }
    // A second parse of the file's values followed by the command line's: a flag given twice
    // takes its last value, so the command line wins; the environment still fills what neither
    // names; the file named none of the options the environment or the command line set.
    let given = match matches.subcommand_name() {
        Some(_) => &args[2..],
        None => &args[1..],
    };
    injected.extend(given.iter().cloned());
    let command = ServeArgs::augment_args(clap::Command::new("turnstile serve"))
        .no_binary_name(true)
        .args_override_self(true);
    let file_matches = command.try_get_matches_from(&injected).map_err(|error| {
        CliError::Config(ConfigError(format!(
            "config file {}: {}",
            path.display(),
            error
                .render()
                .to_string()
                .trim_start_matches("error: ")
                .trim()
        )))
    })?;
    let merged = ServeArgs::from_arg_matches(&file_matches).map_err(CliError::Clap)?;
    serve_config(merged).map(|c| Invocation::Serve(Box::new(c)))
}

/// Reads the JSON config file into (option id, value) pairs, option ids with underscores.
fn read_config_file(path: &std::path::Path) -> Result<HashMap<String, String>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let metadata = std::fs::metadata(path)
        .map_err(|e| ConfigError(format!("cannot read config file {shown}: {e}")))?;
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError(format!(
            "config file {shown} has mode {:o}, which lets group or others read it; it may hold secrets: run `chmod 600 {shown}`",
            mode & 0o777
        )));
    }
    // A FIFO or a device would block or never end: only a plain file of sensible size is read.
    if !metadata.is_file() {
        return Err(ConfigError(format!(
            "config file {shown} is not a regular file"
        )));
    }
    if metadata.len() > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError(format!(
            "config file {shown} is larger than {CONFIG_FILE_BYTES_MAX} bytes"
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {shown}: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ConfigError(format!("config file {shown} is not valid JSON: {e}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| ConfigError(format!("config file {shown} must hold a JSON object")))?;
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut values = HashMap::new();
    for (key, value) in object {
        let id = key.replace('-', "_");
        let known = command
            .get_arguments()
            .any(|a| a.get_id().as_str() == id && id != "config");
        if !known {
            return Err(ConfigError(format!(
                "config file {shown}: unknown key {key:?} (keys are serve's option names, e.g. \"data-dir\")"
            )));
        }
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                return Err(ConfigError(format!(
                "config file {shown}: {key} must be a string, a number or a boolean, not {other}"
            )))
            }
        };
        if values.insert(id, text).is_some() {
            return Err(ConfigError(format!(
                "config file {shown}: {key:?} names an option another key already set (\"hold-ttl\" and \"hold_ttl\" are one option)"
            )));
        }
    }
    Ok(values)
}

/// The largest config file read (a config is a few hundred bytes).
const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;

/// TLS for the listener: the certificate chain and key files, and the lowest version accepted.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Lowest version accepted.
    pub min: TlsMin,
}

/// Socket options of the listener and its connections.
#[derive(Debug, Clone, Copy)]
pub struct SocketConfig {
    /// The listen backlog.
    pub backlog: u32,
    /// `TCP_NODELAY` on every client connection.
    pub nodelay: bool,
    /// `SO_RCVBUF` of client connections; `None`: the kernel's.
    pub recv_buffer: Option<u32>,
    /// `SO_SNDBUF` of client connections; `None`: the kernel's.
    pub send_buffer: Option<u32>,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// How requests are served.
    pub runtime: RuntimeKind,
    /// Worker threads serving requests; `None`: one per physical core.
    pub workers: Option<usize>,
    /// Pin per-core workers to their cores.
    pub pin: bool,
    /// Socket options.
    pub socket: SocketConfig,
    /// HTTPS, when configured.
    pub tls: Option<TlsConfig>,
    /// The embedded journal's directory.
    pub data_dir: PathBuf,
    /// How long an unfinished order may hold stock.
    pub hold_ttl: Duration,
    /// HMAC key for webhooks; `None`: random at start.
    pub webhook_secret: Option<String>,
    /// How long an authorisation may take.
    pub gateway_timeout: Duration,
    /// How long the in-process simulator keeps `tok_pending` undecided.
    pub sim_pending_delay: Duration,
    /// The payment gateway over HTTP; `None`: the in-process simulator.
    pub gateway_url: Option<String>,
    /// How long the reconciler leaves a payment pending, owed or orphaned before it acts.
    pub reconcile_after: Duration,
    /// The MySQL journal, if configured (else the embedded file journal).
    pub mysql: Option<crate::journal::mysql::MySqlConfig>,
    /// With `mysql`: the embedded journal acknowledges and MySQL follows it.
    pub mysql_write_behind: bool,
    /// The RabbitMQ relay, if configured.
    pub amqp: Option<crate::events::relay::RelayConfig>,
    /// Redis for carts, submission locks and answers, if configured (else carts in process).
    pub redis: Option<crate::sessions::redis::RedisConfig>,
    /// How long a request waits for its commit before answering 503.
    pub journal_timeout: Duration,
    /// How long the answer of a checkout that created an order stays under its key, so a retry
    /// within it replays instead of buying twice.
    pub idempotency_retention: Duration,
    /// How long a finished order stays in memory, which bounds memory under a steady flow of orders.
    pub order_retention: Duration,
    /// How long events stay on disk at least, so consumers that fall behind can still catch up.
    pub event_retention: Duration,
    /// How long a client may take to send its request headers, and its body, before it is cut off,
    /// so slow or stalled clients cannot hold connections forever.
    pub slow_client_timeout: Duration,
    /// How long an unused cart lives, so abandoned carts do not pile up.
    pub cart_ttl: Duration,
    /// The most live carts, so cart creation cannot exhaust memory.
    pub carts_max: usize,
    /// The most open client connections, so a connection flood cannot exhaust file descriptors
    /// or memory.
    pub connections_max: usize,
    /// The most checkouts past their hold at once: bounds the tasks and gateway calls a flood can
    /// start.
    pub checkouts_in_flight_max: usize,
    /// The most bytes of answers not yet sent to their clients, across all connections, so
    /// clients that never read (or never open an HTTP/2 window) cannot make the server hold
    /// answers without bound.
    pub response_bytes_max: usize,
    /// With Redis unreachable, checkouts naming their items go on under this node's own key table
    /// (one node only: another node cannot see this node's keys).
    pub redis_optional: bool,
    /// The operations desk's bearer token; `None`: `/v1/admin/...` answers 404.
    pub admin_token: Option<String>,
}

/// The shortest retention that keeps the contract's promises: longer than a checkout can take
/// from the claim of its key to the decision of its commit (`--gateway-timeout` plus
/// `--journal-timeout`). An answer that expired sooner would be gone when a client told `503`
/// ("outcome unknown, retry with the same key") comes back, and the retry would place a second
/// order; an order or an event that left sooner would be gone before the client could read the
/// order it was just told about.
fn check_retentions(args: &ServeArgs) -> Result<(), ConfigError> {
    let floor = args.gateway_timeout + args.journal_timeout;
    for (option, retention) in [
        ("--idempotency-retention", args.idempotency_retention),
        ("--order-retention", args.order_retention),
        ("--event-retention", args.event_retention),
    ] {
        if retention <= floor {
            return Err(ConfigError(format!(
                "{option} {} must be longer than --gateway-timeout plus --journal-timeout ({}): an answer, order or event must outlive the longest a checkout can take to decide, or a client told to retry with the same key could find it gone and buy twice",
                humantime::format_duration(retention),
                humantime::format_duration(floor)
            )));
        }
    }
    Ok(())
}

/// Turns parsed options into the server's configuration, refusing what this build cannot do.
pub fn serve_config(args: ServeArgs) -> Result<ServeConfig, CliError> {
    if let Some(url) = &args.redis_url {
        check_redis_url(url).map_err(CliError::Config)?;
    }
    // The reconciler voids authorisations with no durable order once they are this old: a
    // checkout still between its authorisation and its commit must be younger.
    if args.reconcile_after <= args.gateway_timeout + args.journal_timeout {
        return Err(CliError::Config(ConfigError(format!(
            "--reconcile-after {} must be longer than --gateway-timeout plus --journal-timeout ({}), or an authorisation whose order is still being journaled could be voided",
            humantime::format_duration(args.reconcile_after),
            humantime::format_duration(args.gateway_timeout + args.journal_timeout)
        ))));
    }
    // A submission lock is renewed while its checkout's outcome is unknown, a third of its TTL
    // at a time; a checkout that runs its normal course (its lock call, its authorisation, its
    // commit) stays within one TTL, so even a renewal lost to a Redis blip cannot let another
    // node start the same key while it runs.
    let lock_ttl = args.redis_lock_ttl;
    let checkout_max = args.redis_timeout + args.gateway_timeout + args.journal_timeout;
    if args.redis_url.is_some() && checkout_max >= lock_ttl {
        return Err(CliError::Config(ConfigError(format!(
            "--redis-timeout plus --gateway-timeout plus --journal-timeout ({}) must be shorter than --redis-lock-ttl ({}) with --redis-url, or another node could start a checkout still running under the same key",
            humantime::format_duration(checkout_max),
            humantime::format_duration(lock_ttl)
        ))));
    }
    if lock_ttl < Duration::from_secs(1) {
        return Err(CliError::Config(ConfigError(format!(
            "--redis-lock-ttl {} is too short: at least 1s (it is renewed every third of it)",
            humantime::format_duration(lock_ttl)
        ))));
    }
    if args.redis_optional && args.redis_url.is_none() {
        return Err(CliError::Config(ConfigError(
            "--redis-optional needs --redis-url (it says what checkouts do while that Redis is unreachable)".into(),
        )));
    }
    check_retentions(&args).map_err(CliError::Config)?;
    if let Some(token) = &args.admin_token {
        // Checked here, not by clap, so a refusal never echoes the token.
        if token.len() < 16 || token.len() > 256 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CliError::Config(ConfigError(
                "--admin-token must be 16 to 256 visible ASCII characters (the value given is not shown)".into(),
            )));
        }
    }
    if let Some(url) = &args.mysql_url {
        check_mysql_url(url).map_err(CliError::Config)?;
    }
    let gateway_url = args
        .gateway_url
        .as_deref()
        .map(check_gateway_url)
        .transpose()
        .map_err(CliError::Config)?;
    if args.mysql_write_behind && args.mysql_url.is_none() {
        return Err(CliError::Config(ConfigError(
            "--mysql-write-behind needs --mysql-url (the database written behind the embedded journal)".into(),
        )));
    }
    if let Some(url) = &args.amqp_url {
        check_amqp_url(url).map_err(CliError::Config)?;
    }
    let amqp = args.amqp_url.map(|url| crate::events::relay::RelayConfig {
        url,
        exchange: args.amqp_exchange.clone(),
        window: args.amqp_window as usize,
        unconfirmed_max: args.amqp_unconfirmed_max,
    });
    let redis = args
        .redis_url
        .map(|url| crate::sessions::redis::RedisConfig {
            url,
            prefix: args.redis_prefix.clone(),
            timeout: args.redis_timeout,
            lock_ttl: args.redis_lock_ttl,
        });
    let mysql = args.mysql_url.map(|url| {
        let mut mysql = crate::journal::mysql::MySqlConfig::new(url);
        mysql.pool_size = args.mysql_pool_size;
        mysql.batch_records_max = args.journal_batch_max as usize;
        mysql.lag_max = args.mysql_lag_max;
        mysql.statement_timeout = args.mysql_timeout;
        mysql
    });
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert,
            key,
            min: args.tls_min,
        }),
        (None, None) => None,
        // Checked here, once flags, environment and config file are merged, and not with clap's
        // `requires`: its first parse runs before the file is read, so it would refuse a cert
        // from one source and its key from another.
        (Some(_), None) => {
            return Err(CliError::Config(ConfigError(
                "--tls-cert needs --tls-key".into(),
            )))
        }
        (None, Some(_)) => {
            return Err(CliError::Config(ConfigError(
                "--tls-key needs --tls-cert".into(),
            )))
        }
    };
    Ok(ServeConfig {
        listen: args.listen,
        runtime: args.runtime,
        workers: args.workers.map(|n| n as usize),
        pin: !args.no_pin,
        socket: SocketConfig {
            backlog: args.listen_backlog,
            nodelay: args.tcp_nodelay,
            recv_buffer: args.socket_recv_buffer,
            send_buffer: args.socket_send_buffer,
        },
        tls,
        data_dir: args.data_dir,
        hold_ttl: args.hold_ttl,
        webhook_secret: args.webhook_secret,
        gateway_timeout: args.gateway_timeout,
        sim_pending_delay: args.sim_pending_delay,
        gateway_url,
        reconcile_after: args.reconcile_after,
        mysql,
        mysql_write_behind: args.mysql_write_behind,
        amqp,
        redis,
        journal_timeout: args.journal_timeout,
        idempotency_retention: args.idempotency_retention,
        order_retention: args.order_retention,
        event_retention: args.event_retention,
        slow_client_timeout: args.slow_client_timeout,
        cart_ttl: args.cart_ttl,
        carts_max: args.carts_max as usize,
        connections_max: args.connections_max as usize,
        checkouts_in_flight_max: args.checkouts_in_flight_max as usize,
        response_bytes_max: usize::try_from(args.response_bytes_max).unwrap_or(usize::MAX),
        redis_optional: args.redis_optional,
        admin_token: args.admin_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Tests that set `TURNSTILE_*` variables run one at a time.
    static ENV: Mutex<()> = Mutex::new(());

    fn serve(list: &[&str]) -> Result<ServeConfig, CliError> {
        let args: Vec<String> = std::iter::once("turnstile")
            .chain(list.iter().copied())
            .map(str::to_owned)
            .collect();
        match parse(&args)? {
            Invocation::Serve(config) => Ok(*config),
            other => panic!("not serve: {other:?}"),
        }
    }

    fn message(error: CliError) -> String {
        match error {
            CliError::Clap(error) => error.render().to_string(),
            CliError::Config(error) => error.0,
        }
    }

    /// Runs `f` with these environment variables set, then removes them.
    fn with_env<T>(vars: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // Only `vars` count: the environment the tests run in (TURNSTILE_RUNTIME, say) is put
        // aside meanwhile.
        let outer: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| name.starts_with("TURNSTILE_"))
            .collect();
        for (name, _) in &outer {
            std::env::remove_var(name);
        }
        for (name, value) in vars {
            std::env::set_var(name, value);
        }
        let result = f();
        for (name, _) in vars {
            std::env::remove_var(name);
        }
        for (name, value) in outer {
            std::env::set_var(name, value);
        }
        result
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_env_and_flags_in_order() {
        with_env(&[], || {
            let config = serve(&[]).unwrap();
            assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
            assert_eq!(config.hold_ttl, Duration::from_secs(900));
        });
        with_env(&[("TURNSTILE_LISTEN", "127.0.0.1:9000")], || {
            assert_eq!(serve(&[]).unwrap().listen.port(), 9000);
            assert_eq!(serve(&["serve"]).unwrap().listen.port(), 9000);
            let flag = serve(&["--listen", "127.0.0.1:9100"]).unwrap();
            assert_eq!(flag.listen.port(), 9100);
            let sub = serve(&["serve", "--listen", "127.0.0.1:9101"]).unwrap();
            assert_eq!(sub.listen.port(), 9101);
        });
        let inline = with_env(&[], || serve(&["--hold-ttl=2s"]).unwrap());
        assert_eq!(inline.hold_ttl, Duration::from_secs(2));
    }

    #[test]
    fn retention_expiry_and_limit_options_default_per_the_contract() {
        // Proves: with nothing set, the options take API.md's defaults.
        let config = with_env(&[], || serve(&[]).unwrap());
        let hours = |n: u64| Duration::from_secs(n * 3_600);
        assert_eq!(config.idempotency_retention, hours(24));
        assert_eq!(config.order_retention, hours(7 * 24));
        assert_eq!(config.event_retention, hours(7 * 24));
        assert_eq!(config.slow_client_timeout, Duration::from_secs(10));
        assert_eq!(config.cart_ttl, hours(1));
        assert_eq!(config.carts_max, 1_000_000);
        assert_eq!(config.connections_max, 10_000);
        assert!(config.tls.is_none());
        assert!(config.socket.nodelay);
        assert_eq!(config.socket.backlog, 4096);
    }

    #[test]
    fn retention_expiry_and_limit_options_come_from_env_and_flags() {
        // Proves: the options are read from their environment variables, and a flag wins over them.
        let env = [
            ("TURNSTILE_IDEMPOTENCY_RETENTION", "48h"),
            ("TURNSTILE_ORDER_RETENTION", "2d"),
            ("TURNSTILE_EVENT_RETENTION", "30d"),
            ("TURNSTILE_SLOW_CLIENT_TIMEOUT", "3s"),
            ("TURNSTILE_CART_TTL", "20m"),
            ("TURNSTILE_CARTS_MAX", "500"),
            ("TURNSTILE_CONNECTIONS_MAX", "64"),
        ];
        let (config, flags) = with_env(&env, || {
            (
                serve(&[]).unwrap(),
                serve(&[
                    "--slow-client-timeout",
                    "250ms",
                    "--connections-max=2",
                    "--carts-max",
                    "7",
                    "--cart-ttl",
                    "90s",
                    "--order-retention",
                    "1h",
                ])
                .unwrap(),
            )
        });
        assert_eq!(
            config.idempotency_retention,
            Duration::from_secs(48 * 3_600)
        );
        assert_eq!(config.order_retention, Duration::from_secs(2 * 86_400));
        assert_eq!(config.event_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(config.slow_client_timeout, Duration::from_secs(3));
        assert_eq!(config.cart_ttl, Duration::from_secs(1_200));
        assert_eq!(config.carts_max, 500);
        assert_eq!(config.connections_max, 64);
        assert_eq!(flags.slow_client_timeout, Duration::from_millis(250));
        assert_eq!(flags.connections_max, 2);
        assert_eq!(flags.carts_max, 7);
        assert_eq!(flags.cart_ttl, Duration::from_secs(90));
        assert_eq!(flags.order_retention, Duration::from_secs(3_600));
    }

    #[test]
    fn a_retention_shorter_than_a_checkout_can_take_is_refused_naming_it() {
        // Proves: each retention must outlive --gateway-timeout plus --journal-timeout (an answer
        // gone before the retry that was told "outcome unknown" would let that retry buy twice);
        // the refusal is a configuration error naming the option and the floor.
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for option in [
            "--idempotency-retention",
            "--order-retention",
            "--event-retention",
        ] {
            for short in ["1ns", "1s", "10s"] {
                let text = message(serve(&[option, short]).unwrap_err());
                assert!(text.contains(option), "{option} {short}: {text}");
                assert!(text.contains("10s"), "the floor is named: {text}");
            }
            assert!(serve(&[option, "11s"]).is_ok(), "{option} 11s");
            // The floor follows the timeouts.
            let shorter = [
                option,
                "1s",
                "--gateway-timeout",
                "250ms",
                "--journal-timeout",
                "500ms",
            ];
            assert!(serve(&shorter).is_ok(), "{shorter:?}");
        }
    }

    #[test]
    fn service_urls_are_checked_without_being_shown() {
        // Proves: a gateway URL with credentials (never sent, but written wherever the URL is) or
        // a bad port, and a MySQL URL its driver cannot use, are configuration errors naming the
        // option and never the value.
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for bad in [
            "http://merchant:SECRETPW@127.0.0.1:8090",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:0",
            "http://:8090",
            "http://[x",
            "http://pay.example.com/?api_key=SECRETPW",
            "http://pay.example.com/#SECRETPW",
            "ftp://127.0.0.1:8090",
        ] {
            let text = message(serve(&["--gateway-url", bad]).unwrap_err());
            assert!(text.contains("--gateway-url"), "{bad}: {text}");
            assert!(!text.contains(bad) && !text.contains("SECRETPW"), "{text}");
        }
        for fine in [
            "http://127.0.0.1:8090/",
            "https://pay.example.com",
            "http://[::1]:8090",
        ] {
            let config = serve(&["--gateway-url", fine]).unwrap();
            assert_eq!(
                config.gateway_url.as_deref(),
                Some(fine.trim_end_matches('/'))
            );
        }
        let text = message(serve(&["--mysql-url", "mysql://u:SECRETPW@h:99999/db"]).unwrap_err());
        assert!(
            text.contains("--mysql-url") && !text.contains("SECRETPW"),
            "{text}"
        );
    }

    #[test]
    fn redis_lock_and_optional_and_the_admin_token_are_checked() {
        // Proves: --redis-optional without Redis, a lock shorter than a checkout may take, and a
        // weak admin token are refused naming the option (and the token itself never shown).
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let redis = ["--redis-url", "redis://127.0.0.1:6379"];
        let text = message(serve(&["--redis-optional"]).unwrap_err());
        assert!(
            text.contains("--redis-optional needs --redis-url"),
            "{text}"
        );
        let optional = serve(&[redis[0], redis[1], "--redis-optional"]).unwrap();
        assert!(optional.redis_optional);
        let text = message(serve(&[redis[0], redis[1], "--redis-lock-ttl", "10s"]).unwrap_err());
        assert!(text.contains("--redis-lock-ttl"), "{text}");
        let short = serve(&[
            redis[0],
            redis[1],
            "--redis-lock-ttl",
            "3s",
            "--gateway-timeout",
            "1s",
            "--journal-timeout",
            "1s",
            "--redis-timeout",
            "300ms",
        ])
        .unwrap();
        assert_eq!(
            short.redis.map(|r| r.lock_ttl),
            Some(Duration::from_secs(3))
        );
        for weak in ["short-token", "sixteen chars!!!", "é-not-ascii-token-x"] {
            let text = message(serve(&["--admin-token", weak]).unwrap_err());
            assert!(text.contains("--admin-token"), "{text}");
            assert!(!text.contains(weak), "the token is never shown: {text}");
        }
        let fine = serve(&["--admin-token", "0123456789abcdef"]).unwrap();
        assert_eq!(fine.admin_token.as_deref(), Some("0123456789abcdef"));
    }

    #[test]
    fn bad_input_is_refused_with_clap_usage_errors_naming_the_option() {
        let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for bad in [
            vec!["--nope", "1"],
            vec!["--listen"],
            vec!["--listen", "nowhere"],
            vec!["--hold-ttl", "5x"],
            vec!["stray"],
            vec!["--idempotency-retention", "0s"],
            vec!["--order-retention", "0"],
            vec!["--event-retention", "0d"],
            vec!["--event-retention", "a week"],
            vec!["--slow-client-timeout", "0ms"],
            vec!["--slow-client-timeout=-1s"],
            vec!["--cart-ttl", "0h"],
            vec!["--carts-max", "0"],
            vec!["--carts-max", "many"],
            vec!["--carts-max=-5"],
            vec!["--connections-max", "0"],
            vec!["--connections-max", "1.5"],
            vec!["--connections-max", "99999999999"],
            vec!["--tls-min", "1.1"],
            vec!["--hold-ttl", "200000000000d"],
            vec!["--idempotency-retention", "106751991167d"],
            vec!["--webhook-secret", ""],
        ] {
            match serve(&bad) {
                Err(CliError::Clap(error)) => {
                    assert_eq!(error.exit_code(), 2, "{bad:?}");
                    let text = error.render().to_string();
                    let name = bad[0].split('=').next().unwrap_or_default();
                    if name.starts_with("--") && (bad.len() > 1 || bad[0].contains('=')) {
                        assert!(text.contains(name), "{bad:?}: {text}");
                    }
                }
                other => panic!("{bad:?} was not refused by clap: {other:?}"),
            }
        }
        // Accepted by clap, refused by this build, with a message naming the option.
        let error = serve(&["--redis-url", "rediss://:secret@x"]).unwrap_err();
        let text = message(error);
        assert!(
            text.contains("--redis-url") && !text.contains("secret"),
            "{text}"
        );
        let error = serve(&["--redis-url", "http://x"]).unwrap_err();
        assert!(message(error).contains("--redis-url"));
        let config = serve(&[
            "--redis-url",
            "redis://127.0.0.1:6379/2",
            "--redis-prefix",
            "t1:",
        ])
        .unwrap();
        let redis = config.redis.expect("redis configured");
        assert_eq!(
            (redis.prefix.as_str(), redis.timeout),
            ("t1:", Duration::from_secs(1))
        );
        assert!(serve(&["--redis-prefix", "a{b}"]).is_err());
        // A bad MySQL URL is refused without echoing it (it may hold a password).
        let error = message(serve(&["--mysql-url", "postgres://u:hunter2@h/db"]).unwrap_err());
        assert!(
            error.contains("--mysql-url") && !error.contains("hunter2"),
            "{error}"
        );
        // One that names no database is refused now, not at the first statement.
        for url in ["mysql://u:hunter2@h:3306/", "mysql://u:hunter2@h:3306"] {
            let error = message(serve(&["--mysql-url", url]).unwrap_err());
            assert!(
                error.contains("names no database") && !error.contains("hunter2"),
                "{error}"
            );
        }
        // A bad AMQP URL, or amqps:// (no TLS to the broker in this build), is refused without
        // echoing it; a good one configures the relay with the contract's defaults.
        for bad in [
            "http://guest:hunter2@h:5672/%2f",
            "amqps://guest:hunter2@h:5671/%2f",
            "amqp://",
        ] {
            let error = message(serve(&["--amqp-url", bad]).unwrap_err());
            assert!(
                error.contains("--amqp-url") && !error.contains("hunter2"),
                "{error}"
            );
        }
        let relay = serve(&["--amqp-url", "amqp://guest:guest@127.0.0.1:5672/%2f"])
            .unwrap()
            .amqp
            .expect("the relay is configured");
        assert_eq!(relay.exchange, "turnstile.orders");
        assert_eq!(relay.window, 1_024);
        let notify = |list: &[&str]| {
            let args: Vec<String> = ["turnstile", "notify"]
                .iter()
                .chain(list)
                .map(|s| (*s).to_owned())
                .collect();
            parse(&args)
        };
        assert!(
            matches!(notify(&[]), Err(CliError::Clap(_))),
            "notify needs --amqp-url"
        );
        match notify(&["--amqp-url", "amqp://guest:guest@127.0.0.1:5672/%2f"]) {
            Ok(Invocation::Notify(args)) => {
                assert_eq!(args.queue, "turnstile.notify");
                assert_eq!(args.max_attempts, 5);
                assert_eq!(args.state, PathBuf::from("./notify-state"));
            }
            other => panic!("not notify: {other:?}"),
        }
        // Each TLS file needs the other, checked once every source is merged.
        let error = serve(&["--tls-cert", "cert.pem"]).unwrap_err();
        assert!(message(error).contains("--tls-key"));
        let error = serve(&["--tls-key", "key.pem"]).unwrap_err();
        assert!(message(error).contains("--tls-cert"));
    }

    #[test]
    fn the_tls_cert_and_key_may_come_from_different_sources() {
        // Proves: the certificate from a flag or the environment and its key from the config
        // file (or the other way round) make one TLS configuration; clap's first parse, before
        // the file is read, does not refuse the half it sees.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turnstile.json");
        let path_arg = path.display().to_string();
        let write = |json: &str| {
            std::fs::write(&path, json).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write(r#"{"tls-key": "/etc/key.pem"}"#);
        for (vars, flags) in [
            (vec![("TURNSTILE_TLS_CERT", "/etc/cert.pem")], vec![]),
            (vec![], vec!["--tls-cert", "/etc/cert.pem"]),
        ] {
            let mut args = vec!["--config", path_arg.as_str()];
            args.extend(flags);
            let config = with_env(&vars, || serve(&args).unwrap());
            let tls = config.tls.expect("tls");
            assert_eq!(tls.cert, PathBuf::from("/etc/cert.pem"));
            assert_eq!(tls.key, PathBuf::from("/etc/key.pem"));
        }
        write(r#"{"tls_cert": "/etc/cert.pem"}"#);
        let config = with_env(&[("TURNSTILE_TLS_KEY", "/etc/key.pem")], || {
            serve(&["--config", &path_arg]).unwrap()
        });
        assert_eq!(config.tls.expect("tls").key, PathBuf::from("/etc/key.pem"));
    }

    #[test]
    fn durations_use_one_parser() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("m").is_err());
        // Past 100 years a duration would overflow the milliseconds it becomes.
        assert_eq!(parse_duration("36500d"), Ok(DURATION_MAX));
        assert!(parse_duration("36501d").is_err());
        assert!(parse_duration("200000000000d").is_err());
    }

    #[test]
    fn the_config_file_must_be_private_and_sits_between_env_and_defaults() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("turnstile.json");
        std::fs::write(
            &path,
            r#"{"listen": "127.0.0.1:9200", "hold_ttl": "1m", "carts-max": 9, "cart-ttl": "2m"}"#,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path_arg = path.display().to_string();
        let error = with_env(&[], || serve(&["--config", &path_arg]).unwrap_err());
        assert!(message(error).contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = with_env(&[("TURNSTILE_CART_TTL", "3m")], || {
            serve(&["--config", &path_arg, "--carts-max", "11"]).unwrap()
        });
        assert_eq!(config.listen.port(), 9200, "file over default");
        assert_eq!(
            config.hold_ttl,
            Duration::from_secs(60),
            "file over default"
        );
        assert_eq!(config.carts_max, 11, "flag over file");
        assert_eq!(config.cart_ttl, Duration::from_secs(180), "env over file");
        // The file through the environment, too.
        let config = with_env(&[("TURNSTILE_CONFIG", &path_arg)], || serve(&[]).unwrap());
        assert_eq!(config.listen.port(), 9200);
        // A bad value, an unknown key or one option set twice in the file names the file.
        for bad in [
            r#"{"hold-ttl": "soon"}"#,
            r#"{"holdttl": "1m"}"#,
            r#"{"listen": [1]}"#,
            r#"{"hold-ttl": "1m", "hold_ttl": "2m"}"#,
            r#"{"no-pin": "maybe"}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let error = with_env(&[], || serve(&["--config", &path_arg]).unwrap_err());
            let text = message(error);
            assert!(text.contains(&path_arg), "{bad}: {text}");
        }
        // Switches take true or false in the file (a switch takes no value on the command line).
        std::fs::write(
            &path,
            r#"{"no-pin": true, "runtime": "shared", "workers": 3, "tcp-nodelay": false}"#,
        )
        .unwrap();
        let config = with_env(&[], || serve(&["--config", &path_arg]).unwrap());
        assert!(!config.pin);
        assert_eq!(config.runtime, RuntimeKind::Shared);
        assert_eq!(config.workers, Some(3));
        assert!(!config.socket.nodelay);
        std::fs::write(&path, r#"{"no-pin": false}"#).unwrap();
        let config = with_env(&[], || serve(&["--config", &path_arg]).unwrap());
        assert!(config.pin);
    }

    #[test]
    fn the_runtime_defaults_to_per_core_pinned_with_a_worker_per_core() {
        let config = with_env(&[], || serve(&[]).unwrap());
        assert_eq!(config.runtime, RuntimeKind::PerCore);
        assert_eq!(config.workers, None);
        assert!(config.pin);
        let config = with_env(&[("TURNSTILE_RUNTIME", "shared")], || {
            serve(&["--workers", "4", "--no-pin"]).unwrap()
        });
        assert_eq!(config.runtime, RuntimeKind::Shared);
        assert_eq!(config.workers, Some(4));
        assert!(!config.pin);
        let config = with_env(&[], || serve(&["--no-pin", "--pin"]).unwrap());
        assert!(config.pin, "the last of --pin/--no-pin wins");
        for bad in [&["--workers", "0"][..], &["--runtime", "fibers"]] {
            assert!(with_env(&[], || serve(bad)).is_err(), "{bad:?}");
        }
    }
}
