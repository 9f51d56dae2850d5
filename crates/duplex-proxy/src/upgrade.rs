//! The WebSocket upgrade path, in one function: detect, pick, forward the handshake, check
//! the 101, spawn the tunnel and register it with the task tracker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use duplex_balance::{Backend, LoadGuard};
use duplex_metrics::{RouteSeries, UpgradeResult};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::conn::ConnInfo;
use crate::connector::connect;
use crate::error::{connect_kind, ProxyError};
use crate::handshake::{backend_request_head, check_client, client_101};
use crate::handshake_io::{self, Answer};
use crate::headers::request_host;
use crate::http_proxy::relay;
use crate::responses::{self, Body};
use crate::state::{Shared, Table, UpstreamRt};
use crate::tls::BackendStream;
use crate::{router, tunnel};

pub async fn upgrade(
    mut req: Request<Incoming>,
    conn: &ConnInfo,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let start = Instant::now();
    let table = shared.table.load_full();
    let (counters, admitted) = admit(&table, &req, conn);
    let mut outcome = Outcome {
        counters,
        closing: &shared.closing,
        counted: false,
    };
    // Refuse a broken handshake, or one with nowhere to go, before touching a backend.
    let (key, route, up) = match admitted {
        Ok(admitted) => admitted,
        Err(refused) => {
            outcome.count(refused.result());
            return refused.response();
        }
    };

    // Pick and connect, taking the next candidate on connect failure.
    let ctx = duplex_balance::Context {
        client_ip: conn.peer.ip(),
        headers: req.headers(),
        query: req.uri().query(),
    };
    let candidates = up.pool.candidates(&ctx, up.cfg.retries as usize + 1);
    if candidates.is_empty() {
        // Every backend is out of service and panic_mode is closed.
        outcome.count(UpgradeResult::NoBackend);
        return responses::no_healthy_backend(&route.name);
    }
    // Forward the handshake and wait for the answer, bounded by handshake_timeout. A
    // backend that closes the connection unanswered (at its own connection limit, say)
    // gets the handshake sent to the next candidate: the client has seen nothing yet. It
    // is counted, but not against the backend's health: a backend may also close on a
    // request it refuses (failed authentication), and clients must not be able to get
    // backends ejected that way.
    let head = backend_request_head(&req, &conn.forwarded_for, conn.https);
    let mut rest = &candidates[..];
    let (answer, backend, load) = loop {
        let Some((stream, backend, load, tried)) = connect_first(rest, up, shared).await else {
            outcome.count(UpgradeResult::ConnectError);
            return responses::bad_gateway(&route.name);
        };
        rest = &rest[tried..];
        let addr = backend.state.addr;
        match tokio::time::timeout(
            up.cfg.handshake_timeout,
            handshake_io::exchange(stream, &head, &key, &shared.tracker),
        )
        .await
        {
            Err(_) => {
                tracing::warn!(route = %route.name, backend = %addr, "backend did not answer the upgrade in time");
                crate::health::passive_failure(shared, up, &backend.state);
                outcome.count(UpgradeResult::Timeout);
                return responses::gateway_timeout(&route.name);
            }
            Ok(Err(failed)) => {
                let unanswered = failed.unanswered;
                let err = ProxyError::Handshake {
                    addr,
                    source: failed.source,
                };
                if unanswered {
                    // A TLS failure (under TLS 1.3, a refused client certificate shows
                    // only now) is the backend's, like a failed connect; a plain close is
                    // not: a backend may close on an upgrade it refuses, and clients must
                    // not be able to get backends ejected that way.
                    let kind = crate::error::connect_kind(&err);
                    if kind == "tls" {
                        crate::health::passive_failure(shared, up, &backend.state);
                    }
                    count_connect_error(shared, up, addr, kind);
                    if !rest.is_empty() {
                        tracing::warn!(upstream = %up.cfg.name, error = %err, "trying the next backend");
                        continue;
                    }
                }
                tracing::warn!(route = %route.name, error = %err, "upgrade failed");
                outcome.count(UpgradeResult::ConnectError);
                return responses::bad_gateway(&route.name);
            }
            Ok(Ok(answer)) => break (answer, backend, load),
        }
    };
    let addr = backend.state.addr;

    // A valid 101 opens the tunnel; any other answer goes to the client as a normal
    // response; a 101 that is not a WebSocket handshake gets a 502. An answer relayed is
    // a success for passive health; one refused is the backend's failure, as on the HTTP
    // path: no client request makes a backend answer in a framing duplex cannot relay, or
    // with a 101 that does not complete the handshake it was sent.
    let (end_to_end, backend_side, early) = match answer {
        Answer::Switching {
            end_to_end,
            stream,
            early,
        } => (end_to_end, stream, early),
        Answer::Other(resp) => {
            outcome.count(UpgradeResult::RejectedByBackend);
            let busy = conn.idle.busy();
            return match relay(resp, addr, load, busy, up.cfg.response_timeout, None) {
                Ok(resp) => {
                    backend.state.record_success();
                    resp
                }
                Err(e) => {
                    crate::health::passive_failure(shared, up, &backend.state);
                    tracing::warn!(route = %route.name, backend = %addr, error = %e, "backend answer refused");
                    responses::bad_gateway(&route.name)
                }
            };
        }
        Answer::Invalid(what) => {
            crate::health::passive_failure(shared, up, &backend.state);
            tracing::warn!(route = %route.name, error = %ProxyError::BadUpgrade { addr, what }, "refusing backend's 101");
            outcome.count(UpgradeResult::RejectedByBackend);
            return responses::bad_gateway(&route.name);
        }
    };
    backend.state.record_success();

    // Spawn the tunnel; it starts once hyper has written our 101 to the client.
    let client_side = hyper::upgrade::on(&mut req);
    let (close, label) = up.closer(addr);
    if close.is_cancelled() {
        // A 101 would open a tunnel closed at once. Shutdown's grace has ended (it closes
        // every tunnel): not counted, as for a connection it cuts.
        if shared.closing.is_cancelled() {
            outcome.counted = true;
            return responses::shutting_down();
        }
        // The backend's drain ended while its handshake was under way: a reload removed it.
        tracing::info!(route = %route.name, backend = %addr, "backend removed during the handshake; not opening the tunnel");
        outcome.count(UpgradeResult::NoBackend);
        return responses::backend_removed(&route.name);
    }
    let series = shared.metrics.tunnel_series(counters, &label);
    let settings = tunnel::Settings {
        idle_timeout: up.cfg.idle_timeout,
        close,
    };
    let hold = (load.into_tunnel(), conn.take_active());
    shared.tracker.spawn(tunnel::start(
        client_side,
        (backend_side, early),
        settings,
        series,
        hold,
        shared.tracker.clone(),
    ));
    // From here the connection is a tunnel's: never closed as an idle one at a cap.
    conn.idle.upgraded();
    outcome.count(UpgradeResult::Ok);
    counters.handshake.observe(start.elapsed().as_secs_f64());
    client_101(end_to_end)
}

/// An upgrade request that may go on: its `Sec-WebSocket-Key`, route and upstream.
type Admitted<'t> = (
    http::HeaderValue,
    &'t duplex_config::Route,
    &'t Arc<UpstreamRt>,
);

/// Why an upgrade request is refused before any backend is tried.
enum Refused {
    Handshake(crate::handshake::BadHandshake),
    NoRoute,
}

impl Refused {
    fn result(&self) -> UpgradeResult {
        match self {
            Refused::Handshake(_) => UpgradeResult::BadHandshake,
            Refused::NoRoute => UpgradeResult::NoRoute,
        }
    }

    fn response(self) -> Response<Body> {
        match self {
            Refused::Handshake(bad) => bad.response(),
            Refused::NoRoute => responses::no_route(),
        }
    }
}

/// What an upgrade request's handling begins with: the series it is counted in (its
/// route's, or the no-route series), and its key, route and upstream, or why it is
/// refused.
fn admit<'t>(
    table: &'t Table,
    req: &Request<Incoming>,
    conn: &ConnInfo,
) -> (&'t RouteSeries, Result<Admitted<'t>, Refused>) {
    let host = request_host(req.headers(), req.uri());
    let found = router::find(
        table.routes(),
        &conn.listener,
        host.as_deref(),
        req.uri().path(),
        req.headers(),
    );
    let counters = found
        .and_then(|(i, _)| table.route_series.get(i))
        .unwrap_or(&table.no_route);
    let route = found.map(|(_, r)| r);
    let admitted = check_client(req)
        .map_err(Refused::Handshake)
        .and_then(
            |key| match (route, route.and_then(|r| table.upstreams.get(&r.upstream))) {
                (Some(route), Some(up)) => Ok((key, route, up)),
                _ => Err(Refused::NoRoute),
            },
        );
    (counters, admitted)
}

/// Counts an upgrade request whose client went before duplex even began on it (hyper
/// read the client's end in the same pass as the request, and dropped it unhandled) as
/// its handling would have counted it when it began: a refused request as refused, one
/// that would have gone on as `client_closed`.
pub fn gone_unhandled(req: &Request<Incoming>, conn: &ConnInfo, shared: &Shared) {
    if shared.closing.is_cancelled() {
        return;
    }
    let table = shared.table.load();
    if crate::target::check(req).is_err() {
        table.no_route.upgrade(UpgradeResult::BadHandshake).inc();
        return;
    }
    let (counters, admitted) = admit(&table, req, conn);
    let result = admitted.map_or_else(|refused| refused.result(), |_| UpgradeResult::ClientClosed);
    counters.upgrade(result).inc();
}

/// An upgrade's count in `duplex_websocket_upgrades_total`, taken once. Dropped without
/// one, when hyper drops the request because its client went away before the answer (a
/// close, or a half-close: hyper reads the end of the client's stream as its leaving,
/// as nginx does), it counts `client_closed`; not when shutdown cut the connection.
struct Outcome<'a> {
    counters: &'a RouteSeries,
    closing: &'a CancellationToken,
    counted: bool,
}

impl Outcome<'_> {
    fn count(&mut self, result: UpgradeResult) {
        self.counted = true;
        self.counters.upgrade(result).inc();
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.counted && !self.closing.is_cancelled() {
            self.counters.upgrade(UpgradeResult::ClientClosed).inc();
        }
    }
}

/// Connects (TCP, then TLS if the upstream has it) to the first candidate that answers
/// within `connect_timeout`, and says how many candidates it went through; counts the
/// load on a backend from the moment it is chosen, so concurrent handshakes spread out.
async fn connect_first<'a>(
    candidates: &[&'a Backend],
    up: &UpstreamRt,
    shared: &Shared,
) -> Option<(BackendStream, &'a Backend, LoadGuard, usize)> {
    for (i, &b) in candidates.iter().enumerate() {
        let load = b.state.guard();
        let addr = b.state.addr;
        match connect(addr, up.cfg.connect_timeout, up.tls.as_deref()).await {
            Ok(stream) => return Some((stream, b, load, i + 1)),
            Err(source) => {
                let local = crate::connector::is_local_exhaustion(&source);
                let kind = connect_kind(&source);
                let err = ProxyError::Connect { addr, source };
                count_connect_error(shared, up, addr, kind);
                if i + 1 < candidates.len() {
                    tracing::warn!(upstream = %up.cfg.name, error = %err, "trying the next backend");
                } else {
                    tracing::warn!(upstream = %up.cfg.name, error = %err, "connect failed; no backend left to try");
                }
                if !local {
                    crate::health::passive_failure(shared, up, &b.state);
                }
            }
        }
    }
    None
}

/// Counts a failed connection to backend `addr` in `duplex_backend_connect_errors_total`.
fn count_connect_error(shared: &Shared, up: &UpstreamRt, addr: SocketAddr, kind: &str) {
    shared
        .metrics
        .backend_connect_errors
        .with_label_values(&[&up.cfg.name, &addr.to_string(), kind])
        .inc();
}
