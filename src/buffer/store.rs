//! The sled store under the buffer and its durability point.
//!
//! sled 0.34's own flush writes its log with `pwrite` and then calls `sync_file_range`,
//! which starts write-back of the page range but does not flush the disk's cache or the
//! file's metadata (its size): after a power cut, what sled called flushed can be gone.
//! `Store::sync` is the agent's one durability point: sled's flush, then
//!
//! 1. fdatasync of every blob file sled created since the last sync (values too large for
//!    the log live in `blobs/`), and fsync of `blobs/` when its entries changed;
//! 2. fdatasync of the log file `db`;
//! 3. fsync of the store's directory when its entries changed (sled renames snapshot
//!    files into place and deletes old ones);
//! 4. unlinking the blob files sled no longer references. Upstream sled 0.34 unlinks
//!    them itself, as soon as its own flush has passed their replacement (so a power cut
//!    could leave the log pointing at a blob already gone), and misses a page made of
//!    one blob when it is replaced, so `blobs/` grew without bound under values that
//!    large. The vendored copy queues them; the queue is taken before the log's
//!    fdatasync and unlinked after it.
//!
//! Blobs go before the log so that a log entry never points at a blob that is not on
//! disk. For the same reason a log segment that sled has freed is not written over
//! (or truncated away) until the fdatasync after it: the writes that replaced its
//! pages are only in the page cache until then. The vendored sled holds freed segments
//! back, and the count held is taken before the log's fdatasync and released after it.
//!
//! After each sync a background task moves live pages out of the segments sled has
//! marked for cleaning, a bounded number at a time ([`CLEAN_PAGES`]). sled 0.34 did
//! that from a flusher thread that labgate does not start (the agent flushes at its
//! own commits); without it, garbage outran the cleaning and the log held 1.6-1.8
//! times the bytes stored in it. The moved pages become durable at the next sync.
//!
//! Nothing is acknowledged upstream, made readable for the forwarder, or executed
//! before the sync that covers it has returned.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Pages moved out of segments marked for cleaning after each sync, at most. At the
/// agent's full ingest rate (a sync every 20 ms) that is room for 1,600 pages a second;
/// the garbage of that rate needs 400-1,000 (`examples/backlog_probe.rs`). Rounds of
/// 256 kept up as well but page more old leaves in at once: the agent's peak RSS with
/// the buffer dropping at its cap was 40.1 MB against 37.4 MB at 32
/// (`benches/stalled_heap.rs`, one run each).
pub const CLEAN_PAGES: usize = 32;

/// The open store and what of its directory is known to be durable.
pub struct Store {
    db: sled::Db,
    dir: PathBuf,
    log: File,
    synced: Mutex<Synced>,
    /// A cleaning round is running (one at a time). Shared with the round, which
    /// clears it only after letting go of the store.
    cleaning: Arc<AtomicBool>,
    /// A cleaning round failed: the next sync reports it.
    clean_error: Mutex<Option<sled::Error>>,
}

/// Directory entries as of the last directory fsync, and blob files to unlink once the
/// log is durable.
#[derive(Default)]
struct Synced {
    top: BTreeSet<OsString>,
    blobs: BTreeSet<OsString>,
    unreferenced: Vec<PathBuf>,
}

/// Opens sled in `dir` and makes everything sled created while opening durable (a new
/// store's files and the directory entries leading to them).
pub fn open(dir: &Path, cache_capacity: u64) -> std::io::Result<Store> {
    std::fs::create_dir_all(dir)?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_capacity)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .map_err(std::io::Error::other)?;
    let log = File::open(dir.join("db"))?;
    let store = Store {
        db,
        dir: dir.to_path_buf(),
        log,
        synced: Mutex::new(Synced::default()),
        cleaning: Arc::new(AtomicBool::new(false)),
        clean_error: Mutex::new(None),
    };
    store.sync_files()?;
    // The entries leading to the store, in case `create_dir_all` just made them: the
    // parent must sync; higher up it is best effort (a directory we may not open).
    let mut up = dir.parent();
    let mut first = true;
    while let Some(d) = up {
        match sync_dir(d) {
            Err(e) if first => return Err(e),
            _ => {}
        }
        first = false;
        up = d.parent();
    }
    Ok(store)
}

impl Store {
    /// The sled database, for trees that live beside the buffer's own (the replay store).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write to the store so far durable (see the module docs).
    pub async fn sync(self: &Arc<Self>) -> Result<(), sled::Error> {
        if let Some(e) = self
            .clean_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        self.db.flush_async().await?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.sync_files())
            .await
            .map_err(|e| sled::Error::Io(std::io::Error::other(e)))?
            .map_err(sled::Error::Io)?;
        self.clean_in_background();
        Ok(())
    }

    /// Starts a cleaning round on the blocking pool when sled has segments to clean and
    /// no round is running.
    fn clean_in_background(self: &Arc<Self>) {
        if !self.db.has_segments_to_clean() || self.cleaning.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let cleaning = self.cleaning.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(e) = cleaning_round(|| me.db.clean_segments(CLEAN_PAGES)) {
                *me.clean_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
            drop(me);
            cleaning.store(false, Ordering::Release);
        });
    }

    /// Waits (a few milliseconds at most) for a cleaning round to end, so that once the
    /// buffer is dropped nothing else holds the store: it can be opened again at once.
    pub fn wait_cleaning(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.cleaning.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// [`Store::sync`] for code outside the runtime (shutdown paths, tools, tests).
    /// Its cleaning round runs first, inline, so the sync covers what it moved.
    pub fn sync_blocking(&self) -> Result<(), sled::Error> {
        if self.db.has_segments_to_clean() {
            self.db.clean_segments(CLEAN_PAGES)?;
        }
        self.db.flush()?;
        self.sync_files().map_err(sled::Error::Io)
    }

    /// fdatasync / fsync of what sled wrote, in the order the module docs give.
    fn sync_files(&self) -> std::io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        // Taken before the log's fdatasync: each was replaced by a write sled had made
        // by then, which that fdatasync covers.
        synced
            .unreferenced
            .extend(self.db.take_unreferenced_blobs());
        let blob_dir = self.dir.join("blobs");
        if blob_dir.is_dir() {
            let now = entries(&blob_dir)?;
            if now != synced.blobs {
                for name in now.difference(&synced.blobs) {
                    sync_file(&blob_dir.join(name))?;
                }
                sync_dir(&blob_dir)?;
                synced.blobs = now;
            }
        }
        // Taken before the fdatasync, like the blobs above: the segments freed by then
        // were replaced by writes it covers.
        let held = self.db.held_segments();
        self.log.sync_data()?;
        self.db
            .release_segments(held)
            .map_err(std::io::Error::other)?;
        while let Some(path) = synced.unreferenced.pop() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // The log is durable: what is left is garbage, tried again at the next
                // sync (a disk that refuses this will refuse the writes too).
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "an unreferenced sled blob could not be removed");
                    synced.unreferenced.push(path);
                    break;
                }
            }
        }
        let now = entries(&self.dir)?;
        if now != synced.top {
            for name in now.difference(&synced.top) {
                let p = self.dir.join(name);
                if p.is_file() {
                    sync_file(&p)?;
                }
            }
            sync_dir(&self.dir)?;
            synced.top = now;
        }
        Ok(())
    }
}

fn entries(dir: &Path) -> std::io::Result<BTreeSet<OsString>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect()
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    match File::open(path) {
        Ok(f) => f.sync_data(),
        // sled removes old snapshot and blob files on its own; a file gone between the
        // listing and the open needs no sync.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One cleaning round, and the error it leaves for the next sync. sled panics on a
/// broken invariant of its own (a page it was told to move is gone); nobody awaits the
/// round's task, so the panic is caught and, like an I/O error, ends the next sync: the
/// agent stops rather than go on uncleaned.
fn cleaning_round(clean: impl FnOnce() -> sled::Result<usize>) -> Option<sled::Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(clean)) {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(sled::Error::ReportableBug(
            "sled panicked while cleaning its log".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cleaning_round_that_panics_leaves_an_error() {
        assert!(cleaning_round(|| Ok(3)).is_none());
        let e = cleaning_round(|| Err(sled::Error::Unsupported("x".into())));
        assert!(matches!(e, Some(sled::Error::Unsupported(_))), "{e:?}");
        let e = cleaning_round(|| panic!("a page it was told to move is gone"));
        assert!(
            matches!(&e, Some(sled::Error::ReportableBug(m)) if m.contains("panicked")),
            "{e:?}"
        );
    }

    #[test]
    fn a_failed_cleaning_round_fails_the_next_sync_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path(), 1 << 20).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(store.sync()).unwrap();
        // What the round leaves when sled reports an error (or panics) while cleaning.
        *store.clean_error.lock().unwrap() = Some(sled::Error::ReportableBug("test".into()));
        let e = rt.block_on(store.sync()).unwrap_err();
        assert!(e.to_string().contains("test"), "{e}");
        // Reported once; the ingest stage that saw it has already stopped the agent.
        rt.block_on(store.sync()).unwrap();
    }
}
