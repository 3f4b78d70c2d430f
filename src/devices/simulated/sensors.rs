//! `simulated_sensors`: a set of environmental sensors (temperature, humidity, pressure,
//! CO2 …), each `base ± variance`, read every `interval`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Rng;
use crate::devices::{check_range, CommandKind, Control, DeviceCtx, DeviceError};
use crate::record::{Body, Draft};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `simulated_sensors` device: a set of noisy readings at an interval.
pub struct Config {
    /// The device id records and commands carry.
    pub id: String,
    /// Time between readings of the whole set; 0 = as fast as possible (benchmarks).
    #[serde(default = "d_interval", with = "crate::time::serde_duration")]
    pub interval: Duration,
    /// Stop after this many rounds (unset = run until stopped).
    #[serde(default)]
    pub rounds: Option<u64>,
    #[serde(default)]
    /// Copied into each reading.
    pub location: Option<String>,
    /// The sensors read each round.
    pub sensors: Vec<Sensor>,
}

fn d_interval() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// One simulated sensor.
pub struct Sensor {
    /// The reading's `sensor_id`.
    pub sensor_id: String,
    /// The reading's `sensor_type`.
    pub sensor_type: String,
    /// The reading's unit.
    pub unit: String,
    /// The mean value.
    pub base: f64,
    /// Half-width of the uniform noise around `base`.
    pub variance: f64,
}

impl Config {
    /// Checks there are sensors and their numbers are finite.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.sensors.is_empty() {
            return Err(("sensors".into(), "at least one sensor is required".into()));
        }
        for (i, s) in self.sensors.iter().enumerate() {
            if !crate::record::valid_id(&s.sensor_id) {
                return Err((
                    format!("sensors[{i}].sensor_id"),
                    "must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if !crate::record::valid_id(&s.sensor_type) {
                return Err((
                    format!("sensors[{i}].sensor_type"),
                    "must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
                ));
            }
            check_range(&format!("sensors[{i}].base"), s.base, -1e12, 1e12)?;
            check_range(&format!("sensors[{i}].variance"), s.variance, 0.0, 1e12)?;
        }
        Ok(())
    }
}

/// Driver entry point.
pub async fn run(cfg: &Config, ctx: &mut DeviceCtx) -> Result<(), DeviceError> {
    let mut rng = Rng::from_time();
    let mut running = true;
    let mut rounds: u64 = 0;
    let mut next = Instant::now();
    ctx.set_state(crate::metrics::DeviceState::Running);
    loop {
        let limit_hit = cfg.rounds.is_some_and(|n| rounds >= n);
        let active = running && !limit_hit;
        if active && (cfg.interval.is_zero() || Instant::now() >= next) {
            for s in &cfg.sensors {
                let value = s.base + s.variance * rng.symmetric();
                ctx.emit(Draft::new(
                    ctx.id.clone(),
                    Body::SensorReading {
                        sensor_id: s.sensor_id.clone(),
                        sensor_type: s.sensor_type.clone(),
                        value,
                        unit: s.unit.clone(),
                        location: cfg.location.clone(),
                        metadata: BTreeMap::new(),
                    },
                ))
                .await?;
            }
            rounds += 1;
            next += cfg.interval;
            if next < Instant::now() {
                next = Instant::now() + cfg.interval;
            }
            if cfg.interval.is_zero() {
                // Full speed: look at commands without waiting.
                if let Ok(c) = ctx.control.try_recv() {
                    running = handle(ctx, c, running);
                }
                if ctx.shutdown.is_cancelled() {
                    return Ok(());
                }
                if rounds % 64 == 0 {
                    tokio::task::yield_now().await;
                }
                continue;
            }
        }
        if cfg.rounds.is_some_and(|n| rounds >= n) {
            ctx.set_state(crate::metrics::DeviceState::Idle);
        }
        let wait = async {
            if active {
                tokio::time::sleep_until(next).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            c = ctx.control.recv() => match c {
                Some(c) => {
                    running = handle(ctx, c, running);
                    next = Instant::now();
                }
                None => return Ok(()),
            },
            () = wait => {}
            () = ctx.shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Applies a command; returns whether readings continue.
fn handle(ctx: &DeviceCtx, c: Control, running: bool) -> bool {
    let (reply, now_running, state) = match c.command {
        _ if !c.params.is_empty() => (
            Err(format!("{} takes no parameters", c.command.as_str())),
            running,
            None,
        ),
        CommandKind::Pause => (
            Ok("paused".to_string()),
            false,
            Some(crate::metrics::DeviceState::Paused),
        ),
        CommandKind::Resume => (
            Ok("resumed".into()),
            true,
            Some(crate::metrics::DeviceState::Running),
        ),
        CommandKind::Stop => (
            Ok("stopped".into()),
            false,
            Some(crate::metrics::DeviceState::Idle),
        ),
        CommandKind::Start => (
            Ok("started".into()),
            true,
            Some(crate::metrics::DeviceState::Running),
        ),
        CommandKind::Tare | CommandKind::Zero => (
            Err(format!("simulated sensors have no {}", c.command.as_str())),
            running,
            None,
        ),
    };
    if let Some(s) = state {
        ctx.set_state(s);
    }
    let _ = c.reply.send(reply);
    now_running
}
