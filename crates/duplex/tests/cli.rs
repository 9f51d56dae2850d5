//! The `duplex` binary itself: `check`, `run` with SIGTERM, and `demo`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_duplex");

fn repo(path: &str) -> String {
    format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))
}

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Running {
    /// Sends a signal, e.g. `-TERM`, with kill(1).
    fn signal(&self, name: &str) {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill")
            .success());
    }

    /// Waits up to 10 s for the process to exit, and asserts it exited with status 0.
    fn exits_0_within_10s(&mut self, what: &str) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                assert!(status.success(), "{status}");
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("duplex-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn check_accepts_the_shipped_configs() {
    for f in ["configs/full.yaml", "configs/minimal.yaml"] {
        let out = Command::new(BIN)
            .args(["check", "--config", &repo(f)])
            .output()
            .expect("run duplex");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(": ok:") && stdout.contains("listener"),
            "{stdout}"
        );
    }
}

#[test]
fn check_points_at_the_error_and_exits_1() {
    let path = temp_file(
        "bad.yaml",
        "listeners:\n  - name: public\n    bind: 127.0.0.1:8080\nroutes:\n  - name: r\n    upstream: nope\nupstreams:\n  - name: u\n    backends:\n      - addr: 127.0.0.1:9001\n",
    );
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run duplex");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:6:15: route \"r\" names unknown upstream \"nope\"",
        path.display()
    );
    assert!(stderr.starts_with(&want), "{stderr}");
}

/// Lines of a child's output, read on a thread so that a wait can time out.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn of(out: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines(rx)
    }

    /// The first line containing `needle`, within ten seconds.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = String::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.0.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => break,
            }
        }
        panic!("no line with {needle:?} in:\n{seen}");
    }
}

/// Starts `duplex run` on the config at `path` with JSON logs, `extra` arguments and no
/// file watch; returns the process and its log lines.
fn run_json(path: &std::path::Path, extra: &[&str]) -> (Running, Lines) {
    let child = Command::new(BIN)
        .args(["run", "--no-watch", "--log-format", "json"])
        .args(extra)
        .arg("-c")
        .arg(path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start duplex");
    let mut child = Running(child);
    let err = Lines::of(child.0.stderr.take().expect("stderr"));
    (child, err)
}

/// The text of `line` after `start` and up to the next `end`.
fn between(line: &str, start: &str, end: char) -> String {
    line.split(start)
        .nth(1)
        .and_then(|rest| rest.split(end).next())
        .unwrap_or_else(|| panic!("no {start:?} in {line}"))
        .to_owned()
}

/// Reads one answer on a keep-alive connection, its body as long as its Content-Length
/// says; returns the head.
fn keep_alive_answer(s: &mut std::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return head;
            }
        }
        let n = s.read(&mut chunk).expect("read an answer");
        assert!(n > 0, "closed before the whole answer");
        got.extend_from_slice(&chunk[..n]);
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    body
}

/// Also the one-thread runtime (`--threads 1`) serving real traffic.
#[test]
fn demo_serves_the_page_and_balances_three_backends() {
    let child = Command::new(BIN)
        .args(["demo", "--threads", "1", "--port", "0", "--admin-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let mut child = Running(child);
    let out = Lines::of(child.0.stdout.take().expect("stdout"));
    let addr = between(&out.wait_for("/whoami"), "http://", '/');
    let page = http_get(&addr, "/");
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("new WebSocket"),
        "{page}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = http_get(&addr, "/whoami");
        seen.insert(between(&r, "\"backend\":\"", '"'));
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn run_drains_and_exits_0_on_sigterm() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let path = temp_file(
        "run.yaml",
        &format!(
            "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
             shutdown_timeout: 5s\nroutes:\n  - name: r\n    upstream: u\nupstreams:\n  - name: u\n    backends:\n      - addr: {}\n",
            backend.local_addr().expect("addr")
        ),
    );
    let (mut child, err) = run_json(&path, &["--threads", "3"]);
    let limit = err.wait_for("open file limit");
    assert!(
        limit.starts_with('{') && limit.contains("\"soft\""),
        "JSON logs: {limit}"
    );
    let threads = err.wait_for("worker threads");
    assert!(threads.contains("\"threads\":3"), "{threads}");
    err.wait_for("\"listening\"");
    child.signal("-TERM");
    child.exits_0_within_10s("duplex did not exit after SIGTERM");
}

/// SIGTERM ends the process even while a reload is stuck reading a file (a FIFO nobody
/// writes to, standing for a hung network mount): duplex does not wait for that read.
#[test]
fn exits_on_sigterm_while_a_reload_is_stuck_reading_a_file() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("duplex-cli-stuck-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cert = dir.join("cert.pem");
    let made = Command::new("mkfifo")
        .arg(&cert)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let key = dir.join("key.pem");
    std::fs::write(&key, "never read\n").expect("write key");
    let path = dir.join("stuck.yaml");
    let plain =
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n";
    std::fs::write(&path, plain).expect("write config");
    let (mut child, err) = run_json(&path, &[]);
    let admin = between(&err.wait_for("admin listening"), "\"addr\":\"", '"');

    // A reload that adds a TLS listener whose certificate is the FIFO: reading it blocks.
    let tls = format!(
        "  - name: tls\n    bind: 127.0.0.1:0\n    tls:\n      certificates:\n        - cert: {}\n          key: {}\n",
        cert.display(),
        key.display()
    );
    std::fs::write(&path, plain.replacen("admin:", &format!("{tls}admin:"), 1))
        .expect("write the new config");
    child.signal("-HUP");
    let start = Instant::now();
    while !http_get(&admin, "/status").contains("\"reloading\": true") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the reload did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    child.signal("-TERM");
    child.exits_0_within_10s("duplex did not exit after SIGTERM while a reload was stuck");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With no `max_connections`, the cap follows the open-file limit: (limit - 100) / 2, so
/// 20 under `ulimit -n 140`. The admin port, which has no cap, still answers at the cap,
/// and the 21st client gets in once idle connections are closed.
#[test]
fn the_default_connection_cap_follows_the_open_file_limit() {
    let path = temp_file(
        "capped.yaml",
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n",
    );
    // dash's and bash's `ulimit -n` set the soft and the hard limit both.
    let child = Command::new("sh")
        .args(["-c", "ulimit -n 140 && exec \"$0\" \"$@\"", BIN])
        .args(["run", "--no-watch", "--log-format", "json", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start duplex under ulimit -n 140");
    let mut child = Running(child);
    let err = Lines::of(child.0.stderr.take().expect("stderr"));
    let cap = err.wait_for("connection cap");
    assert!(
        cap.contains("\"max\":20") && cap.contains("open-file limit"),
        "{cap}"
    );
    let addr = between(&err.wait_for("\"listening\""), "\"addr\":\"", '"');
    let admin = between(&err.wait_for("admin listening"), "\"addr\":\"", '"');

    // Twenty keep-alive connections, each answered once (a 404: no routes) and idle.
    let open: Vec<_> = (0..20)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            use std::io::Write;
            write!(s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
            let head = keep_alive_answer(&mut s);
            assert!(head.starts_with("HTTP/1.1 404"), "{head}");
            s
        })
        .collect();
    let start = Instant::now();
    loop {
        let status = http_get(&admin, "/status");
        if status.contains("\"open\": 20") {
            assert!(status.contains("\"max\": 20"), "{status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "20 connections not open: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        http_get(&admin, "/metrics").contains("\nduplex_connections_limit 20\n"),
        "the cap is exported"
    );

    // The 21st is let in: at the cap duplex closes up to 32 of the connections idle
    // longest, and all 20 are idle.
    use std::io::Write;
    let mut next = std::net::TcpStream::connect(&addr).expect("the kernel's backlog takes it");
    write!(
        next,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    next.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = next.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer:?}");
    let metrics = http_get(&admin, "/metrics");
    let reclaimed: usize = between(
        &metrics,
        "\nduplex_connections_reclaimed_total{listener=\"public\"} ",
        '\n',
    )
    .parse()
    .expect("a count");
    // All of them, unless some had not yet reached duplex's registry of idle connections.
    assert!((1..=20).contains(&reclaimed), "{metrics}");
    let mut closed = 0;
    for idle in open {
        idle.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        match (&idle).read(&mut byte) {
            Ok(0) => closed += 1,
            Ok(_) => panic!("an idle connection got an answer"),
            Err(_) => {}
        }
    }
    assert_eq!(closed, reclaimed, "closed unanswered, as counted");
}
