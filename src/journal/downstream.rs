//! Downstream of the journal: one pattern, one mechanism. What follows the journal — the MySQL
//! applier ([`super::mysql::projection::applier`]: records by lsn into the tables, and in
//! write-behind the log rows too) and the RabbitMQ relay ([`crate::events::relay`]: events by seq
//! to an exchange) — is an ordered reader with a durable cursor and an idempotent far side:
//!
//! - **The source** ([`Source`]) gives the items after a position, in order. A [`Reader`] reads
//!   ahead of the far side, and never past what the source had made durable *before* the read: a
//!   bound taken after it would take for durable the bytes of a batch being synced, or those of a
//!   failed batch that the source's recovery supersedes (same positions, other records). It goes
//!   on past positions the source no longer keeps ([`JournalError::Pruned`]) or never made (the
//!   lsns and seqs of records MySQL refused), and says which it met, so its owner waits before
//!   asking again instead of spinning on a gap.
//! - **The cursor** is the far side's: the last position it took for good, and where a reader
//!   starts again (after a restart, a lost connection, a refused batch). The applier moves it in
//!   the very transaction that writes the projections (`projection_cursor`, read `FOR UPDATE`,
//!   records at or below it dropped), so a record is applied exactly once whoever replays it. The
//!   relay saves it ([`Cursor`]: a file in the data dir, or an `outbox_cursor` row) after the
//!   broker's confirms, so a message is at most repeated and its consumers drop it by
//!   `message_id`. Either way a crash repeats at most what the far side took after the cursor,
//!   and the far side takes it again without harm.
//! - **Retries** are backed off with the one [`crate::backoff::Backoff`] and start again from the
//!   cursor: a passing fault (database or broker unreachable) is retried for as long as it lasts;
//!   a refusal for good stops the reader at that item and says so (`/readyz`, `/metrics`, an ERROR
//!   log) until an operator acts (`turnstile mysql-apply --skip`).
//!
//! Not such a reader: the settler (`app::money`). What it owes the gateway is part of the durable
//! state (an order's `payment_due`, recovered with memory), not a position in the log, and its
//! far side is made idempotent by the keys it calls the gateway with; reading the log for it would
//! only rebuild what memory already holds.

use super::pipeline::Committed;
use super::{Journal, JournalError};
use crate::engine::records::Event;
use crate::BoxFuture;
use std::collections::VecDeque;
use std::sync::Arc;

/// An item of the journal with its position in the source's order.
pub trait Positioned {
    /// The lsn of a record, the seq of an event: strictly increasing along the source.
    fn position(&self) -> u64;
}

impl Positioned for Committed {
    fn position(&self) -> u64 {
        self.lsn
    }
}

impl Positioned for Event {
    fn position(&self) -> u64 {
        self.seq
    }
}

/// What a reader reads: the journal's items after a position, in order.
pub trait Source<T>: Send + Sync {
    /// Up to `limit` items with a position above `after`, in order (the last ones may not be
    /// durable yet: the [`Reader`] bounds them).
    fn read(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<T>, JournalError>>;
}

/// The journal's events (the relay's source).
impl Source<Event> for dyn Journal {
    fn read(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<Event>, JournalError>> {
        self.events(after, limit)
    }
}

/// Where a far side that does not move its cursor in its own writes keeps it.
pub trait Cursor: Send + Sync {
    /// The last position the far side took for good (0: none).
    fn load(&self) -> BoxFuture<'_, Result<u64, String>>;
    /// Saves `position` durably.
    fn save(&self, position: u64) -> BoxFuture<'_, Result<(), String>>;
}

/// What a [`Reader::fill`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// Items read, waiting in the reader.
    Items,
    /// Nothing durable past the reader's position.
    CaughtUp,
    /// The source says there is more, but a read found none before the bound: positions the
    /// source never made (a refused record's). Ask again later, not at once.
    Gap,
    /// The items up to `first - 1` left the source before they were read; the reader goes on from
    /// `first` (its owner says so: they were never sent).
    Pruned {
        /// The first position the source still keeps.
        first: u64,
    },
}

/// Reads a [`Source`] in order, ahead of its far side.
pub struct Reader<T, S: Source<T> + ?Sized> {
    source: Arc<S>,
    /// The last position read (given out, or waiting in `ahead`).
    after: u64,
    ahead: VecDeque<T>,
    limit: usize,
}

impl<T: Positioned, S: Source<T> + ?Sized> Reader<T, S> {
    /// A reader of `source` from after `after` (the far side's cursor), `limit` items per read.
    pub fn new(source: Arc<S>, after: u64, limit: usize) -> Self {
        Self {
            source,
            after,
            ahead: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    /// The last position read.
    pub fn after(&self) -> u64 {
        self.after
    }

    /// Starts again after `after` (the far side's cursor, or past a gap); what was read ahead is
    /// dropped.
    pub fn seek(&mut self, after: u64) {
        self.after = after;
        self.ahead.clear();
    }

    /// Whether nothing read waits to be taken.
    pub fn is_empty(&self) -> bool {
        self.ahead.is_empty()
    }

    /// Reads on, keeping only items at or below `durable` (the source's durable position, taken
    /// by the caller *before* this call) and below `before`.
    pub async fn fill(&mut self, durable: u64, before: u64) -> Result<Filled, JournalError> {
        if durable <= self.after {
            return Ok(Filled::CaughtUp);
        }
        let mut read = match self.source.read(self.after, self.limit).await {
            Err(JournalError::Pruned { first_seq }) if first_seq > self.after + 1 => {
                self.seek(first_seq - 1);
                return Ok(Filled::Pruned { first: first_seq });
            }
            other => other?,
        };
        let after = self.after;
        // Items past the bound taken before the read: more are coming, no gap.
        let coming = read
            .iter()
            .any(|item| item.position() > durable && item.position() < before);
        read.retain(|item| {
            let at = item.position();
            at > after && at <= durable && at < before
        });
        match read.last() {
            None if coming => Ok(Filled::CaughtUp),
            None => Ok(Filled::Gap),
            Some(last) => {
                self.after = last.position();
                self.ahead.extend(read);
                Ok(Filled::Items)
            }
        }
    }

    /// The next item read, in order.
    pub fn pop(&mut self) -> Option<T> {
        self.ahead.pop_front()
    }

    /// Everything read, in order.
    pub fn take_all(&mut self) -> Vec<T> {
        self.ahead.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Items in order, some positions never made, those before `first` gone; a read returns
    /// what is written, durable or not (the reader bounds it).
    struct Fake {
        items: Mutex<Vec<u64>>,
        first: u64,
    }

    impl Positioned for u64 {
        fn position(&self) -> u64 {
            *self
        }
    }

    impl Source<u64> for Fake {
        fn read(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<u64>, JournalError>> {
            let items = self.items.lock().unwrap().clone();
            let first = self.first;
            Box::pin(async move {
                if after + 1 < first {
                    return Err(JournalError::Pruned { first_seq: first });
                }
                Ok(items
                    .into_iter()
                    .filter(|&i| i > after)
                    .take(limit)
                    .collect())
            })
        }
    }

    fn run<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// Items past the durable bound (written, being synced) are never given out, a gap is said
    /// once and not read past, what left the source is skipped and said, and the reader gives
    /// every durable item exactly once, in order.
    #[test]
    fn a_reader_gives_every_durable_item_once_in_order_and_nothing_past_the_bound() {
        run(async {
            let source = Arc::new(Fake {
                items: Mutex::new(vec![3, 4, 5, 7, 8, 9, 10]),
                first: 3,
            });
            let mut reader = Reader::new(Arc::clone(&source), 0, 2);
            assert_eq!(
                reader.fill(8, u64::MAX).await.unwrap(),
                Filled::Pruned { first: 3 }
            );
            let mut given = Vec::new();
            loop {
                match reader.fill(8, u64::MAX).await.unwrap() {
                    Filled::Items => given.extend(reader.take_all()),
                    Filled::CaughtUp => break,
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(given, vec![3, 4, 5, 7, 8]);
            assert_eq!(reader.after(), 8);
            // Nothing durable past 8 yet, though 9 and 10 are written.
            assert_eq!(reader.fill(8, u64::MAX).await.unwrap(), Filled::CaughtUp);
            // The bound taken before 9 became durable: 9 is coming, no gap.
            reader.seek(8);
            assert_eq!(reader.fill(8, u64::MAX).await.unwrap(), Filled::CaughtUp);
            // A bound before the next item: nothing taken.
            assert_eq!(reader.fill(10, 9).await.unwrap(), Filled::Gap);
            assert_eq!(reader.after(), 8);
            assert_eq!(reader.fill(10, u64::MAX).await.unwrap(), Filled::Items);
            assert_eq!(reader.pop(), Some(9));
            assert_eq!(reader.pop(), Some(10));
            assert_eq!(reader.pop(), None);
            // The source says 12 is durable but 11 and 12 were never made: a gap, said, not
            // read past.
            assert_eq!(reader.fill(12, u64::MAX).await.unwrap(), Filled::Gap);
            assert_eq!(reader.after(), 10);
            // Back to the far side's cursor: read again from there.
            reader.seek(4);
            assert_eq!(reader.fill(10, u64::MAX).await.unwrap(), Filled::Items);
            assert_eq!(reader.take_all(), vec![5, 7]);
        });
    }
}
