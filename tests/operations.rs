//! Operations: the systemd unit (verified, hardened, notify + watchdog), /health under a
//! broker stall, and SIGHUP hot reload, against real tansu and the real binary.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn systemd_analyze(args: &[&str]) -> (i32, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze must be installed (scripts/test installs systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_unit_verifies_and_its_exposure_is_at_most_2_5() {
    // verify wants ExecStart's binary to exist: point the unit at the one just built.
    let dir = tempdir();
    let unit = std::fs::read_to_string(repo("systemd/labgate.service")).unwrap();
    let unit = unit.replace("/usr/bin/labgate", env!("CARGO_BIN_EXE_labgate"));
    let path = dir.path().join("labgate.service");
    std::fs::write(&path, unit).unwrap();
    let (code, text) = systemd_analyze(&["verify", "--man=no", path.to_str().unwrap()]);
    assert_eq!(code, 0, "systemd-analyze verify:\n{text}");
    assert!(text.trim().is_empty(), "verify warned:\n{text}");

    let (code, text) = systemd_analyze(&[
        "security",
        "--offline=true",
        "--no-pager",
        &repo("systemd/labgate.service"),
    ]);
    assert_eq!(code, 0, "{text}");
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for labgate.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{text}");
    for must in [
        "Type=notify",
        "WatchdogSec=",
        "DevicePolicy=closed",
        "DeviceAllow=char-ttyUSB",
        "DeviceAllow=char-ttyACM",
        "SupplementaryGroups=dialout",
        "StateDirectory=labgate",
        "ExecStartPre=/usr/bin/labgate check",
    ] {
        let unit = std::fs::read_to_string(repo("systemd/labgate.service")).unwrap();
        assert!(
            unit.lines().any(|l| l.starts_with(must)),
            "unit lacks {must}"
        );
    }
    let unit = std::fs::read_to_string(repo("systemd/labgate.service")).unwrap();
    assert!(
        !unit.lines().any(|l| l.starts_with("PrivateDevices=yes")),
        "PrivateDevices hides serial ports"
    );
}

#[test]
fn sysusers_and_tmpfiles_apply_to_a_scratch_root() {
    let root = tempdir();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let r = format!("--root={}", root.path().display());
    let out = Command::new("systemd-sysusers")
        .arg(&r)
        .arg(repo("systemd/labgate.sysusers"))
        .output()
        .expect("systemd-sysusers");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("labgate:")),
        "{passwd}"
    );
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("dialout:") && l.ends_with("labgate")),
        "{group}"
    );
    let out = Command::new("systemd-tmpfiles")
        .arg(&r)
        .arg("--create")
        .arg(repo("systemd/labgate.tmpfiles"))
        .output()
        .expect("systemd-tmpfiles");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root.path().join("var/lib/labgate").is_dir());
    assert!(root.path().join("etc/labgate").is_dir());
}

/// The agent as systemd runs it: READY=1 after start, WATCHDOG=1 pings at half the
/// interval while it makes progress, STOPPING=1 on SIGTERM.
#[test]
fn the_agent_notifies_ready_pings_the_watchdog_and_says_stopping() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let cfg = agent_config(
        dir.path(),
        "ops-notify",
        &broker.addr(),
        &topics,
        free_port(),
        &sensors_device("env-1", "200ms", None),
    );
    let cfg_path = dir.path().join("labgate.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(recv(), "READY=1");
    let t = Instant::now();
    let mut pings = 0;
    while pings < 4 {
        if recv() == "WATCHDOG=1" {
            pings += 1;
        }
    }
    // Four pings at half of a 1 s interval: about 2 s.
    let took = t.elapsed();
    assert!(took < Duration::from_secs(4), "pings too slow: {took:?}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut stopping = false;
    for _ in 0..10 {
        if recv() == "STOPPING=1" {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn health_turns_503_while_the_broker_is_stalled_and_200_after() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let mut cfg = agent_config(
        dir.path(),
        "ops-health",
        &broker.addr(),
        &topics,
        free_port(),
        &sensors_device("env-1", "100ms", None),
    );
    cfg = cfg.replace("[http]\n", "[http]\nkafka_unhealthy_after = \"3s\"\n");
    let agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("kafka connected", Duration::from_secs(30), |s| {
        s["kafka"]["connected"] == true
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.get("/health").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never healthy: {}",
            agent.get("/health").1
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    broker.stall();
    let deadline = Instant::now() + Duration::from_secs(40);
    let body = loop {
        let (code, body) = agent.get("/health");
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "never 503 while stalled: {body}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(body.contains("kafka unreachable"), "{body}");
    broker.unstall();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (code, body) = agent.get("/health");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never healthy again: {body}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// SIGHUP: a device added without a restart and without a gap in the running one's
/// data; an invalid config refused with a clear log line, the running one kept; a
/// device removed.
#[test]
fn sighup_adds_and_removes_devices_without_restart_or_loss_and_refuses_a_bad_config() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let base = agent_config(
        dir.path(),
        "ops-hup",
        &broker.addr(),
        &topics,
        free_port(),
        &sensors_device("env-1", "50ms", None),
    );
    let agent = Agent::start(dir.path(), &base);
    let pid = agent.pid();
    let mut r = Reader::new(
        &broker.addr(),
        &[topics.sensors(), topics.events(), topics.agent_events()],
    );
    let from =
        |m: &Msg, dev: &str| m.json["device_id"] == dev && m.json["type"] == "sensor_reading";
    r.until("env-1 data", Duration::from_secs(30), |m| {
        m.iter().filter(|x| from(x, "env-1")).count() >= 20
    });

    let hup = || {
        let st = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    // Add env-2.
    std::fs::write(
        &agent.config,
        format!("{base}\n{}", sensors_device("env-2", "50ms", None)),
    )
    .unwrap();
    hup();
    r.until("env-2 data", Duration::from_secs(30), |m| {
        m.iter().filter(|x| from(x, "env-2")).count() >= 20
    });
    r.until("config_reloaded", Duration::from_secs(10), |m| {
        m.iter()
            .any(|x| x.json["event"] == "config_reloaded" && x.json["data"]["added"][0] == "env-2")
    });
    assert_eq!(agent.pid(), pid, "same process");
    assert_eq!(agent.status()["devices"]["env-2"]["state"], "running");

    // An invalid config: refused, logged, everything keeps running.
    std::fs::write(&agent.config, format!("{base}\n[[devices]]\nkind = \"simulated_sensors\"\nid = \"env-3\"\ninterval = \"-1s\"\n")).unwrap();
    hup();
    r.until("config_reload_failed", Duration::from_secs(20), |m| {
        m.iter().any(|x| x.json["event"] == "config_reload_failed")
    });
    assert!(
        agent.log_text().contains("reload refused"),
        "{}",
        agent.log_text()
    );
    let before = r.msgs.iter().filter(|x| from(x, "env-2")).count();
    r.until("env-2 still reading", Duration::from_secs(20), |m| {
        m.iter().filter(|x| from(x, "env-2")).count() > before + 10
    });

    // Remove env-2 again (the base config).
    std::fs::write(&agent.config, &base).unwrap();
    hup();
    r.until("env-2 removed", Duration::from_secs(20), |m| {
        m.iter().any(|x| {
            x.json["event"] == "config_reloaded" && x.json["data"]["removed"][0] == "env-2"
        })
    });
    agent.wait_status("env-2 gone", Duration::from_secs(10), |s| {
        s["devices"]["env-2"].is_null()
    });
    let before = r.msgs.iter().filter(|x| from(x, "env-1")).count();
    r.until("env-1 still reading", Duration::from_secs(20), |m| {
        m.iter().filter(|x| from(x, "env-1")).count() > before + 10
    });

    // Through all of it: env-1's and env-2's readings are gap-free (nothing lost).
    let sensor_msgs: Vec<Msg> = r
        .msgs
        .iter()
        .filter(|m| m.json["type"] == "sensor_reading")
        .cloned()
        .collect();
    assert_gap_free(&sensor_msgs);
}

/// An orderly stop with Kafka up delivers what the stop itself produced: the running
/// experiment's `experiment_stopped` (reason: agent shutdown) and the aggregate windows
/// still open, marked partial. Nothing of it waits for the next start.
#[test]
fn sigterm_delivers_the_stop_events_and_final_aggregates_before_exiting() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let extra = format!(
        "{}\n{}\n[pipeline.aggregates]\nwindow = \"1h\"\n",
        slow_potentiostat("pstat-sd"),
        sensors_device("env-sd", "50ms", None)
    );
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-sd",
            &broker.addr(),
            &topics,
            free_port(),
            &extra,
        ),
    );
    let mut reader = Reader::new(&broker.addr(), &topics.outputs());
    reader.until("data and readings flowing", Duration::from_secs(30), |m| {
        m.iter().any(|m| m.json["type"] == "echem_data")
            && m.iter()
                .filter(|m| m.json["type"] == "sensor_reading")
                .count()
                > 20
    });
    assert_eq!(agent.terminate(), Some(0));
    let log = agent.log_text();
    assert!(log.contains("forwarder drained"), "{log}");
    // The agent is gone: what arrives now was delivered before it exited.
    let msgs = reader
        .until(
            "the stop event and the partial aggregates",
            Duration::from_secs(10),
            |m| {
                m.iter().any(|m| {
                    m.json["event"] == "experiment_stopped"
                        && m.json["data"]["reason"] == "agent shutdown"
                }) && m
                    .iter()
                    .filter(|m| m.json["type"] == "sensor_aggregate" && m.json["partial"] == true)
                    .count()
                    == 2
            },
        )
        .to_vec();
    for m in msgs.iter().filter(|m| m.json["type"] == "sensor_aggregate") {
        assert_matches_schema(m);
        assert!(m.json["count"].as_u64() > Some(5), "{}", m.json);
    }
    let stats = labgate::buffer::Buffer::open(
        &dir.path().join("data/buffer"),
        &labgate::config::BufferConfig::default(),
    )
    .unwrap()
    .stats();
    assert_eq!(
        stats.records, 0,
        "nothing left for the next start: {stats:?}"
    );
}

/// Idle clients cannot lock the agent's HTTP out: each connection has 5 s to send its
/// request, and at most 64 are served at once; the rest wait in the backlog.
#[test]
fn idle_http_clients_are_dropped_and_cannot_lock_out_health() {
    use std::io::{Read, Write};
    let dir = tempdir();
    let topics = Topics::new();
    let brokers = format!("127.0.0.1:{}", free_port()); // nobody listens; not needed here
    let agent = Agent::start(
        dir.path(),
        &agent_config(dir.path(), "agent-http", &brokers, &topics, free_port(), ""),
    );
    let idle: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect(agent.http).expect("connect"))
        .collect();
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(agent.http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "health answered after {waited:?}"
    );
    // The idle ones were closed by the agent.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(first.read(&mut buf).expect("closed, not timed out"), 0);
}

/// Opens `GET path` and returns the connection and the response head (the body, an event
/// stream, stays open).
fn open_stream(agent: &Agent, path: &str) -> (std::net::TcpStream, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(agent.http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "no response head ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// Event streams hold their connection while open, so at most 32 (half the connections)
/// are open at once: more status pages are refused with 503 and counted, /health and
/// /metrics still answer at once, and a page that goes away frees its slot.
#[test]
fn open_event_streams_are_capped_and_leave_room_for_health_and_metrics() {
    let dir = tempdir();
    let topics = Topics::new();
    let brokers = format!("127.0.0.1:{}", free_port()); // nobody listens; not needed here
    let agent = Agent::start(
        dir.path(),
        &agent_config(
            dir.path(),
            "agent-streams",
            &brokers,
            &topics,
            free_port(),
            "",
        ),
    );
    let mut open: Vec<std::net::TcpStream> = (0..32)
        .map(|i| {
            let (s, head) = open_stream(&agent, "/live");
            assert!(head.starts_with("HTTP/1.1 200"), "stream {i}: {head}");
            assert!(head.contains("text/event-stream"), "stream {i}: {head}");
            s
        })
        .collect();
    let (_refused, head) = open_stream(&agent, "/live");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 5"),
        "{head}"
    );
    let t0 = Instant::now();
    assert_eq!(agent.get("/health").0, 200);
    assert_eq!(agent.metric("labgate_http_streams_open"), 32.0);
    assert_eq!(agent.metric("labgate_http_streams_refused_total"), 1.0);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "health and metrics waited {:?}",
        t0.elapsed()
    );
    // A page closes: its slot comes back (the agent notices at once or at the next
    // keep-alive comment, 15 s at most).
    drop(open.pop());
    let t0 = Instant::now();
    while agent.metric("labgate_http_streams_open") > 31.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the closed stream's slot never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_again, head) = open_stream(&agent, "/live");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(open);
}
