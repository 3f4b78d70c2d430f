//! File profiles: how the rows of an instrument's result files become readings or a
//! measurement. Pure parsing, no I/O.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::record::Point;

/// What one file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One reading per configured column per row (a logger, a plate reader's export).
    Readings,
    /// One measurement per file: rows of t / E / I become `echem_data`, with an
    /// experiment started before and completed after.
    Echem,
}

/// How a time column is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// `2026-12-01T10:30:00.123Z` (or with an offset).
    #[default]
    Rfc3339,
    /// Seconds since 1970, possibly fractional.
    Unix,
    /// Milliseconds since 1970.
    UnixMs,
}

/// The column that says when a row was measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeColumn {
    /// Its header name.
    pub column: String,
    /// How it is written.
    #[serde(default)]
    pub format: TimeFormat,
}

/// One reading per row from this column.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueColumn {
    /// Its header name.
    pub column: String,
    /// What it measures.
    pub sensor_type: String,
    /// The unit of the value after scaling.
    pub unit: String,
    /// Default `<device>.<column>`.
    #[serde(default)]
    pub sensor_id: Option<String>,
    /// value = raw * scale + offset.
    #[serde(default = "one")]
    pub scale: f64,
    /// value = raw * scale + offset.
    #[serde(default)]
    pub offset: f64,
}

/// Which columns hold time, potential and current, and their scale to s, V, A.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchemColumns {
    /// Time column (seconds after scaling).
    pub t: String,
    /// Potential column (volts after scaling).
    pub e: String,
    /// Current column (amperes after scaling).
    pub i: String,
    /// Multiplies t.
    #[serde(default = "one")]
    pub t_scale: f64,
    /// Multiplies E.
    #[serde(default = "one")]
    pub e_scale: f64,
    /// Multiplies I (1e-6 for a file in µA).
    #[serde(default = "one")]
    pub i_scale: f64,
    /// The technique the records carry (`CV`, `CA`, `LSV` …).
    pub technique: String,
}

fn one() -> f64 {
    1.0
}
fn comma() -> String {
    ",".into()
}

/// A file profile (`devices/profiles/folder-*.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProfile {
    /// Shown in events.
    pub name: String,
    /// Readings per row, or one measurement per file.
    pub kind: Kind,
    /// One character (`","`, `";"`, `"\t"`).
    #[serde(default = "comma")]
    pub delimiter: String,
    /// Lines before the header (an instrument's preamble).
    #[serde(default)]
    pub skip_lines: usize,
    /// Lines starting with this are skipped (after the header too).
    #[serde(default)]
    pub comment: Option<String>,
    /// When each row was measured; unset, the time it was read.
    #[serde(default)]
    pub time: Option<TimeColumn>,
    /// `readings`: the columns that become readings.
    #[serde(default)]
    pub columns: Vec<ValueColumn>,
    /// `echem`: the t / E / I columns.
    #[serde(default)]
    pub echem: Option<EchemColumns>,
}

impl FileProfile {
    /// Loads and checks a profile file.
    pub fn load(path: &std::path::Path) -> Result<FileProfile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let p: FileProfile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        p.validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(p)
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.delimiter.chars().count() != 1 {
            return Err("delimiter: must be one character".into());
        }
        match self.kind {
            Kind::Readings if self.columns.is_empty() => {
                return Err("columns: a readings profile needs at least one".into())
            }
            Kind::Echem if self.echem.is_none() => {
                return Err("echem: an echem profile needs it".into())
            }
            _ => {}
        }
        for (i, c) in self.columns.iter().enumerate() {
            if !(c.scale.is_finite() && c.offset.is_finite()) {
                return Err(format!("columns[{i}]: scale and offset must be finite"));
            }
            if let Some(id) = &c.sensor_id {
                if !crate::record::valid_id(id) {
                    return Err(format!("columns[{i}].sensor_id: not a valid id"));
                }
            }
        }
        Ok(())
    }

    fn delim(&self) -> char {
        self.delimiter.chars().next().unwrap_or(',')
    }

    /// Whether a line is data (not blank, not a comment).
    pub fn is_data(&self, line: &str) -> bool {
        let l = line.trim();
        !l.is_empty() && self.comment.as_deref().is_none_or(|c| !l.starts_with(c))
    }

    /// Reads the header line into column positions, checking every column the profile
    /// needs is there.
    pub fn header(&self, line: &str) -> Result<Header, String> {
        let names: Vec<String> = split(line, self.delim())
            .into_iter()
            .map(|s| s.trim().to_string())
            .collect();
        let index: HashMap<String, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let need = |c: &str| -> Result<usize, String> {
            index
                .get(c)
                .copied()
                .ok_or_else(|| format!("header has no column {c:?} (it has {names:?})"))
        };
        let time = match &self.time {
            Some(t) => Some(need(&t.column)?),
            None => None,
        };
        let values = self
            .columns
            .iter()
            .map(|c| need(&c.column))
            .collect::<Result<Vec<_>, _>>()?;
        let echem = match &self.echem {
            Some(e) => Some((need(&e.t)?, need(&e.e)?, need(&e.i)?)),
            None => None,
        };
        Ok(Header {
            time,
            values,
            echem,
        })
    }

    /// One reading per value column of a data row.
    pub fn readings(&self, h: &Header, device: &str, line: &str) -> Result<Vec<Reading>, String> {
        let cells = split(line, self.delim());
        let cell = |i: usize| {
            cells
                .get(i)
                .map(|s| s.trim())
                .ok_or("row has too few cells")
        };
        let time = match (h.time, &self.time) {
            (Some(i), Some(t)) => Some(parse_time(cell(i)?, t.format)?),
            _ => None,
        };
        let mut out = Vec::with_capacity(self.columns.len());
        for (c, &i) in self.columns.iter().zip(&h.values) {
            let raw = cell(i)?;
            if raw.is_empty() {
                continue; // no value in this row for this column
            }
            let v: f64 = raw
                .parse()
                .map_err(|_| format!("column {:?}: {raw:?} is not a number", c.column))?;
            let value = v * c.scale + c.offset;
            if !crate::record::usable_value(value) {
                return Err(format!(
                    "column {:?}: {raw:?} is not a usable value",
                    c.column
                ));
            }
            out.push(Reading {
                sensor_id: c
                    .sensor_id
                    .clone()
                    .unwrap_or_else(|| sanitize_id(&format!("{device}.{}", c.column))),
                sensor_type: c.sensor_type.clone(),
                unit: c.unit.clone(),
                value,
                time,
            });
        }
        Ok(out)
    }

    /// The t / E / I point of a data row.
    pub fn point(&self, h: &Header, line: &str) -> Result<Point, String> {
        let (Some((ti, ei, ii)), Some(e)) = (h.echem, &self.echem) else {
            return Err("not an echem profile".into());
        };
        let cells = split(line, self.delim());
        let num = |i: usize, name: &str, scale: f64| -> Result<f64, String> {
            let raw = cells
                .get(i)
                .map(|s| s.trim())
                .ok_or("row has too few cells")?;
            let v: f64 = raw
                .parse()
                .map_err(|_| format!("column {name:?}: {raw:?} is not a number"))?;
            let v = v * scale;
            if crate::record::usable_value(v) {
                Ok(v)
            } else {
                Err(format!("column {name:?}: {raw:?} is not a usable value"))
            }
        };
        Ok(Point::tei(
            num(ti, &e.t, e.t_scale)?,
            num(ei, &e.e, e.e_scale)?,
            num(ii, &e.i, e.i_scale)?,
        ))
    }
}

/// Where the profile's columns are in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    time: Option<usize>,
    values: Vec<usize>,
    echem: Option<(usize, usize, usize)>,
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The sensor id it carries.
    pub sensor_id: String,
    /// What it measures.
    pub sensor_type: String,
    /// Its unit.
    pub unit: String,
    /// The scaled value.
    pub value: f64,
    /// When, if the file says.
    pub time: Option<SystemTime>,
}

/// Splits one CSV line: cells may be quoted (`"a, b"`, `""` for a quote).
pub fn split(line: &str, delim: char) -> Vec<String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            c if c == delim && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn parse_time(s: &str, f: TimeFormat) -> Result<SystemTime, String> {
    let bad = || format!("time {s:?} is not {f:?}");
    let t = match f {
        TimeFormat::Rfc3339 => crate::time::parse_rfc3339(s),
        TimeFormat::Unix | TimeFormat::UnixMs => {
            let v: f64 = s.parse().map_err(|_| bad())?;
            let secs = if f == TimeFormat::UnixMs {
                v / 1000.0
            } else {
                v
            };
            // Checked: a file can say anything.
            (secs.is_finite() && (0.0..253_402_300_800.0).contains(&secs))
                .then(|| Duration::try_from_secs_f64(secs).ok())
                .flatten()
                .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
        }
    };
    t.ok_or_else(bad)
}

/// `s` with every character an id may not hold replaced by `_`, at most 64 long.
pub fn sanitize_id(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out.truncate(64);
    out
}

/// Whether `name` matches a glob of `*` (any run) and `?` (one character).
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative with backtracking to the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings_profile() -> FileProfile {
        toml::from_str(
            r##"
name = "logger"
kind = "readings"
comment = "#"
time = { column = "time", format = "unix" }
[[columns]]
column = "T (°C)"
sensor_type = "temperature"
unit = "°C"
[[columns]]
column = "RH"
sensor_type = "humidity"
unit = "%"
sensor_id = "rh-1"
"##,
        )
        .unwrap()
    }

    #[test]
    fn rows_become_readings_with_their_time() {
        let p = readings_profile();
        p.validate().unwrap();
        let h = p.header("time,T (°C),RH\r\n").unwrap();
        let r = p
            .readings(&h, "log-1", "1764585000.5,21.5,\"40.25\"")
            .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].sensor_id, "log-1.T___C_");
        assert_eq!(r[0].value, 21.5);
        assert_eq!(r[1].sensor_id, "rh-1");
        assert_eq!(r[1].value, 40.25);
        assert_eq!(
            r[0].time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_585_000_500))
        );
        // An empty cell is no reading; garbage is an error naming the column.
        assert_eq!(p.readings(&h, "d", "1,,3").unwrap().len(), 1);
        let e = p.readings(&h, "d", "1,warm,3").unwrap_err();
        assert!(e.contains("T (°C)"), "{e}");
        assert!(p.readings(&h, "d", "1,NaN,3").is_err());
        assert!(
            p.readings(&h, "d", "1e300,1,3").is_err(),
            "time out of range"
        );
        assert!(p.readings(&h, "d", "1").is_err());
        assert!(!p.is_data("# comment") && !p.is_data("  ") && p.is_data("1,2,3"));
        let e = p.header("time,RH").unwrap_err();
        assert!(e.contains("T (°C)"), "{e}");
    }

    #[test]
    fn echem_rows_become_points_in_si_units() {
        let p: FileProfile = toml::from_str(
            r#"
name = "ca-export"
kind = "echem"
delimiter = "\t"
skip_lines = 2
[echem]
t = "Time/s"
e = "E/V"
i = "I/uA"
i_scale = 1e-6
technique = "CA"
"#,
        )
        .unwrap();
        p.validate().unwrap();
        let h = p.header("Time/s\tE/V\tI/uA").unwrap();
        let pt = p.point(&h, "0.5\t0.2\t1.5").unwrap();
        assert_eq!((pt.t, pt.e), (0.5, 0.2));
        assert!((pt.i - 1.5e-6).abs() < 1e-18);
        assert!(p.point(&h, "0.5\tx\t1").is_err());
    }

    #[test]
    fn csv_cells_may_be_quoted() {
        assert_eq!(split("a,\"b, c\",\"d\"\"e\"", ','), ["a", "b, c", "d\"e"]);
        assert_eq!(split("a\tb\n", '\t'), ["a", "b"]);
    }

    #[test]
    fn globs_match_names() {
        assert!(glob("*.csv", "run-1.csv"));
        assert!(!glob("*.csv", "run-1.csv.part"));
        assert!(glob("run-??.tsv", "run-01.tsv"));
        assert!(glob("*", "x"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
    }
}
