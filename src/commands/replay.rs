//! Replay protection: every executed command id is kept durably (a sled tree beside the
//! buffer) until its command has expired plus a margin, so a command replayed, by an
//! attacker or by Kafka redelivery after a crash, is answered `duplicate` and not run
//! again, also after a restart.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::SystemTime;

use crate::buffer::store::Store;
use crate::buffer::SideTree;
use crate::record::unix_us;

#[derive(Debug, thiserror::Error)]
#[error("replay store: {0}")]
/// The replay store's sled tree failed.
pub struct ReplayError(#[from] sled::Error);

#[derive(Clone)]
/// Durable set of command ids already handled, kept for `max_ttl`, so a replayed command is not run twice.
pub struct ReplayStore {
    tree: sled::Tree,
    /// The buffer's store: a claim is durable only after its sync (fdatasync).
    store: Arc<Store>,
    /// Bytes kept, counted against `buffer.max_bytes`.
    bytes: Arc<AtomicU64>,
}

/// A command id seen before, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// When the id was first seen, µs since the epoch (for purging).
    pub first_seen_us: u64,
}

fn value(keep_until_us: u64, seen_us: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&keep_until_us.to_be_bytes());
    v[8..].copy_from_slice(&seen_us.to_be_bytes());
    v
}

fn field(v: &[u8], at: usize) -> u64 {
    v.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

impl ReplayStore {
    /// A store over its own tree in the buffer's database.
    pub fn new(side: SideTree) -> ReplayStore {
        ReplayStore {
            tree: side.tree,
            store: side.store,
            bytes: side.bytes,
        }
    }

    /// Records `id` (kept until `keep_until`) unless it is there already, and makes the
    /// record durable before returning. `Some` means a replay: do not execute.
    pub async fn claim(
        &self,
        id: &str,
        keep_until: SystemTime,
        now: SystemTime,
    ) -> Result<Option<Seen>, ReplayError> {
        let new = value(unix_us(keep_until), unix_us(now));
        match self
            .tree
            .compare_and_swap(id.as_bytes(), None as Option<&[u8]>, Some(&new[..]))?
        {
            Ok(()) => {
                self.bytes.fetch_add((id.len() + new.len()) as u64, Relaxed);
                self.store.sync().await?;
                Ok(None)
            }
            Err(cas) => Ok(Some(Seen {
                first_seen_us: cas.current.as_deref().map_or(0, |v| field(v, 8)),
            })),
        }
    }

    /// Forgets ids whose keep-until time has passed. Returns how many went.
    pub fn purge(&self, now: SystemTime) -> Result<usize, ReplayError> {
        let now = unix_us(now);
        let mut gone = 0;
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            if field(&v, 0) < now {
                self.tree.remove(&k)?;
                let n = (k.len() + v.len()) as u64;
                let _ = self
                    .bytes
                    .fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(n)));
                gone += 1;
            }
        }
        Ok(gone)
    }

    /// Ids currently remembered.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_claimed_id_is_a_replay_until_purged_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let open = || {
            let store = Arc::new(crate::buffer::store::open(dir.path(), 1 << 20).unwrap());
            ReplayStore::new(SideTree {
                tree: store.db().open_tree("ids").unwrap(),
                store,
                bytes: Arc::new(AtomicU64::new(0)),
            })
        };
        {
            let s = open();
            assert_eq!(
                s.claim("a", t0 + Duration::from_secs(60), t0)
                    .await
                    .unwrap(),
                None
            );
            assert_eq!(
                s.claim(
                    "a",
                    t0 + Duration::from_secs(60),
                    t0 + Duration::from_secs(1)
                )
                .await
                .unwrap(),
                Some(Seen {
                    first_seen_us: unix_us(t0)
                })
            );
        }
        let s = open();
        assert!(s.claim("a", t0, t0).await.unwrap().is_some());
        assert_eq!(s.purge(t0 + Duration::from_secs(59)).unwrap(), 0);
        assert_eq!(s.purge(t0 + Duration::from_secs(61)).unwrap(), 1);
        assert!(s.is_empty());
        assert_eq!(s.claim("a", t0, t0).await.unwrap(), None);
    }
}
