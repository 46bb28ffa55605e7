//! The in-process payment simulator: the four tokens of API.md, deterministic payment ids derived
//! from the idempotency key, and webhooks for `tok_pending` sent over real HTTP to the server
//! itself, signed with the webhook secret.

use super::webhook;
use super::{Authorization, AuthorizeRequest, BoxFuture, PaymentError, PaymentGateway};
use crate::http_client::HttpClient;
use crate::sync::lock;
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Signs the webhooks it sends.
    pub webhook_secret: Vec<u8>,
    /// How long a `tok_pending` payment stays undecided before its webhook is sent.
    pub pending_delay: Duration,
    /// Deliveries of one webhook before the simulator gives up (the hold's expiry then decides).
    pub webhook_attempts_max: u32,
}

/// Payments the ledger remembers per kind; the oldest are forgotten first, so a long run's memory
/// stays bounded (the ledger only answers tests and logs).
const LEDGER_ENTRIES_MAX: usize = 100_000;

/// Payment ids in the order they arrived, at most [`LEDGER_ENTRIES_MAX`].
#[derive(Debug, Default)]
struct Bounded {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Bounded {
    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > LEDGER_ENTRIES_MAX {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

/// What the simulator did, for tests and logs.
#[derive(Debug, Default)]
struct Ledger {
    refunded: Bounded,
    voided: Bounded,
}

/// The in-process simulator.
pub struct Simulator {
    config: SimulatorConfig,
    /// Where webhooks go (the server's own webhook URL): set once the server is listening.
    webhook_target: OnceLock<String>,
    /// Sends the webhooks, on pooled connections.
    client: HttpClient,
    ledger: Mutex<Ledger>,
}

/// The payment id for an idempotency key: the same key always gives the same payment.
pub fn payment_id_for(idempotency_key: &str) -> String {
    let digest = Sha256::digest(idempotency_key.as_bytes());
    format!("pay_{}", crate::random::hex(&digest[..12]))
}

impl Simulator {
    /// A simulator that sends webhooks with `client`, nowhere until
    /// [`Simulator::set_webhook_target`].
    pub fn new(config: SimulatorConfig, client: HttpClient) -> Arc<Self> {
        Arc::new(Self {
            config,
            webhook_target: OnceLock::new(),
            client,
            ledger: Mutex::default(),
        })
    }

    /// Sends webhooks to the server listening at `addr`, over HTTPS when `tls`.
    pub fn set_webhook_target(&self, addr: SocketAddr, tls: bool) {
        let scheme = if tls { "https" } else { "http" };
        let _ = self
            .webhook_target
            .set(format!("{scheme}://{addr}/v1/webhooks/payment"));
    }

    /// True if the payment was refunded.
    pub fn was_refunded(&self, payment_id: &str) -> bool {
        lock(&self.ledger).refunded.contains(payment_id)
    }

    fn send_webhook(self: &Arc<Self>, payment_id: String, order_id: String) {
        let simulator = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(simulator.config.pending_delay).await;
            let Some(url) = simulator.webhook_target.get() else {
                tracing::warn!(%payment_id, "no webhook target; the hold's expiry will decide");
                return;
            };
            let body = serde_json::json!({
                "payment_id": payment_id,
                "order_id": order_id,
                "status": "approved",
            })
            .to_string();
            let mut backoff = Duration::from_millis(50);
            for attempt in 1..=simulator.config.webhook_attempts_max {
                let signature = webhook::sign(
                    &simulator.config.webhook_secret,
                    crate::time::now_ms() / 1000,
                    body.as_bytes(),
                );
                let sent = simulator
                    .client
                    .send(
                        "POST",
                        url,
                        &[("turnstile-signature", &signature)],
                        body.clone().into_bytes(),
                    )
                    .await;
                match sent {
                    Ok(response) if response.status == 200 => return,
                    Ok(response) => tracing::debug!(
                        %payment_id, attempt, status = response.status, "webhook not accepted yet"
                    ),
                    Err(error) => tracing::debug!(%payment_id, attempt, %error, "webhook failed"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            tracing::warn!(%payment_id, "webhook never accepted; the hold's expiry will decide");
        });
    }
}

impl PaymentGateway for Arc<Simulator> {
    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'_, Result<Authorization, PaymentError>> {
        Box::pin(async move {
            let payment_id = payment_id_for(&request.idempotency_key);
            match request.token.as_str() {
                "tok_ok" => Ok(Authorization::Approved { payment_id }),
                "tok_pending" => {
                    // The webhook is retried until the order is durable and known (404 before).
                    self.send_webhook(payment_id.clone(), request.order_id);
                    Ok(Authorization::Pending { payment_id })
                }
                // Never answers: the caller's timeout turns this into a 504; nothing is captured.
                "tok_timeout" => std::future::pending().await,
                _ => Ok(Authorization::Declined { payment_id }),
            }
        })
    }

    fn refund(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move {
            lock(&self.ledger).refunded.insert(payment_id);
            Ok(())
        })
    }

    fn void(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move {
            lock(&self.ledger).voided.insert(payment_id);
            Ok(())
        })
    }
}
