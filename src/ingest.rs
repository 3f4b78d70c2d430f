//! Ingest: the one place where records are stamped and made durable.
//!
//! Drivers, the command path and the agent send [`Draft`]s through an [`Ingest`] handle.
//! One task receives them, gathers them until [`BATCH`] have come or the commit is due,
//! gives each its device's next `seq`, encodes it, appends them to the buffer in one
//! batch, and group-commits: it flushes at most every `commit_interval`. A sender that
//! must not acknowledge anything upstream before the record is durable (an MQTT ack, a
//! command offset) uses [`Ingest::send_durable`], which returns only after the flush
//! that covers the record; while such a sender waits, the flush happens at once instead
//! of at the end of the interval. A source that sends many records and acknowledges
//! them upstream in order (an MQTT session) numbers them with tickets and follows one
//! [`Tally`] instead: one wake-up per flush, not one receipt per record.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::buffer::{AppendOutcome, Buffer, BufferError, Cursor, RecordRef};
use crate::metrics::{DropReason, Metrics};
use crate::pipeline::Pipeline;
use crate::record::{object, stamp_onto, Draft, Placed};

/// How many records are gathered before they are appended, when nobody waits for
/// them: appends come at most this often and otherwise once per commit interval, just
/// before the flush that makes them visible. Each append is one sled batch, and sled
/// writes out its IO buffer twice for every batch (one job for its IO threads each);
/// appended as they came, a sensor at full speed made a batch every 64–128 records.
/// Bounds a single sled batch too; the gathered drafts are resident while they wait.
const BATCH: usize = 1024;
/// The most [`Writer::arena`] keeps between batches once a batch used less than a
/// quarter of it (a batch at full speed takes about 350 KiB and keeps it).
const ARENA_KEEP: usize = 64 * 1024;
/// Drop reports are emitted at most this often.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(1);

/// Why a record was not made durable.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest has shut down")]
    /// The ingest stage has stopped (the agent is shutting down).
    Closed,
    #[error("buffer is full; record rejected (overflow policy reject_new)")]
    /// The buffer is full and the overflow policy refuses new records.
    Rejected,
    #[error("buffer write failed: {0}")]
    /// The buffer failed to store the record (the agent stops).
    Buffer(String),
}

/// Resolves when a record sent with [`Ingest::send_tracked`] is durable.
pub type Receipt = oneshot::Receiver<Result<(), IngestError>>;

/// Durability by ticket, for a source that acknowledges what it received upstream in
/// order (an MQTT session's PUBACKs). The source numbers its messages 1, 2, 3… and sends
/// every record of a message with the message's ticket ([`Ingest::send_ticketed`]).
/// After each flush, [`Tally::durable`] is the highest ticket whose records, and every
/// record before them, were made durable or refused; [`Tally::take_refused`] names the
/// refused tickets. The source is woken once per flush, not once per record.
#[derive(Debug, Default)]
pub struct Tally {
    durable: AtomicU64,
    /// Refused tickets not yet taken; written before `durable` is raised past them.
    refused: Mutex<Vec<u64>>,
    changed: tokio::sync::Notify,
}

impl Tally {
    /// Every ticket up to this one is settled: durable, unless [`Tally::take_refused`]
    /// names it.
    pub fn durable(&self) -> u64 {
        self.durable.load(Acquire)
    }

    /// The refused tickets settled so far (each is returned once). Call after
    /// [`Tally::durable`]: a refused ticket is listed before `durable` passes it.
    pub fn take_refused(&self) -> Vec<u64> {
        std::mem::take(&mut *self.refused.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves after the next flush that settled a ticket (at once if one happened
    /// since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn settle(&self, ticket: u64, ok: bool) {
        if !ok {
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ticket);
        }
        self.durable.fetch_max(ticket, Release);
    }
}

/// Who waits for a record's durability, and how they are told.
enum Waiter {
    /// One receipt per record.
    Once(oneshot::Sender<Result<(), IngestError>>),
    /// A ticket in a source's tally.
    Ticket(Arc<Tally>, u64),
}

struct Item {
    /// None: only a source position to store.
    draft: Option<Draft>,
    done: Option<Waiter>,
    /// A source position written in the same batch as this record (and those before it).
    cursor: Option<(Vec<u8>, Option<Vec<u8>>)>,
    /// The source has gone back to its stored position after a refusal: its positions
    /// are accepted again (see [`Ingest::send_with_cursor`]).
    resync: bool,
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
            .send(Item {
                draft: Some(draft),
                done: None,
                cursor: None,
                resync: false,
            })
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
        self.send_tracked(draft)
            .await?
            .await
            .map_err(|_| IngestError::Closed)?
    }

    /// Queues a record; the receiver resolves once it is durable (or refused). Lets a
    /// source keep receiving while earlier records are flushed: receipts resolve in
    /// the order the records were sent (MQTT acks must go out in that order).
    pub async fn send_tracked(&self, draft: Draft) -> Result<Receipt, IngestError> {
        self.send_item(Some(draft), None, false).await
    }

    /// Queues a record (or none) with a source position that is stored in the same
    /// atomic batch as it, and only if it (and every record before it) is: a reader of
    /// files that resumes from its positions after a crash neither repeats nor skips a
    /// record. The receipt resolves once both are durable.
    ///
    /// Once a record with a position is refused (the buffer full under `reject_new`, or
    /// low on disk), every later item with that key is refused too, even when room
    /// frees up meanwhile: otherwise a later row could land with its position and leave
    /// a gap behind it. The source learns it from its receipts, goes back to its stored
    /// position and sends again with `resync` set, which accepts its items again.
    pub async fn send_with_cursor(
        &self,
        draft: Option<Draft>,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        resync: bool,
    ) -> Result<Receipt, IngestError> {
        self.send_item(draft, Some((key, value)), resync).await
    }

    /// Queues a record under a ticket of `tally` (see [`Tally`]): tickets must not
    /// decrease from one call to the next, and several records may share one.
    pub async fn send_ticketed(
        &self,
        draft: Draft,
        tally: &Arc<Tally>,
        ticket: u64,
    ) -> Result<(), IngestError> {
        self.tx
            .send(Item {
                draft: Some(draft),
                done: Some(Waiter::Ticket(tally.clone(), ticket)),
                cursor: None,
                resync: false,
            })
            .await
            .map_err(|_| IngestError::Closed)
    }

    async fn send_item(
        &self,
        draft: Option<Draft>,
        cursor: Option<(Vec<u8>, Option<Vec<u8>>)>,
        resync: bool,
    ) -> Result<Receipt, IngestError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Item {
                draft,
                done: Some(Waiter::Once(done)),
                cursor,
                resync,
            })
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(rx)
    }
}

/// Creates the handle and the receiving end for [`run`].
pub fn channel(capacity: usize) -> (Ingest, IngestReceiver) {
    let (tx, rx) = mpsc::channel(capacity);
    (Ingest { tx }, IngestReceiver { rx })
}

/// The receiving end of the ingest channel, for [`run`].
pub struct IngestReceiver {
    rx: mpsc::Receiver<Item>,
}

/// What [`run`] needs besides its input.
pub struct IngestStage {
    /// Where records are made durable.
    pub buffer: Arc<Buffer>,
    /// Stamped on every record.
    pub agent_id: String,
    /// Group commit: at most this long between a record's append and its flush.
    pub commit_interval: Duration,
    /// Counts records, drops and flushes.
    pub metrics: Arc<Metrics>,
    /// Edge processing of sensor readings, run before stamping.
    pub pipeline: Pipeline,
    /// Cancelled at shutdown once the devices have stopped: ingest then stores what is
    /// queued, closes the pipeline's open windows, flushes, and sends on `drained`, so
    /// the forwarder can still deliver what the shutdown itself produced. It keeps
    /// running (for dead-letter alerts) until every handle is gone.
    pub drain: tokio_util::sync::CancellationToken,
    /// Told when the drain above is done.
    pub drained: Option<oneshot::Sender<()>>,
    /// Topic names by kind, for delivery receipts (`runs`).
    pub topic_names: HashMap<crate::record::TopicKind, String>,
    /// What the status page shows; sees every record stamped.
    pub live: Arc<crate::live::Live>,
}

/// Runs until every [`Ingest`] handle is dropped, then appends and flushes what is left.
/// A buffer error (disk full, I/O error, read-only disk) ends it with the error, after
/// logging it with its cause and leaving a note for the next start
/// ([`take_error_note`]): nothing waiting for durability is acknowledged.
pub async fn run(input: IngestReceiver, stage: IngestStage) -> Result<(), BufferError> {
    let buffer = stage.buffer.clone();
    let metrics = stage.metrics.clone();
    let r = run_inner(input, stage).await;
    if let Err(e) = &r {
        buffer_failed(
            &metrics,
            buffer.dir(),
            "buffer write failed: records waiting for durability were not acknowledged",
            e,
        );
    }
    r
}

/// A buffer failure that ends the agent (a write, a read back, opening the store):
/// counted, logged with its kind, and left as a note that the next start reports as a
/// `buffer_error` event ([`take_error_note`]).
pub fn buffer_failed(metrics: &Metrics, buffer_dir: &std::path::Path, what: &str, e: &BufferError) {
    let kind = e.disk_kind().unwrap_or("other");
    metrics.count_buffer_error(kind);
    tracing::error!(error = %e, kind, "{what}; exiting so the agent restarts on what is on disk");
    write_error_note(buffer_dir, kind, &format!("{what}: {e}"));
}

/// Where the note about a buffer failure is left: systemd's runtime directory
/// (`RuntimeDirectory=`, a tmpfs that outlives a restart of the unit), because the data
/// dir's disk is the one that just failed; beside the buffer without systemd.
fn error_note_path(buffer_dir: &std::path::Path) -> std::path::PathBuf {
    const NAME: &str = "last-buffer-error.json";
    if let Some(run) = std::env::var_os("RUNTIME_DIRECTORY") {
        if let Some(first) = std::env::split_paths(&run).next() {
            return first.join(NAME);
        }
    }
    buffer_dir.parent().unwrap_or(buffer_dir).join(NAME)
}

/// Leaves the note [`take_error_note`] reads at the next start, for the buffer in
/// `buffer_dir` (best effort: the disk may refuse this too).
fn write_error_note(buffer_dir: &std::path::Path, kind: &str, error: &str) {
    let note = serde_json::json!({
        "kind": kind,
        "error": error,
        "at": crate::time::format_rfc3339_millis(SystemTime::now()),
    });
    // Best effort: on a full or failing disk this may fail too.
    let path = error_note_path(buffer_dir);
    if let Err(e) = std::fs::write(&path, note.to_string()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot leave a note of the buffer failure");
    }
}

/// The note a failed buffer left at the last run, removed once read: the agent reports
/// it as a `buffer_error` event at start.
pub fn take_error_note(buffer: &Buffer) -> Option<serde_json::Map<String, serde_json::Value>> {
    let path = error_note_path(buffer.dir());
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(m)) => Some(m),
        _ => Some(object([("error", text.into())])),
    }
}

async fn run_inner(mut input: IngestReceiver, stage: IngestStage) -> Result<(), BufferError> {
    let IngestStage {
        buffer,
        agent_id,
        commit_interval,
        metrics,
        pipeline,
        drain,
        mut drained,
        topic_names,
        live,
    } = stage;
    let mut w = Writer {
        pipeline,
        seqs: buffer.next_seqs()?,
        arena: Vec::new(),
        stamped: Vec::new(),
        buffer,
        agent_id,
        metrics,
        waiting: Vec::new(),
        unflushed_seqs: HashMap::new(),
        unflushed_count: 0,
        last_drop_report: None,
        overflow_reported: 0,
        refused_sources: std::collections::HashSet::new(),
        runs: crate::runs::Tracker::new(topic_names),
        draining: false,
        live,
    };
    // Received and not yet appended (see [`BATCH`]).
    let mut items = Vec::with_capacity(BATCH);
    // One of `items` has a sender waiting for its durability (false once they are
    // appended).
    let mut urgent = false;
    let mut last_flush = Instant::now();
    let mut dirty = false;
    // Wakes the loop when idle so a pending drop report is sent once Kafka is back.
    let mut tick = tokio::time::interval(DROP_REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        urgent &= !items.is_empty();
        // Someone waits for durability (a command result, whose offset is stored only
        // after it): flush now rather than at the end of the commit interval. Commands
        // are rare, so the group commit of the data path is unaffected.
        let deadline = if w.waiting.is_empty() && !urgent {
            last_flush + commit_interval
        } else {
            Instant::now()
        };
        let room = BATCH - items.len();
        let pending = !items.is_empty();
        tokio::select! {
            biased;
            () = drain.cancelled(), if drained.is_some() => {
                // Shutdown: what is queued now, then the open windows, then one flush.
                while let Ok(item) = input.rx.try_recv() {
                    items.push(item);
                    if items.len() == BATCH {
                        w.append(&mut items)?;
                    }
                }
                if !items.is_empty() {
                    w.append(&mut items)?;
                }
                w.pipeline_tick(|p, now| p.finish(now))?;
                w.flush().await?;
                last_flush = Instant::now();
                dirty = false;
                // The forwarder stops once it has delivered what is durable now: a receipt
                // made later would wait in the buffer until the next start.
                w.draining = true;
                if !w.runs.is_empty() {
                    tracing::info!(runs = w.runs.len(), "agent stopping: delivery receipts of runs still in flight are not sent");
                }
                if let Some(tx) = drained.take() {
                    let _ = tx.send(());
                }
            }
            () = tokio::time::sleep_until(deadline), if dirty || pending => {
                if !items.is_empty() {
                    w.append(&mut items)?;
                }
                w.flush().await?;
                last_flush = Instant::now();
                dirty = false;
            }
            n = input.rx.recv_many(&mut items, room), if room > 0 => {
                if n == 0 {
                    break;
                }
                urgent |= items[items.len() - n..].iter().any(|i| i.done.is_some());
                if items.len() == BATCH {
                    w.append(&mut items)?;
                    dirty = true;
                }
            }
            _ = tick.tick() => {
                // What the pipeline emits on its own goes after what came before it.
                if !items.is_empty() {
                    w.append(&mut items)?;
                    dirty = true;
                }
                if w.pipeline_tick(|p, now| p.tick(now))? {
                    dirty = true;
                }
                if w.receipts()? {
                    dirty = true;
                }
            }
        }
        w.metrics.beats.ingest.beat();
        if !dirty && w.maybe_report_drops()? {
            dirty = true;
        }
    }
    if !items.is_empty() {
        w.append(&mut items)?;
    }
    // Windows still open are sent as partial aggregates rather than lost (when the
    // drain above did not already close them).
    w.pipeline_tick(|p, now| p.finish(now))?;
    w.flush().await?;
    if let Some(tx) = drained.take() {
        let _ = tx.send(());
    }
    Ok(())
}

struct Writer {
    /// Edge processing of sensor readings (thresholds, aggregates, downsampling).
    pipeline: Pipeline,
    buffer: Arc<Buffer>,
    agent_id: String,
    metrics: Arc<Metrics>,
    /// Next seq per device (authoritative copy; persisted with every append).
    seqs: HashMap<String, u64>,
    /// The batch being stamped, laid out back to back (device id, key, JSON of each
    /// record): one buffer for the batch instead of three allocations per record.
    arena: Vec<u8>,
    /// The records of the batch, by where they are in `arena`.
    stamped: Vec<Stamped>,
    /// Senders waiting for the next flush, with the result they get.
    waiting: Vec<(Waiter, bool)>,
    /// Highest seq per device appended since the last flush.
    unflushed_seqs: HashMap<String, u64>,
    /// Records appended since the last flush.
    unflushed_count: u64,
    last_drop_report: Option<Instant>,
    /// Reject-new refusals not yet reported by an event (drop-oldest ones are counted
    /// durably by the buffer).
    overflow_reported: u64,
    /// Position keys whose source had a record refused and has not resynced yet.
    refused_sources: std::collections::HashSet<Vec<u8>>,
    /// Runs followed for their delivery receipts.
    runs: crate::runs::Tracker,
    /// Shutdown has begun: no more receipts.
    draining: bool,
    /// The status page's view.
    live: Arc<crate::live::Live>,
}

impl Writer {
    fn append(&mut self, items: &mut Vec<Item>) -> Result<(), BufferError> {
        let now = SystemTime::now();
        // Each waiter with the index of its record in `stamped` (None: nothing to store,
        // the reading was downsampled away, which counts as done).
        let mut dones = Vec::new();
        let mut derived = Vec::new();
        let mut cursors: Vec<Cursor> = Vec::new();
        // Records of runs, by their index in `stamped`, for the receipts.
        let mut seen: Vec<(usize, crate::runs::Seen)> = Vec::new();
        let process = !self.pipeline.is_idle();
        let live = self.live.clone();
        let mut view = live.view();
        for item in items.drain(..) {
            if let Some((key, _)) = &item.cursor {
                if item.resync {
                    self.refused_sources.remove(key);
                } else if self.refused_sources.contains(key) {
                    // Behind a refused record of the same source: refused in turn.
                    if let Some(d) = item.done {
                        self.refuse(d, IngestError::Rejected);
                    }
                    continue;
                }
            }
            let Some(draft) = item.draft else {
                if let Some((key, value)) = item.cursor {
                    cursors.push(Cursor {
                        after: self.stamped.len(),
                        key,
                        value,
                    });
                }
                if let Some(d) = item.done {
                    // Done when the records before it were handled (the cursor's rule).
                    dones.push((d, self.stamped.len().checked_sub(1)));
                }
                continue;
            };
            let keep = !process || self.pipeline.observe(&draft, now, &mut derived);
            let index = if keep {
                self.stamp_into(&draft, now).map_err(|e| e.to_string())
            } else {
                Ok(None)
            };
            if let Ok(Some(i)) = index {
                view.record(&draft, now);
                if let Some(s) = crate::runs::Seen::of(&draft, self.stamped[i].seq, now) {
                    seen.push((i, s));
                }
            }
            if let Some((key, value)) = item.cursor {
                cursors.push(Cursor {
                    after: self.stamped.len(),
                    key,
                    value,
                });
            }
            for d in derived.drain(..) {
                // Alerts and aggregates carry no waiter; an encode failure is counted.
                if let Ok(Some(_)) = self.stamp_into(&d, now) {
                    view.record(&d, now);
                }
            }
            match (item.done, index) {
                (Some(d), Ok(i)) => dones.push((d, i)),
                (Some(d), Err(e)) => self.refuse(d, IngestError::Buffer(e)),
                (None, _) => {}
            }
        }
        drop(view);
        let out = self.write_with(0, &cursors)?;
        if !seen.is_empty() {
            let next = self.buffer.next_chunk_id();
            let drops = self.metrics.dropped_total();
            for (i, s) in seen {
                let kept = !out.disk_full && i >= out.skipped && i < out.handled();
                self.runs.observe(s, kept, next, drops);
            }
        }
        for c in &cursors {
            if out.disk_full || c.after > out.handled() {
                self.refused_sources.insert(c.key.clone());
            }
        }
        for (d, i) in dones {
            // Nothing at all is written below the disk floor, positions included.
            let ok = !out.disk_full && i.is_none_or(|i| i < out.handled());
            self.waiting.push((d, ok));
        }
        Ok(())
    }

    /// Tells a waiter its record was refused: a receipt at once, a ticket at the next
    /// flush (a tally may not pass tickets before it that are not durable yet).
    fn refuse(&mut self, w: Waiter, e: IngestError) {
        match w {
            Waiter::Once(d) => {
                let _ = d.send(Err(e));
            }
            ticket => self.waiting.push((ticket, false)),
        }
    }

    /// Stamps one draft onto the batch; returns its index in `stamped`.
    fn stamp_into(
        &mut self,
        draft: &Draft,
        now: SystemTime,
    ) -> Result<Option<usize>, crate::record::EncodeError> {
        // Looked up by &str, once: a device's name is copied into the map when it is
        // new, not per record.
        let next = match self.seqs.get_mut(&draft.device_id) {
            Some(next) => next,
            None => self.seqs.entry(draft.device_id.clone()).or_insert(0),
        };
        let seq = *next;
        let start = self.arena.len();
        self.arena.extend_from_slice(draft.device_id.as_bytes());
        let device = start..self.arena.len();
        match stamp_onto(draft, &self.agent_id, seq, now, &mut self.arena) {
            Ok(placed) => {
                *next = seq + 1;
                self.stamped.push(Stamped {
                    placed,
                    device,
                    seq,
                });
                Ok(Some(self.stamped.len() - 1))
            }
            Err(e) => {
                self.arena.truncate(start);
                // Cannot happen for the bodies we define (no non-string map keys), but
                // never lose it silently.
                tracing::error!(device = %draft.device_id, error = %e, "record dropped: cannot encode");
                self.metrics.count_drop(DropReason::EncodeError, 1);
                Err(e)
            }
        }
    }

    /// Appends the delivery receipts of runs whose records have all left the buffer.
    /// Returns whether it appended anything.
    fn receipts(&mut self) -> Result<bool, BufferError> {
        if self.runs.is_empty() || self.draining {
            return Ok(false);
        }
        let drops = self.metrics.dropped_total();
        let due = self.runs.due(self.buffer.low_watermark(), drops);
        if due.is_empty() {
            return Ok(false);
        }
        let now = SystemTime::now();
        for d in &due {
            let _ = self.stamp_into(d, now);
        }
        self.write(0)?;
        Ok(true)
    }

    /// Appends what the pipeline emits on its own (windows of quiet sensors, or all of
    /// them at shutdown). Returns whether it appended anything.
    fn pipeline_tick(
        &mut self,
        f: impl FnOnce(&mut Pipeline, SystemTime) -> Vec<Draft>,
    ) -> Result<bool, BufferError> {
        let now = SystemTime::now();
        let drafts = f(&mut self.pipeline, now);
        if drafts.is_empty() {
            return Ok(false);
        }
        for d in &drafts {
            let _ = self.stamp_into(d, now);
        }
        self.write(0)?;
        Ok(true)
    }

    /// Appends the stamped batch and accounts for the outcome.
    fn write(&mut self, reported: u64) -> Result<AppendOutcome, BufferError> {
        self.write_with(reported, &[])
    }

    /// [`Writer::write`] with source positions in the same batch. The batch is empty
    /// afterwards, whatever the outcome.
    fn write_with(
        &mut self,
        reported: u64,
        cursors: &[Cursor],
    ) -> Result<AppendOutcome, BufferError> {
        let used = self.arena.len();
        let out = self.write_batch(reported, cursors);
        self.stamped.clear();
        self.arena.clear();
        if self.arena.capacity() > ARENA_KEEP && used < self.arena.capacity() / 4 {
            // Load has dropped: do not keep a full-speed batch's size for good.
            self.arena = Vec::new();
        }
        out
    }

    fn write_batch(
        &mut self,
        reported: u64,
        cursors: &[Cursor],
    ) -> Result<AppendOutcome, BufferError> {
        let arena = &self.arena;
        let stored: Vec<RecordRef<'_>> = self.stamped.iter().map(|s| s.view(arena)).collect();
        let out = self.buffer.append_with(&stored, reported, cursors)?;
        // The last seq of each device, set once per run of its records.
        let mut run: Option<(&str, u64)> = None;
        for s in &stored[out.skipped..out.handled()] {
            match &mut run {
                Some((device, seq)) if *device == s.device_id => *seq = s.seq,
                _ => {
                    if let Some((device, seq)) = run {
                        set_by_name(&mut self.unflushed_seqs, device, seq);
                    }
                    run = Some((s.device_id, s.seq));
                }
            }
        }
        if let Some((device, seq)) = run {
            set_by_name(&mut self.unflushed_seqs, device, seq);
        }
        self.unflushed_count += out.accepted as u64;
        if out.rejected > 0 {
            // Give the refused seqs back so the device's sequence stays gap-free for
            // what was actually kept; the refusal itself is counted and reported.
            for s in &stored[out.handled()..] {
                let next = self.seqs.entry(s.device_id.to_string()).or_insert(s.seq);
                *next = (*next).min(s.seq);
            }
            if out.disk_full {
                self.metrics
                    .count_drop(DropReason::DiskFull, out.rejected as u64);
                tracing::warn!(
                    rejected = out.rejected,
                    "records rejected: free disk space below the floor (buffer.min_free_bytes)"
                );
            } else {
                self.metrics
                    .count_drop(DropReason::BufferFullRejectNew, out.rejected as u64);
                tracing::warn!(rejected = out.rejected, "records rejected: buffer full");
            }
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
        // A tally is woken once after each run of its tickets here (once per flush for a
        // single MQTT session), not once per ticket.
        let mut touched: Option<Arc<Tally>> = None;
        for (done, ok) in self.waiting.drain(..) {
            match done {
                Waiter::Once(d) => {
                    let _ = d.send(if ok {
                        Ok(())
                    } else {
                        Err(IngestError::Rejected)
                    });
                }
                Waiter::Ticket(tally, ticket) => {
                    tally.settle(ticket, ok);
                    if !touched.as_ref().is_some_and(|t| Arc::ptr_eq(t, &tally)) {
                        if let Some(t) = touched.replace(tally) {
                            t.changed.notify_one();
                        }
                    }
                }
            }
        }
        if let Some(t) = touched {
            t.changed.notify_one();
        }
        Ok(())
    }

    /// Emits one `records_dropped` event for drops not yet reported, at most once a
    /// second and only while Kafka is reachable (so the report is not itself dropped by
    /// the same overflow). Returns whether it appended anything.
    fn maybe_report_drops(&mut self) -> Result<bool, BufferError> {
        let drop_oldest = self.buffer.unreported_drops();
        let refused = self.metrics.dropped_reject_new.load(Relaxed)
            + self.metrics.dropped_disk_full.load(Relaxed);
        let reject_new = refused.saturating_sub(self.overflow_reported);
        if drop_oldest + reject_new == 0 || !self.metrics.kafka_connected.load(Relaxed) {
            return Ok(false);
        }
        // The event itself must find room: not while the disk is short.
        if self.buffer.low_disk() {
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
                (
                    "reason",
                    if self.metrics.dropped_disk_full.load(Relaxed) > 0 {
                        "buffer_full_or_disk_full"
                    } else {
                        "buffer_full"
                    }
                    .into(),
                ),
            ]),
        );
        if !matches!(self.stamp_into(&draft, SystemTime::now()), Ok(Some(_))) {
            return Ok(false);
        }
        tracing::warn!(
            count = drop_oldest + reject_new,
            "reporting dropped records"
        );
        let out = self.write(drop_oldest)?;
        if out.accepted == 1 {
            self.overflow_reported += reject_new;
        }
        self.last_drop_report = Some(Instant::now());
        Ok(out.accepted == 1)
    }
}

/// A record of the batch being stamped: where its parts are in [`Writer::arena`].
struct Stamped {
    placed: Placed,
    device: std::ops::Range<usize>,
    seq: u64,
}

impl Stamped {
    /// The record in `arena`, the buffer it was stamped into (every part was written
    /// there from a `str`; a range out of place reads as empty, never panics).
    fn view<'a>(&self, arena: &'a [u8]) -> RecordRef<'a> {
        let bytes = |r: &std::ops::Range<usize>| arena.get(r.clone()).unwrap_or_default();
        let text = |r| std::str::from_utf8(bytes(r)).unwrap_or_default();
        RecordRef {
            topic: self.placed.topic,
            key: text(&self.placed.key),
            device_id: text(&self.device),
            seq: self.seq,
            ingested_ms: self.placed.ingested_ms,
            payload: bytes(&self.placed.payload),
        }
    }
}

/// Sets a device's entry, copying its name only when the entry is new (per-record path).
fn set_by_name(map: &mut HashMap<String, u64>, name: &str, v: u64) {
    match map.get_mut(name) {
        Some(e) => *e = v,
        None => {
            map.insert(name.to_string(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ingest task on a real buffer in `dir`, with a commit interval longer than any
    /// test waits.
    fn start(
        dir: &std::path::Path,
    ) -> (
        Ingest,
        Arc<Metrics>,
        tokio::task::JoinHandle<Result<(), BufferError>>,
    ) {
        let buffer = Arc::new(Buffer::open(dir, &Default::default()).unwrap());
        let metrics = Arc::new(Metrics::new());
        let (ingest, rx) = channel(64);
        let task = tokio::spawn(run(
            rx,
            IngestStage {
                buffer,
                agent_id: "a1".into(),
                commit_interval: Duration::from_secs(600),
                metrics: metrics.clone(),
                pipeline: Pipeline::new(&Default::default(), metrics.clone()),
                drain: Default::default(),
                drained: None,
                topic_names: Default::default(),
                live: Arc::new(crate::live::Live::new(serde_json::Value::Null)),
            },
        ));
        (ingest, metrics, task)
    }

    fn event(i: u64) -> Draft {
        Draft::agent_event("test", object([("i", i.into())]))
    }

    #[tokio::test]
    async fn a_sender_waiting_for_durability_is_not_kept_behind_gathered_records() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, metrics, _task) = start(dir.path());
        // Past the tick's first beat, which comes at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Gathered, not appended: nobody waits for them and the interval is long.
        for i in 0..10 {
            ingest.send(event(i)).await.unwrap();
        }
        // Ingest's one-second tick appends what it gathered and so would end the wait
        // too: sooner than that, the waiting sender set the flush off itself.
        let tick = DROP_REPORT_EVERY - Duration::from_millis(100);
        tokio::time::timeout(tick, ingest.send_durable(event(10)))
            .await
            .expect("durable without waiting for the commit interval")
            .unwrap();
        // The flush that covered it covered everything sent before it.
        assert_eq!(metrics.records_ingested.load(Relaxed), 11);
    }

    #[tokio::test]
    async fn records_gathered_when_the_last_sender_goes_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, metrics, task) = start(dir.path());
        for i in 0..5 {
            ingest.send(event(i)).await.unwrap();
        }
        drop(ingest);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("ingest ends once every sender is gone")
            .unwrap()
            .unwrap();
        assert_eq!(metrics.records_ingested.load(Relaxed), 5);
    }

    #[tokio::test]
    async fn a_tally_lists_refusals_before_it_passes_them_and_wakes_its_reader() {
        let t = Arc::new(Tally::default());
        assert_eq!(t.durable(), 0);
        t.settle(1, true);
        t.settle(2, false);
        t.settle(2, false); // two records of one message, both refused
        t.settle(3, true);
        assert_eq!(t.durable(), 3);
        assert_eq!(t.take_refused(), vec![2, 2]);
        assert!(t.take_refused().is_empty(), "each refusal is given once");
        // A wake-up sent while nobody waits is kept for the next wait.
        t.changed.notify_one();
        tokio::time::timeout(Duration::from_secs(1), t.changed())
            .await
            .expect("the stored wake-up");
    }
}
