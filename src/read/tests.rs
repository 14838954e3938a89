//! The read path against a mock provider that models the world: latency,
//! faults, and a record of every request it served.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::provider::{DiskEntry, Inventory, Pinned, Provider, ProviderError, Version};
use crate::throttle::Limit;

const MIB: u64 = 1 << 20;

/// Bytes are a function of the offset, so any answer can be checked.
fn byte_at(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 13)) as u8
}

struct MockProvider {
    latency: Duration,
    requests: Mutex<Vec<(u64, usize)>>,
    /// The next this many reads fail with a transient error.
    transient_failures: AtomicU32,
    /// Every read fails with a permanent error.
    broken: std::sync::atomic::AtomicBool,
    /// The next this many reads panic (a bug in a provider).
    panics: AtomicU32,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// The unit it fetches in (0: none), like EBS's 512 KiB blocks.
    granule: AtomicU64,
}

impl MockProvider {
    fn new(latency: Duration) -> Arc<Self> {
        Arc::new(MockProvider {
            latency,
            requests: Mutex::new(Vec::new()),
            transient_failures: AtomicU32::new(0),
            broken: Default::default(),
            panics: AtomicU32::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            granule: AtomicU64::new(0),
        })
    }

    fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

#[async_trait]
impl Provider for MockProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        Ok(Inventory::default())
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        Ok(Pinned::new(disk.size, disk.version.clone()))
    }

    /// Like an object store.
    fn preferred_request_size(&self) -> u64 {
        16 * MIB
    }

    fn fetch_granule(&self) -> u64 {
        self.granule.load(Ordering::Relaxed)
    }

    async fn read(
        &self,
        _disk: &DiskEntry,
        _pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        self.requests.lock().unwrap().push((offset, len));
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("mock: a provider bug");
        }
        if self.broken.load(Ordering::SeqCst) {
            return Err(ProviderError::Protocol("mock: always fails".into()));
        }
        if self
            .transient_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(ProviderError::Unreachable("mock: connection reset".into()));
        }
        Ok((offset..offset + len as u64).map(byte_at).collect())
    }
}

fn disk(size: u64) -> Arc<DiskEntry> {
    Arc::new(DiskEntry {
        path: vec!["vm".into(), "disk".into()],
        size,
        mtime: SystemTime::UNIX_EPOCH,
        version: Version::ETag("\"v1\"".into()),
        locator: "mock".into(),
        allocated: None,
    })
}

fn read_path(provider: Arc<MockProvider>, memory: u64) -> Arc<ReadPath> {
    ReadPath::new(
        provider,
        Throttle::new(None),
        ReadConfig {
            memory,
            retry: RetryPolicy {
                base_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(5),
                ..RetryPolicy::default()
            },
            ..ReadConfig::default()
        },
    )
}

fn open(path: &Arc<ReadPath>, size: u64) -> Arc<FileReader> {
    path.open(
        7,
        disk(size),
        Pinned::new(size, Version::ETag("\"v1\"".into())),
        "/vm/disk".into(),
        None,
        Opener::default(),
    )
}

fn expected(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(byte_at).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_on_one_range_share_one_fetch() {
    let provider = MockProvider::new(Duration::from_millis(50));
    let path = read_path(provider.clone(), 64 * MIB);
    let readers: Vec<_> = (0..8).map(|_| open(&path, 10 * MIB)).collect();
    let reads: Vec<_> = readers
        .iter()
        .enumerate()
        .map(|(i, reader)| {
            let (path, reader) = (path.clone(), reader.clone());
            tokio::spawn(async move { path.read(&reader, 5 * MIB + i as u64 * 300, 1000).await })
        })
        .collect();
    for (i, read) in reads.into_iter().enumerate() {
        let data = read.await.unwrap().unwrap();
        assert_eq!(&data[..], &expected(5 * MIB + i as u64 * 300, 1000)[..]);
    }
    let requests = provider.requests.lock().unwrap().clone();
    assert_eq!(
        requests
            .iter()
            .filter(|(offset, _)| *offset == 5 * MIB)
            .count(),
        1,
        "one fetch of the page at 5 MiB, not one per reader: {requests:?}"
    );
    assert_eq!(requests.len(), 1, "{requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_overlap_fetches_and_return_the_right_bytes() {
    let provider = MockProvider::new(Duration::from_millis(20));
    let path = read_path(provider.clone(), 64 * MIB);
    let size = 40 * MIB + 12345;
    let reader = open(&path, size);
    let mut offset = 0;
    let started = std::time::Instant::now();
    while offset < size {
        let data = path.read(&reader, offset, 128 << 10).await.unwrap();
        assert!(
            data == expected(offset, data.len() as u64),
            "bytes at {offset}"
        );
        offset += data.len() as u64;
    }
    let elapsed = started.elapsed();
    // 41 blocks one after another would take 41 × 20 ms.
    assert!(
        provider.max_in_flight.load(Ordering::SeqCst) >= 2,
        "read-ahead overlapped only {} fetches",
        provider.max_in_flight.load(Ordering::SeqCst)
    );
    assert!(
        elapsed < Duration::from_millis(41 * 20 / 2),
        "took {elapsed:?}"
    );
    // Every byte fetched once, read-ahead in multi-block requests.
    let mut requests = provider.requests.lock().unwrap().clone();
    requests.sort();
    let mut next = 0;
    for (offset, len) in &requests {
        assert_eq!(*offset, next, "gap or overlap: {requests:?}");
        next += *len as u64;
    }
    assert_eq!(next, size);
    // 320 reads; the window grows with the run, so requests grow too.
    assert!(
        requests.len() <= 40 && requests.iter().any(|(_, len)| *len as u64 >= 8 * MIB),
        "read-ahead not coalesced: {requests:?}"
    );
}

/// A provider that fetches whole blocks (EBS) is asked for whole blocks:
/// a fetch of part of one would cost the link the whole block, and a
/// neighbouring fetch would fetch it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_start_and_end_on_the_providers_blocks() {
    const BLOCK: u64 = 512 << 10;
    let provider = MockProvider::new(Duration::from_millis(2));
    provider.granule.store(BLOCK, Ordering::Relaxed);
    let path = read_path(provider.clone(), 64 * MIB);
    let size = 24 * MIB;
    let reader = open(&path, size);
    // Sequential reads of the kernel's 128 KiB, from the first byte.
    let mut offset = 0;
    while offset < 12 * MIB {
        let data = path.read(&reader, offset, 128 << 10).await.unwrap();
        assert!(
            data == expected(offset, data.len() as u64),
            "bytes at {offset}"
        );
        offset += data.len() as u64;
    }
    // Then small reads here and there.
    for offset in [13 * MIB + 5000, 20 * MIB + 3, 17 * MIB - 100] {
        let data = path.read(&reader, offset, 4096).await.unwrap();
        assert!(data == expected(offset, 4096), "bytes at {offset}");
    }
    let mut requests = provider.requests.lock().unwrap().clone();
    requests.sort();
    for (offset, len) in &requests {
        let end = offset + *len as u64;
        assert!(
            offset.is_multiple_of(BLOCK) && (end.is_multiple_of(BLOCK) || end == size),
            "a fetch of part of a block: {offset}+{len} in {requests:?}"
        );
    }
    for pair in requests.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 as u64 <= pair[1].0,
            "a block fetched twice: {requests:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_fetch_only_what_they_ask_for() {
    let provider = MockProvider::new(Duration::from_millis(1));
    let path = read_path(provider.clone(), 64 * MIB);
    let reader = open(&path, 100 * MIB);
    let mut state = 12345u64;
    for _ in 0..20 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (state >> 20) % (100 * MIB - 10_000);
        let data = path.read(&reader, offset, 10_000).await.unwrap();
        assert!(data == expected(offset, 10_000));
    }
    // Each read fetches its own pages (at most 4 of 4 KiB); none ahead.
    assert!(
        provider.request_count() <= 20,
        "{} fetches",
        provider.request_count()
    );
    let fetched = path.stats.bytes_fetched.load(Ordering::Relaxed);
    assert!(
        fetched <= 20 * 16384,
        "{fetched} bytes fetched for 200,000 read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_file_stops_its_fetches() {
    let provider = MockProvider::new(Duration::from_millis(30));
    // Throttled to 4 MiB/s: read-ahead queues behind the token bucket.
    let path = ReadPath::new(
        provider.clone(),
        Throttle::new(Some(Limit {
            rate: 4 * MIB,
            burst: MIB,
        })),
        ReadConfig {
            ..ReadConfig::default()
        },
    );
    let reader = open(&path, 64 * MIB);
    for i in 0..3 {
        path.read(&reader, i * MIB, MIB as u32).await.unwrap();
    }
    path.release(&reader);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let settled = provider.request_count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        provider.request_count(),
        settled,
        "fetches went on after close"
    );
    assert!(settled < 64, "the whole disk was fetched");
    assert!(
        path.read(&reader, 10 * MIB, 10).await.is_err(),
        "a closed file reads nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_seek_does_not_wait_behind_stale_read_ahead() {
    let provider = MockProvider::new(Duration::from_millis(5));
    let block = 256 << 10;
    // 4 MiB/s: the read-ahead of a sequential reader (a 2 MiB window) is
    // half a second of the link; one block is 62 ms.
    let path = ReadPath::new(
        provider.clone(),
        Throttle::new(Some(Limit {
            rate: 4 * MIB,
            burst: 64 << 10,
        })),
        ReadConfig {
            memory: 64 * MIB,
            ..ReadConfig::default()
        },
    );
    let reader = open(&path, 256 * MIB);
    for i in 0..8 {
        let data = path.read(&reader, i * block, block as u32).await.unwrap();
        assert_eq!(data, expected(i * block, block));
    }
    let before = provider.request_count();
    let started = std::time::Instant::now();
    let far = 200 * MIB;
    let data = path.read(&reader, far, 4096).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(data, expected(far, 4096));
    assert!(
        waited < Duration::from_millis(300),
        "the read after the seek waited {waited:?} behind read-ahead"
    );
    // The stale run's read-ahead that had not been charged is dropped: in
    // the next second, far fewer than its blocks are fetched.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old_run = provider
        .requests
        .lock()
        .unwrap()
        .iter()
        .skip(before)
        .filter(|(offset, _)| *offset < far)
        .map(|(_, len)| *len as u64)
        .sum::<u64>();
    assert!(
        old_run <= MIB,
        "{old_run} bytes of stale read-ahead fetched after the seek"
    );
    path.release(&reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_and_permanent_ones_fail_the_read() {
    let provider = MockProvider::new(Duration::from_millis(1));
    let path = read_path(provider.clone(), 64 * MIB);
    let reader = open(&path, 4 * MIB);
    provider.transient_failures.store(3, Ordering::SeqCst);
    let data = path.read(&reader, 100, 1000).await.unwrap();
    assert!(data == expected(100, 1000));
    assert!(path.stats.retries.load(Ordering::Relaxed) >= 3);

    provider.broken.store(true, Ordering::SeqCst);
    let err = path.read(&reader, 3 * MIB, 10).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().contains("/vm/disk"), "{err}");
    provider.broken.store(false, Ordering::SeqCst);
    assert!(
        path.read(&reader, 3 * MIB, 10).await.is_ok(),
        "a later read works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_never_holds_more_than_its_share_of_memory() {
    let provider = MockProvider::new(Duration::from_millis(1));
    let memory = 16 * MIB;
    let path = read_path(provider.clone(), memory);
    // Two readers of one disk: no drop-behind, so blocks stay cached.
    let readers = [open(&path, 200 * MIB), open(&path, 200 * MIB)];
    for offset in (0..200 * MIB).step_by(MIB as usize) {
        for reader in &readers {
            path.read(reader, offset, MIB as u32).await.unwrap();
        }
        assert!(
            path.extents.bytes() <= memory,
            "extents hold {} bytes",
            path.extents.bytes()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_sequential_reader_frees_what_it_has_read() {
    let provider = MockProvider::new(Duration::from_millis(1));
    let path = read_path(provider.clone(), 64 * MIB);
    let reader = open(&path, 30 * MIB);
    for offset in (0..30 * MIB).step_by(256 << 10) {
        path.read(&reader, offset, 256 << 10).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Freed: all but the reorder slack behind the last read, and the
    // extent the last read is in.
    let held = path.extents.bytes();
    let largest = provider
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|(_, len)| *len as u64)
        .max()
        .unwrap();
    assert!(
        held <= pattern::REORDER + largest,
        "{held} bytes held behind the reader (requests up to {largest})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_read_as_zeros_without_fetching_and_seek_finds_them() {
    let provider = MockProvider::new(Duration::from_millis(1));
    let path = read_path(provider.clone(), 64 * MIB);
    let size = 10 * MIB;
    // Data in [1 MiB, 2.5 MiB) and [2.5 MiB, 3 MiB) (touching) and [8 MiB, 10 MiB).
    let data = vec![MIB..5 * MIB / 2, 5 * MIB / 2..3 * MIB, 8 * MIB..size];
    let reader = path.open(
        7,
        disk(size),
        Pinned::new(size, Version::ETag("\"v1\"".into())),
        "/vm/disk".into(),
        Some(data),
        Opener::default(),
    );
    let hole = path.read(&reader, 4 * MIB, MIB as u32).await.unwrap();
    assert!(hole.iter().all(|&b| b == 0) && hole.len() == MIB as usize);
    assert!(
        provider
            .requests
            .lock()
            .unwrap()
            .iter()
            .all(|(offset, _)| *offset != 4 * MIB),
        "a hole was fetched"
    );
    let data_block = path.read(&reader, MIB, 100).await.unwrap();
    assert_eq!(&data_block[..], &expected(MIB, 100)[..]);
    // A small read fetches its page, not more; one in a hole nothing.
    let start = path.read(&reader, 0, 100).await.unwrap();
    assert!(start.iter().all(|&b| b == 0));
    // Across the end of a hole: zeros, then the data's first page.
    let across = path.read(&reader, MIB - 50, 100).await.unwrap();
    assert!(across[..50].iter().all(|&b| b == 0));
    assert_eq!(&across[50..], &expected(MIB, 50)[..]);
    let requests = provider.requests.lock().unwrap().clone();
    assert_eq!(requests, vec![(MIB, 4096)], "fetched beyond the data read");

    assert_eq!(reader.next_data(0), Some(MIB));
    assert_eq!(reader.next_data(2 * MIB), Some(2 * MIB));
    assert_eq!(reader.next_data(3 * MIB), Some(8 * MIB));
    assert_eq!(reader.next_data(size), None);
    assert_eq!(reader.next_hole(0), Some(0));
    assert_eq!(
        reader.next_hole(MIB),
        Some(3 * MIB),
        "touching ranges are one extent"
    );
    assert_eq!(
        reader.next_hole(9 * MIB),
        Some(size),
        "the end of the file is a hole"
    );
    assert_eq!(reader.next_hole(size), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_fetch_fails_its_reads_only_and_leaves_no_flight_behind() {
    // Slow enough that the second read joins the first one's fetch.
    let provider = MockProvider::new(Duration::from_millis(200));
    let path = read_path(provider.clone(), 64 * MIB);
    let reader = open(&path, 8 * MIB);
    // Every fetch panics for now, read-ahead ones included.
    provider.panics.store(u32::MAX, Ordering::SeqCst);
    // Two readers of the same block share the panicking fetch.
    let (a, b) = tokio::join!(path.read(&reader, 0, 4096), path.read(&reader, 100, 4096));
    for result in [a, b] {
        let err = result.unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err}");
    }
    provider.panics.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Not wedged: the entry is gone, the next read fetches anew and works,
    // within a bounded time.
    let again = tokio::time::timeout(Duration::from_secs(5), path.read(&reader, 0, 4096))
        .await
        .expect("the read after a panic does not hang")
        .unwrap();
    assert_eq!(&again[..], &expected(0, 4096)[..]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(path.extents.pending(), 0, "no pending extent left behind");
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_never_answers_fails_the_read_at_the_timeout() {
    let provider = MockProvider::new(Duration::from_secs(3600));
    let path = ReadPath::new(
        provider.clone(),
        Throttle::new(None),
        ReadConfig {
            memory: 64 * MIB,
            retry: RetryPolicy {
                timeout: Duration::from_secs(7),
                ..RetryPolicy::default()
            },
            ..ReadConfig::default()
        },
    );
    let reader = open(&path, 8 * MIB);
    let started = tokio::time::Instant::now();
    let err = path.read(&reader, 0, 4096).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().contains("timeout=7s"), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(7));
}

/// A provider that answers each read with the right bytes or one of the
/// faults of the world, in an order a property test chooses.
struct FaultyProvider {
    /// One answer kind per read, cycled: 0 right, 1 transient, 2 short
    /// body, 3 long body, 4 changed, 5 slow.
    script: Vec<u8>,
    next: AtomicU64,
}

#[async_trait]
impl Provider for FaultyProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        Ok(Inventory::default())
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        Ok(Pinned::new(disk.size, disk.version.clone()))
    }

    async fn read(
        &self,
        _disk: &DiskEntry,
        _pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let right = || {
            (offset..offset + len as u64)
                .map(byte_at)
                .collect::<Vec<u8>>()
        };
        match self.script[n % self.script.len()] {
            1 => Err(ProviderError::Unreachable("reset".into())),
            2 => {
                let mut body = right();
                body.truncate(len / 2);
                Ok(Bytes::from(body))
            }
            3 => {
                let mut body = right();
                body.extend_from_slice(b"trailing bytes of another range");
                Ok(Bytes::from(body))
            }
            4 => Err(ProviderError::Changed {
                pinned: "v1".into(),
            }),
            5 => {
                tokio::time::sleep(Duration::from_millis(3)).await;
                Ok(Bytes::from(right()))
            }
            _ => Ok(Bytes::from(right())),
        }
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Whatever the provider does, a read returns exactly the bytes at
        /// its offset, or an error: never other bytes.
        #[test]
        fn reads_return_the_providers_bytes_or_an_error(
            script in prop::collection::vec(0u8..6, 1..12),
            readers in prop::collection::vec(
                (any::<bool>(), prop::collection::vec((0u64..6 * MIB, 1u32..300_000), 1..12)),
                1..4,
            ),
        ) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let size = 6 * MIB + 12_345;
                let provider = Arc::new(FaultyProvider { script, next: AtomicU64::new(0) });
                let path = ReadPath::new(
                    provider,
                    Throttle::new(None),
                    ReadConfig {
                        memory: 8 * MIB,
                        retry: RetryPolicy {
                            max_retries: 2,
                            base_backoff: Duration::from_micros(100),
                            max_backoff: Duration::from_millis(1),
                            timeout: Duration::from_secs(5),
                        },
                        ..ReadConfig::default()
                    },
                );
                let tasks: Vec<_> = readers
                    .into_iter()
                    .map(|(sequential, reads)| {
                        let path = Arc::clone(&path);
                        tokio::spawn(async move {
                            let reader = open(&path, size);
                            let mut at = 0u64;
                            for (offset, len) in reads {
                                // Sequential readers go on from where they were.
                                let offset = if sequential { at } else { offset };
                                if let Ok(data) = path.read(&reader, offset, len).await {
                                    let end = (offset + u64::from(len)).min(size);
                                    let want = if offset < size { expected(offset, end - offset) } else { Vec::new() };
                                    assert!(data == want, "other bytes at {offset}+{len}");
                                }
                                at = offset + u64::from(len);
                            }
                            path.release(&reader);
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            });
        }
    }
}
