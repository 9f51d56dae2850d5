//! Request bodies: one that outlasts its answer (a backend that answers before it has
//! read the whole body, a 202 from an ingest endpoint, a 413, keeps receiving it while it
//! moves), and one that stalls, which is the client's failure (408) unless the backend
//! stopped reading it (504).

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use duplex_e2e::backend::Backend;
use duplex_e2e::proxy::{single_route, TestProxy, Upstream};
use duplex_e2e::raw::RawBackend;
use duplex_e2e::wire::read_head;
use duplex_e2e::within;

/// The body goes on for over three times `response_timeout` after the answer, in steady
/// pieces, and the backend gets all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_early_goes_on_while_it_moves() {
    const LEN: usize = 1000;
    let (tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let b = RawBackend::answers_early(LEN, tx).await;
    let p = TestProxy::single(
        &Upstream::new("round_robin")
            .option("response_timeout", "300ms")
            .backend(b.addr),
    )
    .await;
    let mut client = duplex_e2e::client::tcp(p.addr).await;
    let head = format!("POST /up HTTP/1.1\r\nHost: up.test\r\nContent-Length: {LEN}\r\n\r\n");
    client
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    let (reply, _) = within("the early answer", read_head(&mut client))
        .await
        .expect("a response head");
    assert!(
        reply.first_line.starts_with("HTTP/1.1 202"),
        "{}",
        reply.first_line
    );
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client
            .write_all(&[7u8; LEN / 10])
            .await
            .expect("send a piece of the body");
    }
    let got = within("the backend to report", ended.recv())
        .await
        .expect("the backend reports");
    assert_eq!(got, LEN, "the whole body reached the backend");
}

/// A proxy with `client_body_timeout: 500ms` in front of `backend`, and a client that
/// sends a POST to `path` with 10 of its 100,000 body bytes and then nothing: returns the
/// proxy, the client's connection and the head of the answer it got.
async fn stalled_upload(
    backend: std::net::SocketAddr,
    path: &str,
) -> (TestProxy, tokio::net::TcpStream, duplex_e2e::wire::Head) {
    let upstream = Upstream::new("round_robin").backend(backend);
    stalled_upload_through(&[("client_body_timeout", "500ms")], upstream, path).await
}

/// As [`stalled_upload`], with the listener options `listener` and `upstream`.
async fn stalled_upload_through(
    listener: &[(&str, &str)],
    upstream: Upstream,
    path: &str,
) -> (TestProxy, tokio::net::TcpStream, duplex_e2e::wire::Head) {
    use tokio::io::AsyncWriteExt;
    let p = TestProxy::start_with_listener(listener, &single_route(&upstream)).await;
    let mut client = duplex_e2e::client::tcp(p.addr).await;
    let head = format!("POST {path} HTTP/1.1\r\nHost: up.test\r\nContent-Length: 100000\r\n\r\n");
    client
        .write_all(format!("{head}0123456789").as_bytes())
        .await
        .expect("send the head and 10 body bytes");
    let (reply, _) = within("an answer", duplex_e2e::wire::read_head(&mut client))
        .await
        .expect("a response head");
    (p, client, reply)
}

/// A client that starts a request body and then stops sending it is cut off after the
/// listener's `client_body_timeout`, even once the backend has answered (no other timer
/// covers that), and the backend connection carrying the body is closed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_its_request_body_is_cut_off() {
    use tokio::io::AsyncReadExt;
    // Answers 202 as soon as the head is in, then reads the body to its end and reports
    // how many body bytes came before the connection ended.
    let (tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let b = RawBackend::answers_early(usize::MAX, tx).await;
    let (_p, mut client, reply) = stalled_upload(b.addr, "/upload").await;
    assert!(
        reply.first_line.starts_with("HTTP/1.1 202"),
        "{}",
        reply.first_line
    );
    // The client sends nothing more: the backend's connection ends, short of the body.
    let got = within("the backend connection to be closed", ended.recv())
        .await
        .expect("the backend reports");
    assert!(got < 100_000, "the backend got {got} body bytes");
    // And the client's connection is closed rather than left waiting for the rest.
    let mut buf = [0u8; 64];
    let n = within("the client's connection to end", client.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes after the response");
}

/// Asserts that a stalled upload got 408, counted as the client's error (4xx), not as a
/// backend failure (5xx).
async fn got_408_as_the_clients_error(p: &TestProxy, reply: &duplex_e2e::wire::Head) {
    assert!(
        reply.first_line.starts_with("HTTP/1.1 408"),
        "{}",
        reply.first_line
    );
    // The connection ends after it, which the client is told.
    assert_eq!(reply.get("connection"), Some("close"), "{reply:?}");
    let metrics = p.metrics().await;
    let code =
        |c| duplex_e2e::proxy::sum_series(&metrics, "duplex_http_requests_total", &[("code", c)]);
    assert_eq!((code("4xx"), code("5xx")), (1.0, 0.0));
}

/// A client whose request body stalls before the backend has answered gets 408, counted
/// as the client's error (4xx), not as a backend failure (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_before_the_answer_gets_408() {
    // `/count` reads the whole body before it answers.
    let b = Backend::start("b1").await;
    let (p, _client, reply) = stalled_upload(b.addr, "/count").await;
    got_408_as_the_clients_error(&p, &reply).await;
}

/// The same stall with the default `client_body_timeout` (60 s) and a shorter
/// `response_timeout`: the response timer runs out first, but the wait is the client's,
/// so 408, not a 504 that blames the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_stall_outlasting_response_timeout_is_still_the_clients_408() {
    let b = Backend::start("b1").await;
    let upstream = Upstream::new("round_robin")
        .option("response_timeout", "500ms")
        .backend(b.addr);
    let (p, _client, reply) = stalled_upload_through(&[], upstream, "/count").await;
    got_408_as_the_clients_error(&p, &reply).await;
}

/// Through a backend that reads the head and then nothing more (it answers first with
/// `answer`, when given), with the upstream's `response_timeout` at `timeout`: starts
/// uploading `len` bytes as fast as duplex takes them, and returns the client's reading
/// half, the answer's head, and the upload's task.
async fn upload_to_a_backend_that_stops_reading(
    answer: Option<&'static [u8]>,
    timeout: &str,
    len: usize,
) -> (
    TestProxy,
    tokio::net::tcp::OwnedReadHalf,
    duplex_e2e::wire::Head,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = RawBackend::start(move |mut tcp| async move {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await?;
        if let Some(answer) = answer {
            tcp.write_all(answer).await?;
        }
        // Reads nothing more, and holds the connection open.
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        Ok(())
    })
    .await;
    let upstream = Upstream::new("round_robin")
        .option("response_timeout", timeout)
        .backend(b.addr);
    let p = TestProxy::single(&upstream).await;
    let (mut rd, mut wr) = duplex_e2e::client::tcp(p.addr).await.into_split();
    let send = tokio::spawn(async move {
        let head = format!("POST /up HTTP/1.1\r\nHost: up.test\r\nContent-Length: {len}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'u'; 1 << 20];
        for _ in 0..len / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        Ok(())
    });
    let (reply, _) = within("an answer", duplex_e2e::wire::read_head(&mut rd))
        .await
        .expect("a response head");
    (p, rd, reply, send)
}

/// A backend that stops reading an upload the client is still sending is the one at
/// fault: 504 after `response_timeout`, not the client's 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_reading_an_upload_gets_504() {
    let (_p, _rd, reply, send) =
        upload_to_a_backend_that_stops_reading(None, "500ms", 32 << 20).await;
    assert!(
        reply.first_line.starts_with("HTTP/1.1 504"),
        "{}",
        reply.first_line
    );
    send.abort();
}

/// A backend that answers early in HTTP/1.0 (so its connection is not kept) and then
/// stops reading the upload is still timed: after `response_timeout` without progress its
/// connection is closed, and so is the client's, rather than both waiting on TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_backend_that_stops_reading_is_still_cut_off() {
    use tokio::io::AsyncReadExt;
    let answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok";
    let (_p, mut rd, reply, send) =
        upload_to_a_backend_that_stops_reading(Some(answer), "300ms", 256 << 20).await;
    assert!(
        reply.first_line.starts_with("HTTP/1.1 200"),
        "{}",
        reply.first_line
    );
    // The upload cannot go on: duplex closes the client's connection once it gives up on
    // the backend's.
    let sent = within("the upload to be cut off", send)
        .await
        .expect("the sending task");
    assert!(
        sent.is_err(),
        "the whole upload went through a backend that reads nothing"
    );
    let mut rest = Vec::new();
    let _ = within("the client's connection to end", rd.read_to_end(&mut rest)).await;
}

/// A client that sends part of a body and goes away (closed or reset) fails its own
/// request: counted as the client's 400, not a 5xx, and nothing held against a backend
/// that closes as soon as duplex gives up on the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_upload_is_the_clients_failure() {
    // Reads the request until duplex closes, then closes at once.
    let b = RawBackend::start(|mut tcp| async move {
        use tokio::io::AsyncReadExt;
        let mut sink = vec![0u8; 64 * 1024];
        while tcp.read(&mut sink).await? > 0 {}
        Ok(())
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    const CLIENTS: usize = 10;
    for i in 0..CLIENTS {
        let mut c = duplex_e2e::client::tcp(p.addr).await;
        c.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            .await
            .expect("write");
        c.write_all(&[b'y'; 20_000]).await.expect("write");
        duplex_e2e::eventually(duplex_e2e::STEP, "the backend to take the upload", || {
            let accepted = b.accepted();
            async move { accepted > i }
        })
        .await;
        if i % 2 == 1 {
            c.set_zero_linger().expect("SO_LINGER 0");
        }
        drop(c);
    }
    let counted = || async {
        let text = p.metrics().await;
        let code =
            |c| duplex_e2e::proxy::sum_series(&text, "duplex_http_requests_total", &[("code", c)]);
        (code("4xx"), code("5xx"))
    };
    duplex_e2e::eventually(duplex_e2e::STEP, "every upload to be counted", || async {
        let (four, five) = counted().await;
        four + five >= CLIENTS as f64
    })
    .await;
    assert_eq!(counted().await, (CLIENTS as f64, 0.0));
    let errors = p.metric("duplex_backend_connect_errors_total", &[]).await;
    assert_eq!(errors, 0.0, "nothing held against the backend");
}
