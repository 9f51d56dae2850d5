//! The `duplex` command: run the proxy, check a config, or start the demo.

#![deny(unsafe_code)]

mod demo;
mod os;
mod trim;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use duplex_config::Config;
use duplex_proxy::Proxy;

#[derive(Parser)]
#[command(
    name = "duplex",
    version,
    about = "A reverse proxy and load balancer for WebSocket traffic"
)]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Worker threads (default: the CPUs this process may run on). With one, duplex runs
    /// everything on a single thread, the cheapest way to serve from one core, as an
    /// nginx with one worker does. Read at start; a reload does not change it.
    #[arg(long, global = true, value_name = "N", value_parser = thread_count)]
    threads: Option<NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground.
    Run {
        /// The YAML configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Do not reload when the file changes (SIGHUP and POST /reload still do).
        #[arg(long)]
        no_watch: bool,
    },
    /// Validate a configuration file and print a summary.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start the proxy with three built-in demo backends; no files needed.
    Demo {
        /// The port the demo proxy listens on (127.0.0.1).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The port of the demo's admin endpoint (metrics).
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, no_watch } => match Config::load(&config) {
            Ok(c) => serve(c, Some((config, !no_watch)), None, cli.threads),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo { port, admin_port } => demo::run(port, admin_port, cli.threads),
    }
}

/// `--threads`: a whole number of at least 1, said in those words when it is not.
fn thread_count(s: &str) -> Result<NonZeroUsize, &'static str> {
    match s.trim().parse::<usize>() {
        Ok(n) => NonZeroUsize::new(n).ok_or("at least 1 thread is needed"),
        Err(_) => Err("expected a whole number of threads, such as 1 or 4"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, and never with NO_COLOR set: a file, a
    // pipe or a container's log collector gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let loaded = Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
        // Certificates and keys are read and checked as a start would.
        duplex_proxy::tls::check(&c)
            .map(|()| c)
            .map_err(|e| format!("{}: {e}", path.display()))
    });
    match loaded {
        Ok(c) => {
            // A closed pipe (`duplex check ... | head`) is not an error worth a panic.
            let _ = print_summary(path, &c, &mut std::io::stdout().lock());
            // Advice, not errors: the file is valid, and the exit status says so.
            for a in duplex_config::advice(&c) {
                eprintln!("{}: warning: {a}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn print_summary(
    path: &std::path::Path,
    c: &Config,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let backends: usize = c
        .upstreams
        .iter()
        .map(|u| u.backends.len() + u.discovered.len())
        .sum();
    writeln!(
        out,
        "{}: ok: {} listeners, {} routes, {} upstreams, {} backends",
        path.display(),
        c.listeners.len(),
        c.routes.len(),
        c.upstreams.len(),
        backends
    )?;
    for l in &c.listeners {
        let tls = l.tls.as_ref().map_or(String::new(), |t| {
            format!(" (tls, {} certificates)", t.certificates.len())
        });
        let redirect = l.redirect_https.map_or(String::new(), |port| {
            format!(" (plain HTTP redirected to https port {port})")
        });
        writeln!(out, "  listener {} on {}{tls}{redirect}", l.name, l.bind)?;
    }
    writeln!(out, "  admin on {}", c.admin.bind)?;
    for r in &c.routes {
        let on = if r.listeners.is_empty() {
            String::new()
        } else {
            format!(" (listeners {})", r.listeners.join(", "))
        };
        writeln!(out, "  route {} -> upstream {}{on}", r.name, r.upstream)?;
    }
    for u in &c.upstreams {
        let mut addrs: Vec<String> = u
            .backends
            .iter()
            .map(|b| format!("{} (weight {})", b.addr, b.weight))
            .collect();
        addrs.extend(
            u.discovered
                .iter()
                .map(|d| format!("{}:{} (dns, weight {})", d.host, d.port, d.weight)),
        );
        let health = u.health_check.as_ref().map_or(String::new(), |h| {
            format!(", {:?} health check", h.kind).to_lowercase()
        });
        writeln!(
            out,
            "  upstream {} ({}{health}): {}",
            u.name,
            u.balancer.as_str(),
            addrs.join(", ")
        )?;
    }
    Ok(())
}

/// Runs once the proxy is up, inside the runtime.
pub(crate) type Banner = Box<dyn FnOnce(&Proxy) + Send>;

/// Runs the proxy until SIGTERM or SIGINT, then drains within `shutdown_timeout`.
/// `source` is the config file and whether to watch it; SIGHUP reloads it.
/// `banner` runs inside the runtime once the proxy is up (the demo starts its backends there).
/// `threads` is the number of worker threads (default: the CPUs it may run on).
pub(crate) fn serve(
    config: Config,
    source: Option<(PathBuf, bool)>,
    banner: Option<Banner>,
    threads: Option<NonZeroUsize>,
) -> ExitCode {
    // Lets a client that reads slowly but steadily be told from one that stopped.
    duplex_proxy::set_queue_probe(os::unacknowledged);
    match os::raise_nofile_limit() {
        Ok((soft, hard)) => {
            tracing::info!(soft, hard, "open file limit");
            duplex_proxy::limits::set_open_file_limit(soft);
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
    let threads = threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    // One thread: tokio's current-thread scheduler, with no work stealing and no wake-ups
    // across threads (about 10% more HTTP requests per core than a one-worker pool).
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    tracing::info!(threads, "worker threads");
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duplex: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async move {
        let mut signals = match StopSignals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("duplex: cannot install the SIGTERM/SIGINT handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let hup = source
            .as_ref()
            .and_then(|_| duplex_proxy::triggers::sighup());
        let path = source.as_ref().map(|(p, _)| p.clone());
        let proxy = match Proxy::start(config, path.clone(), Arc::new(metrics_registry())).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("duplex: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(banner) = banner {
            banner(&proxy);
        }
        trim::start(proxy.clone());
        if let Some((path, watch)) = source {
            if let Some(hup) = hup {
                duplex_proxy::triggers::reload_on_sighup(proxy.clone(), hup);
            }
            if watch {
                duplex_proxy::triggers::watch_file(path, proxy.clone());
            }
        }
        signals.next().await;
        // A second signal during the grace period closes everything at once.
        tokio::select! {
            _ = proxy.shutdown(proxy.shutdown_timeout()) => {}
            _ = signals.next() => {
                tracing::warn!("second stop signal: closing every connection now");
                proxy.close_now().await;
            }
        }
        tracing::info!("bye");
        ExitCode::SUCCESS
    });
    // Dropping the runtime would wait for its blocking threads without limit, and a
    // reload stuck reading a file (a hung network mount) would keep the process alive.
    rt.shutdown_timeout(RUNTIME_EXIT_WAIT);
    code
}

/// At exit, how long to wait for blocking work (a reload reading files) to finish.
const RUNTIME_EXIT_WAIT: Duration = Duration::from_secs(1);

fn metrics_registry() -> duplex_proxy::Metrics {
    duplex_proxy::Metrics::new()
}

/// SIGTERM and SIGINT, listened for from before the proxy binds anything, so that a stop
/// signal sent as soon as the listeners are up is never the default "terminate now".
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
