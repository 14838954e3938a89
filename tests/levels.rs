//! Sources that list one directory level at a time (s3:// and gs://
//! delimiter listings, dir:// directory reads): the mount lists the root
//! only, every other directory when it is first used, and what the mount
//! shows is what a whole listing (`vmexportfs ls`) shows.

mod common;

use std::path::Path;

use common::*;

/// The paths `vmexportfs ls` prints for the source (a whole listing).
fn whole_listing(source: &str, options: &str, env: &[(&str, &str)]) -> Vec<String> {
    let output = std::process::Command::new(bin())
        .args(["ls", source, "-o", options])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert_succeeded(&output);
    // "{size:>16}  {human:>10}  {path}" per disk, then a total line.
    let mut paths: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.len() > 30 && line[..16].trim().parse::<u64>().is_ok())
        .map(|line| format!("/{}", &line[30..]))
        .collect();
    paths.sort();
    paths
}

/// Every file under the mount, as `/a/b` paths.
fn mounted_files(mount: &Mount) -> Vec<String> {
    let mut paths: Vec<String> = sh(&format!(
        "cd '{}' && find . -type f | sed 's|^\\.||'",
        mount.path.display()
    ))
    .lines()
    .map(str::to_string)
    .collect();
    paths.sort();
    paths
}

fn listed_directories(mount: &Mount) -> Vec<String> {
    mount
        .log_text()
        .lines()
        .filter(|line| line.contains("directory listed"))
        .filter_map(|line| {
            line.split("directory=")
                .nth(1)
                .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn s3_lists_a_directory_when_first_used() {
    let moto = Moto::start();
    moto.seed("vms", &object_store_fixture());
    let options = format!("endpoint={}", moto.endpoint);
    let mount = Mount::try_new_with_env("s3://vms/exports", &options, S3_ENV).unwrap();
    // Mounted from the root's level alone.
    assert!(
        listed_directories(&mount).is_empty(),
        "{}",
        mount.log_text()
    );
    // A disk put under a directory not used yet is there at its first use:
    // the directory was not listed at mount.
    moto.client();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        moto.client()
            .put_object()
            .bucket("vms")
            .key("exports/db/late.raw")
            .body(random_bytes(4096, 9).into())
            .send()
            .await
            .unwrap();
    });
    assert_eq!(
        std::fs::read(mount.file("db/late.raw")).unwrap(),
        random_bytes(4096, 9)
    );
    assert_eq!(listed_directories(&mount), vec!["/db"]);
    // Everything, as a whole listing sees it (names mapped the same way).
    assert_eq!(
        mounted_files(&mount),
        whole_listing("s3://vms/exports", &options, S3_ENV)
    );
    // A second walk lists nothing again (within refresh=).
    let listed = listed_directories(&mount).len();
    mounted_files(&mount);
    assert_eq!(listed_directories(&mount).len(), listed);
}

#[test]
fn gcs_lists_a_directory_when_first_used() {
    let gcs = FakeGcs::start();
    gcs.seed("images", &object_store_fixture());
    let options = format!("endpoint={},anonymous", gcs.endpoint);
    let mount = Mount::new("gs://images/exports", &options);
    assert!(
        listed_directories(&mount).is_empty(),
        "{}",
        mount.log_text()
    );
    gcs.put_objects(
        "images",
        &[("exports/web-01/late.raw", random_bytes(5000, 7))],
    );
    assert_eq!(
        std::fs::read(mount.file("web-01/late.raw")).unwrap(),
        random_bytes(5000, 7)
    );
    assert_eq!(
        mounted_files(&mount),
        whole_listing("gs://images/exports", &options, &[])
    );
}

#[test]
fn dir_lists_a_directory_when_first_used_and_never_through_a_symlink() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    write_random_file(&outside.path().join("secret.raw"), 1000, 1);
    for (path, size) in [
        ("vm1/disk0.raw", 70_000u64),
        ("vm1/snap/disk0-old.raw", 5000),
        ("vm2/disk0.raw", 3000),
        ("top.raw", 10),
    ] {
        let path = root.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_random_file(&path, size, size);
    }
    std::os::unix::fs::symlink(outside.path(), root.path().join("vm1/link")).unwrap();
    let source = format!("dir://{}", root.path().display());
    let mount = Mount::new(&source, "");
    assert!(
        listed_directories(&mount).is_empty(),
        "{}",
        mount.log_text()
    );
    write_random_file(&root.path().join("vm2/late.raw"), 2000, 5);
    assert_eq!(
        std::fs::read(mount.file("vm2/late.raw")).unwrap(),
        std::fs::read(root.path().join("vm2/late.raw")).unwrap()
    );
    assert!(
        !mount.file("vm1/link").exists(),
        "a symlinked directory is not listed"
    );
    assert_eq!(mounted_files(&mount), whole_listing(&source, "", &[]));
    assert_eq!(
        mounted_files(&mount),
        vec![
            "/top.raw",
            "/vm1/disk0.raw",
            "/vm1/snap/disk0-old.raw",
            "/vm2/disk0.raw",
            "/vm2/late.raw"
        ]
    );
}

#[test]
fn a_directory_that_cannot_be_listed_fails_alone() {
    let root = tempfile::tempdir().unwrap();
    for path in ["vm1/disk0.raw", "vm2/disk0.raw"] {
        let path = root.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_random_file(&path, 4096, 3);
    }
    let mount = Mount::new(&format!("dir://{}", root.path().display()), "");
    // vm1 goes after the mount listed the root, before anyone used it.
    std::fs::remove_dir_all(root.path().join("vm1")).unwrap();
    let err = std::fs::read_dir(mount.file("vm1")).and_then(|mut dir| dir.next().transpose());
    assert!(err.is_err(), "listing a directory gone at the source fails");
    assert!(
        mount.log_text().contains("listing failed"),
        "{}",
        mount.log_text()
    );
    // The rest of the mount goes on.
    assert_eq!(
        std::fs::read(mount.file("vm2/disk0.raw")).unwrap().len(),
        4096
    );
    assert!(Path::new(&mount.path).join("vm2").is_dir());
}

#[test]
fn refresh_lists_again_only_what_was_listed() {
    let root = tempfile::tempdir().unwrap();
    for path in ["vm1/disk0.raw", "vm2/disk0.raw"] {
        let path = root.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_random_file(&path, 4096, 3);
    }
    let mount = Mount::new(&format!("dir://{}", root.path().display()), "refresh=off");
    assert!(mount.file("vm1/disk0.raw").is_file());
    write_random_file(&root.path().join("vm1/disk1.raw"), 100, 4);
    std::fs::remove_file(root.path().join("vm1/disk0.raw")).unwrap();
    // refresh=off: vm1 stays as listed until asked.
    assert!(!mount.file("vm1/disk1.raw").exists());
    let out = sh(&format!("'{}' refresh '{}'", bin(), mount.path.display()));
    assert!(out.contains("1 disk(s) added, 1 removed"), "{out}");
    assert!(mount.file("vm1/disk1.raw").is_file());
    assert!(!mount.file("vm1/disk0.raw").exists());
    // vm2 was never used: the refresh did not list it.
    assert!(
        !listed_directories(&mount).iter().any(|dir| dir == "/vm2"),
        "{}",
        mount.log_text()
    );
}
