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
    /// The `Retry-After` header, if the server sent one.
    pub retry_after: Option<String>,
    pub body: Bytes,
}

enum Sender {
    Http1(SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    async fn send(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        match self {
            Sender::Http1(s) => {
                s.ready().await.map_err(|e| format!("ready: {e}"))?;
                s.send_request(request)
                    .await
                    .map_err(|e| format!("send: {e}"))
            }
            Sender::Http2(s) => {
                s.ready().await.map_err(|e| format!("ready: {e}"))?;
                s.send_request(request)
                    .await
                    .map_err(|e| format!("send: {e}"))
            }
        }
    }
}

/// Runs hyper's HTTP/2 connection tasks on tokio.
#[derive(Clone, Copy)]
struct TokioExecutor;

impl<F> hyper::rt::Executor<F> for TokioExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(future);
    }
}

/// A keep-alive connection: HTTP/1.1, or HTTP/2 over cleartext (prior knowledge).
pub struct Connection {
    addr: SocketAddr,
    http2: bool,
    sender: Option<Sender>,
}

impl Connection {
    /// An HTTP/1.1 connection.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            http2: false,
            sender: None,
        }
    }

    /// An HTTP/2 (h2c) connection.
    pub fn http2(addr: SocketAddr) -> Self {
        Self {
            addr,
            http2: true,
            sender: None,
        }
    }

    async fn ready(&mut self) -> Result<&mut Sender, String> {
        if self.sender.as_ref().is_none_or(Sender::is_closed) {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            let _ = stream.set_nodelay(true);
            let sender = if self.http2 {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor, TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Sender::Http2(sender)
            } else {
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Sender::Http1(sender)
            };
            self.sender = Some(sender);
        }
        self.sender
            .as_mut()
            .ok_or_else(|| "no connection".to_owned())
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
        let http2 = self.http2;
        let sender = self.ready().await?;
        let mut builder = hyper::Request::builder()
            .method(method)
            .header("content-type", "application/json");
        builder = if http2 {
            builder.uri(format!("http://{host}{path}"))
        } else {
            builder.uri(path).header("host", host)
        };
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let http = builder
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let response = sender.send(http).await?;
            let status = response.status().as_u16();
            let replayed = response
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true");
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok(Answer {
                status,
                replayed,
                retry_after,
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
