//! labgate: an edge agent for lab instruments and sensors.
//!
//! Devices produce records; every record is kept durably in a local sled buffer until
//! Kafka has acknowledged it; a Kafka command topic pauses, resumes or stops devices.
//!
//! # Layout
//!
//! - [`config`]: typed config (TOML + `LABGATE__…` env), validation naming the key.
//! - [`record`]: record bodies, the envelope, JSON wire encoding, the stored form.
//! - [`buffer`]: the sled outbox (chunks, group commit, seq persistence, caps, stats).
//! - [`ingest`]: the one place records are stamped and group-committed.
//! - [`kafka`]: producer settings, topic creation, the forwarder.
//! - [`pipeline`]: edge processing of sensor readings (threshold alerts, aggregates,
//!   downsampling), run by ingest.
//! - [`commands`]: command validation, routing to devices, results.
//! - [`devices`]: device configs, the supervisor, and the drivers.
//! - [`http`]: `/health`, `/metrics`, `/status`.
//! - [`metrics`]: shared counters and their Prometheus rendering.
//! - [`sim`]: protocol simulators on pty pairs (EmStat).
//! - [`app`]: wiring and ordered shutdown.
//! - [`tools`]: operator tools behind the CLI (`tail`, `command send`).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod app;
pub mod buffer;
pub mod commands;
pub mod config;
pub mod devices;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
mod poison_test;
pub mod record;
pub mod secret;
pub mod sim;
pub mod systemd;
pub mod time;
pub mod tools;
