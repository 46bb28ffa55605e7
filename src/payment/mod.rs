//! Payments: the `PaymentGateway` trait and the in-process simulator (the embedded default).
//!
//! Every call carries an idempotency key derived from the client's `Idempotency-Key`, so a checkout
//! re-run after a crash can never authorise twice.

pub mod simulator;
pub mod webhook;

pub use crate::BoxFuture;

/// The gateway's idempotency key for a checkout: derived from the client's key, so a re-run of the
/// checkout (after a crash, say) finds the same payment instead of paying twice; and from the
/// retention period the key is in, so a key used afresh past its retention is a new payment (the
/// old one's id may still be on record). Both uses of one key lie at least a retention apart, so
/// they always fall in different periods; a re-run a crash delays across a period boundary (a
/// chance of delay / retention) authorises anew, and the first authorisation, whose order never
/// became durable, is the reconciler's to void.
pub fn gateway_key(key: &crate::domain::IdempotencyKey, now_ms: i64, retention_ms: i64) -> String {
    let period = now_ms / retention_ms.max(1);
    format!("turnstile:{}:{period}", key.as_str())
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
    /// Authorised and captured.
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

/// Why a gateway call did not get an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The gateway did not answer in time (the client's timeout).
    #[error("the payment gateway did not answer in time")]
    Timeout,
    /// The gateway could not be reached or answered nonsense.
    #[error("the payment gateway is unreachable: {0}")]
    Unreachable(String),
}

/// A payment gateway.
pub trait PaymentGateway: Send + Sync {
    /// Authorises (and, for an approval, captures) a payment. Callers bound it with their timeout.
    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'_, Result<Authorization, PaymentError>>;
    /// Gives the money of a captured payment back (idempotent per payment).
    fn refund(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>>;
    /// Cancels an authorisation that will not be used (idempotent per payment).
    fn void(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>>;
}
