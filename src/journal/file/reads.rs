//! Reads of what is durable: events past memory from the segments on disk (paged with the frame
//! tables of the few segments read last), and records after an lsn for the MySQL applier in
//! write-behind (its backlog).

use super::*;

impl Shared {
    /// Up to `limit` durable events with `seq > after_seq`, in order: the recent ones from memory,
    /// older ones from the segments on disk; `Pruned` past `--event-retention`.
    pub(super) fn events_after(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Event>, JournalError> {
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
    pub(super) fn first_seq_in_memory(&self) -> u64 {
        self.events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .first_seq()
    }

    /// A segment was started for records from `first_lsn`, events from `first_event_seq`.
    pub(super) fn segment_started(&self, first_lsn: u64, first_event_seq: u64) {
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
    pub(super) fn events_on_disk(
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
    pub(super) fn read_record(
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
    pub(super) fn read_error(
        &self,
        name: &str,
        info: &SegmentInfo,
        error: &std::io::Error,
    ) -> JournalError {
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
    pub(super) fn frame_table(
        &self,
        info: &SegmentInfo,
    ) -> Result<Arc<Vec<FrameRef>>, JournalError> {
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
pub(super) struct FileBacklog(pub(super) Arc<Shared>);

impl crate::journal::downstream::Source<crate::journal::pipeline::Committed> for FileBacklog {
    fn read(
        &self,
        after_lsn: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<crate::journal::pipeline::Committed>, JournalError>> {
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
    pub(super) fn records_after(
        &self,
        after_lsn: u64,
        limit: usize,
    ) -> Result<Vec<crate::journal::pipeline::Committed>, JournalError> {
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
                out.push(crate::journal::pipeline::Committed {
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
pub(super) struct FrameRef {
    pub(super) first_event_seq: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// The frame tables of the few segments read last (a table costs ~24 bytes per record).
#[derive(Default)]
pub(super) struct FrameTables {
    pub(super) tables: std::collections::VecDeque<(u64, Arc<Vec<FrameRef>>)>,
}

/// Frame tables kept at once.
pub(super) const FRAME_TABLES_MAX: usize = 4;

impl FrameTables {
    pub(super) fn get(&mut self, first_lsn: u64) -> Option<Arc<Vec<FrameRef>>> {
        let position = self.tables.iter().position(|(lsn, _)| *lsn == first_lsn)?;
        let entry = self.tables.remove(position)?;
        let table = Arc::clone(&entry.1);
        self.tables.push_front(entry);
        Some(table)
    }

    pub(super) fn put(&mut self, first_lsn: u64, table: Arc<Vec<FrameRef>>) {
        self.tables.push_front((first_lsn, table));
        self.tables.truncate(FRAME_TABLES_MAX);
    }

    pub(super) fn forget(&mut self, removed: &[u64]) {
        self.tables.retain(|(lsn, _)| !removed.contains(lsn));
    }
}
