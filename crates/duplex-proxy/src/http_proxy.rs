//! Forwards plain HTTP requests over pooled keep-alive connections, bodies streamed both ways.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use duplex_balance::LoadGuard;
use duplex_config::Route;
use duplex_metrics::RouteSeries;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::conn::ConnInfo;
use crate::error::ProxyError;
use crate::headers::{add_forwarded, host_from_target, strip_hop_by_hop};
use crate::idle::IdleTimer;
use crate::reclaim::Busy;
use crate::responses::{self, Body, BodyError};
use crate::state::{Shared, UpstreamRt};

/// A request body that can be handed to another backend as long as nobody has read it.
///
/// The pooled client drops the request when a connect fails. The body itself waits in a
/// shared slot until the client first polls it, which happens only once a connection is
/// up; if the slot is still full after a failure, nothing was sent and a retry may take it.
///
/// The body fails when the client sends nothing of it for the listener's
/// `client_body_timeout`: once the backend has answered, no other timer covers a client
/// that trickles a body, and it would hold the backend connection for as long as it likes.
pub struct ReclaimBody {
    slot: Arc<Mutex<Option<Incoming>>>,
    body: Option<Incoming>,
    /// Read from the original body before it went into the slot.
    end: bool,
    hint: SizeHint,
    timer: IdleTimer,
}

impl HttpBody for ReclaimBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.body.is_none() {
            this.body = this.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        match this.body.as_mut() {
            Some(body) => poll_watched(
                body,
                &mut this.timer,
                cx,
                |e| ProxyError::Client(e).into(),
                |idle| ProxyError::ClientBodyStalled { idle },
            ),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().map_or(self.end, |b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| self.hint, |b| b.size_hint())
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

/// A response body that holds the backend's load count, and keeps the client connection
/// from counting as idle, until the body is done; it fails when the backend sends nothing
/// for `idle` (a backend that stalls mid-body must not hold the client, the load count
/// and the connection forever).
struct Guarded {
    inner: Incoming,
    _load: LoadGuard,
    _busy: Busy,
    timer: IdleTimer,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        poll_watched(
            &mut this.inner,
            &mut this.timer,
            cx,
            BodyError::from,
            |idle| ProxyError::BodyStalled { idle },
        )
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Relays a backend's response: hop-by-hop headers removed, load and `busy` held until the
/// body ends, the body failing if the backend goes quiet for `idle`.
pub fn relay(
    resp: Response<Incoming>,
    load: LoadGuard,
    busy: Busy,
    idle: Duration,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(
        parts,
        Guarded {
            inner: body,
            _load: load,
            _busy: busy,
            timer: IdleTimer::new(idle),
        }
        .boxed(),
    )
}

/// Proxies one plain HTTP request to the route's upstream, trying further backends on
/// connect failure while the request is still unsent, and sending an idempotent request
/// without a body once more when a kept-alive connection closes before the answer.
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
    let (end, hint) = (body.is_end_stream(), body.size_hint());
    if !end && hint.exact().is_none() {
        // A chunked body (its Transfer-Encoding went with the hop-by-hop headers) goes on
        // chunked: hyper's client would otherwise send a GET or HEAD of unknown length
        // with no body at all.
        parts.headers.insert(
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("chunked"),
        );
    }
    let slot = Arc::new(Mutex::new(Some(body)));
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let ctx = duplex_balance::Context {
        client_ip: conn.peer.ip(),
        headers: &parts.headers,
        query: parts.uri.query(),
    };
    let m = &shared.metrics;
    let mut resp = None;
    let candidates = up.pool.candidates(&ctx, up.cfg.retries as usize + 1);
    if candidates.is_empty() {
        // Every backend is out of service and panic_mode is closed.
        resp = Some(responses::no_healthy_backend(&route.name));
    }
    let attempts = candidates.len();
    // A request that can be sent again as it was: idempotent (RFC 9110 section 9.2.2),
    // and no body that the first try may have used up.
    let mut resend = end && parts.method.is_idempotent();
    'candidates: for (attempt, backend) in candidates.into_iter().enumerate() {
        let addr = backend.state.addr;
        let load = backend.state.guard();
        let Ok(uri) = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(backend.state.authority.clone())
            .path_and_query(path.clone())
            .build()
        else {
            break;
        };
        // A resend shares the attempt's `response_timeout`: it never doubles the wait.
        let tried = Instant::now();
        loop {
            let mut out = Request::new(ReclaimBody {
                slot: Arc::clone(&slot),
                body: None,
                end,
                hint,
                timer: IdleTimer::new(conn.body_timeout),
            });
            *out.method_mut() = parts.method.clone();
            *out.uri_mut() = uri.clone();
            *out.version_mut() = Version::HTTP_11;
            // The last attempt takes the headers; others keep a copy for the next one.
            *out.headers_mut() = if attempt + 1 == attempts && !resend {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
            let left = up.cfg.response_timeout.saturating_sub(tried.elapsed());
            match tokio::time::timeout(left, up.client.request(out)).await {
                Ok(Ok(r)) => {
                    backend.state.record_success();
                    let busy = conn.idle.busy();
                    resp = Some(relay(r, load, busy, up.cfg.response_timeout));
                    break 'candidates;
                }
                Ok(Err(e)) if e.is_connect() => {
                    if !crate::error::io_source(&e)
                        .is_some_and(crate::connector::is_local_exhaustion)
                    {
                        crate::health::passive_failure(shared, up, &backend.state);
                    }
                    let kind = crate::error::connect_kind(&e);
                    m.backend_connect_errors
                        .with_label_values(&[&up.cfg.name, &addr.to_string(), kind])
                        .inc();
                    tracing::warn!(route = %route.name, backend = %addr, error = %crate::error::Chain(&e), "connect to backend failed");
                    let unsent = slot.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                    if !unsent {
                        break 'candidates;
                    }
                    continue 'candidates;
                }
                Ok(Err(e)) => {
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
                    // A pooled connection the backend closed as the request went out (its
                    // keep-alive timeout, shorter than ours): once more to the same
                    // backend, as nginx does, and not counted against it.
                    if resend && crate::error::closed_before_response(&e) {
                        resend = false;
                        tracing::debug!(route = %route.name, backend = %addr, error = %crate::error::Chain(&e), "backend closed the connection before answering; sending again");
                        continue;
                    }
                    tracing::warn!(route = %route.name, backend = %addr, error = %crate::error::Chain(&e), "backend request failed");
                    break 'candidates;
                }
                Err(_) => {
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
