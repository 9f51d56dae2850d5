//! Every Prometheus metric duplex exports: names, help text, labels, and the registry.
//!
//! Labels come only from configuration names (listener, route, upstream, backend address)
//! and fixed vocabularies, never from client data, so the number of series stays bounded.
//! Hot paths resolve their series once per connection and then pay one atomic add.

#![forbid(unsafe_code)]

#[cfg(target_os = "linux")]
mod process;
mod scope;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use prometheus::{Histogram as HistogramHandle, IntCounter as Counter, IntGauge as Gauge};
pub use scope::{Hold, Holds, Scope};

/// A counter that no scrape shows, for code that must count into one but whose count is
/// not exported (admin connections' send timeouts): made here, so that every metric name
/// duplex creates lives in this crate.
pub fn unexported_counter() -> Counter {
    IntCounter::new("duplex_unexported", "counted, not exported")
        .expect("a fixed, valid name and help")
}

/// Outcome of a WebSocket upgrade, the `result` label of `duplex_websocket_upgrades_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeResult {
    Ok,
    RejectedByBackend,
    BadHandshake,
    NoRoute,
    NoBackend,
    ConnectError,
    Timeout,
    /// The client went away before its handshake was answered.
    ClientClosed,
}

impl UpgradeResult {
    /// Every result, in the order of their discriminants.
    pub const ALL: [UpgradeResult; 8] = [
        UpgradeResult::Ok,
        UpgradeResult::RejectedByBackend,
        UpgradeResult::BadHandshake,
        UpgradeResult::NoRoute,
        UpgradeResult::NoBackend,
        UpgradeResult::ConnectError,
        UpgradeResult::Timeout,
        UpgradeResult::ClientClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeResult::Ok => "ok",
            UpgradeResult::RejectedByBackend => "rejected_by_backend",
            UpgradeResult::BadHandshake => "bad_handshake",
            UpgradeResult::NoRoute => "no_route",
            UpgradeResult::NoBackend => "no_backend",
            UpgradeResult::ConnectError => "connect_error",
            UpgradeResult::Timeout => "timeout",
            UpgradeResult::ClientClosed => "client_closed",
        }
    }
}

/// Label value for requests that matched no route, or whose upstream is not known.
pub const NONE: &str = "";

/// Every metric, registered in one registry.
pub struct Metrics {
    pub registry: Registry,
    pub connections_accepted: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub accept_errors: IntCounterVec,
    pub connections_limit: IntGauge,
    pub connection_limit_waits: IntCounterVec,
    pub listener_connections_limit: IntGaugeVec,
    pub tls_handshake_errors: IntCounterVec,
    pub client_send_timeouts: IntCounterVec,
    pub connections_reclaimed: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub upgrades: IntCounterVec,
    pub handshake_duration: HistogramVec,
    pub tunnels_active: IntGaugeVec,
    pub tunnel_duration: HistogramVec,
    pub tunnel_bytes: IntCounterVec,
    pub backend_connect_errors: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_health_checks: IntCounterVec,
    pub backend_ejections: IntCounterVec,
    pub backend_response_errors: IntCounterVec,
    pub dns_resolutions: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_reload_success: IntGauge,
    /// Which listeners, routes and upstreams something still records into (not a metric).
    pub holds: Holds,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

impl Metrics {
    /// Builds and registers every metric. Metric definitions are constants, so the
    /// `expect`s here can only fire on a programming error, caught by the tests.
    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(process::Process::for_self()))
            .expect("process collector");
        let latency = exponential_buckets(0.0005, 2.0, 16).expect("buckets");
        // From one second to about three days (4^9 s).
        let lifetime = exponential_buckets(1.0, 4.0, 10).expect("buckets");
        Metrics {
            connections_accepted: counter(&r, "duplex_connections_accepted_total", "Client connections accepted, by listener.", &["listener"]),
            connections_active: gauge(&r, "duplex_connections_active", "Client connections open now, by listener (WebSocket tunnels included).", &["listener"]),
            accept_errors: counter(&r, "duplex_accept_errors_total", "Errors from accept(), by listener; each one backs the accept loop off.", &["listener"]),
            connections_limit: {
                let g = IntGauge::new("duplex_connections_limit", "The cap on client connections open at once over every listener: max_connections, or half the open-file limit after a reserve of 100; 0 when there is none.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            listener_connections_limit: gauge(&r, "duplex_listener_connections_limit", "A listener's own max_connections, by listener; 0 when it has none (the top-level cap alone applies).", &["listener"]),
            connection_limit_waits: counter(&r, "duplex_connection_limit_waits_total", "Times a listener stopped accepting because client connections reached a max_connections cap, by listener and cap (global, listener); new connections wait in the listen backlog meanwhile.", &["listener", "limit"]),
            tls_handshake_errors: counter(&r, "duplex_tls_handshake_errors_total", "Client TLS handshakes that did not finish, by listener and reason (timeout, closed, cert_refused, client_cert, protocol, failed).", &["listener", "reason"]),
            client_send_timeouts: counter(&r, "duplex_client_send_timeouts_total", "Client connections closed because the client took no response bytes for the listener's send_timeout, by listener.", &["listener"]),
            connections_reclaimed: counter(&r, "duplex_connections_reclaimed_total", "Idle keep-alive client connections closed between requests to make room for a connection waiting at a max_connections cap, by listener.", &["listener"]),
            http_requests: counter(&r, "duplex_http_requests_total", "Plain HTTP requests answered, by route, upstream and status class (1xx..5xx); no route: empty route and upstream.", &["route", "upstream", "code"]),
            http_request_duration: histogram(&r, "duplex_http_request_duration_seconds", "Time from a plain HTTP request's arrival to its response headers, by route.", &["route"], latency.clone()),
            upgrades: counter(&r, "duplex_websocket_upgrades_total", "WebSocket upgrade requests, by route, upstream and result.", &["route", "upstream", "result"]),
            handshake_duration: histogram(&r, "duplex_websocket_handshake_duration_seconds", "Time from an upgrade request's arrival to the backend's 101 checked and handed to the client, by route (successful upgrades only).", &["route"], latency),
            tunnels_active: gauge(&r, "duplex_websocket_tunnels_active", "WebSocket tunnels open now, by route, upstream and backend.", &["route", "upstream", "backend"]),
            tunnel_duration: histogram(&r, "duplex_websocket_tunnel_duration_seconds", "Lifetime of closed WebSocket tunnels, by route.", &["route"], lifetime),
            tunnel_bytes: counter(&r, "duplex_tunnel_bytes_total", "Bytes relayed through WebSocket tunnels, by route and direction, counted as they pass.", &["route", "direction"]),
            backend_connect_errors: counter(&r, "duplex_backend_connect_errors_total", "Failed connections to backends, by upstream, backend and kind (refused, timeout, tls, other).", &["upstream", "backend", "kind"]),
            backend_up: gauge(&r, "duplex_backend_up", "1 when a configured backend takes new connections, 0 while it is unhealthy or ejected.", &["upstream", "backend"]),
            backend_health_checks: counter(&r, "duplex_backend_health_checks_total", "Active health checks, by upstream, backend and result (ok, fail).", &["upstream", "backend", "result"]),
            backend_ejections: counter(&r, "duplex_backend_ejections_total", "Passive ejections after max_fails failures in a row (connect failures, handshake timeouts, answers duplex cannot relay), by upstream and backend.", &["upstream", "backend"]),
            backend_response_errors: counter(&r, "duplex_backend_response_errors_total", "Plain HTTP responses whose body the backend broke off, or left silent past response_timeout, after the status was relayed: the client's response was cut short (duplex_http_requests_total counts it under that status), by upstream and backend.", &["upstream", "backend"]),
            dns_resolutions: counter(&r, "duplex_dns_resolutions_total", "DNS resolutions of backends with resolve: dns, by upstream and result (ok, error); an error keeps the last addresses.", &["upstream", "result"]),
            config_reloads: counter(&r, "duplex_config_reloads_total", "Configuration reloads, by result (ok, error).", &["result"]),
            config_generation: {
                let g = IntGauge::new("duplex_config_generation", "Generation of the configuration in force; 1 at start, one more per applied reload.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            config_last_reload_success: {
                let g = IntGauge::new("duplex_config_last_reload_success_timestamp_seconds", "Unix time of the last configuration applied.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            registry: r,
            holds: Holds::default(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        // Series of names nothing uses any more go before they would be shown.
        self.sweep();
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The series of one route, resolved once per configuration generation so that a request
/// or handshake pays an atomic add, not a label lookup (which takes a lock in `prometheus`).
pub struct RouteSeries {
    route: String,
    upstream: String,
    /// Keeps the route's series exported; each tunnel of the route shares it, so that a
    /// route a reload removed keeps them while its tunnels are open.
    holds: Arc<[Hold; 2]>,
    /// By result. The results a route can have exist at 0 from the start, so that
    /// `increase()` sees the first one; the others (`no_route` on a route, `ok` where no
    /// route matched) are made if they ever happen, so that no series says something
    /// impossible.
    upgrades: [OnceLock<IntCounter>; UpgradeResult::ALL.len()],
    /// Where the `upgrades` made later come from.
    upgrades_vec: IntCounterVec,
    pub handshake: Histogram,
    /// By status class, 1xx to 5xx.
    http: Vec<IntCounter>,
    pub http_duration: Histogram,
}

impl RouteSeries {
    pub fn upgrade(&self, result: UpgradeResult) -> &IntCounter {
        self.upgrades[result as usize].get_or_init(|| {
            self.upgrades_vec
                .with_label_values(&[&self.route, &self.upstream, result.as_str()])
        })
    }

    /// The request counter for a response `status`.
    pub fn http(&self, status: u16) -> &IntCounter {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        &self.http[class]
    }
}

/// The series one WebSocket tunnel writes to, resolved once when it starts. The byte
/// counters go to the tunnel's two directions; the rest is kept for its end.
pub struct TunnelSeries {
    pub client_to_backend: IntCounter,
    pub backend_to_client: IntCounter,
    pub life: TunnelLife,
}

/// What a tunnel records when it opens and closes, and what keeps its route's series.
pub struct TunnelLife {
    pub active: IntGauge,
    pub duration: Histogram,
    /// The route's holds: its series stay while the tunnel is open.
    _holds: Arc<[Hold; 2]>,
}

impl Metrics {
    /// Client connections accepted so far, summed over every listener (read once a
    /// second by the heap trimmer, never on a request's path).
    pub fn connections_accepted_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.connections_accepted
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// A route's series, held while the result lives; `route` and `upstream` are empty for
    /// requests no route matched.
    pub fn route_series(self: &Arc<Self>, route: &str, upstream: &str) -> RouteSeries {
        // Held before they are resolved: see `scope`.
        let holds = Arc::new([
            self.hold(Scope::Route(route.to_owned())),
            self.hold(Scope::RouteUpstream(route.to_owned(), upstream.to_owned())),
        ]);
        let series = RouteSeries {
            route: route.to_owned(),
            upstream: upstream.to_owned(),
            holds,
            upgrades: Default::default(),
            upgrades_vec: self.upgrades.clone(),
            handshake: self.handshake_duration.with_label_values(&[route]),
            http: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .iter()
                .map(|c| self.http_requests.with_label_values(&[route, upstream, c]))
                .collect(),
            http_duration: self.http_request_duration.with_label_values(&[route]),
        };
        // A request no route matched can only be refused as such or as a bad handshake.
        let possible = |r: UpgradeResult| match route {
            NONE => matches!(r, UpgradeResult::NoRoute | UpgradeResult::BadHandshake),
            _ => r != UpgradeResult::NoRoute,
        };
        for r in UpgradeResult::ALL.into_iter().filter(|&r| possible(r)) {
            series.upgrade(r);
        }
        series
    }

    /// Removes every series of backend `backend` of `upstream`, whatever its other labels
    /// (route, kind, result): for a backend that no configuration has any more.
    pub fn forget_backend(&self, upstream: &str, backend: &str) {
        let one = HashMap::from([(upstream.to_owned(), HashSet::from([backend.to_owned()]))]);
        self.forget_backends(&one);
    }

    /// [`Metrics::forget_backend`] for many backends (`backend` labels by upstream) in
    /// one pass over each family, which reads every series: once per backend made
    /// forgetting thousands quadratic.
    pub fn forget_backends(&self, gone: &HashMap<String, HashSet<String>>) {
        let of = |labels: &scope::Labels| {
            let (Some(up), Some(b)) = (labels.get("upstream"), labels.get("backend")) else {
                return false;
            };
            gone.get(*up).is_some_and(|bs| bs.contains(*b))
        };
        scope::forget_if(&self.tunnels_active, of);
        scope::forget_if(&self.backend_connect_errors, of);
        scope::forget_if(&self.backend_up, of);
        scope::forget_if(&self.backend_health_checks, of);
        scope::forget_if(&self.backend_ejections, of);
        scope::forget_if(&self.backend_response_errors, of);
    }

    /// The series of a tunnel of route `of` to `backend`.
    pub fn tunnel_series(&self, of: &RouteSeries, backend: &str) -> TunnelSeries {
        let (route, upstream) = (of.route.as_str(), of.upstream.as_str());
        TunnelSeries {
            client_to_backend: self
                .tunnel_bytes
                .with_label_values(&[route, "client_to_backend"]),
            backend_to_client: self
                .tunnel_bytes
                .with_label_values(&[route, "backend_to_client"]),
            life: TunnelLife {
                active: self
                    .tunnels_active
                    .with_label_values(&[route, upstream, backend]),
                duration: self.tunnel_duration.with_label_values(&[route]),
                _holds: Arc::clone(&of.holds),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_series_index_by_result_and_class() {
        let m = Arc::new(Metrics::new());
        let s = m.route_series("r", "u");
        for r in UpgradeResult::ALL {
            s.upgrade(r).inc();
        }
        s.http(503).inc();
        s.http(101).inc();
        let text = m.render();
        assert!(
            text.contains(
                "duplex_websocket_upgrades_total{result=\"timeout\",route=\"r\",upstream=\"u\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("duplex_http_requests_total{code=\"5xx\",route=\"r\",upstream=\"u\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("duplex_http_requests_total{code=\"1xx\",route=\"r\",upstream=\"u\"} 1"),
            "{text}"
        );
    }

    /// A route's upgrade results exist at 0 from the start, except `no_route`; where no
    /// route matched, only `no_route` and `bad_handshake` do.
    #[test]
    fn only_possible_upgrade_results_exist_from_the_start() {
        let m = Arc::new(Metrics::new());
        let (_r, _none) = (m.route_series("r", "u"), m.route_series(NONE, NONE));
        let text = m.render();
        let exists = |route: &str, result: &str| {
            let upstream = if route.is_empty() { "" } else { "u" };
            text.contains(&format!(
                "duplex_websocket_upgrades_total{{result=\"{result}\",route=\"{route}\",upstream=\"{upstream}\"}} 0"
            ))
        };
        for r in UpgradeResult::ALL {
            let (result, on_route) = (r.as_str(), r != UpgradeResult::NoRoute);
            assert_eq!(exists("r", result), on_route, "route r, {result}:\n{text}");
            let unrouted = matches!(r, UpgradeResult::NoRoute | UpgradeResult::BadHandshake);
            assert_eq!(exists("", result), unrouted, "no route, {result}:\n{text}");
        }
    }

    #[test]
    fn forgetting_a_backend_removes_all_its_series_and_no_other() {
        let m = Metrics::new();
        for (up, b) in [
            ("u", "10.0.0.1:80"),
            ("u", "10.0.0.2:80"),
            ("v", "10.0.0.1:80"),
        ] {
            m.tunnels_active.with_label_values(&["r1", up, b]).inc();
            m.tunnels_active.with_label_values(&["r2", up, b]).inc();
            m.backend_connect_errors
                .with_label_values(&[up, b, "refused"])
                .inc();
            m.backend_up.with_label_values(&[up, b]).set(1);
            m.backend_health_checks
                .with_label_values(&[up, b, "ok"])
                .inc();
            m.backend_ejections.with_label_values(&[up, b]).inc();
        }
        m.forget_backend("u", "10.0.0.1:80");
        let text = m.render();
        let gone = |up: &str, b: &str| {
            !text.lines().any(|l| {
                l.contains(&format!("backend=\"{b}\"")) && l.contains(&format!("upstream=\"{up}\""))
            })
        };
        assert!(gone("u", "10.0.0.1:80"), "{text}");
        assert!(!gone("u", "10.0.0.2:80"), "{text}");
        assert!(!gone("v", "10.0.0.1:80"), "{text}");
        // Five families with two tunnel routes: six series each for the other two.
        let left = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains("backend=\""))
            .count();
        assert_eq!(left, 12, "{text}");

        // Several at once, by upstream.
        m.forget_backends(&HashMap::from([
            ("u".to_owned(), HashSet::from(["10.0.0.2:80".to_owned()])),
            ("v".to_owned(), HashSet::from(["10.0.0.1:80".to_owned()])),
            ("w".to_owned(), HashSet::from(["10.0.0.9:80".to_owned()])),
        ]));
        let text = m.render();
        assert!(!text.contains("backend=\""), "{text}");
    }

    #[test]
    fn registers_every_family_once() {
        let m = Metrics::new();
        m.upgrades
            .with_label_values(&["r", "u", UpgradeResult::Ok.as_str()])
            .inc();
        let text = m.render();
        assert!(
            text.contains(
                "duplex_websocket_upgrades_total{result=\"ok\",route=\"r\",upstream=\"u\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("# HELP duplex_config_generation"));
    }
}
