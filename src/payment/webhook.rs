//! `Turnstile-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a signature's time may be from now, in seconds (API.md).
pub const TOLERANCE_SECONDS: i64 = 300;

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value signing `body` at `timestamp`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", crate::random::hex(&tag))
}

/// Why a signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is missing or not in the documented shape.
    #[error("the Turnstile-Signature header is missing or malformed")]
    Malformed,
    /// The timestamp is more than 300 s from now.
    #[error("the signature's timestamp is more than 300 s from now")]
    Stale,
    /// The HMAC does not match.
    #[error("the signature does not match the body")]
    Mismatch,
}

fn unhex(raw: &str) -> Option<Vec<u8>> {
    if raw.len() % 2 != 0 {
        return None;
    }
    (0..raw.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(raw.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks a header against the raw body at `now_seconds`. The comparison is constant-time.
pub fn verify(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now_seconds: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Malformed)?;
    let (mut timestamp, mut tags) = (None, Vec::new());
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => tags.push(unhex(value).ok_or(SignatureError::Malformed)?),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if tags.is_empty() {
        return Err(SignatureError::Malformed);
    }
    // Checked: a timestamp near the ends of i64 is stale, not an overflow (a panic per request).
    if now_seconds
        .checked_sub(timestamp)
        .is_none_or(|skew| skew.unsigned_abs() > TOLERANCE_SECONDS as u64)
    {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, timestamp, body);
    if tags
        .iter()
        .any(|tag| expected.clone().verify_slice(tag).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let header = sign(b"secret", 1_000, b"{\"a\":1}");
        assert_eq!(
            verify(b"secret", Some(&header), b"{\"a\":1}", 1_100),
            Ok(())
        );
        assert_eq!(
            verify(b"secret", Some(&header), b"{\"a\":2}", 1_100),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", Some(&header), b"{\"a\":1}", 1_100),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"secret", Some(&header), b"{\"a\":1}", 1_301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(b"secret", Some("t=1,v1=zz"), b"", 1),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(b"secret", None, b"", 1),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn a_timestamp_at_the_ends_of_i64_is_stale_not_an_overflow() {
        for t in [i64::MIN, i64::MIN + 1, i64::MAX] {
            let header = format!("t={t},v1=00");
            assert_eq!(
                verify(b"secret", Some(&header), b"", 1_700_000_000),
                Err(SignatureError::Stale),
                "{t}"
            );
        }
    }
}
