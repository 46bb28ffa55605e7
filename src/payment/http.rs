//! The payment gateway over HTTP (`--gateway-url`), in the payment-intent style `turnstile
//! gateway-sim` speaks:
//!
//! | call | request | answer |
//! | --- | --- | --- |
//! | authorise | `POST /v1/payments` with `Idempotency-Key`, `{"order_id", "token", "amount_cents", "currency"}` | `200` payment (`status`: `authorized`, `pending` or `declined`) |
//! | capture, void, refund | `POST /v1/payments/{id}/capture` (`/void`, `/refund`) | `200` payment; `409 {"error": "conflict", "status"}` where it cannot apply; `404` unknown |
//! | look up | `GET /v1/payments/{id}` | `200` payment or `404` |
//! | list old authorisations | `GET /v1/payments?open_older_than_ms=N&key_prefix=P` | `200 {"payments": [...]}`: authorised or pending longer than N ms ago (the gateway's clock), whose idempotency key starts with P (a node's own; omitted: all) |
//! | the whole ledger | `GET /v1/ledger` | `200 {"payments": [...]}` |
//!
//! A payment is `{"payment_id", "idempotency_key", "order_id", "amount_cents", "currency",
//! "status", "created_at_ms"}`. Calls go through the pooled keep-alive client, each bounded by
//! `--gateway-timeout`; a call that failed in transit (no answer, a dropped connection, a `5xx`)
//! is retried at most twice with jittered backoff, which the gateway's idempotency makes safe: the
//! same `Idempotency-Key` finds the same authorisation, and the other calls are idempotent per
//! payment.

use super::{
    Authorization, AuthorizeRequest, BoxFuture, PaymentError, PaymentGateway, PaymentInfo,
    PaymentStatus,
};
use crate::http_client::{ClientError, HttpClient};
use std::time::Duration;

/// Attempts of one call (the first and two retries).
const ATTEMPTS: u32 = 3;

/// A gateway at a base URL.
#[derive(Debug)]
pub struct HttpGateway {
    base: String,
    client: HttpClient,
    /// Why the last call got no answer (`None` once one was answered), for `/readyz`.
    last_failure: std::sync::Mutex<Option<String>>,
}

#[derive(serde::Deserialize)]
struct Listing {
    payments: Vec<PaymentInfo>,
}

#[derive(serde::Deserialize)]
struct Conflict {
    status: PaymentStatus,
}

impl HttpGateway {
    /// A gateway at `base` (`http://host:port` or `https://…`), called with `client`.
    pub fn new(base: &str, client: HttpClient) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            client,
            last_failure: std::sync::Mutex::new(None),
        }
    }

    /// One call, retried on failures in transit; the answer's status and body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), PaymentError> {
        let url = format!("{}{path}", self.base);
        let mut last = PaymentError::Unreachable("no attempt".into());
        let mut backoff = RETRY_BACKOFF;
        // A call its caller stops waiting for (the checkout's own timeout) counts as unanswered.
        let mut watch = Unanswered {
            failure: &self.last_failure,
            path,
            answered: false,
        };
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff.next_wait()).await;
            }
            let headers: Vec<(&str, &str)> =
                key.map(|k| ("idempotency-key", k)).into_iter().collect();
            match self.client.send(method, &url, &headers, body.clone()).await {
                Ok(response) if response.status >= 500 => {
                    last = PaymentError::Unreachable(format!(
                        "{method} {path}: the gateway answered {}",
                        response.status
                    ));
                }
                Ok(response) => {
                    watch.answered = true;
                    *crate::sync::lock(&self.last_failure) = None;
                    return Ok((response.status, response.body.to_vec()));
                }
                Err(ClientError::Timeout(_)) => last = PaymentError::Timeout,
                Err(error) => last = PaymentError::Unreachable(error.to_string()),
            }
        }
        watch.answered = true;
        *crate::sync::lock(&self.last_failure) = Some(last.to_string());
        Err(last)
    }

    /// A payment from an answer, or the error it means.
    fn payment(path: &str, status: u16, body: &[u8]) -> Result<PaymentInfo, PaymentError> {
        match status {
            200 | 201 => serde_json::from_slice(body).map_err(|e| {
                PaymentError::Unreachable(format!(
                    "{path}: the gateway's answer is not a payment: {e}"
                ))
            }),
            404 => Err(PaymentError::Unknown(path.to_owned())),
            409 => match serde_json::from_slice::<Conflict>(body) {
                Ok(conflict) => Err(PaymentError::Conflict {
                    status: conflict.status,
                }),
                Err(e) => Err(PaymentError::Unreachable(format!(
                    "{path}: a 409 without a payment status: {e}"
                ))),
            },
            other => Err(PaymentError::Unreachable(format!(
                "{path}: unexpected answer {other}: {}",
                String::from_utf8_lossy(body)
            ))),
        }
    }

    async fn step(&self, payment_id: &str, action: &str) -> Result<(), PaymentError> {
        let path = format!("/v1/payments/{}/{action}", encode(payment_id));
        let (status, body) = self.call("POST", &path, None, Vec::new()).await?;
        Self::payment(&path, status, &body).map(|_| ())
    }
}

/// Notes a call that ended without an answer, including one dropped by its caller's timeout.
struct Unanswered<'a> {
    failure: &'a std::sync::Mutex<Option<String>>,
    path: &'a str,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            *crate::sync::lock(self.failure) = Some(format!(
                "{}: no answer before the caller gave up",
                self.path
            ));
        }
    }
}

/// The waits before the retries: 50 ms, then 100 ms, each ±50%.
const RETRY_BACKOFF: crate::backoff::Backoff =
    crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_millis(100));

/// A payment id as a path segment (ids are the gateway's; anything outside `[A-Za-z0-9_-]` is
/// percent-encoded).
fn encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl PaymentGateway for HttpGateway {
    fn check(&self) -> Option<Result<(), String>> {
        Some(match crate::sync::lock(&self.last_failure).clone() {
            None => Ok(()),
            Some(reason) => Err(format!(
                "the last call got no answer ({reason}); payments owed are retried"
            )),
        })
    }

    fn authorize(
        &self,
        request: AuthorizeRequest,
    ) -> BoxFuture<'_, Result<Authorization, PaymentError>> {
        Box::pin(async move {
            let body = serde_json::json!({
                "order_id": request.order_id,
                "token": request.token,
                "amount_cents": request.amount_cents,
                "currency": request.currency,
            })
            .to_string()
            .into_bytes();
            let path = "/v1/payments";
            let (status, answer) = self
                .call("POST", path, Some(&request.idempotency_key), body)
                .await?;
            let payment = Self::payment(path, status, &answer)?;
            let payment_id = payment.payment_id;
            Ok(match payment.status {
                PaymentStatus::Pending => Authorization::Pending { payment_id },
                PaymentStatus::Declined => Authorization::Declined { payment_id },
                PaymentStatus::Authorized | PaymentStatus::Captured => {
                    Authorization::Approved { payment_id }
                }
                // A key whose payment was voided or refunded since: not a new authorisation.
                status @ (PaymentStatus::Voided | PaymentStatus::Refunded) => {
                    return Err(PaymentError::Conflict { status })
                }
            })
        })
    }

    fn capture(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move { self.step(&payment_id, "capture").await })
    }

    fn void(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move { self.step(&payment_id, "void").await })
    }

    fn refund(&self, payment_id: String) -> BoxFuture<'_, Result<(), PaymentError>> {
        Box::pin(async move { self.step(&payment_id, "refund").await })
    }

    fn lookup(&self, payment_id: String) -> BoxFuture<'_, Result<PaymentInfo, PaymentError>> {
        Box::pin(async move {
            let path = format!("/v1/payments/{}", encode(&payment_id));
            let (status, body) = self.call("GET", &path, None, Vec::new()).await?;
            Self::payment(&path, status, &body)
        })
    }

    fn authorizations_older_than(
        &self,
        age: Duration,
        key_prefix: &str,
    ) -> BoxFuture<'_, Result<Vec<PaymentInfo>, PaymentError>> {
        let path = format!(
            "/v1/payments?open_older_than_ms={}&key_prefix={}",
            age.as_millis(),
            encode(key_prefix)
        );
        Box::pin(async move {
            let (status, body) = self.call("GET", &path, None, Vec::new()).await?;
            if status != 200 {
                return Err(PaymentError::Unreachable(format!(
                    "{path}: unexpected answer {status}"
                )));
            }
            serde_json::from_slice::<Listing>(&body)
                .map(|l| l.payments)
                .map_err(|e| PaymentError::Unreachable(format!("{path}: {e}")))
        })
    }
}
