//! TLS: wss:// and https:// terminated by duplex, SNI, certificate rotation and refusal,
//! client mTLS, TLS to backends, old protocol versions, and clients none of us wrote.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use duplex_config::Config;
use duplex_e2e::backend::Backend;
use duplex_e2e::client::{self, HttpConn};
use duplex_e2e::pki::{client_config, temp_dir, write, Ca, Leaf};
use duplex_e2e::tls_kit::{cert_files, start, tls_connect, tls_yaml};
use duplex_e2e::{eventually, within};
use duplex_proxy::Proxy;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate")
}

/// The leaf certificate the server presented.
fn presented(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .clone()
        .into_owned()
}

async fn wss(addr: SocketAddr, sni: &str, config: Arc<rustls::ClientConfig>) -> Wss {
    let tls = tls_connect(addr, sni, config).await.expect("TLS handshake");
    let (ws, _) = within(
        "wss handshake",
        tokio_tungstenite::client_async(format!("wss://{sni}/ws"), tls),
    )
    .await
    .expect("WebSocket over TLS");
    ws
}

async fn echo(ws: &mut Wss, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send");
    let got = within("echo", ws.next())
        .await
        .expect("a message")
        .expect("no error");
    assert_eq!(got, Message::text(text));
}

/// At a full `max_connections`, a connection that never starts its TLS handshake holds
/// its place for 3 s (as a plain one that sends no request), not the handshake timeout:
/// then it is closed for a client waiting at the cap, and counted reclaimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_on_a_tls_listener_makes_room_at_the_cap() {
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-cap");
    let (c, k) = cert_files(&dir, &leaf);
    let b = Backend::start("plain").await;
    let yaml = format!(
        "max_connections: 1\n{}",
        tls_yaml(&[(&c, &k)], "      handshake_timeout: 30s\n", b.addr, "")
    );
    let (proxy, addr) = start(&yaml, None).await;
    // Before it connects: its time starts after this.
    let started = std::time::Instant::now();
    let mut silent = client::tcp(addr).await;
    let admin = proxy.admin_addr();
    eventually(
        Duration::from_secs(10),
        "the silent one to be let in",
        || async move {
            let status = client::get(admin, "/status", &[]).await.text();
            let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
            status["connections"]["open"] == 1
        },
    )
    .await;
    let trust = client_config(&ca.pem, None);
    let waiting = tokio::spawn(tls_connect(addr, "chat.test", trust));
    let mut buf = [0u8; 16];
    let n = within("the silent connection to be closed", silent.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed, with nothing sent");
    assert!(
        started.elapsed() >= Duration::from_millis(2990),
        "closed after {:?}",
        started.elapsed()
    );
    within("the waiting client's handshake", waiting)
        .await
        .expect("the task")
        .expect("TLS handshake");
    let metrics = client::get(admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("duplex_connections_reclaimed_total{listener=\"public\"} 1"),
        "{metrics}"
    );
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn wss_and_https_through_a_verified_chain() {
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-basic");
    let (c, k) = cert_files(&dir, &leaf);
    let b = Backend::start("plain").await;
    let (proxy, addr) = start(&tls_yaml(&[(&c, &k)], "", b.addr, ""), None).await;
    let trust = client_config(&ca.pem, None);

    let mut ws = wss(addr, "chat.test", Arc::clone(&trust)).await;
    echo(&mut ws, "over tls").await;
    let upgrade = b
        .requests()
        .into_iter()
        .last()
        .expect("the backend saw the upgrade");
    assert_eq!(upgrade.header("x-forwarded-proto"), Some("https"));

    // curl, a client none of us wrote, verifying the chain.
    let ca_file = write(&dir, "ca.pem", &ca.pem);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca_file)
        .args(["--resolve", &format!("chat.test:{}:127.0.0.1", addr.port())])
        .arg(format!("https://chat.test:{}/hello", addr.port()))
        .kill_on_drop(true)
        .output();
    let out = within("curl", out).await.expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "plain");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn sni_picks_the_certificate_and_the_first_is_the_default() {
    let ca = Ca::new("front CA");
    let (a, bee) = (ca.leaf(&["a.test"]), ca.leaf(&["b.test", "*.b.test"]));
    let dir = temp_dir("tls-sni");
    let files = [
        (write(&dir, "a.pem", &a.cert), write(&dir, "a.key", &a.key)),
        (
            write(&dir, "b.pem", &bee.cert),
            write(&dir, "b.key", &bee.key),
        ),
    ];
    let pairs: Vec<(&Path, &Path)> = files
        .iter()
        .map(|(c, k)| (c.as_path(), k.as_path()))
        .collect();
    let backend = Backend::start("plain").await;
    let (proxy, addr) = start(&tls_yaml(&pairs, "", backend.addr, ""), None).await;
    let trust = client_config(&ca.pem, None);
    for (sni, want) in [("a.test", &a), ("b.test", &bee), ("x.b.test", &bee)] {
        let s = tls_connect(addr, sni, Arc::clone(&trust))
            .await
            .expect("handshake");
        assert_eq!(presented(&s), der(&want.cert), "SNI {sni}");
    }
    // An unknown name gets the first certificate, which the client then refuses.
    let mut lax = (*client_config(&ca.pem, None)).clone();
    lax.enable_sni = false;
    let s = tls_connect(addr, "a.test", Arc::new(lax))
        .await
        .expect("no SNI: the default certificate");
    assert_eq!(presented(&s), der(&a.cert));
    assert!(tls_connect(addr, "other.test", trust).await.is_err());
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// An ECDSA and an RSA certificate for the same name, as nginx serves a pair: a client
/// that takes only RSA signatures gets the RSA one, others the first.
#[tokio::test]
async fn a_client_gets_the_certificate_whose_key_it_can_verify() {
    let ca = Ca::new("front CA");
    let (ecdsa, rsa) = (ca.leaf(&["chat.test"]), ca.rsa_leaf(&["chat.test"]));
    let dir = temp_dir("tls-rsa");
    let (ec_c, ec_k) = cert_files(&dir, &ecdsa);
    let (rsa_c, rsa_k) = (
        write(&dir, "rsa.pem", &rsa.cert),
        write(&dir, "rsa.key", &rsa.key),
    );
    let b = Backend::start("plain").await;
    let yaml = tls_yaml(&[(&ec_c, &ec_k), (&rsa_c, &rsa_k)], "", b.addr, "");
    let (proxy, addr) = start(&yaml, None).await;

    let any = tls_connect(addr, "chat.test", client_config(&ca.pem, None))
        .await
        .expect("a client that takes both");
    assert_eq!(presented(&any), der(&ecdsa.cert), "the first");

    // A client whose signature algorithms are RSA's only (the chain's ECDSA signatures it
    // still checks).
    let mut provider = rustls::crypto::ring::default_provider();
    let algorithms = provider.signature_verification_algorithms;
    let rsa_only: Vec<_> = algorithms
        .mapping
        .iter()
        .filter(|(scheme, _)| format!("{scheme:?}").starts_with("RSA_"))
        .copied()
        .collect();
    assert!(!rsa_only.is_empty());
    provider.signature_verification_algorithms = rustls::crypto::WebPkiSupportedAlgorithms {
        all: algorithms.all,
        mapping: Box::leak(rsa_only.into_boxed_slice()),
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&ca.pem)).expect("CA");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let old = tls_connect(addr, "chat.test", Arc::new(config))
        .await
        .expect("an RSA-only client");
    assert_eq!(presented(&old), der(&rsa.cert));

    // A TLS 1.2 client that offers only an RSA cipher suite, though its signature
    // algorithms name ECDSA too (OpenSSL's default list): in TLS 1.2 the suite decides.
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "chat.test",
        ])
        .args(["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within("openssl s_client", out).await.expect("run openssl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Cipher is ECDHE-RSA-AES128-GCM-SHA256"),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn a_certificate_changed_on_disk_serves_the_next_handshake() {
    let ca = Ca::new("front CA");
    let (old, new) = (ca.leaf(&["chat.test"]), ca.leaf(&["chat.test"]));
    let dir = temp_dir("tls-rotate");
    let (c, k) = cert_files(&dir, &old);
    let b = Backend::start("plain").await;
    let yaml = tls_yaml(&[(&c, &k)], "", b.addr, "");
    let config_file = write(&dir, "duplex.yaml", &yaml);
    let (proxy, addr) = start(&yaml, Some(config_file.clone())).await;
    duplex_proxy::triggers::watch_file(config_file, proxy.clone());
    let trust = client_config(&ca.pem, None);
    let mut before = wss(addr, "chat.test", Arc::clone(&trust)).await;
    echo(&mut before, "first").await;

    // As certbot does: the key, then the certificate.
    write(&dir, "k.pem", &new.key);
    write(&dir, "c.pem", &new.cert);
    eventually(
        Duration::from_secs(10),
        "the new certificate to be served",
        || {
            let trust = Arc::clone(&trust);
            let want = der(&new.cert);
            async move {
                tls_connect(addr, "chat.test", trust)
                    .await
                    .is_ok_and(|s| presented(&s) == want)
            }
        },
    )
    .await;
    echo(&mut before, "the tunnel opened before the swap still works").await;
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn a_bad_certificate_at_reload_is_refused_and_the_old_one_stays() {
    let ca = Ca::new("front CA");
    let good = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-refuse");
    let (c, k) = cert_files(&dir, &good);
    let b = Backend::start("plain").await;
    let yaml = tls_yaml(&[(&c, &k)], "", b.addr, "");
    let config_file = write(&dir, "duplex.yaml", &yaml);
    let (proxy, addr) = start(&yaml, Some(config_file)).await;
    let trust = client_config(&ca.pem, None);

    let expired = ca.expired_leaf(&["chat.test"]);
    let other_key = ca.leaf(&["chat.test"]).key;
    let cases: [(&Leaf, &str, &str); 3] = [
        (&expired, &expired.key, "expired"),
        (&good, &other_key, "does not match the key"),
        (
            &Leaf {
                cert: "not a certificate".into(),
                key: good.key.clone(),
            },
            &good.key,
            "no PEM certificate",
        ),
    ];
    for (leaf, key, why) in cases {
        write(&dir, "c.pem", &leaf.cert);
        write(&dir, "k.pem", key);
        let r = client::post(proxy.admin_addr(), "/reload").await;
        assert_eq!(r.status, 400, "{why}: {}", r.text());
        assert!(
            r.text().contains(why) && r.text().contains("c.pem"),
            "{why}: {}",
            r.text()
        );
        let s = tls_connect(addr, "chat.test", Arc::clone(&trust))
            .await
            .expect("the old certificate");
        assert_eq!(presented(&s), der(&good.cert), "{why}");
    }
    assert_eq!(proxy.generation(), 1);
    // `duplex check` reads the same files the same way.
    let config = Config::parse(&yaml, "tls.yaml").expect("valid YAML");
    let err = duplex_proxy::tls::check(&config)
        .expect_err("the files on disk are bad")
        .to_string();
    assert!(err.contains("c.pem"), "{err}");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn client_certificates_required_and_refused() {
    let (front, clients) = (Ca::new("front CA"), Ca::new("client CA"));
    let leaf = front.leaf(&["chat.test"]);
    let dir = temp_dir("tls-mtls");
    let (c, k) = cert_files(&dir, &leaf);
    let client_ca = write(&dir, "clients.pem", &clients.pem);
    let b = Backend::start("plain").await;
    let extra = format!(
        "      client_auth:\n        ca: {}\n        required: true\n",
        client_ca.display()
    );
    let (proxy, addr) = start(&tls_yaml(&[(&c, &k)], &extra, b.addr, ""), None).await;

    let me = clients.leaf(&["alice"]);
    let mut ws = wss(addr, "chat.test", client_config(&front.pem, Some(&me))).await;
    echo(&mut ws, "with a client certificate").await;

    // Without one: refused (TLS 1.3 reports it on the first read).
    let refused = async {
        let mut s = tls_connect(addr, "chat.test", client_config(&front.pem, None)).await?;
        let mut buf = [0u8; 1];
        s.read(&mut buf).await.and_then(|n| {
            if n == 0 {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            } else {
                Ok(())
            }
        })
    };
    assert!(within("a client without a certificate", refused)
        .await
        .is_err());
    // Signed by another CA: refused too.
    let stranger = front.leaf(&["mallory"]);
    let other = async {
        let mut s = tls_connect(
            addr,
            "chat.test",
            client_config(&front.pem, Some(&stranger)),
        )
        .await?;
        let mut buf = [0u8; 1];
        s.read(&mut buf).await.map(|_| ())
    };
    assert!(within("a client with a foreign certificate", other)
        .await
        .is_err());
    // Both counted as the client's certificate, not as some other failure.
    eventually(Duration::from_secs(5), "two client_cert failures", || {
        let n = handshake_errors(&proxy, "client_cert");
        async move { n == 2 }
    })
    .await;
    assert_eq!(handshake_errors(&proxy, "failed"), 0);
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// `duplex_tls_handshake_errors_total{listener="public", reason}`.
fn handshake_errors(proxy: &Proxy, reason: &str) -> u64 {
    proxy
        .metrics()
        .tls_handshake_errors
        .with_label_values(&["public", reason])
        .get()
}

/// Failed handshakes are counted by what went wrong, so that clients refusing a new
/// certificate stand out from load-balancer probes and scanners.
#[tokio::test]
async fn failed_handshakes_are_counted_by_reason() {
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-reasons");
    let (c, k) = cert_files(&dir, &leaf);
    let b = Backend::start("plain").await;
    let (proxy, addr) = start(&tls_yaml(&[(&c, &k)], "", b.addr, ""), None).await;
    let wait = |reason: &'static str, want: u64| {
        let proxy = proxy.clone();
        async move {
            eventually(Duration::from_secs(5), reason, || {
                let n = handshake_errors(&proxy, reason);
                async move { n == want }
            })
            .await
        }
    };

    // A probe that connects and goes away.
    drop(client::tcp(addr).await);
    wait("closed", 1).await;

    // Plain HTTP on the TLS port.
    let mut tcp = client::tcp(addr).await;
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\nHost: chat.test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = within("the proxy to close", tcp.read_to_end(&mut buf)).await;
    wait("protocol", 1).await;

    // A client that does not trust duplex's certificate.
    let stranger = Ca::new("another CA");
    let refused = tls_connect(addr, "chat.test", client_config(&stranger.pem, None)).await;
    assert!(refused.is_err());
    wait("cert_refused", 1).await;

    // A client that speaks only HTTP/2.
    let mut h2 = (*client_config(&ca.pem, None)).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    assert!(tls_connect(addr, "chat.test", Arc::new(h2)).await.is_err());
    wait("protocol", 2).await;

    for reason in ["failed", "client_cert", "timeout"] {
        assert_eq!(handshake_errors(&proxy, reason), 0, "{reason}");
    }
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn old_protocol_versions_are_refused_as_openssl_sees_it() {
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-versions");
    let (c, k) = cert_files(&dir, &leaf);
    let b = Backend::start("plain").await;
    let (proxy, addr) = start(&tls_yaml(&[(&c, &k)], "", b.addr, ""), None).await;
    let s_client = |version: &'static str| {
        let target = addr.to_string();
        async move {
            let out = tokio::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &target,
                    "-servername",
                    "chat.test",
                    version,
                    "-cipher",
                    "DEFAULT@SECLEVEL=0",
                ])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output();
            within("openssl s_client", out).await.expect("run openssl")
        }
    };
    let text = |out: &std::process::Output| {
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = s_client("-tls1_2").await;
    let (stdout, stderr) = text(&ok);
    assert!(
        ok.status.success() && stdout.contains("Protocol  : TLSv1.2"),
        "TLS 1.2 must work: {}\n{stdout}\n{stderr}",
        ok.status
    );
    // openssl did offer TLS 1.1 (had it no TLS 1.1 to offer, it would stop before
    // connecting, with "no protocols available"), and the server answered the hello with a
    // fatal alert, sending no certificate. rustls refuses such a hello with
    // handshake_failure (40: a TLS 1.1 hello has no signature_algorithms) or, were that
    // there, protocol_version (70).
    let old = s_client("-tls1_1").await;
    let (stdout, stderr) = text(&old);
    let refused = format!("{}\n{stdout}\n{stderr}", old.status);
    assert!(!old.status.success(), "TLS 1.1 must be refused: {refused}");
    assert!(
        stdout.contains("CONNECTED") && stdout.contains("Protocol  : TLSv1.1"),
        "openssl did not offer TLS 1.1: {refused}"
    );
    assert!(
        stderr.contains("alert number 40") || stderr.contains("alert number 70"),
        "no alert from the server refusing TLS 1.1: {refused}"
    );
    assert!(
        stdout.contains("no peer certificate available"),
        "the server went on with a TLS 1.1 handshake: {refused}"
    );
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn a_silent_tls_client_is_cut_off_after_the_handshake_timeout() {
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-slow");
    let (c, k) = cert_files(&dir, &leaf);
    let b = Backend::start("plain").await;
    let (proxy, addr) = start(
        &tls_yaml(&[(&c, &k)], "      handshake_timeout: 300ms\n", b.addr, ""),
        None,
    )
    .await;
    let mut tcp = client::tcp(addr).await;
    let connected = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = within("the proxy to close a silent client", tcp.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // By the listener's 300 ms, not the default 10 s.
    let took = connected.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let m = proxy
        .metrics()
        .tls_handshake_errors
        .with_label_values(&["public", "timeout"])
        .get();
    assert_eq!(m, 1);
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// A TLS client that stops reading a response is cut off after the listener's
/// `send_timeout`, counted once the handshake is done (the handshake has a timeout of its
/// own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_stops_reading_is_cut_off_after_send_timeout() {
    use tokio::io::AsyncWriteExt;
    const LEN: usize = 256 << 20;
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-send-timeout");
    let (c, k) = cert_files(&dir, &leaf);
    let (b, mut reports) = duplex_e2e::raw::streaming_backend(LEN).await;
    let yaml = tls_yaml(&[(&c, &k)], "    send_timeout: 500ms\n", b.addr, "");
    let (proxy, addr) = start(&yaml, None).await;
    let mut tls = tls_connect(addr, "chat.test", client_config(&ca.pem, None))
        .await
        .expect("TLS handshake");
    within(
        "send the request",
        tls.write_all(b"GET /big HTTP/1.1\r\nHost: chat.test\r\n\r\n"),
    )
    .await
    .expect("write");
    // The client reads nothing from here on.
    let (wrote, failed) = within_secs(20, reports.recv())
        .await
        .expect("the backend reports");
    assert!(failed, "the backend wrote all {wrote} bytes");
    let timeouts = proxy
        .metrics()
        .client_send_timeouts
        .with_label_values(&["public"])
        .get();
    assert_eq!(timeouts, 1);
    for reason in ["timeout", "failed", "closed"] {
        assert_eq!(handshake_errors(&proxy, reason), 0, "{reason}");
    }
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

/// A TLS handshake still under way when the shutdown grace ends is closed with
/// everything else, not left to its own (here 10 s) timeout.
#[tokio::test]
async fn a_handshake_under_way_is_closed_when_the_grace_ends() {
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-grace");
    let (c, k) = cert_files(&dir, &leaf);
    let b = Backend::start("plain").await;
    let (proxy, addr) = start(&tls_yaml(&[(&c, &k)], "", b.addr, ""), None).await;
    let mut tcp = client::tcp(addr).await;
    // The connection is accepted (and its handshake waiting) before shutdown begins.
    eventually(Duration::from_secs(5), "the connection to be open", || {
        let open = proxy
            .metrics()
            .connections_active
            .with_label_values(&["public"])
            .get();
        async move { open == 1 }
    })
    .await;
    let stopping = std::time::Instant::now();
    let shutdown = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.shutdown(Duration::from_millis(200)).await }
    });
    let mut buf = [0u8; 16];
    let n = within("the proxy to close the handshake", tcp.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    within("shutdown", shutdown).await.expect("shutdown task");
}

#[tokio::test]
async fn plain_http_redirects_to_https_but_upgrades_do_not() {
    let b = Backend::start("plain").await;
    let yaml = format!(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\n    redirect_https: true\n    https_port: 8443\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: all\n    upstream: app\nupstreams:\n  - name: app\n    backends:\n      - addr: {}\n",
        b.addr
    );
    let (proxy, addr) = start(&yaml, None).await;
    let mut req = client::request(Method::GET, addr, "/room?id=7", &[], client::empty());
    req.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("chat.test"),
    );
    let r = HttpConn::open(addr).await.send(req).await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://chat.test:8443/room?id=7")
    );
    let raw = client::raw_exchange(
        addr,
        b"GET /ws HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(raw.head.status(), 426);
    assert_eq!(raw.head.get("upgrade"), Some("TLS/1.3, TLS/1.2"), "{raw:?}");
    assert_eq!(raw.head.get("connection"), Some("upgrade"), "{raw:?}");
    assert_eq!(b.connections(), 0);
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn python_websockets_over_wss_verifies_the_chain() {
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test", "127.0.0.1"]);
    let dir = temp_dir("tls-python");
    let (c, k) = cert_files(&dir, &leaf);
    let ca_file = write(&dir, "ca.pem", &ca.pem);
    let b = Backend::start("plain").await;
    let (proxy, addr) = start(&tls_yaml(&[(&c, &k)], "", b.addr, ""), None).await;
    let script = format!(
        "import ssl, sys\n\
         try:\n    from websockets.sync.client import connect\n\
         except ImportError:\n    sys.exit('python websockets is missing: run pip install websockets')\n\
         ctx = ssl.create_default_context(cafile=r'{}')\n\
         with connect('wss://127.0.0.1:{}/ws', ssl=ctx, server_hostname='chat.test', open_timeout=5) as ws:\n    ws.send('from python')\n    print(ws.recv(timeout=5))\n",
        ca_file.display(),
        addr.port()
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .kill_on_drop(true)
        .output();
    let out = within_secs(20, out).await.expect("run python3");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "from python");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}

async fn within_secs<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    duplex_e2e::within_for(Duration::from_secs(secs), "an external client", f).await
}

/// A TLS client that ends its side with a bare TCP FIN, without TLS's `close_notify`
/// (as abrupt clients do), half-closes the tunnel like any other end of stream: the
/// backend sees it, and its answer, sent only after that, still reaches the client.
#[tokio::test]
async fn a_tls_client_closing_without_close_notify_still_gets_the_answer() {
    use duplex_e2e::raw::RawBackend;
    use duplex_e2e::wire::{
        accept_upgrade, client_text, read_frame, read_head, server_text, upgrade_request,
    };
    use tokio::io::AsyncWriteExt;

    let b = RawBackend::start(|mut tcp| async move {
        let (_, mut buf) = accept_upgrade(&mut tcp, &[]).await?;
        let f = read_frame(&mut tcp, &mut buf).await?;
        // Answer only once the client's end of stream has come through.
        let mut rest = [0u8; 64];
        while tcp.read(&mut rest).await? > 0 {}
        tcp.write_all(&server_text(&format!("after eof: {}", f.text())))
            .await?;
        tcp.shutdown().await
    })
    .await;
    let ca = Ca::new("front CA");
    let leaf = ca.leaf(&["chat.test"]);
    let dir = temp_dir("tls-no-notify");
    let (c, k) = cert_files(&dir, &leaf);
    let (proxy, addr) = start(&tls_yaml(&[(&c, &k)], "", b.addr, ""), None).await;
    let mut tls = tls_connect(addr, "chat.test", client_config(&ca.pem, None))
        .await
        .expect("TLS handshake");
    let req = upgrade_request("/ws", "chat.test", &[]);
    within("upgrade", tls.write_all(req.as_bytes()))
        .await
        .expect("write the upgrade");
    let (head, mut buf) = within("the 101", read_head(&mut tls))
        .await
        .expect("the 101");
    assert_eq!(head.status(), 101);
    within("a frame", tls.write_all(&client_text("last words")))
        .await
        .expect("write a frame");
    within("flush", tls.flush()).await.expect("flush");
    // The FIN goes straight to the TCP socket, under TLS: no close_notify.
    within("FIN", tls.get_mut().0.shutdown())
        .await
        .expect("shut the TCP write side");
    let f = within(
        "the answer after end of stream",
        read_frame(&mut tls, &mut buf),
    )
    .await
    .expect("the backend's answer reaches the client");
    assert_eq!(f.text(), "after eof: last words");
    within("shutdown", proxy.shutdown(Duration::from_secs(1))).await;
}
