//! `s3://` against moto, the S3 stand-in, through real mounts.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

fn s3_options(moto: &Moto, extra: &str) -> String {
    let base = format!("endpoint={}", moto.endpoint);
    if extra.is_empty() {
        base
    } else {
        format!("{base},{extra}")
    }
}

#[test]
fn listing_and_rsync_match_the_bucket() {
    require_tool("rsync");
    let moto = Moto::start();
    let objects: Vec<(&str, Vec<u8>)> = vec![
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
    ];
    moto.seed("vms", &objects);
    let mount =
        Mount::try_new_with_env("s3://vms/exports", &s3_options(&moto, ""), S3_ENV).unwrap();

    let listing = sh(&format!("cd '{}' && find . | sort", mount.path.display()));
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        [
            ".",
            "./db",
            "./db/nested",
            "./db/nested/deep",
            "./db/nested/deep/a+b%20c#?&=.raw",
            "./empty.raw",
            "./folder-marker",
            "./web-01",
            "./web-01/disk 0.vmdk",
            "./web-01/ünïcødé.vhd",
        ]
    );
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "rsync -a '{}/' '{}/'",
        mount.path.display(),
        out.path().display()
    ));
    for (key, bytes) in &objects[..4] {
        let relative = key.strip_prefix("exports/").unwrap();
        let copy = std::fs::read(out.path().join(relative)).unwrap();
        assert!(&copy == bytes, "{relative} differs after rsync");
        let meta = std::fs::metadata(mount.path.join(relative)).unwrap();
        assert_eq!(
            meta.len(),
            bytes.len() as u64,
            "{relative}: size from the listing"
        );
    }
}

#[test]
fn an_object_overwritten_under_a_reader_fails_with_eio() {
    let moto = Moto::start();
    let original = random_bytes(24 * MIB as usize, 5);
    moto.seed("vms", &[("disk.raw", original.clone())]);
    let mount = Mount::try_new_with_env("s3://vms", &s3_options(&moto, ""), S3_ENV).unwrap();
    let file = std::fs::File::open(mount.file("disk.raw")).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, original[..4096]);

    let client = moto.client();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        client
            .put_object()
            .bucket("vms")
            .key("disk.raw")
            .body(random_bytes(24 * MIB as usize, 6).into())
            .send()
            .await
            .unwrap();
    });
    let mut far = vec![0u8; 4096];
    let err = file
        .read_exact_at(&mut far, 20 * MIB)
        .expect_err("read after overwrite");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = mount.log_text();
    assert!(
        log.contains("/disk.raw") && log.contains("changed since it was opened"),
        "{log}"
    );
}

#[test]
fn the_throttle_holds_against_s3() {
    let moto = Moto::start();
    moto.seed("vms", &[("disk.raw", random_bytes(48 * MIB as usize, 7))]);
    let mount =
        Mount::try_new_with_env("s3://vms", &s3_options(&moto, "rate=10M"), S3_ENV).unwrap();
    let (bytes, seconds) = timed_read(&mount.file("disk.raw"));
    assert_eq!(bytes, 48 * MIB);
    let achieved = bytes as f64 / seconds;
    let target = 10.0 * MIB as f64;
    eprintln!(
        "measured: s3 rate=10M: {achieved:.0} B/s = {:.2}%",
        achieved / target * 100.0
    );
    assert!(
        (achieved / target - 1.0).abs() <= 0.05,
        "{achieved:.0} B/s vs {target:.0}"
    );
}

#[test]
fn bad_s3_sources_are_one_clear_line_and_nothing_is_mounted() {
    let moto = Moto::start();
    moto.seed("vms", &[("x.raw", vec![1, 2, 3])]);
    let cases = [
        (
            "s3://no-such-bucket",
            s3_options(&moto, ""),
            "bucket does not exist",
        ),
        (
            "s3://vms",
            format!("endpoint=http://127.0.0.1:{}", free_port()),
            "refused",
        ),
        ("s3://", s3_options(&moto, ""), "does not name a bucket"),
        (
            "s3://Bad_Bucket/x",
            s3_options(&moto, ""),
            "does not name a bucket",
        ),
    ];
    for (source, options, expected) in cases {
        let err = Mount::try_new_with_env(source, &options, S3_ENV)
            .err()
            .unwrap_or_else(|| panic!("{source} mounted"));
        assert_eq!(err.trim_end().lines().count(), 1, "{source}: {err}");
        assert!(err.to_lowercase().contains(expected), "{source}: {err}");
    }
}
