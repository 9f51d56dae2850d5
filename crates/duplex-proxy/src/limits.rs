//! Caps the client connections open at once, over all listeners and per listener.
//!
//! An accept loop takes a [`Slot`] for each connection it accepts. At a cap it holds the
//! connection just accepted, unanswered, until there is room, and accepts no other: new
//! connections wait in the kernel's listen backlog, rather than being accepted only to be
//! refused. While it holds one, it asks idle keep-alive connections to close (see
//! [`crate::reclaim`]): a client is waiting, so the room is wanted. A [`Slot`] lives as
//! long as its connection and the tunnel that connection may become, and wakes waiting
//! accept loops when it goes. The admin listener takes no slot, so that metrics can be
//! read at the cap.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::reclaim::Idle;

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

/// The global cap when the config sets none: see [`cap_for`]. No cap while the limit is
/// unknown.
pub fn default_max() -> usize {
    match OPEN_FILE_LIMIT.load(SeqCst) {
        0 => usize::MAX,
        soft => cap_for(soft),
    }
}

/// The cap an open-file limit of `soft` allows: what it leaves after a reserve, halved,
/// since a tunnel holds two descriptors (the client's and the backend's).
pub fn cap_for(soft: u64) -> usize {
    usize::try_from(soft.saturating_sub(RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// The open-file limit in force, when `main` recorded it.
pub fn open_file_limit() -> Option<u64> {
    Some(OPEN_FILE_LIMIT.load(SeqCst)).filter(|&n| n > 0)
}

/// Warns when a configured global cap is more than the open-file limit can back (near
/// it, accepts and backend connects would fail with EMFILE before the cap stops
/// anything), or when the limit leaves room for few connections.
pub fn check_against_open_files(configured: Option<usize>) {
    let Some(soft) = open_file_limit() else {
        return;
    };
    let allowed = cap_for(soft);
    match configured {
        // The cap stays as configured; `suggested` is what the limit can back.
        Some(max) if max > allowed => tracing::warn!(
            max,
            open_file_limit = soft,
            suggested = allowed,
            "max_connections is more than the open-file limit can hold: raise LimitNOFILE or lower max_connections"
        ),
        None if allowed < FEW => tracing::warn!(
            max = allowed,
            open_file_limit = soft,
            "the open-file limit leaves room for few connections: raise LimitNOFILE"
        ),
        _ => {}
    }
}

/// Below this many connections a default cap is worth a warning.
const FEW: usize = 1000;

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
    /// are some, so that while none waits a close costs two atomic subtractions and a
    /// load.
    waiting: AtomicUsize,
    /// A connection closed while loops were waiting.
    freed: Notify,
    /// A reload stored new caps.
    changed: Notify,
    /// Client connections that can be asked to close at a cap.
    pub idle: Arc<Idle>,
}

/// One client connection's place under the caps, given back on drop.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    /// The open count of the listener that accepted the connection.
    listener: Arc<AtomicUsize>,
}

impl Slot {
    /// The open count of the listener that accepted the connection.
    pub fn listener(&self) -> &Arc<AtomicUsize> {
        &self.listener
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Both counts go down before anyone is woken to read them.
        self.listener.fetch_sub(1, SeqCst);
        self.limits.open.fetch_sub(1, SeqCst);
        if self.limits.waiting.load(SeqCst) > 0 {
            self.limits.freed.notify_waiters();
        }
    }
}

impl Limits {
    /// Client connections open now, over every listener.
    pub fn open(&self) -> usize {
        self.open.load(SeqCst)
    }

    /// Tells accept loops holding a connection at a cap that the caps changed (a reload).
    pub fn recheck(&self) {
        self.changed.notify_waiters();
    }

    /// Asks idle connections that count against the full cap to close: any listener's
    /// at the global cap, `listener`'s at its own.
    fn reclaim(&self, cap: Cap, listener: &AtomicUsize) {
        self.idle.reclaim(match cap {
            Cap::Global => None,
            Cap::Listener => Some(listener),
        });
    }

    /// A slot if both caps leave room now. The global count is taken with a
    /// compare-and-swap, since every listener takes from it; a listener's count is only
    /// ever raised by its own accept loop, so reading it first is enough.
    pub fn take(
        self: &Arc<Self>,
        listener: &Arc<AtomicUsize>,
        caps: (usize, usize),
    ) -> Result<Slot, Cap> {
        if listener.load(SeqCst) >= caps.1 {
            return Err(Cap::Listener);
        }
        self.open
            .fetch_update(SeqCst, SeqCst, |n| (n < caps.0).then_some(n + 1))
            .map_err(|_| Cap::Global)?;
        listener.fetch_add(1, SeqCst);
        Ok(Slot {
            limits: Arc::clone(self),
            listener: Arc::clone(listener),
        })
    }

    /// Takes a slot for a connection just accepted, as both caps (from `caps()` at each
    /// look: global, this listener) allow, waiting for room if they are full: the
    /// connection waits unanswered meanwhile, as the ones behind it do in the backlog.
    /// `full` is told once if a cap made it wait. `None` once `stop` resolves.
    pub async fn admit(
        self: &Arc<Self>,
        listener: &Arc<AtomicUsize>,
        caps: &impl Fn() -> (usize, usize),
        full: &mut impl FnMut(Cap),
        stop: impl Future<Output = ()>,
    ) -> Option<Slot> {
        self.wait(listener, || self.take(listener, caps()), full, stop)
            .await
    }

    /// Tries `attempt` until it succeeds, sleeping between tries until a connection
    /// closes, the caps change, or [`RECHECK`] passes. `full` hears of the first refusal
    /// only: one wait, one count. Each refusal asks idle keep-alive connections under the
    /// full cap to close (see [`crate::reclaim`]), unless `stop` has resolved. `None` once
    /// `stop` resolves.
    async fn wait<T>(
        &self,
        listener: &AtomicUsize,
        mut attempt: impl FnMut() -> Result<T, Cap>,
        full: &mut impl FnMut(Cap),
        stop: impl Future<Output = ()>,
    ) -> Option<T> {
        let first = match attempt() {
            Ok(got) => return Some(got),
            Err(cap) => cap,
        };
        full(first);
        tokio::pin!(stop);
        // Stopped already (a held client that gave up in the backlog, say): no reason to
        // close anyone's connection.
        if poll_once(stop.as_mut()).await.is_ready() {
            return None;
        }
        self.reclaim(first, listener);
        loop {
            // Registered before the counts are read again, so that a close between the
            // two still wakes this loop (see `Slot::drop`).
            let freed = self.freed.notified();
            let changed = self.changed.notified();
            tokio::pin!(freed, changed);
            freed.as_mut().enable();
            changed.as_mut().enable();
            self.waiting.fetch_add(1, SeqCst);
            match attempt() {
                Ok(got) => {
                    self.waiting.fetch_sub(1, SeqCst);
                    return Some(got);
                }
                Err(cap) => self.reclaim(cap, listener),
            }
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

/// Polls `f` once, in the calling task.
async fn poll_once<F: Future + Unpin>(mut f: F) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut f).poll(cx))).await
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

    #[test]
    fn slots_count_against_both_caps_and_come_back_on_drop() {
        let limits = Arc::new(Limits::default());
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let one = limits.take(&a, (3, 1)).expect("first on a");
        assert_eq!(limits.take(&a, (3, 1)).unwrap_err(), Cap::Listener);
        assert_eq!((limits.open(), a.load(SeqCst)), (1, 1));
        let two = limits.take(&b, (3, 5)).expect("first on b");
        let three = limits.take(&b, (3, 5)).expect("second on b");
        assert_eq!(limits.take(&b, (3, 5)).unwrap_err(), Cap::Global);
        // Refused takes leave both counts as they were.
        assert_eq!((limits.open(), b.load(SeqCst)), (3, 2));
        drop(one);
        assert_eq!((limits.open(), a.load(SeqCst)), (2, 0));
        let four = limits.take(&a, (3, 1)).expect("a has room again");
        drop((two, three));
        assert_eq!((limits.open(), b.load(SeqCst)), (1, 0));
        drop(four);
        assert_eq!((limits.open(), a.load(SeqCst)), (0, 0));
    }

    // Paused time: the recheck would fire only once the runtime idles and time jumps,
    // so a wake-up before `RECHECK` can only be the close's. The close is on another
    // listener, so that only the global count can wake the loop.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_loop_gets_the_room_a_close_frees() {
        let limits = Arc::new(Limits::default());
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let held = limits.take(&a, (1, 10)).expect("room");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiter = {
            let (limits, b) = (Arc::clone(&limits), Arc::clone(&b));
            tokio::spawn(async move {
                let mut full = Vec::new();
                let slot = limits
                    .admit(&b, &|| (1, 10), &mut |c| full.push(c), async {
                        let _ = rx.await;
                    })
                    .await;
                (slot, full)
            })
        };
        until_waiting(&limits).await;
        let woke = tokio::time::Instant::now();
        drop(held);
        let (got, full) = waiter.await.expect("no panic");
        assert!(got.is_some(), "the freed room went to the waiting loop");
        assert_eq!(full, vec![Cap::Global]);
        // Woken by the close, not by the once-a-second recheck.
        assert!(woke.elapsed() < RECHECK, "took {:?}", woke.elapsed());
        assert_eq!((limits.open(), b.load(SeqCst)), (1, 1));
        drop(tx);
    }

    /// A connection in its slot, registered among those a full cap may ask to close.
    fn registered(
        limits: &Arc<Limits>,
        l: &Arc<AtomicUsize>,
        caps: (usize, usize),
    ) -> (Slot, crate::reclaim::Registration) {
        let slot = limits.take(l, caps).expect("room");
        let counter = duplex_metrics::Counter::new("reclaimed", "test").expect("counter");
        let registration = limits.idle.register(Arc::clone(slot.listener()), counter);
        (slot, registration)
    }

    // A connection busy at the first refusal is asked to close at a later look, once
    // idle; it holds the only place, so its close is what lets the loop in.
    #[tokio::test(start_paused = true)]
    async fn a_connection_that_goes_idle_at_a_cap_is_asked_to_close_at_the_next_look() {
        let (limits, l) = (Arc::new(Limits::default()), Arc::new(AtomicUsize::new(0)));
        let (slot, registration) = registered(&limits, &l, (10, 1));
        registration.conn.request_started();
        let waiter = {
            let (limits, l) = (Arc::clone(&limits), Arc::clone(&l));
            tokio::spawn(async move {
                limits
                    .admit(&l, &|| (10, 1), &mut |_| {}, std::future::pending())
                    .await
                    .is_some()
            })
        };
        until_waiting(&limits).await;
        {
            let close = registration.conn.asked_to_close();
            tokio::pin!(close);
            assert!(
                poll_once(close.as_mut()).await.is_pending(),
                "busy at the first refusal: not asked"
            );
            registration.conn.request_ended();
            let idle = tokio::time::Instant::now();
            tokio::time::timeout(RECHECK * 3, close)
                .await
                .expect("asked to close once idle");
            assert!(
                idle.elapsed() <= RECHECK,
                "asked after {:?}",
                idle.elapsed()
            );
        }
        drop((registration, slot));
        assert!(waiter.await.expect("no panic"));
    }

    // A wait that is over before it starts (the held client has gone) closes nobody.
    #[tokio::test(start_paused = true)]
    async fn a_wait_stopped_already_asks_no_connection_to_close() {
        let (limits, l) = (Arc::new(Limits::default()), Arc::new(AtomicUsize::new(0)));
        let (_slot, registration) = registered(&limits, &l, (1, 10));
        registration.conn.request_started();
        registration.conn.request_ended();
        let mut fulls = 0;
        let got = limits
            .admit(&l, &|| (1, 10), &mut |_| fulls += 1, async {})
            .await;
        assert!(got.is_none());
        assert_eq!(fulls, 1, "the wait is counted");
        assert_eq!(
            limits.idle.reclaim(None),
            1,
            "the idle one was not asked before"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_wakes_a_waiting_loop_at_once() {
        let limits = Arc::new(Limits::default());
        let l = Arc::new(AtomicUsize::new(0));
        let _held = limits.take(&l, (10, 1)).expect("room");
        let cap = Arc::new(AtomicUsize::new(1));
        let waiter = {
            let (limits, l, cap) = (Arc::clone(&limits), Arc::clone(&l), Arc::clone(&cap));
            tokio::spawn(async move {
                let caps = || (10, cap.load(SeqCst));
                limits
                    .admit(&l, &caps, &mut |_| {}, std::future::pending())
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

    // A loop waiting at one cap must sleep, not wake itself, and counts one wait however
    // often it looks again: over three rechecks' time, `full` hears of it once.
    #[tokio::test(start_paused = true)]
    async fn a_loop_at_a_cap_waits_without_spinning_and_counts_once() {
        for caps in [(10, 1), (1, 10)] {
            let limits = Arc::new(Limits::default());
            let l = Arc::new(AtomicUsize::new(0));
            let _held = limits.take(&l, caps).expect("room");
            let looks = AtomicUsize::new(0);
            let attempt = || {
                assert!(looks.fetch_add(1, SeqCst) < 100, "spinning at {caps:?}");
                limits.take(&l, caps)
            };
            let mut fulls = 0;
            let got = limits
                .wait(
                    &l,
                    attempt,
                    &mut |_| fulls += 1,
                    tokio::time::sleep(RECHECK * 3),
                )
                .await;
            assert!(got.is_none());
            assert_eq!(fulls, 1);
            assert!(
                looks.load(SeqCst) <= 5,
                "{} looks at {caps:?}",
                looks.load(SeqCst)
            );
        }
    }

    #[tokio::test]
    async fn stop_ends_the_wait() {
        let limits = Arc::new(Limits::default());
        let l = Arc::new(AtomicUsize::new(0));
        let _held = limits.take(&l, (1, 1)).expect("room");
        let slot = limits.admit(&l, &|| (1, 1), &mut |_| {}, async {}).await;
        assert!(slot.is_none());
        assert_eq!(limits.waiting.load(SeqCst), 0);
        assert_eq!((limits.open(), l.load(SeqCst)), (1, 1));
    }

    #[test]
    fn the_default_cap_leaves_a_reserve_and_halves_the_rest() {
        assert_eq!(cap_for(20_000), 9_950);
        assert_eq!(cap_for(1_048_576), 524_238);
        assert_eq!(cap_for(50), 1);
    }
}
