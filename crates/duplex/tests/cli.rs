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

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("duplex-cli-{}", std::process::id()));
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
    let line = out.wait_for("/whoami");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("the demo prints its address")
        .to_owned();
    let page = http_get(&addr, "/");
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("new WebSocket"),
        "{page}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = http_get(&addr, "/whoami");
        let name = r
            .split("\"backend\":\"")
            .nth(1)
            .and_then(|x| x.split('"').next())
            .expect("a backend name");
        seen.insert(name.to_owned());
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
    let child = Command::new(BIN)
        .args([
            "run",
            "--no-watch",
            "--threads",
            "3",
            "--log-format",
            "json",
            "-c",
        ])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start duplex");
    let mut child = Running(child);
    let err = Lines::of(child.0.stderr.take().expect("stderr"));
    let limit = err.wait_for("open file limit");
    assert!(
        limit.starts_with('{') && limit.contains("\"soft\""),
        "JSON logs: {limit}"
    );
    let threads = err.wait_for("worker threads");
    assert!(threads.contains("\"threads\":3"), "{threads}");
    err.wait_for("\"listening\"");
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "duplex did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
