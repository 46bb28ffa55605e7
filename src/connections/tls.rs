//! HTTPS for the listener: rustls with the ring provider (no OpenSSL to install), TLS 1.3 only
//! unless `--tls-min 1.2`, and ALPN offering `h2` then `http/1.1` (hyper-util's automatic builder
//! then serves whichever the client chose).
//!
//! The certificate chain and key are read once at start-up; a PEM that does not parse, a file with
//! no certificate or no key, or a key that does not belong to the certificate stops the server with
//! exit 2 and the file named.

use crate::config::{TlsConfig, TlsMin};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// TLS sessions the server remembers for resumption (a few hundred bytes each).
const SESSION_CACHE_ENTRIES: usize = 16 * 1024;

/// Why the TLS configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("--tls-cert {}: {reason}", path.display())]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file could not be read or holds no private key.
    #[error("--tls-key {}: {reason}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key does not belong to the certificate, or rustls refused the pair.
    #[error("--tls-key {} does not fit --tls-cert {}: {reason}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// PEM files larger than this are refused (a certificate chain is a few kilobytes): a device or a
/// FIFO named by mistake would otherwise be read forever.
const PEM_BYTES_MAX: u64 = 1 << 20;

/// Why `path` cannot be a PEM file: not a regular file, or too large.
fn not_a_pem_file(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Err(e) => Some(e.to_string()),
        Ok(m) if !m.is_file() => Some("not a regular file".into()),
        Ok(m) if m.len() > PEM_BYTES_MAX => Some(format!("larger than {PEM_BYTES_MAX} bytes")),
        Ok(_) => None,
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |reason: String| TlsError::Cert {
        path: path.to_owned(),
        reason,
    };
    if let Some(reason) = not_a_pem_file(path) {
        return Err(error(reason));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(pem_reason(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(pem_reason(&e)))?;
    if certs.is_empty() {
        return Err(error(
            "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    if let Some(reason) = not_a_pem_file(path) {
        return Err(TlsError::Key {
            path: path.to_owned(),
            reason,
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_owned(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key in it (expected PKCS#8, PKCS#1 or SEC1: -----BEGIN PRIVATE KEY-----)"
                    .into()
            }
            other => pem_reason(&other),
        },
    })
}

fn pem_reason(error: &rustls::pki_types::pem::Error) -> String {
    match error {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// The server's TLS configuration from the files, checked.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(&tls.cert)?;
    let key = read_key(&tls.key)?;
    let mismatch = |reason: String| TlsError::Mismatch {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        reason,
    };
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min {
        TlsMin::V1_3 => &[&rustls::version::TLS13],
        TlsMin::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // `with_single_cert` checks that the key is usable and belongs to the chain's first certificate.
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => mismatch(
                "the private key does not belong to the certificate (the first one in the file)"
                    .into(),
            ),
            other => mismatch(other.to_string()),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    Ok(Arc::new(config))
}
