//! Typed configuration: a TOML file layered with `LABGATE__SECTION__KEY` environment
//! variables, unknown keys rejected, every value validated. Errors name the key so that
//! `labgate check` can tell a user exactly what to fix (and exit 64).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::buffer::{BufferConfig, OverflowPolicy};
use crate::devices::DeviceConfig;
pub use crate::http::HttpConfig;
pub use crate::kafka::config::{KafkaConfig, SaslMechanism, SecurityProtocol, Topics};

/// Why a configuration could not be used. Every variant names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config: {0}")]
    /// The file cannot be read or parsed at all.
    Load(String),
    #[error("{key}: {message}")]
    /// A key has a value that cannot be used; `key` is its full dotted path.
    Invalid {
        /// The full dotted key (`kafka.bootstrap_servers`, `devices[2].port`).
        key: String,
        /// What is wrong and what would be right.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The whole configuration file, one field per section.
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
    /// The ingest API for lab software (off unless clients are configured).
    #[serde(default)]
    pub api: crate::http::api::ApiConfig,
    /// Keys written in another spelling (the seed application's) and what each became,
    /// for `labgate check`.
    #[serde(skip)]
    pub rewritten: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The `[agent]` section.
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// How log lines are written.
pub enum LogFormat {
    #[default]
    /// Human-readable lines (ANSI colours only on a terminal).
    Text,
    /// One JSON object per line, for journald or a log shipper.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The `[log]` section.
pub struct LogConfig {
    #[serde(default)]
    /// Text or JSON lines.
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
        // The TOML first, on its own: its errors say where (line, column and the text),
        // which the config crate's lose for some (an integer beyond 64 bits).
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError::Load(format!("{}: {e}", path.display())));
        }
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
        let mut cfg: Config = raw
            .try_deserialize()
            .map_err(|e| with_line(describe_serde_error(e), &text))?;
        cfg.normalise()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rewrites keys given in the seed application's spelling into labgate's and notes
    /// what each became.
    fn normalise(&mut self) -> Result<(), ConfigError> {
        self.rewritten = self
            .kafka
            .normalise()
            .map_err(|(key, msg)| invalid(format!("kafka.{key}"), msg))?;
        if let Some(n) = self.kafka.offline_buffer_size.take() {
            if self.buffer.max_records.is_some_and(|m| m != n) {
                return Err(invalid(
                    "kafka.offline_buffer_size",
                    "and buffer.max_records disagree: keep one of them",
                ));
            }
            self.buffer.max_records = Some(n);
            self.rewritten.push(format!(
                "kafka.offline_buffer_size = {n} -> buffer.max_records"
            ));
        }
        Ok(())
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
        self.kafka
            .validate()
            .map_err(|(key, msg)| invalid(format!("kafka.{key}"), msg))?;
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
        if b.max_records
            .is_some_and(|n| n < b.records_per_chunk as u64)
        {
            return Err(invalid(
                "buffer.max_records",
                format!(
                    "must be at least buffer.records_per_chunk ({})",
                    b.records_per_chunk
                ),
            ));
        }
        if b.records_per_chunk == 0 || b.records_per_chunk > 4096 {
            return Err(invalid("buffer.records_per_chunk", "must be 1..=4096"));
        }
        self.http
            .validate()
            .map_err(|(key, msg)| invalid(format!("http.{key}"), msg))?;
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
        let devices: Vec<(String, &'static str)> = self
            .devices
            .iter()
            .map(|d| (d.id().to_string(), d.kind()))
            .collect();
        self.api
            .validate(&devices)
            .map_err(|(key, msg)| invalid(format!("api.{key}"), msg))?;
        if self.api.enabled() && self.http.listen.is_empty() {
            return Err(invalid(
                "http.listen",
                "is empty, but [[api.clients]] are configured: the ingest API is served on http.listen",
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if d.kind() == "app" && !self.api.clients.iter().any(|c| c.device() == d.id()) {
                return Err(invalid(
                    format!("devices[{i}].id"),
                    format!("app device {:?} needs an [[api.clients]] entry with device = {:?}: its application receives commands through the API", d.id(), d.id()),
                ));
            }
        }
        Ok(())
    }

    /// The consumer group of the command consumer.
    pub fn consumer_group(&self) -> String {
        self.kafka.consumer_group(&self.agent.agent_id)
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
    match describe_config_error(e) {
        ConfigError::Invalid { key, message } => ConfigError::Invalid {
            key: dotted(&key),
            message,
        },
        other => other,
    }
}

/// The config crate's errors carry no place in the file: when the file on its own fails
/// the same way, the line the TOML reader points at is added (the table a missing
/// field belongs in, the value of the wrong type).
fn with_line(e: ConfigError, text: &str) -> ConfigError {
    let ConfigError::Invalid { key, message } = e else {
        return e;
    };
    // Only when the TOML reader's error is this one (a file with two mistakes must not
    // get the other one's line).
    let field = key.rsplit(['.', ']']).next().unwrap_or("");
    let line = toml::from_str::<Config>(text)
        .err()
        .filter(|t| {
            let m = t.message();
            // "invalid type: string \"10GB\"" alike, whatever each says it expected.
            let what = |m: &str| m.split(", expected").next().unwrap_or("").to_string();
            message.contains(m)
                || what(m) == what(&message)
                || (!field.is_empty() && m.contains(&format!("`{field}`")))
        })
        .and_then(|t| t.span())
        // A span from the start is the whole file (a missing section): no line to give.
        .filter(|span| span.start > 0)
        .and_then(|span| text.get(..span.start))
        .map(|before| before.matches('\n').count() + 1);
    match line {
        Some(n) => ConfigError::Invalid {
            key,
            message: format!("{message} (line {n})"),
        },
        None => ConfigError::Invalid { key, message },
    }
}

/// The config crate joins a field to an array element without a dot
/// (`devices[0]kind`): the key as written in the file instead (`devices[0].kind`).
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']'
            && chars
                .peek()
                .is_some_and(|n| n.is_alphanumeric() || *n == '_')
        {
            out.push('.');
        }
    }
    out
}

fn describe_config_error(e: config::ConfigError) -> ConfigError {
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
            if let Some(field) = text
                .strip_prefix("missing configuration field \"")
                .and_then(|r| r.split('"').next())
            {
                return invalid(field.to_string(), "is required and missing".to_string());
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

    /// The error a config file gives (no environment).
    fn error_of(text: &str) -> String {
        Config::load_with_env(write(text).path(), [])
            .unwrap_err()
            .to_string()
    }

    const MINIMAL: &str = r#"
[agent]
agent_id = "lab-pc-1"
data_dir = "/tmp/x"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
"#;

    #[test]
    fn bootstrap_servers_of_the_wrong_type_say_what_is_expected() {
        let e = error_of(&MINIMAL.replace("\"127.0.0.1:9092\"", "9092"));
        assert!(e.contains("kafka.bootstrap_servers"), "{e}");
        assert!(e.contains("a list of strings"), "{e}");
        assert!(!e.contains("untagged"), "{e}");
    }

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
    fn a_device_field_and_a_missing_section_are_named_as_written() {
        let text = format!("{MINIMAL}[[devices]]\nname = \"x\"\nkind = \"nonsense\"\n");
        let e = error_of(&text);
        assert!(e.starts_with("devices[0].kind:"), "{e}");
        let text = MINIMAL.replace("[kafka]\nbootstrap_servers = \"127.0.0.1:9092\"\n", "");
        let e = error_of(&text);
        assert_eq!(e, "kafka: is required and missing");
        assert_eq!(dotted("devices[2]port"), "devices[2].port");
        assert_eq!(dotted("devices[2].port"), "devices[2].port");
        assert_eq!(dotted("a[1][2]b"), "a[1][2].b");
    }

    #[test]
    fn a_missing_or_mistyped_value_gets_its_line_and_only_its_own() {
        let missing = format!(
            "{MINIMAL}[[devices]]\nid = \"s\"\nkind = \"simulated_sensors\"\ninterval = \"1s\"\n  [[devices.sensors]]\n  sensor_id = \"t\"\n  sensor_type = \"temperature\"\n  unit = \"C\"\n  variance = 1.0\n"
        );
        let e = error_of(&missing);
        let at = |text: &str, what: &str| {
            let line = text.lines().position(|l| l.trim() == what).unwrap() + 1;
            format!("(line {line})")
        };
        assert!(
            e.contains("base") && e.ends_with(&at(&missing, "[[devices]]")),
            "{e}"
        );
        let typed = format!("{MINIMAL}[buffer]\nmax_bytes = \"10GB\"\n");
        let e = error_of(&typed);
        assert!(
            e.starts_with("buffer.max_bytes:") && e.ends_with(&at(&typed, "max_bytes = \"10GB\"")),
            "{e}"
        );
        // The same mistake made through the environment: the file is fine, no line.
        let env = [("LABGATE__BUFFER__MAX_BYTES".to_string(), "10GB".to_string())];
        let e = Config::load_with_env(write(MINIMAL).path(), env)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("buffer.max_bytes:") && !e.contains("line"),
            "{e}"
        );
    }

    #[test]
    fn a_toml_error_says_where() {
        let e = Config::load_with_env(
            write(&format!("{MINIMAL}linger_ms = 99999999999999999999\n")).path(),
            [],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 7"), "{e}");
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
        let e = error_of(&text);
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

    /// The seed application's `KafkaConfig`, as its users write it.
    const SEED: &str = r#"
[agent]
agent_id = "lab-pc-1"
data_dir = "/tmp/x"
[kafka]
bootstrap_servers = ["kafka-1.lab:9092", " kafka-2.lab:9092"]
client_id = "echem-app"
event_topic = "experiment_events"
data_topic = "measurement_data"
command_topic = "commands"
consumer_group = "echem-app-group"
security_protocol = "SASL_SSL"
sasl_mechanism = "scram-sha-512"
sasl_username = "echem"
sasl_password = "s3cret"
offline_buffer_size = 1000
"#;

    #[test]
    fn the_seed_applications_kafka_config_loads_as_written() {
        let c = Config::load_with_env(write(SEED).path(), []).unwrap();
        let k = &c.kafka;
        assert_eq!(k.bootstrap_servers, "kafka-1.lab:9092,kafka-2.lab:9092");
        assert_eq!(k.client_id, "echem-app");
        assert_eq!(k.topics.events, "experiment_events");
        assert_eq!(k.topics.data, "measurement_data");
        assert_eq!(k.topics.commands, "commands");
        assert_eq!(c.consumer_group(), "echem-app-group");
        assert_eq!(k.security_protocol, SecurityProtocol::SaslSsl);
        assert_eq!(k.sasl_mechanism, Some(SaslMechanism::ScramSha512));
        assert_eq!(c.buffer.max_records, Some(1000));
        assert_eq!(c.rewritten.len(), 4, "{:?}", c.rewritten);
        // What check prints has the flat keys in labgate's places, and loads again.
        let shown = c.redacted_toml();
        assert!(
            !shown.contains("event_topic") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(shown.contains("max_records = 1000"), "{shown}");
        // Comma strings and any case work too.
        let text = SEED
            .replace(
                r#"["kafka-1.lab:9092", " kafka-2.lab:9092"]"#,
                r#""kafka-1.lab:9092, kafka-2.lab:9092""#,
            )
            .replace("SASL_SSL", "sasl_ssl")
            .replace("scram-sha-512", "SCRAM_SHA_256");
        let c = Config::load_with_env(write(&text).path(), []).unwrap();
        assert_eq!(
            c.kafka.bootstrap_servers,
            "kafka-1.lab:9092,kafka-2.lab:9092"
        );
        assert_eq!(c.kafka.sasl_mechanism, Some(SaslMechanism::ScramSha256));
    }

    #[test]
    fn a_flat_topic_that_contradicts_the_nested_one_is_named() {
        let text = format!("{SEED}[kafka.topics]\nevents = \"other\"\n");
        let e = error_of(&text);
        assert!(e.starts_with("kafka.event_topic:"), "{e}");
        let e = Config::load_with_env(write(&SEED.replace("SASL_SSL", "SASL_TLS")).path(), [])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("security_protocol") && e.contains("SASL_TLS"),
            "{e}"
        );
    }

    #[test]
    fn tls_files_must_exist_and_come_in_pairs() {
        let text = format!(
            "{MINIMAL}security_protocol = \"SSL\"\nssl_ca_file = \"/nonexistent/ca.pem\"\n"
        );
        let e = error_of(&text);
        assert!(e.starts_with("kafka.ssl_ca_file:"), "{e}");
        let cert = write("not checked here");
        let text = format!(
            "{MINIMAL}security_protocol = \"ssl\"\nssl_cert_file = {:?}\n",
            cert.path()
        );
        let e = error_of(&text);
        assert!(e.starts_with("kafka.ssl_key_file:"), "{e}");
        let text = format!("{MINIMAL}ssl_ca_file = {:?}\n", cert.path());
        let e = error_of(&text);
        assert!(
            e.starts_with("kafka.ssl_ca_file:") && e.contains("only used"),
            "{e}"
        );
    }
}
