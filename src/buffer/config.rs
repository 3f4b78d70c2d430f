//! The `[buffer]` config section, owned by the buffer (`crate::config` assembles it).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What happens when the buffer is full (`buffer.max_bytes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Make room by dropping the oldest records not yet handed to Kafka.
    #[default]
    DropOldest,
    /// Refuse new records while the buffer is full.
    RejectNew,
}

/// `[buffer]`: how much may wait for Kafka, what happens when that is full, how often
/// the buffer commits, and how much disk it must leave free.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// What the store may take on disk, all trees included (records, dead letters,
    /// command replay ids). The encoded bytes kept are capped at seven eighths of this
    /// over the store's measured overhead (about 1.6; see the buffer's module docs).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Cap on the number of buffered records, beside the byte cap (whichever is reached
    /// first applies). Unset: bytes only. The seed application's `offline_buffer_size`
    /// lands here.
    #[serde(default)]
    pub max_records: Option<u64>,
    #[serde(default)]
    /// What happens to a new record when the buffer is at `max_bytes` or `max_records`.
    pub overflow: OverflowPolicy,
    /// Group commit: the buffer flushes at most this often; nothing is acknowledged
    /// upstream before its flush.
    #[serde(default = "default_commit", with = "crate::time::serde_duration")]
    pub commit_interval: Duration,
    /// sled page cache (sled's own default is 1 GiB).
    #[serde(default = "default_cache")]
    pub cache_capacity: u64,
    /// Records per sled value.
    #[serde(default = "default_chunk")]
    pub records_per_chunk: usize,
    /// Free space the data dir's filesystem must keep: below it new records are
    /// refused (counted as `disk_full`) so that sled never meets ENOSPC in the middle of
    /// a write, and deliveries (which also write) can still go on. Unset: 64 MiB or a
    /// tenth of the filesystem, whichever is smaller (a small SD card or tmpfs keeps
    /// working). `0` turns the check off.
    #[serde(default)]
    pub min_free_bytes: Option<u64>,
}

fn default_max_bytes() -> u64 {
    1 << 30
}
fn default_commit() -> Duration {
    Duration::from_millis(20)
}
fn default_cache() -> u64 {
    4 << 20
}
/// Sixty-four. With published sled 0.34.7, whose LRU kept hundreds of leaves resident
/// whatever `cache_capacity` said, the value size set that memory (45.8 MB at 64 against
/// 33.8 MB at 32 in-process at 3M records) and the default was 32. With the vendored sled
/// the cache holds to `cache_capacity`: with the broker stalled the agent peaked at
/// 45.8–46.8 MB at 64 against 46.9–47.8 MB at 32 (2M records; 49.8 against 53.2 MB at
/// 8M, `benches/stalled_heap.rs`), while end to end ran at 1.00 and 0.99 of the
/// baseline at 64 against 0.91 and 0.90 at 32 in two same-run comparisons.
/// `scripts/bench` measures 32 beside it.
fn default_chunk() -> usize {
    64
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: default_max_bytes(),
            max_records: None,
            overflow: OverflowPolicy::default(),
            commit_interval: default_commit(),
            cache_capacity: default_cache(),
            records_per_chunk: default_chunk(),
            min_free_bytes: None,
        }
    }
}
