//! Checks a request's `Host` and path before routing, so that what routing sees is what
//! the backend will see: one well-formed host, and a path with no `.` or `..` segments
//! that a backend would resolve into another route's path.

use http::{header, Method, Request, Version};

use crate::headers::has_several_hosts;

/// Why a request's target is refused with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTarget {
    SeveralHosts,
    /// HTTP/1.1 without `Host` and without a host in the request target.
    NoHost,
    /// A `Host` that is not `host[:port]` (RFC 9110 section 7.2), such as
    /// `a.test:80@b.test`: a backend could read another host in it than routing did.
    InvalidHost,
    /// A `.` or `..` segment, written or percent-encoded: routing would match the path as
    /// written and a backend would resolve it to another one.
    DotSegment,
    /// A target in authority-form (`host:port`, which is CONNECT's alone) or asterisk-form
    /// (`*`, OPTIONS' alone) on another method (RFC 9112 sections 3.2.3 and 3.2.4): the
    /// authority would stand in for `Host`, unchecked by whatever checked `Host`.
    TargetForm,
    /// An absolute URL that is not `http` or `https`, or that carries a user name (RFC 9110
    /// section 4.2.4: `http://user@host` is to be refused): what a backend or a log makes
    /// of either is anyone's guess.
    AbsoluteUrl,
}

impl BadTarget {
    pub fn message(self) -> &'static str {
        match self {
            BadTarget::SeveralHosts => "only one Host header is allowed",
            BadTarget::NoHost => "a Host header is required",
            BadTarget::InvalidHost => {
                "the Host header must be a host name or address and an optional port"
            }
            BadTarget::DotSegment => "the path must not have . or .. segments",
            BadTarget::AbsoluteUrl => {
                "an absolute URL in the request target must be http or https, with no user name"
            }
            BadTarget::TargetForm => {
                "the request target must be a path or an absolute URL (host:port is for \
                 CONNECT, * for OPTIONS)"
            }
        }
    }
}

/// Checks the request's host and path.
pub fn check<B>(req: &Request<B>) -> Result<(), BadTarget> {
    let (uri, method) = (req.uri(), req.method());
    let authority_form = uri.scheme().is_none() && uri.authority().is_some();
    if (authority_form && method != Method::CONNECT)
        || (uri.path() == "*" && method != Method::OPTIONS)
    {
        return Err(BadTarget::TargetForm);
    }
    if let Some(scheme) = uri.scheme_str() {
        let web = scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https");
        if !web || uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(BadTarget::AbsoluteUrl);
        }
        // Its authority becomes the `Host` the backend gets: held to the same rules.
        if uri
            .authority()
            .is_some_and(|a| !valid_host(a.as_str().as_bytes()))
        {
            return Err(BadTarget::InvalidHost);
        }
    }
    let h = req.headers();
    if has_several_hosts(h) {
        return Err(BadTarget::SeveralHosts);
    }
    match h.get(header::HOST) {
        Some(v) if !valid_host(v.as_bytes()) => return Err(BadTarget::InvalidHost),
        Some(_) => {}
        // RFC 9112 section 3.2: an HTTP/1.1 request must name its host.
        None if req.version() == Version::HTTP_11 && req.uri().authority().is_none() => {
            return Err(BadTarget::NoHost)
        }
        None => {}
    }
    if has_dot_segment(req.uri().path()) {
        return Err(BadTarget::DotSegment);
    }
    Ok(())
}

/// `uri-host [":" port]` (RFC 3986 section 3.2.2): a name of unreserved characters and
/// sub-delimiters, or an IP literal in brackets (with an optional `%25` zone, RFC 6874),
/// then an optional port. Percent-escapes in a name are refused: no client sends them,
/// and a backend might decode them into another name. So is an empty name (RFC 9110
/// section 4.2.1: an http URI with an empty host is invalid).
fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = v.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let (address, zone) = match rest[..end].windows(3).position(|w| w == b"%25") {
            Some(i) => (&rest[..i], &rest[i + 3..end]),
            None => (&rest[..end], &[][..]),
        };
        let ok = !address.is_empty()
            && address
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && zone
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        if !ok {
            return false;
        }
        match &rest[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&[][..], port),
            _ => return false,
        }
    } else {
        let (name, port) = match v.iter().position(|&b| b == b':') {
            Some(i) => (&v[..i], &v[i + 1..]),
            None => (v, &[][..]),
        };
        if name.is_empty() {
            return false;
        }
        (name, port)
    };
    let name_ok = host
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b));
    // An empty port is allowed (`host:`); any other must be a number a port can be.
    let port_ok = port.is_empty()
        || (port.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(port).is_ok_and(|p| p.parse::<u16>().is_ok()));
    name_ok && port_ok
}

/// Whether `path` has a `.` or `..` segment once `%2e`, `%2f` and `%5c` are decoded,
/// backslashes taken as slashes and `;` parameters dropped (`..;x` is `..` to Tomcat,
/// Jetty and Spring), as backends read paths. A doubly encoded dot (`%252e`) is not
/// decoded: a backend decoding twice is out of reach of any proxy's check.
fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    if !bytes.iter().any(|&b| b == b'.' || b == b'%') {
        return false;
    }
    let mut segment_dots = 0usize;
    let mut segment_other = false;
    // Past a `;` in this segment: the rest of it is a parameter.
    let mut params = false;
    let mut i = 0;
    loop {
        let (b, next) = match bytes.get(i) {
            None => (b'/', i + 1),
            Some(b'%') => match bytes.get(i + 1..i + 3) {
                Some([b'2', b'e' | b'E']) => (b'.', i + 3),
                Some([b'2', b'f' | b'F']) => (b'/', i + 3),
                Some([b'5', b'c' | b'C']) => (b'/', i + 3),
                _ => (b'%', i + 1),
            },
            Some(b'\\') => (b'/', i + 1),
            Some(&b) => (b, i + 1),
        };
        match b {
            b'/' => {
                if !segment_other && (segment_dots == 1 || segment_dots == 2) {
                    return true;
                }
                if i >= bytes.len() {
                    return false;
                }
                segment_dots = 0;
                segment_other = false;
                params = false;
            }
            _ if params => {}
            b';' => params = true,
            b'.' => segment_dots += 1,
            _ => segment_other = true,
        }
        i = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http11_request_needs_a_host_in_the_header_or_the_target() {
        let mut req = Request::get("/ws").body(()).expect("a request");
        assert_eq!(check(&req), Err(BadTarget::NoHost));
        *req.uri_mut() = "http://chat.example/ws".parse().expect("a URI");
        assert_eq!(check(&req), Ok(()), "the host in the target will do");
        *req.version_mut() = Version::HTTP_10;
        *req.uri_mut() = "/ws".parse().expect("a URI");
        assert_eq!(check(&req), Ok(()), "HTTP/1.0 may leave it out");
    }

    #[test]
    fn absolute_urls_are_http_or_https_without_a_user() {
        let mut req = Request::get("/").body(()).expect("a request");
        for (url, ok) in [
            ("http://a.test/x", true),
            ("HTTPS://a.test/x", true),
            ("ftp://a.test/x", false),
            ("http://user:pw@a.test/x", false),
            ("http://@a.test/x", false),
        ] {
            *req.uri_mut() = url.parse().expect("a URI");
            let want = if ok {
                Ok(())
            } else {
                Err(BadTarget::AbsoluteUrl)
            };
            assert_eq!(check(&req), want, "{url}");
        }
        // The authority goes on as `Host`: it must be one.
        for url in ["http://:80/", "http://a.test:99999/"] {
            *req.uri_mut() = url.parse().expect("a URI the HTTP library reads");
            assert_eq!(check(&req), Err(BadTarget::InvalidHost), "{url}");
        }
        *req.uri_mut() = "http://[::1]:8080/x".parse().expect("a URI");
        assert_eq!(check(&req), Ok(()));
    }

    #[test]
    fn hosts() {
        for ok in [
            &b"a.test"[..],
            b"a.test:8080",
            b"A-b_c~1.test",
            b"127.0.0.1:80",
            b"[::1]",
            b"[::1]:443",
            b"[::ffff:10.0.0.1]:1",
            b"[fe80::1%25eth0]:80",
            b"a.test:65535",
            b"a.test:",
        ] {
            assert!(valid_host(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"public.test:80@admin.test"[..],
            b"public.test:admin.test",
            b"public.test:80/admin.test",
            b"public.test:80 admin.test",
            b"public.test:@admin.test",
            b"a.test/x",
            b"a test",
            b"[::1",
            b"[::1]x",
            b"[]",
            b"[::1]:80:80",
            b"a.test:123456",
            b"a.test:99999",
            b"a%2etest",
            b"[fe80::1%eth0]",
            b"[fe80::1%25eth 0]",
            b"a\\b",
            b"",
            b":80",
        ] {
            assert!(!valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn dot_segments() {
        for yes in [
            "/public/../admin",
            "/public/./../admin",
            "/public/%2e%2e/admin",
            "/public/%2E./admin",
            "/public/..%2fadmin",
            "/public/..%5cadmin",
            "/public/..;/admin",
            "/public/..;jsessionid=x/admin",
            "/public/.;x",
            "/public/..\\admin",
            "/public/..",
            "/public/.",
            "/./x",
            "..",
        ] {
            assert!(has_dot_segment(yes), "{yes}");
        }
        for no in [
            "/",
            "",
            "/public/a.b",
            "/public/...",
            "/public/.well-known/x",
            "/x..y/z",
            "/a%2Fb",
            "/100%",
            "/%2",
            "/file.",
            "/.hidden",
            "/a;..",
            "/a/b;v=1.2",
        ] {
            assert!(!has_dot_segment(no), "{no}");
        }
    }
}
