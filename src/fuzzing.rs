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

/// The admission ticket (`Admission-Ticket`, `GET /v1/queue/{ticket}`), checked against a fixed
/// secret: never a panic, for the bytes as a ticket's text and for a ticket made of the bytes'
/// fields; a text that decodes is the one its ticket encodes to (one ticket, one text); a ticket
/// encoded decodes to itself, and not under another secret; `ahead` never counts more tickets
/// than are before it.
pub fn admission_ticket(bytes: &[u8]) {
    use crate::app::waiting_room::Ticket;
    const SECRET: &[u8] = b"fuzzing-ticket-secret";
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Some(ticket) = Ticket::decode(text, SECRET) {
            assert_eq!(ticket.encode(SECRET), text, "a ticket with two texts");
        }
    }
    let Some((fields, sku)) = bytes.split_first_chunk::<48>() else {
        return;
    };
    let word = |n: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&fields[8 * n..8 * n + 8]);
        b
    };
    let Ok(sku) = std::str::from_utf8(sku).map(crate::domain::Sku::parse) else {
        return;
    };
    let Ok(sku) = sku else { return };
    let ticket = Ticket {
        sku,
        epoch: u64::from_be_bytes(word(0)),
        position: u64::from_be_bytes(word(1)),
        admit_us: i64::from_be_bytes(word(2)),
        interval_us: i64::from_be_bytes(word(3)),
        expires_us: i64::from_be_bytes(word(4)),
    };
    let text = ticket.encode(SECRET);
    assert_eq!(
        Ticket::decode(&text, SECRET).as_ref(),
        Some(&ticket),
        "a ticket that does not decode to itself"
    );
    assert_eq!(
        Ticket::decode(&text, b"another-secret"),
        None,
        "a ticket accepted under another secret"
    );
    let now = i64::from_be_bytes(word(5));
    assert!(
        ticket.ahead(now) <= ticket.position.saturating_sub(1),
        "more tickets ahead than before it"
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
    ("admission_ticket", admission_ticket),
];
