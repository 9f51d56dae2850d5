//! DNS discovery: backends named by a DNS name, re-resolved periodically.
//!
//! Each resolution that changes an upstream's address set builds a new table with the same
//! configuration: new addresses join the balancer, vanished ones drain as if a reload had
//! removed them. A failed resolution keeps the last good set.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use duplex_config::{Config, DnsBackend};
use duplex_metrics::{Hold, Scope};
use tokio_util::sync::CancellationToken;

use crate::server::{lock, Proxy};
use crate::state::{Shared, Table};

/// A resolution may take this long before it counts as failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Turns a host name and port into addresses. The system's resolver by default; tests and
/// embedders may supply their own.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system's resolver (getaddrinfo, through tokio).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

pub type Key = (String, String, u16);

fn key(upstream: &str, d: &DnsBackend) -> Key {
    (upstream.to_owned(), d.host.clone(), d.port)
}

/// The most backends one name's answer makes: a huge answer (a TCP reply of thousands of
/// records) would otherwise become as many backends, each with its health checks and
/// its points on a hash ring.
const MAX_ADDRESSES: usize = 1024;

/// Resolves one name, bounded, sorted; counts the outcome and notes when it was looked up.
async fn resolve_once(shared: &Shared, upstream: &str, d: &DnsBackend) -> Option<Vec<SocketAddr>> {
    let m = &shared.metrics;
    let answer =
        tokio::time::timeout(RESOLVE_TIMEOUT, shared.resolver.resolve(&d.host, d.port)).await;
    lock(&shared.looked_up).insert(key(upstream, d), tokio::time::Instant::now());
    let why = match answer {
        Ok(Ok(answer)) => match usable(upstream, d, answer) {
            Some(addrs) => {
                m.dns_resolutions.with_label_values(&[upstream, "ok"]).inc();
                return Some(addrs);
            }
            None => "no address in the answer can be connected to".to_owned(),
        },
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("timed out after {RESOLVE_TIMEOUT:?}"),
    };
    m.dns_resolutions
        .with_label_values(&[upstream, "error"])
        .inc();
    if lock(&shared.resolved).contains_key(&key(upstream, d)) {
        tracing::warn!(%upstream, host = %d.host, error = %why, "DNS resolution failed; keeping the last addresses");
    } else {
        tracing::warn!(%upstream, host = %d.host, error = %why, "DNS resolution failed; the name has no addresses yet");
    }
    None
}

/// The backends an answer gives, sorted, at most [`MAX_ADDRESSES`]; `None` if none. The
/// file's addresses get the same checks: a sinkholing resolver's 0.0.0.0 would have
/// duplex connect to its own host. A v4-mapped answer (`::ffff:10.0.0.1`) is the IPv4
/// backend another name or the file may give plainly: one spelling, one backend.
fn usable(upstream: &str, d: &DnsBackend, answer: Vec<SocketAddr>) -> Option<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(answer.len().min(MAX_ADDRESSES));
    for a in answer {
        match duplex_config::backend_addr(a) {
            Ok(a) => addrs.push(a),
            Err(why) => {
                tracing::warn!(%upstream, host = %d.host, addr = %a, why, "DNS answer left out: not an address to connect to");
            }
        }
    }
    addrs.sort();
    addrs.dedup();
    if addrs.len() > MAX_ADDRESSES {
        tracing::warn!(%upstream, host = %d.host, addresses = addrs.len(), kept = MAX_ADDRESSES, "DNS answer has too many addresses; the lowest are kept");
        addrs.truncate(MAX_ADDRESSES);
    }
    (!addrs.is_empty()).then_some(addrs)
}

/// Resolves, side by side, the DNS backends of `config` that have no answer yet (all of
/// them at start; then names a reload adds or renames), each bounded by
/// [`RESOLVE_TIMEOUT`]: the answers a table starts with, rather than none until each
/// name's watch first answers.
pub async fn resolve_new(shared: &Arc<Shared>, config: &Config) -> NewAnswers {
    let mut lookups = tokio::task::JoinSet::new();
    let mut holds = Vec::new();
    for u in &config.upstreams {
        for d in &u.discovered {
            let k = key(&u.name, d);
            if lock(&shared.resolved).contains_key(&k) {
                continue;
            }
            holds.push(shared.metrics.hold(Scope::Upstream(u.name.clone())));
            let (shared, upstream, d) = (Arc::clone(shared), u.name.clone(), d.clone());
            lookups.spawn(async move {
                let addrs = resolve_once(&shared, &upstream, &d).await;
                addrs.map(|a| (k, a))
            });
        }
    }
    let mut found = Vec::new();
    while let Some(done) = lookups.join_next().await {
        if let Ok(Some(answer)) = done {
            found.push(answer);
        }
    }
    NewAnswers {
        found,
        _holds: holds,
    }
}

/// What [`resolve_new`] found for a reload.
#[derive(Default)]
pub struct NewAnswers {
    found: Vec<(Key, Vec<SocketAddr>)>,
    /// The series of the upstreams looked up, counted already, which the reload's table
    /// will hold; a reload that is refused drops them with these.
    _holds: Vec<Hold>,
}

/// Puts answers found by [`resolve_new`] in force, unless a watch answered meanwhile.
/// The caller keeps `answers` until the reload's table is built.
pub fn adopt(shared: &Shared, answers: &NewAnswers) {
    let mut resolved = lock(&shared.resolved);
    for (k, addrs) in &answers.found {
        resolved.entry(k.clone()).or_insert_with(|| addrs.clone());
    }
}

/// Starts one task per DNS backend of `table`; cancelling the token stops them.
pub fn spawn(proxy: &Proxy, table: &Table) -> CancellationToken {
    let stop = proxy.inner.shared.closing.child_token();
    for u in &table.config.upstreams {
        for d in &u.discovered {
            // Taken now, not when the task first runs: the old watch may end first.
            let hold = proxy
                .inner
                .shared
                .metrics
                .hold(Scope::Upstream(u.name.clone()));
            tokio::spawn(watch(
                proxy.clone(),
                u.name.clone(),
                d.clone(),
                stop.clone(),
                hold,
            ));
        }
    }
    stop
}

/// `_hold` keeps the upstream's series while the watch may still count into them.
async fn watch(
    proxy: Proxy,
    upstream: String,
    d: DnsBackend,
    stop: CancellationToken,
    _hold: Hold,
) {
    let shared = Arc::clone(&proxy.inner.shared);
    let k = key(&upstream, &d);
    loop {
        if stop.is_cancelled() {
            return;
        }
        // A name looked up a moment ago (at start, by a reload, or by the watch this one
        // replaces) waits out its interval from then: not looked up twice in a row.
        let last = lock(&shared.looked_up).get(&k).copied();
        if let Some(at) = last {
            tokio::select! {
                _ = tokio::time::sleep_until(at + d.interval) => {}
                _ = stop.cancelled() => return,
            }
        }
        if let Some(addrs) = resolve_once(&shared, &upstream, &d).await {
            let changed = lock(&shared.resolved).get(&k) != Some(&addrs);
            if changed {
                tracing::info!(%upstream, host = %d.host, ?addrs, "DNS answer changed");
                lock(&shared.resolved).insert(k.clone(), addrs);
                proxy.rediscover().await;
            }
        }
    }
}
