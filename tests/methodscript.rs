//! The MethodSCRIPT driver end to end: the EmStat simulator on a real pty, the real agent
//! binary, and a real tansu. Commands go through Kafka; what the simulator received and
//! what reached Kafka are compared.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use labgate::devices::methodscript::Package;
use labgate::sim::emstat::{Emstat, Options};
use serde_json::json;

fn methods_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/methods")
}

fn device(link: &Path, method: &str, params: &str) -> String {
    format!(
        r#"[[devices]]
kind = "methodscript"
id = "pstat-1"
port = "{}"
method = "{method}"
methods_dir = "{}"
points_per_message = 40
max_interval = "200ms"
params = {{ {params} }}
"#,
        link.display(),
        methods_dir().display()
    )
}

fn command(id: &str, cmd: &str, params: serde_json::Value) -> String {
    json!({"type":"command","command":cmd,"command_id":id,"params":params,"target":{"agent":"agent-ms","device":"pstat-1"}}).to_string()
}

fn statuses(msgs: &[Msg], id: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.json["type"] == "command_result" && m.json["command_id"] == id)
        .map(|m| m.json["status"].as_str().unwrap().to_string())
        .collect()
}

fn events(msgs: &[Msg], name: &str) -> Vec<serde_json::Value> {
    msgs.iter()
        .filter(|m| m.json["event"] == name)
        .map(|m| m.json.clone())
        .collect()
}

fn points(msgs: &[Msg]) -> Vec<serde_json::Value> {
    msgs.iter()
        .filter(|m| m.json["type"] == "echem_data")
        .flat_map(|m| m.json["points"].as_array().unwrap().clone())
        .collect()
}

struct Rig {
    broker: Broker,
    topics: Topics,
    dir: tempfile::TempDir,
    link: PathBuf,
    agent: Agent,
    reader: Reader,
    sender: Sender,
}

impl Rig {
    fn start(sim: &Options, method: &str, params: &str) -> (Rig, Emstat) {
        let broker = Broker::start();
        let dir = tempdir();
        let topics = Topics::new();
        let link = dir.path().join("ttyEMSTAT");
        let sim = Emstat::start(sim.clone(), Some(&link)).unwrap();
        let cfg = agent_config(
            dir.path(),
            "agent-ms",
            &broker.addr(),
            &topics,
            free_port(),
            &device(&link, method, params),
        );
        let agent = Agent::start(dir.path(), &cfg);
        agent.wait_status("commands assigned", Duration::from_secs(30), |s| {
            s["commands"]["assigned"] == true
        });
        agent.wait_status("instrument connected", Duration::from_secs(30), |s| {
            s["devices"]["pstat-1"]["state"] == "idle"
        });
        let mut reader = Reader::new(
            &broker.addr(),
            &[
                topics.events(),
                topics.agent_events(),
                topics.data(),
                topics.results(),
            ],
        );
        let sender = Sender::new(&broker.addr());
        wait_until_commands_answered(&sender, &mut reader, &topics.commands(), "agent-ms");
        (
            Rig {
                broker,
                topics,
                dir,
                link,
                agent,
                reader,
                sender,
            },
            sim,
        )
    }

    fn send(&self, id: &str, cmd: &str, params: serde_json::Value) {
        self.sender.send(
            &self.topics.commands(),
            "agent-ms",
            &command(id, cmd, params),
        );
    }
}

#[test]
fn a_full_cv_run_reaches_kafka_exactly_as_the_instrument_sent_it() {
    let (mut rig, sim) = Rig::start(
        &Options {
            speed: 0.0,
            ..Options::default()
        },
        "cv",
        r#"n_scans = 2, e_step = "10m""#,
    );
    let info = events(
        rig.reader
            .until("device_connected", Duration::from_secs(20), |m| {
                !events(m, "device_connected").is_empty()
            }),
        "device_connected",
    );
    assert_eq!(info[0]["data"]["serial"], "ESPICOSIM0001");
    assert_eq!(info[0]["data"]["device_type"], "espico");
    assert_eq!(info[0]["data"]["mscript_version"], "01.09.00");
    // The run is named and described by whoever starts it.
    rig.send(
        "c-start",
        "start",
        json!({"scan_rate": "200mV/s", "experiment_id": "ms_cv_1", "sample": "ferrocene 1 mM", "operator": "ana"}),
    );
    rig.reader.until(
        "experiment_completed and its receipt",
        Duration::from_secs(60),
        |m| !events(m, "experiment_completed").is_empty() && !events(m, "run_delivered").is_empty(),
    );
    let msgs = rig.reader.drain_for(Duration::from_millis(500)).to_vec();
    for m in msgs
        .iter()
        .filter(|m| m.json.get("experiment_id").is_some())
    {
        assert_eq!(m.json["experiment_id"], "ms_cv_1");
        assert_eq!(m.json["run"]["sample"], "ferrocene 1 mM", "{}", m.json);
        assert_eq!(m.json["run"]["operator"], "ana");
    }
    let receipt = &events(&msgs, "run_delivered")[0]["data"];
    assert_eq!(receipt["ended"], "completed");
    assert_eq!(receipt["points"], 321);
    assert_eq!(statuses(&msgs, "c-start"), ["accepted", "completed"]);
    let started = &events(&msgs, "experiment_started")[0];
    assert_eq!(started["data"]["technique"], "CV");
    assert_eq!(started["data"]["parameters"]["scan_rate"], 0.2);
    assert_eq!(started["data"]["parameters"]["n_scans"], 2.0);
    assert_eq!(events(&msgs, "scan_completed").len(), 2);
    // Every P line the simulator wrote is a point in Kafka, with the same values.
    let sent = sim.data_lines();
    let got = points(&msgs);
    assert_eq!(got.len(), sent.len());
    assert_eq!(got.len(), 321);
    for (line, p) in sent.iter().zip(&got) {
        let pkg = Package::parse(&line[1..]).unwrap();
        for (code, key) in [("eb", "t"), ("da", "e"), ("ba", "i")] {
            let want = pkg.get(code).unwrap().value.unwrap();
            let have = p[key].as_f64().unwrap();
            assert!(
                (want - have).abs() <= want.abs() * 1e-12,
                "{code}: {want} vs {have} in {line}"
            );
        }
    }
    for m in &msgs {
        assert_matches_schema(m);
    }
    assert_eq!(sim.received(), ["Z", "t", "i", "v", "e"]);
}

#[test]
fn pause_resume_stop_through_kafka_reach_the_instrument_as_h_h_z() {
    let (mut rig, sim) = Rig::start(
        &Options {
            speed: 5.0,
            ..Options::default()
        },
        "ca",
        r#"t_run = 600"#,
    );
    rig.send("c-start", "start", json!({}));
    rig.reader
        .until("data", Duration::from_secs(30), |m| points(m).len() >= 10);
    rig.send("c-pause", "pause", json!({}));
    rig.reader.until("paused", Duration::from_secs(20), |m| {
        statuses(m, "c-pause") == ["accepted", "completed"]
    });
    rig.reader
        .until("experiment_paused", Duration::from_secs(10), |m| {
            !events(m, "experiment_paused").is_empty()
        });
    let at_pause = sim.data_lines().len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sim.data_lines().len(), at_pause, "the instrument halted");
    rig.send("c-resume", "resume", json!({}));
    rig.reader.until("resumed", Duration::from_secs(20), |m| {
        statuses(m, "c-resume") == ["accepted", "completed"]
    });
    rig.reader
        .until("data again", Duration::from_secs(20), |m| {
            points(m).len() > at_pause + 5
        });
    rig.send("c-stop", "stop", json!({}));
    rig.reader.until("stopped", Duration::from_secs(20), |m| {
        statuses(m, "c-stop") == ["accepted", "completed"]
    });
    rig.reader
        .until("experiment_stopped", Duration::from_secs(10), |m| {
            !events(m, "experiment_stopped").is_empty()
        });
    let received = sim.received();
    assert_eq!(&received[4..], ["e", "h", "H", "Z"], "{received:?}");
    // The run says it was a stop command, and which one.
    let msgs = rig.reader.drain_for(Duration::from_millis(100)).to_vec();
    let stopped = &events(&msgs, "experiment_stopped")[0];
    assert_eq!(stopped["data"]["reason"], "stop command", "{stopped}");
    assert_eq!(stopped["data"]["command_id"], "c-stop", "{stopped}");
    // Every point the instrument sent before the abort completed is in Kafka.
    let msgs = rig.reader.drain_for(Duration::from_millis(500)).to_vec();
    assert_eq!(points(&msgs).len(), sim.data_lines().len());
    // A second stop while idle: the device answers Z!0006, which means "in sync".
    rig.send("c-stop2", "stop", json!({}));
    rig.reader.until("idle stop", Duration::from_secs(20), |m| {
        statuses(m, "c-stop2") == ["accepted", "completed"]
    });
    // Invalid parameters are refused before anything reaches the instrument.
    rig.send("c-bad", "start", json!({"t_run": "5V"}));
    let msgs = rig
        .reader
        .until("bad start", Duration::from_secs(20), |m| {
            statuses(m, "c-bad") == ["accepted", "failed"]
        })
        .to_vec();
    let reason = msgs
        .iter()
        .rev()
        .find(|m| m.json["command_id"] == "c-bad")
        .unwrap()
        .json["reason"]
        .clone();
    assert!(reason.as_str().unwrap().contains("t_run"), "{reason}");
    assert_eq!(sim.received().last().map(String::as_str), Some("Z"));
}

#[test]
fn unplug_mid_run_fails_the_experiment_with_partial_data_and_the_next_run_works_after_replug() {
    let opts = Options {
        speed: 5.0,
        garbage_every: 7,
        ..Options::default()
    };
    let (mut rig, sim) = Rig::start(&opts, "ca", r#"t_run = 600"#);
    rig.send("c-start", "start", json!({}));
    rig.reader
        .until("data", Duration::from_secs(30), |m| points(m).len() >= 20);
    sim.unplug();
    let msgs = rig
        .reader
        .until("experiment_failed", Duration::from_secs(20), |m| {
            !events(m, "experiment_failed").is_empty()
        })
        .to_vec();
    let failed = &events(&msgs, "experiment_failed")[0];
    assert!(
        failed["data"]["error"]
            .as_str()
            .unwrap()
            .starts_with("device disconnected"),
        "{failed}"
    );
    assert_eq!(failed["data"]["partial"], true);
    assert_eq!(failed["data"]["reason"], "disconnect", "{failed}");
    let partial = failed["data"]["points"].as_u64().unwrap();
    assert!(partial >= 20);
    // Every point received before the unplug is kept (data and events are on different
    // topics, so wait for the data).
    rig.reader
        .until("the partial data", Duration::from_secs(20), |m| {
            points(m).len() as u64 == partial
        });
    // The run cut short by the unplug still gets its receipt, saying so.
    let msgs = rig
        .reader
        .until(
            "the unplugged run's receipt",
            Duration::from_secs(20),
            |m| !events(m, "run_delivered").is_empty(),
        )
        .to_vec();
    let receipt = &events(&msgs, "run_delivered")[0];
    assert_eq!(receipt["experiment_id"], failed["experiment_id"]);
    assert_eq!(receipt["data"]["ended"], "failed");
    assert_eq!(receipt["data"]["cut_short"], true);
    assert_eq!(receipt["data"]["points"], partial);
    assert!(receipt["data"]["error"]
        .as_str()
        .unwrap()
        .starts_with("device disconnected"));
    rig.agent
        .wait_status("disconnected", Duration::from_secs(10), |s| {
            s["devices"]["pstat-1"]["state"] == "disconnected"
        });
    // While unplugged, commands fail with a reason instead of hanging.
    rig.send("c-while-down", "start", json!({}));
    rig.reader
        .until("refused while down", Duration::from_secs(20), |m| {
            statuses(m, "c-while-down") == ["accepted", "failed"]
        });
    // Replug: a new simulator behind the same link; the driver finds it and resyncs.
    let sim2 = Emstat::start(
        Options {
            speed: 0.0,
            ..Options::default()
        },
        Some(&rig.link),
    )
    .unwrap();
    rig.agent
        .wait_status("reconnected", Duration::from_secs(30), |s| {
            s["devices"]["pstat-1"]["state"] == "idle"
        });
    rig.send("c-again", "start", json!({"t_run": 2}));
    // Results and events are on different topics: wait for both.
    rig.reader
        .until("second run completes", Duration::from_secs(30), |m| {
            !events(m, "experiment_completed").is_empty()
                && statuses(m, "c-again") == ["accepted", "completed"]
        });
    assert_eq!(sim2.received()[..4], ["Z", "t", "i", "v"]);
    let bad = rig
        .agent
        .metric("labgate_device_bad_lines_total{device=\"pstat-1\"}");
    assert!(bad >= 2.0, "garbage lines were counted and skipped: {bad}");
    let _ = (&rig.dir, &rig.broker);
}

#[test]
fn a_run_ended_by_the_agents_shutdown_says_so_and_a_scan_cut_short_is_not_completed() {
    let (mut rig, sim) = Rig::start(
        &Options {
            speed: 1.0,
            ..Options::default()
        },
        "cv",
        r#"n_scans = 3, e_step = "5m", scan_rate = "100mV/s""#,
    );
    rig.send("c-start", "start", json!({"experiment_id": "cv_sigterm"}));
    rig.reader
        .until("the first scan under way", Duration::from_secs(30), |m| {
            points(m).len() >= 10
        });
    rig.agent.terminate();
    let msgs = rig
        .reader
        .until("experiment_stopped", Duration::from_secs(20), |m| {
            !events(m, "experiment_stopped").is_empty()
        })
        .to_vec();
    let stopped = &events(&msgs, "experiment_stopped")[0];
    assert_eq!(stopped["experiment_id"], "cv_sigterm");
    assert_eq!(stopped["data"]["reason"], "agent shutdown", "{stopped}");
    assert!(stopped["data"].get("command_id").is_none());
    // The scan in progress was cut short, not completed.
    assert!(events(&msgs, "scan_completed").is_empty(), "{msgs:?}");
    assert_eq!(events(&msgs, "scan_cut_short").len(), 1);
    assert_eq!(sim.received().last().map(String::as_str), Some("Z"));
}

/// A CV as PalmSens' example scripts are written: its own `e` line, comments, no
/// labgate header.
const PALMSENS_STYLE_CV: &str = "e
#############
# CV on a dummy cell, written the way the vendor's examples are
#############
var c
var p
set_pgstat_chan 0
set_pgstat_mode 3
set_max_bandwidth 200
set_range ba 100u
set_autoranging ba 1n 1m
set_e -200m
cell_on
meas_loop_cv p c -200m 600m -200m 10m 500m
  pck_start
  pck_add p
  pck_add c
  pck_end
endloop
on_finished:
  cell_off

";

#[test]
fn a_script_as_the_vendor_writes_it_runs_unchanged_and_a_mislabelled_one_is_refused() {
    let scripts = tempdir();
    let file = scripts.path().join("palmsens-cv.mscr");
    std::fs::write(&file, PALMSENS_STYLE_CV).unwrap();
    let (mut rig, sim) = Rig::start(
        &Options {
            speed: 0.0,
            ..Options::default()
        },
        file.to_str().unwrap(),
        "",
    );
    rig.send("c-start", "start", json!({"experiment_id": "vendor_cv"}));
    let msgs = rig
        .reader
        .until("the vendor script's run", Duration::from_secs(60), |m| {
            !events(m, "experiment_completed").is_empty()
        })
        .to_vec();
    let started = &events(&msgs, "experiment_started")[0];
    assert_eq!(
        started["data"]["technique"], "CV",
        "the technique comes from the loop"
    );
    let sent = sim.data_lines();
    let msgs = rig
        .reader
        .until(
            "all points and the start's results",
            Duration::from_secs(20),
            |m| {
                points(m).len() == sent.len() && statuses(m, "c-start") == ["accepted", "completed"]
            },
        )
        .to_vec();
    assert!(sent.len() > 100);
    assert!(msgs
        .iter()
        .filter(|m| m.json["type"] == "echem_data")
        .all(|m| m.json["technique"] == "CV"));
    // One `e`: the script's own line is not sent as a second command.
    assert_eq!(
        sim.received().iter().filter(|c| *c == "e").count(),
        1,
        "{:?}",
        sim.received()
    );
    assert_eq!(statuses(&msgs, "c-start"), ["accepted", "completed"]);

    // Labelled DPV while its loop is a CV: `check` refuses it and says where.
    let wrong = scripts.path().join("labelled-dpv.mscr");
    std::fs::write(
        &wrong,
        PALMSENS_STYLE_CV.replacen("e\n", "e\n# technique: DPV\n", 1),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(&rig.agent.config)
        .unwrap()
        .replace(file.to_str().unwrap(), wrong.to_str().unwrap());
    let bad = rig.dir.path().join("bad.toml");
    std::fs::write(&bad, cfg).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("devices[0].method") && err.contains("line 2") && err.contains("meas_loop_cv"),
        "{err}"
    );
}
