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
    watch_with(path, proxy, RESYNC, |tx| {
        let tx = tx.clone();
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| may_change(&e.kind)) {
                let _ = tx.try_send(());
            }
        })
    });
}

/// Whether an event in a watched directory may mean a changed file. Opening a file, and
/// closing it unwritten, do not: they are what reading it does, and taking them for
/// changes had each of the watch's own reads wake it again 300 ms later, for good.
fn may_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
        )
    )
}

/// The watch, with its period and its way of making a watcher. Without a watcher (the
/// kernel's inotify instances used up, say, or duplex out of descriptors) the file is
/// still compared every `resync`, and a watcher is asked for again at each look.
fn watch_with<W, F>(path: PathBuf, proxy: Proxy, resync: Duration, mut new_watcher: F)
where
    W: Watcher + Send + 'static,
    F: FnMut(&mpsc::Sender<()>) -> notify::Result<W> + Send + 'static,
{
    // One pending wake-up is enough: a burst of events needs one reload.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watched = HashSet::new();
    let mut watcher = match new_watcher(&tx) {
        Ok(mut w) => {
            watch_new_dirs(&mut w, &mut watched, proxy.watched_dirs());
            tracing::info!(file = %path.display(), "watching the config file for changes");
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, every = ?resync, "cannot watch the config file for changes; it is compared with the config in force periodically instead");
            None
        }
    };
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(resync);
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
            let tx = tx.clone();
            let joined = tokio::task::spawn_blocking(move || {
                if watcher.is_none() {
                    if let Ok(w) = new_watcher(&tx) {
                        tracing::info!("watching the config file for changes again");
                        watcher = Some(w);
                    }
                }
                if let Some(w) = watcher.as_mut() {
                    watch_new_dirs(w, &mut watched, dirs);
                }
                (watcher, watched, new_watcher)
            })
            .await;
            match joined {
                Ok(back) => (watcher, watched, new_watcher) = back,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metrics;
    use duplex_config::Config;
    use std::time::Instant;

    fn config(port: u16) -> String {
        format!(
            "admin:\n  bind: 127.0.0.1:0\nlisteners:\n  - name: l\n    bind: 127.0.0.1:0\n\
             upstreams:\n  - name: u\n    backends:\n      - addr: 127.0.0.1:{port}\n"
        )
    }

    /// Reading a file is no change; writing one is.
    #[test]
    fn reads_are_not_changes() {
        use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
        let read = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ];
        assert!(read.iter().all(|k| !may_change(k)));
        let written = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Create(CreateKind::File),
            EventKind::Any,
        ];
        assert!(written.iter().all(may_change));
    }

    /// A proxy started from a file in a new temporary directory `name-PID`.
    async fn from_file(name: &str) -> (std::path::PathBuf, std::path::PathBuf, Proxy) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("duplex.yaml");
        std::fs::write(&file, config(9)).expect("write");
        let parsed = Config::load(&file).expect("valid");
        let proxy = Proxy::start(parsed, Some(file.clone()), Arc::new(Metrics::new()))
            .await
            .expect("starts");
        (dir, file, proxy)
    }

    /// Content that SIGHUP or `POST /reload` refused is not refused (and counted) a second
    /// time when the file watch then looks at the same file.
    #[tokio::test]
    async fn content_a_reload_refused_is_not_refused_again_by_the_watch() {
        let (dir, file, proxy) = from_file("duplex-refused").await;
        std::fs::write(&file, "listeners: [unclosed\n").expect("rewrite");
        proxy.reload_from_file().await.expect_err("a bad file");
        let looked = proxy
            .reload_if_changed(None)
            .await
            .expect("no second refusal");
        assert_eq!(looked, None);
        let metrics = proxy.metrics().render();
        assert!(
            metrics.contains("duplex_config_reloads_total{result=\"error\"} 1"),
            "{metrics}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With no watcher to be had (inotify instances used up), a change of the file is
    /// still applied by the periodic check, and a watcher is asked for again at each look.
    #[tokio::test]
    async fn without_a_watcher_the_periodic_check_reloads() {
        let (dir, file, proxy) = from_file("duplex-nowatch").await;
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&asked);
        watch_with(
            file.clone(),
            proxy.clone(),
            Duration::from_millis(100),
            move |_: &mpsc::Sender<()>| -> notify::Result<notify::RecommendedWatcher> {
                counted.fetch_add(1, Ordering::AcqRel);
                Err(notify::Error::generic("no inotify instance left"))
            },
        );
        let before = proxy.generation();
        std::fs::write(&file, config(10)).expect("rewrite");
        // The periodic check leaves a file alone for SETTLED after it was written.
        let deadline = Instant::now() + SETTLED + Duration::from_secs(10);
        while proxy.generation() == before {
            assert!(Instant::now() < deadline, "the change was never applied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            asked.load(Ordering::Acquire) >= 2,
            "a watcher was not asked for again"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
