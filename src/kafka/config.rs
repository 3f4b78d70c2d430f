//! The `[kafka]` section: brokers, identity, security, topics and producer limits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A config key (relative to `[kafka]`) and what is wrong with it.
pub type Invalid = (String, String);

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    (key.into(), message.into())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The `[kafka]` section.
pub struct KafkaConfig {
    /// Comma-separated host:port list.
    pub bootstrap_servers: String,
    #[serde(default = "default_client_id")]
    /// Names this agent in the broker's logs and quotas.
    pub client_id: String,
    #[serde(default)]
    /// Where each kind of record goes.
    pub topics: Topics,
    /// Consumer group of the command consumer; one per agent so every agent sees every
    /// command. Defaults to `labgate-<agent_id>`.
    #[serde(default)]
    pub consumer_group: Option<String>,
    /// Consume commands at all.
    #[serde(default = "yes")]
    pub commands_enabled: bool,
    /// Where a new consumer group starts: `latest` (default) or `earliest`.
    #[serde(default = "default_offset_reset")]
    pub commands_offset_reset: String,
    #[serde(default)]
    /// Plaintext, TLS, SASL, or SASL over TLS.
    pub security_protocol: SecurityProtocol,
    #[serde(default)]
    /// PLAIN or SCRAM, required with SASL.
    pub sasl_mechanism: Option<SaslMechanism>,
    #[serde(default)]
    /// The SASL user, required with SASL.
    pub sasl_username: Option<String>,
    /// Inline password; prefer `sasl_password_file` or `sasl_password_env`. Never
    /// printed (`***`).
    #[serde(default)]
    pub sasl_password: Option<crate::secret::Secret>,
    #[serde(default)]
    /// A file holding the password (a systemd credential, say).
    pub sasl_password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub sasl_password_env: Option<String>,
    /// Producer compression codec.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Create missing topics at start (brokers such as tansu do not auto-create).
    #[serde(default)]
    pub create_topics: bool,
    #[serde(default = "one_i32")]
    /// Partitions of topics the agent creates.
    pub topic_partitions: i32,
    #[serde(default = "one_i32")]
    /// Replication factor of topics the agent creates.
    pub replication_factor: i32,
    /// Records handed to the producer and not yet acknowledged, at most.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Any other librdkafka property, passed through unchanged (applied last).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_client_id() -> String {
    "labgate".into()
}
fn default_offset_reset() -> String {
    "latest".into()
}
fn default_compression() -> String {
    "lz4".into()
}
fn one_i32() -> i32 {
    1
}
fn yes() -> bool {
    true
}
fn default_in_flight() -> usize {
    8_000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// Topic names, one per kind of record.
pub struct Topics {
    #[serde(default = "t_events")]
    /// Experiment and agent events.
    pub events: String,
    #[serde(default = "t_data")]
    /// Measurement points (`echem_data`).
    pub data: String,
    #[serde(default = "t_sensors")]
    /// Sensor readings.
    pub sensors: String,
    #[serde(default = "t_alerts")]
    /// Threshold and agent alerts.
    pub alerts: String,
    #[serde(default = "t_commands")]
    /// Where commands arrive.
    pub commands: String,
    #[serde(default = "t_results")]
    /// Where command results and audit go.
    pub command_results: String,
    /// Windowed sensor aggregates (`[pipeline.aggregates]`).
    #[serde(default = "t_aggregates")]
    pub aggregates: String,
}

fn t_events() -> String {
    "echem_events".into()
}
fn t_data() -> String {
    "echem_data".into()
}
fn t_sensors() -> String {
    "sensor_events".into()
}
fn t_alerts() -> String {
    "alerts".into()
}
fn t_commands() -> String {
    "echem_commands".into()
}
fn t_results() -> String {
    "echem_command_results".into()
}
fn t_aggregates() -> String {
    "sensor_aggregates".into()
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            events: t_events(),
            data: t_data(),
            sensors: t_sensors(),
            alerts: t_alerts(),
            commands: t_commands(),
            command_results: t_results(),
            aggregates: t_aggregates(),
        }
    }
}

impl Topics {
    /// All topic names, for creation and validation.
    pub fn all(&self) -> [(&'static str, &str); 7] {
        [
            ("events", &self.events),
            ("data", &self.data),
            ("sensors", &self.sensors),
            ("alerts", &self.alerts),
            ("commands", &self.commands),
            ("command_results", &self.command_results),
            ("aggregates", &self.aggregates),
        ]
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// How the Kafka connection is secured.
pub enum SecurityProtocol {
    #[default]
    /// No TLS, no authentication.
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL authentication without TLS.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's spelling.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
/// How SASL authenticates.
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    /// User and password in the clear (use with TLS).
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    /// Salted challenge-response with SHA-256.
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    /// Salted challenge-response with SHA-512.
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's spelling.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl KafkaConfig {
    /// Checks every value the types alone cannot; the key is relative to `[kafka]`.
    pub fn validate(&self) -> Result<(), Invalid> {
        let k = self;
        if k.bootstrap_servers.trim().is_empty()
            || k.bootstrap_servers
                .split(',')
                .any(|s| !s.trim().contains(':'))
        {
            return Err(invalid(
                "bootstrap_servers",
                "must be a comma-separated list of host:port",
            ));
        }
        if k.client_id.is_empty() {
            return Err(invalid("client_id", "must not be empty"));
        }
        for (name, topic) in k.topics.all() {
            if topic.is_empty()
                || topic.len() > 249
                || !topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(invalid(
                    format!("topics.{name}"),
                    "must be 1-249 characters of letters, digits, '.', '_' or '-'",
                ));
            }
        }
        if !matches!(k.commands_offset_reset.as_str(), "latest" | "earliest") {
            return Err(invalid(
                "commands_offset_reset",
                "must be \"latest\" or \"earliest\"",
            ));
        }
        if !matches!(
            k.compression.as_str(),
            "none" | "gzip" | "snappy" | "lz4" | "zstd"
        ) {
            return Err(invalid(
                "compression",
                "must be one of none, gzip, snappy, lz4, zstd",
            ));
        }
        if k.topic_partitions < 1 {
            return Err(invalid("topic_partitions", "must be at least 1"));
        }
        if k.replication_factor < 1 {
            return Err(invalid("replication_factor", "must be at least 1"));
        }
        if k.max_in_flight == 0 || k.max_in_flight > 1_000_000 {
            return Err(invalid("max_in_flight", "must be 1..=1000000"));
        }
        if k.security_protocol.uses_sasl() {
            if k.sasl_mechanism.is_none() {
                return Err(invalid(
                    "sasl_mechanism",
                    "is required when security_protocol uses SASL",
                ));
            }
            if k.sasl_username.as_deref().unwrap_or("").is_empty() {
                return Err(invalid(
                    "sasl_username",
                    "is required when security_protocol uses SASL",
                ));
            }
            let sources = [
                k.sasl_password.is_some(),
                k.sasl_password_file.is_some(),
                k.sasl_password_env.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(invalid(
                    "sasl_password",
                    "exactly one of sasl_password, sasl_password_file, sasl_password_env is required with SASL",
                ));
            }
            k.sasl_password()?;
        }
        for key in k.properties.keys() {
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            {
                return Err(invalid(
                    format!("properties.{key}"),
                    "is not a librdkafka property name",
                ));
            }
        }
        Ok(())
    }

    /// The SASL password from whichever source is configured.
    pub fn sasl_password(&self) -> Result<Option<crate::secret::Secret>, Invalid> {
        crate::secret::Sources {
            key: "sasl_password",
            inline: self.sasl_password.as_ref(),
            file: self.sasl_password_file.as_deref(),
            env: self.sasl_password_env.as_deref(),
        }
        .read()
    }

    /// The consumer group of the command consumer: configured, or `labgate-<agent_id>`.
    pub fn consumer_group(&self, agent_id: &str) -> String {
        self.consumer_group
            .clone()
            .unwrap_or_else(|| format!("labgate-{agent_id}"))
    }
}
