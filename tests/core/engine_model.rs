//! A property test of the engine (products with limits per customer, checkouts of several
//! customers, the order state machine, hold expiry) against a plain model: after every step the
//! engine's stock, orders and units per customer equal the model's; a
//! change whose append fails (aborted) leaves no trace; while a change is in flight readers see
//! the durable state; and the records of the applied changes rebuild an identical engine. A second
//! property test races a cancel against a webhook approval under every schedule. Both print their
//! seed.

use crate::common::{new_order, product, seed, sku};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::collections::HashMap;
use turnstile::domain::{CustomerId, OrderId, Quantity};
use turnstile::engine::inventory::StockView;
use turnstile::engine::order::OrderStatus;
use turnstile::engine::records::{Record, State};
use turnstile::engine::{
    Applied, Change, Engine, EngineConfig, EngineError, NewOrder, PaymentOutcome, Prepared,
};

const SKUS: usize = 3;
const CUSTOMERS: usize = 3;
const HOLD_TTL_MS: i64 = 1_000;

/// Stands in for the journal: a change either becomes durable (its record is kept, in commit
/// order, and the change applied) or its append fails (aborted, the record dropped).
#[derive(Default)]
struct Journal(Vec<Record>);

impl Journal {
    fn settle(&mut self, engine: &Engine, change: Change, fails: bool) -> Option<Applied> {
        if fails {
            engine.abort(change);
            None
        } else {
            self.0.push(change.record().clone());
            Some(engine.apply(change))
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Upsert {
        sku: usize,
        stock: i64,
        limit: Option<u32>,
        fails: bool,
    },
    Checkout {
        customer: usize,
        lines: Vec<(usize, i64)>,
        outcome: u8,
        fails: bool,
    },
    Transition {
        order: usize,
        to: OrderStatus,
        fails: bool,
    },
    Cancel {
        order: usize,
        fails: bool,
    },
    Advance {
        ms: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let status = prop::sample::select(OrderStatus::ALL.to_vec());
    let fails = || prop::bool::weighted(0.2);
    prop_oneof![
        2 => (0..SKUS, 0..12i64, prop::option::of(1..5u32), fails())
            .prop_map(|(sku, stock, limit, fails)| Op::Upsert { sku, stock, limit, fails }),
        4 => (0..CUSTOMERS, prop::collection::vec((0..SKUS + 1, 1..4i64), 1..4), 0..3u8, fails())
            .prop_map(|(customer, lines, outcome, fails)| Op::Checkout { customer, lines, outcome, fails }),
        2 => (0..32usize, status, fails()).prop_map(|(order, to, fails)| Op::Transition { order, to, fails }),
        1 => (0..32usize, fails()).prop_map(|(order, fails)| Op::Cancel { order, fails }),
        1 => (0..1_500i64).prop_map(|ms| Op::Advance { ms }),
    ]
}

struct ModelOrder {
    id: OrderId,
    customer: usize,
    status: OrderStatus,
    lines: Vec<(usize, i64)>,
    deadline_ms: i64,
}

#[derive(Default)]
struct Model {
    stock: [Option<i64>; SKUS],
    limits: [Option<u32>; SKUS],
    orders: Vec<ModelOrder>,
}

impl Model {
    /// The units `customer` holds or bought of `sku`.
    fn customer_units(&self, customer: usize, sku: usize) -> i64 {
        self.orders
            .iter()
            .filter(|o| o.customer == customer && o.status.counts_for_customer())
            .flat_map(|o| &o.lines)
            .filter(|(s, _)| *s == sku)
            .map(|(_, units)| units)
            .sum()
    }

    fn committed(&self, sku: usize) -> (i64, i64) {
        let (mut reserved, mut sold) = (0, 0);
        for order in &self.orders {
            for &(s, units) in &order.lines {
                if s == sku && order.status.holds_stock() {
                    reserved += units;
                }
                if s == sku && order.status == OrderStatus::Paid {
                    sold += units;
                }
            }
        }
        (reserved, sold)
    }

    fn view(&self, sku: usize) -> Option<StockView> {
        let stock = (*self.stock.get(sku)?)?;
        let (reserved, sold) = self.committed(sku);
        Some(StockView {
            stock,
            available: stock - reserved - sold,
            reserved,
            sold,
        })
    }

    fn apply_status(&mut self, k: usize, to: OrderStatus) {
        self.orders[k].status = to;
    }
}

fn name(i: usize) -> String {
    format!("s{i}")
}

fn customer(c: usize) -> CustomerId {
    CustomerId::parse(format!("c{c}")).expect("customer")
}

fn check(engine: &Engine, model: &Model) {
    for i in 0..SKUS {
        let got = engine.product(&sku(&name(i))).map(|(_, view)| view);
        assert_eq!(got, model.view(i), "stock of s{i}");
    }
    for order in &model.orders {
        let got = engine.order(&order.id).map(|o| o.status);
        assert_eq!(got, Some(order.status), "status of {}", order.id);
    }
    for c in 0..CUSTOMERS {
        for i in 0..SKUS {
            assert_eq!(
                engine.customer_units(&sku(&name(i)), &customer(c)),
                model.customer_units(c, i),
                "units of s{i} for c{c}"
            );
        }
    }
}

fn run(ops: Vec<Op>) {
    let config = EngineConfig {
        shard_count: 3,
        hold_ttl_ms: HOLD_TTL_MS,
        order_id_prefix: "ord_m".into(),
        ..EngineConfig::default()
    };
    let engine = Engine::new(config.clone());
    let mut journal = Journal::default();
    let mut model = Model::default();
    let mut now_ms = 1_000_000;
    for op in ops {
        match op {
            Op::Upsert {
                sku: i,
                stock,
                limit,
                fails,
            } => {
                let mut defined = product(&name(i), 100 + i as i64, stock);
                defined.max_per_customer = limit;
                let result = engine.prepare_product(defined);
                let committed = model.committed(i);
                if model.stock[i].is_some() && stock < committed.0 + committed.1 {
                    assert!(
                        matches!(result, Err(EngineError::StockBelowCommitted { .. })),
                        "{result:?}"
                    );
                } else {
                    let change = result.expect("upsert");
                    // In flight: readers still see the durable product (a lowered stock shows
                    // the units it takes as reserved, nothing else moves).
                    let seen = engine
                        .product(&sku(&name(i)))
                        .map(|(_, v)| (v.stock, v.sold));
                    assert_eq!(seen, model.view(i).map(|v| (v.stock, v.sold)));
                    if journal.settle(&engine, change, fails).is_some() {
                        model.stock[i] = Some(stock);
                        model.limits[i] = limit;
                    }
                }
            }
            Op::Checkout {
                customer: c,
                lines,
                outcome,
                fails,
            } => {
                let request: Vec<_> = lines
                    .iter()
                    .map(|&(i, q)| (sku(&name(i)), Quantity::parse(q).expect("quantity")))
                    .collect();
                // The model's answer: first unknown sku, else first short sku (merged lines, in
                // the order they are first named).
                let mut merged: Vec<(usize, i64)> = Vec::new();
                for &(i, q) in &lines {
                    match merged.iter_mut().find(|(s, _)| *s == i) {
                        Some((_, total)) => *total += q,
                        None => merged.push((i, q)),
                    }
                }
                let unknown = lines
                    .iter()
                    .find(|(i, _)| *i >= SKUS || model.stock[*i].is_none());
                let over = merged.iter().find(|(i, q)| {
                    model
                        .limits
                        .get(*i)
                        .copied()
                        .flatten()
                        .is_some_and(|limit| model.customer_units(c, *i) + q > i64::from(limit))
                });
                let short = merged
                    .iter()
                    .find(|(i, q)| model.view(*i).is_some_and(|v| v.available < *q));
                let result = engine.reserve(&request, &customer(c));
                if let Some(&(i, _)) = unknown {
                    assert_eq!(result.err(), Some(EngineError::UnknownSku(sku(&name(i)))));
                } else if let Some(&(i, _)) = short {
                    assert_eq!(
                        result.err(),
                        Some(EngineError::OutOfStock { sku: sku(&name(i)) })
                    );
                } else if let Some(&(i, _)) = over {
                    assert_eq!(
                        result.err(),
                        Some(EngineError::CustomerLimit { sku: sku(&name(i)) })
                    );
                } else {
                    let reservation = result.expect("reservation");
                    let payment_outcome = match outcome {
                        0 => PaymentOutcome::Authorized {
                            payment_id: "p".into(),
                        },
                        1 => PaymentOutcome::Pending {
                            payment_id: "p".into(),
                        },
                        _ => PaymentOutcome::Failed { payment_id: None },
                    };
                    let (change, _) = engine.place_order(
                        NewOrder {
                            order_id: engine.new_order_id(),
                            reservation,
                            outcome: payment_outcome,
                        },
                        None,
                        now_ms,
                    );
                    let id = change.order().expect("an order").order_id.clone();
                    assert_eq!(
                        engine.order(&id),
                        None,
                        "an order is not shown before durable"
                    );
                    if let Some(Applied::Order { order, .. }) =
                        journal.settle(&engine, change, fails)
                    {
                        assert_eq!(order.hold_deadline_ms, now_ms + HOLD_TTL_MS);
                        model.orders.push(ModelOrder {
                            id: order.order_id,
                            customer: c,
                            status: order.status,
                            lines: merged,
                            deadline_ms: now_ms + HOLD_TTL_MS,
                        });
                    }
                }
            }
            Op::Transition {
                order: k,
                to,
                fails,
            } if k < model.orders.len() => {
                let from = model.orders[k].status;
                let result = engine.prepare_transition(&model.orders[k].id, to, now_ms);
                if from == to {
                    assert!(matches!(result, Ok(Prepared::Unchanged(_))), "{result:?}");
                } else if from.can_become(to) {
                    let Ok(Prepared::Change(change)) = result else {
                        panic!("{from:?} -> {to:?}: {result:?}");
                    };
                    // One change at a time per order, and readers see the durable status.
                    assert!(matches!(
                        engine.prepare_cancel(&model.orders[k].id, now_ms),
                        Err(EngineError::Busy(_))
                    ));
                    check(&engine, &model);
                    if journal.settle(&engine, change, fails).is_some() {
                        model.apply_status(k, to);
                    }
                } else {
                    assert!(
                        matches!(result, Err(EngineError::IllegalTransition(_))),
                        "{from:?} -> {to:?}: {result:?}"
                    );
                }
            }
            Op::Cancel { order: k, fails } if k < model.orders.len() => {
                let expected = match model.orders[k].status {
                    s if s.holds_stock() => OrderStatus::Released,
                    OrderStatus::Paid => OrderStatus::Refunded,
                    s => s,
                };
                match engine
                    .prepare_cancel(&model.orders[k].id, now_ms)
                    .expect("cancel is always allowed")
                {
                    Prepared::Unchanged(order) => assert_eq!(order.status, expected),
                    Prepared::Change(change) => {
                        assert_eq!(change.order().map(|o| o.status), Some(expected));
                        if journal.settle(&engine, change, fails).is_some() {
                            model.apply_status(k, expected);
                        }
                    }
                }
            }
            Op::Advance { ms } => {
                now_ms += ms;
                let released = engine.expire_holds(now_ms, usize::MAX);
                let mut expected: Vec<OrderId> = Vec::new();
                for order in &mut model.orders {
                    if order.status.holds_stock() && order.deadline_ms <= now_ms {
                        order.status = OrderStatus::Released;
                        expected.push(order.id.clone());
                    }
                }
                let mut got: Vec<OrderId> = released
                    .into_iter()
                    .filter_map(|change| match journal.settle(&engine, change, false) {
                        Some(Applied::Order { order, .. }) => Some(order.order_id),
                        _ => None,
                    })
                    .collect();
                got.sort();
                expected.sort();
                assert_eq!(got, expected, "expired holds");
            }
            Op::Transition { .. } | Op::Cancel { .. } => {}
        }
        check(&engine, &model);
    }

    // The records rebuild the same engine, and every order's events follow its state machine.
    let mut state = State::default();
    let mut seq = 1;
    for (i, record) in journal.0.into_iter().enumerate() {
        let events = u64::from(record.event_count());
        state.apply(i as u64 + 1, seq, record);
        seq += events;
    }
    let rebuilt = Engine::from_state(config, &state).expect("rebuild");
    check(&rebuilt, &model);
    let mut last: HashMap<&OrderId, OrderStatus> = HashMap::new();
    for (i, event) in state.events.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "event seqs have no gaps");
        match last.get(&event.order_id) {
            None => assert_eq!(event.status, OrderStatus::Reserved, "first event"),
            Some(prev) => assert!(
                prev.can_become(event.status),
                "{prev:?} -> {:?}",
                event.status
            ),
        }
        last.insert(&event.order_id, event.status);
    }
    for order in &model.orders {
        assert_eq!(
            last.get(&order.id),
            Some(&order.status),
            "last event of {}",
            order.id
        );
    }
}

#[test]
fn engine_matches_a_simple_model() {
    let seed = seed("engine_matches_a_simple_model");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    if let Err(failure) = runner.run(&prop::collection::vec(op(), 1..60), |ops| {
        run(ops);
        Ok(())
    }) {
        panic!("{failure} (seed {seed}: rerun with TURNSTILE_TEST_SEED={seed})");
    }
}

/// One side of the race: a cancel, or the gateway's approval webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Actor {
    Cancel,
    Approve,
}

/// Where one side stands: it has not decided yet, or its change is being committed, or it is done.
enum Step {
    Deciding,
    Committing(Box<Change>),
    Done,
}

/// Runs a cancel and an approval of one pending order under `schedule` (each entry moves that side
/// one step: decide, then commit) and returns the order's final status, the statuses its applied
/// changes entered, and the money moves (`refund`, `void`).
fn race(schedule: &[bool]) -> (OrderStatus, Vec<OrderStatus>, Vec<&'static str>) {
    let engine = Engine::new(EngineConfig {
        shard_count: 2,
        hold_ttl_ms: HOLD_TTL_MS,
        order_id_prefix: "ord_race".into(),
        ..EngineConfig::default()
    });
    let mut journal = Journal::default();
    let change = engine
        .prepare_product(product("s0", 100, 5))
        .expect("product");
    journal.settle(&engine, change, false);
    let outcome = PaymentOutcome::Pending {
        payment_id: "pay".into(),
    };
    let change = new_order(&engine, "s0", 2, outcome, None, 1_000);
    let Some(Applied::Order { order, .. }) = journal.settle(&engine, change, false) else {
        panic!("the order is placed");
    };
    let id = order.order_id;
    let mut entered = Vec::new();
    let mut money = Vec::new();
    let mut sides = [
        (Actor::Cancel, Step::Deciding),
        (Actor::Approve, Step::Deciding),
    ];
    // Each side takes at most a few steps, so a schedule that runs out is completed in turns.
    let tail = [false, true].iter().cycle().take(16).copied();
    for pick in schedule.iter().copied().chain(tail) {
        let (actor, step) = &mut sides[usize::from(pick)];
        *step = match std::mem::replace(step, Step::Done) {
            Step::Deciding => {
                let decided = match actor {
                    Actor::Cancel => engine.prepare_cancel(&id, 2_000),
                    Actor::Approve => engine.prepare_transition(&id, OrderStatus::Paid, 2_000),
                };
                match decided {
                    Err(EngineError::Busy(_)) => Step::Deciding,
                    Ok(Prepared::Change(change)) => Step::Committing(Box::new(change)),
                    Ok(Prepared::Unchanged(_)) => Step::Done,
                    // A late approval: the order was released meanwhile, the money goes back.
                    Err(EngineError::IllegalTransition(_)) if *actor == Actor::Approve => {
                        money.push("refund");
                        Step::Done
                    }
                    Err(other) => panic!("{actor:?}: {other}"),
                }
            }
            Step::Committing(change) => {
                if let Some(Applied::Order { order, previous }) =
                    journal.settle(&engine, *change, false)
                {
                    entered.push(order.status);
                    match (order.status, previous) {
                        (OrderStatus::Refunded, _) => money.push("refund"),
                        (OrderStatus::Released, Some(OrderStatus::PaymentPending)) => {
                            money.push("void")
                        }
                        _ => {}
                    }
                }
                Step::Done
            }
            Step::Done => Step::Done,
        };
    }
    assert!(
        sides.iter().all(|(_, step)| matches!(step, Step::Done)),
        "both sides finish"
    );
    let view = engine.product(&sku("s0")).expect("product").1;
    assert_eq!(
        (view.available, view.reserved, view.sold),
        (5, 0, 0),
        "every unit is back"
    );
    let status = engine.order(&id).expect("order").status;
    (status, entered, money)
}

#[test]
fn a_cancel_racing_an_approval_ends_as_one_of_the_two_serial_orders() {
    let seed = seed("a_cancel_racing_an_approval_ends_as_one_of_the_two_serial_orders");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: 200,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    if let Err(failure) = runner.run(&prop::collection::vec(any::<bool>(), 0..8), |schedule| {
        let (status, entered, money) = race(&schedule);
        // Approval first: paid, then the cancel refunds it. Cancel first: released (the pending
        // authorisation voided), then the late approval's capture is refunded.
        let approve_first = (
            OrderStatus::Refunded,
            vec![OrderStatus::Paid, OrderStatus::Refunded],
            vec!["refund"],
        );
        let cancel_first = (
            OrderStatus::Released,
            vec![OrderStatus::Released],
            vec!["void", "refund"],
        );
        let got = (status, entered, money);
        prop_assert!(
            got == approve_first || got == cancel_first,
            "schedule {schedule:?} ended as {got:?}"
        );
        Ok(())
    }) {
        panic!("{failure} (seed {seed}: rerun with TURNSTILE_TEST_SEED={seed})");
    }
}
