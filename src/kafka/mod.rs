//! Kafka: the producer settings, connection state, topic creation, and the forwarder
//! that drains the buffer. The command consumer lives in the commands module.

/// The `[kafka]` section.
pub mod config;
/// Reads the buffer in order and produces.
pub mod forwarder;
/// Birth, heartbeat and death messages on the status topic.
pub mod status;
/// The agent's own TLS handshake, to name why the broker's certificate failed.
pub mod tls;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;

use crate::buffer::{Buffer, RecordId};
use crate::metrics::Metrics;
use crate::record::unix_ms;
pub use config::KafkaConfig;

/// Why a Kafka client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka client: {0}")]
    /// librdkafka refused to build the client.
    Client(#[from] KafkaError),
    #[error("kafka config: {0}")]
    /// A setting could not be read (a password file, say).
    Config(String),
    #[error("cannot create topic {topic}: {code}")]
    /// The broker refused to create a topic.
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
}

/// Settings shared by every client: brokers, identity, security, passthrough.
pub fn base_config(k: &KafkaConfig) -> Result<ClientConfig, KafkaSetupError> {
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
    let config_error =
        |(key, m): config::Invalid| KafkaSetupError::Config(format!("kafka.{key}: {m}"));
    if let Some(p) = k.sasl_password().map_err(config_error)? {
        c.set("sasl.password", p.expose());
    }
    if k.security_protocol.uses_tls() {
        // Unset, librdkafka asks OpenSSL for its default paths, which for a vendored
        // OpenSSL (ARM release builds) point at /usr/local/ssl: "probe" looks in the
        // places distributions keep their CA store instead.
        let ca = k
            .ssl_ca_file
            .as_ref()
            .map_or_else(|| "probe".to_string(), |p| p.display().to_string());
        c.set("ssl.ca.location", ca);
        if let Some(cert) = &k.ssl_cert_file {
            c.set("ssl.certificate.location", cert.display().to_string());
        }
        if let Some(key) = &k.ssl_key_file {
            c.set("ssl.key.location", key.display().to_string());
        }
        if let Some(p) = k.ssl_key_password().map_err(config_error)? {
            c.set("ssl.key.password", p.expose());
        }
        c.set(
            "ssl.endpoint.identification.algorithm",
            if k.ssl_verify_hostname {
                "https"
            } else {
                "none"
            },
        );
    }
    Ok(c)
}

fn apply_passthrough(c: &mut ClientConfig, k: &KafkaConfig) {
    for (key, value) in &k.properties {
        c.set(key, value);
    }
}

/// Where delivery reports go: the producer's callback acks successes in the buffer
/// itself and hands failures to the forwarder task.
pub struct DeliverySink {
    /// Acked here, from the producer's delivery callback.
    pub buffer: Arc<Buffer>,
    /// Records handed to the producer and not yet reported.
    pub in_flight: AtomicUsize,
    /// Failed reports, for the forwarder to dead-letter or resend.
    pub failures: tokio::sync::mpsc::UnboundedSender<(RecordId, KafkaError)>,
    /// Wakes the forwarder when a report fails, empties the window, or brings it down
    /// to [`DeliverySink::refill_at`].
    pub wake: tokio::sync::Notify,
    /// The number of records in flight at which a report wakes the forwarder to refill
    /// the window: a quarter of the window below full. Reports above it do not wake
    /// it, so that it sends a quarter of the window at a time instead of one record per
    /// report (each wake-up costs a thread hand-off).
    pub refill_at: usize,
    /// A fatal producer error (librdkafka's idempotence guarantee is broken): the
    /// forwarder stops with it and the agent exits.
    pub fatal: std::sync::Mutex<Option<String>>,
    /// Reports of the fleet status messages (not records).
    pub status: Arc<status::StatusSlot>,
    /// Unix ms of the last delivery report, or of the hand that ended an idle spell:
    /// records in flight with no progress since then mean the broker is stalled or away.
    pub progress_ms: std::sync::atomic::AtomicU64,
}

impl DeliverySink {
    /// A sink with nothing in flight, for an in-flight window of `window` records.
    pub fn new(
        buffer: Arc<Buffer>,
        failures: tokio::sync::mpsc::UnboundedSender<(RecordId, KafkaError)>,
        window: usize,
    ) -> DeliverySink {
        DeliverySink {
            buffer,
            in_flight: AtomicUsize::new(0),
            failures,
            wake: tokio::sync::Notify::new(),
            refill_at: refill_at(window),
            fatal: std::sync::Mutex::new(None),
            status: Arc::new(status::StatusSlot::default()),
            progress_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// [`DeliverySink::refill_at`] for a window of `window` records: a quarter of it below
/// full, and 0 (wake only when it is empty) for a window of one.
fn refill_at(window: usize) -> usize {
    window.saturating_sub((window / 4).max(1))
}

/// Context of the producer: turns librdkafka statistics into the connection state and
/// delivery reports into buffer acks.
pub struct AgentContext {
    /// Connection state and delivery counts go here.
    pub metrics: Arc<Metrics>,
    /// Where delivery reports go.
    pub sink: Arc<DeliverySink>,
    /// With TLS: names why the broker's certificate failed verification.
    pub tls: Option<Arc<tls::TlsProbe>>,
}

/// Counts and records an error that is a refusal by the broker; `false` when it is
/// not one. With TLS, a failed certificate verification is explained by the agent's
/// own handshake ([`tls::TlsProbe`]).
pub fn note_client_error(
    metrics: &Arc<Metrics>,
    probe: Option<&Arc<tls::TlsProbe>>,
    client: &'static str,
    error: &KafkaError,
    reason: &str,
) -> bool {
    let mut reason = reason.to_string();
    if let Some(p) = probe {
        if tls::is_verify_failure(&reason) {
            if let Some(text) = p.explain(metrics, client, error.clone(), reason.clone()) {
                if !text.is_empty() {
                    reason = format!("{reason}; agent's own handshake: {text}");
                }
            }
        }
    }
    match refusal_cause(error, &reason) {
        Some(cause) => {
            metrics.note_refusal(&cause, client);
            true
        }
        None => false,
    }
}

/// What a person should fix when the broker refuses this agent, in words: the
/// credentials, the CA, an expired certificate, a mechanism the broker does not offer.
/// `None` when the error is not a refusal (a broker that is simply away).
pub fn refusal_cause(error: &KafkaError, reason: &str) -> Option<String> {
    let text = format!("{error}: {reason}");
    let lower = text.to_ascii_lowercase();
    let tls = error.rdkafka_error_code() == Some(RDKafkaErrorCode::SSL)
        || lower.contains("ssl handshake")
        || lower.contains("ssl routines")
        || lower.contains("ssl alert");
    let cause = if lower.contains("certificate has expired")
        || lower.contains("certificate expired")
    {
        "a certificate has expired (the broker's, or this agent's kafka.ssl_cert_file)"
    } else if lower.contains("hostname mismatch") || lower.contains("host name mismatch") {
        "the broker's certificate does not name the host connected to (kafka.bootstrap_servers, kafka.ssl_verify_hostname)"
    } else if tls
        && (lower.contains("certificate verify failed")
            || lower.contains("unable to get local issuer")
            || lower.contains("self-signed")
            || lower.contains("self signed")
            || lower.contains("could not be verified"))
    {
        "the broker's certificate is not signed by a trusted CA (kafka.ssl_ca_file)"
    } else if tls
        && (lower.contains("certificate required")
            || lower.contains("handshake failure")
            || lower.contains("unknown ca")
            || lower.contains("bad certificate"))
    {
        "the broker refused this agent's TLS client certificate, or none was given (kafka.ssl_cert_file)"
    } else if lower.contains("mechanism handshake failed")
        || lower.contains("unsupported sasl mechanism")
        || lower.contains("no shared mechanism")
        || lower.contains("nosharedmechanism")
    {
        "the broker does not offer this SASL mechanism (kafka.sasl_mechanism)"
    } else if lower.contains("authentication failed")
        || lower.contains("invalid username or password")
        || lower.contains("sasl authentication")
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::SaslAuthenticationFailed)
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication)
    {
        "the broker refused the SASL username or password (kafka.sasl_username, kafka.sasl_password)"
    } else if tls {
        "the TLS handshake with the broker failed"
    } else if forwarder::is_auth(error) {
        "the broker refused this agent's authorisation (ACLs)"
    } else {
        return None;
    };
    Some(format!("{cause}: {text}"))
}

impl AgentContext {
    /// Records whether a broker is reachable. Statistics say so once a second; an
    /// acknowledged delivery says so at once, so a heartbeat sent in the first second
    /// after start-up does not report a broker that has just taken records as down.
    fn set_connected(&self, up: bool) {
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

    /// A delivery the broker acknowledged: it is up. Cheap when already known.
    fn delivered(&self) {
        if !self.metrics.kafka_connected.load(Relaxed) {
            self.set_connected(true);
        }
    }
}

impl ClientContext for AgentContext {
    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.set_connected(up);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(%error, reason, "kafka producer fatal error");
            *self.sink.fatal.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("{error}: {reason}"));
            self.sink.wake.notify_one();
        } else if note_client_error(&self.metrics, self.tls.as_ref(), "producer", &error, reason) {
            self.sink.wake.notify_one();
        } else {
            tracing::debug!(%error, reason, "kafka client error");
        }
    }
}

impl ProducerContext for AgentContext {
    /// The record's place in the buffer, packed by [`pack_id`]: no allocation per record.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        if opaque == status::STATUS_OPAQUE {
            match result {
                Ok(_) => {
                    self.delivered();
                    if self.metrics.kafka_auth_failing.swap(false, Relaxed) {
                        self.metrics.set_auth_error(None);
                        tracing::info!("kafka accepts this agent again");
                    }
                }
                // Purged at exit: the broker was away; nothing to report.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue), _)) => {
                    tracing::debug!("status message purged at exit")
                }
                Err((e, _)) => tracing::warn!(error = %e, "status message not delivered"),
            }
            self.sink.status.on_report(result.is_ok());
            return;
        }
        let id = unpack_id(opaque);
        // One clock read per delivery for both stamps below.
        let now_ms = unix_ms(SystemTime::now());
        match result {
            Ok(_) => match self.sink.buffer.ack(id) {
                Ok(()) => {
                    self.delivered();
                    self.metrics.records_delivered.fetch_add(1, Relaxed);
                    if self.metrics.kafka_auth_failing.swap(false, Relaxed) {
                        // Deliveries go through again: credentials and ACLs are fine.
                        self.metrics.set_auth_error(None);
                        tracing::info!("kafka accepts this agent again");
                    }
                    self.metrics.last_delivery_ms.store(now_ms, Relaxed);
                }
                Err(e) => {
                    // The record is in Kafka; failing to delete it means a duplicate
                    // after restart, never a loss.
                    tracing::error!(error = %e, chunk = id.chunk, "cannot remove a delivered record from the buffer");
                }
            },
            Err((e, _)) => {
                // The forwarder owns what happens next; it only stops if it has ended.
                let _ = self.sink.failures.send((id, e.clone()));
            }
        }
        self.sink.progress_ms.store(now_ms, Relaxed);
        let left = self.sink.in_flight.fetch_sub(1, Relaxed).saturating_sub(1);
        // The count falls one report at a time, so a window coming down from above
        // `refill_at` wakes the forwarder exactly once on the way. A failure always
        // wakes it; so does an empty window (a rewind and the shutdown wait for that).
        if result.is_err() || left == 0 || left == self.sink.refill_at {
            self.sink.wake.notify_one();
        }
    }
}

/// Packs a record id into the producer's opaque: 48 bits of chunk, 16 of index
/// (`records_per_chunk` is at most 4096).
pub fn pack_id(id: RecordId) -> usize {
    ((id.chunk << 16) | u64::from(id.index)) as usize
}

/// The record id a delivery opaque carries (see [`pack_id`]).
pub fn unpack_id(v: usize) -> RecordId {
    let v = v as u64;
    RecordId {
        chunk: v >> 16,
        index: (v & 0xFFFF) as u32,
    }
}

/// The agent's producer: delivery reports on librdkafka's own thread.
pub type Producer = ThreadedProducer<AgentContext>;

/// The producer: idempotent, `acks=all`, retries forever (a record waits in the buffer
/// and in librdkafka rather than being given up), statistics every second for the
/// connection state. Passthrough properties are applied last and win.
pub fn producer(k: &KafkaConfig, ctx: AgentContext) -> Result<Producer, KafkaSetupError> {
    let mut c = base_config(k)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.codec", &k.compression)
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set(
            "queue.buffering.max.messages",
            (k.max_in_flight * 2).to_string(),
        )
        .set("statistics.interval.ms", "1000")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "2000");
    apply_passthrough(&mut c, k);
    Ok(c.create_with_context(ctx)?)
}

/// Consumer settings for the command topic (the `tail` tool sets up its own).
///
/// The consumer is a static member of its group, named by the agent's id. A process
/// that dies without leaving the group (a crash, a power cut) stays a member until its
/// session expires; a dynamic member started after it would get no partition until
/// then. Under its instance id the restarted agent takes its partitions back at once.
/// Of two agents started with the same id, Kafka fences one (a fatal consumer error; the
/// command stage then stops the agent, see `commands::run`), where two dynamic members
/// would silently split the partitions.
pub fn consumer_config(
    k: &KafkaConfig,
    group: &str,
    instance: &str,
) -> Result<ClientConfig, KafkaSetupError> {
    let mut c = base_config(k)?;
    c.set("group.id", group)
        .set("group.instance.id", instance)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.commands_offset_reset)
        .set("session.timeout.ms", "10000")
        // Commands must arrive fast; some brokers (tansu) hold an empty fetch for the
        // whole wait, and librdkafka's default of 500 ms would be the command latency.
        .set("fetch.wait.max.ms", "10")
        // librdkafka prefetches up to 64 MB a partition by default, and a fetch of 1 MB
        // of compressed batches unpacks to tens of MB: a command topic with a backlog (a
        // flood, or a long-stopped agent reading from `earliest`) would sit in the
        // agent's memory. Commands are small and handled one at a time, so a little
        // ahead is plenty (a batch bigger than the fetch size still arrives whole).
        // The total fetch size is the bound that holds: tansu answers with up to
        // `fetch.max.bytes` whatever the per-partition size says, and librdkafka raises
        // `fetch.max.bytes` to `message.max.bytes` unless that is lowered with it.
        .set("queued.max.messages.kbytes", "1024")
        .set("queued.min.messages", "1000")
        .set("max.partition.fetch.bytes", "65536")
        .set("fetch.max.bytes", "262144")
        .set("message.max.bytes", "262144")
        .set("topic.metadata.refresh.interval.ms", "5000");
    apply_passthrough(&mut c, k);
    Ok(c)
}

/// Creates every configured topic that does not exist yet.
pub async fn create_topics(k: &KafkaConfig) -> Result<(), KafkaSetupError> {
    let mut c = base_config(k)?;
    apply_passthrough(&mut c, k);
    let admin: AdminClient<_> = c.create()?;
    let topics: Vec<NewTopic<'_>> = k
        .topics
        .all()
        .iter()
        .map(|(kind, name)| {
            let t = NewTopic::new(
                name,
                k.topic_partitions,
                TopicReplication::Fixed(k.replication_factor),
            );
            // The fleet status keeps only each agent's latest message.
            if *kind == "status" {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(extra: &str) -> KafkaConfig {
        let text = format!("bootstrap_servers = \"b:9093\"\n{extra}");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn the_forwarder_refills_a_quarter_of_the_window_at_a_time_and_a_window_of_one_when_empty() {
        assert_eq!(refill_at(4000), 3000);
        assert_eq!(refill_at(7), 6);
        assert_eq!(refill_at(2), 1);
        assert_eq!(refill_at(1), 0);
        assert_eq!(refill_at(0), 0);
    }

    #[test]
    fn tls_verifies_the_hostname_and_finds_a_ca_store_unless_told_otherwise() {
        let c = base_config(&kafka("security_protocol = \"SSL\"")).unwrap();
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        assert_eq!(
            c.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        assert_eq!(c.get("ssl.ca.location"), Some("probe"));
        let c = base_config(&kafka(
            "security_protocol = \"ssl\"\nssl_verify_hostname = false\nssl_ca_file = \"/x/ca.pem\"",
        ))
        .unwrap();
        assert_eq!(c.get("ssl.endpoint.identification.algorithm"), Some("none"));
        assert_eq!(c.get("ssl.ca.location"), Some("/x/ca.pem"));
        let c = base_config(&kafka("")).unwrap();
        assert_eq!(
            c.get("ssl.ca.location"),
            None,
            "no TLS settings without TLS"
        );
    }

    #[test]
    fn refusals_are_named_by_cause() {
        let ssl = KafkaError::Global(RDKafkaErrorCode::SSL);
        let cases = [
            (ssl.clone(), "SSL handshake failed: certificate verify failed: broker certificate could not be verified; agent's own handshake: ... (certificate has expired)", "expired"),
            (ssl.clone(), "SSL handshake failed: certificate verify failed; agent's own handshake: (self-signed certificate in certificate chain)", "trusted CA"),
            (KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure), "Receive failed: error:0A00045C:SSL routines::tlsv13 alert certificate required", "client certificate"),
            (KafkaError::Global(RDKafkaErrorCode::Authentication), "SASL PLAIN mechanism handshake failed: broker's supported mechanisms: (n/a)", "SASL mechanism"),
            (KafkaError::Global(RDKafkaErrorCode::Authentication), "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
                "username or password"),
        ];
        for (e, reason, want) in cases {
            let got = refusal_cause(&e, reason).unwrap_or_default();
            assert!(got.contains(want), "{reason:?} -> {got:?}");
        }
        let away = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(
            refusal_cause(
                &away,
                "Connect to ipv4#127.0.0.1:1 failed: Connection refused"
            ),
            None
        );
    }

    #[test]
    fn record_ids_survive_the_opaque_round_trip() {
        for (chunk, index) in [(0, 0), (1, 4095), ((1 << 47) + 12345, 63)] {
            let id = RecordId { chunk, index };
            assert_eq!(unpack_id(pack_id(id)), id);
        }
    }
}
