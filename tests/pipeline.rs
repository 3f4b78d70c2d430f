//! The path of a record against a real tansu broker: demo config end to end, broker
//! absent at start, broker stalled, agent killed, buffer cap.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

fn potentiostat(id: &str, speed: f64, runs: u32) -> String {
    format!(
        r#"[[devices]]
kind = "simulated_potentiostat"
id = "{id}"
points_per_message = 20
max_interval = "200ms"
speed = {speed}
runs = {runs}
pause_between = "100ms"

  [[devices.steps]]
  technique = "cv"
  e_begin = -0.2
  e_vertex1 = 0.6
  e_vertex2 = -0.2
  e_step = 0.01
  scan_rate = 0.1
  n_scans = 2

  [[devices.steps]]
  technique = "ca"
  e_dc = 0.5
  t_interval = 0.1
  t_run = 2.0
"#
    )
}

#[test]
fn demo_devices_end_to_end_every_message_matches_its_schema_with_gap_free_seq() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let extra = format!(
        "{}\n{}",
        potentiostat("pstat-1", 0.0, 2),
        sensors_device("env-1", "50ms", Some(20))
    );
    let _agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-e2e",
            &broker.addr(),
            &topics,
            free_port(),
            &extra,
        ),
    );
    let mut reader = Reader::new(&broker.addr(), &topics.outputs());
    let completed = |m: &[Msg]| {
        m.iter()
            .filter(|m| m.json["event"] == "experiment_completed")
            .count()
    };
    let sensors = |m: &[Msg]| {
        m.iter()
            .filter(|m| m.json["type"] == "sensor_reading")
            .count()
    };
    let receipts = |m: &[Msg]| {
        m.iter()
            .filter(|m| m.json["event"] == "run_delivered")
            .count()
    };
    reader.until(
        "two experiments, their receipts and 40 sensor readings",
        Duration::from_secs(60),
        |m| completed(m) == 2 && receipts(m) == 2 && sensors(m) == 40,
    );
    let msgs = reader.drain_for(Duration::from_millis(500)).to_vec();
    for m in &msgs {
        assert_matches_schema(m);
        assert_envelope(m, "agent-e2e");
    }
    assert_gap_free(&msgs);
    // Per experiment: started, 2 steps started/completed, completed, and all the points.
    let mut by_exp: BTreeMap<String, Vec<&Msg>> = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.json["device_id"] == "pstat-1") {
        by_exp.entry(m.key.clone()).or_default().push(m);
    }
    assert_eq!(by_exp.len(), 2);
    for (exp, ms) in &by_exp {
        let events: Vec<&str> = ms.iter().filter_map(|m| m.json["event"].as_str()).collect();
        assert_eq!(
            events,
            [
                "experiment_started",
                "step_started",
                "step_completed",
                "step_started",
                "step_completed",
                "experiment_completed",
                "run_delivered"
            ],
            "{exp}"
        );
        let points = |tech: &str| -> usize {
            ms.iter()
                .filter(|m| m.json["type"] == "echem_data" && m.json["technique"] == tech)
                .map(|m| m.json["points"].as_array().unwrap().len())
                .sum()
        };
        // CV: 2 scans of 80 + 80 steps (-0.2 → 0.6 → -0.2) + the final point; CA: 2 s / 0.1 s.
        assert_eq!(points("CV"), 321, "{exp}");
        assert_eq!(points("CA"), 20, "{exp}");
        // Within a key of a topic the seqs increase: order per key is kept (Kafka orders
        // per partition, so events and data are each in order, not interleaved).
        for topic in [topics.events(), topics.data()] {
            let seqs: Vec<u64> = ms
                .iter()
                .filter(|m| m.topic == topic)
                .map(|m| m.json["seq"].as_u64().unwrap())
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{exp} on {topic}: {seqs:?}"
            );
        }
    }
}

#[test]
fn broker_unreachable_at_start_records_are_buffered_then_all_delivered_in_order() {
    let port = free_port();
    let dir = tempdir();
    let topics = Topics::new();
    let brokers = format!("127.0.0.1:{port}");
    let extra = sensors_device("env-1", "10ms", Some(300));
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-late",
            &brokers,
            &topics,
            free_port(),
            &extra,
        ),
    );
    // All 600 readings are taken and buffered while no broker exists.
    let s = agent.wait_status("600 records buffered", Duration::from_secs(30), |s| {
        s["records_buffered"] == 600
    });
    assert_eq!(s["kafka"]["connected"], false);
    assert_eq!(s["buffer"]["records"], 600);
    assert_eq!(s["kafka"]["records_delivered"], 0);
    let _broker = Broker::start_on(port);
    let mut reader = Reader::new(&brokers, &[topics.sensors()]);
    reader.until("600 readings", Duration::from_secs(60), |m| m.len() >= 600);
    let msgs = reader.drain_for(Duration::from_millis(500)).to_vec();
    assert_eq!(msgs.len(), 600, "no duplicates expected without a crash");
    assert_gap_free(&msgs);
    // In order per key (and here, one partition: in seq order overall).
    let seqs: Vec<u64> = msgs
        .iter()
        .map(|m| m.json["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    agent.wait_status("buffer empty", Duration::from_secs(10), |s| {
        s["buffer"]["records"] == 0
    });
}

#[test]
fn broker_stalled_30s_mid_stream_loses_nothing_and_keeps_order() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let extra = sensors_device("env-1", "20ms", Some(2500));
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-stall",
            &broker.addr(),
            &topics,
            free_port(),
            &extra,
        ),
    );
    agent.wait_status("first deliveries", Duration::from_secs(30), |s| {
        s["kafka"]["records_delivered"].as_u64() > Some(200)
    });
    broker.stall();
    let before = agent.status()["kafka"]["records_delivered"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_secs(30));
    // Devices were never blocked: readings kept coming into the buffer while stalled.
    let s = agent.status();
    assert!(
        s["buffer"]["records"].as_u64().unwrap() > 1000,
        "records piled up in the buffer: {s}"
    );
    assert!(s["kafka"]["records_delivered"].as_u64().unwrap() <= before + 100);
    broker.unstall();
    let mut reader = Reader::new(&broker.addr(), &[topics.sensors()]);
    reader.until("all 5000 readings", Duration::from_secs(120), |m| {
        let seqs = seqs_by_device(m);
        seqs.get("env-1").is_some_and(|s| s.len() == 5000)
    });
    let msgs = reader.drain_for(Duration::from_secs(1)).to_vec();
    assert_gap_free(&msgs);
    // Order: a resend may repeat earlier records (same event_id), but no record shows
    // up before an earlier one of its key has: first appearances are in seq order (one
    // partition, so this covers every key).
    let first: Vec<u64> = {
        let mut seen = std::collections::HashSet::new();
        msgs.iter()
            .map(|m| m.json["seq"].as_u64().unwrap())
            .filter(|s| seen.insert(*s))
            .collect()
    };
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "first appearances out of order"
    );
    agent.wait_status("buffer empty", Duration::from_secs(30), |s| {
        s["buffer"]["records"] == 0
    });
    assert_eq!(
        agent.metric("labgate_records_dropped_total{reason=\"buffer_full_drop_oldest\"}"),
        0.0
    );
}

#[test]
fn agent_killed_mid_stream_and_restarted_loses_no_flushed_record_and_never_reuses_seq() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let extra = sensors_device("env-1", "0s", None);
    let cfg = agent_config(
        dir.path(),
        "agent-kill",
        &broker.addr(),
        &topics,
        free_port(),
        &extra,
    );
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("streaming", Duration::from_secs(30), |s| {
        s["kafka"]["records_delivered"].as_u64() > Some(5000)
    });
    // What the agent says is durable right before the kill must all reach Kafka.
    let durable_before_kill = agent.status()["devices"]["env-1"]["last_durable_seq"]
        .as_u64()
        .unwrap();
    agent.kill9();
    // Restart on a config whose sensor set stops soon, so the stream has an end.
    let cfg2 = cfg.replace("interval = \"0s\"", "interval = \"0s\"\nrounds = 1000");
    std::fs::write(&agent.config, cfg2).unwrap();
    agent.spawn();
    let s = agent.wait_status("restart delivered", Duration::from_secs(60), |s| {
        s["devices"]["env-1"]["state"] == "idle" && s["buffer"]["records"] == 0
    });
    let last = s["devices"]["env-1"]["last_durable_seq"].as_u64().unwrap();
    assert!(last > durable_before_kill, "seq continues after restart");
    let mut reader = Reader::new(&broker.addr(), &[topics.sensors()]);
    let complete = |m: &[Msg]| {
        seqs_by_device(m)
            .get("env-1")
            .is_some_and(|s| s.len() as u64 == last + 1)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !complete(&reader.msgs) && std::time::Instant::now() < deadline {
        reader.drain_for(Duration::from_millis(500));
    }
    let seqs = seqs_by_device(&reader.msgs);
    let missing = missing_ranges(&seqs["env-1"], last);
    assert!(missing.is_empty(), "missing seqs {missing:?} (durable before kill: {durable_before_kill}, last: {last})\nlog:\n{}", agent.log_text());
    let msgs = reader.drain_for(Duration::from_millis(500)).to_vec();
    // Gap-free from 0 to the last seq (so everything durable before the kill arrived),
    // and every duplicate carries the same event_id (no seq reused with new contents).
    assert_gap_free(&msgs);
    assert!(seqs["env-1"].contains_key(&durable_before_kill));
}

#[test]
fn buffer_cap_hit_while_broker_down_drops_oldest_counts_them_and_reports_them() {
    let port = free_port();
    let dir = tempdir();
    let topics = Topics::new();
    let brokers = format!("127.0.0.1:{port}");
    let extra = format!(
        "[buffer]\nmax_bytes = 131072\nrecords_per_chunk = 16\n\n{}",
        sensors_device("env-1", "1ms", Some(3000))
    );
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-cap",
            &brokers,
            &topics,
            free_port(),
            &extra,
        ),
    );
    agent.wait_status("all 6000 readings taken", Duration::from_secs(60), |s| {
        s["devices"]["env-1"]["state"] == "idle"
    });
    // Ingest may still be storing the last readings the device sent (it gathers a batch
    // until the commit is due), and each can drop one more at the cap: the metric and
    // the buffer's count are compared once they have settled.
    let settle_by = std::time::Instant::now() + Duration::from_secs(10);
    let (s, dropped_while_down) = loop {
        let dropped = agent
            .metric("labgate_records_dropped_total{reason=\"buffer_full_drop_oldest\"}")
            as u64;
        let s = agent.status();
        if s["buffer"]["unreported_drops"].as_u64() == Some(dropped)
            || std::time::Instant::now() > settle_by
        {
            break (s, dropped);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dropped = dropped_while_down;
    assert!(dropped > 0, "the cap was hit: {s}");
    assert!(
        s["buffer"]["bytes"].as_u64().unwrap() <= 131072 + 64 * 1024,
        "cap kept (plus in-flight window): {s}"
    );
    assert_eq!(s["buffer"]["unreported_drops"].as_u64().unwrap(), dropped);
    let _broker = Broker::start_on(port);
    let mut reader = Reader::new(
        &brokers,
        &[topics.sensors(), topics.events(), topics.agent_events()],
    );
    let reported = |m: &[Msg]| -> u64 {
        m.iter()
            .filter(|m| m.json["type"] == "agent_event" && m.json["event"] == "records_dropped")
            .map(|m| m.json["data"]["count"].as_u64().unwrap())
            .sum()
    };
    reader.until("a drop report", Duration::from_secs(60), |m| {
        reported(m) > 0
    });
    agent.wait_status("buffer drained", Duration::from_secs(30), |s| {
        s["buffer"]["records"] == 0
    });
    // The events written while the buffer was still full (the drop report among them)
    // may have made room by dropping more readings: the final count is what adds up,
    // once it is reported too.
    let dropped =
        agent.metric("labgate_records_dropped_total{reason=\"buffer_full_drop_oldest\"}") as u64;
    reader.until("every drop reported", Duration::from_secs(60), |m| {
        reported(m) >= dropped
    });
    let msgs = reader.drain_for(Duration::from_secs(1)).to_vec();
    for m in &msgs {
        assert_matches_schema(m);
    }
    // Exact accounting: readings delivered + readings dropped = readings taken, and the
    // reports carry the same count as the metric.
    let delivered = msgs
        .iter()
        .filter(|m| m.json["type"] == "sensor_reading")
        .count() as u64;
    assert_eq!(
        delivered + dropped,
        6000,
        "delivered {delivered} + dropped {dropped}"
    );
    assert_eq!(reported(&msgs), dropped);
    // The survivors are the newest: the last reading is there, unless the events
    // written after the broker came back made room while every older chunk was in
    // flight (drop_oldest drops only chunks not yet handed to the producer).
    assert!(
        seqs_by_device(&msgs)["env-1"].contains_key(&5999) || dropped > dropped_while_down,
        "the newest reading was dropped while the broker was down"
    );
    assert_eq!(agent.status()["buffer"]["unreported_drops"], 0);
}

/// (a config, the same config with messages above 2,000 bytes refused). librdkafka checks
/// message.max.bytes before sending, as a broker would: a 100-point data chunk is larger,
/// events are smaller.
fn dead_letter_configs(
    dir: &std::path::Path,
    agent_id: &str,
    broker: &Broker,
    topics: &Topics,
) -> (String, String) {
    let extra = format!(
        "{}\n",
        potentiostat("pstat-1", 0.0, 1)
            .replace("points_per_message = 20", "points_per_message = 100")
    );
    let good = agent_config(dir, agent_id, &broker.addr(), topics, free_port(), &extra);
    let strict = good.replace(
        "[http]",
        "[kafka.properties]\n\"message.max.bytes\" = \"2000\"\n\n[http]",
    );
    (good, strict)
}

#[test]
fn record_the_broker_refuses_for_good_is_dead_lettered_with_an_alert_and_counted() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let (_, cfg) = dead_letter_configs(dir.path(), "agent-dlq", &broker, &topics);
    let agent = Agent::start(dir.path(), &cfg);
    let mut reader = Reader::new(
        &broker.addr(),
        &[
            topics.events(),
            topics.agent_events(),
            topics.data(),
            topics.alerts(),
        ],
    );
    reader.until("experiment completed", Duration::from_secs(60), |m| {
        m.iter().any(|m| m.json["event"] == "experiment_completed")
    });
    let s = agent.wait_status("buffer empty", Duration::from_secs(30), |s| {
        s["buffer"]["records"] == 0
    });
    let dead = s["buffer"]["dead_letters"].as_u64().unwrap();
    assert!(dead > 0, "large chunks were refused: {s}");
    assert_eq!(
        agent.metric("labgate_records_dropped_total{reason=\"dead_letter\"}") as u64,
        dead
    );
    let msgs = reader
        .until("one alert per dead letter", Duration::from_secs(30), |m| {
            m.iter().filter(|m| m.json["type"] == "alert").count() as u64 == dead
        })
        .to_vec();
    for m in msgs.iter().filter(|m| m.json["type"] == "alert") {
        assert_matches_schema(m);
        assert_eq!(m.json["priority"], "high");
        assert!(
            m.json["message"].as_str().unwrap().contains("dead-letter"),
            "{}",
            m.json
        );
    }
    // Everything small enough arrived: all events, and only the too-large data is missing.
    let events = msgs
        .iter()
        .filter(|m| m.json["type"] == "experiment_event")
        .count();
    assert_eq!(events, 6);
    // The dead letters are kept on disk for a human (read after the agent stops).
    let mut agent = agent;
    assert_eq!(agent.terminate(), Some(0));
    let buffer = labgate::buffer::Buffer::open(
        &dir.path().join("data/buffer"),
        &labgate::config::BufferConfig::default(),
    )
    .unwrap();
    let letters = buffer.dead_letters().unwrap();
    assert_eq!(letters.len() as u64, dead);
    assert!(
        letters
            .iter()
            .all(|d| d.reason.contains("too large") || d.reason.contains("Message size")),
        "{:?}",
        letters[0].reason
    );
}

/// The operator's side: dead letters are listed, exported and, once the cause is fixed,
/// requeued and delivered as they were (same seq, same message).
#[test]
fn dead_letters_are_listed_exported_and_requeued_by_the_operator() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let (good, strict) = dead_letter_configs(dir.path(), "agent-dlq-ops", &broker, &topics);
    let mut agent = Agent::start(dir.path(), &strict);
    let mut reader = Reader::new(
        &broker.addr(),
        &[topics.events(), topics.agent_events(), topics.data()],
    );
    reader.until("experiment completed", Duration::from_secs(60), |m| {
        m.iter().any(|m| m.json["event"] == "experiment_completed")
    });
    let s = agent.wait_status("buffer empty", Duration::from_secs(30), |s| {
        s["buffer"]["records"] == 0
    });
    let dead = s["buffer"]["dead_letters"].as_u64().unwrap();
    assert!(dead > 0);
    let data_before = reader
        .msgs
        .iter()
        .filter(|m| m.json["type"] == "echem_data")
        .count();

    // While the agent runs, the tool says it must be stopped.
    let config = agent.config.clone();
    let tool = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_labgate"))
            .args(["buffer", "dead-letters"])
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let busy = tool(&["list"]);
    assert_eq!(busy.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("running agent"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert_eq!(agent.terminate(), Some(0));

    let list = tool(&["list"]);
    assert!(list.status.success());
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert_eq!(list.lines().count() as u64, dead, "{list}");
    assert!(list.contains("pstat-1"), "{list}");
    let out = dir.path().join("dead.ndjson");
    let export = tool(&["export", "--out", out.to_str().unwrap()]);
    assert!(export.status.success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, dead);
    let seqs: std::collections::BTreeSet<u64> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["message"]["type"], "echem_data");
            assert_eq!(l["message"]["seq"], l["seq"]);
            l["seq"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(tool(&["requeue", "--id", "999999"]).status.code(), Some(64));
    let requeue = tool(&["requeue"]);
    assert!(requeue.status.success());
    assert!(tool(&["list"]).stdout.starts_with(b"no dead letters"));

    // The cause is fixed (no size limit): the requeued records arrive unchanged.
    std::fs::write(&config, &good).unwrap();
    agent.spawn();
    reader.until("requeued data", Duration::from_secs(30), |m| {
        m.iter().filter(|m| m.json["type"] == "echem_data").count() as u64
            >= data_before as u64 + dead
    });
    let arrived: std::collections::BTreeSet<u64> = reader
        .msgs
        .iter()
        .filter(|m| m.json["type"] == "echem_data" && m.json["device_id"] == "pstat-1")
        .filter_map(|m| m.json["seq"].as_u64())
        .filter(|s| seqs.contains(s))
        .collect();
    assert_eq!(arrived, seqs);
}

#[test]
fn buffer_stats_asks_the_running_agent() {
    let dir = tempdir();
    let topics = Topics::new();
    let brokers = format!("127.0.0.1:{}", free_port()); // nobody listens: records stay
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-stats",
            &brokers,
            &topics,
            free_port(),
            &sensors_device("env-1", "10ms", Some(50)),
        ),
    );
    agent.wait_status("100 buffered", Duration::from_secs(30), |s| {
        s["buffer"]["records"] == 100
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["buffer", "stats", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("source:        running agent"), "{text}");
    assert!(
        text.contains("records:       100") && text.contains("env-1: 100"),
        "{text}"
    );
    assert_eq!(
        agent.get("/health").0,
        200,
        "unreachable for less than 30 s is still healthy"
    );
}
