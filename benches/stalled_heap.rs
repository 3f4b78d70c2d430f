//! A profiling harness, not part of `scripts/bench`: one agent with a simulated sensor
//! set at full speed, the broker stalled (SIGSTOP) until `LABGATE_STALL_RECORDS`
//! (default 2,000,000) records are buffered. It prints the records buffered and the
//! agent's peak RSS; `LABGATE_STALL_SMAPS=<file>` keeps a copy of the agent's
//! `/proc/<pid>/smaps` at that point, and `LABGATE_AGENT_ENV` hands the agent a heap
//! profiler's preload (BENCHMARKS.md, "Memory against the backlog", gives the commands).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

fn main() {
    let broker = Broker::start();
    let dir = tempdir();
    let topics = Topics::new();
    for t in topics.outputs().iter().chain([topics.commands()].iter()) {
        broker.create_topics(&[t]);
    }
    let extra = format!(
        "[buffer]\nmax_bytes = 1500000000\n\n{}",
        sensors_device("env-1", "0s", None)
    );
    let cfg = agent_config(
        dir.path(),
        "agent-stalled",
        &broker.addr(),
        &topics,
        free_port(),
        &extra,
    )
    .replace("level = \"info,labgate=debug\"", "level = \"warn\"")
    .replace(
        "commands_offset_reset",
        "commands_enabled = false\ncommands_offset_reset",
    );
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("up", Duration::from_secs(60), |s| s["buffer"].is_object());
    broker.stall();
    let target: u64 = std::env::var("LABGATE_STALL_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let t0 = Instant::now();
    let mut peak = 0;
    let recs = loop {
        let recs = agent.status()["buffer"]["records"].as_u64().unwrap_or(0);
        peak = peak.max(rss_kib(agent.pid(), "VmRSS:"));
        if recs >= target {
            break recs;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "only {recs} records buffered in 15 minutes"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "{recs} records buffered in {:.1} s with the broker stalled; agent peak RSS {:.1} MB",
        t0.elapsed().as_secs_f64(),
        peak as f64 / 1024.0
    );
    if let Ok(path) = std::env::var("LABGATE_STALL_SMAPS") {
        std::fs::copy(format!("/proc/{}/smaps", agent.pid()), &path).expect("copy smaps");
    }
    agent.terminate();
    broker.unstall();
}
