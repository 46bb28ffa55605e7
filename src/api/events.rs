//! `GET /v1/events?after=<seq>&limit=<n>`: the durable event log, in commit order.

use super::{json, ApiError, Shared};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

/// The default page size.
const LIMIT_DEFAULT: usize = 100;
/// The largest page.
const LIMIT_MAX: usize = 1_000;

/// The largest `after` or `limit` accepted: integers of the contract are signed 64-bit (API.md).
const QUERY_VALUE_MAX: u64 = i64::MAX as u64;

/// Parsed as `u64`, so negative values are refused by the parser and values up to `u64::MAX` are
/// read exactly before the range check refuses those past [`QUERY_VALUE_MAX`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    after: Option<u64>,
    limit: Option<u64>,
}

#[derive(Serialize)]
struct Page<'a> {
    events: Vec<crate::events::EventView<'a>>,
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
    for (name, value) in [("after", query.after), ("limit", query.limit)] {
        if value.is_some_and(|value| value > QUERY_VALUE_MAX) {
            return Err(ApiError::invalid(format!(
                "{name} must be at most {QUERY_VALUE_MAX} (a signed 64-bit integer)"
            )));
        }
    }
    let after = query.after.unwrap_or(0);
    // Capped before the conversion, so it fits a `usize` on every platform.
    let limit = query
        .limit
        .map_or(LIMIT_DEFAULT, |limit| limit.min(LIMIT_MAX as u64) as usize);
    let events = state
        .journal
        .events(after, limit)
        .await
        .map_err(|e| ApiError::journal_unavailable(&e))?;
    let next = events.last().map_or(after, |e| e.seq);
    let page = Page {
        events: events
            .iter()
            .map(|event| {
                crate::events::EventView::of(event)
                    .on(state.cluster.as_ref().map(|cluster| cluster.node()))
            })
            .collect(),
        next,
    };
    Ok(json(StatusCode::OK, &page))
}
