//! HTTP tests: the real `turnstile` binary on a free port, driven over real HTTP.

mod admin_desk;
mod amqp;
mod cluster;
mod crash;
mod customer_limits;
mod durability;
mod edges;
mod flash_sale;
mod gateway;
mod h2_flow;
mod helpers;
mod idempotency_attack;
mod lifecycle;
mod mysql;
mod mysql_attack;
mod node_logs;
mod payments;
mod per_core_attack;
mod redis_outage;
mod retention;
mod runtime;
mod secrets;
mod sessions;
mod stalled_commit;
mod tls;
mod validation;
