//! HTTP tests: the real `turnstile` binary on a free port, driven over real HTTP.

mod amqp;
mod crash;
mod durability;
mod edges;
mod flash_sale;
mod gateway;
mod helpers;
mod idempotency_attack;
mod lifecycle;
mod mysql;
mod mysql_attack;
mod payments;
mod per_core_attack;
mod retention;
mod runtime;
mod sessions;
mod tls;
mod validation;
