//! Sparse disks: holes are served as zeros with no fetch and no tokens, the
//! allocated size shows in st_blocks, and lseek(SEEK_DATA/SEEK_HOLE) finds
//! the data, so `cp --sparse` and `qemu-img convert` skip the holes.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Instant;

use common::*;

const GIB: u64 = 1 << 30;

fn seek(path: &Path, offset: u64, whence: i32) -> Option<u64> {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: lseek on a descriptor we own.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    (at >= 0).then_some(at as u64)
}

#[test]
fn a_sparse_dir_disk_copies_fast_under_a_limit_and_stays_sparse() {
    require_tool("qemu-img");
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("vm")).unwrap();
    let disk = src.path().join("vm/sparse.raw");
    let file = std::fs::File::create(&disk).unwrap();
    file.set_len(GIB).unwrap();
    let (first, second) = (
        random_bytes(2 * MIB as usize, 1),
        random_bytes(3 * MIB as usize, 2),
    );
    file.write_all_at(&first, 0).unwrap();
    file.write_all_at(&second, 900 * MIB).unwrap();
    drop(file);

    // 1 GiB at 20 MiB/s would take 51 s; only the 5 MiB of data may cost
    // time or tokens.
    let mount = Mount::new(&format!("dir://{}", src.path().display()), "rate=20M");
    let mounted = mount.file("vm/sparse.raw");
    let meta = std::fs::metadata(&mounted).unwrap();
    assert_eq!(meta.len(), GIB);
    assert!(
        meta.blocks() * 512 <= 8 * MIB,
        "st_blocks reports the allocation: {}",
        meta.blocks()
    );

    assert_eq!(seek(&mounted, 0, libc::SEEK_DATA), Some(0));
    assert_eq!(seek(&mounted, 0, libc::SEEK_HOLE), Some(2 * MIB));
    assert_eq!(seek(&mounted, 2 * MIB, libc::SEEK_DATA), Some(900 * MIB));
    assert_eq!(seek(&mounted, 900 * MIB, libc::SEEK_HOLE), Some(903 * MIB));
    assert_eq!(
        seek(&mounted, 903 * MIB, libc::SEEK_DATA),
        None,
        "ENXIO past the last data"
    );
    assert_eq!(
        seek(&mounted, GIB, libc::SEEK_HOLE),
        None,
        "ENXIO at the end"
    );

    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    sh(&format!(
        "cp --sparse=always '{}' '{}/cp.raw'",
        mounted.display(),
        out.path().display()
    ));
    sh(&format!(
        "qemu-img convert -O raw '{}' '{}/qemu.raw'",
        mounted.display(),
        out.path().display()
    ));
    let elapsed = started.elapsed();
    assert!(
        elapsed.as_secs_f64() < 10.0,
        "copies of a 1 GiB sparse disk took {elapsed:?}"
    );
    for copy in ["cp.raw", "qemu.raw"] {
        let copy = out.path().join(copy);
        sh(&format!("cmp '{}' '{}'", copy.display(), disk.display()));
        let blocks = std::fs::metadata(&copy).unwrap().blocks();
        assert!(
            blocks * 512 <= 16 * MIB,
            "{copy:?} is not sparse: {blocks} blocks"
        );
    }
    // A read inside a hole returns zeros.
    let mut buf = vec![1u8; 4096];
    std::fs::File::open(&mounted)
        .unwrap()
        .read_exact_at(&mut buf, 500 * MIB)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn demo_disks_report_their_zero_regions_as_holes() {
    let mount = Mount::new("demo://", "");
    let disk = mount.file("db-01/db-01-disk0.vmdk");
    let meta = std::fs::metadata(&disk).unwrap();
    // Every fourth 64 MiB region is zeros: 4.5 GiB has 72 regions, 18 of them holes.
    assert_eq!(meta.blocks() * 512, meta.len() - 18 * 64 * MIB);
    assert_eq!(seek(&disk, 0, libc::SEEK_HOLE), Some(192 * MIB));
    assert_eq!(seek(&disk, 192 * MIB, libc::SEEK_DATA), Some(256 * MIB));
    assert_eq!(
        seek(&disk, 200 * MIB, libc::SEEK_HOLE),
        Some(200 * MIB),
        "inside a hole"
    );
}
