//! The WebSocket upgrade through the proxy: what the handshake carries each way, frames that
//! share a TCP write with it, refusals before any backend is touched, and how backend
//! refusals, dead backends and silent backends are answered.

use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use duplex_e2e::backend::Backend;
use duplex_e2e::client::{
    backend_of, close, empty, raw_exchange, raw_ws, request, tcp, try_ws, ws, HttpConn, Reply,
};
use duplex_e2e::proxy::{TestProxy, Upstream};
use duplex_e2e::raw::{dead_addr, RawBackend};
use duplex_e2e::wire::{
    accept_upgrade, client_text, read_frame, read_head, server_text, switching_protocols,
    upgrade_request, Head, KEY, OP_TEXT,
};
use duplex_e2e::{eventually, within, STEP};

/// A raw backend that answers every upgrade with a 101 carrying `extra`, reports the request
/// head it got, then echoes one text frame.
async fn recording_backend(
    extra: &'static [(&'static str, &'static str)],
) -> (RawBackend, mpsc::UnboundedReceiver<Head>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let b = RawBackend::start(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let (head, mut buf) = accept_upgrade(&mut tcp, extra).await?;
            let _ = tx.send(head);
            let f = read_frame(&mut tcp, &mut buf).await?;
            tcp.write_all(&server_text(&f.text())).await
        }
    })
    .await;
    (b, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_the_subprotocol_choice() {
    let b = Backend::start("chat-backend").await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let (ws, resp) = try_ws(p.addr, "/echo", &[], &["chat", "superchat"])
        .await
        .expect("the handshake with subprotocols succeeds");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"chat"[..]),
        "the backend's pick reaches the client"
    );
    let seen = b.requests();
    assert_eq!(
        seen[0].header("sec-websocket-protocol"),
        Some("chat, superchat"),
        "the client's offer reaches the backend"
    );
    close(ws).await;
}

/// Extension negotiation is relayed verbatim both ways (raw bytes: a client library would
/// refuse an extension it cannot run); the backend's hop-by-hop headers are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_extension_headers() {
    const OFFER: &str = "permessage-deflate; client_max_window_bits";
    const ANSWER: &str = "permessage-deflate; server_no_context_takeover";
    let (b, mut heads) = recording_backend(&[
        ("Sec-WebSocket-Extensions", ANSWER),
        ("X-Backend-Note", "kept"),
        ("Connection", "X-Backend-Hop"),
        ("X-Backend-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
    ])
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let (_s, head, _) = raw_ws(p.addr, "/", &[("Sec-WebSocket-Extensions", OFFER)]).await;
    assert_eq!(
        head.get("sec-websocket-extensions"),
        Some(ANSWER),
        "{head:?}"
    );
    assert_eq!(head.get("x-backend-note"), Some("kept"), "{head:?}");
    assert_eq!(
        head.get("x-backend-hop"),
        None,
        "named in Connection: {head:?}"
    );
    assert_eq!(head.get("keep-alive"), None, "hop-by-hop: {head:?}");
    assert_eq!(head.all("connection"), vec!["Upgrade"], "{head:?}");
    let seen = within("the backend's request", heads.recv())
        .await
        .expect("the backend got a request");
    assert_eq!(
        seen.all("sec-websocket-extensions"),
        vec![OFFER],
        "{seen:?}"
    );
}

/// A 101 with a large head (a long cookie here, 6 KiB) is relayed whole, and the tunnel
/// behind it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_101_head_is_relayed() {
    let cookie: &'static str =
        Box::leak(format!("session={}", "c".repeat(6 * 1024)).into_boxed_str());
    let extra: &'static [(&'static str, &'static str)] =
        Box::leak(Box::new([("Set-Cookie", cookie)]));
    let (b, _heads) = recording_backend(extra).await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let (mut s, head, mut rest) = raw_ws(p.addr, "/", &[]).await;
    assert_eq!(
        head.get("set-cookie"),
        Some(cookie),
        "the long header arrives whole"
    );
    s.write_all(&client_text("after a large 101"))
        .await
        .unwrap();
    let f = within("the echo", read_frame(&mut s, &mut rest))
        .await
        .expect("the echo");
    assert_eq!(f.text(), "after a large 101");
}

/// (a) The client writes its upgrade request and a masked frame in one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_in_the_upgrade_requests_write_reaches_the_backend() {
    let (frames, mut got) = mpsc::unbounded_channel();
    let b = RawBackend::start(move |mut tcp| {
        let frames = frames.clone();
        async move {
            let (_, mut buf) = accept_upgrade(&mut tcp, &[]).await?;
            let f = read_frame(&mut tcp, &mut buf).await?;
            tcp.write_all(&server_text(&f.text())).await?;
            let _ = frames.send(f);
            Ok(())
        }
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;

    let mut s = tcp(p.addr).await;
    let mut bytes = upgrade_request("/", &p.addr.to_string(), &[]).into_bytes();
    bytes.extend_from_slice(&client_text("early bird"));
    within("one write", s.write_all(&bytes))
        .await
        .expect("write request and frame");
    let (head, mut rest) = within("the 101", read_head(&mut s)).await.expect("the 101");
    assert_eq!(head.status(), 101);
    let f = within("the frame at the backend", got.recv())
        .await
        .expect("the backend read a frame");
    assert_eq!(
        (f.fin, f.opcode, f.masked, f.text().as_str()),
        (true, OP_TEXT, true, "early bird")
    );
    let echo = within("the echo", read_frame(&mut s, &mut rest))
        .await
        .expect("the echo");
    assert_eq!(echo.text(), "early bird");
}

/// (b) The backend writes its 101 and an unmasked frame in one write; and the same bytes
/// in three TCP segments, cut inside the status line and inside a header line, which the
/// proxy reads as one head and a frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_in_the_101s_write_reaches_the_client() {
    for cuts in [&[][..], &[10, 60]] {
        let b = RawBackend::start(move |mut tcp| async move {
            tcp.set_nodelay(true)?;
            let (head, _) = read_head(&mut tcp).await?;
            let mut bytes = switching_protocols(&head, &[]).into_bytes();
            bytes.extend_from_slice(&server_text("right after the 101"));
            let mut from = 0;
            for &cut in cuts.iter().chain([&bytes.len()]) {
                tcp.write_all(&bytes[from..cut]).await?;
                from = cut;
                if cut < bytes.len() {
                    // Separate segments, so that the proxy's reads see separate pieces.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
            // Hold the connection until the client goes.
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut sink).await?;
            Ok(())
        })
        .await;
        let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
        let (mut s, head, mut rest) = raw_ws(p.addr, "/", &[]).await;
        assert_eq!(head.status(), 101, "cuts {cuts:?}");
        let f = within("the frame after the 101", read_frame(&mut s, &mut rest))
            .await
            .expect("the frame after the 101");
        assert_eq!(
            (f.fin, f.opcode, f.masked, f.text().as_str()),
            (true, OP_TEXT, false, "right after the 101"),
            "cuts {cuts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_key_gets_400_without_touching_a_backend() {
    let b = RawBackend::silent().await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let base = "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                Sec-WebSocket-Version: 13\r\n";
    let cases = [
        ("no key", String::new()),
        (
            "key not base64",
            "Sec-WebSocket-Key: !!!not-base64!!!\r\n".to_owned(),
        ),
        (
            "key of 5 bytes",
            "Sec-WebSocket-Key: c2hvcnQ=\r\n".to_owned(),
        ),
        (
            "two keys",
            format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\n"),
        ),
    ];
    for (what, key) in cases {
        let r = raw_exchange(p.addr, format!("{base}{key}\r\n").as_bytes()).await;
        assert_eq!(r.head.status(), 400, "{what}: {r:?}");
        assert!(r.body.contains("Sec-WebSocket-Key"), "{what}: {}", r.body);
    }
    assert_eq!(
        b.accepted(),
        0,
        "a refused handshake must not reach a backend"
    );
}

/// A client that goes away before its handshake is answered is counted `client_closed`:
/// one that closes, and one that half-closes (hyper, like nginx, takes the end of the
/// client's stream for its leaving, and answers nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_the_answer_is_counted_client_closed() {
    let b = RawBackend::silent().await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let req = upgrade_request("/chat", "x", &[]);
    let mut half = tcp(p.addr).await;
    half.write_all(req.as_bytes()).await.expect("write");
    half.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    within(
        "the half-closed client to be let go",
        half.read_to_end(&mut rest),
    )
    .await
    .expect("read");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    // Whether the first reached the backend depends on whether duplex saw the client's
    // end before or after connecting: either way it is counted the same.
    let before = b.accepted();
    let mut gone = tcp(p.addr).await;
    gone.write_all(req.as_bytes()).await.expect("write");
    eventually(STEP, "the backend to get the second handshake", || async {
        b.accepted() == before + 1
    })
    .await;
    drop(gone);
    let closed = [("route", "main"), ("result", "client_closed")];
    eventually(STEP, "both to be counted", || async {
        p.metric("duplex_websocket_upgrades_total", &closed).await == 2.0
    })
    .await;
    let ok = [("route", "main"), ("result", "ok")];
    assert_eq!(p.metric("duplex_websocket_upgrades_total", &ok).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_8_gets_426_naming_version_13() {
    let b = RawBackend::silent().await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    );
    let r = raw_exchange(p.addr, req.as_bytes()).await;
    assert_eq!(r.head.status(), 426, "{r:?}");
    assert_eq!(r.head.get("sec-websocket-version"), Some("13"), "{r:?}");
    // RFC 9110: a 426 names what to upgrade to, with the connection option.
    assert_eq!(r.head.get("upgrade"), Some("websocket"), "{r:?}");
    assert_eq!(r.head.get("connection"), Some("upgrade"), "{r:?}");
    assert_eq!(
        b.accepted(),
        0,
        "a refused handshake must not reach a backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_without_host_gets_400() {
    let b = RawBackend::silent().await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let req = format!(
        "GET /chat HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    );
    let r = raw_exchange(p.addr, req.as_bytes()).await;
    assert_eq!(r.head.status(), 400, "{r:?}");
    assert!(r.body.contains("Host"), "{}", r.body);
    assert_eq!(
        b.accepted(),
        0,
        "a refused handshake must not reach a backend"
    );
}

/// An upgrade request sent by an HTTP client, for answers other than 101.
async fn upgrade_over_http(proxy: std::net::SocketAddr, path: &str) -> Reply {
    let mut c = HttpConn::open(proxy).await;
    let headers = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", KEY),
    ];
    c.send(request(Method::GET, proxy, path, &headers, empty()))
        .await
}

/// A backend that answers 403 instead of 101: the client gets the 403 and its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusal_reaches_the_client() {
    let b = Backend::start("strict").await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = upgrade_over_http(p.addr, "/forbidden").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.text(), "backend says no");
    assert_eq!(r.backend(), "strict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_is_skipped() {
    let dead_guard = dead_addr();
    let dead = dead_guard.addr;
    let live = Backend::start("live").await;
    let p = TestProxy::single(
        &Upstream::new("round_robin")
            .backend(dead)
            .backend(live.addr),
    )
    .await;
    for i in 0..4 {
        let (ws, resp) = ws(p.addr, "/echo").await;
        assert_eq!(backend_of(&resp), "live", "connection {i}");
        close(ws).await;
    }
    let errors = p
        .metric(
            "duplex_backend_connect_errors_total",
            &[("backend", &dead.to_string())],
        )
        .await;
    assert!(errors >= 1.0, "the dead backend was never tried ({errors})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_dead_gives_502_naming_the_route_not_the_address() {
    let guards = (dead_addr(), dead_addr());
    let (d1, d2) = (guards.0.addr, guards.1.addr);
    let p = TestProxy::single(&Upstream::new("round_robin").backend(d1).backend(d2)).await;
    let r = raw_exchange(p.addr, upgrade_request("/", "x", &[]).as_bytes()).await;
    assert_eq!(r.head.status(), 502, "{r:?}");
    assert!(r.body.contains("\"main\""), "names the route: {}", r.body);
    for secret in ["127.0.0.1", &d1.port().to_string(), &d2.port().to_string()] {
        assert!(!r.body.contains(secret), "leaks {secret}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_backend_gives_504_after_handshake_timeout() {
    let b = RawBackend::silent().await;
    let up = Upstream::new("round_robin")
        .option("handshake_timeout", "300ms")
        .backend(b.addr);
    let p = TestProxy::single(&up).await;
    let started = Instant::now();
    let r = raw_exchange(p.addr, upgrade_request("/", "x", &[]).as_bytes()).await;
    let took = started.elapsed();
    assert_eq!(r.head.status(), 504, "{r:?}");
    assert!(r.body.contains("\"main\""), "names the route: {}", r.body);
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(3),
        "answered after {took:?}, expected about 300 ms"
    );
    assert_eq!(b.accepted(), 1, "the silent backend was connected to once");
}

/// A backend that reads the upgrade and hangs up without a word, answers with bytes that
/// are not HTTP, or sends a head longer than 64 KiB, gets the client a 502 at once (not a
/// 504 after handshake_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_hangs_up_or_babbles_gives_502_at_once() {
    let long_head = [
        &b"HTTP/1.1 101 Switching Protocols\r\nX-Long: "[..],
        &[b'a'; 80 * 1024],
    ]
    .concat();
    // What the backend writes, and whether it then holds the connection open.
    let answers = [
        (Vec::new(), false),
        (b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), false),
        // A head past the 64 KiB limit that never ends.
        (long_head, true),
    ];
    for (answer, hold) in answers {
        let shown = String::from_utf8_lossy(&answer[..answer.len().min(40)]).into_owned();
        let b = RawBackend::start(move |mut tcp| {
            let answer = answer.clone();
            async move {
                let _ = read_head(&mut tcp).await?;
                tcp.write_all(&answer).await?;
                if hold {
                    let mut sink = Vec::new();
                    tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut sink).await?;
                }
                Ok(())
            }
        })
        .await;
        let up = Upstream::new("round_robin")
            .option("handshake_timeout", "10s")
            .backend(b.addr);
        let p = TestProxy::single(&up).await;
        let started = Instant::now();
        let r = raw_exchange(p.addr, upgrade_request("/", "x", &[]).as_bytes()).await;
        assert_eq!(r.head.status(), 502, "answer {shown:?}: {r:?}");
        assert!(r.body.contains("\"main\""), "names the route: {}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "answered after {:?}",
            started.elapsed()
        );
    }
}

/// The backend sees X-Forwarded-For/Proto/Host and X-Real-IP added, Host and path kept, and hop-by-hop
/// headers (those listed in Connection included) removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_x_forwarded_and_drops_hop_by_hop_headers() {
    let (b, mut heads) = recording_backend(&[]).await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let req = format!(
        "GET /chat?room=1 HTTP/1.1\r\nHost: chat.example.test:8443\r\n\
         Connection: Upgrade, X-Drop\r\nUpgrade: websocket\r\nX-Drop: 1\r\n\
         Keep-Alive: timeout=5\r\nX-Kept: yes\r\nX-Forwarded-For: 203.0.113.7\r\n\
         X-Real-IP: 203.0.113.7\r\nX_Real_IP: 203.0.113.7\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    );
    let mut s = tcp(p.addr).await;
    within("write the upgrade", s.write_all(req.as_bytes()))
        .await
        .expect("write the upgrade");
    let (head, _) = within("the 101", read_head(&mut s)).await.expect("the 101");
    assert_eq!(head.status(), 101, "{head:?}");

    let seen = within("the backend's request", heads.recv())
        .await
        .expect("the backend got a request");
    assert_eq!(seen.first_line, "GET /chat?room=1 HTTP/1.1");
    let one = |name: &str| seen.all(name);
    assert_eq!(one("host"), vec!["chat.example.test:8443"], "{seen:?}");
    assert_eq!(one("x-forwarded-for"), vec!["203.0.113.7, 127.0.0.1"]);
    assert_eq!(one("x-real-ip"), vec!["127.0.0.1"], "replaced");
    assert!(one("x_real_ip").is_empty(), "a spelling of ours: {seen:?}");
    assert_eq!(one("x-forwarded-proto"), vec!["http"]);
    assert_eq!(one("x-forwarded-host"), vec!["chat.example.test:8443"]);
    assert_eq!(one("x-kept"), vec!["yes"]);
    assert_eq!(one("sec-websocket-key"), vec![KEY]);
    assert_eq!(one("sec-websocket-version"), vec!["13"]);
    assert!(
        one("connection")
            .iter()
            .all(|v| v.eq_ignore_ascii_case("upgrade"))
            && !one("connection").is_empty(),
        "Connection names only the upgrade: {seen:?}"
    );
    assert_eq!(one("upgrade"), vec!["websocket"]);
    assert!(
        one("x-drop").is_empty(),
        "X-Drop was named in Connection: {seen:?}"
    );
    assert!(
        one("keep-alive").is_empty(),
        "Keep-Alive is hop-by-hop: {seen:?}"
    );
}

/// A 101 that is not a valid WebSocket answer (RFC 6455 section 4.1) gets the client a
/// 502, counted as `rejected_by_backend`, and no tunnel: each case is one missing or
/// wrong header, the rest being right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_101_gets_the_client_a_502() {
    // What went wrong, and the 101's headers given the right accept value.
    type Case = (&'static str, fn(&str) -> String);
    let cases: [Case; 6] = [
        ("wrong accept", |_| {
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: AAAA\r\n".into()
        }),
        ("no accept", |_| {
            "Connection: Upgrade\r\nUpgrade: websocket\r\n".into()
        }),
        ("no Connection", |accept| {
            format!("Upgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n")
        }),
        ("two accepts", |accept| {
            format!(
                "Connection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Accept: {accept}\r\n"
            )
        }),
        ("Connection without upgrade", |accept| {
            format!(
                "Connection: keep-alive\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n"
            )
        }),
        ("no Upgrade", |accept| {
            format!("Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n")
        }),
    ];
    for (what, headers) in cases {
        let b = RawBackend::start(move |mut tcp| async move {
            let (head, _) = read_head(&mut tcp).await?;
            let accept =
                duplex_e2e::wire::accept_for(head.get("sec-websocket-key").unwrap_or_default());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\n{}\r\n",
                headers(&accept)
            );
            tcp.write_all(answer.as_bytes()).await
        })
        .await;
        let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
        let req = upgrade_request("/", &p.addr.to_string(), &[]);
        let r = raw_exchange(p.addr, req.as_bytes()).await;
        assert_eq!(r.head.status(), 502, "{what}: {:?}", r.head);
        let rejected = p
            .metric(
                "duplex_websocket_upgrades_total",
                &[("result", "rejected_by_backend")],
            )
            .await;
        assert_eq!(rejected, 1.0, "{what}");
    }
}

/// A refusal with a chunked body, sent after a pause: the client gets the status, the
/// headers and the whole body, and the upgrade counts as rejected by the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_refusal_reaches_the_client_whole() {
    let b = RawBackend::start(|mut tcp| async move {
        let _ = read_head(&mut tcp).await?;
        tcp.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\
              WWW-Authenticate: Bearer\r\n\r\n5\r\nhello\r\n",
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        tcp.write_all(b"6\r\n world\r\n0\r\n\r\n").await
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = upgrade_over_http(p.addr, "/").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.text(), "hello world");
    assert_eq!(
        r.headers.get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    let rejected = p
        .metric(
            "duplex_websocket_upgrades_total",
            &[("result", "rejected_by_backend")],
        )
        .await;
    assert_eq!(rejected, 1.0);
}

/// An informational answer (here `100 Continue`) before the 101 is passed over: the client
/// gets the 101 and a working tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_informational_answer_before_the_101_is_passed_over() {
    let b = RawBackend::start(|mut tcp| async move {
        let (head, mut buf) = read_head(&mut tcp).await?;
        tcp.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        tcp.write_all(switching_protocols(&head, &[("X-After", "100")]).as_bytes())
            .await?;
        let f = read_frame(&mut tcp, &mut buf).await?;
        tcp.write_all(&server_text(&f.text())).await
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let (mut s, head, mut rest) = raw_ws(p.addr, "/", &[]).await;
    assert_eq!(head.get("x-after"), Some("100"), "{head:?}");
    s.write_all(&client_text("after a 100")).await.unwrap();
    let f = within("the echo", read_frame(&mut s, &mut rest))
        .await
        .expect("the echo");
    assert_eq!(f.text(), "after a 100");
}
