//! The benchmark backend: a WebSocket echo server that also answers plain HTTP.
//!
//! It is built to stay out of the measurement: one thread, buffers kept per connection,
//! every frame that a read brought in is unmasked in place and echoed with one write
//! (`writev` when large payloads go out from the read buffer, uncopied; its list of slices
//! is the one allocation per read).
//! A connection that upgrades echoes each data frame back unmasked with the same opcode,
//! answers Ping with Pong, and answers Close with Close and then closes the TCP
//! connection first, as RFC 6455 asks of servers. Any other request gets a small 200,
//! keep-alive, pipelining allowed.

use std::io::{self, IoSlice};
use std::ops::Range;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ws::{self, Parsed};

/// The body of every plain HTTP answer.
pub const HTTP_BODY: &[u8] = b"hello from the duplex-bench echo backend\n";
/// A head larger than this is refused.
const MAX_HEAD: usize = 16 * 1024;
/// How long a closing connection waits for the peer's FIN after our Close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Read buffer reserved per read while idle; grows to fit a larger frame.
const READ_CHUNK: usize = 8 * 1024;

/// Accepts and serves connections until the process ends. Accept errors (EMFILE) back off
/// briefly rather than spin.
pub async fn serve(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(async move {
                    let _ = connection(tcp).await;
                });
            }
            Err(e) => {
                eprintln!("echo: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Binds `addr` with a deep backlog, as the proxies do.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(8192)
}

async fn connection(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    loop {
        // Answer every complete request in the buffer, then write once.
        let mut pos = 0;
        let mut close = false;
        while let Some(end) = ws::head_end(&buf[pos..]) {
            let head = &buf[pos..pos + end];
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if req.parse(head).is_err() {
                out.extend_from_slice(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                close = true;
                break;
            }
            let header = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
            };
            let has = |name: &str, token: &str| {
                header(name).is_some_and(|v| {
                    v.split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
                })
            };
            if has("upgrade", "websocket") && has("connection", "upgrade") {
                let Some(key) = header("sec-websocket-key") else {
                    out.extend_from_slice(
                        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    close = true;
                    break;
                };
                let accept = ws::accept_for(key);
                out.extend_from_slice(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                         connection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
                    )
                    .as_bytes(),
                );
                s.write_all(&out).await?;
                let rest = buf.split_off(pos + end);
                return websocket(s, rest).await;
            }
            // A body announced by Content-Length is skipped (GET has none).
            let body_len = header("content-length")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() < pos + end + body_len {
                break;
            }
            let wants_close = has("connection", "close") || req.version == Some(0);
            out.extend_from_slice(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
                    HTTP_BODY.len(),
                    if wants_close {
                        "connection: close\r\n"
                    } else {
                        ""
                    }
                )
                .as_bytes(),
            );
            out.extend_from_slice(HTTP_BODY);
            pos += end + body_len;
            if wants_close {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if close {
            return s.shutdown().await;
        }
        buf.drain(..pos);
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        buf.reserve(1024);
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// A run of bytes to echo, in the order they go out: from the write buffer (headers and
/// small frames) or from the read buffer (large payloads, echoed in place).
enum Piece {
    Out(Range<usize>),
    Buf(Range<usize>),
}

async fn websocket(mut s: TcpStream, mut buf: Vec<u8>) -> io::Result<()> {
    let mut out: Vec<u8> = Vec::new();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut header: Vec<u8> = Vec::with_capacity(14);
    loop {
        let mut pos = 0;
        let mut need = 0;
        let mut closing = false;
        // Where the bytes of `out` not yet in `pieces` begin.
        let mut out_from = 0;
        loop {
            match ws::parse(&buf[pos..])? {
                Parsed::Need(n) => {
                    need = n;
                    break;
                }
                Parsed::Frame(f) => {
                    let start = pos + f.header_len;
                    let end = start + f.payload_len;
                    pos = end;
                    if let Some(m) = f.mask {
                        ws::apply_mask(&mut buf[start..end], m);
                    }
                    let first = match f.opcode() {
                        ws::OP_CLOSE => {
                            closing = true;
                            0x80 | ws::OP_CLOSE
                        }
                        ws::OP_PING => 0x80 | ws::OP_PONG,
                        ws::OP_PONG => continue,
                        _ => f.first,
                    };
                    if f.payload_len >= ws::VECTORED_FROM {
                        // The unmasked header (minimal length field, no key) is never longer
                        // than the client's: write it just before the payload.
                        header.clear();
                        ws::put_header(&mut header, first, f.payload_len, None);
                        let at = start - header.len();
                        buf[at..start].copy_from_slice(&header);
                        if out.len() > out_from {
                            pieces.push(Piece::Out(out_from..out.len()));
                            out_from = out.len();
                        }
                        pieces.push(Piece::Buf(at..end));
                    } else {
                        ws::put_header(&mut out, first, f.payload_len, None);
                        out.extend_from_slice(&buf[start..end]);
                    }
                    if closing {
                        break;
                    }
                }
            }
        }
        if pieces.is_empty() {
            if !out.is_empty() {
                s.write_all(&out).await?;
            }
        } else {
            if out.len() > out_from {
                pieces.push(Piece::Out(out_from..out.len()));
            }
            let mut slices: Vec<IoSlice<'_>> = pieces
                .iter()
                .map(|p| match p {
                    Piece::Out(r) => IoSlice::new(&out[r.clone()]),
                    Piece::Buf(r) => IoSlice::new(&buf[r.clone()]),
                })
                .collect();
            ws::write_all_vectored(&mut s, &mut slices).await?;
            pieces.clear();
        }
        out.clear();
        if closing {
            // The server closes the TCP connection first; then wait (bounded) for the FIN.
            s.shutdown().await?;
            let mut sink = [0u8; 512];
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                while s.read(&mut sink).await.unwrap_or(0) > 0 {}
            })
            .await;
            return Ok(());
        }
        buf.drain(..pos);
        // A connection that caught up gives a large buffer back.
        if buf.is_empty() && buf.capacity() > 8 * READ_CHUNK {
            buf = Vec::new();
        }
        let want = need.saturating_sub(buf.len()).max(READ_CHUNK);
        buf.reserve(want);
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{put_frame, MASK, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG};

    /// Small frames are copied, large ones echoed from the read buffer: a mix sent in one
    /// write comes back in order, unmasked, byte for byte, at every length class; a Pong
    /// gets no answer, a large Ping its Pong, an unmasked frame and one with a longer length
    /// field than it needs their echo.
    #[tokio::test]
    async fn echoes_small_and_large_frames_in_order() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener));
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = ws::client_handshake(&mut s, "echo.test").await.unwrap();
        let (mut r, mut w) = s.into_split();

        let body = |len: usize, seed: u8| -> Vec<u8> {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        };
        // (opcode sent, payload, masked, what comes back)
        let sent = [
            (OP_BINARY, body(5, 1), true, Some(OP_BINARY)),
            (OP_BINARY, body(ws::VECTORED_FROM, 2), true, Some(OP_BINARY)),
            (OP_PING, body(4, 3), true, Some(OP_PONG)),
            (OP_BINARY, body(20_000, 4), true, Some(OP_BINARY)),
            (OP_PONG, body(7, 5), true, None),
            (OP_BINARY, body(70_000, 6), true, Some(OP_BINARY)),
            (OP_PING, body(2_000, 7), true, Some(OP_PONG)),
            (OP_BINARY, body(3_000, 8), false, Some(OP_BINARY)),
            (
                OP_BINARY,
                body(ws::VECTORED_FROM - 1, 9),
                true,
                Some(OP_BINARY),
            ),
            (OP_CLOSE, vec![0x03, 0xe8], true, Some(OP_CLOSE)),
        ];
        let mut out = Vec::new();
        for (op, payload, masked, _) in &sent {
            put_frame(&mut out, *op, payload, masked.then_some(MASK));
        }
        // A 1,100-byte frame whose length takes the 8-byte field where 2 bytes would do;
        // it goes right before the Close.
        let odd = body(1_100, 10);
        let close_at = out.len() - 8;
        let mut long = vec![0x80 | OP_BINARY, 0x80 | 127];
        long.extend_from_slice(&(odd.len() as u64).to_be_bytes());
        long.extend_from_slice(&MASK);
        let masked_at = long.len();
        long.extend_from_slice(&odd);
        ws::apply_mask(&mut long[masked_at..], MASK);
        out.splice(close_at..close_at, long);

        // Written while the echoes are read, so that neither side waits on a full buffer.
        let writer = tokio::spawn(async move {
            w.write_all(&out).await.unwrap();
            w
        });
        let mut want: Vec<(u8, &[u8])> = sent
            .iter()
            .filter_map(|(_, p, _, back)| back.map(|op| (op, &p[..])))
            .collect();
        let close = want.pop().unwrap();
        want.push((OP_BINARY, &odd));
        want.push(close);
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            for (op, payload) in want {
                let f = ws::read_frame(&mut r, &mut buf).await.unwrap();
                assert_eq!(
                    f.opcode(),
                    op,
                    "opcode of the echo of a {}-byte frame",
                    payload.len()
                );
                assert_eq!(f.mask, None, "server frames are not masked");
                assert_eq!(&buf[f.header_len..f.total_len()], payload);
                buf.drain(..f.total_len());
            }
            // The server closes first after its Close, with nothing more to say.
            let mut rest = Vec::new();
            assert_eq!(r.read_to_end(&mut rest).await.unwrap(), 0);
            assert!(buf.is_empty(), "nothing after the Close: {buf:?}");
        })
        .await
        .expect("every echo within 10 s");
        writer.await.expect("the writer finished");
    }
}
