//! Certificates made in the test: a CA, leaves it signs, files on disk, and clients that
//! trust the CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, |_| {})
    }

    /// A leaf that expired in 2020.
    pub fn expired_leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with(names, |p| {
            p.not_before = rcgen::date_time_ymd(2019, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 1, 1);
        })
    }

    /// A leaf with an RSA key (2048 bits, made by `openssl genpkey`: ring signs with RSA
    /// keys but does not make them).
    pub fn rsa_leaf(&self, names: &[&str]) -> Leaf {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("run openssl genpkey");
        assert!(out.status.success(), "openssl genpkey: {out:?}");
        let pem = String::from_utf8(out.stdout).expect("PEM key");
        let key =
            KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).expect("RSA key");
        self.leaf_signed(names, key, |_| {})
    }

    fn leaf_with(&self, names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        self.leaf_signed(names, key, edit)
    }

    fn leaf_signed(
        &self,
        names: &[&str],
        key: KeyPair,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        if let Some(first) = params.subject_alt_names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, format!("{first:?}"));
        }
        edit(&mut params);
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A fresh directory for one test's files, removed with everything in it when dropped.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory for one test's files (see [`TempDir`]).
pub fn temp_dir(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("duplex-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    TempDir(dir)
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.expect("PEM certificate"))
        .collect()
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("PEM key")
}

/// A client that trusts `ca_pem`, presenting `identity` if given.
pub fn client_config(ca_pem: &str, identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in chain(ca_pem) {
        roots.add(c).expect("CA into the root store");
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some(l) => b
            .with_client_auth_cert(chain(&l.cert), key(&l.key))
            .expect("client cert"),
        None => b.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A server presenting `leaf`; when `client_ca` is given, clients must show a certificate
/// it signed.
pub fn server_config(leaf: &Leaf, client_ca: Option<&str>) -> Arc<rustls::ServerConfig> {
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions");
    let b = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in chain(ca) {
                roots.add(c).expect("client CA");
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .expect("client verifier");
            b.with_client_cert_verifier(v)
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(
        b.with_single_cert(chain(&leaf.cert), key(&leaf.key))
            .expect("server cert"),
    )
}

/// A server that serves `first` until the returned flag is set, then `then`: a backend
/// whose certificate changes under its clients. It keeps sessions for resumption, as
/// rustls servers do by default.
pub fn switching_server_config(
    first: &Leaf,
    then: &Leaf,
) -> (
    Arc<rustls::ServerConfig>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let certified = |leaf: &Leaf| {
        let signer = provider()
            .key_provider
            .load_private_key(key(&leaf.key))
            .expect("a signing key");
        Arc::new(rustls::sign::CertifiedKey::new(chain(&leaf.cert), signer))
    };
    let switched = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let resolver = Switching {
        first: certified(first),
        then: certified(then),
        switched: Arc::clone(&switched),
    };
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    (Arc::new(config), switched)
}

#[derive(Debug)]
struct Switching {
    first: Arc<rustls::sign::CertifiedKey>,
    then: Arc<rustls::sign::CertifiedKey>,
    switched: Arc<std::sync::atomic::AtomicBool>,
}

impl rustls::server::ResolvesServerCert for Switching {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let switched = self.switched.load(std::sync::atomic::Ordering::SeqCst);
        Some(Arc::clone(if switched { &self.then } else { &self.first }))
    }
}
