//! The responses duplex writes itself: errors in short plain text that name no internal address.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// Why a response body failed midway: the backend's connection, or duplex giving up.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the proxy returns.
pub type Body = BoxBody<Bytes, BodyError>;

pub fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn no_route() -> Response<Body> {
    text(
        StatusCode::NOT_FOUND,
        "duplex: no route matches this request\n".into(),
    )
}

pub fn bad_gateway(route: &str) -> Response<Body> {
    text(
        StatusCode::BAD_GATEWAY,
        format!(
            "duplex: route {route:?}: no backend could be reached, or the one reached failed \
             to answer (the log says which)\n"
        ),
    )
}

pub fn no_healthy_backend(route: &str) -> Response<Body> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("duplex: no healthy backend for route {route:?}\n"),
    )
}

/// A handshake whose backend was removed (its drain over) before the backend answered.
pub fn backend_removed(route: &str) -> Response<Body> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "duplex: route {route:?}: the backend was removed while the handshake was under \
             way; try again\n"
        ),
    )
}

/// A handshake answered after shutdown's grace ended, when every tunnel is closed.
pub fn shutting_down() -> Response<Body> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "duplex: shutting down\n".into(),
    )
}

/// The client stopped sending its request body for `client_body_timeout`.
pub fn body_stalled() -> Response<Body> {
    closing(text(
        StatusCode::REQUEST_TIMEOUT,
        "duplex: the request body stopped arriving\n".into(),
    ))
}

/// The client's request body broke off (the connection failed midway).
pub fn body_broken() -> Response<Body> {
    closing(text(
        StatusCode::BAD_REQUEST,
        "duplex: the request body broke off\n".into(),
    ))
}

/// A request in a transfer coding duplex cannot frame: its body is never read, so the
/// connection ends after the answer.
pub fn unknown_transfer_coding() -> Response<Body> {
    closing(text(
        StatusCode::NOT_IMPLEMENTED,
        "duplex: of the transfer codings, only chunked is supported\n".into(),
    ))
}

/// `r` with `Connection: close`: the connection ends after it (the rest of the request's
/// body will never be read), which a client must hear before it sends another request.
fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

pub fn gateway_timeout(route: &str) -> Response<Body> {
    text(
        StatusCode::GATEWAY_TIMEOUT,
        format!("duplex: the backend of route {route:?} did not answer in time\n"),
    )
}

/// A request refused before routing: `why` says what is wrong with it.
pub fn bad_request(why: &str) -> Response<Body> {
    text(StatusCode::BAD_REQUEST, format!("duplex: {why}\n"))
}

pub fn bad_handshake(why: &str) -> Response<Body> {
    text(
        StatusCode::BAD_REQUEST,
        format!("duplex: bad WebSocket handshake: {why}\n"),
    )
}

pub fn upgrade_required() -> Response<Body> {
    let mut r = upgrade_to(
        "websocket",
        "duplex: only WebSocket version 13 is supported\n".into(),
    );
    r.headers_mut()
        .insert("sec-websocket-version", HeaderValue::from_static("13"));
    r
}

/// 426 naming the protocols to move to in `Upgrade` (RFC 9110 section 15.5.22), with the
/// `upgrade` connection option that must come with it (section 7.8).
pub fn upgrade_to(protocols: &'static str, body: String) -> Response<Body> {
    let mut r = text(StatusCode::UPGRADE_REQUIRED, body);
    let h = r.headers_mut();
    h.insert(http::header::UPGRADE, HeaderValue::from_static(protocols));
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    r
}
