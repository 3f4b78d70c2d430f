//! Line-instrument profiles (`devices/profiles/*.toml`): how to talk to an instrument that
//! answers (or streams) one text line per reading: framing, commands, the parser, the
//! quantities and their units, error replies. Pure: parsing a reply is a function.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
/// Why a profile cannot be used.
pub enum ProfileError {
    #[error("profile {0}: cannot read: {1}")]
    /// The file cannot be read or parsed (profile, reason).
    Read(String, String),
    #[error("profile {name}: {key}: {message}")]
    /// A value in the profile is wrong.
    Invalid {
        /// The profile's name.
        name: String,
        /// The key inside the profile.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The serial frame (defaults 9600 8N1, no flow control).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    #[serde(default = "d_baud")]
    /// Bits per second.
    pub baud: u32,
    #[serde(default = "d_bits")]
    /// Data bits, 5 to 8.
    pub data_bits: u8,
    #[serde(default)]
    /// Parity bit.
    pub parity: crate::devices::serial::Parity,
    #[serde(default = "d_stop")]
    /// Stop bits, 1 or 2.
    pub stop_bits: u8,
    #[serde(default)]
    /// Software (XON/XOFF), hardware (RTS/CTS) or no flow control.
    pub flow_control: crate::devices::serial::Flow,
}

fn d_baud() -> u32 {
    9600
}
fn d_bits() -> u8 {
    8
}
fn d_stop() -> u8 {
    1
}

impl Default for Serial {
    fn default() -> Self {
        Serial {
            baud: d_baud(),
            data_bits: d_bits(),
            parity: Default::default(),
            stop_bits: d_stop(),
            flow_control: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// What the agent sends to the instrument, and when.
pub struct Commands {
    /// Sent once after connecting (each answer, if any, is read and logged).
    #[serde(default)]
    pub init: Vec<String>,
    /// Sent every `interval`; absent for instruments that stream on their own.
    #[serde(default)]
    pub poll: Option<String>,
    #[serde(default = "d_interval", with = "crate::time::serde_duration")]
    /// How often `poll` is sent.
    pub interval: Duration,
    /// How long to wait for the answer to a poll.
    #[serde(default = "d_timeout", with = "crate::time::serde_duration")]
    pub timeout: Duration,
    /// Sent, in order, on a stop command (SCPI `:ABOR` then `:OUTP OFF`, MT-SICS `@` …).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Appended to every command sent (`\r\n` for MT-SICS).
    #[serde(default = "d_term")]
    pub terminator: String,
    /// Instrument actions the agent's `tare` and `zero` commands carry out: the line to
    /// send, and a pattern its success reply matches (an `[[errors]]` reply fails it).
    #[serde(default)]
    pub actions: BTreeMap<String, Action>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// One instrument action (`tare`, `zero`): a line to send and the reply that means success.
pub struct Action {
    /// The line sent (without terminator).
    pub send: String,
    /// A regular expression the success reply matches.
    pub ok: String,
}

fn d_interval() -> Duration {
    Duration::from_secs(1)
}
fn d_timeout() -> Duration {
    Duration::from_millis(1000)
}
fn d_term() -> String {
    "\n".into()
}

/// How a reply line becomes named fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Parser {
    /// A regular expression with named captures.
    /// The expression; each named group becomes a field.
    Regex {
        /// The expression; each named group becomes a field.
        pattern: String,
    },
    /// Values separated by `separator`, named in order.
    Csv {
        /// Field names, in column order.
        columns: Vec<String>,
        #[serde(default = "d_sep")]
        /// The column separator (default `,`).
        separator: String,
    },
    /// Whitespace-separated values, named in order.
    /// Field names, in order.
    Whitespace {
        /// Field names, in order.
        fields: Vec<String>,
    },
}

fn d_sep() -> String {
    ",".into()
}

/// One reported quantity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantity {
    /// The parsed field that holds the value (its leading number is used, so
    /// `+1.12E+00VDC` reads as 1.12).
    pub field: String,
    /// The reading's `sensor_type` (`mass`, `voltage` …).
    pub sensor_type: String,
    /// A fixed unit, or `unit_field` naming a field that carries it.
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    /// A parsed field holding the unit (MT-SICS replies carry theirs).
    pub unit_field: Option<String>,
    /// value = raw × scale + offset
    #[serde(default = "d_scale")]
    pub scale: f64,
    #[serde(default)]
    /// Added after scaling.
    pub offset: f64,
    /// Raw values that mean "not measured" (Keithley's 9.91e37): no reading is emitted.
    #[serde(default)]
    pub not_measured: Vec<f64>,
}

fn d_scale() -> f64 {
    1.0
}

/// A reply that means the instrument refused or failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// A regular expression an error reply matches.
    pub pattern: String,
    /// What the error means, for events and command results.
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// An instrument profile: how to talk to one model and read what it says.
pub struct Profile {
    /// The profile's name, reported in `device_connected`.
    pub name: String,
    #[serde(default)]
    /// Free text for people.
    pub description: String,
    #[serde(default)]
    /// The serial frame.
    pub serial: Serial,
    /// What to send and when.
    pub commands: Commands,
    /// How a reply becomes fields.
    pub parser: Parser,
    /// Which fields are readings.
    pub quantities: Vec<Quantity>,
    #[serde(default)]
    /// Replies that mean the instrument refused or failed.
    pub errors: Vec<ErrorReply>,
}

/// A profile ready to parse lines.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The profile as written.
    pub profile: Profile,
    regex: Option<Regex>,
    errors: Vec<(Regex, String)>,
    actions: BTreeMap<String, (String, Regex)>,
}

/// What one line means.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Readings, with the fields that are not quantities as metadata.
    Readings {
        /// One per quantity found in the line.
        readings: Vec<Reading>,
        /// The parsed fields that are not quantities.
        metadata: BTreeMap<String, String>,
    },
    /// The instrument answered with an error reply.
    /// The line and the profile's meaning for it.
    DeviceError {
        /// The line as received.
        line: String,
        /// The profile's meaning for it.
        message: String,
    },
    /// The line does not match the profile.
    NoMatch(String),
}

#[derive(Debug, Clone, PartialEq)]
/// One value read from a reply line.
pub struct Reading {
    /// From the quantity.
    pub sensor_type: String,
    /// The field it came from.
    pub field: String,
    /// Scaled and offset.
    pub value: f64,
    /// Fixed, or read from the line.
    pub unit: String,
}

/// The leading number of a field: `+1.12006772E+00VDC` → 1.12006772.
pub fn leading_number(s: &str) -> Option<f64> {
    let s = s.trim();
    let mut end = 0;
    let b = s.as_bytes();
    let mut seen_digit = false;
    let mut seen_e = false;
    while end < b.len() {
        let c = b[end];
        let ok = c.is_ascii_digit()
            || (c == b'.' && !seen_e)
            || ((c == b'+' || c == b'-') && (end == 0 || matches!(b[end - 1], b'e' | b'E')))
            || ((c == b'e' || c == b'E')
                && seen_digit
                && !seen_e
                && b.get(end + 1)
                    .is_some_and(|n| n.is_ascii_digit() || *n == b'+' || *n == b'-'));
        if !ok {
            break;
        }
        seen_digit |= c.is_ascii_digit();
        seen_e |= c == b'e' || c == b'E';
        end += 1;
    }
    s[..end].parse().ok()
}

impl Compiled {
    /// Loads and compiles a profile file.
    pub fn load(path: &Path) -> Result<Compiled, ProfileError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProfileError::Read(name.clone(), e.to_string()))?;
        let profile: Profile = toml::from_str(&text).map_err(|e| ProfileError::Invalid {
            name: name.clone(),
            key: "toml".into(),
            message: e.to_string(),
        })?;
        Compiled::new(profile)
    }

    /// Compiles a profile's regular expressions; a bad one is an `Invalid` naming its key.
    pub fn new(profile: Profile) -> Result<Compiled, ProfileError> {
        let invalid = |key: &str, message: String| ProfileError::Invalid {
            name: profile.name.clone(),
            key: key.to_string(),
            message,
        };
        let (regex, fields): (Option<Regex>, Vec<String>) = match &profile.parser {
            Parser::Regex { pattern } => {
                let r =
                    Regex::new(pattern).map_err(|e| invalid("parser.pattern", e.to_string()))?;
                let names = r.capture_names().flatten().map(str::to_string).collect();
                (Some(r), names)
            }
            Parser::Csv { columns, separator } => {
                if separator.is_empty() {
                    return Err(invalid("parser.separator", "must not be empty".into()));
                }
                (None, columns.clone())
            }
            Parser::Whitespace { fields } => (None, fields.clone()),
        };
        if profile.quantities.is_empty() {
            return Err(invalid(
                "quantities",
                "at least one quantity is required".into(),
            ));
        }
        for (i, q) in profile.quantities.iter().enumerate() {
            if !fields.contains(&q.field) {
                return Err(invalid(
                    &format!("quantities[{i}].field"),
                    format!(
                        "{:?} is not a field of the parser ({})",
                        q.field,
                        fields.join(", ")
                    ),
                ));
            }
            match (&q.unit, &q.unit_field) {
                (Some(_), None) => {}
                (None, Some(f)) if fields.contains(f) => {}
                (None, Some(f)) => {
                    return Err(invalid(
                        &format!("quantities[{i}].unit_field"),
                        format!("{f:?} is not a field of the parser"),
                    ))
                }
                _ => {
                    return Err(invalid(
                        &format!("quantities[{i}].unit"),
                        "give exactly one of unit or unit_field".into(),
                    ))
                }
            }
            if !q.scale.is_finite() || !q.offset.is_finite() {
                return Err(invalid(
                    &format!("quantities[{i}].scale"),
                    "scale and offset must be finite".into(),
                ));
            }
        }
        if profile.commands.interval.is_zero() {
            return Err(invalid(
                "commands.interval",
                "must be greater than zero".into(),
            ));
        }
        let mut errors = Vec::new();
        for (i, e) in profile.errors.iter().enumerate() {
            let r = Regex::new(&e.pattern)
                .map_err(|err| invalid(&format!("errors[{i}].pattern"), err.to_string()))?;
            errors.push((r, e.message.clone()));
        }
        let mut actions = BTreeMap::new();
        for (name, a) in &profile.commands.actions {
            let key = format!("commands.actions.{name}");
            if !matches!(name.as_str(), "tare" | "zero") {
                return Err(invalid(&key, "actions are tare and zero".into()));
            }
            let r = Regex::new(&a.ok).map_err(|e| invalid(&format!("{key}.ok"), e.to_string()))?;
            actions.insert(name.clone(), (a.send.clone(), r));
        }
        Ok(Compiled {
            profile,
            regex,
            errors,
            actions,
        })
    }

    /// The line to send for an action, and the pattern of its success reply.
    pub fn action(&self, name: &str) -> Option<&(String, Regex)> {
        self.actions.get(name)
    }

    /// Parses one reply line (without its terminator). Never panics.
    pub fn parse(&self, line: &str) -> Parsed {
        let line = line.trim_end_matches('\r');
        for (r, message) in &self.errors {
            if r.is_match(line) {
                return Parsed::DeviceError {
                    line: line.to_string(),
                    message: message.clone(),
                };
            }
        }
        let fields: BTreeMap<String, String> = match (&self.profile.parser, &self.regex) {
            (Parser::Regex { .. }, Some(r)) => {
                let Some(c) = r.captures(line) else {
                    return Parsed::NoMatch(line.to_string());
                };
                r.capture_names()
                    .flatten()
                    .filter_map(|n| c.name(n).map(|m| (n.to_string(), m.as_str().to_string())))
                    .collect()
            }
            (Parser::Csv { columns, separator }, _) => {
                let parts: Vec<&str> = line.split(separator.as_str()).map(str::trim).collect();
                if parts.len() < columns.len() {
                    return Parsed::NoMatch(line.to_string());
                }
                columns
                    .iter()
                    .cloned()
                    .zip(parts.into_iter().map(str::to_string))
                    .collect()
            }
            (Parser::Whitespace { fields }, _) => {
                let parts: Vec<&str> = line.split_whitespace().collect();
                if parts.len() < fields.len() {
                    return Parsed::NoMatch(line.to_string());
                }
                fields
                    .iter()
                    .cloned()
                    .zip(parts.into_iter().map(str::to_string))
                    .collect()
            }
            _ => return Parsed::NoMatch(line.to_string()),
        };
        let mut readings = Vec::new();
        for q in &self.profile.quantities {
            let Some(raw) = fields.get(&q.field).and_then(|v| leading_number(v)) else {
                return Parsed::NoMatch(line.to_string());
            };
            if q.not_measured
                .iter()
                .any(|n| (raw - n).abs() <= n.abs() * 1e-9)
            {
                continue;
            }
            let unit = match (&q.unit, &q.unit_field) {
                (Some(u), _) => u.clone(),
                (None, Some(f)) => fields.get(f).cloned().unwrap_or_default(),
                (None, None) => String::new(),
            };
            let value = raw * q.scale + q.offset;
            if !crate::record::usable_value(value) {
                // `1e400` reads as infinity: a garbled line, not a measurement.
                return Parsed::NoMatch(line.to_string());
            }
            readings.push(Reading {
                sensor_type: q.sensor_type.clone(),
                field: q.field.clone(),
                value,
                unit,
            });
        }
        let used: Vec<&str> = self
            .profile
            .quantities
            .iter()
            .flat_map(|q| std::iter::once(q.field.as_str()).chain(q.unit_field.as_deref()))
            .collect();
        let metadata = fields
            .into_iter()
            .filter(|(k, _)| !used.contains(&k.as_str()))
            .collect();
        Parsed::Readings { readings, metadata }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> Compiled {
        Compiled::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("devices/profiles")
                .join(format!("{name}.toml")),
        )
        .unwrap()
    }

    fn values(p: Parsed) -> Vec<(String, f64, String)> {
        match p {
            Parsed::Readings { readings, .. } => readings
                .into_iter()
                .map(|r| (r.sensor_type, r.value, r.unit))
                .collect(),
            other => panic!("expected readings, got {other:?}"),
        }
    }

    #[test]
    fn leading_numbers_ignore_unit_suffixes() {
        assert_eq!(leading_number("+1.12006772E+00VDC"), Some(1.12006772));
        assert_eq!(leading_number("+0.000SECS"), Some(0.0));
        assert_eq!(leading_number("-5"), Some(-5.0));
        assert_eq!(leading_number("2e3x"), Some(2000.0));
        assert_eq!(leading_number("e3"), None);
        assert_eq!(leading_number(""), None);
    }

    #[test]
    fn mt_sics_balance_vectors() {
        // docs/protocols.md §4 test vectors.
        let p = shipped("mettler-mt-sics");
        let stable = p.parse("S S      100.00 g");
        match &stable {
            Parsed::Readings { metadata, .. } => assert_eq!(metadata["stability"], "S"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            values(stable),
            [("mass".to_string(), 100.0, "g".to_string())]
        );
        match p.parse("S D      99.98 g") {
            Parsed::Readings { readings, metadata } => {
                assert_eq!(readings[0].value, 99.98);
                assert_eq!(metadata["stability"], "D", "dynamic flag kept");
            }
            other => panic!("{other:?}"),
        }
        for (line, msg) in [
            ("S I", "not executable"),
            ("S +", "overload"),
            ("S -", "underload"),
            ("ES", "syntax error"),
            ("ET", "transmission error"),
            ("EL", "logical error"),
        ] {
            match p.parse(line) {
                Parsed::DeviceError { message, .. } => {
                    assert!(message.contains(msg), "{line}: {message}")
                }
                other => panic!("{line}: {other:?}"),
            }
        }
        assert!(matches!(p.parse("garbage"), Parsed::NoMatch(_)));
    }

    #[test]
    fn keithley_2400_read_csv_skips_not_measured() {
        let p = shipped("keithley-2400");
        let got = values(
            p.parse("+1.000000E+00,+1.021450E-06,+9.910000E+37,+2.515590E+03,+2.150800E+04"),
        );
        assert_eq!(
            got,
            [
                ("voltage".to_string(), 1.0, "V".to_string()),
                ("current".to_string(), 1.02145e-6, "A".to_string())
            ]
        );
    }

    #[test]
    fn keithley_2000_reading_with_unit_suffix() {
        let p = shipped("keithley-2000");
        assert_eq!(
            values(p.parse("+1.12006772E+00VDC,+0.000SECS,+00000RDNG#")),
            [("voltage".to_string(), 1.12006772, "V".to_string())]
        );
        assert!(matches!(
            p.parse("-113,\"Undefined header\""),
            Parsed::DeviceError { .. } | Parsed::NoMatch(_)
        ));
    }

    #[test]
    fn csv_sensor_with_scale() {
        let p = shipped("csv-sensor");
        let got = values(p.parse("235,45.5,1013.2"));
        assert_eq!(got[0], ("temperature".to_string(), 23.5, "°C".to_string()));
        assert_eq!(got.len(), 3);
        assert!(matches!(p.parse("235,45.5"), Parsed::NoMatch(_)));
        assert!(matches!(p.parse("abc,1,2"), Parsed::NoMatch(_)));
    }

    #[test]
    fn profile_errors_name_the_key() {
        let mut prof = shipped("csv-sensor").profile;
        prof.quantities[0].field = "nope".into();
        assert!(Compiled::new(prof)
            .unwrap_err()
            .to_string()
            .contains("quantities[0].field"));
        let mut prof = shipped("mettler-mt-sics").profile;
        prof.parser = Parser::Regex {
            pattern: "(".into(),
        };
        assert!(Compiled::new(prof)
            .unwrap_err()
            .to_string()
            .contains("parser.pattern"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_lines_never_panic_any_shipped_profile(line in "\\PC{0,120}") {
            for name in ["mettler-mt-sics", "keithley-2400", "keithley-2000", "csv-sensor"] {
                let _ = shipped(name).parse(&line);
            }
        }
    }
}
