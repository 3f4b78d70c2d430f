//! Secured Kafka against a real broker with each mode switched on: TLS with a private
//! CA, mutual TLS, SASL SCRAM-SHA-256 and -512 without and over TLS. Records are
//! delivered and commands received and answered in every mode; refused credentials, an
//! untrusted CA and an expired certificate are named (log, /health, metric), retried, and
//! lose nothing once fixed.
//!
//! tansu's CLI cannot switch TLS on, so socat terminates TLS in front of it (tansu
//! advertises socat's port); tansu's `--authentication` speaks SCRAM against users kept
//! in its SQLite storage, created before the broker starts requiring it.

mod common;

use std::time::Duration;

use common::*;

/// Runs an agent with a sensor device against `addr` secured by `sec`; returns it once
/// readings have arrived and a command has been answered through the same security.
fn agent_delivers_and_answers(
    dir: &std::path::Path,
    id: &str,
    addr: &str,
    sec: &Security,
    topics: &Topics,
) -> Agent {
    let cfg = agent_config_kafka(
        dir,
        id,
        addr,
        topics,
        free_port(),
        &sec.toml,
        &sensors_device("s1", "100ms", None),
    );
    let agent = Agent::start(dir, &cfg);
    let mut r = Reader::with(
        sec.client(addr),
        &[topics.sensors(), topics.results(), topics.agent_events()],
    );
    r.until(
        "readings through the secured broker",
        Duration::from_secs(60),
        |m| m.iter().filter(|x| x.topic == topics.sensors()).count() >= 10,
    );
    let sender = Sender::with(sec.client(addr));
    wait_until_commands_answered(&sender, &mut r, &topics.commands(), id);
    let s = agent.wait_status("healthy", Duration::from_secs(20), |s| {
        s["health"].as_array().is_some_and(Vec::is_empty)
    });
    assert_eq!(s["kafka"]["connected"], true, "{s}");
    for m in &r.msgs {
        assert_matches_schema(m);
    }
    agent
}

/// Waits until /health is 503 naming `cause`, and the refusal metric counts.
fn refused_with(agent: &Agent, cause: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = agent.get("/health");
        if code == 503 && body.contains(cause) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 503 naming {cause:?}; last: {code} {body}\nlog:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.metric("labgate_kafka_auth_errors_total") >= 1.0);
    assert_eq!(agent.metric("labgate_kafka_refused"), 1.0);
    assert!(
        agent.log_text().contains(cause),
        "the log names the cause {cause:?}:\n{}",
        agent.log_text()
    );
}

/// An agent refused for `cause` under the `wrong` settings, its records waiting in the
/// buffer; restarted on the same data dir with `good`: everything it made arrives, from
/// seq 0, with no gap. Returns the agent, running.
fn refused_then_fixed(
    dir: &std::path::Path,
    id: &str,
    addr: &str,
    wrong: &str,
    good: &Security,
    cause: &str,
) -> Agent {
    let topics = Topics::new();
    let http = free_port();
    let sensors = sensors_device("s1", "50ms", None);
    let cfg = |kafka: &str| agent_config_kafka(dir, id, addr, &topics, http, kafka, &sensors);
    let mut agent = Agent::start(dir, &cfg(wrong));
    refused_with(&agent, cause);
    let waiting = agent.status()["buffer"]["records"].as_u64().unwrap();
    assert!(waiting > 0, "records wait in the buffer");
    assert_eq!(agent.terminate(), Some(0));
    std::fs::write(&agent.config, cfg(&good.toml)).unwrap();
    agent.spawn();
    let buffered = agent.status()["records_buffered"].as_u64().unwrap();
    let mut r = Reader::with(good.client(addr), &[topics.sensors()]);
    r.until(
        "the backlog and new readings",
        Duration::from_secs(60),
        |m| m.len() as u64 > waiting + buffered,
    );
    assert_gap_free(&r.msgs);
    assert_eq!(
        r.msgs[0].json["seq"], 0,
        "the first reading made while refused arrived"
    );
    agent
}

/// A broker with SQLite storage and the two SCRAM users, restarted with authentication.
fn scram_broker(dir: &std::path::Path, advertised: Option<u16>) -> Broker {
    let store = dir.join("tansu");
    std::fs::create_dir_all(&store).unwrap();
    let port = free_port();
    let mut open = Broker::start_with(&TansuOptions {
        port,
        advertised,
        sqlite_dir: Some(store.clone()),
        authentication: false,
        schema_dir: None,
    });
    open.create_user("alice", "alice-512", "scram512");
    open.create_user("bob", "bob-256", "scram256");
    open.stop();
    Broker::start_with(&TansuOptions {
        port,
        advertised,
        sqlite_dir: Some(store),
        authentication: true,
        schema_dir: None,
    })
}

#[test]
fn tls_with_a_private_ca() {
    let dir = tempdir();
    let certs = Certs::make(dir.path());
    let front = hold_port();
    let front_port = front.port;
    let broker = Broker::start_with(&TansuOptions {
        advertised: Some(front_port),
        ..TansuOptions::default()
    });
    let _tls = TlsFront::start(front, &certs, "server.pem", broker.port, false);
    let sec = Security::tls(&certs, false, None);
    let topics = Topics::new();
    let mut agent = agent_delivers_and_answers(
        dir.path(),
        "tls-a",
        &format!("localhost:{}", front_port),
        &sec,
        &topics,
    );
    // The operator tools take the same settings from the same config.
    let tool = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_labgate"))
            .args(args)
            .arg("--config")
            .arg(&agent.config)
            .output()
            .expect("run labgate");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = tool(&[
        "tail",
        "--topic",
        &topics.sensors(),
        "--from-beginning",
        "--count",
        "3",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    let (code, out, err) = tool(&[
        "command",
        "send",
        "--agent",
        "tls-a",
        "--device",
        "s1",
        "--wait",
        "--timeout",
        "20s",
        "pause",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("\"status\":\"completed\""), "{out}");
    let (code, out, err) = tool(&[
        "command",
        "tail",
        "--from-beginning",
        "--count",
        "2",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, out, err) = tool(&["fleet"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("tls-a"), "{out}");
    assert_eq!(agent.terminate(), Some(0));
}

#[test]
fn mutual_tls_and_a_client_without_a_certificate_is_refused() {
    let dir = tempdir();
    let certs = Certs::make(dir.path());
    let front = hold_port();
    let front_port = front.port;
    let broker = Broker::start_with(&TansuOptions {
        advertised: Some(front_port),
        ..TansuOptions::default()
    });
    let _tls = TlsFront::start(front, &certs, "server.pem", broker.port, true);
    let addr = format!("localhost:{}", front_port);
    let sec = Security::tls(&certs, true, None);
    let topics = Topics::new();
    let mut agent = agent_delivers_and_answers(dir.path(), "mtls-a", &addr, &sec, &topics);
    assert_eq!(agent.terminate(), Some(0));

    // An agent without its certificate: refused, and said so; given it, it delivers
    // what waited.
    let dir2 = tempdir();
    let without = Security::tls(&certs, false, None);
    refused_then_fixed(
        dir2.path(),
        "mtls-b",
        &addr,
        &without.toml,
        &sec,
        "client certificate",
    );
}

#[test]
fn an_untrusted_ca_is_named_and_nothing_is_lost_once_fixed() {
    let dir = tempdir();
    let certs = Certs::make(dir.path());
    let front = hold_port();
    let front_port = front.port;
    let broker = Broker::start_with(&TansuOptions {
        advertised: Some(front_port),
        ..TansuOptions::default()
    });
    let _tls = TlsFront::start(front, &certs, "server.pem", broker.port, false);
    let addr = format!("localhost:{}", front_port);
    let good = Security::tls(&certs, false, None);
    let wrong = good
        .toml
        .replace(&certs.path("ca.pem"), &certs.path("other-ca.pem"));
    refused_then_fixed(
        dir.path(),
        "ca-a",
        &addr,
        &wrong,
        &good,
        "not signed by a trusted CA",
    );
}

#[test]
fn an_expired_broker_certificate_is_named_and_retried_until_renewed() {
    let dir = tempdir();
    let certs = Certs::make(dir.path());
    let front = hold_port();
    let front_port = front.port;
    let broker = Broker::start_with(&TansuOptions {
        advertised: Some(front_port),
        ..TansuOptions::default()
    });
    let tls = TlsFront::start(front, &certs, "server-expired.pem", broker.port, false);
    let addr = format!("localhost:{}", front_port);
    let topics = Topics::new();
    let sec = Security::tls(&certs, false, None);
    let cfg = agent_config_kafka(
        dir.path(),
        "exp-a",
        &addr,
        &topics,
        free_port(),
        &sec.toml,
        &sensors_device("s1", "50ms", None),
    );
    let agent = Agent::start(dir.path(), &cfg);
    refused_with(&agent, "expired");
    // The broker's certificate is renewed; the agent, still running, gets through.
    drop(tls);
    let _tls = TlsFront::on(front_port, &certs, "server.pem", broker.port, false);
    // Readings keep coming every 50 ms, so the buffer is seldom empty: "caught up" is
    // every record made while refused delivered, not an empty buffer.
    let made_while_refused = agent.status()["records_buffered"].as_u64().unwrap();
    agent.wait_status("healthy again", Duration::from_secs(60), |s| {
        s["health"].as_array().is_some_and(Vec::is_empty)
            && s["kafka"]["records_delivered"]
                .as_u64()
                .is_some_and(|d| d >= made_while_refused)
    });
    let buffered = agent.status()["records_buffered"].as_u64().unwrap();
    let mut r = Reader::with(sec.client(&addr), &[topics.sensors()]);
    r.until("everything buffered", Duration::from_secs(60), |m| {
        m.len() as u64 >= buffered
    });
    assert_gap_free(&r.msgs);
    assert_eq!(r.msgs[0].json["seq"], 0);
}

#[test]
fn sasl_scram_sha_256_and_512() {
    let dir = tempdir();
    let broker = scram_broker(dir.path(), None);
    for (mechanism, user, password) in [
        ("SCRAM-SHA-512", "alice", "alice-512"),
        ("SCRAM-SHA-256", "bob", "bob-256"),
    ] {
        let d = tempdir();
        let sec = Security::sasl_plaintext(mechanism, user, password);
        let mut agent = agent_delivers_and_answers(
            d.path(),
            &format!("scram-{user}"),
            &broker.addr(),
            &sec,
            &Topics::new(),
        );
        assert_eq!(agent.terminate(), Some(0));
    }
}

#[test]
fn sasl_ssl_scram_through_tls() {
    let dir = tempdir();
    let certs = Certs::make(dir.path());
    let front = hold_port();
    let front_port = front.port;
    let broker = scram_broker(dir.path(), Some(front_port));
    let _tls = TlsFront::start(front, &certs, "server.pem", broker.port, false);
    let sec = Security::tls(&certs, false, Some(("SCRAM-SHA-512", "alice", "alice-512")));
    let mut agent = agent_delivers_and_answers(
        dir.path(),
        "sasl-ssl-a",
        &format!("localhost:{}", front_port),
        &sec,
        &Topics::new(),
    );
    assert_eq!(agent.terminate(), Some(0));
}

#[test]
fn a_wrong_password_is_named_and_nothing_is_lost_once_fixed() {
    let dir = tempdir();
    let broker = scram_broker(dir.path(), None);
    let good = Security::sasl_plaintext("SCRAM-SHA-512", "alice", "alice-512");
    let wrong = good.toml.replace("alice-512", "not-her-password");
    let d = tempdir();
    let agent = refused_then_fixed(
        d.path(),
        "pw-a",
        &broker.addr(),
        &wrong,
        &good,
        "SASL username or password",
    );
    assert!(
        !agent.log_text().contains("not-her-password"),
        "the password is never logged"
    );
}

/// tansu offers SCRAM only: PLAIN's configuration reaches the broker as far as the
/// mechanism handshake, which the broker refuses, and the agent names that.
#[test]
fn sasl_plain_is_configured_and_a_broker_without_it_is_named() {
    let dir = tempdir();
    let broker = scram_broker(dir.path(), None);
    let sec = Security::sasl_plaintext("PLAIN", "alice", "alice-512");
    let d = tempdir();
    let cfg = agent_config_kafka(
        d.path(),
        "plain-a",
        &broker.addr(),
        &Topics::new(),
        free_port(),
        &sec.toml,
        &sensors_device("s1", "100ms", None),
    );
    let agent = Agent::start(d.path(), &cfg);
    refused_with(&agent, "does not offer this SASL mechanism");
}
