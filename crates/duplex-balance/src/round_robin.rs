//! Smooth weighted round robin (nginx's algorithm), precomputed into a schedule.
//!
//! nginx runs the algorithm under a lock on every pick. Its output is periodic, with a
//! period of the sum of the weights, so we compute one period when the pool is built and
//! pick with a single atomic counter: the same sequence, no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Backend, Balancer, Context};

/// Bounds the work of computing nginx's sequence (sum of weights × backends): past it, a
/// schedule with the same shares is built by sorting instead.
const MAX_SCHEDULE_WORK: u64 = 4_000_000;

/// Bounds a schedule's length (the sum of the weights, 4 bytes each): past it, weights
/// are scaled down in proportion, each to at least 1.
const MAX_SCHEDULE_LEN: u64 = 1 << 20;

pub struct RoundRobin {
    /// One period of the smooth weighted sequence, as backend indexes.
    schedule: Vec<u32>,
    next: AtomicUsize,
    /// Turns that fell on a backend out of service, handed to the usable places in turn.
    spill: AtomicUsize,
    /// Per backend: its places in `schedule` (its share) and the first of them, so that a
    /// spilled turn finds its place by walking the backends, not the whole schedule.
    places: Vec<(usize, usize)>,
}

impl RoundRobin {
    pub fn new(backends: &[Backend]) -> RoundRobin {
        let mut weights: Vec<u64> = backends.iter().map(|b| u64::from(b.weight)).collect();
        let g = weights.iter().copied().fold(0, gcd);
        if g > 1 {
            weights.iter_mut().for_each(|w| *w /= g);
        }
        let total: u64 = weights.iter().sum();
        if total > MAX_SCHEDULE_LEN {
            // Kept in proportion; only weights under total / MAX_SCHEDULE_LEN (for the
            // largest pools) round up to 1.
            weights
                .iter_mut()
                .for_each(|w| *w = (*w * MAX_SCHEDULE_LEN / total).max(1));
        }
        if weights.iter().all(|&w| w == 1) {
            // Equal weights: the smooth sequence is plain rotation; no need to compute it
            // (and for thousands of backends, computing it would cost n^2).
            return RoundRobin::with_schedule((0..weights.len() as u32).collect(), weights.len());
        }
        let total: u64 = weights.iter().sum();
        if total * weights.len() as u64 > MAX_SCHEDULE_WORK {
            return RoundRobin::with_schedule(interleaved(&weights), weights.len());
        }
        let total = total as i64;
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += *w as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            schedule.push(best as u32);
        }
        RoundRobin::with_schedule(schedule, weights.len())
    }

    fn with_schedule(schedule: Vec<u32>, backends: usize) -> RoundRobin {
        let mut places = vec![(0usize, usize::MAX); backends];
        for (at, &i) in schedule.iter().enumerate() {
            let p = &mut places[i as usize];
            p.0 += 1;
            p.1 = p.1.min(at);
        }
        RoundRobin {
            schedule,
            next: AtomicUsize::new(0),
            spill: AtomicUsize::new(0),
            places,
        }
    }
}

/// A period in which backend `i` has `weights[i]` turns, spread out: its `k`-th turn at
/// the middle of its `k`-th share of the period, `(k + 1/2) / weight`, ties by index. The
/// same shares as nginx's sequence, in a slightly different order, at the cost of a sort
/// rather than of a pass over every backend for every place.
fn interleaved(weights: &[u64]) -> Vec<u32> {
    // (turn k, backend): 8 bytes each, the weights looked up to compare.
    let mut turns: Vec<(u32, u32)> = weights
        .iter()
        .enumerate()
        .flat_map(|(i, &w)| (0..w as u32).map(move |k| (k, i as u32)))
        .collect();
    // (2k + 1) / 2w against the other's, without division.
    let key = |&(k, i): &(u32, u32)| (2 * u64::from(k) + 1, weights[i as usize]);
    turns.sort_unstable_by(|a, b| {
        let ((ka, wa), (kb, wb)) = (key(a), key(b));
        (ka * wb).cmp(&(kb * wa)).then(a.1.cmp(&b.1))
    });
    turns.into_iter().map(|t| t.1).collect()
}

/// Greatest common divisor; 0 with 0.
pub(crate) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Balancer for RoundRobin {
    fn pick(
        &self,
        backends: &[Backend],
        _: &Context<'_>,
        usable: &dyn Fn(usize) -> bool,
        max: usize,
        out: &mut Vec<usize>,
    ) {
        let len = self.schedule.len();
        if len == 0 {
            return;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let mut start = turn % len;
        if !usable(self.schedule[start] as usize) {
            // The turn of a backend out of service goes to the usable backends in turn,
            // each as often as it has places in the schedule (not always to the place after
            // it, which would then take two turns in every round), so the others share it
            // in proportion to their weights, however many are out. A walk over the
            // backends, not over the whole schedule.
            let share = |i: usize| if usable(i) { self.places[i].0 } else { 0 };
            let total: usize = (0..self.places.len()).map(share).sum();
            if total > 0 {
                let mut k = self.spill.fetch_add(1, Ordering::Relaxed) % total;
                for (i, &(_, first)) in self.places.iter().enumerate() {
                    let n = share(i);
                    if k < n {
                        start = first;
                        break;
                    }
                    k -= n;
                }
            }
        }
        // Retries continue along the schedule, skipping backends already offered.
        let base = out.len();
        for k in 0..len {
            if out.len() - base >= max.min(backends.len()) {
                break;
            }
            let i = self.schedule[(start + k) % len] as usize;
            if usable(i) && !out[base..].contains(&i) {
                out.push(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{backends, ctx, tally};

    #[test]
    fn follows_nginx_smooth_sequence() {
        // nginx documents {a:5, b:1, c:1} as a a b a c a a.
        let b = backends(&[5, 1, 1]);
        let rr = RoundRobin::new(&b);
        assert_eq!(rr.schedule, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn distributes_by_weight_and_offers_every_backend_for_retries() {
        let b = backends(&[3, 2, 1]);
        let rr = RoundRobin::new(&b);
        assert_eq!(tally(&rr, &b, 600), vec![300, 200, 100]);
        let h = http::HeaderMap::new();
        let mut out = Vec::new();
        rr.pick(&b, &ctx(&h), &|_| true, 3, &mut out);
        out.sort();
        assert_eq!(out, vec![0, 1, 2]);
    }

    /// A backend out of service must not hand its turns to one neighbour: the others
    /// share them evenly.
    #[test]
    fn the_turns_of_a_backend_out_of_service_are_shared_evenly() {
        let h = http::HeaderMap::new();
        for (weights, down, want) in [
            (vec![1, 1, 1, 1], vec![1], vec![1000, 0, 1000, 1000]),
            (vec![1, 1, 1], vec![0], vec![0, 1000, 1000]),
            (vec![2, 1, 1], vec![1], vec![1000, 0, 500]),
            // Several out, side by side, and a heavy one out.
            (
                vec![1, 1, 1, 1, 1],
                vec![1, 2],
                vec![1000, 0, 0, 1000, 1000],
            ),
            (vec![1, 1, 1, 1], vec![0, 1], vec![0, 0, 1000, 1000]),
            (vec![5, 1, 1], vec![0], vec![0, 1000, 1000]),
            (vec![3, 1, 1, 1], vec![0], vec![0, 1000, 1000, 1000]),
            (vec![3, 2, 1, 1], vec![2, 3], vec![1500, 1000, 0, 0]),
        ] {
            let b = backends(&weights);
            let rr = RoundRobin::new(&b);
            let usable = |i: usize| !down.contains(&i);
            let mut counts = vec![0usize; b.len()];
            let picks = 1000 * (b.len() - 1);
            for _ in 0..picks {
                let mut out = Vec::new();
                rr.pick(&b, &ctx(&h), &usable, 1, &mut out);
                counts[out[0]] += 1;
            }
            let total: usize = want.iter().sum();
            for (i, (&got, &w)) in counts.iter().zip(&want).enumerate() {
                let w = w * picks / total;
                assert!(
                    got.abs_diff(w) <= picks / 50,
                    "{weights:?} with {down:?} down: backend {i} got {got}, want about {w}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn many_equal_backends_build_at_once() {
        let rr = RoundRobin::new(&backends(&vec![1; 5000]));
        assert_eq!(rr.schedule.len(), 5000);
        assert_eq!(rr.schedule[4999], 4999);
    }

    /// Past the bound on computing nginx's sequence, the shares stay those of the
    /// weights (a 9:1 canary split over a thousand backends, not 1:1), spread out.
    #[test]
    fn large_pools_keep_their_weights() {
        let weights: Vec<u32> = (0..1100).map(|i| if i < 1000 { 9 } else { 1 }).collect();
        let b = backends(&weights);
        let rr = RoundRobin::new(&b);
        assert!(rr.schedule.len() as u64 * 1100 > MAX_SCHEDULE_WORK);
        assert_eq!(rr.schedule.len(), 9100);
        let counts = tally(&rr, &b, 9100);
        assert!(counts[..1000].iter().all(|&c| c == 9), "{counts:?}");
        assert!(counts[1000..].iter().all(|&c| c == 1), "{counts:?}");
        // Spread out: no backend's turns come back to back.
        let s = &rr.schedule;
        assert!(s.windows(2).all(|w| w[0] != w[1]), "turns back to back");
        // Each backend's turns are spread over the period: a weight-9 one comes about
        // every ninth of it.
        let at: Vec<usize> = (0..s.len()).filter(|&p| s[p] == 0).collect();
        assert!(
            at.windows(2).all(|w| (900..=1200).contains(&(w[1] - w[0]))),
            "backend 0 at {at:?}"
        );
    }

    #[test]
    fn interleaves_small_weights_evenly() {
        assert_eq!(interleaved(&[2, 1]), vec![0, 1, 0]);
        assert_eq!(interleaved(&[5, 1, 1]), vec![0, 0, 0, 1, 2, 0, 0]);
    }

    #[test]
    fn huge_weights_stay_bounded() {
        let weights: Vec<u32> = (0..5000).map(|i| 1000 - i % 1000).collect();
        let b = backends(&weights);
        let rr = RoundRobin::new(&b);
        assert!(rr.schedule.len() as u64 <= MAX_SCHEDULE_LEN + 5000);
        // Still in proportion: weight 1000 against weight 500.
        let places = |i: usize| rr.places[i].0 as f64;
        assert!((places(0) / places(500) - 2.0).abs() < 0.01);
    }
}
