//! What a connection is doing: requests in flight and when the last one ended, so the accept loop
//! can close a connection that stays idle past the slow-client timeout. HTTP/1 has hyper's
//! `header_read_timeout` for that; HTTP/2 has nothing (a client that answers pings may hold a
//! connection, and a place under `--connections-max`, forever without sending a request).
//!
//! Counting costs two atomic operations per request and no allocation: the service wraps axum's
//! future in [`Counted`], whose guard ends the request when the future completes or is dropped.

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Milliseconds since the first call, for storing instants in an atomic.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One connection's requests.
#[derive(Debug)]
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// When the last request ended (or the connection began), from [`now_ms`].
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(now_ms()),
        })
    }

    /// How long the connection has had no request in flight; `None` while one is.
    pub(super) fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(now_ms().saturating_sub(last)))
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

/// axum's router as hyper calls it, counting requests in flight.
#[derive(Clone)]
pub(super) struct CountedService {
    inner: TowerToHyperService<axum::Router>,
    activity: Arc<Activity>,
}

impl CountedService {
    pub(super) fn new(router: axum::Router, activity: Arc<Activity>) -> Self {
        Self {
            inner: TowerToHyperService::new(router),
            activity,
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
        _guard: InFlight,
    }
}

impl Future for Counted {
    type Output = <Inner as Future>::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl hyper::service::Service<Request<Incoming>> for CountedService {
    type Response =
        <TowerToHyperService<axum::Router> as hyper::service::Service<Request<Incoming>>>::Response;
    type Error =
        <TowerToHyperService<axum::Router> as hyper::service::Service<Request<Incoming>>>::Error;
    type Future = Counted;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Counted {
            inner: hyper::service::Service::call(&self.inner, request),
            _guard: InFlight(Arc::clone(&self.activity)),
        }
    }
}
