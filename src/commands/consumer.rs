//! The consumer: the command topic's partitions, the lease contact, and the loop that
//! hands each message to the handler and stores its offset once its result is durable.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

use super::policy::CommandsConfig;
use super::{lease, CommandError, Handler, Meta};
use crate::kafka::KafkaConfig;
use crate::metrics::Metrics;

/// Assigns the command topic's partitions with concrete positions, so `/status` can say
/// when commands can arrive.
///
/// A new consumer group at `latest` would otherwise resolve its position just after
/// assignment, and a command produced in that instant would never be seen. So partitions
/// without a committed offset are assigned at their current end (or start, for
/// `earliest`) explicitly, before `commands_assigned` turns true.
pub struct CommandContext {
    /// Where assignment and lag are reported.
    pub metrics: Arc<Metrics>,
    /// Unassigned partitions start at their beginning rather than their end.
    pub earliest: bool,
    /// With TLS: names why the broker's certificate failed verification.
    pub tls: Option<Arc<crate::kafka::tls::TlsProbe>>,
}

impl ClientContext for CommandContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !crate::kafka::note_client_error(
            &self.metrics,
            self.tls.as_ref(),
            "command consumer",
            &error,
            reason,
        ) {
            tracing::warn!(%error, reason, "kafka command consumer error");
        }
    }
}

impl ConsumerContext for CommandContext {
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr as E;
        match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let timeout = Duration::from_secs(5);
                let committed = consumer.committed_offsets(tpl.clone(), timeout);
                let mut fixed = tpl.clone();
                for p in tpl.elements() {
                    let known = committed.as_ref().ok().and_then(|c| {
                        c.find_partition(p.topic(), p.partition())
                            .map(|e| e.offset())
                    });
                    if matches!(known, Some(rdkafka::Offset::Offset(_))) {
                        continue;
                    }
                    let start = match consumer.fetch_watermarks(p.topic(), p.partition(), timeout) {
                        Ok((low, high)) => {
                            rdkafka::Offset::Offset(if self.earliest { low } else { high })
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the command topic's offsets; librdkafka's reset policy decides");
                            continue;
                        }
                    };
                    let _ = fixed.set_partition_offset(p.topic(), p.partition(), start);
                }
                match consumer.assign(&fixed) {
                    Ok(()) => {
                        tracing::info!(partitions = fixed.count(), "command topic assigned");
                        self.metrics
                            .commands_assigned
                            .store(fixed.count() > 0, Relaxed);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot assign the command topic"),
                }
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.metrics.commands_assigned.store(false, Relaxed);
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "cannot unassign the command topic");
                }
            }
            other => {
                tracing::warn!(error = ?other, "command consumer rebalance error");
                self.metrics.commands_assigned.store(false, Relaxed);
                let _ = consumer.unassign();
            }
        }
    }
}

/// Milliseconds since `epoch` at the last moment the command topic was known reachable.
pub(super) struct Contact {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Contact {
    pub(super) fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }
    pub(super) fn silent_for(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Relaxed)))
    }
}

/// A consumer that librdkafka has declared unusable ends the stage, and with it the
/// process: it would never deliver another command.
fn fatal(consumer: &StreamConsumer<CommandContext>, instance: &str) -> Option<CommandError> {
    let (code, reason) = consumer.client().fatal_error()?;
    tracing::error!(error = %code, reason, "command consumer fatal error");
    Some(CommandError::Fatal {
        reason: if code == rdkafka::types::RDKafkaErrorCode::FencedInstanceId {
            format!("{reason}: another agent with agent_id \"{instance}\" consumes commands in this group")
        } else {
            reason
        },
    })
}

/// Consumes the command topic until shutdown.
pub async fn run(
    kafka: &KafkaConfig,
    group: &str,
    instance: &str,
    policy: &CommandsConfig,
    handler: Arc<Handler>,
    shutdown: CancellationToken,
) -> Result<(), CommandError> {
    let consumer: Arc<StreamConsumer<CommandContext>> = Arc::new(
        crate::kafka::consumer_config(kafka, group, instance)?.create_with_context(
            CommandContext {
                metrics: handler.metrics.clone(),
                earliest: kafka.commands_offset_reset == "earliest",
                tls: kafka
                    .security_protocol
                    .uses_tls()
                    .then(|| crate::kafka::tls::TlsProbe::new(kafka)),
            },
        )?,
    );
    consumer.subscribe(&[kafka.topics.commands.as_str()])?;
    tracing::info!(topic = %kafka.topics.commands, group = %group, instance = %instance, "consuming commands");

    match handler.replay.purge(SystemTime::now()) {
        Ok(n) => tracing::debug!(purged = n, kept = handler.replay.len(), "replay store"),
        Err(e) => tracing::warn!(error = %e, "cannot purge the replay store"),
    }
    let contact = Arc::new(Contact {
        epoch: Instant::now(),
        last_ms: AtomicU64::new(0),
    });
    let lease_stop = shutdown.child_token();
    let lease_task = tokio::spawn(lease::watch(
        policy.clone(),
        kafka.topics.commands.clone(),
        consumer.clone(),
        contact.clone(),
        handler.clone(),
        lease_stop.clone(),
    ));
    let mut purge_at = Instant::now() + Duration::from_secs(60);
    let mut beat = tokio::time::interval(crate::heartbeat::BEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = None;
    loop {
        handler.metrics.beats.commands.beat();
        let msg = tokio::select! {
            m = consumer.recv() => m,
            _ = beat.tick() => {
                failed = fatal(&consumer, instance);
                if failed.is_some() {
                    break;
                }
                continue;
            }
            () = shutdown.cancelled() => break,
        };
        match msg {
            Ok(m) => {
                contact.touch();
                let meta = Meta {
                    kafka_time: m
                        .timestamp()
                        .to_millis()
                        .and_then(|ms| u64::try_from(ms).ok())
                        .and_then(crate::time::from_unix_ms),
                    position: Some((m.partition(), m.offset())),
                };
                handler.handle(m.payload().unwrap_or(b""), meta).await;
                if let Err(e) = consumer.store_offset_from_message(&m) {
                    tracing::warn!(error = %e, "cannot store command offset");
                }
            }
            Err(e) => {
                failed = fatal(&consumer, instance);
                if failed.is_some() {
                    break;
                }
                tracing::warn!(error = %e, "command consumer error");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
        if Instant::now() >= purge_at {
            purge_at = Instant::now() + Duration::from_secs(60);
            if let Err(e) = handler.replay.purge(SystemTime::now()) {
                tracing::warn!(error = %e, "cannot purge the replay store");
            }
        }
    }
    lease_stop.cancel();
    let _ = lease_task.await;
    // Device answers still outstanding end when the devices stop (they are stopped
    // first at shutdown), so this wait is short.
    handler.waits.close();
    handler.waits.wait().await;
    match failed {
        Some(e) => Err(e),
        None => {
            // Commit stored offsets before leaving.
            let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
            Ok(())
        }
    }
}
