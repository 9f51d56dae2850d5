//! Forwards plain HTTP requests over pooled keep-alive connections, bodies streamed both ways.

use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use duplex_balance::LoadGuard;
use duplex_config::Route;
use duplex_metrics::RouteSeries;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::conn::ConnInfo;
use crate::error::ProxyError;
use crate::headers::{add_forwarded, host_from_target, other_transfer_coding, strip_hop_by_hop};
use crate::http_pool::{Lease, Uploaded};
use crate::idle::IdleTimer;
use crate::reclaim::Busy;
use crate::responses::{self, Body, BodyError};
use crate::state::{Shared, UpstreamRt};

/// A client's request body on its way to a backend.
///
/// The body fails when the client sends nothing of it for the listener's
/// `client_body_timeout`: once the backend has answered, no other timer covers a client
/// that trickles a body, and it would hold the backend connection for as long as it likes.
pub struct ClientBody {
    /// `None` for a request sent again without a body.
    body: Option<Incoming>,
    timer: IdleTimer,
    /// For a body still to come: when it last gave bytes to the backend.
    uploaded: Option<Arc<Uploaded>>,
}

impl ClientBody {
    fn new(body: Incoming, idle: Duration) -> ClientBody {
        let uploaded = (!body.is_end_stream()).then(|| Arc::new(Uploaded::new()));
        ClientBody {
            body: Some(body),
            timer: IdleTimer::new(idle),
            uploaded,
        }
    }

    /// No body at all.
    pub fn empty() -> ClientBody {
        ClientBody {
            body: None,
            timer: IdleTimer::new(Duration::ZERO),
            uploaded: None,
        }
    }
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = poll_watched(
            body,
            &mut this.timer,
            cx,
            |e| ProxyError::Client(e).into(),
            |idle| ProxyError::ClientBodyStalled { idle },
        );
        let frame = frame.map_ok(|mut f| {
            if let Some(t) = f.trailers_mut() {
                crate::headers::clean_trailers(t);
            }
            f
        });
        if let Some(u) = &this.uploaded {
            match &frame {
                Poll::Ready(Some(Ok(_))) => u.mark(),
                Poll::Ready(None) => u.client_pending(false),
                Poll::Pending => u.client_pending(true),
                Poll::Ready(Some(Err(_))) => {}
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Polls `body` for its next frame; its errors go through `failed`, and it fails with
/// `stalled(idle)` once it has had to wait `timer`'s idle time since its last frame.
fn poll_watched(
    body: &mut Incoming,
    timer: &mut IdleTimer,
    cx: &mut Context<'_>,
    failed: fn(hyper::Error) -> BodyError,
    stalled: fn(Duration) -> ProxyError,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    match Pin::new(body).poll_frame(cx) {
        Poll::Ready(frame) => {
            timer.moved();
            Poll::Ready(frame.map(|f| f.map_err(failed)))
        }
        Poll::Pending if timer.expired(cx) => Poll::Ready(Some(Err(stalled(timer.idle()).into()))),
        Poll::Pending => Poll::Pending,
    }
}

/// A response body that holds the backend's load count and its connection, and keeps the
/// client connection from counting as idle, until the body is done; it fails when the
/// backend sends nothing for `idle` (a backend that stalls mid-body must not hold the
/// client, the load count and the connection forever).
struct Guarded {
    inner: Incoming,
    _load: LoadGuard,
    _busy: Busy,
    timer: IdleTimer,
    /// The pooled connection, back to the pool when the body is done with (none for a
    /// refused upgrade, read over a connection of its own).
    _lease: Option<Lease>,
    /// For the log line when the body fails.
    backend: SocketAddr,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let frame = poll_watched(
            &mut this.inner,
            &mut this.timer,
            cx,
            BodyError::from,
            |idle| ProxyError::BodyStalled { idle },
        );
        if let Poll::Ready(Some(Err(e))) = &frame {
            // The client's response ends short (or, before any byte of it went out,
            // with no response at all): said where an operator looks.
            tracing::warn!(backend = %this.backend, error = %crate::error::Chain(e.as_ref()), "response body from the backend failed; the client's response is cut short");
            this._load.backend().count_response_error();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a backend's response cannot be passed on as it was meant; the client gets 502.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Unrelayable {
    #[error("backend answered with a transfer coding other than chunked")]
    TransferCoding,
    /// RFC 9110 section 15.2.2: a server switches only to a protocol the client asked for,
    /// and a plain request asked for none.
    #[error("backend answered 101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedSwitch,
}

/// Relays a backend's response to a request that is not an upgrade (or whose upgrade
/// the backend refused): hop-by-hop headers removed, load, `busy` and the connection
/// held until the body ends, the body failing if the backend goes quiet for `idle`.
pub fn relay(
    resp: Response<Incoming>,
    backend: SocketAddr,
    load: LoadGuard,
    busy: Busy,
    idle: Duration,
    lease: Option<Lease>,
) -> Result<Response<Body>, Unrelayable> {
    let (mut parts, body) = resp.into_parts();
    if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(Unrelayable::UnaskedSwitch);
    }
    if parts.headers.contains_key(http::header::TRANSFER_ENCODING) {
        // A response without a body (to HEAD, a 204, a 304) has nothing to decode.
        if !body.is_end_stream() && other_transfer_coding(&parts.headers) {
            return Err(Unrelayable::TransferCoding);
        }
        // RFC 9112 section 6.3: the chunked framing wins over a Content-Length sent
        // beside it, which must not be passed on (the client would frame the body by it).
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    // RFC 9110 section 8.6: a list of one length repeated (`2, 2`, or two lines) goes on
    // as that one value. One whose values differ (which hyper does not check where it
    // frames no body by it: HEAD, 204, 304) is not passed on at all.
    let lengths = parts.headers.get_all(http::header::CONTENT_LENGTH);
    if lengths.iter().count() > 1 || lengths.iter().any(|v| v.as_bytes().contains(&b',')) {
        let mut values = lengths
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(|v| {
                std::str::from_utf8(v.trim_ascii())
                    .ok()?
                    .parse::<u64>()
                    .ok()
            });
        let first = values.next().flatten();
        let same = first.filter(|&n| values.all(|v| v == Some(n)));
        parts.headers.remove(http::header::CONTENT_LENGTH);
        if let Some(n) = same {
            parts.headers.insert(http::header::CONTENT_LENGTH, n.into());
        }
    }
    // RFC 9110 section 15.5.22: a 426 says in `Upgrade` which protocols would do, for the
    // client to act on; that header is not this hop's alone.
    let upgrade_to = (parts.status == http::StatusCode::UPGRADE_REQUIRED)
        .then(|| parts.headers.get(http::header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocols) = upgrade_to {
        parts.headers.insert(http::header::UPGRADE, protocols);
        let option = http::HeaderValue::from_static("upgrade");
        parts.headers.insert(http::header::CONNECTION, option);
    }
    // RFC 9110 section 6.2: a proxy sends its own version, whatever the backend's was.
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        Guarded {
            inner: body,
            _load: load,
            _busy: busy,
            timer: IdleTimer::new(idle),
            _lease: lease,
            backend,
        }
        .boxed(),
    ))
}

/// How one try at a backend ended.
enum Attempt {
    Answered(Response<Incoming>, Lease),
    /// No connection: the request comes back unsent.
    ConnectFailed(io::Error, Request<ClientBody>),
    /// The connection closed before any of the request went out; `reused` says whether
    /// it came from the pool.
    Unsent {
        error: hyper::Error,
        req: Request<ClientBody>,
        reused: bool,
    },
    /// The request went out (some of it at least) and failed; `reused` as for `Unsent`.
    Failed {
        error: hyper::Error,
        reused: bool,
    },
    TimedOut,
    /// No response in time, while the client had not sent the rest of its body: the
    /// client's stall, not the backend's.
    ClientStalled,
}

/// Sends `req` to `addr` over an idle pooled connection (unless `fresh`) or a new one,
/// and waits for the response head until the upstream's `response_timeout` after
/// `tried` or after the request body's last bytes, whichever is later.
async fn attempt(
    up: &UpstreamRt,
    addr: SocketAddr,
    req: Request<ClientBody>,
    fresh: bool,
    tried: tokio::time::Instant,
) -> Attempt {
    let uploaded = req.body().uploaded.clone();
    let exchange = async {
        let pooled = if fresh { None } else { up.http.take(addr) };
        let mut lease = match pooled {
            Some(l) => l,
            None => match up.http.connect(addr).await {
                Ok(l) => l,
                Err(e) => return Attempt::ConnectFailed(e, req),
            },
        };
        lease.uploading(req.body().uploaded.clone(), up.cfg.response_timeout);
        match lease.send(req).await {
            Ok(resp) => Attempt::Answered(resp, lease),
            Err(mut e) => match e.take_message() {
                Some(req) => Attempt::Unsent {
                    error: e.into_error(),
                    req,
                    reused: lease.reused(),
                },
                None => Attempt::Failed {
                    error: e.into_error(),
                    reused: lease.reused(),
                },
            },
        }
    };
    let wait = up.cfg.response_timeout;
    let mut exchange = pin!(exchange);
    let mut deadline = tried + wait;
    loop {
        match tokio::time::timeout_at(deadline, &mut exchange).await {
            Ok(done) => return done,
            // Body bytes went out since the deadline was set: the wait restarts from them.
            Err(_) => match uploaded.as_deref() {
                Some(u) if u.last() + wait > deadline => deadline = u.last() + wait,
                Some(u) if u.client_stalled() => return Attempt::ClientStalled,
                _ => return Attempt::TimedOut,
            },
        }
    }
}

/// Proxies one plain HTTP request to the route's upstream, trying further backends while
/// the request is still unsent (a failed connect, a pooled connection found closed), and
/// sending an idempotent request without a body once more when a kept-alive connection
/// closes before the answer.
pub async fn forward(
    req: Request<Incoming>,
    conn: &ConnInfo,
    route: &Route,
    up: &UpstreamRt,
    series: &RouteSeries,
    shared: &Shared,
) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    host_from_target(&mut parts.headers, &parts.uri);
    add_forwarded(&mut parts.headers, &conn.forwarded_for, conn.https);
    let end = body.is_end_stream();
    if !end && body.size_hint().exact().is_none() {
        // A chunked body (its Transfer-Encoding went with the hop-by-hop headers) goes on
        // chunked: hyper's client would otherwise send a GET or HEAD of unknown length
        // with no body at all.
        parts.headers.insert(
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("chunked"),
        );
    }
    // A request without Host (HTTP/1.0) gets the backend's address, as the target it is
    // sent to.
    let has_host = parts.headers.contains_key(HOST);
    let m = &shared.metrics;
    let mut resp = None;
    let candidates = {
        let ctx = duplex_balance::Context {
            client_ip: conn.peer.ip(),
            headers: &parts.headers,
            query: parts.uri.query(),
        };
        up.pool.candidates(&ctx, up.cfg.retries as usize + 1)
    };
    if candidates.is_empty() {
        // Every backend is out of service and panic_mode is closed.
        resp = Some(responses::no_healthy_backend(&route.name));
    }
    // A request that can be sent again as it was: idempotent (RFC 9110 section 9.2.2),
    // and no body that the first try may have used up. Its copy is kept for that.
    let again = (end && parts.method.is_idempotent()).then(|| parts.clone());
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    let mut out = Request::from_parts(parts, ClientBody::new(body, conn.body_timeout));
    'candidates: for backend in candidates {
        let addr = backend.state.addr;
        let load = backend.state.guard();
        if !has_host {
            if let Ok(v) = HeaderValue::from_str(backend.state.authority.as_str()) {
                out.headers_mut().insert(HOST, v);
            }
        }
        // A resend shares the attempt's `response_timeout`: it never doubles the wait.
        let tried = tokio::time::Instant::now();
        // After a pooled connection turned out closed: a new one.
        let mut fresh = false;
        loop {
            match attempt(up, addr, out, fresh, tried).await {
                Attempt::Answered(r, lease) => {
                    let busy = conn.idle.busy();
                    match relay(r, addr, load, busy, up.cfg.response_timeout, Some(lease)) {
                        Ok(r) => {
                            backend.state.record_success();
                            resp = Some(r);
                        }
                        Err(e) => {
                            crate::health::passive_failure(shared, up, &backend.state);
                            tracing::warn!(route = %route.name, backend = %addr, error = %e, "backend answer refused");
                        }
                    }
                    break 'candidates;
                }
                Attempt::ConnectFailed(e, req) => {
                    if !crate::connector::is_local_exhaustion(&e) {
                        crate::health::passive_failure(shared, up, &backend.state);
                    }
                    let kind = crate::error::connect_kind(&e);
                    m.backend_connect_errors
                        .with_label_values(&[&up.cfg.name, &addr.to_string(), kind])
                        .inc();
                    tracing::warn!(route = %route.name, backend = %addr, error = %e, "connect to backend failed");
                    out = req;
                    continue 'candidates;
                }
                Attempt::Unsent { error, req, reused } => {
                    out = req;
                    if reused && !fresh {
                        // The backend closed it while it sat idle: a new connection, and
                        // nothing counted against the backend.
                        tracing::debug!(route = %route.name, backend = %addr, error = %crate::error::Chain(&error), "pooled connection closed before the request went out");
                        fresh = true;
                        continue;
                    }
                    // A new connection the backend closed at once: a failed connection,
                    // counted as one; the request is still unsent, so the next backend.
                    crate::health::passive_failure(shared, up, &backend.state);
                    // A TLS 1.3 refusal of our certificate can land here too.
                    let kind = crate::error::connect_kind(&error);
                    m.backend_connect_errors
                        .with_label_values(&[&up.cfg.name, &addr.to_string(), kind])
                        .inc();
                    tracing::warn!(route = %route.name, backend = %addr, error = %crate::error::Chain(&error), "backend closed a new connection before the request went out");
                    continue 'candidates;
                }
                Attempt::Failed { error: e, reused } => {
                    // The client's side of the exchange, not the backend: its body stalled
                    // or broke off while being forwarded.
                    if let Some(client) = crate::error::client_side(&e) {
                        tracing::debug!(route = %route.name, backend = %addr, error = %client, "request body from the client failed");
                        resp = Some(match client {
                            ProxyError::ClientBodyStalled { .. } => responses::body_stalled(),
                            _ => responses::body_broken(),
                        });
                        break 'candidates;
                    }
                    let closed = crate::error::closed_before_response(&e);
                    // A pooled connection the backend closed as the request went out (its
                    // keep-alive timeout, shorter than ours): once more to the same
                    // backend on a new connection, as nginx does, and not counted
                    // against it.
                    if closed && reused {
                        if let Some(p) = &again {
                            tracing::debug!(route = %route.name, backend = %addr, error = %crate::error::Chain(&e), "backend closed a pooled connection before answering; sending again");
                            out = resend(p.clone(), has_host, backend.state.authority.as_str());
                            // Its other idle connections may have timed out alike.
                            fresh = true;
                            continue;
                        }
                    }
                    // A TLS failure before any answer: under TLS 1.3 a backend refuses
                    // our client certificate only after our side of the handshake is
                    // done, so the refusal comes with the first read. A failed connect
                    // in all but timing: counted and held against the backend, and an
                    // idempotent request without a body goes to the next one.
                    if crate::error::connect_kind(&e) == "tls" {
                        crate::health::passive_failure(shared, up, &backend.state);
                        m.backend_connect_errors
                            .with_label_values(&[&up.cfg.name, &addr.to_string(), "tls"])
                            .inc();
                        tracing::warn!(route = %route.name, backend = %addr, error = %crate::error::Chain(&e), "TLS with the backend failed before its answer");
                        if let Some(p) = &again {
                            out = resend(p.clone(), has_host, backend.state.authority.as_str());
                            continue 'candidates;
                        }
                        break 'candidates;
                    }
                    // A new connection the backend closed or reset before answering:
                    // counted as a failed connection, as for an upgrade, though not held
                    // against its passive health (it may be refusing this one request,
                    // and a client must not be able to get backends ejected that way).
                    // An idempotent request without a body goes to the next backend, as
                    // nginx's `proxy_next_upstream error` sends it.
                    if closed && !reused {
                        m.backend_connect_errors
                            .with_label_values(&[
                                &up.cfg.name,
                                &addr.to_string(),
                                crate::error::connect_kind(&e),
                            ])
                            .inc();
                        let resent = again.is_some();
                        tracing::warn!(route = %route.name, backend = %addr, error = %crate::error::Chain(&e), resent, "backend closed a new connection before answering");
                        if let Some(p) = &again {
                            out = resend(p.clone(), has_host, backend.state.authority.as_str());
                            continue 'candidates;
                        }
                        break 'candidates;
                    }
                    tracing::warn!(route = %route.name, backend = %addr, error = %crate::error::Chain(&e), "backend request failed");
                    break 'candidates;
                }
                Attempt::ClientStalled => {
                    tracing::debug!(route = %route.name, backend = %addr, "request body from the client stalled; no response yet");
                    resp = Some(responses::body_stalled());
                    break 'candidates;
                }
                Attempt::TimedOut => {
                    tracing::warn!(route = %route.name, backend = %addr, "backend response timed out");
                    resp = Some(responses::gateway_timeout(&route.name));
                    break 'candidates;
                }
            }
        }
    }
    let resp = resp.unwrap_or_else(|| responses::bad_gateway(&route.name));
    series.http(resp.status().as_u16()).inc();
    series.http_duration.observe(start.elapsed().as_secs_f64());
    resp
}

/// The request target as a backend gets it: path and query only (origin-form). (`OPTIONS
/// http://host` goes on as `OPTIONS /`, not `*`: the URI parser gives an empty path as `/`.)
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(p) => Uri::from(p.clone()),
        None => Uri::from_static("/"),
    }
}

/// The request once more, from the copy kept of its head, without a body.
fn resend(mut parts: http::request::Parts, has_host: bool, authority: &str) -> Request<ClientBody> {
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    if !has_host {
        if let Ok(v) = HeaderValue::from_str(authority) {
            parts.headers.insert(HOST, v);
        }
    }
    Request::from_parts(parts, ClientBody::empty())
}
