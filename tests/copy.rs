//! cp, rsync and dd through real mounts of every local source give
//! byte-identical copies, including files past 4 GiB.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use vmexportfs::provider::demo::expected_bytes;

/// dd `count` blocks of `bs` bytes from `skip` blocks in; returns the bytes.
fn dd(file: &Path, bs: u64, skip: u64, count: u64, out: &Path) -> Vec<u8> {
    sh(&format!(
        "dd if='{}' of='{}' bs={bs} skip={skip} count={count} status=none",
        file.display(),
        out.display()
    ));
    std::fs::read(out).unwrap()
}

fn read_range(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    let file = std::fs::File::open(file).unwrap();
    let mut done = 0;
    while done < len {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

/// Each odd dd against the same range read straight from the source.
fn check_odd_dds(mounted: &Path, source: &Path, scratch: &Path) {
    let size = std::fs::metadata(source).unwrap().len();
    for (bs, skip, count) in [
        (12345, 7, 300),
        (4096, 3, 1),
        (1 << 20, 1, 5),
        (511, 1001, 2000),
        (3 << 20, 0, 1),
    ] {
        let got = dd(mounted, bs, skip, count, &scratch.join("dd.out"));
        let offset = (bs * skip).min(size);
        let want = read_range(source, offset, ((bs * count).min(size - offset)) as usize);
        assert_eq!(
            got.len(),
            want.len(),
            "dd bs={bs} skip={skip} count={count}: length"
        );
        assert!(
            got == want,
            "dd bs={bs} skip={skip} count={count}: bytes differ"
        );
    }
}

fn tree_files(root: &Path) -> Vec<String> {
    let out = sh(&format!("cd '{}' && find . -type f | sort", root.display()));
    out.lines().map(str::to_string).collect()
}

/// sha256 of every file below `root`, by relative path.
fn tree_hashes(root: &Path) -> Vec<(String, String)> {
    tree_files(root)
        .into_iter()
        .map(|file| {
            let hash = sha256(&root.join(&file));
            (file, hash)
        })
        .collect()
}

/// A source tree: two VMs with odd-sized disks, an empty file, names with
/// spaces and unicode, and a 5 GiB sparse disk with data across the 4 GiB mark.
fn make_dir_tree(root: &Path) {
    std::fs::create_dir_all(root.join("vm-a")).unwrap();
    std::fs::create_dir_all(root.join("vm b/nested")).unwrap();
    write_random_file(&root.join("vm-a/disk0.vmdk"), 40 * MIB + 12345, 1);
    write_random_file(&root.join("vm b/nested/dïsk 1.img"), 3 * MIB + 1, 2);
    std::fs::write(root.join("vm-a/empty.raw"), b"").unwrap();
    std::fs::write(root.join("vm-a/one-byte.raw"), b"x").unwrap();
    let big = std::fs::File::create(root.join("vm-a/big.raw")).unwrap();
    big.set_len(5 << 30).unwrap();
    for offset in [0u64, (4 << 30) - 3 * MIB - 17, (5 << 30) - 2 * MIB] {
        let mut chunk = vec![0u8; 2 * MIB as usize];
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ((offset as usize + i * 7) % 251) as u8;
        }
        big.write_all_at(&chunk, offset).unwrap();
    }
}

#[test]
fn dir_source_cp_rsync_dd_are_identical_including_past_4gib() {
    require_tool("rsync");
    let src = tempfile::tempdir().unwrap();
    make_dir_tree(src.path());
    let mount = Mount::new(&format!("dir://{}", src.path().display()), "");
    let out = tempfile::tempdir().unwrap();
    let source_hashes = tree_hashes(src.path());
    assert_eq!(source_hashes.len(), 5);

    for (tool, command) in [
        ("cp", "cp -r '{src}' '{dst}'"),
        ("rsync", "rsync -a '{src}/' '{dst}/'"),
    ] {
        let copy = out.path().join(tool);
        sh(&command
            .replace("{src}", &mount.path.to_string_lossy())
            .replace("{dst}", &copy.to_string_lossy()));
        assert_eq!(tree_hashes(&copy), source_hashes, "{tool} copy differs");
        std::fs::remove_dir_all(&copy).unwrap();
    }

    check_odd_dds(
        &mount.file("vm-a/disk0.vmdk"),
        &src.path().join("vm-a/disk0.vmdk"),
        out.path(),
    );
    // Past 4 GiB: offsets that do not fit in 32 bits.
    let big = mount.file("vm-a/big.raw");
    let got = dd(&big, 1_000_003, 4293, 5, &out.path().join("big.out"));
    assert_eq!(
        got,
        read_range(
            &src.path().join("vm-a/big.raw"),
            1_000_003 * 4293,
            5_000_015
        )
    );
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 5 << 30);
}

#[test]
fn demo_source_copies_match_the_computed_disks() {
    require_tool("rsync");
    let mount = Mount::new("demo://", "");
    let out = tempfile::tempdir().unwrap();
    let name = "web-01-disk0.vmdk";
    for tool in ["cp", "rsync"] {
        sh(&format!(
            "{tool} '{}' '{}/'",
            mount.file(&format!("web-01/{name}")).display(),
            out.path().display()
        ));
        let copy = std::fs::read(out.path().join(name)).unwrap();
        assert!(
            copy == expected_bytes(name, 0, 96 * MIB as usize),
            "{tool} of {name} differs"
        );
        std::fs::remove_file(out.path().join(name)).unwrap();
    }

    // Past 4 GiB on the 4.5 GiB disk, odd block size and offset.
    let big = "db-01-disk0.vmdk";
    let got = dd(
        &mount.file(&format!("db-01/{big}")),
        777_777,
        5600,
        7,
        &out.path().join("dd.out"),
    );
    assert!(
        got == expected_bytes(big, 777_777 * 5600, 777_777 * 7),
        "dd past 4 GiB differs"
    );
    // The last bytes of an odd-sized disk.
    let odd = "app-01-disk0.qcow2";
    let size = std::fs::metadata(mount.file(&format!("app-01/{odd}")))
        .unwrap()
        .len();
    assert_eq!(size, (2 << 30) + 3 * MIB + 4321);
    let tail = read_range(&mount.file(&format!("app-01/{odd}")), size - 10_000, 20_000);
    assert_eq!(tail.len(), 10_000, "a read past the end is cut at the end");
    assert!(tail == expected_bytes(odd, size - 10_000, 10_000));
}

/// `Export-VM` layout: only the disks under `Virtual Hard Disks/` appear.
#[test]
fn hyperv_source_shows_each_vm_with_its_disks() {
    require_tool("rsync");
    let src = tempfile::tempdir().unwrap();
    for (vm, disks) in [
        ("web01", vec!["web01.vhdx", "web01_snap.avhdx"]),
        ("db 01", vec!["DB01.VHD"]),
    ] {
        let base = src.path().join(vm);
        std::fs::create_dir_all(base.join("Virtual Hard Disks")).unwrap();
        std::fs::create_dir_all(base.join("Virtual Machines")).unwrap();
        std::fs::write(base.join("Virtual Machines/config.vmcx"), b"cfg").unwrap();
        for (i, disk) in disks.iter().enumerate() {
            write_random_file(
                &base.join("Virtual Hard Disks").join(disk),
                9 * MIB + i as u64 * 333,
                i as u64 + 10,
            );
        }
    }
    let mount = Mount::new(&format!("hyperv://{}", src.path().display()), "");
    let out = tempfile::tempdir().unwrap();
    let listing = sh(&format!("cd '{}' && find . | sort", mount.path.display()));
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        [
            ".",
            "./db 01",
            "./db 01/DB01.VHD",
            "./web01",
            "./web01/web01.vhdx",
            "./web01/web01_snap.avhdx"
        ]
    );
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        mount.path.display(),
        out.path().display()
    ));
    for (vm, disk) in [
        ("web01", "web01.vhdx"),
        ("web01", "web01_snap.avhdx"),
        ("db 01", "DB01.VHD"),
    ] {
        assert_eq!(
            sha256(&out.path().join(vm).join(disk)),
            sha256(&src.path().join(vm).join("Virtual Hard Disks").join(disk)),
            "{vm}/{disk}"
        );
    }
    check_odd_dds(
        &mount.file("web01/web01.vhdx"),
        &src.path().join("web01/Virtual Hard Disks/web01.vhdx"),
        out.path(),
    );
}

#[test]
fn http_manifest_source_copies_are_identical() {
    require_tool("rsync");
    let www = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(www.path().join("exports/web-01")).unwrap();
    std::fs::create_dir_all(www.path().join("blobs")).unwrap();
    write_random_file(
        &www.path().join("exports/web-01/disk-0.vmdk"),
        50 * MIB + 3,
        21,
    );
    write_random_file(&www.path().join("blobs/db.vhd"), 7 * MIB + 999, 22);
    let nginx = Nginx::start(www.path());
    let manifest = format!(
        r#"{{"vms": [
            {{"name": "web-01", "disks": [{{"name": "disk-0.vmdk", "url": "web-01/disk-0.vmdk", "size": {}}}]}},
            {{"name": "db-01", "disks": [{{"name": "db.vhd", "url": "{}"}}]}}
        ]}}"#,
        50 * MIB + 3,
        nginx.url("blobs/db.vhd")
    );
    std::fs::write(www.path().join("exports/manifest.json"), manifest).unwrap();
    let mount = Mount::new(&nginx.url("exports/manifest.json"), "");
    let out = tempfile::tempdir().unwrap();

    assert_eq!(
        std::fs::metadata(mount.file("db-01/db.vhd")).unwrap().len(),
        7 * MIB + 999,
        "a size left out of the manifest comes from HEAD"
    );
    sh(&format!(
        "cp -r '{}' '{}/cp'",
        mount.path.display(),
        out.path().display()
    ));
    sh(&format!(
        "rsync -a '{}/' '{}/rsync/'",
        mount.path.display(),
        out.path().display()
    ));
    for copy in ["cp", "rsync"] {
        assert_eq!(
            sha256(&out.path().join(copy).join("web-01/disk-0.vmdk")),
            sha256(&www.path().join("exports/web-01/disk-0.vmdk"))
        );
        assert_eq!(
            sha256(&out.path().join(copy).join("db-01/db.vhd")),
            sha256(&www.path().join("blobs/db.vhd"))
        );
    }
    check_odd_dds(
        &mount.file("web-01/disk-0.vmdk"),
        &www.path().join("exports/web-01/disk-0.vmdk"),
        out.path(),
    );
}
