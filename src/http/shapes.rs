//! The ingest API's message shapes: the seed application's `experiment_event`,
//! `echem_data` and sensor reading, as lab software already writes them, checked field
//! by field and turned into [`Draft`]s. Pure: no I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::record::{usable_value, valid_id, Body, Draft, Point, RunMeta};

/// Which endpoint a message came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/events`: `experiment_event`.
    Event,
    /// `POST /v1/data`: `echem_data`.
    Data,
    /// `POST /v1/readings`: a sensor reading.
    Reading,
}

impl Kind {
    /// The `type` the message may carry.
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Event => "experiment_event",
            Kind::Data => "echem_data",
            Kind::Reading => "sensor_reading",
        }
    }

    fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Event => &[
                "event",
                "experiment_id",
                "data",
                "sample",
                "operator",
                "eln_ref",
                "metadata",
            ],
            Kind::Data => &[
                "technique",
                "experiment_id",
                "step_index",
                "points",
                "sample",
                "operator",
                "eln_ref",
                "metadata",
            ],
            Kind::Reading => &[
                "sensor_id",
                "sensor_type",
                "value",
                "unit",
                "location",
                "metadata",
            ],
        }
    }
}

/// Fields every message may carry: its type and time, the caller's event id, and the
/// envelope the agent writes itself (ignored; `device_id` must be the caller's).
const COMMON: &[&str] = &["type", "timestamp", "event_id"];
const ENVELOPE: &[&str] = &["agent_id", "device_id", "seq", "schema_version"];

/// A field that cannot be used, and why (the 400 answer's body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field (`points[3].e`), or `body` for the message as a whole.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// One message, checked.
#[derive(Debug)]
pub struct Message {
    /// The record to buffer (its run description not yet attached when it has none of
    /// its own; the caller looks the run up).
    pub draft: Draft,
    /// The run it belongs to (events and data).
    pub experiment_id: Option<String>,
    /// What the message itself said about its run.
    pub meta: Option<Arc<RunMeta>>,
    /// Its event (events only), to see a run's end.
    pub event: Option<String>,
}

/// Text fields other than ids are at most this long.
const MAX_TEXT: usize = 256;
/// Points per data message at most.
pub const MAX_POINTS: usize = 100_000;

fn string<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    max: usize,
) -> Result<Option<&'a str>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max && !s.chars().any(char::is_control) => {
            Ok(Some(s))
        }
        Some(Value::String(_)) => Err(bad(
            key,
            format!("must be at most {max} characters, without control characters"),
        )),
        Some(_) => Err(bad(key, "must be a string")),
    }
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str, max: usize) -> Result<&'a str, FieldError> {
    match string(obj, key, max)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(bad(key, "is required")),
    }
}

fn id_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, FieldError> {
    let s = required(obj, key, 64)?;
    if valid_id(s) {
        Ok(s)
    } else {
        Err(bad(
            key,
            "must be 1-64 characters of letters, digits, '-', '_' or '.' (it goes into Kafka keys)",
        ))
    }
}

fn number(v: &Value, field: &str) -> Result<f64, FieldError> {
    match v.as_f64() {
        Some(x) if usable_value(x) => Ok(x),
        Some(_) => Err(bad(field, "must be a finite number within ±1e100")),
        None => Err(bad(field, "must be a number")),
    }
}

fn time(obj: &Map<String, Value>) -> Result<Option<SystemTime>, FieldError> {
    match obj.get("timestamp") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => crate::time::parse_rfc3339(s).map(Some).ok_or_else(|| {
            bad(
                "timestamp",
                "must be an RFC 3339 time between 1970 and 9999 (2024-01-15T10:30:00.000Z)",
            )
        }),
        Some(Value::Number(n)) => n
            .as_f64()
            .and_then(crate::time::from_unix_secs_f64)
            .map(Some)
            .ok_or_else(|| {
                bad(
                    "timestamp",
                    "as a number: Unix seconds between 1970 and 9999",
                )
            }),
        Some(_) => Err(bad(
            "timestamp",
            "must be an RFC 3339 string or Unix seconds",
        )),
    }
}

fn event_id(obj: &Map<String, Value>) -> Result<Option<uuid::Uuid>, FieldError> {
    match obj.get("event_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => uuid::Uuid::parse_str(s).map(Some).map_err(|_| {
            bad(
                "event_id",
                "must be a UUID (550e8400-e29b-41d4-a716-446655440000)",
            )
        }),
        Some(_) => Err(bad("event_id", "must be a UUID string")),
    }
}

fn point(v: &Value, n: usize) -> Result<Point, FieldError> {
    let f = |k: &str| format!("points[{n}].{k}");
    let Value::Object(o) = v else {
        return Err(bad(
            format!("points[{n}]"),
            "must be an object {\"t\":…,\"e\":…,\"i\":…}",
        ));
    };
    let mut p = Point::tei(f64::NAN, f64::NAN, f64::NAN);
    for (k, v) in o {
        match k.as_str() {
            "t" => p.t = number(v, &f("t"))?,
            "e" => p.e = number(v, &f("e"))?,
            "i" => p.i = number(v, &f("i"))?,
            "f" => p.f = Some(number(v, &f("f"))?),
            "z_re" => p.z_re = Some(number(v, &f("z_re"))?),
            "z_im" => p.z_im = Some(number(v, &f("z_im"))?),
            "status" => {
                p.status = v
                    .as_u64()
                    .and_then(|s| u8::try_from(s).ok())
                    .ok_or_else(|| bad(f("status"), "must be an integer 0-255"))?
            }
            other => {
                return Err(bad(
                    f(other),
                    "unknown field; a point has t, e, i, and for EIS f, z_re, z_im; status",
                ))
            }
        }
    }
    if p.t.is_nan() {
        return Err(bad(f("t"), "is required (seconds since the step began)"));
    }
    Ok(p)
}

/// Checks one message sent to `kind`'s endpoint by the client writing as `device`.
pub fn parse(kind: Kind, v: &Value, device: &str) -> Result<Message, FieldError> {
    let Value::Object(obj) = v else {
        return Err(bad("body", "must be a JSON object"));
    };
    for k in obj.keys() {
        if !kind.fields().contains(&k.as_str())
            && !COMMON.contains(&k.as_str())
            && !ENVELOPE.contains(&k.as_str())
        {
            return Err(bad(
                k.clone(),
                format!(
                    "unknown field; {} takes {}",
                    kind.type_name(),
                    [kind.fields(), COMMON].concat().join(", ")
                ),
            ));
        }
    }
    match obj.get("type") {
        None => {}
        Some(Value::String(t)) if t == kind.type_name() => {}
        Some(_) => {
            return Err(bad(
                "type",
                format!("must be {:?} on this endpoint", kind.type_name()),
            ))
        }
    }
    match obj.get("device_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) if d == device => {}
        Some(_) => {
            return Err(bad(
                "device_id",
                format!("this client's records are device {device:?}; leave device_id out"),
            ))
        }
    }
    let time = time(obj)?;
    let event_id = event_id(obj)?;
    let mut run_fields: Map<String, Value> = if kind == Kind::Reading {
        Map::new()
    } else {
        ["experiment_id", "sample", "operator", "eln_ref", "metadata"]
            .iter()
            .filter_map(|k| {
                obj.get(*k)
                    .filter(|v| !v.is_null())
                    .map(|v| (k.to_string(), v.clone()))
            })
            .collect()
    };
    let spec = crate::runs::take_run(&mut run_fields).map_err(|e| bad(e.field, e.reason))?;
    let (body, experiment_id, event) = match kind {
        Kind::Event => {
            let experiment_id = spec
                .experiment_id
                .clone()
                .ok_or_else(|| bad("experiment_id", "is required"))?;
            let event = id_field(obj, "event")?.to_string();
            let data = match obj.get("data") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(_) => return Err(bad("data", "must be a JSON object")),
            };
            (
                Body::ExperimentEvent {
                    event: event.clone(),
                    experiment_id: experiment_id.clone(),
                    data,
                },
                Some(experiment_id),
                Some(event),
            )
        }
        Kind::Data => {
            let experiment_id = spec
                .experiment_id
                .clone()
                .ok_or_else(|| bad("experiment_id", "is required"))?;
            let technique = required(obj, "technique", 32)?.to_string();
            let step_index = match obj.get("step_index") {
                None | Some(Value::Null) => 0,
                Some(v) => v
                    .as_u64()
                    .and_then(|s| u32::try_from(s).ok())
                    .ok_or_else(|| bad("step_index", "must be a non-negative integer"))?,
            };
            let Some(Value::Array(list)) = obj.get("points") else {
                return Err(bad(
                    "points",
                    "is required: a list of {\"t\":…,\"e\":…,\"i\":…}",
                ));
            };
            if list.len() > MAX_POINTS {
                return Err(bad(
                    "points",
                    format!("at most {MAX_POINTS} points a message"),
                ));
            }
            let points = list
                .iter()
                .enumerate()
                .map(|(n, p)| point(p, n))
                .collect::<Result<Vec<_>, _>>()?;
            (
                Body::EchemData {
                    technique,
                    experiment_id: experiment_id.clone(),
                    step_index,
                    scan: None,
                    applied: Vec::new(),
                    points,
                },
                Some(experiment_id),
                None,
            )
        }
        Kind::Reading => {
            let sensor_id = id_field(obj, "sensor_id")?.to_string();
            let sensor_type = id_field(obj, "sensor_type")?.to_string();
            let value = number(
                obj.get("value")
                    .ok_or_else(|| bad("value", "is required"))?,
                "value",
            )?;
            let unit = string(obj, "unit", 32)?.unwrap_or("").to_string();
            let location = string(obj, "location", MAX_TEXT)?.map(str::to_string);
            let metadata: BTreeMap<String, Value> = match obj.get("metadata") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(Value::Object(m)) => m.clone().into_iter().collect(),
                Some(_) => return Err(bad("metadata", "must be a JSON object")),
            };
            (
                Body::SensorReading {
                    sensor_id,
                    sensor_type,
                    value,
                    unit,
                    location,
                    metadata,
                },
                None,
                None,
            )
        }
    };
    let draft = Draft {
        device_id: device.to_string(),
        time: time.or_else(|| Some(SystemTime::now())),
        body,
        event_id,
        run: spec.meta.clone(),
    };
    Ok(Message {
        draft,
        experiment_id,
        meta: spec.meta,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_seed_shapes_parse_as_they_are() {
        let m = parse(
            Kind::Event,
            &json!({"type": "experiment_event", "event": "experiment_started",
                "timestamp": "2024-01-15T10:30:00.000Z", "experiment_id": "exp_001",
                "data": {"program": "CV", "steps": 5}, "sample": "S-1"}),
            "lab-app",
        )
        .unwrap();
        assert_eq!(m.experiment_id.as_deref(), Some("exp_001"));
        assert_eq!(m.event.as_deref(), Some("experiment_started"));
        assert_eq!(m.meta.unwrap().sample.as_deref(), Some("S-1"));
        assert_eq!(m.draft.device_id, "lab-app");

        let m = parse(
            Kind::Data,
            &json!({"type": "echem_data", "technique": "CV", "experiment_id": "exp_001",
                "step_index": 2, "points": [{"t": 0.0, "e": 0.0, "i": 1.5e-6}]}),
            "lab-app",
        )
        .unwrap();
        let Body::EchemData {
            points, step_index, ..
        } = &m.draft.body
        else {
            panic!()
        };
        assert_eq!((points.len(), *step_index), (1, 2));
        assert_eq!(points[0].i, 1.5e-6);

        let id = "550e8400-e29b-41d4-a716-446655440000";
        let m = parse(
            Kind::Reading,
            &json!({"event_id": id, "sensor_id": "temp-001", "sensor_type": "temperature",
                "value": 22.4, "unit": "°C", "timestamp": "2024-01-15T10:30:00Z",
                "location": "Building A, Floor 1", "metadata": {}}),
            "lab-app",
        )
        .unwrap();
        assert_eq!(m.draft.event_id.unwrap().to_string(), id);
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[ -~]{0,80}".prop_map(Value::from),
            Just(Value::from("x".repeat(300))),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            let keys = prop_oneof![
                Just("t".to_string()),
                Just("e".to_string()),
                Just("i".to_string()),
                Just("points".to_string()),
                Just("experiment_id".to_string()),
                Just("event".to_string()),
                Just("timestamp".to_string()),
                Just("event_id".to_string()),
                Just("metadata".to_string()),
                Just("value".to_string()),
                Just("sensor_id".to_string()),
                Just("step_index".to_string()),
                Just("status".to_string()),
                "[a-z_]{1,8}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(keys, inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn no_body_panics_the_parser(v in any_json()) {
            for kind in [Kind::Event, Kind::Data, Kind::Reading] {
                if let Ok(m) = parse(kind, &v, "lab-app") {
                    // What is taken can be stamped and is valid JSON.
                    let s = crate::record::stamp(&m.draft, "a", 0, SystemTime::now()).unwrap();
                    let _: Value = serde_json::from_slice(&s.payload).unwrap();
                }
            }
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (Kind::Event, json!([1]), "body"),
            (Kind::Event, json!({"event": "x"}), "experiment_id"),
            (
                Kind::Event,
                json!({"event": "x", "experiment_id": "a b"}),
                "experiment_id",
            ),
            (Kind::Event, json!({"experiment_id": "e"}), "event"),
            (
                Kind::Event,
                json!({"event": "x", "experiment_id": "e", "data": 3}),
                "data",
            ),
            (
                Kind::Event,
                json!({"event": "x", "experiment_id": "e", "colour": 3}),
                "colour",
            ),
            (
                Kind::Event,
                json!({"type": "echem_data", "event": "x", "experiment_id": "e"}),
                "type",
            ),
            (
                Kind::Event,
                json!({"event": "x", "experiment_id": "e", "timestamp": "yesterday"}),
                "timestamp",
            ),
            (
                Kind::Event,
                json!({"event": "x", "experiment_id": "e", "event_id": "42"}),
                "event_id",
            ),
            (
                Kind::Event,
                json!({"event": "x", "experiment_id": "e", "device_id": "other"}),
                "device_id",
            ),
            (
                Kind::Data,
                json!({"technique": "CV", "experiment_id": "e"}),
                "points",
            ),
            (
                Kind::Data,
                json!({"technique": "CV", "experiment_id": "e", "points": [{"t": 0, "e": "x"}]}),
                "points[0].e",
            ),
            (
                Kind::Data,
                json!({"technique": "CV", "experiment_id": "e", "points": [{"e": 1}]}),
                "points[0].t",
            ),
            (
                Kind::Data,
                json!({"technique": "CV", "experiment_id": "e", "points": [{"t": 0}, {"t": 1, "q": 1}]}),
                "points[1].q",
            ),
            (
                Kind::Data,
                json!({"technique": "CV", "experiment_id": "e", "points": [{"t": 1e300}]}),
                "points[0].t",
            ),
            (
                Kind::Data,
                json!({"technique": "CV", "experiment_id": "e", "step_index": -1, "points": []}),
                "step_index",
            ),
            (
                Kind::Reading,
                json!({"sensor_id": "s", "sensor_type": "t"}),
                "value",
            ),
            (
                Kind::Reading,
                json!({"sensor_id": "s:1", "sensor_type": "t", "value": 1}),
                "sensor_id",
            ),
        ];
        for (kind, v, field) in cases {
            let e = parse(kind, &v, "lab-app").unwrap_err();
            assert_eq!(e.field, field, "{v}: {e}");
        }
    }
}
