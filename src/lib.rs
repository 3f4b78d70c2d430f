//! labgate: an edge agent for lab instruments and sensors.
//!
//! Devices produce records; every record is kept durably in a local sled buffer until
//! Kafka has acknowledged it; a Kafka command topic pauses, resumes or stops devices.
//!
//! # Layout
//!
//! `ARCHITECTURE.md` has the path of a record and of a command, the rules that hold
//! everywhere, and how to add a device kind. Modules:
//!
//! - [`config`]: assembles the sections each component owns (TOML + `LABGATE__…` env)
//!   and names the full key of any error.
//! - [`time`]: times and durations from outside, range-checked (1970…9999, ≤ 100 years).
//! - [`secret`]: passwords and tokens that print as `***`; one reader for their sources.
//! - [`record`]: record bodies, the envelope, JSON wire encoding, the stored form.
//! - [`buffer`]: the sled outbox (chunks, group commit, the fdatasync durability point in
//!   [`buffer::store`], seq persistence, caps, quarantine, dead letters, stats).
//! - [`ingest`]: the one place records are stamped and group-committed.
//! - [`kafka`]: the `[kafka]` section, producer settings, topic creation, the forwarder.
//! - [`pipeline`]: edge processing of sensor readings (threshold alerts, aggregates,
//!   downsampling), run by ingest.
//! - [`commands`]: command validation, signatures, replay store, lease, routing, results.
//! - [`devices`]: device configs, the supervisor, the drivers, [`metrics::DeviceState`].
//! - [`http`]: the `[http]` section; `/health`, `/metrics`, `/status`.
//! - [`metrics`]: shared counters and their Prometheus rendering.
//! - [`memory`]: gives the kernel back what glibc keeps after a burst.
//! - [`heartbeat`]: signs of life of the long-running loops.
//! - [`systemd`]: `sd_notify` and the watchdog, without libsystemd.
//! - [`sim`]: protocol simulators (EmStat, line instruments, Modbus RTU, MQTT sensors).
//! - [`app`]: wiring, supervision of the stages, reload, ordered shutdown.
//! - [`tools`]: operator tools behind the CLI (`tail`, `command send`, `buffer …`).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

/// Prints a line on stdout for the CLI, as `println!` does, without its panic when the
/// reader has gone (`labgate tail | head`): see [`tools::write_stdout`].
#[macro_export]
macro_rules! out {
    () => { $crate::tools::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::tools::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// [`out!`] without the newline, as `print!`.
#[macro_export]
macro_rules! out_raw {
    ($($arg:tt)*) => { $crate::tools::write_stdout(format_args!($($arg)*)) };
}

pub mod app;
pub mod buffer;
pub mod commands;
pub mod config;
pub mod devices;
pub mod heartbeat;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod live;
pub mod memory;
pub mod metrics;
pub mod pipeline;
mod poison_test;
pub mod record;
pub mod runs;
pub mod secret;
pub mod sim;
pub mod systemd;
pub mod time;
pub mod tools;
