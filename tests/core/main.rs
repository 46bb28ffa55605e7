//! Integration tests of the core: the inventory under threads, the engine against a model, and the
//! file journal under crashes, power cuts and bad bytes. One test binary, so it links once.

mod bounded_memory;
mod common;
mod engine_model;
mod inventory_hammer;
mod journal_crash;
mod journal_failures;
mod journal_recovery;
