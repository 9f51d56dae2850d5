//! `run-all`: measures every target in every placement, interleaved, repeated.
//!
//! Each cell (repeat × placement × scenario × target) starts a fresh echo backend and a
//! fresh proxy, waits until a WebSocket echo passes through, runs the scenario's load
//! generator as its own process, and stops both. Three processes, each under the
//! 20,000-file cap on its own. CPU placement is done with `taskset`:
//!
//! * pinned: the proxy alone on CPU 0; echo backend and load generator on CPU 1.
//! * one-cpu: all three on CPU 0.
//! * all-cpus: nothing pinned, and each proxy with one worker per CPU (nginx
//!   `worker_processes` and HAProxy `nbthread` at the CPU count, duplex's default).
//!
//! Within a repeat, the order of targets rotates from one scenario to the next and from
//! one repeat to the next, so slow drift of the machine hits every target alike.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::os;
use crate::scenario;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Direct,
    Duplex,
    Nginx,
    Haproxy,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Direct,
        Target::Duplex,
        Target::Nginx,
        Target::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Duplex => "duplex",
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    Pinned,
    OneCpu,
    AllCpus,
}

impl Placement {
    pub const ALL: [Placement; 3] = [Placement::Pinned, Placement::OneCpu, Placement::AllCpus];

    pub fn name(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::OneCpu => "one-cpu",
            Placement::AllCpus => "all-cpus",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Placement::Pinned => {
                "pinned (proxy alone on CPU 0; backend and load generator on CPU 1)"
            }
            Placement::OneCpu => "one CPU (proxy, backend and load generator all on CPU 0)",
            Placement::AllCpus => {
                "all CPUs (nothing pinned; each proxy with one worker or thread per CPU)"
            }
        }
    }

    /// The chart's label.
    pub fn short(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::OneCpu => "one CPU",
            Placement::AllCpus => "all CPUs",
        }
    }

    /// Whether each proxy gets one worker per CPU rather than one.
    fn auto_workers(self) -> bool {
        self == Placement::AllCpus
    }

    pub fn parse(s: &str) -> Option<Placement> {
        Placement::ALL.into_iter().find(|p| p.name() == s)
    }

    /// CPU lists for (proxy, backend, load generator); `None` runs it unpinned.
    fn cpus(
        self,
    ) -> (
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
    ) {
        match self {
            Placement::Pinned => (Some("0"), Some("1"), Some("1")),
            Placement::OneCpu => (Some("0"), Some("0"), Some("0")),
            Placement::AllCpus => (None, None, None),
        }
    }
}

/// One scenario as the runner invokes it: its name in the results and the load
/// generator's arguments (before `--target`).
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub args: Vec<String>,
    /// The load generator is killed (and the cell failed) past this.
    pub timeout: Duration,
}

/// Sizes of a run.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub latency_count: usize,
    pub latency_warmup: usize,
    pub tput_conns: usize,
    pub tput_inflight: usize,
    pub tput_duration: Duration,
    pub warmup: Duration,
    pub hold_tunnels: usize,
    pub hs_workers: usize,
    pub hs_duration: Duration,
    pub http_conns: usize,
    pub http_duration: Duration,
    pub http_wrk: bool,
}

impl Sizes {
    /// The full run: the sizes, durations cut to keep the run near 15 minutes.
    pub fn full(hold_tunnels: usize, http_wrk: bool, duration: Duration) -> Sizes {
        Sizes {
            latency_count: 20_000,
            latency_warmup: 1_000,
            tput_conns: 100,
            tput_inflight: 8,
            tput_duration: duration,
            warmup: Duration::from_secs(1),
            hold_tunnels,
            hs_workers: 32,
            hs_duration: duration,
            http_conns: 50,
            http_duration: duration,
            http_wrk,
        }
    }

    /// The sizes a set of cells was measured with, read back from their parameters.
    pub fn from_cells(cells: &[Cell]) -> Sizes {
        let param = |sc: &str, key: &str| {
            cells
                .iter()
                .filter(|c| c.scenario == sc)
                .find_map(|c| c.result.as_ref().ok()?.get(key)?.as_f64())
        };
        let secs = |v: Option<f64>| v.map(Duration::from_secs_f64);
        let mut z = Sizes::full(
            param("hold", "requested").map_or(0, |v| v as usize),
            cells.iter().any(|c| {
                c.scenario == "http" && c.result.as_ref().is_ok_and(|r| r["client"] == "wrk")
            }),
            secs(param("throughput-64", "duration_s")).unwrap_or(Duration::from_secs(5)),
        );
        if let Some(d) = secs(param("handshakes", "duration_s")) {
            z.hs_duration = d;
        }
        if let Some(d) = secs(param("http", "duration_s")) {
            z.http_duration = d;
        }
        if let Some(n) = param("latency", "count") {
            z.latency_count = n as usize;
        }
        z
    }

    /// The CI smoke: every scenario, tiny, seconds in all.
    pub fn smoke() -> Sizes {
        Sizes {
            latency_count: 300,
            latency_warmup: 20,
            tput_conns: 8,
            tput_inflight: 2,
            tput_duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
            hold_tunnels: 200,
            hs_workers: 4,
            hs_duration: Duration::from_millis(500),
            http_conns: 4,
            http_duration: Duration::from_millis(500),
            http_wrk: false,
        }
    }

    pub fn scenarios(&self) -> Vec<Scenario> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let grace = Duration::from_secs(60);
        let tput = |size: usize, name: &'static str| Scenario {
            name,
            args: vec![
                "throughput".into(),
                "--size".into(),
                size.to_string(),
                "--conns".into(),
                self.tput_conns.to_string(),
                "--inflight".into(),
                self.tput_inflight.to_string(),
                "--duration".into(),
                ms(self.tput_duration),
                "--warmup".into(),
                ms(self.warmup),
            ],
            timeout: self.tput_duration + self.warmup + grace,
        };
        vec![
            Scenario {
                name: "latency",
                args: vec![
                    "latency".into(),
                    "--count".into(),
                    self.latency_count.to_string(),
                    "--warmup".into(),
                    self.latency_warmup.to_string(),
                ],
                // Past the generator's own limit (60 s + count / 5 ms), so that its own,
                // clearer error comes first.
                timeout: grace
                    + Duration::from_millis(self.latency_count as u64 / 5)
                    + Duration::from_secs(5),
            },
            tput(64, "throughput-64"),
            tput(16 * 1024, "throughput-16k"),
            Scenario {
                name: "hold",
                args: vec![
                    "hold".into(),
                    "--tunnels".into(),
                    self.hold_tunnels.to_string(),
                ],
                timeout: grace * 2 + Duration::from_millis(self.hold_tunnels as u64 * 10),
            },
            Scenario {
                name: "handshakes",
                args: vec![
                    "handshakes".into(),
                    "--workers".into(),
                    self.hs_workers.to_string(),
                    "--duration".into(),
                    ms(self.hs_duration),
                    "--warmup".into(),
                    ms(self.warmup / 2),
                ],
                timeout: self.hs_duration + self.warmup + grace,
            },
            Scenario {
                name: "http",
                args: vec![
                    "http".into(),
                    "--conns".into(),
                    self.http_conns.to_string(),
                    "--duration".into(),
                    ms(self.http_duration),
                    "--warmup".into(),
                    ms(self.warmup),
                    "--client".into(),
                    if self.http_wrk { "wrk" } else { "builtin" }.into(),
                ],
                timeout: self.http_duration + self.warmup + grace,
            },
        ]
    }
}

/// Everything a run needs to know.
#[derive(Clone, Debug)]
pub struct Plan {
    pub bench: PathBuf,
    pub duplex: PathBuf,
    pub targets: Vec<Target>,
    pub placements: Vec<Placement>,
    pub repeats: usize,
    pub sizes: Sizes,
    /// Scenario names to run (all when empty).
    pub only: Vec<String>,
    /// Configs and logs go here.
    pub work: PathBuf,
    /// Pin with taskset (off where it is missing or there is one CPU).
    pub pin: bool,
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Cell {
    pub repeat: usize,
    pub placement: Placement,
    pub scenario: &'static str,
    pub target: Target,
    pub result: Result<Value, String>,
    pub secs: f64,
}

/// Runs the plan; `progress` sees every cell as it ends.
pub fn run(plan: &Plan, mut progress: impl FnMut(usize, usize, &Cell)) -> Vec<Cell> {
    let scenarios: Vec<Scenario> = plan
        .sizes
        .scenarios()
        .into_iter()
        .filter(|s| plan.only.is_empty() || plan.only.iter().any(|o| o == s.name))
        .collect();
    let total = plan.repeats * plan.placements.len() * scenarios.len() * plan.targets.len();
    let mut cells = Vec::with_capacity(total);
    for repeat in 0..plan.repeats {
        // The order of targets rotates from row to row, and each repeat starts a row one
        // place further on, so a row's repeats run its targets in different orders.
        let mut row = 0;
        for &placement in &plan.placements {
            for sc in &scenarios {
                let k = plan.targets.len();
                for i in 0..k {
                    let target = plan.targets[(i + row + repeat) % k];
                    let t0 = Instant::now();
                    let result = run_cell(plan, placement, sc, target, repeat);
                    let cell = Cell {
                        repeat,
                        placement,
                        scenario: sc.name,
                        target,
                        result,
                        secs: t0.elapsed().as_secs_f64(),
                    };
                    progress(cells.len() + 1, total, &cell);
                    cells.push(cell);
                }
                row += 1;
            }
        }
    }
    cells
}

/// A child process that is stopped when dropped: SIGTERM, a bounded wait, then SIGKILL.
struct Proc {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!(
                "{} exited ({st}); log {}:\n{}",
                self.what,
                self.log.display(),
                tail(&self.log)
            )),
            _ => None,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            os::signal(self.child.id(), libc::SIGTERM);
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A command, under `taskset -c cpus` when pinning and given CPUs.
fn pinned(plan: &Plan, cpus: Option<&str>, program: &Path, args: &[String]) -> Command {
    match cpus {
        Some(cpus) if plan.pin => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program).args(args);
            c
        }
        _ => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }
}

fn spawn(mut cmd: Command, what: &str, log: PathBuf) -> Result<Proc, String> {
    let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    Ok(Proc {
        child,
        what: what.into(),
        log,
    })
}

/// A loopback port free right now.
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Waits until `addr` upgrades and echoes, or `p` exits, or `limit` passes.
fn wait_ready(addr: SocketAddr, p: &mut Proc, limit: Duration) -> Result<(), String> {
    let end = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < end {
        if let Some(why) = p.exited() {
            return Err(why);
        }
        match scenario::probe(addr) {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} not ready at {addr} after {limit:?}: {last}; log {}:\n{}",
        p.what,
        p.log.display(),
        tail(&p.log)
    ))
}

fn run_cell(
    plan: &Plan,
    placement: Placement,
    sc: &Scenario,
    target: Target,
    repeat: usize,
) -> Result<Value, String> {
    let (proxy_cpu, backend_cpu, load_cpu) = placement.cpus();
    let tag = format!(
        "r{repeat}-{}-{}-{}",
        placement.name(),
        sc.name,
        target.name()
    );
    let dir = plan.work.join(&tag);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    let backend_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut backend = spawn(
        pinned(
            plan,
            backend_cpu,
            &plan.bench,
            &["echo".into(), "--listen".into(), backend_addr.to_string()],
        ),
        "echo backend",
        dir.join("backend.log"),
    )?;
    wait_ready(backend_addr, &mut backend, Duration::from_secs(10))?;

    let (proxy, addr, mem_pids) = match target {
        Target::Direct => (None, backend_addr, Vec::new()),
        _ => {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
            let workers = placement.auto_workers().then(cpu_count);
            let cmd = proxy_command(plan, target, &dir, addr, backend_addr, proxy_cpu, workers)?;
            let mut p = spawn(cmd, target.name(), dir.join("proxy.log"))?;
            wait_ready(addr, &mut p, Duration::from_secs(15))?;
            // nginx serves from its workers; its master only supervises.
            let pids = match target {
                Target::Nginx => {
                    let kids = os::children(p.pid());
                    let want = workers.unwrap_or(1);
                    if kids.len() != want {
                        return Err(format!("nginx has workers {kids:?}, expected {want}"));
                    }
                    kids
                }
                _ => vec![p.pid()],
            };
            (Some(p), addr, pids)
        }
    };

    let mut args = sc.args.clone();
    args.extend(["--target".into(), addr.to_string()]);
    args.extend(["--label".into(), target.name().into()]);
    if sc.name == "hold" && !mem_pids.is_empty() {
        let pids: Vec<String> = mem_pids.iter().map(u32::to_string).collect();
        args.extend(["--pid".into(), pids.join(",")]);
    }
    let cmd = pinned(plan, load_cpu, &plan.bench, &args);
    let res = run_load(cmd, sc.timeout, &dir.join("load.log"));
    drop(proxy);
    drop(backend);
    let json = res?;
    if json["ok"] == Value::Bool(true) {
        Ok(json)
    } else {
        Err(format!("scenario failed: {}", json["errors"]))
    }
}

/// Runs the load generator to its end (killed at `timeout`); returns its JSON line.
fn run_load(mut cmd: Command, timeout: Duration, log: &Path) -> Result<Value, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the load generator: {e}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if let Ok(mut f) = std::fs::File::create(log) {
        let _ = write!(f, "{stdout}\n--- stderr\n{stderr}");
    }
    let Some(status) = status else {
        return Err(format!("load generator killed after {timeout:?}"));
    };
    let json = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str::<Value>(l).ok());
    match json {
        Some(j) => Ok(j),
        None => Err(format!(
            "load generator exited {status} without a result: {}",
            stderr.trim()
        )),
    }
}

/// The CPUs this machine has (what "auto" workers come to).
fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The proxy's command line, after writing its config into `dir`. `workers` is `None` for
/// one worker, or the CPU count when each proxy gets one per CPU.
fn proxy_command(
    plan: &Plan,
    target: Target,
    dir: &Path,
    addr: SocketAddr,
    backend: SocketAddr,
    cpu: Option<&str>,
    workers: Option<usize>,
) -> Result<Command, String> {
    let hard = os::nofile_hard_limit();
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    };
    let s = |p: &Path| p.to_string_lossy().into_owned();
    Ok(match target {
        Target::Direct => unreachable!("direct has no proxy"),
        Target::Duplex => {
            let admin = ([127, 0, 0, 1], free_port()?).into();
            let cfg = write("duplex.yaml", duplex_config(addr, admin, backend))?;
            // One worker: `--threads 1` says so even where taskset is missing. Auto: the
            // default, one thread per CPU it may run on.
            let mut args = vec!["run".into(), "--config".into(), s(&cfg)];
            if workers.is_none() {
                args.extend(["--threads".into(), "1".into()]);
            }
            pinned(plan, cpu, &plan.duplex, &args)
        }
        Target::Nginx => {
            let cfg = write(
                "nginx.conf",
                nginx_config(addr, backend, hard, dir, workers),
            )?;
            pinned(
                plan,
                cpu,
                Path::new("nginx"),
                &["-p".into(), s(dir), "-c".into(), s(&cfg)],
            )
        }
        Target::Haproxy => {
            let cfg = write("haproxy.cfg", haproxy_config(addr, backend, hard, workers))?;
            pinned(
                plan,
                cpu,
                Path::new("haproxy"),
                &["-db".into(), "-f".into(), s(&cfg)],
            )
        }
    })
}

/// duplex: one listener, admin on another port, one route, one upstream, `least_conn`.
pub fn duplex_config(addr: SocketAddr, admin: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "# duplex-bench: one listener, one route, one upstream (the echo backend).\n\
         listeners:\n  - name: bench\n    bind: \"{addr}\"\n\
         admin:\n  bind: \"{admin}\"\n\
         shutdown_timeout: 1s\n\
         routes:\n  - name: echo\n    upstream: echo\n\
         upstreams:\n  - name: echo\n    balancer: least_conn\n    backends:\n      - addr: \"{backend}\"\n"
    )
}

/// nginx: one worker (or `workers`, one per CPU), as many connections
/// as the file limit allows, WebSocket proxying as its documentation describes, keep-alive
/// to the backend for plain HTTP.
pub fn nginx_config(
    addr: SocketAddr,
    backend: SocketAddr,
    nofile: u64,
    dir: &Path,
    workers: Option<usize>,
) -> String {
    let d = dir.display();
    let conns = nofile + nofile / 8;
    // The count is written out rather than `auto`: nginx's `auto` counts online CPUs,
    // which a CPU quota or affinity may not let it use.
    let processes = workers.unwrap_or(1);
    format!(
        "# duplex-bench: nginx as a WebSocket reverse proxy.
daemon off;
master_process on;
worker_processes {processes};
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    # nginx starts closing idle connections (including ones still waiting for their
    # request) once no more than 1/16 of these are free (ngx_drain_connections), so the
    # count must exceed the 2 x tunnels it should hold by more than that; the file limit
    # still caps the sockets.
    worker_connections {conns};
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    keepalive_requests 1000000;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    upstream echo {{
        least_conn;
        server {backend};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen {addr} backlog=4096;
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"
    )
}

/// HAProxy: one thread (or `workers`), `maxconn` sized to the file limit (two sockets per
/// connection), a long `timeout tunnel` for WebSockets.
pub fn haproxy_config(
    addr: SocketAddr,
    backend: SocketAddr,
    nofile: u64,
    workers: Option<usize>,
) -> String {
    let maxconn = nofile.saturating_sub(100) / 2;
    let threads = workers.unwrap_or(1);
    format!(
        "# duplex-bench: HAProxy as a WebSocket reverse proxy.
global
    nbthread {threads}
    maxconn {maxconn}

defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout tunnel 1h

frontend bench
    bind {addr}
    default_backend echo

backend echo
    balance leastconn
    server echo {backend}
"
    )
}

/// Whether a program can be started (found in PATH).
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        || Path::new(program).is_file()
}
