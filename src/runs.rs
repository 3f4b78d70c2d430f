//! Runs as their caller names them, and delivery receipts.
//!
//! A run (an experiment) is named by its `experiment_id`. Lab software that starts one (a
//! `start` command's params, or an event posted to the ingest API) may name it itself and
//! describe it: `sample`, `operator`, `eln_ref` and free `metadata`, which every record of
//! the run then carries as `run` ([`crate::record::RunMeta`]). [`take_run`] takes those
//! fields out of a command's params and checks them.
//!
//! Receipts: ingest shows every record it makes durable to a [`Tracker`]. A run ends with
//! its terminal event (`experiment_completed`, `_stopped`, `_failed`, `_aborted`,
//! `_cancelled`). Once every buffer chunk up to the one holding that event has left the
//! buffer — Kafka acknowledged it — the tracker emits `run_delivered`: records and
//! points per topic, the `seq` range per device, the first and last timestamps, and a
//! SHA-256 digest over the run's points in order, so an ELN can check that what landed
//! is complete.
//!
//! The digest is over `t`, `e` and `i` of each point as IEEE-754 binary64 big-endian
//! (24 bytes a point), in the order the points were sent; a value a point does not
//! carry is hashed as NaN `0x7ff8000000000000`. Python: `struct.pack(">ddd", t, e, i)`.
//!
//! What a receipt cannot see: the tracker lives in memory, so a run in progress when
//! the agent crashes or stops gets no receipt (its records are still delivered; an
//! orderly stop sends no receipts once it has begun, since the forwarder delivers only
//! what is durable at that point); and records
//! dropped by the overflow policy are counted per run only when they were dropped on
//! the way in; a chunk dropped later to make room marks every receipt open at that time
//! as possibly incomplete (`records_dropped_meanwhile`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::record::{object, valid_id, Body, Draft, Point, RunMeta, TopicKind};

/// Fields of a `start` command's params (and of an ingested event) that name and
/// describe the run rather than parameterise the method.
pub const RUN_FIELDS: [&str; 5] = ["experiment_id", "sample", "operator", "eln_ref", "metadata"];

/// Text fields (`sample`, `operator`, `eln_ref`) are at most this long.
pub const MAX_TEXT: usize = 256;
/// A run's `metadata` is at most this large as JSON.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

/// A run field that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RunFieldError {
    /// The field, as the caller wrote it.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> RunFieldError {
    RunFieldError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// How a run was named and described.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSpec {
    /// The caller's run id; the driver makes one when None.
    pub experiment_id: Option<String>,
    /// What every record of the run carries; None when the caller said nothing.
    pub meta: Option<Arc<RunMeta>>,
}

/// Checks an `experiment_id`: it becomes a Kafka key and a part of log lines and
/// file names downstream.
pub fn check_experiment_id(id: &str) -> Result<(), String> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(format!(
            "must be 1-64 characters of letters, digits, '-', '_' or '.' (it is the Kafka key of the run), got {:?}",
            id.chars().take(80).collect::<String>()
        ))
    }
}

fn text(field: &str, v: &Value) -> Result<String, RunFieldError> {
    match v {
        Value::String(s) if s.chars().count() <= MAX_TEXT && !s.chars().any(char::is_control) => {
            Ok(s.clone())
        }
        Value::String(_) => Err(bad(
            field,
            format!("must be at most {MAX_TEXT} characters, without control characters"),
        )),
        _ => Err(bad(field, "must be a string")),
    }
}

/// Takes the run fields ([`RUN_FIELDS`]) out of `params` and checks them; what is left
/// is the method's.
pub fn take_run(params: &mut Map<String, Value>) -> Result<RunSpec, RunFieldError> {
    let mut spec = RunSpec::default();
    if let Some(v) = params.remove("experiment_id") {
        let Value::String(id) = v else {
            return Err(bad("experiment_id", "must be a string"));
        };
        check_experiment_id(&id).map_err(|r| bad("experiment_id", r))?;
        spec.experiment_id = Some(id);
    }
    let mut meta = RunMeta::default();
    if let Some(v) = params.remove("sample") {
        meta.sample = Some(text("sample", &v)?);
    }
    if let Some(v) = params.remove("operator") {
        meta.operator = Some(text("operator", &v)?);
    }
    if let Some(v) = params.remove("eln_ref") {
        meta.eln_ref = Some(text("eln_ref", &v)?);
    }
    if let Some(v) = params.remove("metadata") {
        let Value::Object(m) = v else {
            return Err(bad("metadata", "must be a JSON object"));
        };
        let size = serde_json::to_vec(&m)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        if size > MAX_METADATA_BYTES {
            return Err(bad(
                "metadata",
                format!("is {size} bytes as JSON; at most {MAX_METADATA_BYTES}"),
            ));
        }
        meta.metadata = m;
    }
    if !meta.is_empty() {
        spec.meta = Some(Arc::new(meta));
    }
    Ok(spec)
}

/// Checks the run fields of `params` without taking them (the command validator).
pub fn check_run_fields(params: &Map<String, Value>) -> Result<(), RunFieldError> {
    let mut copy: Map<String, Value> = params
        .iter()
        .filter(|(k, _)| RUN_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    take_run(&mut copy).map(|_| ())
}

/// How a terminal event ends a run (`experiment_stopped` → `stopped`); None for an
/// event that does not end one.
pub fn ending(event: &str) -> Option<&'static str> {
    Some(match event {
        "experiment_completed" => "completed",
        "experiment_stopped" => "stopped",
        "experiment_failed" => "failed",
        "experiment_aborted" => "aborted",
        "experiment_cancelled" => "cancelled",
        _ => return None,
    })
}

/// What the tracker learns from one record ingest made durable (or refused).
#[derive(Debug)]
pub struct Seen {
    /// The run.
    pub experiment_id: String,
    /// Which topic the record went to.
    pub topic: TopicKind,
    /// Its device and seq.
    pub device_id: String,
    /// Its seq.
    pub seq: u64,
    /// Its timestamp, Unix ms.
    pub time_ms: u64,
    /// Its points (data records), as the digest takes them.
    pub points: Vec<[f64; 3]>,
    /// Its event and the event's data (event records).
    pub event: Option<(String, Map<String, Value>)>,
    /// What the run carries.
    pub run: Option<Arc<RunMeta>>,
}

impl Seen {
    /// What a draft tells the tracker, if it belongs to a run.
    pub fn of(draft: &Draft, seq: u64, now: SystemTime) -> Option<Seen> {
        let time_ms =
            crate::record::unix_ms(draft.time.and_then(crate::time::checked).unwrap_or(now));
        let (experiment_id, points, event) = match &draft.body {
            Body::ExperimentEvent {
                event,
                experiment_id,
                data,
            } => {
                if event == RECEIPT_EVENT {
                    return None;
                }
                (
                    experiment_id,
                    Vec::new(),
                    Some((event.clone(), data.clone())),
                )
            }
            Body::EchemData {
                experiment_id,
                points,
                ..
            } => (
                experiment_id,
                points.iter().map(digest_values).collect(),
                None,
            ),
            _ => return None,
        };
        Some(Seen {
            experiment_id: experiment_id.clone(),
            topic: draft.body.topic(),
            device_id: draft.device_id.clone(),
            seq,
            time_ms,
            points,
            event,
            run: draft.run.clone(),
        })
    }
}

/// The values of a point the digest takes.
pub fn digest_values(p: &Point) -> [f64; 3] {
    [p.t, p.e, p.i]
}

/// The event a receipt is.
pub const RECEIPT_EVENT: &str = "run_delivered";

/// Runs followed at once at most; past it the least recently active one is closed
/// with a receipt that says so (an application that never ends its runs).
pub const MAX_OPEN_RUNS: usize = 1_000;

#[derive(Debug)]
struct Run {
    device_id: String,
    first_ms: u64,
    last_ms: u64,
    records: BTreeMap<TopicKind, (u64, u64)>,
    seqs: BTreeMap<String, (u64, u64)>,
    points: u64,
    hasher: Sha256,
    lost: u64,
    run: Option<Arc<RunMeta>>,
    drops_at_start: u64,
    touched: u64,
}

struct Ended {
    run: Run,
    experiment_id: String,
    how: &'static str,
    data: Map<String, Value>,
    /// Delivered once the buffer's oldest chunk is at least this.
    mark: u64,
}

/// Follows runs through ingest and emits their receipts once Kafka has them all.
pub struct Tracker {
    open: HashMap<String, Run>,
    ended: Vec<Ended>,
    topic_names: HashMap<TopicKind, String>,
    clock: u64,
}

impl Tracker {
    /// A tracker naming topics as configured.
    pub fn new(topic_names: HashMap<TopicKind, String>) -> Tracker {
        Tracker {
            open: HashMap::new(),
            ended: Vec::new(),
            topic_names,
            clock: 0,
        }
    }

    /// Runs followed now (open, or ended and waiting for delivery).
    pub fn len(&self) -> usize {
        self.open.len() + self.ended.len()
    }

    /// Whether no run is followed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A record of a run was made durable (`kept`) or refused; `next_chunk` is the id
    /// the buffer's next chunk will get (everything so far is below it) and `drops` the
    /// agent's records dropped so far.
    pub fn observe(&mut self, s: Seen, kept: bool, next_chunk: u64, drops: u64) {
        self.clock += 1;
        if !self.open.contains_key(&s.experiment_id) && self.open.len() >= MAX_OPEN_RUNS {
            self.evict(next_chunk);
        }
        let run = self
            .open
            .entry(s.experiment_id.clone())
            .or_insert_with(|| Run {
                device_id: s.device_id.clone(),
                first_ms: s.time_ms,
                last_ms: s.time_ms,
                records: BTreeMap::new(),
                seqs: BTreeMap::new(),
                points: 0,
                hasher: Sha256::new(),
                lost: 0,
                run: None,
                drops_at_start: drops,
                touched: 0,
            });
        run.touched = self.clock;
        if s.run.is_some() {
            run.run = s.run.clone();
        }
        if !kept {
            run.lost += 1;
            return;
        }
        run.first_ms = run.first_ms.min(s.time_ms);
        run.last_ms = run.last_ms.max(s.time_ms);
        let r = run.records.entry(s.topic).or_insert((0, 0));
        r.0 += 1;
        r.1 += s.points.len() as u64;
        run.points += s.points.len() as u64;
        for p in &s.points {
            for v in p {
                let v = if v.is_nan() { f64::NAN } else { *v };
                run.hasher.update(v.to_be_bytes());
            }
        }
        let seq = run
            .seqs
            .entry(s.device_id.clone())
            .or_insert((s.seq, s.seq));
        seq.0 = seq.0.min(s.seq);
        seq.1 = seq.1.max(s.seq);
        if let Some((event, data)) = s.event {
            if let Some(how) = ending(&event) {
                if let Some(run) = self.open.remove(&s.experiment_id) {
                    self.ended.push(Ended {
                        run,
                        experiment_id: s.experiment_id,
                        how,
                        data,
                        mark: next_chunk,
                    });
                }
            }
        }
    }

    fn evict(&mut self, next_chunk: u64) {
        let Some(id) = self
            .open
            .iter()
            .min_by_key(|(_, r)| r.touched)
            .map(|(id, _)| id.clone())
        else {
            return;
        };
        if let Some(run) = self.open.remove(&id) {
            tracing::warn!(experiment_id = %id, "run not ended by its source and the run tracker is full: receipt sent without its end");
            self.ended.push(Ended {
                run,
                experiment_id: id,
                how: "untracked",
                data: Map::new(),
                mark: next_chunk,
            });
        }
    }

    /// Receipts due now: runs whose records have all left the buffer (`low_watermark`
    /// is the oldest chunk still buffered, or the next chunk's id when it is empty).
    pub fn due(&mut self, low_watermark: u64, drops: u64) -> Vec<Draft> {
        let (ready, waiting): (Vec<Ended>, Vec<Ended>) = std::mem::take(&mut self.ended)
            .into_iter()
            .partition(|e| low_watermark >= e.mark);
        self.ended = waiting;
        ready.into_iter().map(|e| self.receipt(e, drops)).collect()
    }

    fn receipt(&self, e: Ended, drops: u64) -> Draft {
        let Ended {
            run,
            experiment_id,
            how,
            data,
            ..
        } = e;
        let mut per_topic = Map::new();
        for (kind, (records, points)) in &run.records {
            let name = self
                .topic_names
                .get(kind)
                .cloned()
                .unwrap_or_else(|| format!("{kind:?}"));
            let mut o = object([("records", (*records).into())]);
            if *kind == TopicKind::Data {
                o.insert("points".into(), (*points).into());
            }
            per_topic.insert(name, o.into());
        }
        let seqs: Map<String, Value> = run
            .seqs
            .iter()
            .map(|(d, (a, b))| {
                (
                    d.clone(),
                    object([("first", (*a).into()), ("last", (*b).into())]).into(),
                )
            })
            .collect();
        let stamp = |ms: u64| {
            crate::time::from_unix_ms(ms)
                .and_then(crate::time::format_rfc3339_millis)
                .map(Value::from)
                .unwrap_or(Value::Null)
        };
        let dropped_meanwhile = drops.saturating_sub(run.drops_at_start);
        let complete = how == "completed" && run.lost == 0 && dropped_meanwhile == 0;
        let mut out = object([
            ("ended", how.into()),
            ("complete", complete.into()),
            ("cut_short", (how != "completed").into()),
            ("records", per_topic.into()),
            ("points", run.points.into()),
            ("seq", seqs.into()),
            ("first_timestamp", stamp(run.first_ms)),
            ("last_timestamp", stamp(run.last_ms)),
            (
                "digest",
                object([
                    ("algorithm", "sha256".into()),
                    ("over", "t,e,i of each point as IEEE-754 binary64 big-endian, in order; a value not sent hashes as NaN".into()),
                    ("value", hex(&run.hasher.finalize())),
                ])
                .into(),
            ),
            ("records_lost", run.lost.into()),
            ("records_dropped_meanwhile", dropped_meanwhile.into()),
        ]);
        for k in ["reason", "command_id", "error"] {
            if let Some(v) = data.get(k) {
                out.insert(k.into(), v.clone());
            }
        }
        Draft::new(
            run.device_id.clone(),
            Body::ExperimentEvent {
                event: RECEIPT_EVENT.into(),
                experiment_id,
                data: out,
            },
        )
        .in_run(run.run.as_ref())
    }
}

fn hex(bytes: &[u8]) -> Value {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn run_fields_leave_the_method_params_and_are_checked() {
        let mut p = params(json!({"experiment_id": "exp_001", "sample": "Fe(CN)6 5 mM",
            "operator": "ana", "eln_ref": "ELN-42", "metadata": {"cell": 3}, "n_scans": 2}));
        let spec = take_run(&mut p).unwrap();
        assert_eq!(spec.experiment_id.as_deref(), Some("exp_001"));
        let meta = spec.meta.unwrap();
        assert_eq!(meta.sample.as_deref(), Some("Fe(CN)6 5 mM"));
        assert_eq!(meta.metadata["cell"], 3);
        assert_eq!(p, params(json!({"n_scans": 2})));

        for (bad, field) in [
            (json!({"experiment_id": "a/b"}), "experiment_id"),
            (json!({"experiment_id": ""}), "experiment_id"),
            (json!({"experiment_id": "x".repeat(65)}), "experiment_id"),
            (json!({"experiment_id": 7}), "experiment_id"),
            (json!({"sample": "a\nb"}), "sample"),
            (json!({"operator": 1}), "operator"),
            (json!({"metadata": [1]}), "metadata"),
            (json!({"metadata": {"x": "y".repeat(9000)}}), "metadata"),
        ] {
            let e = take_run(&mut params(bad.clone())).unwrap_err();
            assert_eq!(e.field, field, "{bad}");
        }
        assert_eq!(take_run(&mut Map::new()).unwrap(), RunSpec::default());
    }

    fn seen(id: &str, seq: u64, points: Vec<[f64; 3]>, event: Option<&str>) -> Seen {
        Seen {
            experiment_id: id.into(),
            topic: if event.is_some() {
                TopicKind::Events
            } else {
                TopicKind::Data
            },
            device_id: "d".into(),
            seq,
            time_ms: 1_700_000_000_000 + seq,
            points,
            event: event.map(|e| (e.to_string(), Map::new())),
            run: None,
        }
    }

    #[test]
    fn a_receipt_waits_for_delivery_and_digests_the_points_in_order() {
        let mut t = Tracker::new(HashMap::from([
            (TopicKind::Events, "ev".to_string()),
            (TopicKind::Data, "da".to_string()),
        ]));
        t.observe(seen("r", 0, vec![], Some("experiment_started")), true, 1, 0);
        t.observe(
            seen("r", 1, vec![[0.0, 0.1, 1e-6], [0.1, f64::NAN, 2e-6]], None),
            true,
            2,
            0,
        );
        t.observe(
            seen("r", 2, vec![], Some("experiment_completed")),
            true,
            3,
            0,
        );
        assert!(t.due(2, 0).is_empty(), "chunk 2 is still buffered");
        let r = t.due(3, 0);
        assert_eq!(r.len(), 1);
        let Body::ExperimentEvent { event, data, .. } = &r[0].body else {
            panic!()
        };
        assert_eq!(event, RECEIPT_EVENT);
        assert_eq!(data["complete"], true);
        assert_eq!(data["records"]["ev"]["records"], 2);
        assert_eq!(data["records"]["da"]["points"], 2);
        assert_eq!(data["seq"]["d"], json!({"first": 0, "last": 2}));
        let mut h = Sha256::new();
        for v in [0.0f64, 0.1, 1e-6, 0.1, f64::NAN, 2e-6] {
            h.update(v.to_be_bytes());
        }
        assert_eq!(data["digest"]["value"], hex(&h.finalize()));
        assert!(t.is_empty());
    }

    #[test]
    fn a_run_cut_short_or_losing_records_says_so() {
        let mut t = Tracker::new(HashMap::new());
        t.observe(seen("r", 0, vec![[0.0, 0.0, 0.0]], None), false, 1, 0);
        let mut stop = seen("r", 1, vec![], Some("experiment_stopped"));
        stop.event = Some((
            "experiment_stopped".into(),
            params(json!({"reason": "stop command", "command_id": "c1"})),
        ));
        t.observe(stop, true, 1, 0);
        let r = t.due(1, 0);
        let Body::ExperimentEvent { data, .. } = &r[0].body else {
            panic!()
        };
        assert_eq!(data["ended"], "stopped");
        assert_eq!(data["complete"], false);
        assert_eq!(data["cut_short"], true);
        assert_eq!(data["records_lost"], 1);
        assert_eq!(data["command_id"], "c1");
    }
}
