//! Scenarios: what is sent, how the target is prepared, and the invariants checked afterwards.
//!
//! - `flash-sale`: one hot SKU with `stock` units, far more buyers than units, a share of
//!   double-submits (the same key sent twice) and of declined cards.
//! - `steady`: many SKUs with large stock; single-item checkouts and 3-line baskets.
//! - `drop`: a limited drop: one hot SKU with `max_per_customer`, bought by customers who come
//!   back under new keys; checks that no customer got more than the limit. With an admission
//!   rate, the SKU has a waiting room: every buyer takes a ticket, waits for its admission and
//!   checks out with it; checks that admissions came in ticket order and never more than the rate
//!   in a second (from what the buyers saw, a check slowness cannot fail), that no buyer with an
//!   admitted ticket was refused it, and a live stock stream watches for `sold_out`.
//!
//! After every run the harness counts, from the answers it received itself, the units sold per SKU
//! (never more than the stock), checks `available + reserved + sold == stock` on the target, that
//! each idempotency key maps to one order, and that replays are identical to first answers.

use crate::client::{AdmissionLog, Connection, Endpoint, Job, Request};
use crate::run::Recording;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    FlashSale,
    Steady,
    /// Carts: each buyer creates a cart, puts 1–3 lines in it and checks out by `cart_id`
    /// (Turnstile only: the references serve the item-list form alone).
    Mixed,
    /// A limited drop (Turnstile only: `max_per_customer`).
    Drop,
}

impl Kind {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "flash-sale" => Some(Kind::FlashSale),
            "steady" => Some(Kind::Steady),
            "mixed" => Some(Kind::Mixed),
            "drop" => Some(Kind::Drop),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::FlashSale => "flash-sale",
            Kind::Steady => "steady",
            Kind::Mixed => "mixed",
            Kind::Drop => "drop",
        }
    }
}

/// A scenario with its parameters.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub kind: Kind,
    /// Makes SKUs and keys unique to this run, so runs can share a target.
    pub run_id: String,
    /// Units of the hot SKU (flash-sale).
    pub stock: i64,
    /// SKUs (steady).
    pub skus: usize,
    /// Percent of buyers who submit twice with the same key (flash-sale).
    pub double_percent: u64,
    /// Percent of buyers whose card is declined (flash-sale, drop).
    pub decline_percent: u64,
    /// The hot SKU's `max_per_customer` (drop).
    pub limit: u32,
    /// Customers sharing the requests (drop).
    pub customers: u64,
    /// The hot SKU's `admission_rate`: its buyers go through its waiting room (drop).
    pub admission_rate: Option<u32>,
    /// What the waiting room's buyers saw.
    pub admissions: std::sync::Arc<AdmissionLog>,
}

/// What the checks found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Verification {
    /// Broken invariants; a run with any fails.
    pub violations: Vec<String>,
    /// What was checked, for the report.
    pub checked: Vec<String>,
    /// Orders the harness saw placed (201/202), by SKU: units.
    pub units_sold_by_harness: BTreeMap<String, i64>,
    /// Checkouts refused for the limit per customer (drop).
    pub customer_limit_refusals: u64,
}

fn spread(i: u64) -> u64 {
    // SplitMix64: a deterministic, well-mixed choice per request index.
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Scenario {
    /// The waiting room's admissions as its buyers saw them. A ticket seen admitted at `a` was
    /// admitted by then; one seen waiting at `w` (before it was asked) was not admitted at `w`.
    /// So: a ticket seen admitted before an earlier one was last seen waiting came out of order;
    /// and ticket `p + rate` seen admitted less than 1 s after ticket `p` was last seen waiting
    /// means more than `rate` admissions in a second. Slow buyers only widen both margins.
    fn verify_admissions(&self, rate: u32, verification: &mut Verification) {
        let mut admissions = self
            .admissions
            .admissions
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        admissions.sort_by_key(|a| a.position);
        let mut latest_waiting: Option<(u64, std::time::Instant)> = None;
        for admission in &admissions {
            if let Some((position, waiting)) = latest_waiting {
                if admission.admitted < waiting {
                    verification.violations.push(format!(
                        "ticket {} was admitted while ticket {position}, ahead of it, still waited",
                        admission.position
                    ));
                }
            }
            if let Some(waiting) = admission.last_waiting {
                if latest_waiting.is_none_or(|(_, latest)| waiting > latest) {
                    latest_waiting = Some((admission.position, waiting));
                }
            }
        }
        let by_position: HashMap<u64, &crate::client::Admission> =
            admissions.iter().map(|a| (a.position, a)).collect();
        let mut windows = 0;
        for admission in &admissions {
            let (Some(waiting), Some(later)) = (
                admission.last_waiting,
                by_position.get(&(admission.position + u64::from(rate))),
            ) else {
                continue;
            };
            windows += 1;
            if later.admitted.duration_since(waiting) < std::time::Duration::from_millis(999) {
                verification.violations.push(format!(
                    "tickets {} to {} were admitted within {:?}: more than {rate} in a second",
                    admission.position,
                    later.position,
                    later.admitted.duration_since(waiting)
                ));
            }
        }
        // Admissions per second as the buyers saw them (they ask every 10 ms to 1 s, so a
        // second may show a few of the next one's): for the report, not a check.
        let first = admissions.iter().map(|a| a.admitted).min();
        let mut per_second: BTreeMap<u64, u64> = BTreeMap::new();
        if let Some(first) = first {
            for admission in &admissions {
                *per_second
                    .entry(admission.admitted.duration_since(first).as_secs())
                    .or_default() += 1;
            }
        }
        verification.checked.push(format!(
            "waiting room at {rate}/s: {} tickets admitted in ticket order; {windows} one-second windows checked, none past the rate; admissions seen per second: max {}, median {}",
            admissions.len(),
            per_second.values().max().unwrap_or(&0),
            {
                let mut counts: Vec<u64> = per_second.values().copied().collect();
                counts.sort_unstable();
                counts.get(counts.len() / 2).copied().unwrap_or(0)
            }
        ));
    }

    pub fn hot_sku(&self) -> String {
        format!("flash-{}", self.run_id)
    }

    pub fn sku(&self, n: u64) -> String {
        format!("steady-{}-{n}", self.run_id)
    }

    /// The SKUs this scenario sells.
    pub fn all_skus(&self) -> Vec<String> {
        match self.kind {
            Kind::FlashSale | Kind::Drop => vec![self.hot_sku()],
            Kind::Steady | Kind::Mixed => (0..self.skus as u64).map(|n| self.sku(n)).collect(),
        }
    }

    /// Creates the products through the API (several connections at once).
    pub async fn setup(&self, endpoint: &Endpoint) -> Result<(), String> {
        let stock = match self.kind {
            Kind::FlashSale | Kind::Drop => self.stock,
            Kind::Steady | Kind::Mixed => 1_000_000_000,
        };
        let limit = (self.kind == Kind::Drop).then_some(self.limit);
        let admission_rate = self.admission_rate.filter(|_| self.kind == Kind::Drop);
        let skus = self.all_skus();
        let chunks: Vec<Vec<String>> = skus
            .chunks(skus.len().div_ceil(16).max(1))
            .map(<[String]>::to_vec)
            .collect();
        let tasks: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let endpoint = endpoint.clone();
                tokio::spawn(async move {
                    let mut connection = Connection::to(endpoint);
                    for sku in chunk {
                        let mut body = serde_json::json!({"name": sku, "price_cents": 1999, "currency": "EUR", "stock": stock});
                        if let Some(limit) = limit {
                            body["max_per_customer"] = limit.into();
                        }
                        if let Some(rate) = admission_rate {
                            body["admission_rate"] = rate.into();
                        }
                        let body = body.to_string();
                        let request = Request { method: "PUT", path: format!("/v1/products/{sku}"), key: None, body };
                        connection.expect(&request, 200).await?;
                    }
                    Ok::<(), String>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    }

    /// The buyer (key) that request `i` belongs to: in a flash sale, pairs of requests share a
    /// key for `double_percent` of the buyers.
    fn buyer(&self, i: u64) -> u64 {
        match self.kind {
            Kind::FlashSale if i % 2 == 1 && (i / 2) % 100 < self.double_percent => i - 1,
            _ => i,
        }
    }

    /// The (sku, quantity) lines of request `i`.
    pub fn lines(&self, i: u64) -> Vec<(String, i64)> {
        let buyer = self.buyer(i);
        match self.kind {
            Kind::FlashSale | Kind::Drop => vec![(self.hot_sku(), 1)],
            Kind::Steady | Kind::Mixed => {
                let choice = spread(buyer);
                let count = if choice.is_multiple_of(5) { 3 } else { 1 };
                let mut lines: Vec<(String, i64)> = Vec::new();
                for l in 0..count {
                    let sku = self.sku(spread(choice + l) % self.skus as u64);
                    // A cart holds one line per SKU: merge repeats.
                    match lines.iter_mut().find(|(s, _)| *s == sku) {
                        Some((_, quantity)) => *quantity += 1,
                        None => lines.push((sku, 1)),
                    }
                }
                lines
            }
        }
    }

    fn token(&self, buyer: u64) -> &'static str {
        if matches!(self.kind, Kind::FlashSale | Kind::Drop)
            && spread(buyer) % 100 < self.decline_percent
        {
            "tok_decline"
        } else {
            "tok_ok"
        }
    }

    /// What arrival `i` does.
    pub fn job(&self, i: u64) -> Job {
        let buyer = self.buyer(i);
        let key = format!("{}-{buyer}", self.run_id);
        let customer_id = match self.kind {
            // Each customer comes back many times, under a new key each time.
            Kind::Drop => format!("customer-{}", spread(buyer) % self.customers.max(1)),
            _ => format!("buyer-{buyer}"),
        };
        let lines = self.lines(i);
        if self.kind == Kind::Mixed {
            return Job::CartCheckout {
                lines,
                customer_id,
                payment_token: self.token(buyer).into(),
                key,
            };
        }
        let items: Vec<_> = lines
            .iter()
            .map(|(sku, quantity)| serde_json::json!({"sku": sku, "quantity": quantity}))
            .collect();
        let body = serde_json::json!({"items": items, "customer_id": customer_id, "payment_token": self.token(buyer)});
        let checkout = Request {
            method: "POST",
            path: "/v1/checkout".into(),
            key: Some(key),
            body: body.to_string(),
        };
        match self.admission_rate.filter(|_| self.kind == Kind::Drop) {
            Some(rate) => Job::Queued {
                sku: self.hot_sku(),
                checkout,
                rate,
                log: std::sync::Arc::clone(&self.admissions),
            },
            None => Job::Single(checkout),
        }
    }

    /// Checks the invariants against the answers and the target's state.
    pub async fn verify(&self, endpoint: &Endpoint, recording: &Recording) -> Verification {
        let mut verification = Verification::default();
        let mut order_of_key: HashMap<u64, String> = HashMap::new();
        let mut first_answer: HashMap<u64, (u16, &[u8])> = HashMap::new();
        let mut counted_orders: HashSet<String> = HashSet::new();
        let mut units: BTreeMap<String, i64> = BTreeMap::new();
        let mut units_of_customer: HashMap<u64, i64> = HashMap::new();
        let mut replays = 0;
        let mut left_at_sell_out = 0u64;
        for outcome in &recording.outcomes {
            let buyer = self.buyer(outcome.index);
            if outcome.status == 0
                || outcome.status == 409 && outcome.body.windows(6).any(|w| w == b"in_use")
            {
                continue;
            }
            match first_answer.get(&buyer) {
                Some((status, body)) => {
                    replays += 1;
                    if *status != outcome.status || *body != &outcome.body[..] {
                        verification.violations.push(format!(
                            "key {}-{buyer}: a second answer ({}) differs from the first ({})",
                            self.run_id, outcome.status, status
                        ));
                    }
                }
                None => {
                    first_answer.insert(buyer, (outcome.status, &outcome.body[..]));
                }
            }
            let json: serde_json::Value = serde_json::from_slice(&outcome.body).unwrap_or_default();
            if let Some(order_id) = json["order_id"].as_str() {
                match order_of_key.get(&buyer) {
                    Some(known) if known != order_id => verification.violations.push(format!(
                        "key {}-{buyer} made two orders: {known} and {order_id}",
                        self.run_id
                    )),
                    Some(_) => {}
                    None => {
                        order_of_key.insert(buyer, order_id.to_owned());
                    }
                }
                if matches!(outcome.status, 201 | 202) && counted_orders.insert(order_id.to_owned())
                {
                    for (sku, quantity) in self.lines(outcome.index) {
                        *units.entry(sku).or_default() += quantity;
                        if self.kind == Kind::Drop {
                            *units_of_customer
                                .entry(spread(buyer) % self.customers.max(1))
                                .or_default() += quantity;
                        }
                    }
                }
            } else if outcome.status == 409
                && outcome
                    .body
                    .windows(22)
                    .any(|w| w == b"customer_limit_reached")
            {
                verification.customer_limit_refusals += 1;
            } else if self.admission_rate.is_some()
                && outcome.status == 403
                && outcome.body.windows(16).any(|w| w == b"not admitted yet")
            {
                // A buyer that saw the sell-out before its admission and tried anyway.
                left_at_sell_out += 1;
            } else if self.admission_rate.is_some() && matches!(outcome.status, 403 | 429) {
                verification.violations.push(format!(
                    "key {}-{buyer}: a buyer that waited for its ticket's admission was refused {}: {}",
                    self.run_id,
                    outcome.status,
                    String::from_utf8_lossy(&outcome.body)
                ));
            }
        }
        if let Some(rate) = self.admission_rate.filter(|_| self.kind == Kind::Drop) {
            self.verify_admissions(rate, &mut verification);
        }
        verification.checked.push(format!(
            "{} keys answered, {replays} second answers compared with the first",
            first_answer.len()
        ));
        if self.kind == Kind::Drop {
            // Units of orders later cancelled or released would count no more; this scenario
            // cancels nothing, and a declined card places a released order, not a 201/202.
            let over: Vec<_> = units_of_customer
                .iter()
                .filter(|(_, units)| **units > i64::from(self.limit))
                .collect();
            for (customer, units) in &over {
                verification.violations.push(format!(
                    "customer-{customer} got {units} units, past max_per_customer {}",
                    self.limit
                ));
            }
            verification.checked.push(format!(
                "{} customers bought, none past max_per_customer {} ({} checkouts refused for it)",
                units_of_customer.len(),
                self.limit,
                verification.customer_limit_refusals
            ));
        }
        let mut connection = Connection::to(endpoint.clone());
        let mut skus_checked = 0;
        for sku in self.all_skus() {
            let request = Request {
                method: "GET",
                path: format!("/v1/products/{sku}"),
                key: None,
                body: String::new(),
            };
            let product = match connection.expect(&request, 200).await {
                Ok(answer) => {
                    serde_json::from_slice::<serde_json::Value>(&answer.body).unwrap_or_default()
                }
                Err(error) => {
                    verification
                        .violations
                        .push(format!("cannot read {sku}: {error}"));
                    continue;
                }
            };
            let field = |name: &str| product[name].as_i64().unwrap_or(i64::MIN);
            let (stock, available, reserved, sold) = (
                field("stock"),
                field("available"),
                field("reserved"),
                field("sold"),
            );
            if left_at_sell_out > 0 && available > 0 {
                // Units can come back after a sell-out (a declined card's hold released).
                verification.checked.push(format!(
                    "{sku}: {available} units came back after the sell-out that {left_at_sell_out} waiting buyers saw"
                ));
            }
            if available < 0 || reserved < 0 || sold < 0 || available + reserved + sold != stock {
                verification.violations.push(format!(
                    "{sku}: available {available} + reserved {reserved} + sold {sold} != stock {stock}"
                ));
            }
            let seen = units.get(&sku).copied().unwrap_or(0);
            if seen > stock {
                verification.violations.push(format!(
                    "{sku}: oversold: the harness received orders for {seen} units of a stock of {stock}"
                ));
            }
            if seen > reserved + sold {
                verification.violations.push(format!(
                    "{sku}: the harness received orders for {seen} units but the target counts only {} held or sold",
                    reserved + sold
                ));
            }
            skus_checked += 1;
        }
        if self.admission_rate.is_some() {
            verification.checked.push(format!(
                "{left_at_sell_out} buyers saw sold_out before their admission and were refused (403, ticket not admitted yet)"
            ));
        }
        verification.checked.push(format!(
            "{skus_checked} SKUs: identity holds, units ordered (counted by the harness) <= stock and <= held + sold"
        ));
        verification.units_sold_by_harness = units;
        verification
    }
}
