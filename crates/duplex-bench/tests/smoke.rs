//! The benchmark's smoke, in-process so that `cargo test --workspace` covers it: the echo
//! backend and duplex (built from this source tree, with the runner's own config) run in
//! this process, and every scenario runs with tiny sizes against both `direct` and
//! `duplex`. A scenario that fails (a tunnel that does not echo, a stuck connection, an
//! error answer) fails the test. `crates/duplex-bench/smoke.sh` runs the same scenarios
//! through the real runner and binaries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use duplex_bench::report::Outcome;
use duplex_bench::{echo, runner, scenario};
use duplex_config::Config;
use duplex_proxy::{Metrics, Proxy};

fn check(o: Outcome) {
    let text = o.render();
    println!("{text}");
    assert!(o.ok, "{} through {} failed:\n{text}", o.scenario, o.label);
}

async fn every_scenario(addr: SocketAddr, label: &'static str, pid: Option<u32>) {
    let lat = tokio::task::spawn_blocking(move || {
        scenario::latency(
            addr,
            label,
            &scenario::LatencyOpts {
                count: 200,
                warmup: 10,
                size: 64,
                max_time: Duration::from_secs(10),
            },
        )
    })
    .await
    .expect("latency runs");
    check(lat);
    for size in [64, 16 * 1024] {
        check(
            scenario::throughput(
                addr,
                label,
                &scenario::ThroughputOpts {
                    conns: 4,
                    inflight: 2,
                    size,
                    duration: Duration::from_millis(300),
                    warmup: Duration::from_millis(50),
                },
            )
            .await,
        );
    }
    let hold = scenario::hold(
        addr,
        label,
        &scenario::HoldOpts {
            tunnels: 100,
            pids: pid.into_iter().collect(),
            settle: Duration::from_millis(50),
            concurrency: 32,
            linger: Duration::ZERO,
        },
    )
    .await;
    assert_eq!(hold.json()["echoed"], 100, "{}", hold.render());
    check(hold);
    check(
        scenario::handshakes(
            addr,
            label,
            &scenario::HandshakeOpts {
                workers: 2,
                duration: Duration::from_millis(300),
                warmup: Duration::from_millis(50),
            },
        )
        .await,
    );
    check(
        scenario::http(
            addr,
            label,
            &scenario::HttpOpts {
                conns: 2,
                duration: Duration::from_millis(300),
                warmup: Duration::from_millis(50),
            },
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_passes_direct_and_through_duplex() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let listener = echo::bind("127.0.0.1:0".parse().unwrap()).expect("echo binds");
        let backend = listener.local_addr().unwrap();
        tokio::spawn(echo::serve(listener));

        // The runner's config; port 0 here, the admin endpoint on another loopback address.
        let yaml = runner::duplex_config(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.2:0".parse().unwrap(),
            backend,
        );
        let config = Config::parse(&yaml, "bench.yaml").expect("the bench config is valid");
        let proxy = Proxy::start(config, None, Arc::new(Metrics::new()))
            .await
            .expect("duplex starts");
        let addr = proxy.listener_addr("bench").expect("listener bound");

        every_scenario(backend, "direct", None).await;
        every_scenario(addr, "duplex", Some(std::process::id())).await;
        proxy.shutdown(Duration::from_secs(1)).await;
    })
    .await
    .expect("the smoke finishes within 60 s");
}

#[test]
fn proxy_configs_carry_what_websockets_need() {
    let (a, b): (SocketAddr, SocketAddr) = (
        "127.0.0.1:8080".parse().unwrap(),
        "127.0.0.1:9001".parse().unwrap(),
    );
    let n = runner::nginx_config(a, b, 20_000, std::path::Path::new("/tmp/x"), None);
    for want in [
        "worker_processes 1;",
        "worker_connections 22500;",
        "worker_rlimit_nofile 20000;",
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_read_timeout 3600s;",
    ] {
        assert!(n.contains(want), "nginx config lacks {want}");
    }
    let h = runner::haproxy_config(a, b, 20_000, None);
    for want in [
        "nbthread 1",
        "timeout tunnel 1h",
        "maxconn 9950",
        "balance leastconn",
    ] {
        assert!(h.contains(want), "haproxy config lacks {want}");
    }
    // One worker per CPU in the all-cpus placement.
    let n = runner::nginx_config(a, b, 20_000, std::path::Path::new("/tmp/x"), Some(2));
    assert!(n.contains("worker_processes 2;"), "{n}");
    assert!(runner::haproxy_config(a, b, 20_000, Some(2)).contains("nbthread 2"));
}
