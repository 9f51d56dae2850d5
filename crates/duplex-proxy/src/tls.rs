//! TLS with rustls: certificates read and checked at config load, SNI selection on the
//! front, and client settings toward TLS backends.
//!
//! The crypto provider is ring, chosen once here and passed to every builder, so no
//! process-wide default has to be installed and nothing else can change it.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use duplex_config::{CertificateFiles, ListenerTls, TlsVersion, UpstreamTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::send_timeout::SendTimeout;

/// A TLS setting that cannot be used, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: a PEM block cannot be read ({why})", path.display())]
    BadPem { path: PathBuf, why: String },
    #[error("{}: no PEM certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no usable PEM private key in the file ({why})", path.display())]
    NoKey { path: PathBuf, why: String },
    #[error("{}: the certificate expired {ago} ago", path.display())]
    Expired {
        path: PathBuf,
        ago: humantime::FormattedDuration,
    },
    #[error("{}: the certificate does not match the key {}", cert.display(), key.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: {source}", path.display())]
    Rustls {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{} with {}: {source}", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS settings: {0}")]
    Settings(#[source] rustls::Error),
    #[error("invalid server_name {0:?}")]
    ServerName(String),
    #[error("no system root certificates could be loaded; set tls.ca on the upstream")]
    NoSystemRoots,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    duplex_config::bounds::read_tls_file(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    // A damaged PEM block is an error, not a certificate silently left out of the chain.
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            why: pem_why(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NoKey {
        path: path.to_owned(),
        why: pem_why(&e),
    })
}

/// What is wrong with a PEM file, in words: the reader's own text shows the markers it
/// missed as lists of byte values.
fn pem_why(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "no \"-----END {}-----\" line: the file is cut short, or still being written",
            String::from_utf8_lossy(end_marker)
        ),
        E::IllegalSectionStart { line } => format!(
            "a malformed BEGIN line: {:?}",
            String::from_utf8_lossy(line)
        ),
        E::NoItemsFound => "no key in the file".to_owned(),
        other => other.to_string(),
    }
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store.add(c).map_err(|source| TlsError::Rustls {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(store)
}

/// Reads a certificate chain and its key, refusing an expired leaf or a key that does not
/// belong to it.
fn certified_key(
    files: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certs(&files.cert)?;
    if let Some(not_after) = crate::x509::not_after(&chain[0]) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if not_after < now {
            let ago = humantime::format_duration(Duration::from_secs(now - not_after));
            return Err(TlsError::Expired {
                path: files.cert.clone(),
                ago,
            });
        }
    }
    let key = key(&files.key)?;
    let ck = CertifiedKey::from_der(chain, key, provider).map_err(|source| match source {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        source => TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        },
    })?;
    Ok(Arc::new(ck))
}

/// The `reason` label of a client TLS handshake that failed (`timeout` is counted apart):
/// `closed` (the client went away: load-balancer probes, scanners), `client_cert` (no
/// certificate, or one not trusted, where `client_auth` asks for one), `cert_refused` (the
/// client refused ours: untrusted, expired, wrong name, when the client says so with an
/// alert; curl checks the name after the handshake and just closes, which is `closed`),
/// `protocol` (nothing in common: version, cipher, ALPN; a malformed hello; or not TLS at
/// all, such as plain HTTP), `failed` (anything else).
pub fn handshake_failure(e: &io::Error) -> &'static str {
    use rustls::AlertDescription as A;
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "closed",
            _ => "failed",
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => {
            "client_cert"
        }
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied,
        ) => "cert_refused",
        rustls::Error::AlertReceived(A::UserCanceled) => "closed",
        rustls::Error::AlertReceived(
            A::ProtocolVersion
            | A::HandshakeFailure
            | A::InsufficientSecurity
            | A::IllegalParameter
            | A::NoApplicationProtocol
            | A::UnsupportedExtension
            | A::DecodeError
            | A::UnexpectedMessage,
        )
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::NoApplicationProtocol
        | rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        // A malformed hello (a server name such as `a..b`, repeated extensions).
        | rustls::Error::PeerMisbehaved(_) => "protocol",
        _ => "failed",
    }
}

/// The TLS settings of a listener, built from its files.
#[derive(Clone)]
pub struct Acceptor {
    pub config: Arc<ServerConfig>,
    pub handshake_timeout: Duration,
}

pub fn acceptor(t: &ListenerTls) -> Result<Acceptor, TlsError> {
    let provider = provider();
    let certs = t
        .certificates
        .iter()
        .map(|c| certified_key(c, &provider))
        .collect::<Result<Vec<_>, _>>()?;
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(TlsError::Settings)?;
    let builder = match &t.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let v =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&auth.ca)?), provider);
            let v = if auth.required {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(v.build()?)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(crate::sni::BySni::new(certs)));
    config.alpn_protocols = t.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Acceptor {
        config: Arc::new(config),
        handshake_timeout: t.handshake_timeout,
    })
}

/// The TLS settings toward an upstream's backends.
pub struct Connector {
    pub config: Arc<ClientConfig>,
    /// `config` without session resumption, for health probes. A resumed TLS session
    /// skips the certificate: a backend whose certificate expired, or changed to one not
    /// trusted, would go on passing its checks (as long as traffic or probes keep its
    /// session alive). Traffic resumes, as nginx's `proxy_ssl_session_reuse` does.
    pub unresumed: Arc<ClientConfig>,
    /// SNI and verified name; `None` means the backend's IP address.
    pub server_name: Option<ServerName<'static>>,
}

impl Connector {
    /// The name to present to and verify for the backend at `addr`.
    pub fn name_for(&self, addr: std::net::SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }

    /// These settings, with a full handshake every time: for health probes.
    pub fn for_probes(&self) -> Connector {
        Connector {
            config: Arc::clone(&self.unresumed),
            unresumed: Arc::clone(&self.unresumed),
            server_name: self.server_name.clone(),
        }
    }

    /// Runs the TLS handshake over `tcp`.
    pub async fn connect(
        &self,
        addr: std::net::SocketAddr,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(self.name_for(addr), tcp)
            .await
    }
}

pub fn connector(t: &UpstreamTls) -> Result<Connector, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Settings)?;
    let builder = if t.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(Arc::clone(&provider))))
    } else {
        let store = match &t.ca {
            Some(ca) => roots(ca)?,
            None => {
                let mut store = RootCertStore::empty();
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = store.add(c);
                }
                if store.is_empty() {
                    return Err(TlsError::NoSystemRoots);
                }
                store
            }
        };
        builder.with_root_certificates(store)
    };
    let mut config = match &t.client_cert {
        Some(files) => {
            // Checked as a listener's certificate is (readable, not expired, matching), and
            // used as checked: reading the files again could pick up a half-rotated pair.
            let checked = certified_key(files, &provider)?;
            builder
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(checked)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = match &t.server_name {
        Some(n) => {
            Some(ServerName::try_from(n.clone()).map_err(|_| TlsError::ServerName(n.clone()))?)
        }
        None => None,
    };
    let mut unresumed = config.clone();
    unresumed.resumption = rustls::client::Resumption::disabled();
    Ok(Connector {
        config: Arc::new(config),
        unresumed: Arc::new(unresumed),
        server_name,
    })
}

/// Accepts any backend certificate (`insecure_skip_verify`), still checking signatures.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TCP stream, or TLS over one. Plain streams are spliced by readiness in the tunnel;
/// TLS ones are copied through buffers.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// What a client connection is. Under TLS, the socket carries the write timeout (see
/// [`SendTimeout`] for why it sits there).
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<SendTimeout<TcpStream>>>;
/// What a backend connection is.
pub type BackendStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T> crate::send_timeout::Queued for MaybeTls<T> {
    /// A plain socket's queue; under TLS the timeout (and the count) is the socket's own,
    /// below the TLS layer, so none here.
    fn queued(&self) -> Option<u32> {
        match self {
            MaybeTls::Plain(tcp) => tcp.queued(),
            MaybeTls::Tls(_) => None,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Reads and checks every TLS file `config` names, as a start or reload would.
pub fn check(config: &duplex_config::Config) -> Result<(), TlsError> {
    for l in &config.listeners {
        if let Some(t) = &l.tls {
            acceptor(t)?;
        }
    }
    for u in &config.upstreams {
        if let Some(t) = &u.tls {
            connector(t)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key file cut short (written while duplex read it) says so in words.
    #[test]
    fn a_truncated_key_file_is_named_in_words() {
        let dir = std::env::temp_dir().join(format!("duplex-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("k.pem");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n",
        )
        .expect("write");
        let e = key(&path).expect_err("a truncated key").to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.contains("no \"-----END PRIVATE KEY-----\" line"), "{e}");
    }

    /// A malformed hello is a protocol failure, not an unexplained one.
    #[test]
    fn a_misbehaving_peer_is_a_protocol_failure() {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::DuplicateClientHelloExtensions),
        );
        assert_eq!(handshake_failure(&e), "protocol");
    }
}
