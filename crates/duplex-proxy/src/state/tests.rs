//! Tests for the parent module.

use super::*;

fn config(backends: &[&str]) -> Arc<Config> {
    let list: String = backends
        .iter()
        .map(|b| format!("      - addr: {b}\n"))
        .collect();
    let text = format!(
        "listeners:\n  - name: l\n    bind: 127.0.0.1:0\nupstreams:\n  - name: u\n    backends:\n{list}"
    );
    Arc::new(Config::parse(&text, "t.yaml").expect("valid"))
}

/// The series of 127.0.0.1:9002, the backend that comes and goes below.
fn series(m: &Metrics) -> usize {
    m.render()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("backend=\"127.0.0.1:9002\""))
        .count()
}

/// Shared state for building tables, as a running proxy has it.
struct Parts(Shared);

impl Parts {
    fn new() -> Parts {
        let resolver = Arc::new(crate::discovery::SystemResolver);
        let placeholder = config(&["127.0.0.1:9001"]);
        Parts(Shared::new(
            &placeholder,
            Arc::new(Metrics::new()),
            resolver,
        ))
    }

    fn build(&self, backends: &[&str], previous: Option<&Table>) -> Table {
        let config = config(backends);
        let tls = TlsSettings::read(&config).expect("no TLS files to read");
        Table::build(config, 1, &self.0.carry(previous), tls)
    }

    fn build_text(&self, upstream: &str, previous: Option<&Table>, tls: Tls) -> Table {
        let text = format!(
            "listeners:\n  - name: l\n    bind: 127.0.0.1:0\nupstreams:\n  - name: u\n\
             {upstream}    backends:\n      - addr: 127.0.0.1:9001\n"
        );
        let config = Arc::new(Config::parse(&text, "t.yaml").expect("valid"));
        let tls = match (tls, previous) {
            (Tls::Kept, Some(t)) => TlsSettings::of(t),
            _ => TlsSettings::read(&config).expect("no TLS files to read"),
        };
        Table::build(config, 1, &self.0.carry(previous), tls)
    }

    /// What a request still running on an old table does: records a connect error
    /// for the backend it tried.
    fn straggler(&self) {
        self.0
            .metrics
            .backend_connect_errors
            .with_label_values(&["u", "127.0.0.1:9002", "refused"])
            .inc();
    }
}

/// How a test table gets its TLS settings: read again (a reload) or kept (a DNS change).
#[derive(Clone, Copy)]
enum Tls {
    Read,
    Kept,
}

/// Checks in a row count toward the thresholds they were counted under: a reload that
/// keeps the checks keeps the counts, one that changes them starts them over.
#[test]
fn check_counts_start_over_when_the_checks_change() {
    let p = Parts::new();
    let checks = |fall: u32| {
        format!(
            "    health_check: {{kind: tcp, interval: 1s, timeout: 1s, \
             unhealthy_threshold: {fall}}}\n"
        )
    };
    let state = |t: &Table| Arc::clone(&t.upstreams["u"].pool.backends()[0].state);
    let one = p.build_text(&checks(3), None, Tls::Read);
    state(&one).record_check(false);
    state(&one).record_check(false);
    let same = p.build_text(&checks(3), Some(&one), Tls::Read);
    assert_eq!(
        state(&same).record_check(false),
        (0, 3),
        "same checks: kept"
    );
    let other = p.build_text(&checks(5), Some(&same), Tls::Read);
    assert_eq!(state(&other).record_check(false), (0, 1), "new thresholds");
    state(&other).record_check(false);
    let none = p.build_text("", Some(&other), Tls::Read);
    let again = p.build_text(&checks(5), Some(&none), Tls::Read);
    assert_eq!(state(&again).record_check(false), (0, 1), "checks back");
}

/// A backend that comes back after its drain ended takes its state back: ejection,
/// verdict and checks in a row (with the checks unchanged).
#[test]
fn a_backend_back_after_its_drain_takes_its_state_back() {
    let p = Parts::new();
    let both = ["127.0.0.1:9001", "127.0.0.1:9002"];
    let state = |t: &Table| Arc::clone(&t.upstreams["u"].pool.backends()[1].state);
    let one = p.build(&both, None);
    let gone = state(&one);
    gone.record_check(false);
    gone.record_check(false);
    let passive = duplex_config::PassiveHealth {
        max_fails: 1,
        fail_timeout: std::time::Duration::from_secs(60),
        max_fail_timeout: std::time::Duration::from_secs(60),
    };
    assert!(gone.record_failure(&passive).is_some());
    let two = p.build(&both[..1], Some(&one));
    // What the end of its drain does.
    crate::server::lock(&p.0.retired).keep("u", Arc::clone(&gone), std::time::Instant::now());
    let three = p.build(&both, Some(&two));
    let back = state(&three);
    assert!(Arc::ptr_eq(&back, &gone), "the same state");
    assert!(back.is_ejected(), "still ejected");
    assert_eq!(
        back.record_check(false),
        (0, 3),
        "checks in a row carry over"
    );
}

/// A DNS change keeps a TLS upstream's settings, and so its idle keep-alive
/// connections; a reload reads the settings again and starts a new pool.
#[test]
fn a_tls_upstream_keeps_its_pool_while_its_settings_stay() {
    let p = Parts::new();
    let tls = "    tls: {insecure_skip_verify: true}\n";
    let pool = |t: &Table| Arc::clone(&t.upstreams["u"].http);
    let one = p.build_text(tls, None, Tls::Read);
    let dns = p.build_text(tls, Some(&one), Tls::Kept);
    assert!(
        Arc::ptr_eq(&pool(&one), &pool(&dns)),
        "kept on a DNS change"
    );
    let reload = p.build_text(tls, Some(&dns), Tls::Read);
    assert!(!Arc::ptr_eq(&pool(&dns), &pool(&reload)), "new on a reload");
    let plain = p.build_text("", Some(&reload), Tls::Read);
    let still = p.build_text("", Some(&plain), Tls::Read);
    assert!(Arc::ptr_eq(&pool(&plain), &pool(&still)), "plain: kept");
}

/// A backend's series go with the last table that holds it, even when something
/// running on an old table recorded into them after the backend was removed; not
/// while a newer table has the backend back.
#[test]
fn a_backends_series_go_with_the_last_table_that_holds_it() {
    let p = Parts::new();
    let owners = &p.0.owners;
    let both = ["127.0.0.1:9001", "127.0.0.1:9002"];
    let one = p.build(&both, None);
    let two = p.build(&both[..1], Some(&one));
    p.straggler();
    assert_eq!(series(&p.0.metrics), 1);
    drop(one);
    owners.settle();
    assert_eq!(
        series(&p.0.metrics),
        0,
        "gone with the last table that held it"
    );

    // Back in `three`, gone in `four`, back in `five` under a new closer: while
    // `five` holds it, `three` going must not take its series.
    let three = p.build(&both, Some(&two));
    let four = p.build(&both[..1], Some(&three));
    let five = p.build(&both, Some(&four));
    p.straggler();
    let addr: SocketAddr = "127.0.0.1:9002".parse().expect("address");
    let closer = |t: &Table| Arc::clone(&t.upstreams["u"].closers[&addr]);
    assert!(!Arc::ptr_eq(&closer(&three), &closer(&five)));
    // A drain of `three`'s closer ending now must leave `five`'s series alone.
    owners.forget_if_sole(closer(&three));
    owners.settle();
    assert_eq!(series(&p.0.metrics), 1, "kept: five has the backend");
    drop(three);
    owners.settle();
    assert_eq!(series(&p.0.metrics), 1, "kept: five has the backend");
    // `three`'s last closer went just before `five` took the backend back: its
    // forgetting, queued then, finds `five` holding it when it runs.
    owners.queue(Forget {
        key: ("u".to_owned(), addr),
        held: None,
    });
    owners.settle();
    assert_eq!(series(&p.0.metrics), 1, "kept: five took it back");
    owners.forget_if_sole(closer(&five));
    owners.settle();
    assert_eq!(series(&p.0.metrics), 0, "five's is the only closer left");
    p.straggler();
    drop((four, five));
    owners.settle();
    assert_eq!(series(&p.0.metrics), 0);
    drop(two);
}

/// Many backends gone at once are forgotten together, and only they.
#[test]
fn many_backends_are_forgotten_in_one_go() {
    let p = Parts::new();
    let addrs: Vec<String> = (0..200)
        .map(|i| format!("127.0.0.1:{}", 10_000 + i))
        .collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let one = p.build(&all, None);
    let two = p.build(&all[..1], Some(&one));
    for a in &all {
        p.0.metrics.backend_up.with_label_values(&["u", a]).set(1);
    }
    drop(one);
    p.0.owners.settle();
    let text = p.0.metrics.render();
    let left: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("duplex_backend_up{"))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains(all[0]), "{left:?}");
    drop(two);
}
