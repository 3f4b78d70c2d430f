//! `buffer.max_bytes` is what the buffer's store takes on disk, sled's own overhead
//! included: a backlog that outgrows it is bounded by the data dir's real size (its
//! allocated blocks), not by the encoded bytes alone.

mod common;

use std::time::SystemTime;

use labgate::buffer::{allocated_bytes, Buffer, BufferConfig, OverflowPolicy};
use labgate::record::{stamp, Body, Draft, Stored};

/// Opens the buffer again in this process, right after the last handle was dropped.
fn reopen(store: &std::path::Path, cfg: &BufferConfig) -> Buffer {
    Buffer::open(store, cfg).unwrap_or_else(|e| panic!("reopen: {e}"))
}

/// A record lz4 cannot shrink (pseudo-random hex), about 400 bytes encoded.
fn record(seq: u64) -> Stored {
    let noise = common::incompressible_hex(seq, 16);
    let mut data = serde_json::Map::new();
    data.insert("noise".into(), noise.into());
    let d = Draft::new(
        "disk-dev",
        Body::ExperimentEvent {
            event: "sample_loaded".into(),
            experiment_id: "disk".into(),
            data,
        },
    );
    stamp(&d, "agent-disk", seq, SystemTime::now()).expect("stamp")
}

#[test]
fn a_backlog_three_times_max_bytes_keeps_the_data_dir_within_max_bytes() {
    let dir = common::tempdir();
    let store = dir.path().join("buffer");
    let max_bytes: u64 = 64 << 20;
    let cfg = BufferConfig {
        max_bytes,
        overflow: OverflowPolicy::DropOldest,
        ..BufferConfig::default()
    };
    let b = Buffer::open(&store, &cfg).expect("open");
    let mut seq = 0u64;
    let mut written = 0u64;
    let mut dropped = 0u64;
    let mut largest_dir = 0u64;
    let mut batches = 0u32;
    while written < 3 * max_bytes {
        let recs: Vec<Stored> = (0..1024).map(|i| record(seq + i)).collect();
        written += recs.iter().map(|r| r.payload.len() as u64).sum::<u64>();
        seq += recs.len() as u64;
        let out = b.append(&recs, 0).expect("append");
        assert_eq!(out.rejected, 0, "drop_oldest refuses nothing");
        dropped += out.dropped;
        batches += 1;
        if batches % 4 == 0 {
            b.flush_blocking().expect("flush");
            largest_dir = largest_dir.max(allocated_bytes(&store));
        }
    }
    b.flush_blocking().expect("flush");
    largest_dir = largest_dir.max(allocated_bytes(&store));
    let st = b.stats();
    // The overhead was measured and lowered the cap on encoded bytes.
    assert!(
        st.cap_bytes < max_bytes,
        "cap {} for max_bytes {max_bytes}",
        st.cap_bytes
    );
    assert!(st.bytes <= st.cap_bytes, "{} > {}", st.bytes, st.cap_bytes);
    assert!(dropped > 0, "the oldest records made room");
    assert_eq!(
        st.records + dropped,
        seq,
        "every record kept or counted dropped"
    );
    // The buffer aims an eighth below max_bytes; sled's garbage creeps while the backlog
    // turns over. These leaves are blob files, the worst case measured: 1.11 × alone,
    // 1.14 × with the rest of the suite running beside it (sensor readings reach 1.06 ×
    // after twelve turnovers). Checked here: within a quarter, as the README says for
    // such records (2.1 × before sled's blob files were reclaimed).
    let slack = max_bytes / 4;
    assert!(
        largest_dir <= max_bytes + slack,
        "data dir reached {largest_dir} bytes for max_bytes {max_bytes} (cap {} encoded)",
        st.cap_bytes
    );
    // What was removed to stay within the cap was garbage only: the store opens again
    // with every record it kept readable, in order.
    drop(b);
    let b = reopen(&store, &cfg);
    let again = b.stats();
    assert_eq!(again.records, st.records);
    assert_eq!(again.quarantined_chunks, 0);
    let mut read = 0u64;
    let mut last_seq = None;
    while let Some(chunk) = b.read_next().expect("read") {
        for (_, r) in chunk {
            assert!(last_seq < Some(r.seq), "in order");
            last_seq = Some(r.seq);
            read += 1;
        }
    }
    assert_eq!(read, st.records);
    assert_eq!(last_seq, Some(seq - 1), "the newest record is among them");
}

#[test]
fn records_kept_before_the_overhead_was_measured_are_not_dropped_for_it() {
    let dir = common::tempdir();
    let store = dir.path().join("buffer");
    // Written under a cap far away (as by a version that capped encoded bytes alone).
    let mut seq = 0u64;
    {
        let b = Buffer::open(&store, &BufferConfig::default()).expect("open");
        while b.stats().bytes < 40 << 20 {
            let recs: Vec<Stored> = (0..1024).map(|i| record(seq + i)).collect();
            seq += recs.len() as u64;
            b.append(&recs, 0).expect("append");
        }
        b.flush_blocking().expect("flush");
    }
    // Opened again under a max_bytes its data dir already exceeds.
    let cfg = BufferConfig {
        max_bytes: 48 << 20,
        overflow: OverflowPolicy::DropOldest,
        ..BufferConfig::default()
    };
    let b = reopen(&store, &cfg);
    let before = b.stats().records;
    let recs: Vec<Stored> = (0..1024).map(|i| record(seq + i)).collect();
    let out = b.append(&recs, 0).expect("append");
    let st = b.stats();
    assert!(
        st.cap_bytes >= 40 << 20,
        "cap {} below what was kept",
        st.cap_bytes
    );
    // Room is made for the new records only (a chunk of slack), not down to the
    // measured cap.
    assert!(out.dropped <= 1024 + 64, "dropped {}", out.dropped);
    assert!(st.records + 64 >= before, "{} of {before} left", st.records);
}

/// A sensor reading like the agent's (JSON that lz4 shrinks about fourfold).
fn reading(seq: u64) -> Stored {
    stamp(
        &common::varied_reading(seq),
        "agent-disk",
        seq,
        SystemTime::now(),
    )
    .expect("stamp")
}

#[test]
fn a_growing_backlog_takes_little_more_disk_than_its_encoded_bytes() {
    let dir = common::tempdir();
    let store = dir.path().join("buffer");
    let b = Buffer::open(&store, &BufferConfig::default()).expect("open");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Appended and committed as ingest does under load, the broker away: nothing read.
    let mut seq = 0u64;
    while b.stats().bytes < 64 << 20 {
        let recs: Vec<Stored> = (0..2048).map(|i| reading(seq + i)).collect();
        seq += recs.len() as u64;
        b.append(&recs, 0).expect("append");
        rt.block_on(b.flush()).expect("flush");
    }
    b.flush_blocking().expect("flush");
    let encoded = b.stats().bytes;
    let on_disk = allocated_bytes(&store);
    // sled writes a leaf again each time it grows; the old copies are garbage until
    // their segment is cleaned. Measured here: 1.6-1.8 × before the store drove the
    // cleaning after each sync, 1.14-1.16 × since (issue 11 asks at most 1.25 ×).
    assert!(
        on_disk * 4 <= encoded * 5,
        "{on_disk} bytes on disk for {encoded} encoded ({:.2} ×)",
        on_disk as f64 / encoded as f64
    );
    // Every record is still there, in order, after the moves.
    drop(b);
    let b = reopen(&store, &BufferConfig::default());
    assert_eq!(b.stats().records, seq);
    let mut next = 0u64;
    while let Some(chunk) = b.read_next().expect("read") {
        for (_, r) in chunk {
            assert_eq!(r.seq, next, "in order, none missing");
            next += 1;
        }
    }
    assert_eq!(next, seq);
}
