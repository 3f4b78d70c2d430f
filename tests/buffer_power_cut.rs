//! The buffer alone on the fault filesystem: a flushed record survives a power cut, and
//! (the control that shows the filesystem really forgets) sled's own flush without the
//! agent's fdatasync does not make it survive; and blob files the disk will not unlink
//! are retried until it does.

mod common;

use common::faultfs::{Fault, FaultFs};
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

/// A reading lz4 cannot shrink (pseudo-random hex): its chunks fill leaves past the size
/// sled writes as separate blob files.
fn big_rec(seq: u64) -> Stored {
    let noise = common::incompressible_hex(seq, 32);
    Stored {
        payload: format!("{{\"n\":{seq},\"noise\":\"{noise}\"}}").into_bytes(),
        ..rec(seq)
    }
}

/// Appends 512 big records at `next` and flushes them (they are owed from then on),
/// then delivers up to four chunks, the oldest first: their deletes replace the leaves
/// and blob files that held them. Those deletes are not flushed here.
fn append_then_deliver_some(
    b: &Buffer,
    next: &mut u64,
    owed: &mut std::collections::BTreeSet<u64>,
) {
    let recs: Vec<Stored> = (*next..*next + 512).map(big_rec).collect();
    b.append(&recs, 0).unwrap();
    b.flush_blocking().unwrap();
    owed.extend(*next..*next + 512);
    *next += 512;
    for _ in 0..4 {
        if let Some(recs) = b.read_next().unwrap() {
            for (id, r) in recs {
                b.ack(id).unwrap();
                owed.remove(&r.seq);
            }
        }
    }
}

#[test]
fn blob_sized_values_survive_power_cuts_while_old_ones_are_deleted() {
    let mut fs = FaultFs::new();
    let dir = fs.path("blobs");
    let cfg = BufferConfig::default();
    let mut next = 0u64;
    // Flushed and not acked: each must be there after every cut.
    let mut owed: std::collections::BTreeSet<u64> = Default::default();
    let mut saw_blobs = false;
    for cycle in 0..5 {
        {
            let b = Buffer::open(&dir, &cfg).unwrap();
            assert_eq!(b.stats().quarantined_chunks, 0, "cycle {cycle}");
            let mut present = std::collections::BTreeSet::new();
            let mut unacked = Vec::new();
            while let Some(recs) = b.read_next().unwrap() {
                for (id, r) in recs {
                    present.insert(r.seq);
                    unacked.push((id, r.seq));
                }
            }
            let missing: Vec<_> = owed.difference(&present).take(5).collect();
            assert!(missing.is_empty(), "cycle {cycle}: lost {missing:?} …");
            // Those read back are delivered now, the oldest first; new ones arrive.
            for (id, seq) in unacked {
                b.ack(id).unwrap();
                owed.remove(&seq);
            }
            for _ in 0..6 {
                append_then_deliver_some(&b, &mut next, &mut owed);
                b.flush_blocking().unwrap();
                saw_blobs |=
                    std::fs::read_dir(dir.join("blobs")).is_ok_and(|mut d| d.next().is_some());
            }
            // Work after the last flush: may be lost, must not corrupt anything.
            b.append(&(next..next + 64).map(big_rec).collect::<Vec<_>>(), 0)
                .unwrap();
            next += 64;
            fs.freeze();
        }
        fs.power_cut();
        fs.mount();
    }
    assert!(
        saw_blobs,
        "the values were large enough for sled's blob files"
    );
    let b = Buffer::open(&dir, &cfg).unwrap();
    let present: std::collections::BTreeSet<u64> = read_all(&b).into_iter().collect();
    assert!(owed.is_subset(&present));
}

/// The cut falls inside the store's sync (after its `n`th fsync), while leaves held as
/// blob files are being replaced: the store must open with every record that a
/// completed sync covered, whichever blob files were removed by then.
#[test]
fn a_cut_inside_a_sync_that_replaces_blobs_loses_nothing_synced() {
    let cfg = BufferConfig::default();
    for n in 0..12u64 {
        let mut fs = FaultFs::new();
        let dir = fs.path("cut");
        let mut owed: std::collections::BTreeSet<u64> = Default::default();
        {
            let b = Buffer::open(&dir, &cfg).unwrap();
            let mut next = 0;
            for _ in 0..4 {
                append_then_deliver_some(&b, &mut next, &mut owed);
            }
            // The last deletes and appends go to disk in a sync the power cuts short.
            b.append(&(next..next + 512).map(big_rec).collect::<Vec<_>>(), 0)
                .unwrap();
            fs.freeze_after_syncs(n);
            let _ = b.flush_blocking();
        }
        fs.power_cut();
        fs.mount();
        let b = Buffer::open(&dir, &cfg)
            .unwrap_or_else(|e| panic!("cut after {n} syncs: the store does not open: {e}"));
        assert_eq!(b.stats().quarantined_chunks, 0, "cut after {n} syncs");
        let mut present = std::collections::BTreeSet::new();
        loop {
            match b.read_next() {
                Ok(Some(recs)) => present.extend(recs.into_iter().map(|(_, r)| r.seq)),
                Ok(None) => break,
                Err(e) => panic!("cut after {n} syncs: a synced chunk cannot be read: {e}"),
            }
        }
        let missing: Vec<_> = owed.difference(&present).take(5).collect();
        assert!(
            missing.is_empty(),
            "cut after {n} syncs: lost {missing:?} …"
        );
        // Blob files whose unlink the cut prevented were removed at the reopen: every
        // file left in `blobs/` is one a page points at.
        drop(b);
        let store = open_store_once_unlocked(&dir);
        let referenced = store.db().referenced_blobs();
        let orphans: Vec<String> = std::fs::read_dir(dir.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| {
                name.parse()
                    .map_or(true, |id: i64| !referenced.contains(&id))
            })
            .collect();
        assert!(
            orphans.is_empty(),
            "cut after {n} syncs: blob files no page points at: {orphans:?}"
        );
    }
}

/// Opens the store again in this process, right after the buffer on it was dropped.
/// Other tests in this binary start processes (`umount` at their power cuts), and a child
/// holds a copy of every descriptor of ours, the store's locked log among them, from its
/// fork until its exec: a moment, but enough for the lock to be refused. So a refused
/// lock is tried again, for 5 s at most. That sled itself lets go of the store by the
/// end of the drop is `tests/buffer_reopen.rs`'s check, in a binary that starts no
/// process.
fn open_store_once_unlocked(dir: &std::path::Path) -> labgate::buffer::store::Store {
    let t0 = std::time::Instant::now();
    loop {
        match labgate::buffer::store::open(dir, 1 << 20) {
            Ok(store) => return store,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && t0.elapsed() < std::time::Duration::from_secs(5) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("the store does not open again: {e}"),
        }
    }
}

fn blob_files(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A disk that refuses to unlink the blob files replaced leaves (EIO on unlink only)
/// does not stop the buffer: appends, acks and syncs go on, the refused files stay
/// queued, and once the disk lets them go the next syncs remove every one of them.
#[test]
fn replaced_blobs_that_cannot_be_unlinked_are_removed_once_the_disk_lets_them() {
    let fs = FaultFs::new();
    let dir = fs.path("unlink");
    let cfg = BufferConfig::default();
    let mut owed: std::collections::BTreeSet<u64> = Default::default();
    let mut next = 0;
    let b = Buffer::open(&dir, &cfg).unwrap();
    for _ in 0..2 {
        append_then_deliver_some(&b, &mut next, &mut owed);
    }
    b.flush_blocking().unwrap();

    fs.set_fault(Fault::UnlinkEio);
    for _ in 0..8 {
        append_then_deliver_some(&b, &mut next, &mut owed);
    }
    b.flush_blocking()
        .expect("a sync failed because garbage could not be unlinked");
    let refused: std::collections::BTreeSet<String> = fs
        .refused_unlinks()
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    assert!(
        !refused.is_empty(),
        "no unlink was refused: the test proves nothing"
    );
    assert!(
        refused.is_subset(&blob_files(&dir)),
        "a refused unlink happened anyway"
    );

    fs.set_fault(Fault::None);
    b.flush_blocking().unwrap();
    let now = blob_files(&dir);
    let left: Vec<_> = refused.intersection(&now).collect();
    assert!(
        left.is_empty(),
        "blob files still there after a sync with the disk recovered: {left:?} of {refused:?}"
    );
    let mut present = std::collections::BTreeSet::new();
    while let Some(recs) = b.read_next().unwrap() {
        present.extend(recs.into_iter().map(|(_, r)| r.seq));
    }
    assert_eq!(present, owed, "the records not delivered are all there");
}

/// A disk that fails while the buffer closes (sled's last sync of its log answers EIO,
/// or the filesystem went read-only) is logged, not a panic in the drop: whatever failed
/// was reported by the store's own sync, and a panic here would replace the agent's
/// exit with a crash.
#[test]
fn a_disk_failing_at_close_does_not_panic_the_drop() {
    for fault in [Fault::Eio, Fault::ReadOnly, Fault::ReadEio] {
        let fs = FaultFs::new();
        let dir = fs.path("close");
        let b = Buffer::open(&dir, &BufferConfig::default()).unwrap();
        b.append(&[rec(0)], 0).unwrap();
        b.flush_blocking().unwrap();
        fs.set_fault(fault);
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(b)));
        assert!(
            dropped.is_ok(),
            "dropping the buffer panicked under {fault:?}"
        );
    }
}
