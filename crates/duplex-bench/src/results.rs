//! From cells to what a reader sees: medians, the tables, the budget check, the 1M-tunnel
//! projection, the chart (SVG) and the generated part of docs/benchmarks.md.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::chart::esc;
use crate::runner::{Cell, Placement, Plan, Target};

/// A figure the tables show.
pub struct Metric {
    pub scenario: &'static str,
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

const fn m(
    scenario: &'static str,
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
) -> Metric {
    Metric {
        scenario,
        key,
        label,
        unit,
        higher_is_better,
    }
}

pub const METRICS: &[Metric] = &[
    m("latency", "p50_us", "64 B ping-pong p50", "µs", false),
    m("latency", "p90_us", "64 B ping-pong p90", "µs", false),
    m("latency", "p99_us", "64 B ping-pong p99", "µs", false),
    m("latency", "max_us", "64 B ping-pong max", "µs", false),
    m(
        "throughput-64",
        "msgs_per_s",
        "64 B msgs/s (100 conns × 8)",
        "msg/s",
        true,
    ),
    m(
        "throughput-64",
        "p99_us",
        "64 B p99 under load",
        "µs",
        false,
    ),
    m(
        "throughput-16k",
        "msgs_per_s",
        "16 KiB msgs/s (100 × 8)",
        "msg/s",
        true,
    ),
    m(
        "throughput-16k",
        "mb_per_s",
        "16 KiB MB/s echoed",
        "MB/s",
        true,
    ),
    m(
        "throughput-16k",
        "p99_us",
        "16 KiB p99 under load",
        "µs",
        false,
    ),
    m(
        "hold",
        "rss_per_tunnel_b",
        "RSS per idle tunnel",
        "B",
        false,
    ),
    m(
        "hold",
        "rss_per_tunnel_after_echo_b",
        "RSS per tunnel, idle after one echo",
        "B",
        false,
    ),
    m("handshakes", "per_s", "handshakes/s (32 loops)", "/s", true),
    m("handshakes", "p99_ms", "handshake p99", "ms", false),
    m(
        "http",
        "req_per_s",
        "HTTP keep-alive req/s (50 conns)",
        "req/s",
        true,
    ),
    m("http", "p99_us", "HTTP p99", "µs", false),
];

/// The values of one figure over the repeats that succeeded.
pub fn values(cells: &[Cell], p: Placement, t: Target, scenario: &str, key: &str) -> Vec<f64> {
    cells
        .iter()
        .filter(|c| c.placement == p && c.target == t && c.scenario == scenario)
        .filter_map(|c| c.result.as_ref().ok()?.get(key)?.as_f64())
        .collect()
}

/// How many cells of one figure ran, failed ones included.
fn attempts(cells: &[Cell], p: Placement, t: Target, scenario: &str) -> usize {
    cells
        .iter()
        .filter(|c| c.placement == p && c.target == t && c.scenario == scenario)
        .count()
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub fn med(cells: &[Cell], p: Placement, t: Target, scenario: &str, key: &str) -> Option<f64> {
    median(&values(cells, p, t, scenario, key))
}

/// A figure as the tables print it.
pub fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "B" => format!("{:.2} KiB", v / 1024.0),
        _ if v.abs() >= 10_000.0 => group(v.round() as i64),
        _ if v.abs() >= 100.0 => format!("{v:.0}"),
        _ if v.abs() >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// 61834 -> "61,834".
fn group(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Compact form for chart labels: 61.8k, 25.1, 1.93 KiB.
pub(crate) fn short(v: f64, unit: &str) -> String {
    match unit {
        "B" => format!("{:.2} KiB", v / 1024.0),
        _ if v >= 1e6 => format!("{:.2}M", v / 1e6),
        _ if v >= 1e4 => format!("{:.1}k", v / 1e3),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

/// "median ±spread%" where the spread is half the range over the median, and "(k of n)"
/// when only k of the n repeats that ran gave a value: a median of fewer is said so.
fn cell_text(v: &[f64], ran: usize, unit: &str) -> String {
    let text = value_text(v, unit);
    if v.len() < ran {
        format!("{text} ({} of {ran})", v.len())
    } else {
        text
    }
}

fn value_text(v: &[f64], unit: &str) -> String {
    match median(v) {
        None => "n/a".into(),
        Some(med) => {
            let text = fmt_value(med, unit);
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            if v.len() > 1 && med.abs() > 0.0 {
                let spread = (hi - lo) / 2.0 / med.abs() * 100.0;
                format!("{text} ±{spread:.0}%")
            } else {
                text
            }
        }
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// The results table of one placement, in Markdown.
pub fn table(cells: &[Cell], p: Placement, targets: &[Target]) -> String {
    let mut s = String::new();
    s.push_str("| figure |");
    for t in targets {
        let _ = write!(s, " {t} |");
    }
    s.push_str(" duplex ÷ direct | duplex ÷ nginx |\n|---|");
    for _ in targets {
        s.push_str("---:|");
    }
    s.push_str("---:|---:|\n");
    for mt in METRICS {
        let any = targets
            .iter()
            .any(|&t| !values(cells, p, t, mt.scenario, mt.key).is_empty());
        if !any {
            continue;
        }
        let unit = if mt.unit == "B" { "" } else { mt.unit };
        let _ = write!(
            s,
            "| {}{} |",
            mt.label,
            if unit.is_empty() {
                String::new()
            } else {
                format!(" ({unit})")
            }
        );
        for &t in targets {
            let _ = write!(
                s,
                " {} |",
                cell_text(
                    &values(cells, p, t, mt.scenario, mt.key),
                    attempts(cells, p, t, mt.scenario),
                    mt.unit
                )
            );
        }
        let d = med(cells, p, Target::Duplex, mt.scenario, mt.key);
        let _ = writeln!(
            s,
            " {} | {} |",
            ratio(d, med(cells, p, Target::Direct, mt.scenario, mt.key)),
            ratio(d, med(cells, p, Target::Nginx, mt.scenario, mt.key))
        );
    }
    s
}

/// One row of the budget check.
pub struct Budget {
    pub what: &'static str,
    pub rule: &'static str,
    pub figure: String,
    pub met: Option<bool>,
}

/// The budgets, checked against the medians.
pub fn budgets(cells: &[Cell]) -> Vec<Budget> {
    use Placement::{OneCpu, Pinned};
    use Target::{Direct, Duplex, Haproxy, Nginx};
    let g = |p, t, sc: &str, k: &str| med(cells, p, t, sc, k);
    let kib = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{:.2} KiB", v / 1024.0));
    let mut out = Vec::new();

    let rss = g(Pinned, Duplex, "hold", "rss_per_tunnel_b");
    out.push(Budget {
        what: "RSS per idle tunnel, pinned",
        rule: "duplex ≤ 2 KiB (nginx 17.8 KB, HAProxy 4.6 KB in the issue)",
        figure: format!(
            "duplex {}; nginx {}; HAProxy {}",
            kib(rss),
            kib(g(Pinned, Nginx, "hold", "rss_per_tunnel_b")),
            kib(g(Pinned, Haproxy, "hold", "rss_per_tunnel_b"))
        ),
        met: rss.map(|v| v <= 2048.0),
    });

    let rel = |p, sc: &'static str, k: &'static str, base: Target| -> (Option<f64>, String) {
        let (d, b) = (g(p, Duplex, sc, k), g(p, base, sc, k));
        let r = match (d, b) {
            (Some(d), Some(b)) if b > 0.0 => Some(d / b),
            _ => None,
        };
        let f = |v: Option<f64>| v.map_or("n/a".into(), |v| fmt_value(v, ""));
        (
            r,
            format!(
                "duplex {} vs {base} {} = {}",
                f(d),
                f(b),
                r.map_or("n/a".into(), |r| format!("{r:.2}×"))
            ),
        )
    };

    let (r, figure) = rel(Pinned, "throughput-16k", "msgs_per_s", Direct);
    out.push(Budget {
        what: "16 KiB msgs/s, 100×8, pinned",
        rule: "duplex ≥ 0.9 × direct",
        figure,
        met: r.map(|r| r >= 0.9),
    });

    let (d, n, b) = (
        g(OneCpu, Duplex, "latency", "p50_us"),
        g(OneCpu, Nginx, "latency", "p50_us"),
        g(OneCpu, Direct, "latency", "p50_us"),
    );
    let (met, figure) = match (d, n, b) {
        (Some(d), Some(n), Some(b)) => {
            let (ad, an) = (d - b, n - b);
            (
                Some(ad <= 0.8 * an),
                format!(
                    "p50 direct {b:.1} µs, duplex {d:.1} (+{ad:.1}), nginx {n:.1} (+{an:.1}): duplex adds {:.2}× nginx's",
                    if an > 0.0 { ad / an } else { f64::NAN }
                ),
            )
        }
        _ => (None, "n/a".into()),
    };
    out.push(Budget {
        what: "64 B ping-pong p50, one CPU",
        rule: "duplex's added latency ≤ 0.8 × nginx's",
        figure,
        met,
    });

    for (what, rule, sc, k, min) in [
        (
            "64 B msgs/s, one CPU",
            "duplex ≥ 1.3 × nginx",
            "throughput-64",
            "msgs_per_s",
            1.3,
        ),
        (
            "handshakes/s, one CPU",
            "duplex ≥ 1.1 × nginx",
            "handshakes",
            "per_s",
            1.1,
        ),
        (
            "HTTP keep-alive req/s (50 conns), one CPU",
            "duplex ≥ 1.1 × nginx",
            "http",
            "req_per_s",
            1.1,
        ),
    ] {
        let (r, figure) = rel(OneCpu, sc, k, Nginx);
        out.push(Budget {
            what,
            rule,
            figure,
            met: r.map(|r| r >= min),
        });
    }
    out
}

pub fn budget_table(b: &[Budget]) -> String {
    let mut s = String::from("| budget | rule | measured (medians) | met |\n|---|---|---|:---:|\n");
    for r in b {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(s, "| {} | {} | {} | {met} |", r.what, r.rule, r.figure);
    }
    s
}

/// Object sizes of the kernel caches an idle TCP socket with a file descriptor occupies.
pub fn kernel_socket_bytes() -> Option<(u64, Vec<(String, u64)>)> {
    let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let want = [
        "TCP",
        "sock_inode_cache",
        "filp",
        "dentry",
        "eventpoll_epi",
        "eventpoll_pwq",
    ];
    let mut parts = Vec::new();
    for name in want {
        // Caches differ between kernels (eventpoll_pwq is gone in recent ones).
        let Some(line) = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
        else {
            continue;
        };
        // name active_objs num_objs objsize ...
        let size: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
        parts.push((name.to_string(), size));
    }
    if parts.first().map(|p| p.0.as_str()) != Some("TCP") {
        return None;
    }
    Some((parts.iter().map(|p| p.1).sum(), parts))
}

/// What 1M tunnels would take, from the measured duplex figure.
pub fn projection(cells: &[Cell], hard_limit: u64) -> String {
    let mut s = String::new();
    let Some(rss) = med(
        cells,
        Placement::Pinned,
        Target::Duplex,
        "hold",
        "rss_per_tunnel_b",
    )
    .or_else(|| {
        med(
            cells,
            Placement::OneCpu,
            Target::Duplex,
            "hold",
            "rss_per_tunnel_b",
        )
    }) else {
        return "No duplex hold figure in this run.\n".into();
    };
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let per_process = crate::scenario::tunnels_for_limit(hard_limit);
    let _ = writeln!(
        s,
        "- **Process memory:** {:.0} B per tunnel measured → 1,000,000 tunnels ≈ **{:.2} GiB** of duplex RSS.",
        rss,
        gib(rss * 1e6)
    );
    if let Some((per_sock, parts)) = kernel_socket_bytes() {
        let list: Vec<String> = parts.iter().map(|(n, b)| format!("{n} {b}")).collect();
        let _ = writeln!(
            s,
            "- **Kernel memory** (not in RSS): an idle socket with its descriptor takes about {per_sock} B of slab objects here ({}), two per tunnel → 1,000,000 tunnels ≈ **{:.2} GiB** in the kernel (idle sockets hold no buffers).",
            list.join(", "),
            gib(2.0 * per_sock as f64 * 1e6)
        );
    }
    let _ = writeln!(
        s,
        "- **File descriptors:** two per tunnel → 2,000,000 for 1M tunnels. At this machine's hard cap of {} open files per process, one duplex holds at most {per_process} tunnels, so 1M tunnels take {} processes (behind `SO_REUSEPORT` or several ports); on a host where it can be raised, `LimitNOFILE` ≥ 2,000,100 and `fs.nr_open` above that.",
        group(hard_limit as i64),
        1_000_000usize.div_ceil(per_process)
    );
    let _ = writeln!(
        s,
        "- **Ephemeral ports:** 1M tunnels to one backend address need 1M source ports: spread backends over ≥ {} `IP:port` pairs (≈ 28k ports each in the default range 32768–60999).",
        1_000_000usize.div_ceil(28_000)
    );
    s
}

/// Facts about the machine and the software measured.
pub fn machine() -> Vec<(String, String)> {
    let first = |cmd: &str, args: &[&str]| -> String {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "not found".into())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    vec![
        ("CPU".into(), format!("{model}, {cores} CPUs")),
        (
            "memory".into(),
            format!("{:.1} GiB", mem_kib as f64 / 1048576.0),
        ),
        ("kernel".into(), kernel.trim().to_string()),
        (
            "open files".into(),
            format!("hard limit {} per process", crate::os::nofile_hard_limit()),
        ),
        ("nginx".into(), first("nginx", &["-v"])),
        ("HAProxy".into(), first("haproxy", &["-v"])),
        ("wrk".into(), first("wrk", &["-v"])),
        ("rustc".into(), first("rustc", &["--version"])),
    ]
}

/// The generated part of docs/benchmarks.md.
/// What was measured: `duplex --version` and `git describe --always --dirty`.
pub fn revision(duplex: &Path) -> String {
    let dv = std::process::Command::new(duplex)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let rev = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("`{dv}` at `{rev}`")
}

/// Facts about one run that a merge keeps.
pub struct RunInfo {
    pub started: String,
    pub minutes: f64,
    pub revision: String,
    pub notes: Vec<String>,
}

pub fn markdown(plan: &Plan, cells: &[Cell], chart_name: &str, run: &RunInfo) -> String {
    let (started, minutes, notes) = (&run.started, run.minutes, &run.notes);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Run of {started}, {minutes:.1} minutes, {}.\n",
        run.revision
    );
    for n in notes {
        let _ = writeln!(s, "> {n}\n");
    }
    s.push_str("| machine | |\n|---|---|\n");
    for (k, v) in machine() {
        let _ = writeln!(s, "| {k} | {} |", esc(&v));
    }
    let z = &plan.sizes;
    let _ = writeln!(
        s,
        "\nEach figure is the median of {} repeats (± half the range, as a share of the median). \
         Targets were interleaved: fresh backend and proxy per cell, the order of targets rotating. \
         Throughput runs {:.0} s after a {:.0} s warm-up, handshakes and HTTP {:.0} s; \
         ping-pong {} messages after {} of warm-up; hold opens {} tunnels (the hard cap of {} open \
         files per process leaves room for at most {} two-socket tunnels in the proxy). \
         HTTP load: {}.\n",
        plan.repeats,
        z.tput_duration.as_secs_f64(),
        z.warmup.as_secs_f64(),
        z.hs_duration.as_secs_f64(),
        z.latency_count,
        z.latency_warmup,
        z.hold_tunnels,
        crate::os::nofile_hard_limit(),
        crate::os::nofile_hard_limit().saturating_sub(100) / 2,
        if z.http_wrk {
            "wrk, one thread, 50 connections"
        } else {
            "the built-in client, 50 connections"
        }
    );
    let _ = writeln!(s, "![benchmark chart]({chart_name})\n");
    for &p in &plan.placements {
        let _ = writeln!(s, "#### {}\n", p.title());
        s.push_str(&table(cells, p, &plan.targets));
        s.push('\n');
    }
    s.push_str("#### Budgets from the issue\n\n");
    s.push_str(&budget_table(&budgets(cells)));
    s.push_str("\n#### Projection to 1,000,000 idle tunnels\n\n");
    s.push_str(&projection(cells, crate::os::nofile_hard_limit()));
    let failed: Vec<&Cell> = cells.iter().filter(|c| c.result.is_err()).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\n#### Cells that failed ({})\n", failed.len());
        for c in failed.iter().take(20) {
            let err = c.result.as_ref().err().cloned().unwrap_or_default();
            let first = err.lines().next().unwrap_or("");
            let _ = writeln!(
                s,
                "- repeat {}, {}, {}, {}: {}",
                c.repeat + 1,
                c.placement.name(),
                c.scenario,
                c.target,
                esc(first)
            );
        }
    }
    s
}

pub const BEGIN: &str = "<!-- bench-results:begin (written by `duplex-bench run-all`) -->";
pub const END: &str = "<!-- bench-results:end -->";

/// Replaces the generated part of `doc` (between the markers); false if they are missing.
pub fn update_doc(doc: &Path, generated: &str) -> std::io::Result<bool> {
    let text = std::fs::read_to_string(doc)?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        return Ok(false);
    };
    if e < b {
        return Ok(false);
    }
    let new = format!(
        "{}{BEGIN}\n\n{}\n{}",
        &text[..b],
        generated.trim_end(),
        &text[e..]
    );
    std::fs::write(doc, new)?;
    Ok(true)
}

/// Every scenario name a cell can carry.
pub const SCENARIOS: [&str; 6] = [
    "latency",
    "throughput-64",
    "throughput-16k",
    "hold",
    "handshakes",
    "http",
];

/// Cells back from [`cells_json`]'s output (for `run-all --merge`).
pub fn cells_from_json(v: &Value) -> Vec<Cell> {
    let Some(list) = v["cells"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|c| {
            Some(Cell {
                repeat: c["repeat"].as_u64()? as usize,
                placement: Placement::parse(c["placement"].as_str()?)?,
                scenario: SCENARIOS
                    .into_iter()
                    .find(|s| Some(*s) == c["scenario"].as_str())?,
                target: Target::parse(c["target"].as_str()?)?,
                secs: c["secs"].as_f64().unwrap_or(0.0),
                result: match c["error"].as_str() {
                    Some(e) => Err(e.to_string()),
                    None => Ok(c["result"].clone()),
                },
            })
        })
        .collect()
}

/// The run's facts back from a results file.
pub fn run_from_json(v: &Value) -> RunInfo {
    RunInfo {
        started: v["started"].as_str().unwrap_or("?").to_string(),
        minutes: v["minutes"].as_f64().unwrap_or(0.0),
        revision: v["revision"].as_str().unwrap_or("duplex").to_string(),
        notes: v["notes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(String::from))
            .collect(),
    }
}

/// Every cell, raw, for whoever wants to check the medians.
pub fn cells_json(plan: &Plan, cells: &[Cell], run: &RunInfo) -> Value {
    json!({
        "started": run.started,
        "minutes": (run.minutes * 10.0).round() / 10.0,
        "revision": run.revision,
        "notes": run.notes,
        "repeats": plan.repeats,
        "targets": plan.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "placements": plan.placements.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "cells": cells.iter().map(|c| json!({
            "repeat": c.repeat,
            "placement": c.placement.name(),
            "scenario": c.scenario,
            "target": c.target.name(),
            "secs": (c.secs * 10.0).round() / 10.0,
            "result": c.result.as_ref().ok(),
            "error": c.result.as_ref().err(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(p: Placement, t: Target, sc: &'static str, key: &str, v: f64) -> Cell {
        Cell {
            repeat: 0,
            placement: p,
            scenario: sc,
            target: t,
            result: Ok(json!({ key: v, "ok": true })),
            secs: 1.0,
        }
    }

    #[test]
    fn medians_and_grouping() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(group(61834), "61,834");
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(fmt_value(2048.0, "B"), "2.00 KiB");
        // A median of fewer repeats than ran says so.
        assert_eq!(cell_text(&[10.0, 12.0], 2, ""), "11.0 ±9%");
        assert_eq!(cell_text(&[10.0], 3, ""), "10.0 (1 of 3)");
    }

    #[test]
    fn budgets_compare_the_right_figures() {
        use Placement::*;
        use Target::*;
        let cells = vec![
            cell(Pinned, Duplex, "hold", "rss_per_tunnel_b", 1500.0),
            cell(Pinned, Direct, "throughput-16k", "msgs_per_s", 60000.0),
            cell(Pinned, Duplex, "throughput-16k", "msgs_per_s", 50000.0),
            cell(OneCpu, Direct, "latency", "p50_us", 25.0),
            cell(OneCpu, Nginx, "latency", "p50_us", 45.0),
            cell(OneCpu, Duplex, "latency", "p50_us", 40.0),
        ];
        let b = budgets(&cells);
        assert_eq!(b[0].met, Some(true));
        assert_eq!(b[1].met, Some(false), "{}", b[1].figure);
        assert_eq!(b[2].met, Some(true), "{}", b[2].figure);
        assert_eq!(b[3].met, None);
        let svg = crate::chart::chart_svg(&cells, &Target::ALL, &Placement::ALL, "t");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
