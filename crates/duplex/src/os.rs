//! Calls into the OS and libc that the standard library does not wrap: the open-file
//! limit, and giving freed heap memory back to the kernel.
//!
//! This is the one module in duplex that uses `unsafe`: `getrlimit`, `setrlimit` and
//! `malloc_trim` are plain libc calls with no safe wrapper in std or tokio. The rlimit
//! calls pass a pointer to a live, initialised local `rlimit`, which is all they require;
//! `malloc_trim` takes a number and touches only the allocator's own state.

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
