//! Poison input through the whole path, not only the parsers.
//!
//! Well-shaped messages of every MQTT convention (and Sparkplug, serial lines, commands)
//! carry extreme values: times before 1970 and after 9999, offsets that push a time out
//! of range, Unix numbers near `u64::MAX`, NaN / ±inf / 1e308 / huge integers, deep
//! nesting, duplicate keys, non-UTF-8 bytes, huge strings. Each mapped reading becomes a
//! record the way the MQTT driver makes it and goes through the real ingest task (edge
//! pipeline with thresholds and aggregates, stamping, the sled buffer). Afterwards the
//! ingest task must have ended cleanly, and every record in the buffer must be valid
//! JSON with a representable timestamp and no null where a number belongs.
#![cfg(test)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use serde_json::Value;

use crate::buffer::Buffer;
use crate::devices::mqtt::mapping::{Mapper, Subscription};
use crate::devices::mqtt::sparkplug;
use crate::devices::simulated::Rng;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineConfig};

/// Times as JSON texts: fine, out of range, out of range after the offset, garbage.
const TIMES: &[&str] = &[
    "\"2026-01-02T03:04:05Z\"",
    "\"1970-01-01T00:00:00+00:01\"",
    "\"1970-01-01T00:00:00Z\"",
    "\"0000-01-01T00:00:00Z\"",
    "\"9999-12-31T23:59:59.999Z\"",
    "\"9999-12-31T23:59:59-01:00\"",
    "\"+275760-09-13T00:00:00Z\"",
    "\"2026-13-45T25:61:61Z\"",
    "\"2026-01-02T03:04:05+99:99\"",
    "\"\"",
    "253402300800000",
    "253402300799999",
    "18446744073709551615",
    "-1",
    "1e300",
    "-1e300",
    "1.5",
    "0",
    "99999999999.999",
    "null",
    "[]",
];

/// Values as JSON texts.
const NUMBERS: &[&str] = &[
    "21.5",
    "-0.0",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "5e-324",
    "1e101",
    "1e100",
    "18446744073709551615",
    "-9223372036854775808",
    "1e309",
    "\"NaN\"",
    "\"inf\"",
    "\"-Infinity\"",
    "\"1e400\"",
    "\"12.5\"",
    "true",
    "null",
    "{}",
];

struct Gen(Rng);

impl Gen {
    fn pick<'a>(&mut self, xs: &'a [&'a str]) -> &'a str {
        xs[(self.0.next_u64() % xs.len() as u64) as usize]
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n
    }
    fn time(&mut self) -> &'static str {
        self.pick(TIMES)
    }
    fn number(&mut self) -> &'static str {
        self.pick(NUMBERS)
    }

    /// A structural twist on a JSON text: duplicate keys, deep nesting, a huge string,
    /// non-UTF-8 bytes, truncation. Most messages stay well-formed.
    fn twist(&mut self, json: String) -> Vec<u8> {
        match self.below(12) {
            0 => {
                let depth = 20 + self.below(300) as usize;
                format!("{}{}{}", "[".repeat(depth), json, "]".repeat(depth)).into_bytes()
            }
            1 => {
                // The same object twice over: every key duplicated.
                let inner = json.trim_start_matches('{').trim_end_matches('}');
                format!("{{{inner},{inner}}}").into_bytes()
            }
            2 => {
                let mut b = json.into_bytes();
                let at = (self.below(b.len() as u64 + 1)) as usize;
                b.insert(at.min(b.len()), 0xff);
                b.insert(at.min(b.len()), 0xc3);
                b
            }
            3 => {
                let b = json.into_bytes();
                let cut = self.below(b.len() as u64 + 1) as usize;
                b[..cut].to_vec()
            }
            4 => json
                .replacen('{', &format!("{{\"x\":\"{}\",", "é".repeat(20_000)), 1)
                .into_bytes(),
            _ => json.into_bytes(),
        }
    }

    /// Sparkplug payload with extreme timestamps, seqs and values.
    fn sparkplug(&mut self, birth: bool) -> Vec<u8> {
        let ts = [
            1_700_000_000_000u64,
            253_402_300_800_000,
            253_402_300_799_999,
            u64::MAX,
            0,
        ];
        let t = |g: &mut Gen| ts[g.below(ts.len() as u64) as usize];
        let vals = [
            sparkplug::MetricValue::Double(21.5),
            sparkplug::MetricValue::Double(f64::NAN),
            sparkplug::MetricValue::Double(f64::INFINITY),
            sparkplug::MetricValue::Double(1e308),
            sparkplug::MetricValue::Float(f32::NEG_INFINITY),
            sparkplug::MetricValue::Long(u64::MAX),
            sparkplug::MetricValue::Int(u32::MAX),
        ];
        let v = vals[self.below(vals.len() as u64) as usize].clone();
        let mut metric =
            sparkplug::Metric::new("temperature", Some(1), v, sparkplug::datatype::DOUBLE)
                .with_property("engUnit", "°C");
        metric.timestamp = Some(t(self));
        sparkplug::Payload {
            timestamp: Some(t(self)),
            seq: Some(if birth { 0 } else { self.below(300) }),
            metrics: vec![metric],
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// One message: (topic, payload).
    fn message(&mut self) -> (String, Vec<u8>) {
        let n = self.below(4);
        match self.below(7) {
            0 => (
                format!("lab/t{n}/temperature"),
                self.number().trim_matches('"').as_bytes().to_vec(),
            ),
            1 => {
                let j = format!(
                    "{{\"ts\":{},\"a\":[{{\"v\":{},\"u\":\"C\"}}]}}",
                    self.time(),
                    self.number()
                );
                (format!("j/s{n}"), self.twist(j))
            }
            2 => {
                let j = format!(
                    "{{\"Time\":{},\"BME280\":{{\"Temperature\":{},\"Humidity\":{}}},\"TempUnit\":\"C\"}}",
                    self.time(),
                    self.number(),
                    self.number()
                );
                ("tele/x/SENSOR".into(), self.twist(j))
            }
            3 => {
                let j = format!(
                    "{{\"temperature\":{},\"last_seen\":{}}}",
                    self.number(),
                    self.time()
                );
                ("zigbee2mqtt/th".into(), self.twist(j))
            }
            4 => (
                "homie/5/d/n/p".into(),
                self.number().trim_matches('"').as_bytes().to_vec(),
            ),
            5 => (format!("spBv1.0/G/DDATA/n{n}/d"), self.sparkplug(false)),
            _ => (format!("spBv1.0/G/NBIRTH/n{n}"), self.sparkplug(true)),
        }
    }
}

fn subscriptions() -> Vec<Subscription> {
    [
        "format = \"number\"\ntopic = \"lab/+id/temperature\"\nsensor_type = \"temperature\"\n",
        "format = \"json\"\ntopic = \"j/+id\"\nsensor_type = \"temperature\"\nvalue = \"a.0.v\"\nunit_path = \"a.0.u\"\ntimestamp = \"ts\"\n",
        "format = \"tasmota\"\n",
        "format = \"zigbee2mqtt\"\n",
        "format = \"homie\"\n",
        "format = \"sparkplug\"\n",
    ]
    .iter()
    .map(|t| {
        let s: Subscription = toml::from_str(t).unwrap_or_else(|e| panic!("{e}"));
        s.validate().unwrap_or_else(|e| panic!("{e:?}"));
        s
    })
    .collect()
}

fn pipeline_config() -> PipelineConfig {
    toml::from_str(
        r#"
[[thresholds]]
sensor_type = "temperature"
min = 10.0
max = 30.0

[aggregates]
window = "1s"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Checks one stored record: valid JSON, a representable timestamp, no null numbers.
fn check_record(payload: &[u8]) {
    let v: Value = serde_json::from_slice(payload).unwrap_or_else(|e| {
        panic!(
            "stored record is not JSON ({e}): {:?}",
            String::from_utf8_lossy(payload)
        )
    });
    let ts = v["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("no timestamp: {v}"));
    assert!(
        crate::time::parse_rfc3339(ts).is_some(),
        "timestamp {ts:?} not representable: {v}"
    );
    for k in ["value", "avg", "min", "max", "threshold"] {
        if let Some(x) = v.get(k) {
            assert!(x.is_number(), "{k} is not a number: {v}");
        }
    }
}

const CASES: u64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_extreme_messages_pass_through_ingest_and_stamp_without_a_panic() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = crate::buffer::BufferConfig {
        max_bytes: 1 << 30,
        min_free_bytes: Some(0),
        ..Default::default()
    };
    let buffer = Arc::new(Buffer::open(dir.path(), &cfg).unwrap_or_else(|e| panic!("{e}")));
    let metrics = Arc::new(Metrics::new());
    let (ingest, rx) = crate::ingest::channel(8192);
    let task = tokio::spawn(crate::ingest::run(
        rx,
        crate::ingest::IngestStage {
            buffer: buffer.clone(),
            agent_id: "poison".into(),
            commit_interval: Duration::from_millis(50),
            metrics: metrics.clone(),
            pipeline: Pipeline::new(&pipeline_config(), metrics.clone()),
            drain: Default::default(),
            drained: None,
            topic_names: Default::default(),
            live: std::sync::Arc::new(crate::live::Live::new(serde_json::Value::Null)),
        },
    ));
    let mut mapper = Mapper::new(&subscriptions()).unwrap_or_else(|e| panic!("{e}"));
    // Conventions' metadata first (retained topics), some of it extreme too.
    let now = SystemTime::now();
    for (t, p) in [
        (
            "zigbee2mqtt/bridge/devices",
            &br#"[{"friendly_name":"th","definition":{"exposes":[{"property":"temperature","unit":"C"}]}}]"#[..],
        ),
        (
            "homie/5/d/$description",
            &br#"{"nodes":{"n":{"properties":{"p":{"datatype":"float","unit":"C"}}}}}"#[..],
        ),
    ] {
        mapper.map(t, p, now).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut g = Gen(Rng::new(0x0090_150a));
    let (mut readings, mut refused) = (0u64, 0u64);
    for _ in 0..CASES {
        let (topic, payload) = g.message();
        match mapper.map(&topic, &payload, now) {
            Ok(m) => {
                for r in m.readings {
                    readings += 1;
                    let d = crate::devices::mqtt::reading_draft("mqtt-x", None, r, now);
                    ingest
                        .send(d)
                        .await
                        .unwrap_or_else(|e| panic!("ingest died: {e}"));
                }
            }
            Err(_) => refused += 1,
        }
    }
    drop(ingest);
    task.await
        .unwrap_or_else(|e| panic!("ingest panicked: {e}"))
        .unwrap_or_else(|e| panic!("ingest failed: {e}"));
    // Both outcomes happened, in bulk: the generator reaches the mapping and the refusal.
    assert!(readings > CASES / 10, "{readings} readings");
    assert!(refused > CASES / 10, "{refused} refused");
    let mut stored = 0u64;
    let mut fallbacks = 0u64;
    while let Some(recs) = buffer.read_next().unwrap_or_else(|e| panic!("{e}")) {
        for (_, r) in recs {
            stored += 1;
            if stored % 7 == 0 {
                check_record(&r.payload);
            }
            if r.payload.windows(20).any(|w| w == b"source_time_rejected") {
                fallbacks += 1;
            }
        }
    }
    assert!(stored >= readings, "{stored} stored of {readings}");
    // Out-of-range times are refused where they enter (the receive time is used), so the
    // stamp's own fallback is the last line of defence and is not needed here.
    assert_eq!(fallbacks, 0);
    eprintln!("poison: {CASES} messages, {readings} readings, {refused} refused, {stored} records stored, 0 panics");
}

/// The stamp's fallback itself, on drafts whose times no parser would produce.
#[test]
fn drafts_with_impossible_times_are_stamped_with_the_receive_time() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut rng = Rng::new(7);
    for i in 0..100_000u64 {
        let t = match i % 4 {
            0 => SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(rng.next_u64() >> 20)),
            1 => SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(rng.next_u64() >> 30)),
            2 => SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(
                crate::time::MAX_UNIX_MS + (rng.next_u64() >> 40),
            )),
            _ => Some(now),
        };
        let d = crate::record::Draft {
            time: t,
            ..crate::record::Draft::agent_event("x", serde_json::Map::new())
        };
        let s = crate::record::stamp(&d, "a", i, now).unwrap_or_else(|e| panic!("{e}"));
        check_record(&s.payload);
    }
}

/// Commands with extreme times, durations, sizes and shapes: every one is answered,
/// none panics, none with an impossible lifetime is accepted.
#[test]
fn extreme_commands_are_refused_with_a_reason_and_never_panic() {
    let mut policy = crate::commands::policy::CommandsConfig {
        allow_unsigned: Some(true),
        ..Default::default()
    };
    policy.max_ttl = Duration::from_secs(3600);
    let v = crate::commands::Validator::new("a1".into(), policy);
    let pstat: crate::devices::simulated::potentiostat::Config =
        toml::from_str("id = \"p\"\nsteps = []").unwrap_or_else(|e| panic!("{e}"));
    let devices = [(
        "p".to_string(),
        crate::devices::DeviceConfig::SimulatedPotentiostat(pstat),
    )]
    .into_iter()
    .collect();
    let durations = [
        "\"30s\"",
        "\"300000000000y\"",
        "\"18446744073709551615s\"",
        "1e308",
        "-1",
        "\"-5s\"",
        "1e18",
        "0",
        "\"\"",
        "null",
    ];
    let now = SystemTime::now();
    let mut g = Gen(Rng::new(11));
    let (mut accepted, mut rejected) = (0u64, 0u64);
    for i in 0..200_000u64 {
        let dur = durations[g.below(durations.len() as u64) as usize];
        let which = ["ttl", "timeout"][g.below(2) as usize];
        let now_text = format!("\"{}\"", humantime::format_rfc3339_millis(now));
        let time = if g.below(2) == 0 {
            now_text.as_str()
        } else {
            g.time()
        };
        let tkey = ["issued_at", "timestamp", "expires_at"][g.below(3) as usize];
        let params = if i % 50_000 == 1 {
            format!("{{\"big\":\"{}\"}}", "x".repeat(10 << 20))
        } else if i % 1000 == 2 {
            format!("{{\"deep\":{}1{}}}", "[".repeat(5000), "]".repeat(5000))
        } else {
            format!("{{\"scan_rate\":{}}}", g.number())
        };
        let text = format!(
            "{{\"command\":\"pause\",\"command_id\":\"c{i}\",\"{which}\":{dur},\"{tkey}\":{time},\"params\":{params},\"target\":{{\"agent\":\"a1\",\"device\":\"p\"}}}}"
        );
        let bytes = g.twist(text);
        let meta = crate::commands::Meta {
            kafka_time: crate::time::from_unix_ms(g.0.next_u64() >> 20),
            position: Some((0, i as i64)),
        };
        match v.validate(&bytes, &meta, now, &devices) {
            Ok(c) => {
                accepted += 1;
                assert!(crate::time::representable(c.expires_at));
                assert!(c.timeout <= Duration::from_secs(3600));
            }
            Err(_) => rejected += 1,
        }
    }
    assert!(
        accepted > 1000 && rejected > 1000,
        "{accepted} / {rejected}"
    );
    eprintln!("poison commands: 200000 cases, {accepted} accepted, {rejected} refused, 0 panics");
}

/// Serial lines with extreme numbers and bytes, through the shipped line-instrument
/// profiles: a reading is always finite and within range.
#[test]
fn extreme_serial_lines_never_give_an_unusable_reading() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/profiles");
    let mut profiles = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
        let p = e.unwrap_or_else(|e| panic!("{e}")).path();
        if p.extension().is_some_and(|x| x == "toml") {
            if let Ok(c) = crate::devices::line::profile::Compiled::load(&p) {
                profiles.push(c);
            }
        }
    }
    assert!(profiles.len() >= 3);
    let mut g = Gen(Rng::new(3));
    let nums = [
        "1e400", "-1e400", "NaN", "inf", "+9.9E37", "1.0", "1e99", "1e101", "-0",
    ];
    let mut readings = 0;
    for i in 0..200_000u64 {
        let n = nums[g.below(nums.len() as u64) as usize];
        let line = match i % 5 {
            0 => format!("S S {n} g"),
            1 => format!("{n}VDC"),
            2 => format!("{n},{n},{n},{n},{n}"),
            3 => format!("{n} {n} {n}"),
            _ => String::from_utf8_lossy(&g.twist(format!("{{{n}}}"))).into_owned(),
        };
        for p in &profiles {
            if let crate::devices::line::profile::Parsed::Readings { readings: rs, .. } =
                p.parse(&line)
            {
                for r in rs {
                    readings += 1;
                    assert!(
                        crate::record::usable_value(r.value),
                        "{line:?} gave {}",
                        r.value
                    );
                }
            }
        }
    }
    assert!(readings > 1000, "{readings}");
}
