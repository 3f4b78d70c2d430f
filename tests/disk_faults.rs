//! A sick disk under the data dir (the fault filesystem of tests/common/faultfs): too
//! little free space, ENOSPC, EIO on writes or on reads, and a read-only remount, against real tansu and
//! mosquitto. In each case the agent says clearly what is wrong, and nothing it
//! acknowledged is lost.

mod common;

use std::time::{Duration, Instant};

use common::faultfs::{Fault, FaultFs, FaultRig};
use common::*;

fn rig() -> FaultRig {
    FaultRig::new()
}

fn start(r: &FaultRig, agent_id: &str, buffer: &str) -> Agent {
    let device = mqtt_number_device(
        &r.mqtt.url(),
        "mqtt-d",
        &format!("labgate-disk-{agent_id}"),
        "lab/+id/counter",
        "counter",
    );
    let a = r.start(agent_id, &format!("[buffer]\n{buffer}\n\n{device}"));
    a.wait_status("MQTT connected", Duration::from_secs(20), |st| {
        st["devices"]["mqtt-d"]["state"] == "running"
    });
    a
}

/// Publishes `range` as QoS 1 counter readings and waits until mosquitto took them all.
fn publish(r: &FaultRig, name: &str, range: std::ops::Range<u64>) {
    let p = MqttClient::connect(&r.mqtt.url(), name);
    let n = range.end - range.start;
    for i in range {
        p.publish("lab/d1/counter", format!("{i}.0"), false);
    }
    p.wait_acked(n, Duration::from_secs(60));
}

fn acked(a: &Agent) -> f64 {
    a.metric("labgate_mqtt_acked_total{device=\"mqtt-d\"}")
}

fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn below_the_free_space_floor_new_readings_wait_unacked_and_none_is_lost() {
    let r = rig();
    // Kafka stalls so the buffer only grows.
    let mut agent = start(
        &r,
        "disk-floor",
        "min_free_bytes = 1048576\ncommit_interval = \"5ms\"",
    );
    r.broker.stall();
    publish(&r, "disk-floor-pub-1", 0..300);
    wait_for("300 acked", Duration::from_secs(30), || {
        acked(&agent) >= 300.0
    });
    // Now leave less than the floor free.
    r.fs.set_capacity(r.fs.used() + 512 * 1024);
    std::thread::sleep(Duration::from_millis(400));
    publish(&r, "disk-floor-pub-2", 300..600);
    let st = agent.wait_status("low disk reported", Duration::from_secs(20), |s| {
        s["buffer"]["low_disk"] == true
    });
    assert!(
        st["health"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h.as_str().unwrap_or("").contains("disk nearly full")),
        "{st}"
    );
    assert_eq!(agent.metric("labgate_buffer_low_disk"), 1.0);
    std::thread::sleep(Duration::from_secs(2));
    // The readings that found no room were refused, hence not acked to the broker.
    assert!(acked(&agent) < 600.0, "acked {}", acked(&agent));
    // Refused for the disk, under the default policy (drop_oldest) too: dropping old
    // chunks cannot make room in a log-structured store.
    assert!(agent.metric("labgate_records_dropped_total{reason=\"disk_full\"}") > 0.0);
    assert_eq!(
        agent.metric("labgate_records_dropped_total{reason=\"buffer_full_drop_oldest\"}"),
        0.0
    );
    // Space comes back, Kafka too: the broker redelivers, and everything arrives.
    r.fs.set_capacity(u64::MAX);
    r.broker.unstall();
    // rumqttc's redelivery of an unacked message comes with a reconnect.
    let mut reader = Reader::new(&r.broker.addr(), &r.topics.outputs());
    reader.until("all 600 readings", Duration::from_secs(90), |m| {
        counter_values(m).len() == 600
    });
    assert_eq!(counter_values(&reader.msgs), (0..600).collect());
    agent.terminate();
}

/// One hard fault (ENOSPC with no floor, EIO, EROFS): the agent exits with 74 and says
/// why; restarted on a healthy disk, it reports the failure and delivers everything it
/// had acknowledged.
fn hard_fault(name: &str, fault: impl Fn(&FaultFs), kind: &str) {
    let mut r = rig();
    let mut agent = start(&r, name, "min_free_bytes = 0\ncommit_interval = \"5ms\"");
    r.broker.stall();
    publish(&r, &format!("{name}-pub-1"), 0..200);
    wait_for("200 acked", Duration::from_secs(30), || {
        acked(&agent) >= 200.0
    });
    fault(&r.fs);
    // More readings arrive; the first write that fails stops the agent.
    let pub2 = {
        let url = r.mqtt.url();
        let name = format!("{name}-pub-2");
        std::thread::spawn(move || {
            let p = MqttClient::connect(&url, &name);
            for i in 200..400u64 {
                p.publish("lab/d1/counter", format!("{i}.0"), false);
            }
            p.wait_acked(200, Duration::from_secs(60));
        })
    };
    let code = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(74), "log:\n{}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("buffer write failed"), "{log}");
    assert!(
        log.contains(&format!("kind=\"{kind}\"")) || log.contains(&format!("kind={kind}")),
        "the log names {kind}:\n{log}"
    );
    pub2.join().expect("publisher");
    // A healthy disk again (and, for good measure, a power cut on the way).
    r.fs.set_fault(Fault::None);
    r.fs.set_capacity(u64::MAX);
    r.fs.power_cut();
    r.fs.mount();
    agent.spawn();
    r.broker.unstall();
    let mut reader = Reader::new(&r.broker.addr(), &r.topics.outputs());
    reader.until("all 400 readings", Duration::from_secs(90), |m| {
        counter_values(m).len() == 400
    });
    assert_eq!(counter_values(&reader.msgs), (0..400).collect());
    let log = agent.log_text();
    assert!(
        log.contains("the last run stopped on a buffer failure"),
        "no note of the failure at restart:\n{log}"
    );
    reader.until("the buffer_error event", Duration::from_secs(20), |m| {
        m.iter()
            .any(|m| m.json["event"] == "buffer_error" && m.json["data"]["kind"] == kind)
    });
    assert_eq!(
        agent.metric(&format!("labgate_buffer_errors_total{{kind=\"{kind}\"}}")),
        1.0
    );
}

#[test]
fn enospc_stops_the_agent_clearly_and_loses_nothing_acknowledged() {
    hard_fault("disk-enospc", |fs| fs.set_capacity(fs.used()), "enospc");
}

#[test]
fn eio_stops_the_agent_clearly_and_loses_nothing_acknowledged() {
    hard_fault("disk-eio", |fs| fs.set_fault(Fault::Eio), "eio");
}

#[test]
fn a_read_only_data_dir_stops_the_agent_clearly_and_loses_nothing_acknowledged() {
    hard_fault("disk-erofs", |fs| fs.set_fault(Fault::ReadOnly), "erofs");
}

/// The agent exits with 74 within `within`, its log saying `what` and the EIO, no panic.
fn exits_on_eio(agent: &mut Agent, within: Duration, what: &str) {
    let code = agent.wait_exit(within);
    let log = agent.log_text();
    assert_eq!(code, Some(74), "log:\n{log}");
    assert!(
        log.contains(what) && log.contains("buffer storage error (eio)"),
        "the log names the failure ({what}):\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// Every counter reading `0..n` reaches Kafka; returns the reader.
fn all_readings_arrive(r: &FaultRig, n: u64) -> Reader {
    let mut reader = Reader::new(&r.broker.addr(), &r.topics.outputs());
    reader.until(
        &format!("all {n} readings"),
        Duration::from_secs(120),
        |m| counter_values(m).len() as u64 == n,
    );
    assert_eq!(counter_values(&reader.msgs), (0..n).collect());
    reader
}

/// The restarted agent reports the last run's failure as a `buffer_error` event.
fn buffer_error_reported(reader: &mut Reader, kind: &str) {
    reader.until("the buffer_error event", Duration::from_secs(20), |m| {
        m.iter()
            .any(|m| m.json["event"] == "buffer_error" && m.json["data"]["kind"] == kind)
    });
}

/// A disk that cannot be read back (a bad sector, a dying SD card): restarted on it, the
/// agent exits with 74 and names the failure instead of starting on a buffer it could not
/// read; once the disk reads again, everything it had acknowledged is delivered and the
/// failure is reported downstream.
#[test]
fn a_data_dir_that_cannot_be_read_stops_the_agent_clearly_and_loses_nothing() {
    let r = rig();
    let mut agent = start(&r, "disk-read", "commit_interval = \"5ms\"");
    r.broker.stall();
    publish(&r, "disk-read-pub", 0..300);
    wait_for("300 acked", Duration::from_secs(30), || {
        acked(&agent) >= 300.0
    });
    agent.kill9();
    r.fs.set_fault(Fault::ReadEio);
    agent.launch();
    exits_on_eio(
        &mut agent,
        Duration::from_secs(30),
        "cannot open the buffer in ",
    );
    r.fs.set_fault(Fault::None);
    agent.spawn();
    r.broker.unstall();
    let mut reader = all_readings_arrive(&r, 300);
    assert!(
        agent
            .log_text()
            .contains("the last run stopped on a buffer failure"),
        "no note of the failure at restart:\n{}",
        agent.log_text()
    );
    buffer_error_reported(&mut reader, "eio");
    assert_eq!(
        agent.metric("labgate_buffer_errors_total{kind=\"eio\"}"),
        1.0
    );
    agent.terminate();
}

/// The same disk failing while the agent runs: the backlog is larger than sled's cache,
/// so the forwarder reads chunks back from the disk once the broker returns. The read
/// that fails stops the agent with 74 and says why; nothing is skipped, and once the disk
/// reads again every reading is delivered.
#[test]
fn a_chunk_the_disk_will_not_give_back_stops_the_agent_and_loses_nothing() {
    const N: u64 = 30_000;
    let r = rig();
    let mut agent = start(
        &r,
        "disk-read-run",
        "commit_interval = \"5ms\"\ncache_capacity = 1048576",
    );
    r.broker.stall();
    publish(&r, "disk-read-run-pub", 0..N);
    wait_for("all acked", Duration::from_secs(60), || {
        acked(&agent) >= N as f64
    });
    r.fs.set_fault(Fault::ReadEio);
    r.broker.unstall();
    exits_on_eio(&mut agent, Duration::from_secs(60), "buffer read failed");
    r.fs.set_fault(Fault::None);
    agent.spawn();
    let mut reader = all_readings_arrive(&r, N);
    buffer_error_reported(&mut reader, "eio");
    agent.terminate();
}

/// Below the free-space floor, where new records are refused, a stop command still stops
/// the instrument: its replay claim is written and synced past the floor (a few bytes),
/// and the command runs even though its results cannot be buffered (they are counted as
/// dropped). Sent again once there is room, the same command is a duplicate.
#[test]
fn a_stop_command_stops_the_instrument_below_the_disk_floor() {
    let r = rig();
    let agent = r.start(
        "disk-stop",
        &format!(
            "[buffer]\nmin_free_bytes = 1048576\ncommit_interval = \"5ms\"\n\n{}",
            slow_potentiostat("pstat-1")
        ),
    );
    agent.wait_status("running and assigned", Duration::from_secs(30), |s| {
        s["commands"]["assigned"] == true && s["devices"]["pstat-1"]["state"] == "running"
    });
    r.fs.set_capacity(r.fs.used() + 512 * 1024);
    agent.wait_status("low disk reported", Duration::from_secs(20), |s| {
        s["buffer"]["low_disk"] == true
    });
    let stop = serde_json::json!({
        "type": "command",
        "command": "stop",
        "command_id": "c-stop-low-disk",
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "params": {},
        "target": {"agent": "disk-stop", "device": "pstat-1"},
    })
    .to_string();
    produce(&r.broker.addr(), &r.topics.commands(), "disk-stop", &stop);
    agent.wait_status("the instrument stopped", Duration::from_secs(20), |s| {
        s["devices"]["pstat-1"]["state"] == "idle"
    });
    assert_eq!(
        agent.metric("labgate_commands_total{status=\"completed\"}"),
        1.0
    );
    assert!(agent.metric("labgate_records_dropped_total{reason=\"disk_full\"}") > 0.0);
    // Room again: the same command, redelivered or replayed, is not run a second time.
    r.fs.set_capacity(u64::MAX);
    agent.wait_status("disk ok", Duration::from_secs(20), |s| {
        s["buffer"]["low_disk"] == false
    });
    produce(&r.broker.addr(), &r.topics.commands(), "disk-stop", &stop);
    let mut reader = Reader::new(&r.broker.addr(), &[r.topics.results()]);
    reader.until("the duplicate's result", Duration::from_secs(20), |m| {
        m.iter()
            .any(|m| m.json["command_id"] == "c-stop-low-disk" && m.json["status"] == "duplicate")
    });
}

/// A disk that stops answering (an SD card retrying a sector, a stuck USB bridge) while
/// readings arrive: the agent's HTTP still answers, /health says what is wrong, and when
/// the disk answers again everything it had acknowledged, and what arrived meanwhile,
/// is delivered.
#[test]
fn a_hung_disk_leaves_health_and_metrics_answering_and_loses_nothing() {
    let r = rig();
    let mut agent = start(&r, "disk-hang", "commit_interval = \"5ms\"");
    publish(&r, "disk-hang-pub-1", 0..200);
    wait_for("200 acked", Duration::from_secs(30), || {
        acked(&agent) >= 200.0
    });
    r.fs.set_fault(Fault::Hang);
    // Readings keep coming; the agent cannot make them durable, so it must not ack them.
    let pub2 = {
        let url = r.mqtt.url();
        std::thread::spawn(move || {
            let p = MqttClient::connect(&url, "disk-hang-pub-2");
            for i in 200..400u64 {
                p.publish("lab/d1/counter", format!("{i}.0"), false);
            }
            p.wait_acked(200, Duration::from_secs(120));
        })
    };
    let t0 = Instant::now();
    let mut unhealthy = None;
    while t0.elapsed() < Duration::from_secs(40) {
        let t = Instant::now();
        let (code, body) = agent.get("/health");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "/health took {:?} while the disk hangs",
            t.elapsed()
        );
        if code == 503 {
            unhealthy = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = unhealthy.expect("/health never said the buffer is stuck");
    eprintln!("health while hung after {:?}: {body}", t0.elapsed());
    let t = Instant::now();
    let _ = agent.metric("labgate_buffer_records");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "/metrics took {:?}",
        t.elapsed()
    );
    assert!(
        acked(&agent) <= 200.0 + 1.0,
        "acked {} with the disk hung",
        acked(&agent)
    );
    r.fs.set_fault(Fault::None);
    pub2.join().expect("publisher");
    all_readings_arrive(&r, 400);
    agent.wait_status("healthy again", Duration::from_secs(30), |s| {
        s["health"].as_array().is_some_and(|h| h.is_empty())
    });
    agent.terminate();
}

/// The same under full load: sensors at full speed and Kafka draining, so that the
/// buffer is being written, read and acked when the disk stops answering. /health,
/// /status and /metrics must answer throughout (no HTTP path may wait on the store),
/// and the agent carries on when the disk does.
#[test]
fn a_hung_disk_under_full_load_leaves_http_answering() {
    let r = rig();
    let sensors = sensors_device("env-1", "0s", None);
    let mut agent = r.start(
        "disk-hang-load",
        &format!("[buffer]\ncommit_interval = \"5ms\"\n\n{sensors}"),
    );
    let written = |a: &Agent| a.metric("labgate_records_buffered_total");
    wait_for("records flowing", Duration::from_secs(30), || {
        written(&agent) > 20_000.0
    });
    r.fs.set_fault(Fault::Hang);
    let t0 = Instant::now();
    let mut said_stuck = false;
    let mut durable_early = None;
    while t0.elapsed() < Duration::from_secs(15) {
        if durable_early.is_none() && t0.elapsed() > Duration::from_secs(2) {
            durable_early = Some(written(&agent));
        }
        for path in ["/health", "/status", "/metrics"] {
            let t = Instant::now();
            let (code, body) = agent.get(path);
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{path} took {:?} while the disk hangs under load",
                t.elapsed()
            );
            if path == "/health" && code == 503 {
                if !said_stuck {
                    eprintln!("health while hung under load: {body}");
                }
                said_stuck = true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(said_stuck, "/health never said the buffer is stuck");
    // Nothing counts as durable while no fdatasync can finish (the flush that was under
    // way when the disk stopped may have been counted before the first sample).
    let before = written(&agent);
    assert_eq!(
        Some(before),
        durable_early,
        "records counted durable while the disk hangs"
    );
    r.fs.set_fault(Fault::None);
    wait_for("ingest going again", Duration::from_secs(30), || {
        written(&agent) > before + 20_000.0
    });
    agent.wait_status("healthy again", Duration::from_secs(30), |s| {
        s["health"].as_array().is_some_and(|h| h.is_empty())
    });
    agent.terminate();
}
