//! Ingest: the one place where records are stamped and made durable.
//!
//! Drivers, the command path and the agent send [`Draft`]s through an [`Ingest`] handle.
//! One task receives them in batches, gives each its device's next `seq`, encodes it,
//! appends it to the buffer, and group-commits: it flushes at most every
//! `commit_interval`. A sender that must not acknowledge anything upstream before the
//! record is durable (an MQTT ack, a command offset) uses [`Ingest::send_durable`],
//! which returns only after the flush that covers the record; while such a sender waits,
//! the flush happens at once instead of at the end of the interval.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::buffer::{AppendOutcome, Buffer, BufferError};
use crate::metrics::{DropReason, Metrics};
use crate::record::{object, stamp, Draft, Stored, AGENT_DEVICE};

/// How many records one receive takes at most (bounds a single sled batch).
const BATCH: usize = 4096;
/// Drop reports are emitted at most this often.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest has shut down")]
    Closed,
    #[error("buffer is full; record rejected (overflow policy reject_new)")]
    Rejected,
    #[error("buffer write failed: {0}")]
    Buffer(String),
}

struct Item {
    draft: Draft,
    done: Option<oneshot::Sender<Result<(), IngestError>>>,
}

/// The sending side of ingest. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Item>,
}

impl Ingest {
    /// Queues a record. Waits only if ingest itself is behind (never on Kafka).
    pub async fn send(&self, draft: Draft) -> Result<(), IngestError> {
        self.tx
            .send(Item { draft, done: None })
            .await
            .map_err(|_| IngestError::Closed)
    }

    /// Queues an agent event. Events report on the agent; failing to queue one (ingest
    /// has closed at shutdown) is logged, not passed on.
    pub async fn event(&self, event: &str, data: serde_json::Map<String, serde_json::Value>) {
        if let Err(e) = self.send(Draft::agent_event(event, data)).await {
            tracing::error!(error = %e, event, "event not buffered");
        }
    }

    /// Queues a record and waits until it is durable in the buffer.
    pub async fn send_durable(&self, draft: Draft) -> Result<(), IngestError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Item {
                draft,
                done: Some(done),
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        rx.await.map_err(|_| IngestError::Closed)?
    }
}

/// Creates the handle and the receiving end for [`run`].
pub fn channel(capacity: usize) -> (Ingest, IngestReceiver) {
    let (tx, rx) = mpsc::channel(capacity);
    (Ingest { tx }, IngestReceiver { rx })
}

pub struct IngestReceiver {
    rx: mpsc::Receiver<Item>,
}

/// Runs until every [`Ingest`] handle is dropped, then appends and flushes what is left.
pub async fn run(
    mut input: IngestReceiver,
    buffer: Arc<Buffer>,
    agent_id: String,
    commit_interval: Duration,
    metrics: Arc<Metrics>,
) -> Result<(), BufferError> {
    let mut w = Writer {
        seqs: buffer.next_seqs()?,
        buffer,
        agent_id,
        metrics,
        waiting: Vec::new(),
        unflushed_seqs: HashMap::new(),
        unflushed_count: 0,
        last_drop_report: None,
        overflow_reported: 0,
    };
    let mut items = Vec::with_capacity(BATCH);
    let mut last_flush = Instant::now();
    let mut dirty = false;
    // Wakes the loop when idle so a pending drop report is sent once Kafka is back.
    let mut tick = tokio::time::interval(DROP_REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Someone waits for durability (a command result, whose offset is stored only
        // after it): flush now rather than at the end of the commit interval. Commands
        // are rare, so the group commit of the data path is unaffected.
        let deadline = if w.waiting.is_empty() {
            last_flush + commit_interval
        } else {
            Instant::now()
        };
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline), if dirty => {
                w.flush().await?;
                last_flush = Instant::now();
                dirty = false;
            }
            n = input.rx.recv_many(&mut items, BATCH) => {
                if n == 0 {
                    break;
                }
                w.append(&mut items)?;
                dirty = true;
            }
            _ = tick.tick() => {}
        }
        w.metrics.beats.ingest.beat();
        if !dirty && w.maybe_report_drops()? {
            dirty = true;
        }
    }
    w.flush().await?;
    Ok(())
}

struct Writer {
    buffer: Arc<Buffer>,
    agent_id: String,
    metrics: Arc<Metrics>,
    /// Next seq per device (authoritative copy; persisted with every append).
    seqs: HashMap<String, u64>,
    /// Senders waiting for the next flush, with the result they get.
    waiting: Vec<(oneshot::Sender<Result<(), IngestError>>, bool)>,
    /// Highest seq per device appended since the last flush.
    unflushed_seqs: HashMap<String, u64>,
    /// Records appended since the last flush.
    unflushed_count: u64,
    last_drop_report: Option<Instant>,
    /// Reject-new refusals not yet reported by an event (drop-oldest ones are counted
    /// durably by the buffer).
    overflow_reported: u64,
}

impl Writer {
    fn append(&mut self, items: &mut Vec<Item>) -> Result<(), BufferError> {
        let now = SystemTime::now();
        let mut stored: Vec<Stored> = Vec::with_capacity(items.len());
        let mut dones = Vec::with_capacity(items.len());
        for item in items.drain(..) {
            let seq = self.seqs.entry(item.draft.device_id.clone()).or_insert(0);
            match stamp(&item.draft, &self.agent_id, *seq, now) {
                Ok(s) => {
                    *seq += 1;
                    stored.push(s);
                    dones.push(item.done);
                }
                Err(e) => {
                    // Cannot happen for the bodies we define (no non-string map keys),
                    // but never lose it silently.
                    tracing::error!(device = %item.draft.device_id, error = %e, "record dropped: cannot encode");
                    self.metrics.count_drop(DropReason::EncodeError, 1);
                    if let Some(d) = item.done {
                        let _ = d.send(Err(IngestError::Buffer(e.to_string())));
                    }
                }
            }
        }
        let out = self.write(&stored, 0)?;
        for (i, done) in dones.into_iter().enumerate() {
            if let Some(d) = done {
                self.waiting.push((d, i < out.accepted));
            }
        }
        Ok(())
    }

    /// Appends stamped records and accounts for the outcome.
    fn write(&mut self, stored: &[Stored], reported: u64) -> Result<AppendOutcome, BufferError> {
        let out = self.buffer.append(stored, reported)?;
        for s in &stored[..out.accepted] {
            self.unflushed_seqs.insert(s.device_id.clone(), s.seq);
        }
        self.unflushed_count += out.accepted as u64;
        if out.rejected > 0 {
            // Give the refused seqs back so the device's sequence stays gap-free for
            // what was actually kept; the refusal itself is counted and reported.
            for s in &stored[out.accepted..] {
                let next = self.seqs.entry(s.device_id.clone()).or_insert(s.seq);
                *next = (*next).min(s.seq);
            }
            self.metrics
                .count_drop(DropReason::BufferFullRejectNew, out.rejected as u64);
            tracing::warn!(rejected = out.rejected, "records rejected: buffer full");
        }
        if out.dropped > 0 {
            self.metrics
                .count_drop(DropReason::BufferFullDropOldest, out.dropped);
            tracing::warn!(dropped = out.dropped, "oldest records dropped: buffer full");
        }
        Ok(out)
    }

    async fn flush(&mut self) -> Result<(), BufferError> {
        self.buffer.flush().await?;
        self.metrics.buffer_flushes.fetch_add(1, Relaxed);
        self.metrics
            .records_ingested
            .fetch_add(std::mem::take(&mut self.unflushed_count), Relaxed);
        for (dev, seq) in self.unflushed_seqs.drain() {
            self.metrics.set_durable_seq(&dev, seq);
        }
        for (done, ok) in self.waiting.drain(..) {
            let _ = done.send(if ok {
                Ok(())
            } else {
                Err(IngestError::Rejected)
            });
        }
        Ok(())
    }

    /// Emits one `records_dropped` event for drops not yet reported, at most once a
    /// second and only while Kafka is reachable (so the report is not itself dropped by
    /// the same overflow). Returns whether it appended anything.
    fn maybe_report_drops(&mut self) -> Result<bool, BufferError> {
        let drop_oldest = self.buffer.unreported_drops();
        let reject_new = self
            .metrics
            .dropped_reject_new
            .load(Relaxed)
            .saturating_sub(self.overflow_reported);
        if drop_oldest + reject_new == 0 || !self.metrics.kafka_connected.load(Relaxed) {
            return Ok(false);
        }
        if self
            .last_drop_report
            .is_some_and(|t| t.elapsed() < DROP_REPORT_EVERY)
        {
            return Ok(false);
        }
        let draft = Draft::agent_event(
            "records_dropped",
            object([
                ("count", (drop_oldest + reject_new).into()),
                ("drop_oldest", drop_oldest.into()),
                ("reject_new", reject_new.into()),
                ("reason", "buffer_full".into()),
            ]),
        );
        let seq = self.seqs.entry(AGENT_DEVICE.to_string()).or_insert(0);
        let Ok(s) = stamp(&draft, &self.agent_id, *seq, SystemTime::now()) else {
            return Ok(false);
        };
        *seq += 1;
        tracing::warn!(
            count = drop_oldest + reject_new,
            "reporting dropped records"
        );
        let out = self.write(std::slice::from_ref(&s), drop_oldest)?;
        if out.accepted == 1 {
            self.overflow_reported += reject_new;
        }
        self.last_drop_report = Some(Instant::now());
        Ok(out.accepted == 1)
    }
}
