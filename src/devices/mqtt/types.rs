//! What mapping an MQTT message gives: readings, notes worth an event, and messages to
//! publish in answer. Shared by the mapper and the Sparkplug decoder, neither of which
//! depends on the other for them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::Value;

/// One reading found in a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub sensor_id: String,
    pub sensor_type: String,
    pub value: f64,
    pub unit: String,
    /// When the sensor took it, if the message says; else the receive time is used.
    pub time: Option<SystemTime>,
    pub metadata: BTreeMap<String, Value>,
}

/// Something worth an agent event (a Sparkplug node died, a seq gap …).
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub event: &'static str,
    pub data: serde_json::Map<String, Value>,
}

impl Note {
    pub fn new(event: &'static str, data: serde_json::Map<String, Value>) -> Note {
        Note { event, data }
    }
}

/// A message the agent publishes in answer (a Sparkplug rebirth request), QoS 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What one message gave.
#[derive(Debug, Default)]
pub struct Mapped {
    pub readings: Vec<Reading>,
    pub notes: Vec<Note>,
    pub publish: Vec<Outgoing>,
    /// Not data by design (metadata, our own commands, a bridge topic).
    pub ignored: bool,
}
