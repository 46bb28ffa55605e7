//! The TLS client configuration for `https://` targets: rustls with the ring provider (the
//! workspace's one TLS stack, shared with the server; no OpenSSL), ALPN `h2` with `--http2` and
//! `http/1.1` otherwise, and one of three trusts: the system roots, a PEM file (`--cacert`), or any
//! certificate (`--insecure`, as `curl -k`).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;

/// Which server certificates the harness accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Those that chain to the system's root certificates.
    SystemRoots,
    /// Those that chain to a certificate of this PEM file (a CA, or the server's own).
    CaFile(PathBuf),
    /// Any certificate, for self-signed test servers. The handshake signatures are still
    /// verified, so the server holds the key of the certificate it shows.
    AnyCertificate,
}

/// The ALPN protocol the harness offers: `h2` or `http/1.1`, never both, so that what is
/// measured is what was asked for.
pub fn alpn(http2: bool) -> &'static [u8] {
    if http2 {
        b"h2"
    } else {
        b"http/1.1"
    }
}

/// A client configuration for `trust`, offering one ALPN protocol (see [`alpn`]).
pub fn client_config(trust: &Trust, http2: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?;
    let mut config = match trust {
        Trust::AnyCertificate => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth(),
        Trust::CaFile(path) => builder
            .with_root_certificates(roots_from_pem(path)?)
            .with_no_client_auth(),
        Trust::SystemRoots => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn(http2).to_vec()];
    Ok(Arc::new(config))
}

/// The certificates of a PEM file as trust anchors.
fn roots_from_pem(path: &PathBuf) -> Result<RootCertStore, String> {
    let name = path.display();
    let mut roots = RootCertStore::empty();
    let certificates =
        CertificateDer::pem_file_iter(path).map_err(|e| format!("--cacert {name}: {e}"))?;
    for certificate in certificates {
        let certificate = certificate.map_err(|e| format!("--cacert {name}: {e}"))?;
        roots
            .add(certificate)
            .map_err(|e| format!("--cacert {name}: not a usable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "--cacert {name}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(roots)
}

/// The system's root certificates (the OpenSSL directories and files on Linux).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(String::new, |e| format!(" ({e})"));
        return Err(format!(
            "no system root certificates found{why}: trust the server's certificate with \
             --cacert FILE, or accept any certificate with --insecure"
        ));
    }
    Ok(roots)
}

/// The TLS server name for a target host: a DNS name, or an IP address (matched against the
/// certificate's IP subject alternative names).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))
}

/// Accepts any certificate chain (`--insecure`) but checks the handshake signatures with the
/// provider's algorithms, as `curl -k` does.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_trust_builds_a_config_with_one_alpn_protocol() {
        let config = client_config(&Trust::AnyCertificate, true).expect("insecure config");
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        let config = client_config(&Trust::AnyCertificate, false).expect("insecure config");
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn a_cacert_that_is_missing_or_not_pem_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let error = client_config(&Trust::CaFile(missing.clone()), false).expect_err("missing");
        assert!(error.contains("missing.pem"), "{error}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let error = client_config(&Trust::CaFile(garbage), false).expect_err("garbage");
        assert!(
            error.contains("garbage.pem") && error.contains("no certificate"),
            "{error}"
        );
    }

    #[test]
    fn ips_and_names_are_server_names() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("localhost"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("not a name").is_err());
    }
}
