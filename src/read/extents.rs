//! The extent map: what has been fetched, or is being fetched, at the
//! granularity it was fetched, and the memory it holds.
//!
//! An extent is one provider request's bytes: a 4 KiB read's own range, or
//! a read-ahead run of many MiB. Extents of one file never overlap; a read
//! is served from the extents that cover it, and only the gaps between
//! them are fetched. Pending and ready extents live under one lock, so a
//! miss either finds the fetch that will fill it or registers its own —
//! there is no window between the two in which a second fetch starts.
//!
//! Memory is reserved when a fetch is registered, for its whole length,
//! and given back when the extent is dropped; a slice a read still holds
//! does not outlive the reply. Ready extents are kept in two LRU orders:
//! those a read has used, and read-ahead nobody has read yet. Read-ahead
//! may evict only the first kind: when memory is short, its window
//! shrinks instead of pushing out another reader's unread read-ahead.
//! A demand fetch may evict either, and is admitted even when nothing can
//! be evicted (the kernel bounds the reads in flight).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};
use lru::LruCache;

use crate::provider::ProviderError;

#[derive(Debug, Clone)]
pub enum FetchError {
    /// The file that started the fetch was closed (or the mount is going).
    Cancelled,
    Failed(Arc<ProviderError>),
}

/// A fetch in flight, shared by every read that waits for it; its bytes
/// are the whole extent.
pub type SharedFetch = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

/// An extent of one pinned version of one disk, by where it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentKey {
    /// Identifies a disk at one version (see `read::file_key`).
    pub file: u64,
    pub start: u64,
}

pub enum State {
    Pending {
        fetch: SharedFetch,
        /// Set when a read waits for the fetch: read-ahead then charges
        /// as demand and is no longer cancelled by a seek.
        demanded: Arc<AtomicBool>,
    },
    Ready(Bytes),
}

pub struct Extent {
    pub end: u64,
    /// Tells a fetch's own extent from one registered later at the same
    /// place (after the first was dropped).
    id: u64,
    pub state: State,
}

pub struct Extents {
    inner: Mutex<Inner>,
}

pub struct Inner {
    map: BTreeMap<ExtentKey, Extent>,
    /// Ready extents a read has used (or a demand fetched), oldest first
    /// to go.
    used: LruCache<ExtentKey, ()>,
    /// Ready read-ahead no read has touched yet.
    unread: LruCache<ExtentKey, ()>,
    /// Reserved by pending and ready extents.
    bytes: u64,
    capacity: u64,
    next_id: u64,
}

/// Part of a read as the map answers it.
pub enum Cover {
    /// These bytes, ready (a slice of the extent).
    Ready(Bytes),
    /// An extent being fetched from `extent_start`; the read wants
    /// `[from, to)` of it.
    Pending {
        fetch: SharedFetch,
        extent_start: u64,
        from: u64,
        to: u64,
    },
    /// Nothing covers `[from, to)`.
    Gap { from: u64, to: u64 },
}

impl Extents {
    pub fn new(capacity: u64) -> Self {
        Extents {
            inner: Mutex::new(Inner {
                map: BTreeMap::new(),
                used: LruCache::unbounded(),
                unread: LruCache::unbounded(),
                bytes: 0,
                capacity,
                next_id: 0,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation below completes before it can panic, so a
        // poisoned map is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes reserved now, pending and ready.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        let inner = self.lock();
        inner
            .map
            .values()
            .filter(|extent| matches!(extent.state, State::Pending { .. }))
            .count()
    }
}

impl Inner {
    /// Walks `[offset, end)` of `file` in order, calling `each` with what
    /// covers each part. A `demand` (a read waiting) marks the pending
    /// extents it lands in demanded and makes the ready ones used.
    pub fn cover(
        &mut self,
        file: u64,
        offset: u64,
        end: u64,
        demand: bool,
        mut each: impl FnMut(Cover),
    ) {
        let mut at = offset;
        let from = self
            .map
            .range(
                ..=ExtentKey {
                    file,
                    start: offset,
                },
            )
            .next_back()
            .filter(|(key, extent)| key.file == file && extent.end > offset)
            .map_or(offset, |(key, _)| key.start);
        for (key, extent) in self
            .map
            .range(ExtentKey { file, start: from }..ExtentKey { file, start: end })
        {
            if extent.end <= at {
                continue;
            }
            if key.start > at {
                each(Cover::Gap {
                    from: at,
                    to: key.start,
                });
                at = key.start;
            }
            let to = extent.end.min(end);
            match &extent.state {
                State::Ready(bytes) => {
                    let base = key.start;
                    each(Cover::Ready(
                        bytes.slice((at - base) as usize..(to - base) as usize),
                    ));
                    if demand {
                        promote(&mut self.used, &mut self.unread, *key);
                    }
                }
                State::Pending { fetch, demanded } => {
                    if demand {
                        demanded.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    each(Cover::Pending {
                        fetch: fetch.clone(),
                        extent_start: key.start,
                        from: at,
                        to,
                    });
                }
            }
            at = to;
            if at >= end {
                break;
            }
        }
        if at < end {
            each(Cover::Gap { from: at, to: end });
        }
    }

    /// Where the extents of `file` around `[from, to)` leave room: the
    /// widest range inside `limit` that holds `[from, to)` and overlaps no
    /// extent. `[from, to)` itself must be a gap.
    pub fn room(&self, file: u64, from: u64, to: u64, limit: Range<u64>) -> Range<u64> {
        let before = self
            .map
            .range(..ExtentKey { file, start: from })
            .next_back()
            .filter(|(key, _)| key.file == file)
            .map_or(0, |(_, extent)| extent.end);
        let after = self
            .map
            .range(ExtentKey { file, start: to }..)
            .next()
            .filter(|(key, _)| key.file == file)
            .map_or(u64::MAX, |(key, _)| key.start);
        limit.start.max(before).min(from)..limit.end.min(after).max(to)
    }

    /// Whether any extent of `file` overlaps `[from, to)`.
    pub fn overlaps(&self, file: u64, from: u64, to: u64) -> bool {
        let before = self
            .map
            .range(..=ExtentKey { file, start: from })
            .next_back()
            .is_some_and(|(key, extent)| key.file == file && extent.end > from);
        before
            || self
                .map
                .range(ExtentKey { file, start: from }..ExtentKey { file, start: to })
                .next()
                .is_some()
    }

    /// An id for an extent about to be registered (its fetch must know
    /// it before the extent exists).
    pub fn allocate_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Bytes that can be reserved without evicting anything.
    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.bytes)
    }

    /// Registers `[start, end)` of `file` with its memory reserved. The
    /// caller has made room ([`Inner::make_room`]) as its kind allows.
    pub fn insert(&mut self, file: u64, start: u64, end: u64, id: u64, state: State) {
        self.bytes += end - start;
        let key = ExtentKey { file, start };
        let ready = matches!(state, State::Ready(_));
        self.map.insert(key, Extent { end, id, state });
        if ready {
            self.used.put(key, ());
        }
    }

    /// Evicts ready extents until `len` more bytes fit: the used ones
    /// first, then (for a demand only) unread read-ahead.
    pub fn make_room(&mut self, len: u64, demand: bool) {
        while self.bytes + len > self.capacity {
            let victim = match self.used.pop_lru() {
                Some((key, ())) => key,
                None if demand => match self.unread.pop_lru() {
                    Some((key, ())) => key,
                    None => return,
                },
                None => return,
            };
            if let Some(extent) = self.map.remove(&victim) {
                self.bytes -= extent.end - victim.start;
            }
        }
    }

    /// A fetch's bytes arrived: its extent (if it is still this fetch's)
    /// becomes ready, as unread read-ahead or as used.
    pub fn land(&mut self, key: ExtentKey, id: u64, bytes: Bytes, ahead: bool) {
        let Some(extent) = self.map.get_mut(&key) else {
            return;
        };
        if extent.id != id {
            return;
        }
        let demanded = match &extent.state {
            State::Pending { demanded, .. } => demanded.load(std::sync::atomic::Ordering::Relaxed),
            State::Ready(_) => return,
        };
        extent.state = State::Ready(bytes);
        if ahead && !demanded {
            self.unread.put(key, ());
        } else {
            self.used.put(key, ());
        }
    }

    /// A fetch ended without bytes (failed, cancelled, panicked): its
    /// extent goes, and its memory with it, if still pending.
    pub fn abandon(&mut self, key: ExtentKey, id: u64) {
        if self
            .map
            .get(&key)
            .is_some_and(|extent| extent.id == id && matches!(extent.state, State::Pending { .. }))
        {
            self.remove(key);
        }
    }

    fn remove(&mut self, key: ExtentKey) {
        if let Some(extent) = self.map.remove(&key) {
            self.bytes -= extent.end - key.start;
            self.used.pop(&key);
            self.unread.pop(&key);
        }
    }

    /// Drops the ready extents of `file` that end by `to` and reach into
    /// `[from, to)`: a lone sequential reader has read past them.
    pub fn drop_behind(&mut self, file: u64, from: u64, to: u64) {
        // One extent at a time, without a list: called on every
        // sequential read, it usually finds none or one. The extent
        // reaching into `from` from before it counts too.
        let mut at = self
            .map
            .range(..ExtentKey { file, start: from })
            .next_back()
            .filter(|(key, extent)| key.file == file && extent.end > from)
            .map_or(from, |(key, _)| key.start);
        while let Some((key, done)) = self
            .map
            .range(ExtentKey { file, start: at }..ExtentKey { file, start: to })
            .next()
            .map(|(key, extent)| {
                let done = extent.end <= to && matches!(extent.state, State::Ready(_));
                (*key, done)
            })
        {
            if done {
                self.remove(key);
            }
            at = key.start + 1;
        }
    }

    /// The last reader of `file` closed: its unread read-ahead is first
    /// to go when memory is needed.
    pub fn orphan(&mut self, file: u64) {
        let keys: Vec<ExtentKey> = self
            .map
            .range(
                ExtentKey { file, start: 0 }..=ExtentKey {
                    file,
                    start: u64::MAX,
                },
            )
            .map(|(key, _)| *key)
            .filter(|key| self.unread.contains(key))
            .collect();
        for key in keys {
            self.unread.pop(&key);
            self.used.put(key, ());
            self.used.demote(&key);
        }
    }
}

/// A read used `key`: it is no longer unread, and it is the newest.
fn promote(
    used: &mut LruCache<ExtentKey, ()>,
    unread: &mut LruCache<ExtentKey, ()>,
    key: ExtentKey,
) {
    if unread.pop(&key).is_some() || used.get(&key).is_none() {
        used.put(key, ());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(len: u64) -> State {
        State::Ready(Bytes::from(vec![7u8; len as usize]))
    }

    fn add(inner: &mut Inner, file: u64, start: u64, end: u64) -> u64 {
        let id = inner.allocate_id();
        inner.make_room(end - start, true);
        inner.insert(file, start, end, id, ready(end - start));
        id
    }

    /// Read-ahead of `len` bytes at 0 of `file`, landed and not read.
    fn add_unread(inner: &mut Inner, file: u64, len: u64) {
        let id = inner.allocate_id();
        inner.insert(file, 0, len, id, pending());
        let bytes = Bytes::from(vec![0; len as usize]);
        inner.land(ExtentKey { file, start: 0 }, id, bytes, true);
    }

    fn pending() -> State {
        State::Pending {
            fetch: futures::FutureExt::shared(futures::FutureExt::boxed(async {
                Ok::<_, FetchError>(Bytes::new())
            })),
            demanded: Arc::new(AtomicBool::new(false)),
        }
    }

    fn covers(inner: &mut Inner, offset: u64, end: u64) -> Vec<(char, u64, u64)> {
        let mut out = Vec::new();
        let mut at = offset;
        inner.cover(1, offset, end, true, |cover| match cover {
            Cover::Ready(bytes) => {
                out.push(('r', at, at + bytes.len() as u64));
                at += bytes.len() as u64;
            }
            Cover::Pending { from, to, .. } => {
                out.push(('p', from, to));
                at = to;
            }
            Cover::Gap { from, to } => {
                out.push(('g', from, to));
                at = to;
            }
        });
        out
    }

    #[test]
    fn a_read_is_covered_by_extents_and_gaps_in_order() {
        let extents = Extents::new(1 << 20);
        let mut inner = extents.lock();
        add(&mut inner, 1, 100, 200);
        add(&mut inner, 1, 300, 400);
        add(&mut inner, 2, 200, 300);
        assert_eq!(
            covers(&mut inner, 150, 350),
            vec![('r', 150, 200), ('g', 200, 300), ('r', 300, 350)]
        );
        assert_eq!(covers(&mut inner, 0, 50), vec![('g', 0, 50)]);
        assert_eq!(covers(&mut inner, 120, 130), vec![('r', 120, 130)]);
        assert_eq!(covers(&mut inner, 400, 500), vec![('g', 400, 500)]);
        assert_eq!(inner.room(1, 200, 250, 0..1000), 200..300);
        assert_eq!(inner.room(1, 450, 460, 0..1000), 400..1000);
        assert!(inner.overlaps(1, 199, 201));
        assert!(!inner.overlaps(1, 200, 300));
        assert_eq!(inner.bytes, 300);
    }

    #[test]
    fn read_ahead_room_spares_unread_read_ahead_and_a_demand_does_not() {
        let extents = Extents::new(1000);
        let mut inner = extents.lock();
        add_unread(&mut inner, 1, 600);
        add(&mut inner, 2, 0, 300);
        // Read-ahead may push out the used extent, never the unread one.
        inner.make_room(1000, false);
        assert_eq!(inner.bytes, 600);
        assert_eq!(inner.free(), 400);
        // A read of the unread read-ahead makes it used.
        assert_eq!(covers(&mut inner, 0, 10), vec![('r', 0, 10)]);
        inner.make_room(1000, false);
        assert_eq!(inner.bytes, 0);

        add_unread(&mut inner, 3, 600);
        inner.make_room(500, true);
        assert_eq!(inner.bytes, 0, "a demand evicts unread read-ahead too");
    }

    #[test]
    fn a_closed_files_unread_read_ahead_goes_first() {
        let extents = Extents::new(1000);
        let mut inner = extents.lock();
        add(&mut inner, 2, 0, 300);
        add_unread(&mut inner, 1, 600);
        inner.orphan(1);
        inner.make_room(500, false);
        assert!(!inner.map.contains_key(&ExtentKey { file: 1, start: 0 }));
        assert!(inner.map.contains_key(&ExtentKey { file: 2, start: 0 }));
    }

    #[test]
    fn dropping_behind_and_abandoning_give_memory_back() {
        let extents = Extents::new(1 << 20);
        let mut inner = extents.lock();
        let ready_id = add(&mut inner, 1, 0, 100);
        add(&mut inner, 1, 100, 300);
        let id = inner.allocate_id();
        inner.insert(1, 300, 400, id, pending());
        inner.drop_behind(1, 0, 200);
        assert_eq!(inner.bytes, 300, "only extents wholly behind go");
        inner.abandon(ExtentKey { file: 1, start: 0 }, ready_id);
        assert_eq!(inner.bytes, 300, "a ready extent is not abandoned");
        inner.abandon(
            ExtentKey {
                file: 1,
                start: 300,
            },
            id + 1,
        );
        assert_eq!(inner.bytes, 300, "another fetch's id abandons nothing");
        inner.abandon(
            ExtentKey {
                file: 1,
                start: 300,
            },
            id,
        );
        inner.drop_behind(1, 0, 300);
        assert_eq!(inner.bytes, 0);
        assert!(inner.used.is_empty() && inner.unread.is_empty());
    }
}
