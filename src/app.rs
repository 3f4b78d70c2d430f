//! The running agent: builds every subsystem from the config, runs them, and shuts them
//! down in order (design.md): devices and commands stop → pending records reach the
//! buffer → the forwarder finishes in-flight sends within the grace period → the buffer
//! is flushed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buffer::{Buffer, BufferError};
use crate::commands::{self, Handler, Router, Validator};
use crate::config::Config;
use crate::devices::control;
use crate::devices::{self, DeviceCtx};
use crate::http::{self, HttpState};
use crate::ingest;
use crate::kafka::{self, forwarder::Forwarder};
use crate::metrics::Metrics;

/// Capacity of the ingest channel (records waiting to be stamped and appended). Ingest
/// takes up to 4,096 per receive; twice that keeps it busy without letting a device at
/// full speed park tens of MB of drafts in the queue.
const INGEST_QUEUE: usize = 8_192;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaSetupError),
    #[error("http.listen {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    #[error("task failed: {0}")]
    Task(String),
}

/// Path of the buffer inside the data dir.
pub fn buffer_dir(cfg: &Config) -> std::path::PathBuf {
    cfg.agent.data_dir.join("buffer")
}

/// Runs the agent until `stop` is cancelled (a signal, in `main`).
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
    let buffer = Arc::new(Buffer::open(&buffer_dir(&cfg), &cfg.buffer)?);
    let stats = buffer.stats();
    tracing::info!(agent_id = %cfg.agent.agent_id, records = stats.records, bytes = stats.bytes, "buffer open");

    // HTTP first, so /health answers while everything else starts.
    let http_stop = CancellationToken::new();
    let http_state = Arc::new(HttpState {
        agent_id: cfg.agent.agent_id.clone(),
        metrics: metrics.clone(),
        buffer: buffer.clone(),
        kafka_unhealthy_after: cfg.http.kafka_unhealthy_after,
        commands_enabled: cfg.kafka.commands_enabled,
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
                http_state,
                http_stop.clone(),
            )))
        }
        None => None,
    };

    let (ingest, ingest_rx) = ingest::channel(INGEST_QUEUE);
    let ingest_task = tokio::spawn(ingest::run(
        ingest_rx,
        buffer.clone(),
        cfg.agent.agent_id.clone(),
        cfg.buffer.commit_interval,
        metrics.clone(),
        crate::pipeline::Pipeline::new(&cfg.pipeline, metrics.clone()),
    ));

    let (failures_tx, failures) = mpsc::unbounded_channel();
    let sink = Arc::new(kafka::DeliverySink {
        buffer: buffer.clone(),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        failures: failures_tx,
        wake: tokio::sync::Notify::new(),
    });
    let producer = kafka::producer(
        &cfg,
        kafka::AgentContext {
            metrics: metrics.clone(),
            sink: sink.clone(),
        },
    )?;
    let background = CancellationToken::new();
    if cfg.kafka.create_topics {
        let cfg = cfg.clone();
        let stop = background.clone();
        tokio::spawn(async move { create_topics_until_done(&cfg, stop).await });
    }
    let fwd_stop = CancellationToken::new();
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
    };
    let fwd_task = tokio::spawn(forwarder.run(fwd_stop.clone(), cfg.agent.shutdown_grace));

    // Devices: one supervised task each, with its own stop token so a reload can stop
    // or replace one device while the others (and the buffer) carry on.
    let dev_stop = CancellationToken::new();
    let devices_tracker = TaskTracker::new();
    let router = Router::default();
    let mut fleet = Fleet {
        agent_id: cfg.agent.agent_id.clone(),
        running: BTreeMap::new(),
        tracker: devices_tracker.clone(),
        router: router.clone(),
        ingest: ingest.clone(),
        metrics: metrics.clone(),
        stop: dev_stop.clone(),
    };
    for d in &cfg.devices {
        fleet.start(d.clone());
    }

    // Commands.
    let cmd_stop = CancellationToken::new();
    let cmd_task = if cfg.kafka.commands_enabled {
        let handler = Handler {
            validator: Validator::new(cfg.agent.agent_id.clone(), cfg.commands.clone()),
            router,
            ingest: ingest.clone(),
            metrics: metrics.clone(),
            replay: commands::replay::ReplayStore::new(buffer.side_tree("command_ids")?),
            waits: TaskTracker::new(),
        };
        let cfg = cfg.clone();
        let stop = cmd_stop.clone();
        Some(tokio::spawn(async move {
            // A consumer that cannot even be created (bad config) is retried; commands
            // matter too much to give up on, and data keeps flowing meanwhile.
            if let Err(e) = commands::run(&cfg, handler, stop).await {
                tracing::error!(error = %e, "command consumer stopped");
            }
        }))
    } else {
        drop(router);
        None
    };
    drop(ingest);

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
    let mut current = (*cfg).clone();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
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
    }
    let _ = crate::systemd::notify("STOPPING=1");
    tracing::info!("shutting down: stopping devices and commands");
    drop(fleet);
    devices_tracker.close();

    cmd_stop.cancel();
    dev_stop.cancel();
    background.cancel();
    devices_tracker.wait().await;
    if let Some(t) = cmd_task {
        let _ = t.await;
    }
    tracing::info!(grace = ?cfg.agent.shutdown_grace, "devices stopped; finishing in-flight sends");
    fwd_stop.cancel();
    let fwd_result = fwd_task
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?;
    // The forwarder held the last ingest handle: ingest now drains and flushes.
    let ingest_result = ingest_task
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?;
    buffer.flush().await?;
    http_stop.cancel();
    if let Some(t) = http_task {
        let _ = t.await;
    }
    fwd_result?;
    ingest_result?;
    let s = buffer.stats();
    tracing::info!(records_left = s.records, "buffer flushed; agent stopped");
    Ok(())
}

/// The running devices, by id.
struct Fleet {
    agent_id: String,
    running: BTreeMap<String, Running>,
    tracker: TaskTracker,
    router: Router,
    ingest: ingest::Ingest,
    metrics: Arc<Metrics>,
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
        self.metrics.set_device_state(d.id(), "starting");
        let stop = self.stop.child_token();
        let ctx = DeviceCtx {
            id: d.id().to_string(),
            agent_id: self.agent_id.clone(),
            ingest: self.ingest.clone(),
            control: rx,
            shutdown: stop.clone(),
            metrics: self.metrics.clone(),
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

async fn create_topics_until_done(cfg: &Config, stop: CancellationToken) {
    let mut wait = Duration::from_millis(500);
    loop {
        match kafka::create_topics(cfg).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, retry_in = ?wait, "cannot create topics yet"),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}
