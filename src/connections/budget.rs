//! The bytes of answers not yet sent, bounded across all connections.
//!
//! A client decides how fast an answer leaves: one that never reads (HTTP/1), or never opens its
//! HTTP/2 flow-control window, keeps the answer's bytes in the server, and a few connections
//! asking for large answers (`GET /v1/events?limit=1000`, ~0.3 MB) on many streams could make the
//! server hold gigabytes. So every answer's body is counted from the moment its handler returns
//! it until its last byte has been handed to the socket:
//!
//! - [`ResponseBudget`] holds at most `--response-bytes-max` bytes of unsent answers, in one
//!   counter for all cores: the bound is exact whatever an answer's size (a page of 1,000 events
//!   of 100-line orders runs to megabytes), which shares split per core could not promise. It
//!   costs an atomic add per answer and a subtract per chunk on one shared cache line. A read's
//!   answer (GET, HEAD), or a write's refusal (`4xx`), larger than 1 KiB that does not fit is
//!   replaced by `503 overloaded` with `Retry-After` (counted: `turnstile_responses_refused_total`).
//!   An answer to a request that may have changed something is never refused (a `201` replaced by
//!   "nothing changed" would make a careful client buy again under another key): so a write is
//!   refused *before* it runs, with `503 overloaded` (true: nothing changed), once the unsent
//!   bytes pass the bound plus a quarter ([`ResponseBudget::admit_write`]: each write let in holds
//!   a small answer's room until its answer is counted, so writes let in together cannot all
//!   answer past it), and the answers of the writes let in are counted past it. Writes still run while reads alone fill the bound, and
//!   answers to writes nobody reads (a cancel that changes nothing, asked on many streams) cannot
//!   pile up past the bound plus that quarter plus the few running when it was reached. Small
//!   answers (health checks, the `503`s themselves) are never refused: they keep the server
//!   reachable. The operations answers (`/metrics`, `/readyz`, `/healthz`) asked with the
//!   `--admin-token` (by anyone when none is set) have a reserve past all of that.
//! - [`CountedBody`] hands the body out in chunks of at most [`CHUNK_BYTES`], each a `Bytes`
//!   whose owner gives its bytes back when the last reference goes: when hyper (or HTTP/2's send
//!   buffer) has written it to the socket, or dropped it with a reset stream or a closed
//!   connection. The part not handed out yet is held by the body's own reservation. So the count
//!   is exact wherever the bytes wait, and memory for unsent answers stays below the bound plus
//!   the 503 bodies.
//! - Each chunk also tells its answer's progress (on its connection's [`Activity`]) when it left,
//!   so the accept loop can close a connection one of whose answers has made no progress for the
//!   slow-client timeout, however its other streams move (`serve_one`).

use super::activity::{Activity, Progress};
use axum::body::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The most bytes handed to hyper at once: one HTTP/2 DATA frame at its default size. A chunk is
/// counted until written, so the part of an answer waiting in HTTP/2's send buffer is at most
/// this per stream beyond what the window allowed, and a client that opens its window by a byte
/// at a time moves at most this much per step.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// How far past `--response-bytes-max` the operations answers (`/metrics`, `/readyz`,
/// `/healthz`) may go, so the operator still sees the server while clients fill the bound.
pub const OPERATIONS_RESERVE_BYTES: usize = 4 * 1024 * 1024;

/// What an answer may take of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// Up to the bound.
    WithinBound,
    /// Up to the bound and the writes' quarter: a small answer (the operations reserve above it
    /// stays the operator's).
    Small,
    /// Up to the bound, the writes' quarter and [`OPERATIONS_RESERVE_BYTES`].
    WithReserve,
    /// Whatever it needs, counted past the bound (answers that must be sent).
    Always,
}

/// The bytes of unsent answers, at most `max` across all connections.
#[derive(Debug)]
pub struct ResponseBudget {
    /// Bytes held, on cache lines of their own.
    held: Padded,
    /// The bound, as configured.
    max: usize,
    /// Answers replaced by `503 overloaded` because they did not fit.
    refused: AtomicU64,
    /// `--admin-token`: only operations answers asked with it may use the reserve (anyone's
    /// may without one).
    operations_token: Option<Box<str>>,
}

/// An atomic on two cache lines of its own (the adjacent-line prefetcher pulls pairs), so the
/// counters beside it are not written by every answer.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicUsize);

impl ResponseBudget {
    /// A budget of `max` bytes for the life of the process (the connections and `/metrics` share
    /// it; a `'static` reference keeps a shared reference count off the request path).
    pub fn leak(max: usize, operations_token: Option<&str>) -> &'static Self {
        Box::leak(Box::new(Self {
            held: Padded::default(),
            max,
            refused: AtomicU64::new(0),
            operations_token: operations_token.map(Box::from),
        }))
    }

    /// Whether a request with `headers` may use the operations reserve: it carries the
    /// `--admin-token`, or none is set.
    pub(super) fn may_use_reserve(&self, headers: &axum::http::HeaderMap) -> bool {
        self.operations_token
            .as_deref()
            .is_none_or(|token| crate::api::bears_token(headers, token))
    }

    /// Bytes of answers not yet sent, across all connections.
    pub fn unsent(&self) -> usize {
        self.held.0.load(Ordering::Relaxed)
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Answers refused so far for want of room.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// How far the answers of writes may take the unsent bytes before new writes are refused:
    /// the bound plus a quarter, so reads filling the bound never stop checkouts.
    fn write_limit(&self) -> usize {
        self.max.saturating_add(self.max / 4)
    }

    /// Lets a write run if there is room for a small answer below the writes' limit, and holds
    /// that room ([`WRITE_PROVISION_BYTES`]) until its answer is counted: writes let in together
    /// (thousands of streams at once) then cannot all answer past the limit. `None` (counted as
    /// refused): the write must not run.
    pub(super) fn admit_write(&'static self) -> Option<Provision> {
        let bytes = WRITE_PROVISION_BYTES;
        // Made only when taken: a provision dropped gives its bytes back.
        self.take(bytes, self.write_limit()).then(|| Provision {
            budget: self,
            bytes,
        })
    }

    /// Counts `bytes` if they fit under `limit`; else counts a refusal. Racing takers never pass
    /// the limit together: each adds first and takes back what did not fit.
    fn take(&self, bytes: usize, limit: usize) -> bool {
        let before = self.held.0.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > limit {
            self.held.0.fetch_sub(bytes, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Whether a write may run now (its answer will be counted whatever its size); counted as
    /// refused if not.
    pub fn admits_write(&self) -> bool {
        let admitted = self.unsent() < self.write_limit();
        if !admitted {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// Takes `bytes` within what `room` allows ([`Self::take`]). `None`: no room.
    pub(super) fn reserve(
        &'static self,
        bytes: usize,
        activity: &Arc<Activity>,
        room: Room,
    ) -> Option<Held> {
        let limit = match room {
            Room::Always => usize::MAX,
            Room::Small => self.write_limit(),
            Room::WithReserve => self.write_limit().saturating_add(OPERATIONS_RESERVE_BYTES),
            Room::WithinBound => self.max,
        };
        if !self.take(bytes, limit) {
            return None;
        }
        Some(Held {
            budget: self,
            bytes,
            progress: activity.answer(bytes),
            activity: Arc::clone(activity),
        })
    }
}

/// What an admitted write holds of the budget until its answer is counted: a small answer's room.
pub(super) const WRITE_PROVISION_BYTES: usize = 1024;

/// The room a write let in holds until its answer is counted; given back when dropped.
pub(super) struct Provision {
    budget: &'static ResponseBudget,
    bytes: usize,
}

impl Drop for Provision {
    fn drop(&mut self) {
        self.budget.held.0.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Bytes of one answer counted against the budget and its connection; given back when dropped.
pub(super) struct Held {
    budget: &'static ResponseBudget,
    bytes: usize,
    /// The answer these bytes belong to, on its connection.
    progress: Arc<Progress>,
    activity: Arc<Activity>,
}

impl Held {
    /// Moves `bytes` of this reservation into a new one (for a chunk handed out).
    fn split(&mut self, bytes: usize) -> Held {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Held {
            budget: self.budget,
            bytes,
            progress: Arc::clone(&self.progress),
            activity: Arc::clone(&self.activity),
        }
    }

    /// Counts `bytes` more (a body longer than its size hint said), past the bound if need be:
    /// the answer is already under way.
    fn grow(&mut self, bytes: usize) {
        self.budget.held.0.fetch_add(bytes, Ordering::AcqRel);
        self.activity.unsent_added(&self.progress, bytes);
        self.bytes += bytes;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.held.0.fetch_sub(self.bytes, Ordering::AcqRel);
            self.activity.unsent_sent(&self.progress, self.bytes);
        }
    }
}

/// A chunk handed to hyper: its bytes, and their place in the budget until it is dropped.
struct Chunk {
    data: Bytes,
    _held: Held,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// An answer's body, counted against the budget until every byte has left (see the module).
pub(super) struct CountedBody {
    /// axum's body (boxed, so `Unpin`).
    inner: axum::body::Body,
    /// Data taken from `inner` and not handed out yet.
    pending: Bytes,
    /// The bytes of `pending` and of what `inner` still holds.
    held: Held,
}

impl CountedBody {
    /// `inner`, counted under `held` (its whole size, as far as its size hint tells).
    pub(super) fn new(inner: axum::body::Body, held: Held) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
            held,
        }
    }
}

/// The bytes an answer's body will hand out, as far as it says before it is read.
pub(super) fn expected_bytes(body: &axum::body::Body) -> usize {
    let hint = body.size_hint();
    let bytes = hint.exact().unwrap_or_else(|| hint.lower());
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let take = this.pending.len().min(CHUNK_BYTES);
                let data = this.pending.split_to(take);
                let held = this.held.split(take);
                let chunk = Bytes::from_owner(Chunk { data, _held: held });
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if data.len() > this.held.bytes {
                            this.held.grow(data.len() - this.held.bytes);
                        }
                        this.pending = data;
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        // The upper bound first: a lower bound is never set above the upper one.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + pending);
        }
        hint.set_lower(hint.lower() + pending);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn every_byte_is_counted_until_its_chunk_is_dropped_and_past_the_bound_none_is_taken() {
        // Proves: an answer's bytes stay counted (in the budget and on its connection) until the
        // chunk holding them is dropped, wherever they wait; chunks are at most CHUNK_BYTES;
        // past the bound a reservation is refused (and counted), a forced one is not.
        let budget = ResponseBudget::leak(1 << 20, None);
        let activity = Activity::new();
        let body = axum::body::Body::from(vec![7u8; 40_000]);
        let held = budget
            .reserve(expected_bytes(&body), &activity, Room::WithinBound)
            .expect("room");
        assert_eq!(budget.unsent(), 40_000);
        let mut counted = CountedBody::new(body, held);
        let mut chunks = Vec::new();
        while let Some(frame) = counted.frame().await {
            let data = frame.expect("frame").into_data().expect("data");
            assert!(data.len() <= CHUNK_BYTES);
            chunks.push(data);
        }
        drop(counted);
        assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), 40_000);
        assert_eq!(budget.unsent(), 40_000, "handed out is not sent");
        assert!(activity.stalled_for().is_some());
        let last = chunks.pop().expect("a chunk");
        drop(chunks);
        assert_eq!(budget.unsent(), last.len());
        drop(last);
        assert_eq!(budget.unsent(), 0);
        assert!(activity.stalled_for().is_none());

        let big = budget
            .reserve(1 << 20, &activity, Room::WithinBound)
            .expect("the whole budget");
        assert!(budget.reserve(1, &activity, Room::WithinBound).is_none());
        assert_eq!(budget.refused(), 1);
        let forced = budget
            .reserve(100, &activity, Room::Always)
            .expect("forced");
        assert_eq!(budget.unsent(), (1 << 20) + 100);
        assert!(
            budget.admits_write(),
            "writes run up to the bound plus a quarter"
        );
        let writes = budget
            .reserve(1 << 18, &activity, Room::Always)
            .expect("forced");
        assert!(!budget.admits_write());
        assert_eq!(budget.refused(), 2, "a write turned away is counted");
        let operations = budget
            .reserve(OPERATIONS_RESERVE_BYTES, &activity, Room::WithReserve)
            .is_none();
        assert!(
            operations,
            "the reserve is counted from the writes' limit, the forced bytes included"
        );
        let operations = budget
            .reserve(1_000, &activity, Room::WithReserve)
            .expect("within the reserve");
        drop((big, forced, writes, operations));
        assert_eq!(budget.unsent(), 0);
    }

    #[test]
    fn writes_let_in_hold_room_until_answered_and_a_refused_one_holds_none() {
        // Proves: each write let in holds WRITE_PROVISION_BYTES; past the writes' limit none is
        // let in (counted), and what a refused one never took is never given back (the counter
        // does not run below zero).
        let budget = ResponseBudget::leak(8 * WRITE_PROVISION_BYTES, None);
        let admitted: Vec<Provision> = std::iter::from_fn(|| budget.admit_write()).collect();
        assert_eq!(
            admitted.len(),
            10,
            "the bound plus a quarter, in provisions"
        );
        assert_eq!(budget.unsent(), 10 * WRITE_PROVISION_BYTES);
        for _ in 0..5 {
            assert!(budget.admit_write().is_none());
        }
        assert_eq!(budget.refused(), 6);
        assert_eq!(budget.unsent(), 10 * WRITE_PROVISION_BYTES);
        drop(admitted);
        assert_eq!(budget.unsent(), 0);
    }
}
