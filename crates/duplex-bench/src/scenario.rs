//! The five scenarios. Each takes the address to load (a proxy, or the echo backend itself
//! for `direct`) and returns an [`Outcome`]. Every loop is bounded in count and in time.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::os::{self, Dialer};
use crate::report::{Outcome, Samples};
use crate::ws::{self, Parsed, MASK, OP_BINARY, OP_CLOSE};

mod http;
pub use http::{http, http_wrk, parse_wrk, HttpOpts, WrkReport};

/// Longest wait for one connect plus handshake.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// After a timed run ends, how long the echoes still in flight may take.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// A scenario stops early after this many errors.
const MAX_ERRORS: usize = 100;

fn io_err(kind: io::ErrorKind, what: impl Into<String>) -> io::Error {
    io::Error::new(kind, what.into())
}

// ---------------------------------------------------------------------------------------
// latency

pub struct LatencyOpts {
    pub count: usize,
    pub warmup: usize,
    pub size: usize,
    /// The whole run is abandoned (and fails) past this.
    pub max_time: Duration,
}

/// One connection, strict ping-pong: send a message, wait for its echo, repeat. A blocking
/// socket keeps the client's own overhead to two system calls per message.
pub fn latency(target: SocketAddr, label: &str, o: &LatencyOpts) -> Outcome {
    let mut out = Outcome::new("latency", label);
    out.param("size", o.size);
    out.param("count", o.count);
    match latency_run(target, o) {
        Ok(samples) => {
            let n = samples.len();
            let s = samples.sorted();
            out.metric("messages", n, "");
            out.metric("p50_us", s.pct_us(50.0), "us");
            out.metric("p90_us", s.pct_us(90.0), "us");
            out.metric("p99_us", s.pct_us(99.0), "us");
            out.metric("max_us", s.max_us(), "us");
            out.metric("mean_us", s.mean_us(), "us");
        }
        Err(e) => out.fail(format!("ping-pong failed: {e}")),
    }
    out
}

fn latency_run(target: SocketAddr, o: &LatencyOpts) -> io::Result<Samples> {
    let mut s = std::net::TcpStream::connect_timeout(&target, OPEN_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = ws::client_handshake_sync(&mut s, &target.to_string())?;
    let payload: Vec<u8> = (0..o.size).map(|i| i as u8).collect();
    let mut frame = Vec::new();
    ws::put_frame(&mut frame, OP_BINARY, &payload, Some(MASK));
    let mut chunk = vec![0u8; 64 * 1024];
    let mut samples = Samples::with_capacity(o.count);
    let start = Instant::now();
    for i in 0..o.warmup + o.count {
        if start.elapsed() > o.max_time {
            return Err(io_err(
                io::ErrorKind::TimedOut,
                format!("only {i} round trips in {:?}", o.max_time),
            ));
        }
        let t0 = Instant::now();
        s.write_all(&frame)?;
        let f = loop {
            match ws::parse(&buf)? {
                Parsed::Frame(f) => break f,
                Parsed::Need(_) => {
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        return Err(io_err(io::ErrorKind::UnexpectedEof, "closed mid-run"));
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        };
        let dt = t0.elapsed();
        if f.payload_len != o.size || buf[f.header_len..f.total_len()] != payload[..] {
            return Err(io_err(
                io::ErrorKind::InvalidData,
                "echo differs from the message",
            ));
        }
        buf.drain(..f.total_len());
        if i >= o.warmup {
            samples.push(dt);
        }
    }
    Ok(samples)
}

/// Checks that `target` upgrades and echoes, once; for waiting until a proxy is ready.
pub fn probe(target: SocketAddr) -> io::Result<()> {
    let o = LatencyOpts {
        count: 1,
        warmup: 0,
        size: 16,
        max_time: Duration::from_secs(2),
    };
    latency_run(target, &o).map(|_| ())
}

// ---------------------------------------------------------------------------------------
// opening tunnels

/// Connects and upgrades one tunnel; returns the stream and any bytes read past the 101.
async fn open_one(d: &Dialer) -> io::Result<(TcpStream, Vec<u8>)> {
    let mut s = d.connect().await?;
    let rest = ws::client_handshake(&mut s, &d.target.to_string()).await?;
    Ok((s, rest))
}

/// Tunnels opened, and the failures.
struct Opened {
    tunnels: Vec<(TcpStream, Vec<u8>)>,
    failed: usize,
    first_error: Option<String>,
}

/// Opens `n` tunnels, at most `concurrency` handshakes at a time, all before `deadline`.
async fn open_tunnels(d: &Arc<Dialer>, n: usize, concurrency: usize, deadline: Instant) -> Opened {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
            break;
        };
        let d = Arc::clone(d);
        set.spawn(async move {
            let _permit = permit;
            match tokio::time::timeout_at(deadline.into(), open_one(&d)).await {
                Ok(r) => r,
                Err(_) => Err(io_err(io::ErrorKind::TimedOut, "open timed out")),
            }
        });
    }
    let mut o = Opened {
        tunnels: Vec::with_capacity(n),
        failed: 0,
        first_error: None,
    };
    while let Some(r) = set.join_next().await {
        match r.map_err(io::Error::other).and_then(|r| r) {
            Ok(t) => o.tunnels.push(t),
            Err(e) => {
                o.failed += 1;
                o.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    o
}

/// Sends one message on every tunnel and checks its echo, `concurrency` at a time; gives
/// the tunnels back with the count of those that failed (failed ones are dropped).
async fn echo_all(
    tunnels: Vec<(TcpStream, Vec<u8>)>,
    concurrency: usize,
    timeout: Duration,
) -> (Vec<(TcpStream, Vec<u8>)>, usize, Option<String>) {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for (i, (mut s, mut buf)) in tunnels.into_iter().enumerate() {
        let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
            break;
        };
        set.spawn(async move {
            let _permit = permit;
            let msg = format!("tunnel {i:>10} ok");
            let check = async {
                let mut out = Vec::new();
                ws::put_frame(&mut out, OP_BINARY, msg.as_bytes(), Some(MASK));
                s.write_all(&out).await?;
                let f = ws::read_frame(&mut s, &mut buf).await?;
                let ok =
                    f.opcode() == OP_BINARY && &buf[f.header_len..f.total_len()] == msg.as_bytes();
                buf.drain(..f.total_len());
                if ok {
                    Ok(())
                } else {
                    Err(io_err(io::ErrorKind::InvalidData, "wrong echo"))
                }
            };
            match tokio::time::timeout(timeout, check).await {
                Ok(Ok(())) => Ok((s, buf)),
                Ok(Err(e)) => Err(format!("tunnel {i}: {e}")),
                Err(_) => Err(format!("tunnel {i}: no echo within {timeout:?}")),
            }
        });
    }
    let mut back = Vec::new();
    let mut failed = 0;
    let mut first = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(t)) => back.push(t),
            Ok(Err(e)) => {
                failed += 1;
                first.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first.get_or_insert(e.to_string());
            }
        }
    }
    (back, failed, first)
}

// ---------------------------------------------------------------------------------------
// throughput

pub struct ThroughputOpts {
    pub conns: usize,
    pub inflight: usize,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

/// A short name for a message size: `64`, `16k`.
pub fn size_name(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{}k", size / 1024)
    } else {
        size.to_string()
    }
}

/// `conns` connections each keeping `inflight` messages in flight: every echo that comes
/// back is answered by a new message until the end. Each message carries its send time,
/// so every echo gives a latency sample.
pub async fn throughput(target: SocketAddr, label: &str, o: &ThroughputOpts) -> Outcome {
    let mut out = Outcome::new(&format!("throughput-{}", size_name(o.size)), label);
    out.param("size", o.size);
    out.param("conns", o.conns);
    out.param("inflight", o.inflight);
    out.param("duration_s", o.duration.as_secs_f64());
    let d = Arc::new(Dialer::new(target));
    let opened = open_tunnels(&d, o.conns, 64, Instant::now() + OPEN_TIMEOUT * 3).await;
    if opened.failed > 0 {
        out.fail(format!(
            "{} of {} connections failed to open: {}",
            opened.failed,
            o.conns,
            opened.first_error.unwrap_or_default()
        ));
        return out;
    }
    let base = Instant::now();
    let from = base + o.warmup;
    let deadline = from + o.duration;
    let mut set = JoinSet::new();
    let (size, inflight) = (o.size.max(8), o.inflight.max(1));
    for (s, rest) in opened.tunnels {
        set.spawn(async move {
            let limit = deadline + DRAIN_GRACE + Duration::from_secs(1);
            match tokio::time::timeout_at(
                limit.into(),
                pump(s, rest, size, inflight, base, from, deadline),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(io_err(io::ErrorKind::TimedOut, "stuck writing")),
            }
        });
    }
    let mut msgs = 0u64;
    let mut samples = Samples::default();
    while let Some(r) = set.join_next().await {
        match r.map_err(io::Error::other).and_then(|r| r) {
            Ok((n, s)) => {
                msgs += n;
                samples.extend(s);
            }
            Err(e) => out.fail(format!("connection failed: {e}")),
        }
    }
    let secs = o.duration.as_secs_f64();
    let s = samples.sorted();
    out.metric("msgs_per_s", msgs as f64 / secs, "msg/s");
    out.metric("mb_per_s", msgs as f64 * size as f64 / 1e6 / secs, "MB/s");
    out.metric("p50_us", s.pct_us(50.0), "us");
    out.metric("p99_us", s.pct_us(99.0), "us");
    out.metric("max_us", s.max_us(), "us");
    out.metric("messages", msgs, "");
    if msgs == 0 {
        out.fail("no message came back");
    }
    out
}

/// Writes `frame` (a masked template) with the send time `now` in its first 8 payload
/// bytes, onto `out`: all of it, or for large payloads only the header and the time (see
/// [`send`]).
fn stamp(frame: &mut [u8], ts_at: usize, base: Instant, now: Instant, out: &mut Vec<u8>) {
    let ns = now.duration_since(base).as_nanos() as u64;
    let mut b = ns.to_le_bytes();
    for (i, x) in b.iter_mut().enumerate() {
        *x ^= MASK[i % 4];
    }
    frame[ts_at..ts_at + 8].copy_from_slice(&b);
    let upto = if vectored(frame.len() - ts_at) {
        ts_at + 8
    } else {
        frame.len()
    };
    out.extend_from_slice(&frame[..upto]);
}

/// Whether messages of `size` go out as stamped heads plus the template's shared rest.
fn vectored(size: usize) -> bool {
    size >= ws::VECTORED_FROM
}

/// Sends what [`stamp`] put in `out`: as it is, or each stamped head followed by the rest of
/// the template, which every message shares, with `writev`.
async fn send(s: &mut TcpStream, out: &[u8], frame: &[u8], ts_at: usize) -> io::Result<()> {
    if !vectored(frame.len() - ts_at) {
        return s.write_all(out).await;
    }
    let (head, rest) = frame.split_at(ts_at + 8);
    let mut slices: Vec<IoSlice<'_>> = out
        .chunks(head.len())
        .flat_map(|h| [IoSlice::new(h), IoSlice::new(rest)])
        .collect();
    ws::write_all_vectored(s, &mut slices).await
}

/// One throughput connection: returns the echoes counted in `[from, deadline)` and their
/// latencies. Stops sending at `deadline`, then waits for what is still in flight.
async fn pump(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    size: usize,
    inflight: usize,
    base: Instant,
    from: Instant,
    deadline: Instant,
) -> io::Result<(u64, Samples)> {
    let mut frame = Vec::new();
    ws::put_frame(&mut frame, OP_BINARY, &vec![0x5a; size], Some(MASK));
    let ts_at = frame.len() - size;
    let mut out = Vec::with_capacity(frame.len() * inflight);
    let now = Instant::now();
    for _ in 0..inflight {
        stamp(&mut frame, ts_at, base, now, &mut out);
    }
    send(&mut s, &out, &frame, ts_at).await?;
    out.clear();
    let mut outstanding = inflight;
    let mut count = 0u64;
    let mut samples = Samples::default();
    let hard_end = deadline + DRAIN_GRACE;
    buf.reserve(64 * 1024);
    loop {
        let now = Instant::now();
        let mut pos = 0;
        let need = loop {
            match ws::parse(&buf[pos..])? {
                Parsed::Need(n) => break n,
                Parsed::Frame(f) => {
                    if f.opcode() != OP_BINARY || f.payload_len != size {
                        return Err(io_err(io::ErrorKind::InvalidData, "unexpected frame"));
                    }
                    let p = pos + f.header_len;
                    // The payload after the stamp is the template's 0x5a bytes: checked at
                    // both ends (a truncated, shifted or garbled echo is not counted).
                    if size > 8 && (buf[p + 8] != 0x5a || buf[p + size - 1] != 0x5a) {
                        return Err(io_err(io::ErrorKind::InvalidData, "echo differs"));
                    }
                    let mut ts = [0u8; 8];
                    ts.copy_from_slice(&buf[p..p + 8]);
                    let sent = base + Duration::from_nanos(u64::from_le_bytes(ts));
                    outstanding -= 1;
                    if now >= from && now < deadline {
                        count += 1;
                        samples.push(now.saturating_duration_since(sent));
                    }
                    if now < deadline {
                        stamp(&mut frame, ts_at, base, now, &mut out);
                        outstanding += 1;
                    }
                    pos += f.total_len();
                }
            }
        };
        buf.drain(..pos);
        if !out.is_empty() {
            send(&mut s, &out, &frame, ts_at).await?;
            out.clear();
        }
        if outstanding == 0 {
            return Ok((count, samples));
        }
        buf.reserve(need.saturating_sub(buf.len()).max(64 * 1024));
        match tokio::time::timeout_at(hard_end.into(), s.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Err(io_err(io::ErrorKind::UnexpectedEof, "closed mid-run")),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io_err(
                    io::ErrorKind::TimedOut,
                    format!("{outstanding} echoes missing {DRAIN_GRACE:?} after the end"),
                ))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// hold

pub struct HoldOpts {
    pub tunnels: usize,
    /// The proxy's processes (nginx's workers) whose memory is read and summed; none for
    /// `direct`.
    pub pids: Vec<u32>,
    pub settle: Duration,
    pub concurrency: usize,
    /// Keep the tunnels open this long after measuring, to inspect the proxy meanwhile.
    pub linger: Duration,
}

/// The most tunnels a proxy can hold under a hard open-file limit of `hard`: two sockets
/// each, with room for the listeners, logs and the like, rounded down to a hundred.
pub fn tunnels_for_limit(hard: u64) -> usize {
    let fit = hard.saturating_sub(100) / 2;
    ((fit / 100) * 100).max(100) as usize
}

/// Opens `tunnels` idle tunnels, reads the proxy's resident memory before and after, then
/// checks that every tunnel still echoes, and reads the memory once more.
pub async fn hold(target: SocketAddr, label: &str, o: &HoldOpts) -> Outcome {
    let mut out = Outcome::new("hold", label);
    out.param("requested", o.tunnels);
    let d = Arc::new(Dialer::new(target));
    // Warm-up: a few tunnels through every path, so state built on first use (thread-local
    // buffers, metric series) is already in the "before" figure.
    let warm = open_tunnels(&d, 16, 16, Instant::now() + OPEN_TIMEOUT).await;
    let (warm, failed, first) = echo_all(warm.tunnels, 16, OPEN_TIMEOUT).await;
    if failed > 0 {
        out.fail(format!(
            "warm-up tunnel did not echo: {}",
            first.unwrap_or_default()
        ));
        return out;
    }
    drop(warm);
    tokio::time::sleep(o.settle).await;
    let rss = || -> Option<u64> {
        if o.pids.is_empty() {
            return None;
        }
        o.pids.iter().map(|&p| os::rss_kib(p).ok()).sum()
    };
    let before = rss();

    let t0 = Instant::now();
    let open_deadline = t0 + Duration::from_secs(30) + Duration::from_millis(10 * o.tunnels as u64);
    let opened = open_tunnels(&d, o.tunnels, o.concurrency, open_deadline).await;
    let open_secs = t0.elapsed().as_secs_f64();
    let n = opened.tunnels.len();
    out.metric("tunnels", n, "");
    out.metric("open_per_s", n as f64 / open_secs.max(1e-9), "tunnels/s");
    out.metric("source_addrs", d.sources_used(), "");
    if opened.failed > 0 {
        out.fail(format!(
            "{} of {} tunnels failed to open: {}",
            opened.failed,
            o.tunnels,
            opened.first_error.unwrap_or_default()
        ));
    }
    tokio::time::sleep(o.settle).await;
    let after = rss();
    let fds: Option<usize> = o.pids.iter().map(|&p| os::open_fds(p).ok()).sum();
    if let (Some(fds), false) = (fds, o.pids.is_empty()) {
        out.metric("proxy_fds", fds, "");
    }

    let (tunnels, failed, first) = echo_all(opened.tunnels, 256, Duration::from_secs(30)).await;
    out.metric("echoed", tunnels.len(), "");
    if failed > 0 {
        out.fail(format!(
            "{failed} of {n} tunnels did not echo: {}",
            first.unwrap_or_default()
        ));
    }
    tokio::time::sleep(o.settle).await;
    let after_echo = rss();
    if !o.linger.is_zero() {
        println!(
            "holding {} tunnels open for {:?} more",
            tunnels.len(),
            o.linger
        );
        tokio::time::sleep(o.linger).await;
    }
    if let (Some(b), Some(a), Some(e)) = (before, after, after_echo) {
        let per = |x: u64| (x as f64 - b as f64) * 1024.0 / n.max(1) as f64;
        out.metric("rss_before_kib", b, "KiB");
        out.metric("rss_after_kib", a, "KiB");
        out.metric("rss_after_echo_kib", e, "KiB");
        out.metric("rss_per_tunnel_b", per(a), "B");
        out.metric("rss_per_tunnel_after_echo_b", per(e), "B");
    } else if !o.pids.is_empty() {
        out.fail("could not read the proxy's VmRSS");
    }
    drop(tunnels);
    out
}

// ---------------------------------------------------------------------------------------
// handshakes

pub struct HandshakeOpts {
    pub workers: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

/// `workers` loops of connect, upgrade, echo one message, close handshake, wait for the
/// server's FIN. Counts whole cycles; the latency is connect start to the 101.
pub async fn handshakes(target: SocketAddr, label: &str, o: &HandshakeOpts) -> Outcome {
    let mut out = Outcome::new("handshakes", label);
    out.param("workers", o.workers);
    out.param("duration_s", o.duration.as_secs_f64());
    let d = Arc::new(Dialer::new(target));
    let from = Instant::now() + o.warmup;
    let deadline = from + o.duration;
    let mut set = JoinSet::new();
    for _ in 0..o.workers.max(1) {
        let d = Arc::clone(&d);
        set.spawn(async move {
            let mut samples = Samples::default();
            let mut errors = Vec::new();
            while Instant::now() < deadline && errors.len() < MAX_ERRORS {
                match tokio::time::timeout(OPEN_TIMEOUT, cycle(&d)).await {
                    Ok(Ok(hs)) => {
                        let now = Instant::now();
                        if now >= from && now < deadline {
                            samples.push(hs);
                        }
                    }
                    Ok(Err(e)) => errors.push(e.to_string()),
                    Err(_) => errors.push(format!("cycle took over {OPEN_TIMEOUT:?}")),
                }
            }
            (samples, errors)
        });
    }
    let mut samples = Samples::default();
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok((s, e)) => {
                samples.extend(s);
                errors += e.len();
                if let Some(first) = e.into_iter().next() {
                    out.fail(first);
                }
            }
            Err(e) => out.fail(e.to_string()),
        }
    }
    let n = samples.len();
    let s = samples.sorted();
    out.metric("per_s", n as f64 / o.duration.as_secs_f64(), "handshakes/s");
    out.metric("p50_ms", s.pct_us(50.0) / 1000.0, "ms");
    out.metric("p99_ms", s.pct_us(99.0) / 1000.0, "ms");
    out.metric("completed", n, "");
    out.metric("errors", errors, "");
    out.metric("source_addrs", d.sources_used(), "");
    if n == 0 {
        out.fail("no handshake completed");
    }
    out
}

async fn cycle(d: &Dialer) -> io::Result<Duration> {
    let t0 = Instant::now();
    let (mut s, mut buf) = open_one(d).await?;
    let hs = t0.elapsed();
    let msg = b"handshake cycle!";
    let mut out = Vec::new();
    ws::put_frame(&mut out, OP_BINARY, msg, Some(MASK));
    s.write_all(&out).await?;
    let f = ws::read_frame(&mut s, &mut buf).await?;
    if f.opcode() != OP_BINARY || &buf[f.header_len..f.total_len()] != msg {
        return Err(io_err(io::ErrorKind::InvalidData, "wrong echo"));
    }
    buf.drain(..f.total_len());
    out.clear();
    ws::put_frame(&mut out, OP_CLOSE, &1000u16.to_be_bytes(), Some(MASK));
    s.write_all(&out).await?;
    let f = ws::read_frame(&mut s, &mut buf).await?;
    if f.opcode() != OP_CLOSE {
        return Err(io_err(io::ErrorKind::InvalidData, "no Close answer"));
    }
    buf.clear();
    // The server closes first; wait for its FIN (bounded by the caller's timeout).
    let mut sink = [0u8; 256];
    while s.read(&mut sink).await? > 0 {}
    Ok(hs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_hold_to_the_file_limit() {
        assert_eq!(tunnels_for_limit(20_000), 9_900);
        assert_eq!(tunnels_for_limit(1_024), 400);
        assert_eq!(tunnels_for_limit(10), 100);
    }
}
