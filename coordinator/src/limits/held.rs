//! [`Held`]: a connection that carries its permit, and may have a deadline.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Permit;

/// A connection that holds its permit for as long as it lives, and may have a deadline
/// (its reads fail with `TimedOut` once it passes).
pub struct Held<T> {
    io: T,
    permit: Permit,
    /// When the connection ends, and what it had not done by then (the metric's `phase`).
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, &'static str)>,
    expired: bool,
}

impl<T> Held<T> {
    pub fn new(io: T, permit: Permit) -> Held<T> {
        Held {
            io,
            permit,
            deadline: None,
            expired: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    pub fn permit_mut(&mut self) -> &mut Permit {
        &mut self.permit
    }

    /// Ends the connection `after` from now: its reads fail then, and it is counted as
    /// timed out in `phase`.
    pub fn expire_in(&mut self, after: Duration, phase: &'static str) {
        self.deadline = Some((Box::pin(tokio::time::sleep(after)), phase));
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Held<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        if let Some((d, phase)) = me.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            if !std::mem::replace(&mut me.expired, true) {
                me.permit.gate().timed_out(phase);
            }
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection's time is up",
            )));
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Held<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
