//! Table tests of what the config accepts, what it refuses, and where it points.

use duplex_config::{BalancerKind, Config, HashKey, HostMatch, PathMatch};

const FULL: &str = "\
listeners:
  - name: public
    bind: 127.0.0.1:8080
admin:
  bind: 127.0.0.1:9090
routes:
  - name: chat
    match:
      host: chat.example.com
      path_prefix: /ws/
      headers: { X-Tenant: acme }
    upstream: chat
  - name: rest
    upstream: chat
upstreams:
  - name: chat
    balancer: consistent_hash
    hash_key: header:X-User-Id
    connect_timeout: 2s
    handshake_timeout: 10s
    idle_timeout: 1h
    retries: 2
    backends:
      - addr: 127.0.0.1:9001
        weight: 1
      - addr: 127.0.0.1:9002
";

#[test]
fn reads_the_documented_contract() {
    let c = Config::parse(FULL, "full.yaml").expect("valid");
    assert_eq!(c.listeners[0].bind.port(), 8080);
    let r = &c.routes[0];
    assert_eq!(r.host, Some(HostMatch::Exact("chat.example.com".into())));
    assert_eq!(r.path, Some(PathMatch::Prefix("/ws".into())));
    assert_eq!(r.headers, vec![("x-tenant".into(), "acme".into())]);
    let u = &c.upstreams[0];
    assert_eq!(u.balancer, BalancerKind::ConsistentHash);
    assert_eq!(u.hash_key, Some(HashKey::Header("x-user-id".into())));
    assert_eq!(u.idle_timeout, Some(std::time::Duration::from_secs(3600)));
    assert_eq!(u.backends[1].weight, 1);
}

#[test]
fn defaults_apply() {
    let src = "listeners: [{name: a, bind: '127.0.0.1:1'}]\nupstreams: [{name: u, backends: [{addr: '127.0.0.1:2'}]}]\n";
    let c = Config::parse(src, "x").unwrap();
    let u = &c.upstreams[0];
    assert_eq!(u.balancer, BalancerKind::LeastConn);
    assert_eq!(u.retries, 2);
    assert_eq!(u.idle_timeout, None);
    assert_eq!(c.admin.bind, duplex_config::defaults::ADMIN_BIND);
    let secs = std::time::Duration::from_secs;
    assert_eq!(c.listeners[0].send_timeout, secs(60));
    assert_eq!(c.listeners[0].client_body_timeout, secs(60));
    assert_eq!(c.listeners[0].client_header_timeout, secs(30));
    let src = src.replace(
        "bind: '127.0.0.1:1'",
        "bind: '127.0.0.1:1', send_timeout: 90s, client_body_timeout: 5s, client_header_timeout: 7s",
    );
    let c = Config::parse(&src, "x").unwrap();
    assert_eq!(c.listeners[0].send_timeout, secs(90));
    assert_eq!(c.listeners[0].client_body_timeout, secs(5));
    assert_eq!(c.listeners[0].client_header_timeout, secs(7));
    assert_eq!(
        (c.max_connections, c.listeners[0].max_connections),
        (None, None)
    );
    let src = src.replace("send_timeout: 90s", "max_connections: 300");
    let c = Config::parse(&format!("max_connections: 5000\n{src}"), "x").unwrap();
    assert_eq!(c.max_connections, Some(5000));
    assert_eq!(c.listeners[0].max_connections, Some(300));
}

/// Each case: a replacement applied to FULL, and the `LINE:COL: text` the error must start with.
#[test]
fn refuses_bad_files_and_points_at_the_value() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "upstream: chat\n  - name: rest",
            "upstream: nope\n  - name: rest",
            "f:12:15: route \"chat\" names unknown upstream \"nope\"",
        ),
        (
            "- name: rest",
            "- name: chat",
            "f:13:11: duplicate route name \"chat\" (first defined at line 7)",
        ),
        (
            "      headers: { X-Tenant: acme }",
            "      headers: { X-Tenant: acme }\n      listeners: [public, nope]",
            "f:12:18: route \"chat\" names unknown listener \"nope\" (known: public)",
        ),
        (
            "      headers: { X-Tenant: acme }",
            "      headers: { X-Tenant: acme }\n      listeners: []",
            "f:12:18: listeners: [] matches no request",
        ),
        (
            "retries: 2",
            "retries: two",
            "f:22:14: upstreams[0].retries: invalid type: string \"two\", expected a whole number from 0 to 4294967295",
        ),
        (
            "    balancer: consistent_hash",
            "    balancer: consistent_hash\n    balancer: least_conn",
            "f:18:5: upstreams[0]: duplicate field `balancer`",
        ),
        (
            "admin:",
            "shutdown_timeout: 5s\nshutdown_timeout: 6s\nadmin:",
            "f:5:1: duplicate field `shutdown_timeout`",
        ),
        (
            "admin:",
            "  - name: second\n    bind: 127.0.0.1:8080\nadmin:",
            "f:5:11: two listeners bind 127.0.0.1:8080 (first defined at line 3)",
        ),
        (
            "admin:",
            "  - name: second\n    bind: \"[::]:8080\"\nadmin:",
            "f:5:11: two listeners bind port 8080: [::]:8080 and 127.0.0.1:8080 overlap",
        ),
        (
            "admin:",
            "  - name: second\n    bind: 0.0.0.0:8080\nadmin:",
            "f:5:11: two listeners bind port 8080: 0.0.0.0:8080 and 127.0.0.1:8080 overlap",
        ),
        (
            "admin:",
            "  - name: second\n    bind: \"[::ffff:127.0.0.1]:8080\"\nadmin:",
            "f:5:11: two listeners bind port 8080: [::ffff:127.0.0.1]:8080 and 127.0.0.1:8080 overlap",
        ),
        (
            "bind: 127.0.0.1:9090",
            "bind: \"[::]:8080\"",
            "f:5:9: the admin listener and a proxy listener both bind port 8080: [::]:8080 and 127.0.0.1:8080 overlap",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: localhost",
            "f:26:15: invalid address \"localhost\"",
        ),
        (
            "weight: 1",
            "weight: 0",
            "f:25:17: weight must be between 1 and 1000, got 0",
        ),
        (
            "bind: 127.0.0.1:8080",
            "bind: 127.0.0.1:8080\n    send_timeout: 0s",
            "f:4:19: duration \"0s\" must be greater than zero",
        ),
        (
            "bind: 127.0.0.1:8080",
            "bind: 127.0.0.1:8080\n    max_connections: 0",
            "f:4:22: max_connections must be at least 1 (got 0)",
        ),
        (
            "admin:",
            "max_connections: many\nadmin:",
            "f:4:18: max_connections: invalid type: string \"many\"",
        ),
        (
            "connect_timeout: 2s",
            "connect_timeout: soon",
            "f:19:22: invalid duration \"soon\"",
        ),
        (
            "balancer: consistent_hash",
            "balancer: round_robin",
            "f:18:15: hash_key is only used by balancer: consistent_hash",
        ),
        (
            "balancer: consistent_hash",
            "balancer: fastest",
            "f:17:15: upstreams[0].balancer: unknown variant `fastest`",
        ),
        (
            "    retries: 2",
            "    retries: 2\n    colour: red",
            "f:23:5: upstreams[0]: unknown field `colour`",
        ),
        (
            "hash_key: header:X-User-Id",
            "hash_key: body",
            "f:18:15: invalid hash_key \"body\"",
        ),
        (
            "path_prefix: /ws/",
            "path_prefix: ws",
            "f:10:20: invalid path \"ws\"",
        ),
        (
            "host: chat.example.com",
            "host: 'a b'",
            "f:9:13: invalid host",
        ),
        (
            "    retries: 2",
            "    retries: 2\n    health_check:\n      kind: tcp\n      interval: 1ms\n      timeout: 1ms",
            "f:25:17: must be at least 100ms, got 1ms",
        ),
        (
            "    retries: 2",
            "    retries: 2\n    health_check:\n      kind: http\n      path: /health<x>",
            "f:25:13: invalid health check path",
        ),
        (
            "    retries: 2",
            "    retries: 2\n    health_check:\n      kind: http\n      host: 'a b'",
            "f:25:13: invalid health check host",
        ),
        (
            "    retries: 2",
            "    retries: 2\n    health_check:\n      kind: http\n      host: '[::1'",
            "f:25:13: invalid health check host \"[::1\": expected a name or address",
        ),
        (
            "headers: { X-Tenant: acme }",
            "headers: { X-Tenant: acme, X-Tenant: other }",
            "f:11:16: routes[0].match.headers: header \"X-Tenant\" is named twice",
        ),
        (
            "headers: { X-Tenant: acme }",
            "headers: { X-Tenant: acme, x-tenant: other }",
            "f:11:16: header \"x-tenant\" is named twice",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: chat.test:9002\n        resolve: dns\n        resolve_interval: 1ms",
            "f:28:27: must be at least 100ms, got 1ms",
        ),
        (
            "host: chat.example.com",
            "host: 'a..b'",
            "f:9:13: invalid host",
        ),
        (
            "hash_key: header:X-User-Id",
            "hash_key: 'cookie:session id'",
            "f:18:15: invalid cookie name",
        ),
        (
            "hash_key: header:X-User-Id",
            "hash_key: 'query:a=b'",
            "f:18:15: invalid query parameter name",
        ),
        (
            "idle_timeout: 1h",
            "idle_timeout: 1ms",
            "f:21:19: duration \"1ms\" is shorter than the minimum of 100ms",
        ),
        (
            "connect_timeout: 2s",
            "connect_timeout: 1ns",
            "f:19:22: duration \"1ns\" is shorter than the minimum of 10ms",
        ),
        (
            "idle_timeout: 1h",
            "idle_timeout:",
            "f:21:5: upstreams[0].idle_timeout: a value is needed here",
        ),
        (
            "    retries: 2",
            "    retries: 2\n    max_fails: 101",
            "f:23:16: max_fails must be between 0 (off) and 100, got 101",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: chat.test:9002\n        resolve: dns\n      - addr: chat.test:9002\n        resolve: dns",
            "f:28:15: backend chat.test:9002 is listed twice in upstream \"chat\"",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: chat..test:9002\n        resolve: dns",
            "f:26:15: invalid address \"chat..test:9002\"",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: -chat.test:9002\n        resolve: dns",
            "f:26:15: invalid address \"-chat.test:9002\"",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.test:9002\n        resolve: dns",
            "f:26:15: invalid address",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: \"[::ffff:127.0.0.1]:9001\"",
            "f:26:15: backend 127.0.0.1:9001 is listed twice in upstream \"chat\"",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: 127.0.0.1:0",
            "f:26:15: invalid backend address \"127.0.0.1:0\": port 0 is no port to connect to",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: \"[::]:9002\"",
            "f:26:15: invalid backend address \"[::]:9002\": an unspecified address",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: 0.0.0.0:9002",
            "f:26:15: invalid backend address \"0.0.0.0:9002\": an unspecified address",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: \"[ff02::1]:9002\"",
            "f:26:15: invalid backend address \"[ff02::1]:9002\": a multicast",
        ),
        (
            "addr: 127.0.0.1:9002",
            "addr: \"[::1%1]:9002\"",
            "f:26:15: invalid backend address \"[::1%1]:9002\": an IPv6 zone index",
        ),
    ];
    let mut wrong = Vec::new();
    for (from, to, want) in cases {
        assert!(FULL.contains(from), "case source {from:?}");
        let src = FULL.replacen(from, to, 1);
        let err = Config::parse(&src, "f").expect_err(to).to_string();
        if !err.starts_with(want) {
            wrong.push(format!("{to:?}: got {err:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// What editors and generators put in files: a byte order mark is ignored; a control
/// character, a huge value and a line break inside a value give a short one-line error
/// at the right place; deep nesting is refused before the YAML reader takes its time.
#[test]
fn odd_files_get_short_errors_in_the_right_place() {
    let bom = format!("\u{feff}{FULL}");
    Config::parse(&bom, "f").expect("a BOM is not content");
    let err = Config::parse(&bom.replacen("- name: rest", "- name: chat", 1), "f")
        .expect_err("duplicate")
        .to_string();
    assert!(err.starts_with("f:13:11: duplicate route name"), "{err}");

    let err = Config::parse(&format!("\u{feff}nonsense: 1\n{FULL}"), "f")
        .expect_err("unknown key")
        .to_string();
    assert!(err.starts_with("f:1:1: unknown field `nonsense`"), "{err}");

    let ctl = FULL.replacen("connect_timeout: 2s", "connect_timeout: 2\u{1}s", 1);
    let err = Config::parse(&ctl, "f").expect_err("control").to_string();
    assert!(err.starts_with("f:19:23: "), "{err}");
    assert!(!err.contains("at position"), "{err}");

    let huge = FULL.replacen(
        "balancer: consistent_hash",
        &format!("balancer: {}", "x".repeat(100_000)),
        1,
    );
    let err = Config::parse(&huge, "f").expect_err("huge").to_string();
    assert!(
        err.len() < 600 && err.contains("more bytes"),
        "{} bytes",
        err.len()
    );

    let split = FULL.replacen("balancer: consistent_hash", "balancer: \"a\\nb\"", 1);
    let err = Config::parse(&split, "f").expect_err("split").to_string();
    assert!(!err.contains('\n'), "{err}");

    let deep = format!("{FULL}x: {}\n", "[".repeat(60_000));
    let took = std::time::Instant::now();
    let err = Config::parse(&deep, "f").expect_err("deep").to_string();
    assert!(err.contains("nested deeper than 64"), "{err}");
    assert!(
        took.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        took.elapsed()
    );

    let big = FULL.replacen("weight: 1", "weight: 99999999999999999999999", 1);
    let err = Config::parse(&big, "f").expect_err("big").to_string();
    assert!(!err.contains("u128"), "{err}");
}

#[test]
fn refuses_an_empty_backend_list_and_no_listeners() {
    let src = "listeners: []\n";
    assert!(Config::parse(src, "f")
        .unwrap_err()
        .to_string()
        .contains("at least one listener"));
    let src = "listeners:\n  - name: a\n    bind: 127.0.0.1:1\nupstreams:\n  - name: u\n    backends: []\n";
    let err = Config::parse(src, "f").unwrap_err().to_string();
    assert_eq!(err, "f:6:15: upstream \"u\" has no backends");
}

#[test]
fn segment_aware_prefix_and_wildcard_hosts() {
    let p = PathMatch::Prefix("/ws".into());
    assert!(p.matches("/ws") && p.matches("/ws/x") && !p.matches("/wsx") && !p.matches("/"));
    assert!(PathMatch::Prefix("/".into()).matches("/anything"));
    let h = HostMatch::Suffix(".example.com".into());
    assert!(h.matches("a.example.com") && h.matches("a.b.example.com"));
    assert!(!h.matches("example.com") && !h.matches("aexample.com"));
}

/// `client_auth:` with every line under it commented out is an error, not "no client
/// certificates": read as "not set", it would let every client in.
#[test]
fn an_emptied_section_is_refused_not_taken_as_unset() {
    let src = "\
listeners:
  - name: public
    bind: 127.0.0.1:8443
    tls:
      certificates:
        - {cert: c.pem, key: k.pem}
      client_auth:
      #  ca: clients.pem
upstreams: [{name: u, backends: [{addr: '127.0.0.1:2'}]}]
";
    let err = Config::parse(src, "f")
        .expect_err("emptied client_auth")
        .to_string();
    assert!(err.starts_with("f:7:"), "{err}");
    assert!(err.contains("client_auth") || err.contains("ca"), "{err}");
    let fine = src.replace("      client_auth:\n      #  ca: clients.pem\n", "");
    let c = Config::parse(&fine, "f").expect("without the key");
    assert!(c.listeners[0]
        .tls
        .as_ref()
        .expect("tls")
        .client_auth
        .is_none());
    // Nor is an upstream's emptied `tls:`, or a bare `null` (which would otherwise be
    // read as the host name "null").
    let base = "listeners: [{name: a, bind: '127.0.0.1:1'}]\nupstreams:\n  - name: u\n    KEY\n    backends: [{addr: '127.0.0.1:2'}]\n";
    for key in [
        "tls:",
        "tls: ~",
        "tls: {server_name: null}",
        "idle_timeout: null",
    ] {
        let err = Config::parse(&base.replace("KEY", key), "f")
            .expect_err(key)
            .to_string();
        assert!(err.contains("a value is needed here"), "{key}: {err}");
    }
}

/// An upstream's `server_name` is a DNS name: an IP address would silently mean "no SNI,
/// check the address", so it is refused; underscores, common in internal names, are not.
#[test]
fn server_name_is_a_dns_name() {
    let base = "listeners: [{name: a, bind: '127.0.0.1:1'}]\nupstreams:\n  - name: u\n    tls: {server_name: 'NAME', insecure_skip_verify: true}\n    backends: [{addr: '127.0.0.1:2'}]\n";
    for bad in [
        "10.0.0.5",
        "::1",
        "a..b",
        "a b",
        "-",
        "10.0.0.256",
        "host.123",
        "a.0x1f",
    ] {
        let err = Config::parse(&base.replace("NAME", bad), "f")
            .expect_err(bad)
            .to_string();
        assert!(
            err.starts_with("f:4:") && err.contains("server_name"),
            "{bad}: {err}"
        );
    }
    assert!(Config::parse(&base.replace("NAME", "10.0.0.5"), "f")
        .expect_err("ip")
        .to_string()
        .contains("is an IP address"));
    for good in ["chat.internal", "svc_a.ns.internal", "backend"] {
        let c = Config::parse(&base.replace("NAME", good), "f").expect(good);
        let tls = c.upstreams[0].tls.as_ref().expect("tls");
        assert_eq!(tls.server_name.as_deref(), Some(good));
    }
}

#[test]
fn a_host_with_a_final_dot_matches_as_without_it() {
    let src = FULL.replacen("host: chat.example.com", "host: chat.example.com.", 1);
    let c = Config::parse(&src, "f").expect("a fully qualified name");
    assert_eq!(
        c.routes[0].host,
        Some(HostMatch::Exact("chat.example.com".into()))
    );
}

/// Routes are tried in order: one that an earlier route takes every request of is dead,
/// and refused; the same routes the other way round are fine.
#[test]
fn a_route_an_earlier_one_shadows_is_refused() {
    let file = |routes: &str| {
        format!(
            "listeners: [{{name: l, bind: '127.0.0.1:1'}}, {{name: m, bind: '127.0.0.1:3'}}]\nroutes:\n{routes}\
             upstreams: [{{name: u, backends: [{{addr: '127.0.0.1:2'}}]}}]\n"
        )
    };
    let dead = [
        ("  - {name: all, upstream: u}\n  - {name: ws, match: {path_prefix: /ws}, upstream: u}\n", "\"ws\"", "\"all\""),
        ("  - {name: root, match: {path_prefix: /}, upstream: u}\n  - {name: ws, match: {host: a.b, path: /ws}, upstream: u}\n", "\"ws\"", "\"root\""),
        ("  - {name: ws, match: {path_prefix: /ws}, upstream: u}\n  - {name: room, match: {path_prefix: /ws/room/}, upstream: u}\n", "\"room\"", "\"ws\""),
        ("  - {name: any, match: {host: '*.example.com'}, upstream: u}\n  - {name: a, match: {host: a.example.com, path: /x}, upstream: u}\n", "\"a\"", "\"any\""),
        ("  - {name: any, match: {host: '*.example.com'}, upstream: u}\n  - {name: deep, match: {host: '*.a.example.com'}, upstream: u}\n", "\"deep\"", "\"any\""),
        ("  - {name: t, match: {headers: {X-T: a}}, upstream: u}\n  - {name: tv, match: {path: /v, headers: {X-T: a, X-V: b}}, upstream: u}\n", "\"tv\"", "\"t\""),
        ("  - {name: one, match: {path: /x}, upstream: u}\n  - {name: two, match: {path: /x}, upstream: u}\n", "\"two\"", "\"one\""),
        ("  - {name: all, upstream: u}\n  - {name: onl, match: {listeners: [l]}, upstream: u}\n", "\"onl\"", "\"all\""),
        ("  - {name: both, match: {listeners: [l, m]}, upstream: u}\n  - {name: onl, match: {listeners: [l], path: /x}, upstream: u}\n", "\"onl\"", "\"both\""),
    ];
    for (routes, later, earlier) in dead {
        let err = Config::parse(&file(routes), "f")
            .expect_err(routes)
            .to_string();
        assert!(
            err.starts_with("f:4:")
                && err.contains(&format!("route {later} can never match: route {earlier}")),
            "{routes}: {err}"
        );
    }
    let fine = [
        "  - {name: ws, match: {path_prefix: /ws}, upstream: u}\n  - {name: all, upstream: u}\n",
        "  - {name: room, match: {path_prefix: /ws/room}, upstream: u}\n  - {name: ws, match: {path_prefix: /ws}, upstream: u}\n",
        "  - {name: ws, match: {path_prefix: /ws}, upstream: u}\n  - {name: wsx, match: {path_prefix: /wsx}, upstream: u}\n",
        "  - {name: a, match: {host: a.example.com}, upstream: u}\n  - {name: any, match: {host: '*.example.com'}, upstream: u}\n",
        "  - {name: any, match: {host: '*.example.com'}, upstream: u}\n  - {name: bare, match: {host: example.com}, upstream: u}\n",
        "  - {name: h, match: {host: a.b}, upstream: u}\n  - {name: nohost, match: {path: /x}, upstream: u}\n",
        "  - {name: exact, match: {path: /ws}, upstream: u}\n  - {name: prefix, match: {path_prefix: /ws}, upstream: u}\n",
        "  - {name: tv, match: {headers: {X-T: a, X-V: b}}, upstream: u}\n  - {name: t, match: {headers: {X-T: a}}, upstream: u}\n",
        "  - {name: ta, match: {headers: {X-T: a}}, upstream: u}\n  - {name: tb, match: {headers: {X-T: b}}, upstream: u}\n",
        "  - {name: onl, match: {listeners: [l]}, upstream: u}\n  - {name: onm, match: {listeners: [m]}, upstream: u}\n",
        "  - {name: onl, match: {listeners: [l]}, upstream: u}\n  - {name: all, upstream: u}\n",
        "  - {name: onl, match: {listeners: [l]}, upstream: u}\n  - {name: both, match: {listeners: [l, m]}, upstream: u}\n",
    ];
    for routes in fine {
        Config::parse(&file(routes), "f").unwrap_or_else(|e| panic!("{routes}: {e}"));
    }
}

/// Values that could never do what they say are refused: a route that could never
/// match, a month where a minute was meant, a bind no TCP client can reach; and the
/// bounds that keep a check of a file within a second or so.
#[test]
fn settings_that_cannot_work_are_refused() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "path_prefix: /ws/",
            "path_prefix: /api/../admin",
            "a path with . or .. segments never matches",
        ),
        (
            "path_prefix: /ws/",
            "path_prefix: /%2e%2e/x",
            "a path with . or .. segments never matches",
        ),
        (
            "path_prefix: /ws/",
            "path: \"/a\\0b\"",
            "a control character can never be in a request's path",
        ),
        (
            "X-Tenant: acme",
            "X-Tenant: \"acme\\r\\nX: y\"",
            "cannot be sent in a request",
        ),
        (
            "X-Tenant: acme",
            "X-Tenant: \" acme\"",
            "cannot be sent in a request",
        ),
        (
            "idle_timeout: 1h",
            "idle_timeout: 1M",
            "M is months here; write m for minutes",
        ),
        (
            "connect_timeout: 2s",
            "connect_timeout: 2 M",
            "M is months here",
        ),
        (
            "bind: 127.0.0.1:8080",
            "bind: 224.0.0.1:8080",
            "a multicast or broadcast address takes no TCP connection",
        ),
        (
            "bind: 127.0.0.1:8080",
            "bind: 255.255.255.255:8080",
            "a multicast or broadcast address",
        ),
        (
            "bind: 127.0.0.1:9090",
            "bind: 224.0.0.1:9090",
            "a multicast or broadcast address",
        ),
    ];
    let mut wrong = Vec::new();
    for (from, to, want) in cases {
        assert!(FULL.contains(from), "case source {from:?}");
        let src = FULL.replacen(from, to, 1);
        match Config::parse(&src, "f") {
            Ok(_) => wrong.push(format!("{to:?}: accepted")),
            Err(e) if !e.to_string().contains(want) => {
                wrong.push(format!("{to:?}: got {e}, want {want:?}"))
            }
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // A month spelled out is still a valid (long) duration; `1m` and `10min` are minutes.
    for fine in [
        "idle_timeout: 1m",
        "idle_timeout: 10min",
        "idle_timeout: 30d",
    ] {
        let src = FULL.replacen("idle_timeout: 1h", fine, 1);
        Config::parse(&src, "f").unwrap_or_else(|e| panic!("{fine}: {e}"));
    }

    let headers: String = (0..33).map(|i| format!(", X-H{i}: v")).collect();
    let src = FULL.replacen(
        "{ X-Tenant: acme }",
        &format!("{{ X-Tenant: acme{headers} }}"),
        1,
    );
    let e = Config::parse(&src, "f")
        .expect_err("too many headers")
        .to_string();
    assert!(
        e.contains("34 headers is more than the 32 a route may match on"),
        "{e}"
    );

    let routes: String = (0..10_001)
        .map(|i| format!("  - name: r{i}\n    match: {{ path: /r{i} }}\n    upstream: chat\n"))
        .collect();
    let src = FULL.replacen("routes:\n", &format!("routes:\n{routes}"), 1);
    let e = Config::parse(&src, "f")
        .expect_err("too many routes")
        .to_string();
    assert!(
        e.contains("routes is more than the 10000 a configuration may have"),
        "{e}"
    );
}
