//! `madvise(MADV_PAGEOUT)` behind a safe function, so that labgate itself keeps
//! `#![forbid(unsafe_code)]`.
//!
//! A program's code and read-only data are file pages: the kernel maps them in as the
//! program runs and leaves them mapped. Code that ran once while starting (parsing the
//! config, recovering the buffer, setting up TLS) keeps its pages resident and counted
//! in the process's memory until the kernel runs short and reclaims them. Linux 5.4 and
//! later reclaim them on request: `MADV_PAGEOUT` drops the range's clean file pages that
//! no other process maps (writing back dirty or anonymous ones only where there is
//! swap). What is used again afterwards is read back in on its next access.

#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::io;

/// Asks the kernel to reclaim the pages of `len` bytes at `start` in this process
/// (`start` page-aligned) now. What the range holds does not change: a page reclaimed
/// is read back, or faulted in again, on its next access. An error where the kernel
/// refuses: `EINVAL` before Linux 5.4 or for an unaligned start or a locked range,
/// `ENOMEM` where part of the range is not mapped (any mapped part is still paged out).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn page_out(start: usize, len: usize) -> io::Result<()> {
    // SAFETY: MADV_PAGEOUT is a hint that never changes what memory reads back: a page
    // is dropped only when it can be read back unchanged (a clean file page) or after it
    // was written out (to its file, or to swap for anonymous memory). The kernel checks
    // the range itself and returns an error for one it does not map; no pointer is
    // dereferenced here, so any `start` and `len` are sound.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere there is no such request.
#[cfg(not(target_os = "linux"))]
pub fn page_out(_start: usize, _len: usize) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
