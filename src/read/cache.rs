//! The block cache: an LRU of fetched blocks, bounded in bytes, shared by
//! every open file of the mount.

use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;

/// A block of one pinned version of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// Identifies a disk at one version (see `read::file_key`).
    pub file: u64,
    pub index: u64,
}

pub struct BlockCache {
    inner: Mutex<Inner>,
}

struct Inner {
    blocks: LruCache<BlockKey, Bytes>,
    bytes: u64,
    capacity: u64,
}

impl BlockCache {
    pub fn new(capacity: u64) -> Self {
        BlockCache {
            inner: Mutex::new(Inner {
                blocks: LruCache::unbounded(),
                bytes: 0,
                capacity,
            }),
        }
    }

    pub fn get(&self, key: &BlockKey) -> Option<Bytes> {
        self.lock().blocks.get(key).cloned()
    }

    /// Without touching its place in the LRU order.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.lock().blocks.contains(key)
    }

    pub fn insert(&self, key: BlockKey, block: Bytes) {
        let mut inner = self.lock();
        let len = block.len() as u64;
        if len > inner.capacity {
            return;
        }
        if let Some(old) = inner.blocks.put(key, block) {
            inner.bytes -= old.len() as u64;
        }
        inner.bytes += len;
        while inner.bytes > inner.capacity {
            match inner.blocks.pop_lru() {
                Some((_, evicted)) => inner.bytes -= evicted.len() as u64,
                None => break,
            }
        }
    }

    pub fn remove(&self, key: &BlockKey) {
        let mut inner = self.lock();
        if let Some(block) = inner.blocks.pop(key) {
            inner.bytes -= block.len() as u64;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the LRU consistent enough to
        // keep serving: every mutation above is complete or not started.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(index: u64) -> BlockKey {
        BlockKey { file: 1, index }
    }

    #[test]
    fn evicts_least_recently_used_beyond_capacity() {
        let cache = BlockCache::new(300);
        cache.insert(key(0), Bytes::from(vec![0; 100]));
        cache.insert(key(1), Bytes::from(vec![1; 100]));
        cache.insert(key(2), Bytes::from(vec![2; 100]));
        assert!(cache.get(&key(0)).is_some()); // 0 is now most recent
        cache.insert(key(3), Bytes::from(vec![3; 100]));
        assert!(cache.contains(&key(0)));
        assert!(!cache.contains(&key(1)));
        assert_eq!(cache.bytes(), 300);
    }

    #[test]
    fn replacing_a_block_keeps_the_byte_count_true() {
        let cache = BlockCache::new(1000);
        cache.insert(key(0), Bytes::from(vec![0; 100]));
        cache.insert(key(0), Bytes::from(vec![0; 50]));
        assert_eq!(cache.bytes(), 50);
        cache.insert(key(1), Bytes::from(vec![0; 2000]));
        assert_eq!(
            cache.bytes(),
            50,
            "a block larger than the cache is not kept"
        );
    }
}
