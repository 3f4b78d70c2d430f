//! The status page in a real browser: Debian's chromium, headless, driven through
//! chromedriver (WebDriver) by fantoccini, against the agent running the demo config
//! with the EmStat simulator, mosquitto and tansu. Screenshots are saved under
//! `$CARGO_TARGET_TMPDIR/screenshots` (or `$LABGATE_ARTIFACTS`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, Locator};
use labgate::sim::emstat::{Emstat, Options};
use serde_json::{json, Value};

/// The demo config's operator token, as the tests run it.
const OPERATOR_TOKEN: &str = DEMO_ENV[1].1;

fn artifacts() -> PathBuf {
    let dir = std::env::var_os("LABGATE_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let path = artifacts().join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Polls a script until it returns something truthy.
async fn until(c: &Client, what: &str, timeout: Duration, script: &str) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = js(c, script).await;
        let truthy = match &v {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let _ = screenshot(c, &format!("timeout-{}.png", what.replace(' ', "-"))).await;
            panic!("timed out waiting for {what} ({script} = {v})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_page_shows_the_demo_live_stops_an_instrument_and_recovers_after_a_restart() {
    let broker = Broker::start();
    let mqtt = Mosquitto::start();
    let dir = tempdir();
    let link = dir.path().join("ttyEMSTAT");
    let sim = Emstat::start(
        Options {
            speed: 0.5,
            ..Options::default()
        },
        Some(&link),
    )
    .unwrap();
    let sensors = zigbee2mqtt_sensors(&mqtt.url());
    let http = free_port();
    let config = demo_config(
        &broker.addr(),
        &mqtt.url(),
        &link,
        &dir.path().join("data"),
        http,
    );
    let devices: Vec<String> = toml::from_str::<toml::Value>(&config).unwrap()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    let mut agent = Agent::start_with_env(dir.path(), &config, &DEMO_ENV);
    // Everything the page needs is in the binary, and it is small.
    let page = request(agent.http, "GET", "/", &[], b"");
    assert_eq!(page.status, 200);
    assert!(page.body.len() < 300 * 1024, "{} bytes", page.body.len());
    for external in ["src=\"http", "href=\"http", "url(http", "@import", "//cdn"] {
        assert!(
            !page.body.contains(external),
            "no external assets: {external}"
        );
    }

    let (_driver, port) = chromedriver();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(port, 1280, 1600).await;
        c.goto(&format!("http://127.0.0.1:{http}/")).await.unwrap();
        until(&c, "the live feed", Duration::from_secs(20), "return document.getElementById('feed').textContent === 'live'").await;
        for id in &devices {
            until(&c, &format!("card {id}"), Duration::from_secs(20), &format!("return !!document.getElementById('dev-{id}')")).await;
        }
        // The CV plot gains points while the simulator runs.
        let cv = "const s = document.querySelector('#dev-pstat-1 svg.run'); return s && s.dataset.kind === 'CV' ? Number(s.dataset.points) : 0";
        let first = until(&c, "CV points", Duration::from_secs(60), cv).await.as_f64().unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let later = js(&c, cv).await.as_f64().unwrap();
        assert!(later > first, "the CV plot grows: {first} then {later}");
        let path_len = js(&c, "return document.querySelector('#dev-pstat-1 svg.run path').getAttribute('d').length").await;
        assert!(path_len.as_u64().unwrap() > 100, "a trace is drawn");
        // Sensor trends and the thresholds the demo configures (temperature max 22.3).
        until(&c, "sensor trend", Duration::from_secs(30), "return document.querySelectorAll('#dev-env-sim-1 svg.trend').length >= 4 && Number(document.querySelector('#dev-env-sim-1 svg.trend').dataset.points)").await;
        until(&c, "threshold line", Duration::from_secs(10), "const s = document.querySelector('#dev-env-sim-1 svg.trend[data-sensor=\"temp-001\"]'); return s && s.querySelectorAll('line.threshold').length").await;
        screenshot(&c, "status-page.png").await;

        // Lab software's runs are drawn too: a CV of two scans (one trace each), then an
        // impedance spectrum (a Nyquist plot), posted through the ingest API.
        let post = |body: Value| {
            let r = post_json(agent.http, "/v1/data", DEMO_ENV[0].1, &body);
            assert_eq!(r.status, 202, "{}", r.body);
        };
        let tri: Vec<Value> = (0..2)
            .flat_map(|scan| {
                (0..120).map(move |k| {
                    let e = if k < 60 { -0.2 + k as f64 * 0.01 } else { 0.4 - (k - 60) as f64 * 0.01 };
                    json!({"t": (scan * 120 + k) as f64 * 0.1, "e": e, "i": 1e-6 * (e * 8.0).sin()})
                })
            })
            .collect();
        post(json!({"technique": "CV", "experiment_id": "api_cv", "points": tri}));
        let traces = until(&c, "two CV traces", Duration::from_secs(20), "const s = document.querySelector('#dev-lab-app svg.run'); return s && s.dataset.plot === 'iv' ? Number(s.dataset.traces) : 0").await;
        assert_eq!(traces, 2, "one trace per scan");
        let eis: Vec<Value> = (0..30)
            .map(|k| {
                let w = 10f64.powf(5.0 - k as f64 * 0.2) * std::f64::consts::TAU;
                let (rs, rct, c) = (100.0, 1000.0, 1e-6);
                let z = rct / (1.0 + (w * rct * c).powi(2));
                json!({"t": k as f64, "f": w / std::f64::consts::TAU, "z_re": rs + z, "z_im": -z * w * rct * c})
            })
            .collect();
        post(json!({"technique": "EIS", "experiment_id": "api_eis", "points": eis}));
        until(&c, "a Nyquist plot", Duration::from_secs(20), "const s = document.querySelector('#dev-lab-app svg.run'); return s && s.dataset.plot === 'nyquist'").await;
        screenshot(&c, "status-page-eis.png").await;

        // A stop from the page reaches the instrument as Z and shows in the history.
        let z_before = sim.received().iter().filter(|c| *c == "Z").count();
        js(&c, &format!("sessionStorage.setItem('labgate-operator', '{OPERATOR_TOKEN}'); return 1")).await;
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css("#dev-pstat-1 button.stop"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while sim.received().iter().filter(|c| *c == "Z").count() == z_before {
            assert!(Instant::now() < deadline, "the simulator never saw Z: {:?}", sim.received());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let row = until(
            &c,
            "the stop in the history",
            Duration::from_secs(20),
            "const r = document.querySelector('#commands tr[data-command=\"stop\"][data-status=\"completed\"]'); return r ? r.textContent : ''",
        )
        .await;
        assert!(row.as_str().unwrap().contains("local:demo"), "{row}");
        until(&c, "stopped run", Duration::from_secs(20), "return document.querySelector('#dev-pstat-1 .run').textContent.includes('stopped')").await;
        screenshot(&c, "status-page-stopped.png").await;

        // The agent restarts: the page says so, then carries on by itself.
        agent.terminate();
        until(&c, "reconnecting", Duration::from_secs(20), "return document.getElementById('feed').textContent === 'reconnecting'").await;
        agent.spawn();
        until(&c, "live again", Duration::from_secs(30), "return document.getElementById('feed').textContent === 'live'").await;
        for id in &devices {
            until(&c, &format!("card {id} after restart"), Duration::from_secs(20), &format!("return !!document.getElementById('dev-{id}')")).await;
        }
        until(&c, "readings after restart", Duration::from_secs(30), "return document.querySelector('#dev-env-sim-1 .info').textContent.includes('s ago')").await;
        screenshot(&c, "status-page-after-restart.png").await;
        c.close().await.unwrap();

        // On a phone: nothing wider than the screen.
        let phone = browser(port, 390, 844).await;
        phone.goto(&format!("http://127.0.0.1:{http}/")).await.unwrap();
        until(&phone, "the live feed on a phone", Duration::from_secs(20), "return document.getElementById('feed').textContent === 'live'").await;
        until(&phone, "cards on a phone", Duration::from_secs(20), "return !!document.getElementById('dev-pstat-1')").await;
        let overflow = js(&phone, "return document.documentElement.scrollWidth - window.innerWidth").await;
        assert!(overflow.as_f64().unwrap() <= 0.0, "horizontal overflow of {overflow} px");
        screenshot(&phone, "status-page-phone.png").await;
        phone.close().await.unwrap();
    });
    drop(sensors);
}

#[test]
fn local_control_needs_an_operator_token_and_is_off_without_operators() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    let token_file = dir.path().join("operator.token");
    std::fs::write(&token_file, OPERATOR_TOKEN).unwrap();
    // A token file everyone can read is refused, naming the key.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ops = format!(
        "[[http.operators]]\nname = \"bench\"\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    let cfg = agent_config(
        dir.path(),
        "agent-local",
        &broker.addr(),
        &topics,
        free_port(),
        &format!("{}\n{ops}", slow_potentiostat("pstat-1")),
    );
    std::fs::write(dir.path().join("bad.toml"), &cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_labgate"))
        .args(["check", "--config"])
        .arg(dir.path().join("bad.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("http.operators[0].token_file") && err.contains("readable by everyone"),
        "{err}"
    );
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("running", Duration::from_secs(30), |s| {
        s["devices"]["pstat-1"]["state"] == "running"
    });
    let post = |token: &str, body: Value| {
        let auth = format!("Bearer {token}");
        request(
            agent.http,
            "POST",
            "/v1/local/commands",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    };
    assert_eq!(
        post(
            "wrong-token-0123456789",
            json!({"device": "pstat-1", "command": "stop"})
        )
        .status,
        401
    );
    assert_eq!(
        post(
            OPERATOR_TOKEN,
            json!({"device": "pstat-1", "command": "tare"})
        )
        .status,
        400
    );
    // Refused by the same rules as a Kafka command: unknown device.
    let r = post(OPERATOR_TOKEN, json!({"device": "nope", "command": "stop"}));
    assert_eq!(r.status, 202, "{}", r.body);
    let refused_id = r.json()["command_id"].as_str().unwrap().to_string();
    let r = post(
        OPERATOR_TOKEN,
        json!({"device": "pstat-1", "command": "stop"}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["command_id"].as_str().unwrap().to_string();
    let mut reader = Reader::new(
        &broker.addr(),
        &[topics.results(), topics.events(), topics.agent_events()],
    );
    let msgs = reader.until("the local stop's results", Duration::from_secs(30), |m| {
        m.iter()
            .any(|m| m.json["command_id"] == id.as_str() && m.json["status"] == "completed")
            && m.iter().any(|m| {
                m.json["command_id"] == refused_id.as_str() && m.json["status"] == "rejected"
            })
            && m.iter().any(|m| {
                m.json["event"] == "command_audit" && m.json["data"]["command_id"] == id.as_str()
            })
            && m.iter().any(|m| m.json["event"] == "experiment_stopped")
    });
    let statuses: Vec<&str> = msgs
        .iter()
        .filter(|m| m.json["type"] == "command_result" && m.json["command_id"] == id.as_str())
        .map(|m| m.json["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["accepted", "completed"]);
    let done = msgs
        .iter()
        .find(|m| m.json["command_id"] == id.as_str() && m.json["status"] == "completed")
        .unwrap();
    assert_eq!(done.json["issuer"], "local:bench");
    let refused = msgs
        .iter()
        .find(|m| m.json["command_id"] == refused_id.as_str())
        .unwrap();
    assert_eq!(refused.json["reason_code"], "unknown_device");
    let audit = msgs
        .iter()
        .find(|m| m.json["event"] == "command_audit" && m.json["data"]["command_id"] == id.as_str())
        .unwrap();
    assert_eq!(
        audit.json["data"]["issuer"], "local:bench",
        "audited like any command"
    );

    // Without operators, the page is read-only.
    let dir2 = tempdir();
    let plain = Agent::start(
        dir2.path(),
        &agent_config(
            dir2.path(),
            "agent-ro",
            &broker.addr(),
            &topics,
            free_port(),
            "",
        ),
    );
    let r = request(
        plain.http,
        "POST",
        "/v1/local/commands",
        &[("Authorization", &format!("Bearer {OPERATOR_TOKEN}"))],
        br#"{"device":"x","command":"stop"}"#,
    );
    assert_eq!(r.status, 404, "{}", r.body);
}
