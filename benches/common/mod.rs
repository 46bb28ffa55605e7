//! What the benches share: a typical paid order record.

use turnstile::domain::{Cents, Currency, CustomerId, IdempotencyKey, OrderId, Sku};
use turnstile::engine::order::{Order, OrderItem, OrderStatus};
use turnstile::engine::records::{Record, StoredAnswer};

/// A new paid order with one line, its two events (reserved, paid) and its stored answer.
pub fn order_record(n: u64) -> Record {
    let order = Order {
        order_id: OrderId::parse(format!("ord_bench_{n}")).expect("id"),
        status: OrderStatus::Paid,
        customer_id: CustomerId::parse(format!("customer-{}", n % 9_973)).expect("customer"),
        items: vec![OrderItem {
            sku: Sku::parse(format!("sku-{}", n % 10_000)).expect("sku"),
            quantity: 1,
            unit_price_cents: Cents::parse(1_999).expect("price"),
        }],
        total_cents: 1_999,
        currency: Currency::parse("EUR").expect("currency"),
        created_at_ms: 1_764_000_000_000,
        hold_deadline_ms: 1_764_000_900_000,
        payment_id: Some(format!("pay_{n}")),
        payment_due: Some(turnstile::engine::order::PaymentDue::Capture),
    };
    let body = format!(
        "{{\"order_id\":\"ord_bench_{n}\",\"status\":\"paid\",\"customer_id\":\"customer-1\",\"items\":[{{\"sku\":\"sku-1\",\"quantity\":1,\"unit_price_cents\":1999}}],\"total_cents\":1999,\"currency\":\"EUR\",\"created_at\":\"2025-11-24T16:00:00Z\"}}"
    );
    Record::Order {
        order,
        previous: None,
        entered: vec![OrderStatus::Reserved, OrderStatus::Paid],
        at_ms: 1_764_000_000_000,
        answer: Some((
            IdempotencyKey::parse(format!("key-{n}")).expect("key"),
            StoredAnswer {
                fingerprint: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                    .into(),
                status: 201,
                body,
                at_ms: 1_764_000_000_000,
            },
        )),
        replaces_expired_key: false,
    }
}
