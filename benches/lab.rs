//! `scripts/bench`, lab software and the status page:
//!
//! - the ingest API: one record per request (the Python client's way) — requests per
//!   second and the time to each `202`, which includes the group commit's fdatasync —
//!   and NDJSON batches of 1,000 readings from two clients — records per second made
//!   durable;
//! - the status page against a 2,000 points/s instrument (a simulated potentiostat
//!   running CA at 0.5 ms per point): the agent's CPU with no page, one page, two pages
//!   and one page whose reader stopped (a closed laptop lid, played by a socket that
//!   never reads), its RSS, the points the page has drawn against the points measured,
//!   and the page's own drawing time per frame in chromium;
//! - the peer run: the same ~300-byte JSON reading sent by a plain confluent-kafka
//!   producer script (PyPI, `benches/peers/confluent_producer.py`, in the venv
//!   `scripts/lib.sh` makes) and through labgate's ingest API into Kafka, on the same
//!   broker: rates and peak RSS side by side.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "bench-token-0123456789abcdef";

fn line(s: String) {
    println!("{s}");
    eprintln!("{s}");
}

/// CPU seconds the process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat, counted after the command name: 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// The agent's CPU share (of one core) over `d`.
fn cpu_share(pid: u32, d: Duration) -> f64 {
    let a = cpu_seconds(pid);
    std::thread::sleep(d);
    (cpu_seconds(pid) - a) / d.as_secs_f64()
}

fn api_config(dir: &std::path::Path, broker: &str, http: u16, extra: &str) -> String {
    let topics = Topics::new();
    agent_config(
        dir,
        "bench-lab",
        broker,
        &topics,
        http,
        &format!(
            r#"[api]
max_body_bytes = 4194304

[[api.clients]]
name = "bench"
token_env = "BENCH_API_TOKEN"

[[http.operators]]
name = "bench"
token_env = "BENCH_API_TOKEN"

{extra}"#
        ),
    )
    .replace(
        "commands_offset_reset",
        "commands_enabled = false\ncommands_offset_reset",
    )
}

/// Posts NDJSON readings to the ingest API; returns how many it accepted (after the 202,
/// i.e. durable).
fn post_ndjson(addr: std::net::SocketAddr, batch: &str) -> u64 {
    let auth = format!("Bearer {TOKEN}");
    let r = request(
        addr,
        "POST",
        "/v1/readings",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-ndjson"),
        ],
        batch.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    r.json()["accepted"].as_u64().unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ingest_api(broker: &Broker) {
    let dir = tempdir();
    let http = free_port();
    let agent = Agent::start_with_env(
        dir.path(),
        &api_config(dir.path(), &broker.addr(), http, ""),
        &[("BENCH_API_TOKEN", TOKEN)],
    );
    let secs = 5.0 * scale().max(0.2);
    // One record per request, one client, as the Python client sends them.
    let mut lat = Vec::new();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        let body = json!({"event": "step_completed", "experiment_id": "bench_1", "data": {"step_index": n}});
        let s = Instant::now();
        let r = post_json(agent.http, "/v1/events", TOKEN, &body);
        assert_eq!(r.status, 202, "{}", r.body);
        lat.push(s.elapsed().as_secs_f64() * 1e3);
        n += 1;
    }
    let single_rate = n as f64 / t0.elapsed().as_secs_f64();
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    // NDJSON batches of 1,000 readings, two clients at once.
    let batch: String = (0..1000)
        .map(|k| {
            json!({"sensor_id": format!("s{}", k % 20), "sensor_type": "temperature", "value": 20.0 + (k as f64) / 100.0, "unit": "°C"})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let addr = agent.http;
    let t0 = Instant::now();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let batch = batch.clone();
            std::thread::spawn(move || {
                let mut records = 0u64;
                let start = Instant::now();
                while start.elapsed().as_secs_f64() < secs * 2.0 {
                    records += post_ndjson(addr, &batch);
                }
                records
            })
        })
        .collect();
    let total: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let batch_rate = total as f64 / t0.elapsed().as_secs_f64();
    let rss = rss_kib(agent.pid(), "VmHWM:") as f64 / 1024.0;
    line(format!(
        "| ingest API, one record per request (1 client) | {single_rate:.0} requests/s; 202 after p50 {p50:.2} ms, p99 {p99:.2} ms | each 202 waits for the group commit's fdatasync (buffer.commit_interval 20 ms default; a waiting sender flushes at once) |"
    ));
    line(format!(
        "| ingest API, NDJSON batches of 1,000 readings (2 clients) | {batch_rate:.0} records/s durable | {total} records; agent peak RSS {rss:.1} MB |"
    ));
}

fn status_page(broker: &Broker) {
    let dir = tempdir();
    let http = free_port();
    let device = r#"[[devices]]
kind = "simulated_potentiostat"
id = "pstat-fast"
points_per_message = 50
max_interval = "100ms"
speed = 1.0
runs = 0
pause_between = "1s"

  [[devices.steps]]
  technique = "ca"
  e_dc = 0.4
  t_interval = 0.0005
  t_run = 300.0
"#;
    let mut agent = Agent::start_with_env(
        dir.path(),
        &api_config(dir.path(), &broker.addr(), http, device),
        &[("BENCH_API_TOKEN", TOKEN)],
    );
    agent.wait_status("running", Duration::from_secs(30), |s| {
        s["devices"]["pstat-fast"]["state"] == "running"
    });
    let window = Duration::from_secs_f64(10.0 * scale().max(0.3));
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.pid();
    let idle = cpu_share(pid, window);
    let rss_none = rss_kib(pid, "VmRSS:") as f64 / 1024.0;

    let (_driver, port) = chromedriver();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://127.0.0.1:{http}/");
    let open = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let c = browser(port, 1280, 1000).await;
            c.goto(&url).await.unwrap();
            c
        })
    };
    let one = open(&rt);
    std::thread::sleep(Duration::from_secs(2));
    let one_page = cpu_share(pid, window);
    let rss_one = rss_kib(pid, "VmRSS:") as f64 / 1024.0;
    let shown = |c: &fantoccini::Client| -> f64 {
        rt.block_on(c.execute(
            "const s = document.querySelector('#dev-pstat-fast svg.run'); return s ? Number(s.dataset.points) : 0",
            vec![],
        ))
        .ok()
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0)
    };
    // Points the agent's view has, then (a moment later) the points the page has
    // counted: a page that keeps up has at least as many.
    let live_points = {
        let mut s = TcpStream::connect(agent.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET /live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 1 << 22];
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        // The first event is the snapshot; read until its end.
        while Instant::now() < deadline {
            use std::io::Read;
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(2).any(|w| w == b"\n\n") && got.windows(8).any(|w| w == b"snapshot") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&got).to_string();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["type"] == "snapshot")
            .and_then(|v| v["runs"]["pstat-fast"]["points_total"].as_f64())
            .unwrap_or(0.0)
    };
    let page_points = shown(&one);
    let draw = rt
        .block_on(one.execute(
            r#"return new Promise((done) => {
                 const times = []; let last = performance.now();
                 function tick(now) { times.push(now - last); last = now; if (times.length < 120) requestAnimationFrame(tick); else done(times); }
                 requestAnimationFrame(tick);
               })"#,
            vec![],
        ))
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let mut frames: Vec<f64> = draw.iter().filter_map(Value::as_f64).collect();
    let (f50, f99) = if frames.is_empty() {
        (0.0, 0.0)
    } else {
        (pct(&mut frames.clone(), 0.5), pct(&mut frames, 0.99))
    };
    let two = open(&rt);
    std::thread::sleep(Duration::from_secs(2));
    let two_pages = cpu_share(pid, window);
    let rss_two = rss_kib(pid, "VmRSS:") as f64 / 1024.0;
    rt.block_on(async {
        let _ = two.close().await;
        let _ = one.close().await;
    });
    // A reader that stopped: connected, never reading.
    let mut lid = TcpStream::connect(agent.http).unwrap();
    write!(lid, "GET /live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let closed_lid = cpu_share(pid, window);
    let rss_lid = rss_kib(pid, "VmRSS:") as f64 / 1024.0;
    drop(lid);
    let page_bytes = request(agent.http, "GET", "/", &[], b"").body.len();
    agent.terminate();
    line(format!(
        "| status page, 2,000 points/s CA: agent CPU with no page / 1 page / 2 pages / 1 stalled reader | {:.1} % / {:.1} % / {:.1} % / {:.1} % of a core | {:.0} s windows; agent RSS {rss_none:.1} / {rss_one:.1} / {rss_two:.1} / {rss_lid:.1} MB (the simulator computes a 300 s run's 600k points up front) |",
        idle * 100.0,
        one_page * 100.0,
        two_pages * 100.0,
        closed_lid * 100.0,
        window.as_secs_f64()
    ));
    line(format!(
        "| status page keeps up with 2,000 points/s | the agent's view had {live_points:.0} points, the page a moment later {page_points:.0} ({:.3}×) | chromium headless; frame interval p50 {f50:.1} ms, p99 {f99:.1} ms while drawing; page {page_bytes} bytes, nothing else loaded |",
        if live_points > 0.0 { page_points / live_points } else { 0.0 }
    ));
}

fn peers(broker: &Broker) {
    let reading = json!({
        "sensor_id": "temp-lab3-007", "sensor_type": "temperature", "value": 22.41, "unit": "°C",
        "location": "Building A, Lab 3, bench 2",
        "metadata": {"model": "DHT22", "firmware": "1.4.2", "calibrated": "2026-10-01",
                     "battery": 87, "rssi": -61, "source": "zigbee2mqtt", "room": "A-3.12",
                     "project": "electrolyte-screening", "owner": "ana"}
    })
    .to_string();
    let n = ((200_000.0 * scale()) as u64 / 1000).max(10) * 1000;
    // confluent-kafka on its own topic of the same broker.
    let python = std::env::var("LABGATE_PYTHON")
        .expect("LABGATE_PYTHON: run scripts/bench, which installs confluent-kafka in a venv");
    broker.create_topics(&["peer-confluent"]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/peers/confluent_producer.py"
    );
    let mut child = std::process::Command::new(python)
        .args([script, &broker.addr(), "peer-confluent", &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the confluent-kafka producer");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(reading.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "confluent-kafka producer failed");
    let peer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let peer_rate = peer["rate"].as_f64().unwrap();
    let peer_rss = peer["peak_rss_kb"].as_f64().unwrap() / 1024.0;
    // labgate: the same reading in NDJSON batches of 1,000 through the ingest API, two
    // clients, timed until Kafka has acknowledged every one.
    let dir = tempdir();
    let agent = Agent::start_with_env(
        dir.path(),
        &api_config(dir.path(), &broker.addr(), free_port(), ""),
        &[("BENCH_API_TOKEN", TOKEN)],
    );
    let before = agent.metric("labgate_records_delivered_total");
    let batch: String = vec![reading.as_str(); 1000].join("\n");
    let addr = agent.http;
    let t0 = Instant::now();
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let batch = batch.clone();
            let per = n / 2000 + u64::from(c == 0) * (n / 1000 % 2);
            std::thread::spawn(move || {
                for _ in 0..per {
                    post_ndjson(addr, &batch);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let durable = t0.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(300);
    while agent.metric("labgate_records_delivered_total") - before < n as f64 {
        assert!(
            Instant::now() < deadline,
            "labgate did not deliver the peer run's records"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let delivered = t0.elapsed().as_secs_f64();
    let rss = rss_kib(agent.pid(), "VmHWM:") as f64 / 1024.0;
    let rate = n as f64 / delivered;
    line(format!(
        "| peer run: {n} readings of {} bytes, plain confluent-kafka producer (Python) | {peer_rate:.0} msg/s acknowledged by Kafka; peak RSS {peer_rss:.1} MB | not durable: what it holds in memory dies with the process |",
        reading.len()
    ));
    line(format!(
        "| peer run: the same readings through labgate's ingest API (NDJSON, 2 clients) | {rate:.0} msg/s in Kafka ({:.2}× the peer); peak RSS {rss:.1} MB ({:.2}× the peer) | durable (fdatasync'd) after {durable:.1} s, all acknowledged by Kafka after {delivered:.1} s; each record is stamped (seq, event_id, time) |",
        rate / peer_rate,
        rss / peer_rss
    ));
}

fn main() {
    let broker = Broker::start();
    line(format!(
        "Lab software and the status page: the agent on one local tansu; `{}`.",
        std::env::consts::ARCH
    ));
    line(String::new());
    ingest_api(&broker);
    status_page(&broker);
    peers(&broker);
}
