//! Bounds how long a client may leave our writes waiting (nginx's `send_timeout`).
//!
//! A client that stops reading a response would otherwise hold its connection, the
//! backend's pooled connection and its load count for as long as it likes: hyper has no
//! write timeout. [`SendTimeout`] wraps the client stream for the HTTP part of a
//! connection. A write that cannot proceed arms a timer; any write that moves bytes
//! re-arms it; if the timer fires first, the write fails with `TimedOut` and hyper closes
//! the connection. Writes that go through at once (nearly all) never touch the timer.
//! Reads pass straight through. An upgraded connection leaves the wrapper behind: tunnels
//! have the upstream's `idle_timeout` instead.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use duplex_metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ProxyError;
use crate::idle::IdleTimer;

/// A client stream whose writes fail after `timeout` without progress.
pub struct SendTimeout<S> {
    inner: S,
    timer: IdleTimer,
    /// `duplex_client_send_timeouts_total` of the listener.
    expired: Counter,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, timeout: Duration, expired: Counter) -> Self {
        SendTimeout {
            inner,
            timer: IdleTimer::new(timeout),
            expired,
        }
    }

    /// The stream, for a tunnel that takes over the connection.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// What a write that got `res` from the stream returns: the result as it is, or an
    /// error once the write has waited `timeout` since the last progress.
    fn check<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if res.is_ready() {
            self.timer.moved();
            return res;
        }
        if !self.timer.expired(cx) {
            return Poll::Pending;
        }
        self.expired.inc();
        let timeout = self.timer.idle();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            ProxyError::ClientSendTimeout { timeout },
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, res)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::time::Instant;

    fn counter() -> Counter {
        Counter::new("t", "t").expect("a counter")
    }

    /// A peer that never reads: the write fails after the timeout, and it is counted.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_fails_after_the_timeout() {
        let (a, _b) = tokio::io::duplex(16);
        let expired = counter();
        let mut w = SendTimeout::new(a, Duration::from_secs(5), expired.clone());
        let started = Instant::now();
        let err = w
            .write_all(&[0; 64])
            .await
            .expect_err("the peer never reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(expired.get(), 1);
    }

    /// A peer that reads a little now and then keeps the writer going: each step of
    /// progress gives the next wait the whole timeout again.
    #[tokio::test(start_paused = true)]
    async fn progress_rearms_the_timer() {
        let (a, mut b) = tokio::io::duplex(16);
        let expired = counter();
        let mut w = SendTimeout::new(a, Duration::from_secs(5), expired.clone());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0; 16];
            while got.len() < 160 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let n = tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .expect("read");
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let data: Vec<u8> = (0..160u8).collect();
        w.write_all(&data).await.expect("a reader that keeps up");
        assert_eq!(reader.await.expect("reader"), data);
        assert_eq!(expired.get(), 0);
    }
}
