//! Power of two choices: two weighted random draws, the less loaded one wins.

use crate::least_conn::order_by_load;
use crate::{lighter, weighted_draw, Backend, Balancer, Context};

pub struct PowerOfTwo;

impl Balancer for PowerOfTwo {
    fn pick(
        &self,
        backends: &[Backend],
        _: &Context<'_>,
        usable: &dyn Fn(usize) -> bool,
        max: usize,
        out: &mut Vec<usize>,
    ) {
        let Some(a) = weighted_draw(backends, usable) else {
            return;
        };
        let first = match weighted_draw(backends, |i| i != a && usable(i)) {
            Some(b) if lighter(&backends[b], &backends[a]).is_lt() => b,
            _ => a,
        };
        out.push(first);
        if max > 1 {
            // Retries go to the least loaded of the rest.
            let rest = |i: usize| i != first && usable(i);
            order_by_load(backends, &rest, fastrand::usize(..), max - 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{backends, tally};

    #[test]
    fn avoids_the_loaded_backend_and_spreads_the_rest() {
        let b = backends(&[1, 1, 1, 1]);
        let _held: Vec<_> = (0..50).map(|_| b[0].state.guard()).collect();
        let counts = tally(&PowerOfTwo, &b, 4000);
        // Backend 0 wins only when both draws hit it, which the draw forbids.
        assert_eq!(counts[0], 0, "{counts:?}");
        for c in &counts[1..] {
            assert!((1000..1700).contains(c), "{counts:?}");
        }
    }
}
