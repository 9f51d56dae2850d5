//! Reload semantics one at a time: least_conn load carried over, removed backends drained,
//! listeners added and removed, and a bad file refused with the running config kept.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use duplex_config::Config;
use duplex_e2e::backend::Backend;
use duplex_e2e::client::{self, backend_of, recv, Ws};
use duplex_e2e::raw::RawBackend;
use duplex_e2e::wire::{read_head, switching_protocols, upgrade_request};
use duplex_e2e::{eventually, within};
use duplex_proxy::{Metrics, Proxy};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::Message;

fn yaml(
    listeners: &[(&str, &str)],
    balancer: &str,
    extra: &str,
    backends: &[SocketAddr],
) -> String {
    let mut y = String::from("listeners:\n");
    for (name, bind) in listeners {
        y.push_str(&format!("  - name: {name}\n    bind: {bind}\n"));
    }
    y.push_str(&format!(
        "admin:\n  bind: 127.0.0.1:0\nroutes:\n  - name: all\n    upstream: pool\nupstreams:\n  - name: pool\n    balancer: {balancer}\n{extra}    backends:\n"
    ));
    for b in backends {
        y.push_str(&format!("      - addr: {b}\n"));
    }
    y
}

fn config(text: &str) -> Config {
    Config::parse(text, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn start(text: &str, source: Option<PathBuf>) -> Proxy {
    within(
        "start",
        Proxy::start(config(text), source, Arc::new(Metrics::new())),
    )
    .await
    .expect("the proxy starts")
}

async fn echo_ok(ws: &mut Ws, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send");
    assert_eq!(recv(ws).await, Message::text(text));
}

#[tokio::test]
async fn least_conn_load_survives_a_reload_and_new_backends_fill_first() {
    let b = Backend::start_all(&["a", "b", "c"]).await;
    let public = [("public", "127.0.0.1:0")];
    let proxy = start(
        &yaml(&public, "round_robin", "", &[b[0].addr, b[1].addr]),
        None,
    )
    .await;
    let addr = proxy.listener_addr("public").expect("bound");
    // Six tunnels, three on each of a and b.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(client::ws(addr, "/").await);
    }
    let on = |name: &str, held: &[(Ws, Response)]| {
        held.iter().filter(|(_, r)| backend_of(r) == name).count()
    };
    assert_eq!((on("a", &held), on("b", &held)), (3, 3));

    // The balancer changes and c joins: c has no load, so the next three all go there.
    let applied = proxy
        .reload(config(&yaml(
            &public,
            "least_conn",
            "",
            &[b[0].addr, b[1].addr, b[2].addr],
        )))
        .await;
    assert_eq!(applied.expect("reload"), 2);
    for _ in 0..3 {
        held.push(client::ws(addr, "/").await);
    }
    assert_eq!((on("a", &held), on("b", &held), on("c", &held)), (3, 3, 3));
    // Every tunnel opened before the reload still echoes.
    for (i, (ws, _)) in held.iter_mut().enumerate() {
        echo_ok(ws, &format!("m{i}")).await;
    }
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn a_removed_backend_drains_then_its_tunnels_close() {
    let b = Backend::start_all(&["keep", "gone"]).await;
    let public = [("public", "127.0.0.1:0")];
    let drain = "    drain_timeout: 700ms\n";
    let proxy = start(
        &yaml(&public, "round_robin", drain, &[b[0].addr, b[1].addr]),
        None,
    )
    .await;
    let addr = proxy.listener_addr("public").expect("bound");
    let (mut first, r1) = client::ws(addr, "/").await;
    let (mut second, r2) = client::ws(addr, "/").await;
    let (mut kept, mut gone) = if backend_of(&r1) == "keep" {
        (first, second)
    } else {
        (second, first)
    };
    assert_ne!(backend_of(&r1), backend_of(&r2));

    // Taken before the reload starts its drain: the drain can only end after this plus
    // drain_timeout.
    let reloaded = Instant::now();
    proxy
        .reload(config(&yaml(&public, "round_robin", drain, &[b[0].addr])))
        .await
        .expect("reload");
    // Right after the reload the removed backend's tunnel still works...
    echo_ok(&mut gone, "still here").await;
    // ...new connections avoid it...
    for _ in 0..4 {
        let (ws, r) = client::ws(addr, "/").await;
        assert_eq!(backend_of(&r), "keep");
        client::close(ws).await;
    }
    // ...and once drain_timeout passes, it is closed, while the kept backend's tunnel lives.
    let end = within("the drained tunnel to close", async {
        // The backend sends nothing unasked: a few stray frames at most before the end.
        for _ in 0..16 {
            match gone.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
        panic!("the drained tunnel kept sending instead of closing");
    });
    end.await;
    // Closed by drain_timeout (700 ms after the reload), not at once nor by some other
    // timer: not before 80% of it, and well before the default five minutes. The upper
    // bound leaves more than 2 s for a slow machine to notice the close.
    let closed_after = reloaded.elapsed();
    assert!(
        closed_after >= Duration::from_millis(560) && closed_after < Duration::from_secs(3),
        "the drained tunnel closed {closed_after:?} after the reload; drain_timeout is 700ms"
    );
    echo_ok(&mut kept, "kept").await;
    first = kept;
    client::close(first).await;
    second = gone;
    drop(second);
    let series = format!("backend=\"{}\"", b[1].addr);
    eventually(
        Duration::from_secs(5),
        "the drained backend's series to go",
        || {
            let gone = !proxy.metrics().render().contains(&series);
            async move { gone }
        },
    )
    .await;
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// The edit that removes a backend and shortens `drain_timeout` drains it for the new
/// value, not the default five minutes in force before.
#[tokio::test]
async fn the_reload_that_removes_a_backend_sets_its_drain_timeout() {
    let b = Backend::start_all(&["keep", "gone"]).await;
    let public = [("public", "127.0.0.1:0")];
    let proxy = start(
        &yaml(&public, "round_robin", "", &[b[0].addr, b[1].addr]),
        None,
    )
    .await;
    let addr = proxy.listener_addr("public").expect("bound");
    let (first, r1) = client::ws(addr, "/").await;
    let (second, _) = client::ws(addr, "/").await;
    let (mut kept, mut gone) = if backend_of(&r1) == "keep" {
        (first, second)
    } else {
        (second, first)
    };
    let short = "    drain_timeout: 300ms\n";
    proxy
        .reload(config(&yaml(&public, "round_robin", short, &[b[0].addr])))
        .await
        .expect("reload");
    // Within `within`'s bound, far less than the five minutes in force before.
    duplex_e2e::health_kit::ends(&mut gone).await;
    echo_ok(&mut kept, "kept").await;
    client::close(kept).await;
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// A handshake still waiting for its backend's 101 when a reload removes the backend and
/// its drain ends gets 503, not a 101 for a tunnel that would be closed at once.
#[tokio::test]
async fn a_handshake_outliving_its_backends_drain_gets_503() {
    let (answer, answered) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let (go, heard) = (Arc::clone(&answer), Arc::clone(&answered));
    let slow = RawBackend::start(move |mut tcp| {
        let (go, heard) = (Arc::clone(&go), Arc::clone(&heard));
        async move {
            let (head, _) = read_head(&mut tcp).await?;
            heard.notify_one();
            go.notified().await;
            tcp.write_all(switching_protocols(&head, &[]).as_bytes())
                .await?;
            // Held open: whatever closes the tunnel, it is not the backend.
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest).await;
            Ok(())
        }
    })
    .await;
    let other = Backend::start("other").await;
    let public = [("public", "127.0.0.1:0")];
    let drain = "    drain_timeout: 100ms\n";
    let proxy = start(&yaml(&public, "round_robin", drain, &[slow.addr]), None).await;
    let addr = proxy.listener_addr("public").expect("bound");
    let mut client = client::tcp(addr).await;
    let req = upgrade_request("/", &addr.to_string(), &[]);
    client.write_all(req.as_bytes()).await.expect("write");
    within("the backend to get the handshake", answered.notified()).await;

    proxy
        .reload(config(&yaml(&public, "round_robin", drain, &[other.addr])))
        .await
        .expect("reload");
    let admin = proxy.admin_addr();
    eventually(Duration::from_secs(5), "the drain to end", || async move {
        client::get(admin, "/status", &[])
            .await
            .text()
            .contains("\"draining\": []")
    })
    .await;
    answer.notify_one();
    let (head, _) = within("the answer", read_head(&mut client))
        .await
        .expect("a response head");
    assert_eq!(head.status(), 503, "{head:?}");
    let metrics = proxy.metrics().render();
    assert!(
        metrics.contains(
            "duplex_websocket_upgrades_total{result=\"no_backend\",route=\"all\",upstream=\"pool\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "duplex_websocket_upgrades_total{result=\"ok\",route=\"all\",upstream=\"pool\"} 0"
        ),
        "{metrics}"
    );
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn listeners_come_and_go_without_touching_live_tunnels() {
    let b = Backend::start("solo").await;
    let one = [("public", "127.0.0.1:0")];
    let proxy = start(&yaml(&one, "least_conn", "", &[b.addr]), None).await;
    let first = proxy.listener_addr("public").expect("bound");
    let (mut on_first, _) = client::ws(first, "/").await;

    // Add a listener: it accepts; the first is not rebound.
    let two = [("public", "127.0.0.1:0"), ("extra", "127.0.0.2:0")];
    proxy
        .reload(config(&yaml(&two, "least_conn", "", &[b.addr])))
        .await
        .expect("reload");
    assert_eq!(
        proxy.listener_addr("public"),
        Some(first),
        "an unchanged listener keeps its socket"
    );
    let extra = proxy
        .listener_addr("extra")
        .expect("the added listener is bound");
    let (mut on_extra, _) = client::ws(extra, "/").await;

    // Remove it again: it stops accepting, its tunnel keeps running.
    proxy
        .reload(config(&yaml(&one, "least_conn", "", &[b.addr])))
        .await
        .expect("reload");
    assert_eq!(proxy.listener_addr("extra"), None);
    eventually(
        Duration::from_secs(5),
        "the removed listener to refuse connections",
        || async move { tokio::net::TcpStream::connect(extra).await.is_err() },
    )
    .await;
    echo_ok(&mut on_extra, "via the removed listener").await;
    echo_ok(&mut on_first, "via the first listener").await;
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// A reload that comes while shutdown waits for open connections is refused: a
/// listener it bound would never accept, leaving its clients unanswered.
#[tokio::test]
async fn a_reload_during_shutdown_is_refused() {
    let b = Backend::start("solo").await;
    let one = [("public", "127.0.0.1:0")];
    let proxy = start(&yaml(&one, "least_conn", "", &[b.addr]), None).await;
    let first = proxy.listener_addr("public").expect("bound");
    // An open tunnel keeps shutdown in its grace period.
    let (mut ws, _) = client::ws(first, "/").await;
    let stopping = {
        let p = proxy.clone();
        tokio::spawn(async move { p.shutdown(Duration::from_secs(5)).await })
    };
    let p = proxy.clone();
    eventually(Duration::from_secs(5), "shutdown to begin", || {
        let p = p.clone();
        async move { p.is_stopping() }
    })
    .await;
    let two = [("public", "127.0.0.1:0"), ("extra", "127.0.0.2:0")];
    let err = proxy
        .reload(config(&yaml(&two, "least_conn", "", &[b.addr])))
        .await
        .expect_err("a reload during shutdown");
    assert!(err.to_string().contains("shutting down"), "{err}");
    // Not the file's fault: not counted or shown as a refused reload, as for SIGHUP and
    // POST /reload.
    let metrics = proxy.metrics().render();
    assert!(
        metrics.contains("duplex_config_reloads_total{result=\"error\"} 0"),
        "{metrics}"
    );
    assert!(proxy.last_reload().error.is_none());
    echo_ok(&mut ws, "still served while draining").await;
    drop(ws);
    within("shutdown", stopping).await.expect("shutdown task");
}

#[tokio::test]
async fn a_bad_file_changes_nothing_and_shows_in_status() {
    let b = Backend::start_all(&["a", "b"]).await;
    let dir = std::env::temp_dir().join(format!("duplex-e2e-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("duplex.yaml");
    let good = yaml(&[("public", "127.0.0.1:0")], "least_conn", "", &[b[0].addr]);
    std::fs::write(&path, &good).expect("write");
    let proxy = start(&good, Some(path.clone())).await;
    let addr = proxy.listener_addr("public").expect("bound");
    let admin = proxy.admin_addr();
    let post = || client::post(admin, "/reload");

    // An unknown upstream: 400 with FILE:LINE:COL, generation unchanged, traffic unchanged.
    std::fs::write(&path, good.replace("upstream: pool", "upstream: nowhere")).expect("write");
    let r = post().await;
    assert_eq!(r.status, 400);
    let want = format!(
        "{}:8:15: route \\\"all\\\" names unknown upstream \\\"nowhere\\\"",
        path.display()
    );
    assert!(r.text().contains(&want), "{} lacks {want}", r.text());
    assert_eq!(proxy.generation(), 1);
    assert_eq!(client::get(addr, "/", &[]).await.backend(), "a");
    let status = client::get(admin, "/status", &[]).await.text();
    assert!(
        status.contains("\"ok\": false") && status.contains("unknown upstream"),
        "{status}"
    );

    // A good file clears it and applies.
    std::fs::write(
        &path,
        yaml(&[("public", "127.0.0.1:0")], "least_conn", "", &[b[1].addr]),
    )
    .expect("write");
    let r = post().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(proxy.generation(), 2);
    assert_eq!(client::get(addr, "/", &[]).await.backend(), "b");
    let status = client::get(admin, "/status", &[]).await.text();
    assert!(
        status.contains("\"ok\": true") && status.contains("\"generation\": 2"),
        "{status}"
    );
    // Asking again with nothing changed applies nothing.
    let r = post().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"generation\": 2"), "{}", r.text());
    assert_eq!(proxy.generation(), 2);

    // A refused edit, then undone: the files are the configuration in force again, so
    // the refusal no longer shows, though nothing is applied.
    let in_force = std::fs::read_to_string(&path).expect("read");
    std::fs::write(
        &path,
        in_force.replace("upstream: pool", "upstream: nowhere"),
    )
    .expect("write");
    assert_eq!(post().await.status, 400);
    std::fs::write(&path, &in_force).expect("write");
    let r = post().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(proxy.generation(), 2);
    let status = client::get(admin, "/status", &[]).await.text();
    assert!(
        status.contains("\"ok\": true") && !status.contains("unknown upstream"),
        "{status}"
    );
    let metrics = client::get(admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("duplex_config_reloads_total{result=\"error\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("duplex_config_generation 2"), "{metrics}");

    // A new admin.bind applies (the rest of the file does) but the admin listener stays
    // until a restart, which /status says.
    let status: serde_json::Value =
        serde_json::from_str(&client::get(admin, "/status", &[]).await.text()).expect("JSON");
    assert_eq!(status["admin"]["addr"], admin.to_string().as_str());
    assert!(
        status["admin"]["restart_needed_for_bind"].is_null(),
        "{status}"
    );
    // Port 0 reloaded as the port the OS chose names the same listener: nothing to restart.
    let pinned = in_force.replace(
        "bind: 127.0.0.1:0\nroutes",
        &format!("bind: {admin}\nroutes"),
    );
    assert_ne!(pinned, in_force);
    std::fs::write(&path, &pinned).expect("write");
    assert_eq!(post().await.status, 200);
    let status: serde_json::Value =
        serde_json::from_str(&client::get(admin, "/status", &[]).await.text()).expect("JSON");
    assert!(
        status["admin"]["restart_needed_for_bind"].is_null(),
        "{status}"
    );
    let moved = in_force.replace("bind: 127.0.0.1:0\nroutes", "bind: 127.0.0.2:0\nroutes");
    assert_ne!(moved, in_force);
    std::fs::write(&path, &moved).expect("write");
    assert_eq!(post().await.status, 200);
    let status: serde_json::Value =
        serde_json::from_str(&client::get(admin, "/status", &[]).await.text()).expect("JSON");
    assert_eq!(
        status["admin"]["restart_needed_for_bind"], "127.0.0.2:0",
        "{status}"
    );
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `/status` entry of backend `addr` in upstream `pool`; `None` when the table in force
/// does not have it.
async fn pool_backend(proxy: &Proxy, addr: SocketAddr) -> Option<serde_json::Value> {
    let r = client::get(proxy.admin_addr(), "/status", &[]).await;
    assert_eq!(r.status, 200, "/status: {}", r.text());
    let v: serde_json::Value = serde_json::from_str(&r.text()).expect("/status is JSON");
    v["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["name"] == "pool")?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["addr"] == addr.to_string().as_str())
        .cloned()
}

#[tokio::test]
async fn a_backend_added_back_while_draining_keeps_its_tunnels() {
    let b = Backend::start_all(&["stay", "flip"]).await;
    let public = [("public", "127.0.0.1:0")];
    let drain = "    drain_timeout: 400ms\n";
    let both = yaml(&public, "least_conn", drain, &[b[0].addr, b[1].addr]);
    let proxy = start(&both, None).await;
    let addr = proxy.listener_addr("public").expect("bound");
    let mut on = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let (ws, r) = client::ws(addr, "/").await;
        on.insert(backend_of(&r), ws);
    }
    let mut on_flip = on
        .remove("flip")
        .expect("least_conn put one tunnel on each backend");
    let on_stay = on
        .remove("stay")
        .expect("least_conn put one tunnel on each backend");

    proxy
        .reload(config(&yaml(&public, "least_conn", drain, &[b[0].addr])))
        .await
        .expect("remove");
    let status = client::get(proxy.admin_addr(), "/status", &[]).await.text();
    assert!(
        status.contains(&format!("\"addr\": \"{}\"", b[1].addr))
            && status.contains("\"draining_seconds\""),
        "{status}"
    );
    // Added back, and listed first now: its state (its load) must follow its address,
    // not its place in the list.
    let flip_first = yaml(&public, "least_conn", drain, &[b[1].addr, b[0].addr]);
    proxy.reload(config(&flip_first)).await.expect("add back");
    // Well past the drain timeout, the tunnel is alive and its load still counts.
    tokio::time::sleep(Duration::from_millis(900)).await;
    echo_ok(&mut on_flip, "still here").await;
    let status = client::get(proxy.admin_addr(), "/status", &[]).await.text();
    assert!(status.contains("\"draining\": []"), "{status}");
    let flip = pool_backend(&proxy, b[1].addr)
        .await
        .expect("flip is back in the pool");
    assert_eq!(
        flip["tunnels"], 1,
        "the added-back backend still counts its tunnel: {flip}"
    );
    // stay's tunnel gone, flip's load (1) is the only one left.
    client::close(on_stay).await;
    let p = &proxy;
    let stay_addr = b[0].addr;
    eventually(
        Duration::from_secs(5),
        "stay's tunnel to be counted closed",
        || async move {
            pool_backend(p, stay_addr)
                .await
                .is_some_and(|s| s["tunnels"] == 0)
        },
    )
    .await;
    let (_, r) = client::ws(addr, "/").await;
    assert_eq!(
        backend_of(&r),
        "stay",
        "flip still carries its tunnel's load"
    );
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// Kubernetes mounts a ConfigMap as `FILE -> ..data/FILE`, `..data -> ..<timestamp>/`, and
/// updates it by writing a new timestamped directory and renaming a new `..data` symlink
/// over the old one. The file's own inode never changes; the watch must still see it.
#[tokio::test]
async fn a_configmap_style_symlink_swap_reloads() {
    use std::os::unix::fs::symlink;
    let b = Backend::start_all(&["first", "second"]).await;
    let dir = std::env::temp_dir().join(format!("duplex-e2e-configmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("..v1")).expect("temp dir");
    let text = |addr| yaml(&[("public", "127.0.0.1:0")], "least_conn", "", &[addr]);
    std::fs::write(dir.join("..v1/duplex.yaml"), text(b[0].addr)).expect("write v1");
    symlink("..v1", dir.join("..data")).expect("..data");
    symlink("..data/duplex.yaml", dir.join("duplex.yaml")).expect("duplex.yaml");
    let path = dir.join("duplex.yaml");
    let proxy = start(&text(b[0].addr), Some(path.clone())).await;
    duplex_proxy::triggers::watch_file(path, proxy.clone());
    let addr = proxy.listener_addr("public").expect("bound");
    assert_eq!(client::get(addr, "/", &[]).await.backend(), "first");

    // The kubelet's update: a new directory, a new symlink, renamed over ..data.
    std::fs::create_dir_all(dir.join("..v2")).expect("v2 dir");
    std::fs::write(dir.join("..v2/duplex.yaml"), text(b[1].addr)).expect("write v2");
    symlink("..v2", dir.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    eventually(
        Duration::from_secs(10),
        "the swapped config to apply",
        || {
            let g = proxy.generation();
            async move { g == 2 }
        },
    )
    .await;
    assert_eq!(client::get(addr, "/", &[]).await.backend(), "second");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bad file refused by the watch, then a good one, then the same bad file again: the
/// second time it is refused again (logged, counted, shown), not skipped as refused
/// before while the good one is in force.
#[tokio::test]
async fn a_bad_file_that_comes_back_is_refused_again() {
    let b = Backend::start_all(&["only"]).await;
    let dir = std::env::temp_dir().join(format!("duplex-e2e-refused-again-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("duplex.yaml");
    let good = yaml(&[("public", "127.0.0.1:0")], "least_conn", "", &[b[0].addr]);
    let bad = format!("{good}\nnot_a_key: 1\n");
    std::fs::write(&path, &good).expect("write");
    let proxy = start(&good, Some(path.clone())).await;
    duplex_proxy::triggers::watch_file(path.clone(), proxy.clone());
    let refusals = || {
        let text = proxy.metrics().render();
        let line = text
            .lines()
            .find(|l| l.starts_with("duplex_config_reloads_total{result=\"error\"}"))
            .map(str::to_owned);
        line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let wait_refusals = |n: f64, what: &'static str| {
        eventually(Duration::from_secs(10), what, move || {
            let seen = refusals();
            async move { seen >= n }
        })
    };
    std::fs::write(&path, &bad).expect("write bad");
    wait_refusals(1.0, "the bad file to be refused").await;
    std::fs::write(&path, &good).expect("write good again");
    eventually(Duration::from_secs(10), "the refusal to clear", || {
        let clear = proxy.last_reload().error.is_none();
        async move { clear }
    })
    .await;
    std::fs::write(&path, &bad).expect("write bad again");
    wait_refusals(2.0, "the bad file to be refused again").await;
    assert!(
        proxy.last_reload().error.is_some(),
        "/status shows the refusal"
    );
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TLS listener `tls` whose certificate file is a FIFO: reading it waits until the
/// FIFO is fed, which stands for a disk or network mount that is slow to answer.
struct SlowCert {
    /// The listener's YAML list item.
    listener: String,
    feed: std::sync::mpsc::Sender<()>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// Removed, with the FIFO, once the writer is done.
    _dir: duplex_e2e::pki::TempDir,
}

impl Drop for SlowCert {
    /// Feeds the FIFO if that has not happened (a failed test), so that no reader stays
    /// blocked on it; the files go with `dir` after.
    fn drop(&mut self) {
        let _ = self.feed.send(());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl SlowCert {
    fn new(tag: &str) -> SlowCert {
        use duplex_e2e::pki::{self, Ca};
        let dir = pki::temp_dir(tag);
        let leaf = Ca::new(tag).leaf(&["localhost"]);
        let key = pki::write(&dir, "key.pem", &leaf.key);
        let cert = dir.join("cert.pem");
        let made = std::process::Command::new("mkfifo")
            .arg(&cert)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo failed");
        // The writer feeds the FIFO when told to, or after 10 s whatever happens, so that
        // a reload that blocks a test's only thread cannot hang the test. It writes only
        // once a reader has the FIFO open (until then a non-blocking open fails with
        // ENXIO), so that the certificate is not written into a pipe nobody reads and
        // lost, which would leave the reload's read waiting forever; with no reader after
        // 20 s more it gives up, and then nothing waits on the FIFO either.
        let (feed, fed) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn({
            let cert = cert.clone();
            move || {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let _ = fed.recv_timeout(Duration::from_secs(10));
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                loop {
                    match std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&cert)
                    {
                        Ok(mut fifo) => return fifo.write_all(leaf.cert.as_bytes()),
                        Err(e)
                            if e.raw_os_error() == Some(libc::ENXIO)
                                && std::time::Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        });
        let listener = format!(
            "  - name: tls\n    bind: 127.0.0.1:0\n    tls:\n      certificates:\n        - cert: {}\n          key: {}\n",
            cert.display(),
            key.display()
        );
        SlowCert {
            listener,
            feed,
            writer: Some(writer),
            _dir: dir,
        }
    }

    /// `text` with the `tls` listener added.
    fn config(&self, text: &str) -> Config {
        config(&text.replacen("admin:", &format!("{}admin:", self.listener), 1))
    }

    /// Lets the certificate be read, once.
    fn feed(&mut self) {
        let _ = self.feed.send(());
        if let Some(writer) = self.writer.take() {
            writer
                .join()
                .expect("the writer thread")
                .expect("write the certificate into the FIFO");
        }
    }
}

/// Applies `config` in a task of its own.
fn spawn_reload(
    proxy: &Proxy,
    config: Config,
) -> tokio::task::JoinHandle<Result<u64, duplex_proxy::ProxyError>> {
    let proxy = proxy.clone();
    tokio::spawn(async move { proxy.reload(config).await })
}

/// A reload reads certificate files off the runtime's threads: while one waits on a file
/// that is slow to read, the proxy goes on serving from its only runtime thread, and the
/// reload completes once the file can be read.
#[tokio::test]
async fn a_slow_certificate_read_does_not_stall_traffic() {
    let b = Backend::start("b1").await;
    let text = yaml(&[("public", "127.0.0.1:0")], "round_robin", "", &[b.addr]);
    let proxy = start(&text, None).await;
    let addr = proxy.listener_addr("public").expect("public is bound");
    let mut slow = SlowCert::new("slow-cert");
    let reload = spawn_reload(&proxy, slow.config(&text));

    // Traffic flows while the reload waits for the file.
    let r = within("a request during the reload", client::get(addr, "/", &[])).await;
    assert_eq!(r.status, 200);
    assert!(
        !reload.is_finished(),
        "the reload finished before its certificate file could be read"
    );

    slow.feed();
    let generation = within("the reload to finish", reload)
        .await
        .expect("the reload task")
        .expect("the reload is applied");
    assert_eq!(generation, 2);
    assert!(
        proxy.listener_addr("tls").is_some(),
        "the TLS listener is up"
    );
}

/// Reloads read their files before they queue: a later reload applies while the first
/// still waits on a slow certificate file, and the first, once it has read it, does not
/// apply over the later one (the last asked for stands) and says so.
#[tokio::test]
async fn a_slow_reload_neither_holds_up_nor_overrides_a_later_one() {
    let b = Backend::start("b1").await;
    let text = yaml(&[("public", "127.0.0.1:0")], "round_robin", "", &[b.addr]);
    let proxy = start(&text, None).await;
    let mut slow = SlowCert::new("slow-first-reload");
    let first = spawn_reload(&proxy, slow.config(&text));
    let p = &proxy;
    eventually(
        Duration::from_secs(5),
        "the first reload to start",
        move || async move { p.reload_in_progress() },
    )
    .await;

    // A second reload, adding a listener, applies while the first still reads.
    let two = [("public", "127.0.0.1:0"), ("extra", "127.0.0.2:0")];
    // Well within the 10 s after which the certificate's writer gives in anyway.
    let generation = duplex_e2e::within_for(
        Duration::from_secs(3),
        "the second reload, while the first waits on its file",
        proxy.reload(config(&yaml(&two, "round_robin", "", &[b.addr]))),
    )
    .await
    .expect("the second reload is applied");
    assert_eq!(generation, 2);
    assert!(proxy.reload_in_progress(), "the first reload still runs");

    slow.feed();
    let err = within("the first reload to end", first)
        .await
        .expect("the reload task")
        .expect_err("the first reload is superseded");
    assert!(err.to_string().contains("asked for later"), "{err}");
    assert!(!proxy.reload_in_progress());
    assert_eq!(proxy.generation(), 2, "the first reload did not apply");
    assert!(proxy.listener_addr("tls").is_none(), "no TLS listener");
    assert!(
        proxy.listener_addr("extra").is_some(),
        "the later config stands"
    );
}

/// Reloads stuck reading files (a hung mount) do not pile up blocking threads: with four
/// of them waiting, a fifth is refused at once, and once they end reloads go through again.
#[tokio::test]
async fn reloads_stuck_reading_files_do_not_pile_up() {
    let b = Backend::start("b1").await;
    let text = yaml(&[("public", "127.0.0.1:0")], "round_robin", "", &[b.addr]);
    let proxy = start(&text, None).await;
    let mut slow: Vec<SlowCert> = (0..4)
        .map(|i| SlowCert::new(&format!("stuck-reload-{i}")))
        .collect();
    let stuck: Vec<_> = slow
        .iter()
        .map(|s| spawn_reload(&proxy, s.config(&text)))
        .collect();
    // One turn of this (single-threaded) runtime lets each spawned reload take its place.
    tokio::task::yield_now().await;
    let err = proxy
        .reload(config(&text))
        .await
        .expect_err("a fifth reload while four read");
    assert!(
        matches!(err, duplex_proxy::ProxyError::ReloadBusy(4)),
        "{err}"
    );
    for s in &mut slow {
        s.feed();
    }
    for r in stuck {
        match within("a stuck reload to end", r)
            .await
            .expect("the reload task")
        {
            Ok(_) | Err(duplex_proxy::ProxyError::Superseded { .. }) => {}
            Err(e) => panic!("a stuck reload failed: {e}"),
        }
    }
    within("a reload after them", proxy.reload(config(&text)))
        .await
        .expect("reloads go through again");
}

/// A backend that answers every HTTP request with 200 and counts its open connections.
async fn counting_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&open);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = Vec::new();
                // Bounded: each connection closes with its client, or after 1,000 reads.
                for _ in 0..1000 {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    have.extend_from_slice(&buf[..n]);
                    while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                        have.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            break;
                        }
                    }
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// A reload that takes a backend out, or that replaces the upstream's keep-alive pool
/// (here a new connect_timeout), leaves no idle connection open to the backends it no
/// longer uses, rather than for the pool's 90 s idle time.
#[tokio::test]
async fn a_reload_closes_idle_connections_it_no_longer_uses() {
    use std::sync::atomic::Ordering;
    let ((a, open_a), (b, open_b)) = (counting_backend().await, counting_backend().await);
    let public = [("public", "127.0.0.1:0")];
    let proxy = start(&yaml(&public, "round_robin", "", &[a, b]), None).await;
    let addr = proxy.listener_addr("public").expect("bound");
    for _ in 0..4 {
        assert_eq!(client::get(addr, "/", &[]).await.status, 200);
    }
    let (oa, ob) = (Arc::clone(&open_a), Arc::clone(&open_b));
    eventually(Duration::from_secs(5), "a kept connection to each", || {
        let both = oa.load(Ordering::SeqCst) >= 1 && ob.load(Ordering::SeqCst) >= 1;
        async move { both }
    })
    .await;

    // b taken out: its idle connection closes; a's stays in the pool.
    proxy
        .reload(config(&yaml(&public, "round_robin", "", &[a])))
        .await
        .expect("reload");
    eventually(Duration::from_secs(5), "b's connection to close", || {
        let n = ob.load(Ordering::SeqCst);
        async move { n == 0 }
    })
    .await;
    assert!(open_a.load(Ordering::SeqCst) >= 1, "a's is kept");

    // A new pool: the old one's idle connections close.
    let slower = "    connect_timeout: 6s\n";
    proxy
        .reload(config(&yaml(&public, "round_robin", slower, &[a])))
        .await
        .expect("reload");
    eventually(
        Duration::from_secs(5),
        "a's old connection to close",
        || {
            let n = oa.load(Ordering::SeqCst);
            async move { n == 0 }
        },
    )
    .await;
    assert_eq!(client::get(addr, "/", &[]).await.status, 200);
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}
