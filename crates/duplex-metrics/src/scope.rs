//! Removes the series of listeners, routes and upstreams that nothing uses any more.
//!
//! A reload that drops or renames a listener, route or upstream would otherwise leave its
//! series behind for the life of the process, frozen: counters that never move and gauges
//! stuck where they were. With configs generated from a service registry that churn is
//! unbounded. So each group of series is held, by a [`Hold`], by whatever records into it:
//! the config tables that name it, the accept loop of a listener, a client connection, a
//! WebSocket tunnel. The last [`Hold`] to go removes the group. A tunnel still open on a
//! route that a reload removed keeps that route's series (its `tunnels_active` among
//! them) until it closes.
//!
//! Holds are counted under one lock, and a group is removed under it: a hold taken for a
//! name that comes back waits for the removal to finish rather than seeing its new series
//! removed. Whoever records into a group takes its hold first and resolves the series
//! after, so a group is never removed while it is being resolved.

use std::collections::HashMap;
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

/// How many [`Hold`]s each scope has.
#[derive(Debug, Default)]
pub struct Holds(Mutex<HashMap<Scope, usize>>);

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

impl Metrics {
    /// Holds `scope`'s series until the returned [`Hold`] drops. Take it before resolving
    /// them.
    pub fn hold(self: &Arc<Self>, scope: Scope) -> Hold {
        let mut counts = self.holds.0.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry(scope.clone()).or_insert(0) += 1;
        Hold {
            metrics: Arc::clone(self),
            scope,
        }
    }

    /// How many holds `scope` has (for tests and the status page).
    pub fn holders(&self, scope: &Scope) -> usize {
        let counts = self.holds.0.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(scope).copied().unwrap_or(0)
    }

    /// Removes every series of `scope`.
    fn forget_scope(&self, scope: &Scope) {
        match scope {
            Scope::Listener(l) => {
                let only = [("listener", l.as_str())];
                forget_where(&self.connections_accepted, &only);
                forget_where(&self.connections_active, &only);
                forget_where(&self.accept_errors, &only);
                forget_where(&self.connection_limit_waits, &only);
                forget_where(&self.tls_handshake_errors, &only);
                forget_where(&self.client_send_timeouts, &only);
                forget_where(&self.connections_reclaimed, &only);
            }
            Scope::Route(r) => {
                let only = [("route", r.as_str())];
                forget_where(&self.handshake_duration, &only);
                forget_where(&self.http_request_duration, &only);
                forget_where(&self.tunnel_duration, &only);
                forget_where(&self.tunnel_bytes, &only);
            }
            Scope::RouteUpstream(r, u) => {
                let pair = [("route", r.as_str()), ("upstream", u.as_str())];
                forget_where(&self.upgrades, &pair);
                forget_where(&self.http_requests, &pair);
                forget_where(&self.tunnels_active, &pair);
            }
            Scope::Upstream(u) => {
                forget_where(&self.dns_resolutions, &[("upstream", u.as_str())]);
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut counts = self
            .metrics
            .holds
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(self.scope.clone()).or_insert(1);
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&self.scope);
            // Under the lock: see the module's documentation.
            self.metrics.forget_scope(&self.scope);
        }
    }
}

/// Removes the series of `vec` whose labels include every pair of `labels`.
pub(crate) fn forget_where<T: MetricVecBuilder>(vec: &MetricVec<T>, labels: &[(&str, &str)]) {
    for family in vec.collect() {
        for m in family.get_metric() {
            let all: HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.iter().all(|(k, v)| all.get(k) == Some(v)) {
                let _ = vec.remove(&all);
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
