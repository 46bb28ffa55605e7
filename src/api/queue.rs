//! The waiting room's paths: `POST /v1/products/{sku}/queue` (a ticket) and
//! `GET /v1/queue/{ticket}` (where it stands). The queue itself: [`crate::app::waiting_room`].

use super::products::path_error;
use super::{json, path_id, ApiError, Shared};
use crate::domain::Sku;
use crate::sessions::redis::StoreError;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;

#[derive(Serialize)]
struct TakenView<'a> {
    ticket: &'a str,
    position: u64,
    estimated_wait_s: i64,
}

#[derive(Serialize)]
struct TicketView {
    position: u64,
    ahead: u64,
    admitted: bool,
    sold_out: bool,
    expires_at: String,
}

fn now_us() -> i64 {
    crate::time::now_ms().saturating_mul(1000)
}

pub(super) async fn take_ticket(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let sku = path_id(raw, Sku::parse)?;
    let inventory = state.engine.inventory();
    let index = inventory
        .lookup(&sku)
        .ok_or_else(|| ApiError::not_found(format!("no product {sku}")))?;
    let rate = inventory.admission_rate(index).ok_or_else(|| {
        ApiError::not_found(format!(
            "{sku} has no waiting room (no admission_rate): check out without a ticket"
        ))
    })?;
    let now = now_us();
    let taken = state
        .waiting_room
        .take(&sku, rate, now)
        .await
        .map_err(|error: StoreError| ApiError::session_store_unavailable(&error))?;
    Ok(json(
        StatusCode::CREATED,
        &TakenView {
            ticket: &taken.text,
            position: taken.ticket.position,
            estimated_wait_s: ((taken.ticket.admit_us - now).max(0) + 999_999) / 1_000_000,
        },
    ))
}

pub(super) async fn ticket_status(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = path.map_err(path_error)?;
    let ticket = state
        .waiting_room
        .read(&raw)
        .ok_or_else(|| {
            ApiError::not_found(
                "no such ticket (not one this shop signed, or from an earlier run of a server without Redis)",
            )
        })?;
    let now = now_us();
    let sold_out = crate::app::streams::counters(&state, &ticket.sku)
        .is_none_or(|counters| counters.available == 0);
    Ok(json(
        StatusCode::OK,
        &TicketView {
            position: ticket.position,
            ahead: ticket.ahead(now),
            admitted: now >= ticket.admit_us,
            sold_out,
            expires_at: crate::time::rfc3339(ticket.expires_us / 1000),
        },
    ))
}
