//! Order events downstream of the journal: the one JSON shape an event has (`GET /v1/events` and
//! RabbitMQ carry the same), the outbox relay to RabbitMQ ([`relay`]), and `turnstile notify`, a
//! consumer of `order.paid` an operator can copy ([`notify`]).
//!
//! The journal is the outbox (DESIGN.md): an event is written in the same record as the state
//! change it reports, so it exists exactly when the change is durable. Everything here reads
//! events *from* the journal in `seq` order, behind it, with a durable cursor; nothing here is on
//! the checkout path.

pub mod notify;
pub mod relay;

use crate::engine::records::Event;
use crate::time::rfc3339;

/// An event as the contract shows it (API.md): `{"seq", "type", "order_id", "at", "data"}`, in
/// that order, and `"node"` (whose log the event is in, whose `seq` it is) with `--node-id`.
#[derive(Debug, serde::Serialize)]
pub struct EventView<'a> {
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
    order_id: &'a str,
    at: String,
    data: EventData<'a>,
}

#[derive(Debug, serde::Serialize)]
struct EventData<'a> {
    status: &'static str,
    total_cents: i64,
    currency: &'a str,
    customer_id: &'a str,
    items: &'a [crate::engine::order::OrderItem],
}

impl<'a> EventView<'a> {
    /// The view of `event`.
    pub fn of(event: &'a Event) -> Self {
        Self {
            seq: event.seq,
            node: None,
            kind: event.status.event_type(),
            order_id: event.order_id.as_str(),
            at: rfc3339(event.at_ms),
            data: EventData {
                status: event.status.as_str(),
                total_cents: event.total_cents,
                currency: event.currency.as_str(),
                customer_id: event.customer_id.as_str(),
                items: &event.items,
            },
        }
    }

    /// The view naming the node whose event it is (several nodes: each has its own seqs).
    pub fn on(mut self, node: Option<&'a str>) -> Self {
        self.node = node;
        self
    }

    /// The view as JSON bytes (a RabbitMQ message's body).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}
