//! The `duplex-bench` command: the echo backend, one scenario against one address, or the
//! whole comparison (`run-all`, `run-all --smoke` for CI).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use duplex_bench::report::Outcome;
use duplex_bench::runner::{self, Placement, Plan, Sizes, Target};
use duplex_bench::{chart, echo, os, results, scenario};

#[derive(Parser)]
#[command(
    name = "duplex-bench",
    version,
    about = "Measures duplex against direct, nginx and HAProxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

fn dur(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, ValueEnum)]
enum HttpClient {
    Builtin,
    Wrk,
}

#[derive(Subcommand)]
enum Cmd {
    /// The echo backend: WebSocket echo and plain HTTP 200, one thread.
    Echo {
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        /// Exit by itself after this long.
        #[arg(long, value_parser = dur, default_value = "3h")]
        max_time: Duration,
    },
    /// One connection, strict ping-pong: p50/p90/p99/max.
    Latency {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "target")]
        label: String,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 1_000)]
        warmup: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Many connections, several messages in flight each: messages/s, MB/s, p99.
    Throughput {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "target")]
        label: String,
        #[arg(long, default_value_t = 100)]
        conns: usize,
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, value_parser = dur, default_value = "10s")]
        duration: Duration,
        #[arg(long, value_parser = dur, default_value = "1s")]
        warmup: Duration,
    },
    /// N idle tunnels: the proxy's RSS per tunnel; then every tunnel must echo.
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "target")]
        label: String,
        /// How many tunnels; by default as many as the open-file hard limit lets a proxy hold.
        #[arg(long)]
        tunnels: Option<usize>,
        /// The proxy's processes whose VmRSS is read and summed (comma-separated).
        #[arg(long, value_delimiter = ',')]
        pid: Vec<u32>,
        /// The pause before each memory reading: the tunnels are idle, and a proxy that
        /// tidies up after a burst of connections (duplex trims its heap once accepts
        /// have been quiet for a second) is measured as it settles.
        #[arg(long, value_parser = dur, default_value = "3s")]
        settle: Duration,
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Keep the tunnels open this long after measuring (to inspect the proxy).
        #[arg(long, value_parser = dur, default_value = "0s")]
        linger: Duration,
    },
    /// Connect, upgrade, echo, close, in loops: handshakes/s and p99 handshake time.
    Handshakes {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "target")]
        label: String,
        #[arg(long, default_value_t = 32)]
        workers: usize,
        #[arg(long, value_parser = dur, default_value = "10s")]
        duration: Duration,
        #[arg(long, value_parser = dur, default_value = "500ms")]
        warmup: Duration,
    },
    /// Plain HTTP GET over keep-alive connections: requests/s, p99.
    Http {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "target")]
        label: String,
        #[arg(long, default_value_t = 50)]
        conns: usize,
        #[arg(long, value_parser = dur, default_value = "10s")]
        duration: Duration,
        /// Ignored by wrk, which has no warm-up.
        #[arg(long, value_parser = dur, default_value = "1s")]
        warmup: Duration,
        #[arg(long, value_enum, default_value_t = HttpClient::Builtin)]
        client: HttpClient,
    },
    /// Writes the doc section and the chart again from a results file, measuring nothing.
    Report {
        #[arg(long, default_value = "docs/benchmarks-results.json")]
        results: PathBuf,
        #[arg(long, default_value = "docs/benchmarks.md")]
        doc: PathBuf,
    },
    /// Prints the config `run-all` gives a proxy (one worker), for measuring it by hand
    /// (`cost.sh` does).
    Config {
        #[arg(value_enum)]
        proxy: ConfigFor,
        /// Where the proxy listens.
        listen: SocketAddr,
        /// The echo backend.
        backend: SocketAddr,
        /// duplex's admin endpoint.
        #[arg(long, default_value = "127.0.0.1:0")]
        admin: SocketAddr,
        /// nginx's pid, log and temporary files go here.
        #[arg(long, default_value = "/tmp")]
        dir: PathBuf,
    },
    /// Every scenario against every target in every placement, repeated; writes the doc.
    RunAll(RunAllArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum ConfigFor {
    Duplex,
    Nginx,
    Haproxy,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every role holds many sockets: take the whole allowance.
    let _ = os::raise_nofile_limit();
    match cli.command {
        Cmd::Echo { listen, max_time } => {
            let rt = current_thread();
            rt.block_on(async move {
                let l = match echo::bind(listen) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("echo: cannot listen on {listen}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                println!("listening {listen}");
                tokio::select! {
                    _ = echo::serve(l) => {}
                    _ = tokio::time::sleep(max_time) => eprintln!("echo: {max_time:?} passed; exiting"),
                }
                ExitCode::SUCCESS
            })
        }
        Cmd::Latency {
            target,
            label,
            count,
            warmup,
            size,
        } => finish(scenario::latency(
            target,
            &label,
            &scenario::LatencyOpts {
                count,
                warmup,
                size,
                max_time: Duration::from_secs(60) + Duration::from_millis(count as u64 / 5),
            },
        )),
        Cmd::Throughput {
            target,
            label,
            conns,
            inflight,
            size,
            duration,
            warmup,
        } => finish(current_thread().block_on(scenario::throughput(
            target,
            &label,
            &scenario::ThroughputOpts {
                conns,
                inflight,
                size,
                duration,
                warmup,
            },
        ))),
        Cmd::Hold {
            target,
            label,
            tunnels,
            pid,
            settle,
            concurrency,
            linger,
        } => {
            let hard = os::nofile_hard_limit();
            let fit = scenario::tunnels_for_limit(hard);
            let n = tunnels.unwrap_or(fit);
            println!(
                "open files are capped at {hard} per process: a proxy holds at most {} two-socket tunnels; holding {n}",
                hard.saturating_sub(100) / 2
            );
            let mut o = current_thread().block_on(scenario::hold(
                target,
                &label,
                &scenario::HoldOpts {
                    tunnels: n,
                    pids: pid,
                    settle,
                    concurrency,
                    linger,
                },
            ));
            o.param("nofile_hard_limit", hard);
            finish(o)
        }
        Cmd::Handshakes {
            target,
            label,
            workers,
            duration,
            warmup,
        } => finish(current_thread().block_on(scenario::handshakes(
            target,
            &label,
            &scenario::HandshakeOpts {
                workers,
                duration,
                warmup,
            },
        ))),
        Cmd::Http {
            target,
            label,
            conns,
            duration,
            warmup,
            client,
        } => {
            let o = scenario::HttpOpts {
                conns,
                duration,
                warmup,
            };
            finish(match client {
                HttpClient::Wrk => scenario::http_wrk(target, &label, &o),
                HttpClient::Builtin => {
                    current_thread().block_on(scenario::http(target, &label, &o))
                }
            })
        }
        Cmd::Report { results, doc } => report(&results, &doc),
        Cmd::Config {
            proxy,
            listen,
            backend,
            admin,
            dir,
        } => {
            let nofile = os::nofile_hard_limit();
            print!(
                "{}",
                match proxy {
                    ConfigFor::Duplex => runner::duplex_config(listen, admin, backend),
                    ConfigFor::Nginx => runner::nginx_config(listen, backend, nofile, &dir, None),
                    ConfigFor::Haproxy => runner::haproxy_config(listen, backend, nofile, None),
                }
            );
            ExitCode::SUCCESS
        }
        Cmd::RunAll(args) => run_all(args),
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn finish(o: Outcome) -> ExitCode {
    print!("{}", o.render());
    if o.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(clap::Args)]
struct RunAllArgs {
    /// The duplex binary (default: next to this one).
    #[arg(long)]
    duplex: Option<PathBuf>,
    /// Comma-separated: direct, duplex, nginx, haproxy.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Comma-separated: pinned, one-cpu.
    #[arg(long, value_delimiter = ',')]
    placements: Vec<String>,
    /// Comma-separated scenario names to run (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Length of each throughput, handshake and HTTP run.
    #[arg(long, value_parser = dur, default_value = "5s")]
    duration: Duration,
    /// Tunnels for `hold` (default: what the open-file hard limit allows).
    #[arg(long)]
    tunnels: Option<usize>,
    /// Where configs and logs of each cell go.
    #[arg(long, default_value = "target/duplex-bench")]
    work: PathBuf,
    /// The doc whose generated part is rewritten; the chart and the raw results go
    /// beside it (benchmarks.svg, benchmarks-results.json).
    #[arg(long, default_value = "docs/benchmarks.md")]
    doc: PathBuf,
    /// Leave the doc, chart and results file alone.
    #[arg(long)]
    no_doc: bool,
    /// Do not pin with taskset.
    #[arg(long)]
    no_pin: bool,
    /// The CI smoke: duplex and direct, one placement, tiny sizes; no doc; exit 1 on any
    /// failure.
    #[arg(long)]
    smoke: bool,
    /// A results file of an earlier run (benchmarks-results.json): its cells for the
    /// targets, placements and scenarios measured now are replaced, the rest kept, and
    /// the doc is written from the union (to measure a row again after a fix).
    #[arg(long)]
    merge: Option<PathBuf>,
}

fn run_all(a: RunAllArgs) -> ExitCode {
    let Ok(bench) = std::env::current_exe() else {
        eprintln!("cannot find this program's path");
        return ExitCode::FAILURE;
    };
    let duplex = a.duplex.unwrap_or_else(|| bench.with_file_name("duplex"));
    if !duplex.is_file() {
        eprintln!(
            "no duplex binary at {} (build it: cargo build --release -p duplex)",
            duplex.display()
        );
        return ExitCode::FAILURE;
    }
    let mut targets = Vec::new();
    let names = if a.targets.is_empty() {
        if a.smoke {
            vec!["direct".to_string(), "duplex".to_string()]
        } else {
            Target::ALL.iter().map(|t| t.name().to_string()).collect()
        }
    } else {
        a.targets
    };
    for n in names {
        let Some(t) = Target::parse(&n) else {
            eprintln!("unknown target {n:?} (direct, duplex, nginx, haproxy)");
            return ExitCode::FAILURE;
        };
        let program = match t {
            Target::Nginx => Some("nginx"),
            Target::Haproxy => Some("haproxy"),
            _ => None,
        };
        if let Some(p) = program.filter(|p| !runner::have(p)) {
            eprintln!("warning: {p} is not installed; leaving {t} out (run.sh installs it)");
            continue;
        }
        targets.push(t);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = !a.no_pin && runner::have("taskset") && cpus >= 2;
    if !pin {
        eprintln!(
            "warning: not pinning (taskset missing, --no-pin, or one CPU): placements are nominal"
        );
    }
    let mut placements = Vec::new();
    let pnames = if a.placements.is_empty() {
        if a.smoke {
            vec!["one-cpu".to_string()]
        } else {
            Placement::ALL
                .iter()
                .map(|p| p.name().to_string())
                .collect()
        }
    } else {
        a.placements
    };
    for n in pnames {
        match Placement::parse(&n) {
            Some(p) => placements.push(p),
            None => {
                eprintln!("unknown placement {n:?} (pinned, one-cpu)");
                return ExitCode::FAILURE;
            }
        }
    }
    let hard = os::nofile_hard_limit();
    let wrk = runner::have("wrk");
    let mut sizes = if a.smoke {
        Sizes::smoke()
    } else {
        Sizes::full(
            a.tunnels
                .unwrap_or_else(|| scenario::tunnels_for_limit(hard)),
            wrk,
            a.duration,
        )
    };
    if let Some(t) = a.tunnels {
        sizes.hold_tunnels = t;
    }
    if !a.smoke && !wrk {
        eprintln!("warning: wrk is not installed; the http scenario uses the built-in client");
    }
    let work = if a.smoke {
        std::env::temp_dir().join(format!("duplex-bench-smoke-{}", std::process::id()))
    } else {
        a.work
    };
    // Absolute: nginx resolves paths against its prefix, not our working directory.
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("cannot create {}: {e}", work.display());
        return ExitCode::FAILURE;
    }
    let work = std::fs::canonicalize(&work).unwrap_or(work);
    let plan = Plan {
        bench,
        duplex,
        targets,
        placements,
        repeats: if a.smoke { 1 } else { a.repeats.max(1) },
        sizes,
        only: a.only,
        work,
        pin,
    };
    println!(
        "open files: hard limit {hard} per process, so a proxy holds at most {} tunnels; hold uses {}",
        hard.saturating_sub(100) / 2,
        plan.sizes.hold_tunnels
    );
    println!(
        "targets {:?}, placements {:?}, {} repeats; work dir {}",
        plan.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        plan.placements.iter().map(|p| p.name()).collect::<Vec<_>>(),
        plan.repeats,
        plan.work.display()
    );
    let started = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let revision = results::revision(&plan.duplex);
    let t0 = Instant::now();
    let cells = runner::run(&plan, |i, total, c| {
        let summary = match &c.result {
            Ok(j) => headline(c.scenario, j),
            Err(e) => format!("FAILED: {}", e.lines().next().unwrap_or("")),
        };
        println!(
            "[{i:>3}/{total}] r{} {:<8} {:<15} {:<8} {:>5.1}s  {summary}",
            c.repeat + 1,
            c.placement.name(),
            c.scenario,
            c.target.name(),
            c.secs
        );
    });
    let failed = cells.iter().filter(|c| c.result.is_err()).count();
    let this_run = results::RunInfo {
        started,
        minutes: t0.elapsed().as_secs_f64() / 60.0,
        revision,
        notes: Vec::new(),
    };
    let (plan, cells, run) = match &a.merge {
        None => (plan, cells, this_run),
        Some(path) => match merge(path, plan, cells, this_run) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("cannot merge with {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    for &p in &plan.placements {
        println!("\n{}\n", p.title());
        print!("{}", results::table(&cells, p, &plan.targets));
    }
    if !a.smoke && !a.no_doc {
        write_doc(&a.doc, &plan, &cells, &run);
        println!("\n{}", results::budget_table(&results::budgets(&cells)));
    }
    println!(
        "{} cells in the results, {failed} failed in this run",
        cells.len()
    );
    if a.smoke {
        let _ = std::fs::remove_dir_all(&plan.work);
    }
    if failed > 0 && a.smoke {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The one figure of a scenario worth showing in the progress line.
fn headline(scenario: &str, j: &serde_json::Value) -> String {
    let f = |k: &str| j.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    match scenario {
        "latency" => format!("p50 {:.1} us  p99 {:.1} us", f("p50_us"), f("p99_us")),
        "hold" => match j.get("rss_per_tunnel_b").and_then(|v| v.as_f64()) {
            Some(b) => format!("{} tunnels, {b:.0} B/tunnel, all echoed", f("tunnels")),
            None => format!("{} tunnels, all echoed (no proxy to weigh)", f("tunnels")),
        },
        "handshakes" => format!("{:.0}/s  p99 {:.2} ms", f("per_s"), f("p99_ms")),
        "http" => format!("{:.0} req/s  p99 {:.0} us", f("req_per_s"), f("p99_us")),
        _ => format!(
            "{:.0} msg/s  {:.1} MB/s  p99 {:.0} us",
            f("msgs_per_s"),
            f("mb_per_s"),
            f("p99_us")
        ),
    }
}

/// Replaces the cells of an earlier run's results file that this run measured again.
/// Returns the merged plan (all targets and placements), the cells, and the earlier run's
/// facts with a note saying what was replaced.
fn merge(
    path: &std::path::Path,
    plan: Plan,
    cells: Vec<runner::Cell>,
    this: results::RunInfo,
) -> Result<(Plan, Vec<runner::Cell>, results::RunInfo), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let old: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let redone = |c: &runner::Cell| {
        plan.targets.contains(&c.target)
            && plan.placements.contains(&c.placement)
            && cells.iter().any(|n| n.scenario == c.scenario)
    };
    let before = results::cells_from_json(&old);
    if before.is_empty() {
        return Err("no cells in it".into());
    }
    let replaced = before.iter().filter(|c| redone(c)).count();
    let mut all: Vec<runner::Cell> = before.into_iter().filter(|c| !redone(c)).collect();
    let mut merged = plan.clone();
    for c in &all {
        if !merged.targets.contains(&c.target) {
            merged.targets.push(c.target);
        }
        if !merged.placements.contains(&c.placement) {
            merged.placements.push(c.placement);
        }
    }
    merged.targets.sort();
    merged.placements.sort();
    merged.repeats = merged
        .repeats
        .max(old["repeats"].as_u64().unwrap_or(1) as usize);
    let mut what: Vec<&str> = cells.iter().map(|c| c.scenario).collect();
    what.sort();
    what.dedup();
    let mut notes: Vec<String> = old["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(String::from))
        .collect();
    notes.push(format!(
        "{} cells ({}; {}; {}) were measured again on {} ({:.1} minutes, {}) and replace {replaced} cells of the run above.",
        cells.len(),
        plan.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
        plan.placements.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        what.join(", "),
        this.started,
        this.minutes,
        this.revision,
    ));
    let run = results::RunInfo {
        started: old["started"].as_str().unwrap_or(&this.started).to_string(),
        minutes: old["minutes"].as_f64().unwrap_or(this.minutes),
        revision: old["revision"]
            .as_str()
            .unwrap_or(&this.revision)
            .to_string(),
        notes,
    };
    all.extend(cells);
    Ok((merged, all, run))
}

/// Writes the chart, the raw results and the generated part of `doc`.
fn write_doc(doc: &std::path::Path, plan: &Plan, cells: &[runner::Cell], run: &results::RunInfo) {
    let dir = doc.parent().map(PathBuf::from).unwrap_or_default();
    let chart = dir.join("benchmarks.svg");
    let raw = dir.join("benchmarks-results.json");
    let svg = chart::chart_svg(
        cells,
        &plan.targets,
        &plan.placements,
        "duplex vs nginx vs HAProxy: WebSocket proxying (medians)",
    );
    let gen = results::markdown(plan, cells, "benchmarks.svg", run);
    let json =
        serde_json::to_string_pretty(&results::cells_json(plan, cells, run)).unwrap_or_default();
    for (path, text) in [(&chart, svg), (&raw, json)] {
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    match results::update_doc(doc, &gen) {
        Ok(true) => println!(
            "\nwrote {}, {} and {}",
            doc.display(),
            chart.display(),
            raw.display()
        ),
        Ok(false) => {
            let side = dir.join("benchmarks-generated.md");
            let _ = std::fs::write(&side, &gen);
            println!(
                "\n{} has no result markers; wrote {}",
                doc.display(),
                side.display()
            );
        }
        Err(e) => eprintln!("cannot update {}: {e}", doc.display()),
    }
}

fn report(path: &std::path::Path, doc: &std::path::Path) -> ExitCode {
    let v: serde_json::Value = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cannot read {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let cells = results::cells_from_json(&v);
    if cells.is_empty() {
        eprintln!("no cells in {}", path.display());
        return ExitCode::FAILURE;
    }
    let names = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    };
    let mut targets: Vec<Target> = names("targets")
        .iter()
        .filter_map(|n| Target::parse(n))
        .collect();
    let mut placements: Vec<Placement> = names("placements")
        .iter()
        .filter_map(|n| Placement::parse(n))
        .collect();
    for c in &cells {
        if !targets.contains(&c.target) {
            targets.push(c.target);
        }
        if !placements.contains(&c.placement) {
            placements.push(c.placement);
        }
    }
    targets.sort();
    placements.sort();
    let plan = Plan {
        bench: PathBuf::new(),
        duplex: PathBuf::new(),
        targets,
        placements,
        repeats: v["repeats"].as_u64().unwrap_or(1) as usize,
        sizes: Sizes::from_cells(&cells),
        only: Vec::new(),
        work: PathBuf::new(),
        pin: true,
    };
    let run = results::run_from_json(&v);
    write_doc(doc, &plan, &cells, &run);
    println!("\n{}", results::budget_table(&results::budgets(&cells)));
    ExitCode::SUCCESS
}
