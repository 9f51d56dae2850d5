//! A real HTTP/1.1 + WebSocket backend (hyper and tungstenite) that names itself and records
//! what it saw.
//!
//! Plain HTTP: `POST /count` streams the body and answers `bytes=N sum=S`; `/forbidden`
//! answers 403; any other path answers 200 with the backend's name as body. Every response
//! carries `x-backend: NAME`.
//!
//! WebSocket (any path but `/forbidden`): the 101 carries `x-backend: NAME` and picks the
//! subprotocol `chat` when offered. Then, by path: `/close` closes at once with 4002
//! "server bye"; `/stream?n=N` sends `s0..s{N-1}` while reading `c0..c{N-1}`, then sends
//! `received N in order: BOOL`; anything else echoes text and binary messages. Close frames
//! received from clients are recorded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A request as the backend received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Record {
    connections: AtomicUsize,
    tls: Mutex<Vec<(Option<String>, bool)>>,
    requests: Mutex<Vec<Seen>>,
    closes: Mutex<Vec<(u16, String)>>,
}

/// A running backend; it serves until the test's runtime ends.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    record: Arc<Record>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_with(name, None).await
    }

    /// A backend that speaks TLS with `config`; it records each client's SNI and whether
    /// the client presented a certificate.
    pub async fn start_tls(name: &str, config: Arc<rustls::ServerConfig>) -> Backend {
        Backend::start_with(name, Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a backend on 127.0.0.1:0");
        let addr = listener.local_addr().expect("backend address");
        let record = Arc::new(Record::default());
        let (rec, me) = (Arc::clone(&record), name.to_owned());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                rec.connections.fetch_add(1, Ordering::SeqCst);
                let (rec, me, tls) = (Arc::clone(&rec), me.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = {
                        let rec = Arc::clone(&rec);
                        service_fn(move |req| {
                            let (rec, me) = (Arc::clone(&rec), me.clone());
                            async move { Ok::<_, Infallible>(answer(req, &me, rec).await) }
                        })
                    };
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(TokioIo::new(tcp), svc)
                                .with_upgrades()
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let (_, session) = stream.get_ref();
                            let seen = (
                                session.server_name().map(str::to_owned),
                                session.peer_certificates().is_some_and(|c| !c.is_empty()),
                            );
                            rec.tls.lock().expect("tls log").push(seen);
                            let _ = http
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        }
                    }
                });
            }
        });
        Backend {
            name: name.to_owned(),
            addr,
            record,
        }
    }

    /// Per TLS connection: the SNI the client sent, and whether it showed a certificate.
    pub fn tls_clients(&self) -> Vec<(Option<String>, bool)> {
        self.record.tls.lock().expect("tls log").clone()
    }

    /// Starts one backend per name.
    pub async fn start_all(names: &[&str]) -> Vec<Backend> {
        let mut all = Vec::new();
        for n in names {
            all.push(Backend::start(n).await);
        }
        all
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.record.connections.load(Ordering::SeqCst)
    }

    /// Every request head received so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.record.requests.lock().expect("request log").clone()
    }

    /// Close frames received from clients: (code, reason).
    pub fn closes(&self) -> Vec<(u16, String)> {
        self.record.closes.lock().expect("close log").clone()
    }
}

fn reply(status: StatusCode, name: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "x-backend",
        name.parse().expect("backend names are header-safe"),
    );
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().expect("static"));
    r
}

async fn answer(mut req: Request<Incoming>, name: &str, rec: Arc<Record>) -> Response<Full<Bytes>> {
    rec.requests.lock().expect("request log").push(Seen {
        method: req.method().clone(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    let path = req.uri().path().to_owned();
    if path == "/forbidden" {
        return reply(StatusCode::FORBIDDEN, name, "backend says no");
    }
    let key = req.headers().get("sec-websocket-key").cloned();
    if let Some(key) = key.filter(|_| req.headers().contains_key(header::UPGRADE)) {
        return upgrade(&mut req, key.as_bytes(), name, rec);
    }
    if path == "/count" {
        let (mut bytes, mut sum) = (0u64, 0u64);
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return reply(StatusCode::BAD_REQUEST, name, "body broke off");
            };
            if let Some(data) = frame.data_ref() {
                bytes += data.len() as u64;
                sum = data.iter().fold(sum, |s, &b| s.wrapping_add(u64::from(b)));
            }
        }
        return reply(StatusCode::OK, name, format!("bytes={bytes} sum={sum}"));
    }
    reply(StatusCode::OK, name, name.to_owned())
}

fn upgrade(
    req: &mut Request<Incoming>,
    key: &[u8],
    name: &str,
    rec: Arc<Record>,
) -> Response<Full<Bytes>> {
    let offers_chat = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "chat");
    let mode = Mode::of(req.uri());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(io) = on_upgrade.await {
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
            session(ws, mode, &rec.closes).await;
        }
    });
    let mut r = switching(name, key);
    if offers_chat {
        r.headers_mut()
            .insert("sec-websocket-protocol", "chat".parse().expect("static"));
    }
    r
}

/// A `101` from backend `name` answering the handshake whose `Sec-WebSocket-Key` was `key`.
pub(crate) fn switching(name: &str, key: &[u8]) -> Response<Full<Bytes>> {
    let mut r = reply(StatusCode::SWITCHING_PROTOCOLS, name, Bytes::new());
    let h = r.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::CONNECTION, "Upgrade".parse().expect("static"));
    h.insert(header::UPGRADE, "websocket".parse().expect("static"));
    h.insert(
        "sec-websocket-accept",
        derive_accept_key(key)
            .parse()
            .expect("base64 is header-safe"),
    );
    r
}

enum Mode {
    Echo,
    Close,
    Stream(usize),
}

impl Mode {
    fn of(uri: &http::Uri) -> Mode {
        match uri.path() {
            "/close" => Mode::Close,
            "/stream" => Mode::Stream(
                uri.query()
                    .and_then(|q| q.strip_prefix("n="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(100),
            ),
            _ => Mode::Echo,
        }
    }
}

type Ws = WebSocketStream<TokioIo<Upgraded>>;

async fn session(mut ws: Ws, mode: Mode, closes: &Mutex<Vec<(u16, String)>>) {
    match mode {
        Mode::Echo => {}
        Mode::Close => {
            let frame = CloseFrame {
                code: CloseCode::from(4002),
                reason: "server bye".into(),
            };
            let _ = ws.close(Some(frame)).await;
        }
        Mode::Stream(n) => {
            stream(ws, n).await;
            return;
        }
    }
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(Some(f)) => {
                closes
                    .lock()
                    .expect("close log")
                    .push((u16::from(f.code), f.reason.to_string()));
                continue;
            }
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

/// Sends `n` messages while reading `n`, then reports what it read.
async fn stream(ws: Ws, n: usize) {
    let (mut tx, mut rx) = ws.split();
    let send = async {
        for i in 0..n {
            if tx.send(Message::text(format!("s{i}"))).await.is_err() {
                break;
            }
        }
    };
    let recv = async {
        let (mut got, mut in_order) = (0, true);
        while got < n {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => {
                    in_order &= t.as_str() == format!("c{got}");
                    got += 1;
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        (got, in_order)
    };
    let ((), (got, in_order)) = tokio::join!(send, recv);
    let _ = tx
        .send(Message::text(format!(
            "received {got} in order: {in_order}"
        )))
        .await;
    while let Some(Ok(_)) = rx.next().await {}
}
