//! The backend's side of an upgrade on the wire: writes the request head, reads the
//! answer.
//!
//! A handshake sends one request and reads one answer on a connection of its own, so it
//! needs no HTTP client: a 101 is parsed here from what is usually a single read, and the
//! socket goes straight to the tunnel. Only an answer other than 101 (a refusal, which has
//! a body to relay in whatever framing) is handed to hyper's client to read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::task::TaskTracker;

use crate::handshake::check_backend_101;
use crate::headers::{connection_named, is_hop_by_hop};
use crate::tls::BackendStream;

/// The largest answer head a backend may send to an upgrade (Envoy allows 60 KiB of
/// response headers by default; nginx 4 or 8 KiB). A larger one gets the client a 502.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header lines an answer may have (hyper's default too).
const MAX_HEADERS: usize = 100;
/// The first read's buffer: a 101 is usually 150 to 300 bytes. It grows up to
/// [`MAX_HEAD`] for a longer head.
const FIRST_READ: usize = 2048;

/// A backend's answer to an upgrade request.
pub enum Answer {
    /// A valid 101: its end-to-end headers (hop-by-hop ones left out), the socket, and
    /// whatever the backend sent after the head (frames it wrote at once), which goes to
    /// the client first.
    Switching {
        end_to_end: HeaderMap,
        stream: BackendStream,
        early: Bytes,
    },
    /// A 101 that is not a valid WebSocket answer, and what is wrong with it.
    Invalid(&'static str),
    /// Any other answer, to relay to the client with its body.
    Other(Response<Incoming>),
}

/// Why an exchange failed: the backend closed or broke the connection, or answered
/// something that is not HTTP or has a head over [`MAX_HEAD`].
#[derive(Debug)]
pub struct Failed {
    pub source: io::Error,
    /// Whether not one byte of an answer came before: the backend closed or broke the
    /// connection unanswered (at its own connection limit, say), so the request may go to
    /// another backend; the client has seen nothing yet.
    pub unanswered: bool,
}

/// Sends `head` (a whole request head, see [`crate::handshake::backend_request_head`])
/// and reads the answer, checking a 101 against the client's `key`.
pub async fn exchange(
    stream: BackendStream,
    head: &[u8],
    key: &HeaderValue,
    tracker: &TaskTracker,
) -> Result<Answer, Failed> {
    let mut answered = false;
    exchange_inner(stream, head, key, tracker, &mut answered)
        .await
        .map_err(|source| Failed {
            source,
            unanswered: !answered,
        })
}

/// [`exchange`], setting `answered` once a byte of the answer has been read.
async fn exchange_inner(
    mut stream: BackendStream,
    head: &[u8],
    key: &HeaderValue,
    tracker: &TaskTracker,
    answered: &mut bool,
) -> io::Result<Answer> {
    stream.write_all(head).await?;
    stream.flush().await?;
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    // Bytes of informational heads passed over, counted against MAX_HEAD with the rest.
    let mut skipped = 0;
    // Whether `buf` may hold a whole head that has not been parsed yet.
    let mut parse = false;
    loop {
        if parse {
            match parse_head(&buf, key)? {
                Head::Partial => {}
                Head::Informational(len) => {
                    skipped += len;
                    buf.advance(len);
                    continue;
                }
                Head::Switching(end_to_end, len) => {
                    let early = buf.split_off(len).freeze();
                    return Ok(Answer::Switching {
                        end_to_end,
                        stream,
                        early,
                    });
                }
                Head::Invalid(what) => return Ok(Answer::Invalid(what)),
                Head::Other => {
                    let replay = Replay {
                        read: buf.freeze(),
                        io: stream,
                        sent: false,
                        reader: None,
                    };
                    return read_with_hyper(replay, tracker).await.map(Answer::Other);
                }
            }
        }
        if skipped + buf.len() >= MAX_HEAD {
            return Err(bad(format!("an answer head over {MAX_HEAD} bytes")));
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().min(MAX_HEAD - buf.len()));
        }
        let before = buf.len();
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the backend closed the connection before answering",
            ));
        }
        *answered = true;
        // A head ends with a line feed: until one comes, there is nothing new to parse
        // (a backend sending a byte at a time costs a read each, not a parse each).
        parse = buf[before..].contains(&b'\n');
    }
}

/// What the bytes read so far hold.
enum Head {
    /// Not a whole head yet.
    Partial,
    /// A 1xx other than 101 (`100 Continue`, `103 Early Hints`) of this many bytes: the
    /// answer follows it. hyper's client passes over them too.
    Informational(usize),
    /// A valid 101: its end-to-end headers and the length of its head.
    Switching(HeaderMap, usize),
    /// A 101 that is not a valid WebSocket answer.
    Invalid(&'static str),
    /// Any other final answer.
    Other,
}

fn parse_head(buf: &[u8], key: &HeaderValue) -> io::Result<Head> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut lines);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(Head::Partial),
        Ok(httparse::Status::Complete(len)) => len,
        Err(e) => return Err(bad(format!("not an HTTP answer ({e})"))),
    };
    match answer.code {
        Some(101) => {}
        Some(100..=199) => return Ok(Head::Informational(len)),
        _ => return Ok(Head::Other),
    }
    let lines = || answer.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    if let Err(what) = check_backend_101(lines(), key) {
        return Ok(Head::Invalid(what));
    }
    let named = connection_named(lines());
    let mut end_to_end = HeaderMap::with_capacity(answer.headers.len());
    for (name, value) in lines().filter(|(name, _)| !is_hop_by_hop(name, &named)) {
        let name = HeaderName::from_bytes(name).map_err(|_| {
            bad(format!(
                "a header name that is not valid: {:?}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| bad(format!("the value of {name} is not valid")))?;
        end_to_end.append(name, value);
    }
    Ok(Head::Switching(end_to_end, len))
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads an answer other than 101, with its body, through hyper's client: a refusal can
/// come with a body of any framing, and this is the rare path.
async fn read_with_hyper(io: Replay, tracker: &TaskTracker) -> io::Result<Response<Incoming>> {
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    // The connection task ends once the body is read: `sender` is gone by then.
    tracker.spawn(async move {
        let _ = conn.await;
    });
    // hyper writes this request (into `Replay`, which drops it: the real one went out)
    // and then reads the answer already in hand.
    let req = Request::get("/")
        .body(Empty::<Bytes>::new())
        .map_err(io::Error::other)?;
    sender.send_request(req).await.map_err(io::Error::other)
}

/// A backend socket for hyper's client after the request went out and part of the answer
/// was read: reads give the bytes already read, then the socket's; writes are dropped.
struct Replay {
    read: Bytes,
    io: BackendStream,
    /// Whether hyper has written its request. Until then reads wait: hyper takes bytes
    /// that arrive before a request as an error.
    sent: bool,
    /// The read waiting for the request to be written.
    reader: Option<Waker>,
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.sent {
            this.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.sent = true;
        if let Some(reader) = this.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
