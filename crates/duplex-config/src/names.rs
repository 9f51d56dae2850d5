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

#[cfg(test)]
mod tests {
    use super::dns_name_ok;

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
