//! How message framing is passed on: a backend's chunked body sent beside a
//! `Content-Length`, transfer codings duplex cannot pass on, and HTTP/1.1 requests
//! without `Host`.

use tokio::io::AsyncWriteExt;

use duplex_e2e::backend::Backend;
use duplex_e2e::client::{get, raw_exchange};
use duplex_e2e::proxy::{TestProxy, Upstream};
use duplex_e2e::raw::RawBackend;
use duplex_e2e::wire::read_head;

/// A backend that answers every connection's first request with `response`, then closes.
async fn answers(response: &'static [u8]) -> RawBackend {
    RawBackend::start(move |mut tcp| async move {
        read_head(&mut tcp).await?;
        tcp.write_all(response).await?;
        tcp.shutdown().await
    })
    .await
}

/// RFC 9112 section 6.3: chunked framing wins over a `Content-Length` beside it, and the
/// length is not passed on, or the client would cut the body at 5 bytes.
#[tokio::test]
async fn a_chunked_body_beside_a_content_length_arrives_whole() {
    let b = answers(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
          b\r\nhello world\r\n0\r\n\r\n",
    )
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = get(p.addr, "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    assert_ne!(r.header("content-length"), Some("5"));
}

/// A coding other than chunked would reach the client unnamed (Transfer-Encoding is
/// hop-by-hop): 502, as nginx answers.
#[tokio::test]
async fn a_response_with_another_transfer_coding_gets_502() {
    let b = answers(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = get(p.addr, "/", &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
}

/// An empty element in `Transfer-Encoding` does not count (RFC 9110 section 5.6.1):
/// `, chunked` is chunked, and the body goes on whole.
#[tokio::test]
async fn an_empty_transfer_coding_element_is_ignored() {
    let b = Backend::start("b").await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = raw_exchange(
        p.addr,
        b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: , chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert!(r.head.first_line.contains(" 200 "), "{:?}", r.head);
    assert!(r.body.starts_with("bytes=3 "), "{}", r.body);
}

/// A request body in a coding other than chunked gets 501 and never reaches a backend.
#[tokio::test]
async fn a_request_with_another_transfer_coding_gets_501() {
    let b = Backend::start("b").await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = raw_exchange(
        p.addr,
        b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert!(r.head.first_line.contains(" 501 "), "{}", r.head.first_line);
    // Its body is never read: the client hears that the connection ends.
    assert_eq!(r.head.get("connection"), Some("close"), "{:?}", r.head);
    assert!(
        b.requests().is_empty(),
        "the backend saw {:?}",
        b.requests()
    );
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without `Host` gets 400; an absolute-form
/// target names the host instead, and HTTP/1.0 needs none.
#[tokio::test]
async fn an_http_11_request_without_host_gets_400() {
    let b = Backend::start("b").await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = raw_exchange(p.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(r.head.first_line.contains(" 400 "), "{}", r.head.first_line);
    assert!(b.requests().is_empty());
    let r = raw_exchange(p.addr, b"GET http://x/ HTTP/1.1\r\n\r\n").await;
    assert!(r.head.first_line.contains(" 200 "), "{}", r.head.first_line);
    let r = raw_exchange(p.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(r.head.first_line.contains(" 200 "), "{}", r.head.first_line);
}

/// A response without a body (to HEAD) has nothing to decode: its transfer coding, of
/// whatever kind, is no reason to refuse it.
#[tokio::test]
async fn a_head_response_with_another_transfer_coding_is_relayed() {
    let b = answers(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").await;
    let p = TestProxy::single(&Upstream::new("round_robin").backend(b.addr)).await;
    let r = raw_exchange(p.addr, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.head.first_line.contains(" 200 "), "{}", r.head.first_line);
}
