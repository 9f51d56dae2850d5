//! Opens connections to backends: TCP within `connect_timeout`, then TLS when the
//! upstream asks for it. Used by the upgrade path directly and by the pooled HTTP client.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::tls::{BackendStream, Connector, MaybeTls};

/// Connects to `addr`; the whole connect, TLS included, is bounded by `timeout`.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&Connector>,
) -> io::Result<BackendStream> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        match tls {
            Some(c) => Ok(MaybeTls::Tls(Box::new(c.connect(addr, tcp).await?))),
            None => Ok(MaybeTls::Plain(tcp)),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// The pooled HTTP client's connector: the URI's authority is the backend's address.
#[derive(Clone)]
pub struct BackendConnector {
    pub timeout: Duration,
    pub tls: Option<Arc<Connector>>,
}

impl tower_service::Service<Uri> for BackendConnector {
    type Response = TokioIo<BackendStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("not a backend address: {uri}"),
                    )
                })?;
            connect(addr, me.timeout, me.tls.as_deref())
                .await
                .map(TokioIo::new)
        })
    }
}
