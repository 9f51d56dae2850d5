//! Checks the health and discovery keys of an upstream.

use std::time::Duration;

use crate::locate::Seg::{Index, Key};
use crate::raw::{RawBackend, RawHealthCheck, RawUpstream};
use crate::validate::{backend_at, fail, parse_duration, Violation};
use crate::{defaults, DnsBackend, HealthCheck, HealthKind, PassiveHealth};

pub(crate) fn check(i: usize, h: &RawHealthCheck) -> Result<HealthCheck, Violation> {
    let at = |k| vec![Key("upstreams"), Index(i), Key("health_check"), Key(k)];
    let duration = |k: &'static str, v: &Option<String>, d: Duration| match v {
        Some(s) => parse_duration(at(k), s),
        None => Ok(d),
    };
    let path = h.path.clone().unwrap_or_else(|| "/".to_owned());
    if !path.starts_with('/') || !path.bytes().all(is_target_byte) {
        return fail(
            at("path"),
            format!(
                "invalid health check path {path:?}: must start with '/' and hold only \
                 URL path and query characters (others percent-encoded)"
            ),
        );
    }
    if let Some(host) = &h.host {
        if !crate::names::authority_ok(host) {
            return fail(
                at("host"),
                format!(
                    "invalid health check host {host:?}: expected a name or address with an \
                     optional port, such as chat.example.com, 10.0.0.1:8080 or [::1]:8080"
                ),
            );
        }
    }
    if h.kind == HealthKind::Tcp
        && (h.path.is_some() || h.expect_status.is_some() || h.host.is_some())
    {
        return fail(
            at("kind"),
            "path, expect_status and host are for the http and websocket kinds".into(),
        );
    }
    if h.kind != HealthKind::Http && h.expect_status.is_some() {
        return fail(
            at("expect_status"),
            "expect_status is for kind: http (websocket expects 101)".into(),
        );
    }
    let expect_status = h.expect_status.unwrap_or(200);
    if !(100..=599).contains(&expect_status) {
        return fail(
            at("expect_status"),
            format!("invalid status {expect_status}"),
        );
    }
    let interval = duration("interval", &h.interval, defaults::HEALTH_INTERVAL)?;
    at_least_min_interval(at("interval"), interval)?;
    let timeout = match &h.timeout {
        Some(s) => crate::validate::parse_duration_min(
            at("timeout"),
            s,
            crate::validate::MIN_BACKEND_WAIT,
        )?,
        None => defaults::HEALTH_TIMEOUT,
    };
    if timeout > interval {
        return fail(
            at("timeout"),
            format!("timeout ({timeout:?}) must not exceed interval ({interval:?})"),
        );
    }
    let threshold = |k: &'static str, v: Option<u32>, d: u32| match v.unwrap_or(d) {
        n @ 1..=100 => Ok(n),
        n => fail(at(k), format!("{k} must be between 1 and 100, got {n}")),
    };
    Ok(HealthCheck {
        kind: h.kind,
        path,
        expect_status,
        host: h.host.clone(),
        interval,
        timeout,
        healthy_threshold: threshold(
            "healthy_threshold",
            h.healthy_threshold,
            defaults::HEALTHY_THRESHOLD,
        )?,
        unhealthy_threshold: threshold(
            "unhealthy_threshold",
            h.unhealthy_threshold,
            defaults::UNHEALTHY_THRESHOLD,
        )?,
    })
}

pub(crate) fn passive(i: usize, u: &RawUpstream) -> Result<PassiveHealth, Violation> {
    let fail_timeout = match &u.fail_timeout {
        Some(s) => crate::validate::parse_duration_min(
            vec![Key("upstreams"), Index(i), Key("fail_timeout")],
            s,
            crate::validate::MIN_TIMEOUT,
        )?,
        None => defaults::FAIL_TIMEOUT,
    };
    let max_fails = u.max_fails.unwrap_or(defaults::MAX_FAILS);
    if max_fails > MAX_FAILS_LIMIT {
        return fail(
            vec![Key("upstreams"), Index(i), Key("max_fails")],
            format!("max_fails must be between 0 (off) and {MAX_FAILS_LIMIT}, got {max_fails}"),
        );
    }
    Ok(PassiveHealth {
        max_fails,
        fail_timeout,
        max_fail_timeout: defaults::MAX_FAIL_TIMEOUT.max(fail_timeout),
    })
}

/// A backend with `resolve: dns`: `HOST:PORT` with a DNS name.
pub(crate) fn dns_backend(
    i: usize,
    j: usize,
    b: &RawBackend,
    weight: u32,
) -> Result<DnsBackend, Violation> {
    let at = |k| backend_at(i, j, k);
    if b.resolve.as_deref() != Some("dns") {
        return fail(
            at("resolve"),
            format!(
                "resolve must be \"dns\", got {:?}",
                b.resolve.as_deref().unwrap_or("")
            ),
        );
    }
    let bad = || {
        format!(
            "invalid address {:?}: expected HOST:PORT such as chat.default.svc.cluster.local:9000",
            b.addr
        )
    };
    let Some((host, port)) = b.addr.trim().rsplit_once(':') else {
        return fail(at("addr"), bad());
    };
    let Ok(port) = port.parse::<u16>() else {
        return fail(at("addr"), bad());
    };
    // A name DNS could never carry is refused now, rather than failing every lookup.
    if !crate::names::dns_name_ok(host) || port == 0 {
        return fail(at("addr"), bad());
    }
    let interval = match &b.resolve_interval {
        Some(s) => parse_duration(at("resolve_interval"), s)?,
        None => defaults::RESOLVE_INTERVAL,
    };
    at_least_min_interval(at("resolve_interval"), interval)?;
    Ok(DnsBackend {
        host: host.to_ascii_lowercase(),
        port,
        weight,
        interval,
    })
}

/// The most failures in a row `max_fails` may ask for (as many as the active checks'
/// thresholds allow); more is passive health turned off without saying so.
const MAX_FAILS_LIMIT: u32 = 100;

/// The shortest health check and DNS interval: below it a typo (`1ms` for `1m`) would
/// probe a backend or query the resolver a thousand times a second, forever.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(100);

fn at_least_min_interval(
    path: Vec<crate::locate::Seg<'static>>,
    interval: Duration,
) -> Result<(), Violation> {
    if interval < MIN_INTERVAL {
        return fail(
            path,
            format!("must be at least {MIN_INTERVAL:?}, got {interval:?}"),
        );
    }
    Ok(())
}

/// A byte allowed in a request target's path and query (RFC 3986: unreserved,
/// percent-encoded, sub-delimiters, `:`, `@`, `/` and `?`).
fn is_target_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@/?".contains(&c)
}
