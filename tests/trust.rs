//! Trust in a hostile world: nothing outside a local tree is served, a
//! killed daemon's mount is replaced by the next mount, and a provider
//! that never answers fails reads at `timeout=` instead of hanging them.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn open_error(path: &Path) -> std::io::Error {
    match std::fs::File::open(path) {
        Ok(mut file) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            panic!("{path:?} opened and read {text:?}")
        }
        Err(err) => err,
    }
}

#[test]
fn symlinks_and_swapped_files_in_a_dir_tree_are_refused_at_open() {
    let tree = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("shadow"), b"root:SECRET:19000::::::\n").unwrap();
    std::fs::create_dir(outside.path().join("vm")).unwrap();
    std::fs::write(outside.path().join("vm/disk.raw"), b"OUTSIDE DISK").unwrap();
    for vm in ["web", "db", "app", "img"] {
        std::fs::create_dir(tree.path().join(vm)).unwrap();
        std::fs::write(
            tree.path().join(vm).join("disk.raw"),
            format!("{vm} disk bytes"),
        )
        .unwrap();
    }
    let mount = Mount::new(&format!("dir://{}", tree.path().display()), "allow_other");
    assert_eq!(
        std::fs::read(mount.file("web/disk.raw")).unwrap(),
        b"web disk bytes"
    );

    // The file becomes a symlink to a secret.
    std::fs::remove_file(tree.path().join("web/disk.raw")).unwrap();
    symlink(
        outside.path().join("shadow"),
        tree.path().join("web/disk.raw"),
    )
    .unwrap();
    let err = open_error(&mount.file("web/disk.raw"));
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");

    // A directory on the path becomes a symlink out of the tree, after it
    // was listed (the open refuses it) or before (its listing does).
    assert!(mount.file("db/disk.raw").is_file());
    for vm in ["db", "img"] {
        let old = tree.path().join(format!("{vm}.old"));
        std::fs::rename(tree.path().join(vm), old).unwrap();
        symlink(outside.path().join("vm"), tree.path().join(vm)).unwrap();
        let err = open_error(&mount.file(&format!("{vm}/disk.raw")));
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{vm}: {err}");
    }

    // Another file renamed over the listed one: not the disk that was listed.
    assert!(mount.file("app/disk.raw").is_file());
    std::fs::write(tree.path().join("app/new"), b"replaced bytes").unwrap();
    std::fs::rename(
        tree.path().join("app/new"),
        tree.path().join("app/disk.raw"),
    )
    .unwrap();
    let err = open_error(&mount.file("app/disk.raw"));
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    let log = mount.log_text();
    assert!(
        log.contains("web/disk.raw") && log.contains("refused"),
        "{log}"
    );
    assert!(log.contains("db/disk.raw"), "{log}");
    assert!(
        log.contains("img: a symlink or '..' on the path, refused"),
        "{log}"
    );
}

#[test]
fn a_file_open_before_a_swap_reads_on_from_what_it_opened() {
    let tree = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), vec![b'S'; 64 << 10]).unwrap();
    std::fs::create_dir(tree.path().join("vm")).unwrap();
    write_random_file(&tree.path().join("vm/disk.raw"), 8 * MIB, 3);
    let expected = std::fs::read(tree.path().join("vm/disk.raw")).unwrap();
    let mount = Mount::new(&format!("dir://{}", tree.path().display()), "");
    let mut file = std::fs::File::open(mount.file("vm/disk.raw")).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact(&mut head).unwrap();
    // Swapped while open: every later block still comes from the file
    // that was opened, never from the symlink's target.
    std::fs::rename(
        tree.path().join("vm/disk.raw"),
        tree.path().join("vm/moved.raw"),
    )
    .unwrap();
    symlink(
        outside.path().join("secret"),
        tree.path().join("vm/disk.raw"),
    )
    .unwrap();
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).unwrap();
    head.extend_from_slice(&rest);
    assert!(head == expected, "the open file read other bytes");
}

/// The `vmexportfs mount` daemon of a test, killed and unmounted on drop.
struct Remounted {
    path: PathBuf,
}

impl Drop for Remounted {
    fn drop(&mut self) {
        if let Some(pid) = daemon_pid(&self.path) {
            unmount(&self.path, pid);
        }
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn mount_at(source: &str, path: &Path, options: &str) -> std::process::Output {
    Command::new(bin())
        .args(["mount", source])
        .arg(path)
        .args(["-o", options])
        .output()
        .unwrap()
}

fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_daemon_leaves_a_dead_mount_that_the_next_mount_replaces() {
    let first = Mount::new("demo://", "");
    let path = first.path.clone();
    let _cleanup = Remounted { path: path.clone() };
    // SAFETY: a plain kill of the daemon this test started.
    unsafe { libc::kill(first.pid as i32, libc::SIGKILL) };
    wait_gone(first.pid);
    // Cached attributes may still answer a stat; a listing needs the daemon.
    let err = std::fs::read_dir(&path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    assert!(is_mounted(&path), "the dead mount is still there");

    let log = path.with_file_name("second.log");
    let output = mount_at("demo://", &path, &format!("log={}", log.display()));
    assert_succeeded(&output);
    let entries = std::fs::read_dir(&path).unwrap().count();
    assert!(entries > 0, "the new mount answers");
    let mut disk = std::fs::File::open(path.join("web-01/web-01-disk0.vmdk")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    disk.read_exact(&mut buf).unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cleared a dead vmexportfs mount"), "{text}");
    // Exactly one mount there now: the dead one is gone.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let here = mounts
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .count();
    assert_eq!(here, 1, "{mounts}");
}

#[test]
fn a_live_mount_or_a_foreign_dead_one_is_still_refused() {
    let live = Mount::new("demo://", "");
    let output = mount_at("demo://", &live.path, "");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    // The live mount was not touched.
    assert!(std::fs::read_dir(&live.path).unwrap().count() > 0);
}

#[test]
fn a_killed_daemon_comes_back_through_mount_t_vmexportfs() {
    // As a user installs it: the binary on PATH, the helper in /sbin.
    let repo = env!("CARGO_MANIFEST_DIR");
    sh(&format!("sh '{repo}/mount-helpers/install.sh' '{}'", bin()));
    let first = Mount::new("demo://", "");
    let path = first.path.clone();
    let _cleanup = Remounted { path: path.clone() };
    // SAFETY: as above.
    unsafe { libc::kill(first.pid as i32, libc::SIGKILL) };
    wait_gone(first.pid);
    let log = path.with_file_name("helper.log");
    let output = Command::new("mount")
        .args(["-t", "vmexportfs", "demo://"])
        .arg(&path)
        .args(["-o", &format!("rate=10M,_netdev,log={}", log.display())])
        .output()
        .unwrap();
    assert_succeeded(&output);
    assert!(std::fs::read_dir(&path).unwrap().count() > 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cleared a dead vmexportfs mount"), "{text}");
}

/// A server that accepts connections and answers HEAD for `answered`, and
/// nothing else ever: requests for other paths, and every GET, hang.
fn black_hole(answered: &'static str, size: u64) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut request = [0u8; 4096];
            let n = stream.read(&mut request).unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]).into_owned();
            if head.starts_with(&format!("HEAD {answered} ")) {
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nETag: \"v1\"\r\n\
                     Accept-Ranges: bytes\r\n\r\n"
                );
            }
            // Never a word more: the connection stays open and silent.
            held.push(stream);
        }
    });
    port
}

fn serve_manifest(manifest: &str) -> (tempfile::TempDir, Nginx) {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("manifest.json"), manifest).unwrap();
    let nginx = Nginx::start(root.path());
    (root, nginx)
}

#[test]
fn a_provider_that_never_answers_fails_opens_and_reads_with_eio_at_the_timeout() {
    let size = 4 * MIB;
    let port = black_hole("/disk.raw", size);
    let manifest = format!(
        r#"{{"vms": [{{"name": "vm", "disks": [
            {{"name": "disk.raw", "url": "http://127.0.0.1:{port}/disk.raw", "size": {size}}},
            {{"name": "mute.raw", "url": "http://127.0.0.1:{port}/mute.raw", "size": {size}}}]}}]}}"#
    );
    let (_root, nginx) = serve_manifest(&manifest);
    let mount = Mount::new(&nginx.url("/manifest.json"), "timeout=2");

    // The open's HEAD is answered; the GET never is.
    let started = Instant::now();
    let mut file = std::fs::File::open(mount.file("vm/disk.raw")).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = file.read_exact(&mut buf).unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(15),
        "the read failed after {took:?}, not at timeout=2"
    );
    // Nothing answers at all: the open fails the same way.
    let started = Instant::now();
    let err = std::fs::File::open(mount.file("vm/mute.raw")).unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(15), "the open took {took:?}");
    assert!(
        mount.log_text().contains("timeout=2s"),
        "{}",
        mount.log_text()
    );
    // The mount goes on: metadata still answers.
    assert!(std::fs::read_dir(mount.file("vm")).unwrap().count() == 2);
}

#[test]
fn an_object_store_that_never_answers_fails_the_mount_in_bounded_time() {
    let port = black_hole("/never", 0);
    let started = Instant::now();
    let err = Mount::try_new(
        "s3://bucket",
        &format!("endpoint=http://127.0.0.1:{port},anonymous,timeout=2"),
    )
    .err()
    .expect("the mount fails");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("timeout=2s"), "{err}");
}

#[test]
fn a_read_queued_behind_a_low_rate_does_not_time_out() {
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir(tree.path().join("vm")).unwrap();
    // 400 KiB at 100 KiB/s: about 3.5 s of waiting for tokens, with a
    // one-second timeout for the provider.
    write_random_file(&tree.path().join("vm/disk.raw"), 400 << 10, 9);
    let mount = Mount::new(
        &format!("dir://{}", tree.path().display()),
        "rate=100K,burst=64K,timeout=1",
    );
    let started = Instant::now();
    let copied = std::fs::read(mount.file("vm/disk.raw")).unwrap();
    let took = started.elapsed();
    assert_eq!(
        sha256_bytes(&copied),
        sha256(&tree.path().join("vm/disk.raw"))
    );
    assert!(took > Duration::from_secs(2), "throttled: took {took:?}");
}

fn sha256_bytes(bytes: &[u8]) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    sha256(file.path())
}

/// The shipped unit's ExecStart, pointed at this build and `mountpoint`.
fn unit_exec_start(mountpoint: &Path) -> Vec<String> {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers/vmexportfs-demo.service.example"),
    )
    .unwrap();
    assert!(
        unit.lines().any(|line| line == "Restart=on-failure"),
        "{unit}"
    );
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("an ExecStart= line");
    line.split_whitespace()
        .map(|word| match word {
            "/usr/local/bin/vmexportfs" => bin().to_string(),
            "/mnt/vmexportfs-demo" => mountpoint.display().to_string(),
            other => other.to_string(),
        })
        .collect()
}

fn wait_mounted_and_answering(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if is_mounted(path) && std::fs::read_dir(path).is_ok_and(|mut dir| dir.next().is_some()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{path:?} did not come up");
}

#[test]
fn the_systemd_unit_restarts_a_killed_daemon_onto_its_dead_mount() {
    // No systemd runs here: the test does what Restart=on-failure does,
    // starting the unit's ExecStart again after the daemon dies by a signal.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mnt");
    std::fs::create_dir(&path).unwrap();
    let _cleanup = Remounted { path: path.clone() };
    let command = unit_exec_start(&path);
    let start = || {
        Command::new(&command[0])
            .args(&command[1..])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut daemon = start();
    wait_mounted_and_answering(&path);
    daemon.kill().unwrap();
    let status = daemon.wait().unwrap();
    assert!(
        !status.success(),
        "killed: a failure for Restart=on-failure"
    );
    assert_eq!(
        std::fs::read_dir(&path).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    let mut restarted = start();
    wait_mounted_and_answering(&path);
    let mut disk = std::fs::File::open(path.join("web-01/web-01-disk0.vmdk")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    disk.read_exact(&mut buf).unwrap();
    drop(disk);
    let _ = Command::new("umount").arg(&path).status();
    let status = restarted.wait().unwrap();
    assert!(
        status.success(),
        "an unmount ends the restarted daemon cleanly"
    );
    let mut stderr = String::new();
    restarted
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("cleared a dead vmexportfs mount"),
        "{stderr}"
    );
}

/// Each hostile input fails `vmexportfs mount` with one line naming the
/// problem, leaves nothing mounted, and never panics.
#[test]
fn hostile_options_and_sources_are_one_line_each_and_nothing_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let refused = free_port();
    let long_name = "x".repeat(5000);
    let cases: Vec<(String, String, &str)> = vec![
        // Options.
        ("demo://".into(), "burst=0".into(), "burst"),
        ("demo://".into(), "rate=10M,burst=1".into(), "at least 4K"),
        ("demo://".into(), "rate=-5M".into(), "rate"),
        ("demo://".into(), "rate=1e999".into(), "rate"),
        ("demo://".into(), "rate=NaN".into(), "rate"),
        ("demo://".into(), "rate=99999999999T".into(), "rate"),
        ("demo://".into(), "cache=0".into(), "cache"),
        ("demo://".into(), "cache=-1".into(), "cache"),
        ("demo://".into(), "timeout=0".into(), "timeout"),
        ("demo://".into(), "timeout=-3".into(), "timeout"),
        ("demo://".into(), "timeout=inf".into(), "timeout"),
        (
            "demo://".into(),
            "snapshot_linger=nan".into(),
            "snapshot_linger",
        ),
        (
            "demo://".into(),
            "stall_timeout=1e308".into(),
            "stall_timeout",
        ),
        ("demo://".into(), "uid=-1".into(), "uid"),
        ("demo://".into(), "gid=4294967296".into(), "gid"),
        ("demo://".into(), "umask=8".into(), "umask"),
        ("demo://".into(), "umask=7777".into(), "umask"),
        ("demo://".into(), "password=hunter2".into(), "refused"),
        ("demo://".into(), format!("{long_name}=1"), "unknown option"),
        (
            "demo://".into(),
            "rate=10M,\u{1}=1".into(),
            "unknown option",
        ),
        ("demo://".into(), "metrics=not-an-address".into(), "metrics"),
        ("demo://".into(), "fleet_rate=10M".into(), "fleet"),
        (
            "demo://".into(),
            "fleet_key=a/b,fleet=redis://x,fleet_rate=1M".into(),
            "fleet_key",
        ),
        (
            "demo://".into(),
            "schedule=Mon 25:00 10M".into(),
            "schedule",
        ),
        ("demo://".into(), "priority=web:0".into(), "priority"),
        ("demo://".into(), "snapshot=maybe".into(), "snapshot"),
        ("demo://".into(), "config=/does/not/exist".into(), "config"),
        ("demo://".into(), "region=eu-west-1".into(), "region="),
        // Sources.
        ("".into(), String::new(), "not a source"),
        ("://".into(), String::new(), "unknown source scheme"),
        ("dir://".into(), String::new(), "absolute path"),
        ("dir://../../etc".into(), String::new(), "absolute path"),
        ("dir:///etc/passwd".into(), String::new(), "not a directory"),
        (
            format!("dir:///{long_name}"),
            String::new(),
            "source directory",
        ),
        ("hyperv:///nonexistent".into(), String::new(), "nonexistent"),
        ("file:///etc".into(), String::new(), "unknown source scheme"),
        (
            "http://user:secret@127.0.0.1/m.json".into(),
            String::new(),
            "password",
        ),
        ("s3://AKIA:secret@bucket".into(), String::new(), "password"),
        (
            "vsphere://root:pw@127.0.0.1/DC0".into(),
            String::new(),
            "password",
        ),
        ("gs://someone@bucket".into(), String::new(), "user name"),
        (
            format!("http://127.0.0.1:{refused}/manifest.json"),
            String::new(),
            "127.0.0.1",
        ),
        ("http://[::1/m.json".into(), String::new(), "http"),
        (
            "s3://".into(),
            format!("endpoint=http://127.0.0.1:{refused},anonymous,timeout=2"),
            "s3",
        ),
        ("az://".into(), String::new(), "az"),
        ("gs://".into(), "anonymous".into(), "gs"),
        ("vsphere://".into(), String::new(), "vsphere"),
        (
            "demo://?x=1".into(),
            "rate=off,burst=auto,cache=1K".into(),
            "cache",
        ),
    ];
    let mut checked = 0;
    for (source, options, expected) in &cases {
        let mut command = Command::new(bin());
        command.args(["mount", source]).arg(&mnt);
        if !options.is_empty() {
            command.args(["-o", options]);
        }
        command
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "x");
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let what = format!("mount {source:?} -o {options:?}");
        assert!(!output.status.success(), "{what} succeeded");
        assert!(!is_mounted(&mnt), "{what} left a mount");
        assert!(!stderr.contains("panic"), "{what}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{what}: one line: {stderr:?}"
        );
        assert!(
            stderr.to_lowercase().contains(&expected.to_lowercase()),
            "{what}: {stderr}"
        );
        checked += 1;
    }
    assert!(checked >= 45, "{checked} hostile inputs");
    eprintln!("{checked} hostile options and sources refused, one line each");
}

#[test]
fn a_disk_that_can_only_be_pinned_weakly_says_so_in_the_log_and_in_status() {
    // nginx without ETags: only Last-Modified can pin the disk.
    let www = tempfile::tempdir().unwrap();
    write_random_file(&www.path().join("disk.raw"), 2 * MIB, 5);
    std::fs::write(
        www.path().join("manifest.json"),
        r#"{"vms": [{"name": "vm", "disks": [{"name": "disk.raw", "url": "disk.raw"}]}]}"#,
    )
    .unwrap();
    let conf = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = conf.path().display();
    let config = format!(
        "daemon off; master_process off; user root; worker_processes 1;\n\
         pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{ access_log off; etag off;\n\
           client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;\n\
           uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
           server {{ listen 127.0.0.1:{port}; root {}; }} }}\n",
        www.path().display()
    );
    let mut nginx = spawn_nginx(conf.path(), &config, port);
    let mount = Mount::new(&format!("http://127.0.0.1:{port}/manifest.json"), "");
    for _ in 0..3 {
        std::fs::read(mount.file("vm/disk.raw")).unwrap();
    }
    let held = std::fs::File::open(mount.file("vm/disk.raw")).unwrap();
    let status = Command::new(bin())
        .args(["status", mount.path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_succeeded(&status);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("weak pin: pinned by Last-Modified only"),
        "{text}"
    );
    drop(held);
    let log = mount.log_text();
    assert_eq!(log.matches("weak pin").count(), 1, "once per disk:\n{log}");
    drop(mount);
    let _ = nginx.kill();
    let _ = nginx.wait();
}
