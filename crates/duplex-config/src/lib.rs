//! Reads duplex's YAML configuration into a validated, immutable form.
//!
//! The serde types live in `raw` and never leave this crate. [`Config::parse`] reads the
//! text, checks everything that can be checked without touching the network, and returns
//! a [`Config`] that the rest of duplex can trust: every route names an existing
//! upstream, every name is unique, every duration and address is parsed.

#![forbid(unsafe_code)]

mod advice;
pub mod bounds;
mod diff;
mod empty;
mod health;
mod locate;
mod names;
mod paths;
mod raw;
mod shadow;
mod tls;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use advice::{advice, Advice};
pub use diff::{Changes, Diff};
pub use paths::routing_path;
pub use validate::backend_addr;

/// The largest backend weight accepted; keeps the round-robin schedule small.
pub const MAX_WEIGHT: u32 = 1000;

/// Defaults for every optional key, documented in docs/configuration.md.
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::Duration;

    pub const ADMIN_BIND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const RETRIES: u32 = 2;
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
    pub const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
    pub const CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
    pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HTTPS_PORT: u16 = 443;
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    pub const HEALTHY_THRESHOLD: u32 = 2;
    pub const UNHEALTHY_THRESHOLD: u32 = 3;
    pub const MAX_FAILS: u32 = 3;
    pub const FAIL_TIMEOUT: Duration = Duration::from_secs(10);
    /// Repeated ejections double the fail timeout up to this.
    pub const MAX_FAIL_TIMEOUT: Duration = Duration::from_secs(300);
    pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub admin: Admin,
    /// In file order: the first route that matches wins.
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    /// How long SIGTERM waits for open requests and tunnels before closing them.
    pub shutdown_timeout: Duration,
    /// Client connections open at once over every listener (HTTP connections and the
    /// tunnels they became). At the cap duplex stops accepting, and new connections wait
    /// in the kernel's backlog. `None`: derived from the open-file limit at run time.
    pub max_connections: Option<usize>,
    /// Bind every listening socket (the admin one too) with `SO_REUSEPORT`, so that a
    /// second duplex (a new binary) can bind the same ports while this one still runs,
    /// and take over without a moment when nothing accepts.
    pub reuse_port: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    /// Terminate TLS (https:// and wss://) on this listener.
    pub tls: Option<ListenerTls>,
    /// Answer plain HTTP requests with a redirect to https on this port (WebSocket
    /// upgrades get 426 instead, never a redirect).
    pub redirect_https: Option<u16>,
    /// How long a client may take none of the bytes duplex has for it (a response it
    /// does not read) before its connection is closed.
    pub send_timeout: Duration,
    /// How long a client may send nothing of a request body it has started before the
    /// request (and the backend connection carrying it) is abandoned.
    pub client_body_timeout: Duration,
    /// How long a client may take to send a request's head, counted from when duplex
    /// starts waiting for it: on a kept-alive connection, the idle time between requests
    /// counts too.
    pub client_header_timeout: Duration,
    /// Client connections open at once on this listener, under the global cap too.
    pub max_connections: Option<usize>,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Chosen by SNI; the first is the default for clients that send no SNI or an
    /// unknown name.
    pub certificates: Vec<CertificateFiles>,
    pub min_version: TlsVersion,
    pub alpn: Vec<String>,
    pub client_auth: Option<ClientAuth>,
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// PEM, the full chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// Client certificates (mTLS) on a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// PEM bundle of the CAs that sign client certificates.
    pub ca: PathBuf,
    /// Refuse clients without a certificate; otherwise only verify those that send one.
    pub required: bool,
}

/// TLS toward an upstream's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// SNI and the name the certificate must carry; the backend's IP when absent.
    pub server_name: Option<String>,
    /// PEM bundle to trust; the system's roots when absent.
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mTLS to backends.
    pub client_cert: Option<CertificateFiles>,
    /// Skip certificate verification (testing only).
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub bind: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    /// Header names in lower case, each with the exact value it must have.
    pub headers: Vec<(String, String)>,
    /// The listeners whose requests the route takes; empty for every listener. A host
    /// that must be reached only through one listener (one asking for client
    /// certificates) is kept off the others this way.
    pub listeners: Vec<String>,
    pub upstream: String,
}

impl Route {
    /// Whether the route takes requests that came in on listener `name`.
    pub fn on_listener(&self, name: &str) -> bool {
        self.listeners.is_empty() || self.listeners.iter().any(|l| l == name)
    }
}

/// How a route matches the request's host, compared without the port and case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `chat.example.com`, stored in lower case.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: any host ending so, with at least one
    /// more label in front.
    Suffix(String),
}

impl HostMatch {
    /// Whether `host` (lower case, port removed) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Segment-aware: `/ws` matches `/ws` and `/ws/x`, not `/wsx`. Stored without a
    /// trailing slash, except for `/` itself.
    Prefix(String),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => {
                p == "/"
                    || (path.starts_with(p.as_str())
                        && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub balancer: BalancerKind,
    /// Set only for `consistent_hash`; `ip` when that balancer is chosen without a key.
    pub hash_key: Option<HashKey>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub retries: u32,
    pub tls: Option<UpstreamTls>,
    /// Active checks; none unless configured.
    pub health_check: Option<HealthCheck>,
    /// Passive ejection after consecutive connect failures or handshake timeouts.
    pub passive: PassiveHealth,
    /// Close open tunnels when a check takes their backend out.
    pub close_tunnels_on_unhealthy: bool,
    /// What to do when no backend is healthy.
    pub panic_mode: PanicMode,
    /// Backends with a fixed address.
    pub backends: Vec<Backend>,
    /// Backends named by a DNS name, re-resolved periodically.
    pub discovered: Vec<DnsBackend>,
}

/// An active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// For `http` and `websocket`.
    pub path: String,
    /// For `http`.
    pub expect_status: u16,
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes to come back.
    pub healthy_threshold: u32,
    /// Consecutive failures to be taken out.
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    Tcp,
    Http,
    Websocket,
}

/// Passive ejection, as nginx's max_fails/fail_timeout and Envoy's outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Consecutive failures that eject a backend; 0 turns ejection off.
    pub max_fails: u32,
    /// The first ejection's length; each ejection in a row doubles it.
    pub fail_timeout: Duration,
    /// The longest an ejection can grow to.
    pub max_fail_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PanicMode {
    /// Use every backend, healthy or not.
    #[default]
    Open,
    /// Answer 503.
    Closed,
}

/// A backend given by DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsBackend {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    RoundRobin,
    #[default]
    LeastConn,
    P2c,
    Random,
    ConsistentHash,
}

impl BalancerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BalancerKind::RoundRobin => "round_robin",
            BalancerKind::LeastConn => "least_conn",
            BalancerKind::P2c => "p2c",
            BalancerKind::Random => "random",
            BalancerKind::ConsistentHash => "consistent_hash",
        }
    }
}

/// Where `consistent_hash` takes its key from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashKey {
    Ip,
    /// Lower-case header name.
    Header(String),
    Cookie(String),
    Query(String),
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's content is wrong; `Display` gives `FILE:LINE:COL: message`.
    #[error("{file}:{line}:{col}: {message}")]
    Invalid {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = bounds::read_source(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&src, &path.display().to_string())
    }

    /// Parses and validates `src`; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        // A byte order mark (Windows editors write one) is not part of the YAML.
        let src = src.strip_prefix('\u{feff}').unwrap_or(src);
        if let Some((line, col)) = bounds::too_deep(src) {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                line,
                col,
                message: format!(
                    "[ ] and {{ }} nested deeper than {} levels",
                    bounds::MAX_FLOW_DEPTH
                ),
            });
        }
        if let Some((line, col, key)) = empty::first_empty_key(src) {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                line,
                col,
                message: format!("{key}: a value is needed here; to leave the key unset, omit it"),
            });
        }
        let raw: raw::RawConfig = serde_yaml::from_str(src).map_err(|e| {
            let (mut line, mut col) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            let text = e.to_string();
            // serde_yaml appends the position we already report in front.
            let message = match text.rsplit_once(" at line ") {
                Some((head, _)) => head.to_owned(),
                None => text,
            };
            let message = plain_words(&message);
            // The scanner names a bad character by its offset in the text: as a position.
            let mut message = message;
            if let Some((head, offset)) = message
                .rsplit_once(" at position ")
                .and_then(|(head, n)| Some((head.to_owned(), n.trim().parse::<usize>().ok()?)))
            {
                (line, col) = line_col(src, offset);
                message = head;
            }
            // A duplicate key is reported at its mapping's start: point at the second copy.
            let duplicate = message
                .split_once("duplicate field `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(key, _)| key);
            if let Some(at) = duplicate.and_then(|key| locate::second_key(src, line, col, key)) {
                (line, col) = at;
            }
            ConfigError::Invalid {
                file: file.to_owned(),
                line,
                col,
                message: one_line(&message),
            }
        })?;
        let base = Path::new(file).parent().unwrap_or(Path::new("."));
        validate::validate(raw, base).map_err(|v| {
            let (line, col) = locate::locate(src, &v.path);
            let message = match &v.first {
                Some(first) => {
                    let (l, _) = locate::locate(src, first);
                    format!("{} (first defined at line {l})", v.message)
                }
                None => v.message,
            };
            ConfigError::Invalid {
                file: file.to_owned(),
                line,
                col,
                message: one_line(&message),
            }
        })
    }

    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Every certificate, key and CA file the config names, so that a change to any of
    /// them can reload it.
    pub fn tls_files(&self) -> Vec<&Path> {
        let mut out = Vec::new();
        for t in self.listeners.iter().filter_map(|l| l.tls.as_ref()) {
            for c in &t.certificates {
                out.extend([c.cert.as_path(), c.key.as_path()]);
            }
            out.extend(t.client_auth.as_ref().map(|a| a.ca.as_path()));
        }
        for t in self.upstreams.iter().filter_map(|u| u.tls.as_ref()) {
            out.extend(t.ca.as_deref());
            if let Some(c) = &t.client_cert {
                out.extend([c.cert.as_path(), c.key.as_path()]);
            }
        }
        out
    }
}

/// The longest error message shown: one naming a 50 MB value must not be 50 MB, in the
/// log, in `/status` and in the answer to `POST /reload`.
const MAX_MESSAGE: usize = 400;

/// `message` on one line (control characters escaped) and at most [`MAX_MESSAGE`] bytes.
fn one_line(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE + 40));
    for (i, c) in message.char_indices() {
        if out.len() >= MAX_MESSAGE {
            out.push_str(&format!("... ({} more bytes)", message.len() - i));
            break;
        }
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The 1-based line and column of byte `offset` of `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(src.len());
    while !src.is_char_boundary(end) {
        end -= 1;
    }
    let before = &src[..end];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The YAML reader's message with Rust's type names put in an operator's words:
/// `expected u32` becomes `expected a whole number from 0 to 4294967295`, `expected
/// struct RawUpstream` becomes `expected a mapping (key: value lines)`.
fn plain_words(message: &str) -> String {
    let mut out = message
        .replace("expected u16", "expected a whole number from 0 to 65535")
        .replace(
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        )
        .replace("expected u64", "expected a whole number from 0 up")
        // A number too large for any field is read as one.
        .replace(" as u128,", ",")
        .replace(
            "invalid type: unit value",
            "invalid type: null (~ or nothing)",
        );
    while let Some(at) = out.find("expected struct ") {
        let name_at = at + "expected struct ".len();
        let name_len = out[name_at..]
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(out.len() - name_at);
        out.replace_range(
            at..name_at + name_len,
            "expected a mapping (key: value lines)",
        );
    }
    out
}
