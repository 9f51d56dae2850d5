//! What makes the proxy reload besides `POST /reload`: a change of the config file or of a
//! certificate file it names, and SIGHUP.
//!
//! For the file, the parent directory is watched, not the file: editors replace a file by writing a new
//! one and renaming it over the old, and Kubernetes ConfigMap volumes swap a `..data`
//! symlink; a watch on the old inode would miss both. Any event in the directory starts a
//! short quiet period (debounce); then the file is read, and only a content that differs
//! from the one in force reloads. Every 30 s the file is read and hashed anyway, for the
//! changes no event reports.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::Proxy;

/// Quiet time after the last event before the file is read.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// The longest a burst of events can delay a reload.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// How often the set of watched directories is brought up to date with the config, and
/// the file compared with the content in force without an event.
const RESYNC: Duration = Duration::from_secs(30);
/// The periodic comparison leaves alone a file modified less than this long ago: it may
/// be half written, and its events will bring it in once done.
const SETTLED: Duration = Duration::from_secs(2);

/// How long the watch waits for a reload it started before going back to its events:
/// a read stuck on a hung mount (or a FIFO) must not stop it from seeing a later change.
/// The stuck reload goes on in the background, and is not applied if a later one was.
const WATCH_WAIT: Duration = Duration::from_secs(10);

/// Reloads started by the watch that may still be reading at once: the rest of the
/// reload slots stay free for SIGHUP and `POST /reload`.
const WATCH_READERS: usize = 2;

/// One reload by the watch (`settled` as in [`Proxy::reload_if_changed`]): the new
/// generation if one applied within [`WATCH_WAIT`]. `reading` counts the watch's reloads
/// still under way, stuck ones included.
async fn watch_reload(
    proxy: &Proxy,
    settled: Option<Duration>,
    reading: &Arc<AtomicUsize>,
) -> Option<u64> {
    if reading.load(Ordering::Acquire) >= WATCH_READERS {
        tracing::debug!("the file watch's earlier reloads are still reading; this look is skipped");
        return None;
    }
    reading.fetch_add(1, Ordering::AcqRel);
    let (p, count) = (proxy.clone(), Arc::clone(reading));
    let reload = tokio::spawn(async move {
        let done = p.reload_if_changed(settled).await;
        count.fetch_sub(1, Ordering::AcqRel);
        done
    });
    match tokio::time::timeout(WATCH_WAIT, reload).await {
        // Errors are logged, counted and shown in /status by the reload itself.
        Ok(Ok(done)) => done.ok().flatten(),
        Ok(Err(_)) => None,
        Err(_) => {
            tracing::warn!(
                wait = ?WATCH_WAIT,
                "a reload started by the file watch is still reading its files; the watch goes on"
            );
            None
        }
    }
}

/// Watches `path`, and the certificate files its config names, and reloads `proxy` when
/// their content changes.
pub fn watch_file(path: PathBuf, proxy: Proxy) {
    // One pending wake-up is enough: a burst of events needs one reload.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload");
            return;
        }
    };
    let mut watched = HashSet::new();
    watch_new_dirs(&mut watcher, &mut watched, proxy.watched_dirs());
    tracing::info!(file = %path.display(), "watching the config file for changes");
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(RESYNC);
        let reading = Arc::new(AtomicUsize::new(0));
        loop {
            tokio::select! {
                woke = rx.recv() => {
                    if woke.is_none() {
                        return;
                    }
                    // Wait for the burst to end, but not forever: a directory that never
                    // goes quiet (a log file beside the config) must not starve reloads.
                    let until = tokio::time::Instant::now() + MAX_DEBOUNCE;
                    while tokio::time::Instant::now() < until {
                        if !matches!(tokio::time::timeout(DEBOUNCE, rx.recv()).await, Ok(Some(()))) {
                            break;
                        }
                    }
                    if let Some(generation) = watch_reload(&proxy, None, &reading).await {
                        tracing::info!(file = %path.display(), generation, "config or certificate files changed: reloaded");
                    }
                }
                _ = resync.tick() => {
                    // Events can be lost: a watched directory replaced as a whole (a
                    // symlinked release directory switched, `mv certs.new certs`) or a
                    // network file system sends none. A read and a hash catch up.
                    if let Some(generation) = watch_reload(&proxy, Some(SETTLED), &reading).await {
                        tracing::info!(file = %path.display(), generation, "config or certificate files changed (found by the periodic check): reloaded");
                    }
                }
            }
            // Any reload (this one, SIGHUP, POST /reload) may name certificates in
            // directories not watched yet, and a directory missing before may exist now.
            // Adding a watch reads the file system: off the runtime's threads.
            let dirs = proxy.watched_dirs();
            let joined = tokio::task::spawn_blocking(move || {
                watch_new_dirs(&mut watcher, &mut watched, dirs);
                (watcher, watched)
            })
            .await;
            match joined {
                Ok(back) => (watcher, watched) = back,
                Err(e) => {
                    tracing::warn!(error = %e, "the config file watch stopped; reload with SIGHUP or POST /reload");
                    return;
                }
            }
        }
    });
}

fn watch_new_dirs(watcher: &mut impl Watcher, watched: &mut HashSet<PathBuf>, dirs: Vec<PathBuf>) {
    for dir in dirs {
        if watched.contains(&dir) {
            continue;
        }
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watched.insert(dir);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a directory; reload with SIGHUP or POST /reload")
            }
        }
    }
}

/// Installs duplex's SIGHUP handler. Done before the proxy starts: a SIGHUP's default
/// action ends the process, and a `systemctl reload` can come as soon as the ports are
/// open. One that arrives before [`reload_on_sighup`] runs is kept for it.
pub fn sighup() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler: reload with POST /reload instead");
            None
        }
    }
}

/// Reloads the config file on every SIGHUP that `hup` (from [`sighup`]) receives, for as
/// long as the proxy runs.
pub fn reload_on_sighup(proxy: Proxy, mut hup: tokio::signal::unix::Signal) {
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading");
            // Errors are logged, counted and shown in /status by the reload itself.
            let _ = proxy.reload_from_file().await;
        }
    });
}
