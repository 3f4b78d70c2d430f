//! A buffer dropped in this process can be opened again at once: nothing sled started
//! (its IO threads' writes, a file truncation) still holds the store's file lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use labgate::buffer::{Buffer, BufferConfig};
use labgate::record::{Stored, TopicKind};

fn rec(seq: u64) -> Stored {
    Stored {
        topic: TopicKind::Sensors,
        key: format!("dev{}", seq % 7),
        device_id: format!("dev{}", seq % 7),
        seq,
        ingested_ms: 1,
        payload: format!(
            "{{\"n\":{seq},\"pad\":\"{}\"}}",
            "x".repeat(seq as usize % 300)
        )
        .into_bytes(),
    }
}

/// Busy threads compete for the cores, as the rest of a test run or a gateway's other
/// work does: a thread of sled's that still holds the store is then at times descheduled
/// just after waking the flush that precedes the drop.
#[test]
fn a_dropped_buffer_opens_again_at_once() {
    let stop = Arc::new(AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let busy: Vec<_> = (0..cores * 4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffer");
    let cfg = BufferConfig::default();
    let mut next = 0u64;
    for round in 0..200 {
        let b = Buffer::open(&path, &cfg)
            .unwrap_or_else(|e| panic!("round {round}: the buffer does not open again: {e}"));
        let recs: Vec<Stored> = (next..next + 2_000).map(rec).collect();
        next += 2_000;
        b.append(&recs, 0).unwrap();
        b.flush_blocking().unwrap();
        while let Some(chunk) = b.read_next().unwrap() {
            for (id, _) in chunk {
                b.ack(id).unwrap();
            }
        }
        b.flush_blocking().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for t in busy {
        t.join().unwrap();
    }
}
