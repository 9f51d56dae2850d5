//! The proxy's errors, each saying which side failed: the client, a backend, or duplex itself.

use std::io;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// duplex could not bind a listening socket.
    #[error("listener {listener:?}: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// duplex could not bind the admin listener.
    #[error("the admin listener (admin.bind): cannot bind {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A backend refused or did not answer the connection.
    #[error("backend {addr}: connect failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A backend's connection closed or failed during its TLS handshake, without a TLS
    /// error to say why (a backend that does not speak TLS and hangs up, a reset).
    #[error("TLS handshake with the backend broke off: {source}")]
    BackendTlsBroken {
        #[source]
        source: io::Error,
    },
    /// A backend broke an upgrade handshake: the connection failed or closed, or the
    /// answer was not HTTP.
    #[error("backend {addr}: upgrade handshake failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A backend answered 101 without a valid WebSocket handshake.
    #[error("backend {addr}: invalid 101 response: {what}")]
    BadUpgrade {
        addr: SocketAddr,
        what: &'static str,
    },
    /// A client stopped sending a request body midway.
    #[error("client: sent no request body bytes for {idle:?}")]
    ClientBodyStalled { idle: std::time::Duration },
    /// A backend stopped sending a response body midway.
    #[error("the backend sent no response bytes for {idle:?}")]
    BodyStalled { idle: std::time::Duration },
    /// A client took none of a response's bytes for its listener's `send_timeout`.
    #[error("client: took no response bytes for {timeout:?}")]
    ClientSendTimeout { timeout: std::time::Duration },
    /// A reload read its files after one asked for later had applied: the later one stays.
    #[error(
        "a reload asked for later is in force (generation {generation}); this one was not applied"
    )]
    Superseded { generation: u64 },
    /// Too many reloads are still reading their files (a hung mount, say).
    #[error("{0} reloads are still reading their files; try again once they end")]
    ReloadBusy(usize),
    /// A reload was asked for while duplex shuts down.
    #[error("duplex is shutting down: no reload")]
    ShuttingDown,
    /// A reload was asked for, but the proxy was started from no file.
    #[error("no configuration file to reload from")]
    NoConfigFile,
    /// A reload stopped before it finished (a bug in duplex, or the runtime shutting down).
    #[error("the reload stopped before it finished: {0}")]
    ReloadAborted(#[source] tokio::task::JoinError),
    /// The new configuration was refused.
    #[error(transparent)]
    Config(#[from] duplex_config::ConfigError),
    /// A certificate, key or CA file could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The client's side of a tunnel or upgrade failed.
    #[error("client: {0}")]
    Client(#[source] hyper::Error),
}

/// The `kind` label of `duplex_backend_connect_errors_total`, from the first I/O error in
/// `err`'s source chain: `refused`, `timeout`, `tls` (the TLS handshake failed: a
/// certificate not trusted or not for the name, no common protocol) or `other`.
pub fn connect_kind(err: &(dyn std::error::Error + 'static)) -> &'static str {
    let Some(io) = io_source(err) else {
        return "other";
    };
    match io.kind() {
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::ConnectionRefused => "refused",
        // tokio-rustls hands a rustls error over inside an I/O error; the connector marks
        // a TLS handshake that broke off without one.
        _ if io.get_ref().is_some_and(|e| {
            e.downcast_ref::<rustls::Error>().is_some()
                || matches!(
                    e.downcast_ref::<ProxyError>(),
                    Some(ProxyError::BackendTlsBroken { .. })
                )
        }) =>
        {
            "tls"
        }
        _ => "other",
    }
}

/// Whether `err` comes from duplex running out of file descriptors or buffers, not from
/// what it was given. (Not "address not available", which for a bind means an address
/// this host does not have.)
pub fn local_exhaustion(err: &(dyn std::error::Error + 'static)) -> bool {
    // Linux errno values: ENFILE 23, EMFILE 24, ENOBUFS 105.
    io_source(err).is_some_and(|io| matches!(io.raw_os_error(), Some(23 | 24 | 105)))
}

/// The first I/O error in `err`'s source chain.
pub fn io_source<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

/// The client's failure in `err`'s source chain, if that is what it is: a request body
/// that stalled or broke off while being forwarded.
pub fn client_side<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a ProxyError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(p @ (ProxyError::Client(_) | ProxyError::ClientBodyStalled { .. })) =
            e.downcast_ref::<ProxyError>()
        {
            return Some(p);
        }
        cur = e.source();
    }
    None
}

/// Whether `err` is a connection that ended before the response head was complete:
/// closed (hyper's incomplete message) or reset. On a pooled keep-alive connection this
/// is usually the backend closing it just as the request went out.
pub fn closed_before_response(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        cur = e.source();
    }
    // Over TLS, a backend that closes its TCP connection without close_notify (Node.js
    // at its keep-alive timeout, a process killed) shows as an unexpected end of file.
    io_source(err).is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
        )
    })
}

/// Displays an error with its sources: `outer: inner: root`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of file descriptors reading a certificate or binding a listener is duplex's
    /// state, not a bad file; a port in use or a missing file is the file's.
    #[test]
    fn local_exhaustion_is_found_through_the_chain() {
        let emfile = || io::Error::from_raw_os_error(24);
        let read = |source| {
            ProxyError::Tls(crate::tls::TlsError::Read {
                path: "cert.pem".into(),
                source,
            })
        };
        let bind = |source| ProxyError::Bind {
            listener: "l".into(),
            addr: "127.0.0.1:1".parse().expect("address"),
            source,
        };
        assert!(local_exhaustion(&read(emfile())));
        assert!(local_exhaustion(&bind(emfile())));
        assert!(!local_exhaustion(&read(io::ErrorKind::NotFound.into())));
        assert!(!local_exhaustion(&bind(io::ErrorKind::AddrInUse.into())));
        // EADDRNOTAVAIL: an address this host does not have, a mistake in the file.
        assert!(!local_exhaustion(&bind(io::Error::from_raw_os_error(99))));
    }
}
