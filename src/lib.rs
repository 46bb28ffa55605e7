//! Turnstile: a checkout engine for flash sales. It admits exactly as many buyers as there is stock,
//! makes every checkout all-or-nothing and idempotent, and records every order durably before it
//! answers.
//!
//! # Layout
//! - [`domain`]: validated newtypes (`Sku`, `Quantity`, `Cents`, `IdempotencyKey`, ...): parsed at
//!   the edge, trusted everywhere else.
//! - [`engine`]: the pure core, synchronous, no I/O, time passed in: per-core stock shards
//!   ([`engine::inventory`]), the order state machine ([`engine::order`]), idempotency keys
//!   ([`engine::idempotency`]), and the journal records with the durable state they fold into
//!   ([`engine::records`]).
//! - [`journal`]: the `Journal` trait (durable appends with group commit, the event log) and the
//!   embedded file journal ([`journal::file`]: segments, framing, recovery, snapshots).
//! - [`server`]: wiring: open the journal, rebuild the engine, run until a stop signal.

pub mod domain;
pub mod engine;
pub mod journal;
pub mod server;
mod sync;
