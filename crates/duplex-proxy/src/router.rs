//! Matches a request to the first route, in file order, whose listener, host, path and
//! headers fit.

use duplex_config::{routing_path, Route};
use http::HeaderMap;

/// The first route that matches a request that came in on `listener`, if any. The path
/// is matched in the form backends commonly read it ([`routing_path`]); the backend gets
/// it as sent.
pub fn find<'a>(
    routes: &'a [Route],
    listener: &str,
    host: Option<&str>,
    path: &str,
    headers: &HeaderMap,
) -> Option<(usize, &'a Route)> {
    let path = &*routing_path(path);
    routes.iter().enumerate().find(|(_, r)| {
        r.on_listener(listener)
            && r.host
                .as_ref()
                .is_none_or(|m| host.is_some_and(|h| m.matches(h)))
            && r.path.as_ref().is_none_or(|m| m.matches(path))
            && r.headers.iter().all(|(name, value)| {
                headers
                    .get_all(name.as_str())
                    .iter()
                    .any(|v| v.as_bytes() == value.as_bytes())
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_config::Config;

    #[test]
    fn first_match_wins_in_file_order() {
        let src = "\
listeners: [{name: l, bind: '127.0.0.1:1'}]
routes:
  - {name: tenant, match: {path_prefix: /ws, headers: {X-Tenant: acme}}, upstream: u}
  - {name: chat, match: {host: '*.example.com', path_prefix: /ws}, upstream: u}
  - {name: exact, match: {path: /health}, upstream: u}
  - {name: all, upstream: u}
upstreams: [{name: u, backends: [{addr: '127.0.0.1:2'}]}]
";
        let c = Config::parse(src, "t").unwrap();
        let mut acme = HeaderMap::new();
        acme.insert("x-tenant", "acme".parse().unwrap());
        let none = HeaderMap::new();
        let name =
            |host, path, h| find(&c.routes, "l", host, path, h).map(|(_, r)| r.name.as_str());
        assert_eq!(name(Some("a.example.com"), "/ws/x", &acme), Some("tenant"));
        assert_eq!(name(Some("a.example.com"), "/ws/x", &none), Some("chat"));
        assert_eq!(name(Some("example.com"), "/ws", &none), Some("all"));
        assert_eq!(name(None, "/wsx", &none), Some("all"));
        assert_eq!(name(None, "/health", &none), Some("exact"));
        // Other spellings of a path a backend would read as the same path.
        assert_eq!(name(None, "/%68ealth", &none), Some("exact"));
        assert_eq!(name(None, "//health", &none), Some("exact"));
        assert_eq!(name(None, "/health;x", &none), Some("exact"));
        assert_eq!(name(Some("a.example.com"), "/%77s/x", &none), Some("chat"));
        assert_eq!(
            find(&c.routes[..2], "l", None, "/other", &none).map(|(_, r)| &r.name),
            None
        );
    }

    /// A route limited to some listeners is skipped for requests from the others.
    #[test]
    fn a_route_for_one_listener_is_not_seen_from_another() {
        let src = "\
listeners: [{name: public, bind: '127.0.0.1:1'}, {name: partners, bind: '127.0.0.1:3'}]
routes:
  - {name: secret, match: {host: b.test, listeners: [partners]}, upstream: u}
  - {name: all, upstream: u}
upstreams: [{name: u, backends: [{addr: '127.0.0.1:2'}]}]
";
        let c = Config::parse(src, "t").unwrap();
        let none = HeaderMap::new();
        let name = |listener| {
            find(&c.routes, listener, Some("b.test"), "/", &none).map(|(_, r)| r.name.as_str())
        };
        assert_eq!(name("partners"), Some("secret"));
        assert_eq!(name("public"), Some("all"));
    }
}
