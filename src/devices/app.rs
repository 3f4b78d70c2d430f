//! The `app` device: lab software that carries out commands itself.
//!
//! An application (an experiment engine, an orchestrator) is configured as a device of
//! kind `app`. Its commands pass the same validation, signatures, allow-lists, replay
//! store, inbox and two-phase results as an instrument's; instead of a port, the driver
//! hands each one to the application's command stream (`GET
//! /v1/devices/<id>/commands`, Server-Sent Events, see `http::api`) and waits for the
//! application's answer (`POST /v1/commands/<command_id>/result`).
//!
//! A command waits for its answer until its deadline (`timeout` of the command); the
//! handler then reports `timeout`, and the command is dropped here. A command that
//! arrives while no application holds the stream waits the same way and is handed over
//! when one connects. A new stream replaces the old one (an application that reconnects
//! after a network glitch), and every command still waiting is handed to it again: an
//! application must treat a `command_id` it has seen as seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::devices::{CommandKind, Control, DeviceCtx, DeviceError};
use crate::metrics::DeviceState;
use crate::record::RunMeta;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// An `app` device: commands go to an application over HTTP.
pub struct Config {
    /// The device id commands name and the application's records carry.
    pub id: String,
}

impl Config {
    /// Nothing beyond the id (checked with every device's).
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

/// Commands waiting for an application at most (more are answered `failed` at once).
pub const MAX_WAITING: usize = 64;

/// A command as the application's stream carries it.
pub type StreamItem = Value;

/// What the HTTP side asks of an app device's driver.
pub enum ToDriver {
    /// A new command stream: the driver sends commands into it until it closes.
    Attach(mpsc::Sender<StreamItem>),
    /// The application's answer to a command.
    Answer {
        /// The command it answers.
        command_id: String,
        /// `Ok(text)`: completed; `Err(text)`: failed.
        outcome: Result<String, String>,
        /// Whether a command was waiting for it.
        done: oneshot::Sender<bool>,
    },
}

/// Where `app` drivers and the HTTP API meet: each running app device's driver
/// mailbox, and the runs applications have described.
#[derive(Default)]
pub struct AppHub {
    drivers: Mutex<HashMap<String, mpsc::Sender<ToDriver>>>,
    runs: Mutex<RunBook>,
}

/// Runs described by a `start` command or an ingested event, by (device, experiment):
/// the ingest API attaches them to the run's later records.
#[derive(Default)]
struct RunBook {
    by_run: HashMap<(String, String), (Arc<RunMeta>, u64)>,
    clock: u64,
}

/// Runs remembered at most (the least recently used goes first).
pub const MAX_RUNS: usize = 1_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is one insert or remove: a panic elsewhere
    // cannot leave them half-changed.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AppHub {
    /// The driver mailbox of a running app device.
    pub fn driver(&self, device: &str) -> Option<mpsc::Sender<ToDriver>> {
        lock(&self.drivers).get(device).cloned()
    }

    fn register(&self, device: &str, tx: mpsc::Sender<ToDriver>) {
        lock(&self.drivers).insert(device.to_string(), tx);
    }

    fn unregister(&self, device: &str) {
        lock(&self.drivers).remove(device);
    }

    /// Remembers what a run's caller said about it.
    pub fn describe_run(&self, device: &str, experiment_id: &str, meta: Arc<RunMeta>) {
        let mut b = lock(&self.runs);
        b.clock += 1;
        let now = b.clock;
        b.by_run
            .insert((device.to_string(), experiment_id.to_string()), (meta, now));
        if b.by_run.len() > MAX_RUNS {
            if let Some(oldest) = b
                .by_run
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                b.by_run.remove(&oldest);
            }
        }
    }

    /// What is known about a run.
    pub fn run(&self, device: &str, experiment_id: &str) -> Option<Arc<RunMeta>> {
        let mut b = lock(&self.runs);
        b.clock += 1;
        let now = b.clock;
        let e = b
            .by_run
            .get_mut(&(device.to_string(), experiment_id.to_string()))?;
        e.1 = now;
        Some(e.0.clone())
    }

    /// Forgets a run (it has ended).
    pub fn end_run(&self, device: &str, experiment_id: &str) {
        lock(&self.runs)
            .by_run
            .remove(&(device.to_string(), experiment_id.to_string()));
    }
}

struct Waiting {
    command_id: String,
    message: StreamItem,
    reply: oneshot::Sender<Result<String, String>>,
}

/// The message an application receives for a command.
fn message(c: &Control, device: &str) -> StreamItem {
    json!({
        "type": "command",
        "command_id": c.command_id,
        "command": c.command.as_str(),
        "params": c.params,
        "device_id": device,
        "issuer": c.issuer,
    })
}

/// Driver entry point.
pub async fn run(_cfg: &Config, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let (tx, mut rx) = mpsc::channel(32);
    ctx.apps.register(&ctx.id, tx);
    let r = drive(ctx, &mut rx).await;
    ctx.apps.unregister(&ctx.id);
    r
}

async fn drive(ctx: &mut DeviceCtx, rx: &mut mpsc::Receiver<ToDriver>) -> Result<(), DeviceError> {
    let mut stream: Option<mpsc::Sender<StreamItem>> = None;
    let mut waiting: Vec<Waiting> = Vec::new();
    ctx.set_state(DeviceState::Connecting);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            c = ctx.control.recv() => {
                let Some(c) = c else { return Ok(()) };
                if let Some(w) = accept(ctx, c, waiting.len()) {
                    if let Some(s) = &stream {
                        if s.try_send(w.message.clone()).is_err() {
                            tracing::warn!(device = %ctx.id, command_id = %w.command_id, "application's command stream is not taking commands; the command waits for the next one");
                        }
                    }
                    waiting.push(w);
                }
            }
            m = rx.recv() => match m {
                None => return Ok(()),
                Some(ToDriver::Attach(s)) => {
                    waiting.retain(|w| !w.reply.is_closed());
                    for w in &waiting {
                        let _ = s.try_send(w.message.clone());
                    }
                    let was = stream.replace(s).is_some_and(|old| !old.is_closed());
                    if !was {
                        ctx.set_state(DeviceState::Idle);
                        ctx.device_event("device_connected", crate::record::object([("via", "command stream".into())])).await?;
                    }
                    tracing::info!(device = %ctx.id, waiting = waiting.len(), "application connected its command stream");
                }
                Some(ToDriver::Answer { command_id, outcome, done }) => {
                    let found = waiting.iter().position(|w| w.command_id == command_id && !w.reply.is_closed());
                    match found {
                        Some(i) => {
                            let w = waiting.remove(i);
                            let _ = w.reply.send(outcome);
                            let _ = done.send(true);
                        }
                        None => { let _ = done.send(false); }
                    }
                }
            },
            _ = tick.tick() => {
                waiting.retain(|w| !w.reply.is_closed());
                if stream.as_ref().is_some_and(|s| s.is_closed()) {
                    stream = None;
                    ctx.set_state(DeviceState::Connecting);
                    ctx.disconnected("the application closed its command stream".into()).await?;
                    ctx.set_state(DeviceState::Connecting);
                }
            }
            () = ctx.shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Checks a command for the application; answers it at once if it cannot be handed on.
fn accept(ctx: &DeviceCtx, c: Control, waiting: usize) -> Option<Waiting> {
    if c.command.is_action()
        || !matches!(
            c.command,
            CommandKind::Start | CommandKind::Pause | CommandKind::Resume | CommandKind::Stop
        )
    {
        let _ = c.reply.send(Err(format!(
            "an application takes start, pause, resume and stop, not {}",
            c.command.as_str()
        )));
        return None;
    }
    if waiting >= MAX_WAITING && c.command != CommandKind::Stop {
        let _ = c.reply.send(Err(format!(
            "{MAX_WAITING} commands already wait for the application"
        )));
        return None;
    }
    if c.command == CommandKind::Start {
        let mut params = c.params.clone();
        match crate::runs::take_run(&mut params) {
            Err(e) => {
                let _ = c.reply.send(Err(e.to_string()));
                return None;
            }
            Ok(spec) => {
                if let (Some(id), Some(meta)) = (&spec.experiment_id, spec.meta) {
                    ctx.apps.describe_run(&ctx.id, id, meta);
                }
            }
        }
    }
    Some(Waiting {
        command_id: c.command_id.clone(),
        message: message(&c, &ctx.id),
        reply: c.reply,
    })
}
