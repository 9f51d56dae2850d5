//! Backend health end to end, against backends whose behaviour the test switches: active
//! checks (websocket, http, tcp) taking a backend out and bringing it back, passive
//! ejection, panic mode, tunnels open on a backend that goes unhealthy, health across a
//! reload, and DNS discovery through a test resolver.
//!
//! Checks run every 150 ms and flip a backend after two results in a row, so every state
//! change is awaited with `eventually`, never a fixed sleep; the few sleeps left show that
//! something does not happen.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use duplex_config::Config;
use duplex_e2e::client::{backend_of, get, raw_exchange, recv, try_ws, ws, HttpConn, Ws};
use duplex_e2e::flaky::{FlakyBackend, Mode};
use duplex_e2e::proxy::TestProxy;
use duplex_e2e::wire::upgrade_request;
use duplex_e2e::{eventually, within};
use duplex_proxy::discovery::Resolver;
use duplex_proxy::{Metrics, Proxy};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message};

/// The bound on every state change a test waits for: a few check intervals, with room.
const WAIT: Duration = Duration::from_secs(5);

/// An active check every 150 ms; two results in a row flip a backend either way.
fn check(kind: &str) -> String {
    let path = if kind == "tcp" { "" } else { ", path: /health" };
    format!(
        "    health_check: {{kind: {kind}{path}, interval: 150ms, timeout: 100ms, \
         healthy_threshold: 2, unhealthy_threshold: 2}}\n"
    )
}

/// Listener and admin on loopback port 0, one catch-all route to the round-robin upstream
/// `main` with the `extra` upstream lines (indented four spaces) and `backends` (the YAML
/// list items).
fn yaml_with(extra: &str, backends: &str) -> String {
    format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: main\n    upstream: main\nupstreams:\n  - name: main\n    \
         balancer: round_robin\n{extra}    backends:\n{backends}"
    )
}

fn yaml(extra: &str, backends: &[&FlakyBackend]) -> String {
    let list: String = backends
        .iter()
        .map(|b| format!("      - addr: {}\n", b.addr))
        .collect();
    yaml_with(extra, &list)
}

fn config(text: &str) -> Config {
    Config::parse(text, "health.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn start(text: &str) -> TestProxy {
    let started = Proxy::start(config(text), None, Arc::new(Metrics::new()));
    wrap(
        within("the proxy to start", started)
            .await
            .expect("the proxy starts"),
    )
}

async fn start_resolving(text: &str, resolver: Arc<dyn Resolver>) -> TestProxy {
    let started =
        Proxy::start_with_resolver(config(text), None, Arc::new(Metrics::new()), resolver);
    wrap(
        within("the proxy to start", started)
            .await
            .expect("the proxy starts"),
    )
}

fn wrap(proxy: Proxy) -> TestProxy {
    TestProxy {
        addr: proxy
            .listener_addr("public")
            .expect("the listener is bound"),
        admin: proxy.admin_addr(),
        proxy,
    }
}

/// The `/status` entry of backend `addr` in upstream `main`; `None` when the table in force
/// does not have it.
async fn status_of(p: &TestProxy, addr: SocketAddr) -> Option<Value> {
    let r = get(p.admin, "/status", &[]).await;
    assert_eq!(r.status, 200, "/status: {}", r.text());
    let v: Value = serde_json::from_str(&r.text()).expect("/status is JSON");
    v["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["name"] == "main")?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["addr"] == addr.to_string().as_str())
        .cloned()
}

/// A boolean of backend `b` in `/status`: `healthy`, `ejected` or `available`.
async fn flag(p: &TestProxy, b: &FlakyBackend, key: &str) -> bool {
    let s = status_of(p, b.addr)
        .await
        .unwrap_or_else(|| panic!("backend {} ({}) is not in /status", b.name, b.addr));
    s[key]
        .as_bool()
        .unwrap_or_else(|| panic!("no boolean {key} in {s}"))
}

async fn until_healthy(p: &TestProxy, b: &FlakyBackend, healthy: bool) {
    let what = format!(
        "backend {} to be {} in /status",
        b.name,
        if healthy { "healthy" } else { "unhealthy" }
    );
    eventually(WAIT, &what, || async move {
        flag(p, b, "healthy").await == healthy
    })
    .await;
}

/// The sum of metric `name`'s series for backend `b` that also carry the `more` labels.
async fn backend_metric(p: &TestProxy, name: &str, b: &FlakyBackend, more: &[(&str, &str)]) -> f64 {
    let addr = b.addr.to_string();
    let mut labels = vec![("backend", addr.as_str())];
    labels.extend_from_slice(more);
    p.metric(name, &labels).await
}

/// `duplex_backend_up` of backend `b`, as a scrape reads it now.
async fn up_metric(p: &TestProxy, b: &FlakyBackend) -> f64 {
    backend_metric(p, "duplex_backend_up", b, &[]).await
}

/// `/status` and `/metrics` agree that `b` is (or is not) taking new connections.
async fn assert_available(p: &TestProxy, b: &FlakyBackend, available: bool) {
    assert_eq!(
        flag(p, b, "available").await,
        available,
        "/status available of {}",
        b.name
    );
    assert_eq!(
        up_metric(p, b).await,
        if available { 1.0 } else { 0.0 },
        "duplex_backend_up of {}",
        b.name
    );
}

/// Opens `n` WebSocket connections and counts which backend took each. They are dropped
/// without a Close frame, so a backend's close counter counts health probes only.
async fn land(p: &TestProxy, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let (_ws, r) = ws(p.addr, "/").await;
        *m.entry(backend_of(&r)).or_insert(0) += 1;
    }
    m
}

/// Opens one tunnel per backend name wanted (round robin spreads them), keyed by name.
async fn tunnels(p: &TestProxy, names: &[&str]) -> BTreeMap<String, Ws> {
    let mut m = BTreeMap::new();
    for _ in 0..names.len() * 2 {
        let (ws, r) = ws(p.addr, "/").await;
        m.entry(backend_of(&r)).or_insert(ws);
        if names.iter().all(|n| m.contains_key(*n)) {
            return m;
        }
    }
    panic!("round robin did not reach all of {names:?}: {:?}", m.keys());
}

async fn echo_ok(ws: &mut Ws, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send on a live tunnel");
    assert_eq!(recv(ws).await, Message::text(text));
}

/// Waits until the far side ends the stream: a Close frame, EOF or a reset.
async fn ends(ws: &mut Ws) {
    within("the tunnel to be closed", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
}

const CHECKS: &str = "duplex_backend_health_checks_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_check_takes_a_refusing_backend_out_and_brings_it_back() {
    let b = FlakyBackend::start_all(&["a", "b", "c"]).await;
    let p = start(&yaml(&check("websocket"), &[&b[0], &b[1], &b[2]])).await;
    let c = &b[2];

    c.set(Mode::RefuseUpgrade).await;
    until_healthy(&p, c, false).await;
    assert_available(&p, c, false).await;
    for other in &b[..2] {
        assert!(
            flag(&p, other, "healthy").await,
            "{} stays healthy",
            other.name
        );
        assert_available(&p, other, true).await;
    }
    let landed = land(&p, 12).await;
    assert_eq!(landed.get("c"), None, "no new connection to c: {landed:?}");
    assert_eq!(landed.values().sum::<usize>(), 12);
    assert!(
        landed.get("a") > Some(&0) && landed.get("b") > Some(&0),
        "{landed:?}"
    );

    c.set(Mode::Up).await;
    until_healthy(&p, c, true).await;
    assert_available(&p, c, true).await;
    let landed = land(&p, 6).await;
    assert_eq!(
        landed.get("c"),
        Some(&2),
        "c takes its share again: {landed:?}"
    );

    // Every passing probe ended with a Close frame the backend saw (counted before the
    // backend answers it, so before the check counts as passed).
    for x in &b {
        let ok = backend_metric(&p, CHECKS, x, &[("result", "ok")]).await;
        let closes = x.closes();
        assert!(ok >= 1.0, "{} passed no check", x.name);
        assert!(
            closes as f64 >= ok,
            "{}: {ok} passing websocket checks but {closes} Close frames",
            x.name
        );
    }
    let failed = backend_metric(&p, CHECKS, c, &[("result", "fail")]).await;
    assert!(failed >= 2.0, "c failed {failed} checks");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_takes_a_500_backend_out_and_brings_it_back() {
    let b = FlakyBackend::start_all(&["a", "b"]).await;
    let p = start(&yaml(&check("http"), &[&b[0], &b[1]])).await;

    b[1].set(Mode::Http500).await;
    until_healthy(&p, &b[1], false).await;
    assert_available(&p, &b[1], false).await;
    assert_eq!(land(&p, 6).await.get("b"), None);
    let mut conn = HttpConn::open(p.addr).await;
    for _ in 0..4 {
        let r = conn.get("/", &[]).await;
        assert_eq!((r.status.as_u16(), r.backend()), (200, "a".to_owned()));
    }

    b[1].set(Mode::Up).await;
    until_healthy(&p, &b[1], true).await;
    assert_available(&p, &b[1], true).await;
    assert_eq!(land(&p, 4).await.get("b"), Some(&2));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_takes_a_down_backend_out_and_brings_it_back() {
    let b = FlakyBackend::start_all(&["a", "b"]).await;
    let p = start(&yaml(&check("tcp"), &[&b[0], &b[1]])).await;

    b[1].set(Mode::Down).await;
    until_healthy(&p, &b[1], false).await;
    assert_available(&p, &b[1], false).await;
    assert_eq!(land(&p, 6).await.get("b"), None);

    b[1].set(Mode::Up).await;
    until_healthy(&p, &b[1], true).await;
    assert_available(&p, &b[1], true).await;
    assert_eq!(land(&p, 4).await.get("b"), Some(&2));
    p.shutdown().await;
}

/// No active checks: two handshake timeouts in a row eject a silent backend for
/// `fail_timeout`, after which it is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeouts_eject_a_silent_backend_until_fail_timeout() {
    let a = FlakyBackend::start("a").await;
    let s = FlakyBackend::start("s").await;
    let extra = "    max_fails: 2\n    fail_timeout: 1s\n    handshake_timeout: 200ms\n";
    let p = start(&yaml(extra, &[&a, &s])).await;
    s.set(Mode::Silent).await;

    let mut timeouts = 0;
    let mut ejected_at = None;
    for _ in 0..8 {
        match try_ws(p.addr, "/", &[], &[]).await {
            Ok((_ws, r)) => assert_eq!(backend_of(&r), "a"),
            Err(tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 504, "a silent backend's handshake times out");
                timeouts += 1;
                if timeouts == 2 {
                    ejected_at = Some(Instant::now());
                    break;
                }
            }
            Err(e) => panic!("unexpected handshake failure: {e}"),
        }
    }
    let ejected_at = ejected_at.expect("two 504s from the silent backend");
    let ejections = || backend_metric(&p, "duplex_backend_ejections_total", &s, &[]);
    assert_eq!(ejections().await, 1.0);
    assert!(flag(&p, &s, "ejected").await, "s is ejected");
    assert!(
        flag(&p, &s, "healthy").await,
        "no active check says otherwise"
    );
    assert_available(&p, &s, false).await;

    // While ejected (well inside fail_timeout), new connections skip it.
    let mut skipped = 0;
    while ejected_at.elapsed() < Duration::from_millis(600) && skipped < 6 {
        let (_ws, r) = ws(p.addr, "/").await;
        assert_eq!(
            backend_of(&r),
            "a",
            "an ejected backend takes no connection"
        );
        skipped += 1;
    }
    assert!(skipped > 0, "no connection made within the ejection");

    // Once fail_timeout has passed it is tried again; now it answers.
    s.set(Mode::Up).await;
    let addr = p.addr;
    eventually(
        Duration::from_secs(4),
        "s to take connections again after fail_timeout",
        || async move {
            let (_ws, r) = ws(addr, "/").await;
            backend_of(&r) == "s"
        },
    )
    .await;
    assert!(!flag(&p, &s, "ejected").await);
    assert_available(&p, &s, true).await;
    assert_eq!(ejections().await, 1.0, "no second ejection");
    p.shutdown().await;
}

/// Handshakes already under way when a backend hangs all time out together: that is one
/// incident, so one ejection of `fail_timeout`, not one more (and twice as long) per
/// `max_fails` of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_timeouts_on_a_hung_backend_is_one_ejection() {
    let a = FlakyBackend::start("a").await;
    let s = FlakyBackend::start("s").await;
    let extra = "    max_fails: 2\n    fail_timeout: 1s\n    handshake_timeout: 300ms\n";
    let p = start(&yaml(extra, &[&a, &s])).await;
    s.set(Mode::Silent).await;

    // Eight handshakes at once: round robin sends four to s before any of them times out.
    let addr = p.addr;
    let burst: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { try_ws(addr, "/", &[], &[]).await.err() }))
        .collect();
    let mut timeouts = 0;
    for h in burst {
        match h.await.expect("handshake task") {
            None => {}
            Some(tungstenite::Error::Http(r)) if r.status() == 504 => timeouts += 1,
            Some(e) => panic!("unexpected handshake failure: {e}"),
        }
    }
    assert_eq!(timeouts, 4);
    let ejections = backend_metric(&p, "duplex_backend_ejections_total", &s, &[]).await;
    assert_eq!(ejections, 1.0, "four timeouts of one burst, max_fails 2");
    // The ejection is fail_timeout long, not doubled.
    let (pr, sr) = (&p, &s);
    eventually(
        Duration::from_millis(1600),
        "the ejection to end after fail_timeout",
        || async move { !flag(pr, sr, "ejected").await },
    )
    .await;
    p.shutdown().await;
}

/// A refused connect counts as a failure too: the retry sends the client to the next
/// backend, and after `max_fails` the refusing one is ejected and no longer tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_elsewhere_and_eject_a_down_backend() {
    let a = FlakyBackend::start("a").await;
    let d = FlakyBackend::start("d").await;
    let extra = "    max_fails: 2\n    fail_timeout: 5s\n";
    let p = start(&yaml(extra, &[&a, &d])).await;
    d.set(Mode::Down).await;

    let landed = land(&p, 6).await;
    assert_eq!(
        landed.get("a"),
        Some(&6),
        "every client reached a: {landed:?}"
    );
    let errors = || {
        backend_metric(
            &p,
            "duplex_backend_connect_errors_total",
            &d,
            &[("kind", "refused")],
        )
    };
    assert_eq!(
        errors().await,
        2.0,
        "max_fails refused connects, then no more"
    );
    assert_eq!(
        backend_metric(&p, "duplex_backend_ejections_total", &d, &[]).await,
        1.0
    );
    assert!(flag(&p, &d, "ejected").await);
    assert_available(&p, &d, false).await;

    // Plain HTTP skips it too.
    let mut conn = HttpConn::open(p.addr).await;
    for _ in 0..4 {
        assert_eq!(conn.get("/", &[]).await.backend(), "a");
    }
    assert_eq!(errors().await, 2.0);
    p.shutdown().await;
}

/// Plain HTTP's connect failures count the same way: the unsent request is retried on the
/// next backend, and the refusing one is ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_connect_failures_eject_a_down_backend() {
    let a = FlakyBackend::start("a").await;
    let d = FlakyBackend::start("d").await;
    let p = start(&yaml("    max_fails: 2\n    fail_timeout: 5s\n", &[&a, &d])).await;
    d.set(Mode::Down).await;
    for _ in 0..6 {
        let r = get(p.addr, "/", &[]).await;
        assert_eq!((r.status.as_u16(), r.backend()), (200, "a".to_owned()));
    }
    let refused = backend_metric(
        &p,
        "duplex_backend_connect_errors_total",
        &d,
        &[("kind", "refused")],
    );
    assert_eq!(refused.await, 2.0);
    assert_eq!(
        backend_metric(&p, "duplex_backend_ejections_total", &d, &[]).await,
        1.0
    );
    assert_available(&p, &d, false).await;
    p.shutdown().await;
}

/// `max_fails: 0` turns ejection off: a refusing backend keeps being tried (and retried past).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_fails_zero_never_ejects() {
    let a = FlakyBackend::start("a").await;
    let d = FlakyBackend::start("d").await;
    let p = start(&yaml("    max_fails: 0\n", &[&a, &d])).await;
    d.set(Mode::Down).await;
    assert_eq!(land(&p, 6).await.get("a"), Some(&6));
    let refused = backend_metric(
        &p,
        "duplex_backend_connect_errors_total",
        &d,
        &[("kind", "refused")],
    );
    assert_eq!(
        refused.await,
        3.0,
        "round robin tried d first every other time"
    );
    assert_eq!(
        backend_metric(&p, "duplex_backend_ejections_total", &d, &[]).await,
        0.0
    );
    assert!(!flag(&p, &d, "ejected").await);
    assert_available(&p, &d, true).await;
    p.shutdown().await;
}

/// Opens connections until one of them tried `d` and so ejected it (`max_fails: 1`); returns
/// when that connection's answer arrived.
async fn eject_once(p: &TestProxy, d: &FlakyBackend, ejections: f64) -> Instant {
    for _ in 0..4 {
        let (_ws, r) = ws(p.addr, "/").await;
        assert_eq!(backend_of(&r), "a");
        let now = Instant::now();
        if backend_metric(p, "duplex_backend_ejections_total", d, &[]).await == ejections {
            assert!(flag(p, d, "ejected").await);
            return now;
        }
    }
    panic!("d was never tried");
}

async fn until_not_ejected(p: &TestProxy, d: &FlakyBackend) {
    eventually(WAIT, "the ejection to end", || async move {
        !flag(p, d, "ejected").await
    })
    .await;
}

/// Each ejection in a row doubles `fail_timeout`; a success in between starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejections_in_a_row_double_and_a_success_resets_them() {
    let a = FlakyBackend::start("a").await;
    let d = FlakyBackend::start("d").await;
    let p = start(&yaml(
        "    max_fails: 1\n    fail_timeout: 600ms\n",
        &[&a, &d],
    ))
    .await;
    d.set(Mode::Down).await;

    eject_once(&p, &d, 1.0).await;
    until_not_ejected(&p, &d).await;
    // Tried again and refused again: 1.2 s this time, so still out after 0.7 s.
    let second = eject_once(&p, &d, 2.0).await;
    tokio::time::sleep(Duration::from_millis(700).saturating_sub(second.elapsed())).await;
    assert!(
        flag(&p, &d, "ejected").await,
        "the second ejection lasts twice as long"
    );
    until_not_ejected(&p, &d).await;

    // Back up: a connection succeeds on it, which ends the streak...
    d.set(Mode::Up).await;
    let addr = p.addr;
    eventually(WAIT, "d to take a connection", || async move {
        let (_ws, r) = ws(addr, "/").await;
        backend_of(&r) == "d"
    })
    .await;
    // ...so the next ejection is back to 600 ms.
    d.set(Mode::Down).await;
    let third = eject_once(&p, &d, 3.0).await;
    tokio::time::sleep(Duration::from_millis(900).saturating_sub(third.elapsed())).await;
    assert!(
        !flag(&p, &d, "ejected").await,
        "after a success the ejection starts over at fail_timeout"
    );
    p.shutdown().await;
}

/// Both backends fail an http check but still accept upgrades.
async fn all_unhealthy(panic_mode: &str) -> (Vec<FlakyBackend>, TestProxy) {
    let b = FlakyBackend::start_all(&["a", "b"]).await;
    for x in &b {
        x.set(Mode::Http500).await;
    }
    let extra = format!("{}    panic_mode: {panic_mode}\n", check("http"));
    let p = start(&yaml(&extra, &[&b[0], &b[1]])).await;
    for x in &b {
        until_healthy(&p, x, false).await;
        assert_available(&p, x, false).await;
    }
    (b, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_open_uses_every_backend_when_none_is_healthy() {
    let (_b, p) = all_unhealthy("open").await;
    let landed = land(&p, 4).await;
    assert_eq!(landed.values().sum::<usize>(), 4, "{landed:?}");
    // Plain HTTP goes through as well, to a backend that answers 500.
    let r = get(p.addr, "/", &[]).await;
    assert_eq!(r.status, 500, "{}", r.text());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_closed_answers_503_when_none_is_healthy() {
    let (b, p) = all_unhealthy("closed").await;
    match try_ws(p.addr, "/", &[], &[]).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        Ok((_, r)) => panic!("upgraded to {} with no healthy backend", backend_of(&r)),
        Err(e) => panic!("expected a 503, got {e}"),
    }
    let host = p.addr.to_string();
    let r = raw_exchange(p.addr, upgrade_request("/", &host, &[]).as_bytes()).await;
    assert_eq!(r.head.status(), 503);
    assert!(r.body.contains("no healthy backend"), "{}", r.body);
    let r = get(p.addr, "/", &[]).await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains("no healthy backend"), "{}", r.text());

    // One backend recovering is enough to serve again.
    b[0].set(Mode::Up).await;
    until_healthy(&p, &b[0], true).await;
    assert_eq!(land(&p, 4).await.get("a"), Some(&4));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_on_a_backend_gone_unhealthy_stay_open_by_default() {
    let b = FlakyBackend::start_all(&["x", "y"]).await;
    let p = start(&yaml(&check("http"), &[&b[0], &b[1]])).await;
    let mut t = tunnels(&p, &["x", "y"]).await;

    b[0].set(Mode::Http500).await;
    until_healthy(&p, &b[0], false).await;
    let on_x = t.get_mut("x").expect("tunnel on x");
    echo_ok(on_x, "still here").await;
    // A few more failed checks change nothing for it.
    tokio::time::sleep(Duration::from_millis(450)).await;
    echo_ok(on_x, "still here later").await;
    let status = status_of(&p, b[0].addr).await.expect("x in /status");
    assert_eq!(status["tunnels"], 1, "{status}");
    echo_ok(t.get_mut("y").expect("tunnel on y"), "y too").await;
    assert_eq!(land(&p, 4).await.get("x"), None);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_tunnels_on_unhealthy_closes_only_the_unhealthy_backends_tunnels() {
    let b = FlakyBackend::start_all(&["x", "y"]).await;
    let extra = format!("{}    close_tunnels_on_unhealthy: true\n", check("http"));
    let p = start(&yaml(&extra, &[&b[0], &b[1]])).await;
    let mut t = tunnels(&p, &["x", "y"]).await;

    b[0].set(Mode::Http500).await;
    until_healthy(&p, &b[0], false).await;
    ends(t.get_mut("x").expect("tunnel on x")).await;
    echo_ok(t.get_mut("y").expect("tunnel on y"), "unaffected").await;

    // Back in service, new tunnels to x are not closed by the earlier verdict.
    b[0].set(Mode::Up).await;
    until_healthy(&p, &b[0], true).await;
    let mut again = tunnels(&p, &["x"]).await;
    let on_x = again.get_mut("x").expect("a new tunnel on x");
    echo_ok(on_x, "new tunnel").await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    echo_ok(on_x, "new tunnel later").await;
    echo_ok(t.get_mut("y").expect("tunnel on y"), "still unaffected").await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_survives_a_reload_that_adds_a_backend() {
    let b = FlakyBackend::start_all(&["a", "b", "c"]).await;
    let p = start(&yaml(&check("http"), &[&b[0], &b[1]])).await;
    b[1].set(Mode::Http500).await;
    until_healthy(&p, &b[1], false).await;

    // The new generation checks only every 10 s: what /status says right after the reload
    // is the state carried over, not a new verdict.
    let slow = "    health_check: {kind: http, path: /health, interval: 10s, timeout: 1s, \
                healthy_threshold: 2, unhealthy_threshold: 2}\n";
    let generation = p
        .proxy
        .reload(config(&yaml(slow, &[&b[0], &b[1], &b[2]])))
        .await
        .expect("reload");
    assert_eq!(generation, 2);
    assert!(!flag(&p, &b[1], "healthy").await, "b is still unhealthy");
    assert_available(&p, &b[1], false).await;
    assert!(
        flag(&p, &b[2], "healthy").await,
        "the added backend starts healthy"
    );
    assert_available(&p, &b[2], true).await;
    let landed = land(&p, 6).await;
    assert_eq!(landed.get("b"), None, "{landed:?}");
    assert!(landed.get("c") > Some(&0), "{landed:?}");
    p.shutdown().await;
}

/// With the health check removed by a reload, nothing will ever check the backend again, so
/// the verdict of the removed check must not keep it out of service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_the_health_check_puts_unhealthy_backends_back() {
    let b = FlakyBackend::start_all(&["a", "b"]).await;
    let p = start(&yaml(&check("http"), &[&b[0], &b[1]])).await;
    b[1].set(Mode::Http500).await;
    until_healthy(&p, &b[1], false).await;
    p.proxy
        .reload(config(&yaml("", &[&b[0], &b[1]])))
        .await
        .expect("reload");
    let landed = land(&p, 4).await;
    assert_eq!(
        landed.get("b"),
        Some(&2),
        "b, no longer checked, takes its share: {landed:?}"
    );
    assert_available(&p, &b[1], true).await;
    p.shutdown().await;
}

/// A resolver the test answers for: `chat.test` resolves to the addresses in `addrs` (with
/// the port asked for), or fails while `fail` is set.
#[derive(Clone, Default)]
struct TestResolver {
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    fail: Arc<AtomicBool>,
}

impl TestResolver {
    fn answer(&self, addrs: &[SocketAddr]) {
        *self.addrs.lock().expect("resolver answer") = addrs.to_vec();
    }
}

impl Resolver for TestResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        let answer = if host != "chat.test" {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host}: NXDOMAIN"),
            ))
        } else if self.fail.load(Ordering::SeqCst) {
            Err(io::Error::other("chat.test: SERVFAIL"))
        } else {
            let addrs = self.addrs.lock().expect("resolver answer");
            Ok(addrs
                .iter()
                .map(|a| SocketAddr::new(a.ip(), port))
                .collect())
        };
        Box::pin(async move { answer })
    }
}

/// Two backends on the same port, on 127.0.0.2 and 127.0.0.3, as a DNS name's A records.
fn same_port_pair() -> (FlakyBackend, FlakyBackend) {
    let ip = |last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
    for _ in 0..20 {
        let a = FlakyBackend::start_at("a", SocketAddr::new(ip(2), 0)).expect("bind 127.0.0.2");
        if let Ok(b) = FlakyBackend::start_at("b", SocketAddr::new(ip(3), a.addr.port())) {
            return (a, b);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_the_answers_and_keeps_the_last_on_error() {
    let (a, b) = same_port_pair();
    let port = a.addr.port();
    let resolver = TestResolver::default();
    resolver.answer(&[a.addr]);
    let dns = format!(
        "      - addr: chat.test:{port}\n        resolve: dns\n        resolve_interval: 200ms\n"
    );
    let p = start_resolving(&yaml_with("", &dns), Arc::new(resolver.clone())).await;
    assert_eq!(land(&p, 3).await.get("a"), Some(&3));
    let (mut on_a, r) = ws(p.addr, "/").await;
    assert_eq!(backend_of(&r), "a");

    resolver.answer(&[a.addr, b.addr]);
    let addr = p.addr;
    eventually(WAIT, "b to take connections once resolved", || async move {
        let (_ws, r) = ws(addr, "/").await;
        backend_of(&r) == "b"
    })
    .await;

    resolver.answer(&[b.addr]);
    let (pr, gone) = (&p, a.addr);
    eventually(WAIT, "a to leave the table", || async move {
        status_of(pr, gone).await.is_none()
    })
    .await;
    assert_eq!(
        land(&p, 6).await.get("b"),
        Some(&6),
        "a gets no new connections"
    );
    echo_ok(&mut on_a, "the tunnel on a outlives its address").await;

    let errors = || p.metric("duplex_dns_resolutions_total", &[("result", "error")]);
    let before = errors().await;
    resolver.fail.store(true, Ordering::SeqCst);
    eventually(WAIT, "a failed resolution to be counted", || async move {
        errors().await > before
    })
    .await;
    // Another failure or two later, [b] is still the set.
    let more = errors().await;
    eventually(WAIT, "another failed resolution", || async move {
        errors().await > more
    })
    .await;
    assert!(
        status_of(&p, b.addr).await.is_some(),
        "b stays in the table"
    );
    assert!(status_of(&p, a.addr).await.is_none());
    assert_eq!(land(&p, 4).await.get("b"), Some(&4));
    assert!(
        p.metric("duplex_dns_resolutions_total", &[("result", "ok")])
            .await
            >= 3.0
    );
    echo_ok(&mut on_a, "still open").await;
    p.shutdown().await;
}

/// A name that does not resolve at start leaves the upstream empty (503) until it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_recovers_from_a_failure_at_start() {
    let (a, _b) = same_port_pair();
    let resolver = TestResolver::default();
    resolver.answer(&[a.addr]);
    resolver.fail.store(true, Ordering::SeqCst);
    let dns = format!(
        "      - addr: chat.test:{}\n        resolve: dns\n        resolve_interval: 200ms\n",
        a.addr.port()
    );
    let p = start_resolving(&yaml_with("", &dns), Arc::new(resolver.clone())).await;
    match try_ws(p.addr, "/", &[], &[]).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        Ok((_, r)) => panic!("upgraded to {} with nothing resolved", backend_of(&r)),
        Err(e) => panic!("expected a 503, got {e}"),
    }
    resolver.fail.store(false, Ordering::SeqCst);
    let addr = p.addr;
    eventually(WAIT, "a to take connections once resolved", || async move {
        match try_ws(addr, "/", &[], &[]).await {
            Ok((_ws, r)) => backend_of(&r) == "a",
            Err(_) => false,
        }
    })
    .await;
    p.shutdown().await;
}

/// Addresses found by DNS are checked like static ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovered_backends_are_health_checked() {
    let (a, b) = same_port_pair();
    b.set(Mode::Http500).await;
    let resolver = TestResolver::default();
    resolver.answer(&[a.addr]);
    let dns = format!(
        "      - addr: chat.test:{}\n        resolve: dns\n        resolve_interval: 200ms\n",
        a.addr.port()
    );
    let p = start_resolving(&yaml_with(&check("http"), &dns), Arc::new(resolver.clone())).await;
    resolver.answer(&[a.addr, b.addr]);
    let (pr, found) = (&p, b.addr);
    eventually(WAIT, "b to join the table", || async move {
        status_of(pr, found).await.is_some()
    })
    .await;
    until_healthy(&p, &b, false).await;
    assert_eq!(land(&p, 4).await.get("a"), Some(&4));
    b.set(Mode::Up).await;
    until_healthy(&p, &b, true).await;
    assert_eq!(land(&p, 4).await.get("b"), Some(&2));
    p.shutdown().await;
}
