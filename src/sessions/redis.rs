//! Carts, submission locks and finished answers in Redis, shared by every node (`--redis-url`).
//!
//! # Keys
//! Every key starts with `--redis-prefix` (`turnstile:`) and has a TTL:
//! - `<p>cart:<cart_id>`: a hash, `n` (the next line's position) and `s:<sku>` =
//!   `<position>:<quantity>`; `PEXPIRE --cart-ttl`, refreshed by every use.
//! - `<p>carts`: a sorted set of live cart ids scored by expiry (Unix ms), so `--carts-max` holds
//!   across nodes; its TTL is kept at least as long as its newest cart's.
//! - `<p>lock:<idempotency key>`: the submission lock, `<node>/<start ms>.<random>/<n>/`, `SET NX PX
//!   --redis-lock-ttl` (60 s) while a checkout with that key runs, renewed by its node while the
//!   checkout's outcome is unknown there, deleted by its holder only (compare-and-delete).
//! - `<p>answer:<idempotency key>`: the finished answer, `<status> <at_ms> <fingerprint>\n<body>`,
//!   `PX` the key's retention (`--idempotency-retention` for answers that created an order, one
//!   minute for `404` and `409 out_of_stock`: a sold-out flood writes one per request).
//!
//! # Mechanism
//! Every operation is one Lua script, so each is atomic and costs one round trip: a cart change
//! (read-modify-write of its hash, the line cap, the expiry), and a checkout's start (the cached
//! answer, else the lock, and the cart when the checkout names one). A checkout's end (the answer
//! stored and the lock released, atomically, answer first) is queued after the journal's commit
//! and not awaited: one task sends the queued ends, up to 256 in one call, so Redis adds one round
//! trip to a checkout, and a bit more than half a call's work under load. The journal stays the truth: the
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
    client: redis::Client,
    connection_config: AsyncConnectionConfig,
    connection: ArcSwapOption<MultiplexedConnection>,
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
    held: Mutex<FxHashMap<u64, (IdempotencyKey, String)>>,
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
    /// Checkouts' ends waiting to be sent, batched by the finisher task.
    finishes: tokio::sync::mpsc::Sender<Finish>,
    /// Taken by [`Self::start`].
    finishes_to_send: Mutex<Option<tokio::sync::mpsc::Receiver<Finish>>>,
    /// Wakes the finisher to send what is queued and end.
    finisher_stop: tokio::sync::Notify,
    /// Wakes the finisher and the renewer when a new connection is up: ends that wait are sent,
    /// and locks renewed, at once.
    reconnected: tokio::sync::Notify,
}

/// A checkout's end: its answer to store (and for how long), and its lock to release.
struct Finish {
    key: IdempotencyKey,
    value: String,
    answer: Option<(StoredAnswer, i64)>,
    /// Past this an end that could not be sent is dropped.
    deadline: tokio::time::Instant,
}

impl Finish {
    /// An end kept until its lock has expired anyway, or, with an answer, as long as the answer
    /// lives: a checkout that went on without the lock (Redis down longer than a minute) must
    /// still leave its answer once Redis is back, or a retry on another node buys again. FINISH
    /// never replaces an answer nor stores one while another checkout holds the lock, so a late
    /// one is safe.
    fn new(
        key: IdempotencyKey,
        value: String,
        answer: Option<(StoredAnswer, i64)>,
        lock: Duration,
    ) -> Self {
        let keep = answer.as_ref().map_or(lock, |(_, ttl_ms)| {
            Duration::from_millis(u64::try_from(*ttl_ms).unwrap_or(0)).max(lock)
        });
        Self {
            key,
            value,
            answer,
            deadline: tokio::time::Instant::now() + keep,
        }
    }
}

struct Scripts {
    cart_create: Script,
    cart_get: Script,
    cart_set: Script,
    cart_clear: Script,
    begin: Script,
    finish: Script,
    renew: Script,
}

/// `refresh`: a cart's expiry renewed in the hash and in the set of live carts. `lines`: a cart's
/// lines packed in one string (`s:<sku> <position>:<quantity>` per line, `\n` between): one bulk
/// string is far cheaper to send and parse than the hash's fields, and the sorting by position is
/// left to the node (Redis's CPU is the one every node shares).
const REFRESH: &str = r"
local function lines(cart)
  local fields = redis.call('HGETALL', cart)
  local out = {}
  for i = 1, #fields, 2 do
    if string.byte(fields[i], 1) == 115 then out[#out + 1] = fields[i] .. ' ' .. fields[i + 1] end
  end
  return table.concat(out, '\n')
end
local function refresh(carts, cart, now, ttl, id)
  redis.call('PEXPIRE', cart, ttl)
  redis.call('ZADD', carts, now + ttl, id)
  local left = redis.call('PTTL', carts)
  if left < ttl then redis.call('PEXPIRE', carts, ttl) end
end
";

const CART_CREATE: &str = r"
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return {'full'} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'n', 0)
refresh(KEYS[1], KEYS[2], now, ttl, ARGV[3])
return {'ok'}
";

const CART_GET: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then return {'none'} end
refresh(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
return {'ok', lines(KEYS[2])}
";

/// ARGV[4] = sku, ARGV[5] = quantity (0 removes), ARGV[6] = lines at most.
const CART_SET: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then return {'none'} end
local field, quantity = 's:' .. ARGV[4], tonumber(ARGV[5])
local old = redis.call('HGET', KEYS[2], field)
if quantity == 0 then
  if old then redis.call('HDEL', KEYS[2], field) end
elseif old then
  local position = string.match(old, '^(%d+):')
  redis.call('HSET', KEYS[2], field, position .. ':' .. ARGV[5])
else
  if redis.call('HLEN', KEYS[2]) - 1 >= tonumber(ARGV[6]) then return {'too_many'} end
  local position = redis.call('HINCRBY', KEYS[2], 'n', 1)
  redis.call('HSET', KEYS[2], field, position .. ':' .. ARGV[5])
end
refresh(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
return {'ok', lines(KEYS[2])}
";

/// Empties a cart, keeping its expiry. KEYS[1] = cart.
const CART_CLEAR: &str = r"
local left = redis.call('PTTL', KEYS[1])
if left <= 0 then return 0 end
local next = redis.call('HGET', KEYS[1], 'n') or 0
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'n', next)
redis.call('PEXPIRE', KEYS[1], left)
return 1
";

/// A checkout's start. KEYS[1] = answer, KEYS[2] = lock, [KEYS[3] = carts, KEYS[4] = cart];
/// ARGV[1] = lock value, ARGV[2] = lock ttl ms, [ARGV[3] = now ms, ARGV[4] = cart ttl ms, ARGV[5] =
/// cart id].
///
/// A lock Turnstile wrote is a string with a TTL; anything else under the lock's key (another
/// type, a value without expiry) would make the key answer `409` for ever, so it is `junk`: the
/// checkout fails naming the key, as junk under an answer key does.
const BEGIN: &str = r"
local answer = redis.call('GET', KEYS[1])
if answer then return {'answer', answer} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local held = redis.pcall('GET', KEYS[2])
  if type(held) ~= 'string' or redis.call('PTTL', KEYS[2]) < 0 then return {'junk'} end
  if held ~= ARGV[1] then return {'held'} end
end
if #KEYS < 4 then return {'locked'} end
if redis.call('EXISTS', KEYS[4]) == 0 then return {'locked', 'none'} end
refresh(KEYS[3], KEYS[4], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
return {'locked', 'cart', lines(KEYS[4])}
";

/// Checkouts' ends, many in one call: for each, the answer stored (if any), then the lock released
/// if still that checkout's. KEYS = answer, lock, answer, lock, ...; ARGV = lock value, answer, its
/// TTL in ms (0: none to store), for each in turn.
///
/// The answer is stored only if none is there yet and no other checkout holds the lock (one that
/// went on without the lock, Redis being unreachable, or whose lock expired, must not replace the
/// answer another node's clients already replay); `pcall`, so junk under one key does not fail
/// the whole batch. A lock is "ours" when its value starts with the one given: lock values end
/// with `/`, so a checkout's own value matches only itself, and the node's prefix (`<node>/`,
/// given by the start-up recovery) matches every lock of the node's earlier runs.
///
/// Returns the indexes (from 1) of the ends whose answer finds the key taken by another: another
/// answer there, or another checkout holding the lock while none is. Either way this node's
/// answer could not reach Redis while its lock lived, and another node placed the key or is
/// placing it: the key has (or is about to have) an order on each of two nodes, which the node
/// reports.
const FINISH: &str = r"
local twins = {}
for i = 1, #KEYS / 2 do
  local ttl = tonumber(ARGV[3 * i])
  local value = ARGV[3 * i - 2]
  local lock = redis.pcall('GET', KEYS[2 * i])
  local ours = type(lock) == 'string' and string.sub(lock, 1, #value) == value
  if ttl > 0 then
    local there = redis.pcall('GET', KEYS[2 * i - 1])
    if there == false then
      if ours or lock == false then
        redis.call('SET', KEYS[2 * i - 1], ARGV[3 * i - 1], 'PX', ttl)
      else
        twins[#twins + 1] = i
      end
    elseif type(there) == 'string' and there ~= ARGV[3 * i - 1] then
      twins[#twins + 1] = i
    end
  end
  if ours then redis.call('DEL', KEYS[2 * i]) end
end
return twins
";

/// Renews the locks of checkouts whose outcome is not known yet. KEYS = their locks; ARGV[1] = the
/// TTL in ms, ARGV[1 + i] = the value of lock i. A lock still holding its checkout's value gets a
/// new TTL; one that does not (gone, or another checkout's) is not taken back, since its
/// checkout may have ended meanwhile: its index is returned, for the node to say it lost it.
const RENEW: &str = r"
local lost = {}
for i = 1, #KEYS do
  if redis.pcall('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
";

impl Scripts {
    fn new() -> Self {
        let with_refresh = |body: &str| Script::new(&format!("{REFRESH}{body}"));
        Self {
            cart_create: with_refresh(CART_CREATE),
            cart_get: with_refresh(CART_GET),
            cart_set: with_refresh(CART_SET),
            cart_clear: Script::new(CART_CLEAR),
            begin: with_refresh(BEGIN),
            finish: Script::new(FINISH),
            renew: Script::new(RENEW),
        }
    }
}

/// `<status> <at_ms> <fingerprint>\n<body>`: the answer as Redis keeps it.
pub fn encode_answer(answer: &StoredAnswer) -> String {
    format!(
        "{} {} {}\n{}",
        answer.status, answer.at_ms, answer.fingerprint, answer.body
    )
}

/// The answer [`encode_answer`] wrote, or what is wrong with the bytes.
pub fn decode_answer(raw: &str) -> Result<StoredAnswer, String> {
    let (head, body) = raw.split_once('\n').ok_or("no header line")?;
    let mut parts = head.split(' ');
    let (Some(status), Some(at_ms), Some(fingerprint), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "header {head:?} is not `<status> <at_ms> <fingerprint>`"
        ));
    };
    let status: u16 = status
        .parse()
        .ok()
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("status {status:?}"))?;
    let at_ms: i64 = at_ms.parse().map_err(|_| format!("time {at_ms:?}"))?;
    if fingerprint.is_empty() {
        return Err("empty fingerprint".into());
    }
    Ok(StoredAnswer {
        fingerprint: fingerprint.to_owned(),
        status,
        body: body.to_owned(),
        at_ms,
    })
}

/// Whether Redis answered with an error about what it holds (rather than about being unavailable
/// now: loading, busy, out of memory, read-only, failing over).
fn is_unexpected(error: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    match error.kind() {
        ErrorKind::TypeError | ErrorKind::ResponseError => true,
        ErrorKind::ExtensionError => error.code() == Some("WRONGTYPE"),
        _ => false,
    }
}

/// A cart's lines as the scripts pack them (`s:<sku> <position>:<quantity>` per line, in the
/// hash's order), in the order they were first added.
fn parse_lines(key: &str, packed: Option<&String>) -> Result<Vec<(Sku, i64)>, StoreError> {
    let packed = packed.map_or("", String::as_str);
    let mut lines = packed
        .split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.strip_prefix("s:")
                .and_then(|line| line.split_once(' '))
                .and_then(|(sku, value)| {
                    let (position, quantity) = value.split_once(':')?;
                    Some((
                        position.parse::<u64>().ok()?,
                        Sku::parse(sku).ok()?,
                        quantity.parse::<i64>().ok()?,
                    ))
                })
                .ok_or_else(|| StoreError::Unexpected {
                    key: key.to_owned(),
                    what: format!("cart line {line:?}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    lines.sort_unstable_by_key(|(position, ..)| *position);
    Ok(lines.into_iter().map(|(_, sku, q)| (sku, q)).collect())
}

impl RedisStore {
    /// A store for `config` (the URL is parsed, nothing is connected yet: call [`Self::start`]).
    pub fn new(config: &RedisConfig, node: String, started_ms: i64) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("bad --redis-url: {e}")))?;
        let (finishes, finishes_to_send) = tokio::sync::mpsc::channel(FINISHES_QUEUED_MAX);
        let nonce = crate::random::random_bytes(4).map_err(|e| {
            StoreError::Unavailable(format!("no random bytes for the run's id: {e}"))
        })?;
        let run_id = format!("{started_ms}.{}", crate::random::hex(&nonce));
        Ok(Self {
            client,
            connection_config: AsyncConnectionConfig::new()
                .set_connection_timeout(config.timeout)
                .set_response_timeout(config.timeout),
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
            finishes,
            finishes_to_send: Mutex::new(Some(finishes_to_send)),
            finisher_stop: tokio::sync::Notify::new(),
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

    /// Stops the supervisor and the renewer; the finisher sends what is queued (while Redis
    /// answers), then ends.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
        self.finisher_stop.notify_one();
        self.reconnected.notify_waiters();
    }

    /// The lock TTL (`--redis-lock-ttl`).
    pub fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms)
    }

    /// Renews the registered locks a third of their TTL at a time, and at once after a
    /// reconnection (an outage may have used up most of their life), until [`Self::stop`].
    async fn renew_held_locks(&self) {
        let every = Duration::from_millis(self.lock_ttl_ms / 3).max(Duration::from_millis(100));
        loop {
            let reconnected = self.reconnected.notified();
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = reconnected => {}
            }
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            let held: Vec<(u64, IdempotencyKey, String)> = lock(&self.held)
                .iter()
                .map(|(id, (key, value))| (*id, key.clone(), value.clone()))
                .collect();
            for batch in held.chunks(RENEWALS_PER_CALL_MAX) {
                if let Err(error) = self.renew_batch(batch).await {
                    tracing::warn!(%error, locks = batch.len(), "could not renew submission locks in Redis; retrying at the next renewal");
                    break;
                }
            }
        }
    }

    async fn renew_batch(&self, batch: &[(u64, IdempotencyKey, String)]) -> Result<(), StoreError> {
        let mut invocation = self.scripts.renew.prepare_invoke();
        invocation.arg(self.lock_ttl_ms);
        for (_, key, value) in batch {
            invocation.key(self.key("lock", key.as_str())).arg(value);
        }
        let lost: Vec<usize> = self.run("a batch of submission locks", &invocation).await?;
        self.stats
            .renewals
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for index in lost {
            let Some((id, key, _)) = index.checked_sub(1).and_then(|i| batch.get(i)) else {
                continue;
            };
            // A checkout that ended meanwhile released its own lock: not lost.
            if lock(&self.held).remove(id).is_some() {
                self.stats.locks_lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!(key = %key.as_str(), lock = %self.key("lock", key.as_str()), "a submission lock expired or was taken while this node's checkout under it has no known outcome: another node may start the same key (was Redis restarted without persistence, or unreachable for longer than --redis-lock-ttl?)");
            }
        }
        Ok(())
    }

    async fn connect(&self) -> Result<(), String> {
        let attempt = self
            .client
            .get_multiplexed_async_connection_with_config(&self.connection_config);
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no connection within {:?}", self.timeout)),
        };
        match result {
            Ok(connection) => {
                self.connection.store(Some(Arc::new(connection)));
                self.reconnected.notify_waiters();
                *lock(&self.last_error) = None;
                tracing::info!(node = %self.node, prefix = %self.prefix, "Redis connected");
                Ok(())
            }
            Err(error) => {
                *lock(&self.last_error) = Some(error.clone());
                Err(error)
            }
        }
    }

    async fn supervise(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_BACKOFF_MAX);
        while !self.stopped.load(Ordering::Acquire) {
            if self.connection.load().is_some() {
                backoff.reset();
                self.wake.notified().await;
                continue;
            }
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            match self.connect().await {
                Ok(()) => tracing::info!("Redis is back"),
                Err(error) => {
                    let wait = backoff.next_wait();
                    tracing::debug!(%error, ?wait, "Redis reconnection failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Runs a script; a broken connection is dropped and the supervisor woken. A connection found
    /// broken at once (Redis restarted or went away while this node was idle: nothing notices
    /// until a call) is not the answer: the call waits for the supervisor's new connection, within
    /// `--redis-timeout`, and runs once more. Every script may run twice (`BEGIN` takes a lock it
    /// already holds again). A call that timed out is not retried.
    async fn run<T: redis::FromRedisValue>(
        &self,
        subject: &str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let started = tokio::time::Instant::now();
        let had_connection = self.connection.load().is_some();
        let error = match self.run_once(subject, invocation).await {
            Err(error @ StoreError::Unavailable(_)) => error,
            other => return other,
        };
        let deadline = started + self.timeout;
        // Registered before the check, so a reconnection between the two is not missed.
        let reconnected = self.reconnected.notified();
        tokio::pin!(reconnected);
        reconnected.as_mut().enable();
        // Only a call whose failure dropped the connection waits for the next one (an error that
        // left it in place, like a full Redis, is the answer).
        if !had_connection || self.connection.load().is_some() {
            return Err(error);
        }
        if tokio::time::timeout_at(deadline, reconnected)
            .await
            .is_err()
        {
            return Err(error);
        }
        tokio::time::timeout_at(deadline, self.run_once(subject, invocation))
            .await
            .unwrap_or(Err(error))
    }

    async fn run_once<T: redis::FromRedisValue>(
        &self,
        subject: &str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let Some(connection) = self.connection.load_full() else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            let reason = lock(&self.last_error)
                .clone()
                .unwrap_or_else(|| "not connected".into());
            return Err(StoreError::Unavailable(reason));
        };
        let mut handle = MultiplexedConnection::clone(&connection);
        let outcome =
            match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut handle)).await {
                Ok(Ok(value)) => return Ok(value),
                // Redis answered, and what it said is not about being unavailable (a key of
                // another type, bytes that are not UTF-8, a script failing on a value): something
                // else wrote under the prefix. Not "unavailable", or a checkout would go on
                // without the lock past an answer it could not read.
                Ok(Err(error)) if is_unexpected(&error) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(StoreError::Unexpected {
                        key: subject.to_owned(),
                        what: error.to_string(),
                    });
                }
                Ok(Err(error)) => {
                    let broken = error.is_io_error()
                        || error.is_timeout()
                        || error.is_connection_dropped()
                        || error.is_connection_refusal()
                        || error.is_unrecoverable_error();
                    (error.to_string(), broken)
                }
                Err(_) => (format!("no answer within {:?}", self.timeout), true),
            };
        let (reason, broken) = outcome;
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(reason.clone());
        if broken {
            // Only the connection that failed is dropped: a newer one may already be in place.
            let current = self.connection.load();
            if current
                .as_ref()
                .is_some_and(|now| Arc::ptr_eq(now, &connection))
            {
                self.connection.store(None);
                tracing::warn!(error = %reason, "Redis connection lost; reconnecting");
            }
            self.wake.notify_one();
        }
        Err(StoreError::Unavailable(reason))
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    fn carts_key(&self) -> String {
        format!("{}carts", self.prefix)
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

    /// A submission lock for a checkout under `key`, not taken yet: [`Self::begin`] takes it. Kept
    /// by a checkout that goes on without Redis too, since a lock call that timed out may still
    /// have taken it, and its answer must reach Redis (with the lock released) once Redis is back.
    pub fn submission(self: &Arc<Self>, key: &IdempotencyKey) -> Submission {
        let id = self.locks_taken.fetch_add(1, Ordering::Relaxed);
        Submission {
            store: Arc::clone(self),
            key: key.clone(),
            value: format!("{}/{}/{id}/", self.node, self.run_id),
            id,
            open: true,
            renewed: false,
        }
    }

    /// A checkout's start, in one round trip: the answer cached under the lock's key, else the
    /// submission lock, and with `cart` (its id, now, its TTL) the cart's lines.
    pub async fn begin(
        &self,
        lock: &Submission,
        cart: Option<(&CartId, i64, i64)>,
    ) -> Result<Begin, StoreError> {
        let (key, value) = (&lock.key, &lock.value);
        let answer_key = self.key("answer", key.as_str());
        let mut invocation = self.scripts.begin.key(&answer_key);
        invocation
            .key(self.key("lock", key.as_str()))
            .arg(value)
            .arg(self.lock_ttl_ms);
        if let Some((cart_id, now_ms, ttl_ms)) = cart {
            invocation
                .key(self.carts_key())
                .key(self.key("cart", cart_id.as_str()))
                .arg(now_ms)
                .arg(ttl_ms)
                .arg(cart_id.as_str());
        }
        // A script error names no key: every key the script reads is named.
        let subject = match cart {
            Some((cart_id, ..)) => format!(
                "{answer_key}, {} or {}",
                self.key("cart", cart_id.as_str()),
                self.carts_key()
            ),
            None => answer_key.clone(),
        };
        let reply: Vec<String> = self.run(&subject, &invocation).await?;
        let unexpected = |what: String| StoreError::Unexpected {
            key: answer_key.clone(),
            what,
        };
        match reply.first().map(String::as_str) {
            Some("answer") => {
                let raw = reply.get(1).map_or("", String::as_str);
                decode_answer(raw).map(Begin::Answer).map_err(unexpected)
            }
            Some("held") => Ok(Begin::Held),
            Some("junk") => Err(StoreError::Unexpected {
                key: self.key("lock", key.as_str()),
                what: "a value Turnstile did not write (another type, or a value without expiry), which would hold the key for ever".into(),
            }),
            Some("locked") => {
                let lines = match (cart, reply.get(1).map(String::as_str)) {
                    (Some((cart_id, ..)), Some("cart")) => Some(parse_lines(
                        &self.key("cart", cart_id.as_str()),
                        reply.get(2),
                    )?),
                    _ => None,
                };
                Ok(Begin::Locked(lines))
            }
            other => Err(unexpected(format!("script reply {other:?}"))),
        }
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
            ("turnstile_redis_calls", "Redis calls (one script each).", &stats.calls),
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

    /// Sends the checkouts' ends as they come, up to [`FINISHES_PER_CALL_MAX`] in one call; a
    /// batch Redis did not take is sent again (with backoff) until its locks expire.
    async fn send_finishes(&self, mut receiver: tokio::sync::mpsc::Receiver<Finish>) {
        let mut batch: Vec<Finish> = Vec::with_capacity(FINISHES_PER_CALL_MAX);
        let mut backoff = Backoff::new(Duration::from_millis(50), RECONNECT_BACKOFF_MAX);
        loop {
            if batch.is_empty() {
                let stopping = self.stopped.load(Ordering::Acquire);
                let next = if stopping {
                    receiver.try_recv().ok()
                } else {
                    tokio::select! {
                        finish = receiver.recv() => finish,
                        () = self.finisher_stop.notified() => receiver.try_recv().ok(),
                    }
                };
                match next {
                    Some(finish) => batch.push(finish),
                    None => return,
                }
            }
            while batch.len() < FINISHES_PER_CALL_MAX {
                match receiver.try_recv() {
                    Ok(finish) => batch.push(finish),
                    Err(_) => break,
                }
            }
            match self.finish_batch(&batch).await {
                Ok(()) => {
                    batch.clear();
                    backoff.reset();
                }
                Err(error) => {
                    let now = tokio::time::Instant::now();
                    let before = batch.len();
                    batch.retain(|finish| finish.deadline > now);
                    if batch.len() < before {
                        tracing::warn!(%error, dropped = before - batch.len(), "could not store answers and release submission locks in Redis before the locks expired");
                    }
                    if self.stopped.load(Ordering::Acquire) {
                        return;
                    }
                    // Sent again as soon as the connection is back, or after the backoff.
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_wait()) => {}
                        () = self.reconnected.notified() => {}
                    }
                }
            }
        }
    }

    async fn finish_batch(&self, batch: &[Finish]) -> Result<(), StoreError> {
        let mut invocation = self.scripts.finish.prepare_invoke();
        for finish in batch {
            let (encoded, ttl_ms) = match &finish.answer {
                Some((answer, ttl_ms)) => (encode_answer(answer), (*ttl_ms).max(1)),
                None => (String::new(), 0),
            };
            invocation
                .key(self.key("answer", finish.key.as_str()))
                .key(self.key("lock", finish.key.as_str()))
                .arg(&finish.value)
                .arg(encoded)
                .arg(ttl_ms);
        }
        let twins: Vec<usize> = self
            .run("a batch of answers and locks", &invocation)
            .await?;
        for index in twins {
            let Some(finish) = index.checked_sub(1).and_then(|i| batch.get(i)) else {
                continue;
            };
            self.stats.locks_lost.fetch_add(1, Ordering::Relaxed);
            tracing::error!(key = %finish.key.as_str(), "another node answered this key, or is running it, while this node's answer could not reach Redis (cut off from it for longer than --redis-lock-ttl): the key has, or is about to have, an order on each of two nodes; look at both and cancel one");
        }
        Ok(())
    }

    /// Sends again, in the background, the answers this node gave since `answers`' oldest (read
    /// back from its journal at start) with the locks its earlier runs left: a node killed after
    /// answering and before its finisher reached Redis would otherwise leave other nodes `409` for
    /// a minute, then free to take the keys again. An answer already in Redis is left as it is.
    pub fn recover(self: &Arc<Self>, answers: Vec<(IdempotencyKey, StoredAnswer, i64)>) {
        if answers.is_empty() {
            return;
        }
        // Through the finisher's queue (waiting for room), so its batching and retries serve
        // these too.
        let (finishes, prefix) = (self.finishes.clone(), format!("{}/", self.node));
        let lock_ttl = self.lock_ttl();
        tokio::spawn(async move {
            let count = answers.len();
            for (key, answer, ttl_ms) in answers {
                let end = Finish::new(key, prefix.clone(), Some((answer, ttl_ms)), lock_ttl);
                if finishes.send(end).await.is_err() {
                    return;
                }
            }
            tracing::info!(answers = count, "queued this node's recent answers for Redis again, with the release of the locks its earlier run left on them");
        });
    }

    /// Queues a checkout's end for the finisher (or, with the queue full, sends it alone).
    fn enqueue_finish(self: &Arc<Self>, finish: Finish) {
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(finish)) =
            self.finishes.try_send(finish)
        {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let store = Arc::clone(self);
            runtime.spawn(async move {
                if let Err(error) = store.finish_batch(std::slice::from_ref(&finish)).await {
                    tracing::warn!(%error, key = %finish.key.as_str(), "could not release a submission lock in Redis; it expires by itself");
                }
            });
        }
    }
}

/// A submission lock this checkout holds. [`Submission::finish`] stores the answer and releases
/// it; dropped unfinished, it is released (the checkout ended without an answer to keep);
/// [`Submission::keep`] leaves a lock this checkout did not take to whoever holds it;
/// [`Submission::hold_until_restart`] keeps it renewed for the life of the process (the outcome
/// is unknown: another node must not start the same checkout while this one's commit may still
/// land).
pub struct Submission {
    store: Arc<RedisStore>,
    key: IdempotencyKey,
    value: String,
    /// This submission's number in the store (its place in the renewed locks).
    id: u64,
    open: bool,
    /// Registered with the store's renewer ([`Self::keep_alive`]).
    renewed: bool,
}

impl Submission {
    /// Keeps the lock alive until this submission ends: renewed a third of `--redis-lock-ttl` at
    /// a time while the checkout authorises and commits, however long its commit takes to be
    /// known.
    pub fn keep_alive(&mut self) {
        if !self.renewed {
            self.renewed = true;
            lock(&self.store.held).insert(self.id, (self.key.clone(), self.value.clone()));
        }
    }

    /// Stores `answer` for `ttl_ms` and releases the lock, in the background: the client's answer
    /// does not wait for it. Retried while Redis is unreachable, for as long as the answer lives.
    pub fn finish(mut self, answer: StoredAnswer, ttl_ms: i64) {
        self.open = false;
        self.stop_renewing();
        self.send_end(Some((answer, ttl_ms)));
    }

    /// Leaves the lock as it is: for a checkout that did not take it (another holds it, or an
    /// answer was found).
    pub fn keep(mut self) {
        self.open = false;
        self.stop_renewing();
    }

    /// The checkout's outcome stays unknown until a restart's recovery: its lock, if
    /// [`Self::keep_alive`] registered it, is renewed for as long as this process lives, then
    /// expires (a restarted node learns the outcome from its journal and sends the answer again,
    /// `RedisStore::recover`).
    pub fn hold_until_restart(mut self) {
        self.open = false;
    }

    fn stop_renewing(&mut self) {
        if self.renewed {
            self.renewed = false;
            lock(&self.store.held).remove(&self.id);
        }
    }

    fn send_end(&self, answer: Option<(StoredAnswer, i64)>) {
        self.store.enqueue_finish(Finish::new(
            self.key.clone(),
            self.value.clone(),
            answer,
            self.store.lock_ttl(),
        ));
    }
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("key", &self.key.as_str())
            .field("value", &self.value)
            .finish()
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if self.open {
            self.stop_renewing();
            self.send_end(None);
        }
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
