//! The proxy in-process: a config built from test-chosen upstreams, started on port 0, with
//! its admin endpoint scraped for metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use duplex_config::Config;
use duplex_proxy::{Metrics, Proxy};

use crate::client::get;
use crate::within;

/// The listener every test proxy has.
pub const LISTENER: &str = "public";
/// The route and upstream [`TestProxy::single`] configures.
pub const ROUTE: &str = "main";

/// One upstream's YAML, built up by the test.
#[derive(Clone)]
pub struct Upstream {
    options: Vec<(String, String)>,
    backends: Vec<(SocketAddr, u32)>,
}

impl Upstream {
    pub fn new(balancer: &str) -> Upstream {
        Upstream {
            options: vec![("balancer".into(), balancer.into())],
            backends: Vec::new(),
        }
    }

    /// Sets an upstream key, e.g. `("idle_timeout", "300ms")`.
    pub fn option(mut self, key: &str, value: &str) -> Upstream {
        self.options.push((key.into(), value.into()));
        self
    }

    pub fn backend(self, addr: SocketAddr) -> Upstream {
        self.weighted(addr, 1)
    }

    pub fn weighted(mut self, addr: SocketAddr, weight: u32) -> Upstream {
        self.backends.push((addr, weight));
        self
    }

    pub fn backends(self, addrs: impl IntoIterator<Item = SocketAddr>) -> Upstream {
        addrs.into_iter().fold(self, Upstream::backend)
    }

    /// The YAML list item for this upstream under `name`.
    pub fn yaml(&self, name: &str) -> String {
        let mut y = format!("  - name: {name}\n");
        for (k, v) in &self.options {
            y.push_str(&format!("    {k}: \"{v}\"\n"));
        }
        y.push_str("    backends:\n");
        for (addr, w) in &self.backends {
            y.push_str(&format!("      - addr: \"{addr}\"\n        weight: {w}\n"));
        }
        y
    }
}

/// A running proxy with its listener and admin addresses.
pub struct TestProxy {
    pub proxy: Proxy,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl TestProxy {
    /// Starts a proxy whose config is `routes_and_upstreams` under a `public` listener and an
    /// admin endpoint, both on loopback port 0.
    pub async fn start(routes_and_upstreams: &str) -> TestProxy {
        TestProxy::start_with_listener(&[], routes_and_upstreams).await
    }

    /// As [`TestProxy::start`], with extra keys on the listener, e.g.
    /// `("send_timeout", "1s")`.
    pub async fn start_with_listener(
        options: &[(&str, &str)],
        routes_and_upstreams: &str,
    ) -> TestProxy {
        let listener_options: String = options
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect();
        let yaml = format!(
            "listeners:\n  - name: {LISTENER}\n    bind: \"127.0.0.1:0\"\n{listener_options}\
             admin:\n  bind: \"127.0.0.1:0\"\n{routes_and_upstreams}"
        );
        let config = Config::parse(&yaml, "e2e.yaml")
            .unwrap_or_else(|e| panic!("test config refused: {e}\n{yaml}"));
        let proxy = within(
            "the proxy to start",
            Proxy::start(config, None, Arc::new(Metrics::new())),
        )
        .await
        .expect("the proxy starts");
        let addr = proxy
            .listener_addr(LISTENER)
            .expect("the public listener is bound");
        let admin = proxy.admin_addr();
        TestProxy { proxy, addr, admin }
    }

    /// A proxy with one catch-all route `main` to the upstream `main`.
    pub async fn single(upstream: &Upstream) -> TestProxy {
        TestProxy::start(&single_route(upstream)).await
    }

    /// The Prometheus text from the admin endpoint.
    pub async fn metrics(&self) -> String {
        let r = get(self.admin, "/metrics", &[]).await;
        assert_eq!(r.status, 200, "admin /metrics: {}", r.text());
        r.text()
    }

    /// The sum of the series of metric `name` whose labels include all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_series(&self.metrics().await, name, labels)
    }

    /// Shuts the proxy down, bounded.
    pub async fn shutdown(self) {
        within(
            "the proxy to shut down",
            self.proxy.shutdown(Duration::from_secs(1)),
        )
        .await;
    }
}

/// The routes and upstreams of [`TestProxy::single`]: one catch-all route `main` to the
/// upstream `main`.
pub fn single_route(upstream: &Upstream) -> String {
    format!(
        "routes:\n  - name: {ROUTE}\n    upstream: {ROUTE}\nupstreams:\n{}",
        upstream.yaml(ROUTE)
    )
}

/// Sums the samples of `name` in Prometheus text whose label set includes every pair.
pub fn sum_series(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            let wanted = metric == name
                && labels.iter().all(|(k, v)| {
                    let pair = format!("{k}=\"{v}\"");
                    rest.starts_with(&pair) || rest.contains(&format!(",{pair}"))
                });
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Starts a proxy from a whole YAML config (`source`: the file reloads read); returns it
/// and the address of its listener named `public`.
pub async fn start_yaml(yaml: &str, source: Option<std::path::PathBuf>) -> (Proxy, SocketAddr) {
    let config = Config::parse(yaml, "e2e.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let proxy = within(
        "start",
        Proxy::start(config, source, Arc::new(Metrics::new())),
    )
    .await
    .expect("the proxy starts");
    let addr = proxy.listener_addr("public").expect("bound");
    (proxy, addr)
}
