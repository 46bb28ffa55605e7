//! `GET /v1/events?after=<seq>&limit=<n>`: the durable event log, in commit order.

use super::{json, ApiError, Shared};
use crate::time::rfc3339;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

/// The default page size.
const LIMIT_DEFAULT: usize = 100;
/// The largest page.
const LIMIT_MAX: usize = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct EventView<'a> {
    seq: u64,
    #[serde(rename = "type")]
    kind: &'a str,
    order_id: &'a str,
    at: String,
    data: serde_json::Value,
}

#[derive(Serialize)]
struct Page<'a> {
    events: Vec<EventView<'a>>,
    next: u64,
}

pub(super) async fn list_events(
    State(state): State<Shared>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::invalid(format!(
            "after and limit must be non-negative integers: {e}"
        ))
    })?;
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(LIMIT_DEFAULT).min(LIMIT_MAX);
    let events = state
        .journal
        .events(after, limit)
        .await
        .map_err(|e| ApiError::journal_unavailable(&e))?;
    let next = events.last().map_or(after, |e| e.seq);
    let page = Page {
        events: events
            .iter()
            .map(|event| EventView {
                seq: event.seq,
                kind: event.status.event_type(),
                order_id: event.order_id.as_str(),
                at: rfc3339(event.at_ms),
                data: serde_json::json!({
                    "status": event.status.as_str(),
                    "total_cents": event.total_cents,
                    "currency": event.currency.as_str(),
                }),
            })
            .collect(),
        next,
    };
    Ok(json(StatusCode::OK, &page))
}
