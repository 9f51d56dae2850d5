//! Raw HTTP/1.1 heads and WebSocket frames, for the cases a client library would not produce
//! (several messages in one TCP write, fragments, malformed handshakes).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The RFC 6455 example key: the base64 of 16 bytes.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The mask every raw client frame uses.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// Heads larger than this are a broken peer, not a test case.
const MAX_HEAD: usize = 64 * 1024;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;

/// The `Sec-WebSocket-Accept` value answering `key`.
pub fn accept_for(key: &str) -> String {
    derive_accept_key(key.as_bytes())
}

/// A request or response head: its first line and headers in arrival order.
#[derive(Debug, Clone)]
pub struct Head {
    pub first_line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn parse(text: &str) -> Head {
        let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
        let first_line = lines.next().unwrap_or_default().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Head {
            first_line,
            headers,
        }
    }

    /// Every value of header `name`, compared case-insensitively.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of header `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    /// The status code of a response head.
    pub fn status(&self) -> u16 {
        self.first_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {:?}", self.first_line))
    }
}

/// Reads until the blank line ending a head; returns the head and the bytes read past it.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(Head, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok((Head::parse(&text), buf[end + 4..].to_vec()));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::other("head larger than 64 KiB"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {} bytes, before the end of a head",
                    buf.len()
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A client's upgrade request with a valid key and version, plus `extra` header lines.
pub fn upgrade_request(path: &str, host: &str, extra: &[(&str, &str)]) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n"
    );
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// A 101 answering `request` (its key), with `extra` header lines.
pub fn switching_protocols(request: &Head, extra: &[(&str, &str)]) -> String {
    let key = request.get("sec-websocket-key").unwrap_or_default();
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        accept_for(key)
    );
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// A raw backend's side of the handshake: reads the upgrade request and answers it with a
/// 101 carrying `extra`. Returns the request head and the bytes that came after it.
pub async fn accept_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    extra: &[(&str, &str)],
) -> io::Result<(Head, Vec<u8>)> {
    let (head, buf) = read_head(stream).await?;
    stream
        .write_all(switching_protocols(&head, extra).as_bytes())
        .await?;
    Ok((head, buf))
}

/// One WebSocket frame as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Encodes a frame; `mask` is required from clients and forbidden from servers.
pub fn encode(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A whole, masked client text frame.
pub fn client_text(text: &str) -> Vec<u8> {
    encode(true, OP_TEXT, text.as_bytes(), Some(MASK))
}

/// A whole, unmasked server text frame.
pub fn server_text(text: &str) -> Vec<u8> {
    encode(true, OP_TEXT, text.as_bytes(), None)
}

/// Reads one frame; `buf` holds bytes already read (e.g. past a head) and keeps any excess.
pub async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Frame> {
    loop {
        if let Some((frame, used)) = decode(buf) {
            buf.drain(..used);
            return Ok(frame);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed with {} bytes of a partial frame",
                    buf.len()
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Decodes a frame at the start of `b`, if it is all there: the frame and its length.
fn decode(b: &[u8]) -> Option<(Frame, usize)> {
    if b.len() < 2 {
        return None;
    }
    let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0f);
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    let mask = if masked {
        let k: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(k)
    } else {
        None
    };
    let mut payload = b.get(at..at + len)?.to_vec();
    if let Some(k) = mask {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x ^= k[i % 4]);
    }
    Some((
        Frame {
            fin,
            opcode,
            masked,
            payload,
        },
        at + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        for len in [0, 5, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for mask in [None, Some(MASK)] {
                let bytes = encode(false, OP_BINARY, &payload, mask);
                let (f, used) = decode(&bytes).expect("a whole frame");
                assert_eq!(used, bytes.len());
                assert_eq!(
                    (f.fin, f.opcode, f.masked),
                    (false, OP_BINARY, mask.is_some())
                );
                assert_eq!(f.payload, payload);
                assert!(
                    decode(&bytes[..bytes.len() - 1]).is_none(),
                    "a partial frame"
                );
            }
        }
    }

    #[test]
    fn heads_parse() {
        let h = Head::parse("HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nX: a:b");
        assert_eq!(h.status(), 426);
        assert_eq!(h.get("sec-websocket-version"), Some("13"));
        assert_eq!(h.get("x"), Some("a:b"));
    }
}
