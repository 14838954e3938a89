//! Metadata at scale and injected faults, through real mounts of
//! `demo://` with parameters (no emulator needed for either).

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;

use common::*;

#[test]
fn a_directory_of_thirty_thousand_disks_lists_each_once_with_its_attributes() {
    let mount = Mount::new("demo://?vms=2&disks=30000&size=3M", "");
    let root: BTreeSet<String> = std::fs::read_dir(&mount.path)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(root, BTreeSet::from(["vm-0".into(), "vm-1".into()]));
    // nlink counts sub-directories: 2 + 2.
    assert_eq!(std::fs::metadata(&mount.path).unwrap().nlink(), 4);
    let dir = mount.file("vm-1");
    let mut names = BTreeSet::new();
    // Many readdir calls, each resuming at its offset: every name once.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.len(), 3 * MIB);
        let name = entry.file_name().into_string().unwrap();
        assert!(names.insert(name.clone()), "{name} listed twice");
    }
    let expected: BTreeSet<String> = (0..30000)
        .map(|disk| format!("vm-1-disk{disk:05}.vmdk"))
        .collect();
    assert_eq!(names.len(), 30000);
    assert!(names == expected, "other names than the inventory's");
    // `ls -l` (readdirplus where the kernel uses it) agrees.
    let listing = sh(&format!("ls -l {} | grep -c '^-r'", dir.display()));
    assert_eq!(listing.trim(), "30000");
    // statfs keeps the total: 60,000 disks of 3 MiB.
    let df = sh(&format!("stat -f -c '%b %S' {}", mount.path.display()));
    let (blocks, block_size) = df.trim().split_once(' ').unwrap();
    let total = blocks.parse::<u64>().unwrap() * block_size.parse::<u64>().unwrap();
    assert_eq!(total, 60000 * 3 * MIB);
}

#[test]
fn injected_faults_are_retried_and_every_byte_still_arrives() {
    let mount = Mount::new("demo://?faults=0.3&latency=2ms", "");
    let name = "web-01-disk0.vmdk";
    let mut copied = Vec::new();
    std::fs::File::open(mount.file(&format!("web-01/{name}")))
        .unwrap()
        .read_to_end(&mut copied)
        .unwrap();
    assert_eq!(copied.len() as u64, 96 * MIB);
    let expected = vmexportfs::provider::demo::expected_bytes(name, 0, copied.len());
    assert!(copied == expected, "the copy differs from the demo bytes");
    let log = mount.log_text();
    assert!(
        log.contains("injected fault") && log.contains("retrying"),
        "faults were not injected and retried: {log}"
    );
}

#[test]
fn bad_demo_parameters_are_refused_with_one_clear_line() {
    for (source, expected) in [
        ("demo://?vms=0", "vms='0'"),
        ("demo://?colour=red", "unknown demo:// parameter 'colour'"),
        ("demo://?vms=10000&disks=10000", "at most 10000000"),
        ("demo://bucket", "takes no path"),
    ] {
        assert_mount_fails(source, "", &[], expected);
    }
}
