//! The read path: extent map, access pattern, read-ahead, single flight,
//! cancellation.
//!
//! A `read()` is served from the [`extents`] that cover it: ranges fetched
//! earlier at the size they were fetched, ready or still being fetched (a
//! read joins the fetch in flight instead of starting its own). The parts
//! no extent covers are holes ([`holes`]: zeros, never fetched) or are
//! fetched now ([`fetch`]): each fetch takes tokens from the mount's
//! throttle for exactly the bytes it asks the provider for, then reads
//! them, retrying transient faults within the mount's time budget
//! ([`retry`]).
//!
//! How much a miss fetches follows the reader's [`pattern`]: a read out of
//! order fetches its own range rounded to 4 KiB (wider for reads that stay
//! near each other), and only a run of reads in order gets read-ahead, in
//! large requests, its window growing with the run. Read-ahead reserves its
//! memory from the `cache=` budget before it is issued and shrinks when the
//! budget is short; a lone sequential reader's extents are dropped once it
//! has read past them, so memory holds what is ahead of readers.
//!
//! Each open file owns a cancellation token, a child of the mount's. Its
//! fetches run under it: closing the file, killing the reader or unmounting
//! cancels them, including their place in the throttle queue.

pub mod calls;
pub mod extents;
mod fetch;
pub mod holes;
pub mod pattern;
pub mod retry;
pub mod trim;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt};
use tokio_util::sync::CancellationToken;

use crate::error::FsError;
use crate::provider::{DiskEntry, Pinned, Provider, ProviderError, Version};
use crate::throttle::priority::Priorities;
use crate::throttle::{Flow, Throttle};
use calls::ProviderCalls;
use extents::{Cover, Extents, FetchError, Inner};
use fetch::zeros;
use holes::DataMap;
use pattern::{Pattern, PAGE};
use retry::{Budget, RetryPolicy};

#[derive(Debug, Clone)]
pub struct ReadConfig {
    /// Memory for fetched and in-flight data, all files together.
    pub memory: u64,
    /// Read-ahead ceiling per file: past a few dozen MiB more overlap buys
    /// nothing on any link we have measured, it only holds memory.
    pub max_window: u64,
    /// Read-ahead goes out in requests of up to the provider's preferred
    /// size, capped by this.
    pub max_request: u64,
    /// Retries and the time budget of every provider call.
    pub retry: RetryPolicy,
}

impl Default for ReadConfig {
    fn default() -> Self {
        ReadConfig {
            memory: crate::options::DEFAULT_CACHE,
            max_window: 32 << 20,
            max_request: 16 << 20,
            retry: RetryPolicy::default(),
        }
    }
}

/// Read-ahead request size for providers without a preference.
const DEFAULT_REQUEST: u64 = 2 << 20;
/// Read-ahead requests in flight at once, all files together. Each one
/// holds a connection, and an SDK's connection keeps its read buffer
/// (hyper's: up to 408 KiB) while idle in its pool: 16 readers on gs://
/// measured 66 connections uncapped, 46 at 16 and peak RSS within
/// `cache=` + 64 MiB only at 8. One reader's 32 MiB window still goes out
/// as 2 x 16 MiB (object stores) or 8 x 2 MiB requests with 16 MiB ahead
/// (http: loopback copies measured the same); more readers share them, and
/// a read that finds nothing ahead fetches its own bytes.
pub const MAX_AHEAD_REQUESTS: u64 = 8;

/// Holes shorter than this inside a fetch are fetched with it: a second
/// request costs more than the zeros.
const MERGE_HOLES: u64 = 64 << 10;

/// Counters of the mount's read path.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_fetched: AtomicU64,
    pub bytes_served: AtomicU64,
    /// Parts of reads served from extents already fetched or in flight.
    pub cache_hits: AtomicU64,
    /// Fetches started (for a read, or ahead of one).
    pub cache_misses: AtomicU64,
    pub fetches: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub retries: AtomicU64,
    /// Parts of reads served as zeros from a hole, never fetched.
    pub hole_blocks: AtomicU64,
    /// Fetches running now (in the throttle queue or at the provider).
    pub fetches_in_flight: AtomicU64,
    /// Of those, read-ahead (capped at [`MAX_AHEAD_REQUESTS`]).
    pub ahead_in_flight: AtomicU64,
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

/// Part of a read: bytes in hand, the extent being fetched that holds
/// `[from, to)`, or (only while the read is planned) a gap.
type Part = Cover;

/// A read's parts in order; most reads have one, kept without a list.
#[derive(Default)]
struct Parts {
    first: Option<Part>,
    rest: Vec<Part>,
}

impl Parts {
    fn push(&mut self, part: Part) {
        match self.first {
            None => self.first = Some(part),
            Some(_) => self.rest.push(part),
        }
    }

    fn has_gaps(&self) -> bool {
        self.iter().any(|part| matches!(part, Part::Gap { .. }))
    }

    fn iter(&self) -> impl Iterator<Item = &Part> {
        self.first.iter().chain(&self.rest)
    }

    fn into_list(self) -> impl Iterator<Item = Part> {
        self.first.into_iter().chain(self.rest)
    }

    /// The read's bytes when every part is in hand: one part is itself
    /// (a slice of its extent, no copy), several are joined.
    fn ready(&self, len: usize) -> Option<Bytes> {
        if let (Some(Part::Ready(bytes)), true) = (&self.first, self.rest.is_empty()) {
            return Some(bytes.clone());
        }
        if !self.iter().all(|part| matches!(part, Part::Ready(_))) {
            return None;
        }
        let mut out = BytesMut::with_capacity(len);
        for part in self.iter() {
            if let Part::Ready(bytes) = part {
                out.extend_from_slice(bytes);
            }
        }
        Some(out.freeze())
    }
}

/// A read that has started: its data, or the fetches it waits for.
pub enum Started {
    Ready(Bytes),
    Pending(PendingRead),
}

pub struct PendingRead {
    path: Arc<ReadPath>,
    reader: Arc<FileReader>,
    len: usize,
    parts: Parts,
}

impl PendingRead {
    /// Waits for the fetches and joins the parts; a read inside one extent
    /// is a slice of it, not a copy.
    pub async fn finish(self) -> Result<Bytes, FsError> {
        let PendingRead {
            path,
            reader,
            len,
            parts,
        } = self;
        let data = path.resolve_all(&reader, parts, len, 0).await?;
        Ok(path.served(&reader, data))
    }
}

/// A reader's access pattern and the token of its current run: a seek
/// cancels the run's read-ahead that has not yet been charged.
struct ReadAhead {
    pattern: Pattern,
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
    extents: Extents,
    config: ReadConfig,
    /// Bytes per read-ahead request: the provider's preference, capped.
    max_request: u64,
    /// The provider's fetch unit (an EBS block), at least [`PAGE`]: fetches
    /// start and end on it where they can, since a fetch of part of a unit
    /// costs the link the whole of it.
    granule: u64,
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
        let max_request = match provider.preferred_request_size() {
            0 => DEFAULT_REQUEST,
            preferred => preferred,
        }
        .min(config.max_request);
        let granule = match provider.fetch_granule() {
            unit if unit > PAGE && unit.is_multiple_of(PAGE) => unit,
            _ => PAGE,
        };
        Arc::new(ReadPath {
            granule,
            provider,
            throttle,
            priorities: RwLock::new(Priorities::default()),
            extents: Extents::new(config.memory),
            max_request,
            config,
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

    /// Memory reserved for fetched data now (pending and ready extents).
    pub fn cache_bytes(&self) -> u64 {
        self.extents.bytes()
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
                pattern: Pattern::default(),
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
            drop(readers);
            self.extents.lock().orphan(reader.key);
        }
    }

    fn max_window(&self) -> u64 {
        let readers = self.open_files.load(Ordering::Relaxed).max(1) as u64;
        let by_memory = self.config.memory / (2 * readers);
        // Half a second of each reader's share of the rate: enough to keep
        // fetches overlapping, little enough that bytes fetched ahead do not
        // sit in memory while the reader waits for tokens.
        let by_rate = match self.throttle.planning_rate() {
            u64::MAX => u64::MAX,
            rate => (rate / 2 / readers).max(2 << 20),
        };
        self.config.max_window.min(by_memory).min(by_rate).max(PAGE)
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

    /// Starts a read without waiting: when every part is in hand the data
    /// is ready at once (the caller answers the kernel on its own thread,
    /// saving a task hand-off), otherwise the fetches are under way and
    /// [`PendingRead::finish`] waits for them. Needs a tokio context.
    pub fn start(self: &Arc<Self>, reader: &Arc<FileReader>, offset: u64, size: u32) -> Started {
        if offset >= reader.size || size == 0 {
            return Started::Ready(Bytes::new());
        }
        let end = (offset + u64::from(size)).min(reader.size);
        let max_window = self.max_window();
        let (plan, run) = {
            let mut state = reader
                .read_ahead
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let plan = state.pattern.on_read(
                offset,
                end - offset,
                max_window,
                self.max_request,
                reader.size,
            );
            if plan.seeked {
                // The read-ahead of the run left behind is stale.
                state.run.cancel();
                state.run = reader.cancel.child_token();
            }
            let run = (!plan.ahead.is_empty()).then(|| state.run.clone());
            (plan, run)
        };

        let mut parts = Parts::default();
        let issued = {
            let mut map = self.extents.lock();
            // The read's own parts first: they go to the throttle queue
            // before read-ahead does.
            self.plan_parts(&mut map, reader, offset, end, plan.unit, &mut parts);
            // Drop-behind, unless another open file reads the same disk
            // and may still want what this one has read.
            if !plan.behind.is_empty() && reader.readers_of_version.load(Ordering::Relaxed) == 1 {
                map.drop_behind(reader.key, plan.behind.start, plan.behind.end);
            }
            run.map(|run| self.read_ahead(&mut map, reader, plan.ahead.clone(), plan.piece, &run))
        };
        if let Some(until) = issued.filter(|&until| until < plan.ahead.end) {
            reader
                .read_ahead
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pattern
                .issued_only(until);
        }

        let len = (end - offset) as usize;
        match parts.ready(len) {
            Some(data) => Started::Ready(self.served(reader, data)),
            None => Started::Pending(PendingRead {
                path: Arc::clone(self),
                reader: Arc::clone(reader),
                len,
                parts,
            }),
        }
    }

    /// Counts bytes handed to a reader.
    fn served(&self, reader: &FileReader, data: Bytes) -> Bytes {
        self.stats
            .bytes_served
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        reader
            .served
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        data
    }

    /// The parts of `[offset, end)`: what the extents cover, and for each
    /// gap, zeros where it is hole and a fetch of its data rounded out to
    /// `unit` (within the room the neighbouring extents leave).
    fn plan_parts(
        self: &Arc<Self>,
        map: &mut Inner,
        reader: &Arc<FileReader>,
        offset: u64,
        end: u64,
        unit: u64,
        parts: &mut Parts,
    ) {
        map.cover(reader.key, offset, end, true, |cover| parts.push(cover));
        let hits = parts
            .iter()
            .filter(|part| !matches!(part, Part::Gap { .. }))
            .count();
        self.stats
            .cache_hits
            .fetch_add(hits as u64, Ordering::Relaxed);
        if !parts.has_gaps() {
            return;
        }
        let planned = std::mem::take(parts);
        for part in planned.into_list() {
            match part {
                Part::Gap { from, to } => self.fill_gap(map, reader, from, to, unit, parts),
                part => parts.push(part),
            }
        }
    }

    fn fill_gap(
        self: &Arc<Self>,
        map: &mut Inner,
        reader: &Arc<FileReader>,
        from: u64,
        to: u64,
        unit: u64,
        parts: &mut Parts,
    ) {
        let unit = unit.max(self.granule);
        let widest = from / unit * unit..to.div_ceil(unit).saturating_mul(unit).min(reader.size);
        let room = map.room(reader.key, from, to, widest);
        let mut at = from;
        let mut cursor = room.start;
        while let Some(run) = reader.data.next_run(cursor, room.end, MERGE_HOLES) {
            cursor = run.end;
            if run.end <= from {
                // Data only in the rounding before the read: not wanted.
                continue;
            }
            if run.start >= to {
                break;
            }
            if run.start > at {
                self.stats.hole_blocks.fetch_add(1, Ordering::Relaxed);
                parts.push(Part::Ready(zeros((run.start - at) as usize)));
            }
            // The run, rounding included: aligned requests, and the
            // neighbours that reads near each other come back for.
            let fetch_end = run.end;
            self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
            map.make_room(fetch_end - run.start, true);
            let fetch = self.start_fetch(map, reader, run.start, fetch_end, None);
            let part_end = fetch_end.min(to);
            parts.push(Part::Pending {
                fetch,
                extent_start: run.start,
                from: at.max(run.start),
                to: part_end,
            });
            at = part_end;
            if at >= to {
                break;
            }
        }
        if at < to {
            self.stats.hole_blocks.fetch_add(1, Ordering::Relaxed);
            parts.push(Part::Ready(zeros((to - at) as usize)));
        }
    }

    /// Read-ahead of `ahead` in requests of at most `piece`: the parts no
    /// extent covers and that hold data are fetched, as far as memory can
    /// be reserved without evicting unread read-ahead and while fewer than
    /// [`MAX_AHEAD_REQUESTS`] are in flight. Returns how far it was issued.
    fn read_ahead(
        self: &Arc<Self>,
        map: &mut Inner,
        reader: &Arc<FileReader>,
        ahead: Range<u64>,
        piece: u64,
        run: &CancellationToken,
    ) -> u64 {
        // On the provider's units, when it has any: the unit the reader is
        // in, whole.
        let g = self.granule;
        let ahead = match g > PAGE {
            true => ahead.start / g * g..ahead.end.div_ceil(g).saturating_mul(g).min(reader.size),
            false => ahead,
        };
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        map.cover(reader.key, ahead.start, ahead.end, false, |cover| {
            if let Cover::Gap { from, to } = cover {
                gaps.push((from, to));
            }
        });
        for (from, to) in gaps {
            let mut cursor = from;
            while let Some(data) = reader.data.next_run(cursor, to, MERGE_HOLES) {
                cursor = data.end;
                let mut start = data.start;
                while start < data.end {
                    let planned = piece_end(start, piece, data.end, self.granule);
                    map.make_room(planned - start, false);
                    let free = map.free();
                    // What memory allows, and no more for now.
                    let end = match free >= planned - start {
                        true => planned,
                        false => start + free / self.granule * self.granule,
                    };
                    let slots_full =
                        self.stats.ahead_in_flight.load(Ordering::Relaxed) >= MAX_AHEAD_REQUESTS;
                    if end == start || slots_full {
                        return start;
                    }
                    self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
                    drop(self.start_fetch(map, reader, start, end, Some(run)));
                    if end < planned {
                        return end;
                    }
                    start = end;
                }
            }
        }
        ahead.end
    }

    /// Waits for every part and joins them.
    fn resolve_all<'a>(
        self: &'a Arc<Self>,
        reader: &'a Arc<FileReader>,
        parts: Parts,
        len: usize,
        rejoins: u32,
    ) -> BoxFuture<'a, Result<Bytes, FsError>> {
        async move {
            if parts.rest.is_empty() {
                let Some(part) = parts.first else {
                    return Ok(Bytes::new());
                };
                return self.resolve(reader, part, rejoins).await;
            }
            let mut out = BytesMut::with_capacity(len);
            for part in parts.into_list() {
                out.extend_from_slice(&self.resolve(reader, part, rejoins).await?);
            }
            Ok(out.freeze())
        }
        .boxed()
    }

    /// Waits for one part, fetching it again if the fetch it joined belonged
    /// to another file that was closed meanwhile.
    async fn resolve(
        self: &Arc<Self>,
        reader: &Arc<FileReader>,
        part: Part,
        rejoins: u32,
    ) -> Result<Bytes, FsError> {
        let (fetch, extent_start, from, to) = match part {
            Part::Ready(bytes) => return Ok(bytes),
            Part::Pending {
                fetch,
                extent_start,
                from,
                to,
            } => (fetch, extent_start, from, to),
            Part::Gap { from, to } => {
                // Gaps are filled before a read starts; one left is a bug,
                // and fails this read only.
                tracing::error!(path = %reader.path, from, to, "a read's gap was never planned");
                return Err(FsError::Provider {
                    path: reader.path.clone(),
                    source: Arc::new(ProviderError::Internal(
                        "a read's gap was never planned".into(),
                    )),
                });
            }
        };
        match fetch.await {
            Ok(extent) => {
                let range = (from - extent_start) as usize..(to - extent_start) as usize;
                match extent.get(range.clone()) {
                    Some(_) => Ok(extent.slice(range)),
                    None => Err(FsError::Provider {
                        path: reader.path.clone(),
                        source: Arc::new(ProviderError::Internal(format!(
                            "an extent at {extent_start} holds {} bytes, the read wants {range:?}",
                            extent.len()
                        ))),
                    }),
                }
            }
            // Each round joins a fetch that another file started and then
            // closed; a few rounds are plenty, endless ones would be a bug.
            Err(FetchError::Cancelled) if !reader.cancel.is_cancelled() => {
                if rejoins >= MAX_REJOINS {
                    tracing::error!(path = %reader.path, from, to, "a read's fetch was cancelled {MAX_REJOINS} times in a row");
                    return Err(FsError::Cancelled);
                }
                let mut parts = Parts::default();
                {
                    let mut map = self.extents.lock();
                    self.plan_parts(&mut map, reader, from, to, PAGE, &mut parts);
                }
                self.resolve_all(reader, parts, (to - from) as usize, rejoins + 1)
                    .await
            }
            Err(FetchError::Cancelled) => Err(FsError::Cancelled),
            Err(FetchError::Failed(source)) => Err(FsError::Provider {
                path: reader.path.clone(),
                source,
            }),
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

/// Where a read-ahead request from `start` ends: `piece` on, at a 1 MiB
/// boundary when the piece is that large (so that 1 MiB reads fall inside
/// one extent and are served as slices), on the provider's `granule` in
/// any case (the next request then starts on one), and never past `limit`.
fn piece_end(start: u64, piece: u64, limit: u64, granule: u64) -> u64 {
    const ALIGN: u64 = 1 << 20;
    let piece = piece.max(granule);
    let align = match piece >= ALIGN {
        true if ALIGN.is_multiple_of(granule) => ALIGN,
        _ => granule,
    };
    let mut end = start + piece;
    if align > PAGE && end / align * align > start {
        end = end / align * align;
    }
    end.min(limit)
}

/// Rounds a read re-joins a part whose fetch was cancelled under it.
const MAX_REJOINS: u32 = 16;

/// Counts a fetch out of the in-flight gauge however it ends.
struct InFlight<'a>(&'a AtomicU64);

/// Counts a read-ahead fetch out of [`Stats::ahead_in_flight`] when its
/// task ends or is dropped, polled or not.
struct AheadSlot(Arc<ReadPath>);

impl AheadSlot {
    fn take(path: &Arc<ReadPath>) -> Self {
        path.stats.ahead_in_flight.fetch_add(1, Ordering::Relaxed);
        AheadSlot(Arc::clone(path))
    }
}

impl Drop for AheadSlot {
    fn drop(&mut self) {
        self.0.stats.ahead_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
