//! WebSocket tunnels once the handshake is done: messages of every shape both ways, control
//! frames, closes from either side with code and reason, half close, and idle_timeout.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use duplex_e2e::backend::Backend;
use duplex_e2e::client::{backend_of, close, raw_ws, recv, ws};
use duplex_e2e::proxy::{TestProxy, Upstream};
use duplex_e2e::raw::RawBackend;
use duplex_e2e::wire::{
    accept_upgrade, client_text, encode, read_frame, server_text, MASK, OP_CONTINUATION, OP_TEXT,
};
use duplex_e2e::{eventually, within};

/// One echo backend behind a proxy.
async fn echo_setup() -> (Backend, TestProxy) {
    let b = Backend::start("echo").await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    (b, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_text_and_binary() {
    let (_b, p) = echo_setup().await;
    let (mut ws, resp) = ws(p.addr, "/echo").await;
    assert_eq!(resp.status(), 101);
    assert_eq!(backend_of(&resp), "echo");

    ws.send(Message::text("hello through duplex"))
        .await
        .expect("send text");
    assert_eq!(recv(&mut ws).await, Message::text("hello through duplex"));

    let bytes: Vec<u8> = vec![0, 1, 2, 0x80, 0xfe, 0xff];
    ws.send(Message::binary(bytes.clone()))
        .await
        .expect("send binary");
    assert_eq!(recv(&mut ws).await, Message::binary(bytes));
    close(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_a_one_mebibyte_message() {
    let (_b, p) = echo_setup().await;
    let (mut ws, _) = ws(p.addr, "/echo").await;
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    within("send 1 MiB", ws.send(Message::binary(big.clone())))
        .await
        .expect("send 1 MiB");
    match recv(&mut ws).await {
        Message::Binary(got) => {
            assert_eq!(got.len(), big.len(), "echo length");
            assert!(got == big, "the 1 MiB echo differs from what was sent");
        }
        other => panic!("expected the binary echo, got {other:?}"),
    }
    close(ws).await;
}

/// A text message split into a FIN=0 frame and a continuation, masked as a client must: the
/// backend reassembles it, so the echo proves both fragments crossed intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_a_fragmented_message() {
    let (_b, p) = echo_setup().await;
    let (mut s, _, mut buf) = raw_ws(p.addr, "/echo", &[]).await;
    let first = encode(false, OP_TEXT, b"Hello, ", Some(MASK));
    let last = encode(true, OP_CONTINUATION, b"fragmented world", Some(MASK));
    within("write the first fragment", s.write_all(&first))
        .await
        .expect("write the first fragment");
    within("write the continuation", s.write_all(&last))
        .await
        .expect("write the continuation");
    let echo = within("the echo", read_frame(&mut s, &mut buf))
        .await
        .expect("the echo of the fragmented message");
    assert_eq!(
        (echo.fin, echo.opcode, echo.masked),
        (true, OP_TEXT, false),
        "one unmasked text frame back: {echo:?}"
    );
    assert_eq!(echo.text(), "Hello, fragmented world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_ping_with_pong() {
    let (_b, p) = echo_setup().await;
    let (mut ws, _) = ws(p.addr, "/echo").await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("send ping");
    assert_eq!(
        recv(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );
    close(ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_reaches_the_backend_with_code_and_reason() {
    let (b, p) = echo_setup().await;
    let (mut ws, _) = ws(p.addr, "/echo").await;
    let bye = CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye".into(),
    };
    within("send a close", ws.close(Some(bye)))
        .await
        .expect("send a close");
    match recv(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4001, "the backend's reply"),
        other => panic!("expected the backend's close reply, got {other:?}"),
    }
    eventually(
        Duration::from_secs(5),
        "the backend records the close",
        || {
            let seen = b.closes();
            async move { !seen.is_empty() }
        },
    )
    .await;
    assert_eq!(b.closes(), vec![(4001, "bye".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_close_reaches_the_client_with_code_and_reason() {
    let (_b, p) = echo_setup().await;
    let (mut ws, _) = ws(p.addr, "/close").await;
    match recv(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4002);
            assert_eq!(f.reason.as_str(), "server bye");
        }
        other => panic!("expected the backend's close, got {other:?}"),
    }
    // Our reply goes out; then the stream ends.
    let end = within("the stream to end", ws.next()).await;
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "no data after the close: {end:?}"
    );
}

/// The backend streams N messages while the client sends N; every one arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_send_at_the_same_time() {
    const N: usize = 2000;
    let (_b, p) = echo_setup().await;
    let (ws, _) = ws(p.addr, &format!("/stream?n={N}")).await;
    let (mut tx, mut rx) = ws.split();
    let send = async {
        for i in 0..N {
            tx.send(Message::text(format!("c{i}")))
                .await
                .expect("client send");
        }
    };
    let receive = async {
        let mut got = Vec::with_capacity(N);
        let mut report = None;
        for _ in 0..=N {
            match within("a streamed message", rx.next()).await {
                Some(Ok(Message::Text(t))) if t.as_str().starts_with("received") => {
                    report = Some(t.to_string());
                    break;
                }
                Some(Ok(Message::Text(t))) => got.push(t.to_string()),
                other => panic!("unexpected while streaming: {other:?}"),
            }
        }
        (got, report)
    };
    let ((), (got, report)) = within("both directions to finish", async {
        tokio::join!(send, receive)
    })
    .await;
    let want: Vec<String> = (0..N).map(|i| format!("s{i}")).collect();
    assert_eq!(got.len(), N, "messages from the backend");
    assert!(got == want, "the backend's messages arrived out of order");
    assert_eq!(
        report.as_deref(),
        Some(format!("received {N} in order: true").as_str())
    );
}

/// Reads to the end of the stream: a FIN (not a reset) with nothing after the last frame,
/// read or still buffered in `buf`.
async fn expect_clean_end(s: &mut tokio::net::TcpStream, buf: &[u8]) {
    let mut tail = Vec::new();
    within("the backend's FIN", s.read_to_end(&mut tail))
        .await
        .expect("a clean end of stream, not a reset");
    assert!(
        tail.is_empty() && buf.is_empty(),
        "nothing after the last frame"
    );
}

/// The client shuts down its write side; the backend sees the EOF through the proxy and
/// still gets its later bytes to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction_open() {
    let (events, mut seen) = mpsc::unbounded_channel::<String>();
    let backend = RawBackend::start(move |mut tcp| {
        let events = events.clone();
        async move {
            let (_, mut buf) = accept_upgrade(&mut tcp, &[]).await?;
            let f = read_frame(&mut tcp, &mut buf).await?;
            let _ = events.send(format!("frame {}", f.text()));
            let mut rest = Vec::new();
            tcp.read_to_end(&mut rest).await?;
            let _ = events.send(format!("eof after {} more bytes", rest.len()));
            tcp.write_all(&server_text("after your FIN")).await?;
            tcp.shutdown().await
        }
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(backend.addr)).await;

    let (mut s, _, mut buf) = raw_ws(p.addr, "/", &[]).await;
    within("write a frame", s.write_all(&client_text("hi")))
        .await
        .expect("write a frame");
    within("shut down our write side", s.shutdown())
        .await
        .expect("shutdown(Write)");
    assert_eq!(
        within("the backend's frame", seen.recv()).await.as_deref(),
        Some("frame hi")
    );
    assert_eq!(
        within("the backend to see our FIN", seen.recv())
            .await
            .as_deref(),
        Some("eof after 0 more bytes")
    );
    let later = within("the backend's later frame", read_frame(&mut s, &mut buf))
        .await
        .expect("the backend's frame after our FIN");
    assert_eq!(later.text(), "after your FIN");
    expect_clean_end(&mut s, &buf).await;
}

/// The backend shuts down its write side first and keeps reading: the client sees the
/// backend's last frame and then the end of the stream (a FIN, not a reset), and what the
/// client sends after that still reaches the backend. The tunnel ends once both are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_keeps_the_client_direction_open() {
    let (events, mut seen) = mpsc::unbounded_channel::<String>();
    let backend = RawBackend::start(move |mut tcp| {
        let events = events.clone();
        async move {
            let (_, mut buf) = accept_upgrade(&mut tcp, &[]).await?;
            tcp.write_all(&server_text("last words")).await?;
            tcp.shutdown().await?;
            let f = read_frame(&mut tcp, &mut buf).await?;
            let _ = events.send(format!("frame {}", f.text()));
            let mut rest = Vec::new();
            tcp.read_to_end(&mut rest).await?;
            let _ = events.send(format!("eof after {} more bytes", rest.len()));
            Ok(())
        }
    })
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(backend.addr)).await;

    let (mut s, _, mut buf) = raw_ws(p.addr, "/", &[]).await;
    let last = within("the backend's last frame", read_frame(&mut s, &mut buf))
        .await
        .expect("the backend's last frame");
    assert_eq!(last.text(), "last words");
    expect_clean_end(&mut s, &buf).await;
    // After the backend's FIN, the client's frame still gets through.
    within("write a frame", s.write_all(&client_text("after your FIN")))
        .await
        .expect("write after the backend's FIN");
    assert_eq!(
        within("the backend's read", seen.recv()).await.as_deref(),
        Some("frame after your FIN")
    );
    within("shut down our write side", s.shutdown())
        .await
        .expect("shutdown(Write)");
    assert_eq!(
        within("the backend to see our FIN", seen.recv())
            .await
            .as_deref(),
        Some("eof after 0 more bytes")
    );
    eventually(Duration::from_secs(5), "the tunnel to close", || async {
        p.metric("duplex_websocket_tunnels_active", &[]).await == 0.0
    })
    .await;
}

/// `idle_timeout: 300ms` closes a quiet tunnel, while one with traffic every 100 ms lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_only_quiet_tunnels() {
    let b = Backend::start("echo").await;
    let up = Upstream::new("round_robin")
        .option("idle_timeout", "300ms")
        .backend(b.addr);
    let p = TestProxy::single(&up).await;

    let quiet = async {
        let (mut ws, _) = ws(p.addr, "/echo").await;
        let opened = Instant::now();
        let end = within("the quiet tunnel to be closed", ws.next()).await;
        assert!(
            !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
            "the quiet tunnel got data instead of a close: {end:?}"
        );
        opened.elapsed()
    };
    let busy = async {
        let (mut ws, _) = ws(p.addr, "/echo").await;
        let opened = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut echoes = 0;
        for i in 0..13 {
            tick.tick().await;
            let msg = Message::text(format!("tick {i}"));
            ws.send(msg.clone()).await.expect("the busy tunnel is open");
            assert_eq!(recv(&mut ws).await, msg);
            echoes += 1;
        }
        (opened.elapsed(), echoes, ws)
    };
    let (quiet_lived, (busy_lived, echoes, busy_ws)) = tokio::join!(quiet, busy);
    assert!(
        quiet_lived >= Duration::from_millis(250) && quiet_lived < Duration::from_secs(3),
        "the quiet tunnel closed after {quiet_lived:?}, expected about 300-600 ms"
    );
    assert!(
        busy_lived > Duration::from_secs(1),
        "busy for {busy_lived:?}"
    );
    assert_eq!(echoes, 13);
    close(busy_ws).await;
}
