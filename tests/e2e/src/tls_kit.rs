//! A TLS-terminating proxy for tests: its config, its start, and a client's handshake.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::pki::{write, Leaf};
use crate::{client, within};

/// A config with one TLS listener (`extra` goes under `tls:`) and one upstream.
pub fn tls_yaml(
    certs: &[(&Path, &Path)],
    extra: &str,
    backend: SocketAddr,
    upstream_extra: &str,
) -> String {
    let mut y = String::from(
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\n    tls:\n      certificates:\n",
    );
    for (c, k) in certs {
        y.push_str(&format!(
            "        - cert: {}\n          key: {}\n",
            c.display(),
            k.display()
        ));
    }
    y.push_str(extra);
    y.push_str(&format!(
        "admin:\n  bind: 127.0.0.1:0\nroutes:\n  - name: all\n    upstream: app\nupstreams:\n  - name: app\n{upstream_extra}    backends:\n      - addr: {backend}\n"
    ));
    y
}

pub use crate::proxy::start_yaml as start;

pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = client::tcp(addr).await;
    let name = ServerName::try_from(sni.to_owned()).expect("a server name");
    within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
}

/// Writes `leaf`'s certificate and key into `dir` as `c.pem` and `k.pem`.
pub fn cert_files(dir: &Path, leaf: &Leaf) -> (PathBuf, PathBuf) {
    (
        write(dir, "c.pem", &leaf.cert),
        write(dir, "k.pem", &leaf.key),
    )
}
