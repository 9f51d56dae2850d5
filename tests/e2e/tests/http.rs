//! Plain HTTP through the proxy: responses relayed whole, streamed request bodies, backend
//! keep-alive reuse, routing misses, forwarding headers, and dead backends.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::stream;
use http::Method;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use duplex_e2e::backend::Backend;
use duplex_e2e::client::{get, raw_exchange, request, HttpConn};
use duplex_e2e::proxy::{TestProxy, Upstream, LISTENER};
use duplex_e2e::raw::dead_addr;
use duplex_e2e::wire::upgrade_request;

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
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen[0].header("x-forwarded-host"), Some(host.as_str()));
    assert_eq!(seen[0].header("host"), Some(host.as_str()), "Host is kept");
    assert_eq!(seen[0].header("x-kept"), Some("yes"));
    assert_eq!(seen[0].header("x-drop"), None, "named in Connection");
    assert_eq!(seen[1].header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_is_skipped() {
    let dead = dead_addr();
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

    let p = TestProxy::single(&Upstream::new("round_robin").backend(dead_addr())).await;
    let r = get(p.addr, "/", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("\"main\"") && !r.text().contains("127.0.0.1"),
        "{}",
        r.text()
    );
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
    let (_p, resp) = head_with_300ms_response_timeout(b.addr).await;
    let body = duplex_e2e::within("the body to fail", resp.into_body().collect()).await;
    assert!(body.is_err(), "a stalled body must not end as if complete");
}
