//! The `labgate` command line: parse, set up logging, load config, run, exit code.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use labgate::config::{Config, LogFormat};
use labgate::sim::cli::SimKind;
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
    /// One line per agent from the fleet status topic: alive, silent or stopped, and
    /// the age of its last heartbeat.
    Fleet(tools::FleetArgs),
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
                for line in &cfg.rewritten {
                    labgate::out!("# {line}");
                }
                labgate::out_raw!("{}", cfg.redacted_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Run { config } => {
            // First, while this is the only thread.
            let arenas = labgate::memory::limit_arenas();
            let thresholds = labgate::memory::fix_thresholds();
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cfg.log.format, &cfg.log.level);
            log_panics();
            tracing::debug!(
                ?arenas,
                thresholds,
                "glibc arena limit (None: the environment's or glibc's own); mmap and trim thresholds fixed"
            );
            if let Err(e) = labgate::memory::spawn_trimmer() {
                tracing::warn!(error = %e, "cannot start the memory trimmer; freed memory stays with the allocator");
            }
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
        Cmd::Fleet(args) => {
            init_logging(LogFormat::Text, "warn");
            tool_exit("fleet", runtime().map(|rt| rt.block_on(tools::fleet(args))))
        }
        Cmd::Ports => match tools::ports() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("labgate: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Simulate {
            kind: SimKind::MqttSensors(opts),
        } => {
            init_logging(LogFormat::Text, "warn");
            report(runtime().and_then(|rt| {
                rt.block_on(labgate::sim::mqtt::run(opts.into()))
                    .context("mqtt-sensors simulator")
            }))
        }
        Cmd::Simulate { kind } => match runtime() {
            Ok(rt) => match rt.block_on(labgate::sim::cli::serve(kind, wait_for_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("labgate: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => report(Err(e)),
        },
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
