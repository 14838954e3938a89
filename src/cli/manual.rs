//! Manual pages and shell completions, generated from the clap definitions
//! so that they cannot drift from what the binary accepts. The packaging
//! script (scripts/package.sh) writes them with the hidden command
//! `vmexportfs generate-docs DIR`.

use std::path::Path;

use anyhow::Context;
use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::Shell;

/// `vmexportfs generate-docs DIR` (scripts/package.sh).
pub(crate) const GENERATE_DOCS: &str = "generate-docs";

/// The long text of the mount options, for `vmexportfs mount --help` and
/// both manual pages; docs/options.md holds the full reference.
pub(crate) const MOUNT_OPTIONS_HELP: &str = "\
Mount options (-o, comma separated; sizes take K M G T (1024s), KB MB GB (1000s), Kbit Mbit Gbit):
  rate=SIZE|off             bytes per second fetched from the provider, whole mount (default off)
  burst=SIZE|auto           token bucket depth (default auto: max(rate/10, 64K))
  cache=SIZE                memory for fetched data and read-ahead, all files (default 256M)
  schedule=TIMETABLE        rates by time of week: 'Mon-Fri 09:00 20M; 17:00 100M'
  file_rate=SIZE            each open file at most this, inside the mount's rate
  priority=PATTERN:WEIGHT   weights of readers under contention, by path
  fleet=redis://HOST/DB     share fleet_rate= with every mount naming the same fleet_key=
  fleet_key=NAME, fleet_rate=SIZE, fleet_fallback=SIZE
  control=PATH|off          the control socket (rate, status, top, refresh)
  metrics=[ADDR:]PORT       Prometheus metrics at http://ADDR:PORT/metrics
  config=PATH               options from a file first; SIGHUP reads it again
  refresh=SECS|off          list the source again when the listing is this old (default 60)
  snapshot=on|off           vsphere://: read each VM from one snapshot (default off)
  snapshot_linger=SECS      how long the snapshot outlives the last close (default 60)
  timeout=SECS              an open or read not served by then fails with EIO (default 60)
  stall_timeout=SECS        an answer silent this long is retried (default 30)
  uid=N, gid=N, umask=OOO   owner and modes of every file (default: the mounting user, 022)
  allow_other, allow_root, default_permissions
  endpoint=URL, region=, profile=, anonymous, credentials=PATH, user=NAME, cafile=PATH, insecure
  log=PATH                  log file of the daemon (default /var/log/vmexportfs/ as root)
mount(8)'s and systemd's own options (defaults, noauto, _netdev, nofail, x-*) are accepted and ignored.";

/// The interface of /sbin/mount.vmexportfs (a shell script: this describes
/// it for its manual page; the script itself parses its arguments).
fn mount_helper_command() -> Command {
    Command::new("mount.vmexportfs")
        .about("mount(8) helper for vmexportfs")
        .long_about(
            "mount(8) runs mount.vmexportfs for `mount -t vmexportfs SOURCE DIR` and for \
             /etc/fstab entries and systemd mount units of type vmexportfs. It drops the \
             options that belong to mount(8) and systemd (defaults, auto, noauto, user, users, \
             owner, group, _netdev, nofail, comment=, x-*), then runs \
             `vmexportfs mount SOURCE DIR -o OPTIONS`, which returns once the mount answers. \
             A SOURCE with a query string (a SAS token, a signed URL) is passed in the \
             environment variable VMEXPORTFS_SOURCE, not on the command line, where ps(1) \
             would show it.",
        )
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(Arg::new("source").value_name("SOURCE").required(true).help(
            "What to mount: demo://, dir:///path, hyperv:///path, http(s)://host/manifest.json, \
             s3://bucket/prefix, ebs://region, az://account/container, gs://bucket, vsphere://host",
        ))
        .arg(
            Arg::new("dir")
                .value_name("DIR")
                .required(true)
                .help("The mountpoint, an existing directory"),
        )
        .arg(
            Arg::new("options")
                .short('o')
                .value_name("OPTIONS")
                .action(ArgAction::Append)
                .help("Mount options, comma separated (see below)"),
        )
        .arg(
            Arg::new("fake")
                .short('f')
                .action(ArgAction::SetTrue)
                .help("Check that vmexportfs is installed and DIR is a directory; mount nothing"),
        )
        .arg(
            Arg::new("verbose")
                .short('v')
                .action(ArgAction::SetTrue)
                .help("Print the command run (VMEXPORTFS_SOURCE shown as <hidden>)"),
        )
        .arg(
            Arg::new("sloppy")
                .short('s')
                .action(ArgAction::SetTrue)
                .help("Accepted and ignored"),
        )
        .arg(
            Arg::new("no-mtab")
                .short('n')
                .action(ArgAction::SetTrue)
                .help("Accepted and ignored (there is no mtab to write)"),
        )
        .after_long_help(format!(
            "{MOUNT_OPTIONS_HELP}\n\nExample /etc/fstab line:\n  \
             s3://backups/vms  /mnt/vms  vmexportfs  rate=50M,_netdev,nofail  0 0\n\n\
             See also: vmexportfs(8), mount(8), fstab(5), systemd.mount(5)."
        ))
}

/// Writes man8/*.8 and completions/{vmexportfs.bash,_vmexportfs,vmexportfs.fish}
/// under `dir`.
pub fn generate(dir: &Path) -> anyhow::Result<()> {
    let man_dir = dir.join("man8");
    let completion_dir = dir.join("completions");
    for made in [&man_dir, &completion_dir] {
        std::fs::create_dir_all(made).with_context(|| format!("creating {}", made.display()))?;
    }
    let mut cli = super::Cli::command();
    cli.build();
    write_man(&man_dir, &cli, "vmexportfs")?;
    // One page for each subcommand too: vmexportfs-mount(8), ...
    for sub in cli
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
    {
        let name = format!("vmexportfs-{}", sub.get_name());
        write_man(&man_dir, &sub.clone().name(name.clone()), &name)?;
    }
    write_man(&man_dir, &mount_helper_command(), "mount.vmexportfs")?;
    for (shell, file) in [
        (Shell::Bash, "vmexportfs.bash"),
        (Shell::Zsh, "_vmexportfs"),
        (Shell::Fish, "vmexportfs.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut super::Cli::command(), "vmexportfs", &mut out);
        let path = completion_dir.join(file);
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn write_man(dir: &Path, command: &Command, name: &str) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .manual("System Administration")
        .source(format!("vmexportfs {}", env!("CARGO_PKG_VERSION")))
        .render(&mut out)
        .with_context(|| format!("rendering the manual page of {name}"))?;
    let path = dir.join(format!("{name}.8"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_name_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        let main = std::fs::read_to_string(dir.path().join("man8/vmexportfs.8")).unwrap();
        assert!(
            main.starts_with(".ie") || main.contains(".TH vmexportfs 8"),
            "{main:.200}"
        );
        let cli = crate::cli::Cli::command();
        for sub in cli.get_subcommands() {
            assert!(
                main.contains(sub.get_name()),
                "{} missing from vmexportfs.8",
                sub.get_name()
            );
            let page = dir
                .path()
                .join(format!("man8/vmexportfs-{}.8", sub.get_name()));
            assert!(page.exists(), "{}", page.display());
        }
        assert!(
            !main.contains("generate-docs"),
            "the hidden command is not documented"
        );
        let mount = std::fs::read_to_string(dir.path().join("man8/vmexportfs-mount.8")).unwrap();
        assert!(
            mount.contains("refresh=SECS"),
            "the mount page lists the options"
        );
        let helper = std::fs::read_to_string(dir.path().join("man8/mount.vmexportfs.8")).unwrap();
        assert!(helper.contains(".TH mount.vmexportfs 8"), "{helper:.200}");
        assert!(helper.contains("VMEXPORTFS_SOURCE"));
        let bash = std::fs::read_to_string(dir.path().join("completions/vmexportfs.bash")).unwrap();
        let fish = std::fs::read_to_string(dir.path().join("completions/vmexportfs.fish")).unwrap();
        let zsh = std::fs::read_to_string(dir.path().join("completions/_vmexportfs")).unwrap();
        for script in [&bash, &fish, &zsh] {
            assert!(script.contains("refresh") && script.contains("status"));
            assert!(!script.contains("generate-docs"));
        }
    }
}
