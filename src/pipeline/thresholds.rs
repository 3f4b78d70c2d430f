//! Threshold rules with hysteresis: one alert when a value leaves its band, one `cleared`
//! record when it is back inside by the hysteresis margin, nothing in between.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::record::Priority;

/// `[[pipeline.thresholds]]`: which readings (by type, id or both) and their band.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    /// Applies to readings of this type.
    pub sensor_type: Option<String>,
    #[serde(default)]
    /// Applies to this sensor only.
    pub sensor_id: Option<String>,
    #[serde(default)]
    /// An alert is raised below this.
    pub min: Option<f64>,
    #[serde(default)]
    /// An alert is raised above this.
    pub max: Option<f64>,
    #[serde(default = "normal")]
    /// The alert's priority.
    pub priority: Priority,
    /// How far back inside the band a value must come before the alert clears. Default:
    /// 2 % of max − min when both are set, else 1 % of the threshold's magnitude.
    #[serde(default)]
    pub hysteresis: Option<f64>,
}

fn normal() -> Priority {
    Priority::Normal
}

impl Rule {
    /// Checks the rule names readings, has a band and finite numbers.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.sensor_type.is_none() && self.sensor_id.is_none() {
            return Err((
                "sensor_type".into(),
                "a rule needs sensor_type, sensor_id or both".into(),
            ));
        }
        if self.min.is_none() && self.max.is_none() {
            return Err(("max".into(), "a rule needs min, max or both".into()));
        }
        for (k, v) in [("min", self.min), ("max", self.max)] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err((k.into(), "must be a finite number".into()));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max) {
            if lo >= hi {
                return Err(("min".into(), format!("must be below max ({lo} >= {hi})")));
            }
        }
        if let Some(h) = self.hysteresis {
            if !h.is_finite() || h < 0.0 {
                return Err(("hysteresis".into(), "must be a number >= 0".into()));
            }
            if let (Some(lo), Some(hi)) = (self.min, self.max) {
                if 2.0 * h >= hi - lo {
                    return Err((
                        "hysteresis".into(),
                        "must be less than half of max - min".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn matches(&self, sensor_type: &str, sensor_id: &str) -> bool {
        self.sensor_type.as_deref().is_none_or(|t| t == sensor_type)
            && self.sensor_id.as_deref().is_none_or(|i| i == sensor_id)
    }

    /// The effective hysteresis margin.
    pub fn margin(&self) -> f64 {
        if let Some(h) = self.hysteresis {
            return h;
        }
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => 0.02 * (hi - lo),
            (Some(t), None) | (None, Some(t)) => 0.01 * t.abs(),
            (None, None) => 0.0,
        }
    }
}

/// Which side of the band an active alert is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Above `max`.
    Above,
    /// Below `min`.
    Below,
}

/// What a reading did to one rule's state for one sensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The value crossed a threshold: a new alert.
    Raised {
        /// Index of the rule.
        rule: usize,
        /// The id the clearing record will repeat.
        alert_id: String,
        /// Which side was crossed.
        side: Side,
        /// The threshold crossed.
        threshold: f64,
    },
    /// The value came back inside the band (past the hysteresis).
    Cleared {
        /// Index of the rule.
        rule: usize,
        /// The id of the alert that clears.
        alert_id: String,
        /// Which side it had been on.
        side: Side,
        /// The threshold it had crossed.
        threshold: f64,
    },
}

/// The alert state of every (rule, sensor) pair seen.
#[derive(Debug, Default)]
pub struct Thresholds {
    rules: Vec<Rule>,
    active: HashMap<(usize, String, String), (Side, String)>,
}

impl Thresholds {
    /// State for these rules, no alert active.
    pub fn new(rules: Vec<Rule>) -> Thresholds {
        Thresholds {
            rules,
            active: HashMap::new(),
        }
    }

    /// Rule `i` (as `Change` names it).
    pub fn rule(&self, i: usize) -> &Rule {
        &self.rules[i]
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Feeds one value; returns the alerts raised and cleared by it, in order.
    pub fn observe(
        &mut self,
        sensor_type: &str,
        sensor_id: &str,
        value: f64,
        mut new_id: impl FnMut() -> String,
    ) -> Vec<Change> {
        let mut out = Vec::new();
        if !value.is_finite() {
            return out;
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.matches(sensor_type, sensor_id) {
                continue;
            }
            let key = (i, sensor_type.to_string(), sensor_id.to_string());
            let h = rule.margin();
            if let Some((side, id)) = self.active.get(&key) {
                let back = match side {
                    Side::Above => rule.max.is_some_and(|m| value <= m - h),
                    Side::Below => rule.min.is_some_and(|m| value >= m + h),
                };
                if !back {
                    continue;
                }
                let threshold = match side {
                    Side::Above => rule.max.unwrap_or(f64::NAN),
                    Side::Below => rule.min.unwrap_or(f64::NAN),
                };
                out.push(Change::Cleared {
                    rule: i,
                    alert_id: id.clone(),
                    side: *side,
                    threshold,
                });
                self.active.remove(&key);
            }
            // Outside the band (possibly on the other side of the one just cleared).
            let crossed = match (rule.max, rule.min) {
                (Some(hi), _) if value > hi => Some((Side::Above, hi)),
                (_, Some(lo)) if value < lo => Some((Side::Below, lo)),
                _ => None,
            };
            if let Some((side, threshold)) = crossed {
                let alert_id = new_id();
                self.active.insert(key, (side, alert_id.clone()));
                out.push(Change::Raised {
                    rule: i,
                    alert_id,
                    side,
                    threshold,
                });
            }
        }
        out
    }

    /// Active alerts (for /status and tests).
    pub fn active_count(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(min: Option<f64>, max: Option<f64>, h: Option<f64>) -> Rule {
        Rule {
            sensor_type: Some("temperature".into()),
            sensor_id: None,
            min,
            max,
            priority: Priority::High,
            hysteresis: h,
        }
    }

    fn run(t: &mut Thresholds, values: &[f64]) -> Vec<Change> {
        let mut n = 0;
        let mut out = Vec::new();
        for v in values {
            out.extend(t.observe("temperature", "t1", *v, || {
                n += 1;
                format!("a{n}")
            }));
        }
        out
    }

    #[test]
    fn a_value_hovering_at_the_threshold_raises_once_and_clears_once() {
        let mut t = Thresholds::new(vec![rule(None, Some(30.0), Some(0.5))]);
        let hover = [29.9, 30.1, 29.95, 30.2, 29.8, 30.05, 29.7, 29.4, 29.6, 30.0];
        let changes = run(&mut t, &hover);
        assert_eq!(
            changes,
            vec![
                Change::Raised {
                    rule: 0,
                    alert_id: "a1".into(),
                    side: Side::Above,
                    threshold: 30.0
                },
                Change::Cleared {
                    rule: 0,
                    alert_id: "a1".into(),
                    side: Side::Above,
                    threshold: 30.0
                },
            ]
        );
        assert_eq!(t.active_count(), 0);
    }

    #[test]
    fn a_jump_from_above_to_below_clears_then_raises_the_other_side() {
        let mut t = Thresholds::new(vec![rule(Some(10.0), Some(30.0), Some(1.0))]);
        let changes = run(&mut t, &[35.0, 5.0, 12.0]);
        let kinds: Vec<_> = changes
            .iter()
            .map(|c| match c {
                Change::Raised { side, .. } => format!("raise {side:?}"),
                Change::Cleared { side, .. } => format!("clear {side:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["raise Above", "clear Above", "raise Below", "clear Below"]
        );
    }

    #[test]
    fn rules_match_by_type_and_id_and_other_sensors_are_independent() {
        let mut t = Thresholds::new(vec![Rule {
            sensor_id: Some("t2".into()),
            ..rule(None, Some(30.0), None)
        }]);
        assert!(t
            .observe("temperature", "t1", 40.0, || "x".into())
            .is_empty());
        assert_eq!(t.observe("temperature", "t2", 40.0, || "x".into()).len(), 1);
        assert!(t.observe("humidity", "t2", 40.0, || "y".into()).is_empty());
    }

    #[test]
    fn default_margin_and_validation() {
        assert_eq!(rule(Some(10.0), Some(30.0), None).margin(), 0.4);
        assert_eq!(rule(None, Some(-50.0), None).margin(), 0.5);
        assert!(rule(Some(30.0), Some(10.0), None).validate().is_err());
        assert!(rule(Some(10.0), Some(12.0), Some(1.0)).validate().is_err());
        assert!(rule(None, None, None).validate().is_err());
        assert!(rule(None, Some(f64::NAN), None).validate().is_err());
        assert!(rule(Some(10.0), Some(30.0), Some(1.0)).validate().is_ok());
    }
}
