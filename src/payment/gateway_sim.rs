//! `turnstile gateway-sim`: the payment gateway simulator over real HTTP, speaking the protocol of
//! [`super::http`], with the ledger's rules (idempotency keys honoured, the tokens of API.md),
//! signed webhooks for `tok_pending` sent to `--webhook-url` with retries and backoff, and
//! injected faults on authorisations: added latency, no answer (`--fail-timeout`), `503`
//! (`--fail-5xx`), and "authorised, then the connection dropped before the answer"
//! (`--fail-drop`). `GET /v1/ledger` lists every payment, so tests can check money against orders.

use super::ledger::Ledger;
use super::simulator::deliver_webhook;
use super::{Authorization, AuthorizeRequest, PaymentError};
use crate::config::GatewaySimArgs;
use crate::http_client::{ClientOptions, HttpClient};
use crate::time::now_ms;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// Payments the stand-alone simulator holds at most (a test's or a load run's worth).
const LEDGER_ENTRIES_MAX: usize = 10_000_000;

/// How long a "timed out" authorisation is held before the connection is closed: longer than
/// any sensible client timeout.
const TIMEOUT_HOLD: Duration = Duration::from_secs(120);

struct Sim {
    ledger: Ledger,
    args: GatewaySimArgs,
    client: HttpClient,
}

type Shared = Arc<Sim>;

/// A fraction in [0, 1) from the kernel's random source (0.5 if it fails: faults are a test aid).
fn chance() -> f64 {
    crate::random::random_bytes(4).map_or(0.5, |b| {
        f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) / (f64::from(u32::MAX) + 1.0)
    })
}

/// Sleeps the configured latency: uniform in [0, 2 × mean], so the mean is as asked.
async fn latency(sim: &Sim) {
    if !sim.args.latency.is_zero() {
        tokio::time::sleep(sim.args.latency.mul_f64(2.0 * chance())).await;
    }
}

/// A JSON answer.
fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    json(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

fn payment_error(failure: PaymentError) -> Response {
    match failure {
        PaymentError::Conflict { status } => json(
            StatusCode::CONFLICT,
            &serde_json::json!({ "error": "conflict", "status": status }),
        ),
        PaymentError::Unknown(id) => error_404(&id),
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    }
}

fn error_404(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no payment {id}"),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeBody {
    order_id: String,
    token: String,
    amount_cents: i64,
    currency: String,
}

async fn authorize(State(sim): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    latency(&sim).await;
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Idempotency-Key is required".into(),
        );
    };
    let body: AuthorizeBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
    };
    let roll = chance();
    let args = &sim.args;
    if roll < args.fail_timeout {
        tokio::time::sleep(TIMEOUT_HOLD).await;
        return error(StatusCode::GATEWAY_TIMEOUT, "timeout", "injected".into());
    }
    if roll < args.fail_timeout + args.fail_5xx {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "injected 5xx".into(),
        );
    }
    let request = AuthorizeRequest {
        idempotency_key: key.to_owned(),
        order_id: body.order_id,
        token: body.token,
        amount_cents: body.amount_cents,
        currency: body.currency,
    };
    let Some(answer) = sim.ledger.authorize(&request, now_ms()) else {
        // tok_timeout: never answers within any client timeout, holds nothing.
        tokio::time::sleep(TIMEOUT_HOLD).await;
        return error(StatusCode::GATEWAY_TIMEOUT, "timeout", "tok_timeout".into());
    };
    let payment_id = match &answer {
        Authorization::Approved { payment_id }
        | Authorization::Declined { payment_id }
        | Authorization::Pending { payment_id } => payment_id.clone(),
    };
    if let Authorization::Pending { .. } = answer {
        decide_later(Arc::clone(&sim), payment_id.clone());
    }
    if roll < args.fail_timeout + args.fail_5xx + args.fail_drop {
        // Authorised, then the connection drops before the answer's body.
        let broken = futures_util::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other("injected connection drop"))
        });
        return Response::new(Body::from_stream(broken));
    }
    match sim.ledger.lookup(&payment_id) {
        Ok(payment) => json(StatusCode::OK, &payment),
        Err(e) => payment_error(e),
    }
}

/// Decides a pending payment after `--pending-delay`, then sends its webhook.
fn decide_later(sim: Shared, payment_id: String) {
    tokio::spawn(async move {
        tokio::time::sleep(sim.args.pending_delay).await;
        let Some(payment) = sim.ledger.decide_pending(&payment_id) else {
            return;
        };
        let (Some(url), Some(secret)) = (&sim.args.webhook_url, &sim.args.webhook_secret) else {
            tracing::info!(%payment_id, "decided; no --webhook-url to tell");
            return;
        };
        deliver_webhook(&sim.client, url, secret.as_bytes(), &payment, 20).await;
    });
}

async fn step(
    sim: Shared,
    payment_id: String,
    action: fn(&Ledger, &str) -> Result<(), PaymentError>,
) -> Response {
    latency(&sim).await;
    match action(&sim.ledger, &payment_id).and_then(|()| sim.ledger.lookup(&payment_id)) {
        Ok(payment) => json(StatusCode::OK, &payment),
        Err(e) => payment_error(e),
    }
}

async fn capture(State(sim): State<Shared>, Path(id): Path<String>) -> Response {
    step(sim, id, Ledger::capture).await
}

async fn void(State(sim): State<Shared>, Path(id): Path<String>) -> Response {
    step(sim, id, Ledger::void).await
}

async fn refund(State(sim): State<Shared>, Path(id): Path<String>) -> Response {
    step(sim, id, Ledger::refund).await
}

async fn lookup(State(sim): State<Shared>, Path(id): Path<String>) -> Response {
    latency(&sim).await;
    match sim.ledger.lookup(&id) {
        Ok(payment) => json(StatusCode::OK, &payment),
        Err(e) => payment_error(e),
    }
}

async fn list(State(sim): State<Shared>, Query(query): Query<HashMap<String, String>>) -> Response {
    let Some(age) = query
        .get("open_older_than_ms")
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|v| *v >= 0)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "open_older_than_ms=N (milliseconds) is required".into(),
        );
    };
    // `key_prefix`: only the authorisations whose idempotency key starts with it (a node's own).
    let prefix = query.get("key_prefix").map_or("", String::as_str);
    let payments = sim.ledger.authorized_before(now_ms() - age, prefix);
    json(StatusCode::OK, &serde_json::json!({ "payments": payments }))
}

async fn ledger(State(sim): State<Shared>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({ "payments": sim.ledger.all() }),
    )
}

/// The simulator's routes.
fn router(sim: Shared) -> Router {
    Router::new()
        .route("/v1/payments", post(authorize).get(list))
        .route("/v1/payments/{id}", get(lookup))
        .route("/v1/payments/{id}/capture", post(capture))
        .route("/v1/payments/{id}/void", post(void))
        .route("/v1/payments/{id}/refund", post(refund))
        .route("/v1/ledger", get(ledger))
        .route(
            "/healthz",
            get(|| async { json(StatusCode::OK, &serde_json::json!({"status": "ok"})) }),
        )
        .with_state(sim)
}

/// Why the simulator stopped.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Bad options (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The socket or the runtime failed (exit 1).
    #[error("{0}")]
    Io(String),
}

/// Runs the simulator until SIGTERM or Ctrl-C; prints `listening on <addr>` once ready.
pub fn run(args: GatewaySimArgs) -> Result<(), SimError> {
    if args.webhook_url.is_some() != args.webhook_secret.is_some() {
        return Err(SimError::Usage(
            "--webhook-url and --webhook-secret go together".into(),
        ));
    }
    if args.fail_timeout + args.fail_5xx + args.fail_drop > 1.0 {
        return Err(SimError::Usage(
            "--fail-timeout, --fail-5xx and --fail-drop add up to more than 1".into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| SimError::Io(format!("starting the runtime: {e}")))?;
    runtime.block_on(async move {
        let client = HttpClient::new(ClientOptions::signed_webhooks())
            .map_err(|e| SimError::Io(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| SimError::Io(format!("listening on {}: {e}", args.listen)))?;
        let local = listener
            .local_addr()
            .map_err(|e| SimError::Io(e.to_string()))?;
        let sim = Arc::new(Sim {
            ledger: Ledger::new(LEDGER_ENTRIES_MAX),
            args,
            client,
        });
        tracing::info!(%local, "payment gateway simulator serving");
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on {local}").and_then(|()| stdout.flush());
        drop(stdout);
        axum::serve(listener, router(sim))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| SimError::Io(e.to_string()))
    })
}
