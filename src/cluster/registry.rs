//! Who runs: `cluster_nodes`, one row per node.
//!
//! A node registers at start (its URL, `state = 'live'`, one more on its `epoch`) and renews its
//! row every fifth of `--lease-ttl` on a connection pool of its own, so a node busy with leases
//! or a slow statement elsewhere is never presumed dead for it. Times are the database's clock
//! (`NOW(3)`), so nodes' clocks never have to agree. A renewal is `UPDATE ... WHERE epoch = ours`:
//! when it finds no row, another process registered as this node since (or a reaper presumed it
//! dead and moved its epoch), and this node is fenced: it takes and gives back nothing more, and
//! `/readyz` says so. A second live process with the same `--node-id` never gets that far: its
//! journal's writer lock (one per node and database) refuses it at start.
//!
//! The renewal also reports this node's held and sold units per SKU (`stock_leases.reserved`,
//! `.sold`), which every node's `GET /v1/products/{sku}` sums.

use super::{db, Cluster, ClusterError};
use crate::domain::Sku;
use serde::Serialize;
use sqlx::Row;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The database's clock in Unix milliseconds, as SQL.
pub(crate) const DB_NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

/// Registers this node: its row made or taken over, its epoch moved on (fencing any earlier run of
/// the same node still talking to the database, and ending any reaper's settling of an earlier
/// run presumed dead). Comes before the node reads its leases ([`super::catalogue::at_start`]),
/// so a reaper that returns an earlier run's units does so before that read or not at all.
///
/// `journal_turn` is the turn of its log this run took when it opened its journal
/// (`journal_writer.epoch`, [`crate::journal::Journal::writer_turn`]): recorded in the row, so a
/// reaper settling this run later fences that turn and no later one ([`super::reaper`]), and
/// checked in the same transaction to be still the log's turn. A run whose turn was moved on
/// between opening its journal and registering (by a reaper or `turnstile cluster forget` whose
/// row lacked the turn) would register live with every commit refused: its start fails instead,
/// and says to start it again.
pub async fn register(
    cluster: &Cluster,
    mode: &str,
    journal_turn: Option<u64>,
) -> Result<(), ClusterError> {
    let node = cluster.node().to_owned();
    let url = cluster.url().to_owned();
    let mode = mode.to_owned();
    let registered =
        crate::journal::mysql::in_transaction!(&cluster.renew_db, cluster.timeout, |tx| {
            sqlx::query(&format!(
                "INSERT INTO cluster_nodes \
               (node_id, url, epoch, state, mode, renewed_at_ms, started_at_ms, journal_turn) \
             VALUES (?, ?, 1, 'live', ?, {DB_NOW_MS}, {DB_NOW_MS}, ?) \
             ON DUPLICATE KEY UPDATE url = VALUES(url), epoch = epoch + 1, state = 'live', \
             mode = VALUES(mode), renewed_at_ms = VALUES(renewed_at_ms), \
             started_at_ms = VALUES(started_at_ms), reaped_at_ms = NULL, \
             journal_turn = VALUES(journal_turn)"
            ))
            .bind(&node)
            .bind(&url)
            .bind(&mode)
            .bind(journal_turn)
            .execute(&mut *tx)
            .await?;
            let found = match journal_turn {
                Some(_) => {
                    sqlx::query_scalar::<_, u64>(
                        "SELECT epoch FROM journal_writer WHERE node = ? LOCK IN SHARE MODE",
                    )
                    .bind(&node)
                    .fetch_optional(&mut *tx)
                    .await?
                }
                None => None,
            };
            if found != journal_turn {
                // Rolled back: this run is not registered.
                return Err(sqlx::Error::Configuration(Box::new(TurnMovedOn {
                    node: node.clone(),
                    mine: journal_turn.unwrap_or_default(),
                    found: found.unwrap_or_default(),
                })));
            }
            sqlx::query_scalar::<_, u64>("SELECT epoch FROM cluster_nodes WHERE node_id = ?")
                .bind(&node)
                .fetch_one(&mut *tx)
                .await?
        })
        .await;
    let epoch = match registered {
        Err(sqlx::Error::Configuration(inner)) if inner.is::<TurnMovedOn>() => {
            return Err(ClusterError::Start(inner.to_string()))
        }
        other => other.map_err(db("registering the node in cluster_nodes"))?,
    };
    cluster.epoch.store(epoch, Ordering::Release);
    cluster
        .renewed_at_ms
        .store(crate::time::now_ms(), Ordering::Release);
    tracing::info!(node = %cluster.node(), url = %cluster.url(), epoch, journal_turn, "registered in the cluster");
    Ok(())
}

/// Why a run did not register: its log's turn moved on since it opened its journal.
#[derive(Debug, thiserror::Error)]
#[error("node {node}'s journal was fenced while it started (journal_writer.epoch {found}, this run's turn {mine}): a reaper or `turnstile cluster forget` settled an earlier run of it; nothing was sold, start it again")]
struct TurnMovedOn {
    node: String,
    mine: u64,
    found: u64,
}

/// Writes where the other nodes reach this node, once its listener is bound.
pub async fn advertise(cluster: &Cluster) -> Result<(), ClusterError> {
    let (node, url, epoch) = (
        cluster.node().to_owned(),
        cluster.url().to_owned(),
        cluster.epoch.load(Ordering::Acquire),
    );
    crate::journal::mysql::in_transaction!(&cluster.renew_db, cluster.timeout, |tx| {
        sqlx::query("UPDATE cluster_nodes SET url = ? WHERE node_id = ? AND epoch = ?")
            .bind(&url)
            .bind(&node)
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
    })
    .await
    .map_err(db("writing the node's URL in cluster_nodes"))
}

/// One renewal: the row's time, and this node's counters of the SKUs it holds a lease of.
async fn renew_once(cluster: &Cluster, app: &crate::app::AppState) -> Result<(), ClusterError> {
    let engine = &app.engine;
    let event_seq = app.journal.last_event_seq();
    let node = cluster.node().to_owned();
    let epoch = cluster.epoch.load(Ordering::Acquire);
    let mut counts: Vec<(Sku, i64, i64)> = Vec::new();
    for sku in cluster.signals.load().keys() {
        if let Some((_, view)) = engine.product(sku) {
            let reserved = (view.reserved - cluster.returning(sku)).max(0);
            counts.push((sku.clone(), reserved, view.sold));
        }
    }
    let renewed =
        crate::journal::mysql::in_transaction!(&cluster.renew_db, cluster.timeout, |tx| {
            let renewed = sqlx::query(&format!(
                "UPDATE cluster_nodes SET renewed_at_ms = {DB_NOW_MS}, event_seq = ? \
             WHERE node_id = ? AND epoch = ? AND state = 'live'"
            ))
            .bind(event_seq)
            .bind(&node)
            .bind(epoch)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if renewed {
                for chunk in counts.chunks(500) {
                    let mut sql = String::from(
                        "INSERT INTO stock_leases (node_id, sku, units, reserved, sold) VALUES ",
                    );
                    for i in 0..chunk.len() {
                        sql.push_str(if i == 0 {
                            "(?, ?, 0, ?, ?)"
                        } else {
                            ", (?, ?, 0, ?, ?)"
                        });
                    }
                    sql.push_str(
                        " ON DUPLICATE KEY UPDATE reserved = VALUES(reserved), sold = VALUES(sold)",
                    );
                    let mut query = sqlx::query(&sql);
                    for (sku, reserved, sold) in chunk {
                        query = query
                            .bind(&node)
                            .bind(sku.as_str())
                            .bind(reserved)
                            .bind(sold);
                    }
                    query.execute(&mut *tx).await?;
                }
            }
            renewed
        })
        .await
        .map_err(db("renewing the node in cluster_nodes"))?;
    if !renewed {
        cluster.fenced.store(true, Ordering::Release);
        return Err(ClusterError::Fenced(cluster.node().to_owned()));
    }
    cluster
        .renewed_at_ms
        .store(crate::time::now_ms(), Ordering::Release);
    Ok(())
}

/// Renews this node's row every fifth of `--lease-ttl` (at most every 500 ms, so its counters
/// are at most that old), until `stop`. A failure is logged once per change of state.
pub async fn renew(
    cluster: std::sync::Arc<Cluster>,
    app: crate::app::Shared,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = (cluster.config.lease_ttl / 5).min(Duration::from_millis(500));
    super::periodically(
        "renewing this node in cluster_nodes",
        every,
        None,
        stop,
        || renew_once(&cluster, &app),
    )
    .await;
}

/// The node left on purpose (SIGTERM): its last counters reported, and its row says it left, so
/// no reaper takes it for dead. Its lease rows stay, holding what it sold and what its open orders
/// hold.
pub async fn leave(cluster: &Cluster, app: &crate::app::AppState) -> Result<(), ClusterError> {
    renew_once(cluster, app).await?;
    let node = cluster.node().to_owned();
    let epoch = cluster.epoch.load(Ordering::Acquire);
    crate::journal::mysql::in_transaction!(&cluster.renew_db, cluster.timeout, |tx| {
        sqlx::query("UPDATE cluster_nodes SET state = 'left' WHERE node_id = ? AND epoch = ?")
            .bind(&node)
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
    })
    .await
    .map_err(db("marking the node as left in cluster_nodes"))
}

/// One node as `GET /v1/cluster` shows it.
#[derive(Debug, Serialize)]
pub struct NodeView {
    /// Its name.
    pub node_id: String,
    /// Where it is reached.
    pub url: String,
    /// Renewed within `--lease-ttl`.
    pub alive: bool,
    /// Its last renewal (RFC 3339).
    pub last_seen: String,
    /// Per SKU: the units it holds for sale, neither sold nor held by an order.
    pub leased: BTreeMap<String, i64>,
}

/// `GET /v1/cluster`'s body.
#[derive(Debug, Serialize)]
pub struct ClusterView {
    /// The nodes that run, and those presumed dead or gone that still hold units.
    pub nodes: Vec<NodeView>,
    /// Per SKU: the units leased to no node.
    pub pool: BTreeMap<String, i64>,
}

/// What the cluster looks like in MySQL now (this node's own counters as it last reported them).
pub async fn view(cluster: &Cluster) -> Result<ClusterView, ClusterError> {
    let ttl_ms = cluster.config.lease_ttl.as_millis() as i64;
    let nodes = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(&format!(
            "SELECT node_id, url, state, renewed_at_ms, {DB_NOW_MS} FROM cluster_nodes ORDER BY node_id"
        )),
    )
    .await
    .map_err(db("reading cluster_nodes"))?;
    let leases = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(
            "SELECT node_id, sku, units - reserved - sold, units - sold FROM stock_leases \
             ORDER BY node_id, sku",
        ),
    )
    .await
    .map_err(db("reading stock_leases"))?;
    let pools = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query("SELECT sku, pool FROM stock_pool ORDER BY sku"),
    )
    .await
    .map_err(db("reading stock_pool"))?;
    // A value MySQL gave that does not decode is an error, not a zero: this view is what an
    // operator acts on.
    let text = |row: &sqlx::mysql::MySqlRow, i: usize| -> Result<String, ClusterError> {
        row.try_get::<Vec<u8>, _>(i)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(db("decoding the cluster's view"))
    };
    let number = |row: &sqlx::mysql::MySqlRow, i: usize| -> Result<i64, ClusterError> {
        row.try_get::<i64, _>(i)
            .map_err(db("decoding the cluster's view"))
    };
    let mut leased: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    // Nodes holding units unsold or held by their orders: listed even when not alive.
    let mut holding: std::collections::BTreeSet<String> = Default::default();
    for row in &leases {
        let units = number(row, 2)?;
        let unsold_or_held = number(row, 3)?;
        if unsold_or_held > 0 {
            holding.insert(text(row, 0)?);
        }
        if units > 0 {
            leased
                .entry(text(row, 0)?)
                .or_default()
                .insert(text(row, 1)?, units);
        }
    }
    let mut views = Vec::new();
    for row in &nodes {
        let node_id = text(row, 0)?;
        let state = text(row, 2)?;
        let renewed = number(row, 3)?;
        let now = number(row, 4)?;
        let alive = state == "live" && now - renewed < ttl_ms;
        let held = leased.remove(&node_id).unwrap_or_default();
        if !alive && !holding.contains(&node_id) {
            continue;
        }
        views.push(NodeView {
            node_id,
            url: text(row, 1)?,
            alive,
            last_seen: crate::time::rfc3339(renewed),
            leased: held,
        });
    }
    let pool = pools
        .iter()
        .map(|row| Ok((text(row, 0)?, number(row, 1)?)))
        .collect::<Result<_, ClusterError>>()?;
    Ok(ClusterView { nodes: views, pool })
}
