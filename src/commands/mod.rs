//! Commands: Kafka command topic → validate → route to device tasks → results.
//!
//! Every agent consumes the command topic in its own consumer group, so it sees every
//! command, and acts on those addressed to it (`target.agent` equal to its id, or absent).
//! The offset of a command is stored only after its results are durable in the buffer, so
//! a crash re-delivers a command rather than forgetting it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::ClientContext;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::devices::{CommandKind, Control, DeviceConfig};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::record::{unix_us, Body, CommandStatus, Draft, AGENT_DEVICE};

/// How long a device may take to carry out a command before it is reported failed.
pub const DEVICE_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("command consumer setup: {0}")]
    Setup(#[from] crate::kafka::KafkaSetupError),
}

/// A command that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub command_id: String,
    pub kind: CommandKind,
    pub params: serde_json::Map<String, Value>,
    /// `None` = every device of this agent that accepts the command.
    pub device: Option<String>,
}

/// Why a command is not carried out.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Addressed to another agent: not ours to answer.
    NotForUs,
    /// Ours, but invalid: answered with a `rejected` result.
    Rejected {
        command_id: String,
        command: String,
        device: Option<String>,
        reason: String,
    },
}

/// What the validator needs to know about this agent.
pub struct Validator {
    pub agent_id: String,
    /// Device id → its config (for existence and allowed commands).
    pub devices: BTreeMap<String, DeviceConfig>,
}

impl Validator {
    /// Parses and validates one command message. Never panics on any input.
    pub fn validate(&self, payload: &[u8]) -> Result<Command, Refusal> {
        let reject = |id: &str, cmd: &str, dev: Option<&str>, reason: String| Refusal::Rejected {
            command_id: id.to_string(),
            command: cmd.to_string(),
            device: dev.map(str::to_string),
            reason,
        };
        let v: Value = serde_json::from_slice(payload)
            .map_err(|e| reject("", "", None, format!("schema: not JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(reject(
                "",
                "",
                None,
                "schema: a command must be a JSON object".into(),
            ));
        };
        let id = match obj.get("command_id") {
            None => String::new(),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
            Some(_) => {
                return Err(reject(
                    "",
                    "",
                    None,
                    "schema: command_id must be a non-empty string of at most 128 characters"
                        .into(),
                ))
            }
        };
        let name = match obj.get("command") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(reject(
                    &id,
                    "",
                    None,
                    "schema: command must be a string".into(),
                ))
            }
            None => return Err(reject(&id, "", None, "schema: command is missing".into())),
        };
        // Target first: a command for another agent is not ours to reject.
        let (agent, device) = match obj.get("target") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Object(t)) => {
                let field = |k: &str| match t.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(format!("schema: target.{k} must be a string")),
                };
                let agent = field("agent").map_err(|r| reject(&id, &name, None, r))?;
                let device = field("device").map_err(|r| reject(&id, &name, None, r))?;
                (agent, device)
            }
            Some(_) => {
                return Err(reject(
                    &id,
                    &name,
                    None,
                    "schema: target must be an object".into(),
                ))
            }
        };
        if agent.as_deref().is_some_and(|a| a != self.agent_id) {
            return Err(Refusal::NotForUs);
        }
        if let Some(t) = obj.get("type") {
            if t != "command" {
                return Err(reject(
                    &id,
                    &name,
                    device.as_deref(),
                    "schema: type must be \"command\"".into(),
                ));
            }
        }
        if let Some(ts) = obj.get("timestamp") {
            let ok = ts
                .as_str()
                .is_some_and(|s| humantime::parse_rfc3339_weak(s).is_ok());
            if !ok {
                return Err(reject(
                    &id,
                    &name,
                    device.as_deref(),
                    "schema: timestamp must be an RFC 3339 time".into(),
                ));
            }
        }
        let params = match obj.get("params") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => {
                return Err(reject(
                    &id,
                    &name,
                    device.as_deref(),
                    "schema: params must be an object".into(),
                ))
            }
        };
        let Some(kind) = CommandKind::parse(&name) else {
            return Err(reject(
                &id,
                &name,
                device.as_deref(),
                format!("unknown command {name:?} (known: start, pause, resume, stop)"),
            ));
        };
        if let Some(d) = &device {
            let Some(cfg) = self.devices.get(d) else {
                return Err(reject(&id, &name, None, format!("unknown device {d:?}")));
            };
            if !cfg.accepts(kind) {
                return Err(reject(
                    &id,
                    &name,
                    Some(d),
                    format!(
                        "command {name} is not allowed for device {d} ({})",
                        cfg.kind()
                    ),
                ));
            }
        } else if !self.devices.values().any(|c| c.accepts(kind)) {
            return Err(reject(
                &id,
                &name,
                None,
                format!("no device of this agent accepts {name}"),
            ));
        }
        // Security checks go here, after the target is known and before routing:
        // signature over the canonical envelope, issued/expiry window with clock-skew
        // tolerance, and replay (durable command-id store). See issue "Safe remote
        // control". Until then every well-formed command addressed to us is routed.
        let command_id = if id.is_empty() {
            format!("generated-{}", uuid::Uuid::new_v4())
        } else {
            id
        };
        Ok(Command {
            command_id,
            kind,
            params,
            device,
        })
    }
}

/// Device id → its control channel.
#[derive(Clone, Default)]
pub struct Router {
    pub devices: BTreeMap<String, (mpsc::Sender<Control>, DeviceConfig)>,
}

/// Emits results and carries out commands.
pub struct Handler {
    pub validator: Validator,
    pub router: Router,
    pub ingest: Ingest,
    pub metrics: Arc<Metrics>,
}

impl Handler {
    async fn result(
        &self,
        device: Option<&str>,
        command_id: &str,
        command: &str,
        status: CommandStatus,
        reason: Option<String>,
        received: SystemTime,
    ) {
        let counter = match status {
            CommandStatus::Accepted => &self.metrics.commands_accepted,
            CommandStatus::Completed => &self.metrics.commands_completed,
            CommandStatus::Failed => &self.metrics.commands_failed,
            CommandStatus::Rejected => &self.metrics.commands_rejected,
        };
        counter.fetch_add(1, Relaxed);
        tracing::info!(
            command_id,
            command,
            device = device.unwrap_or("-"),
            status = status.as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "command result"
        );
        let draft = Draft::new(
            device.unwrap_or(AGENT_DEVICE),
            Body::CommandResult {
                command_id: command_id.to_string(),
                command: command.to_string(),
                status,
                reason,
                target_device: device.map(str::to_string),
                received_at_us: unix_us(received),
                status_at_us: unix_us(SystemTime::now()),
            },
        );
        if let Err(e) = self.ingest.send_durable(draft).await {
            tracing::error!(command_id, error = %e, "command result not buffered");
        }
    }

    /// Handles one command message end to end (validation, routing, results).
    pub async fn handle(&self, payload: &[u8]) {
        let received = SystemTime::now();
        let cmd = match self.validator.validate(payload) {
            Ok(c) => c,
            Err(Refusal::NotForUs) => {
                self.metrics.commands_ignored.fetch_add(1, Relaxed);
                return;
            }
            Err(Refusal::Rejected {
                command_id,
                command,
                device,
                reason,
            }) => {
                // A command we could not even read an id from still gets a result a
                // consumer can key and count.
                let command_id = if command_id.is_empty() {
                    format!("unidentified-{}", uuid::Uuid::new_v4())
                } else {
                    command_id
                };
                tracing::warn!(command_id, %reason, "command rejected");
                self.result(
                    device.as_deref(),
                    &command_id,
                    &command,
                    CommandStatus::Rejected,
                    Some(reason),
                    received,
                )
                .await;
                return;
            }
        };
        let targets: Vec<String> = match &cmd.device {
            Some(d) => vec![d.clone()],
            None => self
                .router
                .devices
                .iter()
                .filter(|(_, (_, c))| c.accepts(cmd.kind))
                .map(|(id, _)| id.clone())
                .collect(),
        };
        let name = cmd.kind.as_str();
        let mut waiting = Vec::new();
        for dev in targets {
            let Some((tx, _)) = self.router.devices.get(&dev) else {
                continue;
            };
            let (reply, rx) = oneshot::channel();
            let control = Control {
                command: cmd.kind,
                params: cmd.params.clone(),
                reply,
            };
            match tx.try_send(control) {
                Ok(()) => {
                    self.result(
                        Some(&dev),
                        &cmd.command_id,
                        name,
                        CommandStatus::Accepted,
                        None,
                        received,
                    )
                    .await;
                    waiting.push((dev, rx));
                }
                Err(_) => {
                    self.result(
                        Some(&dev),
                        &cmd.command_id,
                        name,
                        CommandStatus::Failed,
                        Some("device is busy or not running".into()),
                        received,
                    )
                    .await;
                }
            }
        }
        for (dev, rx) in waiting {
            let (status, reason) = match tokio::time::timeout(DEVICE_DEADLINE, rx).await {
                Ok(Ok(Ok(detail))) => (CommandStatus::Completed, Some(detail)),
                Ok(Ok(Err(reason))) => (CommandStatus::Failed, Some(reason)),
                Ok(Err(_)) => (
                    CommandStatus::Failed,
                    Some("device task ended before answering".into()),
                ),
                Err(_) => (
                    CommandStatus::Failed,
                    Some(format!("device did not answer within {DEVICE_DEADLINE:?}")),
                ),
            };
            self.result(Some(&dev), &cmd.command_id, name, status, reason, received)
                .await;
        }
    }
}

/// Notes partition assignment so `/status` can say when commands can arrive.
pub struct CommandContext {
    pub metrics: Arc<Metrics>,
}

impl ClientContext for CommandContext {}

impl ConsumerContext for CommandContext {
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "command topic assigned");
                self.metrics
                    .commands_assigned
                    .store(tpl.count() > 0, Relaxed);
            }
            Rebalance::Revoke(_) => self.metrics.commands_assigned.store(false, Relaxed),
            Rebalance::Error(e) => tracing::warn!(error = %e, "command consumer rebalance error"),
        }
    }
}

/// Consumes the command topic until shutdown.
pub async fn run(
    cfg: &Config,
    handler: Handler,
    shutdown: CancellationToken,
) -> Result<(), CommandError> {
    let consumer: StreamConsumer<CommandContext> =
        crate::kafka::consumer_config(cfg, &cfg.consumer_group())?.create_with_context(
            CommandContext {
                metrics: handler.metrics.clone(),
            },
        )?;
    consumer.subscribe(&[cfg.kafka.topics.commands.as_str()])?;
    tracing::info!(topic = %cfg.kafka.topics.commands, group = %cfg.consumer_group(), "consuming commands");
    loop {
        let msg = tokio::select! {
            m = consumer.recv() => m,
            () = shutdown.cancelled() => break,
        };
        match msg {
            Ok(m) => {
                handler.handle(m.payload().unwrap_or(b"")).await;
                if let Err(e) = consumer.store_offset_from_message(&m) {
                    tracing::warn!(error = %e, "cannot store command offset");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "command consumer error");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    // Commit stored offsets before leaving.
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::sim_sensors;

    fn validator() -> Validator {
        let dev = DeviceConfig::SimulatedSensors(sim_sensors::Config {
            id: "env-1".into(),
            interval: Duration::from_secs(1),
            rounds: None,
            location: None,
            sensors: vec![],
        });
        Validator {
            agent_id: "a1".into(),
            devices: [("env-1".to_string(), dev)].into_iter().collect(),
        }
    }

    fn reason(r: Result<Command, Refusal>) -> String {
        match r {
            Err(Refusal::Rejected { reason, .. }) => reason,
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    #[test]
    fn users_plain_shape_is_accepted_for_all_devices() {
        let c = validator()
            .validate(br#"{"type":"command","command":"pause","timestamp":"2024-01-15T10:30:00.000Z","params":{}}"#)
            .unwrap();
        assert_eq!(c.kind, CommandKind::Pause);
        assert_eq!(c.device, None);
        assert!(c.command_id.starts_with("generated-"));
    }

    #[test]
    fn commands_for_other_agents_are_ignored_not_rejected() {
        let r = validator().validate(br#"{"command":"stop","target":{"agent":"other"}}"#);
        assert_eq!(r, Err(Refusal::NotForUs));
    }

    #[test]
    fn each_malformed_shape_has_a_precise_reason() {
        let v = validator();
        assert!(reason(v.validate(b"not json")).starts_with("schema: not JSON"));
        assert!(reason(v.validate(b"[1]")).contains("JSON object"));
        assert!(reason(v.validate(br#"{"command":1}"#)).contains("command must be a string"));
        assert!(reason(v.validate(br#"{"command":"dance"}"#)).contains("unknown command"));
        assert!(
            reason(v.validate(br#"{"command":"stop","target":{"device":"nope"}}"#))
                .contains("unknown device")
        );
        assert!(reason(v.validate(br#"{"command":"stop","params":[]}"#))
            .contains("params must be an object"));
        assert!(
            reason(v.validate(br#"{"command":"stop","timestamp":"yesterday"}"#))
                .contains("RFC 3339")
        );
        assert!(
            reason(v.validate(br#"{"command":"stop","type":"event"}"#)).contains("type must be")
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = validator().validate(&bytes);
        }
    }
}
