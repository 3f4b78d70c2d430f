//! Counters and gauges shared by every subsystem, rendered as Prometheus text.
//!
//! Names follow `labgate_<name>_<unit>_total` for counters; they are part of the
//! product's interface (dashboards depend on them), so renaming one is a breaking change.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use crate::buffer::Stats;

/// Why a record left the buffer without reaching Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// `drop_oldest` made room for newer records.
    BufferFullDropOldest,
    /// `reject_new` refused the record.
    BufferFullRejectNew,
    /// The broker refused it for good; it is in the dead-letter tree.
    DeadLetter,
    /// It could not be encoded (a broken invariant; logged as an error).
    EncodeError,
    /// Its buffer chunk could not be decoded (damaged on disk) and was quarantined.
    CorruptChunk,
    /// Free disk space was below the floor (`buffer.min_free_bytes`): refused.
    DiskFull,
}

impl DropReason {
    /// The `reason` label of `labgate_records_dropped_total`.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::BufferFullDropOldest => "buffer_full_drop_oldest",
            DropReason::BufferFullRejectNew => "buffer_full_reject_new",
            DropReason::DeadLetter => "dead_letter",
            DropReason::EncodeError => "encode_error",
            DropReason::CorruptChunk => "corrupt_chunk",
            DropReason::DiskFull => "disk_full",
        }
    }
}

/// Where a device is, as its driver and supervisor report it (`/status`, `/health`,
/// the `labgate_device_*` gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Configured, its task not yet running.
    #[default]
    Starting,
    /// Reaching its port or broker.
    Connecting,
    /// Connected, no run in progress.
    Idle,
    /// Connected and measuring.
    Running,
    /// Connected, its run paused by a command.
    Paused,
    /// Its port or broker is gone; retrying.
    Disconnected,
    /// The driver failed (or panicked); restarted with backoff.
    Failed,
    /// Its task has ended (shutdown, removed by a reload).
    Stopped,
}

impl DeviceState {
    /// The state as `/status` and `/health` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Starting => "starting",
            DeviceState::Connecting => "connecting",
            DeviceState::Idle => "idle",
            DeviceState::Running => "running",
            DeviceState::Paused => "paused",
            DeviceState::Disconnected => "disconnected",
            DeviceState::Failed => "failed",
            DeviceState::Stopped => "stopped",
        }
    }

    /// The instrument or broker is reachable.
    pub fn connected(self) -> bool {
        matches!(
            self,
            DeviceState::Idle | DeviceState::Running | DeviceState::Paused
        )
    }

    /// The device's task is alive.
    pub fn alive(self) -> bool {
        !matches!(self, DeviceState::Stopped | DeviceState::Failed)
    }

    /// The device needs a person's attention (`/health` 503).
    pub fn unhealthy(self) -> bool {
        matches!(self, DeviceState::Disconnected | DeviceState::Failed)
    }
}

/// Per-device facts for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeviceStatus {
    /// The device's `kind` as configured (empty for the agent's own entry).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub kind: &'static str,
    /// The device's current state as its driver reports it.
    pub state: DeviceState,
    /// Unix ms when it entered that state.
    pub since_ms: u64,
    /// Highest `seq` of this device known durable in the buffer.
    pub last_durable_seq: Option<u64>,
    /// Lines from the device that could not be parsed (garbage, line noise).
    pub bad_lines: u64,
    /// Error replies from the device (a profile's error patterns, device error codes).
    pub error_replies: u64,
    /// Polls the device did not answer in time.
    pub timeouts: u64,
    /// MQTT: payloads that could not be mapped to readings.
    pub malformed: u64,
    /// MQTT: messages received (set for MQTT devices only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttStats>,
}

/// The latest thing that happened to a command, as the fleet status reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastCommand {
    /// The command's id.
    pub command_id: String,
    /// `pause`, `resume`, `stop` …
    pub command: String,
    /// The device it was for, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// `accepted`, `completed`, `rejected` …
    pub status: &'static str,
    /// Unix milliseconds of that status.
    pub at_ms: u64,
}

/// Counters of one MQTT connection.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct MqttStats {
    /// Messages received.
    pub messages: u64,
    /// Messages the broker delivered again (DUP flag: not acknowledged before, e.g.
    /// the agent crashed between receiving and making them durable).
    pub redelivered: u64,
    /// Messages acknowledged to the broker (after their records were durable).
    pub acked: u64,
    /// Connections made (1 + reconnects).
    pub connects: u64,
}

/// The agent's counters and gauges, shared by every stage (atomics: no stage waits on
/// another to count), rendered by `/metrics` and read by `/status` and `/health`.
#[derive(Default)]
pub struct Metrics {
    /// When the agent started, for uptime.
    pub started: Option<Instant>,
    /// The latest command result (fleet status heartbeats carry it).
    pub last_command: Mutex<Option<LastCommand>>,
    /// Records made durable in the buffer (`labgate_records_buffered_total`).
    pub records_ingested: AtomicU64,
    /// Records Kafka acknowledged and the buffer let go.
    pub records_delivered: AtomicU64,
    /// Unix ms of the last acknowledged record (0 = none yet).
    pub last_delivery_ms: AtomicU64,
    /// Records lost, one counter per [`DropReason`]: every loss is counted.
    pub dropped_drop_oldest: AtomicU64,
    /// Refused because the buffer was full under `reject_new`.
    pub dropped_reject_new: AtomicU64,
    /// Given up after delivery failed permanently (kept in the dead-letter tree).
    pub dropped_dead_letter: AtomicU64,
    /// Could not be encoded (a bug).
    pub dropped_encode_error: AtomicU64,
    /// In a chunk that did not decode (quarantined).
    pub dropped_corrupt_chunk: AtomicU64,
    /// Refused because free disk space fell below the floor.
    pub dropped_disk_full: AtomicU64,
    /// Failed delivery reports (retried or dead-lettered).
    pub delivery_errors: AtomicU64,
    /// Group commits (each one a sled flush and an fdatasync).
    pub buffer_flushes: AtomicU64,
    /// librdkafka reports at least one broker up (from its statistics).
    pub kafka_connected: AtomicBool,
    /// Unix ms of the last moment Kafka was seen connected (0 = never).
    pub kafka_last_connected_ms: AtomicU64,
    /// Commands by the status of their result, one counter each.
    pub commands_accepted: AtomicU64,
    /// Results `completed`.
    pub commands_completed: AtomicU64,
    /// Results `failed`.
    pub commands_failed: AtomicU64,
    /// Results `rejected` (validation).
    pub commands_rejected: AtomicU64,
    /// Results `duplicate` (replayed ids).
    pub commands_duplicate: AtomicU64,
    /// Results `timeout`.
    pub commands_timeout: AtomicU64,
    /// Commands for other agents, skipped.
    pub commands_ignored: AtomicU64,
    /// Pipeline: threshold alerts raised and cleared, aggregates sent, raw readings left
    /// out by downsampling, readings too late for their window.
    pub alerts_raised: AtomicU64,
    /// Threshold alerts that ended (the value came back inside its band).
    pub alerts_cleared: AtomicU64,
    /// Closed aggregate windows sent.
    pub aggregates_emitted: AtomicU64,
    /// Raw readings left out by downsampling (their aggregates still count them).
    pub readings_downsampled: AtomicU64,
    /// Readings that arrived after their window had closed.
    pub pipeline_late_readings: AtomicU64,
    /// The command consumer has partitions assigned (commands can arrive).
    pub commands_assigned: AtomicBool,
    /// Per-device state and counters, by device id.
    pub devices: Mutex<BTreeMap<String, DeviceStatus>>,
    /// Signs of life of the long-running loops (for the systemd watchdog and /health).
    pub beats: crate::heartbeat::Beats,
    /// Buffer storage failures by kind (enospc, eio, erofs, corruption, other); the one
    /// that stopped the last run is counted again at the next start.
    pub buffer_errors: Mutex<BTreeMap<String, u64>>,
    /// Failed delivery reports and producer errors that name the credentials or the
    /// authorisation (wrong password, ACL): retried, never dead-lettered.
    pub kafka_auth_errors: AtomicU64,
    /// The last such error, for /health while it lasts (cleared by a delivery).
    pub kafka_auth_error: Mutex<Option<String>>,
    /// `kafka_auth_error` is set (checked on every delivery without the lock).
    pub kafka_auth_failing: AtomicBool,
}

impl Metrics {
    /// Fresh counters, with the uptime clock started.
    pub fn new() -> Metrics {
        Metrics {
            started: Some(Instant::now()),
            ..Metrics::default()
        }
    }

    /// Counts `n` records lost for `reason`.
    pub fn count_drop(&self, reason: DropReason, n: u64) {
        let c = match reason {
            DropReason::BufferFullDropOldest => &self.dropped_drop_oldest,
            DropReason::BufferFullRejectNew => &self.dropped_reject_new,
            DropReason::DeadLetter => &self.dropped_dead_letter,
            DropReason::EncodeError => &self.dropped_encode_error,
            DropReason::CorruptChunk => &self.dropped_corrupt_chunk,
            DropReason::DiskFull => &self.dropped_disk_full,
        };
        c.fetch_add(n, Relaxed);
    }

    /// Sets or clears the standing credentials / authorisation error.
    pub fn set_auth_error(&self, e: Option<String>) {
        self.kafka_auth_failing.store(e.is_some(), Relaxed);
        *self
            .kafka_auth_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// Counts and records a refusal by the broker (credentials, TLS, ACLs) named by
    /// [`crate::kafka::refusal_cause`]; logged once per episode and per cause.
    pub fn note_refusal(&self, cause: &str, client: &str) {
        self.kafka_auth_errors.fetch_add(1, Relaxed);
        let before = self.auth_error();
        if before.as_deref() != Some(cause) {
            tracing::error!(
                client,
                cause,
                "kafka refuses this agent; records stay in the buffer and are sent again"
            );
        }
        self.set_auth_error(Some(cause.to_string()));
    }

    /// The standing credentials / authorisation error, if any.
    pub fn auth_error(&self) -> Option<String> {
        self.kafka_auth_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a buffer storage failure of `kind` (enospc, eio, erofs, corruption, other).
    pub fn count_buffer_error(&self, kind: &str) {
        let mut m = self.buffer_errors.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(kind.to_string()).or_default() += 1;
    }

    /// Records lost for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_drop_oldest.load(Relaxed)
            + self.dropped_reject_new.load(Relaxed)
            + self.dropped_dead_letter.load(Relaxed)
            + self.dropped_encode_error.load(Relaxed)
            + self.dropped_corrupt_chunk.load(Relaxed)
            + self.dropped_disk_full.load(Relaxed)
    }

    /// Records where a device is now.
    pub fn set_device_state(&self, device: &str, state: DeviceState) {
        self.with_device(device, |e| {
            if e.state != state || e.since_ms == 0 {
                e.state = state;
                e.since_ms = crate::record::unix_ms(std::time::SystemTime::now());
            }
        });
    }

    /// Runs `f` on a device's entry, making it if needed. The lookup is by `&str`: the
    /// name is copied only the first time (MQTT counts every message through here).
    fn with_device<R>(&self, device: &str, f: impl FnOnce(&mut DeviceStatus) -> R) -> R {
        let mut d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = d.get_mut(device) {
            return f(e);
        }
        f(d.entry(device.to_string()).or_default())
    }

    /// Registers a device as starting, with its kind.
    pub fn start_device(&self, device: &str, kind: &'static str) {
        self.with_device(device, |e| {
            e.kind = kind;
            e.state = DeviceState::Starting;
            e.since_ms = crate::record::unix_ms(std::time::SystemTime::now());
        });
    }

    /// Records the latest command decision or outcome, for the fleet status.
    pub fn set_last_command(&self, c: LastCommand) {
        *self.last_command.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    /// The latest command decision or outcome, if any.
    pub fn last_command(&self) -> Option<LastCommand> {
        self.last_command
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets a device removed by a reload.
    pub fn remove_device(&self, device: &str) {
        let mut d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        d.remove(device);
    }

    /// Records the last durable seq of a device the agent runs (or of the agent itself).
    /// The last records of a device removed by a reload are flushed after it is gone:
    /// they do not bring it back into `/status`.
    pub fn set_durable_seq(&self, device: &str, seq: u64) {
        let mut d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = d.get_mut(device) {
            e.last_durable_seq = Some(seq);
        } else if device == crate::record::AGENT_DEVICE {
            d.entry(device.to_string()).or_default().last_durable_seq = Some(seq);
        }
    }

    /// A line from the device that could not be parsed.
    pub fn count_bad_line(&self, device: &str) {
        self.with_device(device, |e| e.bad_lines += 1);
    }

    /// An error reply from the device.
    pub fn count_error_reply(&self, device: &str) {
        self.with_device(device, |e| e.error_replies += 1);
    }

    /// A payload that could not be mapped (MQTT) or a value that could not be used.
    pub fn count_malformed(&self, device: &str) {
        self.with_device(device, |e| e.malformed += 1);
    }

    /// Updates the MQTT counters of a device.
    pub fn mqtt(&self, device: &str, f: impl FnOnce(&mut MqttStats)) {
        self.with_device(device, |e| f(e.mqtt.get_or_insert_with(MqttStats::default)));
    }

    /// A poll the device did not answer in time.
    pub fn count_timeout(&self, device: &str) {
        self.with_device(device, |e| e.timeouts += 1);
    }

    /// A copy of every device's state and counters, for `/status` and `/metrics`.
    pub fn device_snapshot(&self) -> BTreeMap<String, DeviceStatus> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, buffer: &Stats) -> String {
        let mut o = String::with_capacity(4096);
        fn counter(o: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut o,
            "labgate_records_buffered_total",
            "Records made durable in the buffer.",
            self.records_ingested.load(Relaxed),
        );
        counter(
            &mut o,
            "labgate_records_delivered_total",
            "Records acknowledged by Kafka and removed from the buffer.",
            self.records_delivered.load(Relaxed),
        );
        let _ = writeln!(
            o,
            "# HELP labgate_records_dropped_total Records lost, by reason.\n# TYPE labgate_records_dropped_total counter"
        );
        for (reason, c) in [
            (DropReason::BufferFullDropOldest, &self.dropped_drop_oldest),
            (DropReason::BufferFullRejectNew, &self.dropped_reject_new),
            (DropReason::DeadLetter, &self.dropped_dead_letter),
            (DropReason::EncodeError, &self.dropped_encode_error),
            (DropReason::CorruptChunk, &self.dropped_corrupt_chunk),
            (DropReason::DiskFull, &self.dropped_disk_full),
        ] {
            let _ = writeln!(
                o,
                "labgate_records_dropped_total{{reason=\"{}\"}} {}",
                reason.label(),
                c.load(Relaxed)
            );
        }
        counter(
            &mut o,
            "labgate_kafka_delivery_errors_total",
            "Failed delivery reports (retried or dead-lettered).",
            self.delivery_errors.load(Relaxed),
        );
        gauge(
            &mut o,
            "labgate_kafka_connected",
            "1 while at least one broker connection is up.",
            f64::from(u8::from(self.kafka_connected.load(Relaxed))),
        );
        gauge(
            &mut o,
            "labgate_buffer_records",
            "Records in the buffer awaiting delivery.",
            buffer.records as f64,
        );
        gauge(
            &mut o,
            "labgate_buffer_bytes",
            "Encoded bytes of buffered records.",
            buffer.bytes as f64,
        );
        gauge(
            &mut o,
            "labgate_buffer_disk_bytes",
            "Bytes sled uses on disk.",
            buffer.disk_bytes as f64,
        );
        gauge(
            &mut o,
            "labgate_buffer_cap_bytes",
            "Cap on encoded bytes kept: buffer.max_bytes over the store's measured overhead on disk.",
            buffer.cap_bytes as f64,
        );
        gauge(
            &mut o,
            "labgate_buffer_oldest_record_age_seconds",
            "Age of the oldest buffered record.",
            buffer.oldest_age_seconds,
        );
        gauge(
            &mut o,
            "labgate_buffer_dead_letters",
            "Records in the dead-letter tree.",
            buffer.dead_letters as f64,
        );
        gauge(
            &mut o,
            "labgate_buffer_quarantined_chunks",
            "Undecodable chunks moved aside to the quarantine tree.",
            buffer.quarantined_chunks as f64,
        );
        gauge(
            &mut o,
            "labgate_buffer_disk_free_bytes",
            "Free bytes on the data dir's filesystem.",
            buffer.disk_free_bytes as f64,
        );
        gauge(
            &mut o,
            "labgate_buffer_low_disk",
            "1 while free space is below buffer.min_free_bytes (the buffer counts as full).",
            f64::from(u8::from(buffer.low_disk)),
        );
        let _ = writeln!(
            o,
            "# HELP labgate_buffer_errors_total Buffer storage failures, by kind.\n# TYPE labgate_buffer_errors_total counter"
        );
        {
            let errs = self.buffer_errors.lock().unwrap_or_else(|p| p.into_inner());
            for kind in ["enospc", "eio", "erofs", "corruption", "other"] {
                let _ = writeln!(
                    o,
                    "labgate_buffer_errors_total{{kind=\"{kind}\"}} {}",
                    errs.get(kind).copied().unwrap_or(0)
                );
            }
        }
        counter(
            &mut o,
            "labgate_kafka_auth_errors_total",
            "Kafka refusals: credentials, TLS certificates, authorisation (retried, never dead-lettered).",
            self.kafka_auth_errors.load(Relaxed),
        );
        gauge(
            &mut o,
            "labgate_kafka_refused",
            "1 while the broker refuses this agent (the cause is on /health and /status).",
            f64::from(u8::from(self.kafka_auth_failing.load(Relaxed))),
        );
        counter(
            &mut o,
            "labgate_buffer_flushes_total",
            "Group commits of the buffer.",
            self.buffer_flushes.load(Relaxed),
        );
        let _ = writeln!(
            o,
            "# HELP labgate_commands_total Commands handled, by result status.\n# TYPE labgate_commands_total counter"
        );
        for (status, c) in [
            ("accepted", &self.commands_accepted),
            ("completed", &self.commands_completed),
            ("failed", &self.commands_failed),
            ("rejected", &self.commands_rejected),
            ("duplicate", &self.commands_duplicate),
            ("timeout", &self.commands_timeout),
            ("ignored", &self.commands_ignored),
        ] {
            let _ = writeln!(
                o,
                "labgate_commands_total{{status=\"{status}\"}} {}",
                c.load(Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP labgate_device_running 1 while the device's task is running.\n# TYPE labgate_device_running gauge"
        );
        for (id, d) in self.device_snapshot() {
            if id == crate::record::AGENT_DEVICE {
                continue;
            }
            let up = u8::from(d.state.alive());
            let _ = writeln!(o, "labgate_device_running{{device=\"{id}\"}} {up}");
        }
        let _ = writeln!(
            o,
            "# HELP labgate_device_connected 1 while the device is connected.\n# TYPE labgate_device_connected gauge"
        );
        for (id, d) in self.device_snapshot() {
            if id == crate::record::AGENT_DEVICE {
                continue;
            }
            let up = u8::from(d.state.connected());
            let _ = writeln!(o, "labgate_device_connected{{device=\"{id}\"}} {up}");
        }
        type Field = fn(&DeviceStatus) -> u64;
        let per_device: [(&str, &str, Field); 4] = [
            (
                "labgate_device_bad_lines_total",
                "Device lines that could not be parsed.",
                |d| d.bad_lines,
            ),
            (
                "labgate_device_error_replies_total",
                "Error replies from the device.",
                |d| d.error_replies,
            ),
            (
                "labgate_device_timeouts_total",
                "Polls the device did not answer in time.",
                |d| d.timeouts,
            ),
            (
                "labgate_device_malformed_total",
                "Messages from the device that could not be mapped to records (MQTT payloads).",
                |d| d.malformed,
            ),
        ];
        let devices = self.device_snapshot();
        for (name, help, field) in per_device {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (id, d) in devices
                .iter()
                .filter(|(id, _)| id.as_str() != crate::record::AGENT_DEVICE)
            {
                let _ = writeln!(o, "{name}{{device=\"{id}\"}} {}", field(d));
            }
        }
        type MqttField = fn(&MqttStats) -> u64;
        let per_mqtt: [(&str, &str, MqttField); 4] = [
            (
                "labgate_mqtt_messages_total",
                "MQTT messages received.",
                |m| m.messages,
            ),
            (
                "labgate_mqtt_redelivered_total",
                "MQTT messages the broker delivered again (not acknowledged before).",
                |m| m.redelivered,
            ),
            (
                "labgate_mqtt_acked_total",
                "MQTT messages acknowledged after their records were durable.",
                |m| m.acked,
            ),
            (
                "labgate_mqtt_connects_total",
                "MQTT connections made.",
                |m| m.connects,
            ),
        ];
        for (name, help, field) in per_mqtt {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (id, m) in devices.iter().filter_map(|(id, d)| d.mqtt.map(|m| (id, m))) {
                let _ = writeln!(o, "{name}{{device=\"{id}\"}} {}", field(&m));
            }
        }
        let _ = writeln!(
            o,
            "# HELP labgate_alerts_total Threshold alerts, by state (active = raised).\n# TYPE labgate_alerts_total counter"
        );
        for (state, c) in [
            ("active", &self.alerts_raised),
            ("cleared", &self.alerts_cleared),
        ] {
            let _ = writeln!(
                o,
                "labgate_alerts_total{{state=\"{state}\"}} {}",
                c.load(Relaxed)
            );
        }
        counter(
            &mut o,
            "labgate_aggregates_total",
            "Window aggregates sent.",
            self.aggregates_emitted.load(Relaxed),
        );
        counter(
            &mut o,
            "labgate_readings_downsampled_total",
            "Raw readings left out by downsampling (aggregates and alerts still saw them).",
            self.readings_downsampled.load(Relaxed),
        );
        counter(
            &mut o,
            "labgate_pipeline_late_readings_total",
            "Readings older than their sensor's open window, left out of aggregates.",
            self.pipeline_late_readings.load(Relaxed),
        );
        let trims = crate::memory::TRIMS.snapshot();
        counter(
            &mut o,
            "labgate_memory_trims_total",
            "Times freed memory was handed back to the kernel (malloc_trim).",
            trims.count,
        );
        counter(
            &mut o,
            "labgate_memory_trim_seconds_total",
            "Time spent in those trims.",
            trims.nanos as f64 / 1e9,
        );
        counter(
            &mut o,
            "labgate_memory_released_bytes_total",
            "Resident bytes those trims gave back.",
            trims.released_kib.saturating_mul(1024),
        );
        gauge(
            &mut o,
            "labgate_uptime_seconds",
            "Seconds since the agent started.",
            self.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names are an interface: dashboards and alerts use them.
    #[test]
    fn metric_names_are_stable() {
        let m = Metrics::new();
        m.set_device_state("pstat-1", DeviceState::Running);
        m.mqtt("mqtt-1", |s| s.messages += 1);
        let text = m.render(&Stats::default());
        let names: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            names,
            [
                "labgate_records_buffered_total",
                "labgate_records_delivered_total",
                "labgate_records_dropped_total{reason=\"buffer_full_drop_oldest\"}",
                "labgate_records_dropped_total{reason=\"buffer_full_reject_new\"}",
                "labgate_records_dropped_total{reason=\"dead_letter\"}",
                "labgate_records_dropped_total{reason=\"encode_error\"}",
                "labgate_records_dropped_total{reason=\"corrupt_chunk\"}",
                "labgate_records_dropped_total{reason=\"disk_full\"}",
                "labgate_kafka_delivery_errors_total",
                "labgate_kafka_connected",
                "labgate_buffer_records",
                "labgate_buffer_bytes",
                "labgate_buffer_disk_bytes",
                "labgate_buffer_cap_bytes",
                "labgate_buffer_oldest_record_age_seconds",
                "labgate_buffer_dead_letters",
                "labgate_buffer_quarantined_chunks",
                "labgate_buffer_disk_free_bytes",
                "labgate_buffer_low_disk",
                "labgate_buffer_errors_total{kind=\"enospc\"}",
                "labgate_buffer_errors_total{kind=\"eio\"}",
                "labgate_buffer_errors_total{kind=\"erofs\"}",
                "labgate_buffer_errors_total{kind=\"corruption\"}",
                "labgate_buffer_errors_total{kind=\"other\"}",
                "labgate_kafka_auth_errors_total",
                "labgate_kafka_refused",
                "labgate_buffer_flushes_total",
                "labgate_commands_total{status=\"accepted\"}",
                "labgate_commands_total{status=\"completed\"}",
                "labgate_commands_total{status=\"failed\"}",
                "labgate_commands_total{status=\"rejected\"}",
                "labgate_commands_total{status=\"duplicate\"}",
                "labgate_commands_total{status=\"timeout\"}",
                "labgate_commands_total{status=\"ignored\"}",
                "labgate_device_running{device=\"mqtt-1\"}",
                "labgate_device_running{device=\"pstat-1\"}",
                "labgate_device_connected{device=\"mqtt-1\"}",
                "labgate_device_connected{device=\"pstat-1\"}",
                "labgate_device_bad_lines_total{device=\"mqtt-1\"}",
                "labgate_device_bad_lines_total{device=\"pstat-1\"}",
                "labgate_device_error_replies_total{device=\"mqtt-1\"}",
                "labgate_device_error_replies_total{device=\"pstat-1\"}",
                "labgate_device_timeouts_total{device=\"mqtt-1\"}",
                "labgate_device_timeouts_total{device=\"pstat-1\"}",
                "labgate_device_malformed_total{device=\"mqtt-1\"}",
                "labgate_device_malformed_total{device=\"pstat-1\"}",
                "labgate_mqtt_messages_total{device=\"mqtt-1\"}",
                "labgate_mqtt_redelivered_total{device=\"mqtt-1\"}",
                "labgate_mqtt_acked_total{device=\"mqtt-1\"}",
                "labgate_mqtt_connects_total{device=\"mqtt-1\"}",
                "labgate_alerts_total{state=\"active\"}",
                "labgate_alerts_total{state=\"cleared\"}",
                "labgate_aggregates_total",
                "labgate_readings_downsampled_total",
                "labgate_pipeline_late_readings_total",
                "labgate_memory_trims_total",
                "labgate_memory_trim_seconds_total",
                "labgate_memory_released_bytes_total",
                "labgate_uptime_seconds",
            ]
        );
        // Every sample has a HELP and a TYPE line for its family.
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split_whitespace().next().unwrap();
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
    }
}
