//! Fewest open connections per unit of weight; ties broken in turn so equal backends share.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Backend, Balancer, Context};

#[derive(Default)]
pub struct LeastConn {
    /// Where the scan starts: rotates so that ties do not all land on the first backend.
    offset: AtomicUsize,
}

impl Balancer for LeastConn {
    fn pick(
        &self,
        backends: &[Backend],
        _: &Context<'_>,
        usable: &dyn Fn(usize) -> bool,
        max: usize,
        out: &mut Vec<usize>,
    ) {
        order_by_load(
            backends,
            usable,
            self.offset.fetch_add(1, Ordering::Relaxed),
            max,
            out,
        );
    }
}

/// Pushes up to `max` indexes of usable backends, least loaded first. The least loaded
/// take turns in proportion to their weights, by `rotate` (which callers count up once
/// per pick): nginx's `least_conn` breaks ties by weighted round robin, and with idle
/// backends (HTTP at low concurrency, short tunnels) every pick is a tie.
pub(crate) fn order_by_load(
    backends: &[Backend],
    usable: &dyn Fn(usize) -> bool,
    rotate: usize,
    max: usize,
    out: &mut Vec<usize>,
) {
    // Each load is read once: other threads change them meanwhile, and a sort whose
    // comparison reads them afresh can see an inconsistent order (and panic).
    let mut keyed: Vec<(u64, u64, usize)> = (0..backends.len())
        .filter(|&i| usable(i))
        .map(|i| {
            let b = &backends[i];
            (b.state.load() as u64, u64::from(b.weight), i)
        })
        .collect();
    if keyed.is_empty() {
        return;
    }
    // Rotated among the usable ones only, so that the rest of the order (the candidates a
    // retry takes) shares evenly too, whichever are out.
    let n = keyed.len();
    keyed.rotate_left(rotate % n);
    // Load per weight, compared without division; a stable sort keeps the rotated order
    // among ties.
    keyed.sort_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)));
    // The first place goes to each of the least loaded for as many turns as its weight
    // (over their common divisor), laid out round by round in backend order (round r has
    // every backend with more than r turns): the same for every rotation of the group, so
    // turns add up to the weights over consecutive picks, and a backend's turns are spread
    // over the rounds rather than taken in a run.
    let (load, weight) = (keyed[0].0, keyed[0].1);
    let ties = keyed
        .iter()
        .take_while(|k| k.0 * weight == load * k.1)
        .count();
    if ties > 1 {
        let group = &mut keyed[..ties];
        let g = group
            .iter()
            .fold(0, |g, k| crate::round_robin::gcd(g, k.1))
            .max(1);
        let total: u64 = group.iter().map(|k| k.1 / g).sum::<u64>().max(1);
        let mut members: Vec<usize> = (0..ties).collect();
        members.sort_unstable_by_key(|&at| group[at].2);
        let turns: Vec<u64> = members.iter().map(|&at| group[at].1 / g).collect();
        let at = members[turn_owner(&turns, rotate as u64 % total)];
        group.swap(0, at);
    }
    out.extend(keyed.iter().take(max).map(|k| k.2));
}

/// Which of the members with `turns` (in order) has turn `t` (less than their sum), the
/// turns going round by round: round r has every member with more than r turns.
fn turn_owner(turns: &[u64], t: u64) -> usize {
    // Turns in the rounds before round r.
    let before = |r: u64| turns.iter().map(|&w| w.min(r)).sum::<u64>();
    // The round of turn t: the last r with before(r) <= t (before(0) = 0 <= t, and the
    // sum, before(max), is more than t).
    let (mut lo, mut hi) = (0, turns.iter().copied().max().unwrap_or(0));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if before(mid) <= t {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut k = t - before(lo);
    turns
        .iter()
        .position(|&w| {
            if w <= lo {
                return false;
            }
            if k == 0 {
                return true;
            }
            k -= 1;
            false
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{backends, ctx, tally};

    #[test]
    fn picks_the_least_loaded_per_weight() {
        let b = backends(&[1, 1, 2]);
        let _held: Vec<_> = [0, 0, 1, 2, 2, 2]
            .iter()
            .map(|&i| b[i].state.guard())
            .collect();
        // Loads per weight: 2, 1, 1.5.
        let h = http::HeaderMap::new();
        let mut out = Vec::new();
        LeastConn::default().pick(&b, &ctx(&h), &|_| true, 3, &mut out);
        assert_eq!(out, vec![1, 2, 0]);
    }

    /// Loads change under the sort when other threads open and close connections; the
    /// order must come from one reading of each load, or the sort may find its comparison
    /// inconsistent and panic (it checks on slices longer than 20).
    #[test]
    fn loads_changing_under_the_pick_do_not_break_it() {
        let b = std::sync::Arc::new(backends(&[1; 64]));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (b, stop) = (b.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) && i < 50_000_000 {
                    held.push(b[i * 7 % 64].state.guard());
                    if held.len() > 40 {
                        held.drain(..20);
                    }
                    i += 1;
                }
            })
        };
        let h = http::HeaderMap::new();
        let lc = LeastConn::default();
        let mut out = Vec::new();
        for _ in 0..20_000 {
            out.clear();
            lc.pick(&b, &ctx(&h), &|_| true, 64, &mut out);
            assert_eq!(out.len(), 64);
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().expect("the churning thread");
    }

    /// Idle backends all tie: each is first as often as its weight says, as nginx's
    /// weighted round robin among equals gives.
    #[test]
    fn ties_share_by_weight() {
        let b = backends(&[3, 1, 2]);
        assert_eq!(tally(&LeastConn::default(), &b, 600), vec![300, 100, 200]);
        // With one busy, the other two share by their weights.
        let _held = b[2].state.guard();
        assert_eq!(tally(&LeastConn::default(), &b, 400), vec![300, 100, 0]);
    }

    /// Equal weights alternate however large, and unequal ones are spread out: no
    /// backend takes its whole share in a run.
    #[test]
    fn tied_turns_are_spread_out() {
        let h = http::HeaderMap::new();
        let picks = |weights: &[u32], n: usize| -> Vec<usize> {
            let b = backends(weights);
            let lc = LeastConn::default();
            (0..n)
                .map(|_| {
                    let mut out = Vec::new();
                    lc.pick(&b, &ctx(&h), &|_| true, 1, &mut out);
                    out[0]
                })
                .collect()
        };
        let alternate = picks(&[100, 100], 40);
        assert!(alternate.windows(2).all(|w| w[0] != w[1]), "{alternate:?}");
        let spread = picks(&[3, 1, 2], 60);
        let longest = spread
            .chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0);
        assert!(longest <= 2, "a run of {longest}: {spread:?}");
    }

    #[test]
    fn turns_go_round_by_round() {
        let order = |turns: &[u64]| -> Vec<usize> {
            let total = turns.iter().sum();
            (0..total).map(|t| turn_owner(turns, t)).collect()
        };
        assert_eq!(order(&[3, 1, 2]), vec![0, 1, 2, 0, 2, 0]);
        assert_eq!(order(&[1, 1]), vec![0, 1]);
        assert_eq!(order(&[1, 4]), vec![0, 1, 1, 1, 1]);
        assert_eq!(order(&[5]), vec![0; 5]);
    }

    #[test]
    fn ties_rotate() {
        let b = backends(&[1, 1, 1]);
        assert_eq!(tally(&LeastConn::default(), &b, 300), vec![100, 100, 100]);
    }

    #[test]
    fn ties_rotate_evenly_among_the_usable_ones() {
        let b = backends(&[1, 1, 1, 1]);
        let lc = LeastConn::default();
        let h = http::HeaderMap::new();
        let mut counts = [0; 4];
        for _ in 0..300 {
            let mut out = Vec::new();
            lc.pick(&b, &ctx(&h), &|i| i != 1, 3, &mut out);
            assert!(!out.contains(&1) && out.len() == 3, "{out:?}");
            counts[out[0]] += 1;
        }
        assert_eq!(counts, [100, 0, 100, 100]);
    }

    #[test]
    fn long_lived_connections_even_out() {
        let b = backends(&[1, 1, 1]);
        let lc = LeastConn::default();
        let h = http::HeaderMap::new();
        // Backend 0 already holds 10 tunnels; the next 30 go to 1 and 2 first.
        let _old: Vec<_> = (0..10).map(|_| b[0].state.guard()).collect();
        let mut held = Vec::new();
        for _ in 0..30 {
            let mut out = Vec::new();
            lc.pick(&b, &ctx(&h), &|_| true, 1, &mut out);
            held.push(b[out[0]].state.guard());
        }
        let mut loads: Vec<usize> = b.iter().map(|b| b.state.load()).collect();
        loads.sort();
        assert_eq!(loads, vec![13, 13, 14], "40 connections spread evenly");
        drop(held);
        assert_eq!(b[1].state.load(), 0, "guards release the load");
    }
}
