//! Backend health: active checks (a scheduling task per upstream, a task per probe; the
//! probe itself is in `probe`) and passive ejection.
//!
//! Verdicts live in each backend's shared state, so balancers skip unhealthy or ejected
//! backends without asking anyone, and the state survives reloads with the backend.

use std::sync::Arc;

use duplex_balance::{BackendState, LastCheck};
use duplex_config::HealthCheck;
use tokio_util::sync::CancellationToken;

use crate::probe::{probe, ProbeError};
use crate::state::{Shared, Table, UpstreamRt};

/// Records a connect failure or handshake timeout; ejects the backend after `max_fails`
/// in a row.
pub fn passive_failure(shared: &Shared, up: &UpstreamRt, state: &BackendState) {
    if let Some(length) = state.record_failure(&up.cfg.passive) {
        let backend = state.addr.to_string();
        tracing::warn!(upstream = %up.cfg.name, %backend, ?length, "backend ejected after repeated failures");
        let m = &shared.metrics;
        m.backend_ejections
            .with_label_values(&[&up.cfg.name, &backend])
            .inc();
        m.backend_up
            .with_label_values(&[&up.cfg.name, &backend])
            .set(0);
    }
}

/// Starts the active checks of every upstream of `table` that has them; cancelling the
/// returned token stops them (a reload starts the next generation's).
pub fn spawn_checks(shared: &Arc<Shared>, table: &Table) -> CancellationToken {
    let stop = shared.closing.child_token();
    for up in table.upstreams.values() {
        if let Some(hc) = up.cfg.health_check.clone() {
            tokio::spawn(run(Arc::clone(shared), Arc::clone(up), hc, stop.clone()));
        }
    }
    stop
}

/// Checks each backend of one upstream in turn, spread over the interval with jitter.
///
/// Each probe runs as a task of its own, so a backend that lets its probes time out
/// (dropped SYNs, a hung process) delays nobody else's: every backend is checked once
/// per interval however many are slow, and however many there are. A backend whose
/// previous probe is still running (possible when `timeout` is close to `interval`)
/// skips a turn. A probe is not cut short when a reload or DNS change replaces this
/// task: its verdict still counts if its checks and its backend are unchanged (see
/// [`check_once`]), or a table replaced more often than a probe's `timeout` would never
/// see a slow backend's verdict.
async fn run(shared: Arc<Shared>, up: Arc<UpstreamRt>, hc: HealthCheck, stop: CancellationToken) {
    let backends: Vec<Arc<BackendState>> = up
        .pool
        .backends()
        .iter()
        .map(|b| Arc::clone(&b.state))
        .collect();
    if backends.is_empty() {
        return;
    }
    let n = backends.len();
    let hc = Arc::new(hc);
    let mut pace = Pacer::new(tokio::time::Instant::now(), hc.interval, n);
    // Replicas and upstreams start at different backends: a table replaced more often
    // than once per interval (reloads, DNS changes) still gets every backend checked.
    let first = fastrand::usize(..n);
    loop {
        for k in 0..n {
            let i = (first + k) % n;
            let due = pace.next(tokio::time::Instant::now());
            if due > tokio::time::Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.cancelled() => return,
                }
            } else {
                // Behind (slots shorter than the timer's millisecond): catch up without
                // sleeping, but let other tasks run between probes.
                tokio::task::yield_now().await;
                if stop.is_cancelled() {
                    return;
                }
            }
            let Some(probing) = Probing::start(&backends[i]) else {
                continue;
            };
            tokio::spawn(check_once(
                Arc::clone(&shared),
                Arc::clone(&up),
                Arc::clone(&hc),
                probing,
                stop.clone(),
            ));
        }
    }
}

/// A backend's probe under way; ends it when dropped (done, or its task gone).
struct Probing(Arc<BackendState>);

impl Probing {
    fn start(state: &Arc<BackendState>) -> Option<Probing> {
        state.start_probe().then(|| Probing(Arc::clone(state)))
    }
}

impl Drop for Probing {
    fn drop(&mut self) {
        self.0.end_probe();
    }
}

/// How far behind its deadlines the probing may fall and still catch up; past it, the
/// deadlines start again from now.
const CATCH_UP: std::time::Duration = std::time::Duration::from_millis(50);

/// When each probe of one upstream is due: one slot (`interval / n`) after the one
/// before, with jitter. Kept as deadlines rather than pauses, so that slots shorter than
/// the timer's millisecond (thousands of backends) still add up to one round per interval.
struct Pacer {
    /// When the next probe is due.
    at: tokio::time::Instant,
    slot: std::time::Duration,
}

impl Pacer {
    fn new(now: tokio::time::Instant, interval: std::time::Duration, n: usize) -> Pacer {
        let slot = interval / n.max(1) as u32;
        // Replicas start at different moments within the first slot.
        Pacer {
            at: now + slot.mul_f64(fastrand::f64()),
            slot,
        }
    }

    /// The deadline of the next probe, and moves on by one slot.
    fn next(&mut self, now: tokio::time::Instant) -> tokio::time::Instant {
        if self.at + CATCH_UP < now {
            // Well behind (a starved runtime, a stopped process, a suspended machine):
            // go on from now rather than probing the ones missed in one burst. Within
            // the bound, the timer's own lateness is made up.
            self.at = now;
        }
        let due = self.at;
        // Jitter of +-10% keeps replicas from checking in lockstep.
        self.at = due + self.slot.mul_f64(0.9 + 0.2 * fastrand::f64());
        due
    }
}

/// One probe of one backend, and its verdict. `stop` is cancelled when a reload or DNS
/// change replaces the checks: the verdict then counts only if the table in force has
/// the same checks for this upstream and still holds this backend.
async fn check_once(
    shared: Arc<Shared>,
    up: Arc<UpstreamRt>,
    hc: Arc<HealthCheck>,
    probing: Probing,
    stop: CancellationToken,
) {
    let state = &probing.0;
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(hc.timeout, probe(&hc, &up, state.addr)) => outcome,
        _ = shared.closing.cancelled() => return,
    };
    let result = outcome.unwrap_or(Err(ProbeError::TimedOut));
    if let Err(e) = &result {
        tracing::debug!(upstream = %up.cfg.name, backend = %state.addr, error = %e.reason(), "health check failed");
    }
    // After a rebuild the verdict goes by the table in force (its
    // close_tunnels_on_unhealthy, its closers), if that table still checks this backend so.
    let up = if stop.is_cancelled() {
        match still_checked(&shared, &up.cfg.name, &hc, state) {
            Some(now) => now,
            None => return,
        }
    } else {
        up
    };
    // A local failure (out of file descriptors) or a request duplex could not build is
    // not the backend's fault: no verdict.
    if !matches!(&result, Err(ProbeError::Local(_) | ProbeError::Request(_))) {
        verdict(&shared, &up, &hc, state, result.as_ref().err());
    }
}

/// The upstream `name` of the table in force, if it checks `state`'s backend as `hc`
/// says. (A backend listed again under a fresh state takes the verdict on the old one,
/// which no table holds: harmless.)
fn still_checked(
    shared: &Shared,
    name: &str,
    hc: &HealthCheck,
    state: &BackendState,
) -> Option<Arc<UpstreamRt>> {
    let table = shared.table.load();
    let up = table.upstreams.get(name)?;
    (up.cfg.health_check.as_ref() == Some(hc) && up.closers.contains_key(&state.addr))
        .then(|| Arc::clone(up))
}

/// Counts a check (`failed` says why it failed, if it did) and flips the backend at the
/// thresholds.
fn verdict(
    shared: &Shared,
    up: &UpstreamRt,
    hc: &HealthCheck,
    state: &BackendState,
    failed: Option<&ProbeError>,
) {
    let ok = failed.is_none();
    let backend = state.addr.to_string();
    let m = &shared.metrics;
    let result = if ok { "ok" } else { "fail" };
    m.backend_health_checks
        .with_label_values(&[&up.cfg.name, &backend, result])
        .inc();
    let (passes, fails) = state.record_check(ok);
    state.note_check(match failed {
        None => LastCheck::Passed,
        Some(why) => LastCheck::Failed(why.reason()),
    });
    if ok {
        if !state.is_healthy() && passes >= hc.healthy_threshold && state.set_healthy(true) {
            tracing::info!(upstream = %up.cfg.name, %backend, "backend healthy again: taking new connections");
        }
    } else if let Some(why) = failed {
        if state.is_healthy() && fails >= hc.unhealthy_threshold && state.set_healthy(false) {
            // The last failure says why; each one is at debug level.
            tracing::warn!(upstream = %up.cfg.name, %backend, error = %why.reason(), "backend unhealthy: no new connections");
            if up.cfg.close_tunnels_on_unhealthy {
                if let Some(closer) = up.closers.get(&state.addr) {
                    closer.close_open_tunnels();
                }
            }
        }
    }
    m.backend_up
        .with_label_values(&[&up.cfg.name, &backend])
        .set(i64::from(state.is_available()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    /// 2,000 backends checked every second: slots of half a millisecond, which a timer
    /// with millisecond resolution cannot sleep. Woken a millisecond late each time, the
    /// deadlines must still come a slot apart, so the round takes the interval.
    #[test]
    fn a_round_takes_the_interval_however_short_the_slots() {
        let start = Instant::now();
        let interval = Duration::from_secs(1);
        let mut pace = Pacer::new(start, interval, 2000);
        let mut now = start;
        let mut last = start;
        for _ in 0..2000 {
            let due = pace.next(now);
            assert!(due >= last, "deadlines never go back");
            last = due;
            // As the loop does: sleeps only to a deadline still ahead, and the timer fires
            // a millisecond after it.
            if due > now {
                now = due + Duration::from_millis(1);
            }
        }
        let round = last - start;
        assert!(
            round > Duration::from_millis(850) && round < Duration::from_millis(1150),
            "one round took {round:?}"
        );
    }

    /// After a stall the probes go on from now, not in one burst.
    #[test]
    fn a_stall_does_not_make_a_burst() {
        for stall in [Duration::from_millis(800), Duration::from_secs(60)] {
            let start = Instant::now();
            let mut pace = Pacer::new(start, Duration::from_secs(1), 10);
            let late = start + stall;
            let due = pace.next(late);
            assert!(due >= late);
            let next = pace.next(late);
            assert!(
                next >= late + Duration::from_millis(90),
                "{:?}",
                next - late
            );
        }
    }
}
