//! Request bodies that outlast their answer: a backend that answers before it has read
//! the whole body (a 202 from an ingest endpoint, a 413) keeps receiving it while it
//! moves.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use duplex_e2e::proxy::{TestProxy, Upstream};
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
