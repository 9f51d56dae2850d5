//! Requests whose target could mean one thing to routing and another to a backend are
//! refused before any backend sees them: a malformed `Host`, a path with `.` or `..`
//! segments, `CONNECT`. And a backend may not switch protocols on a request that did not
//! ask to. Raw bytes on both sides.

use duplex_e2e::backend::Backend;
use duplex_e2e::client::{raw_exchange, RawReply};
use duplex_e2e::proxy::{TestProxy, Upstream};
use duplex_e2e::raw::RawBackend;
use duplex_e2e::wire::{read_head, upgrade_request};
use tokio::io::AsyncWriteExt;

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

/// A GET of `path` naming `host`, in raw bytes, and its answer.
async fn get_raw(addr: std::net::SocketAddr, host: &str, path: &str) -> RawReply {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    raw_exchange(addr, req.as_bytes()).await
}

/// Asserts that `r` has status `code`; `what` names the case.
fn expect_status(r: &RawReply, code: u16, what: &str) {
    let want = format!("HTTP/1.1 {code}");
    assert!(r.head.first_line.starts_with(&want), "{what}: {:?}", r.head);
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
        let r = get_raw(p.addr, host, "/public/x").await;
        expect_status(&r, 400, host);
        assert!(r.body.contains("Host header"), "{host}: {}", r.body);
        let upgrade = upgrade_request("/public/ws", host, &[]);
        let r = raw_exchange(p.addr, upgrade.as_bytes()).await;
        expect_status(&r, 400, host);
    }
    // The well-formed forms still go through.
    for host in ["public.test", "public.test:8080", "PUBLIC.test."] {
        let r = get_raw(p.addr, host, "/public/x").await;
        expect_status(&r, 200, host);
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
        let r = get_raw(p.addr, "public.test", path).await;
        expect_status(&r, 400, path);
        assert!(r.body.contains(". or .."), "{path}: {}", r.body);
        let upgrade = upgrade_request(path, "public.test", &[]);
        let r = raw_exchange(p.addr, upgrade.as_bytes()).await;
        expect_status(&r, 400, path);
    }
    // Dots inside a segment are not segments of their own.
    for path in ["/public/a..b", "/public/.well-known/x", "/public/v1.2/"] {
        let r = get_raw(p.addr, "public.test", path).await;
        expect_status(&r, 200, path);
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

/// Parameters do not hide a `..` (`..;/` is `..` to Tomcat, Jetty and Spring); a
/// bracketed IPv6 host, with or without a zone, is a host like any other.
#[tokio::test]
async fn dot_segments_behind_parameters_are_refused_and_ipv6_hosts_pass() {
    let b = Backend::start("b1").await;
    let upstream = Upstream::new("round_robin").backend(b.addr);
    let p = TestProxy::start(&format!(
        "routes:\n  - name: public\n    match:\n      path_prefix: /public\n    upstream: app\nupstreams:\n{}",
        upstream.yaml("app")
    ))
    .await;
    for path in ["/public/..;/admin", "/public/..;jsessionid=1/admin"] {
        let r = get_raw(p.addr, "public.test", path).await;
        expect_status(&r, 400, path);
    }
    for host in ["[::1]", "[::1]:8080", "[fe80::1%25eth0]:80"] {
        let r = get_raw(p.addr, host, "/public/x").await;
        expect_status(&r, 200, host);
    }
    assert_eq!(b.requests().len(), 3);
}

/// A `redirect_https` listener checks the `Host` before writing it into `Location`: no
/// redirect to a host the request only pretended to name.
#[tokio::test]
async fn a_redirect_never_carries_a_malformed_host() {
    let yaml = "listeners:\n  - name: public\n    bind: 127.0.0.1:0\n    redirect_https: true\n\
                admin:\n  bind: 127.0.0.1:0\n";
    let (proxy, addr) = duplex_e2e::proxy::start_yaml(yaml, None).await;
    let good = raw_exchange(addr, b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert!(
        good.head.first_line.starts_with("HTTP/1.1 308"),
        "{:?}",
        good.head
    );
    assert_eq!(good.head.get("location"), Some("https://a.test/x"));
    for host in ["a.test@evil.test", "evil.test/x", "a.test:80@evil.test"] {
        let req = format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let r = raw_exchange(addr, req.as_bytes()).await;
        expect_status(&r, 400, host);
        assert!(r.head.get("location").is_none(), "{host}: {:?}", r.head);
    }
    duplex_e2e::within(
        "shutdown",
        proxy.shutdown(std::time::Duration::from_secs(1)),
    )
    .await;
}

/// A backend that answers every request with `answer(request line)`.
async fn answering(answer: fn(&str) -> String) -> RawBackend {
    RawBackend::start(move |mut tcp| async move {
        loop {
            let (head, _) = read_head(&mut tcp).await?;
            tcp.write_all(answer(&head.first_line).as_bytes()).await?;
        }
    })
    .await
}

/// Its request line back as the body.
fn request_line(line: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}",
        line.len()
    )
}

/// `host:port` as a request target is CONNECT's alone and `*` OPTIONS' alone (RFC 9112
/// section 3.2): on a GET the authority would stand in for `Host` and pick the route
/// unchecked, so both get 400. `OPTIONS *` reaches the backend as it is.
#[tokio::test]
async fn request_targets_only_in_the_forms_their_methods_allow() {
    let b = answering(request_line).await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    for target in ["admin.internal:8080", "user@evil.test", "[::1]:80", "*"] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: app.test\r\n\r\n");
        let r = raw_exchange(p.addr, req.as_bytes()).await;
        expect_status(&r, 400, target);
        assert!(r.body.contains("request target"), "{target}: {}", r.body);
    }
    assert_eq!(b.accepted(), 0, "none reached the backend");
    for (target, seen) in [
        ("*", "OPTIONS * HTTP/1.1"),
        ("http://app.test:80/", "OPTIONS / HTTP/1.1"),
    ] {
        let req = format!("OPTIONS {target} HTTP/1.1\r\nHost: app.test:80\r\n\r\n");
        let r = raw_exchange(p.addr, req.as_bytes()).await;
        expect_status(&r, 200, target);
        assert_eq!(r.body, seen, "{target}");
    }
}

/// What a backend says of its own framing and version is made the proxy's: a repeated
/// length (`2, 2`, which some clients cannot parse) goes on as one value, and an HTTP/1.0
/// backend's answer reaches an HTTP/1.1 client as HTTP/1.1 (RFC 9110 sections 8.6, 6.2).
#[tokio::test]
async fn a_backends_length_list_and_version_are_normalised() {
    let listed = answering(|_| "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok".into()).await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(listed.addr)).await;
    let r = get_raw(p.addr, "app.test", "/").await;
    expect_status(&r, 200, "a listed length");
    assert_eq!(r.head.all("content-length"), vec!["2"], "{:?}", r.head);
    assert_eq!(r.body, "ok");

    // Lengths that differ, on an answer framed without them (HEAD): not passed on.
    let differing = answering(|_| "HTTP/1.1 200 OK\r\nContent-Length: 5, 7\r\n\r\n".into()).await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(differing.addr)).await;
    let r = raw_exchange(p.addr, b"HEAD / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    expect_status(&r, 200, "differing lengths");
    assert!(r.head.all("content-length").is_empty(), "{:?}", r.head);

    let old = answering(|_| "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nten".into()).await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(old.addr)).await;
    let r = get_raw(p.addr, "app.test", "/").await;
    expect_status(&r, 200, "an HTTP/1.0 backend");
    assert_eq!(r.body, "ten");
}
