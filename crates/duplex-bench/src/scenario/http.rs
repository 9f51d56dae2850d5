//! The `http` scenario: plain HTTP/1.1 keep-alive GETs, from a built-in client or from
//! wrk (whose report is parsed here).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::{io_err, DRAIN_GRACE};
use crate::os::Dialer;
use crate::report::{Outcome, Samples};

pub struct HttpOpts {
    pub conns: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

/// Plain HTTP/1.1 GET over `conns` keep-alive connections, one request at a time each.
pub async fn http(target: SocketAddr, label: &str, o: &HttpOpts) -> Outcome {
    let mut out = Outcome::new("http", label);
    out.param("client", "builtin");
    out.param("conns", o.conns);
    out.param("duration_s", o.duration.as_secs_f64());
    let d = Arc::new(Dialer::new(target));
    let from = Instant::now() + o.warmup;
    let deadline = from + o.duration;
    let mut set = JoinSet::new();
    for _ in 0..o.conns.max(1) {
        let d = Arc::clone(&d);
        set.spawn(async move {
            let limit = deadline + DRAIN_GRACE;
            match tokio::time::timeout_at(limit.into(), http_conn(&d, from, deadline)).await {
                Ok(r) => r,
                Err(_) => Err(io_err(io::ErrorKind::TimedOut, "request stuck")),
            }
        });
    }
    let mut samples = Samples::default();
    while let Some(r) = set.join_next().await {
        match r.map_err(io::Error::other).and_then(|r| r) {
            Ok(s) => samples.extend(s),
            Err(e) => out.fail(format!("connection failed: {e}")),
        }
    }
    let n = samples.len();
    let s = samples.sorted();
    out.metric("req_per_s", n as f64 / o.duration.as_secs_f64(), "req/s");
    out.metric("p50_us", s.pct_us(50.0), "us");
    out.metric("p99_us", s.pct_us(99.0), "us");
    out.metric("requests", n, "");
    if n == 0 {
        out.fail("no request completed");
    }
    out
}

async fn http_conn(d: &Dialer, from: Instant, deadline: Instant) -> io::Result<Samples> {
    let mut s = d.connect().await?;
    let req = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", d.target);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut samples = Samples::default();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        s.write_all(req.as_bytes()).await?;
        let total = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(head)) => {
                    if resp.code != Some(200) {
                        return Err(io_err(
                            io::ErrorKind::InvalidData,
                            format!("answered {}", resp.code.unwrap_or(0)),
                        ));
                    }
                    let len = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| {
                            std::str::from_utf8(h.value)
                                .ok()?
                                .trim()
                                .parse::<usize>()
                                .ok()
                        })
                        .ok_or_else(|| io_err(io::ErrorKind::InvalidData, "no content-length"))?;
                    let total: usize = head + len;
                    if buf.len() >= total {
                        break total;
                    }
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(io_err(io::ErrorKind::InvalidData, e.to_string())),
            }
            buf.reserve(4096);
            if s.read_buf(&mut buf).await? == 0 {
                return Err(io_err(io::ErrorKind::UnexpectedEof, "closed mid-response"));
            }
        };
        buf.drain(..total);
        let now = Instant::now();
        if now >= from && now < deadline {
            samples.push(now - t0);
        }
    }
    Ok(samples)
}

/// The same load from wrk (one thread), when it is installed; its report is parsed.
pub fn http_wrk(target: SocketAddr, label: &str, o: &HttpOpts) -> Outcome {
    let mut out = Outcome::new("http", label);
    out.param("client", "wrk");
    out.param("conns", o.conns);
    out.param("duration_s", o.duration.as_secs_f64());
    let secs = o.duration.as_secs().max(1);
    let res = std::process::Command::new("wrk")
        .args([
            "-t1".to_string(),
            format!("-c{}", o.conns),
            format!("-d{secs}s"),
            "--latency".into(),
            "--timeout".into(),
            "5s".into(),
            format!("http://{target}/"),
        ])
        .output();
    let text = match res {
        Ok(r) if r.status.success() => String::from_utf8_lossy(&r.stdout).into_owned(),
        Ok(r) => {
            out.fail(format!(
                "wrk failed: {}",
                String::from_utf8_lossy(&r.stderr).trim()
            ));
            return out;
        }
        Err(e) => {
            out.fail(format!("cannot run wrk: {e}"));
            return out;
        }
    };
    match parse_wrk(&text) {
        Some(w) => {
            out.metric("req_per_s", w.req_per_s, "req/s");
            out.metric("p50_us", w.p50_us, "us");
            out.metric("p99_us", w.p99_us, "us");
            out.metric("requests", w.requests, "");
            if w.errors > 0 {
                out.fail(format!(
                    "wrk counted {} errors or non-2xx answers",
                    w.errors
                ));
            }
        }
        None => out.fail(format!("cannot read wrk's report:\n{text}")),
    }
    out
}

#[derive(Debug, PartialEq)]
pub struct WrkReport {
    pub req_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    pub errors: u64,
}

/// A wrk duration (`812.00us`, `1.23ms`, `2.00s`) in microseconds.
fn wrk_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

pub fn parse_wrk(text: &str) -> Option<WrkReport> {
    let mut r = WrkReport {
        req_per_s: -1.0,
        p50_us: -1.0,
        p99_us: -1.0,
        requests: 0,
        errors: 0,
    };
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.req_per_s = v.parse().ok()?,
            ["50%", v] => r.p50_us = wrk_us(v)?,
            ["99%", v] => r.p99_us = wrk_us(v)?,
            [n, "requests", "in", ..] => r.requests = n.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    (r.req_per_s >= 0.0 && r.p99_us >= 0.0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let text = "Running 5s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.33us  100.12us   5.00ms   90.00%
    Req/Sec    61.23k     1.00k   63.00k    80.00%
  Latency Distribution
     50%  800.00us
     75%  850.00us
     90%  900.00us
     99%    1.20ms
  306150 requests in 5.00s, 50.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  61230.00
Transfer/sec:     10.00MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(
            r,
            WrkReport {
                req_per_s: 61230.0,
                p50_us: 800.0,
                p99_us: 1200.0,
                requests: 306150,
                errors: 3,
            }
        );
    }
}
