//! A property test of the engine (products, checkouts, the order state machine, hold expiry)
//! against a plain model: after every step the engine's stock and orders equal the model's, and
//! the journal records it emitted rebuild an identical engine. Prints its seed.

use crate::common::{product, seed, sku};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::cell::RefCell;
use std::collections::HashMap;
use turnstile::domain::{CustomerId, OrderId, Quantity};
use turnstile::engine::inventory::StockView;
use turnstile::engine::order::OrderStatus;
use turnstile::engine::records::{Record, State};
use turnstile::engine::{Engine, EngineConfig, EngineError, NewOrder, PaymentOutcome, RecordSink};

const SKUS: usize = 3;
const HOLD_TTL_MS: i64 = 1_000;

/// Collects records in memory, numbering them as the journal would.
#[derive(Default)]
struct RecordingSink(RefCell<Vec<Record>>);

impl RecordSink for RecordingSink {
    type Ticket = ();
    fn submit(&self, record: Record) {
        self.0.borrow_mut().push(record);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Upsert {
        sku: usize,
        stock: i64,
    },
    Checkout {
        lines: Vec<(usize, i64)>,
        outcome: u8,
    },
    Transition {
        order: usize,
        to: OrderStatus,
    },
    Cancel {
        order: usize,
    },
    Advance {
        ms: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let status = prop::sample::select(OrderStatus::ALL.to_vec());
    prop_oneof![
        2 => (0..SKUS, 0..12i64).prop_map(|(sku, stock)| Op::Upsert { sku, stock }),
        4 => (prop::collection::vec((0..SKUS + 1, 1..4i64), 1..4), 0..3u8)
            .prop_map(|(lines, outcome)| Op::Checkout { lines, outcome }),
        2 => (0..32usize, status).prop_map(|(order, to)| Op::Transition { order, to }),
        1 => (0..32usize).prop_map(|order| Op::Cancel { order }),
        1 => (0..1_500i64).prop_map(|ms| Op::Advance { ms }),
    ]
}

struct ModelOrder {
    id: OrderId,
    status: OrderStatus,
    lines: Vec<(usize, i64)>,
    deadline_ms: i64,
}

#[derive(Default)]
struct Model {
    stock: [Option<i64>; SKUS],
    orders: Vec<ModelOrder>,
}

impl Model {
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

fn check(engine: &Engine, model: &Model) {
    for i in 0..SKUS {
        let got = engine.product(&sku(&name(i))).map(|(_, view)| view);
        assert_eq!(got, model.view(i), "stock of s{i}");
    }
    for order in &model.orders {
        let got = engine.order(&order.id).map(|o| o.status);
        assert_eq!(got, Some(order.status), "status of {}", order.id);
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
    let sink = RecordingSink::default();
    let mut model = Model::default();
    let mut now_ms = 1_000_000;
    for op in ops {
        match op {
            Op::Upsert { sku: i, stock } => {
                let result = engine.upsert_product(product(&name(i), 100 + i as i64, stock), &sink);
                let committed = model.committed(i);
                if model.stock[i].is_some() && stock < committed.0 + committed.1 {
                    assert!(
                        matches!(result, Err(EngineError::StockBelowCommitted { .. })),
                        "{result:?}"
                    );
                } else {
                    assert!(result.is_ok(), "{result:?}");
                    model.stock[i] = Some(stock);
                }
            }
            Op::Checkout { lines, outcome } => {
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
                let short = merged
                    .iter()
                    .find(|(i, q)| model.view(*i).is_some_and(|v| v.available < *q));
                let result = engine.reserve(&request);
                if let Some(&(i, _)) = unknown {
                    assert_eq!(result.err(), Some(EngineError::UnknownSku(sku(&name(i)))));
                } else if let Some(&(i, _)) = short {
                    assert_eq!(
                        result.err(),
                        Some(EngineError::OutOfStock { sku: sku(&name(i)) })
                    );
                } else {
                    let reservation = result.expect("reservation");
                    let payment_outcome = match outcome {
                        0 => PaymentOutcome::Paid {
                            payment_id: "p".into(),
                        },
                        1 => PaymentOutcome::Pending {
                            payment_id: "p".into(),
                        },
                        _ => PaymentOutcome::Failed { payment_id: None },
                    };
                    let (order, _, ()) = engine.place_order(
                        NewOrder {
                            order_id: engine.new_order_id(),
                            reservation,
                            customer_id: CustomerId::parse("c").expect("customer"),
                            outcome: payment_outcome,
                        },
                        None,
                        now_ms,
                        &sink,
                    );
                    assert_eq!(order.hold_deadline_ms, now_ms + HOLD_TTL_MS);
                    model.orders.push(ModelOrder {
                        id: order.order_id,
                        status: order.status,
                        lines: merged,
                        deadline_ms: now_ms + HOLD_TTL_MS,
                    });
                }
            }
            Op::Transition { order: k, to } if k < model.orders.len() => {
                let from = model.orders[k].status;
                let result = engine.transition(&model.orders[k].id, to, now_ms, &sink);
                if from == to {
                    assert!(matches!(result, Ok((_, None))), "{result:?}");
                } else if from.can_become(to) {
                    assert!(matches!(result, Ok((_, Some(())))), "{result:?}");
                    model.apply_status(k, to);
                } else {
                    assert!(
                        matches!(result, Err(EngineError::IllegalTransition(_))),
                        "{from:?} -> {to:?}: {result:?}"
                    );
                }
            }
            Op::Cancel { order: k } if k < model.orders.len() => {
                let (order, _) = engine
                    .cancel(&model.orders[k].id, now_ms, &sink)
                    .expect("cancel is always allowed");
                let expected = match model.orders[k].status {
                    s if s.holds_stock() => OrderStatus::Released,
                    OrderStatus::Paid => OrderStatus::Refunded,
                    s => s,
                };
                assert_eq!(order.status, expected);
                model.apply_status(k, expected);
            }
            Op::Advance { ms } => {
                now_ms += ms;
                let released = engine.expire_holds(now_ms, usize::MAX, &sink);
                let mut expected: Vec<OrderId> = Vec::new();
                for order in &mut model.orders {
                    if order.status.holds_stock() && order.deadline_ms <= now_ms {
                        order.status = OrderStatus::Released;
                        expected.push(order.id.clone());
                    }
                }
                let mut got: Vec<OrderId> =
                    released.into_iter().map(|(o, ())| o.order_id).collect();
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
    for (i, record) in sink.0.take().into_iter().enumerate() {
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
