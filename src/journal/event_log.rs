//! The most recent durable events in memory, in seq order, in fixed-size chunks: an append never
//! moves the events already there (a single growing `Vec` would copy all of them at each
//! doubling, stalling the writer for tens of milliseconds once there are millions). The log keeps
//! a bounded window: past `events_max` the oldest chunk goes (older events are read from disk).

use crate::engine::records::Event;

/// Events per chunk.
const CHUNK_EVENTS: usize = 1 << 16;

/// Events in seq order, the most recent `events_max` or a chunk more.
pub struct EventLog {
    chunks: std::collections::VecDeque<Vec<Event>>,
    events_max: usize,
    /// How many events are held.
    len: usize,
    /// The seq the next event gets: where an empty log starts.
    next_seq: u64,
}

impl EventLog {
    /// A log holding the most recent of `events` (in seq order), the next of which gets
    /// `next_seq`.
    pub fn from_events(events: Vec<Event>, events_max: usize, next_seq: u64) -> Self {
        let mut log = Self {
            chunks: std::collections::VecDeque::new(),
            events_max: events_max.max(1),
            len: 0,
            next_seq,
        };
        log.extend(events);
        log.next_seq = log.next_seq.max(next_seq);
        log
    }

    /// The seq of the oldest event held (or of the next one, if none is held): every event from
    /// here on is in memory.
    pub fn first_seq(&self) -> u64 {
        self.chunks
            .front()
            .and_then(|c| c.first())
            .map_or(self.next_seq, |e| e.seq)
    }

    /// Appends events (in seq order, after those held).
    pub fn extend(&mut self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            self.next_seq = event.seq + 1;
            self.len += 1;
            match self.chunks.back_mut() {
                Some(chunk) if chunk.len() < CHUNK_EVENTS.min(self.events_max) => chunk.push(event),
                _ => {
                    let mut chunk = Vec::with_capacity(CHUNK_EVENTS.min(self.events_max));
                    chunk.push(event);
                    self.chunks.push_back(chunk);
                }
            }
        }
        // Whole chunks go, so the window is `events_max` to `events_max` + a chunk.
        while self.chunks.len() > 1
            && self.len - self.chunks.front().map_or(0, Vec::len) >= self.events_max
        {
            if let Some(chunk) = self.chunks.pop_front() {
                self.len -= chunk.len();
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
        for chunk in self.chunks.range(first..) {
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
        self.len
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
            customer_id: crate::domain::CustomerId::parse("c").unwrap(),
            items: Vec::new(),
        }
    }

    #[test]
    fn pages_cross_chunk_boundaries() {
        let total = CHUNK_EVENTS as u64 * 2 + 10;
        let log = EventLog::from_events((1..=total).map(event).collect(), usize::MAX, 1);
        assert_eq!(log.len() as u64, total);
        let page = log.after(CHUNK_EVENTS as u64 - 2, 5);
        let seqs: Vec<u64> = page.iter().map(|e| e.seq).collect();
        let first = CHUNK_EVENTS as u64 - 1;
        assert_eq!(seqs, (first..first + 5).collect::<Vec<_>>());
        assert!(log.after(total, 10).is_empty());
        assert_eq!(log.after(0, 3).len(), 3);
        assert_eq!(log.after(total - 2, 100).len(), 2);
    }

    #[test]
    fn the_window_keeps_the_most_recent_events() {
        let max = CHUNK_EVENTS;
        let total = CHUNK_EVENTS as u64 * 5 + 3;
        let mut log = EventLog::from_events(Vec::new(), max, 1);
        assert_eq!(log.first_seq(), 1);
        for seq in 1..=total {
            log.extend([event(seq)]);
            assert!(log.len() <= max + CHUNK_EVENTS);
        }
        assert!(log.len() >= max);
        let first = log.first_seq();
        assert_eq!(first, total - log.len() as u64 + 1);
        assert_eq!(log.after(first - 1, 2).first().map(|e| e.seq), Some(first));
    }
}
