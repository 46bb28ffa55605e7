//! Carts, submission locks and finished answers in Redis, shared by every node (`--redis-url`).
//!
//! # Keys
//! Every key starts with `--redis-prefix` (`turnstile:`) and has a TTL:
//! - `<p>cart:<cart_id>`: a hash, `n` (the next line's position) and `s:<sku>` =
//!   `<position>:<quantity>`; `PEXPIRE --cart-ttl`, refreshed by every use.
//! - `<p>carts`: a sorted set of live cart ids scored by expiry (Unix ms), so `--carts-max` holds
//!   across nodes; its TTL is kept at least as long as its newest cart's.
//! - `<p>key:<idempotency key>`: one string per key, first its submission lock, then its answer.
//!   The lock, `~<node>/<start ms>.<random>/<n>/`, is `SET NX PX --redis-lock-ttl` (60 s) while a
//!   checkout with that key runs, renewed by its node while the checkout's outcome is unknown
//!   there; the checkout's end replaces it with the finished answer, `<status> <at_ms>
//!   <fingerprint>\n<body>`, `PX --idempotency-retention` (only answers that created an order: a
//!   refusal, `404` or `409 out_of_stock`, is replayed by the node that gave it alone, API.md,
//!   from its own key table; its end deletes the lock). Either is changed by the lock's holder
//!   only (compare-and-set). One key, not a lock and an answer side by side: a checkout costs
//!   Redis three commands (its start's `SET NX`, its end's `GET` and `SET`) instead of five, and
//!   one key lookup each. (The layout of versions before it, `<p>lock:` and `<p>answer:`, is not
//!   read: see README on upgrading.)
//!
//! # Redis Cluster
//! `--redis-url` listing several nodes (comma-separated) speaks the cluster protocol (redis-rs's
//! cluster client: each call goes to the master of its key's slot). A script may touch one slot
//! only, so every key carries a hash tag: an idempotency key's Redis key has the tag of the key's
//! hash (`<p>key:{<xxh3 hex>}:<key>`; the key itself may hold braces, which would otherwise pick
//! its slot), and they spread over every master, while every cart shares `{carts}` with the set of live
//! carts (`<p>cart:{carts}:<id>`, `<p>carts:{carts}`): carts live on one master, and
//! `--carts-max` stays one exact count across nodes. A checkout naming a cart takes its lock and
//! reads its cart in two calls (their slots differ); the batched ends and renewals go one script
//! per key, concurrently over the one multiplexed connection. One URL names one server; a
//! cluster's node given alone is refused (not ready, saying so), since its answers would be
//! redirections.
//!
//! # Mechanism
//! Every operation costs one round trip: a cart change is one Lua script (read-modify-write of its
//! hash, the line cap, the expiry), and so is a checkout's start when it names a cart (the cached
//! answer, else the lock, and the cart). The starts of checkouts naming their items, the looks of
//! sold-out refusals and every checkout's end (the answer replacing the lock; queued after the
//! journal's commit and not awaited) are batched per core, many plain commands in one pipeline
//! ([`starts`]: `SET NX GET` to start, `SET GET` to end, no script): a checkout's end rides with
//! later checkouts' starts, so Redis adds one awaited round trip to a checkout and, under load, a
//! share of one call. Ends a core's queue cannot carry (Redis unreachable, the queue full or
//! stopping) and lock releases without an answer go to the finisher, one task that sends them,
//! up to 256 in one `STEPS` script call (compare-and-set: it replaces only the checkout's own
//! lock), again until their locks expire. The journal stays the truth: the
//! answer is stored only once its record is durable, and a node that finds no answer in Redis
//! falls back to its own key table and journal.
//!
//! A lock must outlive every checkout that may still commit under it, or another node could start
//! the key again while this node's commit is still on its way (a stalled database, a commit whose
//! outcome is unknown). So a checkout past its hold registers its lock ([`Submission::keep_alive`])
//! and one task renews every registered lock a third of `--redis-lock-ttl` at a time (and at once
//! after a reconnection), compare-and-extend, until the checkout's outcome is durable or known to
//! have failed; a lock whose outcome stays unknown until the process ends is renewed until then
//! ([`Submission::hold_until_restart`]). A lock found taken by another (Redis lost it, an outage
//! outlived it) is logged at ERROR and counted (`turnstile_redis_locks_lost_total`).
//!
//! One multiplexed connection carries every call; each call has a timeout (`--redis-timeout`). A
//! call that finds the connection broken drops it and wakes the supervisor, which reconnects with
//! backoff; meanwhile calls fail at once with the last error, so nothing waits on a dead Redis and
//! the node recovers by itself. Carts and checkouts then answer `503 session_store_unavailable`:
//! a node cannot know that no other node holds the key. With `--redis-optional` (one node) a
//! checkout naming its items goes on under the node's own key table instead.

use crate::backoff::Backoff;
use crate::domain::{CartId, IdempotencyKey, Sku};
use crate::engine::records::StoredAnswer;
use crate::sync::lock;
use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script, ScriptInvocation};
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{CartError, CartView, CART_ITEMS_MAX};

mod allowances;
mod connection;
mod locks;
mod scripts;
mod starts;
mod tickets;

pub use allowances::AllowanceTaken;
use locks::*;
pub use locks::{LockClock, Submission};
use scripts::*;
pub use scripts::{decode_answer, encode_answer};
pub use tickets::TicketClaim;

/// The longest wait between two reconnection attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Checkouts' ends waiting to be sent at most; past it each is sent by a task of its own.
const FINISHES_QUEUED_MAX: usize = 65_536;

/// Checkouts' ends sent in one call at most.
const FINISHES_PER_CALL_MAX: usize = 256;

/// Locks renewed in one call at most.
const RENEWALS_PER_CALL_MAX: usize = 256;

/// The Redis settings of `serve`.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `redis+unix:///path`.
    pub url: String,
    /// Starts every key.
    pub prefix: String,
    /// How long one call (or one connection attempt) may take.
    pub timeout: Duration,
    /// How long a submission lock lives unless renewed (`--redis-lock-ttl`): what a node killed
    /// mid-checkout leaves behind.
    pub lock_ttl: Duration,
}

/// Why a call to Redis failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Redis cannot be reached or did not answer in time.
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    /// Redis answered something Turnstile did not write (another program under the same prefix?).
    #[error("Redis holds something unexpected under {key}: {what}")]
    Unexpected {
        /// The key.
        key: String,
        /// What was wrong.
        what: String,
    },
}

/// What a checkout's start found in Redis.
#[derive(Debug)]
pub enum Begin {
    /// The key finished on some node: this answer replays (or, with another request, `422`).
    Answer(StoredAnswer),
    /// Another checkout with this key runs (on this node or another): `409`.
    Held,
    /// The lock is this checkout's; with a cart id, the cart's lines (`None`: no such cart).
    Locked(Option<Vec<(Sku, i64)>>),
}

#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    errors: AtomicU64,
    reconnects: AtomicU64,
    fallbacks: AtomicU64,
    renewals: AtomicU64,
    locks_lost: AtomicU64,
}

/// The connection to Redis and the scripts run over it.
pub struct RedisStore {
    client: connection::Client,
    connection: ArcSwapOption<connection::Connection>,
    /// Wakes the supervisor when a call found the connection broken.
    wake: tokio::sync::Notify,
    /// Why the last call or connection attempt failed; `None` once one succeeded since.
    last_error: Mutex<Option<String>>,
    stopped: AtomicBool,
    prefix: String,
    timeout: Duration,
    /// `--redis-lock-ttl` in milliseconds.
    lock_ttl_ms: u64,
    /// The locks of checkouts past their hold, renewed until each one's outcome is known (by
    /// submission number: its key and lock value).
    held: Mutex<FxHashMap<u64, Held>>,
    /// This node, in lock values: `node_<hex>`, the same across restarts
    /// ([`crate::data_dir::node_name`]).
    node: String,
    /// This run in lock values: its start (ms) and random bytes, so its locks differ from earlier
    /// runs' and from another process's under the same name (a data dir copied with its
    /// `redis-node-id`, started in the same millisecond).
    run_id: String,
    locks_taken: AtomicU64,
    stats: Stats,
    scripts: Scripts,
    tickets: tickets::TicketScripts,
    allowances: allowances::AllowanceScripts,
    /// Checkouts' ends waiting to be sent, batched by the finisher task.
    finishes: tokio::sync::mpsc::Sender<Finish>,
    /// Taken by [`Self::start`].
    finishes_to_send: Mutex<Option<tokio::sync::mpsc::Receiver<Finish>>>,
    /// Checkouts' starts waiting to be sent, batched ([`starts`]).
    starts: starts::Starts,
    /// Wakes the finisher to send what is queued and end.
    finisher_stop: tokio::sync::Notify,
    /// Set when the finisher has ended: the supervisor keeps the connection up until then.
    finisher_done: AtomicBool,
    /// Ends the finisher holds that Redis did not take yet (as of its last failed batch).
    ends_waiting: std::sync::atomic::AtomicUsize,
    /// Wakes the finisher and the renewer when a new connection is up: ends that wait are sent,
    /// and locks renewed, at once.
    reconnected: tokio::sync::Notify,
}

impl RedisStore {
    /// A store for `config` (the URL is parsed, nothing is connected yet: call [`Self::start`]).
    pub fn new(config: &RedisConfig, node: String, started_ms: i64) -> Result<Self, StoreError> {
        let client = connection::Client::open(&config.url, config.timeout)
            .map_err(|e| StoreError::Unavailable(format!("bad --redis-url: {e}")))?;
        let (finishes, finishes_to_send) = tokio::sync::mpsc::channel(FINISHES_QUEUED_MAX);
        let nonce = crate::random::random_bytes(4).map_err(|e| {
            StoreError::Unavailable(format!("no random bytes for the run's id: {e}"))
        })?;
        let run_id = format!("{started_ms}.{}", crate::random::hex(&nonce));
        Ok(Self {
            client,
            connection: ArcSwapOption::empty(),
            wake: tokio::sync::Notify::new(),
            last_error: Mutex::new(Some("not connected yet".into())),
            stopped: AtomicBool::new(false),
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            lock_ttl_ms: u64::try_from(config.lock_ttl.as_millis()).unwrap_or(u64::MAX),
            held: Mutex::default(),
            node,
            run_id,
            locks_taken: AtomicU64::new(0),
            stats: Stats::default(),
            scripts: Scripts::new(),
            tickets: tickets::TicketScripts::new(),
            allowances: allowances::AllowanceScripts::new(),
            finishes,
            finishes_to_send: Mutex::new(Some(finishes_to_send)),
            starts: starts::Starts::new(),
            finisher_stop: tokio::sync::Notify::new(),
            finisher_done: AtomicBool::new(false),
            ends_waiting: std::sync::atomic::AtomicUsize::new(0),
            reconnected: tokio::sync::Notify::new(),
        })
    }

    /// Connects once (so the log says at start whether Redis answers), then keeps the connection
    /// up and sends the checkouts' ends in the background until [`Self::stop`].
    pub async fn start(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        if let Err(error) = self.connect().await {
            tracing::warn!(%error, "Redis does not answer; carts and checkouts answer 503 until it does (retrying)");
        }
        let supervisor = {
            let store = Arc::clone(self);
            tokio::spawn(async move { store.supervise().await })
        };
        let renewer = {
            let store = Arc::clone(self);
            tokio::spawn(async move { store.renew_held_locks().await })
        };
        let mut tasks = vec![supervisor, renewer];
        if let Some(receiver) = lock(&self.finishes_to_send).take() {
            let store = Arc::clone(self);
            tasks.push(tokio::spawn(
                async move { store.send_finishes(receiver).await },
            ));
        }
        tasks
    }

    /// Stops the renewer and the cores' queues; the finisher sends what is queued, waiting for
    /// Redis until those ends' locks expire, then ends, and the supervisor with it.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
        self.finisher_stop.notify_one();
        self.starts.stop();
        self.reconnected.notify_waiters();
    }

    /// Ends (answers to store, locks to release) the finisher holds that Redis has not taken yet.
    pub fn ends_waiting(&self) -> usize {
        self.ends_waiting.load(Ordering::Relaxed)
    }

    /// The lock TTL (`--redis-lock-ttl`).
    pub fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms)
    }

    /// The key of a cart (`kind` "cart") or of an idempotency key's lock or answer. On a Redis
    /// Cluster every key carries a hash tag, so the keys one script touches share a slot: a key's
    /// lock and answer share the tag of the key's hash (the key itself may hold braces), and
    /// every cart shares `{carts}` with the set of live carts.
    fn key(&self, kind: &str, id: &str) -> String {
        // Built by hand, not with `format!`: two of these go into every step of every batch.
        let mut key = String::with_capacity(self.prefix.len() + kind.len() + id.len() + 20);
        key.push_str(&self.prefix);
        key.push_str(kind);
        match (self.client.is_cluster(), kind) {
            (false, _) => key.push(':'),
            (true, "cart") => key.push_str(":{carts}:"),
            (true, _) => {
                use std::fmt::Write;
                let _ = write!(
                    key,
                    ":{{{:016x}}}:",
                    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
                );
            }
        }
        key.push_str(id);
        key
    }

    /// The set of live carts (`--carts-max` counts it).
    fn carts_key(&self) -> String {
        match self.client.is_cluster() {
            false => format!("{}carts", self.prefix),
            true => format!("{}carts:{{carts}}", self.prefix),
        }
    }

    /// Whether Redis answers now, for `/readyz`: `Err` says why not.
    pub fn check(&self) -> Result<(), String> {
        match (
            self.connection.load().is_some(),
            lock(&self.last_error).clone(),
        ) {
            (true, _) => Ok(()),
            (false, reason) => Err(format!(
                "unreachable: {}; carts and checkouts answer 503 session_store_unavailable",
                reason.unwrap_or_else(|| "not connected".into())
            )),
        }
    }

    /// Creates an empty cart, unless `carts_max` live carts exist already.
    pub async fn create_cart(
        &self,
        cart_id: &CartId,
        now_ms: i64,
        ttl_ms: i64,
        carts_max: usize,
    ) -> Result<(), CartError> {
        // A fresh cart's key is new: what the script can trip on is the set of live carts.
        let reply: Vec<String> = self
            .run(
                &self.carts_key(),
                self.scripts
                    .cart_create
                    .key(self.carts_key())
                    .key(self.key("cart", cart_id.as_str()))
                    .arg(now_ms)
                    .arg(ttl_ms)
                    .arg(cart_id.as_str())
                    .arg(carts_max),
            )
            .await
            .map_err(CartError::from)?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            Some("full") => Err(CartError::Full(carts_max)),
            _ => Err(self.unexpected_reply("cart", cart_id.as_str(), &reply)),
        }
    }

    fn unexpected_reply(&self, kind: &str, id: &str, reply: &[String]) -> CartError {
        CartError::Store(StoreError::Unexpected {
            key: self.key(kind, id),
            what: format!("script reply {:?}", reply.first()),
        })
    }

    fn cart_reply(
        &self,
        cart_id: &CartId,
        reply: &[String],
        expires_at_ms: i64,
    ) -> Result<CartView, CartError> {
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(CartView {
                cart_id: cart_id.clone(),
                items: parse_lines(&self.key("cart", cart_id.as_str()), reply.get(1))?,
                expires_at_ms,
            }),
            Some("none") => Err(CartError::NotFound),
            Some("too_many") => Err(CartError::TooManyItems),
            _ => Err(self.unexpected_reply("cart", cart_id.as_str(), reply)),
        }
    }

    /// A live cart, with `change` (a SKU and its new quantity, 0 removing it) applied atomically
    /// first if given; using a cart refreshes its expiry.
    pub async fn cart(
        &self,
        cart_id: &CartId,
        change: Option<(&Sku, i64)>,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<CartView, CartError> {
        let script = match change {
            Some(_) => &self.scripts.cart_set,
            None => &self.scripts.cart_get,
        };
        let mut invocation = script.key(self.carts_key());
        invocation
            .key(self.key("cart", cart_id.as_str()))
            .arg(now_ms)
            .arg(ttl_ms)
            .arg(cart_id.as_str());
        if let Some((sku, quantity)) = change {
            invocation
                .arg(sku.as_str())
                .arg(quantity)
                .arg(CART_ITEMS_MAX);
        }
        let subject = format!(
            "{} or {}",
            self.key("cart", cart_id.as_str()),
            self.carts_key()
        );
        let reply: Vec<String> = self.run(&subject, &invocation).await?;
        self.cart_reply(cart_id, &reply, now_ms + ttl_ms)
    }

    /// Empties a cart (after it was checked out), keeping its expiry.
    pub async fn clear_cart(&self, cart_id: &CartId) -> Result<(), StoreError> {
        self.run::<i64>(
            &self.key("cart", cart_id.as_str()),
            &self
                .scripts
                .cart_clear
                .key(self.key("cart", cart_id.as_str())),
        )
        .await
        .map(|_| ())
    }

    /// A checkout's start: the answer cached under the lock's key, else the submission lock,
    /// and with `cart` (its id, now, its TTL) the cart's lines. Without a cart it goes with
    /// others' in one batched call ([`starts`]); with one, in one call of its own (two on a Redis
    /// Cluster, where the key's lock and the cart live in different slots: the lock first).
    pub async fn begin(
        self: &Arc<Self>,
        lock: &Submission,
        cart: Option<(&CartId, i64, i64)>,
    ) -> Result<Begin, StoreError> {
        let Some((cart_id, now_ms, ttl_ms)) = cart else {
            return self.queue_start(&lock.key, Some(lock.value.clone())).await;
        };
        if !self.client.is_cluster() {
            return self.begin_with_cart(lock, cart_id, now_ms, ttl_ms).await;
        }
        match self
            .queue_start(&lock.key, Some(lock.value.clone()))
            .await?
        {
            Begin::Locked(_) => match self.cart(cart_id, None, now_ms, ttl_ms).await {
                Ok(view) => Ok(Begin::Locked(Some(view.items))),
                Err(CartError::NotFound) => Ok(Begin::Locked(None)),
                Err(CartError::Store(error)) => Err(error),
                Err(other) => Err(StoreError::Unexpected {
                    key: self.key("cart", cart_id.as_str()),
                    what: other.to_string(),
                }),
            },
            other => Ok(other),
        }
    }

    /// [`Self::begin`] with a cart, as one script (one server: every key in one place).
    async fn begin_with_cart(
        &self,
        lock: &Submission,
        cart_id: &CartId,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Begin, StoreError> {
        let (key, value) = (&lock.key, &lock.value);
        let answer_key = self.key("key", key.as_str());
        let cart_key = self.key("cart", cart_id.as_str());
        let mut invocation = self.scripts.begin.key(&answer_key);
        invocation
            .key(self.carts_key())
            .key(&cart_key)
            .arg(value)
            .arg(self.lock_ttl_ms)
            .arg(now_ms)
            .arg(ttl_ms)
            .arg(cart_id.as_str());
        // A script error names no key: every key the script reads is named.
        let subject = format!("{answer_key}, {cart_key} or {}", self.carts_key());
        let reply: Vec<String> = self.run(&subject, &invocation).await?;
        let tag = reply.first().map_or("", String::as_str);
        match (tag, reply.get(1).map(String::as_str)) {
            ("locked", Some("cart")) => {
                Ok(Begin::Locked(Some(parse_lines(&cart_key, reply.get(2))?)))
            }
            ("locked", _) => Ok(Begin::Locked(None)),
            (tag, payload) => self.read_begin(key, tag, payload.unwrap_or("")),
        }
    }

    /// A sold-out refusal's look, batched with other starts, writing nothing: the answer any
    /// node gave under `key`, or whether a checkout holds its lock (`Held`), else `Locked(None)`
    /// (though no lock was taken: the caller refuses and keeps the refusal itself).
    pub async fn peek(self: &Arc<Self>, key: &IdempotencyKey) -> Result<Begin, StoreError> {
        self.queue_start(key, None).await
    }

    /// Counts a checkout that went on without the submission lock (Redis down).
    pub fn count_fallback(&self) {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// The store's metrics.
    pub fn encode_metrics(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::{encode_counter, encode_gauge};
        encode_gauge(
            encoder,
            "turnstile_redis_connected",
            "1 while the Redis connection is up.",
            u64::from(self.connection.load().is_some()),
        )?;
        let stats = &self.stats;
        for (name, help, counter) in [
            ("turnstile_redis_calls", "Redis calls (a script, or one pipeline of a core's batch of steps).", &stats.calls),
            ("turnstile_redis_errors", "Redis calls that failed or timed out.", &stats.errors),
            ("turnstile_redis_reconnects", "Attempts to reconnect to Redis.", &stats.reconnects),
            (
                "turnstile_redis_lock_fallbacks",
                "Checkouts that went on without a submission lock because Redis was down (--redis-optional: the node's own key table and journal kept them unique on this node).",
                &stats.fallbacks,
            ),
            (
                "turnstile_redis_lock_renewals",
                "Submission locks renewed while their checkout's outcome was not known yet.",
                &stats.renewals,
            ),
            (
                "turnstile_redis_locks_lost",
                "Submission locks found expired or taken while their checkout's outcome was not known on this node, or keys another node answered while this node's answer could not reach Redis (see the ERROR log).",
                &stats.locks_lost,
            ),
        ] {
            encode_counter(encoder, name, help, counter.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_bad_bytes_are_refused() {
        let answer = StoredAnswer {
            fingerprint: "ab12".into(),
            status: 201,
            body: "{\"a\":\"x\\ny\"}\nsecond line".into(),
            at_ms: 1_764_000_000_000,
        };
        assert_eq!(decode_answer(&encode_answer(&answer)), Ok(answer));
        for bad in [
            "",
            "201 5 f",
            "201 5\n{}",
            "2x1 5 f\n{}",
            "99 5 f\n{}",
            "201 five f\n{}",
            "201 5  \n{}",
            "201 5 f g\n{}",
        ] {
            assert!(decode_answer(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn packed_cart_lines_come_back_in_the_order_they_were_added() {
        let packed = "s:b 2:5\ns:a 1:7\ns:c 3:1".to_owned();
        let lines = parse_lines("k", Some(&packed)).unwrap();
        let names: Vec<(&str, i64)> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
        assert_eq!(names, vec![("a", 7), ("b", 5), ("c", 1)]);
        assert_eq!(parse_lines("k", Some(&String::new())).unwrap(), vec![]);
        assert_eq!(parse_lines("k", None).unwrap(), vec![]);
        for bad in [
            "s:a x:1",
            "s:a 1",
            "s:a",
            "a 1:1",
            "s:a/b 1:1",
            "s:a 1:?",
            "s: 1:1",
        ] {
            assert!(parse_lines("k", Some(&bad.to_owned())).is_err(), "{bad:?}");
        }
    }
}
