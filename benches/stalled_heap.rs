//! A profiling harness, not part of `scripts/bench`: one agent with a simulated sensor
//! set at full speed, the broker stalled (SIGSTOP) until `LABGATE_STALL_RECORDS`
//! (default 2,000,000) records are buffered. It prints the records buffered and the
//! agent's peak RSS; `LABGATE_STALL_SMAPS=<file>` keeps a copy of the agent's
//! `/proc/<pid>/smaps` at that point, and `LABGATE_AGENT_ENV` hands the agent a heap
//! profiler's preload (BENCHMARKS.md, "Memory against the backlog", gives the commands).
//! `LABGATE_STALL_AFTER_SECS=<s>` lets the broker take records at full speed for that
//! long before stalling it (a broker that stops in the middle of a flow).
//! `LABGATE_STALL_AT_CAP_SECS=<s>` keeps it stalled for that long after the buffer is full
//! (`drop_oldest` making room; set `LABGATE__BUFFER__MAX_BYTES` through
//! `LABGATE_AGENT_ENV` to reach the cap sooner), printing records, drops and RSS every 5 s.

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
    let mut peak = 0;
    if let Some(secs) = std::env::var("LABGATE_STALL_AFTER_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        // The broker takes records at full speed for that long before it stops.
        peak = peak_rss_over(agent.pid(), Duration::from_secs(secs));
        let st = agent.status();
        println!(
            "flowing for {secs} s: {} delivered, {} buffered, peak RSS {:.1} MB",
            st["kafka"]["records_delivered"],
            st["buffer"]["records"],
            peak as f64 / 1024.0
        );
    }
    broker.stall();
    let target: u64 = std::env::var("LABGATE_STALL_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let t0 = Instant::now();
    let at_cap: Option<u64> = std::env::var("LABGATE_STALL_AT_CAP_SECS")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut cap_since: Option<Instant> = None;
    let mut last_print = Instant::now();
    let recs = loop {
        let st = agent.status();
        let recs = st["buffer"]["records"].as_u64().unwrap_or(0);
        let rss = rss_kib(agent.pid(), "VmRSS:");
        peak = peak.max(rss);
        let dropped = st["records_dropped"].as_u64().unwrap_or(0);
        if at_cap.is_some() && last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "{:.0} s: {recs} records buffered, {dropped} dropped, RSS {:.1} MB",
                t0.elapsed().as_secs_f64(),
                rss as f64 / 1024.0
            );
        }
        match at_cap {
            Some(secs) => {
                if dropped > 0 && cap_since.is_none() {
                    cap_since = Some(Instant::now());
                }
                if cap_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(secs)) {
                    break recs;
                }
            }
            None if recs >= target => break recs,
            None => {}
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
    println!(
        "memory trims: {} in {:.3} s, {:.1} MB given back",
        agent.metric("labgate_memory_trims_total"),
        agent.metric("labgate_memory_trim_seconds_total"),
        agent.metric("labgate_memory_released_bytes_total") / 1e6
    );
    if let Ok(path) = std::env::var("LABGATE_STALL_SMAPS") {
        std::fs::copy(format!("/proc/{}/smaps", agent.pid()), &path).expect("copy smaps");
    }
    agent.terminate();
    broker.unstall();
}
