//! The Debian package: built with scripts/package.sh from this build,
//! installed with dpkg -i, then used as a user would: `mount -t vmexportfs`
//! through the packaged helper, `man vmexportfs`, completions. Removed at
//! the end, even when the test fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const PACKAGE: &str = "vmexportfs";

/// Removes the package and unmounts the test mount on drop.
struct Installed {
    mnt: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = Command::new("dpkg").args(["-r", PACKAGE]).output();
    }
}

fn run(command: &str) -> String {
    let output = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(
        output.status.success(),
        "{command}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn built_package() -> PathBuf {
    let repo = env!("CARGO_MANIFEST_DIR");
    require_tool("cargo-deb");
    // The binary this test run was built with is what gets packed.
    assert_eq!(
        Path::new(bin()).canonicalize().unwrap(),
        Path::new(repo).join("target/release/vmexportfs").canonicalize().unwrap(),
        "scripts/package.sh --no-build packs target/release/vmexportfs: run the tests with --release"
    );
    run(&format!("cd '{repo}' && sh scripts/package.sh --no-build"));
    let debs: Vec<PathBuf> = std::fs::read_dir(Path::new(repo).join("target/debian"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with(&format!("{PACKAGE}_{}", env!("CARGO_PKG_VERSION")))
                && name.ends_with(".deb")
        })
        .collect();
    assert_eq!(debs.len(), 1, "one package for this version: {debs:?}");
    debs.into_iter().next().unwrap()
}

#[test]
fn dpkg_install_then_mount_t_and_man() {
    let deb = built_package();
    let contents = run(&format!("dpkg-deb -c '{}'", deb.display()));
    for wanted in [
        "./usr/bin/vmexportfs",
        "./sbin/mount.vmexportfs",
        "./lib/systemd/system/vmexportfs@.service",
        "./usr/share/man/man8/vmexportfs.8.gz",
        "./usr/share/man/man8/vmexportfs-mount.8.gz",
        "./usr/share/man/man8/mount.vmexportfs.8.gz",
        "./usr/share/bash-completion/completions/vmexportfs",
        "./usr/share/zsh/vendor-completions/_vmexportfs",
        "./usr/share/fish/vendor_completions.d/vmexportfs.fish",
        "./usr/share/doc/vmexportfs/examples/fstab.example",
        "./usr/share/doc/vmexportfs/examples/vmexportfs.env.example",
    ] {
        assert!(
            contents.contains(wanted),
            "{wanted} not in the package:\n{contents}"
        );
    }
    let fields = run(&format!(
        "dpkg-deb -f '{}' Package Version Depends",
        deb.display()
    ));
    assert!(
        fields.contains("Depends:") && fields.contains("fuse3"),
        "{fields}"
    );

    let dir = tempfile::tempdir().unwrap();
    let installed = Installed {
        mnt: dir.path().join("mnt"),
    };
    std::fs::create_dir(&installed.mnt).unwrap();
    run(&format!("dpkg -i '{}'", deb.display()));
    assert!(run(&format!("dpkg -s {PACKAGE}")).contains("Status: install ok installed"));
    let version = run("/usr/bin/vmexportfs --version");
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    // mount(8) finds the packaged helper, which runs the packaged binary.
    let mnt = installed.mnt.display();
    run(&format!(
        "env -i /bin/mount -t vmexportfs demo:// '{mnt}' -o rate=50M,_netdev"
    ));
    assert!(is_mounted(&installed.mnt));
    let pid = daemon_pid(&installed.mnt).expect("the mount daemon runs");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        Path::new("/usr/bin/vmexportfs"),
        "the packaged binary serves the mount"
    );
    let listing = run(&format!("ls '{mnt}/web-01'"));
    assert!(listing.contains("web-01-disk0.vmdk"), "{listing}");
    run(&format!("umount '{mnt}'"));
    assert!(!is_mounted(&installed.mnt));

    // The manual pages are installed where man finds them, and say what
    // the binary does.
    let page = run("man -w vmexportfs");
    assert_eq!(page.trim(), "/usr/share/man/man8/vmexportfs.8.gz");
    let text = run("MANWIDTH=100 man -P cat vmexportfs 2>/dev/null");
    assert!(
        text.contains("vmexportfs") && text.contains("refresh"),
        "{text}"
    );
    let mount_page = run("MANWIDTH=100 man -P cat vmexportfs-mount 2>/dev/null");
    assert!(mount_page.contains("rate=SIZE"), "{mount_page}");
    let helper = run("MANWIDTH=100 man -P cat mount.vmexportfs 2>/dev/null");
    assert!(helper.contains("VMEXPORTFS_SOURCE"), "{helper}");
    // Bash completion proposes the subcommands.
    let words = run(
        "bash -c '. /usr/share/bash-completion/completions/vmexportfs; \
         COMP_WORDS=(vmexportfs re); COMP_CWORD=1; _vmexportfs vmexportfs re vmexportfs; \
         printf \"%s\\n\" \"${COMPREPLY[@]}\"'",
    );
    assert!(words.lines().any(|word| word == "refresh"), "{words}");

    run(&format!("dpkg -r {PACKAGE}"));
    assert!(!Path::new("/usr/bin/vmexportfs").exists());
    assert!(!Path::new("/usr/share/man/man8/vmexportfs.8.gz").exists());
}
