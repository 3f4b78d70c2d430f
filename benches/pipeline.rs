//! `scripts/bench`: every figure of the agent-core issue, measured in one run against one
//! local tansu. Prints a Markdown report on stdout (scripts/bench writes BENCHMARKS.md).
//!
//! Figures: a bare rdkafka producer (the baseline), the end-to-end durable rate, backlog
//! drain, durable ingest into the buffer alone, command latency, and peak RSS idle and
//! while draining. Sizes can be shrunk with LABGATE_BENCH_SCALE (1.0 = as documented).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use labgate::buffer::Buffer;
use labgate::config::BufferConfig;
use labgate::record::{stamp, Draft, Stored};
use serde_json::{json, Value};

fn scaled(n: u64) -> u64 {
    ((n as f64 * scale()) as u64).max(1000)
}

/// Durable ingest into the buffer alone: records appended in chunks of the default size and
/// group-committed every ~20 ms, on the calling thread. With `stamp_too` the clock also
/// runs while each record is stamped (seq, event_id, JSON); otherwise the records are
/// stamped beforehand (65,536 distinct records with fresh event_ids and varying values,
/// so compression sees realistic data) and only appending and flushing are timed.
fn buffer_ingest(n: u64, stamp_too: bool) -> f64 {
    buffer_ingest_with(n, stamp_too, Sync::Fdatasync).0
}

/// How a group commit ends.
#[derive(Clone, Copy, PartialEq)]
enum Sync {
    /// The agent's durability point: sled's flush, then fdatasync (buffer::store).
    Fdatasync,
    /// sled's flush alone (`sync_file_range`), as before the power-cut fix: the figure
    /// for comparison, not durable against a power cut.
    SledFlushOnly,
}

/// [`buffer_ingest`] with a choice of commit; also returns each commit's latency (ms).
fn buffer_ingest_with(n: u64, stamp_too: bool, sync: Sync) -> (f64, Vec<f64>) {
    let dir = tempdir();
    let b = Buffer::open(dir.path(), &BufferConfig::default()).expect("buffer");
    // The same sled store as the buffer's, for the sled-only commit.
    let store = b.side_tree("bench").expect("side tree").store;
    let mut commits = Vec::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let batch = 4096u64;
    let draft = varied_reading;
    // 16 batches of 4,096 distinct records, reused with only `seq` changed in place, so
    // the clock sees appends and flushes, not record construction.
    let mut pool: Vec<Vec<Stored>> = (0..16u64)
        .map(|k| {
            (0..batch)
                .map(|i| {
                    stamp(&draft(k * batch + i), "agent-bench", 0, SystemTime::now())
                        .expect("stamp")
                })
                .collect()
        })
        .collect();
    let drafts: Vec<Draft> = (0..batch).map(draft).collect();
    let start = Instant::now();
    let mut last_flush = Instant::now();
    let mut seq = 0;
    let mut k = 0;
    while seq < n {
        if stamp_too {
            let recs: Vec<Stored> = drafts
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    stamp(d, "agent-bench", seq + i as u64, SystemTime::now()).expect("stamp")
                })
                .collect();
            b.append(&recs, 0).expect("append");
        } else {
            let recs = &mut pool[k % 16];
            for (i, r) in recs.iter_mut().enumerate() {
                r.seq = seq + i as u64;
            }
            b.append(recs, 0).expect("append");
        }
        k += 1;
        seq += batch;
        if last_flush.elapsed() >= Duration::from_millis(20) {
            let t = Instant::now();
            match sync {
                Sync::Fdatasync => rt.block_on(b.flush()).expect("flush"),
                Sync::SledFlushOnly => {
                    rt.block_on(store.db().flush_async()).expect("flush");
                }
            }
            commits.push(t.elapsed().as_secs_f64() * 1e3);
            last_flush = Instant::now();
        }
    }
    rt.block_on(b.flush()).expect("flush");
    (seq as f64 / start.elapsed().as_secs_f64(), commits)
}

/// Group commits of single small records (what an MQTT ack or a command claim waits
/// for): latency of each commit, in ms.
fn commit_latency(n: usize, sync: Sync) -> Vec<f64> {
    let dir = tempdir();
    let b = Buffer::open(dir.path(), &BufferConfig::default()).expect("buffer");
    let store = b.side_tree("bench").expect("side tree").store;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u64 {
        b.append(&[sample_record(i)], 0).expect("append");
        let t = Instant::now();
        match sync {
            Sync::Fdatasync => rt.block_on(b.flush()).expect("flush"),
            Sync::SledFlushOnly => {
                rt.block_on(store.db().flush_async()).expect("flush");
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// End-to-end durable rate: sensors at full speed → buffer → broker ack, measured over a
/// steady 15 s; `buffer` is extra config (a `[buffer]` section) placed before the device.
/// Returns the rate, the records still buffered at the end and the agent's peak RSS
/// (KiB, sampled every 200 ms) over the 15 s.
fn end_to_end(brokers: &str, buffer: &str) -> (f64, u64, u64) {
    let dir = tempdir();
    let topics = Topics::new();
    let extra = format!("{buffer}{}", sensors_device("env-1", "0s", None));
    let mut cfg = agent_config(
        dir.path(),
        "agent-bench",
        brokers,
        &topics,
        free_port(),
        &extra,
    );
    cfg = cfg.replace("level = \"info,labgate=debug\"", "level = \"warn\"");
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_status("delivering", Duration::from_secs(60), |s| {
        s["kafka"]["records_delivered"].as_u64() > Some(50_000)
    });
    let d0 = agent.metric("labgate_records_delivered_total");
    let t0 = Instant::now();
    let peak = peak_rss_over(
        agent.pid(),
        Duration::from_secs_f64(15.0 * scale().max(0.3)),
    );
    let d1 = agent.metric("labgate_records_delivered_total");
    let rate = (d1 - d0) / t0.elapsed().as_secs_f64();
    let buffered = agent.status()["buffer"]["records"].as_u64().unwrap_or(0);
    agent.terminate();
    (rate, buffered, peak)
}

/// The builds a memory figure is measured for, each with its row's label: this one, then
/// the `dist` profile's (what gateways run) when scripts/bench built it.
fn builds(this: &'static str) -> Vec<(&'static str, std::path::PathBuf)> {
    let mut out = vec![(this, labgate_bin())];
    if let Some(dist) = std::env::var_os("LABGATE_DIST_BIN") {
        out.push((
            "the same, the `dist` build (opt-level \"s\", OpenSSL linked in: what ARM gateways run), x86_64",
            dist.into(),
        ));
    }
    out
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let mut out = String::new();
    let line = |out: &mut String, s: String| {
        eprintln!("{s}");
        out.push_str(&s);
        out.push('\n');
    };
    let broker = Broker::start();
    let b = broker.addr();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    line(
        &mut out,
        format!(
            "Machine: {cpu}, {cores} cores; tansu 0.6 (memory engine) on loopback; release build."
        ),
    );
    line(
        &mut out,
        format!(
            "Payload: a sensor reading as the agent encodes it, {} bytes of JSON.",
            sample_record(0).payload.len()
        ),
    );
    line(&mut out, String::new());

    // 1. Baseline, measured three times in the run (here, after the end-to-end figure,
    // after the drain); ratios use the median, and the spread is reported.
    let n_base = scaled(500_000);
    let topic = format!("bench_base_{}", uuid::Uuid::new_v4().simple());
    broker.create_topics(&[&topic]);
    // A warm-up. Each baseline point below also runs the old constant-payload
    // producer, so that the table shows what sending real readings changed, in the
    // same run.
    let _ = baseline(&b, &topic, 20_000, Payloads::Readings);
    let mut bases = vec![baseline(&b, &topic, n_base, Payloads::Readings)];
    let mut constant = vec![baseline(&b, &topic, n_base, Payloads::Constant)];
    // 2. End-to-end durable rate: sensors at full speed → buffer → broker ack.
    let (e2e, buffered, e2e_peak) = end_to_end(&b, "");
    // The same at 32 records a chunk (the default while published sled kept hundreds of
    // leaves resident), for the chunk-size trade-off, in the same run.
    let (e2e_32, _, _) = end_to_end(&b, "[buffer]\nrecords_per_chunk = 32\n\n");
    bases.push(baseline(&b, &topic, n_base, Payloads::Readings));
    constant.push(baseline(&b, &topic, n_base, Payloads::Constant));

    // 3. Backlog drain: 1M records buffered while the broker is stalled, then released.
    {
        let dir = tempdir();
        let topics = Topics::new();
        for t in topics.outputs().iter().chain([topics.commands()].iter()) {
            broker.create_topics(&[t]);
        }
        let n_backlog = scaled(1_000_000);
        let extra = sensors_device("env-1", "0s", Some(n_backlog / 2));
        let mut cfg = agent_config(
            dir.path(),
            "agent-backlog",
            &b,
            &topics,
            free_port(),
            &extra,
        );
        cfg = cfg.replace("level = \"info,labgate=debug\"", "level = \"warn\"");
        cfg = cfg.replace(
            "commands_offset_reset",
            "commands_enabled = false\ncommands_offset_reset",
        );
        broker.stall();
        let mut agent = Agent::start(dir.path(), &cfg);
        let t_fill = Instant::now();
        agent.wait_status("backlog buffered", Duration::from_secs(600), |s| {
            s["records_buffered"].as_u64() == Some(n_backlog)
        });
        let fill = t_fill.elapsed().as_secs_f64();
        let rss_full = rss_kib(agent.pid(), "VmRSS:");
        broker.unstall();
        let t_release = Instant::now();
        // The rate counts from the first delivery, as the baseline's does: before it the
        // producer fetches its producer id from the broker it was started without.
        let mut peak_drain = 0;
        let (t0, d0) = loop {
            let d = agent.metric("labgate_records_delivered_total") as u64;
            if d > 0 {
                break (Instant::now(), d);
            }
            assert!(
                t_release.elapsed() < Duration::from_secs(120),
                "nothing delivered after the release"
            );
            peak_drain = peak_drain.max(rss_kib(agent.pid(), "VmRSS:"));
            std::thread::sleep(Duration::from_millis(5));
        };
        let first = (t0 - t_release).as_secs_f64();
        loop {
            peak_drain = peak_drain.max(rss_kib(agent.pid(), "VmRSS:"));
            if agent.metric("labgate_records_delivered_total") as u64 >= n_backlog {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(900),
                "backlog never drained"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let drain = (n_backlog - d0.min(n_backlog)) as f64 / t0.elapsed().as_secs_f64();
        let drain_all = n_backlog as f64 / t_release.elapsed().as_secs_f64();
        let hwm = rss_kib(agent.pid(), "VmHWM:");
        let disk = agent.status()["buffer"]["disk_bytes"].as_u64().unwrap_or(0);
        agent.terminate();
        bases.push(baseline(&b, &topic, n_base, Payloads::Readings));
        constant.push(baseline(&b, &topic, n_base, Payloads::Constant));
        let (base, lo, hi) = median3([bases[0], bases[1], bases[2]]);
        let (old, _, _) = median3([constant[0], constant[1], constant[2]]);
        line(&mut out, format!("| baseline: bare rdkafka producer, same settings, in-flight window, key and headers, {n_base} distinct stamped readings (each its own value, seq and time), acks awaited, counted from its first delivery; median of 3 in this run | {base:.0} msg/s | the three: {:.0}, {:.0}, {:.0} msg/s (start, after end-to-end, after drain) |", bases[0], bases[1], bases[2]));
        line(&mut out, format!("| the same producer sending one reading {n_base} times (every run's baseline before the twenty-third session; its batches compress six times better than real readings), median of 3 | {old:.0} msg/s | the three: {:.0}, {:.0}, {:.0} msg/s; against it end to end {:.2} ×, the drain {:.2} × |", constant[0], constant[1], constant[2], e2e / old, drain / old));
        line(&mut out, format!("| end-to-end durable rate (sensors at full speed → buffer → ack), steady 15 s | {e2e:.0} rec/s | ratio to baseline median {:.2} (goal ≥ 0.9), range {:.2}–{:.2}; {buffered} records were still buffered at the end (the device outran the producer) |", e2e / base, e2e / hi, e2e / lo));
        line(&mut out, format!("| peak RSS at full ingest load, broker live (the end-to-end run's 15 s, VmRSS sampled every 200 ms) | {:.1} MB | goal ≤ 40 MB |", e2e_peak as f64 / 1024.0));
        line(&mut out, format!("| same at 32 records a chunk instead of the default 64, same run | {e2e_32:.0} rec/s | ratio to baseline median {:.2}; the default's rate is {:.2} × it |", e2e_32 / base, e2e / e2e_32));
        line(&mut out, format!("| backlog drain: {n_backlog} records buffered with the broker stalled (SIGSTOP), then released; the rate from the first delivery | {drain:.0} rec/s | ratio to baseline median {:.2} (goal ≥ 0.9), range {:.2}–{:.2}; the first delivery {first:.2} s after the release, {drain_all:.0} rec/s counted from the release; buffering them took {fill:.1} s while stalled |", drain / base, drain / hi, drain / lo));
        line(&mut out, format!("| peak RSS while draining the {n_backlog} backlog (VmRSS sampled every 100 ms) | {:.1} MB | goal ≤ 40 MB; RSS with the full backlog before release {:.1} MB; VmHWM over the whole run {:.1} MB; sled on disk after the drain {:.1} MB |", peak_drain as f64 / 1024.0, rss_full as f64 / 1024.0, hwm as f64 / 1024.0, disk as f64 / 1e6));
    }

    // 3b. Memory and disk against the backlog: sensors at full speed, the broker taking
    // them for 5 s and then stalled, RSS and the data dir's real size sampled from the
    // stall through 1M and 10M records to `buffer.max_bytes`, then 10 s at the cap
    // (drop_oldest making room). This build, then the `dist` profile's (what gateways
    // run) when scripts/bench built it.
    let curve = builds("RSS vs backlog, broker stalled (SIGSTOP), sensors at full speed");
    for (k, (what, bin)) in curve.into_iter().enumerate() {
        let dir = tempdir();
        let topics = Topics::new();
        for t in topics.outputs().iter().chain([topics.commands()].iter()) {
            broker.create_topics(&[t]);
        }
        // max_bytes bounds the data dir, and sled takes 1.1-1.2 bytes per encoded byte:
        // 2 GB holds the 10M-record mark (about 800 MB encoded) with room, and the cap
        // about twice that. The default 1 GiB would stop just past the mark.
        let max_bytes: u64 = (scale() * 2.0e9) as u64;
        let extra = format!(
            "[buffer]\nmax_bytes = {max_bytes}\n\n{}",
            sensors_device("env-1", "0s", None)
        );
        let mut cfg = agent_config(dir.path(), "agent-curve", &b, &topics, free_port(), &extra);
        cfg = cfg.replace("level = \"info,labgate=debug\"", "level = \"warn\"");
        cfg = cfg.replace(
            "commands_offset_reset",
            "commands_enabled = false\ncommands_offset_reset",
        );
        let data = dir.path().join("data");
        // The agent keeps its start-up code here: given back 10 s after start, it would
        // leave the first mark (5 s) and not the others, and the curve would look
        // flatter than the backlog makes it.
        let mut agent = Agent::start_bin(
            &bin,
            dir.path(),
            &cfg,
            &[("LABGATE_PAGE_OUT_AFTER_MS", "0")],
        );
        agent.wait_status("up", Duration::from_secs(60), |s| s["buffer"].is_object());
        // The broker takes records at full speed for 5 s and then stops in the middle
        // of the flow, with batches in flight: the harder case for memory than a broker
        // that is away from the start.
        // The peak in each phase, so that the report says where the highest came:
        // flowing, stalled below the cap, and dropping at the cap; and the peak up to the
        // 10M-record mark (the window that crosses it included), where the goal sets
        // 40 MB. Past it the goal is the curve's flatness.
        let flowing = peak_rss_over(agent.pid(), Duration::from_secs(5));
        let (mut stalled, mut dropping, mut to_mark) = (0u64, 0u64, flowing);
        let sample = |agent: &Agent| {
            let st = agent.status();
            let recs = st["buffer"]["records"].as_u64().unwrap_or(0);
            let enc = st["buffer"]["bytes"].as_u64().unwrap_or(0) as f64 / 1e6;
            let rss = rss_kib(agent.pid(), "VmRSS:");
            let disk = labgate::buffer::allocated_bytes(&data) as f64 / 1e6;
            (st, (recs, rss as f64 / 1024.0, disk, enc))
        };
        // The first mark is the moment of the stall, with what was buffered then.
        let mut at_mark: Vec<Option<(u64, f64, f64, f64)>> = vec![Some(sample(&agent).1)];
        broker.stall();
        let marks = [scaled(1_000_000), scaled(10_000_000)];
        at_mark.extend(marks.iter().map(|_| None));
        let mut at_cap: Option<Instant> = None;
        let mut largest_dir = 0.0f64;
        let t0 = Instant::now();
        let cap_row = loop {
            // RSS every 200 ms for the peak; the rest every 2 s.
            let p = peak_rss_over(agent.pid(), Duration::from_secs(2));
            if at_mark[2].is_none() {
                to_mark = to_mark.max(p);
            }
            if at_cap.is_some() {
                dropping = dropping.max(p);
            } else {
                stalled = stalled.max(p);
            }
            let (st, row) = sample(&agent);
            let (recs, _, disk, _) = row;
            for (i, m) in marks.iter().enumerate().map(|(i, m)| (i + 1, m)) {
                if at_mark[i].is_none() && recs >= *m {
                    at_mark[i] = Some(row);
                }
            }
            // At the cap once drop_oldest starts making room (the cap on encoded bytes
            // is max_bytes over the store's measured overhead).
            if at_cap.is_none() && st["records_dropped"].as_u64().unwrap_or(0) > 0 {
                at_cap = Some(Instant::now());
            }
            largest_dir = largest_dir.max(disk);
            if at_cap.is_some_and(|t| t.elapsed() >= Duration::from_secs(10)) {
                break Some(row);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(900),
                "never reached max_bytes"
            );
        };
        let peak = flowing.max(stalled).max(dropping);
        let mb = |kib: u64| kib as f64 / 1024.0;
        let phases = format!(
            "flowing {:.1}, stalled {:.1}, dropping at the cap {:.1} MB",
            mb(flowing),
            mb(stalled),
            mb(dropping)
        );
        let dropped =
            agent.metric("labgate_records_dropped_total{reason=\"buffer_full_drop_oldest\"}");
        let cap_bytes = agent.status()["buffer"]["cap_bytes"].as_u64().unwrap_or(0);
        broker.unstall();
        agent.terminate();
        let fmt = |r: Option<(u64, f64, f64, f64)>| {
            r.map_or("not reached".to_string(), |(n, rss, disk, enc)| {
                format!("{n} records: RSS {rss:.1} MB, data dir {disk:.0} MB for {enc:.0} MB encoded ({:.2} ×, {:.0} bytes a record)", if enc > 0.0 { disk / enc } else { 0.0 }, if n > 0 { disk * 1e6 / n as f64 } else { 0.0 })
            })
        };
        // A mark not reached is left out of the spread (and shown as "not reached").
        let spread: Vec<f64> = [at_mark[0], at_mark[1], at_mark[2], cap_row]
            .iter()
            .flatten()
            .map(|x| x.1)
            .collect();
        let hi = spread.iter().copied().fold(0.0, f64::max);
        let lo = spread.iter().copied().fold(f64::MAX, f64::min);
        line(&mut out, format!("| {what}, buffer.max_bytes {:.0} MB; the broker live for 5 s, then stalled; start-up code kept (`LABGATE_PAGE_OUT_AFTER_MS=0`) so that every mark carries it; RSS sampled every 200 ms for the peak, the marks every 2 s | peak {:.1} MB up to the {}-record mark, {:.1} MB in all; curve spread {:.1} MB | peak by phase: {phases}; goal: peak ≤ 40 MB at full load and up to a 10M-record backlog, the curve (stall, 1M, 10M, cap) flat within 10 MB. At the stall: {}; {}; {}; at the cap after 10 s of drop_oldest: {} ({dropped:.0} dropped) |", max_bytes as f64 / 1e6, mb(to_mark), marks[1], mb(peak), hi - lo, fmt(at_mark[0]), fmt(at_mark[1]), fmt(at_mark[2]), fmt(cap_row)));
        if k > 0 {
            continue;
        }
        line(&mut out, format!("| the data dir against buffer.max_bytes, same run | largest {largest_dir:.0} MB for max_bytes {:.0} MB ({:.2} ×) | goal: max_bytes bounds the data dir's real size; the cap on encoded bytes in force at the end: {:.0} MB (max_bytes over the store's measured overhead, less an eighth of headroom) |", max_bytes as f64 / 1e6, largest_dir * 1e6 / max_bytes as f64, cap_bytes as f64 / 1e6));
    }

    // 4. Durable ingest into the buffer alone.
    let n_ingest = scaled(2_000_000);
    let ingest = buffer_ingest(n_ingest, false);
    line(&mut out, format!("| durable ingest into the buffer alone: {n_ingest} pre-stamped records, {}/chunk (the default), group commit 20 ms, one thread | {ingest:.0} rec/s | goal ≥ 1,000,000 |", BufferConfig::default().records_per_chunk));
    let ingest_stamp = buffer_ingest(n_ingest, true);
    line(&mut out, format!("| same, including stamping (seq, event_id, JSON encoding) | {ingest_stamp:.0} rec/s | the whole ingest stage on one thread |"));
    // The cost of the fdatasync that makes a commit survive a power cut, same run.
    let (ingest_sled, mut bulk_sled) = buffer_ingest_with(n_ingest, false, Sync::SledFlushOnly);
    let (ingest_fsync, mut bulk_fsync) = buffer_ingest_with(n_ingest, false, Sync::Fdatasync);
    bulk_sled.sort_by(f64::total_cmp);
    bulk_fsync.sort_by(f64::total_cmp);
    line(&mut out, format!("| durable ingest, sled flush + fdatasync (now) vs sled flush alone (before; not durable against a power cut), same records, same run | {ingest_fsync:.0} vs {ingest_sled:.0} rec/s | ratio {:.2}; commit latency under that load p50 {:.2} / p99 {:.2} ms vs p50 {:.2} / p99 {:.2} ms |", ingest_fsync / ingest_sled, percentile(&bulk_fsync, 0.5), percentile(&bulk_fsync, 0.99), percentile(&bulk_sled, 0.5), percentile(&bulk_sled, 0.99)));
    let n_commits = scaled(2000) as usize;
    let lat_fsync = commit_latency(n_commits, Sync::Fdatasync);
    let lat_sled = commit_latency(n_commits, Sync::SledFlushOnly);
    line(&mut out, format!("| group-commit latency, one small record per commit (an MQTT ack or a command claim waits for this), {n_commits} commits | p50 {:.2} ms, p99 {:.2} ms | before (sled flush alone): p50 {:.2} ms, p99 {:.2} ms |", percentile(&lat_fsync, 0.5), percentile(&lat_fsync, 0.99), percentile(&lat_sled, 0.5), percentile(&lat_sled, 0.99)));

    // 5. Command latency: produced → pause seen by the device task.
    {
        let dir = tempdir();
        let topics = Topics::new();
        let extra = r#"[[devices]]
kind = "simulated_potentiostat"
id = "pstat-1"
speed = 1.0
runs = 1

  [[devices.steps]]
  technique = "ca"
  e_dc = 0.5
  t_interval = 0.1
  t_run = 100000.0
"#;
        let key = labgate::commands::sign::generate().expect("key");
        let (key_path, _) = labgate::commands::sign::write_pair(&dir.path().join("bench"), &key)
            .expect("key files");
        let extra = format!(
            "{extra}\n[commands]\nallow_unsigned = true\n[[commands.operators]]\nname = \"bench\"\npublic_key = \"{}\"\ncommands = [\"pause\", \"resume\"]\n",
            labgate::commands::sign::public_base64(&key.verifying_key())
        );
        let mut cfg = agent_config(dir.path(), "agent-lat", &b, &topics, free_port(), &extra);
        cfg = cfg.replace("level = \"info,labgate=debug\"", "level = \"warn\"");
        let mut agent = Agent::start(dir.path(), &cfg);
        agent.wait_status("commands assigned", Duration::from_secs(30), |s| {
            s["commands"]["assigned"] == true
        });
        agent.wait_status("running", Duration::from_secs(30), |s| {
            s["devices"]["pstat-1"]["state"] == "running"
        });
        let mut reader = Reader::new(&b, &[topics.results()]);
        let sender = Sender::new(&b);
        wait_until_commands_answered(&sender, &mut reader, &topics.commands(), "agent-lat");
        let n = 200;
        let mut lat = Vec::new();
        for i in 0..n {
            let cmd = if i % 2 == 0 { "pause" } else { "resume" };
            let id = format!("lat-{i}");
            let payload = json!({"type":"command","command":cmd,"command_id":id,"params":{},"target":{"agent":"agent-lat","device":"pstat-1"}}).to_string();
            let sent_us = labgate::record::unix_us(SystemTime::now());
            sender.send(&topics.commands(), "agent-lat", &payload);
            let msgs = reader.until("command completed", Duration::from_secs(30), |m| {
                m.iter()
                    .any(|m| m.json["command_id"] == id.as_str() && m.json["status"] == "completed")
            });
            let done = msgs
                .iter()
                .find(|m| m.json["command_id"] == id.as_str() && m.json["status"] == "completed")
                .expect("completed");
            let at = done.json["status_at_us"].as_u64().expect("status_at_us");
            lat.push((at.saturating_sub(sent_us)) as f64 / 1000.0);
        }
        lat.sort_by(f64::total_cmp);
        line(&mut out, format!("| command latency: produced → pause/resume done by the device task, {n} commands | p50 {:.1} ms, p99 {:.1} ms | goal p99 ≤ 50 ms; max {:.1} ms |", percentile(&lat, 0.5), percentile(&lat, 0.99), lat[lat.len() - 1]));

        // 5b. The operator's round trip: `labgate command send --key … --wait` as a
        // process, signed, to `completed` printed and exit 0.
        let n = 100;
        let mut wall = Vec::new();
        let mut agent_side = Vec::new();
        for i in 0..n {
            let cmd = if i % 2 == 0 { "pause" } else { "resume" };
            let t = Instant::now();
            let out = std::process::Command::new(labgate_bin())
                .args(["command", "send", "--config"])
                .arg(&agent.config)
                .arg("--key")
                .arg(&key_path)
                .args(["--agent", "agent-lat", "--device", "pstat-1", "--wait", cmd])
                .output()
                .expect("run labgate command send");
            wall.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let done: Value = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["status"] == "completed")
                .expect("completed printed");
            let issued = done["issued_at_us"].as_u64().unwrap_or(0);
            let at = done["status_at_us"].as_u64().unwrap_or(0);
            agent_side.push(at.saturating_sub(issued) as f64 / 1000.0);
        }
        agent.terminate();
        wall.sort_by(f64::total_cmp);
        agent_side.sort_by(f64::total_cmp);
        line(&mut out, format!("| operator round trip: `labgate command send --key … --wait` process, signed, → `completed` printed, exit 0; {n} commands | p50 {:.1} ms, p99 {:.1} ms | goal p99 ≤ 100 ms on loopback; includes process start, client set-up and positioning the result reader; issued_at → completed inside it: p50 {:.1} ms, p99 {:.1} ms |", percentile(&wall, 0.5), percentile(&wall, 0.99), percentile(&agent_side, 0.5), percentile(&agent_side, 0.99)));
    }

    // 5c. A backlog on the command topic: messages that are not commands (sensor
    // readings in lz4 batches, as a misrouted producer would leave them) waiting when the
    // agent starts reading from `earliest`. Measured with the agent's consumer settings
    // and, in the same run, with librdkafka's defaults put back through
    // `[kafka.properties]`: what the agent's prefetch bound saves.
    {
        let n = scaled(300_000);
        let topics = Topics::new();
        for t in topics.outputs().iter().chain([topics.commands()].iter()) {
            create_topics(&b, &[t]);
        }
        let _ = baseline(&b, &topics.commands(), n, Payloads::Readings);
        let defaults = "[kafka.properties]\n\"queued.max.messages.kbytes\" = \"65536\"\n\"queued.min.messages\" = \"100000\"\n\"max.partition.fetch.bytes\" = \"1048576\"\n\"fetch.max.bytes\" = \"52428800\"\n\"message.max.bytes\" = \"1000000\"\n";
        let mut peaks = Vec::new();
        for (i, extra) in ["", defaults].iter().enumerate() {
            let dir = tempdir();
            let cfg = agent_config(
                dir.path(),
                &format!("agent-cmd-backlog-{i}"),
                &b,
                &topics,
                free_port(),
                extra,
            )
            .replace(
                "commands_offset_reset = \"latest\"",
                "commands_offset_reset = \"earliest\"",
            )
            .replace("level = \"info,labgate=debug\"", "level = \"warn\"");
            let mut agent = Agent::start(dir.path(), &cfg);
            let t = Instant::now();
            let mut peak = 0;
            while t.elapsed() < Duration::from_secs(30) {
                peak = peak.max(rss_kib(agent.pid(), "VmRSS:"));
                std::thread::sleep(Duration::from_millis(100));
            }
            let rejected = agent.status()["commands"]["rejected"].as_u64().unwrap_or(0);
            agent.terminate();
            peaks.push((peak as f64 / 1024.0, rejected));
        }
        line(&mut out, format!("| peak RSS with {n} non-commands waiting on the command topic (lz4 batches of sensor readings, read from `earliest`), 30 s | {:.1} MB | with librdkafka's consumer defaults instead (64 MB prefetch, 50 MB fetches), same run: {:.1} MB; rejected in the 30 s: {} / {} (each rejection is a durable command result) |", peaks[0].0, peaks[1].0, peaks[0].1, peaks[1].1));
    }

    // 6. Idle RSS: the demo devices at their demo rates, this build and the `dist`
    // profile's (what gateways run) when scripts/bench built it. The agent gives its
    // start-up code back to the kernel 10 s after it is ready (`memory::PAGE_OUT_AFTER`);
    // idle is the highest VmRSS sampled from 20 to 40 s, the start-up peak is VmHWM.
    // This build runs a second time without giving anything back, to compare.
    //
    // These run on a broker of their own. librdkafka's brokers-only metadata request
    // (an empty topic list, which Kafka answers with no topics) is answered by tansu
    // with every topic it holds, and the run's shared tansu holds every earlier
    // section's topics; librdkafka then keeps them all in its metadata cache. The
    // release build also runs once on the shared broker, to show that cost.
    {
        let own = Broker::start();
        let demo =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
                .expect("demo config");
        let devices = &demo[demo.find("[[devices]]").expect("devices")..];
        let idle = |bin: &std::path::Path, page_out: bool, brokers: &str| {
            let dir = tempdir();
            let topics = Topics::new();
            let mut cfg = agent_config(
                dir.path(),
                "agent-idle",
                brokers,
                &topics,
                free_port(),
                devices,
            );
            cfg = cfg.replace("level = \"info,labgate=debug\"", "level = \"warn\"");
            // The demo's lab application device needs its API token.
            let mut env = vec![("LABGATE_DEMO_TOKEN", "bench-demo-token-0123456789")];
            if !page_out {
                env.push(("LABGATE_PAGE_OUT_AFTER_MS", "0"));
            }
            let mut agent = Agent::start_bin(bin, dir.path(), &cfg, &env);
            std::thread::sleep(Duration::from_secs(20));
            let idle = peak_rss_over(agent.pid(), Duration::from_secs(20));
            let hwm = rss_kib(agent.pid(), "VmHWM:");
            agent.terminate();
            (idle as f64 / 1024.0, hwm as f64 / 1024.0)
        };
        let this = labgate_bin();
        let (kept, kept_hwm) = idle(&this, false, &own.addr());
        for (what, bin) in builds(
            "RSS idle (demo devices at demo rates, own broker; VmRSS, the highest sample 20–40 s after start)",
        ) {
            let (rss, hwm) = idle(&bin, true, &own.addr());
            line(
                &mut out,
                format!(
                    "| {what} | {rss:.1} MB | goal ≤ 12 MB; start-up peak (VmHWM) {hwm:.1} MB |"
                ),
            );
        }
        line(
            &mut out,
            format!(
                "| the same, this build, keeping its start-up code (`LABGATE_PAGE_OUT_AFTER_MS=0`) | {kept:.1} MB | VmHWM {kept_hwm:.1} MB |"
            ),
        );
        let listed = topic_count(&b);
        let (shared, _) = idle(&this, true, &b);
        line(
            &mut out,
            format!(
                "| the same, this build, on the run's shared tansu ({listed} topics, all listed to librdkafka's brokers-only query) | {shared:.1} MB | a Kafka broker lists no topics there |"
            ),
        );
    }
    // 7. MethodSCRIPT line parse rate: bytes → lines → classified, decoded packages.
    {
        use labgate::devices::methodscript::{encode_value, Line, LineCodec};
        use tokio_util::bytes::BytesMut;
        use tokio_util::codec::Decoder;
        // A realistic CV output: potential and current with status and range metadata.
        let mut text = String::from("e\nM0005\nC0000\n");
        for k in 0..10_000 {
            let e = -0.5 + (k % 200) as f64 * 0.005;
            let i = 1.5e-6 * (e * 7.0).sin();
            let (de, di) = (encode_value(e).expect("e"), encode_value(i).expect("i"));
            text.push_str(&format!("Pda{de};ba{di},10,288\n"));
        }
        text.push_str("-\n*\n\n");
        let n_lines = text.lines().count() as u64;
        let rounds = scaled(2_000_000) / n_lines;
        let start = Instant::now();
        let mut packages = 0u64;
        for _ in 0..rounds {
            let mut codec = LineCodec::default();
            let mut buf = BytesMut::from(text.as_bytes());
            while let Some(item) = codec.decode(&mut buf).expect("decode") {
                if let Ok(Line::Data(p)) = Line::parse(&item.expect("line")) {
                    packages += p.vars.len() as u64 / 2;
                }
            }
        }
        let rate = (rounds * n_lines) as f64 / start.elapsed().as_secs_f64();
        assert_eq!(packages, rounds * 10_000);
        line(&mut out, format!("| MethodSCRIPT line parse rate (issue 3): bytes → lines → classified, `P` lines fully decoded, {} lines, one thread | {rate:.0} lines/s | CV output (`da` + `ba` with status and range metadata) |", rounds * n_lines));
    }
    // 8 and 9 (issue 3): a MethodSCRIPT instrument on a pty at 921,600-baud line rates,
    // and command latency from Kafka to the byte on the pty.
    {
        use labgate::sim::emstat::{Emstat, Options};
        let dir = tempdir();
        let topics = Topics::new();
        let link = dir.path().join("ttyEMSTAT");
        // A P line with time, potential and current is ~41 bytes; 921,600 baud carries
        // 92,160 bytes/s, about 2,250 lines/s. CA at 1 ms per point, 2.25 times real time.
        let sim = Emstat::start(
            Options {
                speed: 2.25,
                ..Options::default()
            },
            Some(&link),
        )
        .expect("simulator");
        let device = format!(
            "[[devices]]\nkind = \"methodscript\"\nid = \"pstat-1\"\nport = \"{}\"\nbaud = 921600\nmethod = \"ca\"\nmethods_dir = \"{}\"\npoints_per_message = 100\nparams = {{ t_interval = \"1m\", t_run = 3600 }}\n",
            link.display(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/devices/methods")
        );
        let mut cfg = agent_config(dir.path(), "agent-ms", &b, &topics, free_port(), &device);
        cfg = cfg.replace("level = \"info,labgate=debug\"", "level = \"warn\"");
        let mut agent = Agent::start(dir.path(), &cfg);
        agent.wait_status("connected", Duration::from_secs(30), |s| {
            s["devices"]["pstat-1"]["state"] == "idle"
        });
        let mut reader = Reader::new(&b, &[topics.data(), topics.results(), topics.events()]);
        let sender = Sender::new(&b);
        let cmd = |id: &str, c: &str| {
            json!({"command": c, "command_id": id, "target": {"agent": "agent-ms", "device": "pstat-1"}}).to_string()
        };
        wait_until_commands_answered(&sender, &mut reader, &topics.commands(), "agent-ms");
        let done = |msgs: &[Msg], id: &str| {
            msgs.iter()
                .any(|m| m.json["command_id"] == id && m.json["status"] != "accepted")
        };
        sender.send(&topics.commands(), "k", &cmd("start", "start"));
        reader.until("started", Duration::from_secs(20), |m| done(m, "start"));
        let ticks = |pid: u32| -> f64 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            fields
                .get(11)
                .and_then(|u| u.parse::<f64>().ok())
                .unwrap_or(0.0)
                + fields
                    .get(12)
                    .and_then(|u| u.parse::<f64>().ok())
                    .unwrap_or(0.0)
        };
        let secs = (60.0 * scale()).max(10.0);
        let (c0, t0) = (ticks(agent.pid()), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(secs));
        let cpu = (ticks(agent.pid()) - c0) / 100.0 / t0.elapsed().as_secs_f64() * 100.0;
        // Command latency while streaming: pause/resume pairs, produce → byte on the pty.
        let mut lat = Vec::new();
        for i in 0..50 {
            for c in ["pause", "resume"] {
                let id = format!("{c}-{i}");
                let before = sim.received_at().len();
                let sent = SystemTime::now();
                sender.send(&topics.commands(), "k", &cmd(&id, c));
                reader.until("command done", Duration::from_secs(20), |m| done(m, &id));
                let got = sim.received_at();
                let (_, at) = got[before..]
                    .iter()
                    .find(|(l, _)| l == if c == "pause" { "h" } else { "H" })
                    .expect("command reached the pty");
                lat.push(at.duration_since(sent).unwrap_or_default().as_secs_f64() * 1000.0);
            }
        }
        let before = sim.received_at().len();
        let sent = SystemTime::now();
        sender.send(&topics.commands(), "k", &cmd("stop", "stop"));
        reader.until("stopped", Duration::from_secs(20), |m| done(m, "stop"));
        let z = sim.received_at()[before..]
            .iter()
            .find(|(l, _)| l == "Z")
            .map(|(_, at)| at.duration_since(sent).unwrap_or_default().as_secs_f64() * 1000.0)
            .expect("Z on the pty");
        let sent_lines = sim.data_lines().len();
        let count = |m: &[Msg]| {
            m.iter()
                .filter(|m| m.json["type"] == "echem_data")
                .map(|m| m.json["points"].as_array().map_or(0, Vec::len))
                .sum::<usize>()
        };
        reader.until("every point", Duration::from_secs(60), |m| {
            count(m) >= sent_lines
        });
        let received = count(reader.drain_for(Duration::from_secs(1)));
        agent.terminate();
        line(&mut out, format!("| MethodSCRIPT instrument at 921,600-baud line rate (~2,250 P lines/s on a pty) for {secs:.0} s, plus 100 commands | {} points sent, {received} in Kafka, {} lost | goal 0 lost; agent CPU {cpu:.1} % of one core while streaming (pty bytes move at memory speed; the line rate is paced by the simulator) |", sent_lines, sent_lines.saturating_sub(received)));
        lat.sort_by(f64::total_cmp);
        line(&mut out, format!("| command latency: Kafka produce → `h`/`H` on the pty, 100 commands while streaming | p50 {:.1} ms, p99 {:.1} ms | goal p99 ≤ 50 ms; stop → `Z` on the pty {z:.1} ms |", percentile(&lat, 0.5), percentile(&lat, 0.99)));
    }
    print!("{out}");
}
