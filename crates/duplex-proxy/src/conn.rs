//! One accepted client connection: what every request on it knows, and how it is served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duplex_metrics::UpgradeResult;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::headers::{has_token, other_transfer_coding, request_host};
use crate::limits::Slot;
use crate::responses::{self, Body};
use crate::send_timeout::SendTimeout;
use crate::state::{OpenGauge, Shared};
use crate::tls::MaybeTls;
use crate::{http_proxy, router, upgrade};

/// Facts about a client connection, shared by its requests.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The listener's name as of the accept: routes may be limited to some listeners.
    pub listener: Arc<str>,
    /// The peer's address as `X-Forwarded-For` carries it, rendered once.
    pub forwarded_for: http::HeaderValue,
    /// Whether the client reached us over TLS, for `X-Forwarded-Proto`.
    pub https: bool,
    /// Plain HTTP gets a redirect to https on this port.
    pub redirect_https: Option<u16>,
    /// The listener's `client_body_timeout`.
    pub body_timeout: Duration,
    /// The connection's place among those a full cap may close while idle.
    pub idle: Arc<crate::reclaim::Conn>,
    /// Counts the connection in `duplex_connections_active`: while the HTTP connection
    /// lives, or, once upgraded, handed to the tunnel it became (so the tunnel does not
    /// keep this whole struct alive).
    active: Mutex<Option<ActiveGuard>>,
}

impl ConnInfo {
    /// Takes the connection's place in `duplex_connections_active`, for a tunnel.
    pub fn take_active(&self) -> Option<ActiveGuard> {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A connection's count in `duplex_connections_active` and its slot under the
/// `max_connections` caps, both given back on drop.
pub struct ActiveGuard {
    /// Also keeps the listener's series exported while the connection is open, even
    /// after a reload removed the listener.
    open: Arc<OpenGauge>,
    _slot: Slot,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.open.active.dec();
    }
}

/// Serves HTTP/1.1 on an accepted connection until it closes, is upgraded, or shutdown.
pub async fn serve(
    tcp: TcpStream,
    slot: Slot,
    peer: SocketAddr,
    listener: Arc<str>,
    bind: SocketAddr,
    shared: Arc<Shared>,
) {
    crate::connector::tune_accepted(&tcp);
    // The listener's settings as of now: a reload changes them for later connections.
    let Some(settings) = shared.table.load().listener_settings(&listener, bind) else {
        return;
    };
    settings.open.active.inc();
    let cap_listener = Arc::clone(slot.listener());
    let active = ActiveGuard {
        open: Arc::clone(&settings.open),
        _slot: slot,
    };
    // Registered from the accept (after `active`, so that leaving, it is out of the
    // registry before its slot wakes a waiting accept loop): the time a new connection
    // has to begin its first request, TLS handshake included, starts now.
    let registration = shared
        .limits
        .idle
        .register(cap_listener, settings.reclaimed.clone());
    // The write timeout sits on the socket: under TLS for a TLS client.
    let (timeout, expired) = (settings.send_timeout, settings.send_timeouts.clone());
    let stream = match &settings.tls {
        None => SendTimeout::new(MaybeTls::Plain(tcp), timeout, expired),
        Some(tls) => {
            // Armed once the handshake is done: until then its own timeout bounds it,
            // and a handshake stalled on a write is a failed handshake, not a send
            // timeout.
            let timed = SendTimeout::unarmed(tcp);
            let accept = TlsAcceptor::from(Arc::clone(&tls.config)).accept(timed);
            let accept = tokio::time::timeout(tls.handshake_timeout, accept);
            // A handshake under way is cut when shutdown begins (it asks every connection
            // to close) or when a full cap asks it to make room: it has sent no request.
            let handshake = tokio::select! {
                done = accept => done,
                _ = shared.closing.cancelled() => return,
                _ = registration.conn.asked_to_close() => return,
            };
            match handshake {
                Ok(Ok(mut s)) => {
                    s.get_mut().0.arm(timeout, expired);
                    SendTimeout::unarmed(MaybeTls::Tls(Box::new(s)))
                }
                Ok(Err(e)) => {
                    let reason = crate::tls::handshake_failure(&e);
                    shared
                        .metrics
                        .tls_handshake_errors
                        .with_label_values(&[&settings.name, reason])
                        .inc();
                    tracing::debug!(%peer, error = %e, reason, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    shared
                        .metrics
                        .tls_handshake_errors
                        .with_label_values(&[&settings.name, "timeout"])
                        .inc();
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let info = Arc::new(ConnInfo {
        peer,
        listener: Arc::from(settings.name.as_str()),
        forwarded_for: crate::headers::forwarded_for(peer.ip()),
        https: settings.tls.is_some(),
        redirect_https: settings.redirect_https,
        body_timeout: settings.body_timeout,
        idle: Arc::clone(&registration.conn),
        active: Mutex::new(Some(active)),
    });
    let svc_shared = Arc::clone(&shared);
    let svc = service_fn(move |req| {
        let mut unhandled = Unhandled {
            req: Some(req),
            info: Arc::clone(&info),
            shared: Arc::clone(&svc_shared),
        };
        async move {
            let req = unhandled.req.take().expect("taken on the first poll only");
            let (info, shared) = (&unhandled.info, &unhandled.shared);
            // Not idle while the request is handled; a relayed body holds its own mark
            // until it ends. (If the connection goes first, so does its place in the
            // registry.)
            info.idle.request_started();
            let response = handle(req, info, shared).await;
            info.idle.request_ended();
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    // Asked to close, by shutdown or by a full cap wanting the room of an idle
    // connection: an idle one closes at once, one with a request in progress after its
    // response.
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = registration.conn.asked_to_close() => {
            // A head begun and never finished (slowloris) would hold hyper's graceful
            // shutdown until the header timeout; before any request there is nothing to
            // finish. (The service marks a request begun in the poll that parses its
            // head, so one cannot be under way unseen here.)
            if registration.conn.never_began() {
                drop(registration);
                return;
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                res = conn.as_mut() => res,
                _ = shared.closing.cancelled() => Ok(()),
            }
        }
    };
    // Out of the registry before the connection's slot wakes a waiting accept loop, so
    // that the loop does not find it there, idle, and ask it to close.
    drop(registration);
    if let Err(e) = res {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// A request handed to the service, until its handling begins. hyper may drop it before
/// that: when the client's end (a close, a half-close) is read in the same pass as the
/// request, the connection fails and the request's future goes unpolled. An upgrade is
/// then still counted, with the result its handling would have begun with.
struct Unhandled {
    req: Option<Request<Incoming>>,
    info: Arc<ConnInfo>,
    shared: Arc<Shared>,
}

impl Drop for Unhandled {
    fn drop(&mut self) {
        if let Some(req) = &self.req {
            // (A redirecting listener answers upgrades with its own 426, uncounted.)
            if is_websocket_upgrade(req) && self.info.redirect_https.is_none() {
                upgrade::gone_unhandled(req, &self.info, &self.shared);
            }
        }
    }
}

/// Routes one request: a WebSocket upgrade or plain HTTP.
async fn handle(req: Request<Incoming>, info: &ConnInfo, shared: &Arc<Shared>) -> Response<Body> {
    // Before anything reads the host or path: routing, a redirect's Location.
    if let Err(bad) = crate::target::check(&req) {
        let table = shared.table.load();
        if is_websocket_upgrade(&req) {
            table.no_route.upgrade(UpgradeResult::BadHandshake).inc();
        } else {
            table.no_route.http(400).inc();
        }
        return responses::bad_request(bad.message());
    }
    if let Some(port) = info.redirect_https {
        return to_https(&req, port);
    }
    if is_websocket_upgrade(&req) {
        return upgrade::upgrade(req, info, shared).await;
    }
    let table = shared.table.load();
    // duplex does not tunnel arbitrary TCP: a CONNECT would reach a backend as a
    // malformed request.
    if req.method() == http::Method::CONNECT {
        table.no_route.http(501).inc();
        return responses::text(
            StatusCode::NOT_IMPLEMENTED,
            "duplex: CONNECT is not supported\n".into(),
        );
    }
    if other_transfer_coding(req.headers()) {
        table.no_route.http(501).inc();
        return responses::unknown_transfer_coding();
    }
    let host = request_host(req.headers(), req.uri());
    let Some((i, route)) = router::find(
        table.routes(),
        &info.listener,
        host.as_deref(),
        req.uri().path(),
        req.headers(),
    ) else {
        table.no_route.http(404).inc();
        return responses::no_route();
    };
    let (Some(up), Some(series)) = (
        table.upstreams.get(&route.upstream),
        table.route_series.get(i),
    ) else {
        return responses::bad_gateway(&route.name);
    };
    http_proxy::forward(req, info, route, up, series, shared).await
}

/// The answer of a `redirect_https` listener: 308 to the same host and path over https.
/// A WebSocket upgrade gets 426 instead: clients do not follow redirects on upgrades.
fn to_https(req: &Request<Incoming>, port: u16) -> Response<Body> {
    if is_websocket_upgrade(req) {
        return responses::upgrade_to(
            "TLS/1.3, TLS/1.2",
            "duplex: use wss:// on this host\n".into(),
        );
    }
    let Some(host) = request_host(req.headers(), req.uri()) else {
        return responses::text(
            StatusCode::BAD_REQUEST,
            "duplex: a Host header is required\n".into(),
        );
    };
    // `OPTIONS *` asks about the server, not a path: its https counterpart is `/`.
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .trim_start_matches('*');
    let path = if path.is_empty() { "/" } else { path };
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let mut r = responses::text(
        StatusCode::PERMANENT_REDIRECT,
        format!("duplex: moved to {location}\n"),
    );
    if let Ok(v) = http::HeaderValue::try_from(location) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

/// An upgrade to WebSocket per RFC 6455: `Connection` lists `upgrade` and `Upgrade` lists
/// `websocket`. Method and version are checked later, to answer 400 rather than proxy.
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    has_token(req.headers(), http::header::CONNECTION, "upgrade")
        && has_token(req.headers(), http::header::UPGRADE, "websocket")
}
