//! Start-up: the newest snapshot, then every record after it folded into the durable state, a
//! torn tail cut off the last segment (unless the clean-shutdown marker says the stop was clean),
//! anything else that is bad refused, naming the file and offset.

use super::*;

/// What a fold of snapshot and segments found.
pub(super) struct Recovered {
    pub(super) state: State,
    pub(super) report: RecoveryReport,
    pub(super) next_lsn: u64,
    pub(super) next_event_seq: u64,
    /// The last segment read, its first lsn and its length after any cut.
    pub(super) last_segment: Option<(u64, u64)>,
    /// The segments read (closed or not), oldest first.
    pub(super) segments_read: Vec<SegmentInfo>,
    /// The snapshots present, oldest first.
    pub(super) snapshots: Vec<u64>,
}

pub(super) fn corrupt(
    storage: &dyn Storage,
    name: &str,
    offset: u64,
    reason: impl Into<String>,
) -> JournalError {
    JournalError::Corrupt {
        file: storage.describe(name),
        offset,
        reason: reason.into(),
    }
}

/// Folds the newest snapshot and the segments after it into the durable state. Segments starting
/// at or after `stop_before` are not read (a checkpoint leaves the active segment alone). With
/// `repair`, a torn tail of the last segment is cut off the file. With `strict` (the journal was
/// shut down cleanly, so nothing can be torn), any bad byte is corruption.
pub(super) fn fold(
    storage: &dyn Storage,
    stop_before: Option<u64>,
    repair: bool,
    strict: bool,
) -> Result<Recovered, JournalError> {
    let names = storage
        .list()
        .map_err(|e| JournalError::io(format!("listing {}", storage.describe("")), &e))?;
    let mut segments: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_number(n, "", ".wal"))
        .filter(|&lsn| stop_before.is_none_or(|stop| lsn < stop))
        .collect();
    segments.sort_unstable();
    let mut snapshots: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_number(n, "snapshot-", ".json"))
        .collect();
    snapshots.sort_unstable();

    let mut state = match snapshots.last() {
        Some(&lsn) => read_snapshot(storage, lsn)?,
        None => State::default(),
    };
    let mut report = RecoveryReport {
        snapshot_lsn: state.last_lsn,
        records_replayed: 0,
        torn_bytes_cut: 0,
    };
    let mut next_lsn = state.last_lsn + 1;
    let mut next_event_seq = state.next_event_seq();
    let mut last_segment = None;
    let mut segments_read = Vec::new();

    for (i, &first_lsn) in segments.iter().enumerate() {
        let is_last = i + 1 == segments.len();
        // A segment whose successor starts at or before the next lsn holds nothing new.
        if segments.get(i + 1).is_some_and(|&next| next <= next_lsn) {
            continue;
        }
        let name = segment_name(first_lsn);
        if first_lsn > next_lsn {
            return Err(corrupt(
                storage,
                &name,
                0,
                format!("records {next_lsn}..{first_lsn} are missing (a segment was lost)"),
            ));
        }
        let bytes = storage
            .read(&name)
            .map_err(|e| JournalError::io(format!("reading {}", storage.describe(&name)), &e))?;
        let mut scan = scan_segment(&bytes, first_lsn);
        // A segment ends where the next one starts: records at or past the next segment's first
        // lsn are superseded (the remains of a write that failed, after which the journal went on
        // in a new segment), and so are any bytes after them.
        let successor = segments.get(i + 1).copied().or(stop_before);
        if let Some(successor) = successor {
            let kept = scan.frames.iter().take_while(|f| f.lsn < successor).count();
            let complete = first_lsn + kept as u64 == successor;
            if complete && (kept < scan.frames.len() || scan.tail != Tail::Clean) {
                tracing::warn!(
                    file = %storage.describe(&name),
                    "ignoring the remains of a failed write after record {}",
                    successor - 1
                );
                scan.frames.truncate(kept);
                scan.tail = Tail::Clean;
            }
        }
        let mut info = SegmentInfo {
            first_lsn,
            first_event_seq: scan
                .frames
                .first()
                .map_or(next_event_seq, |f| f.first_event_seq),
            last_at_ms: 0,
        };
        for frame in &scan.frames {
            if frame.lsn < next_lsn {
                continue;
            }
            if frame.first_event_seq != next_event_seq {
                return Err(corrupt(
                    storage,
                    &name,
                    frame.offset as u64,
                    format!(
                        "record {} starts its events at seq {} where {next_event_seq} was expected",
                        frame.lsn, frame.first_event_seq
                    ),
                ));
            }
            let record: Record = crate::engine::codec::decode(frame.payload).map_err(|e| {
                corrupt(
                    storage,
                    &name,
                    frame.offset as u64,
                    format!("record {} does not decode: {e}", frame.lsn),
                )
            })?;
            next_event_seq += u64::from(record.event_count());
            info.last_at_ms = info.last_at_ms.max(record.at_ms().unwrap_or(0));
            state.apply(frame.lsn, frame.first_event_seq, record);
            next_lsn += 1;
            report.records_replayed += 1;
        }
        let mut len = bytes.len() as u64;
        match scan.tail {
            Tail::Clean => {}
            Tail::Torn { offset } if is_last && stop_before.is_none() && !strict => {
                let records = format::records_in_tail(&bytes, offset);
                tracing::error!(
                    file = %storage.describe(&name),
                    offset,
                    records,
                    first_lsn = next_lsn,
                    cut_bytes = bytes.len() - offset,
                    "cutting the torn tail of the journal after a crash: {records} record(s) of the \
                     last batch, never acknowledged unless the disk lost bytes it had synced"
                );
                if repair {
                    storage.truncate(&name, offset as u64).map_err(|e| {
                        JournalError::io(format!("cutting {}", storage.describe(&name)), &e)
                    })?;
                }
                len = offset as u64;
                report.torn_bytes_cut = (bytes.len() - offset) as u64;
            }
            Tail::Torn { offset } => {
                let reason = if strict {
                    "a bad record after a clean shutdown (nothing can be torn then)"
                } else {
                    "a closed segment ends in a bad record"
                };
                return Err(corrupt(storage, &name, offset as u64, reason));
            }
            Tail::Corrupt { offset, reason } => {
                return Err(corrupt(storage, &name, offset as u64, reason))
            }
        }
        segments_read.push(info);
        last_segment = Some((first_lsn, len));
    }
    Ok(Recovered {
        state,
        report,
        next_lsn,
        next_event_seq,
        last_segment,
        segments_read,
        snapshots,
    })
}

/// The last lsn named by a clean shutdown's marker, if there is one.
pub(super) fn read_clean_marker(storage: &dyn Storage) -> Result<Option<u64>, JournalError> {
    let bytes = match storage.read(CLEAN_MARKER) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(JournalError::io(
                format!("reading {}", storage.describe(CLEAN_MARKER)),
                &e,
            ))
        }
    };
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| text.trim().strip_prefix("last_lsn "))
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            corrupt(
                storage,
                CLEAN_MARKER,
                0,
                "the clean shutdown marker does not decode",
            )
        })
}
