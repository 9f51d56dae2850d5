//! Routes limited to some listeners: a host served only behind one listener (one that
//! asks for client certificates, an internal port) is not reachable through another,
//! whatever `Host` a request names there.

use std::time::Duration;

use duplex_e2e::backend::Backend;
use duplex_e2e::client;
use duplex_e2e::within;

#[tokio::test]
async fn a_route_limited_to_a_listener_is_not_reachable_through_another() {
    let (secret, open) = (Backend::start("secret").await, Backend::start("open").await);
    let yaml = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\n  - name: internal\n    bind: 127.0.0.1:0\n\
         admin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: secret\n    match:\n      host: b.test\n      listeners: [internal]\n    upstream: secret\n\
         \x20 - name: all\n    upstream: open\n\
         upstreams:\n  - name: secret\n    backends:\n      - addr: {}\n  - name: open\n    backends:\n      - addr: {}\n",
        secret.addr, open.addr
    );
    let (proxy, public) = duplex_e2e::proxy::start_yaml(&yaml, None).await;
    let internal = proxy.listener_addr("internal").expect("bound");
    let host = [("host", "b.test")];
    // The same request, plain or upgraded, routed by the listener it came in on.
    for (addr, want) in [(internal, "secret"), (public, "open")] {
        assert_eq!(client::get(addr, "/", &host).await.backend(), want);
        let (ws, resp) = client::ws_with(addr, "/ws", &host).await;
        assert_eq!(client::backend_of(&resp), want);
        client::close(ws).await;
    }
    let status: serde_json::Value =
        serde_json::from_str(&client::get(proxy.admin_addr(), "/status", &[]).await.text())
            .expect("JSON");
    assert_eq!(
        status["routes"][0]["listeners"],
        serde_json::json!(["internal"])
    );
    assert_eq!(status["routes"][1]["listeners"], serde_json::json!([]));
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}
