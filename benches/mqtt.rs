//! `scripts/bench`, MQTT section: QoS 1 messages per second through the agent to Kafka
//! acknowledgement (durable in the buffer before each MQTT ack), against a bare rumqttc
//! subscriber's receive rate on the same mosquitto in the same run, and the agent's RSS.
//!
//! Both sides drain the same kind of backlog: N QoS 1 messages queued by mosquitto for a
//! persistent session while its client was away. So the publisher's speed is out of the
//! figure, and both sides get the broker's full delivery rate (mosquitto
//! `max_inflight_messages 1000`, set by the harness; its default of 20 would bound both).
//!
//! A drain is over when the broker has taken the acks, not when the subscriber has read
//! the last message: mosquitto 2.0 sends a fast reader the backlog ahead of reading its
//! PUBACKs (three reads a PUBACK), and took as much CPU after the bare subscriber's last
//! message as before it. So the bare subscriber's clock stops when the broker answers a
//! QoS 1 publish it sent after its last ack (mosquitto handles one connection's packets
//! in order), and the agent's when mosquitto has gone quiet after the agent's last ack.
//! The receive rate alone is reported beside it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn options(url: &str, id: &str) -> MqttOptions {
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(30));
    o
}

/// CPU seconds (user + system) `pid` has used so far; 0 if unreadable.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu(&stat).map_or(0.0, |(_, secs)| secs)
}

/// When `pid` stopped using CPU: its CPU time is sampled every 5 ms until it has not
/// moved for 100 ms (or 5 s have passed); the instant of the last sample that saw it move,
/// or `since` if none did. The kernel counts CPU time in 10 ms ticks, so this is within
/// about 10 ms of when the work ended.
fn quiet_since(pid: u32, since: Instant) -> Instant {
    let mut last = since;
    let mut cpu = cpu_secs(pid);
    while last.elapsed() < Duration::from_millis(100) && since.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
        let now = cpu_secs(pid);
        if now > cpu {
            cpu = now;
            last = Instant::now();
        }
    }
    last
}

/// One bare subscriber's drain.
struct Drain {
    /// Messages per second from its first message to its last.
    received: f64,
    /// Messages per second from its first message until the broker had taken every ack.
    settled: f64,
    /// mosquitto's CPU seconds a message, before the last message and after it.
    broker_us: (f64, f64),
}

/// A bare rumqttc subscriber (automatic acks) receiving a backlog of `n` queued while it
/// was away; `broker` is mosquitto's pid.
fn bare_subscriber(url: &str, n: u64, tag: &str, broker: u32) -> Drain {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let id = format!("bench-bare-{tag}");
    rt.block_on(async {
        // Register the persistent session and its subscription, then go away.
        let (c, mut ev) = AsyncClient::new(options(url, &id), 100);
        c.subscribe("bench/+/v", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = ev.poll().await {
                break;
            }
        }
        c.disconnect().await.expect("disconnect");
        while ev.poll().await.is_ok() {}
    });
    publish_backlog(url, n, &format!("bench-pub-{tag}"));
    rt.block_on(async {
        let cpu0 = cpu_secs(broker);
        let (c, mut ev) = AsyncClient::new(options(url, &id), 100);
        let mut got = 0u64;
        let mut first = None;
        while got < n {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                }
                Ok(_) => {}
                Err(e) => panic!("bare subscriber: {e}"),
            }
        }
        let received = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
        let cpu1 = cpu_secs(broker);
        // Its acks are written; a publish behind them is answered once mosquitto has
        // read every one of them. The topic matches no subscription.
        c.publish("bench/settled", QoS::AtLeastOnce, false, "end")
            .await
            .expect("publish");
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("bare subscriber: {e}"),
            }
        }
        let settled = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
        let cpu2 = cpu_secs(broker);
        let per = |s: f64| s * 1e6 / n as f64;
        Drain {
            received: n as f64 / received,
            settled: n as f64 / settled,
            broker_us: (per(cpu1 - cpu0), per(cpu2 - cpu1)),
        }
    })
}

fn main() {
    let n = ((200_000.0 * scale()) as u64).max(10_000);
    let broker = Broker::start();
    let mqtt = Mosquitto::start();
    let url = mqtt.url();
    let mut out = String::new();
    let mut line = |s: String| {
        eprintln!("{s}");
        out.push_str(&s);
        out.push('\n');
    };

    let mosquitto = mqtt.pid().expect("mosquitto's pid");
    let base1 = bare_subscriber(&url, n, "a", mosquitto);

    // The agent: a persistent session registered, then away while the backlog queues.
    let dir = tempdir();
    let topics = Topics::new();
    for t in topics.outputs().iter().chain([topics.commands()].iter()) {
        broker.create_topics(&[t]);
    }
    let extra = mqtt_number_device(&url, "mqtt-bench", "labgate-bench", "bench/+id/v", "v");
    let mut cfg = agent_config(
        dir.path(),
        "agent-mqtt-bench",
        &broker.addr(),
        &topics,
        free_port(),
        &extra,
    );
    cfg = cfg.replace("level = \"info,labgate=debug\"", "level = \"warn\"");
    cfg = cfg.replace(
        "commands_offset_reset",
        "commands_enabled = false\ncommands_offset_reset",
    );
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("MQTT connected", Duration::from_secs(30), |s| {
        s["devices"]["mqtt-bench"]["state"] == "running"
    });
    // The agent's producer fetches its producer id first (about 0.6 s on tansu), and
    // the bare producer's rate leaves that set-up out: the backlog queues while the
    // running agent is frozen (SIGSTOP), not while it is down, so that it meets the
    // backlog set up, as it would after an outage of the MQTT broker or the network.
    agent.wait_status("Kafka connected", Duration::from_secs(30), |s| {
        s["kafka"]["connected"] == true
    });
    std::thread::sleep(Duration::from_millis(1500));
    signal_process(agent.pid(), "-STOP");
    publish_backlog(&url, n, "bench-pub-agent");
    let broker_cpu0 = cpu_secs(mosquitto);
    signal_process(agent.pid(), "-CONT");
    let mut t0 = None;
    let mut peak_rss = 0;
    let t_start = Instant::now();
    let done = loop {
        let s = agent.status();
        peak_rss = peak_rss.max(rss_kib(agent.pid(), "VmRSS:"));
        let received = s["devices"]["mqtt-bench"]["mqtt"]["messages"]
            .as_u64()
            .unwrap_or(0);
        if received > 0 && t0.is_none() {
            t0 = Some(Instant::now());
        }
        let delivered = s["kafka"]["records_delivered"].as_u64().unwrap_or(0);
        let acked = s["devices"]["mqtt-bench"]["mqtt"]["acked"]
            .as_u64()
            .unwrap_or(0);
        if delivered >= n && acked >= n {
            break Instant::now();
        }
        assert!(
            t_start.elapsed() < Duration::from_secs(900),
            "agent never drained the backlog: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The agent's last acks are written; the drain is over when mosquitto has read them.
    let broker_cpu1 = cpu_secs(mosquitto);
    let settled = quiet_since(mosquitto, done);
    let broker_cpu2 = cpu_secs(mosquitto);
    let start = t0.unwrap_or(t_start);
    let agent_rate = n as f64 / (settled - start).as_secs_f64();
    let agent_acked_rate = n as f64 / (done - start).as_secs_f64();
    let hwm = rss_kib(agent.pid(), "VmHWM:");
    let idle_rss = {
        std::thread::sleep(Duration::from_secs(2));
        rss_kib(agent.pid(), "VmRSS:")
    };
    agent.terminate();

    let base2 = bare_subscriber(&url, n, "b", mosquitto);
    // The Kafka side alone: the bare producer every other rate is compared with, on the
    // same tansu. tansu itself takes about 1 % of the box here (perf, BENCHMARKS.md), so
    // this is how fast a client that only produces runs on this machine, not a ceiling
    // the broker sets.
    let produce_topic = format!("bench_base_{}", uuid::Uuid::new_v4().simple());
    broker.create_topics(&[&produce_topic]);
    let _ = baseline(&broker.addr(), &produce_topic, 20_000, Payloads::Readings); // warm-up
    let producer = baseline(&broker.addr(), &produce_topic, n, Payloads::Readings);
    // A third subscriber run: the subscriber's rate moves by a factor of two between runs
    // on this machine, so the ratio is to the median of three, with its range.
    let base3 = bare_subscriber(&url, n, "c", mosquitto);
    let bases = [&base1, &base2, &base3];
    let (settled_med, settled_lo, settled_hi) = median3(bases.map(|b| b.settled));
    let (recv_med, recv_lo, recv_hi) = median3(bases.map(|b| b.received));
    let per = |s: f64| s * 1e6 / n as f64;
    line(format!(
        "MQTT: mosquitto {} on loopback (max_inflight_messages 1000), {n} QoS 1 messages queued for each client's persistent session, then drained.",
        mosquitto_version()
    ));
    line(String::new());
    line(format!(
        "| MQTT QoS 1 → Kafka ack, durable before each MQTT ack (`mqtt` device, number mapping), until the broker has read the last ack | {:.0} msg/s | {:.2} × the bare subscriber's settled drain (median; goal ≥ 0.5), range {:.2}–{:.2}; {:.2} × its receive rate (range {:.2}–{:.2}); {:.0} msg/s counted to the agent's last ack, mosquitto quiet {:.0} ms after it |",
        agent_rate,
        agent_rate / settled_med,
        agent_rate / settled_hi,
        agent_rate / settled_lo,
        agent_rate / recv_med,
        agent_rate / recv_hi,
        agent_rate / recv_lo,
        agent_acked_rate,
        (settled - done).as_secs_f64() * 1e3,
    ));
    line(format!(
        "| bare rumqttc subscriber, automatic acks, drain settled: from its first message until the broker answered a QoS 1 publish sent after its last ack (baseline; median of 3 in this run) | {:.0} msg/s | the three: {:.0} / {:.0} / {:.0} msg/s (before the agent, after it, after the bare producer) |",
        settled_med, base1.settled, base2.settled, base3.settled
    ));
    line(format!(
        "| the same subscribers' receive rate: from their first message to their last, the broker still reading their acks | {:.0} msg/s | the three: {:.0} / {:.0} / {:.0} msg/s; range {:.0}–{:.0} |",
        recv_med, base1.received, base2.received, base3.received, recv_lo, recv_hi
    ));
    line(format!(
        "| mosquitto's CPU a message (user + system) | agent {:.1} µs | the bare subscribers {} µs before their last message + {} µs after it, until the broker had their acks; the agent's {:.1} + {:.1} µs |",
        per(broker_cpu2 - broker_cpu0),
        bases
            .iter()
            .map(|b| format!("{:.1}", b.broker_us.0))
            .collect::<Vec<_>>()
            .join(" / "),
        bases
            .iter()
            .map(|b| format!("{:.1}", b.broker_us.1))
            .collect::<Vec<_>>()
            .join(" / "),
        per(broker_cpu1 - broker_cpu0),
        per(broker_cpu2 - broker_cpu1),
    ));
    line(format!(
        "| bare rdkafka producer, the agent's settings, {n} msgs, acks awaited, counted from its first delivery (the Kafka side alone, after the agent) | {:.0} msg/s | the agent's MQTT rate is {:.2} × it; the subscriber's settled drain {:.2} × it, its receive rate {:.2} × it |",
        producer,
        agent_rate / producer,
        settled_med / producer,
        recv_med / producer
    ));
    line(format!(
        "| agent RSS while draining the MQTT backlog (peak / VmHWM / idle after) | {:.1} MB | {:.1} / {:.1} MB |",
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        idle_rss as f64 / 1024.0
    ));
    print!("{out}");
}

fn mosquitto_version() -> String {
    std::process::Command::new(mosquitto_bin())
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("mosquitto version ").to_string())
        })
        .unwrap_or_default()
}
