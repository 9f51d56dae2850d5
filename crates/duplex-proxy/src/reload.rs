//! Applies a new configuration to the running proxy without touching live connections.
//!
//! Order matters: parse and validate, bind the listeners to add, build the complete new
//! table, and only then switch (one `ArcSwap::store`), start and stop listeners, and
//! schedule the drain of removed backends. Any failure before the switch changes nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use duplex_balance::BackendState;
use duplex_config::{Config, ConfigError, Diff, Listener};
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use crate::error::ProxyError;
use crate::server::{bind_all, lock, unix_now, Bound, ListenerHandle, Proxy};
use crate::state::{Draining, Shared, Table, TlsSettings};

/// A reload's config with what was slow to get for it (see [`Proxy::prepare`]).
struct Prepared {
    config: Config,
    tls: TlsSettings,
    /// Answers for DNS names new to the config, put in force with it.
    dns: crate::discovery::NewAnswers,
    /// When it was asked for, among reloads (see `reload_tickets`).
    ticket: u64,
}

/// About a century: what a duration too large for the clock means.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365 * 100)
}

/// How often a draining backend is checked for its last tunnel.
const DRAIN_POLL: Duration = Duration::from_secs(1);
/// Reloads that may read files at once; more are refused until one ends.
pub(crate) const MAX_READERS: usize = 4;

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
    /// Reads the config file again and applies it if it (or a certificate file it names)
    /// changed (SIGHUP, `POST /reload`); returns the generation in force after.
    pub async fn reload_from_file(&self) -> Result<u64, ProxyError> {
        if self.is_stopping() {
            // Said at once, even for an unchanged file: nothing will be applied now.
            return Err(not_while_stopping());
        }
        if self.inner.source.is_none() {
            return Err(ProxyError::NoConfigFile);
        }
        self.off_thread(move |p, ticket| {
            let read_at = SystemTime::now();
            let (src, hash) = p.read_file().map_err(|e| p.read_refused(e))?;
            if Some(hash) == *lock(&p.inner.applied) {
                // Nothing changed (the file watch may have applied it already): a no-op,
                // so a flood of reload requests costs a read and a hash each.
                let generation = p.generation();
                tracing::info!(
                    generation,
                    "reload asked for; the config and certificate files are unchanged"
                );
                p.back_in_force(read_at);
                return Ok(generation);
            }
            let result = p.parse(&src).and_then(|config| {
                let prepared = p.prepare(config, ticket)?;
                let _one_at_a_time = p.one_at_a_time();
                if Some(hash) == *lock(&p.inner.applied) {
                    // Another reload applied the same content meanwhile.
                    return Ok(p.generation());
                }
                match p.apply(prepared)? {
                    Some(generation) => {
                        p.now_in_force(hash);
                        Ok(generation)
                    }
                    None => Err(ProxyError::Superseded {
                        generation: p.generation(),
                    }),
                }
            });
            if let Err(e) = &result {
                p.remember_refused(e, hash);
            }
            result
        })
        .await
    }

    /// Remembers content refused for what its files say, so that the file watch, looking
    /// at the same content after a SIGHUP or `POST /reload` refused it, does not refuse it
    /// (and count it) a second time.
    fn remember_refused(&self, e: &ProxyError, hash: u64) {
        let not_the_files = matches!(
            e,
            ProxyError::Superseded { .. } | ProxyError::ShuttingDown | ProxyError::ReloadBusy(_)
        ) || crate::error::local_exhaustion(e);
        if !not_the_files {
            *lock(&self.inner.refused) = Some(hash);
        }
    }

    /// Applies the config file if its content differs from the last one applied (the file
    /// watch: an event alone proves nothing, and SIGHUP may have applied it already).
    /// A file that is missing for a moment (an editor saving) is not an error here, and a
    /// content already refused is not refused (and counted) again.
    ///
    /// With `settled`, a file modified less than that long ago is left for a later look:
    /// the periodic check has no event to debounce, and must not read a file half written.
    pub(crate) async fn reload_if_changed(
        &self,
        settled: Option<Duration>,
    ) -> Result<Option<u64>, ProxyError> {
        let Some(path) = self.inner.source.clone() else {
            return Err(ProxyError::NoConfigFile);
        };
        let work = self.off_thread(move |p, ticket| {
            if let Some(settled) = settled {
                let age = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                if age.is_some_and(|age| age < settled) {
                    return Ok(None);
                }
            }
            let read_at = SystemTime::now();
            let (src, hash) = match p.read_file() {
                Ok(pair) => {
                    *lock(&p.inner.read_error) = None;
                    pair
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::debug!(file = %path.display(), "config file missing for now; waiting for it");
                    return Ok(None);
                }
                Err(e) if crate::connector::is_local_exhaustion(&e) => {
                    // duplex is out of file descriptors, not the file at fault: the
                    // next event or periodic check looks again; nothing is refused.
                    tracing::warn!(file = %path.display(), error = %e, "cannot read the config file now; the watch will look again");
                    return Ok(None);
                }
                Err(e) if Some(e.kind()) == *lock(&p.inner.read_error) => {
                    // Refused, logged and counted already.
                    return Ok(None);
                }
                Err(source) => {
                    *lock(&p.inner.read_error) = Some(source.kind());
                    return Err(p.read_refused(source));
                }
            };
            if Some(hash) == *lock(&p.inner.applied) {
                p.back_in_force(read_at);
                return Ok(None);
            }
            if Some(hash) == *lock(&p.inner.refused) {
                return Ok(None);
            }
            let result = p.parse(&src).and_then(|config| {
                let prepared = p.prepare(config, ticket)?;
                let _one_at_a_time = p.one_at_a_time();
                if Some(hash) == *lock(&p.inner.applied) {
                    return Ok(None);
                }
                let applied = p.apply(prepared)?;
                if applied.is_some() {
                    p.now_in_force(hash);
                }
                Ok(applied)
            });
            // Refused for what the files say: not tried again until the content changes.
            if let Err(e) = &result {
                p.remember_refused(e, hash);
            }
            result
        });
        match work.await {
            // Reloads still reading files: this look is left for the next one.
            Err(ProxyError::ReloadBusy(_)) => Ok(None),
            other => other,
        }
    }

    /// Reads the config file and hashes it with the certificate files it names. On the
    /// blocking pool only: a file on a hung mount can take forever.
    fn read_file(&self) -> std::io::Result<(String, u64)> {
        let Some(path) = &self.inner.source else {
            return Err(std::io::Error::other(ProxyError::NoConfigFile));
        };
        let src = duplex_config::bounds::read_source(path)?;
        let hash = source_hash(&src, &path.display().to_string());
        Ok((src, hash))
    }

    /// Records a config file that could not be read as a refused reload.
    fn read_refused(&self, source: std::io::Error) -> ProxyError {
        let path = self.inner.source.clone().unwrap_or_default();
        self.refused(ProxyError::Config(ConfigError::Read { path, source }))
    }

    /// Parses the config file's content `src`.
    fn parse(&self, src: &str) -> Result<Config, ProxyError> {
        let file = self
            .inner
            .source
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string());
        Config::parse(src, &file).map_err(|e| self.refused(ProxyError::Config(e)))
    }

    /// Applies `config`; on error nothing changes and the error is counted and kept for
    /// the admin status. [`ProxyError::Superseded`] when a reload asked for later applied
    /// first (this one was slow to read its files), [`ProxyError::ReloadBusy`] when too
    /// many reloads are still reading files; neither is counted as refused.
    pub async fn reload(&self, config: Config) -> Result<u64, ProxyError> {
        self.off_thread(move |p, ticket| {
            let prepared = p.prepare(config, ticket)?;
            let _one_at_a_time = p.one_at_a_time();
            p.apply(prepared)?.ok_or_else(|| ProxyError::Superseded {
                generation: p.generation(),
            })
        })
        .await
    }

    /// Whether a reload is running now (reading files, or applying).
    pub fn reload_in_progress(&self) -> bool {
        self.inner.reloading.load(Ordering::SeqCst) > 0
    }

    /// What may be slow before a reload applies: the certificate, key and CA files its
    /// config names, and DNS names new to it (each bounded by 5 s). Done before the reload
    /// lock is taken, so a file on a hung mount holds up neither other reloads nor DNS
    /// changes. Runs on the blocking pool, where waiting is allowed.
    fn prepare(&self, config: Config, ticket: u64) -> Result<Prepared, ProxyError> {
        let tls = TlsSettings::read(&config).map_err(|e| self.refused(ProxyError::Tls(e)))?;
        let shared = &self.inner.shared;
        let dns = match tokio::runtime::Handle::try_current() {
            // Given up once shutdown begins (the reload will be refused): a lookup still
            // waiting when the runtime stops would find its timer gone.
            Ok(rt) => rt.block_on(async {
                tokio::select! {
                    answers = crate::discovery::resolve_new(shared, &config) => answers,
                    _ = shared.stopping.cancelled() => crate::discovery::NewAnswers::default(),
                }
            }),
            Err(_) => crate::discovery::NewAnswers::default(),
        };
        Ok(Prepared {
            config,
            tls,
            dns,
            ticket,
        })
    }

    /// Takes the reload lock, from the blocking pool: reloads apply one at a time.
    fn one_at_a_time(&self) -> OwnedMutexGuard<()> {
        Arc::clone(&self.inner.reload).blocking_lock_owned()
    }

    /// Runs a reload's work on the blocking pool: it reads and parses certificate and key
    /// files and builds the whole table, which must not hold up the connections served
    /// on a runtime thread (with `--threads 1`, all of them) for as long as a slow disk
    /// takes. The work runs to its end even if the caller is dropped meanwhile (an admin
    /// client that hangs up), and counts as in progress until then.
    async fn off_thread<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Proxy, u64) -> Result<T, ProxyError> + Send + 'static,
    ) -> Result<T, ProxyError> {
        let Ok(reader) = Arc::clone(&self.inner.readers).try_acquire_owned() else {
            tracing::warn!(
                readers = MAX_READERS,
                "reload not started: earlier ones are still reading their files"
            );
            return Err(ProxyError::ReloadBusy(MAX_READERS));
        };
        let ticket = self.inner.reload_tickets.fetch_add(1, Ordering::SeqCst) + 1;
        /// Counts a reload as under way while it lives (a panic included).
        struct Underway(Proxy);
        impl Drop for Underway {
            fn drop(&mut self) {
                self.0.inner.reloading.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.inner.reloading.fetch_add(1, Ordering::SeqCst);
        let underway = Underway(self.clone());
        let run = move || {
            let _reader = reader;
            work(&underway.0, ticket)
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(result) => result,
            Err(e) => Err(self.refused(ProxyError::ReloadAborted(e))),
        }
    }

    /// The reload itself; the caller holds the reload lock. `None` when a reload asked for
    /// later is in force already, and this one is not applied.
    fn apply(&self, prepared: Prepared) -> Result<Option<u64>, ProxyError> {
        let Prepared {
            config,
            tls,
            dns,
            ticket,
        } = prepared;
        let shared = &self.inner.shared;
        if shared.stopping.is_cancelled() {
            // Listeners bound now would never accept: clients would wait on them unanswered
            // instead of being refused and trying elsewhere.
            return Err(not_while_stopping());
        }
        if ticket < self.inner.reload_in_force.load(Ordering::SeqCst) {
            // A reload asked for later applied first (this one was slow to read its
            // files): the later one stands.
            let generation = self.generation();
            tracing::info!(
                generation,
                "a reload asked for later is already in force; this one is not applied"
            );
            return Ok(None);
        }
        let old = shared.table.load_full();
        if config.admin != old.config.admin && self.inner.admin_moves_to(config.admin.bind) {
            tracing::warn!("admin.bind changed: the admin listener moves only on restart");
        }
        if config.reuse_port != old.config.reuse_port {
            tracing::warn!(
                reuse_port = config.reuse_port,
                "reuse_port changed: it applies to listeners bound from now on; the open ones and the admin listener keep their sockets until a restart"
            );
        }

        // A listener is known by name and configured address: an unchanged one is never
        // rebound; a renamed one keeps its socket; only new addresses are bound, and a bind
        // failure refuses the reload before anything changed.
        let (bound, to_stop) = {
            let handles = lock(&self.inner.listeners);
            let same = |h: &ListenerHandle, l: &Listener| h.name == l.name && h.bind == l.bind;
            let kept = |h: &ListenerHandle| config.listeners.iter().any(|l| same(h, l));
            let mut reuse = Vec::new();
            let mut fresh = Vec::new();
            for l in &config.listeners {
                if handles.iter().any(|h| same(h, l)) {
                    continue;
                }
                let renamed = handles
                    .iter()
                    .find(|h| l.bind.port() != 0 && h.bind == l.bind && !kept(h));
                match renamed {
                    Some(h) => reuse.push(Bound {
                        name: l.name.clone(),
                        bind: l.bind,
                        listener: Arc::clone(&h.listener),
                        open: Arc::clone(&h.open),
                    }),
                    None => fresh.push(l),
                }
            }
            let stop: Vec<CancellationToken> = handles
                .iter()
                .filter(|h| !kept(h))
                .map(|h| h.stop.clone())
                .collect();
            // A listener that keeps its name on a new address keeps its count: its
            // connections on the old socket still hold places under its cap.
            let carried = bind_all(fresh, config.reuse_port).map(|mut bound| {
                for b in &mut bound {
                    if let Some(h) = handles.iter().find(|h| h.name == b.name) {
                        b.open = Arc::clone(&h.open);
                    }
                }
                (reuse, bound)
            });
            (carried, stop)
        };
        let (reuse, fresh) = bound.map_err(|e| self.refused(e))?;

        let diff = Diff::between(&old.config, &config);
        if diff.settings.iter().any(|s| s == "max_connections") {
            crate::limits::check_against_open_files(config.max_connections);
        }
        // Under the lock: an install in between (a DNS change) keeps only the names its
        // own config has, and would have dropped these.
        crate::discovery::adopt(shared, &dns);
        let generation = old.generation + 1;
        let table = Table::build(Arc::new(config), generation, &shared.carry(Some(&old)), tls);
        let table = Arc::new(table);
        self.install(&old, Arc::clone(&table));
        self.inner.reload_in_force.store(ticket, Ordering::SeqCst);

        for t in &to_stop {
            t.cancel();
        }
        lock(&self.inner.listeners).retain(|h| {
            if h.stop.is_cancelled() {
                tracing::info!(listener = %h.name, addr = %h.addr, "listener removed: stops accepting; its open connections stay");
            }
            !h.stop.is_cancelled()
        });
        self.start_accepting(reuse.into_iter().chain(fresh).collect());

        let m = &shared.metrics;
        m.config_reloads.with_label_values(&["ok"]).inc();
        m.config_generation.set(generation as i64);
        m.config_last_reload_success.set(unix_now());
        *lock(&self.inner.status) = ReloadStatus::started();
        tracing::info!(generation, changes = %diff, "configuration reloaded");
        // Said again when what it is about changed, not at every certificate renewal.
        if table.config.upstreams != old.config.upstreams {
            crate::server::log_advice(&table.config);
        }
        Ok(Some(generation))
    }

    /// Puts `table` in force after `old`: one store, then drains for the backends it lost,
    /// and the health checks and DNS watches of the new generation.
    fn install(&self, old: &Table, table: Arc<Table>) {
        let shared = &self.inner.shared;
        shared.table.store(Arc::clone(&table));
        // Keep-alive connections to a backend taken out close now, not when idle: each
        // pool learns its upstream's backends. (A pool not carried over goes, with its
        // idle connections, when the last request on the old table ends.)
        for up in table.upstreams.values() {
            up.http
                .set_backends(up.pool.backends().iter().map(|b| b.state.addr));
        }
        shared.apply_caps();
        // Forget DNS answers for names the config no longer has.
        let named = |(upstream, host, port): &crate::discovery::Key| {
            table.config.upstream(upstream).is_some_and(|u| {
                u.discovered
                    .iter()
                    .any(|d| &d.host == host && d.port == *port)
            })
        };
        lock(&shared.resolved).retain(|k, _| named(k));
        lock(&shared.looked_up).retain(|k, _| named(k));
        drain_removed(shared, old, &table);
        table.export_backends(&shared.metrics);
        let checks = crate::health::spawn_checks(shared, &table);
        std::mem::replace(&mut *lock(&self.inner.health), checks).cancel();
        if table.config.upstreams != old.config.upstreams {
            let dns = crate::discovery::spawn(self, &table);
            std::mem::replace(&mut *lock(&self.inner.discovery), dns).cancel();
        }
    }

    /// Rebuilds the table in force after DNS discovery found other addresses.
    pub(crate) async fn rediscover(&self) {
        let _one_at_a_time = self.inner.reload.lock().await;
        // Building a table takes time in proportion to the backends (and a hash ring's
        // points): not on a runtime thread, which with `--threads 1` serves everything.
        let p = self.clone();
        let built = tokio::task::spawn_blocking(move || {
            let shared = &p.inner.shared;
            let old = shared.table.load_full();
            // A DNS change is not a reload: the TLS settings in force stay, rather than the
            // certificate files being read again (they may be mid-rotation, or gone).
            let table = Table::build(
                Arc::clone(&old.config),
                old.generation,
                &shared.carry(Some(&old)),
                TlsSettings::of(&old),
            );
            p.install(&old, Arc::new(table));
        })
        .await;
        if let Err(e) = built {
            tracing::error!(error = %e, "applying a DNS change failed; the backends in force stay");
        }
    }

    /// Records `hash` as the content in force; a content refused earlier is forgotten,
    /// so that it is refused (and said) again if it comes back.
    fn now_in_force(&self, hash: u64) {
        *lock(&self.inner.applied) = Some(hash);
        *lock(&self.inner.refused) = None;
    }

    /// The files read at `read_at` are those of the configuration in force: a refusal
    /// shown in `/status` is over (an edit that was refused has been undone), unless it
    /// came after that read (a newer edit, refused meanwhile, is still on disk).
    fn back_in_force(&self, read_at: SystemTime) {
        // A content refused before may come back after this one: it is refused again,
        // not skipped as if still on disk.
        *lock(&self.inner.refused) = None;
        let mut status = lock(&self.inner.status);
        if status.error.is_some() && status.at <= read_at {
            tracing::info!(
                generation = self.generation(),
                "the files are back to the configuration in force; the last refusal is cleared"
            );
            *status = ReloadStatus::started();
        }
    }

    /// Records a refused reload (counted, logged, shown in `/status`) and hands the error
    /// back.
    fn refused(&self, e: ProxyError) -> ProxyError {
        if crate::error::local_exhaustion(&e) {
            // duplex is out of file descriptors (reading a certificate, binding a new
            // listener), not the files at fault: not counted or shown as a refusal.
            tracing::warn!(error = %e, "reload not applied: duplex is out of file descriptors; the running configuration stays");
            return e;
        }
        self.inner
            .shared
            .metrics
            .config_reloads
            .with_label_values(&["error"])
            .inc();
        tracing::error!(error = %e, "reload refused; the running configuration stays");
        *lock(&self.inner.status) = ReloadStatus {
            at: SystemTime::now(),
            error: Some(e.to_string()),
        };
        e
    }

    /// The directories whose changes may change the config: the config file's, and those
    /// of every certificate, key and CA file it names.
    pub fn watched_dirs(&self) -> Vec<std::path::PathBuf> {
        let parent = |p: &std::path::Path| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let mut dirs: Vec<_> = self.inner.source.iter().map(|p| parent(p)).collect();
        let table = self.inner.shared.table.load();
        dirs.extend(table.config.tls_files().into_iter().map(parent));
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// How the last reload went.
    pub fn last_reload(&self) -> ReloadStatus {
        lock(&self.inner.status).clone()
    }
}

/// Identifies a config file's content, to tell a real change from a touch.
/// The content of the certificate and key files the config names counts too, so that a
/// renewed certificate reloads like an edited config.
pub(crate) fn source_hash(src: &str, file: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    src.hash(&mut h);
    if let Ok(config) = Config::parse(src, file) {
        for path in config.tls_files() {
            duplex_config::bounds::read_tls_file(path).ok().hash(&mut h);
        }
    }
    h.finish()
}

/// For every backend in `old` but not in `new`: no new connections (the new table lacks
/// it); its tunnels stay until they end or its upstream's `drain_timeout` (as `new` has
/// it, or as `old` had it for a removed upstream) passes, then are
/// closed, and its metric series go. A reload that brings it back ends the drain.
fn drain_removed(shared: &Arc<Shared>, old: &Table, new: &Table) {
    for (name, up) in &old.upstreams {
        let kept = new.upstreams.get(name);
        for b in up.pool.backends() {
            let addr = b.state.addr;
            if kept.is_some_and(|k| k.closers.contains_key(&addr)) {
                continue;
            }
            // No longer a configured backend: its up/down series goes now (a draining
            // backend is not "down", and must not page anyone); its tunnel series stay
            // until the drain ends.
            let _ = shared
                .metrics
                .backend_up
                .remove_label_values(&[name, &addr.to_string()]);
            let Some(closer) = up.closers.get(&addr) else {
                continue;
            };
            // Each drain has its own id: a backend removed, added back and removed again
            // gets a new drain, and the first one must not act on it.
            let id = NEXT_DRAIN.fetch_add(1, Ordering::Relaxed);
            let entry = Draining {
                id,
                state: Arc::clone(&b.state),
                closer: Arc::clone(closer),
                since: Instant::now(),
            };
            lock(&shared.draining).insert((name.clone(), addr), entry);
            // The reload's own value where its upstream stays: an operator who shortens
            // drain_timeout in the edit that removes a backend means it for this drain.
            let timeout = kept.map_or(up.cfg.drain_timeout, |k| k.cfg.drain_timeout);
            tokio::spawn(drain(
                Arc::clone(shared),
                id,
                Arc::clone(&b.state),
                timeout,
                name.clone(),
            ));
        }
    }
}

/// Whether `state` is still the draining entry for its key (a reload may have taken it back).
fn still_draining(shared: &Shared, key: &(String, SocketAddr), id: u64) -> bool {
    lock(&shared.draining).get(key).is_some_and(|d| d.id == id)
}

/// Numbers drains, so that each task acts on its own only.
static NEXT_DRAIN: AtomicU64 = AtomicU64::new(0);

async fn drain(
    shared: Arc<Shared>,
    id: u64,
    state: Arc<BackendState>,
    timeout: Duration,
    upstream: String,
) {
    let addr = state.addr;
    let key = (upstream.clone(), addr);
    tracing::info!(%upstream, backend = %addr, tunnels = state.tunnels(), ?timeout, "backend removed: draining");
    let deadline = tokio::time::Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(far_future);
    while state.load() > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_POLL.min(deadline - tokio::time::Instant::now())) => {}
            _ = shared.closing.cancelled() => break,
        }
        if !still_draining(&shared, &key, id) {
            tracing::info!(%upstream, backend = %addr, "backend added back: drain ended");
            return;
        }
    }
    let Some(entry) = ({
        let mut map = lock(&shared.draining);
        let entry = match map.get(&key) {
            Some(d) if d.id == id => map.remove(&key),
            _ => None,
        };
        // Kept a while: a table naming it again soon takes its health back. Under the
        // draining lock (the order a table's build takes them in), so that no build finds
        // it in neither.
        if let Some(e) = &entry {
            let now = std::time::Instant::now();
            lock(&shared.retired).keep(&upstream, Arc::clone(&e.state), now);
        }
        entry
    }) else {
        return;
    };
    if state.load() > 0 {
        tracing::info!(%upstream, backend = %addr, open = state.load(), "drain timeout: closing the backend's tunnels");
    } else {
        tracing::info!(%upstream, backend = %addr, "backend drained");
    }
    // Retired, not renewed: a handshake still in flight on the old table gets a closed token.
    entry.closer.retire();
    // Unless a reload has the backend back already. Whatever still runs on an old table
    // may bring some back; the backend's `Closer` forgets them again when the last table
    // holding it goes.
    shared.owners.forget_if_sole(entry.closer);
}

/// A reload asked for once shutdown has begun, by any trigger alike: not applied, and
/// logged, but not counted or shown as a refused file (the files are not at fault).
fn not_while_stopping() -> ProxyError {
    tracing::warn!("reload not applied: duplex is shutting down");
    ProxyError::ShuttingDown
}
