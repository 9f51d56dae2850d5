//! Caps the client connections open at once, over all listeners and per listener.
//!
//! An accept loop checks for room before it calls `accept()`. At a cap it waits, and new
//! connections wait in the kernel's listen backlog, as under HAProxy's `maxconn`, rather
//! than being accepted only to be refused. A [`Slot`] lives as long as its connection and
//! the tunnel that connection may become, and wakes waiting accept loops when it goes.
//! The admin listener takes no slot, so that metrics can be read at the cap.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Descriptors kept back from client connections when the cap comes from the open-file
/// limit: listeners, the admin port, health checks, DNS, reading files, idle pooled
/// backend connections.
const RESERVED_FDS: u64 = 100;

/// How often a waiting accept loop looks again without being woken: a bound on what a
/// missed wake-up could cost, never the usual path.
const RECHECK: Duration = Duration::from_secs(1);

/// The process's soft open-file limit, once `main` has raised and read it (0: unknown).
static OPEN_FILE_LIMIT: AtomicU64 = AtomicU64::new(0);

/// Records the open-file limit in force; the default global cap derives from it.
pub fn set_open_file_limit(soft: u64) {
    OPEN_FILE_LIMIT.store(soft, SeqCst);
}

/// The global cap when the config sets none: what the open-file limit leaves after a
/// reserve, halved, since a tunnel holds two descriptors (the client's and the
/// backend's). No cap while the limit is unknown.
pub fn default_max() -> usize {
    match OPEN_FILE_LIMIT.load(SeqCst) {
        0 => usize::MAX,
        soft => usize::try_from(soft.saturating_sub(RESERVED_FDS) / 2)
            .unwrap_or(usize::MAX)
            .max(1),
    }
}

/// Which cap stopped an accept loop, as the `limit` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Global,
    Listener,
}

impl Cap {
    pub fn label(self) -> &'static str {
        match self {
            Cap::Global => "global",
            Cap::Listener => "listener",
        }
    }
}

/// Open client connections over every listener, and the accept loops waiting for one
/// of them to close.
#[derive(Debug, Default)]
pub struct Limits {
    open: AtomicUsize,
    /// Accept loops waiting for room: a closing connection wakes them only when there
    /// are some, so that below the caps a close costs two atomic subtractions and a load.
    waiting: AtomicUsize,
    /// A connection closed (or a place was given back) while loops were waiting.
    freed: Notify,
    /// A reload stored new caps.
    changed: Notify,
}

/// A place under a listener's own cap, taken by its accept loop before `accept()`. The
/// global count is taken only once a connection has arrived ([`Limits::admit`]): a place
/// held by an idle listener's loop must not keep connections on the others out.
#[derive(Debug)]
pub struct Reserved {
    limits: Arc<Limits>,
    listener: Arc<AtomicUsize>,
    /// Set when a [`Slot`] took the place over, which then gives it back.
    admitted: bool,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.admitted {
            self.listener.fetch_sub(1, SeqCst);
            self.limits.wake();
        }
    }
}

impl Reserved {
    /// A slot if the global cap has room for the connection now.
    fn try_admit(&mut self, global: usize) -> Result<Slot, Cap> {
        if self.admitted || !take(&self.limits.open, global) {
            return Err(Cap::Global);
        }
        self.admitted = true;
        Ok(Slot {
            limits: Arc::clone(&self.limits),
            listener: Arc::clone(&self.listener),
        })
    }
}

/// One client connection's place under the caps, given back on drop.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    /// The open count of the listener that accepted the connection.
    listener: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Both counts go down before anyone is woken to read them.
        self.listener.fetch_sub(1, SeqCst);
        self.limits.open.fetch_sub(1, SeqCst);
        self.limits.wake();
    }
}

/// Adds one to `count` if it is below `max`.
fn take(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(SeqCst, SeqCst, |n| (n < max).then_some(n + 1))
        .is_ok()
}

impl Limits {
    /// Client connections open now, over every listener.
    pub fn open(&self) -> usize {
        self.open.load(SeqCst)
    }

    fn wake(&self) {
        if self.waiting.load(SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Tells accept loops, waiting or accepting, that the caps changed (a reload).
    pub fn recheck(&self) {
        self.changed.notify_waiters();
    }

    /// Resolves at the next [`Limits::recheck`].
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// A place if both caps leave room now; otherwise the cap that is full.
    pub fn reserve(
        self: &Arc<Self>,
        listener: &Arc<AtomicUsize>,
        caps: (usize, usize),
    ) -> Result<Reserved, Cap> {
        if self.open.load(SeqCst) >= caps.0 {
            return Err(Cap::Global);
        }
        // Only this listener's loop waits on its count: failing here wakes nobody.
        if !take(listener, caps.1) {
            return Err(Cap::Listener);
        }
        Ok(Reserved {
            limits: Arc::clone(self),
            listener: Arc::clone(listener),
            admitted: false,
        })
    }

    /// Waits for room under the caps `caps()` gives as of each try (global, this
    /// listener) and reserves it. `full` is told each time a cap stops the loop. `None`
    /// once `stop` resolves.
    pub async fn wait_for_room(
        self: &Arc<Self>,
        listener: &Arc<AtomicUsize>,
        caps: &impl Fn() -> (usize, usize),
        full: &mut impl FnMut(Cap),
        stop: impl Future<Output = ()>,
    ) -> Option<Reserved> {
        self.wait(|| self.reserve(listener, caps()), full, stop)
            .await
    }

    /// Counts an arrived connection against the global cap, waiting for room if the
    /// other listeners filled it since its place was reserved (the connection, accepted,
    /// waits unanswered as it would have in the backlog: one per listener at most).
    pub async fn admit(
        &self,
        mut place: Reserved,
        caps: &impl Fn() -> (usize, usize),
        full: &mut impl FnMut(Cap),
        stop: impl Future<Output = ()>,
    ) -> Option<Slot> {
        self.wait(|| place.try_admit(caps().0), full, stop).await
    }

    /// Tries `attempt` until it succeeds, sleeping between tries until a connection
    /// closes, the caps change, or [`RECHECK`] passes; `None` once `stop` resolves.
    async fn wait<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, Cap>,
        full: &mut impl FnMut(Cap),
        stop: impl Future<Output = ()>,
    ) -> Option<T> {
        if let Ok(got) = attempt() {
            return Some(got);
        }
        tokio::pin!(stop);
        loop {
            // Registered before the counts are read, so that a close between the two
            // still wakes this loop (see `wake`).
            let freed = self.freed.notified();
            let changed = self.changed.notified();
            tokio::pin!(freed, changed);
            freed.as_mut().enable();
            changed.as_mut().enable();
            self.waiting.fetch_add(1, SeqCst);
            let cap = match attempt() {
                Ok(got) => {
                    self.waiting.fetch_sub(1, SeqCst);
                    return Some(got);
                }
                Err(cap) => cap,
            };
            full(cap);
            let stopped = tokio::select! {
                _ = freed => false,
                _ = changed => false,
                _ = tokio::time::sleep(RECHECK) => false,
                _ = &mut stop => true,
            };
            self.waiting.fetch_sub(1, SeqCst);
            if stopped {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields (a bounded number of times) until a spawned loop has found a cap full and
    /// is waiting.
    async fn until_waiting(limits: &Limits) {
        for _ in 0..500 {
            if limits.waiting.load(SeqCst) == 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the loop never waited");
    }

    fn admitted(limits: &Arc<Limits>, l: &Arc<AtomicUsize>, caps: (usize, usize)) -> Slot {
        let mut place = limits.reserve(l, caps).expect("room");
        place.try_admit(caps.0).expect("global room")
    }

    #[test]
    fn places_count_against_both_caps_and_come_back_on_drop() {
        let limits = Arc::new(Limits::default());
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let one = admitted(&limits, &a, (3, 1));
        assert_eq!(limits.reserve(&a, (3, 1)).unwrap_err(), Cap::Listener);
        assert_eq!((limits.open(), a.load(SeqCst)), (1, 1));
        let two = admitted(&limits, &b, (3, 5));
        let three = admitted(&limits, &b, (3, 5));
        assert_eq!(limits.reserve(&b, (3, 5)).unwrap_err(), Cap::Global);
        assert_eq!((limits.open(), b.load(SeqCst)), (3, 2));
        drop(one);
        assert_eq!((limits.open(), a.load(SeqCst)), (2, 0));
        let four = admitted(&limits, &a, (3, 1));
        drop((two, three));
        assert_eq!((limits.open(), b.load(SeqCst)), (1, 0));
        drop(four);
        assert_eq!((limits.open(), a.load(SeqCst)), (0, 0));
    }

    /// An accept loop waiting in `accept()` on an idle listener holds a place under its
    /// own cap only: the last global place stays free for whichever listener gets a
    /// connection first.
    #[test]
    fn an_idle_listeners_place_leaves_the_global_cap_alone() {
        let limits = Arc::new(Limits::default());
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut idle = limits.reserve(&a, (1, 10)).expect("room on a");
        let busy = admitted(&limits, &b, (1, 10));
        assert_eq!(limits.reserve(&a, (1, 10)).unwrap_err(), Cap::Global);
        assert_eq!(limits.open(), 1);
        // A connection that reaches the idle listener now is not let past the cap.
        assert_eq!(idle.try_admit(1).unwrap_err(), Cap::Global);
        // Given back without a connection: only the listener's count moves.
        drop(idle);
        assert_eq!((limits.open(), a.load(SeqCst)), (1, 0));
        drop(busy);
        assert_eq!((limits.open(), b.load(SeqCst)), (0, 0));
    }

    // Paused time: the recheck would fire only once the runtime idles and time jumps,
    // so a wake-up before `RECHECK` can only be the close's. The close is on another
    // listener, so that only the global count can wake the loop.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_loop_gets_the_room_a_close_frees() {
        let limits = Arc::new(Limits::default());
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let held = admitted(&limits, &a, (1, 10));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiter = {
            let (limits, b) = (Arc::clone(&limits), Arc::clone(&b));
            tokio::spawn(async move {
                let mut full = Vec::new();
                let place = limits
                    .wait_for_room(&b, &|| (1, 10), &mut |c| full.push(c), async {
                        let _ = rx.await;
                    })
                    .await;
                (place.is_some(), full)
            })
        };
        until_waiting(&limits).await;
        let woke = tokio::time::Instant::now();
        drop(held);
        let (got, full) = waiter.await.expect("no panic");
        assert!(got, "the freed room went to the waiting loop");
        assert_eq!(full, vec![Cap::Global]);
        // Woken by the close, not by the once-a-second recheck.
        assert!(woke.elapsed() < RECHECK, "took {:?}", woke.elapsed());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_wakes_a_waiting_loop_at_once() {
        let limits = Arc::new(Limits::default());
        let l = Arc::new(AtomicUsize::new(0));
        let _held = admitted(&limits, &l, (1, 1));
        let cap = Arc::new(AtomicUsize::new(1));
        let waiter = {
            let (limits, l, cap) = (Arc::clone(&limits), Arc::clone(&l), Arc::clone(&cap));
            tokio::spawn(async move {
                let caps = || (10, cap.load(SeqCst));
                limits
                    .wait_for_room(&l, &caps, &mut |_| {}, std::future::pending())
                    .await
                    .is_some()
            })
        };
        until_waiting(&limits).await;
        let raised = tokio::time::Instant::now();
        cap.store(2, SeqCst);
        limits.recheck();
        assert!(waiter.await.expect("no panic"));
        assert!(raised.elapsed() < RECHECK, "took {:?}", raised.elapsed());
    }

    // A loop waiting at one cap must sleep, not wake itself: each try that finds a cap
    // full is counted, and over three rechecks' time there may be about three.
    #[tokio::test(start_paused = true)]
    async fn a_loop_at_a_cap_waits_without_spinning() {
        for caps in [(10, 1), (1, 10)] {
            let limits = Arc::new(Limits::default());
            let l = Arc::new(AtomicUsize::new(0));
            let _held = admitted(&limits, &l, caps);
            let tries = AtomicUsize::new(0);
            let mut full = |_| assert!(tries.fetch_add(1, SeqCst) < 100, "spinning at {caps:?}");
            let place = limits
                .wait_for_room(&l, &|| caps, &mut full, tokio::time::sleep(RECHECK * 3))
                .await;
            assert!(place.is_none());
            assert!(
                tries.load(SeqCst) <= 4,
                "{} tries at {caps:?}",
                tries.load(SeqCst)
            );
        }
    }

    #[tokio::test]
    async fn stop_ends_the_wait() {
        let limits = Arc::new(Limits::default());
        let l = Arc::new(AtomicUsize::new(0));
        let _held = admitted(&limits, &l, (1, 1));
        let place = limits
            .wait_for_room(&l, &|| (1, 1), &mut |_| {}, async {})
            .await;
        assert!(place.is_none());
        assert_eq!(limits.waiting.load(SeqCst), 0);
    }

    #[test]
    fn the_default_cap_leaves_a_reserve_and_halves_the_rest() {
        assert_eq!(default_max(), usize::MAX, "no limit known yet");
        set_open_file_limit(20_000);
        assert_eq!(default_max(), 9_950);
        set_open_file_limit(50);
        assert_eq!(default_max(), 1);
        set_open_file_limit(0);
    }
}
