//! Diagnostic: RSS and disk of a buffer as its backlog grows (nothing is read or acked).
//! `cargo run --release --example backlog_probe -- <records> <dir>`; `MAX_BYTES` sets
//! `buffer.max_bytes` (default 8 GiB), `CHUNK` and `CACHE` the chunk size and cache;
//! `HOLD_AT_EXIT` exits with the buffer open, so a heap profiler lists what it holds.
use std::time::SystemTime;

use labgate::buffer::{Buffer, BufferConfig};
use labgate::record::{stamp, Body, Draft};

fn rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let dir = std::path::PathBuf::from(args.get(2).cloned().unwrap_or("/tmp/probe".into()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = BufferConfig {
        max_bytes: std::env::var("MAX_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8 << 30),
        records_per_chunk: std::env::var("CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64),
        cache_capacity: std::env::var("CACHE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4 << 20),
        ..BufferConfig::default()
    };
    let b = Buffer::open(&dir, &cfg).expect("open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let batch = 4096u64;
    let mut seq = 0;
    let mut next_report = 0;
    println!("records,rss_mb,disk_mb,encoded_mb,cap_mb,dir_mb");
    while seq < n {
        let recs: Vec<_> = (0..batch)
            .map(|i| {
                let d = Draft::new(
                    "env-bench",
                    Body::SensorReading {
                        sensor_id: format!("temp-{}", i % 4),
                        sensor_type: "temperature".into(),
                        value: 22.0 + ((seq + i) as f64 * 0.37).sin(),
                        unit: "°C".into(),
                        location: None,
                        metadata: Default::default(),
                    },
                );
                stamp(&d, "agent-bench", seq + i, SystemTime::now()).expect("stamp")
            })
            .collect();
        b.append(&recs, 0).expect("append");
        seq += batch;
        if seq % (batch * 5) == 0 {
            rt.block_on(b.flush()).expect("flush");
        }
        if seq >= next_report {
            let st = b.stats();
            let disk = st.disk_bytes as f64 / 1048576.0;
            println!(
                "{seq},{:.1},{disk:.0},{:.0},{:.0},{:.0}",
                rss_mb(),
                st.bytes as f64 / 1048576.0,
                st.cap_bytes as f64 / 1048576.0,
                labgate::buffer::allocated_bytes(&dir) as f64 / 1048576.0
            );
            next_report += 1_000_000;
        }
    }
    rt.block_on(b.flush()).expect("flush");
    println!(
        "{seq},{:.1},{:.0}",
        rss_mb(),
        b.stats().disk_bytes as f64 / 1048576.0
    );
    if std::env::var_os("HOLD_AT_EXIT").is_some() {
        // Exit with the buffer open: a heap profiler then reports everything it holds.
        std::process::exit(0);
    }
}
