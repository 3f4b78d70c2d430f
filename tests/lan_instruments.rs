//! Instruments on the lab network: a SCPI meter on a raw TCP socket (the line-instrument
//! simulator listening on loopback), with the real agent and a real tansu. Readings and
//! commands as over serial; a dropped connection, a refused one (the instrument is off)
//! and a half-open one (the instrument is gone, the socket still looks open) are each
//! reported and reconnected, and no reading is lost or repeated in Kafka.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use labgate::sim::line::{Kind, LineSim, Options};
use serde_json::json;

fn voltages(m: &[Msg]) -> usize {
    m.iter()
        .filter(|x| x.json["type"] == "sensor_reading" && x.json["sensor_type"] == "voltage")
        .count()
}

fn events(m: &[Msg], event: &str) -> usize {
    m.iter().filter(|x| x.json["event"] == event).count()
}

#[test]
fn scpi_over_tcp_reads_obeys_and_survives_dropped_refused_and_half_open_links() {
    let sim = LineSim::listen(Options::new(Kind::Keithley2000), "127.0.0.1:0").unwrap();
    let addr = sim.addr().unwrap();
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let device = format!(
        "[[devices]]\nkind = \"line_instrument\"\nid = \"dmm-1\"\naddress = \"{addr}\"\nprofile = \"keithley-2000\"\nprofiles_dir = \"{}\"\ninterval = \"100ms\"\n",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("devices/profiles")
            .display()
    );
    let cfg = agent_config(
        dir.path(),
        "agent-lan",
        &broker.addr(),
        &topics,
        free_port(),
        &device,
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut r = Reader::new(
        &broker.addr(),
        &[topics.sensors(), topics.agent_events(), topics.results()],
    );
    let sender = Sender::new(&broker.addr());
    wait_until_commands_answered(&sender, &mut r, &topics.commands(), "agent-lan");
    r.until("readings over TCP", Duration::from_secs(30), |m| {
        voltages(m) >= 10
    });
    r.until("device_connected", Duration::from_secs(20), |m| {
        events(m, "device_connected") >= 1
    });
    let connected = r
        .msgs
        .iter()
        .find(|x| x.json["event"] == "device_connected")
        .expect("device_connected")
        .json
        .clone();
    assert_eq!(
        connected["data"]["port"],
        format!("tcp://{addr}"),
        "{connected}"
    );
    assert!(
        sim.received().iter().any(|l| l == ":READ?"),
        "{:?}",
        sim.received()
    );

    // Commands as over serial: pause stops polling, resume starts it again.
    let send = |id: &str, cmd: &str| {
        let c = json!({"command": cmd, "command_id": id, "target": {"agent": "agent-lan", "device": "dmm-1"}});
        sender.send(&topics.commands(), "agent-lan", &c.to_string());
    };
    send("p1", "pause");
    r.until("pause completed", Duration::from_secs(20), |m| {
        m.iter()
            .any(|x| x.json["command_id"] == "p1" && x.json["status"] == "completed")
    });
    let polls = sim.received().len();
    std::thread::sleep(Duration::from_millis(600));
    assert!(sim.received().len() <= polls + 1, "paused: no polls");
    send("r1", "resume");
    r.until("resume completed", Duration::from_secs(20), |m| {
        m.iter()
            .any(|x| x.json["command_id"] == "r1" && x.json["status"] == "completed")
    });

    // A dropped connection: reported, reconnected, readings go on.
    let n = voltages(&r.msgs);
    sim.drop_connection();
    r.until("reconnect after a drop", Duration::from_secs(30), |m| {
        events(m, "device_disconnected") >= 1
            && events(m, "device_connected") >= 2
            && voltages(m) >= n + 10
    });
    assert!(sim.connections() >= 2);

    // Half-open: the instrument stops answering, the socket stays open. Three silent
    // polls end the link; it is reconnected, and readings return once it answers.
    let before = sim.connections();
    sim.set_silent(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sim.connections() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "a half-open link was not given up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.metric("labgate_device_timeouts_total{device=\"dmm-1\"}") >= 3.0);
    sim.set_silent(false);
    let n = voltages(&r.msgs);
    r.until(
        "readings after the half-open link",
        Duration::from_secs(30),
        |m| voltages(m) >= n + 10,
    );

    // Refused: the instrument is switched off (nothing listens), then on again.
    drop(sim);
    agent.wait_status("disconnected", Duration::from_secs(20), |s| {
        s["devices"]["dmm-1"]["state"] == "disconnected"
    });
    std::thread::sleep(Duration::from_secs(1));
    let sim = LineSim::listen(Options::new(Kind::Keithley2000), &addr.to_string()).unwrap();
    let n = voltages(&r.msgs);
    r.until(
        "readings after the instrument came back",
        Duration::from_secs(60),
        |m| voltages(m) >= n + 10,
    );
    assert!(sim.connections() >= 1);
    agent.wait_status("running again", Duration::from_secs(10), |s| {
        s["devices"]["dmm-1"]["state"] == "running"
    });
    assert!(agent.metric("labgate_device_connected{device=\"dmm-1\"}") == 1.0);

    // Every record of the instrument (readings, its events, its command results) once,
    // with no seq missing, across all of it.
    r.drain_for(Duration::from_secs(1));
    for m in &r.msgs {
        assert_matches_schema(m);
        assert_envelope(m, "agent-lan");
    }
    assert_gap_free(&r.msgs);
}

#[test]
fn a_line_instrument_names_exactly_one_of_port_usb_and_address() {
    let dir = tempdir();
    let topics = Topics::new();
    for (device, key) in [
        (
            "address = \"10.0.0.7\"\nport = \"/dev/ttyUSB0\"",
            "devices[0].address",
        ),
        ("address = \"dmm.lab:99999\"", "devices[0].address"),
        ("", "devices[0].port"),
    ] {
        let cfg = agent_config(
            dir.path(),
            "agent-x",
            "127.0.0.1:9",
            &topics,
            free_port(),
            &format!("[[devices]]\nkind = \"line_instrument\"\nid = \"d\"\nprofile = \"keithley-2000\"\n{device}\n"),
        );
        let path = dir.path().join("x.toml");
        std::fs::write(&path, cfg).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_labgate"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains(key), "{key} not named: {err}");
    }
}

fn sensor(m: &[Msg], id: &str) -> usize {
    m.iter().filter(|x| x.json["sensor_id"] == id).count()
}

#[test]
fn modbus_tcp_reads_the_same_register_map_and_reconnects_after_the_device_was_off() {
    use labgate::sim::modbus::{ModbusSim, HUMIDITY_TENTHS, PRESSURE_HPA, TEMPERATURE_TENTHS};
    let sim = ModbusSim::listen(0, "127.0.0.1:0").unwrap();
    let addr = sim.path().display().to_string();
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let profile =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/profiles/modbus-th-sensor.toml");
    let device = format!(
        "[[devices]]\nkind = \"modbus_tcp\"\nid = \"plc-1\"\naddress = \"{addr}\"\nunit_id = 1\nprofile = \"{}\"\ninterval = \"100ms\"\ntimeout = \"300ms\"\nretries = 0\n",
        profile.display()
    );
    let cfg = agent_config(
        dir.path(),
        "agent-mbtcp",
        &broker.addr(),
        &topics,
        free_port(),
        &device,
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut r = Reader::new(
        &broker.addr(),
        &[topics.sensors(), topics.agent_events(), topics.results()],
    );
    r.until("all three registers", Duration::from_secs(30), |m| {
        ["plc-1.temperature", "plc-1.humidity", "plc-1.pressure"]
            .iter()
            .all(|s| sensor(m, s) >= 3)
    });
    let value = |id: &str| {
        r.msgs
            .iter()
            .find(|x| x.json["sensor_id"] == id)
            .unwrap()
            .json["value"]
            .as_f64()
            .unwrap()
    };
    assert!((value("plc-1.temperature") - f64::from(TEMPERATURE_TENTHS) / 10.0).abs() < 1e-9);
    assert!((value("plc-1.humidity") - f64::from(HUMIDITY_TENTHS) / 10.0).abs() < 1e-9);
    assert!((value("plc-1.pressure") - f64::from(PRESSURE_HPA)).abs() < 1e-3);
    // On another topic than the readings: it may be read after them.
    r.until("device_connected", Duration::from_secs(20), |m| {
        events(m, "device_connected") >= 1
    });
    let connected = r
        .msgs
        .iter()
        .find(|x| x.json["event"] == "device_connected")
        .unwrap()
        .json
        .clone();
    assert_eq!(connected["data"]["port"], format!("tcp://{addr}"));

    // Pause and resume as over RTU.
    let sender = Sender::new(&broker.addr());
    wait_until_commands_answered(&sender, &mut r, &topics.commands(), "agent-mbtcp");
    let c = json!({"command": "pause", "command_id": "p1", "target": {"agent": "agent-mbtcp", "device": "plc-1"}});
    sender.send(&topics.commands(), "agent-mbtcp", &c.to_string());
    r.until("pause completed", Duration::from_secs(20), |m| {
        m.iter()
            .any(|x| x.json["command_id"] == "p1" && x.json["status"] == "completed")
    });
    let requests = sim.requests();
    std::thread::sleep(Duration::from_millis(500));
    assert!(sim.requests() <= requests + 3, "paused: no polling");
    let c = json!({"command": "resume", "command_id": "r1", "target": {"agent": "agent-mbtcp", "device": "plc-1"}});
    sender.send(&topics.commands(), "agent-mbtcp", &c.to_string());

    // The device is switched off (its connection dropped, new ones refused), then on.
    let n = sensor(&r.msgs, "plc-1.temperature");
    r.until("polling again", Duration::from_secs(20), |m| {
        sensor(m, "plc-1.temperature") >= n + 3
    });
    drop(sim);
    r.until("device_disconnected", Duration::from_secs(30), |m| {
        events(m, "device_disconnected") >= 1
    });
    agent.wait_status("disconnected", Duration::from_secs(20), |s| {
        s["devices"]["plc-1"]["state"] == "disconnected"
    });
    let sim = ModbusSim::listen(0, &addr).unwrap();
    let n = sensor(&r.msgs, "plc-1.temperature");
    r.until(
        "readings after the device came back",
        Duration::from_secs(60),
        |m| sensor(m, "plc-1.temperature") >= n + 3 && events(m, "device_connected") >= 2,
    );
    assert!(sim.requests() > 0);
    r.drain_for(Duration::from_secs(1));
    for m in &r.msgs {
        assert_matches_schema(m);
        assert_envelope(m, "agent-mbtcp");
    }
    assert_gap_free(&r.msgs);
}

#[test]
fn a_balance_on_the_network_weighs_tares_and_zeroes() {
    let sim = LineSim::listen(Options::new(Kind::MtSics), "127.0.0.1:0").unwrap();
    let addr = sim.addr().unwrap();
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let device = format!(
        "[[devices]]\nkind = \"line_instrument\"\nid = \"bal-1\"\naddress = \"{addr}\"\nprofile = \"mettler-mt-sics\"\nprofiles_dir = \"{}\"\ninterval = \"100ms\"\n",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("devices/profiles")
            .display()
    );
    let cfg = agent_config(
        dir.path(),
        "agent-bal",
        &broker.addr(),
        &topics,
        free_port(),
        &device,
    );
    let _agent = Agent::start(dir.path(), &cfg);
    let mut r = Reader::new(&broker.addr(), &[topics.sensors(), topics.results()]);
    let sender = Sender::new(&broker.addr());
    wait_until_commands_answered(&sender, &mut r, &topics.commands(), "agent-bal");
    r.until("weights", Duration::from_secs(30), |m| {
        m.iter().filter(|x| x.json["sensor_type"] == "mass").count() >= 5
    });
    for (id, cmd, answer) in [("t1", "tare", "T S"), ("z1", "zero", "Z A")] {
        let c = json!({"command": cmd, "command_id": id, "target": {"agent": "agent-bal", "device": "bal-1"}});
        sender.send(&topics.commands(), "agent-bal", &c.to_string());
        r.until(cmd, Duration::from_secs(20), |m| {
            m.iter()
                .any(|x| x.json["command_id"] == id && x.json["status"] == "completed")
        });
        let done = r
            .msgs
            .iter()
            .find(|x| x.json["command_id"] == id && x.json["status"] == "completed")
            .unwrap();
        assert!(
            done.json["reason"].as_str().unwrap_or("").contains(answer),
            "{}",
            done.json
        );
    }
    let sent = sim.received();
    assert!(
        sent.iter().any(|l| l == "T") && sent.iter().any(|l| l == "Z"),
        "{sent:?}"
    );
}
