//! Watches the bytes a client sends, without parsing HTTP for hyper (hyper does that), for two
//! things, at the cost of two vectorised byte searches per read:
//!
//! - to know when the first request has begun (a line feed, or as many bytes as the HTTP/2
//!   preface), so the connection's first deadline can be lifted: from there hyper's own timers
//!   bound the rest (`header_read_timeout` for an HTTP/1 head, keep-alive pings for HTTP/2);
//! - to let a DEL byte (0x7f) in an `Idempotency-Key` value reach the handler, which answers it
//!   with the JSON `400 invalid_request` every other bad key gets.
//!
//! Why the second: httparse refuses a DEL anywhere in a header value, and hyper then answers the
//! whole request with a bare `400` and no body before any handler runs. Neither offers an option
//! to accept the byte; the only related one, `ignore_invalid_headers`, silently drops every
//! malformed header line, and dropping a malformed `Content-Length` or `Transfer-Encoding` line
//! is how request smuggling starts, so it is not used. Instead a DEL in a line that starts with
//! `Idempotency-Key:` becomes 0xFF: an obs-text byte, which httparse accepts and
//! `HeaderValue::to_str` refuses, so the checkout handler answers it exactly as it answers any
//! other byte outside visible ASCII.
//!
//! Only reads that hold a DEL are looked at further (the line it sits in, back to the last line
//! feed, kept across reads). A body is not told apart from a head: a DEL in a body line starting
//! with `Idempotency-Key:` would change too, but no body the API takes can hold one (JSON has no
//! raw line feed inside a string, and no token starts with a letter there), and such a request was
//! refused either way. HTTP/2 connections (the preface) are left alone.

/// The lower-cased start of the header line whose DEL bytes are replaced.
const KEY_PREFIX: &[u8] = b"idempotency-key:";

/// The byte a DEL in an `Idempotency-Key` value becomes (see the module's documentation).
const DEL_REPLACEMENT: u8 = 0xFF;

/// The HTTP/2 connection preface's length: hyper-util has decided the protocol by then.
const PREFACE_BYTES: usize = 24;

/// The start of the HTTP/2 connection preface.
const PREFACE_START: &[u8] = b"PRI ";

/// The most of the current line kept across reads: enough for the key prefix.
const LINE_KEPT_MAX: usize = KEY_PREFIX.len();

/// The watcher of one connection.
#[derive(Debug)]
pub(super) struct RequestHeads {
    /// Bytes received before the first request began, while counting.
    received: usize,
    first_request_arrived: bool,
    /// The first bytes of the current line (up to [`LINE_KEPT_MAX`]), for a DEL in a later read.
    line_start: Vec<u8>,
    /// HTTP/2: nothing more to watch.
    stopped: bool,
}

impl RequestHeads {
    pub(super) fn new() -> Self {
        Self {
            received: 0,
            first_request_arrived: false,
            line_start: Vec::with_capacity(LINE_KEPT_MAX),
            stopped: false,
        }
    }

    /// Whether the first request has begun (see the module's documentation).
    pub(super) fn first_request_arrived(&self) -> bool {
        self.first_request_arrived
    }

    /// Watches `bytes`, the next bytes read from the client, replacing DEL bytes of
    /// `Idempotency-Key` lines.
    pub(super) fn scan(&mut self, bytes: &mut [u8]) {
        if self.stopped || bytes.is_empty() {
            return;
        }
        if !self.first_request_arrived {
            if self.received == 0 && bytes.starts_with(PREFACE_START) {
                self.stopped = true;
                self.first_request_arrived = true;
                return;
            }
            self.received += bytes.len();
            self.first_request_arrived = self.received >= PREFACE_BYTES || bytes.contains(&b'\n');
        }
        if bytes.contains(&0x7f) {
            self.replace_key_dels(bytes);
        }
        self.keep_line_start(bytes);
    }

    /// Replaces every DEL that sits in a line starting with `Idempotency-Key:`.
    fn replace_key_dels(&self, bytes: &mut [u8]) {
        for at in 0..bytes.len() {
            if bytes[at] != 0x7f {
                continue;
            }
            let in_key = match bytes[..at].iter().rposition(|&b| b == b'\n') {
                Some(feed) => starts_with_key(&bytes[feed + 1..at]),
                // The line began in an earlier read.
                None => {
                    let mut line = self.line_start.clone();
                    line.extend_from_slice(&bytes[..at.min(LINE_KEPT_MAX)]);
                    starts_with_key(&line)
                }
            };
            if in_key {
                bytes[at] = DEL_REPLACEMENT;
            }
        }
    }

    /// Keeps the start of the line the read ends in.
    fn keep_line_start(&mut self, bytes: &[u8]) {
        let rest = match bytes.iter().rposition(|&b| b == b'\n') {
            Some(feed) => {
                self.line_start.clear();
                &bytes[feed + 1..]
            }
            None => bytes,
        };
        let room = LINE_KEPT_MAX.saturating_sub(self.line_start.len());
        self.line_start
            .extend_from_slice(&rest[..rest.len().min(room)]);
    }
}

/// True if `line` starts with `Idempotency-Key:` in any case.
fn starts_with_key(line: &[u8]) -> bool {
    line.len() >= KEY_PREFIX.len() && line[..KEY_PREFIX.len()].eq_ignore_ascii_case(KEY_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` as successive reads; returns the bytes as hyper would see them and whether
    /// the first request had begun after each read.
    fn scanned(chunks: &[&[u8]]) -> (Vec<u8>, Vec<bool>) {
        let mut heads = RequestHeads::new();
        let mut out = Vec::new();
        let mut arrived = Vec::new();
        for chunk in chunks {
            let mut bytes = chunk.to_vec();
            heads.scan(&mut bytes);
            out.extend_from_slice(&bytes);
            arrived.push(heads.first_request_arrived());
        }
        (out, arrived)
    }

    #[test]
    fn the_first_request_begins_with_a_line_or_a_prefaces_worth_of_bytes() {
        // Proves: the deadline lifts once a request line ends, or once hyper-util can decide the
        // protocol; a few bytes without a line feed do not lift it.
        assert_eq!(
            scanned(&[b"GET /he", b"althz HTTP/1.1\r\n"]).1,
            vec![false, true]
        );
        assert_eq!(scanned(&[b"G"]).1, vec![false]);
        assert_eq!(scanned(&[&[b'x'; PREFACE_BYTES]]).1, vec![true]);
    }

    #[test]
    fn the_http2_preface_counts_as_the_first_request_and_is_left_alone() {
        // Proves: an HTTP/2 connection lifts the deadline and its bytes are never changed.
        let frames: &[u8] = b"\nidempotency-key:\x7f";
        let (out, arrived) = scanned(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", frames]);
        assert_eq!(arrived, vec![true, true]);
        assert!(out.ends_with(frames));
    }

    #[test]
    fn a_del_in_an_idempotency_key_value_becomes_obs_text_and_nothing_else_changes() {
        // Proves: only the DEL of the key line changes, in any case and across reads; a DEL in
        // another header or in a body stays.
        let head: &[u8] =
            b"POST /v1/checkout HTTP/1.1\r\nX-Other: a\x7fb\r\nIDEMPOTENCY-Key: ab\x7fc\r\n\r\n{\"a\":\"\x7f\"}";
        let (out, _) = scanned(&[head]);
        let mut expected = head.to_vec();
        let key_del = head
            .windows(3)
            .position(|w| w == b"b\x7fc")
            .map(|p| p + 1)
            .unwrap();
        expected[key_del] = DEL_REPLACEMENT;
        assert_eq!(out, expected);
        for split in 1..head.len() {
            let (out, _) = scanned(&[&head[..split], &head[split..]]);
            assert_eq!(out, expected, "split at {split}");
        }
    }
}
