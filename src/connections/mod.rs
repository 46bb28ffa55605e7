//! The listener and the accept loop: HTTP/1.1 and HTTP/2 on one listener, in cleartext or over TLS
//! (`tls.rs`: TLS 1.3, ALPN `h2`/`http/1.1`), at most `connections_max` open connections (a
//! semaphore permit each), slow clients cut off, idle connections closed (`activity.rs`), and a
//! graceful drain on the stop signal: every connection is told to shut down gracefully, and the
//! loop waits until every connection's permit is back.
//!
//! The listening socket is made with `socket2` ([`bind`]), so its backlog, `TCP_NODELAY` and buffer
//! sizes come from the configuration (accepted connections inherit them). The per-core runtime
//! binds one socket per worker with `SO_REUSEPORT` ([`bind_per_core`]); each worker runs this loop
//! on its own, and the bound on open connections is one for all of them ([`serve_sharing`]).
//!
//! `axum::serve` does this too, but it cannot bound how long a client may take to send its request
//! headers (hyper's `header_read_timeout` is not reachable through it), nor the number of open
//! connections. So the loop is ours, on hyper-util's automatic HTTP/1–HTTP/2 connection builder,
//! serving the same axum router.
//!
//! Slow clients are cut at four points: a TLS handshake not finished within the slow-client
//! timeout of being accepted ends the connection (and one still running when the stop signal
//! comes is given up at once: it carries no request to finish); a connection that has not delivered its first request
//! head (or the HTTP/2 preface) within the timeout of being accepted is closed by
//! `ClientStream`; later HTTP/1 request heads, and the idle time before them, are bounded by
//! hyper's `header_read_timeout`; and bodies are read by the handlers under the same timeout
//! (`api::read_body`, which answers `408`).
//!
//! `ClientStream` also lets a DEL byte in an HTTP/1 `Idempotency-Key` reach the handler, so it
//! gets the JSON error shape instead of hyper's bare `400` (see `request_heads.rs`).

mod activity;
mod budget;
mod client_stream;
mod request_heads;
pub mod tls;

pub use activity::ChangedNothing;
use activity::{Activity, CountedService};
pub use budget::ResponseBudget;
use client_stream::ClientStream;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The bounds the accept loop holds every client to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a client may take to send a request's headers (and, in the handlers, its body).
    pub slow_client_timeout: Duration,
    /// The most connections open at once. Past it each listener's loop holds the one connection
    /// it accepted last (unread) and stops accepting until one closes, so further clients wait in
    /// the kernel's listen backlog (and are refused once that is full) instead of costing a file
    /// descriptor and a task each.
    pub connections_max: usize,
    /// `TCP_NODELAY` on every connection.
    pub nodelay: bool,
    /// The bytes of answers not sent yet, across all connections (`budget.rs`).
    pub response_budget: &'static ResponseBudget,
}

/// A connection's place under `--connections-max`, held by the connection's task until it ends,
/// and what the connection is doing. A request for a path ending in `/stream` carries it (an
/// extension; no other request pays for one), so a live stock stream can say it runs
/// ([`Self::stream_started`]).
#[derive(Clone)]
pub struct ConnectionSlot {
    permit: Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>,
    activity: Option<Arc<Activity>>,
}

impl ConnectionSlot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self {
            permit: Arc::new(std::sync::Mutex::new(Some(permit))),
            activity: None,
        }
    }

    fn with_activity(&self, activity: &Arc<Activity>) -> Self {
        Self {
            permit: Arc::clone(&self.permit),
            activity: Some(Arc::clone(activity)),
        }
    }

    /// A live stock stream begins on this connection; it runs until the guard is dropped. The
    /// connection is not idle meanwhile (the idle rule would cut a stream waiting for its next
    /// event). An HTTP/1 connection, which carries nothing else until the stream ends and ends
    /// with it, gives its place under `--connections-max` back: the stream counts against
    /// `--streams-max` instead. An HTTP/2 connection keeps its place (found by attack: its
    /// streams can be reset while it lives on, so a place given back would be free for good and
    /// `--connections-max` bypassed; one place carries up to `H2_STREAMS_MAX` streams anyway).
    pub fn stream_started(&self, http1: bool) -> StreamOnConnection {
        if http1 {
            drop(crate::sync::lock(&self.permit).take());
        }
        if let Some(activity) = &self.activity {
            activity
                .streams
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        StreamOnConnection(self.activity.clone())
    }
}

/// A live stock stream running on a connection ([`ConnectionSlot::stream_started`]).
pub struct StreamOnConnection(Option<Arc<Activity>>);

impl Drop for StreamOnConnection {
    fn drop(&mut self) {
        if let Some(activity) = &self.0 {
            activity
                .streams
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Requests one HTTP/2 connection may have open at once (hyper's default is 200): with
/// `--connections-max` it bounds the streams a client can keep waiting, and each stream's
/// answer is counted against `--response-bytes-max` besides.
pub const H2_STREAMS_MAX: u32 = 100;

/// Binds the listening socket at `addr` with `socket`'s options, ready for the runtime (call it
/// from inside one). Accepted connections inherit its buffer sizes.
pub fn bind(
    addr: std::net::SocketAddr,
    socket: &crate::config::SocketConfig,
) -> std::io::Result<TcpListener> {
    TcpListener::from_std(listening_socket(addr, socket, false)?.into())
}

/// `count` listening sockets on one address with `SO_REUSEPORT`, one per per-core worker: the
/// kernel spreads new connections over them (by a hash of the connection's addresses), so a
/// worker accepts only its own. With port 0 the first picks the port and the others join it.
///
/// `SO_REUSEPORT` would also let another process of this user join the port unnoticed (a second
/// server started by mistake would take a share of the connections): so the address is first
/// bound once without it, which fails as usual when anything listens there already.
pub fn bind_per_core(
    addr: std::net::SocketAddr,
    socket: &crate::config::SocketConfig,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        drop(plain_bind(addr)?);
    }
    let first = listening_socket(addr, socket, true)?;
    let addr = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("the listening socket has no IP address"))?;
    let mut listeners = vec![std::net::TcpListener::from(first)];
    for _ in 1..count {
        listeners.push(listening_socket(addr, socket, true)?.into());
    }
    Ok(listeners)
}

/// Says, once at start, where the kernel allows less than the server is configured for (measured
/// in `tuning/kernel_settings.sh`): a listen backlog above `net.core.somaxconn` is cut to it (a
/// burst of connections past it waits a SYN retransmission, 1 s), and a file limit below
/// `connections_max` refuses connections past it (the accept loop retries each second).
pub fn check_kernel_limits(backlog: u32, connections_max: usize) {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok());
    if let Some(somaxconn) = somaxconn.filter(|&cap| cap < backlog) {
        tracing::warn!(
            backlog,
            somaxconn,
            "the kernel caps the listen backlog at net.core.somaxconn: raise it (sysctl -w net.core.somaxconn={backlog}) or a burst of new connections waits 1 s per dropped SYN"
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    // Room for the journal's files, outbound pools and the listeners besides the connections.
    let wanted = connections_max as u64 + 1_000;
    let file_limit: u64 = limit.rlim_cur;
    if known && limit.rlim_cur != libc::RLIM_INFINITY && file_limit < wanted {
        tracing::warn!(
            file_limit,
            connections_max,
            "the file limit (ulimit -n, LimitNOFILE=) is below --connections-max + 1000: connections past it are refused until others close; raise it to {wanted} or more"
        );
    }
}

/// A bound socket, not listening: is the address free?
fn plain_bind(addr: std::net::SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())?;
    Ok(probe)
}

fn listening_socket(
    addr: std::net::SocketAddr,
    socket: &crate::config::SocketConfig,
    reuse_port: bool,
) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let listener = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does: a restarted server may bind while old connections are in TIME_WAIT.
    listener.set_reuse_address(true)?;
    if reuse_port {
        listener.set_reuse_port(true)?;
    }
    listener.set_tcp_nodelay(socket.nodelay)?;
    // Set before listen(): the window scale of a connection is fixed at its handshake.
    if let Some(bytes) = socket.recv_buffer {
        listener.set_recv_buffer_size(bytes as usize)?;
    }
    if let Some(bytes) = socket.send_buffer {
        listener.set_send_buffer_size(bytes as usize)?;
    }
    listener.set_nonblocking(true)?;
    listener.bind(&addr.into())?;
    listener.listen(i32::try_from(socket.backlog).unwrap_or(i32::MAX))?;
    Ok(listener)
}

/// Serves `router` on `listener` until `stop` completes; then stops accepting, lets every open
/// connection finish its in-flight requests (idle ones close at once), and returns.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl Future<Output = ()>,
) {
    let open_connections = Arc::new(Semaphore::new(limits.connections_max));
    serve_sharing(listener, router, limits, open_connections, tls, stop).await;
}

/// [`serve`], with the bound on open connections shared with other listeners (the per-core
/// workers): `open_connections` holds `limits.connections_max` permits in all. Returns once every
/// connection of every listener has ended.
pub async fn serve_sharing(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnectionLimits,
    open_connections: Arc<Semaphore>,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl Future<Output = ()>,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.slow_client_timeout);
    // HTTP/2 has no header-read timeout, and its graceful shutdown waits for the client to
    // acknowledge a ping. A client that stops answering (gone without closing, or stalled on
    // purpose) is found by a keep-alive ping it does not acknowledge in time, which closes its
    // connection, so it holds neither a connection slot nor the shutdown forever.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_STREAMS_MAX)
        .keep_alive_interval(limits.slow_client_timeout)
        .keep_alive_timeout(limits.slow_client_timeout);
    // Borrowed by every connection task: one builder for the life of the server.
    let builder = Arc::new(builder);
    // Set once accepting stops: every connection then shuts down gracefully (in-flight requests
    // finish, idle connections close), and a TLS handshake still running is given up, since it
    // carries no request yet and would otherwise hold the shutdown for up to the timeout.
    let (stopping, stopping_seen) = tokio::sync::watch::channel(false);
    let mut stop = std::pin::pin!(stop);
    // A permit of `open_connections` per open connection, held by its task until it ends.
    let mut limit_reported = false;
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if is_connection_error(&error) {
                        // The client gave up before we accepted it: nothing to do.
                        continue;
                    }
                    // Most likely out of file descriptors: accepting again at once would spin,
                    // so wait for connections to close (or for the stop signal).
                    tracing::error!(%error, "accept failed; retrying in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = &mut stop => break,
                    }
                }
            },
            () = &mut stop => break,
        };
        // Accepted first, then the bound: a bound taken before accepting would sit idle in a
        // per-core worker whose listener gets no connection while another worker's queue waits
        // for it. So at most one accepted connection per listener waits here (no task, no read);
        // the others wait in the kernel's backlog.
        let permit = match Arc::clone(&open_connections).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Once per listener: under a flood it would be reached again and again, and one
                // line says what to raise.
                if !limit_reported {
                    limit_reported = true;
                    tracing::warn!(
                        connections_max = limits.connections_max,
                        "open connections reached --connections-max; new connections wait until one closes (reported once)"
                    );
                }
                tokio::select! {
                    permit = Arc::clone(&open_connections).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        // Only a closed semaphore fails, and this one is never closed.
                        Err(_) => break,
                    },
                    () = &mut stop => break,
                }
            }
        };
        // Small answers go out at once instead of waiting for Nagle's algorithm to coalesce them
        // (Linux passes the listener's setting on; this makes sure of it).
        if limits.nodelay {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY");
            }
        }
        let permit = ConnectionSlot::new(permit);
        let router = router.clone();
        let builder = Arc::clone(&builder);
        let stopping = stopping_seen.clone();
        let timeout = limits.slow_client_timeout;
        let budget = limits.response_budget;
        match &tls {
            None => {
                let io = ClientStream::new(stream, timeout);
                tokio::spawn(async move {
                    serve_one(
                        &builder, io, router, &permit, stopping, timeout, budget, remote,
                    )
                    .await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let handshake = acceptor.accept(stream);
                let mut stopping = stopping;
                tokio::spawn(async move {
                    let handshake = tokio::select! {
                        finished = tokio::time::timeout(timeout, handshake) => finished,
                        _ = stopping.wait_for(|stopping| *stopping) => {
                            tracing::debug!(%remote, "TLS handshake given up: the server is stopping");
                            drop(permit);
                            return;
                        }
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            let io = ClientStream::new(stream, timeout);
                            serve_one(
                                &builder, io, router, &permit, stopping, timeout, budget, remote,
                            )
                            .await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%remote, %error, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake not finished within the slow-client timeout");
                        }
                    }
                    drop(permit);
                });
            }
        }
    }
    // Stop accepting: new connections are refused by the kernel from here on.
    drop(listener);
    let _ = stopping.send(true);
    tracing::info!(
        connections = limits.connections_max - open_connections.available_permits(),
        "stopped accepting; waiting for in-flight requests"
    );
    // Every connection task holds a permit until its connection has ended.
    let all = u32::try_from(limits.connections_max).unwrap_or(u32::MAX);
    let _ = open_connections.acquire_many(all).await;
}

/// Serves one connection until it ends. Three rules, each measured against `timeout` (the
/// slow-client timeout):
/// - a connection with nothing to do (no request in flight, no answer waiting) for `timeout` is
///   shut down gracefully, as is every connection when the server stops: in-flight requests
///   finish, then it closes (an idle HTTP/2 client, which hyper never times out, gives its place
///   back too);
/// - a connection with an answer whose bytes have waited `timeout` without any of them leaving is
///   closed at once, however its other streams move: its client stopped reading (HTTP/1), or
///   never opens that stream's HTTP/2 window, and the answer would wait for ever (closing the
///   connection resets its streams, and gives their bytes back to the budget);
/// - a connection told to close gracefully (HTTP/2: a GOAWAY) is closed at once once no handler
///   has run on it for `timeout` since, whatever its streams still wait for: a graceful close
///   that waits for streams that cannot drain would never end.
// Each argument is one of the connection's parts; a struct for them would be built once, here.
#[allow(clippy::too_many_arguments)]
async fn serve_one<S>(
    builder: &auto::Builder<TokioExecutor>,
    io: ClientStream<S>,
    router: axum::Router,
    slot: &ConnectionSlot,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    timeout: Duration,
    budget: &'static ResponseBudget,
    remote: std::net::SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio::time::Instant;
    let activity = Activity::new();
    let service = CountedService::new(router, Arc::clone(&activity), budget, slot.clone());
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let check = tokio::time::sleep(timeout);
    tokio::pin!(check);
    // When the graceful close began.
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::debug!(%remote, %error, "connection ended with an error");
                }
                return;
            }
            _ = stopping.wait_for(|stopping| *stopping), if closing.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
                check.as_mut().reset(Instant::now() + timeout);
            }
            () = check.as_mut() => {
                // How long until each rule could apply; the next look is at the earliest.
                let mut next = timeout;
                if let Some(stalled) = activity.stalled_for() {
                    if stalled >= timeout {
                        tracing::debug!(%remote, "closing a connection whose answers made no progress for the slow-client timeout");
                        return;
                    }
                    next = next.min(timeout - stalled);
                }
                match (closing, activity.idle_for()) {
                    (None, Some(quiet)) if quiet >= timeout => {
                        tracing::debug!(%remote, "closing a connection idle for the slow-client timeout");
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    (None, Some(quiet)) => next = next.min(timeout - quiet),
                    _ => {}
                }
                if let (Some(since), Some(quiet)) = (closing, activity.handlers_idle_for()) {
                    let waited = quiet.min(since.elapsed());
                    if waited >= timeout {
                        tracing::debug!(%remote, "closing a connection that did not finish its graceful close within the slow-client timeout");
                        return;
                    }
                    next = next.min(timeout - waited);
                }
                check.as_mut().reset(Instant::now() + next.max(Duration::from_millis(10)));
            }
        }
    }
}

/// Errors of one connection that the client caused; the listener itself is fine.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

/// Runs the request-head scanner over `bytes` read in pieces of `piece` bytes, as a connection
/// would (for the fuzz targets, [`crate::fuzzing`]).
#[doc(hidden)]
pub fn scan_request_heads_in_pieces(bytes: &mut [u8], piece: usize) {
    let mut heads = request_heads::RequestHeads::new();
    for chunk in bytes.chunks_mut(piece.max(1)) {
        heads.scan(chunk);
    }
}
