//! Payments: the `PaymentGateway` trait, the simulator's ledger (shared by the in-process
//! simulator, the embedded default, and `turnstile gateway-sim`), the HTTP gateway client
//! (`--gateway-url`) and webhook signatures.
//!
//! Money follows the order: a checkout only *authorises* before its order is journaled; capture,
//! void and refund follow the journaled order (what it owes is on the order,
//! [`crate::engine::order::PaymentDue`]) and are made by the settler and the reconciler
//! ([`crate::app::money`]). Every authorisation carries an idempotency key derived from the client's
//! `Idempotency-Key`, so a checkout re-run after a crash can never authorise twice.

pub mod gateway_sim;
pub mod http;
pub mod ledger;
pub mod simulator;
pub mod webhook;

pub use crate::BoxFuture;

/// The retention period a checkout falls in: a key used afresh past its retention is a new
/// payment and a new order (the old ones may still be on record). Both uses of one key lie at
/// least a retention apart, so they always fall in different periods; a re-run a crash delays
/// across a period boundary (a chance of delay / retention) authorises anew, and the first
/// authorisation, whose order never became durable, is the reconciler's to void.
pub fn checkout_period(now_ms: i64, retention_ms: i64) -> i64 {
    now_ms / retention_ms.max(1)
}

/// The start of every gateway idempotency key `node` makes: what its orphan scan lists
/// ([`PaymentGateway::authorizations_older_than`]), so that nodes sharing one gateway each void
/// only the authorisations they made, never a live payment of another node, whose journal they
/// cannot see.
pub fn node_key_prefix(node: &str) -> String {
    format!("turnstile:{node}:")
}

/// The gateway's idempotency key for a checkout on `node`: derived from the client's key, so a
/// re-run of the checkout on this node (after a crash, say) finds the same payment instead of
/// paying twice; from the retention period ([`checkout_period`]); and from the node, so the
/// node's orphan scan finds exactly its own ([`node_key_prefix`]). (A key retried on another node
/// after a crash there authorises anew on that node; the first node voids its orphan when it is
/// back.)
pub fn gateway_key(node: &str, key: &crate::domain::IdempotencyKey, period: i64) -> String {
    format!("{}{}:{period}", node_key_prefix(node), key.as_str())
}

/// The order id of a checkout, derived from the client's key and the retention period, the same
/// on every node: a checkout re-run after a crash (the same `Idempotency-Key` within one
/// retention period) makes the same order for the same payment, so the gateway's record of the
/// payment (and its webhook) names the order that is journaled, and a retry on any node names the
/// same order. (Until gateway keys carried the node, they were `turnstile:<key>:<period>`, and the
/// order id was derived from that: the same string, so ids did not change.)
pub fn order_id_for(
    key: &crate::domain::IdempotencyKey,
    period: i64,
) -> Option<crate::domain::OrderId> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("turnstile:{}:{period}", key.as_str()).as_bytes());
    crate::domain::OrderId::parse(format!("ord_{}", crate::random::hex(&digest[..12]))).ok()
}

/// What to authorise.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    /// Derived from the checkout's `Idempotency-Key`: the same checkout always sends the same key.
    pub idempotency_key: String,
    /// The order the payment is for (the gateway names it in its webhook).
    pub order_id: String,
    /// The buyer's payment token.
    pub token: String,
    /// The amount, in minor units.
    pub amount_cents: i64,
    /// The currency.
    pub currency: String,
}

/// The gateway's answer to an authorisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// Authorised: the funds are held; nothing is captured until the order is durable.
    Approved {
        /// The gateway's id of the payment.
        payment_id: String,
    },
    /// Refused.
    Declined {
        /// The gateway's id of the attempt.
        payment_id: String,
    },
    /// Not decided yet: the gateway calls the webhook later.
    Pending {
        /// The gateway's id of the payment.
        payment_id: String,
    },
}

/// Where a payment stands at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Not decided yet (`tok_pending` before its webhook).
    Pending,
    /// Funds held, not captured.
    Authorized,
    /// Money taken.
    Captured,
    /// The authorisation was cancelled; no money moved.
    Voided,
    /// Captured, then given back.
    Refunded,
    /// Refused.
    Declined,
}

/// A payment as the gateway holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PaymentInfo {
    /// The gateway's id.
    pub payment_id: String,
    /// The idempotency key it was authorised under.
    pub idempotency_key: String,
    /// The order it was authorised for.
    pub order_id: String,
    /// The amount, in minor units.
    pub amount_cents: i64,
    /// The currency.
    pub currency: String,
    /// Where it stands.
    pub status: PaymentStatus,
    /// When it was authorised (or attempted), Unix milliseconds.
    pub created_at_ms: i64,
}

/// Why a gateway call did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The gateway did not answer in time (the client's timeout).
    #[error("the payment gateway did not answer in time")]
    Timeout,
    /// The gateway could not be reached or answered nonsense.
    #[error("the payment gateway is unreachable: {0}")]
    Unreachable(String),
    /// The payment stands where the call cannot apply (a void of a captured payment, a capture
    /// of a voided one): the caller decides what follows from `status`.
    #[error("the payment is {status:?}")]
    Conflict {
        /// Where it stands.
        status: PaymentStatus,
    },
    /// The gateway knows no such payment.
    #[error("the payment gateway knows no payment {0}")]
    Unknown(String),
}

impl PaymentError {
    /// Whether calling again later may succeed (the gateway's idempotency keys make it safe).
    pub fn is_transient(&self) -> bool {
        matches!(self, PaymentError::Timeout | PaymentError::Unreachable(_))
    }
}

/// A payment gateway. Every call is idempotent at the gateway (authorisations by their
/// idempotency key, the others by payment id), so any of them may be retried.
pub trait PaymentGateway: Send + Sync {
    /// Authorises a payment (funds held, nothing captured). Callers bound it with their timeout.
    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'_, Result<Authorization, PaymentError>>;
    /// Takes the money of an authorised payment.
    fn capture(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>>;
    /// Cancels an authorisation that will not be used.
    fn void(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>>;
    /// Gives the money of a captured payment back.
    fn refund(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>>;
    /// Where a payment stands.
    fn lookup(&self, payment_id: String) -> BoxFuture<'_, Result<PaymentInfo, PaymentError>>;
    /// For `/readyz` (`checks.gateway`): `None` for a gateway in this process; for one over the
    /// network, `Ok` while its last call was answered, else why not. Never decides readiness:
    /// payments catch up (API.md).
    fn check(&self) -> Option<Result<(), String>> {
        None
    }
    /// Payments authorised (or still pending) longer than `age` ago and not captured, voided or
    /// refunded since, whose idempotency key starts with `key_prefix` (the node's own,
    /// [`node_key_prefix`]): what the reconciler checks against the journal.
    fn authorizations_older_than(
        &self,
        age: std::time::Duration,
        key_prefix: &str,
    ) -> BoxFuture<'_, Result<Vec<PaymentInfo>, PaymentError>>;
}
