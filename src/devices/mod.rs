//! Devices: each one a task that owns its port or client, speaks only [`Draft`]s out and
//! [`Control`]s in, and never touches the buffer or Kafka.
//!
//! Drivers are a plain enum ([`DeviceConfig`]) dispatched with `match`. The supervisor
//! restarts a driver that fails, with exponential backoff, until shutdown.

/// Applications as devices: their commands go to a program over HTTP.
pub mod app;
pub mod control;
/// Instruments that write result files into a directory.
pub mod folder;
pub mod line;
pub mod methodscript;
pub mod modbus;
pub mod mqtt;
/// Instruments on the network: TCP links with the serial links' line handling.
pub mod net;
pub mod serial;
pub mod simulated;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Ingest, IngestError};
use crate::metrics::Metrics;
use crate::record::Draft;
use std::sync::Arc;

/// One configured device. `kind` selects the driver.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceConfig {
    /// A PalmSens MethodSCRIPT instrument on a serial port.
    Methodscript(methodscript::driver::Config),
    /// A profile-driven line instrument (SCPI, MT-SICS, CSV) on a serial port.
    LineInstrument(line::driver::Config),
    /// Modbus RTU sensors on a serial bus, read by a register map.
    ModbusRtu(modbus::Config),
    /// Modbus TCP sensors, PLCs or gateways, read by the same register maps.
    ModbusTcp(modbus::TcpConfig),
    /// An instrument that writes result files into a directory.
    Folder(folder::Config),
    /// Sensors (and controllable hardware) on an MQTT broker.
    Mqtt(mqtt::Config),
    /// A simulated potentiostat running CV/CA/LSV on a model cell (demo, tests).
    SimulatedPotentiostat(simulated::potentiostat::Config),
    /// Simulated environmental sensors (demo, tests).
    SimulatedSensors(simulated::sensors::Config),
    /// Lab software that carries out its commands itself (over the HTTP API).
    App(app::Config),
}

impl DeviceConfig {
    /// The device's id.
    pub fn id(&self) -> &str {
        match self {
            DeviceConfig::Methodscript(c) => &c.id,
            DeviceConfig::LineInstrument(c) => &c.id,
            DeviceConfig::ModbusRtu(c) => &c.id,
            DeviceConfig::ModbusTcp(c) => &c.id,
            DeviceConfig::Folder(c) => &c.id,
            DeviceConfig::Mqtt(c) => &c.id,
            DeviceConfig::SimulatedPotentiostat(c) => &c.id,
            DeviceConfig::SimulatedSensors(c) => &c.id,
            DeviceConfig::App(c) => &c.id,
        }
    }

    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceConfig::Methodscript(_) => "methodscript",
            DeviceConfig::LineInstrument(_) => "line_instrument",
            DeviceConfig::ModbusRtu(_) => "modbus_rtu",
            DeviceConfig::ModbusTcp(_) => "modbus_tcp",
            DeviceConfig::Folder(_) => "folder",
            DeviceConfig::Mqtt(_) => "mqtt",
            DeviceConfig::SimulatedPotentiostat(_) => "simulated_potentiostat",
            DeviceConfig::SimulatedSensors(_) => "simulated_sensors",
            DeviceConfig::App(_) => "app",
        }
    }

    /// Checks values; on error returns (key below the device, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        match self {
            DeviceConfig::Methodscript(c) => c.validate(),
            DeviceConfig::LineInstrument(c) => c.validate(),
            DeviceConfig::ModbusRtu(c) => c.validate(),
            DeviceConfig::ModbusTcp(c) => c.validate(),
            DeviceConfig::Folder(c) => c.validate(),
            DeviceConfig::Mqtt(c) => c.validate(),
            DeviceConfig::SimulatedPotentiostat(c) => c.validate(),
            DeviceConfig::SimulatedSensors(c) => c.validate(),
            DeviceConfig::App(c) => c.validate(),
        }
    }

    /// Commands this kind of device understands. Every kind takes start, pause, resume
    /// and stop; line instruments also tare and zero, carried out by their profile's
    /// `[commands.actions]` (a profile without them answers `failed`).
    pub fn accepts(&self, cmd: CommandKind) -> bool {
        let lifecycle = matches!(
            cmd,
            CommandKind::Start | CommandKind::Pause | CommandKind::Resume | CommandKind::Stop
        );
        match self {
            DeviceConfig::LineInstrument(_) => lifecycle || cmd.is_action(),
            // What its config maps to a publish, nothing else.
            DeviceConfig::Mqtt(c) => c.accepts(cmd),
            DeviceConfig::Methodscript(_)
            | DeviceConfig::ModbusRtu(_)
            | DeviceConfig::ModbusTcp(_)
            | DeviceConfig::Folder(_)
            | DeviceConfig::SimulatedPotentiostat(_)
            | DeviceConfig::SimulatedSensors(_)
            | DeviceConfig::App(_) => lifecycle,
        }
    }
}

/// The commands the agent routes to devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Start a run (an experiment or polling).
    Start,
    /// Hold the run where it is.
    Pause,
    /// Continue a paused run.
    Resume,
    /// End the run; an instrument's own stop sequence is sent.
    Stop,
    /// Balances: take the current load as tare (MT-SICS `T`).
    Tare,
    /// Balances: set zero (MT-SICS `Z`).
    Zero,
}

impl CommandKind {
    /// Every command name, for error messages.
    pub const NAMES: &'static str = "start, pause, resume, stop, tare, zero";

    /// The command a name stands for.
    pub fn parse(s: &str) -> Option<CommandKind> {
        match s {
            "start" => Some(CommandKind::Start),
            "pause" => Some(CommandKind::Pause),
            "resume" => Some(CommandKind::Resume),
            "stop" => Some(CommandKind::Stop),
            "tare" => Some(CommandKind::Tare),
            "zero" => Some(CommandKind::Zero),
            _ => None,
        }
    }
    /// The command's name as commands and results spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Start => "start",
            CommandKind::Pause => "pause",
            CommandKind::Resume => "resume",
            CommandKind::Stop => "stop",
            CommandKind::Tare => "tare",
            CommandKind::Zero => "zero",
        }
    }
    /// An instrument action (tare, zero) rather than a change of run state.
    pub fn is_action(self) -> bool {
        matches!(self, CommandKind::Tare | CommandKind::Zero)
    }
}

/// A command on its way to a device task, with where to say how it went.
#[derive(Debug)]
pub struct Control {
    /// What to do.
    pub command: CommandKind,
    /// The command's parameters (method parameters for `start`).
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The command's id (results key on it; an application answers with it).
    pub command_id: String,
    /// Who signed it (`None`: unsigned, or the agent's own lease).
    pub issuer: Option<String>,
    /// `Ok(detail)` when done, `Err(reason)` when the device could not do it.
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// Why a driver stopped before shutdown (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("ingest closed")]
    /// The ingest stage has gone (the agent is stopping).
    Ingest(#[from] IngestError),
    #[error("device configuration: {0}")]
    /// The device's config cannot be used (a profile or method file changed underneath).
    Config(String),
    /// The driver panicked (a bug, never an input's fault): restarted like a failure.
    #[error("driver panicked: {0}")]
    Panic(String),
}

/// What every driver gets: an output, a control input, a shutdown signal.
pub struct DeviceCtx {
    /// The device id, on every record and log line.
    pub id: String,
    /// The agent's id (MQTT client ids are derived from it).
    pub agent_id: String,
    /// Where the driver's records go.
    pub ingest: Ingest,
    /// Commands for this device.
    pub control: control::Inbox,
    /// Cancelled when the agent stops or the device is removed.
    pub shutdown: CancellationToken,
    /// Per-device counters and state.
    pub metrics: Arc<Metrics>,
    /// The buffer, for drivers that resume from source positions stored with their
    /// records (`Buffer::cursor`; written through `Ingest::send_with_cursor`).
    pub store: Arc<crate::buffer::Buffer>,
    /// Where `app` devices meet the applications that carry out their commands.
    pub apps: Arc<app::AppHub>,
    /// The run in progress as its caller described it: [`DeviceCtx::experiment_event`]
    /// and the driver's data records carry it. Set at a run's start, cleared at its end.
    pub run: Option<Arc<crate::record::RunMeta>>,
}

impl DeviceCtx {
    /// Hands a record to ingest (waits while ingest is full).
    pub async fn emit(&self, draft: Draft) -> Result<(), DeviceError> {
        Ok(self.ingest.send(draft).await?)
    }

    /// Sets the state `/status` and the device gauges show.
    pub fn set_state(&self, state: crate::metrics::DeviceState) {
        self.metrics.set_device_state(&self.id, state);
    }

    /// An experiment lifecycle event (keyed by its experiment).
    pub async fn experiment_event(
        &self,
        event: &str,
        experiment_id: &str,
        data: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), DeviceError> {
        self.emit(
            Draft::new(
                self.id.clone(),
                crate::record::Body::ExperimentEvent {
                    event: event.into(),
                    experiment_id: experiment_id.into(),
                    data,
                },
            )
            .in_run(self.run.as_ref()),
        )
        .await
    }

    /// An agent event about this device (`device_connected`, `device_errors` …), with
    /// `device_id` added to its data.
    pub async fn device_event(
        &self,
        event: &str,
        mut data: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), DeviceError> {
        data.insert("device_id".into(), self.id.clone().into());
        self.emit(Draft::agent_event(event, data)).await
    }

    /// While the instrument cannot be reached: waits `backoff`, answering every command
    /// with `why` instead of queueing it. False when the agent is shutting down.
    pub async fn wait_unreachable(&mut self, backoff: Duration, why: &str) -> bool {
        self.set_state(crate::metrics::DeviceState::Disconnected);
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                c = self.control.recv() => match c {
                    Some(c) => { let _ = c.reply.send(Err(format!("instrument not connected: {why}"))); }
                    None => return false,
                },
                () = self.shutdown.cancelled() => return false,
            }
        }
    }

    /// The link to a connected instrument went away: log, state, event.
    pub async fn disconnected(&self, reason: String) -> Result<(), DeviceError> {
        tracing::warn!(device = %self.id, %reason, "instrument disconnected");
        self.set_state(crate::metrics::DeviceState::Disconnected);
        self.device_event(
            "device_disconnected",
            crate::record::object([("reason", reason.into())]),
        )
        .await
    }
}

/// Exponential backoff: a first delay doubling to a ceiling, back to the first after a
/// success. The one policy for every retry loop of the agent; `default()` is the
/// reconnect policy of the drivers (250 ms doubling to 5 s).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(5))
    }
}

impl Backoff {
    /// A backoff from `first` doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay to wait now; the next one is twice as long (at most the ceiling).
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }

    /// Starts again from `first` (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Runs one driver attempt; a panic in the driver comes back as an error.
async fn run_driver(cfg: &DeviceConfig, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let attempt = async {
        match cfg {
            DeviceConfig::Methodscript(c) => methodscript::driver::run(c, ctx).await,
            DeviceConfig::LineInstrument(c) => line::driver::run(c, ctx).await,
            DeviceConfig::ModbusRtu(c) => modbus::run(c, ctx).await,
            DeviceConfig::ModbusTcp(c) => modbus::run_tcp(c, ctx).await,
            DeviceConfig::Folder(c) => folder::run(c, ctx).await,
            DeviceConfig::Mqtt(c) => mqtt::run(c, ctx).await,
            DeviceConfig::SimulatedPotentiostat(c) => simulated::potentiostat::run(c, ctx).await,
            DeviceConfig::SimulatedSensors(c) => simulated::sensors::run(c, ctx).await,
            DeviceConfig::App(c) => app::run(c, ctx).await,
        }
    };
    caught(attempt).await
}

/// Runs a driver attempt, turning a panic into [`DeviceError::Panic`].
async fn caught(
    attempt: impl std::future::Future<Output = Result<(), DeviceError>>,
) -> Result<(), DeviceError> {
    use futures_util::FutureExt;
    // The driver's state lives in the attempt and is dropped with it; the context
    // (inbox, ingest handle) holds nothing a panic can leave half-changed.
    match std::panic::AssertUnwindSafe(attempt).catch_unwind().await {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(DeviceError::Panic(msg))
        }
    }
}

/// Runs one device until shutdown, restarting its driver after failures (a panic
/// included): the device is `failed` meanwhile, which `/health` reports.
pub async fn supervise(cfg: DeviceConfig, mut ctx: DeviceCtx) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let result = run_driver(&cfg, &mut ctx).await;
        match result {
            Ok(()) => break,
            Err(DeviceError::Ingest(_)) if ctx.shutdown.is_cancelled() => break,
            Err(e) => {
                ctx.set_state(crate::metrics::DeviceState::Failed);
                let wait = backoff.step();
                tracing::error!(device = %ctx.id, error = %e, retry_in = ?wait, "device failed");
                let _ = ctx
                    .device_event(
                        "device_failed",
                        crate::record::object([("error", e.to_string().into())]),
                    )
                    .await;
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = ctx.shutdown.cancelled() => break,
                }
            }
        }
    }
    ctx.set_state(crate::metrics::DeviceState::Stopped);
}

/// Validation helper: a finite number within bounds.
pub(crate) fn check_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), (String, String)> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err((
            key.to_string(),
            format!("must be between {lo} and {hi}, got {v}"),
        ))
    }
}

impl DeviceCtx {
    /// Calls `open` until it succeeds, backing off between tries (and answering commands
    /// with the reason meanwhile); None when the agent shuts down first.
    pub async fn retry_open<T, F>(
        &mut self,
        backoff: &mut Backoff,
        mut open: impl FnMut() -> F,
    ) -> Option<T>
    where
        F: std::future::Future<Output = Result<T, String>>,
    {
        let ctx = self;
        let mut announced = false;
        loop {
            if ctx.shutdown.is_cancelled() {
                return None;
            }
            match open().await {
                Ok(opened) => {
                    backoff.reset();
                    return Some(opened);
                }
                Err(e) => {
                    if !announced {
                        tracing::warn!(device = %ctx.id, error = %e, "instrument not reachable; retrying");
                        announced = true;
                    }
                    if !ctx.wait_unreachable(backoff.step(), &e).await {
                        return None;
                    }
                }
            }
        }
    }
}

/// Where a device's `profile` is: itself when it names a `.toml` file, else
/// `<profiles_dir>/<profile>.toml`.
pub fn profile_path(profile: &str, profiles_dir: &std::path::Path) -> std::path::PathBuf {
    let direct = std::path::Path::new(profile);
    if direct.extension().is_some_and(|e| e == "toml") {
        direct.to_path_buf()
    } else {
        profiles_dir.join(format!("{profile}.toml"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let steps: Vec<u128> = (0..5).map(|_| b.step().as_millis()).collect();
        assert_eq!(steps, [200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_driver_panic_becomes_an_error_the_supervisor_restarts_after() {
        let r = caught(async {
            let v: Vec<u8> = Vec::new();
            let _ = v[3]; // a bug in a driver
            Ok(())
        })
        .await;
        match r {
            Err(DeviceError::Panic(m)) => assert!(m.contains("index out of bounds"), "{m}"),
            other => panic!("expected a caught panic, got {other:?}"),
        }
        assert!(caught(async { Ok(()) }).await.is_ok());
    }
}
