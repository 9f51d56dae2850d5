//! Remembers backends that left a short while ago, so that one coming back resumes its health.
//!
//! A DNS server that answers with a rotating subset of a name's addresses (Route 53
//! multivalue answers, some Consul setups) removes and adds backends at every resolution.
//! Without this, a backend failing its checks or ejected would come back as new: healthy,
//! its ejection and failure counts forgotten. A backend whose drain ended is kept here;
//! a table that names it again takes its state back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_balance::BackendState;

/// How long a backend's state is kept after its drain ends: the longest an ejection lasts
/// by default.
const KEEP: Duration = Duration::from_secs(300);
/// At most this many are kept; past it the one kept longest goes.
const MAX: usize = 4096;

/// Backends whose drain ended, by (upstream, address), with when it ended.
#[derive(Default)]
pub struct Retired {
    by_key: HashMap<(String, SocketAddr), (Arc<BackendState>, Instant)>,
}

impl Retired {
    /// Keeps `state`, whose drain from `upstream` ended at `now`.
    pub fn keep(&mut self, upstream: &str, state: Arc<BackendState>, now: Instant) {
        self.by_key
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < KEEP);
        if self.by_key.len() >= MAX {
            let oldest = self
                .by_key
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.by_key.remove(&k);
            }
        }
        self.by_key
            .insert((upstream.to_owned(), state.addr), (state, now));
    }

    /// The state of `addr` in `upstream`, if it left less than [`KEEP`] before `now`.
    pub fn take(
        &mut self,
        upstream: &str,
        addr: SocketAddr,
        now: Instant,
    ) -> Option<Arc<BackendState>> {
        let (state, at) = self.by_key.remove(&(upstream.to_owned(), addr))?;
        (now.saturating_duration_since(at) < KEEP).then_some(state)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(port: u16) -> Arc<BackendState> {
        BackendState::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn a_state_comes_back_within_the_time_and_by_upstream() {
        let mut r = Retired::default();
        let now = Instant::now();
        let s = state(1);
        r.keep("u", Arc::clone(&s), now);
        assert!(r.take("other", s.addr, now).is_none(), "another upstream's");
        let back = r.take("u", s.addr, now + KEEP / 2).expect("kept");
        assert!(Arc::ptr_eq(&back, &s));
        assert!(r.take("u", s.addr, now).is_none(), "taken once");
        r.keep("u", Arc::clone(&s), now);
        assert!(r.take("u", s.addr, now + KEEP).is_none(), "too old");
    }

    #[test]
    fn old_ones_go_and_the_count_is_bounded() {
        let mut r = Retired::default();
        let now = Instant::now();
        r.keep("u", state(1), now);
        r.keep("u", state(2), now + KEEP);
        assert_eq!(r.len(), 1, "the first went when the second came");
        for port in 0..(MAX as u16 + 10) {
            r.keep(
                "v",
                state(port),
                now + KEEP + Duration::from_millis(u64::from(port)),
            );
        }
        assert_eq!(r.len(), MAX);
        let newest = SocketAddr::from(([127, 0, 0, 1], MAX as u16 + 9));
        assert!(r.take("v", newest, now + KEEP).is_some());
    }
}
