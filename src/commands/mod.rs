//! Commands: Kafka command topic → validate → replay check → route to device inboxes →
//! two-phase results.
//!
//! Every agent consumes the command topic in its own consumer group, so it sees every
//! command, and acts on those addressed to it (`target.agent` equal to its id, or absent).
//! A command is checked in this order: schema, target, signature (who sent it, and may
//! they), time window (not stale, not from the future), device (exists, allows the
//! command), replay (its id was never executed). Only then is it routed; its id is
//! durable in the replay store before any device sees it, so it runs at most once.
//!
//! Results: `accepted` once routed, then `completed`, `failed` or `timeout` from a task
//! per command and device, so the consumer never waits on hardware and a `stop` reaches
//! its device while earlier work is still running. The offset of a command is stored
//! after its `accepted` (or rejection) is durable: a crash re-delivers the command, and
//! the replay store answers `duplicate` if it had already been routed.

mod consumer;
mod handler;
pub mod policy;
pub mod replay;
mod route;
pub mod sign;
mod validate;

use std::time::Duration;

use rdkafka::error::KafkaError;

/// Ids are kept this long after their command expired (on top of the clock skew).
const REPLAY_MARGIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
/// Why the command consumer stopped.
pub enum CommandError {
    #[error("command consumer: {0}")]
    /// The Kafka consumer failed.
    Kafka(#[from] KafkaError),
    #[error("command consumer setup: {0}")]
    /// The consumer could not be built from the config.
    Setup(#[from] crate::kafka::KafkaSetupError),
    #[error("command consumer stopped: {reason}")]
    /// librdkafka declared the consumer unusable (another member fenced it).
    Fatal {
        /// librdkafka's reason, and what it means for the agent.
        reason: String,
    },
}

use consumer::Contact;
pub use consumer::{run, CommandContext};
pub use handler::Handler;
pub use route::{Router, Routes};
pub use validate::{Code, Command, Meta, Refusal, Rejection, Validator};

mod lease;

#[cfg(test)]
mod tests;
