//! Turnstile: a checkout engine for flash sales. It admits exactly as many buyers as there is stock,
//! makes every checkout all-or-nothing and idempotent, and records every order durably before it
//! answers.
//!
//! # Layout
//! - [`domain`]: validated newtypes (`Sku`, `Quantity`, `Cents`, `IdempotencyKey`, ...): parsed at
//!   the edge, trusted everywhere else.
//! - [`engine`]: the pure core, synchronous, no I/O, time passed in; every change decided now and
//!   applied after its commit: per-core stock shards ([`engine::inventory`]), the order state
//!   machine ([`engine::order`]), idempotency keys with retention ([`engine::idempotency`]), and
//!   the journal records with the durable state they fold into ([`engine::records`]) and their
//!   compact binary bytes, which both journals store ([`engine::codec`]).
//! - [`journal`]: the `Journal` trait (durable appends with group commit, the event log), the
//!   embedded file journal ([`journal::file`]: segments, framing, recovery from crashes and failed
//!   writes, snapshots, events on disk), the MySQL journal ([`journal::mysql`]: the `journal`
//!   table as the log with its claims, one COMMIT per batch; [`journal::mysql::projection`]: the
//!   applier keeping the tables behind the log with a durable cursor; `turnstile mysql-apply`)
//!   and write-behind ([`journal::write_behind`]: the embedded journal acknowledges, the same
//!   applier ships the log to MySQL behind it, with bounded lag); [`journal::downstream`]: the
//!   one ordered reader of the journal (bounded by what is durable, with the far side's cursor)
//!   that the applier and the RabbitMQ relay both read with.
//! - [`events`]: the events downstream of the journal: their one JSON shape, the outbox relay to
//!   RabbitMQ ([`events::relay`]: publisher confirms, go-back-N, a durable cursor, off the checkout
//!   path) and `turnstile notify` ([`events::notify`]: exactly one line per paid order).
//! - [`payment`]: the `PaymentGateway` trait, the simulator's ledger (in process and `turnstile
//!   gateway-sim` over HTTP), the HTTP gateway client, webhook signatures.
//! - [`sessions`]: carts with idle expiry and caps, in process or in Redis
//!   ([`sessions::redis`]: carts any node serves, the submission locks and finished answers every
//!   node shares; one Lua script, one round trip, per operation; Redis down never hangs a request).
//! - [`app`]: the application layer, whatever door a request came in by: [`app::checkout`]
//!   (placing an order: key, hold, authorise, journal, settle), [`app::commit`] (append,
//!   wait, apply or abort, then what follows), [`app::orders`]: cancel, restock, a payment's final
//!   word, [`app::money`]: the settler and the reconciler
//!   (capture, void, refund after the journal; each node reconciles only the authorisations it
//!   made), [`app::sweep`]: expired holds released, what is past retention dropped.
//! - [`api`]: the HTTP API (axum): routes, exact body validation, the one error-to-HTTP mapping;
//!   `api::admin`: the operations desk (`--admin-token`); `api::owner`: calls for another node's
//!   order forwarded to its owner.
//! - [`cluster`]: several nodes selling one stock (`--node-id`): the registry and its renewal
//!   ([`cluster::registry`]), stock leases from the pool in MySQL ([`cluster::leases`]), the
//!   shared catalogue ([`cluster::catalogue`]), dead nodes settled ([`cluster::reaper`]), open
//!   orders adopted ([`cluster::adoption`]), calls forwarded to an order's owner
//!   ([`cluster::forward`]), `turnstile cluster forget` ([`cluster::forget`]).
//! - [`connections`]: the listeners (`socket2`: backlog, `TCP_NODELAY`, buffers; one per per-core
//!   worker with `SO_REUSEPORT`) and the accept loop: HTTP/1.1 and HTTP/2, cleartext or over TLS
//!   ([`connections::tls`]: rustls, TLS 1.3, ALPN), slow clients cut off, one bound on open
//!   connections across workers, at most 100 HTTP/2 streams per connection, the bytes of unsent
//!   answers bounded across all connections (`--response-bytes-max`), connections whose answers
//!   never leave closed, a graceful drain that ends.
//! - [`topology`]: physical cores and NUMA nodes from `/sys` within the process's affinity mask,
//!   and thread pinning.
//! - [`config`]: the command line on `clap` (`serve`, `migrate`, `gateway-sim`, `mysql-apply`,
//!   `notify`): flags >
//!   environment > JSON file > defaults; durations by `humantime`.
//! - [`data_dir`]: one server per data dir (an exclusive `flock` on a lock file holding the pid),
//!   and the node's name kept there (in its Redis locks and its gateway keys).
//! - [`metrics`]: counters and histograms on our own atomics, one copy per core summed on scrape,
//!   exposed through `prometheus-client`.
//! - [`server`]: wiring, the two runtimes (per-core: one pinned single-threaded runtime per worker;
//!   shared: one work-stealing runtime), the stop signal.
//! - [`http_client`]: the one pooled keep-alive client for outbound calls (hyper-util, rustls).
//! - [`fault`]: fault points for tests (`--features fault-points`, on in the test build only).
//! - [`backoff`]: the one backoff every retry uses (doubling, capped, spread by a per-thread PRNG).
//! - [`secrets`]: every secret the process was given is replaced in every log line and error
//!   body (the net under messages that never show one).
//! - [`random`], [`time`], `sync`: small helpers at the edges (`sync` says which lock and why,
//!   gives each thread its core slot and keeps per-core copies, and lowers background threads'
//!   priority).

/// A boxed future, so traits with async methods stay object-safe.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub mod admin_cli;
pub mod api;
pub mod app;
pub mod backoff;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod data_dir;
pub mod domain;
pub mod engine;
pub mod events;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod http_client;
pub mod journal;
pub mod metrics;
pub mod payment;
pub mod random;
pub mod secrets;
pub mod server;
pub mod sessions;
mod sync;
pub mod time;
pub mod topology;
