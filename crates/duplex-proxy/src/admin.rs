//! The admin endpoint on its own listener: metrics, liveness, readiness, status, reload.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use duplex_balance::LastCheck;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::error::ProxyError;
use crate::responses::{text, Body};
use crate::server::Proxy;

/// Admin clients get this long to send their request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept on the admin listener (out of file descriptors, say),
/// doubled for each failure in a row up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Admin connections served at once; more are closed on arrival.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// How long an admin client may leave an answer unread before its connection is closed:
/// otherwise 64 clients that never read would hold every admin place, `/healthz` among
/// them, for good (hyper's header read timeout does not run while an answer is written).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `POST /reload` waits for its reload (a file on a hung mount can hold one,
/// and the one after it, forever); then it answers 503 and frees its connection's place.
const RELOAD_WAIT: Duration = Duration::from_secs(30);

/// Serves the admin endpoint on `listener` until shutdown ends, or until it begins when
/// the socket is `shared` (`reuse_port`): a new duplex on the same port then answers
/// every admin request, rather than the two in turn (a flapping `/readyz`, scrapes of
/// either process's counters).
pub(crate) async fn serve(listener: TcpListener, proxy: Proxy, shared: bool) {
    let closing = if shared {
        proxy.inner.shared.stopping.clone()
    } else {
        proxy.inner.shared.closing.clone()
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    // Not a listener's: admin stalls are not counted in its metrics.
    let stalled = duplex_metrics::unexported_counter();
    let mut pause = ACCEPT_PAUSE;
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, ?pause, "admin accept failed; pausing");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = closing.cancelled() => return,
                    }
                    pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                    continue;
                }
            },
            _ = closing.cancelled() => return,
        };
        pause = ACCEPT_PAUSE;
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!("too many admin connections; closing a new one");
            continue;
        };
        let proxy = proxy.clone();
        let io = crate::send_timeout::SendTimeout::new(tcp, SEND_TIMEOUT, stalled.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(|req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(handle(req, &proxy).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(io), svc)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, proxy: &Proxy) -> Response<Body> {
    let shared = &proxy.inner.shared;
    match (req.method(), req.uri().path()) {
        // HEAD answers as GET without the body (hyper leaves it out).
        (&Method::GET | &Method::HEAD, "/metrics") => {
            // Ejections end with time, not with an event: read backend state as of now.
            // Rendering reads every series: off the runtime's threads, which with
            // `--threads 1` also serve every client.
            let shared = Arc::clone(shared);
            let rendered = tokio::task::spawn_blocking(move || {
                shared.table.load().export_backends(&shared.metrics);
                shared.export_draining();
                shared.metrics.render()
            })
            .await;
            let Ok(body) = rendered else {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "duplex: the metrics could not be rendered\n".into(),
                );
            };
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if proxy.is_stopping() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into())
            } else {
                text(StatusCode::OK, "ready\n".into())
            }
        }
        (&Method::GET | &Method::HEAD, "/status") => json_response(StatusCode::OK, status(proxy)),
        (&Method::POST, "/reload") => {
            match tokio::time::timeout(RELOAD_WAIT, proxy.reload_from_file()).await {
                Ok(Ok(generation)) => {
                    json_response(StatusCode::OK, json!({ "generation": generation }))
                }
                Ok(Err(e)) => {
                    let status = match e {
                        // Not this file's fault: the config in force came from a reload
                        // asked for later, or earlier reloads still read their files.
                        ProxyError::Superseded { .. } => StatusCode::CONFLICT,
                        ProxyError::ReloadBusy(_) | ProxyError::ShuttingDown => {
                            StatusCode::SERVICE_UNAVAILABLE
                        }
                        // Not the file's fault either: duplex is out of file descriptors
                        // or buffers (try again later), or the reload itself broke.
                        _ if crate::error::local_exhaustion(&e) => StatusCode::SERVICE_UNAVAILABLE,
                        ProxyError::ReloadAborted(_) => StatusCode::INTERNAL_SERVER_ERROR,
                        _ => StatusCode::BAD_REQUEST,
                    };
                    json_response(status, json!({ "error": e.to_string() }))
                }
                Err(_) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": format!(
                        "no answer within {RELOAD_WAIT:?}: a reload is stuck (reading a file, \
                         say); GET /status shows when one ends"
                    ) }),
                ),
            }
        }
        (_, path) => match allowed(path) {
            // A known path asked with another method: 405 with `Allow`, as RFC 9110 says.
            Some(allow) => {
                let mut r = text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("method not allowed: {path} takes {allow}\n"),
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
            None => text(
                StatusCode::NOT_FOUND,
                "not found: try GET /metrics, /healthz, /readyz, /status or POST /reload\n".into(),
            ),
        },
    }
}

/// The methods an admin path takes, or `None` for a path the admin listener does not have.
fn allowed(path: &str) -> Option<&'static str> {
    match path {
        "/metrics" | "/healthz" | "/readyz" | "/status" => Some("GET, HEAD"),
        "/reload" => Some("POST"),
        _ => None,
    }
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = text(status, format!("{v:#}\n"));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The running state: config generation, last reload, listeners, routes, upstreams, and
/// per backend its address, weight, open tunnels and in-flight requests.
fn status(proxy: &Proxy) -> serde_json::Value {
    let shared = &proxy.inner.shared;
    let table = shared.table.load();
    let reload = proxy.last_reload();
    let listeners: Vec<_> = {
        let handles = proxy
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        handles
            .iter()
            .map(|h| {
                let (_, max) = shared.caps(&h.name, h.bind);
                json!({
                    "name": h.name,
                    "bind": h.bind.to_string(),
                    "addr": h.addr.to_string(),
                    "connections": h.open.load(Ordering::SeqCst),
                    "max_connections": cap(max),
                })
            })
            .collect()
    };
    let global = table
        .config
        .max_connections
        .unwrap_or_else(crate::limits::default_max);
    let routes: Vec<_> = table
        .routes()
        .iter()
        .map(|r| json!({ "name": r.name, "upstream": r.upstream, "listeners": r.listeners }))
        .collect();
    let mut upstreams: Vec<_> = table
        .config
        .upstreams
        .iter()
        .filter_map(|u| table.upstreams.get(&u.name))
        .map(|up| {
            let backends: Vec<_> = up
                .pool
                .backends()
                .iter()
                .map(|b| {
                    let tunnels = b.state.tunnels();
                    json!({
                        "addr": b.state.addr.to_string(),
                        "weight": b.weight,
                        "healthy": b.state.is_healthy(),
                        "ejected": b.state.is_ejected(),
                        "ejected_seconds_left": b.state.ejection_left().map(|d| d.as_secs_f64()),
                        "last_check": match b.state.last_check() {
                            LastCheck::None => Value::Null,
                            LastCheck::Passed => json!("ok"),
                            LastCheck::Failed(why) => json!(why),
                        },
                        "available": b.state.is_available(),
                        "tunnels": tunnels,
                        "in_flight": b.state.load().saturating_sub(tunnels),
                    })
                })
                .collect();
            json!({ "name": up.cfg.name, "balancer": up.cfg.balancer.as_str(), "backends": backends })
        })
        .collect();
    upstreams.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let mut draining: Vec<_> = crate::server::lock(&shared.draining)
        .iter()
        .map(|((upstream, addr), d)| {
            json!({
                "upstream": upstream,
                "addr": addr.to_string(),
                "tunnels": d.state.tunnels(),
                "draining_seconds": d.since.elapsed().as_secs(),
            })
        })
        .collect();
    draining.sort_by(|a, b| a["addr"].as_str().cmp(&b["addr"].as_str()));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": table.generation,
        "last_reload": {
            "ok": reload.error.is_none(),
            "error": reload.error,
            "at_unix": reload.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        },
        "admin": {
            "addr": proxy.inner.admin.to_string(),
            // A reload changed admin.bind: it moves only on restart.
            "restart_needed_for_bind": proxy.inner.admin_moves_to(table.config.admin.bind)
                .then(|| table.config.admin.bind.to_string()),
        },
        "reloading": proxy.reload_in_progress(),
        "stopping": proxy.is_stopping(),
        "connections": { "open": shared.limits.open(), "max": cap(global) },
        "listeners": listeners,
        "routes": routes,
        "upstreams": upstreams,
        "draining": draining,
    })
}

/// A cap as `/status` shows it: `null` for none.
fn cap(max: usize) -> Option<usize> {
    (max != usize::MAX).then_some(max)
}
