//! Calls into the OS and libc that the standard library does not wrap: the open-file
//! limit, giving freed heap memory back to the kernel, and how many bytes a socket still
//! holds for its peer.
//!
//! This is the one module in duplex that uses `unsafe`: `getrlimit`, `setrlimit`,
//! `malloc_trim` and `ioctl(SIOCOUTQ)` are plain libc calls with no safe wrapper in std,
//! tokio or socket2. The rlimit calls pass a pointer to a live, initialised local
//! `rlimit`, which is all they require; `malloc_trim` takes a number and touches only the
//! allocator's own state; the ioctl writes one `c_int` through a pointer to a local.

#![allow(unsafe_code)]

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft, hard) in force after.
/// A raise the OS refuses (macOS refuses an unlimited hard limit) is logged, and the
/// limits in force are returned.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, soft = lim.rlim_cur, "could not raise the open file limit to the hard limit");
        } else {
            lim = want;
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Gives the kernel back the free pages inside the heap, not only at its top (glibc's
/// `malloc_trim`). Returns whether any memory was released; false where the C library
/// has no such call.
pub fn trim_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a plain integer (the padding to leave at the top) and
        // works on the allocator's own data under its own locks.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The bytes socket `fd` holds that its peer has not acknowledged (`SIOCOUTQ`, which
/// Linux spells `TIOCOUTQ` for sockets too); `None` where the OS cannot say.
pub fn unacknowledged(fd: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut queued: libc::c_int = 0;
        // SAFETY: `fd` is an open descriptor for the call (borrowed), and SIOCOUTQ writes
        // one c_int through the pointer, which points at a live local.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        (rc == 0).then(|| u32::try_from(queued).ok()).flatten()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        None
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    /// Bytes a peer has not taken (its receive buffer full, its window shut) are counted,
    /// and the count goes down as the peer reads.
    #[cfg(target_os = "linux")]
    #[test]
    fn unacknowledged_bytes_are_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut writer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut reader, _) = listener.accept().expect("accept");
        assert_eq!(super::unacknowledged(writer.as_fd()), Some(0));
        writer.set_nonblocking(true).expect("nonblocking");
        let chunk = [7u8; 64 * 1024];
        let mut sent = 0usize;
        // Bounded: loopback buffers hold a few MB at most.
        for _ in 0..10_000 {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        assert!(sent > 0);
        let full = super::unacknowledged(writer.as_fd()).expect("a count");
        assert!(full > 0, "nothing unacknowledged after filling the window");
        // The reader takes a good part; the window opens and the queue goes down.
        let mut buf = vec![0u8; 1 << 20];
        let mut took = 0;
        reader
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        while took < sent.min(4 << 20) {
            took += reader.read(&mut buf).expect("read");
            let now = super::unacknowledged(writer.as_fd()).expect("a count");
            if now < full {
                return;
            }
        }
        panic!("the queue never went down from {full}");
    }
}
