//! Orders and their state machine.
//!
//! ```text
//! reserved ──► paid ──► refunded
//!    │  └──► payment_pending ──► paid
//!    └──────────┴──► released
//! ```
//! A status that holds stock (`reserved`, `payment_pending`) carries a deadline, set when the hold was
//! taken; the sweeper releases it once the deadline passes.
//!
//! Money follows the order: an order also says what it still owes the gateway
//! ([`Order::payment_due`]). A payment is only *authorised* before the order is journaled; the
//! journaled `paid` order carries `Capture` (its intent to capture), a released order with an
//! authorisation carries `Void`, a cancelled paid order `Refund` (or `Void` if it was never
//! captured). The payment settler makes the call and journals the outcome (a `Payments` record:
//! what each order owes now); the reconciler retries what stays due.

use crate::domain::{Cents, Currency, CustomerId, OrderId, Sku};
use serde::{Deserialize, Serialize};

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Stock held, payment not yet asked for or not yet answered.
    Reserved,
    /// The gateway has not decided; stock stays held until the webhook or the deadline.
    PaymentPending,
    /// Paid: the held units are sold.
    Paid,
    /// Declined, expired or cancelled before payment: the units went back.
    Released,
    /// Paid, then cancelled: the money and the units went back.
    Refunded,
}

impl OrderStatus {
    /// Every status, in the order an order may pass through them.
    pub const ALL: [OrderStatus; 5] = [
        OrderStatus::Reserved,
        OrderStatus::PaymentPending,
        OrderStatus::Paid,
        OrderStatus::Released,
        OrderStatus::Refunded,
    ];

    /// True if an order in this status may move to `next`.
    pub fn can_become(self, next: OrderStatus) -> bool {
        use OrderStatus::*;
        matches!(
            (self, next),
            (Reserved, Paid)
                | (Reserved, PaymentPending)
                | (PaymentPending, Paid)
                | (Reserved, Released)
                | (PaymentPending, Released)
                | (Paid, Refunded)
        )
    }

    /// True while the order's units are reserved (held, not sold).
    pub fn holds_stock(self) -> bool {
        matches!(self, OrderStatus::Reserved | OrderStatus::PaymentPending)
    }

    /// True while the order's units count for its customer's `max_per_customer`: held or sold,
    /// not released or refunded.
    pub fn counts_for_customer(self) -> bool {
        self.holds_stock() || self == OrderStatus::Paid
    }

    /// True once no further transition is possible.
    pub fn is_final(self) -> bool {
        matches!(self, OrderStatus::Released | OrderStatus::Refunded)
    }

    /// The event type emitted when an order enters this status.
    pub fn event_type(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "order.reserved",
            OrderStatus::PaymentPending => "order.payment_pending",
            OrderStatus::Paid => "order.paid",
            OrderStatus::Released => "order.released",
            OrderStatus::Refunded => "order.refunded",
        }
    }

    /// Reads a status as the API writes it.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// The status as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "reserved",
            OrderStatus::PaymentPending => "payment_pending",
            OrderStatus::Paid => "paid",
            OrderStatus::Released => "released",
            OrderStatus::Refunded => "refunded",
        }
    }
}

/// An order was asked to make a move its state machine forbids.
/// What an order still owes the payment gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentDue {
    /// A paid order whose authorisation is not captured yet.
    Capture,
    /// An authorisation that will not be used (its order was released or cancelled before capture).
    Void,
    /// A captured payment whose order was cancelled.
    Refund,
}

impl PaymentDue {
    /// The name stored (MySQL) and shown in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentDue::Capture => "capture",
            PaymentDue::Void => "void",
            PaymentDue::Refund => "refund",
        }
    }

    /// The inverse of [`PaymentDue::as_str`].
    pub fn parse(raw: &str) -> Option<Self> {
        [PaymentDue::Capture, PaymentDue::Void, PaymentDue::Refund]
            .into_iter()
            .find(|d| d.as_str() == raw)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an order cannot go from {} to {}", from.as_str(), to.as_str())]
pub struct IllegalTransition {
    /// The status the order is in.
    pub from: OrderStatus,
    /// The status that was asked for.
    pub to: OrderStatus,
}

/// One line of an order: the unit price is the one of the moment the order was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    /// What was bought.
    pub sku: Sku,
    /// How many units (lines of one SKU merged, so it may exceed one line's maximum).
    pub quantity: i64,
    /// The price of one unit when the order was placed.
    pub unit_price_cents: Cents,
}

/// An order, as journaled: every change journals the whole order, so replay keeps the last copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Chosen by the server, unique across restarts.
    pub order_id: OrderId,
    /// Where the order stands.
    pub status: OrderStatus,
    /// The buyer.
    pub customer_id: CustomerId,
    /// One line per SKU.
    pub items: Vec<OrderItem>,
    /// Sum of quantity × unit price over the lines.
    pub total_cents: i64,
    /// The one currency of every line.
    pub currency: Currency,
    /// When the order was placed (Unix milliseconds).
    pub created_at_ms: i64,
    /// While the order holds stock: when the sweeper releases it (Unix milliseconds).
    pub hold_deadline_ms: i64,
    /// The gateway's id of the payment, once the gateway gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// What the order still owes the gateway; `None` once settled (or nothing was ever due).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_due: Option<PaymentDue>,
}

impl Order {
    /// Moves the order to `next`, or says why it may not.
    pub fn transition(&mut self, next: OrderStatus) -> Result<(), IllegalTransition> {
        if self.status.can_become(next) {
            let previous = self.status;
            self.status = next;
            // What the move makes the order owe the gateway (only with an authorisation).
            if self.payment_id.is_some() {
                self.payment_due = match (previous, next, self.payment_due) {
                    (_, OrderStatus::Paid, _) => Some(PaymentDue::Capture),
                    (_, OrderStatus::Released, _) => Some(PaymentDue::Void),
                    (_, OrderStatus::Refunded, Some(PaymentDue::Capture)) => Some(PaymentDue::Void),
                    (_, OrderStatus::Refunded, _) => Some(PaymentDue::Refund),
                    (_, _, due) => due,
                };
            }
            Ok(())
        } else {
            Err(IllegalTransition {
                from: self.status,
                to: next,
            })
        }
    }

    /// True if the order holds stock whose deadline has passed at `now_ms`.
    pub fn hold_expired(&self, now_ms: i64) -> bool {
        self.status.holds_stock() && now_ms >= self.hold_deadline_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_moves_are_legal() {
        use OrderStatus::*;
        let legal = [
            (Reserved, Paid),
            (Reserved, PaymentPending),
            (PaymentPending, Paid),
            (Reserved, Released),
            (PaymentPending, Released),
            (Paid, Refunded),
        ];
        for from in OrderStatus::ALL {
            for to in OrderStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }
}
