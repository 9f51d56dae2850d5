//! Helpers for the end-to-end tests: the proxy in-process, real backends, real clients,
//! raw wire bytes, and bounded waiting. Everything binds 127.0.0.1 port 0.

#![forbid(unsafe_code)]

pub mod backend;
pub mod client;
pub mod flaky;
pub mod health_kit;
pub mod pki;
pub mod proxy;
pub mod raw;
pub mod tls_kit;
pub mod wire;

use std::future::Future;
use std::time::{Duration, Instant};

/// The longest any single step of a test may take before the test fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`STEP`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(STEP, what, fut).await
}

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Retries `cond` until it returns true, checking every 20 ms for at most `limit`; fails the
/// test naming `what` otherwise. Each check is itself bounded by `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    const PAUSE: Duration = Duration::from_millis(20);
    let start = Instant::now();
    let max_tries = (limit.as_millis() / PAUSE.as_millis()).max(1) + 1;
    for _ in 0..max_tries {
        if within_for(limit, what, cond()).await {
            return;
        }
        if start.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(PAUSE).await;
    }
    panic!("condition not met within {limit:?}: {what}");
}
