//! Real clients: tokio-tungstenite for WebSocket, hyper for HTTP, raw TCP for exact bytes.
//! Every network wait is bounded by [`STEP`](crate::STEP).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::ClientRequestBuilder;
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::wire::{read_head, upgrade_request, Head};
use crate::within;

pub type Ws = WebSocketStream<TcpStream>;

/// Opens TCP to `addr`.
pub async fn tcp(addr: SocketAddr) -> TcpStream {
    within(&format!("connect to {addr}"), TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A WebSocket handshake through `addr` to `path`, with extra headers and subprotocols.
pub async fn try_ws(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    protocols: &[&str],
) -> Result<(Ws, Response), tungstenite::Error> {
    // A `host` among `headers` is the one sent (through the URI, as tungstenite takes it);
    // the connection still goes to `addr`.
    let host = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map_or_else(|| addr.to_string(), |(_, v)| (*v).to_owned());
    let uri = format!("ws://{host}{path}")
        .parse()
        .expect("a valid ws:// URI");
    let mut req = ClientRequestBuilder::new(uri);
    for (k, v) in headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
    {
        req = req.with_header(*k, *v);
    }
    for p in protocols {
        req = req.with_sub_protocol(*p);
    }
    let stream = tcp(addr).await;
    within(
        &format!("WebSocket handshake to {path}"),
        tokio_tungstenite::client_async(req, stream),
    )
    .await
}

/// A WebSocket handshake that must succeed.
pub async fn ws(addr: SocketAddr, path: &str) -> (Ws, Response) {
    ws_with(addr, path, &[]).await
}

/// A WebSocket handshake with extra headers that must succeed.
pub async fn ws_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (Ws, Response) {
    try_ws(addr, path, headers, &[])
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake to {path} failed: {e}"))
}

/// The `x-backend` header of a 101: which backend took the connection.
pub fn backend_of(resp: &Response) -> String {
    resp.headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .expect("the 101 names its backend in x-backend")
        .to_owned()
}

/// The next message, which must come within the step bound.
pub async fn recv(ws: &mut Ws) -> Message {
    match within("the next WebSocket message", ws.next()).await {
        Some(Ok(m)) => m,
        Some(Err(e)) => panic!("WebSocket read failed: {e}"),
        None => panic!("WebSocket closed while a message was expected"),
    }
}

/// Closes the client side and reads until the peer's close arrives and the stream ends.
pub async fn close(mut ws: Ws) {
    let _ = within("send a close frame", ws.close(None)).await;
    for _ in 0..1000 {
        match within("the close to complete", ws.next()).await {
            Some(Ok(_)) => {}
            _ => return,
        }
    }
    panic!("the peer kept sending after our close");
}

/// The body type the HTTP helpers send.
pub type ClientBody = BoxBody<Bytes, Infallible>;

pub fn empty() -> ClientBody {
    Empty::new().boxed()
}

/// A request with a `Host` header naming `addr`.
pub fn request(
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: ClientBody,
) -> Request<ClientBody> {
    let mut b = Request::builder().method(method).uri(path);
    // The proxy's address as `Host`, unless `headers` name one.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        b = b.header(header::HOST, addr.to_string());
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).expect("a valid request")
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Which backend answered, from `x-backend`.
    pub fn backend(&self) -> String {
        self.header("x-backend")
            .unwrap_or_else(|| panic!("no x-backend in a {} reply: {}", self.status, self.text()))
            .to_owned()
    }
}

/// One HTTP/1.1 client connection, reused for every request sent on it.
pub struct HttpConn {
    addr: SocketAddr,
    sender: SendRequest<ClientBody>,
}

impl HttpConn {
    pub async fn open(addr: SocketAddr) -> HttpConn {
        let io = TokioIo::new(tcp(addr).await);
        let (sender, conn) = within(
            "HTTP client handshake",
            hyper::client::conn::http1::handshake(io),
        )
        .await
        .expect("HTTP client handshake");
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        HttpConn { addr, sender }
    }

    /// Sends `req` and returns as soon as the response head arrives.
    pub async fn send_head(
        &mut self,
        req: Request<ClientBody>,
    ) -> hyper::Response<hyper::body::Incoming> {
        within("the connection to be ready", self.sender.ready())
            .await
            .expect("the HTTP connection is still open");
        within("an HTTP response", self.sender.send_request(req))
            .await
            .expect("an HTTP response")
    }

    pub async fn send(&mut self, req: Request<ClientBody>) -> Reply {
        let resp = self.send_head(req).await;
        let (parts, body) = resp.into_parts();
        let body = within("an HTTP response body", body.collect())
            .await
            .expect("the whole response body")
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let req = request(Method::GET, self.addr, path, headers, empty());
        self.send(req).await
    }
}

/// An empty POST on a fresh connection (e.g. the admin endpoint's `/reload`).
pub async fn post(addr: SocketAddr, path: &str) -> Reply {
    HttpConn::open(addr)
        .await
        .send(request(Method::POST, addr, path, &[], empty()))
        .await
}

/// A GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    HttpConn::open(addr).await.get(path, headers).await
}

/// A response read from raw bytes: head and `Content-Length` body.
#[derive(Debug)]
pub struct RawReply {
    pub head: Head,
    pub body: String,
}

/// Writes `bytes` in one write and reads the response head and its `Content-Length` body.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> RawReply {
    let mut s = tcp(addr).await;
    within("write a raw request", s.write_all(bytes))
        .await
        .expect("write a raw request");
    let (head, mut body) = within("a response head", read_head(&mut s))
        .await
        .expect("a response head");
    let len: usize = head
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = within("a response body", s.read(&mut chunk))
            .await
            .expect("read a response body");
        assert!(n > 0, "connection closed inside a {len}-byte body");
        body.extend_from_slice(&chunk[..n]);
    }
    RawReply {
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A raw-bytes WebSocket handshake that must get a 101: the stream, the 101's head, and any
/// bytes that came in the same reads after it.
pub async fn raw_ws(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
) -> (TcpStream, Head, Vec<u8>) {
    let mut s = tcp(addr).await;
    let req = upgrade_request(path, &addr.to_string(), extra);
    within("write an upgrade request", s.write_all(req.as_bytes()))
        .await
        .expect("write an upgrade request");
    let (head, rest) = within("the 101", read_head(&mut s)).await.expect("the 101");
    assert_eq!(head.status(), 101, "expected 101, got {head:?}");
    (s, head, rest)
}
