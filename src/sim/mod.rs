//! Protocol simulators on pty pairs, for users without hardware and for the tests (which
//! use these same simulators). `labgate simulate <kind>` runs one and prints its path.

pub mod cli;
pub mod emstat;
pub mod interp;
pub mod line;
pub mod modbus;
pub mod mqtt;
pub mod techniques;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serialport::{SerialPort, TTYPort};

/// Creates a pty pair for a simulator: returns the master (the simulator's end, close-on-
/// exec so processes started later do not inherit it and keep the line up after an
/// "unplug") and the device path, linked at `link` when given.
pub fn open_pty(link: Option<&Path>) -> std::io::Result<(TTYPort, PathBuf)> {
    let (master, slave) = TTYPort::pair().map_err(std::io::Error::other)?;
    let path = PathBuf::from(
        slave
            .name()
            .ok_or_else(|| std::io::Error::other("pty has no name"))?,
    );
    // The pair's slave handle holds the port's lock; let it go so a driver can open the
    // path. Until one does, master reads fail with EIO, which simulators treat as "no
    // client yet".
    drop(slave);
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&master),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(std::io::Error::other)?;
    if let Some(l) = link {
        let _ = std::fs::remove_file(l);
        std::os::unix::fs::symlink(&path, l)?;
    }
    Ok((master, path))
}

/// Removes `link` if it still points at `path` (a newer simulator may own it).
pub fn remove_link(link: Option<&Path>, path: &Path) {
    if let Some(l) = link {
        if std::fs::read_link(l).is_ok_and(|p| p == path) {
            let _ = std::fs::remove_file(l);
        }
    }
}

/// Opens the slave side with a plain handle (no lock, never read), so that the master
/// does not read EIO while no driver is connected: servers that treat a read error as
/// fatal (tokio-modbus) keep running until a driver opens the port.
pub fn hold_slave(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags((nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC).bits())
        .open(path)
}

/// A simulator serving one pty from its own thread. Dropping the handle stops the thread
/// (which closes the pty, as pulling the cable would) and removes the link.
pub struct Handle {
    path: PathBuf,
    link: Option<PathBuf>,
    stop: Option<Box<dyn FnOnce() + Send>>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Runs `serve` on a thread named `name`; `serve` returns soon after its flag is set.
    pub fn spawn(
        name: &str,
        path: PathBuf,
        link: Option<&Path>,
        serve: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
    ) -> std::io::Result<Handle> {
        let flag = Arc::new(AtomicBool::new(false));
        let flag2 = flag.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve(flag2))?;
        Ok(Handle::new(path, link, thread, move || {
            flag.store(true, Ordering::Relaxed)
        }))
    }

    /// A thread with its own way of being told to stop.
    pub fn new(
        path: PathBuf,
        link: Option<&Path>,
        thread: JoinHandle<()>,
        stop: impl FnOnce() + Send + 'static,
    ) -> Handle {
        Handle {
            path,
            link: link.map(Path::to_path_buf),
            stop: Some(Box::new(stop)),
            thread: Some(thread),
        }
    }

    /// The device path (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        remove_link(self.link.as_deref(), &self.path);
    }
}
