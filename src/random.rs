//! Unguessable tokens (cart ids, the default webhook secret) from the kernel's random source
//! (`getrandom`). There is no fallback: a secret derived from the time and the pid could be
//! guessed, so without entropy the server does not start (exit 1).

use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};

/// The kernel's random source failed.
#[derive(Debug, thiserror::Error)]
#[error("the kernel's random source failed: {0}")]
pub struct RandomError(String);

/// `n` bytes from the kernel's random source.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, RandomError> {
    let mut bytes = vec![0u8; n];
    getrandom::getrandom(&mut bytes).map_err(|e| RandomError(e.to_string()))?;
    Ok(bytes)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 15)] as char);
    }
    out
}

/// Makes distinct, unguessable tokens cheaply: SHA-256 of a random process secret and a counter.
pub struct TokenGenerator {
    secret: [u8; 32],
    counter: AtomicU64,
}

impl TokenGenerator {
    /// A generator with a fresh random secret.
    pub fn new() -> Result<Self, RandomError> {
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&random_bytes(32)?);
        Ok(Self {
            secret,
            counter: AtomicU64::new(0),
        })
    }

    /// A new token: `prefix` and 32 hex characters (128 bits).
    pub fn next(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut hasher = Sha256::new();
        hasher.update(self.secret);
        hasher.update(n.to_le_bytes());
        format!("{prefix}{}", hex(&hasher.finalize()[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_come_from_the_kernel_and_differ() {
        // Proves: two draws of 32 bytes differ (a clock-derived fallback would not be needed to
        // make them equal; there is none).
        let a = random_bytes(32).unwrap();
        let b = random_bytes(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn tokens_differ_and_have_the_shape() {
        let generator = TokenGenerator::new().unwrap();
        let a = generator.next("cart_");
        let b = generator.next("cart_");
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 32);
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
