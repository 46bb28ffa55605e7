//! What a connection is doing: requests in flight and when the last one ended, so the accept loop
//! can close a connection that stays idle past the slow-client timeout; and, for each of its
//! answers, the bytes not sent yet and when some of them last left, so it can close one that has
//! an answer its client stopped reading (HTTP/1), or never opens the window of (HTTP/2), however
//! the connection's other streams move. HTTP/1 has hyper's `header_read_timeout` for the first; HTTP/2 has nothing (a client
//! that answers pings may hold a connection, and a place under `--connections-max`, forever
//! without sending a request, or without opening its window for the answers it asked for).
//!
//! Counting costs two atomic operations per request: the service wraps axum's future in
//! [`Counted`], whose guard ends the request when the future completes or is dropped; its answer's
//! body is counted against the server's [`ResponseBudget`] and this connection (`budget.rs`), and
//! past the budget replaced by `503 overloaded`.

use super::budget::{expected_bytes, CountedBody, ResponseBudget, Room};
use crate::sync::lock;
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Milliseconds since the first call, for storing instants in an atomic.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One connection's requests and answers.
#[derive(Debug)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// Live stock streams open on it (`app::streams`): a connection carrying one is not idle,
    /// however long it waits for the next event.
    pub(super) streams: AtomicUsize,
    /// When the last request ended (or the connection began), from [`now_ms`].
    last_ms: AtomicU64,
    /// Bytes of this connection's answers not sent yet.
    unsent: AtomicUsize,
    /// Its answers still holding bytes (those that ended are pruned as new ones come).
    answers: Mutex<Vec<Weak<Progress>>>,
}

/// One answer's bytes not sent yet, and when some of them last left.
#[derive(Debug)]
pub(super) struct Progress {
    unsent: AtomicUsize,
    /// When some of its bytes last left (or when it began to wait), from [`now_ms`].
    last_ms: AtomicU64,
}

/// Answers kept in a connection's list before the ended ones are pruned.
const ANSWERS_PRUNE_AT: usize = 32;

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            last_ms: AtomicU64::new(now_ms()),
            unsent: AtomicUsize::new(0),
            answers: Mutex::new(Vec::new()),
        })
    }

    /// A new answer of `bytes` begins to wait: its progress, followed by this connection.
    pub(super) fn answer(&self, bytes: usize) -> Arc<Progress> {
        let progress = Arc::new(Progress {
            unsent: AtomicUsize::new(bytes),
            last_ms: AtomicU64::new(now_ms()),
        });
        self.unsent.fetch_add(bytes, Ordering::AcqRel);
        let mut answers = lock(&self.answers);
        if answers.len() >= ANSWERS_PRUNE_AT {
            answers.retain(|answer| answer.strong_count() > 0);
        }
        answers.push(Arc::downgrade(&progress));
        progress
    }

    /// Bytes of `progress`'s answer were added (a body longer than it said).
    pub(super) fn unsent_added(&self, progress: &Progress, bytes: usize) {
        self.unsent.fetch_add(bytes, Ordering::AcqRel);
        progress.unsent.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Bytes of `progress`'s answer left (written to the socket, or dropped with their stream).
    pub(super) fn unsent_sent(&self, progress: &Progress, bytes: usize) {
        self.unsent.fetch_sub(bytes, Ordering::AcqRel);
        progress.unsent.fetch_sub(bytes, Ordering::AcqRel);
        progress.last_ms.store(now_ms(), Ordering::Release);
    }

    /// How long the answer of this connection that waits longest without progress has waited;
    /// `None` while none waits.
    pub(super) fn stalled_for(&self) -> Option<Duration> {
        if self.unsent.load(Ordering::Acquire) == 0 {
            return None;
        }
        let now = now_ms();
        let mut answers = lock(&self.answers);
        answers.retain(|answer| answer.strong_count() > 0);
        answers
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|answer| answer.unsent.load(Ordering::Acquire) > 0)
            .map(|answer| now.saturating_sub(answer.last_ms.load(Ordering::Acquire)))
            .max()
            .map(Duration::from_millis)
    }

    /// How long no handler has run on this connection (answers may still be leaving); `None`
    /// while one runs.
    pub(super) fn handlers_idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(now_ms().saturating_sub(last)))
    }

    /// How long the connection has had nothing to do: no request in flight and no answer
    /// waiting to be sent; `None` while it has.
    pub(super) fn idle_for(&self) -> Option<Duration> {
        if self.unsent.load(Ordering::Acquire) > 0 || self.streams.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.handlers_idle_for()
    }
}

/// Ends a request in [`Activity`] when dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_ms.store(now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// axum's router as hyper calls it, counting requests in flight and the bytes of their answers.
#[derive(Clone)]
pub(super) struct CountedService {
    inner: TowerToHyperService<axum::Router>,
    activity: Arc<Activity>,
    budget: &'static ResponseBudget,
    /// The connection's permit, given to a live stock stream's request (`ConnectionSlot`).
    slot: super::ConnectionSlot,
}

impl CountedService {
    pub(super) fn new(
        router: axum::Router,
        activity: Arc<Activity>,
        budget: &'static ResponseBudget,
        slot: super::ConnectionSlot,
    ) -> Self {
        Self {
            inner: TowerToHyperService::new(router),
            activity,
            budget,
            slot,
        }
    }
}

type Inner =
    <TowerToHyperService<axum::Router> as hyper::service::Service<Request<Incoming>>>::Future;

pin_project_lite::pin_project! {
    /// A request's future, with the guard that ends it.
    pub(super) struct Counted {
        #[pin]
        inner: Inner,
        guard: InFlight,
        budget: &'static ResponseBudget,
        // What the request was, for what its answer may be refused (`counted`).
        kind: RequestKind,
        // Whether the handler was let run (a write is asked at its first poll).
        started: bool,
        // The room a write let in holds until its answer is counted.
        provision: Option<super::budget::Provision>,
    }
}

impl Future for Counted {
    type Output = Result<Response<CountedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if !*this.started {
            // Asked at the first poll, not when the request arrived: an answer that completes
            // in that poll (most do) is counted before the next write is asked, so a flood of
            // streams cannot all pass together. The handler has not run: nothing changed.
            if *this.kind == RequestKind::Write {
                match this.budget.admit_write() {
                    Some(provision) => *this.provision = Some(provision),
                    None => return Poll::Ready(Ok(refused(&this.guard.0, this.budget))),
                }
            }
            *this.started = true;
        }
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let answer = counted(response, &this.guard.0, this.budget, *this.kind);
        // Counted: the room held for it goes back.
        *this.provision = None;
        Poll::Ready(Ok(answer))
    }
}

/// Marks the answer to a write that changed nothing (a cancel of an order already finished, a
/// replay under an idempotency key): it may be refused like a read's, since asking again gives it
/// again.
#[derive(Debug, Clone, Copy)]
pub struct ChangedNothing;

/// Answers this small are not refused at the bound, only past the writes' quarter above it:
/// health checks, a product, a refusal; what fills memory first is a flood of large ones.
pub(super) const SMALL_ANSWER_BYTES: usize = 1024;

/// What a request was, for what its answer may be refused past the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestKind {
    /// A read (GET, HEAD) of the API: changes nothing.
    Read,
    /// A read an operator needs most when the server is under pressure (`/metrics`, `/readyz`,
    /// `/healthz`): it may use the operations reserve past the bound.
    Operations,
    /// Any other method: its answer may report a change.
    Write,
}

impl RequestKind {
    fn of<B>(request: &Request<B>, budget: &ResponseBudget) -> Self {
        match (request.method(), request.uri().path()) {
            (&hyper::Method::GET | &hyper::Method::HEAD, "/metrics" | "/readyz" | "/healthz")
                if budget.may_use_reserve(request.headers()) =>
            {
                Self::Operations
            }
            (&hyper::Method::GET | &hyper::Method::HEAD, _) => Self::Read,
            _ => Self::Write,
        }
    }
}

/// The answer with its body counted against the budget and the connection, or, with no room
/// left, `503 overloaded` instead (counted too, up to the bound plus the writes' quarter: it is
/// small, and the client must hear why; past that, a bare `503` with `Retry-After` and no body,
/// so that even refusals nobody reads cannot fill memory). What may be refused:
/// - an answer of [`SMALL_ANSWER_BYTES`] or less: past the bound plus the writes' quarter (the
///   operations reserve above it stays the operator's);
/// - an answer that may report a change (to a write, with a status other than a refusal's
///   `4xx`: a checkout's `201`, a `402` or `504` that placed an order, a cancel's `200`, a `503`
///   whose outcome is unknown): never, since it is the only word its client gets of that change
///   (the write itself is refused before it runs past the bound plus a quarter:
///   [`ResponseBudget::admits_write`]);
/// - an operations answer (`/metrics`, `/readyz`, `/healthz`) asked with the `--admin-token` (or
///   by anyone without one): only past the writes' limit plus
///   [`super::budget::OPERATIONS_RESERVE_BYTES`], so the operator can still see the server;
/// - any other (a read, a write's refusal, or a write's answer marked [`ChangedNothing`]: a cancel
///   of an order already finished, a replay): past the bound.
fn counted(
    response: Response<axum::body::Body>,
    activity: &Arc<Activity>,
    budget: &'static ResponseBudget,
    kind: RequestKind,
) -> Response<CountedBody> {
    let (parts, body) = response.into_parts();
    let bytes = expected_bytes(&body);
    let status = parts.status.as_u16();
    let refusal = (400..500).contains(&status) && status != 402;
    let unchanged = parts.extensions.get::<ChangedNothing>().is_some();
    let room = if kind == RequestKind::Write && !refusal && !unchanged {
        Room::Always
    } else if kind == RequestKind::Operations {
        Room::WithReserve
    } else if bytes <= SMALL_ANSWER_BYTES {
        Room::Small
    } else {
        Room::WithinBound
    };
    if let Some(held) = budget.reserve(bytes, activity, room) {
        return Response::from_parts(parts, CountedBody::new(body, held));
    }
    refused(activity, budget)
}

/// `503 overloaded`, counted up to the bound plus the writes' quarter (it is small, and the
/// client must hear why); past that without its body.
fn refused(activity: &Arc<Activity>, budget: &'static ResponseBudget) -> Response<CountedBody> {
    let refusal = crate::api::ApiError::answers_unread().into_response();
    let (mut parts, body) = refusal.into_parts();
    if let Some(held) = budget.reserve(expected_bytes(&body), activity, Room::Small) {
        return Response::from_parts(parts, CountedBody::new(body, held));
    }
    parts.headers.remove(hyper::header::CONTENT_TYPE);
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    let empty = axum::body::Body::empty();
    match budget.reserve(0, activity, Room::Always) {
        Some(held) => Response::from_parts(parts, CountedBody::new(empty, held)),
        None => unreachable!("a forced reservation always succeeds"),
    }
}

impl hyper::service::Service<Request<Incoming>> for CountedService {
    type Response = Response<CountedBody>;
    type Error = Infallible;
    type Future = Counted;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        self.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        // Only a live stock stream uses the slot: every other request (the sold-out flood among
        // them) goes on without an extension, which would allocate its map.
        if request.uri().path().ends_with("/stream") {
            request
                .extensions_mut()
                .insert(self.slot.with_activity(&self.activity));
        }
        let kind = RequestKind::of(&request, self.budget);
        Counted {
            kind,
            started: false,
            inner: hyper::service::Service::call(&self.inner, request),
            guard: InFlight(Arc::clone(&self.activity)),
            budget: self.budget,
            provision: None,
        }
    }
}
