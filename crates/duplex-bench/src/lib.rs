//! duplex-bench: the load generator, echo backend and runner behind docs/benchmarks.md.
//!
//! * [`echo`]: the backend every target proxies to (WebSocket echo and plain HTTP).
//! * [`scenario`]: latency, throughput, hold, handshakes and http, each against one address.
//! * [`runner`]: `run-all`, which starts backends and proxies (duplex, nginx, HAProxy),
//!   places them on CPUs, and runs every scenario against each, interleaved and repeated.
//! * [`results`]: medians, tables, budgets and the generated part of the doc.
//! * [`chart`]: the SVG chart.

// `os.rs` alone calls the OS without a safe wrapper, and allows `unsafe` for that.
#![deny(unsafe_code)]

pub mod chart;
pub mod echo;
pub mod os;
pub mod report;
pub mod results;
pub mod runner;
pub mod scenario;
pub mod ws;
