//! The routing table of one configuration generation, and the state shared by every task.
//!
//! A reload builds a complete new [`Table`] and stores it with one `ArcSwap::store`; a
//! request `load()`s the table once and keeps what it needs for its whole life, so
//! requests and tunnels never lock and never see a half-applied config.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use duplex_balance::{Backend, BackendState, Pool};
use duplex_config::{Config, Route, Upstream};
use duplex_metrics::Metrics;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connector::BackendConnector;
use crate::http_proxy::ReclaimBody;
use crate::tls::{self, Acceptor, Connector, TlsError};

/// How long an idle pooled connection to a backend is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle pooled connections kept per backend.
const POOL_MAX_IDLE_PER_BACKEND: usize = 128;

pub type HttpClient = Client<BackendConnector, ReclaimBody>;

/// An upstream as one generation runs it.
pub struct UpstreamRt {
    pub cfg: Upstream,
    pub pool: Pool,
    /// Keep-alive pools for plain HTTP, one per backend address inside the client.
    pub client: HttpClient,
    /// TLS toward the backends, when the upstream has `tls`.
    pub tls: Option<Arc<Connector>>,
    /// Per backend, cancelled to close its tunnels: when a reload's drain of a removed
    /// backend ends, or at the end of shutdown (each is a child of `Shared::closing`).
    pub closers: HashMap<SocketAddr, CancellationToken>,
}

impl UpstreamRt {
    /// The token a new tunnel to `addr` watches.
    pub fn closer(&self, addr: SocketAddr) -> CancellationToken {
        self.closers.get(&addr).cloned().unwrap_or_default()
    }
}

/// One configuration generation, immutable once built.
pub struct Table {
    pub generation: u64,
    pub config: Arc<Config>,
    pub upstreams: HashMap<String, Arc<UpstreamRt>>,
    /// Per listener name: what a new connection on it needs.
    pub listeners: HashMap<String, Arc<ListenerRt>>,
}

/// A listener's settings for new connections; swapped by a reload without rebinding.
pub struct ListenerRt {
    /// TLS termination, with the certificates read at load.
    pub tls: Option<Acceptor>,
    /// Redirect plain HTTP to https on this port.
    pub redirect_https: Option<u16>,
}

impl Table {
    /// Builds the table for `config`. Backends that stay keep their load counter and close
    /// token (from `previous`, or from `draining` when a reload brings a removed backend
    /// back, which ends its drain); upstreams keep their HTTP pools.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Table>,
        generation: u64,
        closing: &CancellationToken,
        draining: &Mutex<HashMap<(String, SocketAddr), Draining>>,
    ) -> Result<Table, TlsError> {
        let mut listeners = HashMap::new();
        for l in &config.listeners {
            let rt = ListenerRt {
                tls: l.tls.as_ref().map(tls::acceptor).transpose()?,
                redirect_https: l.redirect_https,
            };
            listeners.insert(l.name.clone(), Arc::new(rt));
        }
        // Everything that can fail comes first, before a drain is taken back below.
        let mut connectors = HashMap::new();
        for u in &config.upstreams {
            connectors.insert(
                u.name.clone(),
                u.tls
                    .as_ref()
                    .map(tls::connector)
                    .transpose()?
                    .map(Arc::new),
            );
        }
        let mut upstreams = HashMap::new();
        let mut draining = crate::server::lock(draining);
        for u in &config.upstreams {
            let old = previous.and_then(|t| t.upstreams.get(&u.name));
            let mut backends = Vec::new();
            let mut closers = HashMap::new();
            for b in &u.backends {
                let kept = old.and_then(|o| {
                    let state = o.pool.backends().iter().find(|x| x.state.addr == b.addr)?;
                    Some((Arc::clone(&state.state), o.closer(b.addr)))
                });
                let back = || {
                    draining
                        .remove(&(u.name.clone(), b.addr))
                        .map(|d| (d.state, d.closer))
                };
                let (state, closer) = kept
                    .or_else(back)
                    .unwrap_or_else(|| (BackendState::new(b.addr), closing.child_token()));
                backends.push(Backend {
                    state,
                    weight: b.weight,
                });
                closers.insert(b.addr, closer);
            }
            let tls = connectors.remove(&u.name).flatten();
            let client = match old {
                // TLS settings may read changed files: only plain upstreams keep their pools.
                Some(o)
                    if o.cfg.connect_timeout == u.connect_timeout
                        && o.tls.is_none()
                        && tls.is_none() =>
                {
                    o.client.clone()
                }
                _ => http_client(BackendConnector {
                    timeout: u.connect_timeout,
                    tls: tls.clone(),
                }),
            };
            let rt = UpstreamRt {
                pool: Pool::new(u.balancer, u.hash_key.as_ref(), backends),
                cfg: u.clone(),
                client,
                tls,
                closers,
            };
            upstreams.insert(u.name.clone(), Arc::new(rt));
        }
        Ok(Table {
            generation,
            config,
            upstreams,
            listeners,
        })
    }

    pub fn routes(&self) -> &[Route] {
        &self.config.routes
    }

    /// Sets `duplex_backend_up` for every backend of this table. Until health checks
    /// exist, a configured backend is up.
    pub fn export_backends(&self, metrics: &Metrics) {
        for (name, up) in &self.upstreams {
            for b in up.pool.backends() {
                metrics
                    .backend_up
                    .with_label_values(&[name, &b.state.addr.to_string()])
                    .set(1);
            }
        }
    }
}

fn http_client(connector: BackendConnector) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_BACKEND)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
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
}

/// A removed backend waiting for its last tunnel or its drain timeout.
pub struct Draining {
    pub state: Arc<BackendState>,
    pub closer: CancellationToken,
    pub since: std::time::Instant,
}
