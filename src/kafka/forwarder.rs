//! The forwarder: reads durable records in order and produces them; a record leaves the
//! buffer only when its delivery report says it is written.
//!
//! Ordering: the producer is idempotent with infinite retries (`message.timeout.ms=0`), so
//! within a producer session librdkafka itself keeps per-partition order through broker
//! stalls and reconnects; the forwarder never gives a record up because the broker is
//! slow. If a delivery report still fails with a retriable error, the forwarder stops
//! handing out records, waits for everything in flight to report, and *rewinds* to the
//! oldest unacknowledged record, sending again from there: later records of the same key
//! can then only arrive after the earlier one (possibly as duplicates with the same
//! `event_id`), never before it alone.
//!
//! Permanent rejections (too large, not authorised, invalid) go to the dead-letter tree,
//! are counted, and raise an alert record.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Producer;
use crate::buffer::{Buffer, BufferError, RecordId};
use crate::config::Topics;
use crate::ingest::Ingest;
use crate::metrics::{DropReason, Metrics};
use crate::record::{Body, Draft, Priority, Stored, TopicKind, AGENT_DEVICE, SCHEMA_VERSION};

/// How long to wait before sending again after a failed delivery.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// How long to wait when librdkafka's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

type Report = (RecordId, String, Result<(), KafkaError>);
type InFlight = Pin<Box<dyn Future<Output = Report> + Send>>;

pub struct Forwarder {
    pub buffer: Arc<Buffer>,
    pub producer: Producer,
    pub topics: Topics,
    pub agent_id: String,
    pub metrics: Arc<Metrics>,
    /// Where dead-letter alerts go.
    pub ingest: Ingest,
    /// Records handed to the producer and not yet reported, at most.
    pub window: usize,
}

/// What happened to one attempt to hand a record to the producer.
enum Handed {
    Sent(InFlight),
    QueueFull,
    Failed(KafkaError),
}

impl Forwarder {
    fn topic(&self, kind: TopicKind) -> &str {
        match kind {
            TopicKind::Events => &self.topics.events,
            TopicKind::Data => &self.topics.data,
            TopicKind::Sensors => &self.topics.sensors,
            TopicKind::Alerts => &self.topics.alerts,
            TopicKind::CommandResults => &self.topics.command_results,
        }
    }

    fn hand(&self, id: RecordId, rec: &Stored) -> Handed {
        let seq = SCHEMA_VERSION.to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            })
            .insert(Header {
                key: "schema-version",
                value: Some(seq.as_str()),
            })
            .insert(Header {
                key: "agent-id",
                value: Some(self.agent_id.as_str()),
            })
            .insert(Header {
                key: "device-id",
                value: Some(rec.device_id.as_str()),
            });
        let record = FutureRecord::to(self.topic(rec.topic))
            .key(rec.key.as_str())
            .payload(rec.payload.as_slice())
            .headers(headers);
        match self.producer.send_result(record) {
            Ok(fut) => {
                let dev = rec.device_id.clone();
                Handed::Sent(Box::pin(async move {
                    let res = match fut.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => Err(e),
                        Err(_) => Err(KafkaError::Canceled),
                    };
                    (id, dev, res)
                }))
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Handed::QueueFull
            }
            Err((e, _)) => Handed::Failed(e),
        }
    }

    /// Runs until `shutdown`, then waits up to `grace` for records in flight.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), BufferError> {
        let mut inflight: FuturesUnordered<InFlight> = FuturesUnordered::new();
        let mut pending: VecDeque<(RecordId, Stored)> = VecDeque::new();
        let mut durable = self.buffer.subscribe_durable();
        let mut rewinding = false;
        let mut resume_at: Option<Instant> = None;
        loop {
            let mut wait_short = false;
            let may_send = !rewinding && resume_at.is_none_or(|t| Instant::now() >= t);
            if may_send {
                resume_at = None;
                while inflight.len() < self.window {
                    if pending.is_empty() {
                        match self.buffer.read_next()? {
                            Some(recs) => pending.extend(recs),
                            None => break,
                        }
                    }
                    let Some((id, rec)) = pending.pop_front() else {
                        break;
                    };
                    match self.hand(id, &rec) {
                        Handed::Sent(f) => inflight.push(f),
                        Handed::QueueFull => {
                            pending.push_front((id, rec));
                            wait_short = true;
                            break;
                        }
                        Handed::Failed(e) if is_permanent(&e) => {
                            self.dead_letter(id, &rec, &e).await?;
                        }
                        Handed::Failed(e) => {
                            tracing::warn!(error = %e, "produce failed; will retry from the oldest unacked record");
                            self.metrics.delivery_errors.fetch_add(1, Relaxed);
                            rewinding = true;
                            break;
                        }
                    }
                }
            }
            if rewinding && inflight.is_empty() {
                self.buffer.rewind();
                pending.clear();
                rewinding = false;
                resume_at = Some(Instant::now() + RETRY_BACKOFF);
            }
            let sleep_for = if wait_short {
                Some(QUEUE_FULL_WAIT)
            } else {
                resume_at.map(|t| t.saturating_duration_since(Instant::now()))
            };
            tokio::select! {
                Some(report) = inflight.next(), if !inflight.is_empty() => {
                    if self.on_report(report).await? {
                        rewinding = true;
                    }
                    // Take every report that is ready before looking at the buffer again.
                    while let Some(Some(report)) = futures_util::FutureExt::now_or_never(inflight.next()) {
                        if self.on_report(report).await? {
                            rewinding = true;
                        }
                    }
                }
                r = durable.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                () = sleep_opt(sleep_for), if sleep_for.is_some() => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.drain(inflight, grace).await
    }

    /// Handles one delivery report; returns true when the caller must rewind.
    async fn on_report(&self, (id, dev, res): Report) -> Result<bool, BufferError> {
        match res {
            Ok(()) => {
                self.buffer.ack(id, &dev)?;
                self.metrics.records_delivered.fetch_add(1, Relaxed);
                Ok(false)
            }
            Err(e) if is_permanent(&e) => {
                if let Some(rec) = self.buffer.get(id)? {
                    self.dead_letter(id, &rec, &e).await?;
                }
                Ok(false)
            }
            Err(e) => {
                self.metrics.delivery_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, device = %dev, "delivery failed; will resend from the oldest unacked record");
                Ok(true)
            }
        }
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
        let alert = Draft::new(
            AGENT_DEVICE,
            Body::Alert {
                alert_id: uuid::Uuid::new_v4().to_string(),
                sensor_id: rec.device_id.clone(),
                sensor_type: "agent".into(),
                priority: Priority::High,
                message: format!(
                    "record seq {} of device {} refused by Kafka and kept in the dead-letter tree: {reason}",
                    rec.seq, rec.device_id
                ),
                value: None,
                threshold: None,
                acknowledged: false,
            },
        );
        // Ingest runs until every handle is gone; only a shutdown race can fail here, and
        // then the dead letter itself is still on disk.
        if self.ingest.send(alert).await.is_err() {
            tracing::warn!("dead-letter alert not sent: ingest is shutting down");
        }
        Ok(())
    }

    async fn drain(
        self,
        mut inflight: FuturesUnordered<InFlight>,
        grace: Duration,
    ) -> Result<(), BufferError> {
        let n = inflight.len();
        let deadline = Instant::now() + grace;
        while !inflight.is_empty() {
            match tokio::time::timeout_at(deadline, inflight.next()).await {
                Ok(Some(report)) => {
                    self.on_report(report).await?;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(left = inflight.len(), "shutdown grace over; unacked records stay buffered and are sent on next start");
                    break;
                }
            }
        }
        if inflight.is_empty() {
            tracing::info!(in_flight = n, "forwarder drained");
        }
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(1))).await;
        Ok(())
    }
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
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidTopic
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_and_unauthorised_are_permanent_but_timeouts_are_not() {
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::TopicAuthorizationFailed
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
