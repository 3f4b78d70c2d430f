//! The `line_instrument` device: an instrument described by a profile, on a serial port
//! or on the network (`address = "host:port"`: a SCPI raw socket, port 5025 unless
//! given).
//!
//! On connect the profile's init commands are sent (answers logged). Then, while running,
//! the poll command is sent every interval and its answer parsed into sensor readings; an
//! instrument without a poll command streams and every line is parsed. Error replies and
//! unanswered polls are counted and reported by a rate-limited event; unparseable lines
//! are counted and skipped. pause/resume/start control polling (or recording, for a
//! streaming instrument); stop also sends the profile's stop commands.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::profile::{Compiled, Parsed};
use crate::devices::serial::{self, Frame, Incoming, UsbId};
use crate::devices::{CommandKind, Control, DeviceCtx, DeviceError};
use crate::record::{object, Body, Draft};

/// Polls in a row without an answer after which a network link counts as lost (a
/// half-open connection: the instrument is gone but the socket still looks open) and is
/// reconnected. Serial ports stay open: an unanswering instrument there is reported
/// through its timeouts.
pub const SILENT_POLLS_LOST: u32 = 3;

/// Device error events are sent at most this often (with the count since the last).
const ERROR_EVENT_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `line_instrument` device: a text-protocol instrument (SCPI, MT-SICS …) described by a profile.
pub struct Config {
    /// The device id records and commands carry.
    pub id: String,
    #[serde(default)]
    /// The serial port path (`/dev/ttyUSB0`); or give `usb`.
    pub port: Option<String>,
    #[serde(default)]
    /// The USB identity of the adapter, so a replugged instrument is found under any name.
    pub usb: Option<UsbId>,
    /// `host:port` of an instrument on the network (raw socket; port 5025 when only a
    /// host is given), in place of `port` or `usb`.
    #[serde(default)]
    pub address: Option<String>,
    /// A profile name in `profiles_dir` (`mettler-mt-sics`, `keithley-2400`, …) or a path
    /// to a `.toml` profile.
    pub profile: String,
    #[serde(default = "d_profiles_dir")]
    /// Where profile names are looked up.
    pub profiles_dir: PathBuf,
    /// Overrides the profile's baud rate.
    #[serde(default)]
    pub baud: Option<u32>,
    /// Overrides the profile's poll interval.
    #[serde(default, with = "crate::time::serde_duration")]
    pub interval: Option<Duration>,
    #[serde(default)]
    /// Where the instrument stands (bench, room), copied into each reading.
    pub location: Option<String>,
    /// Start polling as soon as the instrument is connected (else wait for `start`).
    #[serde(default = "d_true")]
    pub autostart: bool,
}

fn d_profiles_dir() -> PathBuf {
    PathBuf::from("devices/profiles")
}
fn d_true() -> bool {
    true
}

impl Config {
    fn load_profile(&self) -> Result<Compiled, String> {
        let path = crate::devices::profile_path(&self.profile, &self.profiles_dir);
        Compiled::load(&path).map_err(|e| e.to_string())
    }

    fn frame(&self, p: &Compiled) -> Frame {
        let s = &p.profile.serial;
        Frame {
            baud: self.baud.unwrap_or(s.baud),
            data_bits: s.data_bits,
            parity: s.parity,
            stop_bits: s.stop_bits,
            flow_control: s.flow_control,
        }
    }

    /// Checks the port choice and that the profile loads; keys are relative to the device.
    pub fn validate(&self) -> Result<(), (String, String)> {
        match &self.address {
            Some(a) if self.port.is_none() && self.usb.is_none() => {
                crate::devices::net::check_address(a)?
            }
            Some(_) => {
                return Err((
                    "address".into(),
                    "give exactly one of port, usb or address".into(),
                ))
            }
            None => serial::check_port_choice(self.port.as_deref(), self.usb.as_ref())
                .map_err(|(k, _)| (k, "give exactly one of port, usb or address".into()))?,
        }
        if self.interval.is_some_and(|i| i.is_zero()) {
            return Err(("interval".into(), "must be greater than zero".into()));
        }
        let p = self
            .load_profile()
            .map_err(|e| ("profile".to_string(), e))?;
        self.frame(&p).validate()
    }
}

enum Ended {
    Lost(String),
    Shutdown,
}

struct Conn<'a> {
    cfg: &'a Config,
    ctx: &'a mut DeviceCtx,
    profile: &'a Compiled,
    writer: Box<dyn Write + Send>,
    lines: mpsc::Receiver<Incoming>,
    port: String,
    /// Over the network: unanswered polls in a row end the connection.
    networked: bool,
    /// Polls in a row without an answer.
    silent_polls: u32,
    running: bool,
    /// When the answer to the last poll is due.
    awaiting: Option<Instant>,
    /// Error replies and timeouts since the last error event.
    unreported_errors: u64,
    last_error: String,
    last_error_event: Option<Instant>,
    /// A tare or zero sent and not yet answered.
    action: Option<PendingAction>,
}

struct PendingAction {
    name: &'static str,
    ok: regex::Regex,
    reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    due: Instant,
}

impl Conn<'_> {
    fn write(&mut self, cmd: &str) -> Result<(), String> {
        let term = &self.profile.profile.commands.terminator;
        self.writer
            .write_all(format!("{cmd}{term}").as_bytes())
            .and_then(|()| self.writer.flush())
            .map_err(|e| format!("write failed: {e}"))
    }

    async fn device_error(&mut self, what: String) -> Result<(), DeviceError> {
        self.unreported_errors += 1;
        self.last_error = what;
        if self
            .last_error_event
            .is_none_or(|t| t.elapsed() >= ERROR_EVENT_EVERY)
        {
            let data = object([
                ("count", self.unreported_errors.into()),
                ("last", self.last_error.clone().into()),
            ]);
            tracing::warn!(device = %self.ctx.id, count = self.unreported_errors, last = %self.last_error, "instrument errors");
            self.ctx.device_event("device_errors", data).await?;
            self.unreported_errors = 0;
            self.last_error_event = Some(Instant::now());
        }
        Ok(())
    }

    async fn on_line(&mut self, line: &str) -> Result<(), DeviceError> {
        self.silent_polls = 0;
        if let Some(a) = self.action.take() {
            let l = line.trim_end_matches('\r');
            if a.ok.is_match(l) {
                let _ = a.reply.send(Ok(format!("{}: {l}", a.name)));
                return Ok(());
            }
            if let Parsed::DeviceError { message, .. } = self.profile.parse(l) {
                // The instrument answers in order: an error now is the action's.
                let _ = a.reply.send(Err(format!("{}: {message}: {l}", a.name)));
                return Ok(());
            }
            self.action = Some(a);
        }
        match self.profile.parse(line) {
            Parsed::Readings { readings, metadata } => {
                self.awaiting = None;
                if !self.running {
                    return Ok(()); // paused or stopped: a streaming instrument is not recorded
                }
                let meta: std::collections::BTreeMap<String, serde_json::Value> = metadata
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                for r in readings {
                    self.ctx
                        .emit(Draft::new(
                            self.ctx.id.clone(),
                            Body::SensorReading {
                                sensor_id: self.ctx.id.clone(),
                                sensor_type: r.sensor_type,
                                value: r.value,
                                unit: r.unit,
                                location: self.cfg.location.clone(),
                                metadata: meta.clone(),
                            },
                        ))
                        .await?;
                }
            }
            Parsed::DeviceError { line, message } => {
                self.awaiting = None;
                self.ctx.metrics.count_error_reply(&self.ctx.id);
                self.device_error(format!("{message}: {line}")).await?;
            }
            Parsed::NoMatch(l) => {
                self.ctx.metrics.count_bad_line(&self.ctx.id);
                tracing::debug!(device = %self.ctx.id, line = %l, "line does not match the profile; skipped");
            }
        }
        Ok(())
    }

    /// Sends the init commands, logging whatever answers within a short while.
    async fn init(&mut self) -> Result<(), String> {
        for cmd in self.profile.profile.commands.init.clone() {
            self.write(&cmd)?;
            let deadline = Instant::now() + Duration::from_millis(300);
            while let Ok(Some(item)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
                match item {
                    Incoming::Line(Ok(l)) => {
                        tracing::debug!(device = %self.ctx.id, command = %cmd, answer = %l, "init answer");
                        break;
                    }
                    Incoming::Line(Err(_)) => self.ctx.metrics.count_bad_line(&self.ctx.id),
                    Incoming::Lost(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn on_control(&mut self, c: Control) -> Result<(), DeviceError> {
        if c.command.is_action() && c.params.is_empty() {
            let name = c.command.as_str();
            let Some((send, ok)) = self.profile.action(name).cloned() else {
                let _ = c.reply.send(Err(format!(
                    "profile {} defines no {name} (commands.actions.{name})",
                    self.profile.profile.name
                )));
                return Ok(());
            };
            if let Some(a) = &self.action {
                let _ = c
                    .reply
                    .send(Err(format!("busy: {} not answered yet", a.name)));
                return Ok(());
            }
            if let Err(e) = self.write(&send) {
                let _ = c.reply.send(Err(e));
                return Ok(());
            }
            self.action = Some(PendingAction {
                name,
                ok,
                reply: c.reply,
                due: Instant::now() + self.profile.profile.commands.timeout,
            });
            return Ok(());
        }
        if !c.params.is_empty() {
            let _ = c
                .reply
                .send(Err(format!("{} takes no parameters", c.command.as_str())));
            return Ok(());
        }
        let reply = match c.command {
            CommandKind::Pause => {
                self.running = false;
                self.ctx.set_state(crate::metrics::DeviceState::Paused);
                Ok("polling paused".to_string())
            }
            CommandKind::Resume | CommandKind::Start => {
                self.running = true;
                self.ctx.set_state(crate::metrics::DeviceState::Running);
                Ok("polling".to_string())
            }
            CommandKind::Stop => {
                self.running = false;
                self.awaiting = None;
                let stops = self.profile.profile.commands.stop.clone();
                let mut sent = Vec::new();
                let mut failed = None;
                for s in &stops {
                    match self.write(s) {
                        Ok(()) => sent.push(s.clone()),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                self.ctx.set_state(crate::metrics::DeviceState::Idle);
                match failed {
                    Some(e) => Err(format!("stopped polling, but {e}")),
                    None if sent.is_empty() => Ok("stopped".to_string()),
                    None => Ok(format!("stopped; sent {}", sent.join(", "))),
                }
            }
            CommandKind::Tare | CommandKind::Zero => Err("tare and zero take no parameters".into()),
        };
        let _ = c.reply.send(reply);
        Ok(())
    }

    async fn run(&mut self) -> Result<Ended, DeviceError> {
        if let Err(e) = self.init().await {
            return Ok(Ended::Lost(format!("init failed: {e}")));
        }
        let data = object([
            ("port", self.port.clone().into()),
            ("profile", self.profile.profile.name.clone().into()),
        ]);
        self.ctx.device_event("device_connected", data).await?;
        tracing::info!(device = %self.ctx.id, port = %self.port, profile = %self.profile.profile.name, "instrument connected");
        self.running = self.cfg.autostart;
        self.ctx.set_state(if self.running {
            crate::metrics::DeviceState::Running
        } else {
            crate::metrics::DeviceState::Idle
        });
        let cmds = &self.profile.profile.commands;
        let (poll, timeout) = (cmds.poll.clone(), cmds.timeout);
        let mut tick = tokio::time::interval(self.cfg.interval.unwrap_or(cmds.interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                incoming = self.lines.recv() => match incoming {
                    Some(Incoming::Line(Ok(l))) => self.on_line(&l).await?,
                    Some(Incoming::Line(Err(e))) => {
                        self.ctx.metrics.count_bad_line(&self.ctx.id);
                        tracing::debug!(device = %self.ctx.id, error = %e, "bad line skipped");
                    }
                    Some(Incoming::Lost(e)) => return Ok(Ended::Lost(e)),
                    None => return Ok(Ended::Lost("reader stopped".into())),
                },
                _ = tick.tick(), if poll.is_some() && self.running => {
                    if self.awaiting.is_some_and(|t| Instant::now() >= t) {
                        self.ctx.metrics.count_timeout(&self.ctx.id);
                        self.device_error(format!("no answer to {:?} within {timeout:?}", poll.as_deref().unwrap_or(""))).await?;
                        self.awaiting = None;
                        self.silent_polls += 1;
                        if self.networked && self.silent_polls >= SILENT_POLLS_LOST {
                            return Ok(Ended::Lost(format!("{} polls in a row unanswered: connection lost", self.silent_polls)));
                        }
                    }
                    if self.awaiting.is_none() {
                        if let Some(p) = &poll {
                            if let Err(e) = self.write(p) {
                                return Ok(Ended::Lost(e));
                            }
                            self.awaiting = Some(Instant::now() + timeout);
                        }
                    }
                }
                c = self.ctx.control.recv() => match c {
                    Some(c) => self.on_control(c).await?,
                    None => return Ok(Ended::Shutdown),
                },
                () = tokio::time::sleep_until(self.action.as_ref().map_or_else(Instant::now, |a| a.due)), if self.action.is_some() => {
                    if let Some(a) = self.action.take() {
                        let _ = a.reply.send(Err(format!("{}: no answer within {:?}", a.name, self.profile.profile.commands.timeout)));
                    }
                }
                () = self.ctx.shutdown.cancelled() => return Ok(Ended::Shutdown),
            }
        }
    }
}

/// Driver entry point: connect, run, reconnect with backoff until shutdown.
pub async fn run(cfg: &Config, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let profile = cfg.load_profile().map_err(DeviceError::Config)?;
    let frame = cfg.frame(&profile);
    let mut backoff = crate::devices::Backoff::default();
    loop {
        let link = match &cfg.address {
            Some(a) => {
                crate::devices::net::connect(ctx, a, crate::devices::net::SCPI_PORT, &mut backoff)
                    .await
            }
            None => {
                serial::connect(
                    ctx,
                    cfg.port.as_deref(),
                    cfg.usb.as_ref(),
                    &frame,
                    &mut backoff,
                )
                .await
            }
        };
        let Some(link) = link else {
            return Ok(());
        };
        let mut conn = Conn {
            cfg,
            ctx,
            profile: &profile,
            writer: link.writer,
            lines: link.lines,
            port: link.path,
            networked: cfg.address.is_some(),
            silent_polls: 0,
            running: false,
            awaiting: None,
            unreported_errors: 0,
            last_error: String::new(),
            last_error_event: None,
            action: None,
        };
        match conn.run().await? {
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
