//! What the benchmarks share: their scale, the agent's memory and the bare producer
//! every rate is compared with.

use std::time::{Instant, SystemTime};

use futures_util::stream::{FuturesUnordered, StreamExt};
use labgate::record::{stamp, Body, Draft, Stored};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Benchmarks: `LABGATE_BENCH_SCALE` (1.0 = the documented sizes).
pub fn scale() -> f64 {
    std::env::var("LABGATE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`); 0 if unreadable.
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A task's name and CPU seconds (user + system) from the text of its `/proc/<pid>/stat`
/// or `/proc/<pid>/task/<tid>/stat`; `None` if it does not parse.
pub fn stat_cpu(stat: &str) -> Option<(&str, f64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // Fields 14 and 15 of stat (utime, stime), counted after the name; USER_HZ is 100.
    Some((
        stat.get(open + 1..close)?,
        (ticks(11)? + ticks(12)?) / 100.0,
    ))
}

/// The median of three, and the lowest and highest.
pub fn median3(mut v: [f64; 3]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[1], v[0], v[2])
}

/// The highest `VmRSS` of `pid` (KiB) over `d`, sampled every 200 ms.
pub fn peak_rss_over(pid: u32, d: std::time::Duration) -> u64 {
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < d {
        peak = peak.max(rss_kib(pid, "VmRSS:"));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    peak
}

/// `words` × 16 hex digits of xorshift noise from `seed`: text lz4 cannot shrink.
pub fn incompressible_hex(seed: u64, words: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{x:016x}")
        })
        .collect()
}

/// A sensor reading exactly as the agent encodes it (the size both paths send).
pub fn sample_record(seq: u64) -> Stored {
    let d = Draft::new(
        "env-bench",
        Body::SensorReading {
            sensor_id: "temp-env-bench".into(),
            sensor_type: "temperature".into(),
            value: 22.123456789,
            unit: "°C".into(),
            location: None,
            metadata: Default::default(),
        },
    );
    stamp(&d, "agent-bench", seq, SystemTime::now()).expect("stamp")
}

/// The `i`-th of four temperature sensors' readings, each value different, so chunks
/// compress as real readings do (about fourfold).
pub fn varied_reading(i: u64) -> Draft {
    Draft::new(
        "env-bench",
        Body::SensorReading {
            sensor_id: format!("temp-{}", i % 4),
            sensor_type: "temperature".into(),
            value: 22.0 + (i as f64 * 0.37).sin(),
            unit: "°C".into(),
            location: None,
            metadata: Default::default(),
        },
    )
}

/// What the bare producer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payloads {
    /// Readings as the agent stamps them, each with its own value, seq and time: a pool
    /// of [`READING_POOL`] stamped before the clock starts, sent in turn. The stream
    /// compresses as the agent's does (lz4, about 75 bytes a message in batches of
    /// about 2,000).
    Readings,
    /// One stamped reading sent again and again, as every baseline before the
    /// twenty-third session did. Its batches compress six times better than any real
    /// stream's (about 12 bytes a message), which spares the producer's compression and
    /// the broker's writes; kept only to show what the change of baseline moved.
    Constant,
}

/// Distinct readings in the bare producer's pool: about 20 MB, repeated 20 MB apart,
/// far beyond lz4's 64 KiB window and any batch.
pub const READING_POOL: u64 = 65_536;

/// The baseline: one FutureProducer with the agent's settings and its default in-flight
/// window (`kafka.max_in_flight`), the same key and headers, payloads of the same size
/// (and with [`Payloads::Readings`] the same content), acks awaited.
///
/// The rate is the producer's steady one, as the agent's figures are: the clock starts
/// when the first message has been delivered. Before it, an idempotent producer fetches
/// its producer id, which takes about 0.6 s on tansu and would otherwise count as
/// sending time (a third of a 500,000-message run).
pub fn baseline(broker: &str, topic: &str, n: u64, payloads: Payloads) -> f64 {
    // `kafka.max_in_flight`'s default: the agent queues at most twice that in librdkafka.
    let window = 4_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", broker)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.codec", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", (window * 2).to_string())
            .create()
            .expect("producer");
        let payloads: Vec<Vec<u8>> = match payloads {
            Payloads::Readings => {
                // A run shorter than the pool sends each reading once: stamp no more.
                let now = SystemTime::now();
                (0..READING_POOL.min(n))
                    .map(|i| {
                        stamp(&varied_reading(i), "agent-bench", i, now)
                            .expect("stamp")
                            .payload
                    })
                    .collect()
            }
            Payloads::Constant => vec![sample_record(0).payload],
        };
        let mut inflight: FuturesUnordered<rdkafka::producer::DeliveryFuture> =
            FuturesUnordered::new();
        // Waits for one delivery; the baseline must not count a failed one.
        async fn settle_one(inflight: &mut FuturesUnordered<rdkafka::producer::DeliveryFuture>) {
            inflight
                .next()
                .await
                .expect("future")
                .expect("delivered")
                .expect("ok");
        }
        let mut start = Instant::now();
        for i in 0..n {
            if i == 1 {
                // The first delivery: the producer is set up; from here on, the rate.
                settle_one(&mut inflight).await;
                start = Instant::now();
            }
            while inflight.len() >= window {
                settle_one(&mut inflight).await;
            }
            let key = format!("temperature:temp-{}", i % 2);
            loop {
                // The same four headers the agent sends: the same message, byte for byte
                // in size.
                let headers = OwnedHeaders::new_with_capacity(4)
                    .insert(Header {
                        key: "content-type",
                        value: Some("application/json"),
                    })
                    .insert(Header {
                        key: "schema-version",
                        value: Some("1"),
                    })
                    .insert(Header {
                        key: "agent-id",
                        value: Some("agent-bench"),
                    })
                    .insert(Header {
                        key: "device-id",
                        value: Some("env-bench"),
                    });
                match p.send_result(
                    FutureRecord::to(topic)
                        .key(&key)
                        .payload(&payloads[(i % payloads.len() as u64) as usize])
                        .headers(headers),
                ) {
                    Ok(f) => {
                        inflight.push(f);
                        break;
                    }
                    Err(_) => settle_one(&mut inflight).await,
                }
            }
        }
        while let Some(r) = inflight.next().await {
            r.expect("delivered").expect("ok");
        }
        n.saturating_sub(1).max(1) as f64 / start.elapsed().as_secs_f64()
    })
}
