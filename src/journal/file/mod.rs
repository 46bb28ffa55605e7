//! The embedded journal: append-only segment files in the data directory, group commit with one
//! `fdatasync` per batch, snapshots that keep start-up replay short.
//!
//! Files: `<first lsn, 20 digits>.wal` segments (see [`mod@format`] for the framing) and
//! `snapshot-<lsn, 20 digits>.json` snapshots of the durable [`State`] after record `lsn`
//! (`len:u32 | crc32c:u32 | JSON`), and `clean-shutdown` (the last lsn, written at a clean stop).
//! Start-up reads the newest snapshot, replays the records after it, cuts a torn tail off the last
//! segment (logged at ERROR with its record count) unless the marker says the stop was clean, and
//! refuses to start on anything else that is bad, naming the file and offset.
//!
//! Concurrency: the group commit of `journal::pipeline`; the writer here is a thread that frames a
//! batch, writes it with one `write`, syncs it with one `fdatasync`, publishes its events and
//! answers its waiters.
//!
//! A failed write or sync: the writer refuses appends, cuts the failed batch off the segment (only
//! then are its waiters told, so it can never reappear at a restart), probes the disk until a write
//! succeeds, re-reads the tail from disk as start-up does, and goes on in a new segment. The failed
//! file is never synced again (a later successful `fsync` says nothing of pages an earlier one
//! failed to write).
//!
//! Retention: snapshots hold the live state (finished orders and answers past retention are
//! dropped) and no events. Events live in the segments: the most recent are also held in memory;
//! older ones are read from the segments, which a snapshot keeps on disk (listed in it) until
//! their last record is past `--event-retention`.

pub mod format;
pub mod storage;

use super::event_log::EventLog;
use super::pipeline::{Entry, Pipeline};
use super::{Journal, JournalError, JournalStats, Ticket};
use crate::engine::records::{Event, Record, SegmentInfo, State};
use crate::sync::lock;
use crate::BoxFuture;
use format::{encode_frame, scan_segment, Tail};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;
use storage::{Storage, StorageFile};

/// Settings of the file journal.
#[derive(Debug, Clone)]
pub struct FileJournalConfig {
    /// A segment that reached this size is closed and the next batch starts a new one. Bounds how
    /// much a checkpoint reads at once and how much a torn-tail scan may have to cover.
    pub segment_bytes_max: u64,
    /// After this many closed segments since the last snapshot, a snapshot is taken in the
    /// background and the segments it covers are removed. Bounds start-up replay.
    pub checkpoint_segments: usize,
    /// The most records one group commit takes: bounds the writer's buffer and how long one batch
    /// keeps the next one waiting.
    pub batch_records_max: usize,
    /// The most recent events kept in memory (older ones are read from the segments).
    pub events_in_memory_max: usize,
    /// How long a segment's events stay readable on disk after a snapshot covered it.
    pub event_retention_ms: i64,
    /// Finished orders created longer ago than this leave snapshots (and memory).
    pub order_retention_ms: i64,
    /// Kept answers older than this leave snapshots (and memory).
    pub answer_retention_ms: i64,
    /// The wall clock (Unix milliseconds) retention is measured by; tests pass their own.
    pub clock: fn() -> i64,
    /// Write-behind: segments holding this lsn (MySQL's cursor: start-up compares it) or a record
    /// after it stay on disk whatever the event retention says, so MySQL can be brought up to
    /// date from them.
    pub hold_after_lsn: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The RabbitMQ relay's durable cursor: segments holding an event after this seq stay on disk
    /// whatever the event retention says, so every event reaches the broker.
    pub hold_events_after_seq: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Default for FileJournalConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 64 << 20,
            checkpoint_segments: 4,
            batch_records_max: 8_192,
            events_in_memory_max: 1 << 18,
            event_retention_ms: 7 * 24 * 3_600 * 1_000,
            order_retention_ms: 7 * 24 * 3_600 * 1_000,
            answer_retention_ms: 24 * 3_600 * 1_000,
            clock: crate::time::now_ms,
            hold_after_lsn: None,
            hold_events_after_seq: None,
        }
    }
}

fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.wal")
}

fn snapshot_name(lsn: u64) -> String {
    format!("snapshot-{lsn:020}.json")
}

fn parse_number(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

/// What a fold of snapshot and segments found.
struct Recovered {
    state: State,
    report: RecoveryReport,
    next_lsn: u64,
    next_event_seq: u64,
    /// The last segment read, its first lsn and its length after any cut.
    last_segment: Option<(u64, u64)>,
    /// The segments read (closed or not), oldest first.
    segments_read: Vec<SegmentInfo>,
    /// The snapshots present, oldest first.
    snapshots: Vec<u64>,
}

fn corrupt(
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

fn read_snapshot(storage: &dyn Storage, lsn: u64) -> Result<State, JournalError> {
    let name = snapshot_name(lsn);
    let bytes = storage
        .read(&name)
        .map_err(|e| JournalError::io(format!("reading {}", storage.describe(&name)), &e))?;
    if bytes.len() < 8 {
        return Err(corrupt(
            storage,
            &name,
            0,
            "snapshot shorter than its header",
        ));
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if bytes.len() != 8 + len || crc32c::crc32c(&bytes[8..]) != crc {
        return Err(corrupt(
            storage,
            &name,
            0,
            "snapshot length or checksum mismatch",
        ));
    }
    let state: State = serde_json::from_slice(&bytes[8..])
        .map_err(|e| corrupt(storage, &name, 8, format!("snapshot does not decode: {e}")))?;
    if state.last_lsn != lsn {
        return Err(corrupt(
            storage,
            &name,
            8,
            format!("snapshot says lsn {} but is named {lsn}", state.last_lsn),
        ));
    }
    Ok(state)
}

fn write_snapshot(storage: &dyn Storage, state: &State) -> Result<(), JournalError> {
    let json = serde_json::to_vec(state).map_err(|e| JournalError::Io {
        context: "encoding a snapshot".into(),
        message: e.to_string(),
    })?;
    let mut bytes = Vec::with_capacity(json.len() + 8);
    bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    bytes.extend_from_slice(&json);
    let name = snapshot_name(state.last_lsn);
    storage
        .write_atomic(&name, &bytes)
        .map_err(|e| JournalError::io(format!("writing {}", storage.describe(&name)), &e))
}

/// Folds the newest snapshot and the segments after it into the durable state. Segments starting
/// at or after `stop_before` are not read (a checkpoint leaves the active segment alone). With
/// `repair`, a torn tail of the last segment is cut off the file. With `strict` (the journal was
/// shut down cleanly, so nothing can be torn), any bad byte is corruption.
fn fold(
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

/// Writes a snapshot of everything in the closed segments (those before `active_first_lsn`),
/// pruned of what is past retention at `now_ms`, and removes the files it makes redundant:
/// older snapshots, and covered segments whose events are past `--event-retention` (the others
/// stay on disk, listed in the snapshot, so their events stay readable). Runs beside the writer: it
/// reads only closed segments. Returns the lsn the snapshot covers and the segments it removed.
fn checkpoint(
    storage: &dyn Storage,
    active_first_lsn: u64,
    config: &FileJournalConfig,
    now_ms: i64,
) -> Result<(u64, Vec<u64>), JournalError> {
    let recovered = fold(storage, Some(active_first_lsn), false, false)?;
    let lsn = recovered.state.last_lsn;
    if recovered.segments_read.is_empty() || recovered.snapshots.last().is_some_and(|&s| s >= lsn) {
        return Ok((lsn, Vec::new()));
    }
    let mut state = recovered.state;
    let mut covered = std::mem::take(&mut state.retained_segments);
    for info in recovered.segments_read {
        match covered.iter_mut().find(|c| c.first_lsn == info.first_lsn) {
            Some(known) => *known = info,
            None => covered.push(info),
        }
    }
    // Oldest first, and only from the front: the events on disk stay one unbroken run.
    let cutoff = now_ms - config.event_retention_ms;
    let hold = config
        .hold_after_lsn
        .as_ref()
        .map_or(u64::MAX, |h| h.load(Ordering::Acquire));
    let events_hold = config
        .hold_events_after_seq
        .as_ref()
        .map_or(u64::MAX, |h| h.load(Ordering::Acquire));
    let expired = covered
        .iter()
        .enumerate()
        .take_while(|(i, info)| {
            let next = covered.get(i + 1);
            let last_lsn = next.map_or(active_first_lsn, |next| next.first_lsn) - 1;
            let next_event_seq = next.map_or(recovered.next_event_seq, |next| next.first_event_seq);
            // `<`: the record at the hold itself stays (write-behind's start-up compares
            // MySQL's last record with it).
            info.last_at_ms < cutoff
                && last_lsn < hold
                && next_event_seq.saturating_sub(1) <= events_hold
        })
        .count();
    let removed: Vec<u64> = covered.drain(..expired).map(|i| i.first_lsn).collect();
    state.retained_segments = covered;
    state.prune(
        now_ms,
        config.order_retention_ms,
        config.answer_retention_ms,
    );
    write_snapshot(storage, &state)?;
    for &first_lsn in &removed {
        remove_if_present(storage, &segment_name(first_lsn))?;
    }
    for old in recovered.snapshots {
        remove_if_present(storage, &snapshot_name(old))?;
    }
    storage
        .sync_dir()
        .map_err(|e| JournalError::io("syncing the journal directory", &e))?;
    Ok((lsn, removed))
}

fn remove_if_present(storage: &dyn Storage, name: &str) -> Result<(), JournalError> {
    match storage.remove(name) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(JournalError::io(
            format!("removing {}", storage.describe(name)),
            &e,
        )),
        _ => Ok(()),
    }
}

struct Shared {
    storage: Arc<dyn Storage>,
    config: FileJournalConfig,
    pipeline: Pipeline,
    /// The most recent durable events, in seq order.
    events: RwLock<EventLog>,
    /// Every segment on disk, oldest first, with the seq of its first event: where older events
    /// are read from.
    segments: RwLock<Vec<SegmentInfo>>,
    /// Frame tables of segments read lately, so paging through old events reads only what a page
    /// needs.
    frame_tables: Mutex<FrameTables>,
    /// True while a background checkpoint thread exists (at most one is started).
    checkpoint_running: AtomicBool,
    /// Held while a checkpoint runs, so two never remove the same files.
    checkpoint_lock: Mutex<()>,
}

/// What start-up found, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The lsn the snapshot covered (0: no snapshot).
    pub snapshot_lsn: u64,
    /// Records replayed from segments after the snapshot.
    pub records_replayed: u64,
    /// Bytes cut off a torn tail.
    pub torn_bytes_cut: u64,
}

/// The embedded journal.
pub struct FileJournal {
    recovery: RecoveryReport,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

struct Writer {
    shared: Arc<Shared>,
    file: Box<dyn StorageFile>,
    file_first_lsn: u64,
    /// The length of the segment up to its last synced batch.
    file_len: u64,
    closed_since_checkpoint: usize,
    /// The last lsn on stable storage.
    durable_lsn: u64,
    /// The seq the next durable event gets.
    durable_next_event_seq: u64,
}

/// Written at a clean shutdown, naming the last record: at the next start nothing may be torn.
const CLEAN_MARKER: &str = "clean-shutdown";

/// The probe a failed journal writes (and removes) to learn whether the disk takes writes again.
const SPACE_PROBE: &str = "space-probe.tmp";

/// Bytes of the probe: a batch's worth, so the first batch after recovery is likely to fit.
const SPACE_PROBE_BYTES: usize = 256 << 10;

/// The last lsn named by a clean shutdown's marker, if there is one.
fn read_clean_marker(storage: &dyn Storage) -> Result<Option<u64>, JournalError> {
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

impl FileJournal {
    /// Opens the journal in `storage`: recovers the durable state (cutting a torn tail, refusing
    /// corruption) and starts the writer. Returns the journal and the state it recovered; the
    /// state's events stay in the journal (read them with `events`).
    pub fn open(
        storage: Arc<dyn Storage>,
        config: FileJournalConfig,
    ) -> Result<(Self, State), JournalError> {
        // Leftovers of a write that a crash interrupted (a snapshot, the space probe) only hold
        // space.
        let names = storage
            .list()
            .map_err(|e| JournalError::io(format!("listing {}", storage.describe("")), &e))?;
        for leftover in names.iter().filter(|n| n.ends_with(".tmp")) {
            remove_if_present(storage.as_ref(), leftover)?;
        }
        let clean = read_clean_marker(storage.as_ref())?;
        let recovered = fold(storage.as_ref(), None, true, clean.is_some())?;
        if let Some(marked) = clean {
            let found = recovered.next_lsn - 1;
            if found != marked {
                return Err(corrupt(
                    storage.as_ref(),
                    CLEAN_MARKER,
                    0,
                    format!("the clean shutdown named record {marked} last, but the journal ends at {found}"),
                ));
            }
            // From here on a crash is a crash: the marker goes before anything new is written.
            remove_if_present(storage.as_ref(), CLEAN_MARKER)?;
            storage
                .sync_dir()
                .map_err(|e| JournalError::io("syncing the journal directory", &e))?;
        }
        let (file, file_first_lsn, file_len) = match recovered.last_segment {
            Some((first_lsn, len)) => {
                let name = segment_name(first_lsn);
                let file = storage.open_append(&name).map_err(|e| {
                    JournalError::io(format!("opening {}", storage.describe(&name)), &e)
                })?;
                (file, first_lsn, len)
            }
            None => {
                let name = segment_name(recovered.next_lsn);
                let file = storage.create(&name).map_err(|e| {
                    JournalError::io(format!("creating {}", storage.describe(&name)), &e)
                })?;
                storage
                    .sync_dir()
                    .map_err(|e| JournalError::io("syncing the journal directory", &e))?;
                (file, recovered.next_lsn, 0)
            }
        };
        let closed_since_checkpoint = recovered.segments_read.len().saturating_sub(1);
        let mut state = recovered.state;
        let recovery = recovered.report;
        let mut segments = std::mem::take(&mut state.retained_segments);
        segments.extend(recovered.segments_read.iter().copied());
        if recovered.last_segment.is_none() {
            segments.push(SegmentInfo {
                first_lsn: file_first_lsn,
                first_event_seq: recovered.next_event_seq,
                last_at_ms: 0,
            });
        }
        segments.dedup_by_key(|s| s.first_lsn);
        state.prune(
            (config.clock)(),
            config.order_retention_ms,
            config.answer_retention_ms,
        );
        tracing::info!(
            records = state.last_lsn,
            snapshot_lsn = recovery.snapshot_lsn,
            replayed = recovery.records_replayed,
            products = state.products.len(),
            orders = state.orders.len(),
            events = state.events.len(),
            "journal recovered"
        );
        // The events move to the journal's log: the state handed back holds none.
        let events = EventLog::from_events(
            std::mem::take(&mut state.events),
            config.events_in_memory_max,
            recovered.next_event_seq,
        );
        let shared = Arc::new(Shared {
            storage,
            config,
            pipeline: Pipeline::new(recovered.next_lsn, recovered.next_event_seq),
            events: RwLock::new(events),
            segments: RwLock::new(segments),
            frame_tables: Mutex::new(FrameTables::default()),
            checkpoint_running: AtomicBool::new(false),
            checkpoint_lock: Mutex::new(()),
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            file,
            file_first_lsn,
            file_len,
            closed_since_checkpoint,
            durable_lsn: recovered.next_lsn - 1,
            durable_next_event_seq: recovered.next_event_seq,
        };
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                let shared = Arc::clone(&writer.shared);
                // A panic in the writer must not leave appenders waiting on a journal that looks
                // healthy: what was queued (never written) fails, and every later append too.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run())).is_err()
                {
                    // The batch it held answers `Unknown` (its waiters are dropped).
                    shared.pipeline.mark_failed(JournalError::Io {
                        context: "the journal writer panicked".into(),
                        message: "restart the server".into(),
                    });
                }
            })
            .map_err(|e| JournalError::io("starting the journal writer thread", &e))?;
        Ok((
            Self {
                recovery,
                shared,
                writer: Mutex::new(Some(handle)),
            },
            state,
        ))
    }

    /// Opens the journal in a directory on disk.
    pub fn open_dir(
        dir: &std::path::Path,
        config: FileJournalConfig,
    ) -> Result<(Self, State), JournalError> {
        let storage = storage::DiskStorage::open(dir)
            .map_err(|e| JournalError::io(format!("opening {}", dir.display()), &e))?;
        Self::open(Arc::new(storage), config)
    }

    /// What start-up found.
    pub fn recovery(&self) -> RecoveryReport {
        self.recovery
    }

    /// Takes a snapshot now of everything in closed segments (normally done in the background).
    /// Returns the lsn the newest snapshot covers.
    pub fn checkpoint_now(&self) -> Result<u64, JournalError> {
        // The newest segment on disk is the one the writer appends to: leave it out.
        let names = self
            .shared
            .storage
            .list()
            .map_err(|e| JournalError::io("listing the journal directory", &e))?;
        let active = names
            .iter()
            .filter_map(|n| parse_number(n, "", ".wal"))
            .max()
            .unwrap_or(u64::MAX);
        self.shared.checkpoint(active)
    }
}

impl Shared {
    /// Runs one checkpoint at a time, whoever asks.
    fn checkpoint(&self, active_first_lsn: u64) -> Result<u64, JournalError> {
        let _one_at_a_time = lock(&self.checkpoint_lock);
        let (lsn, removed) = checkpoint(
            self.storage.as_ref(),
            active_first_lsn,
            &self.config,
            (self.config.clock)(),
        )?;
        if !removed.is_empty() {
            self.segments
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| !removed.contains(&s.first_lsn));
            lock(&self.frame_tables).forget(&removed);
        }
        Ok(lsn)
    }

    /// Up to `limit` durable events with `seq > after_seq`, in order: the recent ones from memory,
    /// older ones from the segments on disk; `Pruned` past `--event-retention`.
    fn events_after(&self, after_seq: u64, limit: usize) -> Result<Vec<Event>, JournalError> {
        let (first_in_memory, events) = {
            let log = self.events.read().unwrap_or_else(|e| e.into_inner());
            (log.first_seq(), log.after(after_seq, limit))
        };
        if after_seq + 1 >= first_in_memory {
            return Ok(events);
        }
        let mut out = self.events_on_disk(after_seq, first_in_memory, limit)?;
        if out.len() < limit {
            let after = out.last().map_or(after_seq, |e| e.seq);
            let log = self.events.read().unwrap_or_else(|e| e.into_inner());
            out.extend(log.after(after.max(first_in_memory - 1), limit - out.len()));
        }
        Ok(out)
    }

    /// The seq of the oldest event held in memory.
    fn first_seq_in_memory(&self) -> u64 {
        self.events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .first_seq()
    }

    /// A segment was started for records from `first_lsn`, events from `first_event_seq`.
    fn segment_started(&self, first_lsn: u64, first_event_seq: u64) {
        let mut segments = self.segments.write().unwrap_or_else(|e| e.into_inner());
        segments.retain(|s| s.first_lsn != first_lsn);
        segments.push(SegmentInfo {
            first_lsn,
            first_event_seq,
            last_at_ms: 0,
        });
    }

    /// Up to `limit` events with `seq > after_seq` and `seq < before_seq`, read from the segments
    /// on disk; `Pruned` if events after `after_seq` are no longer kept.
    fn events_on_disk(
        &self,
        after_seq: u64,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, JournalError> {
        let segments = self
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let first_kept = segments.first().map_or(before_seq, |s| s.first_event_seq);
        if after_seq + 1 < first_kept {
            return Err(JournalError::Pruned {
                first_seq: first_kept,
            });
        }
        // The last segment whose first event is at or before the one wanted.
        let start = segments
            .partition_point(|s| s.first_event_seq <= after_seq + 1)
            .saturating_sub(1);
        let mut out = Vec::with_capacity(limit.min(1024));
        for info in &segments[start..] {
            if out.len() >= limit || info.first_event_seq >= before_seq {
                break;
            }
            let table = self.frame_table(info)?;
            let name = segment_name(info.first_lsn);
            // The first record that may hold a wanted event (a record holds two at most).
            let from = table.partition_point(|f| f.first_event_seq + 2 <= after_seq + 1);
            for frame in &table[from..] {
                if out.len() >= limit || frame.first_event_seq >= before_seq {
                    break;
                }
                let (_, _, record) = self.read_record(&name, info, frame)?;
                for event in record.events(frame.first_event_seq) {
                    if event.seq > after_seq && event.seq < before_seq && out.len() < limit {
                        out.push(event);
                    }
                }
            }
        }
        Ok(out)
    }

    /// One record of a segment: its lsn, its payload and the record decoded.
    fn read_record(
        &self,
        name: &str,
        info: &SegmentInfo,
        frame: &FrameRef,
    ) -> Result<(u64, Vec<u8>, Record), JournalError> {
        let bytes = self
            .storage
            .read_at(name, frame.offset, frame.len)
            .map_err(|e| self.read_error(name, info, &e))?;
        let Some(read) = format::read_frame(&bytes, 0) else {
            return Err(corrupt(
                self.storage.as_ref(),
                name,
                frame.offset,
                "a record changed on disk",
            ));
        };
        let record: Record = crate::engine::codec::decode(read.payload).map_err(|e| {
            corrupt(
                self.storage.as_ref(),
                name,
                frame.offset,
                format!("does not decode: {e}"),
            )
        })?;
        Ok((read.lsn, read.payload.to_vec(), record))
    }

    /// What a failed read of a segment kept for its events means.
    fn read_error(&self, name: &str, info: &SegmentInfo, error: &std::io::Error) -> JournalError {
        if error.kind() == std::io::ErrorKind::NotFound {
            // Removed by a checkpoint since the look at the list: past retention now.
            JournalError::Pruned {
                first_seq: info.first_event_seq,
            }
        } else {
            JournalError::io(format!("reading {}", self.storage.describe(name)), error)
        }
    }

    /// The frames of a segment (from the cache, or by one read of the file).
    fn frame_table(&self, info: &SegmentInfo) -> Result<Arc<Vec<FrameRef>>, JournalError> {
        if let Some(table) = lock(&self.frame_tables).get(info.first_lsn) {
            return Ok(table);
        }
        let name = segment_name(info.first_lsn);
        let bytes = self
            .storage
            .read(&name)
            .map_err(|e| self.read_error(&name, info, &e))?;
        let scan = scan_segment(&bytes, info.first_lsn);
        // The segment after this one, if any: this one's records end where it starts (see
        // `fold`), and only the active segment (the last) may end in a batch being written.
        let successor = self
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|s| s.first_lsn > info.first_lsn)
            .map(|s| s.first_lsn);
        let kept: Vec<&format::Frame<'_>> = scan
            .frames
            .iter()
            .take_while(|f| successor.is_none_or(|next| f.lsn < next))
            .collect();
        let complete = successor.is_none_or(|next| info.first_lsn + kept.len() as u64 == next);
        if !complete {
            let offset = match &scan.tail {
                Tail::Torn { offset } | Tail::Corrupt { offset, .. } => *offset as u64,
                Tail::Clean => bytes.len() as u64,
            };
            return Err(corrupt(
                self.storage.as_ref(),
                &name,
                offset,
                "a segment kept for its events holds a bad record",
            ));
        }
        let table: Vec<FrameRef> = kept
            .iter()
            .map(|f| FrameRef {
                first_event_seq: f.first_event_seq,
                offset: f.offset as u64,
                len: (f.end() - f.offset) as u64,
            })
            .collect();
        let table = Arc::new(table);
        // The active segment grows: its table is not kept.
        if successor.is_some() {
            lock(&self.frame_tables).put(info.first_lsn, Arc::clone(&table));
        }
        Ok(table)
    }
}

/// The segments on disk as a backlog of records (write-behind reads what it was not handed).
struct FileBacklog(Arc<Shared>);

impl crate::journal::downstream::Source<super::pipeline::Committed> for FileBacklog {
    fn read(
        &self,
        after_lsn: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<super::pipeline::Committed>, JournalError>> {
        let shared = Arc::clone(&self.0);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || shared.records_after(after_lsn, limit))
                .await
                .unwrap_or_else(|e| Err(JournalError::Unknown(format!("reading records: {e}"))))
        })
    }
}

impl Shared {
    /// Up to `limit` records with `lsn > after_lsn` from the segments on disk, in order (a record
    /// written but not yet synced may be among the last: the caller bounds by what is durable).
    fn records_after(
        &self,
        after_lsn: u64,
        limit: usize,
    ) -> Result<Vec<super::pipeline::Committed>, JournalError> {
        let segments = self
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let wanted = after_lsn + 1;
        if let Some(first) = segments.first() {
            if wanted < first.first_lsn {
                return Err(JournalError::Corrupt {
                    file: self.storage.describe(&segment_name(first.first_lsn)),
                    offset: 0,
                    reason: format!(
                        "record {wanted} is needed by MySQL (write-behind) but the oldest segment starts at {}",
                        first.first_lsn
                    ),
                });
            }
        }
        let start = segments
            .partition_point(|s| s.first_lsn <= wanted)
            .saturating_sub(1);
        let mut out = Vec::with_capacity(limit.min(4_096));
        for info in &segments[start..] {
            if out.len() >= limit {
                break;
            }
            let table = self.frame_table(info)?;
            let name = segment_name(info.first_lsn);
            let skip = wanted.saturating_sub(info.first_lsn) as usize;
            for frame in table.iter().skip(skip) {
                if out.len() >= limit {
                    break;
                }
                let (lsn, payload, record) = self.read_record(&name, info, frame)?;
                if lsn < wanted {
                    continue;
                }
                let events = record.events(frame.first_event_seq);
                out.push(super::pipeline::Committed {
                    lsn,
                    first_event_seq: frame.first_event_seq,
                    payload,
                    record,
                    events,
                });
            }
        }
        Ok(out)
    }
}

/// Where one record sits in a segment.
#[derive(Debug, Clone, Copy)]
struct FrameRef {
    first_event_seq: u64,
    offset: u64,
    len: u64,
}

/// The frame tables of the few segments read last (a table costs ~24 bytes per record).
#[derive(Default)]
struct FrameTables {
    tables: std::collections::VecDeque<(u64, Arc<Vec<FrameRef>>)>,
}

/// Frame tables kept at once.
const FRAME_TABLES_MAX: usize = 4;

impl FrameTables {
    fn get(&mut self, first_lsn: u64) -> Option<Arc<Vec<FrameRef>>> {
        let position = self.tables.iter().position(|(lsn, _)| *lsn == first_lsn)?;
        let entry = self.tables.remove(position)?;
        let table = Arc::clone(&entry.1);
        self.tables.push_front(entry);
        Some(table)
    }

    fn put(&mut self, first_lsn: u64, table: Arc<Vec<FrameRef>>) {
        self.tables.push_front((first_lsn, table));
        self.tables.truncate(FRAME_TABLES_MAX);
    }

    fn forget(&mut self, removed: &[u64]) {
        self.tables.retain(|(lsn, _)| !removed.contains(lsn));
    }
}

impl Writer {
    fn run(mut self) {
        let mut batch: Vec<Entry> = Vec::with_capacity(1024);
        let mut bytes: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut events: Vec<Event> = Vec::new();
        let mut healthy = true;
        while self
            .shared
            .pipeline
            .take_blocking(self.shared.config.batch_records_max, &mut batch)
        {
            let batch_first_lsn = batch[0].lsn;
            bytes.clear();
            for entry in &mut batch {
                encode_frame(
                    &mut bytes,
                    entry.lsn,
                    entry.first_event_seq,
                    batch_first_lsn,
                    &entry.payload,
                );
                events.append(&mut entry.events);
            }
            let batch_first_event_seq = batch[0].first_event_seq;
            match self.commit(&bytes, batch_first_lsn, batch_first_event_seq) {
                Ok(sync_nanos) => {
                    if let Some(last) = batch.last() {
                        self.durable_lsn = last.lsn;
                        self.durable_next_event_seq =
                            last.first_event_seq + u64::from(last.record.event_count());
                    }
                    if !events.is_empty() {
                        self.shared
                            .events
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(events.drain(..));
                    }
                    self.shared
                        .pipeline
                        .committed(&mut batch, bytes.len() as u64, sync_nanos, &[]);
                }
                Err(error) => {
                    events.clear();
                    healthy = self.recover(error, &mut batch);
                }
            }
        }
        if healthy {
            self.mark_clean_shutdown();
        }
    }

    /// After a failed write: refuses appends, then starts a new segment right after the last
    /// durable record, whose durable name supersedes whatever the failed batch left in the old one
    /// (start-up ignores records at or past a segment's successor). Only then are the batch's
    /// waiters told it failed: it can no longer come back at a restart. Once a probe write
    /// succeeds, it re-reads the journal's tail from disk, as start-up does, and takes appends
    /// again. The failed file is never synced again (a later successful `fsync` says nothing of
    /// pages an earlier one failed to write). Returns false if the journal was closed before it
    /// recovered.
    fn recover(&mut self, error: JournalError, batch: &mut Vec<Entry>) -> bool {
        let shared = Arc::clone(&self.shared);
        let pipeline = &shared.pipeline;
        pipeline.mark_failed(error.clone());
        let mut backoff = crate::backoff::Backoff::new(
            std::time::Duration::from_millis(20),
            std::time::Duration::from_secs(1),
        );
        let mut superseded = false;
        let mut reported_corrupt = false;
        loop {
            if !superseded {
                match self.start_segment_after_durable() {
                    Ok(()) => {
                        superseded = true;
                        super::pipeline::Pipeline::answer_failed(batch, &error);
                    }
                    Err(start_error) => {
                        // The batch may be on the disk or not: its waiters learn that much now
                        // (their keys and holds stay taken until a restart reads the disk).
                        tracing::error!(%start_error, "could not start a new segment; retrying");
                        let unknown = JournalError::Unknown(format!(
                            "{error}; starting a new segment failed too: {start_error}"
                        ));
                        super::pipeline::Pipeline::answer_failed(batch, &unknown);
                    }
                }
            }
            if superseded {
                match self.probe_and_reread() {
                    Ok(()) => {
                        pipeline.reopen(self.durable_lsn + 1, self.durable_next_event_seq);
                        return true;
                    }
                    // The disk's content contradicts what was acknowledged: say so where an
                    // operator looks (/readyz), once; no retry will mend it.
                    Err(corrupt @ JournalError::Corrupt { .. }) => {
                        if !reported_corrupt {
                            reported_corrupt = true;
                            pipeline.mark_failed(corrupt);
                        }
                    }
                    Err(probe_error) => {
                        tracing::warn!(%probe_error, "the journal's disk does not take writes yet")
                    }
                }
            }
            if pipeline.wait_closing(backoff.next_wait()) {
                return false;
            }
        }
    }

    /// Starts a fresh segment named after the last durable record (a failed file of that name,
    /// a segment the failed batch had just started, goes first: its name goes with it).
    fn start_segment_after_durable(&mut self) -> Result<(), JournalError> {
        let storage = Arc::clone(&self.shared.storage);
        let first_lsn = self.durable_lsn + 1;
        let name = segment_name(first_lsn);
        remove_if_present(storage.as_ref(), &name)?;
        let file = storage
            .create(&name)
            .map_err(|e| JournalError::io(format!("creating {}", storage.describe(&name)), &e))?;
        storage
            .sync_dir()
            .map_err(|e| JournalError::io("syncing the journal directory", &e))?;
        if self.file_first_lsn != first_lsn {
            self.closed_since_checkpoint += 1;
        }
        self.file = file;
        self.file_first_lsn = first_lsn;
        self.file_len = 0;
        self.shared
            .segment_started(first_lsn, self.durable_next_event_seq);
        Ok(())
    }

    /// Checks that the disk takes writes (a probe file written, synced and removed), then re-reads
    /// the segment before the new one and checks it ends with the last durable record.
    fn probe_and_reread(&mut self) -> Result<(), JournalError> {
        let storage = Arc::clone(&self.shared.storage);
        let io = |what: &str, e: std::io::Error| JournalError::io(what.to_owned(), &e);
        remove_if_present(storage.as_ref(), SPACE_PROBE)?;
        let probed = storage.create(SPACE_PROBE).and_then(|mut probe| {
            probe.append(&vec![0u8; SPACE_PROBE_BYTES])?;
            probe.sync_data()
        });
        remove_if_present(storage.as_ref(), SPACE_PROBE)?;
        probed.map_err(|e| io("probing the journal's disk", e))?;

        let names = storage
            .list()
            .map_err(|e| io("listing the journal directory", e))?;
        let previous = names
            .iter()
            .filter_map(|n| parse_number(n, "", ".wal"))
            .filter(|&lsn| lsn < self.file_first_lsn)
            .max();
        if let Some(first_lsn) = previous {
            let name = segment_name(first_lsn);
            let bytes = storage
                .read(&name)
                .map_err(|e| io(&format!("reading {}", storage.describe(&name)), e))?;
            let scan = scan_segment(&bytes, first_lsn);
            let last = scan
                .frames
                .iter()
                .take_while(|f| f.lsn < self.file_first_lsn)
                .last()
                .map_or(first_lsn - 1, |f| f.lsn);
            if last != self.durable_lsn {
                return Err(corrupt(
                    storage.as_ref(),
                    &name,
                    0,
                    format!(
                        "after a failed write the journal ends at record {last} where {} was the \
                         last durable one",
                        self.durable_lsn
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Names the last record in a marker, so the next start knows nothing can be torn.
    fn mark_clean_shutdown(&self) {
        let storage = &self.shared.storage;
        let text = format!("last_lsn {}\n", self.durable_lsn);
        if let Err(error) = storage.write_atomic(CLEAN_MARKER, text.as_bytes()) {
            tracing::warn!(%error, "could not mark the clean shutdown; the next start treats it as a crash");
        }
    }

    /// Writes and syncs one batch; returns the sync's duration in nanoseconds.
    fn commit(
        &mut self,
        bytes: &[u8],
        batch_first_lsn: u64,
        batch_first_event_seq: u64,
    ) -> Result<u64, JournalError> {
        if self.file_len > 0
            && self.file_len + bytes.len() as u64 > self.shared.config.segment_bytes_max
        {
            self.roll(batch_first_lsn, batch_first_event_seq)?;
        }
        let storage = &self.shared.storage;
        let name = segment_name(self.file_first_lsn);
        self.file
            .append(bytes)
            .map_err(|e| JournalError::io(format!("writing {}", storage.describe(&name)), &e))?;
        let started = Instant::now();
        self.file
            .sync_data()
            .map_err(|e| JournalError::io(format!("syncing {}", storage.describe(&name)), &e))?;
        self.file_len += bytes.len() as u64;
        Ok(started.elapsed().as_nanos() as u64)
    }

    /// Starts a new segment for the batch beginning at `first_lsn` (the current one is synced).
    fn roll(&mut self, first_lsn: u64, first_event_seq: u64) -> Result<(), JournalError> {
        let storage = &self.shared.storage;
        let name = segment_name(first_lsn);
        self.file = storage
            .create(&name)
            .map_err(|e| JournalError::io(format!("creating {}", storage.describe(&name)), &e))?;
        storage
            .sync_dir()
            .map_err(|e| JournalError::io("syncing the journal directory", &e))?;
        self.file_first_lsn = first_lsn;
        self.file_len = 0;
        self.shared.segment_started(first_lsn, first_event_seq);
        self.closed_since_checkpoint += 1;
        if self.closed_since_checkpoint >= self.shared.config.checkpoint_segments
            && !self.shared.checkpoint_running.swap(true, Ordering::AcqRel)
        {
            self.closed_since_checkpoint = 0;
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("journal-checkpoint".into())
                .spawn(move || {
                    // A snapshot is seconds of CPU on a big state; at the lowest priority it
                    // takes only what the request handlers leave.
                    crate::sync::lower_this_threads_priority(19);
                    match shared.checkpoint(first_lsn) {
                        Ok(lsn) => tracing::info!(lsn, "journal snapshot written"),
                        Err(error) => tracing::error!(%error, "journal snapshot failed"),
                    }
                    shared.checkpoint_running.store(false, Ordering::Release);
                });
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start the snapshot thread");
                self.shared
                    .checkpoint_running
                    .store(false, Ordering::Release);
            }
        }
        Ok(())
    }
}

impl FileJournal {
    /// Waits for everything appended so far to be durable, then stops the writer. Later appends
    /// fail with [`JournalError::Closed`].
    pub fn close(&self) {
        self.shared.pipeline.close();
        let handle = lock(&self.writer).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the journal writer thread panicked");
            }
        }
    }

    /// Up to `limit` durable events with `seq > after_seq`, in order: the recent ones from memory,
    /// older ones from the segments on disk; `Pruned` past `--event-retention`.
    pub fn events_after(&self, after_seq: u64, limit: usize) -> Result<Vec<Event>, JournalError> {
        self.shared.events_after(after_seq, limit)
    }

    /// Hands every batch committed from now on to `sink` (write-behind). Call before appending.
    pub(crate) fn follow(&self, sink: super::pipeline::Sink) {
        self.shared.pipeline.follow(sink);
    }

    /// The durable records on disk, for write-behind's applier.
    pub(crate) fn backlog(
        &self,
    ) -> Arc<dyn crate::journal::downstream::Source<super::pipeline::Committed>> {
        Arc::new(FileBacklog(Arc::clone(&self.shared)))
    }

    /// How many events are held in memory.
    pub fn events_in_memory(&self) -> usize {
        self.shared
            .events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Journal for FileJournal {
    fn append(&self, record: Record) -> Ticket {
        self.shared.pipeline.submit(record)
    }

    fn events(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Event>, JournalError>> {
        // Reading old events may touch the disk: off the runtime's workers.
        Box::pin(async move {
            if after_seq + 1 >= self.shared.first_seq_in_memory() {
                return self.events_after(after_seq, limit);
            }
            let shared = Arc::clone(&self.shared);
            tokio::task::spawn_blocking(move || shared.events_after(after_seq, limit))
                .await
                .unwrap_or_else(|e| Err(JournalError::Unknown(format!("reading events: {e}"))))
        })
    }

    fn stats(&self) -> &JournalStats {
        &self.shared.pipeline.stats
    }

    fn last_event_seq(&self) -> u64 {
        self.shared.pipeline.durable_event_seq()
    }

    fn events_in_memory(&self) -> usize {
        FileJournal::events_in_memory(self)
    }

    fn health(&self) -> Result<(), JournalError> {
        self.shared.pipeline.health()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.close() })
    }
}

impl Drop for FileJournal {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod hold_tests {
    use super::*;
    use crate::journal::pipeline::tests::{record, released_order};
    use std::sync::atomic::AtomicU64;

    /// One record per segment, checkpoints only when asked, every segment past event retention:
    /// only a hold keeps a segment.
    fn past_retention() -> FileJournalConfig {
        FileJournalConfig {
            segment_bytes_max: 1,
            checkpoint_segments: 1_000,
            event_retention_ms: -1_000_000_000,
            ..FileJournalConfig::default()
        }
    }

    #[test]
    fn a_checkpoint_keeps_the_record_mysql_holds_last() {
        // Proves: write-behind's start-up compares MySQL's last record with the same lsn in the
        // data dir, so a checkpoint must keep the segment holding the record at MySQL's cursor,
        // not only those after it; else the next start refuses the data dir MySQL follows.
        let dir = tempfile::tempdir().expect("tempdir");
        let hold = Arc::new(AtomicU64::new(0));
        let config = FileJournalConfig {
            hold_after_lsn: Some(Arc::clone(&hold)),
            ..past_retention()
        };
        let (journal, _) = FileJournal::open_dir(dir.path(), config).expect("open");
        for n in 1..=5 {
            journal.append(record(n)).wait().expect("append");
        }
        // MySQL holds records 1..=3: its last record is 3.
        hold.store(3, Ordering::Release);
        journal.checkpoint_now().expect("checkpoint");
        let read = journal
            .shared
            .records_after(2, 1)
            .map(|r| r.iter().map(|c| c.lsn).collect::<Vec<_>>());
        assert!(
            matches!(&read, Ok(lsns) if lsns == &[3]),
            "record 3 (MySQL's last) must stay readable: {read:?}"
        );
    }

    #[test]
    fn a_checkpoint_keeps_every_event_rabbitmq_has_not_confirmed() {
        // Proves: past --event-retention, segments go only once the relay's saved cursor covers
        // all their events; the first event not confirmed stays readable.
        let dir = tempfile::tempdir().expect("tempdir");
        let hold = Arc::new(AtomicU64::new(0));
        let config = FileJournalConfig {
            hold_events_after_seq: Some(Arc::clone(&hold)),
            // Older events are read from the segments.
            events_in_memory_max: 1,
            ..past_retention()
        };
        let (journal, _) = FileJournal::open_dir(dir.path(), config).expect("open");
        journal.append(record(1)).wait().expect("append");
        for n in 1..=5 {
            journal.append(released_order(n)).wait().expect("append");
        }
        journal.checkpoint_now().expect("checkpoint");
        assert_eq!(
            journal.shared.events_after(0, 100).map(|e| e.len()),
            Ok(10),
            "nothing confirmed: every event stays"
        );
        // The relay saved seq 4: the first two orders' events.
        hold.store(4, Ordering::Release);
        journal.append(record(2)).wait().expect("append");
        journal.checkpoint_now().expect("checkpoint");
        assert_eq!(
            journal.shared.events_after(0, 100).map(|e| e.len()),
            Err(JournalError::Pruned { first_seq: 5 })
        );
        let kept: Vec<u64> = journal
            .shared
            .events_after(4, 100)
            .expect("events after the cursor")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(kept, (5..=10).collect::<Vec<_>>());
    }
}
