//! `gs://` against fake-gcs-server, the GCS stand-in, through real mounts.

mod common;

use common::faults::{assert_copy_survives_faults, assert_permanent_fault_is_eio, FaultProxy};
use common::*;
use std::os::unix::fs::FileExt;

fn gcs_options(endpoint: &str, extra: &str) -> String {
    with_options(format!("endpoint={endpoint},anonymous"), extra)
}

#[test]
fn listing_and_rsync_match_the_bucket() {
    let gcs = FakeGcs::start();
    let objects = object_store_fixture();
    gcs.seed("images", &objects);
    let mount = Mount::new("gs://images/exports", &gcs_options(&gcs.endpoint, ""));

    // fake-gcs-server's filesystem backend accepts a folder-marker object
    // (`folder-marker/`) but never lists it, so no directory shows for it.
    let mut expected = object_store_listing(&[]);
    expected.retain(|line| line != "./folder-marker 0");
    assert_eq!(listing_with_sizes(&mount), expected);
    let ls = sh(&format!("ls -lR '{}'", mount.path.display()));
    assert!(
        ls.contains("20983865") && ls.contains("disk 0.vmdk"),
        "{ls}"
    );
    assert_rsync_copies(&mount, "exports/", &objects[..4]);
}

#[test]
fn an_object_overwritten_under_a_reader_fails_with_eio() {
    let gcs = FakeGcs::start();
    let original = random_bytes(24 * MIB as usize, 5);
    gcs.seed("exports", &[("disk.raw", original.clone())]);
    let mount = Mount::new("gs://exports", &gcs_options(&gcs.endpoint, ""));
    let file = std::fs::File::open(mount.file("disk.raw")).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, original[..4096]);

    gcs.put_objects(
        "exports",
        &[("disk.raw", random_bytes(24 * MIB as usize, 6))],
    );
    assert_changed_read_is_eio(&mount, &file, "disk.raw", 20 * MIB);
}

#[test]
fn the_throttle_holds_against_gcs() {
    let gcs = FakeGcs::start();
    gcs.seed(
        "exports",
        &[("disk.raw", random_bytes(48 * MIB as usize, 7))],
    );
    let mount = Mount::new("gs://exports", &gcs_options(&gcs.endpoint, "rate=10M"));
    assert_rate_holds("gcs", &mount.file("disk.raw"), 48 * MIB, 10);
}

#[test]
fn gcs_copies_survive_every_kind_of_transient_fault() {
    let gcs = FakeGcs::start();
    let original = random_bytes(24 * MIB as usize, 8);
    gcs.seed("exports", &[("disk.raw", original.clone())]);
    let proxy = FaultProxy::start(gcs.port);
    let mount = Mount::new(
        "gs://exports",
        &gcs_options(&proxy.url(), "stall_timeout=2"),
    );
    assert_copy_survives_faults(&proxy, 2, &mount.file("disk.raw"), &original);
    assert_permanent_fault_is_eio(&proxy, &mount.file("disk.raw"), 12 * MIB + 5);
}

#[test]
fn bad_gcs_sources_are_one_clear_line_and_nothing_is_mounted() {
    let gcs = FakeGcs::start();
    gcs.seed("exports", &[("x.raw", vec![1, 2, 3])]);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let cases = [
        (
            "gs://no-such-bucket",
            gcs_options(&gcs.endpoint, ""),
            "bucket does not exist",
        ),
        ("gs://exports", gcs_options(&dead, ""), "refused"),
        (
            "gs://",
            gcs_options(&gcs.endpoint, ""),
            "does not name a bucket",
        ),
        (
            "gs://Bad_Bucket/x",
            gcs_options(&gcs.endpoint, ""),
            "does not name a bucket",
        ),
    ];
    for (source, options, expected) in cases {
        assert_mount_fails(source, &options, &[], expected);
    }
    // A broken key file in place of Application Default Credentials.
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "{\"type\": \"service_account\"").unwrap();
    let err = Mount::try_new_with_env(
        "gs://exports",
        &format!("endpoint={}", gcs.endpoint),
        &[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            &key.path().to_string_lossy(),
        )],
    )
    .map(|_| ())
    .expect_err("broken credentials");
    assert!(err.contains("Application Default Credentials"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
