//! MQTT sensors against a real mosquitto and a real tansu: every payload convention end
//! to end (the `labgate simulate mqtt-sensors` simulator publishing), commands published
//! to MQTT-controlled hardware, at-least-once across a SIGKILL of the agent and across a
//! mosquitto restart, and the edge pipeline (alerts with hysteresis, window aggregates)
//! checked against a reference computed here.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

struct Setup {
    broker: Broker,
    mqtt: Mosquitto,
    topics: Topics,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let broker = Broker::start();
    let mqtt = Mosquitto::start();
    Setup {
        broker,
        mqtt,
        topics: Topics::new(),
        dir: tempdir(),
    }
}

fn start(s: &Setup, agent_id: &str, extra: &str) -> Agent {
    Agent::start(
        s.dir.path(),
        &agent_config(
            s.dir.path(),
            agent_id,
            &s.broker.addr(),
            &s.topics,
            free_port(),
            extra,
        ),
    )
}

fn simulate(url: &str, preset: &str, node: &str, rounds: u32) {
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args([
            "simulate",
            "mqtt-sensors",
            "--broker",
            url,
            "--preset",
            preset,
            "--node",
            node,
            "--interval",
            "100ms",
            "--rounds",
            &rounds.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run the simulator");
    assert!(
        out.status.success(),
        "simulator {preset}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn readings<'a>(msgs: &'a [Msg], sensor_id: &str) -> Vec<&'a Value> {
    msgs.iter()
        .filter(|m| m.json["type"] == "sensor_reading" && m.json["sensor_id"] == sensor_id)
        .map(|m| &m.json)
        .collect()
}

/// (sensor_type, unit) pairs seen for a sensor.
fn kinds(msgs: &[Msg], sensor_id: &str) -> BTreeSet<(String, String)> {
    readings(msgs, sensor_id)
        .iter()
        .map(|r| {
            (
                r["sensor_type"].as_str().unwrap_or("").to_string(),
                r["unit"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

const ALL_PRESETS: &str = r#"
  [[devices.subscriptions]]
  format = "number"
  topic = "lab/+id/+type"
  sensor_id = "{id}"
  sensor_type = "{type}"

  [[devices.subscriptions]]
  format = "json"
  topic = "sensors/+id/+type"
  sensor_type = "{type}"
  sensor_id = "{id}"
  value = "value"
  unit_path = "unit"
  timestamp = "ts"

  [[devices.subscriptions]]
  format = "tasmota"

  [[devices.subscriptions]]
  format = "zigbee2mqtt"
  ignore = ["linkquality"]

  [[devices.subscriptions]]
  format = "homie"

  [[devices.subscriptions]]
  format = "sparkplug"
"#;

#[test]
fn every_preset_end_to_end_and_commands_reach_mqtt_hardware() {
    let s = setup();
    let url = s.mqtt.url();
    let extra = format!(
        r#"[[devices]]
kind = "mqtt"
id = "mqtt-lab"
broker = "{url}"
location = "Lab 2"
{ALL_PRESETS}
  [devices.commands.stop]
  topic = "zigbee2mqtt/stirrer/set"
  payload = '{{"state":"OFF"}}'

  [devices.commands.pause]
  topic = "spBv1.0/Lab1/DCMD/n-spb/env"
  sparkplug_metric = "Measurement/Pause"
  value = true

  [devices.commands.resume]
  topic = "homie/5/pump/ctl/running/set"
  payload = "true"
"#
    );
    let agent = start(&s, "mqtt-e2e", &extra);
    agent.wait_status("MQTT connected", Duration::from_secs(20), |st| {
        st["devices"]["mqtt-lab"]["state"] == "running"
    });
    for (preset, node) in [
        ("number", "n-num"),
        ("json", "n-json"),
        ("tasmota", "n-tas"),
        ("zigbee2mqtt", "n-z2m"),
        ("homie", "n-homie"),
        ("sparkplug", "n-spb"),
    ] {
        simulate(&url, preset, node, 3);
    }
    let mut r = Reader::new(&s.broker.addr(), &s.topics.outputs());
    let expect: Vec<(&str, BTreeSet<(String, String)>)> = vec![
        (
            "n-num",
            set(&[
                ("temperature", ""),
                ("humidity", ""),
                ("pressure", ""),
                ("co2", ""),
                ("illuminance", ""),
            ]),
        ),
        (
            "n-json",
            set(&[
                ("temperature", "°C"),
                ("humidity", "%"),
                ("pressure", "hPa"),
                ("co2", "ppm"),
                ("illuminance", "lx"),
            ]),
        ),
        (
            "n-tas/BME280",
            set(&[
                ("temperature", "°C"),
                ("humidity", "%"),
                ("pressure", "hPa"),
            ]),
        ),
        ("n-tas/SCD30", set(&[("co2", "ppm")])),
        ("n-tas/BH1750", set(&[("illuminance", "lx")])),
        (
            "n-z2m",
            set(&[
                ("temperature", "°C"),
                ("humidity", "%"),
                ("pressure", "hPa"),
                ("co2", "ppm"),
                ("illuminance", "lx"),
            ]),
        ),
        (
            "n-homie/env",
            set(&[
                ("temperature", "°C"),
                ("humidity", "%"),
                ("pressure", "hPa"),
                ("co2", "ppm"),
                ("illuminance", "lx"),
            ]),
        ),
        (
            "Lab1/n-spb/env",
            set(&[
                ("temperature", "°C"),
                ("humidity", "%"),
                ("pressure", "hPa"),
                ("co2", "ppm"),
                ("illuminance", "lx"),
            ]),
        ),
    ];
    r.until("every preset's readings", Duration::from_secs(30), |m| {
        expect.iter().all(|(id, k)| kinds(m, id) == *k)
            // 3 rounds each; Sparkplug also sends its DBIRTH values.
            && readings(m, "n-z2m").len() >= 15
            && readings(m, "Lab1/n-spb/env").len() >= 15
    });
    for (id, k) in &expect {
        assert_eq!(kinds(&r.msgs, id), *k, "{id}");
    }
    for id in ["n-num", "n-json", "n-z2m", "n-homie/env"] {
        assert_eq!(readings(&r.msgs, id).len(), 15, "{id}: 3 rounds of 5");
    }
    for m in r.msgs.iter().filter(|m| m.json["type"] == "sensor_reading") {
        assert_matches_schema(m);
        assert_envelope(m, "mqtt-e2e");
        assert_eq!(m.json["device_id"], "mqtt-lab");
        assert_eq!(m.json["location"], "Lab 2");
        let key = format!(
            "{}:{}",
            m.json["sensor_type"].as_str().unwrap(),
            m.json["sensor_id"].as_str().unwrap()
        );
        assert_eq!(m.key, key);
        let v = m.json["value"].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{}", m.json);
    }
    // Values within the simulator's base ± variance, e.g. temperature 22 ± 0.5.
    for t in readings(&r.msgs, "Lab1/n-spb/env")
        .iter()
        .filter(|x| x["sensor_type"] == "temperature")
    {
        let v = t["value"].as_f64().unwrap();
        assert!((21.5..=22.5).contains(&v), "{t}");
    }
    // The Sparkplug birth was reported as an event.
    r.until(
        "the sparkplug_node_birth event",
        Duration::from_secs(10),
        |m| {
            m.iter().any(|x| {
                x.json["event"] == "sparkplug_node_birth" && x.json["data"]["edge_node"] == "n-spb"
            })
        },
    );

    // Malformed payloads: counted, reported by an event, and the agent carries on.
    let pubr = MqttClient::connect(&url, "test-publisher");
    pubr.publish("lab/bad/temperature", "warm", false);
    pubr.publish("zigbee2mqtt/n-z2m", "{not json", false);
    pubr.publish("lab/good/temperature", "21.25", false);
    r.until(
        "the good reading after the bad ones",
        Duration::from_secs(20),
        |m| !readings(m, "good").is_empty(),
    );
    r.until("mqtt_malformed event", Duration::from_secs(30), |m| {
        m.iter().any(|x| {
            x.json["event"] == "mqtt_malformed" && x.json["data"]["count"].as_u64() >= Some(1)
        })
    });
    assert_eq!(
        agent.metric("labgate_device_malformed_total{device=\"mqtt-lab\"}"),
        2.0
    );
    let log = agent.log_text();
    assert!(
        log.contains("malformed MQTT payload") && log.contains("lab/bad/temperature"),
        "malformed payloads are logged with their topic"
    );

    // Commands: published to the configured topic and payload; completed on PUBACK.
    let watcher = MqttClient::connect(&url, "test-watcher");
    for f in [
        "zigbee2mqtt/stirrer/set",
        "spBv1.0/Lab1/DCMD/#",
        "homie/5/pump/#",
    ] {
        watcher.subscribe(f);
    }
    std::thread::sleep(Duration::from_millis(300));
    let sender = Sender::new(&s.broker.addr());
    wait_until_commands_answered(&sender, &mut r, &s.topics.commands(), "mqtt-e2e");
    for (id, cmd) in [
        ("c-stop", "stop"),
        ("c-pause", "pause"),
        ("c-resume", "resume"),
        ("c-start", "start"),
    ] {
        let c = serde_json::json!({"command": cmd, "command_id": id, "target": {"agent": "mqtt-e2e", "device": "mqtt-lab"}});
        sender.send(&s.topics.commands(), "mqtt-e2e", &c.to_string());
    }
    let status = |m: &[Msg], id: &str| -> Vec<String> {
        m.iter()
            .filter(|x| x.json["type"] == "command_result" && x.json["command_id"] == id)
            .map(|x| x.json["status"].as_str().unwrap_or("").to_string())
            .collect()
    };
    r.until("command results", Duration::from_secs(20), |m| {
        ["c-stop", "c-pause", "c-resume"]
            .iter()
            .all(|id| status(m, id).last().map(String::as_str) == Some("completed"))
            && !status(m, "c-start").is_empty()
    });
    // `start` has no MQTT mapping on this device: refused before anything is published.
    assert_eq!(status(&r.msgs, "c-start"), ["rejected"]);
    let done = r
        .msgs
        .iter()
        .find(|x| x.json["command_id"] == "c-stop" && x.json["status"] == "completed")
        .unwrap();
    assert!(
        done.json["reason"]
            .as_str()
            .unwrap_or("")
            .contains("zigbee2mqtt/stirrer/set"),
        "{}",
        done.json
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = watcher.received.lock().unwrap().clone();
        let z2m = got
            .iter()
            .any(|(t, p)| t == "zigbee2mqtt/stirrer/set" && p == br#"{"state":"OFF"}"#);
        let homie = got
            .iter()
            .any(|(t, p)| t == "homie/5/pump/ctl/running/set" && p == b"true");
        let dcmd = got.iter().find(|(t, _)| t == "spBv1.0/Lab1/DCMD/n-spb/env");
        if let (true, true, Some((_, dcmd))) = (z2m, homie, dcmd) {
            use prost::Message;
            let p = labgate::devices::mqtt::sparkplug::Payload::decode(dcmd.as_slice())
                .expect("DCMD is a Sparkplug payload");
            assert_eq!(p.metrics[0].name.as_deref(), Some("Measurement/Pause"));
            assert_eq!(
                p.metrics[0].value,
                Some(labgate::devices::mqtt::sparkplug::MetricValue::Boolean(
                    true
                ))
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "published commands seen: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for m in r.msgs.iter().filter(|m| m.json["type"] == "command_result") {
        assert_matches_schema(m);
    }
}

fn counter_device(url: &str) -> String {
    mqtt_number_device(
        url,
        "mqtt-c",
        "labgate-counter",
        "lab/+id/counter",
        "counter",
    )
}

#[test]
fn sigkill_before_flush_the_broker_redelivers_and_nothing_is_lost() {
    let s = setup();
    let url = s.mqtt.url();
    let mut agent = start(&s, "mqtt-kill", &counter_device(&url));
    agent.wait_status("MQTT connected", Duration::from_secs(20), |st| {
        st["devices"]["mqtt-c"]["state"] == "running"
    });
    const N: u64 = 20_000;
    let p = MqttClient::connect(&url, "test-counter-publisher");
    let publisher = std::thread::spawn(move || {
        for i in 0..N {
            p.publish("lab/c1/counter", i.to_string(), false);
        }
        p.wait_acked(N, Duration::from_secs(120));
    });
    // Kill while messages stream in: some received, not yet durable, not acked.
    agent.wait_status("a third received", Duration::from_secs(30), |st| {
        st["devices"]["mqtt-c"]["mqtt"]["messages"].as_u64() >= Some(N / 3)
    });
    agent.kill9();
    std::thread::sleep(Duration::from_millis(500));
    agent.spawn();
    publisher.join().expect("publisher");
    let mut r = Reader::new(&s.broker.addr(), &s.topics.outputs());
    r.until("every counter value", Duration::from_secs(90), |m| {
        counter_values(m).len() as u64 == N
    });
    assert_eq!(counter_values(&r.msgs), (0..N).collect::<BTreeSet<_>>());
    // The proof it was at-least-once rather than luck: the broker delivered again
    // what the killed agent had received but not acked.
    let redelivered = agent.metric("labgate_mqtt_redelivered_total{device=\"mqtt-c\"}");
    assert!(redelivered > 0.0, "no redelivery after the kill");
}

#[test]
fn a_mosquitto_restart_loses_no_qos1_message() {
    let mut s = setup();
    let url = s.mqtt.url();
    let agent = start(&s, "mqtt-restart", &counter_device(&url));
    agent.wait_status("MQTT connected", Duration::from_secs(20), |st| {
        st["devices"]["mqtt-c"]["state"] == "running"
    });
    const N: u64 = 3_000;
    let p = MqttClient::connect(&url, "test-steady-publisher");
    let publisher = std::thread::spawn(move || {
        for i in 0..N {
            p.publish("lab/c2/counter", i.to_string(), false);
            std::thread::sleep(Duration::from_millis(2));
        }
        p.wait_acked(N, Duration::from_secs(120));
    });
    std::thread::sleep(Duration::from_secs(2));
    s.mqtt.restart(Duration::from_secs(1));
    publisher.join().expect("publisher");
    let mut r = Reader::new(&s.broker.addr(), &s.topics.outputs());
    r.until("every counter value", Duration::from_secs(60), |m| {
        counter_values(m).len() as u64 == N
    });
    assert_eq!(counter_values(&r.msgs), (0..N).collect::<BTreeSet<_>>());
    assert!(agent.metric("labgate_mqtt_connects_total{device=\"mqtt-c\"}") >= 2.0);
    r.until("reconnect events", Duration::from_secs(10), |m| {
        m.iter().any(|x| x.json["event"] == "device_disconnected")
            && m.iter()
                .filter(|x| x.json["event"] == "device_connected")
                .count()
                >= 2
    });
}

/// Under `reject_new` a full buffer refuses readings: their messages stay unacked on the
/// broker (the session reconnects after a pause for redelivery), every message before
/// and after them that was stored is acked, and once Kafka is back every value arrives.
#[test]
fn a_full_buffer_leaves_mqtt_messages_unacked_until_there_is_room() {
    let mqtt = Mosquitto::start();
    let url = mqtt.url();
    // No Kafka yet: the buffer (64 KiB, reject_new) fills and refuses.
    let port = free_port();
    let dir = tempdir();
    let topics = Topics::new();
    let device = format!(
        "[buffer]\nmax_bytes = 65536\noverflow = \"reject_new\"\n\n{}",
        counter_device(&url)
    );
    let cfg = agent_config(
        dir.path(),
        "agent-mqtt-full",
        &format!("127.0.0.1:{port}"),
        &topics,
        free_port(),
        &device,
    );
    let agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("MQTT connected", Duration::from_secs(20), |st| {
        st["devices"]["mqtt-c"]["state"] == "running"
    });
    const N: u64 = 2_000;
    let p = MqttClient::connect(&url, "test-full-publisher");
    for i in 0..N {
        p.publish("lab/c3/counter", i.to_string(), false);
    }
    p.wait_acked(N, Duration::from_secs(60));
    agent.wait_status(
        "the buffer refusing readings",
        Duration::from_secs(30),
        |_| agent.metric("labgate_records_dropped_total{reason=\"buffer_full_reject_new\"}") > 0.0,
    );
    let acked = agent.metric("labgate_mqtt_acked_total{device=\"mqtt-c\"}");
    assert!(
        acked > 0.0 && acked < N as f64,
        "only the stored messages are acked while the buffer is full: {acked} of {N}"
    );
    let _broker = Broker::start_on(port);
    let mut r = Reader::new(&format!("127.0.0.1:{port}"), &[topics.sensors()]);
    r.until("every counter value", Duration::from_secs(120), |m| {
        counter_values(m).len() as u64 == N
    });
    assert_eq!(counter_values(&r.msgs), (0..N).collect::<BTreeSet<_>>());
    agent.wait_status("every message acked", Duration::from_secs(60), |_| {
        agent.metric("labgate_mqtt_acked_total{device=\"mqtt-c\"}") >= N as f64
    });
    assert!(agent.metric("labgate_mqtt_redelivered_total{device=\"mqtt-c\"}") > 0.0);
}

#[test]
fn alerts_and_aggregates_match_a_reference_computed_here() {
    let s = setup();
    let url = s.mqtt.url();
    let extra = format!(
        r#"[[devices]]
kind = "mqtt"
id = "mqtt-p"
broker = "{url}"

  [[devices.subscriptions]]
  format = "json"
  topic = "plant/+id/temperature"
  sensor_type = "temperature"
  unit = "°C"
  value = "v"
  timestamp = "t"

[[pipeline.thresholds]]
sensor_type = "temperature"
max = 30.0
min = 10.0
priority = "critical"
hysteresis = 0.5

[pipeline.aggregates]
window = "10s"

[pipeline.downsample]
every = 5
"#
    );
    let agent = start(&s, "mqtt-pipe", &extra);
    agent.wait_status("MQTT connected", Duration::from_secs(20), |st| {
        st["devices"]["mqtt-p"]["state"] == "running"
    });
    // 400 readings one second apart (device time), hovering around both thresholds.
    let t0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z, a window boundary
    let mut rng = labgate::devices::simulated::Rng::new(42);
    let values: Vec<f64> = (0..400)
        .map(|i| {
            let base = match i / 100 {
                0 => 20.0,
                1 => 30.0, // hovers at max
                2 => 20.0,
                _ => 10.0, // hovers at min
            };
            ((base + rng.symmetric() * 0.8) * 100.0).round() / 100.0
        })
        .collect();
    let p = MqttClient::connect(&url, "test-plant");
    for (i, v) in values.iter().enumerate() {
        let body = serde_json::json!({"v": v, "t": t0 + i as u64 * 1000});
        p.publish("plant/p1/temperature", body.to_string(), false);
    }
    p.wait_acked(values.len() as u64, Duration::from_secs(30));

    // Reference: the same hysteresis rules, by hand.
    let mut expected_alerts: Vec<(String, f64)> = Vec::new(); // (state, value)
    let mut side: Option<&str> = None;
    for v in &values {
        if let Some(s_) = side {
            let back = (s_ == "above" && *v <= 29.5) || (s_ == "below" && *v >= 10.5);
            if back {
                expected_alerts.push(("cleared".into(), *v));
                side = None;
            }
        }
        if side.is_none() {
            if *v > 30.0 {
                side = Some("above");
                expected_alerts.push(("active".into(), *v));
            } else if *v < 10.0 {
                side = Some("below");
                expected_alerts.push(("active".into(), *v));
            }
        }
    }
    assert!(
        expected_alerts.len() >= 4 && expected_alerts.len() < 60,
        "the reference series must exercise hysteresis: {expected_alerts:?}"
    );
    // Reference windows: 10 s each → 40 windows of 10 readings; the last one closes
    // when the agent's clock passes its end (long ago) and the sensor is quiet.
    let mut windows: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (i, v) in values.iter().enumerate() {
        windows.entry(i as u64 / 10).or_default().push(*v);
    }
    let mut r = Reader::new(&s.broker.addr(), &s.topics.outputs());
    r.until("all aggregates and alerts", Duration::from_secs(30), |m| {
        m.iter()
            .filter(|x| x.json["type"] == "sensor_aggregate")
            .count()
            == windows.len()
            && m.iter().filter(|x| x.json["type"] == "alert").count() == expected_alerts.len()
    });
    let alerts: Vec<&Value> = r
        .msgs
        .iter()
        .filter(|x| x.json["type"] == "alert")
        .map(|x| &x.json)
        .collect();
    let got: Vec<(String, f64)> = alerts
        .iter()
        .map(|a| {
            (
                a["state"].as_str().unwrap().to_string(),
                a["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected_alerts);
    for pair in alerts.chunks(2) {
        if let [raised, cleared] = pair {
            assert_eq!(
                raised["alert_id"], cleared["alert_id"],
                "a cleared record names its alert"
            );
            assert_eq!(raised["priority"], "critical");
            assert_eq!(raised["acknowledged"], false);
            assert!(raised["threshold"] == 30.0 || raised["threshold"] == 10.0);
        }
    }
    let aggs: Vec<&Value> = r
        .msgs
        .iter()
        .filter(|x| x.json["type"] == "sensor_aggregate")
        .map(|x| &x.json)
        .collect();
    for (a, (w, vals)) in aggs.iter().zip(&windows) {
        let start = t0 + w * 10_000;
        let fmt = |ms: u64| {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        };
        assert_eq!(a["window_start"], fmt(start).as_str());
        assert_eq!(a["window_end"], fmt(start + 10_000).as_str());
        assert_eq!(a["count"], vals.len() as u64);
        let avg = vals.iter().sum::<f64>() / vals.len() as f64;
        assert!(
            (a["avg"].as_f64().unwrap() - avg).abs() < 1e-9,
            "{a} vs {avg}"
        );
        assert_eq!(
            a["min"].as_f64().unwrap(),
            vals.iter().cloned().fold(f64::INFINITY, f64::min)
        );
        assert_eq!(
            a["max"].as_f64().unwrap(),
            vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        );
        assert_eq!(a["unit"], "°C");
        assert_eq!(a["sensor_id"], "p1");
        assert!(a.get("partial").is_none());
    }
    // Every 5th raw reading is kept: 80 of 400; the aggregates saw all 400.
    let raw = r
        .msgs
        .iter()
        .filter(|x| x.json["type"] == "sensor_reading")
        .count();
    assert_eq!(raw, 80);
    assert_eq!(agent.metric("labgate_readings_downsampled_total"), 320.0);
    for m in r.msgs.iter().filter(|m| m.json["type"] != "agent_event") {
        assert_matches_schema(m);
    }
}

#[test]
fn tls_with_a_private_ca_and_a_password_from_a_file() {
    let tls_port = free_port();
    let mqtt = Mosquitto::start_with(|dir| {
        let certs = Certs::make(dir);
        std::fs::write(dir.join("passwd"), "labgate:s3cret\n").unwrap();
        let out = Command::new("mosquitto_passwd")
            .args(["-U", "passwd"])
            .current_dir(dir)
            .output()
            .expect("mosquitto_passwd");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d = dir.display();
        format!(
            "per_listener_settings true\nlistener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\npassword_file {d}/passwd\nallow_anonymous false\n",
            certs.path("ca.pem"),
            certs.path("server.pem"),
            certs.path("server.key"),
        )
    });
    let broker = Broker::start();
    let topics = Topics::new();
    let dir = tempdir();
    std::fs::write(dir.path().join("mqtt-password"), "s3cret\n").unwrap();
    let extra = format!(
        r#"[[devices]]
kind = "mqtt"
id = "mqtt-tls"
broker = "mqtts://127.0.0.1:{tls_port}"
username = "labgate"
password_file = "{}"
ca_file = "{}"

  [[devices.subscriptions]]
  format = "number"
  topic = "lab/+id/temperature"
  sensor_type = "temperature"
  unit = "°C"
"#,
        dir.path().join("mqtt-password").display(),
        mqtt.dir.path().join("certs/ca.pem").display()
    );
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "mqtt-tls",
            &broker.addr(),
            &topics,
            free_port(),
            &extra,
        ),
    );
    agent.wait_status("MQTT over TLS connected", Duration::from_secs(20), |st| {
        st["devices"]["mqtt-tls"]["state"] == "running"
    });
    // Published on the broker's plain listener, read by the agent over TLS.
    let p = MqttClient::connect(&mqtt.url(), "tls-test-publisher");
    p.publish("lab/t-tls/temperature", "23.5", false);
    let mut r = Reader::new(&broker.addr(), &topics.outputs());
    r.until("the reading over TLS", Duration::from_secs(20), |m| {
        readings(m, "t-tls").len() == 1
    });
    assert_eq!(readings(&r.msgs, "t-tls")[0]["value"], 23.5);
}
