//! Fewest open connections per unit of weight; ties broken in turn so equal backends share.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{lighter, Backend, Balancer, Context};

#[derive(Default)]
pub struct LeastConn {
    /// Where the scan starts: rotates so that ties do not all land on the first backend.
    offset: AtomicUsize,
}

impl Balancer for LeastConn {
    fn pick(&self, backends: &[Backend], _: &Context<'_>, max: usize, out: &mut Vec<usize>) {
        order_by_load(
            backends,
            self.offset.fetch_add(1, Ordering::Relaxed),
            max,
            out,
        );
    }
}

/// Pushes up to `max` indexes, least loaded first; among equals, from `rotate` onwards.
pub(crate) fn order_by_load(backends: &[Backend], rotate: usize, max: usize, out: &mut Vec<usize>) {
    let n = backends.len();
    if n == 0 {
        return;
    }
    let start = out.len();
    out.extend((0..n).map(|k| (rotate + k) % n));
    // A stable sort keeps the rotated order among ties.
    out[start..].sort_by(|&a, &b| lighter(&backends[a], &backends[b]));
    out.truncate(start + max.min(n));
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
        LeastConn::default().pick(&b, &ctx(&h), 3, &mut out);
        assert_eq!(out, vec![1, 2, 0]);
    }

    #[test]
    fn ties_rotate() {
        let b = backends(&[1, 1, 1]);
        assert_eq!(tally(&LeastConn::default(), &b, 300), vec![100, 100, 100]);
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
            lc.pick(&b, &ctx(&h), 1, &mut out);
            held.push(b[out[0]].state.guard());
        }
        let mut loads: Vec<usize> = b.iter().map(|b| b.state.load()).collect();
        loads.sort();
        assert_eq!(loads, vec![13, 13, 14], "40 connections spread evenly");
        drop(held);
        assert_eq!(b[1].state.load(), 0, "guards release the load");
    }
}
