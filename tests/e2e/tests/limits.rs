//! `max_connections`: at a cap duplex stops accepting, new connections wait in the listen
//! backlog, and each is served once a connection closes or a reload raises the cap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use duplex_config::Config;
use duplex_e2e::backend::Backend;
use duplex_e2e::client::{close, get, recv, tcp, ws};
use duplex_e2e::health_kit::wrap;
use duplex_e2e::proxy::TestProxy;
use duplex_e2e::raw::RawBackend;
use duplex_e2e::wire::{read_head, upgrade_request, Head};
use duplex_e2e::{eventually, within, STEP};
use duplex_proxy::{Metrics, Proxy};
use futures_util::SinkExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How long a connection held at a cap is watched for an answer that must not come.
const HELD: Duration = Duration::from_millis(300);

/// Listeners `public` and `other` on loopback port 0 with their own caps, the global
/// cap, and one catch-all route to `backend`.
fn yaml(global: Option<usize>, public: Option<usize>, backend: SocketAddr) -> String {
    let cap = |n: Option<usize>, indent: &str| {
        n.map(|n| format!("{indent}max_connections: {n}\n"))
            .unwrap_or_default()
    };
    format!(
        "{}listeners:\n  - name: public\n    bind: 127.0.0.1:0\n{}  - name: other\n    \
         bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nroutes:\n  - name: main\n    \
         upstream: main\nupstreams:\n  - name: main\n    backends:\n      - addr: {backend}\n",
        cap(global, ""),
        cap(public, "    "),
    )
}

fn config(text: &str) -> Config {
    Config::parse(text, "limits.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn start(text: &str) -> TestProxy {
    let started = Proxy::start(config(text), None, Arc::new(Metrics::new()));
    wrap(
        within("the proxy to start", started)
            .await
            .expect("the proxy starts"),
    )
}

/// Connects (the kernel completes it from the backlog) and sends an upgrade request.
async fn upgrade_sent(addr: SocketAddr) -> TcpStream {
    let mut s = tcp(addr).await;
    let req = upgrade_request("/held", &addr.to_string(), &[]);
    within("write an upgrade request", s.write_all(req.as_bytes()))
        .await
        .expect("write an upgrade request");
    s
}

/// The connection gets nothing, neither bytes nor a close, for [`HELD`].
async fn unanswered(s: &mut TcpStream, what: &str) {
    silent_for(s, HELD, what).await;
}

/// The connection gets nothing, neither bytes nor a close, for `how_long`.
async fn silent_for(s: &mut TcpStream, how_long: Duration, what: &str) {
    let mut buf = [0u8; 256];
    if let Ok(r) = tokio::time::timeout(how_long, s.read(&mut buf)).await {
        let got = r.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        panic!("{what}: expected no answer at the cap, got {got:?}");
    }
}

/// The 101 that a held upgrade gets once it is accepted; the tunnel stays open.
async fn served(mut s: TcpStream) -> TcpStream {
    let (head, _) = within("the held upgrade's 101", read_head(&mut s))
        .await
        .expect("a response head");
    assert_eq!(head.status(), 101, "{head:?}");
    s
}

async fn waits(p: &TestProxy, listener: &str, limit: &str) -> f64 {
    p.metric(
        "duplex_connection_limit_waits_total",
        &[("listener", listener), ("limit", limit)],
    )
    .await
}

/// `duplex_connections_reclaimed_total` of listener `public`.
async fn reclaimed(p: &TestProxy) -> f64 {
    p.metric(
        "duplex_connections_reclaimed_total",
        &[("listener", "public")],
    )
    .await
}

async fn status(p: &TestProxy) -> Value {
    let r = get(p.admin, "/status", &[]).await;
    serde_json::from_str(&r.text()).expect("/status is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_at_its_cap_holds_new_connections_until_one_closes() {
    let b = Backend::start("a").await;
    let p = start(&yaml(None, Some(2), b.addr)).await;
    // Both series exist at 0 before any wait, so that increase() sees the first one.
    let text = p.metrics().await;
    for limit in ["global", "listener"] {
        let series = format!(
            "duplex_connection_limit_waits_total{{limit=\"{limit}\",listener=\"public\"}} 0\n"
        );
        assert!(text.contains(&series), "{series} in\n{text}");
    }
    let (mut first, _) = ws(p.addr, "/one").await;
    let (second, _) = ws(p.addr, "/two").await;
    let mut held = upgrade_sent(p.addr).await;
    eventually(STEP, "the accept loop to stop at the cap", || async {
        waits(&p, "public", "listener").await >= 1.0
    })
    .await;
    unanswered(&mut held, "a third upgrade on a listener capped at 2").await;

    // The other listener has no cap of its own, and the global one is far.
    let r = get(p.proxy.listener_addr("other").expect("bound"), "/", &[]).await;
    assert_eq!(r.status, 200);
    let s = status(&p).await;
    let public = &s["listeners"][0];
    assert_eq!(public["name"], "public");
    assert_eq!(
        (
            public["connections"].as_u64(),
            public["max_connections"].as_u64()
        ),
        (Some(2), Some(2))
    );
    // A test proxy has no open-file limit recorded: no global cap.
    assert_eq!(s["connections"]["max"], Value::Null);
    assert_eq!(p.metric("duplex_connections_limit", &[]).await, 0.0);

    // The open tunnels still work at the cap.
    within("send", first.send(Message::text("still here")))
        .await
        .expect("send");
    assert_eq!(recv(&mut first).await, Message::text("still here"));

    close(second).await;
    served(held).await;
    close(first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cap_spans_listeners() {
    let b = Backend::start("a").await;
    let p = start(&yaml(Some(1), None, b.addr)).await;
    let (tunnel, _) = ws(p.addr, "/one").await;
    // A tunnel on one listener fills the cap of both: the other takes a connection in,
    // and holds it unanswered until there is room.
    let other = p.proxy.listener_addr("other").expect("bound");
    let mut held = upgrade_sent(other).await;
    eventually(
        STEP,
        "the other listener to stop at the global cap",
        || async { waits(&p, "other", "global").await >= 1.0 },
    )
    .await;
    unanswered(&mut held, "an upgrade on the other listener").await;
    assert_eq!(p.metric("duplex_connections_limit", &[]).await, 1.0);
    let s = status(&p).await;
    assert_eq!(s["connections"]["open"].as_u64(), Some(1));
    // Held, not counted: the listeners' counts add up to the total.
    let counts: Vec<_> = (0..2)
        .map(|i| s["listeners"][i]["connections"].as_u64())
        .collect();
    assert_eq!(counts, [Some(1), Some(0)]);

    close(tunnel).await;
    served(held).await;
}

/// A keep-alive request on a fresh connection, its answer read whole; the connection
/// stays open.
async fn keep_alive_get(addr: SocketAddr) -> TcpStream {
    let mut s = tcp(addr).await;
    send_get(&mut s, "/").await;
    let (head, _) = answer(&mut s).await;
    assert_eq!(head.status(), 200, "{head:?}");
    s
}

/// Sends a keep-alive GET of `path`.
async fn send_get(s: &mut TcpStream, path: &str) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    within("write a request", s.write_all(req.as_bytes()))
        .await
        .expect("write a request");
}

/// An answer's head and its body, as long as its Content-Length says.
async fn answer(s: &mut TcpStream) -> (Head, Vec<u8>) {
    let (head, mut body) = within("the answer", read_head(s)).await.expect("an answer");
    let len: usize = head
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .expect("a Content-Length");
    while body.len() < len {
        let mut more = [0u8; 256];
        let n = within("the body", s.read(&mut more))
            .await
            .expect("read the body");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&more[..n]);
    }
    (head, body)
}

/// The connection is closed by the proxy: end of stream, no bytes.
async fn closed(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    let n = within(what, s.read(&mut buf))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(n, 0, "{what}: got {:?}", String::from_utf8_lossy(&buf[..n]));
}

/// At the cap an idle keep-alive HTTP connection is closed to let a new client in; the
/// tunnel that shares the cap is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_makes_room_at_the_cap() {
    let b = Backend::start("a").await;
    let p = start(&yaml(Some(2), None, b.addr)).await;
    let (mut tunnel, _) = ws(p.addr, "/one").await;
    let mut idle = keep_alive_get(p.addr).await;
    // At the cap, but nobody waits: the idle connection stays.
    unanswered(&mut idle, "an idle connection while nobody waits").await;

    let held = upgrade_sent(p.addr).await;
    let _third = served(held).await;
    closed(&mut idle, "the idle keep-alive connection").await;
    // Stopped when the idle connection filled the cap, and again with the third in.
    assert!(waits(&p, "public", "global").await >= 1.0);
    let reclaimed = reclaimed(&p).await;
    assert_eq!(reclaimed, 1.0);
    within("send", tunnel.send(Message::text("untouched")))
        .await
        .expect("send");
    assert_eq!(recv(&mut tunnel).await, Message::text("untouched"));
}

/// A connection that sends nothing, or a head that never ends (slowloris), holds a full
/// cap only for a few seconds (not the whole `client_header_timeout`) once someone waits:
/// it is closed like an idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_makes_room_at_the_cap() {
    let b = Backend::start("a").await;
    let p = start(&yaml(Some(1), None, b.addr)).await;
    let mut tunnel = None;
    for (n, sent) in [&b""[..], b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: "]
        .into_iter()
        .enumerate()
    {
        // Before it connects: it is registered, and its time starts, after this.
        let started = std::time::Instant::now();
        let mut silent = tcp(p.addr).await;
        silent.write_all(sent).await.expect("write");
        drop(tunnel.take());
        eventually(STEP, "the silent connection to be accepted", || async {
            status(&p).await["connections"]["open"] == 1
        })
        .await;
        let held = upgrade_sent(p.addr).await;
        closed(&mut silent, "the connection with no request").await;
        // Given its time to begin a request first (3 s, to the millisecond duplex counts).
        assert!(
            started.elapsed() >= Duration::from_millis(2990),
            "closed after {:?}",
            started.elapsed()
        );
        tunnel = Some(served(held).await);
        assert_eq!(reclaimed(&p).await, n as f64 + 1.0);
    }
}

/// At the cap the idle connection is closed and the one with a request in progress is
/// not: it gets its whole answer and stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_progress_at_the_cap_is_left_alone() {
    // A backend that takes a while to answer.
    let slow = RawBackend::start(|mut tcp| async move {
        loop {
            let _ = read_head(&mut tcp).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
                .await?;
        }
    })
    .await;
    let p = start(&yaml(Some(2), None, slow.addr)).await;
    let mut idle = keep_alive_get(p.addr).await;
    let mut busy = tcp(p.addr).await;
    send_get(&mut busy, "/").await;
    let mut held = upgrade_sent(p.addr).await;
    closed(&mut idle, "the idle connection").await;
    assert_eq!(waits(&p, "public", "global").await, 1.0);

    let (head, body) = answer(&mut busy).await;
    assert_eq!((head.status(), &body[..]), (200, &b"slow"[..]), "{head:?}");
    unanswered(&mut busy, "the connection that was busy at the cap").await;
    let reclaimed = reclaimed(&p).await;
    assert_eq!(reclaimed, 1.0, "only the idle connection");
    // Let in: the slow backend is not a WebSocket backend, so any answer will do.
    let (head, _) = within("the held upgrade's answer", read_head(&mut held))
        .await
        .expect("an answer");
    assert!(head.status() >= 100, "{head:?}");
}

/// A connection that has not been answered yet is not idle, only new: at a cap it is
/// not closed to let the next one in before it has had 3 s to begin a request, so one
/// freed place cannot empty the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_is_not_closed_for_the_next_one() {
    let b = Backend::start("a").await;
    let p = start(&yaml(Some(1), None, b.addr)).await;
    let (tunnel, _) = ws(p.addr, "/one").await;
    // Two clients that connect and have not sent their requests yet.
    let mut first = tcp(p.addr).await;
    eventually(STEP, "the first to be held at the cap", || async {
        waits(&p, "public", "global").await >= 1.0
    })
    .await;
    let mut second = tcp(p.addr).await;
    // The tunnel's place goes to the first; the loop then holds the second.
    close(tunnel).await;
    eventually(STEP, "the second to be held", || async {
        waits(&p, "public", "global").await >= 2.0
    })
    .await;
    // Longer than the held loop's once-a-second look, which finds the first registered.
    let looks = Duration::from_millis(1500);
    silent_for(
        &mut first,
        looks,
        "the first, let in and not yet asked anything",
    )
    .await;
    unanswered(&mut second, "the second, held").await;
    send_get(&mut first, "/").await;
    let (head, _) = answer(&mut first).await;
    assert_eq!(head.status(), 200, "{head:?}");
    // Not asked to close before its request (hyper would have answered it with
    // `connection: close`).
    assert_eq!(head.get("connection"), None, "{head:?}");
    // Answered and idle now: closed for the second.
    closed(&mut first, "the first once answered").await;
    send_get(&mut second, "/").await;
    assert_eq!(answer(&mut second).await.0.status(), 200);
}

/// A response body still being sent keeps its connection from counting as idle: at the
/// cap the idle connection is closed, and the streaming one finishes its body and stays
/// open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_still_streaming_is_not_idle() {
    // `/stream` sends a chunked body in two parts a second apart; anything else `fast`.
    let backend = RawBackend::start(|mut tcp| async move {
        loop {
            let (head, _) = read_head(&mut tcp).await?;
            if head.first_line.starts_with("GET /stream") {
                tcp.write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                )
                .await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                tcp.write_all(b"4\r\nlast\r\n0\r\n\r\n").await?;
            } else {
                tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfast")
                    .await?;
            }
        }
    })
    .await;
    let p = start(&yaml(Some(2), None, backend.addr)).await;
    let mut idle = keep_alive_get(p.addr).await;
    let mut streaming = tcp(p.addr).await;
    send_get(&mut streaming, "/stream").await;
    let (head, mut body) = within("the streaming head", read_head(&mut streaming))
        .await
        .expect("a head");
    assert_eq!(head.status(), 200, "{head:?}");
    assert_eq!(head.get("connection"), None, "kept alive: {head:?}");

    // Mid-body: a third client is held, and only the idle connection is closed.
    let mut held = upgrade_sent(p.addr).await;
    closed(&mut idle, "the idle connection").await;
    while !body.windows(5).any(|w| w == b"0\r\n\r\n") {
        let mut more = [0u8; 256];
        let n = within("the rest of the body", streaming.read(&mut more))
            .await
            .expect("read the body");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&more[..n]);
    }
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("first") && text.contains("last"), "{text}");
    // Nobody waits now (the third took the idle one's place): the streaming connection,
    // never asked, stays open.
    unanswered(&mut streaming, "the connection whose body was streaming").await;
    let (head, _) = within("the held one's answer", read_head(&mut held))
        .await
        .expect("an answer");
    assert_eq!(head.status(), 200, "{head:?}");
}

/// A client that gives up while waiting in the backlog is let go when its turn comes,
/// without closing anyone's idle connection for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gave_up_waiting_closes_nobody() {
    let b = Backend::start("a").await;
    let p = start(&yaml(Some(2), None, b.addr)).await;
    let (tunnel, _) = ws(p.addr, "/one").await;
    let (_other, _) = ws(p.addr, "/two").await;
    // Held at the cap: a client that has not sent its request yet.
    let mut held = tcp(p.addr).await;
    eventually(STEP, "the first to be held at the cap", || async {
        waits(&p, "public", "global").await >= 1.0
    })
    .await;
    // Behind it in the backlog, one that gives up: connects, then closes.
    let quitter = tcp(p.addr).await;
    drop(quitter);

    // Room for the held one; then the quitter's turn, while the held one is not yet
    // answered (not idle), then answered and idle.
    close(tunnel).await;
    send_get(&mut held, "/").await;
    assert_eq!(answer(&mut held).await.0.status(), 200);
    // Longer than the once-a-second look a loop still waiting for the quitter would make.
    silent_for(&mut held, Duration::from_millis(1500), "the idle one").await;
    let reclaimed = reclaimed(&p).await;
    assert_eq!(reclaimed, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_raises_the_cap_lets_held_connections_in_and_one_that_lowers_it_closes_none()
{
    let b = Backend::start("a").await;
    let p = start(&yaml(None, Some(1), b.addr)).await;
    let (mut first, _) = ws(p.addr, "/one").await;
    let mut held = upgrade_sent(p.addr).await;
    eventually(STEP, "the accept loop to stop at the cap", || async {
        waits(&p, "public", "listener").await >= 1.0
    })
    .await;
    unanswered(&mut held, "a second upgrade under a cap of 1").await;

    // Raised: the held connection gets in while the first stays open. (Both listeners
    // keep their sockets: same names, same configured addresses.)
    let raised = config(&yaml(None, Some(3), b.addr));
    within("the reload", p.proxy.reload(raised))
        .await
        .expect("the reload applies");
    let second = served(held).await;

    // Lowered below the two open: neither is closed, and a new one waits until both are.
    let lowered = config(&yaml(None, Some(1), b.addr));
    within("the reload", p.proxy.reload(lowered))
        .await
        .expect("the reload applies");
    let mut held = upgrade_sent(p.addr).await;
    unanswered(&mut held, "an upgrade over the lowered cap").await;
    within("send", first.send(Message::text("kept")))
        .await
        .expect("send");
    assert_eq!(recv(&mut first).await, Message::text("kept"));
    close(first).await;
    unanswered(&mut held, "one tunnel closed, one still at the cap of 1").await;
    drop(second);
    served(held).await;
}

/// A listener that keeps its name on a new address keeps its count: the tunnel still
/// open on the old socket holds the only place under its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moved_to_a_new_address_keeps_its_count() {
    let b = Backend::start("a").await;
    let p = start(&yaml(None, Some(1), b.addr)).await;
    let (first, _) = ws(p.addr, "/one").await;
    let moved = yaml(None, Some(1), b.addr).replacen("bind: 127.0.0.1:0", "bind: 127.0.0.2:0", 1);
    within("the reload", p.proxy.reload(config(&moved)))
        .await
        .expect("the reload applies");
    let addr = p.proxy.listener_addr("public").expect("bound");
    assert_eq!(addr.ip().to_string(), "127.0.0.2");
    let mut held = upgrade_sent(addr).await;
    unanswered(&mut held, "an upgrade on the moved listener").await;
    close(first).await;
    let _second = served(held).await;
}

/// A client that sends its upgrade and closes while held in the backlog at a cap is read,
/// request and end together, once duplex takes it in: hyper then drops the request
/// before handling it. It is counted `client_closed` all the same, as the one that held
/// the place and left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_client_left_in_the_backlog_is_counted_client_closed() {
    let b = RawBackend::silent().await;
    let p = start(&yaml(None, Some(1), b.addr)).await;
    // Its handshake waits on a silent backend, holding the one place.
    let holder = upgrade_sent(p.addr).await;
    eventually(STEP, "the first handshake to reach the backend", || async {
        b.accepted() == 1
    })
    .await;
    let left = upgrade_sent(p.addr).await;
    drop(left);
    drop(holder);
    let closed = [("route", "main"), ("result", "client_closed")];
    eventually(STEP, "both to be counted client_closed", || async {
        p.metric("duplex_websocket_upgrades_total", &closed).await == 2.0
    })
    .await;
}

/// Each listener's own cap is exported, 0 for one without, and follows a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listeners_cap_is_exported() {
    let b = RawBackend::silent().await;
    let p = start(&yaml(None, Some(3), b.addr)).await;
    let cap = |listener: &'static str| {
        let p = &p;
        async move {
            p.metric(
                "duplex_listener_connections_limit",
                &[("listener", listener)],
            )
            .await
        }
    };
    assert_eq!((cap("public").await, cap("other").await), (3.0, 0.0));
    p.proxy
        .reload(config(&yaml(None, Some(7), b.addr)))
        .await
        .expect("reload");
    assert_eq!(cap("public").await, 7.0);
}
