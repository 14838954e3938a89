//! The soak: minutes of mixed sequential and random readers through a
//! proxy that injects every kind of transient fault, every byte checked
//! against the source, the mount's peak memory against `cache=`.
//!
//! Long by design, so it belongs to the benchmark (`scripts/bench.sh`
//! runs it with `--ignored`); `SOAK_SECS` sets its length (default 180).

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faults::{Fault, FaultProxy, Plan};
use common::*;

#[test]
#[ignore = "minutes long: run by scripts/bench.sh"]
fn soak_mixed_readers_through_faults() {
    let seconds: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let size = 256 * MIB;
    let cache = 64 * MIB;
    let (www, nginx) = serve_one_disk(size, 21);
    let source = Arc::new(std::fs::read(www.path().join("disk.raw")).unwrap());
    let proxy = FaultProxy::start(nginx.port);
    // Every 9th request meets a fault; stalls are cut at 2 s.
    proxy.set(Plan::Every {
        every: 9,
        faults: vec![
            Fault::Drop,
            Fault::Status(503),
            Fault::Status(500),
            Fault::CutBody,
            Fault::Stall,
        ],
    });
    let mount = Mount::new(
        &format!("{}/manifest.json", proxy.url()),
        &format!("cache={cache},stall_timeout=2"),
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let verified = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..4u64 {
        let file = mount.file("vm/disk.raw");
        let source = Arc::clone(&source);
        let verified = Arc::clone(&verified);
        let reads = Arc::clone(&reads);
        workers.push(std::thread::spawn(move || {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (worker + 1);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut buf = vec![0u8; 1 << 20];
            while Instant::now() < deadline {
                let mut disk = std::fs::File::open(&file).unwrap();
                if worker < 2 {
                    // Sequential: a whole pass from a random start.
                    let mut at = next() % size;
                    disk.seek(SeekFrom::Start(at)).unwrap();
                    while at < size && Instant::now() < deadline {
                        let n = disk
                            .read(&mut buf)
                            .unwrap_or_else(|err| panic!("read at {at}: {err}"));
                        if n == 0 {
                            break;
                        }
                        assert!(
                            buf[..n] == source[at as usize..at as usize + n],
                            "bytes differ at {at}"
                        );
                        verified.fetch_add(n as u64, Ordering::Relaxed);
                        reads.fetch_add(1, Ordering::Relaxed);
                        at += n as u64;
                    }
                } else {
                    // Random: reads of 4 KiB to 1 MiB anywhere.
                    for _ in 0..200 {
                        let len = (4096 + next() % ((1 << 20) - 4096)) as usize;
                        let at = next() % (size - len as u64);
                        disk.read_exact_at(&mut buf[..len], at)
                            .unwrap_or_else(|err| panic!("read {len} at {at}: {err}"));
                        assert!(
                            buf[..len] == source[at as usize..at as usize + len],
                            "bytes differ at {at}+{len}"
                        );
                        verified.fetch_add(len as u64, Ordering::Relaxed);
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for worker in workers {
        worker.join().expect("a reader failed");
    }
    let peak = mount.peak_rss();
    let faults = proxy.faults_injected.load(Ordering::SeqCst);
    println!(
        "SOAK secs={seconds} verified_bytes={} reads={} faults={faults} peak_rss={peak} cache={cache}",
        verified.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed),
    );
    assert!(faults > 10, "only {faults} faults injected");
    assert!(
        peak < cache + 64 * MIB,
        "peak RSS {peak} above cache {cache} + 64 MiB"
    );
}
