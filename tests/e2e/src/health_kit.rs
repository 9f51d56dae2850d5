//! Helpers of the health tests: a proxy over `FlakyBackend`s with fast checks, and readers
//! of `/status` and `/metrics` for one backend.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use duplex_config::Config;
use duplex_proxy::discovery::Resolver;
use duplex_proxy::{Metrics, Proxy};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{backend_of, get, recv, ws, Ws};
use crate::flaky::FlakyBackend;
use crate::proxy::TestProxy;
use crate::{eventually, within};

/// The bound on every state change a test waits for: a few check intervals, with room.
pub const WAIT: Duration = Duration::from_secs(5);

/// An active check every 150 ms; two results in a row flip a backend either way.
pub fn check(kind: &str) -> String {
    let path = if kind == "tcp" { "" } else { ", path: /health" };
    format!(
        "    health_check: {{kind: {kind}{path}, interval: 150ms, timeout: 100ms, \
         healthy_threshold: 2, unhealthy_threshold: 2}}\n"
    )
}

/// Listener and admin on loopback port 0, one catch-all route to the round-robin upstream
/// `main` with the `extra` upstream lines (indented four spaces) and `backends` (the YAML
/// list items).
pub fn yaml_with(extra: &str, backends: &str) -> String {
    format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: main\n    upstream: main\nupstreams:\n  - name: main\n    \
         balancer: round_robin\n{extra}    backends:\n{backends}"
    )
}

pub fn yaml(extra: &str, backends: &[&FlakyBackend]) -> String {
    let list: String = backends
        .iter()
        .map(|b| format!("      - addr: {}\n", b.addr))
        .collect();
    yaml_with(extra, &list)
}

pub fn config(text: &str) -> Config {
    Config::parse(text, "health.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

pub async fn start(text: &str) -> TestProxy {
    let started = Proxy::start(config(text), None, Arc::new(Metrics::new()));
    wrap(
        within("the proxy to start", started)
            .await
            .expect("the proxy starts"),
    )
}

pub async fn start_resolving(text: &str, resolver: Arc<dyn Resolver>) -> TestProxy {
    let started =
        Proxy::start_with_resolver(config(text), None, Arc::new(Metrics::new()), resolver);
    wrap(
        within("the proxy to start", started)
            .await
            .expect("the proxy starts"),
    )
}

pub fn wrap(proxy: Proxy) -> TestProxy {
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
pub async fn status_of(p: &TestProxy, addr: SocketAddr) -> Option<Value> {
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
pub async fn flag(p: &TestProxy, b: &FlakyBackend, key: &str) -> bool {
    let s = status_of(p, b.addr)
        .await
        .unwrap_or_else(|| panic!("backend {} ({}) is not in /status", b.name, b.addr));
    s[key]
        .as_bool()
        .unwrap_or_else(|| panic!("no boolean {key} in {s}"))
}

pub async fn until_healthy(p: &TestProxy, b: &FlakyBackend, healthy: bool) {
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
pub async fn backend_metric(
    p: &TestProxy,
    name: &str,
    b: &FlakyBackend,
    more: &[(&str, &str)],
) -> f64 {
    let addr = b.addr.to_string();
    let mut labels = vec![("backend", addr.as_str())];
    labels.extend_from_slice(more);
    p.metric(name, &labels).await
}

/// `duplex_backend_up` of backend `b`, as a scrape reads it now.
pub async fn up_metric(p: &TestProxy, b: &FlakyBackend) -> f64 {
    backend_metric(p, "duplex_backend_up", b, &[]).await
}

/// `/status` and `/metrics` agree that `b` is (or is not) taking new connections.
pub async fn assert_available(p: &TestProxy, b: &FlakyBackend, available: bool) {
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
pub async fn land(p: &TestProxy, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let (_ws, r) = ws(p.addr, "/").await;
        *m.entry(backend_of(&r)).or_insert(0) += 1;
    }
    m
}

/// Opens one tunnel per backend name wanted (round robin spreads them), keyed by name.
pub async fn tunnels(p: &TestProxy, names: &[&str]) -> BTreeMap<String, Ws> {
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

pub async fn echo_ok(ws: &mut Ws, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send on a live tunnel");
    assert_eq!(recv(ws).await, Message::text(text));
}

/// Waits until the far side ends the stream: a Close frame, EOF or a reset. The backends
/// send nothing unasked, so a few stray frames at most may come before it.
pub async fn ends(ws: &mut Ws) {
    within("the tunnel to be closed", async {
        for _ in 0..16 {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
        panic!("the tunnel kept sending frames instead of closing");
    })
    .await;
}

pub const CHECKS: &str = "duplex_backend_health_checks_total";
