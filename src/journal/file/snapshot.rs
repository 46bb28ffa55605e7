//! Snapshots and checkpoints: the durable state after a record written as one file
//! (`len:u32 | crc32c:u32 | JSON`), and the segments and snapshots a checkpoint no longer needs
//! removed (held while MySQL or the relay still need what they hold).

use super::*;

pub(super) fn read_snapshot(storage: &dyn Storage, lsn: u64) -> Result<State, JournalError> {
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

pub(super) fn write_snapshot(storage: &dyn Storage, state: &State) -> Result<(), JournalError> {
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

/// Writes a snapshot of everything in the closed segments (those before `active_first_lsn`),
/// pruned of what is past retention at `now_ms`, and removes the files it makes redundant:
/// older snapshots, and covered segments whose events are past `--event-retention` (the others
/// stay on disk, listed in the snapshot, so their events stay readable). Runs beside the writer: it
/// reads only closed segments. Returns the lsn the snapshot covers and the segments it removed.
pub(super) fn checkpoint(
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

pub(super) fn remove_if_present(storage: &dyn Storage, name: &str) -> Result<(), JournalError> {
    match storage.remove(name) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(JournalError::io(
            format!("removing {}", storage.describe(name)),
            &e,
        )),
        _ => Ok(()),
    }
}

impl Shared {
    /// Runs one checkpoint at a time, whoever asks.
    pub(super) fn checkpoint(&self, active_first_lsn: u64) -> Result<u64, JournalError> {
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
}
