//! The `duplex` binary itself: `check`, `run` with SIGTERM, and `demo`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
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

    /// Waits up to `limit` for the process to exit; fails with `what` after that (and the
    /// drop kills it).
    fn exits_within(&mut self, limit: Duration, what: &str) -> ExitStatus {
        const PAUSE: Duration = Duration::from_millis(20);
        let start = Instant::now();
        for _ in 0..=limit.as_millis() / PAUSE.as_millis() {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status;
            }
            if start.elapsed() >= limit {
                break;
            }
            std::thread::sleep(PAUSE);
        }
        panic!("{what}: still running after {limit:?}");
    }

    /// Waits up to 10 s for the process to exit, and asserts it exited with status 0.
    fn exits_0_within_10s(&mut self, what: &str) {
        let status = self.exits_within(Duration::from_secs(10), what);
        assert!(status.success(), "{status}");
    }
}

/// Runs `cmd` to its end and collects its output, killing it (and failing) if it takes
/// more than 30 s.
fn output_within_30s(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run duplex");
    let mut child = Running(child);
    // Read on threads, so that a full pipe cannot stall the child.
    let stdout = read_all(child.0.stdout.take());
    let stderr = read_all(child.0.stderr.take());
    let status = child.exits_within(Duration::from_secs(30), "duplex check");
    Output {
        status,
        stdout: stdout.join().expect("the stdout reader"),
        stderr: stderr.join().expect("the stderr reader"),
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn read_all<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
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
        let out = output_within_30s(Command::new(BIN).args(["check", "--config", &repo(f)]));
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
        assert!(stdout.contains("\n  admin on 127.0.0.1:9090\n"), "{stdout}");
        assert!(out.stderr.is_empty(), "{f}: no advice expected");
    }
}

/// Advice on a valid file goes to stderr as a warning, and the file still passes.
#[test]
fn check_warns_of_a_hash_key_the_backend_sets_and_exits_0() {
    let path = temp_file(
        "advice.yaml",
        "listeners:\n  - name: public\n    bind: 127.0.0.1:8080\nupstreams:\n  - name: io\n    balancer: consistent_hash\n    hash_key: cookie:io\n    backends:\n      - addr: 127.0.0.1:9001\n",
    );
    let out = output_within_30s(Command::new(BIN).args(["check", "-c"]).arg(&path));
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}: warning: upstream \"io\": hash_key cookie:io is usually set by the backend",
        path.display()
    );
    assert!(stderr.starts_with(&want), "{stderr}");
}

#[test]
fn check_points_at_the_error_and_exits_1() {
    let path = temp_file(
        "bad.yaml",
        "listeners:\n  - name: public\n    bind: 127.0.0.1:8080\nroutes:\n  - name: r\n    upstream: nope\nupstreams:\n  - name: u\n    backends:\n      - addr: 127.0.0.1:9001\n",
    );
    let out = output_within_30s(Command::new(BIN).args(["check", "-c"]).arg(&path));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:6:15: route \"r\" names unknown upstream \"nope\"",
        path.display()
    );
    assert!(stderr.starts_with(&want), "{stderr}");
}

/// Text logs written to a pipe or a file carry no terminal colour codes (a container's
/// log collector would store them), and say what they said before.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let path = temp_file(
        "plain-logs.yaml",
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         routes:\n  - name: r\n    upstream: u\nupstreams:\n  - name: u\n    backends:\n      - addr: 127.0.0.1:9\n",
    );
    let child = Command::new(BIN)
        .args(["run", "--no-watch", "-c"])
        .arg(&path)
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start duplex");
    let mut child = Running(child);
    let err = Lines::of(child.0.stderr.take().expect("stderr"));
    let line = err.wait_for("listening");
    assert!(line.contains(" INFO "), "{line:?}");
    assert!(!line.contains('\x1b'), "colour codes in {line:?}");
}

/// A start that cannot go on says why: the admin listener is named as such, and a
/// refused certificate is reported before a port clash, so one fix is not followed by
/// another surprise.
#[test]
fn start_errors_name_the_admin_listener_and_files_come_first() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = taken.local_addr().expect("its address").port();
    let admin_clash = temp_file(
        "admin-clash.yaml",
        &format!("listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:{port}\n"),
    );
    let out = output_within_30s(
        Command::new(BIN)
            .args(["run", "--no-watch", "-c"])
            .arg(&admin_clash),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the admin listener (admin.bind): cannot bind 127.0.0.1:{port}"
        )),
        "{stderr}"
    );

    let both = temp_file(
        "tls-and-clash.yaml",
        &format!(
            "listeners:\n  - name: public\n    bind: 127.0.0.1:{port}\n    tls:\n      certificates:\n        - cert: /nonexistent/cert.pem\n          key: /nonexistent/key.pem\nadmin:\n  bind: 127.0.0.1:0\n"
        ),
    );
    let out = output_within_30s(
        Command::new(BIN)
            .args(["run", "--no-watch", "-c"])
            .arg(&both),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/cert.pem"), "{stderr}");
    assert!(!stderr.contains("cannot bind"), "{stderr}");
    drop(taken);
}

#[test]
fn threads_must_be_at_least_one() {
    let out =
        output_within_30s(Command::new(BIN).args(["run", "--threads", "0", "-c", "unused.yaml"]));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 1 thread is needed"), "{stderr}");
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
/// says; returns the whole answer, head and body.
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
                return String::from_utf8_lossy(&got[..end + 4 + len]).into_owned();
            }
        }
        let n = s.read(&mut chunk).expect("read an answer");
        assert!(n > 0, "closed before the whole answer");
        got.extend_from_slice(&chunk[..n]);
    }
}

fn http_get(addr: &str, path: &str) -> String {
    try_http_get(addr, path).unwrap_or_else(|| panic!("GET {path} from {addr} failed"))
}

/// A whole answer to `GET path`, or `None` if connecting, writing or reading failed.
fn try_http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// A backend whose response body breaks midway (a bad chunk size) is named in a warning:
/// the client's response is cut short, and the operator is told which backend did it.
#[test]
fn a_response_body_broken_by_the_backend_is_logged_as_a_warning() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the backend");
    let backend_addr = backend.local_addr().expect("its address");
    std::thread::spawn(move || {
        // One connection: a head, one good chunk, then a chunk size that is not hex.
        if let Ok((mut s, _)) = backend.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let path = temp_file(
        "broken-body.yaml",
        &format!(
            "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
             routes:\n  - name: r\n    upstream: u\nupstreams:\n  - name: u\n    backends:\n      - addr: {backend_addr}\n"
        ),
    );
    let (_child, err) = run_json(&path, &[]);
    let addr = between(&err.wait_for("\"listening\""), "\"addr\":\"", '"');
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    // Whatever arrives before the connection ends (cut short: an error is fine too).
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("zz"), "{got:?}");
    let line = err.wait_for("response body from the backend failed");
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    assert!(line.contains(&backend_addr.to_string()), "{line}");
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

    // In raw bytes: an upgrade, the backend's greeting, then a Close that is answered
    // with a Close (code 1000 back), as a browser expects of a clean end.
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: demo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .expect("send the upgrade");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"hello\":true") {
        let n = s.read(&mut chunk).expect("read the 101 and the greeting");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"));
    // Close, code 1000, masked with 0x01020304.
    let code = [0x03 ^ 0x01, 0xe8 ^ 0x02];
    s.write_all(&[0x88, 0x82, 1, 2, 3, 4, code[0], code[1]])
        .expect("send a Close");
    let mut answer = Vec::new();
    loop {
        let n = s.read(&mut chunk).expect("read the Close answer");
        answer.extend_from_slice(&chunk[..n]);
        if n == 0 || answer.len() >= 4 {
            break;
        }
    }
    assert_eq!(
        answer.get(..4),
        Some(&[0x88, 0x02, 0x03, 0xe8][..]),
        "{answer:?}"
    );
}

/// A WebSocket echo backend on loopback, served by `rt`.
fn echo_backend(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the backend");
    let addr = listener.local_addr().expect("backend address");
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                // Echoes text; a Close is answered as the next read goes on, which then ends.
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Runs `fut` on `rt`, failing with `what` past 10 s.
fn block<F: std::future::Future>(rt: &tokio::runtime::Runtime, what: &str, fut: F) -> F::Output {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), fut).await })
        .unwrap_or_else(|_| panic!("timed out after 10 s: {what}"))
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A runtime for the backends and clients of a test that runs the binary.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime for the backend and the clients")
}

/// A WebSocket through duplex at `addr`.
fn upgrade(rt: &tokio::runtime::Runtime, addr: std::net::SocketAddr) -> Ws {
    block(rt, "a WebSocket through duplex", async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to duplex");
        tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp)
            .await
            .expect("the upgrade through duplex")
            .0
    })
}

/// Sends `text` on `ws` and asserts it comes back.
fn echo(rt: &tokio::runtime::Runtime, ws: &mut Ws, text: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let got = block(rt, "an echo through duplex", async {
        ws.send(Message::text(text)).await.expect("send");
        ws.next().await
    });
    match got {
        Some(Ok(m)) => assert_eq!(m, Message::text(text)),
        other => panic!("no echo of {text:?}: {other:?}"),
    }
}

/// SIGTERM with a tunnel open: the listener closes at once, the tunnel goes on working
/// through the drain, and duplex exits 0 as soon as it closes, well inside
/// `shutdown_timeout`.
#[test]
fn run_drains_and_exits_0_on_sigterm() {
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    let rt = runtime();
    let backend = echo_backend(&rt);
    let path = temp_file(
        "run.yaml",
        &format!(
            "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
             shutdown_timeout: {}s\nroutes:\n  - name: r\n    upstream: u\nupstreams:\n  - name: u\n    backends:\n      - addr: {backend}\n",
            SHUTDOWN_TIMEOUT.as_secs()
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
    let addr: std::net::SocketAddr = between(&err.wait_for("\"listening\""), "\"addr\":\"", '"')
        .parse()
        .expect("the listener's address");

    // A tunnel through duplex to the backend, in use.
    let mut ws = upgrade(&rt, addr);
    echo(&rt, &mut ws, "before");

    child.signal("-TERM");
    err.wait_for("SIGTERM received");
    err.wait_for("stopped accepting");
    // The listener is closed: new connections are refused.
    let start = Instant::now();
    let mut refused = false;
    for _ in 0..500 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(accepted) => drop(accepted),
        }
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused, "duplex still accepts connections after SIGTERM");
    // The open tunnel still works while duplex drains, and duplex waits for it.
    echo(&rt, &mut ws, "during the drain");
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "duplex exited with a tunnel open, inside shutdown_timeout"
    );

    // Closing it ends the drain: duplex exits 0, well before shutdown_timeout. The
    // closing handshake done, the client's TCP connection goes too (dropped here).
    block(&rt, "the tunnel to close", async move {
        use futures_util::StreamExt;
        ws.close(None).await.expect("send a Close");
        for _ in 0..16 {
            if !matches!(ws.next().await, Some(Ok(_))) {
                return;
            }
        }
        panic!("the tunnel did not close");
    });
    let closed = Instant::now();
    let status = child.exits_within(
        Duration::from_secs(10),
        "duplex did not exit once the last tunnel closed",
    );
    assert!(status.success(), "{status}");
    assert!(
        closed.elapsed() < SHUTDOWN_TIMEOUT / 3,
        "duplex exited {:?} after the tunnel closed",
        closed.elapsed()
    );
}

/// With `reuse_port`, a second duplex (a new binary, say) binds the ports of one still
/// running; once the first gets SIGTERM the second takes every new connection, with no
/// moment when nothing accepts, while the first drains its open tunnel.
#[test]
fn with_reuse_port_a_second_duplex_takes_over_without_a_gap() {
    let rt = runtime();
    let backend = echo_backend(&rt);
    let config = |listener: &str, admin: &str| {
        format!(
            "listeners:\n  - name: public\n    bind: {listener}\nadmin:\n  bind: {admin}\n\
             reuse_port: true\nshutdown_timeout: 30s\nroutes:\n  - name: r\n    upstream: u\n\
             upstreams:\n  - name: u\n    backends:\n      - addr: {backend}\n"
        )
    };
    let first = temp_file("first.yaml", &config("127.0.0.1:0", "127.0.0.1:0"));
    let (mut old, old_log) = run_json(&first, &[]);
    let addr: std::net::SocketAddr =
        between(&old_log.wait_for("\"listening\""), "\"addr\":\"", '"')
            .parse()
            .expect("the listener's address");
    let admin = between(&old_log.wait_for("admin listening"), "\"addr\":\"", '"');
    let mut tunnel = upgrade(&rt, addr);
    echo(&rt, &mut tunnel, "through the first");

    // The second binds the same ports, the admin one included, while the first runs.
    let second = temp_file("second.yaml", &config(&addr.to_string(), &admin));
    let (mut new, new_log) = run_json(&second, &[]);
    new_log.wait_for("another process already listens here");
    new_log.wait_for("\"listening\"");

    old.signal("-TERM");
    old_log.wait_for("stopped accepting");
    // The first closes its admin listener too (a request caught in its backlog as it
    // closes may fail): then every admin request reaches the second, which is ready,
    // not a mix of 200 and 503.
    let start = Instant::now();
    while !try_http_get(&admin, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "/readyz never 200"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..10 {
        let ready = http_get(&admin, "/readyz");
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    }
    // Every new connection now goes to the second, and none is refused.
    for i in 0..20 {
        let mut ws = upgrade(&rt, addr);
        echo(&rt, &mut ws, &format!("new connection {i}"));
    }
    // The first still drains its tunnel.
    echo(&rt, &mut tunnel, "through the first, draining");
    assert!(
        old.0.try_wait().expect("wait").is_none(),
        "the first duplex exited with a tunnel open"
    );
    drop(tunnel);
    old.exits_0_within_10s("the first duplex, once its tunnel closed");
    new.signal("-TERM");
    new.exits_0_within_10s("the second duplex");
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

/// The file watch is not stopped by a reload stuck reading (the config replaced by a
/// FIFO nobody writes, standing for a hung mount): a valid file put in place later is
/// applied by the watch alone.
#[test]
fn the_file_watch_goes_on_past_a_reload_stuck_reading() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("duplex-cli-watch-stuck-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("duplex.yaml");
    let plain =
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n";
    std::fs::write(&path, plain).expect("write config");
    let child = Command::new(BIN)
        .args(["run", "--log-format", "json", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start duplex");
    let mut child = Running(child);
    let err = Lines::of(child.0.stderr.take().expect("stderr"));
    let admin = between(&err.wait_for("admin listening"), "\"addr\":\"", '"');
    err.wait_for("watching the config file");

    // The config becomes a FIFO: the watch's reload blocks opening it.
    std::fs::remove_file(&path).expect("remove config");
    let made = Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let start = Instant::now();
    while !http_get(&admin, "/status").contains("\"reloading\": true") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the watch did not start a reload"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then a valid, different file takes its place.
    std::fs::remove_file(&path).expect("remove the FIFO");
    std::fs::write(&path, format!("{plain}shutdown_timeout: 7s\n")).expect("write the new config");
    let start = Instant::now();
    while !http_get(&admin, "/status").contains("\"generation\": 2") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the new file was not applied: {}",
            http_get(&admin, "/status")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    child.signal("-TERM");
    child.exits_0_within_10s("duplex did not exit after SIGTERM with a reload stuck");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Out of file descriptors (a `max_connections` above what the open-file limit holds,
/// which duplex warns about), the admin listener's failing accepts back off as the proxy
/// listeners' do, rather than logging ten times a second, and it answers again once
/// descriptors are free. The file watch, unable to read the config meanwhile, refuses
/// nothing: it applies the file once it can.
#[test]
fn admin_accepts_back_off_when_out_of_file_descriptors() {
    // In a directory of its own: the file watch sees no other test's files.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("duplex-cli-fds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("fds.yaml");
    std::fs::write(
        &path,
        "max_connections: 500\nlisteners:\n  - name: public\n    bind: 127.0.0.1:0\n\
         admin:\n  bind: 127.0.0.1:0\n",
    )
    .expect("write the config");
    let child = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\"", BIN])
        .args(["run", "--log-format", "json", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start duplex under ulimit -n 64");
    let mut child = Running(child);
    let err = Lines::of(child.0.stderr.take().expect("stderr"));
    let addr = between(&err.wait_for("\"listening\""), "\"addr\":\"", '"');
    let admin = between(&err.wait_for("admin listening"), "\"addr\":\"", '"');
    err.wait_for("watching the config file for changes");
    // A scraper's kept-alive connection, made while descriptors are left.
    let mut scraper = std::net::TcpStream::connect(&admin).expect("connect to the admin port");
    scraper
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    {
        // Answered, so accepted: not left in the backlog when descriptors run out.
        use std::io::Write;
        write!(scraper, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let ok = keep_alive_answer(&mut scraper);
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    }
    // More connections than descriptors: the public listener's accepts start failing.
    let open: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(&addr).expect("the backlog takes it"))
        .collect();
    err.wait_for("accept failed; pausing");
    // The process metrics are still there, open descriptors at the limit: an alert on
    // them must not resolve just as the limit is reached.
    {
        use std::io::Write;
        write!(scraper, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let metrics = keep_alive_answer(&mut scraper);
        assert!(metrics.contains("\nprocess_max_fds 64\n"), "{metrics}");
        assert!(metrics.contains("\nprocess_open_fds 64\n"), "{metrics}");
    }
    // One admin client waits in the backlog, and every accept of it fails.
    let waiting = std::net::TcpStream::connect(&admin).expect("the backlog takes it");
    err.wait_for("admin accept failed");
    let window = Instant::now();
    let mut failures = 0;
    while let Some(left) = Duration::from_millis(1500).checked_sub(window.elapsed()) {
        match err.0.recv_timeout(left) {
            Ok(line) if line.contains("admin accept failed") => failures += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Pauses of 0.1, 0.2, 0.4 and 0.8 s: at most four more in 1.5 s (fifteen without).
    assert!(failures <= 4, "{failures} admin accept failures in 1.5 s");
    let text = std::fs::read_to_string(&path).expect("read the config");
    std::fs::write(&path, format!("{text}# edited\n")).expect("edit the config");
    err.wait_for("cannot read the config file now");
    drop((open, waiting));
    let start = Instant::now();
    loop {
        let answered = std::net::TcpStream::connect(&admin).is_ok_and(|mut s| {
            use std::io::Write;
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = write!(
                s,
                "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer.starts_with("HTTP/1.1 200")
        });
        if answered {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the admin listener did not answer again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&path, format!("{text}# edited again\n")).expect("edit the config");
    err.wait_for("configuration reloaded");
    let metrics = http_get(&admin, "/metrics");
    assert!(
        metrics.contains("duplex_config_reloads_total{result=\"error\"} 0"),
        "{metrics}"
    );
    child.signal("-TERM");
    child.exits_0_within_10s("duplex did not exit after SIGTERM");
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
    // All of them, unless some had not yet reached duplex's registry of idle connections.
    assert!(
        (1..=20).contains(&closed),
        "{closed} idle connections closed"
    );
    // Each is counted as its connection's task ends, which may come just after the client
    // sees the close: wait for the count to catch up, boundedly.
    let reclaimed = |metrics: &str| -> usize {
        between(
            metrics,
            "\nduplex_connections_reclaimed_total{listener=\"public\"} ",
            '\n',
        )
        .parse()
        .expect("a count")
    };
    let start = Instant::now();
    let mut metrics = http_get(&admin, "/metrics");
    for _ in 0..500 {
        if reclaimed(&metrics) == closed || start.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        metrics = http_get(&admin, "/metrics");
    }
    assert_eq!(
        reclaimed(&metrics),
        closed,
        "closed unanswered, as counted: {metrics}"
    );
}

/// The advice `duplex check` gives is logged when the configuration is put in force.
#[test]
fn run_logs_configuration_advice() {
    let path = temp_file(
        "advice-run.yaml",
        "listeners:\n  - name: public\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
         upstreams:\n  - name: slow\n    connect_timeout: 20s\n    response_timeout: 10s\n    \
         backends:\n      - addr: 127.0.0.1:9\n",
    );
    let (_child, err) = run_json(&path, &[]);
    let line = err.wait_for("configuration advice");
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    assert!(line.contains("\"upstream\":\"slow\""), "{line}");
    assert!(
        line.contains("response_timeout (10s) is not longer than connect_timeout (20s)"),
        "{line}"
    );
}
