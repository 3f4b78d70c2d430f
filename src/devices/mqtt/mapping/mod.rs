//! (topic, payload) → sensor readings, per subscription: a plain number, JSON with field
//! paths, or a preset for a payload convention (Tasmota, Zigbee2MQTT, Homie 5, Sparkplug B;
//! docs/protocols.md §6). Pure logic with caches (Z2M units, Homie descriptions, Sparkplug
//! alias tables); never panics on any input (a property test feeds it 10⁶ payloads).

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod homie;
mod tasmota;
mod zigbee2mqtt;

use super::sparkplug;
use super::topic::{fill, placeholders, Pattern, Vars};
pub use super::types::{Mapped, Note, Outgoing, Reading};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// How a subscription's payloads are read.
pub enum Format {
    /// The payload is one number; ids and type from the topic.
    Number,
    /// JSON; `value`, `unit_path`, `timestamp` are field paths.
    Json,
    /// Tasmota's `tele/<topic>/SENSOR` JSON.
    Tasmota,
    /// Zigbee2MQTT device state JSON under its base topic.
    Zigbee2mqtt,
    /// Homie 5 property values, typed by the device's `$description`.
    Homie,
    /// Sparkplug B protobuf payloads (births, data, deaths).
    Sparkplug,
}

/// `[[devices.subscriptions]]` of an MQTT device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// How payloads are read.
    pub format: Format,
    /// Topic pattern; `+name` / `#name` name a level for templates. Presets have a
    /// default (`tele/+topic/SENSOR`, `zigbee2mqtt`, `homie/5`, `spBv1.0/+`), which for
    /// Zigbee2MQTT, Homie and Sparkplug is the base topic.
    #[serde(default)]
    pub topic: Option<String>,
    /// number / json: sensor id template (default: the one named wildcard).
    #[serde(default)]
    pub sensor_id: Option<String>,
    /// number / json: sensor type template.
    #[serde(default)]
    pub sensor_type: Option<String>,
    /// number / json: a fixed unit.
    #[serde(default)]
    pub unit: Option<String>,
    /// json: path of the value, e.g. `data.temp` or `readings.0.v`.
    #[serde(default)]
    pub value: Option<String>,
    /// json: path of the unit.
    #[serde(default)]
    pub unit_path: Option<String>,
    /// json: path of the timestamp (RFC 3339, or Unix seconds / milliseconds).
    #[serde(default)]
    pub timestamp: Option<String>,
    /// Presets: quantities to leave out (e.g. `linkquality`).
    #[serde(default)]
    pub ignore: Vec<String>,
}

impl Subscription {
    fn default_topic(&self) -> &'static str {
        match self.format {
            Format::Tasmota => "tele/+topic/SENSOR",
            Format::Zigbee2mqtt => "zigbee2mqtt",
            Format::Homie => "homie/5",
            Format::Sparkplug => "spBv1.0/+",
            Format::Number | Format::Json => "",
        }
    }

    /// The topic pattern to subscribe to: configured, or the preset's default.
    pub fn topic(&self) -> &str {
        self.topic.as_deref().unwrap_or(self.default_topic())
    }

    /// The MQTT filters to subscribe to.
    pub fn filters(&self) -> Result<Vec<String>, String> {
        let base = self.topic().trim_end_matches('/');
        Ok(match self.format {
            Format::Number | Format::Json | Format::Tasmota => vec![Pattern::parse(base)?.filter()],
            Format::Zigbee2mqtt => vec![format!("{base}/#")],
            Format::Homie => vec![format!("{base}/+/$description"), format!("{base}/+/+/+")],
            Format::Sparkplug => vec![format!("{base}/#")],
        })
    }

    /// Checks the fields this format uses; (key, message) on error.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let topic = self.topic();
        if topic.is_empty() {
            return Err((
                "topic".into(),
                format!("is required for format {:?}", self.format),
            ));
        }
        let pattern = Pattern::parse(topic).map_err(|m| ("topic".to_string(), m))?;
        let only = |fields: &[(&str, bool)]| -> Result<(), (String, String)> {
            for (name, set) in fields {
                if *set {
                    return Err((
                        (*name).to_string(),
                        format!("is not used by format {:?}", self.format),
                    ));
                }
            }
            Ok(())
        };
        match self.format {
            Format::Number | Format::Json => {
                let names = pattern.names();
                if self.sensor_id.is_none() && names.len() != 1 {
                    return Err((
                        "sensor_id".into(),
                        "is required unless the topic has exactly one named wildcard (e.g. lab/+id/temperature)".into(),
                    ));
                }
                let Some(st) = &self.sensor_type else {
                    return Err(("sensor_type".into(), "is required".into()));
                };
                for (key, t) in [
                    ("sensor_id", self.sensor_id.as_deref()),
                    ("sensor_type", Some(st.as_str())),
                ] {
                    for p in placeholders(t.unwrap_or("")) {
                        if !names.contains(&p) {
                            return Err((
                                key.into(),
                                format!("{{{p}}} is not a named wildcard of the topic"),
                            ));
                        }
                    }
                }
                if self.format == Format::Json {
                    if self.value.as_deref().unwrap_or("").is_empty() {
                        return Err((
                            "value".into(),
                            "is required for format json (a field path)".into(),
                        ));
                    }
                    if self.unit.is_some() && self.unit_path.is_some() {
                        return Err(("unit".into(), "set unit or unit_path, not both".into()));
                    }
                } else {
                    only(&[
                        ("value", self.value.is_some()),
                        ("unit_path", self.unit_path.is_some()),
                        ("timestamp", self.timestamp.is_some()),
                    ])?;
                }
                only(&[("ignore", !self.ignore.is_empty())])
            }
            _ => {
                if matches!(self.format, Format::Zigbee2mqtt | Format::Homie)
                    && topic.contains(['+', '#'])
                {
                    return Err((
                        "topic".into(),
                        "is a base topic here, without wildcards".into(),
                    ));
                }
                only(&[
                    ("sensor_id", self.sensor_id.is_some()),
                    ("sensor_type", self.sensor_type.is_some()),
                    ("unit", self.unit.is_some()),
                    ("value", self.value.is_some()),
                    ("unit_path", self.unit_path.is_some()),
                    ("timestamp", self.timestamp.is_some()),
                ])
            }
        }
    }
}

/// Homie: node → property → (datatype, unit).
type HomieDevice = HashMap<String, HashMap<String, (String, String)>>;

/// A subscription ready to map, with its caches.
struct Sub {
    cfg: Subscription,
    /// Zigbee2MQTT: friendly name → property → unit (from `bridge/devices`).
    z2m_units: HashMap<String, HashMap<String, String>>,
    /// Homie: device → node → property → (datatype, unit) (from `$description`).
    homie: HashMap<String, HomieDevice>,
    sparkplug: sparkplug::Host,
}

/// Maps messages of one MQTT connection through its subscriptions.
pub struct Mapper {
    /// Each subscription with its pattern, kept apart so a match can borrow the
    /// pattern while the subscription updates its caches.
    subs: Vec<(Pattern, Sub)>,
}

impl Mapper {
    /// Builds the mapper; subscriptions must have passed `validate`.
    pub fn new(subs: &[Subscription]) -> Result<Mapper, String> {
        let mut out = Vec::with_capacity(subs.len());
        for s in subs {
            let pattern = match s.format {
                Format::Number | Format::Json | Format::Tasmota => Pattern::parse(s.topic())?,
                _ => Pattern::parse(&format!("{}/#rest", s.topic().trim_end_matches('/')))?,
            };
            out.push((
                pattern,
                Sub {
                    cfg: s.clone(),
                    z2m_units: HashMap::new(),
                    homie: HashMap::new(),
                    sparkplug: sparkplug::Host::default(),
                },
            ));
        }
        Ok(Mapper { subs: out })
    }

    /// Every filter to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        let mut f: Vec<String> = self
            .subs
            .iter()
            .flat_map(|(_, s)| s.cfg.filters().unwrap_or_default())
            .collect();
        f.dedup();
        f
    }

    /// Maps one message by the first subscription whose pattern matches. `Err` is a
    /// malformed payload, with what is wrong.
    pub fn map(&mut self, topic: &str, payload: &[u8], now: SystemTime) -> Result<Mapped, String> {
        for (pattern, s) in &mut self.subs {
            let Some(vars) = pattern.matches(topic) else {
                continue;
            };
            return s.map(topic, &vars, payload, now);
        }
        Ok(Mapped {
            ignored: true,
            ..Mapped::default()
        })
    }
}

impl Sub {
    fn map(
        &mut self,
        topic: &str,
        vars: &Vars<'_>,
        payload: &[u8],
        now: SystemTime,
    ) -> Result<Mapped, String> {
        let mut out = Mapped::default();
        match self.cfg.format {
            Format::Number => {
                let text =
                    std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_string())?;
                let value = parse_number(text.trim())?;
                out.readings
                    .push(self.templated(vars, value, self.cfg.unit.clone(), None)?);
            }
            Format::Json => {
                let v: Value = json(payload)?;
                let path = self.cfg.value.as_deref().unwrap_or("");
                let value = match lookup(&v, path) {
                    Some(Value::Number(n)) => {
                        n.as_f64().filter(|x| crate::record::usable_value(*x))
                    }
                    Some(Value::String(s)) => parse_number(s.trim()).ok(),
                    Some(Value::Bool(b)) => Some(f64::from(u8::from(*b))),
                    _ => None,
                }
                .ok_or_else(|| format!("no number at {path:?}"))?;
                let unit = match &self.cfg.unit_path {
                    Some(p) => match lookup(&v, p) {
                        Some(Value::String(s)) => Some(s.clone()),
                        _ => return Err(format!("no unit string at {p:?}")),
                    },
                    None => self.cfg.unit.clone(),
                };
                let time = match &self.cfg.timestamp {
                    Some(p) => Some(
                        lookup(&v, p)
                            .and_then(parse_time)
                            .ok_or_else(|| format!("no timestamp at {p:?}"))?,
                    ),
                    None => None,
                };
                out.readings.push(self.templated(vars, value, unit, time)?);
            }
            Format::Tasmota => self.tasmota(vars, payload, &mut out)?,
            Format::Zigbee2mqtt => self.zigbee2mqtt(vars, payload, &mut out)?,
            Format::Homie => self.homie(vars, payload, &mut out)?,
            Format::Sparkplug => {
                out = self.sparkplug.handle(topic, payload, now)?;
                let ignore = &self.cfg.ignore;
                out.readings.retain(|r| !ignore.contains(&r.sensor_type));
            }
        }
        Ok(out)
    }

    fn templated(
        &self,
        vars: &Vars<'_>,
        value: f64,
        unit: Option<String>,
        time: Option<SystemTime>,
    ) -> Result<Reading, String> {
        let sensor_id = match &self.cfg.sensor_id {
            Some(t) => fill(t, vars)?,
            None => vars.first_by_name().unwrap_or_default().to_string(),
        };
        if sensor_id.is_empty() {
            return Err("empty sensor id from the topic".into());
        }
        let sensor_type = fill(self.cfg.sensor_type.as_deref().unwrap_or(""), vars)?;
        Ok(Reading {
            sensor_id,
            sensor_type,
            value,
            unit: unit.unwrap_or_default(),
            time,
            metadata: BTreeMap::new(),
        })
    }
}

fn json(payload: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))
}

fn parse_number(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| {
        let shown: String = s.chars().take(40).collect();
        format!("not a number: {shown:?}")
    })?;
    if crate::record::usable_value(v) {
        Ok(v)
    } else {
        Err(format!(
            "not a usable number (NaN, infinite, or beyond ±1e100): {s:?}"
        ))
    }
}

/// `a.b.0.c`: object keys and array indices.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A timestamp: Unix seconds or milliseconds (by magnitude: 10^11 and above are
/// milliseconds), or RFC 3339 with `Z` or an offset; a time without a zone is taken as
/// UTC. Times that cannot be represented (before 1970, after 9999) are `None`.
pub fn parse_time(v: &Value) -> Option<SystemTime> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_u64() {
                return if i >= 100_000_000_000 {
                    crate::time::from_unix_ms(i)
                } else {
                    crate::time::from_unix_ms(i.checked_mul(1000)?)
                };
            }
            let x = n.as_f64()?;
            let secs = if x >= 1e11 { x / 1000.0 } else { x };
            crate::time::from_unix_secs_f64(secs)
        }
        Value::String(s) => crate::time::parse_rfc3339(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sub(toml_text: &str) -> Subscription {
        let s: Subscription = toml::from_str(toml_text).unwrap();
        s.validate().unwrap();
        s
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn a_plain_number_takes_its_id_from_the_topic() {
        let mut m = Mapper::new(&[sub(
            "format = \"number\"\ntopic = \"lab/+id/temperature\"\nsensor_type = \"temperature\"\nunit = \"°C\"\n",
        )])
        .unwrap();
        assert_eq!(m.filters(), ["lab/+/temperature"]);
        let r = m.map("lab/t-001/temperature", b" 21.5\n", now()).unwrap();
        assert_eq!(
            r.readings,
            [Reading {
                sensor_id: "t-001".into(),
                sensor_type: "temperature".into(),
                value: 21.5,
                unit: "°C".into(),
                time: None,
                metadata: BTreeMap::new()
            }]
        );
        assert!(m.map("lab/t-001/temperature", b"warm", now()).is_err());
        assert!(m.map("lab/t-001/temperature", b"NaN", now()).is_err());
        assert!(m
            .map("lab/t-001/temperature", &[0xff, 0xfe], now())
            .is_err());
        assert!(m.map("other/topic", b"1", now()).unwrap().ignored);
    }

    #[test]
    fn json_paths_give_value_unit_and_time() {
        let mut m = Mapper::new(&[sub(
            "format = \"json\"\ntopic = \"lab/+room/+id\"\nsensor_id = \"{room}-{id}\"\nsensor_type = \"co2\"\nvalue = \"data.0.v\"\nunit_path = \"data.0.u\"\ntimestamp = \"ts\"\n",
        )])
        .unwrap();
        let r = m
            .map(
                "lab/b1/s7",
                br#"{"ts":"2026-01-02T03:04:05.250+01:00","data":[{"v":412,"u":"ppm"}]}"#,
                now(),
            )
            .unwrap();
        let x = &r.readings[0];
        assert_eq!(
            (x.sensor_id.as_str(), x.value, x.unit.as_str()),
            ("b1-s7", 412.0, "ppm")
        );
        assert_eq!(
            x.time,
            Some(humantime::parse_rfc3339("2026-01-02T02:04:05.250Z").unwrap())
        );
        assert!(m.map("lab/b1/s7", br#"{"data":[]}"#, now()).is_err());
        assert_eq!(
            parse_time(&serde_json::json!(1_700_000_000_123u64)),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
        assert_eq!(
            parse_time(&serde_json::json!(1_700_000_000)),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
    }

    #[test]
    fn tasmota_sensor_messages_use_the_unit_fields() {
        let mut m = Mapper::new(&[sub("format = \"tasmota\"\n")]).unwrap();
        let r = m
            .map(
                "tele/bench-3/SENSOR",
                br#"{"Time":"2019-11-03T19:34:28","BME280":{"Temperature":71.1,"Humidity":66.6,"Pressure":988.6},"PressureUnit":"hPa","TempUnit":"F"}"#,
                now(),
            )
            .unwrap();
        let got: Vec<(String, String, f64, String)> = r
            .readings
            .iter()
            .map(|x| {
                (
                    x.sensor_id.clone(),
                    x.sensor_type.clone(),
                    x.value,
                    x.unit.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("bench-3/BME280".into(), "humidity".into(), 66.6, "%".into()),
                (
                    "bench-3/BME280".into(),
                    "pressure".into(),
                    988.6,
                    "hPa".into()
                ),
                (
                    "bench-3/BME280".into(),
                    "temperature".into(),
                    71.1,
                    "°F".into()
                ),
            ]
        );
        assert_eq!(r.readings[2].metadata["device_time"], "2019-11-03T19:34:28");
        assert!(m.map("tele/x/SENSOR", b"[1,2]", now()).is_err());
    }

    #[test]
    fn zigbee2mqtt_joins_units_from_bridge_devices() {
        let mut m = Mapper::new(&[sub(
            "format = \"zigbee2mqtt\"\nignore = [\"linkquality\"]\n",
        )])
        .unwrap();
        assert_eq!(m.filters(), ["zigbee2mqtt/#"]);
        let devices = br#"[{"friendly_name":"room/th1","ieee_address":"0x1","definition":{"exposes":[
            {"type":"numeric","property":"temperature","unit":"\u00b0C","access":1},
            {"type":"climate","features":[{"type":"numeric","property":"humidity","unit":"%"}]}]}}]"#;
        assert!(
            m.map("zigbee2mqtt/bridge/devices", devices, now())
                .unwrap()
                .ignored
        );
        let r = m
            .map(
                "zigbee2mqtt/room/th1",
                br#"{"temperature":27.34,"humidity":44.72,"linkquality":90,"state":"ON","last_seen":1700000000000}"#,
                now(),
            )
            .unwrap();
        let got: Vec<(&str, f64, &str)> = r
            .readings
            .iter()
            .map(|x| (x.sensor_type.as_str(), x.value, x.unit.as_str()))
            .collect();
        assert_eq!(
            got,
            [("humidity", 44.72, "%"), ("temperature", 27.34, "°C")]
        );
        assert_eq!(r.readings[0].sensor_id, "room/th1");
        assert!(r.readings[0].time.is_some());
        for t in [
            "zigbee2mqtt/room/th1/set",
            "zigbee2mqtt/bridge/state",
            "zigbee2mqtt/x/availability",
        ] {
            assert!(m.map(t, b"online", now()).unwrap().ignored, "{t}");
        }
        assert!(m.map("zigbee2mqtt/room/th1", b"{", now()).is_err());
    }

    #[test]
    fn homie_values_are_typed_by_the_description() {
        let mut m = Mapper::new(&[sub("format = \"homie\"\n")]).unwrap();
        assert_eq!(m.filters(), ["homie/5/+/$description", "homie/5/+/+/+"]);
        let desc = r#"{"homie":"5.0","version":1,"nodes":{"env":{"properties":{
            "temperature":{"datatype":"float","unit":"°C"},
            "door":{"datatype":"boolean"},"label":{"datatype":"string"}}}}}"#;
        assert!(
            m.map("homie/5/box1/$description", desc.as_bytes(), now())
                .unwrap()
                .ignored
        );
        let r = m
            .map("homie/5/box1/env/temperature", b"21.5", now())
            .unwrap();
        assert_eq!(r.readings[0].sensor_id, "box1/env");
        assert_eq!(r.readings[0].unit, "°C");
        assert_eq!(
            m.map("homie/5/box1/env/door", b"true", now())
                .unwrap()
                .readings[0]
                .value,
            1.0
        );
        assert!(
            m.map("homie/5/box1/env/label", b"hello", now())
                .unwrap()
                .ignored
        );
        assert!(m
            .map("homie/5/box1/env/temperature", b"hot", now())
            .is_err());
        assert!(m.map("homie/5/box1/env/door", b"maybe", now()).is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |t: &str| {
            toml::from_str::<Subscription>(t)
                .unwrap()
                .validate()
                .unwrap_err()
                .0
        };
        assert_eq!(
            bad("format = \"number\"\ntopic = \"a/+/b\"\nsensor_type = \"t\"\n"),
            "sensor_id"
        );
        assert_eq!(
            bad("format = \"number\"\ntopic = \"a/+id/b\"\n"),
            "sensor_type"
        );
        assert_eq!(
            bad("format = \"json\"\ntopic = \"a/+id\"\nsensor_type = \"t\"\n"),
            "value"
        );
        assert_eq!(
            bad("format = \"number\"\ntopic = \"a/+id\"\nsensor_type = \"{x}\"\n"),
            "sensor_type"
        );
        assert_eq!(bad("format = \"tasmota\"\nunit = \"C\"\n"), "unit");
        assert_eq!(bad("format = \"number\"\nsensor_type = \"t\"\n"), "topic");
        assert_eq!(bad("format = \"homie\"\ntopic = \"homie/+\"\n"), "topic");
    }

    /// ≥ 10⁶ generated payloads (mutated valid ones of every convention, random bytes)
    /// on matching and random topics: none panics, and both outcomes occur.
    #[test]
    fn a_million_random_payloads_never_panic() {
        use crate::devices::simulated::Rng;
        use prost::Message;
        let subs: Vec<Subscription> = [
            "format = \"number\"\ntopic = \"lab/+id/temperature\"\nsensor_type = \"temperature\"\n",
            "format = \"json\"\ntopic = \"j/+id\"\nsensor_type = \"t\"\nvalue = \"a.0.v\"\nunit_path = \"a.0.u\"\ntimestamp = \"ts\"\n",
            "format = \"tasmota\"\n",
            "format = \"zigbee2mqtt\"\n",
            "format = \"homie\"\n",
            "format = \"sparkplug\"\n",
        ]
        .iter()
        .map(|t| sub(t))
        .collect();
        let mut m = Mapper::new(&subs).unwrap();
        let spb = sparkplug::Payload {
            timestamp: Some(1_700_000_000_000),
            seq: Some(1),
            metrics: vec![sparkplug::Metric::new(
                "temperature",
                Some(1),
                sparkplug::MetricValue::Double(21.5),
                sparkplug::datatype::DOUBLE,
            )
            .with_property("engUnit", "°C")],
            ..Default::default()
        }
        .encode_to_vec();
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            ("lab/t1/temperature", b"21.5".to_vec()),
            ("j/s1", br#"{"ts":"2026-01-02T03:04:05+01:00","a":[{"v":1.5,"u":"C"}]}"#.to_vec()),
            ("tele/x/SENSOR", br#"{"Time":"2019-11-03T19:34:28","BME280":{"Temperature":21.7,"Humidity":66.6},"TempUnit":"C"}"#.to_vec()),
            ("zigbee2mqtt/bridge/devices", br#"[{"friendly_name":"th","definition":{"exposes":[{"property":"temperature","unit":"C","features":[{"property":"h","unit":"%"}]}]}}]"#.to_vec()),
            ("zigbee2mqtt/th", br#"{"temperature":27.3,"last_seen":"2026-01-02T03:04:05Z"}"#.to_vec()),
            ("homie/5/d/$description", br#"{"nodes":{"n":{"properties":{"p":{"datatype":"float","unit":"V"}}}}}"#.to_vec()),
            ("homie/5/d/n/p", b"1.25".to_vec()),
            ("spBv1.0/G/NBIRTH/n", spb.clone()),
            ("spBv1.0/G/DBIRTH/n/d", spb.clone()),
            ("spBv1.0/G/DDATA/n/d", spb),
        ];
        let words = [
            "lab",
            "+",
            "#",
            "$description",
            "spBv1.0",
            "NDATA",
            "DDEATH",
            "bridge",
            "devices",
            "tele",
            "SENSOR",
            "homie",
            "5",
            "",
            "zigbee2mqtt",
            "set",
        ];
        let mut rng = Rng::new(0x5eed);
        let (mut mapped, mut malformed) = (0u64, 0u64);
        for i in 0..1_000_000u32 {
            let (topic, seed) = &seeds[(rng.next_u64() % seeds.len() as u64) as usize];
            let mut p = seed.clone();
            let topic = if i % 10 == 0 {
                let n = 1 + rng.next_u64() % 6;
                (0..n)
                    .map(|_| words[(rng.next_u64() % words.len() as u64) as usize])
                    .collect::<Vec<_>>()
                    .join("/")
            } else {
                (*topic).to_string()
            };
            match rng.next_u64() % 8 {
                0 => {
                    let n = (rng.next_u64() % 64) as usize;
                    p = (0..n).map(|_| rng.next_u64() as u8).collect();
                }
                1 => p.truncate((rng.next_u64() as usize) % (p.len() + 1)),
                2 => p.clear(),
                3 if i % 4 == 0 => {} // the seed as it is
                _ => {
                    for _ in 0..(1 + rng.next_u64() % 4) {
                        let pos = (rng.next_u64() as usize) % (p.len() + 1);
                        match rng.next_u64() % 3 {
                            0 if pos < p.len() => p[pos] = rng.next_u64() as u8,
                            1 => p.insert(
                                pos,
                                b"{}[]\":,.-0123456789eE+ \\u"[(rng.next_u64() % 25) as usize],
                            ),
                            _ if pos < p.len() => {
                                p.remove(pos);
                            }
                            _ => {}
                        }
                    }
                }
            }
            match m.map(&topic, &p, SystemTime::now()) {
                Ok(r) if !r.readings.is_empty() => mapped += 1,
                Ok(_) => {}
                Err(_) => malformed += 1,
            }
        }
        assert!(mapped > 10_000, "mapped {mapped}");
        assert!(malformed > 100_000, "malformed {malformed}");
    }
}
