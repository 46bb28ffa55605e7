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
mod reads;
mod recovery;
mod snapshot;
pub mod storage;
mod writer;

use super::event_log::EventLog;
use super::pipeline::{Entry, Pipeline};
use super::{Journal, JournalError, JournalStats, Ticket};
use crate::engine::records::{Event, Record, SegmentInfo, State};
use crate::sync::lock;
use crate::BoxFuture;
use format::{encode_frame, scan_segment, Tail};
use reads::*;
use recovery::*;
use snapshot::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;
use storage::{Storage, StorageFile};
use writer::*;

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

/// Written at a clean shutdown, naming the last record: at the next start nothing may be torn.
const CLEAN_MARKER: &str = "clean-shutdown";

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

    fn position(&self) -> super::Position {
        let segments = self
            .shared
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|segment| super::SegmentPosition {
                file: segment_name(segment.first_lsn),
                first_lsn: segment.first_lsn,
                first_event_seq: segment.first_event_seq,
            })
            .collect();
        super::Position {
            kind: "embedded",
            last_lsn: self.shared.pipeline.durable_lsn(),
            segments: Some(segments),
            mysql: None,
        }
    }

    fn events_in_memory(&self) -> usize {
        FileJournal::events_in_memory(self)
    }

    fn health(&self) -> Result<(), JournalError> {
        self.shared.pipeline.health()
    }

    fn shutdown(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.close();
            true
        })
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
