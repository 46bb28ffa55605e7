//! The one HTTP client the server calls out with (the simulator's webhooks, and the payment
//! gateway with `--gateway-url`): hyper-util's pooled client, so calls to one host reuse keep-alive connections, over
//! `hyper-rustls` for `https://` (the same rustls and ring as the listener). Every call has a
//! timeout covering the connection, the request and the whole answer, and an answer's body is read
//! up to [`ClientOptions::body_max`] only: a peer (a gateway, a node, a server the desk was pointed
//! at) cannot make the caller hold more than that in memory.

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL or a header could not be used.
    #[error("bad request: {0}")]
    Request(String),
    /// Connecting, sending or reading failed.
    #[error("{0}")]
    Io(String),
    /// The TLS configuration could not be built.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer's body was longer than the caller accepts.
    #[error("the answer from {url} is longer than {max} bytes: not read")]
    TooLong {
        /// Where it came from.
        url: String,
        /// The bound.
        max: usize,
    },
}

/// A response: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Response headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Which certificates an `https://` peer may present.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Any certificate: only for this server's own listener (the in-process simulator's webhooks to
    /// itself, whose body is authenticated by its HMAC signature, not by the connection).
    OwnListener,
    /// Certificates that chain to these roots.
    Roots(Arc<rustls::RootCertStore>),
}

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The most a call may take, connection included.
    pub timeout: Duration,
    /// The most a new connection may take.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub idle_timeout: Duration,
    /// Idle connections kept per host.
    pub idle_per_host: usize,
    /// Certificates accepted for `https://`.
    pub trust: Trust,
    /// The longest answer body read; a longer one fails the call with [`ClientError::TooLong`].
    pub body_max: usize,
}

impl ClientOptions {
    /// For webhooks, whose body carries its own HMAC signature: 5 s per call, any certificate
    /// (the in-process simulator's webhooks to this server, `gateway-sim`'s to its target).
    pub fn signed_webhooks() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            idle_per_host: 16,
            trust: Trust::OwnListener,
            // A webhook's answer is read for its status only.
            body_max: 64 << 10,
        }
    }
}

/// A pooled keep-alive client; cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    body_max: usize,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpClient {
    /// A client with these options.
    pub fn new(options: ClientOptions) -> Result<Self, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let tls = match options.trust {
            Trust::Roots(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
            Trust::OwnListener => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(OwnListener(provider)))
                .with_no_client_auth(),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(options.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(options.idle_timeout)
            .pool_max_idle_per_host(options.idle_per_host)
            .build(connector);
        Ok(Self {
            client,
            timeout: options.timeout,
            body_max: options.body_max,
        })
    }

    /// Sends one request with a JSON body to `url` and reads the whole answer, within the timeout.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Response, ClientError> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Request(format!("{method} {url}: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| ClientError::Io(format!("{method} {url}: {}", error_chain(&e))))?;
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let body = Limited::new(response.into_body(), self.body_max)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        ClientError::TooLong {
                            url: url.to_owned(),
                            max: self.body_max,
                        }
                    } else {
                        ClientError::Io(format!("reading from {url}: {}", error_chain(&*e)))
                    }
                })?
                .to_bytes();
            Ok(Response {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }
}

/// An error and its sources, `: `-separated (hyper's own message alone says little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Accepts the certificate of this server's own listener without checking who issued it, and
/// still checks the handshake's signatures with the provider's algorithms.
#[derive(Debug)]
struct OwnListener(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for OwnListener {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
