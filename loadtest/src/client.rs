//! One keep-alive connection on hyper (HTTP/1.1 or HTTP/2, over TCP or TLS), reopened when it
//! breaks.

use crate::target::Target;
use crate::tls::{self, Trust};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
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

/// What a waiting room's buyers saw ([`Job::Queued`]): per ticket, when it was last seen waiting
/// (before the asking) and first seen admitted (after the answer); and when the last sale was
/// answered.
#[derive(Debug, Default)]
pub struct AdmissionLog {
    pub admissions: std::sync::Mutex<Vec<Admission>>,
    pub last_sale: std::sync::Mutex<Option<std::time::Instant>>,
}

/// One ticket's admission as its buyer saw it.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub position: u64,
    pub last_waiting: Option<std::time::Instant>,
    pub admitted: std::time::Instant,
}

/// How long a queued buyer waits for its admission at most.
const ADMISSION_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// What one scheduled arrival does: one request, or a buyer's cart flow (create a cart, put its
/// lines, check it out by `cart_id`), measured as one.
#[derive(Debug, Clone)]
pub enum Job {
    Single(Request),
    /// A buyer of a product with a waiting room: takes a ticket, asks where it stands (waiting
    /// about as long as the tickets ahead take at `rate`) until it is admitted or the product sold
    /// out, then sends `checkout` with its `Admission-Ticket`.
    Queued {
        sku: String,
        checkout: Request,
        rate: u32,
        log: std::sync::Arc<AdmissionLog>,
    },
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

/// Where and how the harness connects: one address, the authority it names in `Host` (or
/// `:authority`), HTTP/1.1 or HTTP/2, over TCP or TLS. Cheap to clone: every connection of a run
/// holds one.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `host:port` as the target was written (a name stays a name).
    pub authority: String,
    /// HTTP/2: prior knowledge over TCP (h2c), ALPN `h2` over TLS.
    pub http2: bool,
    tls: Option<Tls>,
}

/// What a TLS connection needs: the connector (its config offers exactly one ALPN protocol) and
/// the name the certificate must match.
#[derive(Clone)]
struct Tls {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("authority", &self.authority)
            .field("http2", &self.http2)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl Endpoint {
    /// Plain HTTP/1.1 to `addr`.
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            authority: addr.to_string(),
            http2: false,
            tls: None,
        }
    }

    /// HTTP/2 over cleartext (prior knowledge) to `addr`.
    pub fn h2c(addr: SocketAddr) -> Self {
        Self {
            http2: true,
            ..Self::plain(addr)
        }
    }

    /// `target` resolved to `addr`: plain, or TLS with `trust` (ALPN `h2` when `http2`).
    pub fn for_target(
        target: &Target,
        addr: SocketAddr,
        http2: bool,
        trust: &Trust,
    ) -> Result<Self, String> {
        let tls = if target.is_https() {
            Some(Tls {
                connector: tokio_rustls::TlsConnector::from(tls::client_config(trust, http2)?),
                server_name: tls::server_name(&target.host)?,
            })
        } else {
            None
        };
        Ok(Self {
            addr,
            authority: target.authority(),
            http2,
            tls,
        })
    }

    /// Whether connections speak TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// `http://` or `https://` and the authority, for HTTP/2's absolute request URIs.
    fn origin(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }

    /// Opens a connection and performs the HTTP handshake (and the TLS one first, if any).
    async fn connect(&self) -> Result<Sender, String> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(stream), self.http2).await,
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| {
                        format!("TLS handshake with {}: {e}{}", self.authority, tls_hint(&e))
                    })?;
                let offered = tls::alpn(self.http2);
                let agreed = stream.get_ref().1.alpn_protocol();
                if self.http2 && agreed != Some(offered) {
                    return Err(format!(
                        "TLS with {}: the server did not agree to h2 by ALPN (it chose {:?})",
                        self.authority,
                        agreed.map(String::from_utf8_lossy)
                    ));
                }
                handshake(TokioIo::new(stream), self.http2).await
            }
        }
    }
}

/// What to change when a TLS handshake failed on the certificate or on ALPN.
fn tls_hint(error: &std::io::Error) -> &'static str {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => {
            " (trust the server's certificate with --cacert FILE, or accept any with --insecure)"
        }
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)) => {
            " (the server does not offer the protocol asked for by ALPN: h2 with --http2, else http/1.1)"
        }
        _ => "",
    }
}

/// The HTTP/1.1 or HTTP/2 handshake over an open stream; the connection runs as its own task.
async fn handshake<S>(io: TokioIo<S>, http2: bool) -> Result<Sender, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    if http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor, io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Sender::Http2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Sender::Http1(sender))
    }
}

/// A keep-alive connection to an [`Endpoint`], reopened when it breaks.
pub struct Connection {
    endpoint: Endpoint,
    sender: Option<Sender>,
}

/// Opens `sku`'s live stock stream (plain HTTP/1.1 to `addr`; asked again every 50 ms while the
/// product does not exist yet) and reads it until its `sold_out` event: when it came, or `None`
/// if the stream ended or `deadline` passed first.
pub async fn watch_sold_out(
    addr: SocketAddr,
    sku: String,
    deadline: std::time::Instant,
) -> Option<std::time::Instant> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let work = async {
        let mut lines = loop {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            let head = format!(
                "GET /v1/products/{sku}/stream HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\nconnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.ok()?;
            let mut lines = BufReader::new(stream).lines();
            let status = lines.next_line().await.ok()??;
            if status.split(' ').nth(1) == Some("200") {
                break lines;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        while let Some(line) = lines.next_line().await.ok()? {
            if line.trim_end() == "event: sold_out" {
                return Some(std::time::Instant::now());
            }
        }
        None
    };
    tokio::time::timeout_at(deadline.into(), work)
        .await
        .ok()
        .flatten()
}

impl Connection {
    /// An HTTP/1.1 connection to `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self::to(Endpoint::plain(addr))
    }

    /// An HTTP/2 (h2c) connection to `addr`.
    pub fn http2(addr: SocketAddr) -> Self {
        Self::to(Endpoint::h2c(addr))
    }

    /// A connection to `endpoint` (opened on first use).
    pub fn to(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            sender: None,
        }
    }

    async fn ready(&mut self) -> Result<&mut Sender, String> {
        if self.sender.as_ref().is_none_or(Sender::is_closed) {
            self.sender = Some(self.endpoint.connect().await?);
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
        let mut builder = hyper::Request::builder()
            .method(method)
            .header("content-type", "application/json");
        builder = if self.endpoint.http2 {
            builder.uri(format!("{}{path}", self.endpoint.origin()))
        } else {
            builder
                .uri(path)
                .header("host", self.endpoint.authority.as_str())
        };
        let sender = self.ready().await?;
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
            Job::Queued {
                sku,
                checkout,
                rate,
                log,
            } => self.queued(sku, checkout, *rate, log).await,
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

    async fn queued(
        &mut self,
        sku: &str,
        checkout: &Request,
        rate: u32,
        log: &AdmissionLog,
    ) -> Result<Answer, String> {
        use std::time::{Duration, Instant};
        let queue = Request {
            method: "POST",
            path: format!("/v1/products/{sku}/queue"),
            key: None,
            body: String::new(),
        };
        let taken = self.expect(&queue, 201).await?;
        let taken: serde_json::Value =
            serde_json::from_slice(&taken.body).map_err(|e| e.to_string())?;
        let ticket = taken["ticket"].as_str().ok_or("no ticket")?.to_owned();
        let position = taken["position"].as_u64().ok_or("no position")?;
        let status = Request {
            method: "GET",
            path: format!("/v1/queue/{ticket}"),
            key: None,
            body: String::new(),
        };
        let started = Instant::now();
        let mut last_waiting = None;
        loop {
            let asked = Instant::now();
            let answer = self.expect(&status, 200).await?;
            let seen: serde_json::Value =
                serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
            if seen["admitted"] == true {
                if let Ok(mut admissions) = log.admissions.lock() {
                    admissions.push(Admission {
                        position,
                        last_waiting,
                        admitted: Instant::now(),
                    });
                }
                break;
            }
            if seen["sold_out"] == true || started.elapsed() > ADMISSION_WAIT_MAX {
                break;
            }
            last_waiting = Some(asked);
            let ahead = seen["ahead"].as_u64().unwrap_or(0) as f64;
            let wait = ((ahead + 1.0) / f64::from(rate.max(1))).clamp(0.01, 1.0);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
        let key = checkout.key.as_deref().unwrap_or_default();
        let answer = self
            .send_with(
                checkout.method,
                &checkout.path,
                &[("idempotency-key", key), ("admission-ticket", &ticket)],
                &checkout.body,
            )
            .await?;
        if matches!(answer.status, 201 | 202) {
            if let Ok(mut last) = log.last_sale.lock() {
                *last = Some(Instant::now());
            }
        }
        Ok(answer)
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
