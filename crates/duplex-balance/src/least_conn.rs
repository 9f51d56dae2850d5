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
    // The first place goes to each of the least loaded for as many turns as its weight,
    // in backend order: the same for every rotation of the group, so turns add up to
    // the weights over consecutive picks.
    let (load, weight) = (keyed[0].0, keyed[0].1);
    let ties = keyed
        .iter()
        .take_while(|k| k.0 * weight == load * k.1)
        .count();
    if ties > 1 {
        let group = &mut keyed[..ties];
        let total: u64 = group.iter().map(|k| k.1).sum();
        let mut members: Vec<usize> = (0..ties).collect();
        members.sort_unstable_by_key(|&at| group[at].2);
        let mut turn = rotate as u64 % total.max(1);
        let first = members.into_iter().find(|&at| {
            let w = group[at].1;
            if turn < w {
                return true;
            }
            turn -= w;
            false
        });
        if let Some(at) = first {
            group.swap(0, at);
        }
    }
    out.extend(keyed.iter().take(max).map(|k| k.2));
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
