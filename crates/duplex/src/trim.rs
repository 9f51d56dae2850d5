//! Gives memory freed by a burst of connections back to the kernel once the burst is over.
//!
//! Every handshake allocates buffers (hyper's read and write buffers on both sides, the
//! request and response heads) that are freed when its tunnel starts, but glibc keeps
//! freed memory between live blocks resident. After a burst of thousands of handshakes
//! that is about a sixth of an idle tunnel's footprint; after thousands of tunnels close
//! at once (a backend gone, a drain ended), it is all they held. Once accepts have been
//! quiet for a whole [`QUIET`] period after a burst of at least [`BURST`] accepts or
//! closes, and no sooner than [`GAP`] after the last trim, a thread of its own asks the
//! allocator to return every free page (`malloc_trim`). A trim holds the allocator's lock for about 1 ms per 10,000
//! open tunnels, so steady churn never triggers one and trims stay rare.

use std::time::{Duration, Instant};

use duplex_proxy::Proxy;

/// How long accepts must have stopped before the heap is trimmed; also how often the
/// thread looks.
const QUIET: Duration = Duration::from_secs(1);
/// Accepts since the last trim, or fewer open connections than at their peak since it,
/// that make a burst worth trimming after.
const BURST: u64 = 1000;
/// The shortest time between two trims.
const GAP: Duration = Duration::from_secs(10);

/// Starts the trimming thread where the C library can trim (glibc); it ends when the
/// proxy stops.
pub fn start(proxy: Proxy) {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("duplex-trim".into())
        .spawn(move || run(&proxy));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the heap trimming thread; carrying on without");
    }
}

fn run(proxy: &Proxy) {
    let mut policy = Policy::new(proxy.connections_accepted());
    while !proxy.is_stopping() {
        std::thread::sleep(QUIET);
        let (accepted, open) = (proxy.connections_accepted(), proxy.connections_open());
        if policy.tick(accepted, open as u64, Instant::now()) {
            let start = Instant::now();
            let released = crate::os::trim_heap();
            tracing::debug!(released, took = ?start.elapsed(), open, "trimmed the heap after a burst of connections");
        }
    }
}

/// When to trim, from the counts of accepted and open connections read once per [`QUIET`].
struct Policy {
    /// The accepted count at the previous look.
    seen: u64,
    /// The accepted count at the last trim (or at start).
    trimmed_at: u64,
    /// The most connections open at any look since the last trim: a fall of [`BURST`]
    /// from it is a burst of closes.
    peak_open: u64,
    /// When the last trim was.
    last: Option<Instant>,
}

impl Policy {
    fn new(accepted: u64) -> Policy {
        Policy {
            seen: accepted,
            trimmed_at: accepted,
            peak_open: 0,
            last: None,
        }
    }

    /// Whether to trim now: no accepts since the last look, a burst of accepts or closes
    /// since the last trim, and the last trim far enough back.
    fn tick(&mut self, accepted: u64, open: u64, now: Instant) -> bool {
        // The count goes down when a listener a reload removed has its series removed:
        // measure bursts from there, or none would be seen until it made up the loss.
        self.trimmed_at = self.trimmed_at.min(accepted);
        let quiet = accepted == self.seen;
        self.seen = accepted;
        self.peak_open = self.peak_open.max(open);
        let burst = accepted.saturating_sub(self.trimmed_at) >= BURST
            || self.peak_open.saturating_sub(open) >= BURST;
        let spaced = self.last.is_none_or(|last| now.duration_since(last) >= GAP);
        if quiet && burst && spaced {
            self.trimmed_at = accepted;
            self.peak_open = open;
            self.last = Some(now);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_each_burst_and_never_during_one() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = Policy::new(0);
        // Nothing accepted yet: nothing to give back.
        assert!(!p.tick(0, 0, at(0)));
        // A burst over three looks, then quiet.
        assert!(!p.tick(1000, 0, at(1)));
        assert!(!p.tick(2500, 0, at(2)));
        assert!(!p.tick(4000, 0, at(3)));
        assert!(
            p.tick(4000, 0, at(4)),
            "the first quiet look after the burst trims"
        );
        assert!(!p.tick(4000, 0, at(5)), "and only once");
        // Steady churn: accepts at every look never trim.
        for s in 6..60 {
            assert!(!p.tick(4000 + 100 * s, 0, at(s)));
        }
        // A trickle too small to be a burst never trims either.
        let mut q = Policy::new(0);
        for s in 0..60 {
            let n = s / 2;
            assert!(!q.tick(n, 0, at(s)));
        }
    }

    /// Thousands of tunnels closing at once (a backend gone) with no accepts meanwhile
    /// are a burst too, trimmed at the next look; a slow decline trims once per [`BURST`]
    /// closed.
    #[test]
    fn a_burst_of_closes_is_trimmed_after_too() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = Policy::new(0);
        assert!(!p.tick(0, 8000, at(1)), "nothing has closed");
        assert!(!p.tick(0, 7500, at(2)), "500 closed: not a burst");
        assert!(p.tick(0, 6000, at(3)), "2,000 closed since the peak");
        assert!(!p.tick(0, 6000, at(20)), "and only once");
        assert!(!p.tick(0, 5500, at(21)));
        assert!(p.tick(0, 4900, at(22)), "1,100 more since the last trim");
    }

    #[test]
    fn a_count_that_goes_down_still_shows_the_next_burst() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = Policy::new(50_000);
        // A removed listener's accepts leave the total: 50,000 down to 1,000.
        assert!(!p.tick(1_000, 0, at(1)));
        // A burst from there, then quiet: trimmed, without first making up the 49,000.
        assert!(!p.tick(4_000, 0, at(2)));
        assert!(p.tick(4_000, 0, at(3)));
    }

    #[test]
    fn trims_are_at_least_a_gap_apart() {
        let t0 = Instant::now();
        let mut p = Policy::new(0);
        assert!(!p.tick(5000, 0, t0));
        assert!(p.tick(5000, 0, t0 + QUIET), "the first trim needs no gap");
        // Another burst right away waits out the gap, then trims.
        assert!(!p.tick(9000, 0, t0 + 2 * QUIET));
        assert!(!p.tick(9000, 0, t0 + 3 * QUIET));
        assert!(p.tick(9000, 0, t0 + QUIET + GAP));
    }

    /// Free pages between live blocks go back: the case a burst of handshakes leaves.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trimming_gives_back_holes_between_live_blocks() {
        // 32 MiB in 64 KiB blocks (below glibc's mmap threshold, so on the heap), one in
        // sixteen kept alive, the rest freed: holes of 960 KiB that only a trim returns.
        let mut blocks: Vec<Vec<u8>> = (0..512).map(|_| vec![1u8; 64 * 1024]).collect();
        let kept: Vec<Vec<u8>> = blocks.iter_mut().step_by(16).map(std::mem::take).collect();
        drop(blocks);
        assert!(crate::os::trim_heap(), "no memory was given back");
        assert!(kept.iter().all(|b| b.len() == 64 * 1024 && b[0] == 1));
    }
}
