//! The duplex proxy: listeners, routing, WebSocket tunnels and HTTP forwarding.
//!
//! How a connection flows: `server` accepts it, `conn` serves HTTP/1.1 on it and tells
//! WebSocket upgrades (`upgrade`) from plain requests (`http_proxy`); both find their route
//! in `router` against the current `state::Table` and pick a backend through
//! `duplex_balance`. An upgraded connection becomes a `tunnel`.

#![forbid(unsafe_code)]

mod admin;
mod conn;
mod connector;
pub mod discovery;
pub mod error;
mod handshake;
mod handshake_io;
mod headers;
mod health;
mod http_pool;
mod http_proxy;
mod idle;
pub mod limits;
mod probe;
mod reclaim;
mod reload;
mod responses;
mod retired;
mod router;
mod send_timeout;
mod server;
mod sni;
mod state;
mod target;
pub mod tls;
pub mod triggers;
mod tunnel;
mod upgrade;
mod x509;

pub use duplex_metrics::Metrics;
pub use error::ProxyError;
pub use reload::ReloadStatus;
pub use send_timeout::{set_queue_probe, QueueProbe};
pub use server::Proxy;
