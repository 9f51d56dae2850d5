//! Calls into the OS that the standard library does not wrap: the open-file limit.
//!
//! This is the one module in duplex that uses `unsafe`: `getrlimit` and `setrlimit` are
//! plain libc calls with no safe wrapper in std or tokio. Each call passes a pointer to a
//! live, initialised local `rlimit`, which is all they require.

#![allow(unsafe_code)]

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft, hard) in force after.
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
            return Err(std::io::Error::last_os_error());
        }
        lim = want;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}
