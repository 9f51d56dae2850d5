//! Plain HTTP through the proxy: responses relayed whole, streamed request bodies, backend
//! keep-alive reuse, routing misses, forwarding headers, and dead backends.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use http::Method;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use duplex_e2e::backend::Backend;
use duplex_e2e::client::{empty, get, raw_exchange, request, HttpConn};
use duplex_e2e::proxy::{single_route, TestProxy, Upstream, LISTENER};
use duplex_e2e::raw::{dead_addr, RawBackend};
use duplex_e2e::wire::{read_head, upgrade_request};
use duplex_e2e::within;

async fn one_backend(name: &str) -> (Backend, TestProxy) {
    let b = Backend::start(name).await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    (b, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_relayed_with_status_body_and_headers() {
    let (b, p) = one_backend("web-1").await;
    let r = get(p.addr, "/hello?x=1", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "web-1");
    assert_eq!(r.backend(), "web-1");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let seen = b.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (&seen[0].method, seen[0].uri.as_str()),
        (&Method::GET, "/hello?x=1")
    );

    let r = get(p.addr, "/forbidden", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (403, "backend says no")
    );
}

/// 32 MiB generated chunk by chunk, never held whole; the backend counts and sums it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_32_mib_request_body() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 512;
    let (_b, p) = one_backend("sink").await;
    let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);
    let body = StreamBody::new(stream::iter(
        (0..CHUNKS).map(move |i| Ok::<_, Infallible>(Frame::data(chunk(i)))),
    ))
    .boxed();
    let want_sum: u64 = (0..CHUNKS).map(|i| (i % 251) as u64 * CHUNK as u64).sum();
    let mut c = HttpConn::open(p.addr).await;
    let r = c
        .send(request(Method::POST, p.addr, "/count", &[], body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        format!("bytes={} sum={want_sum}", CHUNK * CHUNKS),
        "every byte arrived, in order of value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuses_backend_connections() {
    let (b, p) = one_backend("pooled").await;
    let mut c = HttpConn::open(p.addr).await;
    for i in 0..20 {
        let r = c.get("/", &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "pooled"),
            "request {i}"
        );
    }
    assert_eq!(b.requests().len(), 20);
    // One connection is the norm; a second may open when a request beats the previous
    // response's connection back into the pool. Without reuse it would be 20.
    assert!(
        b.connections() <= 2,
        "20 sequential requests opened {} backend connections",
        b.connections()
    );
    let accepted = p
        .metric(
            "duplex_connections_accepted_total",
            &[("listener", LISTENER)],
        )
        .await;
    assert_eq!(accepted, 1.0, "the client kept one connection to the proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_gives_404() {
    let b = Backend::start("api").await;
    let p = TestProxy::start(&format!(
        "routes:\n  - name: api\n    match: {{path_prefix: /api}}\n    upstream: api\n\
         upstreams:\n{}",
        Upstream::new("round_robin").backend(b.addr).yaml("api")
    ))
    .await;
    assert_eq!(
        get(p.addr, "/api/x", &[]).await.status,
        200,
        "the route works"
    );
    let r = get(p.addr, "/other", &[]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("no route"), "{}", r.text());
    let r = raw_exchange(p.addr, upgrade_request("/other", "x", &[]).as_bytes()).await;
    assert_eq!(r.head.status(), 404, "an upgrade without a route: {r:?}");
    assert_eq!(
        b.requests().len(),
        1,
        "only the routed request reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_x_forwarded_headers_and_drops_hop_by_hop_ones() {
    let (b, p) = one_backend("web").await;
    let r = get(
        p.addr,
        "/",
        &[
            ("x-forwarded-for", "198.51.100.9"),
            ("x-real-ip", "198.51.100.9"),
            // CGI and WSGI read these as X-Real-IP and X-Forwarded-Proto.
            ("x_real_ip", "198.51.100.9"),
            ("x_forwarded_proto", "https"),
            ("x_kept", "yes"),
            ("connection", "x-drop"),
            ("x-drop", "1"),
            ("x-kept", "yes"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let r2 = get(p.addr, "/", &[]).await;
    assert_eq!(r2.status, 200);
    let seen = b.requests();
    let host = p.addr.to_string();
    assert_eq!(
        seen[0].header("x-forwarded-for"),
        Some("198.51.100.9, 127.0.0.1")
    );
    assert_eq!(seen[0].header("x-real-ip"), Some("127.0.0.1"), "replaced");
    assert_eq!(seen[1].header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen[0].header("x-forwarded-host"), Some(host.as_str()));
    assert_eq!(seen[0].header("host"), Some(host.as_str()), "Host is kept");
    assert_eq!(seen[0].header("x-kept"), Some("yes"));
    assert_eq!(seen[0].header("x_real_ip"), None, "a spelling of ours");
    assert_eq!(
        seen[0].header("x_forwarded_proto"),
        None,
        "a spelling of ours"
    );
    assert_eq!(seen[0].header("x_kept"), Some("yes"), "not ours: kept");
    assert_eq!(seen[0].header("x-drop"), None, "named in Connection");
    assert_eq!(seen[1].header("x-forwarded-for"), Some("127.0.0.1"));
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
        let r = get(p.addr, "/", &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.backend()),
            (200, "live".into()),
            "request {i}"
        );
    }
    let errors = p
        .metric(
            "duplex_backend_connect_errors_total",
            &[("backend", &dead.to_string())],
        )
        .await;
    assert!(errors >= 1.0, "the dead backend was never tried ({errors})");

    let only = dead_addr();
    let p = TestProxy::single(&Upstream::new("round_robin").backend(only.addr)).await;
    let r = get(p.addr, "/", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("\"main\"") && !r.text().contains("127.0.0.1"),
        "{}",
        r.text()
    );
}

/// A failed connect gives the request back unsent: a POST goes on to the next backend
/// with its whole body.
#[tokio::test]
async fn a_post_goes_on_whole_after_a_failed_connect() {
    let live = Backend::start("live").await;
    let dead_guard = dead_addr();
    let dead = dead_guard.addr;
    let p = TestProxy::single(
        &Upstream::new("round_robin")
            .backend(dead)
            .backend(live.addr),
    )
    .await;
    // Round robin: one of two requests tries the dead backend first.
    for i in 0..2 {
        let body = http_body_util::Full::new(Bytes::from(vec![7u8; 1000])).boxed();
        let r = HttpConn::open(p.addr)
            .await
            .send(request(Method::POST, p.addr, "/count", &[], body))
            .await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "bytes=1000 sum=7000", "request {i}");
    }
    let errors = p
        .metric(
            "duplex_backend_connect_errors_total",
            &[("backend", &dead.to_string())],
        )
        .await;
    assert_eq!(errors, 1.0, "the dead backend was tried once");
}

/// An HTTP/1.0 request without `Host` reaches the backend with the backend's address as
/// its `Host`, the target it was sent to.
#[tokio::test]
async fn a_request_without_host_gets_the_backends_address() {
    let (b, p) = one_backend("named").await;
    let r = raw_exchange(p.addr, b"GET /plain HTTP/1.0\r\n\r\n").await;
    assert!(r.head.first_line.contains(" 200 "), "{}", r.head.first_line);
    assert_eq!(r.body, "named");
    let seen = b.requests();
    let last = seen.last().expect("the backend saw the request");
    assert_eq!(last.uri, "/plain");
    assert_eq!(last.header("host"), Some(b.addr.to_string().as_str()));
}

/// A proxy in front of `backend` with `response_timeout: 300ms`, and the head of a GET
/// through it (asserted 200); the proxy is returned so that it outlives the body.
async fn head_with_300ms_response_timeout(
    backend: std::net::SocketAddr,
) -> (TestProxy, http::Response<hyper::body::Incoming>) {
    let p = TestProxy::single(
        &Upstream::new("round_robin")
            .option("response_timeout", "300ms")
            .backend(backend),
    )
    .await;
    let mut conn = HttpConn::open(p.addr).await;
    let req = request(Method::GET, p.addr, "/", &[], duplex_e2e::client::empty());
    let resp = conn.send_head(req).await;
    assert_eq!(resp.status(), 200);
    (p, resp)
}

/// A body that keeps coming, slower in all than `response_timeout` but never quiet for that
/// long, arrives whole: the timeout is for silence, not for the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_body_is_not_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = duplex_e2e::raw::RawBackend::start(|mut tcp| async move {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await?;
        tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            .await?;
        for _ in 0..10 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            tcp.write_all(b"0123456789").await?;
        }
        Ok(())
    })
    .await;
    let (_p, resp) = head_with_300ms_response_timeout(b.addr).await;
    let body = duplex_e2e::within("the body", resp.into_body().collect())
        .await
        .expect("the whole body")
        .to_bytes();
    assert_eq!(body.len(), 100);
}

/// An upload that takes longer in all than `response_timeout` but never pauses that long
/// is not cut off: the wait for the answer counts from the body's last bytes. A backend
/// that then says nothing still gets 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_upload_is_not_cut_off() {
    let (b, p) = {
        let b = Backend::start("sink").await;
        let p = TestProxy::single(
            &Upstream::new("round_robin")
                .option("response_timeout", "300ms")
                .backend(b.addr),
        )
        .await;
        (b, p)
    };
    // Ten 10-byte chunks 100 ms apart: about 1 s, over three times the timeout.
    let body = StreamBody::new(stream::unfold(0u8, |i| async move {
        if i == 10 {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![1u8; 10]))),
            i + 1,
        ))
    }))
    .boxed();
    let r = HttpConn::open(p.addr)
        .await
        .send(request(Method::POST, p.addr, "/count", &[], body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "bytes=100 sum=100");
    drop(b);

    // The body all sent at once to a backend that never answers: 504 after the timeout.
    let silent = RawBackend::silent().await;
    let p = TestProxy::single(
        &Upstream::new("round_robin")
            .option("response_timeout", "300ms")
            .backend(silent.addr),
    )
    .await;
    let body = http_body_util::Full::new(Bytes::from_static(b"data")).boxed();
    let r = HttpConn::open(p.addr)
        .await
        .send(request(Method::POST, p.addr, "/count", &[], body))
        .await;
    assert_eq!(r.status, 504, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stalls_mid_body_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Headers and 10 of the 100 promised bytes, then silence (the socket stays open).
    let b = duplex_e2e::raw::RawBackend::start(|mut tcp| async move {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await?;
        tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            .await?;
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        Ok(())
    })
    .await;
    // The client gets the head, then the body fails instead of hanging.
    let (p, resp) = head_with_300ms_response_timeout(b.addr).await;
    let body = duplex_e2e::within("the body to fail", resp.into_body().collect()).await;
    assert!(body.is_err(), "a stalled body must not end as if complete");
    // Counted against the backend, beside the 2xx the status was counted as.
    let backend = b.addr.to_string();
    let labels = [("backend", backend.as_str())];
    let pr = &p;
    duplex_e2e::eventually(
        std::time::Duration::from_secs(5),
        "the cut-short body to be counted",
        || async move {
            pr.metric("duplex_backend_response_errors_total", &labels)
                .await
                == 1.0
        },
    )
    .await;
}

/// A request for a `len`-byte body from a [`duplex_e2e::raw::streaming_backend`], sent through a proxy whose
/// listener has `send_timeout` set to `timeout`, on a connection made from `sock`. Returns the
/// proxy, the backend's reports and the client's connection.
async fn big_response_behind_send_timeout(
    len: usize,
    timeout: &str,
    sock: tokio::net::TcpSocket,
) -> (
    TestProxy,
    tokio::sync::mpsc::UnboundedReceiver<(usize, bool)>,
    tokio::net::TcpStream,
) {
    use tokio::io::AsyncWriteExt;
    let (b, reports) = duplex_e2e::raw::streaming_backend(len).await;
    let upstream = Upstream::new("round_robin").backend(b.addr);
    let p = TestProxy::start_with_listener(&[("send_timeout", timeout)], &single_route(&upstream))
        .await;
    let mut client = within("connect", sock.connect(p.addr))
        .await
        .expect("connect to the proxy");
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: big.test\r\n\r\n")
        .await
        .expect("send the request");
    (p, reports, client)
}

/// A client that sends a request and then reads nothing is disconnected after the
/// listener's `send_timeout`, and the backend connection serving it is closed too, as
/// nginx's `send_timeout` does; the timeout is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    use tokio::io::AsyncReadExt;
    const LEN: usize = 256 << 20;
    let sock = tokio::net::TcpSocket::new_v4().expect("a socket");
    let (p, mut reports, mut client) = big_response_behind_send_timeout(LEN, "500ms", sock).await;
    // The client reads nothing; the backend's writes must fail once the proxy gives up.
    let (wrote, failed) = within("the backend's connection to be closed", reports.recv())
        .await
        .expect("the backend reports");
    assert!(
        failed,
        "the backend wrote all {wrote} bytes to a client that reads nothing"
    );
    assert_eq!(
        p.metric(
            "duplex_client_send_timeouts_total",
            &[("listener", LISTENER)]
        )
        .await,
        1.0
    );
    // What did reach the client ends short of the body: closed, not hung. Only what the
    // socket buffers held is left to read; reading on past the whole body (or past a
    // number of reads that would take) fails.
    let (got, ended) = within("the client's connection to end", async {
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..(LEN / 4096) {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return (got, true),
                Ok(n) => got += n,
            }
            if got >= LEN {
                break;
            }
        }
        (got, false)
    })
    .await;
    assert!(got < LEN, "the client got {got} bytes");
    assert!(
        ended,
        "the client's connection did not end after {got} bytes"
    );
}

/// A client that reads slowly but steadily gets the whole response, however long it takes
/// in all: `send_timeout` bounds each wait for the client, not the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_reader_gets_the_whole_response() {
    use tokio::io::AsyncReadExt;
    const LEN: usize = 24 << 20;
    // A small receive window, so that the proxy's writes wait on this client's reads.
    let sock = tokio::net::TcpSocket::new_v4().expect("a socket");
    sock.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    // A 1 s timeout against reads 10 ms apart: wide margin on a busy machine.
    let (p, mut reports, mut client) = big_response_behind_send_timeout(LEN, "1s", sock).await;
    // 64 KiB every 10 ms: about 4 s for the body, most of it with the proxy waiting, so
    // a timer that progress did not re-arm would fire.
    let read_all = async {
        let mut head = Vec::new();
        let mut body: Option<usize> = None;
        let mut buf = vec![0u8; 64 * 1024];
        while body.is_none_or(|got| got < LEN) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let n = client.read(&mut buf).await.expect("read the response");
            assert!(n > 0, "the response ended early");
            match body.as_mut() {
                Some(got) => *got += n,
                None => {
                    head.extend_from_slice(&buf[..n]);
                    if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
                        body = Some(head.len() - (i + 4));
                    }
                }
            }
        }
        body.unwrap_or(0)
    };
    let got = duplex_e2e::within_for(
        std::time::Duration::from_secs(60),
        "the whole body",
        read_all,
    )
    .await;
    assert_eq!(got, LEN);
    assert_eq!(
        within("the backend's report", reports.recv()).await,
        Some((LEN, false))
    );
    assert_eq!(
        p.metric(
            "duplex_client_send_timeouts_total",
            &[("listener", LISTENER)]
        )
        .await,
        0.0
    );
}

/// A chunked request body reaches the backend whatever the method: hyper's client sends a
/// GET of unknown length with no body unless told to chunk it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_forwarded_on_any_method() {
    let (_b, p) = one_backend("b1").await;
    for method in ["GET", "POST", "DELETE"] {
        let req = format!(
            "{method} /count HTTP/1.1\r\nHost: c.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        );
        let reply = raw_exchange(p.addr, req.as_bytes()).await;
        assert!(
            reply.head.first_line.starts_with("HTTP/1.1 200"),
            "{method}: {}",
            reply.head.first_line
        );
        let sum: u64 = b"hello world".iter().map(|&b| u64::from(b)).sum();
        assert_eq!(reply.body, format!("bytes=11 sum={sum}"), "{method}");
    }
}

/// Two Host headers get 400 (RFC 9112 section 3.2), plain or upgrade: duplex routes by one,
/// and a backend that reads the other must not see the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_get_400() {
    let (b, p) = one_backend("b1").await;
    let plain = b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n";
    let reply = raw_exchange(p.addr, plain).await;
    assert!(
        reply.head.first_line.starts_with("HTTP/1.1 400"),
        "{}",
        reply.head.first_line
    );
    let upgrade = upgrade_request("/ws", "a.test", &[("Host", "b.test")]);
    let reply = raw_exchange(p.addr, upgrade.as_bytes()).await;
    assert!(
        reply.head.first_line.starts_with("HTTP/1.1 400"),
        "{}",
        reply.head.first_line
    );
    assert!(
        b.requests().is_empty(),
        "the backend saw {:?}",
        b.requests()
    );
    assert_eq!(
        p.metric(
            "duplex_http_requests_total",
            &[("route", ""), ("code", "4xx")]
        )
        .await,
        1.0
    );
    assert_eq!(
        p.metric(
            "duplex_websocket_upgrades_total",
            &[("result", "bad_handshake")]
        )
        .await,
        1.0
    );
}

/// An absolute-form request (`GET http://host/path`) is routed by its target's host, and
/// the backend's `Host` names that host, whatever `Host` the client sent (RFC 9112
/// section 3.2.2); the same for an upgrade sent that way without any `Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_decides_the_host() {
    let abs = Backend::start("abs").await;
    let other = Backend::start("other").await;
    let p = TestProxy::start(&format!(
        "routes:\n  - {{name: abs, match: {{host: abs.test}}, upstream: abs}}\n  - {{name: other, upstream: other}}\nupstreams:\n{}{}",
        Upstream::new("round_robin").backend(abs.addr).yaml("abs"),
        Upstream::new("round_robin").backend(other.addr).yaml("other"),
    ))
    .await;
    let plain =
        b"GET http://abs.test/page HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n";
    let reply = raw_exchange(p.addr, plain).await;
    assert!(
        reply.head.first_line.starts_with("HTTP/1.1 200"),
        "{}",
        reply.head.first_line
    );
    assert_eq!(reply.body, "abs", "routed by the target's host");
    let upgrade = "GET http://abs.test/ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let reply = raw_exchange(p.addr, upgrade.as_bytes()).await;
    assert!(
        reply.head.first_line.starts_with("HTTP/1.1 101"),
        "{}",
        reply.head.first_line
    );
    let seen = abs.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(s.header("host"), Some("abs.test"), "{} {}", s.method, s.uri);
    }
    assert!(other.requests().is_empty());
}

/// A backend's 426 keeps its `Upgrade` header (RFC 9110 section 15.5.22: it names the
/// protocols the client should switch to), though `Upgrade` is otherwise hop-by-hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_426_keeps_the_protocols_it_asks_for() {
    let b = RawBackend::start(|mut tcp| async move {
        read_head(&mut tcp).await?;
        tcp.write_all(
            b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: TLS/1.3\r\nConnection: Upgrade\r\n\
              Content-Length: 0\r\n\r\n",
        )
        .await
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = raw_exchange(p.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.head.status(), 426, "{:?}", r.head);
    assert_eq!(r.head.get("upgrade"), Some("TLS/1.3"), "{:?}", r.head);
}

/// Request trailers reach the backend, but not as headers duplex sets itself: a backend
/// that merges trailers into the headers would read the client's X-Real-IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_cannot_carry_the_headers_duplex_sets() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let b = RawBackend::start(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let (_, mut rest) = read_head(&mut tcp).await?;
            let mut buf = [0u8; 4096];
            // The chunked body, its trailer section included.
            while !(rest.ends_with(b"\r\n\r\n") && rest.windows(3).any(|w| w == b"0\r\n")) {
                match tcp.read(&mut buf).await? {
                    0 => break,
                    n => rest.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&rest).to_lowercase());
            tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
        }
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = raw_exchange(
        p.addr,
        b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Trailer: X-Checksum, X-Real-IP, X-Forwarded-For\r\n\r\n\
          5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Real-IP: 6.6.6.6\r\n\
          X-Forwarded-For: 6.6.6.6\r\n\r\n",
    )
    .await;
    assert_eq!(r.head.status(), 200, "{:?}", r.head);
    let body = within("the body at the backend", rx.recv())
        .await
        .expect("seen");
    assert!(
        body.contains("hello") && body.contains("x-checksum: abc"),
        "{body:?}"
    );
    assert!(!body.contains("6.6.6.6"), "{body:?}");
}

/// A backend that answers in HTTP/1.0, even with `Connection: keep-alive`, has its
/// connection used once: hyper's client would send the next request in HTTP/1.0, where a
/// streamed (chunked) body cannot go, and the body was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_answered_in_http_1_0_is_not_reused() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let b = RawBackend::start(move |mut tcp| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 4096];
            // Every request on the connection: its first line and the body bytes after
            // its head (up to the last chunk, when chunked).
            while let Ok((head, mut rest)) = read_head(&mut tcp).await {
                let chunked = head
                    .get("transfer-encoding")
                    .is_some_and(|v| v.contains("chunked"));
                while chunked && !rest.windows(5).any(|w| w == b"0\r\n\r\n") {
                    match tcp.read(&mut buf).await? {
                        0 => break,
                        n => rest.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send((head.first_line, String::from_utf8_lossy(&rest).into_owned()));
                tcp.write_all(
                    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
                )
                .await?;
            }
            Ok(())
        }
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let mut c = HttpConn::open(p.addr).await;
    assert_eq!(c.get("/one", &[]).await.text(), "ok");
    let (first, _) = within("the first request", rx.recv()).await.expect("seen");
    assert_eq!(first, "GET /one HTTP/1.1");

    let body = StreamBody::new(stream::iter(
        ["hello ", "world"].map(|s| Ok::<_, Infallible>(Frame::data(Bytes::from(s)))),
    ))
    .boxed();
    let r = c
        .send(request(Method::POST, p.addr, "/upload", &[], body))
        .await;
    assert_eq!(r.text(), "ok");
    let (line, body) = within("the upload", rx.recv()).await.expect("seen");
    assert_eq!(line, "POST /upload HTTP/1.1");
    assert!(
        body.contains("hello ") && body.contains("world"),
        "{body:?}"
    );
    assert_eq!(b.accepted(), 2, "a new connection for the upload");
}

/// A backend that answers the first request on each connection and closes the
/// connection when a second one comes, as a backend whose keep-alive timeout ran out
/// just as duplex reused the connection. Counts the requests it read.
async fn closes_on_reuse() -> (RawBackend, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    let b = RawBackend::start(move |mut tcp| {
        let count = Arc::clone(&count);
        async move {
            let (head, _) = read_head(&mut tcp).await?;
            count.fetch_add(1, Ordering::SeqCst);
            let len: usize = head
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            tcp.read_exact(&mut body).await?;
            tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
                .await?;
            // The next request is read, then the connection closes unanswered.
            let (_, _) = read_head(&mut tcp).await?;
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
    .await;
    (b, seen)
}

/// A GET sent on a pooled connection that the backend closes without answering is sent
/// once more, on a new connection, and the client never sees the failure; a POST (it may
/// have been acted on) and a PUT with a body (used up by the first try) are not sent
/// again and get 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_on_a_connection_the_backend_just_closed_is_sent_again() {
    let (b, seen) = closes_on_reuse().await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let mut c = HttpConn::open(p.addr).await;
    assert_eq!(c.get("/one", &[]).await.text(), "fresh");
    // Reuses the pooled connection, which the backend closes: sent again on a new one.
    let r = c.get("/two", &[]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "fresh"));
    assert_eq!((b.accepted(), seen.load(Ordering::SeqCst)), (2, 3));

    // Not idempotent: sent once even without a body, on the connection the backend
    // then closes.
    let post = request(
        Method::POST,
        p.addr,
        "/three",
        &[("content-length", "0")],
        empty(),
    );
    let r = c.send(post).await;
    assert_eq!(r.status.as_u16(), 502, "{}", r.text());
    assert_eq!(
        (b.accepted(), seen.load(Ordering::SeqCst)),
        (2, 4),
        "the POST went out once"
    );
    // A pooled connection closed under a request is no failed connection.
    let errors = p
        .metric(
            "duplex_backend_connect_errors_total",
            &[("upstream", "main")],
        )
        .await;
    assert_eq!(errors, 0.0);

    // Idempotent but with a body, which the first try used up: not sent again either.
    assert_eq!(
        c.get("/four", &[]).await.text(),
        "fresh",
        "a fresh connection"
    );
    let data = http_body_util::Full::new(Bytes::from_static(b"data")).boxed();
    let put = request(Method::PUT, p.addr, "/five", &[], data);
    let r = c.send(put).await;
    assert_eq!(r.status.as_u16(), 502, "{}", r.text());
    assert_eq!(
        (b.accepted(), seen.load(Ordering::SeqCst)),
        (3, 6),
        "the PUT went out once"
    );
}

/// A backend that takes a new connection, reads the request's head and closes it
/// unanswered (a crashing worker, a backend refusing the request): an idempotent request
/// without a body goes to the next backend (nginx's `proxy_next_upstream error`), and
/// the failure counts as one of its connections, though not against its passive health
/// (the backend may be refusing that request); a POST is not sent on and gets 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_closed_unanswered_sends_a_get_to_the_next_backend() {
    let bad = RawBackend::start(|mut tcp| async move {
        let _ = read_head(&mut tcp).await?;
        Ok(())
    })
    .await;
    let good = Backend::start("good").await;
    let upstream = Upstream::new("round_robin")
        .option("max_fails", "1")
        .backend(bad.addr)
        .backend(good.addr);
    let yaml = single_route(&upstream).replace("max_fails: \"1\"", "max_fails: 1");
    let p = TestProxy::start(&yaml).await;
    // Round robin starts with `bad` and alternates: two of the four go to it first.
    for i in 0..4 {
        let r = get(p.addr, &format!("/get{i}"), &[]).await;
        assert_eq!(r.status.as_u16(), 200, "{i}: {}", r.text());
        assert_eq!(
            r.headers.get("x-backend").map(|v| v.as_bytes()),
            Some(&b"good"[..])
        );
    }
    assert_eq!(bad.accepted(), 2);
    assert_eq!(good.requests().len(), 4);
    let bad_label = bad.addr.to_string();
    let failed = [("backend", bad_label.as_str()), ("kind", "other")];
    assert_eq!(
        p.metric("duplex_backend_connect_errors_total", &failed)
            .await,
        2.0
    );
    let up = [("backend", bad_label.as_str())];
    assert_eq!(
        p.metric("duplex_backend_up", &up).await,
        1.0,
        "not ejected, even with max_fails 1"
    );

    // Its turn again: a POST may have been acted on, so it goes nowhere else.
    let post = request(
        Method::POST,
        p.addr,
        "/post",
        &[("content-length", "0")],
        empty(),
    );
    let r = HttpConn::open(p.addr).await.send(post).await;
    assert_eq!(r.status.as_u16(), 502, "{}", r.text());
    assert_eq!(bad.accepted(), 3);
    assert_eq!(good.requests().len(), 4, "the POST went out once");
    assert_eq!(
        p.metric("duplex_backend_connect_errors_total", &failed)
            .await,
        3.0
    );
}

/// A client that starts a request head and never finishes it is cut off after the
/// listener's `client_header_timeout` (nginx's `client_header_timeout`), not held for the
/// default 30 s.
#[tokio::test]
async fn a_head_never_finished_is_cut_off_after_client_header_timeout() {
    let b = Backend::start("b1").await;
    let upstream = Upstream::new("round_robin").backend(b.addr);
    let p = TestProxy::start_with_listener(
        &[("client_header_timeout", "300ms")],
        &single_route(&upstream),
    )
    .await;
    let mut client = duplex_e2e::client::tcp(p.addr).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a")
        .await
        .expect("send half a head");
    let mut buf = [0u8; 64];
    let n = duplex_e2e::within_for(
        std::time::Duration::from_secs(5),
        "the proxy to close a half-sent head",
        client.read(&mut buf),
    )
    .await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(b.requests().is_empty());
}
