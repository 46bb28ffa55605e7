//! The durable events in memory, in seq order, in fixed-size chunks: an append never moves the
//! events already there (a single growing `Vec` would copy all of them at each doubling, stalling
//! the writer for tens of milliseconds once there are millions).

use crate::engine::records::Event;

/// Events per chunk.
const CHUNK_EVENTS: usize = 1 << 16;

/// Events in seq order.
#[derive(Default)]
pub struct EventLog {
    chunks: Vec<Vec<Event>>,
}

impl EventLog {
    /// A log holding `events` (in seq order).
    pub fn from_events(events: Vec<Event>) -> Self {
        let mut log = Self::default();
        log.extend(events);
        log
    }

    /// Appends events (in seq order, after those held).
    pub fn extend(&mut self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            match self.chunks.last_mut() {
                Some(chunk) if chunk.len() < CHUNK_EVENTS => chunk.push(event),
                _ => {
                    let mut chunk = Vec::with_capacity(CHUNK_EVENTS);
                    chunk.push(event);
                    self.chunks.push(chunk);
                }
            }
        }
    }

    /// Up to `limit` events with `seq > after_seq`, in order.
    pub fn after(&self, after_seq: u64, limit: usize) -> Vec<Event> {
        // The first chunk that may hold a later event: chunks are in seq order.
        let first = self
            .chunks
            .partition_point(|chunk| chunk.last().is_some_and(|e| e.seq <= after_seq));
        let mut out = Vec::with_capacity(limit.min(1024));
        for chunk in &self.chunks[first..] {
            let start = chunk.partition_point(|e| e.seq <= after_seq);
            for event in &chunk[start..] {
                if out.len() == limit {
                    return out;
                }
                out.push(event.clone());
            }
        }
        out
    }

    /// How many events are held.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// True if no event is held.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, OrderId};
    use crate::engine::order::OrderStatus;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            status: OrderStatus::Reserved,
            order_id: OrderId::parse("o").unwrap(),
            at_ms: 0,
            total_cents: 0,
            currency: Currency::parse("EUR").unwrap(),
        }
    }

    #[test]
    fn pages_cross_chunk_boundaries() {
        let total = CHUNK_EVENTS as u64 * 2 + 10;
        let log = EventLog::from_events((1..=total).map(event).collect());
        assert_eq!(log.len() as u64, total);
        let page = log.after(CHUNK_EVENTS as u64 - 2, 5);
        let seqs: Vec<u64> = page.iter().map(|e| e.seq).collect();
        let first = CHUNK_EVENTS as u64 - 1;
        assert_eq!(seqs, (first..first + 5).collect::<Vec<_>>());
        assert!(log.after(total, 10).is_empty());
        assert_eq!(log.after(0, 3).len(), 3);
        assert_eq!(log.after(total - 2, 100).len(), 2);
    }
}
