//! Raw TCP backends: a test writes exactly the bytes a backend answers with, and the backend
//! counts the connections it accepted.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that hands each accepted connection to a test-written handler.
pub struct RawBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl RawBackend {
    /// Listens on 127.0.0.1 port 0 and runs `handler` on every connection. A handler's
    /// error is printed (the test then fails on what it expected and did not get).
    pub async fn start<F, Fut>(handler: F) -> RawBackend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a raw backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("raw backend address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let fut = handler(tcp);
                tokio::spawn(async move {
                    if let Err(e) = fut.await {
                        eprintln!("raw backend {addr}: handler failed: {e}");
                    }
                });
            }
        });
        RawBackend { addr, accepted }
    }

    /// Accepts connections and never answers; holds each open until the peer closes it.
    pub async fn silent() -> RawBackend {
        RawBackend::start(|mut tcp| async move {
            let mut sink = [0u8; 1024];
            while tcp.read(&mut sink).await? > 0 {}
            Ok(())
        })
        .await
    }

    /// Answers `202 Accepted` as soon as a request's head is in, then reads its body until
    /// `len` bytes have come or the connection ends, and reports how many came on
    /// `report`: an ingest endpoint that answers before it has read what it is sent.
    pub async fn answers_early(
        len: usize,
        report: tokio::sync::mpsc::UnboundedSender<usize>,
    ) -> RawBackend {
        RawBackend::start(move |mut tcp| {
            let report = report.clone();
            async move {
                let (_, rest) = crate::wire::read_head(&mut tcp).await?;
                tcp.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                    .await?;
                let mut body = rest.len();
                let mut buf = [0u8; 4096];
                while body < len {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body += n,
                    }
                }
                let _ = report.send(body);
                Ok(())
            }
        })
        .await
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// An address nothing listens on, for as long as this lives: a socket bound to a free
/// loopback port that never listens. A connect to it is refused (the kernel answers a SYN
/// to a port with no listener with a reset), and, the port being bound without
/// `SO_REUSEADDR`, no other socket of this or a concurrent test can take it meanwhile, as
/// it could a port that was bound and let go. Keep it alive while the address is in use.
pub struct DeadAddr {
    pub addr: SocketAddr,
    _bound: tokio::net::TcpSocket,
}

/// A [`DeadAddr`] on 127.0.0.1.
pub fn dead_addr() -> DeadAddr {
    let sock = tokio::net::TcpSocket::new_v4().expect("a socket for a dead address");
    sock.set_reuseaddr(false).expect("SO_REUSEADDR off");
    sock.bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a free loopback port, never to listen");
    let addr = sock.local_addr().expect("the dead address");
    DeadAddr { addr, _bound: sock }
}

/// A backend that answers any request with `len` body bytes, written as fast as the proxy
/// takes them. Each connection reports how many body bytes it wrote and whether a write
/// failed (the proxy closed the connection).
pub async fn streaming_backend(
    len: usize,
) -> (
    RawBackend,
    tokio::sync::mpsc::UnboundedReceiver<(usize, bool)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let b = RawBackend::start(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await?;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
            tcp.write_all(head.as_bytes()).await?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut wrote = 0;
            let mut failed = false;
            while wrote < len {
                let n = chunk.len().min(len - wrote);
                if tcp.write_all(&chunk[..n]).await.is_err() {
                    failed = true;
                    break;
                }
                wrote += n;
            }
            let _ = tx.send((wrote, failed));
            Ok(())
        }
    })
    .await;
    (b, rx)
}
