//! Modbus RTU end to end: the tokio-modbus RTU slave simulator on a real pty, the real
//! agent and a real tansu.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use labgate::sim::modbus::ModbusSim;
use serde_json::json;

fn readings<'a>(msgs: &'a [Msg], sensor_id: &'a str) -> impl Iterator<Item = &'a Msg> + 'a {
    msgs.iter()
        .filter(move |m| m.json["type"] == "sensor_reading" && m.json["sensor_id"] == sensor_id)
}

#[test]
fn registers_become_scaled_readings_exceptions_are_counted_pause_stops_the_bus_and_unplug_reconnects(
) {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let link = dir.path().join("ttyRS485");
    let sim = ModbusSim::start(5, Some(&link)).unwrap();
    let profile =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/profiles/modbus-th-sensor.toml");
    let device = format!(
        "[[devices]]\nkind = \"modbus_rtu\"\nid = \"th-1\"\nport = \"{}\"\nprofile = \"{}\"\ninterval = \"100ms\"\ntimeout = \"300ms\"\nretries = 0\n",
        link.display(),
        profile.display()
    );
    let cfg = agent_config(
        dir.path(),
        "agent-mb",
        &broker.addr(),
        &topics,
        free_port(),
        &device,
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut reader = Reader::new(
        &broker.addr(),
        &[
            topics.sensors(),
            topics.events(),
            topics.agent_events(),
            topics.results(),
        ],
    );
    let msgs = reader
        .until(
            "readings of all three registers",
            Duration::from_secs(30),
            |m| {
                ["th-1.temperature", "th-1.humidity", "th-1.pressure"]
                    .iter()
                    .all(|s| readings(m, s).count() >= 3)
            },
        )
        .to_vec();
    for (sensor, value, unit) in [
        ("th-1.temperature", 23.5, "°C"),
        ("th-1.humidity", 45.5, "%"),
        ("th-1.pressure", 1013.25, "hPa"),
    ] {
        for r in readings(&msgs, sensor) {
            assert!(
                (r.json["value"].as_f64().unwrap() - value).abs() < 1e-9,
                "{}",
                r.json
            );
            assert_eq!(r.json["unit"], unit);
            assert_eq!(r.json["metadata"]["slave"], 1);
            assert_matches_schema(r);
        }
    }
    // Every 5th request is answered ServerDeviceBusy; without retries each is counted.
    assert!(agent.metric("labgate_device_error_replies_total{device=\"th-1\"}") >= 1.0);

    // Pause: no more requests on the bus; resume: requests again.
    let sender = Sender::new(&broker.addr());
    wait_until_commands_answered(&sender, &mut reader, &topics.commands(), "agent-mb");
    let cmd = |id: &str, c: &str| {
        json!({"command": c, "command_id": id, "target": {"agent": "agent-mb", "device": "th-1"}})
            .to_string()
    };
    let done = |id: &'static str| {
        move |m: &[Msg]| {
            m.iter()
                .any(|m| m.json["command_id"] == id && m.json["status"] == "completed")
        }
    };
    sender.send(&topics.commands(), "k", &cmd("c-pause", "pause"));
    reader.until("paused", Duration::from_secs(20), done("c-pause"));
    std::thread::sleep(Duration::from_millis(300));
    let at_pause = sim.requests();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(sim.requests(), at_pause, "no requests while paused");
    sender.send(&topics.commands(), "k", &cmd("c-resume", "resume"));
    reader.until("resumed", Duration::from_secs(20), done("c-resume"));
    std::thread::sleep(Duration::from_millis(600));
    assert!(sim.requests() > at_pause, "polling again after resume");

    // Unplug the adapter: the bus is reported disconnected; replug: readings resume.
    sim.unplug();
    reader.until("device_disconnected", Duration::from_secs(20), |m| {
        m.iter().any(|m| m.json["event"] == "device_disconnected")
    });
    let before = readings(&reader.msgs, "th-1.temperature").count();
    let sim2 = ModbusSim::start(0, Some(&link)).unwrap();
    reader.until("readings after replug", Duration::from_secs(30), |m| {
        readings(m, "th-1.temperature").count() > before + 3
    });
    assert!(sim2.requests() > 0);
}
