//! The routing table of one configuration generation, and the state shared by every task.
//!
//! A reload builds a complete new [`Table`] and stores it with one `ArcSwap::store`; a
//! request `load()`s the table once and keeps what it needs for its whole life, so
//! requests and tunnels never lock and never see a half-applied config.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use duplex_balance::{Backend, BackendState, Pool};
use duplex_config::{Config, Route, Upstream};
use duplex_metrics::{Counter, Gauge, Hold, Metrics, RouteSeries, Scope, NONE};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http_pool::HttpPool;
use crate::limits::Limits;
use crate::retired::Retired;
use crate::tls::{self, Acceptor, Connector, TlsError};

/// An upstream as one generation runs it.
pub struct UpstreamRt {
    pub cfg: Upstream,
    pub pool: Pool,
    /// Keep-alive connections for plain HTTP, by backend address.
    pub http: Arc<HttpPool>,
    /// TLS toward the backends, when the upstream has `tls`.
    pub tls: Option<Arc<Connector>>,
    /// Per backend: closes its tunnels when a reload's drain ends, when a check takes it
    /// out (with `close_tunnels_on_unhealthy`), or at the end of shutdown.
    pub closers: HashMap<SocketAddr, Arc<Closer>>,
    /// Keeps the upstream's own series (DNS resolutions) while a table has it.
    _series: Hold,
}

impl UpstreamRt {
    /// The token a new tunnel to `addr` watches, and the backend's `backend` label.
    pub fn closer(&self, addr: SocketAddr) -> (CancellationToken, Cow<'_, str>) {
        match self.closers.get(&addr) {
            Some(c) => (c.token(), Cow::Borrowed(&c.owner.label)),
            None => (CancellationToken::default(), Cow::Owned(addr.to_string())),
        }
    }
}

/// Closes a backend's open tunnels on demand while new ones keep coming: every tunnel
/// watches the current token; closing cancels it and puts a fresh one in its place.
///
/// One per backend, carried from table to table while the backend stays, and kept by a
/// drain after it goes; so it lives exactly as long as something can still reach the
/// backend through a table, and its [`Owner`] forgets the backend's metric series then.
pub struct Closer {
    /// `Shared::closing`: cancelled at the end of shutdown, which closes every token.
    parent: CancellationToken,
    current: Mutex<CancellationToken>,
    owner: Owner,
}

/// How many live [`Closer`]s each backend has (usually one; two while a backend that a
/// reload removed is back under a new one and the old one is still held), and the
/// forgetting of the series of backends that none holds any more.
pub struct Owners {
    counts: Mutex<HashMap<(String, SocketAddr), usize>>,
    metrics: Arc<Metrics>,
    /// Backends whose series are to be forgotten, taken in batches by one thread at a
    /// time. Forgetting reads every series of five families: once per batch, not once
    /// per backend, since a reload that removes thousands of backends ends their drains
    /// all at once. Off the runtime's threads, so that it holds up no traffic.
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Forget>,
    /// A thread is taking batches; it stops when it finds none.
    working: bool,
}

/// A backend whose series are to be forgotten, if no closer holds it then but `held`.
struct Forget {
    key: (String, SocketAddr),
    /// The caller's closer, kept until the check so that the count includes it.
    held: Option<Arc<Closer>>,
}

impl Owners {
    pub fn new(metrics: Arc<Metrics>) -> Owners {
        Owners {
            counts: Mutex::default(),
            metrics,
            queue: Mutex::default(),
        }
    }

    /// At the end of a drain: forgets the series of `closer`'s backend unless another
    /// closer holds it by then (a reload may already have it back).
    pub fn forget_if_sole(self: &Arc<Self>, closer: Arc<Closer>) {
        let key = closer.owner.key.clone();
        self.queue(Forget {
            key,
            held: Some(closer),
        });
    }

    fn queue(self: &Arc<Self>, forget: Forget) {
        let mut queue = crate::server::lock(&self.queue);
        queue.pending.push(forget);
        if std::mem::replace(&mut queue.working, true) {
            return;
        }
        drop(queue);
        let owners = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("duplex-forget".into())
            .spawn(move || owners.work());
        if spawned.is_err() {
            // No thread to be had: here, rather than never.
            self.work();
        }
    }

    /// Forgets batches until none is left. Each is checked and forgotten under the count
    /// lock, so that a reload bringing a backend back waits for it in `Closer::owned`
    /// rather than having its new series removed.
    fn work(&self) {
        loop {
            let batch = {
                let mut queue = crate::server::lock(&self.queue);
                if queue.pending.is_empty() {
                    queue.working = false;
                    return;
                }
                std::mem::take(&mut queue.pending)
            };
            {
                let counts = crate::server::lock(&self.counts);
                let mut gone: HashMap<String, HashSet<String>> = HashMap::new();
                for f in &batch {
                    let others = counts.get(&f.key).copied().unwrap_or(0);
                    if others <= usize::from(f.held.is_some()) {
                        let (upstream, addr) = &f.key;
                        gone.entry(upstream.clone())
                            .or_default()
                            .insert(addr.to_string());
                    }
                }
                if !gone.is_empty() {
                    self.metrics.forget_backends(&gone);
                }
            }
            // Out of the count lock: a closer let go here may be the backend's last, and
            // queue it again.
            drop(batch);
        }
    }

    /// Waits until every backend queued so far has been forgotten (or kept).
    #[cfg(test)]
    pub fn settle(&self) {
        for _ in 0..1000 {
            let queue = crate::server::lock(&self.queue);
            if !queue.working && queue.pending.is_empty() {
                return;
            }
            drop(queue);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("series still being forgotten after 10 s");
    }
}

/// A backend's place in [`Owners`]. The last one to go removes the backend's metric
/// series: whatever still ran on an old table (a request trying its next backend, a
/// health check finishing) may have brought them back after its drain ended.
struct Owner {
    owners: Arc<Owners>,
    key: (String, SocketAddr),
    /// The address as metric labels carry it, rendered once rather than per tunnel.
    label: String,
}

impl Drop for Owner {
    fn drop(&mut self) {
        let mut counts = crate::server::lock(&self.owners.counts);
        let n = counts.entry(self.key.clone()).or_insert(1);
        *n = n.saturating_sub(1);
        let last = *n == 0;
        if last {
            counts.remove(&self.key);
        }
        drop(counts);
        // Checked again when forgotten: a reload may have the backend back by then.
        if last {
            self.owners.queue(Forget {
                key: self.key.clone(),
                held: None,
            });
        }
    }
}

impl Closer {
    /// A closer for backend `addr` of `upstream`, counted in `owners`.
    fn owned(carry: &Carry<'_>, upstream: &str, addr: SocketAddr) -> Arc<Closer> {
        let key = (upstream.to_owned(), addr);
        *crate::server::lock(&carry.owners.counts)
            .entry(key.clone())
            .or_insert(0) += 1;
        let owner = Owner {
            owners: Arc::clone(carry.owners),
            key,
            label: addr.to_string(),
        };
        Closer::make(carry.closing, owner)
    }

    fn make(parent: &CancellationToken, owner: Owner) -> Arc<Closer> {
        Arc::new(Closer {
            parent: parent.clone(),
            current: Mutex::new(parent.child_token()),
            owner,
        })
    }

    pub fn token(&self) -> CancellationToken {
        crate::server::lock(&self.current).clone()
    }

    /// Closes the tunnels open now and any opened later: the backend is gone.
    pub fn retire(&self) {
        crate::server::lock(&self.current).cancel();
    }

    /// Closes the tunnels open now; later ones get a fresh token.
    pub fn close_open_tunnels(&self) {
        let old = std::mem::replace(
            &mut *crate::server::lock(&self.current),
            self.parent.child_token(),
        );
        old.cancel();
    }
}

/// What DNS discovery last found, by (upstream, host, port).
pub type Resolved = HashMap<(String, String, u16), Vec<SocketAddr>>;

/// What a new table takes over from the running proxy.
pub struct Carry<'a> {
    pub previous: Option<&'a Table>,
    pub closing: &'a CancellationToken,
    pub draining: &'a Mutex<HashMap<(String, SocketAddr), Draining>>,
    /// Backends whose drain ended a short while ago.
    pub retired: &'a Mutex<Retired>,
    /// What DNS discovery last found, by (upstream, host, port).
    pub resolved: &'a Mutex<Resolved>,
    pub metrics: &'a Arc<Metrics>,
    /// Which backends some table or drain still holds.
    pub owners: &'a Arc<Owners>,
}

/// The TLS settings of a config's listeners and upstreams, by name: read from the files
/// it names before a reload takes the reload lock (a file on a slow or hung mount then
/// holds up nothing else), or taken over from the table in force (a DNS change is not a
/// reload, and must not fail on a certificate).
pub struct TlsSettings {
    listeners: HashMap<String, Option<Acceptor>>,
    upstreams: HashMap<String, Option<Arc<Connector>>>,
}

impl TlsSettings {
    /// Reads every certificate, key and CA file `config` names.
    pub fn read(config: &Config) -> Result<TlsSettings, TlsError> {
        let mut listeners = HashMap::new();
        for l in &config.listeners {
            listeners.insert(
                l.name.clone(),
                l.tls.as_ref().map(tls::acceptor).transpose()?,
            );
        }
        let mut upstreams = HashMap::new();
        for u in &config.upstreams {
            let c = u.tls.as_ref().map(tls::connector).transpose()?;
            upstreams.insert(u.name.clone(), c.map(Arc::new));
        }
        Ok(TlsSettings {
            listeners,
            upstreams,
        })
    }

    /// The settings `table` runs with.
    pub fn of(table: &Table) -> TlsSettings {
        TlsSettings {
            listeners: table
                .listeners
                .iter()
                .map(|(name, l)| (name.clone(), l.tls.clone()))
                .collect(),
            upstreams: table
                .upstreams
                .iter()
                .map(|(name, u)| (name.clone(), u.tls.clone()))
                .collect(),
        }
    }
}

/// One configuration generation, immutable once built.
pub struct Table {
    pub generation: u64,
    pub config: Arc<Config>,
    pub upstreams: HashMap<String, Arc<UpstreamRt>>,
    /// Per listener name: what a new connection on it needs.
    pub listeners: HashMap<String, Arc<ListenerRt>>,
    /// Each route's metric series, in the order of `config.routes`.
    pub route_series: Vec<RouteSeries>,
    /// The series of requests no route matched.
    pub no_route: RouteSeries,
}

/// A listener's `duplex_connections_active`, and the hold on its series: one pointer for
/// each open connection and tunnel to keep.
pub struct OpenGauge {
    pub active: Gauge,
    _hold: Hold,
}

/// A listener's settings for new connections; swapped by a reload without rebinding.
pub struct ListenerRt {
    /// The listener's name in this config: the `listener` label of its connections (a
    /// connection accepted just before a reload renamed its listener counts under the
    /// new name, which `open` holds).
    pub name: String,
    /// `duplex_connections_active` of this listener, with what keeps its series
    /// exported while a table or a connection has it.
    pub open: Arc<OpenGauge>,
    /// TLS termination, with the certificates read at load.
    pub tls: Option<Acceptor>,
    /// Redirect plain HTTP to https on this port.
    pub redirect_https: Option<u16>,
    /// How long a client may leave a response unread; see [`crate::send_timeout`].
    pub send_timeout: Duration,
    /// `duplex_client_send_timeouts_total` of this listener.
    pub send_timeouts: Counter,
    /// How long a client may pause while sending a request body.
    pub body_timeout: Duration,
    /// The listener's `client_header_timeout`, for hyper's header read timeout.
    pub header_timeout: Duration,
    /// The listener's own `max_connections`.
    pub max_connections: Option<usize>,
    /// `duplex_connections_reclaimed_total` of this listener.
    pub reclaimed: Counter,
}

impl Table {
    /// Builds the table for `config` with its TLS settings (read beforehand, since that can
    /// fail or take long; nothing here can). Backends that stay keep their load counter, health
    /// and close token (from the previous table, or from `draining` when a reload brings a
    /// removed backend back, which ends its drain); upstreams keep their HTTP pools.
    /// Backends found by DNS join the static ones.
    pub fn build(
        config: Arc<Config>,
        generation: u64,
        carry: &Carry<'_>,
        tls: TlsSettings,
    ) -> Table {
        let TlsSettings {
            listeners: mut acceptors,
            upstreams: mut connectors,
        } = tls;
        let mut listeners = HashMap::new();
        for l in &config.listeners {
            // Held before its series are resolved: see `duplex_metrics::Scope`.
            let hold = carry.metrics.hold(Scope::Listener(l.name.clone()));
            let open = Arc::new(OpenGauge {
                active: carry
                    .metrics
                    .connections_active
                    .with_label_values(&[&l.name]),
                _hold: hold,
            });
            let rt = ListenerRt {
                name: l.name.clone(),
                open,
                tls: acceptors.remove(&l.name).flatten(),
                redirect_https: l.redirect_https,
                send_timeout: l.send_timeout,
                body_timeout: l.client_body_timeout,
                header_timeout: l.client_header_timeout,
                max_connections: l.max_connections,
                send_timeouts: carry
                    .metrics
                    .client_send_timeouts
                    .with_label_values(&[&l.name]),
                reclaimed: carry
                    .metrics
                    .connections_reclaimed
                    .with_label_values(&[&l.name]),
            };
            listeners.insert(l.name.clone(), Arc::new(rt));
        }
        let mut upstreams = HashMap::new();
        let resolved = crate::server::lock(carry.resolved).clone();
        for u in &config.upstreams {
            let old = carry.previous.and_then(|t| t.upstreams.get(&u.name));
            // Indexed by address: pools of thousands of backends are rebuilt at every DNS
            // change, and a search per backend would grow with the square of their number.
            let old_states: HashMap<SocketAddr, &Arc<BackendState>> = old
                .map(|o| {
                    o.pool
                        .backends()
                        .iter()
                        .map(|b| (b.state.addr, &b.state))
                        .collect()
                })
                .unwrap_or_default();
            let mut addrs: Vec<(SocketAddr, u32)> =
                u.backends.iter().map(|b| (b.addr, b.weight)).collect();
            let mut listed: HashSet<SocketAddr> = addrs.iter().map(|(a, _)| *a).collect();
            for d in &u.discovered {
                for &a in resolved
                    .get(&(u.name.clone(), d.host.clone(), d.port))
                    .into_iter()
                    .flatten()
                {
                    if listed.insert(a) {
                        addrs.push((a, d.weight));
                    }
                }
            }
            let mut backends = Vec::new();
            let mut closers = HashMap::new();
            for (addr, weight) in addrs {
                let kept = old.and_then(|o| {
                    let state = old_states.get(&addr)?;
                    Some((Arc::clone(state), Arc::clone(o.closers.get(&addr)?)))
                });
                // Back while draining, or soon after (a DNS answer rotating through
                // addresses): its health, ejection and load as they were. The lock is
                // taken per backend, not for the whole build: drain tasks and /status
                // take it too.
                let back = || {
                    crate::server::lock(carry.draining)
                        .remove(&(u.name.clone(), addr))
                        .map(|d| (d.state, d.closer))
                        .or_else(|| {
                            let state = crate::server::lock(carry.retired).take(
                                &u.name,
                                addr,
                                std::time::Instant::now(),
                            )?;
                            Some((state, Closer::owned(carry, &u.name, addr)))
                        })
                };
                let (state, closer) = kept.or_else(back).unwrap_or_else(|| {
                    (BackendState::new(addr), Closer::owned(carry, &u.name, addr))
                });
                if u.health_check.is_none() {
                    // Without checks nothing would ever bring it back: healthy by default.
                    state.set_healthy(true);
                }
                if old.is_some_and(|o| o.cfg.health_check != u.health_check) {
                    // Passes and failures in a row counted under other thresholds (or
                    // before the checks were removed) do not count toward the new ones.
                    // A backend back from a drain keeps them: with a DNS answer rotating
                    // through addresses, one that never stays long enough to fail
                    // `unhealthy_threshold` checks in one stay would never be taken out.
                    state.reset_checks();
                }
                backends.push(Backend { state, weight });
                closers.insert(addr, closer);
            }
            let tls = connectors.remove(&u.name).flatten();
            let http = match old {
                // A reload builds new TLS settings (its files may have changed): only plain
                // upstreams, and TLS ones whose settings stay (a DNS change), keep their pools.
                Some(o)
                    if o.cfg.connect_timeout == u.connect_timeout
                        && match (&o.tls, &tls) {
                            (None, None) => true,
                            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                            _ => false,
                        } =>
                {
                    Arc::clone(&o.http)
                }
                _ => HttpPool::new(u.connect_timeout, tls.clone()),
            };
            let rt = UpstreamRt {
                _series: carry.metrics.hold(Scope::Upstream(u.name.clone())),
                pool: Pool::new(u.balancer, u.hash_key.as_ref(), u.panic_mode, backends),
                cfg: u.clone(),
                http,
                tls,
                closers,
            };
            upstreams.insert(u.name.clone(), Arc::new(rt));
        }
        let route_series = config
            .routes
            .iter()
            .map(|r| carry.metrics.route_series(&r.name, &r.upstream))
            .collect();
        Table {
            generation,
            upstreams,
            listeners,
            route_series,
            no_route: carry.metrics.route_series(NONE, NONE),
            config,
        }
    }

    /// A table with no listeners and no upstreams, in force only while the first real one
    /// is built at start.
    pub fn placeholder(config: &Config, metrics: &Arc<Metrics>) -> Table {
        Table {
            generation: 0,
            config: Arc::new(config.clone()),
            upstreams: HashMap::new(),
            listeners: HashMap::new(),
            route_series: Vec::new(),
            no_route: metrics.route_series(NONE, NONE),
        }
    }

    /// A listener's settings by name; for a connection accepted by a listener a reload just
    /// renamed (same address), by its configured address.
    pub fn listener_settings(&self, name: &str, bind: SocketAddr) -> Option<Arc<ListenerRt>> {
        if let Some(s) = self.listeners.get(name) {
            return Some(Arc::clone(s));
        }
        let renamed = self
            .config
            .listeners
            .iter()
            .find(|l| bind.port() != 0 && l.bind == bind)?;
        self.listeners.get(&renamed.name).cloned()
    }

    pub fn routes(&self) -> &[Route] {
        &self.config.routes
    }

    /// Sets `duplex_backend_up` for every backend of this table from its health and
    /// ejection state as of now, and adds the bodies it broke off since the last time. Its
    /// failure counters are made at 0 if they are not there yet: an alert's `increase()`
    /// sees nothing of a series' first value.
    pub fn export_backends(&self, metrics: &Metrics) {
        for (name, up) in &self.upstreams {
            for b in up.pool.backends() {
                let labels = [name.as_str(), &b.state.addr.to_string()];
                metrics
                    .backend_up
                    .with_label_values(&labels)
                    .set(i64::from(b.state.is_available()));
                metrics
                    .backend_response_errors
                    .with_label_values(&labels)
                    .inc_by(b.state.take_response_errors());
                metrics.backend_ejections.with_label_values(&labels);
            }
        }
    }
}

impl Shared {
    /// Copies into the metrics what draining backends (no longer in any table) counted
    /// since the last scrape: bodies broken off on their last requests.
    pub fn export_draining(&self) {
        for ((upstream, addr), d) in crate::server::lock(&self.draining).iter() {
            let broken = d.state.take_response_errors();
            if broken > 0 {
                self.metrics
                    .backend_response_errors
                    .with_label_values(&[upstream.as_str(), &addr.to_string()])
                    .inc_by(broken);
            }
        }
    }
}

/// What every listener, request and tunnel shares.
pub struct Shared {
    pub table: ArcSwap<Table>,
    pub metrics: Arc<Metrics>,
    /// Every connection and tunnel task, so that shutdown can wait for all of them.
    pub tracker: TaskTracker,
    /// Cancelled at shutdown: stop accepting, finish in-flight HTTP gracefully.
    pub stopping: CancellationToken,
    /// Cancelled when the shutdown grace period ends: close whatever is still open.
    pub closing: CancellationToken,
    /// Backends a reload removed whose tunnels may still be open, by (upstream, address).
    pub draining: Mutex<HashMap<(String, SocketAddr), Draining>>,
    /// Backends whose drain ended a short while ago, for a table that names them again.
    pub retired: Mutex<Retired>,
    /// What DNS discovery last found, by (upstream, host, port).
    pub resolved: Mutex<Resolved>,
    /// When each DNS name was last looked up, well or not: a watch started anew (by a
    /// reload) waits out the name's interval from then.
    pub looked_up: Mutex<HashMap<crate::discovery::Key, tokio::time::Instant>>,
    pub resolver: Arc<dyn crate::discovery::Resolver>,
    /// Open client connections against `max_connections`.
    pub limits: Arc<Limits>,
    /// Which backends some table or drain still holds (their metric series go with the
    /// last one).
    pub owners: Arc<Owners>,
}

impl Shared {
    /// Shared state before the first table: `config`'s placeholder table, nothing open.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        resolver: Arc<dyn crate::discovery::Resolver>,
    ) -> Shared {
        Shared {
            table: ArcSwap::from_pointee(Table::placeholder(config, &metrics)),
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
            closing: CancellationToken::new(),
            draining: Mutex::new(HashMap::new()),
            retired: Mutex::default(),
            resolved: Mutex::new(HashMap::new()),
            looked_up: Mutex::default(),
            resolver,
            limits: Arc::default(),
            owners: Arc::new(Owners::new(Arc::clone(&metrics))),
            metrics,
        }
    }

    /// The caps a new connection on `listener` is under as of now: (global, listener).
    pub fn caps(&self, listener: &str, bind: SocketAddr) -> (usize, usize) {
        let table = self.table.load();
        let global = table
            .config
            .max_connections
            .unwrap_or_else(crate::limits::default_max);
        let own = table
            .listener_settings(listener, bind)
            .and_then(|l| l.max_connections)
            .unwrap_or(usize::MAX);
        (global, own)
    }

    /// After a table is stored: shows its caps, and lets accept loops waiting at a cap try
    /// again under the new ones.
    pub fn apply_caps(&self) {
        let table = self.table.load();
        for (name, l) in &table.listeners {
            let cap = l
                .max_connections
                .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX));
            self.metrics
                .listener_connections_limit
                .with_label_values(&[name])
                .set(cap);
        }
        let global = table
            .config
            .max_connections
            .unwrap_or_else(crate::limits::default_max);
        let shown = if global == usize::MAX { 0 } else { global };
        self.metrics
            .connections_limit
            .set(i64::try_from(shown).unwrap_or(i64::MAX));
        self.limits.recheck();
    }

    /// What a table built now takes over.
    pub fn carry<'a>(&'a self, previous: Option<&'a Table>) -> Carry<'a> {
        Carry {
            previous,
            closing: &self.closing,
            draining: &self.draining,
            retired: &self.retired,
            resolved: &self.resolved,
            metrics: &self.metrics,
            owners: &self.owners,
        }
    }
}

/// A removed backend waiting for its last tunnel or its drain timeout.
pub struct Draining {
    pub id: u64,
    pub state: Arc<BackendState>,
    pub closer: Arc<Closer>,
    pub since: std::time::Instant,
}

#[cfg(test)]
mod tests;
