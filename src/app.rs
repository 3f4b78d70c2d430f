//! The running agent: builds every subsystem from the config, runs and supervises them,
//! and shuts them down in order: devices and commands stop → what they said last (and the
//! pipeline's open windows) reaches the buffer → the forwarder delivers what is durable
//! within the grace period → the buffer is flushed.
//!
//! Supervision: ingest, the forwarder, the command consumer and the HTTP server must run
//! as long as the agent does. The first of them to end or panic is logged with its cause
//! and the agent exits non-zero (74 for disk failures, 70 otherwise), so systemd starts it
//! again on what is on disk. Devices are supervised one by one ([`devices::supervise`]):
//! a failing or panicking driver is restarted with backoff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buffer::{Buffer, BufferError};
use crate::commands::{self, Handler, Router, Validator};
use crate::config::Config;
use crate::devices::control;
use crate::devices::{self, DeviceCtx};
use crate::http::{self, HttpState};
use crate::ingest;
use crate::kafka::{self, forwarder::Forwarder, forwarder::ForwarderError};
use crate::metrics::Metrics;

/// Capacity of the ingest channel (records waiting to be stamped and appended). A device
/// at full speed keeps it full, so it is resident memory: at 8,192 the queued drafts cost
/// about 6 MB of peak RSS at full load. 2,048 (32 chunks' worth, two of ingest's batches)
/// measured the same end-to-end and drain rates (BENCHMARKS.md, "The ingest queue").
const INGEST_QUEUE: usize = 2_048;

#[derive(Debug, thiserror::Error)]
/// Why the agent stopped; each maps to the exit code systemd and the operator see.
pub enum AgentError {
    #[error("data_dir {path}: {source}")]
    /// The data directory cannot be created or used.
    DataDir {
        /// The directory, as configured.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    #[error("cannot open the buffer in {path}: {source}")]
    /// The buffer could not be opened (a failing or unreadable disk, a corrupt store).
    BufferOpen {
        /// The buffer's directory.
        path: String,
        /// What the store said.
        source: BufferError,
    },
    #[error(transparent)]
    /// The buffer failed while running.
    Buffer(#[from] BufferError),
    #[error("{key}: {message}")]
    /// The ingest API's clients cannot be set up (a token file gone since `check`).
    Api {
        /// The config key.
        key: String,
        /// What is wrong.
        message: String,
    },
    #[error(transparent)]
    /// A Kafka client could not be built from the config.
    Kafka(#[from] kafka::KafkaSetupError),
    #[error("http.listen {addr}: {source}")]
    /// The HTTP listener cannot bind.
    Http {
        /// The address it tried.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A long-running stage ended or panicked while the agent was running: the agent
    /// exits so that systemd starts it again on what is on disk.
    #[error("{stage} stopped: {cause}")]
    Stage {
        /// Which stage: `ingest`, `forwarder`, `commands`, `http` …
        stage: &'static str,
        /// Its error or panic message.
        cause: String,
        /// A buffer storage failure (disk full, I/O error, read-only).
        disk: bool,
    },
}

impl AgentError {
    /// The process exit code: 74 (EX_IOERR) for disk failures, 70 (EX_SOFTWARE) for a
    /// stage that stopped, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Buffer(_) | AgentError::BufferOpen { .. } | AgentError::DataDir { .. } => {
                74
            }
            AgentError::Stage { disk: true, .. } => 74,
            AgentError::Stage { .. } => 70,
            AgentError::Api { .. } => 64,
            _ => 1,
        }
    }
}

/// Path of the buffer inside the data dir.
pub fn buffer_dir(cfg: &Config) -> std::path::PathBuf {
    cfg.agent.data_dir.join("buffer")
}

/// The long-running stages; each one ending before shutdown ends the agent.
struct Stages {
    ingest: Option<JoinHandle<Result<(), BufferError>>>,
    forwarder: Option<JoinHandle<Result<(), ForwarderError>>>,
    commands: Option<JoinHandle<Result<(), commands::CommandError>>>,
    http: Option<JoinHandle<()>>,
}

/// Waits for a task that may not exist (then forever).
async fn join<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h.as_mut() {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// What a panic said, for the log.
fn panic_text(e: &tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return "cancelled".into();
    }
    format!("panicked: {e}")
}

impl Stages {
    /// Resolves with the first stage that ends, and why.
    async fn first_to_end(&mut self) -> AgentError {
        let fail = |stage: &'static str, cause: String, disk: bool| AgentError::Stage {
            stage,
            cause,
            disk,
        };
        tokio::select! {
            r = join(&mut self.ingest) => {
                self.ingest = None;
                match r {
                    Ok(Err(e)) => { let disk = e.disk_kind().is_some(); fail("ingest", e.to_string(), disk) }
                    Ok(Ok(())) => fail("ingest", "ended early".into(), false),
                    Err(e) => fail("ingest", panic_text(&e), false),
                }
            }
            r = join(&mut self.forwarder) => {
                self.forwarder = None;
                match r {
                    Ok(Err(ForwarderError::Buffer(e))) => { let disk = e.disk_kind().is_some(); fail("forwarder", e.to_string(), disk) }
                    Ok(Err(e)) => fail("forwarder", e.to_string(), false),
                    Ok(Ok(())) => fail("forwarder", "ended early".into(), false),
                    Err(e) => fail("forwarder", panic_text(&e), false),
                }
            }
            r = join(&mut self.commands) => {
                self.commands = None;
                match r {
                    Ok(Err(e)) => fail("command consumer", e.to_string(), false),
                    Ok(Ok(())) => fail("command consumer", "ended early".into(), false),
                    Err(e) => fail("command consumer", panic_text(&e), false),
                }
            }
            r = join(&mut self.http) => {
                self.http = None;
                match r {
                    Ok(()) => fail("http server", "ended early".into(), false),
                    Err(e) => fail("http server", panic_text(&e), false),
                }
            }
        }
    }
}

/// Runs the agent until `stop` is cancelled (a signal, in `main`). Returns an error
/// when a stage failed; the process then exits non-zero and systemd restarts it.
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    stop: CancellationToken,
) -> Result<(), AgentError> {
    // Take SIGHUP first: its default action would end the agent while it starts.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.agent.data_dir).map_err(|source| AgentError::DataDir {
        path: cfg.agent.data_dir.display().to_string(),
        source,
    })?;
    let metrics = Arc::new(Metrics::new());
    let dir = buffer_dir(&cfg);
    let buffer = match Buffer::open(&dir, &cfg.buffer) {
        Ok(b) => Arc::new(b),
        Err(source) => {
            ingest::buffer_failed(&metrics, &dir, "cannot open the buffer", &source);
            return Err(AgentError::BufferOpen {
                path: dir.display().to_string(),
                source,
            });
        }
    };
    let stats = buffer.stats();
    tracing::info!(agent_id = %cfg.agent.agent_id, records = stats.records, bytes = stats.bytes, quarantined = stats.quarantined_chunks, "buffer open");
    let last_error = ingest::take_error_note(&buffer);
    if let Some(note) = &last_error {
        let kind = note.get("kind").and_then(|k| k.as_str()).unwrap_or("other");
        metrics.count_buffer_error(kind);
        tracing::warn!(?note, "the last run stopped on a buffer failure");
    }
    if cfg.kafka.commands_enabled && cfg.commands.allow_unsigned() {
        tracing::warn!("commands.allow_unsigned = true: anyone who can write the command topic can pause, resume and stop instruments");
    }

    let (ingest, ingest_rx) = ingest::channel(INGEST_QUEUE);
    let apps = Arc::new(devices::app::AppHub::default());
    let live = Arc::new(crate::live::Live::new(
        serde_json::to_value(&cfg.pipeline.thresholds).unwrap_or_default(),
    ));
    // The command handler: the Kafka consumer's, and the status page's buttons'.
    let router = Router::default();
    let handler = Arc::new(Handler {
        validator: Validator::new(cfg.agent.agent_id.clone(), cfg.commands.clone()),
        router: router.clone(),
        ingest: ingest.clone(),
        metrics: metrics.clone(),
        replay: commands::replay::ReplayStore::new(buffer.side_tree("command_ids")?),
        waits: TaskTracker::new(),
    });
    let local = if cfg.http.operators.is_empty() {
        None
    } else {
        Some(
            http::page::Local::new(&cfg.http.operators, handler.clone())
                .map_err(|(key, message)| AgentError::Api { key, message })?,
        )
    };
    let api = if cfg.api.enabled() {
        Some(
            http::api::Api::new(&cfg.api, ingest.clone(), apps.clone())
                .map_err(|(key, message)| AgentError::Api { key, message })?,
        )
    } else {
        None
    };
    // HTTP first, so /health answers while everything else starts.
    let http_stop = CancellationToken::new();
    let http_state = Arc::new(HttpState {
        agent_id: cfg.agent.agent_id.clone(),
        metrics: metrics.clone(),
        buffer: buffer.clone(),
        kafka_unhealthy_after: cfg.http.kafka_unhealthy_after,
        commands_enabled: cfg.kafka.commands_enabled,
        api,
        live: live.clone(),
        local,
        streams: Arc::new(tokio::sync::Semaphore::new(http::MAX_STREAMS)),
        streams_refused: Default::default(),
    });
    let http_task = match cfg.http.addr() {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Http {
                    addr: addr.to_string(),
                    source,
                })?;
            tracing::info!(%addr, "http listening");
            Some(tokio::spawn(http::serve(
                listener,
                http_state.clone(),
                http_stop.clone(),
            )))
        }
        None => None,
    };

    let ingest_drain = CancellationToken::new();
    let (drained_tx, drained_rx) = oneshot::channel();
    let ingest_task = tokio::spawn(ingest::run(
        ingest_rx,
        ingest::IngestStage {
            buffer: buffer.clone(),
            agent_id: cfg.agent.agent_id.clone(),
            commit_interval: cfg.buffer.commit_interval,
            metrics: metrics.clone(),
            pipeline: crate::pipeline::Pipeline::new(&cfg.pipeline, metrics.clone()),
            drain: ingest_drain.clone(),
            drained: Some(drained_tx),
            topic_names: cfg.kafka.topics.names(),
            live: live.clone(),
        },
    ));
    if let Some(note) = last_error {
        ingest.event("buffer_error", note).await;
    }

    let (failures_tx, failures) = mpsc::unbounded_channel();
    let sink = Arc::new(kafka::DeliverySink::new(
        buffer.clone(),
        failures_tx,
        cfg.kafka.max_in_flight,
    ));
    let producer = kafka::producer(
        &cfg.kafka,
        kafka::AgentContext {
            metrics: metrics.clone(),
            sink: sink.clone(),
            tls: cfg
                .kafka
                .security_protocol
                .uses_tls()
                .then(|| kafka::tls::TlsProbe::new(&cfg.kafka)),
        },
    )?;
    let background = CancellationToken::new();
    if cfg.kafka.create_topics {
        let kafka = cfg.kafka.clone();
        let stop = background.clone();
        tokio::spawn(async move { create_topics_until_done(&kafka, stop).await });
    }
    let fwd_stop = CancellationToken::new();
    let status = kafka::status::StatusPublisher {
        identity: kafka::status::Identity {
            agent_id: cfg.agent.agent_id.clone(),
            session_id: uuid::Uuid::new_v4().to_string(),
            host: kafka::status::host_name(),
            config_digest: kafka::status::digest(&cfg.redacted_toml()),
            interval: cfg.kafka.status_interval,
            started: std::time::SystemTime::now(),
        },
        producer: producer.clone(),
        topic: cfg.kafka.topics.status.clone(),
        metrics: metrics.clone(),
        buffer: buffer.clone(),
        slot: sink.status.clone(),
        seq: 0,
    };
    let status_task = tokio::spawn(status.run(fwd_stop.clone(), cfg.agent.shutdown_grace));
    let forwarder = Forwarder {
        buffer: buffer.clone(),
        producer,
        sink,
        failures,
        topics: cfg.kafka.topics.clone(),
        agent_id: cfg.agent.agent_id.clone(),
        metrics: metrics.clone(),
        ingest: ingest.clone(),
        window: cfg.kafka.max_in_flight,
        replayed_after_ms: cfg.kafka.replayed_after.as_millis() as u64,
    };
    let fwd_task = {
        let run = forwarder.run(fwd_stop.clone(), cfg.agent.shutdown_grace);
        let (metrics, dir) = (metrics.clone(), buffer.dir().to_path_buf());
        tokio::spawn(async move {
            let r = run.await;
            // A chunk the disk would not give back: reported as a failed write is.
            if let Err(ForwarderError::Buffer(e)) = &r {
                ingest::buffer_failed(&metrics, &dir, "buffer read failed", e);
            }
            r
        })
    };

    // Devices: one supervised task each, with its own stop token so a reload can stop
    // or replace one device while the others (and the buffer) carry on.
    let dev_stop = CancellationToken::new();
    let devices_tracker = TaskTracker::new();
    let mut fleet = Fleet {
        agent_id: cfg.agent.agent_id.clone(),
        running: BTreeMap::new(),
        tracker: devices_tracker.clone(),
        router: router.clone(),
        ingest: ingest.clone(),
        metrics: metrics.clone(),
        buffer: buffer.clone(),
        apps,
        stop: dev_stop.clone(),
    };
    for d in &cfg.devices {
        fleet.start(d.clone());
    }

    // Commands.
    let cmd_stop = CancellationToken::new();
    tokio::spawn(feed_status(http_state.clone(), background.clone()));
    let cmd_task = if cfg.kafka.commands_enabled {
        let cfg = cfg.clone();
        let stop = cmd_stop.clone();
        Some(tokio::spawn(async move {
            commands::run(
                &cfg.kafka,
                &cfg.consumer_group(),
                &cfg.agent.agent_id,
                &cfg.commands,
                handler,
                stop,
            )
            .await
        }))
    } else {
        drop(handler);
        None
    };
    drop(ingest);
    let mut stages = Stages {
        ingest: Some(ingest_task),
        forwarder: Some(fwd_task),
        commands: cmd_task,
        http: http_task,
    };

    // systemd: ready (the buffer is open and every stage runs); watchdog while loops beat.
    if let Err(e) = crate::systemd::notify("READY=1") {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    if let Some(interval) = crate::systemd::watchdog_interval() {
        tokio::spawn(crate::systemd::feed_watchdog(
            interval,
            metrics.clone(),
            cfg.kafka.commands_enabled,
            background.clone(),
        ));
    }
    tracing::info!(devices = cfg.devices.len(), "agent running");
    if let Some(after) = crate::memory::page_out_after() {
        tokio::spawn(page_out_start_up(after));
    }
    let mut current = (*cfg).clone();
    let failed = loop {
        tokio::select! {
            () = stop.cancelled() => break None,
            e = stages.first_to_end() => break Some(e),
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                let _ = crate::systemd::notify("RELOADING=1");
                if let Some(path) = &config_path {
                    reload(path, &mut current, &mut fleet).await;
                } else {
                    tracing::warn!("SIGHUP ignored: the agent was not started from a config file");
                }
                let _ = crate::systemd::notify("READY=1");
            }
        }
    };
    let _ = crate::systemd::notify("STOPPING=1");
    if let Some(e) = failed {
        // Whatever was acknowledged is on disk; the rest of the process goes down
        // with the runtime, and systemd starts the agent again.
        tracing::error!(error = %e, "a stage of the agent failed; exiting so that it restarts");
        let _ = crate::systemd::notify(&format!("STATUS=failed: {e}"));
        return Err(e);
    }
    drain(
        stages,
        Drain {
            fleet,
            devices: devices_tracker,
            dev_stop,
            cmd_stop,
            background,
            ingest_drain,
            drained: drained_rx,
            fwd_stop,
            status: status_task,
            http_stop,
            http: http_state,
            grace: cfg.agent.shutdown_grace,
        },
    )
    .await?;
    let s = buffer.stats();
    tracing::info!(records_left = s.records, "buffer flushed; agent stopped");
    Ok(())
}

/// What an orderly shutdown stops, in order.
struct Drain {
    fleet: Fleet,
    devices: TaskTracker,
    dev_stop: CancellationToken,
    cmd_stop: CancellationToken,
    background: CancellationToken,
    ingest_drain: CancellationToken,
    drained: oneshot::Receiver<()>,
    fwd_stop: CancellationToken,
    /// Sends the death message when `fwd_stop` fires.
    status: JoinHandle<()>,
    http_stop: CancellationToken,
    /// Its API stops taking records before ingest ends.
    http: Arc<HttpState>,
    grace: Duration,
}

/// Orderly shutdown: devices and commands stop → ingest stores what they said last
/// and the pipeline's open windows → the forwarder delivers what is durable within the
/// grace period → ingest ends and flushes. Every wait is bounded.
async fn drain(mut stages: Stages, d: Drain) -> Result<(), AgentError> {
    tracing::info!("shutting down: stopping devices and commands");
    drop(d.fleet);
    d.devices.close();
    d.cmd_stop.cancel();
    d.dev_stop.cancel();
    d.background.cancel();
    let bound = d.grace.max(Duration::from_secs(5));
    if tokio::time::timeout(bound, d.devices.wait()).await.is_err() {
        tracing::warn!("devices did not stop within the grace period");
    }
    if let Some(t) = stages.commands.take() {
        match tokio::time::timeout(bound, t).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "command consumer ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "command consumer task failed"),
            Err(_) => tracing::warn!("command consumer did not stop within the grace period"),
            Ok(Ok(Ok(()))) => {}
        }
    }
    // Lab software's records now get 503 (retry later); those already taken are stored.
    if let Some(api) = &d.http.api {
        api.close();
    }
    if let Some(local) = &d.http.local {
        local.close();
    }
    d.ingest_drain.cancel();
    if tokio::time::timeout(bound, d.drained).await.is_err() {
        tracing::warn!("ingest did not store the last records within the grace period");
    }
    tracing::info!(grace = ?d.grace, "devices stopped; delivering what is buffered");
    d.fwd_stop.cancel();
    let fwd = match stages.forwarder.take() {
        Some(t) => tokio::time::timeout(d.grace + bound, t).await,
        None => Ok(Ok(Ok(()))),
    };
    if tokio::time::timeout(bound, d.status).await.is_err() {
        tracing::warn!("the status task did not end within the grace period");
    }
    // The forwarder held the last ingest handle: ingest now ends and flushes.
    let ing = match stages.ingest.take() {
        Some(t) => tokio::time::timeout(bound, t).await,
        None => Ok(Ok(Ok(()))),
    };
    d.http_stop.cancel();
    if let Some(t) = stages.http.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let stage = |stage: &'static str, cause: String| AgentError::Stage {
        stage,
        cause,
        disk: false,
    };
    match ing {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e.into()),
        Ok(Err(e)) => return Err(stage("ingest", panic_text(&e))),
        Err(_) => {
            return Err(stage(
                "ingest",
                "did not finish within the grace period".into(),
            ))
        }
    }
    match fwd {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(ForwarderError::Buffer(e)))) => Err(e.into()),
        Ok(Ok(Err(e))) => Err(stage("forwarder", e.to_string())),
        Ok(Err(e)) => Err(stage("forwarder", panic_text(&e))),
        Err(_) => Err(stage(
            "forwarder",
            "did not finish within the grace period".into(),
        )),
    }
}

/// The running devices, by id.
struct Fleet {
    agent_id: String,
    running: BTreeMap<String, Running>,
    tracker: TaskTracker,
    router: Router,
    ingest: ingest::Ingest,
    metrics: Arc<Metrics>,
    /// Given to drivers that keep source positions in it.
    buffer: Arc<Buffer>,
    /// Where app devices meet their applications (shared with the HTTP API).
    apps: Arc<devices::app::AppHub>,
    stop: CancellationToken,
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Fleet {
    fn start(&mut self, d: devices::DeviceConfig) {
        let (tx, rx) = control::inbox();
        self.router.insert(d.clone(), tx);
        self.metrics.start_device(d.id(), d.kind());
        let stop = self.stop.child_token();
        let ctx = DeviceCtx {
            id: d.id().to_string(),
            agent_id: self.agent_id.clone(),
            ingest: self.ingest.clone(),
            control: rx,
            shutdown: stop.clone(),
            metrics: self.metrics.clone(),
            store: self.buffer.clone(),
            apps: self.apps.clone(),
            run: None,
        };
        tracing::info!(device = d.id(), kind = d.kind(), "device starting");
        let task = self.tracker.spawn(devices::supervise(d.clone(), ctx));
        self.running
            .insert(d.id().to_string(), Running { stop, task });
    }

    /// Stops one device and waits until its task has ended (its port is closed, its last
    /// records are queued for the buffer).
    async fn stop_one(&mut self, id: &str) {
        self.router.remove(id);
        if let Some(r) = self.running.remove(id) {
            r.stop.cancel();
            let _ = r.task.await;
        }
        self.metrics.remove_device(id);
    }
}

/// SIGHUP: reads the config again. Invalid → logged and refused, the running config
/// stays. Valid → devices added, removed or changed (restarted) without touching the
/// buffer; changes elsewhere are reported as needing a restart.
async fn reload(path: &Path, current: &mut Config, fleet: &mut Fleet) {
    let new = match Config::load(path).and_then(|c| c.validate().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "reload refused: the new config is invalid; the running config stays");
            fleet
                .ingest
                .event(
                    "config_reload_failed",
                    crate::record::object([("error", e.to_string().into())]),
                )
                .await;
            return;
        }
    };
    let mut restart_needed = Vec::new();
    for (name, a, b) in [
        ("agent", as_json(&current.agent), as_json(&new.agent)),
        ("kafka", as_json(&current.kafka), as_json(&new.kafka)),
        ("buffer", as_json(&current.buffer), as_json(&new.buffer)),
        ("http", as_json(&current.http), as_json(&new.http)),
        ("log", as_json(&current.log), as_json(&new.log)),
        ("api", as_json(&current.api), as_json(&new.api)),
        (
            "pipeline",
            as_json(&current.pipeline),
            as_json(&new.pipeline),
        ),
        (
            "commands",
            as_json(&current.commands),
            as_json(&new.commands),
        ),
    ] {
        if a != b {
            restart_needed.push(name);
        }
    }
    let old: BTreeMap<String, serde_json::Value> = current
        .devices
        .iter()
        .map(|d| (d.id().to_string(), as_json(d)))
        .collect();
    let want: BTreeMap<String, &devices::DeviceConfig> = new
        .devices
        .iter()
        .map(|d| (d.id().to_string(), d))
        .collect();
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for id in old.keys() {
        if !want.contains_key(id) {
            fleet.stop_one(id).await;
            removed.push(id.clone());
        }
    }
    for (id, d) in &want {
        match old.get(id) {
            None => {
                fleet.start((*d).clone());
                added.push(id.clone());
            }
            Some(v) if *v != as_json(d) => {
                fleet.stop_one(id).await;
                fleet.start((*d).clone());
                changed.push(id.clone());
            }
            Some(_) => {}
        }
    }
    tracing::info!(?added, ?removed, ?changed, "config reloaded");
    if !restart_needed.is_empty() {
        tracing::warn!(sections = ?restart_needed, "reload applied to devices only: these sections changed and take effect after a restart");
    }
    let list = |v: &[String]| serde_json::Value::from(v.to_vec());
    fleet
        .ingest
        .event(
            "config_reloaded",
            crate::record::object([
                ("added", list(&added)),
                ("removed", list(&removed)),
                ("changed", list(&changed)),
                (
                    "restart_needed",
                    restart_needed
                        .iter()
                        .map(|s| serde_json::Value::from(*s))
                        .collect(),
                ),
            ]),
        )
        .await;
    // What is running now: the new devices; the other sections stay as they started.
    current.devices = new.devices;
}

/// Comparable form of any config section.
fn as_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Once, `after` the agent is ready: gives the kernel back the pages of code and
/// read-only data that only starting needed ([`crate::memory::page_out_file_pages`]).
/// Best effort: a kernel that cannot is noted and nothing else changes.
async fn page_out_start_up(after: Duration) {
    tokio::time::sleep(after).await;
    match tokio::task::spawn_blocking(crate::memory::page_out_file_pages).await {
        Ok(Ok(done)) => tracing::info!(
            mappings = done.mappings,
            bytes = done.bytes,
            refused = done.refused,
            data_read_page_by_page = done.page_by_page,
            rss_before_kib = done.rss_before_kib,
            rss_after_kib = done.rss_after_kib,
            "start-up code and read-only data given back to the kernel"
        ),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "cannot give start-up code back to the kernel (MADV_PAGEOUT needs Linux 5.4)");
        }
        Err(e) => tracing::warn!(error = %e, "giving start-up code back to the kernel failed"),
    }
}

/// Status for the page: every two seconds while a page watches, and a delivery sample
/// every [`crate::live::RATE_EVERY`] for its rate plot.
async fn feed_status(st: Arc<HttpState>, stop: CancellationToken) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        n += 1;
        if n % crate::live::RATE_EVERY.as_secs().max(1) == 0 {
            st.live.sample_rate(
                crate::record::unix_ms(std::time::SystemTime::now()),
                st.metrics.records_delivered.load(Relaxed),
                st.metrics.records_ingested.load(Relaxed),
            );
        }
        if n % 2 == 0 && st.live.watched() {
            let mut s = st.status();
            s["type"] = "status".into();
            s["at_ms"] = crate::record::unix_ms(std::time::SystemTime::now()).into();
            st.live.send(s);
        }
    }
}

async fn create_topics_until_done(cfg: &kafka::KafkaConfig, stop: CancellationToken) {
    let mut backoff = devices::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let wait = backoff.step();
        match kafka::create_topics(cfg).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, retry_in = ?wait, "cannot create topics yet"),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}
