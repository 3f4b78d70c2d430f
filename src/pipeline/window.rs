//! Tumbling windows per sensor: count, sum, min, max of the readings whose time falls in
//! `[start, start + length)`, windows aligned to the Unix epoch.
//!
//! A window closes when a later reading of the same sensor arrives (event time moves
//! on), or, for a sensor that went quiet, once the wall clock is `lateness` past its
//! end and nothing arrived for `lateness`. A reading older than its sensor's open
//! window is late: it is counted and left out of the aggregates (its raw reading is
//! still forwarded).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// A window's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The device whose readings these are.
    pub device_id: String,
    /// The readings' type.
    pub sensor_type: String,
    /// The sensor.
    pub sensor_id: String,
    /// The readings' unit.
    pub unit: String,
    /// Start of the window (inclusive).
    pub start: SystemTime,
    /// End of the window (exclusive).
    pub end: SystemTime,
    /// Readings in the window.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// Closed at shutdown before its end: the figures cover only part of the window.
    pub partial: bool,
}

impl Aggregate {
    /// Mean of the readings.
    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }
}

type Key = (String, String, String);

/// One reading as the windows see it.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The device that read it.
    pub device_id: &'a str,
    /// The reading's type.
    pub sensor_type: &'a str,
    /// The sensor.
    pub sensor_id: &'a str,
    /// The unit.
    pub unit: &'a str,
    /// The value.
    pub value: f64,
    /// When it was taken.
    pub t: SystemTime,
}

struct Open {
    agg: Aggregate,
    /// Wall-clock time of the last reading added.
    last_arrival: SystemTime,
}

/// What a reading did.
#[derive(Debug, PartialEq)]
pub enum Placed {
    /// Added to its sensor's open window; `first` when it opened that window.
    /// Added; `first` when it opened the window.
    Added {
        /// This reading opened the window.
        first: bool,
    },
    /// Older than the open window: left out.
    Late,
}

/// Open aggregate windows per sensor, closed by time.
pub struct Windows {
    length: Duration,
    lateness: Duration,
    open: HashMap<Key, Open>,
}

impl Windows {
    /// Windows of `length`, closed `lateness` after their end.
    pub fn new(length: Duration, lateness: Duration) -> Windows {
        Windows {
            length,
            lateness,
            open: HashMap::new(),
        }
    }

    /// The window `[start, end)` holding `t`.
    pub fn bounds(&self, t: SystemTime) -> (SystemTime, SystemTime) {
        let len = self.length.as_micros().max(1);
        let us = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let start_us = us - us % len;
        let start = SystemTime::UNIX_EPOCH + Duration::from_micros(start_us as u64);
        (start, start + self.length)
    }

    /// Adds one reading received at `now`; pushes any window it closes.
    pub fn add(&mut self, s: &Sample<'_>, now: SystemTime, closed: &mut Vec<Aggregate>) -> Placed {
        let Sample {
            device_id,
            sensor_type,
            sensor_id,
            unit,
            value,
            t,
        } = *s;
        let key = (
            sensor_type.to_string(),
            sensor_id.to_string(),
            unit.to_string(),
        );
        if let Some(o) = self.open.get_mut(&key) {
            if t < o.agg.start {
                return Placed::Late;
            }
            if t < o.agg.end {
                let a = &mut o.agg;
                a.count += 1;
                a.sum += value;
                a.min = a.min.min(value);
                a.max = a.max.max(value);
                o.last_arrival = now;
                return Placed::Added { first: false };
            }
            if let Some(o) = self.open.remove(&key) {
                closed.push(o.agg);
            }
        }
        let (start, end) = self.bounds(t);
        self.open.insert(
            key,
            Open {
                agg: Aggregate {
                    device_id: device_id.to_string(),
                    sensor_type: sensor_type.to_string(),
                    sensor_id: sensor_id.to_string(),
                    unit: unit.to_string(),
                    start,
                    end,
                    count: 1,
                    sum: value,
                    min: value,
                    max: value,
                    partial: false,
                },
                last_arrival: now,
            },
        );
        Placed::Added { first: true }
    }

    /// Closes windows of sensors that went quiet (see the module doc).
    pub fn expire(&mut self, now: SystemTime, closed: &mut Vec<Aggregate>) {
        let lateness = self.lateness;
        let due: Vec<Key> = self
            .open
            .iter()
            .filter(|(_, o)| {
                now >= o.agg.end + lateness
                    && now
                        .duration_since(o.last_arrival)
                        .is_ok_and(|d| d >= lateness)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut out: Vec<Aggregate> = due
            .iter()
            .filter_map(|k| self.open.remove(k))
            .map(|o| o.agg)
            .collect();
        out.sort_by(|a, b| (a.start, &a.sensor_id).cmp(&(b.start, &b.sensor_id)));
        closed.extend(out);
    }

    /// Closes every window (shutdown); those not yet ended are marked partial.
    pub fn close_all(&mut self, now: SystemTime, closed: &mut Vec<Aggregate>) {
        for (_, mut o) in self.open.drain() {
            o.agg.partial = now < o.agg.end;
            closed.push(o.agg);
        }
    }

    /// Windows open now.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
    }

    fn s(value: f64, t: SystemTime) -> Sample<'static> {
        Sample {
            device_id: "d",
            sensor_type: "t",
            sensor_id: "s",
            unit: "C",
            value,
            t,
        }
    }

    #[test]
    fn readings_fall_into_aligned_windows_and_close_when_time_moves_on() {
        let mut w = Windows::new(Duration::from_secs(10), Duration::from_secs(2));
        let mut closed = Vec::new();
        let now = at(0);
        for (ms, v) in [(0, 1.0), (3_000, 3.0), (9_999, 2.0)] {
            w.add(&s(v, at(ms)), now, &mut closed);
        }
        assert!(closed.is_empty());
        assert_eq!(
            w.add(&s(10.0, at(10_000)), now, &mut closed),
            Placed::Added { first: true }
        );
        assert_eq!(closed.len(), 1);
        let a = &closed[0];
        assert_eq!((a.count, a.min, a.max, a.avg()), (3, 1.0, 3.0, 2.0));
        assert_eq!(a.start, at(0));
        assert_eq!(a.end, at(10_000));
        assert_eq!(w.add(&s(0.0, at(5_000)), now, &mut closed), Placed::Late);
    }

    #[test]
    fn a_quiet_sensor_is_closed_by_the_clock_but_a_fast_replay_is_not() {
        let mut w = Windows::new(Duration::from_secs(10), Duration::from_secs(2));
        let mut closed = Vec::new();
        // Historical data arriving now: the window ended long ago, but readings keep
        // arriving, so the clock must not cut it.
        w.add(&s(1.0, at(0)), at(100_000), &mut closed);
        w.expire(at(100_500), &mut closed);
        assert!(closed.is_empty());
        w.expire(at(102_000), &mut closed);
        assert_eq!(closed.len(), 1);
        // Real time: closed `lateness` after its end.
        w.add(&s(1.0, at(200_000)), at(200_000), &mut closed);
        w.expire(at(211_000), &mut closed);
        assert_eq!(closed.len(), 1);
        w.expire(at(212_000), &mut closed);
        assert_eq!(closed.len(), 2);
    }

    #[test]
    fn shutdown_marks_unfinished_windows_partial() {
        let mut w = Windows::new(Duration::from_secs(10), Duration::from_secs(2));
        let mut closed = Vec::new();
        w.add(&s(1.0, at(0)), at(0), &mut closed);
        w.close_all(at(5_000), &mut closed);
        assert!(closed[0].partial);
        assert_eq!(w.open_count(), 0);
    }
}
