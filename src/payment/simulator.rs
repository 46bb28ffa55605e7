//! The in-process payment simulator (the embedded default): the ledger of [`super::ledger`] behind
//! the [`PaymentGateway`] trait, and webhooks for `tok_pending` sent over real HTTP to the server
//! itself, signed with the webhook secret. [`deliver_webhook`] is also what `turnstile
//! gateway-sim` sends its webhooks with.

use super::ledger::Ledger;
use super::webhook;
use super::{
    Authorization, AuthorizeRequest, BoxFuture, PaymentError, PaymentGateway, PaymentInfo,
    PaymentStatus,
};
use crate::http_client::HttpClient;
use crate::time::now_ms;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use super::ledger::payment_id_for;

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Signs the webhooks it sends.
    pub webhook_secret: Vec<u8>,
    /// How long a `tok_pending` payment stays undecided before its webhook is sent.
    pub pending_delay: Duration,
    /// Deliveries of one webhook before the simulator gives up (the reconciler then decides).
    pub webhook_attempts_max: u32,
}

/// Finished payments the in-process ledger remembers (the oldest are forgotten first, so a long
/// run's memory stays bounded; open authorisations are always kept). Its tables are allocated for
/// them at start (~7 MB), so they never grow under load. A refund of a payment forgotten since is
/// a no-op here: the simulator's money is not real.
const LEDGER_ENTRIES_MAX: usize = 32_768;

/// The in-process simulator.
pub struct Simulator {
    config: SimulatorConfig,
    /// Where webhooks go (the server's own webhook URL): set once the server is listening.
    webhook_target: OnceLock<String>,
    /// Sends the webhooks, on pooled connections.
    client: HttpClient,
    ledger: Ledger,
}

impl Simulator {
    /// A simulator that sends webhooks with `client`, nowhere until
    /// [`Simulator::set_webhook_target`].
    pub fn new(config: SimulatorConfig, client: HttpClient) -> Arc<Self> {
        Arc::new(Self {
            config,
            webhook_target: OnceLock::new(),
            client,
            ledger: Ledger::presized(LEDGER_ENTRIES_MAX),
        })
    }

    /// Sends webhooks to the server listening at `addr`, over HTTPS when `tls`.
    pub fn set_webhook_target(&self, addr: SocketAddr, tls: bool) {
        let scheme = if tls { "https" } else { "http" };
        let _ = self
            .webhook_target
            .set(format!("{scheme}://{addr}/v1/webhooks/payment"));
    }

    /// What the simulator holds.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Decides a pending payment after the delay, then tells the server.
    fn decide_later(self: &Arc<Self>, payment_id: String) {
        let simulator = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(simulator.config.pending_delay).await;
            let Some(payment) = simulator.ledger.decide_pending(&payment_id) else {
                return;
            };
            let Some(url) = simulator.webhook_target.get() else {
                tracing::warn!(%payment_id, "no webhook target; the reconciler will decide");
                return;
            };
            deliver_webhook(
                &simulator.client,
                url,
                &simulator.config.webhook_secret,
                &payment,
                simulator.config.webhook_attempts_max,
            )
            .await;
        });
    }
}

/// Sends the signed "approved" webhook of `payment` to `url`, retrying with backoff (from 50 ms,
/// doubling, at most 5 s apart) until it is accepted (`200`) or `attempts_max` deliveries failed.
pub async fn deliver_webhook(
    client: &HttpClient,
    url: &str,
    secret: &[u8],
    payment: &PaymentInfo,
    attempts_max: u32,
) {
    let payment_id = &payment.payment_id;
    let body = serde_json::json!({
        "payment_id": payment_id,
        "order_id": payment.order_id,
        "status": "approved",
    })
    .to_string();
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    for attempt in 1..=attempts_max {
        let signature = webhook::sign(secret, now_ms() / 1000, body.as_bytes());
        let sent = client
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
        tokio::time::sleep(backoff.next_wait()).await;
    }
    tracing::warn!(%payment_id, "webhook never accepted; the reconciler will decide");
}

impl PaymentGateway for Arc<Simulator> {
    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'_, Result<Authorization, PaymentError>> {
        Box::pin(async move {
            match self.ledger.authorize(&request, now_ms()) {
                Some(Authorization::Pending { payment_id }) => {
                    // The webhook is retried until the order is durable and known (404 before).
                    self.decide_later(payment_id.clone());
                    Ok(Authorization::Pending { payment_id })
                }
                // A key whose payment was voided or refunded since is not a new authorisation
                // (as the HTTP gateway answers it).
                Some(Authorization::Approved { payment_id }) => {
                    match self.ledger.lookup(&payment_id).map(|p| p.status) {
                        Ok(status @ (PaymentStatus::Voided | PaymentStatus::Refunded)) => {
                            Err(PaymentError::Conflict { status })
                        }
                        _ => Ok(Authorization::Approved { payment_id }),
                    }
                }
                Some(other) => Ok(other),
                // Never answers: the caller's timeout turns this into a 504; nothing is held.
                None => std::future::pending().await,
            }
        })
    }

    fn capture(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move { self.ledger.capture(&payment_id) })
    }

    fn void(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move { self.ledger.void(&payment_id) })
    }

    fn refund(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move { self.ledger.refund(&payment_id) })
    }

    fn lookup(&self, payment_id: String) -> BoxFuture<'_, Result<PaymentInfo, PaymentError>> {
        Box::pin(async move { self.ledger.lookup(&payment_id) })
    }

    fn authorizations_older_than(
        &self,
        age: Duration,
        key_prefix: &str,
    ) -> BoxFuture<'_, Result<Vec<PaymentInfo>, PaymentError>> {
        let cutoff_ms = now_ms() - age.as_millis() as i64;
        let payments = self.ledger.authorized_before(cutoff_ms, key_prefix);
        Box::pin(async move { Ok(payments) })
    }
}
