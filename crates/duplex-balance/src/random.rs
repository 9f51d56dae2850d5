//! Weighted random choice.

use crate::{weighted_draw, Backend, Balancer, Context};

pub struct Random;

impl Balancer for Random {
    fn pick(
        &self,
        backends: &[Backend],
        _: &Context<'_>,
        usable: &dyn Fn(usize) -> bool,
        max: usize,
        out: &mut Vec<usize>,
    ) {
        let start = out.len();
        while out.len() - start < max.min(backends.len()) {
            match weighted_draw(backends, |i| usable(i) && !out[start..].contains(&i)) {
                Some(i) => out.push(i),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{backends, ctx, tally};

    #[test]
    fn follows_weights() {
        let b = backends(&[1, 3]);
        let counts = tally(&Random, &b, 8000);
        assert!((1700..2300).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn offers_distinct_backends() {
        let b = backends(&[1, 1, 1]);
        let h = http::HeaderMap::new();
        let mut out = Vec::new();
        Random.pick(&b, &ctx(&h), &|_| true, 5, &mut out);
        out.sort();
        assert_eq!(out, vec![0, 1, 2]);
    }
}
