//! Commands: Kafka command topic → validate → replay check → route to device inboxes →
//! two-phase results.
//!
//! Every agent consumes the command topic in its own consumer group, so it sees every
//! command, and acts on those addressed to it (`target.agent` equal to its id, or absent).
//! A command is checked in this order: schema, target, signature (who sent it, and may
//! they), time window (not stale, not from the future), device (exists, allows the
//! command), replay (its id was never executed). Only then is it routed; its id is
//! durable in the replay store before any device sees it, so it runs at most once.
//!
//! Results: `accepted` once routed, then `completed`, `failed` or `timeout` from a task
//! per command and device, so the consumer never waits on hardware and a `stop` reaches
//! its device while earlier work is still running. The offset of a command is stored
//! after its `accepted` (or rejection) is durable: a crash re-delivers the command, and
//! the replay store answers `duplicate` if it had already been routed.

pub mod policy;
pub mod replay;
pub mod sign;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ed25519_dalek::VerifyingKey;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::ClientContext;
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::devices::control::{Outbox, Refused};
use crate::devices::{CommandKind, Control, DeviceConfig};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::record::{object, unix_us, Body, CommandStatus, Draft, AGENT_DEVICE};
use policy::CommandsConfig;
use replay::ReplayStore;

/// Ids are kept this long after their command expired (on top of the clock skew).
const REPLAY_MARGIN: Duration = Duration::from_secs(60);

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
    pub params: Map<String, Value>,
    /// `None` = every device of this agent that accepts the command.
    pub device: Option<String>,
    /// The operator whose signature verified; `None` for an unsigned command.
    pub issuer: Option<String>,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    /// How long the device has to carry it out.
    pub timeout: Duration,
}

/// Why a command is not carried out.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Addressed to another agent: not ours to answer.
    NotForUs,
    /// Ours, but not acceptable: answered with a `rejected` result.
    Rejected(Box<Rejection>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub command_id: String,
    pub command: String,
    pub device: Option<String>,
    pub issuer: Option<String>,
    pub code: Code,
    pub reason: String,
}

/// The class of a rejection, as `reason_code` on the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Schema,
    UnknownDevice,
    NotAllowed,
    Expired,
    NotYetValid,
    BadSignature,
    Unsigned,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Schema => "schema",
            Code::UnknownDevice => "unknown_device",
            Code::NotAllowed => "not_allowed",
            Code::Expired => "expired",
            Code::NotYetValid => "not_yet_valid",
            Code::BadSignature => "bad_signature",
            Code::Unsigned => "unsigned",
        }
    }
}

/// Where a message came from on the command topic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    /// The time Kafka stamped on the message.
    pub kafka_time: Option<SystemTime>,
    /// (partition, offset): names a command that carries no `command_id`, so that a
    /// redelivery of it is still recognised as a replay.
    pub position: Option<(i32, i64)>,
}

const FIELDS: &[&str] = &[
    "type",
    "command",
    "command_id",
    "timestamp",
    "issued_at",
    "expires_at",
    "ttl",
    "timeout",
    "target",
    "params",
    "issuer",
    "signature",
];

/// What the validator knows: this agent, its policy and its operators' keys.
pub struct Validator {
    pub agent_id: String,
    pub policy: CommandsConfig,
    keys: BTreeMap<String, (VerifyingKey, Vec<CommandKind>)>,
}

/// An RFC 3339 time (the rules of [`crate::time::parse_rfc3339`]).
fn parse_time(s: &str) -> Option<SystemTime> {
    crate::time::parse_rfc3339(s)
}

/// A duration: a number of seconds or a humantime string (`30s`, `2m`), at most
/// [`crate::time::MAX_DURATION`].
fn parse_duration(v: &Value) -> Option<Duration> {
    match v {
        Value::Number(n) => n.as_f64().and_then(crate::time::duration_from_secs_f64),
        Value::String(s) => crate::time::parse_duration_text(s),
        _ => None,
    }
}

impl Validator {
    pub fn new(agent_id: String, policy: CommandsConfig) -> Validator {
        let keys = policy.keys();
        Validator {
            agent_id,
            policy,
            keys,
        }
    }

    /// Parses and checks one command message against the devices this agent has. Never
    /// panics on any input.
    pub fn validate(
        &self,
        payload: &[u8],
        meta: &Meta,
        now: SystemTime,
        devices: &BTreeMap<String, DeviceConfig>,
    ) -> Result<Command, Refusal> {
        let mut r = Rejection {
            command_id: String::new(),
            command: String::new(),
            device: None,
            issuer: None,
            code: Code::Schema,
            reason: String::new(),
        };
        let fail = |r: &Rejection, code: Code, reason: String| {
            Refusal::Rejected(Box::new(Rejection {
                code,
                reason: format!("{}: {reason}", code.as_str()),
                ..r.clone()
            }))
        };
        let v: Value = serde_json::from_slice(payload)
            .map_err(|e| fail(&r, Code::Schema, format!("not JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(fail(
                &r,
                Code::Schema,
                "a command must be a JSON object".into(),
            ));
        };
        match obj.get("command_id") {
            None => {}
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => {
                r.command_id = s.clone();
            }
            Some(_) => {
                return Err(fail(
                    &r,
                    Code::Schema,
                    "command_id must be a non-empty string of at most 128 characters".into(),
                ))
            }
        }
        match obj.get("command") {
            Some(Value::String(s)) if s.len() <= 64 => r.command = s.clone(),
            Some(_) => {
                return Err(fail(
                    &r,
                    Code::Schema,
                    "command must be a string of at most 64 characters".into(),
                ))
            }
            None => return Err(fail(&r, Code::Schema, "command is missing".into())),
        }
        // Target first: a command for another agent is not ours to reject.
        let (agent, device) = match obj.get("target") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Object(t)) => {
                let field = |k: &str| match t.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(format!("target.{k} must be a string")),
                };
                let agent = field("agent").map_err(|e| fail(&r, Code::Schema, e))?;
                let device = field("device").map_err(|e| fail(&r, Code::Schema, e))?;
                if let Some(k) = t.keys().find(|k| !matches!(k.as_str(), "agent" | "device")) {
                    return Err(fail(&r, Code::Schema, format!("unknown field target.{k}")));
                }
                (agent, device)
            }
            Some(_) => return Err(fail(&r, Code::Schema, "target must be an object".into())),
        };
        if agent.as_deref().is_some_and(|a| a != self.agent_id) {
            return Err(Refusal::NotForUs);
        }
        r.device = device.clone();
        if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(fail(&r, Code::Schema, format!("unknown field {k:?}")));
        }
        if obj.get("type").is_some_and(|t| t != "command") {
            return Err(fail(&r, Code::Schema, "type must be \"command\"".into()));
        }
        let time = |k: &str| match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => parse_time(s)
                .map(Some)
                .ok_or_else(|| format!("{k} must be an RFC 3339 UTC time")),
            Some(_) => Err(format!("{k} must be an RFC 3339 UTC time")),
        };
        let timestamp = time("timestamp").map_err(|e| fail(&r, Code::Schema, e))?;
        let issued_at = time("issued_at").map_err(|e| fail(&r, Code::Schema, e))?;
        let expires_at = time("expires_at").map_err(|e| fail(&r, Code::Schema, e))?;
        let dur = |k: &str| match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => parse_duration(v)
                .map(Some)
                .ok_or_else(|| format!("{k} must be seconds or a duration such as \"30s\"")),
        };
        let ttl = dur("ttl").map_err(|e| fail(&r, Code::Schema, e))?;
        let timeout = dur("timeout").map_err(|e| fail(&r, Code::Schema, e))?;
        if timeout.is_some_and(|t| t.is_zero() || t > Duration::from_secs(3600)) {
            return Err(fail(
                &r,
                Code::Schema,
                "timeout must be within (0, 1h]".into(),
            ));
        }
        if expires_at.is_some() && ttl.is_some() {
            return Err(fail(
                &r,
                Code::Schema,
                "give expires_at or ttl, not both".into(),
            ));
        }
        let params = match obj.get("params") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return Err(fail(&r, Code::Schema, "params must be an object".into())),
        };
        let issuer = match obj.get("issuer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 => Some(s.clone()),
            Some(_) => {
                return Err(fail(
                    &r,
                    Code::Schema,
                    "issuer must be a string of 1-64 characters".into(),
                ))
            }
        };
        r.issuer = issuer.clone();
        let Some(kind) = CommandKind::parse(&r.command) else {
            return Err(fail(
                &r,
                Code::Schema,
                format!(
                    "unknown command {:?} (known: {})",
                    r.command,
                    CommandKind::NAMES
                ),
            ));
        };

        // Who sent it, and may they?
        let signed_by = match obj.get("signature") {
            None | Some(Value::Null) => {
                if !self.policy.allow_unsigned() {
                    return Err(fail(
                        &r,
                        Code::Unsigned,
                        "this agent only accepts signed commands".into(),
                    ));
                }
                None
            }
            Some(Value::String(sig)) => {
                let Some(name) = &issuer else {
                    return Err(fail(
                        &r,
                        Code::Schema,
                        "a signed command needs an issuer".into(),
                    ));
                };
                let Some((key, allowed)) = self.keys.get(name) else {
                    return Err(fail(
                        &r,
                        Code::BadSignature,
                        format!("unknown issuer {name:?}"),
                    ));
                };
                match sign::verify(&obj, sig, key) {
                    Ok(()) => {}
                    Err(sign::SignatureError::Encoding(e)) => {
                        return Err(fail(&r, Code::BadSignature, e))
                    }
                    Err(sign::SignatureError::Mismatch) => {
                        return Err(fail(
                            &r,
                            Code::BadSignature,
                            format!("does not verify with {name}'s key"),
                        ))
                    }
                }
                if uuid::Uuid::parse_str(&r.command_id).is_err() {
                    return Err(fail(
                        &r,
                        Code::Schema,
                        "a signed command needs a UUID command_id".into(),
                    ));
                }
                if issued_at.is_none() || (expires_at.is_none() && ttl.is_none()) {
                    return Err(fail(
                        &r,
                        Code::Schema,
                        "a signed command needs issued_at and expires_at (or ttl)".into(),
                    ));
                }
                if !allowed.contains(&kind) {
                    return Err(fail(
                        &r,
                        Code::NotAllowed,
                        format!("{name} may not issue {}", kind.as_str()),
                    ));
                }
                Some(name.clone())
            }
            Some(_) => return Err(fail(&r, Code::Schema, "signature must be a string".into())),
        };

        // Is it fresh?
        let issued = issued_at.or(timestamp).or(meta.kafka_time).unwrap_or(now);
        // Every sum below is checked: times and durations come from the sender.
        let too_far = || {
            fail(
                &r,
                Code::Schema,
                "the command's lifetime ends after 9999".into(),
            )
        };
        let expires = match (expires_at, ttl) {
            (Some(e), _) => e,
            (None, Some(t)) => crate::time::add(issued, t).ok_or_else(too_far)?,
            (None, None) => {
                crate::time::add(issued, self.policy.default_ttl).ok_or_else(too_far)?
            }
        };
        let life = expires
            .duration_since(issued)
            .map_err(|_| fail(&r, Code::Schema, "expires_at is before issued_at".into()))?;
        if life > self.policy.max_ttl {
            return Err(fail(
                &r,
                Code::Schema,
                format!(
                    "lifetime {} exceeds commands.max_ttl {}",
                    humantime::format_duration(life),
                    humantime::format_duration(self.policy.max_ttl)
                ),
            ));
        }
        let skew = self.policy.clock_skew;
        if now.checked_add(skew).is_none_or(|latest| issued > latest) {
            return Err(fail(
                &r,
                Code::NotYetValid,
                format!(
                    "issued {} ahead of this agent's clock (tolerance {})",
                    ahead(issued, now),
                    humantime::format_duration(skew)
                ),
            ));
        }
        if expires.checked_add(skew).is_some_and(|last| now > last) {
            return Err(fail(
                &r,
                Code::Expired,
                format!(
                    "expired {} ago (tolerance {})",
                    ahead(now, expires),
                    humantime::format_duration(skew)
                ),
            ));
        }

        // Which device, and does it take this command?
        if let Some(d) = &device {
            let Some(cfg) = devices.get(d) else {
                return Err(fail(&r, Code::UnknownDevice, format!("no device {d:?}")));
            };
            if !self.policy.allows(cfg, kind) {
                return Err(fail(
                    &r,
                    Code::NotAllowed,
                    format!(
                        "device {d} ({}) does not accept {}",
                        cfg.kind(),
                        kind.as_str()
                    ),
                ));
            }
        } else if !devices.values().any(|c| self.policy.allows(c, kind)) {
            return Err(fail(
                &r,
                Code::NotAllowed,
                format!("no device of this agent accepts {}", kind.as_str()),
            ));
        }
        let command_id = match (r.command_id.is_empty(), meta.position) {
            (false, _) => r.command_id,
            (true, Some((p, o))) => format!("kafka-{p}-{o}"),
            (true, None) => format!("generated-{}", uuid::Uuid::new_v4()),
        };
        Ok(Command {
            command_id,
            kind,
            params,
            device,
            issuer: signed_by,
            issued_at: issued,
            expires_at: expires,
            timeout: timeout.unwrap_or(self.policy.timeout),
        })
    }
}

/// How far `a` is after `b`, rounded to milliseconds, for messages.
fn ahead(a: SystemTime, b: SystemTime) -> String {
    let d = a.duration_since(b).unwrap_or_default();
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// The devices commands can reach: their configs (for validation) and inboxes.
#[derive(Default)]
pub struct Routes {
    pub configs: BTreeMap<String, DeviceConfig>,
    pub outboxes: BTreeMap<String, Outbox>,
}

/// Shared so that devices can be added and removed while the agent runs.
#[derive(Clone, Default)]
pub struct Router(Arc<RwLock<Routes>>);

impl Router {
    pub fn insert(&self, cfg: DeviceConfig, outbox: Outbox) {
        let mut r = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let id = cfg.id().to_string();
        r.outboxes.insert(id.clone(), outbox);
        r.configs.insert(id, cfg);
    }

    pub fn remove(&self, id: &str) {
        let mut r = self.0.write().unwrap_or_else(PoisonError::into_inner);
        r.outboxes.remove(id);
        r.configs.remove(id);
    }

    pub fn read<T>(&self, f: impl FnOnce(&Routes) -> T) -> T {
        f(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }
}

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

/// Validates, routes and reports commands.
pub struct Handler {
    pub validator: Validator,
    pub router: Router,
    pub ingest: Ingest,
    pub metrics: Arc<Metrics>,
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

/// Assigns the command topic's partitions with concrete positions, so `/status` can say
/// when commands can arrive.
///
/// A new consumer group at `latest` would otherwise resolve its position just after
/// assignment, and a command produced in that instant would never be seen. So partitions
/// without a committed offset are assigned at their current end (or start, for
/// `earliest`) explicitly, before `commands_assigned` turns true.
pub struct CommandContext {
    pub metrics: Arc<Metrics>,
    pub earliest: bool,
}

impl ClientContext for CommandContext {}

impl ConsumerContext for CommandContext {
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr as E;
        match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let timeout = Duration::from_secs(5);
                let committed = consumer.committed_offsets(tpl.clone(), timeout);
                let mut fixed = tpl.clone();
                for p in tpl.elements() {
                    let known = committed.as_ref().ok().and_then(|c| {
                        c.find_partition(p.topic(), p.partition())
                            .map(|e| e.offset())
                    });
                    if matches!(known, Some(rdkafka::Offset::Offset(_))) {
                        continue;
                    }
                    let start = match consumer.fetch_watermarks(p.topic(), p.partition(), timeout) {
                        Ok((low, high)) => {
                            rdkafka::Offset::Offset(if self.earliest { low } else { high })
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the command topic's offsets; librdkafka's reset policy decides");
                            continue;
                        }
                    };
                    let _ = fixed.set_partition_offset(p.topic(), p.partition(), start);
                }
                match consumer.assign(&fixed) {
                    Ok(()) => {
                        tracing::info!(partitions = fixed.count(), "command topic assigned");
                        self.metrics
                            .commands_assigned
                            .store(fixed.count() > 0, Relaxed);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot assign the command topic"),
                }
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.metrics.commands_assigned.store(false, Relaxed);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "cannot unassign the command topic");
                }
            }
            other => {
                tracing::warn!(error = ?other, "command consumer rebalance error");
                self.metrics.commands_assigned.store(false, Relaxed);
                let _ = consumer.unassign();
            }
        }
    }
}

/// Milliseconds since `epoch` at the last moment the command topic was known reachable.
struct Contact {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Contact {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }
    fn silent_for(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Relaxed)))
    }
}

/// Consumes the command topic until shutdown.
pub async fn run(
    cfg: &Config,
    handler: Handler,
    shutdown: CancellationToken,
) -> Result<(), CommandError> {
    let handler = Arc::new(handler);
    let consumer: Arc<StreamConsumer<CommandContext>> = Arc::new(
        crate::kafka::consumer_config(cfg, &cfg.consumer_group())?.create_with_context(
            CommandContext {
                metrics: handler.metrics.clone(),
                earliest: cfg.kafka.commands_offset_reset == "earliest",
            },
        )?,
    );
    consumer.subscribe(&[cfg.kafka.topics.commands.as_str()])?;
    tracing::info!(topic = %cfg.kafka.topics.commands, group = %cfg.consumer_group(), "consuming commands");

    match handler.replay.purge(SystemTime::now()) {
        Ok(n) => tracing::debug!(purged = n, kept = handler.replay.len(), "replay store"),
        Err(e) => tracing::warn!(error = %e, "cannot purge the replay store"),
    }
    let contact = Arc::new(Contact {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let lease_stop = shutdown.child_token();
    let lease_task = tokio::spawn(lease::watch(
        cfg.commands.clone(),
        cfg.kafka.topics.commands.clone(),
        consumer.clone(),
        contact.clone(),
        handler.clone(),
        lease_stop.clone(),
    ));
    let mut purge_at = Instant::now() + Duration::from_secs(60);
    let mut beat = tokio::time::interval(crate::heartbeat::BEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        handler.metrics.beats.commands.beat();
        let msg = tokio::select! {
            m = consumer.recv() => m,
            _ = beat.tick() => continue,
            () = shutdown.cancelled() => break,
        };
        match msg {
            Ok(m) => {
                contact.touch();
                let meta = Meta {
                    kafka_time: m
                        .timestamp()
                        .to_millis()
                        .and_then(|ms| u64::try_from(ms).ok())
                        .and_then(crate::time::from_unix_ms),
                    position: Some((m.partition(), m.offset())),
                };
                handler.handle(m.payload().unwrap_or(b""), meta).await;
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
        if Instant::now() >= purge_at {
            purge_at = Instant::now() + Duration::from_secs(60);
            if let Err(e) = handler.replay.purge(SystemTime::now()) {
                tracing::warn!(error = %e, "cannot purge the replay store");
            }
        }
    }
    lease_stop.cancel();
    let _ = lease_task.await;
    // Device answers still outstanding end when the devices stop (they are stopped
    // first at shutdown), so this wait is short.
    handler.waits.close();
    handler.waits.wait().await;
    // Commit stored offsets before leaving.
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

mod lease;

#[cfg(test)]
mod tests;
