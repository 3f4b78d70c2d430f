//! What mapping an MQTT message gives: readings, notes worth an event, and messages to
//! publish in answer. Shared by the mapper and the Sparkplug decoder, neither of which
//! depends on the other for them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::Value;

/// One reading found in a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Which sensor, as the reading's `sensor_id`.
    pub sensor_id: String,
    /// What it measures.
    pub sensor_type: String,
    /// The value, finite.
    pub value: f64,
    /// Its unit (`""` when the message gives none).
    pub unit: String,
    /// When the sensor took it, if the message says; else the receive time is used.
    pub time: Option<SystemTime>,
    /// What else the message said (topic parts, battery, link quality …).
    pub metadata: BTreeMap<String, Value>,
}

/// Something worth an agent event (a Sparkplug node died, a seq gap …).
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// The agent event's name.
    pub event: &'static str,
    /// The event's data.
    pub data: serde_json::Map<String, Value>,
}

impl Note {
    /// A note with this event name and data.
    pub fn new(event: &'static str, data: serde_json::Map<String, Value>) -> Note {
        Note { event, data }
    }
}

/// A message the agent publishes in answer (a Sparkplug rebirth request), QoS 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Where it goes.
    pub topic: String,
    /// What it says.
    pub payload: Vec<u8>,
}

/// What one message gave.
#[derive(Debug, Default)]
pub struct Mapped {
    /// Readings to ingest.
    pub readings: Vec<Reading>,
    /// Agent events to emit.
    pub notes: Vec<Note>,
    /// Messages to publish back to the broker.
    pub publish: Vec<Outgoing>,
    /// Not data by design (metadata, our own commands, a bridge topic).
    pub ignored: bool,
}
