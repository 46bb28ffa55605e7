//! Several nodes selling one stock (`--node-id`).
//!
//! The pool of a SKU (units leased to no node) lives in MySQL, the source of truth every node
//! shares; a node sells from a **stock lease**, a block of units it took from the pool, in memory,
//! through the engine's lock-free shards, exactly as a single node sells its whole stock.
//! [`leases`] says how blocks are taken, sized, refilled and given back, and why no unit is ever
//! sold twice or lost between MySQL and memory; [`catalogue`] how products written through any
//! node reach every node; [`registry`] how a node says it is alive.
//!
//! Tables (migration `20261206000009_cluster.sql`): `cluster_nodes` (who runs, where it is
//! reached, its epoch, when it last renewed, by the database's clock), `stock_pool` (per SKU: the
//! units leased to no node, and the units a lowered stock asks back), `stock_leases` (per node and
//! SKU: `units`, everything given to the node, sold, held and still for sale together, with the
//! node's last reported `reserved` and `sold`). For every SKU, in every transaction MySQL can see:
//! `stock_pool.pool + Σ stock_leases.units == products.stock`.

pub mod adoption;
pub mod catalogue;
pub mod forget;
pub mod forward;
pub mod leases;
pub mod limits;
pub mod reaper;
pub mod registry;

use crate::domain::Sku;
use crate::journal::mysql::MySqlConfig;
use crate::journal::JournalError;
use arc_swap::ArcSwap;
use rustc_hash::FxHashMap;
use sqlx::MySqlPool;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a checkout that found its node's lease dry waits for a refill from the pool (or, the
/// pool empty, for other nodes to give back some of their unsold units).
pub const REFILL_WAIT: Duration = Duration::from_secs(3);

/// How a node takes part in several nodes' sale (`--node-id` and its companions).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's name (a DNS label).
    pub node_id: String,
    /// Where the other nodes reach this one; `None`: `http(s)://` and the address the listener
    /// was bound to (known once bound, as `--listen` may name port 0).
    pub advertise_url: Option<String>,
    /// Signs every call between nodes.
    pub secret: String,
    /// A node that has not renewed for this long is presumed dead.
    pub lease_ttl: Duration,
}

/// Failures of the cluster's bookkeeping in MySQL.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// MySQL did not answer or refused.
    #[error("{context}: {source}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The configuration's MySQL URL could not be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Another process registered this node since (a second live node with the same id, or a
    /// reaper that presumed this one dead): this node must take nothing more.
    #[error("node {0} was taken over (its epoch moved): it takes and gives back nothing more; restart it")]
    Fenced(String),
    /// This run cannot join the cluster as it is; starting it again can (the message says why).
    #[error("{0}")]
    Start(String),
    /// A lowered stock would be below the units held and sold across the nodes.
    #[error("stock {requested} is below the {committed} units held or sold across the nodes")]
    BelowCommitted {
        /// The stock asked for.
        requested: i64,
        /// Held and sold, as the nodes last reported.
        committed: i64,
    },
    /// A lowered stock waited for the nodes to give back leased units and they did not in time.
    #[error("stock {requested} needs units leased to nodes back, and they did not come back within {waited:?} (a node busy, paused, or down in write-behind: see GET /v1/cluster); nothing was changed, retry")]
    NotReturned {
        /// The stock asked for.
        requested: i64,
        /// How long the change waited.
        waited: Duration,
    },
    /// The client of calls between nodes could not be built.
    #[error("the client of calls between nodes: {0}")]
    Client(String),
    /// A product's definition in MySQL is not one this version reads.
    #[error("product {sku} in MySQL is unreadable: {reason}")]
    Unreadable {
        /// The row's SKU.
        sku: String,
        /// Why.
        reason: String,
    },
}

/// The one loop of the cluster's tasks: runs `step` at once, then every `every` (or when `wake`
/// fires), until `stop`. A failure is logged once (`what` says what failed), and again only after
/// a step succeeded; a fenced node's step ends the loop (nothing more is to be done).
pub(crate) async fn periodically<F, Fut>(
    what: &'static str,
    every: Duration,
    wake: Option<&tokio::sync::Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ClusterError>>,
{
    let mut failing = false;
    loop {
        match step().await {
            Ok(()) => {
                if failing {
                    tracing::info!(what, "MySQL answers again");
                }
                failing = false;
            }
            Err(error @ ClusterError::Fenced(_)) => {
                tracing::error!(%error, what, "this node was fenced");
                return;
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, what, "failed; retrying");
                }
                failing = true;
            }
        }
        let woken = async {
            match wake {
                Some(wake) => wake.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = woken => {}
            _ = stop.changed() => return,
        }
    }
}

/// Runs the transaction `attempt` makes again, a few times with the one backoff, while it fails
/// on a lock conflict (deadlock, lock wait timeout): the cluster's transactions touch the same
/// pool and lease rows from every node, and InnoDB picks a victim when two cross.
pub(crate) async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    const TRIES: u32 = 6;
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(5), Duration::from_millis(200));
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(ClusterError::Database { source, .. })
                if tries < TRIES && crate::journal::mysql::is_lock_conflict(&source) =>
            {
                tries += 1;
                tokio::time::sleep(backoff.next_wait()).await;
            }
            other => return other,
        }
    }
}

pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> ClusterError {
    move |source| ClusterError::Database { context, source }
}

/// What this node knows about one SKU's pool, read on the checkout path (atomics only).
#[derive(Debug, Default)]
pub struct PoolSignal {
    /// The pool's units at the last look (the catalogue's poll, or this node's last grant).
    pub units: AtomicI64,
    /// A checkout found this node's lease dry: the lease keeper should refill now.
    pub wanted: AtomicBool,
    /// Units the checkouts waiting for a refill ask for: the next block covers them all.
    pub waiting: AtomicI64,
    /// Units on their way back to the pool: held in the shards while their transaction runs, and
    /// no order's, so the node's reports and views count them neither held nor for sale.
    pub returning: AtomicI64,
    /// At the last look the pool was empty but other nodes held unsold units: a checkout that
    /// finds this node dry waits while they give some back (instead of a refusal while units
    /// are left in the shop).
    pub elsewhere: AtomicBool,
    /// Woken when a refill of this SKU ended (units or not).
    pub refilled: tokio::sync::Notify,
}

/// This node's part in the cluster: its name, its MySQL pools, what it knows of the pools, and
/// its health. Built at start; its tasks ([`registry::renew`], [`leases::keep`],
/// [`catalogue::follow`]) run beside the server.
pub struct Cluster {
    /// The options.
    pub config: ClusterConfig,
    /// Where the other nodes reach this one (set once the listener is bound).
    url: std::sync::OnceLock<String>,
    /// For leases, the catalogue and the views (small).
    pub(crate) db: MySqlPool,
    /// Renewals only, so a node busy with leases is never presumed dead for it.
    pub(crate) renew_db: MySqlPool,
    /// `--mysql-timeout`: every statement is bounded by it.
    pub(crate) timeout: Duration,
    /// The epoch this process registered with; a renewal that finds another is fenced.
    pub(crate) epoch: AtomicU64,
    /// The node learnt it was taken over: nothing more is taken or given.
    pub(crate) fenced: AtomicBool,
    /// When the last renewal succeeded (Unix ms by the local clock), for `/readyz`.
    pub(crate) renewed_at_ms: AtomicI64,
    /// Per SKU: the pool as last seen, the refill signal. Replaced whole when a SKU is added.
    pub(crate) signals: ArcSwap<FxHashMap<Sku, Arc<PoolSignal>>>,
    /// Per SKU: the other nodes' reported held and sold units, and the catalogue's stock.
    pub(crate) shop: ArcSwap<FxHashMap<Sku, catalogue::ShopCounts>>,
    /// Woken when a checkout finds its lease dry.
    pub(crate) wake: tokio::sync::Notify,
    /// Wakes the catalogue's reader (a grant emptied a pool: what is left elsewhere is read now).
    pub(crate) catalogue_wake: tokio::sync::Notify,
    /// Lease grants and returns done (for `/metrics` and `/v1/cluster`).
    pub(crate) grants: AtomicU64,
    pub(crate) returns: AtomicU64,
    /// Dead nodes whose lease this node settled.
    pub(crate) reaped: AtomicU64,
    /// The one client of calls between nodes.
    pub(crate) client: crate::http_client::HttpClient,
    /// Calls forwarded to an order's owner.
    pub(crate) forwarded: AtomicU64,
    /// Orders adopted from nodes that left or died.
    pub(crate) adopted: AtomicU64,
    /// MySQL is this node's journal: it may settle dead nodes' leases.
    pub(crate) journal_is_mysql: bool,
    /// Held while adopted orders go into this node's log and memory (write-behind: one writer
    /// of `Record::Adopted` at a time, [`adoption`]).
    pub(crate) adopting: tokio::sync::Mutex<()>,
}

impl Cluster {
    /// This node's part, with its own two small MySQL pools (renewals apart from the rest).
    pub fn new(
        config: ClusterConfig,
        mysql: &MySqlConfig,
        journal_is_mysql: bool,
    ) -> Result<Self, ClusterError> {
        let mut small = mysql.clone();
        small.pool_size = 3;
        let db = crate::journal::mysql::connect(&small)?;
        small.pool_size = 2;
        let renew_db = crate::journal::mysql::connect(&small)?;
        Ok(Self {
            config,
            url: std::sync::OnceLock::new(),
            db,
            renew_db,
            timeout: mysql.statement_timeout,
            epoch: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            renewed_at_ms: AtomicI64::new(0),
            signals: ArcSwap::from_pointee(FxHashMap::default()),
            shop: ArcSwap::from_pointee(FxHashMap::default()),
            wake: tokio::sync::Notify::new(),
            catalogue_wake: tokio::sync::Notify::new(),
            grants: AtomicU64::new(0),
            returns: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            client: forward::client().map_err(|e| ClusterError::Client(e.to_string()))?,
            forwarded: AtomicU64::new(0),
            adopted: AtomicU64::new(0),
            journal_is_mysql,
            adopting: tokio::sync::Mutex::new(()),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.config.node_id
    }

    /// Where the other nodes reach this one: `--advertise-url`, else the bound address.
    pub fn url(&self) -> &str {
        self.url.get().map_or("", String::as_str)
    }

    /// Sets where the other nodes reach this one, once the listener is bound: `--advertise-url`
    /// if given, else `http(s)://` and the bound address. (Registration comes before, with the
    /// URL then known or empty: [`registry::advertise`] writes it.)
    pub fn bound(&self, local: std::net::SocketAddr, tls: bool) {
        let url = self
            .config
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("{}://{local}", if tls { "https" } else { "http" }));
        let _ = self.url.set(url);
    }

    /// The SKU's signal, made if new.
    pub(crate) fn signal(&self, sku: &Sku) -> Arc<PoolSignal> {
        if let Some(signal) = self.signals.load().get(sku) {
            return Arc::clone(signal);
        }
        let mut made = None;
        self.signals.rcu(|signals| {
            let mut signals = FxHashMap::clone(signals);
            let signal = signals
                .entry(sku.clone())
                .or_insert_with(|| Arc::new(PoolSignal::default()));
            made = Some(Arc::clone(signal));
            signals
        });
        made.unwrap_or_default()
    }

    /// A checkout found this node's lease of `sku` dry (it wants `units`). If the pool had units
    /// at the last look, asks the lease keeper for more and waits for its refill until
    /// `deadline`; `true` when a refill ended meanwhile (the caller tries again). A pool known
    /// empty answers `false` at once, without I/O: the sold-out flood stays in memory.
    pub async fn refill(&self, sku: &Sku, units: i64, deadline: tokio::time::Instant) -> bool {
        let Some(signal) = self.signals.load().get(sku).cloned() else {
            return false;
        };
        if self.fenced.load(Ordering::Acquire) {
            return false;
        }
        if signal.units.load(Ordering::Acquire) <= 0 && !signal.elsewhere.load(Ordering::Acquire) {
            // The whole shop is sold out (as this node last saw it): refused now, in memory.
            return false;
        }
        let refilled = signal.refilled.notified();
        tokio::pin!(refilled);
        refilled.as_mut().enable();
        // Counted as waiting until this call ends, however it ends (a caller gone mid-wait drops
        // it: the count must not stay, or the node would ask the pool for units nobody waits for).
        let _waiting = Waiting::add(&signal.waiting, units);
        signal.wanted.store(true, Ordering::Release);
        self.wake.notify_one();
        tokio::time::timeout_at(deadline, refilled).await.is_ok()
    }

    /// Units of `sku` this node is giving back right now (held in its shards for no order).
    pub fn returning(&self, sku: &Sku) -> i64 {
        self.signals
            .load()
            .get(sku)
            .map_or(0, |signal| signal.returning.load(Ordering::Acquire))
    }

    /// Whether the whole shop may hold `units` of `sku` for sale, as this node last saw it: the
    /// pool, the other live nodes' unsold units (as they last reported) and `here` (this node's
    /// own for sale) together. A checkout whose lease ran dry and whose refill did not come in
    /// time is told to retry (`503`) if so, and that the SKU is out of stock (`409`, kept) if not:
    /// a line asking more than the shop has left is refused, not sent round again.
    pub fn may_serve(&self, sku: &Sku, units: i64, here: i64) -> bool {
        let Some(signal) = self.signals.load().get(sku).cloned() else {
            return false;
        };
        let pool = signal.units.load(Ordering::Acquire).max(0);
        let elsewhere = self
            .shop
            .load()
            .get(sku)
            .map_or(0, |counts| counts.live_unsold_elsewhere.max(0));
        // Just after this node's grant emptied the pool the catalogue's count of the others' is
        // older than the grant: units there are assumed until it is read again.
        let unknown = signal.elsewhere.load(Ordering::Acquire) && elsewhere == 0;
        unknown || pool + elsewhere + here.max(0) >= units
    }

    /// Whether `sku` is sold out in the whole shop as this node last saw it: the pool empty and no
    /// live node holding units for sale.
    pub fn sold_out_everywhere(&self, sku: &Sku) -> bool {
        self.signals.load().get(sku).is_some_and(|signal| {
            signal.units.load(Ordering::Acquire) <= 0 && !signal.elsewhere.load(Ordering::Acquire)
        })
    }

    /// `Err` when this node must not record anything now: fenced, or its last renewal older
    /// than `--lease-ttl` (paused, or cut off from MySQL: meanwhile another node may have
    /// presumed it dead, or an operator forgotten it, and given its lease away). It records again
    /// once a renewal succeeds; a renewal that finds its epoch moved fences it. Checked by every
    /// commit ([`crate::app::commit`]) right before its record goes, and by a checkout before it
    /// authorises (no payment for an order that cannot be recorded): a write-behind node
    /// acknowledges from its own disk, so nothing else stops a node that resumes from selling a
    /// lease it lost.
    pub fn may_sell(&self) -> Result<(), String> {
        match self.behind(self.config.lease_ttl) {
            Some(why) => Err(format!(
                "this node records nothing now ({why}; past --lease-ttl another node may have taken its lease)"
            )),
            None => Ok(()),
        }
    }

    /// Whether a renewal found this node fenced (another node took its lease over).
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Why this node cannot take checkouts now, if it cannot: fenced, or its renewals failing
    /// for longer than a third of `--lease-ttl` (well before another node would presume it dead).
    pub fn unready(&self) -> Option<String> {
        self.behind(self.config.lease_ttl / 3)
    }

    /// Fenced, or its last renewal older than `bound`: why, if so.
    fn behind(&self, bound: Duration) -> Option<String> {
        if self.is_fenced() {
            return Some(format!(
                "fenced: node {} was taken over; restart it",
                self.node()
            ));
        }
        let since = crate::time::now_ms() - self.renewed_at_ms.load(Ordering::Acquire);
        (since > bound.as_millis() as i64)
            .then(|| format!("cannot renew its leases in MySQL for {since} ms"))
    }

    /// The cluster's metrics: leases held, pools as last seen, grants and returns, fenced.
    pub fn encode_metrics(
        &self,
        engine: &crate::engine::Engine,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let signals = self.signals.load();
        let (mut leased, mut pool) = (0u64, 0u64);
        for (sku, signal) in signals.iter() {
            if let Some(index) = engine.inventory().lookup(sku) {
                leased += engine.inventory().view(index).available.max(0) as u64;
            }
            pool += signal.units.load(Ordering::Relaxed).max(0) as u64;
        }
        let (grants, returns) = self.lease_moves();
        crate::metrics::encode_gauge(
            encoder,
            "turnstile_cluster_leased_units",
            "Units this node holds for sale from its leases (neither sold nor held), all SKUs.",
            leased,
        )?;
        crate::metrics::encode_gauge(
            encoder,
            "turnstile_cluster_pool_units",
            "Units leased to no node, all SKUs, as this node last saw them (at most 250 ms old).",
            pool,
        )?;
        crate::metrics::encode_counter(
            encoder,
            "turnstile_cluster_lease_grants",
            "Blocks of units this node took from the pool.",
            grants,
        )?;
        crate::metrics::encode_counter(
            encoder,
            "turnstile_cluster_lease_returns",
            "Times this node gave unsold units back to the pool.",
            returns,
        )?;
        crate::metrics::encode_counter(
            encoder,
            "turnstile_cluster_nodes_reaped",
            "Dead nodes (MySQL as their journal) whose unsold units this node gave back to the pool.",
            self.reaped.load(Ordering::Relaxed),
        )?;
        crate::metrics::encode_counter(
            encoder,
            "turnstile_cluster_forwarded_calls",
            "Cancels and webhooks this node forwarded to the node that owns their order.",
            self.forwarded.load(Ordering::Relaxed),
        )?;
        crate::metrics::encode_counter(
            encoder,
            "turnstile_cluster_adopted_orders",
            "Open orders this node adopted from nodes that left or were presumed dead.",
            self.adopted.load(Ordering::Relaxed),
        )?;
        crate::metrics::encode_gauge(
            encoder,
            "turnstile_cluster_fenced",
            "1 once this node learnt it was taken over (it takes and gives back nothing more).",
            u64::from(self.fenced.load(Ordering::Relaxed)),
        )
    }

    /// Lease grants and returns done since start.
    pub fn lease_moves(&self) -> (u64, u64) {
        (
            self.grants.load(Ordering::Relaxed),
            self.returns.load(Ordering::Relaxed),
        )
    }
}

/// Units added to a waiting count, taken off again when dropped.
struct Waiting<'a> {
    count: &'a AtomicI64,
    units: i64,
}

impl<'a> Waiting<'a> {
    fn add(count: &'a AtomicI64, units: i64) -> Self {
        count.fetch_add(units, Ordering::AcqRel);
        Self { count, units }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(self.units, Ordering::AcqRel);
    }
}
