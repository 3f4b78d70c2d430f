//! The `labgate` command line: parse, set up logging, load config, run, exit code.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use labgate::config::{Config, LogFormat};
use labgate::tools;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// sysexits: a usage or configuration error.
const EX_USAGE: u8 = 64;
/// sysexits: a service the command needs is unavailable.
const EX_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "labgate",
    version,
    about = "Edge agent: lab instruments and sensors -> durable buffer -> Kafka"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config and print it with secrets redacted (exit 64 on error).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Inspect the buffer.
    Buffer {
        #[command(subcommand)]
        cmd: BufferCmd,
    },
    /// Print messages from Kafka topics as they arrive.
    Tail(tools::TailArgs),
    /// Send commands to agents through Kafka.
    Command {
        #[command(subcommand)]
        cmd: CommandCmd,
    },
    /// Run a protocol simulator on a pty pair and print the port path for a config.
    Simulate {
        #[command(subcommand)]
        kind: SimKind,
    },
    /// List serial ports with USB vendor/product id, serial number and product name.
    Ports,
    /// Write an Ed25519 operator key pair for signing commands.
    Keygen(tools::KeygenArgs),
}

#[derive(Subcommand)]
enum SimKind {
    /// An EmStat Pico (MethodSCRIPT) potentiostat.
    Emstat {
        /// Also create this symlink to the port (stable path for configs and replugs).
        #[arg(long)]
        link: Option<PathBuf>,
        /// 1 = real time, 0 = as fast as possible.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// How the device answers h / H (undocumented on real hardware).
        #[arg(long, value_enum, default_value_t = labgate::sim::emstat::HaltReply::Echo)]
        halt_reply: labgate::sim::emstat::HaltReply,
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
        #[arg(long)]
        link: Option<PathBuf>,
        /// Answer every Nth request with ServerDeviceBusy (0 = never).
        #[arg(long, default_value_t = 0)]
        busy_every: u32,
    },
    /// Environmental sensors publishing to an MQTT broker in a payload convention.
    MqttSensors {
        /// mqtt://host:port
        #[arg(long)]
        broker: String,
        #[arg(long, value_enum)]
        preset: labgate::sim::mqtt::Preset,
        /// Node / device name used in topics.
        #[arg(long, default_value = "env1")]
        node: String,
        /// Time between rounds of readings.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Publish this many rounds, then exit.
        #[arg(long)]
        rounds: Option<u64>,
    },
    /// A line instrument: MT-SICS balance, Keithley 2400 / 2000, or a CSV sensor.
    Line {
        #[arg(long, value_enum)]
        kind: labgate::sim::line::Kind,
        /// Also create this symlink to the port.
        #[arg(long)]
        link: Option<PathBuf>,
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

#[derive(Subcommand)]
enum BufferCmd {
    /// Records, bytes, oldest age and per-device counts (from the running agent's
    /// /status, or from the data dir when the agent is stopped).
    Stats {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Records the broker refused for good: list, export, or send them again. Works on
    /// the data dir, so stop the agent first.
    DeadLetters {
        #[command(subcommand)]
        cmd: DeadLetterCmd,
    },
}

#[derive(Subcommand)]
enum DeadLetterCmd {
    /// One line per dead letter: id, when, device, seq, topic, reason.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Every dead letter as one JSON object per line (its message, key and reason).
    Export {
        #[arg(long, short)]
        config: PathBuf,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Puts dead letters back in the buffer, unchanged, for the agent to send again
    /// (after the cause is fixed: a topic's size limit, an ACL).
    Requeue {
        #[arg(long, short)]
        config: PathBuf,
        /// Only these ids (from `list`); all when none is given.
        #[arg(long = "id")]
        ids: Vec<u64>,
    },
}

#[derive(Subcommand)]
enum CommandCmd {
    /// Produce one command, signed with --key (and with --wait, follow its results).
    Send(tools::SendArgs),
    /// Print command results as they arrive.
    Tail(tools::ResultsTailArgs),
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: the journal and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("labgate: config error: {e}");
        ExitCode::from(EX_USAGE)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config } => match load(&config) {
            Ok(cfg) => {
                print!("{}", cfg.redacted_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log.format, &cfg.log.level);
            log_panics();
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return report(Err(e)),
            };
            match rt.block_on(run(cfg, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("labgate: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Buffer {
            cmd: BufferCmd::Stats { config, json },
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(runtime().and_then(|rt| {
                rt.block_on(tools::buffer_stats(&cfg, json))
                    .context("buffer stats")
            }))
        }
        Cmd::Buffer {
            cmd: BufferCmd::DeadLetters { cmd },
        } => {
            let (config, action) = match cmd {
                DeadLetterCmd::List { config } => (config, tools::DeadLetterAction::List),
                DeadLetterCmd::Export { config, out } => {
                    (config, tools::DeadLetterAction::Export(out))
                }
                DeadLetterCmd::Requeue { config, ids } => {
                    (config, tools::DeadLetterAction::Requeue(ids))
                }
            };
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            tool_exit(
                "dead-letters",
                Ok(tools::dead_letters(&cfg, action).map(|()| 0)),
            )
        }
        Cmd::Tail(args) => {
            init_logging(LogFormat::Text, "warn");
            report(runtime().and_then(|rt| rt.block_on(tools::tail(args)).context("tail")))
        }
        Cmd::Ports => match tools::ports() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("labgate: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Simulate {
            kind:
                SimKind::Emstat {
                    link,
                    speed,
                    halt_reply,
                    garbage_every,
                    xon_xoff,
                },
        } => {
            let opts = labgate::sim::emstat::Options {
                halt_reply,
                speed,
                garbage_every,
                xon_xoff,
                ..Default::default()
            };
            {
                let sim = labgate::sim::emstat::Emstat::start(opts, link.as_deref());
                serve_simulator(
                    sim.map(|s| (s.path().to_path_buf(), s)),
                    link,
                    "EmStat Pico",
                )
            }
        }
        Cmd::Simulate {
            kind:
                SimKind::MqttSensors {
                    broker,
                    preset,
                    node,
                    interval,
                    rounds,
                },
        } => {
            init_logging(LogFormat::Text, "warn");
            let opts = labgate::sim::mqtt::Options {
                broker,
                preset,
                node,
                interval,
                rounds,
            };
            report(runtime().and_then(|rt| {
                rt.block_on(labgate::sim::mqtt::run(opts))
                    .context("mqtt-sensors simulator")
            }))
        }
        Cmd::Simulate {
            kind: SimKind::Modbus { link, busy_every },
        } => {
            let sim = labgate::sim::modbus::ModbusSim::start(busy_every, link.as_deref());
            serve_simulator(
                sim.map(|s| (s.path().to_path_buf(), s)),
                link,
                "Modbus RTU slave 1",
            )
        }
        Cmd::Simulate {
            kind:
                SimKind::Line {
                    kind,
                    link,
                    error_every,
                    silent_every,
                    garbage_every,
                },
        } => {
            let opts = labgate::sim::line::Options {
                error_every,
                silent_every,
                garbage_every,
                ..labgate::sim::line::Options::new(kind)
            };
            {
                let sim = labgate::sim::line::LineSim::start(opts, link.as_deref());
                serve_simulator(
                    sim.map(|s| (s.path().to_path_buf(), s)),
                    link,
                    &format!("{kind:?}"),
                )
            }
        }
        Cmd::Command {
            cmd: CommandCmd::Send(args),
        } => {
            init_logging(LogFormat::Text, "warn");
            tool_exit(
                "command send",
                runtime().map(|rt| rt.block_on(tools::send(args))),
            )
        }
        Cmd::Command {
            cmd: CommandCmd::Tail(args),
        } => {
            init_logging(LogFormat::Text, "warn");
            tool_exit(
                "command tail",
                runtime().map(|rt| rt.block_on(tools::results_tail(args)).map(|()| 0)),
            )
        }
        Cmd::Keygen(args) => tool_exit("keygen", Ok(tools::keygen(args).map(|()| 0))),
    }
}

/// Exit code of an operator tool: its own code, 64 for what the user got wrong, 69 when
/// a service (the broker) fails.
fn tool_exit(what: &str, r: anyhow::Result<Result<u8, tools::ToolError>>) -> ExitCode {
    match r {
        Ok(Ok(code)) => ExitCode::from(code),
        Ok(Err(e)) => {
            eprintln!("labgate {what}: {e}");
            ExitCode::from(if e.is_usage() {
                EX_USAGE
            } else {
                EX_UNAVAILABLE
            })
        }
        Err(e) => {
            eprintln!("labgate {what}: {e:#}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// Prints where a started simulator is (its link, else its pty), keeps it running until
/// a signal, and drops it (closing the pty).
fn serve_simulator<S>(
    started: std::io::Result<(PathBuf, S)>,
    link: Option<PathBuf>,
    what: &str,
) -> ExitCode {
    let (path, sim) = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("labgate: cannot start the {what} simulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", link.as_deref().unwrap_or(&path).display());
    eprintln!("{what} simulator on {} (Ctrl-C ends it)", path.display());
    let code = report(runtime().and_then(|rt| {
        rt.block_on(async {
            wait_for_signal().await;
            Ok(())
        })
    }));
    drop(sim);
    code
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Panics go to the log with where they happened (a task's panic is also reported by
/// its supervisor, which then decides what happens next).
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        tracing::error!(panic = %msg, at = %at, "panic");
    }));
}

async fn run(cfg: Config, path: PathBuf) -> Result<(), labgate::app::AgentError> {
    let stop = CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received");
        signal_stop.cancel();
        // A second signal while draining ends the process at once.
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    labgate::app::run(cfg, Some(path), stop).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
