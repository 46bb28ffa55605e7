//! The `redis-lua` reference server: the stock check and decrement is one Lua script in Redis
//! (atomic, one round trip for all lines), the key is claimed with `SET NX`, and each order is one
//! INSERT into MariaDB; the answer is kept in Redis for replays. This is the design the "Redis Lua
//! decrement plus a queue" crowd ships, with the queue replaced by a direct INSERT.

use crate::reference::{error, json, parse_checkout, CheckoutBody, ProductBody, ReferenceConfig};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{post, put};
use axum::Router;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// KEYS: one stock hash per line; ARGV: the quantities. Returns 0 if every line was taken, else
/// the 1-based index of the first short line (nothing taken then).
const RESERVE: &str = r#"
for i, key in ipairs(KEYS) do
  local available = tonumber(redis.call('HGET', key, 'available'))
  if available == nil then return -i end
  if available < tonumber(ARGV[i]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'available', -tonumber(ARGV[i]))
  redis.call('HINCRBY', key, 'sold', tonumber(ARGV[i]))
end
return 0
"#;

struct Shared {
    redis: redis::aio::MultiplexedConnection,
    pool: MySqlPool,
    prefix: String,
    reserve: redis::Script,
}

/// Starts the server; returns its address (it runs until the process ends).
pub async fn serve_redis_lua(
    config: ReferenceConfig,
    redis_url: &str,
) -> Result<SocketAddr, String> {
    let client = redis::Client::open(redis_url).map_err(|e| format!("{redis_url}: {e}"))?;
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| {
            format!("connecting to Redis at {redis_url}: {e} (start it with redis-server)")
        })?;
    let pool = MySqlPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&config.mysql_url)
        .await
        .map_err(|e| format!("connecting to {}: {e}", config.mysql_url))?;
    sqlx::query("CREATE TABLE IF NOT EXISTS ref_lua_orders (order_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, idempotency_key VARCHAR(255) NOT NULL, customer_id VARCHAR(128) NOT NULL, lines_json TEXT NOT NULL, UNIQUE KEY ref_lua_orders_key (idempotency_key)) ENGINE=InnoDB")
        .execute(&pool)
        .await
        .map_err(|e| format!("creating the reference table: {e}"))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let prefix = format!("ref:{}:", addr.port());
    let shared = Arc::new(Shared {
        redis,
        pool,
        prefix,
        reserve: redis::Script::new(RESERVE),
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

async fn put_product(
    State(shared): State<Arc<Shared>>,
    Path(sku): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(product) = serde_json::from_slice::<ProductBody>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "bad product");
    };
    let mut redis = shared.redis.clone();
    let key = format!("{}p:{sku}", shared.prefix);
    let set: redis::RedisResult<()> = redis::cmd("HSET")
        .arg(&key)
        .arg("stock")
        .arg(product.stock)
        .arg("available")
        .arg(product.stock)
        .arg("sold")
        .arg(0)
        .query_async(&mut redis)
        .await;
    match set {
        Ok(()) => get_product(State(shared), Path(sku)).await,
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "session_store_unavailable",
            &e.to_string(),
        ),
    }
}

async fn get_product(State(shared): State<Arc<Shared>>, Path(sku): Path<String>) -> Response {
    let mut redis = shared.redis.clone();
    let key = format!("{}p:{sku}", shared.prefix);
    let values: redis::RedisResult<(Option<i64>, Option<i64>, Option<i64>)> = redis::cmd("HMGET")
        .arg(&key)
        .arg("stock")
        .arg("available")
        .arg("sold")
        .query_async(&mut redis)
        .await;
    match values {
        Ok((Some(stock), Some(available), Some(sold))) => json(
            StatusCode::OK,
            serde_json::json!({"sku": sku, "stock": stock, "available": available, "reserved": 0, "sold": sold}).to_string(),
        ),
        Ok(_) => error(StatusCode::NOT_FOUND, "not_found", "no such product"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "session_store_unavailable", &e.to_string()),
    }
}

async fn checkout(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let (key, request) = match parse_checkout(&headers, &body) {
        Ok(parsed) => parsed,
        Err(problem) => return error(StatusCode::BAD_REQUEST, "invalid_request", problem),
    };
    match place(&shared, &key, &body, request).await {
        Ok((status, body)) => json(status, body),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "journal_unavailable", &e),
    }
}

async fn place(
    shared: &Shared,
    key: &str,
    raw: &[u8],
    request: CheckoutBody,
) -> Result<(StatusCode, String), String> {
    let mut redis = shared.redis.clone();
    let answer_key = format!("{}k:{key}", shared.prefix);
    let fingerprint = String::from_utf8_lossy(raw).into_owned();
    // Claim the key; the value becomes "<status>\n<fingerprint>\n<body>" when done.
    let claimed: bool = redis::cmd("SET")
        .arg(&answer_key)
        .arg(format!("0\n{fingerprint}\n"))
        .arg("NX")
        .arg("EX")
        .arg(86_400)
        .query_async::<Option<String>>(&mut redis)
        .await
        .map_err(|e| e.to_string())?
        .is_some();
    if !claimed {
        let stored: Option<String> = redis::cmd("GET")
            .arg(&answer_key)
            .query_async(&mut redis)
            .await
            .map_err(|e| e.to_string())?;
        let stored = stored.unwrap_or_default();
        let mut parts = stored.splitn(3, '\n');
        let (status, known, body) = (
            parts.next().unwrap_or("0"),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        return Ok(if known != fingerprint {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"error": "idempotency_key_reused", "message": "other request"})
                    .to_string(),
            )
        } else if status == "0" {
            (
                StatusCode::CONFLICT,
                serde_json::json!({"error": "idempotency_key_in_use", "message": "running"})
                    .to_string(),
            )
        } else {
            (
                StatusCode::from_u16(status.parse().unwrap_or(500)).unwrap_or(StatusCode::OK),
                body.to_owned(),
            )
        });
    }
    let (status, body) = if request.payment_token != "tok_ok" {
        (
            StatusCode::PAYMENT_REQUIRED,
            serde_json::json!({"error": "payment_declined", "message": "declined"}).to_string(),
        )
    } else {
        let mut invocation = shared.reserve.prepare_invoke();
        for line in &request.items {
            invocation
                .key(format!("{}p:{}", shared.prefix, line.sku))
                .arg(line.quantity);
        }
        let short: i64 = invocation
            .invoke_async(&mut redis)
            .await
            .map_err(|e| e.to_string())?;
        if short > 0 {
            let sku = &request.items[(short - 1) as usize].sku;
            (
                StatusCode::CONFLICT,
                serde_json::json!({"error": "out_of_stock", "message": "short", "sku": sku})
                    .to_string(),
            )
        } else if short < 0 {
            (
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found", "message": "no such product"}).to_string(),
            )
        } else {
            let lines = serde_json::to_string(
                &request
                    .items
                    .iter()
                    .map(|l| (&l.sku, l.quantity))
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default();
            let inserted = sqlx::query("INSERT INTO ref_lua_orders (idempotency_key, customer_id, lines_json) VALUES (?, ?, ?)")
                .bind(key)
                .bind(&request.customer_id)
                .bind(&lines)
                .execute(&shared.pool)
                .await;
            match inserted {
                Ok(done) => (
                    StatusCode::CREATED,
                    serde_json::json!({"order_id": format!("lua_{}", done.last_insert_id()), "status": "paid", "customer_id": request.customer_id}).to_string(),
                ),
                Err(e) => {
                    // Give the units back and free the key: nothing was recorded.
                    for line in &request.items {
                        let give_back: redis::RedisResult<()> = redis::cmd("HINCRBY").arg(format!("{}p:{}", shared.prefix, line.sku)).arg("available").arg(line.quantity).query_async(&mut redis).await;
                        let _ = give_back;
                        let _: redis::RedisResult<()> = redis::cmd("HINCRBY").arg(format!("{}p:{}", shared.prefix, line.sku)).arg("sold").arg(-line.quantity).query_async(&mut redis).await;
                    }
                    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&answer_key).query_async(&mut redis).await;
                    return Err(e.to_string());
                }
            }
        }
    };
    let _: () = redis::cmd("SET")
        .arg(&answer_key)
        .arg(format!("{}\n{fingerprint}\n{body}", status.as_u16()))
        .arg("EX")
        .arg(86_400)
        .query_async(&mut redis)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}
