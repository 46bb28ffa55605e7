//! The simulator's ledger: what a payment gateway holds, with its idempotency and the tokens of
//! API.md. Shared by the in-process simulator and `turnstile gateway-sim`, so both keep the same
//! rules: an authorisation holds funds and moves no money; capture, void and refund are
//! idempotent per payment; the same idempotency key always finds the same payment.

use super::{Authorization, AuthorizeRequest, PaymentError, PaymentInfo, PaymentStatus};
use crate::sync::lock;
use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::Mutex;

/// The payment id for an idempotency key: the same key always gives the same payment.
pub fn payment_id_for(idempotency_key: &str) -> String {
    let digest = Sha256::digest(idempotency_key.as_bytes());
    format!("pay_{}", crate::random::hex(&digest[..12]))
}

/// What a token does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenBehaviour {
    /// `tok_ok`: authorised.
    Approve,
    /// `tok_decline` (and any unknown token): declined.
    Decline,
    /// `tok_pending`: decided later, then a webhook.
    Pending,
    /// `tok_timeout`: never answers, holds nothing.
    Timeout,
}

impl TokenBehaviour {
    /// The behaviour of a token.
    pub fn of(token: &str) -> Self {
        match token {
            "tok_ok" => TokenBehaviour::Approve,
            "tok_pending" => TokenBehaviour::Pending,
            "tok_timeout" => TokenBehaviour::Timeout,
            _ => TokenBehaviour::Decline,
        }
    }
}

#[derive(Debug, Default)]
struct Book {
    payments: FxHashMap<String, PaymentInfo>,
    /// Payment ids in the order they arrived, for the bound and for listing.
    arrival: VecDeque<String>,
}

/// The payments a simulator holds, at most `entries_max` finished ones (captured, voided,
/// refunded, declined: the oldest are forgotten first, so the in-process simulator's memory stays
/// bounded); a payment still authorised or pending is never forgotten, since its capture or void
/// is still to come.
#[derive(Debug)]
pub struct Ledger {
    book: Mutex<Book>,
    entries_max: usize,
}

impl Ledger {
    /// An empty ledger holding at most `entries_max` finished payments.
    pub fn new(entries_max: usize) -> Self {
        let entries_max = entries_max.max(1);
        Self {
            book: Mutex::default(),
            entries_max,
        }
    }

    /// An empty ledger whose tables are allocated for `entries_max` payments at once: growing them
    /// under load (rehashing tens of thousands of payments under the ledger's lock) stalls every
    /// authorisation for tens of milliseconds, once.
    pub fn presized(entries_max: usize) -> Self {
        let ledger = Self::new(entries_max);
        {
            let mut book = lock(&ledger.book);
            book.payments.reserve(ledger.entries_max + 16);
            book.arrival.reserve(ledger.entries_max + 16);
        }
        ledger
    }

    /// Authorises under the request's idempotency key: a key seen before gets the same payment
    /// and the same answer. `None` for `tok_timeout` (the caller never answers).
    pub fn authorize(&self, request: &AuthorizeRequest, now_ms: i64) -> Option<Authorization> {
        let behaviour = TokenBehaviour::of(&request.token);
        if behaviour == TokenBehaviour::Timeout {
            return None;
        }
        let payment_id = payment_id_for(&request.idempotency_key);
        let mut book = lock(&self.book);
        let status = match book.payments.get(&payment_id) {
            Some(existing) => existing.status,
            None => {
                let status = match behaviour {
                    TokenBehaviour::Approve => PaymentStatus::Authorized,
                    TokenBehaviour::Pending => PaymentStatus::Pending,
                    _ => PaymentStatus::Declined,
                };
                book.payments.insert(
                    payment_id.clone(),
                    PaymentInfo {
                        payment_id: payment_id.clone(),
                        idempotency_key: request.idempotency_key.clone(),
                        order_id: request.order_id.clone(),
                        amount_cents: request.amount_cents,
                        currency: request.currency.clone(),
                        status,
                        created_at_ms: now_ms,
                    },
                );
                book.arrival.push_back(payment_id.clone());
                self.bound(&mut book);
                status
            }
        };
        Some(match status {
            PaymentStatus::Pending => Authorization::Pending { payment_id },
            PaymentStatus::Declined => Authorization::Declined { payment_id },
            _ => Authorization::Approved { payment_id },
        })
    }

    /// Forgets the oldest finished payments past the bound; open ones move to the back. At most a
    /// few are looked at per call, so a ledger holding many open payments grows by them instead
    /// of scanning them all on every authorisation.
    fn bound(&self, book: &mut Book) {
        let mut looked = 0;
        while book.arrival.len() > self.entries_max && looked < 8 {
            let Some(oldest) = book.arrival.pop_front() else {
                break;
            };
            looked += 1;
            let open = book.payments.get(&oldest).is_some_and(|p| {
                matches!(p.status, PaymentStatus::Authorized | PaymentStatus::Pending)
            });
            if open {
                book.arrival.push_back(oldest);
            } else {
                book.payments.remove(&oldest);
            }
        }
    }

    /// Decides a pending payment (its webhook follows): authorised. `None` if it is not pending
    /// (voided meanwhile, say).
    pub fn decide_pending(&self, payment_id: &str) -> Option<PaymentInfo> {
        let mut book = lock(&self.book);
        let payment = book.payments.get_mut(payment_id)?;
        if payment.status != PaymentStatus::Pending {
            return None;
        }
        payment.status = PaymentStatus::Authorized;
        Some(payment.clone())
    }

    /// Moves a payment by `step` (from its status to the next, `Ok(None)` if already there).
    fn step(
        &self,
        payment_id: &str,
        step: impl FnOnce(PaymentStatus) -> Result<Option<PaymentStatus>, PaymentStatus>,
    ) -> Result<(), PaymentError> {
        let mut book = lock(&self.book);
        let payment = book
            .payments
            .get_mut(payment_id)
            .ok_or_else(|| PaymentError::Unknown(payment_id.to_owned()))?;
        match step(payment.status) {
            Ok(Some(next)) => {
                payment.status = next;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(status) => Err(PaymentError::Conflict { status }),
        }
    }

    /// Captures an authorised payment (again: nothing happens).
    pub fn capture(&self, payment_id: &str) -> Result<(), PaymentError> {
        self.step(payment_id, |status| match status {
            PaymentStatus::Authorized => Ok(Some(PaymentStatus::Captured)),
            PaymentStatus::Captured => Ok(None),
            other => Err(other),
        })
    }

    /// Voids an authorisation (or a pending payment); a declined or voided one stays as it is; a
    /// captured one is a conflict (refund it instead).
    pub fn void(&self, payment_id: &str) -> Result<(), PaymentError> {
        self.step(payment_id, |status| match status {
            PaymentStatus::Authorized | PaymentStatus::Pending => Ok(Some(PaymentStatus::Voided)),
            PaymentStatus::Voided | PaymentStatus::Declined => Ok(None),
            other => Err(other),
        })
    }

    /// Refunds a captured payment (again: nothing happens); an uncaptured one is a conflict (void
    /// it instead).
    pub fn refund(&self, payment_id: &str) -> Result<(), PaymentError> {
        self.step(payment_id, |status| match status {
            PaymentStatus::Captured => Ok(Some(PaymentStatus::Refunded)),
            PaymentStatus::Refunded => Ok(None),
            other => Err(other),
        })
    }

    /// A payment as held.
    pub fn lookup(&self, payment_id: &str) -> Result<PaymentInfo, PaymentError> {
        lock(&self.book)
            .payments
            .get(payment_id)
            .cloned()
            .ok_or_else(|| PaymentError::Unknown(payment_id.to_owned()))
    }

    /// Payments authorised or pending, created before `cutoff_ms`, whose idempotency key starts
    /// with `key_prefix` (the node that asked for them; `""`: every node's).
    pub fn authorized_before(&self, cutoff_ms: i64, key_prefix: &str) -> Vec<PaymentInfo> {
        let book = lock(&self.book);
        book.arrival
            .iter()
            .filter_map(|id| book.payments.get(id))
            // Open payments the bound passed over sit behind newer ones: look at all.
            .filter(|p| p.created_at_ms < cutoff_ms)
            .filter(|p| p.idempotency_key.starts_with(key_prefix))
            .filter(|p| matches!(p.status, PaymentStatus::Authorized | PaymentStatus::Pending))
            .cloned()
            .collect()
    }

    /// Every payment held, in arrival order.
    pub fn all(&self) -> Vec<PaymentInfo> {
        let book = lock(&self.book);
        book.arrival
            .iter()
            .filter_map(|id| book.payments.get(id))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str, token: &str) -> AuthorizeRequest {
        AuthorizeRequest {
            idempotency_key: key.into(),
            order_id: format!("ord_{key}"),
            token: token.into(),
            amount_cents: 100,
            currency: "EUR".into(),
        }
    }

    #[test]
    fn one_key_one_payment_and_money_moves_only_by_the_rules() {
        let ledger = Ledger::new(100);
        let first = ledger.authorize(&request("k1", "tok_ok"), 1).unwrap();
        assert_eq!(
            ledger.authorize(&request("k1", "tok_ok"), 2),
            Some(first.clone())
        );
        let Authorization::Approved { payment_id } = first else {
            panic!("{first:?}")
        };
        assert_eq!(ledger.all().len(), 1);
        assert!(matches!(
            ledger.refund(&payment_id),
            Err(PaymentError::Conflict {
                status: PaymentStatus::Authorized
            })
        ));
        ledger.capture(&payment_id).unwrap();
        ledger.capture(&payment_id).unwrap();
        assert!(matches!(
            ledger.void(&payment_id),
            Err(PaymentError::Conflict {
                status: PaymentStatus::Captured
            })
        ));
        ledger.refund(&payment_id).unwrap();
        ledger.refund(&payment_id).unwrap();
        assert_eq!(
            ledger.lookup(&payment_id).unwrap().status,
            PaymentStatus::Refunded
        );
        assert_eq!(ledger.authorize(&request("k2", "tok_timeout"), 1), None);
        assert!(matches!(
            ledger.authorize(&request("k3", "tok_decline"), 1),
            Some(Authorization::Declined { .. })
        ));
        let Some(Authorization::Pending { payment_id }) =
            ledger.authorize(&request("k4", "tok_pending"), 5)
        else {
            panic!("pending")
        };
        assert_eq!(ledger.authorized_before(6, "").len(), 1);
        assert_eq!(ledger.authorized_before(5, "").len(), 0);
        ledger.void(&payment_id).unwrap();
        assert_eq!(ledger.decide_pending(&payment_id), None);
    }

    #[test]
    fn the_bound_forgets_finished_payments_never_open_ones() {
        let ledger = Ledger::new(2);
        let Some(Authorization::Approved { payment_id: open }) =
            ledger.authorize(&request("open", "tok_ok"), 1)
        else {
            panic!("approved")
        };
        for n in 0..10 {
            ledger.authorize(&request(&format!("d{n}"), "tok_decline"), 2 + n);
        }
        // The open authorisation is still there to capture, and still listed as open.
        assert_eq!(
            ledger.lookup(&open).unwrap().status,
            PaymentStatus::Authorized
        );
        assert_eq!(ledger.authorized_before(100, "").len(), 1);
        ledger.capture(&open).unwrap();
        assert!(
            ledger.all().len() <= 4,
            "finished payments are forgotten past the bound"
        );
    }

    #[test]
    fn a_listing_by_key_prefix_shows_only_that_nodes_open_authorisations() {
        // Proves: nodes sharing one gateway each list only the authorisations whose idempotency
        // key carries their name, so an orphan scan never sees another node's payment.
        let ledger = Ledger::new(100);
        let node_a = crate::payment::node_key_prefix("node_a");
        let node_b = crate::payment::node_key_prefix("node_b");
        for (prefix, key) in [(&node_a, "k1"), (&node_a, "k2"), (&node_b, "k1")] {
            ledger.authorize(&request(&format!("{prefix}{key}:0"), "tok_ok"), 1);
        }
        ledger.authorize(&request(&format!("{node_b}k2:0"), "tok_pending"), 1);
        let listed = |prefix: &str| -> Vec<String> {
            let mut keys: Vec<String> = ledger
                .authorized_before(10, prefix)
                .into_iter()
                .map(|p| p.idempotency_key)
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(
            listed(&node_a),
            vec![format!("{node_a}k1:0"), format!("{node_a}k2:0")]
        );
        assert_eq!(
            listed(&node_b),
            vec![format!("{node_b}k1:0"), format!("{node_b}k2:0")]
        );
        assert_eq!(listed("").len(), 4);
        // A node whose name starts another's is not mistaken for it (the prefix ends with ':').
        assert!(listed(&crate::payment::node_key_prefix("node_")).is_empty());
    }
}
