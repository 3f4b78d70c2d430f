//! Where the agent's CPU goes at full load: sensors at full speed into a live tansu for
//! `LABGATE_CPU_SECS` (default 15) seconds, or with `LABGATE_CPU_DRAIN=1` a backlog of
//! 1,000,000 records buffered with the broker stalled and then released, or with
//! `LABGATE_CPU_MQTT=<n>` a backlog of n QoS 1 messages queued by mosquitto for the
//! agent's MQTT session while it was frozen, then drained to Kafka. Prints the rate, the
//! agent's CPU by thread name, tansu's, and how idle the machine was. With
//! `LABGATE_CPU_BASE=1` it runs the benchmark's baseline instead, the bare producer with
//! 4,000,000 readings (about 10 s here), in this process, and prints the same for it.
//!
//!   cp target/release/labgate /tmp/labgate && LABGATE_BIN=/tmp/labgate cargo bench --bench cpu_split
//!   LABGATE_BIN=<a build with line tables> LABGATE_CPU_PERF=/tmp/perf.data cargo bench --bench cpu_split
//!
//! Give it a copy of the binary, as `scripts/bench` does: `cargo bench` links its own
//! build of the agent to `target/release/labgate`, and that build's symbols do not match
//! `link/hot-text.ld` (its `.text.hot` is 2.8 MB instead of 6.5), so it is not the
//! binary that ships.
//!
//! With `LABGATE_CPU_PERF` the window is recorded by `perf record` (stack call graphs)
//! into that file. A probe for finding costs, not a goal: `scripts/bench` does not run it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// CPU seconds (user + system) by thread name, summed over threads of the same name.
fn cpu_by_thread(pid: u32) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some((name, secs)) = stat_cpu(&stat) {
            *by_name.entry(name.to_string()).or_insert(0.0) += secs;
        }
    }
    by_name
}

/// The machine's idle and total jiffies so far (`/proc/stat`).
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    (cpu[3] + cpu[4], cpu.iter().sum())
}

fn main() {
    let broker = Broker::start();
    let brokers = broker.addr();
    let tansu = broker.pid();
    let dir = tempdir();
    let topics = Topics::new();
    for t in topics.outputs().iter().chain([topics.commands()].iter()) {
        broker.create_topics(&[t]);
    }
    let config = |devices: &str| {
        agent_config(
            dir.path(),
            "agent-cpu",
            &brokers,
            &topics,
            free_port(),
            devices,
        )
        .replace("level = \"info,labgate=debug\"", "level = \"warn\"")
    };

    if let Ok(n) = std::env::var("LABGATE_CPU_MQTT") {
        let n: u64 = n.parse().expect("LABGATE_CPU_MQTT: a message count");
        let mqtt = Mosquitto::start();
        let url = mqtt.url();
        let extra = mqtt_number_device(&url, "mqtt-cpu", "labgate-cpu", "bench/+id/v", "v");
        let cfg = config(&extra).replace(
            "commands_offset_reset",
            "commands_enabled = false\ncommands_offset_reset",
        );
        let mut agent = Agent::start(dir.path(), &cfg);
        agent.wait_status("MQTT and Kafka connected", Duration::from_secs(30), |s| {
            s["devices"]["mqtt-cpu"]["state"] == "running" && s["kafka"]["connected"] == true
        });
        std::thread::sleep(Duration::from_millis(1500));
        // The backlog queues for the agent's persistent session while it is frozen.
        signal_process(agent.pid(), "-STOP");
        publish_backlog(&url, n, "cpu-pub");
        let mosquitto = mqtt.pid().expect("mosquitto runs");
        let others = || {
            let sum = |pid| cpu_by_thread(pid).values().sum::<f64>();
            (sum(mosquitto), sum(tansu))
        };
        let (c0, m0, o0) = (cpu_by_thread(agent.pid()), machine_jiffies(), others());
        let t0 = Instant::now();
        signal_process(agent.pid(), "-CONT");
        let f0 = agent.metric("labgate_buffer_flushes_total");
        let perf = std::env::var("LABGATE_CPU_PERF").ok().map(|out| {
            perf_record(&out, &format!("{},{mosquitto}", agent.pid()))
                .spawn()
                .expect("perf")
        });
        let (mut received_all, mut acked_all) = (None, None);
        loop {
            let s = agent.status();
            let m = &s["devices"]["mqtt-cpu"]["mqtt"];
            if received_all.is_none() && m["messages"].as_u64() >= Some(n) {
                received_all = Some(t0.elapsed());
            }
            if acked_all.is_none() && m["acked"].as_u64() >= Some(n) {
                acked_all = Some(t0.elapsed());
            }
            if s["kafka"]["records_delivered"].as_u64() >= Some(n) && acked_all.is_some() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "never drained: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let secs = t0.elapsed().as_secs_f64();
        let flushes = agent.metric("labgate_buffer_flushes_total") - f0;
        let o1 = others();
        if let Some(mut perf) = perf {
            signal_process(perf.id(), "-INT");
            let _ = perf.wait();
        }
        println!(
            "MQTT: {n} messages; all received at {:.2} s, all acked at {:.2} s, all delivered at {secs:.2} s: {:.0} msg/s",
            received_all.map_or(f64::NAN, |d| d.as_secs_f64()),
            acked_all.map_or(f64::NAN, |d| d.as_secs_f64()),
            n as f64 / secs
        );
        println!(
            "  {flushes:.0} group commits: {:.0} messages and {:.2} ms each",
            n as f64 / flushes,
            1000.0 * secs / flushes
        );
        println!(
            "  mosquitto          {:5.1} % of a core",
            100.0 * (o1.0 - o0.0) / secs
        );
        report(
            &cpu_by_thread(agent.pid()),
            &c0,
            m0,
            secs,
            Some(o1.1 - o0.1),
        );
        agent.terminate();
        return;
    }

    if std::env::var_os("LABGATE_CPU_BASE").is_some() {
        // The bare producer (the benchmark's baseline) in this process, measured the
        // same way: what librdkafka and tansu cost per message without the agent.
        let topic = topics.outputs()[0].clone();
        let _ = baseline(&brokers, &topic, 20_000, Payloads::Readings);
        // The whole process's CPU: librdkafka's threads end with the producer, and a
        // thread that has ended is no longer listed by name.
        let own_cpu = || {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            stat_cpu(&stat).map_or(0.0, |(_, secs)| secs)
        };
        let (c0, t0c, m0) = (own_cpu(), cpu_by_thread(tansu), machine_jiffies());
        let t0 = Instant::now();
        let rate = baseline(&brokers, &topic, 4_000_000, Payloads::Readings);
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "bare producer: {rate:.0} msg/s (4,000,000 readings, counted from its first delivery)"
        );
        println!(
            "  producer in all    {:5.1} % of a core (its set-up included: stamping 65,536 readings, the producer-id fetch)",
            100.0 * (own_cpu() - c0) / secs
        );
        let tansu_secs: f64 =
            cpu_by_thread(tansu).values().sum::<f64>() - t0c.values().sum::<f64>();
        report_machine(m0, secs, Some(tansu_secs));
        return;
    }

    if std::env::var_os("LABGATE_CPU_DRAIN").is_some() {
        let n: u64 = 1_000_000;
        let cfg = config(&sensors_device("env-1", "0s", Some(n / 2))).replace(
            "commands_offset_reset",
            "commands_enabled = false\ncommands_offset_reset",
        );
        broker.stall();
        let mut agent = Agent::start(dir.path(), &cfg);
        agent.wait_status("backlog buffered", Duration::from_secs(600), |s| {
            s["records_buffered"].as_u64() == Some(n)
        });
        broker.unstall();
        let (t0, d0) = loop {
            let d = agent.metric("labgate_records_delivered_total") as u64;
            if d > 0 {
                break (Instant::now(), d);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let (c0, m0) = (cpu_by_thread(agent.pid()), machine_jiffies());
        while (agent.metric("labgate_records_delivered_total") as u64) < n {
            assert!(t0.elapsed() < Duration::from_secs(300), "never drained");
            std::thread::sleep(Duration::from_millis(20));
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "drain: {:.0} records/s from the first delivery",
            (n - d0.min(n)) as f64 / secs
        );
        report(&cpu_by_thread(agent.pid()), &c0, m0, secs, None);
        agent.terminate();
        return;
    }

    let secs: u64 = std::env::var("LABGATE_CPU_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let cfg = config(&sensors_device("env-1", "0s", None));
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("delivering", Duration::from_secs(60), |s| {
        s["kafka"]["records_delivered"].as_u64() > Some(50_000)
    });
    let d0 = agent.metric("labgate_records_delivered_total");
    let (c0, t0c, m0) = (
        cpu_by_thread(agent.pid()),
        cpu_by_thread(tansu),
        machine_jiffies(),
    );
    let t0 = Instant::now();
    let peak = match std::env::var("LABGATE_CPU_PERF") {
        Ok(out) => {
            let status = perf_record(&out, &agent.pid().to_string())
                .args(["--", "sleep", &secs.to_string()])
                .status()
                .expect("perf");
            assert!(status.success(), "perf record failed");
            None
        }
        Err(_) => Some(peak_rss_over(agent.pid(), Duration::from_secs(secs))),
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let d1 = agent.metric("labgate_records_delivered_total");
    println!(
        "end to end: {:.0} records/s; {} still buffered{}",
        (d1 - d0) / elapsed,
        agent.status()["buffer"]["records"],
        peak.map(|p| format!("; peak RSS {:.1} MB", p as f64 / 1024.0))
            .unwrap_or_default()
    );
    let tansu_secs: f64 = cpu_by_thread(tansu).values().sum::<f64>() - t0c.values().sum::<f64>();
    report(
        &cpu_by_thread(agent.pid()),
        &c0,
        m0,
        elapsed,
        Some(tansu_secs),
    );
    agent.terminate();
}

/// `perf record` of the processes `pids` (comma-separated) into `out`, with call
/// graphs from the stack (the release build has no frame pointers).
fn perf_record(out: &str, pids: &str) -> std::process::Command {
    let mut c = std::process::Command::new("perf");
    c.args([
        "record",
        "-F",
        "499",
        "--call-graph",
        "dwarf,16384",
        "-o",
        out,
        "-p",
        pids,
    ]);
    c
}

fn report(
    now: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
    machine_before: (f64, f64),
    secs: f64,
    tansu_secs: Option<f64>,
) {
    let mut total = 0.0;
    for (name, cpu) in now {
        let used = cpu - before.get(name).unwrap_or(&0.0);
        total += used;
        if used > 0.01 * secs {
            println!("  {name:18} {:5.1} % of a core", 100.0 * used / secs);
        }
    }
    println!(
        "  agent in all       {:5.1} % of a core",
        100.0 * total / secs
    );
    report_machine(machine_before, secs, tansu_secs);
}

/// tansu's CPU over the window, and how idle the machine was since `machine_before`.
fn report_machine(machine_before: (f64, f64), secs: f64, tansu_secs: Option<f64>) {
    let machine = machine_jiffies();
    if let Some(t) = tansu_secs {
        println!("  tansu              {:5.1} % of a core", 100.0 * t / secs);
    }
    println!(
        "  machine idle       {:5.1} % of all cores",
        100.0 * (machine.0 - machine_before.0) / (machine.1 - machine_before.1)
    );
}
