//! What users rely on besides copying: clear errors with nothing left
//! mounted, read-only everywhere, safe names, EIO for a bad read only, and
//! fetches that stop when their reader goes away.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs `vmexportfs mount` expecting failure; returns its one stderr line.
fn mount_fails(source: &str, mountpoint: &Path, options: &str) -> String {
    let stderr = mount_fails_on(source, mountpoint, options);
    assert!(
        !is_mounted(mountpoint),
        "failed mount left {mountpoint:?} mounted"
    );
    stderr
}

fn mount_fails_on(source: &str, mountpoint: &Path, options: &str) -> String {
    let mut command = Command::new(bin());
    command.args(["mount", source]).arg(mountpoint);
    if !options.is_empty() {
        command.args(["-o", options]);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "mount {source} {options} succeeded"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("vmexportfs: "), "{stderr:?}");
    stderr
}

#[test]
fn bad_inputs_are_one_clear_line_and_nothing_is_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();

    let err = mount_fails("demo://", &mnt, "rate=10M,bogus=1");
    assert!(err.contains("unknown option 'bogus'"), "{err}");
    let err = mount_fails("demo://", &mnt, "rate=fast");
    assert!(
        err.contains("option 'rate'") && err.contains("'fast'"),
        "{err}"
    );
    let err = mount_fails("demo://", &mnt, "rate=5Mb");
    assert!(err.contains("ambiguous"), "{err}");
    let err = mount_fails("demo://", &dir.path().join("missing"), "");
    assert!(
        err.contains("missing") && err.contains("No such file"),
        "{err}"
    );
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let err = mount_fails("demo://", &file, "");
    assert!(err.contains("not a directory"), "{err}");
    let port = free_port();
    let err = mount_fails(&format!("http://127.0.0.1:{port}/manifest.json"), &mnt, "");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    let err = mount_fails("dir:///does/not/exist", &mnt, "");
    assert!(err.contains("/does/not/exist"), "{err}");
    let err = mount_fails("dir://relative/path", &mnt, "");
    assert!(err.contains("absolute path"), "{err}");
    let err = mount_fails("floppy://a", &mnt, "");
    assert!(err.contains("unknown source scheme"), "{err}");
    let err = mount_fails("not a url", &mnt, "");
    assert!(err.contains("not a source"), "{err}");

    // A mountpoint already in use.
    let first = Mount::new("demo://", "");
    let err = mount_fails_on("demo://", &first.path, "");
    assert!(err.contains("already in use"), "{err}");
    let stacked = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .matches(&*first.path.to_string_lossy())
        .count();
    assert_eq!(stacked, 1, "no second mount stacked on the first");
    assert!(
        first.path.join("web-01").is_dir(),
        "the first mount is untouched"
    );
}

#[test]
fn rw_is_accepted_and_every_change_gets_erofs() {
    let mount = Mount::new(
        "demo://",
        "rw,_netdev,nofail,x-systemd.requires=network.target",
    );
    assert!(
        mount.log_text().contains("'rw' ignored"),
        "{}",
        mount.log_text()
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(&*mount.path.to_string_lossy()))
        .unwrap();
    assert!(line.starts_with("demo:// "), "source is the device: {line}");
    assert!(line.contains(" fuse.vmexportfs ro,"), "type and ro: {line}");

    let disk = mount.file("web-01/web-01-disk0.vmdk");
    let erofs = |result: std::io::Result<()>, what: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{what}: {err}");
    };
    erofs(std::fs::write(mount.file("web-01/new"), b"x"), "create");
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .map(drop),
        "open for writing",
    );
    erofs(std::fs::create_dir(mount.file("new-dir")), "mkdir");
    erofs(std::fs::remove_file(&disk), "unlink");
    erofs(std::fs::remove_dir(mount.file("web-01")), "rmdir");
    erofs(
        std::fs::rename(&disk, mount.file("web-01/renamed")),
        "rename",
    );
    use std::os::unix::fs::PermissionsExt;
    erofs(
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o666)),
        "chmod",
    );
    erofs(
        std::os::unix::fs::symlink("x", mount.file("link")),
        "symlink",
    );
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert_eq!(
        std::fs::metadata(mount.file("web-01"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o555
    );
}

#[test]
fn ownership_and_mode_options_apply() {
    let mount = Mount::new("demo://", "uid=1234,gid=4321,umask=077");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(mount.file("web-01/web-01-disk0.vmdk")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (1234, 4321, 0o400)
    );
    let dir = std::fs::metadata(mount.file("web-01")).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o500);
}

#[test]
fn invalid_provider_names_are_mapped_safely() {
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("blob"), b"0123456789").unwrap();
    let nginx = Nginx::start(www.path());
    let long = "L".repeat(300);
    let manifest = serde_json::json!({"vms": [
        {"name": "..", "disks": [{"name": "../../etc/passwd", "url": "blob"}, {"name": "", "url": "blob"}]},
        {"name": ".", "disks": [{"name": ".", "url": "blob"}, {"name": "nul\u{0}byte", "url": "blob"}]},
        {"name": "vm", "disks": [{"name": long, "url": "blob"}, {"name": "dup", "url": "blob"}, {"name": "dup", "url": "blob"}]},
    ]});
    std::fs::write(www.path().join("manifest.json"), manifest.to_string()).unwrap();
    let mount = Mount::new(&nginx.url("manifest.json"), "");
    let listing = sh(&format!(
        "cd '{}' && find . -type f | sort",
        mount.path.display()
    ));
    let files: Vec<&str> = listing.lines().collect();
    assert_eq!(files.len(), 7, "{files:?}");
    let long_name = files.iter().find(|f| f.starts_with("./vm/LLL")).unwrap();
    assert!(long_name.len() - "./vm/".len() <= 255);
    for expected in [
        "./%2E%2E/..%2F..%2Fetc%2Fpasswd",
        "./%2E%2E/%",
        "./%2E/%2E",
        "./%2E/nul%00byte",
        "./vm/dup",
    ] {
        assert!(
            files.contains(&expected),
            "{expected} missing from {files:?}"
        );
    }
    // The second "dup" gets a suffix from a hash of what it is, not its
    // place among its siblings, so its path is stable.
    assert!(
        files.iter().any(|f| f.starts_with("./vm/dup%~")),
        "{files:?}"
    );
    for file in &files {
        let bytes = std::fs::read(mount.path.join(file)).unwrap();
        assert_eq!(bytes, b"0123456789", "{file}");
    }
}

#[test]
fn a_changed_source_fails_that_read_with_eio_and_the_mount_stays_up() {
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("vm")).unwrap();
    let disk = src.path().join("vm/disk.raw");
    write_random_file(&disk, 64 * MIB, 5);
    write_random_file(&src.path().join("vm/other.raw"), MIB, 6);
    let mount = Mount::new(&format!("dir://{}", src.path().display()), "");

    let file = std::fs::File::open(mount.file("vm/disk.raw")).unwrap();
    let mut head = vec![0; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    // Rewrite the source under the open file: new mtime, same size.
    std::thread::sleep(Duration::from_millis(20));
    write_random_file(&disk, 64 * MIB, 7);
    let mut far = vec![0; 4096];
    let err = file
        .read_exact_at(&mut far, 60 * MIB)
        .expect_err("read of a changed disk");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = mount.log_text();
    assert!(
        log.contains("/vm/disk.raw") && log.contains("changed since it was opened"),
        "the log names the file and the reason:\n{log}"
    );
    // Other files and later opens still work.
    assert_eq!(
        std::fs::read(mount.file("vm/other.raw")).unwrap().len(),
        MIB as usize
    );
    drop(file);
    let mut reopened = std::fs::File::open(mount.file("vm/disk.raw")).unwrap();
    let mut all = Vec::new();
    reopened.read_to_end(&mut all).unwrap();
    assert!(
        all == std::fs::read(&disk).unwrap(),
        "a new open reads the new version"
    );

    // A disk removed from the source since listing: ENOENT at open (a
    // backup tool tells "gone" from "broken"), the mount lives.
    std::fs::remove_file(src.path().join("vm/other.raw")).unwrap();
    let err = std::fs::read(mount.file("vm/other.raw")).expect_err("removed disk");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    assert!(mount.file("vm").is_dir());
}

#[test]
fn a_killed_readers_fetches_stop() {
    let (_www, nginx) = serve_one_disk(64 * MIB, 9);
    let mount = Mount::new(&nginx.url("manifest.json"), "rate=4M");
    let mut reader = Command::new("dd")
        .arg(format!("if={}", mount.file("vm/disk.raw").display()))
        .args(["of=/dev/null", "bs=1M"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(reader.try_wait().unwrap().is_none(), "dd is still copying");
    let before_kill = nginx.requests_for("/disk.raw");
    assert!(
        before_kill > 3,
        "the copy was fetching ({before_kill} requests)"
    );
    reader.kill().unwrap();
    reader.wait().unwrap();
    // Fetches already on the wire may finish; then nothing more.
    std::thread::sleep(Duration::from_secs(3));
    let settled = nginx.requests_for("/disk.raw");
    std::thread::sleep(Duration::from_secs(4));
    let later = nginx.requests_for("/disk.raw");
    assert_eq!(settled, later, "fetches went on after the reader died");
    assert!(
        later < 40,
        "{later} of 64 blocks fetched: the dead reader's read-ahead was not cancelled"
    );
}

#[test]
fn sigterm_unmounts_and_the_daemon_exits() {
    let mount = Mount::new("demo://", "");
    assert!(is_mounted(&mount.path));
    // SAFETY: a plain signal to the daemon this test started.
    unsafe {
        libc::kill(mount.pid as i32, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while is_mounted(&mount.path) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(&mount.path), "still mounted after SIGTERM");
    let gone = |pid: u32| {
        // Gone, or a zombie waiting for init to reap it.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    while !gone(mount.pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone(mount.pid), "daemon still running");
    assert!(
        mount.log_text().contains("SIGTERM: unmounting"),
        "{}",
        mount.log_text()
    );
}
