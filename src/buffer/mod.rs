//! The durable outbox: every record lives here from ingest until Kafka acknowledges it.
//!
//! # Invariants
//!
//! 1. **A record is deleted only after its delivery report.** The forwarder calls
//!    [`Buffer::ack`] for a record once rdkafka reported it written; a chunk leaves sled
//!    when every record in it is acked (or dead-lettered, which is itself a durable write).
//! 2. **Nothing leaves before it is durable.** Appends go to sled immediately but become
//!    visible to the forwarder ([`Buffer::read_next`]) only after a [`Buffer::flush`] that
//!    started after the append. A flush is the store's durability point
//!    ([`store::Store::sync`]): sled's flush, then fdatasync of what sled wrote, so it
//!    holds through a power cut, not only a crash. So a record that reached Kafka always
//!    survives, and a `seq` seen downstream can never be handed out again with other
//!    contents.
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
//! | `outbox` | `c` + chunk id, u64 BE     | lz4 block (size-prefixed) of the chunk's [`Stored`] records: byte `0x01`, then varints and length-prefixed fields (`CHUNK_V1`); chunks written before that layout hold a CBOR array, still read |
//! | `outbox` | `s/<device>`               | next seq of that device, u64 BE                  |
//! | `outbox` | `u`                        | dropped records not yet reported by an event     |
//! | `dead`   | dead-letter id, u64 BE     | CBOR [`DeadLetter`]                              |
//! | `quarantine` | chunk key as in `outbox` | the raw bytes of a chunk that did not decode    |
//! | side trees (`command_ids`) | owner's     | owner's (see [`SideTree`])                       |
//!
//! Chunks and counters share one tree because a sled batch is atomic within a tree.
//! Chunks are lz4-compressed: sled keeps recently written leaves (up to 16 values each)
//! resident, so the size of a value sets how much memory that takes and how long a
//! flush takes; JSON records compress about 4× (measured in BENCHMARKS.md). The
//! vendored sled (`vendor/sled/VENDORED.md`) holds that close to `cache_capacity`;
//! published 0.34.7 kept hundreds of leaves whatever it said.
//!
//! Many records per sled value is what makes this fast: sled's cost is per key, so 64
//! records per value append about ten times faster than one per key (measured with
//! sled 0.34.7 and 200-byte records: ~150k records/s one per key, ~1.5M/s at 64 per value).
//! The default is 64 per value (see `records_per_chunk`).
//!
//! # Memory does not grow with the backlog
//!
//! For a chunk the forwarder has not read, memory holds its id and record count only
//! (2 bytes a chunk, in runs of consecutive ids). Sizes and devices are in sled and are
//! read back on the rare paths that need them (dropping to make room, the oldest age).
//! Chunks the forwarder has read keep their details (acked bits, each record's device)
//! until fully acked; there are at most as many as the producer's in-flight window
//! covers.
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
//! `max_bytes` caps what the store takes on disk. The buffer counts the encoded size of
//! what it keeps (chunks, dead letters, side trees), and sled's log takes more than that:
//! a leaf is rewritten as values are added, and the old copies stay until the cleaner
//! moves a segment's live pages out, which it does once at most 80 % of the segment is
//! live (`store`). So every [`DISK_CHECK_EVERY`] the buffer measures the store's
//! overhead, the bytes its log takes (the directory's allocated blocks less the free
//! segments sled reuses before it grows the file) per byte it keeps (1.1-1.2 while a
//! backlog grows), and the cap on encoded bytes is seven eighths of `max_bytes` divided
//! by it.
//! The overhead is measured only while at least [`OVERHEAD_MIN_SAMPLE`] and an eighth
//! of `max_bytes` are kept:
//! below that sled's fixed files (a few MB) dominate, and the last figure (or none: the
//! cap on encoded bytes is then `max_bytes`) holds. The overhead stops growth; it never
//! drops records already kept (the cap does not fall below what the last check found),
//! so a data dir written by a version that capped encoded bytes alone stays larger than
//! `max_bytes` until Kafka has taken them. Under a long outage with `drop_oldest` the
//! kept bytes stay level while sled's garbage creeps (measured: the data dir grew by a
//! fifth while the backlog turned over twelve times, to 1.06 × `max_bytes`, which
//! [`DISK_HEADROOM`] is for). [`Stats::cap_bytes`] is the cap in force.
//!
//! With `drop_oldest`, room is made
//! by deleting the oldest chunks the forwarder has *not yet read* (records already handed
//! to the producer will still be delivered, so dropping them would count a loss that does
//! not happen); if every buffered chunk is in flight, the append goes through and the cap
//! is exceeded by at most the in-flight window. With `reject_new`, the records that do
//! not fit are refused and the caller counts them. sled reclaims disk space lazily: after
//! a drain the file can stay at its size (its free segments are written again before it
//! grows).
//!
//! The cap covers every tree: records, dead letters (at most a quarter of the cap;
//! past it the oldest are removed) and side trees such as the command replay ids. And
//! when the filesystem has less free space than the floor (`min_free_bytes`, by default
//! 64 MiB or a tenth of the filesystem), new records are refused under either policy:
//! dropping old chunks cannot make room at once in a log-structured store (measured on
//! a 32 MiB tmpfs: sled's file kept growing to ENOSPC while old chunks were dropped).
//! The floor leaves room for what still has to write: acks, deletes, sled's own
//! housekeeping.
//!
//! # Damage
//!
//! A chunk that does not decode (a bad sector, a bug) is moved to the `quarantine` tree,
//! at open or when the forwarder reads it; its records are counted as lost, and the rest
//! of the backlog opens and drains. A storage error (ENOSPC, EIO, EROFS) is returned to
//! the caller: sled latches I/O errors, so the agent exits and starts again on what is
//! on disk (see `ingest::run`).
//!
//! # Threads
//!
//! One ingest task appends and flushes; one forwarder reads and acks; `/status` reads
//! stats. A mutex guards the in-memory index; sled calls happen outside it except where
//! the order of index change and write must be atomic (append).

/// The `[buffer]` config section.
pub mod config;
mod model_test;
/// sled and the durability point.
pub mod store;

pub use config::{BufferConfig, OverflowPolicy};

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::record::{unix_ms, Stored, TopicKind};

const CHUNK_PREFIX: u8 = b'c';
const SEQ_PREFIX: &[u8] = b"s/";
const UNREPORTED: &[u8] = b"u";
/// Source positions (how far a folder device has read each file), written in the same
/// batch as the records read up to them.
const CURSOR_PREFIX: &[u8] = b"p/";

/// A stored source position: its key and value.
pub type CursorEntry = (Vec<u8>, Vec<u8>);

/// A source position to store with an append: written only if the first `after`
/// records of the append were written (or dropped by the policy), so it never runs
/// ahead of what it stands for. `value: None` removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Records of the append this position covers.
    pub after: usize,
    /// The position's key (its owner chooses; stored under its own prefix).
    pub key: Vec<u8>,
    /// The position, or None to forget it.
    pub value: Option<Vec<u8>>,
}

/// Errors of the buffer. All are sled or corruption errors: fatal for the agent.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("buffer storage error ({kind}): {0}", kind = disk_error_kind(.0))]
    /// sled reported an error; the buffer can no longer promise durability.
    Sled(#[from] sled::Error),
    #[error("buffer chunk {chunk} is corrupt: {message}")]
    /// A stored chunk does not decode; it is quarantined, not dropped silently.
    Corrupt {
        /// The chunk's number.
        chunk: u64,
        /// What the decoder said.
        message: String,
    },
    #[error("cannot encode buffer chunk: {0}")]
    /// A chunk could not be encoded (a bug, not a disk fault).
    Encode(String),
}

/// What kind of disk trouble a storage error is, for logs and the
/// `labgate_buffer_errors_total{kind}` metric: `enospc`, `eio`, `erofs`, `other`.
pub fn disk_error_kind(e: &sled::Error) -> &'static str {
    match e {
        sled::Error::Io(io) => {
            // sled clones I/O errors into new ones that keep only the kind and the
            // original's Debug text (`Os { code: 5, … }`): read the code back from it.
            let code = io.raw_os_error().or_else(|| {
                let text = format!("{io:?}");
                let at = text.find("code: ")? + 6;
                let digits: String = text[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            });
            match code {
                Some(28) => "enospc",
                Some(5) => "eio",
                Some(30) => "erofs",
                _ if io.kind() == std::io::ErrorKind::StorageFull => "enospc",
                _ if io.kind() == std::io::ErrorKind::ReadOnlyFilesystem => "erofs",
                _ => "other",
            }
        }
        sled::Error::Corruption { .. } => "corruption",
        _ => "other",
    }
}

impl BufferError {
    /// The disk-error kind when this is a storage error.
    pub fn disk_kind(&self) -> Option<&'static str> {
        match self {
            BufferError::Sled(e) => Some(disk_error_kind(e)),
            _ => None,
        }
    }
}

/// Where a record sits: its chunk and its index in the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    /// The chunk's key (append order).
    pub chunk: u64,
    /// The record's place in its chunk.
    pub index: u32,
}

/// What happened to an append.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Records given that were dropped at once under `drop_oldest` (a prefix: one
    /// append larger than the room left); counted in `dropped` too.
    pub skipped: usize,
    /// Records written (those after `skipped`).
    pub accepted: usize,
    /// Records refused under `reject_new` or for lack of disk (the suffix).
    pub rejected: usize,
    /// Records deleted under `drop_oldest` to make room (older ones, and `skipped`).
    pub dropped: u64,
    /// The refusal was for lack of disk space (below the free-space floor), whatever
    /// the overflow policy.
    pub disk_full: bool,
}

impl AppendOutcome {
    /// Records given that were written or dropped by the policy (a prefix), as opposed
    /// to refused.
    pub fn handled(&self) -> usize {
        self.skipped + self.accepted
    }
}

/// A record the broker refused for good, kept for a human to look at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The record as it was buffered (requeued as it is).
    pub record: Stored,
    /// What the broker said.
    pub reason: String,
    /// When it was dead-lettered, Unix ms.
    pub at_ms: u64,
}

/// Figures for `/status`, `/metrics` and `labgate buffer stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Records waiting for Kafka.
    pub records: u64,
    /// Their encoded (compressed) bytes, under `cap_bytes` with the two below.
    pub bytes: u64,
    /// sled values holding them.
    pub chunks: u64,
    /// How long the oldest has waited.
    pub oldest_age_seconds: f64,
    /// Records waiting, by device.
    pub per_device: BTreeMap<String, u64>,
    /// Records the broker refused for good, kept for a person.
    pub dead_letters: u64,
    /// Encoded bytes of the dead-letter tree (counted against `max_bytes`).
    pub dead_letter_bytes: u64,
    /// Bytes of the other trees that count against `max_bytes` (command replay ids).
    pub side_bytes: u64,
    /// Records dropped by the overflow policy that no event has reported yet.
    pub unreported_drops: u64,
    /// What sled's files take on disk (it reclaims space lazily).
    pub disk_bytes: u64,
    /// Undecodable chunks moved aside to the `quarantine` tree.
    pub quarantined_chunks: u64,
    /// Free bytes on the data dir's filesystem at the last check.
    pub disk_free_bytes: u64,
    /// The free-space floor in force (`buffer.min_free_bytes`, or its default).
    pub disk_floor_bytes: u64,
    /// Free space is below `buffer.min_free_bytes`: the buffer counts as full.
    pub low_disk: bool,
    /// The cap in force on encoded bytes (records, dead letters and side trees): seven
    /// eighths of `max_bytes` over the store's measured overhead on disk.
    #[serde(default)]
    pub cap_bytes: u64,
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

/// The chunks the forwarder has not read yet, oldest first: their ids and record counts
/// only (2 bytes a chunk), so a long backlog costs little memory. Ids are consecutive
/// except where chunks were deleted out of order before a restart; each run of
/// consecutive ids is one entry.
#[derive(Debug, Default)]
struct Unread {
    runs: std::collections::VecDeque<(u64, std::collections::VecDeque<u16>)>,
}

impl Unread {
    fn push(&mut self, id: u64, len: u16) {
        match self.runs.back_mut() {
            Some((start, lens)) if *start + lens.len() as u64 == id => lens.push_back(len),
            _ => self.runs.push_back((id, [len].into())),
        }
    }
    /// Chunks held (there are few runs: one, plus one per gap found at open).
    fn chunks(&self) -> u64 {
        self.runs.iter().map(|(_, lens)| lens.len() as u64).sum()
    }
    fn front(&self) -> Option<(u64, u16)> {
        let (start, lens) = self.runs.front()?;
        Some((*start, *lens.front()?))
    }
    fn pop_front(&mut self) -> Option<(u64, u16)> {
        let (start, lens) = self.runs.front_mut()?;
        let len = lens.pop_front()?;
        let id = *start;
        *start += 1;
        if lens.is_empty() {
            self.runs.pop_front();
        }
        Some((id, len))
    }
}

#[derive(Debug, Default)]
struct State {
    /// Chunks the forwarder has read that still have unacked records. Bounded by the
    /// producer's in-flight window, not by the backlog.
    in_flight: BTreeMap<u64, ChunkInfo>,
    /// Chunks not read yet.
    unread: Unread,
    /// The oldest chunk's id and first ingest time, as last looked up for `stats`.
    oldest: Option<(u64, u64)>,
    next_chunk: u64,
    /// Chunks with a smaller id are flushed and may be read.
    durable_end: u64,
    /// Where the forwarder reads next: re-reads in-flight chunks at or after it (after a
    /// rewind), then the unread ones.
    read_cursor: u64,
    bytes: u64,
    records: u64,
    /// Unacked records per interned device.
    per_device: Vec<u64>,
    next_dead: u64,
    dead_letters: u64,
    dead_bytes: u64,
    /// Size of each dead letter, oldest first, for eviction under the cap.
    dead_sizes: std::collections::VecDeque<(u64, u64)>,
    quarantined: u64,
    /// Quarantined since the last [`Buffer::take_quarantined`]: (chunks, records known
    /// to be in them).
    quarantined_new: (u64, u64),
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

    fn info_for<'a>(
        &mut self,
        recs: impl ExactSizeIterator<Item = RecordRef<'a>>,
        bytes: usize,
    ) -> ChunkInfo {
        let n = recs.len();
        let mut first_ms = None;
        // A chunk's records mostly come from one device in runs: the last name's index
        // is kept, so a run costs a comparison, not a lookup, per record.
        let mut last: Option<(&str, u16)> = None;
        let devices = recs
            .map(|r| {
                first_ms.get_or_insert(r.ingested_ms);
                match last {
                    Some((name, i)) if name == r.device_id => i,
                    _ => {
                        let i = self.intern(r.device_id);
                        last = Some((r.device_id, i));
                        i
                    }
                }
            })
            .collect();
        ChunkInfo {
            len: n as u32,
            bytes: bytes as u64,
            first_ms: first_ms.unwrap_or(0),
            acked: vec![0; n.div_ceil(64).max(1)],
            unacked: n as u32,
            devices,
        }
    }

    /// Counts a chunk that is now in sled (appended, requeued, or found at open) as
    /// buffered and not yet read.
    fn add_chunk<'a>(
        &mut self,
        id: u64,
        devices: impl ExactSizeIterator<Item = &'a str>,
        bytes: usize,
    ) {
        let n = devices.len();
        self.records += n as u64;
        self.bytes += bytes as u64;
        for device in devices {
            let d = self.intern(device);
            self.per_device[usize::from(d)] += 1;
        }
        self.unread.push(id, chunk_len(n));
        self.next_chunk = id + 1;
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
    quarantine: sled::Tree,
    dir: PathBuf,
    max_bytes: u64,
    /// `buffer.max_records` (`u64::MAX` when unset).
    max_records: u64,
    /// `buffer.min_free_bytes` as configured (`None`: [`DEFAULT_MIN_FREE`] or a tenth
    /// of the filesystem).
    min_free_bytes: Option<u64>,
    overflow: OverflowPolicy,
    per_chunk: usize,
    /// Where appends encode: a chunk's bytes before compression, then every chunk of
    /// the append compressed one after another (sled copies them into its own).
    scratch: Mutex<(Vec<u8>, Vec<u8>)>,
    state: Mutex<State>,
    /// Bytes kept by side trees (replay ids), each counted against the cap.
    side_bytes: Mutex<Vec<Arc<AtomicU64>>>,
    disk: Mutex<DiskCheck>,
    /// A disk check is being taken (its syscalls run outside the `disk` lock, one at a
    /// time: on a disk that hangs, one caller waits, not every caller).
    checking: std::sync::atomic::AtomicBool,
    /// Bumped after every flush so the forwarder wakes when new records are readable.
    durable_tx: watch::Sender<u64>,
}

/// The last look at the disk, taken at most every [`DISK_CHECK_EVERY`]: free space
/// (statvfs), the store's overhead, its size on disk and the oldest record's age. HTTP
/// reads only this copy ([`Buffer::stats_cached`]), so a disk that stops answering does
/// not stop `/health` and `/metrics` from answering.
#[derive(Debug, Clone, Copy)]
struct DiskCheck {
    at: Option<Instant>,
    /// `size_on_disk` of the store at the check.
    disk_bytes: u64,
    free: u64,
    total: u64,
    /// Bytes sled's log takes per encoded byte kept (1 until measured; see the module
    /// docs).
    overhead: f64,
    /// What was kept at the last check: the cap does not fall below it. The measured
    /// overhead stops growth; it does not drop what is already kept. Dropping more
    /// than new records need makes sled rewrite more leaves, which raises the overhead
    /// again: tried, the cap fell to its floor (a third) while the data dir still grew.
    kept: u64,
}

impl DiskCheck {
    fn new(kept: u64) -> Self {
        DiskCheck {
            at: None,
            disk_bytes: 0,
            free: 0,
            total: 0,
            overhead: 1.0,
            kept,
        }
    }
}

/// The store's overhead is measured once at least this much is kept, and an eighth of
/// `max_bytes`: below that sled's fixed files (a few MB) would dominate the figure.
pub const OVERHEAD_MIN_SAMPLE: u64 = 8 << 20;

/// The overhead taken is at most this. sled's cleaner takes a segment once at most 80 %
/// of it is live, so the log settles near 1.25 plus the segments being written; a data
/// dir written by a version that cleaned at half settles near 2. A higher reading (a
/// cleaner that lags, a store written under other settings) does not shrink the cap
/// further.
const MAX_OVERHEAD: f64 = 3.0;

/// An eighth of `max_bytes` is left for what the store writes between two disk checks
/// and for sled's garbage, which creeps while the backlog turns over under
/// `drop_oldest` (`examples/backlog_probe.rs`, `MAX_BYTES` 256 MiB: with a sixteenth the
/// data dir reached 1.085 × `max_bytes` after six turnovers; with an eighth 1.06 × after
/// twelve, level over the last five).
const DISK_HEADROOM: u64 = 8;

/// What the files under `dir` take on disk: their allocated blocks, as `du` counts
/// them (for the store: sled's log, snapshots and `blobs/`). Unreadable entries count 0.
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) if m.is_file() => m.blocks().saturating_mul(512),
            _ => 0,
        })
        .fold(0u64, u64::saturating_add)
}

/// The free-space floor when `buffer.min_free_bytes` is not set (capped at a tenth of
/// the filesystem's size).
pub const DEFAULT_MIN_FREE: u64 = 64 << 20;

const DISK_CHECK_EVERY: Duration = Duration::from_millis(250);

impl Drop for Buffer {
    fn drop(&mut self) {
        // A background cleaning round holds the store; a buffer opened again on the
        // same directory right after this must not find it still open.
        self.store.wait_cleaning();
    }
}

/// A tree beside the buffer's own, in the same store: its writes become durable with the
/// store's sync, and the bytes it keeps count against `buffer.max_bytes`.
pub struct SideTree {
    /// The tree itself.
    pub tree: sled::Tree,
    /// The store, for its durability point (`Store::sync`).
    pub store: Arc<store::Store>,
    /// Bytes the owner keeps in the tree; it adds and subtracts as it writes.
    pub bytes: Arc<AtomicU64>,
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn devices_of<R: AsRecord>(part: &[R]) -> impl ExactSizeIterator<Item = &str> {
    part.iter().map(|r| r.record().device_id)
}

fn skipped_records<R>(parts: &[(Range<usize>, &[R])]) -> usize {
    parts.iter().map(|(_, p)| p.len()).sum()
}

/// Notes in `next` each device's next seq after `part`, later records winning: one
/// map update per run of one device's records, not one per record.
fn note_next_seqs<'a, R: AsRecord>(next: &mut HashMap<&'a str, u64>, part: &'a [R]) {
    for (i, r) in part.iter().enumerate() {
        let r = r.record();
        if part
            .get(i + 1)
            .is_none_or(|n| n.record().device_id != r.device_id)
        {
            next.insert(r.device_id, r.seq + 1);
        }
    }
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
        let quarantine = db.open_tree("quarantine")?;
        let mut st = State::default();
        for kv in outbox.scan_prefix([CHUNK_PREFIX]) {
            let (k, v) = kv?;
            let decoded = from_be(&k[1..])
                .ok_or_else(|| "chunk key is not 9 bytes".to_string())
                .and_then(|id| {
                    decode_spans(id, &v)
                        .map(|r| (id, r))
                        .map_err(|e| e.to_string())
                });
            let (id, (raw, spans)) = match decoded {
                Ok(x) => x,
                Err(message) => {
                    // One bad chunk must not keep the rest of the backlog from opening.
                    tracing::error!(key = ?k, %message, "undecodable buffer chunk moved to quarantine");
                    quarantine.insert(&k, v)?;
                    outbox.remove(&k)?;
                    st.quarantined_new.0 += 1;
                    continue;
                }
            };
            st.add_chunk(id, spans.iter().map(|s| s.view(&raw).device_id), v.len());
        }
        st.durable_end = st.next_chunk;
        st.read_cursor = st.unread.front().map_or(st.next_chunk, |(id, _)| id);
        if let Some(kv) = dead.last()? {
            st.next_dead = from_be(&kv.0).map_or(0, |n| n + 1);
        }
        for kv in dead.iter() {
            let (k, v) = kv?;
            st.dead_letters += 1;
            st.dead_bytes += v.len() as u64;
            st.dead_sizes
                .push_back((from_be(&k).unwrap_or(0), v.len() as u64));
        }
        st.quarantined = quarantine.len() as u64;
        st.unreported_drops = outbox
            .get(UNREPORTED)?
            .and_then(|v| from_be(&v))
            .unwrap_or(0);
        let (durable_tx, _) = watch::channel(0);
        let kept_at_open = st.bytes + st.dead_bytes;
        let b = Buffer {
            store,
            db,
            outbox,
            dead,
            quarantine,
            dir: dir.to_path_buf(),
            max_bytes: cfg.max_bytes,
            max_records: cfg.max_records.unwrap_or(u64::MAX),
            min_free_bytes: cfg.min_free_bytes,
            overflow: cfg.overflow,
            per_chunk: cfg.records_per_chunk,
            scratch: Mutex::default(),
            state: Mutex::new(st),
            side_bytes: Mutex::new(Vec::new()),
            disk: Mutex::new(DiskCheck::new(kept_at_open)),
            checking: std::sync::atomic::AtomicBool::new(false),
            durable_tx,
        };
        if b.state().quarantined_new.0 > 0 {
            // The moves into quarantine must be durable before anything relies on them.
            b.store.sync_blocking()?;
        }
        // The first disk check, so that no caller ever reads an empty one.
        b.refresh_disk();
        Ok(b)
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

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Dropped records not yet reported by an event.
    pub fn unreported_drops(&self) -> u64 {
        self.state().unreported_drops
    }

    /// Appends `records` (already stamped, in order) in one atomic sled batch together
    /// with each device's next seq. `reported_drops` of the unreported-drop count are
    /// marked reported in the same batch (the caller is appending the event that reports
    /// them). Not durable until the next [`Buffer::flush`].
    pub fn append<R: AsRecord>(
        &self,
        records: &[R],
        reported_drops: u64,
    ) -> Result<AppendOutcome, BufferError> {
        self.append_with(records, reported_drops, &[])
    }

    /// [`Buffer::append`], with source positions written in the same batch (those
    /// whose records were all handled; see [`Cursor`]).
    pub fn append_with<R: AsRecord>(
        &self,
        records: &[R],
        reported_drops: u64,
        cursors: &[Cursor],
    ) -> Result<AppendOutcome, BufferError> {
        let mut out = AppendOutcome::default();
        if self.low_disk() && (!records.is_empty() || !cursors.is_empty()) {
            // Below the floor nothing is written, under either policy: sled is
            // log-structured, so deleting old chunks to make room would itself append
            // to its log, and it reclaims the space only later. What is refused is
            // counted (`disk_full`); an MQTT message stays with its broker.
            out.rejected = records.len();
            out.disk_full = true;
            return Ok(out);
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let (body, packed) = &mut *scratch;
        for buf in [&mut *body, &mut *packed] {
            if buf.capacity() > SCRATCH_KEEP {
                // The last append was a large one: do not keep its size for good.
                *buf = Vec::new();
            }
        }
        packed.clear();
        let mut encoded: Vec<(Range<usize>, &[R])> = Vec::new();
        for part in records.chunks(self.per_chunk) {
            encoded.push((encode_into(part, body, packed)?, part));
        }
        let packed = &packed[..];
        let side = self.side_total();
        let cap_total = self.cap_bytes();
        let mut st = self.state();
        // The cap covers every tree.
        let cap = cap_total.saturating_sub(side + st.dead_bytes);
        let mut batch = sled::Batch::default();
        let mut incoming: u64 = 0;
        let mut incoming_records: u64 = 0;
        let mut keep = encoded.len();
        for (i, (bytes, part)) in encoded.iter().enumerate() {
            if self.overflow == OverflowPolicy::RejectNew
                && (st.bytes + incoming + bytes.len() as u64 > cap
                    || st.records + incoming_records + part.len() as u64 > self.max_records)
            {
                keep = i;
                break;
            }
            incoming += bytes.len() as u64;
            incoming_records += part.len() as u64;
        }
        // Make room under drop_oldest: unread chunks only, oldest first. Their sizes
        // and devices are read back from sled (overflow is the rare path; keeping them
        // in memory would make memory grow with the backlog).
        let mut skip = 0;
        if self.overflow == OverflowPolicy::DropOldest {
            let mut excess = (st.bytes + incoming).saturating_sub(cap);
            let mut excess_records =
                (st.records + incoming_records).saturating_sub(self.max_records);
            let mut dropped_ids = Vec::new();
            while excess > 0 || excess_records > 0 {
                let Some((id, len)) = st.unread.pop_front() else {
                    break;
                };
                let key = chunk_key(id);
                excess_records = excess_records.saturating_sub(u64::from(len));
                st.records -= u64::from(len);
                out.dropped += u64::from(len);
                dropped_ids.push(id);
                let Some(v) = self.outbox.get(key)? else {
                    continue;
                };
                match decode_spans(id, &v) {
                    Ok((raw, spans)) => {
                        for s in &spans {
                            let d = st.intern(s.view(&raw).device_id);
                            st.dec_device(d);
                        }
                    }
                    // Counted as dropped all the same; its devices are unknown.
                    Err(e) => {
                        tracing::error!(chunk = id, error = %e, "undecodable chunk dropped to make room")
                    }
                }
                excess = excess.saturating_sub(v.len() as u64);
                st.bytes -= v.len() as u64;
                batch.remove(&key);
            }
            if let Some(&last) = dropped_ids.last() {
                st.read_cursor = st.read_cursor.max(last + 1);
            }
            // Still over (one append larger than the room left): the oldest of the
            // incoming records go too, whole chunks, keeping at least the newest.
            while skip + 1 < keep && (excess > 0 || excess_records > 0) {
                let (bytes, part) = &encoded[skip];
                excess = excess.saturating_sub(bytes.len() as u64);
                excess_records = excess_records.saturating_sub(part.len() as u64);
                out.dropped += part.len() as u64;
                skip += 1;
            }
        }
        let mut next_seq: HashMap<&str, u64> = HashMap::new();
        let mut new_infos = Vec::with_capacity(keep);
        // Dropped incoming records keep their seqs: the gap is what the drop event reports.
        for (_, part) in encoded.iter().take(skip) {
            note_next_seqs(&mut next_seq, part);
        }
        for (bytes, part) in encoded.iter().take(keep).skip(skip) {
            let id = st.next_chunk + new_infos.len() as u64;
            batch.insert(&chunk_key(id), &packed[bytes.clone()]);
            note_next_seqs(&mut next_seq, part);
            new_infos.push((id, part, bytes.len()));
            out.accepted += part.len();
        }
        out.skipped = skipped_records(&encoded[..skip]);
        out.rejected = records.len() - out.accepted - out.skipped;
        for (dev, seq) in &next_seq {
            let mut k = SEQ_PREFIX.to_vec();
            k.extend_from_slice(dev.as_bytes());
            batch.insert(k, &be(*seq));
        }
        for c in cursors.iter().filter(|c| c.after <= out.handled()) {
            let mut k = CURSOR_PREFIX.to_vec();
            k.extend_from_slice(&c.key);
            match &c.value {
                Some(v) => batch.insert(k, v.as_slice()),
                None => batch.remove(k),
            }
        }
        let total = st.unreported_drops + out.dropped;
        let unreported = total - reported_drops.min(total);
        if unreported != st.unreported_drops {
            batch.insert(UNREPORTED, &be(unreported));
        }
        // One batch on one tree: records, their seq counters and the drop count land
        // together or not at all.
        self.outbox.apply_batch(batch)?;
        for (id, part, bytes) in new_infos {
            st.add_chunk(id, devices_of(part), bytes);
        }
        st.unreported_drops = unreported;
        Ok(out)
    }

    /// A stored source position (see [`Cursor`]).
    pub fn cursor(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BufferError> {
        let mut k = CURSOR_PREFIX.to_vec();
        k.extend_from_slice(key);
        Ok(self.outbox.get(k)?.map(|v| v.to_vec()))
    }

    /// Every stored source position whose key starts with `prefix`.
    pub fn cursors(&self, prefix: &[u8]) -> Result<Vec<CursorEntry>, BufferError> {
        let mut k = CURSOR_PREFIX.to_vec();
        k.extend_from_slice(prefix);
        let mut out = Vec::new();
        for kv in self.outbox.scan_prefix(&k) {
            let (key, v) = kv?;
            out.push((key[CURSOR_PREFIX.len()..].to_vec(), v.to_vec()));
        }
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
    pub fn side_tree(&self, name: &str) -> Result<SideTree, BufferError> {
        let tree = self.db.open_tree(name)?;
        let mut n = 0u64;
        for kv in tree.iter() {
            let (k, v) = kv?;
            n += (k.len() + v.len()) as u64;
        }
        let bytes = Arc::new(AtomicU64::new(n));
        self.side_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(bytes.clone());
        Ok(SideTree {
            tree,
            store: self.store.clone(),
            bytes,
        })
    }

    fn side_total(&self) -> u64 {
        self.side_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|b| b.load(Relaxed))
            .sum()
    }

    /// Whether the data dir's filesystem has less free space than the floor (asked at
    /// most every 250 ms). An unreadable figure counts as enough space: the write itself
    /// will then say what is wrong.
    pub fn low_disk(&self) -> bool {
        let (free, floor) = self.disk();
        floor > 0 && free < floor
    }

    /// The cap on encoded bytes in force: `max_bytes` over the store's overhead, less
    /// [`DISK_HEADROOM`] once the overhead is measured.
    fn cap_bytes(&self) -> u64 {
        self.cap_from(&self.check_disk())
    }

    /// [`Buffer::cap_bytes`] from a given disk check.
    fn cap_from(&self, d: &DiskCheck) -> u64 {
        let (overhead, kept) = (d.overhead, d.kept);
        if overhead <= 1.0 {
            return self.max_bytes;
        }
        let target = self.max_bytes - self.max_bytes / DISK_HEADROOM;
        // Exact for caps up to 2^53 bytes; above that, within a part in 2^53.
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let cap = (target as f64 / overhead) as u64;
        cap.max(kept).min(self.max_bytes)
    }

    /// (free bytes, the floor in force) of the data dir's filesystem.
    fn disk(&self) -> (u64, u64) {
        self.disk_from(&self.check_disk())
    }

    /// [`Buffer::disk`] from a given disk check.
    fn disk_from(&self, d: &DiskCheck) -> (u64, u64) {
        let floor = self
            .min_free_bytes
            .unwrap_or_else(|| DEFAULT_MIN_FREE.min(d.total / 10));
        (d.free, floor)
    }

    /// The disk check, taken again when the last is older than [`DISK_CHECK_EVERY`]
    /// (unless another caller is taking it: then the last one). Callers must not hold
    /// the state lock.
    fn check_disk(&self) -> DiskCheck {
        let d = self.disk_snapshot();
        if d.at.is_none_or(|t| t.elapsed() >= DISK_CHECK_EVERY) {
            self.refresh_disk();
            return self.disk_snapshot();
        }
        d
    }

    /// The last disk check, without touching the disk.
    fn disk_snapshot(&self) -> DiskCheck {
        *self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the last disk check is older than [`DISK_CHECK_EVERY`].
    pub fn disk_check_due(&self) -> bool {
        self.disk_snapshot()
            .at
            .is_none_or(|t| t.elapsed() >= DISK_CHECK_EVERY)
    }

    /// Takes the disk check now: statvfs, the store's size and overhead, the oldest
    /// record's time. Its syscalls run outside every lock; while one caller takes it,
    /// others return at once. Callers must not hold the state lock.
    pub fn refresh_disk(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        if self.checking.swap(true, AcqRel) {
            return;
        }
        // The field types are 32-bit on armv7: the conversions are not useless there.
        #[allow(clippy::useless_conversion)]
        let bytes = |blocks, v: &nix::sys::statvfs::Statvfs| {
            u64::from(blocks).saturating_mul(u64::from(v.fragment_size()))
        };
        let (free, total) = match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(v) => (bytes(v.blocks_available(), &v), bytes(v.blocks(), &v)),
            Err(_) => (u64::MAX, u64::MAX),
        };
        let kept = self.kept_bytes();
        let overhead = (kept >= OVERHEAD_MIN_SAMPLE.max(self.max_bytes / 8)).then(|| {
            let used = allocated_bytes(&self.dir).saturating_sub(self.db.reusable_bytes());
            #[allow(clippy::cast_precision_loss)]
            let overhead = used as f64 / kept as f64;
            overhead.clamp(1.0, MAX_OVERHEAD)
        });
        let disk_bytes = self.db.size_on_disk().unwrap_or(0);
        // Read back (and remembered) here, so that stats_cached need not.
        let _ = self.oldest_ms();
        {
            let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
            d.at = Some(Instant::now());
            (d.free, d.total, d.kept, d.disk_bytes) = (free, total, kept, disk_bytes);
            if let Some(o) = overhead {
                d.overhead = o;
            }
        }
        self.checking
            .store(false, std::sync::atomic::Ordering::Release);
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
        let Some(mut chunk) = self.read_chunk()? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(chunk.len());
        while let Some((id, r)) = chunk.front() {
            out.push((id, r.to_stored()));
            chunk.advance();
        }
        Ok(Some(out))
    }

    /// As [`Buffer::read_next`], the records borrowed from the chunk instead of copied
    /// out one by one.
    pub fn read_chunk(&self) -> Result<Option<ReadChunk>, BufferError> {
        let mut chunk = ReadChunk::default();
        Ok(self.read_chunk_into(&mut chunk)?.then_some(chunk))
    }

    /// [`Buffer::read_chunk`] into `chunk`, whose buffers are used again (what the
    /// forwarder reads with: a chunk decompresses to tens of kilobytes, and a fresh
    /// allocation of that size each time cost page faults and allocator work). Returns
    /// whether a chunk was read; `chunk` is empty when not.
    pub fn read_chunk_into(&self, chunk: &mut ReadChunk) -> Result<bool, BufferError> {
        chunk.recs.clear();
        loop {
            // After a rewind: the in-flight chunks again, with what is acked left out.
            let (id, len, acked) = {
                let mut st = self.state();
                let again = st
                    .in_flight
                    .range(st.read_cursor..)
                    .next()
                    .map(|(&id, info)| (id, info.len, info.acked.clone()));
                if let Some((id, len, acked)) = again {
                    st.read_cursor = id + 1;
                    (id, len, Some(acked))
                } else {
                    match st.unread.front() {
                        Some((id, _)) if id < st.durable_end => {
                            let (id, len) = st.unread.pop_front().unwrap_or((id, 0));
                            st.read_cursor = id + 1;
                            (id, u32::from(len), None)
                        }
                        _ => {
                            st.read_cursor = st
                                .read_cursor
                                .max(st.unread.front().map_or(st.next_chunk, |(id, _)| id));
                            return Ok(false);
                        }
                    }
                }
            };
            let Some(v) = self.outbox.get(chunk_key(id))? else {
                continue; // fully acked meanwhile
            };
            let ReadChunk { raw, recs, spans } = chunk;
            if let Err(e) = decode_spans_into(id, &v, raw, spans) {
                self.quarantine_chunk(id, &v, &e, len)?;
                continue;
            }
            let acked = match acked {
                Some(a) => a,
                None => {
                    let mut st = self.state();
                    let info = st.info_for(spans.iter().map(|s| s.view(raw)), v.len());
                    let a = info.acked.clone();
                    st.in_flight.insert(id, info);
                    a
                }
            };
            recs.extend(
                spans
                    .drain(..)
                    .enumerate()
                    .filter(|(i, _)| acked.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) == 0))
                    .map(|(i, s)| {
                        (
                            RecordId {
                                chunk: id,
                                index: i as u32,
                            },
                            s,
                        )
                    }),
            );
            if !recs.is_empty() {
                chunk.keep_at_most(READ_KEEP);
                return Ok(true);
            }
        }
    }

    /// Moves a chunk that cannot be decoded out of the way, so the rest drains. Its
    /// records are counted as lost (`quarantined`); the bytes stay for a human.
    fn quarantine_chunk(
        &self,
        id: u64,
        raw: &[u8],
        e: &BufferError,
        len: u32,
    ) -> Result<(), BufferError> {
        tracing::error!(chunk = id, error = %e, "undecodable buffer chunk moved to quarantine");
        self.quarantine.insert(chunk_key(id), raw)?;
        self.outbox.remove(chunk_key(id))?;
        let mut st = self.state();
        let lost = match st.in_flight.remove(&id) {
            Some(info) => {
                for (i, d) in info.devices.iter().enumerate() {
                    if !info.is_acked(i as u32) {
                        st.dec_device(*d);
                    }
                }
                u64::from(info.unacked)
            }
            // Read for the first time: all of it was unacked. Its devices are unknown,
            // so the per-device figures keep them (they are display figures).
            None => u64::from(len),
        };
        st.records = st.records.saturating_sub(lost);
        st.bytes = st.bytes.saturating_sub(raw.len() as u64);
        st.quarantined += 1;
        st.quarantined_new.0 += 1;
        st.quarantined_new.1 += lost;
        Ok(())
    }

    /// Chunks quarantined since the last call, and the records known to be in them
    /// (a chunk that failed at open has an unknown count), for the event and the drop
    /// count the forwarder reports.
    pub fn take_quarantined(&self) -> (u64, u64) {
        std::mem::take(&mut self.state().quarantined_new)
    }

    /// One buffered record, if it is still there.
    pub fn get(&self, id: RecordId) -> Result<Option<Stored>, BufferError> {
        let Some(v) = self.outbox.get(chunk_key(id.chunk))? else {
            return Ok(None);
        };
        let (raw, spans) = decode_spans(id.chunk, &v)?;
        Ok(spans
            .get(id.index as usize)
            .map(|s| s.view(&raw).to_stored()))
    }

    /// The id the next appended chunk gets: every record appended so far is in a chunk
    /// below it.
    pub fn next_chunk_id(&self) -> u64 {
        self.state().next_chunk
    }

    /// The oldest chunk still buffered (in flight or not yet read), or
    /// [`Buffer::next_chunk_id`] when none is: every chunk below it has left the buffer
    /// (acknowledged by Kafka, dead-lettered, or dropped by the overflow policy).
    pub fn low_watermark(&self) -> u64 {
        let st = self.state();
        let in_flight = st.in_flight.keys().next().copied();
        let unread = st.unread.front().map(|(id, _)| id);
        match (in_flight, unread) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => st.next_chunk,
        }
    }

    /// Moves the read cursor back to the oldest chunk with unacked records, so that
    /// everything not yet acknowledged is read (and sent) again, in order.
    pub fn rewind(&self) {
        let mut st = self.state();
        st.read_cursor = match (st.in_flight.keys().next(), st.unread.front()) {
            (Some(&id), _) => id,
            (None, Some((id, _))) => id,
            (None, None) => st.next_chunk,
        };
    }

    /// Marks a record delivered; deletes its chunk once all of it is. Called from the
    /// producer's delivery callback, so it needs only the record's id.
    pub fn ack(&self, id: RecordId) -> Result<(), BufferError> {
        let remove = {
            let mut st = self.state();
            let Some(info) = st.in_flight.get_mut(&id.chunk) else {
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
                if let Some(info) = st.in_flight.remove(&id.chunk) {
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
        let size = v.len() as u64;
        self.dead.insert(be(n), v)?;
        // Dead letters may take a quarter of the cap; past it the oldest go (counted).
        let cap_total = self.cap_bytes();
        let evict = {
            let mut st = self.state();
            st.dead_bytes += size;
            st.dead_sizes.push_back((n, size));
            let mut evict = Vec::new();
            while st.dead_bytes > cap_total / 4 && st.dead_sizes.len() > 1 {
                let Some((k, sz)) = st.dead_sizes.pop_front() else {
                    break;
                };
                st.dead_bytes -= sz;
                st.dead_letters -= 1;
                evict.push(k);
            }
            evict
        };
        for k in &evict {
            self.dead.remove(be(*k))?;
        }
        if !evict.is_empty() {
            tracing::warn!(evicted = evict.len(), "oldest dead letters removed: the dead-letter tree may hold a quarter of the buffer's cap");
        }
        self.ack(id)
    }

    /// Dead letters with their ids, oldest first.
    pub fn dead_letters_with_ids(&self) -> Result<Vec<(u64, DeadLetter)>, BufferError> {
        let mut out = Vec::new();
        for kv in self.dead.iter() {
            let (k, v) = kv?;
            let id = from_be(&k).unwrap_or(0);
            let dl: DeadLetter =
                ciborium::from_reader(v.as_ref()).map_err(|e| BufferError::Corrupt {
                    chunk: id,
                    message: format!("dead letter: {e}"),
                })?;
            out.push((id, dl));
        }
        Ok(out)
    }

    /// Puts dead letters back in the outbox (as they were: same seq, same payload) so the
    /// forwarder sends them again, then removes them from the dead-letter tree. `ids`
    /// empty means all. Durable before it returns; a crash in between sends a record
    /// twice, never loses it. Returns how many were requeued.
    pub fn requeue_dead_letters(&self, ids: &[u64]) -> Result<usize, BufferError> {
        let all = self.dead_letters_with_ids()?;
        let chosen: Vec<(u64, DeadLetter)> = all
            .into_iter()
            .filter(|(id, _)| ids.is_empty() || ids.contains(id))
            .collect();
        if chosen.is_empty() {
            return Ok(0);
        }
        let recs: Vec<Stored> = chosen.iter().map(|(_, d)| d.record.clone()).collect();
        let mut batch = sled::Batch::default();
        let mut infos = Vec::new();
        {
            let mut st = self.state();
            for part in recs.chunks(self.per_chunk) {
                let bytes = encode(part)?;
                let id = st.next_chunk + infos.len() as u64;
                batch.insert(&chunk_key(id), bytes.as_slice());
                infos.push((id, part, bytes.len()));
            }
            self.outbox.apply_batch(batch)?;
            for (id, part, bytes) in infos {
                st.add_chunk(id, devices_of(part), bytes);
            }
        }
        self.store.sync_blocking()?;
        for (id, _) in &chosen {
            if let Some(v) = self.dead.remove(be(*id))? {
                let mut st = self.state();
                st.dead_letters = st.dead_letters.saturating_sub(1);
                st.dead_bytes = st.dead_bytes.saturating_sub(v.len() as u64);
                st.dead_sizes.retain(|(k, _)| k != id);
            }
        }
        self.flush_blocking()?;
        Ok(chosen.len())
    }

    /// Every dead letter, oldest first (for operators and tests).
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, BufferError> {
        Ok(self
            .dead_letters_with_ids()?
            .into_iter()
            .map(|(_, d)| d)
            .collect())
    }

    /// Figures for `/status`, `/metrics` and `labgate buffer stats`.
    pub fn stats(&self) -> Stats {
        self.stats_from(&self.check_disk(), self.oldest_ms())
    }

    /// [`Buffer::stats`] from the last disk check, without touching the disk (for HTTP:
    /// a disk that hangs must not hang `/health`). The disk figures and the oldest
    /// unread record's age are as of that check; [`Buffer::refresh_disk`] takes it again.
    pub fn stats_cached(&self) -> Stats {
        let oldest = {
            let st = self.state();
            match st.in_flight.values().next() {
                Some(info) => Some(info.first_ms),
                None if st.unread.front().is_some() => st.oldest.map(|(_, ms)| ms),
                None => None,
            }
        };
        self.stats_from(&self.disk_snapshot(), oldest)
    }

    /// [`Buffer::stats_cached`] for async code (HTTP, the fleet status): when the last
    /// disk check is due, another is taken on a blocking thread for the next call (one
    /// at a time: on a disk that hangs, that thread waits, and the callers go on).
    pub fn stats_for_async(me: &Arc<Buffer>) -> Stats {
        if me.disk_check_due() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let b = me.clone();
                drop(rt.spawn_blocking(move || b.refresh_disk()));
            }
        }
        me.stats_cached()
    }

    fn stats_from(&self, d: &DiskCheck, oldest_ms: Option<u64>) -> Stats {
        let side_bytes = self.side_total();
        let (disk_free_bytes, floor) = self.disk_from(d);
        let cap_bytes = self.cap_from(d);
        let low_disk = floor > 0 && disk_free_bytes < floor;
        let now = unix_ms(std::time::SystemTime::now());
        let oldest = oldest_ms.map_or(0.0, |ms| now.saturating_sub(ms) as f64 / 1000.0);
        let st = self.state();
        Stats {
            records: st.records,
            bytes: st.bytes,
            chunks: st.in_flight.len() as u64 + st.unread.chunks(),
            oldest_age_seconds: oldest,
            per_device: st
                .device_names
                .iter()
                .zip(&st.per_device)
                .filter(|(_, n)| **n > 0)
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            dead_letters: st.dead_letters,
            dead_letter_bytes: st.dead_bytes,
            side_bytes,
            unreported_drops: st.unreported_drops,
            disk_bytes: d.disk_bytes,
            quarantined_chunks: st.quarantined,
            disk_free_bytes: disk_free_bytes.min(i64::MAX as u64),
            disk_floor_bytes: floor.min(i64::MAX as u64),
            low_disk,
            cap_bytes: cap_bytes.min(i64::MAX as u64),
        }
    }

    /// When the oldest buffered record was ingested (Unix ms): from the in-flight index,
    /// or read back from sled for an unread chunk (and remembered until it goes).
    fn oldest_ms(&self) -> Option<u64> {
        let id = {
            let st = self.state();
            if let Some(info) = st.in_flight.values().next() {
                return Some(info.first_ms);
            }
            let (id, _) = st.unread.front()?;
            if let Some((cached, ms)) = st.oldest {
                if cached == id {
                    return Some(ms);
                }
            }
            id
        };
        let v = self.outbox.get(chunk_key(id)).ok()??;
        let ms = decode_spans(id, &v).ok()?.1.first()?.ingested_ms;
        self.state().oldest = Some((id, ms));
        Some(ms)
    }

    /// Ratio of the bytes under the cap (records, dead letters, side trees) to the cap,
    /// for health.
    pub fn fill_ratio(&self) -> f64 {
        let cap = self.cap_from(&self.disk_snapshot()).max(1);
        self.kept_bytes() as f64 / cap as f64
    }

    /// The encoded bytes under the cap: records, dead letters and side trees. Callers
    /// must not hold the state lock.
    fn kept_bytes(&self) -> u64 {
        let side = self.side_total();
        let st = self.state();
        st.bytes + st.dead_bytes + side
    }
}

/// Records in a chunk (at most `records_per_chunk`, which config caps at 4096).
fn chunk_len(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// The first byte of a chunk (after lz4) in the current layout: the record count, then
/// per record its topic, key, device, seq, ingest time and payload, numbers as LEB128
/// varints and byte strings length-prefixed. Chunks written by earlier versions are
/// CBOR arrays (first byte 0x80–0x9f); [`decode_spans`] still reads them.
const CHUNK_V1: u8 = 0x01;

/// Topic codes of the chunk layout (stable on disk; append only).
const TOPIC_CODES: [TopicKind; 7] = [
    TopicKind::Events,
    TopicKind::AgentEvents,
    TopicKind::Data,
    TopicKind::Sensors,
    TopicKind::Alerts,
    TopicKind::CommandResults,
    TopicKind::Aggregates,
];

fn encode<R: AsRecord>(part: &[R]) -> Result<Vec<u8>, BufferError> {
    Ok(lz4_flex::compress_prepend_size(&encode_body(part)?))
}

/// Encodes `part` as a chunk at the end of `packed` (what [`encode`] returns: the
/// length, little-endian u32, then the lz4 block), `body` the scratch it is laid out in
/// first. Returns where in `packed` it is.
fn encode_into<R: AsRecord>(
    part: &[R],
    body: &mut Vec<u8>,
    packed: &mut Vec<u8>,
) -> Result<Range<usize>, BufferError> {
    body.clear();
    encode_body_into(part, body)?;
    let len = u32::try_from(body.len())
        .map_err(|_| BufferError::Encode(format!("a {}-byte chunk", body.len())))?;
    let start = packed.len();
    packed.extend_from_slice(&len.to_le_bytes());
    let block = start + 4;
    packed.resize(
        block + lz4_flex::block::get_maximum_output_size(body.len()),
        0,
    );
    let n = lz4_flex::block::compress_into(body, &mut packed[block..])
        .map_err(|e| BufferError::Encode(format!("lz4: {e}")))?;
    packed.truncate(block + n);
    Ok(start..packed.len())
}

/// The most an append's scratch buffers keep between appends.
const SCRATCH_KEEP: usize = 1 << 20;

/// A chunk's [`CHUNK_V1`] bytes before compression.
fn encode_body<R: AsRecord>(part: &[R]) -> Result<Vec<u8>, BufferError> {
    let mut v = Vec::new();
    encode_body_into(part, &mut v)?;
    Ok(v)
}

fn encode_body_into<R: AsRecord>(part: &[R], v: &mut Vec<u8>) -> Result<(), BufferError> {
    let size: usize = part
        .iter()
        .map(|r| r.record())
        .map(|r| r.payload.len() + r.key.len() + r.device_id.len() + 32)
        .sum();
    v.reserve(size + 11);
    v.push(CHUNK_V1);
    put_varint(v, part.len() as u64);
    for r in part {
        let r = r.record();
        let code = TOPIC_CODES
            .iter()
            .position(|t| *t == r.topic)
            .ok_or_else(|| BufferError::Encode(format!("no chunk code for {:?}", r.topic)))?;
        v.push(code as u8);
        put_bytes(v, r.key.as_bytes());
        put_bytes(v, r.device_id.as_bytes());
        put_varint(v, r.seq);
        put_varint(v, r.ingested_ms);
        put_bytes(v, r.payload);
    }
    Ok(())
}

fn put_varint(v: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        v.push((x as u8) | 0x80);
        x >>= 7;
    }
    v.push(x as u8);
}

fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    put_varint(v, b.len() as u64);
    v.extend_from_slice(b);
}

/// A chunk's records, copied out (the tests' view of [`decode_spans`]).
#[cfg(test)]
fn decode(chunk: u64, v: &[u8]) -> Result<Vec<Stored>, BufferError> {
    let (raw, spans) = decode_spans(chunk, v)?;
    Ok(spans.iter().map(|s| s.view(&raw).to_stored()).collect())
}

/// Decompresses a chunk and finds its records in it, without copying any: the
/// decompressed [`CHUNK_V1`] bytes and where each record's fields are. A chunk written
/// before that layout (CBOR) is re-encoded in it first.
fn decode_spans(chunk: u64, v: &[u8]) -> Result<(Vec<u8>, Vec<Span>), BufferError> {
    let (mut raw, mut spans) = (Vec::new(), Vec::new());
    decode_spans_into(chunk, v, &mut raw, &mut spans)?;
    Ok((raw, spans))
}

/// [`decode_spans`] into `raw` and `spans` (replacing what they hold), reusing their
/// allocations.
fn decode_spans_into(
    chunk: u64,
    v: &[u8],
    raw: &mut Vec<u8>,
    spans: &mut Vec<Span>,
) -> Result<(), BufferError> {
    let corrupt = |message: String| BufferError::Corrupt { chunk, message };
    spans.clear();
    let (size, block) = match v.split_first_chunk::<4>() {
        Some((size, block)) => (u32::from_le_bytes(*size) as usize, block),
        None => return Err(corrupt("lz4: no size".into())),
    };
    // lz4 expands a byte at most 255-fold: a larger size is a corrupt prefix, and is
    // not allocated.
    if size > block.len().saturating_mul(255) {
        return Err(corrupt(format!("lz4: {size} bytes from {}", block.len())));
    }
    raw.clear();
    raw.resize(size, 0);
    let n =
        lz4_flex::block::decompress_into(block, raw).map_err(|e| corrupt(format!("lz4: {e}")))?;
    raw.truncate(n);
    if raw.first() != Some(&CHUNK_V1) {
        let recs: Vec<Stored> =
            ciborium::from_reader(raw.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        *raw = encode_body(&recs).map_err(|e| corrupt(e.to_string()))?;
    }
    spans_v1(raw, spans).map_err(corrupt)
}

/// The records of a chunk's [`CHUNK_V1`] bytes (`raw`, its first byte included), as
/// positions in `raw`. Checks every length and that keys and devices are UTF-8.
fn spans_v1(raw: &[u8], out: &mut Vec<Span>) -> Result<(), String> {
    let mut r = Fields(raw.get(1..).unwrap_or_default());
    let at = |r: &Fields<'_>, field: &[u8]| raw.len() - r.0.len() - field.len();
    let n = r.varint()?;
    // A record takes at least 6 bytes: a corrupt count cannot reserve more than that.
    out.reserve(usize::try_from(n).unwrap_or(0).min(raw.len() / 6));
    for _ in 0..n {
        let code = r.byte()?;
        let topic = *TOPIC_CODES
            .get(usize::from(code))
            .ok_or_else(|| format!("unknown topic code {code}"))?;
        let key = r.text()?;
        let key = (at(&r, key), key.len());
        let device = r.text()?;
        let device = (at(&r, device), device.len());
        let seq = r.varint()?;
        let ingested_ms = r.varint()?;
        let payload = r.bytes()?;
        out.push(Span {
            topic,
            key,
            device,
            seq,
            ingested_ms,
            payload: (at(&r, payload), payload.len()),
        });
    }
    if r.0.is_empty() {
        Ok(())
    } else {
        Err(format!("{} bytes after the last record", r.0.len()))
    }
}

/// Where one record's fields are in its chunk's decompressed bytes: (start, length).
#[derive(Debug, Clone, Copy)]
struct Span {
    topic: TopicKind,
    key: (usize, usize),
    device: (usize, usize),
    seq: u64,
    ingested_ms: u64,
    payload: (usize, usize),
}

impl Span {
    /// The record in `raw`, the bytes [`spans_v1`] found it in (so every range is in
    /// bounds and every text field UTF-8; anything else reads as empty, never panics).
    fn view<'a>(&self, raw: &'a [u8]) -> RecordRef<'a> {
        let field = |(start, len): (usize, usize)| {
            raw.get(start..start.saturating_add(len))
                .unwrap_or_default()
        };
        let text = |f| std::str::from_utf8(field(f)).unwrap_or_default();
        RecordRef {
            topic: self.topic,
            key: text(self.key),
            device_id: text(self.device),
            seq: self.seq,
            ingested_ms: self.ingested_ms,
            payload: field(self.payload),
        }
    }
}

/// A buffered record as read, borrowed from its chunk: a [`Stored`] without the copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Which configured topic it goes to.
    pub topic: TopicKind,
    /// Its Kafka key.
    pub key: &'a str,
    /// Its device.
    pub device_id: &'a str,
    /// Its per-device sequence number.
    pub seq: u64,
    /// Unix milliseconds at ingest.
    pub ingested_ms: u64,
    /// The finished wire message.
    pub payload: &'a [u8],
}

/// A record the buffer can append: a [`Stored`], or a [`RecordRef`] into bytes the
/// caller laid out (ingest stamps a whole batch into one buffer that way, with no
/// allocation per record).
pub trait AsRecord {
    /// The record, borrowed.
    fn record(&self) -> RecordRef<'_>;
}

impl AsRecord for Stored {
    fn record(&self) -> RecordRef<'_> {
        RecordRef {
            topic: self.topic,
            key: &self.key,
            device_id: &self.device_id,
            seq: self.seq,
            ingested_ms: self.ingested_ms,
            payload: &self.payload,
        }
    }
}

impl AsRecord for RecordRef<'_> {
    fn record(&self) -> RecordRef<'_> {
        *self
    }
}

impl RecordRef<'_> {
    /// An owned copy.
    pub fn to_stored(&self) -> Stored {
        Stored {
            topic: self.topic,
            key: self.key.to_string(),
            device_id: self.device_id.to_string(),
            seq: self.seq,
            ingested_ms: self.ingested_ms,
            payload: self.payload.to_vec(),
        }
    }
}

/// The unacked records of one chunk, as [`Buffer::read_chunk`] hands them out: the
/// chunk decompressed once, its records views into it (no allocation per record).
#[derive(Debug, Default)]
pub struct ReadChunk {
    raw: Vec<u8>,
    recs: std::collections::VecDeque<(RecordId, Span)>,
    /// Scratch for decoding the next chunk into (its contents mean nothing between
    /// reads; only its room is kept).
    spans: Vec<Span>,
}

/// The most a [`ReadChunk`] keeps of its buffers' room between chunks: a chunk of the
/// default `buffer.records_per_chunk` (64 records of a few hundred bytes) fits many
/// times over, and the room a chunk of large records took is given back.
const READ_KEEP: usize = 1 << 20;

impl ReadChunk {
    /// Gives back what its buffers hold beyond `bytes` of room each (kept for the next
    /// chunk otherwise).
    fn keep_at_most(&mut self, bytes: usize) {
        if self.spans.capacity() * std::mem::size_of::<Span>() > bytes {
            self.spans = Vec::new();
        }
        if self.raw.capacity() > bytes.max(self.raw.len()) {
            self.raw.shrink_to(self.raw.len());
        }
    }

    /// The next record, if any.
    pub fn front(&self) -> Option<(RecordId, RecordRef<'_>)> {
        self.recs.front().map(|(id, s)| (*id, s.view(&self.raw)))
    }

    /// Moves past the next record.
    pub fn advance(&mut self) {
        self.recs.pop_front();
    }

    /// Records left.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Whether every record has been taken.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Drops what is left.
    pub fn clear(&mut self) {
        self.recs.clear();
        self.raw = Vec::new();
    }
}

/// Reads the fields of a [`CHUNK_V1`] chunk; every read checks what is left.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.0.split_first().ok_or("truncated record")?;
        self.0 = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            x |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err("varint longer than 64 bits".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
        if n > self.0.len() {
            return Err(format!("a {n}-byte field with {} bytes left", self.0.len()));
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }

    fn text(&mut self) -> Result<&'a [u8], String> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|_| "a field is not UTF-8")?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_errors_are_named_also_after_sled_cloned_them() {
        let eio = std::io::Error::from_raw_os_error(5);
        assert_eq!(disk_error_kind(&sled::Error::Io(eio)), "eio");
        // What sled's Clone makes of it.
        let cloned = std::io::Error::other(format!("{:?}", std::io::Error::from_raw_os_error(5)));
        assert_eq!(disk_error_kind(&sled::Error::Io(cloned)), "eio");
        let full = std::io::Error::from_raw_os_error(28);
        assert_eq!(disk_error_kind(&sled::Error::Io(full)), "enospc");
        let ro = std::io::Error::from_raw_os_error(30);
        assert_eq!(disk_error_kind(&sled::Error::Io(ro)), "erofs");
        let other = std::io::Error::from_raw_os_error(13);
        assert_eq!(disk_error_kind(&sled::Error::Io(other)), "other");
    }

    fn same(a: &[Stored], b: &[Stored]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                (
                    x.topic,
                    &x.key,
                    &x.device_id,
                    x.seq,
                    x.ingested_ms,
                    &x.payload,
                ) == (
                    y.topic,
                    &y.key,
                    &y.device_id,
                    y.seq,
                    y.ingested_ms,
                    &y.payload,
                )
            })
    }

    #[test]
    fn the_next_seq_of_each_device_is_its_last_records() {
        let rec = |dev: &str, seq| Stored {
            topic: TopicKind::Sensors,
            key: String::new(),
            device_id: dev.into(),
            seq,
            ingested_ms: 0,
            payload: Vec::new(),
        };
        let part = [
            rec("a", 1),
            rec("a", 2),
            rec("b", 7),
            rec("a", 3),
            rec("b", 8),
        ];
        let mut next = HashMap::new();
        note_next_seqs(&mut next, &part);
        assert_eq!(next, HashMap::from([("a", 4), ("b", 9)]));
        let later = [rec("b", 9)];
        note_next_seqs(&mut next, &later);
        assert_eq!(next, HashMap::from([("a", 4), ("b", 10)]));
    }

    #[test]
    fn chunks_round_trip_in_every_topic_and_old_cbor_chunks_still_read() {
        let part: Vec<Stored> = TOPIC_CODES
            .iter()
            .enumerate()
            .map(|(i, t)| Stored {
                topic: *t,
                key: format!("key-ü-{i}"),
                device_id: format!("dev-{i}"),
                seq: u64::MAX - i as u64,
                ingested_ms: 1_767_225_600_000 + i as u64,
                payload: vec![i as u8; i * 200],
            })
            .collect();
        let v1 = encode(&part).unwrap();
        assert_eq!(
            lz4_flex::decompress_size_prepended(&v1).unwrap()[0],
            CHUNK_V1
        );
        assert!(same(&decode(7, &v1).unwrap(), &part));
        // What appends write, several chunks after one another in one scratch buffer, is
        // what `encode` gives, byte for byte.
        let (mut body, mut packed) = (Vec::new(), vec![9u8; 3]);
        let a = encode_into(&part[..3], &mut body, &mut packed).unwrap();
        let b = encode_into(&part[3..], &mut body, &mut packed).unwrap();
        assert_eq!(packed[a], encode(&part[..3]).unwrap()[..]);
        assert_eq!(packed[b], encode(&part[3..]).unwrap()[..]);
        // A chunk as versions before the v1 layout wrote it: lz4 over a CBOR array.
        let mut cbor = Vec::new();
        ciborium::into_writer(&part, &mut cbor).unwrap();
        let old = lz4_flex::compress_prepend_size(&cbor);
        assert!(same(&decode(7, &old).unwrap(), &part));
        assert!(same(
            &decode(7, &encode::<Stored>(&[]).unwrap()).unwrap(),
            &[]
        ));
    }

    #[test]
    fn a_damaged_chunk_is_a_named_error() {
        let v1 = lz4_flex::decompress_size_prepended(&encode(&[rec("d", 1)]).unwrap()).unwrap();
        for cut in 1..v1.len() {
            let e = decode(3, &lz4_flex::compress_prepend_size(&v1[..cut])).unwrap_err();
            assert!(matches!(e, BufferError::Corrupt { chunk: 3, .. }), "{e}");
        }
        let mut extra = v1.clone();
        extra.push(0);
        assert!(decode(3, &lz4_flex::compress_prepend_size(&extra)).is_err());
        let mut topic = v1;
        topic[2] = 99;
        let e = decode(3, &lz4_flex::compress_prepend_size(&topic)).unwrap_err();
        assert!(e.to_string().contains("unknown topic code 99"), "{e}");
    }

    #[test]
    fn a_size_prefix_larger_than_lz4_can_expand_to_is_corrupt_not_allocated() {
        let block = lz4_flex::block::compress(&[CHUNK_V1, 0]);
        let mut v = (u32::MAX).to_le_bytes().to_vec();
        v.extend_from_slice(&block);
        let e = decode(5, &v).unwrap_err();
        assert!(matches!(e, BufferError::Corrupt { chunk: 5, .. }), "{e}");
        assert!(e.to_string().contains("4294967295 bytes from"), "{e}");
        let e = decode(5, &[1, 0]).unwrap_err();
        assert!(e.to_string().contains("no size"), "{e}");
    }

    #[test]
    fn a_read_chunk_used_again_reads_each_chunk_as_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), &cfg()).unwrap();
        // Chunks of large records, then small ones, then large again: the buffers the
        // first chunk grew are reused, and must not show through in the next.
        let sized = |seq: u64, n: usize| Stored {
            payload: format!("{{\"n\":{seq},\"pad\":\"{}\"}}", "y".repeat(n)).into_bytes(),
            key: format!("key-{seq}"),
            ..rec(&format!("dev-{}", seq % 3), seq)
        };
        let recs: Vec<Stored> = (0..24)
            .map(|i| sized(i, [3000, 2, 700][(i / 8) as usize]))
            .collect();
        b.append(&recs, 0).unwrap();
        b.flush_blocking().unwrap();
        assert!(same(&read_all_reusing(&b), &recs));
    }

    /// Every record, read and acked with one [`ReadChunk`] used again for each chunk.
    fn read_all_reusing(b: &Buffer) -> Vec<Stored> {
        let mut chunk = ReadChunk::default();
        let mut got = Vec::new();
        while b.read_chunk_into(&mut chunk).unwrap() {
            while let Some((id, r)) = chunk.front() {
                got.push(r.to_stored());
                b.ack(id).unwrap();
                chunk.advance();
            }
        }
        assert!(chunk.is_empty());
        got
    }

    #[test]
    fn a_read_chunk_used_again_passes_a_damaged_chunk_and_reads_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), &cfg()).unwrap();
        let recs: Vec<Stored> = (0..12).map(|i| rec("d", i)).collect();
        b.append(&recs, 0).unwrap();
        b.flush_blocking().unwrap();
        // The middle chunk (seqs 4..8) decodes part of the way: a valid lz4 block whose
        // records end early, so the scratch holds some of its spans when it fails.
        let whole = lz4_flex::decompress_size_prepended(&encode(&recs[4..8]).unwrap()).unwrap();
        let cut = lz4_flex::compress_prepend_size(&whole[..whole.len() - 3]);
        b.outbox.insert(chunk_key(1), cut).unwrap();
        let seqs: Vec<u64> = read_all_reusing(&b).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(b.take_quarantined(), (1, 4));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_chunk_bytes_never_panic_the_decoder(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)
        ) {
            let mut raw = vec![CHUNK_V1];
            raw.extend_from_slice(&body);
            let _ = decode(1, &lz4_flex::compress_prepend_size(&raw));
        }
    }

    fn rec(device: &str, seq: u64) -> Stored {
        Stored {
            topic: TopicKind::Sensors,
            key: "k".into(),
            device_id: device.into(),
            seq,
            ingested_ms: 1,
            payload: vec![b'x'; 100],
        }
    }

    fn cfg() -> BufferConfig {
        BufferConfig {
            records_per_chunk: 4,
            min_free_bytes: Some(0),
            ..BufferConfig::default()
        }
    }

    fn drain(b: &Buffer) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(recs) = b.read_next().unwrap() {
            out.extend(recs.into_iter().map(|(_, r)| r.seq));
        }
        out
    }

    #[test]
    fn an_undecodable_chunk_is_quarantined_and_the_rest_still_opens_and_drains() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = Buffer::open(dir.path(), &cfg()).unwrap();
            let recs: Vec<Stored> = (0..12).map(|i| rec("d", i)).collect();
            b.append(&recs, 0).unwrap();
            b.flush_blocking().unwrap();
            // The middle chunk (seqs 4..8) is damaged on disk.
            b.outbox
                .insert(chunk_key(1), &b"not lz4 at all"[..])
                .unwrap();
            b.flush_blocking().unwrap();
        }
        let b = super::model_test::reopen_with(dir.path(), &cfg());
        assert_eq!(b.stats().quarantined_chunks, 1);
        assert_eq!(b.take_quarantined(), (1, 0));
        assert_eq!(b.stats().records, 8);
        assert_eq!(drain(&b), [0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(b.quarantine.len(), 1);
    }

    #[test]
    fn a_cursor_is_written_with_its_records_and_never_ahead_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let c = BufferConfig {
            max_records: Some(8),
            overflow: OverflowPolicy::RejectNew,
            ..cfg()
        };
        let b = Buffer::open(dir.path(), &c).unwrap();
        let recs: Vec<Stored> = (0..12).map(|i| rec("d", i)).collect();
        let cur = |after: usize, v: &[u8]| Cursor {
            after,
            key: b"f/x".to_vec(),
            value: Some(v.to_vec()),
        };
        // 8 fit, 4 are refused: the cursor after 4 records lands, the one after 12 not.
        let out = b
            .append_with(&recs, 0, &[cur(4, b"four"), cur(12, b"twelve")])
            .unwrap();
        assert_eq!(out.rejected, 4);
        assert_eq!(b.cursor(b"f/x").unwrap().as_deref(), Some(&b"four"[..]));
        b.flush_blocking().unwrap();
        drop(b);
        let b = super::model_test::reopen_with(dir.path(), &c);
        assert_eq!(
            b.cursors(b"f/").unwrap(),
            vec![(b"f/x".to_vec(), b"four".to_vec())]
        );
        assert_eq!(b.stats().records, 8, "cursors are not records");
        b.append_with::<Stored>(
            &[],
            0,
            &[Cursor {
                after: 0,
                key: b"f/x".to_vec(),
                value: None,
            }],
        )
        .unwrap();
        assert_eq!(b.cursor(b"f/x").unwrap(), None);
    }

    #[test]
    fn max_records_caps_the_count_under_either_policy() {
        for overflow in [OverflowPolicy::DropOldest, OverflowPolicy::RejectNew] {
            let dir = tempfile::tempdir().unwrap();
            let c = BufferConfig {
                max_records: Some(10),
                overflow,
                ..cfg()
            };
            let b = Buffer::open(dir.path(), &c).unwrap();
            let recs: Vec<Stored> = (0..20).map(|i| rec("d", i)).collect();
            let out = b.append(&recs, 0).unwrap();
            assert!(b.stats().records <= 10, "{overflow:?}: {:?}", b.stats());
            b.flush_blocking().unwrap();
            let kept = drain(&b);
            match overflow {
                // Whole chunks of 4 go, oldest first: 16..20 and 12..16 stay, then 8..12.
                OverflowPolicy::DropOldest => {
                    assert_eq!(out.dropped, 12, "{out:?}");
                    assert_eq!(kept, (12..20).collect::<Vec<_>>());
                }
                OverflowPolicy::RejectNew => {
                    assert_eq!(out.rejected, 12, "{out:?}");
                    assert_eq!(kept, (0..8).collect::<Vec<_>>());
                }
            }
        }
    }

    #[test]
    fn a_damaged_unread_chunk_dropped_to_make_room_is_counted_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = BufferConfig {
            max_bytes: 64 * 1024,
            ..cfg()
        };
        let b = Buffer::open(dir.path(), &c).unwrap();
        let recs: Vec<Stored> = (0..8).map(|i| rec("d", i)).collect();
        b.append(&recs, 0).unwrap();
        // The oldest chunk (seqs 0..4) is damaged before anyone reads it.
        b.outbox
            .insert(chunk_key(0), &b"\x05\x00\x00\x00junk"[..])
            .unwrap();
        let mut dropped = 0;
        let mut seq = 8;
        while dropped < 4 {
            let mut big: Vec<Stored> = (0..4).map(|i| rec("d", seq + i)).collect();
            for r in &mut big {
                r.payload = (0..4096u32)
                    .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
                    .collect();
            }
            seq += 4;
            dropped += b.append(&big, 0).unwrap().dropped;
        }
        // Its four records are counted as dropped, like any other chunk's.
        assert!(b.get(RecordId { chunk: 0, index: 0 }).unwrap().is_none());
        let s = b.stats();
        assert_eq!(s.records + dropped, seq);
        assert_eq!(s.unreported_drops, dropped);
    }

    #[test]
    fn a_chunk_damaged_while_running_is_quarantined_at_read() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), &cfg()).unwrap();
        let recs: Vec<Stored> = (0..8).map(|i| rec("d", i)).collect();
        b.append(&recs, 0).unwrap();
        b.flush_blocking().unwrap();
        b.outbox
            .insert(chunk_key(0), &b"\x05\x00\x00\x00junk"[..])
            .unwrap();
        assert_eq!(drain(&b), [4, 5, 6, 7]);
        let s = b.stats();
        assert_eq!((s.quarantined_chunks, s.records), (1, 4));
        // Reported once, with the records lost.
        assert_eq!(b.take_quarantined(), (1, 4));
        assert_eq!(b.take_quarantined(), (0, 0));
    }

    #[test]
    fn dead_letters_and_side_trees_count_against_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let c = BufferConfig {
            max_bytes: 64 * 1024,
            overflow: OverflowPolicy::RejectNew,
            ..cfg()
        };
        let b = Buffer::open(dir.path(), &c).unwrap();
        let side = b.side_tree("ids").unwrap();
        side.bytes.store(60 * 1024, Relaxed);
        let recs: Vec<Stored> = (0..400).map(|i| rec("d", i)).collect();
        let out = b.append(&recs, 0).unwrap();
        assert!(out.rejected > 0, "{out:?}");
        let kept = out.accepted;
        assert!(kept < 400);
        side.bytes.store(0, Relaxed);
        let more = b.append(&recs[kept..], 0).unwrap();
        assert!(more.accepted > 0);
        assert!(b.fill_ratio() <= 1.0);
    }

    #[test]
    fn dead_letters_are_bounded_and_can_be_requeued_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let c = BufferConfig {
            max_bytes: 64 * 1024,
            ..cfg()
        };
        let b = Buffer::open(dir.path(), &c).unwrap();
        let recs: Vec<Stored> = (0..400).map(|i| rec("d", i)).collect();
        b.append(&recs, 0).unwrap();
        b.flush_blocking().unwrap();
        let mut read = Vec::new();
        while let Some(r) = b.read_next().unwrap() {
            read.extend(r);
        }
        for (id, r) in &read {
            b.dead_letter(*id, r, "refused").unwrap();
        }
        let s = b.stats();
        assert!(s.dead_letter_bytes <= 16 * 1024 + 512, "{s:?}");
        assert!(s.dead_letters < 400 && s.dead_letters > 0, "{s:?}");
        assert_eq!(s.records, 0);
        let kept: Vec<u64> = b
            .dead_letters_with_ids()
            .unwrap()
            .iter()
            .map(|(_, d)| d.record.seq)
            .collect();
        // The newest are kept.
        assert_eq!(kept.last(), Some(&399));
        let n = b.requeue_dead_letters(&[]).unwrap();
        assert_eq!(n, kept.len());
        assert_eq!(b.stats().dead_letters, 0);
        assert_eq!(drain(&b), kept);
    }
}
