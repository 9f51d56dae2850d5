//! Keeps idle keep-alive HTTP/1.1 connections to an upstream's backends for the next
//! request, and opens a new one when none is idle.
//!
//! A request takes a connection as a [`Lease`]; the lease goes back when the response is
//! over (its body read to the end or dropped). A connection comes back into the pool only
//! once hyper says it is ready for another request; one that closed, or that neither gets
//! ready nor moves its request body for the upstream's `response_timeout`, is let go.
//! Idle connections are kept at most [`IDLE_TIMEOUT`] and [`MAX_IDLE_PER_BACKEND`] per
//! backend, newest first, so the ones left to age out are the ones a backend would close
//! first anyway.
//!
//! Owning this rather than using hyper-util's pooled client saves about 6,000
//! instructions per request (its pool hashed a scheme-and-authority key with its strings,
//! twice per request, and moved a larger future around; this one looks up a socket
//! address), and gives unsent requests back whole, so no shared slot is needed to retry
//! them.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;

use crate::connector::connect;
use crate::http_proxy::ClientBody;
use crate::tls::Connector;

/// How long an idle connection to a backend is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per backend; one more coming free closes the oldest.
pub const MAX_IDLE_PER_BACKEND: usize = 128;
/// A lease's `wait` until its request says otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// One upstream's keep-alive connections, by backend address.
pub struct HttpPool {
    /// Bounds each connect, TLS included.
    connect_timeout: Duration,
    tls: Option<Arc<Connector>>,
    idle: Mutex<Kept>,
    /// Whether the task that closes connections idle past [`IDLE_TIMEOUT`] is running;
    /// started with the first connection that comes back, so a pool that never keeps one
    /// (an upstream that serves only WebSockets) costs no task.
    reaper: AtomicBool,
}

/// Idle connections by backend address, and which addresses the upstream still has.
#[derive(Default)]
struct Kept {
    by_addr: HashMap<SocketAddr, Vec<Idle>>,
    /// The upstream's backends as of its latest table (`None` until one says): a
    /// connection to any other is closed, not kept, so a backend taken out has no idle
    /// connections left open to it.
    backends: Option<HashSet<SocketAddr>>,
}

/// A connection to a backend and the task that drives it.
struct Conn {
    sender: SendRequest<ClientBody>,
    /// Ends the connection's task when it cannot get ready for reuse.
    task: AbortHandle,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A connection taken for one request; it goes back to the pool on drop.
pub struct Lease {
    pool: Arc<HttpPool>,
    addr: SocketAddr,
    conn: Option<Conn>,
    /// Taken from the pool rather than opened for this request: the backend may have
    /// closed it meanwhile.
    reused: bool,
    /// Whether the connection may serve another request once this one is over: not after
    /// an answer in HTTP/1.0, keep-alive or not. hyper's client would send the next
    /// request in the backend's version, and an HTTP/1.0 request has no chunked framing:
    /// a streamed body would be dropped. nginx does not reuse those connections either.
    keep: bool,
    /// The request body's progress, while one is being sent.
    uploaded: Option<Arc<Uploaded>>,
    /// How long the connection may go without getting ready for the next request, and
    /// without its request body moving, once the response is over: hyper may still be
    /// sending a body the backend answered early (a 202, a 413), which goes on while it
    /// moves. The upstream's `response_timeout`.
    wait: Duration,
}

/// When a request body last gave bytes to its backend. The wait for the response counts
/// from then (or from the attempt's start, if later), so `response_timeout` does not cut
/// off a slow but steady upload, while a backend that stops reading one is still timed;
/// a connection whose response ended while its body still goes out is kept while it moves.
pub struct Uploaded {
    start: tokio::time::Instant,
    /// Nanoseconds from `start` to the last frame handed over.
    last: AtomicU64,
    /// The last poll of the client's body found nothing to send: the wait is the
    /// client's, not the backend's (which may also simply stop reading the body).
    waiting_on_client: AtomicBool,
    /// The client's body has ended.
    ended: AtomicBool,
}

impl Uploaded {
    pub fn new() -> Uploaded {
        Uploaded {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            waiting_on_client: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        }
    }

    /// Bytes went out just now.
    pub fn mark(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
        self.waiting_on_client.store(false, Ordering::Relaxed);
    }

    /// The client's body had nothing more for now (`true`), or has ended (`false`).
    pub fn client_pending(&self, pending: bool) {
        self.waiting_on_client.store(pending, Ordering::Relaxed);
        if !pending {
            self.ended.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the body is unfinished because the client has not sent the rest.
    pub fn client_stalled(&self) -> bool {
        !self.ended.load(Ordering::Relaxed) && self.waiting_on_client.load(Ordering::Relaxed)
    }

    /// When bytes last went out (the start, if none has).
    pub fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

impl HttpPool {
    pub fn new(connect_timeout: Duration, tls: Option<Arc<Connector>>) -> Arc<HttpPool> {
        Arc::new(HttpPool {
            connect_timeout,
            tls,
            idle: Mutex::default(),
            reaper: AtomicBool::new(false),
        })
    }

    /// The newest idle connection to `addr` that is ready for a request, if any.
    pub fn take(self: &Arc<Self>, addr: SocketAddr) -> Option<Lease> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.by_addr.get_mut(&addr)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() >= IDLE_TIMEOUT {
                // Everything below is older still.
                list.clear();
                break;
            }
            if c.conn.sender.is_ready() {
                return Some(Lease {
                    pool: Arc::clone(self),
                    addr,
                    conn: Some(c.conn),
                    reused: true,
                    keep: true,
                    uploaded: None,
                    wait: DEFAULT_WAIT,
                });
            }
            // Closed by the backend while idle: dropping it ends its task.
        }
        None
    }

    /// Opens a new connection to `addr` (TCP, then TLS when the upstream has it).
    pub async fn connect(self: &Arc<Self>, addr: SocketAddr) -> io::Result<Lease> {
        let stream = connect(addr, self.connect_timeout, self.tls.as_deref()).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %addr, error = %e, "backend connection ended with an error");
            }
        })
        .abort_handle();
        Ok(Lease {
            pool: Arc::clone(self),
            addr,
            conn: Some(Conn { sender, task }),
            reused: false,
            keep: true,
            uploaded: None,
            wait: DEFAULT_WAIT,
        })
    }

    /// Keeps `conn`, ready for its next request, as the newest idle one to `addr`.
    fn keep(self: &Arc<Self>, addr: SocketAddr, conn: Conn) {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.backends.as_ref().is_some_and(|b| !b.contains(&addr)) {
                // No longer a backend of the upstream: dropping it ends its task.
                return;
            }
            let list = idle.by_addr.entry(addr).or_default();
            if list.len() >= MAX_IDLE_PER_BACKEND {
                list.remove(0);
            }
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        if !self.reaper.load(Ordering::Relaxed) {
            // Outside a runtime (a response dropped as the runtime goes away) nothing is
            // left to reap for.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                if !self.reaper.swap(true, Ordering::Relaxed) {
                    rt.spawn(reap(Arc::downgrade(self)));
                }
            }
        }
    }

    /// The upstream's backends from now on (a new table): idle connections to any other
    /// are closed now, and any other coming back from a request is closed too.
    pub fn set_backends(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let backends: HashSet<SocketAddr> = addrs.into_iter().collect();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.by_addr.retain(|addr, _| backends.contains(addr));
        idle.backends = Some(backends);
    }

    /// Drops idle connections past [`IDLE_TIMEOUT`], and those the backend closed.
    fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.by_addr.retain(|_, list| {
            list.retain(|c| c.since.elapsed() < IDLE_TIMEOUT && !c.conn.sender.is_closed());
            !list.is_empty()
        });
    }

    /// Idle connections kept now, over every backend.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.by_addr.values().map(Vec::len).sum()
    }
}

/// Closes connections idle past [`IDLE_TIMEOUT`] while the pool lives, looking every
/// half of it: a connection is closed between 90 and 135 s after its last response.
async fn reap(pool: Weak<HttpPool>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        match pool.upgrade() {
            Some(p) => p.sweep(),
            None => return,
        }
    }
}

impl Lease {
    /// Sends `req` on this connection. An error that gives the request back means none of
    /// it was sent.
    pub async fn send(
        &mut self,
        req: Request<ClientBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<ClientBody>>> {
        let sent = match self.conn.as_mut() {
            Some(c) => c.sender.try_send_request(req).await,
            // Never: the connection leaves only when the lease is dropped.
            None => unreachable!("a lease holds its connection until dropped"),
        };
        if let Ok(resp) = &sent {
            self.keep = resp.version() == http::Version::HTTP_11;
        }
        sent
    }

    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Follows the progress of the request body this connection sends; `wait` bounds a
    /// pause in it once the response is over.
    pub fn uploading(&mut self, uploaded: Option<Arc<Uploaded>>, wait: Duration) {
        self.uploaded = uploaded;
        self.wait = wait;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let keep = self.keep;
        if conn.sender.is_ready() {
            if keep {
                self.pool.keep(self.addr, conn);
            }
            // Else dropping the sender ends the connection, its exchange being over.
        } else if !conn.sender.is_closed() {
            // Still finishing this exchange (the other thread's task has not caught up, or
            // a request body is still going out): wait for it, boundedly, whether or not
            // the connection is kept after it.
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let (pool, addr, wait) = (Arc::clone(&self.pool), self.addr, self.wait);
            let uploaded = self.uploaded.take();
            rt.spawn(async move {
                let mut quiet_since = tokio::time::Instant::now();
                loop {
                    match tokio::time::timeout_at(quiet_since + wait, conn.sender.ready()).await {
                        Ok(Ok(())) => {
                            if keep {
                                pool.keep(addr, conn);
                            }
                            return;
                        }
                        Ok(Err(_)) => return,
                        Err(_) => match uploaded.as_deref().map(Uploaded::last) {
                            // The body still moves (a client stalling it fails on its own
                            // `client_body_timeout`): wait on.
                            Some(last) if last > quiet_since => quiet_since = last,
                            _ => return conn.task.abort(),
                        },
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend that answers every request on a connection with `body`, and counts
    /// the connections it accepted.
    async fn backend(body: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Waits up to 1 s, checking every 5 ms, for `done`; fails the test after that.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..200 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn get() -> Request<ClientBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, "test")
            .body(ClientBody::empty())
            .expect("request")
    }

    /// Sends one GET through `lease`; the body as text.
    async fn exchange(lease: &mut Lease) -> String {
        let Ok(resp) = lease.send(get()).await else {
            panic!("no response")
        };
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let (addr, accepted) = backend("hello").await;
        let pool = HttpPool::new(Duration::from_secs(1), None);
        assert!(pool.take(addr).is_none(), "nothing is idle yet");
        let mut lease = pool.connect(addr).await.expect("connect");
        assert!(!lease.reused());
        assert_eq!(exchange(&mut lease).await, "hello");
        // Back at once if hyper has seen the response end, else through a spawned wait.
        drop(lease);
        until("the connection to come back", || pool.idle_count() == 1).await;
        let mut again = pool.take(addr).expect("the same connection, kept");
        assert!(again.reused());
        assert_eq!(exchange(&mut again).await, "hello");
        drop(again);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection served both"
        );
    }

    #[tokio::test]
    async fn a_connection_still_busy_comes_back_once_its_response_is_done() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // The head at once, the body only when told to.
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
                    .await;
                let _ = wait.await;
                let _ = s.write_all(b"hello").await;
                let _ = s.read(&mut buf).await;
            }
        });
        let pool = HttpPool::new(Duration::from_secs(1), None);
        let mut lease = pool.connect(addr).await.expect("connect");
        let Ok(resp) = lease.send(get()).await else {
            panic!("no response")
        };
        // Its body has not come yet: the connection is not ready for another request.
        drop(lease);
        assert_eq!(
            pool.idle_count(),
            0,
            "kept while its response was still open"
        );
        let _ = go.send(());
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"hello");
        until(
            "the connection to come back once its response was done",
            || pool.idle_count() == 1,
        )
        .await;
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            // Answers one request, then closes.
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
        });
        let pool = HttpPool::new(Duration::from_secs(1), None);
        let mut lease = pool.connect(addr).await.expect("connect");
        assert_eq!(exchange(&mut lease).await, "ok");
        drop(lease);
        until("a closed connection to stop being handed out", || {
            pool.take(addr).is_none()
        })
        .await;
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_backend_taken_out_keeps_no_idle_connection() {
        let ((a, _), (b, _)) = (backend("a").await, backend("b").await);
        let pool = HttpPool::new(Duration::from_secs(1), None);
        pool.set_backends([a, b]);
        let (mut on_a, mut on_b) = (
            pool.connect(a).await.expect("a"),
            pool.connect(b).await.expect("b"),
        );
        assert_eq!(exchange(&mut on_a).await, "a");
        drop(on_a);
        until("a's connection to come back", || pool.idle_count() == 1).await;
        assert_eq!(exchange(&mut on_b).await, "b");
        // b taken out: a's idle one stays, and b's, in use now, is closed when it ends.
        pool.set_backends([a]);
        drop(on_b);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(), 1);
        assert!(pool.take(b).is_none());
        // a taken out too: its idle one closes at once.
        pool.set_backends([]);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn at_most_max_idle_are_kept_per_backend() {
        let (addr, _) = backend("x").await;
        let pool = HttpPool::new(Duration::from_secs(1), None);
        let mut leases = Vec::new();
        for _ in 0..MAX_IDLE_PER_BACKEND + 2 {
            let mut l = pool.connect(addr).await.expect("connect");
            assert_eq!(exchange(&mut l).await, "x");
            leases.push(l);
        }
        drop(leases);
        until("the connections to come back", || {
            pool.idle_count() == MAX_IDLE_PER_BACKEND
        })
        .await;
        // Not one more, once every one that can come back has: the oldest went.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(), MAX_IDLE_PER_BACKEND);
    }

    #[tokio::test]
    async fn idle_connections_age_out() {
        let (addr, _) = backend("x").await;
        let pool = HttpPool::new(Duration::from_secs(1), None);
        let age = |pool: &HttpPool| {
            // By hand rather than waiting 90 s. On Linux an `Instant` (CLOCK_MONOTONIC,
            // kept as signed seconds) can go back past the boot, so this never fails there,
            // however recently the machine booted.
            let mut idle = pool.idle.lock().expect("lock");
            for list in idle.by_addr.values_mut() {
                for c in list.iter_mut() {
                    c.since = c
                        .since
                        .checked_sub(IDLE_TIMEOUT)
                        .expect("an instant IDLE_TIMEOUT before an idle connection's");
                }
            }
        };
        let mut l = pool.connect(addr).await.expect("connect");
        assert_eq!(exchange(&mut l).await, "x");
        drop(l);
        until("the connection to come back", || pool.idle_count() == 1).await;
        age(&pool);
        pool.sweep();
        assert_eq!(pool.idle_count(), 0, "the sweep closed an aged connection");
        let mut l = pool.connect(addr).await.expect("connect");
        assert_eq!(exchange(&mut l).await, "x");
        drop(l);
        until("the connection to come back", || pool.idle_count() == 1).await;
        age(&pool);
        assert!(
            pool.take(addr).is_none(),
            "an aged connection is not handed out"
        );
        assert_eq!(pool.idle_count(), 0);
    }
}
