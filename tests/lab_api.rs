//! Lab software and labgate: the ingest API, app devices and their command stream, runs
//! named by the caller, and delivery receipts — against a real tansu, with the Python
//! client from `examples/python` (run by the system's python3) and hand-written HTTP.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const TOKEN: &str = "lab-app-token-0123456789";

/// The API with one client writing as the app device `lab-app`.
fn api_section(dir: &std::path::Path, extra: &str) -> String {
    let token_file = dir.join("lab-app.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    format!(
        r#"[api]
max_body_bytes = 4096

[[api.clients]]
name = "lab-app"
token_file = "{}"

[[devices]]
kind = "app"
id = "lab-app"

{extra}"#,
        token_file.display()
    )
}

/// A tansu, and an agent on it with the API and the app device `lab-app`. Bind every
/// field when taking it apart: one left to `..` or `_` is dropped at once, and the
/// broker or the data dir with it.
struct Lab {
    broker: Broker,
    /// Holds the agent's data dir and config.
    _dir: tempfile::TempDir,
    topics: Topics,
    agent: Agent,
}

fn lab(agent_id: &str) -> Lab {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            agent_id,
            &broker.addr(),
            &topics,
            free_port(),
            &api_section(dir.path(), ""),
        ),
    );
    Lab {
        broker,
        _dir: dir,
        topics,
        agent,
    }
}

fn labgate(agent: &Agent, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args([args[0], args[1], "--config"])
        .arg(&agent.config)
        .args(&args[2..])
        .output()
        .expect("run labgate")
}

fn python_client_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python")
}

/// The digest a receipt gives, computed from points read back from Kafka.
fn digest_of(points: &[&Value]) -> String {
    let mut h = Sha256::new();
    for p in points {
        for k in ["t", "e", "i"] {
            let v = p.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            h.update(v.to_be_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The points of a run's data records, in seq order.
fn run_points<'a>(msgs: &'a [Msg], experiment_id: &str) -> Vec<&'a Value> {
    let mut data: Vec<&Msg> = msgs
        .iter()
        .filter(|m| m.json["type"] == "echem_data" && m.json["experiment_id"] == experiment_id)
        .collect();
    data.sort_by_key(|m| m.json["seq"].as_u64());
    data.dedup_by_key(|m| m.json["seq"].as_u64());
    data.iter()
        .flat_map(|m| m.json["points"].as_array().unwrap().iter())
        .collect()
}

/// Whether a run's receipt and every point it counts have been read (the receipt is
/// sent after Kafka has them all, but a reader may see the topics in any order).
fn receipt_and_data(msgs: &[Msg], experiment_id: &str) -> bool {
    receipt(msgs, experiment_id).is_some_and(|r| {
        r.json["data"]["points"].as_u64() == Some(run_points(msgs, experiment_id).len() as u64)
    })
}

fn receipt<'a>(msgs: &'a [Msg], experiment_id: &str) -> Option<&'a Msg> {
    msgs.iter().find(|m| {
        m.json["type"] == "experiment_event"
            && m.json["event"] == "run_delivered"
            && m.json["experiment_id"] == experiment_id
    })
}

/// Checks a receipt against what was read back: counts, seq range, digest.
fn check_receipt(msgs: &[Msg], topics: &Topics, experiment_id: &str) -> Value {
    let r = receipt(msgs, experiment_id).expect("receipt").json["data"].clone();
    let points = run_points(msgs, experiment_id);
    assert_eq!(r["points"], points.len() as u64, "{r}");
    assert_eq!(
        r["records"][topics.data()]["points"],
        points.len() as u64,
        "{r}"
    );
    let data_records = msgs
        .iter()
        .filter(|m| m.json["type"] == "echem_data" && m.json["experiment_id"] == experiment_id)
        .count() as u64;
    assert_eq!(r["records"][topics.data()]["records"], data_records, "{r}");
    let events = msgs
        .iter()
        .filter(|m| {
            m.json["type"] == "experiment_event"
                && m.json["experiment_id"] == experiment_id
                && m.json["event"] != "run_delivered"
        })
        .count() as u64;
    assert_eq!(r["records"][topics.events()]["records"], events, "{r}");
    assert_eq!(r["digest"]["value"], digest_of(&points), "{r}");
    let seqs: Vec<u64> = msgs
        .iter()
        .filter(|m| m.json["experiment_id"] == experiment_id && m.json["event"] != "run_delivered")
        .map(|m| m.json["seq"].as_u64().unwrap())
        .collect();
    let device = msgs
        .iter()
        .find(|m| m.json["experiment_id"] == experiment_id)
        .map(|m| m.json["device_id"].as_str().unwrap().to_string())
        .unwrap();
    assert_eq!(
        r["seq"][&device]["first"],
        *seqs.iter().min().unwrap(),
        "{r}"
    );
    assert_eq!(
        r["seq"][&device]["last"],
        *seqs.iter().max().unwrap(),
        "{r}"
    );
    r
}

#[test]
fn the_seed_clients_calls_land_in_kafka_and_a_pause_reaches_its_callback() {
    let Lab {
        broker,
        topics,
        agent,
        _dir,
    } = lab("agent-lab");
    let http = agent.http.port();
    agent.wait_status("command consumer assigned", Duration::from_secs(30), |s| {
        s["commands"]["assigned"] == true
    });
    // The seed's own calls, through the client, against the real agent.
    let script = r#"
import sys, time, json
from labgate_client import KafkaClient
c = KafkaClient()
assert c.connect(), "connect"
paused = []
def on_pause(cmd):
    paused.append(cmd)
    return "engine paused"
c.on_command("pause", on_pause)
assert c.send_event("experiment_started", {"program": "CV", "steps": 5}, experiment_id="exp_001", sample="ferrocene 1 mM", operator="ana")
assert c.send_data("CV", [{"t": 0.0, "e": 0.0, "i": 1e-6}], "exp_001")
deadline = time.time() + 30
while not c.is_connected() and time.time() < deadline:
    time.sleep(0.05)
print("STREAM", c.is_connected(), flush=True)
while not paused and time.time() < deadline:
    time.sleep(0.05)
print("PAUSED", json.dumps(paused[0] if paused else None), flush=True)
assert c.send_event("experiment_completed", {"steps": 5}, experiment_id="exp_001")
c.close()
print("DONE", flush=True)
"#;
    let mut py = Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("PYTHONPATH", python_client_dir())
        .env("LABGATE_URL", format!("http://127.0.0.1:{http}"))
        .env("LABGATE_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 (Debian: python3) must be installed");
    let mut out = BufReader::new(py.stdout.take().unwrap()).lines();
    let first = out.next().expect("python output").unwrap();
    assert_eq!(first, "STREAM True", "log:\n{}", agent.log_text());
    // A pause from the operator's side, the usual way.
    let sent = labgate(
        &agent,
        &[
            "command",
            "send",
            "--agent",
            "agent-lab",
            "--device",
            "lab-app",
            "--wait",
            "--timeout",
            "20s",
            "pause",
        ],
    );
    let results = String::from_utf8_lossy(&sent.stdout).to_string();
    assert_eq!(
        sent.status.code(),
        Some(0),
        "{results}\n{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert!(
        results.contains("\"status\":\"completed\"") && results.contains("engine paused"),
        "{results}"
    );
    let paused = out.next().expect("python output").unwrap();
    let cmd: Value = serde_json::from_str(paused.strip_prefix("PAUSED ").unwrap()).unwrap();
    assert_eq!(cmd["command"], "pause");
    assert_eq!(cmd["device_id"], "lab-app");
    assert!(
        results.contains(cmd["command_id"].as_str().unwrap()),
        "{results}"
    );
    assert_eq!(out.next().expect("python output").unwrap(), "DONE");
    assert!(py.wait().unwrap().success());

    let mut reader = Reader::new(&broker.addr(), &[topics.events(), topics.data()]);
    let msgs = reader.until("the run and its receipt", Duration::from_secs(30), |m| {
        receipt_and_data(m, "exp_001")
    });
    let started = msgs
        .iter()
        .find(|m| m.json["event"] == "experiment_started" && m.json["experiment_id"] == "exp_001")
        .expect("experiment_started");
    assert_eq!(started.json["data"], json!({"program": "CV", "steps": 5}));
    assert_eq!(started.json["device_id"], "lab-app");
    assert_eq!(started.key, "exp_001");
    assert_eq!(
        started.json["run"],
        json!({"sample": "ferrocene 1 mM", "operator": "ana"})
    );
    let data = msgs
        .iter()
        .find(|m| m.json["type"] == "echem_data" && m.json["experiment_id"] == "exp_001")
        .expect("echem_data");
    assert_eq!(data.json["technique"], "CV");
    assert_eq!(
        data.json["points"],
        json!([{"t": 0.0, "e": 0.0, "i": 1e-6}])
    );
    assert_eq!(
        data.json["run"]["sample"], "ferrocene 1 mM",
        "every record of the run carries it"
    );
    for m in msgs.iter().filter(|m| m.json["experiment_id"] == "exp_001") {
        assert_matches_schema(m);
        assert_envelope(m, "agent-lab");
    }
    let r = check_receipt(msgs, &topics, "exp_001");
    assert_eq!(r["ended"], "completed");
    assert_eq!(r["complete"], true);
}

#[test]
fn bad_requests_are_refused_with_their_reason_and_counted() {
    let Lab {
        broker,
        topics,
        agent,
        _dir,
    } = lab("agent-bad");
    let a = agent.http;
    let ok_event = json!({"event": "x", "experiment_id": "e1", "data": {}});
    // Tokens.
    let r = request(
        a,
        "POST",
        "/v1/events",
        &[("Content-Type", "application/json")],
        ok_event.to_string().as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.headers["www-authenticate"].starts_with("Bearer"));
    assert_eq!(
        post_json(a, "/v1/events", "wrong-token-0123456789", &ok_event).status,
        401
    );
    // Bodies: each refusal names its field.
    for (path, body, field) in [
        ("/v1/events", json!({"event": "x"}), "experiment_id"),
        (
            "/v1/events",
            json!({"event": "x", "experiment_id": "bad/id"}),
            "experiment_id",
        ),
        (
            "/v1/events",
            json!({"event": "x", "experiment_id": "e1", "colour": "red"}),
            "colour",
        ),
        (
            "/v1/data",
            json!({"technique": "CV", "experiment_id": "e1", "points": [{"t": 0, "e": "high"}]}),
            "points[0].e",
        ),
        (
            "/v1/readings",
            json!({"sensor_id": "t1", "sensor_type": "temperature", "unit": "C"}),
            "value",
        ),
        (
            "/v1/readings",
            json!({"sensor_id": "t1", "sensor_type": "temperature", "value": 1, "timestamp": "noon"}),
            "timestamp",
        ),
    ] {
        let r = post_json(a, path, TOKEN, &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.json()["field"], field, "{body}: {}", r.body);
        assert!(r.json()["reason"].as_str().is_some_and(|s| !s.is_empty()));
    }
    let auth = format!("Bearer {TOKEN}");
    let r = request(
        a,
        "POST",
        "/v1/events",
        &[("Authorization", &auth)],
        b"{not json",
    );
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (400, json!("body")),
        "{}",
        r.body
    );
    let r = request(
        a,
        "POST",
        "/v1/events",
        &[("Authorization", &auth), ("Content-Type", "text/csv")],
        b"a,b",
    );
    assert_eq!(r.status, 415, "{}", r.body);
    // Over the body limit (4096 in this config).
    let big = json!({"event": "x", "experiment_id": "e1", "data": {"blob": "x".repeat(5000)}});
    let r = post_json(a, "/v1/events", TOKEN, &big);
    assert_eq!(r.status, 413, "{}", r.body);
    // NDJSON batch; the third line bad: nothing of the batch is taken.
    let nd = |lines: &[Value]| {
        lines
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let reading =
        |v: f64| json!({"sensor_id": "t1", "sensor_type": "temperature", "value": v, "unit": "°C"});
    let r = request(
        a,
        "POST",
        "/v1/readings",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-ndjson"),
        ],
        nd(&[reading(1.0), reading(2.0), json!({"sensor_id": "t1"})]).as_bytes(),
    );
    assert_eq!(
        (r.status, r.json()["index"].clone()),
        (400, json!(2)),
        "{}",
        r.body
    );
    let r = request(
        a,
        "POST",
        "/v1/readings",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-ndjson"),
        ],
        nd(&[reading(1.0), reading(2.0), reading(3.0)]).as_bytes(),
    );
    assert_eq!(
        (r.status, r.json()["accepted"].clone()),
        (202, json!(3)),
        "{}",
        r.body
    );
    // A retry with the same event_id is a duplicate, not a second record.
    let id = uuid::Uuid::new_v4().to_string();
    let with_id = json!({"event": "x", "experiment_id": "e1", "event_id": id});
    assert_eq!(
        post_json(a, "/v1/events", TOKEN, &with_id).json()["accepted"],
        1
    );
    let again = post_json(a, "/v1/events", TOKEN, &with_id);
    assert_eq!(
        (again.status, again.json()["duplicates"].clone()),
        (202, json!(1)),
        "{}",
        again.body
    );
    // The command stream is this client's device's only.
    let r = request(
        a,
        "GET",
        "/v1/devices/other/commands",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.body);

    let mut reader = Reader::new(&broker.addr(), &[topics.events(), topics.sensors()]);
    reader.until("the readings and the event", Duration::from_secs(30), |m| {
        m.iter()
            .filter(|m| m.json["type"] == "sensor_reading")
            .count()
            >= 3
            && m.iter().any(|m| m.json["event_id"] == id.as_str())
    });
    let msgs = reader.drain_for(Duration::from_secs(1));
    assert_eq!(
        msgs.iter()
            .filter(|m| m.json["event_id"] == id.as_str())
            .count(),
        1,
        "a retry is not stored twice"
    );
    assert!(msgs
        .iter()
        .filter(|m| m.json["type"] == "sensor_reading")
        .all(|m| m.json["device_id"] == "lab-app"));
    assert_eq!(
        agent.metric("labgate_api_requests_refused_total{reason=\"unauthorized\"}"),
        3.0
    );
    assert_eq!(
        agent.metric("labgate_api_requests_refused_total{reason=\"too_large\"}"),
        1.0
    );
    assert!(agent.metric("labgate_api_requests_refused_total{reason=\"bad_request\"}") >= 9.0);
    assert_eq!(
        agent.metric("labgate_api_records_total{outcome=\"duplicate\"}"),
        1.0
    );
    // The API describes itself, and the shapes it documents are the ones it takes.
    let doc = request(a, "GET", "/v1/openapi.json", &[], b"").json();
    let schema = |name: &str| {
        jsonschema::validator_for(&doc["components"]["schemas"][name])
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert!(schema("ExperimentEvent").is_valid(&with_id));
    assert!(schema("SensorReading").is_valid(&reading(1.0)));
    assert!(schema("EchemData").is_valid(&json!({"technique": "CV", "experiment_id": "e1", "points": [{"t": 0.0, "e": 0.1, "i": 1e-6}]})));
    assert!(!schema("ExperimentEvent")
        .is_valid(&json!({"event": "x", "experiment_id": "e1", "colour": "red"})));
    // The agent runs on after all of it.
    assert_eq!(agent.get("/health").0, 200, "{}", agent.get("/health").1);
}

#[test]
fn a_full_buffer_answers_503_with_retry_after() {
    let dir = tempdir();
    let topics = Topics::new();
    // No broker at all: records stay in the buffer, which fills up.
    let buffer = r#"[buffer]
overflow = "reject_new"
records_per_chunk = 1
max_records = 8
"#;
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-full",
            &format!("127.0.0.1:{}", free_port()),
            &topics,
            free_port(),
            &format!("{buffer}\n{}", api_section(dir.path(), "")),
        ),
    );
    let mut seen_202 = 0;
    let mut refused = None;
    for n in 0..50 {
        let r = post_json(
            agent.http,
            "/v1/readings",
            TOKEN,
            &json!({"sensor_id": "t1", "sensor_type": "temperature", "value": n, "unit": "°C"}),
        );
        match r.status {
            202 => seen_202 += 1,
            503 => {
                refused = Some(r);
                break;
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    let r = refused.expect("the buffer filled up and refused");
    assert!((1..=8).contains(&seen_202), "{seen_202}");
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("5"));
    assert_eq!(r.json()["error"], "buffer_full");
    assert_eq!(r.json()["refused"], json!([0]));
    assert!(
        agent.metric("labgate_records_dropped_total{reason=\"buffer_full_reject_new\"}") >= 1.0
    );
}

#[test]
fn a_record_answered_202_reaches_kafka_after_a_kill9() {
    let Lab {
        broker,
        topics,
        mut agent,
        _dir,
    } = lab("agent-k9");
    agent.wait_status("kafka connected", Duration::from_secs(30), |s| {
        s["kafka"]["connected"] == true
    });
    // The broker stalls: what the agent takes cannot be delivered before the kill.
    broker.stall();
    let id = uuid::Uuid::new_v4().to_string();
    let r = post_json(
        agent.http,
        "/v1/events",
        TOKEN,
        &json!({"event": "sample_loaded", "experiment_id": "k9", "event_id": id}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    agent.kill9();
    broker.unstall();
    agent.spawn();
    let mut reader = Reader::new(&broker.addr(), &[topics.events()]);
    let msgs = reader.until(
        "the record taken before the kill",
        Duration::from_secs(60),
        |m| m.iter().any(|m| m.json["event_id"] == id.as_str()),
    );
    let m = msgs
        .iter()
        .find(|m| m.json["event_id"] == id.as_str())
        .unwrap();
    assert_eq!(m.json["event"], "sample_loaded");
    assert_eq!(m.json["device_id"], "lab-app");
}

#[test]
fn receipts_for_a_full_cv_run_and_a_run_stopped_half_way_match_the_data() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let devices = r#"[[devices]]
kind = "simulated_potentiostat"
id = "pstat-cv"
points_per_message = 40
speed = 0.0
runs = 1
autostart = false

  [[devices.steps]]
  technique = "cv"
  e_begin = 0.0
  e_vertex1 = 0.6
  e_vertex2 = -0.2
  e_step = 0.005
  scan_rate = 0.1
  n_scans = 2

[[devices]]
kind = "simulated_potentiostat"
id = "pstat-ca"
points_per_message = 5
max_interval = "100ms"
speed = 2.0
runs = 1
autostart = false

  [[devices.steps]]
  technique = "ca"
  e_dc = 0.5
  t_interval = 0.05
  t_run = 600.0
"#;
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-rcpt",
            &broker.addr(),
            &topics,
            free_port(),
            devices,
        ),
    );
    agent.wait_status("command consumer assigned", Duration::from_secs(30), |s| {
        s["commands"]["assigned"] == true
    });
    let bad = labgate(
        &agent,
        &[
            "command",
            "send",
            "--agent",
            "agent-rcpt",
            "--device",
            "pstat-cv",
            "--param",
            "experiment_id=no spaces",
            "--wait",
            "start",
        ],
    );
    assert_eq!(
        bad.status.code(),
        Some(11),
        "an id that would break keys is rejected: {}",
        String::from_utf8_lossy(&bad.stdout)
    );
    assert!(String::from_utf8_lossy(&bad.stdout).contains("experiment_id"));
    let start = |device: &str, id: &str| {
        let out = labgate(
            &agent,
            &[
                "command",
                "send",
                "--agent",
                "agent-rcpt",
                "--device",
                device,
                "--param",
                &format!("experiment_id={id}"),
                "--param",
                "sample=Fe(CN)6 5 mM",
                "--param",
                "eln_ref=ELN-2026-118",
                "--param",
                r#"metadata={"electrode": "GC-3"}"#,
                "--wait",
                "--timeout",
                "20s",
                "start",
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    start("pstat-cv", "cv_full");
    start("pstat-ca", "ca_half");
    let mut reader = Reader::new(&broker.addr(), &[topics.events(), topics.data()]);
    reader.until("the CA run half way", Duration::from_secs(30), |m| {
        run_points(m, "ca_half").len() >= 20
    });
    let stop = labgate(
        &agent,
        &[
            "command",
            "send",
            "--agent",
            "agent-rcpt",
            "--device",
            "pstat-ca",
            "--wait",
            "--timeout",
            "20s",
            "stop",
        ],
    );
    let stop_out = String::from_utf8_lossy(&stop.stdout).to_string();
    assert_eq!(stop.status.code(), Some(0), "{stop_out}");
    let stop_id = stop_out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["command_id"].as_str().map(str::to_string))
        .expect("the stop's id");
    let deadline = Instant::now() + Duration::from_secs(60);
    let msgs = reader.until("both receipts", deadline - Instant::now(), |m| {
        receipt_and_data(m, "cv_full") && receipt_and_data(m, "ca_half")
    });
    let full = check_receipt(msgs, &topics, "cv_full");
    assert_eq!(
        (
            full["ended"].clone(),
            full["complete"].clone(),
            full["cut_short"].clone()
        ),
        (json!("completed"), json!(true), json!(false))
    );
    assert!(full["points"].as_u64().unwrap() > 300, "{full}");
    let half = check_receipt(msgs, &topics, "ca_half");
    assert_eq!(
        (
            half["ended"].clone(),
            half["complete"].clone(),
            half["cut_short"].clone()
        ),
        (json!("stopped"), json!(false), json!(true))
    );
    assert_eq!(half["command_id"], stop_id.as_str());
    // Every record of both runs carries the run's description.
    for m in msgs
        .iter()
        .filter(|m| m.json["experiment_id"] == "cv_full" || m.json["experiment_id"] == "ca_half")
    {
        assert_eq!(m.json["run"]["sample"], "Fe(CN)6 5 mM", "{}", m.json);
        assert_eq!(m.json["run"]["eln_ref"], "ELN-2026-118");
        assert_eq!(m.json["run"]["metadata"]["electrode"], "GC-3");
        assert_matches_schema(m);
    }
}

/// An app device's command stream, read by hand: the raw SSE bytes of a real socket.
struct Stream {
    lines: std::io::Lines<BufReader<std::net::TcpStream>>,
}

impl Stream {
    fn open(agent: &Agent, device: &str) -> Stream {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(agent.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /v1/devices/{device}/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut lines = BufReader::new(s).lines();
        let status = lines.next().unwrap().unwrap();
        assert!(status.contains(" 200 "), "{status}");
        let mut st = Stream { lines };
        st.until(|l| l.starts_with("event: ready"));
        st
    }

    fn until(&mut self, f: impl Fn(&str) -> bool) -> String {
        loop {
            let l = self.lines.next().expect("stream open").expect("read");
            if f(&l) {
                return l;
            }
        }
    }

    /// The next command on the stream.
    fn command(&mut self) -> Value {
        let l = self.until(|l| l.starts_with("data: ") && l.contains("command_id"));
        serde_json::from_str(&l["data: ".len()..]).unwrap()
    }
}

#[test]
fn an_app_gets_its_commands_on_a_stream_and_a_command_times_out_when_it_is_gone() {
    let Lab {
        broker: _broker,
        topics: _topics,
        agent,
        _dir,
    } = lab("agent-app");
    agent.wait_status("command consumer assigned", Duration::from_secs(30), |s| {
        s["commands"]["assigned"] == true
    });
    let send = |cmd: &str, device_timeout: &str| {
        let agent_config = agent.config.clone();
        let (cmd, device_timeout) = (cmd.to_string(), device_timeout.to_string());
        std::thread::spawn(move || {
            Command::new(env!("CARGO_BIN_EXE_labgate"))
                .args(["command", "send", "--config"])
                .arg(agent_config)
                .args([
                    "--agent",
                    "agent-app",
                    "--device",
                    "lab-app",
                    "--device-timeout",
                    &device_timeout,
                    "--wait",
                    "--timeout",
                    "30s",
                    &cmd,
                ])
                .output()
                .unwrap()
        })
    };
    // Nobody holds the stream: the command waits for its deadline and times out.
    let out = send("pause", "2s").join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(14),
        "timeout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // One is sent while no application is there; it is handed over when one connects.
    let stop = send("stop", "20s");
    std::thread::sleep(Duration::from_secs(2));
    let mut a = Stream::open(&agent, "lab-app");
    let first = a.command();
    assert_eq!(first["command"], "stop");
    // The application goes away without answering; its next stream gets it again.
    drop(a);
    let mut b = Stream::open(&agent, "lab-app");
    let again = b.command();
    assert_eq!(again["command_id"], first["command_id"]);
    let path = format!(
        "/v1/commands/{}/result",
        again["command_id"].as_str().unwrap()
    );
    let r = post_json(
        agent.http,
        &path,
        TOKEN,
        &json!({"status": "failed", "message": "valve stuck"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let out = stop.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(10), "failed: {text}");
    assert!(text.contains("valve stuck"), "{text}");
    // Answered already: a second answer finds nothing waiting.
    let r = post_json(agent.http, &path, TOKEN, &json!({"status": "completed"}));
    assert_eq!(r.status, 404, "{}", r.body);
    let r = post_json(agent.http, &path, TOKEN, &json!({"status": "done"}));
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (400, json!("status"))
    );
    assert_eq!(agent.status()["devices"]["lab-app"]["kind"], "app");
}

#[test]
fn a_client_posting_through_a_shutdown_gets_202_only_for_what_is_kept() {
    let Lab {
        broker,
        topics,
        mut agent,
        _dir,
    } = lab("agent-term");
    agent.wait_status("kafka connected", Duration::from_secs(30), |s| {
        s["kafka"]["connected"] == true
    });
    // One client posts events back to back until nobody listens any more.
    let http = agent.http;
    let client = std::thread::spawn(move || {
        let mut answers: Vec<(String, u16, String)> = Vec::new();
        let auth = format!("Bearer {TOKEN}");
        for _ in 0..100_000 {
            let id = uuid::Uuid::new_v4().to_string();
            let body = json!({"event": "sample_loaded", "experiment_id": "term", "event_id": id});
            match try_request(
                http,
                "POST",
                "/v1/events",
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                body.to_string().as_bytes(),
            ) {
                Ok(a) => answers.push((id, a.status, a.body)),
                Err(_) => break,
            }
        }
        answers
    });
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(agent.terminate(), Some(0), "an orderly stop");
    let answers = client.join().expect("client thread");
    let accepted: Vec<&str> = answers
        .iter()
        .filter(|(_, status, _)| *status == 202)
        .map(|(id, _, _)| id.as_str())
        .collect();
    assert!(
        !accepted.is_empty(),
        "the client got records in before the stop"
    );
    // Every other answer says why: the agent is stopping, or the connection was cut
    // before an answer (status 0), which a client retries as it would any timeout.
    for (_, status, body) in answers.iter().filter(|(_, s, _)| *s != 202) {
        match status {
            503 => assert!(body.contains("shutting_down"), "{body}"),
            0 => {}
            other => panic!("{other}: {body}"),
        }
    }
    // Whatever was answered 202 reaches Kafka, before the stop or after the restart.
    agent.spawn();
    let mut reader = Reader::new(&broker.addr(), &[topics.events()]);
    reader.until("every event answered 202", Duration::from_secs(60), |m| {
        let seen: std::collections::HashSet<&str> = m
            .iter()
            .filter_map(|m| m.json["event_id"].as_str())
            .collect();
        accepted.iter().all(|id| seen.contains(id))
    });
}
