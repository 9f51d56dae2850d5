//! Active health checks end to end, against backends whose behaviour the test switches:
//! websocket, http and tcp checks taking a backend out and bringing it back, panic mode,
//! tunnels open on a backend that goes unhealthy, and health across reloads.
//!
//! Checks run every 150 ms and flip a backend after two results in a row, so every state
//! change is awaited with `eventually`, never a fixed sleep; the few sleeps left show that
//! something does not happen.

use std::time::Duration;

use duplex_e2e::client::{backend_of, get, raw_exchange, try_ws, HttpConn};
use duplex_e2e::flaky::{FlakyBackend, Mode};
use duplex_e2e::health_kit::*;
use duplex_e2e::proxy::TestProxy;
use duplex_e2e::wire::upgrade_request;
use tokio_tungstenite::tungstenite::{self};

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
    // /status says why, as HAProxy's stats do.
    let why = status_of(&p, b[1].addr).await.expect("b in /status")["last_check"].clone();
    assert_eq!(why, "status 500 Internal Server Error (expected 200)");
    assert_eq!(land(&p, 6).await.get("b"), None);
    let mut conn = HttpConn::open(p.addr).await;
    for _ in 0..4 {
        let r = conn.get("/", &[]).await;
        assert_eq!((r.status.as_u16(), r.backend()), (200, "a".to_owned()));
    }

    b[1].set(Mode::Up).await;
    until_healthy(&p, &b[1], true).await;
    assert_available(&p, &b[1], true).await;
    let last = status_of(&p, b[1].addr).await.expect("b in /status")["last_check"].clone();
    assert_eq!(last, "ok");
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
    // Round robin over every backend, as if all were healthy: an even split, so that
    // panic mode sending everything to one backend fails here.
    let landed = land(&p, 4).await;
    assert_eq!(
        (landed.get("a"), landed.get("b")),
        (Some(&2), Some(&2)),
        "each backend takes its share in panic mode: {landed:?}"
    );
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

/// Probes run side by side: backends that let their probes time out (a hung process,
/// dropped SYNs) do not delay the checks of the others. With five such backends and
/// probes awaited one by one, a round would take five timeouts (500 ms) instead of the
/// 150 ms interval, and the healthy backend would be checked about three times a second
/// instead of six or seven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backends_do_not_delay_the_others_checks() {
    let names = ["s1", "s2", "s3", "s4", "s5", "good"];
    let b = FlakyBackend::start_all(&names).await;
    for slow in &b[..5] {
        slow.set(Mode::Silent).await;
    }
    let refs: Vec<&FlakyBackend> = b.iter().collect();
    let p = start(&yaml(&check("http"), &refs)).await;
    let good = &b[5];
    let checks = || backend_metric(&p, CHECKS, good, &[]);
    let before = checks().await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let done = checks().await - before;
    assert!(
        done >= 8.0,
        "the healthy backend was checked {done} times in 2 s at a 150 ms interval"
    );
    assert!(flag(&p, good, "healthy").await);
    p.shutdown().await;
}
