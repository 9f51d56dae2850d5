//! Passive health end to end: connect failures and handshake timeouts on real traffic
//! eject a backend for `fail_timeout`, doubling for ejections in a row.

use std::time::{Duration, Instant};

use duplex_e2e::client::{backend_of, get, try_ws, ws, HttpConn};
use duplex_e2e::eventually;
use duplex_e2e::flaky::{FlakyBackend, Mode};
use duplex_e2e::health_kit::*;
use duplex_e2e::proxy::TestProxy;
use duplex_e2e::raw::RawBackend;
use duplex_e2e::wire::read_head;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::{self};

/// No active checks: two handshake timeouts in a row eject a silent backend for
/// `fail_timeout`, after which it is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeouts_eject_a_silent_backend_until_fail_timeout() {
    const FAIL_TIMEOUT: Duration = Duration::from_secs(3);
    let a = FlakyBackend::start("a").await;
    let s = FlakyBackend::start("s").await;
    let extra = "    max_fails: 2\n    fail_timeout: 3s\n    handshake_timeout: 200ms\n";
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

    // At once, well inside fail_timeout: new connections skip it. Round robin would send
    // one of any two in a row to it, were it not ejected.
    let mut skipped = 0;
    while ejected_at.elapsed() < FAIL_TIMEOUT / 2 && skipped < 6 {
        let (_ws, r) = ws(p.addr, "/").await;
        assert_eq!(
            backend_of(&r),
            "a",
            "an ejected backend takes no connection"
        );
        skipped += 1;
    }
    assert!(
        skipped >= 2,
        "{skipped} connections made within the ejection"
    );

    let ejections = || backend_metric(&p, "duplex_backend_ejections_total", &s, &[]);
    assert_eq!(ejections().await, 1.0);
    assert!(
        flag(&p, &s, "ejected").await,
        "s is ejected {:?} after its ejection (fail_timeout {FAIL_TIMEOUT:?})",
        ejected_at.elapsed()
    );
    assert!(
        flag(&p, &s, "healthy").await,
        "no active check says otherwise"
    );
    assert_available(&p, &s, false).await;

    // Once fail_timeout has passed it is tried again; now it answers.
    s.set(Mode::Up).await;
    let addr = p.addr;
    eventually(
        Duration::from_secs(8),
        "s to take connections again after fail_timeout",
        || async move {
            let (_ws, r) = ws(addr, "/").await;
            backend_of(&r) == "s"
        },
    )
    .await;
    // Not before fail_timeout (the ejection began just before the second 504 arrived).
    let back_after = ejected_at.elapsed();
    assert!(
        back_after >= FAIL_TIMEOUT * 4 / 5,
        "s was tried again {back_after:?} after its ejection, fail_timeout is {FAIL_TIMEOUT:?}"
    );
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

/// A backend that accepts connections and closes them unanswered: the handshake goes to
/// the next backend, as after a refused connect, and each hangup is counted, but not
/// against the backend's health (a backend may hang up on a request it refuses, and
/// clients must not be able to get backends ejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_closing_upgrades_unanswered_is_skipped_not_ejected() {
    let a = FlakyBackend::start("a").await;
    let h = FlakyBackend::start("h").await;
    let extra = "    max_fails: 2\n    fail_timeout: 5s\n";
    let p = start(&yaml(extra, &[&a, &h])).await;
    h.set(Mode::Hangup).await;

    let landed = land(&p, 6).await;
    assert_eq!(
        landed.get("a"),
        Some(&6),
        "every client reached a: {landed:?}"
    );
    let tried = h.connections();
    assert!(tried >= 3, "round robin kept trying h: {tried}");
    assert_eq!(
        backend_metric(
            &p,
            "duplex_backend_connect_errors_total",
            &h,
            &[("kind", "other")]
        )
        .await,
        tried as f64
    );
    assert!(!flag(&p, &h, "ejected").await);
    p.shutdown().await;
}

/// A backend whose answers to handshakes duplex must refuse (a 101 that does not complete
/// the handshake, a refusal in a framing duplex cannot relay) fails its clients with 502s
/// and is ejected after `max_fails` of them, as one that cannot be reached is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_answering_handshakes_unusably_are_ejected() {
    let a = FlakyBackend::start("a").await;
    let b = FlakyBackend::start("b").await;
    b.set(Mode::BadAccept).await;
    let gz = RawBackend::start(|mut tcp| async move {
        read_head(&mut tcp).await?;
        tcp.write_all(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: gzip\r\n\r\nnot gzip")
            .await
    })
    .await;
    let list = format!(
        "      - addr: {}\n      - addr: {}\n      - addr: {}\n",
        a.addr, b.addr, gz.addr
    );
    let p = start(&yaml_with(
        "    max_fails: 2\n    fail_timeout: 60s\n",
        &list,
    ))
    .await;

    // Round robin: a, b, gz, a, b, gz, then only a.
    let mut refused = 0;
    for _ in 0..12 {
        match try_ws(p.addr, "/", &[], &[]).await {
            Ok((_ws, r)) => assert_eq!(backend_of(&r), "a"),
            Err(tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 502, "an unusable answer is a bad gateway");
                refused += 1;
            }
            Err(e) => panic!("unexpected handshake failure: {e}"),
        }
    }
    assert_eq!(refused, 4, "two 502s from each, then both were out");
    for addr in [b.addr, gz.addr] {
        let s = status_of(&p, addr).await.expect("in /status");
        assert_eq!(s["ejected"], true, "{addr}: {s}");
    }
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
    let p = start(&yaml("    max_fails: 1\n    fail_timeout: 1s\n", &[&a, &d])).await;
    d.set(Mode::Down).await;

    eject_once(&p, &d, 1.0).await;
    until_not_ejected(&p, &d).await;
    // Tried again and refused again: 2 s this time, so more than 1 s is left when
    // /status is read at once (within a second: no more than 1 s would be left of an
    // undoubled ejection however soon it is read).
    let second = eject_once(&p, &d, 2.0).await;
    let left = seconds_left(&p, &d).await;
    assert!(
        left > 1.0 && left <= 2.0,
        "the second ejection lasts twice as long: {left} s left {:?} after it began",
        second.elapsed()
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
    // ...so the next ejection is back to 1 s (a third in a row would be 4 s).
    d.set(Mode::Down).await;
    eject_once(&p, &d, 3.0).await;
    let left = seconds_left(&p, &d).await;
    assert!(
        left <= 1.0,
        "after a success the ejection starts over at fail_timeout: {left} s left"
    );
    p.shutdown().await;
}

/// What `/status` says is left of `d`'s ejection, in seconds (0 when it has ended).
async fn seconds_left(p: &TestProxy, d: &FlakyBackend) -> f64 {
    let s = status_of(p, d.addr).await.expect("d is in /status");
    match &s["ejected_seconds_left"] {
        serde_json::Value::Null => 0.0,
        v => v.as_f64().unwrap_or_else(|| panic!("not a number: {s}")),
    }
}
