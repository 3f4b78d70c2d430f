//! The forwarder: reads durable records in order and produces them; a record leaves the
//! buffer only when its delivery report says it is written.
//!
//! Delivery reports arrive in the producer's callback (`AgentContext` in `kafka/mod.rs`), which
//! acks successes in the buffer directly and hands failures to this task; each record
//! travels as a packed `usize` opaque, so nothing is allocated per record for tracking.
//!
//! Ordering: the producer is idempotent with infinite retries (`message.timeout.ms=0`), so
//! librdkafka keeps per-partition order through broker stalls and reconnects and does not
//! fail a record because the broker is slow or away; records simply wait (in the window,
//! then in the buffer). A delivery report can still fail, for a permanent reason (too
//! large, not authorised: the record goes to the dead-letter tree, is counted, and raises
//! an alert) or a fatal producer error. For anything else the forwarder stops handing out
//! records, waits for the in-flight window to report, and *rewinds* to the oldest
//! unacknowledged record. Everything unacknowledged is then sent again in buffer order;
//! records of the same key that were acknowledged meanwhile are not, so in that rare case
//! the resent record lands after them; consumers see it by its lower `seq`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{pack_id, DeliverySink, Producer};
use crate::buffer::{Buffer, BufferError, ReadChunk, RecordId, RecordRef};
use crate::ingest::Ingest;
use crate::kafka::config::Topics;
use crate::metrics::{DropReason, Metrics};
use crate::record::{Body, Draft, Priority, Stored, TopicKind, AGENT_DEVICE, SCHEMA_VERSION};

/// How long to wait before sending again after a failed delivery.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// ... and after the broker refused the credentials or the authorisation: a human has
/// to fix those, so there is no point in asking often.
const AUTH_BACKOFF: Duration = Duration::from_secs(5);
/// Records in flight with no delivery report for this long, while librdkafka says a
/// broker is up, mean the producer is wedged: the forwarder stops beating, and the
/// systemd watchdog restarts the agent.
pub const DELIVERY_STALL: Duration = Duration::from_secs(90);

/// Why the forwarder stopped.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error(transparent)]
    /// The buffer failed; the agent stops.
    Buffer(#[from] BufferError),
    /// librdkafka's idempotent producer hit a fatal error: it cannot send again. The
    /// agent exits and systemd starts it with a new producer; the records wait in the
    /// buffer.
    #[error("kafka producer failed fatally: {0}")]
    Fatal(String),
}
/// Records in flight and no delivery report for this long: the broker is stalled or
/// away, and the forwarder stops handing records to the producer until reports come
/// again. What it has not handed waits in the buffer, where its waiting time is seen
/// and it is marked replayed when sent; librdkafka's queue stays small meanwhile.
pub const STALL_GATE: Duration = Duration::from_secs(1);
/// How long to wait when librdkafka's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);

/// Reads the buffer in order and hands records to the producer, within the in-flight window.
pub struct Forwarder {
    /// Where records come from and are acked in.
    pub buffer: Arc<Buffer>,
    /// The idempotent producer.
    pub producer: Producer,
    /// Shared with the producer's delivery callback.
    pub sink: Arc<DeliverySink>,
    /// Failed delivery reports from the callback.
    pub failures: mpsc::UnboundedReceiver<(RecordId, KafkaError)>,
    /// Which topic each kind of record goes to.
    pub topics: Topics,
    /// Used as the key of agent records.
    pub agent_id: String,
    /// Delivery counters and Kafka state.
    pub metrics: Arc<Metrics>,
    /// Where dead-letter alerts go.
    pub ingest: Ingest,
    /// Records handed to the producer and not yet reported, at most.
    pub window: usize,
    /// A record older than this (since ingest) is marked replayed when sent.
    pub replayed_after_ms: u64,
}

/// The payload of a record that waited `waited_ms` in the buffer: the stored JSON object
/// with `"replayed":true,"buffered_ms":…` added. `None` when the payload is not a JSON
/// object (never written by this agent; sent unchanged).
pub fn replayed_payload(payload: &[u8], waited_ms: u64) -> Option<Vec<u8>> {
    let body = payload.strip_suffix(b"}")?;
    if !payload.starts_with(b"{") || body.len() < 2 {
        return None;
    }
    let tail = format!(",\"replayed\":true,\"buffered_ms\":{waited_ms}}}");
    let mut out = Vec::with_capacity(payload.len() + tail.len());
    out.extend_from_slice(body);
    out.extend_from_slice(tail.as_bytes());
    Some(out)
}

/// What happened to one attempt to hand a record to the producer.
enum Handed {
    Sent,
    QueueFull,
    Failed(KafkaError),
}

impl Forwarder {
    fn topic(&self, kind: TopicKind) -> &str {
        self.topics.name(kind)
    }

    fn hand(&self, id: RecordId, rec: RecordRef<'_>, version: &str, now_ms: u64) -> Handed {
        let waited_ms = now_ms.saturating_sub(rec.ingested_ms);
        let replayed = if waited_ms > self.replayed_after_ms {
            replayed_payload(rec.payload, waited_ms)
        } else {
            None
        };
        let waited = replayed.as_ref().map(|_| waited_ms.to_string());
        let mut headers = OwnedHeaders::new_with_capacity(6)
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            })
            .insert(Header {
                key: "schema-version",
                value: Some(version),
            })
            .insert(Header {
                key: "agent-id",
                value: Some(self.agent_id.as_str()),
            })
            .insert(Header {
                key: "device-id",
                value: Some(rec.device_id),
            });
        if let Some(ms) = &waited {
            headers = headers
                .insert(Header {
                    key: "replayed",
                    value: Some("true"),
                })
                .insert(Header {
                    key: "buffered-ms",
                    value: Some(ms.as_str()),
                });
        }
        let payload = replayed.as_deref().unwrap_or(rec.payload);
        let record = BaseRecord::with_opaque_to(self.topic(rec.topic), pack_id(id))
            .key(rec.key)
            .payload(payload)
            .headers(headers);
        // Count first: the delivery callback may run before send returns.
        if self.sink.in_flight.fetch_add(1, Relaxed) == 0 {
            self.sink.progress_ms.store(now_ms, Relaxed);
        }
        match self.producer.send(record) {
            Ok(()) => Handed::Sent,
            Err((e, _)) => {
                self.sink.in_flight.fetch_sub(1, Relaxed);
                match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => Handed::QueueFull,
                    e => Handed::Failed(e),
                }
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.sink.in_flight.load(Relaxed)
    }

    /// Whether records are in flight with no delivery report for [`STALL_GATE`].
    fn stalled(&self, now_ms: u64) -> bool {
        self.in_flight() > 0
            && now_ms.saturating_sub(self.sink.progress_ms.load(Relaxed))
                > STALL_GATE.as_millis() as u64
    }

    /// Runs until `shutdown`, then delivers what is durable (the shutdown's own records
    /// among it) for up to `grace`.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), ForwarderError> {
        let version = SCHEMA_VERSION.to_string();
        let mut pending = ReadChunk::default();
        let mut durable = self.buffer.subscribe_durable();
        let mut rewinding = false;
        let mut resume_at: Option<Instant> = None;
        let mut auth_alerted = false;
        let mut progress = Progress::new();
        // Wakes an idle loop so its heartbeat shows it is alive (systemd watchdog).
        let mut beat = tokio::time::interval(crate::heartbeat::BEAT_EVERY);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.check_fatal()?;
            if progress.moving(self.in_flight(), &self.metrics) {
                self.metrics.beats.forwarder.beat();
            }
            // Failed reports first: they decide whether sending may go on.
            while let Ok((id, e)) = self.failures.try_recv() {
                match self.on_failure(id, e).await? {
                    Retry::No => {}
                    Retry::Soon => rewinding = true,
                    Retry::Later => {
                        rewinding = true;
                        resume_at = Some(Instant::now() + AUTH_BACKOFF);
                    }
                }
            }
            auth_alerted = self.alert_auth(auth_alerted).await;
            self.report_quarantine().await;
            let mut wait_short = false;
            let may_send = !rewinding && resume_at.is_none_or(|t| Instant::now() >= t);
            if may_send {
                resume_at = None;
                match self.fill(&mut pending, &version).await? {
                    Filled::QueueFull => wait_short = true,
                    Filled::Failed(e) => {
                        tracing::warn!(error = %e, "produce failed; will resend from the oldest unacked record");
                        self.metrics.delivery_errors.fetch_add(1, Relaxed);
                        rewinding = true;
                    }
                    Filled::Window | Filled::Empty => {}
                    // Woken by a report that refills or empties the window, by new
                    // durable records, or by the beat.
                    Filled::Stalled => {}
                }
            }
            if rewinding && self.in_flight() == 0 && self.failures.is_empty() {
                self.buffer.rewind();
                pending.clear();
                rewinding = false;
                let backoff = Instant::now() + RETRY_BACKOFF;
                resume_at = Some(resume_at.map_or(backoff, |t| t.max(backoff)));
            }
            let sleep_for = if wait_short {
                Some(QUEUE_FULL_WAIT)
            } else {
                resume_at.map(|t| t.saturating_duration_since(Instant::now()))
            };
            let sink = self.sink.clone();
            tokio::select! {
                () = sink.wake.notified() => {}
                r = durable.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                () = sleep_opt(sleep_for), if sleep_for.is_some() => {}
                _ = beat.tick() => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.drain(pending, grace, &version).await
    }

    /// Hands records to the producer, from `pending` and then the buffer, until the
    /// in-flight window is full or nothing durable is left; dead-letters what the
    /// producer refuses for good on the spot.
    async fn fill(&self, pending: &mut ReadChunk, version: &str) -> Result<Filled, ForwarderError> {
        let now_ms = crate::record::unix_ms(std::time::SystemTime::now());
        if self.stalled(now_ms) {
            return Ok(Filled::Stalled);
        }
        while self.in_flight() < self.window {
            if pending.is_empty() && !self.buffer.read_chunk_into(pending)? {
                return Ok(Filled::Empty);
            }
            let Some((id, rec)) = pending.front() else {
                return Ok(Filled::Empty);
            };
            match self.hand(id, rec, version, now_ms) {
                Handed::Sent => pending.advance(),
                // Stays first in `pending` for the next call.
                Handed::QueueFull => return Ok(Filled::QueueFull),
                Handed::Failed(e) if is_permanent(&e) => {
                    let rec = rec.to_stored();
                    pending.advance();
                    self.dead_letter(id, &rec, &e).await?;
                }
                // The run loop rewinds: `pending` is cleared and read again.
                Handed::Failed(e) => return Ok(Filled::Failed(e)),
            }
        }
        Ok(Filled::Window)
    }

    /// Chunks the buffer could not decode and moved aside: counted as dropped and
    /// reported by one `buffer_chunks_quarantined` event each time some are found.
    async fn report_quarantine(&self) {
        let (chunks, records) = self.buffer.take_quarantined();
        if chunks == 0 {
            return;
        }
        self.metrics.count_drop(DropReason::CorruptChunk, records);
        tracing::error!(
            chunks,
            records,
            "undecodable buffer chunks quarantined; their records are lost"
        );
        self.ingest
            .event(
                "buffer_chunks_quarantined",
                crate::record::object([
                    ("chunks", chunks.into()),
                    ("records", records.into()),
                    (
                        "quarantined_total",
                        self.buffer.stats_cached().quarantined_chunks.into(),
                    ),
                ]),
            )
            .await;
    }

    fn check_fatal(&self) -> Result<(), ForwarderError> {
        let fatal = self
            .sink
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match fatal {
            Some(reason) => Err(ForwarderError::Fatal(reason)),
            None => Ok(()),
        }
    }

    /// Handles a failed report: dead-letters it, or says when to send again.
    async fn on_failure(&self, id: RecordId, e: KafkaError) -> Result<Retry, ForwarderError> {
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            return Err(ForwarderError::Fatal(e.to_string()));
        }
        if is_permanent(&e) {
            if let Some(rec) = self.buffer.get(id)? {
                self.dead_letter(id, &rec, &e).await?;
            }
            return Ok(Retry::No);
        }
        self.metrics.delivery_errors.fetch_add(1, Relaxed);
        if is_auth(&e) {
            let cause = super::refusal_cause(&e, "")
                .unwrap_or_else(|| format!("the broker refused this agent: {e}"));
            self.metrics.note_refusal(&cause, "producer");
            return Ok(Retry::Later);
        }
        tracing::warn!(error = %e, chunk = id.chunk, "delivery failed; will resend from the oldest unacked record");
        Ok(Retry::Soon)
    }

    /// Raises one alert per episode of refused credentials or authorisation (the alert
    /// may itself wait in the buffer if the alerts topic is refused too: it is not
    /// raised again). Returns whether an alert stands for the current episode.
    async fn alert_auth(&self, alerted: bool) -> bool {
        // The flag first: this runs on every turn of the loop, the lock only in an episode.
        if !self.metrics.kafka_auth_failing.load(Relaxed) {
            return false;
        }
        if alerted {
            return true;
        }
        let Some(reason) = self.metrics.auth_error() else {
            return false;
        };
        let alert = agent_alert(
            "kafka",
            format!("Kafka refuses this agent ({reason}); records are kept in the buffer and sent again once the credentials or ACLs are fixed"),
        );
        if self.ingest.send(alert).await.is_err() {
            tracing::warn!("kafka authorisation alert not sent: ingest is shutting down");
        }
        true
    }

    async fn dead_letter(
        &self,
        id: RecordId,
        rec: &Stored,
        e: &KafkaError,
    ) -> Result<(), BufferError> {
        let reason = e.to_string();
        self.buffer.dead_letter(id, rec, &reason)?;
        self.metrics.count_drop(DropReason::DeadLetter, 1);
        tracing::error!(device = %rec.device_id, seq = rec.seq, topic = self.topic(rec.topic), error = %reason, "record dead-lettered: broker refused it");
        if !deserves_alert(rec) {
            return Ok(());
        }
        let alert = agent_alert(
            &rec.device_id,
            format!(
                "record seq {} of device {} refused by Kafka and kept in the dead-letter tree: {reason}",
                rec.seq, rec.device_id
            ),
        );
        // Ingest runs until every handle is gone; only a shutdown race can fail here, and
        // then the dead letter itself is still on disk.
        if self.ingest.send(alert).await.is_err() {
            tracing::warn!("dead-letter alert not sent: ingest is shutting down");
        }
        Ok(())
    }

    /// At shutdown: keeps sending what is durable (what the shutdown itself produced
    /// among it: stop events, final aggregates) and waits for reports, up to `grace`.
    async fn drain(
        mut self,
        mut pending: ReadChunk,
        grace: Duration,
        version: &str,
    ) -> Result<(), ForwarderError> {
        let n = self.in_flight();
        let deadline = Instant::now() + grace;
        let mut sending = true;
        while Instant::now() < deadline {
            self.check_fatal()?;
            while let Ok((id, e)) = self.failures.try_recv() {
                if self.on_failure(id, e).await? != Retry::No {
                    // No resending at shutdown: what failed waits for the next start.
                    sending = false;
                }
            }
            let mut filled = Filled::Empty;
            if sending {
                filled = self.fill(&mut pending, version).await?;
                if matches!(filled, Filled::Failed(_)) {
                    sending = false;
                }
            }
            if self.in_flight() == 0 && (matches!(filled, Filled::Empty) || !sending) {
                break;
            }
            let sink = self.sink.clone();
            let _ = tokio::time::timeout_at(
                deadline.min(Instant::now() + QUEUE_FULL_WAIT * 5),
                sink.wake.notified(),
            )
            .await;
        }
        let left = self.in_flight();
        if left == 0 {
            tracing::info!(in_flight = n, "forwarder drained");
        } else {
            tracing::warn!(
                left,
                "shutdown grace over; unacked records stay buffered and are sent on next start"
            );
        }
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(1))).await;
        Ok(())
    }
}

/// Where [`Forwarder::fill`] stopped.
enum Filled {
    /// The in-flight window is full.
    Window,
    /// Nothing durable is left to send.
    Empty,
    /// librdkafka's queue is full: try again shortly.
    QueueFull,
    /// The producer refused a record for a reason that sending again may fix.
    Failed(KafkaError),
    /// Records in flight and no report for [`STALL_GATE`]: wait for the broker.
    Stalled,
}

/// When a failed record may be sent again.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// Dead-lettered: never.
    No,
    /// After the short backoff.
    Soon,
    /// After the long one (credentials, ACLs).
    Later,
}

/// Whether delivery is moving, for the forwarder's heartbeat (which the systemd watchdog
/// requires): nothing in flight, a record acknowledged within [`DELIVERY_STALL`], or a
/// reason to wait that a restart would not cure (no broker up, credentials or ACLs
/// refused). Failed reports alone do not count: a forwarder that resends and fails
/// forever is stuck.
struct Progress {
    waiting_since: Option<Instant>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            waiting_since: None,
        }
    }

    fn moving(&mut self, in_flight: usize, metrics: &Metrics) -> bool {
        if in_flight == 0
            || !metrics.kafka_connected.load(Relaxed)
            || metrics.kafka_auth_failing.load(Relaxed)
        {
            self.waiting_since = None;
            return true;
        }
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let acked = metrics.last_delivery_ms.load(Relaxed);
        let now = crate::record::unix_ms(std::time::SystemTime::now());
        let acked_recently =
            acked > 0 && now.saturating_sub(acked) < DELIVERY_STALL.as_millis() as u64;
        acked_recently || since.elapsed() < DELIVERY_STALL
    }
}

/// Whether a dead letter gets an alert: not when it is itself an alert of the agent's
/// own (about a dead letter, say), refused in turn. It is counted and kept like any
/// dead letter, but alerting about it could loop for as long as the alerts topic
/// refuses alerts.
fn deserves_alert(rec: &Stored) -> bool {
    !(rec.topic == TopicKind::Alerts && rec.device_id == AGENT_DEVICE)
}

/// An alert of the agent's own about `subject`.
fn agent_alert(subject: &str, message: String) -> Draft {
    Draft::new(
        AGENT_DEVICE,
        Body::Alert {
            alert_id: uuid::Uuid::new_v4().to_string(),
            sensor_id: subject.to_string(),
            sensor_type: "agent".into(),
            priority: Priority::High,
            message,
            value: None,
            threshold: None,
            acknowledged: false,
            state: None,
            unit: None,
        },
    )
}

async fn sleep_opt(d: Option<Duration>) {
    if let Some(d) = d {
        tokio::time::sleep(d).await;
    }
}

/// Errors that sending again cannot fix.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    let code = match e {
        KafkaError::MessageProduction(c) => *c,
        _ => match e.rdkafka_error_code() {
            Some(c) => c,
            None => return false,
        },
    };
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
    )
}

/// Errors that name the credentials or the authorisation: a person can fix them, and
/// then the same records go through, so they are retried (with an alert), never
/// dead-lettered.
pub fn is_auth(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    let code = match e {
        KafkaError::MessageProduction(c) => Some(*c),
        _ => e.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication
                | C::SSL
                | C::DelegationTokenAuthorizationFailed
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_payload_is_the_same_object_with_two_fields_more() {
        let p = br#"{"type":"sensor_reading","value":1.5,"seq":3}"#;
        let r = replayed_payload(p, 12_345).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
        let mut want: serde_json::Value = serde_json::from_slice(p).unwrap();
        want["replayed"] = true.into();
        want["buffered_ms"] = 12_345.into();
        assert_eq!(v, want);
        assert_eq!(replayed_payload(b"[1]", 1), None);
        assert_eq!(replayed_payload(b"{}", 1), None);
        assert_eq!(replayed_payload(b"", 1), None);
    }

    #[test]
    fn a_dead_lettered_alert_of_the_agent_is_not_alerted_again() {
        let stored =
            |d: &Draft| crate::record::stamp(d, "a", 0, std::time::SystemTime::now()).unwrap();
        let alert = stored(&agent_alert("pstat-1", "record refused".into()));
        assert!(!deserves_alert(&alert), "would loop");
        let reading = stored(&Draft::new(
            "env-1",
            Body::SensorReading {
                sensor_id: "t".into(),
                sensor_type: "temperature".into(),
                value: 1.0,
                unit: "C".into(),
                location: None,
                metadata: Default::default(),
            },
        ));
        assert!(deserves_alert(&reading));
        // A device's own threshold alert that is refused still gets the agent's alert.
        let mut device_alert = alert.clone();
        device_alert.device_id = "env-1".into();
        assert!(deserves_alert(&device_alert));
    }

    #[test]
    fn the_heartbeat_needs_delivery_to_move_while_records_are_in_flight() {
        let m = Metrics::new();
        m.kafka_connected.store(true, Relaxed);
        let stalled = || Progress {
            waiting_since: Some(Instant::now() - DELIVERY_STALL - Duration::from_secs(1)),
        };
        // Records in flight, a broker up, nothing acknowledged for longer than the
        // stall (failed reports may come and go): stuck.
        assert!(!stalled().moving(5, &m));
        // Just started waiting: not yet.
        assert!(Progress::new().moving(5, &m));
        // Nothing in flight: nothing to wait for.
        assert!(stalled().moving(0, &m));
        // A record acknowledged just now.
        m.last_delivery_ms.store(
            crate::record::unix_ms(std::time::SystemTime::now()),
            Relaxed,
        );
        assert!(stalled().moving(5, &m));
        m.last_delivery_ms.store(0, Relaxed);
        // Refused credentials: a restart would not help; the alert and /health say it.
        m.set_auth_error(Some("SASL authentication failed".into()));
        assert!(stalled().moving(5, &m));
        m.set_auth_error(None);
        // No broker up: waiting is expected, the watchdog must not restart the agent.
        m.kafka_connected.store(false, Relaxed);
        assert!(stalled().moving(5, &m));
    }

    #[test]
    fn too_large_and_unauthorised_are_permanent_but_timeouts_are_not() {
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        // Refused credentials or ACLs are fixed by a person, then sent again.
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
        assert!(is_auth(&KafkaError::MessageProduction(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
        assert!(is_auth(&KafkaError::MessageProduction(
            RDKafkaErrorCode::SaslAuthenticationFailed
        )));
        assert!(!is_auth(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut
        )));
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopicOrPartition
        )));
        assert!(!is_permanent(&KafkaError::Canceled));
    }
}
