//! Handling: validate, claim the id in the replay store, route, and report every
//! status (accepted, completed, failed, timeout, rejected, duplicate) with its audit.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::replay::ReplayStore;
use super::{Command, Meta, Refusal, Router, Validator, REPLAY_MARGIN};
use crate::devices::control::{Outbox, Refused};
use crate::devices::Control;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::record::{object, unix_us, Body, CommandStatus, Draft, AGENT_DEVICE};

/// One result to emit.
struct Outcome<'a> {
    command_id: &'a str,
    command: &'a str,
    device: Option<&'a str>,
    issuer: Option<&'a str>,
    issued_at: Option<SystemTime>,
    status: CommandStatus,
    code: Option<&'static str>,
    reason: Option<String>,
    received: SystemTime,
}

fn base<'a>(
    cmd: &'a Command,
    device: Option<&'a str>,
    status: CommandStatus,
    code: Option<&'static str>,
    reason: Option<String>,
    received: SystemTime,
) -> Outcome<'a> {
    Outcome {
        command_id: &cmd.command_id,
        command: cmd.kind.as_str(),
        device,
        issuer: cmd.issuer.as_deref(),
        issued_at: Some(cmd.issued_at),
        status,
        code,
        reason,
        received,
    }
}

/// Validates, routes and reports commands.
pub struct Handler {
    /// Checks shape, signature, lifetime and reach of each command.
    pub validator: Validator,
    /// Which device a command goes to, and its control inbox.
    pub router: Router,
    /// Where results and audit events are written (durably, before the offset is committed).
    pub ingest: Ingest,
    /// Command counters by outcome.
    pub metrics: Arc<Metrics>,
    /// Command ids already seen, so a replayed command is answered `duplicate`.
    pub replay: ReplayStore,
    /// Per-command device waits, finished before the handler goes away.
    pub waits: TaskTracker,
}

impl Handler {
    /// Emits a result durably, with its audit log line and audit event.
    async fn result(&self, o: Outcome<'_>) {
        let counter = match o.status {
            CommandStatus::Accepted => &self.metrics.commands_accepted,
            CommandStatus::Completed => &self.metrics.commands_completed,
            CommandStatus::Failed => &self.metrics.commands_failed,
            CommandStatus::Rejected => &self.metrics.commands_rejected,
            CommandStatus::Duplicate => &self.metrics.commands_duplicate,
            CommandStatus::Timeout => &self.metrics.commands_timeout,
        };
        counter.fetch_add(1, Relaxed);
        let now = SystemTime::now();
        self.metrics.set_last_command(crate::metrics::LastCommand {
            command_id: o.command_id.to_string(),
            command: o.command.to_string(),
            device_id: o.device.map(str::to_string),
            status: o.status.as_str(),
            at_ms: crate::record::unix_ms(now),
        });
        tracing::info!(
            target: "labgate::audit",
            command_id = o.command_id,
            command = o.command,
            device = o.device.unwrap_or("-"),
            issuer = o.issuer.unwrap_or("-"),
            status = o.status.as_str(),
            reason_code = o.code.unwrap_or(""),
            reason = o.reason.as_deref().unwrap_or(""),
            elapsed_ms = now.duration_since(o.received).unwrap_or_default().as_millis() as u64,
            "command decision"
        );
        // Decisions (not progress) also go to the events topic as an audit trail.
        if matches!(
            o.status,
            CommandStatus::Accepted | CommandStatus::Rejected | CommandStatus::Duplicate
        ) {
            let mut data = object([
                ("command_id", o.command_id.into()),
                ("command", o.command.into()),
                ("decision", o.status.as_str().into()),
            ]);
            let mut opt = |k: &str, v: Option<&str>| {
                if let Some(v) = v {
                    data.insert(k.into(), v.into());
                }
            };
            opt("device_id", o.device);
            opt("issuer", o.issuer);
            opt("reason_code", o.code);
            opt("reason", o.reason.as_deref());
            self.ingest.event("command_audit", data).await;
        }
        let draft = Draft::new(
            o.device.unwrap_or(AGENT_DEVICE),
            Body::CommandResult {
                command_id: o.command_id.to_string(),
                command: o.command.to_string(),
                status: o.status,
                reason: o.reason,
                reason_code: o.code.map(str::to_string),
                target_device: o.device.map(str::to_string),
                issuer: o.issuer.map(str::to_string),
                issued_at_us: o.issued_at.map(unix_us),
                received_at_us: unix_us(o.received),
                status_at_us: unix_us(now),
            },
        );
        if let Err(e) = self.ingest.send_durable(draft).await {
            tracing::error!(command_id = o.command_id, error = %e, "command result not buffered");
        }
    }

    /// A command from an operator at the instrument (the status page's buttons): no
    /// signature, the local token stands for it, but the same device allow-list, replay
    /// store, inbox, results and audit as a command from Kafka. The issuer is
    /// `local:<operator>`. Returns the command's id.
    pub async fn handle_local(
        self: &Arc<Self>,
        operator: &str,
        allowed: &[crate::devices::CommandKind],
        device: &str,
        kind: crate::devices::CommandKind,
    ) -> String {
        let received = SystemTime::now();
        let issuer = format!("local:{operator}");
        let command_id = format!("local-{}", uuid::Uuid::new_v4());
        let refuse = |code: super::Code, reason: String| (code, reason);
        let refusal = if !allowed.contains(&kind) {
            Some(refuse(
                super::Code::NotAllowed,
                format!("operator {operator} may not {}", kind.as_str()),
            ))
        } else {
            self.router.read(|r| match r.configs.get(device) {
                None => Some(refuse(
                    super::Code::UnknownDevice,
                    format!("no device {device:?}"),
                )),
                Some(c) if !self.validator.policy.allows(c, kind) => Some(refuse(
                    super::Code::NotAllowed,
                    format!(
                        "device {device} ({}) does not accept {}",
                        c.kind(),
                        kind.as_str()
                    ),
                )),
                Some(_) => None,
            })
        };
        if let Some((code, reason)) = refusal {
            self.result(Outcome {
                command_id: &command_id,
                command: kind.as_str(),
                device: Some(device),
                issuer: Some(&issuer),
                issued_at: Some(received),
                status: CommandStatus::Rejected,
                code: Some(code.as_str()),
                reason: Some(format!("{}: {reason}", code.as_str())),
                received,
            })
            .await;
            return command_id;
        }
        let ttl = self
            .validator
            .policy
            .max_ttl
            .min(std::time::Duration::from_secs(60));
        let cmd = Command {
            command_id: command_id.clone(),
            kind,
            params: Default::default(),
            device: Some(device.to_string()),
            issuer: Some(issuer),
            issued_at: received,
            expires_at: crate::time::add(received, ttl).unwrap_or(received),
            timeout: self.validator.policy.timeout,
        };
        self.execute(cmd, received).await;
        command_id
    }

    /// Handles one command message: decision, routing and `accepted` results are done
    /// (and durable) when this returns; device outcomes follow from their own tasks.
    pub async fn handle(self: &Arc<Self>, payload: &[u8], meta: Meta) {
        let received = SystemTime::now();
        let decision = self.router.read(|r| {
            self.validator
                .validate(payload, &meta, received, &r.configs)
        });
        let cmd = match decision {
            Ok(c) => c,
            Err(Refusal::NotForUs) => {
                self.metrics.commands_ignored.fetch_add(1, Relaxed);
                tracing::debug!(target: "labgate::audit", status = "ignored", "command for another agent");
                return;
            }
            Err(Refusal::Rejected(r)) => {
                // A command we could not even read an id from still gets a result a
                // consumer can key and count.
                let id = if r.command_id.is_empty() {
                    format!("unidentified-{}", uuid::Uuid::new_v4())
                } else {
                    r.command_id.clone()
                };
                self.result(Outcome {
                    command_id: &id,
                    command: &r.command,
                    device: r.device.as_deref(),
                    issuer: r.issuer.as_deref(),
                    issued_at: None,
                    status: CommandStatus::Rejected,
                    code: Some(r.code.as_str()),
                    reason: Some(r.reason),
                    received,
                })
                .await;
                return;
            }
        };
        self.execute(cmd, received).await;
    }

    /// A command that passed validation: claim its id, route it, report every status.
    async fn execute(self: &Arc<Self>, cmd: Command, received: SystemTime) {
        let keep_until = cmd
            .expires_at
            .checked_add(self.validator.policy.clock_skew)
            .and_then(|t| t.checked_add(REPLAY_MARGIN))
            .unwrap_or(cmd.expires_at);
        match self
            .replay
            .claim(&cmd.command_id, keep_until, received)
            .await
        {
            Ok(None) => {}
            Ok(Some(seen)) => {
                let first = crate::time::from_unix_ms(seen.first_seen_us / 1000)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let reason = format!(
                    "command_id already executed (first received {}); not run again",
                    humantime::format_rfc3339_millis(first)
                );
                self.result(base(
                    &cmd,
                    cmd.device.as_deref(),
                    CommandStatus::Duplicate,
                    Some("duplicate"),
                    Some(reason),
                    received,
                ))
                .await;
                return;
            }
            Err(e) => {
                // Without a durable record the command could run twice: do not run it.
                let reason = format!("not executed: {e}");
                self.result(base(
                    &cmd,
                    cmd.device.as_deref(),
                    CommandStatus::Failed,
                    None,
                    Some(reason),
                    received,
                ))
                .await;
                return;
            }
        }
        let targets: Vec<(String, Option<Outbox>)> = self.router.read(|r| {
            let ids: Vec<String> = match &cmd.device {
                Some(d) => vec![d.clone()],
                None => r
                    .configs
                    .iter()
                    .filter(|(_, c)| self.validator.policy.allows(c, cmd.kind))
                    .map(|(id, _)| id.clone())
                    .collect(),
            };
            ids.into_iter()
                .map(|id| {
                    let o = r.outboxes.get(&id).cloned();
                    (id, o)
                })
                .collect()
        });
        for (dev, outbox) in targets {
            let (reply, rx) = oneshot::channel();
            let control = Control {
                command: cmd.kind,
                params: cmd.params.clone(),
                command_id: cmd.command_id.clone(),
                issuer: cmd.issuer.clone(),
                reply,
            };
            let refused = match outbox {
                None => Some("device is not running".to_string()),
                Some(o) => match o.send(control) {
                    Ok(()) => None,
                    Err(Refused::Busy(_)) => Some(format!(
                        "device is busy: {} commands already waiting",
                        crate::devices::control::QUEUE_LIMIT
                    )),
                    Err(Refused::Closed(_)) => Some("device is not running".to_string()),
                },
            };
            if let Some(reason) = refused {
                self.result(base(
                    &cmd,
                    Some(&dev),
                    CommandStatus::Failed,
                    None,
                    Some(reason),
                    received,
                ))
                .await;
                continue;
            }
            self.result(base(
                &cmd,
                Some(&dev),
                CommandStatus::Accepted,
                None,
                None,
                received,
            ))
            .await;
            let me = self.clone();
            let cmd = cmd.clone();
            self.waits.spawn(async move {
                let (status, reason) = match tokio::time::timeout(cmd.timeout, rx).await {
                    Ok(Ok(Ok(detail))) => (CommandStatus::Completed, Some(detail)),
                    Ok(Ok(Err(reason))) => (CommandStatus::Failed, Some(reason)),
                    Ok(Err(_)) => (
                        CommandStatus::Failed,
                        Some("device task ended before answering".into()),
                    ),
                    Err(_) => (
                        CommandStatus::Timeout,
                        Some(format!(
                            "no answer from the device within {} (a command it had not started will not run)",
                            humantime::format_duration(cmd.timeout)
                        )),
                    ),
                };
                me.result(Outcome {
                    command_id: &cmd.command_id,
                    command: cmd.kind.as_str(),
                    device: Some(&dev),
                    issuer: cmd.issuer.as_deref(),
                    issued_at: Some(cmd.issued_at),
                    status,
                    code: None,
                    reason,
                    received,
                })
                .await;
            });
        }
    }
}
