//! Records: what devices, the command path and the agent itself say, and how that is put
//! on the wire.
//!
//! A driver builds a [`Draft`] (a [`Body`] plus its device). Ingest stamps it with the
//! envelope (`agent_id`, `device_id`, per-device `seq`, `event_id`, `schema_version`,
//! `timestamp`), encodes the wire message once, and stores a [`Stored`] in the buffer. The
//! forwarder sends `Stored` as it is: no encoding on the way out.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Version of the wire message shapes (`schemas/*.json`).
pub const SCHEMA_VERSION: u32 = 1;

/// The largest magnitude a measured value may have. Anything larger (or NaN, ±inf) is
/// refused where it enters, as a malformed reading: no instrument measures 1e100 of
/// anything, and below it sums and averages of any number of readings stay finite.
pub const MAX_VALUE_ABS: f64 = 1e100;

/// Whether `v` is a value a record may carry (finite, at most [`MAX_VALUE_ABS`]).
pub fn usable_value(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_VALUE_ABS
}

/// Whether `s` may be an id that goes into Kafka keys, topics and metric labels (agent,
/// device, sensor ids): 1–64 characters of ASCII letters, digits, `-`, `_`, `.`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The device id of records the agent itself emits (drops, dead letters, command
/// rejections that name no device).
pub const AGENT_DEVICE: &str = "agent";

/// A value of a data package that no point field names (its MethodSCRIPT type code and
/// value), kept rather than dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extra {
    /// The variable type (`ba`, `cc`, `ja` …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The value; None for NaN.
    pub value: Option<f64>,
}

/// One measured point of an electrochemical technique.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since the start of the step.
    pub t: f64,
    /// Potential, V. NaN when the instrument did not send one (EIS); then it is left
    /// out of the wire message rather than written as null.
    #[serde(default = "nan", skip_serializing_if = "is_nan")]
    pub e: f64,
    /// Current, A. NaN (and left out) when not sent.
    #[serde(default = "nan", skip_serializing_if = "is_nan")]
    pub i: f64,
    /// Device status bits for this point (0x1 timing, 0x2 overload, 0x4 underload,
    /// 0x8 overload warning); omitted when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub status: u8,
    /// EIS: applied frequency, Hz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f: Option<f64>,
    /// EIS: real part of the impedance, Ohm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub z_re: Option<f64>,
    /// EIS: imaginary part of the impedance, Ohm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub z_im: Option<f64>,
    /// EIS: impedance modulus |Z|, Ohm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub z_mod: Option<f64>,
    /// EIS: phase of the impedance, degrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<f64>,
    /// SWV: forward current, A.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub i_fwd: Option<f64>,
    /// SWV: reverse current, A.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub i_rev: Option<f64>,
    /// ACV: AC current, A.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub i_ac: Option<f64>,
    /// Multiplexer channel the point was measured on, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<u16>,
    /// Values of the instrument's package that no field above names, in package order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<Extra>,
}

impl Point {
    /// A time / potential / current point.
    pub fn tei(t: f64, e: f64, i: f64) -> Point {
        Point {
            t,
            e,
            i,
            status: 0,
            f: None,
            z_re: None,
            z_im: None,
            z_mod: None,
            phase: None,
            i_fwd: None,
            i_rev: None,
            i_ac: None,
            channel: None,
            more: Vec::new(),
        }
    }
}

fn nan() -> f64 {
    f64::NAN
}

fn is_nan(v: &f64) -> bool {
    v.is_nan()
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// Status of a command as reported on the results topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Validated and handed to the device.
    Accepted,
    /// The device did it.
    Completed,
    /// The device could not do it.
    Failed,
    /// Refused by validation; never reached a device.
    Rejected,
    /// A command id seen before: not executed again.
    Duplicate,
    /// The device gave no answer within the command's deadline.
    Timeout,
}

impl CommandStatus {
    /// The status as the wire message writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Accepted => "accepted",
            CommandStatus::Completed => "completed",
            CommandStatus::Failed => "failed",
            CommandStatus::Rejected => "rejected",
            CommandStatus::Duplicate => "duplicate",
            CommandStatus::Timeout => "timeout",
        }
    }
}

/// Alert priority, in the shape alert consumers already use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Informational.
    Low,
    /// Worth a look.
    Normal,
    /// Needs attention soon.
    High,
    /// Needs attention now.
    Critical,
}

/// Whether a threshold alert is raised or over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// Raised and not yet over.
    Active,
    /// Back inside its band.
    Cleared,
}

/// What a record says. The `type` tag is the message type on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    /// Lifecycle of an experiment (started, step_completed, paused, stopped, …).
    ExperimentEvent {
        /// What happened (`experiment_started`, `scan_completed` …).
        event: String,
        /// The run it belongs to.
        experiment_id: String,
        /// Event details (technique, parameters, reason …).
        data: serde_json::Map<String, serde_json::Value>,
    },
    /// A chunk of measured points.
    EchemData {
        /// `CV`, `CA`, `LSV` …
        technique: String,
        /// The run the points belong to.
        experiment_id: String,
        /// Which step of the run, from 0 (for a MethodSCRIPT run: which measurement loop).
        step_index: u32,
        /// The scan of a multi-scan step (CV with `nscans`), from 0.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scan: Option<u32>,
        /// Point fields that are the applied setting rather than a measurement (`e`
        /// when the instrument did not report the potential it applied).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        applied: Vec<String>,
        /// The points, in measurement order.
        points: Vec<Point>,
    },
    /// One sensor value.
    SensorReading {
        /// Which sensor.
        sensor_id: String,
        /// What it measures (`temperature`, `mass` …).
        sensor_type: String,
        /// The value, finite.
        value: f64,
        /// Its unit.
        unit: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Where the sensor is.
        location: Option<String>,
        /// What else the source said.
        metadata: BTreeMap<String, serde_json::Value>,
    },
    /// Something that needs a human (threshold crossed, records dead-lettered …).
    Alert {
        /// Stable id; a cleared alert repeats the raised one's.
        alert_id: String,
        /// The sensor it concerns (the device or `agent` for agent alerts).
        sensor_id: String,
        /// The sensor's type.
        sensor_type: String,
        /// How urgent.
        priority: Priority,
        /// What a person should know.
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// The value that caused it.
        value: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// The threshold crossed.
        threshold: Option<f64>,
        /// Always false when sent; consumers acknowledge downstream.
        acknowledged: bool,
        /// Threshold alerts: `active` when raised, `cleared` (same `alert_id`) when the
        /// value is back inside its band.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<AlertState>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// The value's unit.
        unit: Option<String>,
    },
    /// One closed tumbling window of a sensor's readings.
    SensorAggregate {
        /// Which sensor.
        sensor_id: String,
        /// What it measures.
        sensor_type: String,
        /// The readings' unit.
        unit: String,
        /// Window start, RFC 3339.
        window_start: String,
        /// Window end, RFC 3339.
        window_end: String,
        /// Readings in the window.
        count: u64,
        /// Their mean.
        avg: f64,
        /// The smallest.
        min: f64,
        /// The largest.
        max: f64,
        /// Closed early (agent shutdown): covers only part of the window.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        partial: bool,
    },
    /// What happened to a command.
    CommandResult {
        /// The command's id.
        command_id: String,
        /// The command as written.
        command: String,
        /// Where it is now.
        status: CommandStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Why (failures, rejections, timeouts).
        reason: Option<String>,
        /// Machine-readable class of a rejection: schema, unknown_device, not_allowed,
        /// expired, not_yet_valid, bad_signature, unsigned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason_code: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// The device it was for.
        target_device: Option<String>,
        /// The operator who signed the command (absent for unsigned commands).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issuer: Option<String>,
        /// Unix microseconds: when the command says it was issued.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issued_at_us: Option<u64>,
        /// Unix microseconds: when the agent received the command and when this status
        /// was reached (lets operators see where time went).
        received_at_us: u64,
        /// Unix microseconds when this status was reached.
        status_at_us: u64,
    },
    /// Something the agent itself reports (records dropped, …).
    AgentEvent {
        /// What happened (`device_connected`, `records_dropped` …).
        event: String,
        /// Details.
        data: serde_json::Map<String, serde_json::Value>,
    },
}

/// Which configured topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TopicKind {
    /// `topics.events`.
    Events,
    /// `topics.agent_events`.
    AgentEvents,
    /// `topics.data`.
    Data,
    /// `topics.sensors`.
    Sensors,
    /// `topics.alerts`.
    Alerts,
    /// `topics.command_results`.
    CommandResults,
    /// `topics.aggregates`.
    Aggregates,
}

impl Body {
    /// Which configured topic this body goes to.
    pub fn topic(&self) -> TopicKind {
        match self {
            Body::ExperimentEvent { .. } => TopicKind::Events,
            Body::AgentEvent { .. } => TopicKind::AgentEvents,
            Body::EchemData { .. } => TopicKind::Data,
            Body::SensorReading { .. } => TopicKind::Sensors,
            Body::Alert { .. } => TopicKind::Alerts,
            Body::SensorAggregate { .. } => TopicKind::Aggregates,
            Body::CommandResult { .. } => TopicKind::CommandResults,
        }
    }

    /// The Kafka key: order is kept per key.
    pub fn key(&self, agent_id: &str) -> String {
        self.key_parts(agent_id).concat()
    }

    /// [`Body::key`] in the pieces it is joined from (a sensor's is `type`, `:`, `id`).
    fn key_parts<'a>(&'a self, agent_id: &'a str) -> [&'a str; 3] {
        match self {
            Body::ExperimentEvent { experiment_id, .. } | Body::EchemData { experiment_id, .. } => {
                [experiment_id, "", ""]
            }
            Body::SensorReading {
                sensor_id,
                sensor_type,
                ..
            }
            | Body::SensorAggregate {
                sensor_id,
                sensor_type,
                ..
            } => [sensor_type, ":", sensor_id],
            Body::Alert { sensor_id, .. } => [sensor_id, "", ""],
            Body::CommandResult { command_id, .. } => [command_id, "", ""],
            Body::AgentEvent { .. } => [agent_id, "", ""],
        }
    }

    /// The `type` tag, for logs and schema lookup.
    pub fn type_name(&self) -> &'static str {
        match self {
            Body::ExperimentEvent { .. } => "experiment_event",
            Body::EchemData { .. } => "echem_data",
            Body::SensorReading { .. } => "sensor_reading",
            Body::Alert { .. } => "alert",
            Body::SensorAggregate { .. } => "sensor_aggregate",
            Body::CommandResult { .. } => "command_result",
            Body::AgentEvent { .. } => "agent_event",
        }
    }
}

/// A record as a driver hands it to ingest.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    /// The device that said it (`agent` for the agent's own records).
    pub device_id: String,
    /// When it happened; ingest uses its own clock when the driver gives none.
    pub time: Option<SystemTime>,
    /// What it says.
    pub body: Body,
    /// The source's own event id (lab software posting through the ingest API brings
    /// one so that its retries are recognised downstream); a new one is made when None.
    pub event_id: Option<uuid::Uuid>,
    /// The run this record belongs to, as its caller named it (sample, operator, ELN
    /// reference, metadata): carried by every record of that run.
    pub run: Option<std::sync::Arc<RunMeta>>,
}

/// What the caller said about a run beside its `experiment_id`; every record of the run
/// carries it as `run`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    /// The sample measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<String>,
    /// Who runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// The electronic lab notebook entry it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eln_ref: Option<String>,
    /// Anything else the caller attached.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl RunMeta {
    /// Whether it says nothing.
    pub fn is_empty(&self) -> bool {
        self.sample.is_none()
            && self.operator.is_none()
            && self.eln_ref.is_none()
            && self.metadata.is_empty()
    }
}

impl Draft {
    /// A draft stamped with the current time.
    pub fn new(device_id: impl Into<String>, body: Body) -> Draft {
        Draft {
            device_id: device_id.into(),
            time: Some(SystemTime::now()),
            body,
            event_id: None,
            run: None,
        }
    }

    /// This draft as part of a run the caller described (no-op for `None`).
    pub fn in_run(mut self, run: Option<&std::sync::Arc<RunMeta>>) -> Draft {
        self.run = run.cloned();
        self
    }

    /// An event about the agent itself (agent events topic, keyed by the agent).
    pub fn agent_event(event: &str, data: serde_json::Map<String, serde_json::Value>) -> Draft {
        Draft::new(
            AGENT_DEVICE,
            Body::AgentEvent {
                event: event.into(),
                data,
            },
        )
    }
}

/// A record as the buffer keeps it: routing facts plus the finished wire payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Which configured topic it goes to.
    pub topic: TopicKind,
    /// Its Kafka key (order is kept per key).
    pub key: String,
    /// Its device, for per-device figures.
    pub device_id: String,
    /// Its per-device sequence number (also in the payload).
    pub seq: u64,
    /// Unix milliseconds at ingest, for the buffer's oldest-age figure.
    pub ingested_ms: u64,
    /// The finished wire message (JSON), sent as it is.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A representable time, written as RFC 3339 with milliseconds straight into the JSON
/// (no `String` per record).
struct Rfc3339Millis(SystemTime);

impl Rfc3339Millis {
    fn new(t: SystemTime) -> Self {
        // The formatter panics outside the representable range; the epoch stands in.
        Self(crate::time::checked(t).unwrap_or(SystemTime::UNIX_EPOCH))
    }

    /// The text, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    fn text(&self) -> [u8; 24] {
        rfc3339_millis(self.0)
    }
}

impl Serialize for Rfc3339Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.text();
        // ASCII digits and punctuation: always UTF-8.
        s.serialize_str(std::str::from_utf8(&text).unwrap_or("1970-01-01T00:00:00.000Z"))
    }
}

thread_local! {
    /// The last whole second formatted on this thread and its text up to the seconds
    /// (`YYYY-MM-DDTHH:MM:SS`): records stamped in the same second share it.
    static SECOND_TEXT: std::cell::Cell<Option<(u64, [u8; 19])>> =
        const { std::cell::Cell::new(None) };
}

/// `t` (representable: 1970 to 9999) as RFC 3339 with milliseconds, as humantime writes
/// it. Formatting a date is most of the cost and changes once a second, so the text of
/// the last second is kept.
fn rfc3339_millis(t: SystemTime) -> [u8; 24] {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let head = match SECOND_TEXT.get() {
        Some((s, head)) if s == secs => head,
        _ => {
            let mut head = [b'0'; 19];
            let whole = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            // `YYYY-MM-DDTHH:MM:SSZ`: the part before the `Z`.
            if let Some(b) = text.as_bytes().get(..19) {
                head.copy_from_slice(b);
            }
            SECOND_TEXT.set(Some((secs, head)));
            head
        }
    };
    let ms = since.subsec_millis();
    let mut out = [0u8; 24];
    out[..19].copy_from_slice(&head);
    out[19] = b'.';
    // `subsec_millis` is below 1,000: three digits.
    out[20] = b'0' + (ms / 100) as u8;
    out[21] = b'0' + (ms / 10 % 10) as u8;
    out[22] = b'0' + (ms % 10) as u8;
    out[23] = b'Z';
    out
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(flatten)]
    body: &'a Body,
    timestamp: Rfc3339Millis,
    agent_id: &'a str,
    device_id: &'a str,
    seq: u64,
    event_id: &'a str,
    schema_version: u32,
    /// The source gave a time that cannot be represented (before 1970, after 9999):
    /// `timestamp` is the agent's receive time instead.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    source_time_rejected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    run: Option<&'a RunMeta>,
}

/// Errors of turning a record into bytes.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode {0} record: {1}")]
    /// serde_json failed on a record of this type (non-finite floats are kept out before this).
    Json(&'static str, serde_json::Error),
}

/// Stamps `draft` with its envelope and encodes its JSON wire message. Never panics: a
/// source time outside 1970…9999 is replaced by `now` and flagged
/// (`source_time_rejected`), and a clock outside that range is clamped.
pub fn stamp(
    draft: &Draft,
    agent_id: &str,
    seq: u64,
    now: SystemTime,
) -> Result<Stored, EncodeError> {
    let mut out = Vec::new();
    let placed = stamp_onto(draft, agent_id, seq, now, &mut out)?;
    let payload = out.split_off(placed.payload.start);
    Ok(Stored {
        topic: placed.topic,
        // What is left is the key, written from `str`s.
        key: String::from_utf8(out).unwrap_or_else(|_| draft.body.key(agent_id)),
        device_id: draft.device_id.clone(),
        seq,
        ingested_ms: placed.ingested_ms,
        payload,
    })
}

/// Where [`stamp_onto`] wrote a record, as ranges of the buffer it wrote to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Which configured topic it goes to.
    pub topic: TopicKind,
    /// Its Kafka key ([`Body::key`]).
    pub key: std::ops::Range<usize>,
    /// Its wire message (JSON).
    pub payload: std::ops::Range<usize>,
    /// Unix milliseconds at ingest.
    pub ingested_ms: u64,
}

/// As [`stamp`], written onto the end of `out`: the key, then the wire message. A caller
/// stamping many records lays them all out in one buffer this way, with no allocation
/// per record. On an error `out` is as it was.
pub fn stamp_onto(
    draft: &Draft,
    agent_id: &str,
    seq: u64,
    now: SystemTime,
    out: &mut Vec<u8>,
) -> Result<Placed, EncodeError> {
    let now = crate::time::checked(now).unwrap_or(SystemTime::UNIX_EPOCH);
    let (time, source_time_rejected) = match draft.time {
        None => (now, false),
        Some(t) => match crate::time::checked(t) {
            Some(t) => (t, false),
            None => (now, true),
        },
    };
    let event_id = draft.event_id.unwrap_or_else(uuid::Uuid::new_v4);
    let mut id_buf = uuid::Uuid::encode_buffer();
    let wire = Wire {
        body: &draft.body,
        timestamp: Rfc3339Millis::new(time),
        agent_id,
        device_id: &draft.device_id,
        seq,
        event_id: event_id.hyphenated().encode_lower(&mut id_buf),
        schema_version: SCHEMA_VERSION,
        source_time_rejected,
        run: draft.run.as_deref(),
    };
    let start = out.len();
    for part in draft.body.key_parts(agent_id) {
        out.extend_from_slice(part.as_bytes());
    }
    let key = start..out.len();
    if let Err(e) = write_wire(&wire, out) {
        out.truncate(start);
        return Err(EncodeError::Json(draft.body.type_name(), e));
    }
    Ok(Placed {
        topic: draft.body.topic(),
        payload: key.end..out.len(),
        key,
        ingested_ms: unix_ms(now),
    })
}

/// Writes the wire message as `serde_json::to_writer(out, wire)` does. A sensor reading
/// outside a run (the record sensors send at their full rate) is written field by
/// field, without serde's flattening of the body into the envelope; the same bytes
/// (tested below).
fn write_wire(wire: &Wire<'_>, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let (
        Body::SensorReading {
            sensor_id,
            sensor_type,
            value,
            unit,
            location,
            metadata,
        },
        None,
    ) = (wire.body, wire.run)
    else {
        return serde_json::to_writer(&mut *out, wire);
    };
    out.extend_from_slice(br#"{"type":"sensor_reading","sensor_id":"#);
    serde_json::to_writer(&mut *out, sensor_id)?;
    out.extend_from_slice(br#","sensor_type":"#);
    serde_json::to_writer(&mut *out, sensor_type)?;
    out.extend_from_slice(br#","value":"#);
    serde_json::to_writer(&mut *out, value)?;
    out.extend_from_slice(br#","unit":"#);
    serde_json::to_writer(&mut *out, unit)?;
    if let Some(location) = location {
        out.extend_from_slice(br#","location":"#);
        serde_json::to_writer(&mut *out, location)?;
    }
    out.extend_from_slice(br#","metadata":"#);
    serde_json::to_writer(&mut *out, metadata)?;
    out.extend_from_slice(br#","timestamp":""#);
    out.extend_from_slice(&wire.timestamp.text());
    out.extend_from_slice(br#"","agent_id":"#);
    serde_json::to_writer(&mut *out, wire.agent_id)?;
    out.extend_from_slice(br#","device_id":"#);
    serde_json::to_writer(&mut *out, wire.device_id)?;
    out.extend_from_slice(br#","seq":"#);
    serde_json::to_writer(&mut *out, &wire.seq)?;
    out.extend_from_slice(br#","event_id":"#);
    serde_json::to_writer(&mut *out, wire.event_id)?;
    out.extend_from_slice(br#","schema_version":"#);
    serde_json::to_writer(&mut *out, &wire.schema_version)?;
    if wire.source_time_rejected {
        out.extend_from_slice(br#","source_time_rejected":true"#);
    }
    out.push(b'}');
    Ok(())
}

/// Unix milliseconds (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix microseconds (0 before the epoch).
pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Shorthand for a JSON object literal built from pairs.
pub fn object<const N: usize>(
    pairs: [(&str, serde_json::Value); N],
) -> serde_json::Map<String, serde_json::Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamped_onto_a_shared_buffer_a_record_reads_as_stamped_alone() {
        let reading = |sensor: &str| Draft {
            event_id: Some(uuid::Uuid::from_u128(7)),
            run: None,
            device_id: "env-1".into(),
            time: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_705_314_600_000)),
            body: Body::SensorReading {
                sensor_id: sensor.into(),
                sensor_type: "temperature".into(),
                value: 21.5,
                unit: "°C".into(),
                location: None,
                metadata: BTreeMap::new(),
            },
        };
        let now = SystemTime::now();
        let mut out = b"already here".to_vec();
        let a = stamp_onto(&reading("t-1"), "a1", 3, now, &mut out).unwrap();
        let b = stamp_onto(&reading("t-2"), "a1", 4, now, &mut out).unwrap();
        assert_eq!(&out[..12], b"already here", "what was there stays");
        for (placed, sensor, seq) in [(a, "t-1", 3), (b, "t-2", 4)] {
            let alone = stamp(&reading(sensor), "a1", seq, now).unwrap();
            assert_eq!(out[placed.key.clone()], *alone.key.as_bytes());
            assert_eq!(alone.key, format!("temperature:{sensor}"));
            assert_eq!(out[placed.payload.clone()], alone.payload[..]);
            assert_eq!(placed.topic, alone.topic);
            assert_eq!(placed.ingested_ms, alone.ingested_ms);
        }
    }

    #[test]
    fn experiment_event_has_users_shape_plus_envelope() {
        let d = Draft {
            event_id: None,
            run: None,
            device_id: "pstat-1".into(),
            time: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_705_314_600_000)),
            body: Body::ExperimentEvent {
                event: "step_completed".into(),
                experiment_id: "exp_001".into(),
                data: object([("step_index", 2.into()), ("step_name", "CV".into())]),
            },
        };
        let s = stamp(&d, "lab-pc-1", 7, SystemTime::now()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.payload).unwrap();
        assert_eq!(v["type"], "experiment_event");
        assert_eq!(v["event"], "step_completed");
        assert_eq!(v["timestamp"], "2024-01-15T10:30:00.000Z");
        assert_eq!(v["experiment_id"], "exp_001");
        assert_eq!(v["data"]["step_index"], 2);
        assert_eq!(v["agent_id"], "lab-pc-1");
        assert_eq!(v["device_id"], "pstat-1");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
        assert_eq!(v["event_id"].as_str().unwrap().len(), 36);
        assert_eq!(s.key, "exp_001");
        assert_eq!(s.topic, TopicKind::Events);
    }

    #[test]
    fn an_impossible_source_time_falls_back_to_the_receive_time_and_is_flagged() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_705_314_600_000);
        for bad in [
            SystemTime::UNIX_EPOCH - Duration::from_secs(60),
            SystemTime::UNIX_EPOCH + Duration::from_millis(253_402_300_800_000),
            SystemTime::UNIX_EPOCH + Duration::from_secs(9_000_000_000_000),
        ] {
            let d = Draft {
                time: Some(bad),
                ..Draft::agent_event("x", serde_json::Map::new())
            };
            let s = stamp(&d, "a", 0, now).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&s.payload).unwrap();
            assert_eq!(v["timestamp"], "2024-01-15T10:30:00.000Z");
            assert_eq!(v["source_time_rejected"], true);
        }
        let ok = stamp(
            &Draft::agent_event("x", serde_json::Map::new()),
            "a",
            0,
            now,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&ok.payload).unwrap();
        assert!(v.get("source_time_rejected").is_none());
    }

    #[test]
    fn points_leave_out_what_the_instrument_did_not_send() {
        let eis = Point {
            f: Some(100.0),
            z_re: Some(9885.956),
            z_im: Some(2.9946),
            ..Point::tei(1.5, f64::NAN, f64::NAN)
        };
        let v = serde_json::to_value(eis).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"t": 1.5, "f": 100.0, "z_re": 9885.956, "z_im": 2.9946})
        );
        let cv = serde_json::to_value(Point {
            status: 4,
            ..Point::tei(0.1, 0.2, 3e-6)
        })
        .unwrap();
        assert_eq!(
            cv,
            serde_json::json!({"t": 0.1, "e": 0.2, "i": 3e-6, "status": 4})
        );
    }

    #[test]
    fn sensor_reading_is_keyed_by_type_and_id() {
        let body = Body::SensorReading {
            sensor_id: "temp-001".into(),
            sensor_type: "temperature".into(),
            value: 22.4,
            unit: "°C".into(),
            location: Some("Building A".into()),
            metadata: BTreeMap::new(),
        };
        assert_eq!(body.key("a"), "temperature:temp-001");
        assert_eq!(body.topic(), TopicKind::Sensors);
    }

    #[test]
    fn stored_round_trips_through_cbor_with_compact_payload() {
        let s = Stored {
            topic: TopicKind::Data,
            key: "k".into(),
            device_id: "d".into(),
            seq: 1,
            ingested_ms: 2,
            payload: vec![7; 200],
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&s, &mut buf).unwrap();
        // Field names cost ~50 bytes; a payload encoded as an array of integers would
        // take ~400 bytes for these 200.
        assert!(
            buf.len() < 280,
            "payload must be a byte string, not an array: {}",
            buf.len()
        );
        let back: Stored = ciborium::from_reader(buf.as_slice()).unwrap();
        assert_eq!(back, s);
    }

    /// Times from 1970 to 9999, near second boundaries often, in any order.
    fn any_time() -> impl proptest::strategy::Strategy<Value = SystemTime> {
        use proptest::prelude::*;
        (0u64..=crate::time::MAX_UNIX_MS / 1000, 0u32..1_000_000_000)
            .prop_map(|(s, n)| SystemTime::UNIX_EPOCH + Duration::new(s, n))
    }

    proptest::proptest! {
        #[test]
        fn the_kept_second_writes_what_humantime_writes(
            times in proptest::collection::vec(any_time(), 1..20),
            step_ns in 0u64..3_000_000_000,
        ) {
            for t in times {
                // The time, then one nearby (often in the same second: the kept text).
                for t in [t, crate::time::clamp(t + Duration::from_nanos(step_ns))] {
                    let ours = rfc3339_millis(t);
                    let theirs = humantime::format_rfc3339_millis(t).to_string();
                    proptest::prop_assert_eq!(std::str::from_utf8(&ours).unwrap(), theirs);
                }
            }
        }

        #[test]
        fn a_reading_written_field_by_field_is_what_serde_writes(
            sensor_id in ".{0,12}",
            sensor_type in r#"[a-z_\\"\x00-\x1f\x7fé]{0,10}"#,
            value in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO,
            unit in ".{0,4}",
            location in proptest::option::of(".{0,8}"),
            metadata in proptest::collection::btree_map(".{0,6}", proptest::prelude::any::<i64>(), 0..3),
            time in any_time(),
            rejected in proptest::prelude::any::<bool>(),
            seq in proptest::prelude::any::<u64>(),
            agent_id in ".{0,10}",
            device_id in ".{0,10}",
        ) {
            let body = Body::SensorReading {
                sensor_id,
                sensor_type,
                value,
                unit,
                location,
                metadata: metadata.into_iter().map(|(k, v)| (k, v.into())).collect(),
            };
            let wire = Wire {
                body: &body,
                timestamp: Rfc3339Millis::new(time),
                agent_id: &agent_id,
                device_id: &device_id,
                seq,
                event_id: "0b7e0d4c-3c1a-4f2e-9a55-1f7d2a9c8e01",
                schema_version: SCHEMA_VERSION,
                source_time_rejected: rejected,
                run: None,
            };
            let mut ours = b"before".to_vec();
            write_wire(&wire, &mut ours).unwrap();
            let theirs = serde_json::to_vec(&wire).unwrap();
            proptest::prop_assert_eq!(
                String::from_utf8_lossy(&ours[6..]),
                String::from_utf8_lossy(&theirs)
            );
        }
    }
}
