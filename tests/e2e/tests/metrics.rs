//! Metrics and the admin endpoint: known traffic in, exact values out of `/metrics` (read by
//! a real Prometheus text parser), `/status` and `/readyz`.

use std::time::Duration;

use duplex_e2e::backend::Backend;
use duplex_e2e::client::{self, recv, HttpConn};
use duplex_e2e::proxy::TestProxy;
use duplex_e2e::raw::dead_addr;
use duplex_e2e::{eventually, within};
use futures_util::SinkExt;
use http::Method;
use prometheus_parse::{Sample, Scrape, Value};
use tokio_tungstenite::tungstenite::Message;

const TUNNELS: usize = 3;
const MESSAGES: usize = 5;
const PAYLOAD: usize = 100;

async fn scrape(p: &TestProxy) -> Scrape {
    let text = p.metrics().await;
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid Prometheus text")
}

/// The value of the one sample of `name` whose labels include all `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {} samples", found.len());
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
        Value::Summary(_) => panic!("{name} is a summary"),
    }
}

fn absent(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> bool {
    !s.samples
        .iter()
        .any(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_traffic_reads_back_exactly() {
    let b = Backend::start("b1").await;
    let dead_guard = dead_addr();
    let dead = dead_guard.addr;
    let p = TestProxy::start(&format!(
        "routes:
  - {{name: down, match: {{path_prefix: /down}}, upstream: down}}
  - {{name: chat, upstream: chat}}
upstreams:
  - {{name: chat, backends: [{{addr: \"{}\"}}]}}
  - {{name: down, retries: 0, backends: [{{addr: \"{dead}\"}}]}}
",
        b.addr
    ))
    .await;

    // Tunnels that each move MESSAGES messages of PAYLOAD bytes both ways, and stay open.
    let mut open = Vec::new();
    for _ in 0..TUNNELS {
        let (mut ws, _) = client::ws(p.addr, "/ws/room").await;
        for i in 0..MESSAGES {
            let text = format!("{i:0>width$}", width = PAYLOAD);
            within("send", ws.send(Message::text(text.clone())))
                .await
                .expect("send");
            assert_eq!(recv(&mut ws).await, Message::text(text));
        }
        open.push(ws);
    }
    // A handshake the backend refuses, one that is broken, and one to a dead backend.
    assert!(client::try_ws(p.addr, "/forbidden", &[], &[])
        .await
        .is_err());
    let bad = client::raw_exchange(
        p.addr,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(bad.head.status(), 426);
    assert!(client::try_ws(p.addr, "/down", &[], &[]).await.is_err());
    // Plain HTTP: four answered 2xx.
    let mut http = HttpConn::open(p.addr).await;
    for _ in 0..4 {
        assert_eq!(
            http.send(client::request(
                Method::GET,
                p.addr,
                "/page",
                &[],
                client::empty()
            ))
            .await
            .status,
            200
        );
    }

    let s = scrape(&p).await;
    let up = |r: &str| {
        value(
            &s,
            "duplex_websocket_upgrades_total",
            &[("route", "chat"), ("upstream", "chat"), ("result", r)],
        )
    };
    assert_eq!(up("ok"), TUNNELS as f64);
    assert_eq!(up("rejected_by_backend"), 1.0);
    assert_eq!(up("bad_handshake"), 1.0);
    assert_eq!(
        value(
            &s,
            "duplex_websocket_upgrades_total",
            &[("route", "down"), ("result", "connect_error")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "duplex_backend_connect_errors_total",
            &[("upstream", "down"), ("kind", "refused")]
        ),
        1.0
    );
    // Bytes are counted while the tunnels live: client frames carry a 4-byte mask.
    let bytes = |d: &str| {
        value(
            &s,
            "duplex_tunnel_bytes_total",
            &[("route", "chat"), ("direction", d)],
        )
    };
    assert_eq!(
        bytes("client_to_backend"),
        (TUNNELS * MESSAGES * (2 + 4 + PAYLOAD)) as f64
    );
    assert_eq!(
        bytes("backend_to_client"),
        (TUNNELS * MESSAGES * (2 + PAYLOAD)) as f64
    );
    let backend = b.addr.to_string();
    let active = [
        ("route", "chat"),
        ("upstream", "chat"),
        ("backend", backend.as_str()),
    ];
    assert_eq!(
        value(&s, "duplex_websocket_tunnels_active", &active),
        TUNNELS as f64
    );
    assert_eq!(
        value(
            &s,
            "duplex_websocket_handshake_duration_seconds_count",
            &[("route", "chat")]
        ),
        TUNNELS as f64
    );
    // Open now: the tunnels and the keep-alive HTTP connection, once the connections of
    // the three failed handshakes, which close on their own time, are counted closed.
    eventually(
        Duration::from_secs(5),
        "the failed handshakes' connections to be counted closed",
        || {
            let p = &p;
            async move {
                let s = scrape(p).await;
                value(&s, "duplex_connections_active", &[("listener", "public")])
                    == (TUNNELS + 1) as f64
            }
        },
    )
    .await;
    assert!(
        value(
            &s,
            "duplex_connections_accepted_total",
            &[("listener", "public")]
        ) >= (TUNNELS + 4) as f64
    );
    assert_eq!(
        value(
            &s,
            "duplex_http_requests_total",
            &[("route", "chat"), ("upstream", "chat"), ("code", "2xx")]
        ),
        4.0
    );
    assert_eq!(
        value(
            &s,
            "duplex_http_request_duration_seconds_count",
            &[("route", "chat")]
        ),
        4.0
    );
    assert_eq!(
        value(
            &s,
            "duplex_backend_up",
            &[("upstream", "chat"), ("backend", backend.as_str())]
        ),
        1.0
    );
    // A backend's failure counters exist at 0 from the start, so that an alert's
    // `increase()` sees their first failures.
    for name in [
        "duplex_backend_ejections_total",
        "duplex_backend_response_errors_total",
    ] {
        let labels = [("upstream", "chat"), ("backend", backend.as_str())];
        assert_eq!(value(&s, name, &labels), 0.0, "{name}");
    }
    assert_eq!(value(&s, "duplex_config_generation", &[]), 1.0);
    assert!(value(&s, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&s, "process_open_fds", &[]) > 0.0);

    // /status agrees.
    let status: serde_json::Value =
        serde_json::from_str(&client::get(p.admin, "/status", &[]).await.text()).expect("JSON");
    let chat = status["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .find(|u| u["name"] == "chat")
        .expect("chat");
    assert_eq!(chat["backends"][0]["tunnels"], TUNNELS);
    assert_eq!(status["generation"], 1);

    // Closing the tunnels: the gauge falls to zero, lifetimes are observed.
    for ws in open {
        client::close(ws).await;
    }
    eventually(
        Duration::from_secs(5),
        "tunnels to be counted closed",
        || {
            let p = &p;
            let active = &active;
            async move { value(&scrape(p).await, "duplex_websocket_tunnels_active", active) == 0.0 }
        },
    )
    .await;
    let s = scrape(&p).await;
    assert_eq!(
        value(
            &s,
            "duplex_websocket_tunnel_duration_seconds_count",
            &[("route", "chat")]
        ),
        TUNNELS as f64
    );

    // A reload that removes the dead upstream: generation 2, its series go once drained.
    let reload = format!(
        "listeners:\n  - name: public\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\n\
         routes:\n  - name: chat\n    upstream: chat\nupstreams:\n  - name: chat\n    backends: [{{addr: \"{}\"}}]\n",
        b.addr
    );
    let config = duplex_config::Config::parse(&reload, "reload.yaml").expect("valid");
    assert_eq!(p.proxy.reload(config).await.expect("reload"), 2);
    let s = scrape(&p).await;
    assert_eq!(value(&s, "duplex_config_generation", &[]), 2.0);
    assert_eq!(
        value(&s, "duplex_config_reloads_total", &[("result", "ok")]),
        1.0
    );
    eventually(
        Duration::from_secs(5),
        "the removed backend's series to go",
        || {
            let p = &p;
            let dead = dead.to_string();
            async move {
                let s = scrape(p).await;
                absent(&s, "duplex_backend_up", &[("backend", dead.as_str())])
                    && absent(
                        &s,
                        "duplex_backend_connect_errors_total",
                        &[("backend", dead.as_str())],
                    )
            }
        },
    )
    .await;
    p.shutdown().await;
}

/// Whether any series of `/metrics` has all of `labels`, whatever its name.
fn any_series(s: &Scrape, labels: &[(&str, &str)]) -> bool {
    s.samples
        .iter()
        .any(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_removed_names_stay_while_used_then_go() {
    let b = Backend::start("b1").await;
    let p = TestProxy::start(&format!(
        "routes:
  - {{name: old, match: {{path_prefix: /old}}, upstream: u1}}
  - {{name: kept, upstream: u1}}
upstreams:
  - {{name: u1, backends: [{{addr: \"{0}\"}}]}}
",
        b.addr
    ))
    .await;
    // A tunnel on the route the reload removes, and a request on the one it keeps.
    let (mut ws, _) = client::ws(p.addr, "/old/room").await;
    within("send", ws.send(Message::text("before")))
        .await
        .expect("send");
    assert_eq!(recv(&mut ws).await, Message::text("before"));
    assert_eq!(client::get(p.addr, "/page", &[]).await.status, 200);

    // The reload renames the listener, drops route `old` and points `kept` elsewhere.
    let reload = format!(
        "listeners:\n  - name: front\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\n\
         routes:\n  - name: kept\n    upstream: u2\nupstreams:\n  - name: u2\n    backends: [{{addr: \"{}\"}}]\n",
        b.addr
    );
    let config = duplex_config::Config::parse(&reload, "reload.yaml").expect("valid");
    assert_eq!(p.proxy.reload(config).await.expect("reload"), 2);
    let front = p.proxy.listener_addr("front").expect("front is bound");
    assert_eq!(client::get(front, "/page", &[]).await.status, 200);

    // While the tunnel is open its route's and its listener's series stay, and move.
    within("send", ws.send(Message::text("after")))
        .await
        .expect("send");
    assert_eq!(recv(&mut ws).await, Message::text("after"));
    let s = scrape(&p).await;
    let old = [("route", "old"), ("upstream", "u1")];
    assert_eq!(value(&s, "duplex_websocket_tunnels_active", &old), 1.0);
    assert_eq!(
        value(
            &s,
            "duplex_tunnel_bytes_total",
            &[("route", "old"), ("direction", "client_to_backend")]
        ),
        // Two text frames from the client, masked: 6 + 6 bytes of header, 6 + 5 of text.
        23.0
    );
    // The tunnel's connection; the GET's may take a moment to be counted closed.
    eventually(
        Duration::from_secs(5),
        "the old listener to count the tunnel's connection alone",
        || {
            let p = &p;
            async move {
                let s = scrape(p).await;
                value(&s, "duplex_connections_active", &[("listener", "public")]) == 1.0
            }
        },
    )
    .await;
    // What nothing uses any more goes at once: the old pair of the kept route.
    eventually(
        Duration::from_secs(5),
        "the kept route's old pair to go",
        || {
            let p = &p;
            async move { !any_series(&scrape(p).await, &[("route", "kept"), ("upstream", "u1")]) }
        },
    )
    .await;
    assert_eq!(
        value(
            &s,
            "duplex_http_requests_total",
            &[("route", "kept"), ("upstream", "u2"), ("code", "2xx")]
        ),
        1.0
    );

    // Once it closes, nothing of route `old`, upstream `u1` or listener `public` is left.
    client::close(ws).await;
    eventually(
        Duration::from_secs(5),
        "the removed names' series to go",
        || {
            let p = &p;
            async move {
                let s = scrape(p).await;
                !any_series(&s, &[("route", "old")])
                    && !any_series(&s, &[("upstream", "u1")])
                    && !any_series(&s, &[("listener", "public")])
            }
        },
    )
    .await;
    let s = scrape(&p).await;
    assert!(any_series(&s, &[("listener", "front")]));
    assert!(any_series(&s, &[("route", "kept"), ("upstream", "u2")]));
    p.shutdown().await;
}

/// A route removed and brought back while a tunnel on it stays open never loses its
/// series: they go on counting from where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_brought_back_keeps_counting() {
    let b = Backend::start("b1").await;
    let routes = |with_old: bool| {
        let old = if with_old {
            "  - {name: old, match: {path_prefix: /old}, upstream: u1}\n"
        } else {
            ""
        };
        format!(
            "routes:\n{old}  - {{name: kept, upstream: u1}}\n\
             upstreams:\n  - {{name: u1, backends: [{{addr: \"{}\"}}]}}\n",
            b.addr
        )
    };
    let p = TestProxy::start(&routes(true)).await;
    let reload = |with_old: bool| {
        let yaml = format!(
            "listeners:\n  - name: public\n    bind: \"127.0.0.1:0\"\nadmin:\n  bind: \"127.0.0.1:0\"\n{}",
            routes(with_old)
        );
        duplex_config::Config::parse(&yaml, "reload.yaml").expect("valid")
    };
    let (ws, _) = client::ws(p.addr, "/old/a").await;
    assert_eq!(p.proxy.reload(reload(false)).await.expect("reload"), 2);
    // A scrape in between: nothing of `old` is unheld while its tunnel is open.
    let ok = [("route", "old"), ("upstream", "u1"), ("result", "ok")];
    assert_eq!(
        value(&scrape(&p).await, "duplex_websocket_upgrades_total", &ok),
        1.0
    );
    assert_eq!(p.proxy.reload(reload(true)).await.expect("reload"), 3);
    client::close(ws).await;
    eventually(Duration::from_secs(5), "the first tunnel to close", || {
        let p = &p;
        async move {
            value(
                &scrape(p).await,
                "duplex_websocket_tunnels_active",
                &[("route", "old")],
            ) == 0.0
        }
    })
    .await;
    let (mut ws, _) = client::ws(p.addr, "/old/b").await;
    within("send", ws.send(Message::text("x")))
        .await
        .expect("send");
    assert_eq!(recv(&mut ws).await, Message::text("x"));
    let s = scrape(&p).await;
    assert_eq!(value(&s, "duplex_websocket_upgrades_total", &ok), 2.0);
    assert_eq!(
        value(
            &s,
            "duplex_websocket_tunnel_duration_seconds_count",
            &[("route", "old")]
        ),
        1.0
    );
    client::close(ws).await;
    p.shutdown().await;
}

/// A proxy with one catch-all route to backend `b`.
async fn catch_all(b: &Backend) -> TestProxy {
    TestProxy::start(&format!(
        "routes:\n  - name: all\n    upstream: u\nupstreams:\n  - name: u\n    backends: [{{addr: \"{}\"}}]\n",
        b.addr
    ))
    .await
}

/// Whether the admin port answers `GET /healthz` with 200 on a new connection, within 2 s.
async fn healthz_answers(admin: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.ok()?;
        Some(got.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), exchange).await,
        Ok(Some(true))
    )
}

/// Admin clients that never read their answers cannot hold the admin port for good: once
/// an answer has waited 10 s unread, its connection is closed, and `/healthz` (a liveness
/// probe) answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_clients_that_never_read_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let b = Backend::start("b1").await;
    let p = catch_all(&b).await;
    assert!(healthz_answers(p.admin).await);
    // The admin port's 64 places, each with answers piling up unread.
    let mut stalled = Vec::new();
    let requests = "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n".repeat(300);
    for _ in 0..64 {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut s = within("connect", sock.connect(p.admin))
            .await
            .expect("connect");
        within("send", s.write_all(requests.as_bytes()))
            .await
            .expect("send");
        stalled.push(s);
    }
    eventually(
        Duration::from_secs(5),
        "the admin places to be taken",
        || async { !healthz_answers(p.admin).await },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "/healthz to answer again once the stalled clients are cut off",
        || async { healthz_answers(p.admin).await },
    )
    .await;
    drop(stalled);
    p.shutdown().await;
}

/// A known admin path asked with the wrong method gets 405 and the methods it takes; an
/// unknown path gets 404.
#[tokio::test]
async fn the_admin_port_answers_405_with_allow_for_a_wrong_method() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b1").await;
    let p = catch_all(&b).await;
    for (request, want) in [
        ("GET /reload", "HTTP/1.1 405"),
        ("POST /status", "HTTP/1.1 405"),
        ("DELETE /metrics", "HTTP/1.1 405"),
        ("GET /nope", "HTTP/1.1 404"),
    ] {
        let mut s = tokio::net::TcpStream::connect(p.admin)
            .await
            .expect("connect");
        let raw = format!(
            "{request} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(raw.as_bytes()).await.expect("send");
        let mut got = Vec::new();
        within("the answer", s.read_to_end(&mut got))
            .await
            .expect("read");
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(
            text.starts_with(&want.to_ascii_lowercase()),
            "{request}: {text}"
        );
        let allow = if request.ends_with("/reload") {
            "allow: post\r\n"
        } else {
            "allow: get, head\r\n"
        };
        assert_eq!(
            text.contains(allow),
            want.ends_with("405"),
            "{request}: {text}"
        );
    }
    // POST still reaches the reload (this proxy has no file to read: 400, not 405).
    assert_eq!(client::post(p.admin, "/reload").await.status, 400);
}

#[tokio::test]
async fn head_and_reload_during_shutdown_on_the_admin_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("b1").await;
    let p = catch_all(&b).await;
    // HEAD answers as GET, without a body.
    let mut s = tokio::net::TcpStream::connect(p.admin)
        .await
        .expect("connect");
    s.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut got = Vec::new();
    within("the answer", s.read_to_end(&mut got))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body: {text}");
    // A reload asked for once shutdown has begun: 503, not a refused file (400).
    let (mut ws, _) = client::ws(p.addr, "/").await;
    let proxy = p.proxy.clone();
    let stopping = tokio::spawn(async move { proxy.shutdown(Duration::from_secs(3)).await });
    eventually(Duration::from_secs(5), "shutdown to begin", || async {
        p.proxy.is_stopping()
    })
    .await;
    let r = client::post(p.admin, "/reload").await;
    assert_eq!(r.status, 503, "{}", r.text());
    within("send", ws.send(Message::text("x")))
        .await
        .expect("send");
    assert_eq!(recv(&mut ws).await, Message::text("x"));
    client::close(ws).await;
    within("shutdown", stopping).await.expect("shutdown task");
}

#[tokio::test]
async fn readyz_turns_503_when_shutdown_begins() {
    let b = Backend::start("b1").await;
    let p = catch_all(&b).await;
    assert_eq!(client::get(p.admin, "/readyz", &[]).await.status, 200);
    assert_eq!(client::get(p.admin, "/healthz", &[]).await.status, 200);
    // An open tunnel holds the shutdown in its grace period.
    let (mut ws, _) = client::ws(p.addr, "/").await;
    let proxy = p.proxy.clone();
    let stopping = tokio::spawn(async move { proxy.shutdown(Duration::from_secs(3)).await });
    eventually(Duration::from_secs(5), "/readyz to answer 503", || async {
        client::get(p.admin, "/readyz", &[]).await.status == 503
    })
    .await;
    // The tunnel still works during the grace period; new connections are refused.
    within("send", ws.send(Message::text("still")))
        .await
        .expect("send");
    assert_eq!(recv(&mut ws).await, Message::text("still"));
    eventually(
        Duration::from_secs(5),
        "the listener to stop accepting",
        || async { tokio::net::TcpStream::connect(p.addr).await.is_err() },
    )
    .await;
    client::close(ws).await;
    within("shutdown to finish once the tunnel closed", stopping)
        .await
        .expect("shutdown task");
}
