//! Gives memory freed by a burst of connections back to the kernel once the burst is over.
//!
//! Every handshake allocates buffers (hyper's read and write buffers on both sides, the
//! request and response heads) that are freed when its tunnel starts, but glibc keeps
//! freed memory between live blocks resident. After a burst of thousands of handshakes
//! that is about a fifth of an idle tunnel's footprint. Once accepts have been quiet for
//! a whole [`QUIET`] period after any new ones, a thread of its own asks the allocator to
//! return every free page (`malloc_trim`); under steady churn it does nothing, so a busy
//! proxy never pays for it.

use std::time::{Duration, Instant};

use duplex_proxy::Proxy;

/// How long accepts must have stopped before the heap is trimmed; also how often the
/// thread looks.
const QUIET: Duration = Duration::from_secs(1);

/// Starts the trimming thread; it ends when the proxy stops.
pub fn start(proxy: Proxy) {
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
        if policy.tick(proxy.connections_accepted()) {
            let start = Instant::now();
            let released = crate::os::trim_heap();
            tracing::debug!(released, took = ?start.elapsed(), "trimmed the heap after a burst of connections");
        }
    }
}

/// When to trim, from the count of accepted connections read once per [`QUIET`].
struct Policy {
    /// The count at the previous look.
    seen: u64,
    /// The count at the last trim (or at start).
    trimmed_at: u64,
}

impl Policy {
    fn new(accepted: u64) -> Policy {
        Policy {
            seen: accepted,
            trimmed_at: accepted,
        }
    }

    /// Whether to trim now: no accepts since the last look, but some since the last trim.
    fn tick(&mut self, accepted: u64) -> bool {
        let quiet = accepted == self.seen;
        self.seen = accepted;
        if quiet && accepted != self.trimmed_at {
            self.trimmed_at = accepted;
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
        let mut p = Policy::new(0);
        // Nothing accepted yet: nothing to give back.
        assert!(!p.tick(0));
        // A burst over three looks, then quiet.
        assert!(!p.tick(100));
        assert!(!p.tick(250));
        assert!(!p.tick(400));
        assert!(p.tick(400), "the first quiet look after the burst trims");
        assert!(!p.tick(400), "and only once");
        // Steady churn: a few accepts at every look never trims.
        for n in 401..420 {
            assert!(!p.tick(n));
        }
        assert!(p.tick(419));
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
