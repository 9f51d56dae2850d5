//! Starting the proxy from a config whose listener and admin endpoint both ask for an
//! ephemeral port, as every test and many deployments' health-check sidecars do.

use std::sync::Arc;

use duplex_config::Config;
use duplex_e2e::within;
use duplex_proxy::{Metrics, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_and_admin_may_both_bind_port_zero() {
    let yaml = "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n";
    let config = Config::parse(yaml, "ports.yaml")
        .unwrap_or_else(|e| panic!("port 0 twice must be accepted: {e}"));
    let proxy = within(
        "start",
        Proxy::start(config, None, Arc::new(Metrics::new())),
    )
    .await
    .expect("the proxy starts");
    let public = proxy.listener_addr("public").expect("public is bound");
    assert_ne!(public.port(), 0);
    assert_ne!(proxy.admin_addr().port(), 0);
    assert_ne!(public, proxy.admin_addr(), "each got its own port");
}
