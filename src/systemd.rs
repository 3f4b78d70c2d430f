//! systemd integration without libsystemd: `sd_notify` is one datagram to the socket in
//! `$NOTIFY_SOCKET`, and the watchdog interval is `$WATCHDOG_USEC`.
//!
//! The watchdog is fed only while the agent makes progress: the forwarder, the ingest
//! stage and (when enabled) the command consumer each bump a heartbeat from their own
//! loops, and every device supervisor is alive. A stuck Kafka client or a wedged task
//! stops the pings, and systemd restarts the agent (`WatchdogSec=` in the unit).

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A loop's sign of life: milliseconds since `epoch` at its last turn.
#[derive(Debug)]
pub struct Heartbeat {
    pub name: &'static str,
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Heartbeat {
    pub fn new(name: &'static str) -> Heartbeat {
        Heartbeat {
            name,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn beat(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    pub fn age(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Relaxed)))
    }
}

/// How often loops beat; a loop silent for `STALE` is considered stuck.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
pub const STALE: Duration = Duration::from_secs(10);

/// The agent's long-running loops.
#[derive(Debug)]
pub struct Beats {
    pub ingest: Heartbeat,
    pub forwarder: Heartbeat,
    pub commands: Heartbeat,
}

impl Default for Beats {
    fn default() -> Self {
        Beats {
            ingest: Heartbeat::new("ingest"),
            forwarder: Heartbeat::new("forwarder"),
            commands: Heartbeat::new("command consumer"),
        }
    }
}

impl Beats {
    /// The loops that have been silent longer than `STALE` (the command consumer only
    /// when it runs).
    pub fn stale(&self, commands: bool) -> Vec<&'static str> {
        let mut all = vec![&self.ingest, &self.forwarder];
        if commands {
            all.push(&self.commands);
        }
        stale(&all)
    }
}

/// The heartbeats that are older than `STALE`.
pub fn stale(hearts: &[&Heartbeat]) -> Vec<&'static str> {
    hearts
        .iter()
        .filter(|h| h.age() > STALE)
        .map(|h| h.name)
        .collect()
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

    #[test]
    fn a_silent_loop_is_stale() {
        let h = Heartbeat::new("forwarder");
        h.beat();
        assert!(stale(&[&h]).is_empty());
        let old = Heartbeat {
            name: "ingest",
            epoch: Instant::now() - Duration::from_secs(20),
            last_ms: AtomicU64::new(0),
        };
        assert_eq!(stale(&[&h, &old]), ["ingest"]);
    }
}
