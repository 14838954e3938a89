//! What readers cost the link, through real mounts of nginx: the mount's
//! own counters (fetched and served bytes) against bounds that reads in
//! 2 MiB blocks could never meet, with every byte checked.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

fn totals(mount: &Mount) -> (u64, u64) {
    let output = std::process::Command::new(bin())
        .args(["status", mount.path.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "status: {output:?}");
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let totals = &status["totals"];
    (
        totals["bytes_fetched"].as_u64().unwrap(),
        totals["bytes_served"].as_u64().unwrap(),
    )
}

/// nginx serving `disks` (names in `root`) as one VM's disks.
fn serve(root: &Path, disks: &[&str]) -> (Nginx, String) {
    let entries: Vec<String> = disks
        .iter()
        .map(|name| format!(r#"{{"name":"{name}","url":"{name}"}}"#))
        .collect();
    std::fs::write(
        root.join("manifest.json"),
        format!(
            r#"{{"vms":[{{"name":"vm","disks":[{}]}}]}}"#,
            entries.join(",")
        ),
    )
    .unwrap();
    let nginx = Nginx::start(root);
    let url = nginx.url("manifest.json");
    (nginx, url)
}

#[test]
fn random_4k_reads_fetch_little_more_than_they_read() {
    let www = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    write_random_file(&www.path().join("disk.raw"), size, 31);
    let source = std::fs::File::open(www.path().join("disk.raw")).unwrap();
    let (_nginx, url) = serve(www.path(), &["disk.raw"]);
    let mount = Mount::new(&url, "");
    let file = std::fs::File::open(mount.file("vm/disk.raw")).unwrap();
    let mut state = 99u64;
    let (mut got, mut want) = (vec![0u8; 4096], vec![0u8; 4096]);
    for _ in 0..300 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (state >> 16) % (size / 4096) * 4096;
        file.read_exact_at(&mut got, offset).unwrap();
        source.read_exact_at(&mut want, offset).unwrap();
        assert!(got == want, "other bytes at {offset}");
    }
    let (fetched, served) = totals(&mount);
    eprintln!("measured: 300 random 4 KiB reads: fetched {fetched} / served {served}");
    assert_eq!(served, 300 * 4096);
    // 2 MiB blocks would fetch 512 times what was read.
    assert!(
        fetched <= 4 * served,
        "fetched {fetched} bytes for {served} read"
    );
}

#[test]
fn a_sequential_copy_fetches_each_byte_once() {
    let www = tempfile::tempdir().unwrap();
    write_random_file(&www.path().join("disk.raw"), 200 * MIB + 12345, 32);
    let (_nginx, url) = serve(www.path(), &["disk.raw"]);
    let mount = Mount::new(&url, "");
    assert_eq!(
        sha256(&mount.file("vm/disk.raw")),
        sha256(&www.path().join("disk.raw"))
    );
    let (fetched, served) = totals(&mount);
    eprintln!("measured: sequential copy: fetched {fetched} / served {served}");
    assert_eq!(served, 200 * MIB + 12345);
    assert!(
        fetched as f64 <= served as f64 * 1.02,
        "fetched {fetched} bytes for {served} read"
    );
}

#[test]
fn debugfs_pulls_one_file_out_of_an_ext4_image_without_copying_the_disk() {
    require_tool("mkfs.ext4");
    require_tool("debugfs");
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let wanted = work.path().join("wanted");
    write_random_file(&wanted, 6 * MIB + 777, 33);
    let image = www.path().join("fs.img");
    sh(&format!(
        "truncate -s 512M {img} && mkfs.ext4 -q -F {img} && debugfs -w -R 'write {src} wanted' {img}",
        img = image.display(),
        src = wanted.display()
    ));
    let (_nginx, url) = serve(www.path(), &["fs.img"]);
    let mount = Mount::new(&url, "");
    let out = work.path().join("out");
    sh(&format!(
        "debugfs -R 'dump /wanted {}' {}",
        out.display(),
        mount.file("vm/fs.img").display()
    ));
    assert_eq!(sha256(&out), sha256(&wanted));
    let (fetched, served) = totals(&mount);
    eprintln!("measured: debugfs dump of a 6 MiB file: fetched {fetched}, served {served}");
    // 2 MiB blocks of metadata scattered over 512 MiB cost far more.
    assert!(
        fetched <= 3 * (6 * MIB + 777),
        "fetched {fetched} bytes to restore a 6 MiB file"
    );
}

#[test]
fn qemu_img_converts_a_sparse_qcow2_fetching_little_beyond_what_it_reads() {
    require_tool("qemu-img");
    let www = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let raw = work.path().join("sparse.raw");
    sh(&format!("truncate -s 512M {}", raw.display()));
    {
        let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        for i in 0..8u64 {
            let piece = random_bytes(MIB as usize + 4096 * i as usize, 40 + i);
            file.write_all_at(&piece, i * 61 * MIB + 12288).unwrap();
        }
    }
    sh(&format!(
        "qemu-img convert -f raw -O qcow2 {} {}",
        raw.display(),
        www.path().join("sparse.qcow2").display()
    ));
    let (_nginx, url) = serve(www.path(), &["sparse.qcow2"]);
    let mount = Mount::new(&url, "");
    let out = work.path().join("out.raw");
    sh(&format!(
        "qemu-img convert -f qcow2 -O raw {} {}",
        mount.file("vm/sparse.qcow2").display(),
        out.display()
    ));
    assert_eq!(sha256(&out), sha256(&raw));
    let (fetched, served) = totals(&mount);
    eprintln!("measured: qemu-img convert: fetched {fetched} / served {served}");
    assert!(
        fetched as f64 <= served as f64 * 1.1,
        "fetched {fetched} bytes for {served} read"
    );
}
