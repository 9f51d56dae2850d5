//! Starts and stops the proxy: binds listeners, runs accept loops, drains at shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use duplex_config::Config;
use duplex_metrics::Metrics;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ProxyError;
use crate::state::{Shared, Table};
use crate::{admin, conn};

/// Pending connections the kernel queues per listener before accept.
const LISTEN_BACKLOG: u32 = 4096;
/// Accept-error backoff: first pause, and the cap it doubles up to.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After the grace period, how long to wait for closed tasks to wind down.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Vec<(String, SocketAddr)>,
    admin: SocketAddr,
}

/// Binds a listening socket with address reuse and a deep backlog.
pub(crate) fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    let err = |source| ProxyError::Bind {
        listener: name.to_owned(),
        addr,
        source,
    };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    sock.listen(LISTEN_BACKLOG).map_err(err)
}

impl Proxy {
    /// Binds every listener and the admin endpoint, then starts serving. Nothing is
    /// served unless everything binds.
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Proxy, ProxyError> {
        let mut bound = Vec::new();
        for l in &config.listeners {
            bound.push((l.name.clone(), bind(&l.name, l.bind)?));
        }
        let admin_listener = bind("admin", config.admin.bind)?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| ProxyError::Bind {
                listener: "admin".into(),
                addr: config.admin.bind,
                source,
            })?;
        metrics.config_generation.set(1);
        metrics.config_last_reload_success.set(unix_now());
        let table = Table::build(Arc::new(config), None, 1);
        let shared = Arc::new(Shared {
            table: ArcSwap::from_pointee(table),
            metrics,
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
            closing: CancellationToken::new(),
        });
        let mut listeners = Vec::new();
        for (name, l) in bound {
            let addr = l.local_addr().map_err(|source| ProxyError::Bind {
                listener: name.clone(),
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
            tracing::info!(listener = %name, %addr, "listening");
            listeners.push((name.clone(), addr));
            tokio::spawn(accept_loop(l, name.into(), Arc::clone(&shared)));
        }
        tracing::info!(addr = %admin_addr, "admin listening");
        tokio::spawn(admin::serve(admin_listener, Arc::clone(&shared)));
        Ok(Proxy {
            shared,
            listeners,
            admin: admin_addr,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Stops accepting, lets requests and tunnels finish for up to `grace`, closes the
    /// rest, and returns once every tracked task has ended (or a short bound has passed).
    pub async fn shutdown(&self, grace: Duration) {
        let s = &self.shared;
        s.stopping.cancel();
        s.tracker.close();
        tracing::info!(open = s.tracker.len(), grace = ?grace, "shutting down: waiting for open connections");
        if tokio::time::timeout(grace, s.tracker.wait()).await.is_err() {
            tracing::info!(
                open = s.tracker.len(),
                "grace period over: closing what is left"
            );
            s.closing.cancel();
            let _ = tokio::time::timeout(CLOSE_WAIT, s.tracker.wait()).await;
        }
        s.closing.cancel();
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.is_cancelled()
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Accepts until shutdown. Errors (EMFILE, ENFILE, ECONNABORTED...) are logged, counted
/// and backed off, never fatal and never a busy loop.
async fn accept_loop(listener: TcpListener, name: Arc<str>, shared: Arc<Shared>) {
    let accepted = shared
        .metrics
        .connections_accepted
        .with_label_values(&[&name]);
    let errors = shared.metrics.accept_errors.with_label_values(&[&name]);
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        let res = tokio::select! {
            r = listener.accept() => r,
            _ = shared.stopping.cancelled() => break,
        };
        match res {
            Ok((tcp, peer)) => {
                backoff = ACCEPT_BACKOFF_START;
                accepted.inc();
                shared.tracker.spawn(conn::serve(
                    tcp,
                    peer,
                    Arc::clone(&name),
                    Arc::clone(&shared),
                ));
            }
            Err(e) => {
                errors.inc();
                tracing::warn!(listener = %name, error = %e, pause = ?backoff, "accept failed; pausing");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.stopping.cancelled() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    tracing::info!(listener = %name, "stopped accepting");
}
