//! Typed configuration: a TOML file layered with `LABGATE__SECTION__KEY` environment
//! variables, unknown keys rejected, every value validated. Errors name the key so that
//! `labgate check` can tell a user exactly what to fix (and exit 64).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::buffer::{BufferConfig, OverflowPolicy};
use crate::devices::DeviceConfig;

/// Why a configuration could not be used. Every variant names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config: {0}")]
    Load(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this agent is and where it keeps its state.
    pub agent: AgentConfig,
    /// Where records go and where commands come from.
    pub kafka: KafkaConfig,
    /// The durable outbox between devices and Kafka.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// /health, /metrics and /status.
    #[serde(default)]
    pub http: HttpConfig,
    /// Log format and level.
    #[serde(default)]
    pub log: LogConfig,
    /// Instruments and sensors this agent reads.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Who may command which device, and how fresh a command must be.
    #[serde(default)]
    pub commands: crate::commands::policy::CommandsConfig,
    /// Edge processing of sensor readings: thresholds, aggregates, downsampling.
    #[serde(default)]
    pub pipeline: crate::pipeline::PipelineConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Stamped on every record and used to address commands to this agent.
    pub agent_id: String,
    /// Holds the sled buffer; must be writable and survive restarts.
    pub data_dir: PathBuf,
    /// How long shutdown waits for in-flight Kafka sends.
    #[serde(default = "default_grace", with = "crate::time::serde_duration")]
    pub shutdown_grace: Duration,
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated host:port list.
    pub bootstrap_servers: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    #[serde(default)]
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
    pub security_protocol: SecurityProtocol,
    #[serde(default)]
    pub sasl_mechanism: Option<SaslMechanism>,
    #[serde(default)]
    pub sasl_username: Option<String>,
    /// Inline password; prefer `sasl_password_file` or `sasl_password_env`. Never
    /// printed (`***`).
    #[serde(default)]
    pub sasl_password: Option<crate::secret::Secret>,
    #[serde(default)]
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
    pub topic_partitions: i32,
    #[serde(default = "one_i32")]
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
pub struct Topics {
    #[serde(default = "t_events")]
    pub events: String,
    #[serde(default = "t_data")]
    pub data: String,
    #[serde(default = "t_sensors")]
    pub sensors: String,
    #[serde(default = "t_alerts")]
    pub alerts: String,
    #[serde(default = "t_commands")]
    pub commands: String,
    #[serde(default = "t_results")]
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
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
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
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of /health, /metrics and /status; empty string disables the server.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// /health reports Kafka unreachable once it has been for this long.
    #[serde(
        default = "default_unhealthy_after",
        with = "crate::time::serde_duration"
    )]
    pub kafka_unhealthy_after: Duration,
}

fn default_unhealthy_after() -> Duration {
    Duration::from_secs(30)
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            kafka_unhealthy_after: default_unhealthy_after(),
        }
    }
}

impl HttpConfig {
    /// The parsed listen address, or None when disabled. Validated by `Config::validate`.
    pub fn addr(&self) -> Option<SocketAddr> {
        if self.listen.is_empty() {
            None
        } else {
            self.listen.parse().ok()
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `labgate=debug,rdkafka=warn`.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

impl Config {
    /// Loads `path` (TOML), applies `LABGATE__…` environment overrides, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As `load`, with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Load(format!("{}: {e}", path.display())))?;
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml));
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("LABGATE__") else {
                continue;
            };
            let key = rest.to_ascii_lowercase().replace("__", ".");
            builder = builder
                .set_override(key.as_str(), env_value(&value))
                .map_err(|e| invalid(key.clone(), e.to_string()))?;
        }
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let cfg: Config = raw.try_deserialize().map_err(describe_serde_error)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.agent;
        if !crate::record::valid_id(&a.agent_id) {
            return Err(invalid(
                "agent.agent_id",
                "must be 1-64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if a.data_dir.as_os_str().is_empty() {
            return Err(invalid("agent.data_dir", "must not be empty"));
        }
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty()
            || k.bootstrap_servers
                .split(',')
                .any(|s| !s.trim().contains(':'))
        {
            return Err(invalid(
                "kafka.bootstrap_servers",
                "must be a comma-separated list of host:port",
            ));
        }
        if k.client_id.is_empty() {
            return Err(invalid("kafka.client_id", "must not be empty"));
        }
        for (name, topic) in k.topics.all() {
            if topic.is_empty()
                || topic.len() > 249
                || !topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(invalid(
                    format!("kafka.topics.{name}"),
                    "must be 1-249 characters of letters, digits, '.', '_' or '-'",
                ));
            }
        }
        if !matches!(k.commands_offset_reset.as_str(), "latest" | "earliest") {
            return Err(invalid(
                "kafka.commands_offset_reset",
                "must be \"latest\" or \"earliest\"",
            ));
        }
        if !matches!(
            k.compression.as_str(),
            "none" | "gzip" | "snappy" | "lz4" | "zstd"
        ) {
            return Err(invalid(
                "kafka.compression",
                "must be one of none, gzip, snappy, lz4, zstd",
            ));
        }
        if k.topic_partitions < 1 {
            return Err(invalid("kafka.topic_partitions", "must be at least 1"));
        }
        if k.replication_factor < 1 {
            return Err(invalid("kafka.replication_factor", "must be at least 1"));
        }
        if k.max_in_flight == 0 || k.max_in_flight > 1_000_000 {
            return Err(invalid("kafka.max_in_flight", "must be 1..=1000000"));
        }
        if k.security_protocol.uses_sasl() {
            if k.sasl_mechanism.is_none() {
                return Err(invalid(
                    "kafka.sasl_mechanism",
                    "is required when security_protocol uses SASL",
                ));
            }
            if k.sasl_username.as_deref().unwrap_or("").is_empty() {
                return Err(invalid(
                    "kafka.sasl_username",
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
                    "kafka.sasl_password",
                    "exactly one of sasl_password, sasl_password_file, sasl_password_env is required with SASL",
                ));
            }
            self.sasl_password()?;
        }
        for key in k.properties.keys() {
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            {
                return Err(invalid(
                    format!("kafka.properties.{key}"),
                    "is not a librdkafka property name",
                ));
            }
        }
        let b = &self.buffer;
        if b.max_bytes < 64 * 1024 {
            return Err(invalid("buffer.max_bytes", "must be at least 65536"));
        }
        if b.commit_interval.is_zero() || b.commit_interval > Duration::from_secs(10) {
            return Err(invalid(
                "buffer.commit_interval",
                "must be between 1ms and 10s",
            ));
        }
        if b.cache_capacity < 1 << 20 {
            return Err(invalid("buffer.cache_capacity", "must be at least 1048576"));
        }
        if b.records_per_chunk == 0 || b.records_per_chunk > 4096 {
            return Err(invalid("buffer.records_per_chunk", "must be 1..=4096"));
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                "must be an address such as 127.0.0.1:9464, or empty to disable",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                "is not a valid filter such as \"info\"",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let id = d.id();
            if !crate::record::valid_id(id) || id == crate::record::AGENT_DEVICE {
                return Err(invalid(
                    format!("devices[{i}].id"),
                    "must be 1-64 characters of letters, digits, '-', '_' or '.', and not \"agent\"",
                ));
            }
            if !seen.insert(id) {
                return Err(invalid(
                    format!("devices[{i}].id"),
                    format!("duplicate id {id:?}"),
                ));
            }
            d.validate()
                .map_err(|(key, msg)| invalid(format!("devices[{i}].{key}"), msg))?;
        }
        self.commands
            .validate(&self.devices)
            .map_err(|(key, msg)| invalid(format!("commands.{key}"), msg))?;
        self.pipeline
            .validate()
            .map_err(|(key, msg)| invalid(format!("pipeline.{key}"), msg))?;
        Ok(())
    }

    /// The SASL password from whichever source is configured.
    pub fn sasl_password(&self) -> Result<Option<crate::secret::Secret>, ConfigError> {
        let k = &self.kafka;
        crate::secret::Sources {
            key: "sasl_password",
            inline: k.sasl_password.as_ref(),
            file: k.sasl_password_file.as_deref(),
            env: k.sasl_password_env.as_deref(),
        }
        .read()
        .map_err(|(key, m)| invalid(format!("kafka.{key}"), m))
    }

    /// The consumer group of the command consumer.
    pub fn consumer_group(&self) -> String {
        self.kafka
            .consumer_group
            .clone()
            .unwrap_or_else(|| format!("labgate-{}", self.agent.agent_id))
    }

    /// The effective config as TOML with every secret replaced by "***".
    pub fn redacted_toml(&self) -> String {
        // Secrets print as "***" by themselves; passthrough properties are plain text.
        let mut c = self.clone();
        for (key, value) in c.kafka.properties.iter_mut() {
            let k = key.to_ascii_lowercase();
            if k.contains("password") || k.contains("secret") || k.contains("key") {
                *value = "***".into();
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Environment values are strings; numbers and booleans are given their type so that
/// `LABGATE__KAFKA__CREATE_TOPICS=true` works.
fn env_value(v: &str) -> config::Value {
    if let Ok(b) = v.parse::<bool>() {
        return b.into();
    }
    if let Ok(i) = v.parse::<i64>() {
        return i.into();
    }
    v.into()
}

/// The config crate reports `unknown field` and type errors with the path in varying
/// places; turn them into "key: message".
fn describe_serde_error(e: config::ConfigError) -> ConfigError {
    match e {
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } => {
            let msg = error.to_string();
            match msg
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                Some(field) => invalid(format!("{key}.{field}"), msg.clone()),
                None => invalid(key, msg),
            }
        }
        other => {
            let text = other.to_string();
            // e.g. "unknown field `foo`, expected one of ... for key `kafka`"
            if let Some(pos) = text.rfind(" for key `") {
                let key = text[pos + 10..].trim_end_matches('`').to_string();
                let msg = text[..pos].to_string();
                let field = msg
                    .strip_prefix("unknown field `")
                    .and_then(|r| r.split('`').next())
                    .map(|f| format!("{key}.{f}"));
                return invalid(field.unwrap_or(key), msg);
            }
            if let Some(field) = text
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                return invalid(field.to_string(), text.clone());
            }
            if let Some(field) = text
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next())
            {
                return invalid(field.to_string(), text.clone());
            }
            ConfigError::Load(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    const MINIMAL: &str = r#"
[agent]
agent_id = "lab-pc-1"
data_dir = "/tmp/x"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let f = write(MINIMAL);
        let c = Config::load_with_env(f.path(), []).unwrap();
        assert_eq!(c.kafka.topics.events, "echem_events");
        assert_eq!(c.kafka.topics.command_results, "echem_command_results");
        assert_eq!(c.buffer.commit_interval, Duration::from_millis(20));
        assert_eq!(c.buffer.overflow, OverflowPolicy::DropOldest);
        assert_eq!(c.consumer_group(), "labgate-lab-pc-1");
    }

    #[test]
    fn env_overrides_file() {
        let f = write(MINIMAL);
        let env = [
            (
                "LABGATE__KAFKA__BOOTSTRAP_SERVERS".to_string(),
                "broker:9093".to_string(),
            ),
            ("LABGATE__KAFKA__CREATE_TOPICS".into(), "true".into()),
            ("UNRELATED".into(), "x".into()),
        ];
        let c = Config::load_with_env(f.path(), env).unwrap();
        assert_eq!(c.kafka.bootstrap_servers, "broker:9093");
        assert!(c.kafka.create_topics);
    }

    #[test]
    fn unknown_key_is_named() {
        let f = write(&format!("{MINIMAL}bootstrap_server = \"x:1\"\n"));
        let e = Config::load_with_env(f.path(), []).unwrap_err().to_string();
        assert!(e.starts_with("kafka.bootstrap_server:"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let f = write(&MINIMAL.replace("127.0.0.1:9092", "nohostport"));
        let e = Config::load_with_env(f.path(), []).unwrap_err().to_string();
        assert!(e.starts_with("kafka.bootstrap_servers:"), "{e}");
    }

    #[test]
    fn sasl_requires_exactly_one_password_source_and_redacts_it() {
        let text = format!(
            "{MINIMAL}security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"u\"\n"
        );
        let e = Config::load_with_env(write(&text).path(), [])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("kafka.sasl_password:"), "{e}");
        let text = format!(
            "{text}sasl_password = \"hunter2\"\n[kafka.properties]\n\"ssl.key.password\" = \"k\"\n"
        );
        let c = Config::load_with_env(write(&text).path(), []).unwrap();
        let shown = c.redacted_toml();
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
        assert!(!shown.contains("= \"k\""), "{shown}");
    }
}
