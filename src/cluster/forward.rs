//! Calls that change an order go to the node that owns it.
//!
//! An order belongs to the node whose journal placed it (the claim on its log row,
//! `journal.order_id`), or to the node that adopted it since (`orders.node`). A node asked to
//! cancel an order, or handed the gateway's webhook for one, that its engine does not hold finds
//! the owner in MySQL and forwards the call there, unchanged, through one pooled client, signed
//! per request with `--cluster-secret` (`Turnstile-Cluster-Signature: t=<unix s>,v1=<hex
//! HMAC-SHA256 of "<t>.<METHOD> <path>\n<body>">`, the webhook signature's scheme: the secret
//! never travels, and a signature older than 300 s is refused). The owner runs it as any call of
//! its own, and never forwards a forwarded call again (a loop is impossible). An owner presumed
//! dead, or unreachable, answers for it `503 journal_unavailable` with `Retry-After`: nothing
//! changed.

use super::{db, registry::DB_NOW_MS, Cluster, ClusterError};
use crate::domain::OrderId;
use crate::http_client::{ClientOptions, HttpClient, Trust};
use sqlx::Row;
use std::time::Duration;

/// The header naming the node that forwarded a call.
pub const FORWARDED_BY: &str = "turnstile-forwarded-by";

/// The header carrying the cluster's signature of a forwarded call.
pub const SIGNATURE: &str = "turnstile-cluster-signature";

/// How long a forwarded call may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The one client calls between nodes go through (pooled, keep-alive).
pub fn client() -> Result<HttpClient, crate::http_client::ClientError> {
    HttpClient::new(ClientOptions {
        timeout: FORWARD_TIMEOUT,
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(60),
        idle_per_host: 16,
        // The calls are signed; the nodes' certificates are their listeners' own.
        trust: Trust::OwnListener,
        // A forwarded answer is one of the API's (an order, a desk listing of one node).
        body_max: 64 << 20,
    })
}

fn signed_text(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut text = format!("{method} {path}\n").into_bytes();
    text.extend_from_slice(body);
    text
}

/// The signature of a call between nodes at `now_seconds`.
pub fn sign(secret: &str, method: &str, path: &str, body: &[u8], now_seconds: i64) -> String {
    crate::payment::webhook::sign(
        secret.as_bytes(),
        now_seconds,
        &signed_text(method, path, body),
    )
}

/// Checks a forwarded call's signature.
pub fn verify(
    secret: &str,
    header: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
    now_seconds: i64,
) -> Result<(), crate::payment::webhook::SignatureError> {
    crate::payment::webhook::verify(
        secret.as_bytes(),
        header,
        &signed_text(method, path, body),
        now_seconds,
    )
}

/// Where an order's owner is.
#[derive(Debug, Clone)]
pub struct Owner {
    /// Its name.
    pub node: String,
    /// Where it is reached.
    pub url: String,
    /// Renewed within `--lease-ttl` and not gone.
    pub alive: bool,
    /// Gone for good: left, or presumed dead and settled (its orders may be adopted).
    pub gone: bool,
}

/// The owner of `order_id` as MySQL knows it (`None`: no node placed it, as far as MySQL knows).
pub async fn owner_of(
    cluster: &Cluster,
    order_id: &OrderId,
) -> Result<Option<Owner>, ClusterError> {
    let ttl_ms = cluster.config.lease_ttl.as_millis() as i64;
    let rows = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(&format!(
            "SELECT n.node_id, n.url, n.state = 'live' AND n.renewed_at_ms > {DB_NOW_MS} - ?, \
                    n.state = 'left' OR (n.state = 'dead' AND n.reaped_at_ms IS NOT NULL) \
             FROM cluster_nodes n \
             WHERE n.node_id = COALESCE( \
                 (SELECT node FROM orders WHERE order_id = ?), \
                 (SELECT node FROM journal WHERE order_id = ?))"
        ))
        .bind(ttl_ms)
        .bind(order_id.as_str())
        .bind(order_id.as_str()),
    )
    .await
    .map_err(db("finding an order's owner"))?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let text = |i: usize| -> Result<String, ClusterError> {
        let bytes: Vec<u8> = row.try_get(i).map_err(db("finding an order's owner"))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let alive: i64 = row.try_get(2).map_err(db("finding an order's owner"))?;
    let gone: i64 = row.try_get(3).map_err(db("finding an order's owner"))?;
    Ok(Some(Owner {
        node: text(0)?,
        url: text(1)?,
        alive: alive == 1,
        gone: gone == 1,
    }))
}

/// A write-behind node that may hold acknowledged orders MySQL does not have yet: down (not
/// renewed within `--lease-ttl`, not left, not forgotten), or live with events it reported that
/// MySQL's outbox does not hold. `None`: every acknowledged order is in MySQL, as far as the nodes
/// last reported (a renewal is at most 500 ms old).
pub async fn unshipped_on(cluster: &Cluster) -> Result<Option<String>, ClusterError> {
    let ttl_ms = cluster.config.lease_ttl.as_millis() as i64;
    let rows = crate::journal::mysql::fetch_all_bounded(
        &cluster.db,
        cluster.timeout,
        sqlx::query(&format!(
            "SELECT n.node_id FROM cluster_nodes n \
             WHERE n.mode = 'write-behind' AND n.node_id <> ? \
             AND ((n.state = 'live' AND n.renewed_at_ms <= {DB_NOW_MS} - ?) \
                  OR (n.state = 'live' AND n.event_seq > \
                      (SELECT COALESCE(MAX(o.seq), 0) FROM outbox o WHERE o.node = n.node_id))) \
             LIMIT 1"
        ))
        .bind(cluster.node().to_owned())
        .bind(ttl_ms),
    )
    .await
    .map_err(db("looking for orders not shipped to MySQL yet"))?;
    rows.first()
        .map(|row| {
            row.try_get::<Vec<u8>, _>(0)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .map_err(db("looking for orders not shipped to MySQL yet"))
        })
        .transpose()
}

/// Forwards a call to `owner`, signed; gives back its answer.
pub async fn forward(
    cluster: &Cluster,
    owner: &Owner,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<crate::http_client::Response, crate::http_client::ClientError> {
    let signature = sign(
        &cluster.config.secret,
        method,
        path,
        &body,
        crate::time::now_ms() / 1000,
    );
    let mut headers: Vec<(&str, &str)> =
        vec![(FORWARDED_BY, cluster.node()), (SIGNATURE, &signature)];
    headers.extend_from_slice(extra);
    cluster
        .forwarded
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    cluster
        .client
        .send(method, &format!("{}{path}", owner.url), &headers, body)
        .await
}
