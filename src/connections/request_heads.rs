//! Follows the bytes a client sends far enough to know when its first request head has arrived
//! (so the connection's first deadline can be lifted), without parsing HTTP: hyper does that.
//!
//! It recognises an HTTP/1 request head by its end (the first empty line after the request line;
//! empty lines before the request line are skipped, as RFC 9112 §2.2 allows and httparse does),
//! and the HTTP/2 preface by its request line `PRI * HTTP/2.0`.

/// The request line of the HTTP/2 preface starts with this method and space.
const PREFACE_METHOD: &[u8; 4] = b"PRI ";

/// Where the scanner is in the connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Before the request line.
    BeforeRequest,
    /// In the request line; how many bytes of [`PREFACE_METHOD`] it starts with (`None` once it
    /// differs).
    RequestLine { preface_matched: Option<u8> },
    /// At the start of a header line, or of the empty line that ends the head.
    LineStart,
    /// In a header line, past its first byte.
    InLine,
    /// The first request has arrived; the rest is hyper's to follow.
    Done,
}

/// The scanner of one connection.
#[derive(Debug)]
pub(super) struct RequestHeads {
    position: Position,
}

impl RequestHeads {
    pub(super) fn new() -> Self {
        Self {
            position: Position::BeforeRequest,
        }
    }

    /// Whether the first request head, or the HTTP/2 preface, has arrived.
    pub(super) fn first_request_arrived(&self) -> bool {
        self.position == Position::Done
    }

    /// Follows `bytes`, the next bytes read from the client.
    pub(super) fn scan(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.position = match self.position {
                Position::Done => return,
                Position::BeforeRequest => match byte {
                    b'\r' | b'\n' => Position::BeforeRequest,
                    _ => Position::RequestLine {
                        preface_matched: (byte == PREFACE_METHOD[0]).then_some(1),
                    },
                },
                Position::RequestLine { preface_matched } => match byte {
                    // The HTTP/2 preface: no HTTP/1 head follows.
                    b'\n' if preface_matched == Some(4) => Position::Done,
                    b'\n' => Position::LineStart,
                    _ => Position::RequestLine {
                        preface_matched: match preface_matched {
                            Some(4) => Some(4),
                            Some(n) if PREFACE_METHOD[usize::from(n)] == byte => Some(n + 1),
                            _ => None,
                        },
                    },
                },
                Position::LineStart => match byte {
                    // The CR of a line's CRLF; the LF decides.
                    b'\r' => Position::LineStart,
                    b'\n' => Position::Done,
                    _ => Position::InLine,
                },
                Position::InLine => match byte {
                    b'\n' => Position::LineStart,
                    _ => Position::InLine,
                },
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrived_after(chunks: &[&[u8]]) -> Vec<bool> {
        let mut heads = RequestHeads::new();
        chunks
            .iter()
            .map(|chunk| {
                heads.scan(chunk);
                heads.first_request_arrived()
            })
            .collect()
    }

    #[test]
    fn the_first_head_arrives_with_its_empty_line_in_any_split() {
        let head = b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 0..head.len() {
            let (first, second) = head.split_at(split);
            assert_eq!(arrived_after(&[first, second]), [false, true], "{split}");
        }
        assert_eq!(arrived_after(&[b"GET / HTTP/1.1\nHost: x\n\n"]), [true]);
    }

    #[test]
    fn a_partial_head_or_nothing_has_not_arrived() {
        assert_eq!(arrived_after(&[b"POST /v1/chec"]), [false]);
        assert_eq!(arrived_after(&[b"GET / HTTP/1.1\r\nHost: x\r\n"]), [false]);
        assert_eq!(arrived_after(&[b"", b"\r\n\r\n"]), [false, false]);
        assert_eq!(arrived_after(&[b"PRI * HTTP/2"]), [false]);
    }

    #[test]
    fn the_http2_preface_counts_as_the_first_request() {
        assert_eq!(
            arrived_after(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"]),
            [true, true]
        );
        // A method that only starts like the preface's is an HTTP/1 request line.
        assert_eq!(arrived_after(&[b"PRIX * HTTP/1.1\r\n"]), [false]);
    }
}
