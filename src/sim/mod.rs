//! Protocol simulators on pty pairs, for users without hardware and for the tests (which
//! use these same simulators). `labgate simulate <kind>` runs one and prints its path.

pub mod emstat;
pub mod line;
pub mod modbus;

use std::path::{Path, PathBuf};

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
