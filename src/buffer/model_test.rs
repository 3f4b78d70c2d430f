//! Model-based property test: the buffer must behave like a FIFO queue of durable,
//! unacknowledged records, across clean restarts and crashes before a flush.
//!
//! The model is a `VecDeque` of record ids. Operations: append (to a pending list),
//! flush (pending becomes durable), read (the forwarder takes records in order), ack,
//! rewind, restart (flush, reopen) and crash (reopen without flushing: pending records
//! may or may not survive, as a prefix, and acks of partly acked chunks are forgotten).
#![cfg(test)]

use std::collections::{BTreeSet, HashMap, VecDeque};

use proptest::prelude::*;

use super::{Buffer, RecordId};
use super::{BufferConfig, OverflowPolicy};
use crate::record::{Stored, TopicKind};

#[derive(Debug, Clone)]
enum Op {
    Append { device: u8, n: usize },
    Flush,
    Read,
    Ack { n: usize },
    Rewind,
    Restart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 1usize..150).prop_map(|(device, n)| Op::Append { device, n }),
        3 => Just(Op::Flush),
        3 => Just(Op::Read),
        3 => (1usize..200).prop_map(|n| Op::Ack { n }),
        1 => Just(Op::Rewind),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

fn cfg() -> BufferConfig {
    BufferConfig {
        max_bytes: u64::MAX,
        overflow: OverflowPolicy::DropOldest,
        records_per_chunk: 16,
        ..BufferConfig::default()
    }
}

fn record(device: u8, seq: u64, uid: u64) -> Stored {
    Stored {
        topic: TopicKind::Sensors,
        key: format!("k{device}"),
        device_id: format!("d{device}"),
        seq,
        ingested_ms: 0,
        payload: uid.to_be_bytes().to_vec(),
    }
}

/// 200 bytes that lz4 cannot shrink, so byte caps are really reached.
fn incompressible(seed: u64) -> Vec<u8> {
    let mut rng = crate::devices::simulated::Rng::new(seed);
    (0..25).flat_map(|_| rng.next_u64().to_le_bytes()).collect()
}

fn uid(s: &Stored) -> u64 {
    u64::from_be_bytes(s.payload[..8].try_into().unwrap())
}

fn reopen(dir: &std::path::Path) -> Buffer {
    reopen_with(dir, &cfg())
}

/// Opens the buffer again in this process, right after the last handle was dropped:
/// nothing of the previous instance may still hold the store.
pub(super) fn reopen_with(dir: &std::path::Path, cfg: &BufferConfig) -> Buffer {
    Buffer::open(dir, cfg).unwrap_or_else(|e| panic!("reopen failed: {e}"))
}

struct Harness {
    dir: tempfile::TempDir,
    buf: Option<Buffer>,
    seqs: HashMap<String, u64>,
    next_uid: u64,
    /// Durable, unacked records, in order (the model).
    durable: VecDeque<u64>,
    /// Appended, not yet flushed.
    pending: Vec<u64>,
    /// Acked records (may come back after a crash or restart, as duplicates).
    acked: BTreeSet<u64>,
    /// Read and not yet acked, in order.
    inflight: VecDeque<(RecordId, Stored)>,
    /// Highest seq ever durable per device: a new seq must be above it.
    durable_seq: HashMap<String, u64>,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let buf = Buffer::open(dir.path(), &cfg()).unwrap();
        Harness {
            dir,
            buf: Some(buf),
            seqs: HashMap::new(),
            next_uid: 0,
            durable: VecDeque::new(),
            pending: Vec::new(),
            acked: BTreeSet::new(),
            inflight: VecDeque::new(),
            durable_seq: HashMap::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn buf(&self) -> &Buffer {
        self.buf.as_ref().unwrap()
    }

    fn reopen(&mut self, flush_first: bool) {
        if flush_first {
            self.buf().flush_blocking().unwrap();
        }
        self.buf = None;
        let buf = reopen(self.dir.path());
        // Everything that survived, in order.
        let mut got = Vec::new();
        while let Some(recs) = buf.read_next().unwrap() {
            got.extend(recs.into_iter().map(|(_, r)| r));
        }
        buf.rewind();
        let ids: Vec<u64> = got.iter().map(uid).collect();
        // Order: strictly increasing (FIFO, no record twice).
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "not FIFO after reopen: {ids:?}"
        );
        let present: BTreeSet<u64> = ids.iter().copied().collect();
        // Nothing durable and unacked is lost.
        for d in &self.durable {
            assert!(present.contains(d), "durable record {d} lost");
        }
        // Anything else is a surviving pending record (a prefix of them) or a duplicate
        // of an acked one.
        let pending: BTreeSet<u64> = self.pending.iter().copied().collect();
        let mut survived = Vec::new();
        for id in &ids {
            if self.durable.contains(id) {
                continue;
            }
            if pending.contains(id) {
                survived.push(*id);
            } else {
                assert!(self.acked.contains(id), "record {id} appeared from nowhere");
            }
        }
        assert_eq!(
            &self.pending[..survived.len()],
            &survived[..],
            "survivors are not a prefix"
        );
        // Seq persistence: the next seq is above every seq that survived.
        let next = buf.next_seqs().unwrap();
        for r in &got {
            assert!(
                next.get(&r.device_id).copied().unwrap_or(0) > r.seq,
                "seq {} of {} would be reused",
                r.seq,
                r.device_id
            );
        }
        for (dev, s) in &self.durable_seq {
            assert!(
                next.get(dev).copied().unwrap_or(0) > *s,
                "durable seq of {dev} would be reused"
            );
        }
        // New model: what the buffer now holds is durable.
        self.durable = ids.into_iter().collect();
        self.acked.retain(|a| !present.contains(a));
        self.pending.clear();
        self.inflight.clear();
        self.seqs = next;
        for r in &got {
            let e = self.durable_seq.entry(r.device_id.clone()).or_insert(0);
            *e = (*e).max(r.seq);
        }
        self.buf = Some(buf);
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Append { device, n } => {
                let dev = format!("d{device}");
                let mut recs = Vec::new();
                for _ in 0..n {
                    let seq = self.seqs.entry(dev.clone()).or_insert(0);
                    recs.push(record(device, *seq, self.next_uid));
                    self.pending.push(self.next_uid);
                    *seq += 1;
                    self.next_uid += 1;
                }
                let out = self.buf().append(&recs, 0).unwrap();
                assert_eq!(out.accepted, n);
                assert_eq!(out.dropped, 0);
            }
            Op::Flush => {
                let b = self.buf.as_ref().unwrap();
                self.rt.block_on(b.flush()).unwrap();
                for id in self.pending.drain(..) {
                    self.durable.push_back(id);
                }
                // Track durable seqs: every record appended so far is durable now.
                for (dev, next) in &self.seqs {
                    if *next > 0 {
                        self.durable_seq.insert(dev.clone(), next - 1);
                    }
                }
            }
            Op::Read => {
                if let Some(recs) = self.buf().read_next().unwrap() {
                    for (id, r) in recs {
                        // Only durable records are readable, in model order after the
                        // ones already in flight.
                        let u = uid(&r);
                        assert!(
                            self.durable.contains(&u),
                            "read a record {u} that is not durable"
                        );
                        if let Some((_, last)) = self.inflight.back() {
                            assert!(uid(last) < u, "read out of order");
                        }
                        self.inflight.push_back((id, r));
                    }
                }
            }
            Op::Ack { n } => {
                for _ in 0..n {
                    let Some((id, r)) = self.inflight.pop_front() else {
                        break;
                    };
                    self.buf().ack(id).unwrap();
                    let u = uid(&r);
                    self.durable.retain(|d| *d != u);
                    self.acked.insert(u);
                }
            }
            Op::Rewind => {
                self.inflight.clear();
                self.buf().rewind();
            }
            Op::Restart => self.reopen(true),
            Op::Crash => self.reopen(false),
        }
        // Stats agree with the model (pending records are counted as buffered too).
        let s = self.buf().stats();
        assert_eq!(s.records, (self.durable.len() + self.pending.len()) as u64);
        assert_eq!(s.per_device.values().sum::<u64>(), s.records);
        assert_eq!(s.chunks == 0, s.records == 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn buffer_behaves_like_a_durable_fifo_queue(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        for op in ops {
            h.apply(op);
        }
        // Finally everything durable can be read in order and acked to empty.
        h.reopen(true);
        let mut n = 0;
        while let Some(recs) = h.buf().read_next().unwrap() {
            for (id, _) in recs {
                h.buf().ack(id).unwrap();
                n += 1;
            }
        }
        prop_assert_eq!(n, h.durable.len());
        prop_assert_eq!(h.buf().stats().records, 0);
        prop_assert_eq!(h.buf().stats().chunks, 0);
    }
}

#[test]
fn drop_oldest_drops_unread_chunks_and_counts_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let c = BufferConfig {
        max_bytes: 64 * 1024,
        records_per_chunk: 10,
        ..cfg()
    };
    let b = Buffer::open(dir.path(), &c).unwrap();
    let mut total_dropped = 0;
    let mut seq = 0;
    for _ in 0..100 {
        let recs: Vec<Stored> = (0..10)
            .map(|_| {
                let mut r = record(0, seq, seq);
                r.payload = incompressible(seq);
                seq += 1;
                r
            })
            .collect();
        total_dropped += b.append(&recs, 0).unwrap().dropped;
    }
    let s = b.stats();
    assert!(
        s.bytes <= c.max_bytes,
        "cap kept: {} > {}",
        s.bytes,
        c.max_bytes
    );
    assert_eq!(
        s.records + total_dropped,
        1000,
        "every record is buffered or counted as dropped"
    );
    assert_eq!(s.unreported_drops, total_dropped);
    // The survivors are the newest ones, in order.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(b.flush()).unwrap();
    let mut got = Vec::new();
    while let Some(recs) = b.read_next().unwrap() {
        got.extend(recs.into_iter().map(|(_, r)| r.seq));
    }
    assert_eq!(got.len() as u64, s.records);
    assert_eq!(*got.last().unwrap(), 999);
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1));
    // Reporting the drops clears the persisted count, atomically with the report.
    let report = record(1, 0, 5000);
    b.append(&[report], total_dropped).unwrap();
    assert_eq!(b.unreported_drops(), 0);
}

#[test]
fn reject_new_refuses_what_does_not_fit_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let c = BufferConfig {
        max_bytes: 64 * 1024,
        records_per_chunk: 10,
        overflow: OverflowPolicy::RejectNew,
        ..cfg()
    };
    let b = Buffer::open(dir.path(), &c).unwrap();
    let mut accepted = 0;
    let mut rejected = 0;
    for i in 0..100u64 {
        let recs: Vec<Stored> = (0..10)
            .map(|j| {
                let mut r = record(0, i * 10 + j, i * 10 + j);
                r.payload = incompressible(i * 10 + j);
                r
            })
            .collect();
        let out = b.append(&recs, 0).unwrap();
        accepted += out.accepted;
        rejected += out.rejected;
    }
    assert!(rejected > 0);
    assert_eq!(accepted + rejected, 1000);
    assert_eq!(b.stats().records, accepted as u64);
    assert!(b.stats().bytes <= c.max_bytes);
    // The next seq persisted is right after the last accepted record.
    assert_eq!(b.next_seqs().unwrap()["d0"], accepted as u64);
}
