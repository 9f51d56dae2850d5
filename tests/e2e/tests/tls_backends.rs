//! TLS toward backends: duplex verifies the backend's chain and name and presents its own
//! certificate; a backend that refuses duplex, during or (TLS 1.3) just after the
//! handshake, counts as a failed connect.

use std::time::Duration;

use duplex_config::Config;
use duplex_e2e::backend::Backend;
use duplex_e2e::client;
use duplex_e2e::pki::{server_config, switching_server_config, temp_dir, write, Ca};
use duplex_e2e::tls_kit::start;
use duplex_e2e::within;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn tls_to_a_backend_with_its_own_ca_sni_and_mtls() {
    let (backend_ca, duplex_ca) = (Ca::new("backend CA"), Ca::new("duplex client CA"));
    let backend_leaf = backend_ca.leaf(&["backend.internal"]);
    let b = Backend::start_tls("secure", server_config(&backend_leaf, Some(&duplex_ca.pem))).await;
    let dir = temp_dir("tls-upstream");
    let me = duplex_ca.leaf(&["duplex"]);
    let (ca_file, cc, ck) = (
        write(&dir, "bca.pem", &backend_ca.pem),
        write(&dir, "dc.pem", &me.cert),
        write(&dir, "dk.pem", &me.key),
    );
    let yaml = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: all\n    upstream: app\nupstreams:\n  - name: app\n    tls:\n      server_name: backend.internal\n      ca: {}\n      client_cert: {}\n      client_key: {}\n    backends:\n      - addr: {}\n",
        ca_file.display(),
        cc.display(),
        ck.display(),
        b.addr
    );
    let (proxy, addr) = start(&yaml, None).await;
    let (mut ws, _) = client::ws(addr, "/ws").await;
    within("send", ws.send(Message::text("to a TLS backend")))
        .await
        .expect("send");
    assert_eq!(
        client::recv(&mut ws).await,
        Message::text("to a TLS backend")
    );
    let r = client::get(addr, "/page", &[]).await;
    assert_eq!((r.status.as_u16(), r.text()), (200, "secure".to_owned()));
    let seen = b.tls_clients();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(sni, cert)| sni.as_deref() == Some("backend.internal") && *cert),
        "{seen:?}"
    );

    // A backend whose certificate the CA did not sign is refused: 502.
    let rogue = Backend::start_tls(
        "rogue",
        server_config(&Ca::new("rogue").leaf(&["backend.internal"]), None),
    )
    .await;
    let yaml = yaml.replace(&b.addr.to_string(), &rogue.addr.to_string());
    proxy
        .reload(Config::parse(&yaml, "tls.yaml").expect("valid"))
        .await
        .expect("reload");
    assert_eq!(client::get(addr, "/page", &[]).await.status, 502);
    // Counted as a TLS failure, not as some other connect error.
    let metrics = client::get(proxy.admin_addr(), "/metrics", &[])
        .await
        .text();
    let rogue_addr = rogue.addr.to_string();
    let errors = |kind| {
        duplex_e2e::proxy::sum_series(
            &metrics,
            "duplex_backend_connect_errors_total",
            &[("backend", &rogue_addr), ("kind", kind)],
        )
    };
    assert_eq!((errors("tls"), errors("other")), (1.0, 0.0), "{metrics}");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// Under TLS 1.3 a backend refuses a missing client certificate only after duplex's side
/// of the handshake is done: the refusal arrives with the first read. It must count as a
/// failed TLS connect all the same (and against the backend), and the request go to the
/// next backend, on both paths.
#[tokio::test]
async fn a_backend_refusing_our_certificate_after_the_handshake_is_a_failed_connect() {
    let (backend_ca, client_ca) = (Ca::new("backend CA"), Ca::new("client CA"));
    let leaf = backend_ca.leaf(&["backend.internal"]);
    // `strict` wants a client certificate duplex does not have; `open` does not.
    let strict = Backend::start_tls("strict", server_config(&leaf, Some(&client_ca.pem))).await;
    let open = Backend::start_tls("open", server_config(&leaf, None)).await;
    let dir = temp_dir("tls-refused-cert");
    let ca_file = write(&dir, "bca.pem", &backend_ca.pem);
    let yaml = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: all\n    upstream: app\nupstreams:\n  - name: app\n    balancer: round_robin\n    retries: 1\n    max_fails: 0\n    tls:\n      server_name: backend.internal\n      ca: {}\n    backends:\n      - addr: {}\n      - addr: {}\n",
        ca_file.display(),
        strict.addr,
        open.addr
    );
    let (proxy, addr) = start(&yaml, None).await;
    let refused = || async {
        let metrics = client::get(proxy.admin_addr(), "/metrics", &[])
            .await
            .text();
        let strict_addr = strict.addr.to_string();
        let errors = |kind| {
            duplex_e2e::proxy::sum_series(
                &metrics,
                "duplex_backend_connect_errors_total",
                &[("backend", &strict_addr), ("kind", kind)],
            )
        };
        (errors("tls"), errors("other"))
    };
    // Round robin: two of four requests try `strict` first, and go on to `open`.
    for _ in 0..4 {
        let r = client::get(addr, "/page", &[]).await;
        assert_eq!((r.status.as_u16(), r.text()), (200, "open".to_owned()));
    }
    assert_eq!(refused().await, (2.0, 0.0));
    // One of two upgrades tries `strict` first.
    for text in ["one", "two"] {
        let (mut ws, _) = client::ws(addr, "/ws").await;
        within("send", ws.send(Message::text(text)))
            .await
            .expect("send");
        assert_eq!(client::recv(&mut ws).await, Message::text(text));
    }
    assert_eq!(refused().await, (3.0, 0.0));
    // And it counts against the backend: with max_fails 1, one more refusal ejects it.
    let strict_first = yaml.replace("max_fails: 0", "max_fails: 1");
    proxy
        .reload(Config::parse(&strict_first, "tls.yaml").expect("valid"))
        .await
        .expect("reload");
    for _ in 0..2 {
        assert_eq!(client::get(addr, "/page", &[]).await.status, 200);
    }
    let status: serde_json::Value =
        serde_json::from_str(&client::get(proxy.admin_addr(), "/status", &[]).await.text())
            .expect("JSON");
    let ejected = status["upstreams"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["addr"] == strict.addr.to_string().as_str())
        .map(|b| b["ejected"].clone());
    assert_eq!(ejected, Some(serde_json::Value::Bool(true)), "{status}");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// A backend that hangs up in the middle of the TLS handshake (it does not speak TLS, or
/// it crashed) is a TLS failure, as the docs say, not "other".
#[tokio::test]
async fn a_backend_closing_during_the_tls_handshake_counts_as_tls() {
    use tokio::io::AsyncReadExt;
    let b = duplex_e2e::raw::RawBackend::start(|mut tcp| async move {
        // Reads the ClientHello, then closes.
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await?;
        Ok(())
    })
    .await;
    let yaml = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: all\n    upstream: app\nupstreams:\n  - name: app\n    tls:\n      server_name: backend.internal\n    backends:\n      - addr: {}\n",
        b.addr
    );
    let (proxy, addr) = start(&yaml, None).await;
    assert_eq!(client::get(addr, "/page", &[]).await.status, 502);
    let metrics = client::get(proxy.admin_addr(), "/metrics", &[])
        .await
        .text();
    let errors = |kind| {
        duplex_e2e::proxy::sum_series(
            &metrics,
            "duplex_backend_connect_errors_total",
            &[("kind", kind)],
        )
    };
    assert_eq!((errors("tls"), errors("other")), (1.0, 0.0), "{metrics}");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// A TLS backend that reads a request and closes its TCP connection without close_notify
/// (a Node.js server at its keep-alive timeout, a killed process) is a connection closed
/// before its answer, as over plain TCP: a GET goes to the next backend, counted as
/// `other`; it is not a 502.
#[tokio::test]
async fn a_tls_backend_closing_without_close_notify_sends_a_get_on() {
    let ca = Ca::new("backend CA");
    let leaf = ca.leaf(&["backend.internal"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&leaf, None));
    let bad = duplex_e2e::raw::RawBackend::start(move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            let mut tls = acceptor.accept(tcp).await?;
            let _ = duplex_e2e::wire::read_head(&mut tls).await?;
            // Dropped: the TCP connection closes with no close_notify.
            Ok(())
        }
    })
    .await;
    let good = Backend::start_tls("good", server_config(&leaf, None)).await;
    let dir = temp_dir("tls-eof");
    let ca_file = write(&dir, "ca.pem", &ca.pem);
    let yaml = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: all\n    upstream: app\nupstreams:\n  - name: app\n    balancer: round_robin\n    tls:\n      server_name: backend.internal\n      ca: {}\n    backends:\n      - addr: {}\n      - addr: {}\n",
        ca_file.display(),
        bad.addr,
        good.addr
    );
    let (proxy, addr) = start(&yaml, None).await;
    for i in 0..4 {
        let r = client::get(addr, &format!("/page{i}"), &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.text()),
            (200, "good".to_owned()),
            "{i}"
        );
    }
    assert_eq!(bad.accepted(), 2);
    let metrics = client::get(proxy.admin_addr(), "/metrics", &[])
        .await
        .text();
    let bad_addr = bad.addr.to_string();
    let errors = |kind| {
        duplex_e2e::proxy::sum_series(
            &metrics,
            "duplex_backend_connect_errors_total",
            &[("backend", &bad_addr), ("kind", kind)],
        )
    };
    assert_eq!((errors("other"), errors("tls")), (2.0, 0.0), "{metrics}");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// Health probes of a TLS upstream make a full handshake every time: a backend whose
/// certificate changes to one duplex does not trust (or expires) fails its next check.
/// A probe that resumed an earlier session would skip the certificate and pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_do_not_resume_tls_sessions() {
    let (ca, rogue) = (Ca::new("backend CA"), Ca::new("rogue"));
    let (config, switched) = switching_server_config(
        &ca.leaf(&["backend.internal"]),
        &rogue.leaf(&["backend.internal"]),
    );
    let b = Backend::start_tls("b", config).await;
    let dir = temp_dir("tls-probes");
    let ca_file = write(&dir, "ca.pem", &ca.pem);
    let yaml = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: all\n    upstream: app\nupstreams:\n  - name: app\n    tls:\n      \
         server_name: backend.internal\n      ca: {}\n    health_check: {{kind: http, \
         interval: 1s, timeout: 1s, healthy_threshold: 1, unhealthy_threshold: 1}}\n    \
         backends:\n      - addr: {}\n",
        ca_file.display(),
        b.addr
    );
    let (proxy, _addr) = start(&yaml, None).await;
    let admin = proxy.admin_addr();
    let checks = |result: &'static str| {
        let labels = [("result", result)];
        async move {
            let text = client::get(admin, "/metrics", &[]).await.text();
            duplex_e2e::proxy::sum_series(&text, "duplex_backend_health_checks_total", &labels)
        }
    };
    // A few passing checks: sessions a resuming client would take up again.
    duplex_e2e::eventually(Duration::from_secs(10), "two passing checks", || async {
        checks("ok").await >= 2.0
    })
    .await;
    let failed_before = checks("fail").await;
    switched.store(true, std::sync::atomic::Ordering::SeqCst);
    duplex_e2e::eventually(
        Duration::from_secs(10),
        "a check failed on the certificate",
        || async {
            let status = client::get(admin, "/status", &[]).await.text();
            status.contains("\"healthy\": false") && status.contains("invalid peer certificate")
        },
    )
    .await;
    assert!(checks("fail").await > failed_before);
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}
