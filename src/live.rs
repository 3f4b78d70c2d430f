//! What the status page shows: a small picture of the agent kept beside ingest, and a
//! live feed of it for whoever watches.
//!
//! Ingest shows every record it stamps to [`Live::view`]. Kept whether or not anyone
//! watches, and bounded: each device's current (or last) run with its points (at most
//! [`MAX_RUN_POINTS`], thinned by half when full), a trend per sensor sampled every
//! [`TREND_EVERY`] over the last [`TREND_SPAN`], the last reading of each device, and the
//! last [`HISTORY`] alerts and command results. What the page needs at load is
//! [`Live::snapshot`].
//!
//! The feed is a broadcast channel. With no page open it has no receivers and nothing is
//! encoded or sent. A second page is one more receiver of the same events. A page that
//! stops reading (a closed laptop lid) only falls behind: the channel is bounded, the
//! page's stream sees that it lagged and starts again from a snapshot; the agent holds
//! nothing for it. Sensor readings are sent at most [`READING_EVERY`] per sensor.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::record::{unix_ms, Body, Draft};

/// Points of a run kept for the page at most; past it every other point is dropped
/// (the page's plot is a few hundred pixels wide).
pub const MAX_RUN_POINTS: usize = 20_000;
/// How often a sensor's trend takes a sample.
pub const TREND_EVERY: Duration = Duration::from_secs(10);
/// How far back a trend goes.
pub const TREND_SPAN: Duration = Duration::from_secs(3600);
/// Sensors with a trend at most.
pub const MAX_SENSORS: usize = 256;
/// Alerts and command results kept.
pub const HISTORY: usize = 50;
/// A sensor's readings go to the feed at most this often.
pub const READING_EVERY: Duration = Duration::from_millis(500);
/// Events the feed holds for a slow page before it lags.
pub const FEED_CAPACITY: usize = 1024;
/// Delivery samples kept (one per [`RATE_EVERY`]).
pub const RATE_SAMPLES: usize = 120;
/// How often the delivery rate is sampled.
pub const RATE_EVERY: Duration = Duration::from_secs(5);

/// One run as the page draws it.
#[derive(Debug, Clone, Default)]
struct Run {
    experiment_id: String,
    technique: String,
    step_index: u32,
    state: String,
    points_total: u64,
    /// t, e, i, z_re, z_im, step (NaN where absent).
    points: Vec<[f64; 6]>,
    /// Keep every `stride`-th point (after thinning).
    stride: u64,
}

struct Trend {
    sensor_id: String,
    sensor_type: String,
    unit: String,
    device_id: String,
    samples: VecDeque<(u64, f64)>,
    last_sample_ms: u64,
    last_sent_ms: u64,
}

impl Trend {
    /// Takes a reading at `ms`: kept as a sample once per [`TREND_EVERY`]; returns
    /// whether it goes to the watchers (at most once per [`READING_EVERY`]).
    fn take(&mut self, ms: u64, value: f64, watched: bool) -> bool {
        if ms
            >= self
                .last_sample_ms
                .saturating_add(TREND_EVERY.as_millis() as u64)
        {
            self.last_sample_ms = ms;
            self.samples.push_back((ms, value));
            let horizon = ms.saturating_sub(TREND_SPAN.as_millis() as u64);
            while self.samples.front().is_some_and(|(at, _)| *at < horizon) {
                self.samples.pop_front();
            }
        }
        let send = watched
            && ms
                >= self
                    .last_sent_ms
                    .saturating_add(READING_EVERY.as_millis() as u64);
        if send {
            self.last_sent_ms = ms;
        }
        send
    }
}

/// A device's last reading.
#[derive(serde::Serialize)]
struct Last {
    sensor_id: String,
    sensor_type: String,
    unit: String,
    value: f64,
    at_ms: u64,
}

#[derive(Default)]
struct View {
    runs: HashMap<String, Run>,
    trends: HashMap<String, Trend>,
    last_reading: HashMap<String, Last>,
    /// The trend key of the reading at hand, built without a new allocation.
    scratch: String,
    alerts: VecDeque<Value>,
    commands: VecDeque<Value>,
    rates: VecDeque<(u64, u64, u64)>,
}

/// The page's picture of the agent and its live feed.
pub struct Live {
    view: Mutex<View>,
    feed: broadcast::Sender<Arc<str>>,
    /// The pipeline's threshold rules, drawn on the trends.
    thresholds: Value,
}

/// The view, locked for a batch of records.
pub struct Viewing<'a> {
    view: MutexGuard<'a, View>,
    feed: &'a broadcast::Sender<Arc<str>>,
    watched: bool,
}

fn point_row(p: &crate::record::Point, step: u32) -> [f64; 6] {
    [
        p.t,
        p.e,
        p.i,
        p.z_re.unwrap_or(f64::NAN),
        p.z_im.unwrap_or(f64::NAN),
        f64::from(step),
    ]
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

fn row_json(r: &[f64; 6]) -> Value {
    Value::Array(r.iter().map(|v| finite(*v)).collect())
}

impl Live {
    /// An empty view; `thresholds` are the pipeline's rules as configured.
    pub fn new(thresholds: Value) -> Live {
        Live {
            view: Mutex::new(View::default()),
            feed: broadcast::channel(FEED_CAPACITY).0,
            thresholds,
        }
    }

    fn lock(&self) -> MutexGuard<'_, View> {
        // One record's update at a time; a panic cannot leave a half-built record.
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the view for a batch of records (ingest, once per batch).
    pub fn view(&self) -> Viewing<'_> {
        Viewing {
            view: self.lock(),
            feed: &self.feed,
            watched: self.feed.receiver_count() > 0,
        }
    }

    /// A new watcher of the feed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.feed.subscribe()
    }

    /// Whether a page is watching.
    pub fn watched(&self) -> bool {
        self.feed.receiver_count() > 0
    }

    /// Sends an event to whoever watches (status updates).
    pub fn send(&self, event: Value) {
        if self.watched() {
            let _ = self.feed.send(Arc::from(event.to_string()));
        }
    }

    /// Takes a delivery sample (records delivered, records buffered so far).
    pub fn sample_rate(&self, now_ms: u64, delivered: u64, buffered: u64) {
        let mut v = self.lock();
        v.rates.push_back((now_ms, delivered, buffered));
        while v.rates.len() > RATE_SAMPLES {
            v.rates.pop_front();
        }
    }

    /// What a page needs when it opens: runs with their points, trends, last readings,
    /// alerts, command results, delivery samples, thresholds.
    pub fn snapshot(&self) -> Value {
        let v = self.lock();
        let runs: serde_json::Map<String, Value> = v
            .runs
            .iter()
            .map(|(d, r)| {
                (
                    d.clone(),
                    json!({
                        "experiment_id": r.experiment_id,
                        "technique": r.technique,
                        "step_index": r.step_index,
                        "state": r.state,
                        "points_total": r.points_total,
                        "points": r.points.iter().map(row_json).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        let trends: Vec<Value> = v
            .trends
            .values()
            .map(|t| {
                json!({
                    "sensor_id": t.sensor_id, "sensor_type": t.sensor_type, "unit": t.unit,
                    "device_id": t.device_id,
                    "samples": t.samples.iter().map(|(ms, x)| json!([ms, x])).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "type": "snapshot",
            "runs": runs,
            "trends": trends,
            "last_reading": v.last_reading,
            "alerts": v.alerts,
            "commands": v.commands,
            "rates": v.rates.iter().map(|(t, d, b)| json!([t, d, b])).collect::<Vec<_>>(),
            "thresholds": self.thresholds,
        })
    }
}

impl Viewing<'_> {
    fn send(&self, event: Value) {
        if self.watched {
            let _ = self.feed.send(Arc::from(event.to_string()));
        }
    }

    /// One record ingest stamped.
    pub fn record(&mut self, d: &Draft, now: SystemTime) {
        let ms = unix_ms(d.time.and_then(crate::time::checked).unwrap_or(now));
        match &d.body {
            Body::ExperimentEvent {
                event,
                experiment_id,
                data,
            } => self.event(&d.device_id, event, experiment_id, data, ms),
            Body::EchemData {
                technique,
                experiment_id,
                step_index,
                points,
                ..
            } => {
                let run = self.view.runs.entry(d.device_id.clone()).or_default();
                if run.experiment_id != *experiment_id {
                    *run = Run {
                        experiment_id: experiment_id.clone(),
                        state: "running".into(),
                        stride: 1,
                        ..Run::default()
                    };
                }
                // A step of another technique (EIS after a CA) is plotted on its own.
                if run.technique != *technique && !run.technique.is_empty() {
                    run.points.clear();
                    run.stride = 1;
                }
                run.technique.clone_from(technique);
                run.step_index = *step_index;
                let rows: Vec<[f64; 6]> =
                    points.iter().map(|p| point_row(p, *step_index)).collect();
                for r in &rows {
                    run.points_total += 1;
                    if run.points_total % run.stride.max(1) == 0 {
                        run.points.push(*r);
                    }
                }
                if run.points.len() > MAX_RUN_POINTS {
                    let kept: Vec<[f64; 6]> = run.points.iter().step_by(2).copied().collect();
                    run.points = kept;
                    run.stride = run.stride.max(1) * 2;
                }
                if self.watched {
                    self.send(json!({
                        "type": "data", "device_id": d.device_id, "experiment_id": experiment_id,
                        "technique": technique, "step_index": step_index,
                        "points": rows.iter().map(row_json).collect::<Vec<_>>(),
                    }));
                }
            }
            Body::SensorReading {
                sensor_id,
                sensor_type,
                value,
                unit,
                ..
            } => self.reading(&d.device_id, sensor_id, sensor_type, *value, unit, ms),
            Body::Alert {
                alert_id,
                sensor_id,
                priority,
                message,
                value,
                state,
                ..
            } => {
                let a = json!({
                    "alert_id": alert_id, "sensor_id": sensor_id, "priority": priority,
                    "message": message, "value": value, "state": state, "at_ms": ms,
                    "device_id": d.device_id,
                });
                push(&mut self.view.alerts, a.clone());
                let mut e = a;
                e["type"] = "alert".into();
                self.send(e);
            }
            Body::CommandResult {
                command_id,
                command,
                status,
                reason,
                target_device,
                issuer,
                ..
            } => {
                let c = json!({
                    "command_id": command_id, "command": command, "status": status,
                    "reason": reason, "device_id": target_device, "issuer": issuer, "at_ms": ms,
                });
                push(&mut self.view.commands, c.clone());
                let mut e = c;
                e["type"] = "command".into();
                self.send(e);
            }
            Body::AgentEvent { .. } | Body::SensorAggregate { .. } => {}
        }
    }

    /// A sensor reading. This runs for every reading ingest takes, so it allocates
    /// only for a sensor it has not seen, and encodes only what goes to a watcher.
    fn reading(
        &mut self,
        device: &str,
        sensor_id: &str,
        sensor_type: &str,
        value: f64,
        unit: &str,
        ms: u64,
    ) {
        let v = &mut *self.view;
        v.scratch.clear();
        for part in [device, "/", sensor_type, ":", sensor_id] {
            v.scratch.push_str(part);
        }
        // One lookup for a sensor already seen; its entry is updated where it is found.
        let send = match v.trends.get_mut(v.scratch.as_str()) {
            Some(t) => t.take(ms, value, self.watched),
            None => {
                if v.trends.len() >= MAX_SENSORS {
                    return;
                }
                let mut t = Trend {
                    sensor_id: sensor_id.to_string(),
                    sensor_type: sensor_type.to_string(),
                    unit: unit.to_string(),
                    device_id: device.to_string(),
                    samples: VecDeque::new(),
                    last_sample_ms: 0,
                    last_sent_ms: 0,
                };
                let send = t.take(ms, value, self.watched);
                v.trends.insert(v.scratch.clone(), t);
                send
            }
        };
        match v.last_reading.get_mut(device) {
            Some(l) => {
                l.sensor_id.clear();
                l.sensor_id.push_str(sensor_id);
                l.sensor_type.clear();
                l.sensor_type.push_str(sensor_type);
                l.unit.clear();
                l.unit.push_str(unit);
                l.value = value;
                l.at_ms = ms;
            }
            None => {
                v.last_reading.insert(
                    device.to_string(),
                    Last {
                        sensor_id: sensor_id.to_string(),
                        sensor_type: sensor_type.to_string(),
                        unit: unit.to_string(),
                        value,
                        at_ms: ms,
                    },
                );
            }
        }
        if send {
            self.send(json!({
                "type": "reading", "device_id": device, "sensor_id": sensor_id,
                "sensor_type": sensor_type, "value": value, "unit": unit, "at_ms": ms,
            }));
        }
    }

    fn event(
        &mut self,
        device: &str,
        event: &str,
        experiment_id: &str,
        data: &serde_json::Map<String, Value>,
        ms: u64,
    ) {
        if event == crate::runs::RECEIPT_EVENT {
            return;
        }
        let run = self.view.runs.entry(device.to_string()).or_default();
        if event == "experiment_started" || run.experiment_id != experiment_id {
            *run = Run {
                experiment_id: experiment_id.to_string(),
                technique: data
                    .get("technique")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                state: "running".into(),
                stride: 1,
                ..Run::default()
            };
        }
        run.state = match event {
            "experiment_paused" => "paused",
            "experiment_resumed" => "running",
            "experiment_completed" => "completed",
            "experiment_stopped" => "stopped",
            "experiment_failed" => "failed",
            _ => run.state.as_str(),
        }
        .to_string();
        let state = run.state.clone();
        self.send(json!({
            "type": "event", "device_id": device, "event": event,
            "experiment_id": experiment_id, "state": state, "at_ms": ms,
        }));
    }
}

fn push(list: &mut VecDeque<Value>, v: Value) {
    list.push_back(v);
    while list.len() > HISTORY {
        list.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Point;

    fn data(n: usize, exp: &str) -> Draft {
        Draft::new(
            "p",
            Body::EchemData {
                technique: "CV".into(),
                experiment_id: exp.into(),
                step_index: 0,
                scan: None,
                applied: Vec::new(),
                points: (0..n).map(|k| Point::tei(k as f64, 0.1, 1e-6)).collect(),
            },
        )
    }

    #[test]
    fn a_step_of_another_technique_starts_the_plot_afresh() {
        let live = Live::new(Value::Null);
        live.view().record(&data(30, "r1"), SystemTime::now());
        let mut eis = data(5, "r1");
        if let Body::EchemData { technique, .. } = &mut eis.body {
            *technique = "EIS".into();
        }
        live.view().record(&eis, SystemTime::now());
        let s = live.snapshot();
        assert_eq!(s["runs"]["p"]["technique"], "EIS");
        assert_eq!(s["runs"]["p"]["points"].as_array().unwrap().len(), 5);
        assert_eq!(
            s["runs"]["p"]["points_total"], 35,
            "the run's count goes on"
        );
    }

    #[test]
    fn a_run_keeps_bounded_points_and_the_feed_costs_nothing_unwatched() {
        let live = Live::new(Value::Null);
        {
            let mut v = live.view();
            assert!(!v.watched);
            for _ in 0..100 {
                v.record(&data(500, "r1"), SystemTime::now());
            }
        }
        let s = live.snapshot();
        assert_eq!(s["runs"]["p"]["points_total"], 50_000);
        let kept = s["runs"]["p"]["points"].as_array().unwrap().len();
        assert!(
            (MAX_RUN_POINTS / 4..=MAX_RUN_POINTS).contains(&kept),
            "{kept}"
        );
        let mut rx = live.subscribe();
        live.view().record(&data(3, "r2"), SystemTime::now());
        let e: Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(e["type"], "data");
        assert_eq!(e["points"].as_array().unwrap().len(), 3);
        assert_eq!(live.snapshot()["runs"]["p"]["experiment_id"], "r2");
    }

    #[test]
    fn a_sensor_trend_is_sampled_and_the_feed_throttled() {
        let live = Live::new(Value::Null);
        let mut rx = live.subscribe();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for k in 0..100u64 {
            let mut d = Draft::new(
                "env",
                Body::SensorReading {
                    sensor_id: "t1".into(),
                    sensor_type: "temperature".into(),
                    value: k as f64,
                    unit: "°C".into(),
                    location: None,
                    metadata: Default::default(),
                },
            );
            d.time = Some(t0 + Duration::from_millis(k * 100));
            live.view().record(&d, SystemTime::now());
        }
        let s = live.snapshot();
        assert_eq!(
            s["trends"][0]["samples"].as_array().unwrap().len(),
            1,
            "10 s of readings: one sample"
        );
        let mut sent = 0;
        while rx.try_recv().is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 20, "10 s of readings at most 2 a second");
        assert_eq!(s["last_reading"]["env"]["value"], 99.0);
    }
}
