//! The Turnstile load-test harness: open-model (coordinated-omission corrected) and closed-model
//! load over keep-alive HTTP/1.1 or HTTP/2, plain or over TLS, hdrhistogram latencies per outcome,
//! invariants checked after every run, reports as text, JSON, Markdown and SVG, and reference
//! servers of the classic designs for side-by-side ratios.
//!
//! # Layout
//! - [`cli`]: the command line (clap).
//! - [`target`]: `--target` as a URL or `host:port`.
//! - [`tls`]: the rustls client configuration for `https://` targets.
//! - [`client`]: one keep-alive connection to an endpoint.
//! - [`run`]: the open and closed models, bounded in time and count.
//! - [`scenario`]: flash-sale and steady: setup through the API, requests, invariant checks.
//! - [`report`]: text, JSON, Markdown, SVG.
//! - [`reference`]: the `mysql-for-update` reference server.
//! - [`redis_lua`]: the `redis-lua` reference server.

pub mod cli;
pub mod client;
pub mod redis_lua;
pub mod reference;
pub mod report;
pub mod run;
pub mod scenario;
pub mod target;
pub mod tls;
