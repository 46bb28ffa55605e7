//! Follows the bytes a client sends over HTTP/1 from request head to request head, without
//! parsing HTTP for hyper (hyper does that), for two things:
//!
//! - to know when the first request head has arrived (or the HTTP/2 preface), so the
//!   connection's first deadline can be lifted;
//! - to let a DEL byte (0x7f) in an `Idempotency-Key` value reach the handler, which answers it
//!   with the JSON `400 invalid_request` every other bad key gets.
//!
//! Why the second: httparse refuses a DEL anywhere in a header value, and hyper then answers the
//! whole request with a bare `400` and no body before any handler runs. Neither offers an option
//! to accept the byte; the only related one, `ignore_invalid_headers`, silently drops every
//! malformed header line, and dropping a malformed `Content-Length` or `Transfer-Encoding` line
//! is how request smuggling starts, so it is not used. Instead a DEL inside the value of an
//! `Idempotency-Key` header line of an HTTP/1 request head is replaced by 0xFF: an obs-text byte,
//! which httparse accepts and `HeaderValue::to_str` refuses, so the checkout handler answers it
//! exactly as it answers any other byte outside visible ASCII. Only requests hyper would have
//! refused change; no framing header is touched, and no other byte.
//!
//! To tell heads from bodies on a keep-alive connection, the scanner follows request framing as
//! RFC 9112 §6 defines it for requests: a body is `Content-Length` bytes long, and absent without
//! that header. A head it cannot follow for sure (`Transfer-Encoding`, `Upgrade`, `CONNECT`, more
//! than one `Content-Length`, one that is not a plain number, a malformed line) ends the scanning
//! for the rest of the connection: hyper then refuses or serves those requests as it always did.

/// The request line of the HTTP/2 preface starts with this method and space.
const PREFACE_METHOD: &[u8] = b"PRI ";

/// The method whose request is followed by a tunnel instead of a body.
const CONNECT_METHOD: &[u8] = b"CONNECT ";

/// Past this many bytes of a request line, no method of interest can still match.
const READ_PAST_METHODS: usize = if PREFACE_METHOD.len() > CONNECT_METHOD.len() {
    PREFACE_METHOD.len()
} else {
    CONNECT_METHOD.len()
};

/// Field names the scanner cares about are at most this long ("transfer-encoding").
const NAME_BYTES_MAX: usize = 17;

/// The byte a DEL in an `Idempotency-Key` value becomes (see the module's documentation).
const DEL_REPLACEMENT: u8 = 0xFF;

/// What a header line's value means to the scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// `Idempotency-Key`: DEL bytes are replaced.
    IdempotencyKey,
    /// `Content-Length`: read to find where the body ends.
    ContentLength,
    /// Anything else.
    Other,
}

/// Where the scanner is in the connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Before a request line: empty lines may come first (RFC 9112 §2.2; hyper skips them).
    BeforeRequest,
    /// In the request line, `read` bytes in.
    RequestLine { read: usize },
    /// At the start of a header line, or of the empty line that ends the head.
    LineStart,
    /// In a field name; its first bytes (lower-cased) and its length so far.
    Name {
        kept: [u8; NAME_BYTES_MAX],
        len: usize,
    },
    /// In a field value.
    Value(Field),
    /// In a body, with this many bytes still to come.
    Body { remaining: u64 },
    /// Not following any more: HTTP/2, or framing the scanner does not follow.
    Stopped,
}

/// What the scanner has learned of the head being read.
#[derive(Debug, Default)]
struct Head {
    /// The request line starts with the HTTP/2 preface's method.
    is_preface: bool,
    /// The request line starts with `CONNECT `.
    is_connect: bool,
    /// The `Content-Length`, once one was read.
    content_length: Option<u64>,
    /// The digits of the `Content-Length` line being read (`None` before the first digit).
    digits: Option<u64>,
    /// Spaces or tabs followed the digits of the `Content-Length` line being read.
    digits_ended: bool,
    /// Something makes the body's end uncertain.
    unfollowable: bool,
}

/// The scanner of one connection.
#[derive(Debug)]
pub(super) struct RequestHeads {
    position: Position,
    head: Head,
    first_request_arrived: bool,
}

impl RequestHeads {
    pub(super) fn new() -> Self {
        Self {
            position: Position::BeforeRequest,
            head: Head::default(),
            first_request_arrived: false,
        }
    }

    /// Whether the first request head, or the HTTP/2 preface, has arrived.
    pub(super) fn first_request_arrived(&self) -> bool {
        self.first_request_arrived
    }

    /// Follows `bytes`, the next bytes read from the client, replacing DEL bytes of
    /// `Idempotency-Key` values in request heads.
    pub(super) fn scan(&mut self, bytes: &mut [u8]) {
        let mut at = 0;
        while at < bytes.len() {
            match self.position {
                Position::Stopped => return,
                Position::Body { remaining } => {
                    // Bodies are skipped whole, not byte by byte.
                    let left = (bytes.len() - at) as u64;
                    let skipped = remaining.min(left);
                    at += skipped as usize;
                    self.position = if skipped == remaining {
                        Position::BeforeRequest
                    } else {
                        Position::Body {
                            remaining: remaining - skipped,
                        }
                    };
                }
                Position::Value(Field::Other)
                | Position::RequestLine {
                    read: READ_PAST_METHODS..,
                } => {
                    // Most of a head is bytes nothing here looks at: on to the line's end.
                    match bytes[at..].iter().position(|&byte| byte == b'\n') {
                        Some(offset) => {
                            at += offset;
                            self.step(&mut bytes[at]);
                            at += 1;
                        }
                        None => at = bytes.len(),
                    }
                }
                _ => {
                    self.step(&mut bytes[at]);
                    at += 1;
                }
            }
        }
    }

    /// Follows one byte of a head (or of the empty lines before one).
    fn step(&mut self, byte: &mut u8) {
        self.position = match self.position {
            Position::BeforeRequest => match *byte {
                b'\r' | b'\n' => Position::BeforeRequest,
                _ => {
                    self.head = Head::default();
                    self.request_line_byte(0, *byte)
                }
            },
            Position::RequestLine { read } => self.request_line_byte(read, *byte),
            Position::LineStart => match *byte {
                // The CR of a line's CR LF; the LF decides.
                b'\r' => Position::LineStart,
                b'\n' => self.end_of_head(),
                first => {
                    let mut kept = [0; NAME_BYTES_MAX];
                    kept[0] = first.to_ascii_lowercase();
                    Position::Name { kept, len: 1 }
                }
            },
            Position::Name { mut kept, len } => match *byte {
                b':' => self.value_of(&kept[..len.min(NAME_BYTES_MAX)], len),
                // A line without a colon: hyper refuses the request.
                b'\n' => Position::Stopped,
                other => {
                    if len < NAME_BYTES_MAX {
                        kept[len] = other.to_ascii_lowercase();
                    }
                    Position::Name {
                        kept,
                        len: len.saturating_add(1),
                    }
                }
            },
            Position::Value(field) => match *byte {
                b'\n' => {
                    if field == Field::ContentLength {
                        self.end_of_content_length();
                    }
                    Position::LineStart
                }
                0x7f if field == Field::IdempotencyKey => {
                    *byte = DEL_REPLACEMENT;
                    Position::Value(field)
                }
                other => {
                    if field == Field::ContentLength {
                        self.content_length_byte(other);
                    }
                    Position::Value(field)
                }
            },
            Position::Body { .. } | Position::Stopped => self.position,
        };
    }

    /// One byte of the request line, `read` bytes into it.
    fn request_line_byte(&mut self, read: usize, byte: u8) -> Position {
        if byte == b'\n' {
            if self.head.is_preface {
                // HTTP/2: no HTTP/1 head follows.
                self.first_request_arrived = true;
                return Position::Stopped;
            }
            return Position::LineStart;
        }
        // A method is recognised when the line's first bytes spell it out, space included.
        let starts = |method: &[u8]| read < method.len() && method[read] == byte;
        if read == 0 {
            self.head.is_preface = starts(PREFACE_METHOD);
            self.head.is_connect = starts(CONNECT_METHOD);
        } else {
            self.head.is_preface &= read >= PREFACE_METHOD.len() || starts(PREFACE_METHOD);
            self.head.is_connect &= read >= CONNECT_METHOD.len() || starts(CONNECT_METHOD);
        }
        Position::RequestLine {
            read: read.saturating_add(1),
        }
    }

    /// The colon after a field name: what its value means.
    fn value_of(&mut self, kept: &[u8], len: usize) -> Position {
        let name = if len <= NAME_BYTES_MAX { kept } else { &[] };
        match name {
            b"idempotency-key" => Position::Value(Field::IdempotencyKey),
            b"content-length" => {
                if self.head.content_length.is_some() {
                    // A second one: hyper accepts it only if equal, and may read it differently.
                    self.head.unfollowable = true;
                }
                self.head.digits = None;
                self.head.digits_ended = false;
                Position::Value(Field::ContentLength)
            }
            b"transfer-encoding" | b"upgrade" => {
                self.head.unfollowable = true;
                Position::Value(Field::Other)
            }
            _ => Position::Value(Field::Other),
        }
    }

    /// One byte of a `Content-Length` value: optional spaces, digits, optional spaces.
    fn content_length_byte(&mut self, byte: u8) {
        let head = &mut self.head;
        match byte {
            b'0'..=b'9' if !head.digits_ended => {
                let digit = u64::from(byte - b'0');
                head.digits = head
                    .digits
                    .unwrap_or(0)
                    .checked_mul(10)
                    .and_then(|value| value.checked_add(digit));
                if head.digits.is_none() {
                    // Too large for any body: hyper refuses it.
                    head.unfollowable = true;
                }
            }
            b' ' | b'\t' => head.digits_ended = head.digits.is_some(),
            b'\r' => {}
            _ => head.unfollowable = true,
        }
    }

    /// The end of a `Content-Length` line.
    fn end_of_content_length(&mut self) {
        match self.head.digits {
            Some(length) if !self.head.unfollowable => self.head.content_length = Some(length),
            _ => self.head.unfollowable = true,
        }
    }

    /// The empty line that ends a head: where its body ends, if the scanner can tell.
    fn end_of_head(&mut self) -> Position {
        self.first_request_arrived = true;
        if self.head.unfollowable || self.head.is_connect {
            return Position::Stopped;
        }
        match self.head.content_length {
            Some(remaining) if remaining > 0 => Position::Body { remaining },
            _ => Position::BeforeRequest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `chunks` in order; what the scanner made of them, and whether the first request had
    /// arrived after each.
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
    fn the_first_head_arrives_with_its_empty_line_in_any_split() {
        // Proves: the first head counts as arrived exactly when its empty line is read, however the
        // bytes are split across reads, with CR LF or bare LF line ends.
        let head = b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 0..head.len() {
            let (first, second) = head.split_at(split);
            assert_eq!(scanned(&[first, second]).1, [false, true], "{split}");
        }
        assert_eq!(scanned(&[b"GET / HTTP/1.1\nHost: x\n\n"]).1, [true]);
    }

    #[test]
    fn a_partial_head_or_nothing_has_not_arrived() {
        // Proves: half a request line, a head without its empty line, empty lines alone, and half
        // the HTTP/2 preface do not count as a request.
        assert_eq!(scanned(&[b"POST /v1/chec"]).1, [false]);
        assert_eq!(scanned(&[b"GET / HTTP/1.1\r\nHost: x\r\n"]).1, [false]);
        assert_eq!(scanned(&[b"", b"\r\n\r\n"]).1, [false, false]);
        assert_eq!(scanned(&[b"PRI * HTTP/2"]).1, [false]);
    }

    #[test]
    fn the_http2_preface_counts_as_the_first_request_and_is_left_alone() {
        // Proves: the HTTP/2 preface counts as the first request and nothing after it is touched.
        let frames: &[u8] =
            b"\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00idempotency-key: \x7f\n";
        let (out, arrived) = scanned(&[b"PRI * HTTP/2.0\r\n", frames]);
        assert_eq!(arrived, [true, true]);
        assert_eq!(&out[16..], frames);
        // A method that only starts like the preface's is an HTTP/1 request line.
        assert_eq!(scanned(&[b"PRIX * HTTP/1.1\r\n"]).1, [false]);
    }

    #[test]
    fn a_del_in_an_idempotency_key_value_becomes_obs_text_and_nothing_else_changes() {
        // Proves: DEL bytes in an Idempotency-Key value become 0xFF in any split, and DEL bytes
        // anywhere else (other fields, names, the request line) stay.
        let head = b"POST /v1/checkout HTTP/1.1\r\nX-Other: a\x7fb\r\nIDEMPOTENCY-KEY: ab\x7fc\x7f\r\nContent-Length: 2\r\n\r\n{}";
        let expected = b"POST /v1/checkout HTTP/1.1\r\nX-Other: a\x7fb\r\nIDEMPOTENCY-KEY: ab\xffc\xff\r\nContent-Length: 2\r\n\r\n{}";
        for split in 0..head.len() {
            let (first, second) = head.split_at(split);
            assert_eq!(scanned(&[first, second]).0, expected, "{split}");
        }
        // Not in a name, nor in a value that only looks like the key.
        let untouched: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nIdempotency-Key\x7f: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Idempotency-Key: a\x7f\r\n\r\n",
            b"GET /Idempotency-Key:\x7f HTTP/1.1\r\n\r\n",
        ];
        for bytes in untouched {
            assert_eq!(scanned(&[bytes]).0, *bytes);
        }
    }

    #[test]
    fn bodies_are_skipped_and_the_next_head_is_followed() {
        // Proves: a Content-Length body is left as it is even when it looks like a key line, and the
        // next request's head is followed again.
        // A body that looks like a key line is left as it is; the next request's key is not.
        let body = b"\nIdempotency-Key: \x7f\n";
        let mut bytes = format!(
            "PUT /v1/products/a HTTP/1.1\r\nContent-Length:  {} \r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        let first_len = bytes.len();
        bytes.extend_from_slice(b"\r\nPOST /v1/checkout HTTP/1.1\r\nIdempotency-Key: \x7f\r\n\r\n");
        let (out, _) = scanned(&[&bytes]);
        assert_eq!(out[..first_len], bytes[..first_len]);
        assert!(out[first_len..].ends_with(b"Idempotency-Key: \xff\r\n\r\n"));
        // The same, a byte at a time.
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(scanned(&chunks).0, out);
    }

    #[test]
    fn framing_it_cannot_follow_stops_the_scanning() {
        // Proves: after a head whose body's end is uncertain, nothing more on the connection changes.
        for head in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 2 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            b"CONNECT x:1 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        ] {
            let mut bytes = head.to_vec();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\nIdempotency-Key: \x7f\r\n\r\n");
            assert_eq!(
                scanned(&[&bytes]).0,
                bytes,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
