//! Validation: one command message, checked against the agent's policy and devices, in
//! the order the module docs of `commands` give; every refusal has a reason code.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ed25519_dalek::VerifyingKey;
use serde_json::{Map, Value};

use super::policy::CommandsConfig;
use super::sign;
use crate::devices::{CommandKind, DeviceConfig};

/// A command that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The id results and the replay store key on.
    pub command_id: String,
    /// What to do.
    pub kind: CommandKind,
    /// Extra parameters, passed to the device.
    pub params: Map<String, Value>,
    /// `None` = every device of this agent that accepts the command.
    pub device: Option<String>,
    /// The operator whose signature verified; `None` for an unsigned command.
    pub issuer: Option<String>,
    /// When the command was issued (or first seen), for staleness.
    pub issued_at: SystemTime,
    /// After this the command is refused as expired.
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
/// A refused command: what was refused and why, for the `rejected` result.
pub struct Rejection {
    /// The command's id, or a placeholder when it had none.
    pub command_id: String,
    /// The command as written.
    pub command: String,
    /// The device it named, if any.
    pub device: Option<String>,
    /// The issuer it named, if any.
    pub issuer: Option<String>,
    /// The machine-readable reason.
    pub code: Code,
    /// The human-readable reason.
    pub reason: String,
}

/// The class of a rejection, as `reason_code` on the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Not a command message (bad JSON, missing or mistyped field).
    Schema,
    /// Names a device this agent does not have.
    UnknownDevice,
    /// The device or the issuer may not do this.
    NotAllowed,
    /// Past its expiry.
    Expired,
    /// Issued in the future beyond the allowed clock skew.
    NotYetValid,
    /// Signed, but the signature does not verify.
    BadSignature,
    /// Not signed, and unsigned commands are not allowed.
    Unsigned,
}

impl Code {
    /// The code as it appears in results.
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

/// A command's fields after the shape checks, with what a rejection would say about it
/// so far.
struct Shape {
    obj: Map<String, Value>,
    r: Rejection,
    device: Option<String>,
    timestamp: Option<SystemTime>,
    issued_at: Option<SystemTime>,
    expires_at: Option<SystemTime>,
    ttl: Option<Duration>,
    timeout: Option<Duration>,
    params: Map<String, Value>,
    issuer: Option<String>,
    kind: CommandKind,
}

impl Rejection {
    /// This rejection with its class and reason (prefixed by the class).
    fn refuse(&self, code: Code, reason: String) -> Refusal {
        Refusal::Rejected(Box::new(Rejection {
            code,
            reason: format!("{}: {reason}", code.as_str()),
            ..self.clone()
        }))
    }
}

/// What the validator knows: this agent, its policy and its operators' keys.
pub struct Validator {
    /// Commands must name this agent (or none).
    pub agent_id: String,
    /// Operators, allow-lists and lifetimes.
    pub policy: CommandsConfig,
    keys: BTreeMap<String, (VerifyingKey, Vec<CommandKind>)>,
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
    /// A validator for this agent under this policy.
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
        let s = self.shape(payload)?;
        let signed_by = self.signer(&s)?;
        let (issued, expires) = self.lifetime(&s, meta, now)?;
        self.reaches(&s, devices)?;
        let Shape {
            r,
            params,
            device,
            timeout,
            kind,
            ..
        } = s;
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

    /// The first stage: the message's shape (JSON object, known fields, types, times
    /// and durations within range) and whether it is addressed to this agent.
    fn shape(&self, payload: &[u8]) -> Result<Shape, Refusal> {
        let mut r = Rejection {
            command_id: String::new(),
            command: String::new(),
            device: None,
            issuer: None,
            code: Code::Schema,
            reason: String::new(),
        };
        let fail = |r: &Rejection, code: Code, reason: String| r.refuse(code, reason);
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
            Some(Value::String(s)) => crate::time::parse_rfc3339(s)
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
        if kind == CommandKind::Start {
            // A run's name and description are checked here, before anything runs:
            // an id that would break keys or topics is refused with its reason.
            if let Err(e) = crate::runs::check_run_fields(&params) {
                return Err(fail(&r, Code::Schema, format!("params.{e}")));
            }
        }
        Ok(Shape {
            obj,
            r,
            device,
            timestamp,
            issued_at,
            expires_at,
            ttl,
            timeout,
            params,
            issuer,
            kind,
        })
    }

    /// The second stage: who signed it, and may they issue it (or may it come unsigned)?
    fn signer(&self, s: &Shape) -> Result<Option<String>, Refusal> {
        let fail = |r: &Rejection, code: Code, reason: String| r.refuse(code, reason);
        let Shape {
            obj,
            r,
            issued_at,
            expires_at,
            ttl,
            issuer,
            kind,
            ..
        } = s;
        let kind = *kind;
        // Who sent it, and may they?
        let signed_by = match obj.get("signature") {
            None | Some(Value::Null) => {
                if !self.policy.allow_unsigned() {
                    return Err(fail(
                        r,
                        Code::Unsigned,
                        "this agent only accepts signed commands".into(),
                    ));
                }
                None
            }
            Some(Value::String(sig)) => {
                let Some(name) = issuer else {
                    return Err(fail(
                        r,
                        Code::Schema,
                        "a signed command needs an issuer".into(),
                    ));
                };
                let Some((key, allowed)) = self.keys.get(name) else {
                    return Err(fail(
                        r,
                        Code::BadSignature,
                        format!("unknown issuer {name:?}"),
                    ));
                };
                match sign::verify(obj, sig, key) {
                    Ok(()) => {}
                    Err(sign::SignatureError::Encoding(e)) => {
                        return Err(fail(r, Code::BadSignature, e))
                    }
                    Err(sign::SignatureError::Mismatch) => {
                        return Err(fail(
                            r,
                            Code::BadSignature,
                            format!("does not verify with {name}'s key"),
                        ))
                    }
                }
                if uuid::Uuid::parse_str(&r.command_id).is_err() {
                    return Err(fail(
                        r,
                        Code::Schema,
                        "a signed command needs a UUID command_id".into(),
                    ));
                }
                if issued_at.is_none() || (expires_at.is_none() && ttl.is_none()) {
                    return Err(fail(
                        r,
                        Code::Schema,
                        "a signed command needs issued_at and expires_at (or ttl)".into(),
                    ));
                }
                if !allowed.contains(&kind) {
                    return Err(fail(
                        r,
                        Code::NotAllowed,
                        format!("{name} may not issue {}", kind.as_str()),
                    ));
                }
                Some(name.clone())
            }
            Some(_) => return Err(fail(r, Code::Schema, "signature must be a string".into())),
        };
        Ok(signed_by)
    }

    /// The third stage: when it was issued and expires (checked sums), and whether that
    /// window holds now, give or take `commands.clock_skew`.
    fn lifetime(
        &self,
        s: &Shape,
        meta: &Meta,
        now: SystemTime,
    ) -> Result<(SystemTime, SystemTime), Refusal> {
        let fail = |r: &Rejection, code: Code, reason: String| r.refuse(code, reason);
        let Shape {
            r,
            timestamp,
            issued_at,
            expires_at,
            ttl,
            ..
        } = s;
        // Is it fresh?
        let issued = issued_at.or(*timestamp).or(meta.kafka_time).unwrap_or(now);
        // Every sum below is checked: times and durations come from the sender.
        let too_far = || {
            fail(
                r,
                Code::Schema,
                "the command's lifetime ends after 9999".into(),
            )
        };
        let expires = match (*expires_at, *ttl) {
            (Some(e), _) => e,
            (None, Some(t)) => crate::time::add(issued, t).ok_or_else(too_far)?,
            (None, None) => {
                crate::time::add(issued, self.policy.default_ttl).ok_or_else(too_far)?
            }
        };
        let life = expires
            .duration_since(issued)
            .map_err(|_| fail(r, Code::Schema, "expires_at is before issued_at".into()))?;
        if life > self.policy.max_ttl {
            return Err(fail(
                r,
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
                r,
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
                r,
                Code::Expired,
                format!(
                    "expired {} ago (tolerance {})",
                    ahead(now, expires),
                    humantime::format_duration(skew)
                ),
            ));
        }
        Ok((issued, expires))
    }

    /// The fourth stage: the device exists and takes this command (or, with no device
    /// named, one of this agent's devices does).
    fn reaches(&self, s: &Shape, devices: &BTreeMap<String, DeviceConfig>) -> Result<(), Refusal> {
        let fail = |r: &Rejection, code: Code, reason: String| r.refuse(code, reason);
        let Shape {
            r, device, kind, ..
        } = s;
        let kind = *kind;
        // Which device, and does it take this command?
        if let Some(d) = device {
            let Some(cfg) = devices.get(d) else {
                return Err(fail(r, Code::UnknownDevice, format!("no device {d:?}")));
            };
            if !self.policy.allows(cfg, kind) {
                return Err(fail(
                    r,
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
                r,
                Code::NotAllowed,
                format!("no device of this agent accepts {}", kind.as_str()),
            ));
        }
        Ok(())
    }
}

/// How far `a` is after `b`, rounded to milliseconds, for messages.
fn ahead(a: SystemTime, b: SystemTime) -> String {
    let d = a.duration_since(b).unwrap_or_default();
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}
