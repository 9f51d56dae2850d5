//! Raw TCP backends: a test writes exactly the bytes a backend answers with, and the backend
//! counts the connections it accepted.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
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

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// An address nothing listens on: bound to a free port, then closed.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to free it");
    l.local_addr().expect("address of the freed port")
}
