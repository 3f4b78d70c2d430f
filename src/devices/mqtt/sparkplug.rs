//! Sparkplug B (`spBv1.0/<group>/<type>/<edge node>[/<device>]`, protobuf payloads), as
//! a host application reads it: BIRTH alias tables per node and device, DATA metrics by
//! alias or name, `seq` checked (0–255, wrapping; a gap asks the node for a rebirth),
//! `bdSeq` matched between NBIRTH and NDEATH so a stale death certificate is ignored.
//!
//! Units are not standardised by Sparkplug; a metric property `engUnit` (Ignition's
//! name) or `unit` in the BIRTH gives one.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use prost::Message;

use super::types::{Mapped, Note, Outgoing, Reading};
use crate::record::object;

/// The Sparkplug B topic namespace.
pub const NAMESPACE: &str = "spBv1.0";

/// `org.eclipse.tahu.protobuf.Payload` (proto2), the fields an agent needs.
#[derive(Clone, PartialEq, Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    /// When the payload was made, ms since the epoch.
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    /// The metrics carried.
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    /// Sequence number 0–255, to notice lost messages.
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    /// Free identifier of the payload.
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    /// Opaque bytes.
    pub body: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
/// One Sparkplug metric: a name (or alias from the birth), a type and a value.
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    /// The metric's name (births always carry it).
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    /// The alias later messages may use instead of the name.
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    /// When it was measured, ms since the epoch.
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    /// A Sparkplug DataType code (see [`datatype`]).
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    /// A value from the past (store-and-forward), not the current one.
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    /// Not to be stored.
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    /// The value is null.
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    /// Properties such as the engineering unit.
    pub properties: Option<PropertySet>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    /// The value.
    pub value: Option<MetricValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
/// A metric's value, as the protobuf oneof carries it.
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    /// 8/16/32-bit integers (signed ones two's-complement).
    Int(u32),
    #[prost(uint64, tag = "11")]
    /// 64-bit integers.
    Long(u64),
    #[prost(float, tag = "12")]
    /// Float.
    Float(f32),
    #[prost(double, tag = "13")]
    /// Double.
    Double(f64),
    #[prost(bool, tag = "14")]
    /// Boolean.
    Boolean(bool),
    #[prost(string, tag = "15")]
    /// String or text.
    String(String),
    #[prost(bytes = "vec", tag = "16")]
    /// Bytes or a file.
    Bytes(Vec<u8>),
}

#[derive(Clone, PartialEq, Message)]
/// Named properties of a metric (`engUnit`, say).
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    /// Property names.
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    /// Their values, in the same order.
    pub values: Vec<PropertyValue>,
}

#[derive(Clone, PartialEq, Message)]
/// One property value.
pub struct PropertyValue {
    #[prost(uint32, optional, tag = "1")]
    /// A Sparkplug DataType code.
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    /// The value is null.
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyValueValue", tags = "3, 4, 5, 6, 7, 8")]
    /// The value.
    pub value: Option<PropertyValueValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
/// A property's value, as the protobuf oneof carries it.
pub enum PropertyValueValue {
    #[prost(uint32, tag = "3")]
    /// 8/16/32-bit integers.
    Int(u32),
    #[prost(uint64, tag = "4")]
    /// 64-bit integers.
    Long(u64),
    #[prost(float, tag = "5")]
    /// Float.
    Float(f32),
    #[prost(double, tag = "6")]
    /// Double.
    Double(f64),
    #[prost(bool, tag = "7")]
    /// Boolean.
    Boolean(bool),
    #[prost(string, tag = "8")]
    /// String or text.
    String(String),
}

/// Sparkplug DataType codes used here.
pub mod datatype {
    /// Int8.
    pub const INT8: u32 = 1;
    /// Int16.
    pub const INT16: u32 = 2;
    /// Int32.
    pub const INT32: u32 = 3;
    /// Int64.
    pub const INT64: u32 = 4;
    /// UInt8.
    pub const UINT8: u32 = 5;
    /// UInt16.
    pub const UINT16: u32 = 6;
    /// UInt32.
    pub const UINT32: u32 = 7;
    /// UInt64.
    pub const UINT64: u32 = 8;
    /// Float.
    pub const FLOAT: u32 = 9;
    /// Double.
    pub const DOUBLE: u32 = 10;
    /// Boolean.
    pub const BOOLEAN: u32 = 11;
    /// String.
    pub const STRING: u32 = 12;
}

impl Metric {
    /// A named metric with a value (for BIRTHs and commands).
    pub fn new(name: &str, alias: Option<u64>, value: MetricValue, datatype: u32) -> Metric {
        Metric {
            name: Some(name.to_string()),
            alias,
            datatype: Some(datatype),
            value: Some(value),
            ..Default::default()
        }
    }

    /// A string property (e.g. `engUnit`).
    pub fn with_property(mut self, key: &str, value: &str) -> Metric {
        let p = self.properties.get_or_insert_with(PropertySet::default);
        p.keys.push(key.to_string());
        p.values.push(PropertyValue {
            r#type: Some(datatype::STRING),
            is_null: None,
            value: Some(PropertyValueValue::String(value.to_string())),
        });
        self
    }

    fn property(&self, key: &str) -> Option<&PropertyValueValue> {
        let p = self.properties.as_ref()?;
        let i = p.keys.iter().position(|k| k == key)?;
        p.values.get(i)?.value.as_ref()
    }

    fn unit(&self) -> Option<String> {
        ["engUnit", "unit", "EngUnit", "Unit"]
            .iter()
            .find_map(|k| match self.property(k) {
                Some(PropertyValueValue::String(s)) => Some(s.clone()),
                _ => None,
            })
    }
}

/// A metric's value as a number, by its datatype (Sparkplug puts signed integers in
/// unsigned fields, two's complement). Strings, bytes and datasets are not numbers.
pub fn number(datatype: u32, v: &MetricValue) -> Option<f64> {
    use datatype::*;
    Some(match (datatype, v) {
        (INT8, MetricValue::Int(x)) => f64::from(*x as u8 as i8),
        (INT16, MetricValue::Int(x)) => f64::from(*x as u16 as i16),
        (INT32, MetricValue::Int(x)) => f64::from(*x as i32),
        (INT64, MetricValue::Long(x)) => *x as i64 as f64,
        (_, MetricValue::Int(x)) => f64::from(*x),
        (_, MetricValue::Long(x)) => *x as f64,
        (_, MetricValue::Float(x)) => f64::from(*x),
        (_, MetricValue::Double(x)) => *x,
        (_, MetricValue::Boolean(b)) => f64::from(u8::from(*b)),
        _ => return None,
    })
    .filter(|x| crate::record::usable_value(*x))
}

#[derive(Debug, Clone, Default)]
struct MetricInfo {
    name: String,
    datatype: u32,
    unit: String,
}

#[derive(Debug, Default)]
struct Node {
    bd_seq: Option<u64>,
    last_seq: Option<u64>,
    online: bool,
    /// Alias tables and metric facts, of the node ("") and of each device.
    aliases: HashMap<String, HashMap<u64, MetricInfo>>,
    by_name: HashMap<String, HashMap<String, MetricInfo>>,
    last_rebirth_request: Option<SystemTime>,
}

/// Host-side state of every edge node seen.
#[derive(Debug, Default)]
pub struct Host {
    nodes: HashMap<(String, String), Node>,
}

/// Rebirth requests to one node are at most this frequent.
const REBIRTH_EVERY: Duration = Duration::from_secs(5);

impl Host {
    /// Maps one message. Errors are malformed payloads (bad protobuf, an alias no BIRTH
    /// declared); the text says what.
    pub fn handle(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: SystemTime,
    ) -> Result<Mapped, String> {
        let mut out = Mapped::default();
        let levels: Vec<&str> = topic.split('/').collect();
        if levels.first() != Some(&NAMESPACE) || levels.get(1) == Some(&"STATE") {
            out.ignored = true;
            return Ok(out);
        }
        let (group, kind, node_id, device) = match levels.as_slice() {
            [_, g, k, n] => (*g, *k, *n, None),
            [_, g, k, n, d] => (*g, *k, *n, Some(*d)),
            _ => return Err(format!("not a Sparkplug B topic ({} levels)", levels.len())),
        };
        if matches!(kind, "NCMD" | "DCMD") {
            out.ignored = true;
            return Ok(out);
        }
        let p = Payload::decode(payload).map_err(|e| format!("not a Sparkplug B payload: {e}"))?;
        let key = (group.to_string(), node_id.to_string());
        let scope = device.unwrap_or("").to_string();
        let node = self.nodes.entry(key.clone()).or_default();
        let where_ = || {
            object([
                ("group", group.into()),
                ("edge_node", node_id.into()),
                (
                    "device",
                    device.map(Into::into).unwrap_or(serde_json::Value::Null),
                ),
            ])
        };
        match kind {
            "NBIRTH" => {
                node.aliases.clear();
                node.by_name.clear();
                node.online = true;
                node.bd_seq = bd_seq(&p);
                if p.seq.is_some_and(|s| s != 0) {
                    let mut d = where_();
                    d.insert("seq".into(), p.seq.into());
                    out.notes.push(Note::new("sparkplug_birth_seq_not_zero", d));
                }
                node.last_seq = p.seq;
                let mut d = where_();
                d.insert("bd_seq".into(), node.bd_seq.into());
                out.notes.push(Note::new("sparkplug_node_birth", d));
                learn(node, &scope, &p.metrics);
            }
            "DBIRTH" => {
                check_seq(node, &p, &mut out, where_);
                learn(node, &scope, &p.metrics);
            }
            "NDATA" | "DDATA" => check_seq(node, &p, &mut out, where_),
            "NDEATH" => {
                let bd = bd_seq(&p);
                let mut d = where_();
                d.insert("bd_seq".into(), bd.into());
                if node.bd_seq.is_some() && bd != node.bd_seq {
                    // The Will of an older session arriving after the new BIRTH.
                    out.notes
                        .push(Note::new("sparkplug_stale_death_ignored", d));
                } else {
                    node.online = false;
                    out.notes.push(Note::new("sparkplug_node_death", d));
                }
                return Ok(out);
            }
            "DDEATH" => {
                check_seq(node, &p, &mut out, where_);
                out.notes
                    .push(Note::new("sparkplug_device_death", where_()));
                return Ok(out);
            }
            other => return Err(format!("unknown Sparkplug message type {other:?}")),
        }
        let sensor_id = match device {
            Some(d) => format!("{group}/{node_id}/{d}"),
            None => format!("{group}/{node_id}"),
        };
        let mut unknown_alias = None;
        for m in &p.metrics {
            if m.is_null == Some(true) {
                continue;
            }
            let info = match (&m.name, m.alias) {
                (Some(n), _) => node
                    .by_name
                    .get(&scope)
                    .and_then(|t| t.get(n))
                    .cloned()
                    .unwrap_or_else(|| MetricInfo {
                        name: n.clone(),
                        datatype: m.datatype.unwrap_or(0),
                        unit: m.unit().unwrap_or_default(),
                    }),
                (None, Some(a)) => match node.aliases.get(&scope).and_then(|t| t.get(&a)) {
                    Some(i) => i.clone(),
                    None => {
                        unknown_alias = Some(a);
                        continue;
                    }
                },
                (None, None) => {
                    unknown_alias = Some(u64::MAX);
                    continue;
                }
            };
            if info.name == "bdSeq" || info.name.starts_with("Node Control/") {
                continue;
            }
            let dt = m.datatype.unwrap_or(info.datatype);
            let Some(value) = m.value.as_ref().and_then(|v| number(dt, v)) else {
                continue;
            };
            let ms = m.timestamp.or(p.timestamp);
            let mut metadata = BTreeMap::new();
            if let Some(s) = p.seq {
                metadata.insert("sparkplug_seq".to_string(), s.into());
            }
            if m.is_historical == Some(true) {
                metadata.insert("historical".to_string(), true.into());
            }
            if let Some(PropertyValueValue::Int(q)) = m.property("Quality") {
                metadata.insert("quality".to_string(), (*q as i32).into());
            }
            out.readings.push(Reading {
                sensor_id: sensor_id.clone(),
                sensor_type: info.name.clone(),
                value,
                unit: info.unit.clone(),
                time: ms.and_then(crate::time::from_unix_ms),
                metadata,
            });
        }
        if let Some(a) = unknown_alias {
            request_rebirth(node, &key, now, &mut out);
            return Err(if a == u64::MAX {
                format!("{kind}: a metric with neither name nor alias")
            } else {
                format!("{kind}: alias {a} was not declared by a BIRTH (rebirth requested)")
            });
        }
        if out.notes.iter().any(|n| n.event == "sparkplug_seq_gap") {
            request_rebirth(node, &key, now, &mut out);
        }
        Ok(out)
    }
}

/// The `bdSeq` metric of an NBIRTH or NDEATH.
fn bd_seq(p: &Payload) -> Option<u64> {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| m.value.as_ref())
        .and_then(|v| number(datatype::UINT64, v))
        .map(|x| x as u64)
}

fn learn(node: &mut Node, scope: &str, metrics: &[Metric]) {
    let aliases = node.aliases.entry(scope.to_string()).or_default();
    let names = node.by_name.entry(scope.to_string()).or_default();
    aliases.clear();
    names.clear();
    for m in metrics {
        let Some(name) = &m.name else { continue };
        let info = MetricInfo {
            name: name.clone(),
            datatype: m.datatype.unwrap_or(0),
            unit: m.unit().unwrap_or_default(),
        };
        if let Some(a) = m.alias {
            aliases.insert(a, info.clone());
        }
        names.insert(name.clone(), info);
    }
}

/// Every message of a node after its NBIRTH carries the previous seq + 1 (mod 256).
fn check_seq(
    node: &mut Node,
    p: &Payload,
    out: &mut Mapped,
    where_: impl Fn() -> serde_json::Map<String, serde_json::Value>,
) {
    let Some(seq) = p.seq else {
        let mut d = where_();
        d.insert("reason".into(), "message without seq".into());
        out.notes.push(Note::new("sparkplug_seq_gap", d));
        return;
    };
    if let Some(last) = node.last_seq {
        let expected = (last + 1) % 256;
        if seq != expected {
            let mut d = where_();
            d.insert("expected".into(), expected.into());
            d.insert("seq".into(), seq.into());
            out.notes.push(Note::new("sparkplug_seq_gap", d));
        }
    } else {
        let mut d = where_();
        d.insert("reason".into(), "data before any NBIRTH".into());
        out.notes.push(Note::new("sparkplug_seq_gap", d));
    }
    node.last_seq = Some(seq);
}

fn request_rebirth(node: &mut Node, key: &(String, String), now: SystemTime, out: &mut Mapped) {
    if node
        .last_rebirth_request
        .and_then(|t| now.duration_since(t).ok())
        .is_some_and(|d| d < REBIRTH_EVERY)
    {
        return;
    }
    node.last_rebirth_request = Some(now);
    out.publish.push(Outgoing {
        topic: format!("{NAMESPACE}/{}/NCMD/{}", key.0, key.1),
        payload: rebirth_payload(now),
    });
}

/// NCMD asking a node to publish its BIRTHs again.
pub fn rebirth_payload(now: SystemTime) -> Vec<u8> {
    Payload {
        timestamp: Some(crate::record::unix_ms(now)),
        metrics: vec![Metric::new(
            "Node Control/Rebirth",
            None,
            MetricValue::Boolean(true),
            datatype::BOOLEAN,
        )],
        ..Default::default()
    }
    .encode_to_vec()
}

/// A DCMD / NCMD writing one metric (an MQTT-controlled device's command).
pub fn command_payload(
    metric: &str,
    value: &toml::Value,
    now: SystemTime,
) -> Result<Vec<u8>, String> {
    let (v, dt) = match value {
        toml::Value::Boolean(b) => (MetricValue::Boolean(*b), datatype::BOOLEAN),
        toml::Value::Integer(i) => (MetricValue::Long(*i as u64), datatype::INT64),
        toml::Value::Float(f) => (MetricValue::Double(*f), datatype::DOUBLE),
        toml::Value::String(s) => (MetricValue::String(s.clone()), datatype::STRING),
        other => {
            return Err(format!(
                "a Sparkplug command value must be a boolean, number or string, not {}",
                other.type_str()
            ))
        }
    };
    Ok(Payload {
        timestamp: Some(crate::record::unix_ms(now)),
        metrics: vec![Metric {
            timestamp: Some(crate::record::unix_ms(now)),
            ..Metric::new(metric, None, v, dt)
        }],
        ..Default::default()
    }
    .encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// docs/protocols.md §6.1's hand-encoded DDATA vector.
    const VECTOR: &str = "08 80 d0 95 ff bc 31 12 18 0a 04 49 5f 77 65 18 80 d0 95 ff bc 31 20 0a 69 54 e4 10 71 73 2a b9 3e 18 01";

    fn bytes(hex: &str) -> Vec<u8> {
        hex.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn the_documented_ddata_vector_decodes_and_encodes_back() {
        let p = Payload::decode(bytes(VECTOR).as_slice()).unwrap();
        assert_eq!(p.timestamp, Some(1_700_000_000_000));
        assert_eq!(p.seq, Some(1));
        let m = &p.metrics[0];
        assert_eq!(m.name.as_deref(), Some("I_we"));
        assert_eq!(m.datatype, Some(datatype::DOUBLE));
        assert_eq!(m.value, Some(MetricValue::Double(1.5e-6)));
        assert_eq!(p.encode_to_vec(), bytes(VECTOR));
    }

    fn birth(seq: u64, bd: u64) -> Vec<u8> {
        Payload {
            timestamp: Some(1_000),
            seq: Some(seq),
            metrics: vec![
                Metric::new("bdSeq", None, MetricValue::Long(bd), datatype::UINT64),
                Metric::new(
                    "Node Control/Rebirth",
                    None,
                    MetricValue::Boolean(false),
                    datatype::BOOLEAN,
                ),
            ],
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn dbirth(seq: u64) -> Vec<u8> {
        Payload {
            timestamp: Some(2_000),
            seq: Some(seq),
            metrics: vec![
                Metric::new(
                    "temperature",
                    Some(1),
                    MetricValue::Float(21.5),
                    datatype::FLOAT,
                )
                .with_property("engUnit", "°C"),
                Metric::new(
                    "count",
                    Some(2),
                    MetricValue::Int(-3i32 as u32),
                    datatype::INT32,
                ),
            ],
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn ddata(seq: u64, alias: u64, v: f32) -> Vec<u8> {
        Payload {
            timestamp: Some(3_000),
            seq: Some(seq),
            metrics: vec![Metric {
                alias: Some(alias),
                timestamp: Some(3_500),
                value: Some(MetricValue::Float(v)),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn births_define_aliases_data_resolves_them_and_seq_is_checked() {
        let mut h = Host::default();
        let n = h
            .handle("spBv1.0/Lab1/NBIRTH/gw1", &birth(0, 3), at(0))
            .unwrap();
        assert!(
            n.readings.is_empty(),
            "bdSeq and Node Control are not readings"
        );
        assert_eq!(n.notes[0].event, "sparkplug_node_birth");
        let d = h
            .handle("spBv1.0/Lab1/DBIRTH/gw1/th1", &dbirth(1), at(0))
            .unwrap();
        assert_eq!(d.readings.len(), 2);
        assert_eq!(d.readings[1].value, -3.0, "Int32 is two's complement");
        let r = h
            .handle("spBv1.0/Lab1/DDATA/gw1/th1", &ddata(2, 1, 22.25), at(0))
            .unwrap();
        assert!(r.notes.is_empty() && r.publish.is_empty());
        let x = &r.readings[0];
        assert_eq!(x.sensor_id, "Lab1/gw1/th1");
        assert_eq!(x.sensor_type, "temperature");
        assert_eq!(x.unit, "°C");
        assert_eq!(x.value, 22.25);
        assert_eq!(x.time, Some(at(3_500)));
        // seq 255 wraps to 0; a jump is a gap and asks for a rebirth.
        let gap = h
            .handle("spBv1.0/Lab1/DDATA/gw1/th1", &ddata(7, 1, 1.0), at(0))
            .unwrap();
        assert_eq!(gap.notes[0].event, "sparkplug_seq_gap");
        assert_eq!(gap.publish[0].topic, "spBv1.0/Lab1/NCMD/gw1");
        let req = Payload::decode(gap.publish[0].payload.as_slice()).unwrap();
        assert_eq!(req.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
        // An alias nobody declared is malformed, not guessed.
        let e = h
            .handle("spBv1.0/Lab1/DDATA/gw1/th1", &ddata(8, 99, 1.0), at(0))
            .unwrap_err();
        assert!(e.contains("alias 99"), "{e}");
    }

    #[test]
    fn seq_wraps_and_a_stale_death_is_ignored() {
        let mut h = Host::default();
        h.handle("spBv1.0/G/NBIRTH/n", &birth(0, 5), at(0)).unwrap();
        h.handle("spBv1.0/G/DBIRTH/n/d", &dbirth(1), at(0)).unwrap();
        for s in 2..=255 {
            let r = h
                .handle("spBv1.0/G/DDATA/n/d", &ddata(s, 1, 1.0), at(0))
                .unwrap();
            assert!(r.notes.is_empty(), "seq {s}");
        }
        let r = h
            .handle("spBv1.0/G/DDATA/n/d", &ddata(0, 1, 1.0), at(0))
            .unwrap();
        assert!(r.notes.is_empty(), "255 wraps to 0");
        let death = |bd: u64| {
            Payload {
                metrics: vec![Metric::new(
                    "bdSeq",
                    None,
                    MetricValue::Long(bd),
                    datatype::UINT64,
                )],
                ..Default::default()
            }
            .encode_to_vec()
        };
        let stale = h.handle("spBv1.0/G/NDEATH/n", &death(4), at(0)).unwrap();
        assert_eq!(stale.notes[0].event, "sparkplug_stale_death_ignored");
        let real = h.handle("spBv1.0/G/NDEATH/n", &death(5), at(0)).unwrap();
        assert_eq!(real.notes[0].event, "sparkplug_node_death");
    }

    #[test]
    fn garbage_is_malformed_and_commands_encode() {
        let mut h = Host::default();
        assert!(h
            .handle("spBv1.0/G/NDATA/n", &[0xff, 0xff, 0xff], at(0))
            .is_err());
        assert!(h.handle("spBv1.0/G", b"", at(0)).is_err());
        assert!(
            h.handle("spBv1.0/STATE/host", b"{}", at(0))
                .unwrap()
                .ignored
        );
        let p = command_payload("Measurement/Pause", &toml::Value::Boolean(true), at(5)).unwrap();
        let back = Payload::decode(p.as_slice()).unwrap();
        assert_eq!(back.metrics[0].value, Some(MetricValue::Boolean(true)));
    }
}
