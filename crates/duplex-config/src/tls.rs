//! Checks the TLS sections of listeners and upstreams; the files themselves are read by the
//! proxy when it builds its TLS settings (and by `duplex check`).

use std::path::{Path, PathBuf};

use crate::locate::Seg::{self, Index, Key};
use crate::raw::{RawListenerTls, RawUpstreamTls};
use crate::validate::{fail, Violation};
use crate::{defaults, CertificateFiles, ClientAuth, ListenerTls, TlsVersion, UpstreamTls};

/// A file path from the config: relative paths are taken from the config file's directory.
fn file(path: Vec<Seg<'static>>, s: &str, base: &Path) -> Result<PathBuf, Violation> {
    if s.trim().is_empty() {
        return fail(path, "a file path is needed here".into());
    }
    let p = Path::new(s.trim());
    Ok(if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    })
}

pub(crate) fn listener(
    i: usize,
    t: &RawListenerTls,
    base: &Path,
) -> Result<ListenerTls, Violation> {
    let at = |k| vec![Key("listeners"), Index(i), Key("tls"), Key(k)];
    if t.certificates.is_empty() {
        return fail(
            at("certificates"),
            "at least one certificate is needed".into(),
        );
    }
    let mut certificates = Vec::new();
    for (j, c) in t.certificates.iter().enumerate() {
        let at = |k| {
            vec![
                Key("listeners"),
                Index(i),
                Key("tls"),
                Key("certificates"),
                Index(j),
                Key(k),
            ]
        };
        certificates.push(CertificateFiles {
            cert: file(at("cert"), &c.cert, base)?,
            key: file(at("key"), &c.key, base)?,
        });
    }
    let min_version = match t.min_version.as_deref().map(str::trim) {
        None | Some("1.2") => TlsVersion::Tls12,
        Some("1.3") => TlsVersion::Tls13,
        Some(v) => {
            return fail(
                at("min_version"),
                format!("min_version must be \"1.2\" or \"1.3\", got {v:?}"),
            )
        }
    };
    let alpn = t
        .alpn
        .clone()
        .unwrap_or_else(|| vec!["http/1.1".to_owned()]);
    if let Some(p) = alpn.iter().find(|p| p.as_str() != "http/1.1") {
        return fail(
            at("alpn"),
            format!("unsupported ALPN protocol {p:?}: duplex speaks http/1.1 to clients"),
        );
    }
    let client_auth = match &t.client_auth {
        None => None,
        Some(a) => Some(ClientAuth {
            ca: file(
                vec![
                    Key("listeners"),
                    Index(i),
                    Key("tls"),
                    Key("client_auth"),
                    Key("ca"),
                ],
                &a.ca,
                base,
            )?,
            required: a.required.unwrap_or(true),
        }),
    };
    let handshake_timeout = match &t.handshake_timeout {
        Some(d) => crate::validate::parse_duration_min(
            at("handshake_timeout"),
            d,
            crate::validate::MIN_TIMEOUT,
        )?,
        None => defaults::TLS_HANDSHAKE_TIMEOUT,
    };
    Ok(ListenerTls {
        certificates,
        min_version,
        alpn,
        client_auth,
        handshake_timeout,
    })
}

pub(crate) fn upstream(
    i: usize,
    t: &RawUpstreamTls,
    base: &Path,
) -> Result<UpstreamTls, Violation> {
    let at = |k| vec![Key("upstreams"), Index(i), Key("tls"), Key(k)];
    let client_cert = match (&t.client_cert, &t.client_key) {
        (Some(c), Some(k)) => Some(CertificateFiles {
            cert: file(at("client_cert"), c, base)?,
            key: file(at("client_key"), k, base)?,
        }),
        (None, None) => None,
        (Some(_), None) => return fail(at("client_cert"), "client_cert needs client_key".into()),
        (None, Some(_)) => return fail(at("client_key"), "client_key needs client_cert".into()),
    };
    if let Some(name) = &t.server_name {
        if name.parse::<std::net::IpAddr>().is_ok() {
            // Would be sent as no SNI and checked as an IP entry: not what the key says.
            return fail(
                at("server_name"),
                format!(
                    "server_name {name:?} is an IP address: leave server_name out to check \
                     each backend's certificate against its own address"
                ),
            );
        }
        // A last label of digits or `0x` hex reads as an address, which TLS libraries
        // refuse as a name (`10.0.0.256`, `host.123`).
        let last = name.rsplit('.').next().unwrap_or_default();
        let numeric = last.bytes().all(|b| b.is_ascii_digit())
            || last
                .strip_prefix("0x")
                .or_else(|| last.strip_prefix("0X"))
                .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !crate::names::dns_name_ok(name) || name.ends_with('.') || numeric {
            return fail(
                at("server_name"),
                format!("invalid server_name {name:?}: expected a DNS name such as chat.internal"),
            );
        }
    }
    if t.insecure_skip_verify == Some(true) && t.ca.is_some() {
        return fail(
            at("insecure_skip_verify"),
            "set either ca or insecure_skip_verify: true, not both".into(),
        );
    }
    Ok(UpstreamTls {
        server_name: t.server_name.clone(),
        ca: t
            .ca
            .as_deref()
            .map(|c| file(at("ca"), c, base))
            .transpose()?,
        client_cert,
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
    })
}
