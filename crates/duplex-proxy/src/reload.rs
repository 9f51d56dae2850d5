//! Applies a new configuration to the running proxy without touching live connections.
//!
//! Order matters: parse and validate, bind the listeners to add, build the complete new
//! table, and only then switch (one `ArcSwap::store`), start and stop listeners, and
//! schedule the drain of removed backends. Any failure before the switch changes nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use duplex_balance::BackendState;
use duplex_config::{Config, Diff};
use tokio_util::sync::CancellationToken;

use crate::error::ProxyError;
use crate::server::{bind_all, unix_now, Proxy};
use crate::state::{Shared, Table};

/// How often a draining backend is checked for its last tunnel.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// The outcome of the last reload, shown by the admin status.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    pub at: SystemTime,
    /// `None` when it applied; the error text when it was refused.
    pub error: Option<String>,
}

impl ReloadStatus {
    pub(crate) fn started() -> ReloadStatus {
        ReloadStatus {
            at: SystemTime::now(),
            error: None,
        }
    }
}

impl Proxy {
    /// Reads the config file again and applies it; returns the new generation.
    pub async fn reload_from_file(&self) -> Result<u64, ProxyError> {
        let Some(path) = self.inner.source.clone() else {
            return Err(ProxyError::NoConfigFile);
        };
        let parsed = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|_| ProxyError::NoConfigFile)?;
        match parsed {
            Ok(config) => self.reload(config).await,
            Err(e) => Err(self.refused(ProxyError::Config(e))),
        }
    }

    /// Applies `config`; on error nothing changes and the error is counted and kept for
    /// the admin status.
    pub async fn reload(&self, config: Config) -> Result<u64, ProxyError> {
        let _one_at_a_time = self.inner.reload.lock().await;
        let shared = &self.inner.shared;
        let old = shared.table.load_full();
        if config.admin != old.config.admin {
            tracing::warn!("admin.bind changed: the admin listener moves only on restart");
        }

        // Listeners are known by their configured address: unchanged ones are never rebound.
        let (to_add, to_stop) = {
            let handles = self
                .inner
                .listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let add: Vec<_> = config
                .listeners
                .iter()
                .filter(|l| !handles.iter().any(|h| h.bind == l.bind))
                .collect();
            let stop: Vec<SocketAddr> = handles
                .iter()
                .filter(|h| !config.listeners.iter().any(|l| l.bind == h.bind))
                .map(|h| h.bind)
                .collect();
            (add, stop)
        };
        let bound = bind_all(to_add).map_err(|e| self.refused(e))?;

        let diff = Diff::between(&old.config, &config);
        let generation = old.generation + 1;
        let table = Arc::new(Table::build(
            Arc::new(config),
            Some(&old),
            generation,
            &shared.closing,
        ));
        shared.table.store(Arc::clone(&table));

        self.start_accepting(bound);
        {
            let mut handles = self
                .inner
                .listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            handles.retain(|h| {
                let keep = !to_stop.contains(&h.bind);
                if !keep {
                    tracing::info!(listener = %h.name, addr = %h.addr, "listener removed: stops accepting; its open connections stay");
                    h.stop.cancel();
                }
                keep
            });
        }
        drain_removed(shared, &old, &table);

        let m = &shared.metrics;
        m.config_reloads.with_label_values(&["ok"]).inc();
        m.config_generation.set(generation as i64);
        m.config_last_reload_success.set(unix_now());
        *self.inner.status.lock().unwrap_or_else(|p| p.into_inner()) = ReloadStatus::started();
        tracing::info!(generation, changes = %diff, "configuration reloaded");
        Ok(generation)
    }

    /// Records a refused reload and hands the error back.
    fn refused(&self, e: ProxyError) -> ProxyError {
        self.inner
            .shared
            .metrics
            .config_reloads
            .with_label_values(&["error"])
            .inc();
        tracing::error!(error = %e, "reload refused; the running configuration stays");
        *self.inner.status.lock().unwrap_or_else(|p| p.into_inner()) = ReloadStatus {
            at: SystemTime::now(),
            error: Some(e.to_string()),
        };
        e
    }

    /// How the last reload went.
    pub fn last_reload(&self) -> ReloadStatus {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// For every backend in `old` but not in `new`: no new connections (the new table lacks
/// it); its tunnels stay until they end or its upstream's `drain_timeout` passes, then are
/// closed, and its metric series go.
fn drain_removed(shared: &Arc<Shared>, old: &Table, new: &Table) {
    for (name, up) in &old.upstreams {
        let kept = new.upstreams.get(name);
        for b in up.pool.backends() {
            let addr = b.state.addr;
            if kept.is_some_and(|k| k.closers.contains_key(&addr)) {
                continue;
            }
            let closer = up.closer(addr);
            let routes: Vec<String> = old
                .routes()
                .iter()
                .filter(|r| &r.upstream == name)
                .map(|r| r.name.clone())
                .collect();
            tokio::spawn(drain(
                Arc::clone(shared),
                Arc::clone(&b.state),
                closer,
                up.cfg.drain_timeout,
                name.clone(),
                routes,
            ));
        }
    }
}

async fn drain(
    shared: Arc<Shared>,
    state: Arc<BackendState>,
    closer: CancellationToken,
    timeout: Duration,
    upstream: String,
    routes: Vec<String>,
) {
    let addr = state.addr;
    tracing::info!(%upstream, backend = %addr, tunnels = state.tunnels(), ?timeout, "backend removed: draining");
    let deadline = tokio::time::Instant::now() + timeout;
    while state.load() > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_POLL.min(deadline - tokio::time::Instant::now())) => {}
            _ = shared.closing.cancelled() => break,
        }
    }
    if state.load() > 0 {
        tracing::info!(%upstream, backend = %addr, open = state.load(), "drain timeout: closing the backend's tunnels");
    }
    closer.cancel();
    let backend = addr.to_string();
    for r in &routes {
        let _ = shared
            .metrics
            .tunnels_active
            .remove_label_values(&[r, &upstream, &backend]);
    }
    let _ = shared
        .metrics
        .backend_up
        .remove_label_values(&[&upstream, &backend]);
}
