//! The running agent: builds every subsystem from the config, runs them, and shuts them
//! down in order (design.md): devices and commands stop → pending records reach the
//! buffer → the forwarder finishes in-flight sends within the grace period → the buffer
//! is flushed.

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
pub async fn run(cfg: Config, stop: CancellationToken) -> Result<(), AgentError> {
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

    // Devices.
    let dev_stop = CancellationToken::new();
    let devices_tracker = TaskTracker::new();
    let router = Router::default();
    for d in &cfg.devices {
        let (tx, rx) = control::inbox();
        router.insert(d.clone(), tx);
        metrics.set_device_state(d.id(), "starting");
        let ctx = DeviceCtx {
            id: d.id().to_string(),
            ingest: ingest.clone(),
            control: rx,
            shutdown: dev_stop.clone(),
            metrics: metrics.clone(),
        };
        tracing::info!(device = d.id(), kind = d.kind(), "device starting");
        devices_tracker.spawn(devices::supervise(d.clone(), ctx));
    }
    devices_tracker.close();

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

    tracing::info!(devices = cfg.devices.len(), "agent running");
    stop.cancelled().await;
    tracing::info!("shutting down: stopping devices and commands");

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
