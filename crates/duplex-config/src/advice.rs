//! Advice on a valid configuration: settings duplex accepts that rarely do what their
//! author meant. Printed by `duplex check` and logged when a configuration is applied;
//! never a reason to refuse a file.

use std::fmt;

use crate::{BalancerKind, Config, HashKey};

/// One piece of advice about an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advice {
    pub upstream: String,
    pub message: String,
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upstream {:?}: {}", self.upstream, self.message)
    }
}

/// Session cookies and query parameters that backends set on their first answer: the
/// request that opens a session lacks them.
const SET_BY_BACKENDS: &[(&str, &str)] = &[
    ("cookie", "io"),
    ("cookie", "connect.sid"),
    ("cookie", "jsessionid"),
    ("cookie", "phpsessid"),
    ("cookie", "asp.net_sessionid"),
    ("cookie", "sessionid"),
    ("query", "sid"),
];

/// The advice for `config`, in file order.
pub fn advice(config: &Config) -> Vec<Advice> {
    let mut out = Vec::new();
    for u in &config.upstreams {
        let mut say = |message: String| {
            out.push(Advice {
                upstream: u.name.clone(),
                message,
            })
        };
        if u.response_timeout <= u.connect_timeout {
            say(format!(
                "response_timeout ({:?}) is not longer than connect_timeout ({:?}): the wait \
                 for an answer includes connecting, so a slow connect ends in 504 instead of \
                 a try at the next backend",
                u.response_timeout, u.connect_timeout
            ));
        }
        if u.balancer == BalancerKind::ConsistentHash {
            let key = match &u.hash_key {
                Some(HashKey::Cookie(name)) => Some(("cookie", name)),
                Some(HashKey::Query(name)) => Some(("query", name)),
                _ => None,
            };
            if let Some((kind, name)) = key {
                let lower = name.to_ascii_lowercase();
                if SET_BY_BACKENDS.contains(&(kind, lower.as_str())) {
                    say(format!(
                        "hash_key {kind}:{name} is usually set by the backend in its first \
                         answer: the request that opens a session lacks it and is placed by \
                         least_conn, and the next ones may hash to another backend; use a key \
                         the client sends from the first request on (see \"Sticky sessions\" \
                         in docs/configuration.md)"
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(extra: &str) -> Config {
        let text = format!(
            "listeners:\n  - name: l\n    bind: 127.0.0.1:0\nupstreams:\n  - name: u\n{extra}    \
             backends:\n      - addr: 127.0.0.1:9\n"
        );
        Config::parse(&text, "t.yaml").expect("valid")
    }

    #[test]
    fn the_defaults_get_none() {
        assert_eq!(advice(&upstream("")), vec![]);
        let fine = "    balancer: consistent_hash\n    hash_key: cookie:sticky\n";
        assert_eq!(advice(&upstream(fine)), vec![]);
    }

    #[test]
    fn a_response_timeout_within_the_connect_timeout() {
        let got = advice(&upstream(
            "    connect_timeout: 10s\n    response_timeout: 10s\n",
        ));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].to_string().starts_with(
                "upstream \"u\": response_timeout (10s) is not longer than connect_timeout (10s)"
            ),
            "{}",
            got[0]
        );
    }

    #[test]
    fn a_hash_key_the_backend_sets() {
        for key in ["cookie:io", "cookie:JSESSIONID", "query:sid"] {
            let got = advice(&upstream(&format!(
                "    balancer: consistent_hash\n    hash_key: {key}\n"
            )));
            assert_eq!(got.len(), 1, "{key}: {got:?}");
            assert!(
                got[0]
                    .message
                    .starts_with(&format!("hash_key {key} is usually set by the backend")),
                "{}",
                got[0]
            );
        }
    }
}
