//! Signs of life of the agent's long-running loops: each loop beats from its own turn,
//! and a loop silent for [`STALE`] counts as stuck (`/health` 503, no systemd watchdog
//! pings).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// A loop's sign of life: milliseconds since `epoch` at its last turn.
#[derive(Debug)]
pub struct Heartbeat {
    /// The loop's name, for `/health` and the log.
    pub name: &'static str,
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Heartbeat {
    /// A heartbeat that has just beaten.
    pub fn new(name: &'static str) -> Heartbeat {
        Heartbeat {
            name,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// The loop made a turn.
    pub fn beat(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Relaxed)))
    }
}

/// How often loops beat; a loop silent for `STALE` is considered stuck.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// A loop silent this long is stuck.
pub const STALE: Duration = Duration::from_secs(10);

/// The agent's long-running loops.
#[derive(Debug)]
pub struct Beats {
    /// The ingest stage.
    pub ingest: Heartbeat,
    /// The forwarder (which beats only while delivery moves).
    pub forwarder: Heartbeat,
    /// The command consumer.
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

#[cfg(test)]
mod tests {
    use super::*;

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
