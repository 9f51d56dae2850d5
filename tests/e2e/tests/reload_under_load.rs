//! Hot reload under load: 50+ reloads by all three triggers while WebSocket and HTTP traffic
//! flows, with zero failed messages, requests or unexpected closes.
//!
//! Three proxies read one config file: one reloads on the file watch, one on SIGHUP, one on
//! `POST /reload`. Each step rewrites the file (in place or by rename, as editors do), fires
//! the two explicit triggers, and waits until all three proxies have applied or refused it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_config::Config;
use duplex_e2e::backend::Backend;
use duplex_e2e::client::{self, backend_of, HttpConn};
use duplex_e2e::{eventually, within};
use duplex_proxy::{Metrics, Proxy};
use futures_util::SinkExt;
use http::Method;
use tokio_tungstenite::tungstenite::Message;

const STEPS: usize = 56;
const CLIENTS_PER_PROXY: usize = 8;

/// What one step of the test writes.
#[derive(Clone)]
struct Shape {
    /// Indexes into the four backends.
    backends: Vec<usize>,
    balancer: &'static str,
    prefix: &'static str,
}

fn valid_yaml(shape: &Shape, addrs: &[SocketAddr]) -> String {
    let mut y = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: ws\n    match:\n      path_prefix: {}\n    upstream: pool\n  - name: all\n    upstream: pool\n\
         upstreams:\n  - name: pool\n    balancer: {}\n    backends:\n",
        shape.prefix, shape.balancer
    );
    for &i in &shape.backends {
        y.push_str(&format!("      - addr: {}\n", addrs[i]));
    }
    y
}

/// Writes `text` to `path` either in place or through a rename over it.
fn write_config(path: &Path, text: &str, by_rename: bool) {
    if by_rename {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write the temp config");
        std::fs::rename(&tmp, path).expect("rename over the config");
    } else {
        std::fs::write(path, text).expect("write the config");
    }
}

fn errors(p: &Proxy) -> u64 {
    p.metrics()
        .config_reloads
        .with_label_values(&["error"])
        .get()
}

/// Problems seen by the load tasks; must stay empty.
type Failures = Arc<Mutex<Vec<String>>>;

fn fail(f: &Failures, what: String) {
    f.lock().expect("failure log").push(what);
}

/// A long-lived WebSocket client: echo after echo until told to stop.
async fn chatter(
    addr: SocketAddr,
    id: usize,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Failures,
) {
    let (mut ws, _) = client::ws(addr, "/ws/chat").await;
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let text = format!("c{id}-{i}");
        if let Err(e) = ws.send(Message::text(text.clone())).await {
            fail(&failures, format!("client {id}: send {i}: {e}"));
            return;
        }
        match tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::StreamExt::next(&mut ws),
        )
        .await
        {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => {
                ok.fetch_add(1, Ordering::SeqCst);
            }
            other => {
                fail(
                    &failures,
                    format!("client {id}: message {i}: got {other:?}"),
                );
                return;
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client::close(ws).await;
}

/// New connections, one after another, each noted with the proxy's generation when it
/// began and the backend that took it.
type Placements = Arc<Mutex<Vec<(u64, String)>>>;

async fn churn(proxy: Proxy, stop: Arc<AtomicBool>, seen: Placements, failures: Failures) {
    let addr = proxy.listener_addr("public").expect("bound");
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) && n < 100_000 {
        n += 1;
        let generation = proxy.generation();
        match client::try_ws(addr, "/churn", &[], &[]).await {
            Ok((mut ws, resp)) => {
                seen.lock()
                    .expect("placements")
                    .push((generation, backend_of(&resp)));
                if ws.send(Message::text("x")).await.is_err() {
                    fail(&failures, "churn: send failed".into());
                }
                client::close(ws).await;
            }
            Err(e) => fail(&failures, format!("churn: handshake {n}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A keep-alive HTTP loop.
async fn http_loop(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Failures,
) {
    let mut conn = HttpConn::open(addr).await;
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) && n < 100_000 {
        n += 1;
        let r = conn
            .send(client::request(
                Method::GET,
                addr,
                "/",
                &[],
                client::empty(),
            ))
            .await;
        if r.status == 200 {
            ok.fetch_add(1, Ordering::SeqCst);
        } else {
            fail(&failures, format!("http {n}: {} {}", r.status, r.text()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_by_three_triggers_drop_nothing() {
    let backends = Backend::start_all(&["b0", "b1", "b2", "b3"]).await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = duplex_e2e::pki::temp_dir("reload");
    let path = dir.join("duplex.yaml");
    let mut shape = Shape {
        backends: vec![0, 1],
        balancer: "least_conn",
        prefix: "/ws",
    };
    write_config(&path, &valid_yaml(&shape, &addrs), false);

    // Three proxies on one file, one per trigger.
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let config = Config::load(&path).expect("the first config is valid");
        let p = within(
            "start a proxy",
            Proxy::start(config, Some(path.clone()), Arc::new(Metrics::new())),
        )
        .await
        .expect("the proxy starts");
        proxies.push(p);
    }
    let (watched, hupped, posted) = (&proxies[0], &proxies[1], &proxies[2]);
    duplex_proxy::triggers::watch_file(path.clone(), watched.clone());
    let hup = duplex_proxy::triggers::sighup().expect("a SIGHUP handler");
    duplex_proxy::triggers::reload_on_sighup(hupped.clone(), hup);
    let listen: Vec<SocketAddr> = proxies
        .iter()
        .map(|p| p.listener_addr("public").expect("bound"))
        .collect();

    // Load on every proxy.
    let stop = Arc::new(AtomicBool::new(false));
    let failures: Failures = Arc::default();
    let messages = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let placements: Placements = Arc::default();
    // (generation that removed it, backend name)
    let mut removals: Vec<(u64, String)> = Vec::new();
    let mut tasks = Vec::new();
    for (p, &addr) in listen.iter().enumerate() {
        for c in 0..CLIENTS_PER_PROXY {
            tasks.push(tokio::spawn(chatter(
                addr,
                p * 100 + c,
                stop.clone(),
                messages.clone(),
                failures.clone(),
            )));
        }
        tasks.push(tokio::spawn(churn(
            proxies[p].clone(),
            stop.clone(),
            placements.clone(),
            failures.clone(),
        )));
        tasks.push(tokio::spawn(http_loop(
            addr,
            stop.clone(),
            requests.clone(),
            failures.clone(),
        )));
    }

    // A port that is taken, for the unbindable-listener step.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a blocker");
    let taken = blocker.local_addr().expect("blocker address");

    let balancers = ["round_robin", "p2c", "random", "least_conn"];
    let mut generation = 1u64;
    let mut refused = 0u64;
    for step in 0..STEPS {
        let by_rename = step % 2 == 1;
        let mut removed = None;
        let text = match step % 7 {
            0 => {
                let add = (0..4)
                    .find(|i| !shape.backends.contains(i))
                    .expect("a backend to add");
                shape.backends.push(add);
                valid_yaml(&shape, &addrs)
            }
            1 => {
                removed = Some(shape.backends.remove(0));
                valid_yaml(&shape, &addrs)
            }
            2 => {
                shape.balancer = balancers[(step / 7) % balancers.len()];
                valid_yaml(&shape, &addrs)
            }
            3 => {
                shape.prefix = if shape.prefix == "/ws" {
                    "/chat"
                } else {
                    "/ws"
                };
                valid_yaml(&shape, &addrs)
            }
            4 => "listeners: [\n  - name: broken".to_owned(),
            5 => valid_yaml(&shape, &addrs).replace(
                "upstream: pool\n  - name: all",
                "upstream: nowhere\n  - name: all",
            ),
            _ => valid_yaml(&shape, &addrs).replace(
                "admin:",
                &format!("  - name: taken\n    bind: {taken}\nadmin:"),
            ),
        };
        let valid = step % 7 <= 3;
        let before: Vec<u64> = proxies.iter().map(errors).collect();
        write_config(&path, &text, by_rename);
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let reply = client::post(posted.admin_addr(), "/reload").await;
        if valid {
            generation += 1;
            assert_eq!(
                reply.status,
                200,
                "step {step}: POST /reload: {}",
                reply.text()
            );
            assert!(
                reply
                    .text()
                    .contains(&format!("\"generation\": {generation}")),
                "{}",
                reply.text()
            );
            eventually(
                Duration::from_secs(10),
                &format!("step {step}: every proxy at generation {generation}"),
                || {
                    let ok = proxies.iter().all(|p| p.generation() == generation);
                    async move { ok }
                },
            )
            .await;
        } else {
            refused += 1;
            assert_eq!(
                reply.status, 400,
                "step {step}: an invalid file must be refused"
            );
            eventually(
                Duration::from_secs(10),
                &format!("step {step}: every proxy refused the file"),
                || {
                    let ok = proxies.iter().zip(&before).all(|(p, b)| errors(p) == b + 1);
                    async move { ok }
                },
            )
            .await;
            for p in &proxies {
                assert_eq!(
                    p.generation(),
                    generation,
                    "step {step}: a refused file changes nothing"
                );
            }
        }
        if let Some(gone) = removed {
            removals.push((generation, backends[gone].name.clone()));
            // Let new connections arrive under the new generation before the next step.
            eventually(
                Duration::from_secs(10),
                "new connections after a removal",
                || {
                    let n = placements
                        .lock()
                        .expect("placements")
                        .iter()
                        .filter(|(g, _)| *g == generation)
                        .count();
                    async move { n >= 6 }
                },
            )
            .await;
        }
    }

    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        within("a load task to finish", t).await.expect("load task");
    }
    // A removed backend takes no connection begun under the generation that removed it.
    let placements = placements.lock().expect("placements").clone();
    for (g, name) in &removals {
        let window: Vec<&String> = placements
            .iter()
            .filter(|(pg, _)| pg == g)
            .map(|(_, b)| b)
            .collect();
        assert!(
            window.len() >= 6,
            "generation {g}: only {} new connections",
            window.len()
        );
        assert!(
            !window.contains(&name),
            "generation {g} removed {name}, which still got new connections: {window:?}"
        );
    }
    assert!(removals.len() >= 7, "{} removals", removals.len());
    let failures = failures.lock().expect("failure log").clone();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        messages.load(Ordering::SeqCst) > 1000,
        "few messages: {}",
        messages.load(Ordering::SeqCst)
    );
    assert!(
        requests.load(Ordering::SeqCst) > 300,
        "few requests: {}",
        requests.load(Ordering::SeqCst)
    );
    for p in &proxies {
        let m = p.metrics();
        assert_eq!(m.config_generation.get() as u64, generation);
        assert_eq!(
            m.config_reloads.with_label_values(&["ok"]).get(),
            generation - 1
        );
        assert_eq!(
            m.config_reloads.with_label_values(&["error"]).get(),
            refused
        );
    }
    assert!(
        generation > 30 && refused >= 20,
        "{} applied, {refused} refused",
        generation - 1
    );
    for p in &proxies {
        within("shutdown", p.shutdown(Duration::from_secs(1))).await;
    }
    drop(blocker);
    let _ = std::fs::remove_dir_all(&dir);
}
