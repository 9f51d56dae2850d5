//! Each balancer over real backends that name themselves: which backend every request or
//! tunnel reached, counted.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use duplex_e2e::backend::Backend;
use duplex_e2e::client::{backend_of, close, ws, ws_with, HttpConn, Ws};
use duplex_e2e::eventually;
use duplex_e2e::proxy::{TestProxy, Upstream};

/// How many of `n` GETs on one client connection each backend answered.
async fn tally(p: &TestProxy, n: usize) -> BTreeMap<String, usize> {
    let mut c = HttpConn::open(p.addr).await;
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let r = c.get("/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *counts.entry(r.backend()).or_insert(0) += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_exactly() {
    let b = Backend::start_all(&["a", "b", "c"]).await;
    let up = Upstream::new("round_robin")
        .weighted(b[0].addr, 3)
        .weighted(b[1].addr, 1)
        .weighted(b[2].addr, 1);
    let p = TestProxy::single(&up).await;
    assert_eq!(
        tally(&p, 50).await,
        counts(&[("a", 30), ("b", 10), ("c", 10)])
    );
}

/// Long-lived tunnels: six spread 2/2/2; after the two on one backend close, the next two
/// new tunnels both go to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_sends_new_tunnels_to_the_emptiest_backend() {
    let b = Backend::start_all(&["a", "b", "c"]).await;
    let p =
        TestProxy::single(&Upstream::new("least_conn").backends(b.iter().map(|b| b.addr))).await;
    let mut held: Vec<(String, Ws)> = Vec::new();
    for _ in 0..6 {
        let (ws, resp) = ws(p.addr, "/echo").await;
        held.push((backend_of(&resp), ws));
    }
    let per = |held: &[(String, Ws)]| {
        let mut m = BTreeMap::new();
        for (name, _) in held {
            *m.entry(name.clone()).or_insert(0) += 1;
        }
        m
    };
    assert_eq!(per(&held), counts(&[("a", 2), ("b", 2), ("c", 2)]));

    // Close both tunnels on "b" and wait until the proxy has let them go.
    let (on_b, rest): (Vec<_>, Vec<_>) = held.into_iter().partition(|(n, _)| n == "b");
    for (_, ws) in on_b {
        close(ws).await;
    }
    let b_addr = b[1].addr.to_string();
    eventually(Duration::from_secs(5), "the tunnels on b to end", || {
        let (p, b_addr) = (&p, b_addr.clone());
        async move {
            p.metric("duplex_websocket_tunnels_active", &[("backend", &b_addr)])
                .await
                == 0.0
        }
    })
    .await;

    let mut fresh = Vec::new();
    for _ in 0..2 {
        let (ws, resp) = ws(p.addr, "/echo").await;
        fresh.push((backend_of(&resp), ws));
    }
    let names: Vec<&str> = fresh.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec!["b", "b"],
        "new tunnels go to the emptied backend"
    );
    drop(rest);
}

async fn spreads_over_all(balancer: &str) {
    let b = Backend::start_all(&["a", "b", "c"]).await;
    let p = TestProxy::single(&Upstream::new(balancer).backends(b.iter().map(|b| b.addr))).await;
    let got = tally(&p, 300).await;
    assert_eq!(got.values().sum::<usize>(), 300);
    for name in ["a", "b", "c"] {
        let n = got.get(name).copied().unwrap_or(0);
        assert!(n > 30, "{balancer}: {name} got {n} of 300: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_over_all_backends() {
    spreads_over_all("random").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_spreads_over_all_backends() {
    spreads_over_all("p2c").await;
}

fn by_user() -> Upstream {
    Upstream::new("consistent_hash").option("hash_key", "header:x-user-id")
}

/// Twenty WebSocket connections per user, users interleaved: each user always lands on the
/// same backend, and the users do not all land on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_each_user_on_one_backend() {
    let b = Backend::start_all(&["a", "b", "c"]).await;
    let p = TestProxy::single(&by_user().backends(b.iter().map(|b| b.addr))).await;
    let users: Vec<String> = (0..12).map(|u| format!("user-{u}")).collect();
    let mut placed: HashMap<&str, String> = HashMap::new();
    for round in 0..20 {
        for user in &users {
            let (ws, resp) = ws_with(p.addr, "/echo", &[("x-user-id", user)]).await;
            let got = backend_of(&resp);
            let first = placed.entry(user).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "{user} moved on connection {round}");
            close(ws).await;
        }
    }
    let used: std::collections::HashSet<&String> = placed.values().collect();
    assert!(
        used.len() > 1,
        "12 users all hashed to one backend: {placed:?}"
    );
}

/// Weights set each backend's share of keys under `consistent_hash` too, as nginx's
/// `hash ... consistent` and HAProxy's `hash-type consistent` do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_shares_keys_by_weight() {
    let b = Backend::start_all(&["a", "b"]).await;
    let up = by_user().weighted(b[0].addr, 1).weighted(b[1].addr, 3);
    let p = TestProxy::single(&up).await;
    let mut conn = HttpConn::open(p.addr).await;
    let mut on_b = 0;
    for u in 0..400 {
        let user = format!("user-{u}");
        if conn
            .get("/", &[("x-user-id", user.as_str())])
            .await
            .backend()
            == "b"
        {
            on_b += 1;
        }
    }
    assert!(
        (250..350).contains(&on_b),
        "{on_b} of 400 users on the backend of weight 3 (of 4)"
    );
}

/// 200 users over four backends, then a proxy configured without the fourth: only the
/// users that were on it move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_moves_only_the_removed_backends_users() {
    let b = Backend::start_all(&["a", "b", "c", "d"]).await;
    let all = TestProxy::single(&by_user().backends(b.iter().map(|b| b.addr))).await;
    let fewer = TestProxy::single(&by_user().backends(b[..3].iter().map(|b| b.addr))).await;
    let (mut before, mut after) = (
        HttpConn::open(all.addr).await,
        HttpConn::open(fewer.addr).await,
    );
    let mut per_backend = BTreeMap::new();
    let (mut on_removed, mut moved) = (0, Vec::new());
    for u in 0..200 {
        let user = format!("user-{u}");
        let h = [("x-user-id", user.as_str())];
        let was = before.get("/", &h).await.backend();
        let now = after.get("/", &h).await.backend();
        *per_backend.entry(was.clone()).or_insert(0) += 1;
        if was == "d" {
            on_removed += 1;
            assert_ne!(now, "d", "{user} still on the removed backend");
        } else if was != now {
            moved.push(format!("{user}: {was} -> {now}"));
        }
    }
    assert!(
        moved.is_empty(),
        "users on surviving backends moved: {moved:?}"
    );
    assert_eq!(
        per_backend.len(),
        4,
        "every backend held users: {per_backend:?}"
    );
    assert!(
        on_removed >= 10,
        "the removed backend held only {on_removed} of 200 users: {per_backend:?}"
    );
}
