//! Checks that span several values, and the build of the internal form from the raw one.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use crate::locate::Seg::{self, Index, Key};
use crate::raw::{is_token_byte, RawConfig, RawMatch, RawUpstream};
use crate::{
    defaults, Admin, Backend, BalancerKind, Config, HashKey, HostMatch, Listener, PathMatch, Route,
    Upstream, MAX_WEIGHT,
};

/// A rule the file breaks, and where.
pub(crate) struct Violation {
    pub path: Vec<Seg<'static>>,
    pub message: String,
    /// Another place the message is about: the first copy of a duplicate name.
    pub first: Option<Vec<Seg<'static>>>,
}

/// The path of key `k` of backend `j` of upstream `i`.
pub(crate) fn backend_at(i: usize, j: usize, k: &'static str) -> Vec<Seg<'static>> {
    vec![
        Key("upstreams"),
        Index(i),
        Key("backends"),
        Index(j),
        Key(k),
    ]
}

pub(crate) fn fail<T>(path: Vec<Seg<'static>>, message: String) -> Result<T, Violation> {
    Err(Violation {
        path,
        message,
        first: None,
    })
}

/// Checks a name: non-empty, and only characters safe in a metric label and a log line.
fn check_name(path: Vec<Seg<'static>>, what: &str, name: &str) -> Result<(), Violation> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        fail(
            path,
            format!("invalid {what} name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"),
        )
    }
}

fn parse_addr(path: Vec<Seg<'static>>, s: &str) -> Result<SocketAddr, Violation> {
    match s.trim().parse() {
        Ok(a) => Ok(a),
        Err(_) => fail(
            path,
            format!("invalid address {s:?}: expected IP:PORT such as 127.0.0.1:9001 or [::1]:9001"),
        ),
    }
}

/// A listener's or the admin's address: one a TCP client can reach.
fn parse_bind(path: Vec<Seg<'static>>, s: &str) -> Result<SocketAddr, Violation> {
    let bind = parse_addr(path.clone(), s)?;
    if bind.ip().is_multicast() || bind.ip() == std::net::Ipv4Addr::BROADCAST {
        return fail(
            path,
            format!(
                "invalid bind {bind}: a multicast or broadcast address takes no TCP connection"
            ),
        );
    }
    Ok(bind)
}

/// Whether two binds would take the same socket. `[::]` takes IPv4 too (duplex binds it
/// dual-stack whatever the host's default), and `0.0.0.0` every IPv4 address. Port 0
/// asks the OS for a free port: never a clash.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: IpAddr, other: IpAddr| match wide {
        IpAddr::V4(w) => w.is_unspecified() && other.to_canonical().is_ipv4(),
        IpAddr::V6(w) => w.is_unspecified(),
    };
    let (x, y) = (a.ip(), b.ip());
    a.port() == b.port()
        && a.port() != 0
        && (x.to_canonical() == y.to_canonical() || covers(x, y) || covers(y, x))
}

/// The error for two binds that [`overlap`].
fn clash(what: &str, bind: SocketAddr, other: SocketAddr) -> String {
    if bind == other {
        format!("{what} {bind}")
    } else {
        format!("{what} port {}: {bind} and {other} overlap ([::] takes IPv4 too, and 0.0.0.0 every IPv4 address)", bind.port())
    }
}

/// A backend's address: one duplex can connect to, in one spelling (see
/// [`backend_addr`]).
fn parse_backend_addr(path: Vec<Seg<'static>>, s: &str) -> Result<SocketAddr, Violation> {
    match backend_addr(parse_addr(path.clone(), s)?) {
        Ok(addr) => Ok(addr),
        Err(why) => fail(path, format!("invalid backend address {s:?}: {why}")),
    }
}

/// `addr` as a backend, or why it cannot be one; for the file's addresses and DNS
/// answers alike. An IPv4 address written as v4-mapped IPv6 (`[::ffff:10.0.0.1]`) is
/// taken as the IPv4 one, so that the two spellings are one backend (for the duplicate
/// check, and for consistent hashing across replicas whose files or resolvers differ).
pub fn backend_addr(addr: SocketAddr) -> Result<SocketAddr, &'static str> {
    let ip = addr.ip().to_canonical();
    if addr.port() == 0 {
        Err("port 0 is no port to connect to")
    } else if ip.is_unspecified() {
        // Linux connects 0.0.0.0 to the host itself: a resolver sinkholing a name
        // (answering 0.0.0.0) would have duplex proxy to itself.
        Err("an unspecified address (0.0.0.0, [::]) is for binding, not for connecting")
    } else if ip.is_multicast() || ip == std::net::Ipv4Addr::BROADCAST {
        Err("a multicast or broadcast address cannot take a TCP connection")
    } else if matches!(addr, SocketAddr::V6(a) if a.scope_id() != 0) {
        // It would reach the backend's `Host` and health checks as `[::1%1]`, which is no
        // valid URI host; link-local backends are not supported.
        Err("an IPv6 zone index (%...) is not supported")
    } else {
        Ok(SocketAddr::new(ip, addr.port()))
    }
}

/// The most routes a configuration may have: every request tries them in order, and
/// the check for routes an earlier one shadows compares them two by two.
pub const MAX_ROUTES: usize = 10_000;

/// The most headers one route may match on.
pub const MAX_MATCH_HEADERS: usize = 32;

/// The longest duration any key accepts; longer ones are surely typos, and would overflow
/// clock arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

pub(crate) fn parse_duration(path: Vec<Seg<'static>>, s: &str) -> Result<Duration, Violation> {
    if months(s) {
        return fail(
            path,
            format!("duration {s:?}: M is months here; write m for minutes (1m), or days (30d)"),
        );
    }
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() => fail(path, format!("duration {s:?} must be greater than zero")),
        Ok(d) if d > MAX_DURATION => fail(
            path,
            format!("duration {s:?} is longer than the maximum of 365 days"),
        ),
        Ok(d) => Ok(d),
        Err(e) => fail(
            path,
            format!("invalid duration {s:?} ({e}); write e.g. 2s, 500ms, 1h"),
        ),
    }
}

/// Whether `s` uses the unit `M` (months in humantime's syntax), surely meant as `m`:
/// no timeout or interval here is counted in months.
fn months(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c == b'M'
            && !b.get(i + 1).is_some_and(u8::is_ascii_alphabetic)
            && b[..i]
                .iter()
                .rev()
                .find(|x| **x != b' ')
                .is_some_and(u8::is_ascii_digit)
    })
}

/// The shortest timeout a client or backend gets: below it a typo (`1ms` for `1m`) would
/// cut every connection, tunnel or ejection short.
pub(crate) const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// The shortest connect, handshake and response timeout toward a backend (a backend on
/// the same host answers in well under a millisecond).
pub(crate) const MIN_BACKEND_WAIT: Duration = Duration::from_millis(10);

/// [`parse_duration`], refusing anything shorter than `min`.
pub(crate) fn parse_duration_min(
    path: Vec<Seg<'static>>,
    s: &str,
    min: Duration,
) -> Result<Duration, Violation> {
    let d = parse_duration(path.clone(), s)?;
    if d < min {
        return fail(
            path,
            format!("duration {s:?} is shorter than the minimum of {min:?}"),
        );
    }
    Ok(d)
}

/// Checks that `name` was not seen before; `seen` keeps where each name was first found.
fn check_unique<'a>(
    seen: &mut HashMap<&'a str, Vec<Seg<'static>>>,
    path: Vec<Seg<'static>>,
    what: &str,
    name: &'a str,
) -> Result<(), Violation> {
    match seen.entry(name) {
        Entry::Vacant(v) => {
            v.insert(path);
            Ok(())
        }
        Entry::Occupied(o) => Err(Violation {
            path,
            message: format!("duplicate {what} name {name:?}"),
            first: Some(o.get().clone()),
        }),
    }
}

pub(crate) fn validate(raw: RawConfig, base: &Path) -> Result<Config, Violation> {
    if raw.listeners.is_empty() {
        return fail(
            vec![Key("listeners")],
            "at least one listener is needed".into(),
        );
    }
    let mut listeners = Vec::new();
    let mut names = HashMap::new();
    let mut binds: HashMap<u16, Vec<(SocketAddr, Vec<Seg<'static>>)>> = HashMap::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        let at = |k| vec![Key("listeners"), Index(i), Key(k)];
        check_name(at("name"), "listener", &l.name)?;
        check_unique(&mut names, at("name"), "listener", &l.name)?;
        let bind = parse_bind(at("bind"), &l.bind)?;
        // Compared within a port only: a file may have many listeners.
        let same_port = binds.entry(bind.port()).or_default();
        if let Some((other, first)) = same_port.iter().find(|(b, _)| overlap(bind, *b)) {
            return Err(Violation {
                path: at("bind"),
                message: clash("two listeners bind", bind, *other),
                first: Some(first.clone()),
            });
        }
        same_port.push((bind, at("bind")));
        let tls = l
            .tls
            .as_ref()
            .map(|t| crate::tls::listener(i, t, base))
            .transpose()?;
        if l.https_port == Some(0) {
            return fail(
                at("https_port"),
                "https_port must be a port from 1 to 65535".into(),
            );
        }
        let redirect_https = match (l.redirect_https, l.https_port) {
            (Some(true), port) if tls.is_none() => Some(port.unwrap_or(defaults::HTTPS_PORT)),
            (Some(true), _) => {
                return fail(
                    at("redirect_https"),
                    "redirect_https is for plain-HTTP listeners, and this one has tls".into(),
                );
            }
            (_, Some(_)) => {
                return fail(
                    at("https_port"),
                    "https_port goes with redirect_https: true".into(),
                )
            }
            _ => None,
        };
        let send_timeout = match &l.send_timeout {
            Some(d) => parse_duration_min(at("send_timeout"), d, MIN_TIMEOUT)?,
            None => defaults::SEND_TIMEOUT,
        };
        let client_body_timeout = match &l.client_body_timeout {
            Some(d) => parse_duration_min(at("client_body_timeout"), d, MIN_TIMEOUT)?,
            None => defaults::CLIENT_BODY_TIMEOUT,
        };
        let client_header_timeout = match &l.client_header_timeout {
            Some(d) => parse_duration_min(at("client_header_timeout"), d, MIN_TIMEOUT)?,
            None => defaults::CLIENT_HEADER_TIMEOUT,
        };
        listeners.push(Listener {
            name: l.name.clone(),
            bind,
            tls,
            redirect_https,
            send_timeout,
            client_body_timeout,
            client_header_timeout,
            max_connections: l
                .max_connections
                .map(|n| connection_cap(at("max_connections"), n))
                .transpose()?,
        });
    }
    let admin = Admin {
        bind: match &raw.admin {
            Some(a) => parse_bind(vec![Key("admin"), Key("bind")], &a.bind)?,
            None => defaults::ADMIN_BIND,
        },
    };
    let same_port = binds.get(&admin.bind.port()).into_iter().flatten();
    if let Some((other, _)) = same_port.into_iter().find(|(b, _)| overlap(admin.bind, *b)) {
        return fail(
            vec![Key("admin"), Key("bind")],
            clash(
                "the admin listener and a proxy listener both bind",
                admin.bind,
                *other,
            ),
        );
    }

    let mut upstreams = Vec::new();
    let mut names = HashMap::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        let up = upstream(i, u, base)?;
        check_unique(
            &mut names,
            vec![Key("upstreams"), Index(i), Key("name")],
            "upstream",
            &u.name,
        )?;
        upstreams.push(up);
    }

    if raw.routes.len() > MAX_ROUTES {
        return fail(
            vec![Key("routes")],
            format!(
                "{} routes is more than the {MAX_ROUTES} a configuration may have: routes are \
                 tried in order for every request",
                raw.routes.len()
            ),
        );
    }
    let mut routes = Vec::new();
    let mut names = HashMap::new();
    let upstream_names: HashSet<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
    for (i, r) in raw.routes.iter().enumerate() {
        let at = |k| vec![Key("routes"), Index(i), Key(k)];
        check_name(at("name"), "route", &r.name)?;
        check_unique(&mut names, at("name"), "route", &r.name)?;
        if !upstream_names.contains(r.upstream.as_str()) {
            let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            return fail(
                at("upstream"),
                format!(
                    "route {:?} names unknown upstream {:?} (known: {})",
                    r.name,
                    r.upstream,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        let (host, path, headers) = matcher(i, &r.matcher)?;
        let route_listeners = match &r.matcher.listeners {
            None => Vec::new(),
            Some(names) => {
                let at = |j| {
                    vec![
                        Key("routes"),
                        Index(i),
                        Key("match"),
                        Key("listeners"),
                        Index(j),
                    ]
                };
                if names.is_empty() {
                    return fail(
                        vec![Key("routes"), Index(i), Key("match"), Key("listeners")],
                        "listeners: [] matches no request; leave it out to match every \
                         listener"
                            .into(),
                    );
                }
                for (j, name) in names.iter().enumerate() {
                    if !listeners.iter().any(|l: &Listener| &l.name == name) {
                        let known: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
                        return fail(
                            at(j),
                            format!(
                                "route {:?} names unknown listener {name:?} (known: {})",
                                r.name,
                                known.join(", ")
                            ),
                        );
                    }
                }
                names.clone()
            }
        };
        routes.push(Route {
            name: r.name.clone(),
            host,
            path,
            headers,
            listeners: route_listeners,
            upstream: r.upstream.clone(),
        });
    }
    if let Some((i, j)) = crate::shadow::first_shadowed(&routes) {
        return fail(
            vec![Key("routes"), Index(i), Key("name")],
            format!(
                "route {:?} can never match: route {:?} before it takes every request it would \
                 (routes are tried in order; put the more specific one first)",
                routes[i].name, routes[j].name
            ),
        );
    }

    Ok(Config {
        listeners,
        admin,
        routes,
        upstreams,
        shutdown_timeout: match &raw.shutdown_timeout {
            Some(d) => parse_duration_min(vec![Key("shutdown_timeout")], d, MIN_TIMEOUT)?,
            None => defaults::SHUTDOWN_TIMEOUT,
        },
        max_connections: raw
            .max_connections
            .map(|n| connection_cap(vec![Key("max_connections")], n))
            .transpose()?,
        reuse_port: raw.reuse_port.unwrap_or(false),
    })
}

/// A `max_connections`: at least one connection, and no more than this platform counts.
fn connection_cap(at: Vec<Seg<'static>>, n: u64) -> Result<usize, Violation> {
    match usize::try_from(n) {
        Ok(n) if n >= 1 => Ok(n),
        _ => fail(
            at,
            format!("max_connections must be at least 1 (got {n}); leave it out for the default"),
        ),
    }
}

type Matcher = (Option<HostMatch>, Option<PathMatch>, Vec<(String, String)>);

fn matcher(i: usize, m: &RawMatch) -> Result<Matcher, Violation> {
    let at = |k| vec![Key("routes"), Index(i), Key("match"), Key(k)];
    let host = match m.host.as_deref().map(str::trim) {
        None => None,
        Some(h) => {
            let h = h.to_ascii_lowercase();
            let (wild, rest) = match h.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, h.as_str()),
            };
            // A fully qualified name's final dot: requests are matched without it.
            let rest = rest.strip_suffix('.').unwrap_or(rest);
            let ok = !rest.is_empty()
                && rest.split('.').all(|label| !label.is_empty())
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return fail(
                    at("host"),
                    format!(
                        "invalid host {h:?}: use a name like chat.example.com or *.example.com"
                    ),
                );
            }
            Some(if wild {
                HostMatch::Suffix(format!(".{rest}"))
            } else {
                HostMatch::Exact(rest.to_owned())
            })
        }
    };
    let path = match (&m.path, &m.path_prefix) {
        (Some(_), Some(_)) => {
            return fail(
                at("path"),
                "set either path or path_prefix, not both".into(),
            );
        }
        // Kept in the form requests are matched in: see `routing_path`.
        (Some(p), None) => Some(PathMatch::Exact(
            crate::routing_path(check_path(at("path"), p)?).into_owned(),
        )),
        (None, Some(p)) => {
            let p = crate::routing_path(check_path(at("path_prefix"), p)?);
            let trimmed = p.trim_end_matches('/');
            Some(PathMatch::Prefix(if trimmed.is_empty() {
                "/".into()
            } else {
                trimmed.into()
            }))
        }
        (None, None) => None,
    };
    if m.headers.len() > MAX_MATCH_HEADERS {
        return fail(
            at("headers"),
            format!(
                "{} headers is more than the {MAX_MATCH_HEADERS} a route may match on",
                m.headers.len()
            ),
        );
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in &m.headers {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return fail(at("headers"), format!("invalid header name {name:?}"));
        }
        // A value no request can carry (a line break, a control character, spaces
        // around it, which parsers strip) makes a route that never matches.
        let value_ok = value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
            && value.trim_matches([' ', '\t']) == value;
        if !value_ok {
            return fail(
                at("headers"),
                format!("header {name:?}: the value {value:?} cannot be sent in a request (a control character, or spaces around it)"),
            );
        }
        let name = name.to_ascii_lowercase();
        // Two keys for one header (`X-Tenant` and `x-tenant`) would ask it to hold two
        // values at once: a route that never matches.
        if headers.iter().any(|(n, _)| *n == name) {
            return fail(
                at("headers"),
                format!("header {name:?} is named twice (header names ignore case)"),
            );
        }
        headers.push((name, value.clone()));
    }
    Ok((host, path, headers))
}

fn check_path<'a>(path: Vec<Seg<'static>>, p: &'a str) -> Result<&'a str, Violation> {
    if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_whitespace() || b == b'?') {
        return fail(
            path,
            format!("invalid path {p:?}: must start with '/' and hold no query"),
        );
    }
    if p.bytes().any(|b| b.is_ascii_control()) {
        return fail(
            path,
            format!("invalid path {p:?}: a control character can never be in a request's path"),
        );
    }
    // Requests with such segments get 400 before routing: the route would never match.
    if crate::routing_path(p)
        .split('/')
        .any(|seg| seg == "." || seg == "..")
    {
        return fail(
            path,
            format!("invalid path {p:?}: a path with . or .. segments never matches (such requests get 400)"),
        );
    }
    Ok(p)
}

fn upstream(i: usize, u: &RawUpstream, base: &Path) -> Result<Upstream, Violation> {
    let at = |k| vec![Key("upstreams"), Index(i), Key(k)];
    check_name(at("name"), "upstream", &u.name)?;
    if u.backends.is_empty() {
        return fail(
            at("backends"),
            format!("upstream {:?} has no backends", u.name),
        );
    }
    let mut seen = HashSet::new();
    let mut seen_names = HashSet::new();
    let mut backends = Vec::new();
    let mut discovered = Vec::new();
    for (j, b) in u.backends.iter().enumerate() {
        let at = |k| backend_at(i, j, k);
        let weight = b.weight.unwrap_or(1);
        if weight == 0 || weight > MAX_WEIGHT {
            return fail(
                at("weight"),
                format!("weight must be between 1 and {MAX_WEIGHT}, got {weight}"),
            );
        }
        if b.resolve.is_some() {
            let d = crate::health::dns_backend(i, j, b, weight)?;
            if !seen_names.insert((d.host.clone(), d.port)) {
                return fail(
                    at("addr"),
                    format!(
                        "backend {}:{} is listed twice in upstream {:?}",
                        d.host, d.port, u.name
                    ),
                );
            }
            discovered.push(d);
            continue;
        }
        if b.resolve_interval.is_some() {
            return fail(
                at("resolve_interval"),
                "resolve_interval goes with resolve: dns".into(),
            );
        }
        let addr = parse_backend_addr(at("addr"), &b.addr)?;
        if !seen.insert(addr) {
            return fail(
                at("addr"),
                format!("backend {addr} is listed twice in upstream {:?}", u.name),
            );
        }
        backends.push(Backend { addr, weight });
    }
    let hash_key = match (u.balancer, &u.hash_key) {
        (BalancerKind::ConsistentHash, None) => Some(HashKey::Ip),
        (BalancerKind::ConsistentHash, Some(k)) => match k.parse() {
            Ok(k) => Some(k),
            Err(e) => return fail(at("hash_key"), e),
        },
        (other, Some(_)) => {
            return fail(
                at("hash_key"),
                format!(
                    "hash_key is only used by balancer: consistent_hash, and upstream {:?} uses {}",
                    u.name,
                    other.as_str()
                ),
            );
        }
        (_, None) => None,
    };
    let wait = |k: &'static str, d: &Option<String>, default| match d {
        Some(d) => parse_duration_min(at(k), d, MIN_BACKEND_WAIT),
        None => Ok(default),
    };
    let retries = u.retries.unwrap_or(defaults::RETRIES);
    if retries > 100 {
        return fail(
            at("retries"),
            format!("retries must be at most 100, got {retries}"),
        );
    }
    Ok(Upstream {
        name: u.name.clone(),
        balancer: u.balancer,
        hash_key,
        connect_timeout: wait(
            "connect_timeout",
            &u.connect_timeout,
            defaults::CONNECT_TIMEOUT,
        )?,
        handshake_timeout: wait(
            "handshake_timeout",
            &u.handshake_timeout,
            defaults::HANDSHAKE_TIMEOUT,
        )?,
        response_timeout: wait(
            "response_timeout",
            &u.response_timeout,
            defaults::RESPONSE_TIMEOUT,
        )?,
        idle_timeout: match &u.idle_timeout {
            Some(d) => Some(parse_duration_min(at("idle_timeout"), d, MIN_TIMEOUT)?),
            None => None,
        },
        drain_timeout: match &u.drain_timeout {
            Some(d) => parse_duration_min(at("drain_timeout"), d, MIN_TIMEOUT)?,
            None => defaults::DRAIN_TIMEOUT,
        },
        retries,
        tls: u
            .tls
            .as_ref()
            .map(|t| crate::tls::upstream(i, t, base))
            .transpose()?,
        health_check: u
            .health_check
            .as_ref()
            .map(|h| crate::health::check(i, h))
            .transpose()?,
        passive: crate::health::passive(i, u)?,
        close_tunnels_on_unhealthy: u.close_tunnels_on_unhealthy.unwrap_or(false),
        panic_mode: u.panic_mode,
        backends,
        discovered,
    })
}
