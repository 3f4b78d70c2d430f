//! `simulated_potentiostat`: runs configured experiments (CV, CA, LSV) on the simulated
//! cell (`cell.rs`) with the full experiment lifecycle, honouring start / pause / resume /
//! stop.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::Instant;

use super::cell::{Cell, Step, StepGen};
use super::rng::Rng;
use crate::devices::{check_range, CommandKind, Control, DeviceCtx, DeviceError};
use crate::record::{object, Body, Draft, Point};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `simulated_potentiostat` device: runs a sequence of steps on a model cell.
pub struct Config {
    /// The device id records and commands carry.
    pub id: String,
    /// Steps of each experiment, in order.
    pub steps: Vec<Step>,
    /// Points per `echem_data` message.
    #[serde(default = "d_points")]
    pub points_per_message: usize,
    /// A partly filled data message is sent after this long.
    #[serde(default = "d_interval", with = "crate::time::serde_duration")]
    pub max_interval: Duration,
    /// 1.0 = real time, 10 = ten times faster, 0 = as fast as possible.
    #[serde(default = "d_speed")]
    pub speed: f64,
    /// Experiments to run after start (0 = keep running new ones).
    #[serde(default)]
    pub runs: u32,
    /// Wait between experiments.
    #[serde(default = "d_between", with = "crate::time::serde_duration")]
    pub pause_between: Duration,
    /// Start the first experiment at agent start (else wait for a `start` command).
    #[serde(default = "d_true")]
    pub autostart: bool,
    /// Formal potential of the simulated couple, V.
    #[serde(default = "d_e0")]
    pub e0: f64,
    /// Relative current noise (0.005 = 0.5 %).
    #[serde(default = "d_noise")]
    pub noise: f64,
}

fn d_points() -> usize {
    50
}
fn d_interval() -> Duration {
    Duration::from_secs(1)
}
fn d_speed() -> f64 {
    1.0
}
fn d_between() -> Duration {
    Duration::from_secs(2)
}
fn d_true() -> bool {
    true
}
fn d_e0() -> f64 {
    0.2
}
fn d_noise() -> f64 {
    0.005
}

impl Config {
    /// Checks steps, timing and batch sizes.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.steps.is_empty() {
            return Err(("steps".into(), "at least one step is required".into()));
        }
        if self.points_per_message == 0 || self.points_per_message > 100_000 {
            return Err(("points_per_message".into(), "must be 1..=100000".into()));
        }
        check_range("speed", self.speed, 0.0, 1e6)?;
        check_range("e0", self.e0, -5.0, 5.0)?;
        check_range("noise", self.noise, 0.0, 1.0)?;
        if self.max_interval.is_zero() {
            return Err(("max_interval".into(), "must be greater than zero".into()));
        }
        for (i, s) in self.steps.iter().enumerate() {
            let k = |f: &str| format!("steps[{i}].{f}");
            match *s {
                Step::Cv {
                    e_begin,
                    e_vertex1,
                    e_vertex2,
                    e_step,
                    scan_rate,
                    n_scans,
                } => {
                    check_range(&k("e_begin"), e_begin, -10.0, 10.0)?;
                    check_range(&k("e_vertex1"), e_vertex1, -10.0, 10.0)?;
                    check_range(&k("e_vertex2"), e_vertex2, -10.0, 10.0)?;
                    check_range(&k("e_step"), e_step, 1e-5, 1.0)?;
                    check_range(&k("scan_rate"), scan_rate, 1e-4, 1e4)?;
                    if e_vertex1 == e_vertex2 {
                        return Err((k("e_vertex2"), "must differ from e_vertex1".into()));
                    }
                    if n_scans == 0 || n_scans > 10_000 {
                        return Err((k("n_scans"), "must be 1..=10000".into()));
                    }
                }
                Step::Ca {
                    e_dc,
                    t_interval,
                    t_run,
                } => {
                    check_range(&k("e_dc"), e_dc, -10.0, 10.0)?;
                    check_range(&k("t_interval"), t_interval, 1e-5, 3600.0)?;
                    check_range(&k("t_run"), t_run, t_interval, 1e6)?;
                }
                Step::Lsv {
                    e_begin,
                    e_end,
                    e_step,
                    scan_rate,
                } => {
                    check_range(&k("e_begin"), e_begin, -10.0, 10.0)?;
                    check_range(&k("e_end"), e_end, -10.0, 10.0)?;
                    check_range(&k("e_step"), e_step, 1e-5, 1.0)?;
                    check_range(&k("scan_rate"), scan_rate, 1e-4, 1e4)?;
                    if e_begin == e_end {
                        return Err((k("e_end"), "must differ from e_begin".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What the control path asked for while an experiment runs.
enum Flow {
    Continue,
    Stop,
    Shutdown,
}

struct Runner<'a> {
    cfg: &'a Config,
    ctx: &'a mut DeviceCtx,
    experiment_id: String,
    paused: bool,
    /// Points measured, not yet sent.
    chunk: Vec<Point>,
    chunk_started: Instant,
    technique: &'static str,
    step_index: u32,
    /// The stop command that ended the run, if one did.
    stopped_by: Option<String>,
}

impl Runner<'_> {
    async fn event(
        &self,
        event: &str,
        data: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), DeviceError> {
        self.ctx
            .experiment_event(event, &self.experiment_id, data)
            .await
    }

    async fn flush_chunk(&mut self) -> Result<(), DeviceError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let points = std::mem::take(&mut self.chunk);
        self.ctx
            .emit(
                Draft::new(
                    self.ctx.id.clone(),
                    Body::EchemData {
                        technique: self.technique.into(),
                        experiment_id: self.experiment_id.clone(),
                        step_index: self.step_index,
                        scan: None,
                        applied: Vec::new(),
                        points,
                    },
                )
                .in_run(self.ctx.run.as_ref()),
            )
            .await
    }

    /// Handles one control message while an experiment runs.
    async fn on_control(&mut self, c: Control) -> Result<Flow, DeviceError> {
        let (reply, flow) = match c.command {
            CommandKind::Tare | CommandKind::Zero => (
                Err(format!("a potentiostat has no {}", c.command.as_str())),
                Flow::Continue,
            ),
            CommandKind::Pause if self.paused => (Ok("already paused".to_string()), Flow::Continue),
            CommandKind::Pause => {
                self.flush_chunk().await?;
                self.paused = true;
                self.ctx.set_state(crate::metrics::DeviceState::Paused);
                self.event(
                    "experiment_paused",
                    object([("step_index", self.step_index.into())]),
                )
                .await?;
                (Ok("paused".into()), Flow::Continue)
            }
            CommandKind::Resume if !self.paused => (Ok("already running".into()), Flow::Continue),
            CommandKind::Resume => {
                self.paused = false;
                self.ctx.set_state(crate::metrics::DeviceState::Running);
                self.event(
                    "experiment_resumed",
                    object([("step_index", self.step_index.into())]),
                )
                .await?;
                (Ok("resumed".into()), Flow::Continue)
            }
            CommandKind::Stop => {
                self.stopped_by = Some(c.command_id.clone());
                (Ok("stopped".into()), Flow::Stop)
            }
            CommandKind::Start => (
                Err(format!(
                    "experiment {} is already running",
                    self.experiment_id
                )),
                Flow::Continue,
            ),
        };
        let _ = c.reply.send(reply);
        Ok(flow)
    }

    /// Waits until `until` (or, while paused, until resumed), handling control messages.
    async fn wait(&mut self, until: Option<Instant>) -> Result<Flow, DeviceError> {
        loop {
            // Non-blocking look first: at full speed this is the only check per point.
            match self.ctx.control.try_recv() {
                Ok(c) => match self.on_control(c).await? {
                    Flow::Continue => continue,
                    other => return Ok(other),
                },
                Err(TryRecvError::Disconnected) => return Ok(Flow::Shutdown),
                Err(TryRecvError::Empty) => {}
            }
            if self.ctx.shutdown.is_cancelled() {
                return Ok(Flow::Shutdown);
            }
            if !self.paused && until.is_none_or(|u| Instant::now() >= u) {
                return Ok(Flow::Continue);
            }
            let flush_at = self.chunk_started + self.cfg.max_interval;
            let wake = match until {
                Some(u) if !self.paused => u.min(flush_at),
                _ => flush_at,
            };
            tokio::select! {
                c = self.ctx.control.recv() => match c {
                    Some(c) => match self.on_control(c).await? {
                        Flow::Continue => {}
                        other => return Ok(other),
                    },
                    None => return Ok(Flow::Shutdown),
                },
                () = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= flush_at && !self.chunk.is_empty() {
                        self.flush_chunk().await?;
                    }
                    if self.chunk.is_empty() {
                        self.chunk_started = Instant::now();
                    }
                }
                () = self.ctx.shutdown.cancelled() => return Ok(Flow::Shutdown),
            }
        }
    }

    /// Runs one experiment; returns Shutdown when the agent is stopping.
    async fn experiment(&mut self, rng: &mut Rng) -> Result<Flow, DeviceError> {
        let cfg = self.cfg;
        let started = Instant::now();
        self.ctx.set_state(crate::metrics::DeviceState::Running);
        let steps: Vec<serde_json::Value> = cfg
            .steps
            .iter()
            .map(|s| serde_json::to_value(s).unwrap_or(serde_json::Value::Null))
            .collect();
        self.event(
            "experiment_started",
            object([
                ("method", "simulated".into()),
                ("steps", steps.into()),
                ("device_kind", "simulated_potentiostat".into()),
            ]),
        )
        .await?;
        for (index, step) in cfg.steps.iter().enumerate() {
            self.step_index = index as u32;
            self.technique = step.name();
            let step_started = Instant::now();
            let mut gen = StepGen::new(step, Cell::new(cfg.e0));
            self.event(
                "step_started",
                object([
                    ("step_index", index.into()),
                    ("step_name", step.name().into()),
                    ("points", gen.len().into()),
                ]),
            )
            .await?;
            // Pacing: measured time t is due at `base + (t - t_base) / speed`; a pause
            // shifts the base so that time stands still while paused.
            let mut base = Instant::now();
            let mut t_base = 0.0;
            let mut scan = 0;
            self.chunk_started = Instant::now();
            while gen.k < gen.len() {
                let k = gen.k;
                let due = if cfg.speed > 0.0 {
                    let t = gen.points[k].0;
                    Some(base + Duration::from_secs_f64(((t - t_base) / cfg.speed).max(0.0)))
                } else {
                    None
                };
                let was_paused = self.paused;
                let flow = if cfg.speed > 0.0 || self.paused || k % 256 == 0 {
                    if cfg.speed == 0.0 && !self.paused {
                        tokio::task::yield_now().await;
                    }
                    self.wait(due).await?
                } else {
                    match self.ctx.control.try_recv() {
                        Ok(c) => self.on_control(c).await?,
                        Err(_) => Flow::Continue,
                    }
                };
                match flow {
                    Flow::Continue => {}
                    Flow::Stop => {
                        self.flush_chunk().await?;
                        let mut data = object([
                            ("step_index", index.into()),
                            ("reason", "stop command".into()),
                            ("duration", started.elapsed().as_secs_f64().into()),
                        ]);
                        if let Some(id) = self.stopped_by.take() {
                            data.insert("command_id".into(), id.into());
                        }
                        self.event("experiment_stopped", data).await?;
                        return Ok(Flow::Stop);
                    }
                    Flow::Shutdown => {
                        self.flush_chunk().await?;
                        self.event(
                            "experiment_stopped",
                            object([
                                ("step_index", index.into()),
                                ("reason", "agent shutdown".into()),
                            ]),
                        )
                        .await?;
                        return Ok(Flow::Shutdown);
                    }
                }
                if was_paused && !self.paused {
                    base = Instant::now();
                    t_base = gen.points[gen.k].0;
                }
                if self.paused {
                    continue;
                }
                let s = gen.scan_of(k);
                if s != scan {
                    self.flush_chunk().await?;
                    scan = s;
                }
                if let Some(p) = gen.next(rng, cfg.noise) {
                    if self.chunk.is_empty() {
                        self.chunk_started = Instant::now();
                    }
                    self.chunk.push(p);
                }
                if self.chunk.len() >= cfg.points_per_message {
                    self.flush_chunk().await?;
                }
            }
            self.flush_chunk().await?;
            self.event(
                "step_completed",
                object([
                    ("step_index", index.into()),
                    ("step_name", step.name().into()),
                    ("duration", step_started.elapsed().as_secs_f64().into()),
                ]),
            )
            .await?;
        }
        self.event(
            "experiment_completed",
            object([("duration", started.elapsed().as_secs_f64().into())]),
        )
        .await?;
        Ok(Flow::Continue)
    }
}

/// Driver entry point.
pub async fn run(cfg: &Config, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let mut rng = Rng::from_time();
    let mut running = cfg.autostart;
    let mut done: u32 = 0;
    let mut counter: u64 = 0;
    // How the next run was named and described by the start command that asked for it.
    let mut next = crate::runs::RunSpec::default();
    loop {
        if running {
            counter += 1;
            let spec = std::mem::take(&mut next);
            let experiment_id = spec.experiment_id.unwrap_or_else(|| {
                format!(
                    "exp-{}-{}-{counter}",
                    ctx.id,
                    crate::record::unix_ms(std::time::SystemTime::now())
                )
            });
            ctx.run = spec.meta;
            let mut r = Runner {
                cfg,
                ctx: &mut *ctx,
                experiment_id,
                paused: false,
                chunk: Vec::with_capacity(cfg.points_per_message),
                chunk_started: Instant::now(),
                technique: "",
                step_index: 0,
                stopped_by: None,
            };
            let flow = r.experiment(&mut rng).await;
            ctx.run = None;
            match flow? {
                Flow::Shutdown => return Ok(()),
                Flow::Stop => running = false,
                Flow::Continue => {
                    done += 1;
                    running = cfg.runs == 0 || done < cfg.runs;
                }
            }
        }
        ctx.set_state(crate::metrics::DeviceState::Idle);
        // Idle: wait for a start (or the gap between runs), answering commands.
        let next_run = running.then(|| Instant::now() + cfg.pause_between);
        loop {
            let sleep = async {
                match next_run {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = ctx.control.recv() => {
                    let Some(c) = c else { return Ok(()) };
                    let reply = match c.command {
                        CommandKind::Start => {
                            let mut params = c.params.clone();
                            match crate::runs::take_run(&mut params) {
                                Err(e) => Err(e.to_string()),
                                Ok(_) if !params.is_empty() => Err(format!(
                                    "simulated_potentiostat's start takes only the run's fields ({}), not {}",
                                    crate::runs::RUN_FIELDS.join(", "),
                                    params.keys().cloned().collect::<Vec<_>>().join(", ")
                                )),
                                Ok(spec) => {
                                    next = spec;
                                    running = true;
                                    done = 0;
                                    Ok("started".to_string())
                                }
                            }
                        }
                        CommandKind::Stop => {
                            running = false;
                            Ok("already idle".into())
                        }
                        CommandKind::Pause | CommandKind::Resume => Err("no experiment is running".into()),
                        CommandKind::Tare | CommandKind::Zero => {
                            Err(format!("a potentiostat has no {}", c.command.as_str()))
                        }
                    };
                    let start_now = c.command == CommandKind::Start && reply.is_ok();
                    let _ = c.reply.send(reply);
                    if start_now || (!running && next_run.is_some()) {
                        break;
                    }
                }
                () = sleep => break,
                () = ctx.shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::cell::tests::cv;
    use super::*;

    #[test]
    fn invalid_step_is_named() {
        let mut c = Config {
            id: "p".into(),
            steps: vec![cv()],
            points_per_message: 10,
            max_interval: Duration::from_secs(1),
            speed: 1.0,
            runs: 0,
            pause_between: Duration::from_secs(1),
            autostart: true,
            e0: 0.2,
            noise: 0.0,
        };
        assert!(c.validate().is_ok());
        c.steps.push(Step::Ca {
            e_dc: 0.1,
            t_interval: 1.0,
            t_run: 0.5,
        });
        assert_eq!(c.validate().unwrap_err().0, "steps[1].t_run");
    }
}
