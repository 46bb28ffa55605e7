//! One keep-alive HTTP/1.1 connection on hyper, reopened when it breaks.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

/// A request to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    /// The `Idempotency-Key`, if any.
    pub key: Option<String>,
    pub body: String,
}

/// What one scheduled arrival does: one request, or a buyer's cart flow (create a cart, put its
/// lines, check it out by `cart_id`), measured as one.
#[derive(Debug, Clone)]
pub enum Job {
    Single(Request),
    CartCheckout {
        /// (sku, quantity) lines.
        lines: Vec<(String, i64)>,
        customer_id: String,
        payment_token: String,
        key: String,
    },
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub replayed: bool,
    pub body: Bytes,
}

/// A keep-alive connection.
pub struct Connection {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            let _ = stream.set_nodelay(true);
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().ok_or("no connection")?;
        sender.ready().await.map_err(|e| format!("ready: {e}"))?;
        Ok(sender)
    }

    /// Sends a request and reads the whole answer; `Err` if there was none.
    pub async fn send(&mut self, request: &Request) -> Result<Answer, String> {
        let key = request.key.as_deref().map(|k| ("idempotency-key", k));
        let headers: Vec<(&str, &str)> = key.into_iter().collect();
        self.send_with(request.method, &request.path, &headers, &request.body)
            .await
    }

    /// Sends any request (extra headers included) and reads the whole answer.
    pub async fn send_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Answer, String> {
        let host = self.addr.to_string();
        let sender = self.ready().await?;
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .header("content-type", "application/json");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let http = builder
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let response = sender
                .send_request(http)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let status = response.status().as_u16();
            let replayed = response
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true");
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok(Answer {
                status,
                replayed,
                body,
            })
        }
        .await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    /// Runs a job; the answer is the request's, or the checkout's for a cart flow.
    pub async fn run(&mut self, job: &Job) -> Result<Answer, String> {
        match job {
            Job::Single(request) => self.send(request).await,
            Job::CartCheckout {
                lines,
                customer_id,
                payment_token,
                key,
            } => {
                let cart = Request {
                    method: "POST",
                    path: "/v1/carts".into(),
                    key: None,
                    body: String::new(),
                };
                let created = self.expect(&cart, 201).await?;
                let cart: serde_json::Value =
                    serde_json::from_slice(&created.body).map_err(|e| e.to_string())?;
                let cart_id = cart["cart_id"].as_str().ok_or("no cart_id")?.to_owned();
                for (sku, quantity) in lines {
                    let item = Request {
                        method: "PUT",
                        path: format!("/v1/carts/{cart_id}/items/{sku}"),
                        key: None,
                        body: serde_json::json!({ "quantity": quantity }).to_string(),
                    };
                    self.expect(&item, 200).await?;
                }
                let checkout = Request {
                    method: "POST",
                    path: "/v1/checkout".into(),
                    key: Some(key.clone()),
                    body: serde_json::json!({"cart_id": cart_id, "customer_id": customer_id, "payment_token": payment_token}).to_string(),
                };
                self.send(&checkout).await
            }
        }
    }

    /// Sends a request that must be answered with `expected`; the error names what happened.
    pub async fn expect(&mut self, request: &Request, expected: u16) -> Result<Answer, String> {
        let answer = self.send(request).await?;
        if answer.status == expected {
            Ok(answer)
        } else {
            Err(format!(
                "{} {} answered {} (expected {expected}): {}",
                request.method,
                request.path,
                answer.status,
                String::from_utf8_lossy(&answer.body)
            ))
        }
    }
}
