//! Opens connections to backends: TCP within `connect_timeout`, then TLS when the
//! upstream asks for it. Used by the upgrade path and by the HTTP connection pool.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

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
        tune(&tcp);
        match tls {
            Some(c) => match c.connect(addr, tcp).await {
                Ok(s) => Ok(MaybeTls::Tls(Box::new(s))),
                // A TLS error says what went wrong itself; anything else (a close, a
                // reset) is marked as having happened in the TLS handshake.
                Err(e) if is_tls_error(&e) => Err(e),
                Err(source) => Err(io::Error::new(
                    source.kind(),
                    crate::error::ProxyError::BackendTlsBroken { source },
                )),
            },
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

/// Whether an I/O error carries a rustls error, as tokio-rustls reports TLS failures.
fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
}

/// TCP keepalive: a peer that vanishes without a FIN (NAT expiry, a phone leaving coverage)
/// is found after about `KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES` of silence,
/// so its tunnel and the socket on the other side are closed rather than kept forever.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 5;

/// The longest bytes sent may stay unacknowledged (or, on Linux 5.11 and later, a
/// peer's window stay shut) before the connection is dropped (Linux only). Keepalive probes only a silent connection: a peer
/// that vanished while bytes were on their way to it (a chat message, a stream) would
/// otherwise be retried for 15 minutes or more (`tcp_retries2`). The same bound as
/// keepalive's, which it also governs once set.
#[cfg(any(target_os = "linux", target_os = "android"))]
const USER_TIMEOUT: Duration = Duration::from_secs(110);

/// The keepalive settings of every client and backend socket.
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES)
}

/// Sets TCP_NODELAY, keepalive and the user timeout on a backend socket (six system
/// calls).
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let _ = sock.set_tcp_keepalive(&keepalive());
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Sets TCP_NODELAY, keepalive and the user timeout on a listening socket. Linux copies
/// them into every socket `accept` returns, which saves six system calls per client
/// connection.
pub fn tune_listener(sock: &tokio::net::TcpSocket) -> io::Result<()> {
    let sock = socket2::SockRef::from(sock);
    sock.set_tcp_nodelay(true)?;
    sock.set_tcp_keepalive(&keepalive())?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(())
}

/// Gives an accepted client socket what [`tune_listener`] could not pass on: nothing on
/// Linux, everything elsewhere.
pub fn tune_accepted(tcp: &TcpStream) {
    if !cfg!(target_os = "linux") {
        tune(tcp);
    }
}

/// Whether a connect failed for lack of local resources (file descriptors, ports, buffers):
/// duplex's own trouble, which must not count against the backend.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    // Under the mark of a TLS handshake that broke off, the OS error is the inner one's.
    if let Some(crate::error::ProxyError::BackendTlsBroken { source }) =
        e.get_ref().and_then(|i| i.downcast_ref())
    {
        return is_local_exhaustion(source);
    }
    // Linux errno values: ENFILE 23, EMFILE 24, ENOBUFS 105.
    e.kind() == io::ErrorKind::AddrNotAvailable || matches!(e.raw_os_error(), Some(23 | 24 | 105))
}

#[cfg(test)]
mod tests {
    /// ENOBUFS during a backend's TLS handshake is still duplex's own trouble.
    #[test]
    fn exhaustion_is_seen_under_the_tls_mark() {
        let inner = std::io::Error::from_raw_os_error(105);
        let marked = std::io::Error::new(
            inner.kind(),
            crate::error::ProxyError::BackendTlsBroken { source: inner },
        );
        assert!(super::is_local_exhaustion(&marked));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let marked = std::io::Error::new(
            reset.kind(),
            crate::error::ProxyError::BackendTlsBroken { source: reset },
        );
        assert!(!super::is_local_exhaustion(&marked));
    }

    use super::*;

    /// What `tune_accepted` relies on: a socket accepted from a listener the proxy bound
    /// carries TCP_NODELAY and the keepalive settings without a call of its own.
    #[tokio::test]
    async fn accepted_sockets_carry_the_listeners_options() {
        let listener = crate::server::bind("test", "127.0.0.1:0".parse().expect("addr"), false)
            .expect("bind a listener");
        let addr = listener.local_addr().expect("local addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        tune_accepted(&accepted);
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().expect("TCP_NODELAY"));
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(sock.tcp_keepalive_time().expect("idle"), KEEPALIVE_IDLE);
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            KEEPALIVE_INTERVAL
        );
        assert_eq!(
            sock.tcp_keepalive_retries().expect("probes"),
            KEEPALIVE_PROBES
        );
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(
            sock.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(USER_TIMEOUT)
        );
    }

    /// A backend socket gets the same settings by calls of its own.
    #[tokio::test]
    async fn backend_sockets_are_tuned() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tcp = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        tune(&tcp);
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.tcp_nodelay().expect("TCP_NODELAY"));
        assert_eq!(sock.tcp_keepalive_time().expect("idle"), KEEPALIVE_IDLE);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(
            sock.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(USER_TIMEOUT)
        );
    }
}
