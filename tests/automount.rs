//! `x-systemd.automount` and `x-systemd.idle-timeout` from fstab, with a
//! real systemd and a real autofs. This machine's kernel has no autofs and
//! its PID 1 is not systemd, so scripts/automount-vm.sh boots a Debian guest
//! under qemu with the package of this build installed, and runs
//! scripts/automount-vm/check in it. Nothing is mounted on this machine.

use std::process::Command;

#[test]
fn fstab_automount_mounts_at_first_access_and_unmounts_when_idle() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("sh")
        .arg("scripts/automount-vm.sh")
        .arg("--no-build")
        .current_dir(root)
        .output()
        .expect("running scripts/automount-vm.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        output.status.success() && stdout.contains("AUTOMOUNT-RESULT: PASS"),
        "the guest's check failed\n{report}"
    );
    // Each step of the check said what it saw.
    for step in [
        "before access: /mnt/auto holds 'autofs', no daemon",
        "first access: ls answered in",
        "/mnt/auto holds 'autofs fuse.vmexportfs'",
        "the same sha256 as the direct mount",
        "a file held open 10 s kept the mount",
        "idle: unmounted",
        "idle: the daemon exited, the automount stays armed",
        "second access: mounted again",
        "systemctl stop: nothing left on /mnt/auto",
    ] {
        assert!(
            stdout.contains(step),
            "no '{step}' in the check's report\n{report}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{report}");
}
