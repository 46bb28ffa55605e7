//! The writer thread: frames a batch, writes it with one `write`, syncs it with one `fdatasync`,
//! publishes its events and answers its waiters; after a failed write or sync it cuts the batch
//! off, probes the disk until it takes writes again, re-reads the tail and goes on in a new
//! segment.

use super::*;

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) file: Box<dyn StorageFile>,
    pub(super) file_first_lsn: u64,
    /// The length of the segment up to its last synced batch.
    pub(super) file_len: u64,
    pub(super) closed_since_checkpoint: usize,
    /// The last lsn on stable storage.
    pub(super) durable_lsn: u64,
    /// The seq the next durable event gets.
    pub(super) durable_next_event_seq: u64,
}

/// The probe a failed journal writes (and removes) to learn whether the disk takes writes again.
pub(super) const SPACE_PROBE: &str = "space-probe.tmp";

/// Bytes of the probe: a batch's worth, so the first batch after recovery is likely to fit.
pub(super) const SPACE_PROBE_BYTES: usize = 256 << 10;

impl Writer {
    pub(super) fn run(mut self) {
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
    pub(super) fn recover(&mut self, error: JournalError, batch: &mut Vec<Entry>) -> bool {
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
                        crate::journal::pipeline::Pipeline::answer_failed(batch, &error);
                    }
                    Err(start_error) => {
                        // The batch may be on the disk or not: its waiters learn that much now
                        // (their keys and holds stay taken until a restart reads the disk).
                        tracing::error!(%start_error, "could not start a new segment; retrying");
                        let unknown = JournalError::Unknown(format!(
                            "{error}; starting a new segment failed too: {start_error}"
                        ));
                        crate::journal::pipeline::Pipeline::answer_failed(batch, &unknown);
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
    pub(super) fn start_segment_after_durable(&mut self) -> Result<(), JournalError> {
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
    pub(super) fn probe_and_reread(&mut self) -> Result<(), JournalError> {
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
    pub(super) fn mark_clean_shutdown(&self) {
        let storage = &self.shared.storage;
        let text = format!("last_lsn {}\n", self.durable_lsn);
        if let Err(error) = storage.write_atomic(CLEAN_MARKER, text.as_bytes()) {
            tracing::warn!(%error, "could not mark the clean shutdown; the next start treats it as a crash");
        }
    }

    /// Writes and syncs one batch; returns the sync's duration in nanoseconds.
    pub(super) fn commit(
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
    pub(super) fn roll(
        &mut self,
        first_lsn: u64,
        first_event_seq: u64,
    ) -> Result<(), JournalError> {
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
