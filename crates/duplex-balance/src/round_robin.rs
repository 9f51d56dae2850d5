//! Smooth weighted round robin (nginx's algorithm), precomputed into a schedule.
//!
//! nginx runs the algorithm under a lock on every pick. Its output is periodic, with a
//! period of the sum of the weights, so we compute one period when the pool is built and
//! pick with a single atomic counter: the same sequence, no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Backend, Balancer, Context};

/// Bounds the work and memory of building a schedule: weights are scaled down past this.
const MAX_SCHEDULE_WORK: u64 = 4_000_000;

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
        let work = |w: &[u64]| w.iter().sum::<u64>() * w.len() as u64;
        while work(&weights) > MAX_SCHEDULE_WORK && weights.iter().any(|&w| w > 1) {
            weights.iter_mut().for_each(|w| *w = (*w / 2).max(1));
        }
        if weights.iter().all(|&w| w == 1) {
            // Equal weights: the smooth sequence is plain rotation; no need to compute it
            // (and for thousands of backends, computing it would cost n^2).
            return RoundRobin::with_schedule((0..weights.len() as u32).collect(), weights.len());
        }
        let total: i64 = weights.iter().sum::<u64>() as i64;
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

fn gcd(a: u64, b: u64) -> u64 {
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

    #[test]
    fn huge_weights_stay_bounded() {
        let weights: Vec<u32> = (0..500).map(|i| 1000 - i).collect();
        let rr = RoundRobin::new(&backends(&weights));
        assert!(rr.schedule.len() as u64 * 500 <= MAX_SCHEDULE_WORK);
    }
}
