//! Header rewriting at the proxy boundary: hop-by-hop removal and X-Forwarded-*.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop only (RFC 9110 section 7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
/// The client's address alone, as nginx configurations set it: replaced, never passed on
/// from the client, or a backend that trusts it would trust whatever a client wrote.
pub const XRI: HeaderName = HeaderName::from_static("x-real-ip");

/// Whether a comma-separated header holds `token`, compared case-insensitively.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| list_has(v.as_bytes(), token.as_bytes()))
}

/// Whether the comma-separated `list` holds `token`, compared case-insensitively.
pub fn list_has(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The header names that the `Connection` lines among `lines` list, which are hop-by-hop
/// too; except those that are never a connection option (see [`never_an_option`]).
pub fn connection_named<'a>(lines: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<&'a [u8]> {
    lines
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !never_an_option(t))
        .collect()
}

/// Fields meant for every recipient, which RFC 9110 section 7.6.1 forbids naming in
/// `Connection`, and whose removal would change what the next hop sees: the host it
/// routes by, the body's framing, the WebSocket handshake. A peer that names them is
/// ignored in that, rather than obeyed.
fn never_an_option(name: &[u8]) -> bool {
    const PREFIX: &[u8] = b"sec-websocket-";
    name.eq_ignore_ascii_case(b"host")
        || name.eq_ignore_ascii_case(b"content-length")
        || name
            .get(..PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
}

/// [`connection_named`] for a header map.
pub fn connection_named_in(headers: &HeaderMap) -> Vec<&[u8]> {
    connection_named(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .map(|v| (&b"connection"[..], v.as_bytes())),
    )
}

/// Whether header `name` is hop-by-hop, given what `Connection` lists (see
/// [`connection_named`]).
pub fn is_hop_by_hop(name: &[u8], named: &[&[u8]]) -> bool {
    HOP_BY_HOP
        .iter()
        .map(|h| h.as_str().as_bytes())
        .chain(named.iter().copied())
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether `headers` name a transfer coding other than one `chunked` (`gzip, chunked`,
/// say). hyper takes off only the chunked framing, and `Transfer-Encoding` is hop-by-hop:
/// the other codings would reach the next hop unnamed, so such a message is refused.
pub fn other_transfer_coding(headers: &HeaderMap) -> bool {
    // Empty list elements do not count (RFC 9110 section 5.6.1: `, chunked` is `chunked`).
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => false,
        (Some(c), None) => !c.eq_ignore_ascii_case(b"chunked"),
        _ => true,
    }
}

/// Removes hop-by-hop headers, including any that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none (and with no `Connection`, none is named either): one pass
    // over the few names present costs less than a lookup per hop-by-hop name.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = connection_named_in(headers)
        .into_iter()
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// A client address as `X-Forwarded-For` carries it; made once per connection, since
/// formatting an address costs more than the rest of [`add_forwarded`].
pub fn forwarded_for(client: IpAddr) -> HeaderValue {
    // An IPv4 client of a dual-stack listener arrives as `::ffff:a.b.c.d`: named as the
    // IPv4 address it is, as backends' allow lists and logs expect.
    let text = match client.to_canonical() {
        // By hand: `Display` for an IPv4 address goes through the formatting machinery,
        // about twenty times the work, once per connection.
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if octet >= 100 {
                    s.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    s.push(char::from(b'0' + octet / 10 % 10));
                }
                s.push(char::from(b'0' + octet % 10));
            }
            s
        }
        IpAddr::V6(v6) => v6.to_string(),
    };
    HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static("unknown"))
}

/// The client's `X-Forwarded-For` lines, trimmed, empty ones left out: an empty line adds
/// no empty entry (`, 10.0.0.1`) to the chain the backend gets.
pub fn forwarded_so_far(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(&XFF)
        .iter()
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|v| !v.is_empty())
}

/// Whether `name` (lower case, as `http` keeps names) is a header duplex sets itself
/// spelled with underscores (`x_real_ip`). CGI and WSGI servers read `_` and `-` alike,
/// so a client could hand a backend an address of its own under that name. nginx drops
/// every name with `_` (`underscores_in_headers off`); duplex drops only these.
pub fn spoofs_ours(name: &[u8]) -> bool {
    name.contains(&b'_')
        && [XFF, XFP, XFH, XRI].iter().any(|ours| {
            let ours = ours.as_str().as_bytes();
            ours.len() == name.len()
                && ours
                    .iter()
                    .zip(name)
                    .all(|(&o, &n)| o == n || (o == b'-' && n == b'_'))
        })
}

/// Removes the request headers [`spoofs_ours`] finds.
fn drop_spoofs(headers: &mut HeaderMap) {
    let spoofs: Vec<HeaderName> = headers
        .keys()
        .filter(|n| spoofs_ours(n.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in spoofs {
        headers.remove(name);
    }
}

/// Removes from a request's trailers what must not come that way (RFC 9110 section
/// 6.5.1): the headers duplex sets (a backend that merges trailers into the headers would
/// read the client's), framing, routing and hop-by-hop fields. nginx drops request
/// trailers altogether.
pub fn clean_trailers(trailers: &mut HeaderMap) {
    drop_spoofs(trailers);
    let never = [XFF, XFP, XFH, XRI, header::HOST, header::CONTENT_LENGTH];
    for name in never.iter().chain(HOP_BY_HOP.iter()) {
        trailers.remove(name);
    }
}

/// Appends the client (as [`forwarded_for`] renders it) to `X-Forwarded-For`, sets
/// `X-Real-IP` to it, and sets `X-Forwarded-Proto` and `-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, https: bool) {
    drop_spoofs(headers);
    if headers.contains_key(&XFF) {
        let mut all: Vec<&[u8]> = forwarded_so_far(headers).collect();
        all.push(client.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&all.join(&b", "[..])) {
            headers.insert(XFF, v);
        }
    } else {
        headers.insert(XFF, client.clone());
    }
    headers.insert(XRI, client.clone());
    headers.insert(XFP, HeaderValue::from_static(proto(https)));
    match headers.get(header::HOST).cloned() {
        Some(host) => {
            headers.insert(XFH, host);
        }
        // No Host (HTTP/1.0): no forwarded host either, not one the client made up.
        None => {
            headers.remove(XFH);
        }
    }
}

/// `X-Forwarded-Proto` for a client that did or did not come over TLS.
pub fn proto(https: bool) -> &'static str {
    if https {
        "https"
    } else {
        "http"
    }
}

/// Whether a request has more than one `Host` header, which RFC 9112 section 3.2 says to
/// answer with 400: routing by one while the backend reads the other is how requests get
/// past a proxy's rules.
pub fn has_several_hosts(headers: &HeaderMap) -> bool {
    headers.get_all(header::HOST).iter().nth(1).is_some()
}

/// Makes `Host` name the target of an absolute-form request (`GET http://host/path`),
/// whatever `Host` said: RFC 9112 section 3.2.2 asks a proxy to ignore the received `Host`
/// then, and the backend must see the host the request was routed by.
pub fn host_from_target(headers: &mut HeaderMap, uri: &http::Uri) {
    let Some(host_port) = target_host(uri) else {
        return;
    };
    if let Ok(v) = HeaderValue::from_str(host_port) {
        headers.insert(header::HOST, v);
    }
}

/// The `host[:port]` of an absolute-form target, without any `user@` part, which has no
/// place in `Host`.
pub fn target_host(uri: &http::Uri) -> Option<&str> {
    uri.authority().and_then(|a| a.as_str().rsplit('@').next())
}

/// The request's host in lower case without its port: from the target of an
/// absolute-form request, else from `Host` (see [`host_from_target`]).
pub fn request_host(headers: &HeaderMap, uri: &http::Uri) -> Option<String> {
    let raw = match uri.host() {
        Some(h) => h,
        None => headers.get(header::HOST).and_then(|v| v.to_str().ok())?,
    };
    let host = if raw.starts_with('[') {
        // An IPv6 literal: keep the brackets, drop a port after them.
        raw.split_inclusive(']').next().unwrap_or(raw)
    } else {
        raw.split(':').next().unwrap_or(raw)
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underscored_spellings_of_our_headers_are_found() {
        for ours in [
            "x_real_ip",
            "x_forwarded_for",
            "x-forwarded_proto",
            "x_forwarded_host",
        ] {
            assert!(spoofs_ours(ours.as_bytes()), "{ours}");
        }
        for other in [
            "x-real-ip",
            "x_real_ips",
            "x_kept",
            "x_forwarded",
            "real_ip",
        ] {
            assert!(!spoofs_ours(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn trailers_lose_what_must_not_come_that_way() {
        let mut t = HeaderMap::new();
        for name in [
            "x-real-ip",
            "x_real_ip",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "host",
            "content-length",
            "connection",
            "transfer-encoding",
            "x-checksum",
        ] {
            t.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        clean_trailers(&mut t);
        let left: Vec<&str> = t.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-checksum"]);
    }

    #[test]
    fn only_a_lone_chunked_is_a_known_transfer_coding() {
        let with = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(http::header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            other_transfer_coding(&h)
        };
        assert!(!with(&[]));
        assert!(!with(&["chunked"]));
        assert!(!with(&[" Chunked "]));
        assert!(with(&["gzip, chunked"]));
        assert!(with(&["gzip"]));
        assert!(with(&["gzip", "chunked"]));
        assert!(!with(&[", chunked"]));
        assert!(!with(&["chunked,"]));
        assert!(with(&["chunked, chunked"]));
    }

    #[test]
    fn strips_listed_and_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret, Upgrade"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn appends_forwarded_for() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        h.insert(header::HOST, HeaderValue::from_static("chat.example.com"));
        let client = forwarded_for(IpAddr::from([3, 3, 3, 3]));
        add_forwarded(&mut h, &client, false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3");
        // An empty one from the client adds no empty entry.
        let mut empty = HeaderMap::new();
        empty.append("x-forwarded-for", HeaderValue::from_static(""));
        add_forwarded(&mut empty, &client, false);
        assert_eq!(empty["x-forwarded-for"], "3.3.3.3");
        for ip in ["0.0.0.0", "10.9.200.255", "127.0.0.1", "192.168.100.1"] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(forwarded_for(addr), ip);
        }
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(forwarded_for(mapped), "10.1.2.3");
        let mut first = HeaderMap::new();
        first.insert("x-forwarded-host", HeaderValue::from_static("made.up"));
        add_forwarded(&mut first, &forwarded_for("::1".parse().unwrap()), true);
        assert_eq!(first["x-forwarded-for"], "::1");
        assert_eq!(first["x-forwarded-proto"], "https");
        assert!(!first.contains_key("x-forwarded-host"));
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "chat.example.com");
    }

    #[test]
    fn an_absolute_target_names_the_host() {
        let uri = http::Uri::from_static("http://Abs.Example:8080/x");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("other.example"));
        assert_eq!(request_host(&h, &uri).as_deref(), Some("abs.example"));
        host_from_target(&mut h, &uri);
        assert_eq!(h[header::HOST], "Abs.Example:8080");
        let origin = http::Uri::from_static("/x");
        host_from_target(&mut h, &origin);
        assert_eq!(
            h[header::HOST],
            "Abs.Example:8080",
            "origin-form keeps Host"
        );
        let with_user = http::Uri::from_static("http://a.test@abs.example/");
        assert_eq!(request_host(&h, &with_user).as_deref(), Some("abs.example"));
        host_from_target(&mut h, &with_user);
        assert_eq!(h[header::HOST], "abs.example", "no user part in Host");
    }

    #[test]
    fn host_without_port() {
        let uri = http::Uri::from_static("/");
        let mut h = HeaderMap::new();
        for (raw, want) in [
            ("Chat.Example.com:8080", "chat.example.com"),
            ("[::1]:80", "[::1]"),
            ("a.b.", "a.b"),
        ] {
            h.insert(header::HOST, HeaderValue::from_static(raw));
            assert_eq!(request_host(&h, &uri).as_deref(), Some(want));
        }
        assert!(has_token(
            &{
                let mut h = HeaderMap::new();
                h.insert(
                    header::CONNECTION,
                    HeaderValue::from_static("keep-alive, UPGRADE"),
                );
                h
            },
            header::CONNECTION,
            "upgrade"
        ));
    }
}
