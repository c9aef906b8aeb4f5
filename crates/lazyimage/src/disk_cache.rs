//! The node cache on disk: verified compressed spans, kept across mounter restarts and shared by
//! every mount on the node, within a byte budget, least recently used first out.
//!
//! An entry's file name is the sha256 of its [`RangeKey`] (layer digest, byte range and the
//! identity of the checkpoints that verified the bytes), so entries are content-addressed by what
//! verifies them, as in memory. Only bytes whose span digests verified are written; what is read
//! back is verified again by the reader before use, and a file that fails is dropped and the span
//! fetched again (`reader.rs`). Writes go to a temporary file renamed into place, so a crash
//! leaves no half entry under a real name. A write that fails (full disk, read-only disk) is
//! counted and skipped: the read it came from is served all the same.
//!
//! Recency lives in memory and in each file's mtime (set on use), so the order survives a
//! restart: at startup the directory is scanned, ordered by mtime and trimmed to the budget.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cache::RangeKey;

/// Suffix of files being written.
const PARTIAL: &str = ".partial";

/// The disk cache of one node.
pub struct DiskCache {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    /// Files that failed verification (or could not be read) and were dropped.
    dropped: AtomicU64,
    /// Writes that failed and were skipped (the read was served without caching).
    write_failures: AtomicU64,
}

/// Entries by name, and their recency.
#[derive(Default)]
struct State {
    /// Name -> (size, tick).
    entries: HashMap<String, (u64, u64)>,
    /// Tick -> name, oldest first.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
}

impl State {
    fn touch(&mut self, name: &str, size: u64) {
        self.tick += 1;
        if let Some((old_size, old_tick)) = self.entries.insert(name.to_string(), (size, self.tick))
        {
            self.order.remove(&old_tick);
            self.bytes -= old_size;
        }
        self.order.insert(self.tick, name.to_string());
        self.bytes += size;
    }

    fn forget(&mut self, name: &str) -> bool {
        match self.entries.remove(name) {
            Some((size, tick)) => {
                self.order.remove(&tick);
                self.bytes -= size;
                true
            }
            None => false,
        }
    }
}

/// What the disk cache holds and how it did, for the `mounts` endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct DiskCacheStats {
    pub dir: PathBuf,
    pub entries: usize,
    pub bytes: u64,
    pub budget: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub dropped: u64,
    pub write_failures: u64,
}

impl DiskCache {
    /// Opens (creating, `0700`) the cache in `dir`: takes stock of what a previous run left,
    /// removes half-written files, and trims to `budget`.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut found = Vec::new();
        for shard in fs::read_dir(dir)? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for file in fs::read_dir(&shard)? {
                let path = file?.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                else {
                    continue;
                };
                if name.ends_with(PARTIAL) {
                    let _ = fs::remove_file(&path);
                    continue;
                }
                let meta = fs::metadata(&path)?;
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((used, name, meta.len()));
            }
        }
        found.sort();
        let cache = Self {
            dir: dir.to_path_buf(),
            budget,
            state: Mutex::new(State::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
        };
        {
            let mut state = cache.state.lock().expect("disk cache lock");
            for (_, name, size) in found {
                state.touch(&name, size);
            }
        }
        cache.evict_to_budget();
        Ok(cache)
    }

    /// The bytes of `key`, if cached (not yet verified: the caller verifies, and calls
    /// [`DiskCache::drop_entry`] when they fail).
    pub fn get(&self, key: &RangeKey) -> Option<Bytes> {
        let name = file_name(key);
        let known = self
            .state
            .lock()
            .expect("disk cache lock")
            .entries
            .get(&name)
            .copied();
        let Some((size, _)) = known else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let path = self.path(&name);
        match fs::read(&path) {
            Ok(bytes) if bytes.len() as u64 == size => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                self.state
                    .lock()
                    .expect("disk cache lock")
                    .touch(&name, size);
                // Recency for the next run; a failure only costs ordering.
                let _ = fs::File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(Bytes::from(bytes))
            }
            // Gone, truncated or unreadable: not an entry any more.
            _ => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.drop_entry(key);
                None
            }
        }
    }

    /// Stores verified `bytes` under `key`, evicting the least recently used entries past the
    /// budget. Never fails: a write that does not work is counted and skipped.
    pub fn insert(&self, key: &RangeKey, bytes: &[u8]) {
        let size = bytes.len() as u64;
        if size > self.budget {
            return;
        }
        let name = file_name(key);
        if self
            .state
            .lock()
            .expect("disk cache lock")
            .entries
            .contains_key(&name)
        {
            return;
        }
        if let Err(err) = self.write(&name, bytes) {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %err, "span not cached on disk");
            return;
        }
        self.state
            .lock()
            .expect("disk cache lock")
            .touch(&name, size);
        self.evict_to_budget();
    }

    /// Removes `key`'s file: it failed verification or could not be read.
    pub fn drop_entry(&self, key: &RangeKey) {
        let name = file_name(key);
        let known = self.state.lock().expect("disk cache lock").forget(&name);
        if known {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        let _ = fs::remove_file(self.path(&name));
    }

    pub fn stats(&self) -> DiskCacheStats {
        let state = self.state.lock().expect("disk cache lock");
        DiskCacheStats {
            dir: self.dir.clone(),
            entries: state.entries.len(),
            bytes: state.bytes,
            budget: self.budget,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            write_failures: self.write_failures.load(Ordering::Relaxed),
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path(name);
        let shard = path.parent().expect("sharded path");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(shard)?;
        let partial = shard.join(format!("{name}{PARTIAL}"));
        // The mtime set from the same clock as on use (the kernel's own is coarser), so the
        // order a restart reads back is the order of use.
        let written = fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .and_then(|mut file| {
                file.write_all(bytes)?;
                file.set_modified(SystemTime::now())
            });
        if let Err(err) = written.and_then(|()| fs::rename(&partial, &path)) {
            let _ = fs::remove_file(&partial);
            return Err(err);
        }
        Ok(())
    }

    fn evict_to_budget(&self) {
        loop {
            let victim = {
                let mut state = self.state.lock().expect("disk cache lock");
                if state.bytes <= self.budget {
                    return;
                }
                let Some((_, name)) = state.order.pop_first() else {
                    return;
                };
                if let Some((size, _)) = state.entries.remove(&name) {
                    state.bytes -= size;
                }
                name
            };
            self.evictions.fetch_add(1, Ordering::Relaxed);
            let _ = fs::remove_file(self.path(&victim));
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(&name[..2]).join(name)
    }
}

/// The file name of a key: hex sha256 of everything in it.
fn file_name(key: &RangeKey) -> String {
    let mut hash = Sha256::new();
    hash.update((key.digest.len() as u64).to_le_bytes());
    hash.update(key.digest.as_bytes());
    hash.update(key.start.to_le_bytes());
    hash.update(key.end.to_le_bytes());
    hash.update(key.verifier);
    format!("{:x}", hash.finalize())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(start: u64, verifier: u8) -> RangeKey {
        RangeKey {
            digest: Arc::from("sha256:abc"),
            start,
            end: start + 10,
            verifier: [verifier; 32],
        }
    }

    #[test]
    fn entries_survive_a_reopen_in_recency_order_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 30).unwrap();
        cache.insert(&key(0, 1), &[1; 10]);
        cache.insert(&key(10, 1), &[2; 10]);
        cache.insert(&key(20, 1), &[3; 10]);
        // Another verifier is another entry, never the same bytes.
        assert!(cache.get(&key(0, 2)).is_none());
        assert_eq!(cache.get(&key(0, 1)).unwrap().as_ref(), &[1; 10]);
        cache.insert(&key(30, 1), &[4; 10]);
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes, stats.evictions), (3, 30, 1));
        assert!(
            cache.get(&key(10, 1)).is_none(),
            "the least recently used went"
        );
        drop(cache);

        let reopened = DiskCache::open(dir.path(), 20).unwrap();
        let stats = reopened.stats();
        assert_eq!(
            (stats.entries, stats.bytes),
            (2, 20),
            "trimmed to the new budget"
        );
        assert_eq!(reopened.get(&key(30, 1)).unwrap().as_ref(), &[4; 10]);
    }

    #[test]
    fn a_damaged_file_is_a_miss_and_a_failed_write_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1000).unwrap();
        cache.insert(&key(0, 1), &[1; 10]);
        let path = cache.path(&file_name(&key(0, 1)));
        fs::write(&path, [9; 3]).unwrap();
        assert!(cache.get(&key(0, 1)).is_none());
        assert_eq!(cache.stats().dropped, 1);
        assert!(!path.exists());

        // A shard that cannot be created (a file is in the way): the write is skipped.
        let blocked = key(50, 3);
        let shard = dir.path().join(&file_name(&blocked)[..2]);
        let _ = fs::remove_dir_all(&shard);
        fs::write(&shard, b"in the way").unwrap();
        cache.insert(&blocked, &[5; 10]);
        assert_eq!(cache.stats().write_failures, 1);
        assert!(cache.get(&blocked).is_none());
    }
}
