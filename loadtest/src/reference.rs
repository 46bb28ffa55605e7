//! Reference servers: the classic designs Turnstile is compared with, written as a competent
//! engineer would, on the same HTTP/JSON stack (axum on hyper).
//!
//! `mysql-for-update`: the idempotency key is looked up and the stock read (plain reads: a SKU
//! already short is answered without its row lock), then every checkout is one MySQL
//! transaction: lock each product row with `SELECT ... FOR UPDATE` (in SKU order, so no
//! deadlocks), check the units; a short SKU is a ROLLBACK that writes nothing; a sale counts the
//! units, inserts the order and the key with its answer (the key's primary key stops a racing
//! twin), COMMIT. Pooled connections sized for the load; prepared statements (sqlx caches them
//! per connection).
//!
//! Test-only flags: `no_stock_check` (the bug an oversell check must catch) and a stall (every
//! request that arrives within `stall_for` after the `stall_at`-th one is held for `stall_for`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::Router;
use serde::Deserialize;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::Row;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the reference server runs.
#[derive(Debug, Clone)]
pub struct ReferenceConfig {
    /// `mysql://...` of a database the server may create its tables in.
    pub mysql_url: String,
    pub listen: SocketAddr,
    /// Pool size: one connection per concurrent checkout is what the design needs.
    pub pool_size: u32,
    /// Test-only: skip the stock check (oversells).
    pub no_stock_check: bool,
    /// Test-only: the request count at which the stall starts.
    pub stall_at: Option<u64>,
    /// Test-only: how long the stall lasts, and how long each request in it is held.
    pub stall_for: Duration,
}

struct Shared {
    pool: MySqlPool,
    config: ReferenceConfig,
    requests: AtomicU64,
    stall_started: Mutex<Option<Instant>>,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS ref_products (sku VARCHAR(128) NOT NULL PRIMARY KEY, name VARCHAR(500) NOT NULL, price_cents BIGINT NOT NULL, currency CHAR(3) NOT NULL, stock BIGINT NOT NULL, sold BIGINT NOT NULL DEFAULT 0) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS ref_orders (order_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, idempotency_key VARCHAR(255) NOT NULL, customer_id VARCHAR(128) NOT NULL, total_cents BIGINT NOT NULL, UNIQUE KEY ref_orders_key (idempotency_key)) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS ref_order_items (order_id BIGINT NOT NULL, sku VARCHAR(128) NOT NULL, quantity BIGINT NOT NULL, PRIMARY KEY (order_id, sku)) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS ref_keys (idempotency_key VARCHAR(255) NOT NULL PRIMARY KEY, fingerprint VARCHAR(64) NOT NULL, status SMALLINT NOT NULL, body TEXT NOT NULL) ENGINE=InnoDB",
];

/// Starts the server; returns its address (it runs until the process ends).
pub async fn serve_mysql_for_update(config: ReferenceConfig) -> Result<SocketAddr, String> {
    let pool = MySqlPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&config.mysql_url)
        .await
        .map_err(|e| format!("connecting to {}: {e}", config.mysql_url))?;
    for statement in SCHEMA {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .map_err(|e| format!("creating the reference tables: {e}"))?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let shared = Arc::new(Shared {
        pool,
        config,
        requests: AtomicU64::new(0),
        stall_started: Mutex::new(None),
    });
    let router = Router::new()
        .route("/v1/products/{sku}", put(put_product).get(get_product))
        .route("/v1/checkout", post(checkout))
        .with_state(shared);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(addr)
}

pub(crate) fn json(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "application/json")], body).into_response()
}

pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    json(
        status,
        serde_json::json!({"error": code, "message": message}).to_string(),
    )
}

/// Holds a request while the test-only stall lasts.
async fn maybe_stall(shared: &Shared) {
    let Some(stall_at) = shared.config.stall_at else {
        return;
    };
    let n = shared.requests.fetch_add(1, Ordering::Relaxed);
    let hold = {
        let mut started = shared
            .stall_started
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if n == stall_at {
            *started = Some(Instant::now());
        }
        started.is_some_and(|at| at.elapsed() < shared.config.stall_for)
    };
    if hold {
        tokio::time::sleep(shared.config.stall_for).await;
    }
}

/// A product as both reference servers read it.
#[derive(Deserialize)]
pub(crate) struct ProductBody {
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
    pub stock: i64,
}

async fn put_product(
    State(shared): State<Arc<Shared>>,
    Path(sku): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(product) = serde_json::from_slice::<ProductBody>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "bad product");
    };
    let result = sqlx::query(
        "INSERT INTO ref_products (sku, name, price_cents, currency, stock) VALUES (?, ?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE name = VALUES(name), price_cents = VALUES(price_cents), currency = VALUES(currency), stock = VALUES(stock)",
    )
    .bind(&sku)
    .bind(&product.name)
    .bind(product.price_cents)
    .bind(&product.currency)
    .bind(product.stock)
    .execute(&shared.pool)
    .await;
    match result {
        Ok(_) => get_product(State(shared), Path(sku)).await,
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal_unavailable",
            &e.to_string(),
        ),
    }
}

async fn get_product(State(shared): State<Arc<Shared>>, Path(sku): Path<String>) -> Response {
    let row = sqlx::query(
        "SELECT name, price_cents, currency, stock, sold FROM ref_products WHERE sku = ?",
    )
    .bind(&sku)
    .fetch_optional(&shared.pool)
    .await;
    match row {
        Ok(Some(row)) => {
            let stock: i64 = row.get(3);
            let sold: i64 = row.get(4);
            json(
                StatusCode::OK,
                serde_json::json!({
                    "sku": sku, "name": row.get::<String, _>(0), "price_cents": row.get::<i64, _>(1),
                    "currency": row.get::<String, _>(2), "stock": stock, "available": stock - sold,
                    "reserved": 0, "sold": sold,
                })
                .to_string(),
            )
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", "no such product"),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal_unavailable",
            &e.to_string(),
        ),
    }
}

/// One checkout line.
#[derive(Deserialize)]
pub(crate) struct Line {
    pub sku: String,
    pub quantity: i64,
}

/// The item-list form of a checkout, the one the reference servers serve.
#[derive(Deserialize)]
pub(crate) struct CheckoutBody {
    pub items: Vec<Line>,
    pub customer_id: String,
    pub payment_token: String,
}

/// Reads the key and the body of a checkout, or says what is wrong with them (a `400`).
pub(crate) fn parse_checkout(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, CheckoutBody), &'static str> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .ok_or("Idempotency-Key is required")?;
    let request = serde_json::from_slice::<CheckoutBody>(body).map_err(|_| "bad checkout")?;
    Ok((key.to_owned(), request))
}

fn fingerprint(body: &[u8]) -> String {
    // The reference keeps it simple: the raw body identifies the request.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in body {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

async fn checkout(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    maybe_stall(&shared).await;
    let (key, request) = match parse_checkout(&headers, &body) {
        Ok(parsed) => parsed,
        Err(problem) => return error(StatusCode::BAD_REQUEST, "invalid_request", problem),
    };
    let fingerprint = fingerprint(&body);
    match place(&shared, &key, &fingerprint, request).await {
        Ok((status, body)) => json(status, body),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "journal_unavailable",
            &e.to_string(),
        ),
    }
}

/// A finished answer under `key`, or `None`: the row of `ref_keys`, told against `fingerprint`.
async fn known_answer(
    pool: &MySqlPool,
    key: &str,
    fingerprint: &str,
) -> Result<Option<(StatusCode, String)>, sqlx::Error> {
    let row =
        sqlx::query("SELECT fingerprint, status, body FROM ref_keys WHERE idempotency_key = ?")
            .bind(key)
            .fetch_optional(pool)
            .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let (known, status, body): (String, i16, String) = (row.get(0), row.get(1), row.get(2));
    Ok(Some(if known != fingerprint {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({"error": "idempotency_key_reused", "message": "other request"})
                .to_string(),
        )
    } else {
        (
            StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK),
            body,
        )
    }))
}

/// `409 out_of_stock` for `sku`, unless a twin with the same key sold meanwhile (then its answer).
async fn short_answer(
    shared: &Shared,
    key: &str,
    fingerprint: &str,
    sku: &str,
) -> Result<(StatusCode, String), sqlx::Error> {
    let short = (
        StatusCode::CONFLICT,
        serde_json::json!({"error": "out_of_stock", "message": "short", "sku": sku}).to_string(),
    );
    Ok(known_answer(&shared.pool, key, fingerprint)
        .await?
        .unwrap_or(short))
}

/// One checkout, as a competent engineer writes it on MySQL: the key looked up first (a read), then
/// a plain read of the stock (a SKU already short is answered without its row lock), then one
/// transaction that locks the product rows (`SELECT ... FOR UPDATE`, in SKU order, so no
/// deadlocks). A short SKU is answered with a ROLLBACK that writes nothing (a sold-out flood costs
/// no durable write), after a read of the key so that a racing first request with the same key,
/// committed meanwhile, is replayed rather than contradicted. A sale (or a decline)
/// writes its key with its answer, the order and the counts, and COMMITs once.
async fn place(
    shared: &Shared,
    key: &str,
    fingerprint: &str,
    request: CheckoutBody,
) -> Result<(StatusCode, String), sqlx::Error> {
    if let Some(answer) = known_answer(&shared.pool, key, fingerprint).await? {
        return Ok(answer);
    }
    let mut lines = request.items;
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    // A plain read first: a SKU already short is answered without taking its row lock (the
    // sold-out flood would otherwise queue on the one hot row).
    if !shared.config.no_stock_check {
        for line in &lines {
            let row = sqlx::query("SELECT stock - sold FROM ref_products WHERE sku = ?")
                .bind(&line.sku)
                .fetch_optional(&shared.pool)
                .await?;
            if let Some(row) = row {
                let left: i64 = row.get(0);
                if left < line.quantity {
                    return short_answer(shared, key, fingerprint, &line.sku).await;
                }
            }
        }
    }
    let mut tx = shared.pool.begin().await?;
    let mut total = 0i64;
    let mut short = None;
    for line in &lines {
        let row = sqlx::query(
            "SELECT stock, sold, price_cents FROM ref_products WHERE sku = ? FOR UPDATE",
        )
        .bind(&line.sku)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            short = Some((
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found", "message": "no such product"}).to_string(),
            ));
            break;
        };
        let (stock, sold, price): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if !shared.config.no_stock_check && stock - sold < line.quantity {
            short = Some((
                StatusCode::CONFLICT,
                serde_json::json!({"error": "out_of_stock", "message": "short", "sku": line.sku})
                    .to_string(),
            ));
            break;
        }
        total += price * line.quantity;
    }
    if let Some(answer) = short {
        tx.rollback().await?;
        // A twin with the same key that sold first has committed by now (it held the row lock
        // before this one): its answer is the answer.
        return Ok(known_answer(&shared.pool, key, fingerprint)
            .await?
            .unwrap_or(answer));
    }
    // The sale (or the decline) with its key and answer; a racing twin with the same key that
    // committed first makes one of these INSERTs a duplicate: its answer is then the answer.
    let written = async {
        let (status, body) = if request.payment_token != "tok_ok" {
            (
                StatusCode::PAYMENT_REQUIRED,
                serde_json::json!({"error": "payment_declined", "message": "declined"})
                    .to_string(),
            )
        } else {
            for line in &lines {
                sqlx::query("UPDATE ref_products SET sold = sold + ? WHERE sku = ?")
                    .bind(line.quantity)
                    .bind(&line.sku)
                    .execute(&mut *tx)
                    .await?;
            }
            let order_id = sqlx::query(
                "INSERT INTO ref_orders (idempotency_key, customer_id, total_cents) VALUES (?, ?, ?)",
            )
            .bind(key)
            .bind(&request.customer_id)
            .bind(total)
            .execute(&mut *tx)
            .await?
            .last_insert_id();
            for line in &lines {
                sqlx::query(
                    "INSERT INTO ref_order_items (order_id, sku, quantity) VALUES (?, ?, ?)",
                )
                .bind(order_id)
                .bind(&line.sku)
                .bind(line.quantity)
                .execute(&mut *tx)
                .await?;
            }
            let body = serde_json::json!({"order_id": format!("ref_{order_id}"), "status": "paid", "customer_id": request.customer_id, "total_cents": total}).to_string();
            (StatusCode::CREATED, body)
        };
        sqlx::query(
            "INSERT INTO ref_keys (idempotency_key, fingerprint, status, body) VALUES (?, ?, ?, ?)",
        )
        .bind(key)
        .bind(fingerprint)
        .bind(status.as_u16() as i16)
        .bind(&body)
        .execute(&mut *tx)
        .await?;
        Ok::<_, sqlx::Error>((status, body))
    }
    .await;
    match written {
        Ok(answer) => {
            tx.commit().await?;
            Ok(answer)
        }
        Err(e)
            if e.as_database_error()
                .is_some_and(|d| d.is_unique_violation()) =>
        {
            tx.rollback().await?;
            Ok(known_answer(&shared.pool, key, fingerprint)
                .await?
                .unwrap_or((
                    StatusCode::CONFLICT,
                    serde_json::json!({"error": "idempotency_key_in_use", "message": "running"})
                        .to_string(),
                )))
        }
        Err(e) => Err(e),
    }
}
