//! Bounds how long a client may leave our writes waiting (nginx's `send_timeout`).
//!
//! A client that stops reading a response would otherwise hold its connection, the
//! backend's pooled connection and its load count for as long as it likes: hyper has no
//! write timeout. [`SendTimeout`] wraps the client socket (under TLS for a TLS client).
//! A write that cannot proceed arms a timer; any write that moves bytes re-arms it; if
//! the timer fires first, the write fails with `TimedOut` and hyper closes the
//! connection. Writes that go through at once (nearly all) never touch the timer. Reads
//! pass straight through. An upgraded connection leaves the wrapper behind or disarms it
//! (TLS): tunnels have the upstream's `idle_timeout` instead.
//!
//! The kernel takes more bytes only once about a third of the socket's send buffer has
//! been acknowledged, so a client reading slowly but steadily can go a whole timeout
//! without a write moving. Where the OS says how many bytes a socket still holds (a
//! [`QueueProbe`], given by the binary, which alone may call the OS), a timer that fires
//! while that count has gone down since the write began waiting starts again.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use duplex_metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ProxyError;
use crate::idle::IdleTimer;

/// How many bytes a socket holds that its peer has not acknowledged (Linux's
/// `SIOCOUTQ`); `None` if the OS cannot say.
pub type QueueProbe = fn(BorrowedFd<'_>) -> Option<u32>;

static PROBE: OnceLock<QueueProbe> = OnceLock::new();

/// Gives the write timeouts a way to see a socket's queue go down. Set once, at start.
pub fn set_queue_probe(probe: QueueProbe) {
    let _ = PROBE.set(probe);
}

/// A stream whose unacknowledged bytes may be counted.
pub trait Queued {
    /// The bytes the socket under it holds, if known.
    fn queued(&self) -> Option<u32>;
}

impl Queued for tokio::net::TcpStream {
    fn queued(&self) -> Option<u32> {
        PROBE.get().and_then(|probe| probe(self.as_fd()))
    }
}

/// A client stream whose writes fail after `timeout` without progress.
///
/// For TLS it must sit under the TLS layer, on the socket: rustls reports no progress
/// while it drains its own buffer (up to 64 KiB) into the socket, so above TLS a client
/// reading slowly but steadily would look stalled.
pub struct SendTimeout<S> {
    inner: S,
    /// The timer and `duplex_client_send_timeouts_total` of the listener; `None` once
    /// disarmed.
    armed: Option<(IdleTimer, Counter)>,
    /// While a write waits: the socket's queue when it began waiting (or at the last
    /// time the queue was seen to go down), if the OS says.
    waiting: Option<Option<u32>>,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, timeout: Duration, expired: Counter) -> Self {
        SendTimeout {
            inner,
            armed: Some((IdleTimer::new(timeout), expired)),
            waiting: None,
        }
    }

    /// A wrapper that never times out (another one, under TLS, does the job; or not
    /// yet: a TLS handshake has a timeout of its own).
    pub fn unarmed(inner: S) -> Self {
        SendTimeout {
            inner,
            armed: None,
            waiting: None,
        }
    }

    /// Starts timing writes, once a TLS handshake has ended.
    pub fn arm(&mut self, timeout: Duration, expired: Counter) {
        self.armed = Some((IdleTimer::new(timeout), expired));
    }

    /// Stops timing writes: the connection has become a tunnel, which has the upstream's
    /// `idle_timeout` instead.
    pub fn disarm(&mut self) {
        self.armed = None;
    }

    /// The stream, for a tunnel that takes over the connection.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// What a write that got `res` from the stream returns: the result as it is, or an
    /// error once the write has waited `timeout` since the last progress.
    fn check<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>) -> Poll<io::Result<T>>
    where
        S: Queued,
    {
        let Some((timer, expired)) = self.armed.as_mut() else {
            return res;
        };
        if res.is_ready() {
            timer.moved();
            self.waiting = None;
            return res;
        }
        // Once per wait, not per poll: one system call when a write starts waiting.
        let since = *self.waiting.get_or_insert_with(|| self.inner.queued());
        if !timer.expired(cx) {
            return Poll::Pending;
        }
        if let (Some(before), Some(now)) = (since, self.inner.queued()) {
            if now < before {
                // The client is taking bytes, only slowly: a new wait from here.
                self.waiting = Some(Some(now));
                timer.moved();
                if !timer.expired(cx) {
                    return Poll::Pending;
                }
            }
        }
        expired.inc();
        let timeout = timer.idle();
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

impl<S: AsyncWrite + Queued + Unpin> AsyncWrite for SendTimeout<S> {
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

    impl Queued for tokio::io::DuplexStream {
        fn queued(&self) -> Option<u32> {
            None
        }
    }

    impl<T> Queued for tokio_rustls::server::TlsStream<T> {
        fn queued(&self) -> Option<u32> {
            None
        }
    }

    /// A stream whose queue the test sets, standing for a socket whose peer takes bytes
    /// too slowly for a write to go through.
    struct Draining {
        inner: tokio::io::DuplexStream,
        queue: std::sync::Arc<std::sync::atomic::AtomicU32>,
    }

    impl Queued for Draining {
        fn queued(&self) -> Option<u32> {
            Some(self.queue.load(std::sync::atomic::Ordering::SeqCst))
        }
    }

    impl AsyncWrite for Draining {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// No write goes through, but the socket's queue keeps going down (the client takes
    /// bytes, slowly): the timer starts again each time it finds that; once the queue
    /// stops moving, the write fails a timeout later.
    #[tokio::test(start_paused = true)]
    async fn a_queue_going_down_is_progress() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let (a, _b) = tokio::io::duplex(16);
        let queue = std::sync::Arc::new(AtomicU32::new(100_000));
        let stream = Draining {
            inner: a,
            queue: std::sync::Arc::clone(&queue),
        };
        let expired = counter();
        let mut w = SendTimeout::new(stream, Duration::from_secs(5), expired.clone());
        let started = Instant::now();
        let drain = tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                queue.fetch_sub(1000, Ordering::SeqCst);
            }
        });
        let err = w.write_all(&[0; 64]).await.expect_err("never goes through");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Drained until 18 s; the last timer found it moving at about 20 s at the latest,
        // and the next one found it still: between 23 and 26 s.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(23) && took <= Duration::from_secs(26),
            "{took:?}"
        );
        assert_eq!(expired.get(), 1);
        drain.await.expect("drain task");
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

    /// A TLS server writing 256 KiB to a client that reads 16 KiB (one TLS record) a
    /// second, with a 2 s write timeout placed under TLS (`under`, as `conn.rs` does) or
    /// above it. Returns the server's result and the bytes the client got.
    async fn slow_tls_reader(under: bool) -> (io::Result<()>, usize) {
        use std::sync::Arc;
        use tokio::io::AsyncReadExt;
        use tokio_rustls::{TlsAcceptor, TlsConnector};

        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();

        const LEN: usize = 256 * 1024;
        let (a, b) = tokio::io::duplex(4096);
        let timeout = Duration::from_secs(2);
        let serve = async move {
            let acceptor = TlsAcceptor::from(Arc::new(server));
            if under {
                let tls = acceptor
                    .accept(SendTimeout::new(a, timeout, counter()))
                    .await?;
                let mut s = tls;
                s.write_all(&vec![7u8; LEN]).await?;
                s.flush().await
            } else {
                let tls = acceptor.accept(a).await?;
                let mut s = SendTimeout::new(tls, timeout, counter());
                s.write_all(&vec![7u8; LEN]).await?;
                s.flush().await
            }
        };
        let read = async move {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = TlsConnector::from(Arc::new(client))
                .connect(name, b)
                .await
                .expect("client handshake");
            let (mut got, mut buf) = (0, vec![0u8; 16 * 1024]);
            while got < LEN {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        };
        tokio::join!(serve, read)
    }

    /// rustls reports no progress while it drains its own buffer (up to 64 KiB) into the
    /// socket, so above TLS the timer takes a slow but steady reader for a stalled one and
    /// cuts it at the final flush; on the socket, under TLS, it sees every write.
    #[tokio::test(start_paused = true)]
    async fn under_tls_the_timer_sees_a_slow_reader_progress() {
        let (res, got) = slow_tls_reader(true).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(got, 256 * 1024);
        let (res, _) = slow_tls_reader(false).await;
        assert_eq!(
            res.expect_err("above TLS the flush waits on 64 KiB").kind(),
            io::ErrorKind::TimedOut
        );
    }
}
