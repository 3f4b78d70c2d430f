//! Kafka: the producer settings, connection state, topic creation, and the forwarder
//! that drains the buffer. The command consumer lives in `crate::commands`.

pub mod forwarder;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, ProducerContext};
use rdkafka::statistics::Statistics;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::record::unix_ms;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    #[error("kafka config: {0}")]
    Config(String),
    #[error("cannot create topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// Settings shared by every client: brokers, identity, security, passthrough.
pub fn base_config(cfg: &Config) -> Result<ClientConfig, KafkaSetupError> {
    let k = &cfg.kafka;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("client.id", &k.client_id)
        .set("security.protocol", k.security_protocol.as_librdkafka());
    if let Some(m) = k.sasl_mechanism {
        c.set("sasl.mechanism", m.as_librdkafka());
    }
    if let Some(u) = &k.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = cfg
        .sasl_password()
        .map_err(|e| KafkaSetupError::Config(e.to_string()))?
    {
        c.set("sasl.password", p);
    }
    Ok(c)
}

fn apply_passthrough(c: &mut ClientConfig, cfg: &Config) {
    for (key, value) in &cfg.kafka.properties {
        c.set(key, value);
    }
}

/// Context of the producer: turns librdkafka statistics into the connection state.
pub struct AgentContext {
    pub metrics: Arc<Metrics>,
}

impl ClientContext for AgentContext {
    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().any(|b| b.state == "UP");
        let was = self.metrics.kafka_connected.swap(up, Relaxed);
        if up {
            self.metrics
                .kafka_last_connected_ms
                .store(unix_ms(SystemTime::now()), Relaxed);
        }
        if was != up {
            if up {
                tracing::info!("kafka connected");
            } else {
                tracing::warn!("kafka unreachable; records stay in the buffer");
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "kafka client error");
    }
}

impl ProducerContext for AgentContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

pub type Producer = FutureProducer<AgentContext>;

/// The producer: idempotent, `acks=all`, retries forever (a record waits in the buffer
/// and in librdkafka rather than being given up), statistics every second for the
/// connection state. Passthrough properties are applied last and win.
pub fn producer(cfg: &Config, metrics: Arc<Metrics>) -> Result<Producer, KafkaSetupError> {
    let mut c = base_config(cfg)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.codec", &cfg.kafka.compression)
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set(
            "queue.buffering.max.messages",
            (cfg.kafka.max_in_flight * 2).to_string(),
        )
        .set("statistics.interval.ms", "1000")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "2000");
    apply_passthrough(&mut c, cfg);
    Ok(c.create_with_context(AgentContext { metrics })?)
}

/// A plain producer with the product's settings, for the operator tools and the
/// benchmark baseline.
pub fn plain_producer(cfg: &Config) -> Result<FutureProducer, KafkaSetupError> {
    let mut c = base_config(cfg)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.codec", &cfg.kafka.compression)
        .set("linger.ms", "5");
    apply_passthrough(&mut c, cfg);
    Ok(c.create()?)
}

/// Consumer settings for the command topic and the `tail` tool.
pub fn consumer_config(cfg: &Config, group: &str) -> Result<ClientConfig, KafkaSetupError> {
    let mut c = base_config(cfg)?;
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &cfg.kafka.commands_offset_reset)
        .set("session.timeout.ms", "10000")
        // Commands must arrive fast; some brokers (tansu) hold an empty fetch for the
        // whole wait, and librdkafka's default of 500 ms would be the command latency.
        .set("fetch.wait.max.ms", "10")
        .set("topic.metadata.refresh.interval.ms", "5000");
    apply_passthrough(&mut c, cfg);
    Ok(c)
}

/// Creates every configured topic that does not exist yet.
pub async fn create_topics(cfg: &Config) -> Result<(), KafkaSetupError> {
    let mut c = base_config(cfg)?;
    apply_passthrough(&mut c, cfg);
    let admin: AdminClient<_> = c.create()?;
    let topics: Vec<NewTopic<'_>> = cfg
        .kafka
        .topics
        .all()
        .iter()
        .map(|(_, name)| {
            NewTopic::new(
                name,
                cfg.kafka.topic_partitions,
                TopicReplication::Fixed(cfg.kafka.replication_factor),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaSetupError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}
