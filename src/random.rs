//! Unguessable tokens (cart ids, the default webhook secret) from the kernel's random source.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

/// `n` bytes from `/dev/urandom`. Falls back to a hash of the time and process id only if the
/// device cannot be read (never seen on Linux; logged).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if let Err(error) = read {
        tracing::warn!(%error, "/dev/urandom unreadable; deriving randomness from the clock");
        let mut seed = Sha256::new();
        seed.update(crate::time::now_ms().to_le_bytes());
        seed.update(std::process::id().to_le_bytes());
        let digest = seed.finalize();
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = digest[i % digest.len()];
        }
    }
    bytes
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

impl Default for TokenGenerator {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&random_bytes(32));
        Self {
            secret,
            counter: AtomicU64::new(0),
        }
    }
}

impl TokenGenerator {
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
    fn tokens_differ_and_have_the_shape() {
        let generator = TokenGenerator::default();
        let a = generator.next("cart_");
        let b = generator.next("cart_");
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 32);
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
