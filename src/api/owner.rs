//! Several nodes: a call that changes an order this node does not hold goes to the node that owns
//! it ([`crate::cluster::forward`]), and a call forwarded here is checked before it runs. An
//! order of a node that is gone is adopted here first; the adoption (MySQL, then this node's
//! engine) runs in a task of its own, so a caller that goes away mid-way cannot leave an order
//! owned in MySQL but missing from memory.

use super::{json_response, ApiError, AppState, Shared};
use crate::cluster::adoption;
use crate::cluster::forward::{self, FORWARDED_BY, SIGNATURE};
use crate::cluster::{Cluster, ClusterError};
use crate::domain::OrderId;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use std::future::Future;
use std::sync::Arc;

/// Whether this call was forwarded by another node, its signature checked (`401
/// invalid_signature` if it does not hold). A forwarded call is never forwarded again.
pub(super) fn forwarded(
    state: &AppState,
    headers: &HeaderMap,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<bool, ApiError> {
    if !headers.contains_key(FORWARDED_BY) {
        return Ok(false);
    }
    let refused = |why: String| ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", why);
    let Some(cluster) = &state.cluster else {
        return Err(refused(
            "a call forwarded by another node, but this node runs alone (no --node-id)".into(),
        ));
    };
    let signature = headers.get(SIGNATURE).and_then(|v| v.to_str().ok());
    forward::verify(
        &cluster.config.secret,
        signature,
        method,
        path,
        body,
        crate::time::now_ms() / 1000,
    )
    .map_err(|error| refused(format!("a call between nodes: {error}")))?;
    Ok(true)
}

/// An order neither this node nor MySQL knows. Alone, or with several nodes none of which may
/// hold acknowledged orders MySQL lacks: `404`. Else (a write-behind node down, or behind in
/// shipping what it reported): `503 journal_unavailable` with `Retry-After`, never a `404` for
/// an order that may exist.
pub(super) async fn not_found(state: &AppState, order_id: &OrderId) -> ApiError {
    let missing = || ApiError::not_found(format!("no order {order_id}"));
    let Some(cluster) = &state.cluster else {
        return missing();
    };
    match forward::unshipped_on(cluster).await {
        Ok(None) => missing(),
        Ok(Some(node)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal_unavailable",
            format!("no order {order_id} in MySQL yet, and node {node} (write-behind) may hold acknowledged orders MySQL does not have yet; retry later"),
        )
        .retry_after(1),
        Err(error) => error.into(),
    }
}

/// A call that changes an order, as it came: to forward it as it is.
pub(super) struct Call<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Headers the owner needs too (a webhook's signature).
    pub extra: &'a [(&'a str, &'a str)],
    pub body: Vec<u8>,
    /// Forwarded here by another node ([`forwarded`]): never forwarded again.
    pub forwarded: bool,
}

/// `503 journal_unavailable`, retry: `order_id` is on its way into this node's memory.
fn taking_in(order_id: &OrderId) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "journal_unavailable",
        format!("order {order_id} is being taken over by this node (adopted from a node that left); nothing was changed, retry"),
    )
    .retry_after(1)
}

/// For a call that changes `order_id`, when this node's engine does not hold it: the owner's
/// answer if another node owns it, `None` to run it here (no cluster, this node owns it, or no
/// node is known to: the use case then answers as it does alone). A call another node forwarded
/// here runs here, or waits (`503`) while this node takes the order in.
pub(super) async fn elsewhere(
    state: &Shared,
    order_id: &OrderId,
    call: Call<'_>,
) -> Result<Option<Response>, ApiError> {
    let Some(cluster) = &state.cluster else {
        return Ok(None);
    };
    if state.engine.order(order_id).is_some() {
        return Ok(None);
    }
    let Some(mut owner) = forward::owner_of(cluster, order_id).await? else {
        return Ok(None);
    };
    if call.forwarded {
        // The node that forwarded it found this node the owner (it may just have won the race
        // to adopt the order, and be taking it in).
        return match owner.node == cluster.node() && !taken_in(cluster, state, order_id).await? {
            true => Err(taking_in(order_id)),
            false => Ok(None),
        };
    }
    // A node gone for good: this node adopts the order now and the call runs here. Another call
    // (or node) may have adopted it first: then MySQL names the owner now.
    if owner.gone {
        let (from, id) = (owner.node.clone(), order_id.clone());
        let adopted = unbroken(cluster, state, move |cluster, state| async move {
            adoption::adopt_one(&cluster, &state, &from, &id).await
        });
        if adopted.await? {
            return Ok(None);
        }
        if let Some(now) = forward::owner_of(cluster, order_id).await? {
            owner = now;
        }
    }
    if owner.node == cluster.node() {
        return match taken_in(cluster, state, order_id).await? {
            true => Ok(None),
            false => Err(taking_in(order_id)),
        };
    }
    let unavailable = |why: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal_unavailable",
            format!("order {order_id} belongs to node {}, which {why}; nothing was changed, retry later", owner.node),
        )
        .retry_after(1)
    };
    if !owner.alive {
        return Err(unavailable(
            "is down (its open orders go to a live node once it is presumed dead)".into(),
        ));
    }
    let answer = forward::forward(
        cluster,
        &owner,
        call.method,
        call.path,
        call.extra,
        call.body,
    )
    .await
    .map_err(|error| unavailable(format!("did not answer ({error})")))?;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let retry_after = answer
        .header("retry-after")
        .and_then(|v| HeaderValue::from_str(v).ok());
    let mut response = json_response(status, answer.body);
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, seconds);
    }
    Ok(Some(response))
}

/// Whether `order_id`, which MySQL says this node owns, is in its engine now
/// ([`adoption::taken_in`], which may take adopted orders in), run [`unbroken`].
async fn taken_in(
    cluster: &Arc<Cluster>,
    state: &Shared,
    order_id: &OrderId,
) -> Result<bool, ClusterError> {
    let id = order_id.clone();
    unbroken(cluster, state, move |cluster, state| async move {
        adoption::taken_in(&cluster, &state, &id).await
    })
    .await
}

/// Runs an adoption step in a task of its own and waits for it. A step moves orders to this node
/// in MySQL first and into its engine after: run in the caller's future, a caller gone between the
/// two (its future dropped) would leave orders this node owns in MySQL but not in memory, which
/// nothing takes in again before a restart (their stock held, their payments unsettled).
async fn unbroken<T: Send + 'static, F>(
    cluster: &Arc<Cluster>,
    state: &Shared,
    step: impl FnOnce(Arc<Cluster>, Shared) -> F,
) -> Result<T, ClusterError>
where
    F: Future<Output = Result<T, ClusterError>> + Send + 'static,
{
    let step = tokio::spawn(step(Arc::clone(cluster), Arc::clone(state)));
    let mut waiting = CallerWaits { done: false };
    let outcome = step.await;
    waiting.done = true;
    match outcome {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => Err(ClusterError::Journal(crate::journal::JournalError::Closed)),
    }
}

/// A caller waiting for an adoption step: dropped while it waits, it says so (the step runs on).
struct CallerWaits {
    done: bool,
}

impl Drop for CallerWaits {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        tracing::info!("the caller of an adoption went away; the adoption runs on in its own task");
    }
}
