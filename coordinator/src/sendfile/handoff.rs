//! The connections the fast path does not answer, served by the axum router through hyper's
//! HTTP/1 server, under the same limits as the fast path: the connection's permit is held
//! inside [`Rewind`] until it closes; every request head, the first included, must arrive
//! within the head deadline (hyper's header read timeout, which runs from the previous
//! answer's end, so an idle keep-alive connection is closed then too); and a client that
//! leaves no room for its answer for the stall deadline is dropped ([`Rewind`]'s writes fail).
//! A request body is never waited for: hyper drains what is already there and closes the
//! connection otherwise.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::limits::Permit;

/// Serves `io` with `router` until the connection ends.
pub(super) async fn serve(io: Rewind, peer: SocketAddr, router: axum::Router, head: Duration) {
    let gate = io.permit.gate().clone();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(head);
    // Handlers see the peer (the per-address limits of boot scripts and ISOs).
    let router = tower::ServiceBuilder::new()
        .map_request(move |mut r: http::Request<hyper::body::Incoming>| {
            r.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            r
        })
        .service(router);
    let served = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router))
        .await;
    if let Err(e) = served {
        if e.is_timeout() {
            gate.timed_out("request_head");
        }
        tracing::debug!(%peer, "HTTP connection ended: {e}");
    }
}

/// A connection handed to the router: the bytes already read from it in front, its permit
/// held until it drops, and writes that fail once the client has left no room for `stall`.
pub(super) struct Rewind {
    pre: Vec<u8>,
    pos: usize,
    inner: TcpStream,
    permit: Permit,
    stall: Duration,
    /// Running while a write waits for room.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Rewind {
    pub(super) fn new(pre: Vec<u8>, inner: TcpStream, permit: Permit, stall: Duration) -> Rewind {
        Rewind {
            pre,
            pos: 0,
            inner,
            permit,
            stall,
            waiting: None,
        }
    }

    /// After a write that could not go on: pending until the stall deadline, then an error.
    fn pending_write<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let stall = self.stall;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_ready() {
            self.permit.gate().timed_out("stall");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stalled",
            )));
        }
        Poll::Pending
    }

    fn written<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.pending_write(cx),
            done => {
                self.waiting = None;
                done
            }
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.pos < me.pre.len() {
            let n = (me.pre.len() - me.pos).min(buf.remaining());
            buf.put_slice(&me.pre[me.pos..me.pos + n]);
            me.pos += n;
            if me.pos == me.pre.len() {
                me.pre = Vec::new();
                me.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        me.written(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        me.written(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.inner).poll_flush(cx);
        me.written(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let r = Pin::new(&mut me.inner).poll_shutdown(cx);
        me.written(r, cx)
    }
}
