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
    /// host:port list: a comma-separated string or a TOML list; kept comma-separated.
    #[serde(deserialize_with = "string_or_list")]
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
    /// Plaintext, TLS, SASL, or SASL over TLS (`sasl_ssl` or Kafka's `SASL_SSL`).
    pub security_protocol: SecurityProtocol,
    #[serde(default)]
    /// PLAIN or SCRAM, required with SASL (any case).
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
    /// PEM file of the CA(s) that signed the broker's certificate. Unset: the system's
    /// CA store (probed in the usual places, so that builds with their own OpenSSL find
    /// it too).
    #[serde(default, alias = "ssl_cafile")]
    pub ssl_ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that require mutual TLS.
    #[serde(default, alias = "ssl_certfile")]
    pub ssl_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default, alias = "ssl_keyfile")]
    pub ssl_key_file: Option<PathBuf>,
    /// Inline password of an encrypted client key; prefer `ssl_key_password_file` or
    /// `ssl_key_password_env`. Never printed.
    #[serde(default)]
    pub ssl_key_password: Option<crate::secret::Secret>,
    /// A file holding the client key's password.
    #[serde(default)]
    pub ssl_key_password_file: Option<PathBuf>,
    /// Name of an environment variable holding the client key's password.
    #[serde(default)]
    pub ssl_key_password_env: Option<String>,
    /// Check that the broker's certificate names the host connected to (on by default;
    /// turn off only for a broker reached by an address its certificate does not name).
    #[serde(default = "yes")]
    pub ssl_verify_hostname: bool,
    /// Seed-application spelling of `topics.events` (moved there when loaded).
    #[serde(default, skip_serializing)]
    pub event_topic: Option<String>,
    /// Seed-application spelling of `topics.data`.
    #[serde(default, skip_serializing)]
    pub data_topic: Option<String>,
    /// Seed-application spelling of `topics.commands`.
    #[serde(default, skip_serializing)]
    pub command_topic: Option<String>,
    /// Seed-application spelling of a cap in messages: becomes `buffer.max_records`.
    #[serde(default, skip_serializing)]
    pub offline_buffer_size: Option<u64>,
    /// How often the agent publishes a heartbeat to `topics.status` (a birth message at
    /// start, a death message on orderly shutdown). A central consumer calls an agent
    /// dead when its last heartbeat is older than three intervals.
    #[serde(
        default = "default_status_interval",
        with = "crate::time::serde_duration"
    )]
    pub status_interval: std::time::Duration,
    /// A record that waited in the buffer longer than this (an outage, a stall) is sent
    /// with `"replayed": true` and `buffered_ms`, in its JSON and as headers.
    #[serde(
        default = "default_replayed_after",
        with = "crate::time::serde_duration"
    )]
    pub replayed_after: std::time::Duration,
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
fn default_status_interval() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}
fn default_replayed_after() -> std::time::Duration {
    std::time::Duration::from_secs(5)
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
/// 4,000 records (about 1.2 MB of payload): the window librdkafka holds is most of what
/// the producer costs in memory. Against 8,000 it cut the drain's peak RSS by 3–7 MB for
/// a tenth of the drain rate, end to end unchanged (BENCHMARKS.md); a broker far away
/// (a round trip of tens of milliseconds) may want more.
fn default_in_flight() -> usize {
    4_000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// Topic names, one per kind of record.
pub struct Topics {
    #[serde(default = "t_events")]
    /// Experiment events (`experiment_event` only: each has an `experiment_id`).
    pub events: String,
    /// What the agent itself reports (`agent_event`: device connected, command audit,
    /// records dropped …).
    #[serde(default = "t_agent_events")]
    pub agent_events: String,
    /// Fleet status, keyed by agent id: birth, heartbeats, death. Meant to be compacted
    /// (the agent creates it so).
    #[serde(default = "t_status")]
    pub status: String,
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
fn t_agent_events() -> String {
    "agent_events".into()
}
fn t_status() -> String {
    "agent_status".into()
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
            agent_events: t_agent_events(),
            status: t_status(),
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
    /// The topic records of this kind go to.
    pub fn name(&self, kind: crate::record::TopicKind) -> &str {
        use crate::record::TopicKind;
        match kind {
            TopicKind::Events => &self.events,
            TopicKind::AgentEvents => &self.agent_events,
            TopicKind::Data => &self.data,
            TopicKind::Sensors => &self.sensors,
            TopicKind::Alerts => &self.alerts,
            TopicKind::CommandResults => &self.command_results,
            TopicKind::Aggregates => &self.aggregates,
        }
    }

    /// Every kind with its topic name.
    pub fn names(&self) -> std::collections::HashMap<crate::record::TopicKind, String> {
        use crate::record::TopicKind::*;
        [
            Events,
            AgentEvents,
            Data,
            Sensors,
            Alerts,
            CommandResults,
            Aggregates,
        ]
        .into_iter()
        .map(|k| (k, self.name(k).to_string()))
        .collect()
    }

    /// All topic names, for creation and validation.
    pub fn all(&self) -> [(&'static str, &str); 9] {
        [
            ("events", &self.events),
            ("agent_events", &self.agent_events),
            ("status", &self.status),
            ("data", &self.data),
            ("sensors", &self.sensors),
            ("alerts", &self.alerts),
            ("commands", &self.commands),
            ("command_results", &self.command_results),
            ("aggregates", &self.aggregates),
        ]
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
/// How the Kafka connection is secured. Read in any case, so Kafka's own spelling
/// (`SASL_SSL`) works as well as labgate's (`sasl_ssl`).
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
    /// Whether the connection is TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

impl<'de> Deserialize<'de> for SecurityProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "plaintext" => Ok(SecurityProtocol::Plaintext),
            "ssl" => Ok(SecurityProtocol::Ssl),
            "sasl_plaintext" => Ok(SecurityProtocol::SaslPlaintext),
            "sasl_ssl" => Ok(SecurityProtocol::SaslSsl),
            _ => Err(serde::de::Error::custom(format!(
                "unknown security_protocol {s:?}: expected plaintext, ssl, sasl_plaintext or sasl_ssl (any case)"
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for SaslMechanism {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_uppercase().replace('_', "-").as_str() {
            "PLAIN" => Ok(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Ok(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(SaslMechanism::ScramSha512),
            _ => Err(serde::de::Error::custom(format!(
                "unknown sasl_mechanism {s:?}: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
            ))),
        }
    }
}

/// `bootstrap_servers` as a string (`"a:9092,b:9092"`) or a list (`["a:9092", "b:9092"]`).
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    // serde's own message for an untagged enum names the enum, not what to write.
    let v = OneOrMany::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected a string (\"host:9092,host2:9092\") or a list of strings",
        )
    })?;
    Ok(match v {
        OneOrMany::One(s) => s,
        OneOrMany::Many(v) => v.join(","),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
/// How SASL authenticates. Read in any case, `_` or `-` alike (`scram_sha_512`).
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
    /// Moves the seed application's flat topic names into `topics` and tidies the
    /// server list; returns one line per key that was rewritten (for `labgate check`).
    /// `offline_buffer_size` is left for the whole config to move (it is a buffer cap).
    pub fn normalise(&mut self) -> Result<Vec<String>, Invalid> {
        let mut notes = Vec::new();
        self.bootstrap_servers = self
            .bootstrap_servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(",");
        let defaults = Topics::default();
        let moves = [
            (
                "event_topic",
                "events",
                self.event_topic.take(),
                &mut self.topics.events,
                &defaults.events,
            ),
            (
                "data_topic",
                "data",
                self.data_topic.take(),
                &mut self.topics.data,
                &defaults.data,
            ),
            (
                "command_topic",
                "commands",
                self.command_topic.take(),
                &mut self.topics.commands,
                &defaults.commands,
            ),
        ];
        for (flat, nested, value, slot, default) in moves {
            let Some(value) = value else { continue };
            if *slot != *default && *slot != value {
                return Err(invalid(
                    flat,
                    format!("says {value:?} but topics.{nested} says {slot:?}: keep one of them"),
                ));
            }
            notes.push(format!("kafka.{flat} = {value:?} -> kafka.topics.{nested}"));
            *slot = value;
        }
        Ok(notes)
    }

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
        if k.status_interval < std::time::Duration::from_millis(100)
            || k.status_interval > std::time::Duration::from_secs(3_600)
        {
            return Err(invalid("status_interval", "must be between 100ms and 1h"));
        }
        if k.replayed_after.is_zero() || k.replayed_after > std::time::Duration::from_secs(86_400) {
            return Err(invalid("replayed_after", "must be between 1ms and 24h"));
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
        for (key, path) in [
            ("ssl_ca_file", &k.ssl_ca_file),
            ("ssl_cert_file", &k.ssl_cert_file),
            ("ssl_key_file", &k.ssl_key_file),
        ] {
            let Some(path) = path else { continue };
            if !k.security_protocol.uses_tls() {
                return Err(invalid(
                    key,
                    "is only used with security_protocol ssl or sasl_ssl",
                ));
            }
            if let Err(e) = std::fs::metadata(path) {
                return Err(invalid(key, format!("cannot read {}: {e}", path.display())));
            }
        }
        if k.ssl_cert_file.is_some() != k.ssl_key_file.is_some() {
            return Err(invalid(
                if k.ssl_cert_file.is_some() {
                    "ssl_key_file"
                } else {
                    "ssl_cert_file"
                },
                "a client certificate needs both ssl_cert_file and ssl_key_file",
            ));
        }
        if k.key_password_sources().count() > 0 && k.ssl_key_file.is_none() {
            return Err(invalid(
                "ssl_key_password",
                "is only used with ssl_key_file",
            ));
        }
        k.ssl_key_password()?;
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

    /// The client key's password from whichever source is configured.
    pub fn ssl_key_password(&self) -> Result<Option<crate::secret::Secret>, Invalid> {
        self.key_password_sources().read()
    }

    fn key_password_sources(&self) -> crate::secret::Sources<'_> {
        crate::secret::Sources {
            key: "ssl_key_password",
            inline: self.ssl_key_password.as_ref(),
            file: self.ssl_key_password_file.as_deref(),
            env: self.ssl_key_password_env.as_deref(),
        }
    }

    /// The consumer group of the command consumer: configured, or `labgate-<agent_id>`.
    pub fn consumer_group(&self, agent_id: &str) -> String {
        self.consumer_group
            .clone()
            .unwrap_or_else(|| format!("labgate-{agent_id}"))
    }
}
