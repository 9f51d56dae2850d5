//! The YAML file exactly as serde reads it; nothing outside this crate sees these types.
//!
//! Values that need parsing beyond YAML's own types (durations, addresses, hash keys) stay
//! strings here and are parsed in `validate`, which knows their path and so their position.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::{BalancerKind, HashKey, HealthKind, PanicMode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub listeners: Vec<RawListener>,
    #[serde(default, deserialize_with = "present")]
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default, deserialize_with = "present")]
    pub shutdown_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub max_connections: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    pub reuse_port: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: String,
    pub bind: String,
    #[serde(default, deserialize_with = "present")]
    pub tls: Option<RawListenerTls>,
    #[serde(default, deserialize_with = "present")]
    pub redirect_https: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub https_port: Option<u16>,
    #[serde(default, deserialize_with = "present")]
    pub send_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub client_body_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub client_header_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub max_connections: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub certificates: Vec<RawCertificate>,
    #[serde(default, deserialize_with = "present")]
    pub min_version: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub alpn: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    pub client_auth: Option<RawClientAuth>,
    #[serde(default, deserialize_with = "present")]
    pub handshake_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClientAuth {
    pub ca: String,
    #[serde(default, deserialize_with = "present")]
    pub required: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    #[serde(default, deserialize_with = "present")]
    pub server_name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub ca: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub client_cert: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub client_key: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub bind: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub upstream: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    #[serde(default, deserialize_with = "present")]
    pub host: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub path_prefix: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub path: Option<String>,
    #[serde(default, deserialize_with = "unique_keys")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "present")]
    pub listeners: Option<Vec<String>>,
}

/// An optional key that, when written, must have a value: YAML reads `key:` with nothing
/// after it (every line under it commented out, say), `key: ~` and `key: null` as null,
/// which serde would take for "not set", and `client_auth:` emptied that way would turn
/// client certificates off. Here it is an error that names the key. (Reading the value
/// as `T` directly would not do: serde_yaml reads a bare `null` as the string "null".)
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    // Refused inside the visitor, so that the reader puts the value's position and path
    // on the error.
    struct Present<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Present<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a value")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<T, E> {
            Err(E::custom(
                "a value is needed here; to leave the key unset, omit it",
            ))
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<T, E> {
            self.visit_none()
        }

        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<T, D2::Error> {
            T::deserialize(d)
        }
    }
    d.deserialize_option(Present(std::marker::PhantomData))
        .map(Some)
}

/// A map whose keys must differ: YAML allows a key twice, and the last would silently win.
fn unique_keys<'de, D>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of header names to values")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!(
                        "header {k:?} is named twice"
                    )));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub name: String,
    #[serde(default)]
    pub balancer: BalancerKind,
    #[serde(default, deserialize_with = "present")]
    pub hash_key: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub connect_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub handshake_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub response_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub idle_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub drain_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub retries: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    pub tls: Option<RawUpstreamTls>,
    #[serde(default, deserialize_with = "present")]
    pub health_check: Option<RawHealthCheck>,
    #[serde(default, deserialize_with = "present")]
    pub max_fails: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    pub fail_timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub close_tunnels_on_unhealthy: Option<bool>,
    #[serde(default)]
    pub panic_mode: PanicMode,
    pub backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackend {
    pub addr: String,
    #[serde(default, deserialize_with = "present")]
    pub weight: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    pub resolve: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub resolve_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    pub kind: HealthKind,
    #[serde(default, deserialize_with = "present")]
    pub path: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub expect_status: Option<u16>,
    #[serde(default, deserialize_with = "present")]
    pub host: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub interval: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub timeout: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    pub unhealthy_threshold: Option<u32>,
}

impl std::str::FromStr for HashKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid hash_key {s:?}: expected ip, header:NAME, cookie:NAME or query:NAME")
        };
        if s == "ip" {
            return Ok(HashKey::Ip);
        }
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        let name = name.trim();
        if name.is_empty() {
            return Err(bad());
        }
        match kind {
            "header" => {
                if !name.bytes().all(is_token_byte) {
                    return Err(format!("invalid header name {name:?} in hash_key"));
                }
                Ok(HashKey::Header(name.to_ascii_lowercase()))
            }
            // A name no request could carry would send every request to the fallback.
            "cookie" if name.bytes().all(is_token_byte) => Ok(HashKey::Cookie(name.to_owned())),
            "cookie" => Err(format!("invalid cookie name {name:?} in hash_key")),
            "query"
                if !name
                    .bytes()
                    .any(|b| b"&=# ".contains(&b) || b.is_ascii_control()) =>
            {
                Ok(HashKey::Query(name.to_owned()))
            }
            "query" => Err(format!("invalid query parameter name {name:?} in hash_key")),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::Ip => f.write_str("ip"),
            HashKey::Header(n) => write!(f, "header:{n}"),
            HashKey::Cookie(n) => write!(f, "cookie:{n}"),
            HashKey::Query(n) => write!(f, "query:{n}"),
        }
    }
}

/// RFC 9110 token characters, the ones allowed in a header name.
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
