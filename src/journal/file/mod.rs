//! The embedded journal: append-only segment files in the data directory, group commit with one
//! `fdatasync` per batch, snapshots that keep start-up replay short.
//!
//! Files: `<first lsn, 20 digits>.wal` segments (see [`format`] for the framing) and
//! `snapshot-<lsn, 20 digits>.json` snapshots of the durable [`State`] after record `lsn`
//! (`len:u32 | crc32c:u32 | JSON`). Start-up reads the newest snapshot, replays the records after
//! it, cuts a torn tail off the last segment, and refuses to start on anything else that is bad.
//!
//! Concurrency: the group commit of [`super::pipeline`]; the writer here is a thread that frames a
//! batch, writes it with one `write`, syncs it with one `fdatasync`, publishes its events and
//! answers its waiters.

pub mod format;
pub mod storage;

use super::event_log::EventLog;
use super::pipeline::{Entry, Pipeline};
use super::{Journal, JournalError, JournalStats, Ticket};
use crate::engine::records::{Event, Record, State};
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
}

impl Default for FileJournalConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 64 << 20,
            checkpoint_segments: 4,
            batch_records_max: 8_192,
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
    segments_read: Vec<u64>,
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
        let scan = scan_segment(&bytes, first_lsn);
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
            let record: Record = serde_json::from_slice(frame.payload).map_err(|e| {
                corrupt(
                    storage,
                    &name,
                    frame.offset as u64,
                    format!("record {} does not decode: {e}", frame.lsn),
                )
            })?;
            next_event_seq += u64::from(record.event_count());
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
        segments_read.push(first_lsn);
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

/// Writes a snapshot of everything in the closed segments (those before `active_first_lsn`) and
/// removes the files it makes redundant. Runs beside the writer: it reads only closed segments.
fn checkpoint(storage: &dyn Storage, active_first_lsn: u64) -> Result<u64, JournalError> {
    let recovered = fold(storage, Some(active_first_lsn), false, false)?;
    let lsn = recovered.state.last_lsn;
    if recovered.segments_read.is_empty() || recovered.snapshots.last().is_some_and(|&s| s >= lsn) {
        return Ok(lsn);
    }
    write_snapshot(storage, &recovered.state)?;
    for first_lsn in recovered.segments_read {
        let name = segment_name(first_lsn);
        remove_if_present(storage, &name)?;
    }
    for old in recovered.snapshots {
        remove_if_present(storage, &snapshot_name(old))?;
    }
    storage
        .sync_dir()
        .map_err(|e| JournalError::io("syncing the journal directory", &e))?;
    Ok(lsn)
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
    /// The durable events, in seq order.
    events: RwLock<EventLog>,
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
        tracing::info!(
            records = state.last_lsn,
            snapshot_lsn = recovery.snapshot_lsn,
            replayed = recovery.records_replayed,
            products = state.products.len(),
            orders = state.orders.len(),
            events = state.events.len(),
            "journal recovered"
        );
        let shared = Arc::new(Shared {
            storage,
            config,
            pipeline: Pipeline::new(recovered.next_lsn, recovered.next_event_seq),
            // The events move to the journal's log: the state handed back holds none.
            events: RwLock::new(EventLog::from_events(std::mem::take(&mut state.events))),
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
            .spawn(move || writer.run())
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
        checkpoint(self.storage.as_ref(), active_first_lsn)
    }
}

/// A snapshot is seconds of CPU on a big state; at the lowest priority it takes only what the
/// request handlers leave, instead of stretching their latency tail.
fn lower_this_threads_priority() {
    // SAFETY: setpriority has no memory-safety preconditions; on Linux, `who == 0` with
    // PRIO_PROCESS names the calling thread only. Failure just leaves the priority as it was.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if result != 0 {
        tracing::debug!("could not lower the snapshot thread's priority");
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
            match self.commit(&bytes, batch_first_lsn) {
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

    /// After a failed write: refuses appends, cuts what the failed batch left in the segment (only
    /// then are its waiters told it failed: it can no longer come back at a restart), and once
    /// the disk takes writes again re-reads the journal's tail from disk, as start-up does, and
    /// goes on in a new segment. The failed file is never synced again. Returns false if the
    /// journal was closed before it recovered.
    fn recover(&mut self, error: JournalError, batch: &mut Vec<Entry>) -> bool {
        let shared = Arc::clone(&self.shared);
        let pipeline = &shared.pipeline;
        pipeline.mark_failed(error.clone());
        let mut backoff = std::time::Duration::from_millis(20);
        let mut cut = false;
        loop {
            if !cut {
                match self.cut_failed_batch() {
                    Ok(()) => {
                        cut = true;
                        super::pipeline::Pipeline::answer_failed(batch, &error);
                    }
                    Err(cut_error) => {
                        // The batch may be on the disk or not: its waiters learn that much now
                        // (their keys and holds stay taken until a restart reads the disk).
                        tracing::error!(%cut_error, "could not cut the failed batch; retrying");
                        let unknown = JournalError::Unknown(format!(
                            "{error}; cutting the batch failed too: {cut_error}"
                        ));
                        super::pipeline::Pipeline::answer_failed(batch, &unknown);
                    }
                }
            }
            if cut {
                match self.reopen() {
                    Ok(()) => {
                        pipeline.reopen(self.durable_lsn + 1, self.durable_next_event_seq);
                        return true;
                    }
                    Err(reopen_error) => {
                        tracing::warn!(%reopen_error, "the journal's disk does not take writes yet")
                    }
                }
            }
            if pipeline.wait_closing(backoff) {
                return false;
            }
            backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
        }
    }

    /// Cuts the active segment back to its last synced batch, durably.
    fn cut_failed_batch(&mut self) -> Result<(), JournalError> {
        let storage = &self.shared.storage;
        let name = segment_name(self.file_first_lsn);
        storage
            .truncate(&name, self.file_len)
            .map_err(|e| JournalError::io(format!("cutting {}", storage.describe(&name)), &e))
    }

    /// Checks that the disk takes writes (a probe file written, synced and removed), re-reads the
    /// tail of the newest segment and checks it ends with the last durable record, then starts a
    /// new segment after it.
    fn reopen(&mut self) -> Result<(), JournalError> {
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
        let newest = names
            .iter()
            .filter_map(|n| parse_number(n, "", ".wal"))
            .max();
        if let Some(first_lsn) = newest {
            let name = segment_name(first_lsn);
            let bytes = storage
                .read(&name)
                .map_err(|e| io(&format!("reading {}", storage.describe(&name)), e))?;
            let scan = scan_segment(&bytes, first_lsn);
            let last = scan.frames.last().map_or(first_lsn - 1, |f| f.lsn);
            if scan.tail != Tail::Clean || last != self.durable_lsn {
                return Err(corrupt(
                    storage.as_ref(),
                    &name,
                    bytes.len() as u64,
                    format!(
                        "after a failed write the journal ends at record {last} ({:?}) where {} was \
                         the last durable one",
                        scan.tail, self.durable_lsn
                    ),
                ));
            }
            if scan.frames.is_empty() {
                remove_if_present(storage.as_ref(), &name)?;
            }
        }
        let first_lsn = self.durable_lsn + 1;
        let name = segment_name(first_lsn);
        let file = storage
            .create(&name)
            .map_err(|e| io(&format!("creating {}", storage.describe(&name)), e))?;
        storage
            .sync_dir()
            .map_err(|e| io("syncing the journal directory", e))?;
        self.file = file;
        self.file_first_lsn = first_lsn;
        self.file_len = 0;
        self.closed_since_checkpoint += 1;
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
    fn commit(&mut self, bytes: &[u8], batch_first_lsn: u64) -> Result<u64, JournalError> {
        if self.file_len > 0
            && self.file_len + bytes.len() as u64 > self.shared.config.segment_bytes_max
        {
            self.roll(batch_first_lsn)?;
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
    fn roll(&mut self, first_lsn: u64) -> Result<(), JournalError> {
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
        self.closed_since_checkpoint += 1;
        if self.closed_since_checkpoint >= self.shared.config.checkpoint_segments
            && !self.shared.checkpoint_running.swap(true, Ordering::AcqRel)
        {
            self.closed_since_checkpoint = 0;
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("journal-checkpoint".into())
                .spawn(move || {
                    lower_this_threads_priority();
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

    /// Up to `limit` durable events with `seq > after_seq`, in order.
    pub fn events_after(&self, after_seq: u64, limit: usize) -> Vec<Event> {
        self.shared
            .events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .after(after_seq, limit)
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
        let events = self.events_after(after_seq, limit);
        Box::pin(async move { Ok(events) })
    }

    fn stats(&self) -> &JournalStats {
        &self.shared.pipeline.stats
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
