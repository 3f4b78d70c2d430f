//! Kafka as the centre sees it: fleet status (birth, heartbeats, death; silence after a
//! crash; `labgate fleet`), replay-aware records across a broker stall, agent events on a
//! topic of their own, and the seed application's `[kafka]` config, against real tansu
//! and the real binary.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn statuses(msgs: &[Msg], topic: &str) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m.topic == topic)
        .map(|m| m.json.clone())
        .collect()
}

fn fleet(config: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["fleet", "--config"])
        .arg(config)
        .output()
        .expect("labgate fleet");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs `labgate fleet` until the agent's line says `state` (what the broker shows a
/// consumer can trail what was just produced by a moment).
fn fleet_until(config: &std::path::Path, agent: &str, state: &str) {
    // Generous: under a loaded test run an orderly shutdown (and so the death message)
    // once took longer than 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out) = fleet(config);
        assert_eq!(code, 0, "{out}");
        if fleet_line(&out, agent).contains(&format!(" {state} ")) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fleet never said {state}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fleet_line<'a>(out: &'a str, agent: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(agent))
        .unwrap_or_else(|| panic!("no line for {agent} in:\n{out}"))
}

#[test]
fn birth_heartbeats_and_death_on_sigterm_and_only_silence_after_sigkill() {
    let broker = Broker::start();
    let topics = Topics::new();
    let dir = tempdir();
    let cfg = agent_config_kafka(
        dir.path(),
        "fleet-a",
        &broker.addr(),
        &topics,
        free_port(),
        "status_interval = \"500ms\"",
        &sensors_device("s1", "200ms", None),
    );
    let mut agent = Agent::start(dir.path(), &cfg);
    let mut r = Reader::new(&broker.addr(), &[topics.status()]);
    r.until("birth and two heartbeats", Duration::from_secs(30), |m| {
        statuses(m, &topics.status())
            .iter()
            .filter(|s| s["status"] == "heartbeat")
            .count()
            >= 2
    });
    // The fleet tool sees it alive.
    fleet_until(&agent.config, "fleet-a", "alive");
    let before_stop = r.msgs.len();
    assert_eq!(agent.terminate(), Some(0), "{}", agent.log_text());
    r.until("death", Duration::from_secs(20), |m| {
        statuses(m, &topics.status())
            .iter()
            .any(|s| s["status"] == "death")
    });
    let first = statuses(&r.msgs, &topics.status());
    for m in r.msgs.iter() {
        assert_matches_schema(m);
        assert_eq!(m.key, "fleet-a");
        assert_eq!(
            m.headers.get("agent-id").map(String::as_str),
            Some("fleet-a")
        );
    }
    let session = first[0]["session_id"].as_str().unwrap().to_string();
    assert_eq!(first[0]["status"], "birth", "{first:?}");
    assert_eq!(first[0]["seq"], 0);
    assert_eq!(first.last().unwrap()["status"], "death");
    assert_eq!(first.last().unwrap()["reason"], "shutdown");
    for (i, s) in first.iter().enumerate() {
        assert_eq!(s["session_id"], session.as_str());
        assert_eq!(s["seq"], i as u64, "seqs count up: {first:?}");
        assert_eq!(s["status_interval_ms"], 500);
    }
    let hb = first[..before_stop]
        .iter()
        .rev()
        .find(|s| s["status"] == "heartbeat")
        .unwrap();
    assert_eq!(hb["devices"][0]["id"], "s1", "{hb}");
    assert_eq!(hb["devices"][0]["kind"], "simulated_sensors", "{hb}");
    assert_eq!(hb["devices"][0]["state"], "running", "{hb}");
    assert!(hb["records_delivered"].as_u64().unwrap() > 0, "{hb}");
    assert_eq!(hb["kafka"]["connected"], true, "{hb}");
    assert!(hb["config_digest"].as_str().unwrap().starts_with("sha256:"));
    fleet_until(&agent.config, "fleet-a", "stopped");

    // A crash says nothing: the last message stays a heartbeat, and it grows old.
    agent.spawn();
    let n = r.msgs.len();
    r.until(
        "a heartbeat of the new session",
        Duration::from_secs(30),
        |m| m[n..].iter().any(|x| x.json["status"] == "heartbeat"),
    );
    agent.kill9();
    r.drain_for(Duration::from_secs(2));
    let second: Vec<&Value> = r.msgs[n..].iter().map(|m| &m.json).collect();
    assert_eq!(second[0]["status"], "birth");
    assert_ne!(second[0]["session_id"], session.as_str(), "a new session");
    assert!(
        second.iter().all(|s| s["status"] != "death"),
        "no death after SIGKILL: {second:?}"
    );
    // Three intervals (1.5 s) without a heartbeat: silent.
    fleet_until(&agent.config, "fleet-a", "silent");
}

#[test]
fn records_that_waited_out_a_stall_are_marked_replayed_and_live_ones_are_not() {
    let broker = Broker::start();
    let topics = Topics::new();
    let dir = tempdir();
    let cfg = agent_config(
        dir.path(),
        "replay-a",
        &broker.addr(),
        &topics,
        free_port(),
        &sensors_device("s1", "50ms", None),
    );
    let agent = Agent::start(dir.path(), &cfg);
    let mut r = Reader::new(&broker.addr(), &[topics.sensors()]);
    r.until("live readings", Duration::from_secs(30), |m| m.len() >= 20);
    broker.stall();
    std::thread::sleep(Duration::from_secs(10));
    broker.unstall();
    let after = agent.status()["records_buffered"].as_u64().unwrap();
    r.until(
        "what was buffered during the stall",
        Duration::from_secs(60),
        |m| m.len() as u64 >= after + 40,
    );
    let replayed: Vec<&Msg> = r
        .msgs
        .iter()
        .filter(|m| m.json.get("replayed").is_some())
        .collect();
    // 10 s at 40 readings a second: most of them waited longer than 5 s.
    assert!(replayed.len() >= 100, "{} replayed", replayed.len());
    for m in &replayed {
        assert_matches_schema(m);
        assert_eq!(m.json["replayed"], true);
        let waited = m.json["buffered_ms"].as_u64().unwrap();
        assert!((5_000..20_000).contains(&waited), "{}", m.json);
        assert_eq!(m.headers.get("replayed").map(String::as_str), Some("true"));
        assert_eq!(
            m.headers.get("buffered-ms"),
            Some(&waited.to_string()),
            "{:?}",
            m.headers
        );
    }
    // The ones before the stall and the last ones (after catch-up) are live.
    assert!(r.msgs[..10]
        .iter()
        .all(|m| m.json.get("replayed").is_none()));
    let tail = &r.msgs[r.msgs.len() - 10..];
    assert!(
        tail.iter().all(|m| m.json.get("replayed").is_none()),
        "{:?}",
        tail.iter().map(|m| &m.json).collect::<Vec<_>>()
    );
    // Every reading arrived once, in order per sensor, replayed or not.
    assert_gap_free(&r.msgs);
    // The stall shows: nothing was handed to the producer for most of it, so at most
    // a second's worth (the stall gate) arrived late without the flag.
    let late_unflagged = r
        .msgs
        .iter()
        .filter(|m| m.json.get("replayed").is_none())
        .filter(|m| {
            let ts = m.json["timestamp"].as_str().unwrap();
            let idx = r.msgs.iter().position(|x| std::ptr::eq(x, *m)).unwrap();
            // Compare with the next message's timestamp: a record followed by one
            // stamped more than 5 s later was delivered with the stall between them.
            r.msgs
                .get(idx + 1)
                .and_then(|n| n.json["timestamp"].as_str())
                .is_some_and(|next| next > ts && rfc_ms(next) - rfc_ms(ts) > 5_000)
        })
        .count();
    assert!(late_unflagged <= 1, "{late_unflagged}");
}

fn rfc_ms(s: &str) -> i64 {
    // 2026-12-01T12:00:00.123Z → ms of the day is enough within one test.
    let t = &s[11..23];
    let h: i64 = t[0..2].parse().unwrap();
    let m: i64 = t[3..5].parse().unwrap();
    let sec: i64 = t[6..8].parse().unwrap();
    let ms: i64 = t[9..12].parse().unwrap();
    ((h * 60 + m) * 60 + sec) * 1000 + ms
}

#[test]
fn agent_events_leave_the_experiment_events_topic() {
    let broker = Broker::start();
    let topics = Topics::new();
    let dir = tempdir();
    let cfg = agent_config(
        dir.path(),
        "events-a",
        &broker.addr(),
        &topics,
        free_port(),
        r#"[[devices]]
kind = "simulated_potentiostat"
id = "p1"
points_per_message = 20
max_interval = "50ms"
speed = 0.0
runs = 1

  [[devices.steps]]
  technique = "cv"
  e_begin = 0.0
  e_vertex1 = 0.2
  e_vertex2 = -0.2
  e_step = 0.01
  scan_rate = 1.0
  n_scans = 1
"#,
    );
    let _agent = Agent::start(dir.path(), &cfg);
    let mut r = Reader::new(
        &broker.addr(),
        &[topics.events(), topics.agent_events(), topics.results()],
    );
    // A command for a device that does not exist: refused, and audited as an agent event.
    let sender = Sender::new(&broker.addr());
    wait_until_commands_answered(&sender, &mut r, &topics.commands(), "events-a");
    r.until(
        "the run's end and the audit event",
        Duration::from_secs(30),
        |m| {
            m.iter().any(|x| x.json["event"] == "experiment_completed")
                && m.iter().any(|x| x.json["event"] == "command_audit")
        },
    );
    for m in r.msgs.iter().filter(|m| m.topic != topics.results()) {
        assert_matches_schema(m);
        assert_envelope(m, "events-a");
        if m.topic == topics.events() {
            assert_eq!(m.json["type"], "experiment_event", "{}", m.json);
            assert!(m.json["experiment_id"].is_string(), "{}", m.json);
        } else {
            assert_eq!(m.json["type"], "agent_event", "{}", m.json);
        }
    }
}

/// The seed application's `KafkaConfig` keys, as its users write them: the agent runs on
/// them, its records land on the topics named the seed's way, and `check` says what each
/// key became.
#[test]
fn the_seed_applications_kafka_config_runs_as_written() {
    let broker = Broker::start();
    let dir = tempdir();
    let p = uuid::Uuid::new_v4().simple().to_string();
    let (events, data, commands) = (
        format!("{p}_experiment_events"),
        format!("{p}_measurement_data"),
        format!("{p}_commands"),
    );
    let http = free_port();
    let cfg = format!(
        r#"[agent]
agent_id = "seed-a"
data_dir = "{data_dir}"
shutdown_grace = "5s"

[kafka]
bootstrap_servers = ["{addr}"]
client_id = "echem-app"
event_topic = "{events}"
data_topic = "{data}"
command_topic = "{commands}"
consumer_group = "echem-app-group"
security_protocol = "PLAINTEXT"
offline_buffer_size = 1000
create_topics = true

[kafka.topics]
agent_events = "{p}_agent_events"
status = "{p}_status"

[http]
listen = "127.0.0.1:{http}"

[commands]
allow_unsigned = true

{device}
"#,
        data_dir = dir.path().join("data").display(),
        addr = broker.addr(),
        device = slow_potentiostat("p1"),
    );
    let path = dir.path().join("seed.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        format!("# kafka.event_topic = \"{events}\" -> kafka.topics.events"),
        format!("# kafka.data_topic = \"{data}\" -> kafka.topics.data"),
        format!("# kafka.command_topic = \"{commands}\" -> kafka.topics.commands"),
        "# kafka.offline_buffer_size = 1000 -> buffer.max_records".to_string(),
    ] {
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("security_protocol = \"plaintext\""), "{text}");
    let agent = Agent::start(dir.path(), &cfg);
    let mut r = Reader::new(&broker.addr(), &[events.clone(), data.clone()]);
    r.until(
        "events and data on the seed's topics",
        Duration::from_secs(30),
        |m| m.iter().any(|x| x.topic == events) && m.iter().any(|x| x.topic == data),
    );
    let s = agent.status();
    assert_eq!(s["health"], serde_json::json!([]), "{s}");
}
