//! Requests whose target could mean one thing to routing and another to a backend are
//! refused before any backend sees them: a malformed `Host`, a path with `.` or `..`
//! segments, `CONNECT`. And a backend may not switch protocols on a request that did not
//! ask to. Raw bytes on both sides.

use duplex_e2e::backend::Backend;
use duplex_e2e::client::raw_exchange;
use duplex_e2e::proxy::{TestProxy, Upstream};
use duplex_e2e::raw::RawBackend;
use duplex_e2e::wire::upgrade_request;

/// One route, `public`, for host `public.test` and paths under `/public`, to `b`; no
/// other route.
async fn public_only(b: std::net::SocketAddr) -> TestProxy {
    let upstream = Upstream::new("round_robin").backend(b);
    TestProxy::start(&format!(
        "routes:\n  - name: public\n    match:\n      host: public.test\n      path_prefix: /public\n    upstream: app\nupstreams:\n{}",
        upstream.yaml("app")
    ))
    .await
}

#[tokio::test]
async fn a_host_that_is_not_host_and_port_is_refused_on_both_paths() {
    let b = Backend::start("b1").await;
    let p = public_only(b.addr).await;
    for host in [
        "public.test:80@admin.test",
        "public.test:admin.test",
        "public.test:80/admin.test",
        "public.test:@admin.test",
    ] {
        let plain = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let r = raw_exchange(p.addr, plain.as_bytes()).await;
        assert!(
            r.head.first_line.starts_with("HTTP/1.1 400"),
            "{host}: {:?}",
            r.head
        );
        assert!(r.body.contains("Host header"), "{host}: {}", r.body);
        let upgrade = upgrade_request("/public/ws", host, &[]);
        let r = raw_exchange(p.addr, upgrade.as_bytes()).await;
        assert!(
            r.head.first_line.starts_with("HTTP/1.1 400"),
            "{host}: {:?}",
            r.head
        );
    }
    // The well-formed forms still go through.
    for host in ["public.test", "public.test:8080", "PUBLIC.test."] {
        let plain = format!("GET /public/x HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let r = raw_exchange(p.addr, plain.as_bytes()).await;
        assert!(
            r.head.first_line.starts_with("HTTP/1.1 200"),
            "{host}: {:?}",
            r.head
        );
    }
    assert_eq!(
        b.requests().len(),
        3,
        "only the well-formed requests reach the backend"
    );
}

#[tokio::test]
async fn a_path_with_dot_segments_is_refused_on_both_paths() {
    let b = Backend::start("b1").await;
    let p = public_only(b.addr).await;
    for path in [
        "/public/../admin",
        "/public/./../admin",
        "/public/%2e%2e/admin",
        "/public/..%2fadmin",
        "/public/..%5Cadmin",
    ] {
        let plain = format!("GET {path} HTTP/1.1\r\nHost: public.test\r\n\r\n");
        let r = raw_exchange(p.addr, plain.as_bytes()).await;
        assert!(
            r.head.first_line.starts_with("HTTP/1.1 400"),
            "{path}: {:?}",
            r.head
        );
        assert!(r.body.contains(". or .."), "{path}: {}", r.body);
        let upgrade = upgrade_request(path, "public.test", &[]);
        let r = raw_exchange(p.addr, upgrade.as_bytes()).await;
        assert!(
            r.head.first_line.starts_with("HTTP/1.1 400"),
            "{path}: {:?}",
            r.head
        );
    }
    // Dots inside a segment are not segments of their own.
    for path in ["/public/a..b", "/public/.well-known/x", "/public/v1.2/"] {
        let plain = format!("GET {path} HTTP/1.1\r\nHost: public.test\r\n\r\n");
        let r = raw_exchange(p.addr, plain.as_bytes()).await;
        assert!(
            r.head.first_line.starts_with("HTTP/1.1 200"),
            "{path}: {:?}",
            r.head
        );
    }
    let seen: Vec<String> = b.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let metrics = p.metrics().await;
    let refused = duplex_e2e::proxy::sum_series(
        &metrics,
        "duplex_http_requests_total",
        &[("route", ""), ("code", "4xx")],
    );
    assert_eq!(refused, 5.0, "{metrics}");
}

#[tokio::test]
async fn connect_is_answered_501_without_a_backend() {
    let b = RawBackend::silent().await;
    let p = public_only(b.addr).await;
    let r = raw_exchange(
        p.addr,
        b"CONNECT public.test:443 HTTP/1.1\r\nHost: public.test:443\r\n\r\n",
    )
    .await;
    assert!(
        r.head.first_line.starts_with("HTTP/1.1 501"),
        "{:?}",
        r.head
    );
    assert_eq!(b.accepted(), 0);
}

/// A backend that answers 101 to a plain GET: the client gets 502, not a switch it did
/// not ask for (and, over HTTP/1.0, could not have).
#[tokio::test]
async fn a_101_to_a_plain_request_becomes_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = RawBackend::start(|mut tcp| async move {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await?;
        tcp.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await?;
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        Ok(())
    })
    .await;
    let p = public_only(b.addr).await;
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let req = format!("GET /public/x {version}\r\nHost: public.test\r\n\r\n");
        let r = raw_exchange(p.addr, req.as_bytes()).await;
        assert!(
            r.head.first_line.ends_with("502 Bad Gateway"),
            "{version}: {:?}",
            r.head
        );
    }
}

/// A client that names `Host` or a `Sec-WebSocket-*` field in `Connection` does not get
/// it removed: the backend sees the host that routing saw, and the handshake it needs.
#[tokio::test]
async fn connection_cannot_strip_host_or_the_websocket_key() {
    let b = Backend::start("b1").await;
    let p = public_only(b.addr).await;
    let plain = "GET /public/x HTTP/1.1\r\nHost: public.test\r\nConnection: close, Host, X-Forwarded-Host\r\n\r\n";
    let r = raw_exchange(p.addr, plain.as_bytes()).await;
    assert!(
        r.head.first_line.starts_with("HTTP/1.1 200"),
        "{:?}",
        r.head
    );
    let seen = b.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("host"), Some("public.test"));
    assert_eq!(seen[0].header("x-forwarded-host"), Some("public.test"));

    let upgrade = upgrade_request("/public/ws", "public.test", &[]).replace(
        "Connection: Upgrade",
        "Connection: Upgrade, Sec-WebSocket-Key, Host",
    );
    let r = raw_exchange(p.addr, upgrade.as_bytes()).await;
    assert!(
        r.head.first_line.starts_with("HTTP/1.1 101"),
        "{:?}",
        r.head
    );
}
