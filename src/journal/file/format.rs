//! The on-disk framing of journal records, and the scan that reads a segment back.
//!
//! ```text
//! frame = len:u32 | crc:u32 | lsn:u64 | first_event_seq:u64 | batch_first_lsn:u64 | payload[len]
//! ```
//! All integers little-endian; `crc` is CRC32C over everything after it (header rest + payload).
//! `batch_first_lsn` names the group commit the record was synced in. One writer writes a batch,
//! syncs it, and only then writes the next, so after a crash only the *last* batch can be torn. That
//! is how the scan tells a torn tail (cut it) from corruption (refuse to start): a bad frame followed
//! by a valid frame of a *later* batch means synced bytes went bad.
//!
//! `payload` is the record's bytes as [`crate::engine::codec`] writes them (a compact binary form;
//! segments of earlier versions hold JSON, which still reads).

pub use crate::journal::pipeline::PAYLOAD_LEN_MAX;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 32;

/// One record read back from a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Where the frame starts in its segment.
    pub offset: usize,
    /// The record's sequence number: +1 per record across segments, from 1.
    pub lsn: u64,
    /// The seq of the record's first event.
    pub first_event_seq: u64,
    /// The lsn of the first record of the batch this record was synced in.
    pub batch_first_lsn: u64,
    /// The encoded record.
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Where the next frame starts.
    pub fn end(&self) -> usize {
        self.offset + HEADER_LEN + self.payload.len()
    }
}

/// Appends one frame to `out`.
pub fn encode_frame(
    out: &mut Vec<u8>,
    lsn: u64,
    first_event_seq: u64,
    batch_first_lsn: u64,
    payload: &[u8],
) {
    debug_assert!(payload.len() <= PAYLOAD_LEN_MAX);
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&first_event_seq.to_le_bytes());
    out.extend_from_slice(&batch_first_lsn.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Reads the frame at `offset`, if a whole, intact one starts there.
pub fn read_frame(bytes: &[u8], offset: usize) -> Option<Frame<'_>> {
    let header_end = offset.checked_add(HEADER_LEN)?;
    if header_end > bytes.len() {
        return None;
    }
    let len = u32_at(bytes, offset) as usize;
    if len > PAYLOAD_LEN_MAX || header_end + len > bytes.len() {
        return None;
    }
    let crc = u32_at(bytes, offset + 4);
    if crc32c::crc32c(&bytes[offset + 8..header_end + len]) != crc {
        return None;
    }
    Some(Frame {
        offset,
        lsn: u64_at(bytes, offset + 8),
        first_event_seq: u64_at(bytes, offset + 16),
        batch_first_lsn: u64_at(bytes, offset + 24),
        payload: &bytes[header_end..header_end + len],
    })
}

/// How a segment ends after its last good frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The last good frame ends the file.
    Clean,
    /// The bytes from `offset` on are the torn remains of the last batch: cut them.
    Torn {
        /// Where the torn bytes start.
        offset: usize,
    },
    /// The frame at `offset` is bad although a later batch was written after it.
    Corrupt {
        /// Where the bad frame starts.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
}

/// The good frames of a segment and how it ends.
#[derive(Debug)]
pub struct Scan<'a> {
    /// Frames in order, with lsns `first_lsn, first_lsn + 1, ...`.
    pub frames: Vec<Frame<'a>>,
    /// What follows the last good frame.
    pub tail: Tail,
}

/// Reads a segment whose first record must have `first_lsn`. Never panics, whatever the bytes.
pub fn scan_segment(bytes: &[u8], first_lsn: u64) -> Scan<'_> {
    let mut frames = Vec::new();
    let mut offset = 0;
    let mut expected_lsn = first_lsn;
    while offset < bytes.len() {
        match read_frame(bytes, offset) {
            Some(frame) if frame.lsn == expected_lsn && frame.batch_first_lsn <= frame.lsn => {
                offset = frame.end();
                expected_lsn += 1;
                frames.push(frame);
            }
            found => {
                let reason = match found {
                    Some(frame) => format!(
                        "record has lsn {} where {} was expected",
                        frame.lsn, expected_lsn
                    ),
                    None => "bad length or checksum".to_owned(),
                };
                let tail = if later_batch_follows(bytes, offset, expected_lsn) {
                    Tail::Corrupt { offset, reason }
                } else {
                    Tail::Torn { offset }
                };
                return Scan { frames, tail };
            }
        }
    }
    Scan {
        frames,
        tail: Tail::Clean,
    }
}

/// How many records a torn tail starting at `bad_offset` held: the bad one, and every intact frame
/// found after it.
pub fn records_in_tail(bytes: &[u8], bad_offset: usize) -> usize {
    let mut count = 1;
    let mut at = bad_offset + 1;
    while at + HEADER_LEN <= bytes.len() {
        match read_frame(bytes, at) {
            Some(frame) => {
                count += 1;
                at = frame.end();
            }
            None => at += 1,
        }
    }
    count
}

/// True if an intact frame of a batch later than the one holding `expected_lsn` starts anywhere
/// after `bad_offset`.
fn later_batch_follows(bytes: &[u8], bad_offset: usize, expected_lsn: u64) -> bool {
    (bad_offset + 1..bytes.len().saturating_sub(HEADER_LEN - 1)).any(|at| {
        read_frame(bytes, at)
            .is_some_and(|f| f.batch_first_lsn > expected_lsn && f.lsn >= f.batch_first_lsn)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(batches: &[&[&[u8]]], first_lsn: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut lsn = first_lsn;
        for batch in batches {
            let batch_first = lsn;
            for payload in *batch {
                encode_frame(&mut out, lsn, lsn * 10, batch_first, payload);
                lsn += 1;
            }
        }
        out
    }

    #[test]
    fn frames_round_trip() {
        let bytes = segment(&[&[b"a", b"bb"], &[b"ccc"]], 7);
        let scan = scan_segment(&bytes, 7);
        assert_eq!(scan.tail, Tail::Clean);
        let payloads: Vec<&[u8]> = scan.frames.iter().map(|f| f.payload).collect();
        assert_eq!(payloads, vec![&b"a"[..], b"bb", b"ccc"]);
        assert_eq!(scan.frames[2].lsn, 9);
        assert_eq!(scan.frames[2].batch_first_lsn, 9);
        assert_eq!(scan.frames[1].first_event_seq, 80);
    }

    #[test]
    fn a_cut_last_batch_is_a_torn_tail() {
        let bytes = segment(&[&[b"one"], &[b"two", b"three"]], 1);
        let full = bytes.len();
        for cut in (HEADER_LEN + 3)..full {
            let scan = scan_segment(&bytes[..cut], 1);
            assert!(
                matches!(scan.tail, Tail::Torn { .. } | Tail::Clean),
                "cut at {cut}: {:?}",
                scan.tail
            );
            assert!(!scan.frames.is_empty());
        }
    }

    #[test]
    fn a_bad_frame_followed_by_a_later_batch_is_corruption() {
        let mut bytes = segment(&[&[b"one"], &[b"two"], &[b"three"]], 1);
        let second = HEADER_LEN + 3;
        bytes[second + HEADER_LEN] ^= 1;
        let scan = scan_segment(&bytes, 1);
        assert_eq!(scan.frames.len(), 1);
        assert!(matches!(scan.tail, Tail::Corrupt { offset, .. } if offset == second));
    }

    #[test]
    fn a_torn_tail_counts_its_records() {
        // The count a crash's cut is logged with: the bad record and every intact one after it.
        let mut bytes = segment(&[&[b"one"], &[b"two", b"three", b"four"]], 1);
        let second = HEADER_LEN + 3;
        bytes[second + HEADER_LEN] ^= 1;
        assert_eq!(records_in_tail(&bytes, second), 3);
        let cut = bytes.len() - 2;
        assert_eq!(records_in_tail(&bytes[..cut], second), 2);
    }

    #[test]
    fn a_bad_frame_inside_the_last_batch_is_torn() {
        let mut bytes = segment(&[&[b"one"], &[b"two", b"three"]], 1);
        let second = HEADER_LEN + 3;
        bytes[second + HEADER_LEN] ^= 1;
        let scan = scan_segment(&bytes, 1);
        assert_eq!(scan.tail, Tail::Torn { offset: second });
    }
}
