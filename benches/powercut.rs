//! `scripts/bench`, power-cut soak: the agent reads MQTT QoS 1 readings into a data dir on
//! the fault filesystem (tests/common/faultfs.rs: only fsync makes data durable), and
//! the power is cut again and again at random moments, a third of the time while Kafka
//! is stalled so that acknowledged readings sit only in the buffer. After the last cut
//! every reading the broker accepted must be in Kafka, and no (device, seq) may appear
//! with two different messages.
//!
//! LABGATE_SOAK_CYCLES sets the number of cuts (default 100, scaled by
//! LABGATE_BENCH_SCALE with a floor of 10). Prints Markdown table rows.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faultfs::FaultFs;
use common::*;
use labgate::devices::simulated::Rng;

fn main() {
    let cycles: u64 = std::env::var("LABGATE_SOAK_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| ((100.0 * scale()) as u64).max(10));
    let broker = Broker::start();
    let mqtt = Mosquitto::start();
    let topics = Topics::new();
    let mut fs = FaultFs::new();
    let dir = tempdir();
    let url = mqtt.url();
    let extra = mqtt_number_device(
        &url,
        "mqtt-soak",
        "labgate-soak",
        "soak/+id/counter",
        "counter",
    );
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(
            &fs.mountpoint,
            "agent-soak",
            &broker.addr(),
            &topics,
            free_port(),
            &extra,
        ),
    );
    // A steady publisher for the whole soak: every value the broker acks to it is a
    // reading the lab was promised.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (stop, published, url) = (stop.clone(), published.clone(), url.clone());
        std::thread::spawn(move || {
            let p = MqttClient::connect(&url, "soak-publisher");
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                for _ in 0..20 {
                    p.publish("soak/c1/counter", i.to_string(), false);
                    i += 1;
                }
                published.store(i, Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            p.wait_acked(i, Duration::from_secs(120));
            i
        })
    };
    let mut rng = Rng::new(0x50a6);
    let mut agent_acked = 0.0;
    let mut stalled_cuts = 0;
    let t0 = Instant::now();
    for c in 0..cycles {
        let run_for = Duration::from_millis(200 + rng.next_u64() % 1300);
        let stall = c % 3 == 2;
        if stall {
            broker.stall();
            stalled_cuts += 1;
        }
        std::thread::sleep(run_for);
        agent_acked += agent.metric("labgate_mqtt_acked_total{device=\"mqtt-soak\"}");
        agent.kill9();
        fs.power_cut();
        fs.mount();
        if stall {
            broker.unstall();
        }
        agent.spawn();
    }
    let soak_secs = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    let acknowledged = publisher.join().expect("publisher");
    let mut reader = Reader::new(&broker.addr(), &topics.outputs());
    let deadline = Instant::now() + Duration::from_secs(300);
    while counter_values(reader.drain_for(Duration::from_secs(1))).len() < acknowledged as usize
        && Instant::now() < deadline
    {}
    reader.drain_for(Duration::from_secs(2));
    agent_acked += agent.metric("labgate_mqtt_acked_total{device=\"mqtt-soak\"}");
    let delivered = counter_values(&reader.msgs);
    let lost = (0..acknowledged).filter(|v| !delivered.contains(v)).count();
    // No seq may come back as another record (copies sent again are compared without
    // the replay marks they may carry).
    let seen = by_seq(&reader.msgs);
    let (changed, marked_again) = (seen.changed.len(), seen.marked_again);
    let total_msgs = reader.msgs.len();
    agent.terminate();
    println!(
        "| power-cut soak: {cycles} cuts in {soak_secs:.0} s ({stalled_cuts} while Kafka was stalled), MQTT QoS 1 readings, data dir on the fault filesystem | acknowledged {acknowledged}, delivered {}, lost {lost} | goal lost = 0; the agent acked {agent_acked:.0} MQTT messages over all runs (redeliveries included); {total_msgs} messages read back, {changed} (device, seq) pairs seen with two different records (goal 0; {marked_again} copies sent again carried the replay marks, compared without them) |",
        delivered.len()
    );
    assert_eq!(lost, 0, "readings lost across power cuts");
    assert_eq!(
        changed,
        0,
        "a seq came back with other contents, e.g.\n{}",
        seen.changed[..changed.min(4)].join("\n")
    );
}
