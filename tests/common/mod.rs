//! Test harness: real brokers (tansu, mosquitto) on free ports, the real `labgate`
//! binary, a reader for topics, checks on what arrived, and the fault filesystem. Nothing
//! here is a mock: a missing broker binary fails the test.
//!
//! `broker` (tansu, topics) · `agent` (the binary and its config) · `kafka` (reading and
//! producing) · `assertions` · `mqtt` (mosquitto, a client) · `devices` (shared device
//! config blocks) · `faultfs` (power cuts, sick disks) · `secure` (certificates, a TLS terminator) · `http` (hand-written HTTP requests) · `browser` (chromium through chromedriver) · `bench` (for the benchmarks).
// Each test crate uses a part of the harness (and of its re-exports).
#![allow(dead_code, unused_imports)]

mod agent;
mod assertions;
mod bench;
mod broker;
mod browser;
mod devices;
pub mod faultfs;
mod http;
mod kafka;
mod mqtt;
mod secure;

pub use agent::*;
pub use assertions::*;
pub use bench::*;
pub use broker::*;
pub use browser::*;
pub use devices::*;
pub use http::*;
pub use kafka::*;
pub use mqtt::*;
pub use secure::*;

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
