//! One active health check of one backend: a TCP connect, an HTTP request, or a WebSocket
//! upgrade with a ping, and why it failed.

use std::io;
use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use duplex_config::{HealthCheck, HealthKind};
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connector::{connect, is_local_exhaustion};
use crate::handshake::check_backend_101;
use crate::state::UpstreamRt;

/// Frames a WebSocket probe reads while waiting for its pong or close: a backend may greet
/// each new connection first (an initial state, a backlog of messages). Their payloads are
/// read past, not kept, and the check's `timeout` bounds the whole probe.
const PROBE_MAX_FRAMES: usize = 1024;
/// Largest control frame payload (RFC 6455 section 5.5).
const CONTROL_MAX_PAYLOAD: u64 = 125;

/// Why a check failed. Every kind is the backend's failure except `Local` and `Request`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// duplex ran out of file descriptors or ports: says nothing of the backend.
    #[error("local: {0}")]
    Local(#[source] io::Error),
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// The whole check took longer than the health check's `timeout`.
    #[error("timed out")]
    TimedOut,
    /// The request could not be built from the check's `path` and `host`.
    #[error("cannot build the check's request: {0}")]
    Request(#[from] http::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("status {got} (expected {want})")]
    Status { got: StatusCode, want: u16 },
    #[error("invalid 101: {0}")]
    BadUpgrade(&'static str),
    #[error("the backend closed before answering the ping")]
    ClosedBeforePong,
    #[error("no pong in {PROBE_MAX_FRAMES} frames")]
    NoPong,
    #[error("no answer to the close in {PROBE_MAX_FRAMES} frames")]
    NoCloseAnswer,
    #[error("control frame of {0} bytes (at most 125)")]
    FrameTooLarge(u64),
}

impl ProbeError {
    /// What failed, with each cause in its source chain that the text does not already
    /// give (hyper's `connection error` says nothing of the TLS alert behind it), for
    /// `/status`.
    pub fn reason(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            let more = e.to_string();
            if !text.contains(&more) {
                text.push_str(": ");
                text.push_str(&more);
            }
            cause = e.source();
        }
        text
    }

    fn connect(e: io::Error) -> ProbeError {
        if is_local_exhaustion(&e) {
            ProbeError::Local(e)
        } else {
            ProbeError::Connect(e)
        }
    }
}

/// One check of one backend; `Err` says what failed.
pub async fn probe(hc: &HealthCheck, up: &UpstreamRt, addr: SocketAddr) -> Result<(), ProbeError> {
    if hc.kind == HealthKind::Tcp {
        return TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(ProbeError::connect);
    }
    let tls = up.tls.as_deref().map(crate::tls::Connector::for_probes);
    let stream = connect(addr, hc.timeout, tls.as_ref())
        .await
        .map_err(ProbeError::connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn.with_upgrades());
    let result = exchange(hc, &mut sender, addr).await;
    driver.abort();
    result
}

/// The request of an HTTP or WebSocket check, and the verdict on its answer.
async fn exchange(
    hc: &HealthCheck,
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
) -> Result<(), ProbeError> {
    let host = hc.host.clone().unwrap_or_else(|| addr.to_string());
    let key = B64.encode(std::array::from_fn::<u8, 16, _>(|_| fastrand::u8(..)));
    let key = HeaderValue::try_from(key).map_err(http::Error::from)?;
    let mut req = Request::get(hc.path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, "duplex-health-check");
    if hc.kind == HealthKind::Websocket {
        req = req
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", key.clone());
    }
    let mut resp = sender.send_request(req.body(Empty::new())?).await?;
    let status = resp.status();
    if hc.kind == HealthKind::Http {
        return match status.as_u16() == hc.expect_status {
            true => Ok(()),
            false => Err(ProbeError::Status {
                got: status,
                want: hc.expect_status,
            }),
        };
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProbeError::Status {
            got: status,
            want: 101,
        });
    }
    let lines = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    check_backend_101(lines, &key).map_err(ProbeError::BadUpgrade)?;
    let io = hyper::upgrade::on(&mut resp).await?;
    ping_and_close(TokioIo::new(io)).await
}

/// On an open WebSocket: a ping must get its pong, then a Close is answered and the
/// connection ends cleanly.
async fn ping_and_close<S: AsyncRead + AsyncWrite + Unpin>(mut ws: S) -> Result<(), ProbeError> {
    const PING: &[u8] = b"duplex";
    ws.write_all(&client_frame(0x9, PING)).await?;
    let mut got_pong = false;
    for _ in 0..PROBE_MAX_FRAMES {
        let (opcode, payload) = read_frame(&mut ws).await?;
        if opcode == 0xA && payload == PING {
            got_pong = true;
            break;
        }
        if opcode == 0x8 {
            return Err(ProbeError::ClosedBeforePong);
        }
    }
    if !got_pong {
        return Err(ProbeError::NoPong);
    }
    ws.write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await?;
    for _ in 0..PROBE_MAX_FRAMES {
        match read_frame(&mut ws).await {
            Ok((0x8, _)) => return Ok(()),
            Ok(_) => {}
            // A backend may close the TCP connection right after its Close.
            Err(_) => return Ok(()),
        }
    }
    Err(ProbeError::NoCloseAnswer)
}

/// A masked client frame with FIN set; `payload` is at most 125 bytes (a control frame).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= 125);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one server frame: (opcode, payload). A data frame's payload is read past and not
/// returned (only control frames matter to the probe).
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> Result<(u8, Vec<u8>), ProbeError> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    let len = match head[1] & 0x7f {
        126 => u64::from(s.read_u16().await?),
        127 => s.read_u64().await?,
        n => u64::from(n),
    };
    let opcode = head[0] & 0x0f;
    let control = opcode & 0x8 != 0;
    if control && len > CONTROL_MAX_PAYLOAD {
        return Err(ProbeError::FrameTooLarge(len));
    }
    let mut mask = [0u8; 4];
    if head[1] & 0x80 != 0 {
        s.read_exact(&mut mask).await?;
    }
    if !control {
        let skipped = tokio::io::copy(&mut (&mut *s).take(len), &mut tokio::io::sink()).await?;
        if skipped < len {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        return Ok((opcode, Vec::new()));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await?;
    if head[1] & 0x80 != 0 {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= mask[i % 4]);
    }
    Ok((opcode, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that greets every connection with many large messages (an initial
    /// state, a backlog) is healthy when its pong and Close answer come after them.
    #[tokio::test]
    async fn a_long_greeting_does_not_fail_the_probe() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let backend = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            // 40 text frames of 100 KB each, unmasked, as a server sends them.
            let payload = vec![b'x'; 100_000];
            for _ in 0..40 {
                let mut f = vec![0x81, 127];
                f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
                f.extend_from_slice(&payload);
                s.write_all(&f).await.expect("greeting");
            }
            // The ping (masked, 6 bytes): answered with its pong; then the Close.
            let mut ping = [0u8; 12];
            s.read_exact(&mut ping).await.expect("ping");
            let data: Vec<u8> = (0..6).map(|i| ping[6 + i] ^ ping[2 + i % 4]).collect();
            let mut pong = vec![0x8A, 6];
            pong.extend_from_slice(&data);
            s.write_all(&pong).await.expect("pong");
            let mut close = [0u8; 8];
            s.read_exact(&mut close).await.expect("close");
            s.write_all(&[0x88, 0]).await.expect("close answer");
        });
        let s = TcpStream::connect(addr).await.expect("connect");
        let probed = tokio::time::timeout(std::time::Duration::from_secs(10), ping_and_close(s))
            .await
            .expect("the probe ends");
        assert!(probed.is_ok(), "{probed:?}");
        backend.await.expect("the backend");
    }

    /// Running out of file descriptors or ports is duplex's failure, which must not count
    /// against the backend; a refused connection is the backend's.
    #[test]
    fn local_exhaustion_is_not_the_backends_failure() {
        let emfile = ProbeError::connect(io::Error::from_raw_os_error(24));
        assert!(matches!(emfile, ProbeError::Local(_)), "{emfile:?}");
        let ports = ProbeError::connect(io::ErrorKind::AddrNotAvailable.into());
        assert!(matches!(ports, ProbeError::Local(_)), "{ports:?}");
        let refused = ProbeError::connect(io::ErrorKind::ConnectionRefused.into());
        assert!(matches!(refused, ProbeError::Connect(_)), "{refused:?}");
    }

    /// The reason `/status` shows gives each cause once: what the text says already is
    /// not repeated, and what it leaves out (behind an I/O error) is added.
    #[test]
    fn a_reason_names_each_cause_once() {
        let refused = ProbeError::connect(io::Error::from_raw_os_error(111));
        assert_eq!(
            refused.reason(),
            "connect: Connection refused (os error 111)"
        );
        let hidden = io::Error::other("fatal alert");
        let io = ProbeError::Io(io::Error::other(Wrapped(hidden)));
        assert_eq!(io.reason(), "I/O: wrapped: fatal alert");
    }

    /// An error whose text leaves out its source, as hyper's `connection error` does.
    #[derive(Debug)]
    struct Wrapped(io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "wrapped")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
