//! Tests for the parent module.

use super::*;

thread_local! {
    /// A shorter [`super::HALF_CLOSED_IDLE`] for the tunnels this thread drives.
    pub(super) static HALF_CLOSED_IDLE: std::cell::Cell<Option<Duration>> =
        const { std::cell::Cell::new(None) };
}

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (b, _) = l.accept().await.expect("accept");
    (a, b)
}

/// A tunnel between two sockets, with nothing early and counters of its own.
fn splice(client: TcpStream, backend: TcpStream) -> Splice {
    let m = Arc::new(duplex_metrics::Metrics::new());
    let series = m.tunnel_series(&m.route_series("r", "u"), "b");
    Splice {
        client,
        backend,
        c2b: Direction::new(Bytes::new(), series.client_to_backend.clone()),
        b2c: Direction::new(Bytes::new(), series.backend_to_client.clone()),
        active: false,
        broken: None,
    }
}

/// The backend ends its side and the client stays silent: without `idle_timeout`,
/// the tunnel still ends once it has been half-closed and quiet for the bound.
#[tokio::test]
async fn a_quiet_half_closed_tunnel_ends() {
    use tokio::io::AsyncReadExt;
    let (mut user, client) = pair().await;
    let (backend, mut server) = pair().await;
    let mut t = splice(client, backend);
    let settings = Settings {
        idle_timeout: None,
        close: CancellationToken::new(),
    };
    server.write_all(b"bye").await.expect("write");
    server.shutdown().await.expect("shutdown");
    HALF_CLOSED_IDLE.with(|c| c.set(Some(Duration::from_millis(200))));
    let drive = drive(&mut t, &settings);
    let end = tokio::time::timeout(Duration::from_secs(10), drive)
        .await
        .expect("a quiet half-closed tunnel ends");
    assert!(matches!(end, End::HalfClosedIdle), "{end:?}");
    // What came before the end, and the end itself, reached the client.
    let mut got = Vec::new();
    user.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, b"bye");
}

/// Quiet time before a half-close still counts after it: with `idle_timeout` 80 s, a
/// tunnel quiet for 55 s and then half-closed ends by about 60 s (the half-closed bound
/// of 40 s in ticks of 5 s, with the 50 s counted so far), not 40 s after the FIN.
#[tokio::test(start_paused = true)]
async fn a_half_close_keeps_the_quiet_time_counted_so_far() {
    let (_user, client) = pair().await;
    let (backend, mut server) = pair().await;
    let mut t = splice(client, backend);
    let settings = Settings {
        idle_timeout: Some(Duration::from_secs(80)),
        close: CancellationToken::new(),
    };
    HALF_CLOSED_IDLE.with(|c| c.set(Some(Duration::from_secs(40))));
    let start = tokio::time::Instant::now();
    // On this thread (the test's runtime has one), where the bound was set.
    let run = tokio::spawn(async move { drive(&mut t, &settings).await });
    tokio::time::sleep(Duration::from_secs(55)).await;
    server.shutdown().await.expect("shutdown");
    let end = run.await.expect("the tunnel task");
    assert!(matches!(end, End::HalfClosedIdle), "{end:?}");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(66), "ended after {took:?}");
}

/// The send and receive queues (bytes not yet acknowledged by the peer; bytes not yet
/// read) of the loopback TCP socket from port `local` to port `remote`, from
/// `/proc/net/tcp`; `None` when there is no such socket (a reset one leaves the table).
fn queues(local: u16, remote: u16) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if port(f.get(1)?)? != local || port(f.get(2)?)? != remote {
            return None;
        }
        let (tx, rx) = f.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

fn send_queue(local: u16, remote: u16) -> Option<u64> {
    queues(local, remote).map(|q| q.0)
}

/// The tunnel's port toward `server` (its peer) and `server`'s own.
fn t_backend_port(server: &TcpStream) -> (u16, u16) {
    (
        server.peer_addr().expect("addr").port(),
        server.local_addr().expect("addr").port(),
    )
}

/// A socket's send queue from /proc/net/tcp: a [`crate::send_timeout::QueueProbe`]
/// for tests, which may not call the OS themselves.
fn proc_queue(fd: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    let sock = socket2::SockRef::from(&fd);
    let local = sock.local_addr().ok()?.as_socket()?.port();
    let peer = sock.peer_addr().ok()?.as_socket()?.port();
    send_queue(local, peer).and_then(|q| u32::try_from(q).ok())
}

/// Waits, bounded, for `what` to hold.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The backend sends a burst the client is slow to read, then is gone (a reset), and
/// the client's next message fails to reach it. The burst, held by the tunnel when
/// that write fails, still reaches the client whole before the tunnel ends.
#[tokio::test]
async fn a_side_gone_on_write_leaves_the_other_direction_to_deliver() {
    use tokio::io::AsyncReadExt;
    const BURST: usize = 128 * 1024;
    // Small buffers between the tunnel and the client (the tunnel's send buffer, the
    // client's receive buffer): most of the burst waits in the tunnel, read or queued
    // in its socket from the backend.
    let l = tokio::net::TcpSocket::new_v4().expect("socket");
    l.set_send_buffer_size(4096).expect("SO_SNDBUF");
    l.bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let l = l.listen(16).expect("listen");
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut user = sock
        .connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (client, _) = l.accept().await.expect("accept");
    let (client_side, user_port) = (
        client.local_addr().expect("addr").port(),
        client.peer_addr().expect("addr").port(),
    );
    let (backend, mut server) = pair().await;
    let tunnel_side = backend.local_addr().expect("addr").port();
    let server_port = server.local_addr().expect("addr").port();
    let mut t = splice(client, backend);
    let run = tokio::spawn(async move {
        let settings = Settings {
            idle_timeout: None,
            close: CancellationToken::new(),
        };
        drive(&mut t, &settings).await
    });

    let burst: Vec<u8> = (0..BURST).map(|i| (i % 251) as u8).collect();
    server.write_all(&burst).await.expect("write the burst");
    // All of it acknowledged by the tunnel's socket: the reset then loses none of it.
    until("the burst to reach the tunnel", || {
        send_queue(server_port, tunnel_side) == Some(0)
    })
    .await;
    server.set_zero_linger().expect("SO_LINGER 0");
    drop(server);
    until("the reset to reach the tunnel's socket", || {
        send_queue(tunnel_side, server_port).is_none()
    })
    .await;
    // Fails on the backend's side: its socket is reset.
    user.write_all(b"ping").await.expect("write");
    let taken = || {
        send_queue(user_port, client_side) == Some(0)
            && queues(client_side, user_port).is_some_and(|(_, unread)| unread == 0)
    };
    until("the ping to be taken", taken).await;
    // The client goes on sending while it reads (heartbeats, say): left unread, that
    // would make the tunnel's close a reset, destroying the end of the burst.
    let mut got = vec![0u8; 1024];
    user.read_exact(&mut got)
        .await
        .expect("the start of the burst");
    user.write_all(&[b'h'; 16 * 1024]).await.expect("write");
    // Read and dropped by the tunnel, not left in its socket: all of them acknowledged
    // to the client, and none unread on the tunnel's side.
    until("the client's bytes to be read", taken).await;
    let read = tokio::time::timeout(Duration::from_secs(10), user.read_to_end(&mut got));
    read.await
        .expect("the client reads to the end")
        .expect("read");
    assert_eq!(got.len(), BURST, "bytes the client got");
    assert!(got == burst, "the burst, in order");
    // Told the end (a FIN), the client closes too, which ends the tunnel.
    drop(user);
    let end = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the tunnel ends")
        .expect("the tunnel task");
    match end {
        End::Error(e) => assert!(e.to_string().starts_with("backend side: "), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// The client ends its side, then resets its connection, while the backend streams on:
/// with nothing left to deliver, the backend's bytes are dropped for [`LINGER`] only,
/// not read at full speed until the half-closed bound.
#[tokio::test]
async fn a_tunnel_with_nothing_left_to_deliver_lingers_briefly() {
    use tokio::io::AsyncReadExt;
    // The binary reads a socket's queue with an ioctl; tests read /proc/net/tcp.
    crate::send_timeout::set_queue_probe(proc_queue);
    let (mut user, client) = pair().await;
    let (backend, mut server) = pair().await;
    let mut t = splice(client, backend);
    // Far longer than LINGER and than the test's patience: only LINGER can end it.
    HALF_CLOSED_IDLE.with(|c| c.set(Some(Duration::from_secs(120))));
    let settings = Settings {
        idle_timeout: None,
        close: CancellationToken::new(),
    };
    let streaming = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        // Bounded: about 16 GiB at most, far more than a few seconds can move.
        for _ in 0..1_000_000 {
            if server.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let started = std::time::Instant::now();
    let drive = drive(&mut t, &settings);
    tokio::pin!(drive);
    let mut got = vec![0u8; 64 * 1024];
    tokio::select! {
        read = user.read(&mut got) => assert!(read.expect("read") > 0),
        end = &mut drive => panic!("ended before the client left: {end:?}"),
    }
    // The client ends its side (passed on to the backend, which streams on), then
    // goes with bytes unread: a reset.
    tokio::io::AsyncWriteExt::shutdown(&mut user)
        .await
        .expect("shutdown");
    socket2::SockRef::from(&user)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(user);
    let end = tokio::time::timeout(Duration::from_secs(30), drive)
        .await
        .expect("the tunnel ends");
    let took = started.elapsed();
    assert!(
        took < LINGER + Duration::from_secs(5),
        "ended after {took:?}: {end:?}"
    );
    assert!(matches!(end, End::Lingered), "{end:?} after {took:?}");
    streaming.abort();
}

/// The backend sends a large last burst and goes (its close resets, since the
/// client's heartbeats are unread), while the client reads slowly and keeps sending:
/// the tunnel does not linger out while the burst still waits in its socket for the
/// client, who gets all of it.
#[tokio::test]
async fn no_linger_while_the_live_side_still_has_bytes_to_take() {
    use tokio::io::AsyncReadExt;
    const BURST: usize = 1 << 20;
    crate::send_timeout::set_queue_probe(proc_queue);
    let (mut user, client) = pair().await;
    let (backend, mut server) = pair().await;
    let mut t = splice(client, backend);
    HALF_CLOSED_IDLE.with(|c| c.set(Some(Duration::from_secs(120))));
    let run = tokio::spawn(async move {
        let settings = Settings {
            idle_timeout: None,
            close: CancellationToken::new(),
        };
        drive(&mut t, &settings).await
    });
    let (tunnel_side, server_port) = (
        t_backend_port(&server).0,
        server.local_addr().expect("addr").port(),
    );
    let burst: Vec<u8> = (0..BURST).map(|i| (i % 251) as u8).collect();
    server.write_all(&burst).await.expect("the burst");
    server.shutdown().await.expect("shutdown");
    // All of it taken by the tunnel's sockets, so the reset loses none of it.
    until("the burst to reach the tunnel", || {
        send_queue(server_port, tunnel_side) == Some(0)
    })
    .await;
    user.write_all(b"h").await.expect("a heartbeat");
    until("the heartbeat to wait unread at the backend", || {
        queues(server_port, tunnel_side).is_some_and(|(_, unread)| unread > 0)
    })
    .await;
    // Gone with the heartbeat unread: a reset.
    drop(server);
    let mut got = Vec::with_capacity(BURST);
    let mut buf = vec![0u8; 32 * 1024];
    // About 320 KB/s: several seconds, longer than LINGER. Bounded by the count.
    for _ in 0..2_000 {
        let _ = user.write_all(b"h").await;
        match tokio::time::timeout(Duration::from_secs(10), user.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("the client's read failed after {} bytes: {e}", got.len()),
            Err(_) => panic!("the client's read stalled after {} bytes", got.len()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got.len(), BURST, "bytes the client got");
    assert!(got == burst, "the burst, in order");
    drop(user);
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the tunnel ends")
        .expect("the tunnel task");
}

/// An idle tunnel's task is most of its memory; this keeps it from growing unnoticed.
#[tokio::test]
async fn an_idle_tunnel_stays_small() {
    let (a, b) = pair().await;
    let m = std::sync::Arc::new(duplex_metrics::Metrics::new());
    let series = m.tunnel_series(&m.route_series("r", "u"), "b");
    let t = Splice {
        client: a,
        backend: b,
        c2b: Direction::new(Bytes::new(), series.client_to_backend.clone()),
        b2c: Direction::new(Bytes::new(), series.backend_to_client.clone()),
        active: false,
        broken: None,
    };
    let settings = Settings {
        idle_timeout: None,
        close: CancellationToken::new(),
    };
    let fut = run(t, settings, series.life, (0u64, 0u64));
    let size = std::mem::size_of_val(&fut);
    // The task's allocation grows in steps of 128 bytes (tokio aligns it so): a few
    // bytes more here can cost 128 per tunnel.
    assert!(size <= 384, "the tunnel future grew to {size} bytes");
}
