//! Closes idle keep-alive client connections when a `max_connections` cap is full, so
//! that new clients do not wait behind connections that send nothing (nginx reuses its
//! idle keep-alive connections the same way).
//!
//! Every plain HTTP client connection is registered here while it lives, and marks when
//! a request starts and when its response has been sent whole. At a cap, the accept loop
//! holding a new connection asks the connections idle longest to close: hyper's graceful
//! shutdown closes an idle one at once, and lets one that has just begun a request finish
//! it first. A connection is idle once it has been answered and has nothing in progress,
//! or when it is new and has not begun a request for [`SILENT_MS`]: one on its way to its
//! first request is left that long, so that a freed place cannot empty the backlog, but
//! connections that send nothing (or a head, slowly) do not hold a full cap for the whole
//! header timeout (nginx closes these too). A WebSocket tunnel is never asked: its
//! connection leaves the registry when it upgrades.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use duplex_metrics::Counter;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::server::lock;

/// The most connections asked to close and not closed yet (nginx closes up to 32 idle
/// keep-alive connections each time it runs short). Loops that find the cap full again
/// before those have closed ask no more.
pub const BATCH: usize = 32;

/// How long a new connection may go without beginning its first request before a full
/// cap may ask it to close.
pub const SILENT_MS: u64 = 3000;

/// How often, at most, a full batch looks for connections that began a request after
/// being asked (see [`Idle::release_busy`]).
const RELEASE_EVERY_MS: u64 = 1000;

/// The connections that could be asked to close.
#[derive(Debug, Default)]
pub struct Idle {
    registry: Mutex<Registry>,
    /// Connections asked to close by a full cap that have not closed yet.
    outstanding: AtomicUsize,
    /// When [`Idle::release_busy`] last looked, in ms since [`epoch`] plus one (0: never):
    /// at a full cap it would otherwise scan every connection on every wake-up.
    released_at: AtomicU64,
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
    /// Requests in progress, from their head to the end of their response body; an
    /// upgrade that succeeded stays counted.
    busy: AtomicUsize,
    /// Whether a response has been sent whole: before that the connection is new, and
    /// idle only after [`SILENT_MS`].
    served: AtomicBool,
    /// When the connection last had nothing in progress (for a new one, when it was
    /// registered), in ms since [`epoch`].
    idle_since: AtomicU64,
    /// Asked to close, by a full cap or by shutdown: asked only once.
    asked: AtomicBool,
    /// Asked by a full cap: counted in `reclaimed` and `outstanding` until it closes.
    reclaimed_by_cap: AtomicBool,
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

/// A request in progress until its response body is sent whole (or dropped): the
/// connection is idle again, if nothing else is in progress, when this drops.
#[derive(Debug)]
pub struct Busy(Arc<Conn>);

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
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(now_ms()),
            asked: AtomicBool::new(false),
            reclaimed_by_cap: AtomicBool::new(false),
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

    /// Asks the connections idle longest, on the listener whose open count is `listener`
    /// or on any listener, to close: as many as leaves at most [`BATCH`] asked and not
    /// closed yet. Returns how many were asked.
    pub fn reclaim(&self, listener: Option<&AtomicUsize>) -> usize {
        // Chosen and asked under the lock that `Registration::drop` takes to leave: a
        // connection asked is still registered, and its drop counts it out again.
        let registry = lock(&self.registry);
        let mut room = BATCH.saturating_sub(self.outstanding.load(SeqCst));
        if room == 0 {
            let (now, last) = (now_ms() + 1, self.released_at.load(SeqCst));
            if last != 0 && now.saturating_sub(last) < RELEASE_EVERY_MS {
                return 0;
            }
            self.released_at.store(now, SeqCst);
            room = self.release_busy(&registry);
            if room == 0 {
                return 0;
            }
        }
        let now = now_ms();
        let mut idle: Vec<(u64, usize)> = registry
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                let here = listener.is_none_or(|l| std::ptr::eq(l, &*c.listener));
                (here && c.is_idle(now)).then(|| (c.idle_since.load(SeqCst), i))
            })
            .collect();
        if idle.len() > room {
            idle.select_nth_unstable_by_key(room - 1, |(since, _)| *since);
            idle.truncate(room);
        }
        let mut asked = 0;
        for c in idle.iter().filter_map(|&(_, i)| registry.conns[i].as_ref()) {
            if !c.asked.swap(true, SeqCst) {
                c.reclaimed_by_cap.store(true, SeqCst);
                self.outstanding.fetch_add(1, SeqCst);
                // A permit is kept if the connection is not waiting for it at this instant.
                c.close.notify_one();
                asked += 1;
            }
        }
        drop(registry);
        if asked > 0 {
            tracing::debug!(
                asked,
                "max_connections reached: closing idle keep-alive connections"
            );
        }
        asked
    }

    /// Gives back the batch places of connections asked just as they began a request:
    /// they close once it ends, which for a long poll may take any time, and meanwhile
    /// they would keep others from being asked. Counted reclaimed now (they will close).
    /// Returns the room there is then.
    fn release_busy(&self, registry: &Registry) -> usize {
        for c in registry.conns.iter().flatten() {
            if c.busy.load(SeqCst) > 0 && c.reclaimed_by_cap.swap(false, SeqCst) {
                c.reclaimed.inc();
                self.outstanding.fetch_sub(1, SeqCst);
            }
        }
        BATCH.saturating_sub(self.outstanding.load(SeqCst))
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
        // Read under the lock `reclaim` asks (and gives places back) under: asked before
        // this, or never; its place given back already, or not.
        let by_cap = self.conn.reclaimed_by_cap.swap(false, SeqCst);
        drop(registry);
        if by_cap {
            self.conn.reclaimed.inc();
            self.idle.outstanding.fetch_sub(1, SeqCst);
        }
    }
}

impl Conn {
    /// Whether the connection may be asked to close at a full cap, at `now` (ms since
    /// [`epoch`]).
    fn is_idle(&self, now: u64) -> bool {
        let since = self.idle_since.load(SeqCst);
        (self.served.load(SeqCst) || now.saturating_sub(since) >= SILENT_MS)
            && self.busy.load(SeqCst) == 0
            && !self.asked.load(SeqCst)
    }

    /// Whether no request has begun on the connection yet: closing it then owes nobody an
    /// answer.
    pub fn never_began(&self) -> bool {
        !self.served.load(SeqCst) && self.busy.load(SeqCst) == 0
    }

    /// A request's head has arrived: the connection is not idle until the matching
    /// [`Conn::request_ended`].
    pub fn request_started(&self) {
        self.busy.fetch_add(1, SeqCst);
    }

    /// The request has been answered and its response body sent whole.
    pub fn request_ended(&self) {
        self.idle_since.store(now_ms(), SeqCst);
        self.served.store(true, SeqCst);
        self.busy.fetch_sub(1, SeqCst);
    }

    /// Keeps the connection busy until the returned guard drops: for a response body
    /// that is still being sent after the request's handler has returned.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.request_started();
        Busy(Arc::clone(self))
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

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> Counter {
        Counter::new("reclaimed", "test").expect("counter")
    }

    /// A connection that has been answered once and is idle now.
    fn served(r: &Registration) {
        r.conn.request_started();
        r.conn.request_ended();
    }

    #[test]
    fn asks_the_idle_connections_of_the_full_listener_longest_idle_first() {
        let idle = Arc::new(Idle::default());
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut on_a: Vec<Registration> = (0..BATCH + 3)
            .map(|_| idle.register(Arc::clone(&a), counter()))
            .collect();
        let on_b = idle.register(Arc::clone(&b), counter());
        on_a.iter().chain([&on_b]).for_each(served);
        // Idle longest: on_b, then on_a[2], on_a[3]... The first is the most recently
        // idle; the second is busy; `new` has not been answered yet.
        for (i, r) in on_a.iter().enumerate() {
            r.conn.idle_since.store(1000 + i as u64, SeqCst);
        }
        on_b.conn.idle_since.store(0, SeqCst);
        on_a[0].conn.idle_since.store(u64::MAX, SeqCst);
        let busy = on_a[1].conn.busy();
        let new = idle.register(Arc::clone(&a), counter());

        let asked = |r: &Registration| r.conn.asked.load(SeqCst);
        assert_eq!(idle.reclaim(Some(&a)), BATCH, "one batch at a time");
        assert!(on_a[2..BATCH + 2].iter().all(asked), "the longest idle");
        assert!(!asked(&on_a[BATCH + 2]), "past the batch");
        assert!(!asked(&on_a[0]), "the one idle the shortest time is left");
        assert!(!asked(&on_a[1]), "a busy connection is never asked");
        assert!(!asked(&new), "nor one not yet answered");
        assert!(!asked(&on_b), "another listener's connection is left");
        assert_eq!(idle.reclaim(None), 0, "no more while a batch is still open");

        // Counted once closed, which also gives its batch place back.
        let closed = on_a.remove(2);
        let reclaimed = closed.conn.reclaimed.clone();
        drop(closed);
        assert_eq!(reclaimed.get(), 1);
        drop(busy);
        assert_eq!(idle.reclaim(Some(&a)), 1, "one batch place came free");
        assert!(asked(&on_a[1]), "idle once its response was sent whole");
        on_a.truncate(2);
        assert_eq!(idle.outstanding.load(SeqCst), 1);
        assert_eq!(idle.reclaim(None), 2, "at the global cap, any listener's");
        assert!(asked(&on_b) && asked(&on_a[0]));
        assert_eq!(idle.reclaim(None), 0);

        let upgraded = idle.register(Arc::clone(&a), counter());
        served(&upgraded);
        upgraded.conn.upgraded();
        assert_eq!(idle.reclaim(None), 0, "a tunnel is never asked");

        // Shutdown asks everyone, later ones too, without counting them as reclaimed.
        idle.close_all();
        let late = idle.register(Arc::clone(&b), counter());
        assert!(asked(&new) && asked(&upgraded) && asked(&late));
        let counts = [&new, &late, &upgraded].map(|r| r.conn.reclaimed.clone());
        drop((new, late, upgraded));
        assert!(counts.iter().all(|c| c.get() == 0));

        drop((on_a, on_b));
        let registry = lock(&idle.registry);
        assert_eq!(
            registry.conns.iter().flatten().count(),
            0,
            "all gone on drop"
        );
        drop(registry);
        assert_eq!(idle.outstanding.load(SeqCst), 0);
    }

    #[test]
    fn a_new_connection_is_idle_once_silent_long_enough() {
        let idle = Arc::new(Idle::default());
        let r = idle.register(Arc::new(AtomicUsize::new(0)), counter());
        let since = r.conn.idle_since.load(SeqCst);
        assert!(
            !r.conn.is_idle(since + SILENT_MS - 1),
            "on its way to a request"
        );
        assert!(r.conn.is_idle(since + SILENT_MS), "silent too long");
        let busy = r.conn.busy();
        assert!(
            !r.conn.is_idle(since + SILENT_MS),
            "its first request began"
        );
        drop(busy);
        let since = r.conn.idle_since.load(SeqCst);
        assert!(r.conn.is_idle(since), "answered: idle at once");
    }

    #[test]
    fn a_connection_asked_as_it_began_a_request_gives_its_place_back() {
        let idle = Arc::new(Idle::default());
        let l = Arc::new(AtomicUsize::new(0));
        let conns: Vec<Registration> = (0..BATCH + 1)
            .map(|_| idle.register(Arc::clone(&l), counter()))
            .collect();
        conns.iter().for_each(served);
        conns[BATCH].conn.idle_since.store(u64::MAX, SeqCst);
        assert_eq!(idle.reclaim(None), BATCH);
        // The batch began requests (long polls, say) just as they were asked.
        let polls: Vec<Busy> = conns[..BATCH].iter().map(|r| r.conn.busy()).collect();
        assert_eq!(idle.reclaim(None), 1, "their places came back");
        assert!(conns[BATCH].conn.asked.load(SeqCst));
        assert_eq!(idle.outstanding.load(SeqCst), 1);
        let counts: Vec<Counter> = conns.iter().map(|r| r.conn.reclaimed.clone()).collect();
        assert!(counts[..BATCH].iter().all(|c| c.get() == 1));
        // Their close later neither counts them again nor gives a place back twice.
        drop(polls);
        drop(conns);
        assert!(counts.iter().all(|c| c.get() == 1));
        assert_eq!(idle.outstanding.load(SeqCst), 0);
    }
}
