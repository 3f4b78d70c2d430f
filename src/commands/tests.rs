use super::policy;
use super::policy::CommandsConfig;
use super::replay::ReplayStore;
use super::sign;
use super::*;
use crate::devices::simulated::{potentiostat as sim_potentiostat, sensors as sim_sensors, Rng};
use crate::devices::CommandKind;
use crate::devices::DeviceConfig;
use crate::metrics::Metrics;
use ed25519_dalek::SigningKey;
use serde_json::json;
use serde_json::Map;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;
use tokio_util::task::TaskTracker;

const T0: u64 = 1_800_000_000;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0)
}

fn rfc(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn devices() -> BTreeMap<String, DeviceConfig> {
    let sensors = DeviceConfig::SimulatedSensors(sim_sensors::Config {
        id: "env-1".into(),
        interval: Duration::from_secs(1),
        rounds: None,
        location: None,
        sensors: vec![],
    });
    let pstat: sim_potentiostat::Config =
        toml::from_str("id = \"pstat-1\"\nsteps = []").unwrap_or_else(|e| panic!("{e}"));
    [
        ("env-1".to_string(), sensors),
        (
            "pstat-1".to_string(),
            DeviceConfig::SimulatedPotentiostat(pstat),
        ),
    ]
    .into_iter()
    .collect()
}

fn alice() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

fn policy(signed: bool) -> CommandsConfig {
    let mut p = CommandsConfig::default();
    p.devices.insert(
        "env-1".into(),
        policy::DevicePolicy {
            allow: Some(vec![CommandKind::Pause, CommandKind::Resume]),
            ..Default::default()
        },
    );
    if signed {
        p.operators.push(policy::Operator {
            name: "alice".into(),
            public_key: sign::public_base64(&alice().verifying_key()),
            commands: vec![CommandKind::Pause, CommandKind::Resume, CommandKind::Stop],
        });
    } else {
        p.allow_unsigned = Some(true);
    }
    p
}

#[test]
fn without_keys_and_without_allow_unsigned_every_command_is_refused() {
    let mut p = policy(false);
    p.allow_unsigned = None;
    let v = Validator::new("a1".into(), p);
    let plain = json!({"command": "stop", "target": {"agent": "a1", "device": "pstat-1"}});
    let (code, reason) = rejected(check(&v, plain.to_string().as_bytes()));
    assert_eq!(code, Code::Unsigned, "{reason}");
}

fn validator(signed: bool) -> Validator {
    Validator::new("a1".into(), policy(signed))
}

fn check(v: &Validator, payload: &[u8]) -> Result<Command, Refusal> {
    v.validate(payload, &Meta::default(), now(), &devices())
}

fn rejected(r: Result<Command, Refusal>) -> (Code, String) {
    match r {
        Err(Refusal::Rejected(r)) => (r.code, r.reason),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// A signed command from alice for pstat-1, issued now, living 30 s.
fn signed(command: &str, tweak: impl FnOnce(&mut Map<String, Value>)) -> Vec<u8> {
    let mut env = json!({
        "command_id": "6f1c3c1e-8f0e-4c55-9a40-6f7c1f3c9b10",
        "command": command,
        "issued_at": rfc(now()),
        "ttl": "30s",
        "target": {"agent": "a1", "device": "pstat-1"},
        "params": {"scan_rate": 0.1},
        "issuer": "alice",
    })
    .as_object()
    .cloned()
    .unwrap_or_default();
    tweak(&mut env);
    sign::sign(&mut env, &alice());
    serde_json::to_vec(&env).unwrap_or_default()
}

#[test]
fn users_plain_shape_is_accepted_when_unsigned_commands_are_allowed() {
    let msg = format!(
        r#"{{"type":"command","command":"pause","timestamp":"{}","params":{{}}}}"#,
        rfc(now())
    );
    let c = check(&validator(false), msg.as_bytes()).unwrap();
    assert_eq!(c.kind, CommandKind::Pause);
    assert_eq!(c.device, None);
    assert_eq!(c.issuer, None);
    assert!(c.command_id.starts_with("generated-"));
    assert_eq!(c.expires_at, now() + Duration::from_secs(60));
}

#[test]
fn a_command_without_id_is_named_by_its_kafka_position() {
    let meta = Meta {
        kafka_time: Some(now()),
        position: Some((0, 41)),
    };
    let c = validator(false)
        .validate(br#"{"command":"pause"}"#, &meta, now(), &devices())
        .unwrap();
    assert_eq!(c.command_id, "kafka-0-41");
    assert_eq!(c.issued_at, now());
}

#[test]
fn commands_for_other_agents_are_ignored_not_rejected() {
    let r = check(
        &validator(false),
        br#"{"command":"stop","target":{"agent":"other"}}"#,
    );
    assert_eq!(r, Err(Refusal::NotForUs));
}

#[test]
fn each_malformed_shape_has_a_precise_schema_reason() {
    let v = validator(false);
    for (msg, want) in [
        (&b"not json"[..], "not JSON"),
        (b"[1]", "JSON object"),
        (br#"{"command":1}"#, "command must be a string"),
        (br#"{"command":"dance"}"#, "unknown command"),
        (
            br#"{"command":"stop","params":[]}"#,
            "params must be an object",
        ),
        (br#"{"command":"stop","timestamp":"yesterday"}"#, "RFC 3339"),
        (br#"{"command":"stop","type":"event"}"#, "type must be"),
        (
            br#"{"command":"stop","colour":"red"}"#,
            "unknown field \"colour\"",
        ),
        (
            br#"{"command":"stop","target":{"agent":"a1","x":1}}"#,
            "target.x",
        ),
        (br#"{"command":"stop","ttl":"soon"}"#, "ttl must be"),
        (
            br#"{"command":"stop","ttl":10,"expires_at":"2027-01-01T00:00:00Z"}"#,
            "not both",
        ),
        (br#"{"command":"stop","ttl":"100days"}"#, "max_ttl"),
    ] {
        let (code, reason) = rejected(check(&v, msg));
        assert_eq!(code, Code::Schema, "{reason}");
        assert!(
            reason.starts_with("schema: ") && reason.contains(want),
            "{reason}"
        );
    }
}

#[test]
fn device_checks_name_the_device() {
    let v = validator(false);
    let fresh = rfc(now());
    let msg = format!(r#"{{"command":"stop","timestamp":"{fresh}","target":{{"device":"nope"}}}}"#);
    assert_eq!(rejected(check(&v, msg.as_bytes())).0, Code::UnknownDevice);
    // env-1's allow-list has pause and resume only: a balance that takes tare, never start.
    let msg =
        format!(r#"{{"command":"start","timestamp":"{fresh}","target":{{"device":"env-1"}}}}"#);
    let (code, reason) = rejected(check(&v, msg.as_bytes()));
    assert_eq!(code, Code::NotAllowed);
    assert!(
        reason.contains("env-1") && reason.contains("start"),
        "{reason}"
    );
    let msg =
        format!(r#"{{"command":"pause","timestamp":"{fresh}","target":{{"device":"env-1"}}}}"#);
    assert!(check(&v, msg.as_bytes()).is_ok());
}

/// A balance may tare and zero, never start: the allow-list narrows what its kind takes,
/// and a kind without tare (a potentiostat) refuses it whatever the list says.
#[test]
fn a_balance_may_tare_but_never_start() {
    let balance: crate::devices::line::driver::Config = toml::from_str(
        "id = \"balance-1\"\nport = \"/dev/ttyUSB0\"\nprofile = \"mettler-mt-sics\"",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut devs = devices();
    devs.insert("balance-1".into(), DeviceConfig::LineInstrument(balance));
    let mut p = policy(false);
    p.devices.insert(
        "balance-1".into(),
        policy::DevicePolicy {
            allow: Some(vec![CommandKind::Tare, CommandKind::Zero]),
            ..Default::default()
        },
    );
    let v = Validator::new("a1".into(), p);
    let msg = |cmd: &str, dev: &str| {
        format!(
            r#"{{"command":"{cmd}","issued_at":"{}","target":{{"device":"{dev}"}}}}"#,
            rfc(now())
        )
    };
    let run = |m: String| v.validate(m.as_bytes(), &Meta::default(), now(), &devs);
    assert_eq!(
        run(msg("tare", "balance-1")).map(|c| c.kind),
        Ok(CommandKind::Tare)
    );
    assert_eq!(
        run(msg("zero", "balance-1")).map(|c| c.kind),
        Ok(CommandKind::Zero)
    );
    assert_eq!(rejected(run(msg("start", "balance-1"))).0, Code::NotAllowed);
    let (code, reason) = rejected(run(msg("tare", "pstat-1")));
    assert_eq!(code, Code::NotAllowed);
    assert!(
        reason.contains("simulated_potentiostat") && reason.contains("tare"),
        "{reason}"
    );
}

#[test]
fn stale_and_future_commands_are_refused_outside_the_skew() {
    let v = validator(false);
    let at = |t: SystemTime| {
        format!(
            r#"{{"command":"pause","issued_at":"{}","ttl":"10s"}}"#,
            rfc(t)
        )
    };
    // Lived 10 s, 30 s of skew allowed: fine at +39 s, expired at +41 s.
    assert!(check(&v, at(now() - Duration::from_secs(39)).as_bytes()).is_ok());
    let (code, reason) = rejected(check(&v, at(now() - Duration::from_secs(41)).as_bytes()));
    assert_eq!(code, Code::Expired);
    assert!(
        reason.contains("expired 31s ago (tolerance 30s)"),
        "{reason}"
    );
    assert!(check(&v, at(now() + Duration::from_secs(29)).as_bytes()).is_ok());
    assert_eq!(
        rejected(check(&v, at(now() + Duration::from_secs(31)).as_bytes())).0,
        Code::NotYetValid
    );
    // The users' plain shape with an old timestamp is stale too.
    let old = br#"{"type":"command","command":"pause","timestamp":"2024-01-15T10:30:00.000Z","params":{}}"#;
    assert_eq!(rejected(check(&v, old)).0, Code::Expired);
    // Python's isoformat() writes +00:00.
    let py = format!(
        r#"{{"command":"pause","issued_at":"{}"}}"#,
        rfc(now()).replace('Z', "+00:00")
    );
    assert!(check(&v, py.as_bytes()).is_ok());
}

#[test]
fn a_signed_command_verifies_and_carries_its_issuer() {
    let c = check(&validator(true), &signed("pause", |_| {})).unwrap();
    assert_eq!(c.issuer.as_deref(), Some("alice"));
    assert_eq!(c.device.as_deref(), Some("pstat-1"));
    assert_eq!(c.expires_at, now() + Duration::from_secs(30));
    assert_eq!(c.params["scan_rate"], json!(0.1));
}

#[test]
fn signature_failures_each_have_their_reason() {
    let v = validator(true);
    // Unsigned while keys are configured.
    let plain = format!(r#"{{"command":"pause","issued_at":"{}"}}"#, rfc(now()));
    assert_eq!(rejected(check(&v, plain.as_bytes())).0, Code::Unsigned);
    // Changed after signing.
    let mut env: Map<String, Value> =
        serde_json::from_slice(&signed("pause", |_| {})).unwrap_or_default();
    env.insert("command".into(), "stop".into());
    let (code, reason) = rejected(check(&v, &serde_json::to_vec(&env).unwrap_or_default()));
    assert_eq!(code, Code::BadSignature);
    assert!(reason.contains("does not verify"), "{reason}");
    // Signed by someone else under alice's name.
    let mut env: Map<String, Value> =
        serde_json::from_slice(&signed("pause", |_| {})).unwrap_or_default();
    env.remove("signature");
    sign::sign(&mut env, &SigningKey::from_bytes(&[1u8; 32]));
    assert_eq!(
        rejected(check(&v, &serde_json::to_vec(&env).unwrap_or_default())).0,
        Code::BadSignature
    );
    // An issuer nobody configured.
    let msg = signed("pause", |e| {
        e.insert("issuer".into(), "mallory".into());
    });
    let (code, reason) = rejected(check(&v, &msg));
    assert_eq!(code, Code::BadSignature);
    assert!(reason.contains("unknown issuer"), "{reason}");
    // Garbage signature text.
    let mut env: Map<String, Value> =
        serde_json::from_slice(&signed("pause", |_| {})).unwrap_or_default();
    env.insert("signature".into(), "AAAA".into());
    assert_eq!(
        rejected(check(&v, &serde_json::to_vec(&env).unwrap_or_default())).0,
        Code::BadSignature
    );
    // Alice may not start anything.
    let (code, reason) = rejected(check(&v, &signed("start", |_| {})));
    assert_eq!(code, Code::NotAllowed);
    assert!(reason.contains("alice may not issue start"), "{reason}");
    // Signed, but without the fields a signed command must have.
    let msg = signed("pause", |e| {
        e.insert("command_id".into(), "not-a-uuid".into());
    });
    assert!(rejected(check(&v, &msg)).1.contains("UUID"));
    let msg = signed("pause", |e| {
        e.remove("ttl");
    });
    assert!(rejected(check(&v, &msg)).1.contains("expires_at"));
    // Valid signature, but stale: the time check still applies.
    let msg = signed("pause", |e| {
        e.insert(
            "issued_at".into(),
            rfc(now() - Duration::from_secs(3600)).into(),
        );
    });
    assert_eq!(rejected(check(&v, &msg)).0, Code::Expired);
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let _ = check(&validator(true), &bytes);
    }
}

/// 10⁵ generated commands, each a valid signed command changed after signing (a byte
/// replaced, inserted or deleted; a field swapped or added; a signature moved from
/// another command): none is accepted.
#[test]
fn a_hundred_thousand_tampered_commands_are_all_refused() {
    let v = validator(true);
    let devs = devices();
    let originals: Vec<Vec<u8>> = ["pause", "resume", "stop"]
        .iter()
        .map(|c| signed(c, |_| {}))
        .collect();
    let sigs: Vec<Value> = originals
        .iter()
        .map(|o| {
            serde_json::from_slice::<Value>(o)
                .map(|v| v["signature"].clone())
                .unwrap_or_default()
        })
        .collect();
    for o in &originals {
        assert!(v.validate(o, &Meta::default(), now(), &devs).is_ok());
    }
    let mut rng = Rng::new(7);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
    let parsed: Vec<Value> = originals
        .iter()
        .map(|o| serde_json::from_slice(o).unwrap_or_default())
        .collect();
    let (mut rejected, mut ignored, mut same) = (0u32, 0u32, 0u32);
    let fields = [
        "command",
        "command_id",
        "issued_at",
        "ttl",
        "target",
        "params",
        "issuer",
        "expires_at",
        "timeout",
        "extra",
    ];
    let values = [
        json!("stop"),
        json!("start"),
        json!(null),
        json!(1),
        json!("60s"),
        json!({"device": "env-1"}),
        json!({"agent": "a2"}),
        json!({}),
        json!(rfc(now())),
    ];
    for i in 0..100_000 {
        let pick = below(originals.len());
        let mut msg = originals[pick].clone();
        match i % 4 {
            0 => {
                let at = below(msg.len());
                let b = below(256) as u8;
                if msg[at] == b {
                    msg[at] ^= 1;
                } else {
                    msg[at] = b;
                }
            }
            1 => {
                let at = below(msg.len() + 1);
                if below(2) == 0 && at < msg.len() {
                    msg.remove(at);
                } else {
                    msg.insert(at, below(256) as u8);
                }
            }
            2 => {
                let mut env: Map<String, Value> = serde_json::from_slice(&msg).unwrap_or_default();
                let f = fields[below(fields.len())];
                let val = values[below(values.len())].clone();
                if env.get(f) == Some(&val) {
                    env.remove(f);
                } else {
                    env.insert(f.into(), val);
                }
                msg = serde_json::to_vec(&env).unwrap_or_default();
            }
            _ => {
                let mut env: Map<String, Value> = serde_json::from_slice(&msg).unwrap_or_default();
                let other = (pick + 1 + below(originals.len() - 1)) % originals.len();
                env.insert("signature".into(), sigs[other].clone());
                msg = serde_json::to_vec(&env).unwrap_or_default();
            }
        }
        // Whitespace between tokens, or `\/` for `/`, leaves the same command: that is
        // not tampering (and the replay store would refuse it as a duplicate anyway).
        if serde_json::from_slice::<Value>(&msg).is_ok_and(|m| m == parsed[pick]) {
            same += 1;
            continue;
        }
        match v.validate(&msg, &Meta::default(), now(), &devs) {
            Ok(c) => panic!(
                "tampered command {i} accepted: {} → {c:?}",
                String::from_utf8_lossy(&msg)
            ),
            Err(Refusal::Rejected(_)) => rejected += 1,
            Err(Refusal::NotForUs) => ignored += 1,
        }
    }
    assert_eq!(rejected + ignored + same, 100_000);
    assert!(same < 1_000, "{same} mutations left the command unchanged");
    assert!(rejected > 90_000, "rejected {rejected}, ignored {ignored}");
}

/// The handler against a real buffer and ingest task, with a device inbox nobody reads
/// at first: a deadline passes (`timeout`), then a stop overtakes queued work.
#[tokio::test]
async fn timeouts_and_a_stop_overtaking_queued_work_are_reported() {
    use crate::buffer::Buffer;
    use crate::devices::control;
    let dir = tempfile::tempdir().unwrap();
    let buffer = Arc::new(Buffer::open(dir.path(), &Default::default()).unwrap());
    let metrics = Arc::new(Metrics::new());
    let (ingest, rx) = crate::ingest::channel(64);
    let ingest_task = tokio::spawn(crate::ingest::run(
        rx,
        crate::ingest::IngestStage {
            buffer: buffer.clone(),
            agent_id: "a1".into(),
            commit_interval: Duration::from_millis(5),
            metrics: metrics.clone(),
            pipeline: crate::pipeline::Pipeline::new(&Default::default(), metrics.clone()),
            drain: Default::default(),
            drained: None,
            topic_names: Default::default(),
            live: std::sync::Arc::new(crate::live::Live::new(serde_json::Value::Null)),
        },
    ));
    let router = Router::default();
    let (tx, mut inbox) = control::inbox();
    let pstat = devices().remove("pstat-1").unwrap();
    router.insert(pstat, tx);
    let handler = Arc::new(Handler {
        validator: validator(false),
        router,
        ingest,
        metrics: metrics.clone(),
        replay: ReplayStore::new(buffer.side_tree("ids").unwrap()),
        waits: TaskTracker::new(),
    });
    let cmd = |id: &str, c: &str, timeout: &str| {
        json!({"command_id": id, "command": c, "timeout": timeout, "target": {"device": "pstat-1"}})
            .to_string()
    };
    handler
        .handle(cmd("t1", "pause", "100ms").as_bytes(), Meta::default())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    handler
        .handle(cmd("q1", "resume", "10s").as_bytes(), Meta::default())
        .await;
    handler
        .handle(cmd("q2", "start", "10s").as_bytes(), Meta::default())
        .await;
    handler
        .handle(cmd("s1", "stop", "10s").as_bytes(), Meta::default())
        .await;
    // The device now reads: only the stop is there (t1 timed out, q1 and q2 superseded).
    let c = inbox.recv().await.unwrap();
    assert_eq!(c.command, CommandKind::Stop);
    let _ = c.reply.send(Ok("stopped".into()));
    assert!(inbox.try_recv().is_err());
    handler.waits.close();
    handler.waits.wait().await;
    drop(handler);
    ingest_task.await.unwrap().unwrap();

    let mut got: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    while let Some(batch) = buffer.read_next().unwrap() {
        for (_, rec) in batch {
            let v: Value = serde_json::from_slice(&rec.payload).unwrap();
            if v["type"] == "command_result" {
                got.entry(v["command_id"].as_str().unwrap_or("").into())
                    .or_default()
                    .push((
                        v["status"].as_str().unwrap_or("").into(),
                        v["reason"].as_str().unwrap_or("").into(),
                    ));
            }
        }
    }
    let statuses = |id: &str| got[id].iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>();
    assert_eq!(statuses("t1"), ["accepted", "timeout"]);
    assert!(got["t1"][1].1.contains("100ms"), "{:?}", got["t1"]);
    assert_eq!(statuses("q1"), ["accepted", "failed"]);
    assert_eq!(got["q1"][1].1, "superseded by a stop");
    assert_eq!(statuses("q2"), ["accepted", "failed"]);
    assert_eq!(statuses("s1"), ["accepted", "completed"]);
    assert_eq!(metrics.commands_timeout.load(Relaxed), 1);
}
