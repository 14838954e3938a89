//! Shared fixtures for the mount tests: real mounts of the real binary,
//! real stand-in servers, and guards that clean up even when a test fails.
#![allow(dead_code)]

pub mod azurite;
pub mod fake_gcs;
pub mod faults;
pub mod progress;
pub mod redis;
pub mod tls;
pub mod vcsim;

#[allow(unused_imports)]
pub use azurite::Azurite;
#[allow(unused_imports)]
pub use fake_gcs::FakeGcs;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmexportfs")
}

/// Fails (never skips) when a tool the tests need is missing.
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run scripts/install-test-deps.sh (the tests never skip)"
    );
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

/// A mount made with `vmexportfs mount` (daemonized), unmounted on drop.
pub struct Mount {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub log: PathBuf,
    pub pid: u32,
}

impl Mount {
    pub fn new(source: &str, options: &str) -> Mount {
        Self::try_new(source, options).unwrap_or_else(|err| panic!("mount {source}: {err}"))
    }

    pub fn try_new(source: &str, options: &str) -> Result<Mount, String> {
        Self::try_new_with_env(source, options, &[])
    }

    /// Mounts with extra environment (credentials) for the mount process.
    pub fn try_new_with_env(
        source: &str,
        options: &str,
        env: &[(&str, &str)],
    ) -> Result<Mount, String> {
        let dir = tempfile::Builder::new()
            .prefix("vmx-test-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let log = dir.path().join("mount.log");
        let options = if options.is_empty() {
            format!("log={}", log.display())
        } else {
            format!("{options},log={}", log.display())
        };
        let output = Command::new(bin())
            .args(["mount", source])
            .arg(&path)
            .args(["-o", &options])
            .env("RUST_LOG", "vmexportfs=debug,info")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        if !output.status.success() {
            assert!(!is_mounted(&path), "a failed mount left {path:?} mounted");
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let pid = daemon_pid(&path).expect("the mount daemon is running");
        Ok(Mount {
            _dir: dir,
            path,
            log,
            pid,
        })
    }

    pub fn file(&self, relative: &str) -> PathBuf {
        self.path.join(relative)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory of the mount process, in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc/PID/status")
            * 1024
    }

    pub fn unmount(&self) {
        unmount(&self.path, self.pid);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
        if std::thread::panicking() {
            eprintln!(
                "--- mount log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

pub fn unmount(path: &Path, pid: u32) {
    if is_mounted(path) {
        let ok = Command::new("umount")
            .arg(path)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        if std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        // SAFETY: plain kill of a process id we started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

/// The pid of the `vmexportfs mount ... MOUNTPOINT` process.
pub fn daemon_pid(mountpoint: &Path) -> Option<u32> {
    let wanted = mountpoint.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").ok()? {
        let entry = entry.ok()?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a.ends_with("vmexportfs"))
            && args.iter().any(|a| a == "mount")
            && args.contains(&wanted)
        {
            return Some(pid);
        }
    }
    None
}

/// moto, the S3 stand-in, on a free loopback port.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

/// Credentials moto accepts (it checks none).
pub const S3_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
];

impl Moto {
    pub fn start() -> Moto {
        require_tool("moto_server");
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        wait_for_port(port);
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test", "test", None, None, "tests",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Creates `bucket` and puts each (key, bytes).
    pub fn seed(&self, bucket: &str, objects: &[(&str, Vec<u8>)]) {
        let client = self.client();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            client.create_bucket().bucket(bucket).send().await.unwrap();
            for (key, bytes) in objects {
                client
                    .put_object()
                    .bucket(bucket)
                    .key(*key)
                    .body(bytes.clone().into())
                    .send()
                    .await
                    .unwrap_or_else(|err| panic!("put {key}: {err:?}"));
            }
        });
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `size` pseudo-random bytes that differ per `seed`.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// nginx serving `root` on a free loopback port, with an access log that
/// records each request's Range header.
pub struct Nginx {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
    pub access_log: PathBuf,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        require_tool("nginx");
        let dir = tempfile::Builder::new()
            .prefix("vmx-nginx-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let access_log = dir.path().join("access.log");
        let d = dir.path().display();
        let config = format!(
            "daemon off; master_process off; user root; worker_processes 1;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               log_format ranged '$request_uri $status $http_range';\n\
               access_log {d}/access.log ranged;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               sendfile on; tcp_nopush on; keepalive_requests 100000;\n\
               types {{ application/json json; }} default_type application/octet-stream;\n\
               server {{ listen 127.0.0.1:{port}; root {}; }}\n\
             }}\n",
            root.display()
        );
        let child = spawn_nginx(dir.path(), &config, port);
        Nginx {
            dir,
            child,
            port,
            access_log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// Access log lines for `path` so far.
    pub fn requests_for(&self, path: &str) -> usize {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.split(' ').next() == Some(path))
            .count()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// nginx serving one disk of `size` random bytes as `vm/disk.raw` through
/// `manifest.json`. Keep the directory alive as long as the server.
pub fn serve_one_disk(size: u64, seed: u64) -> (tempfile::TempDir, Nginx) {
    let www = tempfile::tempdir().unwrap();
    write_random_file(&www.path().join("disk.raw"), size, seed);
    std::fs::write(
        www.path().join("manifest.json"),
        r#"{"vms":[{"name":"vm","disks":[{"name":"disk.raw","url":"disk.raw"}]}]}"#,
    )
    .unwrap();
    let nginx = Nginx::start(www.path());
    (www, nginx)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file of `size` bytes of pseudo-random data that differs per `seed`.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut left = size;
    let mut chunk = vec![0u8; 1 << 20];
    while left > 0 {
        for word in chunk.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
}

/// sha256 of a file, by coreutils.
pub fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(output.status.success(), "sha256sum {path:?}");
    String::from_utf8_lossy(&output.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

/// Runs a shell command, panicking with its output when it fails.
pub fn sh(command: &str) -> String {
    let output = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(
        output.status.success(),
        "`{command}` failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Reads a whole file through the mount and returns (bytes, seconds).
pub fn timed_read(path: &Path) -> (u64, f64) {
    let started = Instant::now();
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (total, started.elapsed().as_secs_f64())
}

/// `base` with `extra` options appended when there are any.
pub fn with_options(base: String, extra: &str) -> String {
    if extra.is_empty() {
        base
    } else {
        format!("{base},{extra}")
    }
}

/// `find` of the whole mount, one "path size" line each, sorted.
pub fn listing_with_sizes(mount: &Mount) -> Vec<String> {
    sh(&format!(
        "cd '{}' && find . -printf '%p %s\\n' | sort",
        mount.path.display()
    ))
    .lines()
    .map(str::to_string)
    .collect()
}

/// `rsync -a` of the whole mount; each (key, bytes) under `prefix` must
/// come out byte-identical.
pub fn assert_rsync_copies(mount: &Mount, prefix: &str, objects: &[(&str, Vec<u8>)]) {
    require_tool("rsync");
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        mount.path.display(),
        out.path().display()
    ));
    for (key, bytes) in objects {
        // Each key component as the mount names it (`%` escaped, say).
        let relative: PathBuf = key
            .strip_prefix(prefix)
            .unwrap()
            .split('/')
            .map(|part| vmexportfs::fs::names::valid_name(part).into_owned())
            .collect();
        let relative = relative.display();
        let copy = std::fs::read(out.path().join(relative.to_string()))
            .unwrap_or_else(|err| panic!("{relative} after rsync: {err}"));
        assert!(&copy == bytes, "{relative} differs after rsync");
    }
}

/// A command that must have succeeded; its stderr says why not.
pub fn assert_succeeded(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A mount that must fail with one line containing `expected`.
pub fn assert_mount_fails(source: &str, options: &str, env: &[(&str, &str)], expected: &str) {
    let err = Mount::try_new_with_env(source, options, env)
        .err()
        .unwrap_or_else(|| panic!("{source} mounted"));
    assert_eq!(err.trim_end().lines().count(), 1, "{source}: {err}");
    assert!(
        err.to_lowercase().contains(&expected.to_lowercase()),
        "{source} {options}: {err}"
    );
}

/// Runs a future on a small runtime of its own (fixtures seeding stand-ins).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// The objects every object-store test seeds under `exports/`: nested
/// prefixes, a space, unicode, characters that need escaping, a zero-byte
/// object, a multi-block object, a folder marker, and one key outside the
/// mounted prefix.
pub fn object_store_fixture() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "exports/web-01/disk 0.vmdk",
            random_bytes(20 * MIB as usize + 12345, 1),
        ),
        ("exports/web-01/ünïcødé.vhd", random_bytes(70_000, 2)),
        (
            "exports/db/nested/deep/a+b%20c#?&=.raw",
            random_bytes(3 * MIB as usize, 3),
        ),
        ("exports/empty.raw", Vec::new()),
        ("exports/folder-marker/", Vec::new()),
        ("elsewhere/not-mounted.raw", random_bytes(10, 4)),
    ]
}

/// What `listing_with_sizes` shows for [`object_store_fixture`] mounted at
/// `exports/`, plus `extra` lines.
pub fn object_store_listing(extra: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = [
        ". 0",
        "./db 0",
        "./db/nested 0",
        "./db/nested/deep 0",
        // `%` is escaped too, so the mapping is one-to-one.
        "./db/nested/deep/a+b%2520c#?&=.raw 3145728",
        "./empty.raw 0",
        "./folder-marker 0",
        "./web-01 0",
        "./web-01/disk 0.vmdk 20983865",
        "./web-01/ünïcødé.vhd 70000",
    ]
    .iter()
    .chain(extra)
    .map(|line| line.to_string())
    .collect();
    lines.sort();
    lines
}

/// Reads all of `file` and checks the rate achieved is `rate_mib` MiB/s
/// within ±5%.
pub fn assert_rate_holds(label: &str, file: &Path, size: u64, rate_mib: u64) {
    let (bytes, seconds) = timed_read(file);
    assert_eq!(bytes, size);
    assert_rate_within(label, bytes, seconds, rate_mib);
}

/// `bytes` in `seconds` is `rate_mib` MiB/s within ±5%.
pub fn assert_rate_within(label: &str, bytes: u64, seconds: f64, rate_mib: u64) {
    let achieved = bytes as f64 / seconds;
    let target = (rate_mib * MIB) as f64;
    eprintln!(
        "measured: {label} rate={rate_mib}M: {achieved:.0} B/s = {:.2}%",
        achieved / target * 100.0
    );
    assert!(
        (achieved / target - 1.0).abs() <= 0.05,
        "{achieved:.0} B/s vs {target:.0}"
    );
}

/// After the disk behind `file` changed, a read at `offset` is EIO and the
/// log names the file.
pub fn assert_changed_read_is_eio(mount: &Mount, file: &std::fs::File, name: &str, offset: u64) {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    let err = file
        .read_exact_at(&mut buf, offset)
        .expect_err("read after overwrite");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = mount.log_text();
    assert!(
        log.contains(&format!("/{name}")) && log.contains("changed since it was opened"),
        "{log}"
    );
}

/// Starts nginx with `config` written into `dir`, and waits for `port`.
pub fn spawn_nginx(dir: &Path, config: &str, port: u16) -> Child {
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting nginx");
    wait_for_port(port);
    child
}

/// The mount's log lines holding every one of `words`.
pub fn log_lines(mount: &Mount, words: &[&str]) -> Vec<String> {
    mount
        .log_text()
        .lines()
        .filter(|line| words.iter().all(|word| line.contains(word)))
        .map(str::to_string)
        .collect()
}

/// How vmexportfs records the process that took a snapshot, here for
/// process `pid`.
pub fn creator_record(pid: u32) -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap().trim().to_string();
    format!(
        "[vmexportfs host={} pid={pid} boot={}]",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

/// Polls `check` for up to 10 s.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
