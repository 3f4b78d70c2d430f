//! systemd integration without libsystemd: `sd_notify` is one datagram to the socket in
//! `$NOTIFY_SOCKET`, and the watchdog interval is `$WATCHDOG_USEC`.
//!
//! The watchdog is fed only while the agent makes progress: the forwarder, the ingest
//! stage and (when enabled) the command consumer each bump a heartbeat from their own
//! loops, and every device supervisor is alive. A stuck Kafka client or a wedged task
//! stops the pings, and systemd restarts the agent (`WatchdogSec=` in the unit).

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Sends one notification (`READY=1`, `STOPPING=1`, `WATCHDOG=1`, `STATUS=…`). Without
/// `$NOTIFY_SOCKET` (not started by systemd) it does nothing.
pub fn notify(state: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(())
}

/// The watchdog interval systemd asked for, if any (and if meant for this process).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim() != std::process::id().to_string() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval while every loop is making progress.
pub async fn feed_watchdog(
    interval: Duration,
    metrics: Arc<crate::metrics::Metrics>,
    commands: bool,
    stop: CancellationToken,
) {
    let every = interval / 2;
    tracing::info!(?interval, "systemd watchdog armed");
    let mut warned = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let stuck = metrics.beats.stale(commands);
        if stuck.is_empty() {
            warned = false;
            if let Err(e) = notify("WATCHDOG=1") {
                tracing::warn!(error = %e, "cannot ping the systemd watchdog");
            }
        } else if !warned {
            warned = true;
            tracing::error!(stuck = ?stuck, "no progress: withholding watchdog pings so systemd restarts the agent");
            let _ = notify(&format!("STATUS=stuck: {}", stuck.join(", ")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_datagram_socket_by_path_and_by_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        // The only test that touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("labgate-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abs = UnixDatagram::bind_addr(&addr).unwrap();
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        notify("WATCHDOG=1").unwrap();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        std::env::remove_var("NOTIFY_SOCKET");
    }
}
