//! Entry points for the fuzz targets (`fuzz/`, run with `cargo fuzz`) and for their short run in
//! the test command (`tests/fuzz_corpus.rs`): each takes arbitrary bytes, feeds them to what
//! parses untrusted input, and panics only when a property of that parser breaks. Not an API.

/// The journal's record codec: any bytes decode to a record or an error, never a panic; a
/// record that decodes encodes back to bytes that decode to the same record.
pub fn record_codec(bytes: &[u8]) {
    if let Ok(record) = crate::engine::codec::decode(bytes) {
        let again = crate::engine::codec::encode(&record);
        let decoded = crate::engine::codec::decode(&again)
            .unwrap_or_else(|e| panic!("a record's own encoding does not decode: {e}"));
        assert_eq!(decoded, record, "encode then decode changed the record");
    }
}

/// The journal's frame reader on a whole segment: never a panic, frames in lsn order within
/// the bytes, each ending where the next begins.
pub fn segment_reader(bytes: &[u8]) {
    let scan = crate::journal::file::format::scan_segment(bytes, 1);
    let mut offset = 0;
    for (n, frame) in scan.frames.iter().enumerate() {
        assert_eq!(frame.lsn, 1 + n as u64, "frames out of lsn order");
        assert_eq!(frame.offset, offset, "a gap between frames");
        assert!(frame.end() <= bytes.len(), "a frame past the segment's end");
        offset = frame.end();
    }
    let _ = crate::journal::file::format::records_in_tail(bytes, offset);
}

/// The request-head scanner, fed the bytes in pieces of every size the first byte picks: never
/// a panic, the length kept, and a byte changed only from DEL to 0xFF.
pub fn request_heads(bytes: &[u8]) {
    let Some((&first, rest)) = bytes.split_first() else {
        return;
    };
    let piece = usize::from(first % 16) + 1;
    let mut scanned = rest.to_vec();
    crate::connections::scan_request_heads_in_pieces(&mut scanned, piece);
    assert_eq!(scanned.len(), rest.len());
    for (before, after) in rest.iter().zip(&scanned) {
        assert!(
            before == after || (*before == 0x7f && *after == 0xff),
            "the scanner changed {before:#x} into {after:#x}"
        );
    }
}

/// The JSON bodies: a checkout request and a payment webhook, parsed as the handlers parse them
/// (exactly: unknown fields refused), never a panic; a checkout that parses has a fingerprint,
/// the same for the same request.
pub fn json_bodies(bytes: &[u8]) {
    if let Ok(request) = crate::api::parse_json::<crate::app::checkout::Request>(bytes) {
        let once = crate::engine::idempotency::Fingerprint::of(&request).text();
        let twice = crate::engine::idempotency::Fingerprint::of(&request).text();
        assert_eq!(once, twice, "a fingerprint that changes");
    }
    let _ = crate::api::webhooks::parse_body(bytes);
}

/// The webhook signature parser: a header and a body from the bytes (split at the first NUL),
/// checked against a fixed secret: never a panic; a header made by `sign` for that body is
/// accepted.
pub fn webhook_signature(bytes: &[u8]) {
    const SECRET: &[u8] = b"fuzzing-webhook-secret";
    let split = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let (header, body) = bytes.split_at(split);
    let body = body.get(1..).unwrap_or_default();
    let now = 1_800_000_000;
    if let Ok(header) = std::str::from_utf8(header) {
        let _ = crate::payment::webhook::verify(SECRET, Some(header), body, now);
    }
    let signed = crate::payment::webhook::sign(SECRET, now, body);
    assert!(
        crate::payment::webhook::verify(SECRET, Some(&signed), body, now).is_ok(),
        "a signature made for a body is refused"
    );
}

/// A fuzz target: arbitrary bytes in, a panic only when its property breaks.
pub type Target = fn(&[u8]);

/// Every target, by name (for the corpus replay and the fuzz crate).
pub const TARGETS: &[(&str, Target)] = &[
    ("record_codec", record_codec),
    ("segment_reader", segment_reader),
    ("request_heads", request_heads),
    ("json_bodies", json_bodies),
    ("webhook_signature", webhook_signature),
];
