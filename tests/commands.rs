//! Commands through a real tansu: pause stops data, resume continues it, stop ends the
//! experiment, every command gets results, malformed commands are rejected and the
//! agent runs on.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn results_for<'a>(msgs: &'a [Msg], id: &str) -> Vec<&'a Msg> {
    msgs.iter()
        .filter(|m| m.json["type"] == "command_result" && m.json["command_id"] == id)
        .collect()
}

fn statuses(msgs: &[Msg], id: &str) -> Vec<String> {
    results_for(msgs, id)
        .iter()
        .map(|m| m.json["status"].as_str().unwrap().to_string())
        .collect()
}

fn data_points(msgs: &[Msg]) -> usize {
    msgs.iter()
        .filter(|m| m.json["type"] == "echem_data")
        .map(|m| m.json["points"].as_array().unwrap().len())
        .sum()
}

fn command(id: &str, cmd: &str, device: Option<&str>) -> String {
    json!({
        "type": "command",
        "command": cmd,
        "command_id": id,
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "params": {},
        "target": {"agent": "agent-cmd", "device": device},
    })
    .to_string()
}

#[test]
fn pause_stops_data_resume_continues_stop_ends_experiment_and_bad_commands_are_rejected() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let extra = format!(
        "{}\n{}",
        slow_potentiostat("pstat-1"),
        sensors_device("env-1", "100ms", None)
    );
    // The agent gives its start-up code back to the kernel as soon as it is ready (10 s
    // after, by default), so that every command below runs code read back in.
    let agent = Agent::start_with_env(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-cmd",
            &broker.addr(),
            &topics,
            free_port(),
            &extra,
        ),
        &[("LABGATE_PAGE_OUT_AFTER_MS", "1")],
    );
    agent.wait_status("command consumer assigned", Duration::from_secs(30), |s| {
        s["commands"]["assigned"] == true
    });
    let t0 = std::time::Instant::now();
    while !agent
        .log_text()
        .contains("start-up code and read-only data given back to the kernel")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no page-out logged:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut reader = Reader::new(
        &broker.addr(),
        &[
            topics.data(),
            topics.events(),
            topics.agent_events(),
            topics.results(),
        ],
    );
    reader.until("data flowing", Duration::from_secs(30), |m| {
        data_points(m) >= 20
    });
    let b = broker.addr();
    let cmds = topics.commands();

    // Pause: accepted, completed, an experiment_paused event, and then no more data.
    produce(
        &b,
        &cmds,
        "agent-cmd",
        &command("c-pause", "pause", Some("pstat-1")),
    );
    reader.until("pause completed", Duration::from_secs(20), |m| {
        statuses(m, "c-pause") == ["accepted", "completed"]
    });
    reader.until("experiment_paused", Duration::from_secs(10), |m| {
        m.iter().any(|m| m.json["event"] == "experiment_paused")
    });
    let at_pause = data_points(reader.drain_for(Duration::from_millis(300)));
    let still = data_points(reader.drain_for(Duration::from_secs(2)));
    assert_eq!(at_pause, still, "no data while paused");
    assert_eq!(agent.status()["devices"]["pstat-1"]["state"], "paused");

    // Resume: data continues.
    produce(
        &b,
        &cmds,
        "agent-cmd",
        &command("c-resume", "resume", Some("pstat-1")),
    );
    reader.until("resume completed", Duration::from_secs(20), |m| {
        statuses(m, "c-resume") == ["accepted", "completed"]
    });
    reader.until("data after resume", Duration::from_secs(20), |m| {
        data_points(m) > still + 10
    });
    reader.until("experiment_resumed", Duration::from_secs(10), |m| {
        m.iter().any(|m| m.json["event"] == "experiment_resumed")
    });

    // Stop: experiment_stopped and the device is idle.
    produce(
        &b,
        &cmds,
        "agent-cmd",
        &command("c-stop", "stop", Some("pstat-1")),
    );
    reader.until("stop completed", Duration::from_secs(20), |m| {
        statuses(m, "c-stop") == ["accepted", "completed"]
    });
    reader.until("experiment_stopped", Duration::from_secs(10), |m| {
        m.iter().any(|m| m.json["event"] == "experiment_stopped")
    });
    agent.wait_status("device idle", Duration::from_secs(10), |s| {
        s["devices"]["pstat-1"]["state"] == "idle"
    });

    // Pause with no experiment running: accepted, then failed with the device's reason.
    produce(
        &b,
        &cmds,
        "agent-cmd",
        &command("c-idle", "pause", Some("pstat-1")),
    );
    reader.until("failed pause", Duration::from_secs(20), |m| {
        statuses(m, "c-idle") == ["accepted", "failed"]
    });
    let failed = results_for(&reader.msgs, "c-idle")[1].json.clone();
    assert_eq!(failed["reason"], "no experiment is running");

    // Malformed and invalid commands: each rejected with a reason; the agent runs on.
    produce(&b, &cmds, "x", "this is not json {");
    produce(
        &b,
        &cmds,
        "x",
        &command("c-unknown-dev", "stop", Some("nope")),
    );
    produce(
        &b,
        &cmds,
        "x",
        &command("c-unknown-cmd", "explode", Some("pstat-1")),
    );
    produce(
        &b,
        &cmds,
        "x",
        &json!({"command": "stop", "command_id": "c-params", "params": [1]}).to_string(),
    );
    // Addressed to another agent: ignored, no result.
    produce(
        &b,
        &cmds,
        "x",
        &json!({"command": "stop", "command_id": "c-other", "target": {"agent": "someone-else"}})
            .to_string(),
    );
    // A broadcast stop to every device of this agent: one result pair per device.
    produce(
        &b,
        &cmds,
        "x",
        &json!({"type":"command","command":"stop","command_id":"c-all","params":{}}).to_string(),
    );
    reader.until("broadcast stop results", Duration::from_secs(20), |m| {
        statuses(m, "c-all").len() == 4
    });
    let msgs = reader.drain_for(Duration::from_millis(500)).to_vec();
    let rejected: Vec<&Msg> = msgs
        .iter()
        .filter(|m| m.json["type"] == "command_result" && m.json["status"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    let reason = |id: &str| {
        results_for(&msgs, id)[0].json["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(rejected.iter().any(|m| m.json["reason"]
        .as_str()
        .unwrap()
        .starts_with("schema: not JSON")));
    assert_eq!(
        reason("c-unknown-dev"),
        "unknown_device: no device \"nope\""
    );
    assert!(reason("c-unknown-cmd").starts_with("schema: unknown command \"explode\""));
    assert_eq!(reason("c-params"), "schema: params must be an object");
    assert!(results_for(&msgs, "c-other").is_empty());
    let mut devices: Vec<String> = results_for(&msgs, "c-all")
        .iter()
        .filter(|m| m.json["status"] == "completed")
        .map(|m| m.json["target_device"].as_str().unwrap().to_string())
        .collect();
    devices.sort();
    assert_eq!(devices, ["env-1", "pstat-1"]);
    for m in &msgs {
        assert_matches_schema(m);
        assert_envelope(m, "agent-cmd");
    }
    let s = agent.status();
    assert_eq!(s["commands"]["rejected"], 4);
    assert_eq!(s["commands"]["ignored"], 1);
    assert_eq!(
        agent.metric("labgate_commands_total{status=\"rejected\"}"),
        4.0
    );
    assert_eq!(
        agent.get("/health").0,
        200,
        "agent still healthy after bad input"
    );
}

#[test]
fn command_send_tool_waits_for_the_result_and_exits_by_status() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-tool",
            &broker.addr(),
            &topics,
            free_port(),
            &slow_potentiostat("pstat-1"),
        ),
    );
    agent.wait_status("command consumer assigned", Duration::from_secs(30), |s| {
        s["commands"]["assigned"] == true
    });
    let send = |cmd: &str, device: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_labgate"))
            .args(["command", "send", "--config"])
            .arg(&agent.config)
            .args([
                "--agent",
                "agent-tool",
                "--device",
                device,
                "--wait",
                "--timeout",
                "20s",
                cmd,
            ])
            .output()
            .expect("run labgate command send")
    };
    let out = send("pause", "pstat-1");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        lines.contains("\"status\":\"accepted\"") && lines.contains("\"status\":\"completed\""),
        "{lines}"
    );
    assert_eq!(send("stop", "nope").status.code(), Some(11), "rejected");
    assert_eq!(send("stop", "pstat-1").status.code(), Some(0));
    assert_eq!(
        send("pause", "pstat-1").status.code(),
        Some(10),
        "failed: nothing running"
    );
}
