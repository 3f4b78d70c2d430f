//! The CLI without a broker: config errors exit 64 naming the key; check redacts secrets;
//! buffer stats reads a stopped agent's data dir.

mod common;

use std::process::Command;

fn labgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(args)
        .output()
        .expect("run labgate")
}

fn write(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("c.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

const OK: &str = r#"
[agent]
agent_id = "a1"
data_dir = "DATA"
[kafka]
bootstrap_servers = "127.0.0.1:1"
security_protocol = "sasl_ssl"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "lab"
sasl_password = "s3cret-value"
[http]
listen = ""
"#;

/// `labgate check` on a good config: exit 0, the effective config printed.
fn check_ok(path: &str) -> String {
    let out = labgate(&["check", "--config", path]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn check_prints_effective_config_with_secrets_redacted() {
    let dir = common::tempdir();
    let path = write(
        dir.path(),
        &OK.replace("DATA", &dir.path().display().to_string()),
    );
    let text = check_ok(&path);
    assert!(text.contains("sasl_password = \"***\""), "{text}");
    assert!(!text.contains("s3cret-value"));
    assert!(
        text.contains("commit_interval = \"20ms\""),
        "defaults shown: {text}"
    );
}

/// The unit runs `check` at every start, into the journal: an MQTT device's inline
/// password must not show either.
#[test]
fn check_never_prints_an_mqtt_password() {
    let dir = common::tempdir();
    let text = format!(
        "{}\n[[devices]]\nkind = \"mqtt\"\nid = \"m\"\nbroker = \"mqtt://127.0.0.1:1883\"\nusername = \"lab\"\npassword = \"mqtt-hunter2\"\n  [[devices.subscriptions]]\n  format = \"number\"\n  topic = \"a/+id/t\"\n  sensor_type = \"t\"\n",
        OK.replace("DATA", &dir.path().display().to_string())
    );
    let path = write(dir.path(), &text);
    let shown = check_ok(&path);
    assert!(!shown.contains("mqtt-hunter2"), "{shown}");
    assert!(shown.contains("password = \"***\""), "{shown}");
}

#[test]
fn config_errors_exit_64_and_name_the_key() {
    let dir = common::tempdir();
    let cases = [
        (
            OK.replace("agent_id = \"a1\"", "agent_id = \"a1\"\ncolour = 1"),
            "agent.colour",
        ),
        (
            OK.replace("127.0.0.1:1", "nohost"),
            "kafka.bootstrap_servers",
        ),
        (
            OK.replace("sasl_password = \"s3cret-value\"\n", ""),
            "kafka.sasl_password",
        ),
        (
            OK.replace("[http]", "[buffer]\ncommit_interval = \"soon\"\n[http]"),
            "buffer.commit_interval",
        ),
        (
            OK.replace("[http]", "[buffer]\noverflow = \"explode\"\n[http]"),
            "buffer.overflow",
        ),
        // Durations from outside are bounded where they enter: a timer built from this
        // would overflow.
        (
            OK.replace("agent_id = \"a1\"", "agent_id = \"a1\"\nshutdown_grace = \"10000000000y\""),
            "agent.shutdown_grace",
        ),
        (
            format!(
                "{OK}\n[[devices]]\nkind = \"simulated_sensors\"\nid = \"s\"\ninterval = \"9000000000y\"\nsensors = []\n"
            ),
            // serde loses the field name inside a tagged device table; the message
            // gives the device and the value.
            "devices[0]: 9000000000years",
        ),
        (
            format!(
                "{OK}\n[[devices]]\nkind = \"simulated_sensors\"\nid = \"agent\"\nsensors = []\n"
            ),
            "devices[0].id",
        ),
        (
            format!("{OK}\n[[devices]]\nkind = \"teleporter\"\nid = \"t\"\n"),
            "devices",
        ),
        // A token file that is not there (moved, or not yet deployed) names its key.
        (
            OK.replace(
                "[http]",
                "[[api.clients]]\nname = \"app\"\ntoken_file = \"/nonexistent/app.token\"\n[http]",
            ),
            "api.clients[0].token_file",
        ),
        (
            format!(
                "{OK}\n[[http.operators]]\nname = \"op\"\ntoken_file = \"/nonexistent/op.token\"\n"
            ),
            "http.operators[0].token_file",
        ),
    ];
    for (text, key) in cases {
        let path = write(dir.path(), &text.replace("DATA", "/tmp/x"));
        let out = labgate(&["check", "--config", &path]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {err}");
        assert!(err.contains(key), "error should name {key}: {err}");
    }
    let out = labgate(&["check", "--config", "/nonexistent/labgate.toml"]);
    assert_eq!(out.status.code(), Some(64));
    let out = labgate(&["run", "--config", "/nonexistent/labgate.toml"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn buffer_stats_reads_the_data_dir_of_a_stopped_agent() {
    let dir = common::tempdir();
    let data = dir.path().join("data");
    // Fill a buffer through the library, as a stopped agent would have left it.
    {
        use labgate::buffer::Buffer;
        use labgate::config::BufferConfig;
        use labgate::record::{stamp, Body, Draft};
        let b = Buffer::open(&data.join("buffer"), &BufferConfig::default()).unwrap();
        let recs: Vec<_> = (0..10)
            .map(|i| {
                let d = Draft::new(
                    "env-1",
                    Body::AgentEvent {
                        event: "x".into(),
                        data: Default::default(),
                    },
                );
                stamp(&d, "a1", i, std::time::SystemTime::now()).unwrap()
            })
            .collect();
        b.append(&recs, 0).unwrap();
        b.flush_blocking().unwrap();
    }
    let path = write(dir.path(), &OK.replace("DATA", &data.display().to_string()));
    let out = labgate(&["buffer", "stats", "--config", &path, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["records"], 10);
    assert_eq!(v["per_device"]["env-1"], 10);
    let out = labgate(&["buffer", "stats", "--config", &path]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("source:        data dir") && text.contains("env-1: 10"),
        "{text}"
    );
}

#[test]
fn version_is_printed() {
    let out = labgate(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("labgate "));
}

/// Output into a pipe that closed (`labgate check | head -0`) ends the CLI quietly with
/// 141, like a tool SIGPIPE ended, not with a panic; output the disk refuses (stdout on
/// /dev/full) is said on stderr with exit 74.
#[test]
fn a_closed_pipe_or_a_full_disk_on_stdout_ends_the_cli_without_a_panic() {
    use std::process::Stdio;
    let dir = common::tempdir();
    let path = write(
        dir.path(),
        &OK.replace("DATA", &dir.path().join("data").display().to_string()),
    );
    // bash opens a pipe whose reader exits at once and waits for it, so the pipe is
    // closed before labgate starts (closing our end after spawning raced the child's
    // first write, and it exited 0 once under load).
    let out = Command::new("bash")
        .args([
            "-c",
            r#"exec 3> >(exit 0); wait $!; exec "$0" check --config "$1" >&3"#,
            env!("CARGO_BIN_EXE_labgate"),
            &path,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run labgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config", &path])
        .stdout(full)
        .output()
        .expect("run labgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "stderr: {stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
