//! The demo config end to end against a broker that checks every message: tansu started
//! with `--schema-registry`, each output topic bound to the project's own schema in
//! `schemas/`. A message that does not match is refused by the broker (and would be
//! dead-lettered and counted by the agent), so this test fails on any drift between what
//! the agent sends and what its schemas promise.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use labgate::sim::emstat::{Emstat, Options};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// Which schema checks which of the demo config's (default) topics.
const TOPIC_SCHEMAS: [(&str, &str); 9] = [
    ("echem_events", "experiment_event"),
    ("agent_events", "agent_event"),
    ("agent_status", "agent_status"),
    ("echem_data", "echem_data"),
    ("sensor_events", "sensor_reading"),
    ("alerts", "alert"),
    ("echem_command_results", "command_result"),
    ("sensor_aggregates", "sensor_aggregate"),
    ("echem_commands", "command"),
];

fn write_registry(dir: &Path) {
    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    for (topic, schema) in TOPIC_SCHEMAS {
        let text = std::fs::read_to_string(schemas.join(format!("{schema}.json"))).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // tansu checks the message value against `properties.value`; keys are free text.
        let wrapped = serde_json::json!({"type": "object", "properties": {"value": value}});
        std::fs::write(dir.join(format!("{topic}.json")), wrapped.to_string()).unwrap();
    }
}

/// Produces one message and waits until the broker has answered (accepted or refused:
/// the caller reads the topic to see which).
fn produce_raw(addr: &str, topic: &str, payload: &str) -> Result<(), String> {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    p.send(BaseRecord::to(topic).key("k").payload(payload))
        .map_err(|(e, _)| e.to_string())?;
    p.flush(Duration::from_secs(15))
        .map_err(|e| e.to_string())?;
    // The delivery report is the verdict; a BaseProducer without a context logs it, so
    // read the topic's end offset instead: a refused message is not in the log.
    Ok(())
}

#[test]
fn the_demo_config_runs_against_a_broker_that_checks_every_schema() {
    let dir = tempdir();
    let registry = dir.path().join("registry");
    std::fs::create_dir_all(&registry).unwrap();
    write_registry(&registry);
    let broker = Broker::start_with(&TansuOptions {
        schema_dir: Some(registry),
        ..TansuOptions::default()
    });
    let topics: Vec<&str> = TOPIC_SCHEMAS.iter().map(|(t, _)| *t).collect();
    broker.create_topics(&topics);

    // The check is on: a message that breaks the experiment-event schema is refused.
    let bad = serde_json::json!({"type": "experiment_event", "event": "x"}).to_string();
    produce_raw(&broker.addr(), "echem_events", &bad).unwrap();
    let mut probe = Reader::new(&broker.addr(), &["echem_events".to_string()]);
    probe.drain_for(Duration::from_secs(1));
    assert!(
        probe.msgs.is_empty(),
        "the broker accepted a message its schema refuses"
    );

    let mqtt = Mosquitto::start();
    let link = dir.path().join("ttyEMSTAT");
    let _emstat = Emstat::start(
        Options {
            speed: 4.0,
            ..Options::default()
        },
        Some(&link),
    )
    .unwrap();
    let sensors = zigbee2mqtt_sensors(&mqtt.url());
    let http = free_port();
    let demo = demo_config(
        &broker.addr(),
        &mqtt.url(),
        &link,
        &dir.path().join("data"),
        http,
    )
    .replace("interval = \"2s\"", "interval = \"200ms\"");
    let agent = Agent::start_with_env(dir.path(), &demo, &DEMO_ENV);
    let mut r = Reader::new(
        &broker.addr(),
        &topics.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
    );
    let sender = Sender::new(&broker.addr());
    wait_until_commands_answered(&sender, &mut r, "echem_commands", "demo-agent");
    let has = |m: &[Msg], topic: &str| m.iter().any(|x| x.topic == topic);
    r.until("every output topic", Duration::from_secs(90), |m| {
        [
            "echem_events",
            "agent_events",
            "agent_status",
            "echem_data",
            "sensor_events",
            "alerts",
            "echem_command_results",
            "sensor_aggregates",
        ]
        .iter()
        .all(|t| has(m, t))
            && m.iter().any(|x| x.json["device_id"] == "mqtt-lab")
    });
    drop(sensors);
    // Nothing was refused: no dead letters, no drops, and every message also passes the
    // local check.
    let s = agent.status();
    assert_eq!(s["buffer"]["dead_letters"], 0, "{s}");
    assert_eq!(s["records_dropped"], 0, "{s}");
    assert_eq!(
        agent.metric("labgate_records_dropped_total{reason=\"dead_letter\"}"),
        0.0
    );
    for m in r.msgs.iter().filter(|m| m.topic != "echem_commands") {
        assert_matches_schema(m);
    }
}
