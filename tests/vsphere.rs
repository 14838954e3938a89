//! `vsphere://` against the govmomi vCenter simulator (our
//! `vmexportfs-vcsim`), over TLS with a private CA, through real mounts.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use common::vcsim::{SimVm, Vcsim, PASSWORD, USER};
use common::*;

/// The directory a simulated VM gets in the mount: its name, or where the
/// name is taken twice, its folder path below the datacenter's VM folder
/// and its name.
fn mount_dir(vm: &SimVm, all: &[SimVm]) -> String {
    let taken = all.iter().filter(|other| other.name == vm.name).count();
    if taken == 1 {
        return vm.name.clone();
    }
    vm.path
        .split_once("/vm/")
        .map(|(_, below)| below.to_string())
        .unwrap()
}

fn file_stem(datastore_path: &str) -> String {
    let name = datastore_path.rsplit('/').next().unwrap();
    name.strip_suffix(".vmdk").unwrap().to_string()
}

fn export_snapshot(vm: &str) -> Vec<(String, String)> {
    vec![(vm.to_string(), "vmexportfs".to_string())]
}

#[test]
fn the_tree_matches_the_inventory_and_copies_are_valid_vmdks() {
    require_tool("qemu-img");
    require_tool("rsync");
    let sim = Vcsim::start(4, &[]);
    let filled = sim.fill_all_disks();
    let mount = Mount::new(&sim.source("DC0"), &sim.options(""));

    let mut expected = vec![". 0".to_string()];
    let mut contents = HashMap::new();
    for (vm, text, image) in &filled {
        let dir = mount_dir(vm, &sim.vms);
        let mut prefix = String::from(".");
        for part in dir.split('/') {
            prefix = format!("{prefix}/{part}");
            expected.push(format!("{prefix} 0"));
        }
        let stem = file_stem(&vm.disks[0].file);
        expected.push(format!("./{dir}/{stem}.vmdk {}", text.len()));
        expected.push(format!("./{dir}/{stem}-flat.vmdk {}", image.len()));
        contents.insert(format!("{dir}/{stem}.vmdk"), text.as_bytes().to_vec());
        contents.insert(format!("{dir}/{stem}-flat.vmdk"), image.clone());
    }
    expected.sort();
    expected.dedup();
    let mut listed = listing_with_sizes(&mount);
    listed.sort();
    assert_eq!(listed, expected);
    // The simulator's two DC0_H0_VM0 stay two directories.
    assert!(listed.contains(&"./DC0_H0_VM0 0".to_string()), "{listed:?}");
    assert!(
        listed.contains(&"./team-b/DC0_H0_VM0 0".to_string()),
        "{listed:?}"
    );

    // rsync of whole VM directories: byte-identical VMDK pairs.
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        mount.path.display(),
        out.path().display()
    ));
    for (relative, bytes) in &contents {
        let copy = std::fs::read(out.path().join(relative)).unwrap();
        assert!(&copy == bytes, "{relative} differs after rsync");
    }

    // qemu-img reads the descriptor from the mount and follows it to the
    // flat extent beside it.
    let descriptor = mount.file("team-b/DC0_H0_VM0/disk1.vmdk");
    let info = sh(&format!(
        "qemu-img info --output=json '{}'",
        descriptor.display()
    ));
    assert!(info.contains("\"format\": \"vmdk\""), "{info}");
    assert!(info.contains("\"virtual-size\": 4194304"), "{info}");
    let raw = out.path().join("converted.raw");
    sh(&format!(
        "qemu-img convert -O raw '{}' '{}'",
        descriptor.display(),
        raw.display()
    ));
    assert!(
        std::fs::read(&raw).unwrap() == contents["team-b/DC0_H0_VM0/disk1-flat.vmdk"],
        "qemu-img convert from the mount differs from the disk"
    );

    // The simulator's VMs run: without snapshot=on the log says so.
    let log = mount.log_text();
    assert!(
        log.contains("powered on") && log.contains("snapshot=on"),
        "{log}"
    );
}

#[test]
fn the_throttle_holds_and_an_expired_session_is_renewed_mid_copy() {
    let sim = Vcsim::start(48, &[]);
    let filled = sim.fill_all_disks();
    let mount = Mount::new(&sim.source("DC0"), &sim.options("rate=10M"));
    let (vm, _, image) = filled
        .iter()
        .find(|(vm, _, _)| vm.name == "DC0_H0_VM1")
        .unwrap();
    let path = mount.file(&format!("{}/disk1-flat.vmdk", vm.name));
    let reader = std::thread::spawn(move || {
        let started = Instant::now();
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        (bytes, started.elapsed().as_secs_f64())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        sim.terminate_sessions() >= 1,
        "the mount's session was not there to end"
    );
    let (bytes, seconds) = reader.join().unwrap();
    assert!(bytes == *image, "the copy differs");
    assert_rate_within("vsphere", bytes.len() as u64, seconds, 10);
    let log = mount.log_text();
    assert!(log.contains("logged in again"), "{log}");
}

#[test]
fn an_idle_session_is_kept_alive() {
    let sim = Vcsim::start(1, &["-idle-timeout", "2s"]);
    let filled = sim.fill_all_disks();
    let mount = Mount::try_new_with_env(
        &sim.source("DC0"),
        &sim.options(""),
        &[("VMEXPORTFS_VSPHERE_KEEPALIVE", "0.5")],
    )
    .unwrap();
    // Three idle timeouts with nothing read.
    std::thread::sleep(Duration::from_secs(6));
    let (vm, _, image) = &filled[1];
    let bytes = std::fs::read(mount.file(&format!("{}/disk1-flat.vmdk", vm.name))).unwrap();
    assert!(bytes == *image);
    let log = mount.log_text();
    assert!(log.contains("session kept alive"), "{log}");
    assert!(!log.contains("logged in again"), "{log}");
}

#[test]
fn snapshot_on_takes_a_snapshot_at_first_open_and_removes_it_at_last_close() {
    let sim = Vcsim::start(8, &[]);
    let filled = sim.fill_all_disks();
    let api = sim.api();
    // No linger: the last close itself removes the snapshot.
    let mount = Mount::new(
        &sim.source("DC0"),
        &sim.options("snapshot=on,snapshot_linger=0"),
    );
    assert_eq!(api.snapshots(), vec![], "listing takes no snapshot");

    let flat = std::fs::File::open(mount.file("DC0_H0_VM1/disk1-flat.vmdk")).unwrap();
    assert_eq!(api.snapshots(), export_snapshot("DC0_H0_VM1"));
    let descriptor = std::fs::File::open(mount.file("DC0_H0_VM1/disk1.vmdk")).unwrap();
    assert_eq!(api.snapshots(), export_snapshot("DC0_H0_VM1"), "one per VM");
    let image = &filled
        .iter()
        .find(|(vm, _, _)| vm.name == "DC0_H0_VM1")
        .unwrap()
        .2;
    let mut bytes = vec![0u8; image.len()];
    flat.read_exact_at(&mut bytes, 0).unwrap();
    assert!(bytes == *image);

    drop(flat);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        api.snapshots(),
        export_snapshot("DC0_H0_VM1"),
        "a disk is still open"
    );
    drop(descriptor);
    eventually("the last close removes the snapshot", || {
        api.snapshots().is_empty()
    });
    eventually("the log says so", || {
        mount.log_text().contains("snapshot removed")
    });
    assert!(mount.log_text().contains("snapshot taken"));
}

#[test]
fn snapshots_go_when_the_reader_is_killed_and_when_the_mount_is_stopped() {
    let sim = Vcsim::start(8, &[]);
    sim.fill_all_disks();
    let api = sim.api();
    let mount = Mount::new(
        &sim.source("DC0"),
        &sim.options("snapshot=on,rate=1M,snapshot_linger=1"),
    );

    // A copy killed half-way: the kernel closes its file.
    let mut dd = Command::new("dd")
        .arg(format!(
            "if={}",
            mount.file("DC0_C0_RP0_VM0/disk1-flat.vmdk").display()
        ))
        .args(["of=/dev/null", "bs=64k", "status=none"])
        .spawn()
        .unwrap();
    eventually("dd's open takes a snapshot", || {
        api.snapshots() == export_snapshot("DC0_C0_RP0_VM0")
    });
    dd.kill().unwrap();
    dd.wait().unwrap();
    eventually("the killed reader's snapshot is removed", || {
        api.snapshots().is_empty()
    });

    // SIGTERM to the mount while a disk is open: the mount ends and takes
    // its snapshot with it.
    let held = std::fs::File::open(mount.file("team-b/DC0_H0_VM0/disk1-flat.vmdk")).unwrap();
    assert_eq!(api.snapshots(), export_snapshot("DC0_H0_VM0"));
    // status names the snapshot the open disk is read from, and the pin is
    // strong however weak the datastore's own validators are.
    let status = Command::new(bin())
        .args(["status", mount.path.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert_succeeded(&status);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let file = &json["files"][0];
    assert!(
        file["snapshot"].as_str().is_some_and(|id| !id.is_empty()),
        "{json}"
    );
    assert!(
        file["pinned"].as_str().unwrap().starts_with("snapshot "),
        "{json}"
    );
    assert!(file.get("weak_pin").is_none(), "{json}");
    unsafe {
        libc::kill(mount.pid as i32, libc::SIGTERM);
    }
    eventually("the mount process ends", || {
        !std::path::Path::new(&format!("/proc/{}", mount.pid)).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", mount.pid))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    });
    assert_eq!(api.snapshots(), vec![], "the snapshot outlived the mount");
    drop(held);
    assert!(!is_mounted(&mount.path));
    let log = mount.log_text();
    assert!(
        log.contains("SIGTERM") && log.contains("snapshot removed"),
        "{log}"
    );
}

#[test]
fn a_disk_removed_from_the_datastore_fails_that_read_with_enoent() {
    let sim = Vcsim::start(64, &[]);
    let filled = sim.fill_all_disks();
    let mount = Mount::new(&sim.source("DC0"), &sim.options(""));
    let (vm, _, image) = &filled[1];
    let file = std::fs::File::open(mount.file(&format!("{}/disk1-flat.vmdk", vm.name))).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    assert!(head == image[..4096]);

    let flat = sim
        .local_path(&vm.disks[0].file)
        .with_file_name("disk1-flat.vmdk");
    std::fs::remove_file(flat).unwrap();
    let err = file
        .read_exact_at(&mut head, 60 * MIB)
        .expect_err("read of a removed disk");
    // Gone at the provider since listing: ENOENT (issue 11), so a backup
    // tool can tell it from a disk that changed under it (EIO).
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    let log = mount.log_text();
    assert!(
        log.contains(&format!("{}/disk1-flat.vmdk", vm.name)),
        "{log}"
    );
}

#[test]
fn bad_inputs_fail_with_one_clear_line_and_nothing_mounted() {
    let sim = Vcsim::start(1, &[]);
    let source = sim.source("DC0");
    let cafile = format!("cafile={}", sim.ca.ca_file().display());
    let secret = |name: &str, text: &str, mode: u32| {
        let path = sim.ca.dir().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.display().to_string()
    };
    let wrong = secret("wrong", "not-the-password\n", 0o600);
    assert_mount_fails(
        &source,
        &format!("{cafile},credentials={wrong}"),
        &[],
        "wrong user name or password",
    );
    assert_mount_fails(
        &sim.source("NOPE"),
        &sim.options(""),
        &[],
        "datacenter 'NOPE'",
    );
    assert_mount_fails(&sim.source("NOPE"), &sim.options(""), &[], "it has DC0");
    assert_mount_fails(
        &format!("vsphere://root@127.0.0.1:{}/DC0", free_port()),
        &sim.options(""),
        &[],
        "cannot reach",
    );
    assert_mount_fails(
        &source,
        &format!("credentials={}", sim.password_file.display()),
        &[],
        "certificate",
    );
    assert_mount_fails(
        &format!("vsphere://root:{PASSWORD}@{}/DC0", sim.host()),
        &cafile,
        &[],
        "password in the source",
    );
    assert_mount_fails(&source, &cafile, &[], "no password");
    let open = secret("open", &format!("{PASSWORD}\n"), 0o644);
    assert_mount_fails(
        &source,
        &format!("{cafile},credentials={open}"),
        &[],
        "readable by group or others",
    );
    assert_mount_fails(
        &source,
        &format!("{cafile},password={PASSWORD}"),
        &[],
        "refused",
    );
    assert_mount_fails(
        &format!("vsphere://{}/DC0", sim.host()),
        &sim.options(""),
        &[],
        "no user",
    );
    assert_mount_fails(&source, &sim.options("snapshot=maybe"), &[], "on or off");

    // The password from the environment works and is shown nowhere.
    let mount =
        Mount::try_new_with_env(&source, &cafile, &[("VSPHERE_PASSWORD", PASSWORD)]).unwrap();
    assert!(mount.file("DC0_H0_VM1").is_dir());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(PASSWORD), "{mounts}");
    assert!(mounts.contains(USER.split('@').next().unwrap()), "{mounts}");
    assert!(!mount.log_text().contains(PASSWORD));
    drop(mount);

    // insecure must be asked for, and is logged.
    let mount = Mount::new(
        &source,
        &format!("insecure,credentials={}", sim.password_file.display()),
    );
    assert!(mount.log_text().contains("verification is off"));
}

/// The simulator's VPX model as it comes: no folder below the datacenter's
/// VM folder, the model's own 1 MiB disks.
fn default_inventory() -> Vcsim {
    let sim = Vcsim::start(0, &["-collide=false"]);
    let mut names: Vec<&str> = sim.vms.iter().map(|vm| vm.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "DC0_C0_RP0_VM0",
            "DC0_C0_RP0_VM1",
            "DC0_H0_VM0",
            "DC0_H0_VM1"
        ]
    );
    for vm in &sim.vms {
        assert_eq!(
            vm.path,
            format!("/DC0/vm/{}", vm.name),
            "a folder was added"
        );
    }
    sim
}

/// Lines of the mount log that hold every one of `words`.
/// What the provider writes into its snapshots' descriptions.
fn creator_marker(pid: u32) -> String {
    format!(
        "Taken by vmexportfs for a consistent export of the disks; removed when the export ends. {}",
        creator_record(pid)
    )
}

#[test]
fn the_default_inventory_without_folders_mounts_and_lists_its_four_vms() {
    let sim = default_inventory();
    let filled = sim.fill_all_disks();
    let mount = Mount::new(&sim.source("DC0"), &sim.options(""));
    let mut expected = vec![". 0".to_string()];
    for (vm, text, image) in &filled {
        expected.push(format!("./{} 0", vm.name));
        expected.push(format!("./{}/disk1.vmdk {}", vm.name, text.len()));
        expected.push(format!("./{}/disk1-flat.vmdk {}", vm.name, image.len()));
    }
    expected.sort();
    let mut listed = listing_with_sizes(&mount);
    listed.sort();
    assert_eq!(listed, expected);
    for (vm, _, image) in &filled {
        let bytes = std::fs::read(mount.file(&format!("{}/disk1-flat.vmdk", vm.name))).unwrap();
        assert!(bytes == *image, "{} differs", vm.name);
    }
}

#[test]
fn rsync_of_a_vm_directory_reads_every_file_from_one_snapshot_kept_for_the_linger() {
    require_tool("rsync");
    let sim = default_inventory();
    let filled = sim.fill_all_disks();
    let api = sim.api();
    let mount = Mount::new(
        &sim.source("DC0"),
        &sim.options("snapshot=on,snapshot_linger=2"),
    );
    let vm = "DC0_H0_VM1";
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "rsync -a '{}' '{}/'",
        mount.file(vm).display(),
        out.path().display()
    ));
    // Still there right after the copy: the linger has not run out.
    assert_eq!(api.snapshots(), export_snapshot(vm));
    let (_, text, image) = filled.iter().find(|(v, _, _)| v.name == vm).unwrap();
    assert!(std::fs::read(out.path().join(vm).join("disk1-flat.vmdk")).unwrap() == *image);
    assert_eq!(
        std::fs::read_to_string(out.path().join(vm).join("disk1.vmdk")).unwrap(),
        *text
    );
    let taken = log_lines(&mount, &["snapshot taken", vm]);
    assert_eq!(taken.len(), 1, "one snapshot for the whole VM: {taken:?}");

    let closed = Instant::now();
    eventually("the snapshot goes after the linger", || {
        api.snapshots().is_empty()
    });
    assert!(
        closed.elapsed() > Duration::from_millis(500),
        "removed before the linger ran out"
    );
    eventually("the log says so", || {
        log_lines(&mount, &["snapshot removed", vm]).len() == 1
    });
    assert_eq!(log_lines(&mount, &["snapshot taken"]).len(), 1);
}

#[test]
fn a_reopen_within_the_linger_keeps_the_snapshot_and_unmount_removes_it_at_once() {
    let sim = default_inventory();
    sim.fill_all_disks();
    let api = sim.api();
    let mount = Mount::new(
        &sim.source("DC0"),
        &sim.options("snapshot=on,snapshot_linger=600"),
    );
    let vm = "DC0_C0_RP0_VM0";
    std::fs::read(mount.file(&format!("{vm}/disk1.vmdk"))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(api.snapshots(), export_snapshot(vm), "kept after the close");
    std::fs::read(mount.file(&format!("{vm}/disk1-flat.vmdk"))).unwrap();
    let taken = log_lines(&mount, &["snapshot taken", vm]);
    assert_eq!(taken.len(), 1, "{taken:?}");
    eventually("the re-open is logged", || {
        !log_lines(&mount, &["same snapshot serves", vm]).is_empty()
    });
    // A second VM lingers too; unmount takes both at once.
    std::fs::read(mount.file("DC0_H0_VM0/disk1.vmdk")).unwrap();
    let mut both = export_snapshot(vm);
    both.extend(export_snapshot("DC0_H0_VM0"));
    both.sort();
    assert_eq!(api.snapshots(), both);
    let started = Instant::now();
    mount.unmount();
    assert!(!is_mounted(&mount.path));
    assert_eq!(
        api.snapshots(),
        vec![],
        "lingering snapshots outlived the mount"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(log_lines(&mount, &["snapshot removed"]).len(), 2);
}

#[test]
fn snapshots_left_by_a_dead_daemon_are_removed_at_mount_and_no_others() {
    let sim = default_inventory();
    sim.fill_all_disks();
    let api = sim.api();

    // A live mount holding a snapshot of its own.
    let live = Mount::new(
        &sim.source("DC0"),
        &sim.options("snapshot=on,snapshot_linger=600"),
    );
    std::fs::read(mount_file(&live, "DC0_C0_RP0_VM1")).unwrap();
    // A daemon that is gone: a pid that no longer runs.
    let mut exited = Command::new("true").spawn().unwrap();
    let dead = exited.id();
    exited.wait().unwrap();
    api.create_snapshot("DC0_H0_VM0", "vmexportfs", &creator_marker(dead));
    // Another host's vmexportfs, and an operator's snapshot.
    let elsewhere = creator_marker(dead).replace("host=", "host=elsewhere-");
    api.create_snapshot("DC0_H0_VM1", "vmexportfs", &elsewhere);
    api.create_snapshot("DC0_C0_RP0_VM0", "nightly", "taken by vmexportfs? no");
    let before = api.snapshots();
    assert_eq!(before.len(), 4, "{before:?}");

    let mount = Mount::new(&sim.source("DC0"), &sim.options(""));
    let mut expected = vec![
        ("DC0_C0_RP0_VM0".to_string(), "nightly".to_string()),
        ("DC0_C0_RP0_VM1".to_string(), "vmexportfs".to_string()),
        ("DC0_H0_VM1".to_string(), "vmexportfs".to_string()),
    ];
    expected.sort();
    assert_eq!(api.snapshots(), expected);
    let removed = log_lines(&mount, &["left behind", &format!("pid {dead}")]);
    assert_eq!(removed.len(), 1, "{}", mount.log_text());
    assert!(removed[0].contains("DC0_H0_VM0"), "{removed:?}");
    assert_eq!(
        log_lines(
            &mount,
            &["left alone", "is running", &format!("pid {}", live.pid)]
        )
        .len(),
        1,
        "{}",
        mount.log_text()
    );
    assert_eq!(log_lines(&mount, &["left alone", "elsewhere-"]).len(), 1);
    // The live mount still reads from its snapshot, and removes it itself.
    std::fs::read(mount_file(&live, "DC0_C0_RP0_VM1")).unwrap();
    live.unmount();
    assert_eq!(api.snapshots().len(), 2);
}

fn mount_file(mount: &Mount, vm: &str) -> std::path::PathBuf {
    mount.file(&format!("{vm}/disk1.vmdk"))
}
