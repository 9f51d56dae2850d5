//! Just enough RFC 6455 for a load generator and an echo server: frame headers, masking,
//! and the opening handshake on both sides. No extensions, no fragmentation logic (frames
//! are echoed one by one as they come).

use std::io::{self, IoSlice, Read, Write};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The longest handshake head either side accepts.
const MAX_HEAD: usize = 16 * 1024;
/// The largest payload the parser accepts; anything bigger is a protocol error here.
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The mask every client frame of the load generator uses. The RFC wants it unpredictable
/// to defeat cache poisoning by browsers; a benchmark client has no such attacker, and a
/// fixed key lets a frame be masked once and sent many times.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Payloads at least this long are sent without being copied into a write buffer: the echo
/// server sends them from its read buffer and the load generator from one shared template,
/// with `writev`. Copying large payloads into a second buffer per connection cost the
/// backend a quarter of its CPU with 100 connections of 16 KiB messages (cache misses on
/// the cold destination), enough to make the backend, not the proxy, the limit. Smaller
/// payloads are copied: one contiguous write is cheaper than many tiny slices.
pub const VECTORED_FROM: usize = 1024;

/// The most slices handed to one `writev` (Linux refuses more than 1,024).
const MAX_SLICES: usize = 512;

/// Writes every slice, in order, with as few `writev` calls as the socket allows.
pub async fn write_all_vectored(
    s: &mut TcpStream,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = slices.len().min(MAX_SLICES);
        let written = s.write_vectored(&slices[..n]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// The `Sec-WebSocket-Accept` value that answers `key`.
pub fn accept_for(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    B64.encode(h.finalize())
}

/// A fresh `Sec-WebSocket-Key`: the base64 of 16 random bytes.
pub fn new_key() -> String {
    let raw: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    B64.encode(raw)
}

/// XORs `buf` with `key`, the mask offset starting at 0.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let k8 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ k8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Appends a frame header: `first` is the FIN/RSV/opcode byte.
pub fn put_header(out: &mut Vec<u8>, first: u8, len: usize, mask: Option<[u8; 4]>) {
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    out.push(first);
    if len < 126 {
        out.push(mbit | len as u8);
    } else if len <= 0xffff {
        out.push(mbit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
}

/// Appends a complete final frame with `opcode`, masked when `mask` is given.
pub fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    put_header(out, 0x80 | opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m);
    }
}

/// A frame header parsed from the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The FIN/RSV/opcode byte as sent.
    pub first: u8,
    pub mask: Option<[u8; 4]>,
    pub header_len: usize,
    pub payload_len: usize,
}

impl Frame {
    pub fn opcode(&self) -> u8 {
        self.first & 0x0f
    }

    /// Header and payload.
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// What [`parse`] found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole frame is there.
    Frame(Frame),
    /// More bytes are needed: at least this many in all.
    Need(usize),
}

/// Parses the frame at the front of `buf`.
pub fn parse(buf: &[u8]) -> io::Result<Parsed> {
    if buf.len() < 2 {
        return Ok(Parsed::Need(2));
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut header_len) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(Parsed::Need(4));
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Parsed::Need(10));
            }
            let mut b = [0; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if len > MAX_PAYLOAD as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_PAYLOAD}-byte limit"),
        ));
    }
    let mask = if masked {
        if buf.len() < header_len + 4 {
            return Ok(Parsed::Need(header_len + 4));
        }
        let m = [
            buf[header_len],
            buf[header_len + 1],
            buf[header_len + 2],
            buf[header_len + 3],
        ];
        header_len += 4;
        Some(m)
    } else {
        None
    };
    let f = Frame {
        first: buf[0],
        mask,
        header_len,
        payload_len: len as usize,
    };
    if buf.len() < f.total_len() {
        Ok(Parsed::Need(f.total_len()))
    } else {
        Ok(Parsed::Frame(f))
    }
}

/// The client's upgrade request for `host` (as `Host:`) with `key`.
pub fn upgrade_request(host: &str, key: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Where the head ends (after `\r\n\r\n`), if it has.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Checks a server's answer to [`upgrade_request`].
pub fn check_101(head: &[u8], key: &str) -> io::Result<()> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("truncated handshake answer".into())),
        Err(e) => return Err(bad(format!("unparsable handshake answer: {e}"))),
    }
    if resp.code != Some(101) {
        return Err(bad(format!(
            "upgrade answered {} instead of 101",
            resp.code.unwrap_or(0)
        )));
    }
    let want = accept_for(key.as_bytes());
    let accept = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept != Some(want.as_bytes()) {
        return Err(bad("wrong or missing Sec-WebSocket-Accept".into()));
    }
    Ok(())
}

/// Performs the client handshake on a tokio stream; returns bytes read past the head.
pub async fn client_handshake(s: &mut TcpStream, host: &str) -> io::Result<Vec<u8>> {
    let key = new_key();
    s.write_all(upgrade_request(host, &key).as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    loop {
        if let Some(rest) = handshake_done(&mut buf, &key)? {
            return Ok(rest);
        }
        buf.reserve(1024);
        if s.read_buf(&mut buf).await? == 0 {
            return Err(closed_in_handshake());
        }
    }
}

/// Once `buf` holds the whole response head: checks the 101 and returns the bytes after it.
fn handshake_done(buf: &mut Vec<u8>, key: &str) -> io::Result<Option<Vec<u8>>> {
    if let Some(end) = head_end(buf) {
        check_101(&buf[..end], key)?;
        return Ok(Some(buf.split_off(end)));
    }
    if buf.len() > MAX_HEAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handshake head too long",
        ));
    }
    Ok(None)
}

fn closed_in_handshake() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the handshake")
}

/// The same on a blocking std stream.
pub fn client_handshake_sync(s: &mut std::net::TcpStream, host: &str) -> io::Result<Vec<u8>> {
    let key = new_key();
    s.write_all(upgrade_request(host, &key).as_bytes())?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(rest) = handshake_done(&mut buf, &key)? {
            return Ok(rest);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(closed_in_handshake());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads from `s` into `buf` until one whole frame is at its front; returns it.
pub async fn read_frame<R: AsyncRead + Unpin>(s: &mut R, buf: &mut Vec<u8>) -> io::Result<Frame> {
    loop {
        match parse(buf)? {
            Parsed::Frame(f) => return Ok(f),
            Parsed::Need(n) => {
                buf.reserve(n.saturating_sub(buf.len()).max(512));
                if s.read_buf(buf).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before a whole frame arrived",
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_the_rfc_example() {
        assert_eq!(
            accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_at_every_length_class() {
        for len in [0usize, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some(MASK)] {
                let mut out = Vec::new();
                put_frame(&mut out, OP_BINARY, &payload, mask);
                let Parsed::Frame(f) = parse(&out).unwrap() else {
                    panic!("whole frame not parsed at {len}");
                };
                assert_eq!(f.opcode(), OP_BINARY);
                assert_eq!(f.total_len(), out.len());
                let mut body = out[f.header_len..].to_vec();
                if let Some(m) = f.mask {
                    apply_mask(&mut body, m);
                }
                assert_eq!(body, payload);
                // Every strict prefix asks for more.
                for cut in [0, 1, f.header_len.saturating_sub(1), out.len() - 1] {
                    if cut < out.len() {
                        assert!(matches!(parse(&out[..cut]).unwrap(), Parsed::Need(_)));
                    }
                }
            }
        }
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut out = Vec::new();
        put_header(&mut out, 0x82, MAX_PAYLOAD + 1, None);
        assert!(parse(&out).is_err());
    }
}
