//! Fleet status on Kafka: a `birth` message when the agent starts, a `heartbeat` every
//! `kafka.status_interval`, and a `death` message on an orderly shutdown, all keyed by
//! the agent id on `topics.status` (created compacted, so it holds each agent's latest
//! message). A crashed or unplugged agent sends nothing: a central consumer tells a dead
//! agent from a quiet one by the age of its last message against the interval it
//! announced (`labgate fleet` calls it silent after three intervals).
//!
//! Status messages are not records: they describe the agent now, so they do not go
//! through the buffer and are not replayed after an outage. They share the record
//! producer (one librdkafka instance per agent) and are marked by their delivery opaque
//! ([`STATUS_OPAQUE`]). At most one is in flight: while the broker is away heartbeats
//! are skipped rather than queued.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::Producer;
use crate::buffer::Buffer;
use crate::metrics::{DeviceState, Metrics};
use crate::record::SCHEMA_VERSION;

/// The delivery opaque of status messages; record ids never pack to it (a chunk index
/// is at most 4095).
pub const STATUS_OPAQUE: usize = usize::MAX;

/// Shared between the status task and the producer's delivery callback.
#[derive(Debug, Default)]
pub struct StatusSlot {
    /// Delivery reports of status messages, successful or not.
    pub reports: AtomicU64,
    /// Status messages Kafka acknowledged.
    pub delivered: AtomicU64,
    /// Wakes the task waiting for the death message's report.
    pub reported: tokio::sync::Notify,
}

impl StatusSlot {
    /// Called from the delivery callback for a status message.
    pub fn on_report(&self, ok: bool) {
        if ok {
            self.delivered.fetch_add(1, Relaxed);
        }
        self.reports.fetch_add(1, Relaxed);
        self.reported.notify_waiters();
    }
}

/// Which status message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The agent has started.
    Birth,
    /// The agent is alive; its state now.
    Heartbeat,
    /// The agent is stopping in order.
    Death,
}

impl Phase {
    /// As the message's `status` field writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Birth => "birth",
            Phase::Heartbeat => "heartbeat",
            Phase::Death => "death",
        }
    }
}

/// What stays the same for the life of the process.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The message key.
    pub agent_id: String,
    /// New at every start: pairs a death with its birth.
    pub session_id: String,
    /// This machine's host name.
    pub host: String,
    /// SHA-256 of the effective config with secrets redacted (`sha256:<hex>`).
    pub config_digest: String,
    /// The heartbeat interval it announces.
    pub interval: Duration,
    /// When the agent started.
    pub started: SystemTime,
}

/// The machine's host name (`/proc/sys/kernel/hostname`, then `/etc/hostname`).
pub fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            let s = std::fs::read_to_string(p).ok()?;
            let s = s.trim();
            (!s.is_empty()).then(|| s.to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `sha256:<hex>` of `text`.
pub fn digest(text: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in d {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Builds and sends the status messages.
pub struct StatusPublisher {
    /// Who this agent is.
    pub identity: Identity,
    /// The record producer.
    pub producer: Producer,
    /// `topics.status`.
    pub topic: String,
    /// Counters and device states.
    pub metrics: Arc<Metrics>,
    /// Buffer figures for heartbeats.
    pub buffer: Arc<Buffer>,
    /// In-flight flag and delivery reports.
    pub slot: Arc<StatusSlot>,
    /// Messages handed to the producer this session (the next one's `seq`).
    pub seq: u64,
}

impl StatusPublisher {
    /// The status message for `phase` as of now.
    pub fn message(&self, phase: Phase, now: SystemTime) -> Value {
        let id = &self.identity;
        let m = &self.metrics;
        let devices = m.device_snapshot();
        let mut mqtt = (0u64, 0u64);
        let list: Vec<Value> = devices
            .iter()
            .filter(|(_, d)| !d.kind.is_empty())
            .map(|(dev, d)| {
                if d.kind == "mqtt" {
                    mqtt.0 += 1;
                    if matches!(
                        d.state,
                        DeviceState::Idle | DeviceState::Running | DeviceState::Paused
                    ) {
                        mqtt.1 += 1;
                    }
                }
                json!({"id": dev, "kind": d.kind, "state": d.state.as_str()})
            })
            .collect();
        let stats = Buffer::stats_for_async(&self.buffer);
        let mut v = json!({
            "type": "agent_status",
            "status": phase.as_str(),
            "agent_id": id.agent_id,
            "session_id": id.session_id,
            "seq": self.seq,
            "timestamp": crate::time::format_rfc3339_millis(now).unwrap_or_default(),
            "started_at": crate::time::format_rfc3339_millis(id.started).unwrap_or_default(),
            "status_interval_ms": id.interval.as_millis() as u64,
            "version": env!("CARGO_PKG_VERSION"),
            "host": id.host,
            "pid": std::process::id(),
            "config_digest": id.config_digest,
            "schema_version": SCHEMA_VERSION,
            "devices": list,
            "buffer": {
                "records": stats.records,
                "bytes": stats.bytes,
                "oldest_age_seconds": stats.oldest_age_seconds,
                "dead_letters": stats.dead_letters,
            },
            "records_buffered": m.records_ingested.load(Relaxed),
            "records_delivered": m.records_delivered.load(Relaxed),
            "records_dropped": m.dropped_total(),
            "kafka": {
                "connected": m.kafka_connected.load(Relaxed),
                "refused": m.auth_error(),
            },
            "mqtt": {"devices": mqtt.0, "connected": mqtt.1},
        });
        if let Some(c) = m.last_command() {
            v["last_command"] = serde_json::to_value(c).unwrap_or(Value::Null);
        }
        if phase == Phase::Death {
            v["reason"] = "shutdown".into();
        }
        v
    }

    /// Hands one status message to the producer. A heartbeat is skipped while an
    /// earlier message is still in flight (the broker is away: there is no point in
    /// queueing stale states); birth and death are always sent.
    pub fn send(&mut self, phase: Phase) -> bool {
        if phase == Phase::Heartbeat && self.in_flight() {
            tracing::debug!("previous status message not yet delivered; heartbeat skipped");
            return false;
        }
        let payload = self.message(phase, SystemTime::now()).to_string();
        let version = SCHEMA_VERSION.to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            })
            .insert(Header {
                key: "schema-version",
                value: Some(version.as_str()),
            })
            .insert(Header {
                key: "agent-id",
                value: Some(self.identity.agent_id.as_str()),
            })
            .insert(Header {
                key: "status",
                value: Some(phase.as_str()),
            });
        let record = BaseRecord::with_opaque_to(&self.topic, STATUS_OPAQUE)
            .key(self.identity.agent_id.as_str())
            .payload(payload.as_bytes())
            .headers(headers);
        match self.producer.send(record) {
            Ok(()) => {
                self.seq += 1;
                true
            }
            Err((e, _)) => {
                tracing::warn!(error = %e, status = phase.as_str(), "status message not sent");
                false
            }
        }
    }

    /// Birth now, a heartbeat every interval, and on `stop` a death message, waiting up
    /// to `grace` for Kafka to acknowledge it.
    pub async fn run(mut self, stop: CancellationToken, grace: Duration) {
        self.send(Phase::Birth);
        let mut tick = tokio::time::interval(self.identity.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.send(Phase::Heartbeat);
                }
                () = stop.cancelled() => break,
            }
        }
        if !self.send(Phase::Death) {
            return;
        }
        // Best effort: with the broker away the death cannot arrive, and shutdown
        // should not wait the whole grace for it.
        let wait = if self.metrics.kafka_connected.load(Relaxed) {
            grace
        } else {
            grace.min(Duration::from_secs(1))
        };
        let deadline = tokio::time::Instant::now() + wait;
        while self.in_flight() {
            let reported = self.slot.reported.notified();
            if !self.in_flight() {
                break;
            }
            if tokio::time::timeout_at(deadline, reported).await.is_err() {
                tracing::warn!(waited = ?wait, "death message not acknowledged before shutdown");
                return;
            }
        }
        tracing::info!("death message sent");
    }

    /// Whether a status message has no delivery report yet.
    fn in_flight(&self) -> bool {
        self.slot.reports.load(Relaxed) < self.seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(
            digest("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
