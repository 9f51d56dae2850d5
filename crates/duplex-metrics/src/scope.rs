//! Removes the series of listeners, routes and upstreams that nothing uses any more.
//!
//! A reload that drops or renames a listener, route or upstream would otherwise leave its
//! series behind for the life of the process, frozen: counters that never move and gauges
//! stuck where they were. With configs generated from a service registry that churn is
//! unbounded. So each group of series is held, by a [`Hold`], by whatever records into it:
//! the config tables that name it, the accept loop of a listener, a client connection, a
//! WebSocket tunnel, a DNS watch. A tunnel still open on a route that a reload removed
//! keeps that route's series (its `tunnels_active` among them) until it closes.
//!
//! When the last [`Hold`] of a group goes, the group is only noted: removing series means
//! reading every series of several families, and the last hold often goes on a request's
//! path (the end of the last request on an old table). The next scrape removes every
//! noted group that is still unheld, in one pass per family ([`Metrics::sweep`]), before
//! it renders. A group held again before that (a reload brought the name back) is not
//! removed, and keeps counting from where it was.
//!
//! Holds are counted, and groups removed, under one lock: a hold taken for a name while
//! its group is being removed waits, and then resolves new series. Whoever records into a
//! group takes its hold first and resolves the series after, so a group is never removed
//! while it is being resolved.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

use crate::Metrics;

/// A group of series, named by the labels they share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every series labelled with this `listener`.
    Listener(String),
    /// The series labelled with this `route` alone (durations, tunnel bytes).
    Route(String),
    /// The series labelled with this `route` and this `upstream` (upgrades, requests,
    /// open tunnels): a reload may point a route at another upstream.
    RouteUpstream(String, String),
    /// The series labelled with this `upstream` and no backend (DNS resolutions). A
    /// backend's own series go with the backend (see `forget_backend`).
    Upstream(String),
}

/// How many [`Hold`]s each scope has, and the scopes left without one since the last
/// sweep.
#[derive(Debug, Default)]
pub struct Holds(Mutex<Counts>);

#[derive(Debug, Default)]
struct Counts {
    held: HashMap<Scope, usize>,
    unheld: HashSet<Scope>,
}

/// Keeps a scope's series exported while it lives; see the module's documentation.
pub struct Hold {
    metrics: Arc<Metrics>,
    scope: Scope,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hold").field(&self.scope).finish()
    }
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Metrics {
    /// Holds `scope`'s series until the returned [`Hold`] drops. Take it before resolving
    /// them.
    pub fn hold(self: &Arc<Self>, scope: Scope) -> Hold {
        let mut counts = self.holds.lock();
        counts.unheld.remove(&scope);
        *counts.held.entry(scope.clone()).or_insert(0) += 1;
        Hold {
            metrics: Arc::clone(self),
            scope,
        }
    }

    /// How many holds `scope` has.
    pub fn holders(&self, scope: &Scope) -> usize {
        self.holds.lock().held.get(scope).copied().unwrap_or(0)
    }

    /// Removes the series of every scope left without a hold since the last sweep, in one
    /// pass over each family concerned. [`Metrics::render`] sweeps first.
    pub fn sweep(&self) {
        let mut counts = self.holds.lock();
        if counts.unheld.is_empty() {
            return;
        }
        let gone = std::mem::take(&mut counts.unheld);
        let mut listeners = HashSet::new();
        let mut routes = HashSet::new();
        let mut pairs = HashSet::new();
        let mut upstreams = HashSet::new();
        for scope in &gone {
            match scope {
                Scope::Listener(l) => listeners.insert(l.as_str()),
                Scope::Route(r) => routes.insert(r.as_str()),
                Scope::RouteUpstream(r, u) => pairs.insert((r.as_str(), u.as_str())),
                Scope::Upstream(u) => upstreams.insert(u.as_str()),
            };
        }
        // Under the lock: see the module's documentation.
        if !listeners.is_empty() {
            let of = |l: &Labels| l.get("listener").is_some_and(|v| listeners.contains(v));
            forget_if(&self.connections_accepted, of);
            forget_if(&self.connections_active, of);
            forget_if(&self.accept_errors, of);
            forget_if(&self.connection_limit_waits, of);
            forget_if(&self.listener_connections_limit, of);
            forget_if(&self.tls_handshake_errors, of);
            forget_if(&self.client_send_timeouts, of);
            forget_if(&self.connections_reclaimed, of);
        }
        if !routes.is_empty() {
            let of = |l: &Labels| l.get("route").is_some_and(|v| routes.contains(v));
            forget_if(&self.handshake_duration, of);
            forget_if(&self.http_request_duration, of);
            forget_if(&self.tunnel_duration, of);
            forget_if(&self.tunnel_bytes, of);
        }
        if !pairs.is_empty() {
            let of = |l: &Labels| match (l.get("route"), l.get("upstream")) {
                (Some(r), Some(u)) => pairs.contains(&(*r, *u)),
                _ => false,
            };
            forget_if(&self.upgrades, of);
            forget_if(&self.http_requests, of);
            forget_if(&self.tunnels_active, of);
        }
        if !upstreams.is_empty() {
            let of = |l: &Labels| l.get("upstream").is_some_and(|v| upstreams.contains(v));
            forget_if(&self.dns_resolutions, of);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut counts = self.metrics.holds.lock();
        let n = counts.held.entry(self.scope.clone()).or_insert(1);
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.held.remove(&self.scope);
            counts.unheld.insert(self.scope.clone());
        }
    }
}

/// A series' labels, by name.
pub(crate) type Labels<'a> = HashMap<&'a str, &'a str>;

/// Removes the series of `vec` whose labels `pick` chooses.
pub(crate) fn forget_if<T: MetricVecBuilder>(vec: &MetricVec<T>, pick: impl Fn(&Labels) -> bool) {
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: Labels = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if pick(&labels) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(m: &Metrics, needle: &str) -> usize {
        m.render()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .count()
    }

    #[test]
    fn the_last_hold_removes_the_scope_and_nothing_else() {
        let m = Arc::new(Metrics::new());
        let a = m.hold(Scope::Listener("a".into()));
        let b = m.hold(Scope::Listener("b".into()));
        let a2 = m.hold(Scope::Listener("a".into()));
        for l in ["a", "b"] {
            m.connections_accepted.with_label_values(&[l]).inc();
            m.connections_active.with_label_values(&[l]).inc();
            m.tls_handshake_errors
                .with_label_values(&[l, "timeout"])
                .inc();
        }
        assert_eq!(m.holders(&Scope::Listener("a".into())), 2);
        drop(a);
        assert_eq!(series(&m, "listener=\"a\""), 3, "one hold left");
        drop(a2);
        assert_eq!(series(&m, "listener=\"a\""), 0);
        assert_eq!(series(&m, "listener=\"b\""), 3);
        assert_eq!(m.holders(&Scope::Listener("a".into())), 0);
        drop(b);
        assert_eq!(series(&m, "listener=\"b\""), 0);
    }

    #[test]
    fn a_scope_held_again_before_the_sweep_keeps_its_series() {
        let m = Arc::new(Metrics::new());
        let first = m.hold(Scope::Route("r".into()));
        m.tunnel_duration.with_label_values(&["r"]).observe(1.0);
        drop(first);
        let again = m.hold(Scope::Route("r".into()));
        m.tunnel_duration.with_label_values(&["r"]).observe(1.0);
        assert!(m
            .render()
            .contains("duplex_websocket_tunnel_duration_seconds_count{route=\"r\"} 2"));
        drop(again);
        assert_eq!(series(&m, "route=\"r\""), 0);
    }

    #[test]
    fn a_route_pair_goes_without_the_routes_other_pairs() {
        let m = Arc::new(Metrics::new());
        let route = m.hold(Scope::Route("r".into()));
        let old = m.hold(Scope::RouteUpstream("r".into(), "u1".into()));
        let new = m.hold(Scope::RouteUpstream("r".into(), "u2".into()));
        for u in ["u1", "u2"] {
            m.upgrades.with_label_values(&["r", u, "ok"]).inc();
            m.tunnels_active
                .with_label_values(&["r", u, "10.0.0.1:80"])
                .inc();
        }
        m.tunnel_bytes
            .with_label_values(&["r", "client_to_backend"])
            .inc();
        drop(old);
        assert_eq!(series(&m, "upstream=\"u1\""), 0);
        assert_eq!(series(&m, "upstream=\"u2\""), 2);
        assert_eq!(series(&m, "duplex_tunnel_bytes_total{"), 1);
        drop(route);
        assert_eq!(series(&m, "duplex_tunnel_bytes_total{"), 0);
        assert_eq!(series(&m, "upstream=\"u2\""), 2, "held by its pair");
        drop(new);
        assert_eq!(series(&m, "route=\"r\""), 0);
    }
}
