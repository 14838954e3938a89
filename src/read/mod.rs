//! The read path: block cache, read-ahead, single flight, cancellation.
//!
//! Every `read()` is served from fixed-size blocks. A block is either in the
//! [`BlockCache`], in a hole ([`holes`]: zeros, never fetched), being
//! fetched (the fetch is shared: concurrent misses on one block wait on the
//! same fetch — [`flight`]), or fetched now ([`fetch`]). A fetch takes
//! tokens from the mount's throttle for exactly the bytes it asks the
//! provider for, then reads them, retrying transient faults within the
//! mount's time budget ([`retry`]).
//!
//! Sequential readers get read-ahead ([`prefetch::Sequential`]): blocks past
//! the one asked for are fetched in background tasks so that several fetches
//! overlap; the kernel's own read-ahead adds more. The window is bounded by
//! memory (fetch buffers come from a fixed budget and the cache holds the
//! rest) and, when throttled, by what the reader's share of the rate
//! delivers in half a second, so prefetched bytes never pile up while
//! readers wait for tokens.
//!
//! Each open file owns a cancellation token, a child of the mount's. Its
//! fetches run under it: closing the file, killing the reader or unmounting
//! cancels them, including their place in the throttle queue.

pub mod cache;
pub mod calls;
mod fetch;
mod flight;
pub mod holes;
pub mod prefetch;
pub mod retry;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::FsError;
use crate::provider::{DiskEntry, Pinned, Provider, ProviderError, Version};
use crate::throttle::priority::Priorities;
use crate::throttle::{Flow, Throttle};
use cache::{BlockCache, BlockKey};
use calls::ProviderCalls;
use fetch::zeros;
use flight::{FetchError, Flights, SharedFetch};
use holes::DataMap;
use prefetch::Sequential;
use retry::{Budget, RetryPolicy};

#[derive(Debug, Clone)]
pub struct ReadConfig {
    /// Unit of fetching and caching. Kernel requests are at most 1 MiB, so
    /// a 2 MiB block serves most reads as a slice without copying, while
    /// halving the provider requests per GiB against 1 MiB blocks (measured
    /// faster over HTTP; 4 MiB was no faster and coarser for the throttle).
    pub block_size: u64,
    /// Memory for cached and in-flight data, all files together.
    pub memory: u64,
    /// Read-ahead ceiling per file: past a few dozen MiB more overlap buys
    /// nothing on any link we have measured, it only holds memory.
    pub max_window: u64,
    /// Read-ahead of a sequential reader goes out in requests of up to the
    /// provider's preferred size, capped by this (whole blocks).
    pub max_request: u64,
    /// Retries and the time budget of every provider call.
    pub retry: RetryPolicy,
}

impl Default for ReadConfig {
    fn default() -> Self {
        ReadConfig {
            block_size: 2 << 20,
            memory: crate::options::DEFAULT_CACHE,
            max_window: 32 << 20,
            max_request: 16 << 20,
            retry: RetryPolicy::default(),
        }
    }
}

/// Counters of the mount's read path.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_fetched: AtomicU64,
    pub bytes_served: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub fetches: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub retries: AtomicU64,
    /// Blocks served as zeros from a hole, never fetched.
    pub hole_blocks: AtomicU64,
    /// Fetches running now (in the throttle queue or at the provider).
    pub fetches_in_flight: AtomicU64,
}

/// The process that opened a file, as the kernel told us at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opener {
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), if it could be read.
    pub command: String,
}

impl Opener {
    pub fn of_pid(pid: u32) -> Self {
        let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|comm| comm.trim_end().to_string())
            .unwrap_or_default();
        Opener { pid, command }
    }
}

enum Lookup {
    Ready(Bytes),
    Pending(SharedFetch),
}

/// A read that has started: its data, or the fetches it waits for.
pub enum Started {
    Ready(Bytes),
    Pending(PendingRead),
}

pub struct PendingRead {
    path: Arc<ReadPath>,
    reader: Arc<FileReader>,
    offset: u64,
    end: u64,
    first: u64,
    /// The first block's lookup, then the rest's: a read inside one block,
    /// the common case, needs no list.
    first_lookup: Lookup,
    rest: Vec<Lookup>,
}

impl PendingRead {
    /// Waits for the blocks and cuts the asked-for range out of them; a
    /// range inside one block is a slice of it, not a copy.
    pub async fn finish(self) -> Result<Bytes, FsError> {
        let PendingRead {
            path,
            reader,
            offset,
            end,
            first,
            first_lookup,
            rest,
        } = self;
        let base = first * path.config.block_size;
        let first_block = path.resolve(&reader, first, first_lookup).await?;
        if rest.is_empty() {
            return Ok(path.cut(
                &reader,
                std::slice::from_ref(&first_block),
                base,
                offset,
                end,
            ));
        }
        let mut blocks = Vec::with_capacity(rest.len() + 1);
        blocks.push(first_block);
        for (index, lookup) in (first + 1..).zip(rest) {
            blocks.push(path.resolve(&reader, index, lookup).await?);
        }
        Ok(path.cut(&reader, &blocks, base, offset, end))
    }
}

/// A reader's sequential state and the token of its current run: a seek
/// cancels the run's read-ahead that has not yet been charged.
struct ReadAhead {
    sequential: Sequential,
    run: CancellationToken,
}

/// One open file: a disk pinned at one version, and its reader's state.
pub struct FileReader {
    disk: Arc<DiskEntry>,
    pinned: Pinned,
    size: u64,
    key: u64,
    /// Path inside the mount, for log lines.
    path: String,
    cancel: CancellationToken,
    read_ahead: Mutex<ReadAhead>,
    flow: Flow,
    /// Open files reading this same disk version, this one included.
    readers_of_version: Arc<AtomicUsize>,
    /// Where the data is, when the provider knows the disk is sparse.
    data: DataMap,
    opener: Opener,
    opened: Instant,
    /// Bytes returned to this open file's readers.
    served: AtomicU64,
}

impl FileReader {
    /// The disk this reader reads.
    pub fn disk(&self) -> &DiskEntry {
        &self.disk
    }

    /// Path inside the mount.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn opener(&self) -> &Opener {
        &self.opener
    }

    pub fn opened(&self) -> Instant {
        self.opened
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// The version it was pinned to at open.
    pub fn pinned_version(&self) -> &Version {
        &self.pinned.version
    }

    /// Its weight in the throttle's fair queue.
    pub fn weight(&self) -> u32 {
        self.flow.weight()
    }

    pub fn set_weight(&self, weight: u32) {
        self.flow.set_weight(weight);
    }
    /// SEEK_DATA: the first offset ≥ `offset` that holds data.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        self.data.next_data(offset)
    }

    /// SEEK_HOLE: the first offset ≥ `offset` in a hole; the end of the
    /// file counts as one.
    pub fn next_hole(&self, offset: u64) -> Option<u64> {
        self.data.next_hole(offset)
    }
}

pub struct ReadPath {
    provider: Arc<dyn Provider>,
    throttle: Arc<Throttle>,
    priorities: RwLock<Priorities>,
    cache: BlockCache,
    inflight: Flights,
    /// Bounds the buffers of fetches in flight, one permit per block.
    fetch_slots: Arc<Semaphore>,
    config: ReadConfig,
    /// Bytes per read-ahead request: the provider's preference, capped.
    max_request: u64,
    cache_capacity: u64,
    open_files: AtomicUsize,
    readers_per_version: Mutex<HashMap<u64, Arc<AtomicUsize>>>,
    shutdown: CancellationToken,
    pub stats: Stats,
    /// Provider requests by operation: counts, latencies, errors.
    pub calls: ProviderCalls,
}

/// Identifies a disk at one version, so blocks of two versions never mix.
fn file_key(ino: u64, version: &Version) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the same disk at the same version gets the same key in
    // every open of this process.
    let mut hasher = std::hash::DefaultHasher::new();
    ino.hash(&mut hasher);
    version.hash(&mut hasher);
    hasher.finish()
}

impl ReadPath {
    pub fn new(
        provider: Arc<dyn Provider>,
        throttle: Arc<Throttle>,
        config: ReadConfig,
    ) -> Arc<Self> {
        // A quarter of the memory for buffers being filled, the rest for
        // blocks ready to serve (read-ahead lands there too).
        let slots = (config.memory / 4 / config.block_size).max(2);
        let cache_capacity = config
            .memory
            .saturating_sub(slots * config.block_size)
            .max(config.block_size);
        let max_request = provider.preferred_request_size().min(config.max_request);
        Arc::new(ReadPath {
            provider,
            throttle,
            priorities: RwLock::new(Priorities::default()),
            cache: BlockCache::new(cache_capacity),
            inflight: Flights::default(),
            fetch_slots: Arc::new(Semaphore::new(slots as usize)),
            max_request,
            config,
            cache_capacity,
            open_files: AtomicUsize::new(0),
            readers_per_version: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            stats: Stats::default(),
            calls: ProviderCalls::default(),
        })
    }

    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// Weights for files opened from now on (open ones: [`FileReader`]
    /// weights are set by the caller, which knows them).
    pub fn set_priorities(&self, priorities: Priorities) {
        *self
            .priorities
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = priorities;
    }

    /// The weight `path` gets under the priorities in force.
    pub fn weight_for(&self, path: &str) -> u32 {
        self.priorities
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .weight_for(path)
    }

    pub fn open_files(&self) -> usize {
        self.open_files.load(Ordering::Relaxed)
    }

    /// Cancels every fetch of every file: the mount is going away.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &self,
        ino: u64,
        disk: Arc<DiskEntry>,
        pinned: Pinned,
        path: String,
        data: Option<Vec<Range<u64>>>,
        opener: Opener,
    ) -> Arc<FileReader> {
        self.open_files.fetch_add(1, Ordering::Relaxed);
        let key = file_key(ino, &pinned.version);
        let readers_of_version = {
            let mut readers = self
                .readers_per_version
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let count = readers.entry(key).or_default();
            count.fetch_add(1, Ordering::Relaxed);
            Arc::clone(count)
        };
        let flow = Flow::new(self.weight_for(&path));
        let cancel = self.shutdown.child_token();
        let run = cancel.child_token();
        Arc::new(FileReader {
            key,
            readers_of_version,
            data: DataMap::new(data, pinned.size),
            disk,
            size: pinned.size,
            pinned,
            path,
            cancel,
            read_ahead: Mutex::new(ReadAhead {
                sequential: Sequential::default(),
                run,
            }),
            flow,
            opener,
            opened: Instant::now(),
            served: AtomicU64::new(0),
        })
    }

    /// The file is closed: its fetches stop, queued or running.
    pub fn release(&self, reader: &FileReader) {
        reader.cancel.cancel();
        self.open_files.fetch_sub(1, Ordering::Relaxed);
        let mut readers = self
            .readers_per_version
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if reader.readers_of_version.fetch_sub(1, Ordering::Relaxed) == 1 {
            readers.remove(&reader.key);
        }
    }

    fn max_window(&self) -> u64 {
        let readers = self.open_files.load(Ordering::Relaxed).max(1) as u64;
        let by_memory = self.cache_capacity / (2 * readers);
        // Half a second of each reader's share of the rate: enough to keep
        // fetches overlapping, little enough that bytes fetched ahead do not
        // sit in memory while the reader waits for tokens.
        let by_rate = match self.throttle.planning_rate() {
            u64::MAX => u64::MAX,
            rate => (rate / 2 / readers).max(2 * self.config.block_size),
        };
        self.config
            .max_window
            .min(by_memory)
            .min(by_rate)
            .max(self.config.block_size)
    }

    /// Up to `size` bytes at `offset`; fewer only at the end of the file.
    pub async fn read(
        self: &Arc<Self>,
        reader: &Arc<FileReader>,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, FsError> {
        match self.start(reader, offset, size) {
            Started::Ready(data) => Ok(data),
            Started::Pending(pending) => pending.finish().await,
        }
    }

    /// Starts a read without waiting: when every block is cached the data
    /// is ready at once (the caller answers the kernel on its own thread,
    /// saving a task hand-off), otherwise the fetches are under way and
    /// [`PendingRead::finish`] waits for them. Needs a tokio context.
    pub fn start(self: &Arc<Self>, reader: &Arc<FileReader>, offset: u64, size: u32) -> Started {
        if offset >= reader.size || size == 0 {
            return Started::Ready(Bytes::new());
        }
        let block_size = self.config.block_size;
        let end = (offset + u64::from(size)).min(reader.size);
        let first = offset / block_size;
        let last = (end - 1) / block_size;
        let max_window = self.max_window();
        // Half the window per request keeps two requests overlapping.
        let run_blocks = (self.max_request.min(max_window / 2) / block_size).max(1);
        let (ahead, done, run) = {
            let file_blocks = reader.size.div_ceil(block_size);
            let mut state = reader
                .read_ahead
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let ahead = state.sequential.on_read(
                offset,
                end - offset,
                block_size,
                max_window,
                file_blocks,
                run_blocks,
            );
            if state.sequential.take_seek() {
                // The read-ahead of the run left behind is stale.
                state.run.cancel();
                state.run = reader.cancel.child_token();
            }
            let done = state
                .sequential
                .on_served(offset, end - offset, block_size, reader.size);
            let run = (!ahead.is_empty()).then(|| state.run.clone());
            (ahead, done, run)
        };

        // Blocks asked for go to the throttle queue before read-ahead does.
        let first_lookup = self.lookup(reader, first);
        let rest: Vec<Lookup> = (first + 1..=last).map(|i| self.lookup(reader, i)).collect();
        // Drop-behind: a block this reader has now read through is freed
        // (this read holds its own reference), unless another open file
        // reads the same disk and may still want it.
        if reader.readers_of_version.load(Ordering::Relaxed) == 1 {
            for index in done {
                self.cache.remove(&BlockKey {
                    file: reader.key,
                    index,
                });
            }
        }
        if let Some(run) = run {
            let mut run_start = ahead.start;
            while run_start < ahead.end {
                let run_end = (run_start + run_blocks).min(ahead.end);
                self.prefetch(reader, run_start..run_end, &run);
                run_start = run_end;
            }
        }

        // Every block cached: the data is ready without waiting.
        let base = first * block_size;
        if let Lookup::Ready(block) = &first_lookup {
            if rest.is_empty() {
                return Started::Ready(self.cut(
                    reader,
                    std::slice::from_ref(block),
                    base,
                    offset,
                    end,
                ));
            }
            if rest.iter().all(|lookup| matches!(lookup, Lookup::Ready(_))) {
                let blocks: Vec<Bytes> = std::iter::once(block)
                    .chain(rest.iter().filter_map(|lookup| match lookup {
                        Lookup::Ready(block) => Some(block),
                        Lookup::Pending(_) => None,
                    }))
                    .cloned()
                    .collect();
                return Started::Ready(self.cut(reader, &blocks, base, offset, end));
            }
        }
        Started::Pending(PendingRead {
            path: Arc::clone(self),
            reader: Arc::clone(reader),
            offset,
            end,
            first,
            first_lookup,
            rest,
        })
    }

    /// `[offset, end)` out of consecutive blocks starting at `base`.
    fn cut(
        &self,
        reader: &FileReader,
        blocks: &[Bytes],
        base: u64,
        offset: u64,
        end: u64,
    ) -> Bytes {
        let start = (offset - base) as usize;
        let len = (end - offset) as usize;
        let data = if let [block] = blocks {
            block.slice(start..start + len)
        } else {
            let mut out = BytesMut::with_capacity(len);
            let mut skip = start;
            for block in blocks {
                let take = (block.len() - skip).min(len - out.len());
                out.extend_from_slice(&block[skip..skip + take]);
                skip = 0;
            }
            out.freeze()
        };
        self.stats
            .bytes_served
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        reader
            .served
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        data
    }

    /// Waits for a block, fetching it again if the fetch it joined belonged
    /// to another file that was closed meanwhile.
    async fn resolve(
        self: &Arc<Self>,
        reader: &Arc<FileReader>,
        index: u64,
        mut lookup: Lookup,
    ) -> Result<Bytes, FsError> {
        // Each round joins a fetch that another file started and then
        // closed; a few rounds are plenty, endless ones would be a bug.
        for _ in 0..MAX_REJOINS {
            let fetch = match lookup {
                Lookup::Ready(block) => return Ok(block),
                Lookup::Pending(fetch) => fetch,
            };
            match fetch.await {
                Ok(block) => return Ok(block),
                Err(FetchError::Cancelled) if !reader.cancel.is_cancelled() => {
                    lookup = self.lookup(reader, index);
                }
                Err(FetchError::Cancelled) => return Err(FsError::Cancelled),
                Err(FetchError::Failed(source)) => {
                    return Err(FsError::Provider {
                        path: reader.path.clone(),
                        source,
                    })
                }
            }
        }
        tracing::error!(path = %reader.path, index, "a block's fetch was cancelled {MAX_REJOINS} times in a row");
        Err(FsError::Cancelled)
    }

    /// The block from the cache, or the fetch that will produce it (joining
    /// one in flight, or starting one).
    fn lookup(self: &Arc<Self>, reader: &Arc<FileReader>, index: u64) -> Lookup {
        let key = BlockKey {
            file: reader.key,
            index,
        };
        let start = index * self.config.block_size;
        let end = (start + self.config.block_size).min(reader.size);
        if reader.data.is_hole(start, end) {
            // Unwritten: zeros, with no fetch and no tokens.
            self.stats.hole_blocks.fetch_add(1, Ordering::Relaxed);
            return Lookup::Ready(zeros((end - start) as usize));
        }
        if let Some(block) = self.cache.get(&key) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Ready(block);
        }
        let mut inflight = self.inflight.lock();
        if let Some(flight) = inflight.get(&key) {
            flight.demanded.store(true, Ordering::Relaxed);
            return Lookup::Pending(flight.fetch.clone());
        }
        // A fetch may have finished between the two looks.
        if let Some(block) = self.cache.get(&key) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Lookup::Ready(block);
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Pending(self.start_fetch(&mut inflight, reader, index, 1, None))
    }

    /// Read-ahead of `blocks`: the ones neither cached, nor being fetched,
    /// nor holes are fetched, each consecutive stretch in one request.
    fn prefetch(
        self: &Arc<Self>,
        reader: &Arc<FileReader>,
        blocks: Range<u64>,
        run: &CancellationToken,
    ) {
        let block_size = self.config.block_size;
        let mut inflight = self.inflight.lock();
        let mut stretch: Option<u64> = None;
        for index in blocks.start..=blocks.end {
            let missing = index < blocks.end && {
                let key = BlockKey {
                    file: reader.key,
                    index,
                };
                let start = index * block_size;
                let end = (start + block_size).min(reader.size);
                !reader.data.is_hole(start, end)
                    && !inflight.contains_key(&key)
                    && !self.cache.contains(&key)
            };
            match (missing, stretch) {
                (true, None) => stretch = Some(index),
                (false, Some(first)) => {
                    self.stats
                        .cache_misses
                        .fetch_add(index - first, Ordering::Relaxed);
                    // The fetches run on in their task.
                    drop(self.start_fetch(&mut inflight, reader, first, index - first, Some(run)));
                    stretch = None;
                }
                _ => {}
            }
        }
    }

    /// Runs a provider call with the mount's retries, within what is
    /// left of `budget` (see [`retry`]).
    pub async fn retrying<T, F, Fut>(
        &self,
        budget: &mut Budget,
        path: &str,
        operation: &str,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        self.config
            .retry
            .run(
                budget,
                &self.stats.retries,
                (path, operation),
                || std::future::ready(()),
                call,
            )
            .await
    }
}

/// Rounds a read re-joins a block whose fetch was cancelled under it.
const MAX_REJOINS: u32 = 16;

/// Counts a fetch out of the in-flight gauge however it ends.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
