//! What systemd sees of the daemon, without systemd (PID 1 here is not
//! systemd): readiness on NOTIFY_SOCKET, journal-formatted logs when stderr
//! is the journal's stream, and the vmexportfs@.service template's command
//! line run as systemd would run it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Scratch {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    child: Option<Child>,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        Scratch {
            dir,
            mnt,
            child: None,
        }
    }

    fn notify_socket(&self) -> (PathBuf, UnixDatagram) {
        let path = self.dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (path, socket)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let len = socket.recv(&mut buf).expect("a notification within 30 s");
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

fn wait_for_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `device:inode` of a file, as systemd puts it in JOURNAL_STREAM.
fn stream_id(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap();
    format!("{}:{}", meta.dev(), meta.ino())
}

#[test]
fn foreground_tells_systemd_ready_and_stopping_and_logs_for_the_journal() {
    let mut scratch = Scratch::new();
    let (socket_path, socket) = scratch.notify_socket();
    let stderr_path = scratch.dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let child = Command::new(bin())
        .args(["mount", "demo://"])
        .arg(&scratch.mnt)
        .args(["--foreground", "-o", "rate=20M"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("JOURNAL_STREAM", stream_id(&stderr_path))
        .stderr(stderr)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    scratch.child = Some(child);
    let ready = receive(&socket);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(
        ready.contains("STATUS=") && ready.contains("demo://"),
        "{ready:?}"
    );
    // Ready means ready: the mount answers when systemd is told so.
    assert!(is_mounted(&scratch.mnt));
    assert!(scratch.mnt.join("web-01/web-01-disk0.vmdk").is_file());

    let child = scratch.child.as_mut().unwrap();
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(receive(&socket), "STOPPING=1");
    assert!(wait_for_exit(child).success());
    assert!(!is_mounted(&scratch.mnt));

    let log = std::fs::read_to_string(&stderr_path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty(), "the daemon logged nothing");
    for line in &lines {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| line.starts_with(p)),
            "no priority prefix: {line:?}"
        );
        // The journal stamps lines itself; no ISO timestamp of ours.
        assert!(
            !line.contains("Z  ") && !line.contains("\u{1b}["),
            "{line:?}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("<6>") && line.contains("SIGTERM")),
        "{log}"
    );
}

#[test]
fn stderr_not_the_journal_keeps_the_usual_format() {
    let mut scratch = Scratch::new();
    let stderr_path = scratch.dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let child = Command::new(bin())
        .args(["mount", "demo://"])
        .arg(&scratch.mnt)
        .args(["--foreground"])
        // Inherited from a unit but stderr was redirected: not the journal.
        .env("JOURNAL_STREAM", "1:1")
        .stderr(stderr)
        .spawn()
        .unwrap();
    scratch.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&scratch.mnt) {
        assert!(Instant::now() < deadline, "not mounted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = scratch.child.as_mut().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_for_exit(child).success());
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(log.lines().any(|line| line.contains("SIGTERM")), "{log}");
    assert!(!log.lines().any(|line| line.starts_with("<6>")), "{log}");
}

#[test]
fn daemonized_mount_names_its_main_pid_and_logs_to_the_journal() {
    let scratch = Scratch::new();
    let (socket_path, socket) = scratch.notify_socket();
    let stderr_path = scratch.dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let status = Command::new(bin())
        .args(["mount", "demo://"])
        .arg(&scratch.mnt)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("JOURNAL_STREAM", stream_id(&stderr_path))
        .stderr(stderr)
        .status()
        .unwrap();
    assert!(status.success());
    let ready = receive(&socket);
    let pid = daemon_pid(&scratch.mnt).expect("the daemon runs");
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(
        ready.contains(&format!("MAINPID={pid}\n")),
        "{ready:?} (daemon {pid})"
    );
    unmount(&scratch.mnt, pid);
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    // The daemon's own lines went to the journal (no log= was given).
    assert!(
        log.lines()
            .any(|line| line.starts_with("<6>") && line.contains("unmounted")),
        "{log}"
    );
}

/// The template's ExecStart, with the instance, environment file and
/// `${OPTIONS}` expanded as systemd expands them.
#[test]
fn service_template_command_mounts_and_notifies() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(repo.join("mount-helpers/vmexportfs@.service")).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in the unit"))
            .to_string()
    };
    assert_eq!(value("Type="), "notify");
    assert_eq!(value("EnvironmentFile="), "/etc/vmexportfs/%i.env");
    let exec = value("ExecStart=");
    let env_text =
        std::fs::read_to_string(repo.join("mount-helpers/vmexportfs.env.example")).unwrap();
    let env: Vec<(String, String)> = env_text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#') && line.contains('='))
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap();
            (key.to_string(), value.to_string())
        })
        .collect();
    assert!(
        env.iter().any(|(key, _)| key == "VMEXPORTFS_SOURCE"),
        "{env_text}"
    );
    let options = &env.iter().find(|(key, _)| key == "OPTIONS").unwrap().1;

    let mut scratch = Scratch::new();
    let (socket_path, socket) = scratch.notify_socket();
    let mnt = scratch.mnt.to_string_lossy().into_owned();
    let argv: Vec<String> = exec
        .split(' ')
        .map(|word| {
            word.replace("%f", &mnt)
                .replace("${OPTIONS}", options)
                .replace("/usr/bin/vmexportfs", bin())
        })
        .collect();
    assert!(
        !argv.iter().any(|word| word.contains("SOURCE")),
        "the source stays out of argv: {argv:?}"
    );
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    scratch.child = Some(child);
    assert!(receive(&socket).starts_with("READY=1\n"));
    assert!(scratch.mnt.join("web-01/web-01-disk0.vmdk").is_file());
    // The daemon's arguments hold no source, only `-`.
    let pid = scratch.child.as_ref().unwrap().id();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("demo://"));
    let child = scratch.child.as_mut().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_for_exit(child).success());
    assert!(!is_mounted(&scratch.mnt));
}
