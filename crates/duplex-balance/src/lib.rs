//! Picks backends for a connection: the balancer trait, shared backend load, and the algorithms.
//!
//! A [`Pool`] is built once per configuration generation from a list of [`Backend`]s. Each
//! backend's [`BackendState`] (its open-connection count) lives in an `Arc` that a reload
//! hands to the next generation when the backend stays, so load is never reset. Picking is
//! synchronous and lock-free: atomics only.

#![forbid(unsafe_code)]

mod consistent_hash;
mod hash;
mod least_conn;
mod p2c;
mod random;
mod round_robin;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use duplex_config::{BalancerKind, HashKey};
use http::HeaderMap;

pub use consistent_hash::ConsistentHash;
pub use least_conn::LeastConn;
pub use p2c::PowerOfTwo;
pub use random::Random;
pub use round_robin::RoundRobin;

/// What a balancer may look at to place a connection.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub client_ip: IpAddr,
    pub headers: &'a HeaderMap,
    /// The request's query string, without the `?`.
    pub query: Option<&'a str>,
}

/// The part of a backend that outlives a configuration generation.
#[derive(Debug)]
pub struct BackendState {
    pub addr: SocketAddr,
    /// Open WebSocket tunnels plus in-flight HTTP requests (and handshakes under way), kept
    /// by [`LoadGuard`]s.
    load: AtomicUsize,
    /// The part of `load` that is open tunnels, for status pages; kept by [`TunnelMark`]s.
    tunnels: AtomicUsize,
}

impl BackendState {
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(BackendState {
            addr,
            load: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
        })
    }

    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// Counts one more connection on this backend until the guard drops.
    pub fn guard(self: &Arc<Self>) -> LoadGuard {
        self.load.fetch_add(1, Ordering::Relaxed);
        LoadGuard(Arc::clone(self))
    }
}

/// One unit of load on a backend, released on drop.
#[derive(Debug)]
pub struct LoadGuard(Arc<BackendState>);

impl LoadGuard {
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }

    /// Marks this unit of load as an open tunnel (rather than a request) until dropped.
    pub fn into_tunnel(self) -> TunnelMark {
        self.0.tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelMark(self)
    }
}

/// A [`LoadGuard`] that is an open tunnel.
#[derive(Debug)]
pub struct TunnelMark(LoadGuard);

impl Drop for TunnelMark {
    fn drop(&mut self) {
        self.0 .0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend as one configuration generation sees it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub state: Arc<BackendState>,
    pub weight: u32,
}

/// An algorithm that orders backends for one connection.
pub trait Balancer: Send + Sync {
    /// Pushes up to `max` distinct indexes into `backends` onto `out`, best first, so that a
    /// retry can take the next one.
    fn pick(&self, backends: &[Backend], ctx: &Context<'_>, max: usize, out: &mut Vec<usize>);
}

/// An upstream's backends and the balancer that chooses among them.
pub struct Pool {
    backends: Vec<Backend>,
    balancer: Box<dyn Balancer>,
}

impl Pool {
    pub fn new(kind: BalancerKind, hash_key: Option<&HashKey>, backends: Vec<Backend>) -> Pool {
        let balancer: Box<dyn Balancer> = match kind {
            BalancerKind::RoundRobin => Box::new(RoundRobin::new(&backends)),
            BalancerKind::LeastConn => Box::new(LeastConn::default()),
            BalancerKind::P2c => Box::new(PowerOfTwo),
            BalancerKind::Random => Box::new(Random),
            BalancerKind::ConsistentHash => Box::new(ConsistentHash::new(
                hash_key.cloned().unwrap_or(HashKey::Ip),
                &backends,
            )),
        };
        Pool { backends, balancer }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Up to `max` distinct backends for one connection, best first.
    pub fn candidates(&self, ctx: &Context<'_>, max: usize) -> Vec<&Backend> {
        let mut idx = Vec::with_capacity(max.min(self.backends.len()));
        self.balancer.pick(&self.backends, ctx, max, &mut idx);
        idx.into_iter().map(|i| &self.backends[i]).collect()
    }
}

/// Compares load per weight without division: is `a` less loaded than `b`?
pub(crate) fn lighter(a: &Backend, b: &Backend) -> std::cmp::Ordering {
    let la = a.state.load() as u64 * u64::from(b.weight);
    let lb = b.state.load() as u64 * u64::from(a.weight);
    la.cmp(&lb)
}

/// Draws an index with probability proportional to its weight, skipping `exclude`.
pub(crate) fn weighted_draw(backends: &[Backend], exclude: &[usize]) -> Option<usize> {
    let total: u64 = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| !exclude.contains(i))
        .map(|(_, b)| u64::from(b.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..total);
    for (i, b) in backends.iter().enumerate() {
        if exclude.contains(&i) {
            continue;
        }
        let w = u64::from(b.weight);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Backend {
                state: BackendState::new(SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16))),
                weight,
            })
            .collect()
    }

    pub fn ctx(headers: &HeaderMap) -> Context<'_> {
        Context {
            client_ip: IpAddr::from([127, 0, 0, 1]),
            headers,
            query: None,
        }
    }

    /// How many of `n` first picks went to each backend.
    pub fn tally(b: &dyn Balancer, backends: &[Backend], n: usize) -> Vec<usize> {
        let headers = HeaderMap::new();
        let mut counts = vec![0; backends.len()];
        let mut out = Vec::new();
        for _ in 0..n {
            out.clear();
            b.pick(backends, &ctx(&headers), 1, &mut out);
            counts[out[0]] += 1;
        }
        counts
    }
}
