//! Power cuts: the agent's data dir lives on the fault filesystem (tests/common/faultfs),
//! where only fsync/fdatasync make data durable. Each scenario kills the agent, cuts
//! the power (everything not synced is gone), boots the filesystem again and restarts
//! the agent on what survived, against real tansu and mosquitto.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::faultfs::FaultRig;
use common::*;
use serde_json::json;

fn rig() -> FaultRig {
    FaultRig::new()
}

fn counter_device(url: &str) -> String {
    mqtt_number_device(
        url,
        "mqtt-c",
        "labgate-powercut",
        "lab/+id/counter",
        "counter",
    )
}

#[test]
fn mqtt_readings_the_agent_acked_survive_a_power_cut() {
    let mut r = rig();
    let url = r.mqtt.url();
    let mut agent = r.start("pc-mqtt", &counter_device(&url));
    agent.wait_status("MQTT connected", Duration::from_secs(20), |st| {
        st["devices"]["mqtt-c"]["state"] == "running"
    });
    // Kafka stalls: everything the agent acks to the broker is only in its buffer.
    r.broker.stall();
    const N: u64 = 400;
    let p = MqttClient::connect(&url, "test-powercut-publisher");
    for i in 0..N {
        p.publish("lab/pc/counter", i.to_string(), false);
    }
    p.wait_acked(N, Duration::from_secs(30));
    let acked = "labgate_mqtt_acked_total{device=\"mqtt-c\"}";
    let t0 = std::time::Instant::now();
    while agent.metric(acked) < N as f64 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent acked {} of {N}",
            agent.metric(acked)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let syncs_before = r.fs.syncs();
    assert!(syncs_before.0 > 0, "the agent never called fsync/fdatasync");
    r.cut_and_restart(&mut agent);
    r.broker.unstall();
    let mut reader = Reader::new(&r.broker.addr(), &r.topics.outputs());
    reader.until("every acked reading", Duration::from_secs(60), |m| {
        counter_values(m).len() as u64 == N
    });
    assert_eq!(
        counter_values(&reader.msgs),
        (0..N).collect::<BTreeSet<_>>()
    );
}

#[test]
fn a_seq_that_reached_kafka_never_comes_back_with_other_contents() {
    let mut r = rig();
    let mut agent = r.start("pc-seq", &sensors_device("env-pc", "2ms", None));
    let mut reader = Reader::new(&r.broker.addr(), &r.topics.outputs());
    for round in 0..3 {
        reader.until("readings flowing", Duration::from_secs(30), |m| {
            m.iter()
                .filter(|m| m.json["type"] == "sensor_reading")
                .count()
                > (round + 1) * 200
        });
        r.cut_and_restart(&mut agent);
    }
    reader.until(
        "readings after the last restart",
        Duration::from_secs(30),
        |m| {
            m.iter()
                .filter(|m| m.json["type"] == "sensor_reading")
                .count()
                > 1000
        },
    );
    reader.drain_for(Duration::from_secs(2));
    // Every (device, seq) seen in Kafka is one record, whatever was redelivered (a copy
    // sent after a restart may carry the replay marks the first one lacked).
    let seen = by_seq(&reader.msgs);
    assert!(
        seen.changed.is_empty(),
        "a seq came back changed:\n{}",
        seen.changed.join("\n")
    );
    let env: Vec<u64> = seen
        .records
        .keys()
        .filter(|(d, _)| d == "env-pc")
        .map(|(_, s)| *s)
        .collect();
    assert!(env.len() > 1000, "{} readings", env.len());
}

#[test]
fn a_command_that_ran_is_a_duplicate_after_a_power_cut() {
    let mut r = rig();
    let mut agent = r.start("pc-cmd", &slow_potentiostat("pstat-pc"));
    agent.wait_status("command consumer assigned", Duration::from_secs(30), |s| {
        s["commands"]["assigned"] == true
    });
    let mut reader = Reader::new(
        &r.broker.addr(),
        &[
            r.topics.events(),
            r.topics.agent_events(),
            r.topics.results(),
        ],
    );
    let cmd = json!({
        "command": "pause",
        "command_id": "pc-pause-1",
        "issued_at": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "ttl": "5m",
        "target": {"agent": "pc-cmd", "device": "pstat-pc"},
    })
    .to_string();
    produce(&r.broker.addr(), &r.topics.commands(), "pc-cmd", &cmd);
    let statuses = |m: &[Msg]| -> Vec<String> {
        m.iter()
            .filter(|m| m.json["command_id"] == "pc-pause-1")
            .map(|m| m.json["status"].as_str().unwrap_or("").to_string())
            .collect()
    };
    reader.until("pause completed", Duration::from_secs(20), |m| {
        statuses(m).contains(&"completed".to_string())
    });
    r.cut_and_restart(&mut agent);
    // The cut process never left its consumer group. The restarted one joins under the
    // same static instance id (the agent id) and takes its partitions back without
    // waiting for the cut member's session to expire (tansu holds a static member's
    // JoinGroup and SyncGroup 3 s each; dynamic membership took 12 s here, and once
    // under load no second rebalance came within 90 s).
    agent.wait_status("command consumer assigned", Duration::from_secs(30), |s| {
        s["commands"]["assigned"] == true
    });
    // The same command again, as a redelivery or a replay would bring it.
    produce(&r.broker.addr(), &r.topics.commands(), "pc-cmd", &cmd);
    reader.until("duplicate", Duration::from_secs(20), |m| {
        statuses(m).contains(&"duplicate".to_string())
    });
    reader.drain_for(Duration::from_secs(1));
    let paused = reader
        .msgs
        .iter()
        .filter(|m| m.json["event"] == "experiment_paused")
        .map(|m| m.json["event_id"].to_string())
        .collect::<BTreeSet<_>>();
    assert_eq!(paused.len(), 1, "the pause ran once: {paused:?}");
    // Redelivered records carry their event_id: one completion, however often sent.
    let completed = reader
        .msgs
        .iter()
        .filter(|m| m.json["command_id"] == "pc-pause-1" && m.json["status"] == "completed")
        .map(|m| m.json["event_id"].to_string())
        .collect::<BTreeSet<_>>();
    assert_eq!(completed.len(), 1, "{completed:?}");
}
