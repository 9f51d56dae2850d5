//! Checks host names as DNS can carry them.

/// Whether `name` can be a DNS host name: labels of 1 to 63 letters, digits, `-` (not
/// first or last) and `_` (not in host names by the rules, but internal names carry them
/// and resolvers and TLS libraries accept them), at most 253 bytes in all; one trailing
/// dot (a fully qualified name) is allowed.
pub(crate) fn dns_name_ok(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
}

/// Whether `s` can be a `Host` header's value: a DNS name, an IPv4 address or an IPv6 one
/// in brackets, with an optional port from 1 to 65535.
pub(crate) fn authority_ok(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        // A colon inside the brackets is the address's, not a port's.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (s, None),
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && matches!(p.parse::<u16>(), Ok(1..))
    });
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host.parse::<std::net::Ipv4Addr>().is_ok() || dns_name_ok(host),
    };
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::{authority_ok, dns_name_ok};

    #[test]
    fn host_header_values() {
        for good in [
            "chat.example.com",
            "chat.example.com:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "localhost.",
        ] {
            assert!(authority_ok(good), "{good}");
        }
        for bad in [
            "",
            "[::1",
            "::1",
            "::1]:80",
            "[::1]]",
            "a:b:c",
            "[::1]:99999",
            "[zz]",
            "a:",
            "a:0",
            "[::1]:",
            "a b",
            "a/b",
            "-a",
        ] {
            assert!(!authority_ok(bad), "{bad}");
        }
    }

    #[test]
    fn labels_and_length() {
        for good in [
            "chat",
            "chat.internal.",
            "svc_a.ns",
            "a-b.c",
            &"a".repeat(63),
        ] {
            assert!(dns_name_ok(good), "{good}");
        }
        let long = ["abcdefghi"; 26].join(".");
        assert!(long.len() > 253);
        for bad in ["", ".", "a..b", "-a", "a-", "a b", &"a".repeat(64), &long] {
            assert!(!dns_name_ok(bad), "{bad}");
        }
    }
}
