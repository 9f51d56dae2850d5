//! What changed between two configurations: the one-line summary a reload logs.

use std::collections::HashMap;
use std::fmt;

use crate::Config;

/// Names added, removed and changed, per kind. Backends are `upstream/addr`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub listeners: Changes,
    pub routes: Changes,
    pub upstreams: Changes,
    pub backends: Changes,
    /// Top-level settings that changed: `admin`, `shutdown_timeout`, `max_connections`,
    /// `reuse_port`.
    pub settings: Vec<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// Each name's position in `set`.
fn index<T>(set: &[(String, T)]) -> HashMap<&str, usize> {
    set.iter()
        .enumerate()
        .map(|(i, (k, _))| (k.as_str(), i))
        .collect()
}

impl Changes {
    fn of<T: PartialEq>(old: &[(String, T)], new: &[(String, T)]) -> Changes {
        // Indexed: an upstream may list thousands of backends.
        let (in_old, in_new) = (index(old), index(new));
        let mut c = Changes::default();
        for (k, v) in new {
            match in_old.get(k.as_str()) {
                None => c.added.push(k.clone()),
                Some(&i) if old[i].1 != *v => c.changed.push(k.clone()),
                Some(_) => {}
            }
        }
        c.removed = old
            .iter()
            .filter(|(k, _)| !in_new.contains_key(k.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        c
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl Diff {
    pub fn between(old: &Config, new: &Config) -> Diff {
        let listeners = |c: &Config| {
            c.listeners
                .iter()
                .map(|l| (l.name.clone(), l.clone()))
                .collect::<Vec<_>>()
        };
        let routes = |c: &Config| {
            // A route's position matters: moving it changes which route wins.
            c.routes
                .iter()
                .enumerate()
                .map(|(i, r)| (r.name.clone(), (i, r.clone())))
                .collect::<Vec<_>>()
        };
        let upstreams = |c: &Config| {
            c.upstreams
                .iter()
                .map(|u| {
                    let mut settings = u.clone();
                    settings.backends.clear();
                    (u.name.clone(), settings)
                })
                .collect::<Vec<_>>()
        };
        let backends = |c: &Config| {
            c.upstreams
                .iter()
                .flat_map(|u| {
                    let fixed = u
                        .backends
                        .iter()
                        .map(move |b| (format!("{}/{}", u.name, b.addr), b.weight));
                    let named = u.discovered.iter().map(move |d| {
                        (format!("{}/{}:{} (dns)", u.name, d.host, d.port), d.weight)
                    });
                    fixed.chain(named)
                })
                .collect::<Vec<(String, u32)>>()
        };
        Diff {
            listeners: Changes::of(&listeners(old), &listeners(new)),
            routes: Changes::of(&routes(old), &routes(new)),
            upstreams: Changes::of(&upstreams(old), &upstreams(new)),
            backends: Changes::of(&backends(old), &backends(new)),
            settings: [
                ("admin", old.admin != new.admin),
                (
                    "shutdown_timeout",
                    old.shutdown_timeout != new.shutdown_timeout,
                ),
                (
                    "max_connections",
                    old.max_connections != new.max_connections,
                ),
                ("reuse_port", old.reuse_port != new.reuse_port),
            ]
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(name, _)| (*name).to_owned())
            .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
            && self.routes.is_empty()
            && self.upstreams.is_empty()
            && self.backends.is_empty()
            && self.settings.is_empty()
    }
}

impl fmt::Display for Diff {
    /// `routes +a -b ~c; backends +chat/127.0.0.1:9003`, or `no changes`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let mut first = true;
        for (kind, c) in [
            ("listeners", &self.listeners),
            ("routes", &self.routes),
            ("upstreams", &self.upstreams),
            ("backends", &self.backends),
        ] {
            if c.is_empty() {
                continue;
            }
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            f.write_str(kind)?;
            for (sign, names) in [('+', &c.added), ('-', &c.removed), ('~', &c.changed)] {
                for n in names {
                    write!(f, " {sign}{n}")?;
                }
            }
        }
        if !self.settings.is_empty() {
            if !first {
                f.write_str("; ")?;
            }
            f.write_str("settings")?;
            for n in &self.settings {
                write!(f, " ~{n}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "\
listeners:
  - {name: public, bind: '127.0.0.1:8080'}
routes:
  - {name: chat, match: {path_prefix: /ws}, upstream: chat}
  - {name: rest, upstream: chat}
upstreams:
  - name: chat
    backends:
      - {addr: '127.0.0.1:9001'}
      - {addr: '127.0.0.1:9002'}
";

    #[test]
    fn summarises_each_kind_of_change() {
        let cases: &[(&str, &str, &str)] = &[
            ("", "", "no changes"),
            ("routes:", "shutdown_timeout: 5s\nroutes:", "settings ~shutdown_timeout"),
            ("routes:", "reuse_port: true\nroutes:", "settings ~reuse_port"),
            ("- {addr: '127.0.0.1:9002'}", "- {addr: '127.0.0.1:9002'}\n      - {addr: '127.0.0.1:9003'}", "backends +chat/127.0.0.1:9003"),
            ("      - {addr: '127.0.0.1:9002'}\n", "", "backends -chat/127.0.0.1:9002"),
            ("- {addr: '127.0.0.1:9002'}", "- {addr: '127.0.0.1:9002', weight: 5}", "backends ~chat/127.0.0.1:9002"),
            ("- name: chat\n", "- name: chat\n    balancer: round_robin\n", "upstreams ~chat"),
            ("path_prefix: /ws", "path_prefix: /chat", "routes ~chat"),
            ("path_prefix: /ws}", "path_prefix: /ws, listeners: [public]}", "routes ~chat"),
            ("  - {name: rest, upstream: chat}\n", "", "routes -rest"),
            ("bind: '127.0.0.1:8080'}", "bind: '127.0.0.1:8080'}\n  - {name: tls, bind: '127.0.0.1:8443'}", "listeners +tls"),
            (
                "  - {name: chat, match: {path_prefix: /ws}, upstream: chat}\n  - {name: rest, upstream: chat}\n",
                "  - {name: rest, match: {path_prefix: /api}, upstream: chat}\n  - {name: chat, match: {path_prefix: /ws}, upstream: chat}\n",
                "routes ~rest ~chat",
            ),
        ];
        let old = Config::parse(BASE, "old").unwrap();
        for (from, to, want) in cases {
            assert!(BASE.contains(from), "{from:?}");
            let new = Config::parse(&BASE.replacen(from, to, 1), "new").unwrap();
            assert_eq!(
                Diff::between(&old, &new).to_string(),
                *want,
                "replacing {from:?}"
            );
        }
    }
}
