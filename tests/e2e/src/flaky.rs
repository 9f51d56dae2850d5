//! A backend whose behaviour the test switches at run time, for health checks and ejection.
//!
//! Modes ([`Mode`]), decided per request (so a keep-alive connection opened while the backend
//! was up sees the new mode on its next request):
//!
//! - `Up`: a plain request answers 200 with the backend's name as body; a WebSocket upgrade
//!   answers 101 and then echoes text and binary messages (tungstenite, as `backend.rs`).
//! - `Http500`: plain requests answer 500; upgrades still work.
//! - `RefuseUpgrade`: upgrades answer 403; plain requests 200.
//! - `Silent`: new TCP connections are accepted and held, never read or answered; a request
//!   on an older connection is never answered either. Leaving `Silent` closes them.
//! - `Down`: the listening socket is closed, so connects are refused, and every open
//!   connection and tunnel of this backend is closed, as if its process had died. Any other
//!   mode binds the same address again.
//!
//! Every response carries `x-backend: NAME`. The backend counts the WebSocket Close frames it
//! received, the upgrades it answered with 101, the TCP connections it accepted and the
//! requests it read.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How the backend behaves now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    Http500,
    RefuseUpgrade,
    /// Answers upgrades with a 101 whose `Sec-WebSocket-Accept` is wrong (a broken
    /// WebSocket stack); plain requests as `Up`.
    BadAccept,
    Silent,
    /// Accepts connections and closes them at once, unread (a server at its own
    /// connection limit).
    Hangup,
    Down,
}

/// The mode and two counters that open connections watch: `changes` (any switch) ends held
/// silent sockets, `downs` (switches to `Down`) ends every connection and tunnel.
#[derive(Debug, Clone, Copy)]
struct State {
    mode: Mode,
    changes: u64,
    downs: u64,
}

struct Inner {
    name: String,
    state: watch::Sender<State>,
    closes: AtomicUsize,
    upgrades: AtomicUsize,
    connections: AtomicUsize,
    requests: AtomicUsize,
}

impl Inner {
    fn now(&self) -> State {
        *self.state.borrow()
    }
}

/// A running backend; it serves until dropped (or the test's runtime ends).
pub struct FlakyBackend {
    pub name: String,
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    /// The accept loop, which owns the listening socket; `None` while `Down`.
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl FlakyBackend {
    /// An `Up` backend on 127.0.0.1, port chosen by the OS.
    pub async fn start(name: &str) -> FlakyBackend {
        FlakyBackend::start_at(name, SocketAddr::from(([127, 0, 0, 1], 0)))
            .unwrap_or_else(|e| panic!("bind backend {name} on 127.0.0.1:0: {e}"))
    }

    /// Starts one `Up` backend per name.
    pub async fn start_all(names: &[&str]) -> Vec<FlakyBackend> {
        let mut all = Vec::new();
        for n in names {
            all.push(FlakyBackend::start(n).await);
        }
        all
    }

    /// An `Up` backend bound to `addr` (port 0 picks one); fails if the address is taken.
    /// Must run inside a tokio runtime.
    pub fn start_at(name: &str, addr: SocketAddr) -> io::Result<FlakyBackend> {
        let listener = listen(addr)?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(State {
            mode: Mode::Up,
            changes: 0,
            downs: 0,
        });
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            state,
            closes: AtomicUsize::new(0),
            upgrades: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&inner)));
        Ok(FlakyBackend {
            name: name.to_owned(),
            addr,
            inner,
            accept: Mutex::new(Some(task)),
        })
    }

    pub fn mode(&self) -> Mode {
        self.inner.now().mode
    }

    /// Switches the behaviour. When this returns, a switch to `Down` has closed the listening
    /// socket (connects are refused) and a switch from `Down` has bound it again.
    pub async fn set(&self, mode: Mode) {
        let old = self.mode();
        if old == mode {
            return;
        }
        if mode == Mode::Down {
            let task = self.accept.lock().expect("accept task").take();
            if let Some(task) = task {
                task.abort();
                // Resolves once the task is dropped, and with it the listening socket.
                let _ = task.await;
            }
        }
        self.inner.state.send_modify(|s| {
            s.mode = mode;
            s.changes += 1;
            if mode == Mode::Down {
                s.downs += 1;
            }
        });
        if old == Mode::Down {
            let listener = listen(self.addr)
                .unwrap_or_else(|e| panic!("rebind backend {} on {}: {e}", self.name, self.addr));
            let task = tokio::spawn(accept_loop(listener, Arc::clone(&self.inner)));
            *self.accept.lock().expect("accept task") = Some(task);
        }
    }

    /// WebSocket Close frames received from clients (health probes included).
    pub fn closes(&self) -> usize {
        self.inner.closes.load(Ordering::SeqCst)
    }

    /// Upgrades answered with 101 (health probes included).
    pub fn upgrades(&self) -> usize {
        self.inner.upgrades.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Request heads read, plain and upgrade.
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FlakyBackend {
    fn drop(&mut self) {
        if let Some(task) = self.accept.get_mut().map(Option::take).ok().flatten() {
            task.abort();
        }
        // Ends every connection and tunnel this backend still has.
        self.inner.state.send_modify(|s| {
            s.mode = Mode::Down;
            s.changes += 1;
            s.downs += 1;
        });
    }
}

/// A listening socket with SO_REUSEADDR, so that the address can be bound again at once.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                inner.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(connection(tcp, Arc::clone(&inner)));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn connection(tcp: TcpStream, inner: Arc<Inner>) {
    let mut rx = inner.state.subscribe();
    let at_start = *rx.borrow_and_update();
    match at_start.mode {
        Mode::Down | Mode::Hangup => return,
        Mode::Silent => {
            // Hold the socket, unread, until the mode changes.
            let _ = rx.wait_for(|s| s.changes != at_start.changes).await;
            return;
        }
        _ => {}
    }
    let svc = {
        let inner = Arc::clone(&inner);
        service_fn(move |req| answer(req, Arc::clone(&inner), at_start.downs))
    };
    let serve = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), svc)
        .with_upgrades();
    tokio::select! {
        _ = serve => {}
        _ = rx.wait_for(|s| s.downs != at_start.downs) => {}
    }
}

fn reply(status: StatusCode, name: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "x-backend",
        name.parse().expect("backend names are header-safe"),
    );
    r
}

async fn answer(
    mut req: Request<Incoming>,
    inner: Arc<Inner>,
    downs: u64,
) -> Result<Response<Full<Bytes>>, io::Error> {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let mut rx = inner.state.subscribe();
    let now = *rx.borrow_and_update();
    let name = inner.name.as_str();
    let key = req
        .headers()
        .get("sec-websocket-key")
        .filter(|_| req.headers().contains_key(header::UPGRADE))
        .cloned();
    match (now.mode, key) {
        (Mode::Silent | Mode::Down | Mode::Hangup, _) => {
            // Never answer; once the mode changes, drop the connection instead.
            let _ = rx.wait_for(|s| s.changes != now.changes).await;
            Err(io::Error::other("the backend was silent"))
        }
        (Mode::RefuseUpgrade, Some(_)) => {
            Ok(reply(StatusCode::FORBIDDEN, name, "upgrades refused"))
        }
        (Mode::BadAccept, Some(_)) => Ok(crate::backend::switching(name, b"not the key")),
        (Mode::Up | Mode::Http500, Some(key)) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            let inner2 = Arc::clone(&inner);
            tokio::spawn(async move {
                if let Ok(io) = on_upgrade.await {
                    let ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None)
                        .await;
                    session(ws, inner2, downs).await;
                }
            });
            inner.upgrades.fetch_add(1, Ordering::SeqCst);
            Ok(crate::backend::switching(name, key.as_bytes()))
        }
        (Mode::Http500, None) => Ok(reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            name,
            "backend failing",
        )),
        (Mode::Up | Mode::RefuseUpgrade | Mode::BadAccept, None) => {
            Ok(reply(StatusCode::OK, name, name.to_owned()))
        }
    }
}

/// Echoes text and binary messages, counts Close frames (tungstenite answers them), and
/// ends when the peer goes or the backend goes `Down`.
async fn session<S>(mut ws: WebSocketStream<S>, inner: Arc<Inner>, downs: u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut rx = inner.state.subscribe();
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = rx.wait_for(|s| s.downs != downs) => return,
        };
        match msg {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                if ws.send(m).await.is_err() {
                    return;
                }
            }
            Some(Ok(Message::Close(_))) => {
                inner.closes.fetch_add(1, Ordering::SeqCst);
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}
