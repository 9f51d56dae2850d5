//! What the benchmark asks of the OS: the open-file limit, a process's resident memory
//! and open files, and outgoing connections spread over several loopback source
//! addresses once one address runs out of ephemeral ports.
//!
//! `setrlimit`, `setsockopt` and `kill` have no safe wrapper in std or tokio; each call
//! below passes pointers to live, initialised locals, which is all they require.

#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpSocket, TcpStream};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft, hard) after.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = want;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The hard open-file limit of this process (children inherit it).
pub fn nofile_hard_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_max
}

/// `VmRSS` of a process, in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    status_field(pid, "VmRSS:")
}

/// A `kB` field of /proc/PID/status.
pub fn status_field(pid: u32, field: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// How many files a process has open.
pub fn open_fds(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The children of `pid` (by their parent field in /proc/*/stat).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // pid (comm) state ppid ...; comm may hold spaces, so cut at the last ')'.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Sends `sig` to `pid`; errors (already gone) are ignored.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill takes plain integers.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Loopback source addresses tried in turn: 127.0.0.1 (the kernel's choice), then
/// 127.0.0.2 and on. Each adds a full ephemeral port range towards the same target.
pub const MAX_SOURCE_ADDRS: usize = 32;

/// Connects to one target, moving to the next loopback source address whenever the
/// current one has no ephemeral port left (EADDRNOTAVAIL).
pub struct Dialer {
    pub target: SocketAddr,
    src: AtomicUsize,
}

impl Dialer {
    pub fn new(target: SocketAddr) -> Dialer {
        Dialer {
            target,
            src: AtomicUsize::new(0),
        }
    }

    /// How many source addresses have been used so far.
    pub fn sources_used(&self) -> usize {
        self.src.load(Ordering::Relaxed) + 1
    }

    pub async fn connect(&self) -> io::Result<TcpStream> {
        loop {
            let i = self.src.load(Ordering::Relaxed);
            match connect_from(i, self.target).await {
                Err(e)
                    if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                        && i + 1 < MAX_SOURCE_ADDRS
                        && self.target.is_ipv4() =>
                {
                    let _ =
                        self.src
                            .compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed);
                }
                other => {
                    let s = other?;
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
            }
        }
    }
}

async fn connect_from(i: usize, target: SocketAddr) -> io::Result<TcpStream> {
    if i == 0 || !target.is_ipv4() {
        return TcpStream::connect(target).await;
    }
    let sock = TcpSocket::new_v4()?;
    // Let connect() pick the port for the full 4-tuple, not bind() for the address alone.
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a pointer to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let src = Ipv4Addr::new(127, 0, 0, 1 + i as u8);
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    sock.connect(target).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_memory_and_files() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(open_fds(me).unwrap() >= 3);
    }

    #[tokio::test]
    async fn a_second_source_address_connects() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = l.local_addr().unwrap();
        let s = connect_from(1, target).await.unwrap();
        let (_, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(s.peer_addr().unwrap(), target);
    }
}
