//! Steering and watching a running mount: `vmexportfs rate`, timetables,
//! per-file caps and priorities, `status`, `top`, the metrics endpoint and
//! the control socket's permissions. Rates are measured on real mounts.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::progress::{assert_near, Progress};
use common::*;

fn vmx(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn vmx_ok(args: &[&str]) -> String {
    let output = vmx(args);
    assert!(
        output.status.success(),
        "vmexportfs {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn status_json(mount: &Mount) -> serde_json::Value {
    let text = vmx_ok(&["status", mount.path.to_str().unwrap(), "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {text}"))
}

/// A dir:// source of fully written disks (no holes: every byte costs).
fn disks(names: &[&str], size: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in names.iter().enumerate() {
        write_random_file(&dir.path().join(name), size, 90 + i as u64);
    }
    dir
}

fn dir_source(dir: &tempfile::TempDir) -> String {
    format!("dir://{}", dir.path().display())
}

const M: f64 = MIB as f64;

#[test]
fn rate_changes_a_running_copy_within_a_second() {
    let src = disks(&["disk.raw"], 400 * MIB);
    let mount = Mount::new(&dir_source(&src), "rate=10M");
    let mp = mount.path.to_str().unwrap();
    assert!(vmx_ok(&["rate", mp]).contains("10485760 B/s"));
    let copy = Progress::start(mount.file("disk.raw"));
    std::thread::sleep(Duration::from_secs(1));
    assert_near(
        "rate=10M before the change",
        copy.measure(3.0),
        10.0 * M,
        0.05,
    );

    let answer = vmx_ok(&["rate", mp, "30M"]);
    assert!(answer.contains("31457280 B/s"), "{answer}");
    std::thread::sleep(Duration::from_secs(1));
    assert_near("after 'rate 30M'", copy.measure(3.0), 30.0 * M, 0.05);

    // Down again: the bytes fetched in the 2 s after the change are what
    // 10M allows plus one bucket, with no burst from the faster rate.
    let fetched_before = status_json(&mount)["totals"]["bytes_fetched"]
        .as_u64()
        .unwrap();
    vmx_ok(&["rate", mp, "10M"]);
    std::thread::sleep(Duration::from_secs(2));
    let fetched_after = status_json(&mount)["totals"]["bytes_fetched"]
        .as_u64()
        .unwrap();
    let spike = (fetched_after - fetched_before) as f64;
    eprintln!("measured: fetched in the 2 s after 'rate 10M': {spike:.0} B");
    assert!(
        spike <= 1.05 * 20.0 * M + 2.0 * M,
        "{spike:.0} B fetched in 2 s at 10M"
    );
    assert_near("after 'rate 10M'", copy.measure(3.0), 10.0 * M, 0.05);

    let off_at = Instant::now();
    let read_before_off = copy.bytes_at(off_at);
    vmx_ok(&["rate", mp, "off"]);
    let (end_at, total) = copy.wait_for_end(Duration::from_secs(10));
    assert_eq!(total, 400 * MIB);
    let unlimited = (total - read_before_off) as f64 / end_at.duration_since(off_at).as_secs_f64();
    eprintln!("measured: after 'rate off': {unlimited:.0} B/s");
    assert!(unlimited > 60.0 * M, "off still limits: {unlimited:.0} B/s");
    assert!(vmx_ok(&["rate", mp]).contains("unlimited"));
    copy.finish();
    assert!(mount
        .log_text()
        .contains("vmexportfs rate: mount limit set to"));

    // Bad input: one clear line, nothing changed.
    for (bad, expected) in [("fast", "rate: 'fast' is not a size"), ("10M:x", "burst")] {
        let output = vmx(&["rate", mp, bad]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{bad}: {stderr}");
    }
    assert!(vmx_ok(&["rate", mp]).contains("unlimited"));
}

/// The local time `HH:MM:SS` of a whole second about `seconds` from now,
/// and the instant it comes (date(1) gives the wall clock to the nanosecond).
fn local_second_ahead(seconds: u64) -> (String, Instant) {
    let now = Instant::now();
    let wall: f64 = sh("date +%s.%N").trim().parse().unwrap();
    let boundary = wall.floor() as u64 + seconds;
    let text = sh(&format!("date -d @{boundary} +%H:%M:%S"))
        .trim()
        .to_string();
    (text, now + Duration::from_secs_f64(boundary as f64 - wall))
}

#[test]
fn a_timetable_switches_the_rate_live_at_its_boundary() {
    // Keep the two entries on one side of midnight.
    while sh("date +%H%M%S").trim() > "235930" {
        std::thread::sleep(Duration::from_secs(5));
    }
    let src = disks(&["disk.raw"], 300 * MIB);
    let (boundary, at) = local_second_ahead(10);
    let mount = Mount::new(
        &dir_source(&src),
        &format!("schedule=daily 00:00 10M; {boundary} 30M"),
    );
    let status = status_json(&mount);
    assert_eq!(status["schedule"]["active"], "daily 00:00 10M", "{status}");
    assert_eq!(
        status["schedule"]["next_entry"],
        format!("{boundary} 30M"),
        "{status}"
    );
    assert_eq!(status["limit"]["rate"], 10 << 20);
    let text = vmx_ok(&["status", mount.path.to_str().unwrap()]);
    assert!(text.contains("next 30.0 MiB/s at"), "{text}");

    let copy = Progress::start(mount.file("disk.raw"));
    std::thread::sleep(Duration::from_millis(1000));
    let measured_from = Instant::now();
    Progress::wait_until(at - Duration::from_millis(200));
    let before_rate = copy.rate(measured_from, at - Duration::from_millis(200));
    assert_near(
        "timetable 10M before the boundary",
        before_rate,
        10.0 * M,
        0.05,
    );
    Progress::wait_until(at + Duration::from_millis(1200));
    assert_near("timetable 30M after it", copy.measure(3.0), 30.0 * M, 0.05);
    copy.finish();
    let status = status_json(&mount);
    assert_eq!(status["limit"]["rate"], 30 << 20);
    assert!(mount.log_text().contains("mount limit now 31457280 B/s"));
}

#[test]
fn bad_timetables_and_limits_are_refused_with_their_position() {
    assert_mount_fails(
        "demo://",
        "schedule=Mon-Fri 09:00 20M; 17:0O 100M",
        &[],
        "column 20",
    );
    assert_mount_fails("demo://", "schedule=Mon-Fry 09:00 20M", &[], "'Fry'");
    assert_mount_fails("demo://", "schedule=Mon 09:00 fast", &[], "fast");
    assert_mount_fails("demo://", "priority=db-*:0", &[], "from 1 to 1000");
    assert_mount_fails("demo://", "file_rate=quick", &[], "file_rate");
    assert_mount_fails("demo://", "fleet_rate=10M", &[], "needs fleet=");
    assert_mount_fails("demo://", "metrics=localhost", &[], "ADDRESS:PORT");
}

/// Two readers side by side for `seconds`: their rates.
fn two_readers(mount: &Mount, a: &str, b: &str, seconds: f64) -> (f64, f64) {
    let (ra, rb) = (
        Progress::start(mount.file(a)),
        Progress::start(mount.file(b)),
    );
    std::thread::sleep(Duration::from_secs(1));
    let from = Instant::now();
    let to = from + Duration::from_secs_f64(seconds);
    Progress::wait_until(to);
    let rates = (ra.rate(from, to), rb.rate(from, to));
    ra.finish();
    rb.finish();
    rates
}

#[test]
fn priorities_share_by_weight_and_a_lone_reader_gets_the_whole_rate() {
    let src = disks(&["db-01.raw", "web-01.raw", "web-02.raw"], 200 * MIB);
    let mount = Mount::new(&dir_source(&src), "rate=24M,priority=db-*:3,web-02*:1");
    let (db, web) = two_readers(&mount, "db-01.raw", "web-01.raw", 4.0);
    assert_near("weight 3 vs 1: the ratio (as B/s x1)", db / web, 3.0, 0.10);
    assert_near("weight 3 reader", db, 18.0 * M, 0.10);
    assert_near("weight 1 reader", web, 6.0 * M, 0.10);
    let lone = Progress::start(mount.file("web-02.raw"));
    std::thread::sleep(Duration::from_secs(1));
    assert_near("a lone weight-1 reader", lone.measure(3.0), 24.0 * M, 0.05);
    lone.finish();
}

#[test]
fn each_file_is_held_to_file_rate_inside_the_mount_rate() {
    let src = disks(&["a.raw", "b.raw", "c.raw"], 160 * MIB);
    let mount = Mount::new(&dir_source(&src), "rate=40M,file_rate=8M");
    let (a, b) = two_readers(&mount, "a.raw", "b.raw", 4.0);
    assert_near("file_rate=8M, reader a", a, 8.0 * M, 0.10);
    assert_near("file_rate=8M, reader b", b, 8.0 * M, 0.10);
    let lone = Progress::start(mount.file("c.raw"));
    std::thread::sleep(Duration::from_secs(1));
    assert_near(
        "file_rate=8M, lone reader",
        lone.measure(3.0),
        8.0 * M,
        0.05,
    );
    lone.finish();
    let status = status_json(&mount);
    assert_eq!(status["file_rate"], 8 << 20);
}

#[test]
fn status_and_top_show_the_copy_and_its_reading_process() {
    let src = disks(&["disk0.raw"], 120 * MIB);
    let mount = Mount::new(&dir_source(&src), "rate=10M");
    let mp = mount.path.to_str().unwrap();
    let mut dd = Command::new("dd")
        .arg(format!("if={}", mount.file("disk0.raw").display()))
        .args(["of=/dev/null", "bs=1M"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let status = status_json(&mount);
    let files = status["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{status}");
    let file = &files[0];
    assert_eq!(file["path"], "/disk0.raw");
    assert_eq!(file["pid"], dd.id());
    assert_eq!(file["command"], "dd");
    assert_eq!(file["size"], 120 * MIB);
    let read = file["bytes_read"].as_u64().unwrap();
    assert!(read > 20 * MIB && read < 60 * MIB, "{read}");
    assert_near(
        "status: the file's MB/s",
        file["rate"].as_f64().unwrap(),
        10.0 * M,
        0.15,
    );
    let eta = file["eta_seconds"].as_f64().unwrap();
    assert!((6.0..12.0).contains(&eta), "eta {eta}");
    assert_eq!(status["limit"]["rate"], 10 << 20);
    assert_eq!(status["limit_origin"], "rate= option");

    let text = vmx_ok(&["status", mp]);
    assert!(
        text.contains(&format!("/disk0.raw  [pid {} dd]", dd.id())),
        "{text}"
    );
    assert!(
        text.contains("/ 120.0 MiB •") && text.contains("ETA:"),
        "{text}"
    );

    // top without a terminal: a frame a second.
    let mut top = Command::new(bin())
        .args(["top", mp])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    top.kill().unwrap();
    let output = top.wait_with_output().unwrap();
    let frames = String::from_utf8_lossy(&output.stdout);
    assert!(
        frames.matches(&format!("[pid {} dd]", dd.id())).count() >= 2,
        "{frames}"
    );

    // top on a terminal (script(1) gives it one): q quits cleanly.
    let mut top = Command::new("script")
        .args(["-qfec", &format!("{} top {mp}", bin()), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    {
        use std::io::Write;
        top.stdin.as_mut().unwrap().write_all(b"q").unwrap();
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = top.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "top did not quit on q"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = top.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(status.success(), "top exited with {status}: {screen}");
    assert!(
        screen.contains("/disk0.raw") && screen.contains("ETA:"),
        "{screen}"
    );
    let _ = dd.kill();
    let _ = dd.wait();
}

fn scrape(port: u16) -> String {
    sh(&format!("curl -sf http://127.0.0.1:{port}/metrics"))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name).filter(|rest| rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_metrics_endpoint_counts_what_was_copied() {
    let src = disks(&["disk.raw"], 48 * MIB);
    let port = free_port();
    let mount = Mount::new(
        &dir_source(&src),
        &format!("rate=100M,metrics=127.0.0.1:{port}"),
    );
    let (bytes, _) = timed_read(&mount.file("disk.raw"));
    assert_eq!(bytes, 48 * MIB);
    let text = scrape(port);
    assert!(text.contains("# TYPE vmexportfs_fetched_bytes_total counter"));
    assert_eq!(metric(&text, "vmexportfs_served_bytes_total"), bytes as f64);
    assert_eq!(
        metric(&text, "vmexportfs_fetched_bytes_total"),
        bytes as f64
    );
    assert_eq!(
        metric(&text, "vmexportfs_limit_bytes_per_second"),
        (100 * MIB) as f64
    );
    assert!(metric(&text, "vmexportfs_throttle_wait_seconds_total") > 0.0);
    let reads = metric(
        &text,
        "vmexportfs_provider_requests_total{operation=\"read\"}",
    );
    assert!(reads >= (48 / 16) as f64, "{reads} read requests");
    assert_eq!(
        metric(
            &text,
            "vmexportfs_provider_request_duration_seconds_count{operation=\"read\"}"
        ),
        reads
    );
    assert_eq!(
        metric(
            &text,
            "vmexportfs_provider_errors_total{operation=\"read\",kind=\"not_found\"}"
        ),
        0.0
    );
    assert_eq!(metric(&text, "vmexportfs_fetches_in_flight"), 0.0);
    // Reading the same bytes again through one open file: a cache hit, and
    // served counts every byte returned.
    let hits_before = metric(&text, "vmexportfs_cache_hits_total");
    let file = std::fs::File::open(mount.file("disk.raw")).unwrap();
    let mut buf = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut buf, 0).unwrap();
    file.read_exact_at(&mut buf, 0).unwrap();
    let text = scrape(port);
    assert!(metric(&text, "vmexportfs_cache_hits_total") > hits_before);
    assert_eq!(
        metric(&text, "vmexportfs_served_bytes_total"),
        (bytes + 8192) as f64
    );
    let missing = sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/nothing"
    ));
    assert_eq!(missing, "404");
}

/// `vmexportfs` runnable by an unprivileged user (the build tree may not be).
fn binary_for_nobody() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("vmexportfs");
    std::fs::copy(bin(), &copy).unwrap();
    (dir, copy.display().to_string())
}

#[test]
fn the_control_socket_refuses_other_users() {
    require_tool("setpriv");
    let mount = Mount::new("demo://", "rate=10M");
    let mp = mount.path.to_str().unwrap();
    let status = status_json(&mount);
    assert_eq!(status["pid"], mount.pid);
    let socket_dir = Path::new("/run/vmexportfs");
    let socket = std::fs::read_dir(socket_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.to_string_lossy().ends_with(&format!(
                "{}.sock",
                mp.trim_start_matches('/')
                    .replace('-', "--")
                    .replace('/', "-")
            ))
        })
        .expect("the socket is under /run/vmexportfs");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let (_dir, nobody_bin) = binary_for_nobody();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &nobody_bin,
            ])
            .args(args)
            .output()
            .unwrap()
    };
    // The file mode stops them...
    std::fs::set_permissions(socket_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = as_nobody(&["rate", socket.to_str().unwrap(), "off"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    // ...and with the mode opened up, the peer check still does.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = as_nobody(&["rate", socket.to_str().unwrap(), "off"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("uid 65534 does not own this mount"),
        "{stderr}"
    );
    assert_eq!(status_json(&mount)["limit"]["rate"], 10 << 20, "unchanged");
    assert!(mount
        .log_text()
        .contains("refused a connection from uid 65534"));

    // Later mounts insist on a private socket directory: put it back.
    std::fs::set_permissions(socket_dir, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Gone with the mount.
    mount.unmount();
    assert!(!socket.exists(), "{socket:?} left behind");
}

#[test]
fn a_control_path_of_ones_own_and_sighup_rereads_the_config_file() {
    let src = disks(&["disk.raw"], 200 * MIB);
    let work = private_tempdir();
    let config = work.path().join("vmexportfs.conf");
    std::fs::write(&config, "# export window\nrate = 10M\nfile_rate = 40M\n").unwrap();
    let socket = work.path().join("ctl.sock");
    let mount = Mount::new(
        &dir_source(&src),
        &format!("config={},control={}", config.display(), socket.display()),
    );
    assert!(std::fs::metadata(&socket).unwrap().file_type().is_socket());
    // Found by mountpoint (through the link) and by socket path.
    let status = status_json(&mount);
    assert_eq!(status["limit"]["rate"], 10 << 20);
    assert_eq!(status["file_rate"], 40 << 20);
    assert!(vmx_ok(&["rate", socket.to_str().unwrap()]).contains("10485760"));

    let copy = Progress::start(mount.file("disk.raw"));
    std::thread::sleep(Duration::from_secs(1));
    assert_near("config rate=10M", copy.measure(2.0), 10.0 * M, 0.05);
    std::fs::write(
        &config,
        "rate = 10M\nschedule = daily 00:00 20M\nfile_rate = 40M\n",
    )
    .unwrap();
    // SAFETY: a signal to the mount process this test started.
    unsafe {
        libc::kill(mount.pid as i32, libc::SIGHUP);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_near(
        "after SIGHUP (timetable 20M)",
        copy.measure(3.0),
        20.0 * M,
        0.05,
    );
    copy.finish();
    let status = status_json(&mount);
    assert_eq!(status["schedule"]["active"], "daily 00:00 20M");
    assert!(mount.log_text().contains("SIGHUP: re-read"));

    // A broken file on SIGHUP keeps what is in force.
    std::fs::write(&config, "rate = quick\n").unwrap();
    unsafe {
        libc::kill(mount.pid as i32, libc::SIGHUP);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status_json(&mount)["limit"]["rate"], 20 << 20);
    assert!(mount.log_text().contains("keeping the settings in force"));
    mount.unmount();
    assert!(!socket.exists());
}

/// A directory under /tmp fit for `control=`: the mount insists on 0700.
fn private_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// One connection to a control socket, a line at a time.
struct Raw {
    stream: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = std::io::BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    /// Sends `line` (and a newline); the answer, or `None` if the mount
    /// closed the connection.
    fn ask(&mut self, line: &[u8]) -> Option<serde_json::Value> {
        use std::io::{BufRead, Write};
        // A write may fail once the mount has closed: the answer tells.
        let _ = self.stream.write_all(line);
        let _ = self.stream.write_all(b"\n");
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                Some(serde_json::from_str(&answer).unwrap_or_else(|err| panic!("{err}: {answer}")))
            }
        }
    }
}

fn first_file(mount: &Mount) -> std::path::PathBuf {
    let listing = sh(&format!(
        "cd '{}' && find . -type f | sort",
        mount.path.display()
    ));
    let first = listing.lines().next().expect("demo:// has files");
    mount.file(first.trim_start_matches("./"))
}

fn read_some(file: &Path) -> usize {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    let mut f = std::fs::File::open(file).unwrap();
    f.read(&mut buf).unwrap()
}

#[test]
fn hostile_control_requests_get_an_error_and_change_nothing() {
    let work = private_tempdir();
    let config = work.path().join("vmexportfs.conf");
    std::fs::write(&config, "rate = 10M\nburst = 1M\n").unwrap();
    let socket = work.path().join("ctl.sock");
    let mount = Mount::new(
        "demo://",
        &format!("config={},control={}", config.display(), socket.display()),
    );
    let in_force = || {
        let status = status_json(&mount);
        (status["limit"].clone(), status["limit_origin"].clone())
    };
    let before = in_force();
    assert_eq!(before.0["rate"], 10 << 20, "{before:?}");
    assert_eq!(before.0["burst"], 1 << 20, "{before:?}");

    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let hostile: Vec<(Vec<u8>, &str)> = vec![
        // The one that wedged the daemon.
        (
            br#"{"request":"set_rate","limit":{"rate":0,"burst":0}}"#.to_vec(),
            "rate 0 B/s",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":0}}"#.to_vec(),
            "rate 0 B/s",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":1048576,"burst":0}}"#.to_vec(),
            "below the minimum 4096",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":1048576,"burst":4095}}"#.to_vec(),
            "burst 4095 B",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":-1048576}}"#.to_vec(),
            "negative",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":1048576,"burst":-1}}"#.to_vec(),
            "negative",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":1048576.5}}"#.to_vec(),
            "not a whole number",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":1e400}}"#.to_vec(),
            "not a json request",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":18446744073709551615}}"#.to_vec(),
            "above the maximum",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":99999999999999999999999}}"#.to_vec(),
            "not a whole number",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":1048576,"burst":18446744073709551615}}"#
                .to_vec(),
            "above the maximum",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":"10M"}}"#.to_vec(),
            "whole number",
        ),
        (
            br#"{"request":"set_rate","limit":{"rate":1048576,"brust":65536}}"#.to_vec(),
            "unknown field \"brust\"",
        ),
        (
            br#"{"request":"set_rate","limit":"off"}"#.to_vec(),
            "must be an object",
        ),
        (br#"{"request":"set_rate"}"#.to_vec(), "missing \"limit\""),
        (
            br#"{"request":"shutdown"}"#.to_vec(),
            "unknown request \"shutdown\"",
        ),
        (br#"{"request":["status"]}"#.to_vec(), "must be a string"),
        (br#"{"limit":null}"#.to_vec(), "missing \"request\""),
        (b"[1,2,3]".to_vec(), "not an array"),
        (b"not json at all".to_vec(), "not a json request"),
        (b"".to_vec(), "not a json request"),
        (b"{\"request\":\"status\"\0}".to_vec(), "not a json request"),
        (b"\xff\xfe{\"request\":\"status\"}".to_vec(), "not utf-8"),
        (deep.into_bytes(), "not a json request"),
    ];
    assert!(hostile.len() >= 15);
    let mut conn = Raw::connect(&socket);
    for (line, expected) in &hostile {
        let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
        let answer = conn
            .ask(line)
            .unwrap_or_else(|| panic!("{shown}: connection closed"));
        assert_eq!(answer["answer"], "error", "{shown}: {answer}");
        let message = answer["message"].as_str().unwrap().to_lowercase();
        assert!(
            message.contains(&expected.to_lowercase()),
            "{shown}: {message}"
        );
        // Nothing changed, and the same connection still serves.
        let status = conn.ask(br#"{"request":"status"}"#).expect("still served");
        assert_eq!(status["answer"], "status", "after {shown}: {status}");
        assert_eq!(status["limit"], before.0, "after {shown}");
    }

    // A line longer than 64 KiB: an error, then the connection closes.
    let huge = vec![b'x'; 200 << 10];
    let answer = conn.ask(&huge).expect("an answer before closing");
    assert!(
        answer["message"].as_str().unwrap().contains("longer than"),
        "{answer}"
    );
    assert!(conn.ask(br#"{"request":"status"}"#).is_none(), "closed");

    // The command line refuses the same limits with one line each.
    let mp = mount.path.to_str().unwrap();
    for (bad, expected) in [("10M:0", "below the minimum"), ("2T", "above the maximum")] {
        let output = vmx(&["rate", mp, bad]);
        assert!(!output.status.success(), "{bad}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{bad}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{bad}: {stderr}");
    }

    // SIGHUP with a limit out of range keeps what is in force.
    std::fs::write(&config, "rate = 2T\n").unwrap();
    // SAFETY: a signal to the mount process this test started.
    unsafe {
        libc::kill(mount.pid as i32, libc::SIGHUP);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        mount.log_text().contains("above the maximum"),
        "{}",
        mount.log_text()
    );
    assert_eq!(in_force(), before);

    // The daemon is well: a valid request works, reads work, and the
    // limit it set is the one in force.
    let mut conn = Raw::connect(&socket);
    let answer = conn
        .ask(br#"{"request":"set_rate","limit":{"rate":20971520,"burst":4096}}"#)
        .unwrap();
    assert_eq!(answer["answer"], "rate", "{answer}");
    assert_eq!(answer["limit"]["burst"], 4096, "{answer}");
    assert_eq!(status_json(&mount)["limit"]["rate"], 20 << 20);
    assert!(read_some(&first_file(&mount)) > 0);
    let log = mount.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_control_directory_that_is_not_ones_own_is_refused() {
    let work = tempfile::tempdir().unwrap();
    // A symlink to a private directory: someone else could repoint it.
    let private = work.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = work.path().join("link");
    std::os::unix::fs::symlink(&private, &link).unwrap();
    assert_mount_fails(
        "demo://",
        &format!("control={}/ctl.sock", link.display()),
        &[],
        "is a symlink",
    );
    // A group-writable one.
    let shared = work.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o770)).unwrap();
    assert_mount_fails(
        "demo://",
        &format!("control={}/ctl.sock", shared.display()),
        &[],
        "must be 0700",
    );
    // Missing: made 0700, and the mount serves.
    let fresh = work.path().join("fresh");
    let socket = fresh.join("ctl.sock");
    let mount = Mount::new("demo://", &format!("control={},rate=10M", socket.display()));
    let meta = std::fs::symlink_metadata(&fresh).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert!(vmx_ok(&["rate", socket.to_str().unwrap()]).contains("10485760"));
    mount.unmount();
}
