//! Interop with another WebSocket implementation: Python's `websockets` as both client and
//! backend, with permessage-deflate negotiated end to end through the proxy.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use duplex_e2e::proxy::{TestProxy, Upstream, ROUTE};
use duplex_e2e::{within, within_for};

const PY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py");

/// Fails, rather than skips, when the Python package is missing.
async fn require_websockets() {
    let out = within(
        "python3 -c 'import websockets'",
        Command::new("python3")
            .args(["-c", "import websockets"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot run python3 ({e}); the interop test needs Python 3"));
    assert!(
        out.status.success(),
        "the interop test needs the Python websockets package: run `pip install websockets`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the Python echo server and reads the port it printed.
async fn python_server() -> (Child, u16) {
    let mut child = Command::new("python3")
        .arg(format!("{PY_DIR}/ws_server.py"))
        .args(["--lifetime", "60"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ws_server.py");
    let stdout = child.stdout.take().expect("the server's stdout is piped");
    let mut line = String::new();
    within(
        "ws_server.py to print its port",
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("read the server's first line");
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("ws_server.py printed {line:?}, expected \"PORT <n>\""));
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_with_permessage_deflate_through_the_proxy() {
    require_websockets().await;
    let (mut server, port) = python_server().await;
    let backend = format!("127.0.0.1:{port}")
        .parse()
        .expect("a loopback address");
    let p = TestProxy::single(&Upstream::new("round_robin").backend(backend)).await;

    let mut client = Command::new("python3")
        .arg(format!("{PY_DIR}/ws_client.py"))
        .arg(format!("ws://{}/interop", p.addr))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ws_client.py");
    let (mut out, mut err) = (String::new(), String::new());
    let mut stdout = client.stdout.take().expect("piped stdout");
    let mut stderr = client.stderr.take().expect("piped stderr");
    let status = within_for(Duration::from_secs(40), "ws_client.py to finish", async {
        let _ = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        client.wait().await
    })
    .await
    .expect("wait for ws_client.py");
    assert!(
        status.success() && out.starts_with("OK "),
        "ws_client.py failed ({status}):\n{out}\n{err}"
    );
    assert!(out.contains("permessage-deflate"), "{out}");

    // Compressed frames crossed untouched: far fewer bytes than 3 x 100 KB of text.
    let sent = p
        .metric(
            "duplex_tunnel_bytes_total",
            &[("route", ROUTE), ("direction", "client_to_backend")],
        )
        .await;
    assert!(
        sent > 0.0 && sent < 100_000.0,
        "{sent} bytes went client to backend; permessage-deflate should shrink 300 KB of text"
    );

    let _ = server.start_kill();
    within("ws_server.py to exit", server.wait())
        .await
        .expect("wait for ws_server.py");
}
