//! The WebSocket handshake on both sides: checking the client's request, building the
//! backend's, and checking the backend's 101.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use sha1::{Digest, Sha1};

use crate::headers::{
    connection_named_in, is_hop_by_hop, list_has, proto, spoofs_ours, target_host, XFF, XFH, XFP,
    XRI,
};
use crate::responses::{self, Body};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value that answers `key`.
pub fn accept_for(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    B64.encode(h.finalize())
}

/// What is wrong with a client's upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHandshake {
    Method,
    HttpVersion,
    /// Not `Sec-WebSocket-Version: 13`: answered 426 so the client can retry with 13.
    WebSocketVersion,
    Key,
    /// `Content-Length` other than 0, or `Transfer-Encoding`.
    Body,
}

impl BadHandshake {
    /// The response the client gets instead of an upgrade.
    pub fn response(self) -> Response<Body> {
        match self {
            BadHandshake::Method => responses::bad_handshake("the method must be GET"),
            BadHandshake::HttpVersion => responses::bad_handshake("the version must be HTTP/1.1"),
            BadHandshake::WebSocketVersion => responses::upgrade_required(),
            BadHandshake::Body => responses::bad_handshake("an upgrade request carries no body"),
            BadHandshake::Key => responses::bad_handshake(
                "exactly one Sec-WebSocket-Key, the base64 of 16 bytes, is required",
            ),
        }
    }
}

/// Checks the client's upgrade request; returns its key.
pub fn check_client<B>(req: &Request<B>) -> Result<HeaderValue, BadHandshake> {
    if req.method() != Method::GET {
        return Err(BadHandshake::Method);
    }
    if req.version() != Version::HTTP_11 {
        return Err(BadHandshake::HttpVersion);
    }
    let h = req.headers();
    // An upgrade request has no body; one that claims a body would leave the backend
    // waiting for bytes that never come.
    // Any spelling of zero the HTTP library let through (`00`, `0, 0`) is no body.
    let empty = h.get_all(header::CONTENT_LENGTH).iter().all(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .all(|n| n.trim().parse::<u64>().is_ok_and(|n| n == 0))
        })
    });
    if !empty || h.contains_key(header::TRANSFER_ENCODING) {
        return Err(BadHandshake::Body);
    }
    let mut versions = h.get_all("sec-websocket-version").iter();
    if !matches!((versions.next(), versions.next()), (Some(v), None) if v.as_bytes() == b"13") {
        return Err(BadHandshake::WebSocketVersion);
    }
    let mut keys = h.get_all("sec-websocket-key").iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err(BadHandshake::Key);
    };
    match B64.decode(key.as_bytes()) {
        Ok(raw) if raw.len() == 16 => Ok(key.clone()),
        _ => Err(BadHandshake::Key),
    }
}

/// The upgrade request to send to a backend, as the bytes of its head: path and query
/// unchanged, hop-by-hop headers replaced by the two the upgrade needs, `Host` kept (or
/// taken from an absolute-form target), `X-Forwarded-*` added. Written out directly rather
/// than built as a header map for an HTTP client: a handshake sends one request and reads
/// one answer on a connection of its own.
pub fn backend_request_head<B>(client: &Request<B>, peer: &HeaderValue, https: bool) -> Vec<u8> {
    let headers = client.headers();
    let named = connection_named_in(headers);
    let host = target_host(client.uri())
        .map(str::as_bytes)
        .or_else(|| headers.get(header::HOST).map(HeaderValue::as_bytes));
    let target = client.uri().path_and_query().map_or("/", |p| p.as_str());
    let size = 192
        + target.len()
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(b"GET ");
    if !target.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // One header line; several parts are joined with ", ".
    let mut line = |name: &[u8], value: &[&[u8]]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        for (i, part) in value.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(part);
        }
        out.extend_from_slice(b"\r\n");
    };
    if let Some(host) = host {
        line(b"host", &[host]);
    }
    // Written above or below, or (`Content-Length`) meaningless on an upgrade.
    let replaced = [header::HOST, header::CONTENT_LENGTH, XFF, XFP, XFH, XRI];
    for (name, value) in headers {
        let bytes = name.as_str().as_bytes();
        if !replaced.contains(name) && !is_hop_by_hop(bytes, &named) && !spoofs_ours(bytes) {
            line(name.as_str().as_bytes(), &[value.as_bytes()]);
        }
    }
    // As on the HTTP path: an X-Forwarded-For that the client's Connection names is
    // hop-by-hop, and the chain starts again with the client.
    let mut xff: Vec<&[u8]> = if is_hop_by_hop(XFF.as_str().as_bytes(), &named) {
        Vec::new()
    } else {
        crate::headers::forwarded_so_far(headers).collect()
    };
    xff.push(peer.as_bytes());
    line(XFF.as_str().as_bytes(), &xff);
    line(XRI.as_str().as_bytes(), &[peer.as_bytes()]);
    line(XFP.as_str().as_bytes(), &[proto(https).as_bytes()]);
    if let Some(host) = host {
        line(XFH.as_str().as_bytes(), &[host]);
    }
    line(b"connection", &[b"Upgrade"]);
    line(b"upgrade", &[b"websocket"]);
    out.extend_from_slice(b"\r\n");
    out
}

/// Checks a backend's 101, given its header lines as (name, value) bytes: it must upgrade
/// to websocket with the right accept value.
pub fn check_backend_101<'a>(
    lines: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    key: &HeaderValue,
) -> Result<(), &'static str> {
    let (mut upgrade, mut connection, mut accept) = (false, false, None);
    for (name, value) in lines {
        if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade |= list_has(value, b"websocket");
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection |= list_has(value, b"upgrade");
        } else if name.eq_ignore_ascii_case(b"sec-websocket-accept") {
            if accept.is_some() {
                return Err("more than one Sec-WebSocket-Accept");
            }
            accept = Some(value);
        }
    }
    if !upgrade {
        return Err("no Upgrade: websocket");
    }
    // RFC 6455 section 4.1: a client must fail the connection without it; duplex is the
    // backend's client.
    if !connection {
        return Err("no Connection: upgrade");
    }
    match accept {
        Some(v) if v == accept_for(key.as_bytes()).as_bytes() => Ok(()),
        Some(_) => Err("wrong Sec-WebSocket-Accept"),
        None => Err("no Sec-WebSocket-Accept"),
    }
}

/// The 101 to send the client: the backend's end-to-end headers (accept, subprotocol,
/// extensions, cookies), plus the two the upgrade needs.
pub fn client_101(mut end_to_end: HeaderMap) -> Response<Body> {
    end_to_end.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    end_to_end.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let mut r = responses::text(StatusCode::SWITCHING_PROTOCOLS, String::new());
    *r.headers_mut() = end_to_end;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_6455_example() {
        assert_eq!(
            accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn req(version: &str, key: &str) -> Request<()> {
        let mut r = Request::new(());
        r.headers_mut().insert(
            "sec-websocket-version",
            HeaderValue::from_str(version).unwrap(),
        );
        r.headers_mut()
            .insert("sec-websocket-key", HeaderValue::from_str(key).unwrap());
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("chat.example"));
        *r.version_mut() = Version::HTTP_11;
        r
    }

    #[test]
    fn refuses_bad_keys_and_versions() {
        assert!(check_client(&req("13", "dGhlIHNhbXBsZSBub25jZQ==")).is_ok());
        let bad = |v, k| check_client(&req(v, k)).unwrap_err();
        assert_eq!(
            bad("8", "dGhlIHNhbXBsZSBub25jZQ==").response().status(),
            426
        );
        assert_eq!(bad("13", "c2hvcnQ=").response().status(), 400);
        assert_eq!(bad("13", "!!!"), BadHandshake::Key);
        let mut with_body = req("13", "dGhlIHNhbXBsZSBub25jZQ==");
        with_body
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(check_client(&with_body).unwrap_err(), BadHandshake::Body);
        with_body
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert!(check_client(&with_body).is_ok());
        for zero in ["00", "0, 0"] {
            with_body
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static(zero));
            assert!(check_client(&with_body).is_ok(), "{zero}");
        }
        with_body
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0, 1"));
        assert_eq!(check_client(&with_body).unwrap_err(), BadHandshake::Body);
    }

    #[test]
    fn the_backend_request_head_is_rewritten_for_one_hop() {
        let mut r = Request::get("http://user@Abs.Example:8080/chat?room=1")
            .body(())
            .unwrap();
        let h = r.headers_mut();
        h.insert(header::HOST, HeaderValue::from_static("ignored.example"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, X-Hop"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static(" "));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2 "));
        h.insert("x-forwarded-proto", HeaderValue::from_static("ftp"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        h.insert("sec-websocket-key", HeaderValue::from_static("k"));
        let peer = HeaderValue::from_static("3.3.3.3");
        let head = String::from_utf8(backend_request_head(&r, &peer, true)).unwrap();
        assert_eq!(
            head,
            "GET /chat?room=1 HTTP/1.1\r\n\
             host: Abs.Example:8080\r\n\
             sec-websocket-key: k\r\n\
             x-forwarded-for: 1.1.1.1, 2.2.2.2, 3.3.3.3\r\n\
             x-real-ip: 3.3.3.3\r\n\
             x-forwarded-proto: https\r\n\
             x-forwarded-host: Abs.Example:8080\r\n\
             connection: Upgrade\r\n\
             upgrade: websocket\r\n\r\n"
        );
        // An X-Forwarded-For that Connection names is hop-by-hop: the chain starts again.
        let mut named = Request::get("/").body(()).unwrap();
        let h = named.headers_mut();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, X-Forwarded-For"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        let head = String::from_utf8(backend_request_head(&named, &peer, false)).unwrap();
        assert!(head.contains("\r\nx-forwarded-for: 3.3.3.3\r\n"), "{head}");
        assert!(!head.contains("6.6.6.6"), "{head}");

        let bare = Request::get("/").body(()).unwrap();
        let head = String::from_utf8(backend_request_head(&bare, &peer, false)).unwrap();
        assert_eq!(
            head,
            "GET / HTTP/1.1\r\nx-forwarded-for: 3.3.3.3\r\nx-real-ip: 3.3.3.3\r\n\
             x-forwarded-proto: http\r\n\
             connection: Upgrade\r\nupgrade: websocket\r\n\r\n"
        );
    }
}
