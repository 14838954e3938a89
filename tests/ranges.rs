//! The ranged-body rule and http manifests, through real mounts: a server
//! or proxy that ignores Range fails the read at once (no retries, no
//! whole-object buffering); a server that refuses HEAD (pre-signed URLs)
//! still mounts and reads; hostile manifests are one line and no mount.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::faults::{Fault, FaultProxy, Plan};
use common::*;

/// `python3 -m http.server`, which answers every GET with 200 and the whole
/// file, whatever the Range header says.
struct PythonServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl PythonServer {
    fn start(root: &Path, log: PathBuf) -> PythonServer {
        require_tool("python3");
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting python3 -m http.server");
        wait_for_port(port);
        PythonServer { child, port, log }
    }

    /// GET requests for `path` it logged.
    fn gets(&self, path: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&format!("\"GET {path} ")))
            .count()
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One 4 KiB read at `offset` must fail with EIO within a few seconds.
fn assert_read_is_eio_fast(file: &Path, offset: u64) {
    let file = std::fs::File::open(file).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let err = file
        .read_exact_at(&mut buf, offset)
        .expect_err("a server that ignores Range must fail the read");
    let elapsed = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Seven attempts with backoff would take seconds; one takes milliseconds.
    assert!(
        elapsed < Duration::from_secs(3),
        "EIO only after {elapsed:?}"
    );
    eprintln!("measured: ignored Range → EIO after {elapsed:?}");
}

#[test]
fn an_http_server_that_ignores_range_fails_the_read_at_once() {
    let www = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    write_random_file(&www.path().join("disk.raw"), size, 31);
    // One disk with its size in the manifest, one found by HEAD.
    std::fs::write(
        www.path().join("manifest.json"),
        format!(
            r#"{{"vms":[{{"name":"vm","disks":[
                {{"name":"disk.raw","url":"disk.raw","size":{size}}},
                {{"name":"other.raw","url":"disk.raw"}}]}}]}}"#
        ),
    )
    .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let server = PythonServer::start(www.path(), logs.path().join("server.log"));
    let mount = Mount::new(
        &format!("http://127.0.0.1:{}/manifest.json", server.port),
        "",
    );
    assert_eq!(
        std::fs::metadata(mount.file("vm/other.raw")).unwrap().len(),
        size
    );
    assert_read_is_eio_fast(&mount.file("vm/disk.raw"), 64 * MIB);
    assert_read_is_eio_fast(&mount.file("vm/other.raw"), 0);
    let gets = server.gets("/disk.raw");
    assert!(
        (1..=4).contains(&gets),
        "{gets} GETs for two failed reads: refused answers must not be retried"
    );
    let log = mount.log_text();
    assert!(
        log.contains("ignores Range") && log.contains(&format!("127.0.0.1:{}", server.port)),
        "the log names the server and the fault: {log}"
    );
    assert!(!log.contains("retrying"), "{log}");
    let peak = mount.peak_rss();
    eprintln!("measured: peak RSS {} MiB", peak / MIB);
    assert!(
        peak < 96 * MIB,
        "peak RSS {} MiB: the whole object was buffered",
        peak / MIB
    );
}

#[test]
fn s3_behind_a_proxy_that_strips_range_fails_the_read_at_once() {
    let moto = Moto::start();
    let size = 64 * MIB as usize;
    moto.seed("vms", &[("disk.raw", random_bytes(size, 32))]);
    let moto_port: u16 = moto.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FaultProxy::start(moto_port);
    proxy.set(Plan::Always(Fault::StripRange));
    let mount =
        Mount::try_new_with_env("s3://vms", &format!("endpoint={}", proxy.url()), S3_ENV).unwrap();
    let before = s3_gets(&proxy);
    assert_read_is_eio_fast(&mount.file("disk.raw"), 8 * MIB);
    let gets = s3_gets(&proxy) - before;
    assert!(
        (1..=2).contains(&gets),
        "{gets} GETs for one failed read: a refused answer must not be retried"
    );
    let log = mount.log_text();
    assert!(
        log.contains("ignores Range")
            && log.contains("s3://vms/disk.raw")
            && log.contains(&proxy.url()),
        "the log names the object, the endpoint and the fault: {log}"
    );
    let peak = mount.peak_rss();
    eprintln!("measured: peak RSS {} MiB", peak / MIB);
    assert!(
        peak < 48 * MIB,
        "peak RSS {} MiB: the whole object was buffered",
        peak / MIB
    );
    // Passing Range through again, the same mount reads correctly.
    proxy.set(Plan::PassThrough);
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(mount.file("disk.raw"))
        .unwrap()
        .read_exact_at(&mut buf, 8 * MIB)
        .unwrap();
    assert!(buf == random_bytes(size, 32)[8 * MIB as usize..][..4096]);
}

#[test]
fn gcs_behind_a_proxy_that_strips_range_fails_the_read_at_once() {
    let gcs = FakeGcs::start();
    let size = 64 * MIB as usize;
    gcs.seed("exports", &[("disk.raw", random_bytes(size, 35))]);
    let proxy = FaultProxy::start(gcs.port);
    proxy.set(Plan::Always(Fault::StripRange));
    let mount = Mount::new(
        "gs://exports",
        &format!("endpoint={},anonymous", proxy.url()),
    );
    let before = gets_of(&proxy, "disk.raw", "alt=media");
    assert_read_is_eio_fast(&mount.file("disk.raw"), 8 * MIB);
    let gets = gets_of(&proxy, "disk.raw", "alt=media") - before;
    assert!(
        (1..=2).contains(&gets),
        "{gets} GETs for one failed read: a refused answer must not be retried: {:?}",
        proxy.heads.lock().unwrap()
    );
    let log = mount.log_text();
    assert!(
        log.contains("more than the") && log.contains("gs://exports/disk.raw"),
        "the log names the object and the fault: {log}"
    );
    let peak = mount.peak_rss();
    eprintln!("measured: peak RSS {} MiB", peak / MIB);
    assert!(
        peak < 48 * MIB,
        "peak RSS {} MiB: the whole object was buffered",
        peak / MIB
    );
}

#[test]
fn azure_behind_a_proxy_that_strips_range_fails_the_read_at_once() {
    let azurite = Azurite::start();
    let size = 64 * MIB as usize;
    azurite.seed("vms", &[("disk.raw", random_bytes(size, 36))]);
    let sas = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(sas.path(), azurite.account_sas_with("rl")).unwrap();
    let proxy = FaultProxy::start(azurite.port);
    proxy.set(Plan::Always(Fault::StripRange));
    let mount = Mount::new(
        "az://devstoreaccount1/vms",
        &format!(
            "endpoint={}/devstoreaccount1,credentials={}",
            proxy.url(),
            sas.path().display()
        ),
    );
    let before = gets_of(&proxy, "disk.raw", "");
    assert_read_is_eio_fast(&mount.file("disk.raw"), 8 * MIB);
    let gets = gets_of(&proxy, "disk.raw", "") - before;
    assert!(
        (1..=2).contains(&gets),
        "{gets} GETs for one failed read: a refused answer must not be retried"
    );
    let log = mount.log_text();
    assert!(
        log.contains("ignores Range") && log.contains("az://devstoreaccount1/vms/disk.raw"),
        "the log names the object and the fault: {log}"
    );
    let peak = mount.peak_rss();
    eprintln!("measured: peak RSS {} MiB", peak / MIB);
    assert!(
        peak < 48 * MIB,
        "peak RSS {} MiB: the whole object was buffered",
        peak / MIB
    );
}

/// GET requests through `proxy` whose path ends with `/NAME` and whose
/// request line holds `query` (GCS media downloads: `alt=media`).
fn gets_of(proxy: &FaultProxy, name: &str, query: &str) -> usize {
    proxy
        .heads
        .lock()
        .unwrap()
        .iter()
        .filter(|head| {
            let path = head.split(' ').nth(1).unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            head.starts_with("GET ")
                && path.ends_with(&format!("/{name}"))
                && head.lines().next().unwrap_or("").contains(query)
        })
        .count()
}

fn s3_gets(proxy: &FaultProxy) -> usize {
    proxy
        .heads
        .lock()
        .unwrap()
        .iter()
        .filter(|head| head.starts_with("GET /vms/disk.raw"))
        .count()
}

/// nginx serving `root` that answers HEAD with `head_status`, and, when
/// `refuse_ranges`, every ranged GET with 403 too.
struct RefusingNginx {
    _dir: tempfile::TempDir,
    child: Child,
    port: u16,
    access_log: PathBuf,
}

impl RefusingNginx {
    fn start(root: &Path, head_status: u16, refuse_ranges: bool) -> RefusingNginx {
        require_tool("nginx");
        let dir = tempfile::Builder::new()
            .prefix("vmx-nginx-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let d = dir.path().display();
        let ranges = if refuse_ranges {
            "if ($http_range) { return 403; }"
        } else {
            ""
        };
        let config = format!(
            "daemon off; master_process off; user root; worker_processes 1;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               log_format ranged '$request_method $request_uri $status $http_range';\n\
               access_log {d}/access.log ranged;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               types {{ application/json json; }} default_type application/octet-stream;\n\
               server {{ listen 127.0.0.1:{port}; root {};\n\
                 location / {{ if ($request_method = HEAD) {{ return {head_status}; }} {ranges} }}\n\
               }}\n\
             }}\n",
            root.display()
        );
        let child = spawn_nginx(dir.path(), &config, port);
        RefusingNginx {
            access_log: dir.path().join("access.log"),
            _dir: dir,
            child,
            port,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// Access log lines (`METHOD URI STATUS RANGE`) for `uri`.
    fn requests_for(&self, uri: &str) -> Vec<String> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.split(' ').nth(1) == Some(uri))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for RefusingNginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_server_that_refuses_head_mounts_and_reads_identically() {
    let www = tempfile::tempdir().unwrap();
    let sized = 9 * MIB + 77;
    write_random_file(&www.path().join("sized.raw"), sized, 33);
    write_random_file(&www.path().join("unsized.raw"), 5 * MIB + 3, 34);
    std::fs::write(www.path().join("empty.raw"), b"").unwrap();
    std::fs::write(
        www.path().join("manifest.json"),
        format!(
            r#"{{"vms":[{{"name":"vm","disks":[
                {{"name":"sized.raw","url":"sized.raw","size":{sized}}},
                {{"name":"unsized.raw","url":"unsized.raw"}},
                {{"name":"empty.raw","url":"empty.raw"}}]}}]}}"#
        ),
    )
    .unwrap();
    for head_status in [403, 405] {
        let nginx = RefusingNginx::start(www.path(), head_status, false);
        let mount = Mount::new(&nginx.url("manifest.json"), "");
        assert!(
            nginx.requests_for("/sized.raw").is_empty(),
            "HEAD {head_status}: a disk with a size in the manifest is listed without a request: {:?}",
            nginx.requests_for("/sized.raw")
        );
        let probes = nginx.requests_for("/unsized.raw");
        assert!(
            probes
                .iter()
                .any(|l| l.starts_with("GET /unsized.raw 206 bytes=0-0")),
            "HEAD {head_status}: the size comes from a one-byte GET: {probes:?}"
        );
        assert_eq!(
            std::fs::metadata(mount.file("vm/unsized.raw"))
                .unwrap()
                .len(),
            5 * MIB + 3
        );
        assert_eq!(
            std::fs::metadata(mount.file("vm/sized.raw")).unwrap().len(),
            sized
        );
        assert_eq!(
            std::fs::metadata(mount.file("vm/empty.raw")).unwrap().len(),
            0
        );
        let out = tempfile::tempdir().unwrap();
        sh(&format!(
            "cp -r '{}' '{}/'",
            mount.file("vm").display(),
            out.path().display()
        ));
        for name in ["sized.raw", "unsized.raw", "empty.raw"] {
            assert_eq!(
                sha256(&out.path().join("vm").join(name)),
                sha256(&www.path().join(name)),
                "HEAD {head_status}: {name}"
            );
        }
        // At open, the refused HEAD was followed by the probe; reads carry
        // the validator it found.
        let sized_requests = nginx.requests_for("/sized.raw");
        assert!(
            sized_requests
                .iter()
                .any(|l| l.starts_with(&format!("HEAD /sized.raw {head_status}"))),
            "{sized_requests:?}"
        );
        assert!(
            sized_requests
                .iter()
                .any(|l| l.starts_with("GET /sized.raw 206 bytes=0-0")),
            "{sized_requests:?}"
        );
    }
}

#[test]
fn a_missing_size_where_head_and_ranges_are_refused_fails_the_mount() {
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("disk.raw"), b"data").unwrap();
    std::fs::write(
        www.path().join("manifest.json"),
        r#"{"vms":[{"name":"vm","disks":[{"name":"d","url":"disk.raw"}]}]}"#,
    )
    .unwrap();
    let nginx = RefusingNginx::start(www.path(), 403, true);
    assert_mount_fails(
        &nginx.url("manifest.json"),
        "",
        &[],
        "HEAD answered 403 Forbidden and GET bytes=0-0 answered 403 Forbidden",
    );
}

#[test]
fn hostile_manifests_are_one_line_and_nothing_is_mounted() {
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("disk.raw"), b"data").unwrap();
    let disk = |fields: &str| format!(r#"{{"vms":[{{"name":"vm","disks":[{{{fields}}}]}}]}}"#);
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad-json", "{\"vms\": [".to_string(), "EOF while parsing"),
        (
            "not-a-manifest",
            r#"{"disks":[]}"#.to_string(),
            "unknown field",
        ),
        (
            "negative",
            disk(r#""name":"d","url":"disk.raw","size":-4"#),
            "size -4 is not a byte count",
        ),
        (
            "fractional",
            disk(r#""name":"d","url":"disk.raw","size":4.5"#),
            "size 4.5 is not a byte count",
        ),
        (
            "above-i64",
            disk(r#""name":"d","url":"disk.raw","size":9223372036854775808"#),
            "above the largest file size",
        ),
        (
            "above-u64",
            disk(r#""name":"d","url":"disk.raw","size":100000000000000000000000"#),
            "is not a byte count",
        ),
        (
            "file-url",
            disk(r#""name":"d","url":"file:///etc/passwd","size":4"#),
            "url scheme 'file:' is not http or https",
        ),
        (
            "ftp-url",
            disk(r#""name":"d","url":"ftp://127.0.0.1/disk.raw","size":4"#),
            "url scheme 'ftp:' is not http or https",
        ),
        (
            "credentials-url",
            disk(r#""name":"d","url":"http://user:pw@127.0.0.1/disk.raw","size":4"#),
            "credentials in the url",
        ),
        (
            "newline-name",
            disk("\"name\":\"d\\nsecond line\",\"url\":\"gopher://x/\",\"size\":4"),
            "not http or https",
        ),
        ("empty-vms", r#"{"vms":[]}"#.to_string(), "lists no VM"),
        (
            "no-url",
            disk(r#""name":"d","size":4"#),
            "missing field `url`",
        ),
    ];
    for (name, text, _) in &cases {
        std::fs::write(www.path().join(format!("{name}.json")), text).unwrap();
    }
    // A manifest over the 64 MiB limit: refused before it is read.
    let mut huge = disk(r#""name":"d","url":"disk.raw","size":4"#).into_bytes();
    huge.resize(100 * MIB as usize, b' ');
    std::fs::write(www.path().join("huge.json"), huge).unwrap();
    let nginx = Nginx::start(www.path());
    for (name, _, expected) in &cases {
        assert_mount_fails(&nginx.url(&format!("{name}.json")), "", &[], expected);
    }
    assert_mount_fails(&nginx.url("huge.json"), "", &[], "larger than 64 MiB");
}

#[test]
fn hostile_names_in_a_manifest_mount_as_valid_names_inside_the_mount() {
    let www = tempfile::tempdir().unwrap();
    let names = [
        ("a/b", "../../etc/passwd"),
        ("..", ".."),
        ("", ""),
        ("nul\u{0}vm", "d\u{0}isk"),
        (".", "x/y"),
        ("vm", "same"),
        ("vm", "same"),
    ];
    let mut disks = Vec::new();
    for (i, (vm, disk)) in names.iter().enumerate() {
        let file = format!("disk{i}.raw");
        let text = format!("content of disk {i}");
        std::fs::write(www.path().join(&file), &text).unwrap();
        disks.push(serde_json::json!({
            "name": vm,
            "disks": [{"name": disk, "url": file, "size": text.len()}],
        }));
    }
    std::fs::write(
        www.path().join("manifest.json"),
        serde_json::json!({ "vms": disks }).to_string(),
    )
    .unwrap();
    let nginx = Nginx::start(www.path());
    let mount = Mount::new(&nginx.url("manifest.json"), "");

    let mut contents = Vec::new();
    let mut stack = vec![mount.path.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.is_empty() && name != "." && name != ".." && name.len() <= 255,
                "invalid name {name:?} in {dir:?}"
            );
            let path = entry.path();
            // Every path found stays under the mountpoint.
            assert!(
                std::fs::canonicalize(&path)
                    .unwrap()
                    .starts_with(&mount.path),
                "{path:?} escapes the mount"
            );
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                contents.push(std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    contents.sort();
    // Each disk, the two of the same name included, shows once.
    let expected: Vec<String> = (0..names.len())
        .map(|i| format!("content of disk {i}"))
        .collect();
    assert_eq!(
        contents,
        expected,
        "{}",
        sh(&format!("cd '{}' && find .", mount.path.display()))
    );
    assert!(
        !mount.log_text().contains("panicked"),
        "{}",
        mount.log_text()
    );
}
