//! Closes idle keep-alive client connections when a `max_connections` cap is full, so
//! that new clients do not wait behind connections that send nothing (nginx reuses its
//! idle keep-alive connections the same way).
//!
//! Every plain HTTP client connection is registered here while it lives, and marks when
//! a request starts and ends. At a cap, the waiting accept loop asks the connections idle
//! longest to close: hyper's graceful shutdown closes an idle one at once, and lets one
//! that has just begun a request finish it first. A WebSocket tunnel is never asked: its
//! connection leaves the registry when it upgrades.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use duplex_metrics::Counter;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::server::lock;

/// The most connections asked to close per refusal at a cap (nginx closes up to 32 idle
/// keep-alive connections each time it runs short).
pub const BATCH: usize = 32;

/// The connections that could be asked to close.
#[derive(Debug, Default)]
pub struct Idle {
    registry: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    /// By registration number; a number is used again once its connection is gone.
    conns: Vec<Option<Arc<Conn>>>,
    /// Numbers free for the next registrations.
    free: Vec<usize>,
    /// Shutdown began: every connection, even one registered later, is asked to close.
    all: bool,
}

/// One registered client connection.
#[derive(Debug)]
pub struct Conn {
    /// The accepting listener's open count: which listener's cap the connection counts
    /// against (compared by address).
    listener: Arc<AtomicUsize>,
    /// Requests being handled; an upgrade that succeeded stays counted.
    busy: AtomicUsize,
    /// When the connection last had nothing in progress, in ms since [`epoch`].
    idle_since: AtomicU64,
    /// Set once the connection has been asked to close, so that it is asked only once.
    asked: AtomicBool,
    close: Notify,
    /// `duplex_connections_reclaimed_total` of the listener.
    reclaimed: Counter,
}

/// A connection's place in [`Idle`], removed on drop.
#[derive(Debug)]
pub struct Registration {
    idle: Arc<Idle>,
    id: usize,
    pub conn: Arc<Conn>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    let d = epoch().elapsed();
    d.as_secs() * 1000 + u64::from(d.subsec_millis())
}

impl Idle {
    /// Registers a connection accepted on the listener whose open count is `listener`.
    pub fn register(
        self: &Arc<Self>,
        listener: Arc<AtomicUsize>,
        reclaimed: Counter,
    ) -> Registration {
        let conn = Arc::new(Conn {
            listener,
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now_ms()),
            asked: AtomicBool::new(false),
            close: Notify::new(),
            reclaimed,
        });
        let mut registry = lock(&self.registry);
        let id = match registry.free.pop() {
            Some(id) => {
                registry.conns[id] = Some(Arc::clone(&conn));
                id
            }
            None => {
                registry.conns.push(Some(Arc::clone(&conn)));
                registry.conns.len() - 1
            }
        };
        if registry.all {
            conn.asked.store(true, SeqCst);
            conn.close.notify_one();
        }
        drop(registry);
        Registration {
            idle: Arc::clone(self),
            id,
            conn,
        }
    }

    /// Asks up to [`BATCH`] of the connections idle longest, on the listener whose open
    /// count is `listener` or on any listener, to close. Returns how many were asked.
    pub fn reclaim(&self, listener: Option<&AtomicUsize>) -> usize {
        let mut idle: Vec<(u64, Arc<Conn>)> = lock(&self.registry)
            .conns
            .iter()
            .flatten()
            .filter(|c| c.busy.load(SeqCst) == 0 && !c.asked.load(SeqCst))
            .filter(|c| listener.is_none_or(|l| std::ptr::eq(l, &*c.listener)))
            .map(|c| (c.idle_since.load(SeqCst), Arc::clone(c)))
            .collect();
        if idle.len() > BATCH {
            idle.select_nth_unstable_by_key(BATCH - 1, |(since, _)| *since);
            idle.truncate(BATCH);
        }
        for (_, c) in &idle {
            c.asked.store(true, SeqCst);
            c.reclaimed.inc();
            // A permit is kept if the connection is not waiting for it at this instant.
            c.close.notify_one();
        }
        if !idle.is_empty() {
            tracing::debug!(
                closed = idle.len(),
                "max_connections reached: closing idle keep-alive connections"
            );
        }
        idle.len()
    }

    /// Asks every connection to close, now and as they come: shutdown began.
    pub fn close_all(&self) {
        let mut registry = lock(&self.registry);
        registry.all = true;
        for c in registry.conns.iter().flatten() {
            c.asked.store(true, SeqCst);
            c.close.notify_one();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = lock(&self.idle.registry);
        registry.conns[self.id] = None;
        registry.free.push(self.id);
    }
}

impl Conn {
    /// A request is being handled: the connection is not idle.
    pub fn request_started(&self) {
        self.busy.fetch_add(1, SeqCst);
    }

    /// The request's response is ready: idle again once none is left.
    pub fn request_ended(&self) {
        self.idle_since.store(now_ms(), SeqCst);
        self.busy.fetch_sub(1, SeqCst);
    }

    /// Keeps the connection busy for good: it became a tunnel, which is never asked to
    /// close, in the moment before it leaves the registry.
    pub fn upgraded(&self) {
        self.busy.fetch_add(1, SeqCst);
    }

    /// Resolves when the connection is asked to close.
    pub fn asked_to_close(&self) -> Notified<'_> {
        self.close.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> Counter {
        Counter::new("reclaimed", "test").expect("counter")
    }

    #[test]
    fn asks_the_idle_connections_of_the_full_listener_longest_idle_first() {
        let idle = Arc::new(Idle::default());
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let on_a: Vec<Registration> = (0..BATCH + 2)
            .map(|_| idle.register(Arc::clone(&a), counter()))
            .collect();
        let on_b = idle.register(Arc::clone(&b), counter());
        // The first one is the most recently idle; the second is busy.
        on_a[0].conn.idle_since.store(u64::MAX, SeqCst);
        on_a[1].conn.request_started();

        assert_eq!(idle.reclaim(Some(&a)), BATCH, "one batch at a time");
        let asked = |r: &Registration| r.conn.asked.load(SeqCst);
        assert!(!asked(&on_a[0]), "the one idle the shortest time is left");
        assert!(!asked(&on_a[1]), "a busy connection is never asked");
        assert!(on_a[2..].iter().all(asked));
        assert!(!asked(&on_b), "another listener's connection is left");
        assert_eq!(on_a[2].conn.reclaimed.get(), 1);

        // Asked once only; the rest go on the next refusal, busy or not any more.
        on_a[1].conn.request_ended();
        assert_eq!(idle.reclaim(Some(&a)), 2);
        assert_eq!(idle.reclaim(None), 1, "at the global cap, any listener's");
        assert_eq!(idle.reclaim(None), 0);

        let upgraded = idle.register(Arc::clone(&a), counter());
        upgraded.conn.upgraded();
        assert_eq!(idle.reclaim(None), 0, "a tunnel is never asked");

        drop(on_a);
        let left = lock(&idle.registry).conns.iter().flatten().count();
        assert_eq!(left, 2, "registrations leave on drop");

        // Shutdown asks everyone, later ones too, without counting them as reclaimed.
        idle.close_all();
        let late = idle.register(Arc::clone(&b), counter());
        assert!(asked(&on_b) && asked(&upgraded) && asked(&late));
        assert_eq!(on_b.conn.reclaimed.get(), 1);
    }
}
