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
//!
//! How much comes back with each access is the kernel's read-around: a fault on a page
//! that is not cached reads its neighbours too, and maps those already cached. For data
//! laid out in no order of use that brings back far more than is used;
//! [`read_page_by_page`] (`MADV_RANDOM`) turns it off for a range.

#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::io;

/// Asks the kernel to reclaim the pages of `len` bytes at `start` in this process
/// (`start` page-aligned) now. What the range holds does not change: a page reclaimed
/// is read back, or faulted in again, on its next access. An error where the kernel
/// refuses: `EINVAL` before Linux 5.4 or for an unaligned start or a locked range,
/// `ENOMEM` where part of the range is not mapped (any mapped part is still paged out).
pub fn page_out(start: usize, len: usize) -> io::Result<()> {
    advise(start, len, Advice::PageOut)
}

/// Asks the kernel to read the range's pages in one at a time when they are next
/// faulted in (`MADV_RANDOM`), instead of reading and mapping their neighbours along
/// with them. It holds for the mapping until it is unmapped or advised otherwise. An
/// error where the kernel refuses: `EINVAL` for an unaligned start, `ENOMEM` where part
/// of the range is not mapped.
pub fn read_page_by_page(start: usize, len: usize) -> io::Result<()> {
    advise(start, len, Advice::Random)
}

/// The hints this crate gives: none of them changes what memory reads back.
enum Advice {
    PageOut,
    Random,
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn advise(start: usize, len: usize, advice: Advice) -> io::Result<()> {
    let advice = match advice {
        Advice::PageOut => libc::MADV_PAGEOUT,
        Advice::Random => libc::MADV_RANDOM,
    };
    // SAFETY: both are hints that never change what memory reads back. MADV_PAGEOUT
    // drops a page only when it can be read back unchanged (a clean file page) or after
    // it was written out (to its file, or to swap for anonymous memory); MADV_RANDOM only
    // sets how pages are read in (no read-ahead or read-around). The kernel checks the
    // range itself and returns an error for one it does not map; no pointer is
    // dereferenced here, so any `start` and `len` are sound.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere there is no such request.
#[cfg(not(target_os = "linux"))]
fn advise(_start: usize, _len: usize, _advice: Advice) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
