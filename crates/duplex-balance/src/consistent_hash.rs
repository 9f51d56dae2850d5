//! Consistent hashing on a ring of virtual nodes placed by backend address and weight.
//!
//! Points depend only on each backend's address and weight, so every duplex replica with
//! the same backends builds the same ring and sends a key to the same backend. Removing one
//! of N backends moves only the keys that were on it (about 1/N); changing one backend's
//! weight moves keys only onto it or off it, since its points are a prefix of one fixed
//! sequence. Both hold while the ring is under [`MAX_POINTS`]; past it, every backend's
//! points are scaled by the total, and any change moves some keys between the others too.
//! A connection without a key falls back to least_conn.

use std::io::Write;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use duplex_config::HashKey;

use crate::hash::stable_hash;
use crate::least_conn::order_by_load;
use crate::{Backend, Balancer, Context};

/// Points per unit of weight: enough that each backend's share of the ring is within a
/// few percent of its weight's share.
const VNODES: u64 = 160;
/// The most points a ring holds (12 bytes each, so 12 MiB), which bounds its memory and
/// the time to build it. Weights summing past `MAX_POINTS / VNODES` (6,553) get fewer
/// points per unit, in the same proportions. nginx's ring has 160 points per unit of
/// weight too, with no bound.
const MAX_POINTS: u64 = 1 << 20;

/// How many points each backend gets: `VNODES` per unit of weight, scaled down in
/// proportion (at least one each) when the ring would pass `MAX_POINTS`.
fn points(backends: &[Backend]) -> impl Iterator<Item = u64> + '_ {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    backends.iter().map(move |b| {
        let w = u64::from(b.weight);
        if total.saturating_mul(VNODES) <= MAX_POINTS {
            w * VNODES
        } else {
            (w.saturating_mul(MAX_POINTS) / total.max(1)).max(1)
        }
    })
}

pub struct ConsistentHash {
    key: HashKey,
    /// The ring's points, sorted.
    ring: Vec<u64>,
    /// The backend index of each point of `ring` (kept apart: a pair would take 16 bytes).
    owners: Vec<u32>,
    /// Rotation for the least_conn fallback.
    offset: AtomicUsize,
}

impl ConsistentHash {
    pub fn new(key: HashKey, backends: &[Backend]) -> ConsistentHash {
        let mut pairs = Vec::with_capacity(points(backends).sum::<u64>() as usize);
        let mut name = Vec::new();
        for (i, (b, n)) in backends.iter().zip(points(backends)).enumerate() {
            for v in 0..n {
                // Point `v` of a backend is the hash of `ADDRESS#v`.
                name.clear();
                let _ = write!(name, "{}#{v}", b.state.addr);
                pairs.push((stable_hash(&name), i as u32));
            }
        }
        pairs.sort_unstable();
        let (ring, owners) = pairs.into_iter().unzip();
        ConsistentHash {
            key,
            ring,
            owners,
            offset: AtomicUsize::new(0),
        }
    }

    /// The bytes this connection is placed by, if it carries them.
    fn key_bytes<'a>(&self, ctx: &Context<'a>) -> Option<KeyBytes<'a>> {
        match &self.key {
            HashKey::Ip => Some(KeyBytes::Ip(ctx.client_ip)),
            HashKey::Header(name) => ctx
                .headers
                .get(name.as_str())
                .map(|v| v.as_bytes())
                .filter(|v| !v.is_empty())
                .map(KeyBytes::Slice),
            HashKey::Cookie(name) => ctx
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == name && !v.is_empty()).then_some(KeyBytes::Slice(v.as_bytes()))
                }),
            HashKey::Query(name) => ctx.query?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name && !v.is_empty()).then_some(KeyBytes::Slice(v.as_bytes()))
            }),
        }
    }
}

enum KeyBytes<'a> {
    Ip(IpAddr),
    Slice(&'a [u8]),
}

impl Balancer for ConsistentHash {
    fn pick(
        &self,
        backends: &[Backend],
        ctx: &Context<'_>,
        usable: &dyn Fn(usize) -> bool,
        max: usize,
        out: &mut Vec<usize>,
    ) {
        let Some(key) = self.key_bytes(ctx) else {
            order_by_load(
                backends,
                usable,
                self.offset.fetch_add(1, Ordering::Relaxed),
                max,
                out,
            );
            return;
        };
        let h = match key {
            // An IPv4 client reaching a dual-stack listener shows as `::ffff:a.b.c.d`: placed
            // as the IPv4 address it is, so that replicas bound either way agree.
            KeyBytes::Ip(ip) => match ip.to_canonical() {
                IpAddr::V4(ip) => stable_hash(&ip.octets()),
                IpAddr::V6(ip) => stable_hash(&ip.octets()),
            },
            KeyBytes::Slice(s) => stable_hash(s),
        };
        let n = self.ring.len();
        let start = self.ring.partition_point(|&p| p < h);
        // Clockwise from the key, past backends out of service (their keys move to the
        // next one on the ring, and only theirs); retries take the next distinct ones.
        let base = out.len();
        let mut want = max.min(backends.len());
        // Once one backend is found out of service, how many are in service is counted
        // (once), so that the walk ends when it has them all rather than going round the
        // whole ring: with every backend out it would visit every point, per request.
        let mut counted = false;
        for k in 0..n {
            if out.len() - base >= want {
                break;
            }
            let i = self.owners[(start + k) % n] as usize;
            if out[base..].contains(&i) {
                continue;
            }
            if usable(i) {
                out.push(i);
            } else if !counted {
                counted = true;
                want = want.min((0..backends.len()).filter(|&j| usable(j)).count());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::backends;
    use http::{HeaderMap, HeaderValue};

    fn place(ch: &ConsistentHash, b: &[Backend], user: &str) -> std::net::SocketAddr {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_str(user).unwrap());
        let ctx = Context {
            client_ip: IpAddr::from([10, 0, 0, 1]),
            headers: &h,
            query: None,
        };
        let mut out = Vec::new();
        ch.pick(b, &ctx, &|_| true, 1, &mut out);
        b[out[0]].state.addr
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        let all = backends(&[1; 5]);
        let key = HashKey::Header("x-user-id".into());
        let before = ConsistentHash::new(key.clone(), &all);
        let fewer: Vec<Backend> = all
            .iter()
            .filter(|b| b.state.addr.port() != 9002)
            .cloned()
            .collect();
        let after = ConsistentHash::new(key, &fewer);
        let (mut moved, mut on_removed, total) = (0, 0, 10_000);
        let mut per_backend = std::collections::HashMap::new();
        for u in 0..total {
            let user = format!("user-{u}");
            let a = place(&before, &all, &user);
            *per_backend.entry(a).or_insert(0) += 1;
            let b = place(&after, &fewer, &user);
            if a.port() == 9002 {
                on_removed += 1;
            } else if a != b {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "keys on surviving backends must stay put");
        assert!(
            (1500..2500).contains(&on_removed),
            "removed backend held {on_removed}"
        );
        for (addr, n) in per_backend {
            assert!((1500..2500).contains(&n), "{addr} got {n} of {total}");
        }
    }

    /// Keys per backend out of `total`, placed by `x-user-id`.
    fn shares(ch: &ConsistentHash, b: &[Backend], total: u32) -> Vec<u32> {
        let mut n = vec![0; b.len()];
        for u in 0..total {
            let at = place(ch, b, &format!("user-{u}"));
            n[b.iter().position(|x| x.state.addr == at).unwrap()] += 1;
        }
        n
    }

    /// Keys go in proportion to weight, as with nginx's `hash ... consistent` and HAProxy's
    /// `hash-type consistent`; raising one backend's weight moves keys onto it only.
    #[test]
    fn weights_set_each_backends_share_of_keys() {
        let key = HashKey::Header("x-user-id".into());
        let b = backends(&[1, 1, 3]);
        let ch = ConsistentHash::new(key.clone(), &b);
        let n = shares(&ch, &b, 10_000);
        assert!((1600..2400).contains(&n[0]), "{n:?}");
        assert!((1600..2400).contains(&n[1]), "{n:?}");
        assert!((5400..6600).contains(&n[2]), "{n:?}");

        let heavier = backends(&[1, 4, 3]);
        let after = ConsistentHash::new(key, &heavier);
        let mut moved = 0;
        for u in 0..10_000 {
            let user = format!("user-{u}");
            let (was, now) = (place(&ch, &b, &user), place(&after, &heavier, &user));
            if was != now {
                assert_eq!(
                    now, heavier[1].state.addr,
                    "{user} moved, not onto the heavier one"
                );
                moved += 1;
            }
        }
        assert!((1500..3500).contains(&moved), "{moved} keys moved");
    }

    /// Past `MAX_POINTS`, every backend has fewer points, still in proportion to weight.
    #[test]
    fn heavy_weights_are_scaled_down_in_proportion() {
        let weights: Vec<u32> = (0..40).map(|i| if i < 20 { 1000 } else { 250 }).collect();
        let b = backends(&weights);
        let ch = ConsistentHash::new(HashKey::Header("x-user-id".into()), &b);
        assert!(ch.ring.len() as u64 <= MAX_POINTS, "{}", ch.ring.len());
        assert_eq!(ch.ring.len(), ch.owners.len());
        let n = shares(&ch, &b, 20_000);
        let (heavy, light): (u32, u32) = (n[..20].iter().sum(), n[20..].iter().sum());
        assert!((15_000..17_000).contains(&heavy), "{heavy} against {light}");
    }

    /// With backends out of service the walk stops once it has every one in service,
    /// instead of visiting every point of the ring for each request.
    #[test]
    fn the_walk_ends_once_every_backend_in_service_is_found() {
        let b = backends(&[1000; 6]);
        let ch = ConsistentHash::new(HashKey::Header("x-user-id".into()), &b);
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("someone"));
        let ctx = Context {
            client_ip: IpAddr::from([10, 0, 0, 1]),
            headers: &h,
            query: None,
        };
        let looked = std::cell::Cell::new(0usize);
        let pick = |up: &dyn Fn(usize) -> bool| {
            looked.set(0);
            let usable = |i: usize| {
                looked.set(looked.get() + 1);
                up(i)
            };
            let mut out = Vec::new();
            ch.pick(&b, &ctx, &usable, 3, &mut out);
            out
        };
        assert!(pick(&|_| false).is_empty());
        assert!(
            looked.get() < 100,
            "{} looks with every backend out",
            looked.get()
        );
        assert_eq!(pick(&|i| i == 4), vec![4]);
        assert!(
            looked.get() < 10_000,
            "{} looks for one in service",
            looked.get()
        );
    }

    /// An IPv4 client seen through a dual-stack socket (`::ffff:a.b.c.d`) is placed as the
    /// IPv4 address, so replicas listening on `0.0.0.0` and on `[::]` agree.
    #[test]
    fn a_mapped_ipv4_client_is_placed_as_ipv4() {
        let b = backends(&[1; 8]);
        let ch = ConsistentHash::new(HashKey::Ip, &b);
        let h = HeaderMap::new();
        let at = |ip: IpAddr| {
            let ctx = Context {
                client_ip: ip,
                headers: &h,
                query: None,
            };
            let mut out = Vec::new();
            ch.pick(&b, &ctx, &|_| true, 8, &mut out);
            out
        };
        for last in 0..50u8 {
            let v4 = std::net::Ipv4Addr::new(10, 1, 2, last);
            assert_eq!(at(IpAddr::V4(v4)), at(IpAddr::V6(v4.to_ipv6_mapped())));
        }
    }

    /// A backend out of service gives its keys to the next one on the ring; every other
    /// key stays where it was.
    #[test]
    fn a_backend_out_of_service_moves_only_its_keys() {
        let b = backends(&[1; 4]);
        let ch = ConsistentHash::new(HashKey::Header("x-user-id".into()), &b);
        let down = b[2].state.addr;
        let mut moved = 0;
        for u in 0..2000 {
            let user = format!("user-{u}");
            let before = place(&ch, &b, &user);
            let mut h = HeaderMap::new();
            h.insert("x-user-id", HeaderValue::from_str(&user).unwrap());
            let ctx = Context {
                client_ip: IpAddr::from([10, 0, 0, 1]),
                headers: &h,
                query: None,
            };
            let mut out = Vec::new();
            ch.pick(&b, &ctx, &|i| i != 2, 2, &mut out);
            let after = b[out[0]].state.addr;
            assert_ne!(after, down);
            assert!(!out.contains(&2), "{out:?}");
            if before == down {
                moved += 1;
            } else {
                assert_eq!(before, after, "{user} moved off a backend in service");
            }
        }
        assert!(
            (300..700).contains(&moved),
            "{moved} keys were on the backend out"
        );
    }

    #[test]
    fn replicas_agree_whatever_the_backend_order() {
        let a = backends(&[1; 4]);
        let mut b = a.clone();
        b.reverse();
        let key = HashKey::Header("x-user-id".into());
        let (ra, rb) = (
            ConsistentHash::new(key.clone(), &a),
            ConsistentHash::new(key, &b),
        );
        for u in 0..500 {
            let user = format!("u{u}");
            assert_eq!(place(&ra, &a, &user), place(&rb, &b, &user));
        }
    }

    #[test]
    fn reads_cookies_and_query_and_falls_back_without_a_key() {
        let b = backends(&[1; 3]);
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; sid=abc"),
        );
        let ctx = Context {
            client_ip: IpAddr::from([10, 0, 0, 1]),
            headers: &h,
            query: Some("x=1&room=42"),
        };
        let by_cookie = ConsistentHash::new(HashKey::Cookie("sid".into()), &b);
        let by_query = ConsistentHash::new(HashKey::Query("room".into()), &b);
        let by_header = ConsistentHash::new(HashKey::Header("x-user-id".into()), &b);
        let bytes = |ch: &ConsistentHash, ctx: &Context<'_>| match ch.key_bytes(ctx) {
            Some(KeyBytes::Slice(s)) => Some(s.to_vec()),
            _ => None,
        };
        assert_eq!(bytes(&by_cookie, &ctx), Some(b"abc".to_vec()));
        assert_eq!(bytes(&by_query, &ctx), Some(b"42".to_vec()));
        assert!(by_header.key_bytes(&ctx).is_none());
        // Without the key: least loaded first.
        {
            let _held = (b[0].state.guard(), b[1].state.guard());
            let mut out = Vec::new();
            by_header.pick(&b, &ctx, &|_| true, 1, &mut out);
            assert_eq!(out, vec![2]);
        }
        // An empty value is no key: such requests must not all pile onto one backend.
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static(""));
        h.insert(http::header::COOKIE, HeaderValue::from_static("sid="));
        let empty = Context {
            query: Some("room=&x=1"),
            headers: &h,
            ..ctx
        };
        assert!(by_header.key_bytes(&empty).is_none());
        assert!(by_cookie.key_bytes(&empty).is_none());
        assert!(by_query.key_bytes(&empty).is_none());
    }
}
