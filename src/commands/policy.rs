//! The `[commands]` config section: who may send what, how fresh a command must be, what
//! each device accepts, and what a device does when the control plane goes away.

use std::collections::BTreeMap;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::sign;
use crate::devices::{CommandKind, DeviceConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The `[commands]` section: who may command which device, and how fresh a command must be.
pub struct CommandsConfig {
    /// Accept commands without a signature. Default: no. The demo sets it; the agent
    /// warns at start while it is on.
    #[serde(default)]
    pub allow_unsigned: Option<bool>,
    /// How far a command's times may be off this machine's clock.
    #[serde(default = "d_skew", with = "crate::time::serde_duration")]
    pub clock_skew: Duration,
    /// Lifetime of a command that gives no `expires_at` or `ttl` (counted from
    /// `issued_at`, its `timestamp`, or else the time Kafka stamped on it).
    #[serde(default = "d_ttl", with = "crate::time::serde_duration")]
    pub default_ttl: Duration,
    /// The longest lifetime a command may ask for (command ids are kept this long).
    #[serde(default = "d_max_ttl", with = "crate::time::serde_duration")]
    pub max_ttl: Duration,
    /// How long a device has to carry out a command (a command may ask for less or more
    /// with `timeout`) before the result is `timeout`.
    #[serde(default = "d_timeout", with = "crate::time::serde_duration")]
    pub timeout: Duration,
    /// Trusted operator keys.
    #[serde(default)]
    pub operators: Vec<Operator>,
    /// Per-device command policy, by device id.
    #[serde(default)]
    pub devices: BTreeMap<String, DevicePolicy>,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            allow_unsigned: None,
            clock_skew: d_skew(),
            default_ttl: d_ttl(),
            max_ttl: d_max_ttl(),
            timeout: d_timeout(),
            operators: Vec::new(),
            devices: BTreeMap::new(),
        }
    }
}

fn d_skew() -> Duration {
    Duration::from_secs(30)
}
fn d_ttl() -> Duration {
    Duration::from_secs(60)
}
fn d_max_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn d_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A person or system allowed to sign commands.
pub struct Operator {
    /// The `issuer` a signed command names.
    pub name: String,
    /// Standard base64 of the raw 32-byte Ed25519 public key (`labgate keygen` prints it).
    pub public_key: String,
    /// What this operator may issue.
    pub commands: Vec<CommandKind>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// What one device accepts and what it does when commands stop arriving.
pub struct DevicePolicy {
    /// Commands this device accepts (default: every command its kind understands).
    #[serde(default)]
    pub allow: Option<Vec<CommandKind>>,
    /// When the command topic has been unreachable this long, go to `safe_state`.
    #[serde(default, with = "crate::time::serde_duration")]
    pub lease: Option<Duration>,
    #[serde(default)]
    /// Where the device goes when its lease runs out.
    pub safe_state: SafeState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// The state a device is put in when its command lease runs out.
pub enum SafeState {
    /// Hold the run where it is (resumable).
    Pause,
    #[default]
    /// End the run (the default: an unattended instrument should not keep going).
    Stop,
}

impl SafeState {
    /// The command that puts a device in this state.
    pub fn command(self) -> CommandKind {
        match self {
            SafeState::Pause => CommandKind::Pause,
            SafeState::Stop => CommandKind::Stop,
        }
    }
}

impl CommandsConfig {
    /// Unsigned commands run only where the config says so in as many words: without
    /// operator keys and without `allow_unsigned = true`, every command is refused
    /// (`unsigned`), so a writable command topic alone cannot stop an instrument.
    pub fn allow_unsigned(&self) -> bool {
        self.allow_unsigned.unwrap_or(false)
    }

    /// Operator name → (key, allowed commands). Call after `validate`.
    pub fn keys(&self) -> BTreeMap<String, (VerifyingKey, Vec<CommandKind>)> {
        self.operators
            .iter()
            .filter_map(|o| {
                let k = sign::parse_public(&o.public_key).ok()?;
                Some((o.name.clone(), (k, o.commands.clone())))
            })
            .collect()
    }

    /// The commands `device` accepts: its kind's, narrowed by its allow-list.
    pub fn allows(&self, device: &DeviceConfig, cmd: CommandKind) -> bool {
        device.accepts(cmd)
            && self
                .devices
                .get(device.id())
                .and_then(|p| p.allow.as_ref())
                .is_none_or(|a| a.contains(&cmd))
    }

    /// Checks values; on error returns (key below `commands`, message).
    pub fn validate(&self, devices: &[DeviceConfig]) -> Result<(), (String, String)> {
        let err = |k: String, m: String| Err((k, m));
        if self.clock_skew > Duration::from_secs(3600) {
            return err("clock_skew".into(), "must be at most 1h".into());
        }
        if self.default_ttl < Duration::from_secs(1) || self.default_ttl > self.max_ttl {
            return err(
                "default_ttl".into(),
                "must be at least 1s and at most max_ttl".into(),
            );
        }
        if self.max_ttl > Duration::from_secs(30 * 24 * 3600) {
            return err("max_ttl".into(), "must be at most 30 days".into());
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(3600) {
            return err("timeout".into(), "must be between 100ms and 1h".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, o) in self.operators.iter().enumerate() {
            if o.name.is_empty() || o.name.len() > 64 {
                return err(
                    format!("operators[{i}].name"),
                    "must be 1-64 characters".into(),
                );
            }
            if !names.insert(o.name.as_str()) {
                return err(
                    format!("operators[{i}].name"),
                    format!("{:?} appears twice", o.name),
                );
            }
            if let Err(e) = sign::parse_public(&o.public_key) {
                return err(format!("operators[{i}].public_key"), e.to_string());
            }
            if o.commands.is_empty() {
                return err(
                    format!("operators[{i}].commands"),
                    "must list at least one command".into(),
                );
            }
        }
        if self.allow_unsigned == Some(false) && self.operators.is_empty() {
            return err(
                "allow_unsigned".into(),
                "is false but no operators are configured: no command could ever be accepted"
                    .into(),
            );
        }
        for (id, p) in &self.devices {
            let Some(d) = devices.iter().find(|d| d.id() == id) else {
                return err(format!("devices.{id}"), "names no configured device".into());
            };
            for c in p.allow.iter().flatten() {
                if !d.accepts(*c) {
                    return err(
                        format!("devices.{id}.allow"),
                        format!("a {} device does not understand {}", d.kind(), c.as_str()),
                    );
                }
            }
            if p.lease.is_some_and(|l| l < Duration::from_secs(1)) {
                return err(format!("devices.{id}.lease"), "must be at least 1s".into());
            }
            if p.lease.is_some() && !d.accepts(p.safe_state.command()) {
                return err(
                    format!("devices.{id}.safe_state"),
                    format!(
                        "a {} device cannot {}",
                        d.kind(),
                        p.safe_state.command().as_str()
                    ),
                );
            }
        }
        Ok(())
    }
}
