//! The WebSocket upgrade path, in one function: detect, pick, forward the handshake, check
//! the 101, spawn the tunnel and register it with the task tracker.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use duplex_balance::{Backend, LoadGuard};
use duplex_metrics::UpgradeResult;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::conn::ConnInfo;
use crate::connector::connect;
use crate::error::{connect_kind, ProxyError};
use crate::handshake::{backend_request, check_backend_101, check_client, client_101};
use crate::headers::request_host;
use crate::http_proxy::relay;
use crate::responses::{self, Body};
use crate::state::{Shared, UpstreamRt};
use crate::tls::BackendStream;
use crate::{router, tunnel};

pub async fn upgrade(
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let start = Instant::now();
    let table = shared.table.load_full();
    let host = request_host(req.headers(), req.uri());
    let found = router::find(
        table.routes(),
        host.as_deref(),
        req.uri().path(),
        req.headers(),
    );
    let counters = found
        .and_then(|(i, _)| table.route_series.get(i))
        .unwrap_or(&table.no_route);
    let route = found.map(|(_, r)| r);
    let count = |result: UpgradeResult| counters.upgrade(result).inc();

    // Refuse a broken handshake before touching a backend.
    let key = match check_client(&req) {
        Ok(key) => key,
        Err(bad) => {
            count(UpgradeResult::BadHandshake);
            return bad.response();
        }
    };
    let (Some(route), Some(up)) = (route, route.and_then(|r| table.upstreams.get(&r.upstream)))
    else {
        count(UpgradeResult::NoRoute);
        return responses::no_route();
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
        count(UpgradeResult::NoBackend);
        return responses::no_healthy_backend(&route.name);
    }
    let Some((stream, backend, load)) = connect_first(&candidates, up, shared).await else {
        count(UpgradeResult::ConnectError);
        return responses::bad_gateway(&route.name);
    };
    let addr = backend.state.addr;

    // Forward the handshake and wait for the answer, bounded by handshake_timeout.
    let breq = backend_request(&req, &conn.forwarded_for, conn.https);
    let mut resp = match tokio::time::timeout(
        up.cfg.handshake_timeout,
        send_handshake(stream, breq, shared),
    )
    .await
    {
        Err(_) => {
            tracing::warn!(route = %route.name, backend = %addr, "backend did not answer the upgrade in time");
            crate::health::passive_failure(shared, up, &backend.state);
            count(UpgradeResult::Timeout);
            return responses::gateway_timeout(&route.name);
        }
        Ok(Err(e)) => {
            tracing::warn!(route = %route.name, backend = %addr, error = %ProxyError::Backend { addr, source: e }, "upgrade failed");
            count(UpgradeResult::ConnectError);
            return responses::bad_gateway(&route.name);
        }
        Ok(Ok(resp)) => resp,
    };
    backend.state.record_success();

    // Check the 101; any other answer goes to the client as a normal response.
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        count(UpgradeResult::RejectedByBackend);
        return relay(resp, load, up.cfg.response_timeout);
    }
    if let Err(what) = check_backend_101(resp.headers(), &key) {
        tracing::warn!(route = %route.name, error = %ProxyError::BadUpgrade { addr, what }, "refusing backend's 101");
        count(UpgradeResult::RejectedByBackend);
        return responses::bad_gateway(&route.name);
    }

    // Spawn the tunnel; it starts once hyper has written our 101 to the client.
    let client_side = hyper::upgrade::on(&mut req);
    let backend_side = hyper::upgrade::on(&mut resp);
    let series = shared
        .metrics
        .tunnel_series(&route.name, &up.cfg.name, &addr.to_string());
    let settings = tunnel::Settings {
        idle_timeout: up.cfg.idle_timeout,
        close: up.closer(addr),
    };
    let hold = (load.into_tunnel(), conn.take_active());
    shared.tracker.spawn(tunnel::start(
        client_side,
        backend_side,
        settings,
        series,
        hold,
        shared.tracker.clone(),
    ));
    count(UpgradeResult::Ok);
    counters.handshake.observe(start.elapsed().as_secs_f64());
    client_101(resp.headers())
}

/// Connects (TCP, then TLS if the upstream has it) to the first candidate that answers
/// within `connect_timeout`; counts the load
/// on a backend from the moment it is chosen, so concurrent handshakes spread out.
async fn connect_first<'a>(
    candidates: &[&'a Backend],
    up: &UpstreamRt,
    shared: &Shared,
) -> Option<(BackendStream, &'a Backend, LoadGuard)> {
    for &b in candidates {
        let load = b.state.guard();
        let addr = b.state.addr;
        match connect(addr, up.cfg.connect_timeout, up.tls.as_deref()).await {
            Ok(stream) => return Some((stream, b, load)),
            Err(source) => {
                let local = crate::connector::is_local_exhaustion(&source);
                let kind = connect_kind(&source);
                let err = ProxyError::Connect { addr, source };
                shared
                    .metrics
                    .backend_connect_errors
                    .with_label_values(&[&up.cfg.name, &addr.to_string(), kind])
                    .inc();
                tracing::warn!(upstream = %up.cfg.name, error = %err, "trying the next backend");
                if !local {
                    crate::health::passive_failure(shared, up, &b.state);
                }
            }
        }
    }
    None
}

/// The largest response head a backend may answer an upgrade with (Envoy allows 60 KiB of
/// response headers by default; nginx 4 or 8 KiB). A larger one gets the client a 502.
const MAX_BACKEND_HEAD: usize = 64 * 1024;

/// Sends the upgrade request over `stream` and returns the backend's response head.
async fn send_handshake(
    stream: BackendStream,
    req: Request<Empty<Bytes>>,
    shared: &Shared,
) -> Result<Response<Incoming>, hyper::Error> {
    // hyper's adaptive read buffer (8 KiB to start). An exact size would also be the most
    // it reads: a 2 KiB one turned any 101 with a few long cookies into a 502.
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_BACKEND_HEAD)
        .handshake(TokioIo::new(stream))
        .await?;
    // The connection task ends once the 101 hands the socket over, or once a non-101
    // response body is read and `sender` is gone.
    shared.tracker.spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender.send_request(req).await
}
