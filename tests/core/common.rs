//! Helpers shared by the core tests.

use std::time::{SystemTime, UNIX_EPOCH};
use turnstile::domain::{Currency, Sku, Stock};
use turnstile::domain::{CustomerId, IdempotencyKey, Quantity};
use turnstile::engine::order::Order;
use turnstile::engine::records::Product;
use turnstile::engine::{AnswerSpec, Applied, Change, Engine, NewOrder, PaymentOutcome};
use turnstile::journal::{Journal, JournalError};

/// Commits a change as the server does: appends its record, waits until it is durable, then
/// applies it to the engine (or aborts it if the journal did not take it).
pub fn durably(
    engine: &Engine,
    journal: &dyn Journal,
    change: Change,
) -> Result<Applied, JournalError> {
    match journal.append(change.record().clone()).wait() {
        Ok(_) => Ok(engine.apply(change)),
        Err(error) => {
            engine.abort(change);
            Err(error)
        }
    }
}

/// A small, fast, seedable generator (SplitMix64): tests print their seed so any failure can be
/// replayed with `TURNSTILE_TEST_SEED=<seed>`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound > 0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// The seed for a randomized test: `TURNSTILE_TEST_SEED` if set, else the clock. Printed, so a
/// failure names the seed that reproduces it.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("TURNSTILE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: seed {seed} (rerun with TURNSTILE_TEST_SEED={seed})");
    seed
}

pub fn sku(name: &str) -> Sku {
    Sku::parse(name).expect("test sku")
}

pub fn product(name: &str, price_cents: i64, stock: i64) -> Product {
    Product {
        sku: sku(name),
        name: format!("product {name}"),
        price_cents: turnstile::domain::Cents::parse(price_cents).expect("test price"),
        currency: Currency::parse("EUR").expect("test currency"),
        stock: Stock::parse(stock).expect("test stock"),
        max_per_customer: None,
        admission_rate: None,
    }
}

fn render(order: &Order) -> (u16, String) {
    (201, format!("{{\"order_id\":\"{}\"}}", order.order_id))
}

/// Holds `units` of `name` and decides a new order whose payment ended as `outcome`, keeping its
/// answer under `key` (which the caller began) if given. Not committed yet.
pub fn new_order(
    engine: &Engine,
    name: &str,
    units: i64,
    outcome: PaymentOutcome,
    key: Option<&IdempotencyKey>,
    now_ms: i64,
) -> Change {
    let reservation = engine
        .reserve(
            &[(sku(name), Quantity::parse(units).expect("quantity"))],
            &CustomerId::parse("c").expect("customer"),
        )
        .expect("reserve");
    let answer = key.map(|key| AnswerSpec {
        key,
        fingerprint: "fp",
        render: &render,
    });
    engine
        .place_order(
            NewOrder {
                order_id: engine.new_order_id(),
                reservation,
                outcome,
            },
            answer,
            now_ms,
        )
        .0
}
