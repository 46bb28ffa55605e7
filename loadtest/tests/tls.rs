//! The harness's TLS client against a real TLS server (rustls with hyper, HTTP/2 and HTTP/1.1 by
//! ALPN) whose certificates the `openssl` binary makes: h2 and http/1.1, `--insecure`, `--cacert`
//! with a CA or a self-signed certificate, and the refusals (unknown issuer, no h2).

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use loadtest::client::{Connection, Endpoint, Request};
use loadtest::target::Target;
use loadtest::tls::Trust;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Runs `openssl` with `args` in `dir`; a failure panics with its output.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl (needed by this test): {e}"));
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Certificates for 127.0.0.1 and localhost, in a temporary directory.
struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let san = "subjectAltName=IP:127.0.0.1,DNS:localhost";
        // Self-signed as `openssl req -x509` makes it by default (CA:TRUE), as wrk/run.sh does.
        openssl(
            dir.path(),
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "self.key",
                    "-out",
                    "self.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    san,
                ],
            ]
            .concat(),
        );
        // Self-signed end-entity certificate (CA:FALSE): usable as its own trust anchor.
        openssl(
            dir.path(),
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "leaf-self.key",
                    "-out",
                    "leaf-self.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    san,
                    "-addext",
                    "basicConstraints=critical,CA:FALSE",
                ],
            ]
            .concat(),
        );
        // A CA, and a server certificate it signed.
        openssl(
            dir.path(),
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=loadtest test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            dir.path(),
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            dir.path().join("server.ext"),
            format!("{san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("write server.ext");
        openssl(
            dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        // A certificate of the same CA for another name.
        openssl(
            dir.path(),
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "other.key",
                    "-out",
                    "other.csr",
                    "-subj",
                    "/CN=elsewhere.test",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            dir.path().join("other.ext"),
            "subjectAltName=DNS:elsewhere.test\nbasicConstraints=critical,CA:FALSE\n",
        )
        .expect("write other.ext");
        openssl(
            dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                "other.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "other.pem",
                "-days",
                "2",
                "-extfile",
                "other.ext",
            ],
        );
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A TLS server on 127.0.0.1 offering `alpn`, answering every request with its HTTP version and
/// the authority the client named (`:authority` or `Host`).
async fn serve_tls(certificate: &Path, key: &Path, alpn: &[&[u8]]) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .expect("certificate file")
        .collect::<Result<_, _>>()
        .expect("certificate PEM");
    let key = PrivateKeyDer::from_pem_file(key).expect("key PEM");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server certificate and key");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                let service =
                    hyper::service::service_fn(|request: hyper::Request<Incoming>| async move {
                        let authority = request
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                request
                                    .headers()
                                    .get("host")
                                    .and_then(|h| h.to_str().ok())
                                    .map(str::to_owned)
                            })
                            .unwrap_or_default();
                        let body = format!("{:?} {authority}", request.version());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    });
                let io = TokioIo::new(stream);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    addr
}

/// GET /healthz through the harness's client: the answer's body, or the error.
async fn get(target: &str, http2: bool, trust: Trust) -> Result<String, String> {
    let target: Target = target.parse().map_err(|e| format!("{e}"))?;
    let addr = target.resolve().await?;
    let endpoint = Endpoint::for_target(&target, addr, http2, &trust)?;
    assert!(endpoint.is_tls());
    let mut connection = Connection::to(endpoint);
    let request = Request {
        method: "GET",
        path: "/healthz".into(),
        key: None,
        body: String::new(),
    };
    // Twice: the second request reuses the kept-alive connection.
    connection.expect(&request, 200).await?;
    let answer = connection.expect(&request, 200).await?;
    Ok(String::from_utf8_lossy(&answer.body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_with_insecure_against_a_self_signed_certificate() {
    let certificates = Certificates::new();
    let addr = serve_tls(
        &certificates.path("self.pem"),
        &certificates.path("self.key"),
        &[b"h2", b"http/1.1"],
    )
    .await;
    let body = get(
        &format!("https://127.0.0.1:{}/", addr.port()),
        true,
        Trust::AnyCertificate,
    )
    .await
    .expect("h2 request");
    assert_eq!(body, format!("HTTP/2.0 127.0.0.1:{}", addr.port()));
    // The same server over HTTP/1.1 when --http2 is not given.
    let body = get(
        &format!("https://127.0.0.1:{}", addr.port()),
        false,
        Trust::AnyCertificate,
    )
    .await
    .expect("http/1.1 request");
    assert_eq!(body, format!("HTTP/1.1 127.0.0.1:{}", addr.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cacert_trusts_a_ca_and_the_name_is_checked_and_sent() {
    let certificates = Certificates::new();
    let addr = serve_tls(
        &certificates.path("server.pem"),
        &certificates.path("server.key"),
        &[b"h2", b"http/1.1"],
    )
    .await;
    let ca = Trust::CaFile(certificates.path("ca.pem"));
    for (http2, version) in [(true, "HTTP/2.0"), (false, "HTTP/1.1")] {
        // By name: resolved, sent as SNI (the certificate names localhost) and as the authority.
        let body = get(
            &format!("https://localhost:{}", addr.port()),
            http2,
            ca.clone(),
        )
        .await
        .expect("request by name");
        assert_eq!(body, format!("{version} localhost:{}", addr.port()));
        let body = get(
            &format!("https://127.0.0.1:{}", addr.port()),
            http2,
            ca.clone(),
        )
        .await
        .expect("request by IP");
        assert_eq!(body, format!("{version} 127.0.0.1:{}", addr.port()));
    }
    // openssl's default self-signed certificate (CA:TRUE) cannot be trusted as a server's own
    // certificate: webpki refuses a CA certificate as an end entity (README says so).
    let addr_ca_true = serve_tls(
        &certificates.path("self.pem"),
        &certificates.path("self.key"),
        &[b"h2"],
    )
    .await;
    let error = get(
        &format!("https://127.0.0.1:{}", addr_ca_true.port()),
        true,
        Trust::CaFile(certificates.path("self.pem")),
    )
    .await
    .expect_err("a CA:TRUE certificate as its own anchor");
    assert!(error.contains("CaUsedAsEndEntity"), "{error}");
    // A self-signed end-entity certificate is its own trust anchor.
    let addr = serve_tls(
        &certificates.path("leaf-self.pem"),
        &certificates.path("leaf-self.key"),
        &[b"h2"],
    )
    .await;
    let body = get(
        &format!("https://127.0.0.1:{}", addr.port()),
        true,
        Trust::CaFile(certificates.path("leaf-self.pem")),
    )
    .await
    .expect("self-signed leaf as --cacert");
    assert_eq!(body, format!("HTTP/2.0 127.0.0.1:{}", addr.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_issuer_or_a_server_without_h2_is_refused() {
    let certificates = Certificates::new();
    let addr = serve_tls(
        &certificates.path("server.pem"),
        &certificates.path("server.key"),
        &[b"http/1.1"],
    )
    .await;
    let target = format!("https://127.0.0.1:{}", addr.port());
    // Neither the system roots nor another CA vouch for the test CA's certificate.
    for trust in [
        Trust::SystemRoots,
        Trust::CaFile(certificates.path("leaf-self.pem")),
    ] {
        let error = get(&target, false, trust.clone())
            .await
            .expect_err("an unknown issuer");
        assert!(
            error.contains("TLS handshake") && error.contains("certificate"),
            "{trust:?}: {error}"
        );
    }
    // --http2 against a server that speaks only http/1.1: no silent fallback.
    let error = get(&target, true, Trust::AnyCertificate)
        .await
        .expect_err("no h2");
    assert!(error.contains("TLS"), "{error}");
    // The wrong name: a certificate of the trusted CA, but for elsewhere.test.
    let addr = serve_tls(
        &certificates.path("other.pem"),
        &certificates.path("other.key"),
        &[b"http/1.1"],
    )
    .await;
    let error = get(
        &format!("https://127.0.0.1:{}", addr.port()),
        false,
        Trust::CaFile(certificates.path("ca.pem")),
    )
    .await
    .expect_err("a certificate for elsewhere.test was accepted for 127.0.0.1");
    assert!(error.contains("certificate"), "{error}");
}
