//! Edge processing of sensor readings, on their way into the buffer (ingest runs it):
//! threshold rules with hysteresis → alert and `cleared` records; tumbling-window
//! aggregates (avg / min / max / count) to their own topic; optional downsampling of the
//! raw readings. Alerts and aggregates always see every reading, so downsampling never
//! changes them.
//!
//! State is in memory: after a restart an alert still active is raised again, and the
//! windows open at shutdown are sent marked `partial`.

pub mod thresholds;
pub mod window;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::record::{AlertState, Body, Draft};
use thresholds::{Change, Side, Thresholds};
use window::{Aggregate, Placed, Sample, Windows};

/// `[pipeline]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    #[serde(default)]
    /// Alert rules on sensor readings.
    pub thresholds: Vec<thresholds::Rule>,
    #[serde(default)]
    /// Windowed aggregates per sensor.
    pub aggregates: Option<AggregatesConfig>,
    #[serde(default)]
    /// Fewer raw readings forwarded.
    pub downsample: Option<DownsampleConfig>,
}

/// `[pipeline.aggregates]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatesConfig {
    /// Window length; windows are aligned to the Unix epoch.
    #[serde(with = "crate::time::serde_duration")]
    pub window: Duration,
    /// How long after its end a window of a quiet sensor stays open.
    #[serde(default = "d_lateness", with = "crate::time::serde_duration")]
    pub lateness: Duration,
}

fn d_lateness() -> Duration {
    Duration::from_secs(2)
}

/// `[pipeline.downsample]`: keep every Nth raw reading per sensor, or the first of each
/// aggregate window.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownsampleConfig {
    #[serde(default)]
    /// Keep one raw reading in this many.
    pub every: Option<u64>,
    #[serde(default)]
    /// Keep the first raw reading of each aggregate window.
    pub per_window: bool,
}

impl PipelineConfig {
    /// Checks rules, windows and downsampling; keys are relative to `[pipeline]`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, r) in self.thresholds.iter().enumerate() {
            r.validate()
                .map_err(|(k, m)| (format!("thresholds[{i}].{k}"), m))?;
        }
        if let Some(a) = &self.aggregates {
            if a.window < Duration::from_millis(100) || a.window > Duration::from_secs(86_400) {
                return Err((
                    "aggregates.window".into(),
                    "must be between 100ms and 24h".into(),
                ));
            }
            if a.lateness > Duration::from_secs(3600) {
                return Err(("aggregates.lateness".into(), "must be at most 1h".into()));
            }
        }
        if let Some(d) = &self.downsample {
            match (d.every, d.per_window) {
                (Some(0), _) => {
                    return Err(("downsample.every".into(), "must be at least 1".into()))
                }
                (Some(_), true) | (None, false) => {
                    return Err((
                        "downsample".into(),
                        "set exactly one of every = N or per_window = true".into(),
                    ))
                }
                (None, true) if self.aggregates.is_none() => {
                    return Err((
                        "downsample.per_window".into(),
                        "needs [pipeline.aggregates] for its window".into(),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The running pipeline (owned by the ingest task).
pub struct Pipeline {
    thresholds: Thresholds,
    windows: Option<Windows>,
    downsample: Option<DownsampleConfig>,
    /// Readings seen per sensor (every-Nth downsampling).
    seen: HashMap<(String, String), u64>,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    /// A pipeline with the configured rules and windows.
    pub fn new(cfg: &PipelineConfig, metrics: Arc<Metrics>) -> Pipeline {
        Pipeline {
            thresholds: Thresholds::new(cfg.thresholds.clone()),
            windows: cfg
                .aggregates
                .as_ref()
                .map(|a| Windows::new(a.window, a.lateness)),
            downsample: cfg.downsample.clone(),
            seen: HashMap::new(),
            metrics,
        }
    }

    /// Nothing configured: ingest can skip the pipeline.
    pub fn is_idle(&self) -> bool {
        self.thresholds.is_empty() && self.windows.is_none() && self.downsample.is_none()
    }

    /// Feeds one record. Pushes what it derives (alerts, closed windows) to `out`;
    /// returns whether the record itself goes on (false: downsampled away).
    pub fn observe(&mut self, draft: &Draft, now: SystemTime, out: &mut Vec<Draft>) -> bool {
        let Body::SensorReading {
            sensor_id,
            sensor_type,
            value,
            unit,
            ..
        } = &draft.body
        else {
            return true;
        };
        let sample = Sample {
            device_id: &draft.device_id,
            sensor_type,
            sensor_id,
            unit,
            value: *value,
            t: draft.time.unwrap_or(now),
        };
        for change in self.thresholds.observe(sensor_type, sensor_id, *value, || {
            uuid::Uuid::new_v4().to_string()
        }) {
            out.push(self.alert(&sample, change));
        }
        let mut first_in_window = true;
        if let Some(w) = &mut self.windows {
            let mut closed = Vec::new();
            match w.add(&sample, now, &mut closed) {
                Placed::Added { first } => first_in_window = first,
                Placed::Late => {
                    self.metrics.pipeline_late_readings.fetch_add(1, Relaxed);
                    first_in_window = false;
                }
            }
            for a in closed {
                out.push(self.aggregate(a));
            }
        }
        let keep = match &self.downsample {
            None => true,
            Some(DownsampleConfig { every: Some(n), .. }) => {
                let c = self
                    .seen
                    .entry((sensor_type.clone(), sensor_id.clone()))
                    .or_insert(0);
                let keep = *c % n == 0;
                *c += 1;
                keep
            }
            Some(_) => first_in_window,
        };
        if !keep {
            self.metrics.readings_downsampled.fetch_add(1, Relaxed);
        }
        keep
    }

    /// Closes the windows of quiet sensors.
    pub fn tick(&mut self, now: SystemTime) -> Vec<Draft> {
        let mut closed = Vec::new();
        if let Some(w) = &mut self.windows {
            w.expire(now, &mut closed);
        }
        closed.into_iter().map(|a| self.aggregate(a)).collect()
    }

    /// Shutdown: every open window, marked partial when it has not ended.
    pub fn finish(&mut self, now: SystemTime) -> Vec<Draft> {
        let mut closed = Vec::new();
        if let Some(w) = &mut self.windows {
            w.close_all(now, &mut closed);
        }
        closed.into_iter().map(|a| self.aggregate(a)).collect()
    }

    fn alert(&self, s: &Sample<'_>, change: Change) -> Draft {
        let Sample {
            sensor_id,
            sensor_type,
            unit,
            value,
            ..
        } = *s;
        let (rule, alert_id, side, threshold, state) = match change {
            Change::Raised {
                rule,
                alert_id,
                side,
                threshold,
            } => (rule, alert_id, side, threshold, AlertState::Active),
            Change::Cleared {
                rule,
                alert_id,
                side,
                threshold,
            } => (rule, alert_id, side, threshold, AlertState::Cleared),
        };
        let u = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        let message = match (state, side) {
            (AlertState::Active, Side::Above) => {
                format!("{sensor_type} {sensor_id} above {threshold}{u}: {value}{u}")
            }
            (AlertState::Active, Side::Below) => {
                format!("{sensor_type} {sensor_id} below {threshold}{u}: {value}{u}")
            }
            (AlertState::Cleared, Side::Above) => {
                format!("{sensor_type} {sensor_id} back below {threshold}{u}: {value}{u}")
            }
            (AlertState::Cleared, Side::Below) => {
                format!("{sensor_type} {sensor_id} back above {threshold}{u}: {value}{u}")
            }
        };
        match state {
            AlertState::Active => self.metrics.alerts_raised.fetch_add(1, Relaxed),
            AlertState::Cleared => self.metrics.alerts_cleared.fetch_add(1, Relaxed),
        };
        Draft {
            event_id: None,
            run: None,
            device_id: s.device_id.to_string(),
            time: Some(s.t),
            body: Body::Alert {
                alert_id,
                sensor_id: sensor_id.to_string(),
                sensor_type: sensor_type.to_string(),
                priority: self.thresholds.rule(rule).priority,
                message,
                value: Some(value),
                threshold: Some(threshold),
                acknowledged: false,
                state: Some(state),
                unit: (!unit.is_empty()).then(|| unit.to_string()),
            },
        }
    }

    fn aggregate(&self, a: Aggregate) -> Draft {
        self.metrics.aggregates_emitted.fetch_add(1, Relaxed);
        let avg = a.avg();
        Draft {
            event_id: None,
            run: None,
            device_id: a.device_id,
            time: Some(crate::time::clamp(a.end)),
            body: Body::SensorAggregate {
                avg,
                window_start: crate::time::format_clamped(a.start),
                window_end: crate::time::format_clamped(a.end),
                sensor_id: a.sensor_id,
                sensor_type: a.sensor_type,
                unit: a.unit,
                count: a.count,
                min: a.min,
                max: a.max,
                partial: a.partial,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn reading(v: f64, ms: u64) -> Draft {
        Draft {
            event_id: None,
            run: None,
            device_id: "env".into(),
            time: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)),
            body: Body::SensorReading {
                sensor_id: "t1".into(),
                sensor_type: "temperature".into(),
                value: v,
                unit: "°C".into(),
                location: None,
                metadata: BTreeMap::new(),
            },
        }
    }

    fn cfg(text: &str) -> PipelineConfig {
        let c: PipelineConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn downsampling_keeps_every_nth_but_aggregates_see_all() {
        let c = cfg("[aggregates]\nwindow = \"10s\"\n[downsample]\nevery = 3\n");
        let mut p = Pipeline::new(&c, Arc::new(Metrics::new()));
        let now = SystemTime::now();
        let mut out = Vec::new();
        let kept: Vec<bool> = (0..7)
            .map(|i| p.observe(&reading(i as f64, i * 1000), now, &mut out))
            .collect();
        assert_eq!(kept, [true, false, false, true, false, false, true]);
        p.observe(&reading(100.0, 10_000), now, &mut out);
        let [Draft {
            body: Body::SensorAggregate { count, avg, .. },
            ..
        }] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!((*count, *avg), (7, 3.0));
    }

    #[test]
    fn per_window_keeps_the_first_reading_of_each_window() {
        let c = cfg("[aggregates]\nwindow = \"10s\"\n[downsample]\nper_window = true\n");
        let mut p = Pipeline::new(&c, Arc::new(Metrics::new()));
        let now = SystemTime::now();
        let mut out = Vec::new();
        let kept: Vec<bool> = [0, 4_000, 9_000, 10_000, 15_000]
            .iter()
            .map(|ms| p.observe(&reading(1.0, *ms), now, &mut out))
            .collect();
        assert_eq!(kept, [true, false, false, true, false]);
    }

    #[test]
    fn config_errors_name_the_key() {
        let bad = |t: &str| {
            toml::from_str::<PipelineConfig>(t)
                .unwrap()
                .validate()
                .unwrap_err()
                .0
        };
        assert_eq!(
            bad("[[thresholds]]\nsensor_type = \"t\"\nmin = 5.0\nmax = 1.0\n"),
            "thresholds[0].min"
        );
        assert_eq!(
            bad("[downsample]\nper_window = true\n"),
            "downsample.per_window"
        );
        assert_eq!(bad("[downsample]\nevery = 0\n"), "downsample.every");
        assert_eq!(bad("[aggregates]\nwindow = \"1ms\"\n"), "aggregates.window");
    }
}
