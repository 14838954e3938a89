//! A live inventory through real mounts of a `dir://` tree: disks that
//! land, go or are replaced after the mount show so, paths keep their
//! inodes, and an open file reads on from what it opened.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn refresh(mount: &Mount, path: Option<&str>) -> std::process::Output {
    let mut command = Command::new(bin());
    command.args(["refresh", mount.path.to_str().unwrap()]);
    if let Some(path) = path {
        command.arg(path);
    }
    command.output().unwrap()
}

#[test]
fn disks_that_land_go_or_change_after_the_mount_show_so_on_refresh() {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("vm1")).unwrap();
    write_random_file(&src.path().join("vm1/a.raw"), MIB, 1);
    write_random_file(&src.path().join("vm1/b.raw"), 3 * MIB, 2);
    let b_bytes = std::fs::read(src.path().join("vm1/b.raw")).unwrap();
    let mount = Mount::new(&format!("dir://{}", src.path().display()), "");
    let a_ino = std::fs::metadata(mount.file("vm1/a.raw")).unwrap().ino();
    // An open file, read in part before its disk goes.
    let open_b = std::fs::File::open(mount.file("vm1/b.raw")).unwrap();
    let mut head = vec![0u8; MIB as usize];
    open_b.read_exact_at(&mut head, 0).unwrap();

    std::fs::create_dir(src.path().join("vm2")).unwrap();
    write_random_file(&src.path().join("vm2/c.raw"), 2 * MIB, 3);
    write_random_file(&src.path().join("vm1/a.new"), 5 * MIB, 4);
    std::fs::rename(src.path().join("vm1/a.new"), src.path().join("vm1/a.raw")).unwrap();
    std::fs::remove_file(src.path().join("vm1/b.raw")).unwrap();

    let output = refresh(&mount, None);
    assert_succeeded(&output);
    let said = String::from_utf8_lossy(&output.stdout);
    // dir:// is listed one directory at a time: the refresh lists again the
    // root and vm1; the new vm2 is listed when first used, so its disk is
    // not counted here.
    assert!(
        said.contains("0 disk(s) added, 1 removed, 1 changed"),
        "{said}"
    );
    assert_eq!(names(&mount.path), set(&["vm1", "vm2"]));
    assert_eq!(names(&mount.file("vm1")), set(&["a.raw"]));
    // The replaced disk: same path, same inode, its new size at once (the
    // kernel's cached attributes were invalidated), its new bytes.
    let a = std::fs::metadata(mount.file("vm1/a.raw")).unwrap();
    assert_eq!(a.ino(), a_ino);
    assert_eq!(a.len(), 5 * MIB);
    assert!(
        std::fs::read(mount.file("vm1/a.raw")).unwrap()
            == std::fs::read(src.path().join("vm1/a.raw")).unwrap()
    );
    assert_eq!(
        std::fs::read(mount.file("vm2/c.raw")).unwrap(),
        std::fs::read(src.path().join("vm2/c.raw")).unwrap()
    );
    // The removed disk cannot be opened again...
    let err = std::fs::File::open(mount.file("vm1/b.raw")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    // ...but the open file reads on from what it opened.
    let mut rest = vec![0u8; 2 * MIB as usize];
    open_b.read_exact_at(&mut rest, MIB).unwrap();
    head.extend_from_slice(&rest);
    assert!(head == b_bytes, "the open file's bytes changed");
    // It comes back at the inode it had.
    let b_ino = open_b.metadata().unwrap().ino();
    drop(open_b);
    std::fs::write(src.path().join("vm1/b.raw"), b"back").unwrap();
    assert_succeeded(&refresh(&mount, Some("vm1")));
    assert_eq!(
        std::fs::metadata(mount.file("vm1/b.raw")).unwrap().ino(),
        b_ino
    );
}

#[test]
fn a_stale_listing_is_listed_again_in_the_background() {
    let src = tempfile::tempdir().unwrap();
    write_random_file(&src.path().join("one.raw"), 4096, 1);
    let mount = Mount::new(&format!("dir://{}", src.path().display()), "refresh=1");
    assert_eq!(names(&mount.path), set(&["one.raw"]));
    write_random_file(&src.path().join("two.raw"), 4096, 2);
    std::thread::sleep(Duration::from_millis(1100));
    // The first look after a second starts a listing and is answered from
    // the old one; a later look sees the new disk.
    let deadline = Instant::now() + Duration::from_secs(10);
    while names(&mount.path).len() < 2 {
        assert!(Instant::now() < deadline, "two.raw never appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        mount.log_text().contains("directory listed again"),
        "{}",
        mount.log_text()
    );
}

#[test]
fn with_refresh_off_the_listing_stays_until_asked() {
    let src = tempfile::tempdir().unwrap();
    write_random_file(&src.path().join("one.raw"), 4096, 1);
    let mount = Mount::new(&format!("dir://{}", src.path().display()), "refresh=off");
    write_random_file(&src.path().join("two.raw"), 4096, 2);
    for _ in 0..15 {
        assert_eq!(names(&mount.path), set(&["one.raw"]));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_succeeded(&refresh(&mount, None));
    assert_eq!(names(&mount.path), set(&["one.raw", "two.raw"]));
}

#[test]
fn bad_refresh_values_and_paths_are_refused() {
    for bad in ["refresh=0", "refresh=abc", "refresh="] {
        assert_mount_fails("demo://", bad, &[], "refresh");
    }
    let mount = Mount::new("demo://", "");
    for (path, expected) in [
        ("no-such-vm", "refresh /no-such-vm"),
        ("web-01/web-01-disk0.vmdk", "not a directory"),
        ("/elsewhere", "not inside the mount"),
    ] {
        let output = refresh(&mount, Some(path));
        assert!(!output.status.success(), "{path} refreshed");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains(expected), "{path}: {said}");
    }
    assert_succeeded(&refresh(&mount, Some("web-01")));
}

/// A source listed whole (an HTTP manifest): a refresh lists everything
/// again, new VMs' disks counted at once.
#[test]
fn a_whole_listing_source_takes_in_every_change_on_refresh() {
    let (www, nginx) = serve_one_disk(MIB, 1);
    let manifest = nginx.url("manifest.json");
    let mount = Mount::new(&manifest, "refresh=off");
    assert_eq!(names(&mount.path), set(&["vm"]));
    write_random_file(&www.path().join("new.raw"), 2 * MIB, 2);
    std::fs::write(
        www.path().join("manifest.json"),
        r#"{"vms":[{"name":"vm2","disks":[{"name":"new.raw","url":"new.raw"}]}]}"#,
    )
    .unwrap();
    let output = refresh(&mount, None);
    assert_succeeded(&output);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.contains("1 disk(s) added, 1 removed, 0 changed"),
        "{said}"
    );
    assert_eq!(names(&mount.path), set(&["vm2"]));
    assert_eq!(
        std::fs::read(mount.file("vm2/new.raw")).unwrap(),
        std::fs::read(www.path().join("new.raw")).unwrap()
    );
}
