//! `duplex demo`: the proxy in front of three built-in echo backends, no files needed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use duplex_config::Config;

const PAGE: &str = include_str!("demo_page.html");
const BACKENDS: usize = 3;

pub fn run(port: u16, admin_port: u16, threads: Option<std::num::NonZeroUsize>) -> ExitCode {
    // Bind the backends first so the config can name their ports.
    let mut listeners = Vec::new();
    for _ in 0..BACKENDS {
        match std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
        {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("duplex demo: cannot bind a demo backend: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let yaml = demo_config(port, admin_port, &addrs);
    let config = match Config::parse(&yaml, "<demo>") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duplex demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let banner = Box::new(move |proxy: &duplex_proxy::Proxy| {
        for (i, l) in listeners.into_iter().enumerate() {
            let name = format!("demo-{}", i + 1);
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    tokio::spawn(backend(l, name));
                }
                Err(e) => eprintln!("duplex demo: backend {name}: {e}"),
            }
        }
        let addr = proxy
            .listener_addr("public")
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], port)));
        println!(
            "\nduplex demo is running with this config:\n\n{yaml}\n\
             Try it:\n\
             \x20 open    http://{addr}/            (a page that talks WebSocket through duplex)\n\
             \x20 curl    http://{addr}/whoami      (plain HTTP; run it a few times)\n\
             \x20 python3 -m websockets ws://{addr}/ws   (or: websocat ws://{addr}/ws)\n\
             \x20 curl    http://{}/metrics\n\n\
             Stop with Ctrl-C.\n",
            proxy.admin_addr()
        );
    });
    crate::serve(config, None, Some(banner), threads)
}

fn demo_config(port: u16, admin_port: u16, backends: &[SocketAddr]) -> String {
    let mut y = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:{port}\nadmin:\n  bind: 127.0.0.1:{admin_port}\n\
         routes:\n  - name: demo\n    upstream: demo\nupstreams:\n  - name: demo\n    balancer: least_conn\n    backends:\n"
    );
    for b in backends {
        y.push_str(&format!("      - addr: {b}\n"));
    }
    y
}

/// One demo backend: the page, `/whoami`, and a WebSocket echo on any path.
async fn backend(listener: tokio::net::TcpListener, name: String) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(answer(req, name)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn answer(mut req: Request<Incoming>, name: String) -> Response<Full<Bytes>> {
    let key = req.headers().get("sec-websocket-key").cloned();
    if let Some(key) = key.filter(|_| req.headers().contains_key(header::UPGRADE)) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = upgrade.await {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
                echo(ws, &name).await;
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(Full::default())
            .unwrap_or_default();
    }
    let (ctype, body) = match req.uri().path() {
        "/whoami" => ("application/json", format!("{{\"backend\":\"{name}\"}}\n")),
        _ => ("text/html; charset=utf-8", PAGE.to_owned()),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, ctype)
        .header("x-backend", name)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

async fn echo<S>(mut ws: WebSocketStream<S>, name: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let hello = format!("{{\"backend\":\"{name}\",\"hello\":true}}");
    if ws.send(Message::text(hello)).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(t) => Message::text(format!(
                "{{\"backend\":\"{name}\",\"echo\":{}}}",
                json_string(t.as_str())
            )),
            Message::Binary(b) => Message::Binary(b),
            // tungstenite queues the Close answer; the next read sends it and then ends.
            Message::Close(_) => continue,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

/// A JSON string literal for `s`.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
