//! The durable outbox: every record lives here from ingest until Kafka acknowledges it.
//!
//! # Invariants
//!
//! 1. **A record is deleted only after its delivery report.** The forwarder calls
//!    [`Buffer::ack`] for a record once rdkafka reported it written; a chunk leaves sled
//!    when every record in it is acked (or dead-lettered, which is itself a durable write).
//! 2. **Nothing leaves before it is durable.** Appends go to sled immediately but become
//!    visible to the forwarder ([`Buffer::read_next`]) only after a [`Buffer::flush`] that
//!    started after the append. So a record that reached Kafka always survives a crash,
//!    and a `seq` seen downstream can never be handed out again with other contents.
//! 3. **`seq` never repeats.** The next `seq` of each device is written in the same sled
//!    batch as the records it numbers; sled applies a batch atomically, so after a crash
//!    either both are there or neither.
//! 4. **Every loss is counted.** A record leaves the buffer unacked only through the
//!    overflow policy (counted as dropped, and the count persisted until an event reports
//!    it) or the dead-letter tree (permanent broker rejection).
//! 5. **FIFO.** Chunk keys are big-endian `u64`s that only grow, so sled's key order is
//!    append order. Within a chunk, records keep their append order.
//!
//! # On-disk format (sled trees)
//!
//! | tree     | key                        | value                                            |
//! |----------|----------------------------|--------------------------------------------------|
//! | `outbox` | `c` + chunk id, u64 BE     | lz4 block (size-prefixed) of a CBOR array of [`Stored`] |
//! | `outbox` | `s/<device>`               | next seq of that device, u64 BE                  |
//! | `outbox` | `u`                        | dropped records not yet reported by an event     |
//! | `dead`   | dead-letter id, u64 BE     | CBOR [`DeadLetter`]                              |
//!
//! Chunks and counters share one tree because a sled batch is atomic within a tree.
//! Chunks are lz4-compressed: sled keeps recently written values resident regardless of
//! `cache_capacity`, so the bytes handed to sled set both the memory a backlog costs and
//! the time a flush takes; JSON records compress about 4× (measured in BENCHMARKS.md).
//!
//! Many records per sled value is what makes this fast: sled's cost is per key, so 64
//! records per value append about ten times faster than one per key (design.md).
//!
//! # Acks in memory, deletes per chunk
//!
//! Which records of a chunk are acked is kept only in memory. After a crash, a partly
//! delivered chunk is read again and its unacked *and* acked records are sent again:
//! duplicates carry the same `event_id` and `seq`, so consumers drop them. That is the
//! at-least-once promise across crashes.
//!
//! # Overflow
//!
//! `max_bytes` caps the encoded size of buffered chunks. With `drop_oldest`, room is made
//! by deleting the oldest chunks the forwarder has *not yet read* (records already handed
//! to the producer will still be delivered, so dropping them would count a loss that does
//! not happen); if every buffered chunk is in flight, the append goes through and the cap
//! is exceeded by at most the in-flight window. With `reject_new`, the records that do
//! not fit are refused and the caller counts them. sled reclaims disk space lazily, so
//! the file can stay larger than `max_bytes` for a while after a drain.
//!
//! # Threads
//!
//! One ingest task appends and flushes; one forwarder reads and acks; `/status` reads
//! stats. A mutex guards the in-memory index; sled calls happen outside it except where
//! the order of index change and write must be atomic (append).

mod model_test;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{BufferConfig, OverflowPolicy};
use crate::record::{unix_ms, Stored};

const CHUNK_PREFIX: u8 = b'c';
const SEQ_PREFIX: &[u8] = b"s/";
const UNREPORTED: &[u8] = b"u";

/// Errors of the buffer. All are sled or corruption errors: fatal for the agent.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("buffer chunk {chunk} is corrupt: {message}")]
    Corrupt { chunk: u64, message: String },
    #[error("cannot encode buffer chunk: {0}")]
    Encode(String),
}

/// Where a record sits: its chunk and its index in the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    pub chunk: u64,
    pub index: u32,
}

/// What happened to an append.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Records written (a prefix of those given).
    pub accepted: usize,
    /// Records refused under `reject_new` (the suffix).
    pub rejected: usize,
    /// Older records deleted under `drop_oldest` to make room.
    pub dropped: u64,
}

/// A record the broker refused for good, kept for a human to look at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub record: Stored,
    pub reason: String,
    pub at_ms: u64,
}

/// Figures for `/status`, `/metrics` and `labgate buffer stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub records: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub oldest_age_seconds: f64,
    pub per_device: BTreeMap<String, u64>,
    pub dead_letters: u64,
    pub unreported_drops: u64,
    pub disk_bytes: u64,
}

#[derive(Debug)]
struct ChunkInfo {
    len: u32,
    bytes: u64,
    first_ms: u64,
    /// One bit per record: delivered (or dead-lettered).
    acked: Vec<u64>,
    unacked: u32,
    /// Per record, its device as an index into `State::device_names` (so an ack needs
    /// only the record's id).
    devices: Vec<u16>,
}

impl ChunkInfo {
    fn is_acked(&self, i: u32) -> bool {
        self.acked[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set_acked(&mut self, i: u32) -> bool {
        let word = &mut self.acked[(i / 64) as usize];
        let bit = 1 << (i % 64);
        let fresh = *word & bit == 0;
        *word |= bit;
        fresh
    }
}

#[derive(Debug, Default)]
struct State {
    index: BTreeMap<u64, ChunkInfo>,
    next_chunk: u64,
    /// Chunks with a smaller id are flushed and may be read.
    durable_end: u64,
    /// The next chunk the forwarder will read; older ones are in flight or done.
    read_cursor: u64,
    bytes: u64,
    records: u64,
    /// Unacked records per interned device.
    per_device: Vec<u64>,
    next_dead: u64,
    dead_letters: u64,
    unreported_drops: u64,
    /// Interned device ids (devices come from config, so there are few).
    device_names: Vec<String>,
    device_index: HashMap<String, u16>,
}

impl State {
    fn intern(&mut self, device: &str) -> u16 {
        if let Some(i) = self.device_index.get(device) {
            return *i;
        }
        // Past u16::MAX distinct devices, per-device figures share the last slot.
        let i = u16::try_from(self.device_names.len()).unwrap_or(u16::MAX);
        if usize::from(i) == self.device_names.len() {
            self.device_names.push(device.to_string());
            self.per_device.push(0);
        }
        self.device_index.insert(device.to_string(), i);
        i
    }

    fn info_for(&mut self, recs: &[Stored], bytes: usize) -> ChunkInfo {
        let len = recs.len() as u32;
        ChunkInfo {
            len,
            bytes: bytes as u64,
            first_ms: recs.first().map_or(0, |r| r.ingested_ms),
            acked: vec![0; recs.len().div_ceil(64).max(1)],
            unacked: len,
            devices: recs.iter().map(|r| self.intern(&r.device_id)).collect(),
        }
    }

    fn add_device_counts(&mut self, info: &ChunkInfo) {
        for d in &info.devices {
            self.per_device[usize::from(*d)] += 1;
        }
    }

    fn dec_device(&mut self, d: u16) {
        if let Some(n) = self.per_device.get_mut(usize::from(d)) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The sled outbox. See the module docs for its invariants.
pub struct Buffer {
    store: Arc<store::Store>,
    db: sled::Db,
    outbox: sled::Tree,
    dead: sled::Tree,
    max_bytes: u64,
    overflow: OverflowPolicy,
    per_chunk: usize,
    state: Mutex<State>,
    /// Bumped after every flush so the forwarder wakes when new records are readable.
    durable_tx: watch::Sender<u64>,
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn chunk_key(id: u64) -> [u8; 9] {
    let mut k = [CHUNK_PREFIX; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn from_be(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir` and rebuilds its index from disk.
    pub fn open(dir: &Path, cfg: &BufferConfig) -> Result<Buffer, BufferError> {
        let store = Arc::new(store::open(dir, cfg.cache_capacity).map_err(sled::Error::Io)?);
        let db = store.db().clone();
        let outbox = db.open_tree("outbox")?;
        let dead = db.open_tree("dead")?;
        let mut st = State::default();
        for kv in outbox.scan_prefix([CHUNK_PREFIX]) {
            let (k, v) = kv?;
            let id = from_be(&k[1..]).ok_or(BufferError::Corrupt {
                chunk: 0,
                message: "chunk key is not 9 bytes".into(),
            })?;
            let recs = decode(id, &v)?;
            st.records += recs.len() as u64;
            st.bytes += v.len() as u64;
            let info = st.info_for(&recs, v.len());
            st.add_device_counts(&info);
            st.index.insert(id, info);
            st.next_chunk = id + 1;
        }
        st.durable_end = st.next_chunk;
        st.read_cursor = st.index.keys().next().copied().unwrap_or(st.next_chunk);
        if let Some(kv) = dead.last()? {
            st.next_dead = from_be(&kv.0).map_or(0, |n| n + 1);
        }
        st.dead_letters = dead.len() as u64;
        st.unreported_drops = outbox
            .get(UNREPORTED)?
            .and_then(|v| from_be(&v))
            .unwrap_or(0);
        let (durable_tx, _) = watch::channel(0);
        Ok(Buffer {
            store,
            db,
            outbox,
            dead,
            max_bytes: cfg.max_bytes,
            overflow: cfg.overflow,
            per_chunk: cfg.records_per_chunk,
            state: Mutex::new(st),
            durable_tx,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the index half-updated in a way
        // that matters more than stopping would; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `seq` of every device seen so far.
    pub fn next_seqs(&self) -> Result<HashMap<String, u64>, BufferError> {
        let mut out = HashMap::new();
        for kv in self.outbox.scan_prefix(SEQ_PREFIX) {
            let (k, v) = kv?;
            let dev = String::from_utf8_lossy(&k[SEQ_PREFIX.len()..]).into_owned();
            out.insert(dev, from_be(&v).unwrap_or(0));
        }
        Ok(out)
    }

    /// Dropped records not yet reported by an event.
    pub fn unreported_drops(&self) -> u64 {
        self.state().unreported_drops
    }

    /// Appends `records` (already stamped, in order) in one atomic sled batch together
    /// with each device's next seq. `reported_drops` of the unreported-drop count are
    /// marked reported in the same batch (the caller is appending the event that reports
    /// them). Not durable until the next [`Buffer::flush`].
    pub fn append(
        &self,
        records: &[Stored],
        reported_drops: u64,
    ) -> Result<AppendOutcome, BufferError> {
        let mut out = AppendOutcome::default();
        let mut encoded: Vec<(Vec<u8>, &[Stored])> = Vec::new();
        for part in records.chunks(self.per_chunk) {
            encoded.push((encode(part)?, part));
        }
        let mut st = self.state();
        let mut batch = sled::Batch::default();
        let mut incoming: u64 = 0;
        let mut keep = encoded.len();
        for (i, (bytes, _)) in encoded.iter().enumerate() {
            if self.overflow == OverflowPolicy::RejectNew
                && st.bytes + incoming + bytes.len() as u64 > self.max_bytes
            {
                keep = i;
                break;
            }
            incoming += bytes.len() as u64;
        }
        // Make room under drop_oldest: unread chunks only, oldest first.
        let mut dropped_chunks = Vec::new();
        if self.overflow == OverflowPolicy::DropOldest {
            let mut excess = (st.bytes + incoming).saturating_sub(self.max_bytes);
            for (id, info) in st.index.range(st.read_cursor..) {
                if excess == 0 {
                    break;
                }
                excess = excess.saturating_sub(info.bytes);
                dropped_chunks.push(*id);
            }
        }
        for id in dropped_chunks {
            let Some(info) = st.index.remove(&id) else {
                continue;
            };
            for (i, d) in info.devices.iter().enumerate() {
                if !info.is_acked(i as u32) {
                    st.dec_device(*d);
                }
            }
            st.records -= u64::from(info.unacked);
            st.bytes -= info.bytes;
            out.dropped += u64::from(info.unacked);
            batch.remove(&chunk_key(id));
            if st.read_cursor == id {
                st.read_cursor = id + 1;
            }
        }
        let mut next_seq: HashMap<&str, u64> = HashMap::new();
        let mut new_infos = Vec::with_capacity(keep);
        for (bytes, part) in encoded.iter().take(keep) {
            let id = st.next_chunk + new_infos.len() as u64;
            batch.insert(&chunk_key(id), bytes.as_slice());
            for r in part.iter() {
                next_seq.insert(&r.device_id, r.seq + 1);
            }
            let info = st.info_for(part, bytes.len());
            new_infos.push((id, info));
            out.accepted += part.len();
        }
        out.rejected = records.len() - out.accepted;
        for (dev, seq) in &next_seq {
            let mut k = SEQ_PREFIX.to_vec();
            k.extend_from_slice(dev.as_bytes());
            batch.insert(k, &be(*seq));
        }
        let total = st.unreported_drops + out.dropped;
        let unreported = total - reported_drops.min(total);
        if unreported != st.unreported_drops {
            batch.insert(UNREPORTED, &be(unreported));
        }
        // One batch on one tree: records, their seq counters and the drop count land
        // together or not at all.
        self.outbox.apply_batch(batch)?;
        for (id, info) in new_infos {
            st.records += u64::from(info.len);
            st.bytes += info.bytes;
            st.add_device_counts(&info);
            st.index.insert(id, info);
            st.next_chunk = id + 1;
        }
        st.unreported_drops = unreported;
        Ok(out)
    }

    /// Makes every earlier append durable, then lets the forwarder read it.
    pub async fn flush(&self) -> Result<(), BufferError> {
        let upto = self.state().next_chunk;
        self.store.sync().await?;
        let mut st = self.state();
        if upto > st.durable_end {
            st.durable_end = upto;
        }
        drop(st);
        self.durable_tx.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Another tree in the same store, for state that must survive restarts alongside
    /// the records (the command replay store), with the store's durability point.
    pub fn side_tree(&self, name: &str) -> Result<(sled::Tree, Arc<store::Store>), BufferError> {
        Ok((self.db.open_tree(name)?, self.store.clone()))
    }

    /// Synchronous [`Buffer::flush`], for shutdown paths outside the runtime.
    pub fn flush_blocking(&self) -> Result<(), BufferError> {
        let upto = self.state().next_chunk;
        self.store.sync_blocking()?;
        let mut st = self.state();
        st.durable_end = st.durable_end.max(upto);
        Ok(())
    }

    /// Wakes when a flush made new records readable.
    pub fn subscribe_durable(&self) -> watch::Receiver<u64> {
        self.durable_tx.subscribe()
    }

    /// The next durable chunk at or after the read cursor, with its unacked records, and
    /// moves the cursor past it. `None` when everything durable has been read.
    pub fn read_next(&self) -> Result<Option<Vec<(RecordId, Stored)>>, BufferError> {
        loop {
            let (id, acked) = {
                let mut st = self.state();
                let Some((&id, info)) = st.index.range(st.read_cursor..).next() else {
                    st.read_cursor = st.next_chunk.max(st.read_cursor);
                    return Ok(None);
                };
                if id >= st.durable_end {
                    return Ok(None);
                }
                let acked = info.acked.clone();
                st.read_cursor = id + 1;
                (id, acked)
            };
            let Some(v) = self.outbox.get(chunk_key(id))? else {
                continue; // dropped or fully acked meanwhile
            };
            let recs = decode(id, &v)?;
            let out: Vec<(RecordId, Stored)> = recs
                .into_iter()
                .enumerate()
                .filter(|(i, _)| acked[i / 64] & (1 << (i % 64)) == 0)
                .map(|(i, r)| {
                    (
                        RecordId {
                            chunk: id,
                            index: i as u32,
                        },
                        r,
                    )
                })
                .collect();
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
    }

    /// One buffered record, if it is still there.
    pub fn get(&self, id: RecordId) -> Result<Option<Stored>, BufferError> {
        let Some(v) = self.outbox.get(chunk_key(id.chunk))? else {
            return Ok(None);
        };
        Ok(decode(id.chunk, &v)?.into_iter().nth(id.index as usize))
    }

    /// Moves the read cursor back to the oldest chunk with unacked records, so that
    /// everything not yet acknowledged is read (and sent) again, in order.
    pub fn rewind(&self) {
        let mut st = self.state();
        st.read_cursor = st.index.keys().next().copied().unwrap_or(st.next_chunk);
    }

    /// Marks a record delivered; deletes its chunk once all of it is. Called from the
    /// producer's delivery callback, so it needs only the record's id.
    pub fn ack(&self, id: RecordId) -> Result<(), BufferError> {
        let remove = {
            let mut st = self.state();
            let Some(info) = st.index.get_mut(&id.chunk) else {
                return Ok(()); // dropped meanwhile, or a duplicate report
            };
            if id.index >= info.len || !info.set_acked(id.index) {
                return Ok(());
            }
            info.unacked -= 1;
            let done = info.unacked == 0;
            let dev = info.devices[id.index as usize];
            st.records -= 1;
            st.dec_device(dev);
            if done {
                if let Some(info) = st.index.remove(&id.chunk) {
                    st.bytes -= info.bytes;
                }
            }
            done
        };
        if remove {
            self.outbox.remove(chunk_key(id.chunk))?;
        }
        Ok(())
    }

    /// Moves a record the broker refused for good to the dead-letter tree, then acks it.
    pub fn dead_letter(
        &self,
        id: RecordId,
        record: &Stored,
        reason: &str,
    ) -> Result<(), BufferError> {
        let n = {
            let mut st = self.state();
            st.next_dead += 1;
            st.dead_letters += 1;
            st.next_dead - 1
        };
        let dl = DeadLetter {
            record: record.clone(),
            reason: reason.to_string(),
            at_ms: unix_ms(std::time::SystemTime::now()),
        };
        let mut v = Vec::new();
        ciborium::into_writer(&dl, &mut v).map_err(|e| BufferError::Encode(e.to_string()))?;
        self.dead.insert(be(n), v)?;
        self.ack(id)
    }

    /// Every dead letter, oldest first (for operators and tests).
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, BufferError> {
        let mut out = Vec::new();
        for kv in self.dead.iter() {
            let (k, v) = kv?;
            let dl: DeadLetter =
                ciborium::from_reader(v.as_ref()).map_err(|e| BufferError::Corrupt {
                    chunk: from_be(&k).unwrap_or(0),
                    message: format!("dead letter: {e}"),
                })?;
            out.push(dl);
        }
        Ok(out)
    }

    pub fn stats(&self) -> Stats {
        let st = self.state();
        let now = unix_ms(std::time::SystemTime::now());
        let oldest = st
            .index
            .values()
            .next()
            .map_or(0.0, |i| now.saturating_sub(i.first_ms) as f64 / 1000.0);
        Stats {
            records: st.records,
            bytes: st.bytes,
            chunks: st.index.len() as u64,
            oldest_age_seconds: oldest,
            per_device: st
                .device_names
                .iter()
                .zip(&st.per_device)
                .filter(|(_, n)| **n > 0)
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            dead_letters: st.dead_letters,
            unreported_drops: st.unreported_drops,
            disk_bytes: self.db.size_on_disk().unwrap_or(0),
        }
    }

    /// Ratio of buffered bytes to the cap, for health.
    pub fn fill_ratio(&self) -> f64 {
        self.state().bytes as f64 / self.max_bytes as f64
    }
}

fn encode(part: &[Stored]) -> Result<Vec<u8>, BufferError> {
    let mut v = Vec::with_capacity(
        part.iter()
            .map(|r| r.payload.len() + r.key.len() + 48)
            .sum(),
    );
    ciborium::into_writer(&part, &mut v).map_err(|e| BufferError::Encode(e.to_string()))?;
    Ok(lz4_flex::compress_prepend_size(&v))
}

fn decode(chunk: u64, v: &[u8]) -> Result<Vec<Stored>, BufferError> {
    let corrupt = |message: String| BufferError::Corrupt { chunk, message };
    let raw = lz4_flex::decompress_size_prepended(v).map_err(|e| corrupt(format!("lz4: {e}")))?;
    ciborium::from_reader(raw.as_slice()).map_err(|e| corrupt(e.to_string()))
}
