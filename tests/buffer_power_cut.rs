//! The buffer alone on the fault filesystem: a flushed record survives a power cut, and
//! (the control that shows the filesystem really forgets) sled's own flush without the
//! agent's fdatasync does not make it survive.

mod common;

use common::faultfs::FaultFs;
use labgate::buffer::Buffer;
use labgate::config::BufferConfig;
use labgate::record::{Stored, TopicKind};

fn rec(seq: u64) -> Stored {
    Stored {
        topic: TopicKind::Sensors,
        key: "k".into(),
        device_id: "d".into(),
        seq,
        ingested_ms: 1,
        payload: format!("{{\"n\":{seq}}}").into_bytes(),
    }
}

fn read_all(b: &Buffer) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(recs) = b.read_next().unwrap() {
        out.extend(recs.into_iter().map(|(_, r)| r.seq));
    }
    out
}

#[test]
fn flushed_records_and_seqs_survive_a_power_cut() {
    let mut fs = FaultFs::new();
    let dir = fs.path("buf");
    let cfg = BufferConfig::default();
    {
        let b = Buffer::open(&dir, &cfg).unwrap();
        let recs: Vec<Stored> = (0..1000).map(rec).collect();
        b.append(&recs, 0).unwrap();
        b.flush_blocking().unwrap();
        // Appended after the last flush: may be lost, must not corrupt anything.
        b.append(&[rec(1000)], 0).unwrap();
        fs.freeze();
    }
    fs.power_cut();
    fs.mount();
    let b = Buffer::open(&dir, &cfg).unwrap();
    let seqs = read_all(&b);
    assert!(seqs.len() >= 1000, "{} records survived", seqs.len());
    assert_eq!(seqs[..1000], (0..1000).collect::<Vec<_>>()[..]);
    assert!(b.next_seqs().unwrap()["d"] >= 1000);
}

#[test]
fn sleds_flush_alone_is_forgotten_and_the_stores_sync_is_kept() {
    let mut fs = FaultFs::new();
    let dir = fs.path("raw");
    {
        let store = labgate::buffer::store::open(&dir, 1 << 20).unwrap();
        store.db().insert(b"synced", b"1").unwrap();
        store.sync_blocking().unwrap();
        // sled's flush ends in sync_file_range: not a durability point.
        store.db().insert(b"flushed", b"1").unwrap();
        store.db().flush().unwrap();
        fs.freeze();
    }
    fs.power_cut();
    fs.mount();
    let store = labgate::buffer::store::open(&dir, 1 << 20).unwrap();
    assert!(store.db().get(b"synced").unwrap().is_some());
    assert!(
        store.db().get(b"flushed").unwrap().is_none(),
        "sled's flush alone survived: the fault filesystem keeps too much"
    );
}

/// Without `buffer.min_free_bytes`, the floor is 64 MiB or a tenth of the filesystem:
/// a small disk keeps working, and still stops growing before it is full.
#[test]
fn the_default_free_space_floor_fits_small_disks() {
    let fs = FaultFs::new();
    fs.set_capacity(20 << 20);
    let b = Buffer::open(&fs.path("small"), &BufferConfig::default()).unwrap();
    let s = b.stats();
    assert_eq!(s.disk_floor_bytes, 2 << 20, "{s:?}");
    assert!(!s.low_disk);
    assert!(!b.low_disk());
    // Something else fills the disk to within 1 MiB.
    let filler = vec![0u8; (20 << 20) - (1 << 20) - fs.used() as usize];
    std::fs::write(fs.path("filler"), filler).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(b.low_disk());
    assert!(b.stats().low_disk);
}
