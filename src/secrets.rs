//! No secret is written to a log or an error (API.md, "Operations desk"): one mechanism for
//! every path a text takes out of the process.
//!
//! At start the binary registers every secret of its command line, environment and config file
//! ([`register`]: the passwords in `--mysql-url`, `--redis-url` and `--amqp-url`, raw and
//! percent-decoded; `--webhook-secret`, `--cluster-secret`, `--admin-token`). From then on:
//! - every log line passes through [`Scrubbing`], the log's writer, which replaces each secret
//!   with `***` before the bytes are written;
//! - every HTTP error body and `/readyz` check passes through [`scrub`] (`api::ApiError`,
//!   `api::ops`).
//!
//! Messages written here already avoid secrets (a URL is never shown); this is the net under
//! them, for the text a service sends back (a Redis server that refuses `HELLO 3 AUTH default
//! <password>` repeats the password in its error) or a library puts together. A secret shorter
//! than [`SECRET_CHARS_MIN`] characters is not registered: replacing every occurrence of, say,
//! `ab` would garble the log, and a password that short is not one.

use std::borrow::Cow;
use std::sync::RwLock;

/// The shortest secret registered.
pub const SECRET_CHARS_MIN: usize = 4;

/// What a secret is replaced with.
pub const REDACTED: &str = "***";

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers `secret`: from now on it is replaced in every log line and error body.
pub fn register(secret: &str) {
    if secret.chars().count() < SECRET_CHARS_MIN {
        return;
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !secrets.iter().any(|known| known == secret) {
        secrets.push(secret.to_owned());
        // The longest first: a secret that holds another is replaced whole.
        secrets.sort_by_key(|known| std::cmp::Reverse(known.len()));
    }
}

/// Registers the password (and the user's part after `:`) of every URL in `urls` (one URL, or
/// several separated by commas, as a Redis Cluster's nodes), as written and percent-decoded.
pub fn register_url(urls: &str) {
    for url in urls.split(',') {
        let Some((_, rest)) = url.trim().split_once("://") else {
            continue;
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let Some((credentials, _)) = authority.rsplit_once('@') else {
            continue;
        };
        if let Some((_, password)) = credentials.split_once(':') {
            register(password);
            register(&percent_decoded(password));
        }
    }
    // A URL's query may carry a password too (`?password=...`).
    for url in urls.split(',') {
        if let Some((_, query)) = url.split_once('?') {
            for pair in query.split('&') {
                if let Some((key, value)) = pair.split_once('=') {
                    if key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("pass") {
                        register(value);
                        register(&percent_decoded(value));
                    }
                }
            }
        }
    }
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` with every registered secret replaced by [`REDACTED`].
pub fn scrub(text: &str) -> Cow<'_, str> {
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    if !secrets.iter().any(|secret| text.contains(secret.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_owned();
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), REDACTED);
        }
    }
    Cow::Owned(out)
}

/// A log writer that scrubs what it writes (the log writes one whole line per call).
pub struct Scrubbing<W>(pub W);

impl<W: std::io::Write> std::io::Write for Scrubbing<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(bytes) {
            Ok(text) => match scrub(text) {
                Cow::Borrowed(_) => self.0.write_all(bytes)?,
                Cow::Owned(clean) => self.0.write_all(clean.as_bytes())?,
            },
            // Not UTF-8: the secrets (UTF-8 text) are looked for in its lossy form.
            Err(_) => {
                let text = String::from_utf8_lossy(bytes);
                self.0.write_all(scrub(&text).as_bytes())?;
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passwords_of_urls_and_the_tokens_are_scrubbed_and_short_ones_are_not_registered() {
        register_url("redis://:Rd%40Pw-scrub-1@127.0.0.1:6379/0,redis://:other-scrub-2@h:1");
        register_url("amqp://user:amqp-scrub-3@host:5672/%2f");
        register_url("mysql://root@127.0.0.1/db?password=query-scrub-4");
        register("token-scrub-5");
        register("ab");
        let said = "AUTH default Rd@Pw-scrub-1 then Rd%40Pw-scrub-1, other-scrub-2, amqp-scrub-3, \
                    query-scrub-4, Bearer token-scrub-5, ab";
        let clean = scrub(said);
        for secret in [
            "Rd@Pw-scrub-1",
            "Rd%40Pw-scrub-1",
            "other-scrub-2",
            "amqp-scrub-3",
            "query-scrub-4",
            "token-scrub-5",
        ] {
            assert!(!clean.contains(secret), "{clean}");
        }
        assert!(clean.ends_with(", ab"), "{clean}");
        assert!(matches!(scrub("nothing secret here"), Cow::Borrowed(_)));
        let mut written = Vec::new();
        std::io::Write::write_all(&mut Scrubbing(&mut written), b"x token-scrub-5 y")
            .expect("write");
        assert_eq!(written, b"x *** y");
    }
}
