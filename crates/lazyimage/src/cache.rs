//! Byte-bounded LRU caches of blob bytes, shared by every mount of the instance.
//!
//! Keys name a layer blob by digest, a byte range of it, and what verified the bytes: the
//! identity of the checkpoint(s) they were verified and decoded through (span digest, window,
//! offsets; `Checkpoint::identity`). Two images whose indexes agree on a layer share its cached
//! bytes; an image whose manifest names a popular layer digest with a self-consistent index of
//! its own (another registry serving other bytes under that digest, or a doctored window) gets
//! other keys, so it can never put its bytes in front of another image's reads. Compressed spans
//! are inserted only after their span digests verified, so a cached entry is always good.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A byte range of one layer blob (compressed offsets for spans, uncompressed for pieces) and
/// what verified its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RangeKey {
    pub digest: Arc<str>,
    pub start: u64,
    pub end: u64,
    /// The checkpoint identity the bytes were verified through; for a fetch covering several
    /// spans, the sha256 of their identities in order.
    pub verifier: [u8; 32],
}

/// A least-recently-used map whose entries weigh their length in bytes.
pub struct Lru<K> {
    map: HashMap<K, (Bytes, u64)>,
    /// Use tick → key, oldest first.
    order: BTreeMap<u64, K>,
    tick: u64,
    bytes: u64,
    budget: u64,
}

impl<K: Clone + Eq + Hash> Lru<K> {
    pub fn new(budget: u64) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            budget,
        }
    }

    pub fn get(&mut self, key: &K) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let (value, used) = self.map.get_mut(key)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, key.clone());
        Some(value.clone())
    }

    /// Inserts `value`, evicting the least recently used entries past the budget. A value larger
    /// than the whole budget is not kept. Returns how many entries were evicted.
    pub fn insert(&mut self, key: K, value: Bytes) -> u64 {
        let size = value.len() as u64;
        if size > self.budget {
            return 0;
        }
        self.tick += 1;
        if let Some((old, used)) = self.map.insert(key.clone(), (value, self.tick)) {
            self.order.remove(&used);
            self.bytes -= old.len() as u64;
        }
        self.order.insert(self.tick, key);
        self.bytes += size;
        let mut evicted = 0;
        while self.bytes > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((value, _)) = self.map.remove(&oldest) {
                self.bytes -= value.len() as u64;
                evicted += 1;
            }
        }
        evicted
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// One cache with its counters.
pub struct Cache {
    lru: Mutex<Lru<RangeKey>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

/// What a cache holds and how it did, for the stats endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: u64,
    pub budget: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl Cache {
    pub fn new(budget: u64) -> Self {
        Self {
            lru: Mutex::new(Lru::new(budget)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn get(&self, key: &RangeKey) -> Option<Bytes> {
        let found = self.lru.lock().expect("cache lock").get(key);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Like [`Cache::get`], without counting a hit or miss (a second look after waiting).
    pub fn peek(&self, key: &RangeKey) -> Option<Bytes> {
        self.lru.lock().expect("cache lock").get(key)
    }

    pub fn insert(&self, key: RangeKey, value: Bytes) {
        let evicted = self.lru.lock().expect("cache lock").insert(key, value);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
    }

    pub fn stats(&self) -> CacheStats {
        let lru = self.lru.lock().expect("cache lock");
        CacheStats {
            entries: lru.len(),
            bytes: lru.bytes(),
            budget: lru.budget,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

/// The instance's caches.
pub struct Caches {
    /// Verified compressed spans, as fetched.
    pub compressed: Cache,
    /// Inflated pieces of layer data.
    pub decoded: Cache,
    /// The node cache on disk, below `compressed` (`None`: not configured or not usable).
    pub disk: Option<std::sync::Arc<crate::disk_cache::DiskCache>>,
}

/// Budgets of the caches a process's readers share (the mounter's `[mounter.cache]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Budget for compressed spans fetched from registries (a small layer is one span): a span
    /// read again is not fetched again while it is here.
    pub compressed_bytes: u64,
    /// Budget for inflated file data, so consecutive small reads (the kernel reads 128 KiB at a
    /// time) do not inflate the same span over and over.
    pub decoded_bytes: u64,
    /// The node cache on disk: verified compressed spans, kept across restarts (`disk_cache.rs`).
    /// Unset: no disk cache.
    pub disk_dir: Option<PathBuf>,
    /// Budget of the disk cache; least recently used spans go first.
    pub disk_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            compressed_bytes: 256 << 20,
            decoded_bytes: 128 << 20,
            disk_dir: Some(PathBuf::from("/var/cache/imagemesh/mounter")),
            disk_bytes: 10 << 30,
        }
    }
}

impl Caches {
    /// Opens the disk cache too. A disk cache that cannot be opened is logged and left out:
    /// mounts still work, from the registry.
    pub fn new(config: &CacheConfig) -> Self {
        let disk = config.disk_dir.as_ref().and_then(|dir| {
            match crate::disk_cache::DiskCache::open(dir, config.disk_bytes) {
                Ok(cache) => {
                    let stats = cache.stats();
                    tracing::info!(dir = %dir.display(), entries = stats.entries, bytes = stats.bytes, "disk cache open");
                    Some(std::sync::Arc::new(cache))
                }
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "disk cache unusable; running without it");
                    None
                }
            }
        });
        Self {
            compressed: Cache::new(config.compressed_bytes),
            decoded: Cache::new(config.decoded_bytes),
            disk,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    #[test]
    fn least_recently_used_entries_go_first_and_the_budget_holds() {
        let mut lru = Lru::new(100);
        lru.insert("a", bytes(40));
        lru.insert("b", bytes(40));
        assert!(lru.get(&"a").is_some(), "a is now the most recent");
        assert_eq!(lru.insert("c", bytes(40)), 1);
        assert!(lru.get(&"b").is_none(), "b was the least recently used");
        assert!(lru.get(&"a").is_some() && lru.get(&"c").is_some());
        assert_eq!(lru.bytes(), 80);
    }

    #[test]
    fn replacing_a_key_keeps_the_byte_count_and_oversized_values_are_not_kept() {
        let mut lru = Lru::new(100);
        lru.insert("a", bytes(60));
        lru.insert("a", bytes(30));
        assert_eq!((lru.len(), lru.bytes()), (1, 30));
        assert_eq!(lru.insert("huge", bytes(101)), 0);
        assert!(lru.get(&"huge").is_none());
        assert_eq!(lru.bytes(), 30);
    }
}
