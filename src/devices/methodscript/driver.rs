//! The `methodscript` device: a PalmSens MethodSCRIPT instrument (EmStat Pico, EmStat4,
//! Nexus) on a serial port.
//!
//! On connect: resync (`\n` + `Z`, drain), identify (`t`, `i`, `v`) → a
//! `device_connected` event with type, firmware and serial. A `start` command (or
//! `autostart`) renders the configured method with its parameters and runs it; device
//! output becomes `echem_data` chunks (per measurement loop, with its technique and step,
//! as [`super::plan`] follows the script) and experiment events; pause → `h`, resume → `H`,
//! stop → abort-and-sync. A lost port fails the running experiment (partial data is
//! kept), and the driver reconnects with backoff, by path or by USB identity.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::method::Method;
use super::plan::{self, Plan};
use super::script::Script;
use super::session::{Command, Output, Session, State};
use super::Line;
use crate::devices::serial::{self, Flow, Frame, Incoming, Parity, UsbId};
use crate::devices::{CommandKind, Control, DeviceCtx, DeviceError};
use crate::record::{object, Body, Draft, Point};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `methodscript` device: a PalmSens instrument running MethodSCRIPT over serial.
pub struct Config {
    /// The device id records and commands carry.
    pub id: String,
    /// Port path, e.g. `/dev/ttyACM0` or a `/dev/serial/by-id/…` link. Or use `usb`.
    #[serde(default)]
    pub port: Option<String>,
    /// Find the port by USB identity, so a replugged instrument is found under its new
    /// `/dev/ttyUSBn`.
    #[serde(default)]
    pub usb: Option<UsbId>,
    /// 230400 for EmStat Pico, 921600 for EmStat4 and Nexus.
    #[serde(default = "d_baud")]
    pub baud: u32,
    /// Frame: 8N1 with no flow control is what PalmSens documents.
    #[serde(default = "d_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    /// Parity bit (PalmSens: none).
    pub parity: Parity,
    #[serde(default = "d_stop_bits")]
    /// Stop bits (PalmSens: 1).
    pub stop_bits: u8,
    /// `software` is XON/XOFF (Sensit Wearable application firmware).
    #[serde(default)]
    pub flow_control: Flow,
    /// A method name in `methods_dir` (`cv`, `ca`, `lsv`) or a path to a `.mscr` file.
    pub method: String,
    #[serde(default = "d_methods_dir")]
    /// Where method names are looked up.
    pub methods_dir: PathBuf,
    /// Method parameters (a `start` command's parameters override these).
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Run the method as soon as the instrument is connected the first time.
    #[serde(default)]
    pub autostart: bool,
    #[serde(default = "d_points")]
    /// Data points per `echem_data` record, at most.
    pub points_per_message: usize,
    #[serde(default = "d_interval", with = "crate::time::serde_duration")]
    /// A partly filled record is sent after this long, so slow scans still show up live.
    pub max_interval: Duration,
}

fn d_baud() -> u32 {
    230_400
}
fn d_data_bits() -> u8 {
    8
}
fn d_stop_bits() -> u8 {
    1
}

fn d_methods_dir() -> PathBuf {
    PathBuf::from("devices/methods")
}
fn d_points() -> usize {
    50
}
fn d_interval() -> Duration {
    Duration::from_millis(500)
}

impl Config {
    /// Checks the port choice, the frame and that the method loads with its parameters.
    pub fn validate(&self) -> Result<(), (String, String)> {
        serial::check_port_choice(self.port.as_deref(), self.usb.as_ref())?;
        self.frame().validate()?;
        if self.points_per_message == 0 || self.points_per_message > 100_000 {
            return Err(("points_per_message".into(), "must be 1..=100000".into()));
        }
        let m = Method::load(&self.methods_dir, &self.method)
            .map_err(|e| ("method".to_string(), e.to_string()))?;
        m.render(&self.params)
            .map_err(|e| ("params".to_string(), e.to_string()))?;
        Ok(())
    }

    /// The frame to open the port with.
    fn frame(&self) -> Frame {
        Frame {
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
            flow_control: self.flow_control,
        }
    }
}

/// What identification found.
#[derive(Debug, Clone, Default)]
struct Info {
    port: String,
    device_type: String,
    firmware: String,
    serial: String,
    mscript_version: String,
}

/// A device error: code, text, its context, and where in the method file.
type DeviceFault = (u16, String, Option<String>, Option<(usize, usize)>);

/// How a connection ended.
enum Ended {
    Lost(String),
    Shutdown,
}

struct Experiment {
    id: String,
    technique: String,
    /// The script's loops and where the device is in it.
    plan: Plan,
    /// The measurement loop running (index into `plan.loops`).
    current: Option<usize>,
    /// Measurement loops started so far (the step of the records).
    loops_started: u32,
    /// Points of the running loop so far.
    loop_points: u64,
    /// The running loop reports scans (`C…` seen).
    loop_has_scans: bool,
    /// Fields of the chunk's points that are the applied setting.
    chunk_applied: Vec<&'static str>,
    started: Instant,
    chunk: Vec<Point>,
    chunk_started: Instant,
    scan: u32,
    /// First device error seen: (code, text, context, line and column in the method file).
    error: Option<DeviceFault>,
    /// Who asked to start (answered when the device echoes `e`).
    start_reply: Option<oneshot::Sender<Result<String, String>>>,
    /// Who asked to stop (answered when the script has ended), and its command id.
    stop_reply: Option<oneshot::Sender<Result<String, String>>>,
    stop_command: Option<String>,
    /// The agent is stopping: the abort is its own, not a command's.
    shutting_down: bool,
    /// A scan has begun and not yet ended (`C…` seen, `-` not yet).
    in_scan: bool,
    points: u64,
}

impl Experiment {
    /// An abort is on its way (a stop command or the agent's shutdown).
    fn aborting(&self) -> bool {
        self.stop_reply.is_some() || self.shutting_down
    }
}

struct Conn<'a> {
    cfg: &'a Config,
    ctx: &'a mut DeviceCtx,
    method: &'a Method,
    writer: Box<dyn Write + Send>,
    lines: mpsc::Receiver<Incoming>,
    session: Session,
    info: Info,
    exp: Option<Experiment>,
    /// Commands sent, waiting for the device's reply.
    pending: Vec<(Command, oneshot::Sender<Result<String, String>>)>,
}

impl Conn<'_> {
    /// `Line L, Col C` of the script as sent → line and column in the method file.
    fn user_place(&self, context: &str) -> Option<(usize, usize)> {
        let mut nums = context
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>().ok());
        let line = nums.next()??;
        let col = nums.next().flatten().unwrap_or(1);
        Some((self.method.user_line(line)?, col))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
            .map_err(|e| format!("write failed: {e}"))
    }

    /// Reads lines until one satisfies `want`, for the identification exchange.
    async fn read_until(
        &mut self,
        want: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Err(_) => return Err(format!("no answer within {timeout:?} (got {got:?})")),
                Ok(None) => return Err("reader stopped".into()),
                Ok(Some(Incoming::Lost(e))) => return Err(e),
                Ok(Some(Incoming::Line(Err(_)))) => self.ctx.metrics.count_bad_line(&self.ctx.id),
                Ok(Some(Incoming::Line(Ok(l)))) => {
                    let done = want(&l);
                    got.push(l);
                    if done {
                        return Ok(got);
                    }
                }
            }
        }
    }

    /// Resync and identify.
    async fn hello(&mut self) -> Result<(), String> {
        // Abort whatever may run (after an agent restart the device may still be
        // measuring) and drain to a known state.
        self.write(b"\nZ\n")?;
        let lines = self
            .read_until(|l| l == "Z" || l.starts_with("Z!"), Duration::from_secs(5))
            .await?;
        if lines.last().is_some_and(|l| l == "Z") {
            self.read_until(str::is_empty, Duration::from_secs(10))
                .await?;
        }
        self.write(b"t\n")?;
        let t = self
            .read_until(|l| l.ends_with('*'), Duration::from_secs(3))
            .await?;
        let first = t
            .iter()
            .find(|l| l.starts_with('t'))
            .cloned()
            .unwrap_or_default();
        self.info.firmware = first.trim_start_matches('t').to_string();
        self.info.device_type = self.info.firmware.chars().take(6).collect();
        self.write(b"i\n")?;
        let i = self
            .read_until(|l| l.starts_with('i'), Duration::from_secs(3))
            .await?;
        self.info.serial = i.last().map(|l| l[1..].to_string()).unwrap_or_default();
        self.write(b"v\n")?;
        let v = self
            .read_until(|l| l.starts_with('v'), Duration::from_secs(3))
            .await?;
        self.info.mscript_version = v.last().map(|l| l[1..].to_string()).unwrap_or_default();
        Ok(())
    }

    fn info_json(&self) -> serde_json::Map<String, serde_json::Value> {
        object([
            ("port", self.info.port.clone().into()),
            ("device_type", self.info.device_type.clone().into()),
            ("firmware", self.info.firmware.clone().into()),
            ("serial", self.info.serial.clone().into()),
            ("mscript_version", self.info.mscript_version.clone().into()),
        ])
    }

    async fn flush_chunk(&mut self) -> Result<(), DeviceError> {
        let Some(exp) = &mut self.exp else {
            return Ok(());
        };
        if exp.chunk.is_empty() {
            return Ok(());
        }
        let points = std::mem::take(&mut exp.chunk);
        let applied = std::mem::take(&mut exp.chunk_applied);
        let draft = Draft::new(
            self.ctx.id.clone(),
            Body::EchemData {
                technique: exp.technique.clone(),
                experiment_id: exp.id.clone(),
                step_index: exp.loops_started.saturating_sub(1),
                scan: exp.loop_has_scans.then_some(exp.scan),
                applied: applied.into_iter().map(String::from).collect(),
                points,
            },
        )
        .in_run(self.ctx.run.as_ref());
        self.ctx.emit(draft).await
    }

    async fn start(
        &mut self,
        params: serde_json::Map<String, serde_json::Value>,
        reply: oneshot::Sender<Result<String, String>>,
    ) -> Result<(), DeviceError> {
        if self.exp.is_some() || self.session.state() != State::Idle {
            let _ = reply.send(Err("an experiment is already running".into()));
            return Ok(());
        }
        let mut params = params;
        let spec = match crate::runs::take_run(&mut params) {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
                return Ok(());
            }
        };
        let mut values = self.cfg.params.clone();
        values.extend(params);
        let (script, effective) = match self.method.render(&values) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
                return Ok(());
            }
        };
        let plan = Plan::new(&Script::parse_sent(&script));
        let bytes = match self.session.start(&script) {
            Ok(b) => b,
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
                return Ok(());
            }
        };
        if let Err(e) = self.write(&bytes) {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        let id = spec.experiment_id.unwrap_or_else(|| {
            format!(
                "exp-{}-{}",
                self.ctx.id,
                crate::record::unix_ms(std::time::SystemTime::now())
            )
        });
        self.ctx.run = spec.meta;
        let mut data = object([
            ("method", self.method.name.clone().into()),
            ("technique", self.method.technique.clone().into()),
            (
                "parameters",
                serde_json::to_value(&effective).unwrap_or_default(),
            ),
        ]);
        data.insert("device".into(), self.info_json().into());
        self.ctx
            .experiment_event("experiment_started", &id, data)
            .await?;
        self.exp = Some(Experiment {
            id,
            technique: self.method.technique.clone(),
            plan,
            current: None,
            loops_started: 0,
            loop_points: 0,
            loop_has_scans: false,
            chunk_applied: Vec::new(),
            started: Instant::now(),
            chunk: Vec::with_capacity(self.cfg.points_per_message),
            chunk_started: Instant::now(),
            scan: 0,
            error: None,
            start_reply: Some(reply),
            stop_reply: None,
            stop_command: None,
            shutting_down: false,
            in_scan: false,
            points: 0,
        });
        self.ctx.set_state(crate::metrics::DeviceState::Running);
        Ok(())
    }

    async fn on_control(&mut self, c: Control) -> Result<(), DeviceError> {
        let cmd = match c.command {
            CommandKind::Start => return self.start(c.params, c.reply).await,
            _ if !c.params.is_empty() => {
                let _ = c
                    .reply
                    .send(Err(format!("{} takes no parameters", c.command.as_str())));
                return Ok(());
            }
            CommandKind::Pause => Command::Halt,
            CommandKind::Resume => Command::Resume,
            CommandKind::Stop => Command::Abort,
            CommandKind::Tare | CommandKind::Zero => {
                let _ = c
                    .reply
                    .send(Err(format!("a potentiostat has no {}", c.command.as_str())));
                return Ok(());
            }
        };
        match self.session.command(cmd) {
            Ok(bytes) => {
                if let Err(e) = self.write(bytes) {
                    let _ = c.reply.send(Err(e));
                    return Ok(());
                }
                match (cmd, &mut self.exp) {
                    // A stop is done when the script has ended (the cell is off).
                    (Command::Abort, Some(exp)) => {
                        exp.stop_reply = Some(c.reply);
                        exp.stop_command = Some(c.command_id);
                    }
                    _ => self.pending.push((cmd, c.reply)),
                }
            }
            Err(e) => {
                let _ = c.reply.send(Err(e.to_string()));
            }
        }
        Ok(())
    }

    fn answer(&mut self, cmd: Command, result: Result<String, String>) {
        if let Some(pos) = self.pending.iter().position(|(c, _)| *c == cmd) {
            let (_, reply) = self.pending.remove(pos);
            let _ = reply.send(result);
        }
    }

    async fn on_output(&mut self, o: Output) -> Result<(), DeviceError> {
        match o {
            Output::ScriptStarted => {
                if let Some(r) = self.exp.as_mut().and_then(|e| e.start_reply.take()) {
                    let _ = r.send(Ok("started".into()));
                }
            }
            Output::ScanStarted(_) => {
                self.flush_chunk().await?;
                if let Some(exp) = &mut self.exp {
                    exp.in_scan = true;
                    exp.loop_has_scans = true;
                    let (id, scan) = (exp.id.clone(), exp.scan);
                    self.ctx
                        .experiment_event("scan_started", &id, object([("scan", scan.into())]))
                        .await?;
                }
            }
            Output::ScanEnded => {
                self.flush_chunk().await?;
                if let Some(exp) = &mut self.exp {
                    let (id, scan) = (exp.id.clone(), exp.scan);
                    exp.scan += 1;
                    exp.in_scan = false;
                    // A scan that ends because of an abort did not run to its end.
                    let event = if exp.aborting() {
                        "scan_cut_short"
                    } else {
                        "scan_completed"
                    };
                    self.ctx
                        .experiment_event(event, &id, object([("scan", scan.into())]))
                        .await?;
                }
            }
            Output::Data { scan, package } => {
                let Some(exp) = &mut self.exp else {
                    return Ok(());
                };
                if scan != exp.scan && !exp.chunk.is_empty() {
                    self.flush_chunk().await?;
                }
                let Some(exp) = &mut self.exp else {
                    return Ok(());
                };
                exp.scan = scan;
                let lp = exp.current.and_then(|c| exp.plan.loops.get(c));
                let fallback_t = exp.started.elapsed().as_secs_f64();
                let (points, applied) = plan::points(lp, &package, exp.loop_points, fallback_t);
                if applied != exp.chunk_applied && !exp.chunk.is_empty() {
                    self.flush_chunk().await?;
                }
                let Some(exp) = &mut self.exp else {
                    return Ok(());
                };
                exp.chunk_applied = applied;
                exp.loop_points += 1;
                for point in points {
                    if exp.chunk.is_empty() {
                        exp.chunk_started = Instant::now();
                    }
                    exp.chunk.push(point);
                    exp.points += 1;
                }
                if exp.chunk.len() >= self.cfg.points_per_message {
                    self.flush_chunk().await?;
                }
            }
            Output::Text(t) => {
                if let Some(exp) = &self.exp {
                    let id = exp.id.clone();
                    self.ctx
                        .experiment_event("device_message", &id, object([("text", t.into())]))
                        .await?;
                }
            }
            Output::DeviceError {
                code,
                text,
                context,
            } => {
                tracing::warn!(device = %self.ctx.id, code = format!("{code:04X}"), %text, "device error");
                let place = context.as_deref().and_then(|c| self.user_place(c));
                let text = match place {
                    Some((line, col)) => {
                        format!("{text} (line {line}, col {col} of {})", self.method.name)
                    }
                    None => text,
                };
                if let Some(exp) = &mut self.exp {
                    exp.error
                        .get_or_insert((code, text.clone(), context, place));
                    if let Some(r) = exp.start_reply.take() {
                        let _ = r.send(Err(format!("device error {code:04X}: {text}")));
                    }
                }
            }
            Output::ScriptEnded { aborted, failed } => {
                self.flush_chunk().await?;
                self.ctx.set_state(crate::metrics::DeviceState::Idle);
                let Some(mut exp) = self.exp.take() else {
                    return Ok(());
                };
                if exp.in_scan {
                    self.ctx
                        .experiment_event(
                            "scan_cut_short",
                            &exp.id,
                            object([("scan", exp.scan.into())]),
                        )
                        .await?;
                }
                let mut data = object([
                    ("duration", exp.started.elapsed().as_secs_f64().into()),
                    ("points", exp.points.into()),
                ]);
                let event = if let Some((code, text, context, place)) =
                    exp.error.take().filter(|_| failed)
                {
                    data.insert("error_code".into(), format!("{code:04X}").into());
                    data.insert("error".into(), text.into());
                    data.insert("reason".into(), "device error".into());
                    if let Some(c) = context {
                        data.insert("context".into(), c.into());
                    }
                    if let Some((line, col)) = place {
                        data.insert("line".into(), line.into());
                        data.insert("column".into(), col.into());
                    }
                    "experiment_failed"
                } else if aborted && exp.shutting_down && exp.stop_reply.is_none() {
                    data.insert("reason".into(), "agent shutdown".into());
                    "experiment_stopped"
                } else if aborted {
                    data.insert("reason".into(), "stop command".into());
                    if let Some(id) = exp.stop_command.take() {
                        data.insert("command_id".into(), id.into());
                    }
                    "experiment_stopped"
                } else {
                    data.insert("reason".into(), "completed".into());
                    "experiment_completed"
                };
                self.ctx.experiment_event(event, &exp.id, data).await?;
                self.ctx.run = None;
                if let Some(r) = exp.stop_reply.take() {
                    let _ = r.send(Ok("stopped; script ended, cell off".into()));
                }
                if let Some(r) = exp.start_reply.take() {
                    let _ = r.send(Err("script ended before it started".into()));
                }
            }
            Output::CommandDone(cmd) => {
                let detail = match cmd {
                    Command::Halt => "paused",
                    Command::Resume => "resumed",
                    Command::Abort => "already idle",
                };
                if let Some(exp) = &self.exp {
                    let id = exp.id.clone();
                    match cmd {
                        Command::Halt => {
                            self.ctx.set_state(crate::metrics::DeviceState::Paused);
                            self.ctx
                                .experiment_event("experiment_paused", &id, serde_json::Map::new())
                                .await?;
                        }
                        Command::Resume => {
                            self.ctx.set_state(crate::metrics::DeviceState::Running);
                            self.ctx
                                .experiment_event("experiment_resumed", &id, serde_json::Map::new())
                                .await?;
                        }
                        Command::Abort => {}
                    }
                }
                self.answer(cmd, Ok(detail.into()));
            }
            Output::CommandFailed {
                command,
                code,
                text,
            } => {
                let letter = match command {
                    Command::Halt => 'h',
                    Command::Resume => 'H',
                    Command::Abort => 'Z',
                };
                self.answer(
                    command,
                    Err(format!("device refused {letter}: {text} ({code:04X})")),
                );
            }
            Output::MeasLoopStarted(_) => {
                self.flush_chunk().await?;
                if let Some(exp) = &mut self.exp {
                    exp.current = exp.plan.meas_started();
                    exp.loops_started += 1;
                    exp.loop_points = 0;
                    exp.loop_has_scans = false;
                    exp.scan = 0;
                    let lp = exp.current.and_then(|c| exp.plan.loops.get(c));
                    if let Some(lp) = lp {
                        exp.technique = lp.technique.clone();
                    }
                    let line = lp.and_then(|l| self.method.user_line(l.line));
                    let mut data = object([
                        ("step", exp.loops_started.saturating_sub(1).into()),
                        ("technique", exp.technique.clone().into()),
                    ]);
                    if let Some(l) = line {
                        data.insert("line".into(), l.into());
                    }
                    let id = exp.id.clone();
                    self.ctx.experiment_event("step_started", &id, data).await?;
                }
            }
            Output::MeasLoopEnded => {
                self.flush_chunk().await?;
                if let Some(exp) = &mut self.exp {
                    exp.current = None;
                    exp.plan.meas_ended();
                }
            }
            Output::LoopStarted => {
                if let Some(exp) = &mut self.exp {
                    exp.plan.loop_started();
                }
            }
            Output::LoopEnded => {
                if let Some(exp) = &mut self.exp {
                    exp.plan.loop_ended();
                }
            }
            Output::Unexpected(l) => {
                tracing::debug!(device = %self.ctx.id, line = %l, "unexpected line")
            }
        }
        Ok(())
    }

    /// The experiment (if any) ends because the link is gone.
    async fn lost(&mut self, reason: &str) -> Result<(), DeviceError> {
        self.flush_chunk().await?;
        if let Some(mut exp) = self.exp.take() {
            let data = object([
                ("reason", "disconnect".into()),
                ("error", format!("device disconnected: {reason}").into()),
                ("points", exp.points.into()),
                ("partial", true.into()),
            ]);
            self.ctx
                .experiment_event("experiment_failed", &exp.id, data)
                .await?;
            self.ctx.run = None;
            for r in [exp.start_reply.take(), exp.stop_reply.take()]
                .into_iter()
                .flatten()
            {
                let _ = r.send(Err(format!("device disconnected: {reason}")));
            }
        }
        for (_, r) in self.pending.drain(..) {
            let _ = r.send(Err(format!("device disconnected: {reason}")));
        }
        self.session.link_lost();
        Ok(())
    }

    async fn run(&mut self, autostart: bool) -> Result<Ended, DeviceError> {
        if let Err(e) = self.hello().await {
            return Ok(Ended::Lost(format!("identification failed: {e}")));
        }
        self.ctx.set_state(crate::metrics::DeviceState::Idle);
        tracing::info!(device = %self.ctx.id, port = %self.info.port, firmware = %self.info.firmware, "instrument connected");
        self.ctx
            .device_event("device_connected", self.info_json())
            .await?;
        if autostart {
            let (tx, _rx) = oneshot::channel();
            self.start(serde_json::Map::new(), tx).await?;
        }
        let mut tick = tokio::time::interval(self.cfg.max_interval.min(Duration::from_millis(200)));
        loop {
            tokio::select! {
                incoming = self.lines.recv() => match incoming {
                    Some(Incoming::Line(Ok(l))) => match Line::parse(&l) {
                        Ok(line) => {
                            for o in self.session.on_line(&line) {
                                self.on_output(o).await?;
                            }
                        }
                        Err(e) => {
                            self.ctx.metrics.count_bad_line(&self.ctx.id);
                            tracing::debug!(device = %self.ctx.id, error = %e, "bad line skipped");
                        }
                    },
                    Some(Incoming::Line(Err(e))) => {
                        self.ctx.metrics.count_bad_line(&self.ctx.id);
                        tracing::debug!(device = %self.ctx.id, error = %e, "bad line skipped");
                    }
                    Some(Incoming::Lost(e)) => {
                        self.lost(&e).await?;
                        return Ok(Ended::Lost(e));
                    }
                    None => {
                        self.lost("reader stopped").await?;
                        return Ok(Ended::Lost("reader stopped".into()));
                    }
                },
                c = self.ctx.control.recv() => match c {
                    Some(c) => self.on_control(c).await?,
                    None => return Ok(Ended::Shutdown),
                },
                _ = tick.tick() => {
                    let stale = self.exp.as_ref().is_some_and(|e| !e.chunk.is_empty() && e.chunk_started.elapsed() >= self.cfg.max_interval);
                    if stale {
                        self.flush_chunk().await?;
                    }
                }
                () = self.ctx.shutdown.cancelled() => {
                    self.shutdown().await?;
                    return Ok(Ended::Shutdown);
                }
            }
        }
    }

    /// Agent shutdown: abort a running script (so the cell goes off) and record it.
    async fn shutdown(&mut self) -> Result<(), DeviceError> {
        let Some(exp) = &mut self.exp else {
            return Ok(());
        };
        exp.shutting_down = true;
        if let Ok(bytes) = self.session.command(Command::Abort) {
            let _ = self.write(bytes);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.exp.is_some() {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(Incoming::Line(Ok(l)))) => {
                    if let Ok(line) = Line::parse(&l) {
                        for o in self.session.on_line(&line) {
                            self.on_output(o).await?;
                        }
                    }
                }
                Ok(Some(Incoming::Line(Err(_)))) => {}
                _ => break,
            }
        }
        if self.exp.is_some() {
            self.lost("agent shutdown before the device confirmed the abort")
                .await?;
        }
        Ok(())
    }
}

/// Driver entry point: connect, run, reconnect with backoff until shutdown.
pub async fn run(cfg: &Config, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let method = Method::load(&cfg.methods_dir, &cfg.method)
        .map_err(|e| DeviceError::Config(e.to_string()))?;
    let mut backoff = crate::devices::Backoff::default();
    let mut first = true;
    loop {
        let Some(link) = serial::connect(
            ctx,
            cfg.port.as_deref(),
            cfg.usb.as_ref(),
            &cfg.frame(),
            &mut backoff,
        )
        .await
        else {
            return Ok(());
        };
        let mut conn = Conn {
            cfg,
            ctx,
            method: &method,
            writer: link.writer,
            lines: link.lines,
            session: Session::default(),
            info: Info {
                port: link.path,
                ..Info::default()
            },
            exp: None,
            pending: Vec::new(),
        };
        let ended = conn.run(cfg.autostart && first).await?;
        first = false;
        match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Lost(reason) => {
                ctx.disconnected(reason.clone()).await?;
                if !ctx.wait_unreachable(backoff.step(), &reason).await {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<(), (String, String)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/devices/methods");
        let text = format!(
            "id = \"p\"\nport = \"/dev/null\"\nmethod = \"cv\"\nmethods_dir = \"{dir}\"\n{extra}"
        );
        let c: Config = toml::from_str(&text).map_err(|e| ("toml".to_string(), e.to_string()))?;
        c.validate()
    }

    #[test]
    fn framing_and_method_settings_are_validated_with_the_key_named() {
        assert!(config("").is_ok());
        assert!(config(
            "parity = \"even\"\ndata_bits = 7\nstop_bits = 2\nflow_control = \"software\""
        )
        .is_ok());
        assert_eq!(config("data_bits = 9").unwrap_err().0, "data_bits");
        assert_eq!(config("stop_bits = 3").unwrap_err().0, "stop_bits");
        assert_eq!(config("parity = \"mark\"").unwrap_err().0, "toml");
        assert_eq!(
            config("usb = { vid = \"0403\", pid = \"6015\" }")
                .unwrap_err()
                .0,
            "port",
            "port and usb together"
        );
        assert_eq!(
            config("params = { scan_rate = \"5A\" }").unwrap_err().0,
            "params"
        );
        let e = config("params = { scan_rate = 50 }").unwrap_err();
        assert!(
            e.1.contains("scan_rate") && e.1.contains("outside"),
            "{e:?}"
        );
    }

    #[test]
    fn eis_packages_map_to_frequency_and_impedance() {
        // docs/protocols.md §1.7 exchange C.
        let p =
            super::super::Package::parse("dcDF5DFF4u;cc896D904m,10,287;cd82DB1A8u,10,287").unwrap();
        let pt = plan::points(None, &p, 0, 2.5).0.remove(0);
        assert_eq!(pt.t, 2.5);
        assert!(pt.e.is_nan() && pt.i.is_nan());
        assert!((pt.f.unwrap() - 99.999732).abs() < 1e-9);
        assert!((pt.z_re.unwrap() - 9885.956).abs() < 1e-9);
        assert!((pt.z_im.unwrap() - 2.9946).abs() < 1e-9);
        // A CV package keeps status bits (underload) on the point.
        let p = super::super::Package::parse("da84E63DAn;ba82AB973f,14,284").unwrap();
        let pt = plan::points(None, &p, 0, 0.0).0.remove(0);
        assert_eq!(pt.status, 4);
        assert!(pt.f.is_none());
    }

    #[test]
    fn usb_ids_must_be_hex() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/devices/methods");
        let text = format!("id = \"p\"\nmethod = \"cv\"\nmethods_dir = \"{dir}\"\nusb = {{ vid = \"zz\", pid = \"6015\" }}");
        let c: Config = toml::from_str(&text).unwrap();
        assert_eq!(c.validate().unwrap_err().0, "usb.vid");
    }
}
