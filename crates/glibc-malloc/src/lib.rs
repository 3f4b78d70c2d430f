//! Three glibc allocator calls behind safe functions, so that labgate itself keeps
//! `#![forbid(unsafe_code)]`.
//!
//! glibc keeps memory a thread freed inside that thread's arena for reuse; it gives pages
//! back to the kernel only from the top of an arena. After a burst (a broker stall with
//! sensors at full speed, a drained backlog) tens of megabytes of free chunks below live
//! ones stay resident. `malloc_trim(0)` walks every arena and returns the whole free
//! pages inside free chunks (`MADV_DONTNEED`); live allocations are untouched.
//!
//! glibc also opens up to eight arenas per core as threads contend for the allocator,
//! each with its own free chunks and partly used pages. `mallopt(M_ARENA_MAX, n)`
//! bounds how many it opens; set before the threads start, it bounds them all.
//!
//! And glibc adjusts two thresholds as the process runs: a block freed from its own
//! mapping raises the size from which blocks get one (up to 32 MiB), and with it how
//! much free memory an arena's top may keep. `mallopt` with `M_MMAP_THRESHOLD` and
//! `M_TRIM_THRESHOLD` fixes both.

#![deny(unsafe_code)]
#![warn(missing_docs)]

/// Returns the free pages of every glibc arena to the kernel. `true` when glibc gave
/// something back. On other C libraries it does nothing and returns `false`: musl and
/// the others have no such call.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and touches only glibc's own free lists,
    // locking each arena while it walks it; it is safe to call from any thread at any
    // time (glibc documents it MT-Safe).
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Returns the free pages of every glibc arena to the kernel (nothing to do here).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// Lets glibc open at most `n` arenas (`n` ≥ 1) from now on; `true` when glibc took the
/// setting. Threads that already have an arena keep it, so call it before starting
/// threads. Elsewhere it does nothing and returns `false`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn limit_arenas(n: u16) -> bool {
    // SAFETY: mallopt takes two integers and sets one of glibc's allocator parameters
    // under its own lock; M_ARENA_MAX only caps how many arenas later allocations may
    // create, it moves no memory.
    n > 0 && unsafe { libc::mallopt(libc::M_ARENA_MAX, i32::from(n)) == 1 }
}

/// Lets the allocator open at most `n` arenas (nothing to do here).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas(_n: u16) -> bool {
    false
}

/// Fixes glibc's mmap threshold (blocks at least `mmap` bytes long get a mapping of
/// their own, unmapped when freed) and trim threshold (free memory past `trim` bytes at
/// an arena's top goes back to the kernel), which glibc otherwise raises as the process
/// runs. `true` when glibc took both. Elsewhere it does nothing and returns `false`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn fix_thresholds(mmap: u32, trim: u32) -> bool {
    let (Ok(mmap), Ok(trim)) = (i32::try_from(mmap), i32::try_from(trim)) else {
        return false;
    };
    // SAFETY: as for M_ARENA_MAX: mallopt takes two integers and sets a parameter under
    // glibc's own lock; the thresholds only decide where later blocks come from and when
    // free memory is returned, they move no live allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
    }
}

/// Fixes the allocator's mmap and trim thresholds (nothing to do here).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn fix_thresholds(_mmap: u32, _trim: u32) -> bool {
    false
}
