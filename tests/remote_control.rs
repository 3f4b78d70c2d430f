//! Safe remote control through a real tansu and the real agent binary: signed, expiring,
//! at-most-once commands; every rejection reason; replay after restart; two agents on
//! one command topic; the control-plane lease; tampered commands in bulk.

mod common;

use std::path::Path;
use std::process::Command as Process;
use std::time::{Duration, SystemTime};

use common::*;
use ed25519_dalek::SigningKey;
use labgate::commands::sign;
use serde_json::{json, Map, Value};

/// Operator alice (may pause, resume and stop) and the policy this suite runs under.
fn alice() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

fn commands_section(extra: &str) -> String {
    format!(
        r#"[commands]
clock_skew = "5s"

[[commands.operators]]
name = "alice"
public_key = "{}"
commands = ["pause", "resume", "stop"]
{extra}"#,
        sign::public_base64(&alice().verifying_key())
    )
}

fn rfc(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn envelope(
    agent: &str,
    id: &str,
    cmd: &str,
    device: &str,
    issued: SystemTime,
) -> Map<String, Value> {
    json!({
        "type": "command",
        "command_id": id,
        "command": cmd,
        "issued_at": rfc(issued),
        "ttl": "60s",
        "target": {"agent": agent, "device": device},
        "params": {},
        "issuer": "alice",
    })
    .as_object()
    .cloned()
    .unwrap_or_default()
}

fn signed(mut env: Map<String, Value>) -> String {
    sign::sign(&mut env, &alice());
    Value::Object(env).to_string()
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn results<'a>(msgs: &'a [Msg], id: &str) -> Vec<&'a Value> {
    msgs.iter()
        .filter(|m| m.json["type"] == "command_result" && m.json["command_id"] == id)
        .map(|m| &m.json)
        .collect()
}

fn statuses(msgs: &[Msg], id: &str) -> Vec<String> {
    results(msgs, id)
        .iter()
        .map(|v| v["status"].as_str().unwrap_or("").to_string())
        .collect()
}

fn events(msgs: &[Msg], name: &str) -> usize {
    msgs.iter().filter(|m| m.json["event"] == name).count()
}

fn data_points(msgs: &[Msg], agent: &str) -> usize {
    msgs.iter()
        .filter(|m| m.json["agent_id"] == agent)
        .filter(|m| {
            matches!(
                m.json["type"].as_str(),
                Some("echem_data" | "sensor_reading")
            )
        })
        .map(|m| m.json["points"].as_array().map_or(1, Vec::len))
        .sum()
}

struct Setup {
    broker: Broker,
    topics: Topics,
    dir: tempfile::TempDir,
}

fn start_agent(s: &Setup, agent_id: &str, devices: &str, policy: &str) -> Agent {
    let dir = s.dir.path().join(agent_id);
    std::fs::create_dir_all(&dir).unwrap();
    Agent::start(
        &dir,
        &agent_config(
            &dir,
            agent_id,
            &s.broker.addr(),
            &s.topics,
            free_port(),
            &format!("{devices}\n{policy}"),
        ),
    )
}

fn setup() -> Setup {
    Setup {
        broker: Broker::start(),
        topics: Topics::new(),
        dir: tempdir(),
    }
}

fn reader(s: &Setup) -> Reader {
    Reader::new(
        &s.broker.addr(),
        &[
            s.topics.results(),
            s.topics.events(),
            s.topics.agent_events(),
            s.topics.data(),
            s.topics.sensors(),
        ],
    )
}

#[test]
fn every_rejection_reason_is_reported_and_nothing_is_executed() {
    let s = setup();
    let agent = start_agent(
        &s,
        "rc-a",
        &format!(
            "{}\n{}",
            slow_potentiostat("pstat-1"),
            sensors_device("env-1", "100ms", None)
        ),
        // A device that may be paused and resumed, never stopped or started.
        &commands_section("\n[commands.devices.env-1]\nallow = [\"pause\", \"resume\"]\n"),
    );
    let sender = Sender::new(&s.broker.addr());
    let mut r = reader(&s);
    wait_until_commands_answered(&sender, &mut r, &s.topics.commands(), "rc-a");
    r.until("data flowing", Duration::from_secs(30), |m| {
        data_points(m, "rc-a") >= 20
    });

    let now = SystemTime::now();
    let mut cases: Vec<(String, String, &str)> = Vec::new();
    let mut add = |payload: String, id: &str, code: &'static str| {
        cases.push((id.to_string(), payload, code));
    };
    let id = uuid();
    add(
        signed(envelope("rc-a", &id, "explode", "pstat-1", now)),
        &id,
        "schema",
    );
    let id = uuid();
    add(
        signed(envelope("rc-a", &id, "pause", "no-such", now)),
        &id,
        "unknown_device",
    );
    let id = uuid();
    add(
        signed(envelope("rc-a", &id, "stop", "env-1", now)),
        &id,
        "not_allowed",
    );
    let id = uuid();
    add(
        signed(envelope("rc-a", &id, "start", "pstat-1", now)),
        &id,
        "not_allowed",
    );
    let id = uuid();
    let old = now - Duration::from_secs(3600);
    add(
        signed(envelope("rc-a", &id, "stop", "pstat-1", old)),
        &id,
        "expired",
    );
    let id = uuid();
    let future = now + Duration::from_secs(600);
    add(
        signed(envelope("rc-a", &id, "stop", "pstat-1", future)),
        &id,
        "not_yet_valid",
    );
    let id = uuid();
    let mut tampered: Map<String, Value> =
        serde_json::from_str(&signed(envelope("rc-a", &id, "pause", "pstat-1", now))).unwrap();
    tampered.insert("command".into(), "stop".into());
    add(Value::Object(tampered).to_string(), &id, "bad_signature");
    let id = uuid();
    let mut plain = envelope("rc-a", &id, "stop", "pstat-1", now);
    plain.remove("issuer");
    add(Value::Object(plain).to_string(), &id, "unsigned");
    for (_, payload, _) in &cases {
        sender.send(&s.topics.commands(), "rc-a", payload);
    }
    r.until("every rejection", Duration::from_secs(30), |m| {
        cases.iter().all(|(id, _, _)| !results(m, id).is_empty())
    });
    for (id, _, code) in &cases {
        let res = results(&r.msgs, id);
        assert_eq!(res.len(), 1, "{id}: {res:?}");
        assert_eq!(res[0]["status"], "rejected", "{res:?}");
        assert_eq!(res[0]["reason_code"], *code, "{res:?}");
        assert!(
            res[0]["reason"].as_str().unwrap_or("").starts_with(code),
            "{res:?}"
        );
    }
    // The audit trail has each decision as an event too.
    r.until("audit events", Duration::from_secs(10), |m| {
        cases.iter().all(|(id, _, _)| {
            m.iter()
                .any(|x| x.json["event"] == "command_audit" && x.json["data"]["command_id"] == *id)
        })
    });

    // Then one valid pause, and the same bytes again: executed once, then `duplicate`.
    let id = uuid();
    let pause = signed(envelope("rc-a", &id, "pause", "pstat-1", SystemTime::now()));
    sender.send(&s.topics.commands(), "rc-a", &pause);
    r.until("pause completed", Duration::from_secs(20), |m| {
        statuses(m, &id) == ["accepted", "completed"]
    });
    let done = results(&r.msgs, &id);
    assert_eq!(done[0]["issuer"], "alice");
    assert!(done[0]["issued_at_us"].as_u64().is_some());
    sender.send(&s.topics.commands(), "rc-a", &pause);
    r.until("duplicate", Duration::from_secs(20), |m| {
        statuses(m, &id) == ["accepted", "completed", "duplicate"]
    });
    let all = r.drain_for(Duration::from_secs(1)).to_vec();
    // Nothing but the valid pause reached the device.
    assert_eq!(events(&all, "experiment_paused"), 1);
    assert_eq!(events(&all, "experiment_stopped"), 0);
    assert_eq!(agent.status()["devices"]["pstat-1"]["state"], "paused");
    assert_eq!(agent.status()["devices"]["env-1"]["state"], "running");
    for m in all.iter().filter(|m| m.json["type"] == "command_result") {
        assert_matches_schema(m);
    }
    // The readiness probes were rejected too (one or more: the probe loop resends until answered).
    let probes = all
        .iter()
        .filter(|m| {
            m.json["type"] == "command_result"
                && m.json["status"] == "rejected"
                && m.json["command_id"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("probe-"))
        })
        .count();
    assert!(probes >= 1);
    assert_eq!(
        agent.metric("labgate_commands_total{status=\"rejected\"}") as usize,
        cases.len() + probes
    );
    assert_eq!(
        agent.metric("labgate_commands_total{status=\"duplicate\"}"),
        1.0
    );
}

#[test]
fn a_replay_after_a_restart_is_a_duplicate() {
    let s = setup();
    let mut agent = start_agent(
        &s,
        "rc-b",
        &slow_potentiostat("pstat-1"),
        &commands_section(""),
    );
    let sender = Sender::new(&s.broker.addr());
    let mut r = reader(&s);
    wait_until_commands_answered(&sender, &mut r, &s.topics.commands(), "rc-b");
    let id = uuid();
    let pause = signed(envelope("rc-b", &id, "pause", "pstat-1", SystemTime::now()));
    sender.send(&s.topics.commands(), "rc-b", &pause);
    r.until("pause completed", Duration::from_secs(20), |m| {
        statuses(m, &id) == ["accepted", "completed"]
    });
    assert_eq!(agent.terminate(), Some(0));
    agent.spawn();
    agent.wait_status("commands assigned", Duration::from_secs(30), |st| {
        st["commands"]["assigned"] == true
    });
    // The restarted agent resumes its group at the committed offset: the replay is the
    // next message it reads.
    sender.send(&s.topics.commands(), "rc-b", &pause);
    r.until("duplicate after restart", Duration::from_secs(30), |m| {
        statuses(m, &id) == ["accepted", "completed", "duplicate"]
    });
    let all = r.drain_for(Duration::from_millis(500));
    assert_eq!(events(all, "experiment_paused"), 1, "the pause ran once");
}

#[test]
fn two_agents_on_one_topic_each_run_only_their_commands() {
    let s = setup();
    let devices = sensors_device("env-1", "100ms", None);
    let a = start_agent(&s, "rc-one", &devices, &commands_section(""));
    let b = start_agent(&s, "rc-two", &devices, &commands_section(""));
    let sender = Sender::new(&s.broker.addr());
    let mut r = reader(&s);
    wait_until_commands_answered(&sender, &mut r, &s.topics.commands(), "rc-one");
    wait_until_commands_answered(&sender, &mut r, &s.topics.commands(), "rc-two");

    let id = uuid();
    sender.send(
        &s.topics.commands(),
        "rc-one",
        &signed(envelope("rc-one", &id, "pause", "env-1", SystemTime::now())),
    );
    r.until("pause on rc-one", Duration::from_secs(20), |m| {
        statuses(m, &id) == ["accepted", "completed"]
    });
    assert!(results(&r.msgs, &id)
        .iter()
        .all(|v| v["agent_id"] == "rc-one"));
    let before = (
        data_points(&r.msgs, "rc-one"),
        data_points(&r.msgs, "rc-two"),
    );
    let after = r.drain_for(Duration::from_secs(2));
    let after = (data_points(after, "rc-one"), data_points(after, "rc-two"));
    assert!(
        after.0 <= before.0 + 5,
        "rc-one paused: {before:?} → {after:?}"
    );
    assert!(
        after.1 >= before.1 + 10,
        "rc-two kept reading: {before:?} → {after:?}"
    );
    assert_eq!(a.status()["devices"]["env-1"]["state"], "paused");
    assert_eq!(b.status()["devices"]["env-1"]["state"], "running");
    assert!(
        b.metric("labgate_commands_total{status=\"ignored\"}") >= 1.0,
        "rc-two ignored rc-one's command"
    );

    // A command without target.agent is for every agent.
    let id = uuid();
    let mut env = envelope("x", &id, "resume", "env-1", SystemTime::now());
    env.insert("target".into(), json!({"device": "env-1"}));
    sender.send(&s.topics.commands(), "", &signed(env));
    r.until("both answer a broadcast", Duration::from_secs(20), |m| {
        let res = results(m, &id);
        ["rc-one", "rc-two"].iter().all(|ag| {
            res.iter()
                .any(|v| v["agent_id"] == *ag && v["status"] == "completed")
        })
    });
}

#[test]
fn the_lease_sends_the_device_to_its_safe_state_when_the_command_topic_is_unreachable() {
    let s = setup();
    let agent = start_agent(
        &s,
        "rc-lease",
        &slow_potentiostat("pstat-1"),
        &commands_section("\n[commands.devices.pstat-1]\nlease = \"3s\"\nsafe_state = \"pause\"\n"),
    );
    let mut r = reader(&s);
    r.until("data flowing", Duration::from_secs(30), |m| {
        data_points(m, "rc-lease") >= 20
    });
    agent.wait_status("running", Duration::from_secs(10), |st| {
        st["devices"]["pstat-1"]["state"] == "running"
    });
    s.broker.stall();
    agent.wait_status("safe state", Duration::from_secs(20), |st| {
        st["devices"]["pstat-1"]["state"] == "paused"
    });
    s.broker.unstall();
    r.until("lease events", Duration::from_secs(40), |m| {
        events(m, "lease_expired") == 1 && events(m, "lease_restored") == 1
    });
    let expired = r
        .msgs
        .iter()
        .find(|m| m.json["event"] == "lease_expired")
        .map(|m| m.json.clone())
        .unwrap_or_default();
    assert_eq!(expired["data"]["device_id"], "pstat-1");
    assert_eq!(expired["data"]["safe_state"], "pause");
    assert_eq!(expired["data"]["ok"], true, "{expired}");
    assert!(
        expired["data"]["unreachable_seconds"]
            .as_f64()
            .unwrap_or(0.0)
            > 3.0
    );
    r.until("experiment_paused", Duration::from_secs(10), |m| {
        events(m, "experiment_paused") == 1
    });
    // The device stays in its safe state after the topic is back: resuming is a person's call.
    let before = data_points(&r.msgs, "rc-lease");
    let after = data_points(r.drain_for(Duration::from_secs(2)), "rc-lease");
    assert_eq!(before, after, "no data while in the safe state");
    assert_eq!(agent.status()["devices"]["pstat-1"]["state"], "paused");
}

#[test]
fn tampered_commands_in_bulk_are_all_rejected_and_none_runs() {
    let s = setup();
    let agent = start_agent(
        &s,
        "rc-t",
        &slow_potentiostat("pstat-1"),
        &commands_section(""),
    );
    let sender = Sender::new(&s.broker.addr());
    let mut r = reader(&s);
    wait_until_commands_answered(&sender, &mut r, &s.topics.commands(), "rc-t");
    const N: usize = 300;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut ids = Vec::new();
    for i in 0..N {
        let id = uuid();
        let mut env: Map<String, Value> = serde_json::from_str(&signed(envelope(
            "rc-t",
            &id,
            "pause",
            "pstat-1",
            SystemTime::now(),
        )))
        .unwrap();
        match i % 3 {
            0 => {
                env.insert("command".into(), "stop".into());
            }
            1 => {
                env.insert("params".into(), json!({"n": i}));
            }
            _ => {
                let sig = env["signature"].as_str().unwrap_or("").as_bytes().to_vec();
                let mut sig = sig;
                let at = i % 80;
                let old = sig[at];
                sig[at] = *alphabet.iter().find(|c| **c != old).unwrap_or(&b'A');
                env.insert("signature".into(), String::from_utf8(sig).unwrap().into());
            }
        }
        sender.send(
            &s.topics.commands(),
            "rc-t",
            &Value::Object(env).to_string(),
        );
        ids.push(id);
    }
    r.until(
        "every tampered command answered",
        Duration::from_secs(120),
        |m| ids.iter().all(|id| !results(m, id).is_empty()),
    );
    for id in &ids {
        let res = results(&r.msgs, id);
        assert_eq!(res.len(), 1);
        assert_eq!(res[0]["status"], "rejected");
        assert_eq!(res[0]["reason_code"], "bad_signature", "{:?}", res[0]);
    }
    assert_eq!(events(&r.msgs, "experiment_paused"), 0);
    assert_eq!(events(&r.msgs, "experiment_stopped"), 0);
    assert_eq!(agent.status()["devices"]["pstat-1"]["state"], "running");
    assert_eq!(
        agent.metric("labgate_commands_total{status=\"accepted\"}"),
        0.0
    );
}

/// The operator tool end to end: `labgate keygen`, then `command send --key --wait`
/// with the status-specific exit code, and `command tail` printing the results.
#[test]
fn keygen_send_and_tail_work_together() {
    let s = setup();
    let keydir = s.dir.path().join("keys");
    std::fs::create_dir_all(&keydir).unwrap();
    let out = Process::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["keygen", "--out"])
        .arg(keydir.join("bob"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snippet = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(snippet.contains("name = \"bob\""), "{snippet}");
    let again = Process::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["keygen", "--out"])
        .arg(keydir.join("bob"))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(64), "keys are never overwritten");

    let policy = snippet
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let agent = start_agent(
        &s,
        "rc-cli",
        &slow_potentiostat("pstat-1"),
        &format!("[commands]\n{policy}\n"),
    );
    let sender = Sender::new(&s.broker.addr());
    let mut r = reader(&s);
    wait_until_commands_answered(&sender, &mut r, &s.topics.commands(), "rc-cli");

    let tail = Process::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["command", "tail", "--config"])
        .arg(&agent.config)
        .args(["--count", "2", "--idle-timeout", "30s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let send = |key: &Path, cmd: &str| {
        Process::new(env!("CARGO_BIN_EXE_labgate"))
            .args(["command", "send", "--config"])
            .arg(&agent.config)
            .arg("--key")
            .arg(key)
            .args([
                "--agent", "rc-cli", "--device", "pstat-1", "--ttl", "20s", "--wait", cmd,
            ])
            .output()
            .unwrap()
    };
    let ok = send(&keydir.join("bob.key"), "pause");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let printed = String::from_utf8_lossy(&ok.stdout);
    assert!(
        printed.contains("\"completed\"") && printed.contains("\"bob\""),
        "{printed}"
    );
    let tail = tail.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&tail.stdout).to_string();
    assert!(
        lines.contains("accepted") && lines.contains("completed") && lines.contains("issuer=bob"),
        "{lines}"
    );

    // bob's key under another name: rejected (bad signature), exit 11.
    std::fs::copy(keydir.join("bob.key"), keydir.join("carol.key")).unwrap();
    let bad = send(&keydir.join("carol.key"), "stop");
    assert_eq!(
        bad.status.code(),
        Some(11),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
    // A key file that is not a key: usage error.
    std::fs::write(keydir.join("junk.key"), "hello").unwrap();
    assert_eq!(
        send(&keydir.join("junk.key"), "stop").status.code(),
        Some(64)
    );
    drop(agent);
}

#[test]
fn a_command_bigger_than_the_fetch_size_does_not_block_the_stop_behind_it() {
    let s = setup();
    let agent = start_agent(
        &s,
        "rc-big",
        &slow_potentiostat("pstat-1"),
        &commands_section(""),
    );
    let sender = Sender::new(&s.broker.addr());
    let mut r = reader(&s);
    wait_until_commands_answered(&sender, &mut r, &s.topics.commands(), "rc-big");
    // 600 KB, past the 256 KB the command consumer fetches at a time, then a stop.
    let big_id = uuid();
    let mut big = envelope("rc-big", &big_id, "pause", "pstat-1", SystemTime::now());
    big.insert("params".into(), json!({"pad": "x".repeat(600_000)}));
    sender.send(&s.topics.commands(), "rc-big", &signed(big));
    let stop_id = uuid();
    let stop = signed(envelope(
        "rc-big",
        &stop_id,
        "stop",
        "pstat-1",
        SystemTime::now(),
    ));
    sender.send(&s.topics.commands(), "rc-big", &stop);
    r.until(
        "the stop behind it completed",
        Duration::from_secs(30),
        |m| statuses(m, &stop_id) == ["accepted", "completed"],
    );
    let all = r.drain_for(Duration::from_millis(500)).to_vec();
    assert_eq!(events(&all, "experiment_stopped"), 1);
    assert_eq!(agent.status()["devices"]["pstat-1"]["state"], "idle");
    // librdkafka fetches a message past the fetch size whole: the big one ran, once,
    // before the stop, as the topic's order says.
    assert_eq!(statuses(&all, &big_id), ["accepted", "completed"]);
    assert_eq!(events(&all, "experiment_paused"), 1);
}
