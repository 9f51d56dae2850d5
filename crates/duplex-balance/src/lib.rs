//! Picks backends for a connection: the balancer trait, shared backend load, and the algorithms.
//!
//! A [`Pool`] is built once per configuration generation from a list of [`Backend`]s. Each
//! backend's [`BackendState`] (its open-connection count) lives in an `Arc` that a reload
//! hands to the next generation when the backend stays, so load is never reset. Picking is
//! synchronous and lock-free: atomics only.

#![forbid(unsafe_code)]

mod consistent_hash;
mod hash;
mod least_conn;
mod p2c;
mod random;
mod round_robin;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use duplex_config::{BalancerKind, HashKey, PanicMode, PassiveHealth};
use http::uri::Authority;
use http::HeaderMap;

pub use consistent_hash::ConsistentHash;
pub use least_conn::LeastConn;
pub use p2c::PowerOfTwo;
pub use random::Random;
pub use round_robin::RoundRobin;

/// What a balancer may look at to place a connection.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub client_ip: IpAddr,
    pub headers: &'a HeaderMap,
    /// The request's query string, without the `?`.
    pub query: Option<&'a str>,
}

/// The part of a backend that outlives a configuration generation.
#[derive(Debug)]
pub struct BackendState {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once rather than per HTTP request.
    pub authority: Authority,
    /// Open WebSocket tunnels plus in-flight HTTP requests (and handshakes under way), kept
    /// by [`LoadGuard`]s.
    load: AtomicUsize,
    /// The part of `load` that is open tunnels, for status pages; kept by [`TunnelMark`]s.
    tunnels: AtomicUsize,
    /// Health as active checks see it; true until a check says otherwise.
    healthy: AtomicBool,
    /// Passive health: consecutive failures, ejections in a row, and the end of the
    /// current ejection in milliseconds on [`clock_ms`].
    fails: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Active checks in a row that passed, and that failed; kept here rather than in the
    /// check task so that a reload does not start them over.
    check_passes: AtomicU32,
    check_fails: AtomicU32,
    /// An active check's probe is under way. Kept here, not in the check task: a probe
    /// outlives the task that started it when a reload or DNS change replaces the table,
    /// and the next table's task must not start a second one beside it.
    probing: AtomicBool,
    /// Plain HTTP response bodies this backend broke off, not yet copied into the metric
    /// (done at each scrape, so that the request path pays one atomic add, and only on
    /// that failure).
    response_errors: AtomicU64,
    /// What the last active check found, for status pages: HAProxy's stats show why a
    /// server is down, not only that it is. Written once per check, read by `/status`.
    last_check: Mutex<LastCheck>,
}

/// What the last active check of a backend found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastCheck {
    /// No check has ended since the checks began (or changed).
    None,
    Passed,
    /// Failed, and why.
    Failed(String),
}

/// Milliseconds since the first call: a monotonic clock that fits an atomic.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl BackendState {
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        // A socket address always prints as a valid authority; the fallback is unreachable.
        let authority = Authority::try_from(addr.to_string())
            .unwrap_or_else(|_| Authority::from_static("0.0.0.0"));
        Arc::new(BackendState {
            addr,
            authority,
            load: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            check_passes: AtomicU32::new(0),
            check_fails: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            response_errors: AtomicU64::new(0),
            last_check: Mutex::new(LastCheck::None),
        })
    }

    /// Whether new connections may go here: healthy and not ejected.
    pub fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_ejected()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.is_ejected_at(clock_ms())
    }

    /// How much of the current passive ejection is left; `None` when not ejected.
    pub fn ejection_left(&self) -> Option<Duration> {
        let left = self
            .ejected_until_ms
            .load(Ordering::Relaxed)
            .checked_sub(clock_ms())?;
        (left > 0).then(|| Duration::from_millis(left))
    }

    /// As [`is_available`](Self::is_available), at `now` on [`clock_ms`] (read once for a
    /// whole pick rather than once per backend).
    fn is_available_at(&self, now: u64) -> bool {
        self.is_healthy() && !self.is_ejected_at(now)
    }

    fn is_ejected_at(&self, now: u64) -> bool {
        now < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Keeps what the last active check found.
    pub fn note_check(&self, found: LastCheck) {
        *self
            .last_check
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = found;
    }

    pub fn last_check(&self) -> LastCheck {
        self.last_check
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counts one active check; returns the passes and failures in a row so far.
    pub fn record_check(&self, ok: bool) -> (u32, u32) {
        let (this, other) = if ok {
            (&self.check_passes, &self.check_fails)
        } else {
            (&self.check_fails, &self.check_passes)
        };
        other.store(0, Ordering::Relaxed);
        let n = this.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if ok {
            (n, 0)
        } else {
            (0, n)
        }
    }

    /// Counts a response body this backend broke off.
    pub fn count_response_error(&self) {
        self.response_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The response bodies broken off since the last call.
    pub fn take_response_errors(&self) -> u64 {
        self.response_errors.swap(0, Ordering::Relaxed)
    }

    /// Marks a probe as under way; false if one already is.
    pub fn start_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    /// Marks the probe started by [`BackendState::start_probe`] as ended.
    pub fn end_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Forgets the passes and failures in a row (the checks changed); keeps the verdict.
    pub fn reset_checks(&self) {
        self.check_passes.store(0, Ordering::Relaxed);
        self.check_fails.store(0, Ordering::Relaxed);
        self.note_check(LastCheck::None);
    }

    /// Sets the active-check verdict; returns whether it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// A connection to this backend worked: the failure count starts over, and so does the
    /// growth of ejections.
    pub fn record_success(&self) {
        if self.fails.swap(0, Ordering::Relaxed) != 0 || !self.is_ejected() {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failed or a handshake timed out. After `max_fails` in a row the backend is
    /// ejected for `fail_timeout`, doubled for each ejection in a row up to the maximum;
    /// returns the ejection's length when this failure caused one. Failures while ejected
    /// are not counted.
    pub fn record_failure(&self, p: &PassiveHealth) -> Option<Duration> {
        // Failures of attempts begun before an ejection (a burst of handshakes timing
        // out together) belong to that ejection, not to a new, longer one.
        if p.max_fails == 0 || self.is_ejected() {
            return None;
        }
        // One step: the failure that reaches `max_fails` starts the count over, and only
        // it ejects (two failing at once must not eject twice, doubling the length).
        let max = p.max_fails;
        let prev = self
            .fails
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(if f.saturating_add(1) >= max { 0 } else { f + 1 })
            })
            .unwrap_or_else(|f| f);
        if prev.saturating_add(1) < max {
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let length = p
            .fail_timeout
            .saturating_mul(1 << n)
            .min(p.max_fail_timeout);
        self.ejected_until_ms
            .store(clock_ms() + length.as_millis() as u64, Ordering::Relaxed);
        Some(length)
    }

    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// Counts one more connection on this backend until the guard drops.
    pub fn guard(self: &Arc<Self>) -> LoadGuard {
        self.load.fetch_add(1, Ordering::Relaxed);
        LoadGuard(Arc::clone(self))
    }
}

/// One unit of load on a backend, released on drop.
#[derive(Debug)]
pub struct LoadGuard(Arc<BackendState>);

impl LoadGuard {
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }

    /// Marks this unit of load as an open tunnel (rather than a request) until dropped.
    pub fn into_tunnel(self) -> TunnelMark {
        self.0.tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelMark(self)
    }
}

/// A [`LoadGuard`] that is an open tunnel.
#[derive(Debug)]
pub struct TunnelMark(LoadGuard);

impl Drop for TunnelMark {
    fn drop(&mut self) {
        self.0 .0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend as one configuration generation sees it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub state: Arc<BackendState>,
    pub weight: u32,
}

/// An algorithm that orders backends for one connection.
pub trait Balancer: Send + Sync {
    /// Pushes up to `max` distinct indexes into `backends` that `usable` accepts onto `out`,
    /// best first, so that a retry can take the next one. Called once per connection: any
    /// state it keeps (a turn, a rotation) moves on once.
    fn pick(
        &self,
        backends: &[Backend],
        ctx: &Context<'_>,
        usable: &dyn Fn(usize) -> bool,
        max: usize,
        out: &mut Vec<usize>,
    );
}

/// An upstream's backends and the balancer that chooses among them.
pub struct Pool {
    backends: Vec<Backend>,
    balancer: Box<dyn Balancer>,
    panic_mode: PanicMode,
}

impl Pool {
    pub fn new(
        kind: BalancerKind,
        hash_key: Option<&HashKey>,
        panic_mode: PanicMode,
        backends: Vec<Backend>,
    ) -> Pool {
        let balancer: Box<dyn Balancer> = match kind {
            BalancerKind::RoundRobin => Box::new(RoundRobin::new(&backends)),
            BalancerKind::LeastConn => Box::new(LeastConn::default()),
            BalancerKind::P2c => Box::new(PowerOfTwo),
            BalancerKind::Random => Box::new(Random),
            BalancerKind::ConsistentHash => Box::new(ConsistentHash::new(
                hash_key.cloned().unwrap_or(HashKey::Ip),
                &backends,
            )),
        };
        Pool {
            backends,
            balancer,
            panic_mode,
        }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Up to `max` distinct available backends for one connection, best first. When none
    /// is available, `panic_mode` decides: any of them (open) or none (closed).
    pub fn candidates(&self, ctx: &Context<'_>, max: usize) -> Vec<&Backend> {
        let mut idx = Vec::with_capacity(max.min(self.backends.len()));
        let now = clock_ms();
        let available = |i: usize| self.backends[i].state.is_available_at(now);
        let open = self.panic_mode == PanicMode::Open;
        // Whether none is available: looked at only once one turns out not to be.
        let none = std::cell::OnceCell::new();
        let usable = |i: usize| {
            available(i) || (open && *none.get_or_init(|| !(0..self.backends.len()).any(available)))
        };
        // Backends out of service are skipped inside the one pick, so that each
        // algorithm's order (ring, schedule, load) holds among the rest and its turn moves
        // on once per connection, in panic mode too.
        self.balancer
            .pick(&self.backends, ctx, &usable, max, &mut idx);
        idx.into_iter().map(|i| &self.backends[i]).collect()
    }
}

/// Compares load per weight without division: is `a` less loaded than `b`?
pub(crate) fn lighter(a: &Backend, b: &Backend) -> std::cmp::Ordering {
    let la = a.state.load() as u64 * u64::from(b.weight);
    let lb = b.state.load() as u64 * u64::from(a.weight);
    la.cmp(&lb)
}

/// Draws an index with probability proportional to its weight, among those `allow` accepts.
pub(crate) fn weighted_draw(backends: &[Backend], allow: impl Fn(usize) -> bool) -> Option<usize> {
    let total: u64 = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| allow(*i))
        .map(|(_, b)| u64::from(b.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..total);
    // `allow` reads live health: one taken out between the sum and this walk leaves the
    // draw short of its total, and the last allowed one takes the rest.
    let mut last = None;
    for (i, b) in backends.iter().enumerate() {
        if !allow(i) {
            continue;
        }
        let w = u64::from(b.weight);
        if r < w {
            return Some(i);
        }
        r -= w;
        last = Some(i);
    }
    last
}

#[cfg(test)]
mod health_tests {
    use super::*;
    use crate::test_util::{backends, ctx};

    fn pool(panic_mode: PanicMode) -> Pool {
        Pool::new(
            BalancerKind::RoundRobin,
            None,
            panic_mode,
            backends(&[1, 1, 1]),
        )
    }

    #[test]
    fn skips_unavailable_backends_and_panics_open_or_closed() {
        let h = HeaderMap::new();
        for mode in [PanicMode::Open, PanicMode::Closed] {
            let p = pool(mode);
            p.backends()[1].state.set_healthy(false);
            for _ in 0..6 {
                let c = p.candidates(&ctx(&h), 3);
                assert_eq!(c.len(), 2);
                assert!(c.iter().all(|b| b.state.addr.port() != 9001));
            }
            p.backends()[0].state.set_healthy(false);
            p.backends()[2].state.set_healthy(false);
            let n = p.candidates(&ctx(&h), 3).len();
            assert_eq!(n, if mode == PanicMode::Open { 3 } else { 0 }, "{mode:?}");
        }
    }

    /// With one backend out, the others share the first picks evenly, for every algorithm
    /// that takes turns, and a backend out is never offered, not even as a retry.
    #[test]
    fn first_picks_are_shared_evenly_while_one_backend_is_out() {
        let h = HeaderMap::new();
        for kind in [BalancerKind::RoundRobin, BalancerKind::LeastConn] {
            let p = Pool::new(kind, None, PanicMode::Open, backends(&[1, 1, 1, 1]));
            p.backends()[1].state.set_healthy(false);
            let mut first = [0; 4];
            for _ in 0..3000 {
                let c = p.candidates(&ctx(&h), 3);
                assert_eq!(c.len(), 3, "{kind:?}");
                assert!(c.iter().all(|b| b.state.addr.port() != 9001), "{kind:?}");
                first[usize::from(c[0].state.addr.port() - 9000)] += 1;
            }
            assert_eq!(first, [1000, 0, 1000, 1000], "{kind:?}");
        }
    }

    /// With every backend out and `panic_mode: open`, turns still go round: two
    /// backends share the connections rather than one taking them all.
    #[test]
    fn panic_mode_open_still_takes_turns() {
        let h = HeaderMap::new();
        for n in [2u16, 3, 4] {
            let p = Pool::new(
                BalancerKind::RoundRobin,
                None,
                PanicMode::Open,
                backends(&vec![1; usize::from(n)]),
            );
            p.backends().iter().for_each(|b| {
                b.state.set_healthy(false);
            });
            let mut first = vec![0; usize::from(n)];
            for _ in 0..(100 * n) {
                let c = p.candidates(&ctx(&h), 2);
                assert_eq!(c.len(), 2);
                first[usize::from(c[0].state.addr.port() - 9000)] += 1;
            }
            assert!(first.iter().all(|&k| k == 100), "{n}: {first:?}");
        }
    }

    #[test]
    fn ejection_needs_max_fails_in_a_row_and_grows() {
        let b = BackendState::new(SocketAddr::from(([127, 0, 0, 1], 1)));
        let p = PassiveHealth {
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
            max_fail_timeout: Duration::from_secs(25),
        };
        assert_eq!(b.record_failure(&p), None);
        assert_eq!(b.record_failure(&p), None);
        b.record_success();
        assert_eq!(
            b.record_failure(&p),
            None,
            "a success starts the count over"
        );
        assert_eq!(b.record_failure(&p), None);
        assert_eq!(b.record_failure(&p), Some(Duration::from_secs(10)));
        assert!(b.is_ejected() && !b.is_available());
        for _ in 0..10 {
            assert_eq!(
                b.record_failure(&p),
                None,
                "failures while ejected do not count"
            );
        }
        for want in [20, 25] {
            b.ejected_until_ms.store(0, Ordering::Relaxed);
            for _ in 0..2 {
                b.record_failure(&p);
            }
            assert_eq!(
                b.record_failure(&p),
                Some(Duration::from_secs(want)),
                "doubles up to the bound"
            );
        }
        let off = PassiveHealth { max_fails: 0, ..p };
        assert_eq!(BackendState::new(b.addr).record_failure(&off), None);
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Backend {
                state: BackendState::new(SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16))),
                weight,
            })
            .collect()
    }

    pub fn ctx(headers: &HeaderMap) -> Context<'_> {
        Context {
            client_ip: IpAddr::from([127, 0, 0, 1]),
            headers,
            query: None,
        }
    }

    /// How many of `n` first picks went to each backend.
    pub fn tally(b: &dyn Balancer, backends: &[Backend], n: usize) -> Vec<usize> {
        let headers = HeaderMap::new();
        let mut counts = vec![0; backends.len()];
        let mut out = Vec::new();
        for _ in 0..n {
            out.clear();
            b.pick(backends, &ctx(&headers), &|_| true, 1, &mut out);
            counts[out[0]] += 1;
        }
        counts
    }
}
