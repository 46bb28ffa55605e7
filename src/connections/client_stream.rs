//! A client's TCP stream as hyper reads it: closed when its first request has not begun within
//! the slow-client timeout of being accepted, and with a DEL in an `Idempotency-Key` value made
//! visible to the handler ([`RequestHeads`] says why and how).
//!
//! hyper's own `header_read_timeout` only starts once hyper-util has decided between HTTP/1 and
//! HTTP/2, and that decision waits for the client's first bytes without any limit: a client that
//! sends nothing, or only the first bytes of the HTTP/2 preface, would hold its connection (and
//! its place under `--connections-max`) forever. This deadline covers that gap; hyper's timers
//! cover the rest.

use super::request_heads::RequestHeads;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// One accepted client connection: TCP, or TLS over TCP (then what it watches is the decrypted
/// stream).
pub(super) struct ClientStream<S> {
    stream: S,
    /// Watches what the client sends: when its first request has begun, and DEL bytes in
    /// `Idempotency-Key` lines.
    heads: RequestHeads,
    /// When the first request must have arrived by; `None` once it has.
    first_request_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> ClientStream<S> {
    /// Wraps a connection accepted (and, with TLS, whose handshake ended) just now.
    pub(super) fn new(stream: S, slow_client_timeout: Duration) -> Self {
        Self {
            stream,
            heads: RequestHeads::new(),
            first_request_deadline: Some(Box::pin(tokio::time::sleep(slow_client_timeout))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let filled_before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.heads.scan(&mut buf.filled_mut()[filled_before..]);
                if this.first_request_deadline.is_some() && this.heads.first_request_arrived() {
                    this.first_request_deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                // Polled only while hyper waits for bytes, which is all it does before the first
                // request: the timer's wake-up brings hyper back here to end the connection.
                if let Some(deadline) = &mut this.first_request_deadline {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no request within the slow-client timeout",
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
