//! `s3://` against moto, the S3 stand-in, through real mounts.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

fn s3_options(moto: &Moto, extra: &str) -> String {
    with_options(format!("endpoint={}", moto.endpoint), extra)
}

#[test]
fn listing_and_rsync_match_the_bucket() {
    let moto = Moto::start();
    let objects = object_store_fixture();
    moto.seed("vms", &objects);
    let mount =
        Mount::try_new_with_env("s3://vms/exports", &s3_options(&moto, ""), S3_ENV).unwrap();

    assert_eq!(listing_with_sizes(&mount), object_store_listing(&[]));
    assert_rsync_copies(&mount, "exports/", &objects[..4]);
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
    assert_changed_read_is_eio(&mount, &file, "disk.raw", 20 * MIB);
}

#[test]
fn the_throttle_holds_against_s3() {
    let moto = Moto::start();
    moto.seed("vms", &[("disk.raw", random_bytes(48 * MIB as usize, 7))]);
    let mount =
        Mount::try_new_with_env("s3://vms", &s3_options(&moto, "rate=10M"), S3_ENV).unwrap();
    assert_rate_holds("s3", &mount.file("disk.raw"), 48 * MIB, 10);
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
        assert_mount_fails(source, &options, S3_ENV, expected);
    }
}
