//! Starts and stops the proxy: binds listeners, runs accept loops, drains at shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use duplex_config::{Config, Listener};
use duplex_metrics::{Hold, Metrics, Scope};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::discovery::{Resolver, SystemResolver};
use crate::error::ProxyError;
use crate::limits::Cap;
use crate::reload::{source_hash, ReloadStatus};
use crate::state::{Shared, Table};
use crate::{admin, conn};

/// Pending connections the kernel queues per listener before accept.
const LISTEN_BACKLOG: u32 = 4096;
/// Accept-error backoff: first pause, and the cap it doubles up to.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one "max_connections reached" warning per listener this often.
const LIMIT_WARN_EVERY: Duration = Duration::from_secs(10);
/// After the grace period, how long to wait for closed tasks to wind down.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How long shutdown waits for a reload that is applying (not reading files) to finish.
const STOP_LOCK_WAIT: Duration = Duration::from_secs(5);

/// A running proxy; cheap to clone, every clone controls the same proxy.
#[derive(Clone)]
pub struct Proxy {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub shared: Arc<Shared>,
    /// Where the admin listener is bound (the port the OS chose, for port 0).
    pub admin: SocketAddr,
    /// `admin.bind` as configured at start: a reload that changes it applies only on
    /// restart, which `/status` says.
    pub admin_bind: SocketAddr,
    /// The file the config came from, read again by reloads; `None` for a built config.
    pub source: Option<PathBuf>,
    /// Listeners accepting now. Only start, reload and status touch it.
    pub listeners: Mutex<Vec<ListenerHandle>>,
    /// Held while a reload runs, so reloads from the file watch, SIGHUP, the admin
    /// endpoint and DNS discovery apply one at a time. Owned guards: a reload's work on
    /// the blocking pool keeps holding it even if whoever asked has gone away.
    pub reload: Arc<tokio::sync::Mutex<()>>,
    /// Set the moment shutdown is asked for, before it waits for a reload being applied
    /// (`Shared::stopping` comes after that): `/readyz` and new reloads answer from it.
    pub leaving: std::sync::atomic::AtomicBool,
    /// Reloads under way, from their start (reading files, resolving new names) to their
    /// end, for the admin status.
    pub reloading: std::sync::atomic::AtomicUsize,
    /// Reloads asked for so far: each takes the next number when asked for, so that one
    /// slow to read its files cannot apply over a later one that applied first.
    pub reload_tickets: std::sync::atomic::AtomicU64,
    /// The number of the reload in force (under the reload lock).
    pub reload_in_force: std::sync::atomic::AtomicU64,
    /// The last reload's outcome, for the admin status.
    pub status: Mutex<ReloadStatus>,
    /// Hash of the config file content in force, so the file watch skips what is applied.
    pub applied: Mutex<Option<u64>>,
    /// Hash of the last content the file watch saw refused, so it is not refused again.
    pub refused: Mutex<Option<u64>>,
    /// The last error the file watch met reading the file, so it is not counted again
    /// every time it looks.
    pub read_error: Mutex<Option<std::io::ErrorKind>>,
    /// Places for reloads reading files at once: a file on a hung mount keeps each
    /// reader's blocking thread forever, and repeated reloads must not pile them up.
    pub readers: Arc<tokio::sync::Semaphore>,
    /// Stops the active health checks of the generation in force.
    pub health: Mutex<CancellationToken>,
    /// Stops the DNS watches of the generation in force.
    pub discovery: Mutex<CancellationToken>,
}

impl Inner {
    /// Whether a configured `admin.bind` differs from the admin listener in force: neither
    /// the address it was started with nor the one it got (a port 0 reloaded as the port
    /// the OS chose is the same listener).
    pub fn admin_moves_to(&self, bind: SocketAddr) -> bool {
        bind != self.admin_bind && bind != self.admin
    }
}

/// One bound, accepting listener.
pub(crate) struct ListenerHandle {
    pub name: String,
    /// As configured (may have port 0): a reload compares this, not the bound address.
    pub bind: SocketAddr,
    pub addr: SocketAddr,
    /// Shared with the accept loop, so that a renamed listener keeps its socket.
    pub listener: Arc<TcpListener>,
    /// Connections open on it, counted against its `max_connections`; kept by a rename.
    pub open: Arc<AtomicUsize>,
    /// Stops this listener's accept loop (a child of `Shared::stopping`).
    pub stop: CancellationToken,
}

/// Binds a listening socket with address reuse (and port reuse, when `reuse_port`), a deep
/// backlog, and the options its accepted sockets inherit (see
/// [`crate::connector::tune_listener`]).
pub(crate) fn bind(
    name: &str,
    addr: SocketAddr,
    reuse_port: bool,
) -> Result<TcpListener, ProxyError> {
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
    if reuse_port {
        if taken(addr) {
            tracing::warn!(listener = name, %addr, "another process already listens here (reuse_port): the two take connections in turn until one stops; expected while a new duplex takes over, a mistake otherwise");
        }
        set_reuse_port(&sock).map_err(err)?;
    }
    // `[::]` takes IPv4 clients too, on every host, not only where the kernel's
    // `net.ipv6.bindv6only` is 0: `duplex check` counts on it to find overlapping binds.
    if let IpAddr::V6(ip) = addr.ip() {
        if ip.is_unspecified() {
            if let Err(e) = socket2::SockRef::from(&sock).set_only_v6(false) {
                tracing::warn!(listener = name, error = %e, "cannot make the [::] listener take IPv4 too; it takes what the system's default allows");
            }
        }
    }
    // Without these, accepted sockets lack TCP_NODELAY and keepalive: worse, not broken.
    if let Err(e) = crate::connector::tune_listener(&sock) {
        tracing::warn!(listener = name, error = %e, "cannot set TCP_NODELAY and keepalive on the listening socket");
    }
    sock.bind(addr).map_err(err)?;
    sock.listen(LISTEN_BACKLOG).map_err(err)
}

/// Whether a socket already listens on `addr`, as a bind without port reuse finds.
fn taken(addr: SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    let probe = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    probe.is_ok_and(|p| {
        let _ = p.set_reuseaddr(true);
        if addr.ip().is_unspecified() && addr.is_ipv6() {
            // As the listener will be: taking IPv4 too, so an old `0.0.0.0` is seen.
            let _ = socket2::SockRef::from(&p).set_only_v6(false);
        }
        p.bind(addr)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
    })
}

/// `SO_REUSEPORT`, where the platform has it; elsewhere an error that names the setting.
#[cfg(all(
    unix,
    not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
))]
fn set_reuse_port(sock: &TcpSocket) -> std::io::Result<()> {
    sock.set_reuseport(true)
}

#[cfg(not(all(
    unix,
    not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
)))]
fn set_reuse_port(_: &TcpSocket) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "reuse_port: SO_REUSEPORT is not available on this platform",
    ))
}

/// Logs what [`duplex_config::advice`] says of a configuration put in force.
pub(crate) fn log_advice(config: &Config) {
    for a in duplex_config::advice(config) {
        tracing::warn!(upstream = %a.upstream, advice = %a.message, "configuration advice");
    }
}

/// A listener bound but not yet accepting.
pub(crate) struct Bound {
    pub name: String,
    pub bind: SocketAddr,
    pub listener: Arc<TcpListener>,
    pub open: Arc<AtomicUsize>,
}

pub(crate) fn bind_all<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
    reuse_port: bool,
) -> Result<Vec<Bound>, ProxyError> {
    listeners
        .into_iter()
        .map(|l| {
            Ok(Bound {
                name: l.name.clone(),
                bind: l.bind,
                listener: Arc::new(bind(&l.name, l.bind, reuse_port)?),
                open: Arc::default(),
            })
        })
        .collect()
}

impl Proxy {
    /// Binds every listener and the admin endpoint, then starts serving. Nothing is
    /// served unless everything binds. `source` is the file reloads read again.
    pub async fn start(
        config: Config,
        source: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<Proxy, ProxyError> {
        Proxy::start_with_resolver(config, source, metrics, Arc::new(SystemResolver)).await
    }

    /// As [`Proxy::start`], with the resolver DNS discovery uses.
    pub async fn start_with_resolver(
        config: Config,
        source: Option<PathBuf>,
        metrics: Arc<Metrics>,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Proxy, ProxyError> {
        let applied = source.as_ref().and_then(|p| {
            let src = duplex_config::bounds::read_source(p).ok()?;
            Some(source_hash(&src, &p.display().to_string()))
        });
        // Certificates first: an operator fixing a refused start sees every config
        // error before a port clash.
        let tls = crate::state::TlsSettings::read(&config)?;
        let bound = bind_all(&config.listeners, config.reuse_port)?;
        // Whether the admin socket is shared with another process on the same port.
        let shared_port = config.reuse_port;
        let admin_bind = |source| ProxyError::AdminBind {
            addr: config.admin.bind,
            source,
        };
        let admin_listener =
            bind("admin", config.admin.bind, config.reuse_port).map_err(|e| match e {
                ProxyError::Bind { source, .. } => admin_bind(source),
                other => other,
            })?;
        let admin = admin_listener.local_addr().map_err(admin_bind)?;
        let admin_bind = config.admin.bind;
        metrics.config_generation.set(1);
        // Both results exist from the start, so that rate() and increase() see the first one.
        for result in ["ok", "error"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        metrics.config_last_reload_success.set(unix_now());
        let shared = Arc::new(Shared::new(&config, metrics, resolver));
        // Held until the first table holds them: see `duplex_metrics::Scope`.
        // Every name side by side, each bounded: a dead resolver costs one timeout, not
        // one per name, before the proxy serves.
        let dns = crate::discovery::resolve_new(&shared, &config).await;
        crate::discovery::adopt(&shared, &dns);
        let table = Table::build(Arc::new(config), 1, &shared.carry(None), tls);
        table.export_backends(&shared.metrics);
        shared.table.store(Arc::new(table));
        shared.apply_caps();
        crate::limits::check_against_open_files(shared.table.load().config.max_connections);
        match shared.table.load().config.max_connections {
            Some(max) => tracing::info!(max, "connection cap: max_connections"),
            None => match crate::limits::default_max() {
                usize::MAX => tracing::info!("no connection cap: the open-file limit is unknown"),
                max => tracing::info!(max, "connection cap: from the open-file limit"),
            },
        }
        log_advice(&shared.table.load().config);
        let health = crate::health::spawn_checks(&shared, &shared.table.load());
        tokio::spawn(sweep_series(
            Arc::clone(&shared.metrics),
            shared.stopping.clone(),
        ));
        let proxy = Proxy {
            inner: Arc::new(Inner {
                shared,
                admin,
                admin_bind,
                source,
                listeners: Mutex::new(Vec::new()),
                reload: Arc::new(tokio::sync::Mutex::new(())),
                leaving: std::sync::atomic::AtomicBool::new(false),
                reloading: std::sync::atomic::AtomicUsize::new(0),
                reload_tickets: std::sync::atomic::AtomicU64::new(0),
                reload_in_force: std::sync::atomic::AtomicU64::new(0),
                status: Mutex::new(ReloadStatus::started()),
                applied: Mutex::new(applied),
                refused: Mutex::new(None),
                read_error: Mutex::new(None),
                readers: Arc::new(tokio::sync::Semaphore::new(crate::reload::MAX_READERS)),
                health: Mutex::new(health),
                discovery: Mutex::new(CancellationToken::new()),
            }),
        };
        *lock(&proxy.inner.discovery) =
            crate::discovery::spawn(&proxy, &proxy.inner.shared.table.load());
        proxy.start_accepting(bound);
        tracing::info!(addr = %admin, "admin listening");
        tokio::spawn(admin::serve(admin_listener, proxy.clone(), shared_port));
        Ok(proxy)
    }

    /// Starts an accept loop for each bound listener and records it.
    pub(crate) fn start_accepting(&self, bound: Vec<Bound>) {
        let shared = &self.inner.shared;
        let mut handles = lock(&self.inner.listeners);
        // Shutdown cancels `stopping` before it takes this lock to close the listeners:
        // seen here, the sockets just bound are closed rather than kept unserved.
        if shared.stopping.is_cancelled() {
            return;
        }
        for b in bound {
            let addr = b.listener.local_addr().unwrap_or(b.bind);
            let stop = shared.stopping.child_token();
            tracing::info!(listener = %b.name, %addr, "listening");
            let name: Arc<str> = b.name.as_str().into();
            // Taken now: the loop's series stay while it runs, even once a reload has
            // removed its listener (and are not resolved again after they went).
            let hold = shared.metrics.hold(Scope::Listener(b.name.clone()));
            // At 0 before the loop runs: a scrape right after start sees them, and
            // increase() sees the first wait too (an alert on it would otherwise miss a
            // listener that hits its cap once and stays there).
            let m = &shared.metrics;
            m.connections_accepted.with_label_values(&[&b.name]);
            m.accept_errors.with_label_values(&[&b.name]);
            for cap in [Cap::Global, Cap::Listener] {
                m.connection_limit_waits
                    .with_label_values(&[&b.name, cap.label()]);
            }
            tokio::spawn(accept_loop(
                hold,
                Arc::clone(&b.listener),
                Arc::clone(&b.open),
                name,
                b.bind,
                Arc::clone(shared),
                stop.clone(),
            ));
            handles.push(ListenerHandle {
                name: b.name,
                bind: b.bind,
                addr,
                listener: b.listener,
                open: b.open,
                stop,
            });
        }
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        let handles = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        handles.iter().find(|h| h.name == name).map(|h| h.addr)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.inner.admin
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.shared.metrics
    }

    /// Client connections accepted so far, over every listener: a measure of churn.
    pub fn connections_accepted(&self) -> u64 {
        self.inner.shared.metrics.connections_accepted_total()
    }

    /// Client connections open now, over every listener.
    pub fn connections_open(&self) -> usize {
        self.inner.shared.limits.open()
    }

    /// The generation of the config in force: 1 at start, one more per applied reload.
    pub fn generation(&self) -> u64 {
        self.inner.shared.table.load().generation
    }

    /// Stops accepting, lets requests and tunnels finish for up to `grace`, closes the
    /// rest, and returns once every tracked task has ended (or a short bound has passed).
    pub async fn shutdown(&self, grace: Duration) {
        let s = &self.inner.shared;
        self.inner.leaving.store(true, Ordering::SeqCst);
        {
            // A reload applying now finishes first (applying is quick: its files were read
            // before it took the lock), so none is half applied when `stopping` is set,
            // and every later one sees it. Bounded all the same.
            let _applying = tokio::time::timeout(STOP_LOCK_WAIT, self.inner.reload.lock()).await;
            s.stopping.cancel();
        }
        s.limits.idle.close_all();
        // Close the listening sockets (the accept loops hold the other references).
        lock(&self.inner.listeners).clear();
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

    /// The `shutdown_timeout` of the config in force.
    pub fn shutdown_timeout(&self) -> Duration {
        self.inner.shared.table.load().config.shutdown_timeout
    }

    /// Closes every connection and tunnel now, without waiting for the grace period.
    pub async fn close_now(&self) {
        let s = &self.inner.shared;
        self.inner.leaving.store(true, Ordering::SeqCst);
        s.stopping.cancel();
        s.limits.idle.close_all();
        lock(&self.inner.listeners).clear();
        s.tracker.close();
        s.closing.cancel();
        let _ = tokio::time::timeout(CLOSE_WAIT, s.tracker.wait()).await;
    }

    /// Whether shutdown has been asked for (it may still be waiting for a reload being
    /// applied to finish).
    pub fn is_stopping(&self) -> bool {
        self.inner.leaving.load(Ordering::SeqCst)
    }
}

/// Locks a mutex that guards plain data: a panic elsewhere cannot leave it inconsistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// How often the series of names nothing uses any more are removed, for when no scrape
/// (which removes them first) comes: see `duplex_metrics::Scope`.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Removes unused series every [`SWEEP_EVERY`] until shutdown, on the blocking pool (it
/// reads every series of the families concerned).
async fn sweep_series(metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let m = Arc::clone(&metrics);
        let _ = tokio::task::spawn_blocking(move || m.sweep()).await;
    }
}

/// Resolves once a client held at a cap has closed its side or reset: it gave up
/// waiting. Never while it is there, quiet or sending.
async fn gone(tcp: &TcpStream) {
    let mut byte = [0u8; 1];
    if let Ok(1..) = tcp.peek(&mut byte).await {
        std::future::pending::<()>().await;
    }
}

/// Accepts until stopped. At a `max_connections` cap the loop holds the connection it
/// accepted last until there is room (see [`crate::limits`]). Errors (EMFILE, ENFILE,
/// ECONNABORTED...) are logged, counted and backed off, never fatal and never a busy loop.
async fn accept_loop(
    _hold: Hold,
    listener: Arc<TcpListener>,
    open: Arc<AtomicUsize>,
    name: Arc<str>,
    bind: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let accepted = shared
        .metrics
        .connections_accepted
        .with_label_values(&[&name]);
    let errors = shared.metrics.accept_errors.with_label_values(&[&name]);
    let mut backoff = ACCEPT_BACKOFF_START;
    let mut warned: Option<Instant> = None;
    let mut full = |cap: Cap| {
        shared
            .metrics
            .connection_limit_waits
            .with_label_values(&[&name, cap.label()])
            .inc();
        if warned.is_none_or(|t| t.elapsed() >= LIMIT_WARN_EVERY) {
            warned = Some(Instant::now());
            let (global, own) = shared.caps(&name, bind);
            let max = if cap == Cap::Global { global } else { own };
            tracing::warn!(listener = %name, limit = cap.label(), max, "max_connections reached: not accepting until a connection closes (idle keep-alive connections are closed to make room); new ones wait in the listen backlog");
        }
    };
    let caps = || shared.caps(&name, bind);
    let limits = &shared.limits;
    loop {
        let res = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match res {
            Ok((tcp, mut peer)) => {
                // On a dual-stack `[::]` listener an IPv4 client comes as `::ffff:a.b.c.d`;
                // logs, headers and hashing all see it as the IPv4 address it is.
                peer.set_ip(peer.ip().to_canonical());
                backoff = ACCEPT_BACKOFF_START;
                accepted.inc();
                // At a cap the connection waits here, unanswered, and the next ones in
                // the backlog. A reload that stops this loop meanwhile (a renamed
                // listener) closes this one connection unanswered; its client may retry.
                // A client that gives up waiting is let go, and the next one taken.
                let stop_or_gone = async {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = gone(&tcp) => {}
                    }
                };
                let admitted = limits.admit(&open, &caps, &mut full, stop_or_gone);
                let Some(slot) = admitted.await else {
                    if stop.is_cancelled() {
                        break;
                    }
                    tracing::debug!(listener = %name, %peer, "a client held at a connection cap went away");
                    continue;
                };
                shared.tracker.spawn(conn::serve(
                    tcp,
                    slot,
                    peer,
                    Arc::clone(&name),
                    bind,
                    Arc::clone(&shared),
                ));
            }
            Err(e) => {
                errors.inc();
                tracing::warn!(listener = %name, error = %e, pause = ?backoff, "accept failed; pausing");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    tracing::info!(listener = %name, "stopped accepting");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While a reload is being applied, shutdown waits for it, but `/readyz` (and any new
    /// reload) must see at once that the proxy is leaving, so that a load balancer stops
    /// sending it clients.
    #[tokio::test]
    async fn stopping_shows_while_a_reload_is_applied() {
        let text = "admin:\n  bind: 127.0.0.1:0\nlisteners:\n  - name: l\n    bind: 127.0.0.1:0\n\
                    upstreams:\n  - name: u\n    backends:\n      - addr: 127.0.0.1:9\n";
        let config = Config::parse(text, "t.yaml").expect("valid");
        let proxy = Proxy::start(config, None, Arc::new(Metrics::new()))
            .await
            .expect("starts");
        let applying = Arc::clone(&proxy.inner.reload).lock_owned().await;
        let stop = tokio::spawn({
            let proxy = proxy.clone();
            async move { proxy.shutdown(Duration::from_secs(1)).await }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proxy.is_stopping() {
            assert!(Instant::now() < deadline, "not seen as stopping");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The reload being applied has not been cut short: shutdown is still waiting.
        assert!(!proxy.inner.shared.stopping.is_cancelled());
        assert!(matches!(
            proxy.reload_from_file().await,
            Err(ProxyError::ShuttingDown)
        ));
        drop(applying);
        tokio::time::timeout(Duration::from_secs(5), stop)
            .await
            .expect("shutdown ends")
            .expect("shutdown task");
        assert!(proxy.inner.shared.stopping.is_cancelled());
    }
}
