//! The mount's one token bucket, measured through real mounts.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;

fn assert_within(achieved: f64, target: f64, tolerance: f64, what: &str) {
    common::progress::assert_near(what, achieved, target, tolerance);
}

#[test]
fn a_copy_lands_within_5_percent_of_the_rate() {
    let rate = 20.0 * MIB as f64;
    let mount = Mount::new("demo://", "rate=20M");
    let (bytes, seconds) = timed_read(&mount.file("web-01/web-01-disk0.vmdk"));
    assert_eq!(bytes, 96 * MIB);
    assert_within(bytes as f64 / seconds, rate, 0.05, "demo rate=20M");
}

#[test]
fn a_copy_over_http_lands_within_5_percent_of_the_rate() {
    let (_www, nginx) = serve_one_disk(100 * MIB, 3);
    let mount = Mount::new(&nginx.url("manifest.json"), "rate=25M");
    let (bytes, seconds) = timed_read(&mount.file("vm/disk.raw"));
    assert_eq!(bytes, 100 * MIB);
    assert_within(
        bytes as f64 / seconds,
        25.0 * MIB as f64,
        0.05,
        "http rate=25M",
    );
}

#[test]
fn four_concurrent_readers_share_the_rate_fairly() {
    let rate = 40 * MIB;
    // Fully written disks: demo disks have holes, which cost no tokens.
    let src = tempfile::tempdir().unwrap();
    let disks = ["a.raw", "b.raw", "c.raw", "d.raw"];
    for (i, disk) in disks.iter().enumerate() {
        write_random_file(&src.path().join(disk), 120 * MIB, i as u64 + 20);
    }
    let mount = Mount::new(&format!("dir://{}", src.path().display()), "rate=40M");
    let run_for = Duration::from_secs(6);
    let barrier = Arc::new(Barrier::new(disks.len()));
    let readers: Vec<_> = disks
        .iter()
        .map(|disk| {
            let path = mount.file(disk);
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut file = std::fs::File::open(path).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                barrier.wait();
                let started = Instant::now();
                let mut total = 0u64;
                while started.elapsed() < run_for {
                    total += file.read(&mut buf).unwrap() as u64;
                }
                total as f64 / started.elapsed().as_secs_f64()
            })
        })
        .collect();
    let rates: Vec<f64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let total: f64 = rates.iter().sum();
    assert_within(total, rate as f64, 0.08, "4 readers together");
    for (disk, reader_rate) in disks.iter().zip(&rates) {
        assert_within(
            *reader_rate,
            rate as f64 / 4.0,
            0.2,
            &format!("share of {disk}"),
        );
    }
}

#[test]
fn rate_off_puts_no_limiter_in_the_path() {
    // Best of two reads each, alternating, so one noisy moment on a shared
    // machine does not decide the comparison.
    let mut best = [0f64; 2];
    for _ in 0..2 {
        for (i, options) in ["", "rate=off"].into_iter().enumerate() {
            let mount = Mount::new("demo://", options);
            if options == "rate=off" {
                assert!(
                    mount.log_text().contains("rate unlimited"),
                    "{}",
                    mount.log_text()
                );
            }
            let (bytes, seconds) = timed_read(&mount.file("web-01/web-01-disk1.vmdk"));
            assert_eq!(bytes, 1 << 30);
            best[i] = best[i].max(bytes as f64 / seconds);
        }
    }
    let [plain_rate, off_rate] = best;
    eprintln!("measured: no option {plain_rate:.0} B/s, rate=off {off_rate:.0} B/s");
    assert!(
        off_rate >= 0.8 * plain_rate,
        "rate=off {off_rate:.0} B/s vs no option {plain_rate:.0} B/s"
    );
}

#[test]
fn memory_stays_bounded_with_8_readers_of_large_disks() {
    let cache = 64 * MIB;
    let mount = Mount::new("demo://", "cache=64M");
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let disk = ["db-01/db-01-disk0.vmdk", "db-01/db-01-data.vhdx"][i % 2];
            let path = mount.file(disk);
            std::thread::spawn(move || {
                use std::io::{Read, Seek, SeekFrom};
                let mut file = std::fs::File::open(path).unwrap();
                // Readers spread over the disk so they share no blocks.
                file.seek(SeekFrom::Start(i as u64 * 512 * MIB)).unwrap();
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while total < 384 * MIB {
                    let n = file.read(&mut buf).unwrap();
                    assert!(n > 0);
                    total += n as u64;
                }
            })
        })
        .collect();
    // The memory reserved for fetched data, sampled while they read: it
    // never exceeds cache= (demand reads may exceed it only while
    // everything else is in flight, which 8 readers do not reach).
    let mut reserved_peak = 0;
    while readers.iter().any(|reader| !reader.is_finished()) {
        let output = std::process::Command::new(bin())
            .args(["status", mount.path.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        reserved_peak = reserved_peak.max(status["totals"]["cache_bytes"].as_u64().unwrap());
    }
    for reader in readers {
        reader.join().unwrap();
    }
    assert!(
        reserved_peak > 0 && reserved_peak <= cache,
        "reserved {reserved_peak} bytes with cache={cache}"
    );
    let peak = mount.peak_rss();
    // The allocator keeps some freed buffers: measured 107-125 MiB here.
    let overhead = 64 * MIB;
    eprintln!(
        "measured: peak RSS with 8 readers and cache=64M: {} MiB",
        peak / MIB
    );
    assert!(
        peak <= cache + overhead,
        "peak RSS {} MiB > cache {} MiB + {} MiB",
        peak / MIB,
        cache / MIB,
        overhead / MIB
    );
}
