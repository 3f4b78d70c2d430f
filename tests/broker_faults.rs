//! A broker that refuses this agent (wrong SASL settings against a real tansu): the
//! records wait in the buffer, /health and a metric name the cause, an alert is raised
//! once, nothing is dead-lettered; with the configuration fixed, everything arrives.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn refused_credentials_are_named_retried_and_lose_nothing_once_fixed() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let good = agent_config(
        dir.path(),
        "agent-auth",
        &broker.addr(),
        &topics,
        free_port(),
        &sensors_device("env-auth", "20ms", None),
    );
    // tansu without --authentication does not speak SCRAM: librdkafka reports an
    // authentication failure, as it does for a wrong password.
    let refused = good.replace(
        "[kafka]\n",
        "[kafka]\nsecurity_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"SCRAM-SHA-256\"\nsasl_username = \"lab\"\nsasl_password = \"wrong\"\n",
    );
    broker.create_topics(
        &topics
            .outputs()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let mut agent = Agent::start(dir.path(), &refused);
    let st = agent.wait_status("the refusal named", Duration::from_secs(30), |s| {
        s["health"].as_array().is_some_and(|h| {
            h.iter().any(|r| {
                r.as_str()
                    .unwrap_or("")
                    .contains("kafka refuses this agent")
            })
        }) && s["buffer"]["records"].as_u64() > Some(100)
    });
    assert!(
        st["health"].to_string().contains("Authentication"),
        "{}",
        st["health"]
    );
    let (code, _) = agent.get("/health");
    assert_eq!(code, 503);
    assert!(agent.metric("labgate_kafka_auth_errors_total") > 0.0);
    assert_eq!(st["kafka"]["records_delivered"], 0);
    assert_eq!(st["buffer"]["dead_letters"], 0);
    // The password is never shown.
    assert!(!agent.get("/status").1.contains("wrong"));
    assert!(!agent.log_text().contains("\"wrong\""));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.terminate(), Some(0));

    // Fixed: every reading taken meanwhile arrives, gap-free, and so does the alert.
    std::fs::write(&agent.config, &good).unwrap();
    agent.spawn();
    let mut reader = Reader::new(&broker.addr(), &topics.outputs());
    let msgs = reader
        .until("the backlog and the alert", Duration::from_secs(60), |m| {
            m.iter().any(|m| {
                m.json["type"] == "alert"
                    && m.json["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("Kafka refuses this agent")
            }) && m
                .iter()
                .filter(|m| m.json["type"] == "sensor_reading")
                .count()
                > 200
        })
        .to_vec();
    let readings: Vec<Msg> = msgs
        .into_iter()
        .filter(|m| m.json["type"] == "sensor_reading")
        .collect();
    assert_gap_free(&readings);
    let first = readings.iter().filter_map(|m| m.json["seq"].as_u64()).min();
    assert_eq!(first, Some(0), "the readings from the refused run arrived");
    let alerts = reader
        .msgs
        .iter()
        .filter(|m| m.json["type"] == "alert")
        .count();
    assert_eq!(alerts, 1, "one alert for the episode");
    assert_eq!(agent.status()["buffer"]["dead_letters"], 0);
}
