//! glibc's `malloc_trim(0)` behind a safe function, so that labgate itself keeps
//! `#![forbid(unsafe_code)]`.
//!
//! glibc keeps memory a thread freed inside that thread's arena for reuse; it gives pages
//! back to the kernel only from the top of an arena. After a burst (a broker stall with
//! sensors at full speed, a drained backlog) tens of megabytes of free chunks below live
//! ones stay resident. `malloc_trim(0)` walks every arena and returns the whole free
//! pages inside free chunks (`MADV_DONTNEED`); live allocations are untouched.

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
