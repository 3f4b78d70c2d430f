//! Checks on what reached Kafka: schemas, envelopes, gap-free seqs.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::Msg;

/// Per device: the seqs seen, and for each seq the event_ids (duplicates must agree).
pub fn seqs_by_device(
    msgs: &[Msg],
) -> HashMap<String, std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>> {
    let mut out: HashMap<
        String,
        std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
    > = HashMap::new();
    for m in msgs {
        let dev = m.json["device_id"].as_str().expect("device_id").to_string();
        let seq = m.json["seq"].as_u64().expect("seq");
        let id = m.json["event_id"].as_str().expect("event_id").to_string();
        out.entry(dev)
            .or_default()
            .entry(seq)
            .or_default()
            .insert(id);
    }
    out
}

/// Asserts that every device's seqs are exactly 0..=max, and each seq has one event_id.
pub fn assert_gap_free(msgs: &[Msg]) {
    for (dev, seqs) in seqs_by_device(msgs) {
        let max = *seqs.keys().next_back().unwrap();
        assert_eq!(
            seqs.len() as u64,
            max + 1,
            "device {dev}: seqs have gaps (max {max}, have {})",
            seqs.len()
        );
        for (seq, ids) in &seqs {
            assert_eq!(
                ids.len(),
                1,
                "device {dev}: seq {seq} carries different event_ids {ids:?}"
            );
        }
    }
}

/// Validates a message against `schemas/<type>.json`; panics naming every violation.
pub fn assert_matches_schema(m: &Msg) {
    use std::sync::OnceLock;
    static SCHEMAS: OnceLock<HashMap<String, jsonschema::Validator>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut out = HashMap::new();
        for e in std::fs::read_dir(&dir).expect("schemas dir") {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            out.insert(name, jsonschema::validator_for(&v).expect("valid schema"));
        }
        out
    });
    let ty = m.json["type"].as_str().expect("message has a type");
    let v = schemas
        .get(ty)
        .unwrap_or_else(|| panic!("no schema for type {ty}"));
    let errors: Vec<String> = v
        .iter_errors(&m.json)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{ty} message violates its schema: {errors:?}\n{}",
        m.json
    );
}

/// Checks headers and keys as the README's "Messages" section describes them.
pub fn assert_envelope(m: &Msg, agent_id: &str) {
    assert_eq!(
        m.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        m.headers.get("schema-version").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        m.headers.get("agent-id").map(String::as_str),
        Some(agent_id)
    );
    assert_eq!(
        m.headers.get("device-id"),
        m.json["device_id"].as_str().map(str::to_string).as_ref()
    );
    assert_eq!(m.json["agent_id"], agent_id);
    let expected_key = match m.json["type"].as_str().unwrap() {
        "experiment_event" | "echem_data" => m.json["experiment_id"].as_str().unwrap().to_string(),
        "sensor_reading" => format!(
            "{}:{}",
            m.json["sensor_type"].as_str().unwrap(),
            m.json["sensor_id"].as_str().unwrap()
        ),
        "command_result" => m.json["command_id"].as_str().unwrap().to_string(),
        "alert" => m.json["sensor_id"].as_str().unwrap().to_string(),
        "agent_event" => agent_id.to_string(),
        t => panic!("unexpected type {t}"),
    };
    assert_eq!(m.key, expected_key, "key of {}", m.json);
    // Consumers of the experiment-events topic see only experiment events; the agent's
    // own events have a topic of their own.
    let on_agent_topic = m.topic.ends_with("agent_events");
    let is_agent_event = m.json["type"] == "agent_event";
    assert_eq!(on_agent_topic, is_agent_event, "{} on {}", m.json, m.topic);
}

/// The seq ranges in 0..=last that are missing, for readable failures.
pub fn missing_ranges(
    seqs: &std::collections::BTreeMap<u64, std::collections::BTreeSet<String>>,
    last: u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = None;
    for s in 0..=last {
        match (seqs.contains_key(&s), start) {
            (false, None) => start = Some(s),
            (true, Some(a)) => {
                out.push((a, s - 1));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(a) = start {
        out.push((a, last));
    }
    out
}

/// The values of `counter` readings that reached Kafka.
pub fn counter_values(msgs: &[Msg]) -> std::collections::BTreeSet<u64> {
    msgs.iter()
        .filter(|m| m.json["type"] == "sensor_reading" && m.json["sensor_type"] == "counter")
        .filter_map(|m| m.json["value"].as_f64())
        .map(|v| v as u64)
        .collect()
}

/// A record as it was stored, without what the forwarder adds when it sends a record that
/// waited in the buffer (`replayed`, `buffered_ms`): a redelivered copy of a record can
/// carry those marks when its first copy did not, and is still the same record.
pub fn as_stored(json: &Value) -> Value {
    let mut v = json.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("replayed");
        o.remove("buffered_ms");
    }
    v
}

/// Every (device, seq) in `msgs` with its record as stored, and what contradicts the
/// promise that a seq is one record however often it is sent.
pub struct BySeq {
    pub records: std::collections::BTreeMap<(String, u64), Value>,
    /// A copy that differs from the first one seen (first, then the copy).
    pub changed: Vec<String>,
    /// Copies sent again that carried the replay marks.
    pub marked_again: usize,
}

pub fn by_seq(msgs: &[Msg]) -> BySeq {
    let mut out = BySeq {
        records: Default::default(),
        changed: Vec::new(),
        marked_again: 0,
    };
    for m in msgs {
        let (Some(dev), Some(seq)) = (m.json["device_id"].as_str(), m.json["seq"].as_u64()) else {
            continue;
        };
        let record = as_stored(&m.json);
        match out.records.get(&(dev.to_string(), seq)) {
            Some(first) if *first != record => out
                .changed
                .push(format!("seq {seq} of {dev}: {first}\n  then {}", m.json)),
            Some(_) => out.marked_again += usize::from(record != m.json),
            None => {
                out.records.insert((dev.to_string(), seq), record);
            }
        }
    }
    out
}
