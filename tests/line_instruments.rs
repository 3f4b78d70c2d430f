//! Each shipped line-instrument profile against its simulator on a real pty, with the
//! real agent and a real tansu: readings with values and units, error replies and garbage
//! counted, pause / resume / stop applied to polling, the stop commands sent.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use labgate::sim::line::{Kind, LineSim, Options};
use serde_json::json;

fn profiles_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/profiles")
}

struct Rig {
    _broker: Broker,
    _dir: tempfile::TempDir,
    topics: Topics,
    agent: Agent,
    reader: Reader,
    sender: Sender,
    sim: LineSim,
}

fn start(opts: Options, profile: &str) -> Rig {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let link = dir.path().join("ttyINSTR");
    let sim = LineSim::start(opts, Some(&link)).unwrap();
    let device = format!(
        "[[devices]]\nkind = \"line_instrument\"\nid = \"instr-1\"\nport = \"{}\"\nprofile = \"{profile}\"\nprofiles_dir = \"{}\"\ninterval = \"100ms\"\nlocation = \"Lab 2\"\n",
        link.display(),
        profiles_dir().display()
    );
    let cfg = agent_config(
        dir.path(),
        "agent-line",
        &broker.addr(),
        &topics,
        free_port(),
        &device,
    );
    let agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("instrument running", Duration::from_secs(30), |s| {
        s["devices"]["instr-1"]["state"] == "running"
    });
    let mut reader = Reader::new(
        &broker.addr(),
        &[
            topics.sensors(),
            topics.events(),
            topics.agent_events(),
            topics.results(),
        ],
    );
    let sender = Sender::new(&broker.addr());
    wait_until_commands_answered(&sender, &mut reader, &topics.commands(), "agent-line");
    Rig {
        _broker: broker,
        _dir: dir,
        topics,
        agent,
        reader,
        sender,
        sim,
    }
}

impl Rig {
    fn send(&self, id: &str, cmd: &str) {
        let c = json!({"command": cmd, "command_id": id, "target": {"agent": "agent-line", "device": "instr-1"}});
        self.sender
            .send(&self.topics.commands(), "agent-line", &c.to_string());
    }

    fn result(&mut self, id: &str) -> serde_json::Value {
        let id2 = id.to_string();
        let msgs = self.reader.until(id, Duration::from_secs(20), move |m| {
            m.iter()
                .any(|m| m.json["command_id"] == id2.as_str() && m.json["status"] != "accepted")
        });
        msgs.iter()
            .rev()
            .find(|m| m.json["command_id"] == id && m.json["status"] != "accepted")
            .unwrap()
            .json
            .clone()
    }
}

fn readings(msgs: &[Msg], sensor_type: &str) -> Vec<serde_json::Value> {
    msgs.iter()
        .filter(|m| m.json["type"] == "sensor_reading" && m.json["sensor_type"] == sensor_type)
        .map(|m| m.json.clone())
        .collect()
}

#[test]
fn mt_sics_balance_weights_arrive_with_unit_and_stability_and_errors_are_counted() {
    let mut rig = start(
        Options {
            error_every: 4,
            ..Options::new(Kind::MtSics)
        },
        "mettler-mt-sics",
    );
    let msgs = rig
        .reader
        .until("10 weights", Duration::from_secs(30), |m| {
            readings(m, "mass").len() >= 10
        })
        .to_vec();
    let w = readings(&msgs, "mass");
    for r in &w {
        assert_eq!(r["unit"], "g");
        assert_eq!(r["sensor_id"], "instr-1");
        assert_eq!(r["location"], "Lab 2");
        assert!((r["value"].as_f64().unwrap() - 100.0).abs() < 0.05, "{r}");
        assert!(
            matches!(r["metadata"]["stability"].as_str(), Some("S" | "D")),
            "{r}"
        );
        assert_eq!(r["device_id"], "instr-1");
    }
    assert!(
        w.iter().any(|r| r["metadata"]["stability"] == "D"),
        "dynamic readings are flagged"
    );
    assert!(
        rig.agent
            .metric("labgate_device_error_replies_total{device=\"instr-1\"}")
            >= 1.0
    );
    rig.reader
        .until("device_errors event", Duration::from_secs(20), |m| {
            m.iter().any(|m| m.json["event"] == "device_errors")
        });
    let received = rig.sim.received();
    assert_eq!(received[0], "@", "init command first");
    assert!(received[1..].iter().all(|c| c == "SI"), "{received:?}");
    for m in &rig.reader.msgs {
        assert_matches_schema(m);
    }
}

#[test]
fn keithley_2400_reports_voltage_and_current_and_stop_sends_abort_and_output_off() {
    let mut rig = start(Options::new(Kind::Keithley2400), "keithley-2400");
    let msgs = rig
        .reader
        .until("currents", Duration::from_secs(30), |m| {
            readings(m, "current").len() >= 5
        })
        .to_vec();
    for r in readings(&msgs, "current") {
        assert_eq!(r["unit"], "A");
        assert!((r["value"].as_f64().unwrap() - 1e-6).abs() < 2e-8, "{r}");
    }
    assert!(readings(&msgs, "voltage")
        .iter()
        .all(|r| r["value"] == 1.0 && r["unit"] == "V"));
    assert!(
        readings(&msgs, "resistance").is_empty(),
        "9.91e37 means not measured: no reading"
    );
    let init: Vec<String> = rig.sim.received().into_iter().take(5).collect();
    assert_eq!(
        init,
        [
            "*RST",
            ":SOUR:FUNC VOLT",
            ":SOUR:VOLT 1",
            ":SENS:FUNC \"CURR\"",
            ":OUTP ON"
        ]
    );
    rig.send("c-stop", "stop");
    let r = rig.result("c-stop");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["reason"], "stopped; sent :ABOR, :OUTP OFF");
    let received = rig.sim.received();
    let pos = received
        .iter()
        .position(|c| c == ":ABOR")
        .expect(":ABOR sent");
    assert_eq!(received[pos + 1], ":OUTP OFF");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(rig.sim.received().len(), pos + 2, "no polling after stop");
    rig.send("c-start", "start");
    assert_eq!(rig.result("c-start")["status"], "completed");
    let before = rig.sim.received().len();
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        rig.sim.received()[before..].iter().any(|c| c == ":READ?"),
        "polling again after start"
    );
}

#[test]
fn keithley_2000_readings_with_unit_suffixes_become_volts() {
    let mut rig = start(
        Options {
            error_every: 5,
            ..Options::new(Kind::Keithley2000)
        },
        "keithley-2000",
    );
    let msgs = rig
        .reader
        .until("volts", Duration::from_secs(30), |m| {
            readings(m, "voltage").len() >= 5
        })
        .to_vec();
    for r in readings(&msgs, "voltage") {
        assert!((r["value"].as_f64().unwrap() - 1.12).abs() < 0.002, "{r}");
        assert_eq!(r["unit"], "V");
        assert!(r["metadata"]["rdng"].as_str().unwrap().ends_with("RDNG#"));
    }
    // "-113,\"Undefined header\"" is the profile's SCPI error pattern.
    assert!(
        rig.agent
            .metric("labgate_device_error_replies_total{device=\"instr-1\"}")
            >= 1.0
    );
}

#[test]
fn streaming_csv_sensor_is_recorded_unless_paused_and_garbage_is_counted() {
    let mut rig = start(
        Options {
            garbage_every: 5,
            ..Options::new(Kind::CsvSensor)
        },
        "csv-sensor",
    );
    let msgs = rig
        .reader
        .until("readings", Duration::from_secs(30), |m| {
            readings(m, "temperature").len() >= 10
        })
        .to_vec();
    for r in readings(&msgs, "temperature") {
        let v = r["value"].as_f64().unwrap();
        assert!((23.0..=24.0).contains(&v), "scaled from tenths: {r}");
        assert_eq!(r["unit"], "°C");
    }
    assert_eq!(
        readings(&msgs, "humidity").len(),
        readings(&msgs, "pressure").len()
    );
    rig.send("c-pause", "pause");
    assert_eq!(rig.result("c-pause")["status"], "completed");
    let at_pause = readings(
        rig.reader.drain_for(Duration::from_millis(500)),
        "temperature",
    )
    .len();
    let later = readings(rig.reader.drain_for(Duration::from_secs(1)), "temperature").len();
    assert_eq!(at_pause, later, "nothing recorded while paused");
    rig.send("c-resume", "resume");
    assert_eq!(rig.result("c-resume")["status"], "completed");
    rig.reader
        .until("readings again", Duration::from_secs(10), |m| {
            readings(m, "temperature").len() > later + 3
        });
    assert!(
        rig.agent
            .metric("labgate_device_bad_lines_total{device=\"instr-1\"}")
            >= 2.0
    );
    assert!(
        rig.sim.received().is_empty(),
        "a streaming sensor is never polled"
    );
}

#[test]
fn polls_the_instrument_leaves_unanswered_are_counted_as_timeouts_and_polling_goes_on() {
    let mut rig = start(
        Options {
            silent_every: 3,
            ..Options::new(Kind::Keithley2000)
        },
        "keithley-2000",
    );
    // The profile waits 2 s for an answer; every third poll gets none.
    rig.agent
        .wait_status("two timeouts", Duration::from_secs(30), |s| {
            s["devices"]["instr-1"]["timeouts"].as_u64() >= Some(2)
        });
    assert!(
        rig.agent
            .metric("labgate_device_timeouts_total{device=\"instr-1\"}")
            >= 2.0
    );
    let msgs = rig
        .reader
        .until(
            "a device_errors event about it",
            Duration::from_secs(20),
            |m| {
                m.iter().any(|m| {
                    m.json["event"] == "device_errors"
                        && m.json["data"]["last"]
                            .as_str()
                            .is_some_and(|l| l.starts_with("no answer"))
                })
            },
        )
        .to_vec();
    let before = readings(&msgs, "voltage").len();
    rig.reader
        .until("readings go on", Duration::from_secs(20), |m| {
            readings(m, "voltage").len() > before + 2
        });
}

/// The agent's `tare` and `zero` commands go to the balance as MT-SICS `T` and `Z`, and
/// the result carries the balance's answer; weighing goes on.
#[test]
fn mt_sics_tare_and_zero_commands_are_sent_and_answered() {
    let mut rig = start(Options::new(Kind::MtSics), "mettler-mt-sics");
    rig.send("tare-1", "tare");
    let r = rig.result("tare-1");
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["reason"], "tare: T S      100.00 g");
    rig.send("zero-1", "zero");
    let r = rig.result("zero-1");
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["reason"], "zero: Z A");
    let sent = rig.sim.received();
    assert!(
        sent.iter().any(|l| l == "T") && sent.iter().any(|l| l == "Z"),
        "{sent:?}"
    );
    let before = readings(&rig.reader.msgs, "mass").len();
    rig.reader
        .until("weighing goes on", Duration::from_secs(10), |m| {
            readings(m, "mass").len() > before + 3
        });
}
