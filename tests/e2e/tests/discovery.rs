//! DNS discovery end to end through a resolver the test answers for: addresses that appear
//! join, ones that vanish drain, failures keep the last answer.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_e2e::client::{backend_of, try_ws, ws};
use duplex_e2e::flaky::{FlakyBackend, Mode};
use duplex_e2e::health_kit::*;
use duplex_e2e::pki;
use duplex_e2e::proxy::TestProxy;
use duplex_e2e::{eventually, within_for};
use duplex_proxy::discovery::Resolver;
use tokio_tungstenite::tungstenite;

/// A resolver the test answers for: `chat.test` resolves to the addresses in `addrs` (with
/// the port asked for), or fails while `fail` is set.
#[derive(Clone, Default)]
struct TestResolver {
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    fail: Arc<AtomicBool>,
    /// Set once `hang.test` has been asked for: it answers only after a minute.
    hang_asked: Arc<AtomicBool>,
    /// When `chat.test` was asked for.
    asked: Arc<Mutex<Vec<std::time::Instant>>>,
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
        // `chat2.test` is the same name under another host, answered slowly.
        let slow = host == "chat2.test";
        if host == "hang.test" {
            self.hang_asked.store(true, Ordering::SeqCst);
            return Box::pin(async {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                Err(io::Error::other("hang.test: no answer"))
            });
        }
        if host == "chat.test" {
            let mut asked = self.asked.lock().expect("resolver log");
            asked.push(std::time::Instant::now());
        }
        let answer = if host != "chat.test" && !slow {
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
        Box::pin(async move {
            if slow {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            answer
        })
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

/// Backends a and b as the A records `chat.test` may have, a resolver that answers with a
/// alone, and the backend list naming `chat.test` (resolved every 200 ms).
fn chat_test() -> (FlakyBackend, FlakyBackend, TestResolver, String) {
    let (a, b) = same_port_pair();
    let resolver = TestResolver::default();
    resolver.answer(&[a.addr]);
    let dns = format!(
        "      - addr: chat.test:{}\n        resolve: dns\n        resolve_interval: 200ms\n",
        a.addr.port()
    );
    (a, b, resolver, dns)
}

/// Waits until a new tunnel lands on backend "b" (once its address is resolved).
async fn b_takes_connections(p: &TestProxy) {
    let addr = p.addr;
    eventually(WAIT, "b to take connections once resolved", || async move {
        let (_ws, r) = ws(addr, "/").await;
        backend_of(&r) == "b"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_the_answers_and_keeps_the_last_on_error() {
    let (a, b, resolver, dns) = chat_test();
    let p = start_resolving(&yaml_with("", &dns), Arc::new(resolver.clone())).await;
    assert_eq!(land(&p, 3).await.get("a"), Some(&3));
    let (mut on_a, r) = ws(p.addr, "/").await;
    assert_eq!(backend_of(&r), "a");

    resolver.answer(&[a.addr, b.addr]);
    b_takes_connections(&p).await;

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

/// A DNS change is not a reload: it keeps the TLS settings in force. With a listener's
/// certificate file gone (mid-rotation, say), a new address still joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_changes_apply_while_a_certificate_file_is_missing() {
    let (a, b, resolver, dns) = chat_test();
    let dir = pki::temp_dir("dns-tls");
    let leaf = pki::Ca::new("dns test CA").leaf(&["localhost"]);
    let cert = pki::write(&dir, "cert.pem", &leaf.cert);
    let key = pki::write(&dir, "key.pem", &leaf.key);
    // A second listener with TLS; the test talks to the plain one.
    let secure = format!(
        "  - name: secure\n    bind: 127.0.0.1:0\n    tls:\n      certificates:\n        \
         - cert: {}\n          key: {}\nadmin:",
        cert.display(),
        key.display()
    );
    let text = yaml_with("", &dns).replacen("admin:", &secure, 1);
    let p = start_resolving(&text, Arc::new(resolver.clone())).await;
    assert_eq!(land(&p, 2).await.get("a"), Some(&2));

    std::fs::remove_file(&cert).expect("remove the certificate");
    resolver.answer(&[a.addr, b.addr]);
    b_takes_connections(&p).await;
    p.shutdown().await;
}

/// A name is looked up at start and then once per `resolve_interval`: its watch does not
/// look it up again at once, nor does a reload that starts new watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_looked_up_once_per_interval() {
    let (_a, _b, resolver, dns) = chat_test();
    let dns = dns.replace("resolve_interval: 200ms", "resolve_interval: 1s");
    let p = start_resolving(&yaml_with("", &dns), Arc::new(resolver.clone())).await;
    // Its upstream changed: new watches, for a name looked up a moment ago.
    let changed = yaml_with("    retries: 1\n", &dns);
    p.proxy
        .reload(config(&changed))
        .await
        .expect("the reload applies");
    let asked = Arc::clone(&resolver.asked);
    eventually(WAIT, "three lookups", || {
        let n = asked.lock().expect("resolver log").len();
        async move { n >= 3 }
    })
    .await;
    let asked = resolver.asked.lock().expect("resolver log").clone();
    for pair in asked.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(990),
            "looked up again after {gap:?}"
        );
    }
    p.shutdown().await;
}

/// A name that does not resolve at start leaves the upstream empty (503) until it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_recovers_from_a_failure_at_start() {
    let (_a, _b, resolver, dns) = chat_test();
    resolver.fail.store(true, Ordering::SeqCst);
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

/// A reload that renames a DNS backend's host resolves the new name before it applies:
/// the upstream is not left empty (503) until the new name's watch first answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_resolves_a_renamed_host_before_it_applies() {
    let (_a, _b, resolver, dns) = chat_test();
    let p = start_resolving(&yaml_with("", &dns), Arc::new(resolver.clone())).await;
    assert_eq!(land(&p, 2).await.get("a"), Some(&2));
    let renamed = dns.replace("chat.test", "chat2.test");
    let generation = p
        .proxy
        .reload(config(&yaml_with("", &renamed)))
        .await
        .expect("the reload applies");
    assert_eq!(generation, 2);
    // At once, not eventually: the table in force already has the new name's address.
    match try_ws(p.addr, "/", &[], &[]).await {
        Ok((_ws, r)) => assert_eq!(backend_of(&r), "a"),
        Err(e) => panic!("no backend right after the reload: {e}"),
    }
    p.shutdown().await;
}

/// An upstream a reload renames takes its DNS counts' series with it: the old name's go
/// once its watch has stopped, the new name's are there from the reload on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_upstreams_dns_series_go_with_its_old_name() {
    let (_a, _b, resolver, dns) = chat_test();
    let p = start_resolving(&yaml_with("", &dns), Arc::new(resolver.clone())).await;
    let ok = |upstream: &'static str| {
        let p = &p;
        async move {
            p.metric(
                "duplex_dns_resolutions_total",
                &[("upstream", upstream), ("result", "ok")],
            )
            .await
        }
    };
    assert!(ok("main").await >= 1.0);
    let renamed = yaml_with("", &dns)
        .replace("upstream: main", "upstream: renamed")
        .replace(
            "- name: main\n    balancer",
            "- name: renamed\n    balancer",
        );
    assert_eq!(p.proxy.reload(config(&renamed)).await.expect("reload"), 2);
    // Resolved before the reload applied, and counted under the new name at once.
    assert!(ok("renamed").await >= 1.0);
    eventually(WAIT, "the old name's series to go", || async {
        !p.metrics().await.contains("upstream=\"main\"")
    })
    .await;
    p.shutdown().await;
}

/// A reload waiting on a slow lookup of a new name gives up when shutdown begins, rather
/// than after the lookup's 5 s bound (and is refused): at exit the lookup's timer would
/// be gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_waiting_on_dns_gives_up_at_shutdown() {
    let (_a, _b, resolver, dns) = chat_test();
    let p = start_resolving(&yaml_with("", &dns), Arc::new(resolver.clone())).await;
    let reload = {
        let proxy = p.proxy.clone();
        let hung = config(&yaml_with("", &dns.replace("chat.test", "hang.test")));
        tokio::spawn(async move { proxy.reload(hung).await })
    };
    eventually(WAIT, "the reload to look hang.test up", || async {
        resolver.hang_asked.load(Ordering::SeqCst)
    })
    .await;
    let proxy = p.proxy.clone();
    let stopping = tokio::spawn(async move { proxy.shutdown(Duration::from_secs(1)).await });
    // Well under the lookup's own 5 s bound.
    let refused = within_for(Duration::from_secs(3), "the reload to give up", reload)
        .await
        .expect("the reload task")
        .expect_err("a reload during shutdown");
    assert!(refused.to_string().contains("shutting down"), "{refused}");
    within_for(WAIT, "shutdown", stopping)
        .await
        .expect("shutdown task");
}

/// Addresses found by DNS are checked like static ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovered_backends_are_health_checked() {
    let (a, b, resolver, dns) = chat_test();
    b.set(Mode::Http500).await;
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

/// A DNS server answering with a rotating subset of its addresses takes a backend out and
/// puts it back at every turn. A backend ejected for refusing connections must come back
/// still ejected, not as a new, healthy one that every client is sent to first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_back_in_the_answer_keeps_its_ejection() {
    let (a, b, resolver, dns) = chat_test();
    let extra = "    max_fails: 1\n    fail_timeout: 60s\n";
    let p = start_resolving(&yaml_with(extra, &dns), Arc::new(resolver.clone())).await;
    resolver.answer(&[a.addr, b.addr]);
    b_takes_connections(&p).await;
    b.set(Mode::Down).await;
    let (pr, down) = (&p, b.addr);
    eventually(WAIT, "b to be ejected", || async move {
        land(pr, 1).await.contains_key("a")
            && status_of(pr, down)
                .await
                .is_some_and(|s| s["ejected"] == true)
    })
    .await;

    // Out of the answer, and drained (it has no tunnels, so at once).
    resolver.answer(&[a.addr]);
    eventually(
        WAIT,
        "b to leave the table and end its drain",
        || async move {
            let status = duplex_e2e::client::get(pr.admin, "/status", &[])
                .await
                .text();
            status_of(pr, down).await.is_none() && !status.contains(&down.to_string())
        },
    )
    .await;

    // Back in the answer: still ejected, and no client is sent to it.
    resolver.answer(&[a.addr, b.addr]);
    eventually(WAIT, "b to join the table again", || async move {
        status_of(pr, down).await.is_some()
    })
    .await;
    let s = status_of(&p, b.addr).await.expect("b is in the table");
    assert_eq!(
        (s["ejected"].as_bool(), s["available"].as_bool()),
        (Some(true), Some(false)),
        "{s}"
    );
    let b_addr = b.addr.to_string();
    let label = [("backend", b_addr.as_str())];
    let before = p
        .metric("duplex_backend_connect_errors_total", &label)
        .await;
    assert_eq!(land(&p, 4).await.get("a"), Some(&4));
    let after = p
        .metric("duplex_backend_connect_errors_total", &label)
        .await;
    assert_eq!(after, before, "no connect was tried on b");
    p.shutdown().await;
}

/// An answer giving one IPv4 address also as v4-mapped IPv6 (`::ffff:a.b.c.d`, as some
/// resolvers and hosts files do) is one backend, listed by its IPv4 address; addresses
/// no connection can go to (a sinkhole's 0.0.0.0, multicast) are left out, and an answer
/// of nothing else is a failed lookup that keeps the last addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v4_mapped_answer_is_the_ipv4_backend() {
    let (a, b, resolver, dns) = chat_test();
    let mapped = |s: SocketAddr| match s.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    let port = a.addr.port();
    let sinkhole = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    let multicast = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1)), port);
    resolver.answer(&[a.addr, mapped(a.addr), mapped(b.addr), sinkhole, multicast]);
    let p = start_resolving(&yaml_with("", &dns), Arc::new(resolver.clone())).await;
    b_takes_connections(&p).await;
    assert!(status_of(&p, a.addr).await.is_some(), "a is listed");
    assert!(status_of(&p, b.addr).await.is_some(), "b is listed as IPv4");
    assert!(status_of(&p, mapped(a.addr)).await.is_none());
    assert!(status_of(&p, mapped(b.addr)).await.is_none());
    assert!(
        status_of(&p, sinkhole).await.is_none(),
        "0.0.0.0 is left out"
    );
    assert!(
        status_of(&p, multicast).await.is_none(),
        "multicast is left out"
    );
    // Nothing usable: counted as a failure, and a and b stay.
    let failed = || p.metric("duplex_dns_resolutions_total", &[("result", "error")]);
    let before = failed().await;
    resolver.answer(&[sinkhole]);
    let pr = &p;
    eventually(
        WAIT,
        "the unusable answer to count as a failure",
        || async move {
            pr.metric("duplex_dns_resolutions_total", &[("result", "error")])
                .await
                > before
        },
    )
    .await;
    assert!(status_of(&p, a.addr).await.is_some(), "a is kept");
    // One backend each: round robin alternates between the two.
    let landed = land(&p, 4).await;
    assert_eq!(
        (landed.get("a"), landed.get("b")),
        (Some(&2), Some(&2)),
        "{landed:?}"
    );
    p.shutdown().await;
}

/// At start, names are looked up side by side: three names whose resolver never answers
/// hold the start for one lookup bound (5 s), not three in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_looks_names_up_side_by_side() {
    let resolver = TestResolver::default();
    let dns: String = (1..=3)
        .map(|port| format!("      - addr: hang.test:{port}\n        resolve: dns\n"))
        .collect();
    let began = std::time::Instant::now();
    let started = duplex_proxy::Proxy::start_with_resolver(
        config(&yaml_with("", &dns)),
        None,
        Arc::new(duplex_proxy::Metrics::new()),
        Arc::new(resolver),
    );
    let p = within_for(Duration::from_secs(30), "the proxy to start", started)
        .await
        .expect("the proxy starts");
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "three unanswered names held the start for {took:?}"
    );
    p.shutdown(Duration::from_secs(1)).await;
}

/// A probe outlives the table that started it: with DNS answers changing more often than
/// a probe's timeout (a rotating answer), a backend whose probes time out is still found
/// unhealthy, rather than each change cutting its probes short before a verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_finish_across_dns_changes() {
    let (a, b, resolver, dns) = chat_test();
    a.set(Mode::Silent).await;
    let checks = "    health_check: {kind: http, path: /health, interval: 1s, timeout: 800ms, \
                  healthy_threshold: 1, unhealthy_threshold: 2}\n";
    let p = start_resolving(&yaml_with(checks, &dns), Arc::new(resolver.clone())).await;
    // Answers alternate every 150 ms; the name is looked up every 200 ms.
    let mut unhealthy = false;
    for turn in 0..80 {
        if turn % 2 == 0 {
            resolver.answer(&[a.addr, b.addr]);
        } else {
            resolver.answer(&[a.addr]);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        if !flag(&p, &a, "healthy").await {
            unhealthy = true;
            break;
        }
    }
    assert!(
        unhealthy,
        "a, whose probes all time out, was never found unhealthy"
    );
    p.shutdown().await;
}
