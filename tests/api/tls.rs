//! HTTPS with `--tls-cert`/`--tls-key`, driven by a real rustls client: TLS 1.3 only by default
//! (1.2 with `--tls-min 1.2`), `h2` and `http/1.1` by ALPN, a checkout over `h2`, the in-process
//! simulator's webhook reaching the server over HTTPS, and certificates that cannot be used
//! refused with exit 2 naming the file. The test certificates are in `tests/fixtures/tls/`.

use crate::helpers::{eventually, spawn_app};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::client::TlsStream;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn tls_args() -> Vec<String> {
    vec![
        "--tls-cert".into(),
        fixture("cert.pem").display().to_string(),
        "--tls-key".into(),
        fixture("key.pem").display().to_string(),
    ]
}

/// A client trusting the test CA, offering `alpn`, speaking only `versions`.
fn client_config(
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture("ca.pem")).expect("ca.pem") {
        roots.add(cert.expect("ca cert")).expect("add the CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// An HTTP/2 connection over TLS.
struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    async fn open(stream: TlsStream<tokio::net::TcpStream>) -> Self {
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(connection);
        Self { sender }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> (u16, Value) {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("https://127.0.0.1{path}"))
            .header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        self.sender.ready().await.expect("ready");
        let response = self.sender.send_request(request).await.expect("send");
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_only_by_default_with_h2_and_http11_by_alpn_and_a_checkout_over_h2() {
    let args = tls_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let app = spawn_app(&args);

    // TLS 1.3 with ALPN h2: the server picks h2.
    let stream = connect(
        app.addr,
        client_config(&[b"h2", b"http/1.1"], &[&rustls::version::TLS13]),
    )
    .await
    .expect("TLS 1.3 handshake");
    let (_, session) = stream.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));

    // A checkout over h2, then the stock it left.
    let mut h2 = H2::open(stream).await;
    let (status, _) = h2
        .send(
            "PUT",
            "/v1/products/TLS-1",
            None,
            r#"{"name":"Over TLS","price_cents":500,"currency":"EUR","stock":3}"#,
        )
        .await;
    assert!(status == 200 || status == 201, "PUT product: {status}");
    let checkout =
        r#"{"items":[{"sku":"TLS-1","quantity":1}],"customer_id":"c-1","payment_token":"tok_ok"}"#;
    let (status, order) = h2
        .send("POST", "/v1/checkout", Some("tls-key-1"), checkout)
        .await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["status"], "paid", "{order}");
    let (status, replay) = h2
        .send("POST", "/v1/checkout", Some("tls-key-1"), checkout)
        .await;
    assert_eq!(status, 201);
    assert_eq!(replay["order_id"], order["order_id"]);
    let (_, product) = h2.send("GET", "/v1/products/TLS-1", None, "").await;
    assert_eq!(product["available"], 2, "{product}");
    assert_eq!(product["sold"], 1, "{product}");

    // tok_pending: the in-process simulator's webhook reaches the server over HTTPS.
    let pending = r#"{"items":[{"sku":"TLS-1","quantity":1}],"customer_id":"c-2","payment_token":"tok_pending"}"#;
    let (status, order) = h2
        .send("POST", "/v1/checkout", Some("tls-key-2"), pending)
        .await;
    assert_eq!(status, 202, "{order}");
    let path = format!(
        "/v1/orders/{}",
        order["order_id"].as_str().expect("order_id")
    );
    eventually(
        "the webhook over HTTPS pays the order",
        Duration::from_secs(20),
        async || h2.send("GET", &path, None, "").await.1["status"] == "paid",
    )
    .await;

    // ALPN http/1.1 only: the server speaks HTTP/1.1.
    let stream = connect(
        app.addr,
        client_config(&[b"http/1.1"], &[&rustls::version::TLS13]),
    )
    .await
    .expect("TLS 1.3 handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1 handshake");
    tokio::spawn(connection);
    let response = sender
        .send_request(
            hyper::Request::get("/healthz")
                .header("host", "127.0.0.1")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("GET /healthz over HTTP/1.1 and TLS");
    assert_eq!(response.status(), 200);

    // TLS 1.2 is refused by default.
    let refused = connect(
        app.addr,
        client_config(&[b"h2"], &[&rustls::version::TLS12]),
    )
    .await;
    assert!(
        refused.is_err(),
        "a TLS 1.2-only client must be refused by default"
    );

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = app.client();
    assert!(plain.try_send("GET", "/healthz", &[], "").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_min_1_2_accepts_a_tls12_client() {
    let mut args = tls_args();
    args.extend(["--tls-min".to_owned(), "1.2".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let app = spawn_app(&args);
    let stream = connect(
        app.addr,
        client_config(&[b"h2"], &[&rustls::version::TLS12]),
    )
    .await
    .expect("TLS 1.2 handshake with --tls-min 1.2");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let mut h2 = H2::open(stream).await;
    let (status, body) = h2.send("GET", "/healthz", None, "").await;
    assert_eq!(status, 200, "{body}");
}

#[test]
fn unusable_certificates_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "nothing here\n").expect("write");
    let missing = dir.path().join("missing.pem");
    let cert = fixture("cert.pem");
    let key = fixture("key.pem");
    let other_key = fixture("other-key.pem");
    // A device named by mistake is refused, not read forever.
    let device = PathBuf::from("/dev/zero");
    for (cert, key, named) in [
        (&garbage, &key, &garbage),
        (&empty, &key, &empty),
        (&missing, &key, &missing),
        (&cert, &empty, &empty),
        (&cert, &garbage, &garbage),
        (&cert, &other_key, &other_key),
        (&device, &key, &device),
        (&cert, &device, &device),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_turnstile"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .output()
            .expect("run turnstile");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{cert:?} {key:?}: {stderr}");
        assert!(
            stderr.contains(&named.display().to_string()),
            "the message must name {named:?}: {stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "it must not have started listening"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_unfinished_tls_handshakes() {
    // Proves: clients that connect to the TLS port and never finish their handshake (one sends
    // nothing, one half a ClientHello) do not hold the shutdown for the slow-client timeout:
    // SIGTERM ends the server promptly, with exit 0.
    use tokio::io::AsyncWriteExt;
    let mut args = tls_args();
    args.extend(["--slow-client-timeout".to_owned(), "60s".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut app = spawn_app(&args);
    let silent = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let mut partial = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    partial
        .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        .await
        .expect("send half a ClientHello");
    // A handshake that finishes after them: the accept loop has taken both.
    let stream = connect(
        app.addr,
        client_config(&[b"h2"], &[&rustls::version::TLS13]),
    )
    .await
    .expect("TLS 1.3 handshake");
    drop(stream);
    let started = std::time::Instant::now();
    let code = tokio::task::spawn_blocking(move || app.terminate().code())
        .await
        .expect("wait for the server");
    let took = started.elapsed();
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM took {took:?} with unfinished TLS handshakes open"
    );
    drop((silent, partial));
}
