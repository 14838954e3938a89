//! mount(8) integration: `mount -t vmexportfs`, an fstab line, `umount`,
//! through the installed helper, with mount(8)'s default `rw` and
//! systemd-only options, and from an empty environment.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Installs this build as /usr/local/bin/vmexportfs and the helper as
/// /sbin/mount.vmexportfs, as a user would with install.sh.
fn install() {
    let repo = env!("CARGO_MANIFEST_DIR");
    sh(&format!("sh '{repo}/mount-helpers/install.sh' '{}'", bin()));
    assert!(Path::new("/sbin/mount.vmexportfs").exists());
}

/// A fresh mountpoint with the helper installed; unmounted on drop even
/// when the test fails.
struct Scratch {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        install();
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        Scratch { dir, mnt }
    }
}

impl Scratch {
    /// `umount` as a user types it; nothing may be left mounted.
    fn umount(&self) {
        sh(&format!("umount '{}'", self.mnt.display()));
        assert!(!is_mounted(&self.mnt));
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn mount_line(path: &Path) -> String {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find(|line| line.split(' ').nth(1) == Some(&*path.to_string_lossy()))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn mount_t_vmexportfs_and_umount() {
    let scratch = Scratch::new();
    let mnt = &scratch.mnt;
    sh(&format!(
        "mount -t vmexportfs demo:// '{}' -o rate=20M",
        mnt.display()
    ));
    let line = mount_line(mnt);
    assert!(
        line.starts_with("demo:// ") && line.contains(" fuse.vmexportfs ro,"),
        "{line}"
    );
    assert!(mnt.join("web-01/web-01-disk0.vmdk").is_file());
    // The limit is in force: 10 MiB at 20 MiB/s after a 2 MiB burst.
    let started = std::time::Instant::now();
    sh(&format!(
        "dd if='{}/web-01/web-01-disk0.vmdk' of=/dev/null bs=1M count=10 status=none",
        mnt.display()
    ));
    let seconds = started.elapsed().as_secs_f64();
    assert!(seconds > 0.3, "10 MiB at rate=20M took only {seconds:.2}s");
    scratch.umount();
}

#[test]
fn an_fstab_line_mounts_with_mount_dir() {
    let scratch = Scratch::new();
    let mnt = &scratch.mnt;
    let fstab = scratch.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\ndemo://  {}  vmexportfs  rate=10M,burst=1M,_netdev,nofail,x-systemd.automount  0 0\n",
            mnt.display()
        ),
    )
    .unwrap();
    // mount -T reads this fstab instead of /etc/fstab; mount(8) adds `rw`.
    sh(&format!(
        "mount -T '{}' '{}'",
        fstab.display(),
        mnt.display()
    ));
    let line = mount_line(mnt);
    assert!(line.contains(" fuse.vmexportfs "), "{line}");
    assert_eq!(
        std::fs::read_dir(mnt).unwrap().count(),
        3,
        "the three demo VMs"
    );
    scratch.umount();
}

#[test]
fn the_helper_works_with_an_empty_environment_and_rejects_bad_options() {
    let scratch = Scratch::new();
    let mnt = &scratch.mnt;
    let status = Command::new("env")
        .args(["-i", "/sbin/mount.vmexportfs", "demo://"])
        .arg(mnt)
        .args(["-o", "rw,rate=10M,_netdev,nofail"])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(is_mounted(mnt));
    scratch.umount();

    let output = Command::new("mount")
        .args(["-t", "vmexportfs", "demo://"])
        .arg(mnt)
        .args(["-o", "rate=10M,bogus"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown option 'bogus'"), "{stderr}");
    assert!(!is_mounted(mnt));
}

/// A source with a query string (a signature) reaches the mount through the
/// environment, not argv, and is shown without it.
#[test]
fn a_signed_source_url_stays_out_of_argv_and_proc_mounts() {
    let (www, nginx) = serve_one_disk(1000, 4);
    let scratch = Scratch::new();
    let mnt = &scratch.mnt;
    let source = format!("{}?sig=TOPSECRET123", nginx.url("manifest.json"));
    sh(&format!(
        "mount -t vmexportfs '{source}' '{}'",
        mnt.display()
    ));
    assert_eq!(
        std::fs::read(mnt.join("vm/disk.raw")).unwrap(),
        std::fs::read(www.path().join("disk.raw")).unwrap()
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("TOPSECRET123"), "secret in /proc/mounts");
    let pid = daemon_pid(mnt).expect("daemon");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("TOPSECRET123"),
        "secret in the daemon's argv"
    );
    scratch.umount();
}
