//! `labgate simulate …`: the simulators' command-line arguments, and serving a pty
//! simulator until a signal.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{emstat, line, modbus, mqtt};

#[derive(Subcommand)]
/// Which simulator `labgate simulate` runs.
pub enum SimKind {
    /// An EmStat Pico (MethodSCRIPT) potentiostat.
    Emstat {
        /// Also create this symlink to the port (stable path for configs and replugs).
        #[arg(long)]
        link: Option<PathBuf>,
        /// 1 = real time, 0 = as fast as possible.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// How the device answers h / H (undocumented on real hardware).
        #[arg(long, value_enum, default_value_t = emstat::HaltReply::Echo)]
        halt_reply: emstat::HaltReply,
        /// Emit a garbage line after every N data lines (0 = never).
        #[arg(long, default_value_t = 0)]
        garbage_every: u32,
        /// Sprinkle XON/XOFF bytes into the output.
        #[arg(long)]
        xon_xoff: bool,
    },
    /// A Modbus RTU slave serving devices/profiles/modbus-th-sensor.toml's register map.
    Modbus {
        /// Also create this symlink to the port.
        #[arg(long, conflicts_with = "listen")]
        link: Option<PathBuf>,
        /// Serve Modbus TCP on this address (e.g. 127.0.0.1:5020) instead of RTU on a pty.
        #[arg(long)]
        listen: Option<String>,
        /// Answer every Nth request with ServerDeviceBusy (0 = never).
        #[arg(long, default_value_t = 0)]
        busy_every: u32,
    },
    /// Environmental sensors publishing to an MQTT broker in a payload convention.
    MqttSensors(MqttArgs),
    /// A line instrument: MT-SICS balance, Keithley 2400 / 2000, or a CSV sensor.
    Line {
        #[arg(long, value_enum)]
        /// Which instrument to imitate.
        kind: line::Kind,
        /// Also create this symlink to the port.
        #[arg(long, conflicts_with = "listen")]
        link: Option<PathBuf>,
        /// Listen on this TCP address (a SCPI raw socket, e.g. 127.0.0.1:5025) instead
        /// of a pty; one connection at a time.
        #[arg(long)]
        listen: Option<String>,
        /// Answer every Nth measurement poll with an error reply (0 = never).
        #[arg(long, default_value_t = 0)]
        error_every: u32,
        /// Leave every Nth measurement poll unanswered (0 = never).
        #[arg(long, default_value_t = 0)]
        silent_every: u32,
        /// Emit a garbage line after every N lines (0 = never).
        #[arg(long, default_value_t = 0)]
        garbage_every: u32,
    },
}

/// `labgate simulate mqtt-sensors`.
#[derive(Args)]
pub struct MqttArgs {
    /// mqtt://host:port
    #[arg(long)]
    broker: String,
    #[arg(long, value_enum)]
    preset: mqtt::Preset,
    /// Node / device name used in topics.
    #[arg(long, default_value = "env1")]
    node: String,
    /// Time between rounds of readings.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Publish this many rounds, then exit.
    #[arg(long)]
    rounds: Option<u64>,
}

impl From<MqttArgs> for mqtt::Options {
    fn from(a: MqttArgs) -> mqtt::Options {
        mqtt::Options {
            broker: a.broker,
            preset: a.preset,
            node: a.node,
            interval: a.interval,
            rounds: a.rounds,
        }
    }
}

/// Why a pty simulator could not run.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the {what} simulator: {source}")]
pub struct ServeError {
    what: String,
    source: std::io::Error,
}

/// Starts a pty simulator, prints where it is (its link, else its pty) on standard
/// output, keeps it running until `until` resolves (a signal), then drops it (closing the
/// pty). The MQTT simulator is not a pty simulator: it runs through `mqtt::run`.
pub async fn serve(
    kind: SimKind,
    until: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let started = |what: &str, r: std::io::Result<(PathBuf, Box<dyn std::any::Any>)>| {
        r.map_err(|source| ServeError {
            what: what.to_string(),
            source,
        })
    };
    let (what, link, (path, sim)) = match kind {
        SimKind::Emstat {
            link,
            speed,
            halt_reply,
            garbage_every,
            xon_xoff,
        } => {
            let opts = emstat::Options {
                halt_reply,
                speed,
                garbage_every,
                xon_xoff,
                ..Default::default()
            };
            let sim = emstat::Emstat::start(opts, link.as_deref()).map(|s| {
                (
                    s.path().to_path_buf(),
                    Box::new(s) as Box<dyn std::any::Any>,
                )
            });
            (
                "EmStat Pico".to_string(),
                link,
                started("EmStat Pico", sim)?,
            )
        }
        SimKind::Modbus {
            link,
            listen,
            busy_every,
        } => {
            let sim = match &listen {
                Some(addr) => modbus::ModbusSim::listen(busy_every, addr),
                None => modbus::ModbusSim::start(busy_every, link.as_deref()),
            };
            let sim = sim.map(|s| {
                (
                    s.path().to_path_buf(),
                    Box::new(s) as Box<dyn std::any::Any>,
                )
            });
            let what = if listen.is_some() {
                "Modbus TCP unit 1"
            } else {
                "Modbus RTU slave 1"
            };
            (what.to_string(), link, started(what, sim)?)
        }
        SimKind::Line {
            kind,
            link,
            listen,
            error_every,
            silent_every,
            garbage_every,
        } => {
            let opts = line::Options {
                error_every,
                silent_every,
                garbage_every,
                ..line::Options::new(kind)
            };
            let what = format!("{kind:?}");
            let sim = match &listen {
                Some(addr) => line::LineSim::listen(opts, addr),
                None => line::LineSim::start(opts, link.as_deref()),
            };
            let sim = sim.map(|s| {
                (
                    s.path().to_path_buf(),
                    Box::new(s) as Box<dyn std::any::Any>,
                )
            });
            (what.clone(), link, started(&what, sim)?)
        }
        SimKind::MqttSensors(_) => {
            return Err(ServeError {
                what: "mqtt-sensors".into(),
                source: std::io::Error::other("not a pty simulator: run it with mqtt::run"),
            })
        }
    };
    crate::out!("{}", link.as_deref().unwrap_or(&path).display());
    eprintln!("{what} simulator on {} (Ctrl-C ends it)", path.display());
    until.await;
    drop(sim);
    Ok(())
}
